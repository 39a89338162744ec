"""nn layers (gradient accumulation, sparse gradients, positions) and the optimizers.

Adam is checked against a pure-Python transcription of the book's update written
here; SparseAdam and SGD against numpy transcriptions; layers against np.add.at.
"""
import math

import numpy as np
import pytest

import fastembed as fe
from fastembed.optim import SGD, Adam, SparseAdam, linear_decay
from _helpers import assert_bitwise, num_threads, positions_oracle

BOOK_LR, B1, B2, EPS = 0.01, 0.85, 0.99, 1e-8


def _add_at(rows, D, ids, grad, into=None):
    out = np.zeros((rows, D), np.float32) if into is None else into.copy()
    np.add.at(out, np.asarray(ids, dtype=np.int64), grad)
    return out


# ---------------------------------------------------------------- Embedding

def test_embedding_init():
    a, b = fe.Embedding(597, 32, seed=3), fe.Embedding(597, 32, seed=3)
    assert a.weight.dtype == np.float32 and a.weight.shape == (597, 32) and a.weight.flags.c_contiguous
    assert_bitwise(a.weight, b.weight)
    assert abs(float(a.weight.std()) - 0.08) < 0.004  # the book's N(0, 0.08) init
    assert a.grad is None


def test_embedding_dense_grad_accumulates_until_zero_grad():
    rng = np.random.default_rng(0)
    layer = fe.Embedding(6, 3, seed=0)
    ids1, ids2 = np.array([[1, 4, 1], [0, 1, 5]]), np.array([4, 4, 2])
    g1 = rng.standard_normal((2, 3, 3)).astype(np.float32)
    g2 = rng.standard_normal((3, 3)).astype(np.float32)
    assert_bitwise(layer(ids1), layer.weight[ids1])
    layer.backward(g1)
    assert_bitwise(layer.grad, _add_at(6, 3, ids1, g1))
    assert_bitwise(layer(ids2), layer.weight[ids2])
    layer.backward(g2)
    expected = _add_at(6, 3, ids2, g2, into=_add_at(6, 3, ids1, g1))
    assert_bitwise(layer.grad, expected)
    assert layer.grad[3].tolist() == [0.0, 0.0, 0.0]
    layer.zero_grad()
    assert layer.grad is None
    assert_bitwise(layer.dense_grad(), np.zeros((6, 3), np.float32))
    layer.backward(g2)  # zero_grad drops the gradient, not the last forward
    assert_bitwise(layer.grad, _add_at(6, 3, ids2, g2))


def test_embedding_sparse_grad_accumulates_merged():
    rng = np.random.default_rng(1)
    layer = fe.Embedding(9, 4, sparse=True, seed=1)
    calls = [np.array([[7, 2, 7]]), np.array([2, 0]), np.array(5), np.array([[8], [0]])]
    grads = [rng.standard_normal(ids.shape + (4,)).astype(np.float32) for ids in calls]
    total = None
    seen = set()
    for ids, g in zip(calls, grads):
        layer(ids)
        layer.backward(g)
        part = _add_at(9, 4, ids, g)  # each backward is its own sum ...
        total = part if total is None else total + part  # ... added to what was there
        seen |= set(np.asarray(ids).reshape(-1).tolist())
        grad = layer.grad
        assert isinstance(grad, fe.SparseGrad)
        assert grad.rows.dtype == np.int64 and grad.values.dtype == np.float32
        assert_bitwise(grad.rows, np.array(sorted(seen), np.int64))  # sorted, unique, touched rows only
        assert_bitwise(grad.values, total[grad.rows])
        assert_bitwise(grad.to_dense(9), total)
        assert_bitwise(layer.dense_grad(), total)
    layer.zero_grad()
    assert layer.grad is None


def test_sparse_backward_checks_the_embedding_dim():
    # The gradient of a (V, D) table has D columns: a wrong-D grad must be refused at backward,
    # not kept as a SparseGrad that only fails later (in the optimizer, or not at all).
    layer = fe.Embedding(5, 3, sparse=True, seed=0)
    layer([1, 2])
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)|\(2, 4\).*\(2, 3\)"):
        layer.backward(np.ones((2, 4), np.float32))
    assert layer.grad is None
    tpe = fe.TokenPositionEmbedding(5, 4, 3, sparse=True, seed=0)
    tpe([1, 2])
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)|\(2, 4\).*\(2, 3\)"):
        tpe.backward(np.ones((2, 4), np.float32))
    assert tpe.token.grad is None and tpe.position.grad is None


