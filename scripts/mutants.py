#!/usr/bin/env python
"""A standing mutation check: realistic bugs, planted one at a time in a copy of the tree, must make tests fail.

    python scripts/mutants.py --jobs 2        # every mutant (about 20 min on 2 busy cores; each kernel
                                              #   mutant is a rebuild, ~15 s alone)
    python scripts/mutants.py --quick         # the CI subset (about 3-6 min)
    python scripts/mutants.py --only ID[,ID]  # some mutants, by id
    python scripts/mutants.py --list          # the list: id, file, tests, description
    options: --jobs N (parallel mutants, default 1), --keep (keep the temporary tree and say where),
             --python PATH (the interpreter that builds and tests), --seed N (hypothesis seed; random
             by default, printed), --timeout S (per mutant test run, default 300)

Needs Cython, numpy, setuptools, pytest and hypothesis in that interpreter (torch for the torch mutants).

How it works: the tree (without build products) is copied to a temporary folder, built once with
`python setup.py build_ext --inplace -q`, and the tests that the selected mutants name are run on it
(the baseline: it must pass, or nothing is run). Then each mutant gets its own fresh copy: its `old`
text, which must occur exactly once in its file (a stale mutant fails loudly, STALE), is replaced by
`new`; a mutant of the extension's sources (_kernels.pyx, its .pxi includes, _fastembed.h) is rebuilt
(a build failure is BUILD-ERROR: a mutant must compile), any other reuses the baseline's compiled
extension. Its tests then run as
`python -m pytest -x -q -p no:cacheprovider --hypothesis-seed=S ARGS` with the copy as the working
directory (checked: `import fastembed` must load the copy, not an installed fastembed).

A mutant is caught when pytest reports a failure (exit status 1) or the test process dies of a
signal (a crash is a detection). Anything else fails the run: MISSED (the tests passed), TIMEOUT,
BUILD-ERROR, STALE, or ERROR (pytest could not run the tests: a missing test file, a -k that selects
nothing, a collection error). The exit status is 0 only when every selected mutant was caught.

Each mutant is a bug someone could write (a wrong bound, a dropped check, a swapped argument), never
an equivalent change: every one changes what some call returns, raises or writes. Some need several
threads to show (marked "threads" in the list): on a machine with one core, or a build without
OpenMP, they are reported MISSED. The table at the end is also printed as markdown.
"""
import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The files compiled into the extension: a mutant of any of them is rebuilt.
KERNEL_FILES = ("fastembed/_kernels.pyx", "fastembed/_common.pxi", "fastembed/_optim.pxi", "fastembed/_fastembed.h")
BUILD_TIMEOUT = 900  # seconds; a build takes ~15 s alone, more on a busy machine


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    description: str
    tests: tuple  # pytest arguments: test files, -k expressions
    quick: bool = False
    threads: bool = False  # shows only when a call really runs on 2 threads

    @property
    def kernel(self):
        return self.file in KERNEL_FILES


PYX, COMMON, OPTIM_PXI, HDR = KERNEL_FILES
OPS, NN, OPTIM, REF, TORCH = ("fastembed/ops.py", "fastembed/nn.py", "fastembed/optim.py",
                              "fastembed/reference.py", "fastembed/torch/__init__.py")
ERRORS, KERNELS = "tests/test_errors.py", "tests/test_kernels.py"
NN_OPTIM, H_OPTIM = "tests/test_nn_optim.py", "tests/test_hardening_optim.py"
THREADED = "tests/test_threaded_paths.py"  # issue 12, item 3: the observable threaded path
DTYPES = "tests/test_dtypes.py"  # issue 10, item 1: the table dtypes
ORACLES = "tests/test_optim_oracles.py"  # issue 12, item 2: the optimizers against transcriptions
FUSED = "tests/test_fused.py"  # issue 9, item 3: the fused rules and layers
TORCH_OPTIM, T_OPTIM = "fastembed/torch/optim.py", "tests/test_torch_optim.py"  # issue 9, item 2
LIBRARY, T_COMPILE = "fastembed/torch/_library.py", "tests/test_torch_compile.py"  # issue 10, item 5
TORCH_BAG, T_BAG = "fastembed/torch/_bag.py", "tests/test_torch_bag.py"  # issue 10, item 3

