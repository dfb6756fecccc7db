"""Training state on disk: model, optimiser, RNG states and data position, as safetensors +
JSON (never pickle), written atomically (temp dir, then rename), keep-last-K.

    ckpt/step-000120/
      model.safetensors        every persistent tensor of the model (full state)
      optimizer.safetensors    per-parameter tensors, keyed by parameter *name*
      state.json               step, data position, optimiser groups, python/numpy RNG, extra
      rng.safetensors          torch (and CUDA) generator states; under DDP/FSDP every rank's
                               (``torch.rankN``), each resumed on its own rank

``state.json`` records the SHA-256 of every other file; ``verify`` checks them (and the state's
fields) before anything is loaded, so a truncated, emptied or bit-flipped checkpoint is named and
skipped (the trainer falls back to the previous one) instead of resuming silently wrong.

Under FSDP the model and optimiser tensors are written sharded instead, every rank its own part,
with torch.distributed.checkpoint's safetensors storage (``sharded/``: one safetensors file per
rank, whose header records each shard's offsets); state.json and rng.safetensors as above.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from modalign.checkpoints.io import CheckpointError, atomic_dir, commit_dir, save_tensors
from modalign.checkpoints.native import model_state

# the optimiser state's field holding a parameter's moving average (``optim.ema``), in fp32
AVERAGE = "average"

INFO_KEYS = {"step": int, "epoch": int, "micro": int, "tokens": int, "seen": int, "skipped": dict}


class CorruptCheckpoint(CheckpointError):
    """A training checkpoint that cannot be trusted: a file missing, truncated or changed since it
    was written, or a malformed state.json; the message names the file."""


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` except state.json, by relative path."""
    return {
        str(p.relative_to(root)): _digest(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "state.json"
    }


def verify(path: Path) -> dict:
    """The parsed state.json of a checkpoint whose files are all as written; ``CorruptCheckpoint``
    naming the first problem otherwise."""
    state = path / "state.json"
    try:
        doc = json.loads(state.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{state}: unreadable ({e})") from None
    info = doc.get("info") if isinstance(doc, dict) else None
    if not isinstance(info, dict):
        raise CorruptCheckpoint(f"{state}: no 'info' object")
    for key, kind in INFO_KEYS.items():
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise CorruptCheckpoint(f"{state}: 'info.{key}' is missing or not {kind.__name__}")
    for key in ("optimizer", "rng"):
        if not isinstance(doc.get(key), dict):
            raise CorruptCheckpoint(f"{state}: no '{key}' object")
    for name, want in (doc.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{f}: missing")
        if _digest(f) != want:
            raise CorruptCheckpoint(f"{f}: its contents changed since it was saved (checksum mismatch)")
    return doc


def _load(file: Path) -> dict:
    try:
        return load_file(str(file))
    except Exception as e:  # noqa: BLE001 - a checkpoint from before checksums: name the bad file
        raise CorruptCheckpoint(f"{file}: unreadable ({type(e).__name__}: {e})") from None


def _name_of_params(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def optimizer_to_flat(opt: torch.optim.Optimizer, model: nn.Module) -> tuple[dict, dict]:
    """(tensors keyed ``name/field``, JSON-able groups with parameter names)."""
    names = _name_of_params(model)
    tensors, scalars, groups = {}, {}, []
    for g in opt.param_groups:
        groups.append(
            {k: v for k, v in g.items() if k != "params"} | {"params": [names[id(p)] for p in g["params"]]}
        )
        for p in g["params"]:
            for field, v in opt.state.get(p, {}).items():
                key = f"{names[id(p)]}/{field}"
                if torch.is_tensor(v):
                    tensors[key] = v
                else:
                    scalars[key] = v
    return tensors, {"groups": groups, "scalars": scalars}


KERNEL_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # how to step, not what: this run's own


def _with_kernel(groups: list[dict], opt: torch.optim.Optimizer) -> list[dict]:
    """Saved parameter groups with this optimiser's kernel choice in place of the checkpoint's (a
    checkpoint written with foreach resumes fused where fused applies, and the reverse)."""
    return [{**g, **{k: cur[k] for k in KERNEL_FLAGS if k in cur}}
            for g, cur in zip(groups, opt.param_groups, strict=True)]  # fmt: skip


def _placed(p: torch.Tensor, key: str, v, group: dict):
    """An optimiser state value on its parameter's device (as ``Optimizer.load_state_dict`` places
    it): ``step`` stays where it is unless the kernel is fused or capturable."""
    if not torch.is_tensor(v):
        return v
    if key == AVERAGE:  # fp32 whatever the parameter's dtype
        return v.to(p.device, torch.float32)
    if key == "step":
        return v.to(p.device, torch.float32) if group.get("fused") or group.get("capturable") else v
    return v.to(p.device, p.dtype) if p.is_floating_point() else v.to(p.device)


def optimizer_from_flat(opt: torch.optim.Optimizer, model: nn.Module, tensors: dict, meta: dict) -> None:
    params = dict(model.named_parameters())
    if [g["params"] for g in meta["groups"]] != [[n for n in _ids(g, model)] for g in opt.param_groups]:
        raise ValueError("the checkpoint's optimiser groups do not match this stage's trainable parameters")
    for g, saved in zip(opt.param_groups, _with_kernel(meta["groups"], opt), strict=True):
        for k, v in saved.items():
            if k != "params":
                g[k] = v
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    opt.state.clear()
    for name, fields in _nest({k: t.clone() for k, t in tensors.items()} | meta["scalars"]).items():
        p = params[name]
        opt.state[p].update({k: _placed(p, k, v, group_of[id(p)]) for k, v in fields.items()})


def _nest(flat: dict, into: dict | None = None) -> dict:
    """``{"param/field": v}`` -> ``{param: {field: v}}`` (merged into ``into``)."""
    out = {} if into is None else into
    for key, v in flat.items():
        name, field = key.rsplit("/", 1)
        out.setdefault(name, {})[field] = v
    return out


def _ids(group, model):
    names = _name_of_params(model)
    return [names[id(p)] for p in group["params"]]


def gather_rank_rng() -> dict:
    """Every other rank's torch generator state (and its CUDA device's), gathered to all
    (collective; {} in one process): saved beside rank 0's so that each rank resumes its own
    random stream (its dropout masks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {}
    mine = [torch.get_rng_state().numpy().tobytes()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's device's generator too
        mine.append(torch.cuda.get_rng_state().numpy().tobytes())
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    out = {}
    for r, got in enumerate(states):
        for kind, b in zip(("torch", "cuda"), got if r > 0 else [], strict=False):
            out[f"{kind}.rank{r}"] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return out


def rng_state(ranks: dict | None = None) -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state(), **(ranks or {})}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    v, state, gauss = random.getstate()
    np_state = np.random.get_state()
    js = {"python": [v, list(state), gauss], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, js


def set_rng_state(tensors: dict, js: dict) -> None:
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    torch.set_rng_state(tensors.get(f"torch.rank{rank}", tensors["torch"]))  # rank 0's where none was saved
    if torch.cuda.is_available():
        devices = sorted((k for k in tensors if k.startswith("cuda.") and "rank" not in k),
                         key=lambda k: int(k.split(".")[1]))  # fmt: skip
        cuda = [tensors[k] for k in devices]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
        if f"cuda.rank{rank}" in tensors:  # this rank's own device, as it was when saved
            torch.cuda.set_rng_state(tensors[f"cuda.rank{rank}"])
    v, state, gauss = js["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, *rest = js["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_training_state(path: Path, model: nn.Module, opt, info: dict, ranks: dict | None = None,
                        masters=None) -> None:  # fmt: skip
    """``ranks``: the other ranks' generator states (``gather_rank_rng``), saved beside this one's;
    ``masters``: a bf16-pure run's fp32 master weights (``precision.MasterWeights``), saved in
    place of the rounded weights, and what the optimiser steps."""
    with atomic_dir(path) as tmp:
        save_tensors(model_state(model) | (masters.state() if masters else {}), tmp / "model.safetensors")
        t, meta = optimizer_to_flat(opt, masters or model)
        save_tensors(t, tmp / "optimizer.safetensors")
        rt, rj = rng_state(ranks)
        save_tensors(rt, tmp / "rng.safetensors")
        doc = {"info": info, "optimizer": meta, "rng": rj, "files": _digests(tmp)}
        (tmp / "state.json").write_text(json.dumps(doc, indent=1) + "\n")


def load_training_state(path: Path, model: nn.Module, opt, masters=None) -> dict:
    """Load a checkpoint (verified first: ``CorruptCheckpoint`` names what is wrong)."""
    from modalign.checkpoints.io import load_state_strict

    doc = verify(path)
    if (path / "sharded").is_dir():  # written under FSDP: resumed here without it
        if masters is not None:
            raise CheckpointError(
                f"{path}: a sharded (FSDP) checkpoint resumes under FSDP only with bf16-pure"
            )
        return _load_dcp(path, model, opt, doc)
    tensors = {name: _load(path / f"{name}.safetensors") for name in ("model", "optimizer", "rng")}
    load_state_strict(model, tensors["model"], str(path))
    if masters is not None:
        masters.load(tensors["model"])
    optimizer_from_flat(opt, masters or model, tensors["optimizer"], doc["optimizer"])
    set_rng_state(tensors["rng"], doc["rng"])
    return doc["info"]


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary dirs are ignored)."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def prune(root: Path, keep: int) -> None:
    for p in checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------ FSDP (sharded parameters)


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _opts():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict:
    """Every rank must call this; rank 0 receives the full (unsharded) tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_opts())


def _flat_sharded(model: nn.Module, opt) -> tuple[dict, dict, dict, dict]:
    """(model state, optimiser state, flat tensors for DCP, JSON scalars); the tensors are this
    rank's shards (DTensors) and alias the returned state dicts, so a DCP load fills both."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)  # initialises empty optimiser state (a zero-lr step)
    flat = {f"model/{k}": v for k, v in msd.items()}
    scalars = {}
    for name, fields in osd["state"].items():
        for k, v in fields.items():
            if torch.is_tensor(v):
                flat[f"optim/{name}/{k}"] = v
            else:
                scalars[f"{name}/{k}"] = v
    return msd, osd, flat, scalars


def save_training_state_sharded(path: Path, model: nn.Module, opt, info: dict, main: bool,
                                ranks: dict | None = None) -> None:  # fmt: skip
    """FSDP: every rank writes its own shards of the model and optimiser state with
    ``torch.distributed.checkpoint`` into ``path/sharded`` (a safetensors file per rank, shard
    offsets in its header; no gather to one process); rank 0 writes ``state.json`` and the RNG states. Collective. The
    directory is built under a temporary name and renamed by rank 0 once complete, so an
    interrupted save never replaces the last good checkpoint (directory on a shared file system)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-sharded"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    _, osd, flat, scalars = _flat_sharded(model, opt)
    with warnings.catch_warnings():  # one process without a process group is fine here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(
            flat, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / "sharded"), save_distributed=True)
        )
    if dist.is_initialized():
        dist.barrier()
    if not main:
        return
    rt, rj = rng_state(ranks)
    save_tensors(rt, tmp / "rng.safetensors")
    groups = [dict(g) for g in osd["param_groups"]]
    doc = {"info": info, "optimizer": {"groups": groups, "scalars": scalars}, "rng": rj, "format": "dcp",
           "files": _digests(tmp)}  # fmt: skip
    (tmp / "state.json").write_text(json.dumps(doc, indent=1) + "\n")
    commit_dir(tmp, path)


