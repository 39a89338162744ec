"""PyTorch autograd for fastembed's kernels (CPU, float32 tables, int32 or int64 ids).

`Embedding` is a drop-in for ``torch.nn.Embedding`` and `TokenPositionEmbedding`
is the book's first op, ``token.weight[ids] + position.weight[positions]``. Both
are `torch.autograd.Function`s whose forward and backward call `fastembed.ops` on
the tensors' own memory (``tensor.numpy()`` shares it): no copy of a table, and
no arithmetic here. Sparse gradients are `torch.sparse_coo_tensor`s built from
`fastembed.coalesce`, so they are already coalesced and marked so (and a hook keeps
``weight.grad`` marked: see `_keep_coalesced_flag`). Double backward is refused.

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
from torch.autograd.function import once_differentiable

from .. import ops
from ..nn import INIT_STD

__all__ = ["Embedding", "TokenPositionEmbedding"]

_ID_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------- tensors as numpy views, checked

def _table(tensor, name):
    """A CPU float32 C-contiguous tensor's memory as a numpy array (shared, never copied)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_cpu or tensor.layout != torch.strided:
        raise TypeError(f"fastembed runs on dense CPU tensors only, got {name} on {tensor.device}, "
                        f"layout {tensor.layout}")
    if tensor.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (fastembed never casts tables), got {name}.dtype={tensor.dtype}; "
                        "convert once with .float()")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (a table is never copied behind your back), got "
                         f"{name}.stride()={tuple(tensor.stride())}; make it so once with .contiguous()")
    return tensor.detach().numpy()


def _ids(tensor, name="ids"):
    """A CPU int32 or int64 tensor's memory as a numpy array."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 or int64, got {type(tensor).__name__}; "
                        "wrap it with torch.as_tensor")
    if not tensor.is_cpu or tensor.layout != torch.strided:
        raise TypeError(f"fastembed runs on dense CPU tensors only, got {name} on {tensor.device}, "
                        f"layout {tensor.layout}")
    if tensor.dtype not in _ID_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {name}.dtype={tensor.dtype}")
    return tensor.numpy()


def _grad(tensor, name):
    """The incoming gradient as a numpy array (the kernels make a strided one contiguous)."""
    if not tensor.is_cpu or tensor.layout != torch.strided or tensor.dtype != torch.float32:
        raise TypeError(f"the gradient of {name} must be a dense CPU float32 tensor, got dtype={tensor.dtype}, "
                        f"device={tensor.device}, layout={tensor.layout}")
    return tensor.numpy()


def _sparse(rows, values, shape, padding_idx=None):
    """A coalesced sparse COO gradient of the given dense shape, from `ops.coalesce`'s (rows, values)."""
    if padding_idx is not None:
        keep = rows != padding_idx
        rows, values = rows[keep], values[keep]
    return torch.sparse_coo_tensor(torch.from_numpy(rows)[None], torch.from_numpy(values), shape,
                                   is_coalesced=True, check_invariants=False)


def _keep_coalesced_flag(param):
    """Mark ``param.grad`` coalesced again when its rows are strictly increasing (one O(U) check).

    torch's AccumulateGrad stores a sparse gradient into ``.grad`` as a shallow copy
    that drops the coalesced flag; without it an optimizer would sort the rows again.
    """
    grad = param.grad
    if grad is not None and grad.is_sparse and not grad.is_coalesced() and grad.sparse_dim() == 1:
        rows = grad._indices()[0]
        if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
            grad._coalesced_(True)


def _watch_sparse_grad(param):
    """Give param the `_keep_coalesced_flag` hook once (a deepcopy or an unpickled module loses its hooks)."""
    hooks = getattr(param, "_post_accumulate_grad_hooks", None)
    if param.requires_grad and not (hooks and _keep_coalesced_flag in hooks.values()):
        param.register_post_accumulate_grad_hook(_keep_coalesced_flag)


def _positions(positions, name="positions"):
    """None, an int start, or the numpy view of an integer tensor (ops.py broadcasts and checks it)."""
    if positions is None or isinstance(positions, torch.Tensor):
        return None if positions is None else _ids(positions, name)
    if isinstance(positions, (bool, np.bool_)) or not isinstance(positions, (int, np.integer)):
        raise TypeError(f"{name} must be None, an int start, or an int32/int64 tensor, got {type(positions).__name__}")
    return int(positions)


