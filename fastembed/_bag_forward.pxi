# Included at the end of _kernels.pyx (one extension module; Cython `include`), after _bag_common.pxi,
# which holds the bags' conventions, checks and shared helpers: the forward of an embedding bag,
# embedding_bag (modes sum, mean and max; threads own bags).

# ---------------------------------------------------------------- loops (no GIL, trusted bounds)

cdef inline void _bag_max_row(elem_t* out, int64_t* arg, const elem_t* a, Py_ssize_t n, int64_t r) noexcept nogil:
    """A bag's running max (strictly greater, as torch: the earlier row stays on a tie and a NaN in out stays);
    the 16-bit formats compare their values and copy the winner's bits."""
    cdef Py_ssize_t d
    if elem_t is float:
        fe_bag_max(out, arg, a, n, r)
    elif elem_t is double:
        for d in range(n):
            if a[d] > out[d]:
                out[d] = a[d]
                arg[d] = r
    else:
        for d in range(n):
            if _acc_value(a[d]) > _acc_value(out[d]):
                out[d] = a[d]
                arg[d] = r


cdef inline void _bag_sum_row(elem_t* o, float* acc, float* w, const elem_t* row, Py_ssize_t n, const elem_t* psw,
                              Py_ssize_t i) noexcept nogil:
    """Adds lookup i (times per_sample_weights[i] when given) to its bag: into o for float32 and float64, into
    the float32 accumulator acc (row widened into w) for the 16-bit formats."""
    cdef Py_ssize_t d
    cdef double s
    if elem_t is float:
        if psw != NULL:
            fe_bag_axpy(o, row, n, psw[i])
        else:
            fe_add_into(o, row, n)
    elif elem_t is double:
        if psw != NULL:
            s = psw[i]
            for d in range(n):
                o[d] += s * row[d]
        else:
            fe_add_into_f64(o, row, n)
    else:
        _widen_row(w, row, n)
        if psw != NULL:
            fe_bag_axpy(acc, w, n, _acc_value(psw[i]))
        else:
            fe_add_into(acc, w, n)


cdef inline void _bag_finish(elem_t* o, float* acc, float* w, Py_ssize_t n, int mode, Py_ssize_t count) noexcept nogil:
    """A sum or mean bag's result in o: the 16-bit sum rounded once, then a mean divided by its count."""
    cdef Py_ssize_t d
    cdef double c
    if elem_t is float:
        if mode == BAG_MEAN and count > 0:
            fe_bag_div(o, n, <float>count)
    elif elem_t is double:
        if mode == BAG_MEAN and count > 0:
            c = <double>count
            for d in range(n):
                o[d] /= c
    else:
        _narrow_row(o, acc, n)
        if mode == BAG_MEAN and count > 0:
            # torch divides its 16-bit output (already rounded) by the count in the dtype, in float32
            _widen_row(w, o, n)
            fe_bag_div(w, n, _bag_round(o, <float>count))
            _narrow_row(o, w, n)


