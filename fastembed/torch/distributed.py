"""An embedding table sharded by rows over a ``torch.distributed`` process group.

Rank r of a group of W ranks holds the rows ``bounds[r]`` to ``bounds[r + 1] - 1`` of the (V, D)
table (``bounds = fastembed.row_bounds(V, W)``: contiguous blocks, the first ``V % W`` ranks one row
longer). A lookup runs in three stages, as TorchRec's row-wise sharding does:

1. input distribution (`_input_dist`): the rank's ids checked and bucketed by owner, each distinct id
   once (`fastembed.exchange_plan`), an all-to-all of headers (`_Header`: the counts, whether the ids
   passed their checks, and what each rank thinks this collective is), then one of the local row
   numbers;
2. local lookup (`_local_lookup`): each owner gathers the rows it was asked for;
3. output distribution (`_output_dist`): an all-to-all of those rows back, and ``rows[inverse]``.

The backward runs them in reverse: the gradient rows of each distinct id are summed on the rank
that looked them up (`_sum_per_sent_row`), a header all-to-all checks that every rank is in the
backward of the same lookup, the rows go back to their owners by one all-to-all
(`_output_dist_backward`), and each owner adds what it received into its block's gradient
(`_block_grad`), or with a fused rule, updates its rows with them. The only collectives are ``torch.distributed.all_to_all_single`` (gloo on CPU, or
any backend that has it); no sockets of fastembed's own.

Every rank of the group must take part in every collective: see `ShardedEmbedding`.
"""
import collections
import copy
import weakref

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .. import ops
from ..nn import _fused_rule
from . import (_LOOKUP_DTYPES, _fused_buffers, _grad, _ids, _library, _moved, _padding_index, _renorm_needs_torch,
               _rule_format, _state, _table)
from . import _renorm as _adapter_renorm

__all__ = ["CollectiveError", "NotSharedError", "ShardedEmbedding", "load_sharded", "save_sharded"]


class CollectiveError(RuntimeError):
    """A ShardedEmbedding collective that did not complete: a rank of the group died, hung past the
    process group's timeout, or the ranks disagreed on which collective this is (a lookup or backward
    called on some ranks only, or in another order). The group is not usable after it: restart the
    processes and load the last checkpoint."""


# The last few finished all-to-alls, held here. gloo's worker thread lets go of a collective after wait()
# has returned; when that is the last reference, the work's tensors are freed on the worker thread, which
# must take the GIL to drop their Python objects, and a process that has begun to finalise by then aborts
# ("terminate called without an active exception": 6 of 40 runs of the README's torchrun script on 2 busy
# cores; stock torch with an all_to_all_single per step, 4 of 40). Holding the works keeps the last
# reference on this side, dropped by the main thread (by the next exchanges, or at exit). The cost: up to
# this many exchanges' send and receive buffers stay alive a little longer.
_RECENT_WORK = collections.deque(maxlen=4)


def _all_to_all(send, recv_counts, send_counts, module, stage):
    """One all_to_all_single over module's group: send[sum(send_counts[:r]):...] goes to rank r, the
    result holds what each rank sent here, in rank order. Counts are rows of send (its first axis). A
    failure of the collective (a peer gone, the group's timeout) is a CollectiveError naming the stage.

    A group of one rank exchanges nothing: send is what it receives, returned as it is (no copy; every
    caller builds send afresh and only reads the result). With peers, a rank's own part goes through the
    backend with the rest: copying it here and packing the peers' parts around it was slower with gloo
    (an A/B in one run, 2 ranks, 8.4 MB each: 52 ms against 30 ms)."""
    if module.world_size == 1:
        return send
    recv = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
    try:
        work = dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                                      group=module.process_group, async_op=True)
        work.wait()
        _RECENT_WORK.append(work)
    except RuntimeError as exc:
        raise CollectiveError(
            f"ShardedEmbedding({module.num_embeddings}, {module.embedding_dim}) on rank {module.rank} of "
            f"{module.world_size}: the all-to-all of {stage} failed: a rank of the group died or did not "
            f"reach it within the process group's timeout (init_process_group(timeout=...)): {exc}") from exc
    return recv


_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_FORWARD, _BACKWARD = 0, 1
_STAGES = ("a lookup (forward)", "a lookup's backward")


