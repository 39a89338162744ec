"""The benchmark suite runs end to end in quick mode: tables with the expected rows, a JSON file.

These tests check that `python -m bench` works, never how fast anything is. The
suite runs in a subprocess (it sets thread counts that must not leak into other
tests); they skip where bench/ is absent (tests run from a copy of tests/ alone).
"""
import functools
import glob
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import fastembed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isfile(os.path.join(ROOT, "bench", "__init__.py")):
    pytest.skip("bench/ is not beside tests/ (a copy of the tests alone)", allow_module_level=True)
if ROOT not in sys.path:
    sys.path.append(ROOT)  # appended: an installed fastembed keeps precedence over the source folder

from bench import bag, cases, memlimit, report, shapes, targets, threads, train  # noqa: E402
from bench.memlimit import OVERHEAD_NAME  # noqa: E402
from bench.timing import Method  # noqa: E402

HAS_TORCH = importlib.util.find_spec("torch") is not None


def run_bench(tmp_path, *argv):
    """Run `python -m bench --quick` from the repo root; return (stdout, the JSON document it wrote)."""
    out_dir = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench", "--quick", "--no-plot", "--output", str(out_dir), *argv]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = glob.glob(os.path.join(str(out_dir), "bench-*.json"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        return proc.stdout, json.load(f)


