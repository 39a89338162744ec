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

One extension module in nine files, one family each and the bags in four (Cython
`include`, so the thread settings and the checks are one copy shared by every family):
  _common.pxi   the thread policy and its private test hooks, the input checks,
                the helpers that split work between threads
  _kernels.pyx  lookups (gather, gather_add) and scatters (scatter_add, the fused
                backward, coalesce)
  _optim.pxi    optimizer row updates (sgd_step, adagrad_step, rowwise_adagrad_step,
                adam_step)
  _norm.pxi     max_norm's renorm (torch's embedding_renorm_)
  _bag_*.pxi    embedding bags, in four: _common (checks, helpers), _forward (embedding_bag),
                _backward (dense and sparse), _weights_grad (the per_sample_weights gradient)
  _shard.pxi    the id exchange of a table sharded by rows (exchange_plan)

The lookups, scatters and coalesce are written once over the fused type elem_t (float32,
float64, and the 16-bit float16 and bfloat16, whose row functions in _fastembed.h sum in
float32); renorm, the bags and the optimizers over the same four dtypes, each in torch's precision
for it (the optimizers: float32 and float64 in their own type, the 16-bit types in float32).
"""
cimport numpy as cnp
from cpython.pyport cimport PY_SSIZE_T_MAX
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

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
    # The optimizer rows (one template in _fastembed.h): float32, and float64 (_f64).
    void fe_adam_row(float* w, float* m, float* v, const float* g, Py_ssize_t n, float lr, float beta1,
                     float beta2, float eps, float inv_bias1, float inv_bias2)
    void fe_sgd_row(float* w, const float* g, Py_ssize_t n, float lr)
    void fe_sgd_row_fma(float* w, const float* g, Py_ssize_t n, float lr)
    void fe_adagrad_row(float* w, float* s, const float* g, Py_ssize_t n, float clr, float eps)
    void fe_rowwise_row(float* w, float* s, const float* g, Py_ssize_t n, float lr, float eps)
    void fe_adam_row_f64(double* w, double* m, double* v, const double* g, Py_ssize_t n, double lr, double beta1,
                         double beta2, double eps, double inv_bias1, double inv_bias2)
    void fe_sgd_row_f64(double* w, const double* g, Py_ssize_t n, double lr)
    void fe_sgd_row_fma_f64(double* w, const double* g, Py_ssize_t n, double lr)
    void fe_adagrad_row_f64(double* w, double* s, const double* g, Py_ssize_t n, double clr, double eps)
    void fe_rowwise_row_f64(double* w, double* s, const double* g, Py_ssize_t n, double lr, double eps)
    void fe_scaled_add_f32(float* w, const float* g, Py_ssize_t n, float a)
    void fe_scaled_add_f64(double* w, const double* g, Py_ssize_t n, double a)
    void fe_prefetch_write(const void* p)
    # The other element types of the lookup and scatter kernels (see _fastembed.h).
    ctypedef struct fe_f16:
        uint16_t bits
    ctypedef struct fe_bf16:
        uint16_t bits
    void fe_add_rows_f64(double* out, const double* a, const double* b, Py_ssize_t n)
    void fe_add_into_f64(double* g, const double* s, Py_ssize_t n)
    void fe_first_into(float* g, const float* s, Py_ssize_t n)
    void fe_first_into_f64(double* g, const double* s, Py_ssize_t n)
    void fe_add_rows_f16(fe_f16* out, const fe_f16* a, const fe_f16* b, Py_ssize_t n)
    void fe_add_into_f16(fe_f16* g, const fe_f16* s, Py_ssize_t n)
    void fe_widen_f16(float* out, const fe_f16* h, Py_ssize_t n)
    void fe_narrow_f16(fe_f16* h, const float* f, Py_ssize_t n)
    void fe_add_rows_bf16(fe_bf16* out, const fe_bf16* a, const fe_bf16* b, Py_ssize_t n)
    void fe_add_into_bf16(fe_bf16* g, const fe_bf16* s, Py_ssize_t n)
    void fe_scaled_add_f16(fe_f16* w, const fe_f16* g, Py_ssize_t n, float a)
    void fe_scaled_add_bf16(fe_bf16* w, const fe_bf16* g, Py_ssize_t n, float a)
    void fe_widen_bf16(float* out, const fe_bf16* h, Py_ssize_t n)
    void fe_narrow_bf16(fe_bf16* h, const float* f, Py_ssize_t n)
    int fe_f16_init()
    int fe_f16_set_hardware(int on)
    int fe_f16_hardware()

ctypedef fused index_t:
    int32_t
    int64_t

# The element types of the lookup and scatter kernels' tables, one specialisation each (the float32 one
# is the code these kernels had before the others came: the same loops and row functions).
ctypedef fused elem_t:
    float
    double
    fe_f16
    fe_bf16

# The types coalesce sums in (the 16-bit types are summed in float32).
ctypedef fused acc_t:
    float
    double

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

# Per element type: the row functions of _fastembed.h (float32's are the ones it always had) and the
# prefetches. float64 adds in float64; the 16-bit types add in float32 and round once per stored element.

cdef inline void _add_rows(elem_t* out, const elem_t* a, const elem_t* b, Py_ssize_t n) noexcept nogil:
    if elem_t is float:
        fe_add_rows(out, a, b, n)
    elif elem_t is double:
        fe_add_rows_f64(out, a, b, n)
    elif elem_t is fe_f16:
        fe_add_rows_f16(out, a, b, n)
    else:
        fe_add_rows_bf16(out, a, b, n)


cdef inline void _add_into(elem_t* g, const elem_t* s, Py_ssize_t n) noexcept nogil:
    if elem_t is float:
        fe_add_into(g, s, n)
    elif elem_t is double:
        fe_add_into_f64(g, s, n)
    elif elem_t is fe_f16:
        fe_add_into_f16(g, s, n)
    else:
        fe_add_into_bf16(g, s, n)


cdef inline void _widen_row(float* f, const elem_t* h, Py_ssize_t n) noexcept nogil:
    """f[k] = h[k] as float32 (exact), for the 16-bit types (the bags and the optimizers stage rows so)."""
    if elem_t is fe_f16:
        fe_widen_f16(f, h, n)
    elif elem_t is fe_bf16:
        fe_widen_bf16(f, h, n)


cdef inline void _narrow_row(elem_t* h, const float* f, Py_ssize_t n) noexcept nogil:
    """h[k] = f[k] rounded to nearest even, for the 16-bit types."""
    if elem_t is fe_f16:
        fe_narrow_f16(h, f, n)
    elif elem_t is fe_bf16:
        fe_narrow_bf16(h, f, n)


cdef inline void _prefetch_elems(const elem_t* row, Py_ssize_t D) noexcept nogil:
    if elem_t is float:
        _prefetch_row(row, D)
    else:
        _prefetch_bytes(<const char*>row, D * <Py_ssize_t>sizeof(elem_t), False)


cdef inline void _prefetch_elems_write(elem_t* row, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    if elem_t is float:
        _prefetch_row_write(row, c0, c1)
    else:
        _prefetch_bytes(<const char*>(row + c0), (c1 - c0) * <Py_ssize_t>sizeof(elem_t), True)


cdef Py_ssize_t _gather_rows(const elem_t* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids,
                             Py_ssize_t lo, Py_ssize_t hi, elem_t* out) noexcept nogil:
    """out[i] = table[ids[i]] for i in [lo, hi); returns the number of ids found out of range."""
    cdef Py_ssize_t i, skipped = 0
    cdef int64_t r
    for i in range(lo, hi):
        if i + PREFETCH_ROWS < hi:
            _prefetch_elems(table + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, D)  # a prefetch never faults
        r = ids[i]
        if _outside(r, V):
            skipped += 1
            continue
        memcpy(out + i * D, table + r * D, D * sizeof(elem_t))
    return skipped


cdef Py_ssize_t _gather(const elem_t* table, Py_ssize_t V, Py_ssize_t D, const index_t* ids, Py_ssize_t N,
                        elem_t* out, int nthreads, int* team) noexcept nogil:
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


cdef Py_ssize_t _gather_add_rows(const elem_t* tok, Py_ssize_t V, const elem_t* pos, Py_ssize_t P, Py_ssize_t D,
                                 const index_t* ids, const int64_t* pos_ids, Py_ssize_t start, Py_ssize_t T,
                                 Py_ssize_t lo, Py_ssize_t hi, elem_t* out) noexcept nogil:
    """out[i] = tok[ids[i]] + pos[p_i] for i in [lo, hi); p_i = pos_ids[i], or start + i % T."""
    cdef Py_ssize_t i, skipped = 0, t = lo % T if T > 0 else 0
    cdef int64_t r, p
    for i in range(lo, hi):
        if i + PREFETCH_ROWS < hi:
            _prefetch_elems(tok + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, D)
        r = ids[i]
        p = pos_ids[i] if pos_ids != NULL else start + t
        t += 1
        if t == T:
            t = 0
        if _outside(r, V) or _outside(p, P):
            skipped += 1
            continue
        _add_rows(out + i * D, tok + r * D, pos + p * D, D)
    return skipped


cdef Py_ssize_t _gather_add(const elem_t* tok, Py_ssize_t V, const elem_t* pos, Py_ssize_t P, Py_ssize_t D,
                            const index_t* ids, const int64_t* pos_ids, Py_ssize_t start, Py_ssize_t T,
                            Py_ssize_t N, elem_t* out, int nthreads, int* team) noexcept nogil:
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
    ROW_SCALED = 3  # add the source row times a per-lookup factor (scale_grad_by_freq: 1 / its id's count)


cdef inline void _row_op(int op, elem_t* dst, const elem_t* src, Py_ssize_t n, double lr) noexcept nogil:
    if op == ROW_SCALED:
        _scaled_add(dst, src, n, lr)
    elif op == ROW_ADD:
        _add_into(dst, src, n)
    elif elem_t is float:
        if op == ROW_SGD:
            fe_sgd_row(dst, src, n, <float>lr)
        else:
            fe_sgd_row_fma(dst, src, n, <float>lr)
    elif elem_t is double:
        if op == ROW_SGD:
            fe_sgd_row_f64(dst, src, n, lr)
        else:
            fe_sgd_row_fma_f64(dst, src, n, lr)
    else:  # SGD on a 16-bit table, either rounding: torch's row.add_(src, alpha=-lr)
        _scaled_add(dst, src, n, -lr)


cdef inline void _scaled_add(elem_t* dst, const elem_t* src, Py_ssize_t n, double a) noexcept nogil:
    """dst += a * src as torch's row.add_(src, alpha=a): a is the double torch forms, cast to the element
    type (float32 and the 16-bit types via float)."""
    if elem_t is float:
        fe_scaled_add_f32(dst, src, n, <float>a)
    elif elem_t is double:
        fe_scaled_add_f64(dst, src, n, a)
    elif elem_t is fe_f16:
        fe_scaled_add_f16(dst, src, n, <float>a)
    else:
        fe_scaled_add_bf16(dst, src, n, <float>a)


cdef inline Py_ssize_t _block_of(elem_t* p) noexcept nogil:
    """Elements per 128-byte column block (p only picks the type)."""
    return COLUMN_BLOCK * sizeof(float) // sizeof(elem_t)


cdef Py_ssize_t _scatter_cols(elem_t* grad, Py_ssize_t V, Py_ssize_t D, const index_t* ids, Py_ssize_t N,
                              const elem_t* src, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t w0,
                              int op, double lr, const double* scales) noexcept nogil:
    """grad[ids[i], c0:c1] (and w0:D) += src[i, same columns] (or -= lr * src[...], or += scales[i] *
    src[...], by op), i in order (the order of np.add.at)."""
    cdef Py_ssize_t i, skipped = 0
    cdef int64_t r
    cdef double a = lr
    for i in range(N):
        if i + PREFETCH_ROWS < N:
            _prefetch_elems_write(grad + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, c0, c1)
        r = ids[i]
        if _outside(r, V):
            skipped += 1
            continue
        if scales != NULL:
            a = scales[i]
        _row_op(op, grad + r * D + c0, src + i * D + c0, c1 - c0, a)
        if w0 < D:
            _row_op(op, grad + r * D + w0, src + i * D + w0, D - w0, a)
    return skipped


cdef Py_ssize_t _backward_cols(elem_t* tok_grad, Py_ssize_t V, elem_t* pos_grad, Py_ssize_t P, Py_ssize_t D,
                               const index_t* ids, const int64_t* pos_ids, Py_ssize_t start, Py_ssize_t T,
                               Py_ssize_t N, const elem_t* src, Py_ssize_t c0, Py_ssize_t c1,
                               Py_ssize_t w0, Py_ssize_t p_lo, Py_ssize_t p_hi) noexcept nogil:
    """Both halves of the fused backward in one read of src: tok_grad[ids[i], columns [c0, c1) and [w0, D)]
    += src[i, same columns], and pos_grad[p_i] += src[i] for the position rows p_i in [p_lo, p_hi)."""
    cdef Py_ssize_t i, skipped = 0, t = 0
    cdef int64_t r, p
    cdef const elem_t* s
    for i in range(N):
        if i + PREFETCH_ROWS < N:
            _prefetch_elems_write(tok_grad + <Py_ssize_t>ids[i + PREFETCH_ROWS] * D, c0, c1)
        r = ids[i]
        p = pos_ids[i] if pos_ids != NULL else start + t
        t += 1
        if t == T:
            t = 0
        if _outside(r, V) or _outside(p, P):
            skipped += 1
            continue
        s = src + i * D
        _add_into(tok_grad + r * D + c0, s + c0, c1 - c0)
        if w0 < D:
            _add_into(tok_grad + r * D + w0, s + w0, D - w0)
        if p_lo <= p < p_hi:
            _add_into(pos_grad + p * D, s, D)
    return skipped


cdef Py_ssize_t _scatter_add(elem_t* grad, Py_ssize_t V, Py_ssize_t D, const index_t* ids, Py_ssize_t N,
                             const elem_t* src, int op, double lr, const double* scales, int nthreads,
                             int* team) noexcept nogil:
    # Threads own columns, not ids: each element is summed by one thread in ids order,
    # so the result is bitwise the same for every thread count.
    cdef int k
    cdef Py_ssize_t block = _block_of(grad)
    cdef Py_ssize_t c0, c1, w0, skipped = 0, phase = _phase_of(grad, sizeof(elem_t))
    team[0] = 1
    if nthreads <= 1:
        return _scatter_cols(grad, V, D, ids, N, src, 0, D, D, op, lr, scales)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        c0 = _col_start_of(D, phase, k, nthreads, block)
        c1 = _col_end_of(D, phase, k, nthreads, block)
        w0 = _col_wrap_of(D, phase, k, nthreads, block)
        skipped += _scatter_cols(grad, V, D, ids, N, src, c0, c1, w0, op, lr, scales)
    return skipped


cdef Py_ssize_t _gather_add_backward(elem_t* tok_grad, Py_ssize_t V, elem_t* pos_grad, Py_ssize_t P, Py_ssize_t D,
                                     const index_t* ids, const int64_t* pos_ids, Py_ssize_t start, Py_ssize_t T,
                                     Py_ssize_t N, const elem_t* src, int nthreads, int* team) noexcept nogil:
    # The token table is split by columns (its rows come in random order); the position table, whose
    # rows come in sequence, by rows: split by columns, both threads would stream through the same lines.
    cdef int k
    cdef Py_ssize_t block = _block_of(tok_grad)
    cdef Py_ssize_t c0, c1, w0, skipped = 0, phase = _phase_of(tok_grad, sizeof(elem_t))
    team[0] = 1
    if nthreads <= 1:
        return _backward_cols(tok_grad, V, pos_grad, P, D, ids, pos_ids, start, T, N, src, 0, D, D, 0, P)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        c0 = _col_start_of(D, phase, k, nthreads, block)
        c1 = _col_end_of(D, phase, k, nthreads, block)
        w0 = _col_wrap_of(D, phase, k, nthreads, block)
        skipped += _backward_cols(tok_grad, V, pos_grad, P, D, ids, pos_ids, start, T, N, src, c0, c1, w0,
                                  _part(P, k, nthreads), _part(P, k + 1, nthreads))
    return skipped


# Small calls keep the GIL (releasing it costs about 90 ns, a seed-shape call's whole loop);
# these dispatchers pick the id width (and, for the lookups and scatters, the element type) so that
# each entry point calls one of them once.

cdef Py_ssize_t _gather_ids(const elem_t* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                            Py_ssize_t N, elem_t* out, int nthreads, int* team) noexcept nogil:
    if wide:
        return _gather(table, V, D, <const int64_t*>ids, N, out, nthreads, team)
    return _gather(table, V, D, <const int32_t*>ids, N, out, nthreads, team)


cdef Py_ssize_t _gather_any(const void* table, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                            Py_ssize_t N, void* out, int fmt, int nthreads, int* team) noexcept nogil:
    if fmt == FMT_F32:
        return _gather_ids(<const float*>table, V, D, ids, wide, N, <float*>out, nthreads, team)
    if fmt == FMT_F64:
        return _gather_ids(<const double*>table, V, D, ids, wide, N, <double*>out, nthreads, team)
    # A gather is a row copy: one 16-bit specialisation serves float16 and bfloat16.
    return _gather_ids(<const fe_f16*>table, V, D, ids, wide, N, <fe_f16*>out, nthreads, team)


cdef Py_ssize_t _gather_add_ids(const elem_t* tok, Py_ssize_t V, const elem_t* pos, Py_ssize_t P, Py_ssize_t D,
                                const void* ids, bint wide, const int64_t* pos_ids, Py_ssize_t start,
                                Py_ssize_t T, Py_ssize_t N, elem_t* out, int nthreads, int* team) noexcept nogil:
    if wide:
        return _gather_add(tok, V, pos, P, D, <const int64_t*>ids, pos_ids, start, T, N, out, nthreads, team)
    return _gather_add(tok, V, pos, P, D, <const int32_t*>ids, pos_ids, start, T, N, out, nthreads, team)


cdef Py_ssize_t _gather_add_any(const void* tok, Py_ssize_t V, const void* pos, Py_ssize_t P, Py_ssize_t D,
                                const void* ids, bint wide, const int64_t* pos_ids, Py_ssize_t start,
                                Py_ssize_t T, Py_ssize_t N, void* out, int fmt, int nthreads,
                                int* team) noexcept nogil:
    if fmt == FMT_F32:
        return _gather_add_ids(<const float*>tok, V, <const float*>pos, P, D, ids, wide, pos_ids, start, T, N,
                               <float*>out, nthreads, team)
    if fmt == FMT_F64:
        return _gather_add_ids(<const double*>tok, V, <const double*>pos, P, D, ids, wide, pos_ids, start, T, N,
                               <double*>out, nthreads, team)
    if fmt == FMT_F16:
        return _gather_add_ids(<const fe_f16*>tok, V, <const fe_f16*>pos, P, D, ids, wide, pos_ids, start, T, N,
                               <fe_f16*>out, nthreads, team)
    return _gather_add_ids(<const fe_bf16*>tok, V, <const fe_bf16*>pos, P, D, ids, wide, pos_ids, start, T, N,
                           <fe_bf16*>out, nthreads, team)


cdef Py_ssize_t _scatter_add_ids(elem_t* grad, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                 Py_ssize_t N, const elem_t* src, int op, double lr, const double* scales,
                                 int nthreads, int* team) noexcept nogil:
    if wide:
        return _scatter_add(grad, V, D, <const int64_t*>ids, N, src, op, lr, scales, nthreads, team)
    return _scatter_add(grad, V, D, <const int32_t*>ids, N, src, op, lr, scales, nthreads, team)


cdef Py_ssize_t _scatter_add_any(void* grad, Py_ssize_t V, Py_ssize_t D, const void* ids, bint wide,
                                 Py_ssize_t N, const void* src, int fmt, int op, double lr, const double* scales,
                                 int nthreads, int* team) noexcept nogil:
    if fmt == FMT_F32:
        return _scatter_add_ids(<float*>grad, V, D, ids, wide, N, <const float*>src, op, lr, scales, nthreads,
                                team)
    if fmt == FMT_F64:
        return _scatter_add_ids(<double*>grad, V, D, ids, wide, N, <const double*>src, op, lr, scales, nthreads,
                                team)
    if fmt == FMT_F16:
        return _scatter_add_ids(<fe_f16*>grad, V, D, ids, wide, N, <const fe_f16*>src, op, lr, scales, nthreads,
                                team)
    return _scatter_add_ids(<fe_bf16*>grad, V, D, ids, wide, N, <const fe_bf16*>src, op, lr, scales, nthreads,
                            team)


cdef Py_ssize_t _gather_add_backward_ids(elem_t* tok_grad, Py_ssize_t V, elem_t* pos_grad, Py_ssize_t P,
                                         Py_ssize_t D, const void* ids, bint wide, const int64_t* pos_ids,
                                         Py_ssize_t start, Py_ssize_t T, Py_ssize_t N, const elem_t* src,
                                         int nthreads, int* team) noexcept nogil:
    if wide:
        return _gather_add_backward(tok_grad, V, pos_grad, P, D, <const int64_t*>ids, pos_ids, start, T, N,
                                    src, nthreads, team)
    return _gather_add_backward(tok_grad, V, pos_grad, P, D, <const int32_t*>ids, pos_ids, start, T, N,
                                src, nthreads, team)


cdef Py_ssize_t _gather_add_backward_any(void* tok_grad, Py_ssize_t V, void* pos_grad, Py_ssize_t P,
                                         Py_ssize_t D, const void* ids, bint wide, const int64_t* pos_ids,
                                         Py_ssize_t start, Py_ssize_t T, Py_ssize_t N, const void* src,
                                         int fmt, int nthreads, int* team) noexcept nogil:
    if fmt == FMT_F32:
        return _gather_add_backward_ids(<float*>tok_grad, V, <float*>pos_grad, P, D, ids, wide, pos_ids, start,
                                        T, N, <const float*>src, nthreads, team)
    if fmt == FMT_F64:
        return _gather_add_backward_ids(<double*>tok_grad, V, <double*>pos_grad, P, D, ids, wide, pos_ids, start,
                                        T, N, <const double*>src, nthreads, team)
    if fmt == FMT_F16:
        return _gather_add_backward_ids(<fe_f16*>tok_grad, V, <fe_f16*>pos_grad, P, D, ids, wide, pos_ids, start,
                                        T, N, <const fe_f16*>src, nthreads, team)
    return _gather_add_backward_ids(<fe_bf16*>tok_grad, V, <fe_bf16*>pos_grad, P, D, ids, wide, pos_ids, start,
                                    T, N, <const fe_bf16*>src, nthreads, team)


cdef inline int _column_threads_fmt(Py_ssize_t N, Py_ssize_t D, const void* table, int fmt) noexcept nogil:
    if fmt == FMT_F32:
        return _column_threads(N, D, <const float*>table)
    return _column_threads_of(N, D, table, 8 if fmt == FMT_F64 else 2)


# ---------------------------------------------------------------- entry points

# The lookups, scatters and coalesce take float32, float64, float16 or bfloat16 tables (bfloat16 as
# ml_dtypes.bfloat16, or as uint16 bits with the private keyword `_format="bfloat16"`; see _common.pxi);
# every array of one call that holds table elements has the table's dtype (an optimizer's state too).

def gather(table, ids, out=None, *, _format=None):
    """out[...] = table[ids]: checked, then a row copy per id without the GIL."""
    cdef int fmt
    cdef cnp.ndarray tab = _any_table(table, "table", _format_arg(_format), &fmt)
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef Py_ssize_t V = _rows(tab), D = _dim(tab), N = cnp.PyArray_SIZE(idx)
    cdef cnp.ndarray res = _out_rows_like(out, idx, D, tab, "table")
    if out is not None:
        _no_overlap(res, "out", (tab, ids), ("table", "ids"))
    _check_range(idx, "ids", V, "table")
    cdef const void* t = cnp.PyArray_DATA(tab)
    cdef void* o = cnp.PyArray_DATA(res)
    cdef void* p = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _threads_for(N * D), team
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _gather_any(t, V, D, p, wide, N, o, fmt, nthreads, &team)
    else:
        skipped = _gather_any(t, V, D, p, wide, N, o, fmt, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    return res


def gather_add(token_table, position_table, ids, positions=None, out=None, *, _format=None):
    """out[...] = token_table[ids] + position_table[positions], fused in one pass."""
    cdef int fmt
    cdef cnp.ndarray tok = _any_table(token_table, "token_table", _format_arg(_format), &fmt)
    cdef cnp.ndarray pos = _table_like(position_table, "position_table", tok, "token_table")
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef Py_ssize_t V = _rows(tok), P = _rows(pos), D = _dim(tok), N = cnp.PyArray_SIZE(idx)
    cdef Py_ssize_t T = _seq_len(idx)
    _check_same_dim(tok, "token_table", pos, "position_table")
    cdef Py_ssize_t start = _start_of(positions)
    cdef cnp.ndarray pos_arr = None
    if start < 0:
        pos_arr = _positions_array(positions, idx)
    cdef cnp.ndarray res = _out_rows_like(out, idx, D, tok, "token_table")
    if out is not None:
        _no_overlap(res, "out", (tok, pos, ids, positions),
                    ("token_table", "position_table", "ids", "positions"))
    _check_range(idx, "ids", V, "token_table")
    _check_positions(pos_arr, start, T, N, P, "position_table")
    cdef const int64_t* pp = NULL if pos_arr is None else <const int64_t*>cnp.PyArray_DATA(pos_arr)
    cdef const void* tp = cnp.PyArray_DATA(tok)
    cdef const void* qp = cnp.PyArray_DATA(pos)
    cdef void* o = cnp.PyArray_DATA(res)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _threads_for(N * D), team
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _gather_add_any(tp, V, qp, P, D, ip, wide, pp, start, T, N, o, fmt, nthreads, &team)
    else:
        skipped = _gather_add_any(tp, V, qp, P, D, ip, wide, pp, start, T, N, o, fmt, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids or positions")
    return res


def scatter_add(grad_table, ids, grad_out, *, scale_grad_by_freq=False, _format=None):
    """grad_table[ids] += grad_out in place, duplicates summed in the row-major order of ids;
    scale_grad_by_freq: each lookup's row times 1 / (how many times its id occurs in ids), added as
    torch's embedding_dense_backward adds it (row.add_(g, alpha=1/count))."""
    _scatter_fmt(grad_table, ids, grad_out, "grad_table", ROW_SCALED if scale_grad_by_freq else ROW_ADD, 0.0,
                 False, _format_arg(_format))


