"""PyTorch autograd for fastembed's kernels (CPU tables of float32, float64, float16 or bfloat16; int32 or int64 ids).

`Embedding` is a drop-in for ``torch.nn.Embedding`` and `TokenPositionEmbedding`
is the book's first op, ``token.weight[ids] + position.weight[positions]``. Both
are `torch.autograd.Function`s whose forward and backward call `fastembed.ops` on
the tensors' own memory (``tensor.numpy()`` shares it; a bfloat16 tensor's is
viewed as uint16 bits for the kernels' bfloat16 path, see `_library`): no copy of
a table, and no arithmetic here. A sparse gradient has torch's own layout: one entry per
lookup, uncoalesced, in the order of the ids (minus ``padding_idx`` entries), so
code written for ``nn.Embedding(sparse=True)`` reads the same ``_indices()``;
fastembed's optimizers (`fastembed.torch.optim`) take it without a sort. (A sparse
`Embedding`'s lookup is torch's own F.embedding: its backward has nothing to compute.)
Double backward works as torch's: under ``create_graph=True`` the backward is the
custom op of `_library`, whose own backward is registered.

Compiled and exported models (``torch.compile``, ``torch.export``): while torch
traces, a kernel lookup is one custom operator (``torch.ops.fastembed.embedding``,
``torch.ops.fastembed.token_position``, see `_library`); what those do not cover
(sparse, ``max_norm``, ``scale_grad_by_freq``, other dtypes) is traced as torch's own
F.embedding, and fused layers (and sparse token+position layers) run eagerly, a
graph break that ``fullgraph=True`` refuses. `EmbeddingBag` (``_bag.py``) is one
``torch.ops.fastembed.embedding_bag`` node while torch traces, except sparse and
``max_norm`` bags (torch's own op there) and fused bags (eager, a graph break).

With ``fused=`` (a rule from `fastembed.torch.optim`, e.g. ``FusedAdagrad(lr=0.1)``)
the backward applies the optimizer update to the rows it touches, straight from
the incoming gradient, and stores no gradient; the optimizer's state is kept in
the module's buffers (``optim_*``), so ``state_dict()`` saves it.

PyTorch is optional: ``import fastembed`` never imports it.
"""
try:
    import torch
except ImportError as exc:
    if exc.name != "torch":  # torch is there but broken: its own error says more
        raise
    raise ImportError(
        "fastembed.torch needs PyTorch, which is not installed: install it with `pip install torch` "
        "(or `pip install fastembed-kernels[torch]`). The rest of fastembed works without it."
    ) from exc

import numpy as np

from .. import ops
from ..nn import INIT_STD, _fused_rule
from . import _library


def _run_eagerly(fn):
    """``torch.compiler.disable(fn)``, except that torch._dynamo is imported at fn's first call and not at
    fastembed.torch's import: that import costs seconds of CPU, and most processes (every rank of a sharded
    table, any eager user) never compile. fn runs only while torch compiles, when torch._dynamo is loaded
    already. torch's own lazy form is private; without it, the public decorator."""
    lazy = getattr(getattr(torch, "_compile", None), "_disable_dynamo", None)
    return lazy(fn) if callable(lazy) else torch.compiler.disable(fn)

__all__ = ["Embedding", "TokenPositionEmbedding", "functional"]

_ID_DTYPES = (torch.int32, torch.int64)
# The table dtypes numpy reads as they are (what `_table` and `_grad` take: ShardedEmbedding takes these), and
# those a lookup of Embedding, functional.embedding and TokenPositionEmbedding runs on the kernels with
# (bfloat16 too, as uint16 bits: `_library._bits`), one list for the modules and the custom ops; max_norm's
# renorm and the fused rules take the same four.
_KERNEL_DTYPES = _library._KERNEL_DTYPES
_LOOKUP_DTYPES = _library._LOOKUP_DTYPES
# scale_grad_by_freq's backward on the kernels: the dtypes whose scaled adds are bitwise torch's in every
# column (float16 and bfloat16 are one ulp apart in torch's scalar tail columns: torch's own lookup there)
_SCALED_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------- tensors as numpy views, checked

