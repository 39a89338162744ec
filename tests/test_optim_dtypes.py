"""The optimizer kernels on float64, float16 and bfloat16 tables (float32 has its own tests:
test_optim_kernels.py, test_grouped_scatter.py, test_sgd_scatter.py, test_optim_oracles.py).

The spec (commit 27c3499, fastembed/_optim.pxi): every state array and the gradient have the weight's
dtype. float64 computes the float32 formulas in float64 with the hyperparameters as given (doubles).
float16 and bfloat16 widen w, the states and g to float32 exactly, compute the float32 formula in float32
(hyperparameters rounded to float32) and round each stored element (w, m, v, s) to the type once; the
weight's update reads the unrounded float32 state. SGD on a 16-bit table (sgd_step and sgd_scatter, fma
or not) is torch's ``w.add_(g, alpha=-lr)``: -lr rounded to the type, ``w + a16 * g`` in float32, rounded
once. The *_scatter kernels (Adagrad, row-wise, Adam) are ``coalesce`` then the matching *_step, bit for
bit; skip_row moves nothing. One and two threads give the same bits.

Oracles, independent of the kernels: the formulas transcribed op by op in numpy float64 (float64) or
float32 (16-bit, widened with numpy / the bit model of test_dtypes.py, rounded with numpy's float16 cast
or test_dtypes.py's bfloat16 model); fma(-lr, g, w) for float64 formed exactly with fractions.Fraction and
rounded once by float(). Every comparison is bitwise (any NaN matches any NaN for the 16-bit types).
"""
import contextlib
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastembed import _kernels
from _helpers import FEW, ID_DTYPES, Snapshot, f32, num_threads, serial_elements, two_thread_team
from test_dtypes import BF16, F16, F32, F64, assert_same, is_bf16, narrow, widen

NAMES = ("float64", "float16", "bfloat16")
KINDS = ("sgd", "sgd_fma", "adagrad", "rowwise", "adam")
GROUPED = ("adagrad", "rowwise", "adam")
WIDTHS = (0, 1, 3, 8, 9, 17, 33, 40)


def dtype_of(name):
    """The numpy dtype of a case; bfloat16 cases skip without ml_dtypes (as tests/test_dtypes.py's do)."""
    if name == "bfloat16":
        if BF16 is None:
            pytest.skip("ml_dtypes (the test extra) is not installed")
        return BF16
    return np.dtype(name)


# ---------------------------------------------------------------- the transcriptions (no fastembed code)

def compute_type(dtype):
    return np.float64 if dtype == F64 else np.float32


def up(a, dtype):
    """Stored elements as the computation sees them: float64 as is, the 16-bit types widened (exact)."""
    return np.asarray(a).astype(np.float64) if dtype == F64 else widen(a)


def down(x, dtype):
    """A computed value stored: float64 as is, the 16-bit types rounded once (nearest even)."""
    return np.asarray(x, np.float64) if dtype == F64 else narrow(np.asarray(x, np.float32), dtype)


def scalar(x, dtype):
    """A hyperparameter as the kernel uses it: the double itself for float64, else rounded to float32."""
    return np.float64(x) if dtype == F64 else f32(x)


def exact_fma(a, b, c):
    """a * b + c for Python floats, formed exactly and rounded once (the signed zeros as IEEE fma gives them)."""
    product = Fraction(a) * Fraction(b)
    total = product + Fraction(c)
    if total == 0:
        return (a * b) + c if product == 0 and c == 0 else 0.0
    return float(total)


def sgd_row(w, g, lr, fma, dtype):
    """One row's SGD: w and g stored rows, the new stored row."""
    with np.errstate(all="ignore"):
        if dtype == F64:
            if fma:
                return np.array([exact_fma(-lr, float(gd), float(wd)) for wd, gd in zip(w, g)], np.float64)
            return w - np.float64(lr) * g
        a16 = widen(narrow(np.array([-lr], np.float32), dtype))[0]  # -lr rounded to the type (via float32)
        return down(up(w, dtype) + a16 * up(g, dtype), dtype)


