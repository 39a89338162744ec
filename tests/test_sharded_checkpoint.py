"""Checkpoints of a ShardedEmbedding (fastembed.torch._shard_checkpoint): saved by 4 ranks, loaded by
2, 4 and 1, saved by 2 and loaded by 4; training resumed after a reload; a save that dies half-way; a
save into a directory that is not shared (node-local disks), refused on every rank.

Four processes (gloo over a file:// rendezvous in tmp_path, no ports) are started once for the whole
file, as in test_sharded_embedding.py: the parent writes the cases, the children run them and write
what they saw, and every assertion runs in the parent. Each case is a table and an optimizer trained
STEPS steps at world 4, saved after SAVED_AT of them (checkpoint A), then:
  - loaded by the ranks {0, 1} (world 2), by all 4, and by rank 0 alone (world 1);
  - at world 2, trained the remaining steps from the loaded state and saved (checkpoint B), which
    world 4 then loads.
The oracle of a load is the saved ranks' blocks and state entries as the children saw them in memory
at the save, concatenated in rank order in the parent: each loading rank's block and row-sharded state
must be bitwise its rows of that (rows from np.array_split, not the code's bounds), its replicated
entries (Adam's step) bitwise the saved ones, its lr the saved one.

Each step's ids are distinct across the whole group, so a row's gradient is one term however the
batch is split among ranks: the tables after training resumed at world 2 are then bitwise those of the
uninterrupted world-4 run, and both are bitwise one layer holding the whole table trained on the steps'
batches concatenated: a torch.nn.Embedding with the case's optimizer (these are elementwise, or
row-wise, on each block), or a fastembed.torch.Embedding with the case's fused rule.
(Where an id repeated within a rank's batch, a rank would sum its duplicates before sending them, and
the resumed and uninterrupted tables would agree only to rounding; no case here does.)
"""
import json
import os
import re
import shutil
import sys
from datetime import timedelta

import numpy as np
import pytest

from _helpers import rank_argv, require_gloo, run_ranks

torch, dist = require_gloo()

WORLD = 4
STEPS, SAVED_AT = 5, 3
JOIN_TIMEOUT = 150.0  # seconds for the whole group, torch's import included, on a busy machine
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
CRASH_TIMEOUT = timedelta(seconds=15)  # the crash phase's group: the survivors fail within this
CRASH_RANK, CRASH_EXIT = 2, 17
OPTIMIZERS = {  # name: (module, class, constructor arguments); the fresh modules that load get lr * 3
    "adam": ("torch.optim", "Adam", {"lr": 0.05}),
    "rowwise": ("fastembed.torch.optim", "RowWiseAdagrad", {"lr": 0.1}),
    "sgd_momentum": ("torch.optim", "SGD", {"lr": 0.1, "momentum": 0.9}),
    "adagrad": ("fastembed.torch.optim", "Adagrad", {"lr": 0.1}),
    "fe_adam": ("fastembed.torch.optim", "Adam", {"lr": 0.02}),
    # fused rules (ShardedEmbedding(fused=...)): the state is the module's optim_* buffers, no optimizer
    "fused_adagrad": ("fastembed.torch.optim", "FusedAdagrad", {"lr": 0.1}),
    "fused_rowwise": ("fastembed.torch.optim", "FusedRowWiseAdagrad", {"lr": 0.1}),
    "fused_sparse_adam": ("fastembed.torch.optim", "FusedSparseAdam", {"lr": 0.05}),
}


