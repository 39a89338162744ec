"""The numpy layers and fastembed.optim's unfused optimizers on float64, float16 and bfloat16 tables, and
float32 beside them, unchanged (issue 10, item 1: spec/nn_dtypes.md).

The spec: a layer's dtype= (float32, float64, float16 or ml_dtypes.bfloat16; anything else a TypeError)
gives its weight; the init is the float64 normal times INIT_STD cast to the dtype; from_pretrained copies and
keeps the source's dtype unless dtype= converts it (once). Every gradient has the layer's dtype, and a
grad_out of another dtype is a TypeError naming both, with nothing changed. The arithmetic of each op is
the kernels' for the dtype (gather copies bits; gather_add, coalesce and the sums of the bags run in
float32 for the 16-bit types and round; scatter_add rounds after each add; float64 runs in float64). The
optimizers take tables of the four dtypes with state of the weight's dtype, refuse a gradient of another
dtype before any parameter moves, step with the kernel of the dtype, and equal the fused rules bit for bit.

Oracles, independent of fastembed's code: numpy's float64 normal cast by numpy (float16: one rounding,
checked below) and ml_dtypes (bfloat16: one rounding in recent versions, through float32 in older ones); per-dtype models written here (each lookup's add in the compute type,
float32 for the 16-bit types and float32, float64 for float64, rounded to the dtype after each add; the
bags' sums in the compute type rounded once); and test_optim_dtypes.py's transcriptions of the optimizer
kernels (`step_model`, `scatter_model`, `coalesce_model`: numpy, op by op, per dtype). Every comparison is
bitwise (any NaN matches any NaN for the 16-bit types).
"""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastembed as fe
from fastembed import optim
from fastembed.nn import INIT_STD, EmbeddingBag, LookupGrad, SparseGrad
from _helpers import FEW, ID_DTYPES, Snapshot, positions_oracle
from test_dtypes import BF16, F16, F32, F64, assert_same, narrow
from test_optim_dtypes import coalesce_model, down, dtype_of, scatter_model, step_model, up

NAMES = ("float32", "float64", "float16", "bfloat16")
ALL = tuple(d for d in (F32, F64, F16, BF16) if d is not None)


def others(dtype):
    """The float dtypes a layer of dtype must refuse in its gradients."""
    return [d for d in ALL if d != dtype]


def names_both(message, a, b):
    """The message names both dtypes as words ("float16" inside "bfloat16" does not count)."""
    return all(re.search(rf"\b{np.dtype(d).name}\b", message) for d in (a, b))


# ---------------------------------------------------------------- data and per-dtype models (no fastembed code)

def stored(rng, shape, dtype, scale=1.0):
    """Normal values times scale, rounded to dtype (the 16-bit types through float32, exactly as narrow does)."""
    x = rng.standard_normal(shape) * scale
    return np.asarray(x if dtype == F64 else narrow(x.astype(np.float32), dtype)).astype(dtype)


def init_oracle(seed, V, D, dtype):
    """The spec's init: the float64 normal times INIT_STD, cast to dtype by numpy's cast (ml_dtypes' for
    bfloat16: one rounding in recent versions, through float32 in older ones)."""
    return (np.random.default_rng(seed).standard_normal((V, D)) * 0.08).astype(dtype)


def add_at_model(grad, ids, src):
    """grad[ids[k]] += src[k] for each lookup k in row-major order: each add in the compute type (float64 for
    float64, float32 else), rounded to the dtype after each add. A new array."""
    out, dt = grad.copy(), grad.dtype
    flat = np.asarray(ids).reshape(-1).astype(np.int64)
    rows = src.reshape(len(flat), grad.shape[1])
    with np.errstate(all="ignore"):
        for k, r in enumerate(flat):
            out[r] = down(up(out[r], dt) + up(rows[k], dt), dt)
    return out


def sum_model(a, b, dtype):
    """a + b (same shape) in the compute type, rounded once: gather_add's rule."""
    with np.errstate(all="ignore"):
        return down(up(a, dtype) + up(b, dtype), dtype)


def decay_model(g, w, wd, dtype):
    """Adagrad's dense weight decay: float32 ``g + f32(wd) * w``; float64 in float64; the 16-bit types
    ``round(f32(g) + f32(wd) * f32(w))`` (float32 ops, rounded to the type once)."""
    with np.errstate(all="ignore"):
        if dtype == F64:
            return g + wd * w
        if dtype == F32:
            return g + np.float32(wd) * w
        return down(up(g, dtype) + np.float32(wd) * up(w, dtype), dtype)


def dense_of(rows, values, V):
    out = np.zeros((V, values.shape[1]), values.dtype)
    out[rows] = values
    return out


# ---------------------------------------------------------------- 1. construction

@pytest.mark.parametrize("name", NAMES)
def test_each_layer_has_its_dtype_and_the_init_rounded_once(name):
    dtype = dtype_of(name)
    for spelling in (dtype, dtype.name, dtype.type):
        layer = fe.Embedding(13, 7, dtype=spelling, seed=5)
        assert layer.weight.dtype == dtype and layer.weight.shape == (13, 7) and layer.weight.flags.c_contiguous
        assert_same(layer.weight, init_oracle(5, 13, 7, dtype))
    assert layer.grad is None
    bag = EmbeddingBag(13, 7, dtype=dtype, seed=5)
    assert_same(bag.weight, init_oracle(5, 13, 7, dtype))
    tpe = fe.TokenPositionEmbedding(11, 6, 7, dtype=dtype, seed=9)
    seeds = np.random.SeedSequence(9).spawn(2)  # the float32 layer's seeding, unchanged
    assert_same(tpe.token.weight, init_oracle(seeds[0], 11, 7, dtype))
    assert_same(tpe.position.weight, init_oracle(seeds[1], 6, 7, dtype))


def test_the_default_is_float32_with_the_same_bits_as_before():
    expected = (np.random.default_rng(3).standard_normal((40, 9)) * INIT_STD).astype(np.float32)
    assert_same(fe.Embedding(40, 9, seed=3).weight, expected)
    assert_same(fe.Embedding(40, 9, dtype=np.float32, seed=3).weight, expected)
    assert fe.TokenPositionEmbedding(4, 3, 2).position.weight.dtype == F32
    assert EmbeddingBag(4, 2).weight.dtype == F32


