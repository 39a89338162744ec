# Included by _kernels.pyx (one extension module; Cython `include`): torch's max_norm for embedding
# lookups (torch.embedding_renorm_), a row-wise in-place rescale of the rows a lookup reads.
#
# What torch computes, per distinct id r (duplicates once), in any order: the p-norm of row r as a
# value of the table's dtype, and when that value, widened to double, exceeds max_norm,
# row r *= max_norm / (norm + 1e-7), the factor formed in double. Per dtype (torch 2.13 on CPU, read
# from ATen and checked against it bit for bit on millions of rows; tests/test_renorm_dtypes.py):
#   float32   the factor applied as float32 (x * (float)scale). The norm here is summed in double, in
#             column order, and rounded once to float32, so it is within an ulp or two of torch's
#             float32-accumulated one (kept: reference.renorm is its bitwise model).
#   float64   norm and product in double, in torch's order: p = 2 in four lanes (lane l sums the
#             squares of columns l, l + 4, ...; the lanes added in order, then the tail columns by
#             fused multiply-adds, as torch's vectorised kernel is compiled), every other p in column
#             order. Bitwise equal to torch except for p outside {0, 1, 2, inf, -inf}, whose pow is
#             libm's here and torch's own vectorised one there (results within a few ulps).
#   float16,  the norm accumulated in float32 (torch's "opmath" type) and rounded to the table's
#   bfloat16  dtype; the factor rounded to float32 and then to the table's dtype (as torch's C++
#             `row *= scale` does, unlike Python's `t *= s`, which keeps it float32), each
#             x * factor formed in float32 (exact) and rounded once. Order:
#             column order, except bfloat16 with p = 2: eight float32 lanes over blocks of sixteen
#             columns (lane l takes columns l and l + 8 of each block), lanes added in order, tail
#             columns by fused multiply-adds. Bitwise equal to torch except for p outside
#             {0, 1, 2, inf, -inf} (powf's rounding against torch's; within an ulp of the 16-bit norm).
# Every row is independent of every other, so the result is the same bits for any number of threads.

from libc.math cimport fabs, fabsf, fma as c_fma, fmaf, pow as c_pow, powf, sqrt as c_sqrt, sqrtf

cdef enum:
    NORM_P = 0      # (sum |x|^p)^(1/p)
    NORM_ONE = 1    # sum |x|
    NORM_TWO = 2    # sqrt(sum x^2)
    NORM_MAX = 3    # max |x|   (p = inf)
    NORM_MIN = 4    # min |x|   (p = -inf)
    NORM_COUNT = 5  # the number of nonzero x (p = 0)


cdef inline double _row_norm(const float* row, Py_ssize_t D, int kind, double p) noexcept nogil:
    cdef Py_ssize_t j
    cdef double acc = 0.0, a
    if kind == NORM_TWO:
        for j in range(D):
            a = row[j]
            acc += a * a
        return c_sqrt(acc)
    if kind == NORM_ONE:
        for j in range(D):
            acc += fabs(<double>row[j])
        return acc
    if kind == NORM_MAX or kind == NORM_MIN:
        if D == 0:
            return 0.0
        acc = fabs(<double>row[0])
        for j in range(1, D):
            a = fabs(<double>row[j])
            if a != a or (a > acc if kind == NORM_MAX else a < acc):  # a NaN stays, as in torch
                acc = a
        return acc
    if kind == NORM_COUNT:
        for j in range(D):
            if row[j] != 0:
                acc += 1.0
        return acc
    for j in range(D):
        acc += c_pow(fabs(<double>row[j]), p)
    return c_pow(acc, 1.0 / p)


cdef extern from "_fastembed.h" nogil:
    # The scalar conversions of the 16-bit formats (round to nearest even; the portable float16 ones
    # are the model the F16C row functions are held to, so either gives the same bits).
    float fe_bf16_to_float(uint16_t h)
    uint16_t fe_float_to_bf16(float f)
    float fe_f16_to_float_sw(uint16_t h)
    uint16_t fe_float_to_f16_sw(float f)


# The renorm's helpers and loops are fused over elem_t (_kernels.pyx), the type of the loop that calls
# them (the float and double forms of the 16-bit helpers are never called). The bags' loops (_bag_*.pxi,
# included after this file) take one element as float32 with _acc_value too.
cdef inline float _acc_value(elem_t x) noexcept nogil:
    if elem_t is fe_f16:
        return fe_f16_to_float_sw(x.bits)
    elif elem_t is fe_bf16:
        return fe_bf16_to_float(x.bits)
    else:
        return <float>x


