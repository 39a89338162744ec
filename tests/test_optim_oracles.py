"""fe.optim against transcriptions written here: every weight, moment and step count, after every step.

The transcriptions below never call fastembed. They take weights, gradients (None, a dense array, or
(rows, values)) and hyperparameters, and keep their own moments and step counts, following the
docstrings of fastembed/optim.py:

- SGD: ``weight -= lr * grad`` (lr rounded to float32); a sparse gradient moves only its rows.
- Adam (the book's): t counts step() calls; every row of every parameter moves every step, a missing
  gradient counting as zero and a sparse one made dense.
- SparseAdam (lazy): only the rows of this step's gradient move (weight and both moments); the bias
  correction uses the parameter's own count of steps at which it had a gradient.

The Adam update is written in numpy float32, one IEEE operation at a time in the order of
``fe_adam_row`` (fastembed/_fastembed.h): lr, betas and eps rounded to float32, the bias corrections
``1 - beta**t`` computed in double and passed as float32 reciprocals, then
``w -= (lr * (m * inv_bias1)) / (sqrt(v * inv_bias2) + eps)``. numpy rounds each float32 operation as
C does (the build turns FMA contraction off), so results are compared bitwise;
`test_the_float32_transcription_is_the_documented_formula` ties that transcription to the docstring's
formula in float64 pure Python.
"""
import math

import numpy as np
import pytest

import fastembed as fe
from fastembed.optim import SGD, Adam, SparseAdam, linear_decay
from _helpers import SERIAL_ELEMENTS, adam_update, f32, num_threads

KINDS = ("SGD", "Adam", "SparseAdam")
BOOK = {"lr": 0.01, "betas": (0.85, 0.99), "eps": 1e-8}


# ---------------------------------------------------------------- the transcriptions

def _copies(weights):
    return [np.array(w, dtype=np.float32, copy=True) for w in weights]


class SGDModel:
    def __init__(self, weights, lr):
        self.w, self.lr = _copies(weights), lr

    def step(self, grads):
        lr = f32(self.lr)
        with np.errstate(all="ignore"):
            for w, g in zip(self.w, grads):
                if isinstance(g, tuple):
                    rows, values = g
                    w[rows] = w[rows] - lr * values
                elif g is not None:
                    w[...] = w - lr * g


class AdamModel:
    def __init__(self, weights, lr=BOOK["lr"], betas=BOOK["betas"], eps=BOOK["eps"]):
        self.w, self.lr, self.betas, self.eps = _copies(weights), lr, betas, eps
        self.m = [np.zeros_like(w) for w in self.w]
        self.v = [np.zeros_like(w) for w in self.w]
        self.t = 0

    def step(self, grads):
        self.t += 1
        for i, g in enumerate(grads):
            dense = np.zeros_like(self.w[i])
            if isinstance(g, tuple):
                rows, values = g
                dense[rows] = values
            elif g is not None:
                dense[...] = g
            adam_update(self.w[i], self.m[i], self.v[i], None, dense, self.lr, self.betas, self.eps, self.t)


class SparseAdamModel(AdamModel):
    def __init__(self, weights, **hyper):
        super().__init__(weights, **hyper)
        self.steps = [0] * len(self.w)

    def step(self, grads):
        self.t += 1
        for i, g in enumerate(grads):
            if g is None:
                continue
            rows, values = g
            self.steps[i] += 1
            adam_update(self.w[i], self.m[i], self.v[i], rows, values, self.lr, self.betas, self.eps,
                        self.steps[i])


MODELS = {"SGD": SGDModel, "Adam": AdamModel, "SparseAdam": SparseAdamModel}
OPTIMIZERS = {"SGD": SGD, "Adam": Adam, "SparseAdam": SparseAdam}


def build(kind, params, **hyper):
    """The optimizer over params and its transcription, from the same weights and settings."""
    if kind == "SGD":
        hyper = {"lr": hyper.get("lr", 0.1)}
    opt = OPTIMIZERS[kind](params, **hyper)
    return opt, MODELS[kind]([p.weight for p in opt.params], **hyper)


