"""Type stubs for fastembed.ops, the public functional API (shapes in its docstrings)."""
import numpy as np
import numpy.typing as npt

_Float32 = npt.NDArray[np.float32]
_Positions = int | npt.ArrayLike | None

__all__ = ["gather", "gather_add", "scatter_add", "gather_add_backward", "coalesce", "as_ids", "renorm"]

def as_ids(ids: npt.ArrayLike, name: str = "ids") -> npt.NDArray[np.int32] | npt.NDArray[np.int64]: ...
def gather(table: _Float32, ids: npt.ArrayLike, *, out: _Float32 | None = None) -> _Float32: ...
def gather_add(
    token_table: _Float32,
    position_table: _Float32,
    ids: npt.ArrayLike,
    *,
    positions: _Positions = None,
    out: _Float32 | None = None,
) -> _Float32: ...
def scatter_add(
    grad_table: _Float32, ids: npt.ArrayLike, grad_out: _Float32, *, scale_grad_by_freq: bool = False
) -> None: ...
def gather_add_backward(
    grad_hidden: _Float32,
    ids: npt.ArrayLike,
    token_grad: _Float32,
    position_grad: _Float32,
    *,
    positions: _Positions = None,
) -> None: ...
def coalesce(ids: npt.ArrayLike, grad_out: _Float32) -> tuple[npt.NDArray[np.int64], _Float32]: ...
def positions_array(ids: npt.ArrayLike, positions: _Positions = None) -> npt.NDArray[np.int64]: ...
# renorm and the embedding bags take tables of float32, float64, float16 or ml_dtypes.bfloat16
_Table = npt.NDArray[np.float32] | npt.NDArray[np.float64] | npt.NDArray[np.float16] | npt.NDArray[np.generic]
def renorm(table: _Table, ids: npt.ArrayLike, max_norm: float, norm_type: float = 2.0) -> None: ...

__all__ += ["embedding_bag", "embedding_bag_backward", "embedding_bag_grad_rows", "embedding_bag_weights_grad"]

def embedding_bag(
    table: _Table,
    ids: npt.ArrayLike,
    offsets: npt.ArrayLike | None = None,
    *,
    mode: str = "mean",
    per_sample_weights: _Table | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    out: _Table | None = None,
    return_argmax: bool = False,
    _format: str | None = None,
) -> _Table | tuple[_Table, npt.NDArray[np.int64]]: ...
def embedding_bag_backward(
    grad_table: _Table,
    ids: npt.ArrayLike,
    offsets: npt.ArrayLike | None,
    grad_out: _Table,
    *,
    mode: str = "mean",
    per_sample_weights: _Table | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    argmax: npt.NDArray[np.int64] | None = None,
    _format: str | None = None,
) -> None: ...
def embedding_bag_grad_rows(
    num_embeddings: int,
    ids: npt.ArrayLike,
    offsets: npt.ArrayLike | None,
    grad_out: _Table,
    *,
    mode: str = "mean",
    per_sample_weights: _Table | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    _format: str | None = None,
) -> tuple[npt.NDArray[np.int64], _Table]: ...
def embedding_bag_weights_grad(
    table: _Table,
    ids: npt.ArrayLike,
    offsets: npt.ArrayLike | None,
    grad_out: _Table,
    *,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    _format: str | None = None,
) -> _Table: ...

# a table sharded by rows (the id exchange)
__all__ += ["exchange_plan", "row_bounds"]

def row_bounds(num_rows: int, world_size: int) -> npt.NDArray[np.int64]: ...
def exchange_plan(
    ids: npt.ArrayLike, bounds: npt.ArrayLike
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
