"""Embedding bags (issue 10, items 6 and 7): fastembed.embedding_bag and its backward functions.

Oracles, independent of the kernels and of each other:
  - a numpy transcription (`bag_oracle`, `backward_oracle`, ...) written from torch's definition, loop by
    loop in float32 in the order the kernels document: compared bitwise;
  - the pure-Python reference on Values (fastembed.reference.embedding_bag), forward and its gradients
    (table and per_sample_weights) by backward(): compared to float64 tolerance;
  - torch's F.embedding_bag and torch.embedding_bag (values, argmax, dense and sparse gradients,
    per_sample_weights' gradient) when torch is installed: to float32 tolerance (torch's CPU sums may
    use FMA), exactly for max.
Bad input: every case of item 7 raises the documented type (and torch's type, checked against torch)
and leaves every array as it was. The threaded path (serial threshold 0, two threads) is bitwise the
one-thread result.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastembed as fe
from fastembed import _kernels
from fastembed import reference as R
from _helpers import FAST, FEW, Snapshot, assert_bitwise, num_threads, read_only, serial_elements, two_thread_team

MODES = ("sum", "mean", "max")
THREADED = settings(FAST, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- cases

@st.composite
def bag_cases(draw, max_rows=8, max_dim=6, max_ids=14, max_bags=6, trailing=True, modes=MODES):
    """A random bag call: table, ids, offsets (empty bags included), mode, per_sample_weights,
    padding_idx, include_last_offset. With trailing, include_last_offset may end before len(ids)."""
    V = draw(st.integers(1, max_rows))
    D = draw(st.integers(0, max_dim))
    N = draw(st.integers(0, max_ids))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pool = draw(st.sampled_from([V, 1, min(2, V), min(3, V)]))  # a tiny pool: duplicates, ties in max
    ids = rng.integers(0, pool, size=N) + draw(st.integers(0, V - pool))
    ids = ids.astype(draw(st.sampled_from([np.int32, np.int64])))
    B = draw(st.integers(0, max_bags))
    include_last_offset = draw(st.booleans())
    starts = np.sort(rng.integers(0, N + 1, size=B))
    if B:
        starts[0] = 0
    if include_last_offset:
        end = N if not trailing or draw(st.booleans()) else int(rng.integers(starts[-1] if B else 0, N + 1))
        end = end if B else 0  # the only offset is the first: 0
        offsets = np.append(starts, end)
    else:
        offsets = starts
    offsets = offsets.astype(draw(st.sampled_from([np.int32, np.int64])))
    mode = draw(st.sampled_from(modes))
    psw = None
    if mode == "sum" and draw(st.booleans()):
        psw = rng.standard_normal(N).astype(np.float32)
        psw[rng.random(N) < 0.1] = 0.0  # a zero weight: a -0.0 product must stay -0.0 where torch keeps it
    padding_idx = draw(st.one_of(st.none(), st.integers(-V, V - 1)))
    if N and padding_idx is not None and draw(st.booleans()):  # an id that occurs, so that a bag holds it
        padding_idx = int(ids[draw(st.integers(0, N - 1))]) - draw(st.sampled_from([0, V]))
    values = draw(st.sampled_from(["normal", "small-ints"]))
    if values == "normal":
        table = rng.standard_normal((V, D)).astype(np.float32)
    else:  # many exact ties for max
        table = rng.integers(-2, 3, size=(V, D)).astype(np.float32)
    return dict(table=table, ids=ids, offsets=offsets, mode=mode, per_sample_weights=psw,
                padding_idx=padding_idx, include_last_offset=include_last_offset)


def _kw(case, *skip):
    return {k: case[k] for k in ("mode", "per_sample_weights", "padding_idx", "include_last_offset") if k not in skip}


def _bounds(case):
    """[(lo, hi)] per bag, from the definition: the last bag ends at N, or at offsets[-1] with include_last_offset."""
    offs = [int(x) for x in case["offsets"]]
    if not case["include_last_offset"]:
        offs = offs + [len(case["ids"])]
    return list(zip(offs, offs[1:]))


def _pad(case):
    p = case["padding_idx"]
    return None if p is None else p % case["table"].shape[0]


def _kept(case, lo, hi):
    return [i for i in range(lo, hi) if int(case["ids"][i]) != _pad(case)]


def _lookup_scale(case, b, lo, hi, i):
    """The float32 factor of lookup i's gradient (None: plain add)."""
    if case["mode"] == "mean":
        return np.float32(1.0 / len(_kept(case, lo, hi)))
    if case["per_sample_weights"] is not None:
        return case["per_sample_weights"][i]
    return None


# ---------------------------------------------------------------- numpy transcriptions

def bag_oracle(case):
    """(out, argmax) by loops over bags and ids, in float32."""
    table, ids, psw = case["table"], case["ids"].astype(np.int64), case["per_sample_weights"]
    bounds = _bounds(case)
    D = table.shape[1]
    out = np.zeros((len(bounds), D), np.float32)
    arg = np.zeros((len(bounds), D), np.int64)
    for b, (lo, hi) in enumerate(bounds):
        kept = _kept(case, lo, hi)
        if not kept:
            continue
        if case["mode"] == "max":
            cur, a = table[ids[kept[0]]].copy(), np.full(D, ids[kept[0]])
            for i in kept[1:]:
                bigger = table[ids[i]] > cur
                cur[bigger], a[bigger] = table[ids[i]][bigger], ids[i]
            out[b], arg[b] = cur, a
            continue
        acc = np.zeros(D, np.float32)
        for i in kept:
            acc = acc + (table[ids[i]] * psw[i] if psw is not None else table[ids[i]])
        out[b] = acc / np.float32(len(kept)) if case["mode"] == "mean" else acc
    return out, arg


def backward_oracle(case, grad_table, grad_out, argmax):
    grad = grad_table.copy()
    ids = case["ids"].astype(np.int64)
    for b, (lo, hi) in enumerate(_bounds(case)):
        kept = _kept(case, lo, hi)
        if case["mode"] == "max":
            if kept:
                grad[argmax[b], np.arange(grad.shape[1])] += grad_out[b]
            continue
        for i in kept:
            s = _lookup_scale(case, b, lo, hi, i)
            grad[ids[i]] = grad[ids[i]] + (grad_out[b] if s is None else grad_out[b] * s)
    return grad


def grad_rows_oracle(case, grad_out):
    rows, values = [], []
    for b, (lo, hi) in enumerate(_bounds(case)):
        for i in _kept(case, lo, hi):
            s = _lookup_scale(case, b, lo, hi, i)
            rows.append(int(case["ids"][i]))
            values.append(grad_out[b].copy() if s is None else grad_out[b] * s)
    D = grad_out.shape[1]
    return np.array(rows, np.int64), np.array(values, np.float32).reshape(len(rows), D)


