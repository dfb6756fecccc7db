"""Flamingo-style gated cross-attention: the decoder reads the images through cross-attention
blocks instead of seeing visual tokens in its sequence (Alayrac et al. 2022; OpenFlamingo).

    input_ids   t t <image> t t t <image> t t          (the image token stays an ordinary token)
    time        0 0    1    1 1 1    2    2 2          (cumulative count of image tokens per row)
    latents     [B, M, n, D_media]                     (the connector's output, M images per row)

    before every ``every``-th decoder layer (``CrossAttentionConfig``):
        x = x + tanh(attn_gate) * to_out(attend(to_q(norm x), to_kv(latents), media mask))
        x = x + tanh(ff_gate)   * ff(x)                 ff = Linear(GELU(Linear(LayerNorm x)))

Media-aware masking: a token whose time is k attends to the latents of image k only (or, with
``only_immediate: false``, of images 1..k); time 0 (text before the first image) attends to
nothing, its cross-attention output is zero. Both gates start at 0, so a model with fresh blocks
computes exactly what its decoder alone does.

During generation the latents stay fixed: the KV cache keeps them (``KVCache.media``) with each
row's last image index, which every new token attends to, and each block's projected keys and
values, computed once per generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modalign.config import CrossAttentionConfig


@dataclass
class Media:
    """What the cross-attention blocks read in one forward: ``latents`` [B, M, n, D] (row b's
    images in order, zero-padded to the row with the most), ``time`` [B, T] (per token, the
    1-based index of the image it follows; 0: none) and ``kv`` (per block, its projected keys
    and values; kept across decode steps, or None to project them anew)."""

    latents: torch.Tensor
    time: torch.Tensor
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    first: torch.Tensor | None = None  # packed rows: [B, T] the first image of the token's sample
    _masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_ids(cls, input_ids: torch.Tensor, image_token_id: int, latents: torch.Tensor,
                 seq_ids: torch.Tensor | None = None) -> Media:  # fmt: skip
        """The latents of the images in ``input_ids`` order ([N_img, n, D], consumed row by row,
        left to right, as the splice consumes them) laid out per row, and each token's image index.
        ``seq_ids`` [B, T] (packed rows): a token sees only the images of its own sample."""
        is_img = input_ids == image_token_id
        time = is_img.long().cumsum(-1)
        first = None
        if seq_ids is not None:  # images before the token's sample: its time counts from there
            starts = torch.ones_like(is_img)
            starts[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
            before = torch.where(starts, time - is_img.long(), 0).cummax(-1).values
            time = torch.where(time > before, time, 0)
            first = before + 1
        b = input_ids.shape[0]
        counts = is_img.sum(-1)
        m = max(int(counts.max()) if b else 0, 1)
        lat = latents.new_zeros(b, m, *latents.shape[1:])
        if len(latents):
            row = torch.repeat_interleave(torch.arange(b, device=counts.device), counts)
            offset = (counts.cumsum(0) - counts)[row]  # index of each row's first image
            slot = torch.arange(len(latents), device=counts.device) - offset
            lat[row.to(lat.device), slot.to(lat.device)] = latents
        return cls(lat, time, first=first)

    def mask(self, only_immediate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Which latents each token attends to, [B, 1, T, M*n] (True = attend), with the rows that
        attend to none opened to all (no NaNs), and those rows, [B, 1, T, 1] (True = keep)."""
        if only_immediate not in self._masks:
            _, m, n = self.latents.shape[:3]
            key_time = torch.arange(1, m + 1, device=self.time.device).repeat_interleave(n)
            t = self.time[:, None, :, None]
            allowed = t == key_time if only_immediate else (t >= key_time)
            if self.first is not None:
                allowed = allowed & (self.first[:, None, :, None] <= key_time)
            keep = allowed.any(-1, keepdim=True)
            self._masks[only_immediate] = (allowed | ~keep, keep)
        return self._masks[only_immediate]

    # ------------------------------------------------------------------ generation

    def for_cache(self) -> Media:
        """What a KV cache keeps after the prompt: the latents, each row's last image index, and a
        store for the blocks' projected keys and values."""
        last = self.time.max(-1, keepdim=True).values if self.time.shape[1] else self.time[:, :1]
        return Media(self.latents, last, {} if self.kv is None else self.kv)

    def step(self, b: int, t: int) -> Media:
        """The media of ``t`` new tokens per row after a cached prompt: every new token follows
        the prompt's last image (new images enter only with a prompt)."""
        return Media(self.latents, self.time[:, -1:].expand(b, t), self.kv)

    def select(self, rows: torch.Tensor) -> Media:
        kv = None if self.kv is None else {i: (k[rows], v[rows]) for i, (k, v) in self.kv.items()}
        return Media(self.latents[rows], self.time[rows], kv)

    @staticmethod
    def concat(a: Media | None, b_a: int, b: Media | None, b_b: int) -> Media | None:
        """Cached media of two batches (``b_a`` and ``b_b`` rows; None: no images) as one batch;
        the projected keys and values are computed anew at the next step."""
        if a is None and b is None:
            return None
        ref = a if a is not None else b

        def fill(x: Media | None, rows: int) -> Media:
            if x is not None:
                return x
            lat = ref.latents.new_zeros(rows, 1, *ref.latents.shape[2:])
            return Media(lat, ref.time.new_zeros(rows, 1))

        a, b = fill(a, b_a), fill(b, b_b)
        m = max(a.latents.shape[1], b.latents.shape[1])

        def pad(lat):
            return F.pad(lat, (0, 0, 0, 0, 0, m - lat.shape[1]))

        return Media(torch.cat([pad(a.latents), pad(b.latents)]), torch.cat([a.time, b.time]), {})


