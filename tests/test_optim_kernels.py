"""The SGD, Adagrad and row-wise Adagrad kernels and optimizers against float32 transcriptions written here.

The transcriptions never call fastembed. Each is written in numpy float32, one IEEE operation at a time
in the order the kernel documents, so results are compared bitwise (the build turns FMA contraction
off, and numpy rounds each float32 operation as C does):

- SGD:      ``w = w - (f32(lr) * g)``: also what numpy's ``w[rows] -= np.float32(lr) * values`` does,
            which fe.optim.SGD ran before it had a kernel.
- Adagrad:  ``s = s + g * g``; ``w = w - (f32(clr) * g) / (sqrt(s) + f32(eps))``, torch's order for a
            dense gradient (its addcmul_ and addcdiv_); with ``clr = lr / (1 + (t - 1) * lr_decay)``
            in double and ``g = g + f32(weight_decay) * w`` for a dense gradient.
- row-wise: per row, ``acc = 0; acc = acc + g[d] * g[d]`` for d in column order,
            ``G = s[r] + acc / f32(D)``, ``w[r] = w[r] - (f32(lr) * g) / (sqrt(G) + f32(eps))``.

Two more oracles keep the transcriptions honest: the documented formulas in float64 pure Python
(to float32 rounding), and torch.optim.Adagrad itself when torch is installed.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastembed as fe
from fastembed import _kernels
from fastembed.optim import SGD, Adagrad, RowWiseAdagrad
from _helpers import (FAST, FEW, Snapshot, arrange, assert_bitwise, num_threads, serial_elements,
                      two_thread_team)

f32 = np.float32


# ---------------------------------------------------------------- the transcriptions

def _at(rows):
    return slice(None) if rows is None else np.asarray(rows, np.int64)


def sgd_ref(w, g, rows, lr):
    """w after sgd_step (a new array)."""
    w = w.copy()
    at = _at(rows)
    with np.errstate(all="ignore"):
        w[at] = w[at] - f32(lr) * g
    return w


def adagrad_ref(w, s, g, rows, clr, eps):
    """(w, s) after adagrad_step (new arrays)."""
    w, s = w.copy(), s.copy()
    at = _at(rows)
    with np.errstate(all="ignore"):
        s_new = s[at] + g * g
        s[at] = s_new
        w[at] = w[at] - (f32(clr) * g) / (np.sqrt(s_new) + f32(eps))
    return w, s


def rowwise_ref(w, s, g, rows, lr, eps):
    """(w, s) after rowwise_adagrad_step (new arrays): the sum runs over columns, one row per lane."""
    w, s = w.copy(), s.copy()
    D = w.shape[1]
    if D == 0:
        return w, s
    at = _at(rows)
    with np.errstate(all="ignore"):
        acc = np.zeros(g.shape[0], np.float32)
        for d in range(D):
            acc = acc + g[:, d] * g[:, d]
        G = s[at] + acc / f32(D)
        s[at] = G
        w[at] = w[at] - (f32(lr) * g) / (np.sqrt(G) + f32(eps))[:, None]
    return w, s


def documented_rowwise(w, s, g, lr, eps):
    """RowWiseAdagrad's docstring in float64 pure Python, one row (lists, updated in place)."""
    s[0] += sum(x * x for x in g) / len(g)
    for d in range(len(w)):
        w[d] -= lr * g[d] / (math.sqrt(s[0]) + eps)


def documented_adagrad(w, s, g, clr, eps):
    for d in range(len(w)):
        s[d] += g[d] * g[d]
        w[d] -= clr * g[d] / (math.sqrt(s[d]) + eps)