class _Header:
    """What a rank tells each peer before an exchange, one int64 row per peer: the rows it asks of
    (forward) or sends to (backward) that peer, whether its own inputs passed their checks, and what it
    takes the collective to be: the table (its number among the group's tables, in the order they were
    made, and its shape and dtype), forward or backward, and the serial of the lookup on the group (every
    ShardedEmbedding lookup on a group counts, so a rank that skipped one or called another table's is
    caught, even a table of the same shape). The forward's header replaces an all-to-all of the counts
    alone: its checks cost no extra collective."""

    COUNT, OK, TABLE, ROWS, DIM, DTYPE, PHASE, SERIAL = range(8)
    FIELDS = 8

    @staticmethod
    def exchange(module, counts, ok, phase, serial, dtype):
        """Send this rank's header, receive every rank's, and check them: if any rank's inputs failed,
        the others raise CollectiveError (the rank that failed, ok False, gets None back and raises its
        own error); if the ranks disagree on the collective, every rank raises. Returns the counts each
        peer sends here."""
        W = module.world_size
        mine = np.empty((W, _Header.FIELDS), dtype=np.int64)
        mine[:, _Header.COUNT] = counts
        mine[:, _Header.OK] = int(ok)
        mine[:, _Header.TABLE] = module._table_number
        mine[:, _Header.ROWS] = module.num_embeddings
        mine[:, _Header.DIM] = module.embedding_dim
        mine[:, _Header.DTYPE] = _DTYPE_CODES.get(dtype, -1)
        mine[:, _Header.PHASE] = phase
        mine[:, _Header.SERIAL] = serial
        theirs = _all_to_all(torch.from_numpy(mine), [1] * W, [1] * W, module, _STAGES[phase] + " header").numpy()
        if not ok:
            return None
        failed = [r for r in range(W) if not theirs[r, _Header.OK]]
        if failed:
            raise CollectiveError(
                f"ShardedEmbedding on rank {module.rank} of {W}: {_STAGES[phase]} refused on every rank: the "
                f"inputs of rank(s) {failed} failed their checks (the error on those ranks says why); no "
                "table was changed by it")
        fields = slice(_Header.TABLE, None)
        odd = [r for r in range(W) if not np.array_equal(theirs[r, fields], mine[0, fields])]
        if odd:
            r = odd[0]
            raise CollectiveError(
                f"ShardedEmbedding on rank {module.rank} of {W}: the ranks are not in the same collective: this "
                f"rank is in {_Header.describe(mine[0])}, rank {r} in {_Header.describe(theirs[r])}. Every "
                "rank of the group must call the ShardedEmbeddings of the group, and run their backward, "
                "the same number of times in the same order (an empty batch too)")
        return theirs[:, _Header.COUNT].tolist()

    @staticmethod
    def describe(row):
        dtype = {code: name for name, code in _DTYPE_CODES.items()}.get(int(row[_Header.DTYPE]), "?")
        return (f"{_STAGES[int(row[_Header.PHASE])] if 0 <= row[_Header.PHASE] < 2 else '?'} #"
                f"{int(row[_Header.SERIAL])} of table {int(row[_Header.TABLE])} of the group, a "
                f"({int(row[_Header.ROWS])}, {int(row[_Header.DIM])}) {dtype} table")


# Per process group (the object: a group made again after destroy_process_group starts afresh): the
# number of ShardedEmbeddings made on it and of lookups made on it, by this process.
_COUNTERS = weakref.WeakKeyDictionary()


def _next(group, what):
    counters = _COUNTERS.setdefault(group, {"tables": 0, "lookups": 0})
    number = counters[what]
    counters[what] = number + 1
    return number


class _Plan:
    """One lookup's exchange: what this rank asked for (send_counts rows per owner, inverse into them),
    what it was asked for (recv_counts rows per requester, local row numbers recv_rows), and the lookup's
    serial on the group (its backward's header names it)."""

    __slots__ = ("send_counts", "recv_counts", "inverse", "recv_rows", "serial")

    def __init__(self, send_counts, recv_counts, inverse, recv_rows, serial):
        self.send_counts, self.recv_counts = send_counts, recv_counts
        self.inverse, self.recv_rows, self.serial = inverse, recv_rows, serial


