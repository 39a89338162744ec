"""Hardening (issue 6): a short, bounded fuzz run over the argument-checking layer.

scripts/fuzz.py throws random argument types, values, shapes and layouts at every
entry point, the private fastembed._kernels functions included, in a child
process it watches. The run must not crash (the process dying is a crash; the
DESIGN.md exception classes are fine). Exceptions of other classes do not fail
the run: they are listed in a warning, for the report.

FASTEMBED_FUZZ_SECONDS (default 8) and FASTEMBED_FUZZ_SEED (default 0) set the run.
"""
import json
import os
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "fuzz.py")
SECONDS = float(os.environ.get("FASTEMBED_FUZZ_SECONDS", "8"))
SEED = int(os.environ.get("FASTEMBED_FUZZ_SEED", "0"))

pytestmark = pytest.mark.skipif(not os.path.exists(SCRIPT), reason="scripts/fuzz.py is not in this tree")


def fuzz(seconds, seed, env=None):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--seconds", str(seconds), "--engine", "random", "--seed", str(seed)],
        capture_output=True, text=True, timeout=seconds + 300, env={**os.environ, **(env or {})}, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output (return code {proc.returncode}): {proc.stderr[-3000:]}"
    return proc.returncode, json.loads(lines[-1]), proc.stderr


def test_fuzz_run_finds_no_crash():
    rc, summary, stderr = fuzz(SECONDS, SEED)
    crashes = summary["crashes"]
    assert not crashes, "the fuzzer crashed fastembed:\n" + "\n".join(
        f"{c['kind']} (return code {c['returncode']}), reproduce with: {c['replay']}\n{c['stderr_tail'][-1500:]}"
        for c in crashes)
    assert rc == 0, stderr[-3000:]
    assert summary["iterations"] > 100, summary
    assert any(k.startswith("_kernels.") for k in summary["by_target"]), "the private kernels were not reached"
    if summary["other"]:
        warnings.warn(
            "fuzz: exception classes outside DESIGN.md's contract (not failures): " + "; ".join(
                f"{name} x{e['count']}: {e['example']['message'][:120]!r} (input {e['example']['input']})"
                for name, e in sorted(summary["other"].items())),
            stacklevel=1)


def test_fuzz_reports_a_crash_and_goes_on():
    """The supervisor's own test: a worker killed by SIGABRT at input 30 is reported with the command
    that replays it, and fuzzing continues from input 31."""
    rc, summary, stderr = fuzz(2, 5, env={"FASTEMBED_FUZZ_SELFTEST_CRASH": "30"})
    assert rc == 1
    assert [(c["kind"], c["iteration"]) for c in summary["crashes"]] == [("crash", 30)], summary["crashes"]
    assert "--replay 5:30" in summary["crashes"][0]["replay"]
    assert summary["iterations"] > 31
