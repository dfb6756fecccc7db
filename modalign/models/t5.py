"""T5 / Flan-T5 encoder-decoder language models (BLIP-2's Flan-T5 variants), pure PyTorch.

Names follow transformers' ``T5ForConditionalGeneration`` (``shared``, ``encoder.block.N.layer.M``,
``SelfAttention``/``EncDecAttention`` ``q/k/v/o``, ``DenseReluDense.wi_0/wi_1/wo``, ``layer_norm``,
``final_layer_norm``, ``lm_head``), so the loader only strips a prefix.

    encoder: x = embed(ids) | inputs_embeds (the visual tokens spliced in)
             per block: x += attn(rms(x)) + bias(relative buckets, bidirectional); x += ffn(rms(x))
    decoder: y = embed(decoder ids)
             per block: y += attn(rms(y), causal) ; y += cross_attn(rms(y), encoder out) ; y += ffn(rms(y))
    logits = lm_head(rms(y) [* d_model^-0.5 where ``scale_head``: T5 v1.0's tied head])

Attention is not scaled by 1/sqrt(d); the relative position bias of the first block of each stack
is shared by the stack's blocks; softmax runs in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modalign.config import LLMConfig
from modalign.models.layers import RMSNorm, activation


def relative_bucket(rel: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key - query): exact for small distances, then
    logarithmic up to ``max_distance``; separate halves for the two directions when bidirectional."""
    out = torch.zeros_like(rel)
    if bidirectional:
        buckets //= 2
        out = out + (rel > 0).long() * buckets
        rel = rel.abs()
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    exact = buckets // 2
    large = (
        exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    )
    large = torch.min(large, torch.full_like(large, buckets - 1))
    return out + torch.where(rel < exact, rel, large)


class T5Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, has_bias: bool, decoder: bool):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.dim_head
        inner = self.h * self.d
        self.q = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.k = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.v = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.o = nn.Linear(inner, cfg.hidden_size, bias=False)
        self.decoder, self.cfg = decoder, cfg
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_buckets, self.h)

    def bias(self, q_len: int, k_len: int, offset: int, device) -> torch.Tensor:
        """[1, H, q_len, k_len] relative position bias (queries start at position ``offset``)."""
        ctx = torch.arange(offset, offset + q_len, device=device)[:, None]
        mem = torch.arange(k_len, device=device)[None, :]
        b = relative_bucket(
            mem - ctx, not self.decoder, self.cfg.relative_buckets, self.cfg.relative_max_distance
        )
        return self.relative_attention_bias(b).permute(2, 0, 1)[None]

    def forward(self, x, kv=None, bias=None, cache=None):
        """x [B, T, D]; ``kv``: the encoder output (cross-attention); ``bias`` [B|1, H, T, S] (position
        bias plus the mask, as large negatives); ``cache``: a dict that keeps keys/values across steps."""
        b, t, _ = x.shape

        def heads(y):
            return y.view(b, -1, self.h, self.d).transpose(1, 2)

        q = heads(self.q(x))
        if kv is not None and cache is not None and "k" in cache:  # cross-attention: computed once
            k, v = cache["k"], cache["v"]
        else:
            src = x if kv is None else kv
            k, v = heads(self.k(src)), heads(self.v(src))
            if cache is not None and kv is None and "k" in cache:  # self-attention: append this step
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        scores = q @ k.transpose(-1, -2)
        if bias is not None:
            scores = scores + bias
        w = F.softmax(scores.float(), dim=-1).type_as(scores)
        return self.o((w @ v).transpose(1, 2).reshape(b, t, self.h * self.d))


