"""``fastembed.torch.EmbeddingBag`` and ``embedding_bag``: torch's bags on fastembed's bag kernels.

`EmbeddingBag` subclasses ``torch.nn.EmbeddingBag`` and changes only ``forward``: its constructor,
defaults, attributes, ``from_pretrained``, ``reset_parameters``, ``extra_repr`` and ``state_dict`` are
torch's own, so code that builds, inspects or checkpoints one cannot tell them apart.
`embedding_bag` has ``F.embedding_bag``'s signature, errors and results.

Which calls run on fastembed's kernels: a dense, contiguous CPU float32, float64, float16 or bfloat16
weight, int32 or int64 ids and offsets, per_sample_weights of the weight's dtype, and no
``scale_grad_by_freq`` (``max_norm`` included: the renorm kernel takes the same dtypes). Every other call
torch accepts (other dtypes, devices, nested ids, scale_grad_by_freq) is torch's own ``F.embedding_bag``:
torch's result either way. While torch compiles or exports, a call the kernels take is one custom op,
``torch.ops.fastembed.embedding_bag`` (`_library`), except with ``sparse=True`` or ``max_norm``: those are
torch's own F.embedding_bag there (see `_traced_embedding_bag`). bfloat16 reaches the
kernels as its memory viewed as uint16 bits, as in `fastembed.torch._library`; its sums round once per bag
to even, where torch's FBGEMM path (no padding_idx) rounds an exact tie away from zero: one unit in the
last place, on ties only. Bad arguments raise torch's
exception types with nothing changed; unlike torch, fastembed checks everything before ``max_norm``
renormalises the looked-up rows, so a call that raises leaves the weight as it was.

On the kernels, a bag is gathered and reduced in one pass (no (N, D) copy of its rows), in the order
of the ids, and the backward is bitwise the same for every thread count: the weight's gradient is dense
(a scatter of each bag's gradient into its rows) or, with ``sparse=True``, torch's sparse layout (one
entry per lookup in the order of the ids, uncoalesced, padding left out); per_sample_weights get theirs.
"""
import numpy as np
import torch
from torch.autograd.function import once_differentiable
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .. import BagArgumentError, ops
from ..nn import _fused_rule
from . import _library, _moved, _renorm_needs_torch, _run_eagerly  # (defined before fastembed.torch imports this module)
from ._library import _LOOKUP_DTYPES, _bag_format, _bits, _renorm, _tensor

__all__ = ["EmbeddingBag", "embedding_bag"]

_MODES = ("sum", "mean", "max")


def _uses_kernels(input, weight, offsets, per_sample_weights, scale_grad_by_freq):
    """Whether fastembed's kernels take this call (else torch's F.embedding_bag gives the result); the same
    test while torch compiles or exports, for the op `_traced_embedding_bag` calls."""
    if scale_grad_by_freq:
        return False
    if not (isinstance(weight, torch.Tensor) and weight.dtype in _LOOKUP_DTYPES and weight.dim() == 2
            and weight.device.type == "cpu" and weight.layout == torch.strided and weight.is_contiguous()):
        return False
    if not (isinstance(input, torch.Tensor) and input.dtype in (torch.int32, torch.int64)
            and input.device.type == "cpu" and input.layout == torch.strided and not input.is_nested):
        return False
    if offsets is not None and not (isinstance(offsets, torch.Tensor) and offsets.dtype in (torch.int32, torch.int64)
                                    and offsets.device.type == "cpu" and offsets.layout == torch.strided):
        return False
    if per_sample_weights is not None and not (
            isinstance(per_sample_weights, torch.Tensor) and per_sample_weights.dtype == weight.dtype
            and per_sample_weights.device.type == "cpu" and per_sample_weights.layout == torch.strided):
        return False
    return True


