"""coalesce writes each distinct id's first row (as 0 + row) into uninitialised sums, and adds the later ones
(issue 9: no zeroing pass). Its result must stay the bits of a sum that starts from +0.0 and adds the rows
in ids order.

Oracle: `sequential_sums`, a loop over the ids in order that adds each row to its id's sum, the sums
starting as zeros of grad_out's dtype (float32 or float64): one rounding per add, as IEEE adds in numpy.
It shares nothing with the kernel (no first flags, no slots). Compared bitwise, so a -0.0 that should have
become +0.0, a NaN payload or a row written instead of added all show.

The sums are allocated uninitialised, so a bug that adds into them before any write would read whatever
the allocator returns: `dirty_heap` frees NaN-filled blocks of the sums' size just before each call, which
the allocator (numpy's small-block cache, glibc's bins) hands back, so such a bug gives NaN, not a lucky 0.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastembed as fe
from fastembed import _kernels
from _helpers import FAST, assert_bitwise, num_threads, serial_elements, two_thread_team

FLOATS = (np.float32, np.float64)
IDS = (np.int32, np.int64)
THREADED = settings(FAST, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def sequential_sums(ids, grad_out):
    """(sorted distinct ids, per id: zeros + first row + second row + ..., in ids order)."""
    flat = np.asarray(ids).reshape(-1).astype(np.int64)
    D = grad_out.shape[-1]
    g = np.asarray(grad_out).reshape(-1, D)
    rows = sorted(set(flat.tolist()))
    where = {r: k for k, r in enumerate(rows)}
    sums = np.zeros((len(rows), D), dtype=grad_out.dtype)
    with np.errstate(invalid="ignore"):  # inf + -inf
        for i, r in enumerate(flat.tolist()):
            sums[where[r]] = sums[where[r]] + g[i]
    return np.array(rows, dtype=np.int64), sums


def dirty_heap(shape, dtype):
    """Free a few NaN-filled blocks of this shape and dtype, for the next allocation of that size to reuse."""
    junk = [np.full(shape, np.nan, dtype=dtype) for _ in range(4)]
    del junk


def coalesce_dirty(ids, grad_out):
    U = len(np.unique(np.asarray(ids)))
    dirty_heap((U, grad_out.shape[-1]), grad_out.dtype)
    return fe.coalesce(ids, grad_out)


def check(ids, grad_out):
    rows, values = coalesce_dirty(ids, grad_out)
    e_rows, e_values = sequential_sums(ids, grad_out)
    assert_bitwise(rows, e_rows)
    assert_bitwise(values, e_values)
    return values


def spread(rng, N, D, dtype):
    """Rows of mixed magnitudes (1e-4..1e4): sums in another order, or missing a row, round differently."""
    g = rng.standard_normal((N, D)) * 10.0 ** rng.integers(-4, 5, size=(N, 1))
    return g.astype(dtype)


# ---------------------------------------------------------------- signed zeros, NaN, inf

@pytest.mark.parametrize("idt", IDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("D", [1, 7, 8, 33, 100, 768])
def test_negative_zero_rows_sum_to_positive_zero(dtype, idt, D):
    """A row of -0.0 met once, or several times, sums to +0.0 (0 + -0.0 is +0.0), as the zeroed sum made it;
    an id whose rows are -0.0 then x sums to x."""
    ids = np.array([5, 2, 5, 9, 5, 3, 3], dtype=idt)  # 2 and 9 once; 5 three times; 3 twice
    g = np.full((7, D), -0.0, dtype=dtype)
    g[6] = np.arange(1, D + 1, dtype=dtype) * -1.5  # id 3: -0.0 then a row of values
    values = check(ids, g)  # rows 2, 3, 5, 9
    assert not np.signbit(values[[0, 2, 3]]).any()  # ids 2 and 9 (once), 5 (three times): +0.0
    assert_bitwise(values[1], g[6])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("D", [1, 7, 33, 100])
def test_nan_and_inf_rows(dtype, D):
    """NaN (with a payload) and infinities go through 0 + x unchanged and propagate through later adds
    (inf + -inf is NaN) exactly as the zeroed sum's adds did."""
    rng = np.random.default_rng(D)
    ids = np.array([4, 1, 4, 0, 1, 4, 7], dtype=np.int64)
    g = spread(rng, 7, D, dtype)
    itype = np.uint32 if dtype == np.float32 else np.uint64
    payload = np.array([0x7FC01234 if dtype == np.float32 else 0x7FF8000000001234], dtype=itype).view(dtype)[0]
    g[0, 0] = payload  # id 4, its first row: NaN from the start
    g[1, :] = np.inf  # id 1: inf + finite
    g[4, -1] = -np.inf  # id 1: inf + -inf in the last column
    g[3, :] = -np.inf  # id 0: once, -inf
    g[6, 0] = np.nan  # id 7: once
    values = check(ids, g)
    assert np.isnan(values[2, 0]) and np.isneginf(values[0]).all()


