"""Building blocks shared by the vision tower, the connectors, the Q-Former and the decoder:
activations, RMSNorm, rotary position embeddings, and the decoder layer's maths as functions
(``rms_norm``, ``apply_rotary``, ``gated_mlp``, ``attend``) that both the module forward
(``models/decoder.py``) and the fast decode step (``infer/fast_decode.py``) call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modalign.config import LLMConfig


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu_new":  # the same curve written out, as transformers' NewGELUActivation computes it
        return lambda x: (
            0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
        )
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}; known: quick_gelu, gelu, gelu_pytorch_tanh, silu")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one kernel; same maths as below in fp32
        return F.rms_norm(x, w.shape, w, eps)
    # fp32 inside, weight applied after casting back (as the reference implementations do)
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# ------------------------------------------------------------------------------------ RoPE


def rope_params(cfg: LLMConfig) -> tuple[str, dict]:
    rs = dict(cfg.rope_scaling or {})
    kind = rs.get("rope_type", rs.get("type", "default")) or "default"
    return kind, rs


class Rotary(nn.Module):
    """Rotate-half RoPE with linear / dynamic (NTK) / llama3 scaling, computed from positions."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.dim = cfg.dim_head
        self.base = cfg.rope_theta
        self.kind, rs = rope_params(cfg)
        if self.kind not in ("default", "linear", "dynamic", "llama3"):
            raise ValueError(
                f"rope_scaling type {self.kind!r} is not supported; supported: linear, dynamic, llama3"
            )
        self.factor = float(rs.get("factor", 1.0))
        self.max_pos = int(rs.get("original_max_position_embeddings") or cfg.max_position_embeddings)
        if self.kind == "dynamic":
            # transformers uses the config's max_position_embeddings as the threshold
            self.max_pos = cfg.max_position_embeddings
        self.rs = rs
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Compute ``inv_freq``: a plain fp32 tensor, not a buffer, so that ``model.to(bf16)``
        cannot lower its precision; it follows the positions' device in ``forward``."""
        inv = self._inv_freq(self.base)
        if self.kind == "linear":
            inv = inv / self.factor
        elif self.kind == "llama3":
            inv = _llama3_inv_freq(inv, self.rs)
        self.inv_freq = inv

    def _inv_freq(self, base: float) -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids [B, T] -> cos, sin [B, T, head_dim] in ``dtype``."""
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        inv = self.inv_freq
        if self.kind == "dynamic":
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.max_pos:
                f = self.factor
                base = self.base * ((f * seq_len / self.max_pos) - (f - 1)) ** (self.dim / (self.dim - 2))
                inv = self._inv_freq(base).to(inv.device)
        freqs = position_ids[..., None].float() * inv.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        sin = emb.sin()
        # rotate_half(x) * sin == roll(x, d/2) * [-sin_1, sin_2]: one roll instead of chunk/neg/cat
        half = sin.shape[-1] // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return emb.cos().to(dtype), signed.to(dtype)


def _llama3_inv_freq(inv: torch.Tensor, rs: dict) -> torch.Tensor:
    factor = rs["factor"]
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_len = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, out)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the last dimension: ``x * cos + rotate_half(x) * sin`` written as one roll, since
    ``sin`` carries the rotate-half signs (``Rotary.forward``)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def gated_mlp(gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
    """The Llama MLP's inner activation: ``act(gate) * up`` (SwiGLU for ``silu``)."""
    return act(gate) * up


def attend(q, k, v, mask=None, causal: bool = False):
    """Scaled dot-product attention of q [B, H, T, D] over k/v [B, H_kv, S, D] (grouped-query
    attention when H_kv < H); ``mask`` [B, 1, T, S] (True = attend) or None."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=k.shape[1] != q.shape[1]
    )


def positions_from_mask(attention_mask, start: int, t: int, device) -> torch.Tensor:
    """Positions [B|1, T]: cumulative count of real tokens (left padding aware), else arange."""
    if attention_mask is None:
        return torch.arange(start, start + t, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, start : start + t]


def positions_from_seq_ids(seq_ids: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] of packed rows: counted from 0 again wherever ``seq_ids`` [B, T] (the
    sample each token belongs to) changes."""
    idx = torch.arange(seq_ids.shape[1], device=seq_ids.device).expand_as(seq_ids)
    first = torch.ones_like(seq_ids, dtype=torch.bool)
    first[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    return idx - torch.where(first, idx, 0).cummax(-1).values