cdef int _scatter_fmt(object target, object ids, object grad_out, str name, int op, double lr,
                      bint check_only, int forced) except -1:
    """The checked scatter of scatter_add and sgd_scatter (any element format): every check, then (unless
    check_only) the loop (threads own columns, so each element sees its updates in ids order whatever
    the thread count)."""
    cdef int fmt
    cdef cnp.ndarray grad = _any_target(target, name, forced, &fmt)
    _check_2d(grad, name)
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    if op == ROW_SCALED:
        # counted (_freq_scales), then read by the loop: both must see the ids that were checked, so they are
        # this call's own copy (a writer racing the call could otherwise leave a count of an unchecked id)
        idx = _private(idx, ids)
    cdef cnp.ndarray src = _input_like(grad_out, "grad_out", grad, name)
    cdef Py_ssize_t V = _rows(grad), D = _dim(grad), N = cnp.PyArray_SIZE(idx)
    _check_rows_shape(src, "grad_out", idx, D)
    _no_overlap(grad, name, (ids, grad_out), ("ids", "grad_out"))
    _check_range(idx, "ids", V, name)
    if check_only:
        return 0
    cdef void* g = cnp.PyArray_DATA(grad)
    cdef const void* s = cnp.PyArray_DATA(src)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _column_threads_fmt(N, D, g, fmt), team
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    cdef cnp.ndarray scales = None
    cdef const double* sc = NULL
    if op == ROW_SCALED:
        scales = _freq_scales(idx, N, release)
        sc = <const double*>cnp.PyArray_DATA(scales)
    if release:
        with nogil:
            skipped = _scatter_add_any(g, V, D, ip, wide, N, s, fmt, op, lr, sc, nthreads, &team)
    else:
        skipped = _scatter_add_any(g, V, D, ip, wide, N, s, fmt, op, lr, sc, nthreads, &team)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    return 0


