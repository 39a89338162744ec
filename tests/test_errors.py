"""The error contract of DESIGN.md, at exact boundaries, and "nothing lost".

Every failing call must raise the documented exception class with the offending
value, shape or dtype in its message, and must leave every array it was given
(tables, out, gradient tables, ids, grad_out, positions) bitwise as it was. Bad
values are put at the END of ids / positions, so a kernel that checked while
writing would already have written the earlier rows.
"""
import numpy as np
import pytest

import fastembed as fe
from _helpers import Snapshot, assert_bitwise, misaligned_float32, positions_oracle, read_only

V, P, D = 7, 5, 4
SHAPE = (2, 4)  # T = 4 <= P
BIG_SHAPE = (16, 512)  # N * D = 32768 with D = 4: the range check runs without the GIL
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


class Env:
    """Fresh random arrays for one case: every one of them is snapshotted around the failing call."""

    def __init__(self, shape=SHAPE, seed=0, v=V, p=P, d=D):
        rng = np.random.default_rng(seed)
        self.shape = shape
        self.tok = rng.standard_normal((v, d)).astype(np.float32)
        self.pos = rng.standard_normal((p, d)).astype(np.float32)
        self.ids = rng.integers(0, min(v, p), size=shape).astype(np.int64)
        self.grad_out = rng.standard_normal(shape + (d,)).astype(np.float32)
        self.tgrad = rng.standard_normal((v, d)).astype(np.float32)
        self.pgrad = rng.standard_normal((p, d)).astype(np.float32)
        self.out = rng.standard_normal(shape + (d,)).astype(np.float32)
        self.positions = rng.integers(0, p, size=shape).astype(np.int64)
        self.extra = {}

    def keep(self, **arrays):
        """Register more arrays made by a case (views, odd layouts) for the snapshot."""
        self.extra.update(arrays)

    def arrays(self):
        base = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        base.update({f"extra.{k}": v for k, v in self.extra.items()})
        return base


CASES = {}


def case(exc, match, shape=SHAPE):
    def register(fn):
        assert fn.__name__ not in CASES
        CASES[fn.__name__] = (fn, exc, match, shape)
        return fn
    return register


def set_last(a, value):
    a.reshape(-1)[-1] = value
    return a


# ---------------------------------------------------------------- gather

@case(IndexError, r"ids\[1, 3\] = 7 is out of range .*7 rows")
def gather_id_equals_rows(e):
    set_last(e.ids, V)
    return lambda: fe.gather(e.tok, e.ids, out=e.out)


@case(IndexError, r"ids\[1, 3\] = -1 is out of range .*7 rows")
def gather_id_minus_one(e):
    set_last(e.ids, -1)
    return lambda: fe.gather(e.tok, e.ids, out=e.out)


@case(IndexError, r"ids\[1, 3\] = 9223372036854775807 .*7 rows")
def gather_id_int64_max(e):
    set_last(e.ids, INT64_MAX)
    return lambda: fe.gather(e.tok, e.ids, out=e.out)


@case(IndexError, r"ids\[1, 3\] = -9223372036854775808 .*7 rows")
def gather_id_int64_min(e):
    set_last(e.ids, INT64_MIN)
    return lambda: fe.gather(e.tok, e.ids, out=e.out)


@case(IndexError, r"ids\[1, 3\] = 7 .*7 rows")
def gather_int32_id_equals_rows(e):
    ids32 = set_last(e.ids.astype(np.int32), V)
    e.keep(ids32=ids32)
    return lambda: fe.gather(e.tok, ids32, out=e.out)


@case(IndexError, r"ids\[1, 3\] = -1 .*7 rows")
def gather_int32_id_minus_one(e):
    ids32 = set_last(e.ids.astype(np.int32), -1)
    e.keep(ids32=ids32)
    return lambda: fe.gather(e.tok, ids32, out=e.out)


@case(IndexError, r"ids\[1, 3\] = 7 .*7 rows")
def gather_list_id_equals_rows(e):
    ids = set_last(e.ids.copy(), V).tolist()
    return lambda: fe.gather(e.tok, ids, out=e.out)


@case(IndexError, r"ids = 7 .*7 rows", shape=())
def gather_0d_id_equals_rows(e):
    return lambda: fe.gather(e.tok, np.int64(V), out=e.out)