def test_the_float16_cast_of_the_oracle_rounds_once():
    # The init oracle is numpy's cast from float64: for float16 one rounding, not through float32 (which would
    # turn this just-above-halfway value into a tie and round it down to even). bfloat16 is ml_dtypes' cast,
    # whose rounding from float64 depends on its version (older ones go through float32): the layer and the
    # oracle use the same cast, and the spec says only that (numpy's cast, ml_dtypes' for bfloat16).
    x = np.array([1 + 2.0**-11 + 2.0**-40])
    assert x.astype(F16)[0] == np.float16(1 + 2.0**-10)


@pytest.mark.parametrize("name", NAMES)
def test_embedding_bag_padding_row_starts_at_zero(name):
    dtype = dtype_of(name)
    bag = EmbeddingBag(6, 5, dtype=dtype, padding_idx=-2, seed=1)
    expected = init_oracle(1, 6, 5, dtype)
    expected[4] = 0
    assert_same(bag.weight, expected)


BAD_DTYPES = [np.int32, "float8", np.complex64, np.uint16, "int64", np.bool_]


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=str)
def test_a_dtype_that_is_not_one_of_the_four_is_a_type_error_naming_it(bad):
    word = bad if isinstance(bad, str) else np.dtype(bad).name
    makers = [lambda: fe.Embedding(3, 2, dtype=bad), lambda: EmbeddingBag(3, 2, dtype=bad),
              lambda: fe.TokenPositionEmbedding(3, 2, 2, dtype=bad),
              lambda: fe.Embedding(3, 2, dtype=bad, sparse=True, coalesce=False),
              lambda: fe.Embedding(3, 2, dtype=bad, fused=optim.FusedAdagrad()),
              lambda: fe.Embedding.from_pretrained(np.zeros((3, 2)), dtype=bad),
              lambda: EmbeddingBag.from_pretrained(np.zeros((3, 2)), dtype=bad),
              lambda: fe.TokenPositionEmbedding.from_pretrained(np.zeros((3, 2)), np.zeros((2, 2)), dtype=bad)]
    for make in makers:
        with pytest.raises(TypeError, match=word):
            make()


def test_a_constructor_refuses_dtype_none():
    """np.dtype(None) is float64, while from_pretrained's dtype=None keeps the table's own: a constructor, which
    has no table to keep, refuses None rather than read it as float64."""
    for make in (lambda: fe.Embedding(3, 2, dtype=None), lambda: EmbeddingBag(3, 2, dtype=None),
                 lambda: fe.TokenPositionEmbedding(3, 2, 2, dtype=None)):
        with pytest.raises(TypeError, match="None"):
            make()


# ---------------------------------------------------------------- 2. from_pretrained

@pytest.mark.parametrize("name", NAMES)
def test_from_pretrained_keeps_the_dtype_and_copies(name):
    dtype = dtype_of(name)
    rng = np.random.default_rng(2)
    source = stored(rng, (5, 4), dtype)
    before = source.copy()
    for cls in (fe.Embedding, EmbeddingBag):
        layer = cls.from_pretrained(source)
        assert layer.weight.dtype == dtype and layer.weight.flags.c_contiguous
        assert not np.shares_memory(layer.weight, source)
        assert_same(layer.weight, before)
        source[...] = 0  # writing the source does not change the layer
        assert_same(layer.weight, before)
        source[...] = before
    strided = np.asarray(stored(rng, (5, 8), dtype))[:, ::2]  # a non-contiguous source: a C-contiguous copy
    layer = fe.Embedding.from_pretrained(strided)
    assert layer.weight.flags.c_contiguous and layer.weight.dtype == dtype
    assert_same(layer.weight, np.ascontiguousarray(strided))
    pos = stored(rng, (3, 4), dtype)
    tpe = fe.TokenPositionEmbedding.from_pretrained(source, pos)
    assert_same(tpe.token.weight, source)
    assert_same(tpe.position.weight, pos)
    assert not np.shares_memory(tpe.token.weight, source) and not np.shares_memory(tpe.position.weight, pos)


def test_a_list_of_python_floats_is_a_float64_layer_and_float64_arrays_stay_float64():
    layer = fe.Embedding.from_pretrained([[0.1, 0.2], [0.3, 0.4]])
    assert layer.weight.dtype == F64
    assert layer.weight.tolist() == [[0.1, 0.2], [0.3, 0.4]]  # no rounding through float32
    assert fe.Embedding.from_pretrained(np.full((2, 2), 0.1)).weight.dtype == F64
    assert EmbeddingBag.from_pretrained(np.full((2, 2), 0.1)).weight.dtype == F64


@pytest.mark.parametrize("name", NAMES)
def test_from_pretrained_dtype_converts_once(name):
    dtype = dtype_of(name)
    rng = np.random.default_rng(4)
    source = rng.standard_normal((4, 3))
    # values a rounding through float32 would move (just above a tie of the 16-bit types): the layer converts
    # as numpy's cast of the array does (for bfloat16, ml_dtypes', whichever way its version rounds)
    source[0, :2] = [1 + 2.0**-11 + 2.0**-40, 1 + 2.0**-8 + 2.0**-30]
    expected = source.astype(dtype)
    for layer in (fe.Embedding.from_pretrained(source, dtype=dtype),
                  fe.Embedding.from_pretrained(source.tolist(), dtype=dtype),
                  EmbeddingBag.from_pretrained(source, dtype=dtype, padding_idx=1)):
        assert_same(layer.weight, expected)  # from_pretrained keeps the padding row given
    tpe = fe.TokenPositionEmbedding.from_pretrained(source, source[:2].astype(np.float32), dtype=dtype)
    assert_same(tpe.token.weight, expected)
    assert_same(tpe.position.weight, source[:2].astype(np.float32).astype(dtype))
    if dtype != F64:
        assert fe.Embedding.from_pretrained(source.astype(dtype), dtype=np.float64).weight.dtype == F64


