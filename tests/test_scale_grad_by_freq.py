"""scale_grad_by_freq: fastembed.scatter_add(..., scale_grad_by_freq=True) and the torch drop-in's option.

Oracles written here, independent of the kernels:
- an exact transcription of torch's embedding_dense_backward with the option: lookup i adds
  ``grad_out[i] * (1 / c)`` into row ids[i] (c: the count of ids[i] over all ids), in ids order. Every
  operation is done on fractions.Fraction and rounded once to nearest even by `round_to` (no float
  arithmetic, so no double rounding): float64 ``fma(1/c, g, w)``; float32 ``fmaf(f32(f64(1/c)), g, w)``;
  float16 and bfloat16 ``a16 = r16(f32(f64(1/c)))``, ``r16(f32(w + f32(a16 * g)))`` (torch's vectorised loop);
- torch itself (F.embedding(..., scale_grad_by_freq=True).backward), bitwise for float32 and float64, and
  for the 16-bit types in the columns torch's vectorised loop covers (its scalar tail rounds differently);
- for the drop-in, torch.nn.Embedding / F.embedding with the same arguments.
"""
import importlib.util
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastembed as fe
from fastembed import _kernels
from _helpers import (FAST, FEW, ID_DTYPES, Snapshot, assert_bitwise, num_threads, serial_elements,
                      two_thread_team)

MANY = settings(FAST, max_examples=200)  # the exact oracle is cheap at these sizes

# (precision in bits with the hidden one, smallest normal exponent, largest exponent)
FORMATS = {"float64": (53, -1022, 1023), "float32": (24, -126, 127), "float16": (11, -14, 15),
           "bfloat16": (8, -126, 127)}


def round_to(x, fmt):
    """The Fraction x rounded to nearest (ties to even) in format fmt, as a Python float (exact there)."""
    if x == 0:
        return 0.0
    p, emin, emax = FORMATS[fmt]
    sign, m = (-1 if x < 0 else 1), abs(x)
    e = m.numerator.bit_length() - m.denominator.bit_length()  # 2**(e - 1) < m < 2**(e + 1)
    if m < Fraction(2) ** e:
        e -= 1  # now 2**e <= m < 2**(e + 1)
    ulp = Fraction(2) ** (max(e, emin) - p + 1)
    q = m / ulp
    n = q.numerator // q.denominator
    rest = q - n
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and n % 2 == 1):
        n += 1
    r = n * ulp
    if r >= Fraction(2) ** (emax + 1):
        return sign * math.inf
    return sign * float(r)  # sign * 0.0 keeps the sign of an add that underflowed to zero


def fused(a, g, w, fmt):
    """a * g + w (a: a positive Fraction, g and w floats) exactly, rounded once; IEEE signs of zero."""
    x = a * Fraction(g) + Fraction(w)
    if x == 0:  # -0.0 only when both terms are -0.0
        return -0.0 if math.copysign(1.0, g) < 0 and math.copysign(1.0, w) < 0 else 0.0
    return round_to(x, fmt)


def alpha(c, fmt):
    """The factor each lookup of an id counted c times is scaled by: torch's double 1/c, cast as its add_ casts."""
    a = round_to(Fraction(1, c), "float64")
    if fmt != "float64":
        a = round_to(Fraction(a), "float32")
    if fmt in ("float16", "bfloat16"):
        a = round_to(Fraction(a), fmt)
    return Fraction(a)


def scaled_scatter(w, ids, g, fmt):
    """w (float64 values, (V, D)) after each lookup's scaled add, in ids order: a new array."""
    w = w.copy()
    flat = [int(r) for r in np.asarray(ids).ravel()]
    g = np.asarray(g, np.float64).reshape(len(flat), w.shape[1])
    counts = Counter(flat)
    for i, r in enumerate(flat):
        a = alpha(counts[r], fmt)
        for d in range(w.shape[1]):
            if fmt in ("float32", "float64"):
                w[r, d] = fused(a, g[i, d], w[r, d], fmt)
            else:  # a16 * g in float32 (exact there), + w in float32, then to the 16-bit type
                p = round_to(a * Fraction(g[i, d]), "float32") if g[i, d] != 0 else g[i, d]  # (a > 0)
                s = fused(Fraction(1), p, w[r, d], "float32")
                w[r, d] = round_to(Fraction(s), fmt) if s != 0 else s
    return w