def _table(tensor, name, dtypes=_KERNEL_DTYPES):
    """A CPU C-contiguous tensor's memory as a numpy array (shared, never copied), of a dtype in dtypes
    (`_LOOKUP_DTYPES` for a lookup: a bfloat16 tensor's memory is then uint16 bits)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_cpu or tensor.layout != torch.strided:
        raise TypeError(f"fastembed runs on dense CPU tensors only, got {name} on {tensor.device}, "
                        f"layout {tensor.layout}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} must be {_names(dtypes)} (fastembed never casts tables), got "
                        f"{name}.dtype={tensor.dtype}; "
                        "convert once with .float()")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (a table is never copied behind your back), got "
                         f"{name}.stride()={tuple(tensor.stride())}; make it so once with .contiguous()")
    return _library._bits(tensor)


def _names(dtypes):
    """'float32, float64 or float16': dtypes as an error message says them."""
    words = [str(d).replace("torch.", "") for d in dtypes]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _ids(tensor, name="ids"):
    """A CPU int32 or int64 tensor's memory as a numpy array (the checks below run only when it is not one)."""
    try:
        if tensor.dtype in _ID_DTYPES:
            return tensor.numpy()  # raises for a tensor that is not dense on the CPU
    except (AttributeError, TypeError, RuntimeError):
        pass
    return _checked_ids(tensor, name)


def _checked_ids(tensor, name):
    """`_ids` the slow way, raising the error that says what is wrong."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 or int64, got {type(tensor).__name__}; "
                        "wrap it with torch.as_tensor")
    if not tensor.is_cpu or tensor.layout != torch.strided:
        raise TypeError(f"fastembed runs on dense CPU tensors only, got {name} on {tensor.device}, "
                        f"layout {tensor.layout}")
    if tensor.dtype not in _ID_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {name}.dtype={tensor.dtype}")
    return tensor.numpy()


def _grad(tensor, name, dtypes=_KERNEL_DTYPES):
    """The incoming gradient as a numpy array (the kernels make a strided one contiguous); bfloat16 as
    uint16 bits when dtypes has it."""
    if not tensor.is_cpu or tensor.layout != torch.strided or tensor.dtype not in dtypes:
        raise TypeError(f"the gradient of {name} must be a dense CPU {_names(dtypes)} tensor, got "
                        f"dtype={tensor.dtype}, "
                        f"device={tensor.device}, layout={tensor.layout}")
    return _library._bits(tensor)


def _sparse(ids, grad_out, shape, padding_idx=None):
    """torch's sparse embedding gradient: one entry per lookup, in the order of ids, uncoalesced; the
    entries of padding_idx left out. The values are grad_out's rows (a view when it is contiguous)."""
    index = ids.reshape(1, -1)
    if index.dtype != torch.int64:
        index = index.long()
    values = grad_out.reshape(index.shape[1], shape[1])
    if padding_idx is not None:
        keep = index[0] != padding_idx
        index, values = index[:, keep], values[keep]
    return torch.sparse_coo_tensor(index, values, shape, check_invariants=False)


class _View:
    """A parameter's memory as a numpy array for a lookup (`_table` of `_LOOKUP_DTYPES`), checked and made
    once and remade only when the tensor's
    memory, dtype, shape or strides change (``weight.data = ...``). The cached view keeps the old memory
    alive, so a new tensor can never sit at the same address."""

    __slots__ = ("key", "array")

    def __init__(self):
        self.key = self.array = None

    def __call__(self, tensor, name):
        key = (tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())
        if key != self.key:
            self.array, self.key = _table(tensor, name, _LOOKUP_DTYPES), key
        return self.array


def _check_version(ctx, ids):
    """The ids tensor must not have been changed in place between forward and backward (as torch checks
    the tensors it saves)."""
    if ids._version != ctx.ids_version:
        raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                           f"inplace operation: the ids given to forward are at version {ids._version}; "
                           f"expected version {ctx.ids_version} instead")


def _positions(positions, name="positions"):
    """None, an int start, or the numpy view of an integer tensor (ops.py broadcasts and checks it)."""
    if positions is None or isinstance(positions, torch.Tensor):
        return None if positions is None else _ids(positions, name)
    if isinstance(positions, (bool, np.bool_)) or not isinstance(positions, (int, np.integer)):
        raise TypeError(f"{name} must be None, an int start, or an int32/int64 tensor, got {type(positions).__name__}")
    return int(positions)


# ---------------------------------------------------------------- autograd functions

def _state(buffers):
    """A fused rule's state as numpy views of the module's buffers (the state_dict's own memory; a bfloat16
    buffer's as uint16 bits)."""
    return {key: _library._bits(buf) for key, buf in buffers.items()}