MUTANTS = [
    # ---------------------------------------------------------------- kernels: checks
    Mutant("range-check-gt", COMMON,
           "if <uint64_t>(<int64_t>ids[i]) >= bound:", "if <uint64_t>(<int64_t>ids[i]) > bound:",
           "range check `> rows` instead of `>= rows` (thinc's bug): id == rows passes the entry check",
           (ERRORS, "-k", "id_equals_rows or position_equals_rows"), quick=True),
    Mutant("outside-recheck-gone", COMMON,
           "    return <uint64_t>x >= <uint64_t>bound", "    return False",
           "the loops trust the checked ids: an id rewritten during the call is followed out of bounds",
           ("tests/test_hardening_threads.py", "-k", "rewritten")),
    Mutant("check-start-off-by-one", COMMON,
           "    if start < 0 or start + T > P:", "    if start < 0 or start + T > P + 1:",
           "an int positions start lets start + T == P + 1 through (the last position is P)",
           (ERRORS, "-k", "sequence_longer or start")),
    Mutant("increasing-allows-ties", OPTIM_PXI,
           "        if r[k] <= r[k - 1]:", "        if r[k] < r[k - 1]:",
           "adam_step's rows check accepts a repeated row (`<` for `<=`): an update is lost",
           (H_OPTIM, "-k", "repeated_rows")),
    Mutant("no-overlap-scatter-dropped", PYX,
           '    _no_overlap(grad, name, (ids, grad_out), ("ids", "grad_out"))', "    pass",
           "scatter_add no longer refuses a grad_out that shares memory with grad_table",
           (ERRORS, "-k", "scatter_add_grad_table_aliases")),
    Mutant("read-only-target-accepted", COMMON,
           "    if not cnp.PyArray_ISWRITEABLE(arr):", "    if False and not cnp.PyArray_ISWRITEABLE(arr):",
           "the read-only check of written arrays dropped: a read-only out/grad is written",
           (ERRORS, "-k", "read_only")),
    Mutant("table-contiguity-unchecked", COMMON,
           "    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):\n"
           "        raise ValueError(\n"
           '            f"{name} must be C-contiguous and aligned (a table',
           "    if not cnp.PyArray_ISALIGNED(arr):\n"
           "        raise ValueError(\n"
           '            f"{name} must be C-contiguous and aligned (a table',
           "a table's contiguity is not checked: a Fortran-order table is read as if C-ordered",
           (ERRORS, "-k", "fortran_table")),
    Mutant("rows-shape-last-axis-only", COMMON,
           "            if cnp.PyArray_DIM(arr, k) != cnp.PyArray_DIM(ids, k):\n                break",
           "            if cnp.PyArray_DIM(arr, k) != cnp.PyArray_DIM(ids, k):\n                continue",
           "grad_out/out shape check compares only rank and D, not the leading axes",
           (ERRORS, "-k", "wrong_shape")),
    Mutant("gather-add-dim-unchecked", PYX,
           '    _check_same_dim(tok, "token_table", pos, "position_table")', "    pass",
           "gather_add does not check that both tables have the same dim",
           (ERRORS, "-k", "gather_add_mismatched_dim")),
    Mutant("coalesce-negative-unchecked", PYX,
           "        if x < 0:\n            return i\n", "",
           "coalesce's min/max pass does not refuse negative ids (they reach the bitmap)",
           (ERRORS, "-k", "coalesce_negative_id")),
    # ---------------------------------------------------------------- kernels: loops
    Mutant("gather-memcpy-bytes", PYX,
           "memcpy(out + i * D, table + r * D, D * sizeof(elem_t))", "memcpy(out + i * D, table + r * D, D)",
           "gather copies D bytes per row instead of D floats",
           (KERNELS, "-k", "gather_matches_numpy_indexing")),
    Mutant("add-into-assigns", HDR,
           "const float *FE_RESTRICT s, ptrdiff_t n) {\n    for (ptrdiff_t d = 0; d < n; d++) g[d] += s[d];",
           "const float *FE_RESTRICT s, ptrdiff_t n) {\n    for (ptrdiff_t d = 0; d < n; d++) g[d] = s[d];",
           "the scatter inner loop assigns instead of adding: repeated ids and earlier gradients are lost",
           (KERNELS, "-k", "scatter_add_matches_add_at or duplicates_are_summed"), quick=True),
    Mutant("coalesce-rank-counts-itself", PYX,
           "fe_popcount64(bits[x >> 6] & (((<uint64_t>1) << (x & 63)) - 1))",
           "fe_popcount64(bits[x >> 6] & ((((<uint64_t>1) << (x & 63)) << 1) - 1))",
           "coalesce's bitmap rank counts the id's own bit: every slot is one too far",
           (KERNELS, "-k", "coalesce")),
    Mutant("coalesce-bitmap-one-word-short", PYX,
           "    W = (hi >> 6) + 1 if N > 0 else 0", "    W = (hi >> 6) if N > 0 else 0",
           "coalesce's bitmap is one 64-bit word short: the ids in the top word are dropped",
           (KERNELS, "-k", "coalesce")),
    Mutant("bitmap-rows-clz", HDR,
           "return __builtin_ctzll(x);", "return 63 - __builtin_clzll(x);",
           "the bitmap walk takes the highest set bit while clearing the lowest: wrong coalesce rows",
           (KERNELS, "-k", "coalesce")),
    Mutant("adam-bias-swapped", OPTIM_PXI,
           "    _adam_hyper(&h, lr, beta1, beta2, eps, bias1, bias2)\n    # an optimizer step",
           "    _adam_hyper(&h, lr, beta1, beta2, eps, bias2, bias1)\n    # an optimizer step",
           "adam_step passes the two bias corrections in the wrong order",
           (NN_OPTIM, "-k", "adam")),
    Mutant("adam-eps-inside-sqrt", HDR,
           "(SQRT(vd * inv_bias2) + eps)",
           "SQRT(vd * inv_bias2 + eps)",
           "fe_adam_row adds eps inside the square root (not the book's formula)",
           (NN_OPTIM, H_OPTIM, "-k", "adam or Adam")),
    Mutant("adam-moment-betas-swapped", HDR,
           "T md = beta1 * m[d] + keep1 * gd;",
           "T md = keep1 * m[d] + beta1 * gd;",
           "the first moment's average weights the old moment by 1 - beta1 and the gradient by beta1",
           (NN_OPTIM, "-k", "adam")),
    Mutant("adam-grad-row-by-table-row", OPTIM_PXI,
           "                  g + k * D, D, S, h, tmp)",
           "                  g + r * D, D, S, h, tmp)",
           "a sparse step (adam_step and the others: one row loop) reads the gradient row of table row r instead "
           "of the k-th given row",
           (NN_OPTIM, "-k", "sparse_adam")),
    Mutant("gather-add-start-plus-one", PYX,
           "        p = pos_ids[i] if pos_ids != NULL else start + t\n        t += 1\n        if t == T:\n"
           "            t = 0\n        if _outside(r, V) or _outside(p, P):\n            skipped += 1\n"
           "            continue\n        _add_rows(",
           "        p = pos_ids[i] if pos_ids != NULL else start + t + 1\n        t += 1\n        if t == T:\n"
           "            t = 0\n        if _outside(r, V) or _outside(p, P):\n            skipped += 1\n"
           "            continue\n        _add_rows(",
           "gather_add reads position start + t + 1 (off by one) when positions is None or an int",
           (KERNELS, "-k", "gather_add_matches_numpy or positions_semantics")),
    # ---------------------------------------------------------------- kernels: the threaded path
    Mutant("threads-for-always-1", COMMON,
           "    return n if n > 1 else 1", "    return 1",
           "every call runs on one thread: the threaded loops are dead code (the results stay right)",
           (THREADED,), threads=True),
    Mutant("serial-threshold-unreachable", PYX,
           "    SERIAL_ELEMENTS = 32768", "    SERIAL_ELEMENTS = 2147483647",
           "the serial threshold out of reach: no call releases the GIL or runs threads",
           (THREADED, "tests/test_hardening_threads.py")),
    Mutant("gather-add-split-restarts-t", PYX,
           "cdef Py_ssize_t i, skipped = 0, t = lo % T if T > 0 else 0",
           "cdef Py_ssize_t i, skipped = 0, t = 0",
           "a thread's share of gather_add restarts the position count at 0 instead of lo % T",
           (KERNELS, "-k", "split_across_threads or threaded_path"), threads=True),
    Mutant("part-floors-first", COMMON,
           "    return n * k // parts", "    return n // parts * k",
           "the thread split floors before multiplying: the last n % parts items belong to no thread",
           (KERNELS, "-k", "threaded_path or split_across_threads"), threads=True),
    Mutant("col-end-one-block-short", COMMON,
           "    cdef Py_ssize_t j = blocks * (k + 1) // parts", "    cdef Py_ssize_t j = blocks * (k + 1) // parts - 1",
           "a thread's column range ends one 128-byte block early: those gradient columns are never summed",
           (KERNELS, "-k", "threaded_path"), threads=True),
    Mutant("col-wrap-every-thread", COMMON,
           "    if k == 0 and _wraps_of(D, phase, block):", "    if _wraps_of(D, phase, block):",
           "every thread, not only block 0's owner, adds the columns that wrap into the next row",
           (KERNELS, "-k", "threaded_path"), threads=True),
    Mutant("backward-skips-wrap-columns", PYX,
           "        if w0 < D:\n            _add_into(tok_grad + r * D + w0, s + w0, D - w0)",
           "        if w0 < D:\n            pass",
           "the fused backward skips the token-gradient columns that wrap into the next row",
           (KERNELS, "-k", "threaded_path"), threads=True),
    Mutant("backward-position-split-closed", PYX,
           "        if p_lo <= p < p_hi:", "        if p_lo <= p <= p_hi:",
           "the fused backward's position rows [p_lo, p_hi] overlap between threads: row p_hi added twice",
           (KERNELS, "-k", "threaded_path"), threads=True),
    # ---------------------------------------------------------------- ops.py
    Mutant("positions-array-start-ignored", OPS,
           "    start = positions or 0", "    start = 0",
           "positions_array ignores an int start (the sparse backward then scatters into rows 0..T-1)",
           (NN_OPTIM, "tests/test_torch_adapter.py", "tests/test_hardening_inputs.py",
            "-k", "token_position")),
    Mutant("positions-resized", OPS,
           "        pos = np.broadcast_to(pos, ids.shape)", "        pos = np.resize(pos, ids.shape)",
           "positions are resized (tiled, truncated) to ids.shape instead of broadcast",
           (ERRORS, KERNELS, "-k", "not_broadcastable or gather_add_matches_numpy")),
    Mutant("converted-ids-aliasing-unchecked", OPS,
           "    if converted is not original and isinstance(original, np.ndarray):", "    if False:",
           "ids converted to a copy hide that the caller's ids share memory with out",
           ("tests/test_hardening_inputs.py", "-k", "sharing_memory")),
    Mutant("object-ids-int32", OPS,
           "    return arr.astype(np.int64)\n", "    return arr.astype(np.int32)\n",
           "ids read element by element (nested lists, mixed types) are converted to int32",
           (ERRORS, "tests/test_hardening_inputs.py", KERNELS, "-k",
            "list or adversarial or int64_range")),
    # ---------------------------------------------------------------- nn.py
    Mutant("dense-grad-overwritten", NN,
           "        grad = self.grad if self.grad is not None else _zeros_like(self.weight)",
           "        grad = _zeros_like(self.weight)",
           "Embedding.backward overwrites the dense gradient instead of accumulating",
           (NN_OPTIM, "-k", "accumulates"), quick=True),
    Mutant("zero-grad-forgets-position", NN,
           "        self.token.zero_grad()\n        self.position.zero_grad()", "        self.token.zero_grad()",
           "TokenPositionEmbedding.zero_grad leaves the position table's gradient",
           (NN_OPTIM, "tests/test_bridge.py", "tests/test_errors.py", "-k", "token_position or training")),
    Mutant("sparse-merge-concatenates", NN,
           "    return SparseGrad(*ops.coalesce(np.concatenate([grad.rows, rows]), np.concatenate([grad.values, values])))",
           "    return SparseGrad(np.concatenate([grad.rows, rows]), np.concatenate([grad.values, values]))",
           "accumulated sparse gradients are concatenated: rows repeated and unsorted",
           (NN_OPTIM, "-k", "sparse")),
    Mutant("layer-keeps-callers-ids", NN,
           "    return converted.copy() if converted is ids else converted", "    return converted",
           "a layer keeps the caller's ids array: rewriting it before backward moves the gradient",
           (NN_OPTIM, "tests/test_bridge.py", "tests/test_errors.py")),
    Mutant("bridge-rescatters", NN,
           "        self.scattered = grads\n", "",
           "the Value bridge forgets what it already scattered: a second backward adds it again",
           ("tests/test_bridge.py",)),
    Mutant("sparse-position-grad-from-ids", NN,
           "            position_part = ops.coalesce(ops.positions_array(ids, positions), grad_hidden)",
           "            position_part = ops.coalesce(ids, grad_hidden)",
           "the sparse position gradient is coalesced by token ids instead of positions",
           (NN_OPTIM, "-k", "token_position")),
    Mutant("sparse-check-allows-repeats", NN,
           "np.any(rows[1:] <= rows[:-1])", "np.any(rows[1:] < rows[:-1])",
           "SparseGrad.check accepts repeated rows (SGD's fancy-index update then drops one)",
           (H_OPTIM, "-k", "repeated_rows")),
    # ---------------------------------------------------------------- optim.py
    Mutant("sgd-checks-lazily", OPTIM,
           "        updates = [_checked_sgd_update(p) for p in self.params if p.grad is not None]  # all checked first",
           "        updates = (_checked_sgd_update(p) for p in self.params if p.grad is not None)  # lazily",
           "SGD checks each gradient as it applies it: a bad last gradient leaves a half-applied step",
           (H_OPTIM, "-k", "sgd_step_that_raises")),
    Mutant("adam-moves-before-checking", OPTIM,
           "    for check_only in (True, False):", "    for check_only in (False,):",
           "Adam moves each parameter before checking the next one's gradient",
           (NN_OPTIM, "-k", "raises_changes_nothing")),
    Mutant("adam-step-count-frozen", OPTIM,
           "                  self.lr, self.betas, self.eps, [t] * len(grads))\n        self.t = t",
           "                  self.lr, self.betas, self.eps, [t] * len(grads))",
           "Adam never advances t: every step is bias-corrected as the first",
           (NN_OPTIM, "-k", "adam_matches_the_book")),
    Mutant("adam-bias2-uses-beta1", OPTIM,
           "eps, 1 - b1**t, 1 - b2**t, check_only)", "eps, 1 - b1**t, 1 - b1**t, check_only)",
           "the second bias correction uses beta1",
           (NN_OPTIM, "-k", "adam")),
    Mutant("sparse-adam-densifies", OPTIM,
           "self.exp_avg_sq[i], *self._arrays(self.params[i].grad))",
           "self.exp_avg_sq[i], self.params[i].grad.to_dense(self.params[i].weight.shape[0]), None)",
           "SparseAdam updates every row (the untouched ones move by their momentum)",
           (NN_OPTIM, "-k", "sparse_adam")),
    Mutant("sparse-adam-global-step", OPTIM,
           "[self.steps[i] + 1 for i in touched]", "[self.t + 1 for i in touched]",
           "SparseAdam bias-corrects by the optimizer's step count, not each parameter's own",
           (ORACLES, H_OPTIM, "-k", "sparse_adam or SparseAdam"), quick=True),
    Mutant("sparse-adam-counts-untouched", OPTIM,
           "        for i in touched:\n            self.steps[i] += 1",
           "        for i in range(len(self.params)):\n            self.steps[i] += 1",
           "SparseAdam advances the step count of a parameter that had no gradient",
           (ORACLES, H_OPTIM, "-k", "sparse_adam or SparseAdam")),
    # ---------------------------------------------------------------- reference.py
    Mutant("ref-pow-derivative", REF,
           "(exponent * self.data ** (exponent - 1),)", "(exponent * self.data**exponent,)",
           "Value.pow's local derivative uses x**n instead of x**(n - 1)",
           ("tests/test_reference.py", "-k", "hand_derivatives")),
    Mutant("ref-relu-grad-at-zero", REF,
           "(float(self.data > 0),)", "(float(self.data >= 0),)",
           "Value.relu passes the gradient at exactly 0",
           ("tests/test_reference.py", "-k", "relu"), quick=True),
    Mutant("ref-preorder-walk", REF,
           "            if expanded:\n                order.append(v)\n            elif id(v) not in seen:\n"
           "                seen.add(id(v))\n                stack.append((v, True))\n"
           "                stack.extend((c, False) for c in v.children)\n        self.grad = 1.0\n"
           "        for v in reversed(order):\n",
           "            if expanded:\n                pass\n            elif id(v) not in seen:\n"
           "                seen.add(id(v))\n                order.append(v)\n"
           "                stack.extend((c, False) for c in v.children)\n        self.grad = 1.0\n"
           "        for v in order:\n",
           "backward walks in DFS discovery order: a node can pass on its grad before all its parents added theirs",
           ("tests/test_reference.py", "-k", "shared or torch or match")),
    Mutant("ref-grad-assigned", REF,
           "                child.grad += local_grad * v.grad", "                child.grad = local_grad * v.grad",
           "backward assigns each child's grad instead of accumulating it",
           ("tests/test_reference.py", "-k", "shared or match")),
    Mutant("ref-hook-per-value", REF,
           "        for hook in dict.fromkeys(v.on_backward for v in order if v.on_backward is not None):",
           "        for hook in [v.on_backward for v in order if v.on_backward is not None]:",
           "a hook shared by many Values runs once per Value instead of once per backward",
           ("tests/test_bridge.py", "-k", "hook")),
    Mutant("ref-position-ignores-start", REF,
           "self.position.weight[start + t])]", "self.position.weight[t])]",
           "the reference's TokenPositionEmbedding ignores an int positions start",
           ("tests/test_reference.py",)),
    # ---------------------------------------------------------------- torch/__init__.py
    Mutant("torch-dense-padding-grad", TORCH,
           "            grad[ctx.padding_idx] = 0.0", "            pass",
           "the dense gradient of the padding_idx row is not zeroed",
           ("tests/test_torch_adapter.py", "-k", "padding"), quick=True),
    Mutant("torch-sparse-padding-grad", TORCH,
           "return torch.nn.functional.embedding(ids, weight, padding_idx, None, 2.0, False, True)",
           "return torch.nn.functional.embedding(ids, weight, None, None, 2.0, False, True)",
           "the sparse gradient keeps the padding_idx row",
           ("tests/test_torch_adapter.py", "-k", "padding")),
    Mutant("torch-sparse-range-error-torchs", TORCH,
           "        _library._gather(table, idn)  # raises", "        pass  # raises",
           "an id out of range in a sparse Embedding gets torch's bare 'index out of range in self'",
           ("tests/test_torch_adapter.py", "-k", "out_of_range")),
    Mutant("torch-padding-idx-not-normalised", TORCH,
           "            padding_idx = num_embeddings + padding_idx\n", "            pass\n",
           "a negative padding_idx is kept as given (torch stores it modulo num_embeddings)",
           ("tests/test_torch_adapter.py", "-k", "padding")),
    Mutant("torch-sparse-positions-ignored", TORCH,
           "pos_ids = torch.from_numpy(ops.positions_array(ids, positions))",
           "pos_ids = torch.from_numpy(ops.positions_array(ids))",
           "the sparse position gradient ignores the positions given to forward",
           ("tests/test_torch_adapter.py", "-k", "token_position")),
    Mutant("torch-frozen-position-scatters-ids", TORCH,
           "            _library._scatter_add(position_grad, ops.positions_array(ids, positions), g)",
           "            _library._scatter_add(position_grad, ids, g)",
           "with a frozen token table, the position gradient is scattered by token ids",
           ("tests/test_torch_adapter.py", "-k", "frozen or token_position")),
    Mutant("torch-from-pretrained-unfrozen", TORCH,
           "_weight=embeddings, _freeze=freeze,", "_weight=embeddings, _freeze=False,",
           "from_pretrained ignores freeze=True: the weight requires grad",
           ("tests/test_torch_adapter.py", "-k", "frozen or pretrained")),
    Mutant("torch-sparse-values-reordered", TORCH,
           "    values = grad_out.reshape(index.shape[1], shape[1])\n",
           "    values = grad_out.reshape(index.shape[1], shape[1]).flip(0)\n",
           "the sparse gradient's values do not follow the order of its indices (torch's layout broken)",
           ("tests/test_torch_adapter.py", "-k", "layout")),
    Mutant("torch-stale-weight-view", TORCH,
           "        if key != self.key:\n", "        if self.key is None:\n",
           "the cached numpy view of a weight is kept after weight.data is replaced (reads the old table)",
           ("tests/test_torch_adapter.py", "-k", "replaced")),
    Mutant("torch-ids-version-unchecked", TORCH,
           "    if ids._version != ctx.ids_version:", "    if False:",
           "ids changed in place between forward and backward are not noticed (wrong rows get the gradient)",
           ("tests/test_torch_adapter.py", "-k", "in_place")),
    Mutant("torch-fused-token-moves-first", TORCH,
           "                updates.append(_prepared_update(token_fused, token_table, ids, g))",
           "                _prepared_update(token_fused, token_table, ids, g)()",
           "the fused token + position backward moves the token table before the position update is checked",
           ("tests/test_torch_fused.py", "-k", "before_moving")),
    Mutant("torch-fused-padding-updated", TORCH,
           "_state(buffers), ctx.ids_np, g, padding_idx=ctx.padding_idx,",
           "_state(buffers), ctx.ids_np, g, padding_idx=None,",
           "the fused backward updates the padding_idx row",
           ("tests/test_torch_fused.py", "-k", "sgd")),
    Mutant("torch-fused-state-not-saved", TORCH,
           'self.register_buffer("optim_" + key, buf)',
           'self.register_buffer("optim_" + key, buf, persistent=False)',
           "the fused optimizer state is left out of state_dict (a checkpoint loses it)",
           ("tests/test_torch_fused.py", "-k", "state_dict")),
    Mutant("torch-fused-sparse-adam-book-eps", TORCH_OPTIM,
           "        return self.eps / math.sqrt(1 - self.betas[1] ** t)", "        return self.eps",
           "fastembed.torch.optim.FusedSparseAdam adds eps after the bias correction (the book's), not before (torch's)",
           ("tests/test_torch_fused.py", "-k", "sparse_adam")),
    Mutant("torch-fused-sgd-numpy-rounding", TORCH_OPTIM,
           "    def __init__(self, lr=1e-3, *, fma=True):", "    def __init__(self, lr=1e-3, *, fma=False):",
           "fastembed.torch.optim.FusedSGD rounds twice by default (numpy's way), not once as torch.optim.SGD",
           ("tests/test_torch_fused.py", "-k", "rounds_as_torch")),
    # ---------------------------------------------------------------- optimizer kernels (issue 9, item 1)
    Mutant("sgd-kernel-ascends", HDR,
           "for (ptrdiff_t d = 0; d < n; d++) w[d] -= lr * g[d];", "for (ptrdiff_t d = 0; d < n; d++) w[d] += lr * g[d];",
           "the SGD kernel adds the gradient instead of subtracting it (dense and sparse)",
           ("tests/test_optim_kernels.py", "-k", "sgd")),
    Mutant("sgd-sparse-moves-row-k", OPTIM_PXI,
           "_elem_row(kind, w + r * D, NULL if s == NULL",
           "_elem_row(kind, w + k * D, NULL if s == NULL",
           "a sparse step (sgd_step and the others: one row loop) moves table row k instead of rows[k]",
           ("tests/test_optim_kernels.py", "-k", "sgd")),
    Mutant("sgd-scatter-fma-ignored", PYX,
           "            fe_sgd_row_fma(dst, src, n, <float>lr)", "            fe_sgd_row(dst, src, n, <float>lr)",
           "sgd_scatter(fma=True) rounds twice, as numpy does, not once as torch does",
           ("tests/test_sgd_scatter.py", "-k", "rounding or torch")),
    Mutant("sgd-step-fma-ignored", OPTIM_PXI,
           "_run(SGD_FMA_UPDATE if fma else SGD_UPDATE,", "_run(SGD_UPDATE,",
           "sgd_step(fma=True) rounds twice, as numpy does, not once as torch does",
           ("tests/test_sgd_scatter.py", "-k", "rounding or torch")),
    Mutant("fma-row-two-roundings", HDR,
           "w[d] = FMA(neg, g[d], w[d]);",
           "w[d] = neg * g[d] + w[d];",
           "the fma row computes neg * g + w with two roundings (contraction is off in the build)",
           ("tests/test_sgd_scatter.py",)),
    Mutant("sgd-scatter-adds", PYX,
           "        if op == ROW_SGD:\n            fe_sgd_row(dst, src, n, <float>lr)",
           "        if op == ROW_SGD:\n            fe_add_into(dst, src, n)",
           "sgd_scatter (numpy rounding) adds the gradient instead of stepping against it",
           ("tests/test_sgd_scatter.py", "-k", "ids_order")),
    Mutant("sgd-scatter-negative-lr-accepted", OPTIM_PXI,
           '    if lr < 0:\n        raise ValueError(f"lr must be >= 0, got {lr}")\n    _scatter_fmt(',
           '    if False:\n        raise ValueError(f"lr must be >= 0, got {lr}")\n    _scatter_fmt(',
           "sgd_scatter accepts a negative lr and moves the table uphill",
           ("tests/test_sgd_scatter.py", "-k", "bad_input")),
    Mutant("sgd-scatter-check-only-writes", PYX,
           "    if check_only:\n        return 0\n    cdef void* g =", "    cdef void* g =",
           "sgd_scatter(check_only=True) runs its loop: a two-table fused layer moves one table before "
           "checking the other",
           ("tests/test_sgd_scatter.py", "-k", "check_only")),
    Mutant("adagrad-eps-inside-sqrt", HDR,
           "w[d] -= clr * gd / (SQRT(sd) + eps);",
           "w[d] -= clr * gd / SQRT(sd + eps);",
           "the Adagrad kernel adds eps inside the square root (torch adds it after)",
           ("tests/test_optim_kernels.py", "-k", "adagrad and not rowwise")),
    Mutant("adagrad-state-shape-unchecked", OPTIM_PXI,
           '    _check_like(s, "state_sum", w)\n    cdef cnp.ndarray r', "    cdef cnp.ndarray r",
           "adagrad_step does not check state_sum's shape (a short one is written past its end)",
           ("tests/test_optim_kernels.py", "-k", "refuses and adagrad")),
    Mutant("adagrad-lr-decay-off-by-one", OPTIM,
           "apply(self.lr / (1 + (t - 1) * self.lr_decay), self.eps)", "apply(self.lr / (1 + t * self.lr_decay), self.eps)",
           "Adagrad decays the lr from the first step (torch's first step uses lr itself)",
           ("tests/test_optim_kernels.py", "-k", "Adagrad or adagrad")),
    Mutant("adagrad-step-count-frozen", OPTIM,
           "            self.steps[i] = t\n", "",
           "Adagrad never advances a parameter's step count: lr_decay never applies",
           ("tests/test_optim_kernels.py", "-k", "Adagrad or adagrad")),
    Mutant("adagrad-sparse-weight-decay-allowed", OPTIM,
           "            if rows is not None:\n                raise RuntimeError(",
           "            if False:\n                raise RuntimeError(",
           "Adagrad applies weight decay to a sparse gradient (torch refuses; here numpy broadcasts or fails late)",
           ("tests/test_optim_kernels.py", "-k", "weight_decay")),
    Mutant("adagrad-checks-lazily", OPTIM,
           "        updates = [(i, self._checked(i)) for i, p in enumerate(self.params) if p.grad is not None]\n"
           "        for i, apply in updates:\n            t = ",
           "        updates = ((i, self._checked(i)) for i, p in enumerate(self.params) if p.grad is not None)\n"
           "        for i, apply in updates:\n            t = ",
           "Adagrad checks each parameter as it moves it: a bad last gradient leaves a half-applied step",
           ("tests/test_optim_kernels.py", "-k", "bad_gradient_on_the_last")),
    Mutant("rowwise-mean-divided-twice", HDR,
           "const T G = *s + fe_sum_squares##SUF(g, n) / (T)n;",
           "const T G = *s + fe_sum_squares##SUF(g, n) / (T)n / (T)n;",
           "row-wise Adagrad (fe_rowwise_row) divides the sum of squares by D twice",
           ("tests/test_optim_kernels.py", "-k", "rowwise or RowWise")),
    Mutant("rowwise-sum-not-mean", HDR,
           "const T G = *s + fe_sum_squares##SUF(g, n) / (T)n;",
           "const T G = *s + fe_sum_squares##SUF(g, n);",
           "row-wise Adagrad (fe_rowwise_row) accumulates the sum of squares, not the mean",
           ("tests/test_optim_kernels.py", "-k", "rowwise or RowWise")),
    Mutant("rowwise-sum-pairwise", HDR,
           "for (ptrdiff_t d = 0; d < n; d++) acc += g[d] * g[d];",
           "T odd = (T)0; ptrdiff_t d = 0; "
           "for (; d + 1 < n; d += 2) { acc += g[d] * g[d]; odd += g[d + 1] * g[d + 1]; } "
           "if (d < n) acc += g[d] * g[d]; acc += odd;",
           "the row's sum of squares in two interleaved partial sums (what a vectoriser would do): not column order",
           ("tests/test_optim_kernels.py", "-k", "column_order")),
    Mutant("update-every-thread-every-row", OPTIM_PXI,
           "        _update_rows(kind, w, s, s2, g, D, S, rows, lo, hi, h,",
           "        _update_rows(kind, w, s, s2, g, D, S, rows, 0, U, h,",
           "each thread of a *_step kernel's team updates every row, not its share: rows move twice",
           ("tests/test_optim_kernels.py", "-k", "threaded or transcription or old_numpy"), threads=True),
    # ---------------------------------------------------------------- fused rules and layers (issue 9, item 3)
    Mutant("fused-adagrad-decay-from-first-step", OPTIM,
           "clr, eps = self.lr / (1 + (t - 1) * self.lr_decay), self.eps",
           "clr, eps = self.lr / (1 + t * self.lr_decay), self.eps",
           "FusedAdagrad decays the lr from its first step (Adagrad's first step uses lr itself)",
           (FUSED, "-k", "fused_embedding_equals or empty_update")),
    Mutant("fused-adagrad-step-frozen", OPTIM,
           "            _kernels.adagrad_scatter(weight, state_sum, ids, grad_out, clr, eps, skip, _format=_format)\n"
           "            step[()] = t\n",
           "            _kernels.adagrad_scatter(weight, state_sum, ids, grad_out, clr, eps, skip, _format=_format)\n",
           "FusedAdagrad never advances the table's step count: lr_decay never applies",
           (FUSED, "-k", "adagrad")),
    Mutant("fused-adam-step-frozen", OPTIM,
           "1 - b1**t, 1 - b2**t, skip,\n                                  _format=_format)\n            step[()] = t\n",
           "1 - b1**t, 1 - b2**t, skip,\n                                  _format=_format)\n",
           "FusedSparseAdam never advances the step count: every update is bias-corrected as the first",
           (FUSED, "-k", "adam and (equals or untouched)")),
    Mutant("fused-adam-bias-swapped", OPTIM,
           "1 - b1**t, 1 - b2**t, skip,\n",
           "1 - b2**t, 1 - b1**t, skip,\n",
           "FusedSparseAdam passes the two bias corrections in the wrong order",
           (FUSED, "-k", "fused_embedding_equals or threaded")),
    Mutant("fused-empty-update-no-step", OPTIM,
           "        ids, skip = _lookups(weight, ids, padding_idx, _format)\n        (b1, b2)",
           "        ids, skip = _lookups(weight, ids, padding_idx, _format)\n"
           "        if not ids.size:\n            return lambda: None\n        (b1, b2)",
           "FusedSparseAdam skips an update that touches no row, step count included (SparseAdam counts it)",
           (FUSED, "-k", "empty_update and adam")),
    Mutant("fused-rowwise-eps-dropped", OPTIM,
           "            _kernels.rowwise_adagrad_scatter(weight, state_sum, ids, grad_out, lr, eps, skip, _format=_format)",
           "            _kernels.rowwise_adagrad_scatter(weight, state_sum, ids, grad_out, lr, 0.0, skip, _format=_format)",
           "FusedRowWiseAdagrad forgets eps in the update",
           (FUSED, "-k", "fused_embedding_equals or threaded")),
    Mutant("fused-padding-kept", OPTIM,
           "    return _ops.as_ids(ids), -1 if pad is None else pad", "    return _ops.as_ids(ids), -1",
           "the coalescing rules update the padding_idx row like any other",
           (FUSED, "-k", "padding")),
    Mutant("fused-negative-padding-not-normalised", OPTIM,
           "    return int(padding_idx) % num_rows", "    return int(padding_idx)",
           "a negative padding_idx is compared with the ids as given (torch counts it from the end)",
           (FUSED, "-k", "padding")),
    Mutant("fused-check-only-moves", OPTIM,
           "        if not check_only:\n            apply()", "        if True:\n            apply()",
           "update(check_only=True) applies the step",
           (FUSED, "-k", "check_only")),
    Mutant("fused-step-count-read-only-unchecked", OPTIM,
           "    if not step.flags.writeable:", "    if False:",
           "a read-only step count is found only when it is written, after the weight moved",
           (FUSED, "-k", "read_only")),
    Mutant("fused-initial-accumulator-unchecked", OPTIM,
           '_check_nonnegative(self, "lr_decay", "initial_accumulator_value", "eps")',
           '_check_nonnegative(self, "lr_decay", "eps")',
           "FusedAdagrad accepts a negative initial_accumulator_value",
           (FUSED, "-k", "out_of_range")),
    Mutant("fused-token-position-moves-before-checking", NN,
           "            move_token = self.token.fused._prepare(self.token.weight, self.token.state, ids, grad_hidden)\n",
           "            self.token.fused.update(self.token.weight, self.token.state, ids, grad_hidden)\n"
           "            move_token = lambda: None\n",
           "the fused TokenPositionEmbedding moves the token table before it checks the position update",
           (FUSED, "-k", "token_position and bad")),
    Mutant("fused-with-sparse-accepted", NN,
           '    if sparse:\n        raise ValueError("a fused', '    if False:\n        raise ValueError("a fused',
           "a layer accepts fused= together with sparse=True",
           (FUSED, "-k", "sparse_together")),
    Mutant("fused-pretrained-state-of-the-placeholder", NN,
           "        layer.state = None if fused is None else fused.new_state(weight)\n", "",
           "Embedding.from_pretrained keeps the state made for its (0, 0) placeholder table",
           (FUSED, "-k", "own_weight")),
    Mutant("fused-sgd-fma-dropped", OPTIM,
           "_kernels.sgd_scatter(weight, _ops.as_ids(ids), grad_out, self.lr, fma=self.fma, _format=_format)",
           "_kernels.sgd_scatter(weight, _ops.as_ids(ids), grad_out, self.lr, _format=_format)",
           "FusedSGD's plain update forgets fma=True (numpy's two roundings instead of torch's one)",
           (FUSED, "-k", "sgd and (transcription or torch)")),
    Mutant("fused-sgd-padding-kept", OPTIM,
           "        if pad is not None:\n            keep = ids != pad", "        if False:\n            keep = ids != pad",
           "FusedSGD moves the padding_idx row like any other",
           (FUSED, "-k", "sgd and transcription")),
    # ---------------------------------------------------------------- torch/optim.py (issue 9, item 2)
    Mutant("topt-sgd-sparse-two-roundings", TORCH_OPTIM,
           "_kernels.sgd_scatter(w, ids, values, lr, fma=True, check_only", "_kernels.sgd_scatter(w, ids, values, lr, check_only",
           "the drop-in SGD rounds lr * g before subtracting (numpy's way) for a sparse gradient: not torch's bits",
           (T_OPTIM, "-k", "matches_torch_optim and SGD and not dense"), quick=True),
    Mutant("topt-sgd-dense-two-roundings", TORCH_OPTIM,
           "_kernels.sgd_step(w, values, None, lr, check_only, fma=True, _format=fmt)",
           "_kernels.sgd_step(w, values, None, lr, check_only, _format=fmt)",
           "the drop-in SGD rounds lr * g before subtracting for a dense gradient: not torch's bits",
           (T_OPTIM, "-k", "matches_torch_optim and SGD and dense")),
    Mutant("topt-sgd-coalesces-first", TORCH_OPTIM,
           "_kernels.sgd_scatter(w, ids, values, lr, fma=True, check_only=check_only, _format=fmt)",
           "_kernels.sgd_step(w, *_kernels.coalesce(ids, values, _format=fmt)[::-1], lr, check_only, fma=True, "
           "_format=fmt)",
           "the drop-in SGD sums duplicate rows before the update (torch applies them one at a time)",
           (T_OPTIM, "-k", "uncoalesced")),
    Mutant("topt-trusts-uncoalesced", TORCH_OPTIM,
           "    return None if ids is None or coalesced else (ids, values)",
           "    return None if ids is None or True else (ids, values)",
           "an uncoalesced sparse gradient goes to the row kernels as it is (repeated, unsorted rows)",
           (T_OPTIM, "-k", "matches_torch_optim and stock")),
    Mutant("topt-momentum-on-the-kernel", TORCH_OPTIM,
           "        if (lr is None or group[\"momentum\"] != 0 or", "        if (lr is None or",
           "SGD with momentum runs the plain SGD kernel (momentum ignored) instead of torch's",
           (T_OPTIM, "-k", "torchs_own")),
    Mutant("topt-amsgrad-on-the-kernel", TORCH_OPTIM,
           " or group[\"amsgrad\"] or group[\"maximize\"]", " or group[\"maximize\"]",
           "Adam with amsgrad runs the plain Adam kernel instead of torch's",
           (T_OPTIM, "-k", "torchs_own")),
    Mutant("topt-strided-table-on-the-kernel", TORCH_OPTIM,
           "and t.dim() == 2 and t.is_contiguous())", "and t.dim() == 2)",
           "a non-contiguous parameter is handed to the kernels (which refuse it mid-step)",
           (T_OPTIM, "-k", "cannot_take")),
    Mutant("topt-no-check-pass", TORCH_OPTIM,
           "            for job in jobs:  # every kernel update checked before any moves\n                job(True)\n",
           "",
           "no checking pass: a bad gradient on the last table raises after the others moved",
           (T_OPTIM, "-k", "outside_the_table"), quick=True),
    Mutant("topt-grads-not-hidden", TORCH_OPTIM,
           "        for p in kernel_params:\n            p.grad = None\n",
           "        for p in kernel_params:\n            pass\n",
           "torch's step also sees the kernel parameters' gradients: those tables move twice",
           (T_OPTIM, "-k", "cannot_take")),
    Mutant("topt-hooks-twice", TORCH_OPTIM,
           "        step = step.__wrapped__\n", "        pass\n",
           "torch's hooked step runs the step hooks a second time",
           (T_OPTIM, "-k", "hooks")),
    Mutant("topt-nan-lr-allowed", TORCH_OPTIM,
           "        if not value >= 0:", "        if value < 0:",
           "a NaN lr set on a param_group is not refused: the step writes NaN everywhere",
           (T_OPTIM, "-k", "negative_lr")),
    Mutant("topt-shape-unchecked", TORCH_OPTIM,
           "                    _check_grad_shape(p, g)\n", "",
           "a gradient of another shape (set through .data) reaches torch's update, which broadcasts it",
           (T_OPTIM, "-k", "another_shape")),
    Mutant("topt-sparseadam-eps-after-bias", TORCH_OPTIM,
           "eps / math.sqrt(bias2), bias1, bias2)", "eps, bias1, bias2)",
           "SparseAdam adds eps after the bias correction (Adam's way), not before it as torch's SparseAdam",
           (T_OPTIM, "-k", "matches_torch_optim and SparseAdam")),
    Mutant("topt-sparseadam-empty-step-uncounted", TORCH_OPTIM,
           "            state[\"step\"] += 1\n            if empty:\n                return\n",
           "            if empty:\n                return\n            state[\"step\"] += 1\n",
           "SparseAdam does not count a step with an empty gradient (torch does: later bias corrections differ)",
           (T_OPTIM, "-k", "empty_sparse")),
    Mutant("topt-adagrad-decay-from-step-one", TORCH_OPTIM,
           "update(lr / (1 + (step.item() - 1) * lr_decay), eps)", "update(lr / (1 + step.item() * lr_decay), eps)",
           "the drop-in Adagrad decays the lr from the first step (torch's first step uses lr itself)",
           (T_OPTIM, "-k", "matches_torch_optim and Adagrad")),
    Mutant("topt-rowwise-torch-sum-not-mean", TORCH_OPTIM,
           "state_sum.index_add_(0, rows, values.square().mean(dim=1))",
           "state_sum.index_add_(0, rows, values.square().sum(dim=1))",
           "RowWiseAdagrad's torch-ops path accumulates the row's sum of squares, not its mean",
           (T_OPTIM, "-k", "rowwise and float64")),
    # ---- issue 10, item 5: the kernels as torch custom operators (torch.compile, torch.export)
    Mutant("lib-backward-padding-row-kept", LIBRARY,
           "            table[padding_idx] = 0.0\n", "            pass\n",
           "the custom op's dense backward gives the padding row a gradient (torch gives it none)",
           (T_COMPILE, "-k", "backward_op_sums")),
    Mutant("lib-double-backward-padding-unmasked", LIBRARY,
           "        rows = rows.masked_fill((ids == ctx.padding_idx).unsqueeze(-1), 0)\n", "        pass\n",
           "the backward of the backward hands the padding row's lookups a gradient back",
           (T_COMPILE, "-k", "adjoint_is_torchs")),
    Mutant("lib-fake-flattens-ids", LIBRARY,
           "    return weight.new_empty((*ids.shape, weight.shape[1]))",
           "    return weight.new_empty((ids.numel(), weight.shape[1]))",
           "the fake lookup tells the tracer a flat (N, D) shape for ids of any shape",
           (T_COMPILE, "-k", "opcheck or compiled")),
    Mutant("lib-tp-backward-swapped-tables", LIBRARY,
           "    return token_position(token_gg, position_gg, ids, positions, ctx.start), None, None, None, None, None",
           "    return token_position(position_gg, token_gg, ids, positions, ctx.start), None, None, None, None, None",
           "the token+position double backward looks the tables' grad-grads up in each other's places",
           (T_COMPILE, "-k", "token_position_double or opcheck")),

    # ---------------------------------------------------------------- issue 10, item 1: table dtypes
    Mutant("bf16-round-truncates", HDR,
           "uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);", "uint16_t r = (uint16_t)(u >> 16);",
           "float -> bfloat16 truncates instead of rounding to nearest even",
           (DTYPES, "-k", "bfloat16_narrow"), quick=True),
    Mutant("bf16-ties-away", HDR,
           "uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);", "uint16_t r = (uint16_t)((u + 0x8000u) >> 16);",
           "float -> bfloat16 rounds ties away from zero, not to even",
           (DTYPES, "-k", "bfloat16_narrow")),
    Mutant("bf16-nan-unguarded", HDR,
           "    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : r;", "    return r;",
           "float -> bfloat16 rounds NaNs like numbers: a NaN with only low payload bits becomes inf",
           (DTYPES, "-k", "bfloat16_narrow")),
    Mutant("f16-portable-truncates", HDR,
           "        return (uint16_t)(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));",
           "        return (uint16_t)(sign | (r >> 13));",
           "the portable float -> float16 conversion truncates normal values",
           (DTYPES, "-k", "float16_narrow")),
    Mutant("f16-portable-flushes-subnormals", HDR,
           "    if (a < 0x33000000u) return sign;", "    if (a < 0x38800000u) return sign;",
           "the portable float -> float16 conversion flushes float16 subnormals to zero",
           (DTYPES, "-k", "float16_narrow")),
    Mutant("f16c-tail-dropped", HDR,
           "    _mm_storeu_si128((__m128i *)tmp, h);\n    memcpy(p, tmp, (size_t)n * 2);",
           "    _mm_storeu_si128((__m128i *)tmp, h);",
           "F16C rows store nothing for the last D % 8 columns",
           (DTYPES, "-k", "gather_add_rounds_once and float16")),
    Mutant("f16c-rounds-toward-zero", HDR,
           "_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)",
           "_mm256_cvtps_ph(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC)",
           "the F16C float -> float16 conversion truncates (rounding mode toward zero); needs a CPU with F16C",
           (DTYPES, "-k", "float16_narrow")),
    Mutant("f64-adds-in-float32", HDR,
           "const double *FE_RESTRICT s, ptrdiff_t n) {\n    for (ptrdiff_t d = 0; d < n; d++) g[d] += s[d];",
           "const double *FE_RESTRICT s, ptrdiff_t n) {\n    for (ptrdiff_t d = 0; d < n; d++) g[d] = (float)g[d] + (float)s[d];",
           "the float64 scatter-add accumulates in float32",
           (DTYPES, "-k", "scatter_add_rounds_each_add and float64")),
    Mutant("half-coalesce-rounds-each-add", PYX,
           "    cdef bint half = fmt == FMT_F16 or fmt == FMT_BF16\n"
           "    cdef int acc_fmt = FMT_F64 if fmt == FMT_F64 else FMT_F32\n",
           "    cdef bint half = False\n    cdef int acc_fmt = fmt\n",
           "coalesce sums float16 and bfloat16 rows in their own type (rounded after each add, not once)",
           (DTYPES, "-k", "coalesce_sums_in_float32")),
    Mutant("uint16-taken-as-bf16", COMMON,
           '        if t >= NPY_USERDEF and cnp.PyArray_ITEMSIZE(arr) == 2 and arr.dtype.name == "bfloat16":',
           '        if t == cnp.NPY_UINT16 or (t >= NPY_USERDEF and arr.dtype.name == "bfloat16"):',
           "a uint16 array is silently read as bfloat16",
           (DTYPES, "-k", "refused_dtypes")),
    Mutant("dtype-match-by-size", COMMON,
           "    if cnp.PyArray_TYPE(arr) != cnp.PyArray_TYPE(ref) or not cnp.PyArray_ISNOTSWAPPED(arr):",
           "    if cnp.PyArray_ITEMSIZE(arr) != cnp.PyArray_ITEMSIZE(ref) or not cnp.PyArray_ISNOTSWAPPED(arr):",
           "the arrays of a call are matched by element size: float16 out for a bfloat16 table is accepted",
           (DTYPES, "-k", "mismatched_dtypes")),
]


