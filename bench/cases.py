"""The cases: one operation on one shape, done by every method, checked equal before it is timed.

Operations (each case builds its methods from the same `shapes.Data`):
  forward      hidden = token_table[ids] + position_table[positions]
  backward     dense gradient into both tables: token_grad[ids] += g, position_grad[positions] += g
  sparse       the token table's gradient as (distinct rows, summed values)
  step-sparse  forward, backward, lazy Adam on the touched rows (SparseAdam)
  step-dense   forward, backward, dense Adam on every row (the book's optimizer)
  train        one table: forward, backward, update, per optimizer; numpy API, torch,
               fastembed.torch (drop-in optimizers and fused), FBGEMM (bench/train.py)
  adapter      forward + backward through torch autograd: fastembed.torch against
               torch.nn (bench/train.py)
  bag          bags of 1, 8 and 64 ids reduced by sum, mean or max, forward and dense
               backward: numpy API, fastembed.torch, torch, FBGEMM (bench/bag.py); medium
               and wide shapes only, run when asked (--ops bag) or with --all
With --dtypes, forward, train and bag run once per table dtype (float32, float64,
float16, bfloat16): the float32 case keeps the op's name, the others are named by
op and dtype (``forward float16``, ``train float64``, ``bag bfloat16``), each with
fastembed.torch's module, torch's and the memory limit of the bytes that dtype
moves, and the numpy API's (bfloat16 as ml_dtypes arrays, left out without
ml_dtypes; bag: its forward groups, bench/bag.py says why); train without FBGEMM:
per optimizer group fastembed.torch's drop-in (the anchor) and fused rows and the
numpy API's rows of the float32 case against nn.Embedding(sparse=True, dtype) +
torch.optim (bench/train.py).
The upstream gradient g is a fixed array: the steps measure the embedding layer's
share of a training step, not the rest of a model.
"""
import functools
from dataclasses import dataclass, field

import numpy as np

import fastembed as fe
from fastembed import reference

from . import threads as ran
from . import bag, train
from .memlimit import LIMIT_MIN_BYTES, OVERHEAD_NAME, MemoryLimit, is_limit
from .shapes import DEFAULT_DTYPE, DTYPES, in_dtype, itemsize, widened
from .timing import Method

KERNEL_OPS = ("forward", "backward", "sparse", "step-sparse", "step-dense")  # each with a byte count and a limit
OPS = KERNEL_OPS + ("train", "adapter", "bag")
DEFAULT_OPS = KERNEL_OPS + ("train", "adapter")  # `python -m bench` without --ops or --all
BIG_ONLY_OPS = ("bag",)  # ops with nothing to run at the seed shapes
OP_TITLES = {
    "forward": "forward (gather + position add)",
    "backward": "dense backward into both tables",
    "sparse": "sparse gradient, coalesced (token table)",
    "step-sparse": "training step, lazy Adam (SparseAdam)",
    "step-dense": "training step, dense Adam",
    "train": "training step of one table (forward, backward, update), per optimizer",
    "adapter": "forward + backward through torch autograd",
    "bag": "bags of ids reduced by sum, mean or max (cases: direction, ids per bag, mode)",
}
LR, BETAS, EPS = 0.01, (0.85, 0.99), 1e-8  # the book's Adam, for every optimizer here

DTYPE_OPS = ("forward", "train", "bag")  # the ops --dtypes multiplies
# The equality check's (rtol, atol relative to the largest value) per dtype. float32: sums in another order
# (float64 keeps float32's bound: looser than it needs, still far below any wrong row).
# float16 and bfloat16: one unit in the last place (2**-10, 2**-7), the most two roundings of the same
# float32 value can differ by (the kernels add halves in float32 and round once, as torch does on CPU).
# `train <dtype>` checks with the same bounds, after two steps at its check settings (bench/train.py:
# HALF_CHECK_HYPER, lr 0.1 and eps 1e-2 for the halves): fastembed.torch's rows agree bitwise (each rounds
# once per stored element); torch's, which round after each op, stay within 0.45 of the bound (seed shapes and
# a 20,000-row zipf table, on the rows its check compares: TORCH_HALF_CHECK_LOOKUPS), while a row that misses
# or doubles an update moves 20x the bound or more.
TOLERANCES = {"float32": (1e-4, 1e-5), "float64": (1e-4, 1e-5), "float16": (2.0**-10, 2.0**-10),
              "bfloat16": (2.0**-7, 2.0**-7)}


