# Included at the end of _kernels.pyx (one extension module; Cython `include`): embedding bags, the
# kernels of torch's nn.EmbeddingBag / F.embedding_bag (CPU), forward and backward.
#
# Bag b of B is ids[offsets[b]:end_b], end_b = offsets[b + 1], except that without include_last_offset the
# last bag ends at N = len(ids); with it, offsets has B + 1 entries and ids past offsets[B] are in no bag
# (torch's sum and max forward agree; its mean forward divides by N - offsets[B - 1] there, and its backward
# reads past grad_out: not followed). Ids equal to padding_idx are left out of their bag, and of a mean's
# count. An empty bag (or one of padding only) gives zeros, and in max mode argmax 0, as torch reports it.
#
# Axes: B bags, N ids, D columns, V table rows. Threads own bags (each bag one thread's, in ids order) in the
# forward, the sparse rows and the weights' gradient, and columns in the dense backward (as scatter_add):
# the results are bitwise the same for every thread count.

from libc.string cimport memset

cdef extern from "_fastembed.h" nogil:
    void fe_bag_axpy(float* out, const float* a, Py_ssize_t n, float s)
    void fe_bag_max(float* out, int64_t* arg, const float* a, Py_ssize_t n, int64_t r)
    void fe_bag_div(float* out, Py_ssize_t n, float c)
    void fe_bag_scale(float* out, const float* a, Py_ssize_t n, float s)
    float fe_bag_dot(const float* a, const float* b, Py_ssize_t n)

# The table's element type, named once here so that the dtype work can template it (the entry points
# check float32 with _table/_target/_float_input from _common.pxi).
ctypedef float bag_t

cdef enum:
    BAG_SUM = 0
    BAG_MEAN = 1
    BAG_MAX = 2


class BagArgumentError(ValueError, RuntimeError):
    """Bad bag offsets or padding_idx. A ValueError (fastembed's answer to a bad value) that is also the
    RuntimeError torch raises for the same input, so code written for either catches it (as numpy's
    AxisError is both a ValueError and an IndexError)."""
    __module__ = "fastembed"  # its public name: fastembed.BagArgumentError


class BagIndexError(IndexError, RuntimeError):
    """An id out of the table in a bag call: fastembed's IndexError, which is also the RuntimeError torch's
    embedding_bag raises for it (torch's own type even depends on max_norm: IndexError with, RuntimeError
    without)."""
    __module__ = "fastembed"


class BagOffsetError(BagArgumentError, IndexError):
    """A negative offset: a BagArgumentError like every bad offset, and the IndexError torch raises for it."""
    __module__ = "fastembed"


class BagModeError(ValueError, NotImplementedError):
    """per_sample_weights with a mode other than "sum": a ValueError, and the NotImplementedError torch raises."""
    __module__ = "fastembed"


# ---------------------------------------------------------------- checks (GIL held)

cdef int _check_bag_range(cnp.ndarray idx, str name, Py_ssize_t V, str table) except -1:
    """The shared id check, its IndexError raised as a BagIndexError (also torch's RuntimeError)."""
    try:
        _check_range(idx, name, V, table)
    except IndexError as exc:
        raise BagIndexError(str(exc)) from None
    return 0

cdef int _bag_mode(object mode) except -1:
    if isinstance(mode, str):
        if mode == "sum":
            return BAG_SUM
        if mode == "mean":
            return BAG_MEAN
        if mode == "max":
            return BAG_MAX
    raise ValueError(f"mode has to be one of sum, mean or max, got mode={mode!r}")


cdef int64_t _bag_padding(object padding_idx, Py_ssize_t V) except? -2:
    """padding_idx as a row in [0, V), or -1 for none; negative values count from the end, as in torch."""
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, (bool, np.bool_)) or not isinstance(padding_idx, (int, np.integer)):
        raise TypeError(f"padding_idx must be None or an int, got {type(padding_idx).__name__}")
    p = int(padding_idx)
    if not -V <= p < V:
        raise BagArgumentError(
            f"padding_idx must be within the number of embeddings, {-V} through {V - 1}, but got {p}"
        )
    return p + V if p < 0 else p


