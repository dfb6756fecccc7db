"""int8 and int4 weights for the decode step (int4: ``Int4Linear``, at the end). int8: each
matrix of the fused decode plan (q|k|v, o, gate|up, down, the LM head) stored as int8 with one
scale per output channel (symmetric, ``|w| / 127``).

    w [out, in] -> scale = max|w_row| / 127, q = round(w / scale) in [-127, 127]
    y = x @ (q * scale)^T + b

Decoding one token reads every weight once, so a step's time is mostly the bytes it reads: int8
reads a quarter of fp32's. Two kernels, chosen by device:

- ``dynamic`` (CPU): PyTorch's x86 int8 GEMM (fbgemm), activations quantized to 7 bits
  (``reduce_range``, as PyTorch's dynamic quantization does on x86), each row scaled to its own
  range first (the kernel takes one scale a call). PyTorch marks its quantized
  tensor types deprecated; if a future release removes them, asking for int8 fails with an error
  that says so instead of running slower.
- ``weight_only`` (CUDA, and any device in bf16/fp16): ``torch._weight_int8pack_mm``, the int8
  weight-only GEMM that torchao's int8 weight-only layout calls; activations stay in their dtype.

``quantize_llm_`` replaces the LLM's matrices by their quantized values in place (inference only):
the prefill and the decode step (``DecodePlan`` reads the same objects) then both use them, and
the fp32 matrices are freed. Measured speed, memory and accuracy: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

QUANTIZE = ("int8", "int4")


def check_quantize(quantize: str | None) -> str | None:
    if quantize in (None, "none"):
        return None
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize: unknown scheme {quantize!r}; known: none, {', '.join(QUANTIZE)}")
    return quantize


def default_backend(device: torch.device, dtype: torch.dtype) -> str:
    return "dynamic" if device.type == "cpu" and dtype == torch.float32 else "weight_only"


class Int8Linear:
    """``y = x @ W^T + b`` with ``W`` held in int8, one scale per output row; ``backend`` as in
    the module docstring (default: ``dynamic`` for fp32 on the CPU, else ``weight_only``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str | None = None):
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        self.backend = backend or default_backend(weight.device, weight.dtype)
        self.scale = w.abs().amax(1).clamp_min(1e-12) / 127.0
        self.q = torch.round(w / self.scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.bias = None if bias is None else bias.detach()
        if self.backend == "dynamic":
            if weight.device.type != "cpu":
                raise ValueError("int8 backend 'dynamic' runs on the CPU only; use 'weight_only'")
            self.bias = None if bias is None else bias.detach().float()  # added after the row scales
            try:
                with warnings.catch_warnings():  # PyTorch's notice that quantized tensor types are deprecated
                    warnings.simplefilter("ignore")
                    qw = torch._make_per_channel_quantized_tensor(
                        self.q, self.scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0
                    )
                    self.packed = torch.ops.quantized.linear_prepack(qw, None)
            except (RuntimeError, AttributeError) as e:
                raise RuntimeError(
                    f"int8 on the CPU needs PyTorch's x86 int8 GEMM (quantized.linear_dynamic), which "
                    f"this torch {torch.__version__} does not provide: {e}"
                ) from e
            self.q = None  # the packed copy is the one kept
        elif self.backend == "weight_only":
            self.scale = self.scale.to(weight.dtype)
        else:
            raise ValueError(f"int8 backend: unknown {backend!r}; known: dynamic, weight_only")

    @property
    def nbytes(self) -> int:
        """Bytes of the int8 matrix and its scales."""
        return self.out_features * self.in_features + self.out_features * self.scale.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "dynamic":
            xf = x.float().contiguous()
            if xf.numel() == xf.shape[-1]:  # one row (a decode step at batch 1)
                y = torch.ops.quantized.linear_dynamic(xf, self.packed, True)
            else:  # the kernel scales a whole call at once: each row (token) gets its own scale first,
                # so one token's large activations cannot round the others' to zero
                s = xf.abs().amax(-1, keepdim=True).clamp_min(1e-12)
                y = torch.ops.quantized.linear_dynamic(xf / s, self.packed, True) * s
            y = y if self.bias is None else y + self.bias
            return y.to(x.dtype)
        lead = x.shape[:-1]
        y = torch._weight_int8pack_mm(
            x.reshape(-1, self.in_features).to(self.scale.dtype), self.q, self.scale
        )
        y = y.view(*lead, self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        """The weight these int8 values stand for ([out, in], float32)."""
        if self.q is None:
            return torch.ops.quantized.linear_unpack(self.packed)[0].dequantize()
        return self.q.float() * self.scale.float()[:, None]


INT4_GROUP_SIZES = (128, 64, 32)  # the kernel also takes 256; 128 and below keep the error small


def int4_unavailable(device: torch.device | str) -> str | None:
    """Why int4 cannot run on ``device`` with this torch build (None: it can)."""
    if torch.device(device).type != "cpu":
        return f"int4 runs on the CPU's int4 GEMM; this weight is on {torch.device(device)} (use int8)"
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return (f"int4 needs PyTorch's CPU int4 GEMM (_weight_int4pack_mm_for_cpu, torch 2.6 or later); "
                f"this torch is {torch.__version__}")  # fmt: skip
    return None


def int4_problem(shape: tuple[int, int], group_size: int | None = None) -> str | None:
    """Why the CPU int4 kernel cannot take an [out, in] matrix (None: it can)."""
    out, k = shape
    if group_size is not None and group_size not in (32, 64, 128, 256):
        return f"int4: group size {group_size} is not one the kernel takes (32, 64, 128, 256)"
    g = group_size or 32
    if k % g:
        return f"int4: input width {k} of a [{out}, {k}] matrix is not a multiple of {g} (the group size)"
    if out % 16:
        return f"int4: output width {out} of a [{out}, {k}] matrix is not a multiple of 16 (the CPU kernel's tile)"
    return None


def int4_fits(weight: torch.Tensor) -> bool:
    """Whether the CPU int4 kernel takes this [out, in] matrix here (out a multiple of 16, in of 32)."""
    return int4_unavailable(weight.device) is None and int4_problem(tuple(weight.shape)) is None


class Int4Linear:
    """``y = x @ W^T + b`` with ``W`` held in 4 bits, groupwise asymmetric over the input dimension
    (each group of ``group_size`` weights of a row has its own scale and offset):

        scale = (max - min) / 15, zero = min + 8 * scale, q = round((w - min) / scale) in [0, 15]
        w ~= (q - 8) * scale + zero

    On the CPU through PyTorch's int4 weight-only GEMM (``_weight_int4pack_mm_for_cpu``, the kernel
    torchao's int4 CPU layout calls), in bfloat16: its float32 path runs 10-100 times slower than
    fp32 itself, its bfloat16 path 2.5-4x faster at batch 1 on large matrices (docs/benchmarks.md),
    so activations are rounded to bfloat16 for the product and the output cast back.
    ``group_size``: the largest of 128, 64, 32 that divides the input width unless given."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int | None = None):
        problem = int4_unavailable(weight.device) or int4_problem(tuple(weight.shape), group_size)
        if problem is not None:
            raise ValueError(problem)
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        k = self.in_features
        g = group_size or next(g for g in INT4_GROUP_SIZES if k % g == 0)
        self.group_size = g
        wg = w.view(self.out_features, k // g, g)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        q = ((wg - lo) / scale).round_().clamp_(0, 15).to(torch.int32).view(self.out_features, k)
        zero = lo + 8 * scale
        # [groups, out, 2]: the kernel's layout of scales and offsets
        self.scales_zeros = torch.stack([scale[..., 0], zero[..., 0]], -1).transpose(0, 1).contiguous()
        self.scales_zeros = self.scales_zeros.to(torch.bfloat16)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        self.bias = None if bias is None else bias.detach()

    @property
    def nbytes(self) -> int:
        """Bytes of the packed 4-bit matrix and its scales and offsets."""
        return (
            self.packed.numel() * self.packed.element_size()
            + self.scales_zeros.numel() * self.scales_zeros.element_size()
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(self.scales_zeros.dtype).contiguous(), self.packed,
            self.group_size, self.scales_zeros,
        )  # fmt: skip
        y = y.view(*lead, self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        """The weight these 4-bit values stand for ([out, in], float32): the kernel's float32 path
        applied to the identity, with the scales and offsets it multiplies in bfloat16."""
        eye = torch.eye(self.in_features)
        y = torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_zeros.float())
        return y.t().contiguous()


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, scheme: str) -> Int8Linear | Int4Linear:
    """``weight`` [out, in] (and ``bias``) in ``scheme``; under int4 a matrix its kernel does not
    take is int8."""
    if scheme == "int4" and int4_fits(weight):
        return Int4Linear(weight, bias)
    if scheme in ("int8", "int4"):
        return Int8Linear(weight, bias)
    raise ValueError(f"quantize: unknown scheme {scheme!r}; known: {', '.join(QUANTIZE)}")


class QuantizedLinear(nn.Module):
    """A plain linear layer whose weight is held quantized (``quantized``); inference only."""

    def __init__(self, quantized: Int8Linear | Int4Linear):
        super().__init__()
        self.quantized = quantized
        self.in_features, self.out_features = quantized.in_features, quantized.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {type(self.quantized).__name__}"


def linear_bytes(llm: nn.Module) -> int:
    """Bytes of the LLM's decoder and head matrices as held now (fp32 or quantized)."""
    total, seen = 0, set()
    for name, m in llm.named_modules():
        q = getattr(m, "quantized", None)
        if q is not None:
            total += q.nbytes
        elif isinstance(m, nn.Linear) and (name.startswith("layers.") or name == "lm_head"):
            if m.weight.data_ptr() not in seen:  # a tied head is the embedding's matrix
                seen.add(m.weight.data_ptr())
                total += m.weight.numel() * m.weight.element_size()
    return total


@torch.no_grad()
def quantize_llm_(llm: nn.Module, scheme: str) -> nn.Module:
    """Quantize the decoder's matrices and the LM head in place, for inference.

    q/k/v and gate/up are fused first where they are plain linears (``fuse_projections``), then
    every decoder linear's base weight and the head are replaced by ``scheme`` values: the fp32
    matrices are dropped, and the prefill (every token through ``ALinear``) and the decode step
    (``DecodePlan`` reads the same objects) both multiply with the quantized ones. LoRA must be
    merged first; Partial LoRA, MAM's image copies and bias tuning keep working on top of the
    quantized base. The embeddings, norms, vision tower and connector stay as they are (a head
    tied to the embeddings gets its own quantized copy; the embeddings keep theirs). The model
    cannot be trained or saved afterwards; quantize a fresh copy to keep the original."""
    from modalign.models.modality import ALinear, fuse_projections

    scheme = check_quantize(scheme)
    if scheme is None:
        return llm
    if (done := getattr(llm, "quantized_scheme", None)) is not None:
        if done != scheme:
            raise ValueError(f"quantize {scheme}: this model's matrices are already {done}; load it again")
        return llm
    for name, m in llm.named_modules():
        if isinstance(m, ALinear) and m.lora_A is not None and not m.lora_merged:
            raise ValueError(f"quantize {scheme}: merge LoRA first ({name} carries unmerged LoRA)")
    if scheme == "int4" and (problem := int4_unavailable(llm.embed_tokens.weight.device)):
        raise ValueError(f"quantize {scheme}: {problem}")
    fuse_projections(llm)  # exact: the model is still whole if what follows fails
    todo = [m for m in llm.layers.modules() if isinstance(m, ALinear) and m.quantized is None]
    ops = [quantized_linear(m.weight, m.bias, scheme) for m in todo]  # every one built before any is set
    head = quantized_linear(llm.lm_head.weight, llm.lm_head.bias, scheme)
    for m, op in zip(todo, ops, strict=True):
        m.quantized, m.weight, m.bias = op, None, None
    llm.lm_head = QuantizedLinear(head)
    llm.quantized_scheme = scheme
    return llm
