"""Checkpoints of a `ShardedEmbedding`: one file per rank plus a manifest, resharded on load.

A checkpoint directory holds ``manifest.json`` and the rank files it names,
``shard-<save id>-<rank>-of-<world>.pt``, each a ``torch.save`` of that rank's block (its rows of the
table), its rows of the fused rule's buffers (``optim_*``) and its rows of the optimizer's state for
the weight. The manifest (JSON) records the table (V, D, dtype, padding_idx), the world size and row
bounds of the save, each file's rows, size and SHA-256, the state entries' kinds, the values of the
entries that are the same on every rank (a step count), and the optimizer's class and hyperparameters.

Crash safety: every save has a fresh id, so its rank files never overwrite the files of the checkpoint
already in the directory; each file is written under a temporary name, flushed and renamed; only after
every rank has reported its file (a collective) and group rank 0 has found every reported file, of the
reported size, in the directory as it sees it (one filesystem shared by all ranks: in a node-local
directory rank 0 would not see the other nodes' files, and the save is refused on every rank) does
rank 0 write the manifest, under a temporary name, then ``os.replace`` it over the old one. The
manifest is the commit point: a save that dies before it leaves the previous checkpoint loadable (its
manifest and files untouched), and the files of a half-finished save are named by no manifest, so they
are never read. After the new manifest is in place, rank 0 removes the rank files no manifest names
(the previous checkpoint's, a crashed save's).

Loading reads, on each rank, only the saved files whose rows overlap its current ``shard_rows`` and
copies the overlapping rows: the world size may differ from the save's (4 ranks saved, 2 load, and back),
and the result is bitwise the rows of the saved table. Both functions are collectives over the module's
process group: a rank that fails tells the others, and all of them raise before anything changes; a
rank that dies (or hangs past the process group's timeout) makes the others raise
`fastembed.torch.distributed.CollectiveError`.
"""
import copy
import hashlib
import json
import os
import re
import uuid

import torch
import torch.distributed as dist

__all__ = ["NotSharedError", "save_sharded", "load_sharded"]

FORMAT = "fastembed.sharded_checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_RANK_FILE = re.compile(r"shard-[0-9a-f]{32}-\d{5}-of-\d{5}\.pt\Z")
_FUSED_PREFIX = "optim_"


class _RankFailed(RuntimeError):
    """Another rank of the group failed; raised on the ranks that did not."""


# ---------------------------------------------------------------- small helpers

def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _dtype(name):
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"the checkpoint names an unknown dtype {name!r}")
    return dtype


