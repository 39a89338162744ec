# Included at the end of _kernels.pyx (one extension module; Cython `include`): the id exchange of a
# row-sharded table. Rank r of W owns the global rows [bounds[r], bounds[r + 1]); before the all-to-all
# that fetches rows, each rank turns its batch of N global ids into a send plan:
#   counts[r]  how many distinct ids go to rank r (an id repeated in the batch is sent once),
#   rows       their local row numbers (id - bounds[r]), grouped by rank in rank order, each rank's in
#              order of first occurrence in the batch,
#   inverse    for each id, its index into rows: the rows that come back, concatenated in rank order,
#              are the batch's rows when indexed by inverse, and a scatter-add at inverse sums the
#              batch's gradient once per sent row.
#
# One pass over the ids with an open-addressing hash table keyed by id (linear probing, a power of two
# >= 2N slots, so at most half full): O(N) memory, never O(rows), for tables of any size. A stable
# counting sort by owner rank then places the distinct ids. The plan depends on the ids alone: the same
# bits on every run. Single-threaded (one batch of ids; its pass is memory-latency bound, and the
# sharded layer's lookups and scatters around it are the threaded work); the GIL is released for a
# batch past the serial threshold.

cdef enum:
    PLAN_MIN_SLOTS = 16  # a power of two: the smallest hash table (so the shift below is < 64)


# ---------------------------------------------------------------- checks (GIL held)

cdef cnp.ndarray _checked_bounds(object bounds):
    """bounds as a private int64 copy of shape (W + 1,), checked: W >= 1, bounds[0] == 0, non-decreasing.

    The checks read the copy, and so do the loops: a caller's array that changes during the call cannot
    make them disagree."""
    cdef cnp.ndarray arr = _index_array(bounds, "bounds")
    if cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_DIM(arr, 0) < 2:
        raise ValueError(
            f"bounds must be 1-D with world_size + 1 >= 2 entries (rank r owns the rows bounds[r] to "
            f"bounds[r + 1] - 1), got bounds.shape={_shape(arr)}"
        )
    cdef cnp.ndarray own = np.array(arr, dtype=np.int64, copy=True)
    cdef const int64_t* b = <const int64_t*>cnp.PyArray_DATA(own)
    cdef Py_ssize_t r, n = cnp.PyArray_DIM(own, 0)
    if b[0] != 0:
        raise ValueError(f"bounds[0] = {b[0]} must be 0 (rank 0's rows start at row 0)")
    for r in range(1, n):
        if b[r] < b[r - 1]:
            raise ValueError(
                f"bounds[{r}] = {b[r]} is less than bounds[{r - 1}] = {b[r - 1]}: bounds must be non-decreasing "
                f"(rank {r - 1} would own a negative number of rows; an empty rank repeats a bound)"
            )
    return own


# ---------------------------------------------------------------- loops (no GIL, trusted inputs)

cdef inline Py_ssize_t _owner(const int64_t* bounds, Py_ssize_t W, int64_t x) noexcept nogil:
    """The rank r with bounds[r] <= x < bounds[r + 1], for 0 <= x < bounds[W]: the last r in [0, W) with
    bounds[r] <= x (an empty rank repeats the next rank's bound and is passed over)."""
    cdef Py_ssize_t lo = 0, hi = W - 1, mid
    while lo < hi:  # bounds[lo] <= x, and the answer is in [lo, hi]
        mid = (lo + hi + 1) >> 1
        if bounds[mid] <= x:
            lo = mid
        else:
            hi = mid - 1
    return lo


# A salt drawn once per process: ids cannot be chosen to collide (the plan does not depend on the hash,
# only the time to build it does).
cdef uint64_t _PLAN_SALT = <uint64_t>int.from_bytes(__import__("os").urandom(8), "little")


cdef inline Py_ssize_t _hash_slot(int64_t x, int shift) noexcept nogil:
    # The salted id through a full-avalanche 64-bit finaliser (murmur3's constants), top bits kept. A bare
    # multiplicative hash keeps only the top bits of x * C, and ids of the form k * C^-1 mod 2^62 all land
    # in a few home slots: linear probing went quadratic (1e5 such ids took seconds, 1e6 minutes).
    cdef uint64_t k = <uint64_t>x ^ _PLAN_SALT
    k ^= k >> 33
    k *= <uint64_t>0xFF51AFD7ED558CCDULL
    k ^= k >> 33
    k *= <uint64_t>0xC4CEB9FE1A85EC53ULL
    k ^= k >> 33
    return <Py_ssize_t>(k >> shift)


cdef Py_ssize_t _plan_distinct(const index_t* ids, Py_ssize_t N, Py_ssize_t V, const int64_t* bounds,
                               Py_ssize_t W, int64_t* table, int shift, Py_ssize_t mask, int64_t* first,
                               int64_t* owner, int64_t* counts, int64_t* slots,
                               Py_ssize_t* skipped) noexcept nogil:
    """The distinct ids in order of first occurrence: first[u] the id, owner[u] its rank, counts[r] += 1
    per distinct id of rank r, slots[i] the u of ids[i] (-1 for an id changed since the entry check,
    which is skipped and counted). table: (mask + 1) pairs (id, u), every id -1 on entry. Returns U."""
    cdef Py_ssize_t i, h, r, U = 0
    cdef int64_t x, key
    for i in range(N):
        x = ids[i]
        if _outside(x, V):  # changed since the entry check (see the loops of _kernels.pyx): skip it
            skipped[0] += 1
            slots[i] = -1
            continue
        h = _hash_slot(x, shift)
        while True:
            key = table[2 * h]
            if key == x:
                slots[i] = table[2 * h + 1]
                break
            if key < 0:  # a free slot: x is new
                table[2 * h] = x
                table[2 * h + 1] = U
                r = _owner(bounds, W, x)
                first[U] = x
                owner[U] = r
                counts[r] += 1
                slots[i] = U
                U += 1
                break
            h = (h + 1) & mask
    return U


