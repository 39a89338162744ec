"""LookupGrad (sparse=True, coalesce=False: torch's uncoalesced layout) through the layers and fe.optim.

Oracles written here, independent of fastembed's code under test:
- per-lookup SGD: a Python loop in ids order, ``w[i] = w[i] - f32(lr) * v[k]``;
- coalescing: each row's sum formed in ids order by float32 adds from 0 (``coalesce_loop``), handed to the
  same optimizer as a SparseGrad, and the float32 transcriptions below (Adagrad, row-wise Adagrad) or
  _helpers.adam_update (Adam, SparseAdam), one IEEE operation at a time in the kernels' documented order;
- the layers: ids.reshape(-1) and grad_out.reshape(-1, D) (the documented layout), np.add.at for to_dense,
  _helpers.positions_oracle for a TokenPositionEmbedding's positions, a per-bag loop for EmbeddingBag.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastembed as fe
from fastembed import _kernels
from fastembed.optim import SGD, Adagrad, Adam, RowWiseAdagrad, SparseAdam
from _helpers import (FAST, SERIAL_ELEMENTS, Snapshot, adam_update, assert_bitwise, num_threads, positions_oracle,
                      serial_elements, two_thread_team)

F = np.float32
KINDS = ("SGD", "Adagrad", "RowWiseAdagrad", "SparseAdam", "Adam")
ADAGRAD = {"lr": 0.3, "lr_decay": 0.25, "initial_accumulator_value": 0.7, "eps": 1e-3}
ADAM = {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6}


# ---------------------------------------------------------------- oracles

def coalesce_loop(ids, values):
    """(rows sorted int64, sums): each row's lookups added in ids order into float32 zeros, one add at a time."""
    ids = np.asarray(ids).reshape(-1)
    values = np.asarray(values, F).reshape(len(ids), np.shape(values)[-1])
    rows = sorted(set(int(i) for i in ids))
    sums = {r: np.zeros(values.shape[1], F) for r in rows}
    for k, i in enumerate(ids):
        sums[int(i)] = sums[int(i)] + values[k]
    out = np.zeros((len(rows), values.shape[1]), F)
    for j, r in enumerate(rows):
        out[j] = sums[r]
    return np.array(rows, np.int64), out


def sgd_loop(w, ids, values, lr):
    w = w.copy()
    with np.errstate(all="ignore"):
        for k, i in enumerate(np.asarray(ids).reshape(-1)):
            w[i] = w[i] - F(lr) * values[k]
    return w


class Model:
    """The optimizers' transcriptions on coalesced (rows, sums); grads None skip a parameter."""

    def __init__(self, kind, weights, hyper):
        self.kind, self.hyper = kind, hyper
        self.w = [w.copy() for w in weights]
        init = hyper.get("initial_accumulator_value", 0.0)
        if kind == "Adagrad":
            self.s = [np.full_like(w, init) for w in self.w]
        elif kind == "RowWiseAdagrad":
            self.s = [np.zeros(len(w), F) for w in self.w]
        else:
            self.s = None
        self.m = [np.zeros_like(w) for w in self.w]
        self.v = [np.zeros_like(w) for w in self.w]
        self.steps, self.t = [0] * len(self.w), 0

    def step(self, lookups):
        h = self.hyper
        self.t += 1
        for i, lk in enumerate(lookups):
            w = self.w[i]
            if lk is None:
                if self.kind == "Adam":
                    adam_update(w, self.m[i], self.v[i], None, np.zeros_like(w), h["lr"], h["betas"], h["eps"], self.t)
                continue
            ids, values = lk
            self.steps[i] += 1
            if self.kind == "SGD":
                self.w[i] = sgd_loop(w, ids, values, h["lr"])
                continue
            rows, g = coalesce_loop(ids, values)
            with np.errstate(all="ignore"):
                if self.kind == "Adagrad":
                    clr = h["lr"] / (1 + (self.steps[i] - 1) * h["lr_decay"])
                    s = self.s[i][rows] + g * g
                    self.s[i][rows] = s
                    w[rows] = w[rows] - (F(clr) * g) / (np.sqrt(s) + F(h["eps"]))
                elif self.kind == "RowWiseAdagrad":
                    if w.shape[1] == 0:
                        continue
                    acc = np.zeros(len(rows), F)
                    for d in range(w.shape[1]):
                        acc = acc + g[:, d] * g[:, d]
                    G = self.s[i][rows] + acc / F(w.shape[1])
                    self.s[i][rows] = G
                    w[rows] = w[rows] - (F(h["lr"]) * g) / (np.sqrt(G) + F(h["eps"]))[:, None]
                elif self.kind == "SparseAdam":
                    adam_update(w, self.m[i], self.v[i], rows, g, h["lr"], h["betas"], h["eps"], self.steps[i])
                else:  # Adam: every row, the gradient made dense
                    dense = np.zeros_like(w)
                    dense[rows] = g
                    adam_update(w, self.m[i], self.v[i], None, dense, h["lr"], h["betas"], h["eps"], self.t)


