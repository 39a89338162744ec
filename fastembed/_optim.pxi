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


cdef int _check_like(cnp.ndarray arr, str name, cnp.ndarray w) except -1:
    """Per-element optimizer state has the weight's shape."""
    if _shape(arr) != _shape(w):
        raise ValueError(f"{name} must have weight.shape={_shape(w)}, got {name}.shape={_shape(arr)}")
    return 0


cdef cnp.ndarray _checked_rows(object rows, Py_ssize_t V):
    """None (every row is updated), or rows as a private 1-D int64 array of strictly increasing ids
    in [0, V): private because the update runs without the GIL and does not re-check them."""
    if rows is None:
        return None
    cdef cnp.ndarray r = _index_array(rows, "rows")
    if cnp.PyArray_ITEMSIZE(r) != 8 or cnp.PyArray_NDIM(r) != 1:
        raise TypeError(f"rows must be a 1-D int64 array, got rows.dtype={r.dtype}, rows.shape={_shape(r)}")
    r = _private(r, rows)
    _check_range(r, "rows", V, "weight")
    _check_increasing(r)
    return r


cdef inline Py_ssize_t _updates(cnp.ndarray r, cnp.ndarray w):
    """How many rows move: all of weight's when rows is None."""
    return _rows(w) if r is None else cnp.PyArray_DIM(r, 0)


cdef int _check_grad(cnp.ndarray g, Py_ssize_t U, Py_ssize_t D) except -1:
    """One gradient row per updated row."""
    if _shape(g) != (U, D):
        raise ValueError(f"grad must have shape {(U, D)}, got grad.shape={_shape(g)}")
    return 0


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
    _check_like(m, "exp_avg", w)
    _check_like(v, "exp_avg_sq", w)
    cdef cnp.ndarray r = _checked_rows(rows, _rows(w))
    cdef Py_ssize_t U = _updates(r, w), D = _dim(w)
    _check_grad(g, U, D)
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


# ---------------------------------------------------------------- SGD, Adagrad, row-wise Adagrad

cdef enum:
    SGD_UPDATE = 0
    ADAGRAD_UPDATE = 1
    ROWWISE_UPDATE = 2
    SGD_FMA_UPDATE = 3


cdef void _update_rows(int kind, float* w, float* s, const float* g, Py_ssize_t D, const int64_t* rows,
                       Py_ssize_t lo, Py_ssize_t hi, float lr, float eps) noexcept nogil:
    """One update of rows[lo:hi] (rows NULL: row k is row k), g holding one row per update; s is the
    Adagrad state: (V, D) per element, (V,) per row, unused by SGD."""
    cdef Py_ssize_t k, r, nxt
    cdef float G
    for k in range(lo, hi):
        if rows != NULL and k + PREFETCH_ROWS < hi:
            nxt = rows[k + PREFETCH_ROWS]
            _prefetch_row_write(w + nxt * D, 0, D)
            if kind == ADAGRAD_UPDATE:
                _prefetch_row_write(s + nxt * D, 0, D)
        r = rows[k] if rows != NULL else k
        if kind == SGD_UPDATE:
            fe_sgd_row(w + r * D, g + k * D, D, lr)
        elif kind == SGD_FMA_UPDATE:
            fe_sgd_row_fma(w + r * D, g + k * D, D, lr)
        elif kind == ADAGRAD_UPDATE:
            fe_adagrad_row(w + r * D, s + r * D, g + k * D, D, lr, eps)
        elif D > 0:  # a row of no columns has no mean square: its accumulator stays as it is
            G = s[r] + fe_sum_squares(g + k * D, D) / <float>D
            s[r] = G
            fe_scaled_row(w + r * D, g + k * D, D, lr, sqrtf(G) + eps)