def same_bits(actual, expected, what, nan_ok=False):
    """Bitwise equal; with nan_ok, NaN where expected has NaN (IEEE leaves a NaN's sign and payload
    to the hardware) and bitwise equal elsewhere."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {actual.dtype}{actual.shape} != {expected.dtype}{expected.shape}")
    if nan_ok:
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(actual), nan), f"{what}: NaN at other places than the formula's"
        actual, expected = actual[~nan], expected[~nan]
    if actual.tobytes() != expected.tobytes():
        bad = np.flatnonzero(actual.reshape(-1).view(np.uint32) != expected.reshape(-1).view(np.uint32))
        raise AssertionError(f"{what}: {len(bad)} elements differ, first at flat index {bad[0]}: "
                             f"{actual.reshape(-1)[bad[0]]!r} vs {expected.reshape(-1)[bad[0]]!r}")


def assert_state(opt, model, nan_ok=False):
    """Every weight, both moments of every weight, t and the per-parameter step counts."""
    assert len(opt.params) == len(model.w)
    for i, p in enumerate(opt.params):
        same_bits(p.weight, model.w[i], f"weight of parameter {i}", nan_ok)
    if isinstance(model, AdamModel):
        assert len(opt.exp_avg) == len(opt.exp_avg_sq) == len(model.m)
        for i in range(len(model.m)):
            same_bits(opt.exp_avg[i], model.m[i], f"exp_avg of parameter {i}", nan_ok)
            same_bits(opt.exp_avg_sq[i], model.v[i], f"exp_avg_sq of parameter {i}", nan_ok)
        assert opt.t == model.t, f"t = {opt.t}, expected {model.t}"
    if isinstance(model, SparseAdamModel):
        assert opt.steps == model.steps, f"steps = {opt.steps}, expected {model.steps}"


def set_grads(params, grads):
    """Hand the gradients to the parameters, as SparseGrads where they are (rows, values)."""
    for p, g in zip(params, grads):
        p.grad = fe.SparseGrad(*g) if isinstance(g, tuple) else g


def sparse(rng, V, D, rows, scale=1.0):
    rows = np.asarray(sorted(rows), np.int64)
    return rows, (rng.standard_normal((len(rows), D)) * scale).astype(np.float32)


def dense(rng, V, D, rows):
    g = np.zeros((V, D), np.float32)
    g[list(rows)] = rng.standard_normal((len(rows), D)).astype(np.float32)
    return g


def documented_adam(w, m, v, g, lr, b1, b2, eps, t):
    """optim.Adam's docstring in float64 pure Python, on lists (updated in place)."""
    for i in range(len(w)):
        m[i] = b1 * m[i] + (1 - b1) * g[i]
        v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
        w[i] -= lr * (m[i] / (1 - b1**t)) / (math.sqrt(v[i] / (1 - b2**t)) + eps)