def test_an_int_table_is_a_type_error_that_says_to_pass_dtype():
    for make in (lambda w: fe.Embedding.from_pretrained(w), lambda w: EmbeddingBag.from_pretrained(w),
                 lambda w: fe.TokenPositionEmbedding.from_pretrained(w, w[:2])):
        with pytest.raises(TypeError, match=r"int64[\s\S]*dtype=|dtype=[\s\S]*int64"):
            make(np.arange(6, dtype=np.int64).reshape(3, 2))
    assert fe.Embedding.from_pretrained(np.arange(6).reshape(3, 2), dtype=np.float16).weight.dtype == F16


@pytest.mark.parametrize("name", NAMES)
def test_token_position_from_pretrained_of_two_dtypes_is_a_type_error_naming_both(name):
    dtype = dtype_of(name)
    for other in others(dtype):
        with pytest.raises(TypeError) as info:
            fe.TokenPositionEmbedding.from_pretrained(np.zeros((3, 2), dtype), np.zeros((2, 2), other))
        assert names_both(str(info.value), dtype, other), str(info.value)


# ---------------------------------------------------------------- 3. forward

@pytest.mark.parametrize("name", NAMES)
def test_forward_is_the_rows_and_token_plus_position_rounded_once(name):
    dtype = dtype_of(name)
    rng = np.random.default_rng(6)
    layer = fe.Embedding.from_pretrained(stored(rng, (7, 5), dtype))
    for ids in (np.array([[6, 0, 6], [2, 6, 1]], np.int32), np.array([3, 3]), np.zeros((0,), np.int64), 4):
        out = layer(ids)
        assert_same(out, layer.weight[np.asarray(ids)])
    tpe = fe.TokenPositionEmbedding.from_pretrained(stored(rng, (7, 5), dtype), stored(rng, (4, 5), dtype))
    ids = np.array([[6, 0, 6], [2, 6, 1]])
    for positions in (None, 1, np.array([[3, 0, 1], [2, 2, 0]])):
        p = positions_oracle(ids.shape, positions)
        out = tpe(ids, positions)
        assert_same(out, sum_model(tpe.token.weight[ids], tpe.position.weight[p], dtype))


# bags: small cases, ids 2-D (B, L); the oracle sums in the compute type and rounds once per bag

def bag_model(weight, ids, mode, padding_idx=None):
    dt = weight.dtype
    B, D = ids.shape[0], weight.shape[1]
    out = np.zeros((B, D), dt)
    with np.errstate(all="ignore"):
        for b in range(B):
            kept = [int(i) for i in ids[b] if i != padding_idx]
            if not kept:
                continue
            if mode == "max":
                best = weight[kept[0]].copy()
                for i in kept[1:]:
                    bigger = up(weight[i], dt) > up(best, dt)
                    best[bigger] = weight[i][bigger]
                out[b] = best
                continue
            acc = up(np.zeros(D, dt), dt)
            for i in kept:
                acc = acc + up(weight[i], dt)
            s = down(acc, dt)
            if mode == "mean":  # the rounded sum over the count rounded to the dtype, rounded again
                s = down(up(s, dt) / up(down(np.float32(len(kept)), dt), dt), dt)
            out[b] = s
    return out


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("name", NAMES)
def test_embedding_bag_forward_is_the_reduction_of_the_dtype(name, mode):
    dtype = dtype_of(name)
    rng = np.random.default_rng(8)
    bag = EmbeddingBag.from_pretrained(stored(rng, (6, 9), dtype), mode=mode, padding_idx=5)
    ids = np.array([[0, 1, 2, 1, 3], [5, 5, 5, 5, 5], [4, 4, 4, 0, 5]], np.int32)
    out = bag(ids)
    assert_same(out, bag_model(bag.weight, ids, mode, padding_idx=5))
    flat, offsets = ids.reshape(-1).astype(np.int64), np.array([0, 5, 10])
    assert_same(bag(flat, offsets), bag_model(bag.weight, ids, mode, padding_idx=5))


# ---------------------------------------------------------------- 4. backward

@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_dense_backward_adds_each_lookup_and_rounds_in_the_dtype(name, id_dtype):
    dtype = dtype_of(name)
    rng = np.random.default_rng(10)
    layer = fe.Embedding(7, 6, dtype=dtype, seed=1)
    w0 = layer.weight.copy()
    grad = np.zeros((7, 6), dtype)
    for ids in (np.array([[6, 0, 6], [2, 6, 6]], id_dtype), np.array([1, 6], id_dtype),
                np.zeros((2, 0), id_dtype)):
        layer(ids)
        g = stored(rng, ids.shape + (6,), dtype)
        layer.backward(g)
        grad = add_at_model(grad, ids, g)
        assert layer.grad.dtype == dtype
        assert_same(layer.grad, grad)
        assert_same(layer.dense_grad(), grad)
    assert_same(layer.weight, w0)
    layer.zero_grad()
    assert_same(layer.dense_grad(), np.zeros((7, 6), dtype))


@pytest.mark.parametrize("name", NAMES)
def test_dense_backward_of_small_integers_is_numpy_add_at_in_float64(name):
    # Values whose every partial sum is exact in the dtype: the per-add model, np.add.at in float64 rounded,
    # and the layer all agree (a check of the model itself, and of the layer without it).
    dtype = dtype_of(name)
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 4, (3, 5))
    g = rng.integers(-8, 9, (3, 5, 3)).astype(np.float64)
    expected = np.zeros((4, 3))
    np.add.at(expected, ids, g)
    layer = fe.Embedding(4, 3, dtype=dtype)
    layer(ids)
    layer.backward(g.astype(dtype))
    assert_same(layer.grad, expected.astype(dtype))
    assert_same(add_at_model(np.zeros((4, 3), dtype), ids, g.astype(dtype)), expected.astype(dtype))


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_sixteen_bit_dense_backward_rounds_after_each_add(name):
    # 1 then 2**-11 three times (float16) or 2**-8 (bfloat16): rounded after each add, each small add is a
    # tie that rounds back to 1 (even); summed first in float32, three of them would move it.
    dtype = dtype_of(name)
    tiny = 2.0**-11 if dtype == F16 else 2.0**-8
    layer = fe.Embedding(2, 1, dtype=dtype)
    layer([1, 1, 1, 1])
    layer.backward(np.array([[1.0], [tiny], [tiny], [tiny]]).astype(dtype))
    assert float(layer.grad[1, 0]) == 1.0


