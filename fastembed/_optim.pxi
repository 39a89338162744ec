# Included by _kernels.pyx (one extension module; Cython `include`): the optimizer family.
# Row updates in place, fused per element, checked with the GIL and run without it.
#
# Tables of the four element types (elem_t), every state array in the weight's dtype (as torch keeps an
# optimizer's state in the parameter's dtype): float32 and float64 compute in their own type (the rows of
# _fastembed.h, fe_*_row and fe_*_row_f64, one template); float16 and bfloat16 rows are computed in float32
# and rounded back once per stored element: Adam and Adagrad in registers (fe_adam_row_f16, ...), row-wise
# Adagrad staged (widened into float32 scratch, updated by the float32 row, narrowed), and SGD is torch's
# `w.add_(g, alpha=-lr)` for a 16-bit table (fe_scaled_add_*: lr rounded to the type, one rounding).

cdef extern from "_fastembed.h" nogil:
    # Adam's and Adagrad's rows of a 16-bit table, in registers (F16C / AVX2 where the CPU has them).
    void fe_adam_row_f16(fe_f16* w, fe_f16* m, fe_f16* v, const fe_f16* g, Py_ssize_t n, float lr, float beta1,
                         float beta2, float eps, float inv_bias1, float inv_bias2)
    void fe_adam_row_bf16(fe_bf16* w, fe_bf16* m, fe_bf16* v, const fe_bf16* g, Py_ssize_t n, float lr,
                          float beta1, float beta2, float eps, float inv_bias1, float inv_bias2)
    void fe_adagrad_row_f16(fe_f16* w, fe_f16* s, const fe_f16* g, Py_ssize_t n, float clr, float eps)
    void fe_adagrad_row_bf16(fe_bf16* w, fe_bf16* s, const fe_bf16* g, Py_ssize_t n, float clr, float eps)
    int fe_bf16_hardware()
    int fe_bf16_set_lanes(int level)


def _bf16_hardware(level=None):
    """The bfloat16 lanes in use (the lookups' adds, SGD, Adam and Adagrad rows): 0 the portable loops, 1 AVX2,
    2 AVX512_BF16. level: ask for one (granted up to what the CPU has); `_f16_hardware` switches them all off
    or back on. For tests only."""
    if level is not None:
        fe_bf16_set_lanes(level)
    return fe_bf16_hardware()

cdef enum:
    SGD_UPDATE = 0
    ADAGRAD_UPDATE = 1
    ROWWISE_UPDATE = 2
    SGD_FMA_UPDATE = 3
    ADAM_UPDATE = 4

cdef struct _Hyper:
    # The caller's hyperparameters as doubles: a float64 table uses them as they are, the other types round
    # them to float32 where they are used (the float32 kernels' bits are those of a float32 argument).
    double lr
    double eps
    double beta1
    double beta2
    double inv_bias1
    double inv_bias2

ctypedef fused real_t:
    float
    double


cdef inline void _real_row(int kind, real_t* w, real_t* s, real_t* s2, const real_t* g, Py_ssize_t D,
                           const _Hyper* h) noexcept nogil:
    """One row's update computed in real_t: s and s2 are this row's state (row-wise: s is its accumulator)."""
    if real_t is float:
        if kind == SGD_UPDATE:
            fe_sgd_row(w, g, D, <float>h.lr)
        elif kind == SGD_FMA_UPDATE:
            fe_sgd_row_fma(w, g, D, <float>h.lr)
        elif kind == ADAGRAD_UPDATE:
            fe_adagrad_row(w, s, g, D, <float>h.lr, <float>h.eps)
        elif kind == ADAM_UPDATE:
            fe_adam_row(w, s, s2, g, D, <float>h.lr, <float>h.beta1, <float>h.beta2, <float>h.eps,
                        <float>h.inv_bias1, <float>h.inv_bias2)
        else:
            fe_rowwise_row(w, s, g, D, <float>h.lr, <float>h.eps)
    else:
        if kind == SGD_UPDATE:
            fe_sgd_row_f64(w, g, D, h.lr)
        elif kind == SGD_FMA_UPDATE:
            fe_sgd_row_fma_f64(w, g, D, h.lr)
        elif kind == ADAGRAD_UPDATE:
            fe_adagrad_row_f64(w, s, g, D, h.lr, h.eps)
        elif kind == ADAM_UPDATE:
            fe_adam_row_f64(w, s, s2, g, D, h.lr, h.beta1, h.beta2, h.eps, h.inv_bias1, h.inv_bias2)
        else:
            fe_rowwise_row_f64(w, s, g, D, h.lr, h.eps)


