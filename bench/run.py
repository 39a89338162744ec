"""The suite's driver: parse options, build and check each case, time it, report."""
import argparse
import gc
import os
import sys
import time

import fastembed as fe

from . import bag, report, shapes, targets
from .threads import read_back
from .cases import (BIG_ONLY_OPS, DEFAULT_DTYPE, DEFAULT_OPS, DTYPE_OPS, DTYPES, OPS, Context, build_case, case_op,
                    groups, verify)
from .timing import Plan, loop_overhead_ns, measure

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

SEED_PLAN = Plan(repeats=15, warmup=2, sample_ns=2_000_000, budget_ns=1_000_000_000)
# Big calls last milliseconds: fewer samples, and a pause between samples so the
# OpenMP threads of the previous method stop spinning before the next one starts.
BIG_PLAN = Plan(repeats=9, warmup=1, sample_ns=2_000_000, budget_ns=3_000_000_000, settle_s=0.002)
QUICK_PLAN = Plan(repeats=2, min_repeats=1, warmup=0, sample_ns=20_000, budget_ns=100_000_000)


def parse_args(argv):
    """The command-line options, checked."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="fastembed against numpy, PyTorch, the pure-Python reference and the memory limit.")
    parser.add_argument("--all", action="store_true", help="every shape: seed, medium, wide, and every op (bag "
                        "included) unless --ops says otherwise (about 5-10 minutes for the kernel ops; train, adapter "
                        "and bag add their own rows, so budget more)")
    parser.add_argument("--shapes", type=_names, default=None,
                        help="comma-separated shape names, of " + ", ".join(s.name for s in shapes.ALL_SHAPES)
                        + " (default: the seed shapes)")
    parser.add_argument("--ops", type=_names, default=None,
                        help=f"comma-separated ops, of {','.join(OPS)} (default: {','.join(DEFAULT_OPS)}; with --all, "
                        f"every op). {','.join(BIG_ONLY_OPS)} runs at the medium and wide shapes only: asked for "
                        "alone without --shapes, it runs at those")
    parser.add_argument("--dtypes", type=_names, default=[DEFAULT_DTYPE],
                        help=f"comma-separated table dtypes, of {','.join(DTYPES)} (default: {DEFAULT_DTYPE}): "
                        f"each of {','.join(DTYPE_OPS)} runs once per dtype, as the op named by op and dtype (e.g. "
                        "'forward float16'; float32 keeps the op's name); the other ops run on float32 tables")
    parser.add_argument("--threads", type=int, default=report.usable_cpus(),
                        help="threads for fastembed, torch and the memory limit (default: all usable CPUs; "
                        "fastembed caps it at the processor count, and torch follows fastembed)")
    parser.add_argument("--repeats", type=int, default=None, help="samples per method (default: 15 seed, 9 big)")
    parser.add_argument("--quick", action="store_true", help="tiny repeats and batches: a smoke test, not a measurement")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="shrink the medium and wide vocabularies and sequences by this factor, e.g. 0.01 "
                        "(the seed shapes never shrink; targets on shrunk shapes are marked)")
    parser.add_argument("--output", default=RESULTS_DIR, help=f"directory for the JSON and PNG (default: {RESULTS_DIR})")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even when it is installed")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    args = parser.parse_args(argv)
    if args.ops is None:
        args.ops = list(OPS if args.all else DEFAULT_OPS)
    unknown = [op for op in args.ops if op not in OPS]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; known: {list(OPS)}")
    args.ops = [op for op in OPS if op in args.ops]  # always in the same order
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown or not args.dtypes:
        parser.error(f"unknown dtype(s) {unknown}; known: {list(DTYPES)}" if unknown else "--dtypes names no dtype")
    args.dtypes = [d for d in DTYPES if d in args.dtypes]
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    return args


def _names(text):
    """A comma-separated list as a list of names."""
    return [n.strip() for n in text.split(",") if n.strip()]


def plan_for(shape, args):
    """The timing plan of a shape, with --quick and --repeats applied."""
    plan = QUICK_PLAN if args.quick else (BIG_PLAN if shape.big else SEED_PLAN)
    if args.repeats is not None:
        plan = Plan(**{**vars(plan), "repeats": args.repeats, "min_repeats": min(plan.min_repeats, args.repeats)})
    return plan


def optional_modules(args, notes):
    """torch, tqdm and matplotlib when installed and wanted; a note for each one skipped."""
    found = {}
    for name, wanted, why in (("torch", not args.no_torch, "PyTorch rows and the targets anchored on torch"),
                              ("tqdm", not args.quick and _stderr_is_terminal(), "the progress bar"),
                              ("matplotlib", not args.no_plot, "the PNG plot")):
        if not wanted:
            found[name] = None
            if name == "torch":
                notes.append(f"skipped: {why} (--no-torch)")
            continue
        try:
            found[name] = __import__(name)
        except ImportError:
            found[name] = None
            notes.append(f"skipped: {why} ({name} is not installed; `pip install {name}`)")
    return found


def _stderr_is_terminal():
    """Whether stderr is a terminal (a bar redrawn in a log file leaves a line per redraw)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """A tqdm bar over the cases when tqdm is there and stream is a terminal, else one line per case
    on stream; silent when quiet."""

    def __init__(self, tqdm, quiet, cases, stream=None):
        self.quiet, self.samples, self.expected = quiet, 0, 0
        self.stream = sys.stderr if stream is None else stream
        self.bar = None
        if tqdm is not None and not quiet and self.stream.isatty():
            self.bar = tqdm.tqdm(total=cases, unit="case", file=self.stream, leave=False)

    def case(self, k, n, label):
        """A new case starts (the previous one, if any, is done)."""
        if self.bar is not None:
            self.bar.update(k - 1 - self.bar.n)
            self.bar.set_description(label)
        elif not self.quiet:
            print(f"[{k}/{n}] {label}", file=self.stream, flush=True)

    def expect(self, n):
        """The case's calibration is done: it will take n samples."""
        self.samples, self.expected = 0, n

    def tick(self):
        """One sample taken."""
        self.samples += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"sample {self.samples}/{self.expected}")

    def close(self):
        """Remove the bar (the report follows on stdout)."""
        if self.bar is not None:
            self.bar.close()