def hyper_of(kind):
    return {"SGD": {"lr": 0.3}, "Adagrad": ADAGRAD, "RowWiseAdagrad": {"lr": 0.2, "eps": 1e-3},
            "SparseAdam": ADAM, "Adam": ADAM}[kind]


def make_opt(kind, params):
    cls = {"SGD": SGD, "Adagrad": Adagrad, "RowWiseAdagrad": RowWiseAdagrad, "SparseAdam": SparseAdam,
           "Adam": Adam}[kind]
    return cls(params, **hyper_of(kind))


def opt_state(opt):
    """Every array and count of opt's state, as copies."""
    out = {}
    for name in ("state_sum", "exp_avg", "exp_avg_sq"):
        for i, a in enumerate(getattr(opt, name, [])):
            out[f"{name}{i}"] = a.copy()
    out["steps"] = list(getattr(opt, "steps", []))
    out["t"] = getattr(opt, "t", None)
    return out


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert_bitwise(a[k], b[k])
        else:
            assert a[k] == b[k], k


def assert_model(opt, model):
    for i, p in enumerate(opt.params):
        assert_bitwise(p.weight, model.w[i])
    if model.s is not None:
        for i in range(len(model.s)):
            assert_bitwise(opt.state_sum[i], model.s[i])
    if model.kind in ("SparseAdam", "Adam"):
        for i in range(len(model.m)):
            assert_bitwise(opt.exp_avg[i], model.m[i])
            assert_bitwise(opt.exp_avg_sq[i], model.v[i])
    if model.kind == "Adagrad":
        assert opt.steps == model.steps
    if model.kind == "SparseAdam":
        assert opt.steps == model.steps and opt.t == model.t


def random_lookup(rng, V, D, N, dtype=np.int64, pool=None):
    ids = rng.integers(0, pool or V, N).astype(dtype)
    return ids, (rng.standard_normal((N, D)) * 2.0 ** rng.integers(-3, 4)).astype(F)


# ---------------------------------------------------------------- 1. each optimizer on a LookupGrad

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_each_optimizer_steps_a_lookup_grad_as_the_oracle(kind, threads):
    """Three steps on two tables with repeated ids (int32 and int64; a step where the second table has
    no gradient): weights and every state bitwise the transcription's, and (but SGD) bitwise the same
    optimizer fed the SparseGrad the numpy loop coalesces; rows no lookup named keep their bits."""
    rng = np.random.default_rng(101)
    shapes = [(9, 6), (5, 3)]
    w0 = [rng.standard_normal(s).astype(F) for s in shapes]
    layers = [fe.Embedding.from_pretrained(w, sparse=True, coalesce=False) for w in w0]
    twins = [fe.Embedding.from_pretrained(w, sparse=True) for w in w0]
    opt, twin_opt = make_opt(kind, layers), make_opt(kind, twins)
    model = Model(kind, w0, hyper_of(kind))
    plan = [[random_lookup(rng, 9, 6, 12, np.int32, pool=4), random_lookup(rng, 5, 3, 7, pool=4)],
            [random_lookup(rng, 9, 6, 20, np.int64, pool=7), None],
            [random_lookup(rng, 9, 6, 1, pool=7), random_lookup(rng, 5, 3, 9, np.int32, pool=2)]]
    touched = [set(), set()]
    with num_threads(threads), serial_elements(0 if threads == 2 else SERIAL_ELEMENTS):
        for lookups in plan:
            for i, lk in enumerate(lookups):
                layers[i].grad = None if lk is None else fe.LookupGrad(*lk)
                twins[i].grad = None if lk is None else fe.SparseGrad(*coalesce_loop(*lk))
                if lk is not None:
                    touched[i] |= set(lk[0].tolist())
            opt.step()
            if threads == 2 and kind != "SGD":  # (sgd_scatter threads only at a wider D)
                assert _kernels._last_call_threads() == two_thread_team()
            model.step(lookups)
            assert_model(opt, model)
            if kind != "SGD":
                twin_opt.step()
                for p, q in zip(layers, twins):
                    assert_bitwise(p.weight, q.weight)
                assert_same_state(opt_state(opt), opt_state(twin_opt))
    if kind != "Adam":
        for i in range(2):
            untouched = sorted(set(range(shapes[i][0])) - touched[i])
            assert untouched
            assert_bitwise(layers[i].weight[untouched], w0[i][untouched])


