# Included by _kernels.pyx (one extension module; Cython `include`): torch's max_norm for embedding
# lookups (torch.embedding_renorm_), a row-wise in-place rescale of the rows a lookup reads.
#
# What torch computes, per distinct id r (duplicates once), in any order: the p-norm of row r as a
# value of the table's dtype (float32), and when that value, widened to double, exceeds max_norm,
# row r *= max_norm / (norm + 1e-7), the factor formed in double and applied as float32
# (x * (float)scale, one rounding, as torch's float32 multiply by a Python scalar).
# Here the norm is summed in double, in column order, and rounded once to float32, so it is within
# an ulp or two of torch's float32-accumulated one; every row is independent of every other, so the
# result is the same bits for any number of threads.

from libc.math cimport fabs, pow as c_pow, sqrt as c_sqrt

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


cdef inline void _renorm_rows(float* table, Py_ssize_t D, const int64_t* rows, Py_ssize_t lo, Py_ssize_t hi,
                              double max_norm, int kind, double p) noexcept nogil:
    """Rows rows[lo:hi] (distinct, in range) of table scaled to p-norm max_norm where they exceed it."""
    cdef Py_ssize_t i, j
    cdef float* row
    cdef double norm
    cdef float scale
    for i in range(lo, hi):
        row = table + rows[i] * D
        norm = <double><float>_row_norm(row, D, kind, p)  # torch's norm is a float32 value
        if norm > max_norm:
            scale = <float>(max_norm / (norm + 1e-7))
            for j in range(D):
                row[j] = row[j] * scale


cdef void _renorm(float* table, Py_ssize_t D, const int64_t* rows, Py_ssize_t U, double max_norm, int kind,
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


def renorm(table, ids, double max_norm, double norm_type=2.0):
    """torch's embedding_renorm_: each distinct row of table that ids name is scaled in place by
    max_norm / (norm + 1e-7) when its norm_type-norm exceeds max_norm.

    Every input is checked before the first write: table float32, 2-D, C-contiguous and writeable;
    ids int32/int64 in [0, rows) (an id out of range is an IndexError and no row changes);
    max_norm >= 0 and norm_type not NaN (ValueError).
    """
    cdef cnp.ndarray tab = _target(table, "table")
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
    cdef float* t = <float*>cnp.PyArray_DATA(tab)
    cdef const int64_t* r = <const int64_t*>cnp.PyArray_DATA(rows)
    cdef int kind = _norm_kind(norm_type), nthreads = _threads_for(U * D), team
    cdef bint release = _releases(U * D)
    if release:
        with nogil:
            _renorm(t, D, r, U, max_norm, kind, norm_type, nthreads, &team)
    else:
        _renorm(t, D, r, U, max_norm, kind, norm_type, nthreads, &team)
    _record(team, release)
