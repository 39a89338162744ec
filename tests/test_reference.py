"""The rest of the oracle chain.

numpy against the scalar reference on small shapes (forward, and gradients of a
scalar loss after Value.backward()), fastembed's layers against both, and the
reference against hand-derived derivatives and, when installed, torch autograd.
"""
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fastembed as fe
from fastembed import reference
from fastembed.reference import Value
from _helpers import FAST, FEW, assert_bitwise, float_table, id_arrays, ids_shapes, positions_oracle

try:
    import torch
except ImportError:  # torch is optional: only the torch comparison is skipped
    torch = None


# ---------------------------------------------------------------- numpy vs the reference (small shapes)

def _reference_layer(tok, pos):
    ref = reference.TokenPositionEmbedding(0, 0, 0)
    ref.token = reference.Embedding.from_rows(tok.tolist())
    ref.position = reference.Embedding.from_rows(pos.tolist())
    return ref


def _data(nested):
    """Nested lists of Value (rows of D Values at the bottom) as a float64 array."""
    if isinstance(nested, Value):
        return nested.data
    return np.array([_data(x) for x in nested], dtype=np.float64) if nested else np.zeros(0)


def _flat_values(nested):
    if isinstance(nested, Value):
        return [nested]
    return [v for x in nested for v in _flat_values(x)]


