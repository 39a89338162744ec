# Included at the end of _kernels.pyx (one extension module; Cython `include`), after _bag_common.pxi,
# which holds the bags' conventions, checks and shared helpers: the table's gradient of an embedding bag,
# dense (embedding_bag_backward, into grad_table; threads own columns) and sparse (embedding_bag_grad_rows,
# one (row, values) entry per lookup that is not padding; threads own bags).

# ---------------------------------------------------------------- loops (no GIL, trusted bounds)

cdef inline Py_ssize_t _bag_kept(const index_t* ids, Py_ssize_t lo, Py_ssize_t hi, int64_t pad) noexcept nogil:
    """How many of ids[lo:hi] are not padding."""
    cdef Py_ssize_t i, n = 0
    if pad < 0:
        return hi - lo
    for i in range(lo, hi):
        if ids[i] != pad:
            n += 1
    return n


cdef inline void _bag_row_op(elem_t* dst, const elem_t* src, Py_ssize_t n, int mode, const elem_t* psw,
                             Py_ssize_t i, double inv) noexcept nogil:
    """dst += src scaled as lookup i's gradient is: by 1 (sum), per_sample_weights[i], or inv = 1 / count
    (mean; _bag_inv). The 16-bit formats round after each add: dst = round(dst + s * src) in float32."""
    cdef Py_ssize_t d
    cdef double s
    cdef float f
    if elem_t is float:
        if mode == BAG_MEAN:
            fe_bag_axpy(dst, src, n, <float>inv)
        elif psw != NULL:
            fe_bag_axpy(dst, src, n, psw[i])
        else:
            fe_add_into(dst, src, n)
    elif elem_t is double:
        if mode == BAG_MEAN or psw != NULL:
            s = inv if mode == BAG_MEAN else psw[i]
            for d in range(n):
                dst[d] += s * src[d]
        else:
            fe_add_into_f64(dst, src, n)
    else:
        if mode == BAG_MEAN or psw != NULL:
            f = <float>inv if mode == BAG_MEAN else _acc_value(psw[i])
            for d in range(n):
                _bag_set(dst + d, _acc_value(dst[d]) + f * _acc_value(src[d]))
        elif elem_t is fe_f16:
            fe_add_into_f16(dst, src, n)
        else:
            fe_add_into_bf16(dst, src, n)


cdef inline double _bag_inv(elem_t* like, Py_ssize_t count) noexcept nogil:
    """A mean's backward scale 1 / count as torch's dense backward has it: formed in float64, then made the
    dtype's (`(scalar_t)scale`: through float32 for the 16-bit formats); 0 for an empty bag."""
    if count <= 0:
        return 0
    cdef double x = 1.0 / <double>count
    if elem_t is float:
        return <float>x
    elif elem_t is double:
        return x
    else:
        return _bag_round(like, <float>x)


cdef Py_ssize_t _bag_backward_cols(elem_t* grad, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                                   const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                                   const elem_t* psw, int64_t pad, const elem_t* g, const int64_t* arg,
                                   Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t w0) noexcept nogil:
    """grad[., columns [c0, c1) and [w0, D)] += each lookup's gradient, bags and their ids in order."""
    cdef Py_ssize_t b, i, d, lo, hi, skipped = 0
    cdef int64_t r
    cdef double inv = 1
    cdef const elem_t* gb
    cdef const int64_t* ab
    for b in range(B):
        lo = offs[b]
        hi = _bag_end(offs, L, N, b)
        gb = g + b * D
        if mode == BAG_MAX:
            if _bag_kept(ids, lo, hi, pad) == 0:
                continue  # an empty bag's argmax (0) is no lookup: its gradient goes nowhere, as in torch
            ab = arg + b * D
            for d in range(c0, c1):
                r = ab[d]
                if _outside(r, V):
                    skipped += 1
                    continue
                _bag_add_one(grad + r * D + d, gb[d])
            for d in range(w0, D):
                r = ab[d]
                if _outside(r, V):
                    skipped += 1
                    continue
                _bag_add_one(grad + r * D + d, gb[d])
            continue
        if mode == BAG_MEAN:
            inv = _bag_inv(grad, _bag_kept(ids, lo, hi, pad))
        for i in range(lo, hi):
            if i + PREFETCH_ROWS < hi:
                _prefetch_elems_write(grad + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, c0, c1)
            r = ids[i]
            if _outside(r, V):
                skipped += 1
                continue
            if r == pad:
                continue
            _bag_row_op(grad + r * D + c0, gb + c0, c1 - c0, mode, psw, i, inv)
            if w0 < D:
                _bag_row_op(grad + r * D + w0, gb + w0, D - w0, mode, psw, i, inv)
    return skipped