def _input_dist(ids, weight, module):
    """Stage 1: the plan of the lookup of ids (a tensor of global ids) and the local rows other ranks
    want here, and the block (the weight's memory, checked). The ids and the block are checked first; a
    rank whose check fails still sends its header (marked failed) and then raises its own error, so that
    every rank refuses the lookup together, before any table is touched."""
    serial = _next(module.process_group, "lookups")
    try:
        block = _table(weight, "weight", _LOOKUP_DTYPES)  # bfloat16: its memory as uint16 bits
        counts, rows, inverse = ops.exchange_plan(_ids(ids), module._bounds)
        error = None
    except Exception as exc:  # noqa: BLE001 -- any failed check: told to the group, then raised here
        error, counts = exc, np.zeros(module.world_size, dtype=np.int64)
    recv_counts = _Header.exchange(module, counts, error is None, _FORWARD, serial, weight.dtype)
    if error is not None:
        raise error
    send_counts = counts.tolist()
    recv_rows = _all_to_all(torch.from_numpy(rows), recv_counts, send_counts, module, "the ids")
    return _Plan(send_counts, recv_counts, inverse, recv_rows.numpy(), serial), block


def _renorm(weight, block, plan, max_norm, norm_type):
    """max_norm on the owner: the rows asked of it renormalised in place before they are served (torch's
    embedding_renorm_ on each distinct row: a row asked by several ranks is scaled once, as one table
    looking up their batches together would). fastembed's renorm (the adapter's), or torch's where the
    adapter would send the whole lookup to torch (`_renorm_needs_torch`)."""
    if not _renorm_needs_torch(weight, max_norm, norm_type):
        _adapter_renorm(weight, block, plan.recv_rows, max_norm, norm_type)
    else:
        with torch.no_grad():
            torch.embedding_renorm_(weight, torch.from_numpy(plan.recv_rows), float(max_norm), float(norm_type))


# The arrays below are the kernels' numpy views (`_library._bits`: a bfloat16 tensor's memory as uint16
# bits, which `_library`'s kernel calls take as bfloat16); the all-to-alls send torch tensors of the
# table's own dtype (`_library._tensor`), which gloo takes for all four.

def _local_lookup(block, plan):
    """Stage 2: the rows of this rank's block that the others asked for, in the order asked."""
    return _library._gather(block, plan.recv_rows)


def _output_dist(served, plan, module):
    """Stage 3: the asked-for rows back to the ranks that asked; out = received[inverse]."""
    fetched = _all_to_all(_library._tensor(served), plan.send_counts, plan.recv_counts, module, "the rows")
    return _library._gather(_library._bits(fetched), plan.inverse)


def _sum_per_sent_row(grad_out, plan, dim):
    """Backward of stage 3, on the rank that looked up: the gradient of each distinct id summed (in the
    row-major order of ids), one row per row it fetched (zero bits are +0.0 in every dtype)."""
    summed = np.zeros((sum(plan.send_counts), dim), dtype=grad_out.dtype)
    _library._scatter_add(summed, plan.inverse, grad_out)
    return summed


def _output_dist_backward(summed, plan, module):
    """The summed gradient rows back to the ranks that own them, in rank order of the senders."""
    return _all_to_all(_library._tensor(summed), plan.recv_counts, plan.send_counts, module,
                       "the gradient rows")


def _block_grad(received, plan, shape, padding_row, sparse):
    """Backward of stage 2, on the owner: the gradient of its block from the rows it received (none into
    padding_row, a local row number or None): dense, or a sparse COO tensor with one entry per
    (requesting rank, row), uncoalesced, in the order received."""
    if sparse:
        index = torch.from_numpy(plan.recv_rows).reshape(1, -1)
        if padding_row is not None:
            keep = index[0] != padding_row
            index, received = index[:, keep], received[keep]
        return torch.sparse_coo_tensor(index, received, shape, check_invariants=False)
    bits = _library._bits(received)
    grad = np.zeros(shape, dtype=bits.dtype)
    _library._scatter_add(grad, plan.recv_rows, bits)
    if padding_row is not None:
        grad[padding_row] = 0  # as nn.Embedding: the padding row gets no gradient (+0.0: zero bits)
    return _library._tensor(grad)


