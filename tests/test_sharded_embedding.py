"""fastembed.torch.distributed.ShardedEmbedding on real process groups: 4 processes on this
machine (gloo over a file:// rendezvous in tmp_path, no ports), which run every case on the whole
group (4 ranks), on the ranks {0, 1} and on the ranks {1, 3} (groups of 2 whose group ranks are not
the global ranks). The processes are started once for the whole file; each case's inputs are written by
the parent and its results read back from files, and every assertion runs in the parent.

The oracle is one torch.nn.Embedding (not fastembed) holding the whole table, run on the ranks' batches
concatenated in group-rank order: each rank's rows are bitwise its slice of the oracle's output; the
ranks' block gradients, concatenated in rank order, are the oracle's gradient: bitwise where no id
repeats within a rank's batch (a row's additions then happen in the same order; for a sparse gradient,
whose entries torch sums in its own order, where no id repeats at all), else within a bound on the
rounding of the table's dtype (`_rounding_bound`), since a rank sums its duplicates before sending them.
The same holds for the tables after one torch.optim.SGD step.
"""
import os
import subprocess
import sys
import time
from datetime import timedelta

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

WORLD = 4
GROUPS = {"world": [0, 1, 2, 3], "pair01": [0, 1], "pair13": [1, 3]}
JOIN_TIMEOUT = 150.0  # seconds for the whole group, torch's import included, on a busy machine
COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a hung collective fails the child before the join times out
LR = 0.5


def _case(name, group, num_embeddings, dim, dtype, id_dtype, *lookups, padding_idx=None, sparse=False, seed=0):
    """One scenario: a random table and its lookups (usually one; more are made before one backward
    through all of them), each a list of the members' batches in group-rank order, with their gradients."""
    gen = torch.Generator().manual_seed(seed)
    case = {"name": name, "group": group, "V": num_embeddings, "D": dim, "padding_idx": padding_idx,
            "sparse": sparse, "table": torch.randn(num_embeddings, dim, generator=gen, dtype=torch.float64).to(dtype),
            "lookups": []}
    for batches in lookups:
        batches = [torch.as_tensor(np.asarray(b, dtype=np.int64)).to(id_dtype) for b in batches]
        assert len(batches) == len(GROUPS[group])
        grads = [torch.randn(tuple(b.shape) + (dim,), generator=gen, dtype=torch.float64).to(dtype) for b in batches]
        case["lookups"].append((batches, grads))
    return case


def _random_batches(seed, num_embeddings, members, most):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, num_embeddings, size=rng.integers(0, most)) for _ in range(members)]