def case_op(op, dtype=DEFAULT_DTYPE):
    """The name of op's case on tables of dtype: the op itself for float32 (the rows of earlier runs keep their
    names), else e.g. ``forward float16``."""
    return op if dtype == DEFAULT_DTYPE else f"{op} {dtype}"


def split_op(name):
    """(op, dtype) of a case name from case_op."""
    op, _, dtype = name.partition(" ")
    return op, dtype or DEFAULT_DTYPE


def op_title(name):
    """What a case name measures, for the report."""
    op, dtype = split_op(name)
    return OP_TITLES[op] + ("" if dtype == DEFAULT_DTYPE else f", {dtype} tables")


def op_order(name):
    """A sort key of case names: the ops in OPS order, each op's dtypes in DTYPES order."""
    op, dtype = split_op(name)
    return OPS.index(op), DTYPES.index(dtype)


class CheckError(AssertionError):
    """A method computed something other than what fastembed computed."""


@dataclass
class Context:
    """What a run has: the thread counts to use, torch (or None), whether the reference runs."""

    threads: int  # fastembed's main thread count (as read back): the memory limit's anchor runs at it
    fe_threads: tuple  # every count fastembed runs at on this shape (read back), the main one first
    torch: object = None
    reference: bool = False
    torch_threads: int = 1  # torch.get_num_threads(), read back after setting the run's count


@dataclass
class Case:
    """One operation on one shape: its methods, the bytes it must move, what the checks found."""

    shape: object
    op: str
    nbytes: int  # None where the rows differ in what they must move (train, adapter): no GB/s, no limit
    methods: list
    dtype: str = DEFAULT_DTYPE  # the tables' dtype (op is then case_op's name, e.g. "forward float16")
    checks: dict = field(default_factory=dict)  # method key -> "bitwise" / "close (...)" / "baseline"
    warnings: list = field(default_factory=list)
    skips: list = field(default_factory=list)  # rows left out of this run, each with why


def method_key(m):
    """A method's name with the thread count it is set to, and its group: unique within a case."""
    return f"{m.name} [{m.threads}t]" + (f" ({m.group})" if m.group else "")


def method_label(m):
    """A method's name with the threads it ran on, for messages."""
    ran_on = m.ran or str(m.threads)
    return f"{m.name} [{ran_on} thread{'' if ran_on == '1' else 's'}]"


# ---------------------------------------------------------------- bytes each op must move

def traffic(op, data, itemsize=4):
    """Bytes the op must read and write at least: every input once, each touched row once.

    Rows touched by several ids count once (they stay in cache); a read-modify-write
    of a row counts twice. Dense Adam must stream every row of weight, both moments
    (read and write) and the gradient (read). itemsize: bytes per table element.
    """
    s = data.shape
    f, D, N = itemsize, s.dim, s.tokens
    ids_bytes = data.ids.nbytes
    u_tok, u_pos = data.unique_rows()
    touched = f * D * (u_tok + u_pos)
    forward = ids_bytes + touched + f * N * D
    backward = ids_bytes + f * N * D + 2 * touched
    if op == "forward":
        return forward
    if op == "backward":
        return backward
    if op == "sparse":
        return ids_bytes + f * N * D + 8 * u_tok + f * D * u_tok
    if op == "step-sparse":
        coalesce_both = ids_bytes + 2 * f * N * D + touched
        adam_rows = touched + 6 * touched  # read the values; read and write weight, m, v
        return forward + coalesce_both + adam_rows
    if op == "step-dense":
        full = f * D * (s.vocab + s.context)
        return forward + backward + full + 7 * full  # zero the new grads; Adam reads g, rewrites w, m, v
    if op in ("train", "adapter", "bag"):
        return None  # each optimizer (each module) moves other bytes: see the rows' ratios instead
    raise ValueError(f"unknown op {op!r}")


# ---------------------------------------------------------------- helpers

def pinned(n, fn):
    """fn run at n fastembed threads (set on every call: methods of one case interleave)."""
    set_threads = fe.set_num_threads

    def call():
        set_threads(n)
        return fn()

    return call


