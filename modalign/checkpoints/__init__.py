"""Checkpoint formats: one adapter per external format, plus the native one.

``load_pretrained(path)`` reads ``config.json``, picks the format from the table in
``formats.py``, builds the model on the meta device and fills it with strict, named errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modalign.checkpoints import formats, hf
from modalign.checkpoints.io import (
    CheckpointError,
    atomic_dir,
    load_state_strict,
    read_config,
    read_tensors,
    save_tensors,
)
from modalign.config import MLLMConfig, VisionConfig


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
    doc = read_config(path)
    fmt = formats.detect(doc, path)
    return fmt.config(doc, Path(path)), fmt.name


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device=None,
                    base: str | Path | None = None, vision_tower: str | Path | None = None):  # fmt: skip
    """Any supported directory -> MLLM (float tensors keep the file's dtype unless ``dtype``).
    ``base``: the base LLM of a training-run folder (a LoRA run, a projector-only run);
    ``vision_tower``: the folder of a vision tower the checkpoint names but does not hold."""
    path = Path(path)
    doc = read_config(path)
    fmt = formats.detect(doc, path)
    try:
        if fmt.load is not None:
            cfg, tensors = fmt.load(path, doc, base, vision_tower)
        else:
            if base is not None:
                raise CheckpointError(f"{path} is a complete {fmt.description} checkpoint: it takes no base")
            cfg = fmt.config(doc, path)
            tensors = read_tensors(path)
            if fmt.state is not None:
                tensors = fmt.state(tensors, cfg)
    except CheckpointError as e:  # every error names the folder and the format it was read as
        raise CheckpointError(_named(e, path, fmt)) from None
    except (KeyError, ValueError, TypeError, IndexError) as e:  # a field or key the format lacks
        raise CheckpointError(_named(f"malformed checkpoint ({type(e).__name__}: {e})", path, fmt)) from None
    model = build(cfg, dtype or _floating_dtype(tensors), device)
    if dtype is None or dtype in (torch.bfloat16, torch.float16):
        _widen_adapters(model, tensors)
    load_state_strict(model, tensors, str(path))
    model.eval()
    return model


def _widen_adapters(model, tensors: dict) -> None:
    """LoRA / Partial LoRA matrices the file holds in fp32 on a 16-bit model (an adapter saved from a
    bf16 model, which keeps adapters in fp32 as PEFT does; or a 16-bit load of an fp32 checkpoint)
    stay fp32: the forward computes them in their own dtype (``modality.low_rank_add``)."""
    from modalign.models.modality import ALinear

    for name, m in model.named_modules():
        if not isinstance(m, ALinear):
            continue
        for kind in ("lora_A", "lora_B", "plora_A", "plora_B"):
            sub, t = getattr(m, kind, None), tensors.get(f"{name}.{kind}.weight")
            if (
                sub is not None
                and t is not None
                and t.dtype == torch.float32
                and sub.weight.element_size() < 4
            ):
                sub.to(torch.float32)


def _named(e, path: Path, fmt) -> str:
    msg = str(e)
    return msg if str(path) in msg else f"{path} (read as {fmt.description}): {msg}"


def default_template(path: str | Path) -> str | None:
    """The conversation format a checkpoint's release uses (None: the tokenizer's or a default)."""
    path = Path(path)
    try:
        fmt = formats.detect(read_config(path), path)
    except CheckpointError:
        return None
    return fmt.template(path) if fmt.template is not None else None


def load_vision_tower(path: str | Path, feature_layer: int | list[int] = -2, feature_select="patch"):
    """A transformers CLIP/SigLIP checkpoint (vision or full model) -> ``VisionTower``."""
    from modalign.models.vision import VisionTower

    d = read_config(path)
    if d.get("model_type") not in hf.VISION_TYPES:
        raise CheckpointError(
            f"{path}: model_type {d.get('model_type')!r} is not a vision tower; "
            f"supported: {', '.join(hf.VISION_TYPES)}"
        )
    vcfg: VisionConfig = hf.image_settings(path, hf.vision_config_from_hf(d))
    vcfg.feature_layer, vcfg.feature_select = feature_layer, feature_select
    tensors = hf.remap(read_tensors(path), hf.map_vision_key)
    tensors = {k[len("vision.") :]: v for k, v in tensors.items()}
    with torch.device("meta"):
        tower = VisionTower(vcfg)
    tower.to_empty(device="cpu")
    load_state_strict(tower, tensors, str(path))
    return tower.eval()


def export_hf_llava(model, path: str | Path, image_token_id: int | None = None,
                    extra_files: dict[str, bytes] | None = None, reads: tuple = ()) -> int:  # fmt: skip
    """Write a LLaVA-shaped model in transformers' LLaVA format (released key layout) with its
    ``generation_config.json`` and ``preprocessor_config.json``; returns the image token's id.
    A model whose placeholder is no token of its vocabulary (the per-image ``-200`` of models
    trained from a released LLM) is given one: ``image_token_id`` (default: the vocabulary size,
    for which the embedding and the head get a zero row, never generated: ``suppress_tokens``).
    ``extra_files`` (a tokenizer's) are written with it; ``reads`` as for ``save_native``."""
    import copy

    from modalign.checkpoints.io import check_replaceable
    from modalign.checkpoints.native import model_state

    check_replaceable(path, reads)
    cfg = copy.deepcopy(model.config)
    state = model_state(model)
    vocab, img = cfg.llm.vocab_size, cfg.image_token_id
    added = img is None or not 0 <= img < vocab
    if added:
        img = vocab if image_token_id is None else image_token_id
        if img == vocab:
            for key in ("llm.embed_tokens.weight", "llm.lm_head.weight"):
                if key in state:
                    state[key] = torch.cat([state[key], state[key].new_zeros(1, state[key].shape[1])])
            cfg.llm.vocab_size += 1
        elif not 0 <= img < vocab:
            raise CheckpointError(f"image_token_id {img} is outside the vocabulary (0..{vocab})")
    cfg.image_token_id, cfg.placeholder = img, "per_token"
    doc = hf.llava_config_to_hf(cfg)
    llm = cfg.llm
    eos = llm.eos_token_id
    gen = {"bos_token_id": llm.bos_token_id, "eos_token_id": eos, "pad_token_id": llm.pad_token_id}
    if added:
        gen["suppress_tokens"] = [img]
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(hf.image_processor_config(cfg.vision), indent=2) + "\n"
        )
        save_tensors(hf.llava_state_to_hf(state), tmp / "model.safetensors", {"format": "pt"})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return img


__all__ = [
    "CheckpointError",
    "default_template",
    "build",
    "config_from_dir",
    "export_hf_llava",
    "load_pretrained",
    "load_vision_tower",
]
