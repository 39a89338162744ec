"""fastembed's kernels as PyTorch custom operators (``torch.ops.fastembed.*``), for compiled and exported
models.

Dynamo cannot trace into numpy calls, so a module that calls `fastembed.ops` from a Python autograd
function breaks a ``torch.compile`` graph around it and cannot be exported. Registered here with
``torch.library``, each kernel is one opaque node of a graph: a fake implementation tells the tracer the
output's shape and dtype without running anything, and the registered autograd formulas make the
backward (and the backward of the backward: torch's embedding allows double backward) ops of their own.

The modules of `fastembed.torch` call these ops only while torch compiles or exports (see
``torch.compiler.is_compiling``): in eager mode a custom op's Python dispatch costs more than the whole
lookup at the book's size, and the autograd functions there are faster. Both paths run the same kernels.

Each op takes what the kernels take (CPU tables of float32, float64, float16 or bfloat16, int32 or int64 ids);
for the lookups, any other table dtype (integers) is torch's own aten op, so an op always gives torch's
result. The bag ops (``fastembed::embedding_bag`` and its two backward ops) refuse other dtypes with a
TypeError instead: `fastembed.torch.EmbeddingBag` sends those calls to torch's F.embedding_bag before an op,
and an aten fallback would need aten's bag bookkeeping (offset2bag, bag_size) in the backward. Their
double backward is refused, as torch refuses it for its bags. No arithmetic here: the kernels do it.

bfloat16: numpy has no such dtype, so a bfloat16 tensor reaches the kernels as its own memory viewed as
uint16 (`_bits`), with the kernels' private keyword ``_format="bfloat16"`` (`_gather` and the three others
below, which `fastembed.torch`'s modules call too), and their uint16 results are viewed back as bfloat16
(`_tensor`): never a copy or a cast of a table. Inside the adapter a uint16 array is always such bits
(ids are int32 or int64), so the array's dtype says which call to make.
"""
from typing import Optional

import numpy as np
import torch

from .. import _kernels, ops

__all__ = ["embedding", "embedding_backward", "token_position", "token_position_backward", "embedding_bag",
           "embedding_bag_backward", "embedding_bag_weights_grad"]

Tensor = torch.Tensor


def _kernel_table(weight):
    """Whether fastembed's kernels take this table as it is (CPU, strided, float32/64, float16 or bfloat16,
    contiguous)."""
    return (weight.dtype in _LOOKUP_DTYPES and weight.device.type == "cpu" and weight.layout == torch.strided
            and weight.is_contiguous())


# The table dtypes whose memory numpy reads as it is: what the callers that hand tables to `fastembed.ops`
# (ShardedEmbedding, EmbeddingBag's checks, the fused rules) take from here.
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16)
# The dtypes of a lookup on the kernels (these ops, Embedding, TokenPositionEmbedding): bfloat16 too, as
# uint16 bits through the helpers below.
_LOOKUP_DTYPES = _KERNEL_DTYPES + (torch.bfloat16,)
_BITS = np.dtype(np.uint16)  # a bfloat16 tensor's memory as numpy sees it here
_NUMPY_OF = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
             torch.float16: np.dtype(np.float16), torch.bfloat16: _BITS}
_BF16 = "bfloat16"  # the kernels' _format for _BITS arrays


def _np(tensor):
    return tensor.detach().numpy()


def _bits(tensor):
    """A table's memory as a numpy array, shared: a bfloat16 tensor's as uint16 bits."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.uint16)
    return tensor.numpy()


def _tensor(array):
    """A kernel's result as a tensor over the same memory: uint16 bits as bfloat16."""
    result = torch.from_numpy(array)
    return result.view(torch.bfloat16) if array.dtype == _BITS else result


def _zeros(rows, dim, dtype):
    """A new (rows, dim) tensor of zeros for a dense gradient, from numpy's zeroed allocation (calloc): a large
    one is mapped from the OS already zero, so only the pages the scatter then writes cost anything, where
    torch.zeros writes every byte of the table's size (most of a lookup's gradient is rows no id named)."""
    if dtype not in _NUMPY_OF:
        return torch.zeros((rows, dim), dtype=dtype)
    return _tensor(np.zeros((rows, dim), _NUMPY_OF[dtype]))