@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_sparse_backward_is_the_coalesced_rows_in_the_dtype(name, id_dtype):
    dtype = dtype_of(name)
    rng = np.random.default_rng(12)
    layer = fe.Embedding(9, 5, dtype=dtype, sparse=True, seed=2)
    calls = [np.array([[7, 2, 7], [7, 7, 0]], id_dtype), np.array([2, 8], id_dtype), np.zeros(0, id_dtype)]
    rows, values = np.zeros(0, np.int64), np.zeros((0, 5), dtype)
    for ids in calls:
        layer(ids)
        g = stored(rng, ids.shape + (5,), dtype)
        layer.backward(g)
        part_rows, part = coalesce_model(ids, g, dtype)
        # a second backward: the earlier sums and the new ones, summed again as one coalesce
        rows, values = coalesce_model(np.concatenate([rows, part_rows]), np.concatenate([values, part]), dtype)
        grad = layer.grad
        assert isinstance(grad, SparseGrad) and grad.rows.dtype == np.int64 and grad.values.dtype == dtype
        assert_same(grad.rows, rows)
        assert_same(grad.values, values)
        assert_same(grad.to_dense(9), dense_of(rows, values, 9))
        assert_same(layer.dense_grad(), dense_of(rows, values, 9))


@pytest.mark.parametrize("name", NAMES)
def test_lookup_grad_keeps_grad_out_itself_in_the_dtype(name):
    dtype = dtype_of(name)
    rng = np.random.default_rng(13)
    layer = fe.Embedding(6, 4, dtype=dtype, sparse=True, coalesce=False, seed=2)
    ids = np.array([[5, 0, 5], [2, 5, 1]], np.int32)
    layer(ids)
    g = stored(rng, (2, 3, 4), dtype)
    layer.backward(g)
    grad = layer.grad
    assert isinstance(grad, LookupGrad) and grad.values.dtype == dtype
    assert np.shares_memory(grad.values, g)
    assert_same(grad.ids, ids.reshape(-1))
    assert_same(grad.values, g.reshape(6, 4))
    dense = add_at_model(np.zeros((6, 4), dtype), ids, g)
    assert_same(grad.to_dense(6), dense)
    assert_same(layer.dense_grad(), dense)
    rows, values = coalesce_model(ids, g, dtype)
    coalesced = grad.coalesce()
    assert_same(coalesced.rows, rows)
    assert_same(coalesced.values, values)
    layer(np.array([3, 5], np.int64))  # a second backward concatenates, in the dtype
    g2 = stored(rng, (2, 4), dtype)
    layer.backward(g2)
    assert_same(layer.grad.values, np.concatenate([g.reshape(6, 4), g2]))
    assert_same(layer.grad.ids, np.array([5, 0, 5, 2, 5, 1, 3, 5], np.int64))


@pytest.mark.parametrize("form", ["dense", "sparse", "lookup"])
@pytest.mark.parametrize("name", NAMES)
def test_token_position_backward_in_the_dtype(name, form):
    dtype = dtype_of(name)
    rng = np.random.default_rng(14)
    layer = fe.TokenPositionEmbedding(7, 4, 5, dtype=dtype, sparse=form != "dense", coalesce=form != "lookup",
                                      seed=3)
    ids = np.array([[6, 0, 6], [2, 6, 6]], np.int32)
    p = positions_oracle(ids.shape, None)
    layer(ids)
    g = stored(rng, (2, 3, 5), dtype)
    layer.backward(g)
    for table, where, V in ((layer.token, ids, 7), (layer.position, p, 4)):
        if form == "dense":
            assert_same(table.grad, add_at_model(np.zeros((V, 5), dtype), where, g))
        elif form == "sparse":
            rows, values = coalesce_model(where, g, dtype)
            assert_same(table.grad.rows, rows)
            assert_same(table.grad.values, values)
        else:
            assert np.shares_memory(table.grad.values, g)
            assert_same(table.grad.values, g.reshape(6, 5))
            assert_same(table.grad.ids.astype(np.int64), where.reshape(-1).astype(np.int64))


@pytest.mark.parametrize("name", NAMES)
def test_empty_ids_give_an_empty_gradient_of_the_dtype(name):
    dtype = dtype_of(name)
    for sparse, coalesce in ((False, True), (True, True), (True, False)):
        layer = fe.Embedding(3, 2, dtype=dtype, sparse=sparse, coalesce=coalesce)
        layer(np.zeros((0, 4), np.int32))
        layer.backward(np.zeros((0, 4, 2), dtype))
        assert layer.dense_grad().dtype == dtype
        assert_same(layer.dense_grad(), np.zeros((3, 2), dtype))
        if sparse:
            assert layer.grad.values.dtype == dtype and layer.grad.values.shape == (0, 2)


def layer_cases(dtype):
    """(name, layer, its tables, forward args) of every backward path, each after one forward."""
    cases = []
    for form in ("dense", "sparse", "lookup", "fused"):
        kw = dict(fused=optim.FusedSparseAdam()) if form == "fused" else dict(sparse=form != "dense",
                                                                              coalesce=form != "lookup")
        cases.append((f"Embedding-{form}", fe.Embedding(5, 3, dtype=dtype, seed=1, **kw), (np.array([[4, 1, 4]]),)))
        cases.append((f"TokenPosition-{form}", fe.TokenPositionEmbedding(5, 4, 3, dtype=dtype, seed=1, **kw),
                      (np.array([[4, 1, 4]]),)))
        if form != "fused":
            cases.append((f"EmbeddingBag-{form}", EmbeddingBag(5, 3, dtype=dtype, seed=1, mode="sum",
                                                               **kw), (np.array([[4, 1, 4]]),)))
    return cases


def tables_of(layer):
    return layer.parameters() if isinstance(layer, fe.TokenPositionEmbedding) else [layer]