def table_rows(text, shape):
    """(op, method, threads) of every row of a shape's markdown table (threads as printed: "1", "1-2", "<=2")."""
    section = text.split(f"### {shape}:")[1].split("###")[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 3 and cells[0] not in ("op", "---"):
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def fastembed_reads_back(n):
    """The thread count fastembed uses when set to n (capped at the processors; 1 without OpenMP)."""
    before = fastembed.get_num_threads()
    try:
        fastembed.set_num_threads(n)
        return fastembed.get_num_threads()
    finally:
        fastembed.set_num_threads(before)


def test_seed_default_rows_json_and_targets(tmp_path):
    text, doc = run_bench(tmp_path, "--no-torch")
    for shape in ("seed-1x16", "seed-32x16"):
        rows = table_rows(text, shape)
        names = {(op, method) for op, method, _ in rows}
        for op in cases.KERNEL_OPS:
            assert (op, "fastembed") in names
            # A few hundred KB at most: the add is numpy's call overhead, named so, and no "memory limit".
            assert (op, "numpy call overhead (np.add on the same bytes)") in names
            assert (op, "memory limit") not in names
        assert ("forward", "numpy tok[ids] + pos[p]") in names
        assert ("backward", "numpy np.add.at") in names
        assert ("sparse", "numpy unique + np.add.at") in names
        assert ("forward", "reference (Values)") in names and ("backward", "reference backward()") in names
        # Without torch, train has the numpy API's rows alone (dense Adam included: 597 x 32 is small).
        assert {m for op, m in names if op == "train"} - {OVERHEAD_NAME} == (
            {train.numpy_row_name(g) for g in train.GROUPS}
            | {train.numpy_lookups_row_name(g) for g in train.NUMPY_FUSED_GROUPS}
            | {train.numpy_fused_row_name(g) for g in train.NUMPY_FUSED_GROUPS})
        assert not any("torch" in m or "FBGEMM" in m for _, m in names)
        # At most 32 x 16 ids of dim 32 (16,384 elements) and a 597 x 32 table (19,104): every fastembed
        # call is below the 32,768-element serial threshold, and every other method is one thread.
        assert {t for _, _, t in rows} == {"1"}
    seed_rows = [r for r in doc["results"] if r["shape"].startswith("seed")]
    assert all(r["vs_memory"] is None for r in seed_rows)
    # The op bag runs when asked (or with --all): not in the default run, not even as a note.
    assert doc["args"]["ops"] == list(cases.DEFAULT_OPS) and "bag" not in {r["op"] for r in doc["results"]}
    assert not any(n.startswith("bag") for n in doc["notes"]) and "### bag targets" not in text
    assert "medium" not in {r["shape"] for r in doc["results"]}
    env = doc["environment"]
    for key in ("python", "numpy", "torch", "fastembed", "cpu_count", "threads"):
        assert key in env
    assert env["torch"] is None
    targets_found = {t["target"]: t["status"] for t in doc["targets"]}
    assert {s for t, s in targets_found.items() if not t.startswith("train:")} <= {"PASS", "MISS"}
    for t in doc["targets"]:  # a train target needs a torch or FBGEMM row, none of which ran
        if t["target"].startswith("train:"):
            assert t["status"] == "SKIPPED" and ("torch" in t["note"] or "FBGEMM" in t["note"]), t
    assert "seed forward, one sentence" in targets_found and "seed fused backward into both tables" in targets_found
    assert any("--no-torch" in n for n in doc["notes"])
    assert "adapter: skipped: every row needs PyTorch [seed-1x16, seed-32x16]" in doc["notes"]
    assert "train: torch, fastembed.torch and FBGEMM rows: skipped (no PyTorch in this run) [seed-1x16, seed-32x16]" \
        in doc["notes"]
    checks = {(r["op"], r["method"]): r["check"] for r in doc["results"] if r["shape"] == "seed-1x16"}
    assert checks[("forward", "numpy tok[ids] + pos[p]")] == "bitwise"
    assert checks[("backward", "numpy np.add.at")] == "bitwise"


def test_all_scaled_has_every_shape_threads_and_skipped_torch_targets(tmp_path):
    text, doc = run_bench(tmp_path, "--all", "--scale", "0.01", "--no-torch", "--threads", "2")
    threaded = fastembed_reads_back(2) == 2  # OpenMP and two processors: else everything is 1 thread
    for shape in ("medium", "wide-uniform", "wide-zipf"):
        rows = table_rows(text, shape)
        assert {(op, "fastembed", "1") for op in ("forward", "backward", "sparse", "step-sparse")} <= set(rows)
        # Scaled by 0.01: forward and backward move less than 1 MiB (numpy's call overhead, one thread);
        # the dense step rewrites whole tables and moves more (a memory limit per thread count).
        assert ("forward", "numpy call overhead (np.add on the same bytes)", "1") in rows
        assert ("step-dense", "memory limit", "1") in rows
        if threaded:
            # medium: 8 x 10 ids of dim 768 (61,440 elements); wide: 64 x 10 of dim 64 (40,960): both past
            # 32,768, so forward and backward split; a step's position-table Adam (10 rows) stays on one.
            assert {(op, "fastembed", "2") for op in ("forward", "backward", "sparse")} <= set(rows)
            assert {("step-sparse", "fastembed", "1-2"), ("step-dense", "fastembed", "1-2")} <= set(rows)
            assert ("step-dense", "memory limit", "2") in rows
    for r in doc["results"]:
        if r["family"] in ("memory", "overhead"):
            assert (r["family"] == "memory") == (r["bytes"] >= 2**20), r
        if r["family"] != "fastembed" and r["family"] != "memory":
            assert r["threads"] == "1"  # numpy, the reference, the call overhead (no torch here)
    assert {s["name"] for s in doc["shapes"]} == {s.name for s in shapes.ALL_SHAPES}
    # --all runs bag too: at the big shapes the numpy API row of every case (no torch here), at the seed
    # shapes nothing but a note.
    for shape in bag.SHAPES:
        bag_rows = {(r["group"], r["method"]) for r in doc["results"] if (r["shape"], r["op"]) == (shape, "bag")}
        assert {g for g, m in bag_rows if m == bag.NUMPY_ROW} == {
            bag.group_name(d, n, m) for d in bag.DIRECTIONS for n in bag.BAG_SIZES for m in bag.MODES}
        assert {m for _, m in bag_rows} == {bag.NUMPY_ROW, memlimit.OVERHEAD_NAME}
    assert not [r for r in doc["results"] if r["op"] == "bag" and r["shape"].startswith("seed")]
    assert "bag: torch, fastembed.torch and FBGEMM rows: skipped (no PyTorch in this run) [medium, wide-uniform, " \
        "wide-zipf]" in doc["notes"]
    assert any(n.startswith("bag: skipped: measured at medium, wide-uniform, wide-zipf only") and "seed-1x16" in n
               for n in doc["notes"])
    if threaded:
        scaling = doc["thread_scaling"]
        assert len(scaling) == 12 and all(s["bitwise"] for s in scaling)
        assert "### fastembed threads: 1 vs 2" in text
        assert {s["ran"] for s in scaling if s["op"] == "step-sparse"} == {"1-2"}
    elif not fastembed.openmp_enabled():
        assert "skipped: fastembed at 2 threads (built without OpenMP" in text
    by_target = {}
    for t in doc["targets"]:
        by_target.setdefault(t["target"], []).append(t)
    forward_limit = by_target["forward within 1.25x of the memory limit, same threads"]
    assert len(forward_limit) == 3 and all(t["status"] == "SKIPPED" and "too few bytes" in t["note"]
                                           for t in forward_limit)
    torch_backward = by_target["dense backward no slower than torch index_add_, same threads"]
    assert len(torch_backward) == 3 and all(t["status"] == "SKIPPED" for t in torch_backward)
    add_at = by_target["dense backward >= 20x faster than np.add.at, both on 1 thread"]
    assert len(add_at) == 3 and all(t["status"] != "SKIPPED" and "scaled" in t["note"] for t in add_at)
    assert all("fastembed [1 thread] vs numpy np.add.at [1 thread]" in t["note"] for t in add_at)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
def test_torch_rows_are_checked_equal(tmp_path):
    _, doc = run_bench(tmp_path, "--shapes", "seed-1x16", "--ops", "forward,backward,sparse", "--threads", "2")
    torch_rows = [r for r in doc["results"] if r["family"] == "torch"]
    assert {r["method"] for r in torch_rows} >= {"torch F.embedding", "torch index_add_",
                                                 "torch sparse grad + coalesce()"}
    assert all(r["check"] == "bitwise" or r["check"].startswith("close") for r in torch_rows)
    assert all(r["vs_torch"] is not None for r in doc["results"])
    # torch runs at fastembed's count (2, or 1 where fastembed caps it) and splits an op or not as it
    # sees fit: an upper bound, never a plain "2".
    assert {r["threads"] for r in torch_rows} == {"<=2" if fastembed_reads_back(2) == 2 else "1"}
    assert doc["environment"]["torch_threads"] == fastembed_reads_back(2)


def test_a_method_that_computes_something_else_fails_the_check():
    data = shapes.make_data(shapes.SEED_SHAPES[0])
    ctx = cases.Context(threads=1, fe_threads=(1,))
    case = cases.build_case(data, "forward", ctx)
    wrong = lambda: (data.token_table[data.ids] - data.position_table[data.positions],)  # noqa: E731
    case.methods.append(Method("numpy, wrong sign", "numpy", run=wrong, result=wrong))
    with pytest.raises(cases.CheckError, match="wrong sign"):
        cases.verify(case, ctx)


def _run_recording_threads(limit, monkeypatch):
    """Call limit once with c poisoned; return its output and the threads that ran an add, one per chunk."""
    ran = []
    real_add = memlimit._add

    def add(a, b, c):
        ran.append(threading.get_ident())
        real_add(a, b, c)

    monkeypatch.setattr(memlimit, "_add", add)
    limit.c[...] = np.nan  # a chunk left unadded stays nan
    return limit(), ran


def test_memory_limit_adds_what_it_reads_on_the_threads_it_names(monkeypatch):
    nbytes = 3 * 2**20
    limit = memlimit.MemoryLimit(nbytes, threads=2)
    out, ran = _run_recording_threads(limit, monkeypatch)
    expected = (limit.a.astype(np.float64) + limit.b.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    assert out is limit.c
    # Bytes: the three arrays the add reads and writes, counted from the arrays themselves.
    moved = sum(x.nbytes for x in (limit.a, limit.b, limit.c))
    assert abs(moved * limit.scale - nbytes) < 1 and limit.scale == pytest.approx(1.0, abs=1e-5)
    assert sum(a.nbytes + b.nbytes + c.nbytes for a, b, c in limit.chunks) == moved
    # Past 1 MiB it splits: one chunk per thread, on distinct threads, as its threads column says.
    assert len(ran) == 2 and len(set(ran)) == 2 and threading.get_ident() in ran
    data = shapes.make_data(shapes.SEED_SHAPES[0])
    method = Method("memory limit", "memory", run=limit)
    assert cases.threads_ran(method, "forward", data) == "2"


def test_memory_limit_is_capped_and_scaled_past_its_cap(monkeypatch):
    monkeypatch.setattr(memlimit, "CAP_BYTES", 2**21)
    nbytes = 5 * 2**21
    limit = memlimit.MemoryLimit(nbytes, threads=1)
    out, ran = _run_recording_threads(limit, monkeypatch)
    np.testing.assert_array_equal(out, limit.a + np.float32(0.5))
    moved = sum(x.nbytes for x in (limit.a, limit.b, limit.c))
    assert moved <= 2**21 and moved * limit.scale == pytest.approx(nbytes)
    assert ran == [threading.get_ident()]


def test_seed_case_has_call_overhead_and_one_thread_labels(monkeypatch):
    data = shapes.make_data(shapes.SEED_SHAPES[1])
    ctx = cases.Context(threads=2, fe_threads=(2,))  # set to 2, as a 2-CPU run is
    for op in cases.KERNEL_OPS:
        case = cases.build_case(data, op, ctx)
        by_family = {}
        for m in case.methods:
            by_family.setdefault(m.family, []).append(m)
        assert "memory" not in by_family
        [overhead] = by_family["overhead"]
        assert overhead.name == "numpy call overhead (np.add on the same bytes)" and not overhead.anchor
        # The add really runs on the calling thread alone, as its "1" says.
        out, ran = _run_recording_threads(overhead.run, monkeypatch)
        assert ran == [threading.get_ident()]
        assert overhead.ran == "1"
        # Set to 2 but below the serial threshold: fastembed ran on one thread.
        assert [m.ran for m in by_family["fastembed"]] == ["1"] * len(by_family["fastembed"])
        for m in case.methods:
            m.samples_ns = [1000.0]
        assert all(r["vs_memory"] is None for r in report.case_rows(case))
        assert all(r["threads"] == "1" and r["threads_set"] in (1, 2) for r in report.case_rows(case))


def test_forward_traffic_counts_the_arrays_it_reads_and_writes():
    for shape in shapes.SEED_SHAPES + (shapes.Shape("t", 3000, 64, 48, 7, 40, ids="zipf"),):
        data = shapes.make_data(shape)
        out = fastembed.gather_add(data.token_table, data.position_table, data.ids)
        tok_rows = data.token_table[np.unique(data.ids)]
        pos_rows = data.position_table[np.unique(data.positions)]
        expected = data.ids.nbytes + tok_rows.nbytes + pos_rows.nbytes + out.nbytes
        assert cases.traffic("forward", data) == expected


@pytest.mark.parametrize("kind,tokens,dim", [
    ("rows", 1023, 32), ("rows", 1024, 32), ("rows", 512, 64), ("rows", 511, 64), ("rows", 4096, 8),
    ("cols", 1024, 32), ("cols", 4096, 32), ("cols", 512, 64), ("cols", 511, 64), ("cols", 400, 96),
])
def test_thread_labels_are_what_the_kernels_run(kind, tokens, dim):
    """The labels' copy of the rule against the team each kernel call really ran with (its private
    hook, measured inside the parallel region), at the default threshold and the machine's threads."""
    from fastembed import _kernels

    assert _kernels._get_serial_elements() == threads.SERIAL_ELEMENTS
    rng = np.random.default_rng(tokens + dim)
    table = np.zeros((97, dim), np.float32)
    ids = rng.integers(0, 97, size=tokens)
    n = fastembed.get_num_threads()
    if kind == "rows":
        fastembed.gather(table, ids)
        expected = threads.threads_for(tokens * dim, n)
    else:
        fastembed.scatter_add(table, ids, np.ones((tokens, dim), np.float32))
        expected = threads.column_threads(tokens, dim, n)
    assert _kernels._last_call_threads() == expected


def test_thread_labels_follow_the_serial_threshold():
    assert threads.threads_for(32767, 2) == 1 and threads.threads_for(32768, 2) == 2
    assert threads.threads_for(10**6, 1) == 1
    assert threads.column_threads(1024, 32, 2) == 1  # 32,768 elements but one 128-byte column block
    assert threads.column_threads(512, 64, 2) == 2 and threads.column_threads(511, 64, 2) == 1
    assert threads.column_threads(4096, 768, 8) == 8 and threads.column_threads(4096, 96, 8) == 3
    # 64 x 16 ids of dim 64: 65,536 elements (split); the position table's Adam touches 16 x 64 = 1,024.
    data = shapes.make_data(shapes.Shape("t", 5000, 16, 64, 64, 16))
    assert threads.fastembed_counts("forward", data, 2) == [2]
    assert threads.fastembed_counts("step-sparse", data, 2) == [1, 2]
    assert threads.label([1, 2]) == "1-2" and threads.label([2, 2]) == "2"
    ctx = cases.Context(threads=2, fe_threads=(2, 1))
    case = cases.build_case(data, "step-sparse", ctx)
    assert {(m.family, m.threads): m.ran for m in case.methods if m.family == "fastembed"} == {
        ("fastembed", 2): "1-2", ("fastembed", 1): "1"}
    assert threads.torch_label(2) == "<=2" and threads.torch_label(1) == "1"


def test_progress_bar_only_on_a_terminal():
    from bench.run import Progress

    made = []

    class FakeBar:
        n = 0

        def __init__(self, **kwargs):
            made.append(kwargs)

        def __getattr__(self, name):
            return lambda *a, **k: None

    fake_tqdm = types.SimpleNamespace(tqdm=FakeBar)
    log = io.StringIO()  # a file or a pipe: isatty() is False
    p = Progress(fake_tqdm, quiet=False, cases=2, stream=log)
    for k in (1, 2):
        p.case(k, 2, f"case {k}")
        p.expect(3)
        for _ in range(3):
            p.tick()
    p.close()
    assert made == [] and log.getvalue().splitlines() == ["[1/2] case 1", "[2/2] case 2"]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    Progress(fake_tqdm, quiet=False, cases=2, stream=Terminal())
    assert len(made) == 1 and made[0]["total"] == 2
    Progress(fake_tqdm, quiet=True, cases=2, stream=Terminal())
    assert len(made) == 1


def row(shape, op, family, method, ns, threads_set=2, ran=None, anchor=True):
    """A result row as report.case_rows makes it, with only what targets.judge reads."""
    return {"shape": shape, "op": op, "family": family, "method": method, "threads_set": threads_set,
            "threads": ran or str(threads_set), "anchor": anchor, "median_ns": ns}


def test_targets_pass_miss_and_skipped():
    rows = [row("seed-1x16", "forward", "fastembed", "fastembed", 400.0, ran="1"),
            row("seed-1x16", "forward", "numpy", "numpy tok[ids] + pos[p]", 1000.0, threads_set=1)]
    verdicts = {v.target: v for v in targets.judge(rows, [], ["seed-1x16"])}
    assert verdicts["seed forward, one sentence"].status == "PASS"
    assert verdicts["seed forward vs numpy tok[ids] + pos[p]"].status == "MISS"  # 0.4x > 0.25x
    assert "fastembed [1 thread] vs numpy tok[ids] + pos[p] [1 thread]" in \
        verdicts["seed forward vs numpy tok[ids] + pos[p]"].note
    assert verdicts["seed fused backward into both tables"].status == "SKIPPED"
    assert all(v.shape == "seed-1x16" for v in verdicts.values())  # shapes not run are left out


def test_sparse_step_target_is_against_torch_sparse_adam():
    shape = "wide-uniform"
    fe_main = row(shape, "step-sparse", "fastembed", "fastembed", 40.0)
    fe_one = row(shape, "step-sparse", "fastembed", "fastembed", 70.0, threads_set=1, anchor=False)
    sparse_adam = row(shape, "step-sparse", "torch", "torch nn.Embedding + SparseAdam", 100.0, ran="<=2")
    dense_adam = row(shape, "step-dense", "torch", "torch nn.Embedding + Adam", 1000.0, ran="<=2")

    def step_verdicts(rows):
        return [v for v in targets.judge(rows, [], [shape]) if v.target.startswith("training step")]

    judged, info = step_verdicts([fe_main, fe_one, sparse_adam, dense_adam])
    assert "nn.Embedding(sparse=True) + SparseAdam" in judged.target
    assert (judged.measured, judged.status) == ("0.4x", "PASS")  # 40 / 100, against the SparseAdam row
    assert "torch nn.Embedding + SparseAdam [<=2 threads]" in judged.note
    assert (info.measured, info.status, info.limit) == ("0.04x", "INFO", "-")  # dense Adam: shown, not judged
    judged, _ = step_verdicts([fe_main, fe_one, row(shape, "step-sparse", "torch", "torch nn.Embedding + SparseAdam",
                                                    50.0, ran="<=2")])
    assert (judged.measured, judged.status) == ("0.8x", "MISS")
    # Without the SparseAdam row there is nothing like-for-like to judge: the dense row does not stand in.
    judged, info = step_verdicts([fe_main, fe_one, dense_adam])
    assert judged.status == "SKIPPED" and info.status == "INFO"
    # torch at 1 thread: fastembed's 1-thread row is the one compared.
    judged, _ = step_verdicts([fe_main, fe_one, row(shape, "step-sparse", "torch", "torch nn.Embedding + SparseAdam",
                                                    100.0, threads_set=1, ran="1")])
    assert judged.measured == "0.7x" and "fastembed [1 thread]" in judged.note


def test_big_targets_compare_equal_thread_counts():
    shape = "medium"
    rows = [row(shape, "backward", "fastembed", "fastembed", 1.0),
            row(shape, "backward", "fastembed", "fastembed", 10.0, threads_set=1, anchor=False),
            row(shape, "backward", "numpy", "numpy np.add.at", 100.0, threads_set=1),
            row(shape, "backward", "torch", "torch index_add_", 4.0, threads_set=4, ran="<=4"),
            row(shape, "forward", "fastembed", "fastembed", 1.0),
            row(shape, "forward", "overhead", memlimit.OVERHEAD_NAME, 1.0, threads_set=1)]
    verdicts = {v.target: v for v in targets.judge(rows, [], [shape])}
    add_at = verdicts["dense backward >= 20x faster than np.add.at, both on 1 thread"]
    assert (add_at.measured, add_at.status) == ("0.1x", "MISS")  # the 2-thread row would give 0.01x
    torch_backward = verdicts["dense backward no slower than torch index_add_, same threads"]
    assert torch_backward.status == "SKIPPED" and "4 threads" in torch_backward.note
    forward = verdicts["forward within 1.25x of the memory limit, same threads"]
    assert forward.status == "SKIPPED" and "too few bytes" in forward.note
    rows[-1] = row(shape, "forward", "memory", "memory limit", 0.5)
    forward = {v.target: v for v in targets.judge(rows, [], [shape])}[forward.target]
    assert (forward.measured, forward.status) == ("2x", "MISS")


# ---------------------------------------------------------------- ops train and adapter


def fbgemm_imports():
    """Whether FBGEMM's TBE imports here (installed and built for this torch); asked only by torch tests."""
    try:
        importlib.import_module("fbgemm_gpu.split_table_batched_embeddings_ops_training")
    except ImportError:
        return False
    return True


# Ids with repeats (24 ids into 9 rows) and rows no id touches: a tiny stand-in for every shape.
TINY = shapes.Shape("seed-1x16", 9, 6, 32, 4, 6)


def tiny_data():
    data = shapes.make_data(TINY)
    data.ids[0, :3] = 2  # a row looked up three times in one sequence
    data.ids[data.ids == 8] = 7  # row 8 untouched
    return data


def torch_ctx():
    import torch

    return cases.Context(threads=1, fe_threads=(1,), torch=torch, torch_threads=torch.get_num_threads())


def expected_train(data, group, steps):
    """The table after `steps` steps of the group's optimizer with train.CHECK_HYPER, in float64 numpy:
    the same summed gradient G every step (rows no id touches keep their weight)."""
    h = train.CHECK_HYPER[group]
    w = data.token_table.astype(np.float64)
    G = np.zeros_like(w)
    np.add.at(G, data.ids.reshape(-1), data.grad_hidden.reshape(-1, TINY.dim).astype(np.float64))
    touched = np.zeros(len(w), bool)
    touched[data.ids.reshape(-1)] = True
    if group == "Adam":
        touched[:] = True  # dense: every row takes a step (a zero gradient moves it by 0)
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t in range(1, steps + 1):
        if group == "SGD":
            upd = h["lr"] * G
        elif group == "Adagrad":
            v += G * G
            upd = h["lr"] * G / (np.sqrt(v) + h["eps"])
        elif group == "RowWiseAdagrad":
            v += (G * G).mean(axis=1, keepdims=True)
            upd = h["lr"] * G / (np.sqrt(v) + h["eps"])
        else:  # SparseAdam and Adam: the first is the lazy one, the same on the rows it touches
            b1, b2 = h["betas"]
            m = b1 * m + (1 - b1) * G
            v = b2 * v + (1 - b2) * G * G
            upd = h["lr"] * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + h["eps"])
        w = np.where(touched[:, None], w - np.nan_to_num(upd), w)
    return w, touched


def check_train_row(m, data):
    """m's table after CHECK_STEPS steps against the float64 oracle; untouched rows bitwise unchanged."""
    (got,) = m.result()
    want, touched = expected_train(data, m.group, train.CHECK_STEPS)
    np.testing.assert_allclose(got[touched], want[touched], rtol=0, atol=2e-6, err_msg=m.name)
    np.testing.assert_array_equal(got[~touched], data.token_table[~touched], err_msg=m.name)
    assert not np.array_equal(got[touched], data.token_table[touched]), m.name


def test_train_numpy_api_rows_step_as_their_optimizers():
    data = tiny_data()
    built = train.train_methods(data, cases.Context(threads=1, fe_threads=(1,)))
    want = []
    for g in train.GROUPS:
        want.append((train.numpy_row_name(g), g))
        if g in train.NUMPY_FUSED_GROUPS:
            want.append((train.numpy_lookups_row_name(g), g))
            want.append((train.numpy_fused_row_name(g), g))
    assert [(m.name, m.group) for m in built.methods if m.family == "fastembed"] == want
    # Each group has its memory limit (the tiny table moves too few bytes for a limit: numpy's overhead).
    limits = [m for m in built.methods if m.family not in ("fastembed",)]
    assert [(m.name, m.group, m.nbytes) for m in limits] == [
        (OVERHEAD_NAME, g, train.step_bytes(g, data)) for g in train.GROUPS]
    for m in built.methods:
        if m.family == "fastembed":
            check_train_row(m, data)
    assert built.skips == ["torch, fastembed.torch and FBGEMM rows: skipped (no PyTorch in this run)"]


def test_train_step_bytes_count_what_each_step_must_move():
    """step_bytes, counted by hand for 3 x 2 ids (5 distinct) into a 7 x 4 table: forward reads the 5
    distinct rows and writes 6, backward reads 6 upstream rows, the update reads and writes each distinct
    row of the table and of every state (dense Adam: every row of table, moments and gradient)."""
    data = tiny_data()
    data.token_table = np.zeros((7, 4), np.float32)
    data.ids = np.array([[0, 3], [3, 6], [5, 1]])
    row = 4 * 4  # bytes in a row of 4 float32
    base = (5 + 6) * row + 6 * row
    assert train.step_bytes("SGD", data) == base + 2 * 5 * row
    assert train.step_bytes("Adagrad", data) == base + 4 * 5 * row
    assert train.step_bytes("RowWiseAdagrad", data) == base + 2 * 5 * row + 2 * 5 * 4
    assert train.step_bytes("SparseAdam", data) == base + 6 * 5 * row
    assert train.step_bytes("Adam", data) == base + 8 * 7 * row


def test_train_oracle_sees_a_missing_zero_grad(monkeypatch):
    """The two-step check catches a step that keeps the previous gradient (the second step then uses 2G)."""
    data = tiny_data()

    def sticky_state(data, group, hyper, **defaults):  # defaults: arrays=None, torch_eps=False (float32's)
        layer = fastembed.Embedding.from_pretrained(data.token_table, sparse=True)
        opt = fastembed.optim.SGD(layer.parameters(), **hyper)

        def step():
            layer(data.ids)
            layer.backward(data.grad_hidden)
            opt.step()  # no zero_grad: backward merges into the old gradient

        return step, lambda: (layer.weight,)

    monkeypatch.setattr(train, "numpy_api_state", sticky_state)
    [sgd] = [m for m in train.train_methods(data, cases.Context(threads=1, fe_threads=(1,))).methods
             if m.name == train.numpy_row_name("SGD")]
    with pytest.raises(AssertionError, match="SGD"):
        check_train_row(sgd, data)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
def test_train_torch_and_fbgemm_rows_step_as_their_optimizers():
    data = tiny_data()
    built = train.train_methods(data, torch_ctx())
    names = {m.name: m for m in built.methods}
    for group in ("SGD", "Adagrad", "SparseAdam", "Adam"):
        assert names[train.torch_row_name(group)].family == "torch" and names[train.torch_row_name(group)].anchor
    if fbgemm_imports():
        assert {n for n, *_ in train.FBGEMM_ROWS} <= set(names)
    else:
        assert any(s.startswith("FBGEMM rows: skipped (fbgemm_gpu does not import") for s in built.skips)
    for m in built.methods:
        if m.family not in ("memory", "overhead"):
            check_train_row(m, data)
    # Each row steps its own copy: the timed steps of every row leave the shared table (which every row
    # copies from) as it was, so no row updates memory another row reads.
    before = data.token_table.copy()
    for m in built.methods:
        if m.family not in ("memory", "overhead"):
            m.make()()
    np.testing.assert_array_equal(data.token_table, before)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
def test_fastembed_torch_rows_from_their_table(monkeypatch):
    """Rows come from FASTEMBED_TORCH_ROWS: a drop-in row runs fastembed.torch.Embedding + the class (here
    torch.optim's, which the drop-ins copy); a missing module or class, or an Embedding without fused=,
    is a note, not a crash."""
    fake = types.ModuleType("fake_fused")
    fake.FusedSGD = lambda lr: object()  # an Embedding that has no fused= raises TypeError for it
    monkeypatch.setitem(sys.modules, "fake_fused", fake)
    monkeypatch.setattr(train, "FASTEMBED_TORCH_ROWS", (
        ("drop-in SGD", "SGD", "torch.optim", "SGD", "drop-in"),
        ("drop-in Adagrad", "Adagrad", "torch.optim", "Adagrad", "drop-in"),
        ("drop-in SparseAdam", "SparseAdam", "torch.optim", "SparseAdam", "drop-in"),
        ("no such module", "SGD", "fastembed.no_such_module", "SGD", "drop-in"),
        ("no such class", "SGD", "torch.optim", "NoSuchOptimizer", "drop-in"),
        ("fused SGD", "SGD", "fake_fused", "FusedSGD", "fused"),
    ))
    data = tiny_data()
    built = train.train_methods(data, torch_ctx())
    rows = {m.name: m for m in built.methods}
    for name in ("drop-in SGD", "drop-in Adagrad", "drop-in SparseAdam"):
        assert rows[name].family == "fastembed" and not rows[name].anchor
        check_train_row(rows[name], data)
    notes = "\n".join(built.skips)
    assert "no such module: not available (fastembed.no_such_module does not import" in notes
    assert "no such class: not available (torch.optim has no NoSuchOptimizer)" in notes
    assert "fused SGD: not available (fastembed.torch.Embedding(V, D, fused=" in notes
    assert not {"no such module", "no such class", "fused SGD"} & set(rows)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
def test_fused_row_is_backward_alone(monkeypatch):
    """A fused row builds Embedding(V, D, fused=cls(**hyper)), copies the table in, and times forward +
    backward with no optimizer step: here an Embedding stand-in whose backward applies SGD."""
    import torch

    import fastembed.torch as fet

    class FusedSGD:
        def __init__(self, lr):
            self.lr = lr

    class FusingEmbedding(fet.Embedding):
        def __init__(self, num_embeddings, embedding_dim, fused=None):
            super().__init__(num_embeddings, embedding_dim, sparse=True)

            def update(weight):
                with torch.no_grad():
                    weight.add_(weight.grad, alpha=-fused.lr)
                weight.grad = None

            self.weight.register_post_accumulate_grad_hook(update)

    fake = types.ModuleType("fake_fused")
    fake.FusedSGD = FusedSGD
    monkeypatch.setitem(sys.modules, "fake_fused", fake)
    monkeypatch.setattr(fet, "Embedding", FusingEmbedding)
    monkeypatch.setattr(train, "FASTEMBED_TORCH_ROWS", (("fused SGD", "SGD", "fake_fused", "FusedSGD", "fused"),))
    data = tiny_data()
    built = train.train_methods(data, torch_ctx())
    [fused] = [m for m in built.methods if m.name == "fused SGD"]
    check_train_row(fused, data)  # two steps of SGD: each backward did one update, nothing else did


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
def test_adapter_rows_give_autograds_gradients():
    data = tiny_data()
    built = train.adapter_methods(data, torch_ctx())
    assert [m.name for m in built.methods] == [name for name, *_ in train.ADAPTER_ROWS]
    tok = np.zeros((TINY.vocab, TINY.dim))
    np.add.at(tok, data.ids.reshape(-1), data.grad_hidden.reshape(-1, TINY.dim).astype(np.float64))
    pos = data.grad_hidden.astype(np.float64).sum(axis=0)  # positions arange(T): one row per position
    flat = data.ids.reshape(-1)
    scaled = np.zeros((TINY.vocab, TINY.dim))  # scale_grad_by_freq: each lookup's row over its id's count
    np.add.at(scaled, flat, data.grad_hidden.reshape(-1, TINY.dim).astype(np.float64)
              / np.bincount(flat, minlength=TINY.vocab)[flat][:, None])
    assert not np.allclose(scaled, tok)  # some id repeats: the two groups' oracles differ
    for m in built.methods:
        want = (tok, pos) if m.group == "TokenPositionEmbedding" else (
            (scaled,) if m.group == "Embedding scale_grad_by_freq" else (tok,))
        got = m.result()
        assert len(got) == len(want), m.name
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5, err_msg=m.name)
        m.make()()  # the timed call runs on a state of its own
    far = shapes.make_data(shapes.Shape("wide-uniform", 9, 6, 32, 4, 6, big=True))
    assert train.adapter_methods(far, torch_ctx()).methods == []


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
def test_train_and_adapter_ops_print_every_row(tmp_path):
    text, doc = run_bench(tmp_path, "--all", "--scale", "0.001", "--ops", "train,adapter", "--threads", "1")
    for shape in shapes.ALL_SHAPES:
        rows = table_rows(text, shape.name)
        names = {m for op, m, _ in rows if op == "train"}
        expected = {train.numpy_row_name(g) for g in train.GROUPS}  # dense Adam too: the tables are scaled
        expected |= {train.numpy_fused_row_name(g) for g in train.NUMPY_FUSED_GROUPS}
        expected |= {train.numpy_lookups_row_name(g) for g in train.NUMPY_FUSED_GROUPS}
        expected |= {train.torch_row_name(g) for g in ("SGD", "Adagrad", "SparseAdam", "Adam")}
        if fbgemm_imports():
            expected |= {n for n, *_ in train.FBGEMM_ROWS}
        for name, *_ in train.FASTEMBED_TORCH_ROWS:  # each one a row, or a note saying why not
            if name not in names:
                assert any(n.startswith(f"train: {name}: not available") and shape.name in n for n in doc["notes"])
        assert expected <= names, expected - names
        adapter = {m for op, m, _ in rows if op == "adapter"}
        if shape.name in train.ADAPTER_SHAPES:
            assert adapter == {name for name, *_ in train.ADAPTER_ROWS}
        else:
            assert adapter == set()
    results = [r for r in doc["results"] if r["op"] == "train"]
    # Every row checked against its group's numpy API row; every ratio against its group's torch row.
    assert all(r["check"] == "baseline" or r["check"] == "bitwise" or r["check"].startswith("close") for r in results
               if r["family"] not in ("memory", "overhead"))
    by = {(r["shape"], r["method"]): r for r in results}
    for (shape, method), r in by.items():
        torch_row = by.get((shape, train.torch_row_name(r["group"])))
        if torch_row is None:
            assert r["vs_torch"] is None  # RowWiseAdagrad: torch has none
        else:
            assert r["vs_torch"] == pytest.approx(r["median_ns"] / torch_row["median_ns"])
    judged = {(t["target"], t["shape"]) for t in doc["targets"]}
    assert ("adapter: fastembed.torch.Embedding forward + backward vs torch nn.Embedding", "seed-1x16") in judged
    assert ("train: fastembed numpy API coalesce=False + SGD no slower than torch nn.Embedding(sparse) + SGD",
            "wide-zipf") in judged


