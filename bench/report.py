"""Results as rows, markdown tables, a JSON file and a PNG plot.

Ratios are ``this method's time / the anchor's time``: below 1 is faster than
the anchor. Anchors per case: the numpy idiom DESIGN.md names, torch's first
method, and the memory limit at the row's own thread count (none when the case
moves too few bytes for an add to be a limit: memlimit.py). In a case whose
methods are grouped (train: by optimizer; adapter: by module), a row's anchors
are those of its group: each row against torch doing the same thing.

Each row has ``threads_set`` (the count the method was set to, as read back) and
``threads`` (a string: what it ran on, bench/threads.py), which can be fewer.
"""
import json
import math
import os
import platform
import re
import time

import numpy as np

import fastembed as fe

from .cases import method_key, op_order, op_title, split_op

GROUPS_AS_CASES = ("bag",)  # ops whose groups are cases of their own (train's groups show in the row names)
PLOT_BAG_GROUPS = ("forward, 8 ids/bag, sum", "backward, 8 ids/bag, sum")
from .memlimit import LIMIT_MIN_BYTES, OVERHEAD_NAME
from .targets import THREAD_OPS
from .threads import SERIAL_ELEMENTS

# ---------------------------------------------------------------- rows


def _anchor(case, family, group=""):
    """The anchor method of a family in a group of the case, or None."""
    anchors = [m for m in case.methods if m.family == family and m.samples_ns and m.anchor and m.group == group]
    return anchors[0] if anchors else None


def _memory_limit(case, threads, group=""):
    """The memory limit of the row's group set to threads (None when it has none at that count, or none at
    all: a limit at another thread count, or of another group's bytes, is no limit for this row)."""
    same = [m for m in case.methods
            if m.family == "memory" and m.samples_ns and m.threads == threads and m.group == group]
    return same[0] if same else None


def case_rows(case):
    """One dict per method of a measured case: time, GB/s, ratios, what the check found."""
    rows = []
    for m in case.methods:
        numpy, torch = _anchor(case, "numpy", m.group), _anchor(case, "torch", m.group)
        t = m.median_ns
        memory = _memory_limit(case, m.threads, m.group)
        nbytes = m.nbytes if m.nbytes is not None else case.nbytes
        rows.append({
            "shape": case.shape.name,
            "op": case.op,
            "dtype": case.dtype,
            "method": m.name,
            "family": m.family,
            "group": m.group,
            "threads": m.ran or str(m.threads),
            "threads_set": m.threads,
            "anchor": m.anchor,
            "median_ns": t,
            "samples_ns": [s * m.scale for s in m.samples_ns],
            "calls_per_sample": m.number,
            "bytes": nbytes,
            "gbps": nbytes / t if nbytes is not None and t > 0 else math.nan,
            "vs_numpy": t / numpy.median_ns if numpy else None,
            "vs_torch": t / torch.median_ns if torch else None,
            "vs_memory": t / memory.median_ns if memory else None,
            "check": case.checks.get(method_key(m), "-"),
            "note": m.note,
        })
    return rows


def thread_scaling(rows, big_shapes, openmp):
    """fastembed at 1 and at 2 threads on the big shapes: speed-up and whether the results are bitwise equal."""
    out = []
    for shape in big_shapes:
        for op in THREAD_OPS:
            found = {r["threads_set"]: r for r in rows
                     if (r["shape"], r["op"], r["family"], r["method"]) == (shape, op, "fastembed", "fastembed")}
            entry = {"shape": shape, "op": op, "t1_ns": None, "t2_ns": None, "speedup": None, "bitwise": None,
                     "ran": None, "note": ""}
            if not found:
                continue
            entry.update(t1_ns=found[1]["median_ns"] if 1 in found else None,
                         t2_ns=found[2]["median_ns"] if 2 in found else None)
            if 1 in found and 2 in found:
                entry["speedup"] = entry["t1_ns"] / entry["t2_ns"]
                entry["bitwise"] = all(found[n]["check"] in ("bitwise", "baseline") for n in (1, 2))
                entry["ran"] = found[2]["threads"]
                if entry["ran"] != "2":  # calls below the serial threshold keep one thread, even when set to 2
                    entry["note"] = f"the 2-thread row ran on {entry['ran']} threads"
            else:
                entry["note"] = "fastembed built without OpenMP" if not openmp else "not measured"
            out.append(entry)
    return out


# ---------------------------------------------------------------- markdown

def fmt_time(ns):
    """A time with 3 significant digits in the unit that suits it."""
    if ns is None or not math.isfinite(ns):
        return "-"
    for unit, size in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= size:
            return f"{ns / size:.3g} {unit}"
    return f"{ns:.3g} ns"


