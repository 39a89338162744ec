"""The op `bag`: bags of ids reduced to one row each (sum, mean, max), forward and dense backward.

One case per shape (medium and wide only: the issue's targets are there), grouped by
direction, ids per bag and mode, e.g. ``forward, 8 ids/bag, mean``. Every group uses the
shape's ids flattened (N = B x T of them, the same for every bag size), cut into bags of
L = 1, 8 or 64 consecutive ids by ``offsets = arange(0, N, L)`` (the last bag is shorter
when L does not divide N, which happens only on shapes shrunk by --scale).

Rows of a forward group:
  fastembed numpy API              fe.embedding_bag (allocating its output; mode max with its argmax)
  fastembed.torch.EmbeddingBag     the module on a weight that requires grad (the graph is built)
  torch nn.EmbeddingBag            the same, torch's module
  FBGEMM TBE (dense), pooling ...  FBGEMM's DenseTableBatchedEmbeddingBagsCodegen on the CPU (sum and
                                   mean; TBE has no max pooling)
  memory limit                     an add moving the bytes the forward must (forward_bytes)
A max group's rows all make the (B, D) int64 argmax a backward needs (torch's forward and
fastembed.torch.EmbeddingBag's always do; the numpy row asks return_argmax=True), and its limit
counts writing it: 8 x B x D bytes more. One rule: every row and the limit move the same bytes.
(The numpy API without return_argmax writes out only: less than that limit counts.)
Rows of a backward group (the dense gradient of the table):
  fastembed numpy API              fe.embedding_bag_backward accumulating into a preallocated (V, D)
                                   gradient (zeroed once, as the op backward does)
  fastembed.torch.EmbeddingBag, torch nn.EmbeddingBag, FBGEMM TBE (dense): autograd.grad of one
                                   kept forward: each call allocates and zeroes a (V, D) gradient,
                                   as training does; these three compare like with like.
Each row is checked against its group's numpy API row before timing: max forward bitwise (a
max does not round), sums within the float32 tolerance of bench.cases.compare. Every row
runs at the run's thread count (torch is set to the same count).

With --dtypes, the op runs once more per other table dtype (float64, float16, bfloat16) as the
case ``bag <dtype>``: its forward groups only, with the numpy API (bfloat16 as ml_dtypes arrays;
without ml_dtypes that row is left out and fastembed.torch.EmbeddingBag anchors the group),
the two modules on a weight of that dtype, and the memory limit of the bytes that dtype moves;
checked with the dtype's tolerance (halves: a bag's sum in float32, rounded once; torch's
FBGEMM path may round a bfloat16 tie the other way). No backward groups there: torch's dense
backward on half tables rounds its adds in another order than fastembed's (which rounds after
each add, as np.add.at does), so the two differ by more the more often a row is named, and no
fixed tolerance checks them. No FBGEMM rows either (its dense TBE here is float32).
"""
import functools
import warnings

import numpy as np

import fastembed as fe

from . import threads as ran
from .memlimit import LIMIT_MIN_BYTES, OVERHEAD_NAME, MemoryLimit, SERIAL_BYTES, is_limit
from .shapes import DEFAULT_DTYPE, in_dtype, itemsize, widened
from .timing import Method
from .train import Built

SHAPES = ("medium", "wide-uniform", "wide-zipf")
BAG_SIZES = (1, 8, 64)
MODES = ("sum", "mean", "max")
DIRECTIONS = ("forward", "backward")

NUMPY_ROW = "fastembed numpy API"
NUMPY_SKIP = ("fastembed numpy API, bfloat16: skipped (ml_dtypes is not installed, and fastembed's numpy API takes "
              "bfloat16 tables as ml_dtypes.bfloat16 arrays; `pip install ml_dtypes`)")
MODULE_ROW = "fastembed.torch.EmbeddingBag"
TORCH_ROW = "torch nn.EmbeddingBag"
FBGEMM_ROW = "FBGEMM TBE (dense)"


def group_name(direction, size, mode):
    """The group (and the report's case label) of one direction, bag size and mode."""
    return f"{direction}, {size} ids/bag, {mode}"


def bags(data, size):
    """The shape's ids as one flat array and the offsets of bags of size consecutive ids."""
    ids = data.ids.reshape(-1)
    return ids, np.arange(0, ids.size, size, dtype=np.int64)