def _rule_format(table):
    """The fused rules' private _format for a table from `_table(..., _LOOKUP_DTYPES)`: a bfloat16 table is
    uint16 bits there (the modules take no uint16 table)."""
    return "bfloat16" if table.dtype == np.uint16 else None


def _fused_buffers(rule, weight):
    """A fused rule's new state for weight (float32, float64, float16 or bfloat16), as tensors over the
    arrays new_state gave (bfloat16 ones as bfloat16): the module registers them as buffers."""
    table = _table(weight, "weight", _LOOKUP_DTYPES)
    return {key: _library._tensor(arr) for key, arr in rule.new_state(table, _format=_rule_format(table)).items()}


def _moved(weight):
    """Tell autograd that a fused update changed weight in place during backward (as an optimizer's step
    would, but earlier): a node that saved weight and has yet to run refuses with torch's in-place error
    instead of reading the new rows (say an L2 penalty on the table built before the lookup)."""
    torch.autograd.graph.increment_version(weight)


def _prepared_update(fused, table, ids, g):
    """A fused rule's update of the rows of ids, checked and ready to run (call it to move them);
    fused is (rule, buffers)."""
    rule, buffers = fused
    return rule._prepare(table, _state(buffers), ids, g, None, _rule_format(table))


class _EmbeddingFunction(torch.autograd.Function):
    """out = weight[ids]; d weight = scatter-add of d out into the rows of ids (none into padding_idx),
    or with a fused rule, the rule's update of those rows and no gradient. (sparse is taken for a
    lookup with no gradient to give; one with a sparse gradient is `Embedding._sparse_lookup`.)"""

    @staticmethod
    def forward(ctx, weight, ids, table, padding_idx, sparse, fused, scale_grad_by_freq=False):
        idn = _ids(ids)
        out = _library._gather(table, idn)
        ctx.ids, ctx.ids_np, ctx.ids_version = ids, idn, ids._version
        ctx.table, ctx.padding_idx, ctx.sparse, ctx.fused = table, padding_idx, sparse, fused
        ctx.scale_grad_by_freq = scale_grad_by_freq
        ctx.weight = weight if fused is not None else None  # (a leaf: no reference cycle)
        return _library._tensor(out)

    @staticmethod
    def jvp(ctx, weight_tangent, *_):
        """Forward-mode AD: the lookup is linear in the weight, so the tangent is the tangent's rows
        (as torch's: max_norm's renorm is outside autograd in torch too)."""
        return torch.nn.functional.embedding(ctx.ids, weight_tangent)

    @staticmethod
    def backward(ctx, grad_out):
        none = (None,) * 6
        if not ctx.needs_input_grad[0]:
            return (None,) + none
        _check_version(ctx, ctx.ids)  # (a sparse Embedding is torch's F.embedding: never here)
        if torch.is_grad_enabled() and ctx.fused is None:
            # backward(create_graph=True): the gradient must itself be differentiable (double backward,
            # as torch's embedding allows), so it is the custom op, whose own backward is registered (with
            # scale_grad_by_freq, torch's own op, which has its derivative)
            padding_idx = -1 if ctx.padding_idx is None else ctx.padding_idx
            if ctx.scale_grad_by_freq:
                return (torch.ops.aten.embedding_dense_backward(grad_out, ctx.ids, ctx.table.shape[0], padding_idx,
                                                                True),) + none
            return (_library.embedding_backward(grad_out, ctx.ids, ctx.table.shape[0], padding_idx),) + none
        g = _grad(grad_out, "the embedding output", _LOOKUP_DTYPES)
        if ctx.fused is not None:
            rule, buffers = ctx.fused
            rule.update(ctx.table, _state(buffers), ctx.ids_np, g, padding_idx=ctx.padding_idx,
                        _format=_rule_format(ctx.table))
            _moved(ctx.weight)
            return (None,) + none
        grad = np.zeros(ctx.table.shape, dtype=ctx.table.dtype)
        _library._scatter_add(grad, ctx.ids_np, g, ctx.scale_grad_by_freq)
        if ctx.padding_idx is not None:
            grad[ctx.padding_idx] = 0.0  # as torch: the padding row gets no gradient
        return (_library._tensor(grad),) + none


