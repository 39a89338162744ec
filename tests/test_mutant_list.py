"""The mutation check's list (scripts/mutants.py) against the source it plants bugs in: a mutant whose
text no longer occurs exactly once in its file is STALE and fails the whole run, and only the quick
subset runs in CI. This catches a stale one when the source moves, in every run of the suite."""
import importlib.util
import os
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "mutants.py")

if not (os.path.exists(SCRIPT) and os.path.isdir(os.path.join(ROOT, "fastembed"))):
    pytest.skip("the mutation list checks the source tree (scripts/ and fastembed/ beside tests/)",
                allow_module_level=True)


def _mutants():
    spec = importlib.util.spec_from_file_location("_fastembed_mutants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTANTS


MUTANTS = _mutants()


def test_ids_are_unique():
    ids = [m.id for m in MUTANTS]
    assert len(ids) == len(set(ids)), sorted(i for i in set(ids) if ids.count(i) > 1)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.id)
def test_each_mutant_plants_exactly_one_change_and_names_existing_tests(mutant):
    with open(os.path.join(ROOT, mutant.file)) as f:
        source = f.read()
    assert source.count(mutant.old) == 1, f"{mutant.id}: its text occurs {source.count(mutant.old)} times in {mutant.file}"
    assert mutant.new != mutant.old
    files = [a for a in mutant.tests if a.startswith("tests/")]
    assert files, f"{mutant.id} names no test file: {shlex.join(mutant.tests)}"
    for name in files:
        assert os.path.exists(os.path.join(ROOT, name.split("::")[0])), f"{mutant.id}: no {name}"
