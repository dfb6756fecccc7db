"""The native format: ``config.json`` ({"modalign": MLLMConfig}) + ``model.safetensors`` with
modalign's own parameter names. Saves are atomic (temp dir, then rename)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from modalign.checkpoints.io import (
    TOKENIZER_PATTERNS,
    _tied_aliases,
    atomic_dir,
    check_replaceable,
    save_tensors,
)

FORMAT_VERSION = 1


def model_state(model: nn.Module) -> dict:
    """Persistent tensors, without tied aliases (safetensors stores no shared tensors)."""
    scheme = next((m.quantized_scheme for m in model.modules() if getattr(m, "quantized_scheme", None)), None)
    if scheme is not None:
        raise ValueError(f"this model's LLM was quantized ({scheme}) for inference and cannot be saved; "
                         "save the original weights (load them again) instead")  # fmt: skip
    merged = [n for n, m in model.named_modules() if getattr(m, "lora_merged", False)]
    if merged:  # the folded weights and the adapter both saved: a load would add the LoRA twice
        raise ValueError(f"the LoRA of {len(merged)} layer(s) ({merged[0]}, ...) is merged into their weights; "
                         "unmerge it (set_lora_merged(model, False)) before saving")  # fmt: skip
    tied = _tied_aliases(model)
    return {k: v for k, v in model.state_dict().items() if k not in tied}


def save_native(model: nn.Module, path: str | Path, extra_files: dict[str, str | bytes] | None = None,
                keep_tokenizer: bool = True, reads: tuple = ()) -> None:  # fmt: skip
    """Write ``config.json`` + ``model.safetensors`` into ``path``, atomically. ``keep_tokenizer``:
    the tokenizer files already in ``path`` stay (a training run's saves); a converted checkpoint
    gets only the tokenizer its source has (``extra_files``), never one left from before. A
    ``path`` that holds more than a checkpoint, or ``reads`` (what the write comes from), is refused."""
    cfg = model.config
    check_replaceable(path, reads)
    state = model_state(model)
    with atomic_dir(path) as tmp:
        doc = {"modalign": cfg.to_dict(), "format_version": FORMAT_VERSION}
        (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
        save_tensors(state, tmp / "model.safetensors", {"format": "pt"})
        src = Path(path)
        # keep tokenizer files that live beside the weights
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        if keep_tokenizer and src.is_dir():
            for f in (f for g in TOKENIZER_PATTERNS for f in src.glob(g) if f.is_file()):
                if not (tmp / f.name).exists():
                    (tmp / f.name).write_bytes(f.read_bytes())