class _TokenPositionFunction(torch.autograd.Function):
    """hidden = token_weight[ids] + position_weight[positions], and its backward into both tables."""

    @staticmethod
    def forward(ctx, token_weight, position_weight, ids, positions, tables, sparse, fused):
        idn = _ids(ids)
        pos = _positions(positions)
        hidden = _library._gather_add(tables[0], tables[1], idn, pos)
        ctx.ids, ctx.ids_np, ctx.ids_version, ctx.positions = ids, idn, ids._version, pos
        ctx.positions_tensor = positions if isinstance(positions, torch.Tensor) else None
        ctx.tables, ctx.sparse, ctx.fused = tables, sparse, fused
        ctx.weights = (token_weight, position_weight) if fused is not None else None
        return _library._tensor(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        need_token, need_position = ctx.needs_input_grad[:2]
        none = (None,) * 5
        if not (need_token or need_position):
            return (None, None) + none
        _check_version(ctx, ctx.ids)
        if torch.is_grad_enabled() and not ctx.sparse and ctx.fused is None:
            # backward(create_graph=True): differentiable gradients, from the custom op (double backward)
            start = ctx.positions if isinstance(ctx.positions, int) else 0
            token_grad, position_grad = _library.token_position_backward(
                grad_hidden, ctx.ids, ctx.positions_tensor, start, ctx.tables[0].shape[0], ctx.tables[1].shape[0])
            return (token_grad if need_token else None, position_grad if need_position else None) + none
        ids, positions = ctx.ids_np, ctx.positions
        (token_table, position_table), token_grad, position_grad = ctx.tables, None, None
        if ctx.sparse:
            if need_token:
                token_grad = _sparse(ctx.ids, grad_hidden, token_table.shape)
            if need_position:
                pos_ids = torch.from_numpy(ops.positions_array(ids, positions))
                position_grad = _sparse(pos_ids, grad_hidden, position_table.shape)
            return (token_grad, position_grad) + none
        g = _grad(grad_hidden, "hidden", _LOOKUP_DTYPES)
        if ctx.fused is not None:
            token_fused, position_fused = ctx.fused
            updates = []  # both tables checked before either moves
            if need_token:
                updates.append(_prepared_update(token_fused, token_table, ids, g))
            if need_position:
                updates.append(_prepared_update(position_fused, position_table,
                                                ops.positions_array(ids, positions), g))
            for update in updates:
                update()
            for weight, moved in zip(ctx.weights, (need_token, need_position)):
                if moved:
                    _moved(weight)
        elif need_token and need_position:
            token_grad = np.zeros(token_table.shape, dtype=token_table.dtype)
            position_grad = np.zeros(position_table.shape, dtype=position_table.dtype)
            _library._gather_add_backward(g, ids, token_grad, position_grad, positions)
            token_grad, position_grad = _library._tensor(token_grad), _library._tensor(position_grad)
        elif need_token:  # a frozen position table: do not allocate its gradient
            token_grad = np.zeros(token_table.shape, dtype=token_table.dtype)
            _library._scatter_add(token_grad, ids, g)
            token_grad = _library._tensor(token_grad)
        else:
            position_grad = np.zeros(position_table.shape, dtype=position_table.dtype)
            _library._scatter_add(position_grad, ops.positions_array(ids, positions), g)
            position_grad = _library._tensor(position_grad)
        return (token_grad, position_grad) + none


# ---------------------------------------------------------------- the lookup (module and functional)

_PADDING_MESSAGE = "Padding_idx must be within num_embeddings"  # torch's words, for code that matches them


def _padding_index(padding_idx, num_embeddings):
    """padding_idx normalised as torch does it (negative counts from the end; None stays None), with
    torch's AssertionError when it is out of range."""
    if padding_idx is not None:
        if padding_idx > 0:
            if padding_idx >= num_embeddings:
                raise AssertionError(_PADDING_MESSAGE)
        elif padding_idx < 0:
            if padding_idx < -num_embeddings:
                raise AssertionError(_PADDING_MESSAGE)
            padding_idx = num_embeddings + padding_idx
    return padding_idx


def _uses_kernels(weight, input):
    """Whether a lookup runs on fastembed's kernels: a dense, contiguous, 2-D CPU table of float32, float64,
    float16 or bfloat16 and dense CPU int32/int64 ids. Everything else torch accepts (integer tables from
    from_pretrained, strided tables, the meta device, ...) and everything it refuses goes to
    torch's own F.embedding, so that it gives torch's result or torch's error. This is the one place
    that decides: when the kernels take more dtypes, only this predicate widens."""
    return (type(weight) in _TENSOR_TYPES and weight.dtype in _LOOKUP_DTYPES and weight.is_cpu
            and weight.layout == torch.strided and weight.dim() == 2 and weight.is_contiguous()
            and isinstance(input, torch.Tensor) and input.dtype in _ID_DTYPES and input.is_cpu
            and input.layout == torch.strided)


_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # subclasses have their own __torch_function__: torch's path


def _renorm_needs_torch(weight, max_norm, norm_type):
    """A max_norm or norm_type fastembed's renorm refuses (negative or NaN max_norm, NaN norm_type) but
    torch applies anyway, or rows of no columns (whose inf, -inf and negative norms torch refuses):
    torch's own embedding_renorm_ then, for torch's result or error."""
    return (not max_norm >= 0 or norm_type != norm_type or weight.shape[1] == 0
            or weight.dtype not in _LOOKUP_DTYPES)  # the renorm kernel's dtypes (bfloat16 as bits)


def _traced_embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, fused):
    """`_embedding` while torch compiles or exports: a kernel lookup is one custom op
    (``torch.ops.fastembed.embedding``, traced through its fake implementation, backward registered);
    what the op does not cover (sparse, max_norm, scale_grad_by_freq, other dtypes) is torch's F.embedding,
    traced as torch's own; a fused table runs eagerly (its backward updates the weight: a graph break,
    so ``fullgraph=True`` refuses it)."""
    if fused is not None:
        if torch.compiler.is_exporting():
            raise RuntimeError("a fused fastembed.torch.Embedding cannot be exported: its backward updates the weight; "
                               "export a module built with fused=None over the same weight")
        return _eager_embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, fused)
    if sparse or scale_grad_by_freq or max_norm is not None or not _traceable_kernels(weight, input):
        return torch.nn.functional.embedding(input, weight, padding_idx, max_norm, norm_type,
                                             scale_grad_by_freq, sparse)
    padding_idx = _padding_index(padding_idx, weight.size(0))
    return _library.embedding(weight, input, -1 if padding_idx is None else padding_idx)


