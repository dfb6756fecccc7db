"""InternLM2 and InternLM-XComposer2 / 4KHD / 2.5 release layouts (``model_type: internlm2``).

| file key | modalign |
|---|---|
| ``model.tok_embeddings`` | ``llm.embed_tokens`` |
| ``model.layers.i.attention_norm`` / ``ffn_norm`` | ``input_layernorm`` / ``post_attention_layernorm`` |
| ``model.layers.i.attention.wqkv`` (grouped per KV head) | ``self_attn.qkv_proj`` ([q; k; v] order) |
| ``model.layers.i.attention.wo`` | ``self_attn.o_proj`` |
| ``model.layers.i.feed_forward.w1`` / ``w3`` / ``w2`` | ``mlp.gate_proj`` / ``up_proj`` / ``down_proj`` |
| ``<linear>.Plora_A`` / ``Plora_B`` | ``<linear>.plora_A`` / ``plora_B`` (rank from the file, scaling 1) |
| ``output.weight`` | ``llm.lm_head.weight`` |
| ``vit.vision_tower.vision_model.*`` | ``vision.*`` (CLIP; last layer, no post-LN, class token dropped) |
| ``vision_proj.0`` / ``vision_proj.2`` | ``connector.linear_1`` / ``linear_2`` (``mlp2x_gelu``) |
| ``plora_glb_GN`` / ``plora_sub_GN`` (4KHD / 2.5) | ``vision.glb_GN`` / ``vision.sub_GN`` (``hd_layout: ixc``) |
| ``video_mem_proj.*`` (OmniLive) | not read: it serves the video-memory path, not image/text chat |

The vision tower's config is read from a sub-folder holding a CLIP ``config.json`` (as the
official code does, e.g. ``IXC2d5_clip_l_560/``), else inferred from the weights (head width 64,
as in CLIP ViT-L/14). IXC2-VL's 336-px position table (577 rows) is resized bicubically to the
490-px grid (1226 rows). There is no placeholder id in the official code; modalign uses one
``-200`` per image (``placeholder: per_image``). Dynamic-NTK RoPE is applied statelessly (by
the current sequence length), whereas the reference code keeps the largest length seen.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from modalign.checkpoints.hf import _require, vision_config_from_hf
from modalign.checkpoints.io import CheckpointError
from modalign.config import ConnectorConfig, LLMConfig, MLLMConfig, PLoRAConfig, VisionConfig
from modalign.models.vision import resize_position_table

IMAGE_TOKEN_INDEX = -200
_RENAMES = (
    ("model.tok_embeddings.", "llm.embed_tokens."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".attention.wqkv.", ".self_attn.qkv_proj."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".Plora_A.", ".plora_A."),
    (".Plora_B.", ".plora_B."),
)


def llm_config_from_internlm2(d: dict, plora_rank: int | None) -> LLMConfig:
    _require(d, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
             "internlm2")  # fmt: skip
    heads = d["num_attention_heads"]
    bias = bool(d.get("bias", False))
    return LLMConfig(
        model_type="internlm2",
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        hidden_act=d.get("hidden_act", "silu"),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        rope_scaling=d.get("rope_scaling"),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        qkv_bias=bias,
        o_bias=bias,
        fused_qkv=True,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id", 1),
        eos_token_id=d.get("eos_token_id", 2),
        pad_token_id=d.get("pad_token_id", 0),
        plora=None
        if plora_rank is None
        else PLoRAConfig(
            rank=plora_rank,
            alpha=float(plora_rank),
            targets=["qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),  # fmt: skip
    )


def _vision_config(path: Path, tensors: dict) -> VisionConfig:
    """``tensors``: names -> shapes."""
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        f = sub / "config.json"
        if f.is_file():
            d = json.loads(f.read_text())
            if d.get("model_type") in ("clip_vision_model", "clip"):
                return vision_config_from_hf(d)
    # infer from the weights (CLIP ViT-L/14 style: head width 64)
    pre = "vit.vision_tower.vision_model."
    c = tensors[pre + "embeddings.class_embedding"][0]
    patch = tensors[pre + "embeddings.patch_embedding.weight"][-1]
    rows = tensors[pre + "embeddings.position_embedding.weight"][0]
    layers = 1 + max(
        int(k[len(pre) :].split(".")[2]) for k in tensors if k.startswith(pre + "encoder.layers.")
    )
    inner = tensors[pre + "encoder.layers.0.mlp.fc1.weight"][0]
    return VisionConfig(hidden_size=c, intermediate_size=inner, num_layers=layers, num_heads=max(c // 64, 1),
                        image_size=math.isqrt(rows - 1) * patch, patch_size=patch)  # fmt: skip


def config_from_internlm2(d: dict, path: Path, tensors: dict) -> MLLMConfig:
    """``tensors``: names -> shapes (from ``read_shapes``)."""
    a = next((k for k in tensors if k.endswith("wqkv.Plora_A.weight")), None)
    llm = llm_config_from_internlm2(d, None if a is None else tensors[a][0])
    if not any(k.startswith("vit.") for k in tensors):
        return MLLMConfig(llm=llm, source_format="internlm2")
    vision = _vision_config(path, tensors)
    # the official vis_processor resizes straight to the tower's size (no crop, no padding)
    vision.feature_layer, vision.feature_select, vision.resize_mode = -1, "patch", "squash"
    if "plora_glb_GN" in tensors:
        vision.hd_layout = "ixc"
    else:
        rows = tensors["vit.vision_tower.vision_model.embeddings.position_embedding.weight"][0]
        # IXC2-VL: a CLIP-L/14-336 table (577 rows) is resized to 490 px when loaded; a table
        # that is already resized (1226 rows) is taken as it is, whatever the sub-config says
        vision.image_size = 490 if rows == 577 else math.isqrt(rows - 1) * vision.patch_size
    return MLLMConfig(llm=llm, vision=vision, connector=ConnectorConfig(type="mlp2x_gelu"),
                      image_token_id=IMAGE_TOKEN_INDEX, placeholder="per_image",
                      source_format="internlm-xcomposer2")  # fmt: skip


def _regroup_qkv(w: torch.Tensor, cfg: LLMConfig) -> torch.Tensor:
    """Rows grouped per KV head [q_0..q_{G-1}, k, v] x nkv -> [all q; all k; all v]."""
    nkv, hd = cfg.num_kv_heads, cfg.dim_head
    g = cfg.num_heads // nkv
    x = w.reshape(nkv, g + 2, hd, *w.shape[1:])
    q = x[:, :g].reshape(nkv * g * hd, *w.shape[1:])
    k = x[:, g].reshape(nkv * hd, *w.shape[1:])
    v = x[:, g + 1].reshape(nkv * hd, *w.shape[1:])
    return torch.cat([q, k, v])


def group_qkv(w: torch.Tensor, cfg: LLMConfig) -> torch.Tensor:
    """The inverse of ``_regroup_qkv``: [all q; all k; all v] -> rows grouped per KV head."""
    nkv, hd = cfg.num_kv_heads, cfg.dim_head
    g = cfg.num_heads // nkv
    rest = w.shape[1:]
    q = w[: nkv * g * hd].reshape(nkv, g, hd, *rest)
    k = w[nkv * g * hd : (nkv * g + nkv) * hd].reshape(nkv, 1, hd, *rest)
    v = w[(nkv * g + nkv) * hd :].reshape(nkv, 1, hd, *rest)
    return torch.cat([q, k, v], 1).reshape(w.shape)


def state_from_internlm2(tensors: dict[str, torch.Tensor], cfg: MLLMConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.endswith("rotary_emb.inv_freq") or k.startswith("video_mem_proj."):
            continue
        if k == "output.weight":
            out["llm.lm_head.weight"] = v
        elif k.startswith("vit.vision_tower.vision_model."):
            name = "vision." + k[len("vit.vision_tower.vision_model.") :]
            if name.endswith("position_embedding.weight") and v.shape[0] != cfg.vision.num_positions:
                v = resize_position_table(v, cfg.vision.grid)
            out[name] = v
        elif k.startswith("vision_proj."):
            idx, rest = k[len("vision_proj.") :].split(".", 1)
            if idx not in ("0", "2"):
                raise CheckpointError(f"unexpected tensor {k!r} (vision_proj has layers 0 and 2)")
            out[f"connector.linear_{1 if idx == '0' else 2}.{rest}"] = v
        elif k in ("plora_glb_GN", "plora_sub_GN"):
            out["vision." + k[len("plora_") :]] = v
        elif k.startswith("model."):
            name = k
            for a, b in _RENAMES:
                name = name.replace(a, b)
            name = "llm." + name[len("model.") :] if name.startswith("model.") else name
            if ".qkv_proj." in name and not name.endswith("plora_A.weight"):
                v = _regroup_qkv(v, cfg.llm)
            out[name] = v
        else:
            raise CheckpointError(f"unexpected tensor {k!r} in an InternLM2 / XComposer2 checkpoint")
    return out