cdef inline elem_t _rounded_to(elem_t* like, float f) noexcept nogil:
    """f rounded to the format of *like (the pointer only picks the specialisation)."""
    cdef elem_t out
    if elem_t is fe_f16:
        out.bits = fe_float_to_f16_sw(f)
    elif elem_t is fe_bf16:
        out.bits = fe_float_to_bf16(f)
    else:
        out = <elem_t>f
    return out


cdef inline double _row_norm_f64(const double* row, Py_ssize_t D, int kind, double p) noexcept nogil:
    """torch's norm of a float64 row, in torch's order (see the top of this file)."""
    cdef Py_ssize_t j, m
    cdef double acc = 0.0, a, l0 = 0.0, l1 = 0.0, l2 = 0.0, l3 = 0.0, root
    if kind == NORM_TWO:
        m = D - D % 4
        for j in range(0, m, 4):
            l0 = l0 + row[j] * row[j]
            l1 = l1 + row[j + 1] * row[j + 1]
            l2 = l2 + row[j + 2] * row[j + 2]
            l3 = l3 + row[j + 3] * row[j + 3]
        acc = ((l0 + l1) + l2) + l3
        for j in range(m, D):
            acc = c_fma(row[j], row[j], acc)
        return c_sqrt(acc)
    if kind == NORM_ONE:
        for j in range(D):
            acc += fabs(row[j])
        return acc
    if kind == NORM_MAX or kind == NORM_MIN:
        if D == 0:
            return 0.0
        acc = fabs(row[0])
        for j in range(1, D):
            a = fabs(row[j])
            if a != a or (a > acc if kind == NORM_MAX else a < acc):  # a NaN stays, as in torch
                acc = a
        return acc
    if kind == NORM_COUNT:
        for j in range(D):
            if row[j] != 0:
                acc += 1.0
        return acc
    for j in range(D):
        acc += c_pow(fabs(row[j]), p)
    root = 1.0 / p
    return c_pow(acc, root)


cdef inline float _row_norm_half(const elem_t* row, Py_ssize_t D, int kind, float p) noexcept nogil:
    """torch's norm of a float16 or bfloat16 row, accumulated in float32 in torch's order, not yet
    rounded to the row's format."""
    cdef Py_ssize_t j, m, l
    cdef float acc = 0.0, a
    cdef float lanes[8]
    if kind == NORM_TWO:
        if elem_t is fe_bf16:
            # torch's vectorised bfloat16 kernel: blocks of 16 columns widened to two float32 vectors
            # of 8, each squared and added into the same 8 lanes
            for l in range(8):
                lanes[l] = 0.0
            m = D - D % 16
            for j in range(0, m, 8):
                for l in range(8):
                    a = _acc_value(row[j + l])
                    lanes[l] = lanes[l] + a * a
            acc = lanes[0]
            for l in range(1, 8):
                acc = acc + lanes[l]
            for j in range(m, D):
                a = _acc_value(row[j])
                acc = fmaf(a, a, acc)
        else:
            for j in range(D):
                a = _acc_value(row[j])
                acc = acc + a * a
        return sqrtf(acc)
    if kind == NORM_ONE:
        for j in range(D):
            acc = acc + fabsf(_acc_value(row[j]))
        return acc
    if kind == NORM_MAX or kind == NORM_MIN:
        if D == 0:
            return 0.0
        acc = fabsf(_acc_value(row[0]))
        for j in range(1, D):
            a = fabsf(_acc_value(row[j]))
            if a != a or (a > acc if kind == NORM_MAX else a < acc):  # a NaN stays, as in torch
                acc = a
        return acc
    if kind == NORM_COUNT:
        for j in range(D):
            if _acc_value(row[j]) != 0:
                acc = acc + 1.0
        return acc
    for j in range(D):
        acc = acc + powf(fabsf(_acc_value(row[j])), p)
    return powf(acc, <float>1.0 / p)