def fresh(buffers, fn):
    """A result function: zero the accumulators, run fn once, return copies of them."""
    def result():
        for b in buffers:
            b[...] = 0
        fn()
        return tuple(np.array(b) for b in buffers)

    return result


def fastembed_variants(name, ctx, make, exact=True, counts=None, anchor=True):
    """One fastembed Method per thread count; make(n) gives (run, result) for a variant's own state."""
    methods = []
    for n in counts or ctx.fe_threads:
        run, result = make(n)
        if len(ctx.fe_threads) > 1:  # seed shapes run at one count: keep their calls free of wrappers
            run, result = pinned(n, run), pinned(n, result)
        methods.append(Method(name, "fastembed", run=run, result=result, threads=n, exact=exact,
                              anchor=anchor and n == ctx.fe_threads[0]))
    return methods


def torch_tensors(data, torch):
    """The shared arrays as torch tensors over the same memory (no copies)."""
    s = data.shape
    t = {
        "tok": torch.from_numpy(data.token_table),
        "pos": torch.from_numpy(data.position_table),
        "ids": torch.from_numpy(data.ids),
        "p": torch.from_numpy(data.positions),
        "g": torch.from_numpy(data.grad_hidden),
    }
    t["ids_flat"] = t["ids"].reshape(-1)
    t["p_full_flat"] = torch.from_numpy(data.positions_full.reshape(-1))
    t["g_flat"] = t["g"].reshape(-1, s.dim)
    return t


def reference_layer(data):
    """The pure-Python reference holding the same tables, and the ids as nested lists."""
    layer = reference.TokenPositionEmbedding(0, 0, data.shape.dim)
    layer.token = reference.Embedding.from_rows(data.token_table.tolist())
    layer.position = reference.Embedding.from_rows(data.position_table.tolist())
    return layer, data.ids.tolist()


def values_of(hidden):
    """Nested lists of reference Values as a float32 array (the data, rounded as fastembed stores it)."""
    return np.array([[[v.data for v in row] for row in seq] for seq in hidden], dtype=np.float32)


# ---------------------------------------------------------------- forward

def forward_methods(data, ctx):
    """fastembed, numpy idioms, torch, the reference: each returns hidden of shape (B, T, D)."""
    tok, pos, ids, p = data.token_table, data.position_table, data.ids, data.positions
    s = data.shape

    def make(n):
        run = functools.partial(fe.gather_add, tok, pos, ids)
        return run, lambda: (run(),)

    out = np.empty(ids.shape + (s.dim,), dtype=np.float32)

    def make_out(n):
        run = functools.partial(fe.gather_add, tok, pos, ids, out=out)
        return run, lambda: (run().copy(),)

    methods = fastembed_variants("fastembed", ctx, make)
    methods += fastembed_variants("fastembed (out=)", ctx, make_out, counts=ctx.fe_threads[:1], anchor=False)

    def numpy_index():
        return tok[ids] + pos[p]

    take_out = np.empty_like(out)
    pos_rows = np.empty((s.seq, s.dim), dtype=np.float32)

    def numpy_take():
        np.take(tok, ids, axis=0, out=take_out)
        np.take(pos, p, axis=0, out=pos_rows)
        return np.add(take_out, pos_rows, out=take_out)

    methods += [
        Method("numpy tok[ids] + pos[p]", "numpy", run=numpy_index, result=lambda: (numpy_index(),), anchor=True),
        Method("numpy take(out=) + add", "numpy", run=numpy_take, result=lambda: (numpy_take().copy(),)),
    ]
    if ctx.torch is not None:
        methods += torch_forward(data, ctx)
    if ctx.reference:
        layer, id_lists = reference_layer(data)
        run = functools.partial(layer, id_lists)
        methods.append(Method("reference (Values)", "reference", run=run, result=lambda: (values_of(run()),)))
    return methods