cdef void _update(int kind, float* w, float* s, const float* g, Py_ssize_t D, const int64_t* rows, Py_ssize_t U,
                  float lr, float eps, int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t lo, hi
    team[0] = 1
    if nthreads <= 1:
        _update_rows(kind, w, s, g, D, rows, 0, U, lr, eps)
        return
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        lo = _part(U, k, nthreads)
        hi = _part(U, k + 1, nthreads)
        _update_rows(kind, w, s, g, D, rows, lo, hi, lr, eps)


cdef int _run(int kind, cnp.ndarray w, cnp.ndarray s, cnp.ndarray g, cnp.ndarray r, double lr,
              double eps) except -1:
    """Run a checked update: threaded and without the GIL from the serial threshold on."""
    cdef Py_ssize_t U = _updates(r, w), D = _dim(w)
    cdef float* wp = <float*>cnp.PyArray_DATA(w)
    cdef float* sp = NULL if s is None else <float*>cnp.PyArray_DATA(s)
    cdef const float* gp = <const float*>cnp.PyArray_DATA(g)
    cdef const int64_t* rp = NULL if r is None else <const int64_t*>cnp.PyArray_DATA(r)
    cdef int nthreads = _threads_for(U * D), team
    cdef bint release = _releases(U * D)
    if release:
        with nogil:
            _update(kind, wp, sp, gp, D, rp, U, <float>lr, <float>eps, nthreads, &team)
    else:
        _update(kind, wp, sp, gp, D, rp, U, <float>lr, <float>eps, nthreads, &team)
    _record(team, release)
    return 0


def sgd_step(weight, grad, rows, double lr, bint check_only=False, bint fma=False):
    """``weight[rows] -= lr * grad`` in place, in float32: each element becomes ``w - (lr * g)`` with
    lr rounded to float32 (numpy's ``w -= np.float32(lr) * g``, bit for bit), or with fma=True
    ``fma(-lr, g, w)``, rounded once (torch's ``w.add_(g, alpha=-lr)``, bit for bit). rows None
    updates every row (grad is (V, D)), else only rows (sorted distinct int64, grad is (len(rows), D)).
    check_only: run every check, write nothing."""
    cdef cnp.ndarray w = _target(weight, "weight")
    cdef cnp.ndarray g = _float_input(grad, "grad")
    _check_2d(w, "weight")
    cdef cnp.ndarray r = _checked_rows(rows, _rows(w))
    _check_grad(g, _updates(r, w), _dim(w))
    _no_overlap(w, "weight", (grad, rows), ("grad", "rows"))
    if not check_only:
        _run(SGD_FMA_UPDATE if fma else SGD_UPDATE, w, None, g, r, lr, 0.0)


def sgd_scatter(weight, ids, grad_out, double lr, bint fma=False):
    """SGD straight from a lookup's gradient, with no coalesce: ``weight[ids[i]] -= lr * grad_out[i]``
    in place, one lookup after another in the row-major order of ids (so a repeated id moves its row
    once per occurrence, as torch's SGD does with an uncoalesced sparse gradient). Each element becomes
    ``w - (lr * g)`` (numpy's rounding) or, with fma=True, ``fma(-lr, g, w)`` (torch's); lr is rounded to
    float32. ids: int32/int64 of any shape; grad_out: float32 of shape ids.shape + (D,).
    Checked as scatter_add is; bitwise the same for every thread count."""
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    _scatter(weight, ids, grad_out, "weight", ROW_SGD_FMA if fma else ROW_SGD, lr)


def adagrad_step(weight, state_sum, grad, rows, double clr, double eps, bint check_only=False):
    """One Adagrad update in place, fused per element, all in float32 (clr and eps rounded to it):
    ``state_sum += g * g``, then ``w -= (clr * g) / (sqrt(state_sum) + eps)``, for every row (rows
    None, grad (V, D)) or only rows (sorted distinct int64, grad (len(rows), D)); other rows keep
    weight and state_sum. clr is the decayed learning rate of this step (the caller applies
    lr_decay, and weight decay, which torch allows only for dense gradients). check_only: run every
    check, write nothing."""
    cdef cnp.ndarray w = _target(weight, "weight")
    cdef cnp.ndarray s = _target(state_sum, "state_sum")
    cdef cnp.ndarray g = _float_input(grad, "grad")
    _check_2d(w, "weight")
    _check_like(s, "state_sum", w)
    cdef cnp.ndarray r = _checked_rows(rows, _rows(w))
    _check_grad(g, _updates(r, w), _dim(w))
    _no_overlap(w, "weight", (s, grad, rows), ("state_sum", "grad", "rows"))
    _no_overlap(s, "state_sum", (grad, rows), ("grad", "rows"))
    if not check_only:
        _run(ADAGRAD_UPDATE, w, s, g, r, clr, eps)


def rowwise_adagrad_step(weight, state_sum, grad, rows, double lr, double eps, bint check_only=False):
    """One row-wise Adagrad update in place, all in float32: for each updated row r, with g its
    gradient row, ``state_sum[r] += (sum of g[d]**2 in column order) / D``, then
    ``w[r] -= (lr * g) / (sqrt(state_sum[r]) + eps)``. state_sum is (V,): one accumulator per row.
    rows None updates every row (grad (V, D)), else only rows (sorted distinct int64, grad
    (len(rows), D)). With D = 0 nothing changes (no mean of no columns). check_only: run every
    check, write nothing."""
    cdef cnp.ndarray w = _target(weight, "weight")
    cdef cnp.ndarray s = _target(state_sum, "state_sum")
    cdef cnp.ndarray g = _float_input(grad, "grad")
    _check_2d(w, "weight")
    if _shape(s) != (_rows(w),):
        raise ValueError(f"state_sum must have shape (weight.shape[0],) = {(_rows(w),)}, got "
                         f"state_sum.shape={_shape(s)}")
    cdef cnp.ndarray r = _checked_rows(rows, _rows(w))
    _check_grad(g, _updates(r, w), _dim(w))
    _no_overlap(w, "weight", (s, grad, rows), ("state_sum", "grad", "rows"))
    _no_overlap(s, "state_sum", (grad, rows), ("grad", "rows"))
    if not check_only:
        _run(ROWWISE_UPDATE, w, s, g, r, lr, eps)
