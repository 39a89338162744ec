"""The kernels against numpy, bitwise, on random shapes (oracle 1 of the chain).

gather ~ table[ids]; gather_add ~ tok[ids] + pos[p]; scatter_add ~ np.add.at;
gather_add_backward ~ two np.add.at; coalesce ~ np.unique + np.add.at into zeros.
Each op also runs on shapes past the threaded (GIL-free) threshold with 1 and 2
threads, which must agree bitwise with each other and with numpy.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastembed as fe
from _helpers import (FAST, ID_FORMS, SERIAL_ELEMENTS, as_form, assert_bitwise, coalesce_oracle,
                      float_table, id_arrays, ids_shapes, num_threads, positions_oracle)


def _rng(data):
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))


@st.composite
def positions_for(draw, shape, rng):
    """(positions argument, P): None, an int start, a full array, or a broadcastable array/list."""
    T = shape[-1] if shape else 1
    mode = draw(st.sampled_from(["none", "int", "array", "broadcast", "list"]))
    if mode == "none":
        return None, max(1, T + draw(st.integers(0, 3)))
    if mode == "int":
        start = draw(st.integers(0, 4))
        kind = draw(st.sampled_from([int, np.int64, np.int32]))
        return kind(start), max(1, start + T + draw(st.integers(0, 2)))
    P = draw(st.integers(1, 8))
    if mode in ("array", "list"):
        pos = rng.integers(0, P, size=shape).astype(draw(st.sampled_from([np.int32, np.int64])))
        return (as_form(pos, "list") if mode == "list" else pos), P
    drop = draw(st.integers(0, len(shape)))
    bshape = tuple(1 if draw(st.booleans()) else n for n in shape[drop:])
    return rng.integers(0, P, size=bshape), P


# ---------------------------------------------------------------- gather

@FAST
@given(data=st.data())
def test_gather_matches_numpy_indexing(data):
    rng = _rng(data)
    V = data.draw(st.integers(1, 30), label="V")
    D = data.draw(st.sampled_from([1, 2, 3, 7, 8, 9, 16, 17, 31, 40]), label="D")
    table = float_table(rng, V, D)
    ids = data.draw(id_arrays(V), label="ids")
    form = data.draw(st.sampled_from(ID_FORMS), label="form")
    expected = table[ids.astype(np.int64)]
    if data.draw(st.booleans(), label="use_out"):
        out = np.full(ids.shape + (D,), np.nan, dtype=np.float32)
        result = fe.gather(table, as_form(ids, form), out=out)
        assert result is out
    else:
        result = fe.gather(table, as_form(ids, form))
    assert_bitwise(result, expected)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_gather_edge_ids(dtype):
    rng = np.random.default_rng(0)
    table = float_table(rng, 7, 5)
    for ids in ([3], [6, 6, 6, 6], [0], [[6]], [[0, 6], [6, 0]]):
        arr = np.array(ids, dtype=dtype)
        assert_bitwise(fe.gather(table, arr), table[arr])
    # 0-d ids: a single row of shape (D,)
    assert_bitwise(fe.gather(table, np.array(4, dtype=dtype)), table[4])
    assert_bitwise(fe.gather(table, 4), table[4])
    assert_bitwise(fe.gather(table, np.int32(2)), table[2])


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4), (2, 0, 3), (0, 0, 0)])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_empty_ids_give_empty_results(shape, dtype):
    rng = np.random.default_rng(1)
    tok, pos = float_table(rng, 5, 3), float_table(rng, 4, 3)
    ids = np.zeros(shape, dtype=dtype)
    assert_bitwise(fe.gather(tok, ids), np.zeros(shape + (3,), np.float32))
    assert_bitwise(fe.gather(tok, ids, out=np.empty(shape + (3,), np.float32)), np.zeros(shape + (3,), np.float32))
    assert_bitwise(fe.gather_add(tok, pos, ids), np.zeros(shape + (3,), np.float32))
    assert_bitwise(fe.gather_add(tok, pos, ids, positions=1), np.zeros(shape + (3,), np.float32))
    grad = float_table(rng, 5, 3)
    before = grad.copy()
    fe.scatter_add(grad, ids, np.zeros(shape + (3,), np.float32))
    assert_bitwise(grad, before)
    pgrad = float_table(rng, 4, 3)
    pbefore = pgrad.copy()
    fe.gather_add_backward(np.zeros(shape + (3,), np.float32), ids, grad, pgrad)
    assert_bitwise(grad, before)
    assert_bitwise(pgrad, pbefore)
    rows, values = fe.coalesce(ids, np.zeros(shape + (3,), np.float32))
    assert_bitwise(rows, np.zeros(0, np.int64))
    assert_bitwise(values, np.zeros((0, 3), np.float32))


def test_empty_list_ids():
    table = float_table(np.random.default_rng(2), 5, 3)
    assert_bitwise(fe.gather(table, []), np.zeros((0, 3), np.float32))
    assert_bitwise(fe.gather(table, [[], []]), np.zeros((2, 0, 3), np.float32))


def test_empty_ids_with_sequence_longer_than_position_table():
    # No id is looked up, so no position is either: an empty result, no error.
    rng = np.random.default_rng(3)
    tok, pos = float_table(rng, 5, 3), float_table(rng, 2, 3)
    ids = np.zeros((0, 6), np.int64)
    assert_bitwise(fe.gather_add(tok, pos, ids), np.zeros((0, 6, 3), np.float32))


# ---------------------------------------------------------------- gather_add

@FAST
@given(data=st.data())
def test_gather_add_matches_numpy(data):
    rng = _rng(data)
    V = data.draw(st.integers(1, 20), label="V")
    D = data.draw(st.sampled_from([1, 2, 3, 7, 8, 9, 16, 17, 31, 40]), label="D")
    shape = data.draw(ids_shapes(), label="shape")
    ids = data.draw(id_arrays(V, shape=shape), label="ids")
    positions, P = data.draw(positions_for(shape, rng), label="positions")
    tok, pos = float_table(rng, V, D), float_table(rng, P, D)
    p = positions_oracle(shape, positions)
    expected = tok[ids.astype(np.int64)] + pos[p]
    form = data.draw(st.sampled_from(ID_FORMS), label="form")
    if data.draw(st.booleans(), label="use_out"):
        out = np.full(shape + (D,), np.nan, dtype=np.float32)
        result = fe.gather_add(tok, pos, as_form(ids, form), positions=positions, out=out)
        assert result is out
    else:
        result = fe.gather_add(tok, pos, as_form(ids, form), positions=positions)
    assert_bitwise(result, expected)


def test_gather_add_positions_semantics_by_hand():
    # Written out by hand, independently of any helper: None is arange(T) on the last axis,
    # an int s is s + arange(T), an array is used as given (broadcast).
    tok = np.arange(10 * 2, dtype=np.float32).reshape(10, 2) * 100
    pos = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    h = fe.gather_add(tok, pos, ids)
    assert_bitwise(h[1, 2], tok[6] + pos[2])
    assert_bitwise(h[0, 0], tok[1] + pos[0])
    h = fe.gather_add(tok, pos, ids, positions=3)
    assert_bitwise(h[1, 2], tok[6] + pos[5])
    assert_bitwise(h[0, 0], tok[1] + pos[3])
    h = fe.gather_add(tok, pos, ids, positions=[[5], [0]])
    assert_bitwise(h[0, 1], tok[2] + pos[5])
    assert_bitwise(h[1, 2], tok[6] + pos[0])
    # a 0-d id is one sequence of length 1 at position 0 (or at the start)
    assert_bitwise(fe.gather_add(tok, pos, 7), tok[7] + pos[0])
    assert_bitwise(fe.gather_add(tok, pos, np.int64(7), positions=4), tok[7] + pos[4])


@pytest.mark.parametrize("pos_dtype", [np.int32, np.int64])
def test_zero_d_ids_with_array_positions(pos_dtype):
    # A 0-d id with a 0-d positions array is a single row tok[i] + pos[p]; the shapes agree exactly.
    rng = np.random.default_rng(7)
    tok, pos = float_table(rng, 5, 3), float_table(rng, 4, 3)
    p = np.array(3, dtype=pos_dtype)
    assert_bitwise(fe.gather_add(tok, pos, np.int64(2), positions=p), tok[2] + pos[3])
    tgrad, pgrad = np.zeros_like(tok), np.zeros_like(pos)
    g = rng.standard_normal(3).astype(np.float32)
    fe.gather_add_backward(g, np.int64(2), tgrad, pgrad, positions=p)
    e_t, e_p = np.zeros_like(tok), np.zeros_like(pos)
    e_t[2] += g
    e_p[3] += g
    assert_bitwise(tgrad, e_t)
    assert_bitwise(pgrad, e_p)


def test_gather_add_start_at_last_valid_position():
    rng = np.random.default_rng(4)
    tok, pos = float_table(rng, 5, 3), float_table(rng, 6, 3)
    ids = np.array([[0, 1, 2], [3, 4, 0]])
    # start + T == P is fine: the last position used is P - 1
    assert_bitwise(fe.gather_add(tok, pos, ids, positions=3), tok[ids] + pos[[3, 4, 5]])


# ---------------------------------------------------------------- scatter_add and the fused backward

@FAST
@given(data=st.data())
def test_scatter_add_matches_add_at(data):
    rng = _rng(data)
    V = data.draw(st.integers(1, 20), label="V")
    D = data.draw(st.sampled_from([1, 2, 3, 7, 8, 9, 16, 17, 31, 40]), label="D")
    ids = data.draw(id_arrays(V), label="ids")
    grad_out = rng.standard_normal(ids.shape + (D,)).astype(np.float32)
    grad = float_table(rng, V, D)  # accumulate into what is already there
    expected = grad.copy()
    np.add.at(expected, ids.astype(np.int64), grad_out)
    form = data.draw(st.sampled_from(ID_FORMS), label="form")
    if data.draw(st.booleans(), label="strided_grad_out") and grad_out.ndim >= 2:
        grad_out = np.asfortranarray(grad_out)  # any layout of an input is fine
    assert fe.scatter_add(grad, as_form(ids, form), grad_out) is None
    assert_bitwise(grad, expected)


@FAST
@given(data=st.data())
def test_gather_add_backward_matches_two_add_at(data):
    rng = _rng(data)
    V = data.draw(st.integers(1, 20), label="V")
    D = data.draw(st.sampled_from([1, 2, 3, 7, 8, 9, 16, 17, 31, 40]), label="D")
    shape = data.draw(ids_shapes(), label="shape")
    ids = data.draw(id_arrays(V, shape=shape), label="ids")
    positions, P = data.draw(positions_for(shape, rng), label="positions")
    grad_hidden = rng.standard_normal(shape + (D,)).astype(np.float32)
    tgrad, pgrad = float_table(rng, V, D), float_table(rng, P, D)
    t_expected, p_expected = tgrad.copy(), pgrad.copy()
    np.add.at(t_expected, ids.astype(np.int64), grad_hidden)
    np.add.at(p_expected, positions_oracle(shape, positions), grad_hidden)
    form = data.draw(st.sampled_from(ID_FORMS), label="form")
    fe.gather_add_backward(grad_hidden, as_form(ids, form), tgrad, pgrad, positions=positions)
    assert_bitwise(tgrad, t_expected)
    assert_bitwise(pgrad, p_expected)


def test_scatter_add_duplicates_are_summed_in_id_order():
    # 1e8 + 1 - 1e8 in float32 depends on the order: row-major order of ids, as np.add.at.
    grad = np.zeros((2, 1), np.float32)
    fe.scatter_add(grad, [1, 1, 1, 0], np.array([[1e8], [1.0], [-1e8], [5.0]], np.float32))
    assert_bitwise(grad, np.array([[5.0], [0.0]], np.float32))
    grad = np.zeros((2, 1), np.float32)
    fe.scatter_add(grad, [1, 1, 1], np.array([[1.0], [1e8], [-1e8]], np.float32))
    assert_bitwise(grad, np.array([[0.0], [0.0]], np.float32))
    grad = np.zeros((2, 1), np.float32)
    fe.scatter_add(grad, [1, 1, 1], np.array([[1e8], [-1e8], [1.0]], np.float32))
    assert_bitwise(grad, np.array([[0.0], [1.0]], np.float32))


# ---------------------------------------------------------------- coalesce

@FAST
@given(data=st.data())
def test_coalesce_matches_unique_and_add_at(data):
    rng = _rng(data)
    D = data.draw(st.sampled_from([1, 2, 3, 7, 8, 9, 16, 17, 31, 40]), label="D")
    spread = data.draw(st.sampled_from([20, 200, 10**6, 2**40, 2**62]), label="spread")
    shape = data.draw(ids_shapes(), label="shape")
    dtypes = (np.int32, np.int64) if spread < 2**31 else (np.int64,)
    ids = data.draw(id_arrays(spread, shape=shape, dtypes=dtypes), label="ids")
    grad_out = rng.standard_normal(shape + (D,)).astype(np.float32)
    rows, values = fe.coalesce(as_form(ids, data.draw(st.sampled_from(("array", "list")))), grad_out)
    e_rows, e_values = coalesce_oracle(ids, grad_out)
    assert_bitwise(rows, e_rows)
    assert_bitwise(values, e_values)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_coalesce_edges(dtype):
    rng = np.random.default_rng(5)
    g = rng.standard_normal((6, 4)).astype(np.float32)
    rows, values = fe.coalesce(np.full(6, 9, dtype), g)  # all ids equal
    assert_bitwise(rows, np.array([9], np.int64))
    assert_bitwise(values, coalesce_oracle(np.full(6, 9), g)[1])
    rows, values = fe.coalesce(np.array([3], dtype), g[:1])  # one id
    assert_bitwise(rows, np.array([3], np.int64))
    assert_bitwise(values, g[:1])
    rows, values = fe.coalesce(np.array(2, dtype), g[0])  # 0-d ids
    assert_bitwise(rows, np.array([2], np.int64))
    assert_bitwise(values, g[:1])
    big = np.iinfo(dtype).max  # the largest id is a valid row id for a sparse gradient
    rows, values = fe.coalesce(np.array([big, 0, big], dtype), g[:3])
    e_rows, e_values = coalesce_oracle(np.array([big, 0, big], np.int64), g[:3])
    assert_bitwise(rows, e_rows)
    assert_bitwise(values, e_values)


# ---------------------------------------------------------------- the threaded path

BIG_CASES = [
    # (ids shape, V, D): N * D at, just below, and well past SERIAL_ELEMENTS; odd D; 3-D ids
    ((512,), 300, 64),  # N * D == 32768 exactly
    ((4, 8191), 50, 1),  # N * D == 32764: the serial path, for contrast
    ((8, 128), 97, 40),  # D not a multiple of 16
    ((3, 5, 700), 1000, 33),
    ((64, 1024), 2000, 32),  # N * D = 2M: several threads' worth
]


def _big_inputs(shape, V, D, seed):
    rng = np.random.default_rng(seed)
    # Zipf-like ids: heavy duplicates, so accumulation order matters
    ids = np.minimum(rng.zipf(1.3, size=shape) - 1, V - 1).astype(np.int64)
    tok = float_table(rng, V, D)
    T = shape[-1]
    pos = float_table(rng, T + 3, D)
    grad = (rng.standard_normal(shape + (D,)) * 10.0 ** rng.integers(-4, 5, size=shape + (1,))).astype(np.float32)
    return ids, tok, pos, grad


@pytest.mark.parametrize("shape,V,D", BIG_CASES)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_threaded_path_matches_numpy_for_1_and_2_threads(shape, V, D, dtype):
    ids64, tok, pos, grad_out = _big_inputs(shape, V, D, seed=sum(shape) + V + D)
    ids = ids64.astype(dtype)
    p = positions_oracle(shape, 2)
    e_gather = tok[ids64]
    e_gather_add = tok[ids64] + pos[p]
    e_tgrad, e_pgrad = np.zeros_like(tok), np.zeros_like(pos)
    np.add.at(e_tgrad, ids64, grad_out)
    np.add.at(e_pgrad, p, grad_out)
    e_rows, e_values = coalesce_oracle(ids64, grad_out)
    p_arr = np.random.default_rng(0).integers(0, pos.shape[0], size=shape)
    e_pgrad_arr = np.zeros_like(pos)
    np.add.at(e_pgrad_arr, p_arr, grad_out)
    results = {}
    for n in (1, 2):
        with num_threads(n):
            assert fe.get_num_threads() == (n if fe.openmp_enabled() else 1)
            r = {}
            r["gather"] = fe.gather(tok, ids)
            r["gather_out"] = fe.gather(tok, ids, out=np.full(shape + (D,), np.nan, np.float32))
            r["gather_add"] = fe.gather_add(tok, pos, ids, positions=2)
            r["gather_add_arr"] = fe.gather_add(tok, pos, ids, positions=p_arr)
            g = np.zeros_like(tok)
            fe.scatter_add(g, ids, grad_out)
            r["scatter_add"] = g
            tg, pg = np.zeros_like(tok), np.zeros_like(pos)
            fe.gather_add_backward(grad_out, ids, tg, pg, positions=2)
            r["backward_t"], r["backward_p"] = tg, pg
            tg2, pg2 = np.zeros_like(tok), np.zeros_like(pos)
            fe.gather_add_backward(grad_out, ids, tg2, pg2, positions=p_arr)
            r["backward_t2"], r["backward_p2"] = tg2, pg2
            r["rows"], r["values"] = fe.coalesce(ids, grad_out)
            results[n] = r
    for n in (1, 2):
        r = results[n]
        assert_bitwise(r["gather"], e_gather)
        assert_bitwise(r["gather_out"], e_gather)
        assert_bitwise(r["gather_add"], e_gather_add)
        assert_bitwise(r["gather_add_arr"], tok[ids64] + pos[p_arr])
        assert_bitwise(r["scatter_add"], e_tgrad)
        assert_bitwise(r["backward_t"], e_tgrad)
        assert_bitwise(r["backward_p"], e_pgrad)
        assert_bitwise(r["backward_t2"], e_tgrad)
        assert_bitwise(r["backward_p2"], e_pgrad_arr)
        assert_bitwise(r["rows"], e_rows)
        assert_bitwise(r["values"], e_values)


def test_big_gather_add_sequence_split_across_threads():
    # The threads split the flat ids; each must restart its position counter at the right
    # place (i % T), also when a split falls inside a sequence (T prime, N not divisible).
    rng = np.random.default_rng(6)
    shape, V, D = (37, 31), 500, 64
    ids = rng.integers(0, V, size=shape)
    tok, pos = float_table(rng, V, D), float_table(rng, 40, D)
    assert np.prod(shape) * D >= SERIAL_ELEMENTS
    for start in (0, 9):
        expected = tok[ids] + pos[positions_oracle(shape, start)]
        for n in (1, 2):
            with num_threads(n):
                assert_bitwise(fe.gather_add(tok, pos, ids, positions=start), expected)


# ---------------------------------------------------------------- determinism

def test_backward_is_bitwise_deterministic_across_runs_and_threads():
    shape, V, D = (64, 1024), 3000, 48
    ids, tok, pos, grad = _big_inputs(shape, V, D, seed=11)
    pos = float_table(np.random.default_rng(12), 1030, D)
    p_arr = np.random.default_rng(13).integers(0, 1030, size=shape)
    # The data must make the order of accumulation visible, or this test could not fail:
    forward, backward = np.zeros_like(tok), np.zeros_like(tok)
    np.add.at(forward, ids.reshape(-1), grad.reshape(-1, D))
    np.add.at(backward, ids.reshape(-1)[::-1], grad.reshape(-1, D)[::-1])
    assert forward.tobytes() != backward.tobytes()

    def run():
        out = []
        g = np.zeros_like(tok)
        fe.scatter_add(g, ids, grad)
        out.append(g)
        for positions in (3, p_arr):
            tg, pg = np.zeros_like(tok), np.zeros_like(pos)
            fe.gather_add_backward(grad, ids, tg, pg, positions=positions)
            out += [tg, pg]
        out += list(fe.coalesce(ids, grad))
        for sparse in (False, True):
            layer = fe.TokenPositionEmbedding.from_pretrained(tok, pos, sparse=sparse)
            layer(ids, positions=p_arr)
            layer.backward(grad)
            layer.backward(grad)
            out += [layer.token.dense_grad(), layer.position.dense_grad()]
        return [a.tobytes() for a in out]

    first = None
    for n in (1, 2, 1, 2):
        with num_threads(n):
            got = run()
        if first is None:
            first = got
            assert first[0] == forward.tobytes()  # and it is np.add.at's order
        for k, (a, b) in enumerate(zip(got, first)):
            if a != b:  # (pytest.fail: an assert would make pytest diff megabytes of bytes, for minutes)
                pytest.fail(f"result {k} of run() differs with {n} threads")