CASES = [
    # duplicates within and across ranks, an empty batch, ids of 1, 2 and 3 axes, V % W != 0
    _case("dups_w4", "world", 11, 3, torch.float32, torch.int64,
          [[[3, 3, 7], [0, 10, 3]], np.zeros(0), [10, 10, 10, 1, 5], [[[7, 2]], [[9, 7]]]], seed=1),
    # no id repeats within a rank's batch (some do across ranks): bitwise gradients; int32 ids
    _case("distinct_w4", "world", 11, 5, torch.float64, torch.int32,
          [[0, 4, 8, 10], [10, 4, 1], [[6, 0], [2, 9]], [5]], padding_idx=4, seed=2),
    _case("distinct_w4_f32", "world", 11, 4, torch.float32, torch.int64,
          [[0, 3, 8, 10], [10, 3, 1, 7], [6, 0, 2, 9], [5, 7, 8]], seed=3),
    _case("sparse_dups_w4", "world", 13, 2, torch.float32, torch.int32,
          [[6, 6, 1, 12, 1], [12, 0, 0], np.zeros((2, 0)), [3, 6, 12, 9, 9, 9]], padding_idx=6, sparse=True,
          seed=4),
    # no id repeats anywhere: the sparse gradients' sums are bitwise too
    _case("sparse_distinct_w4", "world", 10, 3, torch.float64, torch.int64,
          [[9, 0], [1, 8, 4], [5], [2, 7, 3, 6]], sparse=True, seed=5),
    # fewer rows than ranks: the last rank holds no rows
    _case("rows_lt_ranks", "world", 3, 2, torch.float32, torch.int64, [[2, 2], [0], [1, 0], np.zeros(0)], seed=6),
    _case("bad_ids", "world", 11, 2, torch.float32, torch.int32, seed=7),
    _case("random_w4", "world", 1001, 8, torch.float32, torch.int64, _random_batches(8, 1001, 4, 400),
          padding_idx=17, seed=8),
    _case("f16_dups_w4", "world", 11, 3, torch.float16, torch.int64,
          [[5, 5, 0, 10], [10, 2], [0, 0, 0], [[7, 5], [5, 3]]], seed=12),
    _case("f16_sparse_distinct_w4", "world", 9, 2, torch.float16, torch.int32,
          [[8, 1], [0], [4, 6, 2], [3, 5, 7]], sparse=True, seed=13),
    # two lookups of one table before one backward: each keeps its own exchange
    _case("two_lookups_w4", "world", 11, 3, torch.float32, torch.int64,
          [[1, 2], [3, 4, 4], [10], np.zeros(0)], [[9, 1, 6], np.zeros(0), [2, 0, 7], [[5], [10]]],
          padding_idx=0, seed=14),
    _case("pair01_dense", "pair01", 7, 4, torch.float32, torch.int64, [[6, 6, 0, 3], [[3, 5], [5, 6]]],
          padding_idx=-1, seed=9),
    _case("pair13_sparse", "pair13", 5, 3, torch.float64, torch.int32, [[4, 4, 0, 1], np.zeros(0)], sparse=True,
          seed=10),
    _case("pair13_distinct", "pair13", 9, 2, torch.float32, torch.int32, [[8, 0, 4], [4, 1, 8, 7]], seed=11),
]
# (the rank of "bad_ids", its bad batches): the rank calls forward alone, the others skip the case
BAD_RANK, BAD_BATCHES = 2, [torch.tensor([3, 11], dtype=torch.int32), torch.tensor([[0], [-1]])]


# ---------------------------------------------------------------- the child processes

def _run_case(case, group, group_rank):
    from fastembed.torch.distributed import ShardedEmbedding

    table = case["table"].clone()
    emb = ShardedEmbedding(case["V"], case["D"], group, padding_idx=case["padding_idx"], sparse=case["sparse"],
                           _weight=table)
    result = {"shard_rows": emb.shard_rows, "block": emb.weight.detach().clone()}
    outs = [emb(batches[group_rank]) for batches, _ in case["lookups"]]
    torch.autograd.backward(outs, [grads[group_rank] for _, grads in case["lookups"]])
    result["outs"], result["grad"] = [out.detach() for out in outs], emb.weight.grad
    torch.optim.SGD(emb.parameters(), lr=LR).step()
    result["stepped"] = emb.weight.detach().clone()
    result["_weight_unchanged"] = torch.equal(table, case["table"])  # the block is a copy of _weight's rows
    return result


def _bad_ids(rank, case):
    from fastembed.torch.distributed import ShardedEmbedding

    emb = ShardedEmbedding(case["V"], case["D"], _weight=case["table"])
    if rank != BAD_RANK:
        return None
    errors = []
    for ids in BAD_BATCHES:
        try:
            emb(ids)
        except Exception as exc:  # noqa: BLE001  (the parent checks the type)
            errors.append((type(exc).__name__, str(exc)))
        else:
            errors.append(None)
    return errors


def _default_init(rank):
    """Blocks made without _weight: shapes, dtypes, and the padding row (global 9: rank 3's first) zero."""
    from fastembed.torch.distributed import ShardedEmbedding

    torch.manual_seed(100 + rank)
    emb = ShardedEmbedding(11, 3, padding_idx=9)
    emb64 = ShardedEmbedding(11, 3, dtype=torch.float64)
    return {"shard_rows": emb.shard_rows, "weight": emb.weight.detach().clone(),
            "weight64": emb64.weight.detach().clone()}