def test_train_and_adapter_targets_are_the_issues():
    """Issue 9's limits, each row against the row of the same optimizer (or module), per shape."""
    def train_row(shape, name, ns):
        return row(shape, "train", "fastembed", name, ns)

    rows = []
    for shape in targets.TRAIN_SHAPES:
        rows += [train_row(shape, train.torch_row_name(g), 100.0) for g in ("SGD", "Adagrad", "SparseAdam")]
        rows += [train_row(shape, name, 40.0) for name, *_ in train.FASTEMBED_TORCH_ROWS]
        rows += [train_row(shape, train.numpy_lookups_row_name("SGD"), 90.0)]
        rows += [train_row(shape, train.numpy_row_name("SGD"), 110.0)]
        rows += [train_row(shape, name, 50.0) for name, *_ in train.FBGEMM_ROWS]
    verdicts = {(v.target, v.shape): v for v in targets.judge(rows, [], list(targets.TRAIN_SHAPES))
                if v.target.startswith("train:")}

    def verdict(name, against, shape):
        return verdicts[(f"train: {name} vs {train.torch_row_name(against)}", shape)]

    for shape, sgd, adagrad, fused_adagrad in (("seed-1x16", "1", "1", "1"), ("seed-32x16", "0.8", "0.5", "0.5"),
                                               ("medium", "0.8", "0.5", "0.3"), ("wide-zipf", "0.8", "0.5", "0.3")):
        assert verdict("fastembed.torch + optim.SGD", "SGD", shape).limit == f"<= {sgd}x"
        assert verdict("fastembed.torch fused SGD", "SGD", shape).limit == f"<= {sgd}x"
        assert verdict("fastembed.torch + optim.Adagrad", "Adagrad", shape).limit == f"<= {adagrad}x"
        assert verdict("fastembed.torch + optim.SparseAdam", "SparseAdam", shape).limit == f"<= {adagrad}x"
        assert verdict("fastembed.torch fused Adagrad", "Adagrad", shape).limit == f"<= {fused_adagrad}x"
        assert verdict("fastembed.torch fused SparseAdam", "SparseAdam", shape).limit == f"<= {fused_adagrad}x"
        # 40 / 100 = 0.4x: under every limit but the fused 0.3x
        status = verdict("fastembed.torch fused SparseAdam", "SparseAdam", shape).status
        assert status == ("MISS" if fused_adagrad == "0.3" else "PASS")
        # The numpy API's SGD is judged in torch's form (uncoalesced); the coalesced row is information.
        numpy_sgd = verdicts[(f"train: {train.numpy_lookups_row_name('SGD')} no slower than "
                              f"{train.torch_row_name('SGD')}", shape)]
        assert (numpy_sgd.measured, numpy_sgd.limit, numpy_sgd.status) == ("0.9x", "<= 1x", "PASS")
        coalesced = verdicts[(f"train: {train.numpy_row_name('SGD')} (coalesced: sums each row first) vs "
                              f"{train.torch_row_name('SGD')}", shape)]
        assert (coalesced.measured, coalesced.limit, coalesced.status) == ("1.1x", "-", "INFO")
        fbgemm = [v for (t, s), v in verdicts.items() if s == shape and "faster than FBGEMM" in t]
        # numpy API, drop-in and fused against each FBGEMM optimizer (SKIPPED where a row is absent)
        assert len(fbgemm) == 3 * 3 and all(v.limit == "<= 1x" for v in fbgemm)
        assert verdicts[("train: fastembed.torch fused SGD faster than FBGEMM TBE EXACT_SGD", shape)].measured == "0.8x"
    missing = verdicts[(f"train: {train.numpy_row_name('Adagrad')} faster than FBGEMM TBE EXACT_ADAGRAD", "medium")]
    assert missing.status == "SKIPPED" and train.numpy_row_name("Adagrad") in missing.note
    # Without any train row on a shape, no train target is listed there.
    assert not [v for v in targets.judge(rows[:1], [], ["medium"]) if v.target.startswith("train:")]

    adapter = [row(s, "adapter", f, n, ns) for s in targets.BOOK_SHAPES for f, n, ns in (
        ("fastembed", "fastembed.torch.Embedding", 90.0), ("torch", "torch nn.Embedding", 100.0),
        ("fastembed", "fastembed.torch.TokenPositionEmbedding", 90.0), ("torch", "torch 2 nn.Embedding + add", 100.0))]
    found = {(v.target, v.shape): v for v in targets.judge(adapter, [], list(targets.BOOK_SHAPES))
             if v.target.startswith("adapter:")}
    assert len(found) == 4
    for shape in targets.BOOK_SHAPES:
        emb = found[("adapter: fastembed.torch.Embedding forward + backward vs torch nn.Embedding", shape)]
        tpe = found[("adapter: fastembed.torch.TokenPositionEmbedding forward + backward vs torch 2 nn.Embedding + add",
                     shape)]
        assert (emb.limit, emb.status) == ("<= 1x", "PASS") and (tpe.limit, tpe.status) == ("<= 0.8x", "MISS")