def context_for(shape, args, torch):
    """The thread counts fastembed runs at on shape (1 and 2 as well on the big shapes), torch, the reference.

    Each count is read back from fastembed after setting it: set_num_threads caps at the
    processor count (and at 1 without OpenMP), and a row must say what ran, not what was asked.
    """
    wanted = (args.threads, 1, 2) if shape.big else (args.threads,)
    counts = tuple(dict.fromkeys(read_back(fe.set_num_threads, fe.get_num_threads, n) for n in wanted))
    torch_threads = torch.get_num_threads() if torch is not None else 1
    return Context(counts[0], counts, torch, reference=not shape.big, torch_threads=torch_threads)


def case_list(args):
    """(op, dtype) of every case a shape runs, in report order: an op of DTYPE_OPS once per dtype asked for
    (none when --dtypes leaves float32 out and the op takes no other), every other op on float32."""
    return [(op, dtype) for op in args.ops
            for dtype in (args.dtypes if op in DTYPE_OPS else [DEFAULT_DTYPE])]


def run_cases(chosen, args, torch, progress, notes):
    """Build, check and time every case; return the result rows (each case is freed once reported)."""
    rows, skipped = [], {}  # (case name, why) -> the shapes where a row was left out for that reason
    cases = case_list(args)
    total, k = len(chosen) * len(cases), 0
    for shape in chosen:
        data = shapes.make_data(shape)
        ctx = context_for(shape, args, torch)
        for op, dtype in cases:
            name = case_op(op, dtype)
            k += 1
            progress.case(k, total, f"{shape.name} {name}")
            fe.set_num_threads(ctx.fe_threads[0])
            case = build_case(data, op, ctx, dtype)
            for why in case.skips:
                skipped.setdefault((name, why), []).append(shape.name)
            if case.methods:
                verify(case, ctx)
                measure_case(case, plan_for(shape, args), progress)
                rows += report.case_rows(case)
            notes += [f"{shape.name} {name}: {w}" for w in case.warnings]
            del case
            if data.token_table.nbytes > 2**26:
                gc.collect()  # free the big cases' tables and optimizer states now (a full collection is slow)
        del data
    notes += [f"{op}: {why} [{', '.join(names)}]" for (op, why), names in skipped.items()]
    return rows


def _big_table(shape):
    """Whether the shape's token table is large enough (64 MiB) to collect garbage for as soon as it is dropped."""
    return shape.vocab * shape.dim * 4 > 2**26


