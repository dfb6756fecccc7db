"""Declarative training recipes (YAML): the model, then a list of stages.

Each stage names its data (mixture weights), template, trainable parameter patterns, LR per
group, schedule, batch size, accumulation, clipping, steps or epochs, precision and gradient
checkpointing; ``init_from`` says where its weights start (default: the previous stage).
Strings may use ``${data}`` and ``${out}``; ``--set a.b.c=value`` overrides any key.
Validation names the offending key (``recipe.stages[1].lr: expected a number``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modalign.config import ConfigError, MLLMConfig, _build
from modalign.models.decoder import check_dropout

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class DataSource:
    path: str
    images: str | None = None  # image root (default: the file's folder)
    weight: float = 1.0


@dataclass
class Schedule:
    warmup: float = 0.03  # fraction of steps (< 1) or a number of steps (>= 1)
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0


@dataclass
class BadSamples:
    mode: str = "skip"  # skip | error
    max_fraction: float = 0.05


@dataclass
class Stage:
    name: str
    data: list[DataSource]
    trainable: list[str]
    template: str = "vicuna_v1"
    objective: str = "lm"  # lm | contrastive (CLIP-style image-caption pretraining of the vision tower)
    lr: float = 2e-5
    lr_groups: dict[str, float] = field(default_factory=dict)
    schedule: Schedule = field(default_factory=Schedule)
    weight_decay: float = 0.0
    # dropout on the LLM's residual branches (each layer's attention and MLP outputs) while this
    # stage trains; not saved with the model
    dropout: float = 0.0
    # train against the data's question-only answer prior with this weight (product of experts,
    # modalign.train.prior; 0: off): prompts seen at least answer_prior_min_count times
    answer_prior: float = 0.0
    answer_prior_min_count: int = 20
    batch_size: int = 16
    grad_accum: int = 1
    clip: float | None = 1.0
    max_steps: int | None = None
    epochs: float | None = None
    # end the stage early once the mean loss of the last ``stop_window`` steps is at or below this
    # (a curriculum step that is learnt); the schedule still spans max_steps / epochs
    stop_at_loss: float | None = None
    stop_window: int = 20
    # once stop_at_loss is met, go on this many steps with the LR falling linearly from its value there
    # to min_lr_ratio (warmup-stable-decay style: a learnt step ends annealed, not at a high LR)
    stop_anneal: int = 0
    samples: int | None = None  # mixture draws per epoch (default: the sources' total size)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    gradient_checkpointing: bool = False
    init_from: str | None = "previous"  # previous | none | a checkpoint directory
    enable: dict[str, Any] = field(default_factory=dict)  # parts added at this stage (e.g. lora: {...})
    max_length: int = 2048
    group_by_modality: bool = False
    group_by_length: bool = True  # off for contrastive stages: similar-length batches are all hard negatives
    # after training: fit the vision tower's feature whitening on up to this many of the stage's
    # images (0: off); see VisionConfig.feature_whitening
    whiten_vision_features: int = 0
    # contrastive: weight of the region-phrase term (needs annotated images with boxes; 0: off)
    region_contrastive: float = 0.0
    # the text each box is matched against: {category} (the box label) and {where} (its coarse
    # 3x3 location, "top left" ... "bottom right")
    region_phrase: str = "{category}"
    bad_samples: BadSamples = field(default_factory=BadSamples)
    # resized images kept in memory per process, at most this many MiB (0: decode every time)
    image_cache_mb: float = 512
    # token ids and labels kept per sample after their first read, at most this many MiB (0: off)
    token_cache_mb: float = 256
    # a frozen vision tower's output per image file, kept after its first pass, at most this many MiB
    # (0: off; never under FSDP): the tower runs once per image instead of once per sample
    feature_cache_mb: float = 256
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 2
    eval_every: int = 0
    log_every: int = 1

    def validate(self, where: str) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError(f"{where}: give exactly one of max_steps and epochs")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"{where}.precision: expected fp32 or bf16, got {self.precision!r}")
        if self.objective not in ("lm", "contrastive"):
            raise ConfigError(f"{where}.objective: expected lm or contrastive, got {self.objective!r}")
        if self.schedule.decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"{where}.schedule.decay: expected cosine, linear or constant")
        if self.stop_at_loss is not None and not self.stop_at_loss > 0:
            raise ConfigError(f"{where}.stop_at_loss: expected a loss > 0, got {self.stop_at_loss}")
        try:
            check_dropout(self.dropout)
        except ValueError as e:
            raise ConfigError(f"{where}.dropout: {e}") from None
        if self.answer_prior < 0 or self.answer_prior and self.objective != "lm":
            raise ConfigError(
                f"{where}.answer_prior: expected a weight >= 0 on an lm stage, got {self.answer_prior}"
            )
        if self.answer_prior_min_count < 1:
            raise ConfigError(
                f"{where}.answer_prior_min_count: expected a sample count >= 1, got {self.answer_prior_min_count}"
            )
        if self.stop_anneal < 0:
            raise ConfigError(f"{where}.stop_anneal: expected a number of steps >= 0, got {self.stop_anneal}")
        if self.stop_anneal and self.stop_at_loss is None:
            raise ConfigError(f"{where}.stop_anneal: anneals after stop_at_loss is met; set stop_at_loss too")
        if self.stop_window < 1:
            raise ConfigError(f"{where}.stop_window: expected a number of steps >= 1, got {self.stop_window}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError(f"{where}: batch_size and grad_accum must be >= 1")
        if not self.data:
            raise ConfigError(f"{where}.data: a stage needs at least one data source")
        if not self.trainable:
            raise ConfigError(f"{where}.trainable: a stage needs at least one trainable pattern")
        if self.region_contrastive < 0 or self.region_contrastive and self.objective != "contrastive":
            raise ConfigError(f"{where}.region_contrastive: expected a weight >= 0 on a contrastive stage")
        try:
            self.region_phrase.format(category="c", where="w")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"{where}.region_phrase: only {{category}} and {{where}} may be used ({e})"
            ) from None
        if self.whiten_vision_features < 0:
            raise ConfigError(f"{where}.whiten_vision_features: expected an image count >= 0")
        for key in ("image_cache_mb", "token_cache_mb", "feature_cache_mb"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}: expected a size in MiB >= 0, got {getattr(self, key)}")


@dataclass
class ModelSpec:
    preset: str | None = None
    config: dict[str, Any] | None = None  # a full MLLMConfig dict (instead of a preset)
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the preset/config
    init: dict[str, str] = field(
        default_factory=dict
    )  # part (llm | vision | connector | all) -> checkpoint dir
    tokenizer: str | None = None
    enable: dict[str, Any] = field(
        default_factory=dict
    )  # mam: true, plora: {...}, lora: {...}, adapter: {...}

    def build_config(self) -> MLLMConfig:
        if (self.preset is None) == (self.config is None):
            raise ConfigError("recipe.model: give exactly one of preset and config")
        base = MLLMConfig.from_name(self.preset).to_dict() if self.preset else copy.deepcopy(self.config)
        merged = _deep_merge(base, self.overrides)
        return MLLMConfig.from_dict(merged)


@dataclass
class Parallel:
    strategy: str = "none"  # none | ddp | fsdp


@dataclass
class Recipe:
    name: str
    model: ModelSpec
    stages: list[Stage]
    description: str = ""
    seed: int = 0
    parallel: Parallel = field(default_factory=Parallel)

    def validate(self) -> None:
        self.model.build_config()
        if self.parallel.strategy not in ("none", "ddp", "fsdp"):
            raise ConfigError(
                f"recipe.parallel.strategy: expected none, ddp or fsdp, got {self.parallel.strategy!r}"
            )
        names = set()
        for i, s in enumerate(self.stages):
            s.validate(f"recipe.stages[{i}]")
            if s.name in names:
                raise ConfigError(f"recipe.stages[{i}].name: duplicate stage name {s.name!r}")
            names.add(s.name)
        if not self.stages:
            raise ConfigError("recipe.stages: a recipe needs at least one stage")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


_VAR = re.compile(r"\$\{(\w+)\}")


def _substitute(obj, variables: dict[str, str]):
    if isinstance(obj, str):

        def repl(m):
            if m.group(1) not in variables:
                raise ConfigError(
                    f"recipe uses ${{{m.group(1)}}} but it is not set (known: {', '.join(variables)})"
                )
            return str(variables[m.group(1)])

        return _VAR.sub(repl, obj)
    if isinstance(obj, list):
        return [_substitute(x, variables) for x in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, variables) for k, v in obj.items()}
    return obj


def apply_overrides(doc: dict, sets: list[str]) -> dict:
    """``a.b.c=value`` (value parsed as YAML) into the raw recipe document. A list element is
    named by its index or, for stages, by its ``name``: ``stages.align.lr=1e-3``."""
    doc = copy.deepcopy(doc)
    for item in sets:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            hint = " (quote a value that holds ${...} or braces)" if "{" in raw else ""
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML{hint}: {e}") from None
        parts = key.split(".")
        node: Any = doc
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if p.isdigit() and int(p) < len(node):
                    idx = int(p)
                else:
                    idx = next(
                        (j for j, s in enumerate(node) if isinstance(s, dict) and s.get("name") == p), None
                    )
                    if idx is None:
                        raise ConfigError(f"--set {key}: {where} is neither an index nor a stage name")
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[p] = value
                else:
                    node = node.setdefault(p, {})
            else:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping or list")
    return doc


def load_recipe(
    source: str | Path | dict, variables: dict[str, str] | None = None, sets: list[str] | None = None
) -> Recipe:
    """Read and validate a recipe: a path, the name of a shipped recipe, or a dict."""
    if isinstance(source, dict):
        doc = source
    else:
        path = Path(source)
        if not path.is_file():
            shipped = RECIPES_DIR / f"{source}.yaml"
            if not shipped.is_file():
                names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
                raise FileNotFoundError(f"no recipe file {source}; shipped recipes: {names}")
            path = shipped
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    doc = apply_overrides(doc, sets or [])
    doc = _substitute(doc, {"data": "data", "out": "runs", **(variables or {})})
    recipe = _build(Recipe, doc, "recipe")
    recipe.validate()
    return recipe
