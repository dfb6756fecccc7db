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

BLIP-2's stage 1 (``text_heads``) adds the text branch and three heads sharing the queries. A
text enters as BERT does (``[CLS] words [SEP]``; ``[DEC] words [SEP]`` for generation), through the
same self-attention layers with a text FFN of its own (``intermediate`` / ``output``):

    itc   text alone -> its [CLS] state; sim(image, text) = max over queries of
          cos(vision_projection(q_i), text_projection(cls))                     ``itc_similarity``
    itm   [queries; text], every token sees every token -> itm_head(queries), mean over queries
                                                                                ``itm_logits``
    itg   [queries; text], queries see the queries only, a text token the queries and the text
          up to itself -> itg_head(text states) over the text vocabulary          ``itg_logits``
"""

from __future__ import annotations

import math

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
        self.keep_probs = False  # PNP-VQA's GradCAM reads the probabilities (``probs``)
        self.probs: torch.Tensor | None = None
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d_kv, d)
        self.value = nn.Linear(d_kv, d)

    def forward(self, x, kv, mask=None):
        """``mask``: None, [N, L_kv] (keys to attend) or [N, L, L_kv] (per query row); True attends."""
        n, lq, d = x.shape
        h = self.heads

        def split(t):
            return t.view(n, -1, h, d // h).transpose(1, 2)

        m = None
        if mask is not None:
            m = (mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]).bool()
        q, k, v = split(self.query(x)), split(self.key(kv)), split(self.value(kv))
        if self.keep_probs:  # the attention probabilities kept, with their gradient (GradCAM)
            s = q @ k.transpose(-1, -2) / math.sqrt(d // h)
            if m is not None:
                s = s.masked_fill(~m, float("-inf"))
            self.probs = s.softmax(-1)
            if self.probs.requires_grad:
                self.probs.retain_grad()
            o = self.probs @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
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

    def forward(self, x, kv=None, mask=None):
        return self.output(self.attention(x, x if kv is None else kv, mask), x)


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

    def forward(self, x, image, n_query: int, mask=None):
        """x = [queries; text tokens]; only the queries cross-attend to the image (none: a text alone)."""
        x = self.attention(x, mask=mask)
        if n_query == 0:
            return self.output(self.intermediate(x), x)
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
        """LayerNorm over [queries; words] (either may be absent: ``queries`` None, ``ids`` None)."""
        if ids is None:
            return self.layernorm(queries)
        if ids.shape[1] > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"Q-Former text of {ids.shape[1]} tokens: longer than its {self.position_embeddings.num_embeddings} positions"
            )
        pos = torch.arange(ids.shape[1], device=ids.device)
        words = self.word_embeddings(ids) + self.position_embeddings(pos)
        if queries is None:
            return self.layernorm(words)
        return self.layernorm(torch.cat([queries, words.to(queries.dtype)], dim=1))


class QFormerLMHead(nn.Module):
    """BERT's LM prediction head (BLIP-2's ``cls.predictions``): dense, activation, LayerNorm, then
    the word embeddings' transpose plus a bias."""

    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        d = cfg.hidden_size
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(d, d)
        self.transform.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.act = activation(cfg.hidden_act)
        self.bias = nn.Parameter(torch.zeros(cfg.text_vocab_size))

    def forward(self, h, word_embeddings: torch.Tensor):
        t = self.transform
        return F.linear(t.LayerNorm(self.act(t.dense(h))), word_embeddings, self.bias)


class QFormer(nn.Module):
    def __init__(self, cfg: ConnectorConfig, d_vis: int):
        super().__init__()
        if cfg.text_vocab_size:
            self.embeddings = QFormerEmbeddings(cfg)
        else:
            self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = QFormerEncoder(cfg, d_vis)


TEXT_HEADS = ("itc", "itm", "itg")