def test_sgd_moves_a_row_once_per_lookup_not_once_per_sum():
    """Fixed values where per-lookup rounding and the summed row's differ: SGD gives the former."""
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal((3, 64)).astype(F)
    ids = np.array([2, 0, 2, 2, 1, 2], np.int64)
    values = rng.standard_normal((6, 64)).astype(F)
    per_lookup = sgd_loop(w0, ids, values, 0.1)
    rows, sums = coalesce_loop(ids, values)
    summed = w0.copy()
    summed[rows] = summed[rows] - F(0.1) * sums
    assert not np.array_equal(per_lookup, summed)
    layer = fe.Embedding.from_pretrained(w0, sparse=True, coalesce=False)
    layer.grad = fe.LookupGrad(ids, values)
    SGD(layer, lr=0.1).step()
    assert_bitwise(layer.weight, per_lookup)


def test_adagrad_sparse_adam_rowwise_sum_each_row_in_ids_order():
    """Values where the order of a row's adds matters (1e8, 1, -1e8): the sum is (0 + 1e8 + 1) - 1e8 = 0
    in ids order, not 1; the step must be that of the ids-order sum."""
    ids = np.array([1, 1, 1, 0], np.int32)
    values = np.array([[1e8], [1.0], [-1e8], [0.5]], F)
    assert coalesce_loop(ids, values)[1][1, 0] == 0.0
    for kind in ("Adagrad", "RowWiseAdagrad", "SparseAdam"):
        w0 = np.array([[0.25], [0.75]], F)
        layer = fe.Embedding.from_pretrained(w0, sparse=True, coalesce=False)
        layer.grad = fe.LookupGrad(ids, values)
        opt = make_opt(kind, layer)
        opt.step()
        model = Model(kind, [w0], hyper_of(kind))
        model.step([(ids, values)])
        assert_model(opt, model)
        assert layer.weight[1, 0] == F(0.75)  # a zero sum leaves the row's weight


# ---------------------------------------------------------------- 2. the layers

def test_embedding_grad_is_ids_and_grad_out_not_copied():
    rng = np.random.default_rng(1)
    layer = fe.Embedding(6, 4, sparse=True, coalesce=False, seed=2)
    w0 = layer.weight.copy()
    ids = np.array([[5, 0, 5], [2, 5, 1]], np.int32)
    layer(ids)
    ids[0, 0] = 3  # the caller's buffer, reused after forward: the layer kept its own copy
    grad_out = rng.standard_normal((2, 3, 4)).astype(F)
    layer.backward(grad_out)
    g = layer.grad
    assert isinstance(g, fe.LookupGrad)
    assert_bitwise(g.ids, np.array([5, 0, 5, 2, 5, 1], np.int32))
    assert_bitwise(g.values, grad_out.reshape(-1, 4))
    assert np.shares_memory(g.values, grad_out)
    # the documented contract: a write into grad_out before the step is seen by the step
    grad_out[1, 1] *= 3.0
    grad_out[0, 1] = 0.5
    SGD(layer, lr=0.25).step()
    assert_bitwise(layer.weight, sgd_loop(w0, [5, 0, 5, 2, 5, 1], grad_out.reshape(-1, 4), 0.25))


