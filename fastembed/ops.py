"""The public functional API.

This layer normalises arguments (lists and other integer dtypes become int32 or
int64 arrays; positions become None, an int start, or an int64 array of
ids.shape) and documents shapes. Every check of the values themselves (dtype of
the tables, shapes, id ranges, aliasing) happens once, in `_kernels`, before the
first write.

Dtypes: `gather`, `gather_add`, `scatter_add`, `gather_add_backward`, `coalesce`, `renorm`
and the four `embedding_bag` functions take float32, float64, float16 or bfloat16 tables
(bfloat16 as numpy arrays of ``ml_dtypes.bfloat16``, the type jax and tensorflow use with
numpy; fastembed does not import ml_dtypes, it recognises the dtype). Every other array of the call that holds
table elements (the position table, ``out``, ``grad_out``, the gradient tables) must
have the table's dtype: a mismatch is a TypeError naming both, never a cast. float64
is computed in float64. float16 and bfloat16 are stored as 16 bits and summed in
float32: `gather_add` rounds each ``token + position`` once; `scatter_add` and
`gather_add_backward` round after each add into the gradient table (what torch's
dense embedding backward does on CPU, bitwise); `coalesce` sums the duplicates of a
row in float32 in ids order and rounds once. `renorm` computes in torch's precision for
each dtype (see its docstring); the bags follow torch's CPU kernels dtype by dtype (see
`embedding_bag`). The optimizer kernels (`fastembed.optim`) take float32 only.

A uint16 array is refused, never read as bfloat16. Private, for callers without
ml_dtypes such as the torch adapter: these kernels in `fastembed._kernels` take the
keyword ``_format="bfloat16"``, under which every element array of the call must be a
native uint16 array of bfloat16 bits (``tensor.view(torch.uint16).numpy()``; results
are uint16 too); give them ids from `as_ids` and positions as these wrappers do. The four
`embedding_bag` wrappers pass that keyword through (``_format``, not in their signatures' docs).
"""
import operator

import numpy as np

from . import _kernels

__all__ = ["gather", "gather_add", "scatter_add", "gather_add_backward", "coalesce", "as_ids", "renorm"]

_ndarray = np.ndarray
_NATIVE_IDS = (np.dtype(np.int64), np.dtype(np.int32))  # int64 first: the common case matches by identity
_INT64_MAX = np.iinfo(np.int64).max


def as_ids(ids, name="ids"):
    """ids as a numpy array of native int32 or int64, without a copy when it already is one.

    Other integer dtypes are widened (uint64 only when every value fits int64);
    bool, float and object ids raise TypeError.
    """
    if not isinstance(ids, np.ndarray):
        if type(ids) is list and ids and all(type(i) is int for i in ids):
            try:
                return np.array(ids, dtype=np.int64)  # the common case: a flat list of Python ints
            except OverflowError:
                pass
        try:
            arr = np.array(ids, dtype=object)  # element by element: numpy would turn [1, True] into ints
        except ValueError as exc:
            raise TypeError(f"{name} must be an integer array-like; numpy could not read it: {exc}") from exc
        return _object_ids(arr, name)
    dtype = ids.dtype
    if dtype in _NATIVE_IDS:
        return ids
    if dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, got {name}.dtype={dtype}")
    if dtype.kind == "u" and dtype.itemsize == 8 and ids.size and ids.max() > _INT64_MAX:
        flat = int(np.argmax(ids.reshape(-1) > _INT64_MAX))
        where = np.unravel_index(flat, ids.shape) if ids.ndim else ()
        raise IndexError(
            f"{name}[{', '.join(map(str, where))}] = {ids.reshape(-1)[flat]} is out of range "
            f"(larger than any table could have rows)"
        )
    if dtype.itemsize < 4 or (dtype.kind == "i" and dtype.itemsize == 4):
        return ids.astype(np.int32)
    return ids.astype(np.int64)


