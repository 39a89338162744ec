#!/usr/bin/env python
"""Fuzz fastembed's argument checking: random argument types, values and shapes at every entry point.

    python scripts/fuzz.py --seconds 60            # atheris if installed, else the seeded random engine
    python scripts/fuzz.py --seconds 60 --engine random --seed 7
    python scripts/fuzz.py --replay 7:1234         # re-run one input of the random engine, verbosely

Targets: fe.gather, fe.gather_add, fe.scatter_add, fe.gather_add_backward,
fe.coalesce, fe.ops.as_ids / positions_array, fe.Embedding and
fe.TokenPositionEmbedding (construction, forward, backward, from_pretrained),
fe.SparseGrad.to_dense, fe.optim (SGD, Adam, SparseAdam, linear_decay),
fe.set_num_threads, the bag functions (fe.embedding_bag and its three backward
functions), and every public function of the private fastembed._kernels
module, called with any number of arguments of any type.

Each input is decoded from a byte string: which target, then for every argument
either something plausible (a float32 table, in-range ids of a consistent
shape), a mutation of it (another dtype or rank, Fortran order, negative or zero
strides, an odd byte offset, read-only, big-endian, values out of range, memory
shared with another argument), or garbage (None, huge ints, NaN, strings,
ragged lists, objects). Tables stay small, so no call reaches the threaded path.

A crash is the process dying (a signal, a sanitizer abort). The exceptions of
DESIGN.md's contract (TypeError, ValueError, IndexError) are fine; any other
class is counted and reported with an example, and does not fail the run.

The random engine runs the inputs in a child process and watches it: when the
child dies the input is reported with the command that replays it, and fuzzing
goes on from the next one. Exit status: 0 when nothing crashed or hung, 1 otherwise.
The last line of the output is a JSON summary.
"""
import argparse
import json
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import time
import traceback

DOCUMENTED = (TypeError, ValueError, IndexError)
INPUT_BYTES = 512
MEMORY_LIMIT = 4 << 30  # address-space cap for the worker, so a huge allocation fails fast (not under ASan)


# ---------------------------------------------------------------- decoding bytes into choices

class Source:
    """Choices read from a byte string; reads past its end give zeros (so any input is valid)."""

    def __init__(self, data):
        self.data = bytes(data)
        self.pos = 0

    def take(self, n):
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk + bytes(n - len(chunk))

    def below(self, n):
        """An int in [0, n)."""
        if n <= 1:
            return 0
        width = ((n - 1).bit_length() + 7) // 8
        return int.from_bytes(self.take(width), "little") % n

    def pick(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, num, den):
        return self.below(den) < num

    def seed(self):
        return self.below(2**32)


# ---------------------------------------------------------------- values

def _garbage(src, np):
    """Something that is not what any argument wants, or is at its edge."""
    options = (
        lambda: None, lambda: True, lambda: False, lambda: 0, lambda: 1, lambda: -1, lambda: 3,
        lambda: 2**31, lambda: 2**63, lambda: -(2**63) - 1, lambda: 2**64, lambda: 10**30,
        lambda: 1.5, lambda: float("nan"), lambda: float("inf"), lambda: -0.0,
        lambda: "abc", lambda: "", lambda: b"\x00\x01", lambda: [], lambda: [1, 2], lambda: [[1], [1, 2]],
        lambda: [1.5, 2], lambda: [True, 1], lambda: [2**64], lambda: [-1, 2**63], lambda: [[[0]]],
        lambda: {}, lambda: (), lambda: (1,), lambda: object(), lambda: range(3), lambda: memoryview(b"abcd"),
        lambda: np.float32(1), lambda: np.int64(2), lambda: np.uint64(2**63), lambda: np.bool_(True),
        lambda: np.array(object()), lambda: np.array([None, 1], dtype=object), lambda: np.array("x"),
        lambda: np.zeros((2, 2), dtype=[("a", "<i4"), ("b", "<f4")]), lambda: np.zeros(3, dtype="V4"),
        lambda: np.datetime64(1, "s"), lambda: complex(1, 2), lambda: slice(1), lambda: Ellipsis,
        lambda: np.ma.masked_array(np.zeros((2, 3), np.float32), mask=[[1, 0, 0], [0, 0, 1]]),
        lambda: np.matrix(np.zeros((2, 3), np.float32)),
    )
    return src.pick(options)()


