"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, InternLM2) with a preallocated KV cache.

Pure PyTorch. Names follow transformers' Llama (``embed_tokens``, ``layers.N.self_attn.q_proj``,
``mlp.gate_proj``, ``norm``, ``lm_head``). Every layer receives ``img`` [B, T] (True at image
rows, from the splice's modality ids); base layers ignore it, modality-routed parts
(``modalign.models.modality``) use it.

    x = embed(ids) | inputs_embeds
    for layer:  x = x + o(attn(rope(q(n1 x)), rope(k(n1 x)), v(n1 x)))   n1 = input_layernorm
                x = x + down(silu(gate(n2 x)) * up(n2 x))                   n2 = post_attention_layernorm
    logits = lm_head(norm(x))
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from modalign.config import LLMConfig
from modalign.models.modality import ALinear, apply_lora, apply_mam, apply_plora, routed
from modalign.models.vision import activation

log = logging.getLogger("modalign")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x, self.weight, self.eps)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
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


# ------------------------------------------------------------------------------------ layers


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
        if cfg.adapter is not None and layer_idx >= cfg.num_layers - cfg.adapter.num_layers:
            self.add_adapter(cfg.adapter.prompt_len, h)

    def add_adapter(self, prompt_len: int, hidden: int) -> None:
        """LLaMA-Adapter: learnable prompt whose attention output is scaled by a per-head gate
        that starts at zero, so the layer's output is unchanged at initialisation."""
        dev = self.o_proj.weight.device
        self.adapter_prompt = nn.Parameter(torch.randn(prompt_len, hidden, device=dev) * 0.02)
        self.adapter_gate = nn.Parameter(torch.zeros(self.nh, device=dev))

    def _adapter(self, q_BHTD: torch.Tensor) -> torch.Tensor:
        """Gated attention of every query over the adaptation prompt (no RoPE, no mask)."""
        b = q_BHTD.shape[0]
        p = self.adapter_prompt.to(q_BHTD.dtype)[None]
        if hasattr(self, "qkv_proj"):
            _, k, v = self.qkv_proj(p).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        else:
            k, v = routed(self.k_proj, p, None), routed(self.v_proj, p, None)
        k = k.view(1, -1, self.nkv, self.hd).transpose(1, 2).expand(b, -1, -1, -1)
        v = v.view(1, -1, self.nkv, self.hd).transpose(1, 2).expand(b, -1, -1, -1)
        o = F.scaled_dot_product_attention(q_BHTD, k, v, enable_gqa=self.nkv != self.nh)
        return o * self.adapter_gate.to(o.dtype)[None, :, None, None]

    def forward(self, x, img, cos, sin, mask, cache: KVCache | None, start: int):
        b, t, _ = x.shape
        if hasattr(self, "qkv_proj"):
            qkv = routed(self.qkv_proj, x, img)
            q, k, v = qkv.split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        else:
            q = routed(self.q_proj, x, img)
            k = routed(self.k_proj, x, img)
            v = routed(self.v_proj, x, img)
        q = q.view(b, t, self.nh, self.hd).transpose(1, 2)
        k = k.view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = v.view(b, t, self.nkv, self.hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # sin carries the rotate-half signs
        h = self.hd // 2
        q = q * cos + q.roll(h, -1) * sin
        k = k * cos + k.roll(h, -1) * sin
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v, start)
        m = mask["sliding" if self.sliding else "full"]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=m, is_causal=m is None and t > 1, enable_gqa=self.nkv != self.nh
        )
        if self.adapter_prompt is not None:
            o = o + self._adapter(q)
        return routed(self.o_proj, o.transpose(1, 2).reshape(b, t, self.nh * self.hd), img)


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = ALinear(h, i, bias=cfg.mlp_bias)
        self.up_proj = ALinear(h, i, bias=cfg.mlp_bias)
        self.down_proj = ALinear(i, h, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x, img):
        h = self.act(routed(self.gate_proj, x, img)) * routed(self.up_proj, x, img)
        return routed(self.down_proj, h, img)


def dropped_256ths(p: float) -> int:
    """How many of 256 byte values ``byte_dropout`` drops for ``p`` (at most 255)."""
    return min(round(p * 256), 255)