def test_two_backwards_concatenate_earlier_lookups_first():
    rng = np.random.default_rng(2)
    layer = fe.Embedding(7, 3, sparse=True, coalesce=False, seed=3)
    w0 = layer.weight.copy()
    first_ids, second_ids = np.array([4, 1, 4], np.int32), np.array([[1, 6], [4, 4]], np.int64)
    g1, g2 = rng.standard_normal((3, 3)).astype(F), rng.standard_normal((2, 2, 3)).astype(F)
    layer(first_ids)
    layer.backward(g1)
    layer(second_ids)
    layer.backward(g2)
    ids = np.array([4, 1, 4, 1, 6, 4, 4], np.int64)
    values = np.concatenate([g1, g2.reshape(-1, 3)])
    assert_bitwise(layer.grad.ids, ids)
    assert_bitwise(layer.grad.values, values)
    dense = np.zeros((7, 3), F)
    np.add.at(dense, ids, values)
    assert_bitwise(layer.dense_grad(), dense)
    SGD(layer, lr=0.5).step()
    assert_bitwise(layer.weight, sgd_loop(w0, ids, values, 0.5))


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_to_dense_and_coalesce_are_the_other_layers_grads(id_dtype):
    """One backward: to_dense() is the dense layer's grad and coalesce() the coalesce=True layer's
    SparseGrad, bitwise, and both the numpy oracles'."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 5)).astype(F)
    ids = rng.integers(0, 3, (4, 6)).astype(id_dtype)
    ids[0, 0] = 7
    grad_out = rng.standard_normal((4, 6, 5)).astype(F)
    lookups = fe.Embedding.from_pretrained(w, sparse=True, coalesce=False)
    coalesced = fe.Embedding.from_pretrained(w, sparse=True)
    dense = fe.Embedding.from_pretrained(w)
    for layer in (lookups, coalesced, dense):
        layer(ids)
        layer.backward(grad_out)
    expected = np.zeros((8, 5), F)
    np.add.at(expected, ids.reshape(-1), grad_out.reshape(-1, 5))
    assert_bitwise(lookups.grad.to_dense(8), dense.grad)
    assert_bitwise(lookups.grad.to_dense(8), expected)
    assert_bitwise(lookups.dense_grad(), expected)
    got = lookups.grad.coalesce()
    assert isinstance(got, fe.SparseGrad)
    rows, sums = coalesce_loop(ids, grad_out)
    assert_bitwise(got.rows, coalesced.grad.rows)
    assert_bitwise(got.values, coalesced.grad.values)
    assert_bitwise(got.rows, rows)
    assert_bitwise(got.values, sums)


@pytest.mark.parametrize("positions", [None, 2, "array"])
def test_token_position_grads_hold_token_ids_and_positions(positions):
    rng = np.random.default_rng(4)
    layer = fe.TokenPositionEmbedding(12, 9, 3, sparse=True, coalesce=False, seed=5)
    ids = np.array([[11, 10, 11, 9], [8, 11, 10, 10]], np.int64)  # none is a valid position but 8
    if positions == "array":
        positions = np.array([[3, 1, 4, 1], [5, 0, 2, 6]], np.int32)
    layer(ids, positions)
    grad_hidden = rng.standard_normal((2, 4, 3)).astype(F)
    layer.backward(grad_hidden)
    tg, pg = layer.token.grad, layer.position.grad
    assert isinstance(tg, fe.LookupGrad) and isinstance(pg, fe.LookupGrad)
    assert_bitwise(tg.ids, ids.reshape(-1))
    assert np.array_equal(pg.ids, positions_oracle(ids.shape, positions).reshape(-1))
    assert pg.ids.ndim == 1 and pg.ids.dtype in (np.int32, np.int64)
    for g in (tg, pg):
        assert_bitwise(g.values, grad_hidden.reshape(-1, 3))
        assert np.shares_memory(g.values, grad_hidden)
    # one backward: coalesce() is the coalesce=True layer's SparseGrad, to_dense() the dense layer's grad
    weights = (layer.token.weight, layer.position.weight)
    for other in (fe.TokenPositionEmbedding.from_pretrained(*weights, sparse=True),
                  fe.TokenPositionEmbedding.from_pretrained(*weights)):
        other(ids, positions)
        other.backward(grad_hidden)
        for mine, theirs in ((tg, other.token), (pg, other.position)):
            if other.sparse:
                assert_bitwise(mine.coalesce().rows, theirs.grad.rows)
                assert_bitwise(mine.coalesce().values, theirs.grad.values)
            else:
                assert_bitwise(mine.to_dense(len(theirs.weight)), theirs.grad)
    # a second backward concatenates in both tables
    layer.backward(grad_hidden)
    assert np.array_equal(layer.position.grad.ids, np.tile(positions_oracle(ids.shape, positions).reshape(-1), 2))
    assert_bitwise(layer.token.grad.ids, np.tile(ids.reshape(-1), 2))


def bag_oracle(ids, grad_out, mode, psw, padding_idx):
    """(rows, values) of one lookup per kept id, 2-D ids (one bag per row), in ids order."""
    rows, values = [], []
    for b in range(ids.shape[0]):
        kept = [j for j in range(ids.shape[1]) if ids[b, j] != padding_idx]
        for j in kept:
            rows.append(ids[b, j])
            if mode == "sum":
                values.append(grad_out[b] * (F(1) if psw is None else psw[b, j]))
            else:
                values.append(grad_out[b] / F(len(kept)))
    return np.array(rows, np.int64), np.array(values, F).reshape(len(rows), grad_out.shape[1])


@pytest.mark.parametrize("mode,weighted,padding_idx", [("sum", False, None), ("sum", True, None),
                                                       ("sum", True, 2), ("mean", False, None), ("mean", False, 2)])
def test_embedding_bag_lookups_are_the_kept_lookups(mode, weighted, padding_idx):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 4)).astype(F)
    ids = np.array([[2, 0, 2, 5], [3, 3, 2, 1], [2, 2, 2, 2]], np.int64)
    psw = rng.standard_normal(ids.shape).astype(F) if weighted else None
    grad_out = rng.standard_normal((3, 4)).astype(F)
    kw = dict(mode=mode, padding_idx=padding_idx)
    lookups = fe.nn.EmbeddingBag.from_pretrained(w, sparse=True, coalesce=False, **kw)
    coalesced = fe.nn.EmbeddingBag.from_pretrained(w, sparse=True, **kw)
    for layer in (lookups, coalesced):
        layer(ids, per_sample_weights=psw)
        layer.backward(grad_out)
    g = lookups.grad
    assert isinstance(g, fe.LookupGrad)
    rows, values = bag_oracle(ids, grad_out, mode, psw, padding_idx)
    assert np.array_equal(g.ids, rows)
    np.testing.assert_allclose(g.values, values, rtol=1e-6, atol=0)
    got = g.coalesce()
    assert_bitwise(got.rows, coalesced.grad.rows)
    assert_bitwise(got.values, coalesced.grad.values)
    assert "coalesce=False" in repr(lookups) and "coalesce=False" not in repr(coalesced)


def test_repr_and_from_pretrained_keep_coalesce_false():
    w = np.ones((3, 2), F)
    for layer in (fe.Embedding(3, 2, sparse=True, coalesce=False),
                  fe.Embedding.from_pretrained(w, sparse=True, coalesce=False),
                  fe.TokenPositionEmbedding(3, 2, 2, sparse=True, coalesce=False),
                  fe.TokenPositionEmbedding.from_pretrained(w, w, sparse=True, coalesce=False),
                  fe.nn.EmbeddingBag(3, 2, sparse=True, coalesce=False),
                  fe.nn.EmbeddingBag.from_pretrained(w, sparse=True, coalesce=False)):
        assert "sparse=True, coalesce=False" in repr(layer)
        assert layer.coalesce is False
    assert "coalesce" not in repr(fe.Embedding(3, 2, sparse=True))
    tpe = fe.TokenPositionEmbedding.from_pretrained(w, w, sparse=True, coalesce=False)
    tpe(np.array([[0, 1]]))
    tpe.backward(np.ones((1, 2, 2), F))
    assert isinstance(tpe.token.grad, fe.LookupGrad) and isinstance(tpe.position.grad, fe.LookupGrad)


# ---------------------------------------------------------------- 3. hypothesis

@st.composite
def lookup_problems(draw):
    V, D = draw(st.integers(1, 10)), draw(st.sampled_from([0, 1, 2, 5, 17]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.sampled_from([(), (0,), (1,), (7,), (3, 4), (2, 0), (25,)]))
    pool = draw(st.sampled_from([V, 1, min(2, V)]))
    ids = rng.integers(0, pool, shape).astype(draw(st.sampled_from([np.int32, np.int64])))
    w = rng.standard_normal((V, D)).astype(F)
    g = (rng.standard_normal(shape + (D,)) * 2.0 ** rng.integers(-4, 4)).astype(F)
    return w, ids, g


@FAST
@given(problem=lookup_problems(), kind=st.sampled_from(KINDS))
def test_any_lookup_steps_as_the_oracle_on_one_and_two_threads(problem, kind):
    w0, ids, g = problem
    D = w0.shape[1]
    flat_ids, flat_g = ids.reshape(-1), g.reshape(ids.size, D)
    results = []
    for threads in (1, 2):
        with num_threads(threads), serial_elements(0 if threads == 2 else SERIAL_ELEMENTS):
            layer = fe.Embedding.from_pretrained(w0, sparse=True, coalesce=False)
            if D > 0:  # D == 0: the lookup is built by hand (see the BUG test below)
                layer(ids)
                layer.backward(g)
                assert_bitwise(layer.grad.ids, flat_ids)
                assert_bitwise(layer.grad.values, flat_g)
                assert np.shares_memory(layer.grad.values, g) or g.size == 0
            else:
                layer.grad = fe.LookupGrad(flat_ids, flat_g)
            opt = make_opt(kind, layer)
            opt.step()
            opt.step()  # the same lookups twice: the states of step 1 feed step 2
            results.append((layer.weight.copy(), opt_state(opt)))
    model = Model(kind, [w0], hyper_of(kind))
    model.step([(flat_ids, flat_g)])
    model.step([(flat_ids, flat_g)])
    assert_bitwise(results[0][0], results[1][0])
    assert_same_state(results[0][1], results[1][1])
    assert_model(opt, model)


# ---------------------------------------------------------------- 4. bad input changes nothing

def bad_lookups(V=4, D=3):
    one = np.ones((2, D), F)
    return [
        ("values_float64", fe.LookupGrad(np.array([0, 1]), np.ones((2, D))), TypeError),  # for a float32 table
        ("values_int", fe.LookupGrad(np.array([0, 1]), np.ones((2, D), np.int32)), TypeError),
        ("ids_2d", fe.LookupGrad(np.array([[0, 1], [1, 2]]), np.ones((2, 2, D), F)), TypeError),
        ("ids_0d", fe.LookupGrad(np.array(1), np.ones(D, F)), TypeError),
        ("ids_uint8", fe.LookupGrad(np.array([0, 1], np.uint8), one), TypeError),
        ("ids_float", fe.LookupGrad(np.array([0.0, 1.0]), one), TypeError),
        ("ids_list", fe.LookupGrad([0, 1], one), TypeError),
        ("values_wide", fe.LookupGrad(np.array([0, 1]), np.ones((2, D + 1), F)), ValueError),
        ("values_long", fe.LookupGrad(np.array([0, 1]), np.ones((3, D), F)), ValueError),
        ("values_1d", fe.LookupGrad(np.array([0, 1]), np.ones(2, F)), ValueError),
        ("id_V", fe.LookupGrad(np.array([0, V, 1], np.int32), np.ones((3, D), F)), IndexError),
        ("id_minus_1", fe.LookupGrad(np.array([0, -1], np.int64), one), IndexError),
    ]


def test_check_accepts_the_boundaries_and_refuses_past_them():
    D = 3
    ok = fe.LookupGrad(np.array([0, 3, 3], np.int32), np.ones((3, D), F))
    assert ok.check(4, 3) is ok and ok.check(4) is ok
    fe.LookupGrad(np.zeros(0, np.int64), np.zeros((0, D), F)).check(0, 3)
    for name, bad, error in bad_lookups(4, D):
        with pytest.raises(error):
            bad.check(4, D, np.float32)
        if name == "values_float64":  # a gradient of a float64 table: any table dtype without dtype=
            assert bad.check(4, D) is bad and bad.to_dense(4).dtype == np.float64
            continue
        if name != "values_wide":  # to_dense takes D from the values
            with pytest.raises(error):
                bad.to_dense(4)
    with pytest.raises(ValueError):
        ok.check(4, 2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,bad,error", bad_lookups(), ids=[b[0] for b in bad_lookups()])
def test_a_bad_lookup_grad_on_the_last_parameter_moves_nothing(kind, name, bad, error):
    """A good LookupGrad and a dense/sparse neighbour on the first parameters, the bad one last: the step
    raises, every weight, state, count and grad as it was; the next good step is the oracle's second."""
    rng = np.random.default_rng(6)
    w0 = [rng.standard_normal((6, 3)).astype(F), rng.standard_normal((4, 3)).astype(F)]
    layers = [fe.Embedding.from_pretrained(w, sparse=True, coalesce=False) for w in w0]
    opt = make_opt(kind, layers)
    model = Model(kind, w0, hyper_of(kind))
    first = [random_lookup(rng, 6, 3, 5, pool=2), random_lookup(rng, 4, 3, 3)]
    for layer, lk in zip(layers, first):
        layer.grad = fe.LookupGrad(*lk)
    opt.step()
    model.step(first)
    good = random_lookup(rng, 6, 3, 8, np.int32, pool=3)
    layers[0].grad, layers[1].grad = fe.LookupGrad(*good), bad
    grads = (layers[0].grad, layers[1].grad)
    snap = Snapshot(w0=layers[0].weight, w1=layers[1].weight, ids=good[0], values=good[1])
    state = opt_state(opt)
    with pytest.raises(error):
        opt.step()
    snap.assert_unchanged()
    assert_same_state(opt_state(opt), state)
    assert layers[0].grad is grads[0] and layers[1].grad is grads[1]
    layers[1].grad = None
    opt.step()
    model.step([good, None])
    assert_model(opt, model)