# ---------------------------------------------------------------- issue 10: max_norm's renorm kernel, and
# fastembed.torch.Embedding / functional.embedding with every option of torch's
NORM_PXI = "fastembed/_norm.pxi"
KERNEL_FILES += (NORM_PXI,)  # included by _kernels.pyx: compiled into the extension, so its mutants rebuild
DROPIN = "tests/test_torch_embedding_dropin.py"
MUTANTS += [
    Mutant("renorm-scales-rows-below", NORM_PXI,
           "        if norm > max_norm:\n", "        if norm != max_norm:\n",
           "renorm scales every row whose norm is not max_norm: rows below it are scaled up",
           (DROPIN, "-k", "renorm_kernel_against_reference"), quick=True),
    Mutant("renorm-no-epsilon", NORM_PXI,
           "scale = <float>(max_norm / (norm + 1e-7))", "scale = <float>(max_norm / norm)",
           "renorm's factor misses torch's + 1e-7 in the denominator",
           (DROPIN, "-k", "renorm_empty_ids_and_exact_values or renorm_kernel_against_reference")),
    Mutant("renorm-norm-kept-double", NORM_PXI,
           "norm = <double><float>_row_norm(row, D, kind, p)", "norm = _row_norm(row, D, kind, p)",
           "renorm compares and divides by the double norm, not torch's float32 one: other factors",
           (DROPIN, "-k", "renorm_kernel_against_reference")),
    Mutant("renorm-last-distinct-row-skipped", NORM_PXI,
           "        _renorm_rows(table, D, rows, 0, U, max_norm, kind, p)\n",
           "        _renorm_rows(table, D, rows, 0, U - 1, max_norm, kind, p)\n",
           "the serial renorm loop stops one distinct row early (the largest id is never renormalised)",
           (DROPIN, "-k", "renorm_kernel_against_reference or renorm_empty_ids")),
    Mutant("renorm-thread-split-drops-a-row", NORM_PXI,
           "_renorm_rows(table, D, rows, _part(U, k, nthreads), _part(U, k + 1, nthreads), max_norm, kind, p)",
           "_renorm_rows(table, D, rows, _part(U, k, nthreads), _part(U, k + 1, nthreads) - (k == 0), max_norm, kind, p)",
           "the threaded renorm's first thread stops one row before its part ends",
           ("tests/test_renorm_dtypes.py", "-k", "two_threads"), threads=True),
    Mutant("renorm-range-unchecked", NORM_PXI,
           '    _check_range(idx, "ids", V, "table")\n    # The distinct ids',
           "    # The distinct ids",
           "renorm does not range-check the ids: id == rows or -1 is scaled out of bounds",
           (DROPIN, "-k", "renorm_rejects_an_id_out_of_range")),
    Mutant("renorm-inf-as-p", NORM_PXI,
           '    if p == float("inf"):\n        return NORM_MAX', '    if p == float("inf"):\n        return NORM_P',
           "norm_type inf goes through the general p formula (pow(|x|, inf)), not max |x|",
           (DROPIN, "-k", "renorm_kernel_against_reference")),
    Mutant("renorm-p-root-missing", NORM_PXI,
           "    return c_pow(acc, 1.0 / p)", "    return acc",
           "the general p-norm forgets the 1/p root (sum |x|^p)",
           (DROPIN, "-k", "renorm_kernel_against_reference")),
    Mutant("renorm-nan-max-norm-accepted", NORM_PXI,
           "    if not max_norm >= 0:", "    if max_norm < 0:",
           "renorm accepts a NaN max_norm (nothing is ever scaled, silently)",
           (DROPIN, "-k", "renorm_bad_arguments")),
    Mutant("ref-renorm-no-epsilon", REF,
           "scale = _float32(max_norm / (norm + 1e-7))", "scale = _float32(max_norm / norm)",
           "the reference renorm misses the + 1e-7 (the kernel is checked against it bitwise)",
           (DROPIN, "-k", "renorm_kernel_against_reference")),
    Mutant("tdrop-padding-negative-kept", TORCH,
           "            padding_idx = num_embeddings + padding_idx\n", "",
           "a negative padding_idx is not normalised (torch stores num_embeddings + padding_idx)",
           (DROPIN, "-k", "padding_idx_positive_negative or extra_repr"), quick=True),
    Mutant("tdrop-padding-error-type", TORCH,
           "            if padding_idx >= num_embeddings:\n                raise AssertionError(_PADDING_MESSAGE)",
           "            if padding_idx >= num_embeddings:\n                raise ValueError(_PADDING_MESSAGE)",
           "padding_idx >= num_embeddings raises ValueError where torch raises AssertionError",
           (DROPIN, "-k", "padding_idx")),
    Mutant("tdrop-default-dtype-ignored", TORCH,
           "torch.empty((num_embeddings, embedding_dim), device=device, dtype=dtype),",
           "torch.empty((num_embeddings, embedding_dim), device=device, dtype=dtype or torch.float32),",
           "the weight is float32 whatever torch.get_default_dtype() says",
           (DROPIN, "-k", "default_dtype or from_pretrained_options")),
    Mutant("tdrop-max-norm-ignored-on-kernels", TORCH,
           "            _renorm(weight, table, input, max_norm, norm_type)\n", "            pass\n",
           "max_norm is ignored on the kernel path (float32 CPU tables)",
           (DROPIN, "-k", "max_norm")),
    Mutant("tdrop-renorm-after-lookup", TORCH,
           "        if max_norm is not None:\n            _renorm(weight, table, input, max_norm, norm_type)\n"
           "        if sparse and weight.requires_grad and torch.is_grad_enabled():\n"
           "            return _sparse_lookup(weight, table, input, padding_idx)\n"
           "        return _EmbeddingFunction.apply(weight, input, table, padding_idx, sparse, fused, bool(scale_grad_by_freq))\n",
           "        if sparse and weight.requires_grad and torch.is_grad_enabled():\n"
           "            out = _sparse_lookup(weight, table, input, padding_idx)\n"
           "        else:\n"
           "            out = _EmbeddingFunction.apply(weight, input, table, padding_idx, sparse, fused,\n"
           "                                           bool(scale_grad_by_freq))\n"
           "        if max_norm is not None:\n            _renorm(weight, table, input, max_norm, norm_type)\n"
           "        return out\n",
           "the rows are renormalised after the lookup: the output has the old rows (torch's the new ones)",
           (DROPIN, "-k", "max_norm")),
    Mutant("tdrop-version-not-bumped", TORCH,
           "                     float(norm_type))\n    torch.autograd.graph.increment_version(weight)\n",
           "                     float(norm_type))\n",
           "the in-place renorm does not move the weight's version counter (torch's does)",
           (DROPIN, "-k", "renorm_kernel_and_moves_the_version")),
    Mutant("tdrop-scale-grad-by-freq-ignored", TORCH,
           "        return _EmbeddingFunction.apply(weight, input, table, padding_idx, sparse, fused, bool(scale_grad_by_freq))",
           "        return _EmbeddingFunction.apply(weight, input, table, padding_idx, sparse, fused, False)",
           "scale_grad_by_freq is ignored for float32 CPU tables (the backward does not scale)",
           (DROPIN, "-k", "scale_grad_by_freq")),
    # (the same edit against tests/test_scale_grad_by_freq.py: sgbf-apply-drops-flag)
    Mutant("tdrop-repr-norm-type-always", TORCH,
           "        if self.norm_type != 2:\n", "        if self.norm_type is not None:\n",
           "extra_repr shows norm_type=2.0 where torch's leaves the default out",
           (DROPIN, "-k", "extra_repr")),
    Mutant("tdrop-weight-shape-unchecked", TORCH,
           "            if list(_weight.shape) != [num_embeddings, embedding_dim]:\n",
           "            if list(_weight.shape)[1:] != [embedding_dim]:\n",
           "_weight's row count is not checked against num_embeddings",
           (DROPIN, "-k", "weight_and_freeze")),
    Mutant("tdrop-weight-freeze-ignored", TORCH,
           "            self.weight = torch.nn.Parameter(_weight, requires_grad=not _freeze)",
           "            self.weight = torch.nn.Parameter(_weight)",
           "_freeze is ignored for a given _weight (from_pretrained's tables are trainable)",
           (DROPIN, "-k", "weight_and_freeze or from_pretrained_freeze")),
    Mutant("tdrop-index-error-words", TORCH,
           'raise IndexError(f"index out of range in self: {exc}") from None', "raise",
           "an out-of-range id's IndexError lacks torch's words, which code and torch's tests match",
           (DROPIN, "-k", "error_inputs or bad_id")),
]

# ---------------------------------------------------------------- embedding bags (issue 10, items 6 and 7)
# The _bag_*.pxi files are compiled into the extension: their mutants rebuild (Mutant.kernel reads KERNEL_FILES
# when asked).
BAG_COMMON, BAG_FORWARD, BAG_BACKWARD, BAG_WEIGHTS_GRAD = (
    "fastembed/_bag_common.pxi", "fastembed/_bag_forward.pxi", "fastembed/_bag_backward.pxi",
    "fastembed/_bag_weights_grad.pxi")
BAG = "tests/test_bag.py"
KERNEL_FILES = KERNEL_FILES + (BAG_COMMON, BAG_FORWARD, BAG_BACKWARD, BAG_WEIGHTS_GRAD)
MUTANTS += [
    Mutant("bag-mean-counts-padding", BAG_FORWARD,
           "            if r == pad:\n                continue\n            if mode == BAG_MAX:",
           "            if r == pad:\n                count += mode == BAG_MEAN\n                continue\n"
           "            if mode == BAG_MAX:",
           "a mean bag divides by its length with the padding ids in it (torch leaves them out of the count)",
           (BAG, "-k", "transcription or padding_idx_range or hand_computed"), quick=True),
    Mutant("bag-max-ties-last", HDR,
           "        if (a[d] > out[d]) {", "        if (a[d] >= out[d]) {",
           "max mode keeps the last of equal values (torch keeps the first: its argmax, and so its gradient, differ)",
           (BAG, "-k", "forward_matches_transcription or hand_computed")),
    Mutant("bag-offsets-past-end", BAG_COMMON,
           "        if x > N:\n", "        if x > N + 1:\n",
           "an offset of len(ids) + 1 passes the check (the last bag would read one id past the end)",
           (BAG, "-k", "bad_offsets")),
    Mutant("bag-offsets-decreasing-unchecked", BAG_COMMON,
           "        if k > 0 and x < offs[k - 1]:", "        if False and x < offs[k - 1]:",
           "decreasing offsets are not refused",
           (BAG, "-k", "bad_offsets")),
    Mutant("bag-psw-any-mode", BAG_COMMON,
           "    if mode != BAG_SUM:\n        name =", "    if False:\n        name =",
           "per_sample_weights are accepted with mode mean or max (torch refuses them) and silently ignored",
           (BAG, "-k", "per_sample_weights_need_sum")),
    Mutant("bag-max-backward-empty-bag-to-row-0", BAG_BACKWARD,
           "            if _bag_kept(ids, lo, hi, pad) == 0:\n                continue",
           "            if False:\n                continue",
           "max mode's backward sends an empty bag's gradient to its argmax, row 0 (torch sends it nowhere)",
           (BAG, "-k", "dense_backward_matches_transcription or match_torch or hand_computed")),
    Mutant("bag-threads-last-bag-dropped", BAG_COMMON,
           "    if k == parts:\n        return B\n", "    if k == parts:\n        return B - 1\n",
           "on the threaded path no thread owns the last bag: its output row is never written",
           (BAG, "-k", "threaded"), threads=True),
    Mutant("bag-ops-2d-psw-not-flattened", OPS,
           "            per_sample_weights = per_sample_weights.reshape(-1)\n", "",
           "2-D ids are flattened but their per_sample_weights are not (the kernel refuses them)",
           (BAG, "-k", "two_dimensional")),
    Mutant("bag-nn-sparse-drops-weights", NN,
           "mode=self.mode,\n                                                       per_sample_weights=weights, **bags)",
           "mode=self.mode,\n                                                       **bags)",
           "a sparse EmbeddingBag layer ignores per_sample_weights in the table's gradient",
           (BAG, "-k", "layer_sparse_and_dense")),
    Mutant("bag-nn-padding-row-kept", NN,
           "        if self.padding_idx is not None:\n            self.weight[self.padding_idx] = 0.0\n", "",
           "a new EmbeddingBag's padding row is not zeroed (torch's constructor zeroes it)",
           (BAG, "-k", "layer_options")),
    Mutant("bag-reference-max-ties-last", REF,
           "            if weight[ids[k]][d].data > best.data:", "            if weight[ids[k]][d].data >= best.data:",
           "the reference's max keeps the last of equal values: its gradient goes to another row",
           (BAG, "-k", "reference_forward_and_gradients or reference_max_ties")),

    # ---- issue 10: the torch modules compiled and exported, double backward, EmbeddingBag
    Mutant("lib-traced-lookup-is-torchs", TORCH,
           "    return _library.embedding(weight, input, -1 if padding_idx is None else padding_idx)",
           "    return torch.nn.functional.embedding(input, weight, padding_idx)",
           "a compiled Embedding is traced as torch's lookup, not fastembed's op (the kernels never run)",
           (T_COMPILE, "-k", "call_fastembeds_ops or export")),
    Mutant("lib-eager-create-graph-not-differentiable", TORCH,
           "        if torch.is_grad_enabled() and ctx.fused is None:",
           "        if False:",
           "backward(create_graph=True) through Embedding gives a constant gradient: double backward is silently 0",
           (T_COMPILE, "-k", "eager_double_backward")),
    Mutant("lib-eager-tp-create-graph-not-differentiable", TORCH,
           "        if torch.is_grad_enabled() and not ctx.sparse and ctx.fused is None:",
           "        if False:",
           "the token+position layer's double backward is silently 0",
           (T_COMPILE, "-k", "eager_token_position_double")),
    Mutant("tbag-renorm-before-checks", TORCH_BAG,
           "        ops.embedding_bag(table, idn, None if offsets is None else offsets.numpy(), mode=mode,",
           "        0 and ops.embedding_bag(table, idn, None if offsets is None else offsets.numpy(), mode=mode,",
           "EmbeddingBag(max_norm) renormalises the rows before the offsets are checked: a bad call changes the weight",
           (T_BAG, "-k", "bad_calls and 0.5")),
    Mutant("tbag-sparse-grad-coalesced", TORCH_BAG,
           "                                                      check_invariants=False)",
           "                                                      check_invariants=False).coalesce()",
           "the sparse bag gradient is coalesced: not torch's layout (one entry per lookup, in ids order)",
           (T_BAG, "-k", "layout")),
    Mutant("tbag-fused-drops-weights", TORCH_BAG,
           "                rule, buffers = ctx.fused\n                index, values = ops.embedding_bag_grad_rows(rows, "
           "ctx.ids, ctx.offsets, g, per_sample_weights=ctx.psw,",
           "                rule, buffers = ctx.fused\n                index, values = ops.embedding_bag_grad_rows(rows, "
           "ctx.ids, ctx.offsets, g, per_sample_weights=None,",
           "a fused bag updates from unweighted rows, ignoring per_sample_weights",
           (T_BAG, "-k", "fused and True")),
    Mutant("tbag-psw-grad-after-update", TORCH_BAG,
           "        if ctx.needs_input_grad[1]:  # first",
           "        if False:  # first",
           "per_sample_weights get no gradient (or, moved after the fused update, one from the moved rows)",
           (T_BAG, "-k", "fused and True")),
    Mutant("torch-dtypes-float32-only", LIBRARY,
           "_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16)\n",
           "_KERNEL_DTYPES = (torch.float32,)\n",
           "float64 and float16 tables never reach the kernels (torch's path serves them all)",
           ("tests/test_torch_embedding_dropin.py", "-k", "every_float_dtype")),
    Mutant("torch-dense-grad-float32", TORCH,
           "        grad = np.zeros(ctx.table.shape, dtype=ctx.table.dtype)\n",
           "        grad = np.zeros(ctx.table.shape, dtype=np.float32)\n",
           "the dense gradient of a float64 or float16 table is made float32",
           ("tests/test_torch_embedding_dropin.py", "-k", "every_float_dtype")),
]