cdef enum:
    # float32 scratch per thread for a 16-bit table, in units of max(D, STAGE_SPAN): the staged row, its
    # gradient and two states (4 D + 2: a row-wise state is one element), a widened lookup and the sum of a
    # row's lookups. A dense update of an elementwise rule is staged STAGE_SPAN elements at a time, across
    # rows (one call per span, not per row: the rule does not see row boundaries).
    STAGE_ROWS = 6
    STAGE_EXTRA = 2
    STAGE_SPAN = 512


cdef inline Py_ssize_t _stage_width(Py_ssize_t D) noexcept nogil:
    return STAGE_ROWS * (D if D > STAGE_SPAN else STAGE_SPAN) + STAGE_EXTRA


cdef inline void _elem_row16(int kind, elem_t* w, elem_t* s, elem_t* s2, const elem_t* g, Py_ssize_t D,
                             const _Hyper* h) noexcept nogil:
    """Adam's or Adagrad's row of a 16-bit table in registers (fe_adam_row_f16, ...): the staged row's bits."""
    if elem_t is fe_f16:
        if kind == ADAM_UPDATE:
            fe_adam_row_f16(w, s, s2, g, D, <float>h.lr, <float>h.beta1, <float>h.beta2, <float>h.eps,
                            <float>h.inv_bias1, <float>h.inv_bias2)
        else:
            fe_adagrad_row_f16(w, s, g, D, <float>h.lr, <float>h.eps)
    elif elem_t is fe_bf16:
        if kind == ADAM_UPDATE:
            fe_adam_row_bf16(w, s, s2, g, D, <float>h.lr, <float>h.beta1, <float>h.beta2, <float>h.eps,
                             <float>h.inv_bias1, <float>h.inv_bias2)
        else:
            fe_adagrad_row_bf16(w, s, g, D, <float>h.lr, <float>h.eps)


cdef inline void _elem_row(int kind, elem_t* w, elem_t* s, elem_t* s2, const elem_t* g, Py_ssize_t D,
                           Py_ssize_t S, const _Hyper* h, float* tmp) noexcept nogil:
    """One row's update on a table of elem_t; S state elements per row (D, or 1 row-wise). tmp: the
    thread's float32 scratch (used by the 16-bit types only)."""
    cdef float* ts
    if elem_t is float:
        _real_row(kind, w, s, s2, g, D, h)
    elif elem_t is double:
        _real_row(kind, w, s, s2, g, D, h)
    elif kind == SGD_UPDATE or kind == SGD_FMA_UPDATE:
        _scaled_add(w, g, D, -h.lr)
    elif kind == ADAM_UPDATE or kind == ADAGRAD_UPDATE:
        _elem_row16(kind, w, s, s2, g, D, h)
    elif D > 0:  # (a row of no columns changes nothing; staging would still rewrite a NaN state's bits)
        ts = tmp + 2 * D
        _widen_row(tmp, w, D)
        _widen_row(tmp + D, g, D)
        _widen_row(ts, s, S)
        if kind == ADAM_UPDATE:
            _widen_row(ts + S, s2, S)
        _real_row(kind, tmp, ts, ts + S, tmp + D, D, h)
        _narrow_row(w, tmp, D)
        _narrow_row(s, ts, S)
        if kind == ADAM_UPDATE:
            _narrow_row(s2, ts + S, S)


cdef inline void _prefetch_state(int kind, elem_t* w, elem_t* s, elem_t* s2, Py_ssize_t D, int64_t r) noexcept nogil:
    """Ask for the row r of weight and of the states the rule updates (row-wise: the row's one element)."""
    _prefetch_elems_write(w + r * D, 0, D)
    if kind == ADAGRAD_UPDATE or kind == ADAM_UPDATE:
        _prefetch_elems_write(s + r * D, 0, D)
    elif kind == ROWWISE_UPDATE:
        fe_prefetch_write(s + r)
    if kind == ADAM_UPDATE:
        _prefetch_elems_write(s2 + r * D, 0, D)