cdef inline void _bag_add_one(elem_t* dst, elem_t x) noexcept nogil:
    """dst += x (a max bag's gradient: torch's index_add_, rounded after each add in the 16-bit formats)."""
    if elem_t is float or elem_t is double:
        dst[0] += x
    else:
        _bag_set(dst, _acc_value(dst[0]) + _acc_value(x))


cdef Py_ssize_t _bag_backward(elem_t* grad, Py_ssize_t V, Py_ssize_t D, const index_t* ids, const int64_t* offs,
                              Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode, const elem_t* psw, int64_t pad,
                              const elem_t* g, const int64_t* arg, int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t block = COLUMN_BLOCK * sizeof(float) // sizeof(elem_t)
    cdef Py_ssize_t c0, c1, w0, skipped = 0, phase = _phase_of(grad, sizeof(elem_t))
    team[0] = 1
    if nthreads <= 1:
        return _bag_backward_cols(grad, V, D, ids, offs, L, N, B, mode, psw, pad, g, arg, 0, D, D)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        c0 = _col_start_of(D, phase, k, nthreads, block)
        c1 = _col_end_of(D, phase, k, nthreads, block)
        w0 = _col_wrap_of(D, phase, k, nthreads, block)
        skipped += _bag_backward_cols(grad, V, D, ids, offs, L, N, B, mode, psw, pad, g, arg, c0, c1, w0)
    return skipped


cdef inline void _bag_scale_row(elem_t* out, const elem_t* a, Py_ssize_t n, double s) noexcept nogil:
    """out = s * a, written (not added to +0.0, which would turn -0.0 into +0.0); rounded once per element in
    the 16-bit formats."""
    cdef Py_ssize_t d
    cdef float f
    if elem_t is float:
        fe_bag_scale(out, a, n, <float>s)
    elif elem_t is double:
        for d in range(n):
            out[d] = s * a[d]
    else:
        f = <float>s
        for d in range(n):
            _bag_set(out + d, f * _acc_value(a[d]))


cdef inline double _bag_sparse_inv(elem_t* like, Py_ssize_t count) noexcept nogil:
    """A mean's scale in the sparse gradient, as torch's apply_bag_size_backward forms it: 1 / count in the
    dtype (the 16-bit formats: the count rounded to the dtype, divided in float32, rounded)."""
    if count <= 0:
        return 0
    if elem_t is float:
        return <float>(1.0 / <double>count)
    elif elem_t is double:
        return 1.0 / <double>count
    else:
        return _bag_round(like, 1.0 / _bag_round(like, <float>count))


cdef Py_ssize_t _bag_rows_out(Py_ssize_t V, Py_ssize_t D, const index_t* ids, const int64_t* offs, Py_ssize_t L,
                              Py_ssize_t N, int mode, const elem_t* psw, int64_t pad, const elem_t* g,
                              Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t j, Py_ssize_t j_hi, int64_t* rows,
                              elem_t* values) noexcept nogil:
    """The sparse gradient's entries [j, j_hi) from bags [b0, b1): one per lookup that is not padding."""
    cdef Py_ssize_t b, i, lo, hi, skipped = 0
    cdef int64_t r
    cdef double inv = 1
    for b in range(b0, b1):
        lo = offs[b]
        hi = _bag_end(offs, L, N, b)
        if mode == BAG_MEAN:
            inv = _bag_sparse_inv(values, _bag_kept(ids, lo, hi, pad))
        for i in range(lo, hi):
            r = ids[i]
            if r == pad:
                continue
            # An id changed since the entries were counted (see the loops in _kernels.pyx) must not move
            # the writes past this thread's entries: it is counted, and the call raises.
            if _outside(r, V) or j >= j_hi:
                skipped += 1
                continue
            rows[j] = r
            if mode == BAG_MEAN:
                _bag_scale_row(values + j * D, g + b * D, D, inv)
            elif psw != NULL:
                _bag_scale_row(values + j * D, g + b * D, D, _bag_psw(psw, i))
            else:
                memcpy(values + j * D, g + b * D, D * sizeof(elem_t))
            j += 1
    while j < j_hi:
        rows[j] = 0
        memset(values + j * D, 0, D * sizeof(elem_t))
        skipped += 1
        j += 1
    return skipped


cdef inline double _bag_psw(const elem_t* psw, Py_ssize_t i) noexcept nogil:
    if elem_t is float or elem_t is double:
        return psw[i]
    else:
        return _acc_value(psw[i])


# Dispatchers on the id width, then on the element format (one call each from the entry points, as in
# _kernels.pyx): fmt is FMT_F32, FMT_F64, FMT_F16 or FMT_BF16 (_common.pxi), checked by the entry point.

cdef Py_ssize_t _bag_backward_ids(elem_t* grad, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                  const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                                  const elem_t* psw, int64_t pad, const elem_t* g, const int64_t* arg,
                                  int nthreads, int* team) noexcept nogil:
    if wide:
        return _bag_backward(grad, V, D, <const int64_t*>ids, offs, L, N, B, mode, psw, pad, g, arg,
                             nthreads, team)
    return _bag_backward(grad, V, D, <const int32_t*>ids, offs, L, N, B, mode, psw, pad, g, arg, nthreads, team)


cdef Py_ssize_t _bag_backward_any(void* grad, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                  const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                                  const void* psw, int64_t pad, const void* g, const int64_t* arg, int fmt,
                                  int nthreads, int* team) noexcept nogil:
    if fmt == FMT_F32:
        return _bag_backward_ids(<float*>grad, V, D, ids, wide, offs, L, N, B, mode, <const float*>psw, pad,
                                 <const float*>g, arg, nthreads, team)
    if fmt == FMT_F64:
        return _bag_backward_ids(<double*>grad, V, D, ids, wide, offs, L, N, B, mode, <const double*>psw, pad,
                                 <const double*>g, arg, nthreads, team)
    if fmt == FMT_F16:
        return _bag_backward_ids(<fe_f16*>grad, V, D, ids, wide, offs, L, N, B, mode, <const fe_f16*>psw, pad,
                                 <const fe_f16*>g, arg, nthreads, team)
    return _bag_backward_ids(<fe_bf16*>grad, V, D, ids, wide, offs, L, N, B, mode, <const fe_bf16*>psw, pad,
                             <const fe_bf16*>g, arg, nthreads, team)


cdef Py_ssize_t _bag_kept_any(const void* ids, bint wide, Py_ssize_t lo, Py_ssize_t hi, int64_t pad) noexcept nogil:
    if wide:
        return _bag_kept(<const int64_t*>ids, lo, hi, pad)
    return _bag_kept(<const int32_t*>ids, lo, hi, pad)


cdef Py_ssize_t _bag_rows_ids(Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide, const int64_t* offs,
                              Py_ssize_t L, Py_ssize_t N, int mode, const elem_t* psw, int64_t pad,
                              const elem_t* g, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t j, Py_ssize_t j_hi,
                              int64_t* rows, elem_t* values) noexcept nogil:
    if wide:
        return _bag_rows_out(V, D, <const int64_t*>ids, offs, L, N, mode, psw, pad, g, b0, b1, j, j_hi, rows, values)
    return _bag_rows_out(V, D, <const int32_t*>ids, offs, L, N, mode, psw, pad, g, b0, b1, j, j_hi, rows, values)


cdef Py_ssize_t _bag_rows_out_any(Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide, const int64_t* offs,
                                  Py_ssize_t L, Py_ssize_t N, int mode, const void* psw, int64_t pad,
                                  const void* g, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t j, Py_ssize_t j_hi,
                                  int64_t* rows, void* values, int fmt) noexcept nogil:
    if fmt == FMT_F32:
        return _bag_rows_ids(V, D, ids, wide, offs, L, N, mode, <const float*>psw, pad, <const float*>g, b0, b1,
                             j, j_hi, rows, <float*>values)
    if fmt == FMT_F64:
        return _bag_rows_ids(V, D, ids, wide, offs, L, N, mode, <const double*>psw, pad, <const double*>g, b0, b1,
                             j, j_hi, rows, <double*>values)
    if fmt == FMT_F16:
        return _bag_rows_ids(V, D, ids, wide, offs, L, N, mode, <const fe_f16*>psw, pad, <const fe_f16*>g, b0, b1,
                             j, j_hi, rows, <fe_f16*>values)
    return _bag_rows_ids(V, D, ids, wide, offs, L, N, mode, <const fe_bf16*>psw, pad, <const fe_bf16*>g, b0, b1,
                         j, j_hi, rows, <fe_bf16*>values)


cdef Py_ssize_t _bag_rows_all(Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide, const int64_t* offs,
                              Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode, const void* psw, int64_t pad,
                              const void* g, const int64_t* starts, int64_t* rows, void* values, int fmt,
                              int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t skipped = 0, M = _bag_ids_in_bags(offs, L, N, B)
    team[0] = 1
    if nthreads <= 1:
        return _bag_rows_out_any(V, D, ids, wide, offs, L, N, mode, psw, pad, g, 0, B, 0, starts[1], rows, values,
                                 fmt)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        skipped += _bag_rows_out_any(V, D, ids, wide, offs, L, N, mode, psw, pad, g,
                                     _bag_first(offs, B, M, k, nthreads), _bag_first(offs, B, M, k + 1, nthreads),
                                     starts[k], starts[k + 1], rows, values, fmt)
    return skipped


# ---------------------------------------------------------------- entry points

def embedding_bag_backward(grad_table, ids, offsets, grad_out, mode, per_sample_weights=None, padding_idx=None,
                           include_last_offset=False, argmax=None, *, _format=None):
    """grad_table[ids[i]] += grad_out[bag of i] scaled per mode (max: into the argmax row of each column)."""
    cdef int fmt
    cdef cnp.ndarray grad = _any_target(grad_table, "grad_table", _format_arg(_format), &fmt)
    _check_2d(grad, "grad_table")
    cdef int m = _bag_mode(mode)
    cdef cnp.ndarray idx = _bag_ids(ids)
    cdef Py_ssize_t V = _rows(grad), D = _dim(grad), N = cnp.PyArray_SIZE(idx)
    cdef bint ilo = bool(include_last_offset)
    cdef cnp.ndarray offs = _bag_offsets(offsets, N, ilo)
    cdef Py_ssize_t L = cnp.PyArray_SIZE(offs), B = _bag_count(L, ilo)
    cdef int64_t pad = _bag_padding(padding_idx, V)
    cdef cnp.ndarray pw = _bag_weights(per_sample_weights, m, idx, grad, "grad_table")
    cdef cnp.ndarray src = _input_like(grad_out, "grad_out", grad, "grad_table")
    _check_bag_rows(src, "grad_out", B, D)
    cdef cnp.ndarray am = None
    if m == BAG_MAX:
        if argmax is None:
            raise ValueError("mode='max' needs argmax, the (bags, D) int64 array embedding_bag returned")
        am = _index_array(argmax, "argmax")
        if cnp.PyArray_ITEMSIZE(am) != 8:
            raise TypeError(f"argmax must be int64 (as embedding_bag returns it), got argmax.dtype={am.dtype}")
        _check_bag_rows(am, "argmax", B, D)
    elif argmax is not None:
        raise ValueError(f"argmax is for mode='max' only, got mode={mode!r}")
    _no_overlap(grad, "grad_table", (ids, offsets, grad_out, per_sample_weights, argmax),
                ("ids", "offsets", "grad_out", "per_sample_weights", "argmax"))
    _check_bag_range(idx, "ids", V, "grad_table")
    if am is not None:
        _check_range(am, "argmax", V, "grad_table")
    cdef void* g = cnp.PyArray_DATA(grad)
    cdef const void* s = cnp.PyArray_DATA(src)
    cdef const int64_t* a = NULL if am is None else <const int64_t*>cnp.PyArray_DATA(am)
    cdef const void* p = NULL if pw is None else cnp.PyArray_DATA(pw)
    cdef const int64_t* op = <const int64_t*>cnp.PyArray_DATA(offs)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _column_threads_of(N + B, D, g, cnp.PyArray_ITEMSIZE(grad)), team
    cdef bint release = _releases((N + B) * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _bag_backward_any(g, V, D, ip, wide, op, L, N, B, m, p, pad, s, a, fmt, nthreads, &team)
    else:
        skipped = _bag_backward_any(g, V, D, ip, wide, op, L, N, B, m, p, pad, s, a, fmt, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids or argmax")


def embedding_bag_grad_rows(num_embeddings, ids, offsets, grad_out, mode, per_sample_weights=None,
                            padding_idx=None, include_last_offset=False, *, _format=None):
    """(rows, values): torch's sparse gradient of the table, one entry per lookup that is not padding."""
    if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, (int, np.integer)):
        raise TypeError(f"num_embeddings must be an int, got {type(num_embeddings).__name__}")
    if not 0 <= num_embeddings <= PY_SSIZE_T_MAX:
        raise ValueError(f"num_embeddings must be >= 0, got {num_embeddings}")
    cdef Py_ssize_t V = num_embeddings
    cdef int m = _bag_mode(mode)
    if m == BAG_MAX:
        raise ValueError("max mode does not support sparse weights (as in torch): use embedding_bag_backward")
    cdef int fmt
    cdef int forced = _format_arg(_format)
    cdef cnp.ndarray idx = _bag_ids(ids)
    cdef Py_ssize_t N = cnp.PyArray_SIZE(idx)
    cdef bint ilo = bool(include_last_offset)
    cdef cnp.ndarray offs = _bag_offsets(offsets, N, ilo)
    cdef Py_ssize_t L = cnp.PyArray_SIZE(offs), B = _bag_count(L, ilo)
    cdef int64_t pad = _bag_padding(padding_idx, V)
    cdef cnp.ndarray src = _any_input(grad_out, "grad_out", forced, &fmt)
    cdef cnp.ndarray pw = _bag_weights(per_sample_weights, m, idx, src, "grad_out")
    if cnp.PyArray_NDIM(src) != 2 or cnp.PyArray_DIM(src, 0) != B:
        raise ValueError(f"grad_out must have shape (bags, D) with bags = {B}, got grad_out.shape={_shape(src)}")
    cdef Py_ssize_t D = cnp.PyArray_DIM(src, 1)
    _check_bag_range(idx, "ids", V, "the table")
    cdef const int64_t* op = <const int64_t*>cnp.PyArray_DATA(offs)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _bag_threads(N * D, B), team, k
    cdef Py_ssize_t M = _bag_ids_in_bags(op, L, N, B)
    # Where each thread's entries start: the kept lookups of the bags before its first one.
    cdef cnp.ndarray starts = np.zeros(nthreads + 1, dtype=np.int64)
    cdef int64_t* sp = <int64_t*>cnp.PyArray_DATA(starts)
    cdef Py_ssize_t b0, b1
    for k in range(nthreads):
        b0 = _bag_first(op, B, M, k, nthreads)
        b1 = _bag_first(op, B, M, k + 1, nthreads)
        sp[k + 1] = sp[k] + (_bag_kept_any(ip, wide, op[b0], _bag_end(op, L, N, b1 - 1), pad) if b1 > b0 else 0)
    cdef Py_ssize_t K = sp[nthreads]
    cdef cnp.ndarray rows = _fresh(K, np.int64)
    cdef cnp.ndarray values = _fresh((K, D), src.dtype)
    cdef const void* s = cnp.PyArray_DATA(src)
    cdef const void* p = NULL if pw is None else cnp.PyArray_DATA(pw)
    cdef int64_t* rp = <int64_t*>cnp.PyArray_DATA(rows)
    cdef void* vp = cnp.PyArray_DATA(values)
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _bag_rows_all(V, D, ip, wide, op, L, N, B, m, p, pad, s, sp, rp, vp, fmt, nthreads, &team)
    else:
        skipped = _bag_rows_all(V, D, ip, wide, op, L, N, B, m, p, pad, s, sp, rp, vp, fmt, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    return rows, values
