"""Hardening (issue 6): adversarial inputs to the functional API, as hypothesis properties.

Each property builds a call from independently drawn pieces, any of which may be
hostile: every integer dtype (int8 to uint64, with uint64 values above the int64
maximum), 0-d ids, Fortran order, negative strides, strided views, float32 at
an odd byte offset of a uint8 buffer, read-only and big-endian arrays, lists,
object arrays, wrong dtypes and ranks, `out` or a gradient table aliasing an
input, NaN/inf/signalling-NaN/subnormal data, empty shapes, zero-row tables.

An oracle written from DESIGN.md (not from the kernels) says, for the pieces it
was given, which error classes the call may raise. If it names none, the call
must return numpy's answer (bitwise, NaN-aware). If it names some, the call must
raise one of them, and every array it was given must be bitwise unchanged. A
successful call must leave every input except its documented target unchanged.

FASTEMBED_HARDENING_EXAMPLES sets the number of examples per property (default 150).
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import fastembed as fe
from _helpers import arrange

EXAMPLES = int(os.environ.get("FASTEMBED_HARDENING_EXAMPLES", "150"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

F32 = np.dtype(np.float32)
INT64_MAX = 2**63 - 1
INT_DTYPES = tuple(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64,
                                         np.uint8, np.uint16, np.uint32, np.uint64))
# float32 bit patterns worth having: quiet and signalling NaNs with payloads, infinities,
# signed zero, the smallest subnormal, the largest finite value.
SPECIAL_BITS = (0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FBFFFFF, 0x7F800000, 0xFF800000,
                0x80000000, 0x00000001, 0x7F7FFFFF)


# ---------------------------------------------------------------- array helpers

def size_of(shape):
    return int(np.prod(shape, dtype=np.int64))




LAYOUTS = ("c", "fortran", "reversed", "strided", "misaligned", "readonly", "bigendian")


def snapshot(obj):
    """A bitwise copy of what obj holds (arrays: dtype, shape and logical bytes)."""
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return ("object", obj.shape, [repr(x) for x in obj.reshape(-1)])
        return (str(obj.dtype), obj.shape, obj.tobytes())
    return None


def same_floats(actual, expected):
    """Bitwise equal, except that any NaN matches any NaN (payloads may differ after arithmetic)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False
    bits = np.dtype(f"u{actual.dtype.itemsize}")
    a = np.ascontiguousarray(actual).view(bits)
    e = np.ascontiguousarray(expected).view(bits)
    return bool(np.all((a == e) | (np.isnan(actual) & np.isnan(expected))))


def bitwise(actual, expected):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    return actual.shape == expected.shape and actual.dtype == expected.dtype and actual.tobytes() == expected.tobytes()


class Call:
    """The arguments of one call, what they must produce, and what they may raise."""

    def __init__(self):
        self.inputs = {}      # name -> object given (checked unchanged, except targets on success)
        self.targets = set()  # names of arrays written in place on success
        self.errors = set()   # exception classes the call may raise
        self.must_raise = False
        self.why = []

    def add(self, name, obj, *, target=False):
        self.inputs[name] = obj
        if target:
            self.targets.add(name)
        return obj

    def expect(self, exc, why, must=True):
        self.errors.add(exc)
        self.why.append(f"{exc.__name__}: {why}")
        if must:
            self.must_raise = True

    def run(self, fn, check):
        """Call fn(); on success check(result, before) must pass, on failure nothing may have changed."""
        note(f"expected: {self.why or 'a result'}")
        before = {k: snapshot(v) for k, v in self.inputs.items()}
        # the logical values before the call, for the oracle (targets may alias inputs)
        values = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.inputs.items()}
        try:
            with np.errstate(all="ignore"):
                result = fn()
        except Exception as exc:  # noqa: BLE001 - the class is what is under test
            assert self.errors, f"raised {type(exc).__name__}: {exc}; expected a result"
            assert isinstance(exc, tuple(self.errors)), (
                f"raised {type(exc).__name__}: {exc}; expected one of {self.why}")
            for name, obj in self.inputs.items():
                assert snapshot(obj) == before[name], f"{name} changed although the call raised {exc!r}"
            return
        assert not self.must_raise, f"returned a result; expected {self.why}"
        with np.errstate(all="ignore"):
            check(result, values)
        for name, obj in self.inputs.items():
            if name not in self.targets and not self._aliases_target(obj):
                assert snapshot(obj) == before[name], f"input {name} changed by a successful call"

    def _aliases_target(self, obj):
        return isinstance(obj, np.ndarray) and any(
            isinstance(self.inputs[t], np.ndarray) and np.may_share_memory(obj, self.inputs[t]) for t in self.targets)


# ---------------------------------------------------------------- oracles for each role (from DESIGN.md)

def is_f32(a):
    return isinstance(a, np.ndarray) and a.dtype == F32


# The lookup and scatter kernels take tables of these dtypes (and bfloat16: tests/test_dtypes.py); the
# other arrays of a call that hold table elements must have the table's dtype. The layers take float32.
ELEM_DTYPES = (F32, np.dtype(np.float64), np.dtype(np.float16))
ANY = "any"  # as `ref` below: the first table of a kernel call, which may have any of ELEM_DTYPES


def is_elem(a, ref):
    """Whether a call takes a: float32 when ref is None (the layers); else a native array of ELEM_DTYPES,
    of ref's dtype when ref (the table it goes with) is one."""
    if ref is None:
        return is_f32(a)
    if not (isinstance(a, np.ndarray) and a.dtype in ELEM_DTYPES):
        return False
    return not (isinstance(ref, np.ndarray) and ref.dtype in ELEM_DTYPES) or a.dtype == ref.dtype


def check_table(call, name, a, ref=None):
    """A table read by the call: its dtype (TypeError, see is_elem), 2-D, C-contiguous and aligned (ValueError)."""
    if not is_elem(a, ref):
        call.expect(TypeError, f"{name} is not a native array of an accepted dtype")
    elif a.ndim != 2:
        call.expect(ValueError, f"{name} is {a.ndim}-D")
    elif not (a.flags.c_contiguous and a.flags.aligned):
        call.expect(ValueError, f"{name} is not C-contiguous and aligned")


def check_target(call, name, a, shape=None, ref=None):
    """An array written in place: its dtype (TypeError, see is_elem); 2-D or the right shape, writeable,
    C-contiguous and aligned (ValueError)."""
    if not is_elem(a, ref):
        call.expect(TypeError, f"{name} is not a native array of an accepted dtype")
        return
    if shape is None and a.ndim != 2:
        call.expect(ValueError, f"{name} is {a.ndim}-D")
    if shape is not None and a.shape != shape:
        call.expect(ValueError, f"{name}.shape {a.shape} != {shape}")
    if not a.flags.writeable:
        call.expect(ValueError, f"{name} is read-only")
    if not (a.flags.c_contiguous and a.flags.aligned):
        call.expect(ValueError, f"{name} is not C-contiguous and aligned")


