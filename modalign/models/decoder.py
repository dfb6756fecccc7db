"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, InternLM2) with a preallocated KV cache.

Pure PyTorch. Names follow transformers' Llama (``embed_tokens``, ``layers.N.self_attn.q_proj``,
``mlp.gate_proj``, ``norm``, ``lm_head``). Every layer receives ``img`` [B, T] (True at image
rows, from the splice's modality ids); base layers ignore it, modality-routed parts
(``modalign.models.modality``) use it. ``media`` (``fusion`` cross_attention / adapter) carries the
images to Flamingo's blocks and to LLaMA-Adapter V2's visual prompts.

    x = embed(ids) | inputs_embeds
    for layer:  x = x + o(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x)))   n1 = input_layernorm
                x = x + down(silu(gate(n2 x)) * up(n2 x))                   n2 = post_attention_layernorm
    logits = lm_head(norm(x))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from modalign.config import LLMConfig
from modalign.models.layers import (
    RMSNorm,
    Rotary,
    activation,
    apply_rotary,
    attend,
    gated_mlp,
    positions_from_mask,
    positions_from_seq_ids,
)
from modalign.models.modality import ALinear, apply_bias_tuning, apply_lora, apply_mam, apply_plora, routed
from modalign.models.xattn import Media, apply_cross_attention

# ------------------------------------------------------------------------------------ cache


class KVCache:
    """Preallocated keys/values ``[layers][B, H_kv, max_len, D]``, written by position."""

    def __init__(self, cfg: LLMConfig, batch: int, max_len: int, dtype=torch.float32, device=None):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.dim_head)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.length = 0  # filled positions; advanced by the decoder after each forward
        self.prefill_length = 0  # length after the first (prompt) forward
        self.media: Media | None = None  # cross-attention: the prompt's visual latents (models/xattn.py)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: need {end} positions, allocated {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (e.g. finished requests removed)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        if self.media is not None:
            self.media = self.media.select(rows)


# ------------------------------------------------------------------------------------ layers


