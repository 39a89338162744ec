# Included at the end of _kernels.pyx (one extension module; Cython `include`), after _bag_common.pxi,
# which holds the bags' conventions, checks and shared helpers: the gradient of per_sample_weights,
# embedding_bag_weights_grad (one dot product per lookup; threads own bags).

# ---------------------------------------------------------------- loops (no GIL, trusted bounds)

cdef inline void _bag_dot_into(elem_t* out, const elem_t* a, const elem_t* b, Py_ssize_t n) noexcept nogil:
    """out[0] = a . b in column order: float32 in float32, float64 in float64, the 16-bit formats in float32
    rounded once (torch's dot_with_fp32_arith; its order is its vector lanes', so the tests allow a tolerance)."""
    cdef Py_ssize_t d
    cdef double dacc = 0
    cdef float facc = 0
    if elem_t is float:
        out[0] = fe_bag_dot(a, b, n)
    elif elem_t is double:
        for d in range(n):
            dacc += a[d] * b[d]
        out[0] = dacc
    else:
        for d in range(n):
            facc += _acc_value(a[d]) * _acc_value(b[d])
        _bag_set(out, facc)


cdef Py_ssize_t _bag_weights_grad_rows(const elem_t* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                                       const int64_t* offs, Py_ssize_t L, Py_ssize_t N, int64_t pad,
                                       const elem_t* g, Py_ssize_t b0, Py_ssize_t b1, elem_t* out) noexcept nogil:
    """out[i] = table[ids[i]] . grad_out[bag of i] for the ids of bags [b0, b1); 0 (out is zeroed) for padding."""
    cdef Py_ssize_t b, i, lo, hi, skipped = 0
    cdef int64_t r
    for b in range(b0, b1):
        lo = offs[b]
        hi = _bag_end(offs, L, N, b)
        for i in range(lo, hi):
            if i + PREFETCH_ROWS < hi:
                _prefetch_elems(table + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, D)
            r = ids[i]
            if _outside(r, V):
                skipped += 1
                continue
            if r != pad:
                _bag_dot_into(out + i, table + r * D, g + b * D, D)
    return skipped


# Dispatchers on the id width, then on the element format (one call each from the entry points, as in
# _kernels.pyx): fmt is FMT_F32, FMT_F64, FMT_F16 or FMT_BF16 (_common.pxi), checked by the entry point.

cdef Py_ssize_t _bag_weights_grad_ids(const elem_t* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                      const int64_t* offs, Py_ssize_t L, Py_ssize_t N, int64_t pad, const elem_t* g,
                                      Py_ssize_t b0, Py_ssize_t b1, elem_t* out) noexcept nogil:
    if wide:
        return _bag_weights_grad_rows(table, V, D, <const int64_t*>ids, offs, L, N, pad, g, b0, b1, out)
    return _bag_weights_grad_rows(table, V, D, <const int32_t*>ids, offs, L, N, pad, g, b0, b1, out)


cdef Py_ssize_t _bag_weights_grad_any(const void* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                      const int64_t* offs, Py_ssize_t L, Py_ssize_t N, int64_t pad, const void* g,
                                      Py_ssize_t b0, Py_ssize_t b1, void* out, int fmt) noexcept nogil:
    if fmt == FMT_F32:
        return _bag_weights_grad_ids(<const float*>table, V, D, ids, wide, offs, L, N, pad, <const float*>g, b0, b1,
                                     <float*>out)
    if fmt == FMT_F64:
        return _bag_weights_grad_ids(<const double*>table, V, D, ids, wide, offs, L, N, pad, <const double*>g, b0,
                                     b1, <double*>out)
    if fmt == FMT_F16:
        return _bag_weights_grad_ids(<const fe_f16*>table, V, D, ids, wide, offs, L, N, pad, <const fe_f16*>g, b0,
                                     b1, <fe_f16*>out)
    return _bag_weights_grad_ids(<const fe_bf16*>table, V, D, ids, wide, offs, L, N, pad, <const fe_bf16*>g, b0, b1,
                                 <fe_bf16*>out)


cdef Py_ssize_t _bag_weights_grad_all(const void* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                      const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int64_t pad,
                                      const void* g, void* out, int fmt, int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t skipped = 0, M = _bag_ids_in_bags(offs, L, N, B)
    team[0] = 1
    if nthreads <= 1:
        return _bag_weights_grad_any(table, V, D, ids, wide, offs, L, N, pad, g, 0, B, out, fmt)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        skipped += _bag_weights_grad_any(table, V, D, ids, wide, offs, L, N, pad, g,
                                         _bag_first(offs, B, M, k, nthreads),
                                         _bag_first(offs, B, M, k + 1, nthreads), out, fmt)
    return skipped


# ---------------------------------------------------------------- entry points

def embedding_bag_weights_grad(table, ids, offsets, grad_out, padding_idx=None, include_last_offset=False, *,
                               _format=None):
    """d loss / d per_sample_weights[i] = table[ids[i]] . grad_out[bag of i] (0 for padding and for ids in no bag)."""
    cdef int fmt
    cdef cnp.ndarray tab = _any_table(table, "table", _format_arg(_format), &fmt)
    cdef cnp.ndarray idx = _bag_ids(ids)
    cdef Py_ssize_t V = _rows(tab), D = _dim(tab), N = cnp.PyArray_SIZE(idx)
    cdef bint ilo = bool(include_last_offset)
    cdef cnp.ndarray offs = _bag_offsets(offsets, N, ilo)
    cdef Py_ssize_t L = cnp.PyArray_SIZE(offs), B = _bag_count(L, ilo)
    cdef int64_t pad = _bag_padding(padding_idx, V)
    cdef cnp.ndarray src = _input_like(grad_out, "grad_out", tab, "table")
    _check_bag_rows(src, "grad_out", B, D)
    _check_bag_range(idx, "ids", V, "table")
    cdef cnp.ndarray res = np.zeros(N, dtype=tab.dtype)
    cdef const void* t = cnp.PyArray_DATA(tab)
    cdef const void* s = cnp.PyArray_DATA(src)
    cdef void* o = cnp.PyArray_DATA(res)
    cdef const int64_t* op = <const int64_t*>cnp.PyArray_DATA(offs)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _bag_threads(N * D, B), team
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _bag_weights_grad_all(t, V, D, ip, wide, op, L, N, B, pad, s, o, fmt, nthreads, &team)
    else:
        skipped = _bag_weights_grad_all(t, V, D, ip, wide, op, L, N, B, pad, s, o, fmt, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    return res
