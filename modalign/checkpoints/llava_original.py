"""The original LLaVA releases (haotian-liu/LLaVA): ``model_type`` ``llava_llama`` / ``llava_mistral``,
as most LLaVA fine-tunes are published, plus the two kinds of training-run folders.

| file key | modalign |
|---|---|
| ``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head`` | ``llm.*`` |
| ``model.mm_projector.{0,2,...}`` (``mlpNx_gelu``) / ``model.mm_projector`` (``linear``) | ``connector.linear_{1,2,...}`` |
| ``model.vision_tower.vision_tower.vision_model.*`` (where saved) | ``vision.*`` |

``config.json`` names the vision tower (``mm_vision_tower``: a CLIP folder, e.g.
``openai/clip-vit-large-patch14-336``), the layer and tokens it feeds the projector
(``mm_vision_select_layer``, ``mm_vision_select_feature``: ``patch`` drops the class token,
``cls_patch`` keeps it) and the image preprocessing (``image_aspect_ratio: pad``: expand to a
square with the mean colour, then the CLIP processor; otherwise the CLIP processor's resize and
centre crop). modalign downloads nothing: the tower is found as a folder (given, or
``mm_vision_tower`` relative to the working directory, the checkpoint or one of its parents, or
a folder in ``MODALIGN_MODELS``). Each ``<image>`` of a prompt is one ``-200`` id.

Training-run folders, over a ``base`` LLM (``MLLM.from_pretrained(run, base=...)``):
- a pretraining run: ``config.json`` + ``mm_projector.bin`` (the projector only);
- a LoRA run: ``adapter_config.json`` + ``adapter_model.safetensors`` (LoRA on the LLM, merged into
  it as the reference loader does: W + alpha/r * B A) + ``non_lora_trainables.bin`` (the projector).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from modalign.checkpoints import hf
from modalign.checkpoints.io import CheckpointError, read_bin, read_config, read_tensors, weight_files
from modalign.config import ConnectorConfig, MLLMConfig

IMAGE_TOKEN_INDEX = -200
MODEL_TYPES = ("llava_llama", "llava_mistral")
_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def is_llava_original(doc: dict) -> bool:
    """An original LLaVA folder: its own model types; or a tower named the repo's way
    (``mm_vision_tower``) in a Llama-family config (a LoRA run says "llama"; LLaVA v1, from before
    ``mm_projector_type``, said "llava", which a transformers LLaVA config, naming no
    ``mm_vision_tower``, says too), or beside an ``mm_projector_type``."""
    mt = doc.get("model_type")
    if mt in MODEL_TYPES:
        return True
    return "mm_vision_tower" in doc and (
        "mm_projector_type" in doc or mt in (None, "llava", "llama", "mistral")
    )


def find_tower(name: str, ckpt: Path, given: str | Path | None = None) -> Path:
    """The vision tower's folder: ``given``, else ``name`` as a folder relative to the working
    directory, the checkpoint folder or one of its parents, or a folder of ``MODALIGN_MODELS``."""
    if given is not None:
        p = Path(given)
        if not (p / "config.json").is_file():
            raise CheckpointError(f"vision tower {p}: no config.json")
        return p
    roots = [Path.cwd(), ckpt, *list(ckpt.resolve().parents)[:3]]
    roots += [Path(p) for p in os.environ.get("MODALIGN_MODELS", "").split(os.pathsep) if p]
    for root in roots:
        for cand in (root / name, root / Path(name).name):
            if (cand / "config.json").is_file():
                return cand
    raise CheckpointError(
        f"{ckpt}: its vision tower {name!r} is not a local folder; modalign downloads nothing: pass its "
        "folder (MLLM.from_pretrained(..., vision_tower=DIR), --vision-tower DIR) or put it under MODALIGN_MODELS"
    )


def config(doc: dict, ckpt: Path, tower: Path) -> MLLMConfig:
    llm_doc = dict(doc)
    llm_doc["model_type"] = "mistral" if doc.get("model_type") == "llava_mistral" else "llama"
    vision = hf.image_settings(tower, hf.vision_config_from_hf(read_config(tower)), resize=False)
    vision.feature_layer = doc.get("mm_vision_select_layer", -2)
    select = doc.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise CheckpointError(
            f"{ckpt}: mm_vision_select_feature {select!r} is not supported (patch, cls_patch)"
        )
    vision.feature_select = "patch" if select == "patch" else "full"
    aspect = doc.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square", None):
        raise CheckpointError(f"{ckpt}: image_aspect_ratio {aspect!r} is not supported (pad, square)")
    vision.resize_mode = "pad" if aspect == "pad" else "crop"
    kind = doc.get("mm_projector_type", "linear")
    m = _MLP.match(kind)
    if kind != "linear" and m is None:
        raise CheckpointError(f"{ckpt}: mm_projector_type {kind!r} is not supported (linear, mlpNx_gelu)")
    if doc.get("mm_use_im_start_end") or doc.get("mm_patch_merge_type", "flat") != "flat":
        raise CheckpointError(f"{ckpt}: image start/end tokens and non-flat patch merging are not supported")
    return MLLMConfig(llm=hf.llm_config_from_hf(llm_doc), vision=vision, connector=ConnectorConfig(type=kind),
                      image_token_id=IMAGE_TOKEN_INDEX, placeholder="per_image", source_format="llava-original")  # fmt: skip


def projector_state(tensors: dict[str, torch.Tensor], prefix: str = "model.mm_projector.") -> dict:
    """``model.mm_projector.{0,2,...}`` (or ``model.mm_projector.weight``) -> ``connector.linear_k``."""
    out = {}
    for k, v in tensors.items():
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix) :]
        index, _, param = rest.partition(".")
        if index in ("weight", "bias"):  # a linear projector
            out[f"connector.linear_1.{index}"] = v
        else:
            out[f"connector.linear_{int(index) // 2 + 1}.{param}"] = v
    return out


def _llm_state(tensors: dict) -> dict:
    out = {}
    for k, v in tensors.items():
        if k.startswith("model.mm_projector.") or k.startswith("model.vision_tower."):
            continue
        mapped = hf.map_llm_key(k)
        if mapped is not None:
            out[mapped] = v
    return out


def _vision_state(tensors: dict, tower: Path) -> dict:
    pre = "model.vision_tower.vision_tower."
    saved = {k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)}
    source = saved or read_tensors(tower)  # the checkpoint's own weights where it holds them
    return hf.remap(source, hf.map_vision_key)


def load(path: Path, doc: dict, base: str | Path | None = None, vision_tower: str | Path | None = None):
    """(config, tensors under modalign's names) of a LLaVA checkpoint or training-run folder."""
    tower = find_tower(doc.get("mm_vision_tower") or doc.get("vision_tower", ""), path, vision_tower)
    cfg = config(doc, path, tower)
    if (path / "adapter_config.json").is_file():
        tensors = _lora_run(path, _base(path, base, "a LoRA run"))
    elif (path / "mm_projector.bin").is_file() and not _has_weights(path):
        tensors = _llm_state(read_tensors(_base(path, base, "a pretraining run (the projector only)")))
        tensors |= projector_state(read_bin(path / "mm_projector.bin"))
        return cfg, tensors | _vision_state({}, tower)
    else:
        raw = read_tensors(path)
        tensors = _llm_state(raw) | projector_state(raw) | _vision_state(raw, tower)
        return cfg, tensors
    return cfg, tensors | _vision_state({}, tower)


def _has_weights(path: Path) -> bool:
    try:
        return bool(weight_files(path))
    except CheckpointError:
        return False


def _base(path: Path, base, what: str) -> Path:
    if base is None:
        name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") if (
            path / "adapter_config.json").is_file() else None  # fmt: skip
        hint = f" (it was trained over {name!r})" if name else ""
        raise CheckpointError(f"{path} is {what}{hint}: pass the base LLM folder (base=DIR, --base DIR)")
    return Path(base)


