"""Parts of a model from the files they are released in: what a recipe's ``model.init`` reads.

    part       from
    vision     a CLIP / SigLIP folder (``CLIPVisionModel``, ``SiglipVisionModel`` or the full
               two-tower model), or any model folder ``load_pretrained`` reads (its tower)
    llm        a language-model folder (Llama / Mistral / Qwen2, OPT, InternLM2, a native or any
               multimodal folder: its decoder)
    connector  a file of projector weights (the original LLaVA's ``mm_projector.bin``, a native
               ``connector.*`` or transformers' ``multi_modal_projector.*`` file, LAVIS's BLIP-2
               ``Qformer.*`` file, MiniGPT-4's ``llama_proj`` file), or a folder (a BLIP-2
               ``Blip2ForImageTextRetrieval`` one too: its Q-Former with the stage-1 heads; a
               BERT folder: a Q-Former's start, as BLIP-2 starts from bert-base-uncased)
    all        a whole multimodal model folder

A part may also be a list: the first entry as above, then files whose tensors replace some of
the part's (``connector: [blip2-folder, pretrained_minigpt4.pth]``: BLIP-2's Q-Former with
MiniGPT-4's trained projection); each name they hold must be one of the part's, of its shape.

A part read from a checkpoint brings its architecture (``part_config``); the recipe keeps the
choices that belong to the system being built, not to the part: which layer's features and which
tokens reach the connector, how images are resized and at what resolution (the tower's position
table is resized bicubically when the recipe's grid differs), and the modality-aware parts of the
decoder (MAM, Partial LoRA, LoRA, adapter, Flamingo's gated cross-attention blocks), which are
added after the plain decoder is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from modalign.checkpoints import hf, llava_original
from modalign.checkpoints.io import CheckpointError, read_bin, read_config, read_tensors
from modalign.config import MLLMConfig

PARTS = ("vision", "connector", "llm")
# what the recipe decides about a tower it takes from elsewhere
VISION_CHOICES = (
    "feature_layer",
    "feature_select",
    "feature_post_norm",
    "resize_mode",
    "image_size",
    "hd_layout",
)
# decoder parts a recipe adds on top of a loaded decoder
LLM_ADDITIONS = ("mam", "plora", "lora", "adapter", "cross_attention")


def init_paths(value: str | list[str]) -> list[str]:
    """A ``model.init`` entry as a list: the base checkpoint, then the files laid over it."""
    paths = [value] if isinstance(value, str) else list(value)
    if not paths:
        raise CheckpointError("recipe.model.init: an empty list of checkpoints")
    return paths


def _model_type(path: Path) -> str | None:
    """A checkpoint folder's ``model_type`` (None for a file)."""
    return read_config(path).get("model_type") if path.is_dir() else None


def _is_tower(path: Path) -> bool:
    return _model_type(path) in hf.VISION_TYPES


def part_config(path: str | Path, part: str) -> dict | None:
    """The architecture of ``part`` in the checkpoint at ``path`` (a config dict), without reading
    weights; None for a file of connector weights (the recipe's connector config stands)."""
    from modalign.checkpoints import config_from_dir

    path = Path(path)
    if part not in (*PARTS, "all"):
        raise CheckpointError(f"unknown part {part!r}; known: all, {', '.join(PARTS)}")
    if not path.exists():
        raise CheckpointError(f"recipe.model.init.{part}: {path} does not exist")
    if part == "connector" and (path.is_file() or _model_type(path) == "bert"):
        return None  # weights only: the recipe's connector config stands
    if part == "vision" and _is_tower(path):
        return dataclasses.asdict(hf.image_settings(path, hf.vision_config_from_hf(read_config(path))))
    cfg, _ = config_from_dir(path)
    if part == "all":
        return cfg.to_dict()
    sub = getattr(cfg, part)
    if sub is None:
        raise CheckpointError(f"{path} has no {part} to initialise from")
    return dataclasses.asdict(sub)