def step_model(kind, w, states, g, rows, hp, dtype):
    """(w, states) after one *_step: new arrays, the inputs untouched. hp: (lr, eps) or Adam's
    (lr, beta1, beta2, eps, bias1, bias2)."""
    w, states = w.copy(), [s.copy() for s in states]
    at = np.arange(len(w)) if rows is None else np.asarray(rows, np.int64)
    T = compute_type(dtype)
    D = w.shape[1]
    if kind in ("sgd", "sgd_fma"):
        for k, r in enumerate(at):
            w[r] = sgd_row(w[r], g[k], hp[0], kind == "sgd_fma", dtype)
        return w, states
    if len(at) == 0 or D == 0:
        return w, states
    wr, gr = up(w[at], dtype).astype(T), up(g, dtype).astype(T)
    with np.errstate(all="ignore"):
        if kind == "adagrad":
            clr, eps = scalar(hp[0], dtype), scalar(hp[1], dtype)
            sd = up(states[0][at], dtype).astype(T) + gr * gr
            states[0][at] = down(sd, dtype)
            w[at] = down(wr - (clr * gr) / (np.sqrt(sd) + eps), dtype)
        elif kind == "rowwise":
            lr, eps = scalar(hp[0], dtype), scalar(hp[1], dtype)
            acc = np.zeros(len(at), T)
            for d in range(D):  # column order
                acc = acc + gr[:, d] * gr[:, d]
            G = up(states[0][at], dtype).astype(T) + acc / T(D)
            states[0][at] = down(G, dtype)
            w[at] = down(wr - (lr * gr) / (np.sqrt(G) + eps)[:, None], dtype)
        else:
            lr, b1, b2, eps, bias1, bias2 = hp
            lr, b1, b2, eps = (scalar(x, dtype) for x in (lr, b1, b2, eps))
            ib1, ib2 = scalar(1.0 / bias1, dtype), scalar(1.0 / bias2, dtype)
            keep1, keep2 = T(1) - b1, T(1) - b2
            md = b1 * up(states[0][at], dtype).astype(T) + keep1 * gr
            vd = b2 * up(states[1][at], dtype).astype(T) + keep2 * (gr * gr)
            states[0][at] = down(md, dtype)
            states[1][at] = down(vd, dtype)
            w[at] = down(wr - (lr * (md * ib1)) / (np.sqrt(vd * ib2) + eps), dtype)
    return w, states


def coalesce_model(ids, src, dtype):
    """(rows, sums): each id's rows summed into zeros in ids order, in float64 (float64) or float32
    (16-bit, then rounded once)."""
    D = src.shape[-1]
    flat = ids.reshape(-1).astype(np.int64)
    rows = np.unique(flat)
    T = compute_type(dtype)
    sums = np.zeros((len(rows), D), T)
    wide = up(src, dtype).astype(T).reshape(ids.size, D)
    for i, r in enumerate(flat):
        u = np.searchsorted(rows, r)
        sums[u] = sums[u] + wide[i]
    return rows, down(sums, dtype)


def scatter_model(kind, w, states, ids, src, hp, skip, dtype):
    """sgd: each lookup's row in turn (a repeated id moves its row once per lookup); the others: the
    summed rows, then the step on every row but skip."""
    D = w.shape[1]
    if kind in ("sgd", "sgd_fma"):
        w = w.copy()
        for i, r in enumerate(ids.reshape(-1)):
            w[r] = sgd_row(w[r], src.reshape(ids.size, D)[i], hp[0], kind == "sgd_fma", dtype)
        return w, states
    rows, sums = coalesce_model(ids, src, dtype)
    keep = rows != skip
    return step_model(kind, w, states, sums[keep], rows[keep], hp, dtype)


# ---------------------------------------------------------------- calling the kernels

def call_step(kind, w, states, g, rows, hp, **kw):
    if kind in ("sgd", "sgd_fma"):
        return _kernels.sgd_step(w, g, rows, hp[0], fma=kind == "sgd_fma", **kw)
    if kind == "adagrad":
        return _kernels.adagrad_step(w, states[0], g, rows, *hp, **kw)
    if kind == "rowwise":
        return _kernels.rowwise_adagrad_step(w, states[0], g, rows, *hp, **kw)
    return _kernels.adam_step(w, states[0], states[1], g, rows, *hp, **kw)


def call_scatter(kind, w, states, ids, src, hp, skip=-1, **kw):
    if kind in ("sgd", "sgd_fma"):
        return _kernels.sgd_scatter(w, ids, src, hp[0], fma=kind == "sgd_fma", **kw)
    if kind == "adagrad":
        return _kernels.adagrad_scatter(w, states[0], ids, src, *hp, skip, **kw)
    if kind == "rowwise":
        return _kernels.rowwise_adagrad_scatter(w, states[0], ids, src, *hp, skip, **kw)
    return _kernels.adam_scatter(w, states[0], states[1], ids, src, *hp, skip, **kw)


