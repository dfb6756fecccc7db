"""Declarative training recipes (YAML): the model, then a list of stages.

Each stage names its trainable parameter patterns and has sections: ``data`` (sources and their
mixture weights, template, batching, caches), ``optim`` (LR per group, schedule, accumulation,
clipping), ``stop`` (steps or epochs, early stop on a learnt loss), ``objective`` (lm or
contrastive, with its options) and ``checkpoints``; ``init_from`` says where its weights start
(default: the previous stage).
Strings may use ``${data}`` and ``${out}``; ``--set a.b.c=value`` overrides any key.
Validation names the offending key (``recipe.stages[1].lr: expected a number``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modalign.config import ConfigError, MLLMConfig, _build

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"  # the full-scale recipes (package data)


@dataclass
class Balance:
    """Draw a source's records by group (``by``: a field of each record, e.g. ShapesWorld's
    question ``type``), each group in proportion to its size to the power ``alpha``: 1 keeps the
    file's proportions, 0 draws every group equally (XLM's multilingual sampling)."""

    by: str
    alpha: float = 0.0


@dataclass
class DataSource:
    path: str
    images: str | None = None  # image root (default: the file's folder)
    weight: float = 1.0  # its share of a mixture's draws (``mix: sample``)
    max_length: int | None = None  # its samples' token limit (default: the stage's ``max_length``)
    # ``mix: batch`` only: its micro-batch size per process (default: the stage's ``batch_size``)
    # and the factor on its batches' loss (OpenFlamingo: LAION's 0.2 beside MMC4's 1.0)
    batch_size: int | None = None
    loss_weight: float = 1.0
    balance: Balance | None = None  # ``mix: sample`` only: its draws balanced over a field's groups


@dataclass
class BadSamples:
    mode: str = "skip"  # skip | error
    max_fraction: float = 0.05


@dataclass
class StageData:
    """What a stage reads and how it batches it."""

    sources: list[DataSource]
    template: str = "vicuna_v1"
    max_length: int = 2048
    batch_size: int = 16  # per process
    samples: int | None = None  # mixture draws per epoch (default: the sources' total size)
    group_by_length: bool = True  # off for contrastive stages: similar-length batches are all hard negatives
    group_by_modality: bool = False
    # several samples a row (lm objective): each batch's samples packed into rows of at most
    # pack_length tokens (default max_length), attended and positioned per sample; same loss
    packing: bool = False
    pack_length: int | None = None
    # how several sources make batches: ``sample`` draws samples from a weighted mixture (each
    # batch mixes them); ``batch`` gives every optimiser step one micro-batch of each source, in
    # the sources' order, with each source's own batch size, token limit and loss weight, and
    # the step's loss the weighted sum (OpenFlamingo's LAION and MMC4 batches)
    mix: str = "sample"
    bad_samples: BadSamples = field(default_factory=BadSamples)
    # resized images kept in memory per process, at most this many MiB (0: decode every time)
    image_cache_mb: float = 512
    # token ids and labels kept per sample after their first read, at most this many MiB (0: off)
    token_cache_mb: float = 256
    # a frozen vision tower's output per image file, kept after its first pass, at most this many MiB
    # (0: off; never under FSDP): the tower runs once per image instead of once per sample
    feature_cache_mb: float = 256

    def validate(self, where: str) -> None:
        if not self.sources:
            raise ConfigError(f"{where}.sources: a stage needs at least one data source")
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: expected >= 1, got {self.batch_size}")
        if self.pack_length is not None and self.pack_length < 1:
            raise ConfigError(f"{where}.pack_length: expected a token count >= 1, got {self.pack_length}")
        if self.max_length < 1:
            raise ConfigError(f"{where}.max_length: expected a token count >= 1, got {self.max_length}")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"{where}.samples: expected a number of draws >= 1, got {self.samples}")
        if not 0.0 <= self.bad_samples.max_fraction <= 1.0:
            raise ConfigError(f"{where}.bad_samples.max_fraction: expected a fraction in [0, 1] (0.05 is 5%), "
                              f"got {self.bad_samples.max_fraction}")  # fmt: skip
        if self.bad_samples.mode not in ("skip", "error"):
            raise ConfigError(
                f"{where}.bad_samples.mode: expected skip or error, got {self.bad_samples.mode!r}"
            )
        for key in ("image_cache_mb", "token_cache_mb", "feature_cache_mb"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}: expected a size in MiB >= 0, got {getattr(self, key)}")
        if self.mix not in ("sample", "batch"):
            raise ConfigError(f"{where}.mix: expected sample or batch, got {self.mix!r}")
        for i, src in enumerate(self.sources):
            at = f"{where}.sources[{i}]"
            if src.max_length is not None and src.max_length < 1:
                raise ConfigError(f"{at}.max_length: expected a token count >= 1, got {src.max_length}")
            if src.balance is not None:
                if not src.balance.by:
                    raise ConfigError(
                        f"{at}.balance.by: expected the name of a field of the source's records"
                    )
                if not (src.balance.alpha >= 0 and math.isfinite(src.balance.alpha)):
                    raise ConfigError(f"{at}.balance.alpha: expected a finite number >= 0 (1: the file's "
                                      f"proportions, 0: every group equally), got {src.balance.alpha}")  # fmt: skip
                if self.mix != "sample":
                    raise ConfigError(
                        f"{at}.balance: needs {where}.mix: sample (it weighs the draws of a mixture)"
                    )
            if self.mix == "sample":
                for key, default in (("batch_size", None), ("loss_weight", 1.0)):
                    if getattr(src, key) != default:
                        raise ConfigError(f"{at}.{key}: a source's own {key} needs {where}.mix: batch "
                                          "(each step one batch of each source)")  # fmt: skip
                continue
            if src.batch_size is not None and src.batch_size < 1:
                raise ConfigError(f"{at}.batch_size: expected >= 1, got {src.batch_size}")
            if not (src.loss_weight >= 0 and math.isfinite(src.loss_weight)):
                raise ConfigError(f"{at}.loss_weight: expected a finite number >= 0, got {src.loss_weight}")
            if src.weight != 1.0:
                raise ConfigError(f"{at}.weight: with {where}.mix: batch every step takes one batch of each "
                                  "source; set their sizes (batch_size) and loss factors (loss_weight) instead")  # fmt: skip
        if self.mix == "batch":
            if self.packing:
                raise ConfigError(
                    f"{where}.packing: not with mix: batch (each batch is one source's, unpacked)"
                )
            if self.samples is not None:
                raise ConfigError(f"{where}.samples: mixture draws do not apply to mix: batch (its epoch is "
                                  "the largest source's batches)")  # fmt: skip
            if self.group_by_modality:
                raise ConfigError(f"{where}.group_by_modality: not with mix: batch (each batch is one source's; "
                                  "group_by_length does nothing there either)")  # fmt: skip
            if all(src.loss_weight == 0 for src in self.sources):
                raise ConfigError(f"{where}.sources: every loss_weight is 0: nothing would train")


@dataclass
class Schedule:
    warmup: float = 0.03  # fraction of steps (< 1) or a number of steps (>= 1)
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0


@dataclass
class Optim:
    """AdamW and its schedule; regularisation."""

    lr: float = 2e-5
    lr_groups: dict[str, float] = field(default_factory=dict)  # glob -> LR (first match wins)
    weight_decay: float = 0.0  # never on norms, biases and embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW's (LLaVA's trainer: 0.9, 0.999)
    grad_accum: int = 1
    clip: float | None = 1.0
    schedule: Schedule = field(default_factory=Schedule)
    # dropout on the LLM's residual branches (each layer's attention and MLP outputs) while this
    # stage trains; not saved with the model
    dropout: float = 0.0
    # an exponential moving average of the trainable weights, updated after every optimiser step
    # (from the first) with this decay, kept in fp32 in the optimiser's state (so a resume goes on
    # with it); the stage's model is the average. 0: off
    ema: float = 0.0

    def validate(self, where: str) -> None:
        if self.grad_accum < 1:
            raise ConfigError(f"{where}.grad_accum: expected >= 1, got {self.grad_accum}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{where}.betas: expected two numbers in [0, 1), got {self.betas}")
        if self.schedule.decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"{where}.schedule.decay: expected cosine, linear or constant")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout: expected a probability in [0, 1), got {self.dropout}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"{where}.ema: expected a decay in [0, 1) (0: no average), got {self.ema}")
        if self.clip is not None and not self.clip >= 0:  # a negative norm would flip every gradient
            raise ConfigError(f"{where}.clip: expected a gradient norm >= 0 (or null), got {self.clip}")
        if not self.lr >= 0 or any(not v >= 0 for v in self.lr_groups.values()):
            raise ConfigError(f"{where}.lr / lr_groups: learning rates must be >= 0")
        if not 0.0 <= self.schedule.min_lr_ratio <= 1.0:
            raise ConfigError(
                f"{where}.schedule.min_lr_ratio: expected [0, 1], got {self.schedule.min_lr_ratio}"
            )
        if not self.schedule.warmup >= 0:
            raise ConfigError(f"{where}.schedule.warmup: expected >= 0, got {self.schedule.warmup}")


@dataclass
class Stop:
    """When a stage ends: after ``max_steps`` optimiser steps or ``epochs``, or earlier once the
    mean loss of the last ``window`` steps is at or below ``at_loss`` (a learnt curriculum step;
    the LR schedule still spans max_steps / epochs)."""

    max_steps: int | None = None
    epochs: float | None = None
    at_loss: float | None = None
    window: int = 20

    def validate(self, where: str) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError(f"{where}: give exactly one of max_steps and epochs")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{where}: max_steps must be >= 1 and epochs > 0")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"{where}: max_steps must be >= 1 and epochs > 0")
        if self.at_loss is not None and not self.at_loss > 0:
            raise ConfigError(f"{where}.at_loss: expected a loss > 0, got {self.at_loss}")
        if self.window < 1:
            raise ConfigError(f"{where}.window: expected a number of steps >= 1, got {self.window}")


@dataclass
class AnswerPriorOptions:
    """Train against the data's question-only answer prior (``objectives/answer_prior.py``)."""

    weight: float = 1.0
    min_count: int = 20  # prompts seen at least this often get a prior


