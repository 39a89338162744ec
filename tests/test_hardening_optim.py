"""Hardening (issue 6): the optimizers (fe.optim) given hostile gradients, parameters and settings.

Gradients come in every layout (Fortran, negative strides, strided, misaligned,
read-only, big-endian), of the wrong dtype or shape, and as hand-made SparseGrads
that break its invariants (negative, too large, repeated or unsorted rows, rows
sharing memory with the weight). A step either does what the float32 transcriptions
of tests/test_optim_oracles.py do on the canonical form of the gradient (every
weight, moment and step count, bit for bit) or raises the DESIGN.md error class
having changed nothing: no weight, no moment, no step count.
"""
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import fastembed as fe
from fastembed.optim import SGD, Adam, SparseAdam
from _helpers import arrange
from test_optim_oracles import MODELS, SGDModel, assert_state, same_bits

import os

EXAMPLES = int(os.environ.get("FASTEMBED_HARDENING_EXAMPLES", "150"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F32 = np.dtype(np.float32)
LAYOUTS = ("c", "fortran", "reversed", "strided", "misaligned", "readonly", "bigendian")




def state(opt):
    """Everything a step may change, as comparable values: counters, weights, moments."""
    parts = []
    for name, value in sorted(vars(opt).items()):
        if name == "params":
            parts.append([p.weight.tobytes() for p in value])
        elif isinstance(value, np.ndarray):
            parts.append(value.tobytes())
        elif isinstance(value, list) and value and isinstance(value[0], np.ndarray):
            parts.append([a.tobytes() for a in value])
        elif isinstance(value, (int, float, list, tuple)):
            parts.append(repr(value))
    return parts


def canonical(grad, D):
    """The same gradient as the optimizers are documented to take it: a native float32 C-contiguous
    array, or a SparseGrad of sorted distinct int64 rows with the repeated rows' values summed."""
    if grad is None or not isinstance(grad, fe.SparseGrad):
        return None if grad is None else np.ascontiguousarray(grad, dtype=np.float32)
    rows, inverse = np.unique(np.asarray(grad.rows).astype(np.int64), return_inverse=True)
    values = np.zeros((len(rows), D), np.float32)
    np.add.at(values, inverse.reshape(-1), np.asarray(grad.values, dtype=np.float32))
    return fe.SparseGrad(rows, values)


def grad_of(V, ids, value, sparse):
    """What backward gives for ids and a grad_out of `value` everywhere (np.add.at), as the
    transcriptions take it: a dense array, or (rows, values)."""
    g = np.zeros((V, 3), np.float32)
    np.add.at(g, np.asarray(ids), np.full((len(ids), 3), value, np.float32))
    if not sparse:
        return g
    rows = np.unique(ids).astype(np.int64)
    return rows, g[rows]


def make(kind, sparse, lr=0.05):
    """An optimizer over two parameters that has taken one ordinary step, in which only the first
    parameter had a gradient (so SparseAdam's step counts differ); its transcription, having taken
    the same step; and the gradient the first parameter holds for the next one."""
    a = fe.Embedding(6, 3, sparse=sparse, seed=1)
    b = fe.Embedding(5, 3, sparse=sparse, seed=2)
    a([1, 4, 1])
    a.backward(np.full((3, 3), 0.5, np.float32))
    opt = SGD([a, b], lr=lr) if kind == "SGD" else (Adam if kind == "Adam" else SparseAdam)([a, b], lr=lr)
    model = MODELS[kind]([a.weight, b.weight], lr=lr)
    opt.step()
    model.step([grad_of(6, [1, 4, 1], 0.5, sparse), None])
    for layer, ids in ((a, [1, 4, 1]), (b, [2])):
        layer.zero_grad()
        layer(ids)
        layer.backward(np.ones((len(ids), 3), np.float32))
    return opt, a, b, model, grad_of(6, [1, 4, 1], 1.0, sparse)


@st.composite
def hostile_grads(draw, kind, V, D):
    """(grad, errors it may raise, must it raise) for a parameter of V x D."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sparse = kind == "SparseAdam" or draw(st.booleans())
    if not sparse:
        form = draw(st.sampled_from(("c",) * 4 + LAYOUTS + ("float64", "wrong_rows", "row", "1d", "list", "none")))
        g = rng.standard_normal((V, D)).astype(np.float32)
        if form == "none":
            return None, set(), False
        if form in LAYOUTS:
            g = arrange(g, form)
            return g, ({TypeError} if form == "bigendian" else set()), form == "bigendian"
        if form == "float64":
            return g.astype(np.float64), {TypeError}, True
        if form == "wrong_rows":
            return g[:-1], {ValueError}, True
        if form == "row":  # (1, D): would broadcast over every row
            return g[:1], {ValueError}, V != 1
        if form == "1d":
            return g[0], {ValueError}, True
        return g.tolist(), {TypeError}, True
    U = draw(st.integers(0, V))
    rows = np.sort(rng.choice(V, size=U, replace=False)).astype(np.int64)
    values = rng.standard_normal((U, D)).astype(np.float32)
    form = draw(st.sampled_from(("ok",) * 4 + LAYOUTS + (
        "negative", "too_large", "repeated", "unsorted", "int32_rows", "values_float64", "values_shape")))
    errors, must = set(), False
    if form in LAYOUTS:
        values = arrange(values, form)
        if form == "bigendian":
            errors, must = {TypeError}, True
    elif form == "negative" and U:  # an id out of range: IndexError (ValueError, for a broken SparseGrad, too)
        rows[0] = -1
        errors, must = {IndexError, ValueError}, True
    elif form == "too_large" and U:
        rows[-1] = V
        errors, must = {IndexError, ValueError}, True
    elif form == "repeated" and U:
        rows = np.concatenate([rows, rows[-1:]])
        values = np.concatenate([values, values[-1:] * 2])
        errors = {ValueError}  # or the repeated rows summed: never one of them dropped
    elif form == "unsorted" and U > 1:
        rows, values = rows[::-1].copy(), values[::-1].copy()
        errors = {ValueError}
    elif form == "int32_rows":
        rows = rows.astype(np.int32)
        errors = {TypeError}
    elif form == "values_float64":
        values = values.astype(np.float64)
        errors, must = {TypeError}, True
    elif form == "values_shape":
        values = np.zeros((U, D + 1), np.float32)
        errors, must = {ValueError}, True
    return fe.SparseGrad(rows, values), errors, must


@PROPERTY
@given(st.data(), st.sampled_from(("SGD", "Adam", "SparseAdam")))
def test_optimizer_step_with_a_hostile_gradient(data, kind):
    """Two parameters, one step already taken: the second parameter's gradient is hostile. The step
    equals the transcription's step on the canonical form of that gradient, or raises having changed nothing."""
    sparse = kind == "SparseAdam"
    opt, a, b, model, grad_a = make(kind, sparse)
    grad, errors, must = data.draw(hostile_grads(kind, 5, 3))
    note(f"grad={grad!r} errors={errors} must={must}")
    b.grad = grad
    before = state(opt)
    try:
        opt.step()
    except Exception as exc:  # noqa: BLE001 - the class is what is under test
        assert errors, f"raised {type(exc).__name__}: {exc}; expected a step"
        assert isinstance(exc, tuple(errors)), f"raised {type(exc).__name__}: {exc}; expected {errors}"
        assert state(opt) == before, f"the step raised {exc!r} after changing weights, moments or counters"
        assert_state(opt, model)
        return
    assert not must, f"the step went through; expected {errors}"
    model.step([grad_a, canonical(grad, 3)])
    assert_state(opt, model)


@pytest.mark.parametrize("kind", ["SGD", "Adam", "SparseAdam"])
@pytest.mark.parametrize("layout", ["readonly", "fortran", "misaligned", "reversed"])
def test_optimizer_on_a_weight_it_cannot_update_in_place(kind, layout):
    """A weight that is read-only, or not C-contiguous and aligned: ValueError (or, for a layout numpy
    can write through, a correct in-place step), and nothing changed when it raises."""
    sparse = kind == "SparseAdam"
    layer = fe.Embedding(4, 3, sparse=sparse, seed=3)
    layer([0, 2])
    layer.backward(np.ones((2, 3), np.float32))
    layer.weight = arrange(layer.weight, layout)  # after forward: a gather needs a C-contiguous table
    opt = {"SGD": lambda p: SGD(p, lr=0.1), "Adam": Adam, "SparseAdam": SparseAdam}[kind]([layer])
    before = state(opt)
    model = SGDModel([layer.weight], 0.1)
    try:
        opt.step()
    except Exception as exc:  # noqa: BLE001
        assert isinstance(exc, (ValueError, TypeError)), repr(exc)
        assert state(opt) == before
        return
    assert layout != "readonly", "a step wrote into a read-only weight"
    assert kind == "SGD", f"{kind} updated a {layout} weight: the kernels only take C-contiguous aligned targets"
    model.step([grad_of(4, [0, 2], 1.0, False)])
    same_bits(layer.weight, model.w[0], f"the {layout} weight")


def test_sgd_step_that_raises_changes_nothing():
    """As for Adam: the second parameter's bad gradient must not leave the first one moved."""
    a = fe.Embedding(6, 3, seed=1)
    b = fe.Embedding(4, 3, seed=2)
    a.grad = np.ones((6, 3), np.float32)
    b.grad = np.ones((3, 3), np.float32)  # wrong shape
    opt = SGD([a, b], lr=0.1)
    before = state(opt)
    with pytest.raises(ValueError):
        opt.step()
    assert state(opt) == before


def test_sgd_dense_gradient_is_not_broadcast():
    """A (1, D) gradient is a shape mismatch, not one row applied to every row."""
    layer = fe.Embedding(4, 3, seed=1)
    layer.grad = np.ones((1, 3), np.float32)
    w = layer.weight.copy()
    with pytest.raises(ValueError):
        SGD([layer], lr=0.1).step()
    assert layer.weight.tobytes() == w.tobytes()


def test_sgd_float64_gradient_is_a_type_error():
    layer = fe.Embedding(4, 3, seed=1)
    layer.grad = np.ones((4, 3), np.float64)
    w = layer.weight.copy()
    with pytest.raises(TypeError):
        SGD([layer], lr=0.1).step()
    assert layer.weight.tobytes() == w.tobytes()


@pytest.mark.parametrize("row", [-1, 4])
@pytest.mark.parametrize("kind", ["SGD", "Adam", "SparseAdam"])
def test_sparse_gradient_with_a_row_out_of_range_is_refused(kind, row):
    """rows = [-1] must not wrap around to the last row (numpy fancy indexing would). DESIGN.md makes an
    id out of range an IndexError; for a hand-made SparseGrad a ValueError (broken invariant) is taken too."""
    layer = fe.Embedding(4, 3, sparse=True, seed=1)
    layer.grad = fe.SparseGrad(np.array([row], np.int64), np.ones((1, 3), np.float32))
    opt = SGD([layer], lr=0.1) if kind == "SGD" else (Adam if kind == "Adam" else SparseAdam)([layer])
    before = state(opt)
    with pytest.raises((IndexError, ValueError)):
        opt.step()
    assert state(opt) == before


@pytest.mark.parametrize("kind", ["SGD", "Adam", "SparseAdam"])
def test_sparse_gradient_with_repeated_rows_loses_no_update(kind):
    """rows = [1, 1]: both updates count (summed), or the SparseGrad is refused; never one dropped."""
    opt, a, b, model, grad_a = make(kind, True)
    b.grad = fe.SparseGrad(np.array([1, 1], np.int64), np.array([[1, 1, 1], [2, 2, 2]], np.float32))
    before = state(opt)
    try:
        opt.step()
    except ValueError:
        assert state(opt) == before
        assert_state(opt, model)
        return
    model.step([grad_a, (np.array([1], np.int64), np.array([[3, 3, 3]], np.float32))])
    assert_state(opt, model)


@pytest.mark.parametrize("settings_", [
    {"betas": (0.9,)}, {"betas": "ab"}, {"eps": "x"}, {"betas": (0.9, None)},
])
@pytest.mark.parametrize("kind", ["Adam", "SparseAdam"])
def test_hostile_hyperparameters_change_nothing(kind, settings_):
    """Bad betas or eps: an error at construction, or at the step with nothing changed (not even t)."""
    sparse = kind == "SparseAdam"
    layer = fe.Embedding(4, 3, sparse=sparse, seed=1)
    layer([0])
    layer.backward(np.ones((1, 3), np.float32))
    cls = Adam if kind == "Adam" else SparseAdam
    try:
        opt = cls([layer], **settings_)
    except (TypeError, ValueError):
        return
    before = state(opt)
    with pytest.raises((TypeError, ValueError)):
        opt.step()
    assert state(opt) == before


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), 1e300, 0.0])
@pytest.mark.parametrize("kind", ["SGD", "Adam", "SparseAdam"])
def test_extreme_learning_rates_give_what_ieee_says(kind, lr):
    """Not errors by DESIGN.md (a negative lr is): NaN and inf are data. Two steps, a dense and a
    sparse gradient (both sparse for SparseAdam) with zero elements; every weight, moment and count is
    the transcription's, NaN where it gives NaN (lr 1e300 rounds to a float32 inf, and inf * 0 is NaN
    where a gradient element, or for Adam a moment, is 0)."""
    a, b = fe.Embedding(4, 3, seed=1), fe.Embedding(3, 3, seed=2)
    opt = SGD([a, b], lr=lr) if kind == "SGD" else (Adam if kind == "Adam" else SparseAdam)([a, b], lr=lr)
    model = MODELS[kind]([a.weight, b.weight], lr=lr)
    start = [a.weight.copy(), b.weight.copy()]
    sparse_a = (np.array([0, 3], np.int64), np.array([[1, 0, -2], [0.5, 0, 3]], np.float32))
    plan = [[sparse_a, (np.array([1], np.int64), np.array([[0, -1, 0]], np.float32))],
            [(np.array([3], np.int64), np.array([[-1, 2, 0]], np.float32)), None]]
    for grads in plan:
        if kind != "SparseAdam" and grads[0] is not None:  # a dense gradient, zero rows included
            rows, values = grads[0]
            grads[0] = np.zeros((4, 3), np.float32)
            grads[0][rows] = values
        for p, g in zip((a, b), grads):
            p.grad = fe.SparseGrad(*g) if isinstance(g, tuple) else g
        with np.errstate(all="ignore"):
            opt.step()
        model.step(grads)
        assert_state(opt, model, nan_ok=True)
    if lr == 0.0:  # nothing moves, yet the moments and counts are those of two steps
        for p, w in zip((a, b), start):
            assert p.weight.tobytes() == w.tobytes()
        if kind != "SGD":
            assert opt.t == 2 and np.count_nonzero(opt.exp_avg[0]) == 5 and np.count_nonzero(opt.exp_avg_sq[1]) == 1
    elif math.isnan(lr):  # every weight the step writes is NaN
        written = [np.isnan(p.weight).all(axis=1) for p in (a, b)]
        expected = {"SGD": [[True] * 4, [False, True, False]], "Adam": [[True] * 4, [True] * 3],
                    "SparseAdam": [[True, False, False, True], [False, True, False]]}[kind]
        assert [w.tolist() for w in written] == expected
    else:  # inf: +-inf where the update has a sign, NaN where it is inf * 0 (or, later, inf - inf)
        assert any(np.isinf(p.weight).any() for p in (a, b)) and any(np.isnan(p.weight).any() for p in (a, b))