def _child(rank, tmp, package):
    """One rank (this file run as a script; its traceback goes to its log, which the parent reads)."""
    import fastembed

    if os.path.dirname(os.path.abspath(fastembed.__file__)) != package:
        raise RuntimeError(f"the child imported {fastembed.__file__}, the parent {package}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=COLLECTIVE_TIMEOUT)
    groups = {name: None if name == "world" else dist.new_group(ranks) for name, ranks in GROUPS.items()}
    cases = torch.load(f"{tmp}/cases.pt")
    results = {"default_init": _default_init(rank)}
    for case in cases:
        members = GROUPS[case["group"]]
        if case["name"] == "bad_ids":
            results["bad_ids"] = _bad_ids(rank, case)
        elif rank in members:
            results[case["name"]] = _run_case(case, groups[case["group"]], members.index(rank))
    torch.save(results, f"{tmp}/result{rank}.pt")
    dist.destroy_process_group()


# ---------------------------------------------------------------- the parent

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # The children run this file as a script (not a multiprocessing target, which they would have to
    # import by the module name pytest gave it), with the parent's fastembed first on their path.
    import fastembed

    tmp = tmp_path_factory.mktemp("sharded")
    torch.save(CASES, tmp / "cases.pt")
    package = os.path.dirname(os.path.abspath(fastembed.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(package),
                                                                     os.environ.get("PYTHONPATH")])))
    procs = []
    for rank in range(WORLD):
        with open(tmp / f"log{rank}.txt", "w") as log:
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), str(rank), str(tmp), package],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline, failures = time.monotonic() + JOIN_TIMEOUT, []
    for rank, proc in enumerate(procs):
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            failures.append(f"rank {rank} still running after {JOIN_TIMEOUT} s (killed)")
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for rank, proc in enumerate(procs):
        if proc.returncode:
            failures.append(f"rank {rank} exited with {proc.returncode}; its log ends:\n"
                            + (tmp / f"log{rank}.txt").read_text()[-6000:])
    if failures:
        pytest.fail("the sharded group failed:\n" + "\n".join(failures))
    return [torch.load(tmp / f"result{rank}.pt") for rank in range(WORLD)]


def _oracle(case):
    """One nn.Embedding over the whole table, each lookup on the batches concatenated in rank order (its
    rows split back per rank), one backward through all of them, one SGD step."""
    emb = torch.nn.Embedding(case["V"], case["D"], padding_idx=case["padding_idx"], sparse=case["sparse"],
                             _weight=case["table"].clone())
    outs = [emb(torch.cat([b.reshape(-1).long() for b in batches])) for batches, _ in case["lookups"]]
    torch.autograd.backward(outs, [torch.cat([g.reshape(-1, case["D"]) for g in grads])
                                   for _, grads in case["lookups"]])
    grad = emb.weight.grad.to_dense() if case["sparse"] else emb.weight.grad
    torch.optim.SGD(emb.parameters(), lr=LR).step()
    rows = [list(out.detach().split([b.numel() for b in batches])) for out, (batches, _) in zip(outs, case["lookups"])]
    return rows, grad, emb.weight.detach()


def _all_ids(case):
    return torch.cat([b.reshape(-1).long() for batches, _ in case["lookups"] for b in batches])


def _repeats_within_a_rank(case):
    if len(case["lookups"]) > 1:  # the two lookups' gradients are summed per rank too
        return True
    return any(len(np.unique(b.numpy())) < b.numel() for b in case["lookups"][0][0])


def _repeats_anywhere(case):
    ids = _all_ids(case).numpy()
    return len(np.unique(ids)) < len(ids)


def _rounding_bound(case):
    """How far apart two sums of a row's gradient terms, grouped differently, can be: per element, the
    number of terms times the dtype's eps times the sum of their magnitudes (each rounding of either
    grouping is at most eps/2 of a partial sum, which is at most that sum)."""
    ids = _all_ids(case)
    magnitudes = torch.cat([g.reshape(-1, case["D"]).abs().double() for _, grads in case["lookups"] for g in grads])
    total = torch.zeros(case["V"], case["D"], dtype=torch.float64).index_add_(0, ids, magnitudes)
    terms = torch.zeros(case["V"], dtype=torch.float64).index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    return terms[:, None] * torch.finfo(case["table"].dtype).eps * total


