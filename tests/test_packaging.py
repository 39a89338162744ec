"""Packaging: the version's one source, the Qdrant name clash, stubs that match the code, and
(with FASTEMBED_EXPECT_INSTALLED=1, as .ci/run and cibuildwheel set it) that the package under
test is the installed one, not a source tree; with FASTEMBED_EXPECT_BUNDLED_LIBGOMP=1 (.ci/run, for
the wheels auditwheel repaired) that it runs on the libgomp the wheel carries."""
import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import fastembed as fe

DIST = "fastembed-kernels"
PACKAGE_DIR = Path(fe.__file__).resolve().parent


def _installed_version():
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{DIST} is not installed (an in-place build run without pip install)")


def test_version_has_one_source_and_matches_the_installed_metadata():
    from fastembed._version import __version__

    assert fe.__version__ == __version__
    assert fe.__version__ == _installed_version()


@pytest.mark.skipif(os.environ.get("FASTEMBED_EXPECT_INSTALLED") != "1",
                    reason="set FASTEMBED_EXPECT_INSTALLED=1 when testing an installed wheel or sdist")
def test_the_package_under_test_is_the_installed_one():
    dist = metadata.distribution(DIST)
    listed = {str(f).replace("\\", "/") for f in dist.files or ()}
    assert "fastembed/__init__.py" in listed, f"{DIST} is an editable install: {sorted(listed)[:5]}"
    assert Path(dist.locate_file("fastembed/__init__.py")).resolve() == Path(fe.__file__).resolve()
    assert Path(fe._kernels.__file__).resolve().parent == PACKAGE_DIR
    assert not (PACKAGE_DIR.parent / "setup.py").exists(), f"imported from a source tree: {PACKAGE_DIR}"
    for name in ("py.typed", "_kernels.pyi"):
        assert (PACKAGE_DIR / name).is_file(), f"the wheel lacks fastembed/{name}"


_LIBGOMP_IN_USE = """
import json, numpy as np
import fastembed as fe
fe.set_num_threads(2)
table = np.ones((64, 1024), np.float32)
out = fe.gather(table, np.zeros(64, np.int64))  # 65,536 elements: past the serial threshold
maps = {line.split(None, 5)[5].strip() for line in open("/proc/self/maps") if len(line.split(None, 5)) == 6}
print(json.dumps({"file": fe.__file__, "openmp": fe.openmp_enabled(), "threads": fe._kernels._last_call_threads(),
                  "sum": float(out.sum()), "gomp": sorted(m for m in maps if "libgomp" in m.rsplit("/", 1)[-1])}))
"""


@pytest.mark.skipif(os.environ.get("FASTEMBED_EXPECT_BUNDLED_LIBGOMP") != "1",
                    reason="set FASTEMBED_EXPECT_BUNDLED_LIBGOMP=1 when testing a wheel auditwheel repaired (Linux)")