# ---------------------------------------------------------------- the 16-bit formats as float64 values

def bf16_bits(values):
    """float64 values that are exact bfloat16 values -> their uint16 bits."""
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def bf16_values(bits):
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def storage(values, fmt):
    """float64 values (exact in fmt) -> the array the kernel takes (bfloat16: uint16 bits)."""
    return bf16_bits(values) if fmt == "bfloat16" else np.array(values, fmt)  # (a copy, float64 too)


def values_of(arr, fmt):
    return bf16_values(arr) if fmt == "bfloat16" else np.asarray(arr, np.float64)


def rounded(x, fmt):
    """float64 array -> values of fmt near it, as float64 (inputs: bfloat16 ones are truncated float32's)."""
    if fmt == "bfloat16":
        return bf16_values(bf16_bits(x))
    return np.asarray(x, fmt).astype(np.float64)


def scatter(table, ids, g, fmt):
    if fmt == "bfloat16":
        _kernels.scatter_add(table, ids, g, scale_grad_by_freq=True, _format="bfloat16")
    else:
        fe.scatter_add(table, ids, g, scale_grad_by_freq=True)


@st.composite
def problems(draw, fmts=tuple(FORMATS)):
    """(fmt, w, ids, g) as float64 values exact in fmt: V 1..12, D 0..70, ids of any shape, many repeats."""
    fmt = draw(st.sampled_from(fmts))
    V = draw(st.integers(1, 12))
    D = draw(st.one_of(st.integers(0, 70), st.sampled_from([1, 31, 32, 33, 64])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=2)))
    hot = draw(st.booleans())  # few distinct ids: counts up to 25
    ids = rng.integers(0, min(V, 2) if hot else V, size=shape).astype(draw(st.sampled_from(ID_DTYPES)))
    w = rounded(rng.standard_normal((V, D)) * draw(st.sampled_from([0.0, 1.0, 1e3])), fmt)
    g = rounded(rng.standard_normal(shape + (D,)) * 10.0 ** rng.integers(-3, 3), fmt)
    if g.size and draw(st.booleans()):  # signed zeros in the gradient
        g.reshape(-1)[rng.integers(0, g.size, size=3)] = rng.choice([0.0, -0.0], size=3)
    return fmt, w, ids, g


def strided(g, fmt):
    """The same values as a non-contiguous view (every other element of a wider array)."""
    wide = np.zeros(g.shape[:-1] + (2 * g.shape[-1] + 1,), storage(g, fmt).dtype)
    view = wide[..., 1::2]
    view[...] = storage(g, fmt)
    return view


# ================================================================ 1. scatter_add against the oracles

@MANY
@given(problem=problems(), threads=st.sampled_from([1, 2]), as_strided=st.booleans())
def test_scaled_scatter_is_the_exact_transcription(problem, threads, as_strided):
    fmt, w0, ids, g = problem
    expected = storage(scaled_scatter(w0, ids, g, fmt), fmt)
    grad_out = strided(g, fmt) if as_strided else storage(g, fmt)
    table = storage(w0, fmt)
    with serial_elements(0), num_threads(threads):
        scatter(table, ids, grad_out, fmt)
    assert_bitwise(table, expected)