def merge_part_configs(base: dict, init: dict[str, str]) -> dict:
    """``base`` (a recipe's MLLMConfig dict) with the architecture of every part named in
    ``init`` taken from its checkpoint; the system's choices stay the recipe's (module docstring)."""
    out = dict(base)
    for part, value in init.items():
        got = part_config(init_paths(value)[0], part)
        if got is None:
            continue
        if part == "all":
            out = got
        elif part == "vision":
            mine = out.get("vision") or {}
            out["vision"] = got | {k: mine[k] for k in VISION_CHOICES if k in mine}
        elif part == "llm":
            mine = out.get("llm") or {}
            # the checkpoint's own routed parts load with it; the recipe's are added on top
            out["llm"] = got | {k: mine[k] for k in LLM_ADDITIONS if k in mine and not got.get(k)}
        else:
            out[part] = got
    if (
        "vision" in init
        and "connector" not in init
        and (out.get("connector") or {}).get("type") == "abstractor"
    ):
        # the abstractor works at the tower's width (it attends over the tower's features)
        c, width = dict(out["connector"]), _feature_width(out["vision"])
        heads = c.get("num_heads", 16)
        c["hidden_size"], c["num_heads"] = width, max(h for h in range(1, heads + 1) if width % h == 0)
        out["connector"] = c
    return out


def _feature_width(vision: dict) -> int:
    layers = vision.get("feature_layer", -2)
    return vision["hidden_size"] * (1 if isinstance(layers, int) else len(layers))