def _check_arguments(input, offsets, mode, sparse, scale_grad_by_freq, per_sample_weights):
    """F.embedding_bag's argument checks, with its exception types, all before anything is written."""
    if per_sample_weights is not None and input.size() != per_sample_weights.size():
        raise ValueError(f"embedding_bag: If per_sample_weights ({per_sample_weights.shape}) is not None, "
                         f"then it must have the same shape as the input ({input.shape})")
    if input.dim() == 2:
        if input.size(1) == 0:  # torch makes the offsets with arange(0, numel, step 0)
            raise RuntimeError("step must be nonzero: 2-D input with no columns has no bags to cut")
        if offsets is not None:
            raise ValueError("if input is 2D, then offsets has to be None, as input is treated as a mini-batch of "
                             f"fixed length sequences; got offsets of type {type(offsets)}")
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets has to be a 1D Tensor but got None")
        if offsets.dim() != 1:
            raise ValueError(f"offsets has to be a 1D Tensor, got offsets.shape={tuple(offsets.shape)}")
    else:
        raise ValueError(f"input has to be 1D or 2D Tensor, but got Tensor of dimension {input.dim()}")
    if mode not in _MODES:
        raise ValueError(f"mode has to be one of sum, mean or max, got {mode!r}")
    if mode == "max" and scale_grad_by_freq:
        raise ValueError("max mode does not support scaling the gradient by the frequency")
    if mode == "max" and sparse:
        raise ValueError("max mode does not support sparse weights")
    if per_sample_weights is not None and mode != "sum":
        raise NotImplementedError("embedding_bag: per_sample_weights was not None. per_sample_weights is only "
                                  f"supported for mode='sum' (got mode='{mode}')")


class _BagFunction(torch.autograd.Function):
    """out[b] = the mode's reduction of weight's rows of bag b; backward into weight (dense or torch's sparse
    layout) and into per_sample_weights."""

    @staticmethod
    def forward(ctx, weight, per_sample_weights, ids, offsets, mode, padding_idx, include_last_offset, sparse,
                fused=None):
        table = _bits(weight)
        idn = ids.numpy()
        offn = None if offsets is None else offsets.numpy()
        psw = None if per_sample_weights is None else _bits(per_sample_weights)
        args = dict(mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset,
                    _format=_bag_format(table))
        argmax = None
        if mode == "max":
            out, argmax = ops.embedding_bag(table, idn, offn, return_argmax=True, **args)
        else:
            out = ops.embedding_bag(table, idn, offn, per_sample_weights=psw, **args)
        ctx.table, ctx.ids, ctx.offsets, ctx.psw, ctx.argmax, ctx.args = table, idn, offn, psw, argmax, args
        ctx.sparse, ctx.fused = sparse, fused
        ctx.weight = weight if fused is not None else None  # to tell autograd of the update (a leaf: no cycle)
        # Saved so that autograd refuses a backward after any of them changed in place (torch's own check);
        # the weight only where per_sample_weights' gradient reads it.
        need_weight = per_sample_weights is not None and per_sample_weights.requires_grad
        ctx.save_for_backward(ids, offsets, per_sample_weights, weight if need_weight else None)
        return _tensor(out)

    @staticmethod
    @once_differentiable  # first order under create_graph=True too; its backward is refused, as torch's
    def backward(ctx, grad_out):
        ctx.saved_tensors  # raises if the ids, offsets, weights or weight changed in place since forward
        g = _bits(grad_out)
        weight_grad = psw_grad = None
        if ctx.needs_input_grad[1]:  # first: a fused update below moves the rows this gradient reads
            psw_grad = _tensor(ops.embedding_bag_weights_grad(
                ctx.table, ctx.ids, ctx.offsets, g, padding_idx=ctx.args["padding_idx"],
                include_last_offset=ctx.args["include_last_offset"], _format=ctx.args["_format"]))
        if ctx.needs_input_grad[0]:
            rows = ctx.table.shape[0]
            if ctx.fused is not None:
                # the rule's update of the rows the bags looked up, from their per-lookup gradient rows:
                # the result of sparse=True and the matching optimizer, with no gradient stored
                rule, buffers = ctx.fused
                index, values = ops.embedding_bag_grad_rows(rows, ctx.ids, ctx.offsets, g, per_sample_weights=ctx.psw,
                                                            **ctx.args)
                rule.update(ctx.table, {k: b.numpy() for k, b in buffers.items()}, index, values)
                _moved(ctx.weight)
            elif ctx.sparse:
                index, values = ops.embedding_bag_grad_rows(rows, ctx.ids, ctx.offsets, g, per_sample_weights=ctx.psw,
                                                            **ctx.args)
                weight_grad = torch.sparse_coo_tensor(torch.from_numpy(index).reshape(1, -1),
                                                      _tensor(values), ctx.table.shape,
                                                      check_invariants=False)
            else:
                grad_table = np.zeros(ctx.table.shape, ctx.table.dtype)  # calloc: untouched pages are free
                ops.embedding_bag_backward(grad_table, ctx.ids, ctx.offsets, g, per_sample_weights=ctx.psw,
                                           argmax=ctx.argmax, **ctx.args)
                weight_grad = _tensor(grad_table)
        return weight_grad, psw_grad, None, None, None, None, None, None, None


def embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2, scale_grad_by_freq=False, mode="mean",
                  sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """``torch.nn.functional.embedding_bag`` on fastembed's kernels (same signature, errors and results).

    See the module's docstring for which calls run on the kernels; every other is torch's own.
    """
    if has_torch_function_variadic(input, weight, offsets, per_sample_weights):  # tensor subclasses, modes
        return handle_torch_function(
            embedding_bag, (input, weight, offsets, per_sample_weights), input, weight, offsets=offsets,
            max_norm=max_norm, norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, mode=mode, sparse=sparse,
            per_sample_weights=per_sample_weights, include_last_offset=include_last_offset, padding_idx=padding_idx)
    return _embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                          per_sample_weights, include_last_offset, padding_idx)


def _embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse, per_sample_weights,
                   include_last_offset, padding_idx, fused=None, traced=True):
    """`embedding_bag`, and the fused module's path (fused: (rule, buffers); the module checked that the
    kernels take its weight; a fused rule is never dispatched to torch, which would drop it)."""
    if traced and torch.compiler.is_compiling():
        return _traced_embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                                     per_sample_weights, include_last_offset, padding_idx, fused)
    if fused is None and (not _uses_kernels(input, weight, offsets, per_sample_weights, scale_grad_by_freq)
                          or (max_norm is not None and _renorm_needs_torch(weight, max_norm, norm_type))):
        return torch.nn.functional.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq,
                                                 mode, sparse, per_sample_weights, include_last_offset, padding_idx)
    _check_arguments(input, offsets, mode, sparse, scale_grad_by_freq, per_sample_weights)
    if max_norm is not None:
        # The looked-up rows are renormalised in place before the lookup, as torch does; but first every
        # argument is checked, by a lookup whose result is dropped (the bag kernels have no check-only pass
        # yet: the rows are read twice), so a call that raises leaves the weight as it was (torch's may not).
        table, idn = _bits(weight), input.numpy()
        ops.embedding_bag(table, idn, None if offsets is None else offsets.numpy(), mode=mode,
                          per_sample_weights=None if per_sample_weights is None else _bits(per_sample_weights),
                          padding_idx=padding_idx, include_last_offset=include_last_offset, _format=_bag_format(table))
        _renorm(table, idn, max_norm, norm_type)
        torch.autograd.graph.increment_version(weight)  # an in-place change: autograd must see it, as torch's
    return _BagFunction.apply(weight, per_sample_weights, input, offsets, mode, padding_idx, include_last_offset,
                              sparse, fused)


def _traced_embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                          per_sample_weights, include_last_offset, padding_idx, fused):
    """`_embedding_bag` while torch compiles or exports: a call the kernels take is one custom op
    (``torch.ops.fastembed.embedding_bag``, traced through its fake implementation, its backward ops
    registered). torch's own F.embedding_bag, traced as torch's, gives the rest: what the kernels do not take,
    ``sparse=True`` (torch.compile holds no sparse tensor that an op could return), and ``max_norm`` (an
    in-place write of the weight before the lookup, which torch's path makes functional already). A fused bag
    runs eagerly (its backward updates the weight: a graph break, so ``fullgraph=True`` refuses it)."""
    if fused is not None:
        if torch.compiler.is_exporting():
            raise RuntimeError("a fused fastembed.torch.EmbeddingBag cannot be exported: its backward updates the "
                               "weight; export a module built with fused=None over the same weight")
        return _eager_embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                                    per_sample_weights, include_last_offset, padding_idx, fused)
    if sparse or max_norm is not None or not _uses_kernels(input, weight, offsets, per_sample_weights,
                                                           scale_grad_by_freq):
        return torch.nn.functional.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq,
                                                 mode, sparse, per_sample_weights, include_last_offset, padding_idx)
    _check_arguments(input, offsets, mode, sparse, scale_grad_by_freq, per_sample_weights)
    rows = weight.size(0)
    if padding_idx is None:
        padding_idx = -1
    elif not -rows <= padding_idx < rows:  # F.embedding_bag's RuntimeError and words, as the eager kernels raise
        raise BagArgumentError(f"padding_idx must be within the number of embeddings, {-rows} through {rows - 1}, "
                               f"but got {padding_idx}")
    elif padding_idx < 0:
        padding_idx += rows
    return _library.embedding_bag(weight, input, offsets, per_sample_weights, mode, padding_idx,
                                  include_last_offset)[0]


