"""Type stubs for the compiled module fastembed/_kernels.pyx.

The `def` entry points check every input themselves: tables and gradients must be
ndarrays, never cast: float32, float64, float16 or bfloat16 (ml_dtypes.bfloat16) for
the lookups, scatters, coalesce and renorm (every element array of one call of the table's
dtype; the private keyword `_format="bfloat16"` reads uint16 arrays as bfloat16
bits), float32 for the optimizers; ids native int32 or int64 ndarrays (fastembed.ops
converts other array-likes first), and positions None, an int start, or an int64
array of ids.shape.

The private test hooks (_get_serial_elements, _set_serial_elements, _last_call_threads,
_last_call_released_gil, _f16_hardware, _bf16_hardware, _narrow, _widen) are left out on purpose: they are
not API, and
tests/test_packaging.py compares only the public names with the module.
"""
import numpy as np
import numpy.typing as npt

# float32, float64, float16 or bfloat16 (a numpy dtype registered by ml_dtypes, which numpy's typing
# cannot name); one call's element arrays share one dtype
_Table = npt.NDArray[np.float32] | npt.NDArray[np.float64] | npt.NDArray[np.float16] | npt.NDArray[np.generic]
_Format = str | None
_Ids = npt.NDArray[np.int32] | npt.NDArray[np.int64]
_Positions = int | npt.NDArray[np.int64] | None

def openmp_enabled() -> bool: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def gather(table: _Table, ids: _Ids, out: _Table | None = None, *, _format: _Format = None) -> _Table: ...
def gather_add(
    token_table: _Table,
    position_table: _Table,
    ids: _Ids,
    positions: _Positions = None,
    out: _Table | None = None,
    *,
    _format: _Format = None,
) -> _Table: ...
def scatter_add(
    grad_table: _Table, ids: _Ids, grad_out: _Table, *, scale_grad_by_freq: bool = False, _format: _Format = None
) -> None: ...
def gather_add_backward(
    grad_hidden: _Table,
    ids: _Ids,
    token_grad: _Table,
    position_grad: _Table,
    positions: _Positions = None,
    *,
    _format: _Format = None,
) -> None: ...
def coalesce(ids: _Ids, grad_out: _Table, *, _format: _Format = None) -> tuple[npt.NDArray[np.int64], _Table]: ...
def sgd_step(
    weight: _Table,
    grad: _Table,
    rows: npt.NDArray[np.int64] | None,
    lr: float,
    check_only: bool = False,
    fma: bool = False,
    *,
    _format: _Format = None,
) -> None: ...
def sgd_scatter(
    weight: _Table,
    ids: _Ids,
    grad_out: _Table,
    lr: float,
    fma: bool = False,
    check_only: bool = False,
    *,
    _format: _Format = None,
) -> None: ...
def adagrad_step(
    weight: _Table,
    state_sum: _Table,
    grad: _Table,
    rows: npt.NDArray[np.int64] | None,
    clr: float,
    eps: float,
    check_only: bool = False,
    *,
    _format: _Format = None,
) -> None: ...
def rowwise_adagrad_step(
    weight: _Table,
    state_sum: _Table,
    grad: _Table,
    rows: npt.NDArray[np.int64] | None,
    lr: float,
    eps: float,
    check_only: bool = False,
    *,
    _format: _Format = None,
) -> None: ...
def adam_step(
    weight: _Table,
    exp_avg: _Table,
    exp_avg_sq: _Table,
    grad: _Table,
    rows: npt.NDArray[np.int64] | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    bias1: float,
    bias2: float,
    check_only: bool = False,
    *,
    _format: _Format = None,
) -> None: ...
def adagrad_scatter(
    weight: _Table,
    state_sum: _Table,
    ids: _Ids,
    grad_out: _Table,
    clr: float,
    eps: float,
    skip_row: int = -1,
    check_only: bool = False,
    *,
    _format: _Format = None,
) -> None: ...
def rowwise_adagrad_scatter(
    weight: _Table,
    state_sum: _Table,
    ids: _Ids,
    grad_out: _Table,
    lr: float,
    eps: float,
    skip_row: int = -1,
    check_only: bool = False,
    *,
    _format: _Format = None,
) -> None: ...
def adam_scatter(
    weight: _Table,
    exp_avg: _Table,
    exp_avg_sq: _Table,
    ids: _Ids,
    grad_out: _Table,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    bias1: float,
    bias2: float,
    skip_row: int = -1,
    check_only: bool = False,
    *,
    _format: _Format = None,
) -> None: ...
def renorm(table: _Table, ids: _Ids, max_norm: float, norm_type: float = 2.0, *, _format: _Format = None) -> None: ...

# embedding bags (_bag_*.pxi); BagArgumentError and BagModeError are exported as fastembed.BagArgumentError
# and fastembed.BagModeError.
class BagArgumentError(ValueError, RuntimeError): ...
class BagIndexError(IndexError, RuntimeError): ...
class BagOffsetError(BagArgumentError, IndexError): ...
class BagModeError(ValueError, NotImplementedError): ...

def embedding_bag(
    table: _Table,
    ids: _Ids,
    offsets: _Ids,
    mode: str,
    per_sample_weights: _Table | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    out: _Table | None = None,
    *,
    _format: _Format = None,
    argmax: bool = True,
) -> _Table | tuple[_Table, npt.NDArray[np.int64] | None]: ...
def embedding_bag_backward(
    grad_table: _Table,
    ids: _Ids,
    offsets: _Ids,
    grad_out: _Table,
    mode: str,
    per_sample_weights: _Table | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    argmax: npt.NDArray[np.int64] | None = None,
    *,
    _format: _Format = None,
) -> None: ...
def embedding_bag_grad_rows(
    num_embeddings: int,
    ids: _Ids,
    offsets: _Ids,
    grad_out: _Table,
    mode: str,
    per_sample_weights: _Table | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    *,
    _format: _Format = None,
) -> tuple[npt.NDArray[np.int64], _Table]: ...
def embedding_bag_weights_grad(
    table: _Table,
    ids: _Ids,
    offsets: _Ids,
    grad_out: _Table,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
    *,
    _format: _Format = None,
) -> _Table: ...

# a table sharded by rows (_shard.pxi)
def exchange_plan(
    ids: _Ids, bounds: _Ids
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
