"""max_norm's renorm (torch.embedding_renorm_) on float64, float16 and bfloat16 tables.

The spec is torch 2.13's CPU kernel (fastembed/_norm.pxi, top, says what it computes per dtype):
float64 in double, the p = 2 norm in torch's four-lane order; float16 and bfloat16 norms summed in
float32 and rounded to the dtype, the factor max_norm / (norm + 1e-7) rounded to the dtype and each
product formed in float32 and rounded once.

Two oracles, neither calling fastembed: numpy, the spec written out element by element (exact fused
multiply-adds through fractions), so that the stages without torch check the values too; and
torch.embedding_renorm_ on a copy, bitwise for p in 0, 1, 2, inf, -inf. For any other p torch's pow
is its own vectorised one, not libm's, so those compare within a few ulps on rows whose norm is not
within 2 % of max_norm (where a one-ulp difference of the norm could decide whether a row is scaled).
The p = 2 orders were read from torch's kernels as they run on this project's x86-64 CI machine
(AVX2 and AVX512 builds alike); a torch built for another instruction set may order the sum otherwise.

The threaded path (two threads against one, bitwise) is checked here for float32 too, with the others.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastembed import _kernels, ops
from _helpers import FEW, Snapshot, assert_bitwise, num_threads, serial_elements, two_thread_team

try:  # in the test extra; fastembed itself never imports it
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BF16 = None
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
NEW_DTYPES = (F64, F16) + ((BF16,) if BF16 is not None else ())
EXACT_P = [2.0, 1.0, math.inf, -math.inf, 0.0]  # torch's order is matched: bitwise
OTHER_P = [3.0, 0.5, -1.5]  # torch's pow differs from libm's: within ulps
f32 = np.float32


# ---------------------------------------------------------------- the numpy oracle

def _fma(a, b, c, dtype):
    """a * b + c rounded once to dtype (float64 or float32), exactly, through fractions."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    if dtype == F64:
        return float(exact)  # float(Fraction) rounds correctly
    guess = f32(float(exact))  # may be off by one ulp (double rounding): pick the nearest neighbour
    best = None
    for cand in (np.nextafter(guess, f32(-np.inf)), guess, np.nextafter(guess, f32(np.inf))):
        dist = abs(Fraction(float(cand)) - exact)
        even = (int(np.array(cand, f32).view(np.uint32)) & 1) == 0
        if best is None or dist < best[0] or (dist == best[0] and even):
            best = (dist, cand)
    return best[1]


def oracle_norm(row, dtype, p):
    """torch's norm of one row as a Python float (already rounded to the row's dtype)."""
    if dtype == F64:
        x = [float(v) for v in row]
        if p == 2.0:
            m = len(x) - len(x) % 4
            lanes = [0.0] * 4
            for d in range(0, m, 4):
                for lane in range(4):
                    lanes[lane] = lanes[lane] + x[d + lane] * x[d + lane]
            acc = ((lanes[0] + lanes[1]) + lanes[2]) + lanes[3]
            for d in range(m, len(x)):
                acc = _fma(x[d], x[d], acc, F64)
            return math.sqrt(acc)
        if p == 1.0:
            acc = 0.0
            for v in x:
                acc = acc + abs(v)
            return acc
        if p == 0.0:
            return float(sum(v != 0 for v in x))
        if abs(p) == math.inf:
            return max(abs(v) for v in x) if p > 0 else min(abs(v) for v in x)
        acc = np.float64(0.0)
        with np.errstate(divide="ignore"):  # C's pow: 0 to a negative power is inf (Python's raises)
            for v in x:
                acc = acc + np.float64(abs(v)) ** p
            return float(acc ** (1.0 / p))
    x = row.astype(f32)
    acc = f32(0)
    if p == 2.0:
        if dtype == BF16:  # eight float32 lanes over blocks of sixteen, then an fma tail
            m = len(x) - len(x) % 16
            lanes = np.zeros(8, f32)
            for d in range(0, m, 8):
                lanes = lanes + x[d:d + 8] * x[d:d + 8]
            acc = lanes[0]
            for lane in range(1, 8):
                acc = f32(acc + lanes[lane])
            for d in range(m, len(x)):
                acc = _fma(x[d], x[d], acc, F32)
        else:
            for v in x:
                acc = f32(acc + f32(v * v))
        norm = np.sqrt(acc)
    elif p == 1.0:
        for v in x:
            acc = f32(acc + abs(v))
        norm = acc
    elif p == 0.0:
        norm = f32(np.count_nonzero(x))
    elif abs(p) == math.inf:
        norm = np.abs(x).max() if p > 0 else np.abs(x).min()
    else:
        with np.errstate(divide="ignore"):
            for v in x:
                acc = f32(acc + f32(abs(v) ** f32(p)))
            norm = f32(acc ** (f32(1) / f32(p)))
    return float(np.array(norm, f32).astype(dtype).astype(np.float64))


