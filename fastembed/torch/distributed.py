"""An embedding table sharded by rows over a ``torch.distributed`` process group.

Rank r of a group of W ranks holds the rows ``bounds[r]`` to ``bounds[r + 1] - 1`` of the (V, D)
table (``bounds = fastembed.row_bounds(V, W)``: contiguous blocks, the first ``V % W`` ranks one row
longer). A lookup runs in three stages, as TorchRec's row-wise sharding does:

1. input distribution (`_input_dist`): the rank's ids bucketed by owner, each distinct id once
   (`fastembed.exchange_plan`), and all-to-alls of the counts and of the local row numbers;
2. local lookup (`_local_lookup`): each owner gathers the rows it was asked for;
3. output distribution (`_output_dist`): an all-to-all of those rows back, and ``rows[inverse]``.

The backward runs them in reverse: the gradient rows of each distinct id are summed on the rank
that looked them up (`_sum_per_sent_row`), sent back to their owners by one all-to-all
(`_output_dist_backward`), and each owner adds what it received into its block's gradient
(`_block_grad`). The only collectives are ``torch.distributed.all_to_all_single`` (gloo on CPU, or
any backend that has it); no sockets of fastembed's own.

Every rank of the group must take part in every collective: see `ShardedEmbedding`.
"""
import numpy as np
import torch
import torch.distributed as dist

from .. import ops
from . import _KERNEL_DTYPES, _grad, _ids, _padding_index, _table

__all__ = ["ShardedEmbedding"]


def _all_to_all(send, recv_counts, send_counts, group):
    """One all_to_all_single: send[sum(send_counts[:r]):...] goes to rank r, the result holds what each
    rank sent here, in rank order. Counts are rows of send (its first axis)."""
    recv = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
    dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                           group=group)
    return recv


class _Plan:
    """One lookup's exchange: what this rank asked for (send_counts rows per owner, inverse into them)
    and what it was asked for (recv_counts rows per requester, local row numbers recv_rows)."""

    __slots__ = ("send_counts", "recv_counts", "inverse", "recv_rows")

    def __init__(self, send_counts, recv_counts, inverse, recv_rows):
        self.send_counts, self.recv_counts = send_counts, recv_counts
        self.inverse, self.recv_rows = inverse, recv_rows


def _input_dist(ids, bounds, group):
    """Stage 1: the plan of ids (a numpy array of global ids) and the local rows other ranks want here.
    The ids are checked (IndexError) by exchange_plan before the first collective."""
    counts, rows, inverse = ops.exchange_plan(ids, bounds)
    recv_counts = _all_to_all(torch.from_numpy(counts), [1] * len(counts), [1] * len(counts), group)
    send_counts, recv_counts = counts.tolist(), recv_counts.tolist()
    recv_rows = _all_to_all(torch.from_numpy(rows), recv_counts, send_counts, group)
    return _Plan(send_counts, recv_counts, inverse, recv_rows.numpy())


def _local_lookup(block, plan):
    """Stage 2: the rows of this rank's block that the others asked for, in the order asked."""
    return ops.gather(block, plan.recv_rows)


def _output_dist(served, plan, group):
    """Stage 3: the asked-for rows back to the ranks that asked; out = received[inverse]."""
    fetched = _all_to_all(torch.from_numpy(served), plan.send_counts, plan.recv_counts, group)
    return ops.gather(fetched.numpy(), plan.inverse)


def _sum_per_sent_row(grad_out, plan, dim):
    """Backward of stage 3, on the rank that looked up: the gradient of each distinct id summed (in the
    row-major order of ids), one row per row it fetched."""
    summed = np.zeros((sum(plan.send_counts), dim), dtype=grad_out.dtype)
    ops.scatter_add(summed, plan.inverse, grad_out)
    return summed


def _output_dist_backward(summed, plan, group):
    """The summed gradient rows back to the ranks that own them, in rank order of the senders."""
    return _all_to_all(torch.from_numpy(summed), plan.recv_counts, plan.send_counts, group)


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
    grad = np.zeros(shape, dtype=received.numpy().dtype)
    ops.scatter_add(grad, plan.recv_rows, received.numpy())
    if padding_row is not None:
        grad[padding_row] = 0.0  # as nn.Embedding: the padding row gets no gradient
    return torch.from_numpy(grad)