@dataclass
class RegionOptions:
    """Contrastive: match each box's patch against a phrase (needs annotated images)."""

    weight: float = 1.0
    # the text each box is matched against: {category} (the box label) and {where} (its coarse
    # 3x3 location, "top left" ... "bottom right")
    phrase: str = "{category}"


@dataclass
class QFormerOptions:
    """qformer (BLIP-2 stage 1): the weight of each loss (0 leaves it out) and the label smoothing
    of itc and itg (``objectives/qformer.py``)."""

    itc: float = 1.0
    itm: float = 1.0
    itg: float = 1.0
    label_smoothing: float = 0.1
    # the Q-Former's own tokenizer (BLIP-2: bert-base-uncased's, with [DEC] added) as a folder or
    # tokenizer.json; None: the model's tokenizer (its ids must fit connector.text_vocab_size)
    tokenizer: str | None = None


@dataclass
class Objective:
    """The stage's training objective (``modalign.train.objectives``) and its options."""

    name: str = "lm"  # lm | contrastive | qformer
    answer_prior: AnswerPriorOptions | None = None  # lm
    region: RegionOptions | None = None  # contrastive
    qformer: QFormerOptions | None = None  # qformer
    # lm with an encoder-decoder LLM (BLIP-2 Flan-T5's stage 2): split each target reply at a
    # point drawn per sample, the first part read by the encoder, the rest the decoder's target
    prefix_lm: bool | None = None

    def validate(self, where: str) -> None:
        from modalign.train.objectives import OBJECTIVES

        if self.name not in OBJECTIVES:
            raise ConfigError(f"{where}.name: expected one of {', '.join(OBJECTIVES)}, got {self.name!r}")
        allowed = OBJECTIVES[self.name].options
        for opt in ("answer_prior", "region", "qformer", "prefix_lm"):
            if getattr(self, opt) is not None and opt not in allowed:
                raise ConfigError(f"{where}.{opt}: not an option of the {self.name} objective")
        if self.answer_prior is not None:
            if self.answer_prior.weight < 0:
                raise ConfigError(
                    f"{where}.answer_prior.weight: expected a weight >= 0, got {self.answer_prior.weight}"
                )
            if self.answer_prior.min_count < 1:
                raise ConfigError(
                    f"{where}.answer_prior.min_count: expected a sample count >= 1, got {self.answer_prior.min_count}"
                )
        if self.qformer is not None:
            q = self.qformer
            for k in ("itc", "itm", "itg"):
                if getattr(q, k) < 0:
                    raise ConfigError(f"{where}.qformer.{k}: expected a weight >= 0, got {getattr(q, k)}")
            if not (q.itc or q.itm or q.itg):
                raise ConfigError(f"{where}.qformer: every loss has weight 0")
            if not 0 <= q.label_smoothing < 1:
                raise ConfigError(
                    f"{where}.qformer.label_smoothing: expected a value in [0, 1), got {q.label_smoothing}"
                )
        if self.region is not None:
            if self.region.weight < 0:
                raise ConfigError(f"{where}.region.weight: expected a weight >= 0, got {self.region.weight}")
            try:
                self.region.phrase.format(category="c", where="w")
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(
                    f"{where}.region.phrase: only {{category}} and {{where}} may be used ({e})"
                ) from None