cdef inline void _renorm_rows(elem_t* table, Py_ssize_t D, const int64_t* rows, Py_ssize_t lo, Py_ssize_t hi,
                              double max_norm, int kind, double p) noexcept nogil:
    """Rows rows[lo:hi] (distinct, in range) of table scaled to p-norm max_norm where they exceed it."""
    cdef Py_ssize_t i, j
    cdef elem_t* row
    cdef double norm, wide_scale
    cdef float scale
    for i in range(lo, hi):
        row = table + rows[i] * D
        # torch's norm is a value of the table's dtype
        if elem_t is float:
            norm = <double><float>_row_norm(row, D, kind, p)  # torch's norm is a float32 value
        elif elem_t is double:
            norm = _row_norm_f64(row, D, kind, p)
        elif elem_t is fe_f16:
            norm = fe_f16_to_float_sw(fe_float_to_f16_sw(_row_norm_half(row, D, kind, <float>p)))
        else:
            norm = fe_bf16_to_float(fe_float_to_bf16(_row_norm_half(row, D, kind, <float>p)))
        if norm > max_norm:
            if elem_t is double:
                wide_scale = max_norm / (norm + 1e-7)
                for j in range(D):
                    row[j] = row[j] * wide_scale
            else:
                scale = <float>(max_norm / (norm + 1e-7))
                if elem_t is float:
                    for j in range(D):
                        row[j] = row[j] * scale
                else:
                    # torch's factor is a value of the table's dtype (a 16-bit scalar multiplies a
                    # 16-bit row), each product formed in float32 (exact) and rounded once
                    scale = _acc_value(_rounded_to(row, scale))
                    for j in range(D):
                        row[j] = _rounded_to(row, _acc_value(row[j]) * scale)


cdef void _renorm(elem_t* table, Py_ssize_t D, const int64_t* rows, Py_ssize_t U, double max_norm, int kind,
                  double p, int nthreads, int* team) noexcept nogil:
    cdef int k
    team[0] = 1
    if nthreads <= 1:
        _renorm_rows(table, D, rows, 0, U, max_norm, kind, p)
        return
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        _renorm_rows(table, D, rows, _part(U, k, nthreads), _part(U, k + 1, nthreads), max_norm, kind, p)


cdef void _renorm_any(void* table, int fmt, Py_ssize_t D, const int64_t* rows, Py_ssize_t U, double max_norm,
                      int kind, double p, int nthreads, int* team) noexcept nogil:
    """The specialisation for the table's format (checked with the GIL)."""
    if fmt == FMT_F32:
        _renorm(<float*>table, D, rows, U, max_norm, kind, p, nthreads, team)
    elif fmt == FMT_F64:
        _renorm(<double*>table, D, rows, U, max_norm, kind, p, nthreads, team)
    elif fmt == FMT_F16:
        _renorm(<fe_f16*>table, D, rows, U, max_norm, kind, p, nthreads, team)
    else:
        _renorm(<fe_bf16*>table, D, rows, U, max_norm, kind, p, nthreads, team)


cdef int _norm_kind(double p):
    if p == 2.0:
        return NORM_TWO
    if p == 1.0:
        return NORM_ONE
    if p == 0.0:
        return NORM_COUNT
    if p == float("inf"):
        return NORM_MAX
    if p == float("-inf"):
        return NORM_MIN
    return NORM_P


def renorm(table, ids, double max_norm, double norm_type=2.0, *, _format=None):
    """torch's embedding_renorm_: each distinct row of table that ids name is scaled in place by
    max_norm / (norm + 1e-7) when its norm_type-norm exceeds max_norm.

    Every input is checked before the first write: table float32, float64, float16 or bfloat16
    (ml_dtypes.bfloat16, or uint16 bits with the private `_format="bfloat16"`), 2-D, C-contiguous
    and writeable; ids int32/int64 in [0, rows) (an id out of range is an IndexError and no row
    changes); max_norm >= 0 and norm_type not NaN (ValueError).
    """
    cdef int fmt
    cdef cnp.ndarray tab = _any_target(table, "table", _format_arg(_format), &fmt)
    _check_2d(tab, "table")
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    if not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    if norm_type != norm_type:
        raise ValueError(f"norm_type must be a number, got {norm_type}")
    _no_overlap(tab, "table", (ids,), ("ids",))
    cdef Py_ssize_t V = _rows(tab), D = _dim(tab)
    _check_range(idx, "ids", V, "table")
    # The distinct ids, sorted, in a private array: no id is read twice from the caller's memory.
    cdef cnp.ndarray rows = np.unique(idx.reshape(-1)).astype(np.int64, copy=False)
    cdef Py_ssize_t U = cnp.PyArray_SIZE(rows)
    cdef void* t = cnp.PyArray_DATA(tab)
    cdef const int64_t* r = <const int64_t*>cnp.PyArray_DATA(rows)
    cdef int kind = _norm_kind(norm_type), nthreads = _threads_for(U * D), team
    cdef bint release = _releases(U * D)
    if release:
        with nogil:
            _renorm_any(t, fmt, D, r, U, max_norm, kind, norm_type, nthreads, &team)
    else:
        _renorm_any(t, fmt, D, r, U, max_norm, kind, norm_type, nthreads, &team)
    _record(team, release)
