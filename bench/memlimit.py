"""The memory limit: a contiguous add that moves the same bytes as an op, on the same thread count.

``np.add(a, b, out=c)`` reads a and b and writes c, all streamed in order, so it
runs near what the memory system (or the cache level that holds that many bytes)
can deliver. numpy releases the GIL inside the add, so n Python threads each
adding one chunk use n cores, as an op on n OpenMP threads does.

Below LIMIT_MIN_BYTES the same add is not a limit: a numpy call costs a fixed
0.3-1 us (argument parsing, dispatch, the output checks) whatever its size, and
a few KB stream from L1 in a small fraction of that, so its time is numpy's call
overhead. There the benchmark still times it, named as what it is ("numpy call
overhead (np.add on the same bytes)", family "overhead"), and prints no ratio
against it. At 1 MiB the add streams for 10 us or more even from L2, so the
fixed cost is at most about a tenth of it.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Past this many bytes moved, the add runs on a buffer of this size and its time is
# scaled up linearly: streaming is linear once far beyond the caches, and the largest
# ops (a dense Adam step on a million rows) would otherwise need gigabytes more memory.
CAP_BYTES = 192 * 2**20
# Below this many bytes the add runs on the calling thread alone: waking a pool thread
# costs more than the add (fastembed keeps small calls on one thread for the same reason).
SERIAL_BYTES = 1 * 2**20
# Below this many bytes the add measures numpy's call overhead, not a bandwidth (see the module docstring).
LIMIT_MIN_BYTES = 1 * 2**20
OVERHEAD_NAME = "numpy call overhead (np.add on the same bytes)"

_pools = {}
_pools_lock = threading.Lock()


def _pool(workers):
    """A long-lived pool of workers threads, so a timed call never pays for starting threads."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memlimit")
        return _pools[workers]


def _add(a, b, c):
    """One chunk's add (a module function, so a test can see which threads ran it)."""
    np.add(a, b, out=c)


def is_limit(nbytes):
    """Whether an add of nbytes is a memory limit (else it is numpy's call overhead)."""
    return nbytes >= LIMIT_MIN_BYTES


class MemoryLimit:
    """A callable add over three float32 buffers moving nbytes in all (scaled when capped).

    threads is the count it is set to; parts (also the threads column) the chunks it
    really runs as, one per thread: 1 below SERIAL_BYTES.
    """

    def __init__(self, nbytes, threads):
        moved = min(int(nbytes), CAP_BYTES)
        n = max(1, moved // 12)  # three float32 arrays: a and b read, c written
        # Distinct values per element, so a chunk left unadded shows in a check of c == a + b.
        self.a = np.arange(n, dtype=np.float32)
        self.b = np.full(n, 0.5, dtype=np.float32)
        self.c = np.empty(n, dtype=np.float32)
        self.threads = max(1, int(threads))
        self.scale = nbytes / (12 * n)  # > 1 only when capped; close to 1 otherwise
        parallel = self.threads > 1 and nbytes >= SERIAL_BYTES
        self.parts = self.threads if parallel else 1
        bounds = [n * k // self.parts for k in range(self.parts + 1)]
        self.chunks = [(self.a[lo:hi], self.b[lo:hi], self.c[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
        self.pool = _pool(self.parts - 1) if self.parts > 1 else None

    def __call__(self):
        """One add: the calling thread does the first chunk, the pool the others."""
        if self.pool is None:
            _add(self.a, self.b, self.c)
            return self.c
        futures = [self.pool.submit(_add, a, b, c) for a, b, c in self.chunks[1:]]
        _add(*self.chunks[0])
        for f in futures:
            f.result()
        return self.c

    def describe(self):
        """How the limit was run, for the notes column."""
        moved = 12 * len(self.c)
        if self.parts == 1:
            how = "np.add on 1 thread" + (f" (set to {self.threads}; too small to split)" if self.threads > 1 else "")
        else:
            how = f"np.add split over {self.parts} threads"
        if self.scale > 1.01:
            how += f", timed on {moved / 2**20:.0f} MB and scaled x{self.scale:.2f}"
        return how