# ---------------------------------------------------------------- autograd functions

class _EmbeddingFunction(torch.autograd.Function):
    """out = weight[ids]; d weight = scatter-add of d out into the rows of ids (none into padding_idx)."""

    @staticmethod
    def forward(ctx, weight, ids, padding_idx, sparse):
        out = ops.gather(_table(weight, "weight"), _ids(ids))
        ctx.save_for_backward(ids)
        ctx.shape, ctx.padding_idx, ctx.sparse = tuple(weight.shape), padding_idx, sparse
        return torch.from_numpy(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (ids,) = ctx.saved_tensors
        g = _grad(grad_out, "the embedding output")
        if ctx.sparse:
            return _sparse(*ops.coalesce(ids.numpy(), g), ctx.shape, ctx.padding_idx), None, None, None
        grad = np.zeros(ctx.shape, dtype=np.float32)
        ops.scatter_add(grad, ids.numpy(), g)
        if ctx.padding_idx is not None:
            grad[ctx.padding_idx] = 0.0  # as torch: the padding row gets no gradient
        return torch.from_numpy(grad), None, None, None


class _TokenPositionFunction(torch.autograd.Function):
    """hidden = token_weight[ids] + position_weight[positions], and its backward into both tables."""

    @staticmethod
    def forward(ctx, token_weight, position_weight, ids, positions, sparse):
        pos = _positions(positions)
        hidden = ops.gather_add(_table(token_weight, "token weight"), _table(position_weight, "position weight"),
                                _ids(ids), positions=pos)
        if isinstance(positions, torch.Tensor):
            ctx.save_for_backward(ids, positions)
            ctx.start = None
        else:
            ctx.save_for_backward(ids)
            ctx.start = pos
        ctx.shapes, ctx.sparse = (tuple(token_weight.shape), tuple(position_weight.shape)), sparse
        return torch.from_numpy(hidden)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hidden):
        need_token, need_position = ctx.needs_input_grad[:2]
        if not (need_token or need_position):
            return None, None, None, None, None
        saved = ctx.saved_tensors
        ids = saved[0].numpy()
        positions = saved[1].numpy() if len(saved) > 1 else ctx.start
        g = _grad(grad_hidden, "hidden")
        token_shape, position_shape = ctx.shapes
        token_grad = position_grad = None
        if ctx.sparse:
            if need_token:
                token_grad = _sparse(*ops.coalesce(ids, g), token_shape)
            if need_position:
                position_grad = _sparse(*ops.coalesce(ops.positions_array(ids, positions), g), position_shape)
        elif need_token and need_position:
            token_grad = np.zeros(token_shape, dtype=np.float32)
            position_grad = np.zeros(position_shape, dtype=np.float32)
            ops.gather_add_backward(g, ids, token_grad, position_grad, positions=positions)
            token_grad, position_grad = torch.from_numpy(token_grad), torch.from_numpy(position_grad)
        elif need_token:  # a frozen position table: do not allocate its gradient
            token_grad = np.zeros(token_shape, dtype=np.float32)
            ops.scatter_add(token_grad, ids, g)
            token_grad = torch.from_numpy(token_grad)
        else:
            position_grad = np.zeros(position_shape, dtype=np.float32)
            ops.scatter_add(position_grad, ops.positions_array(ids, positions), g)
            position_grad = torch.from_numpy(position_grad)
        return token_grad, position_grad, None, None, None


# ---------------------------------------------------------------- modules

def _check_cpu_float32(device, dtype):
    if device is not None and torch.device(device).type != "cpu":
        raise NotImplementedError(f"fastembed.torch runs on CPU only, got device={device}")
    if dtype is not None and dtype != torch.float32:
        raise NotImplementedError(f"fastembed.torch tables are float32 only, got dtype={dtype}")


