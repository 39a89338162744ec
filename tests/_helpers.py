"""Shared helpers and hypothesis strategies for the core test suite.

Oracles used by the tests: numpy (``table[ids]``, ``np.add.at``, ``np.unique``),
the pure-Python reference, hand-derived derivatives, float32 transcriptions of the
optimizers' formulas and, when installed, torch.
"""
import contextlib
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import fastembed as fe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds bench/ beside tests/ (not when installed alone)

# The kernels switch to the threaded, GIL-free path at this many float32 elements of work.
SERIAL_ELEMENTS = 32768

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- comparisons

def assert_bitwise(actual, expected):
    """Same shape, same dtype, same bytes (so -0.0 vs 0.0 and NaN payloads count)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    if actual.tobytes() != expected.tobytes():
        diff = np.argwhere(actual != expected)
        raise AssertionError(
            f"arrays differ bitwise at {len(diff)} places, first {diff[:5].tolist()}: "
            f"{actual[tuple(diff[0])] if len(diff) else '?'} vs {expected[tuple(diff[0])] if len(diff) else '?'}"
        )


class Snapshot:
    """Bitwise copies of arrays taken before a call, to prove the call changed nothing."""

    def __init__(self, **arrays):
        self.arrays = {k: v for k, v in arrays.items() if isinstance(v, np.ndarray)}
        self.copies = {k: (v.copy(), v.flags.writeable) for k, v in self.arrays.items()}

    def assert_unchanged(self):
        for name, arr in self.arrays.items():
            copy, writeable = self.copies[name]
            assert arr.flags.writeable == writeable, f"{name}: writeable flag changed"
            assert arr.shape == copy.shape and arr.dtype == copy.dtype, f"{name}: shape or dtype changed"
            same = arr.tobytes() == copy.tobytes()  # outside the assert: pytest would diff the bytes
            assert same, f"{name} was modified by a call that raised"


@contextlib.contextmanager
def num_threads(n):
    """Run with fe.set_num_threads(n), then restore the previous setting (the OpenMP default if it matched)."""
    before = fe.get_num_threads()
    fe.set_num_threads(n)
    try:
        yield
    finally:
        fe.set_num_threads(0)
        if fe.get_num_threads() != before:
            fe.set_num_threads(before)


def read_only(a):
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


def misaligned_float32(shape):
    """A writeable float32 array whose data pointer is not 4-byte aligned."""
    count = int(np.prod(shape))
    raw = np.zeros(count * 4 + 8, dtype=np.uint8)
    arr = np.frombuffer(raw.data, dtype=np.float32, count=count, offset=1).reshape(shape)
    assert not arr.flags.aligned and arr.flags.writeable
    return arr


# ---------------------------------------------------------------- numpy oracles

def positions_oracle(ids_shape, positions):
    """The positions gather_add uses, as an int64 array of ids_shape (written independently of fastembed)."""
    if positions is None or isinstance(positions, (int, np.integer)):
        start = 0 if positions is None else int(positions)
        if len(ids_shape) == 0:
            return np.array(start, dtype=np.int64)
        T = ids_shape[-1]
        return np.broadcast_to(np.arange(start, start + T, dtype=np.int64), ids_shape).copy()
    return np.broadcast_to(np.asarray(positions, dtype=np.int64), ids_shape).copy()


def coalesce_oracle(ids, grad_out):
    """np.unique + np.add.at into zeros: the sums in the row-major order of ids."""
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    D = grad_out.shape[-1]
    rows, inverse = np.unique(ids, return_inverse=True)
    values = np.zeros((len(rows), D), dtype=np.float32)
    np.add.at(values, inverse.reshape(-1), np.asarray(grad_out, dtype=np.float32).reshape(-1, D))
    return rows.astype(np.int64), values


# ---------------------------------------------------------------- strategies

ID_DTYPES = (np.int32, np.int64)


@st.composite
def ids_shapes(draw, max_ndim=3, max_side=6, allow_empty=True, min_ndim=0):
    ndim = draw(st.integers(min_ndim, max_ndim))
    low = 0 if allow_empty else 1
    return tuple(draw(st.integers(low, max_side)) for _ in range(ndim))


@st.composite
def id_arrays(draw, rows, shape=None, dtypes=ID_DTYPES):
    """Ids in [0, rows): sometimes drawn from a tiny pool (many duplicates, or all equal)."""
    if shape is None:
        shape = draw(ids_shapes())
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    pool = draw(st.sampled_from([rows, 1, min(2, rows), min(3, rows)]))
    offset = draw(st.integers(0, rows - pool))
    ids = rng.integers(0, pool, size=shape) + offset
    dtype = draw(st.sampled_from(dtypes))
    return np.asarray(ids, dtype=dtype)


def as_form(ids, form):
    """The same ids as another array-like: a nested list, a non-contiguous view, a small int dtype."""
    if form == "array":
        return ids
    if form == "list":
        as_list = ids.tolist()
        # a list cannot spell a zero-length leading axis, e.g. shape (0, 3): keep the array then
        return as_list if np.asarray(as_list).shape == ids.shape else ids
    if form == "strided":
        if ids.ndim == 0:
            return ids
        big = np.repeat(ids, 2, axis=-1)
        view = big[..., ::2]
        assert ids.size == 0 or not view.flags.c_contiguous or ids.shape[-1] <= 1
        return view
    if form == "uint16":
        return ids.astype(np.uint16)
    if form == "int8" and (ids.size == 0 or ids.max() < 128):
        return ids.astype(np.int8)
    return ids


ID_FORMS = ("array", "array", "list", "strided", "uint16", "int8")


def float_table(rng, rows, dim):
    return rng.standard_normal((rows, dim)).astype(np.float32)


def arrange(a, layout):
    """The same logical values as a, in another memory layout (big-endian also changes the dtype)."""
    a = np.asarray(a)
    if layout == "c":
        return a.copy(order="C")
    if layout == "fortran":
        return np.array(a, order="F", copy=True)
    if layout == "reversed":  # negative strides on every axis
        flip = (slice(None, None, -1),) * a.ndim
        return a[flip].copy(order="C")[flip]
    if layout == "strided":  # every other element of a larger buffer along the last axis
        if a.ndim == 0:
            return a.copy()
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1] + 1,), a.dtype)
        view = big[..., 1::2]
        view[...] = a
        return view
    if layout == "misaligned":  # at byte offset 1 of a uint8 buffer
        raw = np.zeros(a.nbytes + a.itemsize + 1, np.uint8)
        view = raw[1:1 + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        return view
    if layout == "readonly":
        view = a.copy()
        view.flags.writeable = False
        return view
    if layout == "bigendian":
        return a.astype(a.dtype.newbyteorder(">"))
    raise AssertionError(layout)


# ---------------------------------------------------------------- the threaded path (issue 12)

@contextlib.contextmanager
def serial_elements(n):
    """Run with the kernels' serial threshold at n (0: every call threaded, GIL released), then restore it."""
    from fastembed import _kernels
    before = _kernels._get_serial_elements()
    _kernels._set_serial_elements(n)
    try:
        yield
    finally:
        _kernels._set_serial_elements(before)