def test_the_float32_transcriptions_are_the_documented_formulas():
    """Gradients from 1e-6 to 30 against eps = 1e-10 and 0.5: eps inside the sqrt, a mean divided by D
    twice or not at all, would differ by far more than float32 rounding."""
    rng = np.random.default_rng(0)
    for eps in (1e-10, 0.5):
        w = rng.standard_normal((4, 5)).astype(np.float32)
        s, srow = np.zeros_like(w), np.zeros(4, np.float32)
        w_a, w_r = w.copy(), w.copy()
        a64 = [w[i].astype(np.float64).tolist() for i in range(4)]
        r64 = [w[i].astype(np.float64).tolist() for i in range(4)]
        as64, rs64 = [[0.0] * 5 for _ in range(4)], [[0.0] for _ in range(4)]
        for t in range(1, 5):
            g = (rng.standard_normal((4, 5)) * np.array([1e-6, 1e-3, 1.0, 30.0])[:, None]).astype(np.float32)
            clr = 0.05 / (1 + (t - 1) * 0.1)
            w_a, s = adagrad_ref(w_a, s, g, None, clr, eps)
            w_r, srow = rowwise_ref(w_r, srow, g, None, 0.05, eps)
            for i in range(4):
                gi = g[i].astype(np.float64).tolist()
                documented_adagrad(a64[i], as64[i], gi, clr, eps)
                documented_rowwise(r64[i], rs64[i], gi, 0.05, eps)
            np.testing.assert_allclose(s, as64, rtol=2e-6, atol=0)
            np.testing.assert_allclose(w_a, a64, rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(srow, [x[0] for x in rs64], rtol=2e-6, atol=0)
            np.testing.assert_allclose(w_r, r64, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- the kernels, at random shapes

def assert_ran(threaded):
    if threaded:
        assert _kernels._last_call_released_gil(), "the threaded path was not taken"
        assert _kernels._last_call_threads() == two_thread_team(), (
            f"ran with {_kernels._last_call_threads()} thread(s), expected {two_thread_team()}")
    else:
        assert _kernels._last_call_threads() == 1 and not _kernels._last_call_released_gil()


@st.composite
def problems(draw):
    """(w, g, rows, rng): V and D from 0 (D = 0, no rows), rows None (dense) or a sorted distinct
    int64 subset (empty, one row, every row, any)."""
    V, D = draw(st.integers(0, 12)), draw(st.one_of(st.integers(0, 40), st.just(0), st.just(1)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    form = draw(st.sampled_from(("dense", "any", "empty", "one", "all")))
    if form == "dense":
        rows = None
    elif form == "empty" or V == 0:
        rows = np.zeros(0, np.int64)
    elif form == "one":
        rows = np.array([rng.integers(V)], np.int64)
    elif form == "all":
        rows = np.arange(V, dtype=np.int64)
    else:
        rows = np.flatnonzero(rng.random(V) < 0.5).astype(np.int64)
    U = V if rows is None else len(rows)
    w = rng.standard_normal((V, D)).astype(np.float32)
    scale = 10.0 ** rng.integers(-6, 2, size=(U, 1))  # rows whose g^2 is near eps, and large ones
    g = (rng.standard_normal((U, D)) * scale).astype(np.float32)
    return w, g, rows, rng


def _threads(threaded):
    import contextlib
    if not threaded:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(serial_elements(0))
    stack.enter_context(num_threads(2))
    return stack


@FAST
@given(problem=problems(), lr=st.sampled_from([0.1, 0.01, 3.0, 0.0, 1e-30]), threaded=st.booleans())
def test_sgd_step_is_the_old_numpy_formula(problem, lr, threaded):
    """Bit for bit what fe.optim.SGD computed before the kernel: numpy's fancy-indexed
    ``w[rows] -= np.float32(lr) * values`` (``w -= np.float32(lr) * g`` for a dense gradient)."""
    w0, g, rows, _ = problem
    old = w0.copy()
    if rows is None:
        old -= np.float32(lr) * g
    else:
        old[rows] -= np.float32(lr) * g
    assert_bitwise(sgd_ref(w0, g, rows, lr), old)
    w = w0.copy()
    with _threads(threaded):
        _kernels.sgd_step(w, g, rows, lr)
        assert_ran(threaded)
    assert_bitwise(w, old)


@FAST
@given(problem=problems(), clr=st.sampled_from([0.01, 0.5, 1e-3]), eps=st.sampled_from([1e-10, 0.0, 0.3]),
       threaded=st.booleans())
def test_adagrad_step_matches_the_transcription(problem, clr, eps, threaded):
    """Two steps from a nonzero state_sum; rows not given keep weight and state_sum bit for bit."""
    w0, g, rows, rng = problem
    s0 = (0.1 * rng.random(w0.shape)).astype(np.float32)
    w, s = w0.copy(), s0.copy()
    ew, es = w0, s0
    with _threads(threaded):
        for _ in range(2):
            _kernels.adagrad_step(w, s, g, rows, clr, eps)
            assert_ran(threaded)
            ew, es = adagrad_ref(ew, es, g, rows, clr, eps)
            assert_bitwise(w, ew)
            assert_bitwise(s, es)
    if rows is not None:
        untouched = np.setdiff1d(np.arange(len(w0)), rows)
        assert_bitwise(w[untouched], w0[untouched])
        assert_bitwise(s[untouched], s0[untouched])


@FAST
@given(problem=problems(), lr=st.sampled_from([0.01, 0.5]), eps=st.sampled_from([1e-10, 0.3]),
       threaded=st.booleans())
def test_rowwise_adagrad_step_matches_the_transcription(problem, lr, eps, threaded):
    w0, g, rows, rng = problem
    s0 = (0.1 * rng.random(len(w0))).astype(np.float32)
    w, s = w0.copy(), s0.copy()
    ew, es = w0, s0
    with _threads(threaded):
        for _ in range(2):
            _kernels.rowwise_adagrad_step(w, s, g, rows, lr, eps)
            assert_ran(threaded)
            ew, es = rowwise_ref(ew, es, g, rows, lr, eps)
            assert_bitwise(w, ew)
            assert_bitwise(s, es)
    if w0.shape[1] == 0:
        assert_bitwise(s, s0)  # no columns, no mean: the accumulators stay
    if rows is not None:
        untouched = np.setdiff1d(np.arange(len(w0)), rows)
        assert_bitwise(w[untouched], w0[untouched])
        assert_bitwise(s[untouched], s0[untouched])


def test_rowwise_mean_is_over_the_columns_in_column_order():
    """Squares 1e8, 4, 4, 4, 4: in column order each 4 is lost to rounding (1e8 + 4 is a tie that
    rounds back to 1e8), while any other order (pairwise, vectorised, reversed) first adds the 4s up to
    16 and keeps them: 1e8 + 16. The mean divides that sum by D = 5, once."""
    g = np.array([[1e4, 2.0, 2.0, 2.0, 2.0]], np.float32)
    w, s = np.zeros((1, 5), np.float32), np.zeros(1, np.float32)
    _kernels.rowwise_adagrad_step(w, s, g, None, 1.0, 0.0)
    assert f32(f32(1e8) + f32(4)) == f32(1e8) and f32(f32(1e8) + f32(16)) != f32(1e8)
    assert s[0] == f32(1e8) / f32(5)
    assert_bitwise(w, -(g / np.sqrt(s[0])))


def test_kernels_large_enough_to_thread_by_default():
    """At the default threshold, U * D = 32768 runs threaded without the GIL, one element fewer does not."""
    rng = np.random.default_rng(1)
    V, D = 2048, 32
    for U, threaded in ((32768 // D, True), (32768 // D - 1, False)):
        rows = np.sort(rng.choice(V, U, replace=False)).astype(np.int64)
        g = rng.standard_normal((U, D)).astype(np.float32)
        w0 = rng.standard_normal((V, D)).astype(np.float32)
        with num_threads(2):
            w = w0.copy()
            _kernels.sgd_step(w, g, rows, 0.1)
            assert _kernels._last_call_released_gil() == threaded
            assert _kernels._last_call_threads() == (two_thread_team() if threaded else 1)
            assert_bitwise(w, sgd_ref(w0, g, rows, 0.1))
            w, s = w0.copy(), np.zeros((V, D), np.float32)
            _kernels.adagrad_step(w, s, g, rows, 0.1, 1e-10)
            assert _kernels._last_call_released_gil() == threaded
            assert_bitwise(w, adagrad_ref(w0, np.zeros((V, D), np.float32), g, rows, 0.1, 1e-10)[0])
            w, s = w0.copy(), np.zeros(V, np.float32)
            _kernels.rowwise_adagrad_step(w, s, g, rows, 0.1, 1e-10)
            assert _kernels._last_call_released_gil() == threaded
            assert_bitwise(w, rowwise_ref(w0, np.zeros(V, np.float32), g, rows, 0.1, 1e-10)[0])


# ---------------------------------------------------------------- the kernels' checks: raise, write nothing

KERNEL_NAMES = ("sgd", "adagrad", "rowwise")


def _call(kind, w, s, g, rows, check_only=False):
    if kind == "sgd":
        return _kernels.sgd_step(w, g, rows, 0.1, check_only)
    if kind == "adagrad":
        return _kernels.adagrad_step(w, s, g, rows, 0.1, 1e-10, check_only)
    return _kernels.rowwise_adagrad_step(w, s, g, rows, 0.1, 1e-10, check_only)


def _good(kind, V=6, D=4):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((V, D)).astype(np.float32)
    s = np.full((V, D) if kind == "adagrad" else (V,), 0.5, np.float32)
    rows = np.array([1, 3, 4], np.int64)
    g = rng.standard_normal((3, D)).astype(np.float32)
    return w, s, g, rows


def _bad_inputs(kind):
    """(name, mutate(w, s, g, rows) -> (w, s, g, rows), error)."""
    out = [
        ("weight_float64", lambda w, s, g, r: (w.astype(np.float64), s, g, r), TypeError),
        ("weight_readonly", lambda w, s, g, r: (arrange(w, "readonly"), s, g, r), ValueError),
        ("weight_fortran", lambda w, s, g, r: (arrange(w, "fortran"), s, g, r), ValueError),
        ("weight_misaligned", lambda w, s, g, r: (arrange(w, "misaligned"), s, g, r), ValueError),
        ("weight_1d", lambda w, s, g, r: (w[0], s, g, r), ValueError),
        ("grad_float64", lambda w, s, g, r: (w, s, g.astype(np.float64), r), TypeError),
        ("grad_bigendian", lambda w, s, g, r: (w, s, arrange(g, "bigendian"), r), TypeError),
        ("grad_one_row_short", lambda w, s, g, r: (w, s, g[:-1], r), ValueError),
        ("grad_wrong_dim", lambda w, s, g, r: (w, s, np.ones((3, 5), np.float32), r), ValueError),
        ("grad_dense_for_rows", lambda w, s, g, r: (w, s, np.ones(w.shape, np.float32), r), ValueError),
        ("dense_grad_wrong_shape", lambda w, s, g, r: (w, s, g, None), ValueError),
        ("rows_int32", lambda w, s, g, r: (w, s, g, r.astype(np.int32)), TypeError),
        ("rows_2d", lambda w, s, g, r: (w, s, g, r[None]), TypeError),
        ("rows_list", lambda w, s, g, r: (w, s, g, r.tolist()), TypeError),
        ("rows_repeated", lambda w, s, g, r: (w, s, g, np.array([1, 3, 3], np.int64)), ValueError),
        ("rows_unsorted", lambda w, s, g, r: (w, s, g, np.array([3, 1, 4], np.int64)), ValueError),
        ("rows_past_the_end", lambda w, s, g, r: (w, s, g, np.array([1, 3, 6], np.int64)), IndexError),
        ("rows_negative", lambda w, s, g, r: (w, s, g, np.array([-1, 3, 4], np.int64)), IndexError),
        ("grad_is_weight", lambda w, s, g, r: (w, s, w, None), ValueError),
        ("grad_inside_weight", lambda w, s, g, r: (w, s, w[2:5], r), ValueError),
        ("rows_inside_weight", lambda w, s, g, r: _rows_in(w, s, g), ValueError),
    ]
    if kind != "sgd":
        out += [
            ("state_float64", lambda w, s, g, r: (w, s.astype(np.float64), g, r), TypeError),
            ("state_readonly", lambda w, s, g, r: (w, arrange(s, "readonly"), g, r), ValueError),
            ("state_strided", lambda w, s, g, r: (w, arrange(s, "strided"), g, r), ValueError),
            ("state_wrong_shape", lambda w, s, g, r: (w, s[:-1], g, r), ValueError),
            ("state_is_weight_memory", lambda w, s, g, r: (w, w.reshape(-1)[:s.size].reshape(s.shape), g, r),
             ValueError),
        ]
    if kind == "adagrad":  # (a row-wise state_sum of V floats is too small to hold a gradient)
        out += [("grad_inside_state", lambda w, s, g, r: (w, s, s.reshape(-1)[:g.size].reshape(g.shape), r),
                 ValueError)]
    if kind == "rowwise":
        out += [("state_per_element", lambda w, s, g, r: (w, np.zeros(w.shape, np.float32), g, r), ValueError)]
    return out


def _rows_in(w, s, g):
    """rows whose bytes lie inside weight (valid ids 0, 1, 2 written through an int64 view of row 0)."""
    ints = w[0].view(np.int64)  # D = 4 floats: two int64
    ints[:] = [0, 2]
    return w, s, g[:2], ints


@pytest.mark.parametrize("kind,name,mutate,error",
                         [(k,) + b for k in KERNEL_NAMES for b in _bad_inputs(k)],
                         ids=[f"{k}-{b[0]}" for k in KERNEL_NAMES for b in _bad_inputs(k)])
def test_a_kernel_refuses_bad_input_and_writes_nothing(kind, name, mutate, error):
    """Every bad input raises with weight, state_sum, grad and rows bit for bit as they were, with the
    threaded path reachable (threshold 0), and with check_only too; the good inputs pass."""
    w, s, g, rows = _good(kind)
    _call(kind, w.copy(), s.copy(), g, rows, check_only=True)
    w, s, g, rows = mutate(w, s, g, rows)
    snap = Snapshot(w=w, s=s, g=g, rows=rows)
    for check_only in (True, False):
        with serial_elements(0), pytest.raises(error):
            _call(kind, w, s, g, rows, check_only)
        snap.assert_unchanged()


@pytest.mark.parametrize("kind", KERNEL_NAMES)
def test_check_only_writes_nothing(kind):
    w, s, g, rows = _good(kind)
    snap = Snapshot(w=w, s=s, g=g, rows=rows)
    _call(kind, w, s, g, rows, check_only=True)
    snap.assert_unchanged()
    _call(kind, w, s, g, rows)
    assert not np.array_equal(w, snap.copies["w"][0])


@pytest.mark.parametrize("kind", KERNEL_NAMES)
def test_rows_are_read_once_the_callers_array_can_change_after(kind):
    """The kernel updates the rows it was given (rows[k], not row k) and keeps no reference to them."""
    w0, s0, g, rows = _good(kind)
    w, s = w0.copy(), s0.copy()
    _call(kind, w, s, g, rows)
    if kind == "sgd":
        expected_w = sgd_ref(w0, g, rows, 0.1)
    elif kind == "adagrad":
        expected_w, expected_s = adagrad_ref(w0, s0, g, rows, 0.1, 1e-10)
    else:
        expected_w, expected_s = rowwise_ref(w0, s0, g, rows, 0.1, 1e-10)
    assert_bitwise(w, expected_w)
    if kind != "sgd":
        assert_bitwise(s, expected_s)
    untouched = [0, 2, 5]
    assert_bitwise(w[untouched], w0[untouched])


# ---------------------------------------------------------------- the optimizer classes: models

def _copies(weights):
    return [np.array(w, np.float32, copy=True) for w in weights]


class AdagradModel:
    def __init__(self, weights, lr=0.01, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10):
        self.w = _copies(weights)
        self.lr, self.lr_decay, self.wd, self.eps = lr, lr_decay, weight_decay, eps
        self.s = [np.full_like(w, initial_accumulator_value) for w in self.w]
        self.steps = [0] * len(self.w)

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is None:
                continue
            self.steps[i] += 1
            clr = self.lr / (1 + (self.steps[i] - 1) * self.lr_decay)
            rows, values = g if isinstance(g, tuple) else (None, g)
            if self.wd:
                values = values + f32(self.wd) * self.w[i]
            self.w[i], self.s[i] = adagrad_ref(self.w[i], self.s[i], values, rows, clr, self.eps)


class RowWiseModel:
    def __init__(self, weights, lr=0.01, eps=1e-10):
        self.w, self.lr, self.eps = _copies(weights), lr, eps
        self.s = [np.zeros(len(w), np.float32) for w in self.w]

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is not None:
                rows, values = g if isinstance(g, tuple) else (None, g)
                self.w[i], self.s[i] = rowwise_ref(self.w[i], self.s[i], values, rows, self.lr, self.eps)


class SGDModel:
    def __init__(self, weights, lr):
        self.w, self.lr = _copies(weights), lr

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is not None:
                rows, values = g if isinstance(g, tuple) else (None, g)
                self.w[i] = sgd_ref(self.w[i], values, rows, self.lr)


CLASSES = {"SGD": (SGD, SGDModel), "Adagrad": (Adagrad, AdagradModel), "RowWiseAdagrad": (RowWiseAdagrad, RowWiseModel)}


def build(kind, params, **hyper):
    if kind == "SGD":
        hyper.setdefault("lr", 0.1)
    cls, model = CLASSES[kind]
    opt = cls(params, **hyper)
    return opt, model([p.weight for p in opt.params], **hyper)


def assert_state(opt, model):
    for i, p in enumerate(opt.params):
        assert_bitwise(p.weight, model.w[i])
    if hasattr(model, "s"):
        assert len(opt.state_sum) == len(model.s)
        for i in range(len(model.s)):
            assert_bitwise(opt.state_sum[i], model.s[i])
    if isinstance(model, AdagradModel):
        assert opt.steps == model.steps


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = fe.SparseGrad(*g) if isinstance(g, tuple) else g


def sparse(rng, D, rows, scale=1.0):
    rows = np.asarray(sorted(rows), np.int64)
    return rows, (rng.standard_normal((len(rows), D)) * scale).astype(np.float32)


def dense(rng, V, D, rows, scale=1.0):
    g = np.zeros((V, D), np.float32)
    g[list(rows)] = (rng.standard_normal((len(rows), D)) * scale).astype(np.float32)
    return g


ADAGRAD_SETTINGS = [
    {},
    {"lr": 0.3, "lr_decay": 0.25},
    {"lr": 0.05, "weight_decay": 0.1},
    {"initial_accumulator_value": 0.7, "eps": 0.5},
    {"lr": 0.05, "lr_decay": 1.0, "weight_decay": 0.02, "initial_accumulator_value": 0.1, "eps": 0.0},
]


@pytest.mark.parametrize("hyper", ADAGRAD_SETTINGS, ids=lambda h: ",".join(h) or "defaults")
def test_adagrad_dense_over_several_steps(hyper):
    """Three parameters, one without a gradient on some steps (its step count, hence its clr, lags)."""
    rng = np.random.default_rng(3)
    layers = [fe.Embedding(7, 3, seed=1), fe.Embedding(5, 3, seed=2), fe.Embedding(4, 3, seed=3)]
    opt, model = build("Adagrad", layers, **hyper)
    for step in range(5):
        grads = [dense(rng, 7, 3, [step % 7, 6], scale=10.0 ** -(step % 4)), None if step % 2 else
                 dense(rng, 5, 3, range(5)), dense(rng, 4, 3, [])]
        set_grads(layers, grads)
        before = [p.weight.copy() for p in layers]
        opt.step()
        model.step(grads)
        assert_state(opt, model)
        if step % 2:
            assert_bitwise(layers[1].weight, before[1])
    assert opt.steps == [5, 3, 5]


@pytest.mark.parametrize("hyper", [h for h in ADAGRAD_SETTINGS if not h.get("weight_decay")],
                         ids=lambda h: ",".join(h) or "defaults")
def test_adagrad_sparse_over_several_steps_untouched_rows_keep_everything(hyper):
    rng = np.random.default_rng(4)
    layers = [fe.Embedding(8, 4, sparse=True, seed=4), fe.Embedding(6, 4, sparse=True, seed=5)]
    opt, model = build("Adagrad", layers, **hyper)
    plan = [([0, 3, 7], [1]), ([3], None), ([], [0, 5]), ([1, 2, 3, 4], [5])]
    for rows0, rows1 in plan:
        grads = [sparse(rng, 4, rows0), None if rows1 is None else sparse(rng, 4, rows1)]
        set_grads(layers, grads)
        before = [(p.weight.copy(), s.copy()) for p, s in zip(opt.params, opt.state_sum)]
        opt.step()
        model.step(grads)
        assert_state(opt, model)
        for k, g in enumerate(grads):
            untouched = np.setdiff1d(np.arange(len(before[k][0])), [] if g is None else g[0])
            assert_bitwise(opt.params[k].weight[untouched], before[k][0][untouched])
            assert_bitwise(opt.state_sum[k][untouched], before[k][1][untouched])
    assert opt.steps == [4, 3]


@pytest.mark.parametrize("hyper", [{}, {"lr": 0.3, "eps": 0.5}, {"lr": 1.0, "eps": 0.0}],
                         ids=["defaults", "lr_eps", "eps0"])
def test_rowwise_adagrad_dense_and_sparse_over_several_steps(hyper):
    """A dense gradient touches every row (a zero row keeps its weight but for eps 0: 0 / 0);
    a sparse one only its rows."""
    rng = np.random.default_rng(5)
    layers = [fe.Embedding(7, 5, seed=6), fe.Embedding(6, 5, sparse=True, seed=7)]
    opt, model = build("RowWiseAdagrad", layers, **hyper)
    for step in range(4):
        grads = [dense(rng, 7, 5, [step, 6], scale=10.0 ** -(2 * step)), sparse(rng, 5, [[1, 4], [4], [], [0, 5]][step])]
        set_grads(layers, grads)
        before = [(p.weight.copy(), s.copy()) for p, s in zip(opt.params, opt.state_sum)]
        opt.step()
        model.step(grads)
        if hyper.get("eps", 1e-10) == 0.0:  # a zero row of a dense gradient with G still 0 is 0 / 0: NaN
            assert np.isnan(model.w[0]).any()
            for p, w in zip(opt.params, model.w):
                assert np.array_equal(np.isnan(p.weight), np.isnan(w))
                assert_bitwise(p.weight[~np.isnan(w)], w[~np.isnan(w)])
            for a, b in zip(opt.state_sum, model.s):
                assert_bitwise(a, b)
            continue
        assert_state(opt, model)
        untouched = np.setdiff1d(np.arange(6), grads[1][0])
        assert_bitwise(layers[1].weight[untouched], before[1][0][untouched])
        assert_bitwise(opt.state_sum[1][untouched], before[1][1][untouched])
        zero_rows = np.setdiff1d(np.arange(7), [step, 6])
        assert_bitwise(layers[0].weight[zero_rows], before[0][0][zero_rows])


def test_defaults_are_documented():
    layer = fe.Embedding(3, 2, seed=8)
    opt = Adagrad(layer)
    assert (opt.lr, opt.lr_decay, opt.weight_decay, opt.eps) == (0.01, 0.0, 0.0, 1e-10)
    assert_bitwise(opt.state_sum[0], np.zeros((3, 2), np.float32)) and opt.steps == [0]
    assert_bitwise(Adagrad(layer, initial_accumulator_value=0.25).state_sum[0], np.full((3, 2), 0.25, np.float32))
    opt = RowWiseAdagrad(layer)
    assert (opt.lr, opt.eps) == (0.01, 1e-10)
    assert_bitwise(opt.state_sum[0], np.zeros(3, np.float32))


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_sgd_class_is_the_old_numpy_step(sparse_grad):
    """fe.optim.SGD through the kernel: bit for bit the numpy update it made before, int32 rows too."""
    rng = np.random.default_rng(6)
    layers = [fe.Embedding(9, 6, sparse=sparse_grad, seed=9), fe.Embedding(4, 6, seed=10)]
    opt = SGD(layers, lr=0.07)
    old = [p.weight.copy() for p in layers]
    for step, ids in enumerate(([1, 8, 1, 3], [0], [], [2, 2])):
        for p in layers:
            p.zero_grad()
        layers[0](np.array(ids, np.int64))
        layers[0].backward(rng.standard_normal((len(ids), 6)).astype(np.float32))
        g1 = rng.standard_normal((4, 6)).astype(np.float32)
        layers[1].grad = g1
        g0 = layers[0].grad
        if isinstance(g0, fe.SparseGrad) and step == 3:
            layers[0].grad = g0 = fe.SparseGrad(g0.rows.astype(np.int32), g0.values)
        opt.lr = 0.07 / (step + 1)
        opt.step()
        lr = np.float32(opt.lr)
        if isinstance(g0, fe.SparseGrad):
            old[0][g0.rows] -= lr * g0.values
        else:
            old[0] -= lr * g0
        old[1] -= lr * g1
        for p, w in zip(layers, old):
            assert_bitwise(p.weight, w)


# ---------------------------------------------------------------- against torch.optim.Adagrad

TORCH_CASES = [("dense", {}), ("sparse", {}), ("dense", {"lr": 0.2, "lr_decay": 0.3, "initial_accumulator_value": 0.1}),
               ("sparse", {"lr": 0.2, "lr_decay": 0.3, "initial_accumulator_value": 0.1}),
               ("dense", {"lr": 0.1, "weight_decay": 0.05, "eps": 1e-3})]  # torch: no weight decay when sparse


@pytest.mark.parametrize("grad_kind,hyper", TORCH_CASES, ids=lambda x: x if isinstance(x, str) else ",".join(x) or "defaults")
def test_adagrad_matches_torch(grad_kind, hyper):
    """Five steps, two parameters, one skipping steps. Tolerance: each step rounds the same formula a
    few times in float32 (torch's sparse path divides g by std before it multiplies by clr, and its
    vectorised add may fuse the weight decay's multiply-add), so weights may part by a few ulps of the
    weight per step and state_sum by an ulp or two: rtol 1e-6 with atol 1e-7 (weights of order 1,
    updates of order lr) is far below what a formula error (eps in the sqrt, clr off by a step) gives."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    shapes = [(9, 5), (6, 5)]
    layers = [fe.Embedding(V, D, sparse=grad_kind == "sparse", seed=11 + k) for k, (V, D) in enumerate(shapes)]
    tparams = [torch.nn.Parameter(torch.from_numpy(p.weight.copy())) for p in layers]
    opt = Adagrad(layers, **hyper)
    topt = torch.optim.Adagrad(tparams, **hyper)
    for step in range(5):
        grads = [sparse(rng, 5, rng.choice(9, 4, replace=False), scale=10.0 ** -(step % 3)),
                 None if step in (1, 2) else sparse(rng, 5, [0, 5])]
        set_grads(layers, [g if grad_kind == "sparse" or g is None else _to_dense(g, V) for g, (V, _) in
                           zip(grads, shapes)])
        for tp, g, (V, D) in zip(tparams, grads, shapes):
            if g is None:
                tp.grad = None
            elif grad_kind == "sparse":
                tp.grad = torch.sparse_coo_tensor(torch.from_numpy(g[0])[None], torch.from_numpy(g[1]), (V, D),
                                                   check_invariants=True)
            else:
                tp.grad = torch.from_numpy(_to_dense(g, V))
        opt.step()
        topt.step()
        for k, tp in enumerate(tparams):
            np.testing.assert_allclose(opt.params[k].weight, tp.detach().numpy(), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(opt.state_sum[k], topt.state[tp]["sum"].numpy(), rtol=1e-6, atol=1e-7)
            assert opt.steps[k] == int(topt.state[tp]["step"])


def _to_dense(g, V):
    rows, values = g
    out = np.zeros((V, values.shape[1]), np.float32)
    out[rows] = values
    return out


def test_adagrad_weight_decay_with_a_sparse_gradient_is_torchs_runtime_error():
    """torch raises RuntimeError; here too, before anything moves, even on the last parameter."""
    rng = np.random.default_rng(8)
    a, b = fe.Embedding(5, 3, seed=12), fe.Embedding(4, 3, sparse=True, seed=13)
    opt = Adagrad([a, b], weight_decay=0.1)
    set_grads([a, b], [dense(rng, 5, 3, [1]), sparse(rng, 3, [2])])
    before = [p.weight.copy() for p in (a, b)] + [s.copy() for s in opt.state_sum]
    with pytest.raises(RuntimeError, match="weight_decay"):
        opt.step()
    for x, y in zip([a.weight, b.weight] + opt.state_sum, before):
        assert_bitwise(x, y)
    assert opt.steps == [0, 0]


# ---------------------------------------------------------------- a step that raises, lr, zero_grad, threads

def _bad_last():
    SG = fe.SparseGrad
    return [
        ("unsorted_rows", SG(np.array([2, 1], np.int64), np.ones((2, 3), np.float32)), ValueError),
        ("row_out_of_range", SG(np.array([0, 4], np.int64), np.ones((2, 3), np.float32)), (IndexError, ValueError)),
        ("values_wrong_dim", SG(np.array([1], np.int64), np.ones((1, 2), np.float32)), ValueError),
        ("values_float64", SG(np.array([1], np.int64), np.ones((1, 3), np.float64)), TypeError),
        ("dense_wrong_shape", np.ones((3, 3), np.float32), ValueError),
        ("dense_float64", np.ones((4, 3), np.float64), TypeError),
        ("weight_read_only", "readonly", ValueError),
        ("grad_is_weight", "alias", ValueError),
    ]


@pytest.mark.parametrize("kind,name,bad,errors", [(k,) + b for k in CLASSES for b in _bad_last()],
                         ids=[f"{k}-{b[0]}" for k in CLASSES for b in _bad_last()])
def test_a_bad_gradient_on_the_last_parameter_moves_nothing(kind, name, bad, errors):
    """Checked all, then moved: every weight, state_sum and step count as it was; the next good step
    is the model's second step."""
    rng = np.random.default_rng(9)
    layers = [fe.Embedding(6, 3, sparse=True, seed=14), fe.Embedding(5, 3, seed=15), fe.Embedding(4, 3, seed=16)]
    opt, model = build(kind, layers)
    first = [sparse(rng, 3, [0, 5]), dense(rng, 5, 3, [2]), sparse(rng, 3, [3])]
    set_grads(layers, first)
    opt.step()
    model.step(first)
    good = [sparse(rng, 3, [1, 5]), dense(rng, 5, 3, [0, 2])]
    set_grads(layers, good)
    if isinstance(bad, str):
        layers[2].grad = np.ones((4, 3), np.float32)
        if bad == "readonly":
            layers[2].weight.flags.writeable = False
        else:
            layers[2].grad = layers[2].weight
    else:
        layers[2].grad = bad
    with pytest.raises(errors):
        opt.step()
    assert_state(opt, model)
    layers[2].weight.flags.writeable = True
    layers[2].grad = None
    opt.step()
    model.step(good + [None])
    assert_state(opt, model)


@pytest.mark.parametrize("kind", CLASSES)
def test_a_negative_lr_is_refused_and_nothing_moves(kind):
    layer = fe.Embedding(4, 3, seed=17)
    for lr in (-1e-12, -1.0, -math.inf):
        with pytest.raises(ValueError, match="lr"):
            CLASSES[kind][0](layer, lr=lr)
    rng = np.random.default_rng(10)
    opt, model = build(kind, [layer], lr=0.05)
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -0.1
    assert opt.lr == 0.05
    g = dense(rng, 4, 3, [0, 3])
    set_grads([layer], [g])
    opt.step()
    model.step([g])
    assert_state(opt, model)


@pytest.mark.parametrize("kind,field,value", [
    ("Adagrad", "lr_decay", -0.1), ("Adagrad", "weight_decay", -1e-3), ("Adagrad", "eps", -1e-10),
    ("Adagrad", "eps", math.nan), ("Adagrad", "initial_accumulator_value", -0.5), ("RowWiseAdagrad", "eps", -1.0),
])
def test_hyperparameters_out_of_range_are_refused(kind, field, value):
    """Refused at construction; and by step(), with nothing moved, when the attribute is set later."""
    with pytest.raises(ValueError, match=field):
        CLASSES[kind][0](fe.Embedding(4, 2, seed=18), **{field: value})
    if field == "initial_accumulator_value":
        return
    rng = np.random.default_rng(11)
    layer = fe.Embedding(4, 2, seed=18)
    opt, model = build(kind, [layer])
    setattr(opt, field, value)
    set_grads([layer], [dense(rng, 4, 2, [1, 3])])
    with pytest.raises(ValueError, match=field):
        opt.step()
    assert_state(opt, model)


@pytest.mark.parametrize("kind", CLASSES)
def test_zero_grad_then_a_step_moves_nothing(kind):
    rng = np.random.default_rng(12)
    layer = fe.TokenPositionEmbedding(7, 4, 3, sparse=True, seed=19)
    opt, model = build(kind, layer)
    grads = [sparse(rng, 3, [0, 6]), sparse(rng, 3, [1])]
    set_grads(layer.parameters(), grads)
    opt.step()
    model.step(grads)
    opt.zero_grad()
    assert layer.token.grad is None and layer.position.grad is None
    opt.step()
    model.step([None, None])
    assert_state(opt, model)
    if kind == "Adagrad":
        assert opt.steps == [1, 1]


@FEW
@given(kind=st.sampled_from(list(CLASSES)), seed=st.integers(0, 2**32 - 1), D=st.integers(0, 70))
def test_optimizers_on_the_threaded_path(kind, seed, D):
    """Every call threaded (threshold 0, two threads): several steps against the model, bitwise."""
    rng = np.random.default_rng(seed)
    with serial_elements(0), num_threads(2):
        layers = [fe.Embedding(30, D, sparse=True, seed=20), fe.Embedding(9, D, seed=21)]
        opt, model = build(kind, layers)
        for _ in range(3):
            grads = [sparse(rng, D, rng.choice(30, int(rng.integers(0, 31)), replace=False)), dense(rng, 9, D, [1, 8])]
            set_grads(layers, grads)
            opt.step()
            assert _kernels._last_call_threads() == two_thread_team()
            model.step(grads)
            assert_state(opt, model)