@pytest.mark.parametrize("sparse", [False, True])
def test_backward_before_forward_raises(sparse):
    with pytest.raises(RuntimeError, match="before"):
        fe.Embedding(4, 2, sparse=sparse).backward(np.ones((1, 2), np.float32))
    with pytest.raises(RuntimeError, match="before"):
        fe.TokenPositionEmbedding(4, 3, 2, sparse=sparse).backward(np.ones((1, 2), np.float32))


def test_embedding_out_argument():
    layer = fe.Embedding(6, 3, seed=2)
    out = np.full((2, 2, 3), np.nan, np.float32)
    ids = [[0, 5], [5, 5]]
    assert layer(ids, out=out) is out
    assert_bitwise(out, layer.weight[np.array(ids)])


# ---------------------------------------------------------------- TokenPositionEmbedding

POSITIONS = {
    "none": None,
    "int": 2,
    "np_int": np.int64(1),
    "array": np.array([[3, 0, 1], [5, 5, 2]]),
    "broadcast": np.array([4, 0, 2]),
    "list": [[1, 1, 1], [0, 2, 4]],
}


@pytest.mark.parametrize("name", POSITIONS)
def test_token_position_dense_forward_and_accumulating_backward(name):
    positions = POSITIONS[name]
    rng = np.random.default_rng(3)
    layer = fe.TokenPositionEmbedding(7, 6, 4, seed=3)
    ids = np.array([[6, 0, 6], [2, 6, 6]], np.int32)
    p = positions_oracle(ids.shape, positions)
    tok, pos = layer.token.weight, layer.position.weight
    assert_bitwise(layer(ids, positions), tok[ids] + pos[p])
    g1 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    g2 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    layer.backward(g1)
    layer.backward(g2)  # the same forward, twice: accumulates
    assert_bitwise(layer.token.grad, _add_at(7, 4, ids, g2, into=_add_at(7, 4, ids, g1)))
    assert_bitwise(layer.position.grad, _add_at(6, 4, p, g2, into=_add_at(6, 4, p, g1)))
    layer.zero_grad()
    assert layer.token.grad is None and layer.position.grad is None


@pytest.mark.parametrize("name", POSITIONS)
def test_token_position_sparse_backward(name):
    positions = POSITIONS[name]
    rng = np.random.default_rng(4)
    layer = fe.TokenPositionEmbedding(7, 6, 4, sparse=True, seed=4)
    ids = np.array([[6, 0, 6], [2, 6, 6]])
    p = positions_oracle(ids.shape, positions)
    assert_bitwise(layer(ids, positions=positions), layer.token.weight[ids] + layer.position.weight[p])
    g1 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    layer.backward(g1)
    for grad, used, rows in ((layer.token.grad, ids, 7), (layer.position.grad, p, 6)):
        assert isinstance(grad, fe.SparseGrad)
        assert_bitwise(grad.rows, np.unique(used).astype(np.int64))
        assert_bitwise(grad.to_dense(rows), _add_at(rows, 4, used, g1))
    # a second forward + backward merges into the same SparseGrad
    ids2 = np.array([[1, 1, 0]])
    layer(ids2, positions=1)
    g2 = rng.standard_normal((1, 3, 4)).astype(np.float32)
    layer.backward(g2)
    p2 = positions_oracle(ids2.shape, 1)
    assert_bitwise(layer.token.grad.rows, np.union1d(ids, ids2).astype(np.int64))
    assert_bitwise(layer.token.grad.to_dense(7), _add_at(7, 4, ids, g1) + _add_at(7, 4, ids2, g2))
    assert_bitwise(layer.position.grad.to_dense(6), _add_at(6, 4, p, g1) + _add_at(6, 4, p2, g2))


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("positions", [None, 3, np.array(2), np.array(2, np.int32)], ids=["none", "int", "0d", "0d32"])
def test_token_position_zero_d_ids(sparse, positions):
    # A 0-d id is a sequence of one token: hidden has shape (D,), at position 0 (or the start given).
    layer = fe.TokenPositionEmbedding(5, 4, 3, sparse=sparse, seed=5)
    p = 0 if positions is None else int(positions)
    h = layer(np.int64(4), positions)
    assert_bitwise(h, layer.token.weight[4] + layer.position.weight[p])
    g = np.array([1.5, -2.0, 0.25], np.float32)
    layer.backward(g)
    e_tok, e_pos = np.zeros((5, 3), np.float32), np.zeros((4, 3), np.float32)
    e_tok[4] += g
    e_pos[p] += g
    assert_bitwise(layer.token.dense_grad(), e_tok)
    assert_bitwise(layer.position.dense_grad(), e_pos)