@case(IndexError, r"9223372036854775808")
def gather_list_id_2_63(e):
    ids = e.ids.tolist()
    ids[1][3] = 2**63
    return lambda: fe.gather(e.tok, ids, out=e.out)


@case(IndexError, r"ids\[1, 3\] = 1099511627776 is out of range .*7 rows")
def gather_nested_list_id_past_int32(e):
    # A nested list is read element by element (ops._object_ids): its ids must be widened to int64,
    # never to int32, or this id would overflow (or wrap onto a valid row) instead of being named.
    ids = e.ids.tolist()
    ids[1][3] = 2**40
    return lambda: fe.gather(e.tok, ids, out=e.out)


@case(IndexError, r"ids\[1, 3\] = 4294967296 is out of range .*7 rows")
def gather_nested_list_id_2_32(e):
    ids = e.ids.tolist()
    ids[1][3] = 2**32  # 0 once truncated to 32 bits: a valid row
    return lambda: fe.gather(e.tok, ids, out=e.out)


@case(IndexError, r"9223372036854775813")
def gather_uint64_id_past_int64(e):
    ids = e.ids.astype(np.uint64)
    ids[1, 3] = 2**63 + 5
    e.keep(ids_u64=ids)
    return lambda: fe.gather(e.tok, ids, out=e.out)


@case(IndexError, r"18446744073709551616")
def gather_list_id_2_64(e):
    ids = e.ids.tolist()
    ids[1][3] = 2**64
    return lambda: fe.gather(e.tok, ids, out=e.out)


@case(TypeError, r"float64")
def gather_float_ids(e):
    f = e.ids.astype(np.float64)
    e.keep(ids_float=f)
    return lambda: fe.gather(e.tok, f, out=e.out)


@case(TypeError, r"float")
def gather_float_list_ids(e):
    ids = e.ids.tolist()
    ids[1][3] = 1.5
    return lambda: fe.gather(e.tok, ids, out=e.out)


@case(TypeError, r"float32")
def gather_float32_ids(e):
    f = e.ids.astype(np.float32)
    e.keep(ids_float=f)
    return lambda: fe.gather(e.tok, f, out=e.out)


@case(TypeError, r"bool")
def gather_bool_ids(e):
    b = e.ids > 0
    e.keep(ids_bool=b)
    return lambda: fe.gather(e.tok, b, out=e.out)


@case(TypeError, r"bool")
def gather_bool_list_ids(e):
    b = (e.ids > 0).tolist()
    return lambda: fe.gather(e.tok, b, out=e.out)


@case(TypeError, r"bool", shape=())
def gather_bool_scalar_id(e):
    return lambda: fe.gather(e.tok, True, out=e.out)


@case(TypeError, r"object")
def gather_object_ids(e):
    o = e.ids.astype(object)
    e.keep(ids_object=o)
    return lambda: fe.gather(e.tok, o, out=e.out)


@case(TypeError, r"NoneType")
def gather_list_with_none(e):
    ids = e.ids.tolist()
    ids[1][3] = None
    return lambda: fe.gather(e.tok, ids, out=e.out)


@case(TypeError, r"U\d|str")
def gather_list_with_string(e):
    ids = e.ids.tolist()
    ids[1][3] = "3"
    return lambda: fe.gather(e.tok, ids, out=e.out)


@case(TypeError, r"float64")
def gather_float64_table(e):
    t = e.tok.astype(np.float64)
    e.keep(tok64=t)
    return lambda: fe.gather(t, e.ids, out=e.out)


@case(TypeError, r"float16")
def gather_float16_table(e):
    t = e.tok.astype(np.float16)
    e.keep(tok16=t)
    return lambda: fe.gather(t, e.ids, out=e.out)


@case(TypeError, r"int32")
def gather_int_table(e):
    t = e.tok.astype(np.int32)
    e.keep(tok_int=t)
    return lambda: fe.gather(t, e.ids, out=e.out)


@case(TypeError, r"list")
def gather_list_table(e):
    return lambda: fe.gather(e.tok.tolist(), e.ids, out=e.out)


@case(TypeError, r">f4|float32")
def gather_byteswapped_table(e):
    t = e.tok.astype(">f4")
    e.keep(tok_be=t)
    return lambda: fe.gather(t, e.ids, out=e.out)


