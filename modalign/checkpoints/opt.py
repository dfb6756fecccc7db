"""transformers OPT causal LMs (``model_type: opt``; BLIP-2's OPT-2.7B / 6.7B language models), read
into the core decoder with its OPT switches: LayerNorm (with bias), learned absolute positions
(table rows offset by 2), a plain fc1 -> ReLU -> fc2 MLP, biases everywhere, tied embeddings.

| file key | modalign |
|---|---|
| ``model.decoder.embed_tokens`` / ``embed_positions`` | ``llm.embed_tokens`` / ``llm.embed_positions`` |
| ``model.decoder.layers.N.self_attn.{q,k,v}_proj`` / ``out_proj`` | ``llm.layers.N.self_attn.{q,k,v}_proj`` / ``o_proj`` |
| ``...self_attn_layer_norm`` / ``...final_layer_norm`` | ``input_layernorm`` / ``post_attention_layernorm`` |
| ``...fc1`` / ``...fc2`` | ``mlp.up_proj`` / ``mlp.down_proj`` |
| ``model.decoder.final_layer_norm``, ``lm_head`` | ``llm.norm``, ``llm.lm_head`` (tied) |
"""

from __future__ import annotations

from modalign.checkpoints.io import CheckpointError
from modalign.config import LLMConfig, MLLMConfig

_LAYER = {"self_attn.out_proj.": "self_attn.o_proj.", "self_attn_layer_norm.": "input_layernorm.",
          "final_layer_norm.": "post_attention_layernorm.", "fc1.": "mlp.up_proj.", "fc2.": "mlp.down_proj."}  # fmt: skip


def llm_config_from_opt(d: dict) -> LLMConfig:
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads")
        if k not in d
    ]
    if missing:
        raise CheckpointError(f"opt config.json lacks required field(s): {', '.join(missing)}")
    if not d.get("do_layer_norm_before", True):
        raise CheckpointError(
            "OPT with post-layer norms (do_layer_norm_before: false, OPT-350M) is not supported"
        )
    if d.get("word_embed_proj_dim", d["hidden_size"]) != d["hidden_size"]:
        raise CheckpointError(
            "OPT with project_in / project_out (word_embed_proj_dim != hidden_size) is not supported"
        )
    if not d.get("layer_norm_elementwise_affine", True):
        raise CheckpointError(
            "OPT without LayerNorm weights (layer_norm_elementwise_affine: false) is not supported"
        )
    bias = bool(d.get("enable_bias", True))
    return LLMConfig(
        model_type="opt", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["ffn_dim"],
        num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"], num_kv_heads=d["num_attention_heads"],
        hidden_act=d.get("activation_function", "relu"), max_position_embeddings=d.get("max_position_embeddings", 2048),
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        norm="layer", position="learned", position_offset=2, mlp="plain", layer_norm_eps=1e-5,
        bos_token_id=d.get("bos_token_id", 2), eos_token_id=d.get("eos_token_id", 2), pad_token_id=d.get("pad_token_id", 1),
    )  # fmt: skip


def map_opt_key(key: str) -> str | None:
    """OPT key (``model.decoder.*``, ``lm_head``) -> ``llm.*``."""
    if key == "lm_head.weight":
        return "llm.lm_head.weight"
    pre = "model.decoder."
    if not key.startswith(pre):
        raise CheckpointError(f"unexpected tensor {key!r} in an OPT checkpoint")
    rest = key[len(pre) :]
    if rest.startswith("final_layer_norm."):
        return "llm.norm." + rest[len("final_layer_norm.") :]
    if rest.startswith("layers."):
        n, _, tail = rest[len("layers.") :].partition(".")
        for old, new in _LAYER.items():
            if tail.startswith(old):
                tail = new + tail[len(old) :]
                break
        return f"llm.layers.{n}.{tail}"
    return "llm." + rest  # embed_tokens, embed_positions


def config_from_opt(d: dict) -> MLLMConfig:
    return MLLMConfig(llm=llm_config_from_opt(d), source_format="hf-opt")


def state_from_opt(tensors: dict, cfg: MLLMConfig) -> dict:
    out = {}
    for k, v in tensors.items():
        name = map_opt_key(k)
        if name is not None:
            out[name] = v
    return out
