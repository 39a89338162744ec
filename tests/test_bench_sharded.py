"""`python -m bench.sharded` runs 2 ranks end to end in quick mode, and its exchange counts are right.

Never timing: the bytes the harness records from the calls to all_to_all_single in the rank processes
are checked against a count made here from the ranks' ids alone (the distinct ids of each (rank, owner)
pair, the owners from the row split the docs state, not from fastembed), and the printed tables against
the JSON. Skipped without torch's gloo backend or where bench/ is not beside tests/.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from _helpers import ROOT, require_gloo

if not os.path.isfile(os.path.join(ROOT, "bench", "sharded.py")):
    pytest.skip("bench/ is not beside tests/ (a copy of the tests alone)", allow_module_level=True)
require_gloo()

from bench import ranks, shapes, sharded  # noqa: E402

WORLD, SCALE = 2, 0.01
SHAPES = ("seed-32x16", "wide-zipf")  # V = 597 (odd: blocks of 299 and 298) and 10,000; both repeat ids
STAGES = ("header", "plan: ids", "rows", "backward header", "gradient rows")
HEADER = 8 * 8  # a ShardedEmbedding header: 8 int64 per peer (test_header_size_is_the_benchs says if it changes)


def owners(ids, num_rows, world):
    """The rank owning each id: contiguous blocks, the first num_rows % world one row longer."""
    base, extra = divmod(num_rows, world)
    stops = np.cumsum([base + (r < extra) for r in range(world)])
    return np.searchsorted(stops, ids, side="right")


def expected_calls(batches, num_rows, dim, world):
    """Per rank, the five all_to_all_single calls of a step as (phase, dtype, bytes per row, rows sent to
    each rank): n[r][o] distinct ids of rank r owned by o; r sends every rank a header row in forward and
    in backward, and o its n[r][o] local row numbers (int64) and gradient rows, and o sends r those rows."""
    n = np.zeros((world, world), dtype=np.int64)
    for r, (ids, _) in enumerate(batches):
        distinct = np.unique(ids)
        n[r] = np.bincount(owners(distinct, num_rows, world), minlength=world)
    row = dim * 4
    return [[("forward", "int64", HEADER, [1] * world), ("forward", "int64", 8, n[r].tolist()),
             ("forward", "float32", row, n[:, r].tolist()), ("backward", "int64", HEADER, [1] * world),
             ("backward", "float32", row, n[r].tolist())]
            for r in range(world)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded-bench")
    cmd = [sys.executable, "-m", "bench.sharded", "--world", str(WORLD), "--quick", "--scale", str(SCALE),
           "--shapes", ",".join(SHAPES), "--output", str(out), "--timeout", "60", "--project", f"{WORLD},8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    files = list(out.glob("sharded-*.json"))
    assert len(files) == 1, files
    return proc.stdout, json.loads(files[0].read_text())


def _shape(name):
    return shapes.select([name], scale=SCALE)[0]


def table_lines(text, title):
    """The cells of each body line of the markdown table under the heading title."""
    section = text.split(f"### {title}")[1].split("###")[0]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
             if line.startswith("|")]
    return cells[2:]  # past the header and the --- line


def test_recorded_exchange_equals_the_count_from_the_ids(run):
    _, doc = run
    rows = {(r["shape"], r["world"]): r for r in doc["rows"]}
    assert set(rows) == {(name, WORLD) for name in SHAPES}
    for name in SHAPES:
        shape, row = _shape(name), rows[(name, WORLD)]
        want = expected_calls(sharded.rank_batches(shape, WORLD), shape.vocab, shape.dim, WORLD)
        got = [[(c["phase"], c["dtype"], c["row_bytes"], c["send_rows"]) for c in calls] for calls in row["calls"]]
        assert got == want, name
        assert [[c["rank"] for c in calls] for calls in row["calls"]] == [[r] * len(STAGES) for r in range(WORLD)]
        # the per-stage sums of the table: crossing = sent to another rank, self = sent to oneself
        for k, stage in enumerate(STAGES):
            cross = sum(calls[k][2] * n for r, calls in enumerate(want) for o, n in enumerate(calls[k][3]) if o != r)
            own = sum(calls[k][2] * calls[k][3][r] for r, calls in enumerate(want))
            rows_sent = sum(sum(calls[k][3]) for calls in want)
            assert row["bytes"][stage] == {"rows": rows_sent, "cross": cross, "self": own}, (name, stage)
        assert row["cross_bytes"] == sum(v["cross"] for v in row["bytes"].values())
        assert row["self_bytes"] == sum(v["self"] for v in row["bytes"].values())
        # each stage moves something both ways (the ids repeat, yet every rank asks every owner)
        assert all(v["cross"] > 0 and v["self"] > 0 for v in row["bytes"].values())


def test_projection_from_the_ids_equals_the_recorded_exchange(run):
    # The traffic the bench projects to other world sizes (counted from the ids, no processes), at the
    # measured W: the recorded calls' per-stage sums, and the busiest rank's bytes on its link.
    _, doc = run
    for row in doc["rows"]:
        assert row["from_ids"] == row["bytes"], row["shape"]
        sent, received = [0] * WORLD, [0] * WORLD
        for r, calls in enumerate(row["calls"]):
            for c in calls:
                for dest, n in enumerate(c["send_rows"]):
                    if dest != r:
                        sent[r] += n * c["row_bytes"]
                        received[dest] += n * c["row_bytes"]
        (proj,) = [p for p in doc["projected"] if (p["shape"], p["world"]) == (row["shape"], WORLD)]
        assert (proj["sent"], proj["received"]) == (sent, received), row["shape"]
        assert (proj["busiest_sent"], proj["busiest_received"]) == (max(sent), max(received))
        assert proj["cross_bytes"] == row["cross_bytes"] == sum(sent)
        assert proj["wire_ns"] == max(sent) / (25e9 / 8) * 1e9
    assert sorted((p["shape"], p["world"]) for p in doc["projected"]) == sorted(
        (name, w) for name in SHAPES for w in (WORLD, 8))


def test_tables_name_every_shape_stage_and_baseline(run):
    text, doc = run
    steps = table_lines(text, "step time per shape and world size")
    assert [(line[0], line[1]) for line in steps] == [(name, str(WORLD)) for name in SHAPES]
    header = text.split("### step time per shape and world size")[1].split("\n")[2]
    for column in ("collective + wait", "local", "bytes crossing", "1 process, 1 thr", "vs 1 process, 1 thr"):
        assert f" {column} |" in header
    by_shape = {r["shape"]: r for r in doc["rows"]}
    for line in steps:
        row = by_shape[line[0]]
        assert line[7] == sharded._fmt_bytes(row["cross_bytes"]) and line[8] == sharded._fmt_bytes(row["self_bytes"])
        assert row["repeats"] == sharded.QUICK_PLAN.repeats
        assert len(row["rank_step_ns"]) == WORLD and all(t > 0 for t in row["rank_step_ns"])
        assert set(row["baseline_ns"]) >= {"1"} and all(t > 0 for t in row["baseline_ns"].values())
    exchange = table_lines(text, "bytes exchanged per step")
    assert [(line[0], line[2]) for line in exchange] == [(name, stage) for name in SHAPES for stage in STAGES]
    for line in exchange:
        b = by_shape[line[0]]["bytes"][line[2]]
        assert line[3:] == [f"{b['rows']:,}", sharded._fmt_bytes(b["cross"]), sharded._fmt_bytes(b["self"])]
    assert "sparse=True + fastembed.torch.optim.SGD" in text
    projected = table_lines(text, f"traffic per step at W = {WORLD}, 8")
    assert [(line[0], line[1]) for line in projected] == [(name, str(w)) for name in SHAPES for w in (WORLD, 8)]


def test_rank_batches_split_the_bench_batch_or_draw_one_per_rank():
    wide = _shape("wide-uniform")
    parts = sharded.rank_batches(wide, 4)
    data = shapes.make_data(wide)
    assert [p[0].shape for p in parts] == [(16, wide.seq)] * 4
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), data.ids)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), data.grad_hidden)
    seed = _shape("seed-32x16")
    a, b = sharded.rank_batches(seed, 2)
    assert a[0].shape == b[0].shape == (32, 16) and a[1].shape == (32, 16, 32)
    assert not np.array_equal(a[0], b[0])  # each rank its own batch
    np.testing.assert_array_equal(sharded.rank_batches(seed, 3)[1][0], b[0])  # rank r's batch whatever W
    assert a[0].min() >= 0 and a[0].max() < seed.vocab


def test_owners_oracle_matches_the_documented_split():
    # the test's own owner rule against the README's: 10 rows over 4 ranks are blocks of 3, 3, 2, 2
    assert owners(np.arange(10), 10, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]


def test_header_size_is_the_benchs():
    # The bench names the calls and counts their bytes with the header's size; a header that grows a
    # field makes the counts above fail: this says where to look.
    from fastembed.torch.distributed import _Header

    assert _Header.FIELDS * 8 == HEADER == sharded.HEADER_BYTES, "update bench.sharded.HEADER_BYTES and HEADER here"


# ---------------------------------------------------------------- bench/ranks.py, the sharded tests' and bench's launcher

# A rank that starts a process of its own, says both pids (written whole: the test polls for the file),
# prints a line to its log and sleeps.
SLEEPER = ("import os, subprocess, sys, time\n"
           "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
           "with open(sys.argv[1] + '.tmp', 'w') as f:\n"
           "    f.write(f'{os.getpid()} {child.pid}')\n"
           "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
           "print('sleeping', flush=True)\n"
           "time.sleep(300)\n")
# A rank that starts a process in its own group (the rank leads it), says its pid and exits, leaving it
# running (as a rank's data-loader worker or a server it spawned might be left).
LEAVES_A_CHILD = ("import os, subprocess, sys\n"
                  "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                  "assert os.getpgid(child.pid) == os.getpid()\n"
                  "with open(sys.argv[1], 'w') as f:\n"
                  "    f.write(str(child.pid))\n")
WAIT_FOR_FILE = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.05)\n"
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc")


def _running(pid):
    """pid is a process that has not exited (a zombie has: nobody may reap it here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pid, within=30.0):
    deadline = time.monotonic() + within
    while _running(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # (not left running after the test)
            return False
        time.sleep(0.05)
    return True


def _pids(path):
    return [int(p) for p in path.read_text().split()]


@needs_proc
def test_ranks_past_the_deadline_are_killed_with_what_they_started(tmp_path):
    pids = tmp_path / "pids"
    code = "import sys; print('boom', flush=True); sys.exit(3)"
    done = ranks.run([[sys.executable, "-c", SLEEPER, str(pids)], [sys.executable, "-c", code]], str(tmp_path / "logs"),
                     20.0)
    assert done.late == [0] and done.returncodes == [-signal.SIGKILL, 3], done
    rank, child = _pids(pids)
    assert [_gone(rank), _gone(child)] == [True, True], "a rank past the deadline, or a process it started, runs on"
    late, bad = done.failures(expected=0, tail=100)
    assert late.startswith("rank 0 still running after 20.0 s (killed); its log ends:\n"), late
    assert late.endswith("sleeping\n"), late
    assert bad == "rank 1 exited with 3, not 0; its log ends:\nboom\n"
    assert done.failures(expected={1: 3}) == [done.failures()[0]]  # a late rank is a failure whatever its status


@needs_proc
def test_what_an_exited_rank_started_goes_with_its_group(tmp_path):
    """The rank is gone before the wait ends, and with it the launcher's handle on its child (now
    init's): only the kill of the rank's process group reaches the child."""
    pid = tmp_path / "pid"
    done = ranks.run([[sys.executable, "-c", LEAVES_A_CHILD, str(pid)]], str(tmp_path), 60.0)
    assert done.late == [] and done.returncodes == [0], done.failures()
    # the kill is sent before run returns; the poll only waits for the signal to land (no fixed sleep)
    assert _gone(int(pid.read_text()), within=10.0), "a process started by a rank that had exited runs on"


@needs_proc
def test_only_the_ranks_waited_for_are_waited_for(tmp_path):
    pids = tmp_path / "pids"
    start = time.monotonic()
    done = ranks.run([[sys.executable, "-c", WAIT_FOR_FILE, str(pids)], [sys.executable, "-c", SLEEPER, str(pids)]],
                     str(tmp_path), 100.0, wait_for=[0])
    assert time.monotonic() - start < 80, "the launcher waited for rank 1 (it sleeps 300 s)"
    assert done.late == [] and done.returncodes == [0, -signal.SIGKILL] and done.failures(expected={0: 0}) == []
    assert [_gone(pid) for pid in _pids(pids)] == [True, True]  # (each checked, and killed if it runs)


class _Stop(Exception):
    pass


@needs_proc
def test_an_interrupted_wait_kills_the_ranks(tmp_path):
    pids = tmp_path / "pids"

    def stop_once_started(signum, frame):
        if pids.exists():
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise _Stop

    old = signal.signal(signal.SIGALRM, stop_once_started)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)
        with pytest.raises(_Stop):
            ranks.run([[sys.executable, "-c", SLEEPER, str(pids)]], str(tmp_path), 250.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert [_gone(pid) for pid in _pids(pids)] == [True, True]  # (each checked, and killed if it runs)


@needs_proc
@pytest.mark.skipif(ranks._PRCTL is None, reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_die_with_a_launcher_that_is_killed(tmp_path):
    """A launcher (the bench) whose ranks run in sessions of their own, killed by its own launcher (a test at
    its deadline): its ranks go with it, though no signal to its process group reaches them."""
    pids = tmp_path / "pids"
    inner = ("import sys\nfrom bench import ranks\n"
             "ranks.run([[sys.executable, '-c', sys.argv[1], sys.argv[2]]], sys.argv[3], 250.0)\n")
    done = ranks.run([[sys.executable, "-c", inner, SLEEPER, str(pids), str(tmp_path / "inner")],
                      [sys.executable, "-c", WAIT_FOR_FILE, str(pids)]], str(tmp_path / "outer"), 250.0,
                     env=ranks.env_with_path(ROOT), wait_for=[1])
    rank, child = _pids(pids)
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGKILL)  # (the rank's own child: its group, which no one killed, is left to us)
    assert done.returncodes == [-signal.SIGKILL, 0], done
    assert _gone(rank), "the killed launcher's rank still runs"
