"""Shared pytest setup: make tests/_helpers.py importable (pytest runs with --import-mode=importlib),
and let CI demand the optional parts of the suite.

FASTEMBED_REQUIRE=torch,fuzz (any subset, comma-separated) turns the skips that would follow a missing
optional part into an error at start-up: `torch` needs PyTorch importable, `fuzz` needs scripts/fuzz.py
beside tests/. .ci/run sets it for every stage that tests an installed artifact, so a stage cannot pass
by skipping the torch adapter or the fuzz run.

FASTEMBED_EXPECTED_SKIPS=word|word... fails the session when a test skips for a reason that contains none
of the words (case-insensitive). The stages without torch set it to the reasons they expect (torch missing,
an installed package without the source tree), so a test of the kernels that starts skipping there for
another reason fails the stage instead of hiding in the count of torch skips.
"""
import importlib.util
import os
import sys

import pytest
from hypothesis import settings

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

_REQUIREMENTS = {
    "torch": ("PyTorch must be importable (pip install torch==2.13.0)",
              lambda: importlib.util.find_spec("torch") is not None),
    "fuzz": ("scripts/fuzz.py must be beside tests/ (copy scripts/ with the tests)",
             lambda: os.path.exists(os.path.join(os.path.dirname(_HERE), "scripts", "fuzz.py"))),
}


# Hypothesis loads its "ci" profile when the environment says CI (the CI variable, among others); that
# profile derandomizes: one fixed seed per test, and --hypothesis-seed, which .ci/run and
# scripts/mutants.py print so a failure can be replayed, would be ignored. The suite is meant to pass
# with any seed, and CI is where that is checked: keep the profile's other settings, not that one.
if settings.default.derandomize:
    settings.register_profile("fastembed-ci", parent=settings.default, derandomize=False)
    settings.load_profile("fastembed-ci")


def pytest_configure(config):
    wanted = [w.strip() for w in os.environ.get("FASTEMBED_REQUIRE", "").split(",") if w.strip()]
    unknown = [w for w in wanted if w not in _REQUIREMENTS]
    if unknown:
        raise pytest.UsageError(f"FASTEMBED_REQUIRE names unknown parts {unknown}; known: {sorted(_REQUIREMENTS)}")
    missing = [message for w in wanted for message, present in [_REQUIREMENTS[w]] if not present()]
    if missing:
        raise pytest.UsageError("FASTEMBED_REQUIRE: " + "; ".join(missing))


def _expected_skips():
    return [w.strip().lower() for w in os.environ.get("FASTEMBED_EXPECTED_SKIPS", "").split("|") if w.strip()]


_UNEXPECTED_SKIPS = []


def _check_skip(report):
    words = _expected_skips()
    if words and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if not any(w in reason.lower() for w in words):
            _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):  # a test that skips
    _check_skip(report)


def pytest_collectreport(report):  # a whole file that skips as it is imported (importorskip, allow_module_level)
    _check_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if _UNEXPECTED_SKIPS:
        print("\nFASTEMBED_EXPECTED_SKIPS: tests skipped for a reason this stage does not expect:", file=sys.stderr)
        for line in _UNEXPECTED_SKIPS:
            print(f"  {line}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True, scope="session")
def _poisoned_fresh_arrays():
    """Every array a kernel allocates uninitialised and must write in full starts as 0xFF bytes (NaN in
    every float format; `fastembed._kernels._poison`) in every test: a loop that leaves an element
    unwritten, or adds to it instead of writing it, shows NaN whatever memory the allocator hands back."""
    from fastembed import _kernels
    _kernels._poison(True)
    yield
    _kernels._poison(False)
