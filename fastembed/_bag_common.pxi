# Included at the end of _kernels.pyx (one extension module; Cython `include`): embedding bags, the
# kernels of torch's nn.EmbeddingBag / F.embedding_bag (CPU), forward and backward, in four files:
#   _bag_common.pxi        this one: what every bag kernel shares (the conventions below, the C declarations,
#                          the errors, the input checks, the bag bounds, the per-dtype element helpers)
#   _bag_forward.pxi       the forward (embedding_bag: sum, mean, max)
#   _bag_backward.pxi      the table's gradient, dense (embedding_bag_backward) and sparse
#                          (embedding_bag_grad_rows)
#   _bag_weights_grad.pxi  the per_sample_weights gradient (embedding_bag_weights_grad)
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

cdef extern from "_fastembed.h" nogil:
    void fe_bag_axpy(float* out, const float* a, Py_ssize_t n, float s)
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
    # (One element of the 16-bit formats: fe_f16_to_float_sw and the others are declared in _norm.pxi, included
    # before this file, with _acc_value, one element as float32, which the bags use too.)

# The table's element type, elem_t (_kernels.pyx): every array of a call that holds table elements (out,
# grad_out, grad_table, per_sample_weights, the sparse values) has it. float32's specialisation is the code the
# bags had before the other dtypes came. What each computes in, after torch's CPU kernels
# (aten/src/ATen/native/EmbeddingBag.cpp):
#   float64: everything in float64, in the same order as float32 (sums in ids order; mean divides by count;
#     the backward adds (1/count) * grad or weight * grad).
#   float16, bfloat16: the forward sums in float32 (per_sample_weights: float32 products) and rounds once per
#     bag, as torch's index_select_add does; mean then divides the rounded sum by the count rounded to the
#     dtype, in float32, rounded once (torch's `output /= bag_size.to(output)` on the 16-bit output); max
#     compares the stored values and copies their bits. The dense backward rounds after every add into the
#     gradient (torch's cpublas axpy on 16-bit data: y = round(y + a * x), a = round(1/count) for a mean);
#     the sparse values are round(grad_out * s) with s = round(1 / round(count)) for a mean (torch's
#     apply_bag_size_backward in the dtype); the per_sample_weights gradient is a float32 dot, rounded once.

cdef enum:
    BAG_SUM = 0
    BAG_MEAN = 1
    BAG_MAX = 2
    BAG_CHUNK = 16  # rows a float32 sum takes per pass over its output row (fe_bag_sum_ptrs): out is
                    # reloaded once per 16 rows, for 16 pointers on the stack
    BAG_MAX_CHUNK = 64  # the same for a float32 max (fe_bag_max_ptrs), whose out and argmax are read and
                        # written once per call: a bag of up to 64 rows in one call


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


# Element helpers per dtype (each a compile-time branch on elem_t).

cdef inline void _bag_set(elem_t* dst, float v) noexcept nogil:
    """dst[0] = v rounded to nearest even in the 16-bit formats."""
    if elem_t is fe_f16:
        dst[0].bits = fe_float_to_f16_sw(v)
    elif elem_t is fe_bf16:
        dst[0].bits = fe_float_to_bf16(v)


cdef inline float _bag_round(elem_t* like, float v) noexcept nogil:
    """v rounded to elem_t and back (a 16-bit format; `like` only picks the type)."""
    cdef elem_t tmp
    _bag_set(&tmp, v)
    return _acc_value(tmp)


cdef inline int _bag_threads(Py_ssize_t work, Py_ssize_t B) noexcept nogil:
    """Threads for a loop split by bags: never more than there are bags."""
    cdef int n = _threads_for(work)
    return <int>min(<Py_ssize_t>n, max(B, <Py_ssize_t>1))


# ---------------------------------------------------------------- entry points (in _bag_forward.pxi,
# _bag_backward.pxi and _bag_weights_grad.pxi)

# Tables of float32, float64, float16 or bfloat16 (ml_dtypes.bfloat16, or uint16 bits under the private
# keyword `_format="bfloat16"`; see _common.pxi). Every other array of a call that holds table elements has
# the table's dtype (grad_out: grad_table's; in embedding_bag_grad_rows, which has no table, grad_out sets it),
# never cast; results have it too.
