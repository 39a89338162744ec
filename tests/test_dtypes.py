"""The lookup and scatter kernels on float64, float16 and bfloat16 tables (and float32 beside them).

The spec (DESIGN of issue 10, item 1): float64 is computed in float64; float16 and bfloat16 are
stored as 16 bits and summed in float32, rounded to nearest even. gather is a copy of the bits;
gather_add rounds each token + position once; scatter_add and gather_add_backward round after each
add into the gradient (what torch's embedding_dense_backward does for half tables on CPU); coalesce
sums a row's duplicates in float32 in ids order and rounds once. Every element array of a call has
the table's dtype: a mismatch is a TypeError naming both, with nothing changed.

Oracles, all independent of the kernels: numpy in float64 (or float32 where the spec sums in float32),
rounded with numpy's float16 conversion or with the bfloat16 model below (exact distances in
float64); np.add.at; the per-add model written out; and torch where it is installed. The oracle
comparisons are bitwise: one rounding of an exact (or exactly float32) value has one right answer,
which is also within the tolerance torch's tests use for the dtype (torch.testing's table:
float16 rtol 1e-3, bfloat16 1.6e-2); the torch comparisons use torch.testing.assert_close, whose
defaults are that table.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastembed as fe
from fastembed import _kernels, ops
from _helpers import FEW, Snapshot, at_phase, num_threads, serial_elements, two_thread_team

try:  # in the test extra; fastembed itself never imports it
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # the cases that need a numpy bfloat16 dtype are skipped, the others run
    BF16 = None
needs_ml_dtypes = pytest.mark.skipif(BF16 is None, reason="ml_dtypes (the test extra) is not installed")
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = (F32, F64, F16) + ((BF16,) if BF16 is not None else ())
HALVES = tuple(d for d in (F16, BF16) if d is not None)


def is_bf16(dtype):
    return BF16 is not None and dtype == BF16
ID_DTYPES = (np.int32, np.int64)
DTYPE_IDS = [d.name for d in DTYPES]


# ---------------------------------------------------------------- rounding models (no fastembed code)

def bf16_bits(x):
    """float32 values -> bfloat16 bits, round to nearest even, from the distances to the two candidates
    (exact in float64). NaN inputs give some NaN; compare them with isnan."""
    x = np.asarray(x, np.float32)
    shape = x.shape
    x = x.reshape(-1)  # (numpy 1.x types a 0-d array's `lo << 16` by value, as int64: no float32 view of it)
    lo = (x.view(np.uint32) >> 16).astype(np.uint32)  # the candidate towards zero: truncation
    hi = lo + 1  # the next one away from zero
    with np.errstate(invalid="ignore"):  # NaN candidates (next to inf) never win the comparison below
        lo_val = (lo << 16).view(np.float32).astype(np.float64)
        hi_val = ((hi << 16) & 0xFFFFFFFF).astype(np.uint32).view(np.float32).astype(np.float64)
        # rounding up past the largest finite bfloat16 gives inf: the candidate's value is 2**128
        hi_val = np.where((hi & 0x7FFF) == 0x7F80, np.copysign(2.0**128, x.astype(np.float64)), hi_val)
        xd = x.astype(np.float64)
        d_lo, d_hi = np.abs(xd - lo_val), np.abs(hi_val - xd)
        up = (d_hi < d_lo) | ((d_hi == d_lo) & ((lo & 1) == 1))
    return np.where(up, hi, lo).astype(np.uint16).reshape(shape)


def widen(a):
    """A 16-bit (or float32/64) array as float32 (exact for the 16-bit types)."""
    a = np.asarray(a)
    if is_bf16(a.dtype):  # (1-d for the shift: see bf16_bits)
        return (a.reshape(-1).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(a.shape)
    return a.astype(np.float32)


def narrow(x, dtype):
    """Float values rounded once to dtype (float32 inputs for the 16-bit types)."""
    x = np.asarray(x)
    with np.errstate(over="ignore", invalid="ignore"):
        if is_bf16(dtype):
            return bf16_bits(x.astype(np.float32)).view(BF16)
        return x.astype(dtype)


def assert_same(actual, expected):
    """Same dtype, shape and bits, except that any NaN matches any NaN (F16C quiets a signalling
    NaN where numpy keeps it)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    bits = np.dtype(f"u{actual.dtype.itemsize}")
    a, e = np.ascontiguousarray(actual).view(bits), np.ascontiguousarray(expected).view(bits)
    nan_a, nan_e = np.isnan(widen(actual)), np.isnan(widen(expected))
    bad = (a != e) & ~(nan_a & nan_e)
    assert not bad.any(), (
        f"{int(bad.sum())} elements differ, first at {np.argwhere(bad)[0].tolist()}: "
        f"{actual[tuple(np.argwhere(bad)[0])]!r} vs {expected[tuple(np.argwhere(bad)[0])]!r}")