def torch_forward(data, ctx):
    """F.embedding twice and an add; index_select twice and an add."""
    torch = ctx.torch
    F = torch.nn.functional
    t = torch_tensors(data, torch)
    s = data.shape
    tok, pos, ids, p, ids_flat = t["tok"], t["pos"], t["ids"], t["p"], t["ids_flat"]

    def embedding():
        return F.embedding(ids, tok) + F.embedding(p, pos)

    def index_select():
        return tok.index_select(0, ids_flat).view(s.batch, s.seq, s.dim) + pos.index_select(0, p)

    return [
        Method("torch F.embedding", "torch", run=embedding, result=lambda: (embedding().numpy(),),
               threads=ctx.torch_threads, anchor=True),
        Method("torch index_select + add", "torch", run=index_select, result=lambda: (index_select().numpy(),),
               threads=ctx.torch_threads),
    ]


# ---------------------------------------------------------------- forward on tables of another dtype

MODULE_ROW = "fastembed.torch.Embedding"
NUMPY_SKIP = ("fastembed (the numpy API), bfloat16: skipped (ml_dtypes is not installed, and fastembed's numpy "
              "API takes bfloat16 tables as ml_dtypes.bfloat16 arrays; `pip install ml_dtypes`)")


def forward_dtype_methods(data, ctx, dtype):
    """The forward on tables of dtype: the numpy API, fastembed.torch.Embedding (two modules and an add) and
    torch's F.embedding (twice, and an add), at the run's thread count. All three add the two rows in the
    dtype's rules (float64 in float64, halves in float32 rounded once), so they are expected bitwise equal."""
    torch = ctx.torch
    arrays, tensors = in_dtype((data.token_table, data.position_table), dtype, torch)
    ids = data.ids
    methods, skips = [], []
    if arrays is not None:
        tok, pos = arrays

        def make(n):
            run = functools.partial(fe.gather_add, tok, pos, ids)
            return run, lambda: (widened(run()),)

        methods += fastembed_variants("fastembed", ctx, make, counts=ctx.fe_threads[:1])
    else:
        skips.append(NUMPY_SKIP)
    if torch is None:
        if not methods:
            return train.Built([], ["skipped: bfloat16 needs ml_dtypes (the numpy API) or PyTorch"])
        return train.Built(methods, skips)
    import fastembed.torch as fet

    F = torch.nn.functional
    tok_t, pos_t = tensors
    ids_t, p_t = torch.from_numpy(ids), torch.from_numpy(data.positions)
    tok_m, pos_m = fet.Embedding.from_pretrained(tok_t), fet.Embedding.from_pretrained(pos_t)  # frozen: no graph

    def module():
        return tok_m(ids_t) + pos_m(p_t)

    def embedding():
        return F.embedding(ids_t, tok_t) + F.embedding(p_t, pos_t)

    # Without the numpy API's row (bfloat16 without ml_dtypes) the module is the group's fastembed anchor.
    methods.append(Method(MODULE_ROW, "fastembed", run=module, result=lambda: (widened(module()),),
                          threads=ctx.threads, anchor=not methods))
    methods.append(Method("torch F.embedding", "torch", run=embedding, result=lambda: (widened(embedding()),),
                          threads=ctx.torch_threads, anchor=True))
    return train.Built(methods, skips)


# ---------------------------------------------------------------- dense backward

def backward_methods(data, ctx):
    """Every method adds g into a token grad (V, D) and a position grad (P, D)."""
    tok, pos, ids, g = data.token_table, data.position_table, data.ids, data.grad_hidden

    def make(n):
        tgrad, pgrad = np.zeros_like(tok), np.zeros_like(pos)
        run = functools.partial(fe.gather_add_backward, g, ids, tgrad, pgrad)
        return run, fresh((tgrad, pgrad), run)

    methods = fastembed_variants("fastembed", ctx, make)
    tgrad, pgrad, p_full = np.zeros_like(tok), np.zeros_like(pos), data.positions_full

    def add_at():
        np.add.at(tgrad, ids, g)
        np.add.at(pgrad, p_full, g)

    methods.append(Method("numpy np.add.at", "numpy", run=add_at, result=fresh((tgrad, pgrad), add_at), anchor=True))
    if ctx.torch is not None:
        methods += torch_backward(data, ctx)
    if ctx.reference:
        methods.append(reference_backward(data))
    return methods