@FEW
@given(problem=problems())
def test_scaled_scatter_is_bitwise_the_same_on_one_and_two_threads(problem):
    fmt, w0, ids, g = problem
    tables = []
    for threads in (1, 2):
        table = storage(w0, fmt)
        with serial_elements(0), num_threads(threads):
            scatter(table, ids, storage(g, fmt), fmt)
        tables.append(table)
    assert_bitwise(tables[1], tables[0])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_two_threads_at_a_wide_row_give_one_threads_bits(fmt):
    """A row of many 128-byte blocks split between two threads, 400 lookups of 5 rows: the same bits, the exact ones."""
    rng = np.random.default_rng(5)
    w0 = rounded(rng.standard_normal((7, 300)), fmt)
    ids = rng.integers(0, 5, 400)
    g = rounded(rng.standard_normal((400, 300)), fmt)
    tables = []
    for threads in (1, 2):
        table = storage(w0, fmt)
        with serial_elements(0), num_threads(threads):
            scatter(table, ids, storage(g, fmt), fmt)
            assert _kernels._last_call_threads() == (two_thread_team() if threads == 2 else 1)
        tables.append(table)
    assert_bitwise(tables[1], tables[0])
    rows = ids[:60]  # the oracle on a prefix of the lookups (its cost): the kernel on the same prefix
    table = storage(w0, fmt)
    with serial_elements(0), num_threads(2):
        scatter(table, rows, storage(g[:60], fmt), fmt)
    assert_bitwise(table, storage(scaled_scatter(w0, rows, g[:60], fmt), fmt))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_counts_that_are_not_powers_of_two(fmt):
    """Counts 3, 5, 6, 7, 11 (1/c inexact in every format, so each rounding of it shows), all columns."""
    rng = np.random.default_rng(23)
    ids = rng.permutation(np.repeat(np.arange(5), [3, 5, 6, 7, 11]))
    w0, g = rounded(rng.standard_normal((6, 70)), fmt), rounded(rng.standard_normal((ids.size, 70)), fmt)
    table = storage(w0, fmt)
    scatter(table, ids, storage(g, fmt), fmt)
    assert_bitwise(table, storage(scaled_scatter(w0, ids, g, fmt), fmt))


def test_scaled_scatter_by_hand():
    """Three lookups of row 1, one of row 0: row 1 gets each third, row 0 its whole row; 0-d ids count 1."""
    table = np.zeros((3, 2), np.float64)
    fe.scatter_add(table, np.array([1, 0, 1, 1]), np.array([[3.0, 6.0], [1.0, 2.0], [3.0, 0.0], [3.0, 3.0]]),
                   scale_grad_by_freq=True)
    assert table.tolist() == [[1.0, 2.0], [3.0, 3.0], [0.0, 0.0]]
    table = np.ones((2, 3), np.float32)
    fe.scatter_add(table, np.int64(1), np.full(3, 5.0, np.float32), scale_grad_by_freq=True)
    assert table.tolist() == [[1.0] * 3, [6.0] * 3]
    empty = np.ones((2, 3), np.float32)
    fe.scatter_add(empty, np.zeros((0, 4), np.int32), np.zeros((0, 4, 3), np.float32), scale_grad_by_freq=True)
    assert empty.tolist() == [[1.0] * 3] * 2


def test_id_lists_and_numpy_bfloat16_tables():
    """ops' id conversion (a list, uint16 ids) and an ml_dtypes bfloat16 table: the same bits as the arrays/bits."""
    rng = np.random.default_rng(11)
    ids = [2, 0, 2, 2, 1, 0]
    for fmt in FORMATS:
        w0, g = rounded(rng.standard_normal((3, 40)), fmt), rounded(rng.standard_normal((6, 40)), fmt)
        expected = storage(scaled_scatter(w0, ids, g, fmt), fmt)
        for form in (ids, np.array(ids, np.uint16), np.array(ids, np.int32)):
            table = storage(w0, fmt)
            if fmt == "bfloat16":
                ml_dtypes = pytest.importorskip("ml_dtypes")
                table = table.view(ml_dtypes.bfloat16)
                fe.scatter_add(table, form, storage(g, fmt).view(ml_dtypes.bfloat16), scale_grad_by_freq=True)
                table = table.view(np.uint16)
            else:
                fe.scatter_add(table, form, storage(g, fmt), scale_grad_by_freq=True)
            assert_bitwise(table, expected)


