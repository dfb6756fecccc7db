"""mPLUG-Owl2 release layout (``model_type: mplug_owl2``, ``MPLUGOwl2LlamaForCausalLM``).

| file key | modalign |
|---|---|
| ``model.vision_model.embeddings.cls_token`` [1,1,C] | ``vision.embeddings.class_embedding`` [C] |
| ``model.vision_model.embeddings.patch_embed.weight`` | ``vision.embeddings.patch_embedding.weight`` |
| ``model.vision_model.embeddings.position_embedding`` [1,P,C] | ``vision.embeddings.position_embedding.weight`` [P,C] |
| ``model.vision_model.embeddings.pre_layernorm.*`` | ``vision.pre_layrnorm.*`` |
| ``...encoder.layers.j.input_layernorm`` / ``post_attention_layernorm`` | ``layer_norm1`` / ``layer_norm2`` |
| ``...self_attn.query_key_value`` (per-head interleaved q,k,v) | ``self_attn.{q,k,v}_proj`` |
| ``...self_attn.dense`` | ``self_attn.out_proj`` |
| ``model.visual_abstractor.*`` | ``connector.*`` (same sub-names; sin-cos tables recomputed) |
| ``model.<rest>`` (``multiway.0`` text / ``multiway.1`` image) | ``llm.<rest>`` |
| ``lm_head.weight`` | ``llm.lm_head.weight`` |

Images are spliced at one ``-200`` per image (``placeholder: per_image``); every image row,
``vit_eos`` included, has modality 1.
"""

from __future__ import annotations

import torch

from modalign.checkpoints.hf import llm_config_from_hf
from modalign.checkpoints.io import CheckpointError
from modalign.config import ConnectorConfig, MLLMConfig, VisionConfig

IMAGE_TOKEN_INDEX = -200


def config_from_owl2(d: dict) -> MLLMConfig:
    vc = d.get("visual_config") or {}
    vm, va = vc.get("visual_model"), vc.get("visual_abstractor")
    if not vm or not va:
        raise CheckpointError("mplug_owl2 config.json lacks visual_config.visual_model / visual_abstractor")
    llm = llm_config_from_hf({**d, "model_type": "llama"})
    llm.mam = True
    if llm.num_kv_heads != llm.num_heads:
        raise CheckpointError("mplug_owl2 checkpoints have num_key_value_heads == num_attention_heads")
    vision = VisionConfig(
        model_type="mplug_owl2",
        hidden_size=vm.get("hidden_size", 1024),
        intermediate_size=vm.get("intermediate_size", 4096),
        num_layers=vm.get("num_hidden_layers", 24),
        num_heads=vm.get("num_attention_heads", 16),
        image_size=vm.get("image_size", 448),
        patch_size=vm.get("patch_size", 14),
        class_token=vm.get("use_cls_token", True),
        pre_layernorm=True,
        post_layernorm=vm.get("use_post_layernorm", True),
        hidden_act=vm.get("hidden_act", "quick_gelu"),
        layer_norm_eps=vm.get("layer_norm_eps", 1e-6),
        feature_layer=-1,
        feature_select="full",
        feature_post_norm=vm.get("use_post_layernorm", True),
        resize_mode="squash",
    )
    if va.get("add_v2t_pos_emb"):
        raise CheckpointError(
            "visual_abstractor.add_v2t_pos_emb=true is not supported (the reference code cannot run it)"
        )
    conn = ConnectorConfig(
        type="abstractor",
        num_queries=va.get("num_learnable_queries", 64),
        num_layers=va.get("num_hidden_layers", 6),
        num_heads=va.get("num_attention_heads", 16),
        hidden_size=va.get("hidden_size", 1024),
        intermediate_size=va.get("intermediate_size", 2816),
        layer_norm_eps=va.get("layer_norm_eps", 1e-6),
        pos_embed=True,
        eos_token=True,
    )
    return MLLMConfig(llm=llm, vision=vision, connector=conn, image_token_id=IMAGE_TOKEN_INDEX,
                      placeholder="per_image", source_format="mplug_owl2")  # fmt: skip


_VISION_RENAMES = {
    "embeddings.cls_token": "embeddings.class_embedding",
    "embeddings.patch_embed.weight": "embeddings.patch_embedding.weight",
    "embeddings.position_embedding": "embeddings.position_embedding.weight",
    "embeddings.pre_layernorm.weight": "pre_layrnorm.weight",
    "embeddings.pre_layernorm.bias": "pre_layrnorm.bias",
}


def vision_key(rest: str, v: torch.Tensor, heads: int) -> dict[str, torch.Tensor]:
    """One tensor of the mPLUG-Owl ViT (``embeddings.*``, ``encoder.layers.*``, ``post_layernorm``;
    the same in v1 and Owl2) under ``vision.*``; the fused per-head ``query_key_value`` is split."""
    if rest in _VISION_RENAMES:
        name = _VISION_RENAMES[rest]
        v = v.reshape(-1) if name.endswith("class_embedding") else v
        v = v.reshape(v.shape[-2], v.shape[-1]) if name.endswith("position_embedding.weight") else v
        return {"vision." + name: v}
    rest = rest.replace(".input_layernorm.", ".layer_norm1.").replace(
        ".post_attention_layernorm.", ".layer_norm2."
    )
    rest = rest.replace(".self_attn.dense.", ".self_attn.out_proj.")
    if ".self_attn.query_key_value." not in rest:
        return {"vision." + rest: v}
    kind = rest.rsplit(".", 1)[1]  # weight | bias
    stem = rest.split(".self_attn.query_key_value.")[0]
    c = v.shape[0] // 3
    per_head = v.reshape(heads, 3, c // heads, *v.shape[1:])
    return {f"vision.{stem}.self_attn.{proj}.{kind}": per_head[:, i].reshape(c, *v.shape[1:])
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj"))}  # fmt: skip


def state_from_owl2(tensors: dict[str, torch.Tensor], cfg: MLLMConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    heads = cfg.vision.num_heads
    for k, v in tensors.items():
        if k.endswith("rotary_emb.inv_freq") or k.endswith(("q_pos_embed", "k_pos_embed")):
            continue  # recomputed (the tables agree with the stored ones to ~1e-7)
        if k == "lm_head.weight":
            out["llm.lm_head.weight"] = v
        elif k.startswith("model.vision_model."):
            out |= vision_key(k[len("model.vision_model.") :], v, heads)
        elif k.startswith("model.visual_abstractor."):
            out["connector." + k[len("model.visual_abstractor.") :]] = v
        elif k.startswith("model."):
            out["llm." + k[len("model.") :]] = v
        else:
            raise CheckpointError(f"unexpected tensor {k!r} in an mplug_owl2 checkpoint")
    return out