def check_dropout(p: float) -> None:
    """A residual dropout probability: 0, or one that ``byte_dropout`` does not round to none of 256."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"expected a probability in [0, 1), got {p}")
    if p and not dropped_256ths(p):
        raise ValueError(f"{p} rounds to no dropout (on the CPU masks drop whole 256ths of a layer's "
                         "outputs): use 0 or at least 0.002")  # fmt: skip


def byte_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with masks drawn a random byte per element: an element is dropped where its byte is
    below ``round(p * 256)`` (so ``p`` rounds to a multiple of 1/256: 0.1 drops 26 in 256; at most
    255, as ``p`` < 1 never drops everything) and the rest are scaled by 256 / (256 - that). On a CPU,
    drawing 64-bit integers and reading them as bytes costs about a third of ``F.dropout``'s
    Bernoulli draws per element."""
    drop = dropped_256ths(p)
    if not drop:
        return x
    n = x.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=x.device)
    keep = bits.view(torch.uint8)[:n].view(x.shape) >= drop
    return x * keep * (256 / (256 - drop))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = 0.0  # on the attention and MLP outputs, in training mode only (``LLM.set_dropout``)

    def forward(self, x, img, cos, sin, mask, cache, start):
        h = routed(self.input_layernorm, x, img)
        x = x + self._drop(self.self_attn(h, img, cos, sin, mask, cache, start))
        h = routed(self.post_attention_layernorm, x, img)
        return x + self._drop(self.mlp(h, img))

    def _drop(self, branch: torch.Tensor) -> torch.Tensor:
        if not (self.dropout and self.training):
            return branch
        if branch.device.type == "cpu":
            return byte_dropout(branch, self.dropout)
        return F.dropout(branch, self.dropout, True)


class LLM(nn.Module):
    """The decoder. ``forward`` returns logits [B, T, V] (or hidden states)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = Rotary(cfg)
        self.gradient_checkpointing = False
        self._decode_plan = None
        if cfg.mam:
            apply_mam(self)
        if cfg.plora is not None:
            p = cfg.plora
            apply_plora(self, p.rank, p.alpha, p.dropout, p.targets)
        if cfg.lora is not None:
            lo = cfg.lora
            apply_lora(self, lo.rank, lo.alpha, lo.dropout, lo.targets)

    def set_dropout(self, p: float) -> None:
        """Dropout on every layer's attention and MLP outputs while training (0: none). A training
        setting, not part of the config: saved models and inference never see it."""
        try:
            check_dropout(p)
        except ValueError as e:
            raise ValueError(f"dropout: {e}") from None
        for layer in self.layers:
            layer.dropout = float(p)

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(self.cfg, batch, max_len, dtype or w.dtype, device or w.device)

    def _masks(self, attention_mask, b, t, start, device):
        """Boolean masks [B, 1, T, S] (True = attend), or None where plain causal suffices."""
        s = start + t
        windowed = self.cfg.sliding_window is not None and any(
            layer.self_attn.sliding for layer in self.layers
        )
        if attention_mask is None and not windowed and (start == 0 or t == 1):
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
        # a query row with nothing to attend to (left padding) attends to itself: no NaNs
        diag = (k_pos == q_pos)[None, None]
        masks = {"full": full | diag, "sliding": None}
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
    ) -> torch.Tensor:
        """input_ids [B, T] or inputs_embeds [B, T, D]; modality_ids [B, T] (0 text / 1 image);
        attention_mask [B, cached + T] (1 = real token). Returns logits [B, T, V]."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, start, t, x.device)
        if position_ids.shape[0] != b:
            position_ids = position_ids.expand(b, -1)
        img = None if modality_ids is None else modality_ids == 1
        cos, sin = self.rotary(position_ids, x.dtype)
        masks = self._masks(attention_mask, b, t, start, x.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, img, cos, sin, masks, None, 0, use_reentrant=False
                )
            else:
                x = layer(x, img, cos, sin, masks, cache, start)
        if cache is not None:
            cache.length = start + t
            if start == 0:
                cache.prefill_length = cache.length
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return x if return_hidden else self.lm_head(x)


def _d(t):
    """A view without autograd (cheaper dispatch); shares storage, so in-place updates show."""
    return None if t is None else t.detach()