@case(ValueError, r"\(28,\)")
def gather_1d_table(e):
    t = e.tok.reshape(-1)
    return lambda: fe.gather(t, e.ids)


@case(ValueError, r"\(7, 2, 2\)")
def gather_3d_table(e):
    t = e.tok.reshape(V, 2, 2)
    return lambda: fe.gather(t, e.ids)


@case(ValueError, r"C-contiguous")
def gather_fortran_table(e):
    t = np.asfortranarray(e.tok)
    e.keep(tok_f=t)
    return lambda: fe.gather(t, e.ids, out=e.out)


@case(ValueError, r"\(2, 4, 4\).*\(2, 4, 3\)")
def gather_out_wrong_shape(e):
    o = np.ones(SHAPE + (3,), np.float32)
    e.keep(out3=o)
    return lambda: fe.gather(e.tok, e.ids, out=o)


@case(ValueError, r"\(2, 4, 4\).*\(8, 4\)")
def gather_out_flat_shape(e):
    o = np.ones((8, 4), np.float32)
    e.keep(out_flat=o)
    return lambda: fe.gather(e.tok, e.ids, out=o)


@case(TypeError, r"float64")
def gather_out_float64(e):
    o = e.out.astype(np.float64)
    e.keep(out64=o)
    return lambda: fe.gather(e.tok, e.ids, out=o)


@case(ValueError, r"read-only")
def gather_out_read_only(e):
    o = read_only(e.out)
    e.keep(out_ro=o)
    return lambda: fe.gather(e.tok, e.ids, out=o)


@case(ValueError, r"C-contiguous")
def gather_out_not_contiguous(e):
    base = np.ones(SHAPE + (2 * D,), np.float32)
    o = base[..., ::2]
    e.keep(out_base=base)
    return lambda: fe.gather(e.tok, e.ids, out=o)


@case(ValueError, r"aligned")
def gather_out_misaligned(e):
    o = misaligned_float32(SHAPE + (D,))
    o[...] = 3.0
    e.keep(out_mis=o)
    return lambda: fe.gather(e.tok, e.ids, out=o)


@case(ValueError, r"shares memory with table")
def gather_out_aliases_table(e):
    big = np.random.default_rng(1).standard_normal((12, D)).astype(np.float32)
    e.keep(big_table=big)
    ids = np.arange(8).reshape(SHAPE)
    return lambda: fe.gather(big, ids, out=big[4:12].reshape(SHAPE + (D,)))


@case(ValueError, r"shares memory with ids")
def gather_out_aliases_ids(e):
    buf = np.zeros(int(np.prod(SHAPE)) * D, dtype=np.int32)
    ids = buf[: int(np.prod(SHAPE))].reshape(SHAPE)
    ids[...] = e.ids
    out = buf.view(np.float32).reshape(SHAPE + (D,))
    e.keep(buf=buf)
    return lambda: fe.gather(e.tok, ids, out=out)


# ---------------------------------------------------------------- gather_add

@case(IndexError, r"ids\[1, 3\] = 7 .*token_table with 7 rows")
def gather_add_id_equals_rows(e):
    set_last(e.ids, V)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, out=e.out)


@case(IndexError, r"ids\[1, 3\] = -1 .*7 rows")
def gather_add_id_minus_one(e):
    set_last(e.ids, -1)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=1, out=e.out)


@case(IndexError, r"2\.\.5.*position_table with 5 rows")
def gather_add_start_plus_T_is_P_plus_1(e):
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=P - SHAPE[-1] + 1, out=e.out)


@case(IndexError, r"2\.\.5.*position_table with 5 rows")
def gather_add_numpy_int_start_plus_T_is_P_plus_1(e):
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=np.int32(P - SHAPE[-1] + 1), out=e.out)


@case(IndexError, r"-1")
def gather_add_negative_start(e):
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=-1, out=e.out)


@case(IndexError, r"9223372036854775807")
def gather_add_start_int64_max(e):
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=np.int64(INT64_MAX), out=e.out)


@case(IndexError, r"0\.\.5.*5 rows", shape=(2, 6))
def gather_add_sequence_longer_than_position_table(e):
    e.ids = np.zeros((2, 6), np.int64)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, out=e.out)


@case(IndexError, r"positions\[1, 3\] = 5 .*5 rows")
def gather_add_position_equals_rows(e):
    set_last(e.positions, P)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=e.positions, out=e.out)