DTYPES = ("float32",) * 6 + ("float64", "float16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                             "uint64", "bool", "complex64", ">f4", ">i4", ">i8", "object", "U3", "M8[s]", "m8[ns]")
LAYOUTS = ("c",) * 8 + ("fortran", "reversed", "strided", "misaligned", "readonly", "bigendian", "broadcast",
                        "zero_stride_writeable", "subclass", "list")


def _subclass(np):
    class Weird(np.ndarray):
        """An ndarray subclass that adds nothing."""
    return Weird


def relayout(src, np, a):
    """The same values in a drawn layout."""
    layout = src.pick(LAYOUTS)
    if layout == "c":
        return a
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "reversed" and a.ndim:
        flip = (slice(None, None, -1),) * a.ndim
        return a[flip].copy()[flip]
    if layout == "strided" and a.ndim:
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1] + 1,), a.dtype)
        big[..., 1::2] = a
        return big[..., 1::2]
    if layout == "misaligned" and a.dtype != object:
        raw = np.zeros(a.nbytes + a.itemsize + 1, np.uint8)
        view = raw[1:1 + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        return view
    if layout == "readonly":
        a = a.copy()
        a.flags.writeable = False
        return a
    if layout == "bigendian" and a.dtype.kind in "iuf":
        return a.astype(a.dtype.newbyteorder(">"))
    if layout == "broadcast" and a.ndim and a.size:
        return np.broadcast_to(a[(slice(0, 1),) * a.ndim], a.shape)
    if layout == "zero_stride_writeable" and a.ndim and a.size:
        base = a[(slice(0, 1),) * a.ndim].copy()
        return np.lib.stride_tricks.as_strided(base, shape=a.shape, strides=(0,) * a.ndim, writeable=True)
    if layout == "subclass":
        return a.view(_subclass(np))
    if layout == "list" and a.size < 200:
        return a.tolist()
    return a


def random_array(src, np, shape, kind=None):
    """An array of a drawn (or given) dtype and the given shape, from a seeded generator."""
    rng = np.random.default_rng(src.seed())
    dtype = kind or src.pick(DTYPES)
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "object":
        return np.array([int(x) for x in rng.integers(0, 3, n)] or [], dtype=object).reshape(shape)
    if dtype == "U3":
        return rng.integers(0, 9, n).astype("U3").reshape(shape)
    if dtype in ("M8[s]", "m8[ns]"):
        return rng.integers(0, 9, n).astype(dtype).reshape(shape)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(np.dtype(dtype))
        hi = src.pick((3, 17, 600, int(info.max)))
        vals = rng.integers(0, min(hi, int(info.max)) + 1, n, dtype=np.dtype(dtype).newbyteorder("="))
        return vals.astype(dtype).reshape(shape)
    if dtype == "bool":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    vals = rng.standard_normal(n)
    if src.chance(1, 4):
        special = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.4e38])
        mask = rng.random(n) < 0.3
        vals[mask] = rng.choice(special, int(mask.sum()))
    with np.errstate(all="ignore"):
        return vals.astype(dtype).reshape(shape)