def _case(name, optimizer, V, D, dtype, padding_idx=None, seed=0):
    """A table and STEPS steps, each a batch of distinct ids with its output gradient, split among 4
    ranks and (for the resumed run) among 2 at cuts of their own, empty batches included."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(STEPS):
        ids = rng.permutation(V)[:rng.integers(1, V + 1)]
        grads = torch.randn(len(ids), D, generator=gen, dtype=torch.float64).to(dtype)
        splits = {}
        for world in (4, 2):
            cuts = np.sort(rng.integers(0, len(ids) + 1, size=world - 1))
            bounds = [0, *cuts.tolist(), len(ids)]
            splits[world] = [(torch.from_numpy(ids[a:b].copy()), grads[a:b]) for a, b in zip(bounds, bounds[1:])]
        steps.append({"ids": torch.from_numpy(ids.copy()), "grads": grads, "splits": splits})
    table = torch.randn(V, D, generator=gen, dtype=torch.float64).to(dtype)
    if padding_idx is not None:
        table[padding_idx] = 0
    return {"name": name, "optimizer": optimizer, "V": V, "D": D, "dtype": dtype, "padding_idx": padding_idx,
            "table": table, "steps": steps}


# V=10: world 4 holds rows [0,3) [3,6) [6,8) [8,10), world 2 [0,5) [5,10): a world-2 block takes part of a
# world-4 file and a world-4 block part of a world-2 file. V=3 < 4 ranks: rank 3 holds no rows.
CASES = [
    _case("adam", "adam", 10, 3, torch.float32, padding_idx=4, seed=1),
    _case("rowwise", "rowwise", 10, 2, torch.float32, seed=2),
    _case("sgd_momentum_f64", "sgd_momentum", 7, 2, torch.float64, seed=3),
    _case("sgd_momentum_bf16", "sgd_momentum", 7, 2, torch.bfloat16, padding_idx=0, seed=9),
    _case("adagrad_tiny", "adagrad", 3, 2, torch.float32, seed=4),
    _case("fe_adam", "fe_adam", 11, 4, torch.float32, seed=5),
    _case("fused_adagrad", "fused_adagrad", 10, 3, torch.float32, padding_idx=7, seed=6),
    _case("fused_rowwise", "fused_rowwise", 10, 2, torch.float32, seed=7),
    _case("fused_sparse_adam_tiny", "fused_sparse_adam", 3, 2, torch.float32, seed=8),
]
BY_NAME = {c["name"]: c for c in CASES}


# ---------------------------------------------------------------- the child processes

def _is_fused(case):
    return case["optimizer"].startswith("fused")


def _optimizer(case, params=None, scale=1.0):
    """The case's optimizer over params, or its fused rule (params None)."""
    import importlib

    module, cls, kwargs = OPTIMIZERS[case["optimizer"]]
    kwargs = dict(kwargs, lr=kwargs["lr"] * scale)
    cls = getattr(importlib.import_module(module), cls)
    return cls(**kwargs) if params is None else cls(params, **kwargs)


def _module(case, group, fresh):
    """The trained module (the case's table) and its optimizer (None with a fused rule), or a fresh
    pair to load into: another table (7.0 everywhere) and another lr, which a load must replace."""
    from fastembed.torch.distributed import ShardedEmbedding

    table = torch.full_like(case["table"], 7.0) if fresh else case["table"]
    scale = 3.0 if fresh else 1.0
    fused = _optimizer(case, None, scale) if _is_fused(case) else None
    emb = ShardedEmbedding(case["V"], case["D"], group, padding_idx=case["padding_idx"], fused=fused, _weight=table)
    return emb, None if fused else _optimizer(case, emb.parameters(), scale)


def _train(emb, opt, case, steps, world, group_rank):
    for s in steps:
        ids, grads = case["steps"][s]["splits"][world][group_rank]
        if opt is not None:
            opt.zero_grad()
        emb(ids).backward(grads)  # with a fused rule, this is the update
        if opt is not None:
            opt.step()


def _snapshot(emb, opt):
    """The block, the state (the optimizer's for the weight, or the fused rule's buffers) and the lr."""
    if opt is None:
        state = {name[len("optim_"):]: buf.clone() for name, buf in emb.named_buffers() if name.startswith("optim_")}
        lr = emb.fused.lr
    else:
        state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[emb.weight].items()}
        lr = opt.param_groups[0]["lr"]
    return {"shard_rows": emb.shard_rows, "block": emb.weight.detach().clone(), "state": state, "lr": lr}


