"""The ops `train` and `adapter`: training steps and autograd round trips, row by row.

train: one step of one token table = forward (look up ids), backward (the fixed
upstream gradient g), the optimizer's update, the gradient dropped (as a user's
``zero_grad()`` does). Rows are grouped by optimizer; the rows of a group compute
the same update and are checked equal, timed round-robin together, and compared
with the group's torch row (``nn.Embedding(sparse=True)`` + the same torch.optim
optimizer; dense ``nn.Embedding`` + ``Adam(fused=True)`` for dense Adam) and with
the group's memory limit (an add streaming the bytes its step must move: step_bytes).

With --dtypes, train runs once more per other table dtype as the case ``train <dtype>`` (float64,
float16, bfloat16): table, upstream gradient and optimizer state of that dtype; per group fastembed.torch's
drop-in (the group's anchor: dense Adam's is fastembed.torch.optim.Adam on a dense Embedding) and fused rows,
the numpy API's rows of the float32 case (bfloat16 as ml_dtypes arrays: without ml_dtypes they are left out),
the same torch row as float32's, and each group's memory limit of the dtype's bytes (step_bytes). No FBGEMM
rows: the notes say so. The halves check at other settings and torch's sparse rows on the rows named at most
twice (HALF_CHECK_HYPER, TORCH_HALF_CHECK_LOOKUPS below say why), as is the numpy API's coalesced SGD (numpy_rows
says why); the numpy API's SparseAdam is checked with torch's eps (book_eps).

adapter: forward + backward through torch autograd, the gradient dropped after
each call: ``fastembed.torch.Embedding`` (dense and sparse gradient) against
``torch.nn.Embedding``, ``fastembed.torch.TokenPositionEmbedding`` against two
``nn.Embedding``s and an add.

Every row builds its own copy of the table (and its own optimizer state) when
its group is about to be timed, and drops it after: one row's updates never
touch another row's memory, and only one group's tables are alive at a time.
"""
import functools
import importlib
import math
from dataclasses import dataclass, field

import numpy as np

import fastembed as fe

from .shapes import in_dtype, itemsize, widened
from .timing import Method

LR = 0.01
BETAS, ADAM_EPS = (0.85, 0.99), 1e-8  # the book's Adam, as in the step ops
ADAGRAD_EPS = 1e-10  # torch's default, FBGEMM's set to it
# The dense-Adam rows rewrite every row of the table each step: kept to tables up to this many
# elements (the seed shapes and medium; the wide 1M x 64 table is the op step-dense's job).
DENSE_MAX_ELEMENTS = 40_000_000
ADAPTER_SHAPES = ("seed-1x16", "seed-32x16", "medium")

HYPER = {  # each optimizer's settings, the same for every row of its group
    "SGD": {"lr": LR},
    "Adagrad": {"lr": LR, "eps": ADAGRAD_EPS},
    "RowWiseAdagrad": {"lr": LR, "eps": ADAGRAD_EPS},
    "SparseAdam": {"lr": LR, "betas": BETAS, "eps": ADAM_EPS},
    "Adam": {"lr": LR, "betas": BETAS, "eps": ADAM_EPS},
}
GROUPS = tuple(HYPER)
# The equality check's settings: SparseAdam's with eps 1e-30. torch (and its drop-ins) add eps to
# sqrt(v) before the bias correction, fastembed's numpy API after it; the two are the same formula only
# as eps goes to 0 (at 1e-8, an element whose gradient is near 1e-5 moves about 1% differently on the
# first step), and torch refuses eps 0. The timed rows keep eps 1e-8: the work is the same.
CHECK_HYPER = {**HYPER, "SparseAdam": {**HYPER["SparseAdam"], "eps": 1e-30}}