@case(IndexError, r"positions\[1, 3\] = -1 .*5 rows")
def gather_add_position_minus_one(e):
    set_last(e.positions, -1)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=e.positions, out=e.out)


@case(IndexError, r"= 5 .*5 rows")
def gather_add_broadcast_position_equals_rows(e):
    row = np.array([0, 1, 2, P])
    e.keep(row=row)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=row, out=e.out)


@case(IndexError, r"positions\[1, 3\] = 5 .*5 rows")
def gather_add_int32_position_equals_rows(e):
    p32 = set_last(e.positions.astype(np.int32), P)
    e.keep(p32=p32)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=p32, out=e.out)


@case(TypeError, r"float64")
def gather_add_float_positions(e):
    pf = e.positions.astype(np.float64)
    e.keep(pf=pf)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=pf, out=e.out)


@case(TypeError, r"bool")
def gather_add_bool_start(e):
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=True, out=e.out)


@case(TypeError, r"bool")
def gather_add_bool_positions(e):
    pb = e.positions > 0
    e.keep(pb=pb)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=pb, out=e.out)


@case(ValueError, r"\(2, 4\).*\(3,\)")
def gather_add_positions_not_broadcastable(e):
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=np.array([0, 1, 2]), out=e.out)


@case(ValueError, r"\(7, 4\).*\(5, 3\)")
def gather_add_mismatched_dim(e):
    pos3 = e.pos[:, :3].copy()
    e.keep(pos3=pos3)
    return lambda: fe.gather_add(e.tok, pos3, e.ids, out=e.out)


@case(TypeError, r"float64")
def gather_add_float64_position_table(e):
    p64 = e.pos.astype(np.float64)
    e.keep(p64=p64)
    return lambda: fe.gather_add(e.tok, p64, e.ids, out=e.out)


@case(TypeError, r"float64")
def gather_add_float64_token_table(e):
    t64 = e.tok.astype(np.float64)
    e.keep(t64=t64)
    return lambda: fe.gather_add(t64, e.pos, e.ids, out=e.out)


@case(ValueError, r"\(5, 4, 1\)")
def gather_add_3d_position_table(e):
    return lambda: fe.gather_add(e.tok, e.pos.reshape(P, D, 1), e.ids, out=e.out)


@case(ValueError, r"\(2, 4, 4\).*\(2, 4, 5\)")
def gather_add_out_wrong_shape(e):
    o = np.ones(SHAPE + (5,), np.float32)
    e.keep(o=o)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, out=o)


@case(ValueError, r"read-only")
def gather_add_out_read_only(e):
    o = read_only(e.out)
    e.keep(o=o)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, out=o)


@case(ValueError, r"C-contiguous")
def gather_add_out_fortran(e):
    o = np.asfortranarray(e.out)
    e.keep(o=o)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, out=o)


@case(ValueError, r"shares memory with position_table")
def gather_add_out_aliases_position_table(e):
    big = np.random.default_rng(2).standard_normal((8, D)).astype(np.float32)
    e.keep(big=big)
    return lambda: fe.gather_add(e.tok, big, e.ids, out=big.reshape(SHAPE + (D,)))


@case(ValueError, r"shares memory with token_table")
def gather_add_out_aliases_token_table(e):
    big = np.random.default_rng(3).standard_normal((8, D)).astype(np.float32)
    e.keep(big=big)
    return lambda: fe.gather_add(big, e.pos, e.ids, out=big.reshape(SHAPE + (D,)))


# ---------------------------------------------------------------- scatter_add

@case(IndexError, r"ids\[1, 3\] = 7 .*7 rows")
def scatter_add_id_equals_rows(e):
    set_last(e.ids, V)
    return lambda: fe.scatter_add(e.tgrad, e.ids, e.grad_out)


@case(IndexError, r"ids\[1, 3\] = -1 .*7 rows")
def scatter_add_id_minus_one(e):
    set_last(e.ids, -1)
    return lambda: fe.scatter_add(e.tgrad, e.ids, e.grad_out)


@case(IndexError, r"ids\[1, 3\] = 9223372036854775807 .*7 rows")
def scatter_add_id_int64_max(e):
    set_last(e.ids, INT64_MAX)
    return lambda: fe.scatter_add(e.tgrad, e.ids, e.grad_out)


