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
    void fe_first_into(float* g, const float* s, Py_ssize_t n)
    void fe_bag_sum_ptrs(float* out, const float* const* rows, Py_ssize_t k, Py_ssize_t n)
    Py_ssize_t fe_bag_sum32_i32(float* out, const float* table, int64_t V, const int32_t* ids, const int64_t* offs,
                                Py_ssize_t L, Py_ssize_t N, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t last,
                                int64_t pad, int mean)
    Py_ssize_t fe_bag_sum32_i64(float* out, const float* table, int64_t V, const int64_t* ids, const int64_t* offs,
                                Py_ssize_t L, Py_ssize_t N, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t last,
                                int64_t pad, int mean)
    Py_ssize_t fe_bag_sum64_i32(float* out, const float* table, int64_t V, const int32_t* ids, const int64_t* offs,
                                Py_ssize_t L, Py_ssize_t N, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t last,
                                int64_t pad, int mean)
    Py_ssize_t fe_bag_sum64_i64(float* out, const float* table, int64_t V, const int64_t* ids, const int64_t* offs,
                                Py_ssize_t L, Py_ssize_t N, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t last,
                                int64_t pad, int mean)
    void fe_bag_max(float* out, int64_t* arg, const float* a, Py_ssize_t n, int64_t r)
    void fe_bag_max_ptrs(float* out, int64_t* arg, const float* const* rows, const int64_t* ids, Py_ssize_t k,
                         Py_ssize_t n, int first)
    void fe_bag_div(float* out, Py_ssize_t n, float c)
    void fe_bag_scale(float* out, const float* a, Py_ssize_t n, float s)
    float fe_bag_dot(const float* a, const float* b, Py_ssize_t n)
    # One element of the 16-bit formats (the row forms are declared in _kernels.pyx); the portable float16
    # conversions give the F16C instructions' bits (the dtype tests hold them to that).
    float fe_f16_to_float_sw(uint16_t h)
    uint16_t fe_float_to_f16_sw(float f)
    float fe_bf16_to_float(uint16_t h)
    uint16_t fe_float_to_bf16(float f)

# The table's element type: every array of a call that holds table elements (out, grad_out, grad_table,
# per_sample_weights, the sparse values) has it. float32's specialisation is the code the bags had before the
# other dtypes came. What each computes in, after torch's CPU kernels (aten/src/ATen/native/EmbeddingBag.cpp):
#   float64: everything in float64, in the same order as float32 (sums in ids order; mean divides by count;
#     the backward adds (1/count) * grad or weight * grad).
#   float16, bfloat16: the forward sums in float32 (per_sample_weights: float32 products) and rounds once per
#     bag, as torch's index_select_add does; mean then divides the rounded sum by the count rounded to the
#     dtype, in float32, rounded once (torch's `output /= bag_size.to(output)` on the 16-bit output); max
#     compares the stored values and copies their bits. The dense backward rounds after every add into the
#     gradient (torch's cpublas axpy on 16-bit data: y = round(y + a * x), a = round(1/count) for a mean);
#     the sparse values are round(grad_out * s) with s = round(1 / round(count)) for a mean (torch's
#     apply_bag_size_backward in the dtype); the per_sample_weights gradient is a float32 dot, rounded once.
ctypedef fused bag_t:
    float
    double
    fe_f16
    fe_bf16

cdef enum:
    BAG_SUM = 0
    BAG_MEAN = 1
    BAG_MAX = 2
    BAG_CHUNK = 16  # rows a float32 sum or max takes per pass over its output row (fe_bag_*_ptrs): out is
                    # reloaded once per 16 rows, for 16 pointers on the stack


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