class Context:
    """Sizes shared by the plausible arguments of one call, so they fit together."""

    def __init__(self, src, np):
        self.np = np
        self.src = src
        self.V = src.pick((0, 1, 2, 3, 5, 17))
        self.P = src.pick((0, 1, 2, 4, 16))
        self.D = src.pick((0, 1, 3, 4, 16, 40))
        ndim = src.pick((0, 1, 1, 2, 2, 3, 4))
        self.shape = tuple(src.pick((0, 1, 2, 3, 5)) for _ in range(ndim))
        self.made = []  # arrays made so far, for aliasing

    def keep(self, a):
        if isinstance(a, self.np.ndarray):
            self.made.append(a)
        return a

    def table(self, rows, writeable=False):
        np, src = self.np, self.src
        if src.chance(1, 10):
            return self.keep(_garbage(src, np))
        if src.chance(1, 12) and self.made:
            return self.keep(self.alias((rows, self.D)))
        a = random_array(src, np, (rows, self.D), kind="float32" if src.chance(4, 5) else None)
        if src.chance(1, 10):
            a = a.reshape(src.pick(((-1,), (rows, self.D, 1), (1, -1)))) if a.size else a.reshape(-1)
        return self.keep(relayout(src, np, a) if src.chance(1, 3) else a)

    def ids(self, rows, shape=None):
        np, src = self.np, self.src
        shape = self.shape if shape is None else shape
        if src.chance(1, 12):
            return self.keep(_garbage(src, np))
        rng = np.random.default_rng(src.seed())
        n = int(np.prod(shape, dtype=np.int64))
        values = rng.integers(0, max(rows, 1), n)
        if n and src.chance(1, 5):
            values[src.below(n)] = src.pick((-1, rows, rows + 1, 2**31 - 1, 2**31, 2**62, 2**63 - 1, -(2**63)))
        dtype = src.pick(("int64", "int64", "int32", "int8", "int16", "uint8", "uint16", "uint32", "uint64",
                          "float64", "bool", "object"))
        with np.errstate(all="ignore"):
            try:
                a = values.astype(dtype).reshape(shape)
            except (OverflowError, ValueError):
                a = values.reshape(shape)
        if dtype == "uint64" and n and src.chance(1, 4):
            a.reshape(-1)[src.below(n)] = np.uint64(2**63 + src.below(1000))
        if src.chance(1, 20) and shape == ():
            return self.keep(a.item() if a.dtype != object else a)
        return self.keep(relayout(src, np, a) if src.chance(1, 3) else a)

    def rows_like(self, shape=None):
        np, src = self.np, self.src
        shape = self.shape if shape is None else shape
        if src.chance(1, 10):
            return self.keep(_garbage(src, np))
        if src.chance(1, 10) and self.made:
            return self.keep(self.alias(shape + (self.D,)))
        a = random_array(src, np, shape + (self.D,), kind="float32" if src.chance(4, 5) else None)
        if src.chance(1, 10):
            a = a.reshape(-1) if a.ndim != 1 else a.reshape(1, -1)
        return self.keep(relayout(src, np, a) if src.chance(1, 3) else a)

    def out(self):
        if self.src.chance(1, 2):
            return None
        return self.rows_like()

    def alias(self, shape):
        """A float32 view of the memory of an array made earlier in this call."""
        np = self.np
        victim = self.src.pick(self.made)
        base = victim
        while isinstance(getattr(base, "base", None), np.ndarray):
            base = base.base
        n = int(np.prod(shape, dtype=np.int64))
        if not base.flags.c_contiguous or base.dtype == object or base.nbytes < 4 * n:
            return np.zeros(shape, np.float32)
        return base.reshape(-1).view(np.uint8)[:4 * n].view(np.float32).reshape(shape)

    def positions(self):
        np, src = self.np, self.src
        kind = src.below(6)
        if kind == 0:
            return None
        if kind == 1:
            return src.pick((0, 1, -1, self.P, 2**62, 2**63, 2**64, np.int8(1), np.uint64(2**63), True, 1.0))
        if kind == 2:
            return _garbage(src, np)
        shape = self.shape[src.below(len(self.shape) + 1):] if src.chance(3, 4) else (7,)
        return self.ids(self.P, shape)

    def scalar(self):
        src = self.src
        if src.chance(1, 4):
            return _garbage(src, self.np)
        return src.pick((0.0, 0.01, 0.9, 0.99, 1.0, 1e-8, -0.5, 2.0, float("nan"), float("inf"), 1e300, 0))

    def size(self):
        src = self.src
        if src.chance(1, 6):
            return _garbage(src, self.np)
        return src.pick((0, 1, 2, 3, 5, 16, -1, 2**31, 2**63))


# ---------------------------------------------------------------- targets

def _layer(ctx, fe, kind, sparse):
    """A small layer, or a layer built from hostile constructor arguments."""
    if ctx.src.chance(1, 5):
        if kind == "Embedding":
            return fe.Embedding(ctx.size(), ctx.size(), sparse=sparse, seed=0)
        return fe.TokenPositionEmbedding(ctx.size(), ctx.size(), ctx.size(), sparse=sparse, seed=0)
    if ctx.src.chance(1, 5):
        if kind == "Embedding":
            return fe.Embedding.from_pretrained(ctx.table(ctx.V), sparse=sparse)
        return fe.TokenPositionEmbedding.from_pretrained(ctx.table(ctx.V), ctx.table(ctx.P), sparse=sparse)
    if kind == "Embedding":
        return fe.Embedding(ctx.V, ctx.D, sparse=sparse, seed=0)
    return fe.TokenPositionEmbedding(ctx.V, ctx.P, ctx.D, sparse=sparse, seed=0)