cdef cnp.ndarray _freq_scales(cnp.ndarray idx, Py_ssize_t N, bint release):
    """1.0 / (the number of times ids[i] occurs in ids), per lookup i, as float64 (torch's `scale /=
    counts[k]`, counted over every id, padding_idx's too); ids already range-checked."""
    cdef tuple unique = _unique_slots(idx, N, release)
    cdef cnp.ndarray slots = unique[1]
    cdef Py_ssize_t U = cnp.PyArray_SIZE(unique[0]), i
    cdef cnp.ndarray counts = np.zeros(U, dtype=np.int64)
    cdef cnp.ndarray scales = np.empty(N, dtype=np.float64)
    cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(slots)
    cdef int64_t* cp = <int64_t*>cnp.PyArray_DATA(counts)
    cdef double* out = <double*>cnp.PyArray_DATA(scales)
    for i in range(N):
        if not 0 <= sp[i] < U:  # never: the ids are checked and private (one bad slot would be a bug here)
            raise AssertionError(f"slot {sp[i]} of lookup {i} is outside [0, {U})")
        cp[sp[i]] += 1
    for i in range(N):
        out[i] = 1.0 / <double>cp[sp[i]]
    return scales


def gather_add_backward(grad_hidden, ids, token_grad, position_grad, positions=None, *, _format=None):
    """token_grad[ids] += grad_hidden and position_grad[positions] += grad_hidden, in one pass."""
    cdef int fmt
    cdef cnp.ndarray tgrad = _any_target(token_grad, "token_grad", _format_arg(_format), &fmt)
    cdef cnp.ndarray pgrad = _target_like(position_grad, "position_grad", tgrad, "token_grad")
    _check_2d(tgrad, "token_grad")
    _check_2d(pgrad, "position_grad")
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef cnp.ndarray src = _input_like(grad_hidden, "grad_hidden", tgrad, "token_grad")
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
    cdef void* tg = cnp.PyArray_DATA(tgrad)
    cdef void* pg = cnp.PyArray_DATA(pgrad)
    cdef const void* s = cnp.PyArray_DATA(src)
    cdef void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int nthreads = _column_threads_fmt(N, D, tg, fmt), team
    cdef bint release = _releases(N * D)
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            skipped = _gather_add_backward_any(tg, V, pg, P, D, ip, wide, pp, start, T, N, s, fmt, nthreads, &team)
    else:
        skipped = _gather_add_backward_any(tg, V, pg, P, D, ip, wide, pp, start, T, N, s, fmt, nthreads, &team)
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


