"""``python -m bench.sharded --world 2``: training steps of ShardedEmbedding over W processes on this machine.

Each world size starts W processes (this file, ``--worker``; gloo, a file:// rendezvous in a temporary
directory: no ports, no service) that train one table sharded by rows, and reports per shape:

- the step time: forward + backward + the optimizer step, every step started together on every rank
  (a barrier, untimed); the group's time of a step is its slowest rank's; medians over the repeats after
  warm-up, and the spread of the ranks' own medians;
- the time inside ``all_to_all_single`` ("collective + wait": it includes waiting for the slowest rank)
  and the rest ("local": the plan, gathers, the gradient sums, the optimizer, Python). It is measured by
  replacing ``fastembed.torch.distributed``'s reference to ``torch.distributed`` with a proxy in the
  bench's processes (the library is unchanged, torch.distributed itself untouched);
- the bytes each collective moves, counted from the tensors and split sizes given to it: bytes that
  cross to another rank, and bytes a rank sends itself (a copy in its own memory);
- the single-process layer (fastembed.torch.Embedding, same optimizer) on the ranks' batches
  concatenated in rank order, timed by rank 0 in the same rounds (while the others wait), and the ratio.

Optimizer: ``sparse=True`` with fastembed.torch.optim.SGD, what a user of a large table runs (a dense
gradient of a 1M x 64 table is 256 MB a step). Batches: a seed shape gives every rank its own batch of
the seed's size (weak scaling: W times the work of one seed batch); a wide shape's 64 x 1024 ids (the
ids of ``python -m bench``'s shape, ``bench.shapes.make_data``) are split over the ranks by sequences
(strong scaling: the same total work).
"""
import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import numpy as np

import fastembed as fe

from . import ranks, report, shapes
from .threads import read_back
from .timing import Plan
from .train import LR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
SHAPE_NAMES = ("seed-1x16", "seed-32x16", "wide-uniform", "wide-zipf")
OPTIMIZER = "sparse=True + fastembed.torch.optim.SGD"
SEED_PLAN = Plan(repeats=41, warmup=5)
BIG_PLAN = Plan(repeats=11, warmup=2)
QUICK_PLAN = Plan(repeats=2, min_repeats=1, warmup=1)
COLLECTIVE_TIMEOUT_S = 120  # a hung rank fails the others in this time instead of hanging them
# The collectives of one step, in the order fastembed.torch.distributed calls them (checked per call:
# phase, dtype and the headers' one row per rank; a call that does not fit is named by its position).
STAGES = (("forward", "header"), ("forward", "plan: ids"), ("forward", "rows"), ("backward", "backward header"),
          ("backward", "gradient rows"))
HEADER_BYTES = 8 * 8  # fastembed.torch.distributed._Header: 8 int64 per peer (counts, checks, what collective)


# ---------------------------------------------------------------- the batches

def rank_batches(shape, world):
    """[(ids, upstream gradient)] of each rank, int64 and float32.

    Seed shapes: rank r draws its own (B, T) batch as make_data draws ids (uniform over V), from the seed
    (SEED, r). Big shapes: make_data's (B, T) ids and gradient split by sequences (axis 0) into W parts
    of B // W or B // W + 1 sequences, in rank order; concatenated they are the main bench's batch.
    """
    if shape.big:
        data = shapes.make_data(shape)
        return list(zip(np.array_split(data.ids, world), np.array_split(data.grad_hidden, world)))
    out = []
    for rank in range(world):
        rng = np.random.default_rng([shapes.SEED, rank])
        size = (shape.batch, shape.seq)
        ids = rng.integers(0, shape.vocab, size=size, dtype=np.int64)
        out.append((ids, rng.standard_normal(size + (shape.dim,), dtype=np.float32)))
    return out