class _ShardedLookup(torch.autograd.Function):
    """out = table[ids] over the ranks of the group; d block = the gradient rows the owner received."""

    @staticmethod
    def forward(ctx, weight, ids, module):
        idn = _ids(ids)
        block = _table(weight, "weight")
        plan = _input_dist(idn, module._bounds, module.process_group)
        out = _output_dist(_local_lookup(block, plan), plan, module.process_group)
        ctx.plan, ctx.module, ctx.shape = plan, module, block.shape
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out):
        # (Under create_graph=True the gradient is first order and not itself differentiable.)
        module, plan = ctx.module, ctx.plan
        g = _grad(grad_out, "the sharded embedding output")
        summed = _sum_per_sent_row(g, plan, ctx.shape[1])
        received = _output_dist_backward(summed, plan, module.process_group)
        grad = _block_grad(received, plan, ctx.shape, module._padding_row, module.sparse)
        return grad, None, None


class ShardedEmbedding(torch.nn.Module):
    """A (num_embeddings, embedding_dim) table sharded by rows over the ranks of a process group.

    Rank r keeps the rows ``shard_rows = (start, stop)`` (``fastembed.row_bounds``: contiguous blocks
    as even as can be, the first ``num_embeddings % W`` ranks one row longer) as ``weight``, a
    Parameter of shape ``(stop - start, embedding_dim)``. ``forward(ids)`` takes this rank's own batch
    of GLOBAL ids (any shape, int32 or int64, empty allowed) and returns ``table[ids]``, of shape
    ``ids.shape + (embedding_dim,)``: the same bits as one ``nn.Embedding`` holding the whole table.

    The backward sends each gradient row to the rank that owns it; the owner's ``weight.grad`` is the
    gradient of its block (dense, or with ``sparse=True`` a sparse COO tensor, uncoalesced, one entry
    per rank that looked the row up). Duplicate ids of one rank's batch are fetched once and their
    gradients summed on that rank before they are sent, so a row's gradient is the sum over ranks (in
    rank order) of per-rank sums. Concatenate the ranks' batches in rank order and give them to one
    ``nn.Embedding``: where no id repeats within a rank's batch the dense gradients are bitwise equal
    (each row's additions happen in the same order); where one does, the grouping of the additions
    differs and they agree to the rounding of the table's dtype. (A sparse gradient's entries for one
    row, one per rank, are summed by torch when it coalesces, in torch's order.)

    Collectives: every forward and every backward is a set of all-to-alls over the group, so every rank
    of the group must call forward the same number of times in the same order, and run backward
    through each of those outputs (an empty batch too: its output must take part in the loss, e.g.
    ``out.sum() * 0``, or the other ranks wait in their backward). Several ShardedEmbeddings must be
    called, and reached by backward, in the same order on every rank.

    Bad ids (outside ``[0, num_embeddings)``) raise IndexError on the rank that gave them before any
    collective; the other ranks are not told and wait in their own lookup (until the process group's
    timeout).

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
    sparse : bool
        Give the block a sparse COO gradient instead of a dense one.
    dtype : torch.dtype
        float32 (default), float64 or float16.
    _weight : Tensor (num_embeddings, embedding_dim) or None
        The WHOLE table, the same on every rank; each rank keeps a copy of its block. Without it, each
        rank fills its block from N(0, 1) with its own default generator, as nn.Embedding fills a
        table (the padding row then zeroed): the table then depends on each rank's seed, so seed the
        ranks differently (say ``torch.manual_seed(seed + rank)``), or blocks of equal size start equal.
    """

    def __init__(self, num_embeddings, embedding_dim, process_group=None, *, padding_idx=None, sparse=False,
                 dtype=None, _weight=None):
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
        self.sparse = bool(sparse)
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
            if tuple(_weight.shape) != (num_embeddings, embedding_dim):
                raise ValueError(f"_weight must be the whole table, shape ({num_embeddings}, {embedding_dim}), "
                                 f"got {tuple(_weight.shape)}")
            if dtype is not None and _weight.dtype != dtype:
                raise TypeError(f"_weight.dtype={_weight.dtype} but dtype={dtype}; a table is never cast")
            self._check_dtype(_weight.dtype)
            block = _weight.detach()[start:stop].clone(memory_format=torch.contiguous_format)
            self.weight = torch.nn.Parameter(block)

    @staticmethod
    def _check_dtype(dtype):
        if dtype not in _KERNEL_DTYPES:
            raise TypeError(f"dtype must be float32, float64 or float16, got {dtype}")

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

    def extra_repr(self):
        s = (f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}/{self.world_size}, "
             f"shard_rows={self.shard_rows}")
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.sparse:
            s += ", sparse=True"
        return s
