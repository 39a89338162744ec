"""adagrad_scatter, rowwise_adagrad_scatter and adam_scatter: coalesce and update in one pass.

Their contract is a composition of existing kernels, bit for bit and for every thread count:
``rows, values = coalesce(ids, grad_out); keep = rows != skip_row`` then ``adagrad_step`` /
``rowwise_adagrad_step`` / ``adam_step`` on ``values[keep], rows[keep]``.

Oracles:
- `composed`: that composition itself (the unfused kernels, already tested against their own oracles);
- `transcription`: no fastembed code at all. Each row's gradient is summed in ids order into zeros
  (+0.0 + the first lookup's row, then the others: so a lone -0.0 becomes +0.0), then the update is
  written in numpy float32 in the C loops' order of operations (fe_adagrad_row, fe_adam_row, and the
  row-wise branch: fe_sum_squares in column order, / D, then fe_scaled_row). Compared bitwise: the build
  passes -ffp-contract=off (setup.py), so no clone contracts a*b + c into an FMA, and numpy's float32
  +, -, *, / and sqrt are correctly rounded as the C ones are.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastembed import _kernels
from _helpers import (FAST, ID_DTYPES, Snapshot, arrange, assert_bitwise, num_threads, serial_elements,
                      two_thread_team)

f32 = np.float32
KINDS = ("adagrad", "rowwise", "adam")
MANY = settings(FAST, max_examples=150)  # cheap examples (~10 ms): more of them for the rarer shapes
WIDTHS = (0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 70)


# ---------------------------------------------------------------- the three ways to compute a step

def make_states(kind, rng, V, D, neg_zero=0.0):
    """The optimizer state of a (V, D) table: Adagrad's sum of squares (V, D), row-wise's (V,), Adam's m, v."""
    if kind == "adagrad":
        return [with_zeros(rng, np.abs(rng.standard_normal((V, D))).astype(f32), neg_zero)]
    if kind == "rowwise":
        return [with_zeros(rng, np.abs(rng.standard_normal(V)).astype(f32), neg_zero)]
    m = with_zeros(rng, (rng.standard_normal((V, D)) * 0.1).astype(f32), neg_zero)
    v = with_zeros(rng, (np.abs(rng.standard_normal((V, D))) * 0.01).astype(f32), neg_zero)
    return [m, v]


def with_zeros(rng, a, fraction):
    """a with about `fraction` of its elements set to -0.0 (and as many to +0.0)."""
    a = a.copy()
    u = rng.random(a.shape)
    a[u < fraction] = f32(-0.0)
    a[(u >= fraction) & (u < 2 * fraction)] = f32(0.0)
    return a


def hyper(kind, lr, eps, betas=(0.9, 0.999), t=1):
    """The scalar arguments after (weight, states, ids, grad_out), as the kernels take them."""
    if kind == "adam":
        b1, b2 = betas
        return (lr, b1, b2, eps, 1 - b1**t, 1 - b2**t)
    return (lr, eps)


def fused(kind, w, states, ids, g, hp, skip=-1, check_only=False):
    kernel = {"adagrad": _kernels.adagrad_scatter, "rowwise": _kernels.rowwise_adagrad_scatter,
              "adam": _kernels.adam_scatter}[kind]
    kernel(w, *states, ids, g, *hp, skip_row=skip, check_only=check_only)


def composed(kind, w, states, ids, g, hp, skip=-1):
    """The contract: coalesce, drop skip_row, then the *_step kernel (in place)."""
    rows, values = _kernels.coalesce(ids, g)
    keep = rows != skip
    step = {"adagrad": _kernels.adagrad_step, "rowwise": _kernels.rowwise_adagrad_step,
            "adam": _kernels.adam_step}[kind]
    step(w, *states, values[keep], rows[keep], *hp)


def row_sums(ids, g, D):
    """{row: its lookups' rows summed in ids order, starting from +0.0} (a plain loop, no sort, no slots)."""
    flat = np.asarray(ids).reshape(-1).astype(np.int64).tolist()
    g = np.asarray(g, f32).reshape(len(flat), D)
    sums = {}
    with np.errstate(all="ignore"):
        for i, r in enumerate(flat):
            sums[r] = sums.get(r, np.zeros(D, f32)) + g[i]
    return sums


