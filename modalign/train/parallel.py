"""Distributed training, applied from outside the model: ``torchrun`` process groups, DDP, and
FSDP2 (``fully_shard`` per block, then the root). The model code never imports this."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None) -> Dist:
    """Join the process group that ``torchrun`` describes (gloo on CPU, NCCL on CUDA). ``device``
    (cpu, cuda, cuda:N, mps, auto): where a single process trains; under torchrun each rank takes
    its local GPU (``auto``/``cuda``) or the CPU (``cpu``)."""
    from modalign.devices import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=resolve_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device not in (None, "auto", "cuda", "cpu"):
        raise ValueError(
            f"--device {device!r}: under torchrun use auto, cuda (each rank its local GPU) or cpu"
        )
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.set_device(local)
        backend, dev = "nccl", torch.device("cuda", local)
    else:
        backend, dev = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, local, dev)


def wrap(model: nn.Module, strategy: str, d: Dist, precision: str = "fp32") -> nn.Module:
    """DDP or FSDP2 around ``model`` (a no-op in a single process); under FSDP, ``bf16-pure``
    gathers each block in bf16 over fp32 shards (``precision.fsdp_policy``)."""
    if not d.enabled or strategy == "none":
        return model
    if strategy == "ddp":
        ids = [d.local_rank] if d.device.type == "cuda" else None
        # a micro-batch may leave parts unused on one process (text-only rows: no tower or
        # connector; ``mix: batch`` gives every step a text-only source's batch): their gradient
        # for it is zero, reduced with the rest, instead of a reduction that never completes
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from modalign.train.precision import fsdp_policy

        policy = fsdp_policy(precision)
        kw = {} if policy is None else {"mp_policy": policy}
        blocks = []
        if hasattr(model, "vision"):
            blocks += list(model.vision.encoder.layers)
        blocks += list(model.llm.layers)
        for block in blocks:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    raise ValueError(f"unknown parallel strategy {strategy!r}; known: none, ddp, fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_sum(xs: list[float], d: Dist) -> list[float]:
    """``xs`` summed over the processes, element by element, in one collective."""
    if not d.enabled:
        return list(xs)
    t = torch.tensor(xs, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
