"""Modality-routed parts of the decoder: Partial LoRA, LoRA, the Modality-Adaptive Module.

Every decoder linear is an ``ALinear`` (a plain ``nn.Linear`` until an adapter is applied), and
every routed call receives ``img`` — a bool mask [B, T] that is True at image rows, or ``None``
when the input is known to be all text (decode steps, text-only inference)::

    ALinear(x, img):   y = W x + b                                   base
                         + s_lora  * B_l A_l x                         LoRA (every row)
                         + s_plora * B_p A_p x * img[..., None]        Partial LoRA (image rows)
                       y = s_bt * (y + b_bt)                           bias tuning (LLaMA-Adapter V2)

    Multiway(x, img):  where(img, part[1](x), part[0](x))              MAM norms and K/V

Routing is vectorised: both branches are computed for every row and selected with a mask, so
no per-modality Python loop or host sync happens, and every parameter stays in the autograd
graph when a batch has no image rows (DDP/FSDP rely on that). On a CPU, where a host sync costs
nothing, Partial LoRA and the image copies compute the image rows alone (gathered, then put
back). ``img=None`` skips the image branch entirely, which makes a text-only forward
bit-identical to the base model.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


class ALinear(nn.Linear):
    """``nn.Linear`` with optional LoRA (all rows), Partial LoRA (image rows) and bias tuning."""

    quantized = None  # inference: a quantized base (``infer/quant.py``, bias included) in place of ``weight``

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_A: nn.Linear | None = None
        self.plora_A: nn.Linear | None = None
        self.adapter_bias: nn.Parameter | None = None
        self.adapter_scale: nn.Parameter | None = None

    def add_bias_tune(self) -> None:
        """LLaMA-Adapter V2's bias tuning: a learnable bias (0) and scale (1) per output feature,
        ``y = scale * (linear(x) + bias)``, so the layer is unchanged at first."""
        dev, dt = self.weight.device, self.weight.dtype
        self.adapter_bias = nn.Parameter(torch.zeros(self.out_features, device=dev, dtype=dt))
        self.adapter_scale = nn.Parameter(torch.ones(self.out_features, device=dev, dtype=dt))

    @torch.no_grad()
    def merge_bias_tune(self) -> None:
        """Fold the scale into the weight, the base bias, LoRA's and Partial LoRA's B (and the tuned
        bias into the base bias where there is one): the same function, with scale 1 afterwards.
        Exact up to rounding; LoRA may be merged or not (both stay consistent)."""
        if self.adapter_bias is None:
            return
        s = self.adapter_scale
        self.weight.mul_(s[:, None].to(self.weight.dtype))
        if self.bias is not None:
            self.bias.add_(self.adapter_bias.to(self.bias.dtype)).mul_(s.to(self.bias.dtype))
            self.adapter_bias.zero_()
        else:
            self.adapter_bias.mul_(s)
        for kind in ("lora", "plora"):
            if getattr(self, f"{kind}_A") is not None:
                b = getattr(self, f"{kind}_B").weight
                b.mul_(s[:, None].to(b.dtype))
        s.fill_(1.0)

    def add_lora(self, rank: int, alpha: float, dropout: float = 0.0) -> None:
        dev, dt = self.weight.device, self.weight.dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_merged = False
        self.train(self.training)

    def add_plora(self, rank: int, alpha: float, dropout: float = 0.0) -> None:
        dev, dt = self.weight.device, self.weight.dtype
        self.plora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt)
        self.plora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.plora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.plora_B.weight)
        self.plora_scaling = alpha / rank
        self.plora_dropout = nn.Dropout(dropout)
        self.train(self.training)  # new sub-modules follow the layer's train/eval mode

    def lora_delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.lora_scaling

    @torch.no_grad()
    def merge_lora(self) -> None:
        """``W += alpha/r B A``; an adapter held wider than the weight (fp32 on a bf16 base) adds in
        its dtype and the sum is rounded once, as PEFT's (default, unsafe) merge does."""
        if self.lora_A is not None and not self.lora_merged:
            self.weight += self.lora_delta_weight()
            self.lora_merged = True

    @torch.no_grad()
    def unmerge_lora(self) -> None:
        if self.lora_A is not None and self.lora_merged:
            if self.quantized is not None:
                raise ValueError(
                    "this layer was quantized with LoRA merged in; LoRA cannot be taken out again"
                )
            self.weight -= self.lora_delta_weight()  # in the adapter's dtype, as merged
            self.lora_merged = False

    def _lora_adds_nothing(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Whether LoRA's ``B A x`` is exactly zero and needs no gradient: both frozen and ``B`` all
        zeros (as initialised, before its first trained step); plain tensors, run eagerly. ``B`` is
        looked at every call (a count over rank x out elements): writes that leave no trace in its
        version counter (a fused optimiser step, ``.data``) are seen too."""
        if a.requires_grad or b.requires_grad or type(b.data) is not torch.Tensor or b.device.type == "meta":
            return False
        if torch.compiler.is_compiling():
            return False
        return not bool(b.count_nonzero())

    def forward(self, x: torch.Tensor, img: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias) if self.quantized is None else self.quantized(x)
        if self.lora_A is not None and not self.lora_merged:
            a, b = self.lora_A.weight, self.lora_B.weight
            if self._lora_adds_nothing(a, b):  # frozen with B all zero (a curriculum step training others)
                draw_dropout(x, a, self.lora_dropout)  # the same draw: other layers' masks stay as they were
            else:
                y = low_rank_add(y, x, a, b, self.lora_scaling, self.lora_dropout)
        if self.plora_A is not None and img is not None:
            a, b, s, drop = self.plora_A.weight, self.plora_B.weight, self.plora_scaling, self.plora_dropout
            rows = image_rows(x, img)
            if rows is not None:  # the image rows alone
                flat = y.reshape(-1, y.shape[-1])
                delta = low_rank_add(None, x.reshape(-1, x.shape[-1]).index_select(0, rows), a, b, s, drop)
                if delta.dtype == flat.dtype:  # in place where ``y`` is this call's own linear output,
                    add = flat.index_add_ if self.quantized is None else flat.index_add  # read by no backward
                    y = add(0, rows, delta).view(y.shape)
                else:  # an adapter wider than the base (fp32 on bf16): added wide, rounded once
                    y = flat.to(delta.dtype).index_add(0, rows, delta).to(flat.dtype).view(y.shape)
            else:
                delta = low_rank_add(None, x, a, b, s, drop)
                y = (y + delta * img.unsqueeze(-1).to(delta.dtype)).to(y.dtype)
        if self.adapter_bias is not None:
            y = (y + self.adapter_bias.to(y.dtype)) * self.adapter_scale.to(y.dtype)
        return y


def _adapter_input(x: torch.Tensor, a: torch.Tensor, dropout: nn.Dropout, scale: float):
    """``x`` as the adapter ``a`` reads it, with its dropout mask drawn: (input, scale, whether it
    was cast to the adapter's own dtype). On a CPU the mask comes from uniform draws (half the time
    of Bernoulli ones) and its 1 / (1 - p) joins the scale; elsewhere it is the fused dropout
    kernel. The one place the draw is made, so a skipped adapter (``draw_dropout``) draws alike."""
    own = a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type)
    if own:
        x = x.to(a.dtype)
    p = dropout.p if dropout.training else 0.0
    if 0 < p < 1 and x.device.type == "cpu":
        keep = torch.rand(x.shape, device=x.device).ge_(p)  # 1 where kept, 0 where dropped
        x = x * (keep if keep.dtype == x.dtype else keep.to(x.dtype))  # drawn in float32: exact p
        scale = scale / (1.0 - p)
    elif p > 0:
        x = F.dropout(x, p, True)
    return x, scale, own


@torch.no_grad()
def draw_dropout(x: torch.Tensor, a: torch.Tensor, dropout: nn.Dropout) -> None:
    """The random draw ``low_rank_add`` makes for ``x``'s dropout mask (adapter ``a``), without the
    mask's use: an adapter that adds nothing keeps the generator where computing it would leave it."""
    _adapter_input(x, a, dropout, 1.0)


def low_rank_add(y: torch.Tensor | None, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                 dropout: nn.Dropout) -> torch.Tensor:  # fmt: skip
    """``y + scale * B A dropout(x)`` (``y`` None: without it), the sum one ``addmm``; the mask as
    ``_adapter_input`` draws it. An adapter held in a dtype other than the activations' (an fp32
    LoRA on a bf16 base, as PEFT holds one) outside autocast computes in its own dtype, ``x`` cast
    to it, and the sum is rounded once to ``y``'s dtype (PEFT's LoRA ``Linear.forward``)."""
    x, scale, own = _adapter_input(x, a, dropout, scale)
    h = F.linear(x, a)
    if y is None or y.dtype != h.dtype:  # no base to add to, or one of another dtype (autocast, quantized)
        out = F.linear(h, b) * scale
        if y is None:
            return out
        return (y + out).to(y.dtype) if own else y + out
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
    return out.view(y.shape)


def image_rows(x: torch.Tensor, img: torch.Tensor) -> torch.Tensor | None:
    """The flat indices of ``x``'s image rows where computing those rows alone pays: on a CPU, run
    eagerly (finding them is a host sync elsewhere and a graph break under ``torch.compile``), with
    a mask of exactly ``x``'s rows. None where the masked path applies."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or img.shape != x.shape[:-1]:
        return None
    return img.reshape(-1).nonzero().squeeze(1)


class Multiway(nn.Module):
    """One copy of a module per modality (0 text, 1 image); rows pick their modality's copy."""

    def __init__(self, text_module: nn.Module, image_module: nn.Module | None = None):
        super().__init__()
        if image_module is None:
            image_module = copy.deepcopy(text_module)
        self.multiway = nn.ModuleList([text_module, image_module])

    def forward(self, x: torch.Tensor, img: torch.Tensor | None = None) -> torch.Tensor:
        text = _call(self.multiway[0], x, None)
        if img is None:
            return text
        rows = image_rows(x, img)
        if rows is not None:  # the image copy on the image rows alone, as in ``ALinear``
            flat = text.reshape(-1, text.shape[-1])
            xs = x.reshape(-1, x.shape[-1]).index_select(0, rows)
            image = _call(self.multiway[1], xs, torch.ones(len(rows), dtype=torch.bool, device=x.device))
            return flat.index_copy(0, rows, image.to(flat.dtype)).view(text.shape)
        image = _call(self.multiway[1], x, img)
        return torch.where(img.unsqueeze(-1), image, text)


def _call(module: nn.Module, x: torch.Tensor, img: torch.Tensor | None) -> torch.Tensor:
    return module(x, img) if isinstance(module, (ALinear, Multiway)) else module(x)


def routed(module: nn.Module, x: torch.Tensor, img: torch.Tensor | None) -> torch.Tensor:
    """Call a decoder sub-module with the image mask if it is modality-aware."""
    return _call(module, x, img)


def apply_mam(llm: nn.Module) -> None:
    """Turn every decoder layer's norms and K/V projections into per-modality copies.

    The image copies start as exact copies of the text weights, so the converted model's
    outputs equal the original's until the image copies are trained.
    """
    for layer in llm.layers:
        attn = layer.self_attn
        if getattr(attn, "qkv_proj", None) is not None:  # InternLM2: K/V get image copies, Q does not
            split_qkv(attn)
        for name in ("k_proj", "v_proj"):
            if not isinstance(getattr(attn, name), Multiway):
                setattr(attn, name, Multiway(getattr(attn, name)))
        for name in ("input_layernorm", "post_attention_layernorm"):
            if not isinstance(getattr(layer, name), Multiway):
                setattr(layer, name, Multiway(getattr(layer, name)))


def _rows(lin: nn.Linear, start: int, stop: int) -> ALinear:
    """A linear holding output rows [start, stop) of ``lin`` (its LoRA / Partial LoRA too: A is
    shared by the rows, B is cut), so the pieces compute exactly what the whole did."""
    w = lin.weight
    out = ALinear(lin.in_features, stop - start, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w[start:stop])
        if lin.bias is not None:
            out.bias.copy_(lin.bias[start:stop])
    for kind in ("lora", "plora"):
        a = getattr(lin, f"{kind}_A", None)
        if a is None:
            continue
        getattr(out, f"add_{kind}")(a.out_features, 1.0, getattr(lin, f"{kind}_dropout").p)
        setattr(out, f"{kind}_scaling", getattr(lin, f"{kind}_scaling"))
        getattr(out, f"{kind}_A").to(a.weight.dtype)  # an adapter wider than the weight stays so
        getattr(out, f"{kind}_B").to(getattr(lin, f"{kind}_B").weight.dtype)
        with torch.no_grad():
            getattr(out, f"{kind}_A").weight.copy_(a.weight)
            getattr(out, f"{kind}_B").weight.copy_(getattr(lin, f"{kind}_B").weight[start:stop])
    if getattr(lin, "adapter_bias", None) is not None:
        out.add_bias_tune()
        with torch.no_grad():
            out.adapter_bias.copy_(lin.adapter_bias[start:stop])
            out.adapter_scale.copy_(lin.adapter_scale[start:stop])
    out.train(lin.training)
    return out


def split_qkv(attn: nn.Module) -> None:
    """Replace a fused ``qkv_proj`` ([q; k; v] rows) by ``q_proj``, ``k_proj`` and ``v_proj``."""
    qkv = attn.qkv_proj
    if getattr(qkv, "lora_merged", False):
        raise ValueError("unmerge LoRA before splitting a fused qkv projection")
    q, kv = attn.nh * attn.hd, attn.nkv * attn.hd
    attn.q_proj, attn.k_proj, attn.v_proj = (
        _rows(qkv, 0, q),
        _rows(qkv, q, q + kv),
        _rows(qkv, q + kv, q + 2 * kv),
    )
    del attn.qkv_proj


def plain(lin: nn.Module) -> bool:
    """Whether ``lin`` is a base linear only (no LoRA, Partial LoRA, bias tuning or quantized base)."""
    return (
        type(lin) is ALinear
        and lin.quantized is None
        and all(getattr(lin, a) is None for a in ("lora_A", "plora_A", "adapter_bias"))
    )


def fuse_rows(lins: list[nn.Linear]) -> ALinear:
    """One linear whose output is the plain linears' outputs concatenated (the inverse of
    ``_rows``): one matrix read instead of several."""
    w = lins[0].weight
    if not all(plain(m) for m in lins) or len({m.bias is None for m in lins}) > 1:
        raise ValueError("only plain linears (no adapters, all with or all without a bias) can be fused")
    out = ALinear(w.shape[1], sum(m.out_features for m in lins), bias=lins[0].bias is not None,
                  device=w.device, dtype=w.dtype)  # fmt: skip
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in lins]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in lins]))
    out.train(lins[0].training)
    return out