@case(IndexError, r"ids\[1, 3\] = 7 .*7 rows")
def scatter_add_int32_id_equals_rows(e):
    ids32 = set_last(e.ids.astype(np.int32), V)
    e.keep(ids32=ids32)
    return lambda: fe.scatter_add(e.tgrad, ids32, e.grad_out)


@case(ValueError, r"\(2, 4, 4\).*\(2, 3, 4\)")
def scatter_add_grad_out_wrong_shape(e):
    g = e.grad_out[:, :3].copy()
    e.keep(g=g)
    return lambda: fe.scatter_add(e.tgrad, e.ids, g)


@case(ValueError, r"\(2, 4, 4\).*\(2, 4\)")
def scatter_add_grad_out_wrong_rank(e):
    g = e.grad_out[..., 0].copy()
    e.keep(g=g)
    return lambda: fe.scatter_add(e.tgrad, e.ids, g)


@case(ValueError, r"\(2, 4, 4\).*\(2, 4, 5\)")
def scatter_add_grad_out_wrong_dim(e):
    g = np.ones(SHAPE + (5,), np.float32)
    e.keep(g=g)
    return lambda: fe.scatter_add(e.tgrad, e.ids, g)


@case(TypeError, r"float64")
def scatter_add_grad_out_float64(e):
    g = e.grad_out.astype(np.float64)
    e.keep(g=g)
    return lambda: fe.scatter_add(e.tgrad, e.ids, g)


@case(TypeError, r"float64")
def scatter_add_grad_table_float64(e):
    g = e.tgrad.astype(np.float64)
    e.keep(g=g)
    return lambda: fe.scatter_add(g, e.ids, e.grad_out)


@case(ValueError, r"read-only")
def scatter_add_grad_table_read_only(e):
    g = read_only(e.tgrad)
    e.keep(g=g)
    return lambda: fe.scatter_add(g, e.ids, e.grad_out)


@case(ValueError, r"C-contiguous")
def scatter_add_grad_table_fortran(e):
    g = np.asfortranarray(e.tgrad)
    e.keep(g=g)
    return lambda: fe.scatter_add(g, e.ids, e.grad_out)


@case(ValueError, r"aligned")
def scatter_add_grad_table_misaligned(e):
    g = misaligned_float32((V, D))
    g[...] = e.tgrad
    e.keep(g=g)
    return lambda: fe.scatter_add(g, e.ids, e.grad_out)


@case(ValueError, r"\(28,\)")
def scatter_add_grad_table_1d(e):
    return lambda: fe.scatter_add(e.tgrad.reshape(-1), e.ids, e.grad_out)


@case(ValueError, r"shares memory with grad_out")
def scatter_add_grad_table_aliases_grad_out(e):
    big = np.random.default_rng(4).standard_normal((8, D)).astype(np.float32)
    e.keep(big=big)
    return lambda: fe.scatter_add(big, e.ids, big.reshape(SHAPE + (D,)))


@case(TypeError, r"float64")
def scatter_add_float_ids(e):
    f = e.ids.astype(np.float64)
    e.keep(f=f)
    return lambda: fe.scatter_add(e.tgrad, f, e.grad_out)


@case(TypeError, r"bool")
def scatter_add_bool_ids(e):
    b = e.ids > 0
    e.keep(b=b)
    return lambda: fe.scatter_add(e.tgrad, b, e.grad_out)


# ---------------------------------------------------------------- gather_add_backward

@case(IndexError, r"ids\[1, 3\] = 7 .*7 rows")
def backward_id_equals_rows(e):
    set_last(e.ids, V)
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, e.tgrad, e.pgrad)


@case(IndexError, r"ids\[1, 3\] = -1 .*7 rows")
def backward_id_minus_one(e):
    set_last(e.ids, -1)
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, e.tgrad, e.pgrad)


@case(IndexError, r"positions\[1, 3\] = 5 .*5 rows")
def backward_position_equals_rows(e):
    # every id is fine: a kernel that checked positions late would have written token_grad
    set_last(e.positions, P)
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, e.tgrad, e.pgrad, positions=e.positions)


@case(IndexError, r"positions\[1, 3\] = -1 .*5 rows")
def backward_position_minus_one(e):
    set_last(e.positions, -1)
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, e.tgrad, e.pgrad, positions=e.positions)