def per_rank_label(shape, world):
    """What each rank's batch is, for the table."""
    if shape.big:
        parts = {len(p) for p in np.array_split(np.arange(shape.batch), world)}
        return f"{'/'.join(str(p) for p in sorted(parts))} x {shape.seq} of one ({shape.batch}, {shape.seq}) batch"
    return f"own {shape.batch} x {shape.seq}"


# ---------------------------------------------------------------- in the rank processes

class Recorder:
    """all_to_all_single as torch.distributed's, recording each call: its phase (set by the step), the
    rows it sends to each rank, the bytes of a row, and the time the call took."""

    def __init__(self, dist):
        self.dist, self.phase, self.calls = dist, "", []

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        world = self.dist.get_world_size(group)
        if input_split_sizes is None or len(input_split_sizes) == 0:
            send = [input.shape[0] // world] * world
        else:
            send = [int(n) for n in input_split_sizes]
        t0 = time.perf_counter_ns()
        work = self.dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group,
                                           async_op=True)
        work.wait()  # timed to the end of the exchange, whether the caller waits or not
        ns = time.perf_counter_ns() - t0
        self.calls.append({"phase": self.phase, "dtype": str(input.dtype).replace("torch.", ""),
                           "row_bytes": input.element_size() * math.prod(input.shape[1:]),
                           "send_rows": send, "rank": self.dist.get_rank(group), "ns": ns})
        return work if async_op else None


class DistProxy:
    """torch.distributed with all_to_all_single replaced by a Recorder's: given to fastembed.torch.distributed
    as its ``dist``, so only its collectives are recorded (torch.distributed itself is not patched)."""

    def __init__(self, dist, recorder):
        self._dist, self.all_to_all_single = dist, recorder.all_to_all_single

    def __getattr__(self, name):
        return getattr(self._dist, name)


def _load(tmp, name, rank):
    return np.load(os.path.join(tmp, f"{name}-ids{rank}.npy")), np.load(os.path.join(tmp, f"{name}-grad{rank}.npy"))


def _baselines(torch, cfg, tmp, name):
    """Rank 0's single-process layers on every rank's batch concatenated: [(threads, step)]."""
    from fastembed.torch import Embedding
    from fastembed.torch.optim import SGD

    parts = [_load(tmp, name, r) for r in range(cfg["world"])]
    ids = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    grad = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    out = []
    for threads in cfg["baseline_threads"]:
        shape = cfg["shapes"][name]
        emb = Embedding(shape["vocab"], shape["dim"], sparse=True)
        opt = SGD(emb.parameters(), lr=LR)

        def step(emb=emb, opt=opt):
            emb(ids).backward(grad)
            opt.step()
            opt.zero_grad()

        out.append((threads, step))
    return out


def _timed(fn):
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


def _set_threads(torch, n):
    fe.set_num_threads(n)
    torch.set_num_threads(fe.get_num_threads())


def _run_shape(torch, dist, recorder, cfg, tmp, name, rank):
    """Warm-up and repeats of the sharded step on every rank, each step started by a barrier; on rank 0,
    one step of each baseline after each sharded step (rotated), while the others wait in the barrier."""
    from fastembed.torch.distributed import ShardedEmbedding
    from fastembed.torch.optim import SGD

    shape, plan = cfg["shapes"][name], Plan(**cfg["plans"][name])
    ids, grad = (torch.from_numpy(a) for a in _load(tmp, name, rank))
    torch.manual_seed(rank)
    emb = ShardedEmbedding(shape["vocab"], shape["dim"], sparse=True)
    opt = SGD(emb.parameters(), lr=LR)

    def step():
        recorder.phase = "forward"
        out = emb(ids)
        recorder.phase = "backward"
        out.backward(grad)
        recorder.phase = "optimizer"
        opt.step()
        opt.zero_grad()

    baselines = _baselines(torch, cfg, tmp, name) if rank == 0 else []
    result = {"step_ns": [], "collective_ns": [], "calls": None, "baseline_ns": {str(t): [] for t, _ in baselines}}
    for k in range(plan.warmup + plan.repeats):
        dist.barrier()
        recorder.calls = []
        t = _timed(step)
        calls = [{key: c[key] for key in c if key != "ns"} for c in recorder.calls]
        if result["calls"] is None:
            result["calls"] = calls
        elif calls != result["calls"]:  # the same batch every step: the same exchange
            raise RuntimeError(f"{name}: step {k} exchanged {calls}, the first step {result['calls']}")
        if k >= plan.warmup:
            result["step_ns"].append(t)
            result["collective_ns"].append(sum(c["ns"] for c in recorder.calls))
        for j in range(len(baselines)):
            threads, base = baselines[(j + k) % len(baselines)]
            _set_threads(torch, threads)
            t = _timed(base)
            if k >= plan.warmup:
                result["baseline_ns"][str(threads)].append(t)
        _set_threads(torch, cfg["rank_threads"])
    return result