def _traceable_kernels(weight, input):
    """`_uses_kernels` for the traced tensors of compile and export (fake or functional tensors, whose
    type is not torch.Tensor's; the op itself hands a non-contiguous table to aten)."""
    return (weight.dtype in _LOOKUP_DTYPES and weight.device.type == "cpu" and weight.layout == torch.strided
            and weight.dim() == 2 and isinstance(input, torch.Tensor) and input.dtype in _ID_DTYPES
            and input.device.type == "cpu" and input.layout == torch.strided)


@_run_eagerly
def _eager_embedding(*args):
    return _embedding(*args, traced=False)  # (not traced again: non-strict export keeps is_compiling() True)


def _embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, fused=None,
               view=None, traced=True):
    """F.embedding's semantics, on fastembed's kernels when `_uses_kernels`; the one path of both
    `Embedding.forward` and `functional.embedding`. fused is (rule, buffers) or None; view a `_View`
    that caches the table's numpy view (the module's), or None."""
    if traced and torch.compiler.is_compiling():
        return _traced_embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, fused)
    if fused is None and ((scale_grad_by_freq and (sparse or weight.dtype not in _SCALED_DTYPES))
                          or not _uses_kernels(weight, input)
                          or (max_norm is not None and _renorm_needs_torch(weight, max_norm, norm_type))):
        # torch's own lookup: torch's result, gradient and errors, padding_idx checked by torch
        return torch.nn.functional.embedding(input, weight, padding_idx, max_norm, norm_type,
                                             scale_grad_by_freq, sparse)
    padding_idx = _padding_index(padding_idx, weight.size(0))
    table = view(weight, "weight") if view is not None else _table(weight, "weight", _LOOKUP_DTYPES)
    try:
        if max_norm is not None:
            _renorm(weight, table, input, max_norm, norm_type)
        if sparse and weight.requires_grad and torch.is_grad_enabled():
            return _sparse_lookup(weight, table, input, padding_idx)
        return _EmbeddingFunction.apply(weight, input, table, padding_idx, sparse, fused, bool(scale_grad_by_freq))
    except IndexError as exc:
        # torch's words first (code and torch's own tests match "index out of range in self"), then
        # fastembed's, which name the id, where it stands and the number of rows
        raise IndexError(f"index out of range in self: {exc}") from None


