"""transformers-format checkpoints: Llama / Mistral / Qwen2 causal LMs, CLIP / SigLIP vision
towers, and LLaVA (``LlavaForConditionalGeneration``).

Both key layouts are read: the one of released checkpoints (transformers 4.x:
``vision_tower.vision_model.*``, ``language_model.model.*``, ``language_model.lm_head``) and the
one later transformers versions write (``model.vision_tower.*``, ``model.language_model.*``,
``lm_head``). Inside modalign the names are transformers' own minus the wrappers, under
``llm.``, ``vision.`` and ``connector.``, so the maps below only move prefixes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modalign.checkpoints.io import CheckpointError
from modalign.config import ConnectorConfig, LLMConfig, MLLMConfig, VisionConfig

LLM_TYPES = ("llama", "mistral", "qwen2")
VISION_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")
SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)

# keys that reference code saves but that carry nothing the model needs
_VISION_ROOTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


# ------------------------------------------------------------------------------ configs


def _require(d: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise CheckpointError(f"{what} config.json lacks required field(s): {', '.join(missing)}")


# what transformers' config class of each decoder type fills in for a field its config.json leaves
# out. A nested config (a LLaVA release's ``text_config``) is written as a diff against these: the
# config.json of llava-1.5-7b-hf names no width, depth or head count (Llama's defaults).
HF_LLM_DEFAULTS = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                "sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 32768, "sliding_window": 4096,
              "max_window_layers": 28},
}  # fmt: skip


def llm_config_from_hf(d: dict, nested: bool = False) -> LLMConfig:
    """A decoder's LLMConfig from its transformers config. ``nested``: a sub-config (a LLaVA
    ``text_config``), written as a diff against its class's defaults, which fill what it leaves
    out; a model's own config.json names its sizes (they are required)."""
    mt = d.get("model_type", "llama")
    if mt not in LLM_TYPES:
        raise CheckpointError(f"unsupported language model_type {mt!r}; supported: {', '.join(LLM_TYPES)}")
    if nested:
        d = {**HF_LLM_DEFAULTS[mt], **d}
    _require(
        d, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"), mt
    )
    rp = d.get("rope_parameters") or {}
    theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling")
    if scaling is None and rp.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    attn_bias = bool(d.get("attention_bias", False))
    window = d.get("sliding_window")
    layer_types = d.get("layer_types")
    n_layers = d["num_hidden_layers"]
    if layer_types is not None:
        layer_types = ["sliding" if t == "sliding_attention" else "full" for t in layer_types]
    elif mt == "mistral" and window:
        layer_types = ["sliding"] * n_layers
    elif mt == "qwen2" and d.get("use_sliding_window") and window:
        first = d.get("max_window_layers", n_layers)
        layer_types = ["sliding" if i >= first else "full" for i in range(n_layers)]
    if layer_types is None or "sliding" not in layer_types:
        layer_types, window = None, None
    heads = d["num_attention_heads"]
    return LLMConfig(
        model_type=mt,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim"),
        hidden_act=d.get("hidden_act", "silu"),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        qkv_bias=True if mt == "qwen2" else attn_bias,
        o_bias=False if mt == "qwen2" else attn_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        sliding_window=window,
        layer_types=layer_types,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )


def llm_config_to_hf(c: LLMConfig) -> dict:
    if c.mam or c.plora is not None or c.adapter is not None or c.fused_qkv:
        raise CheckpointError(
            "this model's decoder has modality-aware parts (MAM / Partial LoRA / adapters / fused "
            "qkv) that a transformers Llama-family model cannot hold; save it in the native format"
        )
    if c.model_type not in LLM_TYPES:
        raise CheckpointError(f"cannot export a {c.model_type!r} decoder to transformers' format")
    d = {
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.dim_head,
        "hidden_act": c.hidden_act,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
    }
    if c.model_type == "qwen2":
        d["use_sliding_window"] = c.sliding_window is not None
        d["sliding_window"] = c.sliding_window
    else:
        d["attention_bias"] = c.qkv_bias
        d["mlp_bias"] = c.mlp_bias
        if c.model_type == "mistral":
            d["sliding_window"] = c.sliding_window
    if c.layer_types is not None:
        d["layer_types"] = [f"{t}_attention" for t in c.layer_types]
    return d