cdef Py_ssize_t _bad_offset(const int64_t* offs, Py_ssize_t L, Py_ssize_t N, int* why) noexcept nogil:
    """The index of the first offset that is negative, not 0 at the start, smaller than the one before, or
    past N; -1 when all are fine."""
    cdef Py_ssize_t k
    cdef int64_t x
    for k in range(L):
        x = offs[k]
        if x < 0:
            why[0] = 0
            return k
        if k == 0 and x != 0:
            why[0] = 1
            return k
        if k > 0 and x < offs[k - 1]:
            why[0] = 2
            return k
        if x > N:
            why[0] = 3
            return k
    return -1


cdef int _check_offsets(cnp.ndarray offs, Py_ssize_t N) except -1:
    cdef const int64_t* o = <const int64_t*>cnp.PyArray_DATA(offs)
    cdef Py_ssize_t L = cnp.PyArray_SIZE(offs)
    cdef int why = -1
    cdef Py_ssize_t k = _bad_offset(o, L, N, &why)
    if k < 0:
        return 0
    x = o[k]
    if why == 0:
        msg = f"offsets[{k}] = {x} is negative"
    elif why == 1:
        msg = f"offsets[0] = {x}, but the first bag must start at position 0 (offsets[0] == 0)"
    elif why == 2:
        msg = f"offsets[{k}] = {x} is smaller than offsets[{k - 1}] = {o[k - 1]}"
    else:
        msg = f"offsets[{k}] = {x} points past the ids (len(ids) = {N})"
    raise (BagOffsetError if why == 0 else BagArgumentError)(
        msg + f"; offsets must be non-decreasing, from 0 to at most len(ids) = {N}")


cdef cnp.ndarray _bag_ids(object ids):
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    if cnp.PyArray_NDIM(idx) != 1:
        raise ValueError(f"ids must be 1-D here (fastembed.ops flattens 2-D ids), got ids.shape={_shape(idx)}")
    return idx


cdef cnp.ndarray _bag_offsets(object offsets, Py_ssize_t N, bint include_last_offset):
    """offsets checked, as a private int64 copy: the loops trust a bag's bounds, so no other thread may
    change them between the check and the loop (ids are re-checked as they are read instead)."""
    cdef cnp.ndarray arr = _index_array(offsets, "offsets")
    if cnp.PyArray_NDIM(arr) != 1:
        raise ValueError(f"offsets has to be 1-D, got offsets.shape={_shape(arr)}")
    if include_last_offset and cnp.PyArray_SIZE(arr) == 0:
        raise BagArgumentError(
            "include_last_offset=True needs at least one offset (the end of the last bag), got none"
        )
    cdef cnp.ndarray offs = np.array(arr, dtype=np.int64, copy=True)
    _check_offsets(offs, N)
    return offs


cdef cnp.ndarray _bag_weights(object per_sample_weights, int mode, cnp.ndarray idx):
    """per_sample_weights: None, or float32 of ids' shape, with mode "sum" only (torch's rule)."""
    if per_sample_weights is None:
        return None
    if mode != BAG_SUM:
        name = ("sum", "mean", "max")[mode]
        raise BagModeError(
            f"per_sample_weights is only supported for mode='sum' (got mode='{name}'); "
            f"pass per_sample_weights=None, or use mode='sum'"
        )
    cdef cnp.ndarray pw = _float_input(per_sample_weights, "per_sample_weights")
    if _shape(pw) != _shape(idx):
        raise ValueError(
            f"per_sample_weights must have the same shape as ids, got per_sample_weights.shape={_shape(pw)} "
            f"and ids.shape={_shape(idx)}"
        )
    return pw


cdef int _check_bag_rows(cnp.ndarray arr, str name, Py_ssize_t B, Py_ssize_t D) except -1:
    if cnp.PyArray_NDIM(arr) != 2 or cnp.PyArray_DIM(arr, 0) != B or cnp.PyArray_DIM(arr, 1) != D:
        raise ValueError(f"{name} must have shape (bags, D) = {(B, D)}, got {name}.shape={_shape(arr)}")
    return 0


cdef inline Py_ssize_t _bag_count(Py_ssize_t L, bint include_last_offset):
    return L - 1 if include_last_offset else L


# ---------------------------------------------------------------- loops (no GIL, trusted bounds)

cdef inline Py_ssize_t _bag_end(const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t b) noexcept nogil:
    return offs[b + 1] if b + 1 < L else N