def _qualname(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _optimizer_family(optimizer):
    """The torch.optim class an optimizer implements (fastembed.torch.optim's drop-ins keep torch's
    state, so a checkpoint moves between them and torch's own), else its own class."""
    for cls in type(optimizer).__mro__:
        if cls.__module__.startswith("torch.optim") and cls is not torch.optim.Optimizer:
            return _qualname(cls)
    return _qualname(type(optimizer))


def _encode(value, what):
    """A hyperparameter as JSON: numbers, bools, strings, None; tuples as lists; a 0-d tensor as
    {"tensor": value, "dtype": name}."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_encode(v, what) for v in value]
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad:
        return {"tensor": value.item(), "dtype": _dtype_name(value.dtype)}
    raise TypeError(f"cannot save {what} = {value!r} (type {type(value).__name__}): a checkpoint keeps numbers, "
                    f"bools, strings, None, tuples of those and 0-d tensors")


def _decode(value):
    """The inverse of _encode; lists come back as tuples (torch's own hyperparameters, betas, are)."""
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict):
        return torch.tensor(value["tensor"], dtype=_dtype(value["dtype"]))
    return value


def _scalar_json(value):
    """A replicated state entry as JSON, exact: a Python float's repr round-trips, and a float32/float16
    tensor's value is a float64 exactly."""
    if isinstance(value, torch.Tensor):
        return {"tensor": value.item(), "dtype": _dtype_name(value.dtype)}
    return {"python": value}


def _scalar_value(entry, device):
    if "tensor" in entry:
        return torch.tensor(entry["tensor"], dtype=_dtype(entry["dtype"]), device=device)
    return entry["python"]


def _same_bits(a, b):
    """Two replicated entries are equal bit for bit (type and dtype included; NaN == NaN, 0.0 != -0.0)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _classify(key, value, rows, dim, what):
    """The kind of one state entry of a (rows, dim) block: ("rows", dtype name, trailing shape) for a
    tensor whose first axis is the block's rows (the block's shape, or (rows,)), ("scalar", json) for a
    0-d tensor, a Python number or None. Anything else is refused: resharding it would be a guess."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"{what}[{key!r}] is a {value.layout} tensor; a checkpoint keeps dense tensors only")
        if value.dim() == 0:
            return ("scalar", _scalar_json(value.detach().cpu()))
        if tuple(value.shape) in ((rows, dim), (rows,)):
            return ("rows", _dtype_name(value.dtype), list(value.shape[1:]))
        raise ValueError(f"{what}[{key!r}] has shape {tuple(value.shape)}: not the block's shape ({rows}, {dim}), "
                         f"nor ({rows},), nor 0-d, so it cannot be split by rows or replicated")
    if value is None or isinstance(value, (bool, int, float)):
        return ("scalar", _scalar_json(value))
    raise TypeError(f"{what}[{key!r}] is a {type(value).__name__}; a checkpoint keeps tensors, Python numbers "
                    f"and None only")


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path):
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _weight_group(optimizer, weight):
    for group in optimizer.param_groups:
        if any(p is weight for p in group["params"]):
            return group
    raise ValueError(f"the optimizer ({type(optimizer).__name__}) does not hold the module's weight")


def _fused_buffers(module):
    return {name[len(_FUSED_PREFIX):]: buf for name, buf in module.named_buffers(recurse=False)
            if name.startswith(_FUSED_PREFIX)}


def _fused_hyperparameters(rule):
    """A fused rule's hyperparameters: its public attributes, and those behind a property (lr is kept in
    _lr and checked by its setter)."""
    out = {}
    for k, v in sorted(vars(rule).items()):
        name = k[1:] if k.startswith("_") and isinstance(getattr(type(rule), k[1:], None), property) else k
        if not name.startswith("_"):
            out[name] = _encode(v, f"fused.{name}")
    return out


def _group_info(module):
    group = module.process_group
    return group, dist.get_rank(group), dist.get_world_size(group)


def _exchange(item, group, world_size, action):
    """Every rank's item, in group-rank order (a collective). A collective that fails (a rank died, or
    hung past the group's timeout) is a CollectiveError, as ShardedEmbedding's own."""
    from .distributed import _RECENT_WORK, CollectiveError  # (distributed re-exports this module's functions)

    items = [None] * world_size
    try:
        dist.all_gather_object(items, item, group=group)
        # all_gather_object keeps no handle on its collectives, whose last reference gloo's worker thread may
        # hold: freed there while the process finalises (a save just before exit), they abort it (see
        # distributed._RECENT_WORK). A barrier after it, waited on with the GIL released, lets the worker
        # finish with them; the barrier's own work is held here.
        work = dist.barrier(group=group, async_op=True)
        work.wait()
        _RECENT_WORK.append(work)
    except Exception as exc:  # noqa: BLE001  (gloo raises RuntimeError or its DistBackendError subclass)
        raise CollectiveError(f"{action}: a collective over the group failed (a rank died, or hung past the "
                              f"process group's timeout); the group is not usable after it: {exc}") from exc
    return items


def _raise_if_any_failed(statuses, rank, error, action):
    """After an exchange of statuses (None or "Type: message" per rank): this rank's own error, or the
    first failed rank's on the others."""
    if error is not None:
        raise error
    for r, status in enumerate(statuses):
        if status is not None:
            raise _RankFailed(f"{action} failed on rank {r} of the group (nothing changed here): {status}")