class QFormerConnector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, d_vis: int, d_llm: int, num_features: int):
        super().__init__()
        self.cfg = cfg
        heads = list(cfg.text_heads or [])
        bad = sorted(set(heads) - set(TEXT_HEADS))
        if bad:
            raise ValueError(f"connector.text_heads: unknown head(s) {bad}; known: {', '.join(TEXT_HEADS)}")
        if heads and not cfg.text_vocab_size:
            raise ValueError(
                "connector.text_heads needs the Q-Former's text branch: set connector.text_vocab_size"
            )
        # distinct random queries, as BLIP-2 initialises them (identical ones would stay identical)
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden_size) * 0.02)
        self.qformer = QFormer(cfg, d_vis)
        self.language_projection = nn.Linear(cfg.hidden_size, d_llm)
        d = cfg.hidden_size
        if "itc" in heads:
            self.vision_projection = nn.Linear(d, cfg.embed_dim)
            self.text_projection = nn.Linear(d, cfg.embed_dim)
            self.temp = nn.Parameter(torch.tensor(0.07))
        if "itm" in heads:
            self.itm_head = nn.Linear(d, 2)
        if "itg" in heads:
            self.itg_head = QFormerLMHead(cfg)
        self._init_bert_style()

    @torch.no_grad()
    def _init_bert_style(self) -> None:
        """BERT's initialisation, which BLIP-2's Q-Former starts from (transformers' too): linear
        and embedding weights N(0, 0.02), biases 0 (the default N(0, 1) embeddings would start the
        itg head's logits tens of nats off)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()

    @property
    def instruction_input(self) -> bool:
        """InstructBLIP: the connector's own output reads the instruction's ids."""
        return bool(self.cfg.text_vocab_size) and not self.cfg.text_heads

    def forward(
        self, x_NLD: torch.Tensor, qformer_input_ids=None, qformer_attention_mask=None
    ) -> torch.Tensor:
        """Image features [N, L, D_vis] (+ InstructBLIP's instruction ids [N, T]) -> [N, Q, D_llm]."""
        if not self.instruction_input:
            return self.language_projection(self.query_states(x_NLD))
        if qformer_input_ids is None:
            raise ValueError("this Q-Former (InstructBLIP) needs qformer_input_ids: the instruction's ids")
        states = self.joint_states(x_NLD, qformer_input_ids, qformer_attention_mask)
        return self.language_projection(states[:, : self.cfg.num_queries])

    # ------------------------------------------------------------------ the Q-Former's passes

    def _norm(self, queries, ids=None):
        if hasattr(self.qformer, "embeddings"):
            return self.qformer.embeddings(queries, ids)
        if ids is not None:
            raise ValueError("this Q-Former has no text branch (connector.text_vocab_size is not set)")
        return self.qformer.layernorm(queries)

    def _run(self, x, image, n_query: int, mask=None):
        for layer in self.qformer.encoder.layer:
            x = layer(x, image, n_query, mask)
        return x

    def query_states(self, image: torch.Tensor) -> torch.Tensor:
        """The queries' last states for image features [N, L, D_vis] -> [N, Q, d]."""
        q = self.query_tokens.expand(image.shape[0], -1, -1).to(image.dtype)
        return self._run(self._norm(q), image, self.cfg.num_queries)

    def text_states(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """A text alone through the text branch (no queries, no image): [N, T] -> [N, T, d]."""
        return self._run(self._norm(None, ids), None, 0, mask)

    def joint_states(self, image, ids, mask=None, causal: bool = False) -> torch.Tensor:
        """[queries; text] over image features: every token sees every (unpadded) token, or with
        ``causal`` BLIP-2's multimodal causal mask (queries see the queries, a text token the
        queries and the text up to itself). -> [N, Q + T, d]"""
        n, nq, t = ids.shape[0], self.cfg.num_queries, ids.shape[1]
        q = self.query_tokens.expand(n, -1, -1).to(image.dtype)
        dev = ids.device
        keys = torch.ones(n, nq + t, dtype=torch.bool, device=dev)
        if mask is not None:
            keys[:, nq:] = mask.bool()
        if causal:
            full = torch.zeros(nq + t, nq + t, dtype=torch.bool, device=dev)
            full[:, :nq] = True
            full[nq:, nq:] = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
            att = full[None] & keys[:, None, :]
        else:  # every token sees every unpadded token (no padding: no mask)
            att = keys if mask is not None else None
        return self._run(self._norm(q, ids), image, nq, att)

    def _head(self, name: str):
        if not hasattr(self, name):
            head = {"vision_projection": "itc", "itm_head": "itm", "itg_head": "itg"}[name]
            raise ValueError(
                f"this Q-Former has no {head} head (connector.text_heads: {self.cfg.text_heads})"
            )
        return getattr(self, name)

    def image_embeds(self, image: torch.Tensor) -> torch.Tensor:
        """itc: each query's unit vector in the shared space, [N, Q, embed_dim]."""
        return F.normalize(self._head("vision_projection")(self.query_states(image)), dim=-1)

    def text_embeds(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """itc: the text's [CLS] state as a unit vector in the shared space, [N, embed_dim]."""
        self._head("vision_projection")
        return F.normalize(self.text_projection(self.text_states(ids, mask)[:, 0]), dim=-1)

    def itc_similarity(self, image, ids, mask=None) -> torch.Tensor:
        """Cosine similarity of every image with every text, the best query's: [N_img, N_txt]
        (not divided by the temperature)."""
        return torch.einsum("iqd,td->itq", self.image_embeds(image), self.text_embeds(ids, mask)).amax(-1)

    def itm_logits(self, image, ids, mask=None) -> torch.Tensor:
        """Image-text matching logits [N, 2] (no, yes) of each image with its row's text."""
        head = self._head("itm_head")
        return head(self.joint_states(image, ids, mask)[:, : self.cfg.num_queries]).mean(1)

    def itg_logits(self, image, ids, mask=None) -> torch.Tensor:
        """Logits over the text vocabulary at each text position [N, T, V] (position t predicts
        token t + 1) under the multimodal causal mask."""
        head = self._head("itg_head")
        h = self.joint_states(image, ids, mask, causal=True)[:, self.cfg.num_queries :]
        return head(h, self.qformer.embeddings.word_embeddings.weight)

    def num_output_tokens(self, num_in: int) -> int:
        return self.cfg.num_queries


@register("qformer")
def _qformer(cfg, d_vis, d_llm, n):
    return QFormerConnector(cfg, d_vis, d_llm, n)