def test_the_float32_add_rounds_once():
    """fmaf, not a rounded product then a rounded sum: 1/3 * g + w where the two differ."""
    a = np.float32(1.0 / 3.0)
    g, w = np.float32(1.0 + 2.0 ** -23), np.float32(-1.0 / 3.0)
    once = np.float32(round_to(Fraction(float(a)) * Fraction(float(g)) + Fraction(float(w)), "float32"))
    twice = np.float32(np.float32(a * g) + w)
    assert once != twice  # the case tells the two apart
    table = np.array([[w]], np.float32)
    fe.scatter_add(table, np.array([0, 0, 0]), np.array([[g], [0.0], [0.0]], np.float32), scale_grad_by_freq=True)
    assert table[0, 0] == once


def test_round_to_model():
    """The oracle's rounding against numpy's (one correctly rounded conversion of an exact float64)."""
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):  # 65520.0 is float16's inf
        check_round_to(rng)
    assert round_to(Fraction(1, 3), "bfloat16") == 0.333984375
    assert round_to(Fraction(1) + Fraction(1, 256), "bfloat16") == 1.0  # a tie, to even
    assert round_to(Fraction(1) + Fraction(3, 256), "bfloat16") == 1.015625


def check_round_to(rng):
    for x in np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-8, 5, 500),
                             [1.0 + 2.0 ** -24, 1.0 + 3 * 2.0 ** -24, 2.0 ** -149 * 1.5, 2.0 ** -25, 65520.0]]):
        assert round_to(Fraction(float(x)), "float32") == float(np.float32(x))
        assert round_to(Fraction(float(x)), "float16") == float(np.float16(x))


# ================================================================ 1b. scatter_add against torch itself

torch_mark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")


def torch_backward(ids, g, fmt, V):
    import torch
    dtype = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16}[fmt]
    weight = torch.zeros(V, g.shape[-1], dtype=dtype, requires_grad=True)
    out = torch.nn.functional.embedding(torch.from_numpy(np.asarray(ids).astype(np.int64)), weight,
                                        scale_grad_by_freq=True)
    out.backward(torch.from_numpy(g).to(dtype))
    return weight.grad.to(torch.float64).numpy()


def torch_vector_columns():
    """Columns of a row that torch's vectorised add covers (2 vectors of 16-bit elements per step)."""
    import torch
    return 64 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 32


@torch_mark
@FAST
@given(problem=problems(), threads=st.sampled_from([1, 2]))
def test_scaled_scatter_is_torchs_embedding_backward(problem, threads):
    fmt, w0, ids, g = problem
    V, D = w0.shape
    theirs = torch_backward(ids, g, fmt, V)
    table = storage(np.zeros((V, D)), fmt)
    with serial_elements(0), num_threads(threads):
        scatter(table, ids, storage(g, fmt), fmt)
    ours = values_of(table, fmt)
    if fmt in ("float16", "bfloat16"):  # torch's scalar tail columns round the product first
        cols = D // torch_vector_columns() * torch_vector_columns()
        ours, theirs = ours[:, :cols], theirs[:, :cols]
    assert_bitwise(ours, theirs)


# ================================================================ 2. bad input changes nothing

@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", ["id V", "id -1", "id 2**62", "grad_out shape", "grad_out rows", "grad_out dtype"])
def test_bad_input_changes_nothing(fmt, case):
    rng = np.random.default_rng(3)
    V, D = 4, 33
    table = storage(rounded(rng.standard_normal((V, D)), fmt), fmt)
    ids = np.array([0, 2, 2, 1, 3])
    g = storage(rounded(rng.standard_normal((5, D)), fmt), fmt)
    error = IndexError
    if case.startswith("id "):
        ids[3] = {"id V": V, "id -1": -1, "id 2**62": 2**62}[case]
    elif case == "grad_out shape":
        g, error = g[:, :-1].copy(), ValueError
    elif case == "grad_out rows":
        g, error = g[:-1].copy(), ValueError
    else:
        g, error = g.astype(np.float32 if fmt == "float64" else np.float64), TypeError
    snapshot = Snapshot(table=table, ids=ids, g=g)
    for threads in (1, 2):
        with serial_elements(0), num_threads(threads), pytest.raises(error):
            scatter(table, ids, g, fmt)
        snapshot.assert_unchanged()


# ================================================================ 3. the torch drop-in