class Embedding(torch.nn.Module):
    """A drop-in for ``torch.nn.Embedding`` on CPU, float32, on fastembed's kernels.

    Same constructor, attributes, initialisation (N(0, 1), the padding row zero)
    and results; ``padding_idx`` rows get no gradient; ``sparse=True`` gives a
    coalesced sparse gradient. ``max_norm`` and ``scale_grad_by_freq`` are not
    supported (NotImplementedError), nor are devices other than CPU, dtypes other
    than float32, and double backward.
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, _freeze=False, device=None, dtype=None):
        super().__init__()
        if max_norm is not None:
            raise NotImplementedError("fastembed.torch.Embedding does not support max_norm (use torch.nn.Embedding)")
        if scale_grad_by_freq:
            raise NotImplementedError(
                "fastembed.torch.Embedding does not support scale_grad_by_freq (use torch.nn.Embedding)")
        _check_cpu_float32(device, dtype)
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be within num_embeddings={num_embeddings}, got {padding_idx}")
            padding_idx = padding_idx % num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, norm_type, False, bool(sparse)
        if _weight is None:
            self.weight = torch.nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=torch.float32),
                                             requires_grad=not _freeze)
            self.reset_parameters()
        else:
            if tuple(_weight.shape) != (num_embeddings, embedding_dim):
                raise ValueError(f"_weight must have shape {(num_embeddings, embedding_dim)}, "
                                 f"got {tuple(_weight.shape)}")
            _table(_weight, "_weight")
            self.weight = torch.nn.Parameter(_weight, requires_grad=not _freeze)

    def reset_parameters(self):
        torch.nn.init.normal_(self.weight)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    def forward(self, input):
        if self.sparse:
            _watch_sparse_grad(self.weight)
        return _EmbeddingFunction.apply(self.weight, input, self.padding_idx, self.sparse)

    def extra_repr(self):
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.sparse:
            s += ", sparse=True"
        return s

    @classmethod
    def from_pretrained(cls, embeddings, freeze=True, padding_idx=None, max_norm=None, norm_type=2.0,
                        scale_grad_by_freq=False, sparse=False):
        """An Embedding whose weight is ``embeddings`` itself (shared, as in torch): 2-D, CPU, float32, contiguous."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a 2-D torch.Tensor (rows, dim)")
        _table(embeddings, "embeddings")
        rows, dim = embeddings.shape
        return cls(rows, dim, padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                   scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, _weight=embeddings, _freeze=freeze)


class TokenPositionEmbedding(torch.nn.Module):
    """The book's first op: ``hidden = token.weight[ids] + position.weight[positions]``, fused.

    ``forward(ids, positions=None)``: ids an int32 or int64 tensor (..., T);
    positions None means ``arange(T)`` along the last axis, an int s means
    ``s + arange(T)`` (a decode step), an integer tensor broadcastable to
    ids.shape is used as given. Returns float32 (..., T, D). The backward fills
    both tables in one pass (dense), or gives each a coalesced sparse gradient
    (``sparse=True``). ``token`` and ``position`` are `Embedding`s, initialised
    as the book does (Gaussian, std 0.08).
    """

    def __init__(self, vocab_size, context_length, embedding_dim, sparse=False, device=None, dtype=None):
        super().__init__()
        _check_cpu_float32(device, dtype)
        self.token = Embedding(vocab_size, embedding_dim, sparse=sparse)
        self.position = Embedding(context_length, embedding_dim, sparse=sparse)
        self.sparse = bool(sparse)
        self.reset_parameters()

    def reset_parameters(self):
        for table in (self.token.weight, self.position.weight):
            torch.nn.init.normal_(table, std=INIT_STD)

    @classmethod
    def from_pretrained(cls, token_weight, position_weight, freeze=True, sparse=False):
        """A layer whose tables are the given tensors themselves (2-D, CPU, float32, contiguous, same dim)."""
        layer = cls(0, 0, 0, sparse=sparse)
        layer.token = Embedding.from_pretrained(token_weight, freeze=freeze, sparse=sparse)
        layer.position = Embedding.from_pretrained(position_weight, freeze=freeze, sparse=sparse)
        if layer.token.embedding_dim != layer.position.embedding_dim:
            raise ValueError(f"token and position tables must have the same dim, got {tuple(token_weight.shape)} "
                             f"and {tuple(position_weight.shape)}")
        return layer

    def forward(self, ids, positions=None):
        if self.sparse:
            _watch_sparse_grad(self.token.weight)
            _watch_sparse_grad(self.position.weight)
        return _TokenPositionFunction.apply(self.token.weight, self.position.weight, ids, positions, self.sparse)

    def extra_repr(self):
        return (f"{self.token.num_embeddings}, {self.position.num_embeddings}, {self.token.embedding_dim}"
                + (", sparse=True" if self.sparse else ""))