def _status(exc):
    return None if exc is None else f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- save

def _describe(module, optimizer):
    """This rank's part of the manifest and what its file holds, checked (raises before any write)."""
    start, stop = module.shard_rows
    weight = module.weight
    rows, dim = stop - start, module.embedding_dim
    if tuple(weight.shape) != (rows, dim) or weight.layout != torch.strided:
        raise ValueError(f"the module's weight has shape {tuple(weight.shape)}, not its block's ({rows}, {dim})")
    desc = {"fused": None, "optimizer": None}
    payload = {"rows": [start, stop], "weight": weight.detach().cpu(), "fused": {}, "optimizer": {}}

    def entries(state, what, into):
        kinds = {}
        for key, value in sorted(state.items()):
            kind = _classify(key, value, rows, dim, what)
            kinds[key] = list(kind)
            if kind[0] == "rows":
                into[key] = value.detach().cpu()
        return kinds

    rule = getattr(module, "fused", None)
    buffers = _fused_buffers(module)
    if rule is not None or buffers:
        desc["fused"] = {"rule": None if rule is None else _qualname(type(rule)),
                         "hyperparameters": None if rule is None else _fused_hyperparameters(rule),
                         "state": entries(buffers, "the fused rule's buffer", payload["fused"])}
    if optimizer is not None:
        group = _weight_group(optimizer, weight)
        state = optimizer.state.get(weight, {})
        desc["optimizer"] = {
            "class": _qualname(type(optimizer)), "family": _optimizer_family(optimizer),
            "hyperparameters": {k: _encode(v, f"param_group[{k!r}]") for k, v in sorted(group.items())
                                if k != "params"},
            "state": entries(state, "the optimizer's state", payload["optimizer"])}
    return desc, payload


def _agree(descs):
    """Every rank's description must be the same (kinds, dtypes, replicated values, hyperparameters)."""
    for r, desc in enumerate(descs[1:], 1):
        for part in ("fused", "optimizer"):
            a, b = descs[0][part], desc[part]
            if (a is None) != (b is None):
                raise ValueError(f"rank 0 has {'no ' if a is None else ''}{part} state, rank {r} "
                                 f"{'has' if a is None else 'has none'}")
            if a is None:
                continue
            for field in a:
                if field == "state" and sorted(a["state"]) != sorted(b["state"]):
                    raise ValueError(f"the {part} state's keys differ: rank 0 {sorted(a['state'])}, "
                                     f"rank {r} {sorted(b['state'])}")
                if field == "state":
                    for key in a["state"]:
                        if not _same_bits(a["state"][key], b["state"][key]):
                            what = "value" if a["state"][key][0] == "scalar" == b["state"][key][0] else "kind"
                            raise ValueError(f"the {part} state entry {key!r} is not the same {what} on every rank "
                                             f"(rank 0: {a['state'][key]}, rank {r}: {b['state'][key]}); a "
                                             f"replicated entry must be equal everywhere to be saved once")
                elif not _same_bits(a[field], b[field]):
                    raise ValueError(f"the {part} {field} differ: rank 0 {a[field]}, rank {r} {b[field]}")