def measure_case(case, plan, progress):
    """Time each group of the case's methods round-robin; a method with make() gets its state built just
    before its group and dropped after, so one group's tables (and optimizer states) are alive at a time."""
    for group in groups(case.methods):
        for m in group:
            if m.make is not None:
                m.run = m.make()
        try:
            measure(group, plan, progress)
        finally:
            for m in group:
                if m.make is not None:
                    m.run = None
        if any(m.make is not None for m in group) and _big_table(case.shape):
            # torch modules and optimizers hold reference cycles: free their tables now (a full collection
            # takes about half a second once torch is imported, too slow to pay for small tables)
            gc.collect()


def main(argv=None):
    """Run the suite; print the report; write the JSON (and the plot). Returns the exit status."""
    args = parse_args(argv)
    notes = []
    mods = optional_modules(args, notes)
    torch = mods["torch"]
    before = (fe.get_num_threads(), torch.get_num_threads() if torch is not None else None)
    try:
        return run_suite(args, torch, mods, notes)
    finally:  # a caller in the same process gets its thread counts back
        fe.set_num_threads(before[0])
        if torch is not None:
            torch.set_num_threads(before[1])


def run_suite(args, torch, mods, notes):
    """Everything main() does once the options are read."""
    fe.set_num_threads(args.threads)
    main_threads = fe.get_num_threads()  # capped at the processors (1 without OpenMP)
    if torch is not None:
        # torch at fastembed's count, capped or not, so their rows compare at equal threads.
        torch.set_num_threads(main_threads)
    if not fe.openmp_enabled():
        notes.append("skipped: fastembed at 2 threads (built without OpenMP: every kernel runs on one thread; "
                     "torch runs at 1 thread too, so the two compare at equal threads)")
    elif main_threads < args.threads:
        notes.append(f"fastembed runs at {main_threads} threads, not the {args.threads} asked for: "
                     "set_num_threads caps at the processor count (torch and the memory limit follow fastembed)")
    if args.dtypes != [DEFAULT_DTYPE] and not set(args.ops) & set(DTYPE_OPS):
        notes.append(f"--dtypes {','.join(args.dtypes)}: no op of this run takes it (only "
                     f"{', '.join(DTYPE_OPS)} does); every op ran on float32 tables")
    elif DEFAULT_DTYPE not in args.dtypes:
        notes.append(f"--dtypes {','.join(args.dtypes)}: {', '.join(DTYPE_OPS)} did not run on float32 tables")
    # Ops that run at the big shapes alone (bag), asked for without --shapes: their shapes, not the seed ones.
    big_only = not args.shapes and not args.all and set(args.ops) <= set(BIG_ONLY_OPS)
    chosen = shapes.select(args.shapes, args.all, args.scale, default=bag.SHAPES if big_only else None)
    env = report.environment(args.threads, torch, loop_overhead_ns())
    started = time.perf_counter()
    progress = Progress(mods["tqdm"], quiet=args.quick, cases=len(chosen) * len(case_list(args)))
    try:
        rows = run_cases(chosen, args, torch, progress, notes)
    finally:
        progress.close()
    env["seconds"] = round(time.perf_counter() - started, 1)
    env["load_average_end"] = report.load_average()
    env["peak_rss_mb"] = report.peak_rss_mb()
    busy = report.busy_note(env)
    if busy:
        notes.append(busy)
    shapes_run = [s.name for s in chosen]
    scaling = report.thread_scaling(rows, [s.name for s in chosen if s.big], fe.openmp_enabled())
    verdicts = targets.judge(rows, scaling, shapes_run, args.scale, busy=bool(busy))
    unjudged = targets.shapes_not_judged(shapes_run)
    if unjudged:
        notes.append(f"targets not judged: {', '.join(unjudged)} not run (`python -m bench --all` runs every shape)")
    if args.quick:
        notes.append("--quick: tiny repeats, for tests; the figures are not measurements")
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, "bench-" + time.strftime("%Y%m%d-%H%M%S"))
    if mods["matplotlib"] is not None:
        report.write_plot(stem + ".png", rows, fe.get_num_threads())
        notes.append(f"plot: {stem}.png")
    notes.append(f"json: {stem}.json")
    report.write_json(stem + ".json", env, vars(args), chosen, rows, scaling, verdicts, notes)
    print(report.markdown(env, rows, chosen, scaling, verdicts, notes))
    return 0
