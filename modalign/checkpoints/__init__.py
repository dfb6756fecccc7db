"""Checkpoint formats: one adapter per external format, plus the native one.

``load_pretrained(path)`` reads ``config.json``, picks the adapter by its contents, builds the
model on the meta device and fills it from safetensors with strict, named errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modalign.checkpoints import blip2, hf, internlm2, mplug_owl2
from modalign.checkpoints.io import (
    CheckpointError,
    atomic_dir,
    load_state_strict,
    read_config,
    read_shapes,
    read_tensors,
    save_tensors,
)
from modalign.config import ConfigError, MLLMConfig, VisionConfig

SUPPORTED = (
    "modalign (native)",
    "llava",
    *hf.LLM_TYPES,
    "mplug_owl2",
    "internlm2 (incl. XComposer2)",
    "blip-2",
)


def build(cfg: MLLMConfig, dtype: torch.dtype | None = None, device=None):
    """Build an MLLM without running weight initialisation (meta device, then empty storage)."""
    from modalign.models.mllm import MLLM

    with torch.device("meta"):
        model = MLLM(cfg)
    model.to_empty(device=device or "cpu")
    model.llm.tie_weights()  # to_empty gives every parameter fresh storage
    reset_buffers(model)
    if dtype is not None:
        model.to(dtype)
    return model


def reset_buffers(model: torch.nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()


def _floating_dtype(tensors: dict) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def config_from_dir(path: str | Path) -> tuple[MLLMConfig, str]:
    """The model config of a checkpoint directory and the name of its format."""
    d = read_config(path)
    if "modalign" in d:
        try:
            return MLLMConfig.from_dict(d["modalign"]), "native"
        except ConfigError as e:
            raise CheckpointError(f"{path}/config.json: {e}") from None
    mt = d.get("model_type")
    if mt == "mplug_owl2":
        return mplug_owl2.config_from_owl2(d), "mplug_owl2"
    if mt == "blip-2":
        return blip2.config_from_blip2(d), "blip-2"
    if mt == "instructblip":
        return blip2.config_from_instructblip(d), "blip-2"
    if mt == "internlm2":
        return internlm2.config_from_internlm2(d, Path(path), read_shapes(path)), "internlm2"
    if mt == "llava":
        return hf.llava_config_from_hf(d), "llava"
    if mt in hf.LLM_TYPES:
        return MLLMConfig(llm=hf.llm_config_from_hf(d), source_format=f"hf-{mt}"), mt
    if mt in hf.VISION_TYPES:
        raise CheckpointError(
            f"{path} is a vision tower ({mt}); load it with modalign.checkpoints.load_vision_tower"
        )
    raise CheckpointError(f"{path}: unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED)}")


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device=None):
    """Any supported directory -> MLLM (float tensors keep the file's dtype unless ``dtype``)."""
    cfg, fmt = config_from_dir(path)
    tensors = read_tensors(path)
    if fmt == "mplug_owl2":
        tensors = mplug_owl2.state_from_owl2(tensors, cfg)
    elif fmt == "blip-2":
        tensors = blip2.state_from_blip2(tensors, cfg)
    elif fmt == "internlm2":
        tensors = internlm2.state_from_internlm2(tensors, cfg)
    elif fmt == "llava":
        tensors = hf.remap(tensors, hf.map_llava_key)
    elif fmt in hf.LLM_TYPES:
        tensors = hf.remap(tensors, hf.map_llm_key)
    model = build(cfg, dtype or _floating_dtype(tensors), device)
    load_state_strict(model, tensors, str(path))
    model.eval()
    return model


def load_vision_tower(path: str | Path, feature_layer: int | list[int] = -2, feature_select="patch"):
    """A transformers CLIP/SigLIP checkpoint (vision or full model) -> ``VisionTower``."""
    from modalign.models.vision import VisionTower

    d = read_config(path)
    if d.get("model_type") not in hf.VISION_TYPES:
        raise CheckpointError(
            f"{path}: model_type {d.get('model_type')!r} is not a vision tower; "
            f"supported: {', '.join(hf.VISION_TYPES)}"
        )
    vcfg: VisionConfig = hf.vision_config_from_hf(d)
    vcfg.feature_layer, vcfg.feature_select = feature_layer, feature_select
    tensors = hf.remap(read_tensors(path), hf.map_vision_key)
    tensors = {k[len("vision.") :]: v for k, v in tensors.items()}
    with torch.device("meta"):
        tower = VisionTower(vcfg)
    tower.to_empty(device="cpu")
    load_state_strict(tower, tensors, str(path))
    return tower.eval()


def export_hf_llava(model, path: str | Path) -> None:
    """Write a LLaVA-shaped model in transformers' LLaVA format (released key layout)."""
    from modalign.checkpoints.native import model_state

    doc = hf.llava_config_to_hf(model.config)
    state = hf.llava_state_to_hf(model_state(model))
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
        save_tensors(state, tmp / "model.safetensors", {"format": "pt"})


__all__ = [
    "CheckpointError",
    "build",
    "config_from_dir",
    "export_hf_llava",
    "load_pretrained",
    "load_vision_tower",
]