def _renorm(weight, table, ids, max_norm, norm_type):
    """torch's max_norm: the rows ids (a tensor, or a numpy array of int64 row numbers) look up,
    renormalised in place before the lookup (as torch, outside autograd, the weight's version counter
    moved once). table is weight's memory (`_table`, bfloat16 as bits). fastembed's renorm checks every
    id first, so a bad id changes nothing (torch's renorm may already have scaled some rows). The one
    renorm of Embedding, functional.embedding, EmbeddingBag and ShardedEmbedding."""
    _library._renorm(table, _ids(ids) if isinstance(ids, torch.Tensor) else ids, float(max_norm),
                     float(norm_type))
    torch.autograd.graph.increment_version(weight)


def _sparse_lookup(weight, table, ids, padding_idx):
    """A lookup whose gradient is torch's sparse one: there is nothing to compute in its backward
    (one entry per lookup), so it is torch's own F.embedding, whose C++ autograd node costs less
    than a Python autograd.Function (about 17 us for an empty one, against 11 us for F.embedding's
    whole forward at the book's size on the 2-core machine): the same bits, faster. The ids and
    the table are checked as everywhere else first, and an id out of range gets fastembed's error."""
    idn = _ids(ids)
    try:
        return torch.nn.functional.embedding(ids, weight, padding_idx, None, 2.0, False, True)
    except IndexError:
        _library._gather(table, idn)  # raises the IndexError that names the id, where it stands, and the rows
        raise


# ---------------------------------------------------------------- modules

def _token_position_dtype(device, dtype):
    """The tables' dtype of a new TokenPositionEmbedding: float32 unless asked (the book's; torch's default
    dtype is not followed, as the layer has no torch counterpart to match), float64, float16 or bfloat16."""
    if device is not None and torch.device(device).type != "cpu":
        raise NotImplementedError(f"fastembed.torch runs on CPU only, got device={device}")
    if dtype is None:
        return torch.float32
    if dtype not in _LOOKUP_DTYPES:
        raise NotImplementedError(
            f"TokenPositionEmbedding tables are {_names(_LOOKUP_DTYPES)}, got dtype={dtype} (for another dtype, "
            "two fastembed.torch.Embedding and an add give torch's own result)")
    return dtype


