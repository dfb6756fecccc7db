"""int8 weights for the decode step: each matrix of the fused decode plan (q|k|v, o, gate|up,
down, the LM head) stored as int8 with one scale per output channel (symmetric, ``|w| / 127``).

    w [out, in] -> scale = max|w_row| / 127, q = round(w / scale) in [-127, 127]
    y = x @ (q * scale)^T + b

Decoding one token reads every weight once, so a step's time is mostly the bytes it reads: int8
reads a quarter of fp32's. Two kernels, chosen by device:

- ``dynamic`` (CPU): PyTorch's x86 int8 GEMM (fbgemm), activations quantized per call to 7 bits
  (``reduce_range``, as PyTorch's dynamic quantization does on x86). PyTorch marks its quantized
  tensor types deprecated; if a future release removes them, asking for int8 fails with an error
  that says so instead of running slower.
- ``weight_only`` (CUDA, and any device in bf16/fp16): ``torch._weight_int8pack_mm``, the int8
  weight-only GEMM that torchao's int8 weight-only layout calls; activations stay in their dtype.

The module path (prefill, training) keeps the model's own weights; only the decode step reads the
int8 copy, so the process holds both (the int8 copy adds a quarter of the LLM's linear weights).
Measured speed and accuracy: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import warnings

import torch

QUANTIZE = ("int8",)


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
            self.bias = None if bias is None else bias.detach().float()
            try:
                with warnings.catch_warnings():  # PyTorch's notice that quantized tensor types are deprecated
                    warnings.simplefilter("ignore")
                    qw = torch._make_per_channel_quantized_tensor(
                        self.q, self.scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0
                    )
                    self.packed = torch.ops.quantized.linear_prepack(qw, self.bias)
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
            return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self.packed, True).to(x.dtype)
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