@pytest.mark.parametrize("kind,fault", [(k, f) for k in KINDS for f in ("values_alias_weight", "read_only_weight")
                                        if (k, f) != ("Adam", "values_alias_weight")])  # Adam densifies: a copy
def test_a_kernel_refusal_on_the_last_parameter_moves_nothing(kind, fault):
    """Faults only the kernels see (a gradient in the weight's own memory, a weight it cannot write):
    their checks run for every parameter before the first moves."""
    rng = np.random.default_rng(8)
    w0 = [rng.standard_normal((6, 3)).astype(F), rng.standard_normal((4, 3)).astype(F)]
    layers = [fe.Embedding.from_pretrained(w, sparse=True, coalesce=False) for w in w0]
    opt = make_opt(kind, layers)
    layers[0].grad = fe.LookupGrad(*random_lookup(rng, 6, 3, 5, pool=2))
    if fault == "values_alias_weight":
        layers[1].grad = fe.LookupGrad(np.array([3, 0], np.int64), layers[1].weight[1:3])
    else:
        layers[1].weight.flags.writeable = False
        layers[1].grad = fe.LookupGrad(*random_lookup(rng, 4, 3, 2))
    snap = Snapshot(w0=layers[0].weight, w1=layers[1].weight)
    state = opt_state(opt)
    with pytest.raises((ValueError, TypeError)):
        opt.step()
    snap.assert_unchanged()
    assert_same_state(opt_state(opt), state)