# this session's fixes in fastembed.torch: the fused update told to autograd, positions copied, dtypes
MUTANTS += [
    Mutant("torch-fused-update-unseen", TORCH,
           "            _moved(ctx.weight)\n", "            pass\n",
           "a fused Embedding's update is not told to autograd: a penalty on the table reads the moved rows",
           ("tests/test_torch_fused.py", "-k", "saved_a_fused")),
    Mutant("tbag-fused-update-unseen", TORCH_BAG,
           "                _moved(ctx.weight)\n", "                pass\n",
           "a fused EmbeddingBag's update is not told to autograd: a penalty on the table reads the moved rows",
           ("tests/test_torch_fused.py", "-k", "saved_a_fused")),
    Mutant("positions-array-aliases", OPS,
           "        return positions.copy()\n", "        return positions\n",
           "positions_array returns the caller's positions: a sparse gradient's indices alias them",
           ("tests/test_torch_adapter.py", "-k", "warns_nothing")),
    Mutant("tpe-dtype-ignored", TORCH,
           "        self.token = Embedding(vocab_size, embedding_dim, sparse=sparse, fused=fused, dtype=dtype)",
           "        self.token = Embedding(vocab_size, embedding_dim, sparse=sparse, fused=fused, dtype=torch.float32)",
           "TokenPositionEmbedding(dtype=float64) makes a float32 token table",
           ("tests/test_torch_adapter.py", "-k", "each_dtype")),
]

# ---------------------------------------------------------------- the sharded table's module (issue 11, items 1 and 3)
SHARDED, T_SHARDED = "fastembed/torch/distributed.py", "tests/test_sharded_embedding.py"
MUTANTS += [
    Mutant("sharded-duplicates-overwrite", SHARDED,
           "    _library._scatter_add(summed, plan.inverse, grad_out)\n",
           "    summed[plan.inverse.reshape(-1)] = grad_out.reshape(-1, dim)\n",
           "a rank's gradient rows of a repeated id overwrite each other instead of summing before they are sent",
           (T_SHARDED, "-k", "same_answer and dups_w4")),
    Mutant("sharded-dense-padding-grad", SHARDED,
           "        grad[padding_row] = 0  # as nn.Embedding: the padding row gets no gradient (+0.0: zero bits)\n",
           "        pass\n",
           "the owner of padding_idx gives its row a dense gradient",
           (T_SHARDED, "-k", "same_answer and distinct_w4")),
    Mutant("sharded-sparse-padding-entries", SHARDED,
           "            keep = index[0] != padding_row\n", "            keep = index[0] >= 0\n",
           "a sparse block gradient keeps the entries of padding_idx",
           (T_SHARDED, "-k", "sparse_dups_w4")),
    Mutant("sharded-block-aliases-weight", SHARDED,
           "            self.weight = torch.nn.Parameter(block.clone(memory_format=torch.contiguous_format))\n",
           "            self.weight = torch.nn.Parameter(block.contiguous())\n",
           "the block is a view of the _weight given (contiguous() copies nothing): an optimizer step writes into it",
           (T_SHARDED, "-k", "same_answer and distinct_w4")),
    Mutant("sharded-global-rank", SHARDED,
           "        rank, world_size = dist.get_rank(group), dist.get_world_size(group)\n",
           "        rank, world_size = dist.get_rank(), dist.get_world_size(group)\n",
           "a subgroup's member takes the block of its global rank, not its rank in the group",
           (T_SHARDED, "-k", "same_answer and pair13_distinct")),
    Mutant("sharded-plan-on-module", SHARDED,
           "        ctx.plan, ctx.module, ctx.shape, ctx.dtype = plan, module, block.shape, weight.dtype\n",
           "        ctx.plan, ctx.module, ctx.shape, ctx.dtype = plan, module, block.shape, weight.dtype\n"
           "        module.__dict__.setdefault('_plans', []).append(plan)\n"
           "        ctx.plan = module._plans[0]\n",
           "the exchange plan is kept on the module, not per call: a backward through two lookups uses the last one's",
           (T_SHARDED, "-k", "same_answer and two_lookups")),
    Mutant("sharded-failed-rank-ignored", SHARDED,
           "        failed = [r for r in range(W) if not theirs[r, _Header.OK]]\n",
           "        failed = []\n",
           "the ranks whose ids failed are not heeded: the others go on to the next all-to-all and wait there "
           "(the group's timeout) while the failed rank raises",
           (T_SHARDED, "-k", "bad_ids")),
    Mutant("sharded-header-skips-serial", SHARDED,
           "        fields = slice(_Header.TABLE, None)\n",
           "        fields = slice(_Header.TABLE, _Header.SERIAL)\n",
           "the header's serial is not compared: the backward of one lookup meets another's",
           (T_SHARDED, "-k", "different_collectives")),
    Mutant("sharded-header-skips-shape", SHARDED,
           "        fields = slice(_Header.TABLE, None)\n",
           "        fields = slice(_Header.DTYPE, None)\n",
           "the header's table number and shape are not compared: a lookup of another table is served",
           (T_SHARDED, "-k", "different_collectives")),
    Mutant("sharded-header-skips-table-number", SHARDED,
           "        fields = slice(_Header.TABLE, None)\n",
           "        fields = slice(_Header.ROWS, None)\n",
           "the header's table number is not compared: a lookup of another table of the same shape is served",
           (T_SHARDED, "-k", "different_collectives")),
    Mutant("sharded-no-renorm", SHARDED,
           "        if module.max_norm is not None:\n",
           "        if False:\n",
           "max_norm is ignored by the sharded lookup",
           (T_SHARDED, "-k", "same_answer and max_norm_f64")),
    Mutant("sharded-renorm-before-checks", SHARDED,
           '    serial = _next(module.process_group, "lookups")\n',
           '    serial = _next(module.process_group, "lookups")\n'
           "    if module.max_norm is not None and module.rank != 2:\n"
           "        torch.embedding_renorm_(weight.detach(), torch.arange(weight.shape[0]), module.max_norm, 2.0)\n",
           "the owners renormalise before the ids are known good everywhere: a refused lookup changed the tables",
           (T_SHARDED, "-k", "bad_ids")),
    Mutant("sharded-fused-padding", SHARDED,
           "                        padding_idx=ctx.padding_row, _format=_rule_format(table))\n",
           "                        padding_idx=None, _format=_rule_format(table))\n",
           "the fused update moves the padding row",
           (T_SHARDED, "-k", "same_answer and fused_sgd")),
    Mutant("sharded-fused-per-rank-counts-lost", SHARDED,
           "            rule.update(table, _state(buffers), plan.recv_rows, _library._bits(received),\n",
           "            rule.update(table, _state(buffers), plan.recv_rows[::-1].copy(), _library._bits(received),\n",
           "the fused update pairs the received gradient rows with the wrong rows",
           (T_SHARDED, "-k", "same_answer and fused")),
    Mutant("sharded-weight-block-taken-as-table", SHARDED,
           "            elif shape == (stop - start, embedding_dim):\n                block = _weight.detach()\n",
           "            elif shape == (stop - start, embedding_dim):\n                block = _weight.detach()[:0]\n",
           "a _weight that is the rank's block is sliced like the whole table",
           (T_SHARDED, "-k", "default_init")),
    Mutant("sharded-lost-rank-hangs", SHARDED,
           "    except RuntimeError as exc:\n        raise CollectiveError(\n",
           "    except RuntimeError as exc:\n        raise exc\n        raise CollectiveError(\n",
           "a failed collective surfaces as gloo's bare RuntimeError, not a CollectiveError that says what to do",
           ("tests/test_sharded_faults.py",)),
]


# ---------------------------------------------------------------- a table sharded by rows (issue 11, item 2)
# _shard.pxi is compiled into the extension: its mutants rebuild (Mutant.kernel reads KERNEL_FILES when asked).
SHARD_PXI, PLAN = "fastembed/_shard.pxi", "tests/test_exchange_plan.py"
KERNEL_FILES = KERNEL_FILES + (SHARD_PXI,)
MUTANTS += [
    Mutant("plan-owner-bound-to-previous-rank", SHARD_PXI,
           "        if bounds[mid] <= x:\n", "        if bounds[mid] < x:\n",
           "an id equal to a rank's first row is sent to the rank before it (a strict compare in the owner search)",
           (PLAN, "-k", "dict_oracle or on_a_bound or hand_computed")),
    Mutant("plan-rows-global", SHARD_PXI,
           "        rows[p] = first[u] - bounds[r]\n", "        rows[p] = first[u]\n",
           "the plan asks owners for global ids, not their local row numbers",
           (PLAN, "-k", "dict_oracle or round_trip or hand_computed")),
    Mutant("plan-duplicates-sent-again", SHARD_PXI,
           "            if key == x:\n                slots[i] = table[2 * h + 1]\n",
           "            if False:\n                slots[i] = table[2 * h + 1]\n",
           "the hash lookup never finds an id seen before: a repeated id is sent once per occurrence",
           (PLAN, "-k", "dict_oracle or hand_computed")),
    Mutant("plan-inverse-first-occurrence", SHARD_PXI,
           "            inverse[i] = owner[inverse[i]]\n", "            pass\n",
           "inverse indexes the distinct ids in order of first occurrence, not rows (grouped by rank)",
           (PLAN, "-k", "dict_oracle or round_trip or hand_computed")),
    Mutant("plan-range-off-by-one", SHARD_PXI,
           "    _check_range(idx, \"ids\", V, \"the sharded table\")\n",
           "    _check_range(idx, \"ids\", V + 1, \"the sharded table\")\n",
           "the entry check lets id == num_rows through (the loop then skips it: a RuntimeError, not the IndexError)",
           (PLAN, "-k", "num_rows")),
    Mutant("plan-bounds-decreasing-unchecked", SHARD_PXI,
           "        if b[r] < b[r - 1]:\n", "        if False:\n",
           "decreasing bounds are not refused (a rank would own a negative number of rows)",
           (PLAN, "-k", "bad_bounds")),
    Mutant("plan-recheck-gone", SHARD_PXI,
           "        if _outside(x, V):  # changed since the entry check", "        if False:  # changed since the entry check",
           "the loop trusts the checked ids: an id rewritten during the call is planned (rows outside their block, "
           "-1 taken for the hash table's empty mark); a race, shown about 25 times in the test's 2 s here",
           (PLAN, "-k", "rewritten")),
]

# issue 11, item 4: checkpoints of a sharded table, resharded on load
CKPT, T_CKPT = "fastembed/torch/_shard_checkpoint.py", "tests/test_sharded_checkpoint.py"
MUTANTS += [
    Mutant("ckpt-load-source-rows-from-file-start", CKPT,
           "out[(part, key)][a - start:b - start].copy_(saved[a - lo:b - lo])",
           "out[(part, key)][a - start:b - start].copy_(saved[:b - a])",
           "a load copies a saved file's first rows, not the rows that overlap its block (same shape, wrong rows)",
           (T_CKPT, "-k", "its_rows_of_the_saved_table and adam")),
    Mutant("ckpt-load-target-rows-from-block-start", CKPT,
           "out[(part, key)][a - start:b - start].copy_(saved[a - lo:b - lo])",
           "out[(part, key)][:b - a].copy_(saved[a - lo:b - lo])",
           "a load puts each overlapping file's rows at the start of its block (later files overwrite earlier)",
           (T_CKPT, "-k", "its_rows_of_the_saved_table and adam")),
    Mutant("ckpt-replicated-values-unchecked", CKPT,
           "                        if not _same_bits(a[\"state\"][key], b[\"state\"][key]):",
           "                        if a[\"state\"][key][0] != b[\"state\"][key][0]:",
           "a save compares only the kinds of the state entries: a step that differs between ranks is saved (rank 0's)",
           (T_CKPT, "-k", "unequal_replicated")),
    Mutant("ckpt-fixed-file-names", CKPT,
           "name = f\"shard-{save_id}-{rank:05d}-of-{world_size:05d}.pt\"",
           "name = f\"shard-{'0' * 32}-{rank:05d}-of-{world_size:05d}.pt\"",
           "every save writes the same file names: a save that dies has overwritten files the previous manifest names",
           (T_CKPT, "-k", "save_that_died")),
    Mutant("ckpt-checksum-unchecked", CKPT,
           "    if size != entry[\"bytes\"] or digest != entry[\"sha256\"]:",
           "    if False:",
           "a load does not compare a file's size and SHA-256 with the manifest's",
           (T_CKPT, "-k", "corrupt_file")),
    Mutant("ckpt-load-ignores-other-ranks", CKPT,
           "    _raise_if_any_failed(statuses, rank, error, \"load_sharded\")",
           "    _raise_if_any_failed([], rank, error, \"load_sharded\")",
           "a load commits on the ranks that read their rows though another rank failed (the group left half loaded)",
           (T_CKPT, "-k", "fails_to_load")),
    Mutant("ckpt-fused-buffers-not-loaded", CKPT,
           "            buffers[key].copy_(value)\n", "            pass\n",
           "a load leaves the fused rule's optim_* buffers as they were (the weight alone is loaded)",
           (T_CKPT, "-k", "its_rows_of_the_saved_table and fused_rowwise")),
    Mutant("ckpt-fused-hyperparameters-not-restored", CKPT,
           "            setattr(module.fused, k, v)\n", "            pass\n",
           "a load keeps the fused rule's own lr, not the saved one (an optimizer's param_group gets the saved lr)",
           (T_CKPT, "-k", "its_rows_of_the_saved_table and fused_adagrad")),
]

# issue 10, item 1 for the bags: the bag kernels on float64, float16 and bfloat16 tables. The first five are
# the float32 bag mutants bag-last-offset-ignored, bag-backward-mean-counts-padding, bag-sparse-mean-unscaled,
# bag-psw-grad-padding and bag-psw-grad-thread-local-bag on the fused code (their old texts are gone).
BAG_DT = "tests/test_bag_dtypes.py"
MUTANTS += [
    Mutant("bagdt-last-offset-ignored", BAG_FORWARD,
           "        return _bag_forward(table, V, D, <const int64_t*>ids, offs, L, N, B, mode, psw, pad, out, arg, scratch,",
           "        return _bag_forward(table, V, D, <const int64_t*>ids, offs, B, N, B, mode, psw, pad, out, arg, scratch,",
           "with include_last_offset the forward's last bag runs to len(ids), not to offsets[-1] (int64 ids)",
           (BAG, "-k", "forward_matches_transcription or hand_computed")),
    Mutant("bagdt-backward-mean-counts-padding", BAG_BACKWARD,
           "            inv = _bag_inv(grad, _bag_kept(ids, lo, hi, pad))",
           "            inv = _bag_inv(grad, hi - lo)",
           "the dense backward of a mean scales by 1 / (bag length), padding counted",
           (BAG, "-k", "dense_backward_matches_transcription or hand_computed")),
    Mutant("bagdt-sparse-mean-unscaled", BAG_BACKWARD,
           "                _bag_scale_row(values + j * D, g + b * D, D, inv)",
           "                memcpy(values + j * D, g + b * D, D * sizeof(elem_t))",
           "the sparse gradient of a mean bag is not divided by the count",
           (BAG, "-k", "grad_rows")),
    Mutant("bagdt-psw-grad-padding", BAG_WEIGHTS_GRAD,
           "            if r != pad:\n                _bag_dot_into(", "            if True:\n                _bag_dot_into(",
           "per_sample_weights' gradient is the dot product for padding ids too (torch gives 0)",
           (BAG, "-k", "weights_grad")),
    Mutant("bagdt-psw-grad-thread-local-bag", BAG_WEIGHTS_GRAD,
           "                _bag_dot_into(out + i, table + r * D, g + b * D, D)",
           "                _bag_dot_into(out + i, table + r * D, g + (b - b0) * D, D)",
           "per_sample_weights' gradient reads grad_out at the bag's index within the thread's range",
           (BAG, "-k", "threaded"), threads=True),
    Mutant("bagdt-dispatch-swapped", BAG_FORWARD,
           "    if fmt == FMT_F16:\n        return _bag_forward_ids(<const fe_f16*>table",
           "    if fmt == FMT_BF16:\n        return _bag_forward_ids(<const fe_f16*>table",
           "the forward's dtype dispatch sends bfloat16 tables to the float16 loop and float16 ones to the bfloat16 loop",
           (BAG_DT, "-k", "forward_matches_transcription or forward_of_a_fixed_case"), quick=True),
    Mutant("bagdt-half-accumulator-rounds", BAG_FORWARD,
           "        else:\n            fe_add_into(acc, w, n)",
           "        else:\n            for d in range(n):\n                acc[d] = _bag_round(o, acc[d] + w[d])",
           "a 16-bit bag rounds its running sum to the dtype after each add (torch sums in float32, rounds once)",
           (BAG_DT, "-k", "forward_matches_transcription or hand_computed")),
    Mutant("bagdt-mean-divides-unrounded-sum", BAG_FORWARD,
           "        _narrow_row(o, acc, n)\n        if mode == BAG_MEAN and count > 0:\n"
           "            # torch divides its 16-bit output (already rounded) by the count in the dtype, in float32\n"
           "            _widen_row(w, o, n)\n            fe_bag_div(w, n, _bag_round(o, <float>count))\n"
           "            _narrow_row(o, w, n)",
           "        if mode == BAG_MEAN and count > 0:\n            fe_bag_div(acc, n, <float>count)\n"
           "        _narrow_row(o, acc, n)",
           "a 16-bit mean divides the float32 sum before it is rounded (torch divides the rounded sum): one "
           "rounding where torch has two",
           (BAG_DT, "-k", "forward_matches_transcription or hand_computed or forward_of_a_fixed_case")),
    Mutant("bagdt-mean-count-unrounded", BAG_FORWARD,
           "            fe_bag_div(w, n, _bag_round(o, <float>count))",
           "            fe_bag_div(w, n, <float>count)",
           "a 16-bit mean divides by the exact count, not by the count in the dtype (bfloat16 rounds counts > 256)",
           (BAG_DT, "-k", "count_in_bfloat16")),
    Mutant("bagdt-half-backward-product-rounded", BAG_BACKWARD,
           "                _bag_set(dst + d, _acc_value(dst[d]) + f * _acc_value(src[d]))",
           "                _bag_set(dst + d, _acc_value(dst[d]) + _bag_round(dst, f * _acc_value(src[d])))",
           "the 16-bit dense backward of a mean or weighted bag rounds the product to the dtype before the add "
           "(torch's axpy forms it in float32)",
           (BAG_DT, "-k", "dense_backward_matches_transcription or dense_backward_of_a_fixed_case")),
    Mutant("bagdt-torch-float32-only", TORCH_BAG,
           "weight.dtype in _LOOKUP_DTYPES and weight.dim() == 2",
           "weight.dtype == torch.float32 and weight.dim() == 2",
           "fastembed.torch's bags send float64, float16 and bfloat16 weights to torch's F.embedding_bag",
           (BAG_DT, "-k", "runs_the_kernels")),
    Mutant("bagdt-torch-bf16-grad-as-bits", TORCH_BAG,
           "                weight_grad = _tensor(grad_table)",
           "                weight_grad = torch.from_numpy(grad_table)",
           "a bfloat16 bag's dense gradient is handed to autograd as its uint16 bits, not viewed back as bfloat16",
           (BAG_DT, "-k", "runs_the_kernels and bfloat16")),
    Mutant("bagdt-torch-bf16-psw-grad-format-dropped", TORCH_BAG,
           'include_last_offset=ctx.args["include_last_offset"], _format=ctx.args["_format"]))',
           'include_last_offset=ctx.args["include_last_offset"]))',
           "the per_sample_weights gradient of a bfloat16 bag calls the kernel without _format (the bits are refused)",
           (BAG_DT, "-k", "runs_the_kernels and bfloat16")),
    Mutant("first-term-copied-keeps-negative-zero", HDR,
           "    for (ptrdiff_t d = 0; d < n; d++) g[d] = 0.0f + s[d];",
           "    for (ptrdiff_t d = 0; d < n; d++) g[d] = s[d];",
           "a float32 sum's first term is copied, not added to +0.0: a bag of one -0.0 row, or an id met once "
           "with a -0.0 gradient row, sums to -0.0 (torch and the zeroed sum: +0.0)",
           (BAG, "tests/test_coalesce_first.py", "-k", "positive_zero")),
    Mutant("bag-empty-copy-first-bag-unzeroed", BAG_FORWARD,
           "        if copy_first and count == 0:\n            memset(o, 0, D * sizeof(elem_t))",
           "        if False:\n            memset(o, 0, D * sizeof(elem_t))",
           "a float32 sum or mean bag with no kept row (empty, or padding only) leaves out's old contents, not zeros",
           (BAG, "-k", "forward_into_out or positive_zero")),
    Mutant("bag-chunk-tail-of-one-row-dropped", BAG_FORWARD,
           "        if pending:\n            fe_bag_sum_ptrs(<float*>o, chunk, pending, D)",
           "        if pending > 1:\n            fe_bag_sum_ptrs(<float*>o, chunk, pending, D)",
           "a float32 bag of 2 or 16k + 2 rows: the last row, left alone in its chunk, is never added",
           (BAG, "-k", "sequential_across_chunks")),
    Mutant("bag-full-chunk-drops-its-last-row", BAG_FORWARD,
           "                if pending == BAG_CHUNK:\n                    fe_bag_sum_ptrs(<float*>o, chunk, pending, D)",
           "                if pending == BAG_CHUNK:\n                    fe_bag_sum_ptrs(<float*>o, chunk, pending - 1, D)",
           "a float32 bag of 17 rows or more (a first row, then full chunks of 16): the 16th row of each full chunk is not added",
           (BAG, "-k", "sequential_across_chunks")),
    Mutant("bag-sum32-starts-a-block-at-zero", HDR,
           "        memcpy(&a0, out + d, 32); memcpy(&a1, out + d + 8, 32);",
           "        a0 = (fe_v8f){0}; memcpy(&a1, out + d + 8, 32);",
           "the 32-column step of a float32 bag sum drops the running sum of its first 8 columns (the first row and earlier chunks)",
           (BAG, "-k", "sequential_across_chunks")),
    Mutant("bag-sum8-drops-a-chunks-last-row", HDR,
           "        for (ptrdiff_t j = 0; j < k; j++) {\n            memcpy(&b, rows[j] + d, 32);",
           "        for (ptrdiff_t j = 0; j < k - 1; j++) {\n            memcpy(&b, rows[j] + d, 32);",
           "the 8-column step of a float32 bag sum skips each chunk's last row",
           (BAG, "-k", "sequential_across_chunks")),
    Mutant("bag-sum-scalar-tail-skips-a-row", HDR,
           "    for (; d < n; d++) {\n        float a = out[d];\n        for (ptrdiff_t j = 0; j < k; j++) a += rows[j][d];",
           "    for (; d < n; d++) {\n        float a = out[d];\n        for (ptrdiff_t j = 1; j < k; j++) a += rows[j][d];",
           "the last (fewer than 8) columns of a float32 bag sum skip each chunk's first row",
           (BAG, "-k", "sequential_across_chunks")),
    Mutant("bag-pending-rows-leak-into-the-next-bag", BAG_FORWARD,
           "        count = 0\n        pending = 0\n",
           "        count = 0\n",
           "pending not reset per bag: a float32 bag's last partial chunk is added again to the next bag, and the 16-pointer chunk array overflows",
           (BAG, "-k", "sequential_across_chunks")),
    Mutant("bag-sum32-repeats-a-column-block", HDR,
           "a0 += b0; a1 += b1; a2 += b2; a3 += b3;",
           "a0 += b0; a1 += b1; a2 += b2; a3 += b2;",
           "the 32-column step of a float32 bag sum adds columns 16-23 where 24-31 belong",
           (BAG, "-k", "sequential_across_chunks")),
]