cdef Py_ssize_t _first_flags(const int64_t* slots, Py_ssize_t N, Py_ssize_t U, uint8_t* seen,
                             uint8_t* first) noexcept nogil:
    """first[i] = 1 where slots[i] occurs for the first time in slots (seen: U zeroed bytes, set per slot
    met). Returns how many distinct slots were met."""
    cdef Py_ssize_t i, met = 0
    cdef int64_t r
    cdef uint8_t f
    for i in range(N):
        r = slots[i]
        if _outside(r, U):
            first[i] = 0  # the scatter skips it and counts it
            continue
        f = seen[r] ^ 1
        first[i] = f
        seen[r] = 1
        met += f
    return met


cdef Py_ssize_t _coalesce_cols(acc_t* out, Py_ssize_t U, Py_ssize_t D, const int64_t* slots, const uint8_t* first,
                               Py_ssize_t N, const acc_t* src, Py_ssize_t c0, Py_ssize_t c1,
                               Py_ssize_t w0) noexcept nogil:
    """out[slots[i], c0:c1] (and w0:D) = 0 + src[i, same columns] at a slot's first i, += at its later
    ones, i in order: the bits of a scatter-add into zeros, without writing the zeros first."""
    cdef Py_ssize_t i, skipped = 0
    cdef int64_t r
    for i in range(N):
        if i + PREFETCH_ROWS < N:
            _prefetch_elems_write(out + slots[i + PREFETCH_ROWS] * D, c0, c1)
        r = slots[i]
        if _outside(r, U):
            skipped += 1
            continue
        if first[i]:
            if acc_t is float:
                fe_first_into(out + r * D + c0, src + i * D + c0, c1 - c0)
                if w0 < D:
                    fe_first_into(out + r * D + w0, src + i * D + w0, D - w0)
            else:
                fe_first_into_f64(out + r * D + c0, src + i * D + c0, c1 - c0)
                if w0 < D:
                    fe_first_into_f64(out + r * D + w0, src + i * D + w0, D - w0)
        else:
            _add_into(out + r * D + c0, src + i * D + c0, c1 - c0)
            if w0 < D:
                _add_into(out + r * D + w0, src + i * D + w0, D - w0)
    return skipped


