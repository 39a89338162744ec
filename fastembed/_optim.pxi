# Included by _kernels.pyx (one extension module; Cython `include`): the optimizer family.
# Row updates in place, fused per element, checked with the GIL and run without it.

cdef void _adam_rows(float* w, float* m, float* v, const float* g, Py_ssize_t D, const int64_t* rows,
                     Py_ssize_t lo, Py_ssize_t hi, float lr, float beta1, float beta2, float eps,
                     float inv_bias1, float inv_bias2) noexcept nogil:
    """One Adam update of rows[lo:hi] (rows NULL: row k is row k), g holding one row per update."""
    cdef Py_ssize_t k, r
    for k in range(lo, hi):
        if rows != NULL and k + PREFETCH_ROWS < hi:
            _prefetch_row_write(w + rows[k + PREFETCH_ROWS] * D, 0, D)
            _prefetch_row_write(m + rows[k + PREFETCH_ROWS] * D, 0, D)
            _prefetch_row_write(v + rows[k + PREFETCH_ROWS] * D, 0, D)
        r = rows[k] if rows != NULL else k
        fe_adam_row(w + r * D, m + r * D, v + r * D, g + k * D, D, lr, beta1, beta2, eps, inv_bias1, inv_bias2)


cdef void _adam(float* w, float* m, float* v, const float* g, Py_ssize_t D, const int64_t* rows,
                Py_ssize_t U, float lr, float beta1, float beta2, float eps, float inv_bias1, float inv_bias2,
                int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t lo, hi
    team[0] = 1
    if nthreads <= 1:
        _adam_rows(w, m, v, g, D, rows, 0, U, lr, beta1, beta2, eps, inv_bias1, inv_bias2)
        return
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        lo = _part(U, k, nthreads)
        hi = _part(U, k + 1, nthreads)
        _adam_rows(w, m, v, g, D, rows, lo, hi, lr, beta1, beta2, eps, inv_bias1, inv_bias2)


cdef int _check_increasing(cnp.ndarray rows) except -1:
    """Rows updated in parallel must be distinct; sorted distinct rows are what coalesce gives."""
    cdef const int64_t* r = <const int64_t*>cnp.PyArray_DATA(rows)
    cdef Py_ssize_t k
    for k in range(1, cnp.PyArray_DIM(rows, 0)):
        if r[k] <= r[k - 1]:
            raise ValueError(f"rows must be strictly increasing, got rows[{k - 1}]={r[k - 1]}, rows[{k}]={r[k]}")
    return 0


def adam_step(weight, exp_avg, exp_avg_sq, grad, rows, double lr, double beta1, double beta2,
              double eps, double bias1, double bias2, bint check_only=False):
    """One Adam update in place, fused per element; rows None updates every row (grad is (V, D)),
    else only rows (sorted distinct int64, grad is (len(rows), D)). check_only: run every check, write nothing
    (an optimizer checks all of its parameters before it moves any)."""
    cdef cnp.ndarray w = _target(weight, "weight")
    cdef cnp.ndarray m = _target(exp_avg, "exp_avg")
    cdef cnp.ndarray v = _target(exp_avg_sq, "exp_avg_sq")
    cdef cnp.ndarray g = _float_input(grad, "grad")
    _check_2d(w, "weight")
    for arr, name in ((m, "exp_avg"), (v, "exp_avg_sq")):
        if _shape(arr) != _shape(w):
            raise ValueError(f"{name} must have weight.shape={_shape(w)}, got {name}.shape={_shape(arr)}")
    cdef Py_ssize_t V = _rows(w), D = _dim(w), U
    cdef cnp.ndarray r = None
    if rows is None:
        U = V
    else:
        r = _index_array(rows, "rows")
        if cnp.PyArray_ITEMSIZE(r) != 8 or cnp.PyArray_NDIM(r) != 1:
            raise TypeError(f"rows must be a 1-D int64 array, got rows.dtype={r.dtype}, rows.shape={_shape(r)}")
        U = cnp.PyArray_DIM(r, 0)
        r = _private(r, rows)  # the update below runs without the GIL
        _check_range(r, "rows", V, "weight")
        _check_increasing(r)
    if _shape(g) != (U, D):
        raise ValueError(f"grad must have shape {(U, D)}, got grad.shape={_shape(g)}")
    _no_overlap(w, "weight", (m, v, grad, rows), ("exp_avg", "exp_avg_sq", "grad", "rows"))
    _no_overlap(m, "exp_avg", (v, grad, rows), ("exp_avg_sq", "grad", "rows"))
    _no_overlap(v, "exp_avg_sq", (grad, rows), ("grad", "rows"))
    if check_only:
        return
    cdef const int64_t* rp = NULL if r is None else <const int64_t*>cnp.PyArray_DATA(r)
    cdef int nthreads = _threads_for(U * D), team
    with nogil:  # an optimizer step is never small enough for the GIL release to matter
        _adam(<float*>cnp.PyArray_DATA(w), <float*>cnp.PyArray_DATA(m), <float*>cnp.PyArray_DATA(v),
              <const float*>cnp.PyArray_DATA(g), D, rp, U, <float>lr, <float>beta1, <float>beta2,
              <float>eps, <float>(1.0 / bias1), <float>(1.0 / bias2), nthreads, &team)
    _record(team, True)