cdef cnp.ndarray _bag_weights(object per_sample_weights, int mode, cnp.ndarray idx, cnp.ndarray ref, str ref_name):
    """per_sample_weights: None, or of ref's dtype (the table's, as torch requires) and ids' shape, with mode
    "sum" only (torch's rule)."""
    if per_sample_weights is None:
        return None
    if mode != BAG_SUM:
        name = ("sum", "mean", "max")[mode]
        raise BagModeError(
            f"per_sample_weights is only supported for mode='sum' (got mode='{name}'); "
            f"pass per_sample_weights=None, or use mode='sum'"
        )
    cdef cnp.ndarray pw = _input_like(per_sample_weights, "per_sample_weights", ref, ref_name)
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


# Element helpers per dtype (each a compile-time branch on bag_t).

cdef inline float _bag_f(bag_t x) noexcept nogil:
    """One element as float32 (exact for the 16-bit formats; float32 and float64 callers use their own)."""
    if bag_t is fe_f16:
        return fe_f16_to_float_sw(x.bits)
    elif bag_t is fe_bf16:
        return fe_bf16_to_float(x.bits)
    else:
        return <float>x


cdef inline void _bag_set(bag_t* dst, float v) noexcept nogil:
    """dst[0] = v rounded to nearest even in the 16-bit formats."""
    if bag_t is fe_f16:
        dst[0].bits = fe_float_to_f16_sw(v)
    elif bag_t is fe_bf16:
        dst[0].bits = fe_float_to_bf16(v)


cdef inline float _bag_round(bag_t* like, float v) noexcept nogil:
    """v rounded to bag_t and back (a 16-bit format; `like` only picks the type)."""
    cdef bag_t tmp
    _bag_set(&tmp, v)
    return _bag_f(tmp)


cdef inline void _bag_prefetch(const bag_t* row, Py_ssize_t D) noexcept nogil:
    if bag_t is float:
        _prefetch_row(row, D)
    else:
        _prefetch_bytes(<const char*>row, D * <Py_ssize_t>sizeof(bag_t), False)