class MaskedCrossAttention(nn.Module):
    """Text rows [B, T, D] attend to the visual latents [B, M*n, D_media] under the media mask."""

    def __init__(self, dim: int, media_dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def keys_values(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, M, n, D_media] -> keys, values [B, H, M*n, head_dim]."""
        b = latents.shape[0]
        kv = self.to_kv(latents.flatten(1, 2)).view(b, -1, 2, self.heads, self.head_dim)
        k, v = kv.unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, media: Media, only_immediate: bool, key: int) -> torch.Tensor:
        b, t, _ = x.shape
        if media.kv is not None and key in media.kv:
            k, v = media.kv[key]
        else:
            k, v = self.keys_values(media.latents.to(x.dtype))
            if media.kv is not None:
                media.kv[key] = (k, v)
        q = self.to_q(self.norm(x)).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        mask, keep = media.mask(only_immediate)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = torch.where(keep, o, 0.0)  # text before any image: nothing to attend to
        return self.to_out(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc_in = nn.Linear(dim, inner, bias=False)
        self.fc_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(self.norm(x))))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated xattn-dense block. ``media`` None (no image in the batch) skips the
    attention (its output would be zero); the gated feed-forward applies to every row."""

    def __init__(self, cfg: CrossAttentionConfig, dim: int, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.only_immediate = cfg.only_immediate
        eps = cfg.layer_norm_eps
        self.attn = MaskedCrossAttention(dim, cfg.media_dim or dim, cfg.num_heads, cfg.head_dim, eps)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, cfg.intermediate_size or 4 * dim, eps)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: Media | None) -> torch.Tensor:
        if media is not None:
            a = self.attn(x, media, self.only_immediate, self.layer_idx)
            x = x + a * self.attn_gate.tanh().to(x.dtype)
        return x + self.ff(x) * self.ff_gate.tanh().to(x.dtype)


def has_cross_attention(layer_idx: int, every: int) -> bool:
    """Whether a block goes before decoder layer ``layer_idx`` (OpenFlamingo's rule)."""
    return (layer_idx + 1) % every == 0


def apply_cross_attention(llm: nn.Module, cfg: CrossAttentionConfig) -> int:
    """Insert a fresh gated block (gates at 0) before every ``cfg.every``-th decoder layer that
    has none; returns how many were added."""
    if cfg.every < 1:
        raise ValueError(f"cross_attention.every must be >= 1, got {cfg.every}")
    w = llm.embed_tokens.weight
    n = 0
    for i, layer in enumerate(llm.layers):
        if has_cross_attention(i, cfg.every) and layer.gated_cross_attn is None:
            block = GatedCrossAttentionBlock(cfg, llm.cfg.hidden_size, i)
            layer.gated_cross_attn = block.to(device=w.device, dtype=w.dtype)
            layer.gated_cross_attn.train(layer.training)
            n += 1
    return n


def enable_cross_attention(model, cfg: CrossAttentionConfig) -> int:
    """Add Flamingo blocks (``CrossAttentionConfig``) to an ``MLLM``'s decoder and switch its
    fusion to cross-attention (recorded in the config, so save/load round-trips)."""
    import dataclasses

    from modalign.models.mllm import _check_fusion, _media_dim

    want = dataclasses.replace(model.config, fusion="cross_attention",
                               llm=dataclasses.replace(model.config.llm, cross_attention=cfg))  # fmt: skip
    _check_fusion(want)
    if model.has_vision:  # the blocks read the connector's output: its width must be theirs
        w = model.llm.embed_tokens.weight
        probe = torch.zeros(1, model.config.vision.num_features, model.config.vision.feature_dim,
                            device=w.device, dtype=w.dtype)  # fmt: skip
        with torch.no_grad():
            got = model.connector(probe).shape[-1]
        if got != _media_dim(want):
            raise ValueError(f"cross_attention reads {_media_dim(want)}-wide media (media_dim or the LLM's width) "
                             f"but the connector gives {got}")  # fmt: skip
    model.config.llm.cross_attention = cfg
    model.config.fusion = "cross_attention"
    return apply_cross_attention(model.llm, cfg)