# The four kernels of a lookup and its backward, and max_norm's renorm, on numpy tables from `_bits`: `fastembed.ops` for the
# dtypes numpy has, the kernels themselves with _format for bfloat16 bits (the ops wrappers take no
# _format; ids and positions are normalised here as those wrappers do, and every check is the kernels').

def _gather(table, ids):
    if table.dtype == _BITS:
        return _kernels.gather(table, ops.as_ids(ids), None, _format=_BF16)
    return ops.gather(table, ids)


def _gather_add(token, position, ids, positions):
    if token.dtype == _BITS:
        ids = ops.as_ids(ids)
        return _kernels.gather_add(token, position, ids, ops._as_positions(positions, ids), None, _format=_BF16)
    return ops.gather_add(token, position, ids, positions=positions)


def _scatter_add(grad_table, ids, grad_out, scale_grad_by_freq=False):
    if grad_table.dtype == _BITS:
        _kernels.scatter_add(grad_table, ops.as_ids(ids), grad_out, scale_grad_by_freq=scale_grad_by_freq,
                             _format=_BF16)
    else:
        ops.scatter_add(grad_table, ids, grad_out, scale_grad_by_freq=scale_grad_by_freq)


def _renorm(table, ids, max_norm, norm_type):
    if table.dtype == _BITS:
        _kernels.renorm(table, ops.as_ids(ids), max_norm, norm_type, _format=_BF16)
    else:
        ops.renorm(table, ids, max_norm, norm_type)


def _gather_add_backward(grad_hidden, ids, token_grad, position_grad, positions):
    if token_grad.dtype == _BITS:
        ids = ops.as_ids(ids)
        _kernels.gather_add_backward(grad_hidden, ids, token_grad, position_grad,
                                     ops._as_positions(positions, ids), _format=_BF16)
    else:
        ops.gather_add_backward(grad_hidden, ids, token_grad, position_grad, positions=positions)


# ---------------------------------------------------------------- a lookup: weight[ids]

@torch.library.custom_op("fastembed::embedding", mutates_args=(), device_types="cpu")
def embedding(weight: Tensor, ids: Tensor, padding_idx: int) -> Tensor:
    """``weight[ids]`` (padding_idx: a row in [0, rows) that gets no gradient, or -1 for none, as in aten)."""
    if not _kernel_table(weight):
        return torch.ops.aten.embedding.default(weight, ids, padding_idx)
    return _tensor(_gather(_bits(weight), _np(ids)))


@embedding.register_fake
def _(weight, ids, padding_idx):
    return weight.new_empty((*ids.shape, weight.shape[1]))


@torch.library.custom_op("fastembed::embedding_backward", mutates_args=(), device_types="cpu")
def embedding_backward(grad: Tensor, ids: Tensor, num_weights: int, padding_idx: int) -> Tensor:
    """The dense gradient of `embedding`'s table: grad's rows added into the rows of ids, in the order of
    ids (deterministic); the padding row stays zero."""
    if not _kernel_table(grad):
        return torch.ops.aten.embedding_dense_backward.default(grad, ids, num_weights, padding_idx, False)
    out = _zeros(num_weights, grad.shape[-1], grad.dtype)
    if ids.numel():
        table = _bits(out)
        _scatter_add(table, _np(ids), _bits(grad))
        if padding_idx >= 0:
            table[padding_idx] = 0.0
    return out


@embedding_backward.register_fake
def _(grad, ids, num_weights, padding_idx):
    return grad.new_empty((num_weights, grad.shape[-1]))


def _embedding_setup(ctx, inputs, output):
    weight, ids, padding_idx = inputs
    ctx.save_for_backward(ids)
    ctx.num_weights, ctx.padding_idx = weight.shape[0], padding_idx