def assert_bits(actual, expected):
    """The same bits, NaN payloads included. Checked with numpy and explained by the first difference:
    an `assert a.tobytes() == b.tobytes()` on the megabytes of an exhaustive test would have pytest diff
    the two byte strings, which with CI set in the environment takes minutes (a timeout, not a failure)."""
    actual, expected = np.ascontiguousarray(actual), np.ascontiguousarray(expected)
    assert actual.shape == expected.shape and actual.dtype.itemsize == expected.dtype.itemsize, (
        f"{actual.dtype}{actual.shape} vs {expected.dtype}{expected.shape}")
    bits = np.dtype(f"u{actual.dtype.itemsize}")
    bad = actual.view(bits) != expected.view(bits)
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        raise AssertionError(f"{int(bad.sum())} of {bad.size} elements differ, first at {list(i)}: bits "
                             f"{int(actual.view(bits)[i]):#x} vs {int(expected.view(bits)[i]):#x}")


# ---------------------------------------------------------------- data

def values(rng, shape, dtype, scale=1.0, specials=False):
    """Normal values times scale (large scales overflow float16 sums), rounded to dtype; sometimes
    with infinities and NaNs."""
    x = rng.standard_normal(shape) * scale
    if specials and x.size:
        where = rng.random(shape) < 0.05
        x[where] = rng.choice([np.inf, -np.inf, np.nan, 0.0, -0.0], size=int(where.sum()))
    return narrow(x.astype(np.float32), dtype) if dtype in HALVES else x.astype(dtype)


@st.composite
def cases(draw, dtype):
    """(rng, V, D, ids): ids of a random shape with duplicates, int32 or int64."""
    V = draw(st.integers(1, 6))
    D = draw(st.sampled_from([1, 3, 8, 17, 40]))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = rng.integers(0, V, size=shape).astype(draw(st.sampled_from(ID_DTYPES)))
    scale = draw(st.sampled_from([1.0, 1.0, 1e3, 3e4]))
    specials = draw(st.integers(0, 4)) == 0
    return rng, V, D, ids, scale, specials


def positions_of(ids):
    """The positions gather_add uses by default: arange(T) along the last axis."""
    if ids.ndim == 0:
        return np.zeros((), np.int64)
    return np.broadcast_to(np.arange(ids.shape[-1]), ids.shape)


# ---------------------------------------------------------------- the models of the five kernels

def gather_add_model(tok, pos, ids, p):
    exact = tok.astype(np.float64)[ids] + pos.astype(np.float64)[p]  # exact for every dtype here
    if tok.dtype == F64:
        return tok[ids] + pos[p]
    if is_bf16(tok.dtype):
        return narrow(exact.astype(np.float32), BF16)  # exact sum of two bfloat16s fits float32, or no tie
    return narrow(exact, tok.dtype)


def scatter_model(grad, ids, src):
    """grad[ids] += src in ids order; the 16-bit types rounded after each add (each add in float32)."""
    D = grad.shape[1]
    flat, rows = ids.reshape(-1), src.reshape(-1, D)
    if grad.dtype in (F32, F64):
        g = grad.copy()
        np.add.at(g, flat, rows)
        return g
    g = widen(grad)
    for i, r in enumerate(flat):
        g[r] = widen(narrow(g[r] + widen(rows[i]), grad.dtype))
    return narrow(g, grad.dtype)


def coalesce_model(ids, src):
    """(rows, sums): the 16-bit types summed in float32 in ids order, rounded once."""
    D = src.shape[-1]
    rows, inverse = np.unique(ids.reshape(-1), return_inverse=True)
    acc = F32 if src.dtype in HALVES else src.dtype
    sums = np.zeros((len(rows), D), acc)
    np.add.at(sums, inverse.reshape(-1), widen(src).reshape(-1, D) if src.dtype in HALVES else src.reshape(-1, D))
    return rows.astype(np.int64), (narrow(sums, src.dtype) if src.dtype in HALVES else sums)