def _torch():
    return pytest.importorskip("torch"), pytest.importorskip("fastembed.torch")


def on_kernels(out):
    """Whether a lookup's output came from fastembed's autograd function (the kernel path)."""
    return out.grad_fn is not None and "_EmbeddingFunction" in type(out.grad_fn).__name__


def same(a, b):
    torch, _ = _torch()
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype == torch.bfloat16:
        a, b = a.view(torch.int16), b.view(torch.int16)
    assert_bitwise(a.detach().numpy(), b.detach().numpy())


IDS = [[3, 1, 3, 8], [0, 3, 7, 1]]  # 3 three times, 1 twice
DTYPES = ["float32", "float64", "float16", "bfloat16"]


def make_pair(dtype, **kwargs):
    """(torch.nn.Embedding, fastembed.torch.Embedding) with the same weight and arguments."""
    torch, ft = _torch()
    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(7)
    weight = (torch.randn(9, 37, generator=gen, dtype=torch.float64) * 2).to(dtype)
    theirs = torch.nn.Embedding(9, 37, dtype=dtype, **kwargs)
    ours = ft.Embedding(9, 37, dtype=dtype, **kwargs)
    with torch.no_grad():
        theirs.weight.copy_(weight)
        ours.weight.copy_(weight)
    return theirs, ours


