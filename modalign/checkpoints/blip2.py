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
``output``), used only by its stage-1 heads, is not read from a ``Blip2ForConditionalGeneration``.
A ``Blip2ForImageTextRetrieval`` folder (``blip2-itm-vit-g``: no language model) holds the text
branch and the stage-1 heads: ``embeddings.*`` and ``qformer.layernorm`` become the text branch's
``connector.qformer.embeddings.*``, ``vision_projection`` / ``text_projection`` / ``itm_head`` the
itc and itm heads (its itc temperature is not saved: 0.07, the paper's initial value); its vision
tower and Q-Former are read as a recipe's ``model.init.vision`` / ``connector`` parts (no decoder to
build a whole model from). LAVIS's own stage-1 files (``blip2_pretrained*.pth``, MiniGPT-4's
``llama_proj`` file) are read as connector files: ``lavis_connector_state``. InstructBLIP
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


def config_from_t5(d: dict) -> MLLMConfig:
    """A text-only transformers T5 / Flan-T5 folder (``T5ForConditionalGeneration``): BLIP-2
    Flan-T5's language model, e.g. a recipe's ``model.init.llm``."""
    return MLLMConfig(llm=llm_config_from_t5(d), source_format="hf-t5")


def state_from_t5(tensors: dict[str, torch.Tensor], cfg: MLLMConfig) -> dict[str, torch.Tensor]:
    """T5 names kept under ``llm.``; the encoder's and decoder's ``embed_tokens`` are ``shared``."""
    return {"llm." + k: v for k, v in tensors.items() if not k.endswith("embed_tokens.weight")}


def config_from_instructblip(d: dict) -> MLLMConfig:
    """InstructBLIP: BLIP-2 whose Q-Former also reads the instruction (``qformer_input_ids``)."""
    cfg = config_from_blip2(d)
    q = d.get("qformer_config") or {}
    cfg.connector.text_vocab_size = q.get("vocab_size", 30523)
    cfg.connector.text_max_positions = q.get("max_position_embeddings", 512)
    cfg.source_format = "instructblip"
    return cfg


def is_retrieval(d: dict) -> bool:
    """A ``Blip2ForImageTextRetrieval`` config: vision tower, Q-Former with text branch and heads, no LM."""
    return "Blip2ForImageTextRetrieval" in (d.get("architectures") or [])


def config_from_blip2(d: dict) -> MLLMConfig:
    text = dict(d.get("text_config") or {})
    kind = text.get("model_type", "opt")
    if kind not in ("llama", "mistral", "qwen2", "opt", "t5"):
        raise CheckpointError(f"BLIP-2 with a {kind!r} language model is not supported; supported: opt, t5, "
                              "llama, mistral, qwen2")  # fmt: skip
    token = d.get("image_token_index", d.get("image_token_id"))
    if token is None and is_retrieval(d):
        token = 0  # no language model to splice into
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
    if is_retrieval(d):
        conn.text_vocab_size = q.get("vocab_size", 30523)
        conn.text_max_positions = q.get("max_position_embeddings", 512)
        conn.text_heads = ["itc", "itm"]
        conn.embed_dim = d.get("image_text_hidden_size", 256)
        conn.text_pad_id = q.get("pad_token_id", 0)
    llm = {"opt": llm_config_from_opt, "t5": llm_config_from_t5}.get(kind, llm_config_from_hf)(text)
    return MLLMConfig(llm=llm, vision=vision, connector=conn, image_token_id=token,
                      placeholder="per_token", source_format="blip-2")  # fmt: skip


