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

One extension module in three files, one family each (Cython `include`, so the
thread settings and the checks are one copy shared by every family):
  _common.pxi   the thread policy and its private test hooks, the input checks,
                the helpers that split work between threads
  _kernels.pyx  lookups (gather, gather_add) and scatters (scatter_add, the fused
                backward, coalesce)
  _optim.pxi    optimizer row updates (sgd_step, adagrad_step, rowwise_adagrad_step,
                adam_step)
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
    void fe_sgd_row(float* w, const float* g, Py_ssize_t n, float lr)
    void fe_sgd_row_fma(float* w, const float* g, Py_ssize_t n, float lr)
    void fe_adagrad_row(float* w, float* s, const float* g, Py_ssize_t n, float clr, float eps)
    float fe_sum_squares(const float* g, Py_ssize_t n)
    void fe_scaled_row(float* w, const float* g, Py_ssize_t n, float lr, float std)
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


include "_common.pxi"


# ---------------------------------------------------------------- loops (no GIL, trusted inputs)

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


cdef enum:
    # What a scatter does to each destination row: add the source row, or subtract lr times it (SGD
    # straight from the lookups' gradient, with numpy's rounding or with one rounding, as torch does).
    ROW_ADD = 0
    ROW_SGD = 1
    ROW_SGD_FMA = 2


cdef inline void _row_op(int op, float* dst, const float* src, Py_ssize_t n, float lr) noexcept nogil:
    if op == ROW_ADD:
        fe_add_into(dst, src, n)
    elif op == ROW_SGD:
        fe_sgd_row(dst, src, n, lr)
    else:
        fe_sgd_row_fma(dst, src, n, lr)


cdef Py_ssize_t _scatter_cols(float* grad, Py_ssize_t V, Py_ssize_t D, const index_t* ids, Py_ssize_t N,
                              const float* src, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t w0,
                              int op, float lr) noexcept nogil:
    """grad[ids[i], c0:c1] (and w0:D) += src[i, same columns] (or -= lr * src[...], by op), i in order
    (the order of np.add.at)."""
    cdef Py_ssize_t i, skipped = 0
    cdef int64_t r
    for i in range(N):
        if i + PREFETCH_ROWS < N:
            _prefetch_row_write(grad + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, c0, c1)
        r = ids[i]
        if _outside(r, V):
            skipped += 1
            continue
        _row_op(op, grad + r * D + c0, src + i * D + c0, c1 - c0, lr)
        if w0 < D:
            _row_op(op, grad + r * D + w0, src + i * D + w0, D - w0, lr)
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
                             const float* src, int op, float lr, int nthreads, int* team) noexcept nogil:
    # Threads own columns, not ids: each element is summed by one thread in ids order,
    # so the result is bitwise the same for every thread count.
    cdef int k
    cdef Py_ssize_t c0, c1, w0, skipped = 0, phase = _phase(grad)
    team[0] = 1
    if nthreads <= 1:
        return _scatter_cols(grad, V, D, ids, N, src, 0, D, D, op, lr)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        c0 = _col_start(D, phase, k, nthreads)
        c1 = _col_end(D, phase, k, nthreads)
        w0 = _col_wrap(D, phase, k, nthreads)
        skipped += _scatter_cols(grad, V, D, ids, N, src, c0, c1, w0, op, lr)
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
                                 Py_ssize_t N, const float* src, int op, float lr, int nthreads,
                                 int* team) noexcept nogil:
    if wide:
        return _scatter_add(grad, V, D, <const int64_t*>ids, N, src, op, lr, nthreads, team)
    return _scatter_add(grad, V, D, <const int32_t*>ids, N, src, op, lr, nthreads, team)


cdef Py_ssize_t _gather_add_backward_any(float* tok_grad, Py_ssize_t V, float* pos_grad, Py_ssize_t P,
                                         Py_ssize_t D, const void* ids, bint wide, const int64_t* pos_ids,
                                         Py_ssize_t start, Py_ssize_t T, Py_ssize_t N, const float* src,
                                         int nthreads, int* team) noexcept nogil:
    if wide:
        return _gather_add_backward(tok_grad, V, pos_grad, P, D, <const int64_t*>ids, pos_ids, start, T, N,
                                    src, nthreads, team)
    return _gather_add_backward(tok_grad, V, pos_grad, P, D, <const int32_t*>ids, pos_ids, start, T, N,
                                src, nthreads, team)


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
    _scatter(grad_table, ids, grad_out, "grad_table", ROW_ADD, 0.0, False)


cdef int _scatter(object target, object ids, object grad_out, str name, int op, double lr,
                  bint check_only) except -1:
    """The checked scatter of scatter_add and sgd_scatter: every check, then (unless check_only) the
    loop (threads own columns, so each element sees its updates in ids order whatever the thread count)."""
    cdef cnp.ndarray grad = _target(target, name)
    _check_2d(grad, name)
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef cnp.ndarray src = _float_input(grad_out, "grad_out")
    cdef Py_ssize_t V = _rows(grad), D = _dim(grad), N = cnp.PyArray_SIZE(idx)
    _check_rows_shape(src, "grad_out", idx, D)
    _no_overlap(grad, name, (ids, grad_out), ("ids", "grad_out"))
    _check_range(idx, "ids", V, name)
    if check_only:
        return 0
    cdef float* g = <float*>cnp.PyArray_DATA(grad)
    cdef const float* s = <const float*>cnp.PyArray_DATA(src)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _column_threads(N, D, g), team
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _scatter_add_any(g, V, D, ip, wide, N, s, op, <float>lr, nthreads, &team)
    else:
        skipped = _scatter_add_any(g, V, D, ip, wide, N, s, op, <float>lr, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    return 0


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
            skipped = _scatter_add(vp, U, D, sp, N, s, ROW_ADD, 0.0, nthreads, &team)
    else:
        skipped = _scatter_add(vp, U, D, sp, N, s, ROW_ADD, 0.0, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    return rows, values


# ---------------------------------------------------------------- optimizers

include "_optim.pxi"
include "_bag.pxi"

include "_norm.pxi"