def _load_dcp(path: Path, model: nn.Module, opt, doc: dict) -> dict:
    """Fill the model and optimiser from a sharded checkpoint; DCP reshards, so the world size (and
    FSDP or not) may differ from the run that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if doc["info"].get("average"):  # a place for each of the checkpoint's averages to be read into
        _average_slots(model, opt)
    msd, osd, flat, _ = _flat_sharded(model, opt)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(path / "sharded")))
    _nest(doc["optimizer"]["scalars"], osd["state"])
    osd["param_groups"] = _with_kernel(doc["optimizer"]["groups"], opt)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    set_rng_state(_load(path / "rng.safetensors"), doc["rng"])
    return doc["info"]


def _average_slots(model: nn.Module, opt) -> None:
    """A zero fp32 average, sharded as its parameter, in the optimiser's live state for each
    parameter with state (initialised here, as a zero-lr step) and no average yet (one never
    stepped has neither): where a load of a checkpoint holding averages puts them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    get_state_dict(model, opt)
    for p in (p for g in opt.param_groups for p in g["params"]):
        fields = opt.state.get(p)
        if fields and AVERAGE not in fields:
            fields[AVERAGE] = torch.zeros_like(p.detach(), dtype=torch.float32)


def load_training_state_sharded(path: Path, model: nn.Module, opt) -> dict:
    """Load a checkpoint into an FSDP model: DCP shards (any world size: DCP reshards) or, for a
    checkpoint written without sharding, the full state scattered to the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    doc = verify(path)
    if (path / "sharded").is_dir():
        return _load_dcp(path, model, opt, doc)
    msd = _load(path / "model.safetensors")
    state = _nest(_load(path / "optimizer.safetensors") | doc["optimizer"]["scalars"])
    osd = {"state": state, "param_groups": _with_kernel(doc["optimizer"]["groups"], opt)}
    if doc["info"].get("average"):  # a place (sharded as its parameter) for each full average to be
        _average_slots(model, opt)  # scattered into: a key the live state lacks is copied in whole
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))  # fmt: skip
    set_rng_state(_load(path / "rng.safetensors"), doc["rng"])
    return doc["info"]