# ---------------------------------------------------------------- issue 10, item 1: renorm's dtypes
RENORM_DTYPES = "tests/test_renorm_dtypes.py"
MUTANTS += [
    Mutant("renorm-f16-table-read-as-bf16", NORM_PXI,
           "        _renorm(<fe_f16*>table, D, rows, U, max_norm, kind, p, nthreads, team)",
           "        _renorm(<fe_bf16*>table, D, rows, U, max_norm, kind, p, nthreads, team)",
           "renorm's dispatch runs a float16 table through the bfloat16 loop",
           (RENORM_DTYPES, "-k", "numpy_oracle or exact_values"), quick=True),
    Mutant("renorm-f16-norm-rounded-as-bf16", NORM_PXI,
           "            norm = fe_f16_to_float_sw(fe_float_to_f16_sw(_row_norm_half(row, D, kind, <float>p)))",
           "            norm = fe_bf16_to_float(fe_float_to_bf16(_row_norm_half(row, D, kind, <float>p)))",
           "a float16 row's norm is rounded to bfloat16, not float16",
           (RENORM_DTYPES, "-k", "numpy_oracle or many_rows")),
    Mutant("renorm-half-acc-double", NORM_PXI,
           "    cdef float acc = 0.0, a\n    cdef float lanes[8]",
           "    cdef double acc = 0.0\n    cdef float a\n    cdef float lanes[8]",
           "the float16 and bfloat16 norms are accumulated in double, not torch's float32",
           (RENORM_DTYPES, "-k", "accumulate_in_float32")),
    Mutant("renorm-half-acc-rounded-each-add", NORM_PXI,
           "            acc = acc + fabsf(_acc_value(row[j]))",
           "            acc = _acc_value(_rounded_to(row, acc + fabsf(_acc_value(row[j]))))",
           "the 1-norm of a half row is accumulated in the row's 16-bit type (rounded after each add)",
           (RENORM_DTYPES, "-k", "numpy_oracle or many_rows")),
    Mutant("renorm-half-scale-kept-float32", NORM_PXI,
           "                    scale = _acc_value(_rounded_to(row, scale))\n", "",
           "the half types' factor stays float32 (Python's t *= s), not rounded to the dtype as torch's renorm",
           (RENORM_DTYPES, "-k", "exact_values or many_rows")),
    Mutant("renorm-f64-scale-float32", NORM_PXI,
           "                wide_scale = max_norm / (norm + 1e-7)",
           "                wide_scale = <float>(max_norm / (norm + 1e-7))",
           "a float64 table is scaled by a float32 factor",
           (RENORM_DTYPES, "-k", "exact_values or many_rows")),
    Mutant("renorm-f64-tail-no-fma", NORM_PXI,
           "            acc = c_fma(row[j], row[j], acc)",
           "            acc = acc + row[j] * row[j]",
           "the float64 2-norm adds its tail columns' squares rounded, not by fused multiply-adds as torch",
           (RENORM_DTYPES, "-k", "many_rows")),
    Mutant("renorm-f64-2norm-one-lane", NORM_PXI,
           "        m = D - D % 4\n", "        m = 0\n",
           "the float64 2-norm is a plain column-order sum, not torch's four lanes",
           (RENORM_DTYPES, "-k", "many_rows or bitwise_against_torch")),
]


# issue 10, item 1: bfloat16 tables in the torch adapter (uint16 views with the kernels' _format="bfloat16")
TORCH_LIB, T_BF16 = "fastembed/torch/_library.py", "tests/test_torch_bf16.py"
MUTANTS += [
    Mutant("torch-bf16-gather-format-dropped", TORCH_LIB,
           "        return _kernels.gather(table, ops.as_ids(ids), None, _format=_BF16)",
           "        return _kernels.gather(table, ops.as_ids(ids), None)",
           "a bfloat16 lookup calls the gather without _format: its uint16 bits are refused (a TypeError)",
           (T_BF16, "-k", "bfloat16_kernels_on_the_tables_memory")),
    Mutant("torch-bf16-scatter-on-numpy-path", TORCH_LIB,
           "    if grad_table.dtype == _BITS:\n        _kernels.scatter_add(",
           "    if grad_table.dtype == np.float16:\n        _kernels.scatter_add(",
           "the dense backward of a bfloat16 table takes the ops path (no _format): a TypeError at backward",
           (T_BF16, "-k", "runs_the_bfloat16_kernels")),
    Mutant("torch-bf16-result-not-viewed-back", TORCH_LIB,
           "    return result.view(torch.bfloat16) if array.dtype == _BITS else result",
           "    return result",
           "a bfloat16 lookup returns its uint16 bits as a uint16 tensor, not viewed back as bfloat16",
           (T_BF16, "-k", "bfloat16_kernels_on_the_tables_memory")),
    Mutant("torch-bf16-view-as-float16", TORCH_LIB,
           "        tensor = tensor.view(torch.uint16)",
           "        tensor = tensor.view(torch.float16)",
           "a bfloat16 table is viewed as float16 (the kernels read its bits as another format, and it comes "
           "back float16)",
           (T_BF16, "-k", "bfloat16_kernels_on_the_tables_memory")),
    Mutant("torch-bf16-routed-to-torch", TORCH_LIB,
           "_LOOKUP_DTYPES = _KERNEL_DTYPES + (torch.bfloat16,)",
           "_LOOKUP_DTYPES = _KERNEL_DTYPES + (torch.float64,)",
           "bfloat16 tables are torch's F.embedding again (every value equal: only the spy sees it)",
           (T_BF16, "-k", "bfloat16_kernels_on_the_tables_memory"), quick=True),
    Mutant("torch-bf16-positions-not-normalised", TORCH_LIB,
           "        return _kernels.gather_add(token, position, ids, ops._as_positions(positions, ids), None, "
           "_format=_BF16)",
           "        return _kernels.gather_add(token, position, ids, positions, None, _format=_BF16)",
           "a bfloat16 token+position lookup passes a positions tensor as given, not broadcast to int64 "
           "(int32 positions refused)",
           (T_BF16, "-k", "custom_ops_are_torchs_bits")),
    Mutant("torch-renorm-float32-only", TORCH,
           "            or weight.dtype not in _LOOKUP_DTYPES)  # the renorm kernel's dtypes (bfloat16 as bits)",
           "            or weight.dtype != torch.float32)",
           "max_norm on a float64, float16 or bfloat16 table leaves the kernels for torch's whole lookup",
           (DROPIN, "-k", "every_kernel_dtype")),
    Mutant("torch-bf16-renorm-format-dropped", TORCH_LIB,
           "        _kernels.renorm(table, ops.as_ids(ids), max_norm, norm_type, _format=_BF16)",
           "        _kernels.renorm(table, ops.as_ids(ids), max_norm, norm_type)",
           "max_norm on a bfloat16 table hands the kernel its bits without _format: refused as uint16",
           (T_BF16, "-k", "max_norm")),
]


# ---------------------------------------------------------------- running


def _ignore(directory, names):
    """What a copy of the tree leaves out: VCS data, build products, caches, bench results."""
    skip = set()
    for name in names:
        if (name in {".git", "build", "dist", "__pycache__", ".hypothesis", ".pytest_cache", ".mypy_cache",
                     ".ruff_cache"} or name.endswith((".egg-info", ".so", ".pyd", ".pyc"))
                or name.startswith(".venv") or name in ("_kernels.c", "_kernels.html")
                or (name == "results" and Path(directory).name == "bench")):
            skip.add(name)
    return skip


def _run(cmd, cwd, timeout, env):
    """(returncode or None on timeout, output); the whole process group is killed on timeout."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def _count(path, text):
    return Path(path).read_text().count(text)


def _apply(mutant, tree):
    """Plant the mutant in tree; False when its text is not there exactly once."""
    path = Path(tree) / mutant.file
    source = path.read_text()
    if source.count(mutant.old) != 1:
        return False
    path.write_text(source.replace(mutant.old, mutant.new))
    return True


def _build(python, tree, env):
    return _run([python, "setup.py", "build_ext", "--inplace", "-q", "--force"], tree, BUILD_TIMEOUT, env)


def _check_imports_copy(python, tree, env):
    """None when `import fastembed` in tree loads tree's package and extension; else what it loaded."""
    code = "import fastembed, fastembed._kernels as k; print(fastembed.__file__); print(k.__file__)"
    rc, out = _run([python, "-c", code], tree, 120, env)
    lines = out.strip().splitlines()
    root = os.path.realpath(tree)
    if rc != 0 or len(lines) < 2 or not all(os.path.realpath(p).startswith(root + os.sep) for p in lines[-2:]):
        return out.strip() or f"exit status {rc}"
    return None


def _pytest_cmd(python, seed, args):
    return [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}", *args]


def _failed_tests(out):
    """The test ids pytest's summary names as failed or errored."""
    # A parametrized id can hold spaces: "FAILED tests/t.py::test_x[a b, c] - AssertionError: ..."
    names = re.findall(r"^(?:FAILED|ERROR) \S+?::([^\s\[]+(?:\[[^\]]*\])?)", out, flags=re.M)
    return list(dict.fromkeys(names))


def _extensions(tree):
    return sorted((Path(tree) / "fastembed").glob("_kernels*.so")) + sorted((Path(tree) / "fastembed").glob("_kernels*.pyd"))


def _env():
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class Runner:
    def __init__(self, args, workdir):
        self.args, self.workdir = args, Path(workdir)
        self.pristine, self.base = self.workdir / "pristine", self.workdir / "base"
        self.env = _env()
        self.lock = threading.Lock()

    def log(self, msg):
        with self.lock:
            print(msg, flush=True)

    def prepare(self, selected):
        """Copy, build and test the unmutated tree; returns an error message or None."""
        shutil.copytree(ROOT, self.pristine, ignore=_ignore)
        shutil.copytree(self.pristine, self.base)
        t0 = time.monotonic()
        rc, out = _build(self.args.python, self.base, self.env)
        if rc != 0:
            return f"the unmutated tree does not build:\n{out[-4000:]}"
        self.extensions = _extensions(self.base)
        if not self.extensions:
            return "the baseline build made no fastembed/_kernels*.so"
        wrong = _check_imports_copy(self.args.python, self.base, self.env)
        if wrong:
            return f"`import fastembed` in the copy did not load the copy's package:\n{wrong}"
        self.log(f"baseline build: {time.monotonic() - t0:.0f} s")
        files = sorted({a for m in selected for a in m.tests if a.startswith("tests/") and a.endswith(".py")})
        present = [f for f in files if (self.base / f).exists()]
        for f in files:
            if f not in present:
                self.log(f"warning: {f} does not exist: the mutants that name it will be ERROR")
        t0 = time.monotonic()
        rc, out = _run(_pytest_cmd(self.args.python, self.args.seed, present), self.base,
                       self.args.timeout * 4, self.env)
        summary = out.strip().splitlines()[-1] if out.strip() else ""
        if rc != 0:
            return f"the unmutated tree fails its tests (exit status {rc}):\n{out[-6000:]}"
        self.log(f"baseline tests ({len(present)} files): {summary}, {time.monotonic() - t0:.0f} s")
        return None

    def run_one(self, mutant):
        t0 = time.monotonic()
        tree = self.workdir / f"m-{mutant.id}"
        try:
            status, detail = self._run_one(mutant, tree)
        finally:
            if not self.args.keep:
                shutil.rmtree(tree, ignore_errors=True)
        seconds = time.monotonic() - t0
        self.log(f"  {mutant.id:38s} {status:12s} {seconds:6.0f} s  {detail}")
        return mutant, status, detail, seconds

    def _run_one(self, mutant, tree):
        shutil.copytree(self.pristine, tree)
        if not _apply(mutant, tree):
            return "STALE", f"old text found {_count(tree / mutant.file, mutant.old)} times in {mutant.file}"
        if mutant.kernel:
            rc, out = _build(self.args.python, tree, self.env)
            if rc != 0:
                last = [line for line in out.splitlines() if "rror" in line][-3:] or out.splitlines()[-3:]
                return "BUILD-ERROR", " | ".join(last)[:300] if rc is not None else "build timed out"
        else:
            for ext in self.extensions:
                shutil.copy2(ext, tree / "fastembed" / ext.name)
        wrong = _check_imports_copy(self.args.python, tree, self.env)
        if wrong:
            return "ERROR", f"import fastembed did not load the copy: {wrong[-300:]}"
        rc, out = _run(_pytest_cmd(self.args.python, self.args.seed, mutant.tests), tree, self.args.timeout,
                       self.env)
        if rc is None:
            return "TIMEOUT", f"tests ran past {self.args.timeout} s"
        if rc == 0:
            summary = out.strip().splitlines()[-1] if out.strip() else ""
            if mutant.threads:
                summary += " (it shows only on 2 threads: one core here, or no OpenMP?)"
            return "MISSED", summary
        if rc < 0:
            return "caught", f"crash ({signal.Signals(-rc).name})"
        if rc == 1:
            failed = _failed_tests(out)
            return "caught", ", ".join(failed[:2]) if failed else "a test failed"
        tail = [line for line in out.strip().splitlines() if line.strip()][-2:]
        return "ERROR", f"pytest exit status {rc}: {' | '.join(tail)[:300]}"


def _select(args):
    by_id = {m.id: m for m in MUTANTS}
    if args.only:
        ids = [i for i in args.only.split(",") if i]
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            sys.exit(f"unknown mutant id(s): {', '.join(unknown)} (see --list)")
        return [by_id[i] for i in ids]
    return [m for m in MUTANTS if m.quick] if args.quick else list(MUTANTS)


def _check_list():
    """Errors in the list itself: duplicate ids, no-op mutants."""
    ids = [m.id for m in MUTANTS]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    errors = [f"duplicate id {i}" for i in dupes]
    errors += [f"{m.id}: old == new" for m in MUTANTS if m.old == m.new]
    return errors


def _check_tools(python):
    code = ("import importlib.util as u, sys; missing = [m for m in ('Cython', 'numpy', 'setuptools', 'pytest', "
            "'hypothesis') if u.find_spec(m) is None]; print(' '.join(missing)); sys.exit(1 if missing else 0)")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        missing = proc.stdout.strip() or proc.stderr.strip()
        return (f"{python} cannot build and test fastembed: missing {missing}. "
                f"Install them with `{python} -m pip install cython numpy setuptools pytest hypothesis`.")
    return None


def _md(text):
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="only the CI subset")
    group.add_argument("--only", metavar="ID[,ID]", help="only these mutants")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary trees")
    parser.add_argument("--python", default=sys.executable, help="interpreter that builds and tests")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant test run (default 300)")
    args = parser.parse_args(argv)

    problems = _check_list()
    if problems:
        sys.exit("bad mutant list: " + "; ".join(problems))
    selected = _select(args)
    if args.list:
        for m in selected:
            flags = ",".join(f for f, on in (("quick", m.quick), ("threads", m.threads)) if on)
            print(f"{m.id:38s} {m.file:24s} {flags:13s} {m.description}\n{'':38s} pytest {' '.join(m.tests)}")
        print(f"{len(selected)} mutants ({sum(m.kernel for m in selected)} in the kernels)")
        return 0
    problem = _check_tools(args.python)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.seed is None:
        args.seed = random.randrange(2**32)
    start = time.monotonic()
    stale = [m for m in selected if _count(ROOT / m.file, m.old) != 1]
    for m in stale:
        print(f"STALE: {m.id}: its old text occurs {_count(ROOT / m.file, m.old)} times in {m.file} "
              f"(must be exactly once); update the mutant", file=sys.stderr)
    workdir = tempfile.mkdtemp(prefix="fastembed-mutants-")
    print(f"{len(selected)} mutants ({sum(m.kernel for m in selected)} rebuild the kernels), jobs {args.jobs}, "
          f"hypothesis seed {args.seed}, in {workdir}", flush=True)
    runner = Runner(args, workdir)
    try:
        error = runner.prepare(selected)
        if error:
            print(f"BASELINE FAILED: {error}", file=sys.stderr)
            return 1
        results = []
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(runner.run_one, selected))
    finally:
        if args.keep:
            print(f"kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = [(m.id, m.file.split("/")[-1], m.description, detail if status == "caught" else f"{status}: {detail}",
             f"{seconds:.0f}") for m, status, detail, seconds in results]
    print()
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:{width}s}  {r[1]:14s}  {r[4]:>4s} s  {r[3][:110]}")
    print()
    print("| id | file | bug | caught by | s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r[0]}` | {r[1]} | {_md(r[2])} | {_md(r[3])} | {r[4]} |")
    bad = [(m.id, status) for m, status, _, _ in results if status != "caught"]
    caught = len(results) - len(bad)
    print(f"\n{caught} of {len(results)} mutants caught; hypothesis seed {args.seed}; "
          f"total {time.monotonic() - start:.0f} s")
    if bad:
        print("NOT CAUGHT: " + ", ".join(f"{i} ({s})" for i, s in bad), file=sys.stderr)
        return 1
    return 0