cdef inline void _bag_prefetch_write(bag_t* row, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    if bag_t is float:
        _prefetch_row_write(row, c0, c1)
    else:
        _prefetch_bytes(<const char*>(row + c0), (c1 - c0) * <Py_ssize_t>sizeof(bag_t), True)


cdef inline void _bag_max_row(bag_t* out, int64_t* arg, const bag_t* a, Py_ssize_t n, int64_t r) noexcept nogil:
    """A bag's running max (strictly greater, as torch: the earlier row stays on a tie and a NaN in out stays);
    the 16-bit formats compare their values and copy the winner's bits."""
    cdef Py_ssize_t d
    if bag_t is float:
        fe_bag_max(out, arg, a, n, r)
    elif bag_t is double:
        for d in range(n):
            if a[d] > out[d]:
                out[d] = a[d]
                arg[d] = r
    else:
        for d in range(n):
            if _bag_f(a[d]) > _bag_f(out[d]):
                out[d] = a[d]
                arg[d] = r


cdef inline void _bag_sum_row(bag_t* o, float* acc, float* w, const bag_t* row, Py_ssize_t n, const bag_t* psw,
                              Py_ssize_t i) noexcept nogil:
    """Adds lookup i (times per_sample_weights[i] when given) to its bag: into o for float32 and float64, into
    the float32 accumulator acc (row widened into w) for the 16-bit formats."""
    cdef Py_ssize_t d
    cdef double s
    if bag_t is float:
        if psw != NULL:
            fe_bag_axpy(o, row, n, psw[i])
        else:
            fe_add_into(o, row, n)
    elif bag_t is double:
        if psw != NULL:
            s = psw[i]
            for d in range(n):
                o[d] += s * row[d]
        else:
            fe_add_into_f64(o, row, n)
    else:
        _widen_row(w, row, n)
        if psw != NULL:
            fe_bag_axpy(acc, w, n, _bag_f(psw[i]))
        else:
            fe_add_into(acc, w, n)


cdef inline void _bag_finish(bag_t* o, float* acc, float* w, Py_ssize_t n, int mode, Py_ssize_t count) noexcept nogil:
    """A sum or mean bag's result in o: the 16-bit sum rounded once, then a mean divided by its count."""
    cdef Py_ssize_t d
    cdef double c
    if bag_t is float:
        if mode == BAG_MEAN and count > 0:
            fe_bag_div(o, n, <float>count)
    elif bag_t is double:
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


cdef Py_ssize_t _bag_forward_rows(const bag_t* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                                  const int64_t* offs, Py_ssize_t L, Py_ssize_t N, int mode, const bag_t* psw,
                                  int64_t pad, Py_ssize_t b0, Py_ssize_t b1, bag_t* out,
                                  int64_t* arg, float* acc) noexcept nogil:
    """out[b] (and arg[b] in max mode) for the bags [b0, b1); returns the number of ids found out of range.
    acc: 2 * D floats of this thread's (the 16-bit formats' accumulator and widened row; NULL otherwise).
    A float32 max with arg NULL computes the max only (the caller asked for no argmax)."""
    cdef Py_ssize_t b, i, d, lo, hi, count, skipped = 0
    cdef Py_ssize_t last = _bag_end(offs, L, N, b1 - 1) if b1 > b0 else 0
    cdef int64_t r
    cdef bag_t* o
    cdef int64_t* a
    cdef float* w = NULL if acc == NULL else acc + D
    cdef bint copy_first = False  # a float32 sum: its first row written as 0 + row, the next added BAG_CHUNK at a time
    cdef const float* chunk[BAG_CHUNK]
    cdef int64_t chunk_ids[BAG_CHUNK]
    cdef Py_ssize_t pending
    cdef bint max_chunks = False  # a float32 max: its rows taken BAG_CHUNK at a time, the first as is
    if bag_t is float:
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
            memset(o, 0, D * sizeof(bag_t))  # a sum starts at +0.0, as torch's: a row of -0.0 sums to +0.0
        if acc != NULL:
            memset(acc, 0, D * sizeof(float))
        count = 0
        pending = 0
        for i in range(lo, hi):
            if i + PREFETCH_ROWS < last:
                _bag_prefetch(table + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, D)
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
                    if pending == BAG_CHUNK:
                        # the bag's first chunk holds its first kept row: count (this row included) == pending
                        fe_bag_max_ptrs(<float*>o, NULL if arg == NULL else arg + b * D, chunk, chunk_ids, pending,
                                        D, count + 1 == pending)
                        pending = 0
                elif count == 0:
                    memcpy(o, table + r * D, D * sizeof(bag_t))
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
            memset(o, 0, D * sizeof(bag_t))  # an empty bag (or one of padding only) is zeros
        if max_chunks and count == 0:
            memset(o, 0, D * sizeof(bag_t))
        if mode != BAG_MAX:
            _bag_finish(o, acc, w, D, mode, count)
        elif count == 0 and arg != NULL:
            memset(arg + b * D, 0, D * sizeof(int64_t))
    return skipped


cdef Py_ssize_t _bag_forward(const bag_t* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                             const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                             const bag_t* psw, int64_t pad, bag_t* out, int64_t* arg, float* scratch, int nthreads,
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
                             Py_ssize_t i, double inv) noexcept nogil:
    """dst += src scaled as lookup i's gradient is: by 1 (sum), per_sample_weights[i], or inv = 1 / count
    (mean; _bag_inv). The 16-bit formats round after each add: dst = round(dst + s * src) in float32."""
    cdef Py_ssize_t d
    cdef double s
    cdef float f
    if bag_t is float:
        if mode == BAG_MEAN:
            fe_bag_axpy(dst, src, n, <float>inv)
        elif psw != NULL:
            fe_bag_axpy(dst, src, n, psw[i])
        else:
            fe_add_into(dst, src, n)
    elif bag_t is double:
        if mode == BAG_MEAN or psw != NULL:
            s = inv if mode == BAG_MEAN else psw[i]
            for d in range(n):
                dst[d] += s * src[d]
        else:
            fe_add_into_f64(dst, src, n)
    else:
        if mode == BAG_MEAN or psw != NULL:
            f = <float>inv if mode == BAG_MEAN else _bag_f(psw[i])
            for d in range(n):
                _bag_set(dst + d, _bag_f(dst[d]) + f * _bag_f(src[d]))
        elif bag_t is fe_f16:
            fe_add_into_f16(dst, src, n)
        else:
            fe_add_into_bf16(dst, src, n)


cdef inline double _bag_inv(bag_t* like, Py_ssize_t count) noexcept nogil:
    """A mean's backward scale 1 / count as torch's dense backward has it: formed in float64, then made the
    dtype's (`(scalar_t)scale`: through float32 for the 16-bit formats); 0 for an empty bag."""
    if count <= 0:
        return 0
    cdef double x = 1.0 / <double>count
    if bag_t is float:
        return <float>x
    elif bag_t is double:
        return x
    else:
        return _bag_round(like, <float>x)


cdef Py_ssize_t _bag_backward_cols(bag_t* grad, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                                   const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                                   const bag_t* psw, int64_t pad, const bag_t* g, const int64_t* arg,
                                   Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t w0) noexcept nogil:
    """grad[., columns [c0, c1) and [w0, D)] += each lookup's gradient, bags and their ids in order."""
    cdef Py_ssize_t b, i, d, lo, hi, skipped = 0
    cdef int64_t r
    cdef double inv = 1
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
                _bag_prefetch_write(grad + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, c0, c1)
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


cdef inline void _bag_add_one(bag_t* dst, bag_t x) noexcept nogil:
    """dst += x (a max bag's gradient: torch's index_add_, rounded after each add in the 16-bit formats)."""
    if bag_t is float or bag_t is double:
        dst[0] += x
    else:
        _bag_set(dst, _bag_f(dst[0]) + _bag_f(x))


cdef Py_ssize_t _bag_backward(bag_t* grad, Py_ssize_t V, Py_ssize_t D, const index_t* ids, const int64_t* offs,
                              Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode, const bag_t* psw, int64_t pad,
                              const bag_t* g, const int64_t* arg, int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t block = COLUMN_BLOCK * sizeof(float) // sizeof(bag_t)
    cdef Py_ssize_t c0, c1, w0, skipped = 0, phase = _phase_of(grad, sizeof(bag_t))
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


cdef inline void _bag_scale_row(bag_t* out, const bag_t* a, Py_ssize_t n, double s) noexcept nogil:
    """out = s * a, written (not added to +0.0, which would turn -0.0 into +0.0); rounded once per element in
    the 16-bit formats."""
    cdef Py_ssize_t d
    cdef float f
    if bag_t is float:
        fe_bag_scale(out, a, n, <float>s)
    elif bag_t is double:
        for d in range(n):
            out[d] = s * a[d]
    else:
        f = <float>s
        for d in range(n):
            _bag_set(out + d, f * _bag_f(a[d]))


cdef inline double _bag_sparse_inv(bag_t* like, Py_ssize_t count) noexcept nogil:
    """A mean's scale in the sparse gradient, as torch's apply_bag_size_backward forms it: 1 / count in the
    dtype (the 16-bit formats: the count rounded to the dtype, divided in float32, rounded)."""
    if count <= 0:
        return 0
    if bag_t is float:
        return <float>(1.0 / <double>count)
    elif bag_t is double:
        return 1.0 / <double>count
    else:
        return _bag_round(like, 1.0 / _bag_round(like, <float>count))


cdef Py_ssize_t _bag_rows_out(Py_ssize_t V, Py_ssize_t D, const index_t* ids, const int64_t* offs, Py_ssize_t L,
                              Py_ssize_t N, int mode, const bag_t* psw, int64_t pad, const bag_t* g,
                              Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t j, Py_ssize_t j_hi, int64_t* rows,
                              bag_t* values) noexcept nogil:
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
                memcpy(values + j * D, g + b * D, D * sizeof(bag_t))
            j += 1
    while j < j_hi:
        rows[j] = 0
        memset(values + j * D, 0, D * sizeof(bag_t))
        skipped += 1
        j += 1
    return skipped


cdef inline double _bag_psw(const bag_t* psw, Py_ssize_t i) noexcept nogil:
    if bag_t is float or bag_t is double:
        return psw[i]
    else:
        return _bag_f(psw[i])


cdef inline void _bag_dot_into(bag_t* out, const bag_t* a, const bag_t* b, Py_ssize_t n) noexcept nogil:
    """out[0] = a . b in column order: float32 in float32, float64 in float64, the 16-bit formats in float32
    rounded once (torch's dot_with_fp32_arith; its order is its vector lanes', so the tests allow a tolerance)."""
    cdef Py_ssize_t d
    cdef double dacc = 0
    cdef float facc = 0
    if bag_t is float:
        out[0] = fe_bag_dot(a, b, n)
    elif bag_t is double:
        for d in range(n):
            dacc += a[d] * b[d]
        out[0] = dacc
    else:
        for d in range(n):
            facc += _bag_f(a[d]) * _bag_f(b[d])
        _bag_set(out, facc)


cdef Py_ssize_t _bag_weights_grad_rows(const bag_t* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                                       const int64_t* offs, Py_ssize_t L, Py_ssize_t N, int64_t pad,
                                       const bag_t* g, Py_ssize_t b0, Py_ssize_t b1, bag_t* out) noexcept nogil:
    """out[i] = table[ids[i]] . grad_out[bag of i] for the ids of bags [b0, b1); 0 (out is zeroed) for padding."""
    cdef Py_ssize_t b, i, lo, hi, skipped = 0
    cdef int64_t r
    for b in range(b0, b1):
        lo = offs[b]
        hi = _bag_end(offs, L, N, b)
        for i in range(lo, hi):
            if i + PREFETCH_ROWS < hi:
                _bag_prefetch(table + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, D)
            r = ids[i]
            if _outside(r, V):
                skipped += 1
                continue
            if r != pad:
                _bag_dot_into(out + i, table + r * D, g + b * D, D)
    return skipped


# Dispatchers on the id width, then on the element format (one call each from the entry points, as in
# _kernels.pyx): fmt is FMT_F32, FMT_F64, FMT_F16 or FMT_BF16 (_common.pxi), checked by the entry point.

cdef Py_ssize_t _bag_forward_ids(const bag_t* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                 const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                                 const bag_t* psw, int64_t pad, bag_t* out, int64_t* arg, float* scratch,
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


cdef Py_ssize_t _bag_backward_ids(bag_t* grad, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                  const int64_t* offs, Py_ssize_t L, Py_ssize_t N, Py_ssize_t B, int mode,
                                  const bag_t* psw, int64_t pad, const bag_t* g, const int64_t* arg,
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
                              Py_ssize_t L, Py_ssize_t N, int mode, const bag_t* psw, int64_t pad,
                              const bag_t* g, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t j, Py_ssize_t j_hi,
                              int64_t* rows, bag_t* values) noexcept nogil:
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


cdef Py_ssize_t _bag_weights_grad_ids(const bag_t* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                      const int64_t* offs, Py_ssize_t L, Py_ssize_t N, int64_t pad, const bag_t* g,
                                      Py_ssize_t b0, Py_ssize_t b1, bag_t* out) noexcept nogil:
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


cdef inline int _bag_threads(Py_ssize_t work, Py_ssize_t B) noexcept nogil:
    """Threads for a loop split by bags: never more than there are bags."""
    cdef int n = _threads_for(work)
    return <int>min(<Py_ssize_t>n, max(B, <Py_ssize_t>1))


# ---------------------------------------------------------------- entry points

# Tables of float32, float64, float16 or bfloat16 (ml_dtypes.bfloat16, or uint16 bits under the private
# keyword `_format="bfloat16"`; see _common.pxi). Every other array of a call that holds table elements has
# the table's dtype (grad_out: grad_table's; in embedding_bag_grad_rows, which has no table, grad_out sets it),
# never cast; results have it too.

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
