"""Hardening (issue 6): offsets past 2**31 elements (and past 2**32 bytes).

The tables are np.memmap views of sparse files of (2**31 / 64 + 1000) x 64 float32
= 2,147,547,648 elements (8.6 GB of address space, a few pages of real memory or
disk): an id times D that is computed in 32 bits would wrap and read or write
the wrong row, or outside the mapping. A few known rows are written near the end
and around the 2**31-element and 2**32-byte marks; every kernel that indexes a
table (gather, gather_add through ids and through positions, scatter_add, the
fused backward, the Adam step) is checked on them with int32 and int64 ids, on
the serial path and on the threaded one (N * D >= 32768).

Skipped when the filesystem cannot make a sparse file that large.
"""
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

import fastembed as fe
from fastembed import _kernels

D = 64
V = 2**31 // D + 1000  # V * D > 2**31
assert V * D > 2**31 and V < 2**31  # so int32 ids can name every row
# near the end, at the first row whose elements start at 2**31, around it, and at byte offset 2**32
KNOWN = np.array([V - 1, V - 2, V - 999, 2**31 // D, 2**31 // D - 1, 2**31 // D + 1, 2**32 // 4 // D], np.int64)

pytestmark = pytest.mark.skipif(sys.maxsize < 2**40, reason="needs a 64-bit address space")


def row_values(rows):
    """A distinct, exactly representable pattern for each row."""
    rows = np.asarray(rows, np.int64)
    return ((rows[:, None] % 4093) * 64 + np.arange(D)[None, :]).astype(np.float32)


@pytest.fixture(scope="module")
def workdir():
    path = tempfile.mkdtemp(prefix="fastembed-offsets-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sparse_table(directory, name, rows=V):
    """A (rows, D) float32 memmap over a sparse file of zeros, or skip."""
    path = os.path.join(directory, name)
    nbytes = rows * D * 4
    try:
        with open(path, "wb") as f:
            f.truncate(nbytes)
        if os.stat(path).st_blocks * 512 > 64 * 2**20:
            pytest.skip(f"{directory} does not make sparse files")
        return np.memmap(path, dtype=np.float32, mode="r+", shape=(rows, D))
    except (OSError, OverflowError, ValueError) as exc:
        pytest.skip(f"cannot make a {nbytes / 2**30:.1f} GiB sparse file in {directory}: {exc}")


@pytest.fixture(scope="module")
def table(workdir):
    t = sparse_table(workdir, "table.f32")
    t[KNOWN] = row_values(KNOWN)
    yield t
    del t


def ids_near_the_end(n, dtype, seed=0):
    """n ids: the known rows first, then random rows among the last 2000 (unwritten: zeros)."""
    rng = np.random.default_rng(seed)
    rest = rng.integers(V - 2000, V, size=max(0, n - len(KNOWN)))
    return np.concatenate([KNOWN, rest])[:n].astype(dtype)


def expected_rows(ids):
    """What table[ids] holds: the pattern on known rows, zeros elsewhere."""
    ids = np.asarray(ids, np.int64)
    out = np.zeros((len(ids), D), np.float32)
    known = np.isin(ids, KNOWN)
    out[known] = row_values(ids[known])
    return out


@pytest.mark.parametrize("n", [len(KNOWN), 1024])  # serial, and threaded (1024 * 64 >= 32768)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_gather_past_2_31(table, dtype, n):
    ids = ids_near_the_end(n, dtype)
    got = fe.gather(table, ids)
    np.testing.assert_array_equal(got, expected_rows(ids))
    out = np.empty((n, D), np.float32)
    assert fe.gather(table, ids, out=out) is out
    np.testing.assert_array_equal(out, expected_rows(ids))


@pytest.mark.parametrize("n", [len(KNOWN), 1024])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_gather_add_past_2_31(table, dtype, n):
    ids = ids_near_the_end(n, dtype)
    small = np.arange(n * D, dtype=np.float32).reshape(n, D)
    # the big table as token table, positions 0..n-1 of a small one
    got = fe.gather_add(table, small, ids)
    np.testing.assert_array_equal(got, expected_rows(ids) + small)
    # the big table as position table: an int64 positions array and an int start near the end
    tok_ids = np.arange(n, dtype=dtype)
    got = fe.gather_add(small, table, tok_ids, positions=ids.astype(np.int64))
    np.testing.assert_array_equal(got, small + expected_rows(ids))
    start = V - n
    got = fe.gather_add(small, table, tok_ids, positions=start)
    np.testing.assert_array_equal(got, small + expected_rows(np.arange(start, V)))


@pytest.mark.parametrize("n", [len(KNOWN), 1024])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_scatter_add_past_2_31(workdir, dtype, n):
    grad = sparse_table(workdir, f"grad-{np.dtype(dtype).name}-{n}.f32")
    try:
        ids = ids_near_the_end(n, dtype, seed=1)
        src = np.ones((n, D), np.float32)
        fe.scatter_add(grad, ids, src)
        counts = np.zeros(V, np.int64)
        np.add.at(counts, ids.astype(np.int64), 1)
        touched = np.unique(ids.astype(np.int64))
        np.testing.assert_array_equal(grad[touched], np.repeat(counts[touched, None], D, axis=1).astype(np.float32))
        # a row that was not named stays zero (the page of a wrapped offset would not)
        assert not grad[V - 2001].any() and not grad[0].any()
    finally:
        del grad


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_gather_add_backward_past_2_31(workdir, dtype):
    tgrad = sparse_table(workdir, f"tgrad-{np.dtype(dtype).name}.f32")
    pgrad = sparse_table(workdir, f"pgrad-{np.dtype(dtype).name}.f32")
    try:
        n = 1024
        ids = ids_near_the_end(n, dtype, seed=2)
        grad_hidden = np.tile(np.arange(1, n + 1, dtype=np.float32)[:, None], (1, D))
        start = V - n
        fe.gather_add_backward(grad_hidden, ids, tgrad, pgrad, positions=start)
        expected = np.zeros(V, np.float64)
        np.add.at(expected, ids.astype(np.int64), np.arange(1, n + 1))
        touched = np.unique(ids.astype(np.int64))
        np.testing.assert_array_equal(tgrad[touched, 0], expected[touched].astype(np.float32))
        np.testing.assert_array_equal(pgrad[start:, 0], np.arange(1, n + 1, dtype=np.float32))
        np.testing.assert_array_equal(pgrad[start:, D - 1], np.arange(1, n + 1, dtype=np.float32))
        assert not pgrad[start - 1].any()
    finally:
        del tgrad, pgrad


def test_adam_step_past_2_31(workdir):
    """The fused Adam step on sorted rows near the end of (V, 64) weight and moments."""
    w = sparse_table(workdir, "w.f32")
    m = sparse_table(workdir, "m.f32")
    v = sparse_table(workdir, "v.f32")
    try:
        rows = np.unique(KNOWN)
        w[rows] = 1.0
        grad = np.ones((len(rows), D), np.float32)
        _kernels.adam_step(w, m, v, grad, rows, 0.1, 0.9, 0.999, 1e-8, 1 - 0.9, 1 - 0.999)
        # first step: m = 0.1, v = 0.001; the bias-corrected update is lr * 1 / (1 + eps)
        np.testing.assert_allclose(w[rows], 0.9, rtol=1e-6)
        np.testing.assert_allclose(m[rows], 0.1, rtol=1e-6)
        np.testing.assert_allclose(v[rows], 0.001, rtol=1e-4)  # (1 - 0.999) in float32
        assert not m[rows[0] - 1].any() and not m[V - 3].any()
    finally:
        del w, m, v


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_coalesce_of_ids_past_2_31_over_64(dtype):
    ids = ids_near_the_end(64, dtype)
    grad_out = np.ones((64, 3), np.float32)
    rows, values = fe.coalesce(ids, grad_out)
    expected_rows, counts = np.unique(ids.astype(np.int64), return_counts=True)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(values[:, 0], counts.astype(np.float32))