def test_grouped_case_builds_each_groups_state_only_while_it_is_timed(monkeypatch):
    import bench.run as run_module
    from bench.timing import Plan

    alive, seen = set(), []

    def method(name, group):
        def make():
            alive.add(name)
            return lambda: seen.append((name, frozenset(alive)))
        return Method(name, "fastembed", make=make, group=group)

    real_measure = run_module.measure

    def measure_then_release(group, plan, progress):
        counts = real_measure(group, plan, progress)
        alive.difference_update(m.name for m in group)  # the driver drops run (the state) after this call
        return counts

    monkeypatch.setattr(run_module, "measure", measure_then_release)
    methods = [method("a1", "A"), method("a2", "A"), method("b1", "B")]
    case = cases.Case(shapes.SEED_SHAPES[0], "train", None, methods)
    run_module.measure_case(case, Plan(repeats=2, min_repeats=1, warmup=0, sample_ns=1, budget_ns=10**9), None)
    # Each group timed on its own: its states alive, no other group's; every run dropped after.
    assert {n for n, _ in seen} == {"a1", "a2", "b1"}
    assert all(live == ({"a1", "a2"} if n.startswith("a") else {"b1"}) for n, live in seen)
    assert all(m.run is None and len(m.samples_ns) == 2 for m in methods)


# ---------------------------------------------------------------- op bag

# A big shape shrunk by hand: 4 x 32 = 128 ids (bags of 1, 8 and 64 divide it), repeats among 40 rows, and
# rows no id touches.
BAG_TINY = shapes.Shape("medium", 40, 8, 32, 4, 32, big=True)


def bag_data():
    data = shapes.make_data(BAG_TINY)
    data.ids[data.ids >= 30] = 3  # rows 30-39 untouched, row 3 named often (also twice in some bags)
    return data


def bag_oracle(data, direction, size, mode):
    """What a group computes, from numpy on bags of `size` consecutive ids (size divides N here)."""
    table = data.token_table.astype(np.float64)
    D = BAG_TINY.dim
    ids = data.ids.reshape(-1, size)
    rows = table[ids]  # (B, L, D)
    if direction == "forward":
        return {"sum": rows.sum(1), "mean": rows.mean(1), "max": rows.max(1)}[mode]
    g = data.grad_hidden.reshape(-1, D)[:len(ids)].astype(np.float64)
    grad = np.zeros_like(table)
    if mode == "max":
        first = rows.argmax(1)  # the first of equal values, as torch keeps it
        np.add.at(grad, (np.take_along_axis(ids, first, 1), np.arange(D)[None, :]), g)
    else:
        scale = 1.0 if mode == "sum" else 1.0 / size
        np.add.at(grad, ids.reshape(-1), np.repeat(g * scale, size, axis=0))
    return grad


def test_bag_forward_bytes_by_hand():
    ids = np.array([3, 1, 3, 0, 1, 7], np.int64)
    offsets = np.array([0, 2, 4], np.int64)
    # ids 6 x 8 + offsets 3 x 8 + 4 distinct rows (0, 1, 3, 7) x 4 floats x 4 + output 3 bags x 4 x 4
    assert bag.forward_bytes(ids, offsets, 4) == 48 + 24 + 64 + 48
    data = bag_data()
    for size in bag.BAG_SIZES:
        ids, offsets = bag.bags(data, size)
        out = fastembed.embedding_bag(data.token_table, ids, offsets, mode="sum")
        touched = data.token_table[np.unique(ids)]
        expected = ids.nbytes + offsets.nbytes + touched.nbytes + out.nbytes
        assert bag.forward_bytes(ids, offsets, BAG_TINY.dim) == expected
        out, arg = fastembed.embedding_bag(data.token_table, ids, offsets, mode="max", return_argmax=True)
        assert bag.forward_bytes(ids, offsets, BAG_TINY.dim, argmax=True) == expected + arg.nbytes
    # the case's max groups: every row (and the limit) counts the argmax
    case = bag_case(cases.Context(threads=1, fe_threads=(1,)))
    for m in case.methods:
        if m.group.startswith("forward") and m.nbytes is not None:
            size, mode = int(m.group.split(", ")[1].split()[0]), m.group.split(", ")[2]
            ids, offsets = bag.bags(data, size)
            assert m.nbytes == bag.forward_bytes(ids, offsets, BAG_TINY.dim, argmax=mode == "max"), m.group


def test_bag_memory_limit_moves_the_groups_bytes(monkeypatch):
    group = bag.group_name("forward", 8, "mean")
    m = bag.limit_method(3 * 2**20, 2, group)
    limit = m.make()
    assert (m.name, m.family, m.group, m.nbytes) == ("memory limit", "memory", group, 3 * 2**20)
    assert 12 * len(limit.c) * limit.scale == pytest.approx(3 * 2**20)
    assert m.ran == str(limit.parts) and m.note == limit.describe()
    small = bag.limit_method(2**19, 2, group)
    assert (small.name, small.family, small.ran) == (memlimit.OVERHEAD_NAME, "overhead", "1")


def bag_case(ctx):
    return cases.build_case(bag_data(), "bag", ctx)


def test_bag_groups_compute_the_numpy_oracle():
    """Each group's anchor (the numpy API) against numpy on the same bags: the harness feeds every group its
    own bag size and mode, and a backward group its gradient."""
    data = bag_data()
    ctx = cases.Context(threads=1, fe_threads=(1,))
    case = cases.build_case(data, "bag", ctx)
    groups = {m.group: m for m in case.methods if m.family == "fastembed" and m.anchor}
    assert len(groups) == 2 * 3 * 3
    for direction in bag.DIRECTIONS:
        for size in bag.BAG_SIZES:
            for mode in bag.MODES:
                (got,) = groups[bag.group_name(direction, size, mode)].result()
                want = bag_oracle(data, direction, size, mode)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{direction} {size} {mode}")
    # Every forward group has its own limit row (numpy's call overhead at this size); no backward group has one.
    limits = [m.group for m in case.methods if m.family in ("memory", "overhead")]
    assert sorted(limits) == sorted(g for g in groups if g.startswith("forward"))
    cases.verify(case, ctx)
    # One check per row with a result: the keys tell the groups apart.
    assert len(case.checks) == sum(m.result is not None for m in case.methods)