def processors():
    """The processors this process may run on (what OpenMP counts too)."""
    import os
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def two_thread_team():
    """The team a call that asks for two threads gets: 1 without OpenMP or a second processor."""
    return 2 if fe.openmp_enabled() and processors() >= 2 else 1


def at_phase(shape, phase, dtype=np.float32):
    """A zeroed C-contiguous array whose first element lies `phase` elements past a 128-byte boundary
    (an empty one has no element: its data pointer is numpy's)."""
    itemsize = np.dtype(dtype).itemsize
    count = int(np.prod(shape))
    buf = np.zeros(count + 2 * 128 // itemsize, dtype)
    skip = (-buf.ctypes.data % 128) // itemsize + phase
    arr = buf[skip:skip + count].reshape(shape)
    assert arr.flags.c_contiguous and (count == 0 or arr.ctypes.data % 128 == phase * itemsize)
    return arr


# ---------------------------------------------------------------- optimizer transcriptions

def f32(x):
    """x rounded to float32 as C's (float) cast does: 1e300 becomes inf."""
    with np.errstate(over="ignore"):
        return np.float32(x)


def adam_update(w, m, v, rows, g, lr, betas, eps, t):
    """The Adam update of w, m, v in place at step count t: every row (rows None) or the given rows,
    with g holding one row per updated row."""
    b1, b2 = betas
    lr32, b1_32, b2_32, eps32 = f32(lr), f32(b1), f32(b2), f32(eps)
    keep1, keep2 = np.float32(1) - b1_32, np.float32(1) - b2_32
    inv_bias1, inv_bias2 = f32(1.0 / (1 - b1**t)), f32(1.0 / (1 - b2**t))
    at = slice(None) if rows is None else np.asarray(rows, np.int64)
    g = np.asarray(g, np.float32)
    with np.errstate(all="ignore"):  # inf and nan are data here (an lr of inf, a grad of 0)
        md = b1_32 * m[at] + keep1 * g
        vd = b2_32 * v[at] + keep2 * (g * g)
        m[at] = md
        v[at] = vd
        w[at] = w[at] - (lr32 * (md * inv_bias1)) / (np.sqrt(vd * inv_bias2) + eps32)


def fma32(a, b, c):
    """a * b + c computed exactly and rounded once to float32 (an independent model of fmaf), for
    float32 arrays. In float64 the product is exact (24 + 24 bits); the sum is rounded, and its rounding
    error is found exactly (TwoSum). Rounding the float64 sum to float32 is then right except when it lands
    exactly on a float32 midpoint that the exact sum was not on: there the error says which way to go."""
    a, b, c = (np.asarray(x, np.float32) for x in (a, b, c))
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    with np.errstate(all="ignore"):
        s = p + c64
        bv = s - p
        err = (p - (s - bv)) + (c64 - bv)
        r = s.astype(np.float32)
        up = np.nextafter(r, np.float32(np.inf))
        down = np.nextafter(r, np.float32(-np.inf))
        mid_up = (r.astype(np.float64) + up.astype(np.float64)) / 2
        mid_down = (r.astype(np.float64) + down.astype(np.float64)) / 2
        r = np.where((s == mid_up) & (err > 0), up, r)
        r = np.where((s == mid_down) & (err < 0), down, r)
    return r.astype(np.float32)


# ---------------------------------------------------------------- multi-process tests (issue 11)

def require_gloo():
    """(torch, torch.distributed) with the gloo backend, or skip the calling test module as it is
    imported; also puts the project root on sys.path for bench/ranks.py, which starts the ranks (appended:
    an installed fastembed keeps precedence over the source tree's)."""
    torch = pytest.importorskip("torch")
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
    if ROOT not in sys.path:
        sys.path.append(ROOT)
    return torch, dist


def run_ranks(script, world, tmp, timeout, *args, expected=0, wait_for=None):
    """Run the test file ``script`` as a script in ``world`` processes, the ranks of a job, started,
    waited for (``wait_for``, default all) and killed at ``timeout`` by bench/ranks.py. Rank r's argv is
    ``r tmp package *args``, package the directory of the fastembed this process imported, whose parent
    goes first on the ranks' PYTHONPATH (the script reads its argv with `rank_argv`); its log is
    ``tmp/log<r>.txt``. The test fails, with the ends of their logs, if a rank is late or exits with
    another status than ``expected`` (as `Ranks.failures` takes it; None: the caller judges). Returns
    the `Ranks`.

    The ranks run the file as a script, not as a multiprocessing target, which they would have to import
    by the module name pytest gave it."""
    from bench import ranks  # here, not at import: a rank (a test file run as a script) may see another bench/

    package = os.path.dirname(os.path.abspath(fe.__file__))
    argv = [[sys.executable, os.path.abspath(script), str(rank), str(tmp), package, *map(str, args)]
            for rank in range(world)]
    done = ranks.run(argv, str(tmp), timeout, env=ranks.env_with_path(os.path.dirname(package)), wait_for=wait_for)
    if expected is not None:
        failures = done.failures(expected=expected)
        if failures:
            pytest.fail(f"the group of {world} ranks failed:\n" + "\n".join(failures))
    return done


def rank_argv():
    """In a rank started by `run_ranks`: (rank, tmp, *args), once it is sure to run the parent's fastembed."""
    rank, tmp, package, *args = sys.argv[1:]
    if os.path.dirname(os.path.abspath(fe.__file__)) != package:
        raise RuntimeError(f"the rank imported {fe.__file__}, the parent {package}")
    return (int(rank), tmp, *args)