cdef Py_ssize_t _coalesce_sum(acc_t* out, Py_ssize_t U, Py_ssize_t D, const int64_t* slots, Py_ssize_t N,
                              const acc_t* src, uint8_t* seen, uint8_t* first, int nthreads,
                              int* team) noexcept nogil:
    # out (U, D) is uninitialised: each slot's first row is written, not added. As in _scatter_add, threads
    # own columns and walk every id in order, so the bits do not depend on the thread count.
    cdef int k
    cdef Py_ssize_t u, block = _block_of(out)
    cdef Py_ssize_t c0, c1, w0, skipped = 0, phase = _phase_of(out, sizeof(acc_t))
    if _first_flags(slots, N, U, seen, first) < U:
        # A slot no id reaches (ids changed while the slots were computed): zeros, as a zeroed sum would
        # be, never uninitialised memory.
        for u in range(U):
            if not seen[u]:
                memset(out + u * D, 0, D * sizeof(acc_t))
    team[0] = 1
    if nthreads <= 1:
        return _coalesce_cols(out, U, D, slots, first, N, src, 0, D, D)
    for k in prange(nthreads, num_threads=nthreads, schedule="static", chunksize=1):
        if k == 0:
            team[0] = fe_omp_team_size()
        c0 = _col_start_of(D, phase, k, nthreads, block)
        c1 = _col_end_of(D, phase, k, nthreads, block)
        w0 = _col_wrap_of(D, phase, k, nthreads, block)
        skipped += _coalesce_cols(out, U, D, slots, first, N, src, c0, c1, w0)
    return skipped