STATE_NAMES = {"sgd": (), "sgd_fma": (), "adagrad": ("state_sum",), "rowwise": ("state_sum",),
               "adam": ("exp_avg", "exp_avg_sq")}


# ---------------------------------------------------------------- data

def stored(rng, shape, dtype, scale, zeros, positive=False):
    """Normal values times scale, rounded to dtype, about `zeros` of them +-0.0 (finite: the float64 fma
    model forms exact sums)."""
    x = rng.standard_normal(shape) * scale
    if positive:
        x = np.abs(x)
    u = rng.random(shape)
    x[u < zeros / 2] = 0.0
    x[(u >= zeros / 2) & (u < zeros)] = -0.0 if not positive else 0.0
    return down(x.astype(np.float32) if dtype != F64 else x, dtype).astype(dtype)


def make_states(kind, rng, V, D, dtype, zeros):
    if kind in ("adagrad",):
        return [stored(rng, (V, D), dtype, 1.0, zeros, positive=True)]
    if kind == "rowwise":
        return [stored(rng, (V,), dtype, 1.0, zeros, positive=True)]
    if kind == "adam":
        return [stored(rng, (V, D), dtype, 0.1, zeros), stored(rng, (V, D), dtype, 0.01, zeros, positive=True)]
    return []


@st.composite
def hypers(draw, kind):
    lr = draw(st.sampled_from([0.1, 0.01, 0.3, 1e-3, 1.7]))
    eps = draw(st.sampled_from([1e-8, 1e-10, 0.1, 1e-3]))
    if kind != "adam":
        return (lr, eps)
    b1, b2 = draw(st.sampled_from([(0.9, 0.999), (0.85, 0.99), (0.5, 0.7)]))
    t = draw(st.sampled_from([1, 2, 7, 100]))
    return (lr, b1, b2, eps, 1 - b1**t, 1 - b2**t)