def _embedding_grad(ctx, grad):
    (ids,) = ctx.saved_tensors
    return embedding_backward(grad, ids, ctx.num_weights, ctx.padding_idx), None, None


embedding.register_autograd(_embedding_grad, setup_context=_embedding_setup)


def _backward_setup(ctx, inputs, output):
    grad, ids, num_weights, padding_idx = inputs
    ctx.save_for_backward(ids)
    ctx.padding_idx = padding_idx


def _backward_grad(ctx, grad_grad):
    """The backward of the backward: the scatter-add's adjoint is a lookup, with the lookups of the
    padding row (which got no gradient) getting none back."""
    (ids,) = ctx.saved_tensors
    rows = embedding(grad_grad, ids, -1)
    if ctx.padding_idx >= 0:
        rows = rows.masked_fill((ids == ctx.padding_idx).unsqueeze(-1), 0)
    return rows, None, None, None


embedding_backward.register_autograd(_backward_grad, setup_context=_backward_setup)


# ---------------------------------------------------------------- the book's first op: token[ids] + position[p]

def _same_dtype(token, position):
    """The two tables of one lookup share a dtype (as the eager layer requires; never cast)."""
    if token.dtype != position.dtype:
        raise TypeError(f"token and position tables must have the same dtype, got {token.dtype} and {position.dtype}")


@torch.library.custom_op("fastembed::token_position", mutates_args=(), device_types="cpu")
def token_position(token: Tensor, position: Tensor, ids: Tensor, positions: Optional[Tensor], start: int) -> Tensor:
    """``token[ids] + position[p]``: p is positions (broadcast to ids.shape) when given, else
    ``start + arange(T)`` along the last axis of ids."""
    _same_dtype(token, position)
    if not (_kernel_table(token) and _kernel_table(position)):
        p = torch.from_numpy(ops.positions_array(_np(ids), start if positions is None else _np(positions)))
        return torch.ops.aten.embedding.default(token, ids) + torch.ops.aten.embedding.default(position, p)
    where = start if positions is None else _np(positions)
    return _tensor(_gather_add(_bits(token), _bits(position), _np(ids), where))


@token_position.register_fake
def _(token, position, ids, positions, start):
    _same_dtype(token, position)
    return token.new_empty((*ids.shape, token.shape[1]))


@torch.library.custom_op("fastembed::token_position_backward", mutates_args=(), device_types="cpu")
def token_position_backward(grad: Tensor, ids: Tensor, positions: Optional[Tensor], start: int, num_tokens: int,
                            num_positions: int) -> tuple[Tensor, Tensor]:
    """Both tables' dense gradients of `token_position`, in one pass over grad."""
    where = start if positions is None else _np(positions)
    if not _kernel_table(grad):
        token_grad = torch.zeros((num_tokens, grad.shape[-1]), dtype=grad.dtype)
        position_grad = torch.zeros((num_positions, grad.shape[-1]), dtype=grad.dtype)
        p = torch.from_numpy(ops.positions_array(_np(ids), where))
        d = grad.shape[-1]
        token_grad.index_add_(0, ids.reshape(-1).long(), grad.reshape(-1, d))
        position_grad.index_add_(0, p.reshape(-1), grad.reshape(-1, d))
        return token_grad, position_grad
    token_grad, position_grad = _zeros(num_tokens, grad.shape[-1], grad.dtype), _zeros(num_positions, grad.shape[-1],
                                                                                    grad.dtype)
    _gather_add_backward(_bits(grad), _np(ids), _bits(token_grad), _bits(position_grad), where)
    return token_grad, position_grad


@token_position_backward.register_fake
def _(grad, ids, positions, start, num_tokens, num_positions):
    d = grad.shape[-1]
    return grad.new_empty((num_tokens, d)), grad.new_empty((num_positions, d))


def _token_position_setup(ctx, inputs, output):
    token, position, ids, positions, start = inputs
    ctx.save_for_backward(ids, positions)
    ctx.start, ctx.sizes = start, (token.shape[0], position.shape[0])