cdef void _widen_any(const void* h, int fmt, float* f, Py_ssize_t n) noexcept nogil:
    """f[k] = h[k] as float32 (exact), for the 16-bit formats."""
    if fmt == FMT_F16:
        fe_widen_f16(f, <const fe_f16*>h, n)
    else:
        fe_widen_bf16(f, <const fe_bf16*>h, n)


cdef void _narrow_any(const float* f, int fmt, void* h, Py_ssize_t n) noexcept nogil:
    """h[k] = f[k] rounded to nearest even, for the 16-bit formats."""
    if fmt == FMT_F16:
        fe_narrow_f16(<fe_f16*>h, f, n)
    else:
        fe_narrow_bf16(<fe_bf16*>h, f, n)


cdef inline Py_ssize_t _coalesce_any(void* out, Py_ssize_t U, Py_ssize_t D, const int64_t* slots, Py_ssize_t N,
                                     const void* src, int acc_fmt, uint8_t* seen, uint8_t* first, int nthreads,
                                     int* team) noexcept nogil:
    if acc_fmt == FMT_F64:
        return _coalesce_sum(<double*>out, U, D, slots, N, <const double*>src, seen, first, nthreads, team)
    return _coalesce_sum(<float*>out, U, D, slots, N, <const float*>src, seen, first, nthreads, team)