@case(IndexError, r"2\.\.5.*position_grad with 5 rows")
def backward_start_plus_T_is_P_plus_1(e):
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, e.tgrad, e.pgrad, positions=P - SHAPE[-1] + 1)


@case(IndexError, r"-1")
def backward_negative_start(e):
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, e.tgrad, e.pgrad, positions=-1)


@case(ValueError, r"read-only")
def backward_token_grad_read_only(e):
    g = read_only(e.tgrad)
    e.keep(g=g)
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, g, e.pgrad)


@case(ValueError, r"read-only")
def backward_position_grad_read_only(e):
    g = read_only(e.pgrad)
    e.keep(g=g)
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, e.tgrad, g)


@case(TypeError, r"float64")
def backward_position_grad_float64(e):
    g = e.pgrad.astype(np.float64)
    e.keep(g=g)
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, e.tgrad, g)


@case(ValueError, r"C-contiguous")
def backward_token_grad_fortran(e):
    g = np.asfortranarray(e.tgrad)
    e.keep(g=g)
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, g, e.pgrad)


@case(ValueError, r"\(7, 4\).*\(5, 3\)")
def backward_mismatched_dim(e):
    g = np.ones((P, 3), np.float32)
    e.keep(g=g)
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, e.tgrad, g)


@case(ValueError, r"\(2, 4, 4\).*\(2, 4, 3\)")
def backward_grad_hidden_wrong_shape(e):
    g = np.ones(SHAPE + (3,), np.float32)
    e.keep(g=g)
    return lambda: fe.gather_add_backward(g, e.ids, e.tgrad, e.pgrad)


@case(TypeError, r"float64")
def backward_grad_hidden_float64(e):
    g = e.grad_out.astype(np.float64)
    e.keep(g=g)
    return lambda: fe.gather_add_backward(g, e.ids, e.tgrad, e.pgrad)


@case(ValueError, r"shares memory")
def backward_same_grad_table_twice(e):
    both = np.random.default_rng(5).standard_normal((V, D)).astype(np.float32)
    e.keep(both=both)
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, both, both)


@case(ValueError, r"shares memory with grad_hidden")
def backward_grad_hidden_aliases_token_grad(e):
    big = np.random.default_rng(6).standard_normal((8, D)).astype(np.float32)
    e.keep(big=big)
    return lambda: fe.gather_add_backward(big.reshape(SHAPE + (D,)), e.ids, big, e.pgrad)


@case(ValueError, r"\(2, 4\).*\(3,\)")
def backward_positions_not_broadcastable(e):
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, e.tgrad, e.pgrad, positions=[0, 1, 2])


# ---------------------------------------------------------------- coalesce

@case(IndexError, r"ids\[1, 3\] = -1")
def coalesce_negative_id(e):
    set_last(e.ids, -1)
    return lambda: fe.coalesce(e.ids, e.grad_out)


@case(IndexError, r"ids\[1, 3\] = -1")
def coalesce_int32_negative_id(e):
    ids32 = set_last(e.ids.astype(np.int32), -1)
    e.keep(ids32=ids32)
    return lambda: fe.coalesce(ids32, e.grad_out)


@case(ValueError, r"\(2, 4, 4\).*\(2, 3, 4\)")
def coalesce_grad_out_wrong_shape(e):
    g = e.grad_out[:, :3].copy()
    e.keep(g=g)
    return lambda: fe.coalesce(e.ids, g)


@case(ValueError, r"\(2, 4\).*\(2, 4\)")
def coalesce_grad_out_wrong_rank(e):
    g = e.grad_out[..., 0].copy()
    e.keep(g=g)
    return lambda: fe.coalesce(e.ids, g)


@case(TypeError, r"int32")
def coalesce_grad_out_int32(e):
    # (float64 grad_out is accepted since the kernels took more dtypes: tests/test_dtypes.py)
    g = e.grad_out.astype(np.int32)
    e.keep(g=g)
    return lambda: fe.coalesce(e.ids, g)


@case(TypeError, r"float64")
def coalesce_float_ids(e):
    f = e.ids.astype(np.float64)
    e.keep(f=f)
    return lambda: fe.coalesce(f, e.grad_out)


# ---------------------------------------------------------------- the same on the GIL-free path

@case(IndexError, r"ids\[15, 511\] = 7 .*7 rows", shape=BIG_SHAPE)
def big_gather_id_equals_rows(e):
    set_last(e.ids, V)
    return lambda: fe.gather(e.tok, e.ids, out=e.out)