def torch_backward(data, ctx):
    """index_add_ into preallocated grads (the kernel-to-kernel anchor), and autograd's dense grads."""
    torch = ctx.torch
    F = torch.nn.functional
    t = torch_tensors(data, torch)
    tgrad = torch.zeros(t["tok"].shape)
    pgrad = torch.zeros(t["pos"].shape)
    ids_flat, p_full_flat, g_flat = t["ids_flat"], t["p_full_flat"], t["g_flat"]

    def index_add():
        tgrad.index_add_(0, ids_flat, g_flat)
        pgrad.index_add_(0, p_full_flat, g_flat)

    # The graph of the torch forward above, kept: each call is backward only, into new grads.
    tok_w = torch.from_numpy(data.token_table).requires_grad_()
    pos_w = torch.from_numpy(data.position_table).requires_grad_()
    hidden = F.embedding(t["ids"], tok_w) + F.embedding(t["p"], pos_w)
    g = t["g"]

    def autograd():
        return torch.autograd.grad(hidden, (tok_w, pos_w), g, retain_graph=True)

    return [
        Method("torch index_add_", "torch", run=index_add,
               result=fresh((tgrad.numpy(), pgrad.numpy()), index_add), threads=ctx.torch_threads, exact=False,
               anchor=True),
        Method("torch autograd.grad (dense)", "torch", run=autograd,
               result=lambda: tuple(x.numpy() for x in autograd()), threads=ctx.torch_threads, exact=False),
    ]


def reference_backward(data):
    """backward() of the reference graph, timed alone: the forward that builds the graph is untimed.

    The graph's root is one Value whose children are the hidden Values and whose
    local gradients are g: backward() then gives each hidden Value grad g, and each
    table Value the sum over the positions that looked it up.
    """
    layer, id_lists = reference_layer(data)
    g_flat = data.grad_hidden.reshape(-1).tolist()

    def prepare():
        hidden = layer(id_lists)
        flat = [v for seq in hidden for row in seq for v in row]
        return reference.Value(0.0, flat, g_flat).backward

    def result():
        layer.zero_grad()
        prepare()()
        return np.array(layer.token.grad), np.array(layer.position.grad)

    return Method("reference backward()", "reference", prepare=prepare, result=result, exact=False)


# ---------------------------------------------------------------- sparse gradient

def sparse_methods(data, ctx):
    """Every method returns (sorted distinct token ids, (U, D) sums of g per id)."""
    ids, g, D = data.ids, data.grad_hidden, data.shape.dim

    def make(n):
        run = functools.partial(fe.coalesce, ids, g)
        return run, run

    def numpy_coalesce():
        rows, inverse = np.unique(ids, return_inverse=True)
        values = np.zeros((len(rows), D), dtype=np.float32)
        np.add.at(values, inverse.reshape(-1), g.reshape(-1, D))
        return rows, values

    methods = fastembed_variants("fastembed", ctx, make)
    methods.append(Method("numpy unique + np.add.at", "numpy", run=numpy_coalesce, result=numpy_coalesce,
                          anchor=True))
    if ctx.torch is not None:
        torch = ctx.torch
        t = torch_tensors(data, torch)
        weight = torch.from_numpy(data.token_table).requires_grad_()
        looked_up = torch.nn.functional.embedding(t["ids"], weight, sparse=True)
        g_t = t["g"]

        def torch_sparse():
            return torch.autograd.grad(looked_up, weight, g_t, retain_graph=True)[0].coalesce()

        def torch_result():
            grad = torch_sparse()
            return grad.indices()[0].numpy(), grad.values().numpy()

        methods.append(Method("torch sparse grad + coalesce()", "torch", run=torch_sparse, result=torch_result,
                              threads=ctx.torch_threads, exact=False, anchor=True))
    return methods


# ---------------------------------------------------------------- training steps

def fe_step(data, sparse):
    """A fastembed layer and optimizer on copies of the tables: (one step, its weights)."""
    layer = fe.TokenPositionEmbedding.from_pretrained(data.token_table, data.position_table, sparse=sparse)
    opt = (fe.optim.SparseAdam if sparse else fe.optim.Adam)(layer.parameters(), lr=LR, betas=BETAS, eps=EPS)
    ids, g = data.ids, data.grad_hidden

    def step():
        layer(ids)
        layer.backward(g)
        opt.step()
        opt.zero_grad()

    return step, lambda: (layer.token.weight, layer.position.weight)