# ---------------------------------------------------------------- the kernels against the models

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@FEW
@given(data=st.data())
def test_gather_copies_bits(dtype, data):
    rng, V, D, ids, scale, specials = data.draw(cases(dtype))
    table = values(rng, (V, D), dtype, scale, specials)
    snap = Snapshot(table=table, ids=ids)
    out = fe.gather(table, ids)
    snap.assert_unchanged()
    assert out.dtype == dtype
    assert out.shape == ids.shape + (D,)
    assert_bits(out, table[ids])  # NaN payloads too
    given_out = np.full(ids.shape + (D,), 7, dtype)
    assert fe.gather(table, ids, out=given_out) is given_out
    assert_bits(given_out, table[ids])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@FEW
@given(data=st.data())
def test_gather_add_rounds_once(dtype, data):
    rng, V, D, ids, scale, specials = data.draw(cases(dtype))
    tok = values(rng, (V, D), dtype, scale, specials)
    T = ids.shape[-1] if ids.ndim else 1
    pos = values(rng, (max(T, 1) + 1, D), dtype, scale, specials)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = gather_add_model(tok, pos, ids, positions_of(ids))
    assert_same(fe.gather_add(tok, pos, ids), expected)
    p = rng.integers(0, pos.shape[0], size=ids.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = gather_add_model(tok, pos, ids, p)
    out = np.zeros(ids.shape + (D,), dtype)
    assert fe.gather_add(tok, pos, ids, positions=p, out=out) is out
    assert_same(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@FEW
@given(data=st.data())
def test_scatter_add_rounds_each_add(dtype, data):
    rng, V, D, ids, scale, specials = data.draw(cases(dtype))
    grad = values(rng, (V, D), dtype, scale, specials)
    src = values(rng, ids.shape + (D,), dtype, scale, specials)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = scatter_model(grad, ids, src)
    fe.scatter_add(grad, ids, src)
    assert_same(grad, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@FEW
@given(data=st.data())
def test_gather_add_backward_rounds_each_add(dtype, data):
    rng, V, D, ids, scale, specials = data.draw(cases(dtype))
    T = ids.shape[-1] if ids.ndim else 1
    tgrad = values(rng, (V, D), dtype, scale, specials)
    pgrad = values(rng, (T + 2, D), dtype, scale, specials)
    src = values(rng, ids.shape + (D,), dtype, scale, specials)
    start = int(rng.integers(0, 3))
    with np.errstate(over="ignore", invalid="ignore"):
        t_expected = scatter_model(tgrad, ids, src)
        p_expected = scatter_model(pgrad, positions_of(ids) + start, src)
    fe.gather_add_backward(src, ids, tgrad, pgrad, positions=start)
    assert_same(tgrad, t_expected)
    assert_same(pgrad, p_expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@FEW
@given(data=st.data())
def test_coalesce_sums_in_float32_and_rounds_once(dtype, data):
    rng, V, D, ids, scale, specials = data.draw(cases(dtype))
    src = values(rng, ids.shape + (D,), dtype, scale, specials)
    with np.errstate(over="ignore", invalid="ignore"):
        rows_e, sums_e = coalesce_model(ids, src)
    rows, sums = fe.coalesce(ids, src)
    assert rows.dtype == np.int64 and rows.tolist() == rows_e.tolist()
    assert_same(sums, sums_e)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@FEW
@given(data=st.data())
def test_sums_against_float64(dtype, data):
    """On values whose float32 sums are exact (multiples of 1/8 up to 8), every kernel's result is the
    float64 result rounded once to the dtype: the coalesce and gather_add rule, and scatter_add's
    too where each element receives one add (unique ids)."""
    rng, V, D, ids, _, _ = data.draw(cases(dtype))
    grid = lambda shape: (rng.integers(-64, 65, size=shape) / 8).astype(dtype)  # noqa: E731
    src = grid(ids.shape + (D,))
    rows, inverse = np.unique(ids.reshape(-1), return_inverse=True)
    exact = np.zeros((len(rows), D))
    np.add.at(exact, inverse.reshape(-1), src.reshape(-1, D).astype(np.float64))
    assert_same(fe.coalesce(ids, src)[1], narrow(exact, dtype))
    unique = rng.permutation(V)[:min(V, 4)].astype(ids.dtype)
    grad, g = grid((V, D)), grid(unique.shape + (D,))
    expected = grad.astype(np.float64)
    expected[unique] += g.astype(np.float64)
    fe.scatter_add(grad, unique, g)
    assert_same(grad, narrow(expected, dtype))


# ---------------------------------------------------------------- boundaries and errors

KERNEL_CALLS = {
    "gather": lambda a, ids: fe.gather(a["tok"], ids, out=a["out"]),
    "gather_add": lambda a, ids: fe.gather_add(a["tok"], a["pos"], ids, out=a["out"]),
    "scatter_add": lambda a, ids: fe.scatter_add(a["tgrad"], ids, a["src"]),
    "gather_add_backward": lambda a, ids: fe.gather_add_backward(a["src"], ids, a["tgrad"], a["pgrad"]),
}


def arrays(dtype, shape=(2, 3), V=4, D=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"tok": values(rng, (V, D), dtype), "pos": values(rng, (shape[-1] + 1, D), dtype),
            "out": values(rng, shape + (D,), dtype), "tgrad": values(rng, (V, D), dtype),
            "pgrad": values(rng, (shape[-1] + 1, D), dtype), "src": values(rng, shape + (D,), dtype)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("bad", [4, -1])  # id == rows, and -1: the first ids out of range
@pytest.mark.parametrize("kernel", sorted(KERNEL_CALLS))
def test_out_of_range_id_changes_nothing(kernel, bad, id_dtype, dtype):
    a = arrays(dtype)
    ids = np.array([[0, 1, 2], [3, 0, bad]], id_dtype)
    snap = Snapshot(ids=ids, **a)
    with pytest.raises(IndexError, match=rf"ids\[1, 2\] = {bad} is out of range"):
        KERNEL_CALLS[kernel](a, ids)
    snap.assert_unchanged()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_boundary_ids_and_empty_ids(dtype, id_dtype):
    a = arrays(dtype)
    edge = np.array([[0, 3, 3]], id_dtype)  # the first and the last row (rows - 1), repeated
    assert_bits(fe.gather(a["tok"], edge), a["tok"][edge])
    with pytest.raises(IndexError, match="= -1 is negative"):
        fe.coalesce(np.array([0, -1], id_dtype), a["src"][0, :2])
    empty = np.zeros((0, 3), id_dtype)
    assert fe.gather(a["tok"], empty).shape == (0, 3, 5) and fe.gather(a["tok"], empty).dtype == dtype
    assert fe.gather_add(a["tok"], a["pos"], empty).dtype == dtype
    before = a["tgrad"].copy()
    fe.scatter_add(a["tgrad"], empty, np.zeros((0, 3, 5), dtype))
    fe.gather_add_backward(np.zeros((0, 3, 5), dtype), empty, a["tgrad"], a["pgrad"])
    assert_bits(a["tgrad"], before)
    rows, sums = fe.coalesce(empty, np.zeros((0, 3, 5), dtype))
    assert rows.shape == (0,) and sums.shape == (0, 5) and sums.dtype == dtype


MISMATCHES = [(t, o) for t in DTYPES for o in DTYPES if t != o]


@pytest.mark.parametrize("table_dtype,other", MISMATCHES, ids=[f"{t.name}-{o.name}" for t, o in MISMATCHES])
@pytest.mark.parametrize("role", ["pos", "out", "src", "pgrad", "tgrad"])
def test_mismatched_dtypes_raise_naming_both(table_dtype, other, role):
    a = arrays(table_dtype)
    a[role] = arrays(other)[role]
    ids = np.array([[0, 1, 2], [3, 0, 1]])
    snap = Snapshot(ids=ids, **a)
    calls = {"pos": ["gather_add"], "out": ["gather", "gather_add"], "src": ["scatter_add", "gather_add_backward"],
             "pgrad": ["gather_add_backward"], "tgrad": ["scatter_add"]}[role]
    for kernel in calls:
        with pytest.raises(TypeError) as info:
            KERNEL_CALLS[kernel](a, ids)
        assert table_dtype.name in str(info.value) and other.name in str(info.value), str(info.value)
    snap.assert_unchanged()


def test_refused_dtypes_list_the_accepted_ones():
    ids = np.array([0, 1])
    for bad in (np.arange(8, dtype=np.int32).reshape(2, 4), np.zeros((2, 4), ">f8"), np.zeros((2, 4), np.uint16),
                np.zeros((2, 4), np.complex64)):
        snap = Snapshot(bad=bad)
        for call in (lambda: fe.gather(bad, ids), lambda: fe.scatter_add(bad, ids, bad.copy()),
                     lambda: fe.coalesce(ids, bad), lambda: fe.gather_add(bad, bad.copy(), ids),
                     lambda: fe.gather_add_backward(bad.copy(), ids, bad, bad.copy())):
            with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16") as info:
                call()
            assert str(bad.dtype) in str(info.value)
        snap.assert_unchanged()
    with pytest.raises(TypeError, match="uint16 array is never read as bfloat16"):
        fe.gather(np.zeros((2, 4), np.uint16), ids)


def test_optimizer_kernels_refuse_a_gradient_of_another_dtype():
    # the optimizers take the four dtypes (tests/test_optim_dtypes.py), the gradient in the weight's: never cast
    w, g = np.zeros((3, 2)), np.ones((2, 2), np.float32)
    snap = Snapshot(w=w, g=g)
    with pytest.raises(TypeError, match=r"grad_out.dtype=float32 does not match weight.dtype=float64"):
        _kernels.sgd_scatter(w, np.array([0, 1]), g, 0.1)
    with pytest.raises(TypeError, match=r"grad.dtype=float32 does not match weight.dtype=float64"):
        _kernels.sgd_step(w, g, np.array([0, 1]), 0.1)
    with pytest.raises(TypeError, match="uint16 array is never read as bfloat16"):
        _kernels.sgd_step(w.astype(np.uint16), g.astype(np.uint16), np.array([0, 1]), 0.1)
    snap.assert_unchanged()


# ---------------------------------------------------------------- bfloat16 as uint16 bits (the private path)

@needs_ml_dtypes
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_bfloat16_bits_path_matches_ml_dtypes(id_dtype):
    a = arrays(BF16, V=6, D=9, seed=3)
    ids = np.array([[0, 5, 5], [2, 0, 5]], id_dtype)
    b = {k: v.view(np.uint16).copy() for k, v in a.items()}
    got = _kernels.gather(b["tok"], ids, _format="bfloat16")
    assert got.dtype == np.uint16
    assert_bits(got, fe.gather(a["tok"], ids))
    got = _kernels.gather_add(b["tok"], b["pos"], ids, _format="bfloat16")
    assert got.dtype == np.uint16
    assert_bits(got, fe.gather_add(a["tok"], a["pos"], ids))
    _kernels.scatter_add(b["tgrad"], ids, b["src"], _format="bfloat16")
    fe.scatter_add(a["tgrad"], ids, a["src"])
    assert_bits(b["tgrad"], a["tgrad"])
    tg, pg = a["tgrad"].copy(), a["pgrad"].copy()
    tgb, pgb = tg.view(np.uint16).copy(), pg.view(np.uint16).copy()
    fe.gather_add_backward(a["src"], ids, tg, pg)
    _kernels.gather_add_backward(b["src"], ids, tgb, pgb, _format="bfloat16")
    assert_bits(tgb, tg)
    assert_bits(pgb, pg)
    rows, sums = _kernels.coalesce(ids, b["src"], _format="bfloat16")
    rows_e, sums_e = fe.coalesce(ids, a["src"])
    assert rows.tolist() == rows_e.tolist() and sums.dtype == np.uint16
    assert_bits(sums, sums_e)


def test_bfloat16_bits_path_takes_uint16_only():
    ids = np.array([0, 1])
    bits = np.zeros((2, 4), np.uint16)
    snap = Snapshot(bits=bits)
    with pytest.raises(TypeError, match=r"uint16 holding bfloat16 bits.*float32"):
        _kernels.gather(np.zeros((2, 4), np.float32), ids, _format="bfloat16")
    with pytest.raises(TypeError, match=r"out.dtype=float32 does not match table.dtype=uint16"):
        _kernels.gather(bits, ids, np.zeros((2, 4), np.float32), _format="bfloat16")
    with pytest.raises(ValueError, match="_format must be None or 'bfloat16'"):
        _kernels.scatter_add(bits, ids, bits.copy(), _format="float16")
    snap.assert_unchanged()


# ---------------------------------------------------------------- threads and the float16 code paths

def all_kernels(dtype, D, phase, seed):
    """Every kernel's result on one random case with a gradient at the given phase (in elements)."""
    rng = np.random.default_rng(seed)
    V, shape = 7, (6, 9)
    ids = rng.integers(0, V, size=shape)
    tok, pos, src = values(rng, (V, D), dtype), values(rng, (10, D), dtype), values(rng, shape + (D,), dtype)
    tgrad, pgrad = at_phase((V, D), phase, dtype), at_phase((10, D), phase, dtype)
    tgrad[...], pgrad[...] = values(rng, (V, D), dtype), values(rng, (10, D), dtype)
    g = tgrad.copy()
    fe.scatter_add(g, ids, src)
    fe.gather_add_backward(src, ids, tgrad, pgrad, positions=1)
    # the optimizers (SGD on a 16-bit table: torch's add_ rule, F16C or portable; Adam and Adagrad in
    # registers, F16C / AVX2 or portable; row-wise Adagrad staged in float32), dense and sparse
    sgd, adagrad, state, adam, m, v = tok.copy(), tok.copy(), np.abs(tok), tok.copy(), tok.copy(), np.abs(tok)
    _kernels.sgd_scatter(sgd, ids, src, 0.3, fma=True)
    _kernels.sgd_step(sgd, tok[:3], np.array([0, 2, 5]), 0.7)
    _kernels.adagrad_scatter(adagrad, state, ids, src, 0.2, 1e-3)
    _kernels.adagrad_step(adagrad, state, tok, None, 0.3, 1e-4)
    _kernels.adam_step(adam, m, v, tok, None, 0.1, 0.8, 0.9, 1e-3, 0.2, 0.1)
    _kernels.adam_scatter(adam, m, v, ids, src, 0.1, 0.8, 0.9, 1e-3, 0.36, 0.19)
    rowwise, row_state = tok.copy(), np.abs(tok[:, 0]).copy()
    _kernels.rowwise_adagrad_scatter(rowwise, row_state, ids, src, 0.2, 1e-3)
    # infinities and NaNs in and out (0/0, inf - inf: x86 makes a NaN with the sign bit set; a 16-bit NaN is
    # stored as the quiet NaN of the type, bfloat16 0x7fc0, on every path), and float16 overflow
    wild, wild_m, wild_v = values(rng, (V, D), dtype, specials=True), np.abs(tok), np.abs(tok)
    wild_g = values(rng, (V, D), dtype, scale=300.0, specials=True)
    _kernels.adam_step(wild, wild_m, wild_v, wild_g, None, 0.1, 0.8, 0.9, 0.0, 0.2, 0.1)
    wild_a, wild_s = values(rng, (V, D), dtype, specials=True), np.abs(tok)
    _kernels.adagrad_step(wild_a, wild_s, wild_g, None, 0.3, 0.0)
    return [fe.gather(tok, ids), fe.gather_add(tok, pos, ids), g, tgrad, pgrad, *fe.coalesce(ids, src),
            sgd, adagrad, state, adam, m, v, rowwise, row_state, wild, wild_m, wild_v, wild_a, wild_s]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", [1, 37, 130, 300])
def test_threaded_path_equals_one_thread(dtype, D):
    for phase in (0, 3):
        with serial_elements(0), num_threads(1):
            one = all_kernels(dtype, D, phase, seed=D)
        with serial_elements(0), num_threads(2):
            two = all_kernels(dtype, D, phase, seed=D)
            assert _kernels._last_call_released_gil()
            if D >= 130:  # coalesce's sums span more than one 128-byte block: two threads split them
                assert _kernels._last_call_threads() == two_thread_team()
        for a, b in zip(one, two):
            assert a.dtype == b.dtype
            assert_bits(a, b)


def hardware_modes():
    had = _kernels._f16_hardware()
    modes = [False] + ([True] if _kernels._f16_hardware(True) else [])
    _kernels._f16_hardware(had)
    return modes


@pytest.fixture(params=hardware_modes(), ids=lambda on: "f16c" if on else "portable")
def f16_path(request):
    had = _kernels._f16_hardware()
    assert _kernels._f16_hardware(request.param) == request.param
    yield request.param
    _kernels._f16_hardware(had)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("D", [5, 45])
def test_half_kernels_same_on_both_code_paths(dtype, D):
    """float16's F16C conversions and bfloat16's AVX2 rows (Adam, Adagrad) against the portable code, the
    same switch turning both off; D 5 and 45: a row shorter than the eight lanes, and one with a tail."""
    if len(hardware_modes()) < 2:
        pytest.skip("no F16C on this CPU: only the portable code runs")
    had = _kernels._f16_hardware()
    try:
        _kernels._f16_hardware(False)
        assert _kernels._bf16_hardware() == 0  # every hardware path off: the portable rows really run
        portable = all_kernels(dtype, D, 1, seed=9)
        _kernels._f16_hardware(True)
        levels = bf16_levels() if is_bf16(dtype) else [None]
        for level in levels:  # bfloat16: each of its lanes the CPU has (AVX2, AVX512_BF16)
            if level is not None:
                assert _kernels._bf16_hardware(level) == level
            for a, b in zip(all_kernels(dtype, D, 1, seed=9), portable):
                assert_bits(a, b)
    finally:
        _kernels._f16_hardware(had)


def bf16_levels():
    """The bfloat16 lane levels this CPU has beyond the portable loops (1 AVX2, 2 AVX512_BF16)."""
    had = _kernels._bf16_hardware()
    top = _kernels._bf16_hardware(2)
    _kernels._bf16_hardware(had)
    return list(range(1, top + 1))


@needs_ml_dtypes
@pytest.mark.parametrize("D", [3, 8, 16, 45])
def test_bfloat16_lanes_round_subnormals_and_nans_as_the_portable_loops(D):
    """AVX512_BF16's vcvtneps2bf16 reads a subnormal float32 as zero and keeps a NaN's sign and payload: a row
    with such sums must still give the portable bits (subnormal bfloat16 results kept, every NaN 0x7fc0), on each
    lane level (AVX512_BF16: blocks of sixteen lanes, then eight), in the adds of gather_add and scatter_add and in
    SGD."""
    if not bf16_levels():
        pytest.skip("no AVX2 on this CPU: only the portable bfloat16 loops run")
    tiny = np.float32(2.0**-130)  # subnormal in float32 and in bfloat16
    nan = np.array([0x7FC00001, 0xFFC00000, 0x7F800001, 0xFF812345], np.uint32).view(np.float32)  # payloads, signs
    rows = np.tile(np.concatenate([[tiny, -tiny, 3 * tiny, 1.0], nan]).astype(np.float32), 6)[None, :D]
    other = np.tile(np.array([tiny, tiny, -tiny, 2.0**-140, 1.0, np.inf, -np.inf, 1.0], np.float32), 6)[None, :D]
    rng = np.random.default_rng(D)  # columns shuffled: no two blocks of eight lanes hold the same values
    rows, other = rows[:, rng.permutation(D)], other[:, rng.permutation(D)]
    tok, pos = narrow(rows, BF16), narrow(other, BF16)
    ids = np.zeros((1, 1), np.int64)

    def run():
        g = pos.copy()
        fe.scatter_add(g, ids, tok.reshape(1, 1, D))
        w = tok.copy()
        _kernels.sgd_scatter(w, ids.reshape(-1), pos, 0.5)
        return [fe.gather_add(tok, pos, ids), g, w]

    had = _kernels._f16_hardware()
    try:
        _kernels._f16_hardware(False)
        portable = run()
        _kernels._f16_hardware(True)
        for level in bf16_levels():
            _kernels._bf16_hardware(level)
            for a, b in zip(run(), portable):
                assert_bits(a, b)
    finally:
        _kernels._f16_hardware(had)
    bits = portable[0].view(np.uint16)
    assert np.any(((bits & 0x7FFF) > 0) & ((bits & 0x7FFF) < 0x0080))  # the case really holds subnormal results
    assert D <= 4 or np.any(bits == 0x7FC0)  # ... and NaNs, from D = 5 on


# ---------------------------------------------------------------- the conversions, exhaustively

ALL_BITS = np.arange(2**16, dtype=np.uint32).astype(np.uint16)


def float32_probes(bits, dtype):
    """Every value of the 16-bit type, the midpoints between neighbours (the ties) and the float32s
    on either side of each midpoint, as float32."""
    v = widen(bits.view(dtype))
    finite = np.sort(np.unique(v[np.isfinite(v)]))
    mids = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)  # exact in float32
    near = np.concatenate([np.nextafter(mids, np.float32(-np.inf)), np.nextafter(mids, np.float32(np.inf))])
    beyond = np.array([65504, 65519.996, 65520, 65536, 3.4e38, 2.0**-25, 2.0**-26, 1e-40, -1e-45,
                       np.inf, -np.inf, np.nan, -np.nan], np.float32)
    nan_bits = np.array([0x7FC00000, 0x7F800001, 0xFFC00001, 0x7FBFFFFF], np.uint32).view(np.float32)
    return np.concatenate([v, mids, -mids, near, -near, beyond, nan_bits])


def test_float16_widen_every_bit_pattern(f16_path):
    got = _kernels._widen(ALL_BITS, "float16")
    assert_same(got, ALL_BITS.view(np.float16).astype(np.float32))


def test_float16_narrow_every_value_and_tie(f16_path):
    x = float32_probes(ALL_BITS, F16)
    got = _kernels._narrow(x, "float16").view(np.float16)
    with np.errstate(over="ignore"):
        assert_same(got, x.astype(np.float16))  # numpy: round to nearest even, subnormals, inf at 65520


def test_bfloat16_widen_every_bit_pattern():
    got = _kernels._widen(ALL_BITS, "bfloat16")
    assert_bits(got, ALL_BITS.astype(np.uint32) << 16)


@needs_ml_dtypes
def test_bfloat16_narrow_every_value_tie_and_random_float32():
    rng = np.random.default_rng(0)
    x = np.concatenate([float32_probes(ALL_BITS, BF16),
                        rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    got = _kernels._narrow(x, "bfloat16")
    nan = np.isnan(x)
    assert np.isnan(widen(got[nan].view(BF16))).all(), "a NaN must stay a NaN"
    assert_bits(got[~nan], bf16_bits(x[~nan]))
    with np.errstate(over="ignore"):
        assert_bits(got[~nan], x[~nan].astype(BF16))  # ml_dtypes agrees with the model


def test_bfloat16_model_rounds_to_nearest_even():
    # the oracle itself, on hand-picked values: ties go to the even neighbour, never truncate
    one = np.float32(1.0)
    ulp = np.float32(2.0**-7)
    cases = {one + ulp / 2: 0x3F80, one + 3 * ulp / 2: 0x3F82, one + ulp / 2 + np.float32(2.0**-20): 0x3F81,
             np.float32(3.4028235e38): 0x7F80, np.float32(-0.0): 0x8000}
    for x, bits in cases.items():
        assert int(bf16_bits(np.array([x], np.float32))[0]) == bits, (x, hex(bits))


# ---------------------------------------------------------------- torch

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_against_torch(dtype, id_dtype):
    torch = pytest.importorskip("torch")
    tdtype = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
              "bfloat16": torch.bfloat16}[dtype.name]
    rng = np.random.default_rng(5)
    V, P, D, shape = 9, 6, 33, (5, 6)
    ids = rng.integers(0, V, size=shape).astype(id_dtype)
    tok, pos, g = values(rng, (V, D), dtype), values(rng, (P, D), dtype), values(rng, shape + (D,), dtype)

    def t(a):  # a torch tensor with a's bits
        if is_bf16(a.dtype):
            return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(a.copy())

    def n(x):  # back to numpy with the same bits
        x = x.detach()
        return x.view(torch.uint16).numpy().view(BF16) if x.dtype == torch.bfloat16 else x.numpy()

    tid = torch.from_numpy(ids.astype(np.int64))
    p = torch.arange(shape[-1]).expand(shape)
    F = torch.nn.functional
    # lookups: torch's forward
    assert_bits(fe.gather(tok, ids), n(F.embedding(tid, t(tok))))
    torch.testing.assert_close(t(fe.gather_add(tok, pos, ids)), F.embedding(tid, t(tok)) + F.embedding(p, t(pos)),
                               rtol=None, atol=None)
    # backward from zeros: torch's dense backward rounds after each add for the half types, as we do
    tw = t(tok).requires_grad_()
    pw = t(pos).requires_grad_()
    (F.embedding(tid, tw) + F.embedding(p, pw)).backward(t(g))
    tgrad, pgrad = np.zeros((V, D), dtype), np.zeros((P, D), dtype)
    fe.gather_add_backward(g, ids, tgrad, pgrad)
    assert_bits(tgrad, n(tw.grad))
    assert_bits(pgrad, n(pw.grad))
    grad = np.zeros((V, D), dtype)
    fe.scatter_add(grad, ids, g)
    dense = torch.ops.aten.embedding_dense_backward(t(g), tid, V, -1, False)
    assert_bits(grad, n(dense))
    # coalesce sums in float32 and rounds once: torch's tolerance against torch's float64 sums
    rows, sums = fe.coalesce(ids, g)
    exact = torch.zeros(V, D, dtype=torch.float64).index_add_(0, tid.reshape(-1), t(g).double().reshape(-1, D))
    torch.testing.assert_close(t(sums), exact[torch.from_numpy(rows)].to(tdtype), rtol=None, atol=None)


def test_torch_bfloat16_tensor_through_uint16_view():
    """The adapter's way in without ml_dtypes: a bfloat16 tensor's memory viewed as uint16."""
    torch = pytest.importorskip("torch")
    w = torch.randn(8, 16).to(torch.bfloat16)
    ids = torch.tensor([[1, 7, 7], [0, 3, 1]])
    out = _kernels.gather_add(w.view(torch.uint16).numpy(), w[:3].contiguous().view(torch.uint16).numpy(),
                              ops.as_ids(ids.numpy()), None, None, _format="bfloat16")
    expected = torch.nn.functional.embedding(ids, w) + w[:3]
    assert torch.equal(torch.from_numpy(out).view(torch.bfloat16), expected)