def oracle_renorm(table, ids, max_norm, p):
    out = table.copy()
    for r in np.unique(np.asarray(ids).reshape(-1)):
        norm = oracle_norm(table[r], table.dtype, p)
        if norm > max_norm:
            scale = max_norm / (norm + 1e-7)
            if table.dtype == F64:
                out[r] = table[r] * scale
            else:
                s = np.array(f32(scale)).astype(table.dtype).astype(f32)
                out[r] = (table[r].astype(f32) * s).astype(table.dtype)
    return out


def random_table(rng, rows, dim, dtype, scale):
    table = (rng.standard_normal((rows, dim)) * scale).astype(dtype)
    table[rng.random((rows, dim)) < 0.1] = 0  # zeros: p = 0 counts them, -inf and negative p see them
    return table


dtypes = st.sampled_from(NEW_DTYPES)
tables = dict(rows=st.integers(1, 20), dim=st.integers(1, 40), n=st.integers(0, 50), pool=st.integers(1, 20),
              id_dtype=st.sampled_from([np.int32, np.int64]), ids_2d=st.booleans(),
              max_norm=st.floats(0.0, 6.0), scale=st.sampled_from([0.1, 1.0, 5.0]), seed=st.integers(0, 2**32 - 1))


def draw_case(dtype, rows, dim, n, pool, id_dtype, ids_2d, scale, seed):
    rng = np.random.default_rng(seed)
    table = random_table(rng, rows, dim, dtype, scale)
    ids = rng.integers(0, min(pool, rows), size=n).astype(id_dtype)  # a small pool: many duplicates
    if ids_2d and n % 2 == 0:
        ids = ids.reshape(2, n // 2)
    return table, ids


@given(dtype=dtypes, p=st.sampled_from(EXACT_P + OTHER_P), **tables)
@FEW
def test_renorm_against_the_numpy_oracle(dtype, p, rows, dim, n, pool, id_dtype, ids_2d, max_norm, scale, seed):
    table, ids = draw_case(dtype, rows, dim, n, pool, id_dtype, ids_2d, scale, seed)
    ours = table.copy()
    ops.renorm(ours, ids, max_norm, p)
    assert_bitwise(ours, oracle_renorm(table, ids, max_norm, p))
    untouched = np.setdiff1d(np.arange(rows), ids)
    assert_bitwise(ours[untouched], table[untouched])


def test_a_duplicate_id_scales_its_row_once():
    for dtype in NEW_DTYPES:
        table = np.array([[3, 4], [6, 8]], dtype)
        once = table.copy()
        ops.renorm(once, [1], 1.0)
        twice = table.copy()
        ops.renorm(twice, np.array([1, 1, 1], np.int32), 1.0)
        assert_bitwise(twice, once)
        assert not np.array_equal(once[1], table[1])  # it was scaled (norm 10 > 1)
        assert_bitwise(once[0], table[0])


def test_exact_values_per_dtype():
    """Rows whose answer can be worked out by hand: norm 5 and 10 scaled to 1, norm 0.5 kept."""
    for dtype in NEW_DTYPES:
        table = np.array([[3, 4], [0.3, 0.4], [6, 8]], dtype)
        before = table.copy()
        ops.renorm(table, np.array([], np.int64), 1.0)
        assert_bitwise(table, before)
        ops.renorm(table, [2, 0, 2, 1], 1.0)
        assert_bitwise(table[1], before[1])
        for r, norm in ((0, 5.0), (2, 10.0)):
            scale = 1.0 / (norm + 1e-7)
            if dtype == F64:
                assert_bitwise(table[r], before[r] * scale)
            else:  # the factor in the table's dtype: 0.2 and 0.1 are not exact there, the product rounds
                s = np.array(f32(scale)).astype(dtype).astype(f32)
                assert_bitwise(table[r], (before[r].astype(f32) * s).astype(dtype))


@pytest.mark.parametrize("dtype", NEW_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_many_rows_against_the_numpy_oracle(dtype, p):
    """One call over 1500 rows of every width from 1 to 50: the orders of the p = 2 sums (lanes,
    fused tail) differ from a plain column-order sum in some rows, and this many rows finds them."""
    rng = np.random.default_rng(11)
    for dim in range(1, 51):
        table = random_table(rng, 30, dim, dtype, 3.0)
        ours = table.copy()
        ops.renorm(ours, np.arange(30), 1.0, p)
        assert_bitwise(ours, oracle_renorm(table, np.arange(30), 1.0, p))


def test_float16_norms_accumulate_in_float32_not_wider():
    """Rows built so that a float32 sum and a wider one round to different float16 norms: each small
    term is at most half a float32 ulp of the running sum, so float32 keeps the first term (torch's
    answer) while a double sum reaches the next float16 value (65520 rounds to inf; 256 > 255.9)."""
    p1 = np.full((1, 8193), 2.0**-9, np.float16)
    p1[0, 0] = 65504  # 65504 + 8192 * 2**-9 = 65520 in double; each add a tie to even in float32
    p2 = np.full((1, 49137), 2.0**-5, np.float16)
    p2[0, 0] = 255.875  # 255.875**2 + 49136 * 2**-10 = 65520 = 255.97**2 in double
    for table, p, max_norm in ((p1, 1.0, 1e6), (p2, 2.0, 255.9)):
        assert oracle_norm(table[0], F16, p) < max_norm
        ours = table.copy()
        ops.renorm(ours, [0], max_norm, p)
        assert_bitwise(ours, table)  # below max_norm: not scaled
        try:
            import torch
        except ImportError:
            continue
        theirs = torch.from_numpy(table.copy())
        torch.embedding_renorm_(theirs, torch.tensor([0]), max_norm, p)
        assert_bitwise(theirs.numpy(), table)


# ---------------------------------------------------------------- torch as the oracle

def torch_dtype(torch, dtype):
    return {F64: torch.float64, F16: torch.float16}.get(dtype, torch.bfloat16)


def as_torch(torch, table):
    return torch.from_numpy(table.astype(np.float64)).to(torch_dtype(torch, table.dtype))


@given(dtype=dtypes, p=st.sampled_from(EXACT_P), **tables)
@FEW
def test_renorm_bitwise_against_torch(dtype, p, rows, dim, n, pool, id_dtype, ids_2d, max_norm, scale, seed):
    torch = pytest.importorskip("torch")
    table, ids = draw_case(dtype, rows, dim, n, pool, id_dtype, ids_2d, scale, seed)
    theirs = as_torch(torch, table)
    torch.embedding_renorm_(theirs, torch.from_numpy(ids), max_norm, p)
    ours = table.copy()
    ops.renorm(ours, ids, max_norm, p)
    assert_bitwise(ours.astype(np.float64), theirs.double().numpy())


@given(dtype=dtypes, p=st.sampled_from(OTHER_P), rows=st.integers(1, 20), dim=st.integers(1, 40),
       n=st.integers(0, 50), seed=st.integers(0, 2**32 - 1))
@FEW
def test_renorm_other_p_against_torch_within_ulps(dtype, p, rows, dim, n, seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    table = random_table(rng, rows, dim, dtype, 3.0)
    ids = rng.integers(0, rows, size=n)
    theirs = as_torch(torch, table)
    torch.embedding_renorm_(theirs, torch.from_numpy(ids), 1.5, p)
    ours = table.copy()
    ops.renorm(ours, ids, 1.5, p)
    with np.errstate(divide="ignore"):
        norms = (np.abs(table.astype(np.float64)) ** p).sum(1) ** (1 / p)
    clear = np.abs(norms - 1.5) > 0.02 * 1.5
    eps = {F64: 2.0**-52, F16: 2.0**-10}.get(dtype, 2.0**-7)  # the spacing at 1 (numpy's finfo knows no bfloat16)
    np.testing.assert_allclose(ours[clear].astype(np.float64), theirs.double().numpy()[clear], rtol=8 * eps, atol=0)


def test_bfloat16_bits_under_format_equal_the_ml_dtypes_table():
    """The torch adapter's way in: uint16 bits with _format="bfloat16" give the same bits."""
    if BF16 is None:
        pytest.skip("ml_dtypes (the test extra) is not installed")
    rng = np.random.default_rng(3)
    table = random_table(rng, 30, 37, BF16, 3.0)
    ids = rng.integers(0, 30, size=40)
    ours = table.copy()
    ops.renorm(ours, ids, 1.0)
    bits = table.view(np.uint16).copy()
    _kernels.renorm(bits, ids, 1.0, 2.0, _format="bfloat16")
    assert_bitwise(bits, ours.view(np.uint16))
    assert not np.array_equal(bits, table.view(np.uint16))


# ---------------------------------------------------------------- threads

# The one threads test of renorm, float32 included: each dtype runs its own specialisation of the threaded
# loop (_renorm in fastembed/_norm.pxi), which splits the distinct rows among the threads.
@pytest.mark.parametrize("dtype", (F32,) + NEW_DTYPES, ids=lambda d: d.name)
@given(rows=st.integers(1, 300), dim=st.integers(1, 70), n=st.integers(0, 400),
       p=st.sampled_from(EXACT_P + OTHER_P + [3.5]), seed=st.integers(0, 2**32 - 1))
@FEW
def test_two_threads_give_the_bits_of_one(dtype, rows, dim, n, p, seed):
    rng = np.random.default_rng(seed)
    table = random_table(rng, rows, dim, dtype, 3.0)
    ids = rng.integers(0, rows, size=n)
    one = table.copy()
    with num_threads(1):
        ops.renorm(one, ids, 1.0, p)
    many = table.copy()
    with serial_elements(0), num_threads(2):
        ops.renorm(many, ids, 1.0, p)
        assert _kernels._last_call_released_gil()
        assert _kernels._last_call_threads() == two_thread_team()
    assert_bitwise(many, one)


# ---------------------------------------------------------------- bad input: an error and nothing changed

@pytest.mark.parametrize("dtype", NEW_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("bad", [5, -1])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_an_id_out_of_range_changes_nothing(dtype, bad, id_dtype):
    table = (np.arange(15).reshape(5, 3) * 10).astype(dtype)
    ids = np.array([0, 3, bad, 4], id_dtype)
    snap = Snapshot(table=table, ids=ids)
    with pytest.raises(IndexError, match=rf"ids\[2\] = {bad} is out of range for table with 5 rows"):
        ops.renorm(table, ids, 1.0)
    snap.assert_unchanged()


@pytest.mark.parametrize("dtype", NEW_DTYPES, ids=lambda d: d.name)
def test_bad_tables_raise_and_change_nothing(dtype):
    table = (np.arange(12).reshape(4, 3) * 10).astype(dtype)
    snap = Snapshot(table=table)
    ro = table.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ops.renorm(ro, [1], 1.0)
    assert_bitwise(ro, table)
    wide = np.zeros((3, 8), dtype)
    wide[:, ::2] = table[:3, :1] + 100  # rows far above max_norm: any write would show
    before = wide.copy()
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.renorm(wide[:, ::2], [1], 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.renorm(table.T, [1], 1.0)
    assert_bitwise(wide, before)
    with pytest.raises(ValueError, match="2-D"):
        ops.renorm(table[0].copy(), [1], 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        ops.renorm(table, [1], -1.0)
    with pytest.raises(ValueError, match="norm_type"):
        ops.renorm(table, [1], 1.0, math.nan)
    snap.assert_unchanged()


def test_refused_dtypes_raise_and_change_nothing():
    for bad in (np.arange(12, dtype=np.int32).reshape(4, 3), np.ones((4, 3), np.uint16) * 20000,
                np.ones((4, 3), np.complex64) * 9, (np.ones((4, 3)) * 9).astype(">f8")):
        snap = Snapshot(table=bad)
        with pytest.raises(TypeError, match="table must be float32, float64, float16 or bfloat16"):
            ops.renorm(bad, [1], 1.0)
        snap.assert_unchanged()
    f16 = np.ones((4, 3), np.float16) * 9
    snap = Snapshot(table=f16)
    with pytest.raises(TypeError, match="uint16 holding bfloat16 bits"):
        _kernels.renorm(f16, np.array([1]), 1.0, 2.0, _format="bfloat16")
    with pytest.raises(ValueError, match="_format"):
        _kernels.renorm(f16, np.array([1]), 1.0, 2.0, _format="float16")
    snap.assert_unchanged()
