"""The speed targets of DESIGN.md, each judged from the figures of this run: PASS, MISS or SKIPPED.

A target is judged only from rows measured in this run. Targets on shapes the
run did not measure are left out; when a shape ran but a row a target needs is
missing (torch not installed, an op left out, fastembed without OpenMP) the
target says SKIPPED and why.
"""
from dataclasses import dataclass

BIG = ("medium", "wide-uniform", "wide-zipf")
WIDE = ("wide-uniform", "wide-zipf")
THREAD_OPS = ("forward", "backward", "sparse", "step-sparse")


@dataclass
class Verdict:
    """One target on one shape: the measured figure, the limit, the status."""

    target: str
    shape: str
    measured: str
    limit: str
    status: str  # PASS, MISS or SKIPPED
    note: str = ""


class Rows:
    """Look-ups into the result rows of a run."""

    def __init__(self, rows, shapes_run):
        self.rows = rows
        self.shapes_run = set(shapes_run)

    def find(self, shape, op, family, name=None, threads=None, anchor=None):
        """The first row that matches, or None."""
        for r in self.rows:
            if (r["shape"], r["op"], r["family"]) != (shape, op, family):
                continue
            if name is not None and r["method"] != name:
                continue
            if threads is not None and r["threads"] != threads:
                continue
            if anchor is not None and r["anchor"] != anchor:
                continue
            return r
        return None

    def fastembed(self, shape, op):
        """fastembed's main row (at the run's thread count) of a case."""
        return self.find(shape, op, "fastembed", anchor=True)

    def missing(self, shape, what):
        """Why a row is absent (judge() drops the targets of shapes not run)."""
        if shape not in self.shapes_run:
            return f"{shape} not run"
        return f"{what} not measured in this run"


def ratio_verdict(target, shape, ours, theirs, limit, rows, what_missing, at_most=True):
    """PASS when ours / theirs <= limit (or >= limit with at_most=False)."""
    if ours is None or theirs is None:
        return Verdict(target, shape, "-", _fmt_limit(limit, at_most), "SKIPPED", rows.missing(shape, what_missing))
    value = ours["median_ns"] / theirs["median_ns"]
    ok = value <= limit if at_most else value >= limit
    note = f"{ours['method']} [{ours['threads']}t] vs {theirs['method']} [{theirs['threads']}t]"
    return Verdict(target, shape, f"{value:.3g}x", _fmt_limit(limit, at_most), "PASS" if ok else "MISS", note)


def _fmt_limit(limit, at_most):
    """A limit as <= 0.25x or >= 1.6x."""
    return f"{'<=' if at_most else '>='} {limit:g}x"


def seed_targets(rows):
    """Seed forward <= 0.5 us and <= 1/4 of numpy; seed fused backward <= 1 us."""
    out = []
    shape = "seed-1x16"
    for op, target, limit_us in (("forward", "seed forward, one sentence", 0.5),
                                 ("backward", "seed fused backward into both tables", 1.0)):
        fe = rows.fastembed(shape, op)
        if fe is None:
            out.append(Verdict(target, shape, "-", f"<= {limit_us} us", "SKIPPED", rows.missing(shape, "fastembed")))
        else:
            us = fe["median_ns"] / 1000
            how = "fe.gather_add, allocating its output" if op == "forward" else "fe.gather_add_backward"
            out.append(Verdict(target, shape, f"{us:.3g} us", f"<= {limit_us} us",
                               "PASS" if us <= limit_us else "MISS", how + ", median of batched calls"))
        if op == "forward":
            numpy = rows.find(shape, op, "numpy", anchor=True)
            out.append(ratio_verdict("seed forward vs numpy tok[ids] + pos[p]", shape, fe, numpy, 0.25, rows,
                                     "numpy"))
    return out


def big_targets(rows):
    """Forward near the memory limit; dense backward against torch and np.add.at; sparse against torch."""
    out = []
    for shape in BIG:
        fe = rows.fastembed(shape, "forward")
        limit = rows.find(shape, "forward", "memory", threads=fe["threads"]) if fe else None
        out.append(ratio_verdict("forward within 1.25x of the memory limit, same threads", shape, fe, limit,
                                 1.25, rows, "memory limit"))
    for shape in BIG:
        fe = rows.fastembed(shape, "backward")
        torch = rows.find(shape, "backward", "torch", name="torch index_add_")
        out.append(ratio_verdict("dense backward no slower than torch index_add_", shape, fe, torch, 1.0, rows,
                                 "torch"))
        numpy = rows.find(shape, "backward", "numpy", name="numpy np.add.at")
        out.append(ratio_verdict("dense backward >= 20x faster than np.add.at", shape, fe, numpy, 0.05, rows,
                                 "numpy"))
    for shape in BIG:
        fe = rows.fastembed(shape, "sparse")
        torch = rows.find(shape, "sparse", "torch", anchor=True)
        out.append(ratio_verdict("sparse gradient >= 5x faster than torch sparse grad + coalesce()", shape, fe,
                                 torch, 0.2, rows, "torch"))
    return out


def step_targets(rows):
    """fastembed's sparse step against the fastest torch dense nn.Embedding + Adam step."""
    out = []
    for shape in WIDE:
        fe = rows.fastembed(shape, "step-sparse")
        dense = [r for r in rows.rows if (r["shape"], r["op"], r["family"]) == (shape, "step-dense", "torch")]
        fastest = min(dense, key=lambda r: r["median_ns"]) if dense else None
        out.append(ratio_verdict("training step (SparseAdam) >= 10x faster than torch dense Adam", shape, fe,
                                 fastest, 0.1, rows, "torch"))
    return out


def thread_targets(rows, scaling):
    """2 threads against 1 on medium and wide: >= 1.6x and bitwise identical."""
    out = []
    by_key = {(s["shape"], s["op"]): s for s in scaling}
    for shape in BIG:
        for op in THREAD_OPS:
            s = by_key.get((shape, op))
            target = f"{op}: 2 threads vs 1, bitwise identical"
            if s is None or s.get("speedup") is None:
                why = rows.missing(shape, "fastembed at 1 and 2 threads") if s is None else s["note"]
                out.append(Verdict(target, shape, "-", ">= 1.6x", "SKIPPED", why))
                continue
            ok = s["speedup"] >= 1.6 and s["bitwise"]
            note = "bitwise equal" if s["bitwise"] else "RESULTS DIFFER between 1 and 2 threads"
            out.append(Verdict(target, shape, f"{s['speedup']:.3g}x", ">= 1.6x", "PASS" if ok else "MISS", note))
    return out


def judge(rows, scaling, shapes_run, scale=1.0, busy=False):
    """The targets of DESIGN.md on the shapes this run measured, in the order DESIGN.md lists them."""
    r = Rows(rows, shapes_run)
    threads = thread_targets(r, scaling)
    if busy:  # a verdict on thread scaling means little when other processes held the cores
        for v in threads:
            v.note = "machine busy, see notes; " + v.note
    verdicts = seed_targets(r) + big_targets(r) + step_targets(r) + threads
    verdicts = [v for v in verdicts if v.shape in r.shapes_run]
    if scale != 1.0:
        for v in verdicts:
            if v.shape in BIG and v.status != "SKIPPED":
                v.note = f"scaled x{scale:g}, not the DESIGN shape; " + v.note
    return verdicts


def shapes_not_judged(shapes_run):
    """The DESIGN shapes with targets that this run did not measure."""
    return [s for s in ("seed-1x16",) + BIG if s not in shapes_run]