def _compare(actual, expected, bound, what):
    """Bitwise when bound is None, else |actual - expected| <= bound elementwise."""
    if bound is None:
        assert torch.equal(actual, expected), f"{what} differs: {actual} != {expected}"
    else:
        gap = (actual.double() - expected.double()).abs()
        assert (gap <= bound).all(), f"{what}: {int((gap > bound).sum())} elements past the rounding bound, " \
                                     f"the largest gap {gap.max().item()} (bound there {bound.flatten()[gap.argmax()]})"


SHARD_CASES = [c for c in CASES if c["name"] != "bad_ids"]


@pytest.mark.parametrize("case", SHARD_CASES, ids=[c["name"] for c in SHARD_CASES])
def test_same_answer_as_one_embedding(results, case):
    members = GROUPS[case["group"]]
    per_rank = [results[rank][case["name"]] for rank in members]
    outs, grad, stepped = _oracle(case)
    V, W = case["V"], len(members)
    blocks = np.array_split(np.arange(V), W)  # contiguous, as even as can be, the longer blocks first
    for group_rank, (res, block) in enumerate(zip(per_rank, blocks)):
        start = int(block[0]) if len(block) else sum(len(b) for b in blocks[:group_rank])
        assert res["shard_rows"] == (start, start + len(block))
        assert torch.equal(res["block"], case["table"][start:start + len(block)])
        for lookup, ((batches, _), out) in enumerate(zip(case["lookups"], res["outs"])):
            ids = batches[group_rank]
            assert out.shape == tuple(ids.shape) + (case["D"],) and out.dtype == case["table"].dtype
            assert torch.equal(out.reshape(-1, case["D"]), outs[lookup][group_rank]), \
                f"rank {group_rank}'s rows of lookup {lookup}"
        assert res["grad"].dtype == case["table"].dtype and res["grad"].is_sparse == case["sparse"]
        assert res["_weight_unchanged"], f"rank {group_rank}'s SGD step wrote into the _weight it was given"

    # a sparse gradient's rows are summed by torch's coalesce, in its own order: bitwise only when no
    # row has two entries
    exact = not (_repeats_anywhere(case) if case["sparse"] else _repeats_within_a_rank(case))
    bound = None if exact else _rounding_bound(case)
    gathered = torch.cat([r["grad"].to_dense() for r in per_rank])
    _compare(gathered, grad, bound, "the gathered block gradients")
    if bound is not None:  # the steps differ by LR times the gradients' gap, then by one rounding each
        bound = LR * bound + torch.finfo(stepped.dtype).eps * stepped.double().abs()
    _compare(torch.cat([r["stepped"] for r in per_rank]), stepped, bound, "the tables after an SGD step")
    if case["padding_idx"] is not None:
        assert not gathered[case["padding_idx"]].any()


@pytest.mark.parametrize("case", [c for c in SHARD_CASES if c["sparse"]],
                         ids=[c["name"] for c in SHARD_CASES if c["sparse"]])
def test_sparse_gradient_has_one_entry_per_rank_and_row(results, case):
    members = GROUPS[case["group"]]
    bounds = np.cumsum([0] + [len(b) for b in np.array_split(np.arange(case["V"]), len(members))])
    pad = case["padding_idx"] % case["V"] if case["padding_idx"] is not None else None
    asked = [set(b.reshape(-1).tolist()) - {pad} for b in case["lookups"][0][0]]
    for group_rank, rank in enumerate(members):
        grad = results[rank][case["name"]]["grad"]
        lo, hi = bounds[group_rank], bounds[group_rank + 1]
        expected = sorted(i - lo for ids in asked for i in ids if lo <= i < hi)
        assert sorted(grad._indices()[0].tolist()) == expected