cdef inline Py_ssize_t _plan_distinct_any(const void* ids, bint wide, Py_ssize_t N, Py_ssize_t V,
                                          const int64_t* bounds, Py_ssize_t W, int64_t* table, int shift,
                                          Py_ssize_t mask, int64_t* first, int64_t* owner, int64_t* counts,
                                          int64_t* slots, Py_ssize_t* skipped) noexcept nogil:
    if wide:
        return _plan_distinct(<const int64_t*>ids, N, V, bounds, W, table, shift, mask, first, owner, counts,
                              slots, skipped)
    return _plan_distinct(<const int32_t*>ids, N, V, bounds, W, table, shift, mask, first, owner, counts,
                          slots, skipped)


cdef void _plan_place(const int64_t* bounds, Py_ssize_t W, const int64_t* counts, const int64_t* first,
                      int64_t* owner, Py_ssize_t U, int64_t* start, int64_t* rows, int64_t* inverse,
                      Py_ssize_t N) noexcept nogil:
    """A stable counting sort of the distinct ids by rank: rows gets their local row numbers, grouped by
    rank; then inverse[i] (the slot of ids[i] on entry) becomes the index of its row in rows.
    start: W scratch entries. owner[u] is overwritten with where u went."""
    cdef Py_ssize_t r, u, i
    cdef int64_t total = 0, p
    for r in range(W):  # start[r]: where rank r's rows begin (exclusive prefix sum of counts)
        start[r] = total
        total += counts[r]
    for u in range(U):  # in order of first occurrence, so each rank keeps that order
        r = owner[u]
        p = start[r]
        start[r] = p + 1
        rows[p] = first[u] - bounds[r]
        owner[u] = p
    for i in range(N):
        if inverse[i] >= 0:
            inverse[i] = owner[inverse[i]]


# ---------------------------------------------------------------- entry point

def exchange_plan(ids, bounds):
    """(counts, rows, inverse): the send plan of a batch of global ids over a table sharded by rows.

    Rank r owns the global rows [bounds[r], bounds[r + 1]). counts (int64, (W,)): the distinct ids per
    owner rank; rows (int64, (sum(counts),)): their local row numbers, grouped by rank, each rank's in
    order of first occurrence in ids.ravel(); inverse (int64, ids.shape): the index into rows of each id.
    Every input is checked first: ids int32/int64 in [0, bounds[-1]) (IndexError), bounds int32/int64,
    1-D, W + 1 >= 2 entries, bounds[0] == 0, non-decreasing (ValueError). Nothing is written but the
    new arrays it returns.
    """
    cdef cnp.ndarray idx = _index_array(ids, "ids")
    cdef cnp.ndarray bnd = _checked_bounds(bounds)
    cdef Py_ssize_t W = cnp.PyArray_SIZE(bnd) - 1, N = cnp.PyArray_SIZE(idx)
    cdef const int64_t* b = <const int64_t*>cnp.PyArray_DATA(bnd)
    cdef Py_ssize_t V = b[W]
    _check_range(idx, "ids", V, "the sharded table")
    cdef Py_ssize_t slots = PLAN_MIN_SLOTS
    cdef int shift = 64 - 4  # log2(PLAN_MIN_SLOTS)
    while slots < 2 * N:
        slots <<= 1
        shift -= 1
    cdef cnp.ndarray table = np.full(2 * slots, -1, dtype=np.int64)
    cdef cnp.ndarray first = np.empty(N, dtype=np.int64)
    cdef cnp.ndarray owner = np.empty(N, dtype=np.int64)
    cdef cnp.ndarray start = np.empty(W, dtype=np.int64)
    cdef cnp.ndarray counts = np.zeros(W, dtype=np.int64)
    cdef cnp.ndarray inverse = np.empty(_shape(idx), dtype=np.int64)
    cdef const void* ip = cnp.PyArray_DATA(idx)
    cdef bint wide = cnp.PyArray_ITEMSIZE(idx) == 8
    cdef int64_t* tp = <int64_t*>cnp.PyArray_DATA(table)
    cdef int64_t* fp = <int64_t*>cnp.PyArray_DATA(first)
    cdef int64_t* op = <int64_t*>cnp.PyArray_DATA(owner)
    cdef int64_t* cp = <int64_t*>cnp.PyArray_DATA(counts)
    cdef int64_t* vp = <int64_t*>cnp.PyArray_DATA(inverse)
    cdef Py_ssize_t U, skipped = 0, mask = slots - 1
    cdef bint release = _releases(N)
    if release:
        with nogil:
            U = _plan_distinct_any(ip, wide, N, V, b, W, tp, shift, mask, fp, op, cp, vp, &skipped)
    else:
        U = _plan_distinct_any(ip, wide, N, V, b, W, tp, shift, mask, fp, op, cp, vp, &skipped)
    _raise_if_skipped(skipped, "ids")
    cdef cnp.ndarray rows = np.empty(U, dtype=np.int64)
    cdef int64_t* rp = <int64_t*>cnp.PyArray_DATA(rows)
    cdef int64_t* sp = <int64_t*>cnp.PyArray_DATA(start)
    if release:
        with nogil:
            _plan_place(b, W, cp, fp, op, U, sp, rp, vp, N)
    else:
        _plan_place(b, W, cp, fp, op, U, sp, rp, vp, N)
    _record(1, release)
    return counts, rows, inverse
