"""BLIP-2 Q-Former connector (``type: qformer``): learned queries that self-attend and, every
``cross_attention_every`` layers, cross-attend to the frozen image features; BERT-style
post-LayerNorm residual blocks; then ``language_projection`` to the LLM width.

Names follow transformers' ``Blip2ForConditionalGeneration`` (``query_tokens``,
``qformer.encoder.layer.N.attention.attention.query`` ..., ``language_projection``).

    q = LN(query_tokens)
    per layer: q = LN(q + dense(SelfAttn(q)))
               q = LN(q + dense(CrossAttn(q, image)))      (every N-th layer)
               q = LN(q + dense(act(dense(q))))              (intermediate_query / output_query)
    tokens = language_projection(q)                          [N, Q, D_llm]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modalign.config import ConnectorConfig
from modalign.models.connectors import register
from modalign.models.layers import activation


class QFormerMultiHeadAttention(nn.Module):
    def __init__(self, d: int, d_kv: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d_kv, d)
        self.value = nn.Linear(d_kv, d)

    def forward(self, x, kv, key_mask=None):
        n, lq, d = x.shape
        h = self.heads

        def split(t):
            return t.view(n, -1, h, d // h).transpose(1, 2)

        m = None if key_mask is None else key_mask[:, None, None, :].bool()
        o = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(kv)), split(self.value(kv)), attn_mask=m
        )
        return o.transpose(1, 2).reshape(n, lq, d)


class QFormerSelfOutput(nn.Module):
    def __init__(self, d_in: int, d: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, d: int, d_kv: int, heads: int, eps: float):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(d, d_kv, heads)
        self.output = QFormerSelfOutput(d, d, eps)

    def forward(self, x, kv=None, key_mask=None):
        return self.output(self.attention(x, x if kv is None else kv, key_mask), x)


class QFormerIntermediate(nn.Module):
    def __init__(self, d: int, inner: int, act: str):
        super().__init__()
        self.dense = nn.Linear(d, inner)
        self.act = activation(act)

    def forward(self, x):
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: ConnectorConfig, d_vis: int, cross: bool):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = QFormerAttention(d, d, cfg.num_heads, eps)
        self.crossattention = QFormerAttention(d, d_vis, cfg.num_heads, eps) if cross else None
        self.intermediate_query = QFormerIntermediate(d, cfg.intermediate_size, cfg.hidden_act)
        self.output_query = QFormerSelfOutput(cfg.intermediate_size, d, eps)
        if cfg.text_vocab_size:  # InstructBLIP: the instruction tokens have their own FFN
            self.intermediate = QFormerIntermediate(d, cfg.intermediate_size, cfg.hidden_act)
            self.output = QFormerSelfOutput(cfg.intermediate_size, d, eps)

    def forward(self, x, image, n_query: int, key_mask=None):
        """x = [queries; instruction tokens]; only the queries cross-attend to the image."""
        x = self.attention(x, key_mask=key_mask)
        q, t = x[:, :n_query], x[:, n_query:]
        if self.crossattention is not None:
            q = self.crossattention(q, image)
        q = self.output_query(self.intermediate_query(q), q)
        if t.shape[1]:
            t = self.output(self.intermediate(t), t)
            return torch.cat([q, t], dim=1)
        return q


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: ConnectorConfig, d_vis: int):
        super().__init__()
        every = max(cfg.cross_attention_every, 1)
        self.layer = nn.ModuleList(QFormerLayer(cfg, d_vis, i % every == 0) for i in range(cfg.num_layers))


class QFormerEmbeddings(nn.Module):
    """InstructBLIP: instruction word + position embeddings; LayerNorm over [queries; words]."""

    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.text_vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.text_max_positions, cfg.hidden_size)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, queries, ids=None):
        if ids is None:
            return self.layernorm(queries)
        pos = torch.arange(ids.shape[1], device=ids.device)
        words = self.word_embeddings(ids) + self.position_embeddings(pos)
        return self.layernorm(torch.cat([queries, words.to(queries.dtype)], dim=1))


class QFormer(nn.Module):
    def __init__(self, cfg: ConnectorConfig, d_vis: int):
        super().__init__()
        if cfg.text_vocab_size:
            self.embeddings = QFormerEmbeddings(cfg)
        else:
            self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = QFormerEncoder(cfg, d_vis)


class QFormerConnector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, d_vis: int, d_llm: int, num_features: int):
        super().__init__()
        self.cfg = cfg
        # distinct random queries, as BLIP-2 initialises them (identical ones would stay identical)
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden_size) * 0.02)
        self.qformer = QFormer(cfg, d_vis)
        self.language_projection = nn.Linear(cfg.hidden_size, d_llm)

    def forward(
        self, x_NLD: torch.Tensor, qformer_input_ids=None, qformer_attention_mask=None
    ) -> torch.Tensor:
        """Image features [N, L, D_vis] (+ InstructBLIP's instruction ids [N, T]) -> [N, Q, D_llm]."""
        n, nq = x_NLD.shape[0], self.cfg.num_queries
        q = self.query_tokens.expand(n, -1, -1).to(x_NLD.dtype)
        key_mask = None
        if hasattr(self.qformer, "embeddings"):
            if qformer_input_ids is None:
                raise ValueError(
                    "this Q-Former (InstructBLIP) needs qformer_input_ids: the instruction's ids"
                )
            x = self.qformer.embeddings(q, qformer_input_ids)
            if qformer_attention_mask is not None:
                key_mask = torch.cat([torch.ones(n, nq, dtype=torch.bool, device=x.device),
                                      qformer_attention_mask.bool()], dim=1)  # fmt: skip
        else:
            x = self.qformer.layernorm(q)
        for layer in self.qformer.encoder.layer:
            x = layer(x, x_NLD, nq, key_mask)
        return self.language_projection(x[:, :nq])

    def num_output_tokens(self, num_in: int) -> int:
        return self.cfg.num_queries


@register("qformer")
def _qformer(cfg, d_vis, d_llm, n):
    return QFormerConnector(cfg, d_vis, d_llm, n)