@dataclass
class Checkpoints:
    every: int = 0  # optimizer steps between checkpoints (0: only at the end)
    keep_last: int = 2


@dataclass
class Stage:
    name: str
    data: StageData
    trainable: list[str]  # globs over parameter names; everything else is frozen ("!glob" excludes)
    stop: Stop
    optim: Optim = field(default_factory=Optim)
    objective: Objective = field(default_factory=Objective)
    precision: str = (
        "fp32"  # fp32 | bf16 (autocast) | bf16-pure (bf16 weights, fp32 masters): train/precision.py
    )
    gradient_checkpointing: bool = False
    compile: bool = False  # the LLM's forward through torch.compile (dynamic shapes) while the stage trains
    init_from: str | None = "previous"  # previous | none | a checkpoint directory
    enable: dict[str, Any] = field(default_factory=dict)  # parts added at this stage (e.g. lora: {...})
    checkpoints: Checkpoints = field(default_factory=Checkpoints)

    def validate(self, where: str) -> None:
        check_enable(self.enable, f"{where}.enable")
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name) \
                or self.name == "model":  # fmt: skip
            raise ConfigError(f"{where}.name: {self.name!r} is not a stage name (letters, digits, '_', '.', '-'; "
                              "not 'model', the run's final folder)")  # fmt: skip
        if self.precision not in ("fp32", "bf16", "bf16-pure"):
            raise ConfigError(f"{where}.precision: expected fp32, bf16 or bf16-pure, got {self.precision!r}")
        if not self.trainable:
            raise ConfigError(f"{where}.trainable: a stage needs at least one trainable pattern")
        self.data.validate(f"{where}.data")
        self.optim.validate(f"{where}.optim")
        self.stop.validate(f"{where}.stop")
        self.objective.validate(f"{where}.objective")
        if self.data.packing:
            if self.objective.name != "lm":
                raise ConfigError(f"{where}.data.packing: only the lm objective packs samples")
            if self.objective.answer_prior is not None and self.objective.answer_prior.weight:
                raise ConfigError(f"{where}.data.packing: the answer prior needs one sample a row")


