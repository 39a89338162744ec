"""The thin autograd layer: forward keeps the ids, backward scatters into the rows they name.

There is no graph here: a layer remembers what its last forward call needs, and
`backward(grad)` is that call's vector-Jacobian product. Dense gradients are a
(V, D) array of the table's dtype that accumulates over backward calls until `zero_grad()`;
sparse gradients are a `SparseGrad(rows, values)` of the touched rows only, or, with
``coalesce=False``, a `LookupGrad(ids, values)` of one row per lookup (torch's uncoalesced
layout: the optimizers sum a row's lookups as they update it). A fused
layer (``fused=`` a rule of `fastembed.optim`, e.g. ``FusedSparseAdam()``) stores no
gradient: its backward applies the optimizer step to the rows it touched, with the
optimizer state kept in ``layer.state``.

Tables are float32 (the default), float64, float16 or bfloat16 (``dtype=np.dtype(ml_dtypes.bfloat16)``;
fastembed does not import ml_dtypes, it recognises the dtype). A layer never casts: its gradients, its
optimizer state and the grad_out its backward takes all have its table's dtype, and each op computes as
the kernels do for that dtype (float64 in float64; float16 and bfloat16 summed in float32 and rounded once
per stored element: see `fastembed.ops`).
"""
import threading
from typing import NamedTuple

import numpy as np

from . import ops
from .reference import Value

INIT_STD = 0.08  # the book's Gaussian init for every matrix
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))
_DTYPES = "float32, float64, float16 or bfloat16 (ml_dtypes.bfloat16)"


def _is_table_dtype(dtype):
    """One of the four table dtypes (bfloat16 recognised by name: ml_dtypes' dtype, not imported here)."""
    return dtype in _FLOATS or (dtype.name == "bfloat16" and dtype.itemsize == 2 and dtype.kind == "V")


def _table_dtype(dtype, name="dtype"):
    """dtype as the np.dtype of a table, or TypeError: fastembed's tables are float32, float64, float16 or
    bfloat16."""
    try:  # (None too: np.dtype(None) is float64, where from_pretrained's dtype=None keeps the table's own)
        resolved = None if dtype is None else np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not _is_table_dtype(resolved):
        raise TypeError(f"{name} must be {_DTYPES}, got {dtype!r}")
    return resolved


def _check_dtype(array, dtype, name):
    """TypeError unless array is a numpy array of exactly dtype (a table's gradients are never cast)."""
    if not isinstance(array, np.ndarray) or array.dtype != dtype:
        raise TypeError(f"{name} must be a numpy array of the table's dtype {dtype}, got "
                        f"{getattr(array, 'dtype', type(array).__name__)}")

__all__ = ["Embedding", "TokenPositionEmbedding", "SparseGrad", "LookupGrad"]


def _check_values(values, dtype, name):
    """A sparse gradient's values: an array of a table dtype, and of dtype itself when it is given."""
    if not (isinstance(values, np.ndarray) and _is_table_dtype(values.dtype)):
        raise TypeError(f"{name} must be {_DTYPES}, got {getattr(values, 'dtype', type(values).__name__)}")
    if dtype is not None and values.dtype != dtype:
        raise TypeError(f"{name} must have the table's dtype {dtype}, got {values.dtype}")


class SparseGrad(NamedTuple):
    """A row-sparse gradient: ``dense[rows] = values``, every other row zero."""

    rows: np.ndarray  # int64 (U,), distinct, increasing
    values: np.ndarray  # (U, D), the table's dtype

    def check(self, num_rows, dim=None, dtype=None):
        """Raise unless this is a gradient for a (num_rows, dim) table of dtype: values of dtype (None: any
        table dtype) and shape (len(rows), dim), rows strictly increasing ids in [0, num_rows). dim None: any."""
        rows, values = self.rows, self.values
        if not (isinstance(rows, np.ndarray) and rows.dtype.kind in "iu" and rows.ndim == 1):
            raise TypeError(f"SparseGrad.rows must be a 1-D integer array, got {getattr(rows, 'dtype', type(rows))}")
        _check_values(values, dtype, "SparseGrad.values")
        if values.ndim != 2 or values.shape != (len(rows), values.shape[1] if dim is None else dim):
            raise ValueError(f"SparseGrad.values must have shape (len(rows), D) = {(len(rows), dim)}, "
                             f"got values.shape={values.shape}")
        if len(rows) and (rows[0] < 0 or rows[-1] >= num_rows or np.any(rows[1:] <= rows[:-1])):
            raise ValueError(f"SparseGrad.rows must be strictly increasing ids in [0, {num_rows}), got {rows}")
        return self

    def to_dense(self, num_rows):
        """The same gradient as a (num_rows, D) array of its values' dtype."""
        self.check(num_rows)
        dense = np.zeros((num_rows, self.values.shape[1]), dtype=self.values.dtype)
        dense[self.rows] = self.values
        return dense


