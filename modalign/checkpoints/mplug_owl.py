"""mPLUG-Owl (v1) releases (``model_type: mplug-owl``, ``MplugOwlForConditionalGeneration``, e.g.
``MAGAer13/mplug-owl-llama-7b``).

| file key | modalign |
|---|---|
| ``vision_model.*`` (its own ViT: fused per-head ``query_key_value``, LayerNorms, QuickGELU) | ``vision.*`` (as mPLUG-Owl2's) |
| ``query_tokens`` [1, Q, C] | ``connector.query_embeds`` |
| ``abstractor.encoder.*``, ``abstractor.visual_fc``, ``abstractor.vit_eos`` | ``connector.*`` (the visual abstractor) |
| ``language_model.model.*``, ``language_model.lm_head`` | ``llm.*`` |

The abstractor's last-layer output of the ViT (after its post-LayerNorm, class token kept) goes to
Q learned queries; ``visual_fc`` and the appended ``vit_eos`` give Q + 1 visual tokens. In a prompt
each ``<image>`` is Q + 1 copies of id ``-1``; images are squashed to the input size (bicubic).
"""

from __future__ import annotations

import torch

from modalign.checkpoints.hf import llm_config_from_hf
from modalign.checkpoints.io import CheckpointError
from modalign.checkpoints.mplug_owl2 import vision_key
from modalign.config import ConnectorConfig, MLLMConfig, VisionConfig

IMAGE_TOKEN_ID = -1


def config_from_owl(d: dict) -> MLLMConfig:
    vc, ac, tc = d.get("vision_config"), d.get("visual_abstractor_config"), d.get("text_config")
    if not vc or not ac or not tc:
        raise CheckpointError(
            "mplug-owl config.json lacks vision_config / visual_abstractor_config / text_config"
        )
    llm = llm_config_from_hf({**tc, "model_type": "llama"})
    vision = VisionConfig(
        model_type="mplug_owl",
        hidden_size=vc.get("hidden_size", 1024),
        intermediate_size=vc.get("intermediate_size", 4096),
        num_layers=vc.get("num_hidden_layers", 24),
        num_heads=vc.get("num_attention_heads", 16),
        image_size=vc.get("image_size", 224),
        patch_size=vc.get("patch_size", 14),
        hidden_act="quick_gelu",  # the reference MLP uses QuickGELU whatever the config says
        layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        feature_layer=-1,
        feature_select="full",
        feature_post_norm=True,
        resize_mode="squash",
    )
    queries = d.get("num_query_tokens", 64)
    connector = ConnectorConfig(
        type="abstractor",
        num_queries=queries,
        num_layers=ac.get("num_hidden_layers", 6),
        num_heads=ac.get("num_attention_heads", 16),
        hidden_size=ac.get("hidden_size", 1024),
        intermediate_size=ac.get("intermediate_size", 2816),
        layer_norm_eps=ac.get("layer_norm_eps", 1e-6),
        eos_token=True,
    )
    return MLLMConfig(llm=llm, vision=vision, connector=connector, image_token_id=IMAGE_TOKEN_ID,
                      placeholder="per_token", source_format="mplug-owl")  # fmt: skip


def state_from_owl(tensors: dict[str, torch.Tensor], cfg: MLLMConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue  # recomputed
        if k == "query_tokens":
            out["connector.query_embeds"] = v
        elif k.startswith("vision_model."):
            out |= vision_key(k[len("vision_model.") :], v, cfg.vision.num_heads)
        elif k.startswith("abstractor."):
            out["connector." + k[len("abstractor.") :]] = v
        elif k == "language_model.lm_head.weight":
            out["llm.lm_head.weight"] = v
        elif k.startswith("language_model.model."):
            out["llm." + k[len("language_model.model.") :]] = v
        else:
            raise CheckpointError(f"unexpected tensor {k!r} in an mplug-owl checkpoint")
    return out