# keys of the flat stage layout (before the sections) -> where they live now
MOVED = {
    **{k: f"optim.{k}" for k in ("lr", "lr_groups", "schedule", "weight_decay", "grad_accum", "clip", "dropout")},
    **{k: f"data.{k}" for k in ("template", "max_length", "batch_size", "samples", "group_by_length",
                                "group_by_modality", "bad_samples", "image_cache_mb", "token_cache_mb",
                                "feature_cache_mb")},  # fmt: skip
    "max_steps": "stop.max_steps", "epochs": "stop.epochs", "stop_at_loss": "stop.at_loss",
    "stop_window": "stop.window", "answer_prior": "objective.answer_prior.weight",
    "answer_prior_min_count": "objective.answer_prior.min_count",
    "region_contrastive": "objective.region.weight", "region_phrase": "objective.region.phrase",
    "save_every": "checkpoints.every", "keep_last": "checkpoints.keep_last",
}  # fmt: skip
REMOVED = ("stop_anneal", "whiten_vision_features", "eval_every", "log_every")


def _check_layout(stage: Any, where: str) -> None:
    """A clear error for a stage written in the old flat layout."""
    if not isinstance(stage, dict):
        return
    for key in stage:
        if key in MOVED:
            raise ConfigError(f"{where}.{key}: stage keys live in sections now; use {MOVED[key]} "
                              "(docs/recipes.md)")  # fmt: skip
        if key in REMOVED:
            raise ConfigError(f"{where}.{key}: this key was removed")
    if isinstance(stage.get("data"), list):
        raise ConfigError(
            f"{where}.data: a mapping now: data: {{sources: [...], template: ..., batch_size: ...}}"
        )