def weights_grad_oracle(case, grad_out):
    table, ids = case["table"], case["ids"].astype(np.int64)
    res = np.zeros(len(ids), np.float32)
    for b, (lo, hi) in enumerate(_bounds(case)):
        for i in _kept(case, lo, hi):
            acc = np.float32(0)
            for d in range(table.shape[1]):  # column order, one float32 rounding a step
                acc = np.float32(acc + table[ids[i], d] * grad_out[b, d])
            res[i] = acc
    return res


def _grad_out(case, seed=1):
    return np.random.default_rng(seed).standard_normal((len(_bounds(case)), case["table"].shape[1])).astype(np.float32)


def run_forward(case, **extra):
    if case["mode"] == "max":
        return fe.embedding_bag(case["table"], case["ids"], case["offsets"], return_argmax=True, **_kw(case), **extra)
    return fe.embedding_bag(case["table"], case["ids"], case["offsets"], **_kw(case), **extra), None


def run_backward(case, grad_table, grad_out, argmax):
    fe.embedding_bag_backward(grad_table, case["ids"], case["offsets"], grad_out, argmax=argmax, **_kw(case))


# ---------------------------------------------------------------- against the numpy transcription (bitwise)

@FAST
@given(bag_cases())
def test_forward_matches_transcription(case):
    out, arg = run_forward(case)
    want, want_arg = bag_oracle(case)
    assert_bitwise(out, want)
    if case["mode"] == "max":
        assert_bitwise(arg, want_arg)


@FAST
@given(bag_cases())
def test_forward_into_out(case):
    B, D = len(_bounds(case)), case["table"].shape[1]
    out = np.full((B, D), 7.0, np.float32)  # stale values must all be overwritten, empty bags included
    res, _ = run_forward(case, out=out)
    assert res is out
    assert_bitwise(out, bag_oracle(case)[0])


@FAST
@given(bag_cases())
def test_dense_backward_matches_transcription(case):
    _, arg = run_forward(case)
    g = _grad_out(case)
    grad0 = np.random.default_rng(2).standard_normal(case["table"].shape).astype(np.float32)  # accumulates
    grad = grad0.copy()
    run_backward(case, grad, g, arg)
    assert_bitwise(grad, backward_oracle(case, grad0, g, arg))


@FAST
@given(bag_cases(modes=("sum", "mean")))
def test_grad_rows_match_transcription_and_the_dense_gradient(case):
    g = _grad_out(case)
    V = case["table"].shape[0]
    rows, values = fe.embedding_bag_grad_rows(V, case["ids"], case["offsets"], g, **_kw(case))
    want_rows, want_values = grad_rows_oracle(case, g)
    assert_bitwise(rows, want_rows)
    assert_bitwise(values, want_values)
    dense = np.zeros_like(case["table"])
    run_backward(case, dense, g, None)
    scattered = np.zeros_like(case["table"])
    fe.scatter_add(scattered, rows, values)
    assert_bitwise(scattered, dense)


@FAST
@given(bag_cases(modes=("sum",)))
def test_weights_grad_matches_transcription(case):
    g = _grad_out(case)
    res = fe.embedding_bag_weights_grad(case["table"], case["ids"], case["offsets"], g,
                                        padding_idx=case["padding_idx"],
                                        include_last_offset=case["include_last_offset"])
    assert_bitwise(res, weights_grad_oracle(case, g))


