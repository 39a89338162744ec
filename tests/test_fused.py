"""The fused rules (fastembed.optim.Fused*) and the fused layers (``Embedding(fused=...)``).

Oracles, none of them the fused code path:

- the unfused path with the same hyperparameters: a layer with ``sparse=True``, ``backward``, and
  fe.optim.Adagrad / RowWiseAdagrad / SparseAdam ``step()``: weights and every state array bit for bit;
- for padding_idx: a `SparseGrad` built with numpy (np.unique + np.add.at, the padding row left out)
  and stepped by the unfused optimizer;
- for FusedSGD: a pure-Python transcription that moves one occurrence at a time in the row-major order
  of ids, ``w = f32(w - f32(f32(lr) * g))`` (fma=False), and, for fma=True, the exact value
  ``w - lr * g`` in rationals (fractions.Fraction) rounded once to float32 here; with distinct ids,
  fma=False is also fe.optim.SGD on the layer's dense gradient.
"""
import contextlib
import types
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fastembed as fe
from fastembed import optim
from fastembed.optim import (Adagrad, FusedAdagrad, FusedRowWiseAdagrad, FusedSGD, FusedSparseAdam,
                             RowWiseAdagrad, SGD, SparseAdam)
from _helpers import (FAST, FEW, Snapshot, assert_bitwise, id_arrays, ids_shapes, num_threads, positions_oracle,
                      serial_elements)

COALESCING = ("adagrad", "rowwise", "adam")


# ---------------------------------------------------------------- rules and their unfused twins

def hyperparameters(kind, draw=None):
    """Hyperparameters other than lr, drawn (draw given) or fixed non-defaults."""
    pick = (lambda options: draw(st.sampled_from(options))) if draw else (lambda options: options[-1])
    if kind == "adagrad":
        return {"lr_decay": pick([0.0, 0.25, 1.5]), "initial_accumulator_value": pick([0.0, 0.1, 2.0]),
                "eps": pick([1e-10, 0.0, 0.3])}
    if kind == "rowwise":
        return {"eps": pick([1e-10, 0.0, 0.3])}
    if kind == "adam":
        return {"betas": pick([(0.85, 0.99), (0.9, 0.999), (0.0, 0.5)]), "eps": pick([1e-8, 0.0, 0.2])}
    return {"fma": pick([False, True])}


def make_rule(kind, lr, hyper):
    return {"adagrad": FusedAdagrad, "rowwise": FusedRowWiseAdagrad, "adam": FusedSparseAdam,
            "sgd": FusedSGD}[kind](lr, **hyper)


def make_optimizer(kind, params, lr, hyper):
    return {"adagrad": Adagrad, "rowwise": RowWiseAdagrad, "adam": SparseAdam}[kind](params, lr, **hyper)


def unfused_state(kind, opt, i):
    """Parameter i's state in the unfused optimizer, under the fused state's names."""
    if kind == "adagrad":
        return {"sum": opt.state_sum[i], "step": np.array(opt.steps[i], np.int64)}
    if kind == "rowwise":
        return {"sum": opt.state_sum[i]}
    return {"exp_avg": opt.exp_avg[i], "exp_avg_sq": opt.exp_avg_sq[i], "step": np.array(opt.steps[i], np.int64)}