# fastembed.torch's rows, one line each: (label, group, module, class, mode). "drop-in": a
# fastembed.torch.Embedding(sparse=True) and the class as a torch optimizer on its parameters;
# "fused": fastembed.torch.Embedding(V, D, fused=Class(**HYPER[group])), whose backward updates the
# table (no optimizer step). A row whose module or class is missing is skipped with a note.
FASTEMBED_TORCH_ROWS = (
    ("fastembed.torch + optim.SGD", "SGD", "fastembed.torch.optim", "SGD", "drop-in"),
    ("fastembed.torch + optim.Adagrad", "Adagrad", "fastembed.torch.optim", "Adagrad", "drop-in"),
    ("fastembed.torch + optim.RowWiseAdagrad", "RowWiseAdagrad", "fastembed.torch.optim", "RowWiseAdagrad",
     "drop-in"),
    ("fastembed.torch + optim.SparseAdam", "SparseAdam", "fastembed.torch.optim", "SparseAdam", "drop-in"),
    ("fastembed.torch fused SGD", "SGD", "fastembed.torch.optim", "FusedSGD", "fused"),
    ("fastembed.torch fused Adagrad", "Adagrad", "fastembed.torch.optim", "FusedAdagrad", "fused"),
    ("fastembed.torch fused RowWiseAdagrad", "RowWiseAdagrad", "fastembed.torch.optim", "FusedRowWiseAdagrad",
     "fused"),
    ("fastembed.torch fused SparseAdam", "SparseAdam", "fastembed.torch.optim", "FusedSparseAdam", "fused"),
)
# FBGEMM's CPU TBE with its fused optimizer of the same name; pooling NONE (one row per id, a sequence
# embedding, what the other rows compute). EXACT_* are the variants that sum duplicate ids first.
FBGEMM_ROWS = (
    ("FBGEMM TBE EXACT_SGD", "SGD", "EXACT_SGD"),
    ("FBGEMM TBE EXACT_ADAGRAD", "Adagrad", "EXACT_ADAGRAD"),
    ("FBGEMM TBE EXACT_ROWWISE_ADAGRAD", "RowWiseAdagrad", "EXACT_ROWWISE_ADAGRAD"),
)
TORCH_SPARSE_ROWS = {  # group -> torch.optim class, on nn.Embedding(sparse=True): each group's anchor
    "SGD": "SGD", "Adagrad": "Adagrad", "SparseAdam": "SparseAdam",
}


def numpy_row_name(group):
    """The fastembed numpy API row of an optimizer group."""
    return "fastembed numpy API dense + Adam" if group == "Adam" else f"fastembed numpy API + {group}"


def torch_row_name(group):
    """The torch row of a group: every other row of the group is compared with it."""
    return "torch nn.Embedding + Adam(fused=True)" if group == "Adam" else f"torch nn.Embedding(sparse) + {group}"


@dataclass
class Built:
    """A case's methods and the rows it left out, each with why (printed in the report's notes)."""

    methods: list
    skips: list = field(default_factory=list)


CHECK_STEPS = 2  # two steps: a gradient not dropped after the first would double the second's


def row(name, family, group, factory, threads, anchor=False, check_hyper=None, check_rows=None,
        check_factory=None):
    """A Method whose state factory(hyper) builds: (step, weights). Timed: a state with HYPER built when
    the group is measured (make); checked: a fresh state of check_factory (default factory) with check_hyper
    (default CHECK_HYPER), CHECK_STEPS steps, a copy of its tables (result), compared on check_rows alone
    when given."""
    check_hyper = CHECK_HYPER if check_hyper is None else check_hyper
    check_factory = factory if check_factory is None else check_factory

    def make():
        return factory(HYPER[group])[0]

    def result():
        step, weights = check_factory(check_hyper[group])
        for _ in range(CHECK_STEPS):
            step()
        return tuple(np.array(w) for w in weights())

    return Method(name, family, make=make, result=result, threads=threads, exact=False, group=group, anchor=anchor,
                  check_rows=check_rows)


def _table_copy(data):
    """A fresh copy of the token table: each row updates its own memory."""
    return np.array(data.token_table, copy=True)


# ---------------------------------------------------------------- train: fastembed's numpy API

def numpy_api_state(data, group, hyper, coalesce=True, arrays=None, torch_eps=False):
    """fe.Embedding (sparse, or dense for Adam) and fe.optim.<group> on a fresh copy of the table;
    coalesce=False: the sparse gradient kept as a LookupGrad (one row per lookup, torch's layout); arrays: the
    (table, upstream gradient) of another dtype (the dtype cases); torch_eps: SparseAdam's eps is torch's
    (book_eps)."""
    table, g = (data.token_table, data.grad_hidden) if arrays is None else arrays
    layer = fe.Embedding.from_pretrained(table, sparse=(group != "Adam"),  # from_pretrained copies, keeps the dtype
                                         coalesce=coalesce)
    opt = getattr(fe.optim, group)(layer.parameters(), **hyper)
    ids = data.ids

    def step():
        layer(ids)
        layer.backward(g)
        opt.step()
        opt.zero_grad()

    if torch_eps and group == "SparseAdam":
        def step(plain=step):
            opt.eps = book_eps(hyper, opt.steps[0] + 1)
            plain()

    return step, lambda: (widened(layer.weight),)


