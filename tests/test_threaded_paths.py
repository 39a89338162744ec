"""The threaded, GIL-free loops at random shapes (issue 12): numpy oracles, bitwise, and the team size.

Left to its default (32768 elements of work), the serial threshold keeps every random shape of the other
property tests on the serial path, and D <= 32 gives the column-split kernels (scatter_add, the token half
of gather_add_backward, coalesce) a single 128-byte column block, hence a single thread. Here the
threshold is lowered to 0 (every call threaded, even an empty one), two threads are asked for, and D runs
up to 200 with the tables placed at every phase of a 128-byte block, so the blocks are many and, when D is
a multiple of 32 and the table does not start on a boundary, one block wraps from a row's tail into the
next row's head. Each result must equal numpy's bitwise (in np.add.at's order for the sums) and the
one-thread result, and _kernels._last_call_threads() must show the team really had two threads: with the
threaded path switched off these tests fail.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastembed as fe
from fastembed import _kernels
from _helpers import (FAST, SERIAL_ELEMENTS, adam_update, assert_bitwise, at_phase, coalesce_oracle, id_arrays, ids_shapes,
                      num_threads, positions_oracle, serial_elements, two_thread_team)

# The fixture below sets process state once per test, valid for all of its examples.
THREADED = settings(FAST, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Several column blocks: any D past one block, multiples of 32 (the cyclic, wrapping case), and a few
# D <= 32 (one block unless the row straddles a boundary).
DIMS = st.one_of(st.integers(33, 200), st.sampled_from([64, 96, 128, 160, 192]), st.integers(0, 32))
PHASES = st.integers(0, 31)  # floats past a 128-byte boundary at which a table starts


@pytest.fixture
def threaded():
    """Every call on the threaded path with two threads asked for; both settings restored afterwards."""
    with serial_elements(0), num_threads(2):
        yield


def column_blocks(D, phase):
    """The 128-byte blocks a row's columns fall in, counted once each: rows of a multiple of 32 floats all
    start at the same phase, so a row's tail and the next row's head share a block (counted once)."""
    if D % 32 == 0:
        return D // 32
    return len({(phase + d) // 32 for d in range(D)})


def row_team():
    """Gather, gather_add and Adam split rows: any call gets the whole team."""
    return two_thread_team()


def column_team(D, table):
    """Threads own whole column blocks, so no more threads than blocks (at least the calling thread)."""
    phase = table.ctypes.data % 128 // 4
    return max(1, min(two_thread_team(), column_blocks(D, phase)))


def assert_ran(team):
    assert _kernels._last_call_released_gil(), "the call kept the GIL: the threaded path was not taken"
    assert _kernels._last_call_threads() == team, (
        f"the call ran with {_kernels._last_call_threads()} thread(s), expected {team}")


def one_thread(call):
    """call() with one thread (still past the threshold), checked to have run that way."""
    with num_threads(1):
        result = call()
        assert_ran(1)
    return result


def _rng(data):
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))


def _table(rng, rows, D, phase):
    t = at_phase((rows, D), phase)
    t[...] = rng.standard_normal((rows, D)).astype(np.float32)
    return t


def _grad(rng, shape):
    # magnitudes 1e-4..1e4: a sum in another order than np.add.at's rounds differently
    g = rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 5, size=shape[:-1] + (1,))
    return g.astype(np.float32)


@st.composite
def id_case(draw, max_rows=40):
    V = draw(st.integers(1, max_rows), label="V")
    ids = draw(id_arrays(V, shape=draw(ids_shapes(max_ndim=3, max_side=7))), label="ids")
    return V, ids


@st.composite
def positions_case(draw, shape):
    """(positions, P): None, an int start or an int64 array; P at least what they need."""
    T = shape[-1] if shape else 1
    mode = draw(st.sampled_from(["none", "int", "array"]))
    if mode == "none":
        return None, max(1, T + draw(st.integers(0, 3)))
    if mode == "int":
        start = draw(st.integers(0, 5))
        return start, max(1, start + T + draw(st.integers(0, 3)))
    P = draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.integers(0, P, size=shape).astype(np.int64), P


# ---------------------------------------------------------------- forward

@THREADED
@given(case=id_case(), D=DIMS, phase=PHASES, out_phase=PHASES, data=st.data())
def test_gather_threaded(threaded, case, D, phase, out_phase, data):
    V, ids = case
    table = _table(_rng(data), V, D, phase)
    expected = table[ids]
    assert_bitwise(fe.gather(table, ids), expected)
    assert_ran(row_team())
    out = at_phase(ids.shape + (D,), out_phase)
    assert fe.gather(table, ids, out=out) is out
    assert_bitwise(out, expected)
    assert_ran(row_team())
    assert_bitwise(one_thread(lambda: fe.gather(table, ids)), expected)


@THREADED
@given(case=id_case(), D=DIMS, phase=PHASES, data=st.data())
def test_gather_add_threaded(threaded, case, D, phase, data):
    V, ids = case
    positions, P = data.draw(positions_case(ids.shape), label="positions")
    rng = _rng(data)
    tok, pos = _table(rng, V, D, phase), _table(rng, P, D, (phase + 7) % 32)
    expected = tok[ids] + pos[positions_oracle(ids.shape, positions)]
    assert_bitwise(fe.gather_add(tok, pos, ids, positions=positions), expected)
    assert_ran(row_team())
    assert_bitwise(one_thread(lambda: fe.gather_add(tok, pos, ids, positions=positions)), expected)


# ---------------------------------------------------------------- backward and coalesce

@THREADED
@given(case=id_case(), D=DIMS, phase=PHASES, data=st.data())
def test_scatter_add_threaded(threaded, case, D, phase, data):
    V, ids = case
    rng = _rng(data)
    start = _table(rng, V, D, phase)  # accumulates into what is there, not into zeros
    grad_out = _grad(rng, ids.shape + (D,))
    expected = start.copy()
    np.add.at(expected, ids.reshape(-1), grad_out.reshape(ids.size, D))

    grad = at_phase((V, D), phase)
    grad[...] = start
    fe.scatter_add(grad, ids, grad_out)
    assert_ran(column_team(D, grad))
    assert_bitwise(grad, expected)

    grad[...] = start
    one_thread(lambda: fe.scatter_add(grad, ids, grad_out))
    assert_bitwise(grad, expected)


@THREADED
@given(case=id_case(), D=DIMS, phase=PHASES, pos_phase=PHASES, data=st.data())
def test_gather_add_backward_threaded(threaded, case, D, phase, pos_phase, data):
    V, ids = case
    positions, P = data.draw(positions_case(ids.shape), label="positions")
    rng = _rng(data)
    tok_start, pos_start = _table(rng, V, D, phase), _table(rng, P, D, pos_phase)
    grad_hidden = _grad(rng, ids.shape + (D,))
    e_tok, e_pos = tok_start.copy(), pos_start.copy()
    np.add.at(e_tok, ids.reshape(-1), grad_hidden.reshape(ids.size, D))
    np.add.at(e_pos, positions_oracle(ids.shape, positions).reshape(-1), grad_hidden.reshape(ids.size, D))

    tgrad, pgrad = at_phase((V, D), phase), at_phase((P, D), pos_phase)

    def run():
        tgrad[...] = tok_start
        pgrad[...] = pos_start
        fe.gather_add_backward(grad_hidden, ids, tgrad, pgrad, positions=positions)

    run()
    assert_ran(column_team(D, tgrad))
    assert_bitwise(tgrad, e_tok)
    assert_bitwise(pgrad, e_pos)
    one_thread(run)
    assert_bitwise(tgrad, e_tok)
    assert_bitwise(pgrad, e_pos)


@THREADED
@given(case=id_case(max_rows=300), D=DIMS.filter(bool), data=st.data())  # (the oracle needs D > 0)
def test_coalesce_threaded(threaded, case, D, data):
    _, ids = case
    grad_out = _grad(_rng(data), ids.shape + (D,))
    e_rows, e_values = coalesce_oracle(ids, grad_out)
    rows, values = fe.coalesce(ids, grad_out)
    assert_ran(column_team(D, values))
    assert_bitwise(rows, e_rows)
    assert_bitwise(values, e_values)
    rows, values = one_thread(lambda: fe.coalesce(ids, grad_out))
    assert_bitwise(rows, e_rows)
    assert_bitwise(values, e_values)


# ---------------------------------------------------------------- Adam

@THREADED
@given(V=st.integers(0, 40), D=DIMS, phase=PHASES, sparse=st.booleans(), t=st.integers(1, 50), data=st.data())
def test_adam_step_threaded(threaded, V, D, phase, sparse, t, data):
    rng = _rng(data)
    rows = np.flatnonzero(rng.random(V) < 0.5).astype(np.int64) if sparse else None
    U = V if rows is None else len(rows)
    w0 = _table(rng, V, D, phase)
    m0 = (0.1 * rng.standard_normal((V, D))).astype(np.float32)
    v0 = (0.01 * rng.random((V, D))).astype(np.float32)
    g = _grad(rng, (U, D))
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    bias1, bias2 = 1 - b1**t, 1 - b2**t
    expected = w0.copy(), m0.copy(), v0.copy()
    adam_update(*expected, rows, g, lr, (b1, b2), eps, t)  # the kernel's documented float32 update

    w, m, v = at_phase((V, D), phase), at_phase((V, D), phase), at_phase((V, D), phase)

    def run():
        w[...], m[...], v[...] = w0, m0, v0
        _kernels.adam_step(w, m, v, g, rows, lr, b1, b2, eps, bias1, bias2)

    run()
    assert_ran(row_team())
    for got, want in zip((w, m, v), expected):
        assert_bitwise(got, want)
    one_thread(run)
    for got, want in zip((w, m, v), expected):
        assert_bitwise(got, want)


# ---------------------------------------------------------------- the default threshold

def test_default_threshold_threads_a_large_call_and_not_a_small_one():
    """At the default threshold, N * D = 32768 elements run on two threads without the GIL, and one
    element fewer keeps the GIL and one thread."""
    assert _kernels._get_serial_elements() == SERIAL_ELEMENTS == 32768
    rng = np.random.default_rng(0)
    D = 64  # two column blocks
    table = rng.standard_normal((100, D)).astype(np.float32)
    with num_threads(2):
        ids = rng.integers(0, 100, size=SERIAL_ELEMENTS // D)
        grad_out = rng.standard_normal((len(ids), D)).astype(np.float32)
        assert_bitwise(fe.gather(table, ids), table[ids])
        assert_ran(row_team())
        grad = at_phase((100, D), 0)
        fe.scatter_add(grad, ids, grad_out)
        assert_ran(column_team(D, grad))
        expected = np.zeros((100, D), np.float32)
        np.add.at(expected, ids, grad_out)
        assert_bitwise(grad, expected)

        small = at_phase((1, SERIAL_ELEMENTS - 1), 0)
        fe.gather(small, np.zeros(1, np.int64))
        assert not _kernels._last_call_released_gil() and _kernels._last_call_threads() == 1


def test_last_call_threads_is_the_team_obtained_not_the_one_asked_for():
    """With OpenMP's thread limit at 1, a call that asks for two threads gets one, and says so."""
    if two_thread_team() < 2:
        pytest.skip("needs OpenMP and two processors")
    code = textwrap.dedent("""
        import numpy as np, fastembed as fe
        from fastembed import _kernels
        fe.set_num_threads(2)
        fe.gather(np.ones((10, 64), np.float32), np.zeros(1024, np.int64))
        print(fe.get_num_threads(), _kernels._last_call_threads(), _kernels._last_call_released_gil())
    """)
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2", "1", "True"]


def test_serial_threshold_setter_checks_its_argument_and_the_fixture_restores_it():
    before = _kernels._get_serial_elements()
    for bad, error in (("0", TypeError), (1.0, TypeError), (True, TypeError), (None, TypeError),
                       (-1, ValueError), (sys.maxsize + 1, ValueError)):
        with pytest.raises(error):
            _kernels._set_serial_elements(bad)
        assert _kernels._get_serial_elements() == before
    with pytest.raises(KeyError):
        with serial_elements(5):
            assert _kernels._get_serial_elements() == 5
            raise KeyError
    assert _kernels._get_serial_elements() == before
    with serial_elements(sys.maxsize):  # out of reach: even a huge call stays serial
        fe.gather(np.ones((2, 4096), np.float32), np.zeros(64, np.int64))
        assert not _kernels._last_call_released_gil() and _kernels._last_call_threads() == 1