def test_adagrad_weight_decay_with_a_lookup_grad_raises_and_moves_nothing():
    rng = np.random.default_rng(9)
    dense = fe.Embedding(5, 3, seed=1)
    lookups = fe.Embedding(4, 3, sparse=True, coalesce=False, seed=2)
    dense.grad = rng.standard_normal((5, 3)).astype(F)  # weight decay is allowed with a dense gradient
    lookups.grad = fe.LookupGrad(*random_lookup(rng, 4, 3, 3))
    opt = Adagrad([dense, lookups], lr=0.1, weight_decay=0.1)
    snap = Snapshot(a=dense.weight, b=lookups.weight)
    state = opt_state(opt)
    with pytest.raises(RuntimeError, match="weight_decay"):
        opt.step()
    snap.assert_unchanged()
    assert_same_state(opt_state(opt), state)
    dense.grad = None  # the LookupGrad alone: still refused
    with pytest.raises(RuntimeError, match="weight_decay"):
        opt.step()
    snap.assert_unchanged()


def test_coalesce_false_needs_sparse():
    w = np.ones((3, 2), F)
    for make in (lambda: fe.Embedding(3, 2, coalesce=False), lambda: fe.Embedding.from_pretrained(w, coalesce=False),
                 lambda: fe.TokenPositionEmbedding(3, 2, 2, coalesce=False),
                 lambda: fe.TokenPositionEmbedding.from_pretrained(w, w, coalesce=False),
                 lambda: fe.nn.EmbeddingBag(3, 2, coalesce=False),
                 lambda: fe.nn.EmbeddingBag.from_pretrained(w, coalesce=False)):
        with pytest.raises(ValueError, match="sparse=True"):
            make()