# The numpy API's rows with an uncoalesced sparse gradient: fe.Embedding(sparse=True, coalesce=False), whose
# backward keeps (ids, grad_out) as a LookupGrad (torch's layout) and whose optimizer sums each row as it
# updates it (the *_scatter kernels; SGD moves a row once per lookup, as torch's SGD does).
def numpy_lookups_row_name(group):
    return f"fastembed numpy API coalesce=False + {group}"


# The numpy API's fused rows: fe.Embedding(fused=fe.optim.Fused<group>(...)), whose backward is the update
# (straight from the ids and the upstream gradient: no coalesced gradient is formed, none is stored).
NUMPY_FUSED_GROUPS = ("SGD", "Adagrad", "RowWiseAdagrad", "SparseAdam")


def numpy_fused_row_name(group):
    return f"fastembed numpy API fused {group}"


def numpy_fused_state(data, group, hyper, arrays=None, torch_eps=False):
    """fe.Embedding fused with fe.optim.Fused<group>(**hyper) on a fresh copy of the table (arrays, torch_eps:
    as numpy_api_state's)."""
    table, g = (data.token_table, data.grad_hidden) if arrays is None else arrays
    rule = getattr(fe.optim, "Fused" + group)(**hyper)
    layer = fe.Embedding.from_pretrained(table, fused=rule)
    ids = data.ids

    def step():
        layer(ids)
        layer.backward(g)

    if torch_eps and group == "SparseAdam":
        def step(plain=step):
            rule.eps = book_eps(hyper, int(layer.state["step"]) + 1)
            plain()

    return step, lambda: (widened(layer.weight),)


# The numpy API's SparseAdam (fused or not) adds eps after the bias correction (the book's formula), torch's and
# fastembed.torch's before it: the same update only as eps goes to 0. The float32 case checks at eps 1e-30; the
# dtype cases, whose anchor is fastembed.torch's drop-in and whose halves check at eps 1e-2 (HALF_CHECK_HYPER),
# check the numpy API's SparseAdam rows with the eps set before each step to the book's eps that gives torch's
# formula, eps / sqrt(1 - beta2**t) (what fastembed.torch's SparseAdam hands the same kernel; at eps 1e-2 the two
# formulas differ by 12x bfloat16's tolerance). Timed rows keep HYPER's eps, unchanged between steps: the work is
# the same.
def book_eps(hyper, t):
    """The eps of the book's formula at step t that computes torch's with hyper's eps."""
    return hyper["eps"] / math.sqrt(1 - hyper["betas"][1] ** t)


# On a half table the numpy API's coalesced SGD row sums a table row's lookups in float32, rounds the sum to the
# dtype and moves the row once; fastembed.torch's SGD (the anchor), the numpy API's coalesce=False and fused SGD and
# torch's move the row once per lookup, rounding it after each (as torch's SGD steps an uncoalesced gradient): on
# a row named hundreds of times (zipf ids) the two drift apart by up to 8x the tolerance (measured: a 20,000-row
# zipf table). Its check compares the rows torch's sparse rows are compared on (named at most
# TORCH_HALF_CHECK_LOOKUPS times, untouched rows included; within 0.25 of the bound there at the seed shapes and
# that zipf table), and such a row never anchors a group (without torch the coalesce=False row does).
def numpy_rows(data, ctx, dense_ok, arrays=None, check_hyper=None, sgd_check_rows=None):
    """The numpy API's rows per group: fe.optim.<group> on a coalesced sparse gradient (dense Adam: a dense one,
    when dense_ok), with coalesce=False and fused (NUMPY_FUSED_GROUPS). float32 (arrays None): the coalesced row
    anchors its group; arrays: the (table, upstream gradient) of another dtype, no row anchoring, each checked
    on every table row with check_hyper (SparseAdam's with torch's eps: book_eps), but the coalesced SGD
    row on sgd_check_rows alone when given (the comment above)."""
    methods = []
    for group in GROUPS:
        if group == "Adam" and not dense_ok:
            continue
        states = [(numpy_row_name(group), numpy_api_state, {})]
        if group in NUMPY_FUSED_GROUPS:
            states += [(numpy_lookups_row_name(group), numpy_api_state, {"coalesce": False}),
                       (numpy_fused_row_name(group), numpy_fused_state, {})]
        for k, (name, state, kwargs) in enumerate(states):
            def factory(hyper, torch_eps=False, state=state, g=group, kwargs=kwargs):
                return state(data, g, hyper, arrays=arrays, torch_eps=torch_eps, **kwargs)

            as_torch = arrays is not None and group == "SparseAdam"
            methods.append(row(name, "fastembed", group, factory, ctx.threads, anchor=(arrays is None and k == 0),
                               check_hyper=check_hyper,
                               check_factory=functools.partial(factory, torch_eps=True) if as_torch else None,
                               check_rows=sgd_check_rows if (group, k) == ("SGD", 0) else None))
    return methods