def _layer_round(ctx, fe, kind):
    sparse = ctx.src.chance(1, 2)
    layer = _layer(ctx, fe, kind, sparse)
    steps = ctx.src.below(4) + 1
    for _ in range(steps):
        action = ctx.src.below(5)
        try:
            if action <= 1:
                if kind == "Embedding":
                    layer(ctx.ids(ctx.V), out=ctx.out() if ctx.src.chance(1, 4) else None)
                else:
                    layer(ctx.ids(ctx.V), ctx.positions())
            elif action <= 3:
                layer.backward(ctx.rows_like())
            else:
                layer.zero_grad()
        except DOCUMENTED:
            pass  # keep going: the next call sees the layer after a failed one
    if kind == "Embedding":
        layer.dense_grad()
    return layer


def _optim_round(ctx, fe):
    src = ctx.src
    sparse = src.chance(1, 2)
    layer = fe.Embedding(ctx.V, ctx.D, sparse=sparse, seed=0)
    choice = src.below(5)
    if choice == 0:
        layer.grad = ctx.table(ctx.V)
    elif choice == 1:
        layer.grad = fe.SparseGrad(ctx.ids(ctx.V, (src.pick((0, 1, 2, 3)),)), ctx.rows_like((src.pick((0, 1, 2)),)))
    elif choice == 2:
        layer.grad = _garbage(src, ctx.np)
    else:
        try:
            layer(ctx.ids(ctx.V))
            layer.backward(ctx.rows_like())
        except DOCUMENTED:
            pass
    cls = src.pick((fe.optim.SGD, fe.optim.Adam, fe.optim.SparseAdam, fe.optim.Adagrad, fe.optim.RowWiseAdagrad))
    params = src.pick(([layer], layer, [layer, layer], [], [_garbage(src, ctx.np)]))
    if cls is fe.optim.SGD:
        opt = cls(params, lr=ctx.scalar())
    elif cls in (fe.optim.Adagrad, fe.optim.RowWiseAdagrad):
        names = ("lr", "eps") + (("lr_decay", "weight_decay", "initial_accumulator_value")
                                 if cls is fe.optim.Adagrad else ())
        opt = cls(params, **{name: ctx.scalar() for name in names if src.chance(1, 3)})
    else:
        kwargs = {}
        if src.chance(1, 3):
            kwargs["betas"] = src.pick(((0.9, 0.99), (0.9,), (1.0, 1.0), (-1, 2), "ab", None, (float("nan"), 0.5)))
        if src.chance(1, 3):
            kwargs["eps"] = ctx.scalar()
        if src.chance(1, 3):
            kwargs["lr"] = ctx.scalar()
        opt = cls(params, **kwargs)
    for _ in range(src.below(3) + 1):
        with ctx.np.errstate(all="ignore"):
            opt.step()
    fe.optim.linear_decay(ctx.scalar(), ctx.scalar(), ctx.size())


def _fused_round(ctx, fe):
    """A fused rule built with plausible or wrong hyperparameters, then updates of a layer's table
    (through the layer, or the rule called directly with wrong state, ids or gradients)."""
    src = ctx.src
    cls = src.pick((fe.optim.FusedSGD, fe.optim.FusedAdagrad, fe.optim.FusedRowWiseAdagrad, fe.optim.FusedSparseAdam))
    kwargs = {"lr": ctx.scalar()} if cls is fe.optim.FusedSGD or src.chance(1, 2) else {}
    if cls is fe.optim.FusedSGD and src.chance(1, 2):
        kwargs["fma"] = src.chance(1, 2)
    if cls is not fe.optim.FusedSGD and src.chance(1, 3):
        kwargs["eps"] = ctx.scalar()
    rule = cls(**kwargs)
    if src.chance(1, 2):
        layer = src.pick((fe.Embedding(ctx.V, ctx.D, seed=0, fused=rule),
                          fe.TokenPositionEmbedding(ctx.V, ctx.P, ctx.D, seed=0, fused=rule)))
        for _ in range(src.below(3) + 1):
            with ctx.np.errstate(all="ignore"):
                layer(ctx.ids(ctx.V))
                layer.backward(ctx.rows_like())
        return
    weight = ctx.table(ctx.V, True)
    state = rule.new_state(weight) if src.chance(3, 4) else {k: _garbage(src, ctx.np) for k in ("sum", "step")}
    with ctx.np.errstate(all="ignore"):
        rule.update(weight, state, ctx.ids(ctx.V), ctx.rows_like(),
                    padding_idx=src.pick((None, 0, -1, ctx.V, "x")), check_only=src.chance(1, 4))