@dataclass
class ModelSpec:
    preset: str | None = None
    config: dict[str, Any] | None = None  # a full MLLMConfig dict (instead of a preset)
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the preset/config
    # part (llm | vision | connector | all) -> checkpoint (or [checkpoint, files laid over it])
    init: dict[str, str | list[str]] = field(default_factory=dict)
    tokenizer: str | None = None
    enable: dict[str, Any] = field(
        default_factory=dict
    )  # mam: true, plora: {...}, lora: {...}, adapter: {...}

    def build_config(self, read_init: bool = True) -> MLLMConfig:
        """The model's config: the preset (or ``config``), then the architecture of every part
        named in ``init`` read from its checkpoint (``read_init``), then ``overrides``."""
        if (self.preset is None) == (self.config is None):
            raise ConfigError("recipe.model: give exactly one of preset and config")
        base = MLLMConfig.from_name(self.preset).to_dict() if self.preset else copy.deepcopy(self.config)
        if read_init and self.init:
            from modalign.checkpoints.parts import merge_part_configs

            base = merge_part_configs(base, self.init)
        merged = _deep_merge(base, self.overrides)
        return MLLMConfig.from_dict(merged)


def part_config(name: str, value, where: str):
    """The config of a part a recipe switches on (``enable``: plora, lora, adapter), checked as its
    config class takes it; ``mam`` takes true or false and has none."""
    from modalign.config import AdapterConfig, LoRAConfig, PLoRAConfig

    parts = {"plora": PLoRAConfig, "lora": LoRAConfig, "adapter": AdapterConfig}
    if name == "mam":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return None
    if name not in parts:
        raise ConfigError(
            f"{where.rpartition('.')[0]}: unknown part {name!r}; known: mam, plora, lora, adapter"
        )
    return _build(parts[name], value or {}, where)


def check_enable(spec: dict, where: str) -> None:
    """The parts a recipe switches on, checked when it is read (not when their stage starts, after
    the stages before it have trained)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping of parts (mam, plora, lora, adapter)")
    for name, value in spec.items():
        part_config(name, value, f"{where}.{name}")


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
        self.model.build_config(read_init=False)
        check_enable(self.model.enable, "recipe.model.enable")
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


def find_recipe(name: str | Path, search: list[Path] | None = None) -> Path:
    """A recipe file: ``name`` itself, or ``<dir>/<name>.yaml`` in the search directories (the
    shipped recipes by default)."""
    path = Path(name)
    if path.is_file():
        return path
    dirs = [RECIPES_DIR, *(search or [])]
    for d in dirs:
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    names = ", ".join(sorted(p.stem for d in dirs for p in d.glob("*.yaml")))
    raise FileNotFoundError(f"no recipe file {name}; shipped recipes: {names}")


def load_recipe(
    source: str | Path | dict,
    variables: dict[str, str] | None = None,
    sets: list[str] | None = None,
    search: list[Path] | None = None,
) -> Recipe:
    """Read and validate a recipe: a path, the name of a shipped recipe (or of one in ``search``),
    or a dict."""
    if isinstance(source, dict):
        doc = source
    else:
        path = find_recipe(source, search)
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    doc = apply_overrides(doc, sets or [])
    doc = _substitute(doc, {"data": "data", "out": "runs", **(variables or {})})
    if isinstance(doc, dict) and isinstance(doc.get("stages"), list):
        for i, st in enumerate(doc["stages"]):
            _check_layout(st, f"recipe.stages[{i}]")
            if isinstance(st, dict) and isinstance(st.get("objective"), str):  # objective: lm
                st["objective"] = {"name": st["objective"]}
    recipe = _build(Recipe, doc, "recipe")
    recipe.validate()
    return recipe