def coalesce(ids, grad_out, *, _format=None):
    """(rows, values): the distinct ids in increasing order (int64) and grad_out summed per id (values in
    grad_out's dtype; float16 and bfloat16 rows are summed in float32 in ids order and rounded once)."""
    cdef int fmt
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef cnp.ndarray src = _any_input(grad_out, "grad_out", _format_arg(_format), &fmt)
    if cnp.PyArray_NDIM(src) != cnp.PyArray_NDIM(idx) + 1:
        raise ValueError(
            f"grad_out must have shape ids.shape + (D,), got ids.shape={_shape(idx)} and grad_out.shape={_shape(src)}"
        )
    cdef Py_ssize_t D = cnp.PyArray_DIM(src, cnp.PyArray_NDIM(idx)), N = cnp.PyArray_SIZE(idx)
    _check_rows_shape(src, "grad_out", idx, D)
    cdef bint release = _releases(N * D)
    rows, slots = _unique_slots(idx, N, release)
    cdef Py_ssize_t U = len(rows)
    cdef bint half = fmt == FMT_F16 or fmt == FMT_BF16
    cdef int acc_fmt = FMT_F64 if fmt == FMT_F64 else FMT_F32
    cdef cnp.ndarray values, acc, wide_src = src
    # The sums are not zeroed first: _coalesce_sum writes each distinct id's first row (as 0 + row).
    if fmt == FMT_F32:
        values = acc = _fresh((U, D), np.float32)
    elif fmt == FMT_F64:
        values = acc = _fresh((U, D), np.float64)
    else:
        # float32 copies of grad_out and of the sums: each row's duplicates are summed in float32, in
        # ids order, and rounded to the 16-bit type once at the end.
        wide_src = np.empty((N, D), dtype=np.float32)
        acc = _fresh((U, D), np.float32)
        values = _fresh((U, D), src.dtype)
    cdef cnp.ndarray first = np.empty(N, dtype=np.uint8), seen = np.zeros(U, dtype=np.uint8)
    cdef uint8_t* fp = <uint8_t*>cnp.PyArray_DATA(first)
    cdef uint8_t* np_seen = <uint8_t*>cnp.PyArray_DATA(seen)
    cdef void* ap = cnp.PyArray_DATA(acc)
    cdef void* vp = cnp.PyArray_DATA(values)
    cdef const void* hp = cnp.PyArray_DATA(src)
    cdef float* wp = <float*>cnp.PyArray_DATA(wide_src)
    cdef const int64_t* sp = <const int64_t*>cnp.PyArray_DATA(<cnp.ndarray>slots)
    cdef const void* s = cnp.PyArray_DATA(wide_src)
    cdef int nthreads = _column_threads_fmt(N, D, ap, acc_fmt), team
    cdef Py_ssize_t skipped
    if release:
        with nogil:
            if half:
                _widen_any(hp, fmt, wp, N * D)
            skipped = _coalesce_any(ap, U, D, sp, N, s, acc_fmt, np_seen, fp, nthreads, &team)
            if half:
                _narrow_any(<const float*>ap, fmt, vp, U * D)
    else:
        if half:
            _widen_any(hp, fmt, wp, N * D)
        skipped = _coalesce_any(ap, U, D, sp, N, s, acc_fmt, np_seen, fp, nthreads, &team)
        if half:
            _narrow_any(<const float*>ap, fmt, vp, U * D)
    _record(team, release)
    _raise_if_skipped(skipped, "ids")
    return rows, values