def fuse_projections(llm: nn.Module) -> int:
    """For inference: q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj`` wherever
    they are plain linears (MAM's per-modality K/V and adapted projections stay apart), so a
    forward reads two matrices fewer per block and computes exactly the same. Returns how many
    modules were fused."""
    n = 0
    for layer in llm.layers:
        attn, mlp = layer.self_attn, layer.mlp
        names = ("q_proj", "k_proj", "v_proj")
        if all(plain(getattr(attn, k, None)) for k in names):
            attn.qkv_proj = fuse_rows([getattr(attn, k) for k in names])
            for k in names:
                delattr(attn, k)
            n += 1
        if plain(getattr(mlp, "gate_proj", None)) and plain(mlp.up_proj):
            mlp.gate_up_proj = fuse_rows([mlp.gate_proj, mlp.up_proj])
            del mlp.gate_proj, mlp.up_proj
            n += 1
    return n


def _target_linears(llm: nn.Module, targets: list[str]):
    for name, module in llm.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, ALinear) and name.startswith("layers.") and leaf in targets:
            yield name, module
        if isinstance(module, ALinear) and leaf.isdigit() and name.split(".")[-3] in targets:
            # per-modality copies of a MAM projection (``k_proj.multiway.N``)
            yield name, module


def apply_plora(llm: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> int:
    """Add Partial LoRA to every targeted decoder linear; returns how many got one."""
    n = 0
    for _, lin in _target_linears(llm, targets):
        if lin.plora_A is None:
            lin.add_plora(rank, alpha, dropout)
            n += 1
    return n


def apply_lora(llm: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> int:
    """Add LoRA to every targeted decoder linear; returns how many got one."""
    n = 0
    for _, lin in _target_linears(llm, targets):
        if lin.lora_A is None:
            lin.add_lora(rank, alpha, dropout)
            n += 1
    return n


def apply_bias_tuning(llm: nn.Module) -> int:
    """Bias tuning (bias 0, scale 1) on every decoder-layer linear that has none; returns how many
    got one. The head and Flamingo's blocks are plain ``nn.Linear`` and stay as they are."""
    n = 0
    for name, module in llm.named_modules():
        if isinstance(module, ALinear) and name.startswith("layers.") and module.adapter_bias is None:
            module.add_bias_tune()
            n += 1
    return n


def merge_bias_tuning(model: nn.Module) -> None:
    """Fold every bias-tuning scale into its layer's weights (``ALinear.merge_bias_tune``)."""
    for m in model.modules():
        if isinstance(m, ALinear):
            m.merge_bias_tune()


def set_lora_merged(model: nn.Module, merged: bool) -> None:
    for m in model.modules():
        if isinstance(m, ALinear) and m.lora_A is not None:
            m.merge_lora() if merged else m.unmerge_lora()


# --------------------------------------------------------------------------- on a whole model
# Each ``enable_*`` records the part in the model's config (so save/load round-trips) and
# applies it. ``model`` is an ``MLLM``.


def enable_mam(model) -> None:
    """Convert the decoder to the Modality-Adaptive Module (image copies = text weights)."""
    c = model.config.llm
    c.mam = True
    if c.fused_qkv:  # MAM splits it (``split_qkv``); routed parts that targeted it follow the pieces
        c.fused_qkv = False
        for extra in (c.plora, c.lora):
            if extra is not None and "qkv_proj" in extra.targets:
                extra.targets = [t for t in extra.targets if t != "qkv_proj"] + ["q_proj", "k_proj", "v_proj"]
    apply_mam(model.llm)


def enable_plora(model, cfg) -> int:
    """Add Partial LoRA (``PLoRAConfig``) to the decoder; W_B starts at zero."""
    model.config.llm.plora = cfg
    return apply_plora(model.llm, cfg.rank, cfg.alpha, cfg.dropout, cfg.targets)


def enable_lora(model, cfg) -> int:
    """Add LoRA (``LoRAConfig``) to the decoder; B starts at zero."""
    model.config.llm.lora = cfg
    return apply_lora(model.llm, cfg.rank, cfg.alpha, cfg.dropout, cfg.targets)


def enable_adapter(model, cfg) -> int:
    """Add LLaMA-Adapter (``AdapterConfig``) to the decoder: prompts with zero-init gates on the
    top ``cfg.num_layers`` layers; visual prompts (zero-init gates) on the first
    ``cfg.visual_layers``, which switch a model with a vision tower to ``fusion: adapter``; bias
    tuning with ``cfg.bias_tuning``. Returns how many layers got text prompts."""
    c = model.config
    layers = model.llm.layers
    if not 0 <= cfg.visual_layers <= len(layers):
        raise ValueError(f"adapter.visual_layers must be in 0..{len(layers)}, got {cfg.visual_layers}")
    if cfg.visual_layers and c.vision is not None and c.fusion != "adapter":
        if c.fusion != "splice":
            raise ValueError(
                f"visual prompts read the images through fusion adapter; this model uses {c.fusion}"
            )
        from modalign.models.mllm import _check_fusion  # (mllm imports this module)

        _check_fusion(dataclasses.replace(c, fusion="adapter", llm=dataclasses.replace(c.llm, adapter=cfg)))
        c.fusion = "adapter"  # the image token stays a token; its image goes to the visual prompts
    c.llm.adapter = cfg
    hidden = c.llm.hidden_size
    first = max(len(layers) - cfg.num_layers, 0)
    for layer in layers[first:]:
        if layer.self_attn.adapter_prompt is None:
            layer.self_attn.add_adapter(cfg.prompt_len, hidden)
    for layer in layers[: cfg.visual_layers]:
        if layer.self_attn.adapter_prompt_visual is None:
            layer.self_attn.add_visual_adapter(cfg.prompt_len, hidden)
    if cfg.bias_tuning:
        apply_bias_tuning(model.llm)
    return len(layers) - first