def _update_grad(ctx, V):
    """A gradient for an optimizer kernel: one row per table row, or a few rows."""
    return ctx.rows_like((V,)) if ctx.src.chance(1, 2) else ctx.rows_like((ctx.src.below(3),))


def _update_rows(ctx, V):
    """None (every row), or a few row ids (sorted or not, in range or not)."""
    return None if ctx.src.chance(1, 2) else ctx.ids(V, (ctx.src.below(4),))


def _kernels_call(ctx, fe, info):
    """A public function of the private _kernels module, with plausible or wrong arguments of any arity."""
    from fastembed import _kernels
    names = sorted(n for n in dir(_kernels) if not n.startswith("_") and callable(getattr(_kernels, n)))
    names = [n for n in names if n != "set_num_threads"]  # fuzzed on its own, then reset
    name = ctx.src.pick(names)
    fn = getattr(_kernels, name)
    info["target"] = "_kernels." + name
    src, V, P = ctx.src, ctx.V, ctx.P
    plausible = {
        "gather": lambda: [ctx.table(V), ctx.ids(V), ctx.out()],
        "gather_add": lambda: [ctx.table(V), ctx.table(P), ctx.ids(V), ctx.positions(), ctx.out()],
        "scatter_add": lambda: [ctx.table(V, True), ctx.ids(V), ctx.rows_like()],
        "gather_add_backward": lambda: [ctx.rows_like(), ctx.ids(V), ctx.table(V, True), ctx.table(P, True),
                                        ctx.positions()],
        "coalesce": lambda: [ctx.ids(V), ctx.rows_like()],
        "adam_step": lambda: [ctx.table(V, True), ctx.table(V, True), ctx.table(V, True),
                              ctx.rows_like((V,)) if src.chance(1, 2) else ctx.rows_like((src.below(3),)),
                              None if src.chance(1, 2) else ctx.ids(V, (src.below(4),)),
                              ctx.scalar(), ctx.scalar(), ctx.scalar(), ctx.scalar(), ctx.scalar(), ctx.scalar()],
        "sgd_step": lambda: [ctx.table(V, True), _update_grad(ctx, V), _update_rows(ctx, V), ctx.scalar(),
                             src.chance(1, 2), src.chance(1, 2)],
        "sgd_scatter": lambda: [ctx.table(V, True), ctx.ids(V), ctx.rows_like(), ctx.scalar(), src.chance(1, 2)],
        "adagrad_step": lambda: [ctx.table(V, True), ctx.table(V, True), _update_grad(ctx, V),
                                 _update_rows(ctx, V), ctx.scalar(), ctx.scalar()],
        "rowwise_adagrad_step": lambda: [ctx.table(V, True), ctx.np.zeros(src.pick((V, V + 1, 0)), ctx.np.float32),
                                         _update_grad(ctx, V), _update_rows(ctx, V), ctx.scalar(), ctx.scalar()],
    }
    args = plausible[name]() if name in plausible and src.chance(3, 4) else []
    if not args or src.chance(1, 4):
        n = src.below(13)
        args = (args + [_garbage(src, ctx.np) for _ in range(n)])[:n] if src.chance(1, 2) else \
            [_garbage(src, ctx.np) for _ in range(n)]
    for k in range(len(args)):
        if src.chance(1, 8):
            args[k] = _garbage(src, ctx.np)
    return fn(*args)


def _bag_offsets(ctx, n):
    """Offsets for n ids: valid (sorted, from 0, at most n) most of the time, else broken at one place."""
    np, src = ctx.np, ctx.src
    if src.chance(1, 10):
        return ctx.keep(_garbage(src, np))
    rng = np.random.default_rng(src.seed())
    offsets = np.sort(rng.integers(0, n + 1, size=src.pick((0, 1, 2, 3, 5))))
    if len(offsets):
        offsets[0] = 0
        if src.chance(1, 4):
            offsets[src.below(len(offsets))] = src.pick((-1, 1, n, n + 1, 2**31, 2**63 - 1, -(2**63)))
    dtype = src.pick(("int64", "int32", "int16", "uint64", "float64"))
    with np.errstate(all="ignore"):
        return ctx.keep(offsets.astype(dtype))


