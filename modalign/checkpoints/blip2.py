"""transformers BLIP-2 (``model_type: blip-2``, ``Blip2ForConditionalGeneration``) with a
Llama-family, OPT or T5 (Flan-T5) language model.

| file key | modalign |
|---|---|
| ``vision_model.embeddings.class_embedding`` [1,1,C] | ``vision.embeddings.class_embedding`` [C] |
| ``vision_model.embeddings.position_embedding`` [1,P,C] | ``vision.embeddings.position_embedding.weight`` [P,C] |
| ``vision_model.encoder.layers.j.self_attn.qkv`` (+ ``q_bias``/``v_bias`` in older files) | ``self_attn.{q,k,v}_proj`` |
| ``vision_model.encoder.layers.j.self_attn.projection`` | ``self_attn.out_proj`` |
| ``vision_model.<rest>`` | ``vision.<rest>`` (features: last layer after post-LN, class token kept) |
| ``query_tokens``, ``qformer.*``, ``language_projection.*`` | ``connector.*`` (``type: qformer``) |
| ``language_model.*`` | ``llm.*`` (Llama as for LLaVA; OPT via ``checkpoints.opt``; T5 encoder-decoder via ``models.t5``) |

BLIP-2's Q-Former text branch (``qformer.embeddings.*``, ``encoder.layer.N.intermediate`` /
``output``), used only for its image-text matching stage, is not read. InstructBLIP
(``model_type: instructblip``) reads it: the instruction's ids (``qformer_input_ids``, one row
per image) enter the Q-Former beside the queries, and ``model(..., qformer_input_ids=...,
qformer_attention_mask=...)`` passes them on.
Images are spliced at ``image_token_index``: one placeholder per query token.
"""

from __future__ import annotations

import torch

from modalign.checkpoints.hf import llm_config_from_hf, map_llava_key
from modalign.checkpoints.io import CheckpointError
from modalign.checkpoints.opt import llm_config_from_opt, map_opt_key
from modalign.config import ConnectorConfig, LLMConfig, MLLMConfig, VisionConfig


def llm_config_from_t5(d: dict) -> LLMConfig:
    """transformers ``T5Config`` (T5 v1.1 / Flan-T5: gated GELU; T5 v1.0: ReLU)."""
    proj = d.get("feed_forward_proj", "relu")
    tie = bool(d.get("tie_word_embeddings", True))
    # transformers 4 scaled the output exactly when the head was tied; 5 says so apart
    scale = bool(d.get("scale_decoder_outputs", tie))
    gated = proj.startswith("gated-")
    act = proj.removeprefix("gated-")
    return LLMConfig(
        model_type="t5", vocab_size=d["vocab_size"], hidden_size=d["d_model"], intermediate_size=d["d_ff"],
        num_layers=d["num_layers"], num_decoder_layers=d.get("num_decoder_layers") or d["num_layers"],
        num_heads=d["num_heads"], num_kv_heads=d["num_heads"], head_dim=d["d_kv"],
        hidden_act="gelu_new" if act == "gelu" else act, mlp="gated" if gated else "plain",
        rms_norm_eps=d.get("layer_norm_epsilon", 1e-6), relative_buckets=d.get("relative_attention_num_buckets", 32),
        relative_max_distance=d.get("relative_attention_max_distance", 128),
        tie_word_embeddings=tie, scale_head=scale, max_position_embeddings=d.get("n_positions", 512),
        bos_token_id=None, eos_token_id=d.get("eos_token_id", 1), pad_token_id=d.get("pad_token_id", 0),
        decoder_start_token_id=d.get("decoder_start_token_id", 0),
    )  # fmt: skip


def config_from_instructblip(d: dict) -> MLLMConfig:
    """InstructBLIP: BLIP-2 whose Q-Former also reads the instruction (``qformer_input_ids``)."""
    cfg = config_from_blip2(d)
    q = d.get("qformer_config") or {}
    cfg.connector.text_vocab_size = q.get("vocab_size", 30523)
    cfg.connector.text_max_positions = q.get("max_position_embeddings", 512)
    cfg.source_format = "instructblip"
    return cfg