def test_hand_computed_bags():
    """A case small enough to check by eye: empty bags, padding, duplicates, a trailing id, ties."""
    table = np.array([[1, 2], [3, -1], [0, 5], [3, 5]], np.float32)
    ids = np.array([0, 1, 2, 2, 3, 1, 0])
    offsets = np.array([0, 0, 3, 5])  # bags: [], [0 1 2], [2 3], [1 0]
    assert_bitwise(fe.embedding_bag(table, ids, offsets, mode="sum"),
                   np.array([[0, 0], [4, 6], [3, 10], [4, 1]], np.float32))
    assert_bitwise(fe.embedding_bag(table, ids, offsets, mode="mean", padding_idx=2),
                   np.array([[0, 0], [2, 0.5], [3, 5], [2, 0.5]], np.float32))
    out, arg = fe.embedding_bag(table, ids, offsets, mode="max", return_argmax=True)
    assert_bitwise(out, np.array([[0, 0], [3, 5], [3, 5], [3, 2]], np.float32))
    assert_bitwise(arg, np.array([[0, 0], [1, 2], [3, 2], [1, 0]], np.int64))  # ties: the first stays
    grad = np.zeros_like(table)  # mean with padding: bag [0 1 2] counts 2, bag [2 3] counts 1
    fe.embedding_bag_backward(grad, ids, offsets, np.arange(8, dtype=np.float32).reshape(4, 2), mode="mean",
                              padding_idx=2)
    assert_bitwise(grad, np.array([[1 + 6 / 2, 1.5 + 7 / 2], [1 + 6 / 2, 1.5 + 7 / 2], [0, 0], [4, 5]], np.float32))
    grad = np.zeros_like(table)  # max: each column into its argmax row; the empty bag's into none
    fe.embedding_bag_backward(grad, ids, offsets, np.arange(8, dtype=np.float32).reshape(4, 2), mode="max", argmax=arg)
    assert_bitwise(grad, np.array([[0, 7], [2 + 6, 0], [0, 3 + 5], [4, 0]], np.float32))
    # include_last_offset: the last bag is ids[3:5]; ids[5:] are in no bag
    assert_bitwise(fe.embedding_bag(table, ids, offsets, mode="sum", include_last_offset=True),
                   np.array([[0, 0], [4, 6], [3, 10]], np.float32))
    assert_bitwise(fe.embedding_bag(table, ids, offsets, mode="sum", per_sample_weights=np.arange(7, dtype=np.float32)),
                   np.array([[0, 0], [3, 9], [12, 35], [21, 7]], np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_sum_starts_at_positive_zero(dtype):
    """A sum starts from +0.0 (as torch's and as IEEE addition: +0.0 + -0.0 is +0.0), so a bag of one row of
    -0.0 sums to +0.0, a mean too, and a padding row or an empty bag leaves +0.0; a max copies the -0.0."""
    table = np.array([[-0.0, -0.0, 1.0], [-0.0, 2.0, -0.0]], dtype)
    ids = np.array([0, 1, 0, 1, 1])
    offsets = np.array([0, 1, 2, 4, 5])  # bags: [0], [1], [0 1], [1] (padding when padding_idx=1), []
    for mode in ("sum", "mean"):
        for pad in (None, 1):
            out = fe.embedding_bag(table, ids, offsets, mode=mode, padding_idx=pad)
            assert not np.signbit(out).any(), (mode, pad, out)
    out = fe.embedding_bag(table, ids, offsets, mode="max")
    assert_bitwise(np.signbit(out[[0, 1, 3]]), np.signbit(table[[0, 1, 1]]))  # the bags of one row
    torch = pytest.importorskip("torch")
    want = torch.nn.functional.embedding_bag(torch.from_numpy(ids), torch.from_numpy(table),
                                             torch.from_numpy(offsets), mode="sum")
    assert_bitwise(fe.embedding_bag(table, ids, offsets, mode="sum"), want.numpy())


@pytest.mark.parametrize("idt", [np.int32, np.int64])
@pytest.mark.parametrize("D", [1, 7, 8, 9, 31, 32, 33, 40, 64, 71])
def test_long_float32_sums_are_sequential_across_chunks_and_column_tails(D, idt):
    """A float32 sum or mean adds a bag's rows in registers, up to 16 rows and 32 (then 8, then 1) columns at
    a time, or at widths 32 and 64 a whole bag at a time with the ids read directly: bags of 0 to 50 rows
    (around the 16-row chunks), widths around the 32/8-column steps, stale NaNs in out and rows of -0.0 still
    give the sequential float32 loop's bits, the sum starting at +0.0; int32 and int64 ids."""
    rng = np.random.default_rng(D)
    V = 40
    table = (rng.standard_normal((V, D)) * 1e3 ** rng.integers(-1, 2, (V, D))).astype(np.float32)  # rounding in sums
    table[:4] = -0.0  # ids 0..3: bags of them only must sum to +0.0
    # bags: a first row, then chunks of 16 (a full chunk from 17 rows on, a second from 33)
    lengths = [0, 1, 2, 15, 16, 17, 31, 32, 33, 50, 3, 18, 5]  # the last bag ends at len(ids), not an offset
    ids = [rng.integers(4, V, n) if n == 5 else rng.integers(0, V, n) for n in lengths]
    ids[10], ids[11] = rng.integers(0, 4, 3), rng.integers(0, 4, 18)  # -0.0 only: +0.0 through a chunk's flush
    offsets = np.cumsum([0] + lengths[:-1]).astype(np.int64)
    ids = np.concatenate(ids).astype(idt)
    for mode in ("sum", "mean"):
        case = dict(table=table, ids=ids, offsets=offsets, mode=mode, per_sample_weights=None,
                    padding_idx=None, include_last_offset=False)
        out = np.full((len(lengths), D), np.nan, np.float32)
        fe.embedding_bag(table, ids, offsets, mode=mode, out=out)
        assert_bitwise(out, bag_oracle(case)[0])
        assert not np.signbit(out[[0, 10, 11]]).any()
        case["padding_idx"] = int(ids[offsets[9]])  # the padding row dropped mid-chunk
        assert_bitwise(fe.embedding_bag(table, ids, offsets, mode=mode, padding_idx=case["padding_idx"]),
                       bag_oracle(case)[0])


@pytest.mark.parametrize("idt", [np.int32, np.int64])
@pytest.mark.parametrize("mode", MODES)
def test_bags_of_one_repeated_id_through_the_chunks(mode, idt):
    """Every id equal (the last row, id == V - 1, then row 0) in bags of 0 to 50 rows, through the float32
    register paths' chunks of 16 at widths around their column steps: values and argmax bitwise the
    sequential loop's (a sum of one row repeated rounds at each add; a max keeps the first, ties never win)."""
    for D in (7, 33, 64):
        table = np.random.default_rng(D).standard_normal((5, D)).astype(np.float32)
        lengths = [0, 1, 2, 16, 17, 33, 50]
        for r in (4, 0):
            ids = np.full(sum(lengths), r, idt)
            case = dict(table=table, ids=ids, offsets=np.cumsum([0] + lengths[:-1]).astype(idt), mode=mode,
                        per_sample_weights=None, padding_idx=None, include_last_offset=False)
            out, arg = run_forward(case, out=np.full((len(lengths), D), np.nan, np.float32))
            want, want_arg = bag_oracle(case)
            assert_bitwise(out, want)
            if mode == "max":
                assert_bitwise(arg, want_arg)


def test_two_dimensional_ids_are_fixed_length_bags():
    rng = np.random.default_rng(3)
    table = rng.standard_normal((9, 4)).astype(np.float32)
    ids = rng.integers(0, 9, size=(5, 3))
    psw = rng.standard_normal((5, 3)).astype(np.float32)
    flat = dict(table=table, ids=ids.reshape(-1), offsets=np.arange(0, 15, 3), mode="sum",
                per_sample_weights=psw.reshape(-1), padding_idx=None, include_last_offset=False)
    assert_bitwise(fe.embedding_bag(table, ids, mode="sum", per_sample_weights=psw), bag_oracle(flat)[0])
    g = _grad_out(flat)
    assert_bitwise(fe.embedding_bag_weights_grad(table, ids, None, g), weights_grad_oracle(flat, g).reshape(5, 3))
    assert_bitwise(fe.embedding_bag(table, ids[:, ::2], mode="mean"), fe.embedding_bag(
        table, ids[:, ::2].reshape(-1), np.arange(0, 10, 2), mode="mean"))
    # rows of length 0: B empty bags (torch refuses: its arange step would be 0)
    assert_bitwise(fe.embedding_bag(table, np.zeros((3, 0), np.int64), mode="max"), np.zeros((3, 4), np.float32))


# ---------------------------------------------------------------- against the reference on Values

def _reference_call(case):
    layer = R.Embedding.from_rows(case["table"].tolist()) if case["table"].shape[1] else None
    weight = layer.weight if layer else [[] for _ in range(case["table"].shape[0])]
    psw = None
    if case["per_sample_weights"] is not None:
        psw = [R.Value(float(w)) for w in case["per_sample_weights"]]
    out = R.embedding_bag(weight, [int(i) for i in case["ids"]], [int(o) for o in case["offsets"]],
                          mode=case["mode"], per_sample_weights=psw, padding_idx=case["padding_idx"],
                          include_last_offset=case["include_last_offset"])
    return layer, weight, psw, out


@FEW
@given(bag_cases(max_rows=5, max_dim=4, max_ids=8, max_bags=4))
def test_reference_forward_and_gradients(case):
    assume(case["table"].shape[1] > 0)
    layer, weight, psw, out = _reference_call(case)
    got, arg = run_forward(case)
    np.testing.assert_allclose(got, np.array([[v.data for v in row] for row in out], np.float64).reshape(got.shape),
                               rtol=1e-6, atol=1e-6)
    g = _grad_out(case)
    loss = R.Value(0.0)
    for b, row in enumerate(out):
        for d, v in enumerate(row):
            loss = loss + v * float(g[b, d])
    loss.backward()
    grad = np.zeros_like(case["table"])
    run_backward(case, grad, g, arg)
    np.testing.assert_allclose(grad, np.array(layer.grad), rtol=1e-5, atol=1e-5)
    if psw is not None:
        res = fe.embedding_bag_weights_grad(case["table"], case["ids"], case["offsets"], g,
                                            padding_idx=case["padding_idx"],
                                            include_last_offset=case["include_last_offset"])
        np.testing.assert_allclose(res, [w.grad for w in psw], rtol=1e-5, atol=1e-5)


def test_reference_max_ties_go_to_the_first_row_as_the_kernels():
    """Equal values in different rows (rare among random floats): the first in the bag wins, in the
    reference as in the kernels and torch, so its row gets the gradient."""
    table = np.array([[1.0, 2.0], [2.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    layer = R.Embedding.from_rows(table.tolist())
    out = R.embedding_bag(layer.weight, [0, 1, 2], [0], mode="max")
    assert [v.data for v in out[0]] == [2.0, 2.0]
    (out[0][0] * 3.0 + out[0][1] * 5.0).backward()
    expected = np.zeros_like(table)
    _, argmax = fe.embedding_bag(table, np.array([0, 1, 2]), np.array([0]), mode="max", return_argmax=True)
    assert argmax.tolist() == [[1, 0]]
    fe.embedding_bag_backward(expected, np.array([0, 1, 2]), np.array([0]), np.array([[3.0, 5.0]], np.float32),
                              mode="max", argmax=argmax)
    np.testing.assert_array_equal(np.array(layer.grad), expected)
    assert expected[1, 0] == 3.0 and expected[0, 1] == 5.0


def test_reference_refuses_what_the_kernels_refuse():
    w = R.Embedding.from_rows([[1.0], [2.0]]).weight
    for offsets in ([1], [0, 3], [0, 2, 1]):
        with pytest.raises(ValueError):
            R.embedding_bag(w, [0, 1], offsets)
    with pytest.raises(ValueError):
        R.embedding_bag(w, [0, 1], [0], mode="mean", per_sample_weights=[1.0, 1.0])
    with pytest.raises(IndexError):
        R.embedding_bag(w, [0, 2], [0])
    with pytest.raises(ValueError):
        R.embedding_bag(w, [0, 1], [0], padding_idx=2)


# ---------------------------------------------------------------- against torch

def _torch_call(torch, case, sparse=False):
    weight = torch.tensor(case["table"], requires_grad=True)
    psw = None
    if case["per_sample_weights"] is not None:
        psw = torch.tensor(case["per_sample_weights"], requires_grad=True)
    out = torch.nn.functional.embedding_bag(
        torch.tensor(case["ids"].astype(np.int64)), weight, torch.tensor(case["offsets"].astype(np.int64)),
        mode=case["mode"], per_sample_weights=psw, padding_idx=case["padding_idx"],
        include_last_offset=case["include_last_offset"], sparse=sparse)
    return weight, psw, out


def _torch_can(case):
    """torch answers only when D > 0 and every id is in a bag: it raises "Expected i < index_size" for
    D == 0, and for ids in no bag (offsets empty, or include_last_offset ending early) its backward reads
    past grad_out, or crashes."""
    bounds = _bounds(case)
    return case["table"].shape[1] > 0 and (bounds[-1][1] if bounds else 0) == len(case["ids"])


def _close(actual, expected, scale=1.0):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5 * scale)


# torch's mean divides by N - offsets[B - 1] when include_last_offset's last offset is short of N, and its
# backward reads past grad_out there (see _bag_common.pxi): the torch tests keep every id in a bag.
@FAST
@given(bag_cases(trailing=False))
def test_forward_and_backward_match_torch(case):
    torch = pytest.importorskip("torch")
    assume(_torch_can(case))
    weight, psw, out = _torch_call(torch, case)
    got, arg = run_forward(case)
    scale = 1.0 + np.abs(case["table"]).sum()
    if case["mode"] == "max":
        assert_bitwise(got, out.detach().numpy())
        four = torch.embedding_bag(weight.detach(), torch.tensor(case["ids"].astype(np.int64)),
                                   torch.tensor(case["offsets"].astype(np.int64)), False, 2, False, None,
                                   case["include_last_offset"], case["padding_idx"])
        assert_bitwise(arg, four[3].numpy())
    else:
        _close(got, out.detach().numpy(), scale)
    g = _grad_out(case)
    out.backward(torch.tensor(g))
    grad = np.zeros_like(case["table"])
    run_backward(case, grad, g, arg)
    if case["mode"] == "max":
        assert_bitwise(grad, weight.grad.numpy())
    else:
        weights = np.abs(case["per_sample_weights"]).max(initial=1) if psw is not None else 1
        _close(grad, weight.grad.numpy(), 1.0 + np.abs(g).sum() * weights)
    if psw is not None:
        res = fe.embedding_bag_weights_grad(case["table"], case["ids"], case["offsets"], g,
                                            padding_idx=case["padding_idx"],
                                            include_last_offset=case["include_last_offset"])
        _close(res, psw.grad.numpy(), 1.0 + np.abs(g).sum() * np.abs(case["table"]).max(initial=0))


@FAST
@given(bag_cases(trailing=False, modes=("sum", "mean")))
def test_sparse_layout_matches_torch(case):
    torch = pytest.importorskip("torch")
    assume(_torch_can(case))
    weight, psw, out = _torch_call(torch, case, sparse=True)
    g = _grad_out(case)
    out.backward(torch.tensor(g))
    rows, values = fe.embedding_bag_grad_rows(case["table"].shape[0], case["ids"], case["offsets"], g, **_kw(case))
    sparse = weight.grad
    assert sparse.is_sparse
    assert_bitwise(rows, sparse._indices()[0].numpy())
    _close(values, sparse._values().numpy(), 1.0 + np.abs(g).max(initial=0))
    if case["mode"] == "sum" and psw is None:
        assert_bitwise(values, sparse._values().numpy())  # copies of grad_out's rows, no arithmetic


def test_two_dimensional_ids_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    table = rng.standard_normal((6, 3)).astype(np.float32)
    ids = rng.integers(0, 6, size=(4, 5))
    for mode in MODES:
        want = torch.nn.functional.embedding_bag(torch.tensor(ids), torch.tensor(table), mode=mode, padding_idx=1)
        _close(fe.embedding_bag(table, ids, mode=mode, padding_idx=1), want.numpy(), 10.0)


# ---------------------------------------------------------------- bad input: the error, and nothing changed

def _small():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids = np.array([0, 2, 1, 3, 3], np.int64)
    offsets = np.array([0, 2, 2], np.int64)
    return table, ids, offsets


def _every_entry_point(table, ids, offsets, **kw):
    """Call forward (into out), dense backward, grad rows and weights grad with the same bag arguments;
    each must raise, and nothing given to any of them may change."""
    B = 3  # offsets that are not 1-D: any grad_out shape will do, the call raises first
    if offsets is not None and np.ndim(offsets) == 1:
        B = max(len(offsets) - (1 if kw.get("include_last_offset") else 0), 0)
    out = np.full((B, table.shape[1]), 5.0, np.float32)
    grad = np.ones_like(table)
    g = np.ones((B, table.shape[1]), np.float32)
    mode = kw.pop("mode", "sum")
    snap = Snapshot(table=table, ids=ids, offsets=offsets, out=out, grad=grad, g=g,
                    psw=kw.get("per_sample_weights"))
    calls = [
        lambda: fe.embedding_bag(table, ids, offsets, mode=mode, out=out, **kw),
        lambda: fe.embedding_bag_backward(grad, ids, offsets, g, mode=mode, argmax=(
            np.zeros((B, table.shape[1]), np.int64) if mode == "max" else None), **kw),
    ]
    if mode != "max":
        calls.append(lambda: fe.embedding_bag_grad_rows(table.shape[0], ids, offsets, g, mode=mode, **kw))
    if mode == "sum" and kw.get("per_sample_weights") is None:
        calls.append(lambda: fe.embedding_bag_weights_grad(table, ids, offsets, g, **kw))
    errors = []
    for call in calls:
        with pytest.raises(Exception) as info:
            call()
        errors.append(info.value)
        snap.assert_unchanged()
    return errors


OFFSET_CASES = [
    # (offsets, include_last_offset, message part)
    ([1, 2], False, "offsets[0] = 1"),
    ([0, 6], False, "offsets[1] = 6 points past the ids (len(ids) = 5)"),  # N + 1
    ([0, 6], True, "offsets[1] = 6 points past"),
    ([0, 3, 2], False, "offsets[2] = 2 is smaller than offsets[1] = 3"),
    ([0, -1, 3], False, "offsets[1] = -1 is negative"),
    ([-1], False, "offsets[0] = -1 is negative"),
    ([], True, "include_last_offset=True needs at least one offset"),
]


@pytest.mark.parametrize("offsets, ilo, message", OFFSET_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_bad_offsets_raise_and_change_nothing(offsets, ilo, message, mode):
    table, ids, _ = _small()
    for dtype in (np.int32, np.int64):
        for err in _every_entry_point(table, ids, np.array(offsets, dtype), mode=mode, include_last_offset=ilo):
            assert isinstance(err, fe.BagArgumentError) and isinstance(err, ValueError)
            assert isinstance(err, RuntimeError)  # what torch raises
            assert message in str(err)


def test_offsets_boundary_at_len_ids_is_fine():
    table, ids, _ = _small()
    for ilo in (False, True):
        out = fe.embedding_bag(table, ids, np.array([0, 5, 5]), mode="sum", include_last_offset=ilo)
        assert out.shape == ((2 if ilo else 3), 3)
        assert_bitwise(out[0], table[ids].sum(axis=0, dtype=np.float32))
        assert not out[1:].any()


@pytest.mark.parametrize("bad, where", [(4, "ids[3] = 4"), (-1, "ids[3] = -1"), (2**40, "ids[3] = 1099511627776")])
@pytest.mark.parametrize("mode", MODES)
def test_ids_out_of_range_raise_and_change_nothing(bad, where, mode):
    table, ids, offsets = _small()
    ids[3] = bad
    for err in _every_entry_point(table, ids, offsets, mode=mode):
        assert isinstance(err, IndexError) and where in str(err) and "4 rows" in str(err)


def test_id_equal_to_last_row_is_fine():
    table, ids, offsets = _small()
    ids[:] = 3
    assert_bitwise(fe.embedding_bag(table, ids, offsets, mode="max"),
                   np.array([table[3], [0, 0, 0], table[3]], np.float32))


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_per_sample_weights_need_sum(mode):
    table, ids, offsets = _small()
    for err in _every_entry_point(table, ids, offsets, mode=mode, per_sample_weights=np.ones(5, np.float32)):
        assert isinstance(err, fe.BagModeError) and isinstance(err, ValueError)
        assert isinstance(err, NotImplementedError)  # what torch raises
        assert f"mode='{mode}'" in str(err)


@pytest.mark.parametrize("psw, error", [
    (np.ones(4, np.float32), ValueError), (np.ones(6, np.float32), ValueError),
    (np.ones((5, 1), np.float32), ValueError),
    (np.ones(5, np.float64), TypeError), ([1.0] * 5, TypeError)])
def test_per_sample_weights_of_the_wrong_shape_or_dtype(psw, error):
    table, ids, offsets = _small()
    for err in _every_entry_point(table, ids, offsets, mode="sum", per_sample_weights=psw)[:3]:
        assert isinstance(err, error), err


@pytest.mark.parametrize("padding_idx, ok", [(4, False), (-5, False), (3, True), (-4, True), (True, False)])
def test_padding_idx_range(padding_idx, ok):
    table, ids, offsets = _small()
    if ok:
        out = fe.embedding_bag(table, ids, offsets, mode="mean", padding_idx=padding_idx)
        if padding_idx == 3:
            assert_bitwise(out[2], table[1])  # bag [1, 3, 3] without row 3
        else:
            assert_bitwise(out[0], table[2])  # bag [0, 2] without row -4 = 0
        return
    for err in _every_entry_point(table, ids, offsets, mode="mean", padding_idx=padding_idx):
        if isinstance(padding_idx, bool):
            assert isinstance(err, TypeError)
        else:
            assert isinstance(err, fe.BagArgumentError) and isinstance(err, RuntimeError)
            assert f"but got {padding_idx}" in str(err) and "-4 through 3" in str(err)


@pytest.mark.parametrize("mode", ["avg", "SUM", None, 0])
def test_bad_mode(mode):
    table, ids, offsets = _small()
    for err in _every_entry_point(table, ids, offsets, mode=mode)[:3]:
        assert isinstance(err, ValueError) and repr(mode) in str(err)


def test_bad_shapes_and_dtypes_change_nothing():
    table, ids, offsets = _small()
    for err in _every_entry_point(table, ids.reshape(1, 5), offsets, mode="sum"):  # 2-D ids with offsets
        assert isinstance(err, ValueError) and "offsets has to be None" in str(err)
    for err in _every_entry_point(table, ids, None, mode="sum"):
        assert isinstance(err, ValueError) and "offsets" in str(err)
    for err in _every_entry_point(table, ids.reshape(1, 1, 5), None, mode="sum"):
        assert isinstance(err, ValueError) and "1-D" in str(err)
    for err in _every_entry_point(table, ids, offsets.reshape(1, 3), mode="sum"):
        assert isinstance(err, ValueError) and "offsets has to be 1-D" in str(err)
    for err in _every_entry_point(table, ids.astype(np.float32), offsets, mode="sum"):
        assert isinstance(err, TypeError)
    for err in _every_entry_point(table, ids, offsets.astype(np.float64), mode="sum"):
        assert isinstance(err, TypeError)


def test_bad_targets_and_grad_out():
    table, ids, offsets = _small()
    snap = Snapshot(table=table, ids=ids, offsets=offsets)
    for out, error in [(np.zeros((2, 3), np.float32), ValueError), (np.zeros((3, 3), np.float64), TypeError),
                       (read_only(np.zeros((3, 3), np.float32)), ValueError),
                       (np.zeros((3, 6), np.float32)[:, ::2], ValueError), (table[:3], ValueError)]:
        keep = out.copy()
        with pytest.raises(error):
            fe.embedding_bag(table, ids, offsets, mode="sum", out=out)
        assert_bitwise(out, keep)
    for g in (np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32), np.zeros((3, 3), np.float64)):
        grad = np.ones_like(table)
        with pytest.raises((ValueError, TypeError)):
            fe.embedding_bag_backward(grad, ids, offsets, g, mode="sum")
        assert_bitwise(grad, np.ones_like(table))
        with pytest.raises((ValueError, TypeError)):
            fe.embedding_bag_weights_grad(table, ids, offsets, g)
    with pytest.raises(ValueError, match="read-only"):
        fe.embedding_bag_backward(read_only(table), ids, offsets, np.zeros((3, 3), np.float32), mode="sum")
    snap.assert_unchanged()


def test_max_backward_needs_a_valid_argmax():
    table, ids, offsets = _small()
    g = np.ones((3, 3), np.float32)
    _, arg = fe.embedding_bag(table, ids, offsets, mode="max", return_argmax=True)
    cases = [(None, ValueError, "needs argmax"), (arg.astype(np.int32), TypeError, "int64"),
             (arg[:2], ValueError, "shape"), (np.where(arg == 3, 4, arg), IndexError, "= 4"),
             (np.where(arg == 3, -1, arg), IndexError, "= -1")]
    for bad, error, message in cases:
        grad = np.ones_like(table)
        with pytest.raises(error, match=message):
            fe.embedding_bag_backward(grad, ids, offsets, g, mode="max", argmax=bad)
        assert_bitwise(grad, np.ones_like(table))
    with pytest.raises(ValueError, match="mode='max' only"):
        fe.embedding_bag_backward(np.ones_like(table), ids, offsets, g, mode="sum", argmax=arg)
    with pytest.raises(ValueError, match="mode='max' only"):
        fe.embedding_bag(table, ids, offsets, mode="sum", return_argmax=True)
    with pytest.raises(ValueError, match="sparse"):
        fe.embedding_bag_grad_rows(4, ids, offsets, g, mode="max")


def test_errors_are_the_types_torch_raises():
    """For the same bad input torch raises an exception that fastembed's error is an instance of."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    table, ids, offsets = _small()
    cases = [
        dict(offsets=[1, 2]), dict(offsets=[0, 6]), dict(offsets=[0, 6], include_last_offset=True),
        dict(offsets=[], include_last_offset=True), dict(padding_idx=4), dict(padding_idx=-5),
        dict(mode="mean", per_sample_weights=np.ones(5, np.float32)),
        dict(mode="max", per_sample_weights=np.ones(5, np.float32)),
        dict(per_sample_weights=np.ones(4, np.float32)), dict(mode="avg"),
    ]
    for case in cases:
        offs = np.array(case.pop("offsets", offsets), np.int64)
        mode = case.pop("mode", "sum")
        psw = case.pop("per_sample_weights", None)
        with pytest.raises(Exception) as theirs:
            F.embedding_bag(torch.tensor(ids), torch.tensor(table), torch.tensor(offs), mode=mode,
                            per_sample_weights=None if psw is None else torch.tensor(psw), **case)
        with pytest.raises(type(theirs.value)):
            fe.embedding_bag(table, ids, offs, mode=mode, per_sample_weights=psw, **case)


# ---------------------------------------------------------------- the threaded path

@pytest.fixture
def threaded():
    with serial_elements(0), num_threads(2):
        yield


@THREADED
@given(case=bag_cases(max_rows=50, max_dim=80, max_ids=60, max_bags=12))
def test_threaded_is_bitwise_one_thread(threaded, case):
    g = _grad_out(case)
    V = case["table"].shape[0]
    B, D = len(_bounds(case)), case["table"].shape[1]
    out2, arg2 = run_forward(case, out=np.full((B, D), np.nan, np.float32))  # every row must be written
    team = _kernels._last_call_threads()
    if len(_bounds(case)) >= 2:
        assert team == two_thread_team()
    grad2 = np.zeros_like(case["table"])
    run_backward(case, grad2, g, arg2)
    extra = {}
    if case["mode"] != "max":
        extra["rows"] = fe.embedding_bag_grad_rows(V, case["ids"], case["offsets"], g, **_kw(case))
    if case["mode"] == "sum":
        extra["psw"] = fe.embedding_bag_weights_grad(case["table"], case["ids"], case["offsets"], g,
                                                     padding_idx=case["padding_idx"],
                                                     include_last_offset=case["include_last_offset"])
    with num_threads(1):
        out1, arg1 = run_forward(case)
        grad1 = np.zeros_like(case["table"])
        run_backward(case, grad1, g, arg1)
        assert_bitwise(out2, out1)
        assert_bitwise(grad2, grad1)
        if case["mode"] == "max":
            assert_bitwise(arg2, arg1)
        if "rows" in extra:
            rows1 = fe.embedding_bag_grad_rows(V, case["ids"], case["offsets"], g, **_kw(case))
            assert_bitwise(extra["rows"][0], rows1[0])
            assert_bitwise(extra["rows"][1], rows1[1])
        if "psw" in extra:
            assert_bitwise(extra["psw"], fe.embedding_bag_weights_grad(
                case["table"], case["ids"], case["offsets"], g, padding_idx=case["padding_idx"],
                include_last_offset=case["include_last_offset"]))
    assert_bitwise(out1, bag_oracle(case)[0])


# ---------------------------------------------------------------- the nn layer against torch's nn.EmbeddingBag

@FEW
@given(bag_cases(trailing=False), st.booleans())
def test_layer_matches_torch_module(case, sparse):
    torch = pytest.importorskip("torch")
    assume(_torch_can(case))
    sparse = sparse and case["mode"] != "max"
    theirs = torch.nn.EmbeddingBag.from_pretrained(
        torch.tensor(case["table"]), freeze=False, mode=case["mode"], padding_idx=case["padding_idx"],
        include_last_offset=case["include_last_offset"], sparse=sparse)
    ours = fe.EmbeddingBag.from_pretrained(case["table"], mode=case["mode"], padding_idx=case["padding_idx"],
                                           include_last_offset=case["include_last_offset"], sparse=sparse)
    psw = case["per_sample_weights"]
    tpsw = None if psw is None else torch.tensor(psw, requires_grad=True)
    want = theirs(torch.tensor(case["ids"].astype(np.int64)), torch.tensor(case["offsets"].astype(np.int64)), tpsw)
    got = ours(case["ids"], case["offsets"], psw)
    scale = 1.0 + np.abs(case["table"]).sum()
    _close(got, want.detach().numpy(), scale)
    g = _grad_out(case)
    want.backward(torch.tensor(g), retain_graph=True)
    weights_grad = ours.backward(g)
    want.backward(torch.tensor(g) * 2)  # gradients accumulate over backward calls, dense and sparse
    ours.backward(g * 2)
    expected = theirs.weight.grad.to_dense() if sparse else theirs.weight.grad
    wscale = np.abs(psw).max(initial=1) if psw is not None else 1
    _close(ours.dense_grad(), expected.numpy(), 1.0 + 3 * np.abs(g).sum() * wscale)
    if sparse:
        assert isinstance(ours.grad, fe.SparseGrad)
        assert_bitwise(ours.grad.rows, np.unique(ours.grad.rows))
    if psw is None:
        assert weights_grad is None
    else:
        _close(weights_grad * 3, tpsw.grad.numpy(), 1.0 + 3 * np.abs(g).sum() * np.abs(case["table"]).max(initial=0))


def test_layer_options_and_errors():
    layer = fe.EmbeddingBag(6, 4, mode="sum", padding_idx=-2, seed=1)
    assert layer.padding_idx == 4 and not layer.weight[4].any() and layer.weight[3].any()
    ids, offsets = np.array([1, 4, 4, 2]), np.array([0, 3])
    out = layer(ids, offsets)
    assert_bitwise(out, np.stack([layer.weight[1], layer.weight[2]]))
    ids[:] = 0  # the layer keeps its own copy of ids
    offsets[:] = 0
    layer.backward(np.ones((2, 4), np.float32))
    want = np.zeros((6, 4), np.float32)
    want[[1, 2]] = 1
    assert_bitwise(layer.grad, want)
    with pytest.raises(ValueError):
        layer.backward(np.ones((3, 4), np.float32))
    assert_bitwise(layer.grad, want)  # a refused backward adds nothing
    with pytest.raises(ValueError, match="sparse"):
        fe.EmbeddingBag(6, 4, mode="max", sparse=True)
    with pytest.raises(ValueError, match="-6 through 5"):
        fe.EmbeddingBag(6, 4, padding_idx=6)
    with pytest.raises(ValueError, match="mode"):
        fe.EmbeddingBag(6, 4, mode="avg")
    with pytest.raises(RuntimeError, match="before any forward"):
        fe.EmbeddingBag(6, 4).backward(np.ones((1, 4), np.float32))
    pre = fe.EmbeddingBag.from_pretrained(np.ones((3, 2)), padding_idx=0)
    assert pre.weight.dtype == np.float64 and pre.weight[0].all()  # its own dtype, and the padding row kept
    pre = fe.EmbeddingBag.from_pretrained(np.ones((3, 2)), padding_idx=0, dtype=np.float32)
    assert pre.weight.dtype == np.float32 and pre.weight[0].all()  # converted when asked


def test_layer_sparse_and_dense_agree_with_weights():
    """The same sum layer, dense and sparse, with per_sample_weights: one gradient, and the weights' gradient."""
    rng = np.random.default_rng(5)
    table = rng.standard_normal((7, 5)).astype(np.float32)
    ids, offsets = np.array([3, 1, 3, 6, 0, 3]), np.array([0, 2, 2])
    psw = rng.standard_normal(6).astype(np.float32)
    g = rng.standard_normal((3, 5)).astype(np.float32)
    grads = []
    for sparse in (False, True):
        layer = fe.EmbeddingBag.from_pretrained(table, mode="sum", padding_idx=6, sparse=sparse)
        layer(ids, offsets, psw)
        weights_grad = layer.backward(g)
        assert_bitwise(weights_grad, fe.embedding_bag_weights_grad(table, ids, offsets, g, padding_idx=6))
        assert weights_grad[3] == 0 and weights_grad[0] != 0  # the padding id's weight has no gradient
        grads.append(layer.dense_grad())
    want = np.zeros_like(table)
    for b, (lo, hi) in enumerate([(0, 2), (2, 2), (2, 6)]):
        for i in range(lo, hi):
            if ids[i] != 6:
                want[ids[i]] += g[b] * psw[i]
    np.testing.assert_allclose(grads[0], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grads[1], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("index", [np.int32, np.int64])
@pytest.mark.parametrize("D", [5, 32, 40, 64])
def test_a_mean_is_the_sum_divided_by_its_count_bit_for_bit(D, index):
    """A float32 mean is the sum divided by its count (torch's `output /= bag_size`, not a product by a
    reciprocal): bags of 1 to 129 rows, powers of two and not, over rows whose sums span subnormal results
    (rounded by the division), infinities, a NaN per column with its payload, and -0.0, give the oracle's
    sequential float32 sum divided by np.float32(count), bit for bit. D 32 and 64 take the register path, 5 and
    40 the general loop."""
    rng = np.random.default_rng(7 + D)
    V = 300
    mant = rng.integers(1, 2**24, (V, D)).astype(np.float64)
    exp = rng.integers(-160, -120, (V, D))  # sums near and below 2**-126: subnormal quotients that round
    table = (rng.choice([-1.0, 1.0], (V, D)) * mant * np.exp2(exp)).astype(np.float32)
    table[:50] = rng.standard_normal((50, D)).astype(np.float32)  # ordinary rows too
    table[50, :] = np.inf
    table[51, :] = -0.0
    nan_rows = np.arange(52, 60)
    for row in nan_rows:  # NaNs with payloads; a bag below names at most one of these rows
        table[row, :] = (0x7FC00000 + row * 0x101 + np.arange(D)).astype(np.uint32).view(np.float32)
    table[60, :] = np.float32(3 * 2.0**-149)  # three of the smallest subnormal
    table[61, :] = 0.0
    lengths = [1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1, 1, 2, 8, 2, 3]
    plain = np.setdiff1d(np.arange(V), nan_rows)
    ids = [rng.choice(plain, n) for n in lengths]
    for b in range(0, len(lengths), 3):
        ids[b][rng.integers(0, lengths[b])] = nan_rows[b % len(nan_rows)]
    ids[18][0], ids[19][0] = 51, 50  # a mean of one -0.0 row is +0.0 (0 + row); of one inf row, inf
    ids[20][:] = 51  # -0.0 + -0.0 summed from +0.0: +0.0
    ids[22][:], ids[23][:] = [60, 61], [60, 60, 61]  # 1.5 smallest subnormals rounds to 2 (even); 6 / 3 is 2
    offsets = np.cumsum([0] + lengths[:-1]).astype(np.int64)
    ids = np.concatenate(ids).astype(index)
    case = dict(table=table, ids=ids, offsets=offsets, mode="mean", per_sample_weights=None,
                padding_idx=None, include_last_offset=False)
    want, _ = bag_oracle(case)
    got = fe.embedding_bag(table, ids, offsets, mode="mean")
    assert_bitwise(got, want)
    subnormal = (want != 0) & (np.abs(want) < np.finfo(np.float32).tiny)
    assert subnormal.any() and np.isnan(want).any() and np.isinf(want).any()  # the cases are really there


def max_paths():
    """The float32 max's two instances: the portable vectors (hardware switch off) and, where the CPU has AVX2,
    the one with maxps."""
    had = _kernels._f16_hardware()
    _kernels._f16_hardware(True)
    paths = ["portable"] + (["avx2"] if _kernels._bf16_hardware() >= 1 else [])
    _kernels._f16_hardware(had)
    return paths


@pytest.fixture(params=max_paths())
def max_path(request):
    had = _kernels._f16_hardware()
    _kernels._f16_hardware(request.param == "avx2")
    assert (_kernels._bf16_hardware() >= 1) == (request.param == "avx2")  # the switch took
    yield request.param
    _kernels._f16_hardware(had)


@pytest.mark.parametrize("D", [1, 7, 8, 9, 15, 16, 24, 31, 32, 33, 40, 56, 64, 71])
def test_long_float32_maxes_are_sequential_across_chunks_and_column_tails(D, max_path):
    """A float32 max holds a bag's running max and argmax in registers, up to 64 rows and 32 (then 16, 8, then
    1) columns at a time: bags of 0 to 200 rows of small integers (ties everywhere, -0.0 against +0.0), NaNs in
    first and later rows, padding and stale NaNs in out still give the sequential loop's values and argmax
    bitwise: strictly greater wins, a NaN in the running max stays, a later NaN never wins. Both instances of
    the register loop (portable vectors, AVX2 maxps)."""
    rng = np.random.default_rng(100 + D)
    V = 40
    table = rng.choice(np.array([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0], np.float32), (V, D))
    nan_bits = (0x7FC00000 + np.arange(1, 9, dtype=np.uint32) * 0x1001).view(np.float32)  # payloads must survive
    for row in range(4, 8):  # rows 4..7: NaNs in some of their columns (each column of one of them at least)
        cols = rng.random(D) < 0.5
        cols[row % D] = True
        table[row, cols] = nan_bits[rng.integers(0, 8, cols.sum())]
    table[8:10] = -0.0  # a bag of them ties -0.0 against +0.0 only at the first row's sign
    table[10] = 0.0
    table[V - 1] = np.where(rng.random(D) < 0.5, 3.0, -3.0).astype(np.float32)  # beats every row but itself
    # a chunk is 64 rows: bags that end just before, at and after one, and that fill two and three of them
    lengths = [0, 1, 2, 15, 16, 17, 31, 32, 33, 50, 3, 70, 66, 5, 40, 63, 64, 65, 128, 129, 200]
    ids = [rng.integers(0, V, n) for n in lengths]
    ids[10] = np.array([8, 10, 9])  # -0.0 first, +0.0 later: -0.0 stays (0.0 > -0.0 is false)
    ids[11][0], ids[12][0] = 4, 5  # NaN in the first row: those columns stay NaN whatever follows
    ids[12][64] = 6  # a NaN row opening the bag's second chunk
    ids[13][:] = rng.integers(11, V, 5)  # no NaN row: every later row competes
    ids[17][:] = rng.integers(11, V - 1, 65)  # nor here: the second chunk's one row moves some columns, not others
    ids[17][64] = ids[18][64] = V - 1  # the first row of a later chunk wins half the columns
    offsets = np.cumsum([0] + lengths[:-1]).astype(np.int64)
    ids = np.concatenate(ids).astype(np.int64)
    case = dict(table=table, ids=ids, offsets=offsets, mode="max", per_sample_weights=None,
                padding_idx=None, include_last_offset=False)
    for pad in (None, int(ids[offsets[18] + 64]), 8):  # none; a row dropped at a chunk's start; bag 10's first
        case["padding_idx"] = pad
        want_out, want_arg = bag_oracle(case)
        assert np.isnan(want_out).any()  # the NaN rows are in the bags
        out = np.full((len(lengths), D), np.nan, np.float32)
        got_out, got_arg = fe.embedding_bag(table, ids, offsets, mode="max", padding_idx=pad, out=out,
                                            return_argmax=True)
        assert got_out is out
        assert_bitwise(got_out, want_out)
        assert_bitwise(got_arg, want_arg)
        # without the argmax the kernel computes the max alone: the same values
        out[:] = np.nan
        res, none = _kernels.embedding_bag(table, ids, offsets, "max", None, pad, False, out, argmax=False)
        assert none is None
        assert_bitwise(res, want_out)