def worker(rank, tmp):
    """One rank: train every shape of the config, write result<rank>.json."""
    import torch
    import torch.distributed as dist

    import fastembed.torch.distributed as fdist

    with open(os.path.join(tmp, "config.json")) as f:
        cfg = json.load(f)
    if not dist.is_available() or not dist.is_gloo_available():
        raise SystemExit("python -m bench.sharded needs torch.distributed with the gloo backend")
    _set_threads(torch, cfg["rank_threads"])
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=cfg["world"],
                            timeout=timedelta(seconds=cfg["timeout"]))
    recorder = Recorder(dist)
    fdist.dist = DistProxy(dist, recorder)
    out = {"rank": rank, "fastembed": fe.__file__, "fastembed_threads": fe.get_num_threads(),
           "torch_threads": torch.get_num_threads(), "shapes": {}}
    for name in cfg["shapes"]:
        out["shapes"][name] = _run_shape(torch, dist, recorder, cfg, tmp, name, rank)
    with open(os.path.join(tmp, f"result{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    # out without the interpreter's finalisation: gloo's worker thread can still hold the last reference
    # to the barrier, and freeing its tensors there while the process finalises aborts it ("terminate
    # called without an active exception"; see fastembed.torch.distributed._RECENT_WORK)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- the parent

def run_world(world, chosen, plans, args, cpus):
    """Start the W ranks on the chosen shapes; return their results (a list by rank)."""
    # As fastembed will run them (capped at the processors; 1 without OpenMP), so a column says what ran.
    rank_threads = read_back(fe.set_num_threads, fe.get_num_threads, max(1, cpus // world))
    baseline_threads = sorted({read_back(fe.set_num_threads, fe.get_num_threads, n) for n in (1, cpus)})
    with tempfile.TemporaryDirectory(prefix="fastembed-sharded-") as tmp:
        for shape in chosen:
            for rank, (ids, grad) in enumerate(rank_batches(shape, world)):
                np.save(os.path.join(tmp, f"{shape.name}-ids{rank}.npy"), ids)
                np.save(os.path.join(tmp, f"{shape.name}-grad{rank}.npy"), grad)
        cfg = {"world": world, "rank_threads": rank_threads, "baseline_threads": baseline_threads,
               "timeout": args.timeout,
               "shapes": {s.name: {"vocab": s.vocab, "dim": s.dim} for s in chosen},
               "plans": {s.name: vars(plans[s.name]) for s in chosen}}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        # -m from the repository root: the ranks import this bench/ and the fastembed beside it, as we do.
        done = ranks.run([[sys.executable, "-m", "bench.sharded", "--worker", str(rank), tmp] for rank in range(world)],
                         tmp, args.timeout * 4 + 60, env=ranks.env_with_path(ROOT), cwd=ROOT)
        failures = done.failures(expected=0, tail=4000)
        if failures:
            raise SystemExit(f"world {world}: the ranks failed:\n" + "\n".join(failures))
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"result{rank}.json")) as f:
                results.append(json.load(f))
    return results, rank_threads, baseline_threads


def stage_names(calls):
    """The name of each call of a step: STAGES where the calls fit them, else phase and position."""
    fits = (len(calls) == len(STAGES) and all(c["phase"] == p for c, (p, _) in zip(calls, STAGES))
            and all(calls[k]["dtype"] == "int64" and set(calls[k]["send_rows"]) == {1}
                    and calls[k]["row_bytes"] == HEADER_BYTES for k in (0, 3))
            and calls[1]["dtype"] == "int64")
    return [s for _, s in STAGES] if fits else [f"{c['phase']} call {k}" for k, c in enumerate(calls)]


def exchange_bytes(results, name):
    """Per stage of a step, summed over the ranks: rows sent, bytes crossing to another rank, bytes a rank
    sends itself. {stage: {"rows", "cross", "self"}}, in call order."""
    out = {}
    for res in results:
        calls = res["shapes"][name]["calls"]
        for stage, c in zip(stage_names(calls), calls):
            entry = out.setdefault(stage, {"rows": 0, "cross": 0, "self": 0})
            for dest, rows in enumerate(c["send_rows"]):
                entry["rows"] += rows
                entry["cross" if dest != c["rank"] else "self"] += rows * c["row_bytes"]
    return out


def distinct_per_owner(batches, num_rows):
    """n[r, o]: the distinct ids of rank r's batch that rank o owns (the rows r asks o for in a step)."""
    world = len(batches)
    bounds = fe.row_bounds(num_rows, world)
    n = np.zeros((world, world), dtype=np.int64)
    for r, (ids, _) in enumerate(batches):
        n[r] = np.bincount(np.searchsorted(bounds, np.unique(ids), side="right") - 1, minlength=world)
    return n


def projected_exchange(n, dim, itemsize=4, id_bytes=8):
    """A step's all_to_all_single traffic computed from n (distinct_per_owner): per stage {rows, cross, self}
    summed over the ranks as exchange_bytes reports it, and the bytes each rank sends and receives on its
    link (lists by rank, its own part excluded)."""
    world, row = len(n), dim * itemsize
    own = np.diag(n)
    ones = np.ones_like(n)
    stages = {"header": (ones, HEADER_BYTES), "plan: ids": (n, id_bytes), "rows": (n, row),
              "backward header": (ones, HEADER_BYTES), "gradient rows": (n, row)}
    if world == 1:  # a group of one makes no collective call
        stages = {}
    out = {stage: {"rows": int(m.sum()), "cross": int((m.sum() - np.trace(m)) * size), "self": int(np.trace(m) * size)}
           for stage, (m, size) in stages.items()}
    asks, served = n.sum(1) - own, n.sum(0) - own  # rows rank r asks of others, rows others ask of r
    headers = 2 * (world - 1) * HEADER_BYTES  # forward's and backward's, one row per peer
    sent = headers + asks * (id_bytes + row) + served * row  # ids and gradient rows out; rows served
    received = headers + served * (id_bytes + row) + asks * row
    return out, sent.tolist(), received.tolist()


def _median(xs):
    return statistics.median(xs) if xs else math.nan


def summarize(results, shape, world, rank_threads, batches):
    """One row of the step table (a dict, times in ns); batches: the ranks' (ids, grad)."""
    per = [r["shapes"][shape.name] for r in results]
    steps = list(zip(*(p["step_ns"] for p in per)))  # per step, each rank's time
    rank_step = [_median(p["step_ns"]) for p in per]
    rank_coll = [_median(p["collective_ns"]) for p in per]
    rank_local = [_median([s - c for s, c in zip(p["step_ns"], p["collective_ns"])]) for p in per]
    nbytes = exchange_bytes(results, shape.name)
    row = {"shape": shape.name, "world": world, "rank_threads": rank_threads, "optimizer": OPTIMIZER,
           "per_rank": per_rank_label(shape, world),
           "ids_total": shape.tokens if shape.big else world * shape.tokens,
           "step_ns": _median([max(s) for s in steps]), "rank_step_ns": rank_step, "rank_collective_ns": rank_coll,
           "rank_local_ns": rank_local, "repeats": len(steps),
           "bytes": nbytes, "cross_bytes": sum(v["cross"] for v in nbytes.values()),
           "self_bytes": sum(v["self"] for v in nbytes.values()),
           "baseline_ns": {t: _median(v) for t, v in per[0]["baseline_ns"].items()},
           "calls": [p["calls"] for p in per],
           "from_ids": projected_exchange(distinct_per_owner(batches, shape.vocab), shape.dim)[0]}
    row["vs_baseline"] = {t: row["step_ns"] / b for t, b in row["baseline_ns"].items()}
    return row


def _span(xs, fmt=report.fmt_time):
    lo, hi = min(xs), max(xs)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)} to {fmt(hi)}"