def test_bag_wrong_rows_fail_the_check():
    ctx = cases.Context(threads=1, fe_threads=(1,))
    data = bag_data()
    ids, offsets = bag.bags(data, 8)
    table = data.token_table

    def with_row(group, fn):
        case = cases.build_case(data, "bag", ctx)
        case.methods.append(Method("numpy, wrong", "numpy", run=fn, result=fn, group=group))
        return case

    # a sum where the group computes a mean
    wrong_mode = lambda: (fastembed.embedding_bag(table, ids, offsets, mode="sum"),)  # noqa: E731
    with pytest.raises(cases.CheckError, match="numpy, wrong"):
        cases.verify(with_row(bag.group_name("forward", 8, "mean"), wrong_mode), ctx)
    # a max one ulp off in one element: close, but a max must be bitwise
    def off_by_an_ulp():
        out = fastembed.embedding_bag(table, ids, offsets, mode="max")
        out[0, 0] = np.nextafter(out[0, 0], np.float32(np.inf))
        return (out,)

    case = with_row(bag.group_name("forward", 8, "max"), off_by_an_ulp)
    case.methods[-1].strict = True
    with pytest.raises(cases.CheckError, match="must be bitwise"):
        cases.verify(case, ctx)
    # the same row in a sum group is within the tolerance of sums in another order, and passes
    case = with_row(bag.group_name("forward", 8, "sum"), lambda: (
        fastembed.embedding_bag(table, ids, offsets, mode="sum") * np.float32(1 + 2**-22),))
    cases.verify(case, ctx)
    assert case.checks[cases.method_key(case.methods[-1])].startswith("close")
    # a backward that misses the last bag's gradient
    g = data.grad_hidden.reshape(-1, BAG_TINY.dim)[:len(offsets)].copy()
    g[-1] = 0

    def missing_bag():
        grad = np.zeros_like(table)
        fastembed.embedding_bag_backward(grad, ids, offsets, g, mode="sum")
        return (grad,)

    with pytest.raises(cases.CheckError, match="numpy, wrong"):
        cases.verify(with_row(bag.group_name("backward", 8, "sum"), missing_bag), ctx)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
def test_bag_torch_rows_are_strict_where_a_max_is():
    case = bag_case(torch_ctx())
    by_group = {}
    for m in case.methods:
        by_group.setdefault(m.group, []).append(m)
    for group, methods in by_group.items():
        names = {m.name for m in methods}
        assert {bag.NUMPY_ROW, bag.MODULE_ROW, bag.TORCH_ROW} <= names, group
        assert any(n.startswith(bag.FBGEMM_ROW) for n in names) == (fbgemm_imports() and not group.endswith("max"))
        max_forward = group.startswith("forward") and group.endswith("max")
        for m in methods:
            if m.name != bag.NUMPY_ROW and m.family not in ("memory", "overhead"):
                assert m.strict == max_forward, (group, m.name)  # a max does not round: bitwise or wrong


@pytest.mark.parametrize("direction,size", [("forward", 1), ("forward", 64), ("backward", 1), ("backward", 8)])
@pytest.mark.parametrize("tokens,dim", [(200, 32), (4096, 32), (1024, 64)])
def test_bag_thread_labels_are_what_the_kernels_run(direction, size, tokens, dim):
    from fastembed import _kernels

    rng = np.random.default_rng(tokens + size)
    table = rng.standard_normal((97, dim)).astype(np.float32)
    ids = rng.integers(0, 97, size=tokens)
    offsets = np.arange(0, tokens, size, dtype=np.int64)
    n = fastembed.get_num_threads()
    if direction == "forward":
        fastembed.embedding_bag(table, ids, offsets, mode="sum")
    else:
        g = np.ones((len(offsets), dim), np.float32)
        fastembed.embedding_bag_backward(np.zeros_like(table), ids, offsets, g, mode="sum")
    assert str(_kernels._last_call_threads()) == bag.thread_label(direction, ids, offsets, dim, n)


def bag_row(shape, group, family, method, ns, threads_set=2):
    return dict(row(shape, "bag", family, method, ns, threads_set=threads_set), group=group)


def test_bag_targets_judge_each_case_against_its_own_rows():
    shape = "wide-zipf"
    rows = []
    for size in bag.BAG_SIZES:
        for mode in bag.MODES:
            fwd, bwd = bag.group_name("forward", size, mode), bag.group_name("backward", size, mode)
            rows += [bag_row(shape, fwd, "fastembed", bag.NUMPY_ROW, 100.0),
                     bag_row(shape, fwd, "memory", "memory limit", 80.0 if size != 64 else 1000.0),
                     bag_row(shape, fwd, "fastembed", bag.MODULE_ROW, 40.0),
                     bag_row(shape, fwd, "torch", bag.TORCH_ROW, 100.0),
                     bag_row(shape, bwd, "fastembed", bag.MODULE_ROW, 60.0),
                     bag_row(shape, bwd, "torch", bag.TORCH_ROW, 100.0)]
            if mode != "max":
                rows += [bag_row(shape, fwd, "fbgemm", f"{bag.FBGEMM_ROW}, pooling {mode.upper()}", 50.0),
                         bag_row(shape, bwd, "fbgemm", f"{bag.FBGEMM_ROW}, pooling {mode.upper()}", 50.0)]
    verdicts = [v for v in targets.judge(rows, [], [shape, "medium"]) if v.case]
    assert len(verdicts) == 9 * 5 and {v.shape for v in verdicts} == {shape}  # medium ran no bag: none there
    by = {(v.case, v.target): v for v in verdicts}
    t = {column: target for column, target, _ in targets.BAG_TARGETS}
    for size in bag.BAG_SIZES:
        for mode in bag.MODES:
            case = f"{size} ids/bag, {mode}"
            memory = by[(case, t["forward vs mem limit"])]
            # 100 / 80 = 1.25x passes; the 64-ids groups' own limit (1000) gives 0.1x: each group its own limit
            assert (memory.measured, memory.status) == (("0.1x", "PASS") if size == 64 else ("1.25x", "PASS"))
            assert (by[(case, t["forward vs torch"])].measured, by[(case, t["forward vs torch"])].status) == \
                ("0.4x", "PASS")
            assert (by[(case, t["backward vs torch"])].measured, by[(case, t["backward vs torch"])].status) == \
                ("0.6x", "MISS")
            fbgemm_fwd, fbgemm_bwd = by[(case, t["forward vs FBGEMM"])], by[(case, t["backward vs FBGEMM"])]
            if mode == "max":
                assert fbgemm_fwd.status == fbgemm_bwd.status == "SKIPPED" and "no max pooling" in fbgemm_fwd.note
            else:
                assert (fbgemm_fwd.measured, fbgemm_fwd.status) == ("0.8x", "PASS")
                assert (fbgemm_bwd.measured, fbgemm_bwd.status) == ("1.2x", "MISS")
    # Without the memory row, the forward target says what is missing; with only the call overhead, why.
    fwd = bag.group_name("forward", 8, "sum")
    rest = [r for r in rows if not (r["group"] == fwd and r["family"] == "memory")]
    assert by_case(rest, shape, "8 ids/bag, sum", t["forward vs mem limit"]).status == "SKIPPED"
    rest.append(bag_row(shape, fwd, "overhead", memlimit.OVERHEAD_NAME, 1.0, threads_set=1))
    assert "too few bytes" in by_case(rest, shape, "8 ids/bag, sum", t["forward vs mem limit"]).note
    text = report.bag_targets_markdown(verdicts)
    assert "| wide-zipf | 64 ids/bag, max | 0.1x PASS | 0.4x PASS | 0.6x MISS | SKIPPED | SKIPPED |" in text
    assert "TBE has no max pooling [3 cases of wide-zipf]" in text
    assert (f"- forward vs FBGEMM: {bag.MODULE_ROW} [2 threads] vs {bag.FBGEMM_ROW}, pooling by the case's mode "
            "[2 threads]") in text


def by_case(rows, shape, case, target):
    return next(v for v in targets.judge(rows, [], [shape]) if (v.case, v.target) == (case, target))


def test_bag_op_runs_when_asked_at_its_shapes(tmp_path):
    """`--ops bag` alone runs at medium and wide (scaled), every row checked; the default run has no bag."""
    text, doc = run_bench(tmp_path, "--ops", "bag", "--scale", "0.01", "--threads", "1")
    assert [s["name"] for s in doc["shapes"]] == list(bag.SHAPES)
    results = doc["results"]
    assert {r["op"] for r in results} == {"bag"}
    torch_rows = HAS_TORCH and [bag.MODULE_ROW, bag.TORCH_ROW] or []
    for shape in bag.SHAPES:
        printed = {(op, method) for op, method, _ in table_rows(text, shape)}
        for direction in bag.DIRECTIONS:
            for size in bag.BAG_SIZES:
                for mode in bag.MODES:
                    group = bag.group_name(direction, size, mode)
                    names = {r["method"]: r for r in results if (r["shape"], r["group"]) == (shape, group)}
                    expected = {bag.NUMPY_ROW, *torch_rows}
                    if direction == "forward":
                        expected.add(memlimit.OVERHEAD_NAME)  # scaled by 0.01: under 1 MiB
                    if HAS_TORCH and fbgemm_imports() and mode != "max":
                        expected.add(f"{bag.FBGEMM_ROW}, pooling {mode.upper()}")
                    assert set(names) == expected, (shape, group)
                    assert all((f"bag: {group}", m) in printed for m in expected)
                    assert names[bag.NUMPY_ROW]["check"] == "baseline"
                    for name, r in names.items():
                        if r["family"] in ("torch", "fbgemm") or name == bag.MODULE_ROW:
                            ok = ("bitwise",) if (direction, mode) == ("forward", "max") else ("bitwise", "close")
                            assert r["check"].startswith(ok), (group, name, r["check"])
                    if direction == "forward":
                        ids, offsets = bag.bags(shapes.make_data(shapes.scaled(
                            next(s for s in shapes.BIG_SHAPES if s.name == shape), 0.01)), size)
                        assert names[bag.NUMPY_ROW]["bytes"] == bag.forward_bytes(ids, offsets, shapes_dim(shape),
                                                                                  argmax=mode == "max")
    verdicts = [t for t in doc["targets"] if t["case"]]
    assert len(verdicts) == 3 * 9 * 5
    assert all(t["status"] == "SKIPPED" and "too few bytes" in t["note"] for t in verdicts
               if t["target"] == targets.BAG_MEMORY)
    if HAS_TORCH:
        against_torch = [t for t in verdicts if bag.TORCH_ROW in t["target"]]
        assert len(against_torch) == 3 * 9 * 2 and all(t["status"] in ("PASS", "MISS") for t in against_torch)
    assert "### bag targets" in text


def shapes_dim(name):
    return next(s.dim for s in shapes.BIG_SHAPES if s.name == name)


def test_bag_rows_take_their_groups_limit_and_bytes():
    groups = [bag.group_name("forward", 1, "sum"), bag.group_name("forward", 64, "sum")]
    methods = []
    for k, group in enumerate(groups):
        methods += [Method(bag.NUMPY_ROW, "fastembed", threads=2, group=group, anchor=True, nbytes=1000 * (k + 1),
                           samples_ns=[100.0]),
                    Method("memory limit", "memory", threads=2, group=group, anchor=True, nbytes=1000 * (k + 1),
                           samples_ns=[50.0 * (k + 1)])]
    case = cases.Case(shapes.BIG_SHAPES[0], "bag", None, methods)
    rows = [r for r in report.case_rows(case) if r["family"] == "fastembed"]
    assert [r["vs_memory"] for r in rows] == [2.0, 1.0]  # 100 / 50 and 100 / 100: each against its own group
    assert [r["bytes"] for r in rows] == [1000, 2000] and [r["gbps"] for r in rows] == [10.0, 20.0]
    assert [report.op_label(r) for r in rows] == [f"bag: {g}" for g in groups]
    assert report.op_label({"op": "train", "group": "SGD"}) == "train"  # train's groups show in its row names


# ---------------------------------------------------------------- --dtypes: the forward per table dtype

DTYPE_TINY = shapes.Shape("wide-uniform", 300, 8, 16, 4, 8, big=True)
HAS_ML_DTYPES = importlib.util.find_spec("ml_dtypes") is not None
FLOAT32_FORWARD_ROWS = {"fastembed", "fastembed (out=)", "numpy tok[ids] + pos[p]", "numpy take(out=) + add",
                        memlimit.OVERHEAD_NAME}


def forward_oracle(data, dtype):
    """hidden = tok[ids] + pos[p] on the float32 tables rounded to dtype, added in float64 for float64 and in
    float32 (then rounded once) for the halves; widened back to float32 (exact) for the halves."""
    if dtype == "bfloat16":
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
    else:
        np_dtype = np.dtype(dtype)
    wide = np.float64 if dtype == "float64" else np.float32
    tok = data.token_table.astype(np_dtype).astype(wide)
    pos = data.position_table.astype(np_dtype).astype(wide)
    hidden = tok[data.ids] + pos[data.positions]
    return hidden if dtype == "float64" else hidden.astype(np_dtype).astype(np.float32)


