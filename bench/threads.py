"""How many threads each method actually ran on, for the threads column.

A method is *set* to a thread count (fastembed.set_num_threads, torch.set_num_threads,
the memory limit's split); what runs can be fewer. The column says what ran:

- fastembed: each kernel call decides from its own size. This module applies the
  kernels' rule (fastembed/_common.pxi, ``_threads_for`` and ``_column_threads``):
  a call with fewer than SERIAL_ELEMENTS float32 elements of work runs on one
  thread; a call that splits columns (scatter, fused backward, coalesce) uses at
  most one thread per 128-byte column block. The count it starts from is
  ``fe.get_num_threads()`` read back after setting it (set_num_threads caps at the
  processor count; a build without OpenMP reads back 1). A row that makes several
  calls (a training step) shows the range, e.g. "1-2".
  The rule is recomputed here rather than read from the extension after each call:
  the extension reports it only through a private test hook, which would tie the
  benchmark to internals. tests/test_bench.py runs calls of several sizes and checks
  these labels against that hook (``_kernels._last_call_threads()``), so a change of
  the rule in the kernels fails a test here.
- numpy and the pure-Python reference: one thread (numpy does not split ufuncs,
  fancy indexing, np.add.at or np.unique).
- torch: "<=n" with n torch.get_num_threads() read back: torch splits an op only
  above its own grain size, and which ops did is not observable from Python.
- the memory limit: the number of chunks its add was split into (memlimit.py).
"""

# fastembed/_kernels.pyx: the default serial threshold and COLUMN_BLOCK (the cdef enum at the top).
SERIAL_ELEMENTS = 32768
COLUMN_BLOCK = 32
# The column-block count of a dim that is not a multiple of COLUMN_BLOCK depends on how far the
# gradient's first row starts past a 128-byte boundary; the kernel comment gives 4 floats (16 bytes)
# for numpy's large arrays. Every benchmark shape has a dim that is a multiple of 32, where it does not matter.
ASSUMED_PHASE = 4


def threads_for(work, n):
    """Threads a row-split kernel call uses for `work` float32 elements when set to n threads."""
    return 1 if work < SERIAL_ELEMENTS else max(1, n)


def column_blocks(dim, phase=ASSUMED_PHASE):
    """128-byte column blocks per row, as the kernels count them."""
    if dim % COLUMN_BLOCK == 0:
        return dim // COLUMN_BLOCK
    return (phase + dim + COLUMN_BLOCK - 1) // COLUMN_BLOCK


def column_threads(tokens, dim, n):
    """Threads a column-split kernel call (scatter, fused backward, coalesce) uses."""
    return min(threads_for(tokens * dim, n), column_blocks(dim))


def fastembed_calls(op, data, dense=False):
    """The kernel calls a fastembed method of op makes on data: a list of (kind, tokens or rows, dim).

    train and adapter rows go through layers (and fastembed.torch) whose exact calls are theirs to
    choose; their labels assume the lookup (rows), the scatter or coalesce of the gradient (columns)
    and, for train, an update of the touched rows (of every row with dense, the dense Adam row).
    """
    s = data.shape
    N, D = s.tokens, s.dim
    if op == "adapter":
        return [("rows", N, D), ("cols", N, D)]
    if op == "train":
        return [("rows", N, D), ("cols", N, D), ("rows", s.vocab if dense else data.unique_rows()[0], D)]
    if op == "forward":
        return [("rows", N, D)]  # gather_add
    if op == "backward":
        return [("cols", N, D)]  # gather_add_backward
    if op == "sparse":
        return [("cols", N, D)]  # coalesce
    u_tok, u_pos = data.unique_rows()
    if op == "step-sparse":
        # gather_add; coalesce of the token ids and of the positions; adam_step on the touched rows of each table
        return [("rows", N, D), ("cols", N, D), ("cols", N, D), ("rows", u_tok, D), ("rows", u_pos, D)]
    if op == "step-dense":
        # gather_add; gather_add_backward; adam_step on every row of each table
        return [("rows", N, D), ("cols", N, D), ("rows", s.vocab, D), ("rows", s.context, D)]
    raise ValueError(f"unknown op {op!r}")


def fastembed_counts(op, data, n, dense=False):
    """The distinct thread counts of op's kernel calls at fastembed's thread count n (read back)."""
    counts = set()
    for kind, rows, dim in fastembed_calls(op, data, dense):
        counts.add(threads_for(rows * dim, n) if kind == "rows" else column_threads(rows, dim, n))
    return sorted(counts)


def label(counts):
    """"2" for one count, "1-2" for a range."""
    counts = sorted(set(counts))
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def torch_label(n):
    """torch's pool size as an upper bound: each op decides whether to split."""
    return "1" if n <= 1 else f"<={n}"


def read_back(set_threads, get_threads, n):
    """The count a library really uses after being set to n (the previous setting restored)."""
    before = get_threads()
    try:
        set_threads(n)
        return get_threads()
    finally:
        set_threads(before)

