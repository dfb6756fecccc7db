"""Connectors: image features -> LLM-sized visual tokens, behind one registry.

Contract for every connector::

    forward(features [N, L_in, D_vis]) -> tokens [N, L_out, D_llm]
    num_output_tokens(L_in) -> L_out

Registered types: ``linear``, ``mlpNx_gelu`` (any N; LLaVA-1.5 is ``mlp2x_gelu``),
``abstractor`` (mPLUG-Owl / mPLUG-Owl2 visual abstractor), ``resampler`` (Flamingo perceiver
resampler). ``qformer`` (BLIP-2) registers itself from ``modalign.models.qformer``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modalign.config import ConnectorConfig
from modalign.models.layers import activation

_REGISTRY: dict[str, Callable[[ConnectorConfig, int, int, int], nn.Module]] = {}
_MLP_RE = re.compile(r"^mlp(\d+)x_(\w+)$")


def register(name: str):
    def deco(builder):
        _REGISTRY[name] = builder
        return builder

    return deco


def connector_types() -> list[str]:
    return sorted(_REGISTRY) + ["mlpNx_gelu"]


def build_connector(cfg: ConnectorConfig, d_vis: int, d_llm: int, num_features: int) -> nn.Module:
    """Build the connector named by ``cfg.type`` for ``num_features`` input tokens per image."""
    m = _MLP_RE.match(cfg.type)
    if m:
        return MLPProjector(d_vis, d_llm, depth=int(m.group(1)), act=m.group(2), bias=cfg.bias)
    if cfg.type not in _REGISTRY and cfg.type == "qformer":
        import modalign.models.qformer  # noqa: F401  (registers itself)
    if cfg.type not in _REGISTRY:
        raise ValueError(f"unknown connector type {cfg.type!r}; known: {', '.join(connector_types())}")
    return _REGISTRY[cfg.type](cfg, d_vis, d_llm, num_features)


class MLPProjector(nn.Module):
    """``linear_1 -> act -> linear_2 -> ... -> linear_N`` (LLaVA's ``mlpNx_gelu``; N=1 is linear)."""

    def __init__(self, d_vis: int, d_llm: int, depth: int = 2, act: str = "gelu", bias: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError("mlpNx projector needs N >= 1")
        self.depth = depth
        self.act = activation(act)
        for i in range(depth):
            setattr(self, f"linear_{i + 1}", nn.Linear(d_vis if i == 0 else d_llm, d_llm, bias=bias))

    def forward(self, x_NLD: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            if i:
                x_NLD = self.act(x_NLD)
            x_NLD = getattr(self, f"linear_{i + 1}")(x_NLD)
        return x_NLD

    def num_output_tokens(self, num_in: int) -> int:
        return num_in


@register("linear")
def _linear(cfg, d_vis, d_llm, n):
    return MLPProjector(d_vis, d_llm, depth=1, bias=cfg.bias)


# ---------------------------------------------------------------------------------------------
# mPLUG-Owl visual abstractor
#
#   queries q [N,Q,C]       image x [N,L,C]
#        |  norm1              |  normk
#        qn ---------------- concat(qn, xn) --(+pos)--> key ; --> value
#        |(+pos) query           |
#        +-------- attention over Q+L keys --> out_proj --> r = qn + .
#        r + w2(ffn_ln(silu(w1(norm2 r)) * w3(norm2 r)))  -> next layer
#   after all layers: visual_fc -> [N,Q,D_llm], append vit_eos -> [N,Q+1,D_llm]


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE-style table: sines of all frequencies, then cosines (not interleaved)."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int, cls_token: bool) -> np.ndarray:
    """[grid*grid (+1), dim]: column coordinate in the first half, row in the second."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb


def patch_grid(num_features: int) -> tuple[int, int] | None:
    """(side, 1 if a CLS feature leads else 0) of a square patch grid; None if not square."""
    side = math.isqrt(num_features)
    cls = int(side * side != num_features)
    side = math.isqrt(num_features - cls)
    return (side, cls) if side * side + cls == num_features else None


def locality_prior(num_queries: int, num_features: int, strength: float) -> torch.Tensor:
    """[Q, L] attention bias: ``strength * exp(-d^2 / 2)``, d the distance in patch widths from a
    query's centre (the Q queries laid row-major on a square grid spread over the square patch
    grid) to a patch's; 0 over a leading CLS feature."""
    gq = math.isqrt(num_queries)
    grid = patch_grid(num_features)
    if gq * gq != num_queries or grid is None:
        raise ValueError(
            f"abstractor locality needs a square number of queries and a square patch grid, got "
            f"{num_queries} queries and {num_features} features"
        )
    gp, cls = grid
    centre = (torch.arange(gq, dtype=torch.float64) + 0.5) * gp / gq - 0.5  # query centres, patch units
    qy, qx = torch.meshgrid(centre, centre, indexing="ij")
    py, px = torch.meshgrid(*(torch.arange(gp, dtype=torch.float64),) * 2, indexing="ij")
    d2 = (qy.reshape(-1, 1) - py.reshape(1, -1)) ** 2 + (qx.reshape(-1, 1) - px.reshape(1, -1)) ** 2
    prior = strength * torch.exp(-d2 / 2)
    return torch.cat([prior.new_zeros(num_queries, cls), prior], dim=1).float()


class AbstractorAttention(nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(c, c)
        self.key = nn.Linear(c, c)
        self.value = nn.Linear(c, c)

    def forward(self, q_in, kv_in, k_pos=None, q_pos=None, bias=None):
        n, lq, c = q_in.shape
        h = self.heads

        def split(t):
            return t.view(n, -1, h, c // h).transpose(1, 2)

        q = self.query(q_in if q_pos is None else q_in + q_pos)
        k = self.key(kv_in if k_pos is None else kv_in + k_pos)
        v = self.value(kv_in)
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
        return o.transpose(1, 2).reshape(n, lq, c)


class AbstractorMLP(nn.Module):
    def __init__(self, c: int, inner: int, eps: float):
        super().__init__()
        self.w1 = nn.Linear(c, inner)
        self.w3 = nn.Linear(c, inner)
        self.ffn_ln = nn.LayerNorm(inner, eps=eps)
        self.w2 = nn.Linear(inner, c)

    def forward(self, x):
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class AbstractorOutput(nn.Module):
    def __init__(self, c: int, inner: int, eps: float):
        super().__init__()
        self.out_proj = nn.Linear(c, c)
        self.norm2 = nn.LayerNorm(c)  # eps 1e-5, as the reference code builds it
        self.mlp = AbstractorMLP(c, inner, eps)


class AbstractorCrossAttention(nn.Module):
    def __init__(self, c: int, heads: int, inner: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(c)
        self.normk = nn.LayerNorm(c)
        self.attention = AbstractorAttention(c, heads)
        self.output = AbstractorOutput(c, inner, eps)

    def forward(self, q, x, q_pos=None, k_pos=None, bias=None):
        qn, xn = self.norm1(q), self.normk(x)
        kv = torch.cat([qn, xn], dim=1)
        kpos = None if k_pos is None else torch.cat([q_pos, k_pos], dim=0).to(kv.dtype)
        attn = self.attention(
            qn, kv, k_pos=kpos, q_pos=None if q_pos is None else q_pos.to(kv.dtype), bias=bias
        )
        r = qn + self.output.out_proj(attn)
        return r + self.output.mlp(self.output.norm2(r))


class AbstractorLayer(nn.Module):
    def __init__(self, c, heads, inner, eps):
        super().__init__()
        self.crossattention = AbstractorCrossAttention(c, heads, inner, eps)


class AbstractorEncoder(nn.Module):
    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        c = cfg.hidden_size
        self.layers = nn.ModuleList(
            AbstractorLayer(c, cfg.num_heads, cfg.intermediate_size, cfg.layer_norm_eps)
            for _ in range(cfg.num_layers)
        )


class VisualAbstractor(nn.Module):
    """mPLUG-Owl(2) visual abstractor. Input width must equal ``cfg.hidden_size``."""

    def __init__(self, cfg: ConnectorConfig, d_vis: int, d_llm: int, num_features: int):
        super().__init__()
        if d_vis != cfg.hidden_size:
            raise ValueError(
                f"abstractor hidden_size {cfg.hidden_size} must equal the vision feature width {d_vis}"
            )
        self.cfg = cfg
        c = cfg.hidden_size
        # distinct random queries (identical ones would stay identical: the same gradient reaches each)
        self.query_embeds = nn.Parameter(torch.randn(1, cfg.num_queries, c) * 0.02)
        self.encoder = AbstractorEncoder(cfg)
        self.visual_fc = nn.Linear(c, d_llm)
        if cfg.eos_token:
            self.vit_eos = nn.Parameter(torch.randn(1, 1, d_llm) * 0.02)
        if not cfg.pos_embed:
            self.q_pos_embed = self.k_pos_embed = None
        else:
            grid = patch_grid(num_features)
            if grid is None:
                raise ValueError(f"abstractor pos_embed needs a square patch grid, got {num_features}")
            self.grid, self.has_cls = grid[0], bool(grid[1])
            self.register_buffer("q_pos_embed", torch.empty(cfg.num_queries, c), persistent=False)
            self.register_buffer("k_pos_embed", torch.empty(num_features, c), persistent=False)
            self.reset_buffers()
        self.locality_bias = None
        if cfg.locality:
            self.locality_bias = nn.Parameter(locality_prior(cfg.num_queries, num_features, cfg.locality))

    def _bias(self, dtype) -> torch.Tensor | None:
        """[Q, Q + L] additive attention bias (0 over the queries' own keys), or None."""
        if self.locality_bias is None:
            return None
        b = self.locality_bias.to(dtype)
        return torch.cat([b.new_zeros(b.shape[0], b.shape[0]), b], dim=1)

    def reset_buffers(self) -> None:
        """(Re)compute the fixed sin-cos tables (after building on the meta device)."""
        if self.q_pos_embed is None:
            return
        c, dev = self.cfg.hidden_size, self.q_pos_embed.device
        q = torch.from_numpy(sincos_1d(c, np.arange(self.cfg.num_queries))).float()
        k = torch.from_numpy(sincos_2d(c, self.grid, self.has_cls)).float()
        self.q_pos_embed = q.to(dev)
        self.k_pos_embed = k.to(dev)

    def forward(self, x_NLC: torch.Tensor) -> torch.Tensor:
        q = self.query_embeds.expand(x_NLC.shape[0], -1, -1).to(x_NLC.dtype)
        bias = self._bias(x_NLC.dtype)
        for layer in self.encoder.layers:
            q = layer.crossattention(q, x_NLC, self.q_pos_embed, self.k_pos_embed, bias)
        out = self.visual_fc(q)
        if self.cfg.eos_token:
            out = torch.cat([out, self.vit_eos.expand(out.shape[0], -1, -1).to(out.dtype)], dim=1)
        return out

    def num_output_tokens(self, num_in: int) -> int:
        return self.cfg.num_queries + int(self.cfg.eos_token)


@register("abstractor")
def _abstractor(cfg, d_vis, d_llm, n):
    return VisualAbstractor(cfg, d_vis, d_llm, n)


# ---------------------------------------------------------------------------------------------
# Flamingo perceiver resampler: latents attend over concat(features, latents).


class PerceiverLayer(nn.Module):
    def __init__(self, c: int, heads: int, inner: int, eps: float, head_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim or c // heads
        a = heads * self.head_dim  # attention width (OpenFlamingo: 8 heads x 64, whatever c is)
        self.norm_media = nn.LayerNorm(c, eps=eps)
        self.norm_latents = nn.LayerNorm(c, eps=eps)
        self.to_q = nn.Linear(c, a, bias=False)
        self.to_kv = nn.Linear(c, 2 * a, bias=False)
        self.to_out = nn.Linear(a, c, bias=False)
        self.ff_norm = nn.LayerNorm(c, eps=eps)
        self.ff_in = nn.Linear(c, inner, bias=False)
        self.ff_out = nn.Linear(inner, c, bias=False)

    def forward(self, x, lat):
        n, lq, _ = lat.shape
        h, d = self.heads, self.head_dim
        xm, lm = self.norm_media(x), self.norm_latents(lat)
        kv = self.to_kv(torch.cat([xm, lm], dim=1)).view(n, -1, 2, h, d)
        k, v = kv.unbind(2)
        q = self.to_q(lm).view(n, lq, h, d)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        lat = lat + self.to_out(o.transpose(1, 2).reshape(n, lq, h * d))
        return lat + self.ff_out(F.gelu(self.ff_in(self.ff_norm(lat))))


class PerceiverResampler(nn.Module):
    """Flamingo's perceiver resampler: ``num_queries`` learned latents attend over
    concat(image features, latents), then a GELU feed-forward, per layer; a final LayerNorm, then
    (``output_proj``) a Linear to the LLM's width. One frame per image (no time embeddings, as
    OpenFlamingo builds it); ``pos`` is a learned per-feature table that starts at zero."""

    def __init__(self, cfg: ConnectorConfig, d_vis: int, d_llm: int, num_features: int):
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        if not cfg.output_proj and d_llm != c:
            raise ValueError(
                f"resampler without output_proj gives {c}-wide latents (hidden_size) but {d_llm} are needed"
            )
        self.input_proj = nn.Linear(d_vis, c) if d_vis != c else nn.Identity()
        self.latents = nn.Parameter(torch.randn(cfg.num_queries, c) * 0.02)
        self.pos = nn.Parameter(torch.zeros(num_features, c))
        self.layers = nn.ModuleList(
            PerceiverLayer(c, cfg.num_heads, cfg.intermediate_size, cfg.layer_norm_eps, cfg.head_dim)
            for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(c, d_llm) if cfg.output_proj else nn.Identity()

    def forward(self, x_NLD: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x_NLD) + self.pos.to(x_NLD.dtype)
        lat = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            lat = layer(x, lat)
        return self.proj(self.norm(lat))

    def num_output_tokens(self, num_in: int) -> int:
        return self.cfg.num_queries


@register("resampler")
def _resampler(cfg, d_vis, d_llm, n):
    return PerceiverResampler(cfg, d_vis, d_llm, n)
