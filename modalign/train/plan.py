"""``modalign train RECIPE --plan [--gpus N]``: per stage, trainable/frozen parameters, memory per
GPU for the recipe's strategy and precision, and an estimate of the time per step and per stage,
computed on the meta device (no weights are read or allocated).

Memory per GPU (bytes per parameter; FSDP divides every term but activations by the GPU count):

    precision   weights                       gradients        optimiser (AdamW)
    fp32        4 x all                       4 x trainable    8 x trainable
    bf16        4 x all (autocast)            4 x trainable    8 x trainable
    bf16-pure   2 x all + 4 x trainable       2 x trainable    8 x trainable
                (fp32 master copies; under FSDP the shards are the fp32 masters: 4 x all)

Activations: batch x length x hidden x layers x 34 bytes for the decoder in bf16 (fp32: twice),
or batch x length x hidden x (2 x layers + 34) with gradient checkpointing, at the longest
sequences (``max_length``: an upper bound); the vision tower's
activations are left out (frozen towers keep none). Time: 2 FLOPs per parameter per token forward;
backward, 2 per parameter of the parts gradients flow through and 2 more per trainable parameter
(plus one more forward where activations are recomputed); at ``mfu`` of ``gpu_tflops``, over at most ``batch x grad_accum x max_length`` tokens
per GPU per step (sequences are usually shorter: an upper bound).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from modalign.checkpoints.io import CheckpointError
from modalign.models.mllm import MLLM
from modalign.train import objectives
from modalign.train.freeze import apply_trainable
from modalign.train.recipe import Recipe

FLOW = ("vision", "connector", "llm")  # the order data flows through the parts


def _config(recipe: Recipe) -> tuple:
    """(config, note): part shapes from the init checkpoints where they exist, else the preset's."""
    try:
        return recipe.model.build_config(), None
    except CheckpointError as e:
        return recipe.model.build_config(read_init=False), f"part shapes from the preset ({e})"


def _samples(stage) -> int | None:
    if stage.data.samples is not None:
        return stage.data.samples
    from modalign.data.datasets import load_samples

    total = 0
    for src in stage.data.sources:
        if not Path(src.path).is_file():
            return None
        total += len(load_samples(Path(src.path)))
    return total


def plan(recipe: Recipe, gpus: int = 1, gpu_tflops: float = 312.0, mfu: float = 0.4,
         count_samples: bool = True) -> list[dict]:  # fmt: skip
    """One row per stage (see the module docstring for the estimates)."""
    from modalign.train.run import enable_parts

    cfg, note = _config(recipe)
    with torch.device("meta"):
        model = MLLM(cfg)
        enable_parts(model, recipe.model.enable)
    fsdp = recipe.parallel.strategy == "fsdp" and gpus > 1
    rows = []
    for stage in recipe.stages:
        with torch.device("meta"):
            enable_parts(model, stage.enable)
            target = objectives.get(stage.objective.name).module(model, stage)
        table = apply_trainable(target, stage.trainable)
        trainable = sum(r.trainable for r in table)
        total = trainable + sum(r.frozen for r in table)
        if stage.precision == "bf16-pure":
            weights = total * 4 if fsdp else total * 2 + trainable * 4
            grads = trainable * (4 if fsdp else 2)
        else:
            weights, grads = total * 4, trainable * 4
        shard = gpus if fsdp else 1
        batch, length = stage.data.batch_size, stage.data.max_length
        h, n = cfg.llm.hidden_size, cfg.llm.num_layers
        act = batch * length * h * ((2 * n + 34) if stage.gradient_checkpointing else n * 34)
        act = act * 2 if stage.precision == "fp32" else act  # the 34 bytes are 16-bit activations
        mem = {"weights": weights / shard, "gradients": grads / shard, "optimizer": trainable * 8 / shard,
               "activations_estimate": act}  # fmt: skip
        # FLOPs: forward through everything, backward from the first part that trains
        sizes = {p: sum(x.numel() for x in getattr(model, p).parameters()) for p in FLOW if hasattr(model, p)}
        first = next((i for i, p in enumerate(FLOW) if p in sizes and any(
            x.requires_grad for x in getattr(model, p).parameters())), len(FLOW))  # fmt: skip
        through = sum(sizes.get(p, 0) for p in FLOW[first:])
        # backward: input gradients through every part after the first that trains (2 per
        # parameter), weight gradients of what trains (2 more); checkpointing recomputes forwards
        per_token = (
            2 * total + 2 * through + 2 * trainable + (2 * through if stage.gradient_checkpointing else 0)
        )
        tokens = batch * stage.optim.grad_accum * length
        step_s = tokens * per_token / (gpu_tflops * 1e12 * mfu)
        steps = stage.stop.max_steps
        if steps is None and count_samples:
            n_samples = _samples(stage)
            if n_samples is not None:
                steps = math.ceil(stage.stop.epochs * n_samples / (batch * gpus * stage.optim.grad_accum))
        rows.append({"stage": stage.name, "trainable": trainable, "frozen": total - trainable, "groups": table,
                     "gpus": gpus, "strategy": recipe.parallel.strategy if gpus > 1 else "none",
                     "precision": stage.precision, "memory_bytes": mem,
                     "memory_total_gib": sum(mem.values()) / 2**30, "tokens_per_step_max": tokens * gpus,
                     "seconds_per_step": step_s, "steps": steps,
                     "hours": None if steps is None else steps * step_s / 3600,
                     "objective": stage.objective.name, "note": note})  # fmt: skip
    return rows


def format_plan(recipe: Recipe, rows: list[dict], gpu_tflops: float = 312.0, mfu: float = 0.4) -> str:
    from modalign.train.freeze import format_table

    out = [f"recipe {recipe.name}: {recipe.description}".rstrip(": ")]
    if rows and rows[0]["note"]:
        out.append(f"note: {rows[0]['note']}")
    for r in rows:
        m = r["memory_bytes"]
        out.append(f"\nstage {r['stage']} ({r['objective']}, {r['precision']}): trainable {r['trainable']:,}, "
                   f"frozen {r['frozen']:,}")  # fmt: skip
        out.append(format_table(r["groups"]))
        out.append(f"memory per GPU ({r['gpus']} GPU(s), {r['strategy']}), GiB: "
                   + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in m.items())
                   + f"; total ~{r['memory_total_gib']:.2f}")  # fmt: skip
        steps = "steps unknown (data not found)" if r["steps"] is None else (
            f"{r['steps']:,} steps ~{r['hours']:.1f} h")  # fmt: skip
        out.append(f"tokens per optimiser step (at most): {r['tokens_per_step_max']:,}; "
                   f"~{r['seconds_per_step']:.2f} s/step at {mfu:.0%} of {gpu_tflops:g} TFLOP/s per GPU; {steps}")  # fmt: skip
    return "\n".join(out)