cdef Py_ssize_t _bag_forward_rows(const elem_t* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                                  const int64_t* offs, Py_ssize_t L, Py_ssize_t N, int mode, const elem_t* psw,
                                  int64_t pad, Py_ssize_t b0, Py_ssize_t b1, elem_t* out,
                                  int64_t* arg, float* acc) noexcept nogil:
    """out[b] (and arg[b] in max mode) for the bags [b0, b1); returns the number of ids found out of range.
    acc: 2 * D floats of this thread's (the 16-bit formats' accumulator and widened row; NULL otherwise).
    A float32 max with arg NULL computes the max only (the caller asked for no argmax)."""
    cdef Py_ssize_t b, i, d, lo, hi, count, skipped = 0
    cdef Py_ssize_t last = _bag_end(offs, L, N, b1 - 1) if b1 > b0 else 0
    cdef int64_t r
    cdef elem_t* o
    cdef int64_t* a
    cdef float* w = NULL if acc == NULL else acc + D
    cdef bint copy_first = False  # a float32 sum: its first row written as 0 + row, the next added BAG_CHUNK at a time
    cdef const float* chunk[BAG_MAX_CHUNK]  # BAG_CHUNK of them for a sum
    cdef int64_t chunk_ids[BAG_MAX_CHUNK]
    cdef Py_ssize_t pending
    cdef bint max_chunks = False  # a float32 max: its rows taken BAG_MAX_CHUNK at a time, the first as is
    if elem_t is float:
        copy_first = psw == NULL and mode != BAG_MAX
        max_chunks = mode == BAG_MAX
        if copy_first and (D == 32 or D == 64):
            # rows of 32 or 64 floats: each bag's whole sum in registers, the ids read directly (fe_bag_sum32/64_*:
            # the adds of the loop below, in the same order)
            if D == 32:
                if index_t is int32_t:
                    return fe_bag_sum32_i32(out, table, V, ids, offs, L, N, b0, b1, last, pad, mode == BAG_MEAN)
                else:
                    return fe_bag_sum32_i64(out, table, V, ids, offs, L, N, b0, b1, last, pad, mode == BAG_MEAN)
            if index_t is int32_t:
                return fe_bag_sum64_i32(out, table, V, ids, offs, L, N, b0, b1, last, pad, mode == BAG_MEAN)
            else:
                return fe_bag_sum64_i64(out, table, V, ids, offs, L, N, b0, b1, last, pad, mode == BAG_MEAN)
    for b in range(b0, b1):
        lo = offs[b]
        hi = _bag_end(offs, L, N, b)
        o = out + b * D
        if not copy_first and not max_chunks:
            memset(o, 0, D * sizeof(elem_t))  # a sum starts at +0.0, as torch's: a row of -0.0 sums to +0.0
        if acc != NULL:
            memset(acc, 0, D * sizeof(float))
        count = 0
        pending = 0
        for i in range(lo, hi):
            if i + PREFETCH_ROWS < last:
                _prefetch_elems(table + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, D)
            r = ids[i]
            if _outside(r, V):
                skipped += 1
                continue
            if r == pad:
                continue
            if mode == BAG_MAX:
                if max_chunks:
                    chunk[pending] = <const float*>(table + r * D)
                    chunk_ids[pending] = r
                    pending += 1
                    if pending == BAG_MAX_CHUNK:
                        # the bag's first chunk holds its first kept row: count (this row included) == pending
                        fe_bag_max_ptrs(<float*>o, NULL if arg == NULL else arg + b * D, chunk, chunk_ids, pending,
                                        D, count + 1 == pending)
                        pending = 0
                elif count == 0:
                    memcpy(o, table + r * D, D * sizeof(elem_t))
                    a = arg + b * D
                    for d in range(D):
                        a[d] = r
                else:
                    _bag_max_row(o, arg + b * D, table + r * D, D, r)
            elif copy_first and count == 0:
                fe_first_into(<float*>o, <const float*>(table + r * D), D)
            elif copy_first:
                chunk[pending] = <const float*>(table + r * D)
                pending += 1
                if pending == BAG_CHUNK:
                    fe_bag_sum_ptrs(<float*>o, chunk, pending, D)
                    pending = 0
            else:
                _bag_sum_row(o, acc, w, table + r * D, D, psw, i)
            count += 1
        if max_chunks and pending:
            fe_bag_max_ptrs(<float*>o, NULL if arg == NULL else arg + b * D, chunk, chunk_ids, pending, D,
                            count == pending)
            pending = 0
        if pending:
            fe_bag_sum_ptrs(<float*>o, chunk, pending, D)
        if copy_first and count == 0:
            memset(o, 0, D * sizeof(elem_t))  # an empty bag (or one of padding only) is zeros
        if max_chunks and count == 0:
            memset(o, 0, D * sizeof(elem_t))
        if mode != BAG_MAX:
            _bag_finish(o, acc, w, D, mode, count)
        elif count == 0 and arg != NULL:
            memset(arg + b * D, 0, D * sizeof(int64_t))
    return skipped