def check_read_once(call, name, a, shape, ref=None):
    """A float input read once (grad_out, grad_hidden): any layout, but its dtype (see is_elem) and the right shape."""
    if not is_elem(a, ref):
        call.expect(TypeError, f"{name} is not a native array of an accepted dtype")
    elif a.shape != shape:
        call.expect(ValueError, f"{name}.shape {a.shape} != {shape}")


def check_aliasing(call, target_name, target, others, strict):
    """A target sharing memory with an input: ValueError. `strict` names the inputs DESIGN.md
    requires that for (`out`); for a gradient table and an input read before any write, a
    correct result computed from the values before the call is accepted too."""
    if not isinstance(target, np.ndarray):
        return
    for name, other in others.items():
        if not isinstance(other, np.ndarray):
            continue
        if np.shares_memory(target, other):
            call.expect(ValueError, f"{target_name} shares memory with {name}", must=strict)
        elif np.may_share_memory(target, other):
            call.expect(ValueError, f"{target_name} and {name} have overlapping spans", must=False)


def real_rows(a, drawn):
    """The row count a kernel checks ids or positions against: that of the array actually passed,
    which differs from the drawn count when one array plays two roles. For anything but a 2-D
    array the table checks fail before any range check, so the drawn count serves as well."""
    if isinstance(a, np.ndarray) and a.ndim == 2:
        return a.shape[0]
    return drawn


def ids_logical(values):
    """The ids the caller meant, as an int64 array (only called when they are all valid)."""
    return np.array([int(v) for v in values], dtype=np.int64)


def accumulated_grad(param, rows, grad_rows):
    """param's gradient after one more backward with grad_rows (n, D) at rows (n,), as a dense array.

    Dense gradients add each row in order into the running (V, D) sum. Sparse ones are coalesced
    (summed per row from zero, in order) and merged with the previous SparseGrad by a second
    coalesce, so their rounding differs from the dense sum: that is the layer's documented order.
    """
    V, D = param.weight.shape
    if not param.sparse:
        dense = param.dense_grad().copy()
        np.add.at(dense, rows, grad_rows)
        return dense

    def coalesce(r, v):
        u, inverse = np.unique(r, return_inverse=True)
        sums = np.zeros((len(u), D), np.float32)
        np.add.at(sums, inverse.reshape(-1), v)
        return u, sums

    merged = coalesce(rows, grad_rows)
    if param.grad is not None:
        merged = coalesce(np.concatenate([param.grad.rows, merged[0]]), np.concatenate([param.grad.values, merged[1]]))
    dense = np.zeros((V, D), np.float32)
    dense[merged[0]] = merged[1]
    return dense


# ---------------------------------------------------------------- strategies