class Rows(NamedTuple):
    """Some positions of each row of a batch: ``pos`` [B, K] (each row's positions first, in order,
    then fillers) and ``valid`` [B, K] (which are real). Training asks the last decoder layer for
    the positions whose next token is supervised alone: its queries, output projection and MLP
    then run on a few rows of each sample instead of all of them."""

    pos: torch.Tensor
    valid: torch.Tensor

    @staticmethod
    def of(keep: torch.Tensor) -> Rows | None:
        """The positions where ``keep`` [B, T] is True; None where there are none."""
        counts = keep.sum(1)
        k = int(counts.max()) if keep.numel() else 0
        if k == 0:
            return None
        # kept positions first, in order (a stable sort of 0 = kept before 1); fillers point at
        # positions that are not kept, whose results are dropped (never NaN: each attends to itself)
        pos = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :k]
        return Rows(pos, torch.arange(k, device=keep.device)[None] < counts[:, None])

    def take(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """``x`` [B, T, ...] at these positions: [B, K, ...]."""
        if x is None:
            return None
        if x.shape[0] != self.pos.shape[0]:  # broadcast over the batch
            x = x.expand(self.pos.shape[0], *x.shape[1:])
        return x[torch.arange(x.shape[0], device=x.device)[:, None], self.pos]

    def masks(self, masks: dict, s: int) -> dict:
        """The attention masks [B, 1, K, S] of these positions as queries: the rows of ``masks``
        (``LLM._masks``), or causal where one is None (plain causal attention)."""
        causal = None
        out = {}
        for name, m in masks.items():
            if m is not None:
                out[name] = m.gather(2, self.pos[:, None, :, None].expand(-1, 1, -1, m.shape[-1]))
            else:  # plain causal attention (the whole forward's is_causal)
                if causal is None:
                    causal = torch.arange(s, device=self.pos.device) <= self.pos[:, None, :, None]
                out[name] = causal
        return out


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.dim_head
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, hd
        self.layer_idx = layer_idx
        if cfg.fused_qkv:
            self.qkv_proj = ALinear(h, (self.nh + 2 * self.nkv) * hd, bias=cfg.qkv_bias)
        else:
            self.q_proj = ALinear(h, self.nh * hd, bias=cfg.qkv_bias)
            self.k_proj = ALinear(h, self.nkv * hd, bias=cfg.qkv_bias)
            self.v_proj = ALinear(h, self.nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = ALinear(self.nh * hd, h, bias=cfg.o_bias)
        self.sliding = (cfg.layer_types or ["full"] * (layer_idx + 1))[layer_idx] == "sliding"
        self.adapter_prompt = None
        self.adapter_prompt_visual = None
        if cfg.adapter is not None and layer_idx >= cfg.num_layers - cfg.adapter.num_layers:
            self.add_adapter(cfg.adapter.prompt_len, h)
        if cfg.adapter is not None and layer_idx < cfg.adapter.visual_layers:
            self.add_visual_adapter(cfg.adapter.prompt_len, h)

    def add_adapter(self, prompt_len: int, hidden: int) -> None:
        """LLaMA-Adapter: learnable prompt whose attention output is scaled by a per-head gate
        that starts at zero, so the layer's output is unchanged at initialisation."""
        dev = self.o_proj.weight.device
        self.adapter_prompt = nn.Parameter(torch.randn(prompt_len, hidden, device=dev) * 0.02)
        self.adapter_gate = nn.Parameter(torch.zeros(self.nh, device=dev))

    def add_visual_adapter(self, prompt_len: int, hidden: int) -> None:
        """LLaMA-Adapter V2's early fusion: a learnable prompt to which each image's projected
        features are added, read under its own per-head gate that starts at zero."""
        dev = self.o_proj.weight.device
        self.adapter_prompt_visual = nn.Parameter(torch.randn(prompt_len, hidden, device=dev) * 0.02)
        self.adapter_gate_visual = nn.Parameter(torch.zeros(self.nh, device=dev))

    def _prompt_kv(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H_kv, L, D] of prompt rows [B, L, hidden] (the text projections; no RoPE)."""
        b = p.shape[0]
        if hasattr(self, "qkv_proj"):
            _, k, v = self.qkv_proj(p).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        else:
            k, v = routed(self.k_proj, p, None), routed(self.v_proj, p, None)
        k, v = (t.view(b, -1, self.nkv, self.hd).transpose(1, 2) for t in (k, v))
        return k, v

    def _adapter(self, q_BHTD: torch.Tensor) -> torch.Tensor:
        """Gated attention of every query over the adaptation prompt (no RoPE, no mask)."""
        b = q_BHTD.shape[0]
        k, v = self._prompt_kv(self.adapter_prompt.to(q_BHTD.dtype)[None])
        o = attend(q_BHTD, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
        return o * self.adapter_gate.to(o.dtype)[None, :, None, None]

    def _visual_adapter(self, q_BHTD: torch.Tensor, media: Media) -> torch.Tensor:
        """Gated attention over the visual prompts: the prompt plus the features of image k
        (``media.latents`` [B, M, n, hidden]; token by token when n is the prompt's length, else
        their mean added to every prompt row) for a token whose ``media.time`` is k; zero for tokens
        before any image. The prompts' keys and values are kept in ``media.kv`` during generation."""
        lat = media.latents
        m, n, plen = lat.shape[1], lat.shape[2], self.adapter_prompt_visual.shape[0]
        key = ("adapter", self.layer_idx)
        if media.kv is not None and key in media.kv:
            k, v = media.kv[key]
        else:
            feat = lat.to(q_BHTD.dtype)
            if n != plen:
                feat = feat.mean(2, keepdim=True)  # one global feature per image (V1's multimodal prompt)
            k, v = self._prompt_kv((self.adapter_prompt_visual.to(q_BHTD.dtype) + feat).flatten(1, 2))
            if media.kv is not None:
                media.kv[key] = (k, v)
        time = media.time[:, None, :, None]  # [B, 1, T, 1]
        key_time = torch.arange(1, m + 1, device=time.device).repeat_interleave(plen)
        keep = time > 0
        o = attend(q_BHTD, k, v, (time == key_time) | ~keep)  # rows without an image: any (then zeroed)
        o = torch.where(keep, o, 0.0)
        return o * self.adapter_gate_visual.to(o.dtype)[None, :, None, None]

    def forward(self, x, img, cos, sin, mask, cache: KVCache | None, start: int, media: Media | None = None,
                rows: Rows | None = None):  # fmt: skip
        """``rows``: queries at those positions alone (keys and values at every position); the
        output is [B, K, hidden] for ``rows``' K positions a row, and ``mask`` is theirs (``Rows.masks``)."""
        b, t, _ = x.shape
        xq, iq = (x, img) if rows is None else (rows.take(x), rows.take(img))
        if hasattr(self, "qkv_proj"):
            qkv = routed(self.qkv_proj, x, img)
            q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
            q = q if rows is None else rows.take(q)
        else:
            q = routed(self.q_proj, xq, iq)
            k = routed(self.k_proj, x, img)
            v = routed(self.v_proj, x, img)
        tq = q.shape[1]
        q = q.view(b, tq, self.nh, self.hd).transpose(1, 2)
        k = k.view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = v.view(b, t, self.nkv, self.hd).transpose(1, 2)
        if cos is not None:  # RoPE (learned absolute positions were added to the input instead)
            cq, sq = (cos, sin) if rows is None else (rows.take(cos), rows.take(sin))
            q = apply_rotary(q, cq.unsqueeze(1), sq.unsqueeze(1))  # broadcast over heads
            k = apply_rotary(k, cos.unsqueeze(1), sin.unsqueeze(1))
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v, start)
        m = mask["sliding" if self.sliding else "full"]
        o = attend(q, k, v, m, causal=t > 1 and rows is None)
        if self.adapter_prompt is not None:
            o = o + self._adapter(q)
        if self.adapter_prompt_visual is not None and media is not None:
            o = o + self._visual_adapter(q, media)
        return routed(self.o_proj, o.transpose(1, 2).reshape(b, tq, self.nh * self.hd), iq)


class MLP(nn.Module):
    """``gated``: down(act(gate x) * up x) (Llama); ``plain``: down(act(up x)) (OPT's fc1 / fc2)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        if cfg.mlp == "gated":
            self.gate_proj = ALinear(h, i, bias=cfg.mlp_bias)
        elif cfg.mlp != "plain":
            raise ValueError(f"unknown mlp {cfg.mlp!r}; known: gated, plain")
        self.up_proj = ALinear(h, i, bias=cfg.mlp_bias)
        self.down_proj = ALinear(i, h, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x, img):
        if hasattr(self, "gate_up_proj"):  # fused for inference (``fuse_projections``)
            h = gated_mlp(*routed(self.gate_up_proj, x, img).chunk(2, -1), self.act)
        elif hasattr(self, "gate_proj"):
            h = gated_mlp(routed(self.gate_proj, x, img), routed(self.up_proj, x, img), self.act)
        else:
            h = self.act(routed(self.up_proj, x, img))
        return routed(self.down_proj, h, img)


def make_norm(cfg: LLMConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    if cfg.norm == "layer":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    raise ValueError(f"unknown norm {cfg.norm!r}; known: rms, layer")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.gated_cross_attn = None  # Flamingo: a GatedCrossAttentionBlock run before this layer

    def forward(
        self, x, img, cos, sin, mask, cache, start, media: Media | None = None, rows: Rows | None = None
    ):
        """``rows``: the layer's output at those positions alone, [B, K, hidden] (``Rows``)."""
        if self.gated_cross_attn is not None:
            x = self.gated_cross_attn(x, media)
        h = routed(self.input_layernorm, x, img)
        a = self.self_attn(h, img, cos, sin, mask, cache, start, media, rows)
        if rows is not None:
            x, img = rows.take(x), rows.take(img)
        x = x + a
        h = routed(self.post_attention_layernorm, x, img)
        return x + self.mlp(h, img)


class LLM(nn.Module):
    """The decoder. ``forward`` returns logits [B, T, V] (or hidden states)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.position == "learned":
            self.embed_positions = nn.Embedding(
                cfg.max_position_embeddings + cfg.position_offset, cfg.hidden_size
            )
        elif cfg.position != "rope":
            raise ValueError(f"unknown position {cfg.position!r}; known: rope, learned")
        if cfg.adapter is not None and not 0 <= cfg.adapter.visual_layers <= cfg.num_layers:
            raise ValueError(
                f"adapter.visual_layers must be in 0..{cfg.num_layers}, got {cfg.adapter.visual_layers}"
            )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = Rotary(cfg)
        self.gradient_checkpointing = False
        if cfg.mam:
            apply_mam(self)
        if cfg.plora is not None:
            p = cfg.plora
            apply_plora(self, p.rank, p.alpha, p.dropout, p.targets)
        if cfg.lora is not None:
            lo = cfg.lora
            apply_lora(self, lo.rank, lo.alpha, lo.dropout, lo.targets)
        if cfg.adapter is not None and cfg.adapter.bias_tuning:
            apply_bias_tuning(self)
        if cfg.cross_attention is not None:
            apply_cross_attention(self, cfg.cross_attention)

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(self.cfg, batch, max_len, dtype or w.dtype, device or w.device)

    def _masks(self, attention_mask, b, t, start, device, seq_ids=None):
        """Boolean masks [B, 1, T, S] (True = attend), or None where plain causal suffices.
        ``seq_ids`` [B, T] (packed rows): a query attends to keys of its own sample only."""
        s = start + t
        windowed = self.cfg.sliding_window is not None and any(
            layer.self_attn.sliding for layer in self.layers
        )
        if attention_mask is None and seq_ids is None and not windowed and (start == 0 or t == 1):
            return {"full": None, "sliding": None}
        q_pos = torch.arange(start, s, device=device)[:, None]
        k_pos = torch.arange(s, device=device)[None, :]
        causal = k_pos <= q_pos  # [T, S]
        full = causal[None, None].expand(b, 1, t, s)
        if attention_mask is not None:
            if attention_mask.shape != (b, s):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, s)} "
                    f"(cached {start} + new {t} positions)"
                )
            full = full & attention_mask[:, None, None, :].bool()
        if seq_ids is not None:  # block-diagonal: causal within each sample, padding (0) unseen
            same = seq_ids[:, None, :, None] == seq_ids[:, None, None, :]
            full = full & same & (seq_ids > 0)[:, None, None, :]
        # a query row with nothing to attend to (left padding) attends to itself: no NaNs
        diag = (k_pos == q_pos)[None, None]
        masks = {"full": full | diag}
        masks["sliding"] = masks["full"]  # layers typed "sliding" without a window attend as full ones
        if windowed:
            w = self.cfg.sliding_window
            masks["sliding"] = (full & (q_pos - k_pos < w)[None, None]) | diag
        return masks

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        logits_to_keep: int = 0,
        seq_ids: torch.Tensor | None = None,
        media: Media | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] or inputs_embeds [B, T, D]; modality_ids [B, T] (0 text / 1 image);
        attention_mask [B, cached + T] (1 = real token). Returns logits [B, T, V].
        ``seq_ids`` [B, T] instead of ``attention_mask`` for packed rows (training, no cache): each
        token's sample in its row (1, 2, ...; 0 padding); attention stays within a sample and
        positions restart at each (``data/collate.py``'s ``collate_packed``).
        ``media``: the visual latents and each token's image for the cross-attention blocks
        (``models/xattn.py``); a cache keeps the prompt's, which later steps read.
        ``keep`` [B, T] (bool; no cache): the outputs at those positions alone, [N, D | V] in
        row-major order (``out[keep]`` of the whole output): training's loss reads the positions
        before supervised tokens only, so the last layer computes its queries, attention output
        and MLP for those rows alone (keys and values for all), equal to the whole computation up
        to float rounding."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if keep is not None and (cache is not None or logits_to_keep):
            raise ValueError(
                "keep (some positions' outputs) is for a forward without cache or logits_to_keep"
            )
        if seq_ids is not None and (attention_mask is not None or cache is not None):
            raise ValueError("seq_ids (packed rows) take the place of attention_mask and need no cache")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = (
                positions_from_mask(attention_mask, start, t, x.device)
                if seq_ids is None
                else positions_from_seq_ids(seq_ids)
            )
        if position_ids.shape[0] != b:
            position_ids = position_ids.expand(b, -1)
        img = None if modality_ids is None else modality_ids == 1
        if self.cfg.position == "learned":
            x = x + self.embed_positions(position_ids + self.cfg.position_offset).to(x.dtype)
            cos = sin = None
        else:
            cos, sin = self.rotary(position_ids, x.dtype)
        masks = self._masks(attention_mask, b, t, start, x.device, seq_ids)
        if cache is not None and media is not None:  # a prompt with images: its media stay cached
            if media.kv is None:
                media.kv = {}  # the blocks' projected keys and values, kept for the decode steps
            cache.media = media.for_cache()
        elif cache is not None and start > 0 and cache.media is not None:
            media = cache.media.step(b, t)  # new tokens follow the prompt's last image
        rows = None if keep is None or not self._rows_apply() else Rows.of(keep)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            r, m = (rows, rows.masks(masks, t)) if rows is not None and i == n - 1 else (None, masks)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, img, cos, sin, m, None, 0, media, r, use_reentrant=False
                )
            else:
                x = layer(x, img, cos, sin, m, cache, start, media, r)
        if rows is not None:
            x = x[rows.valid]
        elif keep is not None:
            x = x[keep]
        if cache is not None:
            cache.length = start + t
            if start == 0:
                cache.prefill_length = cache.length
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return x if return_hidden else self.lm_head(x)

    def _rows_apply(self) -> bool:
        """Whether the last layer can compute some positions alone: not under ``torch.compile``
        (the row count is data), nor with LLaMA-Adapter V2's visual prompts (read per position)."""
        last = self.layers[-1].self_attn if len(self.layers) else None
        return last is not None and last.adapter_prompt_visual is None and not torch.compiler.is_compiling()

    def mean_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The last hidden states averaged over each row's real tokens (every token without a
        mask): a text's embedding [B, D]."""
        h = self(input_ids=input_ids, attention_mask=attention_mask, return_hidden=True)
        if attention_mask is None:
            return h.mean(1)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)