def _bag_round(ctx, fe):
    """One call of a bag function with plausible or hostile bag arguments (issue 10's bags)."""
    np, src, V = ctx.np, ctx.src, ctx.V
    ids = ctx.ids(V, src.pick(((src.below(9),), (2, 3), (3, 0), ())))
    n = int(np.size(ids)) if isinstance(ids, np.ndarray) else 0
    offsets = None if isinstance(ids, np.ndarray) and ids.ndim == 2 and src.chance(3, 4) else _bag_offsets(ctx, n)
    mode = src.pick(("sum", "sum", "mean", "max", "avg", None, 2))
    shape = ids.shape if isinstance(ids, np.ndarray) and src.chance(7, 8) else (src.below(9),)
    psw = None if src.chance(1, 2) else ctx.keep(_garbage(src, np)) if src.chance(1, 8) else \
        ctx.keep(random_array(src, np, shape, kind="float32" if src.chance(4, 5) else None))
    kw = dict(per_sample_weights=psw, padding_idx=src.pick((None, None, 0, -1, V, -V - 1, 1.5, True)),
              include_last_offset=src.chance(1, 3))
    B = src.pick((0, 1, 2, 3, 5))
    grad_out = ctx.rows_like((B,))
    kind = src.below(4)
    if kind == 0:
        fe.embedding_bag(ctx.table(V), ids, offsets, mode=mode, out=ctx.out() if src.chance(1, 3) else None,
                         return_argmax=src.chance(1, 3), **kw)
    elif kind == 1:
        argmax = None if src.chance(1, 2) else ctx.ids(V, (B, ctx.D))
        fe.embedding_bag_backward(ctx.table(V, True), ids, offsets, grad_out, mode=mode, argmax=argmax, **kw)
    elif kind == 2:
        fe.embedding_bag_grad_rows(ctx.size(), ids, offsets, grad_out, mode=mode, **kw)
    else:
        kw.pop("per_sample_weights")
        fe.embedding_bag_weights_grad(ctx.table(V), ids, offsets, grad_out, **kw)


TARGETS = ("gather", "gather_add", "scatter_add", "gather_add_backward", "coalesce", "as_ids", "positions_array",
           "Embedding", "TokenPositionEmbedding", "SparseGrad", "optim", "fused", "set_num_threads",
           "_kernels", "_kernels", "_kernels", "bag", "bag")


def run_one(data, np, fe, info):
    """Decode data into one call (or a short sequence) and run it; info["target"] names what was called."""
    src = Source(data)
    ctx = Context(src, np)
    target = info["target"] = src.pick(TARGETS)
    V, P = ctx.V, ctx.P
    if target == "gather":
        fe.gather(ctx.table(V), ctx.ids(V), out=ctx.out())
    elif target == "gather_add":
        fe.gather_add(ctx.table(V), ctx.table(P), ctx.ids(V), positions=ctx.positions(), out=ctx.out())
    elif target == "scatter_add":
        fe.scatter_add(ctx.table(V, True), ctx.ids(V), ctx.rows_like())
    elif target == "gather_add_backward":
        fe.gather_add_backward(ctx.rows_like(), ctx.ids(V), ctx.table(V, True), ctx.table(P, True),
                               positions=ctx.positions())
    elif target == "coalesce":
        fe.coalesce(ctx.ids(V), ctx.rows_like())
    elif target == "as_ids":
        fe.ops.as_ids(ctx.ids(V) if src.chance(1, 2) else _garbage(src, np))
    elif target == "positions_array":
        fe.ops.positions_array(ctx.ids(V), ctx.positions())
    elif target in ("Embedding", "TokenPositionEmbedding"):
        _layer_round(ctx, fe, target)
    elif target == "SparseGrad":
        fe.SparseGrad(ctx.ids(V, (src.below(4),)), ctx.rows_like((src.below(4),))).to_dense(ctx.size())
    elif target == "optim":
        _optim_round(ctx, fe)
    elif target == "fused":
        _fused_round(ctx, fe)
    elif target == "set_num_threads":
        try:
            fe.set_num_threads(src.pick((0, 1, 2, -1, 2**31, 2**63, 1.5, "2", None, True, np.int64(2))))
        finally:
            fe.set_num_threads(0)
    elif target == "bag":
        _bag_round(ctx, fe)
    else:
        _kernels_call(ctx, fe, info)


