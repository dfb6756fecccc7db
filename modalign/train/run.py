"""Run a recipe: build the model, then each stage (init, enable parts, freeze, data, train, save).

OUT/resolved_recipe.json
OUT/<stage>/checkpoints/step-*/   resumable training state
OUT/<stage>/metrics.jsonl, loss.png, tb/
OUT/<stage>/model/                native model + tokenizer (the stage's result)
OUT/model -> the last stage's model (copied)
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from modalign.checkpoints import CheckpointError, load_pretrained
from modalign.config import AdapterConfig, LoRAConfig, PLoRAConfig
from modalign.data.collate import Collator
from modalign.data.conversation import get_template
from modalign.data.datasets import ConversationDataset, MixtureDataset, SampleProcessor, load_samples
from modalign.data.images import ImageProcessor, resolve_image_path
from modalign.data.tokenizer import Tokenizer
from modalign.models.mllm import MLLM
from modalign.models.modality import enable_adapter, enable_lora, enable_mam, enable_plora
from modalign.train.freeze import apply_trainable, format_table
from modalign.train.parallel import Dist, barrier, wrap
from modalign.train.prior import AnswerPrior
from modalign.train.recipe import Recipe, Stage
from modalign.train.state import full_model_state, is_sharded
from modalign.train.trainer import StageResult, Trainer, lm_loss

log = logging.getLogger("modalign")
PARTS = ("llm", "vision", "connector")


def enable_parts(model: MLLM, spec: dict) -> None:
    """Switch on modality-aware parts named in a recipe (``mam``, ``plora``, ``lora``, ``adapter``)."""
    for name, value in spec.items():
        if name == "mam":
            if value and not model.config.llm.mam:
                enable_mam(model)
        elif name == "plora" and model.config.llm.plora is None:
            enable_plora(model, PLoRAConfig(**(value or {})))
        elif name == "lora" and model.config.llm.lora is None:
            enable_lora(model, LoRAConfig(**(value or {})))
        elif name == "adapter" and model.config.llm.adapter is None:
            enable_adapter(model, AdapterConfig(**(value or {})))
        elif name not in ("mam", "plora", "lora", "adapter"):
            raise ValueError(f"unknown part to enable {name!r}; known: mam, plora, lora, adapter")


def init_parts(model: MLLM, init: dict[str, str]) -> None:
    """Copy pretrained weights into parts of ``model`` (``all`` or llm / vision / connector)."""
    for part, path in init.items():
        src = load_pretrained(path, dtype=torch.float32)
        names = PARTS if part == "all" else (part,)
        for name in names:
            if name not in PARTS:
                raise ValueError(f"recipe.model.init: unknown part {name!r}; known: all, {', '.join(PARTS)}")
            if not hasattr(src, name) or not hasattr(model, name):
                if part == "all":
                    continue
                raise CheckpointError(f"{path} has no {name} part to initialise from")
            if (
                name == "vision"
                and src.config.vision.feature_whitening
                and not model.config.vision.feature_whitening
            ):
                model.vision.enable_feature_whitening()  # the tower was whitened after its training
            missing, unexpected = getattr(model, name).load_state_dict(
                getattr(src, name).state_dict(), strict=False
            )
            if missing or unexpected:
                raise CheckpointError(
                    f"{path}: {name} does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        if part in ("all", "llm"):
            model.llm.tie_weights()


def build_dataset(stage: Stage, model: MLLM, tok: Tokenizer, processor_cls=None, carry: dict | None = None):
    """The stage's dataset (a mixture where it names several sources). ``carry``: what earlier
    stages of the run left, so that an image decoded by one stage is not decoded again by the next
    (the image processor, with its cache, is kept while the vision config and cache size are the same)."""
    cfg = model.config
    sets, weights = [], []
    images = None  # one processor (and image cache) for all the stage's sources
    if cfg.vision:
        key = (repr(cfg.vision), stage.image_cache_mb)
        images = (carry or {}).get("images", {}).get(key)
        if images is None:
            images = ImageProcessor(cfg.vision, cache_mb=stage.image_cache_mb)
            if carry is not None:
                carry["images"] = {key: images}
    for src in stage.data:
        path = Path(src.path)
        root = Path(src.images) if src.images else path.parent
        if processor_cls is not None:
            proc = processor_cls(tok, root, images, stage.max_length, stage.region_phrase)
        else:
            per_token = cfg.placeholder == "per_token"
            proc = SampleProcessor(
                tok,
                get_template(stage.template, tok),
                root,
                images,
                cfg.image_token_id,
                model.num_image_tokens() if per_token and model.has_vision else 1,
                stage.max_length,
            )
        loader = getattr(processor_cls, "load_samples", load_samples)
        sets.append(ConversationDataset(loader(path), proc, stage.token_cache_mb))
        weights.append(src.weight)
    if len(sets) == 1 and stage.samples is None:
        return sets[0]
    return MixtureDataset(sets, weights, stage.samples)


def run_recipe(recipe: Recipe, out: str | Path, d: Dist | None = None, progress: bool = True,
               stages: list[str] | None = None) -> dict[str, StageResult]:  # fmt: skip
    """Run every stage (or the named ones), resuming finished stages and checkpoints."""
    d = d or Dist()
    out = Path(out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "resolved_recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    tok_dir = recipe.model.tokenizer
    if tok_dir is None:
        raise ValueError("recipe.model.tokenizer: a tokenizer directory is needed for training")
    tok = Tokenizer.from_dir(tok_dir)
    results: dict[str, StageResult] = {}
    prev_model: Path | None = None
    carry: dict = {}  # decoded images and a frozen tower's features, from one stage to the next
    for i, stage in enumerate(recipe.stages):
        sdir = out / stage.name
        done = sdir / "model" / "config.json"
        if stages is not None and stage.name not in stages:
            prev_model = sdir / "model" if done.is_file() else prev_model
            continue
        if done.is_file() and (sdir / "result.json").is_file():
            if d.main:
                log.info("stage %s: already finished (%s)", stage.name, done.parent)
            results[stage.name] = StageResult(**json.loads((sdir / "result.json").read_text()))
            prev_model = done.parent
            continue
        model = _stage_model(recipe, stage, i, prev_model, tok)
        enable_parts(model, stage.enable)
        model.to(d.device)
        loss_fn, collator, target = lm_loss, Collator(tok.pad_id), model
        if stage.objective == "contrastive":
            from modalign.train.contrastive import (
                CaptionProcessor,
                ContrastiveCollator,
                ContrastiveModel,
                check_regions,
                contrastive_loss,
            )

            torch.manual_seed(recipe.seed * 7919 + i)  # the new heads' init, as on a resumed run
            target = ContrastiveModel(
                model, region_weight=stage.region_contrastive, text_cache=recipe.parallel.strategy != "fsdp"
            ).to(d.device)
            collator = ContrastiveCollator(tok.pad_id)
            dataset = build_dataset(stage, model, tok, CaptionProcessor, carry)
            if stage.region_contrastive > 0:
                check_regions(dataset, stage)
            loss_fn = contrastive_loss
        else:
            dataset = build_dataset(stage, model, tok, carry=carry)
            if stage.answer_prior:
                prior = AnswerPrior.from_dataset(
                    dataset,
                    model.llm.lm_head.weight.shape[0],
                    stage.answer_prior_min_count,
                    stage.answer_prior,
                )
                loss_fn = functools.partial(lm_loss, prior=prior)
                if d.main:
                    log.info("stage %s: %s", stage.name, prior.describe())
        table = apply_trainable(target, stage.trainable)
        if stage.objective == "contrastive":
            from modalign.train.contrastive import fill_text_cache

            fill_text_cache(target, dataset)
        if d.main:
            print(f"stage {stage.name}: {len(dataset)} samples\n{format_table(table)}", flush=True)
            sdir.mkdir(parents=True, exist_ok=True)
            counts = {"trainable": sum(r.trainable for r in table), "frozen": sum(r.frozen for r in table),
                      "groups": [asdict(r) for r in table]}  # fmt: skip
            (sdir / "trainable.json").write_text(json.dumps(counts, indent=2) + "\n")
        wrapped = wrap(target, recipe.parallel.strategy, d)
        trainer = Trainer(
            wrapped, stage, dataset, collator, sdir, recipe.seed, d, loss_fn, progress=progress, carry=carry
        )
        res = trainer.run()
        results[stage.name] = res
        full = None
        if is_sharded(model):  # FSDP: gather the full weights (collective) before rank 0 saves
            full = full_model_state(target)
            if stage.objective == "contrastive":
                full = {k: v for k, v in full.items() if not k.startswith("clip_")}
        if d.main:
            if full is not None:
                model = _unsharded(model.config, full)
            for p in model.parameters():
                p.requires_grad_(True)
            if stage.whiten_vision_features:
                whiten_vision(model, stage, stage.whiten_vision_features)
            model.save_pretrained(sdir / "model")
            if stage.objective == "lm":
                tok.template_name = stage.template  # what chat/serve render prompts with
            tok.save(sdir / "model")
            (sdir / "result.json").write_text(json.dumps(asdict(res), indent=2) + "\n")
        barrier(d)
        prev_model = sdir / "model"
    if d.main and prev_model is not None:
        final = out / "model"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(prev_model, final)
    return results


def whiten_vision(model: MLLM, stage: Stage, limit: int, batch_size: int = 128) -> dict:
    """Fit the vision tower's feature whitening on up to ``limit`` distinct images of the stage's
    data sources (in file order), and switch it on in the model's config."""
    from modalign.models.vision import fit_feature_whitening

    if not model.has_vision:
        raise ValueError(f"stage {stage.name}: whiten_vision_features needs a model with a vision tower")
    loader = load_samples
    if stage.objective == "contrastive":  # its data may be annotated images, read as training reads them
        from modalign.train.contrastive import load_caption_samples as loader
    paths: list[Path] = []
    seen: set[Path] = set()
    for src in stage.data:
        root = Path(src.images) if src.images else Path(src.path).parent
        for sample in loader(Path(src.path)):
            for ref in getattr(sample, "images", None) or []:
                path = resolve_image_path(root, ref, sample.id)
                if path not in seen and len(paths) < limit:
                    seen.add(path)
                    paths.append(path)
    if not paths:
        raise ValueError(f"stage {stage.name}: whiten_vision_features found no images in its data")
    proc = ImageProcessor(model.config.vision)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = (torch.stack([proc(p) for p in paths[i : i + batch_size]]).to(dev)
               for i in range(0, len(paths), batch_size))  # fmt: skip
    stats = fit_feature_whitening(model.vision, batches)
    model.train(was_training)
    log.info("stage %s: vision feature whitening fitted on %d images (%d tokens; eigenvalues %.3g..%.3g)",
             stage.name, len(paths), stats["tokens"], stats["eig_min"], stats["eig_max"])  # fmt: skip
    return stats


def _stage_model(recipe: Recipe, stage: Stage, i: int, prev: Path | None, tok: Tokenizer) -> MLLM:
    src = stage.init_from
    if src == "previous" and i > 0:
        if prev is None:
            raise ValueError(f"stage {stage.name}: init_from previous, but the previous stage has no model")
        return load_pretrained(prev, dtype=torch.float32)
    if src not in (None, "none", "previous"):
        return load_pretrained(src, dtype=torch.float32)
    torch.manual_seed(recipe.seed)
    model = MLLM(recipe.model.build_config())  # random init for the parts that are not loaded
    init_parts(model, recipe.model.init)
    enable_parts(model, recipe.model.enable)
    if model.config.llm.vocab_size < tok.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.llm.vocab_size}")  # fmt: skip
    return model


def _unsharded(cfg, state: dict) -> MLLM:
    """A plain CPU model filled from a gathered FSDP state dict (for saving)."""
    from modalign.checkpoints import build
    from modalign.checkpoints.io import load_state_strict

    model = build(cfg, torch.float32)
    load_state_strict(model, state, "gathered FSDP state")
    return model


__all__ = ["run_recipe"]