# ---------------------------------------------------------------- train: torch, fastembed.torch

def autograd_step(module, opt, ids, g):
    """forward, backward, the optimizer's step (when there is one), the gradient dropped."""
    if opt is None:  # fused: backward updated the table
        def step():
            module(ids).backward(g)
        return step

    def step():
        module(ids).backward(g)
        opt.step()
        opt.zero_grad()

    return step


def torch_state(data, torch, group, hyper, tables=None):
    """nn.Embedding(sparse=True) + torch.optim.<group>, or dense nn.Embedding + Adam(fused=True); tables: the
    (table, upstream gradient) tensors of another dtype (the table copied here, the gradient shared)."""
    weight = torch.from_numpy(_table_copy(data)) if tables is None else tables[0].clone()
    g = torch.from_numpy(data.grad_hidden) if tables is None else tables[1]
    emb = torch.nn.Embedding.from_pretrained(weight, freeze=False, sparse=(group != "Adam"))
    if group == "Adam":
        opt = torch.optim.Adam(emb.parameters(), fused=True, **hyper)
    else:
        opt = getattr(torch.optim, TORCH_SPARSE_ROWS[group])(emb.parameters(), **hyper)
    step = autograd_step(emb, opt, torch.from_numpy(data.ids), g)
    return step, lambda: (widened(emb.weight),)