# ---------------------------------------------------------------- widths, id types, sizes

@pytest.mark.parametrize("idt", IDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("D", [1, 7, 8, 33, 100, 768])
def test_duplicates_across_column_blocks(dtype, idt, D):
    rng = np.random.default_rng(D + 7)
    N = 60
    ids = rng.integers(0, 12, size=N).astype(idt)
    check(ids, spread(rng, N, D, dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("D", [0, 1, 5])
def test_empty_ids(dtype, D):
    for shape in [(0,), (3, 0)]:
        rows, values = fe.coalesce(np.zeros(shape, np.int64), np.zeros(shape + (D,), dtype))
        assert_bitwise(rows, np.zeros(0, np.int64))
        assert_bitwise(values, np.zeros((0, D), dtype))


@pytest.mark.parametrize("idt", IDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_many_more_ids_than_rows(dtype, idt):
    """N >> U: every id's first row is written once, then hundreds of adds; the ids spread out (a sorted
    path, no bitmap) or dense (the bitmap)."""
    rng = np.random.default_rng(11)
    N, D = 3000, 40
    g = spread(rng, N, D, dtype)
    for base in (0, 2**30):
        ids = (base + rng.integers(0, 9, size=N) * 1000).astype(idt)
        check(ids, g)
    check(np.full(N, 3, idt), g)  # one id


# ---------------------------------------------------------------- the threaded path

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("D", [1, 33, 100, 768])
def test_threaded_matches_one_thread(dtype, D):
    """Two threads (each owns column blocks and walks every id) give the one-thread bits."""
    rng = np.random.default_rng(D + 1)
    N = 400
    ids = rng.integers(0, 50, size=N).astype(np.int64)
    g = spread(rng, N, D, dtype)
    g[::17, ::3] = -0.0
    e_rows, e_values = sequential_sums(ids, g)
    with serial_elements(0):
        with num_threads(2):
            rows, values = coalesce_dirty(ids, g)
            assert _kernels._last_call_released_gil()
            blocks = -(-D * np.dtype(dtype).itemsize // 128)
            if blocks >= 2:  # otherwise one column block: one thread
                assert _kernels._last_call_threads() == two_thread_team()
        assert_bitwise(rows, e_rows)
        assert_bitwise(values, e_values)
        with num_threads(1):
            rows1, values1 = coalesce_dirty(ids, g)
            assert _kernels._last_call_threads() == 1
        assert_bitwise(values1, values)


@THREADED
@given(data=st.data())
def test_random_shapes(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    idt = data.draw(st.sampled_from(IDS), label="idt")
    D = data.draw(st.one_of(st.integers(1, 70), st.sampled_from([96, 128, 200])), label="D")
    shape = tuple(data.draw(st.lists(st.integers(0, 6), min_size=0, max_size=3), label="shape"))
    V = data.draw(st.integers(1, 30), label="V")
    pool = data.draw(st.sampled_from([V, 1, 2]), label="pool")
    base = data.draw(st.one_of(st.just(0), st.integers(0, 2**31 - 1 - V)), label="base")  # bitmap or sort
    ids = (rng.integers(0, min(pool, V), size=shape) + base).astype(idt)
    g = spread(rng, max(1, int(np.prod(shape))), D, dtype)[: int(np.prod(shape))].reshape(shape + (D,))
    g[rng.random(g.shape) < 0.1] = -0.0
    threads = data.draw(st.sampled_from([0, 2]), label="serial threshold 0 and 2 threads?")
    with serial_elements(0 if threads else 32768), num_threads(threads or 1):
        check(ids, g)