def _write_rank_file(directory, name, payload):
    """payload to directory/name through a temporary name, flushed; returns (bytes, sha256)."""
    final, tmp = os.path.join(directory, name), os.path.join(directory, f".{name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    digest, size = _sha256(tmp)
    os.replace(tmp, final)
    _fsync_dir(directory)  # the name is durable before the manifest that names it can be
    return size, digest


def _write_manifest(directory, manifest):
    final = os.path.join(directory, MANIFEST)
    tmp = os.path.join(directory, f".{MANIFEST}.{manifest['save_id']}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)


def _unseen_files(directory, infos):
    """The reported rank files that group rank 0 does not find in directory with the size their rank
    reported: in a node-local directory, the other nodes' files. Sizes only: the names are new to this
    save, so a file of that name and size is the one its rank wrote, and hashing every file on rank 0
    would read the whole table there at each save (load_sharded checks the SHA-256 of what it reads)."""
    unseen = []
    for info in infos:
        what = f"{info['name']} (rank {info['rank']}'s)"
        try:
            size = os.stat(os.path.join(directory, info["name"])).st_size
        except FileNotFoundError:
            unseen.append(f"{what}: missing")
        except OSError as exc:
            unseen.append(f"{what}: {exc.strerror or exc}")
        else:
            if size != info["bytes"]:
                unseen.append(f"{what}: {size} bytes, its rank wrote {info['bytes']}")
    return unseen


class NotSharedError(RuntimeError):
    """save_sharded's directory is not one filesystem every rank of the group sees."""


def _not_shared(directory, unseen):
    return NotSharedError(
        f"save_sharded: group rank 0 does not see every rank's file in {directory!r} as its rank wrote it: "
        f"{'; '.join(unseen)}. The directory must be one filesystem shared by all ranks of the group (a "
        f"node-local directory holds only its own node's files). No manifest was written: the directory's "
        f"previous checkpoint, if any, is unchanged")


def _remove_unnamed_files(directory, manifest):
    """The rank files (and temporaries) no manifest names: the previous checkpoint's, a crashed save's."""
    keep = {f["name"] for f in manifest["files"]}
    for name in os.listdir(directory):
        stale = (_RANK_FILE.match(name) and name not in keep) or (
            name.startswith(".") and name.endswith(".tmp") and (_RANK_FILE.match(name[1:-4])
                                                                 or name.startswith(f".{MANIFEST}.")))
        if stale:
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def save_sharded(directory, module, optimizer=None):
    """Save a `ShardedEmbedding` (and ``optimizer``'s state for its weight) to ``directory``.

    A collective over ``module.process_group``: every rank calls it with the same directory (one
    filesystem all ranks see). Each rank writes its own file: its block, its rows of the fused rule's
    buffers and of the optimizer's state; group rank 0 writes ``manifest.json`` once every file is in
    place, atomically, which commits the checkpoint (see the module's docstring: a save that dies
    before that leaves the directory's previous checkpoint as it was, loadable). Rank 0 first checks
    that it sees every rank's file with the size that rank wrote: where it does not (a directory local
    to each node), every rank removes its own file and raises the same `NotSharedError` (a
    RuntimeError) naming the files, and no manifest is written.

    Optimizer state entries of the weight are tensors whose first axis is the block's rows (the block's
    shape, or (rows,) as RowWiseAdagrad's ``sum``), resharded on load, or 0-d tensors / Python numbers
    (Adam's ``step``) that must be equal bit for bit on every rank, saved once; anything else raises, as
    do replicated entries that differ between ranks, before any file is written. The optimizer's class
    and the hyperparameters of the weight's param_group are saved with it.
    """
    group, rank, world_size = _group_info(module)
    error = desc = payload = None
    try:
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        desc, payload = _describe(module, optimizer)
        os.makedirs(directory, exist_ok=True)
    except Exception as exc:  # noqa: BLE001  (told to the other ranks, then raised)
        error = exc
    # rank 0's id names this save's files: never the names of a checkpoint already in the directory
    items = _exchange((_status(error), desc, uuid.uuid4().hex), group, world_size, "save_sharded")
    _raise_if_any_failed([s for s, _, _ in items], rank, error, "save_sharded")
    descs, save_id = [d for _, d, _ in items], items[0][2]
    try:
        _agree(descs)
    except ValueError as exc:  # the same answer on every rank: each raises it
        raise ValueError(f"save_sharded: {exc}") from None

    name = f"shard-{save_id}-{rank:05d}-of-{world_size:05d}.pt"
    info = None
    try:
        size, digest = _write_rank_file(directory, name, payload)
        info = {"name": name, "rank": rank, "rows": payload["rows"], "bytes": size, "sha256": digest}
    except Exception as exc:  # noqa: BLE001
        error = exc
    # the barrier: the manifest is written only when every rank's file is in place
    items = _exchange((_status(error), info), group, world_size, "save_sharded (writing the rank files)")
    _raise_if_any_failed([s for s, _ in items], rank, error, "save_sharded (writing the rank files)")

    # rank 0 names only files it sees: in a node-local directory, a manifest naming the other nodes'
    # files would commit a checkpoint that cannot be loaded (and make rank 0 delete the one before it)
    unseen = _unseen_files(directory, [i for _, i in items]) if rank == 0 else None
    if rank == 0 and not unseen:
        manifest = {"format": FORMAT, "version": VERSION, "save_id": save_id,
                    "num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
                    "dtype": _dtype_name(module.weight.dtype), "padding_idx": module.padding_idx,
                    "world_size": world_size, "bounds": [int(b) for b in module._bounds],
                    "files": [i for _, i in items], "fused": descs[0]["fused"], "optimizer": descs[0]["optimizer"]}
        try:
            _write_manifest(directory, manifest)
        except Exception as exc:  # noqa: BLE001
            error = exc
        else:
            try:
                _remove_unnamed_files(directory, manifest)
            except OSError:  # the checkpoint is committed; a file left behind is only space
                pass
    # every rank returns only once the checkpoint is committed (or raises if it was not)
    items = _exchange((_status(error), unseen and (os.fspath(directory), unseen)), group, world_size,
                      "save_sharded (writing the manifest)")
    if items[0][1]:
        # Each rank takes back its own file (it sees it; rank 0 may not), so that the directory is left
        # as it was on every node, and raises the same error as every other rank (rank 0's words).
        try:
            os.remove(os.path.join(directory, name))
        except OSError:
            pass
        raise _not_shared(*items[0][1])
    _raise_if_any_failed([s for s, _ in items], rank, error, "save_sharded (writing the manifest)")


# ---------------------------------------------------------------- load

def _read_manifest(directory):
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no sharded checkpoint in {directory!r}: {MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a manifest (bad JSON: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastembed sharded checkpoint's manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} has format version {manifest.get('version')}; this fastembed reads version {VERSION}")
    try:
        _check_layout(manifest)
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"{path} is malformed ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return manifest


def _check_layout(manifest):
    bounds, V = manifest["bounds"], manifest["num_embeddings"]
    if (len(bounds) != manifest["world_size"] + 1 or bounds[0] != 0 or bounds[-1] != V
            or any(a > b for a, b in zip(bounds, bounds[1:]))
            or [f["rows"] for f in manifest["files"]] != [[a, b] for a, b in zip(bounds, bounds[1:])]):
        raise ValueError(f"the files' rows do not cover the table's {V} rows in order")
    for part in ("fused", "optimizer"):
        if manifest[part] is not None:
            for key, kind in manifest[part]["state"].items():
                if kind[0] not in ("rows", "scalar"):
                    raise ValueError(f"the {part} state entry {key!r} has an unknown kind {kind[0]!r}")


def _check_table(manifest, module):
    saved = (manifest["num_embeddings"], manifest["embedding_dim"], manifest["dtype"])
    here = (module.num_embeddings, module.embedding_dim, _dtype_name(module.weight.dtype))
    for what, a, b in zip(("num_embeddings", "embedding_dim", "dtype"), saved, here):
        if a != b:
            raise ValueError(f"the checkpoint's table has {what}={a}, the module {what}={b}")
    if manifest["padding_idx"] != module.padding_idx:
        raise ValueError(f"the checkpoint's table has padding_idx={manifest['padding_idx']}, "
                         f"the module padding_idx={module.padding_idx}")


def _check_fused(manifest, module):
    saved, rule, buffers = manifest["fused"], getattr(module, "fused", None), _fused_buffers(module)
    if saved is None:
        if rule is not None or buffers:
            raise ValueError("the module has a fused rule but the checkpoint has no fused state")
        return
    if saved["rule"] != (None if rule is None else _qualname(type(rule))):
        raise ValueError(f"the checkpoint's fused rule is {saved['rule']}, the module's "
                         f"{None if rule is None else _qualname(type(rule))}")
    if sorted(saved["state"]) != sorted(buffers):
        raise ValueError(f"the checkpoint's fused buffers are {sorted(saved['state'])}, the module's {sorted(buffers)}")
    for key, kind in saved["state"].items():
        buf = buffers[key]
        if kind[0] == "rows":
            ok = _dtype_name(buf.dtype) == kind[1] and list(buf.shape[1:]) == kind[2]
        else:
            ok = buf.dim() == 0 and "tensor" in kind[1] and _dtype_name(buf.dtype) == kind[1]["dtype"]
        if not ok:
            raise ValueError(f"the fused buffer optim_{key} is {buf.dtype} of shape {tuple(buf.shape)} here, "
                             f"the checkpoint's is {kind}")


def _check_optimizer(manifest, optimizer, weight):
    if optimizer is None:
        return None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    saved = manifest["optimizer"]
    if saved is None:
        raise ValueError("an optimizer was given but the checkpoint has no optimizer state")
    if saved["family"] != _optimizer_family(optimizer):
        raise ValueError(f"the checkpoint's optimizer is {saved['class']}, the one given {_qualname(type(optimizer))}")
    return _weight_group(optimizer, weight)


def _read_rank_file(directory, entry):
    path = os.path.join(directory, entry["name"])
    if not os.path.exists(path):
        raise FileNotFoundError(f"the checkpoint's file {entry['name']} (rank {entry['rank']}'s) is missing "
                                f"from {directory!r}")
    digest, size = _sha256(path)
    if size != entry["bytes"] or digest != entry["sha256"]:
        raise ValueError(f"the checkpoint's file {entry['name']} is corrupt: {size} bytes with SHA-256 {digest}, "
                         f"the manifest says {entry['bytes']} bytes with {entry['sha256']}")
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if payload.get("rows") != entry["rows"]:
        raise ValueError(f"the checkpoint's file {entry['name']} holds rows {payload.get('rows')}, "
                         f"the manifest says {entry['rows']}")
    return payload


def _assemble(manifest, directory, start, stop, device):
    """This rank's rows [start, stop) of the saved weight and of every row-sharded state entry, copied
    from the saved files that overlap them (and only those are read)."""
    D, dtype = manifest["embedding_dim"], _dtype(manifest["dtype"])
    specs = {("weight", None): (manifest["dtype"], [D])}
    for part in ("fused", "optimizer"):
        if manifest[part] is not None:
            for key, kind in manifest[part]["state"].items():
                if kind[0] == "rows":
                    specs[(part, key)] = (kind[1], kind[2])
    out = {k: torch.empty([stop - start] + tail, dtype=_dtype(name), device=device) for k, (name, tail) in specs.items()}
    assert out[("weight", None)].dtype == dtype
    for entry in manifest["files"]:
        lo, hi = entry["rows"]
        a, b = max(lo, start), min(hi, stop)
        if a >= b:
            continue
        payload = _read_rank_file(directory, entry)
        for (part, key), (name, tail) in specs.items():
            saved = payload["weight"] if part == "weight" else payload.get(part, {}).get(key)
            if not isinstance(saved, torch.Tensor) or saved.dtype != _dtype(name) or \
                    list(saved.shape) != [hi - lo] + tail:
                what = "the weight" if part == "weight" else f"{part} state {key!r}"
                got = "nothing" if saved is None else (f"{saved.dtype} of shape {tuple(saved.shape)}"
                                                       if isinstance(saved, torch.Tensor) else type(saved).__name__)
                raise ValueError(f"the checkpoint's file {entry['name']} holds {got} as {what}, not "
                                 f"{name} of shape {tuple([hi - lo] + tail)}")
            out[(part, key)][a - start:b - start].copy_(saved[a - lo:b - lo])
    return out


def _prepare_load(directory, module, optimizer):
    """Everything a load will change, read and checked; nothing changed yet."""
    manifest = _read_manifest(directory)
    _check_table(manifest, module)
    _check_fused(manifest, module)
    group = _check_optimizer(manifest, optimizer, module.weight)
    start, stop = module.shard_rows
    device = module.weight.device
    blocks = _assemble(manifest, directory, start, stop, device)
    fused = {}
    if manifest["fused"] is not None:
        for key, kind in manifest["fused"]["state"].items():
            fused[key] = blocks[("fused", key)] if kind[0] == "rows" else _scalar_value(kind[1], device)
    state = hyper = None
    if group is not None:
        state = {}
        for key, kind in manifest["optimizer"]["state"].items():
            state[key] = blocks[("optimizer", key)] if kind[0] == "rows" else _scalar_value(kind[1], device)
        hyper = {k: _decode(v) for k, v in manifest["optimizer"]["hyperparameters"].items()}
    rule_hyper = None
    saved_hyper = None if manifest["fused"] is None else manifest["fused"]["hyperparameters"]
    if saved_hyper is not None and not _same_bits(saved_hyper, _fused_hyperparameters(module.fused)):
        rule_hyper = {k: _decode(v) for k, v in saved_hyper.items()}
        trial = copy.copy(module.fused)  # the rule's own checks (its lr setter), on a copy
        for k, v in rule_hyper.items():
            if not hasattr(trial, k):
                raise ValueError(f"the checkpoint's fused rule has a hyperparameter {k!r} that "
                                 f"{type(trial).__name__} has not")
            setattr(trial, k, v)
    return blocks[("weight", None)], fused, rule_hyper, group, state, hyper


def load_sharded(directory, module, optimizer=None):
    """Load a checkpoint written by `save_sharded` into a `ShardedEmbedding` (and ``optimizer``).

    A collective over ``module.process_group``. Each rank reads ``manifest.json``, checks the table
    (num_embeddings, embedding_dim, dtype, padding_idx: a mismatch raises ValueError naming both
    values), the fused rule's class and buffers, and the optimizer's class (torch.optim's class it
    implements, so fastembed.torch.optim's drop-ins and torch's own load each other's checkpoints),
    then builds its block for its CURRENT ``shard_rows`` from the saved files that overlap it (each
    file's size and SHA-256 checked against the manifest, read with ``torch.load(weights_only=True)``):
    the world size may differ from the save's. Row-sharded state entries are resharded the same way,
    replicated ones (a step count) given to every rank; the optimizer's state for the weight is
    replaced by the loaded one and the weight's param_group takes the saved hyperparameters (as
    ``Optimizer.load_state_dict`` does: other parameters of that group see them too). A fused rule's
    hyperparameters are the module's own: the rule object it was given is never changed (other tables
    may hold it); where the saved ones differ from its values, ``module.fused`` becomes a copy of it
    holding the saved ones (change the lr there after such a load, not on the rule first given).

    Every rank reads and checks everything before anything changes; if any rank fails, every rank
    raises (the failing one its own error, the others a RuntimeError naming it) and no module or
    optimizer of the group has changed.
    """
    group_, rank, world_size = _group_info(module)
    error = prepared = None
    try:
        prepared = _prepare_load(directory, module, optimizer)
    except Exception as exc:  # noqa: BLE001  (told to the other ranks, then raised)
        error = exc
    statuses = _exchange(_status(error), group_, world_size, "load_sharded")
    _raise_if_any_failed(statuses, rank, error, "load_sharded")

    weight, fused, rule_hyper, group, state, hyper = prepared
    with torch.no_grad():
        module.weight.copy_(weight)
        buffers = _fused_buffers(module)
        for key, value in fused.items():
            buffers[key].copy_(value)
    if rule_hyper is not None:
        # The rule given to the module may be shared by other tables (sharded or not), which must keep its
        # values: the module gets a rule of its own holding the checkpoint's.
        module.fused = copy.copy(module.fused)
        for k, v in rule_hyper.items():
            setattr(module.fused, k, v)
    if group is not None:
        optimizer.state[module.weight] = state
        group.update(hyper)

