"""Start the ranks of a job as processes on this machine, wait for them with a deadline, and read their logs.

One helper for ``bench.sharded`` and the multi-process tests (tests/test_sharded_embedding.py,
test_sharded_checkpoint.py, test_sharded_faults.py), which start W ranks as scripts that meet in
torch.distributed through a file:// rendezvous of their own (the ranks' business, not this module's).
Standard library only: importing it costs nothing, and a stage without torch or numpy may import it.

``run(commands, log_dir, timeout)`` starts one process per command (rank r's stdout and stderr in
``log_dir/log<r>.txt``), each in a session of its own, waits until every rank it waits for has exited or
``timeout`` seconds have passed since the start, then kills every rank still running with SIGKILL sent to
its whole process group (anything a rank started goes with it). The same happens if the wait is
interrupted (an exception, Ctrl-C): no rank outlives the call. On Linux each rank also gets SIGKILL if the
launching process dies (``PR_SET_PDEATHSIG``), so ranks started by a launcher that is itself killed (the
bench's ranks when a test kills the bench at its deadline) do not run on, orphaned.
"""
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

__all__ = ["Ranks", "run", "env_with_path"]


def env_with_path(first, env=None):
    """``env`` (default os.environ) with ``first`` first on PYTHONPATH: the ranks import what the parent
    imports (the worktree's fastembed, this bench/), not another installed copy."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [first, env.get("PYTHONPATH")]))
    return env


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None


# Resolved here, not in the child between fork and exec, where it must import nothing (another
# thread of the parent may have held the import lock at the fork).
_PRCTL = _prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    """In the child, before exec: SIGKILL when the parent (the thread that started it) dies."""
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill_group(proc):
    # The group goes even when its leader, the rank, has exited: what the rank started dies with it.
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)  # the rank leads its own group (start_new_session)
        elif proc.poll() is None:
            proc.kill()
    except (ProcessLookupError, PermissionError):  # nothing of the group is left
        pass
    proc.wait()


@dataclass
class Ranks:
    """What the ranks of one run left: exit statuses (negative: killed by that signal) and logs."""

    log_dir: str
    returncodes: list
    late: list  # the ranks waited for that were still running at the deadline (killed)
    timeout: float

    def log(self, rank, tail=None):
        """Rank r's stdout and stderr (the last ``tail`` characters)."""
        with open(os.path.join(self.log_dir, f"log{rank}.txt"), errors="replace") as f:
            text = f.read()
        return text if tail is None else text[-tail:]

    def failures(self, expected=0, tail=6000):
        """One message per rank that was late or exited with another status than ``expected`` (a status
        for every rank, or {rank: status} for the ranks to check), each with the end of its log; [] if none."""
        expect = expected if isinstance(expected, dict) else dict.fromkeys(range(len(self.returncodes)), expected)
        out = []
        for rank, code in enumerate(self.returncodes):
            if rank in self.late:
                out.append(f"rank {rank} still running after {self.timeout} s (killed); its log ends:\n"
                           + self.log(rank, tail))
            elif rank in expect and code != expect[rank]:
                out.append(f"rank {rank} exited with {code}, not {expect[rank]}; its log ends:\n"
                           + self.log(rank, tail))
        return out


def run(commands, log_dir, timeout, *, env=None, cwd=None, wait_for=None):
    """Run one process per command (an argv list) and return a `Ranks` once the ranks in ``wait_for``
    (default: all) have exited or ``timeout`` seconds have passed; every rank still running then is
    killed with its process group."""
    os.makedirs(log_dir, exist_ok=True)
    wait_for = range(len(commands)) if wait_for is None else wait_for
    pre = None if _PRCTL is None else _die_with_parent
    procs, late = [], []
    try:
        for rank, argv in enumerate(commands):
            with open(os.path.join(log_dir, f"log{rank}.txt"), "w") as log:
                procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=pre))
        deadline = time.monotonic() + timeout
        for rank in wait_for:
            try:
                procs[rank].wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                late.append(rank)
    finally:
        for proc in procs:
            _kill_group(proc)
    return Ranks(log_dir, [p.returncode for p in procs], late, timeout)