def upstream(out, seed=0):
    torch, _ = _torch()
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx", [None, 0, 3, -1])
@pytest.mark.parametrize("max_norm", [None, 1.5])
@pytest.mark.parametrize("sparse", [False, True])
def test_module_is_torchs(dtype, padding_idx, max_norm, sparse):
    """Forward, renormed weight and gradient bitwise torch's (float32's renorm within its tolerance); float32
    and float64 dense lookups on the kernels, the rest torch's own."""
    torch, _ = _torch()
    pair = make_pair(dtype, padding_idx=padding_idx, max_norm=max_norm, scale_grad_by_freq=True, sparse=sparse)
    ids = torch.tensor(IDS)
    outs = [module(ids) for module in pair]
    assert on_kernels(outs[1]) == (dtype in ("float32", "float64") and not sparse)
    assert not on_kernels(outs[0])
    if max_norm is not None and dtype == "float32":  # fastembed's float32 renorm: ulps from torch's (its docs)
        torch.testing.assert_close(outs[1], outs[0], rtol=1.3e-6, atol=1e-5)
        torch.testing.assert_close(pair[1].weight, pair[0].weight, rtol=1.3e-6, atol=1e-5)
    else:
        same(outs[1], outs[0])
        same(pair[1].weight, pair[0].weight)
    for out in outs:  # the gradient does not depend on the weight: bitwise whatever the renorm

        if sparse:  # torch refuses at backward: so does the drop-in (torch's own lookup)
            with pytest.raises(RuntimeError, match="scale_grad_by_freq not supported with sparse"):
                out.backward(upstream(out))
        else:
            out.backward(upstream(out))
    if not sparse:
        same(pair[1].weight.grad, pair[0].weight.grad)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_kernels_scale(dtype):
    """The kernel path's gradient is the scaled one (not the plain sum torch gives without the option)."""
    torch, ft = _torch()
    plain, scaled = (ft.Embedding(9, 37, dtype=getattr(torch, dtype), scale_grad_by_freq=s) for s in (False, True))
    with torch.no_grad():
        scaled.weight.copy_(plain.weight)
    ids = torch.tensor(IDS)
    for module in (plain, scaled):
        out = module(ids)
        assert on_kernels(out)
        out.backward(torch.ones_like(out))
    assert torch.equal(scaled.weight.grad[3], plain.weight.grad[3] / 3)
    assert torch.equal(scaled.weight.grad[8], plain.weight.grad[8])
    assert torch.equal(scaled.weight.grad[1], plain.weight.grad[1] / 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx", [None, 0, -1])
def test_functional_is_torchs(dtype, padding_idx):
    torch, ft = _torch()
    import fastembed.torch.functional as ftf
    ids = torch.tensor(IDS, dtype=torch.int32)
    outs, grads = [], []
    weight0 = make_pair(dtype)[0].weight.detach()
    for fn in (torch.nn.functional.embedding, ftf.embedding):
        weight = weight0.clone().requires_grad_()
        out = fn(ids, weight, padding_idx=padding_idx, scale_grad_by_freq=True)
        out.backward(upstream(out, 1))
        outs.append(out)
        grads.append(weight.grad)
    assert on_kernels(outs[1]) == (dtype in ("float32", "float64"))
    same(outs[1], outs[0])
    same(grads[1], grads[0])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("padding_idx", [None, 0, -1])
def test_gradient_accumulates_as_torchs(dtype, padding_idx):
    """Two backwards into the same weight.grad (the second with other ids)."""
    torch, _ = _torch()
    pair = make_pair(dtype, padding_idx=padding_idx, scale_grad_by_freq=True)
    for step, ids in enumerate([torch.tensor(IDS), torch.tensor([8, 8, 0, 2, 8])]):
        for module in pair:
            out = module(ids)
            out.backward(upstream(out, step))
    assert on_kernels(pair[1](torch.tensor([1])))
    same(pair[1].weight.grad, pair[0].weight.grad)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("padding_idx", [None, 0, -1])
def test_double_backward_is_torchs(dtype, padding_idx):
    """backward(create_graph=True): the gradient's own gradients (w.r.t. the upstream gradient, and through
    a loss on the weight) equal torch's."""
    torch, _ = _torch()
    pair = make_pair(dtype, padding_idx=padding_idx, scale_grad_by_freq=True)
    ids = torch.tensor(IDS)
    results = []
    for module in pair:
        out = module(ids)
        g = upstream(out, 2).requires_grad_()
        (gw,) = torch.autograd.grad(out, module.weight, g, create_graph=True)
        h = upstream(gw, 3)
        (gg,) = torch.autograd.grad((gw * h).sum(), g)
        loss = (module(ids) ** 3).sum()  # second derivative through the lookup again
        (gw2,) = torch.autograd.grad(loss, module.weight, create_graph=True)
        (hess,) = torch.autograd.grad((gw2 ** 2).sum(), module.weight)
        results.append((out, gw, gg, gw2, hess))
    assert on_kernels(results[1][0])
    for ours, theirs in zip(results[1], results[0]):
        same(ours, theirs)


# ================================================================ 1c. many ids, and ids spread over a large table
# (the counts come from a bitmap pass when the ids are dense in their range, from a sort when they are not)

@torch_mark
@pytest.mark.parametrize("fmt", ["float32", "float64"])
@pytest.mark.parametrize("V, N, D, spread", [(50, 70000, 3, False), (1_000_000, 3000, 2, True),
                                             (1_000_000, 3000, 2, False)])
def test_many_ids_are_torchs(fmt, V, N, D, spread):
    rng = np.random.default_rng(N + V)
    ids = rng.integers(0, V if spread else 37, size=(N // 2, 2)).astype(np.int32)
    ids[0, 0] = V - 1
    g = rounded(rng.standard_normal((N // 2, 2, D)), fmt)
    theirs = torch_backward(ids, g, fmt, V)
    for threads in (1, 2):
        table = storage(np.zeros((V, D)), fmt)
        with num_threads(threads):
            scatter(table, ids, storage(g, fmt), fmt)
        assert_bitwise(values_of(table, fmt), theirs)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_few_ids_spread_over_a_large_table(fmt):
    rng = np.random.default_rng(17)
    V, D = 1_000_000, 3
    ids = rng.integers(0, V, size=20)
    ids[[3, 9, 15]] = ids[0]
    ids[[4, 5]] = V - 1
    w0 = np.zeros((V, D))
    w0[ids] = rounded(rng.standard_normal((20, D)), fmt)
    g = rounded(rng.standard_normal((20, D)), fmt)
    table = storage(w0, fmt)
    scatter(table, ids, storage(g, fmt), fmt)
    expected = scaled_scatter(w0, ids, g, fmt)
    assert_bitwise(table, storage(expected, fmt))
