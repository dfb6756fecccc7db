"""Training precisions (a stage's ``precision``):

    fp32        fp32 weights, fp32 compute
    bf16        fp32 weights, bf16 compute under autocast (matmuls in bf16; norms, softmax and the
                loss in fp32)
    bf16-pure   bf16 weights (every part, frozen ones included: half the memory) and bf16 compute
                under autocast; the optimiser steps fp32 master copies of the trainable weights,
                from which the bf16 weights are rounded after every step. Under FSDP the fp32
                shards are the masters and each block is gathered in bf16 (FSDP2's
                ``MixedPrecisionPolicy``; gradients reduced in fp32).

A resumed bf16-pure run is exact: a checkpoint holds the fp32 masters (in ``model.safetensors``,
in place of the rounded weights) and the optimiser state keyed by the parameters' names.
"""

from __future__ import annotations

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "bf16-pure")


def autocast(precision: str, device: torch.device):
    """The forward's autocast context for a precision (off for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "fp32")


class MasterWeights:
    """fp32 master copies of a module's trainable parameters, the module itself cast to bf16.

    ``swap(groups)`` gives the optimiser the masters in place of the parameters; per step,
    ``grads_to_masters`` after the backward passes, ``masters_to_model`` after ``optimizer.step``.
    ``named_parameters`` names the masters as the parameters they stand for, so a checkpoint's
    optimiser state is keyed as in any other precision."""

    def __init__(self, module: nn.Module):
        self.pairs: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        for name, p in module.named_parameters():
            if p.requires_grad:
                master = p.detach().to(torch.float32, copy=True).requires_grad_(True)
                self.pairs.append((name, p, master))
        for p in module.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
        self._by_param = {id(p): m for _, p, m in self.pairs}

    def swap(self, groups: list[dict]) -> list[dict]:
        for g in groups:
            g["params"] = [self._by_param[id(p)] for p in g["params"]]
        return groups

    def named_parameters(self):
        return [(name, m) for name, _, m in self.pairs]

    def grads_to_masters(self) -> None:
        for _, p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
            p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        for _, p, m in self.pairs:
            p.copy_(m)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: m.detach() for name, _, m in self.pairs}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p, m in self.pairs:
            m.copy_(tensors[name])
            p.copy_(m)


def fsdp_policy(precision: str):
    """FSDP2's mixed-precision policy for a precision (None: the parameters' own dtype)."""
    if precision != "bf16-pure":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