def grad_snapshot(layer):
    """Everything a refused backward must leave: weights, states, and the gradient (its arrays' bits)."""
    arrays = {}
    for k, t in enumerate(tables_of(layer)):
        arrays[f"w{k}"] = t.weight
        for key, s in (t.state or {}).items():
            arrays[f"s{k}{key}"] = s
        g = t.grad
        for j, a in enumerate([] if g is None else ([g] if isinstance(g, np.ndarray) else list(g))):
            arrays[f"g{k}{j}"] = a
    return Snapshot(**arrays), [t.grad for t in tables_of(layer)]


@pytest.mark.parametrize("name", NAMES)
def test_a_grad_out_of_another_dtype_is_a_type_error_naming_both_and_changes_nothing(name):
    dtype = dtype_of(name)
    rng = np.random.default_rng(15)
    for case, layer, args in layer_cases(dtype):
        out = layer(*args)
        if layer.fused is None:
            layer.backward(stored(rng, out.shape, dtype))  # a gradient already there: it must stay as it was
        out = layer(*args)
        snap, grads = grad_snapshot(layer)
        for other in others(dtype):
            with pytest.raises(TypeError) as info:
                layer.backward(stored(rng, out.shape, dtype).astype(other))
            assert names_both(str(info.value), dtype, other), f"{case}: {info.value}"
            snap.assert_unchanged()
            assert all(t.grad is g for t, g in zip(tables_of(layer), grads)), case
        layer.backward(stored(rng, out.shape, dtype))  # and the layer still takes its own dtype


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("form", ["dense", "sparse", "lookup"])
@pytest.mark.parametrize("name", NAMES)
def test_embedding_bag_backward_in_the_dtype(name, form, mode):
    # mean over bags of 2 and 4 kept ids: 1/count is exact in every dtype, so scaling is exact and each
    # lookup's value is grad_out's row times a power of two (no rounding but the adds)
    dtype = dtype_of(name)
    rng = np.random.default_rng(16)
    bag = EmbeddingBag(6, 4, dtype=dtype, mode=mode, padding_idx=5, sparse=form != "dense",
                       coalesce=form != "lookup", seed=2)
    ids = np.array([[0, 3, 5, 5], [1, 3, 0, 0]], np.int64)  # 5 is padding: left out, and of the count
    counts = [2, 4]
    bag(ids)
    g = stored(rng, (2, 4), dtype)
    bag.backward(g)
    lookups, values = [], []
    for b in range(2):
        for i in ids[b]:
            if i != 5:
                lookups.append(int(i))
                scale = 1.0 if mode == "sum" else 1.0 / counts[b]
                values.append(down(up(g[b], dtype) * scale, dtype))
    lookups, values = np.array(lookups, np.int64), np.array(values).astype(dtype).reshape(-1, 4)
    if form == "dense":
        assert_same(bag.grad, add_at_model(np.zeros((6, 4), dtype), lookups, values))
    elif form == "sparse":
        rows, sums = coalesce_model(lookups, values, dtype)
        assert_same(bag.grad.rows, rows)
        assert_same(bag.grad.values, sums)
    else:
        assert_same(bag.grad.ids.astype(np.int64), lookups)
        assert_same(bag.grad.values, values)


def test_embedding_bag_max_backward_in_the_dtype():
    for dtype in ALL:
        bag = EmbeddingBag.from_pretrained(np.array([[1, -2], [3, -4], [0, 5]]).astype(dtype), mode="max")
        bag(np.array([[0, 1, 2]]))
        bag.backward(np.array([[0.5, 0.25]]).astype(dtype))
        assert bag.grad.dtype == dtype
        assert bag.grad.tolist() == [[0, 0], [0.5, 0], [0, 0.25]]


# ---------------------------------------------------------------- 5. SparseGrad.check / LookupGrad.check

@pytest.mark.parametrize("name", NAMES)
def test_check_takes_the_four_dtypes_and_the_dtype_asked_for(name):
    dtype = dtype_of(name)
    rows, values = np.array([0, 2]), np.ones((2, 3), dtype)
    for grad in (SparseGrad(rows, values), LookupGrad(rows, values)):
        assert grad.check(4, 3) is grad
        assert grad.check(4, 3, dtype=dtype) is grad
        assert grad.check(4, dtype=dtype) is grad
        for other in others(dtype):
            with pytest.raises(TypeError):
                grad.check(4, 3, dtype=other)
        assert grad.to_dense(4).dtype == dtype
        assert_same(grad.to_dense(4), dense_of(rows, values, 4))
    for bad in (np.int32, np.int64, np.uint16, np.complex64):
        for grad in (SparseGrad(rows, np.ones((2, 3), bad)), LookupGrad(rows, np.ones((2, 3), bad))):
            with pytest.raises(TypeError):
                grad.check(4, 3)


# ---------------------------------------------------------------- 6. the scalar bridge

@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_to_values_sends_value_grads_rounded_once_to_the_dtype(name, sparse):
    dtype = dtype_of(name)
    layer = fe.TokenPositionEmbedding(5, 3, 4, dtype=dtype, sparse=sparse, seed=4)
    ids = [[4, 1, 4], [0, 4, 2]]
    hidden = layer.to_values(ids)
    # the sum-loss: every Value's grad 1.0 (exact in every dtype)
    sum(x for row in hidden for h in row for x in h).backward()
    p = positions_oracle((2, 3), None)

    def backward_of(g, where, V):  # the layer's own backward of g, as the models give it
        if sparse:
            return dense_of(*coalesce_model(where, g, dtype), V)
        return add_at_model(np.zeros((V, 4), dtype), where, g)

    ones = np.ones((2, 3, 4), dtype)
    assert layer.token.dense_grad().dtype == dtype
    assert_same(layer.token.dense_grad(), backward_of(ones, np.array(ids), 5))
    assert_same(layer.position.dense_grad(), backward_of(ones, p, 3))
    # a weighted loss: grads c = 0.1 * k (floats no dtype holds), each rounded once from float64
    layer.zero_grad()
    hidden = layer.to_values(ids)
    c = (np.arange(24).reshape(2, 3, 4) + 1) * 0.1
    c[0, 1, :2] = [1 + 2.0**-11 + 2.0**-40, 1 + 2.0**-8 + 2.0**-30]  # id 1's only lookup: a rounding through
    # float32 would make these ties and round them down (float16, bfloat16)
    flat = [x for row in hidden for h in row for x in h]
    sum(v * float(k) for v, k in zip(flat, c.reshape(-1))).backward()
    rounded = c.astype(dtype)
    assert_same(layer.token.dense_grad(), backward_of(rounded, np.array(ids), 5))
    assert_same(layer.position.dense_grad(), backward_of(rounded, p, 3))