# ---------------------------------------------------------------- 16-bit conversions (private, for the tests)

fe_f16_init()  # F16C where the CPU has it


def _f16_hardware(on=None):
    """Whether float16 rows are converted with F16C (True) or the portable code (False); on=False forces
    the portable code, on=True goes back to F16C where the CPU has it. Process-wide; for tests only."""
    if on is not None:
        fe_f16_set_hardware(1 if on else 0)
    return bool(fe_f16_hardware())


cdef int _half_format(str name) except -1:
    if name == "float16":
        return FMT_F16
    if name == "bfloat16":
        return FMT_BF16
    raise ValueError(f"format must be 'float16' or 'bfloat16', got {name!r}")


def _narrow(values, str format):
    """float32 values (1-D) to the bits (uint16) of float16 or bfloat16, with the row conversion that
    coalesce uses (F16C or portable per _f16_hardware). For tests, and for the bits of a fused rule's new
    bfloat16 state (fastembed.optim._full)."""
    cdef int fmt = _half_format(format)
    cdef cnp.ndarray f = _float_input(values, "values")
    cdef cnp.ndarray h = np.empty(cnp.PyArray_SIZE(f), dtype=np.uint16)
    _narrow_any(<const float*>cnp.PyArray_DATA(f), fmt, cnp.PyArray_DATA(h), cnp.PyArray_SIZE(f))
    return h


def _widen(bits, str format):
    """The bits (uint16, 1-D) of float16 or bfloat16 values to float32, as coalesce widens them. For tests only."""
    cdef int fmt = _half_format(format)
    cdef cnp.ndarray h = np.ascontiguousarray(bits, dtype=np.uint16)
    cdef cnp.ndarray f = np.empty(cnp.PyArray_SIZE(h), dtype=np.float32)
    _widen_any(cnp.PyArray_DATA(h), fmt, <float*>cnp.PyArray_DATA(f), cnp.PyArray_SIZE(h))
    return f


# ---------------------------------------------------------------- optimizers

include "_optim.pxi"
include "_norm.pxi"
include "_bag_common.pxi"
include "_bag_forward.pxi"
include "_bag_backward.pxi"
include "_bag_weights_grad.pxi"
include "_shard.pxi"