cdef void _update_rows(int kind, elem_t* w, elem_t* s, elem_t* s2, const elem_t* g, Py_ssize_t D,
                       Py_ssize_t S, const int64_t* rows, Py_ssize_t lo, Py_ssize_t hi, const _Hyper* h,
                       float* tmp) noexcept nogil:
    """One update of rows[lo:hi] (rows NULL: row k is row k), g holding one row per update; s, s2 the states
    (S elements per row), NULL where the rule has none."""
    cdef Py_ssize_t k, r, e, n, first = lo * D, total = (hi - lo) * D
    if (elem_t is fe_f16 or elem_t is fe_bf16) and rows == NULL and kind != ROWWISE_UPDATE:
        # every row of an elementwise rule: rows lo..hi - 1 are one run of elements, staged a span at a time
        e = 0
        while e < total:
            n = min(<Py_ssize_t>STAGE_SPAN, total - e)
            _elem_row(kind, w + first + e, NULL if s == NULL else s + first + e,
                      NULL if s2 == NULL else s2 + first + e, g + first + e, n, n, h, tmp)
            e += n
        return
    for k in range(lo, hi):
        if rows != NULL and k + PREFETCH_ROWS < hi:
            _prefetch_state(kind, w, s, s2, D, rows[k + PREFETCH_ROWS])
        r = rows[k] if rows != NULL else k
        _elem_row(kind, w + r * D, NULL if s == NULL else s + r * S, NULL if s2 == NULL else s2 + r * S,
                  g + k * D, D, S, h, tmp)