cdef Py_ssize_t _bag_split(const int64_t* offs, Py_ssize_t B, int64_t target) noexcept nogil:
    """The first bag whose start is >= target (B when none): threads split the bags by their ids."""
    cdef Py_ssize_t lo = 0, hi = B, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if offs[mid] < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline Py_ssize_t _bag_first(const int64_t* offs, Py_ssize_t B, Py_ssize_t M, int k,
                                  int parts) noexcept nogil:
    """Where thread k's bags begin: the bags split so that each thread gets about M / parts ids."""
    if k == 0:
        return 0
    if k == parts:
        return B
    return _bag_split(offs, B, _part(M, k, parts))


cdef inline Py_ssize_t _bag_ids_in_bags(const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B) noexcept nogil:
    return _bag_end(offs, L, N, B - 1) if B > 0 else 0


cdef Py_ssize_t _bag_forward_rows(const bag_t* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                                  const int64_t* offs, Py_ssize_t L, Py_ssize_t N, int mode, const bag_t* psw,
                                  int64_t pad, Py_ssize_t b0, Py_ssize_t b1, bag_t* out,
                                  int64_t* arg) noexcept nogil:
    """out[b] (and arg[b] in max mode) for the bags [b0, b1); returns the number of ids found out of range."""
    cdef Py_ssize_t b, i, d, lo, hi, count, skipped = 0
    cdef Py_ssize_t last = _bag_end(offs, L, N, b1 - 1) if b1 > b0 else 0
    cdef int64_t r
    cdef bag_t* o
    cdef int64_t* a
    for b in range(b0, b1):
        lo = offs[b]
        hi = _bag_end(offs, L, N, b)
        o = out + b * D
        memset(o, 0, D * sizeof(bag_t))  # a sum starts at +0.0, as torch's: a row of -0.0 sums to +0.0
        count = 0
        for i in range(lo, hi):
            if i + PREFETCH_ROWS < last:
                _prefetch_row(table + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, D)
            r = ids[i]
            if _outside(r, V):
                skipped += 1
                continue
            if r == pad:
                continue
            if mode == BAG_MAX:
                if count == 0:
                    memcpy(o, table + r * D, D * sizeof(bag_t))
                    a = arg + b * D
                    for d in range(D):
                        a[d] = r
                else:
                    fe_bag_max(o, arg + b * D, table + r * D, D, r)
            elif psw != NULL:
                fe_bag_axpy(o, table + r * D, D, psw[i])
            else:
                fe_add_into(o, table + r * D, D)
            count += 1
        if mode == BAG_MEAN and count > 0:
            fe_bag_div(o, D, <bag_t>count)
        elif mode == BAG_MAX and count == 0:
            memset(arg + b * D, 0, D * sizeof(int64_t))
    return skipped