def dtype_ctx():
    return torch_ctx() if HAS_TORCH else cases.Context(threads=1, fe_threads=(1,))


def assert_runs_in(m, dtype):
    """The timed call itself returns dtype (numpy, ml_dtypes or torch): the row times the dtype's tables,
    which its widened result alone would not show for the halves."""
    raw = (m.make() if m.make is not None else m.run)()
    if isinstance(raw, tuple):
        raw = raw[0]  # a max bag's (out, argmax)
    assert str(raw.dtype).replace("torch.", "") == dtype, (m.name, raw.dtype)


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_dtype_forward_rows_compute_the_oracle(dtype):
    """Each row of a dtype's forward case returns the oracle's values bitwise (the kernels, torch's add and
    F.embedding all round once from the same float32 sum), and the case moves the dtype's bytes."""
    if dtype == "bfloat16" and not HAS_ML_DTYPES:
        pytest.skip("the bfloat16 oracle needs ml_dtypes")
    data = shapes.make_data(DTYPE_TINY)
    ctx = dtype_ctx()
    case = cases.build_case(data, "forward", ctx, dtype)
    assert case.op == f"forward {dtype}" and case.dtype == dtype
    names = [m.name for m in case.methods]
    expected = ["fastembed"] + ([cases.MODULE_ROW, "torch F.embedding"] if HAS_TORCH else [])
    assert names == expected + [memlimit.OVERHEAD_NAME]
    want = forward_oracle(data, dtype)
    for m in case.methods[:-1]:
        assert_runs_in(m, dtype)
        (got,) = m.result()
        assert got.dtype == want.dtype and np.array_equal(got, want), m.name
    # The tables' and the output's bytes scale with the element size; the ids' do not.
    itemsize = 8 if dtype == "float64" else 2
    u_tok, u_pos = data.unique_rows()
    elements = DTYPE_TINY.dim * (u_tok + u_pos + DTYPE_TINY.tokens)
    assert case.nbytes == cases.traffic("forward", data) + (itemsize - 4) * elements
    cases.verify(case, ctx)
    assert set(case.checks.values()) == {"baseline"} | ({"bitwise"} if HAS_TORCH else set())


def test_dtype_tolerance_is_the_dtypes_own():
    """One float16 rounding apart passes the float16 check and fails float32's; four units apart near the
    largest value (the tolerance is a unit of the element plus one of the largest value) fail both."""
    x = np.linspace(0.5, 1.5, 64, dtype=np.float16)
    one_ulp = x.copy()
    one_ulp[3] = np.nextafter(one_ulp[3], np.float16(2))
    four_ulps = x.copy()
    for _ in range(4):
        four_ulps[-2] = np.nextafter(four_ulps[-2], np.float16(2))
    widen = lambda a: (a.astype(np.float32),)  # noqa: E731
    assert cases.compare(widen(x), widen(one_ulp), "row", "float16").startswith("close")
    with pytest.raises(cases.CheckError):
        cases.compare(widen(x), widen(one_ulp), "row", "float32")
    for dtype in ("float16", "bfloat16"):
        bad = x.astype(np.float32) * np.float32(1 + 2**-5)  # beyond a bfloat16 unit (2**-7) too
        with pytest.raises(cases.CheckError, match="row"):
            cases.compare(widen(x), (bad,), "row", dtype)
    with pytest.raises(cases.CheckError):
        cases.compare(widen(x), widen(four_ulps), "row", "float16")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_forward_wrong_row_fails_the_check(dtype):
    """A row that adds the wrong position rows, in the dtype's own case, is caught before timing."""
    if dtype == "bfloat16" and not HAS_ML_DTYPES:
        pytest.skip("needs ml_dtypes")
    data = shapes.make_data(DTYPE_TINY)
    ctx = cases.Context(threads=1, fe_threads=(1,))
    case = cases.build_case(data, "forward", ctx, dtype)
    shifted = np.roll(forward_oracle(data, dtype), 1, axis=1)  # position t's row at t + 1
    case.methods.append(Method("numpy, wrong", "numpy", run=lambda: None, result=lambda: (shifted,)))
    with pytest.raises(cases.CheckError, match="numpy, wrong"):
        cases.verify(case, ctx)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