@st.composite
def tables(draw, kind, dtype):
    """(rng, V, D, w, states, scale, zeros)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    V = draw(st.integers(1, 7))
    D = draw(st.sampled_from(WIDTHS))
    zeros = draw(st.sampled_from([0.0, 0.1, 0.5]))
    scale = draw(st.sampled_from([1.0, 1.0, 1e-3, 300.0]))  # 300: g*g overflows float16 (inf states)
    w = stored(rng, (V, D), dtype, 1.0, zeros)
    return rng, V, D, w, make_states(kind, rng, V, D, dtype, zeros), scale, zeros


def run_threads(call, arrays, team=True):
    """The call on copies of arrays, with one thread and with two (the threaded path forced, and with
    team: asserted to have run on two where the machine has them): the copies after each, asserted the
    same bits."""
    results = []
    for n in (1, 2):
        copies = [a.copy() for a in arrays]
        with num_threads(n), (serial_elements(0) if n == 2 else contextlib.nullcontext()):
            call(copies)
        results.append(copies)
    if team:
        assert _kernels._last_call_threads() == two_thread_team()
    for one, two in zip(*results):
        assert_same(two, one)
    return results[0]


# ---------------------------------------------------------------- the kernels against the transcriptions

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
@FEW
@given(data=st.data())
def test_step_matches_transcription(name, kind, data):
    dtype = dtype_of(name)
    rng, V, D, w, states, scale, zeros = data.draw(tables(kind, dtype))
    if data.draw(st.booleans()):
        rows = None
        U = V
    else:
        rows = np.flatnonzero(rng.random(V) < data.draw(st.sampled_from([0.0, 0.5, 1.0]))).astype(np.int64)
        U = len(rows)
    g = stored(rng, (U, D), dtype, scale, zeros)
    hp = data.draw(hypers(kind))
    snap = Snapshot(g=g, rows=rows)
    w_e, states_e = step_model(kind, w, states, g, rows, hp, dtype)
    got = run_threads(lambda a: call_step(kind, a[0], a[1:], g, rows, hp), [w] + states)
    snap.assert_unchanged()
    for actual, expected in zip(got, [w_e] + states_e):
        assert_same(actual, expected)


@pytest.mark.parametrize("D", [1, 40, 130, 700])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_dense_step_of_many_rows_matches_transcription(name, kind, D):
    """Every row of a table far larger than the hypothesis cases: a 16-bit elementwise rule stages its dense
    update across rows, 512 elements at a time (a span ends mid-row, a row of 700 spans two), and each
    thread stages its own rows."""
    dtype = dtype_of(name)
    rng = np.random.default_rng(D)
    V = 37
    w = stored(rng, (V, D), dtype, 1.0, 0.1)
    states = make_states(kind, rng, V, D, dtype, 0.1)
    g = stored(rng, (V, D), dtype, 1.0, 0.1)
    hp = (0.3, 0.85, 0.99, 1e-3, 1 - 0.85**3, 1 - 0.99**3) if kind == "adam" else (0.3, 1e-3)
    w_e, states_e = step_model(kind, w, states, g, None, hp, dtype)
    got = run_threads(lambda a: call_step(kind, a[0], a[1:], g, None, hp), [w] + states)
    for actual, expected in zip(got, [w_e] + states_e):
        assert_same(actual, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
@FEW
@given(data=st.data())
def test_scatter_matches_transcription_and_coalesce_then_step(name, kind, data):
    dtype = dtype_of(name)
    rng, V, D, w, states, scale, zeros = data.draw(tables(kind, dtype))
    shape = tuple(data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)))
    pool = data.draw(st.sampled_from([V, 1, min(2, V)]))
    ids = rng.integers(0, pool, size=shape).astype(data.draw(st.sampled_from(ID_DTYPES)))
    src = stored(rng, shape + (D,), dtype, scale, zeros)
    hp = data.draw(hypers(kind))
    skip = -1 if kind in ("sgd", "sgd_fma") else data.draw(st.sampled_from([-1, 0, int(rng.integers(V))]))
    snap = Snapshot(ids=ids, src=src)
    w_e, states_e = scatter_model(kind, w, states, ids, src, hp, skip, dtype)
    got = run_threads(lambda a: call_scatter(kind, a[0], a[1:], ids, src, hp, skip), [w] + states,
                      team=kind in GROUPED)  # (sgd_scatter splits columns: one thread for narrow rows)
    snap.assert_unchanged()
    for actual, expected in zip(got, [w_e] + states_e):
        assert_same(actual, expected)
    if kind in GROUPED:  # the contract itself: coalesce, then the step on every row but skip
        rows, values = _kernels.coalesce(ids, src)
        keep = rows != skip
        composed = [w.copy()] + [s.copy() for s in states]
        call_step(kind, composed[0], composed[1:], np.ascontiguousarray(values[keep]), rows[keep], hp)
        for actual, expected in zip(got, composed):
            assert_same(actual, expected)


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_are_doubles_for_float64_and_float32_for_the_halves(name):
    # 0.1 is not a float32: a float64 table that used lr (or a beta) rounded to float32 would move
    # differently; a 16-bit one that used the double would too. One fixed case per rule, beside the
    # property tests, so that a failure names the rule.
    dtype = dtype_of(name)
    rng = np.random.default_rng(7)
    V, D = 5, 19
    for kind in KINDS:
        w = stored(rng, (V, D), dtype, 1.0, 0.1)
        states = make_states(kind, rng, V, D, dtype, 0.1)
        g = stored(rng, (V, D), dtype, 1.0, 0.1)
        hp = (0.1, 0.85, 0.99, 1e-8, 1 - 0.85**3, 1 - 0.99**3) if kind == "adam" else (0.1, 1e-3)
        w_e, states_e = step_model(kind, w, states, g, None, hp, dtype)
        call_step(kind, w, states, g, None, hp)
        for actual, expected in zip([w] + states, [w_e] + states_e):
            assert_same(actual, expected)


@pytest.mark.parametrize("name", ("float16", "bfloat16"))
@pytest.mark.parametrize("kind", ("adagrad", "adam"))
def test_a_sixteen_bit_tie_rounds_to_even(name, kind):
    """w - step landing exactly halfway between two values of the type rounds to the even one, on rows of 3
    (shorter than the eight lanes) and 11 (a full vector and a tail). Worked out by hand: w = 1 + 2 u (even),
    step = u where u is half the type's spacing above 1 (bfloat16 2**-8, float16 2**-11): 1 + u is the tie
    between 1 (even) and 1 + 2 u (odd), so the result is 1; rounding half up would give 1 + 2 u. bfloat16: on
    each of its lane levels (portable, AVX2, AVX512_BF16: each rounds in its own code)."""
    dtype = dtype_of(name)
    had = _kernels._bf16_hardware()
    try:
        for level in range(3) if name == "bfloat16" else [None]:
            if level is not None and _kernels._bf16_hardware(level) != level:
                continue  # a level this CPU does not have
            tie_steps(dtype, kind, 2.0**-8 if name == "bfloat16" else 2.0**-11)
    finally:
        _kernels._bf16_hardware(had)


def tie_steps(dtype, kind, u):
    for D in (3, 11):
        w = np.full((1, D), 1 + 2 * u).astype(dtype)
        g = np.ones((1, D), dtype)
        if kind == "adagrad":  # s = 0 + 1 * 1; step = u * 1 / (sqrt(1) + 0)
            s = np.zeros((1, D), dtype)
            _kernels.adagrad_step(w, s, g, None, u, 0.0)
            assert np.all(s.astype(np.float64) == 1.0)
        else:  # beta1 = beta2 = 0: m = v = 1; step = lr * (1 * 1) / (sqrt(1 * 1) + 0)
            m, v = np.zeros((1, D), dtype), np.zeros((1, D), dtype)
            _kernels.adam_step(w, m, v, g, None, u, 0.0, 0.0, 0.0, 1.0, 1.0)
        assert np.all(w.astype(np.float64) == 1.0), w.astype(np.float64)


def test_float64_fma_rounds_once():
    # w + (-lr) * g where the two roundings of `w - lr * g` differ from fma's one: worked out by hand.
    w = np.array([[1.0, 1.0]])
    g = np.array([[1.0 + 2.0**-52, 1.0]])
    lr = 1.0 - 2.0**-53  # lr * g[0] = 1 + 2**-53 - 2**-105 exactly: rounded alone it is 1
    plain, fused = w.copy(), w.copy()
    _kernels.sgd_step(plain, g, None, lr)
    _kernels.sgd_step(fused, g, None, lr, fma=True)
    assert plain[0, 0] == 0.0  # 1 - 1
    assert fused[0, 0] == -(2.0**-53) + 2.0**-105  # 1 - (1 + 2**-53 - 2**-105), representable
    assert fused[0, 0] == exact_fma(-lr, g[0, 0], 1.0)
    scattered = w.copy()
    _kernels.sgd_scatter(scattered, np.array([0]), g, lr, fma=True)
    assert_same(scattered, fused)


@pytest.mark.parametrize("name", NAMES)
def test_rowwise_rows_of_no_columns_keep_their_state_bits(name):
    # D = 0: no mean square, nothing moves, not even a NaN state's payload (a 16-bit row staged through
    # float32 and rounded back would be rewritten).
    dtype = dtype_of(name)
    bits = np.dtype(f"u{dtype.itemsize}")
    nan = {2: 0x7C01 if dtype == F16 else 0x7F81, 8: 0x7FF0000000000001}[dtype.itemsize]
    state = np.array([1, nan, 3], bits).view(dtype)
    w = np.zeros((3, 0), dtype)
    snap = Snapshot(state=state, w=w)
    _kernels.rowwise_adagrad_step(w, state, np.zeros((3, 0), dtype), None, 0.1, 1e-8)
    _kernels.rowwise_adagrad_step(w, state, np.zeros((2, 0), dtype), np.array([0, 1]), 0.1, 1e-8)
    _kernels.rowwise_adagrad_scatter(w, state, np.array([0, 1, 1]), np.zeros((3, 0), dtype), 0.1, 1e-8)
    snap.assert_unchanged()


# ---------------------------------------------------------------- bfloat16 as uint16 bits

@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_bits_path_matches_ml_dtypes(kind):
    dtype = dtype_of("bfloat16")
    rng = np.random.default_rng(11)
    V, D = 6, 13
    w = stored(rng, (V, D), dtype, 1.0, 0.1)
    states = make_states(kind, rng, V, D, dtype, 0.1)
    hp = (0.1, 0.9, 0.999, 1e-8, 1 - 0.9**2, 1 - 0.999**2) if kind == "adam" else (0.1, 1e-8)
    ids = np.array([[0, 5, 5], [2, 0, 5]], np.int32)
    src = stored(rng, (2, 3, D), dtype, 1.0, 0.1)
    rows = np.array([0, 2, 5])
    g = stored(rng, (3, D), dtype, 1.0, 0.1)
    for call, args in ((call_step, (g, rows, hp)), (call_scatter, (ids, src, hp))):
        a = [w.copy()] + [s.copy() for s in states]
        b = [x.view(np.uint16).copy() for x in a]
        call(kind, a[0], a[1:], *args)
        bits_args = tuple(x.view(np.uint16) if isinstance(x, np.ndarray) and x.dtype == dtype else x for x in args)
        call(kind, b[0], b[1:], *bits_args, _format="bfloat16")
        for got, expected in zip(b, a):
            assert got.dtype == np.uint16
            assert_same(got.view(dtype), expected)
        assert not np.array_equal(a[0].view(np.uint16), w.view(np.uint16))  # the step moved something


# ---------------------------------------------------------------- errors: nothing changes

def error_case(kind, dtype, rng, V=4, D=5):
    w = stored(rng, (V, D), dtype, 1.0, 0.0)
    states = make_states(kind, rng, V, D, dtype, 0.0)
    hp = (0.1, 0.9, 0.999, 1e-8, 0.1, 0.001) if kind == "adam" else (0.1, 1e-8)
    return w, states, hp


def other_dtypes(dtype):
    return [d for d in (F32, F64, F16, BF16) if d is not None and d != dtype]


@pytest.mark.parametrize("scatter", [False, True], ids=["step", "scatter"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_a_state_or_gradient_of_another_dtype_is_refused(name, kind, scatter):
    dtype = dtype_of(name)
    rng = np.random.default_rng(5)
    w, states, hp = error_case(kind, dtype, rng)
    rows, ids = np.array([0, 2]), np.array([[0, 2, 2]])
    g, src = stored(rng, (2, 5), dtype, 1.0, 0.0), stored(rng, (1, 3, 5), dtype, 1.0, 0.0)
    roles = STATE_NAMES[kind] + (("grad_out",) if scatter else ("grad",))
    for k, role in enumerate(roles):
        for other in other_dtypes(dtype):
            args = [w] + list(states) + [src if scatter else g]
            args[k + 1] = args[k + 1].astype(other)
            snap = Snapshot(**{f"a{i}": a for i, a in enumerate(args)}, w=w, rows=rows, ids=ids,
                            **{f"s{i}": s for i, s in enumerate(states)})
            with pytest.raises(TypeError) as info:
                if scatter:
                    call_scatter(kind, args[0], args[1:-1], ids, args[-1], hp)
                else:
                    call_step(kind, args[0], args[1:-1], args[-1], rows, hp)
            message = str(info.value)
            assert f"{role}.dtype={other.name}" in message and f"weight.dtype={dtype.name}" in message, message
            snap.assert_unchanged()


@pytest.mark.parametrize("scatter", [False, True], ids=["step", "scatter"])
@pytest.mark.parametrize("kind", KINDS)
def test_uint16_without_format_is_refused(kind, scatter):
    rng = np.random.default_rng(9)
    w, states, hp = error_case(kind, F16, rng)
    w, states = w.view(np.uint16), [s.view(np.uint16) for s in states]
    g, src = np.ones((2, 5), np.uint16), np.ones((1, 3, 5), np.uint16)
    snap = Snapshot(w=w, g=g, src=src, **{f"s{i}": s for i, s in enumerate(states)})
    with pytest.raises(TypeError, match="uint16 array is never read as bfloat16"):
        if scatter:
            call_scatter(kind, w, states, np.array([[0, 2, 2]]), src, hp)
        else:
            call_step(kind, w, states, g, np.array([0, 2]), hp)
    snap.assert_unchanged()


@pytest.mark.parametrize("bad", [4, -1])
@pytest.mark.parametrize("scatter", [False, True], ids=["step", "scatter"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_an_id_outside_the_table_is_refused(name, kind, scatter, bad):
    dtype = dtype_of(name)
    rng = np.random.default_rng(3)
    w, states, hp = error_case(kind, dtype, rng, V=4)
    for id_dtype in ID_DTYPES:
        if scatter:
            where = np.array([[0, 2, bad], [bad, 1, 1]], id_dtype)
            src = stored(rng, where.shape + (5,), dtype, 1.0, 0.0)
        else:
            if id_dtype != np.int64:
                continue  # rows are int64 only
            where = np.array([bad, 0, 2]) if bad < 0 else np.array([0, 2, bad])
            src = stored(rng, (3, 5), dtype, 1.0, 0.0)
        snap = Snapshot(w=w, where=where, src=src, **{f"s{i}": s for i, s in enumerate(states)})
        with pytest.raises(IndexError, match=f"= {bad} is out of range for weight with 4 rows"):
            if scatter:
                call_scatter(kind, w, states, where, src, hp)
            else:
                call_step(kind, w, states, src, where, hp)
        snap.assert_unchanged()