# ---------------------------------------------------------------- 7. the optimizers

LR, BETAS, EPS, DECAY, ACC = 0.1, (0.85, 0.99), 1e-3, 0.3, 0.1

OPTIMIZERS = {  # name: (the optimizer on params, the transcription's kind, the gradient forms it takes)
    "sgd": (lambda ps: optim.SGD(ps, lr=LR), "sgd", ("dense", "sparse", "lookup")),
    "adagrad": (lambda ps: optim.Adagrad(ps, lr=LR, eps=EPS, initial_accumulator_value=ACC), "adagrad",
                ("dense", "sparse", "lookup")),
    "adagrad_decay": (lambda ps: optim.Adagrad(ps, lr=LR, lr_decay=DECAY, eps=EPS), "adagrad",
                      ("dense", "sparse", "lookup")),
    "adagrad_wd": (lambda ps: optim.Adagrad(ps, lr=LR, lr_decay=DECAY, weight_decay=DECAY, eps=EPS), "adagrad",
                   ("dense",)),
    "rowwise": (lambda ps: optim.RowWiseAdagrad(ps, lr=LR, eps=EPS), "rowwise", ("dense", "sparse", "lookup")),
    "adam": (lambda ps: optim.Adam(ps, lr=LR, betas=BETAS, eps=EPS), "adam", ("dense", "sparse", "lookup")),
    "sparse_adam": (lambda ps: optim.SparseAdam(ps, lr=LR, betas=BETAS, eps=EPS), "adam", ("sparse", "lookup")),
}
OPT_FORMS = [(o, f) for o, (_, _, forms) in OPTIMIZERS.items() for f in forms]


def hyper(name, t):
    """The transcription's hyperparameters at step t (1 on the first)."""
    if name == "sgd":
        return (LR,)
    if name in ("adagrad_decay", "adagrad_wd"):
        return (LR / (1 + (t - 1) * DECAY), EPS)
    if name in ("adagrad", "rowwise"):
        return (LR, EPS)
    return (LR, *BETAS, EPS, 1 - BETAS[0]**t, 1 - BETAS[1]**t)


def states_of(opt, name, i):
    if name == "sgd":
        return []
    if name in ("adam", "sparse_adam"):
        return [opt.exp_avg[i], opt.exp_avg_sq[i]]
    return [opt.state_sum[i]]


def initial_states(name, weight):
    (V, D), dt = weight.shape, weight.dtype
    if name == "sgd":
        return []
    if name == "adagrad":
        return [np.full((V, D), ACC).astype(dt)]
    if name == "rowwise":
        return [np.zeros(V, dt)]
    if name in ("adam", "sparse_adam"):
        return [np.zeros((V, D), dt), np.zeros((V, D), dt)]
    return [np.zeros((V, D), dt)]


def grad_model(form, ids, g, V, dtype):
    """The layer's gradient from one backward: dense (V, D), (rows, values), or (ids, values)."""
    if form == "dense":
        return add_at_model(np.zeros((V, g.shape[-1]), dtype), ids, g)
    if form == "sparse":
        return coalesce_model(ids, g, dtype)
    return ids.reshape(-1), g.reshape(ids.size, g.shape[-1])


def assert_grad(grad, expected, form):
    if form == "dense":
        assert_same(grad, expected)
    elif form == "sparse":
        assert isinstance(grad, SparseGrad)
        assert_same(grad.rows, expected[0])
        assert_same(grad.values, expected[1])
    else:
        assert isinstance(grad, LookupGrad)
        assert_same(grad.ids.astype(np.int64), expected[0].astype(np.int64))
        assert_same(grad.values, expected[1])


def model_step(name, form, w, states, grad, t, dtype):
    """(w, states) after the optimizer's step t on the gradient `grad` (as grad_model gives it)."""
    kind, hp = OPTIMIZERS[name][1], hyper(name, t)
    V = w.shape[0]
    if name == "adam":  # a sparse gradient made dense: SparseGrad's rows written, LookupGrad's added in turn
        if form == "sparse":
            grad = dense_of(*grad, V)
        elif form == "lookup":
            grad = add_at_model(np.zeros_like(w), *grad)
        return step_model(kind, w, states, grad, None, hp, dtype)
    if form == "lookup":
        return scatter_model(kind, w, states, grad[0], grad[1], hp, -1, dtype)
    if form == "sparse":
        return step_model(kind, w, states, grad[1], grad[0], hp, dtype)
    if name == "adagrad_wd":
        grad = decay_model(grad, w, DECAY, dtype)
    return step_model(kind, w, states, grad, None, hp, dtype)


def opt_layer(form, dtype, seed, V=7, P=4, D=5):
    return fe.TokenPositionEmbedding(V, P, D, dtype=dtype, sparse=form != "dense", coalesce=form != "lookup",
                                     seed=seed)