def _errors(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (the parent checks type and message)
        return type(exc).__name__, str(exc)
    return None


def _run_case(case, rank, tmp, pair, single):
    from fastembed.torch._shard_checkpoint import load_sharded, save_sharded

    ck_a, ck_b = f"{tmp}/ckA/{case['name']}", f"{tmp}/ckB/{case['name']}"
    out = {}
    emb, opt = _module(case, None, fresh=False)
    _train(emb, opt, case, range(SAVED_AT), 4, rank)
    out["saved"] = _snapshot(emb, opt)
    save_sharded(ck_a, emb, opt)
    _train(emb, opt, case, range(SAVED_AT, STEPS), 4, rank)
    out["uninterrupted"] = _snapshot(emb, opt)
    if rank < 2:
        emb2, opt2 = _module(case, pair, fresh=True)
        load_sharded(ck_a, emb2, opt2)
        out["loaded_w2"] = _snapshot(emb2, opt2)
        _train(emb2, opt2, case, range(SAVED_AT, STEPS), 2, rank)
        out["resumed_w2"] = _snapshot(emb2, opt2)
        save_sharded(ck_b, emb2, opt2)
    dist.barrier()  # checkpoint B is complete before world 4 reads it
    emb4, opt4 = _module(case, None, fresh=True)
    load_sharded(ck_b, emb4, opt4)
    out["w4_from_w2"] = _snapshot(emb4, opt4)
    emb4, opt4 = _module(case, None, fresh=True)
    load_sharded(ck_a, emb4, opt4)
    out["loaded_w4"] = _snapshot(emb4, opt4)
    if rank == 0:
        emb1, opt1 = _module(case, single, fresh=True)
        load_sharded(ck_a, emb1, opt1)
        out["loaded_w1"] = _snapshot(emb1, opt1)
    return out


def _unequal_step(rank, tmp):
    """Adam's step made to differ on rank 3: every rank's save refuses it, before any file is written."""
    from fastembed.torch._shard_checkpoint import save_sharded

    case = BY_NAME["adam"]
    emb, opt = _module(case, None, fresh=False)
    _train(emb, opt, case, range(1), 4, rank)
    if rank == 3:
        opt.state[emb.weight]["step"] += 1
    return _errors(lambda: save_sharded(f"{tmp}/ck_unequal", emb, opt))


def _one_rank_fails_load(rank, tmp):
    """Checkpoint A with the file only rank 3 reads deleted: rank 3 fails, the others are told, and no
    rank's module or optimizer changes."""
    from fastembed.torch._shard_checkpoint import load_sharded

    case, ck = BY_NAME["adam"], f"{tmp}/ck_missing"
    if rank == 0:
        shutil.copytree(f"{tmp}/ckA/adam", ck)
        with open(f"{ck}/manifest.json") as f:
            os.remove(f"{ck}/{json.load(f)['files'][3]['name']}")
    dist.barrier()
    emb, opt = _module(case, None, fresh=True)
    _train(emb, opt, case, range(1), 4, rank)
    before = _snapshot(emb, opt)
    error = _errors(lambda: load_sharded(ck, emb, opt))
    return {"error": error, "before": before, "after": _snapshot(emb, opt)}


def _node_local(rank, tmp):
    """Checkpoint D saved whole in node0/ck after one step; after a second step, a save in which ranks 0
    and 1 name node0/ck and ranks 2 and 3 node1/ck: one path on disks local to two nodes, each seen by
    its own ranks only (save_sharded compares no paths: the rank files are all it sees)."""
    from fastembed.torch._shard_checkpoint import save_sharded

    case, shared = BY_NAME["adam"], f"{tmp}/node0/ck"
    emb, opt = _module(case, None, fresh=False)
    _train(emb, opt, case, range(1), 4, rank)
    save_sharded(shared, emb, opt)
    saved = _snapshot(emb, opt)
    _train(emb, opt, case, range(1, 2), 4, rank)
    error = _errors(lambda: save_sharded(shared if rank < 2 else f"{tmp}/node1/ck", emb, opt))
    return {"saved": saved, "error": error}


def _crash(rank, tmp):
    """Checkpoint C saved whole, one more step, then a save during which rank CRASH_RANK dies right
    after writing its file (before the barrier the manifest waits for). The last thing the group does."""
    from fastembed.torch import _shard_checkpoint as ckpt

    group = dist.new_group(list(range(WORLD)), timeout=CRASH_TIMEOUT)
    case, ck = BY_NAME["adam"], f"{tmp}/ckC"
    emb, opt = _module(case, group, fresh=False)
    _train(emb, opt, case, range(2), 4, rank)
    saved = _snapshot(emb, opt)
    ckpt.save_sharded(ck, emb, opt)
    torch.save(saved, f"{tmp}/crash_saved{rank}.pt")
    _train(emb, opt, case, range(2, 3), 4, rank)
    if rank == CRASH_RANK:
        write = ckpt._write_rank_file

        def write_then_die(*args):
            write(*args)
            os._exit(CRASH_EXIT)
        ckpt._write_rank_file = write_then_die
    torch.save(_errors(lambda: ckpt.save_sharded(ck, emb, opt)), f"{tmp}/crash_error{rank}.pt")


def _child(rank, tmp):
    """One rank (this file run as a script; its traceback goes to its log, which the parent reads)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=COLLECTIVE_TIMEOUT)
    pair, single = dist.new_group([0, 1]), dist.new_group([0])
    cases = torch.load(f"{tmp}/cases.pt")
    results = {case["name"]: _run_case(case, rank, tmp, pair, single) for case in cases}
    results["unequal_step"] = _unequal_step(rank, tmp)
    results["one_rank_fails_load"] = _one_rank_fails_load(rank, tmp)
    results["node_local"] = _node_local(rank, tmp)
    torch.save(results, f"{tmp}/result{rank}.pt")
    _crash(rank, tmp)
    # the group lost a rank: leave without destroy_process_group, which could wait on it
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------- the parent

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded_ckpt")
    torch.save(CASES, tmp / "cases.pt")
    run_ranks(__file__, WORLD, tmp, JOIN_TIMEOUT,
              expected={rank: CRASH_EXIT if rank == CRASH_RANK else 0 for rank in range(WORLD)})
    return tmp, [torch.load(tmp / f"result{rank}.pt") for rank in range(WORLD)]


def _bounds(V, world):
    blocks = np.array_split(np.arange(V), world)
    return np.cumsum([0] + [len(b) for b in blocks]).tolist()


def _same_bits(a, b, what):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{what}: {a!r} vs {b!r}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        assert torch.equal(a.contiguous().view(ints), b.contiguous().view(ints)), f"{what} differs:\n{a}\n{b}"
    else:
        assert type(a) is type(b) and repr(a) == repr(b), f"{what}: {a!r} vs {b!r}"


def _whole(snapshots):
    """The saved table and state of a world: blocks and row-sharded entries concatenated in rank order,
    replicated entries checked equal on every rank."""
    block = torch.cat([s["block"] for s in snapshots])
    state = {}
    for key, value in snapshots[0]["state"].items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            state[key] = torch.cat([s["state"][key] for s in snapshots])
        else:
            for s in snapshots[1:]:
                _same_bits(s["state"][key], value, f"replicated {key}")
            state[key] = value
    return block, state


def _check_rows(snapshots, whole, V, what):
    """Each rank's snapshot is bitwise its rows of whole (block, state), rows from np.array_split."""
    block, state = whole
    bounds = _bounds(V, len(snapshots))
    for r, snap in enumerate(snapshots):
        start, stop = bounds[r], bounds[r + 1]
        assert snap["shard_rows"] == (start, stop), f"{what}, rank {r}"
        _same_bits(snap["block"], block[start:stop], f"{what}, rank {r}'s block")
        assert sorted(snap["state"]) == sorted(state), f"{what}, rank {r}'s state keys"
        for key, value in state.items():
            expected = value[start:stop] if isinstance(value, torch.Tensor) and value.dim() > 0 else value
            _same_bits(snap["state"][key], expected, f"{what}, rank {r}'s {key}")


LOADS = [("loaded_w2", "saved", 2), ("loaded_w4", "saved", 4), ("loaded_w1", "saved", 1),
         ("w4_from_w2", "resumed_w2", 4)]


@pytest.mark.parametrize("load, source, world", LOADS, ids=[f"{s}->{l}" for l, s, _ in LOADS])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_load_gives_each_rank_its_rows_of_the_saved_table(run, case, load, source, world):
    _, results = run
    source_world = 2 if source == "resumed_w2" else 4
    saved = [results[r][case["name"]][source] for r in range(source_world)]
    loaded = [results[r][case["name"]][load] for r in range(world)]
    whole = _whole(saved)
    assert whole[1], "the optimizer has state to save"  # (else this test would check little)
    _check_rows(loaded, whole, case["V"], f"{case['name']}: {load}")
    lr = OPTIMIZERS[case["optimizer"]][2]["lr"]
    assert all(snap["lr"] == lr for snap in loaded), "the load gives the weight's param_group the saved lr"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_resumed_training_is_uninterrupted_training(run, case):
    """4 ranks train SAVED_AT steps and save; 2 ranks load and train the rest: bitwise the 4 ranks'
    uninterrupted run, and one layer's over the whole table (see the module docstring)."""
    _, results = run
    resumed = _whole([results[r][case["name"]]["resumed_w2"] for r in range(2)])
    uninterrupted = _whole([results[r][case["name"]]["uninterrupted"] for r in range(WORLD)])
    _same_bits(resumed[0], uninterrupted[0], "the resumed table")
    assert sorted(resumed[1]) == sorted(uninterrupted[1])
    for key in resumed[1]:
        _same_bits(resumed[1][key], uninterrupted[1][key], f"the resumed {key}")

    if _is_fused(case):  # one fastembed.torch.Embedding with the same fused rule
        from fastembed.torch import Embedding

        emb = Embedding(case["V"], case["D"], padding_idx=case["padding_idx"], _weight=case["table"].clone(),
                        fused=_optimizer(case))
        opt = None
    else:
        emb = torch.nn.Embedding(case["V"], case["D"], padding_idx=case["padding_idx"], _weight=case["table"].clone())
        opt = _optimizer(case, emb.parameters())
    for step in case["steps"]:
        _train(emb, opt, {"steps": [{"splits": {1: [(step["ids"], step["grads"])]}}]}, [0], 1, 0)
    one = _snapshot_of_one(emb, opt)
    _same_bits(uninterrupted[0], one["block"], "the sharded run against one embedding")
    assert sorted(one["state"]) == sorted(uninterrupted[1])
    for key, value in one["state"].items():
        _same_bits(uninterrupted[1][key], value, f"the sharded run's {key} against one embedding")


def _snapshot_of_one(emb, opt):
    emb.shard_rows = None  # (_snapshot reads it; a single-process layer has none)
    return _snapshot(emb, opt)


def test_unequal_replicated_entry_is_refused_at_save(run):
    tmp, results = run
    for rank in range(WORLD):
        error = results[rank]["unequal_step"]
        assert error is not None and error[0] == "ValueError", f"rank {rank}: {error}"
        assert "'step' is not the same value on every rank" in error[1], error[1]
    assert os.listdir(tmp / "ck_unequal") == [], "a refused save wrote files"


def test_a_rank_that_fails_to_load_fails_the_group_and_nothing_changes(run):
    _, results = run
    for rank in range(WORLD):
        res = results[rank]["one_rank_fails_load"]
        if rank == 3:
            assert res["error"][0] == "FileNotFoundError" and "rank 3's" in res["error"][1], res["error"]
        else:
            assert res["error"][0] == "_RankFailed" and "rank 3" in res["error"][1], res["error"]
            assert "FileNotFoundError" in res["error"][1]
        _same_bits(res["after"]["block"], res["before"]["block"], f"rank {rank}'s block after the failed load")
        assert sorted(res["after"]["state"]) == sorted(res["before"]["state"])
        for key, value in res["before"]["state"].items():
            _same_bits(res["after"]["state"][key], value, f"rank {rank}'s {key} after the failed load")
        assert res["after"]["lr"] == res["before"]["lr"]


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


def test_a_save_that_died_leaves_the_previous_checkpoint(run, group_of_one):
    from fastembed.torch._shard_checkpoint import load_sharded, save_sharded

    tmp, _ = run
    ck = tmp / "ckC"
    for rank in range(WORLD):
        if rank != CRASH_RANK:  # the survivors were told the save failed
            error = torch.load(tmp / f"crash_error{rank}.pt")
            assert error is not None, f"rank {rank}'s save returned though rank {CRASH_RANK} died"
            assert error[0] == "CollectiveError" and "save_sharded (writing the rank files)" in error[1], error
    manifest = json.loads((ck / "manifest.json").read_text())
    names = {f["name"] for f in manifest["files"]}
    strays = [n for n in os.listdir(ck) if n.startswith("shard-") and n not in names]
    assert strays, "the crashed save wrote no file (the crash came too early to test anything)"
    assert all(manifest["save_id"] not in n for n in strays)

    case = BY_NAME["adam"]
    whole = _whole([torch.load(tmp / f"crash_saved{rank}.pt") for rank in range(WORLD)])
    emb, opt = _module(case, None, fresh=True)
    load_sharded(str(ck), emb, opt)
    _check_rows([_snapshot(emb, opt)], whole, case["V"], "the checkpoint before the crash")

    save_sharded(str(ck), emb, opt)  # a later save removes the crashed save's files and the old ones
    manifest = json.loads((ck / "manifest.json").read_text())
    assert sorted(os.listdir(ck)) == sorted(["manifest.json", manifest["files"][0]["name"]])


def test_a_directory_rank_0_does_not_fully_see_is_refused_everywhere(run, group_of_one):
    """Node-local directories (`_node_local`): rank 0 does not see ranks 2 and 3's files, so every rank
    raises the same error naming them, no manifest is written, each rank's file of the refused save is
    gone from its own directory, and the checkpoint already in node0/ck loads as it was saved."""
    from fastembed.torch._shard_checkpoint import load_sharded

    tmp, results = run
    errors = [results[rank]["node_local"]["error"] for rank in range(WORLD)]
    assert errors[0] is not None and errors[0][0] == "NotSharedError", errors[0]
    assert all(e == errors[0] for e in errors), errors  # the same type and words on every rank
    message = errors[0][1]
    for rank in (2, 3):
        assert re.search(rf"shard-[0-9a-f]{{32}}-0000{rank}-of-00004\.pt \(rank {rank}'s\): missing", message), message
    assert "(rank 0's)" not in message and "(rank 1's)" not in message, message
    assert "shared by all ranks" in message and "No manifest was written" in message

    ck = tmp / "node0" / "ck"
    manifest = json.loads((ck / "manifest.json").read_text())
    assert sorted(os.listdir(ck)) == sorted(["manifest.json"] + [f["name"] for f in manifest["files"]])
    assert os.listdir(tmp / "node1" / "ck") == []
    case = BY_NAME["adam"]
    emb, opt = _module(case, None, fresh=True)
    load_sharded(str(ck), emb, opt)
    whole = _whole([results[rank]["node_local"]["saved"] for rank in range(WORLD)])
    _check_rows([_snapshot(emb, opt)], whole, case["V"], "the checkpoint before the refused save")


def test_a_rank_file_rank_0_sees_shorter_is_refused(tmp_path, group_of_one, monkeypatch):
    """A file that rank 0 finds with another size than its rank wrote (a copy cut short on the way):
    refused as a file it does not see, the previous checkpoint kept."""
    from fastembed.torch import _shard_checkpoint as ckpt
    from fastembed.torch.distributed import ShardedEmbedding

    ck = tmp_path / "ck"
    emb = ShardedEmbedding(6, 3)
    ckpt.save_sharded(str(ck), emb)
    before = {name: (ck / name).read_bytes() for name in os.listdir(ck)}
    write = ckpt._write_rank_file

    def write_then_cut(directory, name, payload):
        size, digest = write(directory, name, payload)
        os.truncate(os.path.join(directory, name), size - 1)
        return size, digest

    monkeypatch.setattr(ckpt, "_write_rank_file", write_then_cut)
    with torch.no_grad():
        emb.weight.add_(1)
    cut_short = r"-00000-of-00001\.pt \(rank 0's\): (\d+) bytes, its rank wrote"
    with pytest.raises(ckpt.NotSharedError, match=cut_short) as info:
        ckpt.save_sharded(str(ck), emb)
    cut, wrote = re.search(r"(\d+) bytes, its rank wrote (\d+)", str(info.value)).groups()
    assert int(cut) == int(wrote) - 1
    after = {name: (ck / name).read_bytes() for name in os.listdir(ck)}
    assert after == before, "the refused save changed the directory"


def test_a_fused_rule_shared_by_other_tables_keeps_its_values(tmp_path, group_of_one):
    """One rule object given to two sharded tables and a fastembed.torch.Embedding: loading a checkpoint
    into one table gives that table the saved hyperparameters and leaves the rule (so the others) as it was."""
    from fastembed.torch import Embedding
    from fastembed.torch._shard_checkpoint import load_sharded, save_sharded
    from fastembed.torch.distributed import ShardedEmbedding
    from fastembed.torch.optim import FusedSparseAdam

    ids, grad = torch.tensor([0, 4, 4]), torch.linspace(-1, 1, 9).reshape(3, 3)
    saved = ShardedEmbedding(6, 3, fused=FusedSparseAdam(lr=0.05, betas=(0.8, 0.9), eps=1e-6))
    saved(ids).backward(grad)
    save_sharded(str(tmp_path / "ck"), saved)

    shared = FusedSparseAdam(lr=0.5)
    a, b = ShardedEmbedding(6, 3, fused=shared), ShardedEmbedding(6, 3, fused=shared)
    local = Embedding(6, 3, fused=shared)
    load_sharded(str(tmp_path / "ck"), a)
    assert (shared.lr, shared.betas, shared.eps) == (0.5, (0.9, 0.999), 1e-8), shared
    assert b.fused is shared and local.fused is shared
    assert type(a.fused) is FusedSparseAdam and (a.fused.lr, a.fused.betas, a.fused.eps) == (0.05, (0.8, 0.9), 1e-6)

    # each table steps with its own values: a as the saved table does, b as a table with a rule of its own
    twin = ShardedEmbedding(6, 3, fused=FusedSparseAdam(lr=0.5), _weight=b.weight.detach())
    for table in (saved, a, b, twin):
        table(ids).backward(grad)
    assert torch.equal(a.weight, saved.weight) and torch.equal(b.weight, twin.weight)

    # a rule that already holds the saved values stays the module's (shared with whoever holds it)
    same = FusedSparseAdam(lr=0.05, betas=(0.8, 0.9), eps=1e-6)
    c = ShardedEmbedding(6, 3, fused=same)
    load_sharded(str(tmp_path / "ck"), c)
    assert c.fused is same


def _copy_checkpoint(run, tmp_path, name="adam"):
    tmp, _ = run
    ck = tmp_path / "ck"
    shutil.copytree(tmp / "ckA" / name, ck)
    return ck, json.loads((ck / "manifest.json").read_text())


def _loaded_into(case, ck, *, V=None, D=None, dtype=None, padding_idx="case", optimizer="case"):
    """A fresh module (trained one step, so its optimizer has state) and the error of loading ck into
    it, with its snapshots before and after."""
    from fastembed.torch._shard_checkpoint import load_sharded
    from fastembed.torch.distributed import ShardedEmbedding

    V, D = V or case["V"], D or case["D"]
    dtype = dtype or case["dtype"]
    pad = case["padding_idx"] if padding_idx == "case" else padding_idx
    emb = ShardedEmbedding(V, D, padding_idx=pad, dtype=dtype)
    opt = _optimizer(case, emb.parameters(), 3.0) if optimizer == "case" else optimizer(emb.parameters(), lr=0.5)
    emb(torch.arange(min(V, 4))).sum().backward()
    opt.step()
    before = _snapshot(emb, opt)
    with pytest.raises(Exception) as info:
        load_sharded(str(ck), emb, opt)
    after = _snapshot(emb, opt)
    _same_bits(after["block"], before["block"], "the block after a refused load")
    assert sorted(after["state"]) == sorted(before["state"])
    for key in before["state"]:
        _same_bits(after["state"][key], before["state"][key], f"{key} after a refused load")
    assert after["lr"] == before["lr"]
    return info


@pytest.mark.parametrize("change, message", [
    ({"V": 11}, "num_embeddings=10, the module num_embeddings=11"),
    ({"D": 4}, "embedding_dim=3, the module embedding_dim=4"),
    ({"dtype": torch.float64}, "dtype=float32, the module dtype=float64"),
    ({"padding_idx": None}, "padding_idx=4, the module padding_idx=None"),
    ({"optimizer": torch.optim.SGD}, "optimizer is torch.optim.adam.Adam, the one given torch.optim.sgd.SGD"),
])
def test_a_mismatched_module_is_refused_and_unchanged(run, tmp_path, group_of_one, change, message):
    ck, _ = _copy_checkpoint(run, tmp_path)
    info = _loaded_into(BY_NAME["adam"], ck, **change)
    assert info.type is ValueError and message in str(info.value), str(info.value)


def test_a_missing_file_is_refused_and_nothing_changes(run, tmp_path, group_of_one):
    ck, manifest = _copy_checkpoint(run, tmp_path)
    name = manifest["files"][2]["name"]
    os.remove(ck / name)
    info = _loaded_into(BY_NAME["adam"], ck)
    assert info.type is FileNotFoundError and name in str(info.value) and "missing" in str(info.value)


def test_a_corrupt_file_is_refused_and_nothing_changes(run, tmp_path, group_of_one):
    ck, manifest = _copy_checkpoint(run, tmp_path)
    name = manifest["files"][1]["name"]
    data = bytearray((ck / name).read_bytes())
    # one bit of the weight's bytes (the block's first value, which the file holds verbatim)
    saved = torch.load(ck / name, weights_only=True)["weight"]
    at = bytes(data).find(saved.numpy().tobytes())
    assert at > 0
    data[at] ^= 1
    (ck / name).write_bytes(bytes(data))
    info = _loaded_into(BY_NAME["adam"], ck)
    assert info.type is ValueError and f"{name} is corrupt" in str(info.value), str(info.value)


def test_a_missing_or_foreign_manifest_is_refused(run, tmp_path, group_of_one):
    ck, manifest = _copy_checkpoint(run, tmp_path)
    os.remove(ck / "manifest.json")
    info = _loaded_into(BY_NAME["adam"], ck)
    assert info.type is FileNotFoundError and "manifest.json is missing" in str(info.value)
    (ck / "manifest.json").write_text(json.dumps(dict(manifest, version=99)))
    info = _loaded_into(BY_NAME["adam"], ck)
    assert info.type is ValueError and "version 99" in str(info.value)


def test_state_that_is_neither_rows_nor_replicated_is_refused_at_save(tmp_path, group_of_one):
    from fastembed.torch._shard_checkpoint import save_sharded
    from fastembed.torch.distributed import ShardedEmbedding

    emb = ShardedEmbedding(6, 3)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    opt.state[emb.weight]["odd"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"\['odd'\] has shape \(4,\)"):
        save_sharded(str(tmp_path / "ck"), emb, opt)
    opt.state[emb.weight]["odd"] = "text"
    with pytest.raises(TypeError, match=r"\['odd'\] is a str"):
        save_sharded(str(tmp_path / "ck"), emb, opt)
    assert not (tmp_path / "ck").exists() or os.listdir(tmp_path / "ck") == []


def test_fastembed_drop_in_and_torch_optimizer_load_each_others_checkpoints(run, group_of_one):
    """fastembed.torch.optim.Adam keeps torch.optim.Adam's state: its world-4 checkpoint loads into torch's."""
    from fastembed.torch._shard_checkpoint import load_sharded
    from fastembed.torch.distributed import ShardedEmbedding

    tmp, results = run
    case = BY_NAME["fe_adam"]
    emb = ShardedEmbedding(case["V"], case["D"])
    opt = torch.optim.Adam(emb.parameters(), lr=1.0)
    load_sharded(str(tmp / "ckA" / "fe_adam"), emb, opt)
    whole = _whole([results[r]["fe_adam"]["saved"] for r in range(WORLD)])
    _check_rows([_snapshot(emb, opt)], whole, case["V"], "fastembed's Adam checkpoint in torch's Adam")
    assert opt.param_groups[0]["lr"] == OPTIMIZERS["fe_adam"][2]["lr"]


def test_python_number_state_round_trips(tmp_path, group_of_one):
    """SparseAdam counts its step in a Python int: saved once, given back as an int."""
    from fastembed.torch._shard_checkpoint import load_sharded, save_sharded
    from fastembed.torch.distributed import ShardedEmbedding
    from fastembed.torch.optim import SparseAdam

    emb = ShardedEmbedding(5, 2, sparse=True)
    opt = SparseAdam(emb.parameters(), lr=0.1)
    for ids in ([0, 3], [3, 4, 1]):
        opt.zero_grad()
        emb(torch.tensor(ids)).sum().backward()
        opt.step()
    assert type(opt.state[emb.weight]["step"]) is int
    save_sharded(str(tmp_path / "ck"), emb, opt)
    emb2 = ShardedEmbedding(5, 2, sparse=True)
    opt2 = SparseAdam(emb2.parameters(), lr=0.5, betas=(0.5, 0.5))
    load_sharded(str(tmp_path / "ck"), emb2, opt2)
    _check_rows([_snapshot(emb2, opt2)], _whole([_snapshot(emb, opt)]), 5, "SparseAdam's state")
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999) and opt2.param_groups[0]["lr"] == 0.1


if __name__ == "__main__":
    _child(*rank_argv())
