"""Run a recipe: build the model, then each stage (init, enable parts, objective, freeze, train, save).

OUT/resolved_recipe.json
OUT/<stage>/checkpoints/step-*/   resumable training state
OUT/<stage>/metrics.jsonl, loss.png, tb/, trainable.json, result.json
OUT/<stage>/model/                native model + tokenizer (the stage's result)
OUT/model/                        the last stage's model
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from modalign.checkpoints import load_pretrained
from modalign.checkpoints.io import copy_dir_atomic, recover_dirs, write_text_atomic
from modalign.checkpoints.parts import build_from_parts
from modalign.config import ConfigError
from modalign.data.datasets import (
    ConversationDataset,
    MixtureDataset,
    SourcesDataset,
    balanced_groups,
    load_samples,
    record_groups,
)
from modalign.data.tokenizer import Tokenizer
from modalign.models.mllm import MLLM
from modalign.models.modality import enable_adapter, enable_lora, enable_mam, enable_plora
from modalign.train import objectives
from modalign.train.feature_cache import RunCache
from modalign.train.freeze import apply_trainable, format_table
from modalign.train.parallel import Dist, barrier, wrap
from modalign.train.precision import MasterWeights
from modalign.train.recipe import Recipe, Stage, part_config
from modalign.train.state import full_model_state, is_sharded
from modalign.train.trainer import StageResult, Trainer

log = logging.getLogger("modalign")


ENABLERS = {"plora": enable_plora, "lora": enable_lora, "adapter": enable_adapter}


def enable_parts(model: MLLM, spec: dict) -> None:
    """Switch on modality-aware parts named in a recipe (``mam``, ``plora``, ``lora``, ``adapter``;
    each part's options read as the recipe check reads them: ``recipe.part_config``)."""
    for name, value in spec.items():
        cfg = part_config(name, value, f"enable.{name}")
        if name == "mam":
            if value and not model.config.llm.mam:
                enable_mam(model)
        elif getattr(model.config.llm, name) is None:
            ENABLERS[name](model, cfg)


@dataclass
class StageContext:
    """What an objective's ``setup`` needs to know about the stage it sets up."""

    recipe: Recipe
    stage: Stage
    index: int
    model: MLLM
    tok: Tokenizer
    dist: Dist
    cache: RunCache

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def strategy(self) -> str:
        return self.recipe.parallel.strategy

    def log(self, msg: str) -> None:
        if self.dist.main:
            log.info(msg)

    def dataset(self, make_processor: Callable, loader: Callable = load_samples):
        """The stage's dataset (a mixture where it names several sources; with ``mix: batch``
        the sources side by side, ``SourcesDataset``): each source's samples read by ``loader``
        and processed by ``make_processor(image_root, image_processor, max_length)``. One image
        processor (and its cache of decoded images) serves every source and is kept for the next
        stage of the run."""
        data, cfg = self.stage.data, self.model.config
        images = self.cache.image_processor(cfg.vision, data.image_cache_mb) if cfg.vision else None
        sets, weights = [], []
        for k, src in enumerate(data.sources):
            path = Path(src.path)
            root = Path(src.images) if src.images else path.parent
            proc = make_processor(root, images, src.max_length or data.max_length)
            if src.balance is None:
                sets.append(ConversationDataset(loader(path), proc, data.token_cache_mb))
                weights.append(src.weight)
                continue
            # one mixture source per group of the field, drawn by group size ** alpha
            try:
                groups = balanced_groups(loader(path), record_groups(path, src.balance.by), src.balance.alpha)
            except ValueError as e:
                raise ConfigError(f"stages.{self.stage.name}.data.sources[{k}].balance: {e}") from None
            for _, samples, share in groups:
                sets.append(ConversationDataset(samples, proc, data.token_cache_mb / len(groups)))
                weights.append(src.weight * share)
            self.log(f"{path.name} balanced by {src.balance.by} (alpha {src.balance.alpha}): "
                     + ", ".join(f"{g} {len(v)} -> {100 * share:.1f}%" for g, v, share in groups))  # fmt: skip
        if data.mix == "batch":
            return SourcesDataset(sets, [src.path for src in data.sources])
        if len(sets) == 1 and data.samples is None:
            return sets[0]
        return MixtureDataset(sets, weights, data.samples, seed=self.seed)  # which draws: the recipe's seed


def run_recipe(recipe: Recipe, out: str | Path, d: Dist | None = None, progress: bool = True,
               stages: list[str] | None = None) -> dict[str, StageResult]:  # fmt: skip
    """Run every stage (or the named ones), skipping finished stages and resuming checkpoints."""
    d = d or Dist()
    out = Path(out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        _recover(out, recipe)
        (out / "resolved_recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    barrier(d)
    if recipe.model.tokenizer is None:
        raise ValueError("recipe.model.tokenizer: a tokenizer directory is needed for training")
    tok = Tokenizer.from_dir(recipe.model.tokenizer)
    results: dict[str, StageResult] = {}
    prev: Path | None = None  # the model the next stage starts from
    cache = RunCache()
    for i, stage in enumerate(recipe.stages):
        sdir = out / stage.name
        finished = (sdir / "model" / "config.json").is_file()
        if stages is not None and stage.name not in stages:
            prev = sdir / "model" if finished else prev
            continue
        if finished and (sdir / "result.json").is_file():
            if d.main:
                log.info("stage %s: already finished (%s)", stage.name, sdir / "model")
            results[stage.name] = StageResult(**json.loads((sdir / "result.json").read_text()))
            prev = sdir / "model"
            continue
        results[stage.name] = run_stage(recipe, i, prev, tok, sdir, d, cache, progress)
        prev = sdir / "model"
    if d.main and prev is not None:
        copy_dir_atomic(prev, out / "model")
    return results


def setup_stage(recipe: Recipe, i: int, model: MLLM, tok: Tokenizer, d: Dist | None = None,
                cache: RunCache | None = None) -> tuple:  # fmt: skip
    """Stage ``i``'s objective module around ``model``, its dataset and collator, with the stage's
    trainable parameters set: (module, dataset, collator, table of trainable/frozen counts)."""
    stage = recipe.stages[i]
    spec = objectives.get(stage.objective.name)
    ctx = StageContext(recipe, stage, i, model, tok, d or Dist(), cache if cache is not None else RunCache())
    target, dataset, collator = spec.setup(ctx)
    table = apply_trainable(target, stage.trainable)
    if spec.prepare is not None:
        spec.prepare(target, dataset)
    return target, dataset, collator, table


def _recover(out: Path, recipe: Recipe) -> None:
    """Undo or finish what a killed run left half-done: directory commits (the final model, a
    stage's model, a checkpoint) interrupted between their renames, and unfinished writes."""
    for parent in (
        out,
        *(out / s.name for s in recipe.stages),
        *(out / s.name / "checkpoints" for s in recipe.stages),
    ):
        for line in recover_dirs(parent):
            log.warning("%s (left by an interrupted run)", line)


def run_stage(recipe: Recipe, i: int, prev: Path | None, tok: Tokenizer, sdir: Path, d: Dist, cache: RunCache,
              progress: bool = True) -> StageResult:  # fmt: skip
    """Train stage ``i`` from the model at ``prev`` (or its own init) and save it to ``sdir/model``."""
    stage = recipe.stages[i]
    model = _stage_model(recipe, stage, i, prev, tok)
    enable_parts(model, stage.enable)
    model.to(d.device)
    target, dataset, collator, table = setup_stage(recipe, i, model, tok, d, cache)
    sharded = recipe.parallel.strategy == "fsdp" and d.enabled
    masters = MasterWeights(target) if stage.precision == "bf16-pure" and not sharded else None
    if d.main:
        print(f"stage {stage.name}: {len(dataset)} samples\n{format_table(table)}", flush=True)
        sdir.mkdir(parents=True, exist_ok=True)
        counts = {"trainable": sum(r.trainable for r in table), "frozen": sum(r.frozen for r in table),
                  "groups": [asdict(r) for r in table]}  # fmt: skip
        (sdir / "trainable.json").write_text(json.dumps(counts, indent=2) + "\n")
    trainer = Trainer(wrap(target, recipe.parallel.strategy, d, stage.precision), stage, dataset, collator, sdir,
                      recipe.seed, d, progress=progress, cache=cache, masters=masters)  # fmt: skip
    res = trainer.run()
    if masters is not None:  # the stage's result keeps the fp32 masters, not their bf16 roundings
        model.float()
        masters.load(masters.state())
    _save_stage(model, target, objectives.get(stage.objective.name), stage, tok, sdir, res, d)
    return res


def _save_stage(model: MLLM, target, spec, stage: Stage, tok: Tokenizer, sdir: Path, res: StageResult,
                d: Dist) -> None:  # fmt: skip
    full = None
    if is_sharded(model):  # FSDP: gather the full weights (collective) before rank 0 saves
        full = full_model_state(target)
        if spec.heads:
            full = {k: v for k, v in full.items() if not k.startswith(spec.heads)}
    if d.main:
        if full is not None:
            model = _unsharded(model.config, full)
        for p in model.parameters():
            p.requires_grad_(True)
        model.save_pretrained(sdir / "model")
        if stage.objective.name == "lm":
            tok.template_name = stage.data.template  # what chat/serve render prompts with
        tok.save(sdir / "model")
        write_text_atomic(
            sdir / "result.json", json.dumps(asdict(res), indent=2) + "\n"
        )  # a kill: old or new
    barrier(d)


def _stage_model(recipe: Recipe, stage: Stage, i: int, prev: Path | None, tok: Tokenizer) -> MLLM:
    src = stage.init_from
    if src == "previous" and i > 0:
        if prev is None:
            raise ValueError(f"stage {stage.name}: init_from previous, but the previous stage has no model")
        return _fits(
            load_pretrained(prev, dtype=torch.float32), tok, f"stage {stage.name}: the model of {prev}"
        )
    if src not in (None, "none", "previous"):
        return _fits(load_pretrained(src, dtype=torch.float32), tok, f"stage {stage.name}: init_from {src}")
    cfg = recipe.model.build_config()
    if recipe.model.init:  # released parts (checkpoints.parts); the others freshly initialised
        model = build_from_parts(cfg, recipe.model.init, recipe.seed)
    else:
        torch.manual_seed(recipe.seed)
        model = MLLM(cfg)
    enable_parts(model, recipe.model.enable)
    return _fits(model, tok, "the model")


def _fits(model: MLLM, tok: Tokenizer, what: str) -> MLLM:
    """``model``, if its vocabulary holds every id the tokenizer makes (padding included)."""
    if model.config.llm.vocab_size < tok.vocab_size:
        raise ValueError(f"{what}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.llm.vocab_size}")  # fmt: skip
    return model


def _unsharded(cfg, state: dict) -> MLLM:
    """A plain CPU model filled from a gathered FSDP state dict (for saving)."""
    from modalign.checkpoints import build
    from modalign.checkpoints.io import load_state_strict

    model = build(cfg, torch.float32)
    load_state_strict(model, state, "gathered FSDP state")
    return model


__all__ = ["enable_parts", "run_recipe", "run_stage", "setup_stage"]
