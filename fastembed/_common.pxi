# Included by _kernels.pyx (one extension module; Cython `include`): what every kernel family shares.
# The thread policy and its private test hooks, the input checks that run with the GIL before the
# first write, and the helpers the nogil loops use to split work and re-check ids.

def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(fe_openmp_enabled())


def get_num_threads():
    """The number of threads a large call uses."""
    return _num_threads if _num_threads > 0 else fe_omp_max_threads()


def set_num_threads(n):
    """Use n threads for large calls; 0 goes back to the OpenMP default.

    n is capped at the number of processors (more threads than cores only slow a
    memory-bound loop, and a team of thousands may not even be creatable).
    """
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"the number of threads must be an int, got {type(n).__name__}")
    if not 0 <= n < 2**31:
        raise ValueError(f"the number of threads must be in [0, 2**31), got {n}")
    _num_threads = <int>min(n, fe_omp_num_procs())


# ---------------------------------------------------------------- debug API for the tests (private)

cdef bint _poison_fresh = False


def _poison(on=None):
    """Whether the kernels fill the arrays they allocate uninitialised (and must then write in full:
    coalesce's sums, the bags' outputs, the one-row buffers of the *_scatter kernels) with 0xFF bytes
    first, a NaN in every float format. on=None only reports it. For tests only (the test suite turns it
    on): a loop that skips an element, or adds to one it should have written, then shows NaN whatever
    memory the allocator hands back. Process-wide."""
    global _poison_fresh
    if on is not None:
        _poison_fresh = bool(on)
    return bool(_poison_fresh)


cdef cnp.ndarray _fresh(object shape, object dtype):
    """np.empty(shape, dtype), poisoned when `_poison` is on: for arrays a kernel writes every element of."""
    cdef cnp.ndarray arr = np.empty(shape, dtype=dtype)
    if _poison_fresh:
        arr.view(np.uint8).fill(0xFF)
    return arr


def _get_serial_elements():
    """The work (float32 elements) from which a call releases the GIL and may use several threads."""
    return _serial_elements


def _set_serial_elements(n):
    """Set that threshold (default 32768); 0 sends every call, even an empty one, down the threaded path.

    For tests only: they lower it to reach the threaded loops at small random shapes. Process-wide.
    """
    global _serial_elements
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"the serial threshold must be an int, got {type(n).__name__}")
    if not 0 <= n <= PY_SSIZE_T_MAX:
        raise ValueError(f"the serial threshold must be in [0, {PY_SSIZE_T_MAX}], got {n}")
    _serial_elements = n


def _last_call_threads():
    """The size of the OpenMP team that ran the loop of the last kernel call (1: no team, the serial loop).

    Measured inside the parallel region (omp_get_num_threads), so it is what OpenMP gave, not what was
    asked. "Last" is process-wide: the last call, from any Python thread, that passed its checks.
    0 before any such call.
    """
    return _last_threads


def _last_call_released_gil():
    """Whether the last kernel call that passed its checks ran its loop without the GIL."""
    return bool(_last_released)


cdef inline int _record(int team, bint released) except -1:
    """Note what a call's loop did (with the GIL: concurrent calls cannot tear it)."""
    global _last_threads, _last_released
    _last_threads = team
    _last_released = released
    return 0


cdef inline bint _releases(Py_ssize_t work) noexcept nogil:
    return work >= _serial_elements


cdef inline int _threads_for(Py_ssize_t work) noexcept nogil:
    if work < _serial_elements:
        return 1
    cdef int n = _num_threads if _num_threads > 0 else fe_omp_max_threads()
    return n if n > 1 else 1


# ---------------------------------------------------------------- input checks (GIL held)

