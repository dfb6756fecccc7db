"""One table from a checkpoint directory's ``config.json`` to the format module that reads it.

Each ``Format`` turns the file's config into an ``MLLMConfig`` and its tensors into modalign's
parameter names; ``detect`` picks the format by ``model_type`` (a native directory says
``{"modalign": ...}``). A new format is one module and one row here.

    format        model_type                      module
    native        (config.json: {"modalign": ...}) native.py
    llava-original llava_llama, llava_mistral     llava_original.py (+ training-run folders)
    llava         llava                           hf.py
    llama etc.    llama, mistral, qwen2           hf.py
    opt           opt                             opt.py
    t5            t5 (text-only T5 / Flan-T5)     blip2.py
    mplug-owl     mplug-owl                       mplug_owl.py
    mplug_owl2    mplug_owl2                      mplug_owl2.py
    blip-2        blip-2, instructblip            blip2.py
    internlm2     internlm2 (incl. XComposer2)    internlm2.py
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from modalign.checkpoints import blip2, hf, internlm2, llava_original, mplug_owl, mplug_owl2, opt
from modalign.checkpoints.io import CheckpointError, read_shapes
from modalign.config import ConfigError, MLLMConfig


@dataclass(frozen=True)
class Format:
    name: str
    model_types: tuple[str, ...]
    config: Callable[[dict, Path], MLLMConfig]  # (config.json, directory) -> model config
    # (the file's tensors, model config) -> tensors under modalign's names; None: names as stored
    state: Callable[[dict[str, torch.Tensor], MLLMConfig], dict[str, torch.Tensor]] | None = None
    description: str = ""
    # formats whose parts live in several places: (directory, config.json, base, vision_tower)
    # -> (config, tensors under modalign's names); used instead of ``config`` + ``state``
    load: Callable | None = None
    # the conversation format the release's own code uses, from its directory (None: unknown)
    template: Callable[[Path], str | None] | None = None


def _native_config(d: dict, path: Path) -> MLLMConfig:
    try:
        return MLLMConfig.from_dict(d["modalign"])
    except ConfigError as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None


def _llm_config(d: dict, path: Path) -> MLLMConfig:
    return MLLMConfig(llm=hf.llm_config_from_hf(d), source_format=f"hf-{d['model_type']}")


def _llava_config(d: dict, p: Path) -> MLLMConfig:
    cfg = hf.llava_config_from_hf(d)
    hf.image_settings(p, cfg.vision)
    return cfg


def _llava_original_config(d: dict, p: Path) -> MLLMConfig:
    return llava_original.config(d, p, llava_original.find_tower(d.get("mm_vision_tower", ""), p))


NATIVE = Format("native", (), _native_config, description="modalign (native)")
LLAVA_ORIGINAL = Format("llava-original", llava_original.MODEL_TYPES, _llava_original_config,
                        description="original LLaVA (haotian-liu/LLaVA) releases and training runs",
                        load=llava_original.load, template=llava_original.default_template)  # fmt: skip
FORMATS: tuple[Format, ...] = (
    NATIVE,
    LLAVA_ORIGINAL,
    Format(
        "llava",
        ("llava",),
        _llava_config,
        lambda t, c: hf.remap(t, hf.map_llava_key),
        "transformers LLaVA",
    ),  # fmt: skip
    Format(
        "hf-llm",
        hf.LLM_TYPES,
        _llm_config,
        lambda t, c: hf.remap(t, hf.map_llm_key),
        f"transformers {' / '.join(hf.LLM_TYPES)}",
    ),  # fmt: skip
    Format("opt", ("opt",), lambda d, p: opt.config_from_opt(d), opt.state_from_opt, "transformers OPT"),
    Format(
        "t5", ("t5",), lambda d, p: blip2.config_from_t5(d), blip2.state_from_t5, "transformers T5 / Flan-T5"
    ),
    Format(
        "mplug-owl",
        ("mplug-owl",),
        lambda d, p: mplug_owl.config_from_owl(d),
        mplug_owl.state_from_owl,
        "mPLUG-Owl (v1) release",
        template=lambda p: "mplug_owl",
    ),
    Format(
        "mplug_owl2",
        ("mplug_owl2",),
        lambda d, p: mplug_owl2.config_from_owl2(d),
        mplug_owl2.state_from_owl2,
        "mPLUG-Owl2 release",
        template=lambda p: "mplug_owl2",
    ),  # fmt: skip
    Format(
        "blip-2",
        ("blip-2",),
        lambda d, p: blip2.config_from_blip2(d),
        blip2.state_from_blip2,
        "transformers BLIP-2 (OPT, Flan-T5 or Llama-family LM)",
        template=lambda p: "blip2",
    ),  # fmt: skip
    Format(
        "instructblip",
        ("instructblip",),
        lambda d, p: blip2.config_from_instructblip(d),
        blip2.state_from_blip2,
        "transformers InstructBLIP",
        template=lambda p: "blip2",
    ),  # fmt: skip
    Format(
        "internlm2",
        ("internlm2",),
        lambda d, p: internlm2.config_from_internlm2(d, p, read_shapes(p)),
        internlm2.state_from_internlm2,
        "InternLM2 / InternLM-XComposer2 and 2.5 releases",
        template=lambda p: "internlm2",
    ),  # fmt: skip
)


def supported() -> str:
    return "; ".join(f"{f.description} ({', '.join(f.model_types) or 'config.json with a modalign key'})"
                     for f in FORMATS)  # fmt: skip


def detect(doc: dict, path: str | Path) -> Format:
    """The format of a checkpoint directory whose ``config.json`` is ``doc``."""
    if "modalign" in doc:
        return NATIVE
    if llava_original.is_llava_original(doc):  # also a LoRA run's config, which says "llama"
        return LLAVA_ORIGINAL
    mt = doc.get("model_type")
    for f in FORMATS:
        if mt in f.model_types:
            return f
    if mt in hf.VISION_TYPES:
        raise CheckpointError(
            f"{path} is a vision tower ({mt}); load it with modalign.checkpoints.load_vision_tower"
        )
    raise CheckpointError(f"{path}: unsupported model_type {mt!r}; supported: {supported()}")