def fmt_ratio(x):
    """A ratio as 0.123x, or - when there is none."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}x"


def table(header, lines):
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def _fmt_gbps(x):
    """GB/s with 3 significant digits, or - where the op has no byte count (train, adapter)."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}"


def op_label(r):
    """The op column: the op, and for bag its case within the op (direction, ids per bag, mode)."""
    return f"{r['op']}: {r['group']}" if _grouped(r["op"]) and r.get("group") else r["op"]


def _grouped(op):
    """Whether a case name's op has groups that are cases of their own (bag, on every dtype)."""
    return split_op(op)[0] in GROUPS_AS_CASES


def results_markdown(rows, shapes):
    """One table per shape: every op and method with its time, GB/s and ratios."""
    parts = []
    for shape in shapes:
        lines = []
        for r in (r for r in rows if r["shape"] == shape.name):
            lines.append([op_label(r), r["method"], r["threads"], fmt_time(r["median_ns"]), _fmt_gbps(r["gbps"]),
                          fmt_ratio(r["vs_numpy"]), fmt_ratio(r["vs_torch"]), fmt_ratio(r["vs_memory"]),
                          r["note"] or r["check"]])
        if lines:
            parts.append(f"### {shape.name}: {shape.label()}\n\n" + table(
                ["op", "method", "threads", "time", "GB/s", "vs numpy", "vs torch", "vs mem limit", "check"], lines))
    return "\n\n".join(parts)


def scaling_markdown(scaling):
    """The 1-vs-2 threads table."""
    lines = [[s["shape"], s["op"], fmt_time(s["t1_ns"]), fmt_time(s["t2_ns"]), fmt_ratio(s["speedup"]),
              {True: "yes", False: "NO", None: "-"}[s["bitwise"]] + (f" ({s['note']})" if s["note"] else "")]
             for s in scaling]
    return table(["shape", "op", "1 thread", "2 threads", "speed-up", "bitwise equal"], lines)


def targets_markdown(verdicts):
    """The DESIGN.md targets table."""
    lines = [[v.target, v.shape, v.measured, v.limit, v.status, v.note] for v in verdicts]
    header = ["target (from DESIGN.md, compared like with like)", "shape", "measured", "target", "status", "how"]
    return table(header, lines)


def bag_targets_markdown(verdicts):
    """The bag targets as one line per shape and case (ids per bag, mode), one column per target; which rows
    each column compares and why a cell was skipped are listed once below the table."""
    from .targets import BAG_TARGETS

    columns = BAG_TARGETS
    by = {(v.shape, v.case, v.target): v for v in verdicts}
    keys = list(dict.fromkeys((v.shape, v.case) for v in verdicts))
    lines, hows, skipped = [], {}, {}
    for shape, case in keys:
        line = [shape, case]
        for column, target, _ in columns:
            v = by.get((shape, case, target))
            if v is None:
                line.append("-")
                continue
            line.append(v.status if v.status == "SKIPPED" else f"{v.measured} {v.status}")
            if v.status == "SKIPPED":
                skipped.setdefault((column, v.note), []).append(shape)
            else:
                # the rows compared and their threads, the same in every case (FBGEMM's pooling is the case's mode)
                hows.setdefault(column, re.sub(r", pooling [A-Z]+", ", pooling by the case's mode", v.note))
        lines.append(line)
    header = ["shape", "case"] + [f"{column} (<= {limit:g}x)" for column, _, limit in columns]
    text = table(header, lines)
    notes = [f"- {column}: {how}" for column, how in hows.items()]
    notes += [f"- {column} SKIPPED: {why} [{len(where)} case{'s' if len(where) > 1 else ''} of "
              f"{', '.join(dict.fromkeys(where))}]" for (column, why), where in skipped.items()]
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def environment_markdown(env):
    """Versions, CPUs, threads and load as a list."""
    keys = ("python", "numpy", "torch", "fastembed", "cpu_count", "cpus_usable", "threads", "fastembed_threads",
            "torch_threads", "fastembed_openmp", "cpu_model", "load_average", "load_average_end", "seconds",
            "peak_rss_mb", "timer_loop_overhead_ns")
    return "\n".join(f"- {k}: {env.get(k)}" for k in keys)