cdef cnp.ndarray _float_array(object a, str name):
    """a as a float32 ndarray, never cast: TypeError otherwise."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy float32 array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT32 or not cnp.PyArray_ISNOTSWAPPED(arr):
        raise TypeError(f"{name} must be float32 (fastembed never casts tables), got {name}.dtype={arr.dtype}")
    return arr


cdef int _check_2d(cnp.ndarray arr, str name) except -1:
    if cnp.PyArray_NDIM(arr) != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got {name}.shape={_shape(arr)}")
    return 0


cdef int _check_same_dim(cnp.ndarray a, str a_name, cnp.ndarray b, str b_name) except -1:
    if cnp.PyArray_DIM(a, 1) != cnp.PyArray_DIM(b, 1):
        raise ValueError(
            f"{a_name} and {b_name} must have the same dim, got {a_name}.shape={_shape(a)} "
            f"and {b_name}.shape={_shape(b)}"
        )
    return 0


cdef cnp.ndarray _checked_table(cnp.ndarray arr, str name):
    """arr if it is a 2-D, C-contiguous, aligned table (read-only is fine)."""
    _check_2d(arr, name)
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(
            f"{name} must be C-contiguous and aligned (a table is never copied behind your back), got "
            f"{name}.shape={_shape(arr)}, {name}.strides={(<object>arr).strides}, "
            f"aligned={bool(cnp.PyArray_ISALIGNED(arr))}; pass np.ascontiguousarray({name})"
        )
    return arr


cdef cnp.ndarray _checked_target(cnp.ndarray arr, str name):
    """arr if it can be written in place: C-contiguous, aligned and writeable."""
    if not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only; fastembed writes into it in place, never into a silent copy")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(
            f"{name} must be C-contiguous and aligned to be written in place (never into a silent copy); "
            f"got {name}.strides={(<object>arr).strides}, aligned={bool(cnp.PyArray_ISALIGNED(arr))}"
        )
    return arr


cdef cnp.ndarray _contiguous_input(cnp.ndarray arr):
    """An input read once, made C-contiguous if it is not (a copy of an input loses nothing)."""
    if cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr):
        return arr
    return np.array(arr, order="C")  # a 0-d array stays 0-d (np.ascontiguousarray would make it 1-d)


cdef cnp.ndarray _target(object a, str name):
    """An array written in place: float32, C-contiguous, aligned and writeable."""
    return _checked_target(_float_array(a, name), name)


cdef cnp.ndarray _float_input(object a, str name):
    """A float32 input read once: made C-contiguous if it is not (a copy of an input loses nothing)."""
    return _contiguous_input(_float_array(a, name))


# ---------------------------------------------------------------- element formats (lookup and scatter kernels)

# The lookups, scatters and coalesce take tables of any of these formats; every other array of a call
# that holds table elements (out, grad_out, the other table or gradient) must have the same dtype: a
# mismatch is a TypeError naming both, never a cast. The optimizer kernels take the same formats (an
# optimizer's state arrays have the weight's dtype). FMT_* are fixed by the dtype alone, except that the private keyword
# `_format="bfloat16"` makes a call read native uint16 arrays as bfloat16 bits: the torch adapter's way
# to pass a bfloat16 tensor's memory without ml_dtypes (`tensor.view(torch.uint16).numpy()`). Without
# it a uint16 array is refused, never taken for bfloat16.

cdef extern from "numpy/arrayobject.h":
    enum:
        NPY_USERDEF  # the first type number of a dtype registered by a package (ml_dtypes.bfloat16)

cdef enum:
    FMT_F32 = 0
    FMT_F64 = 1
    FMT_F16 = 2
    FMT_BF16 = 3
    FMT_BY_DTYPE = -1  # no `_format`: the dtype decides

_DTYPES = "float32, float64, float16 or bfloat16 (ml_dtypes.bfloat16)"


cdef int _format_arg(object fmt) except -2:
    """The private `_format` keyword: None (each array's dtype) or "bfloat16" (uint16 holds bfloat16 bits)."""
    if fmt is None:
        return FMT_BY_DTYPE
    if isinstance(fmt, str) and fmt == "bfloat16":
        return FMT_BF16
    raise ValueError(f"_format must be None or 'bfloat16', got {fmt!r}")


cdef cnp.ndarray _any_array(object a, str name, int forced, int* fmt):
    """a as an ndarray of one of the formats (never cast), its format in fmt[0]: TypeError otherwise."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy array of {_DTYPES}, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int t = cnp.PyArray_TYPE(arr)
    cdef bint native = cnp.PyArray_ISNOTSWAPPED(arr)
    if forced == FMT_BF16:
        if t == cnp.NPY_UINT16 and native:
            fmt[0] = FMT_BF16
            return arr
        raise TypeError(
            f"{name} must be uint16 holding bfloat16 bits (the call has _format='bfloat16'), got {name}.dtype={arr.dtype}"
        )
    if native:
        if t == cnp.NPY_FLOAT32:
            fmt[0] = FMT_F32
            return arr
        if t == cnp.NPY_FLOAT64:
            fmt[0] = FMT_F64
            return arr
        if t == cnp.NPY_FLOAT16:
            fmt[0] = FMT_F16
            return arr
        if t >= NPY_USERDEF and cnp.PyArray_ITEMSIZE(arr) == 2 and arr.dtype.name == "bfloat16":
            fmt[0] = FMT_BF16  # ml_dtypes.bfloat16, recognised without importing ml_dtypes
            return arr
    hint = "; a uint16 array is never read as bfloat16: view it as ml_dtypes.bfloat16" if t == cnp.NPY_UINT16 else ""
    raise TypeError(f"{name} must be {_DTYPES} (fastembed never casts tables), got {name}.dtype={arr.dtype}{hint}")


cdef cnp.ndarray _array_like(object a, str name, cnp.ndarray ref, str ref_name):
    """a as an ndarray of ref's dtype (ref already checked): TypeError naming both dtypes otherwise."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy array of {ref_name}'s dtype {ref.dtype}, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.PyArray_TYPE(ref) or not cnp.PyArray_ISNOTSWAPPED(arr):
        raise TypeError(
            f"{name}.dtype={arr.dtype} does not match {ref_name}.dtype={ref.dtype}: the arrays of one call must "
            f"share the table's dtype ({_DTYPES}); fastembed never casts"
        )
    return arr


cdef inline cnp.ndarray _any_table(object a, str name, int forced, int* fmt):
    return _checked_table(_any_array(a, name, forced, fmt), name)


cdef inline cnp.ndarray _table_like(object a, str name, cnp.ndarray ref, str ref_name):
    return _checked_table(_array_like(a, name, ref, ref_name), name)


cdef inline cnp.ndarray _any_target(object a, str name, int forced, int* fmt):
    return _checked_target(_any_array(a, name, forced, fmt), name)


cdef inline cnp.ndarray _target_like(object a, str name, cnp.ndarray ref, str ref_name):
    return _checked_target(_array_like(a, name, ref, ref_name), name)


cdef inline cnp.ndarray _any_input(object a, str name, int forced, int* fmt):
    return _contiguous_input(_any_array(a, name, forced, fmt))


cdef inline cnp.ndarray _input_like(object a, str name, cnp.ndarray ref, str ref_name):
    return _contiguous_input(_array_like(a, name, ref, ref_name))


cdef cnp.ndarray _index_array(object a, str name):
    """A C-contiguous, aligned native int32 or int64 array (ops.py has normalised everything else)."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy integer array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int t = cnp.PyArray_TYPE(arr)
    cdef Py_ssize_t width = cnp.PyArray_ITEMSIZE(arr)
    if not (cnp.PyTypeNum_ISSIGNED(t) and (width == 4 or width == 8) and cnp.PyArray_ISNOTSWAPPED(arr)):
        raise TypeError(f"{name} must be int32 or int64, got {name}.dtype={arr.dtype}")
    if cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr):
        return arr
    return np.array(arr, order="C")  # a 0-d array stays 0-d (np.ascontiguousarray would make it 1-d)


cdef inline tuple _shape(object a):
    return a.shape


cdef cnp.ndarray _private(cnp.ndarray arr, object original):
    """arr, or a copy when it is still the caller's array: for the Adam rows, which its loop does not
    re-check (the id loops re-check each id as they read it instead; see the loops below)."""
    return np.array(arr, copy=True) if arr is original else arr


cdef inline Py_ssize_t _rows(cnp.ndarray table):
    return cnp.PyArray_DIM(table, 0)


cdef inline Py_ssize_t _dim(cnp.ndarray table):
    return cnp.PyArray_DIM(table, 1)


cdef tuple _row_shape(cnp.ndarray ids, Py_ssize_t D):
    return _shape(ids) + (D,)


cdef int _check_rows_shape(cnp.ndarray arr, str name, cnp.ndarray ids, Py_ssize_t D) except -1:
    """arr must have shape ids.shape + (D,)."""
    cdef int nd = cnp.PyArray_NDIM(ids)
    cdef int k
    if cnp.PyArray_NDIM(arr) == nd + 1 and cnp.PyArray_DIM(arr, nd) == D:
        for k in range(nd):
            if cnp.PyArray_DIM(arr, k) != cnp.PyArray_DIM(ids, k):
                break
        else:
            return 0
    raise ValueError(
        f"{name} must have shape ids.shape + (D,) = {_row_shape(ids, D)}, got {name}.shape={_shape(arr)}"
    )


cdef cnp.ndarray _new_rows_of(cnp.ndarray ids, Py_ssize_t D, int type_num):
    """An uninitialised array of numpy type type_num and shape ids.shape + (D,)."""
    cdef int nd = cnp.PyArray_NDIM(ids)
    cdef cnp.npy_intp dims[64]
    cdef int k
    if nd + 1 > 64:
        raise ValueError(f"ids has {nd} dimensions; the result would have more than numpy's 64")
    for k in range(nd):
        dims[k] = cnp.PyArray_DIM(ids, k)
    dims[nd] = D
    return cnp.PyArray_EMPTY(nd + 1, dims, type_num, 0)


cdef cnp.ndarray _new_rows(cnp.ndarray ids, Py_ssize_t D):
    """An uninitialised float32 array of shape ids.shape + (D,)."""
    return _new_rows_of(ids, D, cnp.NPY_FLOAT32)


cdef cnp.ndarray _out_rows(object out, cnp.ndarray ids, Py_ssize_t D):
    """The output array: `out` checked, or a new one."""
    if out is None:
        return _new_rows(ids, D)
    cdef cnp.ndarray arr = _target(out, "out")
    _check_rows_shape(arr, "out", ids, D)
    return arr


cdef cnp.ndarray _out_rows_like(object out, cnp.ndarray ids, Py_ssize_t D, cnp.ndarray ref, str ref_name):
    """The output array of ref's dtype: `out` checked, or a new one."""
    if out is None:
        return _new_rows_of(ids, D, cnp.PyArray_TYPE(ref))
    cdef cnp.ndarray arr = _target_like(out, "out", ref, ref_name)
    _check_rows_shape(arr, "out", ids, D)
    return arr


cdef inline bint _span(cnp.ndarray a, char** lo, char** hi):
    """The bytes [lo, hi) that a can touch, whatever its strides; False when a is empty."""
    cdef char* first = <char*>cnp.PyArray_DATA(a)
    cdef char* last = first
    cdef int k
    cdef Py_ssize_t n, stride
    if cnp.PyArray_SIZE(a) == 0:
        return False
    for k in range(cnp.PyArray_NDIM(a)):
        n = cnp.PyArray_DIM(a, k)
        stride = cnp.PyArray_STRIDE(a, k)
        if stride < 0:
            first += (n - 1) * stride
        else:
            last += (n - 1) * stride
    lo[0] = first
    hi[0] = last + cnp.PyArray_ITEMSIZE(a)
    return True


cdef inline bint _overlap(cnp.ndarray a, cnp.ndarray b):
    """Whether the memory spans of a and b intersect (exact for contiguous arrays, cautious for strided ones)."""
    cdef char* a_lo
    cdef char* a_hi
    cdef char* b_lo
    cdef char* b_hi
    if not _span(a, &a_lo, &a_hi) or not _span(b, &b_lo, &b_hi):
        return False
    return a_lo < b_hi and b_lo < a_hi


cdef int _no_overlap(cnp.ndarray target, str target_name, tuple others, tuple names) except -1:
    """A target written in place must share no memory with the arrays the caller passed (not just our copies)."""
    cdef Py_ssize_t k
    for k in range(len(others)):
        if cnp.PyArray_Check(others[k]) and _overlap(target, <cnp.ndarray>others[k]):
            raise ValueError(f"{target_name} shares memory with {names[k]}; pass separate arrays")
    return 0


cdef str _where(cnp.ndarray arr, str name, Py_ssize_t flat):
    if cnp.PyArray_NDIM(arr) == 0:
        return name
    idx = np.unravel_index(flat, _shape(arr))
    return f"{name}[{', '.join(str(int(i)) for i in idx)}]"


cdef int _raise_out_of_range(cnp.ndarray arr, str name, Py_ssize_t flat, Py_ssize_t V, str table) except -1:
    value = arr.reshape(-1)[flat]
    raise IndexError(
        f"{_where(arr, name, flat)} = {value} is out of range for {table} with {V} rows "
        f"(valid {name} are 0 to {V - 1})"
    )


cdef Py_ssize_t _first_bad(const index_t* ids, Py_ssize_t N, Py_ssize_t V) noexcept nogil:
    """The flat index of the first id outside [0, V), or -1: one pass, one compare each."""
    cdef Py_ssize_t i
    cdef uint64_t bound = <uint64_t>V
    for i in range(N):
        if <uint64_t>(<int64_t>ids[i]) >= bound:
            return i
    return -1


cdef inline Py_ssize_t _first_bad_any(const void* ids, bint wide, Py_ssize_t N, Py_ssize_t V) noexcept nogil:
    if wide:
        return _first_bad(<const int64_t*>ids, N, V)
    return _first_bad(<const int32_t*>ids, N, V)


cdef int _check_range(cnp.ndarray ids, str name, Py_ssize_t V, str table) except -1:
    cdef Py_ssize_t N = cnp.PyArray_SIZE(ids), bad
    cdef const void* p = cnp.PyArray_DATA(ids)
    cdef bint wide = cnp.PyArray_ITEMSIZE(ids) == 8
    if _releases(N):
        with nogil:
            bad = _first_bad_any(p, wide, N, V)
    else:
        bad = _first_bad_any(p, wide, N, V)
    if bad >= 0:
        _raise_out_of_range(ids, name, bad, V, table)
    return 0


cdef inline Py_ssize_t _seq_len(cnp.ndarray ids):
    cdef int nd = cnp.PyArray_NDIM(ids)
    return cnp.PyArray_DIM(ids, nd - 1) if nd > 0 else 1


cdef int _check_start(Py_ssize_t start, Py_ssize_t T, Py_ssize_t N, Py_ssize_t P, str table) except -1:
    """positions = start + arange(T) must lie in [0, P)."""
    if N == 0:
        return 0
    if start < 0 or start + T > P:
        raise IndexError(
            f"positions start + arange(T) = {start}..{start + T - 1} (T = ids.shape[-1] = {T}) is out of range "
            f"for {table} with {P} rows (valid positions are 0 to {P - 1})"
        )
    return 0


cdef int _check_positions(cnp.ndarray pos_arr, Py_ssize_t start, Py_ssize_t T, Py_ssize_t N, Py_ssize_t P,
                          str table) except -1:
    """Every position in [0, P): the array's values, or start + arange(T) when there is no array."""
    if pos_arr is None:
        return _check_start(start, T, N, P, table)
    return _check_range(pos_arr, "positions", P, table)


cdef Py_ssize_t _start_of(object positions) except? -1:
    """The start position for positions None or an int; -1 means positions is an array."""
    if positions is None:
        return 0
    if isinstance(positions, int):
        if positions < 0:
            raise IndexError(f"positions start {positions} is negative; positions must be >= 0")
        if positions > 2**62:
            raise IndexError(f"positions start {positions} is out of range")
        return positions
    return -1


cdef cnp.ndarray _positions_array(object positions, cnp.ndarray ids):
    """An int64 positions array of ids.shape (ops.py broadcasts before it calls)."""
    cdef cnp.ndarray pos = _index_array(positions, "positions")
    if cnp.PyArray_ITEMSIZE(pos) != 8:
        raise TypeError(f"positions must be int64 here, got positions.dtype={pos.dtype}")
    if _shape(pos) != _shape(ids):
        raise ValueError(f"positions must have ids.shape = {_shape(ids)}, got positions.shape={_shape(pos)}")
    return pos


# ---------------------------------------------------------------- splitting work, loop helpers (no GIL)

cdef inline Py_ssize_t _part(Py_ssize_t n, int k, int parts) noexcept nogil:
    """Where part k of n items split in `parts` even parts begins."""
    return n * k // parts


cdef inline Py_ssize_t _phase_of(const void* table, size_t size) noexcept nogil:
    """How many elements of `size` bytes row 0 starts past a 128-byte boundary (numpy's large arrays:
    16 bytes, so 4 floats). Every row has the same phase when a row is a multiple of 128 bytes, as in
    the design's shapes."""
    return <Py_ssize_t>((<size_t>table % (COLUMN_BLOCK * sizeof(float))) // size)


cdef inline Py_ssize_t _phase(const float* table) noexcept nogil:
    return _phase_of(table, sizeof(float))


# Blocks are 128 bytes: `block` elements (COLUMN_BLOCK floats; 16 doubles, 64 16-bit elements).

cdef inline Py_ssize_t _blocks_of(Py_ssize_t D, Py_ssize_t phase, Py_ssize_t block) noexcept nogil:
    """128-byte blocks per row. When a row is a whole number of blocks they are cyclic: the block a row
    ends in is the one the next row starts in, so it is one block (the head and tail columns of a row)
    with one owner."""
    if D % block == 0:
        return D // block
    return (phase + D + block - 1) // block


# Thread k's columns are [_col_start, _col_end) plus [_col_wrap, D) when it owns the block that wraps
# into the next row. (Three functions, each assigned in the prange body: Cython makes a variable
# thread-private only when the loop assigns it, never when it is written through a pointer.)

cdef inline bint _wraps_of(Py_ssize_t D, Py_ssize_t phase, Py_ssize_t block) noexcept nogil:
    return D % block == 0 and phase > 0


cdef inline Py_ssize_t _col_start_of(Py_ssize_t D, Py_ssize_t phase, int k, int parts, Py_ssize_t block) noexcept nogil:
    cdef Py_ssize_t j = _blocks_of(D, phase, block) * k // parts
    return 0 if j == 0 else min(D, j * block - phase)


cdef inline Py_ssize_t _col_end_of(Py_ssize_t D, Py_ssize_t phase, int k, int parts, Py_ssize_t block) noexcept nogil:
    cdef Py_ssize_t blocks = _blocks_of(D, phase, block)
    cdef Py_ssize_t j = blocks * (k + 1) // parts
    if j < blocks:
        return min(D, j * block - phase)
    return D - phase if _wraps_of(D, phase, block) else D  # the last partial block belongs to block 0's owner


cdef inline Py_ssize_t _col_wrap_of(Py_ssize_t D, Py_ssize_t phase, int k, int parts, Py_ssize_t block) noexcept nogil:
    if k == 0 and _wraps_of(D, phase, block):
        return D - phase
    return D


cdef inline int _column_threads_of(Py_ssize_t N, Py_ssize_t D, const void* table, size_t size) noexcept nogil:
    cdef int n = _threads_for(N * D)
    cdef Py_ssize_t block = COLUMN_BLOCK * sizeof(float) // size
    return <int>min(<Py_ssize_t>n, _blocks_of(D, _phase_of(table, size), block))


# The float32 forms (COLUMN_BLOCK floats a block), for kernels that take float32 only.

cdef inline Py_ssize_t _blocks(Py_ssize_t D, Py_ssize_t phase) noexcept nogil:
    return _blocks_of(D, phase, COLUMN_BLOCK)


cdef inline bint _wraps(Py_ssize_t D, Py_ssize_t phase) noexcept nogil:
    return _wraps_of(D, phase, COLUMN_BLOCK)


cdef inline Py_ssize_t _col_start(Py_ssize_t D, Py_ssize_t phase, int k, int parts) noexcept nogil:
    return _col_start_of(D, phase, k, parts, COLUMN_BLOCK)


cdef inline Py_ssize_t _col_end(Py_ssize_t D, Py_ssize_t phase, int k, int parts) noexcept nogil:
    return _col_end_of(D, phase, k, parts, COLUMN_BLOCK)


cdef inline Py_ssize_t _col_wrap(Py_ssize_t D, Py_ssize_t phase, int k, int parts) noexcept nogil:
    return _col_wrap_of(D, phase, k, parts, COLUMN_BLOCK)


cdef inline int _column_threads(Py_ssize_t N, Py_ssize_t D, const float* table) noexcept nogil:
    return _column_threads_of(N, D, table, sizeof(float))


cdef inline void _prefetch_row(const float* row, Py_ssize_t D) noexcept nogil:
    cdef Py_ssize_t d
    for d in range(0, min(D, PREFETCH_FLOATS), 16):
        fe_prefetch(row + d)


cdef inline void _prefetch_row_write(const float* row, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    cdef Py_ssize_t d
    for d in range(c0, min(c1, c0 + PREFETCH_FLOATS), 16):
        fe_prefetch_write(row + d)


cdef inline void _prefetch_bytes(const char* row, Py_ssize_t nbytes, bint write) noexcept nogil:
    """The first min(nbytes, 1 KiB) bytes of a row, a 64-byte line at a time (the other element types'
    form of the two above)."""
    cdef Py_ssize_t b
    for b in range(0, min(nbytes, PREFETCH_FLOATS * <Py_ssize_t>sizeof(float)), 64):
        if write:
            fe_prefetch_write(row + b)
        else:
            fe_prefetch(row + b)


cdef inline bint _outside(int64_t x, Py_ssize_t bound) noexcept nogil:
    return <uint64_t>x >= <uint64_t>bound


cdef int _raise_if_skipped(Py_ssize_t skipped, str name) except -1:
    if skipped:
        raise RuntimeError(
            f"{skipped} {name} changed to out-of-range values while the call ran (another thread or process "
            f"wrote to the array); those rows were skipped, so the result is incomplete"
        )
    return 0
