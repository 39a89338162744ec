"""A ShardedEmbedding whose group loses a rank: the survivors raise CollectiveError, never hang.

Each scenario starts a world of 2 processes (gloo, a file:// rendezvous in tmp_path); the table's
process group has a short timeout. Both ranks first train one step together (a true 2-process world, checked
against one torch.nn.Embedding); then rank 1 fails in the scenario's way while rank 0 looks up, and
rank 0 writes what it caught and how long it took. The parent asserts; it also kills whatever is left.
"""
import os
import time
from datetime import timedelta

import pytest

from _helpers import rank_argv, require_gloo, run_ranks

torch, dist = require_gloo()

GROUP_TIMEOUT = 4.0  # seconds: the process group's timeout, which a hung peer must trip
JOIN_TIMEOUT = 120.0  # the parent's wait for rank 0 (torch's import included, on a busy machine)
V, D = 9, 3
TABLE = torch.arange(V * D, dtype=torch.float32).reshape(V, D) / 10
BATCHES = [torch.tensor([0, 8, 4, 4]), torch.tensor([[5, 0], [1, 8]])]


def _child(rank, tmp, scenario):
    from fastembed.torch.distributed import CollectiveError, ShardedEmbedding

    torch.set_num_threads(1)
    # The rendezvous and the first step may take long on a busy machine (a slow import on one rank): the
    # default group waits 60 s; the table's own group has the short timeout a lost peer must trip.
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    group = dist.new_group([0, 1], timeout=timedelta(seconds=GROUP_TIMEOUT))
    emb = ShardedEmbedding(V, D, group, _weight=TABLE)
    out = emb(BATCHES[rank])
    out.backward(torch.ones_like(out))
    torch.save({"rows": out.detach(), "grad": emb.weight.grad}, f"{tmp}/step{rank}.pt")
    dist.barrier(group)
    if rank == 1:
        if scenario == "dies":
            os._exit(3)  # no clean-up: the connection closes as the process goes
        time.sleep(10 * GROUP_TIMEOUT)  # "hangs": alive, never reaches the lookup
        os._exit(0)
    start = time.monotonic()
    try:
        emb(torch.tensor([1, 7]))
        caught = None
    except CollectiveError as exc:
        caught = str(exc)
    except Exception as exc:  # noqa: BLE001  (any other type is the test's failure, reported by the parent)
        caught = f"{type(exc).__name__}: {exc}"
    torch.save({"caught": caught, "seconds": time.monotonic() - start}, f"{tmp}/fault.pt")
    os._exit(0)  # the group is broken: no destroy_process_group, which would wait on the dead peer


def _run(tmp, scenario):
    # only rank 0 is waited for: rank 1 is the one that hangs (killed then) or dies; what it caught is the check
    done = run_ranks(__file__, 2, tmp, JOIN_TIMEOUT, scenario, expected=None, wait_for=[0])
    logs = "\n".join(f"rank {r}: " + done.log(r, 3000) for r in range(2))
    assert (tmp / "fault.pt").exists(), f"rank 0 never finished its lookup (it hung):\n{logs}"
    return torch.load(tmp / "fault.pt"), [torch.load(tmp / f"step{r}.pt") for r in range(2)], logs


def _check_first_step(steps):
    oracle = torch.nn.Embedding(V, D, _weight=TABLE.clone())
    out = oracle(torch.cat([b.reshape(-1) for b in BATCHES]))
    out.backward(torch.ones_like(out))
    rows = out.detach().split([b.numel() for b in BATCHES])
    for rank, step in enumerate(steps):
        assert torch.equal(step["rows"].reshape(-1, D), rows[rank])
    # the counts of each id are small integers: any order of addition gives these bits
    assert torch.equal(torch.cat([s["grad"] for s in steps]), oracle.weight.grad)


@pytest.mark.parametrize("scenario", ["dies", "hangs"])
def test_a_lost_rank_is_an_error_not_a_hang(tmp_path, scenario):
    fault, steps, logs = _run(tmp_path, scenario)
    _check_first_step(steps)
    assert fault["caught"] is not None, f"the lookup returned with rank 1 {scenario}:\n{logs}"
    assert "all-to-all of a lookup (forward) header failed" in fault["caught"], fault["caught"]
    assert "rank 0 of 2" in fault["caught"]
    assert fault["caught"].rsplit("(init_process_group(timeout=...)): ", 1)[1].strip(), fault  # gloo's own words
    # a hung peer trips the group's timeout; a dead one may be noticed sooner (its connection closes).
    # The bound is loose (a busy machine) but far below a hang: the parent waits JOIN_TIMEOUT.
    assert fault["seconds"] < GROUP_TIMEOUT + 30, fault
    if scenario == "hangs":
        assert fault["seconds"] >= GROUP_TIMEOUT * 0.9, fault  # it waited for the timeout, not less


if __name__ == "__main__":
    _child(*rank_argv())