# ---------------------------------------------------------------- memory safety (in a child process)

def run_child(code):
    """Run code in a fresh interpreter: (returncode, stdout, stderr). A negative code is a signal."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def assert_no_crash(code, expect_stdout):
    rc, out, err = run_child(code)
    assert rc == 0 and "Sanitizer" not in err, (
        f"the child process died (return code {rc}); stdout:\n{out}\nstderr (tail):\n{err[-3000:]}")
    assert expect_stdout in out, out


def test_sparse_adam_rows_sharing_memory_with_the_weight():
    """A SparseGrad whose rows array is a view of the weight: every update rewrites the rows still to
    be read, after the range check. It must be refused (ValueError) before anything is written."""
    assert_no_crash("""
        import numpy as np, fastembed as fe
        layer = fe.Embedding(8, 2, sparse=True, seed=0)
        rows = layer.weight.reshape(-1).view(np.int64)[:3]   # rows[k] is weight row k's bytes
        rows[:] = [1, 2, 3]
        layer.grad = fe.SparseGrad(rows, np.ones((3, 2), np.float32))
        try:
            fe.optim.SparseAdam([layer]).step()
            print("stepped", rows.tolist())
        except ValueError as exc:
            print("ValueError", exc)
    """, "ValueError")


@pytest.mark.parametrize("victim", ["weight", "exp_avg", "exp_avg_sq"])
def test_adam_kernel_rows_sharing_memory_with_a_target(victim):
    """The same through the kernel's own entry point, with the rows inside each array it writes."""
    assert_no_crash(f"""
        import numpy as np
        from fastembed import _kernels
        arrays = {{name: np.zeros((8, 2), np.float32) for name in ("weight", "exp_avg", "exp_avg_sq")}}
        rows = arrays["{victim}"].reshape(-1).view(np.int64)[:3]
        rows[:] = [1, 2, 3]
        try:
            _kernels.adam_step(arrays["weight"], arrays["exp_avg"], arrays["exp_avg_sq"],
                               np.full((3, 2), 1e3, np.float32), rows, 0.5, 0.5, 0.5, 1e-8, 0.5, 0.5)
            print("stepped", rows.tolist())
        except ValueError as exc:
            print("ValueError", exc)
    """, "ValueError")


@pytest.mark.parametrize("kind", ["SGD", "Adam", "SparseAdam"])
def test_optimizer_given_something_that_is_not_a_parameter(kind):
    """Not a layer (no float32 2-D .weight): a TypeError, as DESIGN.md answers a wrong type (today an
    AttributeError leaks out of the parameter walk)."""
    cls = {"SGD": lambda p: SGD(p, lr=0.1), "Adam": Adam, "SparseAdam": SparseAdam}[kind]
    for param in (None, 3, "weight", np.zeros((3, 2), np.float32), object()):
        with pytest.raises(TypeError):
            cls([param])