class LookupGrad(NamedTuple):
    """An uncoalesced sparse gradient, one row per lookup: ``dense[ids[k]] += values[k]`` for each k.

    torch's layout for ``nn.Embedding(sparse=True)``: ids may repeat, in lookup order, and nothing
    is summed until an optimizer updates the rows (`fastembed.optim` sums each row's lookups in ids
    order as it updates it, in one pass). A layer built with ``sparse=True, coalesce=False`` keeps
    its backward's grad_out here as given, reshaped to (N, D) but not copied, as torch keeps the
    gradient it was given: write into that array before the optimizer's step and the step sees it.
    A second backward before the step concatenates (a new array, as torch's sparse add does).
    """

    ids: np.ndarray  # int32 or int64 (N,), any order, repeats allowed
    values: np.ndarray  # (N, D), the table's dtype

    def check(self, num_rows, dim=None, dtype=None):
        """Raise unless this is a gradient for a (num_rows, dim) table of dtype: 1-D integer ids in
        [0, num_rows), values of dtype (None: any table dtype) and shape (len(ids), dim). dim None: any."""
        ids, values = self.ids, self.values
        if not (isinstance(ids, np.ndarray) and ids.dtype in (np.int32, np.int64) and ids.ndim == 1):
            raise TypeError(f"LookupGrad.ids must be a 1-D int32 or int64 array, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)} of shape {getattr(ids, 'shape', '?')}")
        _check_values(values, dtype, "LookupGrad.values")
        if values.ndim != 2 or values.shape != (len(ids), values.shape[1] if dim is None else dim):
            raise ValueError(f"LookupGrad.values must have shape (len(ids), D) = {(len(ids), dim)}, "
                             f"got values.shape={values.shape}")
        if len(ids) and (ids.min() < 0 or ids.max() >= num_rows):
            bad = int(np.flatnonzero((ids < 0) | (ids >= num_rows))[0])
            raise IndexError(f"LookupGrad.ids[{bad}] = {ids[bad]} is out of range for a table of {num_rows} rows")
        return self

    def coalesce(self):
        """The same gradient as a `SparseGrad`: distinct rows, each row's values summed in ids order."""
        return SparseGrad(*ops.coalesce(self.ids, self.values))

    def to_dense(self, num_rows):
        """The same gradient as a (num_rows, D) array of its values' dtype (each row's lookups summed as
        `fastembed.ops.scatter_add` sums them in that dtype)."""
        self.check(num_rows)
        dense = np.zeros((num_rows, self.values.shape[1]), dtype=self.values.dtype)
        ops.scatter_add(dense, self.ids, self.values)
        return dense


def _zeros_like(table):
    """A new dense gradient of zeros for table, from numpy's zeroed allocation (calloc): a large one is mapped from
    the OS already zero, so only the pages a backward writes are touched (np.zeros_like writes every element)."""
    return np.zeros(table.shape, table.dtype)


def _own_ids(ids):
    """ids as an int array this layer owns: the caller may reuse its buffer before backward."""
    converted = ops.as_ids(ids)
    return converted.copy() if converted is ids else converted


def _check_grad_shape(grad, ids, dim, dtype, name):
    """coalesce takes D from the gradient itself; a layer knows its D and dtype, so it checks both first."""
    _check_dtype(grad, dtype, name)
    expected = ids.shape + (dim,)
    if grad.shape != expected:
        raise ValueError(f"{name} must have shape ids.shape + (D,) = {expected}, got {name}.shape={grad.shape}")