def _token_position_grad(ctx, grad):
    ids, positions = ctx.saved_tensors
    token_grad, position_grad = token_position_backward(grad, ids, positions, ctx.start, *ctx.sizes)
    return token_grad, position_grad, None, None, None


token_position.register_autograd(_token_position_grad, setup_context=_token_position_setup)


def _tp_backward_setup(ctx, inputs, output):
    grad, ids, positions, start, num_tokens, num_positions = inputs
    ctx.save_for_backward(ids, positions)
    ctx.start, ctx.dim, ctx.dtype, ctx.sizes = start, grad.shape[-1], grad.dtype, (num_tokens, num_positions)


def _tp_backward_grad(ctx, token_gg, position_gg):
    """The adjoint of the two scatter-adds is the forward lookup itself, of the incoming tables."""
    ids, positions = ctx.saved_tensors
    if token_gg is None:
        token_gg = ids.new_zeros((ctx.sizes[0], ctx.dim), dtype=ctx.dtype)
    if position_gg is None:
        position_gg = ids.new_zeros((ctx.sizes[1], ctx.dim), dtype=ctx.dtype)
    return token_position(token_gg, position_gg, ids, positions, ctx.start), None, None, None, None, None


token_position_backward.register_autograd(_tp_backward_grad, setup_context=_tp_backward_setup)


# ---------------------------------------------------------------- bags: each bag's rows reduced to one row

def _bag_format(array):
    """The bag kernels' private _format for an array from `_bits` (the ops here and `_bag`'s eager path):
    bfloat16 for uint16 bits, else None."""
    return _BF16 if array.dtype == _BITS else None


def _bag_inputs(ids, offsets, per_sample_weights):
    """The numpy views the bag kernels take (psw as bits, like the table); contiguous, as the kernels need."""
    psw = None if per_sample_weights is None else _bits(per_sample_weights.contiguous())
    return _np(ids.contiguous()), None if offsets is None else _np(offsets.contiguous()), psw


def _bag_padding(padding_idx):
    return None if padding_idx < 0 else padding_idx


def _bag_table(weight):
    """A bag op's table for the kernels: their dtypes only (the modules send every other to torch's own
    F.embedding_bag before reaching an op), a strided copy of a table that is not contiguous."""
    if weight.dtype not in _LOOKUP_DTYPES or weight.device.type != "cpu" or weight.layout != torch.strided:
        raise TypeError(f"fastembed::embedding_bag takes CPU strided tables of {', '.join(map(str, _LOOKUP_DTYPES))}, "
                        f"got {weight.dtype} on {weight.device} ({weight.layout})")
    return _bits(weight.contiguous())


def _bag_count(ids, offsets, include_last_offset):
    """B, the bags of a call: the rows of 2-D ids, else one per offset (the last one closing the
    last bag with include_last_offset)."""
    if ids.dim() == 2:
        return ids.shape[0]
    return max(offsets.shape[0] - 1, 0) if include_last_offset else offsets.shape[0]


@torch.library.custom_op("fastembed::embedding_bag", mutates_args=(), device_types="cpu")
def embedding_bag(weight: Tensor, ids: Tensor, offsets: Optional[Tensor], per_sample_weights: Optional[Tensor],
                  mode: str, padding_idx: int, include_last_offset: bool) -> tuple[Tensor, Tensor]:
    """``F.embedding_bag`` on the bag kernels: (out, argmax). out is (B, D); argmax (B, D) int64 in mode
    "max" (the row each column's max came from, which the backward needs), else empty. padding_idx is a
    row in [0, rows), or -1 for none (aten's convention; the modules normalise a negative one first)."""
    table = _bag_table(weight)
    idn, offn, psw = _bag_inputs(ids, offsets, per_sample_weights)
    args = dict(mode=mode, per_sample_weights=psw, padding_idx=_bag_padding(padding_idx),
                include_last_offset=include_last_offset, _format=_bag_format(table))
    if mode == "max":
        out, argmax = ops.embedding_bag(table, idn, offn, return_argmax=True, **args)
        return _tensor(out), torch.from_numpy(argmax)
    return _tensor(ops.embedding_bag(table, idn, offn, **args)), torch.empty(0, dtype=torch.int64)