def transcription(kind, w, states, ids, g, hp, skip=-1):
    """New (w, *states) after one step, in numpy float32 only."""
    w = w.copy()
    states = [s.copy() for s in states]
    D = w.shape[1]
    with np.errstate(all="ignore"):
        for r, gr in sorted(row_sums(ids, g, D).items()):
            if r == skip:
                continue
            if kind == "adagrad":
                clr, eps = f32(hp[0]), f32(hp[1])
                s = states[0]
                s[r] = s[r] + gr * gr
                w[r] = w[r] - (clr * gr) / (np.sqrt(s[r]) + eps)
            elif kind == "rowwise":
                if D == 0:
                    continue
                lr, eps = f32(hp[0]), f32(hp[1])
                sq = f32(0.0)
                for x in gr:  # column order, one rounding per product and per add
                    sq = f32(sq + f32(x * x))
                G = f32(states[0][r] + f32(sq / f32(D)))
                states[0][r] = G
                std = f32(np.sqrt(G) + eps)
                w[r] = w[r] - (lr * gr) / std
            else:
                lr, b1, b2, eps = (f32(x) for x in hp[:4])
                inv1, inv2 = f32(1.0 / hp[4]), f32(1.0 / hp[5])
                m, v = states
                md = b1 * m[r] + (f32(1) - b1) * gr
                vd = b2 * v[r] + (f32(1) - b2) * (gr * gr)
                m[r], v[r] = md, vd
                w[r] = w[r] - (lr * (md * inv1)) / (np.sqrt(vd * inv2) + eps)
    return [w] + states


def run_fused(kind, w, states, ids, g, hp, skip, threads):
    """New (w, *states) from the fused kernel on copies: threads 1 (the serial path) or 2 (forced
    threaded from the first element)."""
    w, states = w.copy(), [s.copy() for s in states]
    if threads == 1:
        with num_threads(1):
            fused(kind, w, states, ids, g, hp, skip)
    else:
        with serial_elements(0), num_threads(2):
            fused(kind, w, states, ids, g, hp, skip)
            assert _kernels._last_call_released_gil()
    return [w] + states


def run_composed(kind, w, states, ids, g, hp, skip=-1):
    w, states = w.copy(), [s.copy() for s in states]
    composed(kind, w, states, ids, g, hp, skip)
    return [w] + states