def _pretrained(weight, dtype):
    """A C-contiguous copy of a pretrained (rows, dim) table: in its own dtype (dtype None), which must be a
    table dtype, or converted to the dtype given."""
    if dtype is None:
        weight = np.array(weight, order="C", copy=True)
        if not _is_table_dtype(weight.dtype):
            raise TypeError(f"weight must be {_DTYPES} (fastembed never casts a table), got weight.dtype="
                            f"{weight.dtype}: pass dtype= to convert it")
    else:
        weight = np.array(weight, dtype=_table_dtype(dtype), order="C", copy=True)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (rows, dim), got weight.shape={weight.shape}")
    return weight


def _dtype_field(dtype):
    """The repr's dtype field: empty for the default float32."""
    return "" if dtype == np.float32 else f", dtype={dtype.name}"


def _fused_rule(fused, sparse):
    """fused as given (None, or a rule of fastembed.optim), refused with sparse=True."""
    if fused is None:
        return None
    from .optim import _FusedRule  # optim imports this module: import it when a rule is given

    if not isinstance(fused, _FusedRule):
        raise TypeError(f"fused must be None or a fused rule of fastembed.optim (FusedSGD, FusedAdagrad, "
                        f"FusedRowWiseAdagrad, FusedSparseAdam), got {type(fused).__name__}")
    if sparse:
        raise ValueError("a fused layer stores no gradient, so sparse=True means nothing with fused: drop one")
    return fused


def _lookup_rows(ids, grad_out, dim, dtype, name="grad_out"):
    """ids (layer-owned) and grad_out, checked to be ids.shape + (dim,) of dtype, as the (N,) and (N, D) of a
    LookupGrad: views where the arrays allow them (grad_out is not copied: see LookupGrad)."""
    _check_grad_shape(grad_out, ids, dim, dtype, name)
    return ids.reshape(-1), grad_out.reshape(ids.size, dim)  # not -1: numpy cannot infer it beside a 0 axis


def _merge_lookups(grad, ids, values):
    """Add a new contribution to an accumulated LookupGrad: the lookups of both, earlier ones first."""
    if grad is None:
        return LookupGrad(ids, values)
    if not isinstance(grad, LookupGrad):
        raise TypeError(f"a layer built with coalesce=False accumulates into a LookupGrad, but its grad is a "
                        f"{type(grad).__name__}: zero_grad() first")
    return LookupGrad(np.concatenate([grad.ids, ids]), np.concatenate([grad.values, values]))  # int32 + int64: int64


def _sparse_mode(sparse, coalesce):
    """(sparse, coalesce) as bools; coalesce=False is a form of sparse gradient, so it needs sparse=True."""
    sparse, coalesce = bool(sparse), bool(coalesce)
    if not coalesce and not sparse:
        raise ValueError("coalesce=False chooses the form of a sparse gradient (LookupGrad): it needs sparse=True")
    return sparse, coalesce


def _merge(grad, rows, values):
    """Add a new sparse contribution to an accumulated one (earlier rows first, as in a dense sum)."""
    if grad is None:
        return SparseGrad(rows, values)
    return SparseGrad(*ops.coalesce(np.concatenate([grad.rows, rows]), np.concatenate([grad.values, values])))


