"""sgd_scatter (SGD straight from a lookup's gradient, no coalesce) and sgd_step's fma mode.

Oracles written here, independent of the kernels:
- numpy rounding: one lookup after another, ``w[r] = w[r] - f32(lr) * g[i]`` (a Python loop in ids order);
- torch rounding (fma=True): the same loop with ``fma32(-f32(lr), g[i], w[r])`` (tests/_helpers.py, an
  exact-arithmetic model of one rounding), and torch.optim.SGD itself when torch is installed.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastembed import _kernels
from _helpers import (FAST, ID_DTYPES, Snapshot, assert_bitwise, fma32, num_threads, read_only,
                      serial_elements, two_thread_team)

f32 = np.float32


def sequential(w, ids, g, lr, fma):
    """w after SGD on each lookup in turn (a new array)."""
    w = w.copy()
    g = np.asarray(g, f32).reshape(np.asarray(ids).size, w.shape[1])
    with np.errstate(all="ignore"):
        for i, r in enumerate(np.asarray(ids).ravel()):
            w[r] = fma32(-f32(lr), g[i], w[r]) if fma else w[r] - f32(lr) * g[i]
    return w


@st.composite
def problems(draw):
    """(w, ids, g): V from 1, D from 0 (and past one 128-byte line), ids of any shape with repeats."""
    V, D = draw(st.integers(1, 12)), draw(st.one_of(st.integers(0, 70), st.just(1)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
    hot = draw(st.booleans())  # few distinct ids: many repeats of one row
    ids = rng.integers(0, min(V, 2) if hot else V, size=shape).astype(draw(st.sampled_from(ID_DTYPES)))
    w = rng.standard_normal((V, D)).astype(f32)
    g = (rng.standard_normal(shape + (D,)) * 10.0 ** rng.integers(-4, 3)).astype(f32)
    return w, ids, g


@FAST
@given(problem=problems(), lr=st.sampled_from([0.1, 0.01, 3.0, 0.0, 1e-30]), fma=st.booleans(),
       threaded=st.booleans(), flat=st.booleans())
def test_sgd_scatter_is_one_update_per_lookup_in_ids_order(problem, lr, fma, threaded, flat):
    w0, ids, g = problem
    expected = sequential(w0, ids, g, lr, fma)
    w = w0.copy()
    if flat:  # a sparse COO gradient's (indices[0], values)
        ids, g = ids.reshape(ids.size), g.reshape(ids.size, w.shape[1])
    if threaded:
        with serial_elements(0), num_threads(2):
            _kernels.sgd_scatter(w, ids, g, lr, fma=fma)
            assert _kernels._last_call_released_gil()  # (the team's size is checked below, at a wide D)
    else:
        _kernels.sgd_scatter(w, ids, g, lr, fma=fma)
    assert_bitwise(w, expected)


def test_fma_and_numpy_rounding_differ_and_each_is_the_one_asked_for():
    """Values chosen so w - (lr * g) rounds twice differently from fma(-lr, g, w): a mutant that swaps
    the modes, or ignores fma, fails here whatever hypothesis draws."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 64)).astype(f32)
    g = rng.standard_normal((4, 64)).astype(f32)
    ids = np.array([0, 1, 2, 3, 1], np.int64)
    grads = np.concatenate([g, g[1:2]])
    plain, fused = sequential(w, ids, grads, 0.1, False), sequential(w, ids, grads, 0.1, True)
    assert not np.array_equal(plain, fused)  # the inputs do tell the two roundings apart
    for fma, expected in ((False, plain), (True, fused)):
        got = w.copy()
        _kernels.sgd_scatter(got, ids, grads, 0.1, fma=fma)
        assert_bitwise(got, expected)
        got = w.copy()
        _kernels.sgd_step(got, g, None, 0.1, fma=fma)
        assert_bitwise(got, sequential(w, np.arange(4), g, 0.1, fma))
        got = w.copy()
        _kernels.sgd_step(got, g[[1, 3]], np.array([1, 3], np.int64), 0.1, fma=fma)
        assert_bitwise(got, sequential(w, np.array([1, 3]), g[[1, 3]], 0.1, fma))


def test_thread_counts_give_the_same_bits():
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((50, 200)).astype(f32)
    ids = rng.integers(0, 5, 400)  # many repeats: each row sees its updates in order on any thread
    g = rng.standard_normal((400, 200)).astype(f32)
    results = []
    for threads in (1, 2):
        w = w0.copy()
        with serial_elements(0), num_threads(threads):
            _kernels.sgd_scatter(w, ids, g, 0.3, fma=True)
            assert _kernels._last_call_threads() == (two_thread_team() if threads == 2 else 1)
        results.append(w)
    assert_bitwise(results[0], results[1])
    assert_bitwise(results[0], sequential(w0, ids, g, 0.3, True))