def assert_same_state(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert_bitwise(actual[key], expected[key])


def gradient(rng, shape):
    """float32 gradients with magnitudes from 1e-4 to 1e2, so g^2 is sometimes near eps."""
    scale = 10.0 ** rng.integers(-4, 3, size=shape[:-1] + (1,)) if shape else 1.0
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@st.composite
def training_runs(draw, max_rows=10):
    """(V, D, steps, rng): steps is a list of (ids, lr), ids of any shape (empty and 0-d too), int32
    or int64, often with repeats; lr changes between steps."""
    V, D = draw(st.integers(1, max_rows)), draw(st.integers(0, 5))
    steps = [(draw(id_arrays(V)), draw(st.sampled_from([0.01, 0.1, 0.5, 0.0])))
             for _ in range(draw(st.integers(1, 4)))]
    return V, D, steps, np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def coalesce_oracle(ids, g):
    """np.unique + np.add.at into zeros (_helpers' version cannot reshape a D = 0 gradient)."""
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    rows, inverse = np.unique(ids, return_inverse=True)
    values = np.zeros((len(rows), g.shape[-1]), np.float32)
    np.add.at(values, inverse.reshape(-1), g.reshape(ids.size, g.shape[-1]))
    return rows, values


# ---------------------------------------------------------------- fused == unfused, bit for bit

@FAST
@given(kind=st.sampled_from(COALESCING), run=training_runs(), data=st.data())
def test_fused_embedding_equals_the_sparse_layer_and_its_optimizer(kind, run, data):
    V, D, steps, rng = run
    hyper = hyperparameters(kind, data.draw)
    w0 = rng.standard_normal((V, D)).astype(np.float32)
    fused = fe.Embedding.from_pretrained(w0, fused=make_rule(kind, steps[0][1], hyper))
    plain = fe.Embedding.from_pretrained(w0, sparse=True)
    opt = make_optimizer(kind, plain, steps[0][1], hyper)
    for ids, lr in steps:
        g = gradient(rng, ids.shape + (D,))
        fused.fused.lr, opt.lr = lr, lr
        assert_bitwise(fused(ids), plain(ids))
        fused.backward(g)
        plain.backward(g)
        opt.step()
        opt.zero_grad()
        assert fused.grad is None
        assert_bitwise(fused.weight, plain.weight)
        assert_same_state(fused.state, unfused_state(kind, opt, 0))


@FEW
@given(kind=st.sampled_from(COALESCING), run=training_runs(), P=st.integers(1, 8),
       positions_form=st.sampled_from(["none", "int", "array"]), data=st.data())
def test_fused_token_position_equals_the_sparse_layer_and_its_optimizer(kind, run, P, positions_form, data):
    V, D, steps, rng = run
    hyper = hyperparameters(kind, data.draw)
    tok0, pos0 = rng.standard_normal((V, D)).astype(np.float32), rng.standard_normal((P, D)).astype(np.float32)
    fused = fe.TokenPositionEmbedding.from_pretrained(tok0, pos0, fused=make_rule(kind, steps[0][1], hyper))
    plain = fe.TokenPositionEmbedding.from_pretrained(tok0, pos0, sparse=True)
    opt = make_optimizer(kind, plain, steps[0][1], hyper)
    assert fused.token.state is not fused.position.state
    for ids, lr in steps:
        T = ids.shape[-1] if ids.ndim else 1
        if positions_form == "none":
            assume(T <= P)
            positions = None
        elif positions_form == "int":
            assume(T <= P)
            positions = data.draw(st.integers(0, P - T))
        else:
            positions = np.asarray(rng.integers(0, P, size=ids.shape[-1:]))
        g = gradient(rng, ids.shape + (D,))
        fused.fused.lr, opt.lr = lr, lr
        assert_bitwise(fused(ids, positions), plain(ids, positions))
        fused.backward(g)
        plain.backward(g)
        opt.step()
        opt.zero_grad()
        assert fused.token.grad is None and fused.position.grad is None
        assert_bitwise(fused.token.weight, plain.token.weight)
        assert_bitwise(fused.position.weight, plain.position.weight)
        assert_same_state(fused.token.state, unfused_state(kind, opt, 0))
        assert_same_state(fused.position.state, unfused_state(kind, opt, 1))


@pytest.mark.parametrize("kind", COALESCING)
def test_threaded_fused_steps_equal_the_unfused_ones(kind):
    """Large enough for the kernels' threaded loops (the serial threshold at 0, two threads)."""
    rng = np.random.default_rng(7)
    V, D = 300, 33
    w0 = rng.standard_normal((V, D)).astype(np.float32)
    hyper = hyperparameters(kind)
    with serial_elements(0), num_threads(2):
        fused = fe.Embedding.from_pretrained(w0, fused=make_rule(kind, 0.05, hyper))
        plain = fe.Embedding.from_pretrained(w0, sparse=True)
        opt = make_optimizer(kind, plain, 0.05, hyper)
        for _ in range(3):
            ids = rng.integers(0, V, size=(8, 40))
            g = gradient(rng, ids.shape + (D,))
            fused(ids)
            fused.backward(g)
            plain(ids)
            plain.backward(g)
            opt.step()
            opt.zero_grad()
    assert_bitwise(fused.weight, plain.weight)
    assert_same_state(fused.state, unfused_state(kind, opt, 0))


@pytest.mark.parametrize("kind", COALESCING)
def test_untouched_rows_and_their_state_keep_their_bits(kind):
    """Independent of the unfused path: a row no id names keeps weight and state exactly; a named one moves."""
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((9, 4)).astype(np.float32)
    rule = make_rule(kind, 0.1, hyperparameters(kind))
    w, state = w0.copy(), rule.new_state(w0)
    for key in state:  # a nonzero state, so a row whose state was reset or moved shows
        if state[key].ndim:
            state[key][...] = rng.random(state[key].shape).astype(np.float32)
    before = {k: v.copy() for k, v in state.items()}
    ids = np.array([[2, 5, 2], [7, 5, 5]])
    g = rng.standard_normal((2, 3, 4)).astype(np.float32)  # large enough to move every touched sum
    rule.update(w, state, ids, g)
    untouched = np.setdiff1d(np.arange(9), ids)
    assert_bitwise(w[untouched], w0[untouched])
    assert np.all(w[[2, 5, 7]] != w0[[2, 5, 7]])
    for key, value in state.items():
        if value.ndim:
            assert_bitwise(value[untouched], before[key][untouched])
            assert np.all(value[[2, 5, 7]] != before[key][[2, 5, 7]])
        else:
            assert int(value) == int(before[key]) + 1


@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_an_empty_update_counts_a_step_as_the_unfused_optimizer_does(kind):
    """Empty ids move no row but count a step (the unfused optimizers count a step with an empty
    sparse gradient); the next update is then decayed / bias-corrected as the second step."""
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((6, 3)).astype(np.float32)
    hyper = hyperparameters(kind)
    fused = fe.Embedding.from_pretrained(w0, fused=make_rule(kind, 0.1, hyper))
    plain = fe.Embedding.from_pretrained(w0, sparse=True)
    opt = make_optimizer(kind, plain, 0.1, hyper)
    for ids in (np.zeros((2, 0), np.int64), np.array([1, 4, 1])):
        g = gradient(rng, ids.shape + (3,))
        for layer in (fused, plain):
            layer(ids)
            layer.backward(g)
        opt.step()
        opt.zero_grad()
        if ids.size == 0:
            assert int(fused.state["step"]) == 1
            assert_bitwise(fused.weight, w0)
    assert int(fused.state["step"]) == 2 == opt.steps[0]
    assert_bitwise(fused.weight, plain.weight)
    assert_same_state(fused.state, unfused_state(kind, opt, 0))


# ---------------------------------------------------------------- padding_idx

@FAST
@given(kind=st.sampled_from(COALESCING), V=st.integers(1, 8), D=st.integers(0, 4), data=st.data(),
       seed=st.integers(0, 2**32 - 1))
def test_padding_rows_contribute_nothing(kind, V, D, data, seed):
    """Against the unfused optimizer stepping a numpy-built SparseGrad without the padding row (what
    the torch adapter's sparse gradient holds); the padding row and its state keep their bits."""
    rng = np.random.default_rng(seed)
    ids = data.draw(id_arrays(V))
    pad = data.draw(st.integers(-V, V - 1))
    hyper = hyperparameters(kind, data.draw)
    w0 = rng.standard_normal((V, D)).astype(np.float32)
    rule = make_rule(kind, 0.1, hyper)
    w, state = w0.copy(), rule.new_state(w0)
    param = types.SimpleNamespace(weight=w0.copy(), grad=None)
    opt = make_optimizer(kind, [param], 0.1, hyper)
    for _ in range(2):
        g = gradient(rng, ids.shape + (D,))
        rule.update(w, state, ids, g, padding_idx=pad)
        rows, values = coalesce_oracle(ids, g)
        keep = rows != pad % V
        param.grad = fe.SparseGrad(rows[keep], values[keep])
        opt.step()
    assert_bitwise(w, param.weight)
    assert_same_state(state, unfused_state(kind, opt, 0))
    assert_bitwise(w[pad], w0[pad])


# ---------------------------------------------------------------- FusedSGD against transcriptions

def round_to_f32(x):
    """The float32 nearest to the rational x (ties to even), inf beyond float32's range."""
    if x == 0:
        return np.float32(0.0)
    sign, x = (-1, -x) if x < 0 else (1, x)
    e = x.numerator.bit_length() - x.denominator.bit_length()  # 2**e <= x < 2**(e + 2)
    if Fraction(2) ** e > x:
        e -= 1
    elif Fraction(2) ** (e + 1) <= x:
        e += 1
    ulp = Fraction(2) ** (max(e, -126) - 23)
    q = round(x / ulp)  # Fraction rounds half to even
    value = q * ulp
    if value >= Fraction(2) ** 128:
        return np.float32(sign * np.inf)
    return np.float32(sign * float(value))  # exact: value is a float32


def test_round_to_f32_is_correct_rounding():
    """Checked against numpy's float64 -> float32 cast, which is correctly rounded, on doubles
    (x exact in a double), ties and subnormals included."""
    rng = np.random.default_rng(0)
    samples = list(rng.standard_normal(2000) * 10.0 ** rng.integers(-45, 39, 2000))
    samples += [1 + 2**-24, 1 + 3 * 2**-24, 2**-149 * 1.5, 2**-149 * 2.5, 2**-150, 3.4028235677973366e38,
                3.4028235e38 * 1.0000001, -(1 + 2**-24), 2**-126 * (1 - 2**-24)]
    for x in samples:
        with np.errstate(over="ignore"):
            expected = np.float32(x)
        assert_bitwise(round_to_f32(Fraction(x)), expected)


def sgd_sequential(w, ids, g, lr, fma, pad=None):
    """FusedSGD's documented result, one occurrence of ids at a time in row-major order (new array)."""
    w = w.copy()
    lr32 = np.float32(lr)
    flat_ids = np.asarray(ids).reshape(-1)
    flat_g = np.asarray(g).reshape(flat_ids.size, w.shape[1])
    for i, r in enumerate(flat_ids.tolist()):
        if pad is not None and r == pad:
            continue
        for d in range(w.shape[1]):
            if fma:
                exact = Fraction(float(w[r, d])) - Fraction(float(lr32)) * Fraction(float(flat_g[i, d]))
                new = round_to_f32(exact)
                if exact == 0:  # the sign of an exact zero: w + (-lr * g) rounds it as float32 does
                    with np.errstate(all="ignore"):
                        new = w[r, d] + (-lr32) * flat_g[i, d]
                w[r, d] = new
            else:
                with np.errstate(all="ignore"):
                    w[r, d] = w[r, d] - lr32 * flat_g[i, d]
    return w


@FAST
@given(V=st.integers(1, 8), D=st.integers(0, 4), data=st.data(), seed=st.integers(0, 2**32 - 1),
       fma=st.booleans(), lr=st.sampled_from([0.1, 0.01, 1.0, 0.0, 3.7]), pad=st.sampled_from([None, 0, -1]),
       threaded=st.booleans())
def test_fused_sgd_is_the_sequential_transcription(V, D, data, seed, fma, lr, pad, threaded):
    rng = np.random.default_rng(seed)
    ids = data.draw(id_arrays(V))
    w0 = rng.standard_normal((V, D)).astype(np.float32)
    g = gradient(rng, ids.shape + (D,))
    rule = FusedSGD(lr, fma=fma)
    w, state = w0.copy(), rule.new_state(w0)
    assert state == {}
    with (serial_elements(0) if threaded else contextlib.nullcontext()), num_threads(2 if threaded else 1):
        rule.update(w, state, ids, g, padding_idx=pad)
    assert_bitwise(w, sgd_sequential(w0, ids, g, lr, fma, None if pad is None else pad % V))


def test_fma_rounds_once():
    """A case where the two roundings differ, so each fma setting is told apart from the other."""
    w0 = np.array([[1.0]], np.float32)
    g = np.array([[1 + 2**-12]], np.float32)  # lr * g = 1 + 2**-11 + 2**-24: a tie float32 rounds down
    lr = float(np.float32(1 + 2**-12))
    out = {}
    for fma in (False, True):
        w = w0.copy()
        FusedSGD(lr, fma=fma).update(w, {}, np.array([0]), g)
        out[fma] = w
        assert_bitwise(w, sgd_sequential(w0, np.array([0]), g, lr, fma))
    assert out[False].tobytes() != out[True].tobytes()
    assert float(out[True][0, 0]) == -(2**-11 + 2**-24)  # 1 - (1 + 2**-12)**2, exact in float32


def test_fused_sgd_fma_is_torchs_sparse_sgd():
    """A fused layer with FusedSGD(fma=True) against torch's nn.Embedding(sparse=True) and
    torch.optim.SGD over three steps with repeated ids, bit for bit (torch adds an uncoalesced sparse
    gradient one entry at a time, one rounding each)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    w0 = rng.standard_normal((20, 7)).astype(np.float32)
    layer = fe.Embedding.from_pretrained(w0, fused=FusedSGD(0.05, fma=True))
    ref = torch.nn.Embedding.from_pretrained(torch.from_numpy(w0.copy()), freeze=False, sparse=True)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(3):
        ids = rng.integers(0, 20, size=(4, 9))
        g = gradient(rng, ids.shape + (7,))
        layer(ids)
        layer.backward(g)
        opt.zero_grad()
        ref(torch.from_numpy(ids)).backward(torch.from_numpy(g))
        opt.step()
    assert_bitwise(layer.weight, ref.weight.detach().numpy())


@FAST
@given(V=st.integers(1, 10), D=st.integers(0, 4), seed=st.integers(0, 2**32 - 1),
       lr=st.sampled_from([0.1, 0.01, 1.0]), data=st.data())
def test_fused_sgd_with_distinct_ids_is_sgd_on_the_dense_gradient(V, D, seed, lr, data):
    """Without repeats the per-occurrence order does not matter: fma=False equals the unfused dense
    layer and fe.optim.SGD bit for bit (two steps, lr changed between them)."""
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((V, D)).astype(np.float32)
    fused = fe.Embedding.from_pretrained(w0, fused=FusedSGD(lr))
    plain = fe.Embedding.from_pretrained(w0)
    opt = SGD(plain, lr)
    for step_lr in (lr, lr / 3):
        ids = rng.permutation(V)[:data.draw(st.integers(0, V))].astype(data.draw(st.sampled_from([np.int32, np.int64])))
        g = gradient(rng, ids.shape + (D,))
        fused.fused.lr, opt.lr = step_lr, step_lr
        for layer in (fused, plain):
            layer(ids)
            layer.backward(g)
        opt.step()
        opt.zero_grad()
        assert_bitwise(fused.weight, plain.weight)


@FEW
@given(V=st.integers(1, 6), P=st.integers(1, 6), D=st.integers(0, 3), seed=st.integers(0, 2**32 - 1),
       fma=st.booleans(), shape=ids_shapes(max_ndim=2, max_side=5, min_ndim=1))
def test_fused_sgd_token_position_is_two_sequential_updates(V, P, D, seed, fma, shape):
    assume(shape[-1] <= P)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=shape)
    tok0, pos0 = rng.standard_normal((V, D)).astype(np.float32), rng.standard_normal((P, D)).astype(np.float32)
    layer = fe.TokenPositionEmbedding.from_pretrained(tok0, pos0, fused=FusedSGD(0.3, fma=fma))
    assert layer.token.state == {} and layer.position.state == {}
    g = gradient(rng, shape + (D,))
    layer(ids)
    layer.backward(g)
    assert_bitwise(layer.token.weight, sgd_sequential(tok0, ids, g, 0.3, fma))
    assert_bitwise(layer.position.weight, sgd_sequential(pos0, positions_oracle(shape, None), g, 0.3, fma))


# ---------------------------------------------------------------- the rules' API

ALL = ("sgd",) + COALESCING


def test_new_state_is_documented():
    w = np.ones((4, 3), np.float32)
    assert FusedSGD(0.1).new_state(w) == {}
    s = FusedAdagrad(initial_accumulator_value=0.25).new_state(w)
    assert sorted(s) == ["step", "sum"]
    assert_bitwise(s["sum"], np.full((4, 3), 0.25, np.float32))
    assert_bitwise(s["step"], np.zeros((), np.int64))
    s = FusedRowWiseAdagrad().new_state(w)
    assert sorted(s) == ["sum"]
    assert_bitwise(s["sum"], np.zeros(4, np.float32))
    s = FusedSparseAdam().new_state(w)
    assert sorted(s) == ["exp_avg", "exp_avg_sq", "step"]
    assert_bitwise(s["exp_avg"], np.zeros((4, 3), np.float32))
    assert_bitwise(s["exp_avg_sq"], np.zeros((4, 3), np.float32))
    assert_bitwise(s["step"], np.zeros((), np.int64))
    for dtype in (np.float64, np.float16):  # state in the weight's dtype (bfloat16: tests/test_torch_optim_dtypes.py)
        s = FusedAdagrad(initial_accumulator_value=0.1).new_state(np.ones((4, 3), dtype))
        assert_bitwise(s["sum"], np.full((4, 3), dtype(0.1), dtype))
        assert FusedRowWiseAdagrad().new_state(np.ones((4, 3), dtype))["sum"].dtype == dtype
    for kind in ALL:
        with pytest.raises(TypeError, match="weight must be float32, float64, float16 or bfloat16"):
            make_rule(kind, 0.1, {}).new_state(np.ones((4, 3), np.int32))
        with pytest.raises(TypeError, match="weight must be float32, float64, float16 or bfloat16"):
            make_rule(kind, 0.1, {}).new_state(np.ones((4, 3), np.uint16))  # bits need the private _format
        with pytest.raises(ValueError):
            make_rule(kind, 0.1, {}).new_state(np.ones(4, np.float32))


def test_defaults_are_documented():
    assert (FusedAdagrad().lr, FusedAdagrad().lr_decay, FusedAdagrad().initial_accumulator_value,
            FusedAdagrad().eps) == (0.01, 0.0, 0.0, 1e-10)
    assert (FusedRowWiseAdagrad().lr, FusedRowWiseAdagrad().eps) == (0.01, 1e-10)
    assert (FusedSparseAdam().lr, FusedSparseAdam().betas, FusedSparseAdam().eps) == (0.01, (0.85, 0.99), 1e-8)
    assert FusedSGD(0.5).fma is False


@pytest.mark.parametrize("kind", ALL)
def test_a_negative_lr_is_refused(kind):
    with pytest.raises(ValueError, match="lr"):
        make_rule(kind, -0.1, {})
    rule = make_rule(kind, 0.1, {})
    with pytest.raises(ValueError, match="lr"):
        rule.lr = -1e-3
    assert rule.lr == 0.1
    rule.lr = 0.0
    assert rule.lr == 0.0


@pytest.mark.parametrize("kind,field,value", [
    ("adagrad", "lr_decay", -0.1), ("adagrad", "eps", -1e-10), ("adagrad", "initial_accumulator_value", -1.0),
    ("rowwise", "eps", -1.0), ("adam", "eps", -1.0), ("adam", "betas", (1.0, 0.9)),
    ("adam", "betas", (0.9, -0.1)), ("adam", "betas", (0.9,))])
def test_hyperparameters_out_of_range_are_refused(kind, field, value):
    with pytest.raises(ValueError, match=field if field != "initial_accumulator_value" else "initial"):
        make_rule(kind, 0.1, {field: value})
    # set later, as a plain attribute: refused by the next update, before anything moves
    rule = make_rule(kind, 0.1, {})
    w = np.ones((3, 2), np.float32)
    state = rule.new_state(w)
    setattr(rule, field, tuple(value) if field == "betas" else value)
    snap = Snapshot(w=w, **state)
    with pytest.raises(ValueError):
        rule.update(w, state, np.array([1]), np.ones((1, 2), np.float32))
    snap.assert_unchanged()


@pytest.mark.parametrize("kind", ALL)
def test_check_only_changes_nothing(kind):
    rule = make_rule(kind, 0.1, hyperparameters(kind))
    w = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    state = rule.new_state(w)
    snap = Snapshot(w=w, **state)
    rule.update(w, state, np.array([[0, 4, 0]]), np.ones((1, 3, 3), np.float32), check_only=True)
    snap.assert_unchanged()
    rule.update(w, state, np.array([[0, 4, 0]]), np.ones((1, 3, 3), np.float32))
    assert not np.array_equal(w, snap.copies["w"][0])


def test_repr_shows_the_rule():
    assert repr(FusedSGD(0.5, fma=True)) == "FusedSGD(lr=0.5, fma=True)"
    assert repr(FusedSparseAdam()) == "FusedSparseAdam(lr=0.01, betas=(0.85, 0.99), eps=1e-08)"
    layer = fe.Embedding(4, 2, fused=FusedRowWiseAdagrad(0.2))
    assert repr(layer) == "Embedding(4, 2, sparse=False, fused=FusedRowWiseAdagrad(lr=0.2, eps=1e-10))"
    tpe = fe.TokenPositionEmbedding(4, 3, 2, fused=FusedAdagrad())
    assert repr(tpe) == ("TokenPositionEmbedding(4, 3, 2, sparse=False, fused=FusedAdagrad(lr=0.01, lr_decay=0.0, "
                         "initial_accumulator_value=0.0, eps=1e-10))")
    assert repr(fe.Embedding(4, 2)) == "Embedding(4, 2, sparse=False)"


@pytest.mark.parametrize("kind", ALL)
def test_fused_and_sparse_together_are_refused(kind):
    rule = make_rule(kind, 0.1, {})
    w = np.ones((3, 2), np.float32)
    for build in (lambda: fe.Embedding(3, 2, sparse=True, fused=rule),
                  lambda: fe.Embedding.from_pretrained(w, sparse=True, fused=rule),
                  lambda: fe.TokenPositionEmbedding(3, 2, 2, sparse=True, fused=rule),
                  lambda: fe.TokenPositionEmbedding.from_pretrained(w, w, sparse=True, fused=rule)):
        with pytest.raises(ValueError, match="fused"):
            build()
    with pytest.raises(TypeError, match="fused"):
        fe.Embedding(3, 2, fused=SGD)


@pytest.mark.parametrize("kind", ALL)
def test_layer_state_is_the_rules_state_of_its_own_weight(kind):
    rule = make_rule(kind, 0.1, {})
    w = np.arange(12, dtype=np.float32).reshape(6, 2)
    layer = fe.Embedding.from_pretrained(w, fused=rule)
    assert layer.fused is rule
    assert_same_state(layer.state, rule.new_state(w))
    tpe = fe.TokenPositionEmbedding.from_pretrained(w, w[:3], fused=rule)
    assert tpe.fused is rule and tpe.token.fused is rule and tpe.position.fused is rule
    assert_same_state(tpe.token.state, rule.new_state(w))
    assert_same_state(tpe.position.state, rule.new_state(w[:3]))
    assert fe.Embedding(3, 2).state is None


@pytest.mark.parametrize("kind", ALL)
def test_zero_grad_is_harmless(kind):
    rng = np.random.default_rng(1)
    layer = fe.Embedding(5, 3, fused=make_rule(kind, 0.1, {}), seed=0)
    layer(np.array([1, 3]))
    layer.backward(gradient(rng, (2, 3)))
    snap = Snapshot(w=layer.weight, **layer.state)
    layer.zero_grad()
    snap.assert_unchanged()
    assert layer.grad is None
    assert_bitwise(layer.dense_grad(), np.zeros((5, 3), np.float32))


# ---------------------------------------------------------------- bad input moves nothing

def _bad_cases(kind):
    """(name, change, error): change(w, state, ids, g) gives the bad (w, state, ids, g, kwargs)."""
    def state_with(key, value):
        return lambda w, s, i, g: (w, {**s, key: value}, i, g, {})
    cases = [
        ("id_equals_rows", lambda w, s, i, g: (w, s, np.array([[0, 6, 2]]), g, {}), IndexError),
        ("id_minus_one", lambda w, s, i, g: (w, s, np.array([[0, -1, 2]]), g, {}), IndexError),
        ("id_int64_max", lambda w, s, i, g: (w, s, np.array([[0, 2**63 - 1, 2]]), g, {}), IndexError),
        ("id_int32_min", lambda w, s, i, g: (w, s, np.array([[0, 1, -2**31]], np.int32), g, {}), IndexError),
        ("grad_float64", lambda w, s, i, g: (w, s, i, g.astype(np.float64), {}), TypeError),
        ("grad_wrong_dim", lambda w, s, i, g: (w, s, i, np.ones((1, 3, 4), np.float32), {}), ValueError),
        ("grad_wrong_leading", lambda w, s, i, g: (w, s, i, np.ones((3, 1, 3), np.float32), {}), ValueError),
        ("ids_float", lambda w, s, i, g: (w, s, i.astype(np.float64), g, {}), TypeError),
        ("padding_out_of_range", lambda w, s, i, g: (w, s, i, g, {"padding_idx": 6}), ValueError),
        ("weight_fortran", lambda w, s, i, g: (np.asfortranarray(w), s, i, g, {}), ValueError),
        ("grad_big_endian", lambda w, s, i, g: (w, s, i, g.astype(">f4"), {}), TypeError),
        ("weight_one_d", lambda w, s, i, g: (w.reshape(-1), s, i, g, {}), ValueError),
        ("weight_float64", lambda w, s, i, g: (w.astype(np.float64), s, i, g, {}), TypeError),
    ]
    if kind == "sgd":  # the coalescing rules read grad_out into a new array: sharing memory is harmless there
        cases += [("state_not_a_dict", lambda w, s, i, g: (w, None, i, g, {}), ValueError),
                  ("grad_is_a_view_of_weight", lambda w, s, i, g: (w, s, i, w[:3].reshape(1, 3, 3), {}), ValueError)]
    if kind == "adagrad":
        cases += [("sum_too_short", state_with("sum", np.zeros((5, 3), np.float32)), ValueError),
                  ("sum_per_row", state_with("sum", np.zeros(6, np.float32)), ValueError),
                  ("step_float", state_with("step", np.zeros((), np.float32)), TypeError),
                  ("no_step", lambda w, s, i, g: (w, {"sum": s["sum"]}, i, g, {}), ValueError)]
    if kind == "rowwise":
        cases += [("sum_per_element", state_with("sum", np.zeros((6, 3), np.float32)), ValueError),
                  ("sum_float64", state_with("sum", np.zeros(6)), TypeError),
                  ("sum_too_long", state_with("sum", np.zeros(7, np.float32)), ValueError)]
    if kind == "adam":
        cases += [("exp_avg_sq_wrong_shape", state_with("exp_avg_sq", np.zeros((6, 4), np.float32)), ValueError),
                  ("exp_avg_float64", state_with("exp_avg", np.zeros((6, 3))), TypeError),
                  ("step_two_d", state_with("step", np.zeros((1, 1), np.int64)), TypeError)]
    return [(kind,) + c for c in cases]


BAD = [c for kind in ALL for c in _bad_cases(kind)]


@pytest.mark.parametrize("kind,name,change,error", BAD, ids=[f"{c[0]}-{c[1]}" for c in BAD])
def test_bad_input_raises_and_moves_nothing(kind, name, change, error):
    """The same error from a plain update, from check_only=True and with a padding_idx (the kernel's
    check_only pass for those two, its own checks before its loop for a plain update), and nothing moved by any of them."""
    rng = np.random.default_rng(2)
    rule = make_rule(kind, 0.1, hyperparameters(kind))
    w = rng.standard_normal((6, 3)).astype(np.float32)
    state = rule.new_state(w)
    rule.update(w, state, np.array([1, 2]), gradient(rng, (2, 3)))  # a state that is not all zeros
    w, state, ids, g, kwargs = change(w, state, np.array([[0, 5, 2]]), gradient(rng, (1, 3, 3)))
    snap = Snapshot(w=w, **(state if isinstance(state, dict) else {}))
    for extra in ({}, {"check_only": True}, {"padding_idx": 5}):
        with pytest.raises(error):
            rule.update(w, state, ids, g, **{**extra, **kwargs})
        snap.assert_unchanged()


@pytest.mark.parametrize("kind", ALL)
def test_a_read_only_step_count_or_weight_moves_nothing(kind):
    rule = make_rule(kind, 0.1, {})
    w = np.ones((4, 2), np.float32)
    state = rule.new_state(w)
    ro = w.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        rule.update(ro, rule.new_state(ro), np.array([1]), np.ones((1, 2), np.float32))
    if "step" in state:
        state["step"].flags.writeable = False
        snap = Snapshot(w=w, **state)
        with pytest.raises(ValueError, match="read-only"):
            rule.update(w, state, np.array([1]), np.ones((1, 2), np.float32))
        snap.assert_unchanged()


@pytest.mark.parametrize("kind", ALL)
def test_a_fused_layer_refuses_a_bad_gradient_and_moves_nothing(kind):
    layer = fe.Embedding(6, 3, fused=make_rule(kind, 0.1, {}), seed=0)
    layer(np.array([[1, 2, 2]]))
    snap = Snapshot(w=layer.weight, **layer.state)
    for bad, error in ((np.ones((1, 3, 3)), TypeError), (np.ones((1, 3, 4), np.float32), ValueError),
                       (np.ones((3, 3), np.float32), ValueError)):
        with pytest.raises(error):
            layer.backward(bad)
    snap.assert_unchanged()
    assert layer.grad is None


def _token_position(kind, P=4):
    rng = np.random.default_rng(4)
    layer = fe.TokenPositionEmbedding(7, P, 3, fused=make_rule(kind, 0.1, hyperparameters(kind)), seed=1)
    layer(np.array([[1, 2, 3]]))
    layer.backward(gradient(rng, (1, 3, 3)))  # states that are not all zeros
    layer(np.array([[5, 5, 6, 0]]))
    return layer, gradient(rng, (1, 4, 3))


@pytest.mark.parametrize("kind", ALL)
def test_token_position_a_bad_position_update_leaves_the_token_table(kind):
    """The token update alone is fine; the position table was swapped for one row short after the
    forward call (its state fresh and right for it), so the position update is refused by its id range:
    neither table nor either state moves."""
    layer, g = _token_position(kind)
    short = layer.position.weight[:3].copy()
    layer.position.weight, layer.position.state = short, layer.position.fused.new_state(short)
    snap = Snapshot(tok=layer.token.weight, pos=layer.position.weight,
                    **{f"tok_{k}": v for k, v in layer.token.state.items()},
                    **{f"pos_{k}": v for k, v in layer.position.state.items()})
    with pytest.raises(IndexError):
        layer.backward(g)
    snap.assert_unchanged()


@pytest.mark.parametrize("kind", COALESCING)
def test_token_position_a_bad_position_state_leaves_the_token_table(kind):
    layer, g = _token_position(kind)
    key = "sum" if kind != "adam" else "exp_avg"
    layer.position.state = {**layer.position.state, key: np.zeros(9, np.float32)}
    snap = Snapshot(tok=layer.token.weight, pos=layer.position.weight,
                    **{f"tok_{k}": v for k, v in layer.token.state.items()})
    with pytest.raises(ValueError):
        layer.backward(g)
    snap.assert_unchanged()
    if "step" in layer.token.state:
        assert int(layer.token.state["step"]) == 1


@pytest.mark.parametrize("kind", ALL)
def test_token_position_a_bad_gradient_moves_nothing(kind):
    layer, g = _token_position(kind)
    snap = Snapshot(tok=layer.token.weight, pos=layer.position.weight,
                    **{f"tok_{k}": v for k, v in layer.token.state.items()},
                    **{f"pos_{k}": v for k, v in layer.position.state.items()})
    for bad, error in ((g.astype(np.float64), TypeError), (g[..., :2].copy(), ValueError)):
        with pytest.raises(error):
            layer.backward(bad)
    snap.assert_unchanged()


def test_fused_rules_are_exported():
    for name in ("FusedSGD", "FusedAdagrad", "FusedRowWiseAdagrad", "FusedSparseAdam"):
        assert name in optim.__all__ and getattr(fe.optim, name) is getattr(optim, name)


@pytest.mark.parametrize("fma", [False, True])
def test_the_book_model_trains_a_fused_layer_through_to_values(fma):
    """loss.backward() of the scalar engine reaches the fused layer through to_values: the step lands
    in the tables at once, one lookup after another (the Values' grads are 2 * hidden, in float32)."""
    rng = np.random.default_rng(9)
    tok0, pos0 = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    layer = fe.TokenPositionEmbedding.from_pretrained(tok0, pos0, fused=FusedSGD(0.1, fma=fma))
    ids = np.array([1, 3, 1])
    values = layer.to_values(ids)
    loss = sum((v * v for row in values for v in row), fe.reference.Value(0.0))
    loss.backward()
    g = np.array([[v.grad for v in row] for row in values]).astype(np.float32)
    assert_bitwise(g, 2 * (tok0[ids] + pos0[:3]))
    assert_bitwise(layer.token.weight, sgd_sequential(tok0, ids, g, 0.1, fma))
    assert_bitwise(layer.position.weight, sgd_sequential(pos0, np.arange(3), g, 0.1, fma))
    assert layer.token.grad is None and layer.position.grad is None