def config_from_blip2(d: dict) -> MLLMConfig:
    text = dict(d.get("text_config") or {})
    kind = text.get("model_type", "opt")
    if kind not in ("llama", "mistral", "qwen2", "opt", "t5"):
        raise CheckpointError(f"BLIP-2 with a {kind!r} language model is not supported; supported: opt, t5, "
                              "llama, mistral, qwen2")  # fmt: skip
    token = d.get("image_token_index", d.get("image_token_id"))
    if token is None:
        raise CheckpointError(
            "BLIP-2 config.json has no image_token_index (re-save it with a current transformers)"
        )
    v, q = d.get("vision_config") or {}, d.get("qformer_config") or {}
    vision = VisionConfig(
        model_type="blip2",
        hidden_size=v.get("hidden_size", 1408),
        intermediate_size=v.get("intermediate_size", 6144),
        num_layers=v.get("num_hidden_layers", 39),
        num_heads=v.get("num_attention_heads", 16),
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 14),
        class_token=True,
        pre_layernorm=False,
        post_layernorm=True,
        patch_bias=True,
        hidden_act=v.get("hidden_act", "gelu"),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        feature_layer=-1,
        feature_select="full",
        feature_post_norm=True,
        resize_mode="squash",
    )
    conn = ConnectorConfig(
        type="qformer",
        hidden_act=q.get("hidden_act", "gelu"),
        num_queries=d.get("num_query_tokens", 32),
        num_layers=q.get("num_hidden_layers", 12),
        num_heads=q.get("num_attention_heads", 12),
        hidden_size=q.get("hidden_size", 768),
        intermediate_size=q.get("intermediate_size", 3072),
        layer_norm_eps=q.get("layer_norm_eps", 1e-12),
        cross_attention_every=q.get("cross_attention_frequency", 2),
    )
    if q.get("encoder_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise CheckpointError("qformer_config.encoder_hidden_size must equal vision_config.hidden_size")
    llm = {"opt": llm_config_from_opt, "t5": llm_config_from_t5}.get(kind, llm_config_from_hf)(text)
    return MLLMConfig(llm=llm, vision=vision, connector=conn, image_token_id=token,
                      placeholder="per_token", source_format="blip-2")  # fmt: skip


def state_from_blip2(tensors: dict[str, torch.Tensor], cfg: MLLMConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        parts = k.split(".")
        text_branch = k.startswith("qformer.embeddings.") or (
            k.startswith("qformer.encoder.layer.") and parts[4] in ("intermediate", "output")
        )
        if text_branch and not cfg.connector.text_vocab_size:
            continue  # BLIP-2's Q-Former text branch (image-text matching only)
        if k == "qformer.embeddings.position_ids":
            continue
        if k == "query_tokens" or k.startswith(("qformer.", "language_projection.")):
            out["connector." + k] = v
        elif k.startswith("vision_model."):
            rest = k[len("vision_model.") :]
            if rest == "embeddings.class_embedding":
                out["vision." + rest] = v.reshape(-1)
            elif rest == "embeddings.position_embedding":
                out["vision.embeddings.position_embedding.weight"] = v.reshape(v.shape[-2], v.shape[-1])
            elif ".self_attn.qkv.weight" in rest:
                stem = rest.split(".self_attn.")[0]
                for proj, w in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3), strict=True):
                    out[f"vision.{stem}.self_attn.{proj}.weight"] = w
            elif ".self_attn." in rest and rest.endswith(("qkv.bias", "q_bias", "v_bias")):
                stem = rest.split(".self_attn.")[0]
                biases.setdefault(stem, {})[rest.rsplit(".", 1)[1]] = v
            else:
                out["vision." + rest.replace(".self_attn.projection.", ".self_attn.out_proj.")] = v
        elif k.startswith("language_model.") and cfg.llm.model_type == "opt":
            out[map_opt_key(k[len("language_model.") :])] = v
        elif k.startswith("language_model.") and cfg.llm.model_type == "t5":
            rest = k[len("language_model.") :]
            if not rest.endswith("embed_tokens.weight"):  # tied to ``shared``
                out["llm." + rest] = v
        else:
            name = map_llava_key(k)
            if name is None:
                continue
            if not name.startswith("llm."):
                raise CheckpointError(f"unexpected tensor {k!r} in a BLIP-2 checkpoint")
            out[name] = v
    for stem, b in biases.items():
        if "bias" in b:
            q, kb, vb = b["bias"].chunk(3)
        else:
            q, vb = b["q_bias"], b["v_bias"]
            kb = torch.zeros_like(q)
        for proj, t in zip(("q_proj", "k_proj", "v_proj"), (q, kb, vb), strict=True):
            out[f"vision.{stem}.self_attn.{proj}.bias"] = t
    return out