def test_bfloat16_without_ml_dtypes_keeps_the_torch_rows(monkeypatch):
    """Without ml_dtypes the numpy API's bfloat16 row is left out with why, fastembed.torch is the group's
    anchor, and its rows still equal torch's."""
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` raises ImportError
    assert shapes.numpy_dtype("bfloat16") is None
    ctx = torch_ctx()
    case = cases.build_case(shapes.make_data(DTYPE_TINY), "forward", ctx, "bfloat16")
    assert [m.name for m in case.methods] == [cases.MODULE_ROW, "torch F.embedding", memlimit.OVERHEAD_NAME]
    assert case.methods[0].anchor and case.skips == [cases.NUMPY_SKIP] and "ml_dtypes" in cases.NUMPY_SKIP
    cases.verify(case, ctx)
    assert case.checks[cases.method_key(case.methods[1])] == "bitwise"
    if HAS_ML_DTYPES:  # the tables torch got without ml_dtypes are the ones the numpy API gets with it
        monkeypatch.delitem(sys.modules, "ml_dtypes")
        (got,) = case.methods[1].result()
        assert np.array_equal(got, forward_oracle(shapes.make_data(DTYPE_TINY), "bfloat16"))


def test_dtypes_option_adds_named_checked_rows_and_targets(tmp_path):
    """--dtypes runs forward once per dtype as `forward <dtype>` cases (float32's rows keep their names), each
    row checked against its case's anchor; the dtype targets are judged from those rows."""
    text, doc = run_bench(tmp_path, "--shapes", "wide-uniform", "--ops", "forward", "--dtypes",
                          "float16,float64,float32,bfloat16", "--scale", "0.01", "--threads", "1")
    assert doc["args"]["dtypes"] == ["float32", "float64", "float16", "bfloat16"]  # in DTYPES order
    results = doc["results"]
    ops = list(dict.fromkeys(r["op"] for r in results))
    assert ops == ["forward", "forward float64", "forward float16", "forward bfloat16"]
    assert all(r["dtype"] == (r["op"].split()[1] if " " in r["op"] else "float32") for r in results)
    torch_rows = {"torch F.embedding", "torch index_select + add"} if HAS_TORCH else set()
    assert {r["method"] for r in results if r["op"] == "forward"} == FLOAT32_FORWARD_ROWS | torch_rows
    printed = {(op, method) for op, method, _ in table_rows(text, "wide-uniform")}
    for dtype in ("float64", "float16", "bfloat16"):
        op = f"forward {dtype}"
        rows = {r["method"]: r for r in results if r["op"] == op}
        want = {cases.MODULE_ROW, "torch F.embedding"} if HAS_TORCH else set()
        if dtype != "bfloat16" or HAS_ML_DTYPES:
            want.add("fastembed")
        assert set(rows) == want | {memlimit.OVERHEAD_NAME}, op
        assert all((op, m) in printed for m in rows)
        checks = [r["check"] for r in rows.values() if r["family"] != "overhead"]
        assert checks.count("baseline") == 1 and all(c in ("baseline", "bitwise") for c in checks), (op, checks)
        data = shapes.make_data(shapes.scaled(shapes.BIG_SHAPES[1], 0.01))
        assert all(r["bytes"] == cases.traffic("forward", data, 8 if dtype == "float64" else 2)
                   for r in rows.values())
    assert f"forward float16 = {cases.OP_TITLES['forward']}, float16 tables" in text
    ops_line = next(line for line in text.splitlines() if line.startswith("Ops: "))
    listed = [part.split(" = ")[0] for part in ops_line[len("Ops: "):].split("; ")]
    assert listed == ["forward", "forward float64", "forward float16", "forward bfloat16"]
    found = {t["target"]: t for t in doc["targets"] if t["target"].startswith("forward ")}
    half = [t for name, t in found.items() if "numpy API) <= 0.6x" in name]
    assert len(half) == (2 if HAS_ML_DTYPES else 1) and all(t["status"] in ("PASS", "MISS") for t in half)
    assert all("vs forward: fastembed [1 thread]" in t["note"] for t in half)
    f64 = [t for name, t in found.items() if name.startswith("forward float64")]
    assert len(f64) == 1 and f64[0]["status"] in (("PASS", "MISS") if HAS_TORCH else ("SKIPPED",))


def test_unknown_dtype_is_a_clear_error(capsys):
    from bench import run

    with pytest.raises(SystemExit) as exc:
        run.parse_args(["--dtypes", "float32,float8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown dtype(s) ['float8']" in err and "'bfloat16'" in err
    assert run.parse_args([]).dtypes == ["float32"]  # the default: every earlier row, unchanged


def test_dtype_targets_compare_the_rows_they_name():
    def row(op, method, family, t, threads=2):
        return {"shape": "wide-uniform", "op": op, "method": method, "family": family, "median_ns": t,
                "threads_set": threads, "threads": str(threads), "anchor": True, "group": ""}

    # float32 at 1 thread listed first: the half rows (2 threads) must take float32's 2-thread row
    rows = [row("forward", "fastembed", "fastembed", 180.0, 1), row("forward", "fastembed", "fastembed", 100.0),
            row("forward float16", "fastembed", "fastembed", 50.0),
            row("forward bfloat16", "fastembed", "fastembed", 70.0),
            row("forward float64", cases.MODULE_ROW, "fastembed", 90.0),
            row("forward float64", "torch F.embedding", "torch", 100.0)]
    got = {(v.target.split()[1], v.shape): v for v in targets.judge(rows, [], ["wide-uniform"])
           if v.target.startswith("forward ")}
    assert (got["float16", "wide-uniform"].measured, got["float16", "wide-uniform"].status) == ("0.5x", "PASS")
    assert (got["bfloat16", "wide-uniform"].measured, got["bfloat16", "wide-uniform"].status) == ("0.7x", "MISS")
    assert (got["float64:", "wide-uniform"].measured, got["float64:", "wide-uniform"].status) == ("0.9x", "PASS")
    # without the float32 forward the half targets are SKIPPED with why, not judged against another row
    no_f32 = [v for v in targets.judge(rows[2:], [], ["wide-uniform"]) if "0.6x" in v.target]
    assert [v.status for v in targets.judge(rows[:1] + rows[2:], [], ["wide-uniform"]) if "0.6x" in v.target] \
        == ["SKIPPED"] * 2  # float32 at another thread count is no comparison
    assert len(no_f32) == 2 and all(v.status == "SKIPPED" and "forward float32" in v.note for v in no_f32)


def bag_dtype_oracle(data, size, mode, dtype):
    """A forward bag group on the table rounded to dtype, from numpy: sums exact (float64) and rounded to the
    dtype once, a mean that sum divided by the count, a max the largest element; widened as the rows are."""
    np_dtype = np.dtype(dtype) if dtype != "bfloat16" else __import__("ml_dtypes").bfloat16
    ids = data.ids.reshape(-1)
    rows = data.token_table.astype(np_dtype).astype(np.float64)[ids].reshape(-1, size, BAG_TINY.dim)
    out = {"sum": rows.sum(axis=1), "mean": rows.sum(axis=1) / size, "max": rows.max(axis=1)}[mode]
    return out if dtype == "float64" else out.astype(np_dtype).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_bag_dtype_forward_groups_compute_the_oracle(dtype):
    """`bag <dtype>`: forward groups only, the dtype's bytes, each row within the dtype's rounding of numpy's
    bags (a max bitwise), and the case's own check passes."""
    if dtype == "bfloat16" and not HAS_ML_DTYPES:
        pytest.skip("the bfloat16 oracle needs ml_dtypes")
    data = bag_data()
    ctx = dtype_ctx()
    case = cases.build_case(data, "bag", ctx, dtype)
    assert case.op == f"bag {dtype}"
    by_group = {}
    for m in case.methods:
        by_group.setdefault(m.group, []).append(m)
    assert list(by_group) == [bag.group_name("forward", s, mode) for s in bag.BAG_SIZES for mode in bag.MODES]
    eps = {"float64": 2.0**-52, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    for group, methods in by_group.items():
        size, mode = int(group.split(", ")[1].split()[0]), group.rsplit(", ", 1)[1]
        names = [m.name for m in methods]
        assert names == [bag.NUMPY_ROW] + ([bag.MODULE_ROW, bag.TORCH_ROW] if HAS_TORCH else []) + \
            [memlimit.OVERHEAD_NAME], group
        want = bag_dtype_oracle(data, size, mode, dtype)
        for m in methods[:-1]:
            assert_runs_in(m, dtype)
            (got,) = m.result()
            assert got.dtype == want.dtype, (group, m.name)
            if mode == "max":
                assert np.array_equal(got, want), (group, m.name)
            else:  # a float32 (float64) sum in the ids' order, rounded once: at most a unit from the exact one's
                np.testing.assert_allclose(got, want, rtol=2 * eps, atol=2 * eps * np.abs(want).max(),
                                           err_msg=f"{group} {m.name}")
        ids, offsets = bag.bags(data, size)
        distinct = len(np.unique(ids))
        assert methods[0].nbytes == ids.nbytes + offsets.nbytes + (distinct + len(offsets)) * BAG_TINY.dim * (
            8 if dtype == "float64" else 2) + (8 * len(offsets) * BAG_TINY.dim if mode == "max" else 0)
    cases.verify(case, ctx)
    if HAS_TORCH:
        assert "FBGEMM rows: none on tables other than float32" in case.skips


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
def test_bag_bfloat16_without_ml_dtypes_is_anchored_on_the_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    ctx = torch_ctx()
    case = cases.build_case(bag_data(), "bag", ctx, "bfloat16")
    assert bag.NUMPY_SKIP in case.skips and all(m.name != bag.NUMPY_ROW for m in case.methods)
    anchors = [m for m in case.methods if m.family == "fastembed" and m.anchor]
    assert len(anchors) == 9 and all(m.name == bag.MODULE_ROW for m in anchors)
    cases.verify(case, ctx)


def test_dtypes_option_runs_the_bag_op_per_dtype(tmp_path):
    text, doc = run_bench(tmp_path, "--ops", "bag", "--shapes", "medium", "--dtypes", "float32,float16",
                          "--scale", "0.01", "--threads", "1")
    results = doc["results"]
    assert list(dict.fromkeys(r["op"] for r in results)) == ["bag", "bag float16"]
    half = [r for r in results if r["op"] == "bag float16"]
    assert {r["group"] for r in half} == {bag.group_name("forward", s, m) for s in bag.BAG_SIZES for m in bag.MODES}
    assert all(r["dtype"] == "float16" for r in half)
    assert all(r["check"] in ("baseline", "bitwise") or r["check"].startswith("close") for r in half
               if r["family"] != "overhead")
    printed = {(op, method) for op, method, _ in table_rows(text, "medium")}
    assert ("bag float16: forward, 8 ids/bag, max", bag.NUMPY_ROW) in printed
    # the bag targets are float32's (issue 10 names no dtype for them): one shape, 9 cases, 5 targets
    assert len([t for t in doc["targets"] if t["case"]]) == 9 * 5


def test_dtype_forward_limit_runs_at_the_rows_thread_count(monkeypatch):
    """The float32 forward has a limit per fastembed count (1 and 2 on the big shapes); a dtype's forward runs
    fastembed at the main count alone, so its limit is there alone, moving the dtype's bytes."""
    monkeypatch.setattr(cases, "is_limit", lambda nbytes: True)
    data = shapes.make_data(DTYPE_TINY)
    ctx = cases.Context(threads=2, fe_threads=(2, 1))
    limits = lambda case: sorted(m.threads for m in case.methods if m.family == "memory")  # noqa: E731
    assert limits(cases.build_case(data, "forward", ctx)) == [1, 2]
    case = cases.build_case(data, "forward", ctx, "float64")
    assert limits(case) == [2] and [m.threads for m in case.methods if m.family == "fastembed"][:1] == [2]
    (limit,) = [m for m in case.methods if m.family == "memory"]
    assert 12 * len(limit.run.c) * limit.scale == pytest.approx(cases.traffic("forward", data, 8))


# ---------------------------------------------------------------- --dtypes: train per table dtype

def np_dtype_of(dtype):
    return __import__("ml_dtypes").bfloat16 if dtype == "bfloat16" else np.dtype(dtype)


def rounded(table, dtype):
    """A float32 table rounded to dtype (to nearest even), in float64."""
    return table.astype(np_dtype_of(dtype)).astype(np.float64)


def train_dtype_oracle(data, group, hyper, dtype):
    """The table after train.CHECK_STEPS steps of group with hyper by torch's formulas, in float64 numpy from the
    table rounded to dtype (each step moves the rows its ids touch; dense Adam every row, by 0 where G is 0):
    SparseAdam adds eps before the bias correction, Adam after it. The summed gradient G is exact, but dense
    Adam's: a dense gradient of a half table is a table of that dtype, each lookup added in id order and rounded
    (np.add.at in the dtype), as torch's dense backward and fastembed.torch's both give it."""
    w = rounded(data.token_table, dtype)
    g = data.grad_hidden.reshape(-1, TINY.dim)
    if group == "Adam":
        G = np.zeros(w.shape, np_dtype_of(dtype))
        np.add.at(G, data.ids.reshape(-1), g.astype(G.dtype))
        G = G.astype(np.float64)
    else:
        G = np.zeros_like(w)
        np.add.at(G, data.ids.reshape(-1), rounded(g, dtype))
    touched = np.zeros(len(w), bool)
    touched[data.ids.reshape(-1)] = True
    if group == "Adam":
        touched[:] = True
    lr, eps = hyper["lr"], hyper.get("eps")
    m, v, s = np.zeros_like(w), np.zeros_like(w), np.zeros((len(w), 1))
    for t in range(1, train.CHECK_STEPS + 1):
        if group == "SGD":
            upd = lr * G
        elif group == "Adagrad":
            v += G * G
            upd = lr * G / (np.sqrt(v) + eps)
        elif group == "RowWiseAdagrad":
            s += (G * G).mean(axis=1, keepdims=True)
            upd = lr * G / (np.sqrt(s) + eps)
        else:
            b1, b2 = hyper["betas"]
            m = b1 * m + (1 - b1) * G
            v = b2 * v + (1 - b2) * G * G
            if group == "SparseAdam":
                upd = lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
            else:
                upd = lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        w = np.where(touched[:, None], w - upd, w)
    return w, touched


TRAIN_DTYPES = ["float64", "float16", "bfloat16"]


def numpy_dtype_rows(group):
    """The numpy API's rows of a group, in the float32 case's order: coalesced, coalesce=False, fused."""
    rows = [train.numpy_row_name(group)]
    if group in train.NUMPY_FUSED_GROUPS:
        rows += [train.numpy_lookups_row_name(group), train.numpy_fused_row_name(group)]
    return rows


def train_dtype_rows(group, numpy=True, torch=True):
    """The rows `train <dtype>` has in group: fastembed.torch's (the drop-in first), the numpy API's, torch's, the
    limit (numpy=False: bfloat16 without ml_dtypes; torch=False: a run without PyTorch)."""
    rows = [name for name, g, *_ in train.FASTEMBED_TORCH_ROWS if g == group] if torch else []
    rows += [train.DTYPE_ADAM_ROW[0]] if group == "Adam" and torch else []
    rows += numpy_dtype_rows(group) if numpy else []
    rows += [train.torch_row_name(group)] if group != "RowWiseAdagrad" and torch else []
    return rows + [OVERHEAD_NAME]


def is_numpy_row(name):
    return name.startswith("fastembed numpy API")


def halves_cold_rows(dtype, name, group):
    """Whether a row of `train <dtype>` is checked on the table rows named at most twice alone: torch's sparse rows
    and the numpy API's coalesced SGD, on half tables."""
    return dtype in train.HALF_DTYPES and (
        (name == train.torch_row_name(group) and group != "Adam") or name == train.numpy_row_name("SGD"))


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
def test_train_dtype_case_rows_step_as_their_optimizers(dtype, monkeypatch):
    """`train <dtype>`: per group fastembed.torch's drop-in (the anchor) and fused rows, the numpy API's rows of the
    float32 case, torch's row and a limit of the dtype's bytes, no FBGEMM rows (a note says why); each row times
    tables of the dtype (the numpy API's layers are handed tables of the dtype, timed and checked), moves as the
    float64 oracle of its optimizer (within the dtype's tolerance), and the case passes its check."""
    if dtype == "bfloat16" and not HAS_ML_DTYPES:
        pytest.skip("the bfloat16 oracle needs ml_dtypes")
    data, ctx = tiny_data(), torch_ctx()
    case = cases.build_case(data, "train", ctx, dtype)
    assert case.op == f"train {dtype}" and case.dtype == dtype
    assert [(m.group, m.name) for m in case.methods] == [(g, n) for g in train.GROUPS for n in train_dtype_rows(g)]
    assert train.FBGEMM_DTYPE_SKIP in case.skips and train.NUMPY_BFLOAT16_SKIP not in case.skips
    itemsize = 8 if dtype == "float64" else 2
    counts = np.bincount(data.ids.reshape(-1), minlength=TINY.vocab)
    cold = counts <= train.TORCH_HALF_CHECK_LOOKUPS
    assert not cold.all()  # row 2 is named three times: the halves' torch sparse rows skip it
    hyper = train.HALF_CHECK_HYPER if dtype in ("float16", "bfloat16") else train.CHECK_HYPER
    tol = {"float64": 1e-12, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    layer_dtypes = []  # the dtype of every table a numpy API layer is built from
    pretrained = fastembed.Embedding.from_pretrained.__func__

    def recording(cls, weight, **kwargs):
        layer_dtypes.append(np.asarray(weight).dtype)
        return pretrained(cls, weight, **kwargs)

    monkeypatch.setattr(fastembed.Embedding, "from_pretrained", classmethod(recording))
    for m in case.methods:
        if m.family == "overhead":
            assert m.nbytes == train.step_bytes(m.group, data, itemsize)
            continue
        assert m.anchor == (m.family == "torch" or m.name == train_dtype_rows(m.group)[0]), m.name
        layer_dtypes.clear()
        run = m.make()
        run()
        (got,) = m.result()
        if is_numpy_row(m.name):  # the timed layer and the checked one
            assert layer_dtypes == [shapes.numpy_dtype(dtype)] * 2, (m.name, layer_dtypes)
        want, _ = train_dtype_oracle(data, m.group, hyper[m.group], dtype)
        rows = np.arange(TINY.vocab)
        if halves_cold_rows(dtype, m.name, m.group):
            np.testing.assert_array_equal(m.check_rows, rows[cold])
            if m.family == "torch":
                rows = rows[cold]
        else:
            assert m.check_rows is None
        assert got.dtype == (np.float64 if dtype == "float64" else np.float32), m.name  # halves widened, exactly
        np.testing.assert_allclose(got[rows], want[rows], rtol=tol, atol=tol, err_msg=m.name)
        start = rounded(data.token_table, dtype)
        # rows no id names keep the bits of the table rounded to dtype (dense Adam moves them by 0)
        assert (counts == 0).any() and np.array_equal(got[counts == 0], start[counts == 0]), m.name
        moved = rows[counts[rows] > 0]  # each moved by its update: off the oracle by less than it moved
        assert (np.abs(got[moved] - want[moved]).max(axis=1) < np.abs(got[moved] - start[moved]).max(axis=1)).all()
    monkeypatch.undo()
    cases.verify(case, ctx)
    checks = {m.name: case.checks[cases.method_key(m)] for m in case.methods if m.family != "overhead"}
    for group in train.GROUPS:
        anchor, *others = [n for n in train_dtype_rows(group) if n != OVERHEAD_NAME]
        assert checks[anchor] == "baseline"
        for name in others:
            if halves_cold_rows(dtype, name, group):
                assert checks[name].endswith(f" on {cold.sum()} of {TINY.vocab} rows"), checks[name]
            elif name.startswith("fastembed.torch") or (is_numpy_row(name) and group != "SGD"):
                # each rounds once per stored element (the numpy API's SparseAdam checked with torch's eps)
                assert checks[name] == "bitwise", (name, checks[name])
            elif is_numpy_row(name):  # float64's SGD: each lookup moved in another order
                assert checks[name] == "bitwise" or checks[name].startswith("close"), (name, checks[name])
    half_notes = [train.torch_half_check_note(cold.sum(), TINY.vocab), train.numpy_half_sgd_note(cold.sum(), TINY.vocab)]
    assert [n in case.skips for n in half_notes] == [dtype != "float64"] * 2


def numpy_buggy_row(data, m, dtype, bug):
    """The numpy API row m of `train <dtype>` rebuilt with its step broken, "still" (the table never moves) or
    "twice" (two updates per step), with the case's check settings (SparseAdam's with torch's eps)."""
    arrays, _ = shapes.in_dtype((data.token_table, data.grad_hidden), dtype, None)
    if m.name == train.numpy_fused_row_name(m.group):
        state, kwargs = train.numpy_fused_state, {}
    else:
        state, kwargs = train.numpy_api_state, {"coalesce": m.name != train.numpy_lookups_row_name(m.group)}

    def factory(hyper, torch_eps=False):
        step, weights = state(data, m.group, hyper, arrays=arrays, torch_eps=torch_eps, **kwargs)
        if bug == "still":
            return (lambda: None), weights
        return (lambda: (step(), step())), weights

    check_hyper = train.HALF_CHECK_HYPER if dtype in train.HALF_DTYPES else train.CHECK_HYPER
    return train.row(m.name, "fastembed", m.group, factory, m.threads, check_hyper=check_hyper,
                     check_rows=m.check_rows, check_factory=functools.partial(factory, torch_eps=True))


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
@pytest.mark.parametrize("bug", ["still", "twice"])
def test_train_dtype_check_fails_on_a_numpy_row_that_misses_or_doubles_its_update(dtype, bug):
    """Each numpy API row of `train <dtype>` is checked against fastembed.torch's drop-in: one whose step does not
    update, or updates twice, fails the check before timing (and the rows as built pass it)."""
    if dtype == "bfloat16" and not HAS_ML_DTYPES:
        pytest.skip("bench.shapes.in_dtype's bfloat16 arrays need ml_dtypes")
    data, ctx = tiny_data(), torch_ctx()
    case = cases.build_case(data, "train", ctx, dtype)
    numpy_rows = [m for m in case.methods if is_numpy_row(m.name)]
    assert len(numpy_rows) == 1 + 3 * len(train.NUMPY_FUSED_GROUPS)
    for m in numpy_rows:
        k = case.methods.index(m)
        case.methods[k] = numpy_buggy_row(data, m, dtype, bug)
        with pytest.raises(cases.CheckError, match=f"train {dtype}: {re.escape(m.name)}"):
            cases.verify(case, ctx)
        case.methods[k] = m
    cases.verify(case, ctx)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
@pytest.mark.parametrize("group", ["SGD", "Adagrad", "SparseAdam"])
@pytest.mark.parametrize("bug", ["still", "twice"])
def test_train_bfloat16_check_fails_on_a_row_that_misses_or_doubles_its_update(group, bug):
    """bfloat16 has the loosest tolerance, and torch's sparse rows are checked on some table rows alone: a torch
    row whose step does not update, or updates twice, still fails the check before timing."""
    if not HAS_ML_DTYPES:
        pytest.skip("bench.shapes.in_dtype's bfloat16 arrays need ml_dtypes")
    data, ctx = tiny_data(), torch_ctx()
    case = cases.build_case(data, "train", ctx, "bfloat16")
    [torch_row] = [m for m in case.methods if m.group == group and m.family == "torch"]
    _, tables = shapes.in_dtype((data.token_table, data.grad_hidden), "bfloat16", ctx.torch)

    def factory(hyper):
        step, weights = train.torch_state(data, ctx.torch, group, hyper, tables)
        if bug == "still":  # the table never moves
            return (lambda: None), weights
        return (lambda: (step(), step())), weights  # two updates per step

    buggy = train.row(torch_row.name, "torch", group, factory, torch_row.threads, anchor=True,
                      check_hyper=train.HALF_CHECK_HYPER, check_rows=torch_row.check_rows)
    case.methods[case.methods.index(torch_row)] = buggy
    with pytest.raises(cases.CheckError, match=f"train bfloat16: {re.escape(torch_row.name)}"):
        cases.verify(case, ctx)


def test_train_step_bytes_scale_with_the_itemsize():
    """A step on a table of another dtype moves the same elements (the upstream gradient and every state have the
    table's dtype): float64 twice float32's bytes, the halves half of them."""
    data = tiny_data()
    for group in train.GROUPS:
        f32 = train.step_bytes(group, data)
        assert (train.step_bytes(group, data, 8), train.step_bytes(group, data, 2)) == (2 * f32, f32 // 2), group


@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
def test_train_dtype_case_without_torch_keeps_the_numpy_rows(dtype):
    """Without PyTorch `train <dtype>` has the numpy API's rows alone (notes say why): the coalesced row anchors its
    group but on half tables SGD's (checked on some table rows, it cannot anchor: the coalesce=False row does);
    each row moves as the float64 oracle, and the case passes its check."""
    if dtype == "bfloat16" and not HAS_ML_DTYPES:
        pytest.skip("the bfloat16 oracle needs ml_dtypes")
    data, ctx = tiny_data(), cases.Context(threads=1, fe_threads=(1,))
    case = cases.build_case(data, "train", ctx, dtype)
    rows = [(g, n) for g in train.GROUPS for n in train_dtype_rows(g, torch=False)]
    assert [(m.group, m.name) for m in case.methods] == rows
    half = dtype in train.HALF_DTYPES
    anchors = [m.name for m in case.methods if m.anchor]
    assert anchors == [train.numpy_lookups_row_name("SGD") if half else train.numpy_row_name("SGD")] + [
        train.numpy_row_name(g) for g in train.GROUPS[1:]]
    cold = np.bincount(data.ids.reshape(-1), minlength=TINY.vocab) <= train.TORCH_HALF_CHECK_LOOKUPS
    assert case.skips == [train.FBGEMM_DTYPE_SKIP, "torch and fastembed.torch rows: skipped (no PyTorch in this run)"] + (
        [train.numpy_half_sgd_note(cold.sum(), TINY.vocab)] if half else [])
    hyper = train.HALF_CHECK_HYPER if half else train.CHECK_HYPER
    tol = {"float64": 1e-12, "float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    for m in case.methods:
        if m.family != "overhead":
            (got,) = m.result()
            want, _ = train_dtype_oracle(data, m.group, hyper[m.group], dtype)
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=m.name)
    cases.verify(case, ctx)
    sgd = case.checks[cases.method_key(case.methods[0])]
    assert sgd.endswith(f" on {cold.sum()} of {TINY.vocab} rows") if half else sgd == "baseline"


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_train_half_case_passes_its_check_with_a_hot_row(dtype):
    """A row named 128 times (a zipf head): on it the numpy API's coalesced SGD (one rounding of the row's summed
    gradient) and the anchor (a rounding per lookup) drift apart beyond the tolerance, so that row's check covers
    the other rows alone and the case passes; checked on every row, it would not."""
    if dtype == "bfloat16" and not HAS_ML_DTYPES:
        pytest.skip("bench.shapes.in_dtype's bfloat16 arrays need ml_dtypes")
    data, ctx = shapes.make_data(shapes.Shape("seed-1x16", 597, 16, 32, 1, 256)), torch_ctx()
    data.ids[0, :128] = 0
    case = cases.build_case(data, "train", ctx, dtype)
    [sgd] = [m for m in case.methods if m.name == train.numpy_row_name("SGD")]
    counts = np.bincount(data.ids.reshape(-1), minlength=597)
    cold = np.flatnonzero(counts <= train.TORCH_HALF_CHECK_LOOKUPS)
    assert counts[0] >= 128 and counts[cold].sum() > 100  # the check still compares the rows of 100+ lookups
    np.testing.assert_array_equal(sgd.check_rows, cold)
    cases.verify(case, ctx)
    assert case.checks[cases.method_key(sgd)].endswith(f" on {len(cold)} of 597 rows")
    sgd.check_rows = None
    with pytest.raises(cases.CheckError, match=re.escape(f"train {dtype}: {sgd.name}")):
        cases.verify(case, ctx)


@pytest.mark.parametrize("with_torch", [True, False])
def test_train_dtype_case_leaves_dense_adam_out_of_a_big_table(monkeypatch, with_torch):
    """Over DENSE_MAX_ELEMENTS every dense Adam row of `train float16` is left out, the numpy API's too, and a note
    names each one; the sparse groups keep every row."""
    if with_torch and not HAS_TORCH:
        pytest.skip("PyTorch is not installed")
    data = tiny_data()
    monkeypatch.setattr(train, "DENSE_MAX_ELEMENTS", data.token_table.size - 1)
    ctx = torch_ctx() if with_torch else cases.Context(threads=1, fe_threads=(1,))
    case = cases.build_case(data, "train", ctx, "float16")
    assert [(m.group, m.name) for m in case.methods] == [
        (g, n) for g in train.GROUPS[:-1] for n in train_dtype_rows(g, torch=with_torch)]
    left_out = [train.numpy_row_name("Adam")] + ([train.DTYPE_ADAM_ROW[0], train.torch_row_name("Adam")]
                                                 if with_torch else [])
    assert (f"{', '.join(left_out)}: skipped, a dense step rewrites all {data.token_table.size:,} elements of the "
            f"table (over {data.token_table.size - 1:,})") in case.skips


@pytest.mark.parametrize("with_torch", [True, False])
def test_train_bfloat16_without_ml_dtypes_leaves_the_numpy_rows_out(monkeypatch, with_torch):
    """Without ml_dtypes (numpy has no bfloat16) `train bfloat16` has fastembed.torch's and torch's rows alone and
    a note saying why the numpy API's are missing; with neither ml_dtypes nor torch, no rows and a note."""
    if with_torch and not HAS_TORCH:
        pytest.skip("PyTorch is not installed")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` raises ImportError
    ctx = torch_ctx() if with_torch else cases.Context(threads=1, fe_threads=(1,))
    case = cases.build_case(tiny_data(), "train", ctx, "bfloat16")
    if not with_torch:
        assert case.methods == [] and case.skips == ["skipped: bfloat16 needs ml_dtypes (the numpy API) or PyTorch"]
        return
    assert [(m.group, m.name) for m in case.methods] == [
        (g, n) for g in train.GROUPS for n in train_dtype_rows(g, numpy=False)]
    assert case.skips[0] == train.NUMPY_BFLOAT16_SKIP and "ml_dtypes" in train.NUMPY_BFLOAT16_SKIP
    assert not any(is_numpy_row(m.name) for m in case.methods)
    cases.verify(case, ctx)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