cdef Py_ssize_t _bag_forward(const elem_t* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                             const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                             const elem_t* psw, int64_t pad, elem_t* out, int64_t* arg, float* scratch, int nthreads,
                             int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t skipped = 0, M = _bag_ids_in_bags(offs, L, N, B)
    team[0] = 1
    if nthreads <= 1:
        return _bag_forward_rows(table, V, D, ids, offs, L, N, mode, psw, pad, 0, B, out, arg, scratch)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        skipped += _bag_forward_rows(table, V, D, ids, offs, L, N, mode, psw, pad,
                                     _bag_first(offs, B, M, k, nthreads), _bag_first(offs, B, M, k + 1, nthreads),
                                     out, arg, NULL if scratch == NULL else scratch + 2 * D * k)
    return skipped


# Dispatchers on the id width, then on the element format (one call each from the entry points, as in
# _kernels.pyx): fmt is FMT_F32, FMT_F64, FMT_F16 or FMT_BF16 (_common.pxi), checked by the entry point.

cdef Py_ssize_t _bag_forward_ids(const elem_t* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                 const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                                 const elem_t* psw, int64_t pad, elem_t* out, int64_t* arg, float* scratch,
                                 int nthreads, int* team) noexcept nogil:
    if wide:
        return _bag_forward(table, V, D, <const int64_t*>ids, offs, L, N, B, mode, psw, pad, out, arg, scratch,
                            nthreads, team)
    return _bag_forward(table, V, D, <const int32_t*>ids, offs, L, N, B, mode, psw, pad, out, arg, scratch,
                        nthreads, team)


cdef Py_ssize_t _bag_forward_any(const void* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                 const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                                 const void* psw, int64_t pad, void* out, int64_t* arg, float* scratch, int fmt,
                                 int nthreads, int* team) noexcept nogil:
    if fmt == FMT_F32:
        return _bag_forward_ids(<const float*>table, V, D, ids, wide, offs, L, N, B, mode, <const float*>psw, pad,
                                <float*>out, arg, scratch, nthreads, team)
    if fmt == FMT_F64:
        return _bag_forward_ids(<const double*>table, V, D, ids, wide, offs, L, N, B, mode, <const double*>psw,
                                pad, <double*>out, arg, scratch, nthreads, team)
    if fmt == FMT_F16:
        return _bag_forward_ids(<const fe_f16*>table, V, D, ids, wide, offs, L, N, B, mode, <const fe_f16*>psw,
                                pad, <fe_f16*>out, arg, scratch, nthreads, team)
    return _bag_forward_ids(<const fe_bf16*>table, V, D, ids, wide, offs, L, N, B, mode, <const fe_bf16*>psw,
                            pad, <fe_bf16*>out, arg, scratch, nthreads, team)


# ---------------------------------------------------------------- entry points

def embedding_bag(table, ids, offsets, mode, per_sample_weights=None, padding_idx=None,
                  include_last_offset=False, out=None, *, _format=None, argmax=True):
    """out[b] = the sum, mean or max of table[ids] over bag b; in max mode returns (out, argmax), argmax None
    when argmax=False (a float32 max then neither computes nor writes it: (B, D) int64 is twice out's bytes)."""
    cdef int fmt
    cdef cnp.ndarray tab = _any_table(table, "table", _format_arg(_format), &fmt)
    cdef int m = _bag_mode(mode)
    cdef cnp.ndarray idx = _bag_ids(ids)
    cdef Py_ssize_t V = _rows(tab), D = _dim(tab), N = cnp.PyArray_SIZE(idx)
    cdef bint ilo = bool(include_last_offset)
    cdef cnp.ndarray offs = _bag_offsets(offsets, N, ilo)
    cdef Py_ssize_t L = cnp.PyArray_SIZE(offs), B = _bag_count(L, ilo)
    cdef int64_t pad = _bag_padding(padding_idx, V)
    cdef cnp.ndarray pw = _bag_weights(per_sample_weights, m, idx, tab, "table")
    cdef cnp.ndarray res
    if out is None:
        res = _fresh((B, D), tab.dtype)
    else:
        res = _target_like(out, "out", tab, "table")
        _check_bag_rows(res, "out", B, D)
        _no_overlap(res, "out", (tab, ids, offsets, per_sample_weights),
                    ("table", "ids", "offsets", "per_sample_weights"))
    _check_bag_range(idx, "ids", V, "table")
    cdef bint want_arg = m == BAG_MAX and (bool(argmax) or fmt != FMT_F32)  # the other formats' loops write one
    cdef cnp.ndarray arg = _fresh((B, D), np.int64) if want_arg else None
    cdef int nthreads = _bag_threads((N + B) * D, B), team
    # The 16-bit formats' float32 accumulator and widened row, 2 * D floats per thread.
    cdef cnp.ndarray acc = None
    if (fmt == FMT_F16 or fmt == FMT_BF16) and m != BAG_MAX:
        acc = _fresh(2 * D * max(nthreads, 1), np.float32)
    cdef const void* t = cnp.PyArray_DATA(tab)
    cdef void* o = cnp.PyArray_DATA(res)
    cdef int64_t* a = NULL if arg is None else <int64_t*>cnp.PyArray_DATA(arg)
    cdef const void* p = NULL if pw is None else cnp.PyArray_DATA(pw)
    cdef float* sc = NULL if acc is None else <float*>cnp.PyArray_DATA(acc)
    cdef const int64_t* op = <const int64_t*>cnp.PyArray_DATA(offs)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef bint release = _releases((N + B) * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _bag_forward_any(t, V, D, ip, wide, op, L, N, B, m, p, pad, o, a, sc, fmt, nthreads, &team)
    else:
        skipped = _bag_forward_any(t, V, D, ip, wide, op, L, N, B, m, p, pad, o, a, sc, fmt, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    if m == BAG_MAX:
        return (res, arg if argmax else None)
    return res