class Embedding:
    """A lookup table of num_embeddings rows of embedding_dim values of dtype (float32, float64, float16 or
    bfloat16; the weight starts as ``standard_normal * INIT_STD`` rounded to it).

    ``layer(ids)`` returns ``weight[ids]`` (shape ids.shape + (D,)) and keeps ids;
    ``layer.backward(grad_out)`` adds ``grad_out`` into the rows of ids: into the
    dense ``grad`` (V, D), or, with ``sparse=True``, into a `SparseGrad` (each row's lookups
    summed), or, with ``sparse=True, coalesce=False``, into a `LookupGrad` (one row per lookup, not
    summed and grad_out not copied: torch's layout, and the cheaper backward when an optimizer of
    `fastembed.optim` steps next, since it sums each row as it updates it).

    With ``fused=rule`` (`fastembed.optim.FusedSGD`, ``FusedAdagrad``, ``FusedRowWiseAdagrad``,
    ``FusedSparseAdam``), backward instead applies one optimizer step to the rows of ids
    (``rule.update``; ``grad`` stays None) and ``layer.state`` holds the optimizer state that
    ``rule.new_state(weight)`` made. The result is the unfused layer's with ``sparse=True`` and
    the matching optimizer stepping after each backward (FusedSGD: see its own doc).
    """

    def __init__(self, num_embeddings, embedding_dim, *, dtype=np.float32, sparse=False, coalesce=True, fused=None,
                 seed=None):
        dtype = _table_dtype(dtype)
        if num_embeddings < 0 or embedding_dim < 0:
            raise ValueError(f"sizes must be >= 0, got ({num_embeddings}, {embedding_dim})")
        self.sparse, self.coalesce = _sparse_mode(sparse, coalesce)
        rng = np.random.default_rng(seed)
        self.weight = (rng.standard_normal((num_embeddings, embedding_dim)) * INIT_STD).astype(dtype)
        self.fused = _fused_rule(fused, self.sparse)
        self.state = None if fused is None else fused.new_state(self.weight)
        self.grad = None
        self._ids = None
        self._lock = threading.Lock()  # backward is a read-modify-write of grad: one at a time

    @classmethod
    def from_pretrained(cls, weight, *, dtype=None, sparse=False, coalesce=True, fused=None):
        """An Embedding whose weight is a C-contiguous copy of the given (V, D) array, in its own dtype
        (dtype=None: float32, float64, float16 or bfloat16, else TypeError; never cast) or converted to the
        dtype given (numpy's cast; ml_dtypes' for bfloat16)."""
        weight = _pretrained(weight, dtype)
        layer = cls(0, 0, dtype=weight.dtype, sparse=sparse, coalesce=coalesce, fused=fused)
        layer.weight = weight
        layer.state = None if fused is None else fused.new_state(weight)
        return layer

    @property
    def num_embeddings(self):
        return self.weight.shape[0]

    @property
    def dtype(self):
        """The table's dtype: its gradients, optimizer state and backward's grad_out have it too."""
        return self.weight.dtype

    @property
    def embedding_dim(self):
        return self.weight.shape[1]

    def __repr__(self):
        fused = "" if self.fused is None else f", fused={self.fused!r}"
        form = "" if self.coalesce else ", coalesce=False"
        return (f"Embedding({self.num_embeddings}, {self.embedding_dim}{_dtype_field(self.dtype)}, "
                f"sparse={self.sparse}{form}{fused})")

    def __call__(self, ids, *, out=None):
        result = ops.gather(self.weight, ids, out=out)  # the caller's ids: ops checks out against them
        self._ids = _own_ids(ids)
        return result

    forward = __call__

    def backward(self, grad_out):
        """Add the gradient of the last forward call's output into ``grad`` (fused: step the rows it read)."""
        if self._ids is None:
            raise RuntimeError("backward() called before any forward call")
        with self._lock:
            self._backward(grad_out)

    def _backward(self, grad_out):
        if self.fused is not None:
            _check_grad_shape(grad_out, self._ids, self.embedding_dim, self.dtype, "grad_out")
            self.fused.update(self.weight, self.state, self._ids, grad_out)
            return
        if self.sparse and not self.coalesce:
            self.grad = _merge_lookups(self.grad, *_lookup_rows(self._ids, grad_out, self.embedding_dim, self.dtype))
            return
        if self.sparse:
            _check_grad_shape(grad_out, self._ids, self.embedding_dim, self.dtype, "grad_out")
            self.grad = _merge(self.grad, *ops.coalesce(self._ids, grad_out))
            return
        grad = self.grad if self.grad is not None else _zeros_like(self.weight)
        ops.scatter_add(grad, self._ids, grad_out)
        self.grad = grad

    def dense_grad(self):
        """The gradient as a (V, D) array of the table's dtype (zeros when there is none)."""
        if self.grad is None:
            return np.zeros_like(self.weight)
        if isinstance(self.grad, (SparseGrad, LookupGrad)):
            return self.grad.to_dense(self.num_embeddings)
        return self.grad

    def zero_grad(self):
        """Drop the gradient (the next backward starts from zero)."""
        self.grad = None

    def parameters(self):
        return [self]


