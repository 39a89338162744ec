"""Timing: calibrate each method, warm it up, then sample every method round-robin and keep medians.

Round-robin (one sample of each method in turn, the order rotated every round)
means drift on a shared machine (another job starting, the clock changing)
hits every method of a case about equally, so their ratios stay meaningful.
"""
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

perf_counter_ns = time.perf_counter_ns


@dataclass
class Method:
    """One way of doing a case's operation.

    run: the timed call. prepare: when set, it is called untimed before each
    call and returns the callable to time (for work that can run only once, like
    the reference's backward() on a fresh graph). result: the arrays the method
    computes, from a clean state, for the equality check before timing. make:
    when set, it builds the method's state and returns run; the driver calls it
    just before the method's group is timed and drops run after (so only one
    group's tables are alive at a time). group: methods of one group compute the
    same thing, are checked against the group's fastembed anchor and timed
    round-robin together (a case of one group: every method at once). strict: a
    result that is close but not bitwise fails the check (where no rounding may
    differ, as in a max). nbytes: the row's own byte count (the op bag's groups
    move different bytes), else the case's. check_rows: when set, the check compares
    only these rows (an index along the first axis) of each array, the anchor's and
    this method's (torch's half-precision sparse train rows: see bench/train.py).
    """

    name: str
    family: str  # fastembed, numpy, torch, reference, memory, overhead
    run: Optional[Callable[[], object]] = None
    prepare: Optional[Callable[[], Callable[[], object]]] = None
    result: Optional[Callable[[], tuple]] = None
    threads: int = 1  # the count the method is set to run at (what tells its variants apart)
    ran: str = ""  # the threads it actually ran on, for the threads column (bench/threads.py)
    exact: bool = True  # expected bitwise equal to fastembed (else: equal within float32 tolerance)
    scale: float = 1.0  # time multiplier (the memory limit runs on a capped buffer and scales up)
    note: str = ""
    anchor: bool = False  # the family's reference point for the ratios of this case (of its group)
    make: Optional[Callable[[], Callable[[], object]]] = None
    group: str = ""
    strict: bool = False  # must be bitwise equal to its group's anchor: any difference fails the check
    nbytes: Optional[int] = None  # the bytes this row's work must move, when they differ within a case
    check_rows: Optional[object] = None  # the rows of each result the check compares (None: all of them)
    samples_ns: list = field(default_factory=list)
    number: int = 1  # calls per sample

    @property
    def median_ns(self):
        """The median sample, scaled (nan before any sample)."""
        return statistics.median(self.samples_ns) * self.scale if self.samples_ns else math.nan


@dataclass
class Plan:
    """How long to measure: samples per method, the batch length to aim for, a time budget per method."""

    repeats: int = 15  # samples per method (at most)
    min_repeats: int = 3  # samples per method (at least, whatever the budget)
    warmup: int = 1  # samples thrown away per method
    sample_ns: int = 2_000_000  # a sample batches calls until it lasts about this long
    budget_ns: int = 3_000_000_000  # per method: slow methods take fewer samples
    settle_s: float = 0.0  # pause between samples, so idle OpenMP threads stop spinning


def one_sample(method):
    """Mean time of one call over a batch of method.number calls, in ns."""
    if method.prepare is not None:
        total = 0
        for _ in range(method.number):
            fn = method.prepare()
            t0 = perf_counter_ns()
            fn()
            total += perf_counter_ns() - t0
        return total / method.number
    fn, calls = method.run, range(method.number)
    t0 = perf_counter_ns()
    for _ in calls:
        fn()
    return (perf_counter_ns() - t0) / method.number


def calibrate(method, plan):
    """Pick the batch length from one call (after a first, cold one); return that call's time."""
    method.number = 1
    one_sample(method)  # first touch of its buffers, lazy imports, torch's kernel selection
    estimate = max(one_sample(method), 1.0)
    method.number = max(1, min(1_000_000, math.ceil(plan.sample_ns / estimate)))
    return estimate * method.number


def sample_counts(sample_times, plan):
    """Samples per method: plan.repeats, fewer for a method whose samples would overrun the budget."""
    counts = []
    for t in sample_times:
        affordable = int(plan.budget_ns // max(t, 1.0))
        counts.append(max(plan.min_repeats, min(plan.repeats, affordable)))
    return counts


def measure(methods, plan, progress=None):
    """Fill method.samples_ns for every method: calibrate, warm up, then sample round-robin.

    progress, when given, is told how many samples to expect (expect(n)) and of each one taken (tick()).
    """
    sample_times = [calibrate(m, plan) for m in methods]
    counts = sample_counts(sample_times, plan)
    if progress is not None:
        progress.expect(sum(counts))
    for _ in range(plan.warmup):
        for m in methods:
            one_sample(m)
    for m in methods:
        m.samples_ns = []
    for r in range(max(counts)):
        shift = r % len(methods)  # rotate so no method always runs right after the same other one
        for k in range(len(methods)):
            i = (k + shift) % len(methods)
            if r < counts[i]:
                if plan.settle_s:
                    time.sleep(plan.settle_s)
                methods[i].samples_ns.append(one_sample(methods[i]))
                if progress is not None:
                    progress.tick()
    return counts


def loop_overhead_ns(number=50_000, repeats=5):
    """Time per iteration of the timing loop around a no-op call: the floor under every seed figure."""
    noop, best = int, math.inf
    for _ in range(repeats):
        t0 = perf_counter_ns()
        for _ in range(number):
            noop()
        best = min(best, (perf_counter_ns() - t0) / number)
    return best
