"""The benchmark suite runs end to end in quick mode: tables with the expected rows, a JSON file.

These tests check that `python -m bench` works, never how fast anything is. The
suite runs in a subprocess (it sets thread counts that must not leak into other
tests); they skip where bench/ is absent (tests run from a copy of tests/ alone).
"""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastembed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isfile(os.path.join(ROOT, "bench", "__init__.py")):
    pytest.skip("bench/ is not beside tests/ (a copy of the tests alone)", allow_module_level=True)
if ROOT not in sys.path:
    sys.path.append(ROOT)  # appended: an installed fastembed keeps precedence over the source folder

from bench import cases, shapes  # noqa: E402
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
    """(op, method, threads) of every row of a shape's markdown table."""
    section = text.split(f"### {shape}:")[1].split("###")[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 3 and cells[0] not in ("op", "---"):
            rows.append((cells[0], cells[1], int(cells[2])))
    return rows


def test_seed_default_rows_json_and_targets(tmp_path):
    text, doc = run_bench(tmp_path, "--no-torch")
    for shape in ("seed-1x16", "seed-32x16"):
        names = {(op, method) for op, method, _ in table_rows(text, shape)}
        for op in cases.OPS:
            assert (op, "fastembed") in names and (op, "memory limit") in names
        assert ("forward", "numpy tok[ids] + pos[p]") in names
        assert ("backward", "numpy np.add.at") in names
        assert ("sparse", "numpy unique + np.add.at") in names
        assert ("forward", "reference (Values)") in names and ("backward", "reference backward()") in names
        assert not any("torch" in m for _, m in names)
    assert "medium" not in {r["shape"] for r in doc["results"]}
    env = doc["environment"]
    for key in ("python", "numpy", "torch", "fastembed", "cpu_count", "threads"):
        assert key in env
    assert env["torch"] is None
    targets = {t["target"]: t["status"] for t in doc["targets"]}
    assert set(targets.values()) <= {"PASS", "MISS"}
    assert "seed forward, one sentence" in targets and "seed fused backward into both tables" in targets
    assert any("--no-torch" in n for n in doc["notes"])
    checks = {(r["op"], r["method"]): r["check"] for r in doc["results"] if r["shape"] == "seed-1x16"}
    assert checks[("forward", "numpy tok[ids] + pos[p]")] == "bitwise"
    assert checks[("backward", "numpy np.add.at")] == "bitwise"


def test_all_scaled_has_every_shape_threads_and_skipped_torch_targets(tmp_path):
    text, doc = run_bench(tmp_path, "--all", "--scale", "0.01", "--no-torch", "--threads", "2")
    threaded = fastembed.openmp_enabled()  # a build without OpenMP (macOS wheels) runs everything on 1 thread
    for shape in ("medium", "wide-uniform", "wide-zipf"):
        rows = table_rows(text, shape)
        assert {(op, "fastembed", 1) for op in ("forward", "backward", "sparse", "step-sparse")} <= set(rows)
        if threaded:
            assert {(op, "fastembed", 2) for op in cases.OPS} <= set(rows)
            assert ("forward", "memory limit", 1) in rows and ("forward", "memory limit", 2) in rows
    assert {s["name"] for s in doc["shapes"]} == {s.name for s in shapes.ALL_SHAPES}
    if threaded:
        scaling = doc["thread_scaling"]
        assert len(scaling) == 12 and all(s["bitwise"] for s in scaling)
        assert "### fastembed threads: 1 vs 2" in text
    else:
        assert "skipped: fastembed at 2 threads (built without OpenMP" in text
    by_target = {}
    for t in doc["targets"]:
        by_target.setdefault(t["target"], []).append(t)
    assert all(t["status"] == "SKIPPED" for t in by_target["dense backward no slower than torch index_add_"])
    assert all(t["status"] != "SKIPPED" for t in by_target["dense backward >= 20x faster than np.add.at"])
    assert all("scaled" in t["note"] for t in by_target["dense backward >= 20x faster than np.add.at"])


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")
def test_torch_rows_are_checked_equal(tmp_path):
    _, doc = run_bench(tmp_path, "--shapes", "seed-1x16", "--ops", "forward,backward,sparse")
    torch_rows = [r for r in doc["results"] if r["family"] == "torch"]
    assert {r["method"] for r in torch_rows} >= {"torch F.embedding", "torch index_add_",
                                                 "torch sparse grad + coalesce()"}
    assert all(r["check"] == "bitwise" or r["check"].startswith("close") for r in torch_rows)
    assert all(r["vs_torch"] is not None for r in doc["results"])


def test_a_method_that_computes_something_else_fails_the_check():
    data = shapes.make_data(shapes.SEED_SHAPES[0])
    ctx = cases.Context(threads=1, fe_threads=(1,))
    case = cases.build_case(data, "forward", ctx)
    wrong = lambda: (data.token_table[data.ids] - data.position_table[data.positions],)  # noqa: E731
    case.methods.append(Method("numpy, wrong sign", "numpy", run=wrong, result=wrong))
    with pytest.raises(cases.CheckError, match="wrong sign"):
        cases.verify(case, ctx)


def test_memory_limit_moves_the_bytes_it_names():
    from bench.memlimit import MemoryLimit

    limit = MemoryLimit(3 * 2**20, threads=2)
    out = limit()
    assert np.all(out == 3.0) and limit.parts == 2
    assert abs(12 * out.size * limit.scale - 3 * 2**20) < 1


def test_targets_pass_miss_and_skipped():
    from bench import targets

    def row(op, family, method, ns, threads=2, anchor=True):
        return {"shape": "seed-1x16", "op": op, "family": family, "method": method, "threads": threads,
                "anchor": anchor, "median_ns": ns}

    rows = [row("forward", "fastembed", "fastembed", 400.0), row("forward", "numpy", "numpy tok[ids] + pos[p]", 1000.0)]
    verdicts = {v.target: v for v in targets.judge(rows, [], ["seed-1x16"])}
    assert verdicts["seed forward, one sentence"].status == "PASS"
    assert verdicts["seed forward vs numpy tok[ids] + pos[p]"].status == "MISS"  # 0.4x > 0.25x
    assert verdicts["seed fused backward into both tables"].status == "SKIPPED"
    assert all(v.shape == "seed-1x16" for v in verdicts.values())  # shapes not run are left out
