"""Compiled kernels of fastembed: checked `def` entry points over `noexcept nogil` loops.

Axes, used in every name below:
  V  rows of a table (token vocabulary, or P for the position table)
  D  embedding dim (columns of every table)
  N  number of ids (ids.size; ids may have any shape)
  T  positions per sequence (ids.shape[-1]; 1 for 0-d ids)

Every `def` here checks all of its inputs while it holds the GIL, before the first
write; the `cdef` loops below trust what they are given. The callers (ops.py)
pass ids as numpy arrays of native int32 or int64 and positions as None, an int
start, or a C-contiguous int64 array of ids.shape.
"""
cimport numpy as cnp
from cpython.pyport cimport PY_SSIZE_T_MAX
from cython.parallel cimport prange
from libc.math cimport sqrtf
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

import numpy as np

cnp.import_array()

cdef extern from "_fastembed.h" nogil:
    int fe_omp_max_threads()
    int fe_omp_num_procs()
    int fe_omp_team_size()
    int fe_openmp_enabled()
    int fe_ctz64(uint64_t x)
    int fe_popcount64(uint64_t x)
    void fe_prefetch(const void* p)
    void fe_add_rows(float* out, const float* a, const float* b, Py_ssize_t n)
    void fe_add_into(float* g, const float* s, Py_ssize_t n)
    void fe_adam_row(float* w, float* m, float* v, const float* g, Py_ssize_t n, float lr, float beta1,
                     float beta2, float eps, float inv_bias1, float inv_bias2)
    void fe_prefetch_write(const void* p)

ctypedef fused index_t:
    int32_t
    int64_t

cdef enum:
    # Below this many float32 elements of work a call keeps the GIL and one thread:
    # releasing the GIL or waking a thread team costs more than the loop itself.
    # (The default of _serial_elements, which the tests lower to reach the threaded path.)
    SERIAL_ELEMENTS = 32768
    # Threads split the columns of a gradient at 128-byte boundaries in memory: a pair of cache lines,
    # which the adjacent-line prefetcher fetches together, so no line (nor pair) is written by two threads.
    COLUMN_BLOCK = 32
    # Gathers and scatters touch rows in random order: ask for row i + 8 while row i is copied,
    # its first 1 KiB at most (the hardware prefetcher follows a long row by itself).
    PREFETCH_ROWS = 8
    PREFETCH_FLOATS = 256

cdef int _num_threads = 0  # 0: follow OpenMP (omp_get_max_threads, which threadpoolctl controls)
cdef Py_ssize_t _serial_elements = SERIAL_ELEMENTS
# What the last call that reached its loop did, stored once per call with the GIL held (for tests).
cdef int _last_threads = 0
cdef bint _last_released = False


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


cdef cnp.ndarray _table(object a, str name):
    """A 2-D, C-contiguous, aligned float32 table (read-only is fine)."""
    cdef cnp.ndarray arr = _float_array(a, name)
    _check_2d(arr, name)
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(
            f"{name} must be C-contiguous and aligned (a table is never copied behind your back), got "
            f"{name}.shape={_shape(arr)}, {name}.strides={(<object>arr).strides}, "
            f"aligned={bool(cnp.PyArray_ISALIGNED(arr))}; pass np.ascontiguousarray({name})"
        )
    return arr


cdef cnp.ndarray _target(object a, str name):
    """An array written in place: float32, C-contiguous, aligned and writeable."""
    cdef cnp.ndarray arr = _float_array(a, name)
    if not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only; fastembed writes into it in place, never into a silent copy")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(
            f"{name} must be C-contiguous and aligned to be written in place (never into a silent copy); "
            f"got {name}.strides={(<object>arr).strides}, aligned={bool(cnp.PyArray_ISALIGNED(arr))}"
        )
    return arr


cdef cnp.ndarray _float_input(object a, str name):
    """A float32 input read once: made C-contiguous if it is not (a copy of an input loses nothing)."""
    cdef cnp.ndarray arr = _float_array(a, name)
    if cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr):
        return arr
    return np.array(arr, order="C")  # a 0-d array stays 0-d (np.ascontiguousarray would make it 1-d)


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


cdef cnp.ndarray _new_rows(cnp.ndarray ids, Py_ssize_t D):
    """An uninitialised float32 array of shape ids.shape + (D,)."""
    cdef int nd = cnp.PyArray_NDIM(ids)
    cdef cnp.npy_intp dims[64]
    cdef int k
    if nd + 1 > 64:
        raise ValueError(f"ids has {nd} dimensions; the result would have more than numpy's 64")
    for k in range(nd):
        dims[k] = cnp.PyArray_DIM(ids, k)
    dims[nd] = D
    return cnp.PyArray_EMPTY(nd + 1, dims, cnp.NPY_FLOAT32, 0)