class Embedding(torch.nn.Module):
    """A drop-in for ``torch.nn.Embedding``: swap the class and torch code gets torch's results.

    Every constructor argument of ``nn.Embedding`` (``padding_idx``, ``max_norm``,
    ``norm_type``, ``scale_grad_by_freq``, ``sparse``, ``_weight``, ``_freeze``,
    ``device``, ``dtype``; the default dtype is ``torch.get_default_dtype()``), its
    errors (an out-of-range ``padding_idx`` is torch's AssertionError), attributes,
    initialisation (N(0, 1), the padding row zero), ``from_pretrained``,
    ``reset_parameters``, ``extra_repr`` and ``state_dict`` (one ``weight``,
    loadable into and from ``nn.Embedding``).

    Which path a lookup takes (one predicate, `_uses_kernels`): a float32, float64,
    float16 or bfloat16, dense, contiguous CPU table with int32/int64 ids runs on
    fastembed's kernels: the gather and the scatter-add backward (float16 and
    bfloat16 gradients added one rounding at a time, as torch's CPU backward adds
    them), and, for ``max_norm``, fastembed's renorm on the same four dtypes (the
    looked-up rows scaled in place before the lookup, as torch does, in torch's
    precision for the dtype; it checks every id first, so a bad id changes no row,
    where torch's may have scaled some). Every other dtype or device torch accepts
    (an integer table from ``from_pretrained``, ``meta``, a strided table) is
    torch's own ``F.embedding``, so it gives torch's result.
    ``scale_grad_by_freq=True`` runs on the kernels for float32 and float64 tables
    (each lookup's row scaled by 1 / its id's count, added as torch adds it: bitwise
    torch's); with float16 or bfloat16 tables, or with ``sparse=True``, it is torch's
    own ``F.embedding`` (the 16-bit scaled add of `fastembed.scatter_add` is torch's
    vectorised loop, one ulp from torch's scalar tail columns). ``sparse=True`` gives
    torch's sparse gradient (one uncoalesced entry per lookup): such a lookup,
    whose backward computes nothing, is torch's ``F.embedding`` (cheaper to call
    than any Python autograd function), after fastembed's checks. Double backward
    works as torch's (``create_graph=True``), and ``torch.compile``/``torch.export``
    trace a kernel lookup as one custom op (see the module's docstring).

    ``fused``: a rule from `fastembed.torch.optim` (``FusedSGD``, ``FusedAdagrad``,
    ``FusedRowWiseAdagrad``, ``FusedSparseAdam``); fastembed's own option, for
    float32, float64, float16 and bfloat16 CPU tables (the rule's state in the
    table's dtype) and not with ``sparse`` or ``scale_grad_by_freq``.
    Backward then updates the rows it touches in place and leaves ``weight.grad``
    None (no optimizer step to call); the rule's state lives in this module's
    buffers ``optim_<name>``, saved by ``state_dict()`` (so such a state_dict has
    more keys than ``nn.Embedding``'s). Set ``module.fused.lr`` to schedule the
    learning rate. The update happens during backward (as in FBGEMM's TBE): a
    weight shared with another layer (a tied output head) changes before that
    layer's own gradient reaches it, so tie no fused table.
    """

    __constants__ = ["num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"]

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, _freeze=False, device=None, dtype=None,
                 fused=None):
        super().__init__()
        fused = _fused_rule(fused, sparse)  # a rule of fastembed.optim or fastembed.torch.optim, not with sparse
        if fused is not None and scale_grad_by_freq:
            raise NotImplementedError("fused= does not take scale_grad_by_freq=True (no fused kernel scales "
                                      "by frequency); use fused=None with a fastembed.torch.optim optimizer")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = _padding_index(padding_idx, num_embeddings)
        self.max_norm, self.norm_type, self.scale_grad_by_freq = max_norm, norm_type, scale_grad_by_freq
        self._view = _View()
        if _weight is None:
            self.weight = torch.nn.Parameter(
                torch.empty((num_embeddings, embedding_dim), device=device, dtype=dtype),
                requires_grad=not _freeze)
            self.reset_parameters()
        else:
            if list(_weight.shape) != [num_embeddings, embedding_dim]:
                raise AssertionError("Shape of weight does not match num_embeddings and embedding_dim")
            self.weight = torch.nn.Parameter(_weight, requires_grad=not _freeze)
        self.sparse = sparse
        self.fused = fused
        if fused is not None:
            for key, buf in _fused_buffers(fused, self.weight).items():
                self.register_buffer("optim_" + key, buf)

    def _fused_state(self):
        """(rule, {state name: buffer}) for the autograd function, or None."""
        if self.fused is None:
            return None
        return self.fused, {name[6:]: buf for name, buf in self.named_buffers(recurse=False)
                            if name.startswith("optim_")}

    def reset_parameters(self):
        torch.nn.init.normal_(self.weight)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    def forward(self, input):
        return _embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse, self._fused_state(), self._view)

    def extra_repr(self):
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.max_norm is not None:
            s += f", max_norm={self.max_norm}"
        if self.norm_type != 2:
            s += f", norm_type={self.norm_type}"
        if self.scale_grad_by_freq is not False:
            s += f", scale_grad_by_freq={self.scale_grad_by_freq}"
        if self.sparse is not False:
            s += ", sparse=True"
        if self.fused is not None:
            s += f", fused={self.fused!r}"
        return s

    @classmethod
    def from_pretrained(cls, embeddings, freeze=True, padding_idx=None, max_norm=None, norm_type=2.0,
                        scale_grad_by_freq=False, sparse=False, fused=None):
        """An Embedding whose weight is ``embeddings`` itself (shared, as in torch), 2-D, of any dtype
        torch takes (float32, float64, float16 or bfloat16, CPU and contiguous, for the kernels and for
        ``fused``)."""
        if embeddings.dim() != 2:
            raise AssertionError("Embeddings parameter is expected to be 2-dimensional")
        rows, cols = embeddings.shape
        return cls(num_embeddings=rows, embedding_dim=cols, _weight=embeddings, _freeze=freeze,
                   padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                   scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, fused=fused)