def _lora_run(path: Path, base: Path) -> dict:
    """The base LLM with the run's LoRA merged in, plus the run's projector."""
    from modalign.checkpoints.peft import _read_config

    adapter = _read_config(path)  # what it cannot merge exactly (DoRA, per-module ranks, ...) is refused
    scale = adapter["lora_alpha"] / adapter["r"]
    files = [path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (path / n).is_file()]
    if not files:
        raise CheckpointError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    lora = read_bin(files[0]) if files[0].suffix == ".bin" else _safetensors(files[0])
    other = sorted(k for k in lora if ".lora_A." not in k and ".lora_B." not in k)
    if other:  # saved embeddings, DoRA magnitudes, ...: not silently left out
        raise CheckpointError(f"{files[0]}: tensors that are no LoRA A / B matrix: {', '.join(other[:5])}")
    state = _llm_state(read_tensors(base))
    pre = "base_model.model."
    for k, a in lora.items():
        if ".lora_A." not in k:
            continue
        if k.replace(".lora_A.", ".lora_B.") not in lora:
            raise CheckpointError(f"{files[0]}: {k} has no lora_B beside it")
        b = lora[k.replace(".lora_A.", ".lora_B.")]
        target = hf.map_llm_key(k[len(pre) :].replace(".lora_A.weight", ".weight"))
        if target not in state:
            raise CheckpointError(f"{path}: LoRA for {k} has no weight {target} in the base")
        state[target] = state[target] + scale * (b.float() @ a.float()).to(state[target].dtype)
    extra = path / "non_lora_trainables.bin"
    if extra.is_file():
        trained = read_bin(extra)
        beyond = sorted(k for k in trained if not k.startswith(pre + "model.mm_projector."))
        if beyond:  # the reference loads every one of them; modalign reads the projector only
            raise CheckpointError(f"{extra}: trained tensors beyond the projector ({', '.join(beyond[:5])}) "
                                  "are not supported; merge the run with LLaVA's scripts first")  # fmt: skip
        state |= projector_state(trained, prefix=pre + "model.mm_projector.")
    return state


def _safetensors(file: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(file))


def default_template(path: Path) -> str:
    """The conversation format LLaVA's own scripts pick from a checkpoint's name."""
    name = path.resolve().name.lower()
    return "mistral_instruct" if "mistral" in name else "llava_v1"
