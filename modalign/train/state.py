"""Training state on disk: model, optimiser, RNG states and data position, as safetensors +
JSON (never pickle), written atomically (temp dir, then rename), keep-last-K.

    ckpt/step-000120/
      model.safetensors        every persistent tensor of the model (full state)
      optimizer.safetensors    per-parameter tensors, keyed by parameter *name*
      state.json               step, data position, optimiser groups, python/numpy RNG, extra
      rng.safetensors          torch (and CUDA) generator states
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from modalign.checkpoints.io import atomic_dir, save_tensors
from modalign.checkpoints.native import model_state


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


def optimizer_from_flat(opt: torch.optim.Optimizer, model: nn.Module, tensors: dict, meta: dict) -> None:
    params = dict(model.named_parameters())
    if [g["params"] for g in meta["groups"]] != [[n for n in _ids(g, model)] for g in opt.param_groups]:
        raise ValueError("the checkpoint's optimiser groups do not match this stage's trainable parameters")
    for g, saved in zip(opt.param_groups, meta["groups"], strict=True):
        for k, v in saved.items():
            if k != "params":
                g[k] = v
    opt.state.clear()
    for key, t in tensors.items():
        name, field = key.rsplit("/", 1)
        opt.state[params[name]][field] = t.clone()
    for key, v in meta["scalars"].items():
        name, field = key.rsplit("/", 1)
        opt.state[params[name]][field] = v


def _ids(group, model):
    names = _name_of_params(model)
    return [names[id(p)] for p in group["params"]]


def rng_state() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    v, state, gauss = random.getstate()
    np_state = np.random.get_state()
    js = {"python": [v, list(state), gauss], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, js


def set_rng_state(tensors: dict, js: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = js["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, *rest = js["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_training_state(path: Path, model: nn.Module, opt, info: dict) -> None:
    with atomic_dir(path) as tmp:
        save_tensors(model_state(model), tmp / "model.safetensors")
        t, meta = optimizer_to_flat(opt, model)
        save_tensors(t, tmp / "optimizer.safetensors")
        rt, rj = rng_state()
        save_tensors(rt, tmp / "rng.safetensors")
        doc = {"info": info, "optimizer": meta, "rng": rj}
        (tmp / "state.json").write_text(json.dumps(doc, indent=1) + "\n")


def load_training_state(path: Path, model: nn.Module, opt) -> dict:
    from modalign.checkpoints.io import load_state_strict

    doc = json.loads((path / "state.json").read_text())
    load_state_strict(model, load_file(str(path / "model.safetensors")), str(path))
    optimizer_from_flat(opt, model, load_file(str(path / "optimizer.safetensors")), doc["optimizer"])
    set_rng_state(load_file(str(path / "rng.safetensors")), doc["rng"])
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


def save_training_state_sharded(path: Path, model: nn.Module, opt, info: dict, main: bool) -> None:
    """FSDP: gather full model and optimiser states (collective), rank 0 writes the same files as
    ``save_training_state`` (optimiser tensors keyed by parameter name)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt, options=_opts())
    if not main:
        return
    tensors, scalars = {}, {}
    for name, fields in osd["state"].items():
        for k, v in fields.items():
            (tensors if torch.is_tensor(v) else scalars)[f"{name}/{k}"] = v
    groups = [dict(g) for g in osd["param_groups"]]
    with atomic_dir(path) as tmp:
        save_tensors(msd, tmp / "model.safetensors")
        save_tensors(tensors, tmp / "optimizer.safetensors")
        rt, rj = rng_state()
        save_tensors(rt, tmp / "rng.safetensors")
        doc = {"info": info, "optimizer": {"groups": groups, "scalars": scalars}, "rng": rj}
        (tmp / "state.json").write_text(json.dumps(doc, indent=1) + "\n")


def load_training_state_sharded(path: Path, model: nn.Module, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    doc = json.loads((path / "state.json").read_text())
    msd = load_file(str(path / "model.safetensors"))
    state: dict = {}
    for key, t in load_file(str(path / "optimizer.safetensors")).items():
        name, field = key.rsplit("/", 1)
        state.setdefault(name, {})[field] = t
    for key, v in doc["optimizer"]["scalars"].items():
        name, field = key.rsplit("/", 1)
        state.setdefault(name, {})[field] = v
    osd = {"state": state, "param_groups": doc["optimizer"]["groups"]}
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))  # fmt: skip
    set_rng_state(load_file(str(path / "rng.safetensors")), doc["rng"])
    return doc["info"]