def assert_all_bitwise(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert_bitwise(a, b)


# ---------------------------------------------------------------- hypothesis: against the composition

@st.composite
def problems(draw):
    """(kind, w, states, ids, g, hp, skip): tables of 1-40 rows and 0-70 columns, ids of any shape
    (0-d, empty, long 1-D) with heavy repeats, -0.0 in the gradient, weights and states."""
    kind = draw(st.sampled_from(KINDS))
    V = draw(st.integers(1, 40))
    D = draw(st.one_of(st.sampled_from(WIDTHS), st.integers(0, 70)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.one_of(
        st.lists(st.integers(0, 6), max_size=3).map(tuple),
        st.integers(0, 120).map(lambda n: (n,)),
    ))
    pool = draw(st.sampled_from([V, 1, min(2, V), min(3, V)]))  # few distinct ids: many repeats of a row
    offset = draw(st.integers(0, V - pool))
    ids = np.asarray(rng.integers(0, pool, size=shape) + offset).astype(draw(st.sampled_from(ID_DTYPES)))
    zeros = draw(st.sampled_from([0.0, 0.2, 0.45]))
    scale = 10.0 ** draw(st.integers(-3, 3))
    g = with_zeros(rng, (rng.standard_normal(shape + (D,)) * scale).astype(f32), zeros)
    w = with_zeros(rng, rng.standard_normal((V, D)).astype(f32), zeros)
    states = make_states(kind, rng, V, D, zeros)
    present = sorted(set(ids.reshape(-1).tolist()))
    absent = sorted(set(range(V)) - set(present))
    choices = [-1, V, -7] + present[:1] + present[-1:] + absent[:1]
    skip = draw(st.sampled_from(choices))
    lr = draw(st.sampled_from([0.1, 0.01, 1.0, 3.0]))
    eps = draw(st.sampled_from([1e-10, 1e-8, 0.1]))
    hp = hyper(kind, lr, eps, draw(st.sampled_from([(0.9, 0.999), (0.85, 0.99), (0.5, 0.5)])),
               draw(st.integers(1, 6)))
    layout = draw(st.sampled_from(["c", "c", "strided", "reversed"]))
    return kind, w, states, ids, arrange(g, layout), hp, skip


@MANY
@given(problem=problems())
def test_scatter_is_coalesce_then_step_bitwise_on_one_and_two_threads(problem):
    kind, w, states, ids, g, hp, skip = problem
    expected = run_composed(kind, w, states, ids, g, hp, skip)
    ids0, g0 = ids.copy(), g.copy()
    for threads in (1, 2):
        assert_all_bitwise(run_fused(kind, w, states, ids, g, hp, skip, threads), expected)
    assert_bitwise(ids, ids0)  # the inputs are read only
    assert_bitwise(g, g0)


@MANY
@given(problem=problems())
def test_scatter_matches_float32_transcription(problem):
    kind, w, states, ids, g, hp, skip = problem
    expected = transcription(kind, w, states, ids, g, hp, skip)
    for threads in (1, 2):
        assert_all_bitwise(run_fused(kind, w, states, ids, g, hp, skip, threads), expected)


# ---------------------------------------------------------------- fixed cases every run sees

@pytest.mark.parametrize("kind", KINDS)
def test_large_threaded_case_matches_transcription(kind):
    """V=5000, D=64, 20000 lookups (Zipf-like: many repeats of a few rows, many rows looked up once), past
    the serial threshold: the threaded path with a real team of two, and the prefetches of both loops."""
    rng = np.random.default_rng(2024)
    V, D, N = 5000, 64, 20000
    ids = np.minimum(rng.zipf(1.3, N) - 1, V - 1).astype(np.int64).reshape(100, 200)
    ids[0, :50] = rng.integers(0, V, 50)  # and some spread rows
    g = with_zeros(rng, rng.standard_normal((100, 200, D)).astype(f32), 0.01)
    w = with_zeros(rng, rng.standard_normal((V, D)).astype(f32), 0.01)
    states = make_states(kind, rng, V, D, 0.01)
    hp = hyper(kind, 0.05, 1e-8, (0.85, 0.99), 3)
    skip = int(ids[5, 5])
    expected = transcription(kind, w, states, ids, g, hp, skip)
    assert_all_bitwise(run_composed(kind, w, states, ids, g, hp, skip), expected)
    got2 = [a.copy() for a in [w] + states]
    with num_threads(2):
        fused(kind, got2[0], got2[1:], ids.astype(np.int32), g, hp, skip)
        assert _kernels._last_call_threads() == two_thread_team()
        assert _kernels._last_call_released_gil()
    assert_all_bitwise(got2, expected)
    assert_all_bitwise(run_fused(kind, w, states, ids, g, hp, skip, 1), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_two_threads_at_once_race_nothing(kind):
    """Enough work per thread (40000 lookups of 128 columns onto 3000 rows, a few repeats) that both
    threads of the team sum rows at the same time: each must have its own row buffer and its own rows.
    Against the contract (coalesce + *_step, serial), bitwise, step after step."""
    rng = np.random.default_rng(77)
    V, D, N = 3000, 128, 40000
    w = rng.standard_normal((V, D)).astype(f32)
    states = make_states(kind, rng, V, D)
    expected = [w.copy()] + [s.copy() for s in states]
    got = [w.copy()] + [s.copy() for s in states]
    for t in range(1, 4):
        ids = rng.integers(0, V, N).astype(np.int64)
        g = rng.standard_normal((N, D)).astype(f32)
        hp = hyper(kind, 0.01, 1e-8, (0.9, 0.999), t)
        with num_threads(1):
            composed(kind, expected[0], expected[1:], ids, g, hp, int(ids[0]))
        with num_threads(2):
            fused(kind, got[0], got[1:], ids, g, hp, int(ids[0]))
            assert _kernels._last_call_threads() == two_thread_team()
        assert_all_bitwise(got, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_sum_order_and_first_term(kind, threads):
    """Rows whose sums depend on the order (1 + 1e8 - 1e8 is 0 in ids order, 1 in reverse) and on the
    first term being 0 + row (a lone -0.0 gradient is +0.0, which leaves a -0.0 weight at -0.0; -0.0
    itself would make it +0.0), spread over more rows than the prefetch distance."""
    V, D = 24, 9
    rng = np.random.default_rng(5)
    ids, rows = [], []
    for r in range(0, V, 2):  # even rows: three lookups, 1 in ids order (0 in reverse); odd rows: one -0.0
        ids += [r, r + 1, r, r]
        rows += [[1e8] * D, [-0.0] * D, [-1e8] * D, [1.0] * D]
    ids = np.array(ids, np.int64)
    g = np.array(rows, f32)
    w = np.full((V, D), -0.0, f32)
    states = [np.full_like(s, f32(-0.0) if kind == "adam" else f32(0.0)) for s in make_states(kind, rng, V, D)]
    hp = hyper(kind, 0.5, 1e-3)
    expected = transcription(kind, w, states, ids, g, hp)
    assert np.signbit(expected[0][1::2]).all()  # -0.0 weights stay -0.0 under a +0.0 gradient
    assert not np.array_equal(expected[0][0::2], w[0::2])  # the ordered sums are 1 or -1, not 0
    assert_all_bitwise(run_fused(kind, w, states, ids, g, hp, -1, threads), expected)
    assert_all_bitwise(run_composed(kind, w, states, ids, g, hp), expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_skip_row_is_the_row_not_its_slot(kind, threads):
    """skip_row names a table row: rows 3 and 7 are looked up (slots 0 and 1), skip_row=7 leaves row 7
    and its state alone and moves row 3; skip_row=1 (a slot number, not a row looked up) skips nothing."""
    V, D = 10, 5
    rng = np.random.default_rng(11)
    ids = np.array([[7, 3], [3, 7]], np.int32)
    g = rng.standard_normal((2, 2, D)).astype(f32)
    w = rng.standard_normal((V, D)).astype(f32)
    states = make_states(kind, rng, V, D)
    hp = hyper(kind, 0.1, 1e-8)
    for skip, moved in ((7, [3]), (3, [7]), (1, [3, 7]), (0, [3, 7]), (-1, [3, 7])):
        got = run_fused(kind, w, states, ids, g, hp, skip, threads)
        assert_all_bitwise(got, transcription(kind, w, states, ids, g, hp, skip))
        changed = sorted(set(np.flatnonzero((got[0] != w).any(axis=1)).tolist()))
        assert changed == moved, (skip, changed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ID_DTYPES)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
def test_empty_ids_change_nothing(kind, dtype, shape):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4)).astype(f32)
    states = make_states(kind, rng, 6, 4)
    ids, g = np.zeros(shape, dtype), np.zeros(shape + (4,), f32)
    snap = Snapshot(w=w, ids=ids, g=g, **{f"s{i}": s for i, s in enumerate(states)})
    with num_threads(1):
        fused(kind, w, states, ids, g, hyper(kind, 0.1, 1e-8), 0)
    with serial_elements(0), num_threads(2):
        fused(kind, w, states, ids, g, hyper(kind, 0.1, 1e-8), 0)
    snap.assert_unchanged()


@pytest.mark.parametrize("kind", KINDS)
def test_zero_d_ids_and_zero_width(kind):
    """A 0-d id is one lookup; D == 0 moves nothing (row-wise's accumulator too) and raises nothing."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 6)).astype(f32)
    states = make_states(kind, rng, 4, 6)
    g = rng.standard_normal(6).astype(f32)
    hp = hyper(kind, 0.1, 1e-8)
    for ids in (np.array(2, np.int64), np.array(2, np.int32)):
        got = run_fused(kind, w, states, ids, g, hp, -1, 1)
        assert_all_bitwise(got, transcription(kind, w, states, ids.reshape(1), g.reshape(1, 6), hp))
        assert (got[0][[0, 1, 3]] == w[[0, 1, 3]]).all() and (got[0][2] != w[2]).all()
    w0 = np.zeros((4, 0), f32)
    states0 = make_states(kind, rng, 4, 0)
    snap = Snapshot(w=w0, **{f"s{i}": s for i, s in enumerate(states0)})
    fused(kind, w0, states0, np.array([1, 1, 3]), np.zeros((3, 0), f32), hp)
    snap.assert_unchanged()


# ---------------------------------------------------------------- errors: nothing written

def error_cases(kind):
    """(label, exception, w, states, ids, g) of bad calls, each built fresh."""
    rng = np.random.default_rng(9)
    V, D = 5, 4

    def good():
        w = rng.standard_normal((V, D)).astype(f32)
        return w, make_states(kind, rng, V, D), np.array([0, 4, 2, 4], np.int64), \
            rng.standard_normal((4, D)).astype(f32)

    cases = []
    for dtype in ID_DTYPES:
        for bad in (-1, V, np.iinfo(dtype).min, np.iinfo(dtype).max):
            w, s, ids, g = good()
            ids = ids.astype(dtype)
            ids[-1] = bad  # after valid ids: a kernel that wrote before checking would show
            cases.append((f"id {bad} {np.dtype(dtype).name}", IndexError, w, s, ids, g))
    w, s, ids, g = good()
    cases.append(("float ids", TypeError, w, s, ids.astype(np.float64), g))
    w, s, ids, g = good()
    cases.append(("uint64 ids", TypeError, w, s, ids.astype(np.uint64), g))
    w, s, ids, g = good()
    cases.append(("float64 grad", TypeError, w, s, ids, g.astype(np.float64)))
    w, s, ids, g = good()
    cases.append(("float64 weight", TypeError, w.astype(np.float64), s, ids, g))
    w, s, ids, g = good()
    cases.append(("float64 state", TypeError, w, [x.astype(np.float64) for x in s], ids, g))
    w, s, ids, g = good()
    cases.append(("grad width", ValueError, w, s, ids, g[:, :-1].copy()))
    w, s, ids, g = good()
    cases.append(("grad rows", ValueError, w, s, ids, g[:-1].copy()))
    w, s, ids, g = good()
    cases.append(("grad ndim", ValueError, w, s, ids, g[None]))
    w, s, ids, g = good()
    cases.append(("1-D weight", ValueError, w[:, 0].copy(), s, ids, g))
    w, s, ids, g = good()
    cases.append(("3-D weight", ValueError, w[..., None].copy(), s, ids, g))
    w, s, ids, g = good()
    cases.append(("state rows", ValueError, w, [x[:-1].copy() for x in s], ids, g))
    w, s, ids, g = good()
    wrong = [np.zeros((V, D), f32)] if kind == "rowwise" else [np.zeros(V, f32)] + s[1:]
    cases.append(("state shape", ValueError, w, wrong, ids, g))
    w, s, ids, g = good()
    cases.append(("fortran weight", ValueError, np.asfortranarray(w), s, ids, g))
    w, s, ids, g = good()
    cases.append(("strided state", ValueError, w, [np.repeat(x, 2, axis=-1)[..., ::2] for x in s], ids, g))
    w, s, ids, g = good()
    w.flags.writeable = False
    cases.append(("read-only weight", ValueError, w, s, ids, g))
    w, s, ids, g = good()
    s[-1].flags.writeable = False
    cases.append(("read-only state", ValueError, w, s, ids, g))
    w, s, ids, g = good()
    cases.append(("state is weight", ValueError, w, [w] + s[1:], ids, g))
    w, s, ids, g = good()
    cases.append(("last state is first", ValueError, w, s[:-1] + [s[0]] if kind == "adam" else [w], ids, g))
    w, s, ids, g = good()
    cases.append(("grad in weight", ValueError, w, s, ids[:1], w[None, 1]))
    if kind != "rowwise":
        for k in range(len(s)):
            w, s, ids, g = good()
            cases.append((f"grad in state {k}", ValueError, w, s, ids[:1], s[k][None, 2]))
    w, s, ids, g = good()
    w[:] = 0.0  # its bytes read as int32 are valid ids: only the overlap check refuses them
    cases.append(("ids in weight", ValueError, w, s, w.view(np.int32)[0, :4], g))
    return cases


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("check_only", [True, False])  # check_only first: a dropped check then fails, not crashes
def test_bad_calls_raise_and_write_nothing(kind, check_only):
    for label, exc, w, states, ids, g in error_cases(kind):
        snap = Snapshot(w=w, ids=ids, g=g, **{f"s{i}": s for i, s in enumerate(states)})
        for threads in (1, 2):
            with serial_elements(0), num_threads(threads), pytest.raises(exc):
                fused(kind, w, states, ids, g, hyper(kind, 0.1, 1e-8), -1, check_only)
            snap.assert_unchanged()


@pytest.mark.parametrize("kind", KINDS)
def test_check_only_writes_nothing_and_then_the_call_runs(kind):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 33)).astype(f32)
    states = make_states(kind, rng, 8, 33)
    ids = rng.integers(0, 8, (3, 5)).astype(np.int32)
    g = rng.standard_normal((3, 5, 33)).astype(f32)
    hp = hyper(kind, 0.1, 1e-8)
    snap = Snapshot(w=w, ids=ids, g=g, **{f"s{i}": s for i, s in enumerate(states)})
    with serial_elements(0), num_threads(2):
        fused(kind, w, states, ids, g, hp, -1, check_only=True)
    snap.assert_unchanged()
    expected = transcription(kind, w, states, ids, g, hp)
    fused(kind, w, states, ids, g, hp)
    assert_all_bitwise([w] + states, expected)