def torch_step(data, torch, sparse, fused=False, eps=EPS):
    """nn.Embedding twice and torch's Adam (or SparseAdam) on copies of the tables: (one step, its weights)."""
    t = torch_tensors(data, torch)
    tok = torch.nn.Embedding.from_pretrained(t["tok"].clone(), freeze=False, sparse=sparse)
    pos = torch.nn.Embedding.from_pretrained(t["pos"].clone(), freeze=False, sparse=sparse)
    params = [tok.weight, pos.weight]
    if sparse:
        opt = torch.optim.SparseAdam(params, lr=LR, betas=BETAS, eps=eps)
    else:
        opt = torch.optim.Adam(params, lr=LR, betas=BETAS, eps=eps, **({"fused": True} if fused else {}))
    ids, p, g = t["ids"], t["p"], t["g"]

    def step():
        hidden = tok(ids) + pos(p)
        hidden.backward(g)
        opt.step()
        opt.zero_grad()

    return step, lambda: (tok.weight.detach().numpy(), pos.weight.detach().numpy())


def stepped(factory):
    """A result function: a fresh state from factory, one step, its weights."""
    def result():
        step, weights = factory()
        step()
        return tuple(np.array(w) for w in weights())

    return result


def step_methods(data, ctx, sparse):
    """One training step from the same tables; results compared after one step from the start."""
    def make(n):
        step, _ = fe_step(data, sparse)
        return step, stepped(lambda: fe_step(data, sparse))

    # Dense fastembed Adam runs at the main thread count only: it is the slowest fastembed row.
    methods = fastembed_variants("fastembed", ctx, make, counts=None if sparse else ctx.fe_threads[:1])
    torch = ctx.torch
    if torch is None:
        return methods
    if sparse:
        # torch's SparseAdam adds eps to sqrt(v) before the bias correction, fastembed (and the book)
        # after it. Its check state takes eps * sqrt(1 - beta2), which makes the first step the same
        # formula; the timed state keeps the book's eps (the work is the same).
        variants = [("torch nn.Embedding + SparseAdam", {}, {"eps": EPS * (1 - BETAS[1]) ** 0.5})]
    else:
        variants = [("torch nn.Embedding + Adam", {}, {}),
                    ("torch nn.Embedding + Adam(fused=True)", {"fused": True}, {"fused": True})]
    for k, (name, timed, checked) in enumerate(variants):
        run = torch_step(data, torch, sparse, **timed)[0]
        result = stepped(functools.partial(torch_step, data, torch, sparse, **checked))
        methods.append(Method(name, "torch", run=run, result=result, threads=ctx.torch_threads, exact=False,
                              anchor=(k == 0)))
    return methods


BUILDERS = {
    "forward": forward_methods,
    "backward": backward_methods,
    "sparse": sparse_methods,
    "step-sparse": functools.partial(step_methods, sparse=True),
    "step-dense": functools.partial(step_methods, sparse=False),
    "train": train.train_methods,
    "adapter": train.adapter_methods,
    "bag": bag.bag_methods,
}


DTYPE_BUILDERS = {"forward": forward_dtype_methods, "train": train.train_dtype_methods, "bag": bag.bag_methods}


def build_case(data, op, ctx, dtype=DEFAULT_DTYPE):
    """The case's methods (on tables of dtype), plus the memory limit at each fastembed thread count (or, below
    memlimit.LIMIT_MIN_BYTES, one row of numpy's call overhead, which is no limit); each
    method labelled with the threads it runs on; the rows the builder left out (skips), with why."""
    if dtype == DEFAULT_DTYPE:
        built = BUILDERS[op](data, ctx)
    elif op in DTYPE_BUILDERS:
        built = DTYPE_BUILDERS[op](data, ctx, dtype)
    else:
        raise ValueError(f"op {op!r} runs on float32 tables only (--dtypes applies to {', '.join(DTYPE_OPS)})")
    methods, skips = (built.methods, built.skips) if isinstance(built, train.Built) else (built, [])
    nbytes = traffic(op, data, itemsize(dtype))
    if nbytes is None:
        pass  # no case-wide byte count (train, adapter, bag): no limit here (bag adds one per forward group)
    elif is_limit(nbytes):
        # the other dtypes' fastembed rows run at the main count alone: their limit too
        for n in sorted(set(ctx.fe_threads if dtype == DEFAULT_DTYPE else ctx.fe_threads[:1])):
            limit = MemoryLimit(nbytes, n)
            methods.append(Method("memory limit", "memory", run=limit, threads=n, scale=limit.scale,
                                  note=limit.describe(), anchor=(n == ctx.threads)))
    else:
        add = MemoryLimit(nbytes, 1)
        methods.append(Method(OVERHEAD_NAME, "overhead", run=add, threads=1, scale=add.scale,
                              note=f"{nbytes / 1024:.3g} KB < {LIMIT_MIN_BYTES / 2**20:g} MiB: a call's fixed cost, "
                                   "no limit"))
    for m in methods:
        if not m.ran:  # bag's builder labels its own rows (each group's kernel calls differ)
            m.ran = threads_ran(m, op, data)
    return Case(data.shape, case_op(op, dtype), nbytes, methods, skips=skips, dtype=dtype)


