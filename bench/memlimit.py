"""The memory limit: a contiguous add that moves the same bytes as an op, on the same thread count.

``np.add(a, b, out=c)`` reads a and b and writes c, all streamed in order, so it
runs near what the memory system can deliver. numpy releases the GIL inside the
add, so n Python threads each adding one chunk use n cores, as an op on n
OpenMP threads does.
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

_pools = {}
_pools_lock = threading.Lock()


def _pool(workers):
    """A long-lived pool of workers threads, so a timed call never pays for starting threads."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memlimit")
        return _pools[workers]


class MemoryLimit:
    """A callable add over three float32 buffers moving nbytes in all (scaled when capped)."""

    def __init__(self, nbytes, threads):
        moved = min(int(nbytes), CAP_BYTES)
        n = max(1, moved // 12)  # three float32 arrays: a and b read, c written
        self.a = np.full(n, 1.0, dtype=np.float32)
        self.b = np.full(n, 2.0, dtype=np.float32)
        self.c = np.empty(n, dtype=np.float32)
        self.threads = max(1, int(threads))
        self.scale = nbytes / (12 * n)  # > 1 only when capped; close to 1 otherwise
        parallel = self.threads > 1 and 12 * n >= SERIAL_BYTES
        self.parts = self.threads if parallel else 1
        bounds = [n * k // self.parts for k in range(self.parts + 1)]
        self.chunks = [(self.a[lo:hi], self.b[lo:hi], self.c[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
        self.pool = _pool(self.parts - 1) if self.parts > 1 else None

    def __call__(self):
        """One add: the calling thread does the first chunk, the pool the others."""
        if self.pool is None:
            np.add(self.a, self.b, out=self.c)
            return self.c
        futures = [self.pool.submit(np.add, a, b, c) for a, b, c in self.chunks[1:]]
        a, b, c = self.chunks[0]
        np.add(a, b, out=c)
        for f in futures:
            f.result()
        return self.c

    def describe(self):
        """How the limit was run, for the notes column."""
        moved = 12 * len(self.c)
        if self.parts == 1:
            how = "np.add on 1 thread" + (" (too small to split)" if self.threads > 1 else "")
        else:
            how = f"np.add split over {self.parts} threads"
        if self.scale > 1.01:
            how += f", timed on {moved / 2**20:.0f} MB and scaled x{self.scale:.2f}"
        return how