class _ShardedLookup(torch.autograd.Function):
    """out = table[ids] over the ranks of the group; d block = the gradient rows the owner received, or
    with a fused rule, the rule's update of the block's rows with them (and no gradient). The module's
    options are read once, in forward: a backward runs with the options of its lookup."""

    @staticmethod
    def forward(ctx, weight, ids, module):
        plan, block = _input_dist(ids, weight, module)
        if module.max_norm is not None:
            _renorm(weight, block, plan, module.max_norm, module.norm_type)
        out = _output_dist(_local_lookup(block, plan), plan, module)
        ctx.plan, ctx.module, ctx.shape, ctx.dtype = plan, module, block.shape, weight.dtype
        ctx.padding_row, ctx.sparse, ctx.fused = module._padding_row, module.sparse, module._fused_state()
        ctx.weight = weight if ctx.fused is not None else None  # (a leaf: no reference cycle)
        return _library._tensor(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        module, plan = ctx.module, ctx.plan
        try:
            g, error = _grad(grad_out, "the sharded embedding output", _LOOKUP_DTYPES), None
            summed = _sum_per_sent_row(g, plan, ctx.shape[1])
            counts = plan.send_counts
        except Exception as exc:  # noqa: BLE001 -- told to the group, then raised here
            error, counts = exc, [0] * module.world_size
        _Header.exchange(module, counts, error is None, _BACKWARD, plan.serial, ctx.dtype)
        if error is not None:
            raise error
        received = _output_dist_backward(summed, plan, module)
        if ctx.fused is not None:
            rule, buffers = ctx.fused
            table = _table(ctx.weight, "weight", _LOOKUP_DTYPES)
            rule.update(table, _state(buffers), plan.recv_rows, _library._bits(received),
                        padding_idx=ctx.padding_row, _format=_rule_format(table))
            _moved(ctx.weight)
            return None, None, None
        return _block_grad(received, plan, ctx.shape, ctx.padding_row, ctx.sparse), None, None


class ShardedEmbedding(torch.nn.Module):
    """A (num_embeddings, embedding_dim) table sharded by rows over the ranks of a process group.

    Rank r keeps the rows ``shard_rows = (start, stop)`` (``fastembed.row_bounds``: contiguous blocks
    as even as can be, the first ``num_embeddings % W`` ranks one row longer) as ``weight``, a
    Parameter of shape ``(stop - start, embedding_dim)``. ``forward(ids)`` takes this rank's own batch
    of GLOBAL ids (any shape, int32 or int64, empty allowed) and returns ``table[ids]``, of shape
    ``ids.shape + (embedding_dim,)``: the same bits as one ``nn.Embedding`` holding the whole table.

    The backward sends each gradient row to the rank that owns it; the owner's ``weight.grad`` is the
    gradient of its block (dense, or with ``sparse=True`` a sparse COO tensor, uncoalesced, one entry
    per rank that looked the row up), or with ``fused=`` the owner's rule updates its rows at once and
    there is no gradient. Each lookup fetches each distinct id of the rank's batch once and sums its
    gradient rows on that rank before they are sent, so a row's gradient is the sum over ranks (in rank
    order) of per-rank sums. Concatenate the ranks' batches in rank order and give them to one
    ``nn.Embedding``: where no id repeats within a rank's batch the dense gradients (and the tables after
    a step or a fused update) are bitwise equal, since each row's additions happen in the same order;
    where one does, the grouping of the additions differs and they agree to the rounding of the table's
    dtype. A sparse gradient's entries for one row, one per rank, are summed by torch when it coalesces,
    in torch's order: bitwise only where no id repeats at all.

    Collectives: every forward and every backward is a set of all-to-alls over the group, so every rank
    of the group must call forward the same number of times in the same order, and run backward
    through each of those outputs (an empty batch too: its output must take part in the loss, e.g.
    ``out.sum() * 0``, or the other ranks wait in their backward). Several ShardedEmbeddings of one
    group must be made in the same order on every rank (as one model's code does), and called, and
    reached by backward, in the same order. Each exchange starts with a header that says what each rank
    takes the collective to be (the table: its number in the group's order of making, its shape and
    dtype; forward or backward; the serial of the lookup on the group): ranks that disagree (one skipped
    a lookup, or called another table, even one of the same shape) raise `CollectiveError` on every rank
    instead of trading wrong rows.

    Faults: ids outside ``[0, num_embeddings)`` (or any input that fails its checks) raise on the rank
    that gave them, and `CollectiveError` on the others: the step is refused everywhere, before any
    table is touched. A rank that dies or hangs makes the others raise `CollectiveError` when the
    process group's timeout passes (``init_process_group(timeout=...)``, or sooner when a peer's
    connection closes); the group cannot be used after that: restart and load the last checkpoint.

    Outside this module: keep the table out of DistributedDataParallel (its gradient is not to be
    averaged over ranks: wrap the rest of the model, or list the weight in DDP's
    ``_set_params_and_buffers_to_ignore_for_model``); ``clip_grad_norm_`` on one rank sees that rank's
    block only, so a global norm needs an all-reduce of the squared norms. The backend must implement
    ``all_to_all_single`` for CPU tensors (gloo does; NCCL wants CUDA tensors, which fastembed does not
    take). A module is used by one thread at a time, as the group's collectives are.

    Parameters
    ----------
    num_embeddings, embedding_dim : int
        The shape of the whole table.
    process_group : torch.distributed.ProcessGroup or None
        The ranks that share the table (the default group when None); ``torch.distributed`` must be
        initialised. Ranks are the group's ranks.
    padding_idx : int or None
        A global row (negative counts from the end) whose gradient stays zero, as in nn.Embedding; the
        default initialisation makes it zero on the rank that owns it (a given _weight is kept as is).
    max_norm, norm_type : float or None, float
        As nn.Embedding's: before a lookup, each row it reads whose norm_type-norm exceeds max_norm is
        scaled down to it, in place, by the rank that owns the row.
    sparse : bool
        Give the block a sparse COO gradient instead of a dense one.
    dtype : torch.dtype
        float32 (default), float64, float16 or bfloat16 (16-bit rows are summed in float32 and rounded
        after each add, as nn.Embedding's dense backward does on CPU).
    fused : a rule of fastembed.torch.optim, or None
        ``FusedSGD``, ``FusedAdagrad``, ``FusedRowWiseAdagrad`` or ``FusedSparseAdam``: the owner updates
        its rows with the gradient rows it receives, in backward (any of the four dtypes; not with
        sparse). Its state is this rank's rows of it, as buffers named ``optim_<key>`` (a 0-d ``step``
        counts the backward passes, the same on every rank).
    _weight : Tensor or None
        The WHOLE table (num_embeddings, embedding_dim), the same on every rank, or this rank's block
        (stop - start, embedding_dim); each rank keeps a copy of its rows. Without it, each rank fills its
        block from N(0, 1) with its own default generator, as nn.Embedding fills a table (the padding
        row then zeroed): the table then depends on each rank's seed, so seed the ranks differently (say
        ``torch.manual_seed(seed + rank)``), or blocks of equal size start equal.
    """

    def __init__(self, num_embeddings, embedding_dim, process_group=None, *, padding_idx=None, max_norm=None,
                 norm_type=2.0, sparse=False, dtype=None, fused=None, _weight=None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedEmbedding needs an initialised torch.distributed: call "
                               "torch.distributed.init_process_group first (e.g. under torchrun)")
        group = dist.group.WORLD if process_group is None else process_group
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        if rank < 0:
            raise ValueError("this process is not a member of process_group")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.process_group, self.rank, self.world_size = group, rank, world_size
        self.padding_idx = _padding_index(padding_idx, num_embeddings)
        self.max_norm, self.norm_type = max_norm, norm_type
        self.sparse = bool(sparse)
        self.fused = _fused_rule(fused, self.sparse)
        self._table_number = _next(group, "tables")  # the header tells the group's tables apart by it
        self._bounds = ops.row_bounds(num_embeddings, world_size)
        start, stop = (int(b) for b in self._bounds[rank:rank + 2])
        self.shard_rows = (start, stop)
        owned = self.padding_idx is not None and start <= self.padding_idx < stop
        self._padding_row = self.padding_idx - start if owned else None
        if _weight is None:
            dtype = torch.float32 if dtype is None else dtype
            self._check_dtype(dtype)
            self.weight = torch.nn.Parameter(torch.empty((stop - start, embedding_dim), dtype=dtype))
            self.reset_parameters()
        else:
            shape = tuple(_weight.shape)
            if shape == (num_embeddings, embedding_dim):
                block = _weight.detach()[start:stop]
            elif shape == (stop - start, embedding_dim):
                block = _weight.detach()
            else:
                raise ValueError(f"_weight must be the whole table, shape ({num_embeddings}, {embedding_dim}), "
                                 f"or rank {rank}'s block of it, shape ({stop - start}, {embedding_dim}), "
                                 f"got {shape}")
            if dtype is not None and _weight.dtype != dtype:
                raise TypeError(f"_weight.dtype={_weight.dtype} but dtype={dtype}; a table is never cast")
            self._check_dtype(_weight.dtype)
            self.weight = torch.nn.Parameter(block.clone(memory_format=torch.contiguous_format))
        if self.fused is not None:
            for key, buf in _fused_buffers(self.fused, self.weight).items():
                self.register_buffer("optim_" + key, buf)

    @staticmethod
    def _check_dtype(dtype):
        if dtype not in _LOOKUP_DTYPES:
            raise TypeError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")

    def _fused_state(self):
        """(rule, {state name: buffer}) for the autograd function, or None."""
        if self.fused is None:
            return None
        return self.fused, {name[6:]: buf for name, buf in self.named_buffers(recurse=False)
                            if name.startswith("optim_")}

    def reset_parameters(self):
        """This rank's block from N(0, 1) (its own default generator), the padding row zero."""
        torch.nn.init.normal_(self.weight)
        if self._padding_row is not None:
            with torch.no_grad():
                self.weight[self._padding_row].fill_(0)

    def forward(self, ids):
        """This rank's rows of the whole table: ``table[ids]`` for global ids, shape ids.shape + (D,).
        A collective: every rank of the group calls it (see the class)."""
        return _ShardedLookup.apply(self.weight, ids, self)

    # ------------------------------------------------------------ copies and state

    def get_extra_state(self):
        """What a state_dict holds beside the block: where the block sits in which table, so that loading
        it on a rank that holds other rows (another world size) is refused, not silently misplaced."""
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "shard_rows": tuple(self.shard_rows), "world_size": self.world_size}

    def set_extra_state(self, state):
        self._check_extra_state(state)

    def _check_extra_state(self, state):
        mine = self.get_extra_state()
        theirs = {}
        if isinstance(state, dict):
            theirs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in state.items()}
        if any(theirs.get(k) != v for k, v in mine.items()):
            raise ValueError(f"this state_dict holds {state} of a sharded table, rank {self.rank} holds "
                             f"{mine}: a block loads only on the rank that holds the same rows of the same "
                             "table; to change the world size, use save_sharded and load_sharded")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checked before torch copies the block in: a refused load leaves this block as it was (a parent's
        # load_state_dict may have loaded the modules before this one)
        key = prefix + torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX
        if key in state_dict:
            self._check_extra_state(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __deepcopy__(self, memo):
        """A copy with its own block (and fused state) on the same process group: a process group is a
        handle on the job's ranks, shared, never copied (nor can it be)."""
        memo[id(self.process_group)] = self.process_group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        new._table_number = _next(self.process_group, "tables")  # a table of its own (copy on every rank)
        return new

    def __getstate__(self):
        raise TypeError("a ShardedEmbedding holds a torch.distributed process group, which cannot be pickled: "
                        "save module.state_dict() (this rank's block, with where it sits), or the whole table "
                        "with fastembed.torch.distributed.save_sharded")

    def extra_repr(self):
        s = (f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}/{self.world_size}, "
             f"shard_rows={self.shard_rows}")
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.max_norm is not None:
            s += f", max_norm={self.max_norm}"
        if self.norm_type != 2:
            s += f", norm_type={self.norm_type}"
        if self.sparse:
            s += ", sparse=True"
        if self.fused is not None:
            s += f", fused={self.fused!r}"
        return s


from ._shard_checkpoint import NotSharedError, load_sharded, save_sharded  # noqa: E402 -- after the class it checkpoints