# issue 11, checkpoints: a directory rank 0 does not fully see, and a fused rule shared by several tables
MUTANTS += [
    Mutant("ckpt-manifest-names-unseen-files", CKPT,
           "    unseen = _unseen_files(directory, [i for _, i in items]) if rank == 0 else None",
           "    unseen = None",
           "rank 0 writes the manifest without looking for the rank files: node-local directories commit a "
           "checkpoint naming files rank 0 cannot see (and rank 0 deletes the previous checkpoint's)",
           (T_CKPT, "-k", "does_not_fully_see")),
    Mutant("ckpt-unseen-size-unchecked", CKPT,
           "            if size != info[\"bytes\"]:", "            if False:",
           "rank 0 checks only that the rank files exist: a file it sees cut short is named by the manifest",
           (T_CKPT, "-k", "sees_shorter")),
    Mutant("ckpt-load-changes-a-shared-rule", CKPT,
           "        module.fused = copy.copy(module.fused)\n", "",
           "a load sets the saved hyperparameters on the rule object the module was given, which other tables share",
           (T_CKPT, "-k", "shared_by_other_tables")),
]

# bench/ranks.py: the one launcher of the multi-process tests and the sharded bench
RANKS, T_RANKS = "bench/ranks.py", "tests/test_bench_sharded.py"
MUTANTS += [
    Mutant("ranks-kill-the-rank-alone", RANKS,
           "            os.killpg(proc.pid, signal.SIGKILL)", "            os.kill(proc.pid, signal.SIGKILL)",
           "a rank past the deadline is killed but not the processes it started (its process group)",
           (T_RANKS, "-k", "past_the_deadline")),
    Mutant("ranks-wait-for-every-rank", RANKS,
           "        for rank in wait_for:", "        for rank in range(len(commands)):",
           "wait_for is ignored: the faults test would wait for its hung rank until the deadline",
           (T_RANKS, "-k", "waited_for")),
    Mutant("ranks-kill-only-after-a-normal-wait", RANKS,
           "    finally:\n        for proc in procs:", "    except ImportError:\n        raise\n    if True:\n        for proc in procs:",
           "the ranks are killed after the wait returns, not when it is interrupted (an exception, Ctrl-C): they run on",
           (T_RANKS, "-k", "interrupted")),
    Mutant("ranks-no-parent-death-signal", RANKS,
           "    pre = None if _PRCTL is None else _die_with_parent", "    pre = None",
           "ranks outlive a launcher that is killed (the bench killed at a test's deadline leaves its ranks running)",
           (T_RANKS, "-k", "die_with_a_launcher")),
]

# bench/ranks.py again: the group of a rank that has exited (commit 7d0a07f)
MUTANTS += [
    Mutant("ranks-spare-the-group-of-an-exited-rank", RANKS,
           "def _kill_group(proc):\n", "def _kill_group(proc):\n    if proc.poll() is not None:\n        return\n",
           "the launcher kills only the groups of ranks still running: what a rank started and left behind when "
           "it exited runs on after the run",
           (T_RANKS, "-k", "exited_rank")),
]


# issue 10, item 5: EmbeddingBag as the custom op fastembed::embedding_bag while compiling and exporting
T_BAGOP = (T_COMPILE, "-k", "bag")
MUTANTS += [
    Mutant("bagop-compile-routes-to-torch", TORCH_BAG,
           "    if sparse or max_norm is not None or not _uses_kernels(input, weight, offsets, per_sample_weights,\n"
           "                                                           scale_grad_by_freq):",
           "    if True:",
           "a compiled bag is torch's F.embedding_bag again: right values, but not fastembed's op in the graph",
           (T_COMPILE, "-k", "bag_graph_calls or exported_bag")),
    Mutant("bagop-sparse-on-the-op", TORCH_BAG,
           "    if sparse or max_norm is not None or not _uses_kernels(",
           "    if max_norm is not None or not _uses_kernels(",
           "a sparse bag is the op while compiling: its gradient comes out dense, not torch's sparse layout",
           (T_COMPILE, "-k", "torchs_path")),
    Mutant("bagop-negative-padding-not-normalised", TORCH_BAG,
           "        padding_idx += rows", "        pass",
           "a negative padding_idx reaches the op as it is, which reads it as no padding row",
           T_BAGOP),
    Mutant("bagop-fake-ignores-include-last-offset", LIBRARY,
           "    return max(offsets.shape[0] - 1, 0) if include_last_offset else offsets.shape[0]",
           "    return offsets.shape[0]",
           "the fake implementation counts one bag too many with include_last_offset: traced shapes lie",
           T_BAGOP),
    Mutant("bagop-argmax-fake-int32", LIBRARY,
           "    return weight.new_empty(shape), ids.new_empty(shape if mode == \"max\" else (0,), dtype=torch.int64)",
           "    return weight.new_empty(shape), ids.new_empty(shape if mode == \"max\" else (0,), dtype=torch.int32)",
           "the fake argmax is int32 where the op returns int64",
           T_BAGOP),
    Mutant("bagop-backward-keeps-padding", LIBRARY,
           "    ops.embedding_bag_backward(_bits(out), idn, offn, g, mode=mode, per_sample_weights=psw,\n"
           "                               padding_idx=_bag_padding(padding_idx),",
           "    ops.embedding_bag_backward(_bits(out), idn, offn, g, mode=mode, per_sample_weights=psw,\n"
           "                               padding_idx=None,",
           "the dense backward op forgets padding_idx: the padding row gets a gradient, a mean's counts include it",
           T_BAGOP),
    Mutant("bagop-backward-ignores-psw", LIBRARY,
           "    weight_grad = embedding_bag_backward(grad, ids, offsets, per_sample_weights, argmax,",
           "    weight_grad = embedding_bag_backward(grad, ids, offsets, None, argmax,",
           "the weight's gradient of a weighted bag is that of an unweighted sum",
           T_BAGOP),
    Mutant("bagop-psw-grad-dropped", LIBRARY,
           "    if weight is not None:\n        psw_grad =", "    if False:\n        psw_grad =",
           "per_sample_weights get no gradient from a compiled or exported bag",
           T_BAGOP),
    Mutant("bagop-psw-grad-without-padding", LIBRARY,
           "        psw_grad = embedding_bag_weights_grad(weight, ids, offsets, grad, padding_idx, include_last_offset)",
           "        psw_grad = embedding_bag_weights_grad(weight, ids, offsets, grad, -1, include_last_offset)",
           "a padding lookup's per_sample_weight gets its row's dot product instead of 0",
           T_BAGOP),
    Mutant("bagop-fused-exported", TORCH_BAG,
           "        if torch.compiler.is_exporting():\n            raise RuntimeError(\"a fused fastembed.torch.EmbeddingBag",
           "        if False:\n            raise RuntimeError(\"a fused fastembed.torch.EmbeddingBag",
           "a fused bag is exported: the exported program would drop the update its backward makes",
           (T_COMPILE, "-k", "fused_bag")),
]


# bench --dtypes (issue 10's dtype targets as bench rows)
BENCH_CASES, BENCH_TARGETS, T_BENCH = "bench/cases.py", "bench/targets.py", "tests/test_bench.py"
MUTANTS += [
    Mutant("bench-dtype-traffic-as-float32", BENCH_CASES,
           "    nbytes = traffic(op, data, itemsize(dtype))", "    nbytes = traffic(op, data)",
           "a dtype's memory limit moves float32's bytes, not the dtype's (a half table's limit twice too slow)",
           (T_BENCH, "-k", "dtype_forward_rows")),
    Mutant("bench-dtype-target-any-threads", BENCH_TARGETS,
           'name="fastembed", threads=half["threads_set"])', 'name="fastembed")',
           "the half/float32 forward target compares rows measured at different thread counts",
           (T_BENCH, "-k", "dtype_targets_compare")),
]


# coalesce without zeroing its sums (issue 9): each distinct id's first row written as 0 + row, later ones added
T_COALFIRST = "tests/test_coalesce_first.py"
MUTANTS += [
    Mutant("coalfirst-later-written", PYX,
           "        if first[i]:\n            if acc_t is float:",
           "        if True:\n            if acc_t is float:",
           "every occurrence of an id is written, not only the first: a sum keeps its last row only",
           (T_COALFIRST,)),
    Mutant("coalfirst-flag-off-by-one", PYX,
           "        r = slots[i]\n        if _outside(r, U):\n            first[i] = 0",
           "        r = slots[i + 1] if i + 1 < N else slots[i]\n        if _outside(r, U):\n            first[i] = 0",
           "the first flags come from the next id's slot: some sums written twice, some added to garbage",
           (T_COALFIRST,)),
    Mutant("coalfirst-f64-first-copied", HDR,
           "    for (ptrdiff_t d = 0; d < n; d++) g[d] = 0.0 + s[d];",
           "    for (ptrdiff_t d = 0; d < n; d++) g[d] = s[d];",
           "a float64 id's first row is copied, not added to 0: a -0.0 stays -0.0",
           (T_COALFIRST,)),
    Mutant("coalfirst-f64-first-added", PYX,
           "                fe_first_into_f64(out + r * D + c0, src + i * D + c0, c1 - c0)",
           "                _add_into(out + r * D + c0, src + i * D + c0, c1 - c0)",
           "float64 sums add their first row to the uninitialised memory instead of writing it",
           (T_COALFIRST,)),
    Mutant("coalfirst-first-wrap-added", PYX,
           "                    fe_first_into(out + r * D + w0, src + i * D + w0, D - w0)",
           "                    _add_into(out + r * D + w0, src + i * D + w0, D - w0)",
           "a float32 first row's columns from w0 on (one thread: none; the wrapped block of a thread) "
           "are added to uninitialised memory",
           (T_COALFIRST,), threads=True),
]


# the float32 max bag forward in registers (fe_bag_max_ptrs)
T_BAGMAX = (BAG, "-k", "long_float32_maxes")
MUTANTS += [
    Mutant("bagmax-no-argmax-buffer-for-other-formats", BAG_FORWARD,
           "(bool(argmax) or fmt != FMT_F32)",
           "bool(argmax)",
           "a float64 or 16-bit max without return_argmax gets no argmax buffer, which its loop writes through",
           ("tests/test_bag_dtypes.py", "-k", "forward_matches_transcription")),
    Mutant("bagmax-first-chunk-flag-late", BAG_FORWARD,
           "D, count + 1 == pending)",
           "D, count == pending)",
           "a float32 max bag of 65 rows or more: its first full chunk is not taken as the first, so it is "
           "compared with out's old contents",
           T_BAGMAX),
    Mutant("bagmax-tie-later-row", HDR,
           "                    fe_v8i kk = b > m[v];", "                    fe_v8i kk = b >= m[v];",
           "a tie in a register block moves the argmax to the later row (torch keeps the earlier)",
           T_BAGMAX),
    Mutant("bagmax-avx2-later-nan-wins", HDR,
           "_mm256_max_ps((__m256)(b), (__m256)(m))", "_mm256_max_ps((__m256)(m), (__m256)(b))",
           "the AVX2 maxps with its operands swapped: a later NaN wins, and a tie takes the later row's sign",
           T_BAGMAX),
    Mutant("bagmax-portable-later-nan-wins", HDR,
           "#define fe_max8f_blend(b, m) fe_blend8f(m, b, (b) > (m))",
           "#define fe_max8f_blend(b, m) fe_blend8f(m, b, ~((b) <= (m)))",
           "the portable vectors' max takes a later NaN (torch never does)",
           T_BAGMAX),
    Mutant("bagmax-no-argmax-tie-later", HDR,
           "32);                                                      \\\n                    m[v] = MAX(b, m[v]);",
           "32);                                                      \\\n                    m[v] = MAX(m[v], b);",
           "without the argmax, a register block's max takes a tie's later row: -0.0 then +0.0 gives +0.0",
           T_BAGMAX),
    Mutant("bagmax-argmax-row-zero-stale", HDR,
           "int64_t keep = (int64_t)(pj[c] >> 31);", "int64_t keep = -(int64_t)(pj[c] <= 0);",
           "a column won by the first row of a bag's later chunk keeps the argmax of the earlier chunks",
           T_BAGMAX),
    Mutant("bagmax-argmax-previous-row", HDR,
           "(dst)[c] = ids[pj[c]];", "(dst)[c] = ids[pj[c] - (pj[c] > 0)];",
           "the portable register blocks' argmax (a bag's first chunk) names the row before the winner",
           T_BAGMAX),
    Mutant("bagmax-avx2-gather-halves-swapped", HDR,
           "_mm256_i32gather_epi64((const long long *)ids, _mm256_castsi256_si128(q), 8));    \\",
           "_mm256_i32gather_epi64((const long long *)ids, _mm256_extracti128_si256(q, 1), 8)); \\",
           "the AVX2 argmax gather writes columns 4-7's ids into columns 0-3 of each register",
           T_BAGMAX),
    Mutant("bagmax-argmax-positions-from-zero", HDR,
           "fe_v8i jv = (fe_v8i){0, 0, 0, 0, 0, 0, 0, 0} + (int)j0;",
           "fe_v8i jv = (fe_v8i){0, 0, 0, 0, 0, 0, 0, 0} + 0;",
           "after a bag's first row the row positions count from 0, not 1: the argmax names the row before",
           T_BAGMAX),
    Mutant("bagmax-later-chunk-lanes-not-kept", HDR,
           "+ (first ? 0 : -1);", "+ 0;",
           "a later chunk's columns that no row wins get the chunk's first id, not the earlier chunks' argmax",
           T_BAGMAX),
    Mutant("bagmax-chunk-last-row-skipped", HDR,
           "for (ptrdiff_t j = j0; j < k; j++, jv += 1) {", "for (ptrdiff_t j = j0; j < k - 1; j++, jv += 1) {",
           "a chunk's last row never competes in the register blocks",
           T_BAGMAX),
    Mutant("bagmax-block-registers-same-columns", HDR,
           "memcpy(&m[v], (first ? rows[0] : out) + d + 8 * v, 32);",
           "memcpy(&m[v], (first ? rows[0] : out) + d, 32);",
           "every register of a block starts from the block's first 8 columns",
           T_BAGMAX),
    Mutant("bagmax-column-tail-skipped", HDR,
           "    if (d < n) {  /* under 8 columns left", "    if (0) {  /* under 8 columns left",
           "the last (under 8) columns of a max are never written",
           T_BAGMAX),
    Mutant("bagmax-first-chunk-reads-out", BAG_FORWARD,
           "                            count == pending)", "                            False)",
           "a bag's only chunk compares against the stale out and arg instead of starting at its first row",
           T_BAGMAX),
    Mutant("bagmax-no-argmax-tail-ties-later", HDR,
           "                    if (rows[j][c] > out[c]) out[c] = rows[j][c];",
           "                    if (rows[j][c] >= out[c]) out[c] = rows[j][c];",
           "without the argmax, the column tail takes a tie's later row: -0.0 then +0.0 gives +0.0",
           T_BAGMAX),
]


# coalesce and update in one pass (adagrad_scatter, rowwise_adagrad_scatter, adam_scatter: _optim.pxi)
T_GROUPED = "tests/test_grouped_scatter.py"
MUTANTS += [
    Mutant("grouped-sort-unstable", OPTIM_PXI,
           "    for i in range(N):  # start[u] is slot u's cursor here",
           "    for i in range(N - 1, -1, -1):  # start[u] is slot u's cursor here",
           "the counting sort fills each row's lookups last to first: its gradient is summed in reverse ids order",
           (T_GROUPED, "-k", "coalesce_then_step or sum_order"), quick=True),
    Mutant("grouped-last-lookup-dropped", OPTIM_PXI,
           "    for k in range(k0, k1):\n        if k + PREFETCH_ROWS < end:",
           "    for k in range(k0, k1 - 1):\n        if k + PREFETCH_ROWS < end:",
           "a row's group ends one lookup early: its last lookup is not summed (a lone lookup's row reads the "
           "stale buffer)",
           (T_GROUPED,)),
    Mutant("grouped-first-added-to-stale-buffer", OPTIM_PXI,
           "                _sum_first(out, g + order[k] * D, D)",
           "                _sum_add(out, g + order[k] * D, D)",
           "a row's first lookup is added to the buffer (the previous row's sum, or uninitialised memory) "
           "instead of starting it as 0 + row",
           (T_GROUPED,)),
    Mutant("grouped-first-copied-not-zero-plus", OPTIM_PXI,
           "                _sum_first(out, g + order[k] * D, D)",
           "                memcpy(out, g + order[k] * D, D * sizeof(elem_t))",
           "a row's first lookup is copied, not added to +0.0: a lone -0.0 gradient stays -0.0 (a -0.0 weight "
           "then becomes +0.0; coalesce gives +0.0)",
           (T_GROUPED, "-k", "first_term or transcription")),
    Mutant("grouped-skip-row-ignored", OPTIM_PXI,
           "        if r == skip or start[u] == start[u + 1]:",
           "        if start[u] == start[u + 1]:",
           "skip_row is ignored: the padding row moves",
           (T_GROUPED,)),
    Mutant("grouped-skip-compares-slot", OPTIM_PXI,
           "        if r == skip or start[u] == start[u + 1]:",
           "        if u == skip or start[u] == start[u + 1]:",
           "skip_row is compared with the slot (the index among the distinct rows), not with the row",
           (T_GROUPED,)),
    Mutant("grouped-rowwise-mean-over-lookups", OPTIM_PXI,
           "acc, D, S, h, tmp)",
           "acc, start[u + 1] - start[u], S, h, tmp)",
           "the grouped update passes the row's lookup count where D is expected: row-wise Adagrad's mean square "
           "is divided by the lookup count instead of D (and only that many columns move)",
           (T_GROUPED,)),
    Mutant("grouped-adam-moments-swapped", OPTIM_PXI,
           "_grouped(ADAM_UPDATE, fmt, w, m, v,",
           "_grouped(ADAM_UPDATE, fmt, w, v, m,",
           "adam_scatter passes exp_avg_sq as exp_avg and exp_avg as exp_avg_sq",
           (T_GROUPED,)),
    Mutant("grouped-partition-overlaps", OPTIM_PXI,
           "        lo = _part(U, k, nthreads)\n        hi = _part(U, k + 1, nthreads)\n        _grouped_rows(",
           "        lo = _part(U, k, nthreads)\n        hi = min(_part(U, k + 1, nthreads) + 1, U)\n        _grouped_rows(",
           "each thread's part runs one row into the next one's: the first row of every part but the first is "
           "updated twice",
           (T_GROUPED,), threads=True),
    Mutant("grouped-partition-drops-last", OPTIM_PXI,
           "        lo = _part(U, k, nthreads)\n        hi = _part(U, k + 1, nthreads)\n        _grouped_rows(",
           "        lo = _part(U, k, nthreads)\n        hi = _part(U, k + 1, nthreads) - 1\n        _grouped_rows(",
           "each thread's part stops one row early: the last row of every part is never updated",
           (T_GROUPED,), threads=True),
    Mutant("grouped-acc-shared-by-threads", OPTIM_PXI,
           "lo, hi, skip, acc + k * width,",
           "lo, hi, skip, acc,",
           "the threads share one row buffer: they sum their rows into each other's (a data race)",
           (T_GROUPED, "-k", "race or large"), threads=True),
    Mutant("grouped-adam-bias-swapped", OPTIM_PXI,
           "    _adam_hyper(&h, lr, beta1, beta2, eps, bias1, bias2)\n    _grouped(",
           "    _adam_hyper(&h, lr, beta1, beta2, eps, bias2, bias1)\n    _grouped(",
           "adam_scatter takes the two bias corrections in the wrong order",
           (T_GROUPED, "-k", "transcription")),
    Mutant("grouped-adagrad-state-shape-unchecked", OPTIM_PXI,
           '    _check_like(s, "state_sum", w)\n    _no_overlap(w, "weight", (state_sum,), ("state_sum",))',
           '    _no_overlap(w, "weight", (state_sum,), ("state_sum",))',
           "adagrad_scatter does not check state_sum's shape (a short one is written past its end)",
           (T_GROUPED, "-k", "bad_calls")),
]