cdef cnp.ndarray _out_rows(object out, cnp.ndarray ids, Py_ssize_t D):
    """The output array: `out` checked, or a new one."""
    if out is None:
        return _new_rows(ids, D)
    cdef cnp.ndarray arr = _target(out, "out")
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


cdef int _check_start(Py_ssize_t start, Py_ssize_t T, Py_ssize_t N, Py_ssize_t P) except -1:
    """positions = start + arange(T) must lie in [0, P)."""
    if N == 0:
        return 0
    if start < 0 or start + T > P:
        raise IndexError(
            f"positions start + arange(T) = {start}..{start + T - 1} (T = ids.shape[-1] = {T}) is out of range "
            f"for position_table with {P} rows (valid positions are 0 to {P - 1})"
        )
    return 0


cdef int _check_positions(cnp.ndarray pos_arr, Py_ssize_t start, Py_ssize_t T, Py_ssize_t N, Py_ssize_t P,
                          str table) except -1:
    """Every position in [0, P): the array's values, or start + arange(T) when there is no array."""
    if pos_arr is None:
        return _check_start(start, T, N, P)
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


# ---------------------------------------------------------------- loops (no GIL, trusted inputs)

cdef inline Py_ssize_t _part(Py_ssize_t n, int k, int parts) noexcept nogil:
    """Where part k of n items split in `parts` even parts begins."""
    return n * k // parts


