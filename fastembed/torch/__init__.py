"""PyTorch autograd for fastembed's kernels (CPU, float32 tables, int32 or int64 ids).

`Embedding` is a drop-in for ``torch.nn.Embedding`` and `TokenPositionEmbedding`
is the book's first op, ``token.weight[ids] + position.weight[positions]``. Both
are `torch.autograd.Function`s whose forward and backward call `fastembed.ops` on
the tensors' own memory (``tensor.numpy()`` shares it): no copy of a table, and
no arithmetic here. A sparse gradient has torch's own layout: one entry per
lookup, uncoalesced, in the order of the ids (minus ``padding_idx`` entries), so
code written for ``nn.Embedding(sparse=True)`` reads the same ``_indices()``;
fastembed's optimizers (`fastembed.torch.optim`) take it without a sort. (A sparse
`Embedding`'s lookup is torch's own F.embedding: its backward has nothing to compute.)
Double backward is refused.

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
from torch.autograd.function import once_differentiable

from .. import ops
from ..nn import INIT_STD, _fused_rule

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


def _grad(tensor, name):
    """The incoming gradient as a numpy array (the kernels make a strided one contiguous)."""
    if not tensor.is_cpu or tensor.layout != torch.strided or tensor.dtype != torch.float32:
        raise TypeError(f"the gradient of {name} must be a dense CPU float32 tensor, got dtype={tensor.dtype}, "
                        f"device={tensor.device}, layout={tensor.layout}")
    return tensor.numpy()


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
    """A parameter's memory as a numpy array, checked and made once and remade only when the tensor's
    memory, dtype, shape or strides change (``weight.data = ...``). The cached view keeps the old memory
    alive, so a new tensor can never sit at the same address."""

    __slots__ = ("key", "array")

    def __init__(self):
        self.key = self.array = None

    def __call__(self, tensor, name):
        key = (tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())
        if key != self.key:
            self.array, self.key = _table(tensor, name), key
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
    """A fused rule's state as numpy views of the module's buffers (the state_dict's own memory)."""
    return {key: buf.numpy() for key, buf in buffers.items()}


def _prepared_update(fused, table, ids, g):
    """A fused rule's update of the rows of ids, checked and ready to run (call it to move them);
    fused is (rule, buffers)."""
    rule, buffers = fused
    return rule._prepare(table, _state(buffers), ids, g)


class _EmbeddingFunction(torch.autograd.Function):
    """out = weight[ids]; d weight = scatter-add of d out into the rows of ids (none into padding_idx),
    or with a fused rule, the rule's update of those rows and no gradient. (sparse is taken for a
    lookup with no gradient to give; one with a sparse gradient is `Embedding._sparse_lookup`.)"""

    @staticmethod
    def forward(ctx, weight, ids, table, padding_idx, sparse, fused):
        idn = _ids(ids)
        out = ops.gather(table, idn)
        ctx.ids, ctx.ids_np, ctx.ids_version = ids, idn, ids._version
        ctx.table, ctx.padding_idx, ctx.sparse, ctx.fused = table, padding_idx, sparse, fused
        return torch.from_numpy(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        _check_version(ctx, ctx.ids)  # (a sparse Embedding is torch's F.embedding: never here)
        g = _grad(grad_out, "the embedding output")
        if ctx.fused is not None:
            rule, buffers = ctx.fused
            rule.update(ctx.table, _state(buffers), ctx.ids_np, g, padding_idx=ctx.padding_idx)
            return None, None, None, None, None, None
        grad = np.zeros(ctx.table.shape, dtype=np.float32)
        ops.scatter_add(grad, ctx.ids_np, g)
        if ctx.padding_idx is not None:
            grad[ctx.padding_idx] = 0.0  # as torch: the padding row gets no gradient
        return torch.from_numpy(grad), None, None, None, None, None


class _TokenPositionFunction(torch.autograd.Function):
    """hidden = token_weight[ids] + position_weight[positions], and its backward into both tables."""

    @staticmethod
    def forward(ctx, token_weight, position_weight, ids, positions, tables, sparse, fused):
        idn = _ids(ids)
        pos = _positions(positions)
        hidden = ops.gather_add(tables[0], tables[1], idn, positions=pos)
        ctx.ids, ctx.ids_np, ctx.ids_version, ctx.positions = ids, idn, ids._version, pos
        ctx.tables, ctx.sparse, ctx.fused = tables, sparse, fused
        return torch.from_numpy(hidden)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hidden):
        need_token, need_position = ctx.needs_input_grad[:2]
        none = (None,) * 5
        if not (need_token or need_position):
            return (None, None) + none
        _check_version(ctx, ctx.ids)
        ids, positions = ctx.ids_np, ctx.positions
        (token_table, position_table), token_grad, position_grad = ctx.tables, None, None
        if ctx.sparse:
            if need_token:
                token_grad = _sparse(ctx.ids, grad_hidden, token_table.shape)
            if need_position:
                pos_ids = torch.from_numpy(ops.positions_array(ids, positions))
                position_grad = _sparse(pos_ids, grad_hidden, position_table.shape)
            return (token_grad, position_grad) + none
        g = _grad(grad_hidden, "hidden")
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
        elif need_token and need_position:
            token_grad = np.zeros(token_table.shape, dtype=np.float32)
            position_grad = np.zeros(position_table.shape, dtype=np.float32)
            ops.gather_add_backward(g, ids, token_grad, position_grad, positions=positions)
            token_grad, position_grad = torch.from_numpy(token_grad), torch.from_numpy(position_grad)
        elif need_token:  # a frozen position table: do not allocate its gradient
            token_grad = np.zeros(token_table.shape, dtype=np.float32)
            ops.scatter_add(token_grad, ids, g)
            token_grad = torch.from_numpy(token_grad)
        else:
            position_grad = np.zeros(position_table.shape, dtype=np.float32)
            ops.scatter_add(position_grad, ops.positions_array(ids, positions), g)
            position_grad = torch.from_numpy(position_grad)
        return (token_grad, position_grad) + none


# ---------------------------------------------------------------- modules

def _check_cpu_float32(device, dtype):
    if device is not None and torch.device(device).type != "cpu":
        raise NotImplementedError(f"fastembed.torch runs on CPU only, got device={device}")
    if dtype is not None and dtype != torch.float32:
        raise NotImplementedError(f"fastembed.torch tables are float32 only, got dtype={dtype}")


class Embedding(torch.nn.Module):
    """A drop-in for ``torch.nn.Embedding`` on CPU, float32, on fastembed's kernels.

    Same constructor, attributes, initialisation (N(0, 1), the padding row zero)
    and results; ``padding_idx`` rows get no gradient; ``sparse=True`` gives
    torch's sparse gradient (one uncoalesced entry per lookup): such a lookup,
    whose backward computes nothing, is torch's own ``F.embedding`` (cheaper to
    call than any Python autograd function), after fastembed's checks. ``max_norm`` and
    ``scale_grad_by_freq`` are not supported (NotImplementedError), nor are
    devices other than CPU, dtypes other than float32, and double backward.

    ``fused``: a rule from `fastembed.torch.optim` (``FusedSGD``, ``FusedAdagrad``,
    ``FusedRowWiseAdagrad``, ``FusedSparseAdam``). Backward then updates the rows
    it touches in place and leaves ``weight.grad`` None (no optimizer step to call);
    the rule's state lives in this module's buffers ``optim_<name>``, saved by
    ``state_dict()``. Set ``module.fused.lr`` to schedule the learning rate. The
    update happens during backward (as in FBGEMM's TBE): a weight shared with
    another layer (a tied output head) changes before that layer's own gradient
    reaches it, so tie no fused table.
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, _freeze=False, device=None, dtype=None,
                 fused=None):
        super().__init__()
        if max_norm is not None:
            raise NotImplementedError("fastembed.torch.Embedding does not support max_norm (use torch.nn.Embedding)")
        if scale_grad_by_freq:
            raise NotImplementedError(
                "fastembed.torch.Embedding does not support scale_grad_by_freq (use torch.nn.Embedding)")
        fused = _fused_rule(fused, sparse)  # a rule of fastembed.optim or fastembed.torch.optim, not with sparse
        _check_cpu_float32(device, dtype)
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be within num_embeddings={num_embeddings}, got {padding_idx}")
            padding_idx = padding_idx % num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, norm_type, False, bool(sparse)
        self._view = _View()
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
        self.fused = fused
        if fused is not None:
            for key, arr in fused.new_state(_table(self.weight, "weight")).items():
                self.register_buffer("optim_" + key, torch.from_numpy(arr))

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
        weight = self.weight
        table = self._view(weight, "weight")
        if self.sparse and weight.requires_grad and torch.is_grad_enabled():
            return self._sparse_lookup(weight, table, input)
        return _EmbeddingFunction.apply(weight, input, table, self.padding_idx, self.sparse, self._fused_state())

    def _sparse_lookup(self, weight, table, ids):
        """A lookup whose gradient is torch's sparse one: there is nothing to compute in its backward
        (one entry per lookup), so it is torch's own F.embedding, whose C++ autograd node costs less
        than a Python autograd.Function (about 17 us for an empty one, against 11 us for F.embedding's
        whole forward at the book's size on the 2-core machine): the same bits, faster. The ids and
        the table are checked as everywhere else first, and an id out of range gets fastembed's error."""
        idn = _ids(ids)
        try:
            return torch.nn.functional.embedding(ids, weight, self.padding_idx, None, 2.0, False, True)
        except IndexError:
            ops.gather(table, idn)  # raises the IndexError that names the id, where it stands, and the rows
            raise

    def extra_repr(self):
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.sparse:
            s += ", sparse=True"
        if self.fused is not None:
            s += f", fused={self.fused!r}"
        return s

    @classmethod
    def from_pretrained(cls, embeddings, freeze=True, padding_idx=None, max_norm=None, norm_type=2.0,
                        scale_grad_by_freq=False, sparse=False, fused=None):
        """An Embedding whose weight is ``embeddings`` itself (shared, as in torch): 2-D, CPU, float32, contiguous."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a 2-D torch.Tensor (rows, dim)")
        _table(embeddings, "embeddings")
        rows, dim = embeddings.shape
        return cls(rows, dim, padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                   scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, _weight=embeddings, _freeze=freeze,
                   fused=fused)


class TokenPositionEmbedding(torch.nn.Module):
    """The book's first op: ``hidden = token.weight[ids] + position.weight[positions]``, fused.

    ``forward(ids, positions=None)``: ids an int32 or int64 tensor (..., T);
    positions None means ``arange(T)`` along the last axis, an int s means
    ``s + arange(T)`` (a decode step), an integer tensor broadcastable to
    ids.shape is used as given. Returns float32 (..., T, D). The backward fills
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
        _check_cpu_float32(device, dtype)
        self.token = Embedding(vocab_size, embedding_dim, sparse=sparse, fused=fused)
        self.position = Embedding(context_length, embedding_dim, sparse=sparse, fused=fused)
        self.sparse, self.fused = bool(sparse), fused
        self.reset_parameters()

    def reset_parameters(self):
        for table in (self.token.weight, self.position.weight):
            torch.nn.init.normal_(table, std=INIT_STD)

    @classmethod
    def from_pretrained(cls, token_weight, position_weight, freeze=True, sparse=False, fused=None):
        """A layer whose tables are the given tensors themselves (2-D, CPU, float32, contiguous, same dim)."""
        layer = cls(0, 0, 0, sparse=sparse)
        layer.token = Embedding.from_pretrained(token_weight, freeze=freeze, sparse=sparse, fused=fused)
        layer.position = Embedding.from_pretrained(position_weight, freeze=freeze, sparse=sparse, fused=fused)
        layer.fused = fused
        if layer.token.embedding_dim != layer.position.embedding_dim:
            raise ValueError(f"token and position tables must have the same dim, got {tuple(token_weight.shape)} "
                             f"and {tuple(position_weight.shape)}")
        return layer

    def forward(self, ids, positions=None):
        token, position = self.token, self.position
        tw, pw = token.weight, position.weight
        tables = (token._view(tw, "token weight"), position._view(pw, "position weight"))
        fused = None if self.fused is None else (token._fused_state(), position._fused_state())
        return _TokenPositionFunction.apply(tw, pw, ids, positions, tables, self.sparse, fused)

    def extra_repr(self):
        return (f"{self.token.num_embeddings}, {self.position.num_embeddings}, {self.token.embedding_dim}"
                + (", sparse=True" if self.sparse else "")
                + (f", fused={self.fused!r}" if self.fused is not None else ""))
