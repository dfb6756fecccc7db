"""``modalign train RECIPE --plan``: per stage, trainable/frozen parameters, estimated memory
and tokens per step, computed on the meta device (no real weights are allocated)."""

from __future__ import annotations

import torch

from modalign.models.mllm import MLLM
from modalign.train import objectives
from modalign.train.freeze import apply_trainable
from modalign.train.recipe import Recipe


def plan(recipe: Recipe) -> list[dict]:
    from modalign.train.run import enable_parts

    with torch.device("meta"):
        model = MLLM(recipe.model.build_config())
        enable_parts(model, recipe.model.enable)
    cfg = model.config
    rows = []
    for stage in recipe.stages:
        with torch.device("meta"):
            enable_parts(model, stage.enable)
            target = objectives.get(stage.objective.name).module(model, stage)
        table = apply_trainable(target, stage.trainable)
        trainable = sum(r.trainable for r in table)
        total = trainable + sum(r.frozen for r in table)
        wbytes = 2 if stage.precision == "bf16" else 4
        batch, length = stage.data.batch_size, stage.data.max_length
        tokens = batch * stage.optim.grad_accum * length
        act = batch * length * cfg.llm.hidden_size * cfg.llm.num_layers * 34
        if stage.gradient_checkpointing:
            act = batch * length * cfg.llm.hidden_size * (cfg.llm.num_layers * 2 + 34)
        mem = {
            "weights": total * 4,  # fp32 master weights (bf16 runs autocast)
            "gradients": trainable * 4,
            "optimizer": trainable * 8,  # AdamW: two fp32 moments
            "activations_estimate": act * wbytes // 2,
        }
        rows.append({"stage": stage.name, "trainable": trainable, "frozen": total - trainable, "groups": table,
                     "memory_bytes": mem, "memory_total_gib": sum(mem.values()) / 2**30,
                     "tokens_per_step_max": tokens, "objective": stage.objective.name})  # fmt: skip
    return rows


def format_plan(recipe: Recipe, rows: list[dict]) -> str:
    from modalign.train.freeze import format_table

    out = [f"recipe {recipe.name}: {recipe.description}".rstrip(": ")]
    for r in rows:
        m = r["memory_bytes"]
        out.append(
            f"\nstage {r['stage']} ({r['objective']}): trainable {r['trainable']:,}, frozen {r['frozen']:,}"
        )
        out.append(format_table(r["groups"]))
        out.append("memory (GiB): " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in m.items())
                   + f"; total ~{r['memory_total_gib']:.2f}")  # fmt: skip
        out.append(f"tokens per optimiser step (at most): {r['tokens_per_step_max']:,}")
    return "\n".join(out)