def forward_bytes(ids, offsets, dim, itemsize=4, argmax=False):
    """Bytes the bag forward must move at least: ids and offsets read, each distinct row read once (a row
    named by several ids stays in cache), the (B, D) output written, and with argmax (a max forward made
    for its backward) the (B, D) int64 argmax written too."""
    distinct = len(np.unique(ids))
    written = (itemsize + (8 if argmax else 0)) * len(offsets) * dim
    return ids.nbytes + offsets.nbytes + itemsize * dim * distinct + written


def fbgemm_dense():
    """(FBGEMM's dense TBE class and PoolingMode, None), or (None, why its rows are skipped)."""
    try:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen
    except ImportError as exc:
        return None, (f"fbgemm_gpu does not import ({exc}); `pip install fbgemm-gpu-cpu==1.8.0` pairs with "
                      "torch 2.13.0")
    return (DenseTableBatchedEmbeddingBagsCodegen, PoolingMode), None


# ---------------------------------------------------------------- states: (forward, backward) per row

def numpy_state(data, ids, offsets, mode, direction, table=None):
    """The numpy API's call and its result, over the shared table (forward; table: the shape's table in another
    dtype) or a new gradient (backward)."""
    table = data.token_table if table is None else table
    B, D = len(offsets), data.shape.dim
    if direction == "forward" and mode == "max":
        run = functools.partial(fe.embedding_bag, table, ids, offsets, mode=mode, return_argmax=True)
        return run, lambda: (widened(run()[0]),)
    if direction == "forward":
        run = functools.partial(fe.embedding_bag, table, ids, offsets, mode=mode)
        return run, lambda: (widened(run()),)
    argmax = fe.embedding_bag(table, ids, offsets, mode="max", return_argmax=True)[1] if mode == "max" else None
    g = data.grad_hidden.reshape(-1, D)[:B]
    grad = np.zeros_like(table)
    run = functools.partial(fe.embedding_bag_backward, grad, ids, offsets, g, mode=mode, argmax=argmax)

    def result():
        grad[...] = 0
        run()
        return (grad.copy(),)

    return run, result


def module_state(data, torch, ids, offsets, mode, direction, kind, mods=None, weight=None):
    """A torch module on the shared table (its weight requires grad; weight: the table in another dtype):
    forward calls it, backward takes autograd.grad of one kept output into a new dense gradient per call."""
    if weight is None:
        weight = torch.from_numpy(data.token_table)  # no copy: nothing here writes the table
    t_ids, t_off = torch.from_numpy(ids), torch.from_numpy(offsets)
    B, D = len(offsets), data.shape.dim
    if kind == "fbgemm":
        TBE, PoolingMode = mods
        # torch warns at each backward that FBGEMM's CPU lookup has no autograd kernel of its own; the
        # gradient is checked against the numpy API's before timing, so the warning says nothing here.
        warnings.filterwarnings("ignore", message="fbgemm::dense_embedding_codegen_lookup_function: an autograd "
                                "kernel was not registered")
        V = weight.shape[0]
        module = TBE([(V, D)], pooling_mode=getattr(PoolingMode, mode.upper()), use_cpu=True)
        module.weights.data = weight.reshape(-1)  # shares the table's memory
        param = module.weights
        t_off = torch.cat([t_off, torch.tensor([ids.size], dtype=torch.int64)])  # TBE takes B + 1 offsets

        def forward():
            return module(t_ids, t_off)
    else:
        import fastembed.torch as fet

        cls = fet.EmbeddingBag if kind == "fastembed" else torch.nn.EmbeddingBag
        module = cls.from_pretrained(weight, freeze=False, mode=mode)
        param = module.weight

        def forward():
            return module(t_ids, t_off)

    if direction == "forward":
        return forward, lambda: (widened(forward()),)
    g = torch.from_numpy(data.grad_hidden.reshape(-1, D)[:B])
    out = forward()

    def backward():
        return torch.autograd.grad(out, param, g, retain_graph=True)[0]

    return backward, lambda: (backward().reshape(weight.shape).numpy(),)


# ---------------------------------------------------------------- the case

def thread_label(direction, ids, offsets, dim, n):
    """The threads a bag kernel call runs on at fastembed's count n (fastembed/_bag_*.pxi): the forward splits
    bags (never more threads than bags), the backward column blocks, both past the serial threshold."""
    work = ids.size + len(offsets)
    if direction == "forward":
        return str(min(ran.threads_for(work * dim, n), max(1, len(offsets))))
    return str(ran.column_threads(work, dim, n))