@st.composite
def float32_arrays(draw, shape):
    """float32 values of shape: small normals, sometimes with NaNs (payloads, signalling), infinities,
    -0.0, subnormals or random bit patterns at random places (numpy-generated from a drawn seed)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.standard_normal(shape).astype(np.float32)
    mode = draw(st.sampled_from(("plain", "plain", "specials", "bits")))
    if values.size and mode != "plain":
        bits = values.reshape(-1).view(np.uint32)
        where = rng.random(values.size) < 0.3
        if mode == "specials":
            bits[where] = rng.choice(np.array(SPECIAL_BITS, dtype=np.uint32), size=int(where.sum()))
        else:
            bits[where] = rng.integers(0, 2**32, size=int(where.sum()), dtype=np.uint32)
    return values


@st.composite
def tables(draw, shape, role):
    """A float32 table of `shape` in a drawn form, and its logical values."""
    values = draw(float32_arrays(shape))
    form = draw(st.sampled_from(("c",) * 8 + LAYOUTS + ("float64", "float16", "int32", "1d", "3d", "list")))
    if form in LAYOUTS:
        return arrange(values, form)
    if form in ("float64", "float16", "int32"):
        with np.errstate(all="ignore"):
            return values.astype(form)
    if form == "1d":
        return values.reshape(-1)
    if form == "3d":
        return values.reshape(shape + (1,))
    return values.tolist()


ID_FORMS = ("c",) * 6 + LAYOUTS + ("list", "object", "scalar")
BAD_ID_DTYPES = ("bool", "float16", "float64", "complex128", "datetime64[s]", "timedelta64[s]", "U3", "object_float")


@st.composite
def id_values(draw, shape, rows):
    """(ids as given, the Python ints they hold, the error they must raise or None).

    rows None: any id >= 0 is valid (coalesce). The bad value, when there is one, is put at
    a drawn place, often the last one, so a kernel that checked while writing would have written.
    """
    n = size_of(shape)
    if n and draw(st.integers(0, 19)) == 0:
        kind = draw(st.sampled_from(BAD_ID_DTYPES))
        base = np.zeros(shape, dtype=np.int64)
        if kind == "object_float":
            return np.array(base.astype(float).tolist(), dtype=object).reshape(shape), None, TypeError
        with np.errstate(all="ignore"):
            return base.astype(kind), None, TypeError
    dtype = draw(st.sampled_from(INT_DTYPES))
    info = np.iinfo(dtype)
    top = info.max if rows is None else min(rows - 1, info.max)
    if top >= 0:
        top = min(top, draw(st.sampled_from((0, 2, 50, INT64_MAX))))
        values = draw(st.lists(st.integers(0, top), min_size=n, max_size=n))
    else:
        values = [0] * n
    if n and draw(st.integers(0, 3)) == 0:
        bad = [-1, info.min, 2**31 - 1, 2**31, INT64_MAX, 2**63, 2**64 - 1]
        if rows is not None:
            bad += [rows, rows + 1]
        bad = [b for b in bad if info.min <= b <= info.max]
        where = draw(st.sampled_from((n - 1, 0, draw(st.integers(0, n - 1)))))
        values[where] = draw(st.sampled_from(bad))
    error = None
    if any(v < 0 or v > INT64_MAX or (rows is not None and v >= rows) for v in values):
        error = IndexError
    a = np.array(values, dtype=dtype).reshape(shape)
    form = draw(st.sampled_from(ID_FORMS))
    if form in LAYOUTS:
        a = arrange(a, form)
    elif form == "list":
        as_list = a.tolist()
        if np.asarray(as_list).shape == shape:  # a list cannot spell shape (0, 3)
            a = as_list
    elif form == "object":  # DESIGN.md: object ids are a TypeError, even when they hold ints
        return np.array(values, dtype=object).reshape(shape), values, TypeError
    elif form == "scalar" and shape == ():
        a = dtype.type(values[0])
    return a, values, error


def id_shapes():
    return st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


ROWS = st.sampled_from((0, 1, 2, 3, 7, 40))
DIMS = st.sampled_from((0, 1, 3, 16))


def OTHER_DIM(D):  # noqa: N802 - a strategy, named like ROWS and DIMS
    """The dim of a second table: usually D, sometimes another (a ValueError the oracle must predict)."""
    return st.sampled_from((D,) * 9 + (0, 1, 3, 16))


@st.composite
def out_arrays(draw, shape, call, inputs):
    """`out`: usually None or a fresh array; sometimes hostile, or aliasing one of the inputs."""
    form = draw(st.sampled_from(("none",) * 4 + ("fresh",) * 4 + (
        "readonly", "fortran", "reversed", "strided", "misaligned", "bigendian", "float64",
        "wrong_shape", "list", "alias")))
    if form == "none":
        return None
    fresh = np.full(shape, -7.0, np.float32)
    if form == "fresh":
        out = fresh
    elif form in LAYOUTS:
        out = arrange(fresh, form)
    elif form == "float64":
        out = fresh.astype(np.float64)
    elif form == "wrong_shape":
        out = np.zeros(shape[:-1] + (shape[-1] + 1,), np.float32)
    elif form == "list":
        out = fresh.tolist()
    else:
        arrays = [(k, v) for k, v in inputs.items() if isinstance(v, np.ndarray) and v.nbytes and v.dtype != object]
        if not arrays:
            out = fresh
        else:
            name, victim = draw(st.sampled_from(arrays))
            base = victim
            while base.base is not None and isinstance(base.base, np.ndarray):
                base = base.base
            raw = base.reshape(-1).view(np.uint8) if base.flags.c_contiguous else None
            if raw is None or raw.size < fresh.nbytes or fresh.nbytes == 0:
                out = fresh
            else:
                out = raw[:fresh.nbytes].view(np.float32).reshape(shape)
    return out


def check_out(call, out, shape, inputs, ref=None):
    if out is None:
        return
    check_target(call, "out", out, shape, ref)
    check_aliasing(call, "out", out, inputs, strict=True)


def expected_positions(ids_shape, positions_values):
    """The positions gather_add uses, as int64 of ids_shape (positions: None, int, or broadcast values)."""
    if positions_values is None or isinstance(positions_values, int):
        start = positions_values or 0
        if len(ids_shape) == 0:
            return np.array(start, dtype=np.int64)
        return np.broadcast_to(start + np.arange(ids_shape[-1], dtype=np.int64), ids_shape).copy()
    return np.broadcast_to(positions_values, ids_shape).copy()


@st.composite
def position_args(draw, shape, P, call):
    """positions: None, an int or numpy integer start, a bool, a float, or an integer array
    broadcastable (or not) to shape. Returns (positions as given, their meaning for the oracle)."""
    n = size_of(shape)
    T = shape[-1] if shape else 1
    kind = draw(st.sampled_from(("none", "none", "int", "npint", "array", "array", "bool", "float")))
    if kind == "none":
        if n and T > P:
            call.expect(IndexError, f"arange(T={T}) does not fit {P} position rows")
        return None, None
    if kind in ("int", "npint"):
        start = draw(st.sampled_from((0, 1, -1, -2, P - T, P - T + 1, P, 2**31, 2**62, 2**62 + 1, 2**63, 2**64)))
        if kind == "npint":
            dtype = draw(st.sampled_from(INT_DTYPES))
            info = np.iinfo(dtype)
            if not info.min <= start <= info.max:
                start = 0
            given = dtype.type(start)
        else:
            given = start
        if start < 0 or start + T > P:
            # positions start + arange(T); with no ids there are no positions, so either answer is right
            call.expect(IndexError, f"positions {start}..{start + T - 1} vs {P} rows", must=n > 0)
        return given, start
    if kind == "bool":
        call.expect(TypeError, "positions is a bool")
        return draw(st.booleans()), None
    if kind == "float":
        call.expect(TypeError, "positions is a float")
        return 1.0, None
    # an integer array: ids.shape, a suffix of it (broadcast), or a shape that does not broadcast
    ndim = len(shape)
    choice = draw(st.sampled_from(("full", "full", "suffix", "ones", "bad")))
    if choice == "full":
        pshape = shape
    elif choice == "suffix":
        pshape = shape[draw(st.integers(0, ndim)):]
    elif choice == "ones":
        pshape = tuple(1 if draw(st.booleans()) else s for s in shape)
    else:
        pshape = shape[:-1] + (shape[-1] + 1,) if ndim else (2,)
    positions, values, error = draw(id_values(pshape, P))
    if isinstance(positions, (int, np.integer)) and error is not TypeError:
        # a Python int or numpy integer scalar (a 0-d array spelled as a scalar) is a start, by DESIGN.md
        start = int(values[0])
        if start < 0 or start + T > P:
            call.expect(IndexError, f"positions {start}..{start + T - 1} vs {P} rows", must=n > 0)
        return positions, start
    broadcasts = True
    try:
        np.broadcast_shapes(pshape, shape)
        broadcasts = np.broadcast_shapes(pshape, shape) == shape
    except ValueError:
        broadcasts = False
    if not broadcasts:
        call.expect(ValueError, f"positions.shape {pshape} does not broadcast to {shape}")
    if error is TypeError:
        call.expect(TypeError, "positions of a non-integer dtype")
        return positions, None
    if error is IndexError:
        # out-of-range values that a zero-size broadcast never uses may or may not be reported
        call.expect(IndexError, f"positions out of range for {P} rows", must=n > 0 or any(v > INT64_MAX for v in values))
        return positions, None
    return positions, ids_logical(values).reshape(pshape)


# ---------------------------------------------------------------- the properties

@PROPERTY
@given(st.data())
def test_gather_adversarial(data):
    call = Call()
    V, D, shape = data.draw(ROWS), data.draw(DIMS), data.draw(id_shapes())
    table = call.add("table", data.draw(tables((V, D), "input")))
    ids, values, id_error = data.draw(id_values(shape, real_rows(table, V)))
    call.add("ids", ids)
    check_table(call, "table", table, ANY)
    if id_error:
        call.expect(id_error, "bad ids")
    out = call.add("out", data.draw(out_arrays(shape + (D,), call, {"table": table, "ids": ids})), target=True)
    check_out(call, out, shape + (D,), {"table": table, "ids": ids}, ref=table)

    def check(result, before):
        expected = np.asarray(before["table"])[ids_logical(values).reshape(shape)]
        assert bitwise(result, expected), "gather is a row copy: bits must match"
        if out is not None:
            assert result is out

    call.run(lambda: fe.gather(table, ids, out=out), check)


@PROPERTY
@given(st.data())
def test_gather_add_adversarial(data):
    call = Call()
    V, P, D, shape = data.draw(ROWS), data.draw(ROWS), data.draw(DIMS), data.draw(id_shapes())
    tok = call.add("token_table", data.draw(tables((V, D), "input")))
    pos = call.add("position_table", data.draw(tables((P, data.draw(OTHER_DIM(D))), "input")))
    check_table(call, "token_table", tok, ANY)
    check_table(call, "position_table", pos, tok)
    ids, values, id_error = data.draw(id_values(shape, real_rows(tok, V)))
    call.add("ids", ids)
    if id_error:
        call.expect(id_error, "bad ids")
    positions, meaning = data.draw(position_args(shape, real_rows(pos, P), call))
    call.add("positions", positions)
    inputs = {"token_table": tok, "position_table": pos, "ids": ids, "positions": positions}
    out = call.add("out", data.draw(out_arrays(shape + (D,), call, inputs)), target=True)
    check_out(call, out, shape + (D,), inputs, ref=tok)
    if is_elem(tok, ANY) and is_elem(pos, tok) and tok.ndim == 2 and pos.ndim == 2 and tok.shape[1] != pos.shape[1]:
        call.expect(ValueError, "tables of different dims")

    def check(result, before):
        p = expected_positions(shape, meaning)
        expected = np.asarray(before["token_table"])[ids_logical(values).reshape(shape)] + np.asarray(
            before["position_table"])[p]
        assert same_floats(result, expected)
        if out is not None:
            assert result is out

    call.run(lambda: fe.gather_add(tok, pos, ids, positions=positions, out=out), check)


@PROPERTY
@given(st.data())
def test_scatter_add_adversarial(data):
    call = Call()
    V, D, shape = data.draw(ROWS), data.draw(DIMS), data.draw(id_shapes())
    grad = call.add("grad_table", data.draw(tables((V, D), "target")), target=True)
    check_target(call, "grad_table", grad, ref=ANY)
    ids, values, id_error = data.draw(id_values(shape, real_rows(grad, V)))
    call.add("ids", ids)
    if id_error:
        call.expect(id_error, "bad ids")
    grad_out = call.add("grad_out", data.draw(tables(shape + (D,), "input")))
    if data.draw(st.integers(0, 9)) == 0 and isinstance(grad, np.ndarray) and grad.flags.c_contiguous:
        # grad_out made of grad_table's own memory
        n = size_of(shape + (D,))
        flat = grad.reshape(-1)
        if 0 < n <= flat.size and grad.dtype == F32:
            grad_out = call.add("grad_out", flat[:n].reshape(shape + (D,)))
    check_read_once(call, "grad_out", grad_out, shape + (D,), ref=grad)
    check_aliasing(call, "grad_table", grad, {"ids": ids, "grad_out": grad_out}, strict=False)

    def check(result, before):
        assert result is None
        expected = before["grad_table"].copy()
        np.add.at(expected, ids_logical(values).reshape(-1), np.asarray(before["grad_out"]).reshape(size_of(shape), D))
        assert same_floats(grad, expected)

    call.run(lambda: fe.scatter_add(grad, ids, grad_out), check)


@PROPERTY
@given(st.data())
def test_gather_add_backward_adversarial(data):
    call = Call()
    V, P, D, shape = data.draw(ROWS), data.draw(ROWS), data.draw(DIMS), data.draw(id_shapes())
    tgrad = call.add("token_grad", data.draw(tables((V, D), "target")), target=True)
    if data.draw(st.integers(0, 14)) == 0:
        pgrad = tgrad  # the same array twice
    else:
        pgrad = data.draw(tables((P, data.draw(OTHER_DIM(D))), "target"))
    # The kernel checks positions against the rows of the array passed as position_grad: with
    # pgrad = tgrad that is V, not the drawn P. (With D = 0 the two share no byte, so no
    # aliasing error comes first and the range check decides.)
    P = real_rows(pgrad, P)
    call.add("position_grad", pgrad, target=True)
    check_target(call, "token_grad", tgrad, ref=ANY)
    check_target(call, "position_grad", pgrad, ref=tgrad)
    ids, values, id_error = data.draw(id_values(shape, real_rows(tgrad, V)))
    call.add("ids", ids)
    if id_error:
        call.expect(id_error, "bad ids")
    positions, meaning = data.draw(position_args(shape, P, call))
    call.add("positions", positions)
    grad_hidden = call.add("grad_hidden", data.draw(tables(shape + (D,), "input")))
    check_read_once(call, "grad_hidden", grad_hidden, shape + (D,), ref=tgrad)
    if is_elem(tgrad, ANY) and is_elem(pgrad, tgrad) and tgrad.ndim == 2 and pgrad.ndim == 2 and tgrad.shape[1] != pgrad.shape[1]:
        call.expect(ValueError, "gradient tables of different dims")
    if isinstance(tgrad, np.ndarray) and isinstance(pgrad, np.ndarray) and np.shares_memory(tgrad, pgrad):
        call.expect(ValueError, "token_grad and position_grad share memory")
    for name, target in (("token_grad", tgrad), ("position_grad", pgrad)):
        check_aliasing(call, name, target, {"ids": ids, "grad_hidden": grad_hidden, "positions": positions},
                       strict=False)

    def check(result, before):
        assert result is None
        gh = np.asarray(before["grad_hidden"]).reshape(size_of(shape), D)
        t = before["token_grad"].copy()
        np.add.at(t, ids_logical(values), gh)
        p = before["position_grad"].copy()
        np.add.at(p, expected_positions(shape, meaning).reshape(-1), gh)
        assert same_floats(tgrad, t), "token_grad"
        assert same_floats(pgrad, p), "position_grad"

    call.run(lambda: fe.gather_add_backward(grad_hidden, ids, tgrad, pgrad, positions=positions), check)


@PROPERTY
@given(st.data())
def test_coalesce_adversarial(data):
    call = Call()
    D, shape = data.draw(DIMS), data.draw(id_shapes())
    ids, values, id_error = data.draw(id_values(shape, None))
    call.add("ids", ids)
    if id_error:
        call.expect(id_error, "negative ids, or above the int64 maximum")
    grad_out = call.add("grad_out", data.draw(tables(shape + (D,), "input")))
    check_read_once(call, "grad_out", grad_out, shape + (D,), ref=ANY)

    def check(result, before):
        rows, sums = result
        flat = ids_logical(values)
        expected_rows, inverse = np.unique(flat, return_inverse=True)
        g = np.asarray(before["grad_out"]).reshape(size_of(shape), D)
        acc = np.float32 if g.dtype == np.float16 else g.dtype  # float16 rows are summed in float32
        expected = np.zeros((len(expected_rows), D), acc)
        np.add.at(expected, inverse.reshape(-1), g.astype(acc))
        expected = expected.astype(g.dtype)
        assert bitwise(rows, expected_rows.astype(np.int64)), f"rows {rows} != {expected_rows}"
        assert same_floats(sums, expected)

    call.run(lambda: fe.coalesce(ids, grad_out), check)


# ---------------------------------------------------------------- layers

@PROPERTY
@given(st.data(), st.booleans())
def test_embedding_adversarial(data, sparse):
    """Forward with hostile ids or out, then backward with a hostile gradient: a failing call keeps
    the layer (weight, grad, the ids kept for backward) exactly as it was."""
    V, D = data.draw(st.sampled_from((1, 3, 40))), data.draw(st.sampled_from((1, 4)))
    layer = fe.Embedding(V, D, sparse=sparse, seed=0)
    layer(np.array([0]))  # something kept from before
    layer.backward(np.ones((1, D), np.float32))
    # the oracle below builds on this gradient: check it first, against numpy, not the layer
    first = np.zeros((V, D), np.float32)
    first[0] = 1
    assert bitwise(layer.dense_grad(), first)
    shape = data.draw(id_shapes())
    ids, values, id_error = data.draw(id_values(shape, V))
    call = Call()
    call.add("ids", ids)
    call.add("weight", layer.weight)
    if id_error:
        call.expect(id_error, "bad ids")
    kept = (layer._ids, layer.grad)
    out = call.add("out", data.draw(out_arrays(shape + (D,), call, {"weight": layer.weight, "ids": ids})),
                   target=True)
    check_out(call, out, shape + (D,), {"weight": layer.weight, "ids": ids})
    ok = []

    def forward():
        return layer(ids, out=out)

    def check_forward(result, before):
        assert bitwise(result, before["weight"][ids_logical(values).reshape(shape)])
        if out is not None:
            assert result is out
        ok.append(True)

    call.run(forward, check_forward)
    if not ok:
        assert layer._ids is kept[0] and layer.grad is kept[1], "a failing forward changed the layer"
        return
    g = data.draw(tables(shape + (D,), "input"))
    bcall = Call()
    bcall.add("grad_out", g)
    check_read_once(bcall, "grad_out", g, shape + (D,))

    expected_after = {}

    def check_backward(result, before):
        assert same_floats(layer.dense_grad(), expected_after["grad"])

    kept_grad = layer.grad
    kept_snapshot = snapshot(layer.dense_grad())
    failed = []

    def backward():
        if is_f32(g) and g.shape == shape + (D,):
            with np.errstate(all="ignore"):
                expected_after["grad"] = accumulated_grad(layer, ids_logical(values), g.reshape(size_of(shape), D))
        try:
            return layer.backward(g)
        except Exception:
            failed.append(True)
            raise

    bcall.run(backward, check_backward)
    if failed:
        assert layer.grad is kept_grad and snapshot(layer.dense_grad()) == kept_snapshot, \
            "a failing backward changed the gradient"


@PROPERTY
@given(st.data(), st.booleans())
def test_token_position_embedding_adversarial(data, sparse):
    V, P, D = data.draw(st.sampled_from((1, 5, 40))), data.draw(st.sampled_from((1, 4, 16))), 3
    layer = fe.TokenPositionEmbedding(V, P, D, sparse=sparse, seed=1)
    layer(np.array([0]))
    layer.backward(np.ones((1, D), np.float32))
    first_t, first_p = np.zeros((V, D), np.float32), np.zeros((P, D), np.float32)
    first_t[0] = first_p[0] = 1
    assert bitwise(layer.token.dense_grad(), first_t) and bitwise(layer.position.dense_grad(), first_p)
    shape = data.draw(id_shapes())
    call = Call()
    ids, values, id_error = data.draw(id_values(shape, V))
    call.add("ids", ids)
    if id_error:
        call.expect(id_error, "bad ids")
    positions, meaning = data.draw(position_args(shape, P, call))
    call.add("positions", positions)
    call.add("token", layer.token.weight)
    call.add("position", layer.position.weight)
    kept = (layer._saved, layer.token.grad, layer.position.grad)
    ok = []

    def check_forward(result, before):
        expected = before["token"][ids_logical(values).reshape(shape)] + before["position"][
            expected_positions(shape, meaning)]
        assert same_floats(result, expected)
        ok.append(True)

    call.run(lambda: layer(ids, positions), check_forward)
    if not ok:
        assert layer._saved is kept[0] and layer.token.grad is kept[1] and layer.position.grad is kept[2]
        return
    tg, pg = layer.token.dense_grad().copy(), layer.position.dense_grad().copy()
    expected_after = {}
    g = data.draw(tables(shape + (D,), "input"))
    bcall = Call()
    bcall.add("grad_hidden", g)
    check_read_once(bcall, "grad_hidden", g, shape + (D,))

    def check_backward(result, before):
        assert same_floats(layer.token.dense_grad(), expected_after["token"])
        assert same_floats(layer.position.dense_grad(), expected_after["position"])

    kept = (layer.token.grad, layer.position.grad, snapshot(tg), snapshot(pg))
    failed = []

    def backward():
        if is_f32(g) and g.shape == shape + (D,):
            gh = g.reshape(size_of(shape), D)
            with np.errstate(all="ignore"):
                expected_after["token"] = accumulated_grad(layer.token, ids_logical(values), gh)
                expected_after["position"] = accumulated_grad(
                    layer.position, expected_positions(shape, meaning).reshape(-1), gh)
        try:
            return layer.backward(g)
        except Exception:
            failed.append(True)
            raise

    bcall.run(backward, check_backward)
    if failed:
        assert layer.token.grad is kept[0] and layer.position.grad is kept[1]
        assert snapshot(layer.token.dense_grad()) == kept[2] and snapshot(layer.position.dense_grad()) == kept[3]


# ---------------------------------------------------------------- focused cases (one per finding)

def _backward_raises(exc, gh, ids, tgrad, pgrad, positions=None):
    """gather_add_backward must raise exc and leave every array as it was, or (exc None) succeed."""
    before = [snapshot(a) for a in (gh, tgrad, pgrad)]
    if exc is None:
        fe.gather_add_backward(gh, ids, tgrad, pgrad, positions=positions)
        return
    with pytest.raises(exc):
        fe.gather_add_backward(gh, ids, tgrad, pgrad, positions=positions)
    assert [snapshot(a) for a in (gh, tgrad, pgrad)] == before


@pytest.mark.parametrize("V", [0, 1, 3])
def test_backward_one_zero_dim_array_as_both_gradients(V):
    """The case the adversarial property got wrong: position_grad is token_grad and D = 0. The array
    holds no byte, so it shares none with itself and no ValueError comes first; ids and positions
    are then both checked against its V rows (a second, drawn row count plays no part)."""
    both = np.zeros((V, 0), np.float32)

    def gh(n):
        return np.zeros((n, 0), np.float32)

    _backward_raises(None, gh(0), np.zeros(0, np.int64), both, both)
    _backward_raises(None, gh(0), np.zeros(0, np.int64), both, both, positions=V + 5)
    if V:
        _backward_raises(None, gh(1), [V - 1], both, both)
        _backward_raises(None, gh(V), np.full(V, V - 1), both, both)  # positions arange(V): last one V - 1
        _backward_raises(None, gh(1), [0], both, both, positions=np.array([V - 1]))
        _backward_raises(None, gh(1), [0], both, both, positions=V - 1)
        _backward_raises(IndexError, gh(1), [0], both, both, positions=np.array([V]))
        _backward_raises(IndexError, gh(1), [0], both, both, positions=V)
    _backward_raises(IndexError, gh(1), [V], both, both)
    _backward_raises(IndexError, gh(V + 1), np.zeros(V + 1, np.int64), both, both)  # positions arange(V + 1)


@pytest.mark.parametrize("V, P", [(3, 1), (1, 3), (3, 5), (0, 2), (2, 0)])
def test_backward_zero_dim_gradients_of_different_row_counts(V, P):
    """D = 0, two distinct arrays: ids are checked against V, positions against P, each at rows - 1 and rows."""
    tgrad, pgrad = np.zeros((V, 0), np.float32), np.zeros((P, 0), np.float32)
    gh = np.zeros((1, 0), np.float32)
    if V and P:
        _backward_raises(None, gh, [V - 1], tgrad, pgrad, positions=np.array([P - 1]))
        _backward_raises(None, gh, [V - 1], tgrad, pgrad, positions=P - 1)
        _backward_raises(None, np.zeros((P, 0), np.float32), np.zeros(P, np.int64), tgrad, pgrad)
    _backward_raises(IndexError, gh, [V], tgrad, pgrad, positions=np.array([0]))
    _backward_raises(IndexError, gh, [0], tgrad, pgrad, positions=np.array([P]))
    _backward_raises(IndexError, gh, [0], tgrad, pgrad, positions=P)
    _backward_raises(IndexError, np.zeros((P + 1, 0), np.float32), np.zeros(P + 1, np.int64), tgrad, pgrad)


def test_backward_one_array_as_both_gradients_is_a_value_error_before_any_range_check():
    """With D > 0 the same array twice shares memory: ValueError, checked before ids and positions are,
    so out-of-range ids or positions (for either row count) do not turn it into an IndexError."""
    both = np.arange(6, dtype=np.float32).reshape(3, 2)
    gh = np.ones((1, 2), np.float32)
    for ids, positions in (([0], None), ([3], None), ([0], np.array([3])), ([0], 3), ([0], np.array([7]))):
        _backward_raises(ValueError, gh, ids, both, both, positions=positions)
    _backward_raises(ValueError, np.ones((4, 2), np.float32), np.zeros(4, np.int64), both, both)


def test_backward_gradients_of_different_row_counts_at_their_last_rows():
    """ids at V - 1 and positions at P - 1 (V != P): each sum lands in its own table, in ids order."""
    rng = np.random.default_rng(11)
    V, P, D = 3, 5, 4
    tgrad = rng.standard_normal((V, D)).astype(np.float32)
    pgrad = rng.standard_normal((P, D)).astype(np.float32)
    gh = rng.standard_normal((2, 3, D)).astype(np.float32)
    ids = np.array([[V - 1, 0, V - 1], [1, V - 1, V - 1]])
    positions = np.array([[P - 1, 0, P - 1], [P - 1, 2, P - 1]])
    t, p = tgrad.copy(), pgrad.copy()
    np.add.at(t, ids.reshape(-1), gh.reshape(-1, D))
    np.add.at(p, positions.reshape(-1), gh.reshape(-1, D))
    fe.gather_add_backward(gh, ids, tgrad, pgrad, positions=positions)
    assert bitwise(tgrad, t) and bitwise(pgrad, p)
    start = P - 3  # positions start..P - 1 in every row
    t2, p2 = tgrad.copy(), pgrad.copy()
    np.add.at(t2, ids.reshape(-1), gh.reshape(-1, D))
    np.add.at(p2, np.tile(np.arange(start, P), 2), gh.reshape(-1, D))
    fe.gather_add_backward(gh, ids, tgrad, pgrad, positions=start)
    assert bitwise(tgrad, t2) and bitwise(pgrad, p2)


def test_misaligned_zero_d_ids_keep_their_shape():
    """0-d int64 ids at an odd byte offset: the result must have shape (D,), as for aligned 0-d ids,
    and hold row 2 (positions None with 0-d ids means position 0)."""
    rng = np.random.default_rng(5)
    table = rng.standard_normal((3, 4)).astype(np.float32)
    pos = rng.standard_normal((2, 4)).astype(np.float32)
    ids = arrange(np.array(2, dtype=np.int64), "misaligned")
    assert ids.shape == () and not ids.flags.aligned
    assert bitwise(fe.gather(table, ids), table[2])
    assert bitwise(fe.gather_add(table, pos, ids), table[2] + pos[0])
    g = rng.standard_normal(4).astype(np.float32)
    grad = rng.standard_normal((3, 4)).astype(np.float32)
    expected = grad.copy()
    expected[2] += g
    fe.scatter_add(grad, ids, g)
    assert bitwise(grad, expected)
    rows, values = fe.coalesce(ids, g)
    assert bitwise(rows, np.array([2], np.int64)) and bitwise(values, g.reshape(1, 4))


def test_zero_d_ids_with_a_zero_d_positions_array():
    """positions broadcastable to ids.shape includes a 0-d array for 0-d ids."""
    rng = np.random.default_rng(6)
    tok = rng.standard_normal((3, 4)).astype(np.float32)
    pos = rng.standard_normal((2, 4)).astype(np.float32)
    hidden = fe.gather_add(tok, pos, np.array(2), positions=np.array(1))
    assert bitwise(hidden, tok[2] + pos[1])
    tg, pg = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32)
    g = rng.standard_normal(4).astype(np.float32)
    expected_t, expected_p = tg.copy(), pg.copy()
    expected_t[2] += g
    expected_p[1] += g
    fe.gather_add_backward(g, np.array(2), tg, pg, positions=np.array(1))
    assert bitwise(tg, expected_t), "token_grad"
    assert bitwise(pg, expected_p), "position_grad"


@pytest.mark.parametrize("sparse", [False, True])
def test_token_position_embedding_zero_d_ids_backward(sparse):
    layer = fe.TokenPositionEmbedding(5, 4, 3, sparse=sparse, seed=0)
    hidden = layer(np.array(2))
    assert bitwise(hidden, layer.token.weight[2] + layer.position.weight[0])
    g = np.array([0.5, -1.25, 3.0], np.float32)
    layer.backward(g)
    expected_t, expected_p = np.zeros((5, 3), np.float32), np.zeros((4, 3), np.float32)
    expected_t[2], expected_p[0] = g, g
    assert bitwise(layer.token.dense_grad(), expected_t)
    assert bitwise(layer.position.dense_grad(), expected_p)


def test_a_list_of_ints_out_of_int64_range_is_an_index_error():
    """[-1, 2**63] is a list of integers, out of range: numpy turns it into float64 on the way."""
    table = np.zeros((3, 2), np.float32)
    for ids in ([-1, 2**63], [2**64], [0, -(2**63) - 1]):
        with pytest.raises(IndexError):
            fe.gather(table, ids)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("layout", ["c", "fortran"])
def test_out_sharing_memory_with_converted_ids_is_a_value_error(dtype, layout):
    """DESIGN: `out` that shares memory with an input is a ValueError, also when ids had to be converted."""
    table = np.arange(8, dtype=np.float32).reshape(4, 2)
    buf = np.zeros(32, np.float32)
    out = buf[:8].reshape(2, 2, 2)
    ids = buf.view(np.uint8)[:4 * np.dtype(dtype).itemsize].view(dtype).reshape(2, 2)
    if layout == "fortran":
        ids = ids.T  # a Fortran-ordered view of the same memory
    assert np.shares_memory(ids, out)
    buf[8:] = np.arange(24, dtype=np.float32)  # the ids live at the start of buf; the rest too must stay
    ids_before, buf_before = ids.copy(), snapshot(buf)
    with pytest.raises(ValueError):
        fe.gather(table, ids, out=out)
    assert bitwise(ids, ids_before) and snapshot(buf) == buf_before


def test_out_sharing_memory_with_broadcast_positions_is_a_value_error():
    tok = np.zeros((4, 2), np.float32)
    pos = np.zeros((4, 2), np.float32)
    buf = np.zeros(32, np.float32)
    out = buf[:16].reshape(2, 4, 2)
    positions = buf.view(np.int64)[:4]  # shape (4,), broadcast to ids (2, 4)
    buf[16:] = 5.0  # bytes of buf that out does not cover either: nothing may move
    before = snapshot(buf)
    with pytest.raises(ValueError):
        fe.gather_add(tok, pos, np.zeros((2, 4), np.int64), positions=positions, out=out)
    assert snapshot(buf) == before


@pytest.mark.parametrize("entry", ["gather", "gather_add", "scatter_add", "gather_add_backward", "coalesce"])
def test_zero_row_tables_with_empty_ids(entry):
    """Empty ids on zero-row tables: an empty result of the right shape and dtype, no error, nothing
    written; and the boundary next to it: one id (or one position) on a zero-row table is an IndexError."""
    for D in (0, 3):
        empty = np.zeros((0, D), np.float32)
        for shape in ((0,), (0, 5), (2, 0)):
            ids = np.zeros(shape, np.int64)
            grad_out = np.zeros(shape + (D,), np.float32)
            nothing = np.zeros(shape + (D,), np.float32)
            if entry == "gather":
                assert bitwise(fe.gather(empty, ids), nothing)
            elif entry == "gather_add":
                assert bitwise(fe.gather_add(empty, empty, ids), nothing)
                assert bitwise(fe.gather_add(empty, empty, ids, positions=0), nothing)
                assert bitwise(fe.gather_add(empty, empty, ids, positions=np.zeros(shape, np.int64)), nothing)
            elif entry == "scatter_add":
                grad = np.zeros((0, D), np.float32)
                assert fe.scatter_add(grad, ids, grad_out) is None
                assert bitwise(grad, empty)
            elif entry == "gather_add_backward":
                tg, pg = np.zeros((0, D), np.float32), np.zeros((0, D), np.float32)
                assert fe.gather_add_backward(grad_out, ids, tg, pg) is None
                assert bitwise(tg, empty) and bitwise(pg, empty)
            else:
                rows, values = fe.coalesce(ids, grad_out)
                assert bitwise(rows, np.zeros(0, np.int64)) and bitwise(values, np.zeros((0, D), np.float32))
        one = np.zeros((1, D), np.float32)
        calls = {  # each with one id or position that no zero-row table has
            "gather": [lambda: fe.gather(empty, [0])],
            "gather_add": [lambda: fe.gather_add(empty, one, [0]),
                           lambda: fe.gather_add(one, empty, [0]),
                           lambda: fe.gather_add(one, empty, [0], positions=np.array([0]))],
            "scatter_add": [lambda: fe.scatter_add(np.zeros((0, D), np.float32), [0], one)],
            "gather_add_backward": [
                lambda: fe.gather_add_backward(one, [0], np.zeros((0, D), np.float32), np.zeros((1, D), np.float32)),
                lambda: fe.gather_add_backward(one, [0], np.zeros((1, D), np.float32), np.zeros((0, D), np.float32)),
                lambda: fe.gather_add_backward(one, [0], np.zeros((1, D), np.float32), np.zeros((0, D), np.float32),
                                               positions=np.array([0]))],
            "coalesce": [lambda: fe.coalesce([-1], one)],  # coalesce has no table: its one bound is 0
        }
        for call in calls[entry]:
            with pytest.raises(IndexError):
                call()
        if entry == "coalesce":  # one row per distinct id, also when D = 0
            g = np.arange(3 * D, dtype=np.float32).reshape(3, D)
            rows, values = fe.coalesce([4, 1, 4], g)
            assert bitwise(rows, np.array([1, 4], np.int64))
            assert bitwise(values, np.stack([g[1], g[0] + g[2]]))


@pytest.mark.parametrize("bits", SPECIAL_BITS)
def test_special_floats_pass_through(bits):
    """NaN (with its payload, signalling or quiet), inf, -0.0 and subnormals are data: a gather copies
    their bits, sums follow IEEE arithmetic."""
    table = np.full((3, 5), np.uint32(bits)).view(np.float32)
    got = fe.gather(table, [2, 0, 2])
    assert got.view(np.uint32).tolist() == [[bits] * 5] * 3
    zeros = np.zeros((2, 5), np.float32)
    with np.errstate(all="ignore"):
        assert same_floats(fe.gather_add(table, zeros, [1, 1]), table[[1, 1]] + zeros)
        grad = np.zeros((3, 5), np.float32)
        fe.scatter_add(grad, [1, 1], table[:2])
        expected = np.zeros((3, 5), np.float32)
        np.add.at(expected, [1, 1], table[:2])
        assert same_floats(grad, expected)


@pytest.mark.parametrize("kind", ["Embedding", "TokenPositionEmbedding"])
def test_layer_out_sharing_memory_with_ids_is_a_value_error(kind):
    """A layer copies the ids it keeps for backward; `out` must still be checked against the caller's ids
    (else the call succeeds and overwrites them)."""
    layer = fe.Embedding(4, 2, seed=0) if kind == "Embedding" else fe.TokenPositionEmbedding(4, 4, 2, seed=0)
    buf = np.zeros(8, np.float32)
    ids = buf.view(np.int32)[:4]
    ids[:] = [1, 2, 3, 1]
    out = buf.reshape(4, 2)
    with pytest.raises(ValueError):
        layer(ids, out=out)
    assert ids.tolist() == [1, 2, 3, 1]


def test_misaligned_inputs_read_once_are_copied_or_read_correctly():
    """float32 and int64 inputs at an odd byte offset, at every entry point that reads them. A plain build
    on x86 reads unaligned memory without complaint; the sanitizer build (scripts/sanitize.sh) reports a
    misaligned load, so this is the case that proves the kernels are only given aligned pointers."""
    rng = np.random.default_rng(3)
    V, P, D, shape = 7, 5, 6, (2, 5)
    tok = rng.standard_normal((V, D)).astype(np.float32)
    pos = rng.standard_normal((P, D)).astype(np.float32)
    ids = rng.integers(0, V, size=shape)
    gh = rng.standard_normal(shape + (D,)).astype(np.float32)
    m_ids, m_gh = arrange(ids, "misaligned"), arrange(gh, "misaligned")
    m_pos = arrange(np.arange(5) % P, "misaligned")
    assert not (m_ids.flags.aligned or m_gh.flags.aligned or m_pos.flags.aligned)
    assert bitwise(fe.gather(tok, m_ids), tok[ids])
    assert same_floats(fe.gather_add(tok, pos, m_ids, positions=m_pos), tok[ids] + pos[np.arange(5) % P])
    grad = np.zeros((V, D), np.float32)
    fe.scatter_add(grad, m_ids, m_gh)
    expected = np.zeros((V, D), np.float32)
    np.add.at(expected, ids.reshape(-1), gh.reshape(-1, D))
    assert same_floats(grad, expected)
    tg, pg = np.zeros((V, D), np.float32), np.zeros((P, D), np.float32)
    fe.gather_add_backward(m_gh, m_ids, tg, pg, positions=m_pos)
    assert same_floats(tg, expected)
    expected_p = np.zeros((P, D), np.float32)
    np.add.at(expected_p, np.tile(np.arange(5) % P, shape[0]), gh.reshape(-1, D))
    assert same_floats(pg, expected_p)
    rows, values = fe.coalesce(m_ids, m_gh)
    u, inverse = np.unique(ids, return_inverse=True)
    sums = np.zeros((len(u), D), np.float32)
    np.add.at(sums, inverse.reshape(-1), gh.reshape(-1, D))
    assert bitwise(rows, u.astype(np.int64)) and same_floats(values, sums)
    # Adam from a state that is not zero (so a kernel that ignored m or v would differ), at step 3
    w = rng.standard_normal((V, D)).astype(np.float32)
    m = rng.standard_normal((V, D)).astype(np.float32) * np.float32(0.1)
    v = rng.random((V, D)).astype(np.float32) * np.float32(0.01)
    g = rng.standard_normal((2, D)).astype(np.float32)
    rows = np.array([1, 4], np.int64)
    b1, b2, t = 0.9, 0.999, 3
    expected = adam_transcription(w, m, v, g, rows, 0.1, b1, b2, 1e-8, 1 - b1**t, 1 - b2**t)
    from fastembed import _kernels
    _kernels.adam_step(w, m, v, arrange(g, "misaligned"), arrange(rows, "misaligned"),
                       0.1, b1, b2, 1e-8, 1 - b1**t, 1 - b2**t)
    for name, got, want in zip(("weight", "exp_avg", "exp_avg_sq"), (w, m, v), expected):
        assert bitwise(got, want), name


def adam_transcription(w, m, v, g, rows, lr, beta1, beta2, eps, bias1, bias2):
    """Copies of (w, m, v) after one Adam step of `rows`, written from the formula in optim.py
    (m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, w -= lr (m / bias1) / (sqrt(v / bias2) + eps)).

    Every operation is one IEEE float32 operation, in the kernel's documented order: its arguments
    arrive as float32, the corrections as float32 reciprocals computed in double, and the build
    forbids FMA contraction (setup.py), so the result must match bitwise, not just within an ulp.
    Element by element in Python, so that it shares no vectorised numpy path with anything."""
    f = np.float32
    lr, b1, b2, eps, inv1, inv2 = f(lr), f(beta1), f(beta2), f(eps), f(1.0 / bias1), f(1.0 / bias2)
    keep1, keep2 = f(1) - b1, f(1) - b2
    w, m, v = w.copy(), m.copy(), v.copy()
    for k, r in enumerate(rows):
        for d in range(w.shape[1]):
            gd = g[k, d]
            md = b1 * m[r, d] + keep1 * gd
            vd = b2 * v[r, d] + keep2 * (gd * gd)
            m[r, d], v[r, d] = md, vd
            w[r, d] = w[r, d] - (lr * (md * inv1)) / (np.sqrt(vd * inv2) + eps)
    return w, m, v


def test_adam_transcription_is_the_book_formula_in_float64_within_float32_rounding():
    """The float32 transcription above is the formula itself: against a float64 evaluation it differs
    only by float32 rounding (a few ulp of each result), so a bitwise match with it is not circular."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    m = (rng.standard_normal((4, 3)) * 0.1).astype(np.float32)
    v = (rng.random((4, 3)) * 0.01).astype(np.float32)
    g = rng.standard_normal((2, 3)).astype(np.float32)
    rows = [0, 2]
    lr, b1, b2, eps, t = 0.01, 0.85, 0.99, 1e-8, 2
    got = adam_transcription(w, m, v, g, rows, lr, b1, b2, eps, 1 - b1**t, 1 - b2**t)
    w64, m64, v64 = (a.astype(np.float64) for a in (w, m, v))
    g64 = g.astype(np.float64)
    m64[rows] = b1 * m64[rows] + (1 - b1) * g64
    v64[rows] = b2 * v64[rows] + (1 - b2) * g64**2
    w64[rows] -= lr * (m64[rows] / (1 - b1**t)) / (np.sqrt(v64[rows] / (1 - b2**t)) + eps)
    for a, b in zip(got, (w64, m64, v64)):
        np.testing.assert_allclose(a, b, rtol=4e-6, atol=1e-12)
    untouched = [1, 3]
    for a, b in zip(got, (w, m, v)):
        assert bitwise(a[untouched], b[untouched])