def state_from_blip2(tensors: dict[str, torch.Tensor], cfg: MLLMConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    text = bool(cfg.connector.text_vocab_size)
    for k, v in tensors.items():
        parts = k.split(".")
        text_branch = k.startswith(("qformer.embeddings.", "embeddings.")) or (
            k.startswith("qformer.encoder.layer.") and parts[4] in ("intermediate", "output")
        )
        if text_branch and not text:
            continue  # BLIP-2's Q-Former text branch (its stage-1 heads only)
        if k.endswith("embeddings.position_ids"):
            continue
        if k.startswith("embeddings."):  # Blip2ForImageTextRetrieval: the text branch's embeddings
            out["connector.qformer." + k] = v
        elif k.startswith("qformer.layernorm.") and text:  # ... and their LayerNorm
            out["connector.qformer.embeddings." + k[len("qformer.") :]] = v
        elif k.startswith(("vision_projection.", "text_projection.", "itm_head.")):
            out["connector." + k] = v
        elif k == "query_tokens" or k.startswith(("qformer.", "language_projection.")):
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
    if "itc" in cfg.connector.text_heads and "connector.temp" not in out:
        out["connector.temp"] = torch.tensor(0.07)  # not saved by transformers: the paper's initial value
    for stem, b in biases.items():
        if "bias" in b:
            q, kb, vb = b["bias"].chunk(3)
        else:
            q, vb = b["q_bias"], b["v_bias"]
            kb = torch.zeros_like(q)
        for proj, t in zip(("q_proj", "k_proj", "v_proj"), (q, kb, vb), strict=True):
            out[f"vision.{stem}.self_attn.{proj}.bias"] = t
    return out


def _bert_name(k: str) -> str | None:
    """A BERT-layout Q-Former name (LAVIS's ``Qformer.bert.*`` / ``Qformer.cls.*`` without
    ``Qformer.``, or a transformers BERT folder's) -> the connector's name; None for what the
    connector does not hold (``position_ids``, the tied LM decoder, BERT's token types, pooler)."""
    k = k.removeprefix("bert.")
    if k.startswith("embeddings."):
        rest = k[len("embeddings.") :]
        if rest.startswith(("word_embeddings.", "position_embeddings.")):
            return "qformer.embeddings." + rest
        if rest.startswith("LayerNorm."):
            return "qformer.embeddings.layernorm." + rest.split(".", 1)[1]
        return None
    if k.startswith("encoder.layer."):
        k = k.replace(".attention.self.", ".attention.attention.")
        return "qformer." + k.replace(".crossattention.self.", ".crossattention.attention.")
    if k.startswith("cls.predictions."):
        rest = k[len("cls.predictions.") :]
        return None if rest.startswith("decoder.") else "itg_head." + rest  # the decoder is tied
    return None


def lavis_connector_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS's BLIP-2 file (``Qformer.bert.*``, ``Qformer.cls.predictions.*``, ``query_tokens``,
    ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``) and MiniGPT-4's (``llama_proj``) ->
    ``connector.*`` tensors of a ``type: qformer`` connector. The ViT (``visual_encoder.*``,
    ``ln_vision``) and any LLM are not connector weights and are left out. A Q-Former without the
    text branch in the recipe takes ``embeddings.LayerNorm`` as its query LayerNorm (MiniGPT-4 drops
    the text branch and keeps that LayerNorm)."""
    heads = {"vision_proj.": "vision_projection.", "text_proj.": "text_projection.", "itm_head.": "itm_head.",
             "llama_proj.": "language_projection.", "opt_proj.": "language_projection.",
             "t5_proj.": "language_projection."}  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.startswith("Qformer."):
            name = _bert_name(k[len("Qformer.") :])
            if name is not None:
                out["connector." + name] = v
        elif k in ("query_tokens", "temp"):
            out["connector." + k] = v
        else:
            for src, dst in heads.items():
                if k.startswith(src):
                    out["connector." + dst + k[len(src) :]] = v
    return out


def fit_qformer_state(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """A Q-Former's tensors read from LAVIS's or BERT's layout (names without ``connector.``) for
    the recipe's Q-Former ``cfg`` (a ConnectorConfig): the heads it lacks are left out, and without
    its text branch so are the text embeddings and text FFNs, the embeddings' LayerNorm becoming
    the query LayerNorm."""
    heads = set(cfg.text_heads or [])
    drop = [p for h, ps in (("itc", ("vision_projection.", "text_projection.", "temp")), ("itm", ("itm_head.",)),
                            ("itg", ("itg_head.",))) if h not in heads for p in ps]  # fmt: skip
    out = {}
    for k, v in state.items():
        if k.startswith(tuple(drop)):
            continue
        if not cfg.text_vocab_size:
            if k.startswith("qformer.embeddings.layernorm."):
                k = "qformer.layernorm." + k.rsplit(".", 1)[1]
            elif k.startswith("qformer.embeddings.") or (
                k.startswith("qformer.encoder.layer.") and k.split(".")[4] in ("intermediate", "output")
            ):
                continue
        out[k] = v
    return out


def bert_connector_state(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """A transformers BERT folder (``BertModel`` / ``BertForMaskedLM``, e.g. bert-base-uncased) as
    the start of a Q-Former (``cfg``: its ConnectorConfig), as BLIP-2 starts it: BERT's embeddings,
    self-attention and FFN in every layer, that FFN copied into the queries' FFN too, BERT's LM head
    as the itg head; the word embeddings (and the head's bias) grown to ``text_vocab_size`` with
    N(0, 0.02) rows (BLIP-2 adds [DEC]). Cross-attention, queries and the other heads are not in
    BERT: they start fresh. BERT's token-type embeddings are not used (BLIP-2's Q-Former has none)."""
    if not cfg.text_vocab_size:
        raise CheckpointError(
            "a BERT folder starts a Q-Former with its text branch: set connector.text_vocab_size"
        )
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        name = _bert_name(k)
        if name is None:
            continue
        parts = name.split(".")
        if parts[1] == "encoder" and int(parts[3]) >= cfg.num_layers:
            continue
        out[name] = v
        if parts[1] == "encoder" and parts[4] in ("intermediate", "output"):
            out[name.replace(f".{parts[4]}.", f".{parts[4]}_query.", 1)] = v.clone()
    out = fit_qformer_state(out, cfg)
    vocab = cfg.text_vocab_size
    g = torch.Generator().manual_seed(0)
    for key in ("qformer.embeddings.word_embeddings.weight", "itg_head.bias"):
        t = out.get(key)
        if t is None or t.shape[0] == vocab:
            continue
        if t.shape[0] > vocab:
            raise CheckpointError(
                f"the BERT folder's vocabulary ({t.shape[0]}) exceeds connector.text_vocab_size ({vocab})"
            )
        extra = torch.zeros((vocab - t.shape[0], *t.shape[1:]), dtype=t.dtype)
        if t.dim() == 2:
            extra.normal_(0.0, 0.02, generator=g)
        out[key] = torch.cat([t, extra])
    return out