def markdown(env, rows, shapes, scaling, verdicts, notes):
    """The whole report."""
    ops = sorted({r["op"] for r in rows}, key=op_order)
    parts = [
        "## fastembed benchmark",
        environment_markdown(env),
        "Ops: " + "; ".join(f"{op} = {op_title(op)}" for op in ops) + ".",
        "Times are medians of round-robin samples after warm-up. `vs X` = this time / X's time "
        "(below 1: faster); the memory limit is an add moving the same bytes at the row's thread count. "
        f"A case moving less than {LIMIT_MIN_BYTES / 2**20:g} MiB has no memory limit: its add is shown as "
        f"`{OVERHEAD_NAME}` (numpy's fixed cost per call) and nothing is compared with it. "
        "`threads`: what ran. fastembed: by the kernels' rule (a call with fewer than "
        f"{SERIAL_ELEMENTS:,} float32 elements of work, and any call on one column block, runs on one thread), "
        "from the count read back from fastembed; a range (1-2) when a step's calls differ. numpy and the "
        "reference: 1. torch: <=n, its pool size (torch splits an op only when it is large enough). "
        "GB/s counts the bytes the op must read and write. `check`: the result against fastembed's, "
        "before timing.",
        results_markdown(rows, shapes),
    ]
    if scaling:
        parts += ["### fastembed threads: 1 vs 2", scaling_markdown(scaling)]
    parts += ["### speed targets", targets_markdown([v for v in verdicts if not v.case])]
    bag_verdicts = [v for v in verdicts if v.case]
    if bag_verdicts:
        parts += ["### bag targets (issue 10; measured ratio and status per case, same threads)",
                  bag_targets_markdown(bag_verdicts)]
    if notes:
        parts += ["### notes", "\n".join(f"- {n}" for n in notes)]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- environment, JSON, plot

def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def usable_cpus():
    """CPUs this process may run on (a container's cpuset, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average():
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def peak_rss_mb():
    """The largest resident memory of this process so far, in MB (None where unknown)."""
    try:
        import resource
    except ImportError:
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return round(kb / 1024)


def busy_note(env):
    """A warning when other work shared the CPUs during the run: its thread-scaling figures are suspect."""
    cpus, start, end = env["cpus_usable"], env.get("load_average"), env.get("load_average_end")
    # At the start this run has barely begun; at the end its own threads count for up to cpus.
    busy_start = start is not None and start[0] > 0.5 * cpus
    busy_end = end is not None and end[0] > cpus + 0.5
    if busy_start or busy_end:
        loads = f"{start[0] if start else '-'} at the start, {end[0] if end else '-'} at the end"
        return (f"the machine was busy (1-minute load {loads}, on {cpus} CPUs): other processes shared "
                "the cores, so multi-threaded figures (and 2-vs-1 speed-ups) are unreliable")
    return None


def environment(threads, torch, loop_overhead_ns):
    """Versions, CPU and thread counts, recorded with every run."""
    env = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "fastembed": fe.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "threads": threads,
        "fastembed_threads": fe.get_num_threads(),
        "fastembed_openmp": fe.openmp_enabled(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "load_average": load_average(),
        "timer_loop_overhead_ns": round(loop_overhead_ns, 1),
    }
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        env["threadpools"] = None
    else:
        env["threadpools"] = [{k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "version")}
                              for p in threadpool_info()]
    return env


def _clean(x):
    """JSON has no NaN: None instead."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path, env, args, shapes, rows, scaling, verdicts, notes):
    """Everything the run measured, in one file."""
    doc = {
        "environment": env,
        "args": args,
        "shapes": [{"name": s.name, "vocab": s.vocab, "context": s.context, "dim": s.dim, "ids_shape": [s.batch, s.seq],
                    "ids": s.ids} for s in shapes],
        "results": rows,
        "thread_scaling": scaling,
        "targets": [vars(v) for v in verdicts],
        "notes": notes,
    }
    with open(path, "w") as f:
        json.dump(_clean(doc), f, indent=1)


def write_plot(path, rows, threads):
    """Time per method per shape, one panel per op, log scale (fastembed and the memory limit at threads only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["threads_set"] == threads or r["family"] not in ("fastembed", "memory")]
    # bag has 18 cases a shape: the plot shows one of each direction, its rows named by direction.
    shown = [dict(r, method=f"{r['group'].split(',')[0]}: {r['method']}") if _grouped(r["op"]) else r
             for r in shown if not _grouped(r["op"]) or r["group"] in PLOT_BAG_GROUPS]
    ops = sorted({r["op"] for r in shown}, key=op_order)
    shapes = list(dict.fromkeys(r["shape"] for r in shown))
    fig, axes = plt.subplots(len(ops), 1, figsize=(13, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in shown if r["op"] == op]
        methods = list(dict.fromkeys(r["method"] for r in op_rows))
        width = 0.8 / len(methods)
        for k, name in enumerate(methods):
            times = {r["shape"]: r["median_ns"] / 1e3 for r in op_rows if r["method"] == name}
            xs = [i + (k - (len(methods) - 1) / 2) * width for i, s in enumerate(shapes) if s in times]
            ax.bar(xs, [times[s] for s in shapes if s in times], width, label=name)
        ax.set_yscale("log")
        ax.set_axisbelow(True)
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_ylabel("time per call (us)")
        ax.set_title(op_title(op) + (" (8 ids/bag, sum)" if _grouped(op) else ""))
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(f"fastembed benchmark ({threads} threads; log scale, lower is faster)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