cdef inline Py_ssize_t _phase(const float* table) noexcept nogil:
    """How many floats row 0 starts past a 128-byte boundary (numpy's large arrays: 16 bytes, so 4).
    Every row has the same phase when D is a multiple of 32, as in the design's shapes."""
    return <Py_ssize_t>((<size_t>table % (COLUMN_BLOCK * sizeof(float))) // sizeof(float))


cdef inline Py_ssize_t _blocks(Py_ssize_t D, Py_ssize_t phase) noexcept nogil:
    """128-byte blocks per row. When D is a multiple of 32 they are cyclic: the block a row ends in is
    the one the next row starts in, so it is one block (the head and tail columns of a row) with one owner."""
    if D % COLUMN_BLOCK == 0:
        return D // COLUMN_BLOCK
    return (phase + D + COLUMN_BLOCK - 1) // COLUMN_BLOCK


# Thread k's columns are [_col_start, _col_end) plus [_col_wrap, D) when it owns the block that wraps
# into the next row. (Three functions, each assigned in the prange body: Cython makes a variable
# thread-private only when the loop assigns it, never when it is written through a pointer.)

cdef inline bint _wraps(Py_ssize_t D, Py_ssize_t phase) noexcept nogil:
    return D % COLUMN_BLOCK == 0 and phase > 0


cdef inline Py_ssize_t _col_start(Py_ssize_t D, Py_ssize_t phase, int k, int parts) noexcept nogil:
    cdef Py_ssize_t j = _blocks(D, phase) * k // parts
    return 0 if j == 0 else min(D, j * COLUMN_BLOCK - phase)


cdef inline Py_ssize_t _col_end(Py_ssize_t D, Py_ssize_t phase, int k, int parts) noexcept nogil:
    cdef Py_ssize_t blocks = _blocks(D, phase)
    cdef Py_ssize_t j = blocks * (k + 1) // parts
    if j < blocks:
        return min(D, j * COLUMN_BLOCK - phase)
    return D - phase if _wraps(D, phase) else D  # the last partial block belongs to block 0's owner


cdef inline Py_ssize_t _col_wrap(Py_ssize_t D, Py_ssize_t phase, int k, int parts) noexcept nogil:
    if k == 0 and _wraps(D, phase):
        return D - phase
    return D


cdef inline int _column_threads(Py_ssize_t N, Py_ssize_t D, const float* table) noexcept nogil:
    cdef int n = _threads_for(N * D)
    return <int>min(<Py_ssize_t>n, _blocks(D, _phase(table)))


cdef inline void _prefetch_row(const float* row, Py_ssize_t D) noexcept nogil:
    cdef Py_ssize_t d
    for d in range(0, min(D, PREFETCH_FLOATS), 16):
        fe_prefetch(row + d)


cdef inline void _prefetch_row_write(const float* row, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    cdef Py_ssize_t d
    for d in range(c0, min(c1, c0 + PREFETCH_FLOATS), 16):
        fe_prefetch_write(row + d)


cdef inline bint _outside(int64_t x, Py_ssize_t bound) noexcept nogil:
    return <uint64_t>x >= <uint64_t>bound


# The loops below check each id once more as they read it (one compare, predicted): the entry points
# have range-checked them all, but ids in memory that another process or thread shares can change in
# between. A changed id is skipped and counted, never followed out of bounds; the entry point raises.

cdef Py_ssize_t _gather_rows(const float* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                             Py_ssize_t lo, Py_ssize_t hi, float* out) noexcept nogil:
    """out[i] = table[ids[i]] for i in [lo, hi); returns the number of ids found out of range."""
    cdef Py_ssize_t i, skipped = 0
    cdef int64_t r
    for i in range(lo, hi):
        if i + PREFETCH_ROWS < hi:
            _prefetch_row(table + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, D)  # a prefetch never faults
        r = ids[i]
        if _outside(r, V):
            skipped += 1
            continue
        memcpy(out + i * D, table + r * D, D * sizeof(float))
    return skipped


cdef Py_ssize_t _gather(const float* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids, Py_ssize_t N,
                        float* out, int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t lo, hi, skipped = 0
    team[0] = 1
    if nthreads <= 1:
        return _gather_rows(table, V, D, ids, 0, N, out)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:  # the team OpenMP gave, for _last_call_threads
            team[0] = fe_omp_team_size()
        lo = _part(N, k, nthreads)
        hi = _part(N, k + 1, nthreads)
        skipped += _gather_rows(table, V, D, ids, lo, hi, out)
    return skipped


cdef Py_ssize_t _gather_add_rows(const float* tok, Py_ssize_t V, const float* pos, Py_ssize_t P, Py_ssize_t D,
                                 const index_t* ids, const int64_t* pos_ids, Py_ssize_t start, Py_ssize_t T,
                                 Py_ssize_t lo, Py_ssize_t hi, float* out) noexcept nogil:
    """out[i] = tok[ids[i]] + pos[p_i] for i in [lo, hi); p_i = pos_ids[i], or start + i % T."""
    cdef Py_ssize_t i, skipped = 0, t = lo % T if T > 0 else 0
    cdef int64_t r, p
    for i in range(lo, hi):
        if i + PREFETCH_ROWS < hi:
            _prefetch_row(tok + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, D)
        r = ids[i]
        p = pos_ids[i] if pos_ids != NULL else start + t
        t += 1
        if t == T:
            t = 0
        if _outside(r, V) or _outside(p, P):
            skipped += 1
            continue
        fe_add_rows(out + i * D, tok + r * D, pos + p * D, D)
    return skipped


cdef Py_ssize_t _gather_add(const float* tok, Py_ssize_t V, const float* pos, Py_ssize_t P, Py_ssize_t D,
                            const index_t* ids, const int64_t* pos_ids, Py_ssize_t start, Py_ssize_t T,
                            Py_ssize_t N, float* out, int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t lo, hi, skipped = 0
    team[0] = 1
    if nthreads <= 1:
        return _gather_add_rows(tok, V, pos, P, D, ids, pos_ids, start, T, 0, N, out)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        lo = _part(N, k, nthreads)
        hi = _part(N, k + 1, nthreads)
        skipped += _gather_add_rows(tok, V, pos, P, D, ids, pos_ids, start, T, lo, hi, out)
    return skipped


cdef Py_ssize_t _scatter_cols(float* grad, Py_ssize_t V, Py_ssize_t D, const index_t* ids, Py_ssize_t N,
                              const float* src, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t w0) noexcept nogil:
    """grad[ids[i], c0:c1] (and w0:D) += src[i, same columns], i in order (the order of np.add.at)."""
    cdef Py_ssize_t i, skipped = 0
    cdef int64_t r
    for i in range(N):
        if i + PREFETCH_ROWS < N:
            _prefetch_row_write(grad + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, c0, c1)
        r = ids[i]
        if _outside(r, V):
            skipped += 1
            continue
        fe_add_into(grad + r * D + c0, src + i * D + c0, c1 - c0)
        if w0 < D:
            fe_add_into(grad + r * D + w0, src + i * D + w0, D - w0)
    return skipped


cdef Py_ssize_t _backward_cols(float* tok_grad, Py_ssize_t V, float* pos_grad, Py_ssize_t P, Py_ssize_t D,
                               const index_t* ids, const int64_t* pos_ids, Py_ssize_t start, Py_ssize_t T,
                               Py_ssize_t N, const float* src, Py_ssize_t c0, Py_ssize_t c1,
                               Py_ssize_t w0, Py_ssize_t p_lo, Py_ssize_t p_hi) noexcept nogil:
    """Both halves of the fused backward in one read of src: tok_grad[ids[i], columns [c0, c1) and [w0, D)]
    += src[i, same columns], and pos_grad[p_i] += src[i] for the position rows p_i in [p_lo, p_hi)."""
    cdef Py_ssize_t i, skipped = 0, t = 0
    cdef int64_t r, p
    cdef const float* s
    for i in range(N):
        if i + PREFETCH_ROWS < N:
            _prefetch_row_write(tok_grad + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, c0, c1)
        r = ids[i]
        p = pos_ids[i] if pos_ids != NULL else start + t
        t += 1
        if t == T:
            t = 0
        if _outside(r, V) or _outside(p, P):
            skipped += 1
            continue
        s = src + i * D
        fe_add_into(tok_grad + r * D + c0, s + c0, c1 - c0)
        if w0 < D:
            fe_add_into(tok_grad + r * D + w0, s + w0, D - w0)
        if p_lo <= p < p_hi:
            fe_add_into(pos_grad + p * D, s, D)
    return skipped


cdef Py_ssize_t _scatter_add(float* grad, Py_ssize_t V, Py_ssize_t D, const index_t* ids, Py_ssize_t N,
                             const float* src, int nthreads, int* team) noexcept nogil:
    # Threads own columns, not ids: each element is summed by one thread in ids order,
    # so the result is bitwise the same for every thread count.
    cdef int k
    cdef Py_ssize_t c0, c1, w0, skipped = 0, phase = _phase(grad)
    team[0] = 1
    if nthreads <= 1:
        return _scatter_cols(grad, V, D, ids, N, src, 0, D, D)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        c0 = _col_start(D, phase, k, nthreads)
        c1 = _col_end(D, phase, k, nthreads)
        w0 = _col_wrap(D, phase, k, nthreads)
        skipped += _scatter_cols(grad, V, D, ids, N, src, c0, c1, w0)
    return skipped


cdef Py_ssize_t _gather_add_backward(float* tok_grad, Py_ssize_t V, float* pos_grad, Py_ssize_t P, Py_ssize_t D,
                                     const index_t* ids, const int64_t* pos_ids, Py_ssize_t start, Py_ssize_t T,
                                     Py_ssize_t N, const float* src, int nthreads, int* team) noexcept nogil:
    # The token table is split by columns (its rows come in random order); the position table, whose
    # rows come in sequence, by rows: split by columns, both threads would stream through the same lines.
    cdef int k
    cdef Py_ssize_t c0, c1, w0, skipped = 0, phase = _phase(tok_grad)
    team[0] = 1
    if nthreads <= 1:
        return _backward_cols(tok_grad, V, pos_grad, P, D, ids, pos_ids, start, T, N, src, 0, D, D, 0, P)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        c0 = _col_start(D, phase, k, nthreads)
        c1 = _col_end(D, phase, k, nthreads)
        w0 = _col_wrap(D, phase, k, nthreads)
        skipped += _backward_cols(tok_grad, V, pos_grad, P, D, ids, pos_ids, start, T, N, src, c0, c1, w0,
                                  _part(P, k, nthreads), _part(P, k + 1, nthreads))
    return skipped


cdef void _adam_rows(float* w, float* m, float* v, const float* g, Py_ssize_t D, const int64_t* rows,
                     Py_ssize_t lo, Py_ssize_t hi, float lr, float beta1, float beta2, float eps,
                     float inv_bias1, float inv_bias2) noexcept nogil:
    """One Adam update of rows[lo:hi] (rows NULL: row k is row k), g holding one row per update."""
    cdef Py_ssize_t k, r
    for k in range(lo, hi):
        if rows != NULL and k + PREFETCH_ROWS < hi:
            _prefetch_row_write(w + rows[k + PREFETCH_ROWS] * D, 0, D)
            _prefetch_row_write(m + rows[k + PREFETCH_ROWS] * D, 0, D)
            _prefetch_row_write(v + rows[k + PREFETCH_ROWS] * D, 0, D)
        r = rows[k] if rows != NULL else k
        fe_adam_row(w + r * D, m + r * D, v + r * D, g + k * D, D, lr, beta1, beta2, eps, inv_bias1, inv_bias2)


cdef void _adam(float* w, float* m, float* v, const float* g, Py_ssize_t D, const int64_t* rows,
                Py_ssize_t U, float lr, float beta1, float beta2, float eps, float inv_bias1, float inv_bias2,
                int nthreads, int* team) noexcept nogil:
    cdef int k
    cdef Py_ssize_t lo, hi
    team[0] = 1
    if nthreads <= 1:
        _adam_rows(w, m, v, g, D, rows, 0, U, lr, beta1, beta2, eps, inv_bias1, inv_bias2)
        return
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        lo = _part(U, k, nthreads)
        hi = _part(U, k + 1, nthreads)
        _adam_rows(w, m, v, g, D, rows, lo, hi, lr, beta1, beta2, eps, inv_bias1, inv_bias2)


# Small calls keep the GIL (releasing it costs about 90 ns, a seed-shape call's whole loop);
# these dispatchers pick the id width so each entry point calls one of them once.

cdef Py_ssize_t _gather_any(const float* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                            Py_ssize_t N, float* out, int nthreads, int* team) noexcept nogil:
    if wide:
        return _gather(table, V, D, <const int64_t*>ids, N, out, nthreads, team)
    return _gather(table, V, D, <const int32_t*>ids, N, out, nthreads, team)


cdef Py_ssize_t _gather_add_any(const float* tok, Py_ssize_t V, const float* pos, Py_ssize_t P, Py_ssize_t D,
                                const void* ids, bint wide, const int64_t* pos_ids, Py_ssize_t start,
                                Py_ssize_t T, Py_ssize_t N, float* out, int nthreads, int* team) noexcept nogil:
    if wide:
        return _gather_add(tok, V, pos, P, D, <const int64_t*>ids, pos_ids, start, T, N, out, nthreads, team)
    return _gather_add(tok, V, pos, P, D, <const int32_t*>ids, pos_ids, start, T, N, out, nthreads, team)


cdef Py_ssize_t _scatter_add_any(float* grad, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                 Py_ssize_t N, const float* src, int nthreads, int* team) noexcept nogil:
    if wide:
        return _scatter_add(grad, V, D, <const int64_t*>ids, N, src, nthreads, team)
    return _scatter_add(grad, V, D, <const int32_t*>ids, N, src, nthreads, team)


cdef Py_ssize_t _gather_add_backward_any(float* tok_grad, Py_ssize_t V, float* pos_grad, Py_ssize_t P,
                                         Py_ssize_t D, const void* ids, bint wide, const int64_t* pos_ids,
                                         Py_ssize_t start, Py_ssize_t T, Py_ssize_t N, const float* src,
                                         int nthreads, int* team) noexcept nogil:
    if wide:
        return _gather_add_backward(tok_grad, V, pos_grad, P, D, <const int64_t*>ids, pos_ids, start, T, N,
                                    src, nthreads, team)
    return _gather_add_backward(tok_grad, V, pos_grad, P, D, <const int32_t*>ids, pos_ids, start, T, N,
                                src, nthreads, team)


cdef int _raise_if_skipped(Py_ssize_t skipped, str name) except -1:
    if skipped:
        raise RuntimeError(
            f"{skipped} {name} changed to out-of-range values while the call ran (another thread or process "
            f"wrote to the array); those rows were skipped, so the result is incomplete"
        )
    return 0


# ---------------------------------------------------------------- entry points

def gather(table, ids, out=None):
    """out[...] = table[ids]: checked, then a row copy per id without the GIL."""
    cdef cnp.ndarray tab = _table(table, "table")
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef Py_ssize_t V = _rows(tab), D = _dim(tab), N = cnp.PyArray_SIZE(idx)
    cdef cnp.ndarray res = _out_rows(out, idx, D)
    if out is not None:
        _no_overlap(res, "out", (tab, ids), ("table", "ids"))
    _check_range(idx, "ids", V, "table")
    cdef const float* t = <const float*>cnp.PyArray_DATA(tab)
    cdef float* o = <float*>cnp.PyArray_DATA(res)
    cdef void* p = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _threads_for(N * D), team
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _gather_any(t, V, D, p, wide, N, o, nthreads, &team)
    else:
        skipped = _gather_any(t, V, D, p, wide, N, o, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    return res


def gather_add(token_table, position_table, ids, positions=None, out=None):
    """out[...] = token_table[ids] + position_table[positions], fused in one pass."""
    cdef cnp.ndarray tok = _table(token_table, "token_table")
    cdef cnp.ndarray pos = _table(position_table, "position_table")
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef Py_ssize_t V = _rows(tok), P = _rows(pos), D = _dim(tok), N = cnp.PyArray_SIZE(idx)
    cdef Py_ssize_t T = _seq_len(idx)
    _check_same_dim(tok, "token_table", pos, "position_table")
    cdef Py_ssize_t start = _start_of(positions)
    cdef cnp.ndarray pos_arr = None
    if start < 0:
        pos_arr = _positions_array(positions, idx)
    cdef cnp.ndarray res = _out_rows(out, idx, D)
    if out is not None:
        _no_overlap(res, "out", (tok, pos, ids, positions),
                    ("token_table", "position_table", "ids", "positions"))
    _check_range(idx, "ids", V, "token_table")
    _check_positions(pos_arr, start, T, N, P, "position_table")
    cdef const int64_t* pp = NULL if pos_arr is None else <const int64_t*>cnp.PyArray_DATA(pos_arr)
    cdef const float* tp = <const float*>cnp.PyArray_DATA(tok)
    cdef const float* qp = <const float*>cnp.PyArray_DATA(pos)
    cdef float* o = <float*>cnp.PyArray_DATA(res)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _threads_for(N * D), team
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _gather_add_any(tp, V, qp, P, D, ip, wide, pp, start, T, N, o, nthreads, &team)
    else:
        skipped = _gather_add_any(tp, V, qp, P, D, ip, wide, pp, start, T, N, o, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids or positions")
    return res


def scatter_add(grad_table, ids, grad_out):
    """grad_table[ids] += grad_out in place, duplicates summed in the row-major order of ids."""
    cdef cnp.ndarray grad = _target(grad_table, "grad_table")
    _check_2d(grad, "grad_table")
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef cnp.ndarray src = _float_input(grad_out, "grad_out")
    cdef Py_ssize_t V = _rows(grad), D = _dim(grad), N = cnp.PyArray_SIZE(idx)
    _check_rows_shape(src, "grad_out", idx, D)
    _no_overlap(grad, "grad_table", (ids, grad_out), ("ids", "grad_out"))
    _check_range(idx, "ids", V, "grad_table")
    cdef float* g = <float*>cnp.PyArray_DATA(grad)
    cdef const float* s = <const float*>cnp.PyArray_DATA(src)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _column_threads(N, D, g), team
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _scatter_add_any(g, V, D, ip, wide, N, s, nthreads, &team)
    else:
        skipped = _scatter_add_any(g, V, D, ip, wide, N, s, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")


def gather_add_backward(grad_hidden, ids, token_grad, position_grad, positions=None):
    """token_grad[ids] += grad_hidden and position_grad[positions] += grad_hidden, in one pass."""
    cdef cnp.ndarray tgrad = _target(token_grad, "token_grad")
    cdef cnp.ndarray pgrad = _target(position_grad, "position_grad")
    _check_2d(tgrad, "token_grad")
    _check_2d(pgrad, "position_grad")
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef cnp.ndarray src = _float_input(grad_hidden, "grad_hidden")
    cdef Py_ssize_t V = _rows(tgrad), P = _rows(pgrad), D = _dim(tgrad), N = cnp.PyArray_SIZE(idx)
    cdef Py_ssize_t T = _seq_len(idx)
    _check_same_dim(tgrad, "token_grad", pgrad, "position_grad")
    _check_rows_shape(src, "grad_hidden", idx, D)
    cdef Py_ssize_t start = _start_of(positions)
    cdef cnp.ndarray pos_arr = None
    if start < 0:
        pos_arr = _positions_array(positions, idx)
    _no_overlap(tgrad, "token_grad", (pgrad, ids, grad_hidden, positions),
                ("position_grad", "ids", "grad_hidden", "positions"))
    _no_overlap(pgrad, "position_grad", (ids, grad_hidden, positions), ("ids", "grad_hidden", "positions"))
    _check_range(idx, "ids", V, "token_grad")
    _check_positions(pos_arr, start, T, N, P, "position_grad")
    cdef const int64_t* pp = NULL if pos_arr is None else <const int64_t*>cnp.PyArray_DATA(pos_arr)
    cdef float* tg = <float*>cnp.PyArray_DATA(tgrad)
    cdef float* pg = <float*>cnp.PyArray_DATA(pgrad)
    cdef const float* s = <const float*>cnp.PyArray_DATA(src)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _column_threads(N, D, tg), team
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _gather_add_backward_any(tg, V, pg, P, D, ip, wide, pp, start, T, N, s, nthreads, &team)
    else:
        skipped = _gather_add_backward_any(tg, V, pg, P, D, ip, wide, pp, start, T, N, s, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids or positions")


cdef Py_ssize_t _min_max(const index_t* ids, Py_ssize_t N, int64_t* lo, int64_t* hi) noexcept nogil:
    """Smallest and largest id; returns the flat index of the first negative id, or -1."""
    cdef Py_ssize_t i
    cdef int64_t x, a = 0, b = 0
    if N > 0:
        a = b = ids[0]
    for i in range(N):
        x = ids[i]
        if x < 0:
            return i
        if x < a:
            a = x
        if x > b:
            b = x
    lo[0] = a
    hi[0] = b
    return -1


cdef Py_ssize_t _bitmap_slots(const index_t* ids, Py_ssize_t N, uint64_t* bits, int32_t* before,
                              Py_ssize_t W, int64_t* slots) noexcept nogil:
    """Mark each id in a bitmap; slots[i] = rank of ids[i] among the distinct ids. Returns their count."""
    cdef Py_ssize_t i, w
    cdef int64_t x
    cdef int32_t total = 0
    for i in range(N):
        x = ids[i]
        if _outside(x >> 6, W):  # changed since the min/max pass (see the loops above): skip it
            continue
        bits[x >> 6] |= (<uint64_t>1) << (x & 63)
    for w in range(W):
        before[w] = total
        total += fe_popcount64(bits[w])
    for i in range(N):
        x = ids[i]
        if _outside(x >> 6, W) or not (bits[x >> 6] >> (x & 63)) & 1:
            slots[i] = -1  # changed since it was marked
            continue
        slots[i] = before[x >> 6] + fe_popcount64(bits[x >> 6] & (((<uint64_t>1) << (x & 63)) - 1))
    return total


cdef inline Py_ssize_t _bitmap_slots_any(const void* ids, bint wide, Py_ssize_t N, uint64_t* bits,
                                         int32_t* before, Py_ssize_t W, int64_t* slots) noexcept nogil:
    if wide:
        return _bitmap_slots(<const int64_t*>ids, N, bits, before, W, slots)
    return _bitmap_slots(<const int32_t*>ids, N, bits, before, W, slots)


cdef void _bitmap_rows(const uint64_t* bits, Py_ssize_t W, int64_t* rows) noexcept nogil:
    """The set bits of the bitmap, in increasing order."""
    cdef Py_ssize_t w, k = 0
    cdef uint64_t word
    for w in range(W):
        word = bits[w]
        while word:
            rows[k] = (w << 6) + fe_ctz64(word)
            k += 1
            word &= word - 1


cdef tuple _unique_slots(cnp.ndarray idx, Py_ssize_t N, bint release):
    """(sorted distinct ids as int64, slot of each id as int64): a bitmap pass when the ids are dense enough."""
    cdef int64_t lo = 0, hi = -1
    cdef Py_ssize_t bad, W, U
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint is64 = cnp.PyArray_ITEMSIZE(idx) == 8
    if is64:
        bad = _min_max(<const int64_t*>ip, N, &lo, &hi)
    else:
        bad = _min_max(<const int32_t*>ip, N, &lo, &hi)
    if bad >= 0:
        value = idx.reshape(-1)[bad]
        raise IndexError(f"{_where(idx, 'ids', bad)} = {value} is negative; row ids must be >= 0")
    W = (hi >> 6) + 1 if N > 0 else 0
    cdef cnp.ndarray slots = np.empty(N, dtype=np.int64)
    if W > 8 * N + 65536:
        # Ids too spread out for a bitmap of the id range: sort instead.
        rows, inverse = np.unique(idx.reshape(-1), return_inverse=True)
        np.copyto(slots, inverse.reshape(-1))
        return rows.astype(np.int64, copy=False), slots
    cdef uint64_t* bits = <uint64_t*>calloc(W + 1, sizeof(uint64_t))
    cdef int32_t* before = <int32_t*>calloc(W + 1, sizeof(int32_t))
    if bits == NULL or before == NULL:
        free(bits)
        free(before)
        raise MemoryError()
    cdef int64_t* sp = <int64_t*>cnp.PyArray_DATA(slots)
    cdef cnp.ndarray rows_arr
    try:
        if release:
            with nogil:
                U = _bitmap_slots_any(ip, is64, N, bits, before, W, sp)
        else:
            U = _bitmap_slots_any(ip, is64, N, bits, before, W, sp)
        rows_arr = np.empty(U, dtype=np.int64)
        _bitmap_rows(bits, W, <int64_t*>cnp.PyArray_DATA(rows_arr))
    finally:
        free(bits)
        free(before)
    return rows_arr, slots


def coalesce(ids, grad_out):
    """(rows, values): the distinct ids in increasing order (int64) and grad_out summed per id (float32)."""
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef cnp.ndarray src = _float_input(grad_out, "grad_out")
    if cnp.PyArray_NDIM(src) != cnp.PyArray_NDIM(idx) + 1:
        raise ValueError(
            f"grad_out must have shape ids.shape + (D,), got ids.shape={_shape(idx)} and grad_out.shape={_shape(src)}"
        )
    cdef Py_ssize_t D = cnp.PyArray_DIM(src, cnp.PyArray_NDIM(idx)), N = cnp.PyArray_SIZE(idx)
    _check_rows_shape(src, "grad_out", idx, D)
    cdef bint release = _releases(N * D)
    rows, slots = _unique_slots(idx, N, release)
    cdef Py_ssize_t U = len(rows)
    cdef cnp.ndarray values = np.zeros((U, D), dtype=np.float32)
    cdef float* vp = <float*>cnp.PyArray_DATA(values)
    cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(<cnp.ndarray>slots)
    cdef const float* s = <const float*>cnp.PyArray_DATA(src)
    cdef int nthreads = _column_threads(N, D, vp), team
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _scatter_add(vp, U, D, sp, N, s, nthreads, &team)
    else:
        skipped = _scatter_add(vp, U, D, sp, N, s, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    return rows, values


cdef int _check_increasing(cnp.ndarray rows) except -1:
    """Rows updated in parallel must be distinct; sorted distinct rows are what coalesce gives."""
    cdef const int64_t* r = <const int64_t*>cnp.PyArray_DATA(rows)
    cdef Py_ssize_t k
    for k in range(1, cnp.PyArray_DIM(rows, 0)):
        if r[k] <= r[k - 1]:
            raise ValueError(f"rows must be strictly increasing, got rows[{k - 1}]={r[k - 1]}, rows[{k}]={r[k]}")
    return 0


def adam_step(weight, exp_avg, exp_avg_sq, grad, rows, double lr, double beta1, double beta2,
              double eps, double bias1, double bias2, bint check_only=False):
    """One Adam update in place, fused per element; rows None updates every row (grad is (V, D)),
    else only rows (sorted distinct int64, grad is (len(rows), D)). check_only: run every check, write nothing
    (an optimizer checks all of its parameters before it moves any)."""
    cdef cnp.ndarray w = _target(weight, "weight")
    cdef cnp.ndarray m = _target(exp_avg, "exp_avg")
    cdef cnp.ndarray v = _target(exp_avg_sq, "exp_avg_sq")
    cdef cnp.ndarray g = _float_input(grad, "grad")
    _check_2d(w, "weight")
    for arr, name in ((m, "exp_avg"), (v, "exp_avg_sq")):
        if _shape(arr) != _shape(w):
            raise ValueError(f"{name} must have weight.shape={_shape(w)}, got {name}.shape={_shape(arr)}")
    cdef Py_ssize_t V = _rows(w), D = _dim(w), U
    cdef cnp.ndarray r = None
    if rows is None:
        U = V
    else:
        r = _index_array(rows, "rows")
        if cnp.PyArray_ITEMSIZE(r) != 8 or cnp.PyArray_NDIM(r) != 1:
            raise TypeError(f"rows must be a 1-D int64 array, got rows.dtype={r.dtype}, rows.shape={_shape(r)}")
        U = cnp.PyArray_DIM(r, 0)
        r = _private(r, rows)  # the update below runs without the GIL
        _check_range(r, "rows", V, "weight")
        _check_increasing(r)
    if _shape(g) != (U, D):
        raise ValueError(f"grad must have shape {(U, D)}, got grad.shape={_shape(g)}")
    _no_overlap(w, "weight", (m, v, grad, rows), ("exp_avg", "exp_avg_sq", "grad", "rows"))
    _no_overlap(m, "exp_avg", (v, grad, rows), ("exp_avg_sq", "grad", "rows"))
    _no_overlap(v, "exp_avg_sq", (grad, rows), ("grad", "rows"))
    if check_only:
        return
    cdef const int64_t* rp = NULL if r is None else <const int64_t*>cnp.PyArray_DATA(r)
    cdef int nthreads = _threads_for(U * D), team
    with nogil:  # an optimizer step is never small enough for the GIL release to matter
        _adam(<float*>cnp.PyArray_DATA(w), <float*>cnp.PyArray_DATA(m), <float*>cnp.PyArray_DATA(v),
              <const float*>cnp.PyArray_DATA(g), D, rp, U, <float>lr, <float>beta1, <float>beta2,
              <float>eps, <float>(1.0 / bias1), <float>(1.0 / bias2), nthreads, &team)
    _record(team, True)
