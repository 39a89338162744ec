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
rounding of the table's dtype (`_magnitudes`), since a rank sums its duplicates before sending them.
The same holds for the tables after one torch.optim.SGD step. With a fused rule the oracle is one
fastembed.torch.Embedding with that rule (the rules are checked against torch elsewhere); with max_norm
on float32 tables the rows may differ by a few ulps (fastembed's renorm kernel against torch's).

Faults, in the same processes: a rank with bad ids makes every rank refuse the lookup with no table
changed; ranks in different collectives (another table, another lookup's backward) all raise; the group
runs on after both. Dead and hung ranks: tests/test_sharded_faults.py.
"""
import os
import signal
import subprocess
import sys
from datetime import timedelta

import numpy as np
import pytest

from _helpers import rank_argv, require_gloo, run_ranks

torch, dist = require_gloo()

WORLD = 4
GROUPS = {"world": [0, 1, 2, 3], "pair01": [0, 1], "pair13": [1, 3]}
JOIN_TIMEOUT = 150.0  # seconds for the whole group, torch's import included, on a busy machine
COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a hung collective fails the child before the join times out
LR = 0.5


def _case(name, group, num_embeddings, dim, dtype, id_dtype, *lookups, padding_idx=None, sparse=False, seed=0,
          max_norm=None, fused=None, transposed=False):
    """One scenario: a random table and its lookups (usually one; more are made before one backward
    through all of them), each a list of the members' batches in group-rank order, with their gradients.
    fused is (the name of a rule of fastembed.torch.optim, its keyword arguments); transposed gives each
    rank the transpose of its (2-D) batch, a strided view."""
    gen = torch.Generator().manual_seed(seed)
    case = {"name": name, "group": group, "V": num_embeddings, "D": dim, "padding_idx": padding_idx,
            "sparse": sparse, "table": torch.randn(num_embeddings, dim, generator=gen, dtype=torch.float64).to(dtype),
            "lookups": [], "max_norm": max_norm, "fused": fused}
    for batches in lookups:
        batches = [torch.as_tensor(np.asarray(b, dtype=np.int64)).to(id_dtype) for b in batches]
        if transposed:
            batches = [b.t() for b in batches]
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
    # bfloat16: the tables' memory as uint16 bits through the kernels, bfloat16 tensors through gloo
    _case("bf16_dups_w4", "world", 11, 3, torch.bfloat16, torch.int64,
          [[5, 5, 0, 10], [10, 2], [0, 0, 0], [[7, 5], [5, 3]]], padding_idx=3, seed=26),
    _case("bf16_distinct_w4", "world", 11, 4, torch.bfloat16, torch.int32,
          [[0, 3, 8, 10], [10, 3, 1, 7], [6, 0, 2, 9], [5, 7, 8]], seed=27),
    _case("bf16_sparse_distinct_w4", "world", 9, 2, torch.bfloat16, torch.int32,
          [[8, 1], [0], [4, 6, 2], [3, 5, 7]], sparse=True, seed=28),
    _case("bf16_max_norm_w4", "world", 11, 3, torch.bfloat16, torch.int64,
          [[0, 3, 3, 9], [9, 10], [4, 0], [6, 2, 9]], max_norm=1.0, seed=29),
    # two lookups of one table before one backward: each keeps its own exchange
    _case("two_lookups_w4", "world", 11, 3, torch.float32, torch.int64,
          [[1, 2], [3, 4, 4], [10], np.zeros(0)], [[9, 1, 6], np.zeros(0), [2, 0, 7], [[5], [10]]],
          padding_idx=0, seed=14),
    _case("pair01_dense", "pair01", 7, 4, torch.float32, torch.int64, [[6, 6, 0, 3], [[3, 5], [5, 6]]],
          padding_idx=-1, seed=9),
    _case("pair13_sparse", "pair13", 5, 3, torch.float64, torch.int32, [[4, 4, 0, 1], np.zeros(0)], sparse=True,
          seed=10),
    _case("pair13_distinct", "pair13", 9, 2, torch.float32, torch.int32, [[8, 0, 4], [4, 1, 8, 7]], seed=11),
    # a 0-d batch (one id: rows of shape (D,)), every rank's batch empty, transposed (strided) batches
    _case("scalar_ids_w4", "world", 11, 3, torch.float32, torch.int64, [7, [7, 1], 10, np.zeros(0)], seed=15),
    _case("all_empty_w4", "world", 11, 3, torch.float32, torch.int32, [np.zeros(0)] * 4, seed=16),
    _case("all_empty_sparse_w4", "world", 11, 3, torch.float64, torch.int64, [np.zeros((0, 3))] * 4, sparse=True,
          seed=17),
    _case("transposed_w4", "world", 11, 2, torch.float32, torch.int64,
          [[[1, 2, 3], [4, 5, 6]], [[10, 0, 9], [8, 7, 1]], np.zeros((0, 2)), [[5, 3]]], transposed=True, seed=18),
    _case("sparse_rows_lt_ranks", "world", 3, 2, torch.float32, torch.int32, [[2, 2], [0, 1], [1], [0]],
          sparse=True, seed=19),
    # max_norm: each owner renormalises the rows asked of it, once, before serving them (float64:
    # torch's own renorm, bitwise; float32: fastembed's kernel, whose norm may differ by an ulp)
    _case("max_norm_f64_w4", "world", 11, 3, torch.float64, torch.int64,
          [[0, 3, 3, 9], [9, 10], [4, 0], [6, 2, 9]], max_norm=1.0, seed=20),
    _case("max_norm_f32_w4", "world", 11, 4, torch.float32, torch.int32,
          [[1, 5, 8], [8, 2], [5], [0, 10, 6]], [[7, 1], [3], np.zeros(0), [8, 4]], max_norm=0.75, seed=21),
    # fused rules: the owner updates its rows in backward (no gradient); against fastembed.torch.Embedding
    # with the same rule, one process, the batches concatenated
    _case("fused_sgd_w4", "world", 11, 3, torch.float32, torch.int64,
          [[0, 4, 8], [4, 10, 1], [[6, 0], [2, 9]], [5, 4]], padding_idx=9, fused=("FusedSGD", {"lr": 0.5}),
          seed=22),
    _case("fused_adagrad_dups_w4", "world", 11, 3, torch.float32, torch.int64,
          [[3, 3, 7], [0, 10, 3], np.zeros(0), [10, 10, 1]], fused=("FusedAdagrad", {"lr": 0.1}), seed=23),
    _case("fused_rowwise_w4", "world", 9, 4, torch.float32, torch.int32,
          [[8, 1], [0], [4, 6, 2], [3, 5, 7, 1]], fused=("FusedRowWiseAdagrad", {"lr": 0.2}), seed=24),
    _case("fused_adam_pair13", "pair13", 7, 2, torch.float32, torch.int64, [[6, 0, 3], [3, 5, 6]],
          fused=("FusedSparseAdam", {"lr": 0.01}), seed=25),
    # the fused rules on 16-bit tables (bfloat16: the rule's state as bfloat16 buffers over uint16 bits)
    _case("fused_adagrad_bf16_w4", "world", 11, 3, torch.bfloat16, torch.int64,
          [[3, 3, 7], [0, 10, 3], np.zeros(0), [10, 10, 1]], fused=("FusedAdagrad", {"lr": 0.1}), seed=26),
    _case("fused_adam_f16_pair13", "pair13", 7, 9, torch.float16, torch.int32, [[6, 0, 3], [2, 5, 4]],
          fused=("FusedSparseAdam", {"lr": 0.01, "eps": 1e-3}), seed=27),
]
# (the rank of "bad_ids", its bad batches): every rank looks up, this one with bad ids, the others good ones
BAD_RANK, BAD_BATCHES = 2, [torch.tensor([3, 11], dtype=torch.int32), torch.tensor([[0], [-1]]),
                            torch.tensor([1.0, 2.0])]
GOOD_BATCH = torch.tensor([0, 5, 10])


# ---------------------------------------------------------------- the child processes

def _rule(case):
    import fastembed.torch.optim

    name, kwargs = case["fused"]
    return getattr(fastembed.torch.optim, name)(**kwargs)


def _run_case(case, group, group_rank):
    from fastembed.torch.distributed import ShardedEmbedding

    table = case["table"].clone()
    emb = ShardedEmbedding(case["V"], case["D"], group, padding_idx=case["padding_idx"], sparse=case["sparse"],
                           max_norm=case["max_norm"], fused=case["fused"] and _rule(case), _weight=table)
    result = {"shard_rows": emb.shard_rows, "block": emb.weight.detach().clone()}
    outs = [emb(batches[group_rank]) for batches, _ in case["lookups"]]
    result["renormed"] = emb.weight.detach().clone()
    torch.autograd.backward(outs, [grads[group_rank] for _, grads in case["lookups"]])
    result["outs"], result["grad"] = [out.detach() for out in outs], emb.weight.grad
    if case["fused"] is None:
        torch.optim.SGD(emb.parameters(), lr=LR).step()
    result["stepped"] = emb.weight.detach().clone()
    result["state"] = {name: buf.clone() for name, buf in emb.named_buffers()}
    result["_weight_unchanged"] = torch.equal(table, case["table"])  # the block is a copy of _weight's rows
    return result


def _error(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001  (the parent checks the type)
        return type(exc).__name__, str(exc)
    return None


def _bad_ids(rank, case):
    """Every rank looks up (max_norm set, so that a renorm would show), BAD_RANK with bad ids: the errors
    of each attempt, the block after them, and a good lookup and backward afterwards (the group runs on)."""
    from fastembed.torch.distributed import ShardedEmbedding

    emb = ShardedEmbedding(case["V"], case["D"], max_norm=0.01, _weight=case["table"])
    result = {"errors": [_error(lambda: emb(ids if rank == BAD_RANK else GOOD_BATCH)) for ids in BAD_BATCHES],
              "block_after": emb.weight.detach().clone()}
    good = emb(GOOD_BATCH)
    good.sum().backward()
    result["good"] = good.detach()
    return result


def _disagree(rank):
    """Ranks that are not in the same collective: rank 0 looks up another table (forward: one of another
    shape, then one of the same shape), then runs the backward of its lookups in the other order. Every
    rank records its errors, then a lookup and backward that all agree on shows the group runs on."""
    from fastembed.torch.distributed import ShardedEmbedding

    a = ShardedEmbedding(11, 2, _weight=torch.arange(22.0).reshape(11, 2))
    b = ShardedEmbedding(11, 3, _weight=torch.zeros(11, 3))
    twin = ShardedEmbedding(11, 2, _weight=torch.zeros(11, 2))  # a's shape and dtype: told apart by its number
    result = {"forward": _error(lambda: (b if rank == 0 else a)(torch.tensor([1, 7]))),
              "twin": _error(lambda: (twin if rank == 0 else a)(torch.tensor([1, 7])))}
    first, second = a(torch.tensor([rank])), a(torch.tensor([10 - rank, 4]))
    order = [second, first] if rank == 0 else [first, second]
    result["backward"] = [_error(lambda out=out: out.sum().backward()) for out in order]
    result["grad_after"] = a.weight.grad
    out = a(torch.tensor([rank, 9]))
    out.sum().backward()
    result["rows"], result["grad"] = out.detach(), a.weight.grad
    return result


def _default_init(rank):
    """Blocks made without _weight: shapes, dtypes, and the padding row (global 9: rank 3's first) zero."""
    from fastembed.torch.distributed import ShardedEmbedding

    torch.manual_seed(100 + rank)
    emb = ShardedEmbedding(11, 3, padding_idx=9)
    emb64 = ShardedEmbedding(11, 3, dtype=torch.float64)
    start, stop = emb.shard_rows
    given = torch.full((stop - start, 3), float(rank))  # a _weight that is this rank's block, not the table
    from_block = ShardedEmbedding(11, 3, _weight=given)
    with torch.no_grad():
        from_block.weight.add_(1)  # a copy: `given` keeps its values
    return {"shard_rows": emb.shard_rows, "weight": emb.weight.detach().clone(),
            "weight64": emb64.weight.detach().clone(), "from_block": from_block.weight.detach().clone(),
            "given_after": given}


def _child(rank, tmp):
    """One rank (this file run as a script; its traceback goes to its log, which the parent reads)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=COLLECTIVE_TIMEOUT)
    groups = {name: None if name == "world" else dist.new_group(members) for name, members in GROUPS.items()}
    cases = torch.load(f"{tmp}/cases.pt")
    results = {"default_init": _default_init(rank), "disagree": _disagree(rank)}
    for case in cases:
        members = GROUPS[case["group"]]
        if case["name"] == "bad_ids":
            results["bad_ids"] = _bad_ids(rank, case)
        elif rank in members:
            results[case["name"]] = _run_case(case, groups[case["group"]], members.index(rank))
    torch.save(results, f"{tmp}/result{rank}.pt")
    # Every rank past its last collective before any tears its groups down; then out without the
    # interpreter's finalisation: gloo's worker thread can still hold the last reference to a finished
    # collective (the barrier's), and freeing it there while the process finalises aborts the rank with
    # "terminate called without an active exception" (CI lost rank 2 that way). bench/sharded.py does
    # the same; fastembed.torch.distributed._RECENT_WORK is the library's side of it.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- the parent

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    torch.save(CASES, tmp / "cases.pt")
    run_ranks(__file__, WORLD, tmp, JOIN_TIMEOUT, expected=0)
    return [torch.load(tmp / f"result{rank}.pt") for rank in range(WORLD)]


def _oracle(case):
    """One table over the whole of it, each lookup on the batches concatenated in rank order (its rows
    split back per rank), one backward through all of them, then one SGD step: torch's nn.Embedding; or
    with a fused rule, fastembed.torch.Embedding with that rule (whose update is its backward). Returns
    the rows, the gradient (None when fused), the table after the forwards and after the step, and the
    fused rule's state."""
    if case["fused"] is None:
        emb = torch.nn.Embedding(case["V"], case["D"], padding_idx=case["padding_idx"], max_norm=case["max_norm"],
                                 sparse=case["sparse"], _weight=case["table"].clone())
    else:
        import fastembed.torch

        emb = fastembed.torch.Embedding(case["V"], case["D"], padding_idx=case["padding_idx"],
                                        _weight=case["table"].clone(), fused=_rule(case))
    outs = [emb(torch.cat([b.reshape(-1).long() for b in batches])) for batches, _ in case["lookups"]]
    renormed = emb.weight.detach().clone()
    torch.autograd.backward(outs, [torch.cat([g.reshape(-1, case["D"]) for g in grads])
                                   for _, grads in case["lookups"]])
    grad = None
    if case["fused"] is None:
        grad = emb.weight.grad.to_dense() if case["sparse"] else emb.weight.grad
        torch.optim.SGD(emb.parameters(), lr=LR).step()
    rows = [list(out.detach().split([b.numel() for b in batches])) for out, (batches, _) in zip(outs, case["lookups"])]
    return rows, grad, renormed, emb.weight.detach(), dict(emb.named_buffers())


def _all_ids(case):
    return torch.cat([b.reshape(-1).long() for batches, _ in case["lookups"] for b in batches])


def _repeats_within_a_rank(case):
    if len(case["lookups"]) > 1:  # the two lookups' gradients are summed per rank too
        return True
    return any(len(np.unique(b.numpy())) < b.numel() for b in case["lookups"][0][0])


def _repeats_anywhere(case):
    ids = _all_ids(case).numpy()
    return len(np.unique(ids)) < len(ids)


def _compare(actual, expected, bound, what):
    """Bitwise when bound is None, else |actual - expected| <= bound elementwise."""
    if bound is None:
        assert torch.equal(actual, expected), f"{what} differs: {actual} != {expected}"
    else:
        gap = (actual.double() - expected.double()).abs()
        assert (gap <= bound).all(), f"{what}: {int((gap > bound).sum())} elements past the rounding bound, " \
                                     f"the largest gap {gap.max().item()} (bound there {bound.flatten()[gap.argmax()]})"


SHARD_CASES = [c for c in CASES if c["name"] != "bad_ids"]


def _magnitudes(case):
    """Per row of the table: the number of gradient rows added into it, and the sum of their magnitudes."""
    ids = _all_ids(case)
    magnitudes = torch.cat([g.reshape(-1, case["D"]).abs().double() for _, grads in case["lookups"] for g in grads])
    total = torch.zeros(case["V"], case["D"], dtype=torch.float64).index_add_(0, ids, magnitudes)
    terms = torch.zeros(case["V"], dtype=torch.float64).index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    return terms[:, None], total


@pytest.mark.parametrize("case", SHARD_CASES, ids=[c["name"] for c in SHARD_CASES])
def test_same_answer_as_one_embedding(results, case):
    members = GROUPS[case["group"]]
    per_rank = [results[rank][case["name"]] for rank in members]
    outs, grad, renormed, stepped, state = _oracle(case)
    V, W = case["V"], len(members)
    eps = torch.finfo(case["table"].dtype).eps
    # fastembed's float32 renorm may round a row's norm an ulp away from torch's: the renormalised rows
    # then differ by a few ulps (float64 runs torch's own renorm: bitwise)
    rows_exact = case["max_norm"] is None or case["table"].dtype != torch.float32
    rows_bound = (lambda expected: None) if rows_exact else (lambda expected: 4 * eps * expected.double().abs())
    blocks = np.array_split(np.arange(V), W)  # contiguous, as even as can be, the longer blocks first
    for group_rank, (res, block) in enumerate(zip(per_rank, blocks)):
        start = int(block[0]) if len(block) else sum(len(b) for b in blocks[:group_rank])
        assert res["shard_rows"] == (start, start + len(block))
        assert torch.equal(res["block"], case["table"][start:start + len(block)])
        for lookup, ((batches, _), out) in enumerate(zip(case["lookups"], res["outs"])):
            ids = batches[group_rank]
            assert out.shape == tuple(ids.shape) + (case["D"],) and out.dtype == case["table"].dtype
            expected = outs[lookup][group_rank]
            _compare(out.reshape(-1, case["D"]), expected, rows_bound(expected),
                     f"rank {group_rank}'s rows of lookup {lookup}")
        if case["fused"] is None:
            assert res["grad"].dtype == case["table"].dtype and res["grad"].is_sparse == case["sparse"]
        else:
            assert res["grad"] is None  # a fused table gets no gradient
        assert res["_weight_unchanged"], f"rank {group_rank}'s step wrote into the _weight it was given"
    _compare(torch.cat([r["renormed"] for r in per_rank]), renormed, rows_bound(renormed),
             "the tables after the lookups (max_norm renormalises)")

    # a sparse gradient's rows are summed by torch's coalesce, in its own order: bitwise only when no
    # row has two entries
    exact = not (_repeats_anywhere(case) if case["sparse"] else _repeats_within_a_rank(case))
    terms, total = _magnitudes(case)
    if case["fused"] is not None:
        lr = case["fused"][1]["lr"]
        bound = None if exact else 8 * eps * terms * (stepped.double().abs() + lr * (1 + total))
        _compare(torch.cat([r["stepped"] for r in per_rank]), stepped, bound, "the tables after the fused update")
        for name, expected in state.items():
            if expected.dim() == 0:  # step: one per backward, the same on every rank
                for r in per_rank:
                    assert torch.equal(r["state"][name], expected), f"{name} {r['state'][name]} != {expected}"
            else:
                gathered = torch.cat([r["state"][name] for r in per_rank])
                _compare(gathered, expected, None if exact else 16 * eps * terms * (1 + total) ** 2,
                         f"the fused state {name}")
        return
    bound = None if exact else terms * eps * total
    gathered = torch.cat([r["grad"].to_dense() for r in per_rank])
    _compare(gathered, grad, bound, "the gathered block gradients")
    if bound is not None:  # the steps differ by LR times the gradients' gap, then by one rounding each
        bound = LR * bound + eps * stepped.double().abs()
    if not rows_exact:  # the steps start from renormalised rows a few ulps apart
        bound = (0 if bound is None else bound) + 4 * eps * (renormed.double().abs() + LR * grad.double().abs())
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


def test_bad_ids_refuse_the_lookup_on_every_rank(results):
    case = next(c for c in CASES if c["name"] == "bad_ids")
    bad = results[BAD_RANK]["bad_ids"]["errors"]
    assert [e and e[0] for e in bad] == ["IndexError", "IndexError", "TypeError"]
    assert "11" in bad[0][1] and "-1" in bad[1][1] and "int32 or int64" in bad[2][1]
    for rank in range(WORLD):
        res = results[rank]["bad_ids"]
        if rank != BAD_RANK:
            assert [e and e[0] for e in res["errors"]] == ["CollectiveError"] * 3, res["errors"]
            assert all(f"rank(s) [{BAD_RANK}]" in e[1] and "refused on every rank" in e[1] for e in res["errors"])
        start, stop = np.array_split(np.arange(case["V"]), WORLD)[rank][[0, -1]] + [0, 1]
        # no rank renormalised a row (max_norm=0.01 would have scaled every row asked for)
        assert torch.equal(res["block_after"], case["table"][start:stop]), f"rank {rank}'s block changed"
        expected = torch.nn.functional.embedding(GOOD_BATCH, case["table"].clone(), max_norm=0.01)  # (renorms in place)
        assert torch.allclose(res["good"], expected, rtol=1e-5, atol=0), "the lookup after the refused ones"
    assert all("random_w4" in results[rank] for rank in range(WORLD))  # the group ran on after it


def test_ranks_in_different_collectives_raise_everywhere(results):
    for rank in range(WORLD):
        res = results[rank]["disagree"]
        # the forward: rank 0 looked up the (11, 3) table, the others the (11, 2) one
        assert res["forward"][0] == "CollectiveError", res["forward"]
        assert "not in the same collective" in res["forward"][1]
        other = "(11, 2)" if rank == 0 else "(11, 3)"
        assert other in res["forward"][1].split("rank 0" if rank else "rank 1", 1)[1], res["forward"][1]
        # a table of the same shape and dtype: the table's number tells them apart (a: 3, twin: 5, in the
        # order of making on the world group, after _default_init's three)
        assert res["twin"][0] == "CollectiveError" and "not in the same collective" in res["twin"][1], res["twin"]
        assert ("of table 5" if rank else "of table 3") in res["twin"][1].split("rank 0" if rank else "rank 1", 1)[1]
        # the backward of lookup #s on rank 0 met the backward of another lookup on the others, twice
        assert [e and e[0] for e in res["backward"]] == ["CollectiveError"] * 2, res["backward"]
        assert all("a lookup's backward #" in e[1] for e in res["backward"])
        assert res["grad_after"] is None  # no gradient was given by the refused backward passes
        table = torch.arange(22.0).reshape(11, 2)
        assert torch.equal(res["rows"], table[[rank, 9]])
        start, stop = np.array_split(np.arange(11), WORLD)[rank][[0, -1]] + [0, 1]
        counts = torch.bincount(torch.tensor([0, 9, 1, 9, 2, 9, 3, 9]), minlength=11).float()
        assert torch.equal(res["grad"], counts[start:stop, None].expand(-1, 2)), rank


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
        assert torch.equal(init["from_block"], torch.full((stop - start, 3), rank + 1.0))
        assert torch.equal(init["given_after"], torch.full((stop - start, 3), float(rank)))


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
    import fastembed.torch.optim
    from fastembed.torch.distributed import ShardedEmbedding

    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        ShardedEmbedding(5, 2, _weight=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="sparse=True means nothing with fused"):
        ShardedEmbedding(5, 2, sparse=True, fused=fastembed.torch.optim.FusedSGD(lr=0.1))
    with pytest.raises(TypeError, match="fused must be None or a fused rule"):
        ShardedEmbedding(5, 2, fused=torch.optim.SGD)
    with pytest.raises(TypeError, match="never cast"):
        ShardedEmbedding(4, 2, dtype=torch.float64, _weight=torch.zeros(4, 2))
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        ShardedEmbedding(4, 2, dtype=torch.int64)
    # a fused rule takes the four dtypes, its state in the table's (the update: tests/test_torch_optim_dtypes.py)
    held = ShardedEmbedding(4, 2, dtype=torch.bfloat16, fused=fastembed.torch.optim.FusedAdagrad(lr=0.1))
    assert held.optim_sum.dtype == torch.bfloat16 and held.optim_sum.shape == held.weight.shape
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


def test_checkpoints_are_exported_beside_the_module():
    import fastembed.torch._shard_checkpoint as checkpoint
    import fastembed.torch.distributed as distributed

    assert distributed.save_sharded is checkpoint.save_sharded and distributed.load_sharded is checkpoint.load_sharded
    assert {"save_sharded", "load_sharded", "CollectiveError", "ShardedEmbedding"} <= set(distributed.__all__)


def test_copies_and_state(group_of_one, tmp_path):
    import copy

    from fastembed.torch.distributed import ShardedEmbedding

    table = torch.randn(6, 3, generator=torch.Generator().manual_seed(16))
    emb = ShardedEmbedding(6, 3, _weight=table)
    twin = copy.deepcopy(emb)  # as an EMA of a model or a trainer's copy would
    assert twin.process_group is emb.process_group and twin.weight is not emb.weight
    with torch.no_grad():
        twin.weight.mul_(2)
    assert torch.equal(emb.weight, table) and torch.equal(twin(torch.tensor([4, 1])), 2 * table[[4, 1]])
    with pytest.raises(TypeError, match="state_dict"):
        torch.save(emb, tmp_path / "module.pt")

    state = emb.state_dict()
    assert state["_extra_state"] == {"num_embeddings": 6, "embedding_dim": 3, "shard_rows": (0, 6), "world_size": 1}
    torch.save(state, tmp_path / "state.pt")
    twin.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert torch.equal(twin.weight, table)
    # a block of another table, or of another world size, is refused before anything is copied
    for key, value in [("num_embeddings", 7), ("shard_rows", [0, 3]), ("world_size", 2)]:
        other = dict(state, _extra_state=dict(state["_extra_state"], **{key: value}))
        other["weight"] = torch.zeros(6, 3)
        with pytest.raises(ValueError, match="save_sharded and load_sharded"):
            twin.load_state_dict(other)
        assert torch.equal(twin.weight, table), key


if __name__ == "__main__":
    _child(*rank_argv())


def test_readme_script_runs_under_torchrun(tmp_path):
    """The README's training script, as a user runs it: torchrun with 2 processes."""
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    if not os.path.exists(readme):
        pytest.skip("README.md is not beside tests/ (an installed-package stage)")
    with open(readme) as f:
        text = f.read()
    section = text.split("## A table sharded over processes", 1)[1]
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    # Each rank also writes what it printed to a file of its own: torchrun forwards its workers' output,
    # and has been seen to drop one's last line when both exit together (a flaky test, not a bad run).
    script += ('\nwith open(f"rank{rank}.txt", "w") as f:\n'
               '    f.write(f"rank {rank}: rows {table.shard_rows}, last loss {loss.item():.4f}")\n')
    (tmp_path / "train_sharded.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(  # the fastembed this suite tests, not another
        [os.path.dirname(os.path.dirname(os.path.abspath(_fastembed_file()))), os.environ.get("PYTHONPATH", "")]))
    # --standalone: a local rendezvous on a free port (parallel runs of the suite never collide)
    # its own session: on a timeout the whole process group goes (torchrun and its workers), not torchrun alone
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "train_sharded.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun ran past 300 s (killed with its workers):\n" + stdout[-2000:] + stderr[-3000:])
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    printed = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert printed[0].startswith("rank 0: rows (0, 500)") and printed[1].startswith("rank 1: rows (500, 1000)")
    losses = [float(line.rsplit(" ", 1)[1]) for line in printed]
    assert all(0 < x < 0.95 for x in losses), losses  # N(0,1) rows start at 1.0: it learned


def _fastembed_file():
    import fastembed
    return fastembed.__file__