@embedding_bag.register_fake
def _(weight, ids, offsets, per_sample_weights, mode, padding_idx, include_last_offset):
    shape = (_bag_count(ids, offsets, include_last_offset), weight.shape[1])
    return weight.new_empty(shape), ids.new_empty(shape if mode == "max" else (0,), dtype=torch.int64)


@torch.library.custom_op("fastembed::embedding_bag_backward", mutates_args=(), device_types="cpu")
def embedding_bag_backward(grad: Tensor, ids: Tensor, offsets: Optional[Tensor], per_sample_weights: Optional[Tensor],
                           argmax: Tensor, num_weights: int, mode: str, padding_idx: int,
                           include_last_offset: bool) -> Tensor:
    """The dense gradient of `embedding_bag`'s table (argmax: its second output; used in mode "max" only):
    each bag's gradient, scaled by its lookups' weights or 1/count, added into their rows in bag order, then
    ids order; the padding row stays zero."""
    out = _zeros(num_weights, grad.shape[-1], grad.dtype)
    g = _bag_table(grad)
    idn, offn, psw = _bag_inputs(ids, offsets, per_sample_weights)
    ops.embedding_bag_backward(_bits(out), idn, offn, g, mode=mode, per_sample_weights=psw,
                               padding_idx=_bag_padding(padding_idx), include_last_offset=include_last_offset,
                               argmax=_np(argmax.contiguous()) if mode == "max" else None, _format=_bag_format(g))
    return out


@embedding_bag_backward.register_fake
def _(grad, ids, offsets, per_sample_weights, argmax, num_weights, mode, padding_idx, include_last_offset):
    return grad.new_empty((num_weights, grad.shape[-1]))


@torch.library.custom_op("fastembed::embedding_bag_weights_grad", mutates_args=(), device_types="cpu")
def embedding_bag_weights_grad(weight: Tensor, ids: Tensor, offsets: Optional[Tensor], grad: Tensor,
                               padding_idx: int, include_last_offset: bool) -> Tensor:
    """per_sample_weights' gradient of a sum bag: each lookup's row dotted with its bag's gradient (0 for
    padding and for ids in no bag); ids' shape."""
    table = _bag_table(weight)
    idn, offn, _ = _bag_inputs(ids, offsets, None)
    return _tensor(ops.embedding_bag_weights_grad(
        table, idn, offn, _bits(grad.contiguous()), padding_idx=_bag_padding(padding_idx),
        include_last_offset=include_last_offset, _format=_bag_format(table)))


@embedding_bag_weights_grad.register_fake
def _(weight, ids, offsets, grad, padding_idx, include_last_offset):
    return weight.new_empty(ids.shape)


def _bag_setup(ctx, inputs, output):
    weight, ids, offsets, per_sample_weights, mode, padding_idx, include_last_offset = inputs
    # the weight only where per_sample_weights' gradient reads it
    psw_grad = per_sample_weights is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(ids, offsets, per_sample_weights, output[1], weight if psw_grad else None)
    ctx.num_weights, ctx.args = weight.shape[0], (mode, padding_idx, include_last_offset)


def _bag_grad(ctx, grad, _argmax_grad):
    ids, offsets, per_sample_weights, argmax, weight = ctx.saved_tensors
    mode, padding_idx, include_last_offset = ctx.args
    weight_grad = psw_grad = None
    if ctx.needs_input_grad[0]:
        weight_grad = embedding_bag_backward(grad, ids, offsets, per_sample_weights, argmax, ctx.num_weights, *ctx.args)
    if weight is not None:
        psw_grad = embedding_bag_weights_grad(weight, ids, offsets, grad, padding_idx, include_last_offset)
    return weight_grad, None, None, psw_grad, None, None, None


embedding_bag.register_autograd(_bag_grad, setup_context=_bag_setup)