@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_zero_d_ids(sparse):
    layer = fe.Embedding(5, 3, sparse=sparse, seed=6)
    assert_bitwise(layer(2), layer.weight[2])
    g = np.array([1.0, 2.0, 3.0], np.float32)
    layer.backward(g)
    expected = np.zeros((5, 3), np.float32)
    expected[2] = g
    assert_bitwise(layer.dense_grad(), expected)


# ---------------------------------------------------------------- Adam: the book's, against a transcription

def _book_adam(w, m, v, g, t, lr):
    """The book's update, element by element, on float64 lists (w, m, v updated in place)."""
    for i in range(len(w)):
        m[i] = B1 * m[i] + (1 - B1) * g[i]
        v[i] = B2 * v[i] + (1 - B2) * g[i] ** 2
        m_hat = m[i] / (1 - B1**t)
        v_hat = v[i] / (1 - B2**t)
        w[i] -= lr * m_hat / (math.sqrt(v_hat) + EPS)


def test_adam_matches_the_book_transcription_over_several_steps():
    rng = np.random.default_rng(7)
    emb = fe.Embedding(6, 3, seed=7)  # a token table
    other = fe.Embedding(4, 3, seed=8)  # a second parameter: on step 3 it gets no gradient at all
    opt = Adam([emb, other])
    assert opt.lr == BOOK_LR and opt.betas == (B1, B2) and opt.eps == EPS
    num_steps = 5
    state = {}
    for name, layer in (("emb", emb), ("other", other)):
        n = layer.weight.size
        state[name] = (layer.weight.astype(np.float64).reshape(-1).tolist(), [0.0] * n, [0.0] * n)
    # row 5 of emb is looked up on steps 0 and 1 only; afterwards it moves by momentum alone
    schedule = [np.array([[5, 1, 1]]), np.array([2, 5]), np.array([0, 1, 2]), np.array([[3]]), np.array([1, 1])]
    for step, ids in enumerate(schedule):
        lr = 0.01 * (1 - step / num_steps)
        opt.lr = linear_decay(0.01, step, num_steps)
        opt.zero_grad()
        g = rng.standard_normal(ids.shape + (3,)).astype(np.float32)
        emb(ids)
        emb.backward(g)
        grads = {"emb": _add_at(6, 3, ids, g)}
        if step != 3:
            o_ids = np.array([step % 4, 3])
            og = rng.standard_normal((2, 3)).astype(np.float32)
            other(o_ids)
            other.backward(og)
            grads["other"] = _add_at(4, 3, o_ids, og)
        else:
            grads["other"] = np.zeros((4, 3), np.float32)
            assert other.grad is None
        before_row5 = emb.weight[5].copy()
        opt.step()
        for k, (name, layer) in enumerate((("emb", emb), ("other", other))):
            w, m, v = state[name]
            _book_adam(w, m, v, grads[name].astype(np.float64).reshape(-1).tolist(), step + 1, lr)
            np.testing.assert_allclose(layer.weight.reshape(-1), w, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(opt.exp_avg[k].reshape(-1), m, rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(opt.exp_avg_sq[k].reshape(-1), v, rtol=1e-5, atol=1e-12)
        if step >= 2:  # no gradient for row 5, yet it moves (the book's Adam is dense)
            assert grads["emb"][5].tolist() == [0.0, 0.0, 0.0]
            assert not np.array_equal(emb.weight[5], before_row5)
    assert opt.t == num_steps


def test_adam_on_a_token_position_layer_and_sparse_grads_are_made_dense():
    rng = np.random.default_rng(9)
    dense = fe.TokenPositionEmbedding(8, 4, 3, seed=9)
    sparse = fe.TokenPositionEmbedding.from_pretrained(dense.token.weight, dense.position.weight, sparse=True)
    o_dense, o_sparse = Adam(dense), Adam(sparse)
    assert len(o_dense.params) == 2
    for ids in (np.array([[1, 2, 2, 7]]), np.array([[0, 0]]), np.array([[5, 6, 7]])):
        g = rng.standard_normal(ids.shape + (3,)).astype(np.float32)
        for layer, opt in ((dense, o_dense), (sparse, o_sparse)):
            opt.zero_grad()
            layer(ids)
            layer.backward(g)
            opt.step()
        assert_bitwise(sparse.token.weight, dense.token.weight)
        assert_bitwise(sparse.position.weight, dense.position.weight)


def test_adam_first_step_without_any_gradient_moves_nothing():
    emb = fe.Embedding(5, 2, seed=10)
    before = emb.weight.copy()
    opt = Adam(emb)
    opt.step()  # m = v = 0: the update is 0 / (0 + eps)
    assert_bitwise(emb.weight, before)
    assert_bitwise(opt.exp_avg[0], np.zeros((5, 2), np.float32))
    assert_bitwise(opt.exp_avg_sq[0], np.zeros((5, 2), np.float32))
    assert opt.t == 1  # a step without gradients still counts for the bias correction


# ---------------------------------------------------------------- SparseAdam: lazy, touched rows only

def test_sparse_adam_moves_only_touched_rows():
    rng = np.random.default_rng(11)
    emb = fe.Embedding(8, 3, sparse=True, seed=11)
    opt = SparseAdam(emb, lr=0.02)
    schedule = [np.array([1, 3, 3]), np.array([[3, 4]]), np.array([0, 7, 0]), np.array([4])]
    for t, ids in enumerate(schedule, start=1):
        opt.zero_grad()
        g = rng.standard_normal(ids.shape + (3,)).astype(np.float32)
        emb(ids)
        emb.backward(g)
        w0, m0, v0 = emb.weight.copy(), opt.exp_avg[0].copy(), opt.exp_avg_sq[0].copy()
        opt.step()
        touched = np.unique(ids)
        untouched = np.setdiff1d(np.arange(8), touched)
        assert_bitwise(emb.weight[untouched], w0[untouched])
        assert_bitwise(opt.exp_avg[0][untouched], m0[untouched])
        assert_bitwise(opt.exp_avg_sq[0][untouched], v0[untouched])
        # touched rows: the update in float64 numpy, from the state before the step
        gd = _add_at(8, 3, ids, g).astype(np.float64)[touched]
        m = B1 * m0[touched].astype(np.float64) + (1 - B1) * gd
        v = B2 * v0[touched].astype(np.float64) + (1 - B2) * gd**2
        w = w0[touched].astype(np.float64) - 0.02 * (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS)
        np.testing.assert_allclose(opt.exp_avg[0][touched], m, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(opt.exp_avg_sq[0][touched], v, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(emb.weight[touched], w, rtol=1e-5, atol=1e-7)
        assert not np.array_equal(emb.weight[touched], w0[touched])
        assert opt.steps == [t] and opt.t == t


def test_sparse_adam_with_a_dense_grad_raises_and_changes_nothing():
    emb = fe.Embedding(5, 2, seed=12)  # dense
    opt = SparseAdam(emb)
    emb([1, 2])
    emb.backward(np.ones((2, 2), np.float32))
    w = emb.weight.copy()
    with pytest.raises(TypeError, match="SparseGrad|sparse"):
        opt.step()
    assert_bitwise(emb.weight, w)
    assert_bitwise(opt.exp_avg[0], np.zeros((5, 2), np.float32))
    assert_bitwise(opt.exp_avg_sq[0], np.zeros((5, 2), np.float32))
    assert opt.t == 0


def test_sparse_adam_leaves_a_parameter_without_grad_unchanged():
    rng = np.random.default_rng(13)
    layer = fe.TokenPositionEmbedding(6, 4, 2, sparse=True, seed=13)
    opt = SparseAdam(layer)
    layer([[1, 2]])
    layer.backward(rng.standard_normal((1, 2, 2)).astype(np.float32))
    opt.step()
    layer.position.grad = None  # this step only the token table has a gradient
    layer([[3, 3]])
    layer.backward(rng.standard_normal((1, 2, 2)).astype(np.float32))
    layer.position.grad = None
    pw, pm, pv = layer.position.weight.copy(), opt.exp_avg[1].copy(), opt.exp_avg_sq[1].copy()
    opt.step()
    assert_bitwise(layer.position.weight, pw)
    assert_bitwise(opt.exp_avg[1], pm)
    assert_bitwise(opt.exp_avg_sq[1], pv)
    assert opt.steps == [2, 1] and opt.t == 2  # the position table's own count: one step with a gradient


@pytest.mark.parametrize("kind", ["Adam", "SparseAdam"])
def test_optimizer_step_that_raises_changes_nothing(kind):
    # Two parameters; the second one's gradient is bad. The step must not update the first
    # and then raise (a half-applied optimizer step), nor count the step.
    sparse = kind == "SparseAdam"
    token = fe.Embedding(6, 3, sparse=sparse, seed=14)
    position = fe.Embedding(4, 3, sparse=sparse, seed=15)
    opt = (SparseAdam if sparse else Adam)([token, position])
    token([1, 2])
    token.backward(np.ones((2, 3), np.float32))
    if sparse:  # rows not increasing
        position.grad = fe.SparseGrad(np.array([2, 1], np.int64), np.ones((2, 3), np.float32))
        match = "increasing"
    else:  # a dense grad of the wrong shape
        position.grad = np.ones((3, 3), np.float32)
        match = r"\(4, 3\).*\(3, 3\)"
    tw, pw, t_before = token.weight.copy(), position.weight.copy(), opt.t
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_bitwise(position.weight, pw)
    assert_bitwise(token.weight, tw)
    for k, shape in enumerate(((6, 3), (4, 3))):
        assert_bitwise(opt.exp_avg[k], np.zeros(shape, np.float32))
        assert_bitwise(opt.exp_avg_sq[k], np.zeros(shape, np.float32))
    assert opt.t == t_before
    assert getattr(opt, "steps", [0, 0]) == [0, 0]


def test_adam_and_sparse_adam_threaded_path_is_bitwise_stable():
    # (V, D) = (2048, 32): 65536 elements per step, past the threaded threshold
    rng = np.random.default_rng(16)
    ids = rng.integers(0, 2048, size=(64, 64))
    g = rng.standard_normal((64, 64, 32)).astype(np.float32)
    results = {}
    for n in (1, 2):
        with num_threads(n):
            dense = fe.Embedding(2048, 32, seed=16)
            sparse = fe.Embedding(2048, 32, sparse=True, seed=16)
            for layer, opt in ((dense, Adam(dense)), (sparse, SparseAdam(sparse))):
                for _ in range(2):
                    opt.zero_grad()
                    layer(ids)
                    layer.backward(g)
                    opt.step()
            results[n] = (dense.weight.copy(), sparse.weight.copy())
    assert_bitwise(results[1][0], results[2][0])
    assert_bitwise(results[1][1], results[2][1])
    # and against numpy: two dense Adam steps with the same gradient
    w = fe.Embedding(2048, 32, seed=16).weight.astype(np.float64)
    grad = _add_at(2048, 32, ids, g).astype(np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t in (1, 2):
        m = B1 * m + (1 - B1) * grad
        v = B2 * v + (1 - B2) * grad**2
        w = w - BOOK_LR * (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS)
    np.testing.assert_allclose(results[1][0], w, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- SGD

def test_sgd_dense_and_sparse():
    rng = np.random.default_rng(17)
    dense = fe.Embedding(6, 3, seed=17)
    sparse = fe.Embedding.from_pretrained(dense.weight, sparse=True)
    ids = np.array([[4, 1, 4]])
    g = rng.standard_normal((1, 3, 3)).astype(np.float32)
    grad = _add_at(6, 3, ids, g).astype(np.float64)
    w0 = dense.weight.copy()
    expected = w0.astype(np.float64) - 0.1 * grad
    for layer in (dense, sparse):
        layer(ids)
        layer.backward(g)
        SGD(layer, lr=0.1).step()
        np.testing.assert_allclose(layer.weight, expected, rtol=1e-6, atol=1e-8)
    untouched = [0, 2, 3, 5]
    assert_bitwise(sparse.weight[untouched], w0[untouched])
    assert not np.array_equal(sparse.weight[[1, 4]], w0[[1, 4]])
    none = fe.Embedding(3, 2, seed=18)
    before = none.weight.copy()
    SGD(none, lr=0.1).step()  # no gradient: nothing moves
    assert_bitwise(none.weight, before)


def test_linear_decay_is_the_book_schedule():
    assert linear_decay(0.01, 0, 10) == 0.01
    assert math.isclose(linear_decay(0.01, 5, 10), 0.005)
    assert math.isclose(linear_decay(0.01, 9, 10), 0.001)
    with pytest.raises(ValueError, match="0"):
        linear_decay(0.01, 0, 0)