def _fmt_bytes(n):
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def step_table(rows, baseline_threads):
    """The time table: one line per shape and world size."""
    header = ["shape", "W", "ids per rank", "step (slowest rank)", "rank medians", "collective + wait",
              "local", "bytes crossing", "bytes to self"]
    header += [f"1 process, {t} thr" for t in baseline_threads] + [f"vs 1 process, {t} thr" for t in baseline_threads]
    lines = []
    for r in rows:
        line = [r["shape"], r["world"], r["per_rank"], report.fmt_time(r["step_ns"]), _span(r["rank_step_ns"]),
                _span(r["rank_collective_ns"]), _span(r["rank_local_ns"]), _fmt_bytes(r["cross_bytes"]),
                _fmt_bytes(r["self_bytes"])]
        line += [report.fmt_time(r["baseline_ns"].get(str(t), math.nan)) for t in baseline_threads]
        line += [report.fmt_ratio(r["vs_baseline"].get(str(t))) for t in baseline_threads]
        lines.append(line)
    return report.table(header, lines)


def bytes_table(rows):
    """The exchange of one step by stage, summed over the ranks."""
    lines = []
    for r in rows:
        for stage, b in r["bytes"].items():
            lines.append([r["shape"], r["world"], stage, f"{b['rows']:,}", _fmt_bytes(b["cross"]),
                          _fmt_bytes(b["self"])])
    return report.table(["shape", "W", "all_to_all_single", "rows sent (all ranks)", "bytes crossing",
                         "bytes to self"], lines)