def _layers_with_a_grad(rng):
    emb = fe.Embedding(5, 3, sparse=True, coalesce=False, seed=1)
    emb(np.array([1, 4, 1]))
    emb.backward(rng.standard_normal((3, 3)).astype(F))
    tpe = fe.TokenPositionEmbedding(5, 4, 3, sparse=True, coalesce=False, seed=2)
    tpe(np.array([[1, 4, 1]]))
    tpe.backward(rng.standard_normal((1, 3, 3)).astype(F))
    bag = fe.nn.EmbeddingBag(5, 3, mode="sum", sparse=True, coalesce=False, seed=3)
    bag(np.array([[1, 4, 1]]))
    bag.backward(rng.standard_normal((1, 3)).astype(F))
    return emb, tpe, bag


def _grads(layer):
    tables = [layer.token, layer.position] if isinstance(layer, fe.TokenPositionEmbedding) else [layer]
    return [(t, t.grad, t.grad.ids.copy(), t.grad.values.copy()) for t in tables]


def _assert_grads_kept(kept):
    for table, grad, ids, values in kept:
        assert table.grad is grad
        assert_bitwise(grad.ids, ids)
        assert_bitwise(grad.values, values)


@pytest.mark.parametrize("bad", ["short", "wide", "float64", "list"])
def test_a_bad_grad_out_leaves_the_grad_as_it_was(bad):
    rng = np.random.default_rng(10)
    for layer in _layers_with_a_grad(rng):
        shape = {fe.nn.EmbeddingBag: (1, 3), fe.Embedding: (3, 3), fe.TokenPositionEmbedding: (1, 3, 3)}[type(layer)]
        grad_out = {"short": np.ones(shape[:-1] + (2,), F), "wide": np.ones(shape[:-1] + (4,), F),
                    "float64": np.ones(shape), "list": np.ones(shape, F).tolist()}[bad]
        if bad == "float64" and isinstance(layer, fe.nn.EmbeddingBag):
            continue  # see test_BUG_bag_float64_grad_out_is_stored
        kept = _grads(layer)
        with pytest.raises((ValueError, TypeError)):
            layer.backward(grad_out)
        _assert_grads_kept(kept)