@case(IndexError, r"positions\[15, 511\] = 5 .*5 rows", shape=BIG_SHAPE)
def big_gather_add_position_equals_rows(e):
    set_last(e.positions, P)
    return lambda: fe.gather_add(e.tok, e.pos, e.ids, positions=e.positions, out=e.out)


@case(IndexError, r"ids\[15, 511\] = -1 .*7 rows", shape=BIG_SHAPE)
def big_scatter_add_id_minus_one(e):
    set_last(e.ids, -1)
    return lambda: fe.scatter_add(e.tgrad, e.ids.astype(np.int32), e.grad_out)


@case(IndexError, r"positions\[15, 511\] = 5 .*5 rows", shape=BIG_SHAPE)
def big_backward_position_equals_rows(e):
    set_last(e.positions, P)
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, e.tgrad, e.pgrad, positions=e.positions)


@case(IndexError, r"ids\[15, 511\] = 9223372036854775807 .*7 rows", shape=BIG_SHAPE)
def big_backward_id_int64_max(e):
    set_last(e.ids, INT64_MAX)
    return lambda: fe.gather_add_backward(e.grad_out, e.ids, e.tgrad, e.pgrad)


@pytest.mark.parametrize("name", sorted(CASES))
def test_error_contract_and_nothing_lost(name):
    fn, exc, match, shape = CASES[name]
    e = Env(shape=shape)
    call = fn(e)
    snap = Snapshot(**e.arrays())
    with pytest.raises(exc, match=match):
        call()
    snap.assert_unchanged()


def test_the_threaded_cases_are_past_the_threshold():
    assert np.prod(BIG_SHAPE) * D >= 32768


# ---------------------------------------------------------------- the same boundaries, on the good side

def test_boundaries_on_the_valid_side():
    e = Env()
    e.ids[1, 3] = V - 1
    assert_bitwise(fe.gather(e.tok, e.ids), e.tok[e.ids])
    e.ids[1, 3] = 0
    assert_bitwise(fe.gather(e.tok, e.ids), e.tok[e.ids])
    start = P - SHAPE[-1]  # start + T == P: the last position is P - 1
    expected = e.tok[e.ids] + e.pos[positions_oracle(SHAPE, start)]
    assert_bitwise(fe.gather_add(e.tok, e.pos, e.ids, positions=start), expected)
    e.positions[1, 3] = P - 1
    assert_bitwise(fe.gather_add(e.tok, e.pos, e.ids, positions=e.positions), e.tok[e.ids] + e.pos[e.positions])
    tgrad, pgrad = np.zeros_like(e.tok), np.zeros_like(e.pos)
    fe.gather_add_backward(e.grad_out, e.ids, tgrad, pgrad, positions=start)
    e_t, e_p = np.zeros_like(e.tok), np.zeros_like(e.pos)
    np.add.at(e_t, e.ids, e.grad_out)
    np.add.at(e_p, positions_oracle(SHAPE, start), e.grad_out)
    assert_bitwise(tgrad, e_t)
    assert_bitwise(pgrad, e_p)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint8, np.uint16, np.uint32, np.uint64, np.int32, np.int64])
def test_every_integer_dtype_is_accepted(dtype):
    e = Env()
    ids = e.ids.astype(dtype)
    assert_bitwise(fe.gather(e.tok, ids), e.tok[e.ids])
    assert_bitwise(fe.gather_add(e.tok, e.pos, ids, positions=e.positions.astype(dtype)),
                   e.tok[e.ids] + e.pos[e.positions])


def test_uint64_id_equal_to_rows_is_an_index_error():
    e = Env()
    ids = e.ids.astype(np.uint64)
    ids[1, 3] = V
    with pytest.raises(IndexError, match=r"ids\[1, 3\] = 7 .*7 rows"):
        fe.gather(e.tok, ids)


def test_bools_mixed_into_a_list_of_ids_are_rejected():
    # DESIGN.md: bool ids are a TypeError. numpy reads [2, True] as int64 [2, 1], so a bool
    # slipped into a list of ints would silently look up row 1.
    e = Env()
    snap = Snapshot(out=e.out)
    with pytest.raises(TypeError, match="bool"):
        fe.gather(e.tok, [2, True], out=e.out[0, :2])
    snap.assert_unchanged()
    with pytest.raises(TypeError, match="bool"):
        fe.gather_add(e.tok, e.pos, [[2, 3]], positions=[[0, True]])