def test_the_repaired_wheel_runs_on_the_libgomp_it_carries(tmp_path):
    """auditwheel copied libgomp into fastembed_kernels.libs/ and pointed the extension at the copy: a
    fresh interpreter importing fastembed maps that copy and no other libgomp (not the system's,
    which the machine that built the wheel had and a user's may lack), and a call past the serial
    threshold really runs an OpenMP team on it."""
    dist = metadata.distribution(DIST)
    bundled = [f for f in dist.files or () if str(f).replace("\\", "/").startswith("fastembed_kernels.libs/libgomp-")]
    assert len(bundled) == 1, f"the installed wheel lists {bundled} in fastembed_kernels.libs/, not one libgomp"
    copy = Path(dist.locate_file(bundled[0])).resolve()
    assert copy.is_file()
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_DIR.parent))
    env.pop("FASTEMBED_NUM_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-c", _LIBGOMP_IN_USE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert Path(seen["file"]).resolve() == Path(fe.__file__).resolve()
    assert seen["openmp"] is True
    assert [Path(m).resolve() for m in seen["gomp"]] == [copy], f"libgomp mapped: {seen['gomp']}, bundled: {copy}"
    cpus = len(os.sched_getaffinity(0))
    assert seen["threads"] == min(2, cpus)
    assert seen["sum"] == 64 * 1024


# ---------------------------------------------------------------- Qdrant's `fastembed`

_IMPORT_AND_REPORT = """
import json, sys, warnings
if sys.argv[1] == "preload":
    import importlib.metadata  # the warning takes a shortcut when this is not loaded yet
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastembed
    import fastembed  # cached: no second warning
print(json.dumps([[w.category.__name__, str(w.message)] for w in caught]))
"""


def _import_warnings(tmp_path, extra_path=(), preload=False):
    """The warnings `import fastembed` gives in a fresh interpreter with extra_path first on sys.path."""
    # The package's parent folder goes on the path too, so the child imports the same fastembed
    # as this process (for example an in-place build that only pytest's rootdir made importable).
    path = [str(p) for p in extra_path] + [str(PACKAGE_DIR.parent)]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    env.pop("FASTEMBED_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-c", _IMPORT_AND_REPORT, "preload" if preload else "-"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [(category, message) for category, message in json.loads(proc.stdout.splitlines()[-1])
            if "fastembed" in message]


def _fake_qdrant_fastembed(folder, version="0.7.3"):
    info = folder / f"fastembed-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fastembed\nVersion: {version}\n")
    (info / "top_level.txt").write_text("fastembed\n")
    return folder


@pytest.mark.parametrize("preload", [False, True], ids=["cold", "metadata-loaded"])
def test_warns_once_when_qdrant_fastembed_is_installed_too(tmp_path, preload):
    site = _fake_qdrant_fastembed(tmp_path / "site")
    found = _import_warnings(tmp_path, [site], preload)
    assert len(found) == 1, found
    category, message = found[0]
    assert category == "UserWarning"
    assert "fastembed-kernels" in message and "`fastembed` 0.7.3" in message
    assert "collide" in message


def test_no_warning_without_qdrant_fastembed(tmp_path):
    try:
        metadata.distribution("fastembed")
    except metadata.PackageNotFoundError:
        pass
    else:
        pytest.skip("Qdrant's fastembed really is installed here")
    assert _import_warnings(tmp_path) == []
    assert _import_warnings(tmp_path, preload=True) == []


# ---------------------------------------------------------------- type stubs

def _stub_signatures(stub):
    """{name: [(parameter, kind, has_default)]} for the top-level functions of a .pyi file."""
    found = {}
    for node in ast.parse(stub.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            a = node.args
            positional = a.posonlyargs + a.args
            defaults = [False] * (len(positional) - len(a.defaults)) + [True] * len(a.defaults)
            params = [(p.arg, "POSITIONAL_ONLY" if p in a.posonlyargs else "POSITIONAL_OR_KEYWORD", d)
                      for p, d in zip(positional, defaults)]
            params += [(p.arg, "KEYWORD_ONLY", d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
            found[node.name] = params
    return found


def _runtime_signatures(module):
    found = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or not callable(obj) or getattr(obj, "__module__", None) != module.__name__:
            continue
        found[name] = [(p.name, p.kind.name, p.default is not p.empty)
                       for p in inspect.signature(obj).parameters.values()]
    return found


@pytest.mark.parametrize("module_name", ["fastembed._kernels", "fastembed.ops"])
def test_stub_matches_the_module(module_name):
    module = importlib.import_module(module_name)
    stub = PACKAGE_DIR / (module_name.rpartition(".")[2] + ".pyi")
    assert stub.is_file(), f"{stub} is missing (package data?)"
    assert _stub_signatures(stub) == _runtime_signatures(module), (
        f"{stub.name} is out of date with {module_name}: update the stub with the function's signature"
    )


def test_py_typed_marker_is_shipped():
    assert (PACKAGE_DIR / "py.typed").is_file()


@pytest.mark.parametrize("expected, rc", [("torch|processors", 1), ("torch|FASTEMBED_EXPECT_INSTALLED", 0)])
def test_a_skip_the_stage_does_not_expect_fails_the_run(expected, rc):
    # The stages without torch set FASTEMBED_EXPECTED_SKIPS (tests/conftest.py): a test that skips there for
    # a reason other than the ones named must fail the run, not pass as one more skip.
    tests = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k not in ("FASTEMBED_EXPECT_INSTALLED", "FASTEMBED_REQUIRE")}
    env["FASTEMBED_EXPECTED_SKIPS"] = expected
    node = "tests/test_packaging.py::test_the_package_under_test_is_the_installed_one"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                          node], cwd=tests.parent, env=env, capture_output=True, text=True)
    assert run.returncode == rc, run.stdout + run.stderr
    assert ("FASTEMBED_EXPECT_INSTALLED=1 when testing" in run.stderr) == (rc == 1)


@pytest.mark.parametrize("expected, rc", [("torch", 1), ("torch|no such part", 0)])
def test_a_file_that_skips_as_it_is_imported_is_checked_too(tmp_path, expected, rc):
    # importorskip at the top of a file skips the whole file at collection, where no test report is made.
    (tmp_path / "test_skips_whole.py").write_text(
        "import pytest\npytest.skip('no such part here', allow_module_level=True)\n")
    (tmp_path / "test_runs.py").write_text("def test_runs():\n    assert True\n")  # (a run of no test is rc 5)
    tests = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "FASTEMBED_REQUIRE"}
    env["FASTEMBED_EXPECTED_SKIPS"] = expected
    env["PYTHONPATH"] = os.pathsep.join([str(tests)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                          "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == rc, run.stdout + run.stderr
    assert ("no such part here" in run.stderr) == (rc == 1)