cdef void _update(int kind, elem_t* w, elem_t* s, elem_t* s2, const elem_t* g, Py_ssize_t D, Py_ssize_t S,
                  const int64_t* rows, Py_ssize_t U, const _Hyper* h, float* tmp, int nthreads,
                  int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t lo, hi, width = _stage_width(D)
    team[0] = 1
    if nthreads <= 1:
        _update_rows(kind, w, s, s2, g, D, S, rows, 0, U, h, tmp)
        return
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        lo = _part(U, k, nthreads)
        hi = _part(U, k + 1, nthreads)
        _update_rows(kind, w, s, s2, g, D, S, rows, lo, hi, h, NULL if tmp == NULL else tmp + k * width)


cdef void _update_any(int fmt, int kind, void* w, void* s, void* s2, const void* g, Py_ssize_t D, Py_ssize_t S,
                      const int64_t* rows, Py_ssize_t U, const _Hyper* h, float* tmp, int nthreads,
                      int* team) noexcept nogil:
    if fmt == FMT_F32:
        _update(kind, <float*>w, <float*>s, <float*>s2, <const float*>g, D, S, rows, U, h, tmp, nthreads, team)
    elif fmt == FMT_F64:
        _update(kind, <double*>w, <double*>s, <double*>s2, <const double*>g, D, S, rows, U, h, tmp, nthreads,
                team)
    elif fmt == FMT_F16:
        _update(kind, <fe_f16*>w, <fe_f16*>s, <fe_f16*>s2, <const fe_f16*>g, D, S, rows, U, h, tmp, nthreads,
                team)
    else:
        _update(kind, <fe_bf16*>w, <fe_bf16*>s, <fe_bf16*>s2, <const fe_bf16*>g, D, S, rows, U, h, tmp, nthreads,
                team)


cdef inline bint _half(int fmt) noexcept nogil:
    return fmt == FMT_F16 or fmt == FMT_BF16


cdef cnp.ndarray _scratch(int fmt, int nthreads, Py_ssize_t D):
    """The float32 scratch a 16-bit table's update stages its rows in (None for the others)."""
    return np.empty(nthreads * _stage_width(D), dtype=np.float32) if _half(fmt) else None


cdef inline float* _data_or_null(cnp.ndarray a):
    return NULL if a is None else <float*>cnp.PyArray_DATA(a)


cdef int _run(int kind, int fmt, cnp.ndarray w, cnp.ndarray s, cnp.ndarray s2, cnp.ndarray g, cnp.ndarray r,
              const _Hyper* h, bint always_release=False) except -1:
    """Run a checked update: threaded and without the GIL from the serial threshold on (always_release:
    without the GIL whatever its size)."""
    cdef Py_ssize_t U = _updates(r, w), D = _dim(w)
    cdef Py_ssize_t S = 1 if kind == ROWWISE_UPDATE else D
    cdef void* wp = cnp.PyArray_DATA(w)
    cdef void* sp = NULL if s is None else cnp.PyArray_DATA(s)
    cdef void* s2p = NULL if s2 is None else cnp.PyArray_DATA(s2)
    cdef const void* gp = cnp.PyArray_DATA(g)
    cdef const int64_t* rp = NULL if r is None else <const int64_t*>cnp.PyArray_DATA(r)
    cdef int nthreads = _threads_for(U * D), team
    cdef bint release = always_release or _releases(U * D)
    cdef cnp.ndarray scratch = _scratch(fmt, nthreads, D)
    cdef float* tp = _data_or_null(scratch)
    if release:
        with nogil:
            _update_any(fmt, kind, wp, sp, s2p, gp, D, S, rp, U, h, tp, nthreads, &team)
    else:
        _update_any(fmt, kind, wp, sp, s2p, gp, D, S, rp, U, h, tp, nthreads, &team)
    _record(team, release)
    return 0


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


# ---------------------------------------------------------------- entry points: updates from summed rows

cdef cnp.ndarray _weight(object weight, object _format, int* fmt):
    """The table an optimizer updates in place: 2-D, of one of the four dtypes, never cast."""
    cdef cnp.ndarray w = _any_target(weight, "weight", _format_arg(_format), fmt)
    _check_2d(w, "weight")
    return w


cdef void _adam_hyper(_Hyper* h, double lr, double beta1, double beta2, double eps, double bias1, double bias2):
    h.lr, h.eps, h.beta1, h.beta2 = lr, eps, beta1, beta2
    h.inv_bias1, h.inv_bias2 = 1.0 / bias1, 1.0 / bias2


def adam_step(weight, exp_avg, exp_avg_sq, grad, rows, double lr, double beta1, double beta2,
              double eps, double bias1, double bias2, bint check_only=False, *, _format=None):
    """One Adam update in place, fused per element: m, v move towards g, w by the bias-corrected ratio
    ``lr * (m / bias1) / (sqrt(v / bias2) + eps)``. rows None updates every row (grad is (V, D)), else
    only rows (sorted distinct int64, grad is (len(rows), D)). float32: in float32, hyperparameters
    rounded to it; float64: in float64; float16/bfloat16: in float32, each stored element (w, m, v)
    rounded once. exp_avg, exp_avg_sq and grad have weight's dtype. check_only: run every check, write
    nothing (an optimizer checks all of its parameters before it moves any)."""
    cdef int fmt
    cdef cnp.ndarray w = _weight(weight, _format, &fmt)
    cdef cnp.ndarray m = _target_like(exp_avg, "exp_avg", w, "weight")
    cdef cnp.ndarray v = _target_like(exp_avg_sq, "exp_avg_sq", w, "weight")
    cdef cnp.ndarray g = _input_like(grad, "grad", w, "weight")
    _check_like(m, "exp_avg", w)
    _check_like(v, "exp_avg_sq", w)
    cdef cnp.ndarray r = _checked_rows(rows, _rows(w))
    _check_grad(g, _updates(r, w), _dim(w))
    _no_overlap(w, "weight", (m, v, grad, rows), ("exp_avg", "exp_avg_sq", "grad", "rows"))
    _no_overlap(m, "exp_avg", (v, grad, rows), ("exp_avg_sq", "grad", "rows"))
    _no_overlap(v, "exp_avg_sq", (grad, rows), ("grad", "rows"))
    if check_only:
        return
    cdef _Hyper h
    _adam_hyper(&h, lr, beta1, beta2, eps, bias1, bias2)
    # an optimizer step is never small enough for the GIL release to matter
    _run(ADAM_UPDATE, fmt, w, m, v, g, r, &h, True)


def sgd_step(weight, grad, rows, double lr, bint check_only=False, bint fma=False, *, _format=None):
    """``weight[rows] -= lr * grad`` in place. float32: each element becomes ``w - (lr * g)`` with lr
    rounded to float32 (numpy's ``w -= np.float32(lr) * g``, bit for bit), or with fma=True
    ``fma(-lr, g, w)``, rounded once (torch's ``w.add_(g, alpha=-lr)``, bit for bit); float64 the same
    in float64. float16/bfloat16 (fma either way): torch's ``w.add_(g, alpha=-lr)``, -lr rounded to the
    type and ``w + (-lr) * g`` formed in float32, rounded once. rows None updates every row (grad is
    (V, D)), else only rows (sorted distinct int64, grad is (len(rows), D)); grad has weight's dtype.
    check_only: run every check, write nothing."""
    cdef int fmt
    cdef cnp.ndarray w = _weight(weight, _format, &fmt)
    cdef cnp.ndarray g = _input_like(grad, "grad", w, "weight")
    cdef cnp.ndarray r = _checked_rows(rows, _rows(w))
    _check_grad(g, _updates(r, w), _dim(w))
    _no_overlap(w, "weight", (grad, rows), ("grad", "rows"))
    cdef _Hyper h
    h.lr = lr
    if not check_only:
        _run(SGD_FMA_UPDATE if fma else SGD_UPDATE, fmt, w, None, None, g, r, &h)


def sgd_scatter(weight, ids, grad_out, double lr, bint fma=False, bint check_only=False, *, _format=None):
    """SGD straight from a lookup's gradient, with no coalesce: ``weight[ids[i]] -= lr * grad_out[i]``
    in place, one lookup after another in the row-major order of ids (so a repeated id moves its row
    once per occurrence, as torch's SGD does with an uncoalesced sparse gradient). Each element is
    rounded as sgd_step rounds it (float32, float64: numpy's rounding, or torch's with fma=True; the
    16-bit types: torch's). ids: int32/int64 of any shape; grad_out: weight's dtype, of shape
    ids.shape + (D,). Checked as scatter_add is; bitwise the same for every thread count. check_only:
    run every check, write nothing (a layer with two tables checks both before either moves)."""
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    _scatter_fmt(weight, ids, grad_out, "weight", ROW_SGD_FMA if fma else ROW_SGD, lr, check_only,
                 _format_arg(_format))


def adagrad_step(weight, state_sum, grad, rows, double clr, double eps, bint check_only=False, *,
                 _format=None):
    """One Adagrad update in place, fused per element: ``state_sum += g * g``, then
    ``w -= (clr * g) / (sqrt(state_sum) + eps)``, for every row (rows None, grad (V, D)) or only rows
    (sorted distinct int64, grad (len(rows), D)); other rows keep weight and state_sum. float32: in
    float32 (clr and eps rounded to it); float64: in float64; float16/bfloat16: in float32, each stored
    element rounded once. state_sum and grad have weight's dtype. clr is the decayed learning rate of
    this step (the caller applies lr_decay, and weight decay, which torch allows only for dense
    gradients). check_only: run every check, write nothing."""
    cdef int fmt
    cdef cnp.ndarray w = _weight(weight, _format, &fmt)
    cdef cnp.ndarray s = _target_like(state_sum, "state_sum", w, "weight")
    cdef cnp.ndarray g = _input_like(grad, "grad", w, "weight")
    _check_like(s, "state_sum", w)
    cdef cnp.ndarray r = _checked_rows(rows, _rows(w))
    _check_grad(g, _updates(r, w), _dim(w))
    _no_overlap(w, "weight", (s, grad, rows), ("state_sum", "grad", "rows"))
    _no_overlap(s, "state_sum", (grad, rows), ("grad", "rows"))
    cdef _Hyper h
    h.lr, h.eps = clr, eps
    if not check_only:
        _run(ADAGRAD_UPDATE, fmt, w, s, None, g, r, &h)


cdef int _check_row_state(cnp.ndarray s, cnp.ndarray w) except -1:
    """Row-wise state: one accumulator per row of weight."""
    if _shape(s) != (_rows(w),):
        raise ValueError(f"state_sum must have shape (weight.shape[0],) = {(_rows(w),)}, got "
                         f"state_sum.shape={_shape(s)}")
    return 0


def rowwise_adagrad_step(weight, state_sum, grad, rows, double lr, double eps, bint check_only=False, *,
                         _format=None):
    """One row-wise Adagrad update in place: for each updated row r, with g its gradient row,
    ``state_sum[r] += (sum of g[d]**2 in column order) / D``, then
    ``w[r] -= (lr * g) / (sqrt(state_sum[r]) + eps)``. state_sum is (V,): one accumulator per row, of
    weight's dtype. float32: in float32; float64: in float64; float16/bfloat16: in float32, each stored
    element rounded once. rows None updates every row (grad (V, D)), else only rows (sorted distinct
    int64, grad (len(rows), D)). With D = 0 nothing changes (no mean of no columns). check_only: run
    every check, write nothing."""
    cdef int fmt
    cdef cnp.ndarray w = _weight(weight, _format, &fmt)
    cdef cnp.ndarray s = _target_like(state_sum, "state_sum", w, "weight")
    cdef cnp.ndarray g = _input_like(grad, "grad", w, "weight")
    _check_row_state(s, w)
    cdef cnp.ndarray r = _checked_rows(rows, _rows(w))
    _check_grad(g, _updates(r, w), _dim(w))
    _no_overlap(w, "weight", (s, grad, rows), ("state_sum", "grad", "rows"))
    _no_overlap(s, "state_sum", (grad, rows), ("grad", "rows"))
    cdef _Hyper h
    h.lr, h.eps = lr, eps
    if not check_only:
        _run(ROWWISE_UPDATE, fmt, w, s, None, g, r, &h)


# ---------------------------------------------------------------- coalesce and update in one pass

# The fused rules and the drop-in optimizers get a lookup's gradient as (ids, grad_out): one row per
# lookup. Adagrad, row-wise Adagrad and Adam update a row once per step with its summed gradient, which
# coalesce + *_step computes by writing the (U, D) sums and reading them back. The *_scatter kernels
# below group the lookups by row instead (a stable counting sort of the slots coalesce computes) and sum
# each row's gradient into a buffer of one row, which the update reads from L1: the same adds in the same
# order (0 + the first lookup's row, then the others in ids order; a 16-bit table's sums in float32,
# rounded to the type once, as coalesce rounds them), so the same bits, without the sums' round trip
# through memory. Rows are distinct, so threads own rows and the bits do not depend on their count.


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


cdef inline void _sum_first(real_t* acc, const real_t* row, Py_ssize_t D) noexcept nogil:
    if real_t is float:
        fe_first_into(acc, row, D)
    else:
        fe_first_into_f64(acc, row, D)


cdef inline void _sum_add(real_t* acc, const real_t* row, Py_ssize_t D) noexcept nogil:
    if real_t is float:
        fe_add_into(acc, row, D)
    else:
        fe_add_into_f64(acc, row, D)


cdef void _sum_lookups(elem_t* out, const elem_t* g, Py_ssize_t D, const int64_t* order, Py_ssize_t k0,
                       Py_ssize_t k1, Py_ssize_t end, float* tmp) noexcept nogil:
    """out = 0 + g[order[k0]] + ... + g[order[k1 - 1]] (rows of D), in that order: in the table's type,
    or for a 16-bit table in float32 (tmp: a widened lookup, then the sum), rounded to the type once."""
    cdef Py_ssize_t k
    cdef float* wide = tmp + 4 * D + STAGE_EXTRA
    cdef float* total = wide + D
    for k in range(k0, k1):
        if k + PREFETCH_ROWS < end:
            _prefetch_elems(g + order[k + PREFETCH_ROWS] * D, D)
        if elem_t is float or elem_t is double:
            if k == k0:
                _sum_first(out, g + order[k] * D, D)
            else:
                _sum_add(out, g + order[k] * D, D)
        else:
            _widen_row(wide, g + order[k] * D, D)
            if k == k0:
                fe_first_into(total, wide, D)
            else:
                fe_add_into(total, wide, D)
    if elem_t is fe_f16 or elem_t is fe_bf16:
        _narrow_row(out, total, D)


cdef void _grouped_rows(int kind, elem_t* w, elem_t* s, elem_t* s2, const elem_t* g, Py_ssize_t D,
                        Py_ssize_t S, const int64_t* rows, const int64_t* start, const int64_t* order,
                        Py_ssize_t lo, Py_ssize_t hi, int64_t skip, elem_t* acc, float* tmp,
                        const _Hyper* h) noexcept nogil:
    """Rows rows[lo:hi], each summed into acc (one row) from its lookups and updated: Adagrad (s the
    sum of squares), row-wise Adagrad (s one element per row) or Adam (s, s2 the moments). Row skip moves
    nothing."""
    cdef Py_ssize_t u, r, end = start[hi]
    for u in range(lo, hi):
        if u + PREFETCH_ROWS < hi:
            _prefetch_state(kind, w, s, s2, D, rows[u + PREFETCH_ROWS])
        r = rows[u]
        if r == skip or start[u] == start[u + 1]:
            continue
        _sum_lookups(acc, g, D, order, start[u], start[u + 1], end, tmp)
        _elem_row(kind, w + r * D, s + r * S, NULL if s2 == NULL else s2 + r * S, acc, D, S, h, tmp)


cdef void _grouped_update(int kind, elem_t* w, elem_t* s, elem_t* s2, const elem_t* g, Py_ssize_t D,
                          Py_ssize_t S, const int64_t* rows, Py_ssize_t U, const int64_t* slots, Py_ssize_t N,
                          int64_t* start, int64_t* order, int64_t skip, elem_t* acc, float* tmp,
                          const _Hyper* h, int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t lo, hi, width = D if D > 0 else 1, stage = _stage_width(D)
    _group_lookups(slots, N, U, start, order)
    team[0] = 1
    if nthreads <= 1:
        _grouped_rows(kind, w, s, s2, g, D, S, rows, start, order, 0, U, skip, acc, tmp, h)
        return
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        lo = _part(U, k, nthreads)
        hi = _part(U, k + 1, nthreads)
        _grouped_rows(kind, w, s, s2, g, D, S, rows, start, order, lo, hi, skip, acc + k * width,
                      NULL if tmp == NULL else tmp + k * stage, h)


cdef void _grouped_any(int fmt, int kind, void* w, void* s, void* s2, const void* g, Py_ssize_t D,
                       Py_ssize_t S, const int64_t* rows, Py_ssize_t U, const int64_t* slots, Py_ssize_t N,
                       int64_t* start, int64_t* order, int64_t skip, void* acc, float* tmp, const _Hyper* h,
                       int nthreads, int* team) noexcept nogil:
    if fmt == FMT_F32:
        _grouped_update(kind, <float*>w, <float*>s, <float*>s2, <const float*>g, D, S, rows, U, slots, N, start,
                        order, skip, <float*>acc, tmp, h, nthreads, team)
    elif fmt == FMT_F64:
        _grouped_update(kind, <double*>w, <double*>s, <double*>s2, <const double*>g, D, S, rows, U, slots, N,
                        start, order, skip, <double*>acc, tmp, h, nthreads, team)
    elif fmt == FMT_F16:
        _grouped_update(kind, <fe_f16*>w, <fe_f16*>s, <fe_f16*>s2, <const fe_f16*>g, D, S, rows, U, slots, N,
                        start, order, skip, <fe_f16*>acc, tmp, h, nthreads, team)
    else:
        _grouped_update(kind, <fe_bf16*>w, <fe_bf16*>s, <fe_bf16*>s2, <const fe_bf16*>g, D, S, rows, U, slots,
                        N, start, order, skip, <fe_bf16*>acc, tmp, h, nthreads, team)


cdef int _grouped(int kind, int fmt, cnp.ndarray w, cnp.ndarray s, cnp.ndarray s2, tuple names, object ids,
                  object grad_out, int64_t skip, _Hyper* h, bint check_only) except -1:
    """The checks and the run of the *_scatter kernels: w (and its states s, s2, already checked against
    w and each other) updated from ids and grad_out."""
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef cnp.ndarray src = _input_like(grad_out, "grad_out", w, "weight")
    cdef Py_ssize_t V = _rows(w), D = _dim(w), N = cnp.PyArray_SIZE(idx)
    cdef Py_ssize_t S = 1 if kind == ROWWISE_UPDATE else D
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
    cdef cnp.ndarray acc = _fresh(nthreads * max(D, 1), w.dtype)
    cdef cnp.ndarray scratch = _scratch(fmt, nthreads, D)
    cdef void* wp = cnp.PyArray_DATA(w)
    cdef void* sp = cnp.PyArray_DATA(s)
    cdef void* s2p = NULL if s2 is None else cnp.PyArray_DATA(s2)
    cdef const void* gp = cnp.PyArray_DATA(src)
    cdef const int64_t* rp = <const int64_t*>cnp.PyArray_DATA(rows_arr)
    cdef const int64_t* slp = <const int64_t*>cnp.PyArray_DATA(slots_arr)
    cdef int64_t* stp = <int64_t*>cnp.PyArray_DATA(start)
    cdef int64_t* op = <int64_t*>cnp.PyArray_DATA(order)
    cdef void* ap = cnp.PyArray_DATA(acc)
    cdef float* tp = _data_or_null(scratch)
    if release:
        with nogil:
            _grouped_any(fmt, kind, wp, sp, s2p, gp, D, S, rp, U, slp, N, stp, op, skip, ap, tp, h, nthreads, &team)
    else:
        _grouped_any(fmt, kind, wp, sp, s2p, gp, D, S, rp, U, slp, N, stp, op, skip, ap, tp, h, nthreads, &team)
    _record(team, release)
    return 0


def adagrad_scatter(weight, state_sum, ids, grad_out, double clr, double eps, int64_t skip_row=-1,
                    bint check_only=False, *, _format=None):
    """Adagrad straight from a lookup's gradient: ``rows, values = coalesce(ids, grad_out)``, then
    ``adagrad_step(weight, state_sum, values, rows, clr, eps)`` on every row but skip_row (-1: none), bit
    for bit and for every thread count, without writing the summed rows out. ids: int32/int64 of any
    shape, in [0, len(weight)); grad_out: weight's dtype, of shape ids.shape + (D,). check_only: run
    every check, write nothing."""
    cdef int fmt
    cdef cnp.ndarray w = _weight(weight, _format, &fmt)
    cdef cnp.ndarray s = _target_like(state_sum, "state_sum", w, "weight")
    _check_like(s, "state_sum", w)
    _no_overlap(w, "weight", (state_sum,), ("state_sum",))
    cdef _Hyper h
    h.lr, h.eps = clr, eps
    _grouped(ADAGRAD_UPDATE, fmt, w, s, None, ("weight", "state_sum", None), ids, grad_out, skip_row, &h,
             check_only)


def rowwise_adagrad_scatter(weight, state_sum, ids, grad_out, double lr, double eps, int64_t skip_row=-1,
                            bint check_only=False, *, _format=None):
    """Row-wise Adagrad straight from a lookup's gradient: ``coalesce`` then ``rowwise_adagrad_step``
    (state_sum one element per row, weight's dtype) on every row but skip_row (-1: none), bit for bit,
    without writing the summed rows out. Arguments as adagrad_scatter's."""
    cdef int fmt
    cdef cnp.ndarray w = _weight(weight, _format, &fmt)
    cdef cnp.ndarray s = _target_like(state_sum, "state_sum", w, "weight")
    _check_row_state(s, w)
    _no_overlap(w, "weight", (state_sum,), ("state_sum",))
    cdef _Hyper h
    h.lr, h.eps = lr, eps
    _grouped(ROWWISE_UPDATE, fmt, w, s, None, ("weight", "state_sum", None), ids, grad_out, skip_row, &h,
             check_only)


def adam_scatter(weight, exp_avg, exp_avg_sq, ids, grad_out, double lr, double beta1, double beta2,
                 double eps, double bias1, double bias2, int64_t skip_row=-1, bint check_only=False, *,
                 _format=None):
    """Adam straight from a lookup's gradient: ``coalesce`` then ``adam_step`` (the rows' moments and
    weights, bias corrections bias1 and bias2) on every row but skip_row (-1: none), bit for bit,
    without writing the summed rows out. Arguments as adagrad_scatter's."""
    cdef int fmt
    cdef cnp.ndarray w = _weight(weight, _format, &fmt)
    cdef cnp.ndarray m = _target_like(exp_avg, "exp_avg", w, "weight")
    cdef cnp.ndarray v = _target_like(exp_avg_sq, "exp_avg_sq", w, "weight")
    _check_like(m, "exp_avg", w)
    _check_like(v, "exp_avg_sq", w)
    _no_overlap(w, "weight", (exp_avg, exp_avg_sq), ("exp_avg", "exp_avg_sq"))
    _no_overlap(m, "exp_avg", (exp_avg_sq,), ("exp_avg_sq",))
    cdef _Hyper h
    _adam_hyper(&h, lr, beta1, beta2, eps, bias1, bias2)
    _grouped(ADAM_UPDATE, fmt, w, m, v, ("weight", "exp_avg", "exp_avg_sq"), ids, grad_out, skip_row, &h,
             check_only)