@pytest.mark.parametrize("eps", [1e-8, 0.5])
def test_the_float32_transcription_is_the_documented_formula(eps):
    """Gradients near 1e-6 make sqrt(v) comparable with eps = 1e-8, so eps inside the sqrt, or
    before the bias correction, would differ by far more than float32 rounding."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    m, v = np.zeros_like(w), np.zeros_like(w)
    w64, m64, v64 = w.astype(np.float64).ravel().tolist(), [0.0] * w.size, [0.0] * w.size
    for t in range(1, 6):
        g = (rng.standard_normal((4, 5)) * np.array([1e-6, 1e-3, 1.0, 30.0])[:, None]).astype(np.float32)
        adam_update(w, m, v, None, g, 0.01, (0.85, 0.99), eps, t)
        documented_adam(w64, m64, v64, g.astype(np.float64).ravel().tolist(), 0.01, 0.85, 0.99, eps, t)
        np.testing.assert_allclose(m.ravel(), m64, rtol=2e-6, atol=0)
        np.testing.assert_allclose(v.ravel(), v64, rtol=2e-6, atol=0)
        np.testing.assert_allclose(w.ravel(), w64, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- SGD

def test_sgd_dense_sparse_empty_and_missing_gradients_over_several_steps():
    """weight -= lr * grad with the lr of the moment (opt.lr read at each step); rows outside a
    sparse gradient and parameters without one stay as they are."""
    rng = np.random.default_rng(1)
    layers = [fe.Embedding(7, 3, seed=1), fe.Embedding(6, 3, sparse=True, seed=2), fe.Embedding(5, 3, seed=3)]
    opt, model = build("SGD", layers, lr=0.1)
    schedule = [
        [dense(rng, 7, 3, [0, 6]), sparse(rng, 6, 3, [1, 4]), None],
        [dense(rng, 7, 3, range(7)), sparse(rng, 6, 3, []), dense(rng, 5, 3, [2])],
        [None, sparse(rng, 6, 3, [0, 5]), sparse(rng, 5, 3, [4])],
    ]
    for lr, grads in zip((0.1, 0.5, 0.03), schedule):
        opt.lr = model.lr = lr
        set_grads(layers, grads)
        opt.step()
        model.step(grads)
        assert_state(opt, model)
    assert opt.lr == 0.03


@pytest.mark.parametrize("kind,layer_sparse", [("SGD", False), ("SGD", True), ("Adam", False), ("Adam", True),
                                               ("SparseAdam", True)])
def test_a_step_through_a_layer_with_duplicate_ids(kind, layer_sparse):
    """Repeated ids add their gradients (np.add.at's order): each row takes one update of the sum."""
    rng = np.random.default_rng(2)
    layer = fe.TokenPositionEmbedding(9, 5, 4, sparse=layer_sparse, seed=4)
    opt, model = build(kind, layer, lr=0.25)
    for ids in (np.array([[3, 3, 8, 3, 0]]), np.array([[8, 8], [1, 8]])):
        g = rng.standard_normal(ids.shape + (4,)).astype(np.float32)
        positions = np.broadcast_to(np.arange(ids.shape[-1]), ids.shape)
        opt.zero_grad()
        layer(ids)
        layer.backward(g)
        token, position = np.zeros((9, 4), np.float32), np.zeros((5, 4), np.float32)
        np.add.at(token, ids.reshape(-1), g.reshape(-1, 4))
        np.add.at(position, positions.reshape(-1), g.reshape(-1, 4))
        if layer_sparse:  # only the rows looked up, so untouched rows cannot move
            token = (np.unique(ids), token[np.unique(ids)])
            position = (np.unique(positions), position[np.unique(positions)])
        opt.step()
        model.step([token, position])
        assert_state(opt, model)


# ---------------------------------------------------------------- Adam (the book's)

def test_adam_moves_every_row_every_step():
    """A row with a gradient on step 1 only keeps moving on every later step by its momentum; a
    parameter with no gradient on a step moves too; the lr follows linear_decay."""
    rng = np.random.default_rng(3)
    layers = [fe.Embedding(6, 4, seed=5), fe.Embedding(5, 4, sparse=True, seed=6), fe.Embedding(3, 4, seed=7)]
    hyper = {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6}
    opt, model = build("Adam", layers, **hyper)
    num_steps = 5
    for step in range(num_steps):
        rows0 = [1, 2] if step == 0 else [1, 4]  # row 2: a gradient on step 1 only
        grads = [dense(rng, 6, 4, rows0), sparse(rng, 5, 4, [step % 5]), None if step == 2 else dense(rng, 3, 4, [0])]
        opt.lr = model.lr = linear_decay(0.02, step, num_steps)
        set_grads(layers, grads)
        before = [layer.weight.copy() for layer in layers]
        opt.step()
        model.step(grads)
        assert_state(opt, model)
        if step:
            assert not np.any(layers[0].weight[2] == before[0][2]), "row 2 stopped moving"
            assert not np.any(opt.exp_avg[0][2] == 0)
        seen = np.arange(step + 1)  # parameter 1's rows that have had a gradient by now
        assert not np.any(layers[1].weight[seen] == before[1][seen]), "a row without a gradient this step stopped"
        if step == 2:
            assert not np.any(layers[2].weight[0] == before[2][0]), "no gradient: momentum must still move it"
    assert opt.t == num_steps


def test_adam_defaults_are_the_books():
    rng = np.random.default_rng(4)
    layer = fe.Embedding(6, 3, seed=8)
    opt = Adam(layer)
    model = AdamModel([layer.weight], **BOOK)
    assert (opt.lr, opt.betas, opt.eps) == (BOOK["lr"], BOOK["betas"], BOOK["eps"])
    for rows in ([0, 5], [5], [1, 2, 3]):
        grads = [dense(rng, 6, 3, rows)]
        set_grads([layer], grads)
        opt.step()
        model.step(grads)
        assert_state(opt, model)


@pytest.mark.parametrize("hyper", [
    {"lr": 0.3, "betas": (0.85, 0.99), "eps": 1e-8},
    {"lr": 0.01, "betas": (0.5, 0.6), "eps": 1e-8},
    {"lr": 0.01, "betas": (0.0, 0.0), "eps": 1e-8},
    {"lr": 0.01, "betas": (0.85, 0.99), "eps": 0.5},
    {"lr": 0.01, "betas": (0.85, 0.99), "eps": 0.0},
], ids=["lr", "betas", "betas0", "eps_large", "eps0"])
@pytest.mark.parametrize("kind", ["Adam", "SparseAdam"])
def test_adam_family_hyperparameters(kind, hyper):
    """lr, betas and eps reach the update as the formula says; gradients down to 1e-6 make eps's
    place (after the square root, after the bias correction) visible."""
    rng = np.random.default_rng(5)
    layer = fe.Embedding(8, 4, sparse=kind == "SparseAdam", seed=9)
    opt, model = build(kind, layer, **hyper)
    for rows in ([0, 3, 7], [3], [1, 2, 3, 4], [7]):
        grads = [sparse(rng, 8, 4, rows, scale=10.0 ** -int(rng.integers(0, 7)))]
        set_grads([layer], grads)
        opt.step()
        model.step(grads)
        assert_state(opt, model, nan_ok=hyper["eps"] == 0)  # Adam, eps 0: a row never touched is 0 / 0


# ---------------------------------------------------------------- SparseAdam (lazy)

def test_sparse_adam_bias_correction_counts_each_parameters_own_steps():
    """a has a gradient on steps 1, 2, 3; b on step 3 only; c on steps 1 and 3; d never. On step 3 b
    takes its first Adam step (bias corrections for t = 1: each element moves by about lr), not the
    third one (t = 3, as a count of step() calls would give)."""
    rng = np.random.default_rng(6)
    layers = [fe.Embedding(6, 3, sparse=True, seed=10 + k) for k in range(4)]
    lr = 0.01
    opt, model = build("SparseAdam", layers, lr=lr, betas=(0.85, 0.99), eps=1e-8)
    plan = {1: ([0, 2], None, [5], None), 2: ([2, 3], None, None, None), 3: ([2], [1, 4], [0, 5], None)}
    for step, rows in plan.items():
        grads = [None if r is None else sparse(rng, 6, 3, r) for r in rows]
        set_grads(layers, grads)
        b_before = layers[1].weight.copy()
        opt.step()
        model.step(grads)
        assert_state(opt, model)
    assert opt.steps == [3, 1, 2, 0] and opt.t == 3
    # the same fact, free of float32 details: a first step moves by lr * g / (|g| + eps)
    rows_b, g_b = grads[1]
    moved = layers[1].weight[rows_b].astype(np.float64) - b_before[rows_b]
    g64 = g_b.astype(np.float64)
    np.testing.assert_allclose(moved, -lr * g64 / (np.abs(g64) + 1e-8), rtol=1e-4, atol=0)


def test_sparse_adam_untouched_rows_keep_weight_and_both_moments():
    """Through a sparse TokenPositionEmbedding with repeated ids: rows not looked up on a step keep
    their weight, exp_avg and exp_avg_sq bit for bit, however long ago they moved."""
    rng = np.random.default_rng(7)
    layer = fe.TokenPositionEmbedding(10, 6, 4, sparse=True, seed=14)
    opt, model = build("SparseAdam", layer, lr=0.05)
    for k, (ids, start) in enumerate(((np.array([[2, 7, 2, 2]]), 0), (np.array([[7, 7]]), 3),
                                      (np.array([[9, 0, 2]]), 1), (np.array([[7]]), 5))):
        opt.lr = model.lr = linear_decay(0.05, k, 4)  # read at each step
        g = rng.standard_normal(ids.shape + (4,)).astype(np.float32)
        positions = start + np.broadcast_to(np.arange(ids.shape[-1]), ids.shape)
        opt.zero_grad()
        layer(ids, positions=start)
        layer.backward(g)
        grads = []
        for used, V in ((ids, 10), (positions, 6)):
            total = np.zeros((V, 4), np.float32)
            np.add.at(total, used.reshape(-1), g.reshape(-1, 4))
            grads.append((np.unique(used), total[np.unique(used)]))
        before = [(p.weight.copy(), m.copy(), v.copy())
                  for p, m, v in zip(opt.params, opt.exp_avg, opt.exp_avg_sq)]
        opt.step()
        model.step(grads)
        assert_state(opt, model)
        for k, (rows, _) in enumerate(grads):
            untouched = np.setdiff1d(np.arange(len(before[k][0])), rows)
            for now, then, what in zip((opt.params[k].weight, opt.exp_avg[k], opt.exp_avg_sq[k]), before[k],
                                       ("weight", "exp_avg", "exp_avg_sq")):
                same_bits(now[untouched], then[untouched], f"untouched rows of {what} {k}")
    assert opt.steps == [4, 4] and opt.t == 4


def test_sparse_adam_empty_gradient_counts_a_step_and_moves_nothing():
    """Empty ids give a SparseGrad of no rows: a gradient all the same (torch's SparseAdam counts it
    too), so that parameter's step count goes up while no row moves; a parameter whose grad is None
    keeps its count."""
    rng = np.random.default_rng(8)
    a, b = fe.Embedding(5, 3, sparse=True, seed=15), fe.Embedding(4, 3, sparse=True, seed=16)
    opt, model = build("SparseAdam", [a, b])
    a(np.zeros(0, np.int64))
    a.backward(np.zeros((0, 3), np.float32))
    assert len(a.grad.rows) == 0
    opt.step()
    model.step([(np.zeros(0, np.int64), np.zeros((0, 3), np.float32)), None])
    assert_state(opt, model)
    assert opt.steps == [1, 0] and opt.t == 1
    for grads in ([sparse(rng, 5, 3, [1, 3]), sparse(rng, 4, 3, [0])], [None, sparse(rng, 4, 3, [])]):
        set_grads([a, b], grads)
        opt.step()
        model.step(grads)
        assert_state(opt, model)
    assert opt.steps == [2, 2] and opt.t == 3


# ---------------------------------------------------------------- all three: zero_grad, the threaded path

@pytest.mark.parametrize("kind", KINDS)
def test_zero_grad_drops_every_gradient_and_no_state(kind):
    """zero_grad sets every parameter's grad to None and leaves weights, moments and counts; the
    next step is one without gradients: SGD and SparseAdam move nothing, Adam moves by momentum."""
    rng = np.random.default_rng(9)
    layer = fe.TokenPositionEmbedding(7, 4, 3, sparse=True, seed=17)
    opt, model = build(kind, layer.parameters())
    grads = [sparse(rng, 7, 3, [0, 6]), sparse(rng, 4, 3, [1])]
    set_grads(layer.parameters(), grads)
    opt.step()
    model.step(grads)
    opt.zero_grad()
    assert layer.token.grad is None and layer.position.grad is None
    assert_state(opt, model)
    before = [p.weight.copy() for p in opt.params]
    opt.step()
    model.step([None, None])
    assert_state(opt, model)
    moved = [not np.array_equal(p.weight, w) for p, w in zip(opt.params, before)]
    assert moved == ([True, True] if kind == "Adam" else [False, False])


@pytest.mark.parametrize("kind", ["Adam", "SparseAdam"])
def test_adam_family_on_the_threaded_path(kind):
    """Enough touched rows for the kernel to split them over threads (U * D >= SERIAL_ELEMENTS):
    one thread and two give the transcription's bits, a small second parameter included."""
    rng = np.random.default_rng(10)
    V, D = 2048, 32
    plan = [(1200, [3]), (1100, []), (0, [0, 15])]
    assert min(n for n, _ in plan if n) * D >= SERIAL_ELEMENTS
    steps = [[sparse(rng, V, D, rng.choice(V, n, replace=False)), sparse(rng, 16, D, rows)] for n, rows in plan]
    steps[1][1] = None
    for threads in (1, 2):
        with num_threads(threads):
            layers = [fe.Embedding(V, D, sparse=True, seed=18), fe.Embedding(16, D, sparse=True, seed=19)]
            opt, model = build(kind, layers, lr=0.03)
            for grads in steps:
                set_grads(layers, grads)
                opt.step()
                model.step(grads)
                assert_state(opt, model)


# ---------------------------------------------------------------- a step that raises

def _bad_grads(kind):
    """(name, gradient for a (4, 3) table, the errors it may raise)."""
    out = [
        ("unsorted_rows", fe.SparseGrad(np.array([2, 1], np.int64), np.ones((2, 3), np.float32)), ValueError),
        ("row_out_of_range", fe.SparseGrad(np.array([0, 4], np.int64), np.ones((2, 3), np.float32)),
         (IndexError, ValueError)),
        ("values_wrong_dim", fe.SparseGrad(np.array([1], np.int64), np.ones((1, 2), np.float32)), ValueError),
        ("values_float64", fe.SparseGrad(np.array([1], np.int64), np.ones((1, 3), np.float64)), TypeError),
    ]
    if kind == "SparseAdam":
        out += [("dense", np.ones((4, 3), np.float32), TypeError),
                ("int32_rows", fe.SparseGrad(np.array([1], np.int32), np.ones((1, 3), np.float32)), TypeError)]
    else:
        out += [("dense_wrong_shape", np.ones((3, 3), np.float32), ValueError),
                ("dense_one_row", np.ones((1, 3), np.float32), ValueError),
                ("dense_float64", np.ones((4, 3), np.float64), TypeError)]
    return out


@pytest.mark.parametrize("kind,name,bad,errors", [(k,) + b for k in KINDS for b in _bad_grads(k)],
                         ids=[f"{k}-{b[0]}" for k in KINDS for b in _bad_grads(k)])
def test_a_bad_gradient_on_the_last_parameter_moves_nothing(kind, name, bad, errors):
    """Every parameter is checked before any moves: with good gradients on the first two parameters
    and a bad one on the last, the step raises with every weight, moment and count as it was; the
    next good step is then the transcription's second step, not its third."""
    rng = np.random.default_rng(11)
    layers = [fe.Embedding(6, 3, sparse=True, seed=20), fe.Embedding(5, 3, sparse=True, seed=21),
              fe.Embedding(4, 3, sparse=True, seed=22)]
    opt, model = build(kind, layers)
    first = [sparse(rng, 6, 3, [0, 5]), sparse(rng, 5, 3, [2]), sparse(rng, 4, 3, [3])]
    set_grads(layers, first)
    opt.step()
    model.step(first)
    good = [sparse(rng, 6, 3, [1, 5]), sparse(rng, 5, 3, [0, 2])]
    set_grads(layers, good + [bad])
    with pytest.raises(errors):
        opt.step()
    assert_state(opt, model)
    layers[2].grad = None
    opt.step()
    model.step(good + [None])
    assert_state(opt, model)


# ---------------------------------------------------------------- construction, linear_decay

@pytest.mark.parametrize("kind", KINDS)
def test_parameters_as_the_docstring_takes_them(kind):
    """A layer, a list or tuple, a generator; a TokenPositionEmbedding counts as its two tables, in
    order; each parameter gets its own zero moments of its weight's shape."""
    emb = fe.Embedding(5, 3, seed=23)
    tpe = fe.TokenPositionEmbedding(6, 4, 3, seed=24)
    cls = OPTIMIZERS[kind]
    lr = {"lr": 0.1} if kind == "SGD" else {}
    for given, expected in ((emb, [emb]), (tpe, [tpe.token, tpe.position]), ([tpe, emb], [tpe.token, tpe.position, emb]),
                            ((emb, tpe.position), [emb, tpe.position]), ((p for p in [emb]), [emb])):
        opt = cls(given, **lr)
        assert len(opt.params) == len(expected) and all(p is q for p, q in zip(opt.params, expected))
        if kind != "SGD":
            assert opt.t == 0
            for moments in (opt.exp_avg, opt.exp_avg_sq):
                assert len(moments) == len(expected)
                for m, p in zip(moments, expected):
                    same_bits(m, np.zeros_like(p.weight), "a fresh moment")
                    assert not np.shares_memory(m, p.weight)
            arrays = opt.exp_avg + opt.exp_avg_sq
            assert all(not np.shares_memory(x, y) for i, x in enumerate(arrays) for y in arrays[i + 1:])
        if kind == "SparseAdam":
            assert opt.steps == [0] * len(expected)


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_parameter_list_or_a_negative_lr_is_refused(kind):
    cls = OPTIMIZERS[kind]
    with pytest.raises(ValueError):
        cls([], lr=0.1)
    layer = fe.Embedding(3, 2, seed=25)
    for lr in (-1e-12, -1.0, -math.inf):
        with pytest.raises(ValueError, match="lr"):
            cls(layer, lr=lr)
    cls(layer, lr=0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_negative_lr_set_by_a_schedule_is_refused_and_nothing_moves(kind):
    """Setting opt.lr is how a schedule runs (linear_decay): a negative value is refused right there,
    the optimizer keeps its lr, and the next step is the transcription's step at that lr."""
    rng = np.random.default_rng(31)
    layer = fe.Embedding(6, 3, seed=31, sparse=kind == "SparseAdam")
    opt, model = build(kind, [layer], lr=0.05)
    for bad in (-0.1, -1e-30, -math.inf):
        with pytest.raises(ValueError, match="lr"):
            opt.lr = bad
        assert opt.lr == 0.05
    grad = sparse(rng, 6, 3, [0, 4]) if kind == "SparseAdam" else dense(rng, 6, 3, [0, 4])
    set_grads([layer], [grad])
    opt.step()
    model.step([grad])
    assert_state(opt, model)


@pytest.mark.parametrize("kind", ["Adam", "SparseAdam"])
@pytest.mark.parametrize("field,value", [("betas", (1.0, 0.99)), ("betas", (0.9, 1.0)), ("betas", (-0.1, 0.99)),
                                         ("betas", (0.9,)), ("betas", (math.nan, 0.99)), ("eps", -1e-8),
                                         ("eps", math.nan)])
def test_adam_hyperparameters_out_of_range_are_refused(kind, field, value):
    """A beta of 1 would make the bias correction divide by zero (every weight NaN): refused when the
    optimizer is built, and by step() when the attribute is changed later, with nothing moved."""
    with pytest.raises(ValueError, match=field):
        OPTIMIZERS[kind](fe.Embedding(4, 2, seed=32), **{field: value})
    rng = np.random.default_rng(32)
    layer = fe.Embedding(4, 2, seed=32, sparse=kind == "SparseAdam")
    opt, model = build(kind, [layer])
    setattr(opt, field, value)
    grad = sparse(rng, 4, 2, [1, 3]) if kind == "SparseAdam" else dense(rng, 4, 2, [1, 3])
    set_grads([layer], [grad])
    with pytest.raises(ValueError, match=field):
        opt.step()
    assert_state(opt, model)  # the model took no step either


def test_linear_decay_values():
    """lr * (1 - step / num_steps): lr at step 0, lr / num_steps at the last step."""
    for lr, num_steps in ((0.01, 10), (0.5, 7), (1.0, 1)):
        for step in range(num_steps):
            assert linear_decay(lr, step, num_steps) == lr * (1.0 - step / num_steps)
        assert linear_decay(lr, 0, num_steps) == lr
        assert math.isclose(linear_decay(lr, num_steps - 1, num_steps), lr / num_steps, rel_tol=1e-12)
    for num_steps in (0, -3):
        with pytest.raises(ValueError, match="num_steps"):
            linear_decay(0.01, 0, num_steps)