def fastembed_torch_class(module, cls):
    """(the class, None) when module.cls imports, else (None, why not)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return None, f"{module} does not import ({exc})"
    if not hasattr(mod, cls):
        return None, f"{module} has no {cls}"
    return getattr(mod, cls), None


def fastembed_torch_state(data, torch, cls, mode, hyper, tables=None):
    """fastembed.torch.Embedding on a fresh copy of the table: sparse + cls as an optimizer (drop-in), dense +
    cls (dense, the dtype cases' Adam), or fused with cls(**hyper) (its backward is the update); tables: the
    (table, upstream gradient) tensors of another dtype (the table copied here, the gradient shared)."""
    from fastembed.torch import Embedding

    weight = torch.from_numpy(_table_copy(data)) if tables is None else tables[0].clone()
    g = torch.from_numpy(data.grad_hidden) if tables is None else tables[1]
    if mode in ("drop-in", "dense"):
        emb = Embedding.from_pretrained(weight, freeze=False, sparse=(mode == "drop-in"))
        opt = cls(emb.parameters(), **hyper)
    else:
        V, D = weight.shape
        emb = Embedding(V, D, fused=cls(**hyper), **({} if tables is None else {"dtype": weight.dtype}))
        with torch.no_grad():
            emb.weight.copy_(weight)
        opt = None
    step = autograd_step(emb, opt, torch.from_numpy(data.ids), g)
    return step, lambda: (widened(emb.weight),)


def fastembed_torch_rows(data, ctx, skips, rows=None, tables=None, check_hyper=None):
    """The rows of `rows` (default FASTEMBED_TORCH_ROWS) that this build has; a skip note for each one it has
    not. tables: the (table, upstream gradient) tensors of another dtype (the dtype cases), whose drop-in and
    dense rows anchor their groups; check_hyper: their check's settings."""
    torch, methods = ctx.torch, []
    dtype = None if tables is None else tables[0].dtype
    for name, group, module, cls_name, mode in FASTEMBED_TORCH_ROWS if rows is None else rows:
        cls, why = fastembed_torch_class(module, cls_name)
        if cls is None:
            skips.append(f"{name}: not available ({why})")
            continue
        if mode == "fused":
            why = fused_support(torch, cls, group, dtype)
            if why:
                skips.append(f"{name}: not available ({why})")
                continue
        factory = (lambda hyper, c=cls, m=mode: fastembed_torch_state(data, torch, c, m, hyper, tables))
        methods.append(row(name, "fastembed", group, factory, ctx.threads,
                           anchor=tables is not None and mode != "fused", check_hyper=check_hyper))
    return methods


def fused_support(torch, cls, group, dtype=None):
    """None when fastembed.torch.Embedding takes fused=cls(...) (on tables of dtype, a torch dtype, when
    given), else why not (the lead's API may lag)."""
    from fastembed.torch import Embedding

    refused = (TypeError, ValueError, NotImplementedError)  # how a signature or a mode says no
    try:
        fused = cls(**HYPER[group])
    except refused as exc:
        return f"{cls.__name__}(**{HYPER[group]}) raised {type(exc).__name__}: {exc}"
    try:
        Embedding(4, 4, fused=fused, **({} if dtype is None else {"dtype": dtype}))
    except refused as exc:
        on = "" if dtype is None else f", dtype={dtype}"
        return f"fastembed.torch.Embedding(V, D, fused={cls.__name__}(...){on}) raised {type(exc).__name__}: {exc}"
    return None


# ---------------------------------------------------------------- train: FBGEMM

def fbgemm_modules():
    """(the TBE class and its enums, None), or (None, why FBGEMM rows are skipped)."""
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
    except ImportError as exc:
        return None, (f"fbgemm_gpu does not import ({exc}); `pip install fbgemm-gpu-cpu==1.8.0` pairs with "
                      "torch 2.13.0")
    return (SplitTableBatchedEmbeddingBagsCodegen, EmbOptimType, EmbeddingLocation, PoolingMode, ComputeDevice), None


def fbgemm_state(data, torch, mods, optimizer, hyper):
    """FBGEMM's CPU TBE, one table holding a copy of the token table, pooling NONE, its fused optimizer:
    forward on every id (offsets 0, 1, ..., N: one id per bag), backward applies the update."""
    TBE, EmbOptimType, EmbeddingLocation, PoolingMode, ComputeDevice = mods
    V, D = data.token_table.shape
    tbe = TBE([(V, D, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=getattr(EmbOptimType, optimizer),
              learning_rate=hyper["lr"], eps=hyper.get("eps", ADAGRAD_EPS), pooling_mode=PoolingMode.NONE)
    weight = tbe.split_embedding_weights()[0]
    with torch.no_grad():
        weight.copy_(torch.from_numpy(data.token_table))
    ids = torch.from_numpy(data.ids.reshape(-1))
    offsets = torch.arange(ids.numel() + 1, dtype=torch.int64)
    g = torch.from_numpy(data.grad_hidden.reshape(-1, D))

    def step():
        tbe(ids, offsets).backward(g)

    return step, lambda: (tbe.split_embedding_weights()[0].detach().numpy(),)


# ---------------------------------------------------------------- train: the memory limit

# Full-width (D floats) state rows each optimizer keeps per table row (RowWiseAdagrad: one float per row).
STATE_ROWS = {"SGD": 0, "Adagrad": 1, "SparseAdam": 2}


def step_bytes(group, data, itemsize=4):
    """The bytes one train step of group must move at the least, on a table of itemsize-byte elements (4:
    float32; the output, the upstream gradient and every state have the table's dtype): the forward reads
    each distinct looked-up row once (repeats can come from cache) and writes the N output rows; backward
    reads the N upstream rows; the update reads and writes each distinct row of the table and of each
    state. Dense Adam moves every row: the table and both moments read and written, the dense gradient
    written by backward and read by the step. An add streaming these bytes (memlimit.py) is a floor no row
    can beat: the rows here are gathered from random places, which streams slower, never faster."""
    V, D = data.token_table.shape
    N, U, f = data.ids.size, np.unique(data.ids).size, itemsize
    moved = (U + N) * D * f + N * D * f
    if group == "Adam":
        return moved + (2 * 3 + 2) * V * D * f
    if group == "RowWiseAdagrad":
        return moved + 2 * U * D * f + 2 * U * f
    return moved + 2 * (1 + STATE_ROWS[group]) * U * D * f


# ---------------------------------------------------------------- train: the case

def train_methods(data, ctx):
    """Every train row this run can build, grouped by optimizer, and a note for each row left out."""
    skips, methods = [], []
    torch = ctx.torch
    dense_ok = data.token_table.size <= DENSE_MAX_ELEMENTS
    by_group = {g: [] for g in GROUPS}
    for m in numpy_rows(data, ctx, dense_ok):
        by_group[m.group].append(m)
    if not dense_ok:
        skips.append(f"{numpy_row_name('Adam')}, {torch_row_name('Adam')}: skipped, a dense step rewrites all "
                     f"{data.token_table.size:,} elements of the table (over {DENSE_MAX_ELEMENTS:,}); the op "
                     "step-dense measures dense Adam at this shape")
    if torch is None:
        skips.append("torch, fastembed.torch and FBGEMM rows: skipped (no PyTorch in this run)")
    else:
        for group in GROUPS:
            if group in TORCH_SPARSE_ROWS or (group == "Adam" and dense_ok):
                factory = (lambda hyper, g=group: torch_state(data, torch, g, hyper))
                by_group[group].append(row(torch_row_name(group), "torch", group, factory, ctx.torch_threads,
                                           anchor=True))
        for m in fastembed_torch_rows(data, ctx, skips):
            by_group[m.group].append(m)
        mods, why = fbgemm_modules()
        if mods is None:
            skips.append(f"FBGEMM rows: skipped ({why})")
        else:
            for name, group, optimizer in FBGEMM_ROWS:
                factory = (lambda hyper, o=optimizer: fbgemm_state(data, torch, mods, o, hyper))
                by_group[group].append(row(name, "fbgemm", group, factory, ctx.torch_threads))
    from .bag import limit_method  # bag imports this module: import it when the case is built

    for group in GROUPS:
        if by_group[group]:
            by_group[group].append(limit_method(step_bytes(group, data), ctx.threads, group))
        methods += by_group[group]
    return Built(methods, skips)


# ---------------------------------------------------------------- train on tables of another dtype (--dtypes)

# The case `train <dtype>` (float64, float16, bfloat16): per optimizer group, fastembed.torch's rows (the drop-in,
# which anchors the group, and the fused rule), the numpy API's rows of the float32 case (numpy_rows: coalesced,
# coalesce=False, fused; dense Adam's) and the torch row, on a table, upstream gradient and optimizer state of that
# dtype, and the group's memory limit of the bytes that dtype moves. Dense Adam's fastembed.torch row is this one
# (the float32 case has the numpy API's dense Adam as its anchor instead).
DTYPE_ADAM_ROW = ("fastembed.torch dense + optim.Adam", "Adam", "fastembed.torch.optim", "Adam", "dense")
NUMPY_BFLOAT16_SKIP = ("fastembed numpy API rows, bfloat16: skipped (ml_dtypes is not installed, and fastembed's "
                       "numpy layers take bfloat16 tables as ml_dtypes.bfloat16 arrays; `pip install ml_dtypes`)")
FBGEMM_DTYPE_SKIP = "FBGEMM rows: none on tables other than float32"
# The check of a half-precision case: lr 0.1 and eps 1e-2. At lr 0.01 an Adagrad or Adam step moves an element by
# about 0.01, near bfloat16's tolerance (2**-7, bench/cases.py): lr 0.1 makes a missed or doubled update 20x that
# tolerance or more. eps 1e-2: torch's float16 Adagrad and SparseAdam square the gradient in float16, where
# v = g**2 (SparseAdam: (1 - b2) g**2) of a small g is subnormal or 0, and divide by sqrt(v) + eps: at the
# timed eps (1e-10, 1e-8: below float16's smallest subnormal, so added as 0) a few elements come out inf or
# NaN where fastembed's (computed in float32) stay finite, and subnormal v is too coarse for 2**-10 at eps 1e-3
# and lr 0.1. Every row of a group (and torch's formula: eps before the bias correction) uses the same
# settings; the timed rows keep HYPER. float64 checks with CHECK_HYPER, as float32 does.
HALF_DTYPES = ("float16", "bfloat16")
HALF_CHECK_HYPER = {g: {**h, "lr": 0.1, **({"eps": 1e-2} if "eps" in h else {})} for g, h in HYPER.items()}
# torch's sparse rows on half tables sum a table row's lookups in the half dtype (SparseAdam and Adagrad
# coalesce the gradient; SGD adds each lookup into the stored row), rounding after each add, where fastembed
# sums in float32: on a row named 3 times or more a sum that cancels can lose every bit, and Adagrad's
# update g / sqrt(g**2) then changes sign (measured: up to 10x the tolerance at seed-32x16, 100x and NaN on
# hot zipf rows). Their check compares the table rows the ids name at most this many times (untouched rows
# included: those must stay bitwise), where torch rounds a sum once; fastembed.torch's rows and torch's dense
# Adam (a dense half gradient on both sides) are checked on every row.
TORCH_HALF_CHECK_LOOKUPS = 2


def torch_half_check_note(rows, total):
    """The note of a half case whose torch sparse rows are checked on `rows` of the table's `total` rows."""
    return (f"torch's sparse rows (SGD, Adagrad, SparseAdam): checked on the {rows:,} of {total:,} table rows "
            f"the ids name at most {TORCH_HALF_CHECK_LOOKUPS} times (torch sums a row's lookups in the half "
            "dtype, rounding after each add; bench/train.py)")


def numpy_half_sgd_note(rows, total):
    """The note of a half case whose numpy API coalesced SGD row is checked on `rows` of the table's `total` rows."""
    return (f"{numpy_row_name('SGD')}: checked on the {rows:,} of {total:,} table rows the ids name at most "
            f"{TORCH_HALF_CHECK_LOOKUPS} times (it rounds a row's summed gradient to the dtype and moves the row "
            "once, where SGD's other rows move it once per lookup, rounding after each; bench/train.py)")


def train_dtype_methods(data, ctx, dtype):
    """The train case on tables of dtype: per group fastembed.torch's drop-in (the group's anchor), dense
    Adam's drop-in or the fused rule, the numpy API's rows, torch's row, the memory limit of the dtype's bytes;
    notes for the rows left out (FBGEMM's; the numpy API's on bfloat16 without ml_dtypes; torch's without torch).
    Without torch the numpy API's coalesced row anchors its group, as in the float32 case."""
    torch = ctx.torch
    arrays, tables = in_dtype((data.token_table, data.grad_hidden), dtype, torch)
    if arrays is None and torch is None:
        return Built([], ["skipped: bfloat16 needs ml_dtypes (the numpy API) or PyTorch"])
    skips = [] if arrays is not None else [NUMPY_BFLOAT16_SKIP]
    skips.append(FBGEMM_DTYPE_SKIP)
    dense_ok = data.token_table.size <= DENSE_MAX_ELEMENTS
    half = dtype in HALF_DTYPES
    check_hyper = HALF_CHECK_HYPER if half else CHECK_HYPER
    by_group = {g: [] for g in GROUPS}
    if torch is None:
        skips.append("torch and fastembed.torch rows: skipped (no PyTorch in this run)")
    else:
        fe_rows = FASTEMBED_TORCH_ROWS + ((DTYPE_ADAM_ROW,) if dense_ok else ())
        for m in fastembed_torch_rows(data, ctx, skips, rows=fe_rows, tables=tables, check_hyper=check_hyper):
            by_group[m.group].append(m)
    check_rows = None  # every row: float64, and half tables whose ids name no row more than twice
    if half:
        V = data.token_table.shape[0]
        cold = np.flatnonzero(np.bincount(data.ids.reshape(-1), minlength=V) <= TORCH_HALF_CHECK_LOOKUPS)
        if len(cold) < V:
            check_rows = cold
    if arrays is not None:  # checked on every table row (fastembed's own kernels), but coalesced SGD's on halves
        for m in numpy_rows(data, ctx, dense_ok, arrays=arrays, check_hyper=check_hyper, sgd_check_rows=check_rows):
            by_group[m.group].append(m)
        if check_rows is not None:
            skips.append(numpy_half_sgd_note(len(check_rows), V))
    if torch is not None:
        if check_rows is not None:
            skips.append(torch_half_check_note(len(check_rows), V))
        for group in GROUPS:
            if group in TORCH_SPARSE_ROWS or (group == "Adam" and dense_ok):
                factory = (lambda hyper, g=group: torch_state(data, torch, g, hyper, tables))
                by_group[group].append(row(torch_row_name(group), "torch", group, factory, ctx.torch_threads,
                                           anchor=True, check_hyper=check_hyper,
                                           check_rows=check_rows if group in TORCH_SPARSE_ROWS else None))
    if not dense_ok:
        left_out = ([numpy_row_name("Adam")] if arrays is not None else []) + (
            [DTYPE_ADAM_ROW[0], torch_row_name("Adam")] if torch is not None else [])
        skips.append(f"{', '.join(left_out)}: skipped, a dense step rewrites all {data.token_table.size:,} "
                     f"elements of the table (over {DENSE_MAX_ELEMENTS:,})")
    from .bag import limit_method  # bag imports this module: import it when the case is built

    methods = []
    for group in GROUPS:
        rows = by_group[group]
        if not any(m.family == "fastembed" for m in rows):
            if rows:
                skips.append(f"{group}: skipped (no fastembed row to check torch's against)")
            continue
        # No fastembed.torch drop-in (an older build, or no torch): its fused rule, else the numpy API's first row
        # checked on every table row.
        if not any(m.family == "fastembed" and m.anchor for m in rows):
            next(m for m in rows if m.family == "fastembed" and m.check_rows is None).anchor = True
        methods += rows + [limit_method(step_bytes(group, data, itemsize(dtype)), ctx.threads, group)]
    return Built(methods, skips)


# ---------------------------------------------------------------- adapter

def adapter_state(data, torch, kind):
    """One module on fresh copies of the tables: (forward + backward with the grads dropped, the grads)."""
    import fastembed.torch as fet

    tok = torch.from_numpy(_table_copy(data))
    ids, g = torch.from_numpy(data.ids), torch.from_numpy(data.grad_hidden)
    if kind in ("fastembed", "fastembed sparse", "fastembed sgbf", "torch", "torch sparse", "torch sgbf"):
        cls = fet.Embedding if kind.startswith("fastembed") else torch.nn.Embedding
        emb = cls.from_pretrained(tok, freeze=False, sparse=kind.endswith("sparse"),
                                  scale_grad_by_freq=kind.endswith("sgbf"))
        params = (emb.weight,)

        def forward():
            return emb(ids)
    elif kind == "fastembed tpe":
        layer = fet.TokenPositionEmbedding.from_pretrained(tok, torch.from_numpy(data.position_table.copy()),
                                                           freeze=False)
        params = (layer.token.weight, layer.position.weight)

        def forward():
            return layer(ids)
    else:  # "torch tpe": two nn.Embeddings and an add
        emb_t = torch.nn.Embedding.from_pretrained(tok, freeze=False)
        emb_p = torch.nn.Embedding.from_pretrained(torch.from_numpy(data.position_table.copy()), freeze=False)
        p = torch.from_numpy(data.positions)
        params = (emb_t.weight, emb_p.weight)

        def forward():
            return emb_t(ids) + emb_p(p)

    def step():
        forward().backward(g)
        for w in params:
            w.grad = None

    def grads():
        forward().backward(g)
        out = tuple((w.grad.to_dense() if w.grad.is_sparse else w.grad).numpy() for w in params)
        for w in params:
            w.grad = None
        return out

    return step, grads


ADAPTER_ROWS = (  # (name, family, group, kind): the torch row of each group is its anchor
    ("fastembed.torch.Embedding", "fastembed", "Embedding", "fastembed"),
    ("torch nn.Embedding", "torch", "Embedding", "torch"),
    ("fastembed.torch.Embedding(sparse=True)", "fastembed", "Embedding sparse", "fastembed sparse"),
    ("torch nn.Embedding(sparse=True)", "torch", "Embedding sparse", "torch sparse"),
    ("fastembed.torch.Embedding(scale_grad_by_freq=True)", "fastembed", "Embedding scale_grad_by_freq",
     "fastembed sgbf"),
    ("torch nn.Embedding(scale_grad_by_freq=True)", "torch", "Embedding scale_grad_by_freq", "torch sgbf"),
    ("fastembed.torch.TokenPositionEmbedding", "fastembed", "TokenPositionEmbedding", "fastembed tpe"),
    ("torch 2 nn.Embedding + add", "torch", "TokenPositionEmbedding", "torch tpe"),
)


def adapter_methods(data, ctx):
    """forward + backward through autograd, fastembed.torch against torch (seed and medium shapes)."""
    if ctx.torch is None:
        return Built([], ["skipped: every row needs PyTorch"])
    if data.shape.name not in ADAPTER_SHAPES:
        return Built([], [f"skipped: measured at {', '.join(ADAPTER_SHAPES)} only"])
    torch, methods = ctx.torch, []
    for name, family, group, kind in ADAPTER_ROWS:
        def make(k=kind):
            return adapter_state(data, torch, k)[0]

        def result(k=kind):
            return adapter_state(data, torch, k)[1]()

        threads = ctx.threads if family == "fastembed" else ctx.torch_threads
        methods.append(Method(name, family, make=make, result=result, threads=threads, exact=False, group=group,
                              anchor=True))
    return Built(methods)