@_run_eagerly
def _eager_embedding_bag(*args):
    return _embedding_bag(*args, traced=False)  # (not traced again: non-strict export keeps is_compiling() True)


class EmbeddingBag(torch.nn.EmbeddingBag):
    """``torch.nn.EmbeddingBag`` whose forward runs fastembed's bag kernels (see `embedding_bag`).

    Everything but ``forward`` is torch's own class: the same constructor and defaults, attributes,
    initialisation, ``from_pretrained``, ``extra_repr`` and ``state_dict``; ``isinstance(m,
    torch.nn.EmbeddingBag)`` holds.

    ``fused`` (keyword only; also taken by ``from_pretrained``): a rule of `fastembed.torch.optim`
    (``FusedSGD``, ``FusedAdagrad``, ``FusedRowWiseAdagrad``, ``FusedSparseAdam``), as for
    `fastembed.torch.Embedding`: backward updates the rows the bags looked up, in place, from their
    per-lookup gradient rows, and stores no gradient: the result of ``sparse=True`` and the matching
    optimizer. Its state lives in the buffers ``optim_<name>`` (saved by ``state_dict()``). A float32
    CPU contiguous weight, modes sum and mean (max mode has no per-lookup gradient, as it has no sparse
    one), no ``sparse`` nor ``scale_grad_by_freq``. The update happens during backward: tie no fused table.
    It moves the weight's version as an in-place write does: a node that saved the weight and runs after
    it (another lookup of the same fused bag with per_sample_weights that need a gradient, a penalty on
    the weight built before the lookup) raises torch's in-place error rather than read the moved rows.
    """

    def __init__(self, num_embeddings, embedding_dim, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                 mode="mean", sparse=False, _weight=None, include_last_offset=False, padding_idx=None, device=None,
                 dtype=None, *, fused=None):
        super().__init__(num_embeddings, embedding_dim, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                         _weight, include_last_offset, padding_idx, device, dtype)
        self._set_fused(fused)

    def _set_fused(self, fused):
        fused = _fused_rule(fused, self.sparse)
        if fused is not None:
            if self.mode == "max":
                raise NotImplementedError("fused= takes modes sum and mean: max mode gives no gradient rows per "
                                          "lookup to update from (torch has no sparse max either)")
            if self.scale_grad_by_freq:
                raise NotImplementedError("fused= does not take scale_grad_by_freq=True")
            w = self.weight
            if not (w.dtype == torch.float32 and w.device.type == "cpu" and w.layout == torch.strided
                    and w.is_contiguous()):
                raise TypeError(f"fused= needs a contiguous CPU float32 weight, got dtype={w.dtype}, "
                                f"device={w.device}, contiguous={w.is_contiguous()}")
            for key, arr in fused.new_state(w.detach().numpy()).items():
                self.register_buffer("optim_" + key, torch.from_numpy(arr))
        self.fused = fused

    @classmethod
    def from_pretrained(cls, embeddings, freeze=True, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                        mode="mean", sparse=False, include_last_offset=False, padding_idx=None, *, fused=None):
        bag = super().from_pretrained(embeddings, freeze, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                                      include_last_offset, padding_idx)
        bag._set_fused(fused)
        return bag

    def forward(self, input, offsets=None, per_sample_weights=None):
        if self.fused is None:
            return embedding_bag(input, self.weight, offsets, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                                 self.mode, self.sparse, per_sample_weights, self.include_last_offset,
                                 self.padding_idx)
        buffers = {name[6:]: b for name, b in self.named_buffers(recurse=False) if name.startswith("optim_")}
        return _embedding_bag(input, self.weight, offsets, self.max_norm, self.norm_type, False, self.mode, False,
                              per_sample_weights, self.include_last_offset, self.padding_idx, (self.fused, buffers))

    def extra_repr(self):
        return super().extra_repr() + ("" if self.fused is None else f", fused={self.fused!r}")