def test_bad_ids_raise_on_the_rank_that_gave_them(results):
    # The other ranks never called forward: had the bad rank entered a collective first, it would have
    # hung and the group failed (the fixture), instead of reaching the cases after this one.
    errors = results[BAD_RANK]["bad_ids"]
    assert [e and e[0] for e in errors] == ["IndexError", "IndexError"]
    assert "11" in errors[0][1] and "-1" in errors[1][1]
    assert all(results[rank]["bad_ids"] is None for rank in range(WORLD) if rank != BAD_RANK)
    assert "random_w4" in results[BAD_RANK]  # the group ran on after it


def test_default_init(results):
    rows = [results[rank]["default_init"]["shard_rows"] for rank in range(WORLD)]
    assert rows == [(0, 3), (3, 6), (6, 9), (9, 11)]
    for rank, (start, stop) in enumerate(rows):
        init = results[rank]["default_init"]
        assert init["weight"].shape == (stop - start, 3) and init["weight"].dtype == torch.float32
        assert init["weight64"].shape == (stop - start, 3) and init["weight64"].dtype == torch.float64
        expected = torch.randn(stop - start, 3, generator=torch.Generator().manual_seed(100 + rank))
        if rank == 3:
            expected[0] = 0  # global row 9, the padding row
        assert torch.equal(init["weight"], expected)


# ---------------------------------------------------------------- in this process: a group of one

@pytest.fixture
def group_of_one(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_needs_an_initialised_process_group():
    from fastembed.torch.distributed import ShardedEmbedding

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedEmbedding(4, 2)


def test_constructor_refuses_what_it_cannot_hold(group_of_one):
    from fastembed.torch.distributed import ShardedEmbedding

    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        ShardedEmbedding(5, 2, _weight=torch.zeros(4, 2))
    with pytest.raises(TypeError, match="never cast"):
        ShardedEmbedding(4, 2, dtype=torch.float64, _weight=torch.zeros(4, 2))
    with pytest.raises(TypeError, match="float32, float64 or float16"):
        ShardedEmbedding(4, 2, dtype=torch.bfloat16)
    with pytest.raises(AssertionError):  # torch's error for a padding_idx out of range
        ShardedEmbedding(4, 2, padding_idx=4)


def test_group_of_one_is_nn_embedding(group_of_one):
    from fastembed.torch.distributed import ShardedEmbedding

    table = torch.randn(6, 3, generator=torch.Generator().manual_seed(14))
    ids = torch.tensor([[5, 0, 5], [2, 2, 1]], dtype=torch.int32)
    grad_out = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(15))
    emb = ShardedEmbedding(6, 3, padding_idx=-4, _weight=table)
    oracle = torch.nn.Embedding(6, 3, padding_idx=2, _weight=table.clone())
    out, expected = emb(ids), oracle(ids.long())
    assert emb.shard_rows == (0, 6) and torch.equal(out, expected)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert torch.equal(emb.weight.grad, oracle.weight.grad)  # one rank: the same additions in the same order


if __name__ == "__main__":
    _child(int(sys.argv[1]), sys.argv[2], sys.argv[3])


def test_readme_script_runs_under_torchrun(tmp_path):
    """The README's training script, as a user runs it: torchrun with 2 processes."""
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    if not os.path.exists(readme):
        pytest.skip("README.md is not beside tests/ (an installed-package stage)")
    with open(readme) as f:
        text = f.read()
    section = text.split("## A table sharded over processes", 1)[1]
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "train_sharded.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(  # the fastembed this suite tests, not another
        [os.path.dirname(os.path.dirname(os.path.abspath(_fastembed_file()))), os.environ.get("PYTHONPATH", "")]))
    # --standalone: a local rendezvous on a free port (parallel runs of the suite never collide)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "train_sharded.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "rank 0: rows (0, 500)" in run.stdout and "rank 1: rows (500, 1000)" in run.stdout, run.stdout
    losses = [float(line.rsplit(" ", 1)[1]) for line in run.stdout.splitlines() if "last loss" in line]
    assert len(losses) == 2 and all(0 < x < 0.95 for x in losses), losses  # N(0,1) rows start at 1.0: it learned


def _fastembed_file():
    import fastembed
    return fastembed.__file__