# ---------------------------------------------------------------- read-only inputs are fine

def test_read_only_inputs_are_accepted():
    e = Env()
    tok, pos, ids, positions, grad_out = (read_only(a) for a in (e.tok, e.pos, e.ids, e.positions, e.grad_out))
    assert_bitwise(fe.gather(tok, ids), e.tok[e.ids])
    assert_bitwise(fe.gather(tok, ids.astype(np.int32)), e.tok[e.ids])
    assert_bitwise(fe.gather_add(tok, pos, ids, positions=positions), e.tok[e.ids] + e.pos[e.positions])
    assert_bitwise(fe.gather_add(tok, pos, ids), e.tok[e.ids] + e.pos[positions_oracle(SHAPE, None)])
    grad = np.zeros_like(e.tok)
    fe.scatter_add(grad, ids, grad_out)
    expected = np.zeros_like(e.tok)
    np.add.at(expected, e.ids, e.grad_out)
    assert_bitwise(grad, expected)
    tgrad, pgrad = np.zeros_like(e.tok), np.zeros_like(e.pos)
    fe.gather_add_backward(grad_out, ids, tgrad, pgrad, positions=positions)
    e_p = np.zeros_like(e.pos)
    np.add.at(e_p, e.positions, e.grad_out)
    assert_bitwise(tgrad, expected)
    assert_bitwise(pgrad, e_p)
    rows, values = fe.coalesce(ids, grad_out)
    assert_bitwise(rows, np.unique(e.ids).astype(np.int64))
    assert_bitwise(values, expected[np.unique(e.ids)])


# ---------------------------------------------------------------- layers: a failing call loses nothing

@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_failing_calls_keep_the_layer_state(sparse):
    layer = fe.Embedding(V, D, sparse=sparse, seed=0)
    rng = np.random.default_rng(0)
    ids = np.array([[1, 2, 2], [6, 0, 1]])
    g1 = rng.standard_normal((2, 3, D)).astype(np.float32)
    layer(ids)
    layer.backward(g1)
    weight = layer.weight.copy()
    grad_before = layer.dense_grad().copy()
    with pytest.raises(IndexError, match=r"ids\[1, 2\] = 7"):
        layer(np.array([[1, 2, 2], [6, 0, V]]))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        layer.backward(np.ones((2, 2, D), np.float32))
    with pytest.raises(TypeError, match="float64"):
        layer.backward(g1.astype(np.float64))
    assert_bitwise(layer.weight, weight)
    assert_bitwise(layer.dense_grad(), grad_before)
    # the last good forward is still the one backward uses
    layer.backward(g1)
    once = np.zeros_like(layer.weight)
    np.add.at(once, ids, g1)
    if sparse:  # each backward is coalesced on its own, then the two are merged
        expected = once + once
    else:  # dense: one running sum
        expected = once.copy()
        np.add.at(expected, ids, g1)
    assert_bitwise(layer.dense_grad(), expected)


@pytest.mark.parametrize("sparse", [False, True])
def test_token_position_failing_calls_keep_the_layer_state(sparse):
    layer = fe.TokenPositionEmbedding(V, P, D, sparse=sparse, seed=1)
    rng = np.random.default_rng(1)
    ids = np.array([[1, 2, 2], [6, 0, 1]])
    g = rng.standard_normal((2, 3, D)).astype(np.float32)
    layer(ids, positions=1)
    layer.backward(g)
    tw, pw = layer.token.weight.copy(), layer.position.weight.copy()
    tg, pg = layer.token.dense_grad().copy(), layer.position.dense_grad().copy()
    with pytest.raises(IndexError, match=r"3\.\.5"):
        layer(ids, positions=3)
    with pytest.raises(IndexError, match=r"positions\[1, 2\] = 5"):
        layer(ids, positions=np.array([[0, 1, 2], [0, 1, P]]))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        layer.backward(np.ones((2, 3, D + 1), np.float32))
    assert_bitwise(layer.token.weight, tw)
    assert_bitwise(layer.position.weight, pw)
    assert_bitwise(layer.token.dense_grad(), tg)
    assert_bitwise(layer.position.dense_grad(), pg)