@pytest.mark.parametrize("fma", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_id_the_same_row_moves_it_once_per_lookup(fma, threads):
    """The worst case for a scatter: 300 lookups of one row (the last one, at the boundary), each a
    separate update in order; the other rows keep their bits."""
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((4, 96)).astype(f32)
    ids = np.full(300, 3, np.int32)
    g = rng.standard_normal((300, 96)).astype(f32)
    w = w0.copy()
    with serial_elements(0), num_threads(threads):
        _kernels.sgd_scatter(w, ids, g, 0.01, fma=fma)
    assert_bitwise(w, sequential(w0, ids, g, 0.01, fma))
    assert_bitwise(w[:3], w0[:3])


def test_empty_ids_change_nothing():
    w = np.ones((3, 4), f32)
    _kernels.sgd_scatter(w, np.zeros(0, np.int64), np.zeros((0, 4), f32), 0.5)
    _kernels.sgd_scatter(w, np.zeros((2, 0), np.int32), np.zeros((2, 0, 4), f32), 0.5, fma=True)
    assert_bitwise(w, np.ones((3, 4), f32))


def _bad_cases():
    def good():
        return np.zeros((5, 3), f32), np.array([0, 4, 4], np.int64), np.ones((3, 3), f32)
    cases = []
    for name, ids, err in (("id == rows", [0, 5, 1], IndexError), ("id == -1", [0, -1, 1], IndexError),
                           ("float ids", [0.0, 1.0, 2.0], TypeError)):
        cases.append((name, lambda ids=ids: (good()[0], np.array(ids), good()[2], 0.1), err))
    cases += [
        ("grad float64", lambda: (good()[0], good()[1], np.ones((3, 3)), 0.1), TypeError),
        ("grad rows", lambda: (good()[0], good()[1], np.ones((2, 3), f32), 0.1), ValueError),
        ("grad dim", lambda: (good()[0], good()[1], np.ones((3, 4), f32), 0.1), ValueError),
        ("weight float64", lambda: (np.zeros((5, 3)), good()[1], good()[2], 0.1), TypeError),
        ("weight read-only", lambda: (read_only(good()[0]), good()[1], good()[2], 0.1), ValueError),
        ("weight 1-D", lambda: (np.zeros(5, f32), good()[1], good()[2], 0.1), ValueError),
        ("negative lr", lambda: good() + (-0.1,), ValueError),
    ]
    return cases


@pytest.mark.parametrize("name,make,error", _bad_cases(), ids=[c[0] for c in _bad_cases()])
@pytest.mark.parametrize("fma", [False, True])
@pytest.mark.parametrize("check_only", [False, True])
def test_bad_input_raises_and_writes_nothing(name, make, error, fma, check_only):
    w, ids, g, lr = make()
    if w.flags.writeable:
        w[...] = np.arange(w.size, dtype=w.dtype).reshape(w.shape)
    snap = Snapshot(w=w, ids=ids, g=g)
    with pytest.raises(error):
        _kernels.sgd_scatter(w, ids, g, lr, fma=fma, check_only=check_only)
    snap.assert_unchanged()


def test_check_only_writes_nothing():
    w = np.arange(15, dtype=f32).reshape(5, 3)
    _kernels.sgd_scatter(w, np.array([0, 4, 4]), np.ones((3, 3), f32), 0.5, check_only=True)
    assert_bitwise(w, np.arange(15, dtype=f32).reshape(5, 3))
    _kernels.sgd_scatter(w, np.array([0, 4, 4]), np.ones((3, 3), f32), 0.5)
    assert w[4, 0] == 12 - 1.0 and w[0, 0] == -0.5  # the same call without check_only does move


def test_weight_and_grad_sharing_memory_is_refused():
    buf = np.ones((6, 3), f32)
    with pytest.raises(ValueError, match="overlap|share"):
        _kernels.sgd_scatter(buf, np.array([0, 1, 2]), buf[3:], 0.1)
    assert_bitwise(buf, np.ones((6, 3), f32))


def test_matches_torch_sgd_bitwise_on_an_uncoalesced_sparse_gradient():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    w0 = rng.standard_normal((30, 33)).astype(f32)
    ids = rng.integers(0, 30, 500)
    g = rng.standard_normal((500, 33)).astype(f32)
    param = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    param.grad = torch.sparse_coo_tensor(torch.from_numpy(ids)[None], torch.from_numpy(g), (30, 33))
    torch.optim.SGD([param], lr=0.05).step()
    w = w0.copy()
    _kernels.sgd_scatter(w, ids, g, 0.05, fma=True)
    assert_bitwise(w, param.detach().numpy())
    dense = rng.standard_normal((30, 33)).astype(f32)
    param = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    param.grad = torch.from_numpy(dense)
    torch.optim.SGD([param], lr=0.05).step()
    w = w0.copy()
    _kernels.sgd_step(w, dense, None, 0.05, fma=True)
    assert_bitwise(w, param.detach().numpy())