class TokenPositionEmbedding(torch.nn.Module):
    """The book's first op: ``hidden = token.weight[ids] + position.weight[positions]``, fused.

    ``forward(ids, positions=None)``: ids an int32 or int64 tensor (..., T);
    positions None means ``arange(T)`` along the last axis, an int s means
    ``s + arange(T)`` (a decode step), an integer tensor broadcastable to
    ids.shape is used as given. Returns (..., T, D) of the tables' dtype. The backward fills
    both tables in one pass (dense), or gives each torch's sparse gradient
    (``sparse=True``), or, with ``fused=`` a rule of `fastembed.torch.optim`,
    updates both tables in place (each with its own state, in ``token`` and
    ``position``'s buffers; both updates are checked before either moves).
    ``token`` and ``position`` are `Embedding`s, initialised as the book does
    (Gaussian, std 0.08).
    """

    def __init__(self, vocab_size, context_length, embedding_dim, sparse=False, device=None, dtype=None,
                 fused=None):
        super().__init__()
        dtype = _token_position_dtype(device, dtype)
        self.token = Embedding(vocab_size, embedding_dim, sparse=sparse, fused=fused, dtype=dtype)
        self.position = Embedding(context_length, embedding_dim, sparse=sparse, fused=fused, dtype=dtype)
        self.sparse, self.fused = bool(sparse), fused
        self.reset_parameters()

    def reset_parameters(self):
        for table in (self.token.weight, self.position.weight):
            torch.nn.init.normal_(table, std=INIT_STD)

    @classmethod
    def from_pretrained(cls, token_weight, position_weight, freeze=True, sparse=False, fused=None):
        """A layer whose tables are the given tensors themselves (2-D, CPU, contiguous, of one dtype: float32,
        float64, float16 or bfloat16; the same dim)."""
        for weight, name in ((token_weight, "token_weight"), (position_weight, "position_weight")):
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ValueError(f"{name} must be a 2-D torch.Tensor (rows, dim)")
            _table(weight, name, _LOOKUP_DTYPES)
        if token_weight.dtype != position_weight.dtype:
            raise TypeError(f"token and position tables must have one dtype (fastembed never casts), got "
                            f"{token_weight.dtype} and {position_weight.dtype}")
        layer = cls(0, 0, 0, sparse=sparse)
        layer.token = Embedding.from_pretrained(token_weight, freeze=freeze, sparse=sparse, fused=fused)
        layer.position = Embedding.from_pretrained(position_weight, freeze=freeze, sparse=sparse, fused=fused)
        layer.fused = fused
        if layer.token.embedding_dim != layer.position.embedding_dim:
            raise ValueError(f"token and position tables must have the same dim, got {tuple(token_weight.shape)} "
                             f"and {tuple(position_weight.shape)}")
        return layer

    def forward(self, ids, positions=None):
        """The fused lookup (tables of float32, float64, float16 or bfloat16: another dtype is refused, never
        cast)."""
        if torch.compiler.is_compiling():
            return self._traced(ids, positions)
        return self._forward(ids, positions)

    def _forward(self, ids, positions):
        token, position = self.token, self.position
        tw, pw = token.weight, position.weight
        tables = (token._view(tw, "token weight"), position._view(pw, "position weight"))
        fused = None if self.fused is None else (token._fused_state(), position._fused_state())
        return _TokenPositionFunction.apply(tw, pw, ids, positions, tables, self.sparse, fused)

    def _traced(self, ids, positions):
        """forward while torch compiles or exports: one custom op (``torch.ops.fastembed.token_position``);
        sparse and fused layers run eagerly (a graph break); exported, a sparse layer is the op (its
        forward is the same) and a fused one is refused (its backward updates the tables)."""
        exporting = torch.compiler.is_exporting()
        if self.fused is not None and exporting:
            raise RuntimeError("a fused fastembed.torch.TokenPositionEmbedding cannot be exported: its backward "
                               "updates the tables; export a layer built with fused=None over the same tables")
        if ((self.sparse and not exporting) or self.fused is not None or isinstance(positions, bool)
                or not isinstance(positions, (type(None), int, torch.Tensor))):
            return self._eager(ids, positions)
        tensor = positions if isinstance(positions, torch.Tensor) else None
        start = positions if isinstance(positions, int) else 0
        return _library.token_position(self.token.weight, self.position.weight, ids, tensor, start)

    @_run_eagerly
    def _eager(self, ids, positions):
        return self._forward(ids, positions)

    def extra_repr(self):
        return (f"{self.token.num_embeddings}, {self.position.num_embeddings}, {self.token.embedding_dim}"
                + (", sparse=True" if self.sparse else "")
                + (f", fused={self.fused!r}" if self.fused is not None else ""))


from . import functional  # noqa: E402  (it calls _embedding above: fastembed.torch.functional.embedding)
from ._bag import EmbeddingBag  # noqa: E402

__all__.append("EmbeddingBag")