def test_a_grad_of_another_form_is_refused_on_backward():
    rng = np.random.default_rng(11)
    emb, tpe, bag = _layers_with_a_grad(rng)
    for layer in (emb, bag):
        sparse = fe.SparseGrad(np.array([1], np.int64), np.ones((1, 3), F))
        layer.grad = sparse
        with pytest.raises(TypeError, match="zero_grad"):
            layer.backward(np.ones((3, 3) if layer is emb else (1, 3), F))
        assert layer.grad is sparse
        layer.grad = np.zeros((5, 3), F)
        with pytest.raises(TypeError):
            layer.backward(np.ones((3, 3) if layer is emb else (1, 3), F))
    tpe.position.grad = fe.SparseGrad(np.array([1], np.int64), np.ones((1, 3), F))
    token_grad, token_ids = tpe.token.grad, tpe.token.grad.ids.copy()
    with pytest.raises(TypeError):
        tpe.backward(np.ones((1, 3, 3), F))
    assert tpe.token.grad is token_grad  # both merged before either is set
    assert_bitwise(tpe.token.grad.ids, token_ids)


# ---------------------------------------------------------------- once bugs

@pytest.mark.parametrize("layer_kind", ["Embedding", "TokenPositionEmbedding"])
def test_zero_dim_coalesce_false_backward(layer_kind):
    """D = 0 (a reshape to (-1, 0) cannot infer its -1: this once raised ValueError)."""
    ids = np.array([[1, 2, 1]], np.int64)
    if layer_kind == "Embedding":
        layer = fe.Embedding(4, 0, sparse=True, coalesce=False)
        tables = [layer]
    else:
        layer = fe.TokenPositionEmbedding(4, 4, 0, sparse=True, coalesce=False)
        tables = [layer.token, layer.position]
    layer(ids)
    grad_out = np.zeros((1, 3, 0), F)
    layer.backward(grad_out)
    for table in tables:
        assert table.grad.values.shape == (3, 0)
    assert_bitwise(tables[0].grad.ids, ids.reshape(-1))


@pytest.mark.parametrize("coalesce", [False, True])
def test_bag_float64_grad_out_is_refused_with_nothing_stored(coalesce):
    """A sparse bag's backward refuses a float64 grad_out as the dense bag does (it was once stored, and
    refused only at the optimizer's step)."""
    bag = fe.nn.EmbeddingBag(5, 3, mode="sum", sparse=True, coalesce=coalesce, seed=3)
    bag(np.array([[1, 4, 1]]))
    with pytest.raises(TypeError):
        bag.backward(np.ones((1, 3)))
    assert bag.grad is None