def projection_rows(chosen, worlds, gbps):
    """For each shape and W: a step's traffic counted from the ids (as the ranks would split them), and the
    time the busiest rank's link needs for it at gbps (full duplex, at line rate, no latency)."""
    out = []
    for shape in chosen:
        for world in worlds:
            stages, sent, received = projected_exchange(distinct_per_owner(rank_batches(shape, world), shape.vocab),
                                                        shape.dim)
            out.append({"shape": shape.name, "world": world, "per_rank": per_rank_label(shape, world),
                        "cross_bytes": sum(v["cross"] for v in stages.values()), "sent": sent, "received": received,
                        "busiest_sent": max(sent), "busiest_received": max(received), "gbps": gbps,
                        "wire_ns": max(sent + received) / (gbps * 1e9 / 8) * 1e9})
    return out


def projection_table(rows):
    header = ["shape", "W", "ids per rank", "bytes crossing", "busiest rank sends", "busiest rank receives",
              "its link's time"]
    lines = [[r["shape"], r["world"], r["per_rank"], _fmt_bytes(r["cross_bytes"]), _fmt_bytes(r["busiest_sent"]),
              _fmt_bytes(r["busiest_received"]), f"{report.fmt_time(r['wire_ns'])} at {r['gbps']:g} Gb/s"]
             for r in rows]
    return report.table(header, lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.sharded", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=_ints, default=[2], help="world sizes, comma-separated (default: 2)")
    parser.add_argument("--shapes", type=lambda s: [n.strip() for n in s.split(",") if n.strip()],
                        default=list(SHAPE_NAMES), help=f"comma-separated, of {', '.join(SHAPE_NAMES)} (default: all)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="shrink the wide vocabulary and sequences by this factor, as python -m bench does")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per shape (default: 41 seed, 11 wide)")
    parser.add_argument("--quick", action="store_true", help="2 steps per shape: a smoke test, not a measurement")
    parser.add_argument("--timeout", type=int, default=COLLECTIVE_TIMEOUT_S,
                        help="seconds before a collective waiting for a dead rank fails "
                        f"(default {COLLECTIVE_TIMEOUT_S})")
    parser.add_argument("--project", type=_ints, default=[8],
                        help="world sizes whose traffic per step is counted from the ids, no processes (default: 8)")
    parser.add_argument("--gbps", type=float, default=25.0, help="link speed for the projection (default: 25 Gb/s)")
    parser.add_argument("--output", default=RESULTS_DIR, help=f"directory for the JSON (default: {RESULTS_DIR})")
    parser.add_argument("--no-json", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    unknown = [n for n in args.shapes if n not in SHAPE_NAMES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; known: {list(SHAPE_NAMES)}")
    if any(w < 1 for w in args.world + args.project):
        parser.error(f"--world and --project must be >= 1, got {args.world} and {args.project}")
    if not args.gbps > 0:
        parser.error(f"--gbps must be > 0, got {args.gbps}")
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def _ints(text):
    return [int(n) for n in text.split(",") if n.strip()]


def plan_for(shape, args):
    plan = QUICK_PLAN if args.quick else (BIG_PLAN if shape.big else SEED_PLAN)
    if args.repeats is not None:
        plan = Plan(**{**vars(plan), "repeats": args.repeats})
    return plan


def main(argv=None):
    args = parse_args(argv)
    # torch is imported by the ranks only (3 s here would be 3 s more per run): the ranks check gloo.
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("python -m bench.sharded needs PyTorch (`pip install torch`); python -m bench does not")
    chosen = shapes.select(args.shapes, scale=args.scale)
    plans = {s.name: plan_for(s, args) for s in chosen}
    cpus = report.usable_cpus()
    env = report.environment(cpus, None, 0.0)
    env.pop("timer_loop_overhead_ns")
    env["torch"] = importlib.metadata.version("torch")
    started, rows, notes, thread_counts = time.perf_counter(), [], [], set()
    for world in args.world:
        results, rank_threads, baseline_threads = run_world(world, chosen, plans, args, cpus)
        thread_counts.update(baseline_threads)
        rows += [summarize(results, s, world, rank_threads, rank_batches(s, world)) for s in chosen]
        mismatch = [r["shape"] for r in rows[-len(chosen):] if r["bytes"] != r["from_ids"]]
        if mismatch:
            notes.append(f"world {world}: the bytes recorded at the collectives differ from the count from the ids "
                         f"on {mismatch}: the projection below does not describe this build")
        imported = {r["fastembed"] for r in results}
        if imported != {fe.__file__}:
            notes.append(f"world {world}: the ranks imported fastembed from {sorted(imported)}, not {fe.__file__}")
        if world * rank_threads > cpus:
            notes.append(f"world {world} on {cpus} usable CPUs is OVERSUBSCRIBED: {world} processes of "
                         f"{rank_threads} thread share {cpus} cores, so a rank waits for the CPU as well as for "
                         f"the others; these times are not what {world} machines would give")
        else:
            notes.append(f"world {world}: {world} process{'es' if world > 1 else ''} of {rank_threads} thread(s) "
                         f"on {cpus} usable CPUs")
    env["seconds"] = round(time.perf_counter() - started, 1)
    env["load_average_end"] = report.load_average()
    busy = report.busy_note(env)
    if busy:
        notes.append(busy)
    baseline_threads = sorted(thread_counts)
    projected = projection_rows(chosen, args.project, args.gbps)
    notes += [
        f"optimizer: {OPTIMIZER} (lr {LR}) for the sharded table and for the single process "
        "(fastembed.torch.Embedding(sparse=True)); a step is forward, backward, opt.step(), opt.zero_grad()",
        "step: each step starts with a barrier on every rank (untimed); the step's time is its slowest rank's, "
        "the median over the repeats; `rank medians`: the spread of each rank's own median",
        "collective + wait: the time inside torch.distributed.all_to_all_single (5 calls a step: the forward's "
        "header (counts and checks) and ids, the rows, the backward's header, the gradient rows), which "
        "includes waiting for the slowest rank; local: the "
        "rest of the step (exchange_plan, gathers, the gradient sums, the optimizer, Python); ranges are the "
        "ranks' medians",
        "bytes: the rows handed to all_to_all_single times their bytes, summed over the ranks, for one step; "
        "`to self` is a rank's part for itself (a copy in its own memory, never on a wire; a group of one "
        "rank makes no collective call). The processes talk "
        "through gloo over loopback TCP on one machine: the collectives' times are copies and socket calls, not "
        "a network",
        "1 process: fastembed.torch.Embedding on the ranks' batches concatenated in rank order (the same total "
        "work), timed by rank 0 between the sharded steps while the other ranks wait; `vs`: sharded step / "
        "1-process step (above 1: slower)",
        "seed shapes: each rank its own batch of the seed's size (W times the work); wide shapes: the main "
        "bench's ids split over the ranks by sequences (the same work at every W)",
        "traffic counted from the ids: each rank asks each owner once per distinct id (8 B), the owner sends "
        "the row back and the rank sends its gradient row (D x 4 B each), plus 2 (W - 1) headers of 64 B; equal to "
        "what the collectives were given at the measured W (checked each run and by tests/test_bench_sharded.py). "
        "`its link's time`: the busiest rank's larger direction at line rate (full duplex), no latency, no "
        "protocol overhead: a lower bound of the wire time per step",
    ]
    if args.scale != 1.0:
        shrunk = ", ".join(s.label() for s in chosen if s.big)
        notes.append(f"--scale {args.scale}: the wide shapes are shrunk ({shrunk})")
    if args.quick:
        notes.append("--quick: 2 steps per shape, for tests; the times are not measurements")
    text = "\n\n".join([
        "## fastembed sharded benchmark (ShardedEmbedding over torch.distributed, gloo)",
        "\n".join(f"- {k}: {env.get(k)}" for k in ("python", "numpy", "torch", "fastembed", "cpus_usable", "cpu_model",
                                                  "load_average", "load_average_end", "seconds")),
        "### step time per shape and world size",
        step_table(rows, baseline_threads),
        "### bytes exchanged per step",
        bytes_table(rows),
        f"### traffic per step at W = {', '.join(map(str, args.project))}, counted from the ids (no processes)",
        projection_table(projected),
        "### notes",
        "\n".join(f"- {n}" for n in notes),
    ]) + "\n"
    if not args.no_json:
        os.makedirs(args.output, exist_ok=True)
        path = os.path.join(args.output, "sharded-" + time.strftime("%Y%m%d-%H%M%S") + ".json")
        doc = {"environment": env, "args": vars(args), "rows": rows, "projected": projected, "notes": notes,
               "shapes": [{"name": s.name, "vocab": s.vocab, "dim": s.dim, "ids_shape": [s.batch, s.seq],
                           "ids": s.ids} for s in chosen]}
        with open(path, "w") as f:
            json.dump(report._clean(doc), f, indent=1)
        text += f"- json: {path}\n"
    print(text, end="")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(main())