class _ValueBridge:
    """The hook of one `to_values` call: `Value.backward()` calls it once per walk that reaches its Values."""

    def __init__(self, layer, values, shape):
        self.layer, self.saved = layer, layer._saved  # the layer's own copies of ids and positions
        self.values, self.shape = values, shape
        self.scattered = np.zeros(shape)  # float64: the Value grads already sent to the layer

    def __call__(self):
        grads = np.fromiter((v.grad for v in self.values), dtype=np.float64, count=len(self.values))
        grads = grads.reshape(self.shape)
        # The layer's backward acts on its last forward call: point it at this one meanwhile.
        last, self.layer._saved = self.layer._saved, self.saved
        try:
            self.layer.backward((grads - self.scattered).astype(self.layer.token.dtype))
        finally:
            self.layer._saved = last
        self.scattered = grads


class TokenPositionEmbedding:
    """The book's first op: ``hidden = token.weight[ids] + position.weight[positions]``.

    ``layer(ids, positions=None)`` returns hidden (ids.shape + (D,)); positions
    None means ``arange(T)`` along the last axis of ids, an int s means
    ``s + arange(T)``, an array is used as given. ``layer.backward(grad_hidden)``
    adds into ``token.grad`` and ``position.grad`` in one fused pass (dense), or
    gives each a `SparseGrad` (sparse=True) or a `LookupGrad` (sparse=True, coalesce=False; both
    keep the same grad_hidden, not copied, with the token ids and the positions).

    With ``fused=rule`` backward steps both tables instead (see `Embedding`), each with its
    own state (``token.state``, ``position.state``); both updates are checked before either
    table moves.
    """

    def __init__(self, vocab_size, context_length, embedding_dim, *, dtype=np.float32, sparse=False, coalesce=True,
                 fused=None, seed=None):
        self.sparse, self.coalesce = _sparse_mode(sparse, coalesce)
        seeds = np.random.SeedSequence(seed).spawn(2)
        both = dict(dtype=dtype, sparse=sparse, coalesce=coalesce, fused=fused)
        self.token = Embedding(vocab_size, embedding_dim, seed=seeds[0], **both)
        self.position = Embedding(context_length, embedding_dim, seed=seeds[1], **both)
        self._saved = None

    @classmethod
    def from_pretrained(cls, token_weight, position_weight, *, dtype=None, sparse=False, coalesce=True, fused=None):
        """Both tables copied as `Embedding.from_pretrained` copies one; they must end in one dtype."""
        token_weight, position_weight = _pretrained(token_weight, dtype), _pretrained(position_weight, dtype)
        if token_weight.dtype != position_weight.dtype:
            raise TypeError(f"token_weight and position_weight must have one dtype (the sum is formed in it), got "
                            f"{token_weight.dtype} and {position_weight.dtype}: pass dtype= to convert both")
        layer = cls(0, 0, 0, dtype=token_weight.dtype, sparse=sparse, coalesce=coalesce, fused=fused)
        both = dict(sparse=sparse, coalesce=coalesce, fused=fused)
        layer.token = Embedding.from_pretrained(token_weight, **both)
        layer.position = Embedding.from_pretrained(position_weight, **both)
        return layer

    @property
    def dtype(self):
        """The dtype of both tables."""
        return self.token.dtype

    @property
    def fused(self):
        """The token table's rule (the position table's is the same unless one was replaced)."""
        return self.token.fused

    def __repr__(self):
        fused = "" if self.fused is None else f", fused={self.fused!r}"
        return (f"TokenPositionEmbedding({self.token.num_embeddings}, {self.position.num_embeddings}, "
                f"{self.token.embedding_dim}{_dtype_field(self.dtype)}, sparse={self.sparse}{'' if self.coalesce else ', coalesce=False'}{fused})")

    def __call__(self, ids, positions=None, *, out=None):
        # The caller's arrays go to ops (which checks out against them); the layer keeps its own copies.
        hidden = ops.gather_add(self.token.weight, self.position.weight, ids, positions=positions, out=out)
        ids = _own_ids(ids)
        if positions is not None and not isinstance(positions, (int, np.integer)):
            array = ops.positions_array(ids, positions)
            positions = array.copy() if array is positions else array
        self._saved = (ids, positions)
        return hidden

    forward = __call__

    def to_values(self, ids, positions=None):
        """hidden as nested lists of `reference.Value`, for the book's scalar model.

        The forward is this layer's (the kernels); the Values returned (shape
        ids.shape + (D,), as nested lists) are leaves of the caller's graph. When the
        caller's ``loss.backward()`` reaches them, their gradient goes into
        ``token.grad`` and ``position.grad`` (dense or sparse, as `backward` does) with
        no further call. The book's engine adds into grads on every backward(), so
        each call scatters only what it added to these Values since the last one: the
        layer's gradient stays the scatter of the Values' grads. ids must be
        rectangular (an int, a list of ints, or nested lists of equal lengths).
        """
        hidden = self(ids, positions)
        values = [Value(x) for x in hidden.reshape(-1).tolist()]
        bridge = _ValueBridge(self, values, hidden.shape)
        for v in values:
            v.on_backward = bridge
        nested = np.empty(len(values), dtype=object)
        nested[:] = values
        return nested.reshape(hidden.shape).tolist()

    def backward(self, grad_hidden):
        """Add the gradient of the last forward call's hidden into token.grad and position.grad."""
        if self._saved is None:
            raise RuntimeError("backward() called before any forward call")
        with self.token._lock, self.position._lock:  # always in this order: no deadlock
            self._backward(grad_hidden, *self._saved)

    def _backward(self, grad_hidden, ids, positions):
        if self.token.fused is not None or self.position.fused is not None:
            if self.token.fused is None or self.position.fused is None:
                raise ValueError("a TokenPositionEmbedding is fused in both tables or in neither; got "
                                 f"token.fused={self.token.fused!r}, position.fused={self.position.fused!r}")
            _check_grad_shape(grad_hidden, ids, self.token.embedding_dim, self.token.dtype, "grad_hidden")
            # Both prepared (every check run) before either table moves.
            move_token = self.token.fused._prepare(self.token.weight, self.token.state, ids, grad_hidden)
            move_position = self.position.fused._prepare(self.position.weight, self.position.state,
                                                         ops.positions_array(ids, positions), grad_hidden)
            move_token()
            move_position()
            return
        if self.sparse and not self.coalesce:
            D = self.token.embedding_dim
            token_ids, values = _lookup_rows(ids, grad_hidden, D, self.token.dtype, "grad_hidden")
            position_ids = ops.positions_array(ids, positions).reshape(-1)
            # Both merged (each may raise) before either table's grad is set.
            token_grad = _merge_lookups(self.token.grad, token_ids, values)
            position_grad = _merge_lookups(self.position.grad, position_ids, values)
            self.token.grad, self.position.grad = token_grad, position_grad
            return
        if self.sparse:
            _check_grad_shape(grad_hidden, ids, self.token.embedding_dim, self.token.dtype, "grad_hidden")
            token_part = ops.coalesce(ids, grad_hidden)
            position_part = ops.coalesce(ops.positions_array(ids, positions), grad_hidden)
            self.token.grad = _merge(self.token.grad, *token_part)
            self.position.grad = _merge(self.position.grad, *position_part)
            return
        token_grad = self.token.grad if self.token.grad is not None else _zeros_like(self.token.weight)
        position_grad = self.position.grad if self.position.grad is not None else _zeros_like(self.position.weight)
        ops.gather_add_backward(grad_hidden, ids, token_grad, position_grad, positions=positions)
        self.token.grad, self.position.grad = token_grad, position_grad

    def zero_grad(self):
        self.token.zero_grad()
        self.position.zero_grad()

    def parameters(self):
        return [self.token, self.position]