def threads_ran(m, op, data):
    """What m's threads column says: the threads it really runs on (bench/threads.py)."""
    if m.family == "fastembed":
        return ran.label(ran.fastembed_counts(op, data, m.threads, dense=(m.group == "Adam")))
    if m.family in ("torch", "fbgemm"):
        return ran.torch_label(m.threads)
    if m.family in ("memory", "overhead"):
        return str(m.run.parts)
    return "1"  # numpy and the reference


# ---------------------------------------------------------------- the equality check

def compare(expected, got, name, dtype=DEFAULT_DTYPE):
    """'bitwise' or 'close (...)'; CheckError when the arrays differ in shape or beyond dtype's rounding
    (TOLERANCES)."""
    rtol, atol = TOLERANCES[dtype]
    if len(expected) != len(got):
        raise CheckError(f"{name}: returned {len(got)} arrays, fastembed {len(expected)}")
    bitwise, worst = True, 0.0
    for k, (a, b) in enumerate(zip(expected, got)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise CheckError(f"{name}: output {k} has shape {b.shape}, fastembed's has {a.shape}")
        if np.array_equal(a, b):
            continue
        bitwise = False
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        # Sums in another order differ by float32 rounding, relative to the largest value summed.
        scale = max(1.0, float(np.max(np.abs(a64))) if a.size else 1.0)
        diff = float(np.max(np.abs(a64 - b64)))
        if not np.allclose(a64, b64, rtol=rtol, atol=atol * scale):
            raise CheckError(f"{name}: output {k} differs from fastembed's by up to {diff:.3g} "
                             f"(largest value {scale:.3g}): it does not compute the same thing")
        worst = max(worst, diff)
    return "bitwise" if bitwise else f"close (max diff {worst:.2g})"


def groups(methods):
    """The methods split by group, groups in order of first appearance."""
    out = {}
    for m in methods:
        out.setdefault(m.group, []).append(m)
    return list(out.values())


def verify(case, ctx):
    """Run each method once from a clean state and compare with its group's fastembed anchor (the case's
    main fastembed row when the case has one group); fail loudly."""
    for group in groups(case.methods):
        base = next((m for m in group if m.family == "fastembed" and m.anchor), None)
        if base is None:
            raise CheckError(f"{case.shape.name} {case.op}: group {group[0].group!r} has no fastembed row to "
                             "check against")
        expected = base.result()
        case.checks[method_key(base)] = "baseline"
        for m in group:
            if m is base or m.result is None:
                continue
            want, got = expected, m.result()
            if m.check_rows is not None:  # a row checked on some table rows alone (bench/train.py says which)
                want, got = (tuple(np.asarray(a)[m.check_rows] for a in arrays) for arrays in (expected, got))
            status = compare(want, got, f"{case.shape.name} {case.op}: {method_label(m)}", case.dtype)
            case.checks[method_key(m)] = status if m.check_rows is None else (
                f"{status} on {len(m.check_rows):,} of {len(np.asarray(expected[0])):,} rows")
            if m.strict and status != "bitwise":
                raise CheckError(f"{case.shape.name} {case.op} {m.group}: {method_label(m)} must be bitwise equal "
                                 f"to {method_label(base)} but is {status}")
            if m.exact and status != "bitwise":
                case.warnings.append(f"{method_label(m)} is expected bitwise equal to {method_label(base)} "
                                     f"but is {status}")
        del expected