def vision_config_from_hf(d: dict) -> VisionConfig:
    mt = d.get("model_type", "clip_vision_model")
    if mt in ("clip", "siglip"):
        d = d.get("vision_config") or {}
        mt = mt + "_vision_model"
    if mt not in ("clip_vision_model", "siglip_vision_model"):
        raise CheckpointError(f"unsupported vision model_type {mt!r}; supported: {', '.join(VISION_TYPES)}")
    siglip = mt == "siglip_vision_model"
    return VisionConfig(
        model_type="siglip" if siglip else "clip",
        hidden_size=d.get("hidden_size", 768),
        intermediate_size=d.get("intermediate_size", 3072),
        num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 12),
        image_size=d.get("image_size", 224),
        patch_size=d.get("patch_size", 16 if siglip else 32),
        num_channels=d.get("num_channels", 3),
        class_token=not siglip,
        pre_layernorm=not siglip,
        post_layernorm=True,
        patch_bias=siglip,
        hidden_act=d.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu"),
        layer_norm_eps=d.get("layer_norm_eps", 1e-6 if siglip else 1e-5),
        image_mean=SIGLIP_MEAN_STD if siglip else VisionConfig.image_mean,
        image_std=SIGLIP_MEAN_STD if siglip else VisionConfig.image_std,
        resize_mode="squash" if siglip else "crop",  # each family's own image processor
    )


def image_settings(path: str | Path, v: VisionConfig, resize: bool = True) -> VisionConfig:
    """``v`` with the normalisation (and, with ``resize``, the resize policy: ``pad`` where the
    processor pads to a square, ``crop`` where it centre-crops, else ``squash``) of the
    checkpoint's ``preprocessor_config.json``, where it has one."""
    f = Path(path) / "preprocessor_config.json"
    if not f.is_file():
        return v
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON: {e}") from None
    d = d.get("image_processor", d)  # a processor_config.json nests it
    if d.get("image_mean") is not None:
        v.image_mean = tuple(float(x) for x in d["image_mean"])
    if d.get("image_std") is not None:
        v.image_std = tuple(float(x) for x in d["image_std"])
    if resize and (d.get("pad_to_square") or d.get("do_pad") is True):  # LLaVA-1.5's pad to a square
        v.resize_mode = "pad"  # (modalign's export writes pad_to_square; LlavaImageProcessor do_pad)
    elif resize and "do_center_crop" in d:
        v.resize_mode = "crop" if d["do_center_crop"] else "squash"
    return v


def vision_config_to_hf(v: VisionConfig) -> dict:
    if v.model_type not in ("clip", "siglip"):
        raise CheckpointError(f"cannot export a {v.model_type!r} vision tower to transformers' format")
    return {
        "model_type": f"{v.model_type}_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "hidden_act": v.hidden_act,
        "layer_norm_eps": v.layer_norm_eps,
    }


def image_processor_config(v: VisionConfig) -> dict:
    """transformers' ``CLIPImageProcessor`` settings for a tower's preprocessing: ``crop`` as CLIP,
    ``squash`` as a direct resize; ``pad`` as ``squash`` of an image first padded to a square with
    the mean colour (``pad_to_square``: transformers' processor does not pad by itself)."""
    s = v.image_size
    doc = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "resample": 3, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.image_mean),
           "image_std": list(v.image_std), "do_convert_rgb": True}  # fmt: skip
    if v.resize_mode == "crop":
        return doc | {
            "size": {"shortest_edge": s},
            "do_center_crop": True,
            "crop_size": {"height": s, "width": s},
        }
    return doc | {
        "size": {"height": s, "width": s},
        "do_center_crop": False,
        "pad_to_square": v.resize_mode == "pad",
    }


def llava_config_from_hf(d: dict) -> MLLMConfig:
    text = dict(d.get("text_config") or {})
    text.setdefault("model_type", "llama")
    vision = vision_config_from_hf(dict(d.get("vision_config") or {"model_type": "clip_vision_model"}))
    vision.feature_layer = d.get("vision_feature_layer", -2)
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"unknown vision_feature_select_strategy {strategy!r}; known: default, full")
    # transformers drops the first token for "default" whatever the tower (a SigLIP has no class token)
    vision.feature_select = (
        ("patch" if vision.class_token else "drop_first") if strategy == "default" else "full"
    )
    act = d.get("projector_hidden_act", "gelu")
    image_token = d.get("image_token_index", d.get("image_token_id", 32000))
    return MLLMConfig(
        llm=llm_config_from_hf(text, nested=True),
        vision=vision,
        connector=ConnectorConfig(
            type=f"mlp2x_{act}", hidden_act=act, bias=d.get("multimodal_projector_bias", True)
        ),
        image_token_id=image_token,
        placeholder="per_token",
        source_format="hf-llava",
    )