class _DecodePlan:
    """Per-layer tensors for one text decode step. q/k/v and gate/up are concatenated so that a
    step makes two matmuls fewer per block, and weights are kept as [in, out] (``x @ w``): on
    CPU a contiguous transposed copy, whose matrix-vector products run about 20% faster than
    ``F.linear`` on the [out, in] layout; elsewhere a view. ``stale`` notices in-place updates
    (training) and replaced tensors."""

    def __init__(self, llm: LLM):
        def text(m):  # MAM: a decode step is text, so the text copy
            return m.multiway[0] if hasattr(m, "multiway") else m

        def lin(mods):
            w = torch.cat([m.weight for m in mods]) if len(mods) > 1 else mods[0].weight
            bs = [m.bias for m in mods]
            b = None if bs[0] is None else (torch.cat(bs) if len(bs) > 1 else bs[0])
            wt = w.detach().t()
            return wt.contiguous() if wt.device.type == "cpu" else wt, _d(b)

        self.layers = []
        for layer in llm.layers:
            a, mlp = layer.self_attn, layer.mlp
            qkv = [a.qkv_proj] if hasattr(a, "qkv_proj") else [text(a.q_proj), text(a.k_proj), text(a.v_proj)]
            self.layers.append((
                _d(text(layer.input_layernorm).weight), lin(qkv), lin([a.o_proj]),
                _d(text(layer.post_attention_layernorm).weight), lin([mlp.gate_proj, mlp.up_proj]),
                lin([mlp.down_proj]),
            ))  # fmt: skip
        self.embed, self.norm = _d(llm.embed_tokens.weight), _d(llm.norm.weight)
        self.head = lin([llm.lm_head])[0]
        self.sources = list(llm.parameters())  # a replaced or updated tensor makes the plan stale
        self.versions = self._versions()

    def _versions(self):
        return [(p.data_ptr(), p._version) for p in self.sources]

    def stale(self) -> bool:
        return self._versions() != self.versions


def fast_decode_ok(llm: LLM, cache: KVCache) -> bool:
    """The raw-tensor decode step covers base layers, MAM (text copy) and Partial LoRA (off
    for text); LoRA (unmerged), adapters, non-SiLU MLPs and active sliding windows take the
    module path."""
    c = llm.cfg
    if c.hidden_act != "silu" or c.adapter is not None or llm.training:
        return False
    if c.lora is not None and any(
        isinstance(m, ALinear) and m.lora_A is not None and not m.lora_merged for m in llm.modules()
    ):
        return False
    if c.sliding_window is not None and cache.length + 1 > c.sliding_window:
        return False
    return True