def _object_ids(arr, name):
    """An object array of integers as int64, or the right error: TypeError for anything else, IndexError past int64."""
    flat = arr.reshape(-1)
    for value in flat:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be integers, got an element of type {type(value).__name__}")
    for k, value in enumerate(flat):
        if not -(2**63) <= value <= _INT64_MAX:
            where = ", ".join(map(str, np.unravel_index(k, arr.shape))) if arr.ndim else ""
            raise IndexError(f"{name}[{where}] = {value} is out of range (larger than any table could have rows)")
    return arr.astype(np.int64)


def _check_apart(original, converted, what, targets, names):
    """Where normalising made a copy of a caller's array, the arrays to be written must not overlap the original.

    (The kernels check aliasing against the arrays they are given; only here is the original still known.)
    """
    if converted is not original and isinstance(original, np.ndarray):
        for target, name in zip(targets, names):
            if isinstance(target, np.ndarray) and np.may_share_memory(target, original):
                raise ValueError(f"{name} shares memory with {what}; pass separate arrays")
    return converted


def _converted_ids(ids, targets, names):
    """as_ids(ids), checked against the arrays to be written (see `_check_apart`)."""
    return _check_apart(ids, as_ids(ids), "ids", targets, names)


def _as_positions(positions, ids, targets=(), names=()):
    """None or an int start stay as they are; anything else becomes an int64 array of ids.shape,
    checked against the arrays to be written (see `_check_apart`)."""
    if positions is None:
        return None
    if isinstance(positions, (bool, np.bool_)):
        raise TypeError("positions must be None, an int start, or an integer array, got a bool")
    if isinstance(positions, (int, np.integer)):
        return operator.index(positions)
    pos = as_ids(positions, "positions")
    try:
        pos = np.broadcast_to(pos, ids.shape)
    except ValueError:
        raise ValueError(
            f"positions must be broadcastable to ids.shape={ids.shape}, got positions.shape={pos.shape}"
        ) from None
    result = np.asarray(pos, dtype=np.int64, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
    return _check_apart(positions, result, "positions", targets, names)


def gather(table, ids, *, out=None):
    """Rows of a table: ``table[ids]`` (a copy of the bits, in any dtype).

    Parameters
    ----------
    table : ndarray of float32, float64, float16 or bfloat16, shape (V, D), C-contiguous
    ids : array-like of int, any shape (...)
        Row ids in [0, V). int32 and int64 arrays are used without a copy.
    out : ndarray of table's dtype, shape ids.shape + (D,), optional
        Written in place; must be C-contiguous, writeable, and share no memory with the inputs.

    Returns
    -------
    ndarray of table's dtype, shape ids.shape + (D,)
    """
    if type(ids) is not _ndarray or ids.dtype not in _NATIVE_IDS:
        ids = _converted_ids(ids, (out,), ("out",))
    return _kernels.gather(table, ids, out)


def gather_add(token_table, position_table, ids, *, positions=None, out=None):
    """The book's first op, fused: ``token_table[ids] + position_table[positions]``.

    float16 and bfloat16 rows are added in float32 and rounded once.

    Parameters
    ----------
    token_table : ndarray of float32, float64, float16 or bfloat16, shape (V, D), C-contiguous
    position_table : ndarray of token_table's dtype, shape (P, D), C-contiguous
    ids : array-like of int, any shape (..., T)
    positions : None, int, or array-like of int broadcastable to ids.shape
        None means ``arange(T)`` along the last axis of ids; an int ``s`` means
        ``s + arange(T)`` (a decode step at position s); an array is used as given.
    out : ndarray of token_table's dtype, shape ids.shape + (D,), optional

    Returns
    -------
    ndarray of token_table's dtype, shape ids.shape + (D,)
    """
    if type(ids) is not _ndarray or ids.dtype not in _NATIVE_IDS:
        ids = _converted_ids(ids, (out,), ("out",))
    if positions is not None and type(positions) is not int:
        positions = _as_positions(positions, ids, (out,), ("out",))
    return _kernels.gather_add(token_table, position_table, ids, positions, out)


def scatter_add(grad_table, ids, grad_out, *, scale_grad_by_freq=False):
    """Accumulate in place: ``grad_table[ids] += grad_out``, repeated ids summed.

    Duplicates are added in the row-major order of ids, as ``np.add.at`` does: the
    result is bitwise the same on every run and for every thread count. A float16 or
    bfloat16 gradient is rounded after each add (each add in float32), as ``np.add.at``
    on it and torch's dense embedding backward on CPU do.

    With ``scale_grad_by_freq=True`` (torch's option of that name), each lookup's row is
    scaled by ``1 / c``, c the number of times its id occurs in ids, as torch's
    ``embedding_dense_backward`` adds it (``row.add_(g, alpha=1/c)``): float32 and float64
    with one rounding per add (fma), bitwise torch's; float16 and bfloat16 with ``1/c``
    rounded to the type and ``row + alpha * g`` formed in float32 and rounded once, torch's
    vectorised loop (torch's scalar loop, which torch 2.13 runs on the last D % 32 columns
    on an x86-64 CPU with AVX2 or AVX-512, rounds the product first: one unit in the last
    place apart at most there).

    Parameters
    ----------
    grad_table : ndarray of float32, float64, float16 or bfloat16, shape (V, D), C-contiguous and writeable
    ids : array-like of int, any shape (...)
    grad_out : ndarray of grad_table's dtype, shape ids.shape + (D,)
    scale_grad_by_freq : bool
    """
    if type(ids) is not _ndarray or ids.dtype not in _NATIVE_IDS:
        ids = _converted_ids(ids, (grad_table,), ("grad_table",))
    _kernels.scatter_add(grad_table, ids, grad_out, scale_grad_by_freq=scale_grad_by_freq)


def gather_add_backward(grad_hidden, ids, token_grad, position_grad, *, positions=None):
    """Backward of `gather_add`, into both gradient tables in one pass over grad_hidden.

    ``token_grad[ids] += grad_hidden`` and ``position_grad[positions] += grad_hidden``,
    duplicates summed in the row-major order of ids (float16 and bfloat16 rounded
    after each add, as in `scatter_add`).

    Parameters
    ----------
    grad_hidden : ndarray of token_grad's dtype, shape ids.shape + (D,)
    ids : array-like of int, any shape (..., T)
    token_grad : ndarray of float32, float64, float16 or bfloat16, shape (V, D), C-contiguous and writeable
    position_grad : ndarray of token_grad's dtype, shape (P, D), C-contiguous and writeable
    positions : None, int, or array-like of int broadcastable to ids.shape
        As in `gather_add`.
    """
    targets, names = (token_grad, position_grad), ("token_grad", "position_grad")
    if type(ids) is not _ndarray or ids.dtype not in _NATIVE_IDS:
        ids = _converted_ids(ids, targets, names)
    if positions is not None and type(positions) is not int:
        positions = _as_positions(positions, ids, targets, names)
    _kernels.gather_add_backward(grad_hidden, ids, token_grad, position_grad, positions)


def coalesce(ids, grad_out):
    """A sparse gradient: the distinct ids and the rows of grad_out summed per id.

    Parameters
    ----------
    ids : array-like of int >= 0, any shape (...)
    grad_out : ndarray of float32, float64, float16 or bfloat16, shape ids.shape + (D,)

    Returns
    -------
    rows : ndarray of int64, shape (U,)
        The distinct ids, in increasing order.
    values : ndarray of grad_out's dtype, shape (U, D)
        ``values[k]`` is the sum of grad_out over the positions where ids == rows[k],
        added in the row-major order of ids (float32 and float64: bitwise equal to
        ``np.add.at`` into zeros). float16 and bfloat16 rows are summed in float32 and
        rounded once (a float32 copy of grad_out is made for it).
    """
    if type(ids) is not _ndarray or ids.dtype not in _NATIVE_IDS:
        ids = as_ids(ids)
    return _kernels.coalesce(ids, grad_out)


def positions_array(ids, positions=None):
    """The positions that `gather_add` uses for ids, as a new int64 array of ids.shape (writeable, sharing
    no memory with positions: a sparse gradient's indices are made of it)."""
    ids = as_ids(ids)
    positions = _as_positions(positions, ids)
    if isinstance(positions, np.ndarray):
        return positions.copy()
    start = positions or 0
    if not 0 <= start <= 2**62:
        raise IndexError(f"positions start {start} is out of range (must be >= 0 and fit int64 with T added)")
    if ids.ndim == 0:
        return np.array(start, dtype=np.int64)
    return np.array(np.broadcast_to(start + np.arange(ids.shape[-1], dtype=np.int64), ids.shape), order="C")


def renorm(table, ids, max_norm, norm_type=2.0):
    """torch's ``max_norm`` for a lookup (``torch.embedding_renorm_``), in place.

    Each distinct row ``r`` of table that ids name whose ``norm_type``-norm exceeds
    ``max_norm`` is multiplied by ``max_norm / (norm + 1e-7)``; other rows are left
    as they are. Per dtype, as torch computes it on CPU:

    - float32: the norm is summed in float64 and rounded to float32 (torch's is a
      float32 value, summed in float32: within an ulp or two); the factor is formed
      in float64 and applied in float32.
    - float64: all in float64, in torch's order: bitwise equal to torch for
      norm_type 0, 1, 2, inf and -inf; other p within a few ulps (torch has its own pow).
    - float16, bfloat16: the norm summed in float32 and rounded to the dtype, the
      factor rounded to the dtype, each product formed in float32 and rounded once:
      bitwise equal to torch for norm_type 0, 1, 2, inf and -inf; other p within an
      ulp of the 16-bit norm.

    Deterministic: the same bits for any number of threads.

    Parameters
    ----------
    table : ndarray of float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``),
        shape (V, D), C-contiguous and writeable; never cast
    ids : array-like of int in [0, V), any shape (duplicates count once)
    max_norm : float >= 0
    norm_type : float, the p of the p-norm: inf and -inf (max and min of
        abs(x)), 0 (the number of nonzero x) and any other p (torch's).

    Every check happens before the first write: an id out of range is an
    IndexError and leaves every row as it was.
    """
    if type(ids) is not _ndarray or ids.dtype not in _NATIVE_IDS:
        ids = as_ids(ids)
    _kernels.renorm(table, ids, max_norm, norm_type)


# ---------------------------------------------------------------- embedding bags (torch's F.embedding_bag)

__all__ += ["embedding_bag", "embedding_bag_backward", "embedding_bag_grad_rows", "embedding_bag_weights_grad"]


def _bag_args(ids, offsets, per_sample_weights, include_last_offset, targets, names):
    """(ids, offsets, per_sample_weights, include_last_offset, shape of ids) as the kernels take them:
    2-D ids are B bags of ids.shape[1] ids each (torch's rule: offsets must then be None)."""
    original = ids
    if type(ids) is not _ndarray or ids.dtype not in _NATIVE_IDS:
        ids = _converted_ids(ids, targets, names)
    shape = ids.shape
    if ids.ndim == 2:
        if offsets is not None:
            raise ValueError(
                "if ids is 2-D, offsets has to be None: each row of ids is one bag (torch's rule); "
                f"got offsets of type {type(offsets).__name__}"
            )
        if isinstance(per_sample_weights, np.ndarray):
            if per_sample_weights.shape != shape:
                raise ValueError(
                    f"per_sample_weights must have the same shape as ids, got per_sample_weights.shape="
                    f"{per_sample_weights.shape} and ids.shape={shape}"
                )
            per_sample_weights = per_sample_weights.reshape(-1)
        # A row of length 0 makes B empty bags (torch refuses it: arange's step would be 0).
        offsets = np.arange(shape[0], dtype=np.int64) * shape[1]
        ids = _check_apart(original, ids.reshape(-1), "ids", targets, names)
        return ids, offsets, per_sample_weights, False, shape
    if ids.ndim != 1:
        raise ValueError(f"ids has to be 1-D (with offsets) or 2-D (fixed-length bags), got ids.shape={shape}")
    if offsets is None:
        raise ValueError("offsets has to be a 1-D integer array for 1-D ids, got None (2-D ids need none)")
    if type(offsets) is not _ndarray or offsets.dtype not in _NATIVE_IDS:
        offsets = as_ids(offsets, "offsets")  # the kernels copy offsets anyway: no aliasing to check
    return ids, offsets, per_sample_weights, bool(include_last_offset), shape


def embedding_bag(table, ids, offsets=None, *, mode="mean", per_sample_weights=None, padding_idx=None,
                  include_last_offset=False, out=None, return_argmax=False, _format=None):
    """Bags of rows, each reduced to one row: torch's ``F.embedding_bag`` (CPU), in one pass per bag.

    Bag b holds ``ids[offsets[b]:offsets[b + 1]]``; the last bag ends at ``len(ids)``, or with
    ``include_last_offset=True`` (offsets then has B + 1 entries) at ``offsets[B]``: ids past it are in no
    bag. 2-D ids are B bags of ``ids.shape[1]`` ids each, and offsets must be None.

    Parameters
    ----------
    table : ndarray of float32, float64, float16 or bfloat16, shape (V, D), C-contiguous
        Every other float array of the call (per_sample_weights, out) has its dtype; the result too.
    ids : array-like of int, shape (N,) with offsets, or (B, L) without
    offsets : array-like of int, shape (B,) or (B + 1,) with include_last_offset
        Non-decreasing, from 0 to at most N.
    mode : "sum", "mean" or "max"
    per_sample_weights : ndarray of the table's dtype, ids' shape, optional
        Each row is multiplied by its weight before the sum; mode "sum" only (torch's rule).
    padding_idx : int, optional
        Ids equal to it (negative: counted from the end, ``V + padding_idx``) are left out of their bag and
        of the mean's count.
    out : ndarray of the table's dtype, shape (B, D), optional
    return_argmax : bool
        Mode "max" only: also return argmax, what ``embedding_bag_backward`` needs.

    Returns
    -------
    out : ndarray of the table's dtype, shape (B, D)
        An empty bag (or one of padding only) gives zeros. Sums run in the order of the ids; a mean is the
        sum divided by the count; a max keeps the first of equal values (and a NaN once it holds one).
        float64 computes in float64. float16 and bfloat16 sum in float32 (with per_sample_weights, of float32
        products) and round once per bag; a mean divides that rounded sum by the count rounded to the dtype,
        in float32, and rounds again; a max copies the winning elements. This is torch's CPU kernel, bitwise,
        except that torch's FBGEMM path (no padding_idx) rounds a bfloat16 sum that is exactly halfway
        between two bfloat16 values away from zero, where fastembed rounds to even (one unit in the last
        place, on ties only).
    argmax : ndarray of int64, shape (B, D), with return_argmax
        The row each column's max came from; 0 for an empty bag, as torch reports it.

    Errors: offsets not starting at 0, decreasing, negative or past the ids, and a padding_idx outside
    [-V, V), raise ``BagArgumentError``, a ValueError that is also the RuntimeError torch raises;
    per_sample_weights with a mode other than sum raise ``BagModeError`` (ValueError and torch's
    NotImplementedError); ids out of range raise IndexError. Nothing is written when a call raises.
    """
    if return_argmax and mode != "max":
        raise ValueError(f"return_argmax is for mode='max' only, got mode={mode!r}")
    ids, offsets, per_sample_weights, include_last_offset, _ = _bag_args(
        ids, offsets, per_sample_weights, include_last_offset, (out,), ("out",))
    result = _kernels.embedding_bag(table, ids, offsets, mode, per_sample_weights, padding_idx,
                                    include_last_offset, out, _format=_format, argmax=return_argmax)
    if mode == "max" and not return_argmax:
        return result[0]
    return result


def embedding_bag_backward(grad_table, ids, offsets, grad_out, *, mode="mean", per_sample_weights=None,
                           padding_idx=None, include_last_offset=False, argmax=None, _format=None):
    """The dense gradient of `embedding_bag`, accumulated in place into grad_table.

    ``grad_table[ids[i]] += grad_out[b] * s_i`` for every id i of bag b that is not padding, with s_i = 1
    (sum), ``per_sample_weights[i]`` (sum with weights) or ``1 / count`` (mean, count without padding);
    in mode "max", ``grad_table[argmax[b, d], d] += grad_out[b, d]`` for every bag that is not empty.
    Additions run in bag order, then ids order: bitwise the same for every thread count. float16 and
    bfloat16 round after each add, ``g = round(g + s_i * grad_out[b])`` in float32 with s_i in the dtype
    (torch's CPU backward; torch adds a row's lookups in the order of an unstable sort, so where a row is
    looked up more than twice its rounding can differ from fastembed's ids order).

    Parameters
    ----------
    grad_table : ndarray of float32, float64, float16 or bfloat16, shape (V, D), C-contiguous and writeable
    ids, offsets, mode, per_sample_weights, padding_idx, include_last_offset : as in `embedding_bag`
    grad_out : ndarray of grad_table's dtype, shape (B, D)
    argmax : ndarray of int64, shape (B, D)
        Mode "max" only (and needed there): from ``embedding_bag(..., return_argmax=True)``.
    """
    targets, names = (grad_table,), ("grad_table",)
    ids, offsets, per_sample_weights, include_last_offset, _ = _bag_args(
        ids, offsets, per_sample_weights, include_last_offset, targets, names)
    _kernels.embedding_bag_backward(grad_table, ids, offsets, grad_out, mode, per_sample_weights, padding_idx,
                                    include_last_offset, argmax, _format=_format)


def embedding_bag_grad_rows(num_embeddings, ids, offsets, grad_out, *, mode="mean", per_sample_weights=None,
                            padding_idx=None, include_last_offset=False, _format=None):
    """The sparse gradient of `embedding_bag` in torch's layout (``sparse=True``): one entry per lookup.

    Entries follow the ids, uncoalesced, leaving out padding_idx and ids in no bag, as torch's
    ``weight.grad._indices()`` and ``._values()`` do. Mode "max" has no sparse gradient (as in torch).

    Parameters
    ----------
    num_embeddings : int
        V, the table's rows (ids are checked against it).
    ids, offsets, mode, per_sample_weights, padding_idx, include_last_offset : as in `embedding_bag`
    grad_out : ndarray of float32, float64, float16 or bfloat16, shape (B, D)
        Its dtype is the gradient's (per_sample_weights must have it too).

    Returns
    -------
    rows : ndarray of int64, shape (K,)
    values : ndarray of grad_out's dtype, shape (K, D)
        ``values[k] = grad_out[b] * s_i`` for the k-th kept lookup i, of bag b (s_i as in
        `embedding_bag_backward`). For float32 and float64, ``scatter_add(zeros, rows, values)`` is bitwise
        the dense gradient. float16 and bfloat16 round each value once, as torch's sparse backward: a mean's
        s_i is ``round(1 / round(count))`` in the dtype, so the sum of the values may differ from the dense
        gradient in the last place.
    """
    ids, offsets, per_sample_weights, include_last_offset, _ = _bag_args(
        ids, offsets, per_sample_weights, include_last_offset, (), ())
    return _kernels.embedding_bag_grad_rows(num_embeddings, ids, offsets, grad_out, mode, per_sample_weights,
                                            padding_idx, include_last_offset, _format=_format)


def embedding_bag_weights_grad(table, ids, offsets, grad_out, *, padding_idx=None, include_last_offset=False,
                               _format=None):
    """The gradient of `embedding_bag` (mode "sum") with respect to per_sample_weights.

    ``result[i] = table[ids[i]] . grad_out[b]`` for id i of bag b, summed in column order (in float64 for
    float64 tables, else in float32, rounded once to the table's dtype); 0 for padding and for ids in no bag.

    Returns
    -------
    ndarray of the table's dtype, ids' shape
    """
    ids, offsets, _, include_last_offset, shape = _bag_args(ids, offsets, None, include_last_offset, (), ())
    result = _kernels.embedding_bag_weights_grad(table, ids, offsets, grad_out, padding_idx, include_last_offset,
                                                 _format=_format)
    return result.reshape(shape)


# ---------------------------------------------------------------- a table sharded by rows (the id exchange)

__all__ += ["exchange_plan", "row_bounds"]


def _count_arg(value, name, least):
    """value as an int >= least: TypeError for a non-integer (bool included), ValueError below least or past int64."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not least <= value <= _INT64_MAX:
        raise ValueError(f"{name} must be in [{least}, 2**63), got {name}={value}")
    return value


def row_bounds(num_rows, world_size):
    """The row blocks of a table of num_rows rows split over world_size ranks, as even as can be.

    Rank r owns the rows ``bounds[r]`` to ``bounds[r + 1] - 1``. The first ``num_rows % world_size``
    ranks get one row more than the others (the split of ``np.array_split`` and
    ``torch.tensor_split``): no two ranks differ by more than one row, and a rank is empty only
    when there are fewer rows than ranks. (TorchRec's row-wise sharding uses blocks of
    ``ceil(num_rows / world_size)`` instead, which can leave the last ranks short or empty; pass
    such bounds to `exchange_plan` directly if you need them.)

    Parameters
    ----------
    num_rows : int >= 0
    world_size : int >= 1

    Returns
    -------
    bounds : ndarray of int64, shape (world_size + 1,)
        ``bounds[0] == 0``, ``bounds[-1] == num_rows``, non-decreasing.
    """
    num_rows = _count_arg(num_rows, "num_rows", 0)
    world_size = _count_arg(world_size, "world_size", 1)
    base, extra = divmod(num_rows, world_size)
    sizes = np.full(world_size, base, dtype=np.int64)
    sizes[:extra] += 1
    bounds = np.zeros(world_size + 1, dtype=np.int64)
    np.cumsum(sizes, out=bounds[1:])
    return bounds


def exchange_plan(ids, bounds):
    """The send plan of one rank's batch of ids over a table sharded by rows.

    Rank r of W owns the global rows ``bounds[r]`` to ``bounds[r + 1] - 1``. Before the all-to-all
    that fetches rows, each rank asks every owner once for each distinct id it needs:

    Parameters
    ----------
    ids : array-like of int in [0, bounds[-1]), any shape (empty allowed); global row ids
    bounds : array-like of int, shape (W + 1,), W >= 1: ``bounds[0] == 0``, non-decreasing
        (``bounds[r] == bounds[r + 1]`` for an empty rank), ``bounds[-1]`` the table's rows
        (e.g. `row_bounds`). int32 and int64 arrays are taken as they are, other integer
        array-likes converted; it is copied to int64 before it is checked.

    Returns
    -------
    counts : ndarray of int64, shape (W,)
        The number of distinct ids owned by each rank (an id repeated in ids is sent once).
    rows : ndarray of int64, shape (sum(counts),)
        The local row numbers (``id - bounds[r]``) to request, grouped by owner rank in rank
        order; within a rank in order of first occurrence in ``ids.ravel()``.
    inverse : ndarray of int64, shape ids.shape
        For each id, the index of its row in `rows`. With ``R`` the rows received back,
        concatenated in rank order (shape ``(sum(counts), D)``), ``R[inverse]`` is
        ``table[ids]``; a gradient ``g`` of shape ``ids.shape + (D,)`` is summed once per sent
        row by ``scatter_add(zeros((sum(counts), D)), inverse, g)`` (in the row-major order of
        ids, as ``np.add.at``).

    The plan depends on ids and bounds alone: the same bits on every run and thread count (it
    runs on one thread, without the GIL for large batches). Memory is O(len(ids)) whatever the
    number of rows: a hash table of the batch's ids, never an array over the table.

    Every check happens before any result is made: an id outside [0, bounds[-1]) is an
    IndexError naming it and where it stands; bad bounds are a ValueError naming the entry
    (TypeError for a non-integer dtype of either; a bound past int64, as any integer past int64
    given for ids, is `as_ids`'s IndexError).

    Examples
    --------
    >>> counts, rows, inverse = exchange_plan([7, 2, 7, 9, 0, 2], [0, 3, 3, 8, 10])
    >>> counts.tolist(), rows.tolist(), inverse.tolist()
    ([2, 0, 1, 1], [2, 0, 4, 1], [2, 0, 2, 3, 1, 0])
    """
    if type(ids) is not _ndarray or ids.dtype not in _NATIVE_IDS:
        ids = as_ids(ids)
    if type(bounds) is not _ndarray or bounds.dtype not in _NATIVE_IDS:
        bounds = as_ids(bounds, "bounds")
    return _kernels.exchange_plan(ids, bounds)