def test_dtypes_option_runs_the_train_op_per_dtype(tmp_path):
    """--dtypes float32,float16 runs train as `train` (float32's rows, unchanged) and `train float16`."""
    text, doc = run_bench(tmp_path, "--shapes", "seed-1x16", "--ops", "train", "--dtypes", "float16,float32",
                          "--threads", "1")
    results = doc["results"]
    assert list(dict.fromkeys(r["op"] for r in results)) == ["train", "train float16"]
    float32 = {r["method"] for r in results if r["op"] == "train"}
    assert {train.numpy_row_name(g) for g in train.GROUPS} <= float32 and train.DTYPE_ADAM_ROW[0] not in float32
    half = [r for r in results if r["op"] == "train float16"]
    assert [(r["group"], r["method"]) for r in half] == [(g, n) for g in train.GROUPS for n in train_dtype_rows(g)]
    assert all(r["dtype"] == "float16" for r in half)
    assert all(r["check"] in ("baseline", "bitwise") or r["check"].startswith("close") for r in half
               if r["family"] != "overhead")
    printed = {(op, method) for op, method, _ in table_rows(text, "seed-1x16")}
    assert all(("train float16", r["method"]) in printed for r in half)
    assert not any("numpy API" in n for n in doc["notes"] if n.startswith("train float16"))  # seed-1x16: 16 ids
    numpy_checks = [r["check"] for r in half if is_numpy_row(r["method"])]
    assert len(numpy_checks) == 1 + 3 * len(train.NUMPY_FUSED_GROUPS) and "baseline" not in numpy_checks
    assert not [t for t in doc["targets"] if "float16" in t["target"]]  # the train targets are float32's
