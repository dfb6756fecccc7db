"""LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Key layout written (what current transformers + PEFT produce for the same model):

    LLaVA:      base_model.model.model.language_model.layers.N.<module>.lora_{A,B}.weight
    causal LM:  base_model.model.model.layers.N.<module>.lora_{A,B}.weight

Reading also accepts the transformers 4.x LLaVA layout (``language_model.model.layers``).
"""

from __future__ import annotations

import json
from pathlib import Path

from modalign.checkpoints import hf
from modalign.checkpoints.io import CheckpointError, atomic_dir, save_tensors
from modalign.config import LoRAConfig
from modalign.models.modality import ALinear, enable_lora


def _lora_modules(model):
    for name, m in model.llm.named_modules():
        if isinstance(m, ALinear) and m.lora_A is not None:
            yield name, m


def export_peft(model, path: str | Path) -> None:
    """Write the model's LoRA weights (unmerged) as a PEFT adapter."""
    cfg = model.config.llm.lora
    mods = list(_lora_modules(model))
    if cfg is None or not mods:
        raise CheckpointError("this model has no LoRA adapter to export")
    prefix = "base_model.model.model.language_model." if model.has_vision else "base_model.model.model."
    tensors = {}
    for name, m in mods:
        if m.lora_merged:
            raise CheckpointError(f"LoRA of {name} is merged; unmerge before exporting the adapter")
        tensors[f"{prefix}{name}.lora_A.weight"] = m.lora_A.weight
        tensors[f"{prefix}{name}.lora_B.weight"] = m.lora_B.weight
    scope = "language_model" if model.has_vision else "model"
    doc = {
        "peft_type": "LORA",
        "task_type": None if model.has_vision else "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        # a regex so that the vision tower's equally named projections are not targeted
        "target_modules": rf".*{scope}.*\.({'|'.join(sorted(cfg.targets))})",
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }
    with atomic_dir(path) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(doc, indent=2) + "\n")
        save_tensors(tensors, tmp / "adapter_model.safetensors", {"format": "pt"})


def _internal_name(key: str) -> str:
    k = key.removeprefix("base_model.model.")
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        if k.endswith(suffix):
            base = hf.map_llava_key(k[: -len(suffix)] + ".weight")
            if base is None or not base.startswith("llm."):
                raise CheckpointError(f"adapter tensor {key!r} does not target the language model")
            return base[len("llm.") : -len(".weight")] + suffix
    raise CheckpointError(f"unexpected tensor {key!r} in a PEFT LoRA adapter")


def import_peft(model, path: str | Path) -> int:
    """Add a PEFT LoRA adapter to ``model``; returns how many linears received LoRA."""
    path = Path(path)
    f = path / "adapter_config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no adapter_config.json")
    doc = json.loads(f.read_text())
    if doc.get("peft_type") != "LORA":
        raise CheckpointError(f"{f}: peft_type {doc.get('peft_type')!r} is not supported (LORA only)")
    if doc.get("use_dora") or doc.get("use_rslora"):
        raise CheckpointError(f"{f}: DoRA / rsLoRA adapters are not supported")
    files = sorted(path.glob("adapter_model.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no adapter_model.safetensors (pickle adapters are not read)")
    tensors = {_internal_name(k): v for k, v in read_tensors_file(files[0]).items()}
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
    cfg = LoRAConfig(rank=int(doc["r"]), alpha=float(doc["lora_alpha"]), dropout=float(doc.get("lora_dropout", 0)),
                     targets=targets)  # fmt: skip
    enable_lora(model, cfg)
    mods = dict(_lora_modules(model))
    wanted = {f"{n}.lora_{ab}.weight" for n in mods for ab in "AB"}
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or extra:
        raise CheckpointError(
            f"{path}: adapter does not fit the model; missing {missing[:6]}, unexpected {extra[:6]}"
        )
    for name, m in mods.items():
        for ab in "AB":
            t = tensors[f"{name}.lora_{ab}.weight"]
            w = getattr(m, f"lora_{ab}").weight
            if t.shape != w.shape:
                raise CheckpointError(
                    f"{name}.lora_{ab}.weight: adapter {tuple(t.shape)} vs model {tuple(w.shape)}"
                )
            w.data.copy_(t)
    return len(mods)


def read_tensors_file(file: Path):
    from safetensors.torch import load_file

    return load_file(str(file))