@st.composite
def small_embedding_case(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    V = draw(st.integers(1, 6))
    D = draw(st.integers(1, 4))
    # 0-d ids through the layers: tests/test_nn_optim.py::test_token_position_zero_d_ids (the sparse
    # layer fails on them today, and here that would hide every other case)
    shape = draw(ids_shapes(max_ndim=2, max_side=4, allow_empty=False, min_ndim=1))
    ids = draw(id_arrays(V, shape=shape))
    T = shape[-1] if shape else 1
    mode = draw(st.sampled_from(["none", "int", "array"]))
    if mode == "none":
        positions, P = None, T + draw(st.integers(0, 2))
    elif mode == "int":
        start = draw(st.integers(0, 3))
        positions, P = start, start + T + draw(st.integers(0, 2))
    else:
        P = draw(st.integers(1, 5))
        positions = rng.integers(0, P, size=shape)
    tok, pos = float_table(rng, V, D), float_table(rng, P, D)
    coef = rng.standard_normal(shape + (D,)).astype(np.float32)  # exactly representable in both engines
    return tok, pos, ids, positions, coef


@FEW
@given(case=small_embedding_case())
def test_reference_forward_and_gradients_match_numpy_and_fastembed(case):
    tok, pos, ids, positions, coef = case
    p = positions_oracle(ids.shape, positions)
    ref = _reference_layer(tok, pos)
    ref_positions = positions if positions is None or isinstance(positions, int) else positions.tolist()
    hidden = ref(ids.tolist(), ref_positions)

    # forward: float64 sums of float32 inputs vs float32 sums (one rounding apart)
    expected = tok[ids] + pos[p]
    np.testing.assert_allclose(_data(hidden).reshape(expected.shape), expected, rtol=1e-6, atol=1e-30)

    # a scalar loss: sum(hidden * coef), built from Value ops
    loss = Value(0.0)
    for v, c in zip(_flat_values(hidden), coef.reshape(-1).tolist()):
        loss = loss + v * c
    loss.backward()
    ref_tok = np.array(ref.token.grad, dtype=np.float64).reshape(tok.shape)
    ref_pos = np.array(ref.position.grad, dtype=np.float64).reshape(pos.shape)

    # numpy in float64: the reference's gradients are the scatter-add of coef
    np_tok, np_pos = np.zeros(tok.shape), np.zeros(pos.shape)
    np.add.at(np_tok, ids, coef.astype(np.float64))
    np.add.at(np_pos, p, coef.astype(np.float64))
    np.testing.assert_allclose(ref_tok, np_tok, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref_pos, np_pos, rtol=1e-12, atol=1e-12)
    # rows never looked up are exactly zero in the reference, too
    untouched_tok = np.setdiff1d(np.arange(tok.shape[0]), ids.reshape(-1))
    untouched_pos = np.setdiff1d(np.arange(pos.shape[0]), p.reshape(-1))
    assert np.all(ref_tok[untouched_tok] == 0.0) and np.all(ref_pos[untouched_pos] == 0.0)

    # fastembed, dense and sparse, built from the same weights
    for sparse in (False, True):
        layer = fe.TokenPositionEmbedding.from_pretrained(tok, pos, sparse=sparse)
        h = layer(ids, positions)
        assert_bitwise(h, expected)
        np.testing.assert_allclose(h, _data(hidden).reshape(expected.shape), rtol=1e-6, atol=1e-30)
        layer.backward(coef)
        if not sparse:
            np.testing.assert_allclose(layer.token.grad, ref_tok, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(layer.position.grad, ref_pos, rtol=1e-5, atol=1e-6)
            continue
        for g, used, ref_g, rows_total in ((layer.token.grad, ids, ref_tok, tok.shape[0]),
                                           (layer.position.grad, p, ref_pos, pos.shape[0])):
            assert isinstance(g, fe.SparseGrad)
            assert_bitwise(g.rows, np.unique(used).astype(np.int64))  # touched rows only, sorted, unique
            assert g.values.dtype == np.float32 and g.values.shape == (len(g.rows), tok.shape[1])
            np.testing.assert_allclose(g.values, ref_g[g.rows], rtol=1e-5, atol=1e-6)
            dense = g.to_dense(rows_total)
            untouched = np.setdiff1d(np.arange(rows_total), g.rows)
            assert_bitwise(dense[untouched], np.zeros((len(untouched), tok.shape[1]), np.float32))


def test_reference_embedding_single_table_matches_numpy():
    rng = np.random.default_rng(0)
    table = float_table(rng, 5, 3)
    ids = np.array([[4, 0, 4], [4, 4, 2]])
    ref = reference.Embedding.from_rows(table.tolist())
    rows = ref(ids.tolist())
    np.testing.assert_array_equal(_data(rows), table[ids].astype(np.float64))  # no arithmetic: exact
    coef = rng.standard_normal(ids.shape + (3,)).astype(np.float32)
    loss = Value(0.0)
    for v, c in zip(_flat_values(rows), coef.reshape(-1).tolist()):
        loss = loss + v * c
    loss.backward()
    expected = np.zeros((5, 3))
    np.add.at(expected, ids, coef.astype(np.float64))
    np.testing.assert_allclose(np.array(ref.grad), expected, rtol=1e-12, atol=0)
    assert np.array(ref.grad)[[1, 3]].tolist() == [[0.0] * 3] * 2
    layer = fe.Embedding.from_pretrained(table)
    assert_bitwise(layer(ids), table[ids])
    layer.backward(coef)
    np.testing.assert_allclose(layer.grad, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the reference vs hand-derived derivatives

def _grads(build, *xs):
    leaves = [Value(x) for x in xs]
    out = build(*leaves)
    out.backward()
    return out.data, [v.grad for v in leaves]


def _close(a, b, tol=1e-12):
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# (name, build(x, y), value(x, y), d/dx, d/dy, domain of x: "any" or "pos")
BINARY_CASES = [
    ("add", lambda x, y: x.add(y), lambda x, y: x + y, lambda x, y: 1.0, lambda x, y: 1.0),
    ("mul", lambda x, y: x.mul(y), lambda x, y: x * y, lambda x, y: y, lambda x, y: x),
    ("sub", lambda x, y: x.sub(y), lambda x, y: x - y, lambda x, y: 1.0, lambda x, y: -1.0),
    ("div", lambda x, y: x.div(y), lambda x, y: x / y, lambda x, y: 1 / y, lambda x, y: -x / y**2),
    ("op_add", lambda x, y: x + y, lambda x, y: x + y, lambda x, y: 1.0, lambda x, y: 1.0),
    ("op_mul", lambda x, y: x * y, lambda x, y: x * y, lambda x, y: y, lambda x, y: x),
    ("op_sub", lambda x, y: x - y, lambda x, y: x - y, lambda x, y: 1.0, lambda x, y: -1.0),
    ("op_div", lambda x, y: x / y, lambda x, y: x / y, lambda x, y: 1 / y, lambda x, y: -x / y**2),
]

# (name, build(x), value(x), d/dx, positive domain only)
UNARY_CASES = [
    ("add_number", lambda x: x.add(2.5), lambda x: x + 2.5, lambda x: 1.0, False),
    ("mul_number", lambda x: x.mul(-3.0), lambda x: -3 * x, lambda x: -3.0, False),
    ("sub_number", lambda x: x.sub(2.0), lambda x: x - 2, lambda x: 1.0, False),
    ("div_number", lambda x: x.div(4.0), lambda x: x / 4, lambda x: 0.25, False),
    ("pow_3", lambda x: x.pow(3), lambda x: x**3, lambda x: 3 * x**2, False),
    ("pow_2", lambda x: x.pow(2), lambda x: x**2, lambda x: 2 * x, False),
    ("pow_minus_1", lambda x: x.pow(-1), lambda x: 1 / x, lambda x: -1 / x**2, True),
    ("pow_half", lambda x: x.pow(0.5), lambda x: math.sqrt(x), lambda x: 0.5 / math.sqrt(x), True),
    ("pow_minus_1_5", lambda x: x.pow(-1.5), lambda x: x**-1.5, lambda x: -1.5 * x**-2.5, True),
    ("log", lambda x: x.log(), lambda x: math.log(x), lambda x: 1 / x, True),
    ("exp", lambda x: x.exp(), lambda x: math.exp(x), lambda x: math.exp(x), False),
    ("relu", lambda x: x.relu(), lambda x: max(0.0, x), lambda x: 1.0 if x > 0 else 0.0, False),
    ("neg", lambda x: x.neg(), lambda x: -x, lambda x: -1.0, False),
    ("op_neg", lambda x: -x, lambda x: -x, lambda x: -1.0, False),
    ("op_pow", lambda x: x**3, lambda x: x**3, lambda x: 3 * x**2, False),
    ("op_add_number", lambda x: x + 2.5, lambda x: x + 2.5, lambda x: 1.0, False),
    ("op_radd", lambda x: 2.5 + x, lambda x: 2.5 + x, lambda x: 1.0, False),
    ("op_mul_number", lambda x: x * 3, lambda x: 3 * x, lambda x: 3.0, False),
    ("op_rmul", lambda x: 3 * x, lambda x: 3 * x, lambda x: 3.0, False),
    ("op_sub_number", lambda x: x - 2, lambda x: x - 2, lambda x: 1.0, False),
    ("op_rsub", lambda x: 2 - x, lambda x: 2 - x, lambda x: -1.0, False),
    ("op_div_number", lambda x: x / 4, lambda x: x / 4, lambda x: 0.25, False),
    ("op_rtruediv", lambda x: 4 / x, lambda x: 4 / x, lambda x: -4 / x**2, True),
]

_any = st.floats(-3, 3, allow_nan=False)
_pos = st.floats(0.05, 3)
_nonzero = st.one_of(st.floats(-3, -0.05), st.floats(0.05, 3))


@pytest.mark.parametrize("name,build,value,dx,dy", BINARY_CASES, ids=[c[0] for c in BINARY_CASES])
@FAST
@given(x=_any, y=_nonzero)
def test_binary_ops_against_hand_derivatives(name, build, value, dx, dy, x, y):
    data, (gx, gy) = _grads(build, x, y)
    assert _close(data, value(x, y))
    assert _close(gx, dx(x, y)) and _close(gy, dy(x, y)), (gx, gy)


@pytest.mark.parametrize("name,build,value,dx,positive", UNARY_CASES, ids=[c[0] for c in UNARY_CASES])
@FAST
@given(x_any=_any, x_pos=_pos)
def test_unary_ops_against_hand_derivatives(name, build, value, dx, positive, x_any, x_pos):
    x = x_pos if positive else x_any
    data, (gx,) = _grads(build, x)
    assert _close(data, value(x))
    assert _close(gx, dx(x)), (gx, dx(x))


@pytest.mark.parametrize("x,expected", [(-1.0, 0.0), (0.0, 0.0), (2.0, 1.0)])
def test_relu_gradient_at_and_around_zero(x, expected):
    assert _grads(lambda v: v.relu(), x)[1] == [expected]


def test_ops_return_new_values_and_accept_numbers():
    x = Value(2.0)
    for out in (x + 1, 1 + x, x * 2, 2 * x, x - 1, 1 - x, x / 2, 2 / x, -x, x**2):
        assert isinstance(out, Value) and out is not x
    assert (1 - x).data == -1.0 and (2 / x).data == 1.0 and (x / 2).data == 1.0
    with pytest.raises(TypeError):
        x.pow(Value(2.0))


def test_shared_subexpressions_accumulate():
    # x used twice by one op: d(x*x)/dx = 2x
    assert _grads(lambda x: x * x, 3.0)[1] == [6.0]
    assert _grads(lambda x: x + x, 3.0)[1] == [2.0]
    # a shared intermediate: u = a*b used in u + u*u -> dz/da = b(1 + 2u), dz/db = a(1 + 2u)
    a, b = 1.5, -2.0
    u = a * b

    def build(va, vb):
        vu = va * vb
        return vu + vu * vu

    data, (ga, gb) = _grads(build, a, b)
    assert _close(data, u + u * u)
    assert _close(ga, b * (1 + 2 * u)) and _close(gb, a * (1 + 2 * u))
    # one leaf through several branches: exp(x) * x + log(x) - x / 3
    x = 0.7
    data, (gx,) = _grads(lambda v: v.exp() * v + v.log() - v / 3, x)
    assert _close(gx, math.exp(x) * (x + 1) + 1 / x - 1 / 3)


def test_deep_graph_does_not_hit_the_recursion_limit():
    x = Value(0.5)
    y = x
    for _ in range(20000):
        y = y + x
    y.backward()
    assert x.grad == 20001.0


def test_leaves_not_in_the_graph_get_no_gradient():
    x, y, unused = Value(1.0), Value(2.0), Value(3.0)
    (x * y).backward()
    assert unused.grad == 0.0 and x.grad == 2.0 and y.grad == 1.0


# ---------------------------------------------------------------- the reference vs torch autograd

CONSTS = [-2.0, -0.5, 0.5, 1.5, 3.0]
BINARY = ["add", "mul", "sub", "div", "op_add", "op_mul", "op_sub", "op_div"]
UNARY = ["neg", "op_neg", "log", "exp", "relu"]
REFLECTED = ["radd", "rsub", "rmul", "rdiv"]

_leaf = st.tuples(st.just("leaf"), st.integers(0, 2))
_const = st.tuples(st.just("const"), st.sampled_from(CONSTS))


def _extend(children):
    return st.one_of(
        st.tuples(st.sampled_from(BINARY), children, children),
        st.tuples(st.sampled_from(UNARY), children),
        st.tuples(st.sampled_from(REFLECTED), st.sampled_from(CONSTS), children),
        st.tuples(st.just("pow"), children, st.sampled_from([2, 3, -1, 0.5, 1.5])),
        st.tuples(st.just("share"), children),
    )


expressions = st.recursive(st.one_of(_leaf, _leaf, _const), _extend, max_leaves=12)


class _Eng:
    """How to build each node, given the engine's leaf type (reference Value or torch tensor)."""

    def __init__(self, leaves, const, log, exp, relu):
        self.leaves, self.const, self.log, self.exp, self.relu = leaves, const, log, exp, relu

    def build(self, node, use_methods):
        kind = node[0]
        b = lambda n: self.build(n, use_methods)  # noqa: E731
        if kind == "leaf":
            return self.leaves[node[1]]
        if kind == "const":
            return self.const(node[1])
        if kind in BINARY:
            x, y = b(node[1]), b(node[2])
            op = kind.replace("op_", "")
            if op == "div":
                y = y * y + 0.5  # keep away from zero
            method = use_methods and not kind.startswith("op_") and hasattr(x, "data") and hasattr(x, "local_grads")
            if method:
                return getattr(x, op)(y)
            return {"add": lambda: x + y, "mul": lambda: x * y, "sub": lambda: x - y, "div": lambda: x / y}[op]()
        if kind in UNARY:
            x = b(node[1])
            if kind == "log":
                return self.log(x * x + 0.5)
            if kind == "exp":
                return self.exp(x)
            if kind == "relu":
                return self.relu(x)
            return -x
        if kind in REFLECTED:
            c, x = node[1], b(node[2])
            if kind == "radd":
                return c + x
            if kind == "rsub":
                return c - x
            if kind == "rmul":
                return c * x
            return c / (x * x + 0.5)
        if kind == "pow":
            x, k = b(node[1]), node[2]
            if k in (2, 3):
                return x**k
            return (x * x + 0.5) ** k
        if kind == "share":
            v = b(node[1])
            return v * v + v
        raise AssertionError(kind)


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@FAST
@given(tree=expressions, xs=st.lists(st.floats(-2, 2, allow_nan=False), min_size=3, max_size=3),
       use_methods=st.booleans())
def test_reference_gradients_match_torch_autograd(tree, xs, use_methods):
    assume(tree[0] != "const")
    leaves = [Value(x) for x in xs]
    ref = _Eng(leaves, Value, lambda v: v.log(), lambda v: v.exp(), lambda v: v.relu())
    try:
        out = ref.build(tree, use_methods)
    except OverflowError:
        assume(False)
    assume(math.isfinite(out.data) and abs(out.data) < 1e8)
    out.backward()
    tleaves = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
    teng = _Eng(tleaves, lambda c: torch.tensor(c, dtype=torch.float64), torch.log, torch.exp, torch.relu)
    tout = teng.build(tree, use_methods)
    if not tout.requires_grad:  # an expression of constants only
        return
    tout.backward()
    assert math.isclose(out.data, tout.item(), rel_tol=1e-9, abs_tol=1e-9)
    for v, t in zip(leaves, tleaves):
        expected = 0.0 if t.grad is None else t.grad.item()
        assume(math.isfinite(expected))
        assert math.isclose(v.grad, expected, rel_tol=1e-6, abs_tol=1e-6), (v.grad, expected)