__all__ += ["EmbeddingBag"]


class EmbeddingBag(Embedding):
    """Bags of rows, each reduced to one row: torch's ``nn.EmbeddingBag`` on numpy tables.

    ``layer(ids, offsets=None, per_sample_weights=None)`` returns the (B, D) bags of
    `fastembed.ops.embedding_bag` (1-D ids with offsets, or 2-D ids: one bag per row) and keeps
    what backward needs. ``layer.backward(grad_out)`` adds the table's gradient into the dense
    ``grad`` (V, D), or with ``sparse=True`` (modes sum and mean, as torch) into a coalesced
    `SparseGrad` (``coalesce=False``: a `LookupGrad`, one row per kept lookup, torch's layout); it returns the gradient of the forward's per_sample_weights (ids' shape), or None
    when there were none.

    ``padding_idx`` (negative: counted from the end) is left out of every bag and of a mean's count,
    gets no gradient, and its row starts at zero (as torch's constructor makes it; `from_pretrained`
    keeps the row given). ``max_norm``, ``scale_grad_by_freq`` and a fused optimizer are not here yet.
    """

    def __init__(self, num_embeddings, embedding_dim, *, mode="mean", padding_idx=None,
                 include_last_offset=False, dtype=np.float32, sparse=False, coalesce=True, seed=None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, sparse=sparse, coalesce=coalesce, seed=seed)
        self._configure(mode, padding_idx, include_last_offset)
        if self.padding_idx is not None:
            self.weight[self.padding_idx] = 0.0
        self._saved = None

    def _configure(self, mode, padding_idx, include_last_offset):
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"mode has to be one of sum, mean or max, got mode={mode!r}")
        if self.sparse and mode == "max":
            raise ValueError("max mode does not support sparse weights (as in torch): use sparse=False")
        if padding_idx is not None:
            V = self.num_embeddings
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
                raise TypeError(f"padding_idx must be None or an int, got {type(padding_idx).__name__}")
            if not -V <= padding_idx < V:
                raise ValueError(f"padding_idx must be within num_embeddings, {-V} through {V - 1}, got {padding_idx}")
            padding_idx = int(padding_idx) % V
        self.mode, self.padding_idx, self.include_last_offset = mode, padding_idx, bool(include_last_offset)

    @classmethod
    def from_pretrained(cls, weight, *, mode="mean", padding_idx=None, include_last_offset=False, dtype=None,
                        sparse=False, coalesce=True):
        """An EmbeddingBag whose weight is a copy of the given (V, D) array (padding row kept), in its own
        dtype or converted to dtype, as `Embedding.from_pretrained` makes it."""
        weight = _pretrained(weight, dtype)
        layer = cls(0, 0, dtype=weight.dtype, sparse=sparse, coalesce=coalesce, mode="sum")
        layer.weight = weight
        layer._configure(mode, padding_idx, include_last_offset)
        return layer

    def __repr__(self):
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return (f"EmbeddingBag({self.num_embeddings}, {self.embedding_dim}{_dtype_field(self.dtype)}, "
                f"mode={self.mode!r}{pad}, "
                f"include_last_offset={self.include_last_offset}, sparse={self.sparse}"
                f"{'' if self.coalesce else ', coalesce=False'})")

    def __call__(self, ids, offsets=None, per_sample_weights=None, *, out=None):
        result = ops.embedding_bag(self.weight, ids, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                                   padding_idx=self.padding_idx, include_last_offset=self.include_last_offset,
                                   out=out, return_argmax=self.mode == "max")
        result, argmax = result if self.mode == "max" else (result, None)
        # The layer's own copies: the caller may reuse its buffers before backward.
        own = None if offsets is None else np.array(offsets, copy=True)
        weights = None if per_sample_weights is None else np.array(per_sample_weights, copy=True)
        self._saved = (_own_ids(ids), own, weights, argmax)
        self._ids = self._saved[0]
        return result

    forward = __call__

    def backward(self, grad_out):
        """Add the gradient of the last forward's bags into ``grad``; return per_sample_weights' gradient."""
        if self._saved is None:
            raise RuntimeError("backward() called before any forward call")
        with self._lock:
            return self._backward(grad_out)

    def _backward(self, grad_out):
        ids, offsets, weights, argmax = self._saved
        bags = dict(padding_idx=self.padding_idx, include_last_offset=self.include_last_offset)
        weights_grad = None
        if weights is not None:  # first: it writes nothing, so a bad grad_out leaves grad as it was
            weights_grad = ops.embedding_bag_weights_grad(self.weight, ids, offsets, grad_out, **bags)
        if self.sparse:
            _check_dtype(grad_out, self.dtype, "grad_out")  # the kernel takes any dtype: the layer's is due
            rows, values = ops.embedding_bag_grad_rows(self.num_embeddings, ids, offsets, grad_out, mode=self.mode,
                                                       per_sample_weights=weights, **bags)
            if self.coalesce:
                self.grad = _merge(self.grad, *ops.coalesce(rows, values))
            else:
                self.grad = _merge_lookups(self.grad, rows, values)
            return weights_grad
        grad = _zeros_like(self.weight) if self.grad is None else self.grad
        ops.embedding_bag_backward(grad, ids, offsets, grad_out, mode=self.mode, per_sample_weights=weights,
                                   argmax=argmax, **bags)
        self.grad = grad
        return weights_grad
