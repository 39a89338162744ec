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


def sgd_scatter(weight, ids, grad_out, double lr, bint fma=False, bint check_only=False):
    """SGD straight from a lookup's gradient, with no coalesce: ``weight[ids[i]] -= lr * grad_out[i]``
    in place, one lookup after another in the row-major order of ids (so a repeated id moves its row
    once per occurrence, as torch's SGD does with an uncoalesced sparse gradient). Each element becomes
    ``w - (lr * g)`` (numpy's rounding) or, with fma=True, ``fma(-lr, g, w)`` (torch's); lr is rounded to
    float32. ids: int32/int64 of any shape; grad_out: float32 of shape ids.shape + (D,).
    Checked as scatter_add is; bitwise the same for every thread count. check_only: run every
    check, write nothing (a layer with two tables checks both before either moves)."""
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    _scatter(weight, ids, grad_out, "weight", ROW_SGD_FMA if fma else ROW_SGD, lr, check_only)


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


# ---------------------------------------------------------------- coalesce and update in one pass

# The fused rules and the drop-in optimizers get a lookup's gradient as (ids, grad_out): one row per
# lookup. Adagrad, row-wise Adagrad and Adam update a row once per step with its summed gradient, which
# coalesce + *_step computes by writing the (U, D) sums and reading them back. The *_scatter kernels
# below group the lookups by row instead (a stable counting sort of the slots coalesce computes) and sum
# each row's gradient into a buffer of one row, which the update reads from L1: the same adds in the same
# order (0 + the first lookup's row, then the others in ids order), so the same bits, without the sums'
# round trip through memory. Rows are distinct, so threads own rows and the bits do not depend on their
# count.

cdef enum:
    ADAM_UPDATE = 4

cdef struct _Hyper:
    float lr
    float eps
    float beta1
    float beta2
    float inv_bias1
    float inv_bias2


cdef void _group_lookups(const int64_t* slots, Py_ssize_t N, Py_ssize_t U, int64_t* start,
                         int64_t* order) noexcept nogil:
    """A stable counting sort of the lookups by slot: order[start[u]:start[u + 1]] are the positions of
    slot u's lookups, increasing (ids order). start has U + 1 entries. A slot outside [0, U) (an id
    changed while the slots were computed) places nothing."""
    cdef Py_ssize_t i, u
    cdef int64_t sl
    memset(start, 0, (U + 1) * sizeof(int64_t))
    for i in range(N):
        sl = slots[i]
        if not _outside(sl, U):
            start[sl + 1] += 1
    for u in range(U):
        start[u + 1] += start[u]
    for i in range(N):  # start[u] is slot u's cursor here, and ends at the start of slot u + 1
        sl = slots[i]
        if not _outside(sl, U):
            order[start[sl]] = i
            start[sl] += 1
    for u in range(U, 0, -1):
        start[u] = start[u - 1]
    start[0] = 0


cdef void _grouped_rows(int kind, float* w, float* s, float* s2, const float* g, Py_ssize_t D,
                        const int64_t* rows, const int64_t* start, const int64_t* order, Py_ssize_t lo,
                        Py_ssize_t hi, int64_t skip, float* acc, const _Hyper* h) noexcept nogil:
    """Rows rows[lo:hi], each summed into acc (one row) from its lookups and updated: Adagrad (s the
    sum of squares), row-wise Adagrad (s one float per row) or Adam (s, s2 the moments). Row skip moves
    nothing."""
    cdef Py_ssize_t u, k, r, nxt, end = start[hi]
    cdef float G
    for u in range(lo, hi):
        if u + PREFETCH_ROWS < hi:
            nxt = rows[u + PREFETCH_ROWS]
            _prefetch_row_write(w + nxt * D, 0, D)
            if kind != ROWWISE_UPDATE:
                _prefetch_row_write(s + nxt * D, 0, D)
            if kind == ADAM_UPDATE:
                _prefetch_row_write(s2 + nxt * D, 0, D)
        r = rows[u]
        if r == skip or start[u] == start[u + 1]:
            continue
        for k in range(start[u], start[u + 1]):
            if k + PREFETCH_ROWS < end:
                _prefetch_row(g + order[k + PREFETCH_ROWS] * D, D)
            if k == start[u]:
                fe_first_into(acc, g + order[k] * D, D)
            else:
                fe_add_into(acc, g + order[k] * D, D)
        if kind == ADAGRAD_UPDATE:
            fe_adagrad_row(w + r * D, s + r * D, acc, D, h.lr, h.eps)
        elif kind == ADAM_UPDATE:
            fe_adam_row(w + r * D, s + r * D, s2 + r * D, acc, D, h.lr, h.beta1, h.beta2, h.eps, h.inv_bias1,
                        h.inv_bias2)
        elif D > 0:  # row-wise; a row of no columns has no mean square: its accumulator stays as it is
            G = s[r] + fe_sum_squares(acc, D) / <float>D
            s[r] = G
            fe_scaled_row(w + r * D, acc, D, h.lr, sqrtf(G) + h.eps)