# ---------------------------------------------------------------- running and reporting

class Tally:
    def __init__(self):
        self.iterations = 0
        self.by_target = {}
        self.documented = {}
        self.other = {}  # class name -> {"count", "example"}

    def record(self, target, exc, label):
        self.iterations += 1
        self.by_target[target] = self.by_target.get(target, 0) + 1
        if exc is None:
            return
        name = type(exc).__name__
        if isinstance(exc, DOCUMENTED):
            self.documented[name] = self.documented.get(name, 0) + 1
            return
        entry = self.other.setdefault(f"{name} in {target}", {"count": 0, "example": None})
        entry["count"] += 1
        if entry["example"] is None:
            tb = traceback.extract_tb(exc.__traceback__)
            where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
            entry["example"] = {"message": str(exc)[:300], "raised_at": where, "input": label}

    def as_dict(self):
        return {"iterations": self.iterations, "by_target": self.by_target, "documented": self.documented,
                "other": self.other}

    def merge(self, d):
        self.iterations += d["iterations"]
        for key in ("by_target", "documented"):
            for k, v in d[key].items():
                getattr(self, key)[k] = getattr(self, key).get(k, 0) + v
        for k, v in d["other"].items():
            entry = self.other.setdefault(k, {"count": 0, "example": v["example"]})
            entry["count"] += v["count"]


def _import():
    import numpy as np

    import fastembed as fe
    import fastembed.ops  # noqa: F401
    return np, fe


def execute(data, np, fe, tally, label):
    """Run one input; label says how to get it back (seed:index, or the bytes in hex)."""
    info = {"target": "?"}
    try:
        with np.errstate(all="ignore"):
            run_one(data, np, fe, info)
        tally.record(info["target"], None, label)
    except Exception as exc:  # noqa: BLE001 - classified in the tally
        tally.record(info["target"], exc, label)


def input_bytes(seed, iteration):
    import numpy as np
    return np.random.default_rng([seed, iteration]).bytes(INPUT_BYTES)


def _limit_memory():
    if "asan" in os.environ.get("LD_PRELOAD", "") or os.environ.get("FASTEMBED_SANITIZER"):
        return  # ASan reserves terabytes of address space; it caps allocations itself (max_allocation_size_mb)
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):
        pass


def _selftest_crash_at():
    return int(os.environ.get("FASTEMBED_FUZZ_SELFTEST_CRASH", "-1"))


def _selftest_min_inputs(crash_at):
    """The self-test's run reaches its crash and goes well past it however slow the machine (a sanitizer
    build, a loaded CI) and however short --seconds is: its outcome must not depend on the clock."""
    return 3 * (crash_at + 1) if crash_at >= 0 else 0


def worker(args):
    """Run inputs start, start+1, ... of the seed until the deadline; publish the iteration being run."""
    _limit_memory()
    np, fe = _import()
    with open(args.progress, "r+b") as f:
        progress = mmap.mmap(f.fileno(), 8)
    tally = Tally()
    i = args.start
    crash_at = _selftest_crash_at()  # proves a crash is caught and reported
    min_inputs = _selftest_min_inputs(crash_at)
    while time.time() < args.until or i < min_inputs:
        struct.pack_into("<q", progress, 0, i)
        if i == crash_at:  # SIGABRT: a real crash signal that ASan leaves alone (it would report a SIGSEGV)
            import signal
            os.kill(os.getpid(), signal.SIGABRT)
        execute(input_bytes(args.seed, i), np, fe, tally, f"{args.seed}:{i}")
        i += 1
    struct.pack_into("<q", progress, 0, i)
    print(json.dumps(tally.as_dict()), flush=True)