def _sdpa(q, k, v, mask, gqa):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _attend_one(q, k, v, mask, gqa):
    """Attention of one query per row written out (q [B, H, 1, D], k/v [B, Hkv, S, D], mask
    [B, 1, 1, S]): under ``torch.compile`` this fuses into a few loops, where the SDPA kernel
    costs more than the work for a single query."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, h // hkv, d)  # query heads grouped by their key/value head
    scores = (qg @ k.transpose(-1, -2)) * (d**-0.5)  # [B, Hkv, G, S]
    scores = scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf"))
    return (scores.softmax(-1) @ v).view(b, h, 1, d)


def _lin(x, wt, b=None):
    y = x @ wt
    return y if b is None else y + b


def _decode_layers(plan, cfg, x, cos, sin, mask, write, attend=_sdpa):
    """The decoder blocks for one text token per row; ``write(i, k, v)`` stores the new keys
    and values of layer ``i`` and returns the keys/values to attend over."""
    b, eps, nh, nkv, hd = x.shape[0], cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cfg.dim_head
    gqa, h2, inter = nkv != nh, hd // 2, cfg.intermediate_size
    for i, (w_in, qkv, o, w_post, gu, d) in enumerate(plan.layers):
        h = _rms(x, w_in, eps)
        heads = _lin(h, *qkv).view(b, nh + 2 * nkv, hd)  # [q heads, k heads, v heads]
        qk = heads[:, : nh + nkv]
        qk = qk * cos + qk.roll(h2, -1) * sin  # RoPE on q and k at once
        k, v = write(i, qk[:, nh:, None], heads[:, nh + nkv :, None])
        a = attend(qk[:, :nh, None], k, v, mask, gqa)
        x = x + _lin(a.reshape(b, 1, nh * hd), *o)
        gate, up = _lin(_rms(x, w_post, eps), *gu).split(inter, -1)
        x = x + _lin(F.silu(gate) * up, *d)
    return _lin(_rms(x[:, -1], plan.norm, eps), plan.head)


def _plan(llm: LLM, cache: KVCache) -> _DecodePlan:
    plan = getattr(llm, "_decode_plan", None)
    if plan is None or (cache.length == cache.prefill_length and plan.stale()):  # checked once per generation
        plan = llm._decode_plan = _DecodePlan(llm)
    return plan


@torch.no_grad()
def decode_step(
    llm: LLM, ids: torch.Tensor, cache: KVCache, position_ids=None, attention_mask=None
) -> torch.Tensor:
    """One text token per row ([B, 1]) through the cached decoder -> last logits [B, V]."""
    plan = _plan(llm, cache)
    x = F.embedding(ids, plan.embed)
    start = cache.length
    if position_ids is None:
        position_ids = torch.full((ids.shape[0], 1), start, dtype=torch.long, device=ids.device)
    cos, sin = llm.rotary(position_ids, x.dtype)  # [B, 1, hd]: broadcast over heads
    mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
    logits = _decode_layers(plan, llm.cfg, x, cos, sin, mask, lambda i, k, v: cache.write(i, k, v, start))
    cache.length = start + 1
    return logits


def _static_step(plan, cfg, rotary, ids, pos, valid, ks, vs, idx):
    """Decode step over the whole preallocated cache (static shapes, for ``torch.compile``):
    new keys/values are written at ``idx``; ``valid`` [B, max_len] says which slots to attend."""

    def write(i, k, v):
        ks[i].index_copy_(2, idx, k)
        vs[i].index_copy_(2, idx, v)
        return ks[i], vs[i]

    x = F.embedding(ids, plan.embed)
    cos, sin = rotary(pos, x.dtype)
    return _decode_layers(plan, cfg, x, cos, sin, valid[:, None, None, :], write, _attend_one)


class CompiledDecoder:
    """``decode_step`` compiled with ``torch.compile`` (inductor): the per-op dispatch of a
    step becomes a few fused kernels. Shapes are static, one compiled graph per (batch, cache
    length); callers round the cache length up (``round_cache_len``) so graphs are reused.
    Attention runs over every cache slot with a validity mask, which gives the same result as
    attending over the filled prefix. If compiling fails (e.g. no C++ compiler), it logs why
    once and the caller falls back to the eager step."""

    def __init__(self, max_graphs: int = 32):
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, max_graphs)
        self.fn = torch.compile(_static_step, dynamic=False, fullgraph=True)
        self.failed: str | None = None
        self.shapes: set[tuple[int, int]] = set()  # (batch, cache length) of the graphs compiled

    @staticmethod
    def round_cache_len(n: int, multiple: int = 128) -> int:
        return -(-n // multiple) * multiple

    @torch.no_grad()
    def step(self, llm: LLM, ids: torch.Tensor, cache: KVCache, position_ids: torch.Tensor,
             valid: torch.Tensor) -> torch.Tensor | None:  # fmt: skip
        """One step; ``valid`` must already mark this step's slot. None if compiling failed."""
        if self.failed is not None:
            return None
        plan = _plan(llm, cache)
        start = cache.length
        if start >= cache.max_len:
            raise ValueError(f"KV cache full: need {start + 1} positions, allocated {cache.max_len}")
        idx = torch.tensor([start], device=ids.device)
        try:
            logits = self.fn(plan, llm.cfg, llm.rotary, ids, position_ids, valid, cache.k, cache.v, idx)
        except Exception as e:  # noqa: BLE001 - any backend failure means: use the eager step
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("compiled decoding is unavailable (%s); using the eager decode step", self.failed)
            return None
        cache.length = start + 1
        self.shapes.add((ids.shape[0], cache.max_len))
        return logits


def positions_from_mask(attention_mask, start: int, t: int, device) -> torch.Tensor:
    """Positions [B|1, T]: cumulative count of real tokens (left padding aware), else arange."""
    if attention_mask is None:
        return torch.arange(start, start + t, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, start : start + t]