@pytest.mark.parametrize("opt_name, form", OPT_FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_steps_each_dtype_as_the_transcription(name, opt_name, form):
    """Three steps on a token and a position table (repeated ids, int32 and int64): the layer's gradients,
    the weights and every state bitwise the transcription's; the state arrays of the weight's dtype."""
    dtype = dtype_of(name)
    rng = np.random.default_rng(17)
    layer = opt_layer(form, dtype, seed=5)
    make, _, _ = OPTIMIZERS[opt_name]
    opt = make(layer)
    expected = []
    for i, p in enumerate(layer.parameters()):
        states = states_of(opt, opt_name, i)
        for s, e in zip(states, initial_states(opt_name, p.weight)):
            assert s.dtype == dtype
            assert_same(s, e)
        expected.append((p.weight.copy(), [s.copy() for s in states]))
    for t, id_dtype in enumerate((np.int32, np.int64, np.int32), start=1):
        ids = rng.integers(0, 4, (2, 3)).astype(id_dtype)
        ids[0, 1] = 6
        layer(ids)
        g = stored(rng, (2, 3, 5), dtype)
        layer.backward(g)
        for i, (p, where) in enumerate(zip(layer.parameters(), (ids, positions_oracle(ids.shape, None)))):
            grad = grad_model(form, where, g, p.num_embeddings, dtype)
            assert_grad(p.grad, grad, form)
            expected[i] = model_step(opt_name, form, *expected[i], grad, t, dtype)
        opt.step()
        for i, p in enumerate(layer.parameters()):
            assert p.weight.dtype == dtype
            assert_same(p.weight, expected[i][0])
            for s, e in zip(states_of(opt, opt_name, i), expected[i][1]):
                assert_same(s, e)
        opt.zero_grad()


@pytest.mark.parametrize("name", NAMES)
def test_adagrad_weight_decay_rounds_as_the_dtype_does(name):
    # the rule on its own, one step on a dense gradient (step_model with the decayed gradient): float32 and
    # float64 in their own precision, the 16-bit types in float32 rounded once (torch's add(param, alpha=wd))
    dtype = dtype_of(name)
    rng = np.random.default_rng(18)
    layer = fe.Embedding.from_pretrained(stored(rng, (6, 33), dtype))
    layer.grad = stored(rng, (6, 33), dtype)
    w, g = layer.weight.copy(), layer.grad.copy()
    optim.Adagrad(layer, lr=LR, weight_decay=0.37, eps=EPS).step()
    expected, _ = step_model("adagrad", w, [np.zeros_like(w)], decay_model(g, w, 0.37, dtype), None, (LR, EPS),
                             dtype)
    assert_same(layer.weight, expected)
    assert_same(layer.grad, g)  # the decayed gradient is the optimizer's own, not written into grad


def set_grad(p, form, rng, dtype, ids=np.array([3, 0, 3])):
    D = p.weight.shape[1]
    values = stored(rng, (len(ids), D), dtype)
    if form == "dense":
        p.grad = stored(rng, p.weight.shape, dtype)
    elif form == "sparse":
        rows = np.unique(ids)
        p.grad = SparseGrad(rows, values[:len(rows)])
    else:
        p.grad = LookupGrad(ids, values)


def opt_snapshot(opt, params):
    arrays = {f"w{i}": p.weight for i, p in enumerate(params)}
    for key in ("state_sum", "exp_avg", "exp_avg_sq"):
        for i, s in enumerate(getattr(opt, key, [])):
            arrays[f"{key}{i}"] = s
    return Snapshot(**arrays), {k: list(getattr(opt, k)) for k in ("steps",) if hasattr(opt, k)}, getattr(opt, "t", 0)


@pytest.mark.parametrize("opt_name, form", OPT_FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_a_gradient_of_another_dtype_is_refused_before_any_parameter_moves(name, opt_name, form):
    dtype = dtype_of(name)
    rng = np.random.default_rng(19)
    for other in others(dtype):
        params = [fe.Embedding.from_pretrained(stored(rng, (5, 3), dtype)) for _ in range(2)]
        opt = OPTIMIZERS[opt_name][0](params)
        set_grad(params[0], form, rng, dtype)  # the first valid
        set_grad(params[1], form, rng, other)  # the second of another dtype
        snap, steps, t = opt_snapshot(opt, params)
        with pytest.raises(TypeError):
            opt.step()
        snap.assert_unchanged()
        assert {k: list(getattr(opt, k)) for k in steps} == steps and getattr(opt, "t", 0) == t
        set_grad(params[1], form, rng, dtype)
        opt.step()  # with both of the weight's dtype, it steps
        assert not np.array_equal(params[0].weight, snap.copies["w0"][0])


@pytest.mark.parametrize("name", NAMES)
def test_adam_steps_a_parameter_without_gradient_as_zeros_of_its_dtype(name):
    dtype = dtype_of(name)
    rng = np.random.default_rng(20)
    params = [fe.Embedding.from_pretrained(stored(rng, (4, 3), dtype)) for _ in range(2)]
    opt = optim.Adam(params, lr=LR, betas=BETAS, eps=EPS)
    expected = [(p.weight.copy(), [np.zeros_like(p.weight), np.zeros_like(p.weight)]) for p in params]
    for t in (1, 2):
        params[0].grad = stored(rng, (4, 3), dtype)
        params[1].grad = stored(rng, (4, 3), dtype) if t == 1 else None
        grads = [p.grad if p.grad is not None else np.zeros((4, 3), dtype) for p in params]
        opt.step()
        for i, p in enumerate(params):
            expected[i] = step_model("adam", *expected[i], grads[i], None, hyper("adam", t), dtype)
            assert_same(p.weight, expected[i][0])
            assert_same(opt.exp_avg[i], expected[i][1][0])
            assert_same(opt.exp_avg_sq[i], expected[i][1][1])


@pytest.mark.parametrize("opt_name, form", OPT_FORMS)
def test_one_optimizer_steps_tables_of_every_dtype_each_in_its_own(opt_name, form):
    """One optimizer over a table of each dtype: each state of its table's dtype, each step its dtype's."""
    rng = np.random.default_rng(22)
    params = [fe.Embedding.from_pretrained(stored(rng, (5, 6), dtype), sparse=form != "dense",
                                           coalesce=form != "lookup") for dtype in ALL]
    opt = OPTIMIZERS[opt_name][0](params)
    expected = [(p.weight.copy(), initial_states(opt_name, p.weight)) for p in params]
    for t in (1, 2):
        for i, p in enumerate(params):
            dtype = p.weight.dtype
            ids = rng.integers(0, 5, 7)
            g = stored(rng, (7, 6), dtype)
            p(ids)
            p.backward(g)
            expected[i] = model_step(opt_name, form, *expected[i], grad_model(form, ids, g, 5, dtype), t, dtype)
        opt.step()
        opt.zero_grad()
        for i, p in enumerate(params):
            assert_same(p.weight, expected[i][0])
            for s, e in zip(states_of(opt, opt_name, i), expected[i][1]):
                assert s.dtype == p.weight.dtype
                assert_same(s, e)


FUSED = {  # name: (the fused rule, the unfused optimizer, its state arrays by the fused state's keys)
    "sgd": (lambda: optim.FusedSGD(LR), lambda ps: optim.SGD(ps, lr=LR), ()),
    "adagrad": (lambda: optim.FusedAdagrad(lr=LR, lr_decay=DECAY, eps=EPS),
                lambda ps: optim.Adagrad(ps, lr=LR, lr_decay=DECAY, eps=EPS), (("sum", "state_sum"),)),
    "rowwise": (lambda: optim.FusedRowWiseAdagrad(lr=LR, eps=EPS), lambda ps: optim.RowWiseAdagrad(ps, lr=LR, eps=EPS),
                (("sum", "state_sum"),)),
    "sparse_adam": (lambda: optim.FusedSparseAdam(lr=LR, betas=BETAS, eps=EPS),
                    lambda ps: optim.SparseAdam(ps, lr=LR, betas=BETAS, eps=EPS),
                    (("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"))),
}


def step_both(unfused, opt, fused, ids, g):
    """One training step of the same lookup twice: the layer's backward then opt.step() and zero_grad(), and the
    fused layer's backward (its rule's update)."""
    unfused(ids)
    unfused.backward(g)
    opt.step()
    opt.zero_grad()
    fused(ids)
    fused.backward(g)


@pytest.mark.parametrize("coalesce", [True, False])
@pytest.mark.parametrize("rule", FUSED)
@pytest.mark.parametrize("name", NAMES)
def test_the_unfused_optimizer_equals_the_fused_rule_bit_for_bit(name, rule, coalesce):
    """Three steps of a TokenPositionEmbedding: sparse (SparseGrad or LookupGrad) then the optimizer, against
    the fused layer of the same dtype and seed. FusedSGD: one sequence of distinct ids per step (its doc)."""
    dtype = dtype_of(name)
    rng = np.random.default_rng(21)
    make_rule, make_opt, keys = FUSED[rule]
    unfused = fe.TokenPositionEmbedding(9, 5, 6, dtype=dtype, sparse=True, coalesce=coalesce, seed=7)
    fused = fe.TokenPositionEmbedding(9, 5, 6, dtype=dtype, fused=make_rule(), seed=7)
    opt = make_opt(unfused)
    for t in range(3):
        if rule == "sgd":
            ids = rng.permutation(9)[:5].astype(np.int32)
        else:
            ids = rng.integers(0, 4, (3, 5)).astype([np.int32, np.int64][t % 2])
        step_both(unfused, opt, fused, ids, stored(rng, ids.shape + (6,), dtype))
        for i, (a, b) in enumerate(zip(unfused.parameters(), fused.parameters())):
            assert_same(a.weight, b.weight)
            for state_key, opt_key in keys:
                assert b.state[state_key].dtype == dtype
                assert_same(getattr(opt, opt_key)[i], b.state[state_key])
    start = fe.TokenPositionEmbedding(9, 5, 6, dtype=dtype, seed=7)
    assert not np.array_equal(unfused.token.weight, start.token.weight)  # the steps moved something


# ---------------------------------------------------------------- 8. any shape: backward and a step

@pytest.mark.parametrize("name", NAMES)
@settings(FEW, max_examples=200)  # ~1 ms an example
@given(data=st.data())
def test_any_shape_backward_then_steps_match_the_models(name, data):
    dtype = dtype_of(name)
    opt_name, form = data.draw(st.sampled_from(OPT_FORMS))
    V, D, N = data.draw(st.integers(1, 6)), data.draw(st.integers(0, 20)), data.draw(st.integers(0, 30))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    pool = data.draw(st.sampled_from([V, 1, min(2, V)]))
    scale = data.draw(st.sampled_from([1.0, 1.0, 1e-3, 300.0]))  # 300: float16 overflows (inf, NaN)
    layer = fe.Embedding(V, D, dtype=dtype, sparse=form != "dense", coalesce=form != "lookup",
                         seed=data.draw(st.integers(0, 2**32 - 1)))
    opt = OPTIMIZERS[opt_name][0](layer)
    w, states = layer.weight.copy(), initial_states(opt_name, layer.weight)
    for t in (1, 2):
        ids = rng.integers(0, pool, N).astype(data.draw(st.sampled_from(ID_DTYPES)))
        g = stored(rng, (N, D), dtype, scale)
        layer(ids)
        layer.backward(g)
        grad = grad_model(form, ids, g, V, dtype)
        assert_grad(layer.grad, grad, form)
        opt.step()
        w, states = model_step(opt_name, form, w, states, grad, t, dtype)
        assert_same(layer.weight, w)
        for s, e in zip(states_of(opt, opt_name, 0), states):
            assert_same(s, e)
        opt.zero_grad()


@pytest.mark.parametrize("name", NAMES)
@settings(FEW, max_examples=100)
@given(data=st.data())
def test_any_shape_unfused_equals_fused(name, data):
    dtype = dtype_of(name)
    rule = data.draw(st.sampled_from(sorted(FUSED)))
    V, D, N = data.draw(st.integers(1, 6)), data.draw(st.integers(0, 20)), data.draw(st.integers(0, 30))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    seed = data.draw(st.integers(0, 2**32 - 1))
    make_rule, make_opt, keys = FUSED[rule]
    unfused = fe.Embedding(V, D, dtype=dtype, sparse=True, coalesce=data.draw(st.booleans()), seed=seed)
    fused = fe.Embedding(V, D, dtype=dtype, fused=make_rule(), seed=seed)
    opt = make_opt(unfused)
    for _ in range(2):
        if rule == "sgd":  # distinct ids (FusedSGD's doc)
            ids = rng.permutation(V)[:min(N, V)]
        else:
            ids = rng.integers(0, data.draw(st.sampled_from([V, 1, min(2, V)])), N)
        ids = ids.astype(data.draw(st.sampled_from(ID_DTYPES)))
        step_both(unfused, opt, fused, ids, stored(rng, (len(ids), D), dtype,
                                                   data.draw(st.sampled_from([1.0, 1e-3, 300.0]))))
        assert_same(unfused.weight, fused.weight)
        for state_key, opt_key in keys:
            assert_same(getattr(opt, opt_key)[0], fused.state[state_key])