def supervise_random(args):
    """Run workers until the time is up; a worker that dies is a crash at the input it was running."""
    deadline = time.time() + args.seconds
    tally, crashes = Tally(), []
    fd, progress_path = tempfile.mkstemp(prefix="fastembed-fuzz-")
    os.write(fd, bytes(8))
    os.close(fd)
    start = args.start
    min_inputs = _selftest_min_inputs(_selftest_crash_at())
    try:
        while time.time() < deadline or start < min_inputs:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(args.seed), "--start",
                   str(start), "--until", repr(deadline), "--progress", progress_path]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            last, last_change = None, time.time()
            while proc.poll() is None:
                time.sleep(0.2)
                with open(progress_path, "rb") as f:
                    now = struct.unpack("<q", f.read(8))[0]
                if now != last:
                    last, last_change = now, time.time()
                elif time.time() - last_change > args.hang_seconds:
                    proc.kill()
                    break
            out, err = proc.communicate()
            with open(progress_path, "rb") as f:
                at = struct.unpack("<q", f.read(8))[0]
            if proc.returncode == 0 and out.strip():
                tally.merge(json.loads(out.strip().splitlines()[-1]))
                break
            hung = proc.returncode == -9
            crashes.append({
                "kind": "hang" if hung else "crash", "returncode": proc.returncode, "seed": args.seed,
                "iteration": at, "replay": f"python {os.path.relpath(__file__)} --replay {args.seed}:{at}",
                "stderr_tail": err[-4000:],
            })
            print(f"{'HANG' if hung else 'CRASH'} (return code {proc.returncode}) at input {args.seed}:{at}; "
                  f"replay: python {os.path.relpath(__file__)} --replay {args.seed}:{at}\n{err[-4000:]}",
                  file=sys.stderr, flush=True)
            start = at + 1
    finally:
        os.unlink(progress_path)
    return tally, crashes


def run_atheris(args):
    """libFuzzer-guided inputs (coverage of fastembed's Python layers); crashes are reported by libFuzzer."""
    import atheris

    with atheris.instrument_imports():
        np, fe = _import()
    _limit_memory()
    tally = Tally()
    deadline = time.time() + args.seconds

    def one_input(data):
        if time.time() > deadline:
            finish(tally, [], "atheris", args)
            sys.stdout.flush()
            os._exit(0)
        execute(data, np, fe, tally, "hex:" + bytes(data).hex())

    atheris.Setup([sys.argv[0], f"-max_total_time={args.seconds + 5}", "-rss_limit_mb=4096", f"-seed={args.seed}",
                   f"-max_len={INPUT_BYTES}"], one_input)
    atheris.Fuzz()


def finish(tally, crashes, engine, args):
    summary = tally.as_dict()
    summary.update({"engine": engine, "seed": args.seed, "seconds": args.seconds, "crashes": crashes})
    print(f"fuzz: {tally.iterations} inputs in {args.seconds:g} s ({engine}, seed {args.seed}); "
          f"documented exceptions {tally.documented}; crashes/hangs {len(crashes)}")
    for name, entry in sorted(tally.other.items()):
        ex = entry["example"]
        print(f"  other exception class: {name} x{entry['count']}: {ex['message']!r} at {ex['raised_at']} "
              f"(input {ex['input'][:80]})")
    print(json.dumps(summary, default=str))


def replay(spec):
    """Run one input: SEED:INDEX of the random engine, or hex:BYTES as reported for atheris inputs."""
    np, fe = _import()
    if spec.startswith("hex:"):
        data = bytes.fromhex(spec[4:])
    else:
        seed, iteration = (int(x) for x in spec.split(":"))
        data = input_bytes(seed, iteration)
    print(f"replaying input {spec[:80]} ({len(data)} bytes)", flush=True)
    info = {"target": "?"}
    try:
        with np.errstate(all="ignore"):
            run_one(data, np, fe, info)
        print(f"{info['target']}: returned")
    except Exception:  # noqa: BLE001
        print(f"{info['target']}: raised", flush=True)
        traceback.print_exc()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    p.add_argument("--start", type=int, default=0, help="first input index (random engine)")
    p.add_argument("--hang-seconds", type=float, default=60.0, help="an input running longer is a hang")
    p.add_argument("--replay", metavar="SEED:INDEX", help="run one input (SEED:INDEX or hex:BYTES) and show its outcome")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--until", type=float, help=argparse.SUPPRESS)
    p.add_argument("--progress", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.replay:
        replay(args.replay)
        return 0
    if args.worker:
        worker(args)
        return 0
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "atheris":
        run_atheris(args)  # exits the process
        return 0
    tally, crashes = supervise_random(args)
    finish(tally, crashes, engine, args)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