# ---------------------------------------------------------------- LookupGrad (sparse=True, coalesce=False)
LOOKUPS = "tests/test_lookup_grad.py"
MUTANTS += [
    Mutant("lookups-merge-new-first", NN,
           "    return LookupGrad(np.concatenate([grad.ids, ids]), np.concatenate([grad.values, values]))",
           "    return LookupGrad(np.concatenate([ids, grad.ids]), np.concatenate([values, grad.values]))",
           "a second backward puts its lookups before the earlier ones (SGD's per-lookup order changes)",
           (LOOKUPS, "-k", "concatenate or token_position")),
    Mutant("lookups-values-copied", NN,
           "    return ids.reshape(-1), grad_out.reshape(ids.size, dim)",
           "    return ids.reshape(-1), grad_out.reshape(ids.size, dim).copy()",
           "the LookupGrad copies grad_out: a write into grad_out before the step no longer reaches the step",
           (LOOKUPS, "-k", "not_copied or token_position")),
    Mutant("lookups-position-from-token-ids", NN,
           "            position_grad = _merge_lookups(self.position.grad, position_ids, values)",
           "            position_grad = _merge_lookups(self.position.grad, token_ids, values)",
           "TokenPositionEmbedding's position table gets the token ids as its LookupGrad's ids",
           (LOOKUPS, "-k", "token_position")),
    Mutant("lookups-tpe-sets-token-first", NN,
           "            token_grad = _merge_lookups(self.token.grad, token_ids, values)",
           "            token_grad = self.token.grad = _merge_lookups(self.token.grad, token_ids, values)",
           "TokenPositionEmbedding sets token.grad before the position merge that may raise",
           (LOOKUPS, "-k", "another_form")),
    Mutant("lookups-coalesce-flag-ignored", NN,
           "        if self.sparse and not self.coalesce:\n            self.grad = _merge_lookups(",
           "        if False:\n            self.grad = _merge_lookups(",
           "Embedding(sparse=True, coalesce=False) stores a coalesced SparseGrad",
           (LOOKUPS, "-k", "not_copied or concatenate or to_dense")),
    Mutant("lookups-bag-coalesces-anyway", NN,
           "                self.grad = _merge_lookups(self.grad, rows, values)",
           "                self.grad = _merge(self.grad, *ops.coalesce(rows, values))",
           "EmbeddingBag(sparse=True, coalesce=False) stores a coalesced SparseGrad",
           (LOOKUPS, "-k", "embedding_bag")),
    Mutant("lookups-check-allows-id-V", NN,
           "if len(ids) and (ids.min() < 0 or ids.max() >= num_rows):",
           "if len(ids) and (ids.min() < 0 or ids.max() > num_rows):",
           "LookupGrad.check lets an id equal to the table's row count through",
           (LOOKUPS, "-k", "check_accepts")),
    Mutant("lookups-to-dense-unchecked", NN,
           "        self.check(num_rows)\n        dense = np.zeros((num_rows, self.values.shape[1]), dtype=self.values.dtype)\n"
           "        ops.scatter_add(",
           "        dense = np.zeros((num_rows, self.values.shape[1]), dtype=self.values.dtype)\n        ops.scatter_add(",
           "LookupGrad.to_dense skips check(): 2-D ids (scatter_add takes any shape) go through",
           (LOOKUPS, "-k", "check_accepts")),
    Mutant("lookups-sgd-unchecked", OPTIM,
           "        _kernels.sgd_scatter(p.weight, ids, values, 0.0, check_only=True)\n",
           "",
           "SGD's LookupGrad branch skips the kernel's check pass: a refusal on the last parameter leaves the "
           "first moved",
           (LOOKUPS, "-k", "kernel_refusal and SGD")),
    Mutant("lookups-sgd-fma", OPTIM,
           "        return lambda lr: _kernels.sgd_scatter(p.weight, ids, values, lr)",
           "        return lambda lr: _kernels.sgd_scatter(p.weight, ids, values, lr, fma=True)",
           "SGD steps a LookupGrad with torch's fma rounding instead of numpy's w - (lr * g)",
           (LOOKUPS, "-k", "SGD or sgd")),
    Mutant("lookups-adagrad-ignores-weight-decay", OPTIM,
           "            if self.weight_decay != 0:\n"
           "                raise RuntimeError(\"weight_decay option is not compatible with sparse gradients\")\n"
           "            _kernels.adagrad_scatter(",
           "            _kernels.adagrad_scatter(",
           "Adagrad steps a LookupGrad with weight_decay set (torch refuses sparse gradients with it)",
           (LOOKUPS, "-k", "weight_decay")),
    Mutant("lookups-sparse-adam-unchecked", OPTIM,
           "            grad.check(*weight.shape, weight.dtype)",
           "            pass",
           "SparseAdam does not check a LookupGrad: adam_scatter takes ids of any shape, so 2-D or 0-d ids "
           "step (the kernel's own checks cover dtype, range and values' shape)",
           (LOOKUPS, "-k", "bad_lookup_grad and SparseAdam")),
    Mutant("lookups-tpe-coalesce-flag-ignored", NN,
           "        if self.sparse and not self.coalesce:\n            D = self.token.embedding_dim",
           "        if False:\n            D = self.token.embedding_dim",
           "TokenPositionEmbedding(sparse=True, coalesce=False) stores coalesced SparseGrads",
           (LOOKUPS, "-k", "token_position")),
    Mutant("lookups-coalesce-false-without-sparse", NN,
           "    if not coalesce and not sparse:\n        raise ValueError(",
           "    if False:\n        raise ValueError(",
           "coalesce=False is accepted without sparse=True (and silently gives a dense gradient)",
           (LOOKUPS, "-k", "needs_sparse")),
    Mutant("lookups-adam-not-densified", OPTIM,
           "            elif isinstance(g, (SparseGrad, LookupGrad)):\n                g = g.to_dense(",
           "            elif isinstance(g, SparseGrad):\n                g = g.to_dense(",
           "dense Adam hands a LookupGrad to its kernel as it is instead of making it dense",
           (LOOKUPS, "-k", "oracle and Adam")),
    Mutant("lookups-adam-scatter-skips-row-0", OPTIM,
           "g.values, lr, b1, b2, eps, 1 - b1**t, 1 - b2**t, -1,",
           "g.values, lr, b1, b2, eps, 1 - b1**t, 1 - b2**t, 0,",
           "SparseAdam's adam_scatter call skips row 0 (skip_row 0, not -1)",
           (LOOKUPS, "-k", "oracle and SparseAdam")),
]

# ShardedEmbedding on bfloat16 tables (the kernels take the memory as uint16 bits; gloo takes bfloat16 tensors)
MUTANTS += [
    Mutant("sharded-bf16-rows-as-bits", SHARDED,
           "        return _library._tensor(out)\n",
           "        return torch.from_numpy(out)\n",
           "a bfloat16 lookup returns its rows as the uint16 bits the kernels wrote, not as bfloat16",
           (T_SHARDED, "-k", "same_answer and bf16")),
    Mutant("sharded-bf16-grad-as-bits", SHARDED,
           "    return _library._tensor(grad)\n",
           "    return torch.from_numpy(grad)\n",
           "a bfloat16 block's dense gradient is the uint16 bits, not bfloat16",
           (T_SHARDED, "-k", "same_answer and bf16_dups")),
]

# scale_grad_by_freq on the kernels (scatter_add's scaled add, the drop-in's float32/float64 dense path)
T_SGBF = "tests/test_scale_grad_by_freq.py"
MUTANTS += [
    Mutant("sgbf-no-fma-f32", HDR,
           "    for (ptrdiff_t d = 0; d < n; d++) w[d] = fmaf(a, g[d], w[d]);",
           "    for (ptrdiff_t d = 0; d < n; d++) w[d] += a * g[d];",
           "the float32 scaled add rounds the product, then the sum (two roundings; torch's fma rounds once)",
           (T_SGBF, "-k", "transcription or rounds_once or torchs_embedding_backward or not_powers")),
    Mutant("sgbf-f64-alpha-as-float", PYX,
           "        fe_scaled_add_f64(dst, src, n, a)",
           "        fe_scaled_add_f64(dst, src, n, <float>a)",
           "the float64 scaled add takes 1/count rounded to float32 (torch's alpha is the double)",
           (T_SGBF, "-k", "transcription or torchs_embedding_backward or not_powers")),
    Mutant("sgbf-count-excludes-first", PYX,
           "        out[i] = 1.0 / <double>cp[sp[i]]\n",
           "        out[i] = 1.0 / <double>(cp[sp[i]] + 1)\n",
           "each lookup is scaled by 1 / (count + 1): the count is one off",
           (T_SGBF, "-k", "transcription or by_hand or not_powers")),
    Mutant("sgbf-16bit-alpha-unrounded", HDR,
           "    const float a16 = fe_bf16_to_float(fe_float_to_bf16(a));",
           "    const float a16 = a;",
           "the bfloat16 scaled add multiplies by 1/count in float32, not rounded to bfloat16 as torch's loop does",
           (T_SGBF, "-k", "transcription or torchs_embedding_backward or not_powers")),
    Mutant("sgbf-f16-alpha-unrounded", HDR,
           "    const float a16 = fe_f16_to_float_sw(fe_float_to_f16_sw(a));",
           "    const float a16 = a;",
           "the float16 scaled add multiplies by 1/count in float32, not rounded to float16 as torch's loop does",
           (T_SGBF, "-k", "transcription or torchs_embedding_backward or not_powers")),
    Mutant("sgbf-scales-ignored", PYX,
           "        if scales != NULL:\n            a = scales[i]",
           "        if False:\n            a = scales[i]",
           "_scatter_cols ignores the per-lookup scales (adds lr = 0 times each row)",
           (T_SGBF, "-k", "transcription or by_hand or not_powers")),
    Mutant("sgbf-ops-drops-flag", OPS,
           "    _kernels.scatter_add(grad_table, ids, grad_out, scale_grad_by_freq=scale_grad_by_freq)",
           "    _kernels.scatter_add(grad_table, ids, grad_out)",
           "fastembed.scatter_add ignores scale_grad_by_freq (plain sums)",
           (T_SGBF, "-k", "transcription or by_hand or not_powers")),
    Mutant("sgbf-adapter-16bit-on-kernels", TORCH,
           "((scale_grad_by_freq and (sparse or weight.dtype not in _SCALED_DTYPES))",
           "((scale_grad_by_freq and sparse)",
           "float16/bfloat16 tables with scale_grad_by_freq run on the kernels (one ulp from torch's tail columns)",
           (T_SGBF, "-k", "module_is_torchs or functional_is_torchs")),
    Mutant("sgbf-adapter-sparse-on-kernels", TORCH,
           "((scale_grad_by_freq and (sparse or weight.dtype not in _SCALED_DTYPES))",
           "((scale_grad_by_freq and weight.dtype not in _SCALED_DTYPES)",
           "sparse=True with scale_grad_by_freq leaves torch's lookup (which refuses the pair at backward)",
           (T_SGBF, "-k", "module_is_torchs")),
    Mutant("sgbf-double-backward-unscaled", TORCH,
           "                return (torch.ops.aten.embedding_dense_backward(grad_out, ctx.ids, ctx.table.shape[0], padding_idx,\n"
           "                                                                True),) + none",
           "                return (torch.ops.aten.embedding_dense_backward(grad_out, ctx.ids, ctx.table.shape[0], padding_idx,\n"
           "                                                                False),) + none",
           "backward(create_graph=True) with scale_grad_by_freq gives the unscaled gradient",
           (T_SGBF, "-k", "double_backward")),
    Mutant("sgbf-apply-drops-flag", TORCH,
           "        return _EmbeddingFunction.apply(weight, input, table, padding_idx, sparse, fused, bool(scale_grad_by_freq))",
           "        return _EmbeddingFunction.apply(weight, input, table, padding_idx, sparse, fused, False)",
           "tdrop-scale-grad-by-freq-ignored's edit: the kernel path's backward does not scale",
           (T_SGBF, "-k", "module_is_torchs or functional_is_torchs or the_kernels_scale or double_backward")),
    Mutant("sgbf-adapter-drops-flag", TORCH,
           "        _library._scatter_add(grad, ctx.ids_np, g, ctx.scale_grad_by_freq)",
           "        _library._scatter_add(grad, ctx.ids_np, g)",
           "the drop-in's backward on the kernels ignores scale_grad_by_freq",
           (T_SGBF, "-k", "module_is_torchs or functional_is_torchs or the_kernels_scale or accumulates")),
]

# ---------------------------------------------------------------- float32 bags of width 32 and 64, a whole bag in registers
MUTANTS += [
    Mutant("bagw-first-row-keeps-negative-zero", HDR,
           "        acc[k] = (fe_v8f){0} + x;",
           "        acc[k] = x;",
           "a width-32/64 float32 bag's first row is copied, not added to +0.0: a bag of -0.0 rows sums to -0.0",
           (BAG, "-k", "sequential_across_chunks and (32 or 64)")),
    Mutant("bagw-mean-not-divided", HDR,
           "            if (mean) {                                                                                        \\",
           "            if (0) {                                                                                           \\",
           "a width-32/64 float32 mean bag is not divided by its count",
           (BAG, "-k", "sequential_across_chunks and (32 or 64)")),
    Mutant("bagw-padding-added", HDR,
           "                if (r == pad) continue;                                                                        \\",
           "                if (0) continue;                                                                               \\",
           "a width-32/64 float32 bag adds its padding rows",
           (BAG, "-k", "sequential_across_chunks and (32 or 64)")),
    Mutant("bagw-empty-bag-unzeroed", HDR,
           "                memset(out + b * W, 0, W * sizeof(float));                                                     \\",
           "                (void)0;                                                                                       \\",
           "a width-32/64 float32 bag with no kept row leaves out's old contents (NaN in the test), not zeros",
           (BAG, "-k", "sequential_across_chunks and (32 or 64)")),
    Mutant("bagw-last-bag-short", HDR,
           "            const ptrdiff_t lo = (ptrdiff_t)offs[b], hi = b + 1 < L ? (ptrdiff_t)offs[b + 1] : N;              \\",
           "            const ptrdiff_t lo = (ptrdiff_t)offs[b], hi = b + 1 < L ? (ptrdiff_t)offs[b + 1] : N - 1;          \\",
           "a width-32/64 float32 bag call drops the last id of its last bag",
           (BAG, "-k", "sequential_across_chunks and (32 or 64)")),
    Mutant("bagw-int32-ids-as-64-wide", BAG_FORWARD,
           "                    return fe_bag_sum32_i32(out, table, V, ids, offs, L, N, b0, b1, last, pad, mode == BAG_MEAN)",
           "                    return fe_bag_sum64_i32(out, table, V, ids, offs, L, N, b0, b1, last, pad, mode == BAG_MEAN)",
           "rows of 32 floats with int32 ids are summed as rows of 64 (the wrong rows, past each bag's row)",
           (BAG, "-k", "sequential_across_chunks and 32")),
    Mutant("sgbf-ids-shared-with-a-writer", PYX,
           "        idx = _private(idx, ids)\n    cdef cnp.ndarray src",
           "        pass\n    cdef cnp.ndarray src",
           "scatter_add(scale_grad_by_freq=True) counts and adds the caller's ids, not a checked copy: a writer "
           "racing the call leaves a count of an unchecked id (np.bincount's ValueError)",
           ("tests/test_hardening_threads.py", "-k", "rewritten_by_another_process")),
    Mutant("sgbf-counts-stay-one", PYX,
           "        cp[sp[i]] += 1\n",
           "        cp[sp[i]] = 1\n",
           "scale_grad_by_freq counts every id once: repeated ids are not scaled down",
           (T_SGBF,)),
]

# bench --dtypes runs train per table dtype (`train float16` ...)
BENCH_TRAIN, T_TRAIN_DTYPES = "bench/train.py", (T_BENCH, "-k", "train_dtype or train_bfloat16 or itemsize")
MUTANTS += [
    Mutant("bench-train-dtype-bytes-as-float32", BENCH_TRAIN,
           "    N, U, f = data.ids.size, np.unique(data.ids).size, itemsize",
           "    N, U, f = data.ids.size, np.unique(data.ids).size, 4",
           "a dtype's train limit moves float32's bytes, not the dtype's",
           T_TRAIN_DTYPES),
    Mutant("bench-train-dtype-torch-float32", BENCH_TRAIN,
           "    weight = torch.from_numpy(_table_copy(data)) if tables is None else tables[0].clone()\n"
           "    g = torch.from_numpy(data.grad_hidden) if tables is None else tables[1]\n    emb = torch.nn",
           "    weight = torch.from_numpy(_table_copy(data))\n"
           "    g = torch.from_numpy(data.grad_hidden)\n    emb = torch.nn",
           "a dtype case's torch row times a float32 table",
           T_TRAIN_DTYPES),
    Mutant("bench-train-dtype-fused-float32", BENCH_TRAIN,
           'emb = Embedding(V, D, fused=cls(**hyper), **({} if tables is None else {"dtype": weight.dtype}))',
           "emb = Embedding(V, D, fused=cls(**hyper))",
           "a dtype case's fused row times a float32 table (the dtype's copied in)",
           T_TRAIN_DTYPES),
    Mutant("bench-train-half-timed-eps-checked", BENCH_TRAIN,
           "    check_hyper = HALF_CHECK_HYPER if half else CHECK_HYPER",
           "    check_hyper = CHECK_HYPER",
           "the halves check at float32's settings (lr 0.01, eps below float16's subnormals): a missed bfloat16 "
           "update is near the tolerance, torch's float16 SparseAdam can give inf or NaN",
           T_TRAIN_DTYPES),
    Mutant("bench-train-half-check-rows-ignored", BENCH_CASES,
           "            if m.check_rows is not None:  # a row checked on some table rows alone",
           "            if False:  # a row checked on some table rows alone",
           "the check compares torch's half sparse rows on every row, the ones torch sums in the half dtype too",
           T_TRAIN_DTYPES),
    Mutant("bench-train-half-dense-adam-partly-checked", BENCH_TRAIN,
           "check_rows=check_rows if group in TORCH_SPARSE_ROWS else None",
           "check_rows=check_rows",
           "torch's dense half Adam, which sums as fastembed.torch's does, is checked on some rows alone",
           T_TRAIN_DTYPES),
]


# ---------------------------------------------------------------- the optimizer kernels on float64, float16 and bfloat16 tables
OPT_DTYPES = "tests/test_optim_dtypes.py"
MUTANTS += [
    Mutant("optdt-f64-adam-hyper-float32", OPTIM_PXI,
           "            fe_adam_row_f64(w, s, s2, g, D, h.lr, h.beta1, h.beta2, h.eps, h.inv_bias1, h.inv_bias2)",
           "            fe_adam_row_f64(w, s, s2, g, D, <float>h.lr, <float>h.beta1, <float>h.beta2, <float>h.eps,\n"
           "                            <float>h.inv_bias1, <float>h.inv_bias2)",
           "a float64 table's Adam takes its hyperparameters rounded to float32 (as the float32 kernel does)",
           (OPT_DTYPES, "-k", "float64 and adam and not refused")),
    Mutant("optdt-half-state-not-stored", OPTIM_PXI,
           "        _narrow_row(s, ts, S)\n        if kind == ADAM_UPDATE:",
           "        if kind == ADAM_UPDATE:",
           "a 16-bit table's update never stores its (first) state back: state_sum / exp_avg keep their old bits",
           (OPT_DTYPES, "-k", "(float16 or bfloat16) and transcription")),
    Mutant("optdt-half-exp-avg-sq-not-stored", OPTIM_PXI,
           "            _narrow_row(s2, ts + S, S)",
           "            pass",
           "a 16-bit table's Adam never stores exp_avg_sq back",
           (OPT_DTYPES, "-k", "(float16 or bfloat16) and adam and transcription")),
    Mutant("optdt-half-update-reads-rounded-state", OPTIM_PXI,
           "        _real_row(kind, tmp, ts, ts + S, tmp + D, D, h)\n",
           "        _real_row(kind, tmp, ts, ts + S, tmp + D, D, h)\n"
           "        if kind == ADAGRAD_UPDATE:  # w moved from the state as stored (rounded), not the float32 one\n"
           "            _narrow_row(s, ts, S)\n"
           "            _widen_row(ts, s, S)\n"
           "            _widen_row(tmp, w, S)\n"
           "            while D > 0:\n"
           "                D -= 1\n"
           "                tmp[D] = tmp[D] - (<float>h.lr * tmp[S + D]) / (sqrtf(ts[D]) + <float>h.eps)\n"
           "            D = S\n",
           "a 16-bit table's Adagrad moves w by the rounded new state_sum instead of the unrounded float32 one",
           (OPT_DTYPES, "-k", "(float16 or bfloat16) and adagrad and transcription")),
    Mutant("optdt-half-sgd-step-ascends", OPTIM_PXI,
           "        _scaled_add(w, g, D, -h.lr)",
           "        _scaled_add(w, g, D, h.lr)",
           "sgd_step on a 16-bit table adds lr * g (lr not negated)",
           (OPT_DTYPES, "-k", "(float16 or bfloat16) and sgd and step_matches")),
    Mutant("optdt-half-sgd-scatter-ascends", PYX,
           "        _scaled_add(dst, src, n, -lr)",
           "        _scaled_add(dst, src, n, lr)",
           "sgd_scatter on a 16-bit table adds lr * g (lr not negated)",
           (OPT_DTYPES, "-k", "(float16 or bfloat16) and sgd and scatter_matches")),
    Mutant("optdt-half-lookup-sum-rounded-per-add", OPTIM_PXI,
           "                fe_add_into(total, wide, D)\n",
           "                fe_add_into(total, wide, D)\n"
           "                _narrow_row(out, total, D)\n"
           "                _widen_row(total, out, D)\n",
           "the *_scatter kernels on a 16-bit table round a row's gradient sum after each lookup, not once",
           (OPT_DTYPES, "-k", "(float16 or bfloat16) and scatter_matches")),
    Mutant("optdt-f64-sqrtf", HDR,
           "FE_DEFINE_OPTIM_ROWS(_f64, double, sqrt, fma)",
           "FE_DEFINE_OPTIM_ROWS(_f64, double, sqrtf, fma)",
           "the float64 rows take square roots in float32",
           (OPT_DTYPES, "-k", "float64 and transcription")),
    Mutant("optdt-f64-rowwise-mean-in-float32", HDR,
           "const T G = *s + fe_sum_squares##SUF(g, n) / (T)n;",
           "const T G = *s + (T)((float)fe_sum_squares##SUF(g, n) / (float)n);",
           "row-wise Adagrad divides the sum of squares by D in float32 (the same bits for a float32 table)",
           (OPT_DTYPES, "-k", "float64 and rowwise and transcription")),
    Mutant("optdt-f64-sgd-scatter-fma-swapped", PYX,
           "            fe_sgd_row_f64(dst, src, n, lr)\n        else:\n            fe_sgd_row_fma_f64(dst, src, n, lr)",
           "            fe_sgd_row_fma_f64(dst, src, n, lr)\n        else:\n            fe_sgd_row_f64(dst, src, n, lr)",
           "sgd_scatter on a float64 table rounds with fma when asked for numpy's rounding, and the other way round",
           (OPT_DTYPES, "-k", "float64 and sgd and scatter or fma_rounds_once")),
]