def llava_config_to_hf(cfg: MLLMConfig) -> dict:
    if cfg.vision is None or cfg.connector is None:
        raise CheckpointError("a transformers LLaVA checkpoint needs a vision tower and a connector")
    if not cfg.connector.type.startswith("mlp2x_"):
        raise CheckpointError(
            f"transformers' LLaVA holds an mlp2x projector; this model's connector is {cfg.connector.type!r}"
        )
    if cfg.fusion != "splice" or cfg.llm.cross_attention is not None:
        raise CheckpointError(
            "transformers' LLaVA splices visual tokens; this model has cross-attention blocks"
        )
    v = cfg.vision
    if v.feature_post_norm:
        raise CheckpointError("transformers' LLaVA cannot apply post_layernorm to the selected features")
    if cfg.llm.lora is not None:  # transformers would drop the lora_* tensors and run the base model
        raise CheckpointError(
            "this model has unmerged LoRA adapters: merge them first (or export them with --to peft)"
        )
    if getattr(v, "hd_layout", None) is not None:
        raise CheckpointError(
            f"transformers' LLaVA has no {v.hd_layout!r} high-resolution layout; save it natively"
        )
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": cfg.image_token_id,
        "image_seq_length": v.num_features,
        "vision_feature_layer": v.feature_layer,
        # a tower without a class token that keeps every token is transformers' "full"
        "vision_feature_select_strategy": "full"
        if v.feature_select == "full" or (v.feature_select == "patch" and not v.class_token)
        else "default",
        "projector_hidden_act": cfg.connector.type.split("_", 1)[1],
        "multimodal_projector_bias": cfg.connector.bias,
        "tie_word_embeddings": cfg.llm.tie_word_embeddings,
        "text_config": llm_config_to_hf(cfg.llm),
        "vision_config": vision_config_to_hf(v),
    }


# ------------------------------------------------------------------------------ key maps


def _ignored(key: str) -> bool:
    return key.endswith(_IGNORED_SUFFIXES)


def map_llm_key(key: str) -> str | None:
    """HF causal-LM key -> ``llm.*`` (None: not part of the model)."""
    if _ignored(key):
        return None
    if key == "lm_head.weight":
        return "llm.lm_head.weight"
    if key.startswith("model."):
        return "llm." + key[len("model.") :]
    raise CheckpointError(f"unexpected tensor {key!r} in a causal-LM checkpoint")


def map_vision_key(key: str) -> str | None:
    """HF CLIP/SigLIP key (vision model or full model) -> ``vision.*`` (None: skip)."""
    if _ignored(key):
        return None
    for prefix in ("vision_model.", "vision_tower.vision_model.", "vision_tower."):
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            # SigLIP's attention-pooling head is not part of the feature path
            return None if rest.startswith("head.") else "vision." + rest
    if key.startswith(_VISION_ROOTS):  # transformers 5 writes vision models without a prefix
        return None if key.startswith("head.") else "vision." + key
    # text tower, projections and logit scale of a full CLIP/SigLIP checkpoint
    return None


def map_llava_key(key: str) -> str | None:
    """Any LLaVA layout -> internal name."""
    if _ignored(key):
        return None
    k = key[len("model.") :] if key.startswith("model.") else key
    if k.startswith("multi_modal_projector."):
        return "connector." + k[len("multi_modal_projector.") :]
    if k.startswith("vision_tower."):
        rest = k[len("vision_tower.") :]
        rest = rest[len("vision_model.") :] if rest.startswith("vision_model.") else rest
        return None if rest.startswith("head.") else "vision." + rest
    if k.startswith("language_model."):
        rest = k[len("language_model.") :]
        if rest == "lm_head.weight":
            return "llm.lm_head.weight"
        rest = rest[len("model.") :] if rest.startswith("model.") else rest
        return "llm." + rest
    if k == "lm_head.weight":
        return "llm.lm_head.weight"
    raise CheckpointError(f"unexpected tensor {key!r} in a LLaVA checkpoint")


def remap(tensors: dict[str, torch.Tensor], fn) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        new = fn(k)
        if new is not None:
            out[new] = v
    return out


def llava_state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Internal names -> the released LLaVA layout (readable by every transformers version)."""
    out = {}
    for k, v in state.items():
        if k.startswith("connector."):
            out["multi_modal_projector." + k[len("connector.") :]] = v
        elif k.startswith("vision."):
            out["vision_tower.vision_model." + k[len("vision.") :]] = v
        elif k == "llm.lm_head.weight":
            out["language_model.lm_head.weight"] = v
        elif k.startswith("llm."):
            out["language_model.model." + k[len("llm.") :]] = v
        else:
            raise CheckpointError(f"tensor {k!r} has no place in a transformers LLaVA checkpoint")
    return out