cdef Py_ssize_t _bag_forward(const bag_t* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                             const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                             const bag_t* psw, int64_t pad, bag_t* out, int64_t* arg, int nthreads,
                             int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t skipped = 0, M = _bag_ids_in_bags(offs, L, N, B)
    team[0] = 1
    if nthreads <= 1:
        return _bag_forward_rows(table, V, D, ids, offs, L, N, mode, psw, pad, 0, B, out, arg)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        skipped += _bag_forward_rows(table, V, D, ids, offs, L, N, mode, psw, pad,
                                     _bag_first(offs, B, M, k, nthreads), _bag_first(offs, B, M, k + 1, nthreads),
                                     out, arg)
    return skipped


cdef inline Py_ssize_t _bag_kept(const index_t* ids, Py_ssize_t lo, Py_ssize_t hi, int64_t pad) noexcept nogil:
    """How many of ids[lo:hi] are not padding."""
    cdef Py_ssize_t i, n = 0
    if pad < 0:
        return hi - lo
    for i in range(lo, hi):
        if ids[i] != pad:
            n += 1
    return n


cdef inline void _bag_row_op(bag_t* dst, const bag_t* src, Py_ssize_t n, int mode, const bag_t* psw,
                             Py_ssize_t i, bag_t inv) noexcept nogil:
    """dst += src scaled as lookup i's gradient is: by 1 (sum), per_sample_weights[i], or 1 / count (mean)."""
    if mode == BAG_MEAN:
        fe_bag_axpy(dst, src, n, inv)
    elif psw != NULL:
        fe_bag_axpy(dst, src, n, psw[i])
    else:
        fe_add_into(dst, src, n)


cdef inline bag_t _bag_inv(Py_ssize_t count) noexcept nogil:
    return <bag_t>(1.0 / <double>count) if count > 0 else <bag_t>0


cdef Py_ssize_t _bag_backward_cols(bag_t* grad, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                                   const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                                   const bag_t* psw, int64_t pad, const bag_t* g, const int64_t* arg,
                                   Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t w0) noexcept nogil:
    """grad[., columns [c0, c1) and [w0, D)] += each lookup's gradient, bags and their ids in order."""
    cdef Py_ssize_t b, i, d, lo, hi, skipped = 0
    cdef int64_t r
    cdef bag_t inv = 1
    cdef const bag_t* gb
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
                grad[r * D + d] += gb[d]
            for d in range(w0, D):
                r = ab[d]
                if _outside(r, V):
                    skipped += 1
                    continue
                grad[r * D + d] += gb[d]
            continue
        if mode == BAG_MEAN:
            inv = _bag_inv(_bag_kept(ids, lo, hi, pad))
        for i in range(lo, hi):
            if i + PREFETCH_ROWS < hi:
                _prefetch_row_write(grad + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, c0, c1)
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


cdef Py_ssize_t _bag_backward(bag_t* grad, Py_ssize_t V, Py_ssize_t D, const index_t* ids, const int64_t* offs,
                              Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode, const bag_t* psw, int64_t pad,
                              const bag_t* g, const int64_t* arg, int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t c0, c1, w0, skipped = 0, phase = _phase(grad)
    team[0] = 1
    if nthreads <= 1:
        return _bag_backward_cols(grad, V, D, ids, offs, L, N, B, mode, psw, pad, g, arg, 0, D, D)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        c0 = _col_start(D, phase, k, nthreads)
        c1 = _col_end(D, phase, k, nthreads)
        w0 = _col_wrap(D, phase, k, nthreads)
        skipped += _bag_backward_cols(grad, V, D, ids, offs, L, N, B, mode, psw, pad, g, arg, c0, c1, w0)
    return skipped


cdef Py_ssize_t _bag_rows_out(Py_ssize_t V, Py_ssize_t D, const index_t* ids, const int64_t* offs, Py_ssize_t L,
                              Py_ssize_t N, int mode, const bag_t* psw, int64_t pad, const bag_t* g,
                              Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t j, Py_ssize_t j_hi, int64_t* rows,
                              bag_t* values) noexcept nogil:
    """The sparse gradient's entries [j, j_hi) from bags [b0, b1): one per lookup that is not padding."""
    cdef Py_ssize_t b, i, lo, hi, skipped = 0
    cdef int64_t r
    cdef bag_t inv = 1
    for b in range(b0, b1):
        lo = offs[b]
        hi = _bag_end(offs, L, N, b)
        if mode == BAG_MEAN:
            inv = _bag_inv(_bag_kept(ids, lo, hi, pad))
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
                fe_bag_scale(values + j * D, g + b * D, D, inv)
            elif psw != NULL:
                fe_bag_scale(values + j * D, g + b * D, D, psw[i])
            else:
                memcpy(values + j * D, g + b * D, D * sizeof(bag_t))
            j += 1
    while j < j_hi:
        rows[j] = 0
        memset(values + j * D, 0, D * sizeof(bag_t))
        skipped += 1
        j += 1
    return skipped


cdef Py_ssize_t _bag_weights_grad_rows(const bag_t* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                                       const int64_t* offs, Py_ssize_t L, Py_ssize_t N, int64_t pad,
                                       const bag_t* g, Py_ssize_t b0, Py_ssize_t b1, bag_t* out) noexcept nogil:
    """out[i] = table[ids[i]] . grad_out[bag of i] for the ids of bags [b0, b1); 0 for padding."""
    cdef Py_ssize_t b, i, lo, hi, skipped = 0
    cdef int64_t r
    for b in range(b0, b1):
        lo = offs[b]
        hi = _bag_end(offs, L, N, b)
        for i in range(lo, hi):
            if i + PREFETCH_ROWS < hi:
                _prefetch_row(table + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, D)
            r = ids[i]
            if _outside(r, V):
                skipped += 1
                continue
            out[i] = 0 if r == pad else fe_bag_dot(table + r * D, g + b * D, D)
    return skipped


# Dispatchers on the id width (one call each from the entry points, as in _kernels.pyx).

cdef Py_ssize_t _bag_forward_any(const bag_t* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                 const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                                 const bag_t* psw, int64_t pad, bag_t* out, int64_t* arg, int nthreads,
                                 int* team) noexcept nogil:
    if wide:
        return _bag_forward(table, V, D, <const int64_t*>ids, offs, L, N, B, mode, psw, pad, out, arg,
                            nthreads, team)
    return _bag_forward(table, V, D, <const int32_t*>ids, offs, L, N, B, mode, psw, pad, out, arg, nthreads, team)


cdef Py_ssize_t _bag_backward_any(bag_t* grad, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                  const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                                  const bag_t* psw, int64_t pad, const bag_t* g, const int64_t* arg,
                                  int nthreads, int* team) noexcept nogil:
    if wide:
        return _bag_backward(grad, V, D, <const int64_t*>ids, offs, L, N, B, mode, psw, pad, g, arg,
                             nthreads, team)
    return _bag_backward(grad, V, D, <const int32_t*>ids, offs, L, N, B, mode, psw, pad, g, arg, nthreads, team)


cdef Py_ssize_t _bag_kept_any(const void* ids, bint wide, Py_ssize_t lo, Py_ssize_t hi, int64_t pad) noexcept nogil:
    if wide:
        return _bag_kept(<const int64_t*>ids, lo, hi, pad)
    return _bag_kept(<const int32_t*>ids, lo, hi, pad)


cdef Py_ssize_t _bag_rows_out_any(Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide, const int64_t* offs,
                                  Py_ssize_t L, Py_ssize_t N, int mode, const bag_t* psw, int64_t pad,
                                  const bag_t* g, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t j, Py_ssize_t j_hi,
                                  int64_t* rows, bag_t* values) noexcept nogil:
    if wide:
        return _bag_rows_out(V, D, <const int64_t*>ids, offs, L, N, mode, psw, pad, g, b0, b1, j, j_hi, rows, values)
    return _bag_rows_out(V, D, <const int32_t*>ids, offs, L, N, mode, psw, pad, g, b0, b1, j, j_hi, rows, values)


cdef Py_ssize_t _bag_weights_grad_any(const bag_t* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                      const int64_t* offs, Py_ssize_t L, Py_ssize_t N, int64_t pad, const bag_t* g,
                                      Py_ssize_t b0, Py_ssize_t b1, bag_t* out) noexcept nogil:
    if wide:
        return _bag_weights_grad_rows(table, V, D, <const int64_t*>ids, offs, L, N, pad, g, b0, b1, out)
    return _bag_weights_grad_rows(table, V, D, <const int32_t*>ids, offs, L, N, pad, g, b0, b1, out)


cdef Py_ssize_t _bag_rows_all(Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide, const int64_t* offs,
                              Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode, const bag_t* psw, int64_t pad,
                              const bag_t* g, const int64_t* starts, int64_t* rows, bag_t* values, int nthreads,
                              int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t skipped = 0, M = _bag_ids_in_bags(offs, L, N, B)
    team[0] = 1
    if nthreads <= 1:
        return _bag_rows_out_any(V, D, ids, wide, offs, L, N, mode, psw, pad, g, 0, B, 0, starts[1], rows, values)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        skipped += _bag_rows_out_any(V, D, ids, wide, offs, L, N, mode, psw, pad, g,
                                     _bag_first(offs, B, M, k, nthreads), _bag_first(offs, B, M, k + 1, nthreads),
                                     starts[k], starts[k + 1], rows, values)
    return skipped


cdef Py_ssize_t _bag_weights_grad_all(const bag_t* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                      const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int64_t pad,
                                      const bag_t* g, bag_t* out, int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t skipped = 0, M = _bag_ids_in_bags(offs, L, N, B)
    team[0] = 1
    if nthreads <= 1:
        return _bag_weights_grad_any(table, V, D, ids, wide, offs, L, N, pad, g, 0, B, out)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        skipped += _bag_weights_grad_any(table, V, D, ids, wide, offs, L, N, pad, g,
                                         _bag_first(offs, B, M, k, nthreads),
                                         _bag_first(offs, B, M, k + 1, nthreads), out)
    return skipped


cdef inline int _bag_threads(Py_ssize_t work, Py_ssize_t B) noexcept nogil:
    """Threads for a loop split by bags: never more than there are bags."""
    cdef int n = _threads_for(work)
    return <int>min(<Py_ssize_t>n, max(B, <Py_ssize_t>1))


# ---------------------------------------------------------------- entry points

def embedding_bag(table, ids, offsets, mode, per_sample_weights=None, padding_idx=None,
                  include_last_offset=False, out=None):
    """out[b] = the sum, mean or max of table[ids] over bag b; in max mode returns (out, argmax)."""
    cdef cnp.ndarray tab = _table(table, "table")
    cdef int m = _bag_mode(mode)
    cdef cnp.ndarray idx = _bag_ids(ids)
    cdef Py_ssize_t V = _rows(tab), D = _dim(tab), N = cnp.PyArray_SIZE(idx)
    cdef bint ilo = bool(include_last_offset)
    cdef cnp.ndarray offs = _bag_offsets(offsets, N, ilo)
    cdef Py_ssize_t L = cnp.PyArray_SIZE(offs), B = _bag_count(L, ilo)
    cdef int64_t pad = _bag_padding(padding_idx, V)
    cdef cnp.ndarray pw = _bag_weights(per_sample_weights, m, idx)
    cdef cnp.ndarray res
    if out is None:
        res = np.empty((B, D), dtype=np.float32)
    else:
        res = _target(out, "out")
        _check_bag_rows(res, "out", B, D)
        _no_overlap(res, "out", (tab, ids, offsets, per_sample_weights),
                    ("table", "ids", "offsets", "per_sample_weights"))
    _check_bag_range(idx, "ids", V, "table")
    cdef cnp.ndarray arg = np.empty((B, D), dtype=np.int64) if m == BAG_MAX else None
    cdef const bag_t* t = <const bag_t*>cnp.PyArray_DATA(tab)
    cdef bag_t* o = <bag_t*>cnp.PyArray_DATA(res)
    cdef int64_t* a = NULL if arg is None else <int64_t*>cnp.PyArray_DATA(arg)
    cdef const bag_t* p = NULL if pw is None else <const bag_t*>cnp.PyArray_DATA(pw)
    cdef const int64_t* op = <const int64_t*>cnp.PyArray_DATA(offs)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _bag_threads((N + B) * D, B), team
    cdef bint release = _releases((N + B) * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _bag_forward_any(t, V, D, ip, wide, op, L, N, B, m, p, pad, o, a, nthreads, &team)
    else:
        skipped = _bag_forward_any(t, V, D, ip, wide, op, L, N, B, m, p, pad, o, a, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    return (res, arg) if m == BAG_MAX else res


def embedding_bag_backward(grad_table, ids, offsets, grad_out, mode, per_sample_weights=None, padding_idx=None,
                           include_last_offset=False, argmax=None):
    """grad_table[ids[i]] += grad_out[bag of i] scaled per mode (max: into the argmax row of each column)."""
    cdef cnp.ndarray grad = _target(grad_table, "grad_table")
    _check_2d(grad, "grad_table")
    cdef int m = _bag_mode(mode)
    cdef cnp.ndarray idx = _bag_ids(ids)
    cdef Py_ssize_t V = _rows(grad), D = _dim(grad), N = cnp.PyArray_SIZE(idx)
    cdef bint ilo = bool(include_last_offset)
    cdef cnp.ndarray offs = _bag_offsets(offsets, N, ilo)
    cdef Py_ssize_t L = cnp.PyArray_SIZE(offs), B = _bag_count(L, ilo)
    cdef int64_t pad = _bag_padding(padding_idx, V)
    cdef cnp.ndarray pw = _bag_weights(per_sample_weights, m, idx)
    cdef cnp.ndarray src = _float_input(grad_out, "grad_out")
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
    cdef bag_t* g = <bag_t*>cnp.PyArray_DATA(grad)
    cdef const bag_t* s = <const bag_t*>cnp.PyArray_DATA(src)
    cdef const int64_t* a = NULL if am is None else <const int64_t*>cnp.PyArray_DATA(am)
    cdef const bag_t* p = NULL if pw is None else <const bag_t*>cnp.PyArray_DATA(pw)
    cdef const int64_t* op = <const int64_t*>cnp.PyArray_DATA(offs)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _column_threads(N + B, D, g), team
    cdef bint release = _releases((N + B) * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _bag_backward_any(g, V, D, ip, wide, op, L, N, B, m, p, pad, s, a, nthreads, &team)
    else:
        skipped = _bag_backward_any(g, V, D, ip, wide, op, L, N, B, m, p, pad, s, a, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids or argmax")


def embedding_bag_grad_rows(num_embeddings, ids, offsets, grad_out, mode, per_sample_weights=None,
                            padding_idx=None, include_last_offset=False):
    """(rows, values): torch's sparse gradient of the table, one entry per lookup that is not padding."""
    if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, (int, np.integer)):
        raise TypeError(f"num_embeddings must be an int, got {type(num_embeddings).__name__}")
    if not 0 <= num_embeddings <= PY_SSIZE_T_MAX:
        raise ValueError(f"num_embeddings must be >= 0, got {num_embeddings}")
    cdef Py_ssize_t V = num_embeddings
    cdef int m = _bag_mode(mode)
    if m == BAG_MAX:
        raise ValueError("max mode does not support sparse weights (as in torch): use embedding_bag_backward")
    cdef cnp.ndarray idx = _bag_ids(ids)
    cdef Py_ssize_t N = cnp.PyArray_SIZE(idx)
    cdef bint ilo = bool(include_last_offset)
    cdef cnp.ndarray offs = _bag_offsets(offsets, N, ilo)
    cdef Py_ssize_t L = cnp.PyArray_SIZE(offs), B = _bag_count(L, ilo)
    cdef int64_t pad = _bag_padding(padding_idx, V)
    cdef cnp.ndarray pw = _bag_weights(per_sample_weights, m, idx)
    cdef cnp.ndarray src = _float_input(grad_out, "grad_out")
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
    cdef cnp.ndarray rows = np.empty(K, dtype=np.int64)
    cdef cnp.ndarray values = np.empty((K, D), dtype=np.float32)
    cdef const bag_t* s = <const bag_t*>cnp.PyArray_DATA(src)
    cdef const bag_t* p = NULL if pw is None else <const bag_t*>cnp.PyArray_DATA(pw)
    cdef int64_t* rp = <int64_t*>cnp.PyArray_DATA(rows)
    cdef bag_t* vp = <bag_t*>cnp.PyArray_DATA(values)
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _bag_rows_all(V, D, ip, wide, op, L, N, B, m, p, pad, s, sp, rp, vp, nthreads, &team)
    else:
        skipped = _bag_rows_all(V, D, ip, wide, op, L, N, B, m, p, pad, s, sp, rp, vp, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    return rows, values


def embedding_bag_weights_grad(table, ids, offsets, grad_out, padding_idx=None, include_last_offset=False):
    """d loss / d per_sample_weights[i] = table[ids[i]] . grad_out[bag of i] (0 for padding and for ids in no bag)."""
    cdef cnp.ndarray tab = _table(table, "table")
    cdef cnp.ndarray idx = _bag_ids(ids)
    cdef Py_ssize_t V = _rows(tab), D = _dim(tab), N = cnp.PyArray_SIZE(idx)
    cdef bint ilo = bool(include_last_offset)
    cdef cnp.ndarray offs = _bag_offsets(offsets, N, ilo)
    cdef Py_ssize_t L = cnp.PyArray_SIZE(offs), B = _bag_count(L, ilo)
    cdef int64_t pad = _bag_padding(padding_idx, V)
    cdef cnp.ndarray src = _float_input(grad_out, "grad_out")
    _check_bag_rows(src, "grad_out", B, D)
    _check_bag_range(idx, "ids", V, "table")
    cdef cnp.ndarray res = np.zeros(N, dtype=np.float32)
    cdef const bag_t* t = <const bag_t*>cnp.PyArray_DATA(tab)
    cdef const bag_t* s = <const bag_t*>cnp.PyArray_DATA(src)
    cdef bag_t* o = <bag_t*>cnp.PyArray_DATA(res)
    cdef const int64_t* op = <const int64_t*>cnp.PyArray_DATA(offs)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _bag_threads(N * D, B), team
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _bag_weights_grad_all(t, V, D, ip, wide, op, L, N, B, pad, s, o, nthreads, &team)
    else:
        skipped = _bag_weights_grad_all(t, V, D, ip, wide, op, L, N, B, pad, s, o, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    return res