class T5FFN(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        if cfg.mlp == "gated":
            self.wi_0 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
            self.wi_1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        else:
            self.wi = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if hasattr(self, "wi_0") else self.act(self.wi(x))
        return self.wo(h)


class _Sub(nn.Module):
    """One residual sub-layer of a block: ``layer_norm`` then attention or the FFN."""

    def __init__(self, cfg: LLMConfig, kind: str, **kw):
        super().__init__()
        self.layer_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == "self":
            self.SelfAttention = T5Attention(cfg, **kw)
        elif kind == "cross":
            self.EncDecAttention = T5Attention(cfg, has_bias=False, decoder=True)
        else:
            self.DenseReluDense = T5FFN(cfg)


class T5Block(nn.Module):
    def __init__(self, cfg: LLMConfig, first: bool, decoder: bool):
        super().__init__()
        subs = [_Sub(cfg, "self", has_bias=first, decoder=decoder)]
        if decoder:
            subs.append(_Sub(cfg, "cross"))
        subs.append(_Sub(cfg, "ffn"))
        self.layer = nn.ModuleList(subs)

    def forward(self, x, bias, enc=None, enc_bias=None, cache=None):
        s = self.layer[0]
        x = x + s.SelfAttention(
            s.layer_norm(x), bias=bias, cache=None if cache is None else cache.setdefault("self", {})
        )
        if enc is not None:
            c = self.layer[1]
            x = x + c.EncDecAttention(c.layer_norm(x), kv=enc, bias=enc_bias,
                                      cache=None if cache is None else cache.setdefault("cross", {}))  # fmt: skip
        f = self.layer[-1]
        return x + f.DenseReluDense(f.layer_norm(x))


class T5Stack(nn.Module):
    def __init__(self, cfg: LLMConfig, n: int, decoder: bool):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, i == 0, decoder) for i in range(n))
        self.final_layer_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.decoder = decoder


def _mask_bias(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """[B, S] (1 = attend) -> [B, 1, 1, S] additive bias."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class T5LM(nn.Module):
    """The encoder-decoder. ``encode`` runs the encoder; ``decode`` the decoder (with a cache for
    step-by-step generation); ``forward`` both."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder = T5Stack(cfg, cfg.num_layers, decoder=False)
        self.decoder = T5Stack(cfg, cfg.num_decoder_layers or cfg.num_layers, decoder=True)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.shared

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = inputs_embeds
        t = x.shape[1]
        attn = self.encoder.block[0].layer[0].SelfAttention
        bias = attn.bias(t, t, 0, x.device).to(x.dtype)
        m = _mask_bias(attention_mask, x.dtype)
        bias = bias if m is None else bias + m
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)

    def decode(self, ids: torch.Tensor, enc: torch.Tensor, enc_mask: torch.Tensor | None = None,
               cache: dict | None = None) -> torch.Tensor:  # fmt: skip
        """Decoder ids [B, T] (new ones only when a ``cache`` holds earlier steps) -> logits [B, T, V]."""
        y = self.shared(ids)
        b, t = ids.shape
        past = cache.get("length", 0) if cache is not None else 0
        attn = self.decoder.block[0].layer[0].SelfAttention
        bias = attn.bias(t, past + t, past, y.device).to(y.dtype)
        causal = torch.ones(t, past + t, dtype=torch.bool, device=y.device).tril(past)
        bias = bias.masked_fill(~causal, torch.finfo(y.dtype).min)
        enc_bias = _mask_bias(enc_mask, y.dtype)
        for i, block in enumerate(self.decoder.block):
            y = block(y, bias, enc, enc_bias, None if cache is None else cache.setdefault(i, {}))
        if cache is not None:
            cache["length"] = past + t
        y = self.decoder.final_layer_norm(y)
        if self.cfg.scale_head:
            y = y * self.cfg.hidden_size**-0.5
        return self.lm_head(y)

    def forward(self, inputs_embeds, attention_mask, decoder_input_ids):
        return self.decode(decoder_input_ids, self.encode(inputs_embeds, attention_mask), attention_mask)


def shift_right(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """Decoder inputs from labels: the start token, then the labels but the last (-100 -> pad)."""
    out = labels.new_full(labels.shape, pad)
    out[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad)
    out[:, 0] = start
    return out