def read_part(path: str | Path, part: str, cfg: MLLMConfig) -> dict[str, torch.Tensor]:
    """The tensors of ``part`` from ``path``, named as in the part's module, fitted to ``cfg``
    (the position table resized to the recipe's grid)."""
    from modalign.checkpoints import load_pretrained

    path = Path(path)
    if part == "connector" and path.is_file():
        return connector_file(path, cfg)
    if part == "connector" and _model_type(path) == "bert":
        from modalign.checkpoints import blip2

        return blip2.bert_connector_state(read_tensors(path), cfg.connector)
    if part in ("vision", "connector") and _model_type(path) == "blip-2":
        # the part's tensors alone: a BLIP-2's language model is never built to be thrown away
        # (and a Blip2ForImageTextRetrieval folder has none)
        from modalign.checkpoints import blip2

        doc = read_config(path)
        tensors = {k: v for k, v in read_tensors(path).items() if not k.startswith("language_model.")}
        state = blip2.state_from_blip2(tensors, blip2.config_from_blip2(doc))
        state = {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
    elif part == "vision" and _is_tower(path):
        state = {k[len("vision.") :]: v for k, v in hf.remap(read_tensors(path), hf.map_vision_key).items()}
    else:
        src = load_pretrained(path, dtype=torch.float32)
        module = getattr(src, part, None)
        if module is None:
            raise CheckpointError(f"{path} has no {part} to initialise from")
        state = module.state_dict()
    if part == "vision":
        key = "embeddings.position_embedding.weight"
        if key in state and cfg.vision is not None:
            from modalign.models.vision import resize_position_table

            state[key] = resize_position_table(state[key], cfg.vision.grid, cfg.vision.class_token)
    return state


def connector_file(file: Path, cfg: MLLMConfig | None = None) -> dict[str, torch.Tensor]:
    """Projector weights from one file: the original LLaVA's ``mm_projector.bin`` (``model.mm_projector.*``),
    transformers LLaVA's ``multi_modal_projector.*``, a native ``connector.*`` file (.bin or
    .safetensors), or a Q-Former from LAVIS's BLIP-2 file / MiniGPT-4's projection (``.pth`` too),
    fitted to the recipe's Q-Former (``cfg``)."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(file))
    elif file.suffix in (".bin", ".pth"):
        tensors = read_bin(file)
    else:
        raise CheckpointError(f"{file}: expected a .bin, .pth or .safetensors file of connector weights")
    if any(k.startswith(("Qformer.", "llama_proj.", "opt_proj.", "t5_proj.")) for k in tensors):
        from modalign.checkpoints import blip2

        state = {k[len("connector.") :]: v for k, v in blip2.lavis_connector_state(tensors).items()}
        if cfg is not None and cfg.connector is not None:
            state = blip2.fit_qformer_state(state, cfg.connector)
        return state
    for prefix in ("model.mm_projector.", "base_model.model.model.mm_projector."):
        if any(k.startswith(prefix) for k in tensors):
            state = llava_original.projector_state(tensors, prefix)
            break
    else:
        state = {}
        for k, v in tensors.items():
            if k.startswith("multi_modal_projector.") or k.startswith("model.multi_modal_projector."):
                state["connector." + k.split("multi_modal_projector.", 1)[1]] = v
            elif k.startswith("connector."):
                state[k] = v
    if not state:
        raise CheckpointError(
            f"{file}: no connector weights (expected model.mm_projector.*, multi_modal_projector.* or connector.*; "
            f"found {', '.join(sorted(tensors)[:5])})"
        )
    return {k[len("connector.") :]: v for k, v in state.items()}


def build_from_parts(cfg: MLLMConfig, init: dict[str, str], seed: int):
    """An ``MLLM`` for ``cfg`` whose parts named in ``init`` are read from their checkpoints and
    whose other parts are freshly initialised (seeded, as ``MLLM(cfg)`` would draw them); the decoder's routed parts that the
    checkpoint lacks (``cfg.llm.mam`` / ``plora`` / ...) are added after loading it, so they
    start from the loaded weights (MAM's image copies equal the text weights, LoRA B is zero)."""
    from modalign.checkpoints import load_pretrained
    from modalign.checkpoints.io import load_state_strict
    from modalign.models.mllm import MLLM

    unknown = sorted(set(init) - {*PARTS, "all"})
    if unknown:
        raise CheckpointError(f"recipe.model.init: unknown part(s) {unknown}; known: all, {', '.join(PARTS)}")
    build_cfg = MLLMConfig.from_dict(cfg.to_dict())
    if "all" in init:
        if len(init_paths(init["all"])) > 1:
            raise CheckpointError("recipe.model.init.all: one checkpoint folder, not a list")
        model = load_pretrained(init_paths(init["all"])[0], dtype=torch.float32)
        if (model.config.vision is None) != (cfg.vision is None):
            raise CheckpointError(f"{init['all']}: its vision tower does not fit the recipe's model")
        model.train()
    else:
        new_xattn = False  # cross-attention blocks the decoder's checkpoint lacks: added after it
        if "llm" in init:  # the decoder as the checkpoint holds it; the recipe's additions come after
            have = MLLMConfig.from_dict({"llm": part_config(init_paths(init["llm"])[0], "llm")}).llm
            for k in LLM_ADDITIONS:
                if k == "cross_attention" and have.cross_attention is None:
                    # kept while building, so the connector gets the blocks' width; removed below
                    new_xattn = build_cfg.llm.cross_attention is not None
                    continue
                setattr(build_cfg.llm, k, getattr(have, k))
        with torch.device("meta"):
            model = MLLM(build_cfg)
        try:
            pre, partial = _first_connector(model, init, cfg)
        except CheckpointError as e:
            raise CheckpointError(f"recipe.model.init.connector: {e}") from None
        # the fresh parts get exactly what MLLM(cfg) gives them under the seed: the parts built
        # before them are drawn too (then overwritten), the loaded parts after the last fresh one
        # are not (a 7B decoder is never drawn at random only to be replaced)
        names = model.part_names()
        last_fresh = max((i for i, n in enumerate(names) if n not in init or n in partial), default=-1)
        torch.manual_seed(seed)
        for i, name in enumerate(names):
            if name not in init or name in partial or i < last_fresh:
                setattr(model, name, model.new_part(name))
        if new_xattn:
            for layer in model.llm.layers:
                layer.gated_cross_attn = None
            model.config.llm.cross_attention = None
    for name in model.part_names():
        if name not in init:
            continue
        if name == "vision" and cfg.vision is None:
            raise CheckpointError(
                f"recipe.model.init.vision: the recipe's model has no vision tower ({init[name]})"
            )
        module = getattr(model, name)
        if any(p.is_meta for p in module.parameters()):
            from modalign.checkpoints import reset_buffers

            module.to_empty(device="cpu")
            reset_buffers(module)
            if name == "llm":
                module.tie_weights()  # to_empty gave the tied head its own storage
        first, *over = init_paths(init[name])
        try:
            state = pre[name] if name in pre else read_part(first, name, cfg)
            if name in partial:  # freshly drawn: the file's tensors over it
                lay_over(module, state, f"{first} ({name})")
            else:
                load_state_strict(module, state, f"{first} ({name})")
            for path in over:
                lay_over(module, read_part(path, name, cfg), f"{path} ({name})")
        except CheckpointError as e:
            raise CheckpointError(f"recipe.model.init.{name}: {e}") from None
    _add_llm_parts(model, cfg)
    return model


def _first_connector(
    model, init: dict, cfg: MLLMConfig
) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
    """The tensors of a Q-Former connector's first checkpoint (read here, once) and whether the
    part is partial: a Q-Former without its projection into the LLM (a BLIP-2 stage-1 file:
    ``Blip2ForImageTextRetrieval``, LAVIS's ``blip2_pretrained.pth``), whose projection starts
    fresh as BLIP-2's stage 2 starts it, or a BERT folder (queries, cross-attention and the
    image-side heads fresh too). -> ({"connector": tensors} or {}, {"connector"} or set())"""
    if "connector" not in init or cfg.connector is None or cfg.connector.type != "qformer":
        return {}, set()
    path = Path(init_paths(init["connector"])[0])
    kind = _model_type(path)
    if not (path.is_file() or kind in ("blip-2", "bert")):
        return {}, set()  # a whole model's folder holds its projection (read as any part is)
    state = read_part(path, "connector", cfg)
    missing = set(model.connector.state_dict()) - set(state)
    fresh = ("language_projection.",)
    if kind == "bert":  # what BERT does not have: queries, cross-attention, the image-side heads
        fresh += ("query_tokens", "vision_projection.", "text_projection.", "temp", "itm_head.")
        missing = {k for k in missing if ".crossattention." not in k}
    partial = bool(missing) and all(k.startswith(fresh) for k in missing)
    return {"connector": state}, ({"connector"} if partial else set())


@torch.no_grad()
def lay_over(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Replace some of ``module``'s tensors by ``state``'s: each must be one of its names and shapes."""
    own = module.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise CheckpointError(f"{where}: tensor(s) the part does not have: {', '.join(unknown[:5])}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(
                f"{where}: {k} has shape {tuple(v.shape)}, the part's is {tuple(own[k].shape)}"
            )
        own[k].copy_(v)


def _add_llm_parts(model, cfg: MLLMConfig) -> None:
    from modalign.models.modality import enable_adapter, enable_lora, enable_mam, enable_plora
    from modalign.models.xattn import enable_cross_attention

    want, have = cfg.llm, model.config.llm
    if want.mam and not have.mam:
        enable_mam(model)
    for name, enable in (("plora", enable_plora), ("lora", enable_lora), ("adapter", enable_adapter),
                         ("cross_attention", enable_cross_attention)):  # fmt: skip
        if getattr(want, name) is not None and getattr(have, name) is None:
            enable(model, getattr(want, name))


__all__ = [
    "build_from_parts",
    "connector_file",
    "init_paths",
    "lay_over",
    "merge_part_configs",
    "part_config",
    "read_part",
]