cdef void _grouped_update(int kind, float* w, float* s, float* s2, const float* g, Py_ssize_t D,
                          const int64_t* rows, Py_ssize_t U, const int64_t* slots, Py_ssize_t N,
                          int64_t* start, int64_t* order, int64_t skip, float* acc, const _Hyper* h,
                          int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t lo, hi, width = D if D > 0 else 1
    _group_lookups(slots, N, U, start, order)
    team[0] = 1
    if nthreads <= 1:
        _grouped_rows(kind, w, s, s2, g, D, rows, start, order, 0, U, skip, acc, h)
        return
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        lo = _part(U, k, nthreads)
        hi = _part(U, k + 1, nthreads)
        _grouped_rows(kind, w, s, s2, g, D, rows, start, order, lo, hi, skip, acc + k * width, h)


cdef int _grouped(int kind, cnp.ndarray w, cnp.ndarray s, cnp.ndarray s2, tuple names, object ids,
                  object grad_out, int64_t skip, _Hyper* h, bint check_only) except -1:
    """The checks and the run of the *_scatter kernels: w (and its states s, s2, already checked against
    w and each other) updated from ids and grad_out."""
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef cnp.ndarray src = _float_input(grad_out, "grad_out")
    cdef Py_ssize_t V = _rows(w), D = _dim(w), N = cnp.PyArray_SIZE(idx)
    _check_rows_shape(src, "grad_out", idx, D)
    for target, name in zip((w, s, s2), names):
        if target is not None:
            _no_overlap(target, name, (ids, grad_out), ("ids", "grad_out"))
    if not check_only:
        idx = _private(idx, ids)  # checked once, then read: no other thread can move an id past the table
    _check_range(idx, "ids", V, "weight")
    if check_only:
        return 0
    cdef bint release = _releases(N * D)
    rows, slots = _unique_slots(idx, N, release)
    cdef cnp.ndarray rows_arr = rows, slots_arr = slots
    cdef Py_ssize_t U = cnp.PyArray_DIM(rows_arr, 0)
    cdef int nthreads = _threads_for(U * D), team
    cdef cnp.ndarray start = np.empty(U + 1, dtype=np.int64), order = np.empty(N, dtype=np.int64)
    cdef cnp.ndarray acc = _fresh(nthreads * max(D, 1), np.float32)
    cdef float* wp = <float*>cnp.PyArray_DATA(w)
    cdef float* sp = <float*>cnp.PyArray_DATA(s)
    cdef float* s2p = NULL if s2 is None else <float*>cnp.PyArray_DATA(s2)
    cdef const float* gp = <const float*>cnp.PyArray_DATA(src)
    cdef const int64_t* rp = <const int64_t*>cnp.PyArray_DATA(rows_arr)
    cdef const int64_t* slp = <const int64_t*>cnp.PyArray_DATA(slots_arr)
    cdef int64_t* stp = <int64_t*>cnp.PyArray_DATA(start)
    cdef int64_t* op = <int64_t*>cnp.PyArray_DATA(order)
    cdef float* ap = <float*>cnp.PyArray_DATA(acc)
    if release:
        with nogil:
            _grouped_update(kind, wp, sp, s2p, gp, D, rp, U, slp, N, stp, op, skip, ap, h, nthreads, &team)
    else:
        _grouped_update(kind, wp, sp, s2p, gp, D, rp, U, slp, N, stp, op, skip, ap, h, nthreads, &team)
    _record(team, release)
    return 0


def adagrad_scatter(weight, state_sum, ids, grad_out, double clr, double eps, int64_t skip_row=-1,
                    bint check_only=False):
    """Adagrad straight from a lookup's gradient: ``rows, values = coalesce(ids, grad_out)``, then
    ``adagrad_step(weight, state_sum, values, rows, clr, eps)`` on every row but skip_row (-1: none), bit
    for bit and for every thread count, without writing the summed rows out. ids: int32/int64 of any
    shape, in [0, len(weight)); grad_out: float32 of shape ids.shape + (D,). check_only: run every
    check, write nothing."""
    cdef cnp.ndarray w = _target(weight, "weight")
    cdef cnp.ndarray s = _target(state_sum, "state_sum")
    _check_2d(w, "weight")
    _check_like(s, "state_sum", w)
    _no_overlap(w, "weight", (state_sum,), ("state_sum",))
    cdef _Hyper h
    h.lr, h.eps = <float>clr, <float>eps
    _grouped(ADAGRAD_UPDATE, w, s, None, ("weight", "state_sum", None), ids, grad_out, skip_row, &h, check_only)


def rowwise_adagrad_scatter(weight, state_sum, ids, grad_out, double lr, double eps, int64_t skip_row=-1,
                            bint check_only=False):
    """Row-wise Adagrad straight from a lookup's gradient: ``coalesce`` then ``rowwise_adagrad_step``
    (state_sum one float32 per row) on every row but skip_row (-1: none), bit for bit, without writing
    the summed rows out. Arguments as adagrad_scatter's."""
    cdef cnp.ndarray w = _target(weight, "weight")
    cdef cnp.ndarray s = _target(state_sum, "state_sum")
    _check_2d(w, "weight")
    if _shape(s) != (_rows(w),):
        raise ValueError(f"state_sum must have shape (weight.shape[0],) = {(_rows(w),)}, got "
                         f"state_sum.shape={_shape(s)}")
    _no_overlap(w, "weight", (state_sum,), ("state_sum",))
    cdef _Hyper h
    h.lr, h.eps = <float>lr, <float>eps
    _grouped(ROWWISE_UPDATE, w, s, None, ("weight", "state_sum", None), ids, grad_out, skip_row, &h,
             check_only)


def adam_scatter(weight, exp_avg, exp_avg_sq, ids, grad_out, double lr, double beta1, double beta2,
                 double eps, double bias1, double bias2, int64_t skip_row=-1, bint check_only=False):
    """Adam straight from a lookup's gradient: ``coalesce`` then ``adam_step`` (the rows' moments and
    weights, bias corrections bias1 and bias2) on every row but skip_row (-1: none), bit for bit,
    without writing the summed rows out. Arguments as adagrad_scatter's."""
    cdef cnp.ndarray w = _target(weight, "weight")
    cdef cnp.ndarray m = _target(exp_avg, "exp_avg")
    cdef cnp.ndarray v = _target(exp_avg_sq, "exp_avg_sq")
    _check_2d(w, "weight")
    _check_like(m, "exp_avg", w)
    _check_like(v, "exp_avg_sq", w)
    _no_overlap(w, "weight", (exp_avg, exp_avg_sq), ("exp_avg", "exp_avg_sq"))
    _no_overlap(m, "exp_avg", (exp_avg_sq,), ("exp_avg_sq",))
    cdef _Hyper h
    h.lr, h.eps, h.beta1, h.beta2 = <float>lr, <float>eps, <float>beta1, <float>beta2
    h.inv_bias1, h.inv_bias2 = <float>(1.0 / bias1), <float>(1.0 / bias2)
    _grouped(ADAM_UPDATE, w, m, v, ("weight", "exp_avg", "exp_avg_sq"), ids, grad_out, skip_row, &h,
             check_only)