# ---------------------------------------------------------------- fastembed.torch's optimizers and fused rules on the other dtypes
T_OPT_DTYPES = "tests/test_torch_optim_dtypes.py"
MUTANTS += [
    Mutant("topt-bfloat16-left-to-torch", TORCH_OPTIM,
           "_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)",
           "_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16)",
           "the drop-ins hand bfloat16 tables to torch's own update (the kernels never see them)",
           (T_OPT_DTYPES, "-k", "runs_the_kernel")),
    Mutant("topt-bfloat16-bits-read-as-uint16", TORCH_OPTIM,
           '    return "bfloat16" if p.dtype == torch.bfloat16 else None',
           "    return None",
           "a bfloat16 table's bits reach the kernels without _format: refused as uint16, the step raises",
           (T_OPT_DTYPES, "-k", "bfloat16")),
    Mutant("f16c-scaled-add-alpha-unrounded", HDR,
           "    if (fe_use_f16c) { fe_f16c_scaled_add((uint16_t *)w, (const uint16_t *)g, n, a16); return; }",
           "    if (fe_use_f16c) { fe_f16c_scaled_add((uint16_t *)w, (const uint16_t *)g, n, a); return; }",
           "float16 SGD on F16C scales by lr itself, not lr rounded to float16 as torch's add_ (and the portable "
           "loop) does",
           (DTYPES, "-k", "both_code_paths")),
    Mutant("optdt-span-grad-from-row-0", OPTIM_PXI,
           "g + first + e, n, n, h, tmp)",
           "g + e, n, n, h, tmp)",
           "a 16-bit dense update staged across rows reads each thread's gradient from row 0, not its first row",
           (OPT_DTYPES, "-k", "dense_step_of_many")),
    Mutant("fused-state-in-float32", OPTIM,
           "        return np.full(shape, value, weight.dtype)",
           "        return np.full(shape, value, np.float32)",
           "a fused rule makes float32 state for a float64 or float16 table: the kernels refuse the mix",
           (T_OPT_DTYPES, "-k", "fused")),
    Mutant("fused-bfloat16-state-as-uint16-buffers", TORCH,
           "    return {key: _library._tensor(arr) for key, arr in rule.new_state(table, _format=_rule_format(table)).items()}",
           "    return {key: torch.from_numpy(arr) for key, arr in rule.new_state(table, _format=_rule_format(table)).items()}",
           "a bfloat16 table's fused state is registered as uint16 buffers (its state_dict no longer bfloat16)",
           (T_OPT_DTYPES, "-k", "fused")),
]


# ---------------------------------------------------------------- the numpy layers and fastembed.optim on the four table dtypes
NN_DTYPES = "tests/test_nn_dtypes.py"
MUTANTS += [
    Mutant("nndt-init-float32", NN,
           "        self.weight = (rng.standard_normal((num_embeddings, embedding_dim)) * INIT_STD).astype(dtype)",
           "        self.weight = (rng.standard_normal((num_embeddings, embedding_dim)) * INIT_STD).astype(np.float32)",
           "a layer's dtype= is ignored at init: every new table is float32",
           (NN_DTYPES, "-k", "init_rounded_once")),
    Mutant("nndt-any-dtype-taken", NN,
           "    if resolved is None or not _is_table_dtype(resolved):",
           "    if resolved is None:",
           "a layer takes any dtype numpy knows (int32, complex64, uint16 ...) as its table's",
           (NN_DTYPES, "-k", "not_one_of_the_four")),
    Mutant("nndt-pretrained-float32", NN,
           '        weight = np.array(weight, order="C", copy=True)\n        if not _is_table_dtype(weight.dtype):',
           '        weight = np.array(weight, dtype=np.float32, order="C", copy=True)\n        if not _is_table_dtype(weight.dtype):',
           "from_pretrained without dtype= casts the table to float32 (the old behaviour), not its own dtype",
           (NN_DTYPES, "-k", "from_pretrained_keeps or python_floats or int_table")),
    Mutant("nndt-pretrained-through-float32", NN,
           '        weight = np.array(weight, dtype=_table_dtype(dtype), order="C", copy=True)',
           '        weight = np.array(np.asarray(weight, np.float32), dtype=_table_dtype(dtype), order="C", copy=True)',
           "from_pretrained's dtype= converts through float32: two roundings, not one",
           (NN_DTYPES, "-k", "converts_once")),
    Mutant("nndt-two-dtypes-taken", NN,
           "        if token_weight.dtype != position_weight.dtype:",
           "        if False:",
           "TokenPositionEmbedding.from_pretrained takes a token and a position table of two dtypes",
           (NN_DTYPES, "-k", "two_dtypes")),
    Mutant("nndt-grad-out-dtype-unchecked", NN,
           "    _check_dtype(grad, dtype, name)\n    expected = ids.shape + (dim,)",
           "    expected = ids.shape + (dim,)",
           "a layer's backward does not check grad_out's dtype: a sparse layer stores a gradient of another dtype",
           (NN_DTYPES, "-k", "grad_out_of_another_dtype")),
    Mutant("nndt-bag-grad-out-dtype-unchecked", NN,
           '            _check_dtype(grad_out, self.dtype, "grad_out")  # the kernel takes any dtype: the layer\'s is due',
           "            pass",
           "a sparse EmbeddingBag stores the sparse gradient of a grad_out of another dtype",
           (NN_DTYPES, "-k", "grad_out_of_another_dtype")),
    Mutant("nndt-check-dtype-dropped", NN,
           "    if dtype is not None and values.dtype != dtype:",
           "    if False:",
           "SparseGrad.check / LookupGrad.check ignore the dtype asked for",
           (NN_DTYPES, "-k", "check_takes")),
    Mutant("nndt-sparse-to-dense-float32", NN,
           "        dense = np.zeros((num_rows, self.values.shape[1]), dtype=self.values.dtype)\n        dense[self.rows]",
           "        dense = np.zeros((num_rows, self.values.shape[1]), dtype=np.float32)\n        dense[self.rows]",
           "SparseGrad.to_dense is float32 whatever its values' dtype (numpy casts them in silently)",
           (NN_DTYPES, "-k", "sparse_backward_is or check_takes")),
    Mutant("nndt-bridge-float32", NN,
           "            self.layer.backward((grads - self.scattered).astype(self.layer.token.dtype))",
           "            self.layer.backward((grads - self.scattered).astype(np.float32))",
           "the scalar bridge sends float32 grads to a layer of any dtype (refused by every other dtype)",
           (NN_DTYPES, "-k", "to_values")),
    Mutant("nndt-bridge-through-float32", NN,
           "            self.layer.backward((grads - self.scattered).astype(self.layer.token.dtype))",
           "            self.layer.backward((grads - self.scattered).astype(np.float32).astype(self.layer.token.dtype))",
           "the scalar bridge rounds the Value grads to float32 before the layer's dtype: two roundings",
           (NN_DTYPES, "-k", "to_values")),
    Mutant("nndt-rowwise-state-float32", OPTIM,
           "        self.state_sum = [np.zeros(p.weight.shape[0], p.weight.dtype) for p in self.params]",
           "        self.state_sum = [np.zeros(p.weight.shape[0], np.float32) for p in self.params]",
           "RowWiseAdagrad's state is float32 whatever the weight's dtype",
           (NN_DTYPES, "-k", "rowwise and (transcription or every_dtype)")),
    Mutant("nndt-adam-state-float32", OPTIM,
           "        self.exp_avg = [np.zeros_like(p.weight) for p in self.params]",
           "        self.exp_avg = [np.zeros(p.weight.shape, np.float32) for p in self.params]",
           "Adam's and SparseAdam's first moment is float32 whatever the weight's dtype",
           (NN_DTYPES, "-k", "adam and transcription")),
    Mutant("nndt-dense-grad-dtype-unchecked", OPTIM,
           '    _check_dtype(g, p.weight.dtype, "grad")\n    if g.shape != (V, D):',
           "    if g.shape != (V, D):",
           "a dense gradient's dtype is not checked: Adagrad's weight decay casts a 16-bit weight's float32 or "
           "float64 gradient to the weight's dtype and steps (the kernels see matching dtypes)",
           (NN_DTYPES, "-k", "refused_before_any_parameter_moves and adagrad_wd")),
    Mutant("nndt-decay-16bit-in-16bit", OPTIM,
           "    if weight.dtype.itemsize == 2:",
           "    if False:",
           "Adagrad's weight decay on a float16 or bfloat16 weight in 16-bit arithmetic (the product rounded, "
           "then the sum), not in float32 rounded once",
           (NN_DTYPES, "-k", "(float16 or bfloat16) and (weight_decay or adagrad_wd)")),
    Mutant("nndt-decay-float64-wd-float32", OPTIM,
           "    return grad + weight.dtype.type(weight_decay) * weight",
           "    return grad + np.float32(weight_decay) * weight",
           "Adagrad's weight decay on a float64 weight uses weight_decay rounded to float32",
           (NN_DTYPES, "-k", "float64 and (weight_decay or adagrad_wd)")),
    Mutant("nndt-sgd-moves-before-checking-all", OPTIM,
           "        updates = [_checked_sgd_update(p) for p in self.params if p.grad is not None]  # all checked first\n"
           "        for apply in updates:\n            apply(self.lr)",
           "        for p in self.params:\n            if p.grad is not None:\n                _checked_sgd_update(p)(self.lr)",
           "SGD moves each parameter as soon as it is checked: a bad gradient on the second leaves the first moved",
           (NN_DTYPES, "-k", "refused_before_any_parameter_moves and sgd")),
    Mutant("nndt-rowwise-moves-before-checking-all", OPTIM,
           "        updates = [self._checked(i) for i, p in enumerate(self.params) if p.grad is not None]\n"
           "        for apply in updates:\n            apply(self.lr, self.eps)",
           "        for i, p in enumerate(self.params):\n            if p.grad is not None:\n"
           "                self._checked(i)(self.lr, self.eps)",
           "RowWiseAdagrad moves each parameter as soon as it is checked",
           (NN_DTYPES, "-k", "refused_before_any_parameter_moves and rowwise")),
]


# The 16-bit Adam and Adagrad rows in registers (F16C / AVX2 lanes, portable loops), and the layers' dtype=.
MUTANTS += [
    Mutant("opt16-adam-lanes-keep2-from-beta1", HDR,
           "k2 = _mm256_set1_ps(1.0f - beta2), rate",
           "k2 = _mm256_set1_ps(1.0f - beta1), rate",
           "the lane rows' second moment moves by 1 - beta1 (float16 on F16C, bfloat16 on AVX2)",
           (OPT_DTYPES, "-k", "transcription and adam")),
    Mutant("lanes8-tail-dropped", HDR,
           "        if (d < (n)) { const ptrdiff_t left = (n) - d; __VA_ARGS__ }",
           "        if (0) { const ptrdiff_t left = (n) - d; __VA_ARGS__ }",
           "the eight-lane rows (F16C, AVX2 bfloat16: adds, SGD, Adam, Adagrad) leave the last D % 8 columns "
           "(and rows shorter than 8) unmoved",
           (OPT_DTYPES, "-k", "transcription and adagrad")),
    Mutant("opt16-bf16-lanes-nan-keeps-its-sign", HDR,
           "    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);",
           "    (void)nan;",
           "the AVX2 bfloat16 store rounds a NaN like a number: x86's default NaN (sign set) becomes 0xffc0, not "
           "torch's 0x7fc0",
           (DTYPES, "-k", "both_code_paths")),
    Mutant("opt16-bf16-lanes-round-half-up", HDR,
           "_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)))",
           "_mm256_add_epi32(u, _mm256_set1_epi32(0x8000))",
           "the AVX2 bfloat16 store rounds ties up, not to even",
           (OPT_DTYPES, "-k", "tie")),
    Mutant("topt-state-dtype-unchecked", "fastembed/torch/optim.py",
           "_is_table(t) and t.shape == p.shape and t.dtype == p.dtype",
           "_is_table(t) and t.shape == p.shape",
           "a drop-in hands a state tensor of another dtype than its parameter to the kernel (which refuses it: "
           "a TypeError where torch steps)",
           (T_OPT_DTYPES, "-k", "another_dtype_is_torchs")),
    Mutant("bf16-lanes-add-into-drops-the-row", HDR,
           "fe_avx2_bf16_load(s + d, left)), left);)",
           "_mm256_setzero_ps()), left);)",
           "the eight-lane bfloat16 scatter-add (dense backward: AVX2, and the AVX512_BF16 tail) adds nothing",
           (DTYPES,)),
    Mutant("bf16-lanes-add-rows-tail-from-a", HDR,
           "fe_avx2_bf16_load(b + d, left)), left);)",
           "fe_avx2_bf16_load(a + d, left)), left);)",
           "the eight-lane bfloat16 token + position add (AVX2, and the AVX512_BF16 tail) reads the token row twice",
           (DTYPES, "-k", "gather_add")),
    Mutant("bf16-avx512-no-fixup", HDR,
           "    if (_mm256_fpclass_ps_mask(x, 0x01 | 0x20 | 0x80)) {",
           "    if (0) {",
           "AVX512_BF16 lanes take vcvtneps2bf16's result for every vector: a subnormal sum becomes 0 and a NaN keeps "
           "its sign and payload, where the portable loops keep the subnormal and store 0x7fc0",
           (DTYPES, "-k", "subnormals or code_paths")),
    Mutant("bf16-avx512-fixup-nans-only", HDR,
           "    if (_mm256_fpclass_ps_mask(x, 0x01 | 0x20 | 0x80)) {",
           "    if (_mm256_fpclass_ps_mask(x, 0x01 | 0x80)) {",
           "the AVX512_BF16 lanes send NaNs to the integer rounding but not subnormals (flushed to zero)",
           (DTYPES, "-k", "subnormals")),
    Mutant("bf16-avx512-16-no-fixup", HDR,
           "    if (_mm512_fpclass_ps_mask(x, 0x01 | 0x20 | 0x80)) {",
           "    if (0) {",
           "the sixteen-lane AVX512_BF16 rows take vcvtneps2bf16 for every vector: subnormal sums flushed, NaNs "
           "keep their payload",
           (DTYPES, "-k", "subnormals or code_paths")),
    Mutant("bf16-avx512-16-fixup-same-half", HDR,
           "fe_avx2_bf16_store(p + 8, _mm512_extractf32x8_ps(x, 1), 8);",
           "fe_avx2_bf16_store(p + 8, _mm512_extractf32x8_ps(x, 0), 8);",
           "a sixteen-lane vector sent to the integer rounding stores its low half twice",
           (DTYPES, "-k", "subnormals or code_paths")),
    Mutant("bf16-avx512-16-add-rows-tail-skipped", HDR,
           "    if (d < n) fe_avx512_bf16_add_rows(out + d, a + d, b + d, n - d);",
           "    if (0) fe_avx512_bf16_add_rows(out + d, a + d, b + d, n - d);",
           "gather_add's sixteen-lane bfloat16 rows never write the last n % 16 columns",
           (DTYPES, "-k", "subnormals or code_paths")),
    Mutant("bf16-avx512-16-add-into-self", HDR,
           "_mm512_add_ps(fe_avx512_bf16_load16(g + d), fe_avx512_bf16_load16(s + d))",
           "_mm512_add_ps(fe_avx512_bf16_load16(g + d), fe_avx512_bf16_load16(g + d))",
           "scatter_add's sixteen-lane bfloat16 rows add the gradient row to itself",
           (DTYPES, "-k", "subnormals or code_paths")),
    Mutant("bf16-avx512-16-scaled-add-unscaled", HDR,
           "_mm512_mul_ps(av, fe_avx512_bf16_load16(g + d))",
           "fe_avx512_bf16_load16(g + d)",
           "the bfloat16 SGD row's sixteen-lane blocks forget the learning rate",
           (DTYPES, "-k", "subnormals or code_paths")),
    Mutant("bagmean-register-reciprocal", HDR,
           "    for (int k = 0; k < W / 8; k++) acc[k] /= (c);",
           "    for (int k = 0; k < W / 8; k++) acc[k] *= 1.0f / (c);",
           "the register bag mean (D 32, 64) multiplies by 1 / count: inexact for 3, 5, ..., not torch's division",
           (BAG, "-k", "mean_is_the_sum")),
    Mutant("bagmean-general-reciprocal", HDR,
           "    for (ptrdiff_t d = 0; d < n; d++) out[d] /= c;",
           "    for (ptrdiff_t d = 0; d < n; d++) out[d] *= 1.0f / c;",
           "the general loop's bag mean multiplies by 1 / count: inexact for 3, 5, ..., not torch's division",
           (BAG, "-k", "mean_is_the_sum")),
    Mutant("nn-dense-grad-uninitialised", NN,
           "    return np.zeros(table.shape, table.dtype)",
           "    return np.empty(table.shape, table.dtype)",
           "a layer's new dense gradient is uninitialised memory (a large one may come zeroed from the OS; a small "
           "one reuses freed memory)",
           (NN_OPTIM,)),
    Mutant("opt16-bf16-portable-adam-eps-dropped", HDR,
           "        w[d].bits = FROM_F(TO_F(w[d].bits) - lr * (md * inv_bias1) / (sqrtf(vd * inv_bias2) + eps));",
           "        w[d].bits = FROM_F(TO_F(w[d].bits) - lr * (md * inv_bias1) / sqrtf(vd * inv_bias2));",
           "the portable 16-bit Adam row (bfloat16 without AVX2, float16 without F16C) drops eps: only the "
           "test that switches the hardware paths off sees it on this CPU",
           (DTYPES, "-k", "both_code_paths")),
    Mutant("opt16-switch-leaves-avx2-on", HDR,
           "    fe_use_avx2 = on && fe_cpu_has_avx2();",
           "    fe_use_avx2 = fe_cpu_has_avx2();",
           "the test switch cannot turn the bfloat16 AVX2 rows off, so the portable rows go untested (the test "
           "asserts the switch took effect, through _kernels._bf16_hardware)",
           (DTYPES, "-k", "both_code_paths")),
]

# bench: the numpy API's rows of `train <dtype>`
MUTANTS += [
    Mutant("bench-train-np-float32-table", BENCH_TRAIN,
           "    table, g = (data.token_table, data.grad_hidden) if arrays is None else arrays\n"
           "    layer = fe.Embedding.from_pretrained(table, sparse=",
           "    table, g = (data.token_table, data.grad_hidden)\n"
           "    layer = fe.Embedding.from_pretrained(table, sparse=",
           "a dtype case's numpy API rows (unfused) time float32's table and gradient: within the halves' tolerance "
           "of the anchor, so the check passes them",
           T_TRAIN_DTYPES),
    Mutant("bench-train-np-fused-float32-table", BENCH_TRAIN,
           "    table, g = (data.token_table, data.grad_hidden) if arrays is None else arrays\n    rule = ",
           "    table, g = (data.token_table, data.grad_hidden)\n    rule = ",
           "a dtype case's numpy API fused rows time float32's table and gradient",
           T_TRAIN_DTYPES),
    Mutant("bench-train-np-bf16-without-ml-dtypes", BENCH_TRAIN,
           "    arrays, tables = in_dtype((data.token_table, data.grad_hidden), dtype, torch)\n",
           "    arrays, tables = in_dtype((data.token_table, data.grad_hidden), dtype, torch)\n"
           "    arrays = (data.token_table, data.grad_hidden) if arrays is None else arrays\n",
           "without ml_dtypes the bfloat16 case keeps numpy API rows, on float32's table, and no note",
           T_TRAIN_DTYPES),
    Mutant("bench-train-np-sparse-adam-book-eps", BENCH_TRAIN,
           "check_factory=functools.partial(factory, torch_eps=True) if as_torch else None,",
           "check_factory=None,",
           "the numpy API's SparseAdam rows are checked with the book's eps placement against torch's formula",
           T_TRAIN_DTYPES),
    Mutant("bench-train-np-book-eps-step-late", BENCH_TRAIN,
           "            opt.eps = book_eps(hyper, opt.steps[0] + 1)",
           "            opt.eps = book_eps(hyper, opt.steps[0] + 2)",
           "the unfused numpy SparseAdam's check translates torch's eps at the next step's bias correction",
           T_TRAIN_DTYPES),
    Mutant("bench-train-np-fused-book-eps-step-late", BENCH_TRAIN,
           '            rule.eps = book_eps(hyper, int(layer.state["step"]) + 1)',
           '            rule.eps = book_eps(hyper, int(layer.state["step"]) + 2)',
           "the fused numpy SparseAdam's check translates torch's eps at the next step's bias correction",
           T_TRAIN_DTYPES),
    Mutant("bench-train-np-half-sgd-all-rows", BENCH_TRAIN,
           'check_rows=sgd_check_rows if (group, k) == ("SGD", 0) else None))',
           "check_rows=None))",
           "the numpy API's coalesced SGD is checked on every row of a half table (on hot zipf rows it rounds "
           "once where the anchor rounds per lookup: a false CheckError)",
           T_TRAIN_DTYPES),
    Mutant("bench-train-np-partly-checked-anchor", BENCH_TRAIN,
           'next(m for m in rows if m.family == "fastembed" and m.check_rows is None).anchor = True',
           'next(m for m in rows if m.family == "fastembed").anchor = True',
           "without torch the numpy API's coalesced SGD (checked on some rows) anchors a half case's SGD group",
           T_TRAIN_DTYPES),
    Mutant("bench-train-np-anchored", BENCH_TRAIN,
           "anchor=(arrays is None and k == 0),",
           "anchor=(k == 0),",
           "the numpy API's coalesced rows anchor the dtype cases' groups beside fastembed.torch's drop-in",
           T_TRAIN_DTYPES),
    Mutant("bench-train-np-dense-adam-unlimited", BENCH_TRAIN,
           '        if group == "Adam" and not dense_ok:\n            continue\n        states = ',
           "        states = ",
           "the numpy API's dense Adam row is built over DENSE_MAX_ELEMENTS (a dense step rewriting a 1M-row table)",
           T_TRAIN_DTYPES),
]


if __name__ == "__main__":
    sys.exit(main())