def limit_method(nbytes, threads, group):
    """The memory limit of a forward group (built when the group is timed), or numpy's call overhead."""
    if not is_limit(nbytes):
        add = MemoryLimit(nbytes, 1)
        return Method(OVERHEAD_NAME, "overhead", run=add, threads=1, scale=add.scale, group=group, ran="1",
                      nbytes=nbytes, note=f"{nbytes / 1024:.3g} KB < {LIMIT_MIN_BYTES / 2**20:g} MiB: a call's "
                                          "fixed cost, no limit")
    parts = threads if threads > 1 and nbytes >= SERIAL_BYTES else 1
    m = Method("memory limit", "memory", threads=threads, group=group, anchor=True, ran=str(parts), nbytes=nbytes)

    def make():
        limit = MemoryLimit(nbytes, threads)
        m.scale, m.note = limit.scale, limit.describe()
        return limit

    m.make = make
    return m


def stated(factory, method):
    """method with make (the timed state, built when its group is timed) and result (a fresh state)."""
    method.make = lambda: factory()[0]
    method.result = lambda: factory()[1]()
    return method


def bag_methods(data, ctx, dtype=DEFAULT_DTYPE):
    """Every row of every group of the shape (on tables of dtype: the forward groups); notes for the rows
    left out."""
    if data.shape.name not in SHAPES:
        return Built([], [f"skipped: measured at {', '.join(SHAPES)} only (`--shapes medium` or `--all`)"])
    torch, n, D = ctx.torch, ctx.threads, data.shape.dim
    methods, skips = [], []
    table, weight = None, None
    if dtype != DEFAULT_DTYPE:
        arrays, tensors = in_dtype((data.token_table,), dtype, torch)
        table, weight = arrays and arrays[0], tensors and tensors[0]
        if table is None and torch is None:
            return Built([], ["skipped: bfloat16 needs ml_dtypes (the numpy API) or PyTorch"])
        if table is None:
            skips.append(NUMPY_SKIP)
    mods, why = fbgemm_dense() if torch is not None and dtype == DEFAULT_DTYPE else (None, None)
    if torch is None:
        skips.append("torch, fastembed.torch and FBGEMM rows: skipped (no PyTorch in this run)")
    elif dtype != DEFAULT_DTYPE:
        skips.append("FBGEMM rows: none on tables other than float32")
    elif mods is None:
        skips.append(f"FBGEMM rows: skipped ({why})")
    else:
        skips.append("FBGEMM rows, mode max: none (TBE pools by sum or mean only)")
    numpy_row = dtype == DEFAULT_DTYPE or table is not None
    for direction in DIRECTIONS if dtype == DEFAULT_DTYPE else ("forward",):
        for size in BAG_SIZES:
            ids, offsets = bags(data, size)
            label = thread_label(direction, ids, offsets, D, n)
            for mode in MODES:
                group = group_name(direction, size, mode)
                nbytes = None
                if direction == "forward":
                    nbytes = forward_bytes(ids, offsets, D, itemsize(dtype), argmax=mode == "max")
                strict = direction == "forward" and mode == "max"
                if numpy_row:
                    numpy = functools.partial(numpy_state, data, ids, offsets, mode, direction, table)
                    methods.append(stated(numpy, Method(NUMPY_ROW, "fastembed", threads=n, group=group,
                                                        anchor=True, ran=label, nbytes=nbytes)))
                if torch is not None:
                    rows = [(MODULE_ROW, "fastembed", "fastembed", label), (TORCH_ROW, "torch", "torch", None)]
                    if mods is not None and mode != "max":
                        rows.append((f"{FBGEMM_ROW}, pooling {mode.upper()}", "fbgemm", "fbgemm", None))
                    for name, family, kind, ran_on in rows:
                        state = functools.partial(module_state, data, torch, ids, offsets, mode, direction, kind,
                                                  mods, weight)
                        threads = n if family == "fastembed" else ctx.torch_threads
                        # Without the numpy API's row the module anchors the group (the check's baseline).
                        anchor = family == "torch" or (family == "fastembed" and not numpy_row)
                        methods.append(stated(state, Method(
                            name, family, threads=threads, group=group, exact=False, strict=strict,
                            anchor=anchor, ran=ran_on or ran.torch_label(threads), nbytes=nbytes)))
                if nbytes is not None:
                    methods.append(limit_method(nbytes, n, group))
    return Built(methods, skips)
