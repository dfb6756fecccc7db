"""Training objectives, one module each, behind one registry (``Stage.objective.name``).

An objective turns a stage's model and data into the module the trainer optimises:
``setup(ctx) -> (module, dataset, collator)``, where ``module(batch) -> (loss, tokens)`` holds
the model's parts under their own names (and any heads the objective adds); ``prepare(module,
dataset)`` runs once the trainable parameters are set. ``heads`` names the parameters the
objective adds, which are not saved with the model.

    lm           next-token loss on supervised tokens (+ answer prior)          lm.py
    contrastive  CLIP-style image-text pretraining of the vision tower (+ regions) contrastive.py
    qformer      BLIP-2 stage 1: the Q-Former's itc + itm + itg on image-caption pairs qformer.py
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from modalign.train.objectives import contrastive, lm, qformer


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    options: tuple[str, ...]  # the Objective fields that apply (recipe validation)
    setup: Callable  # (StageContext) -> (module, dataset, collator)
    module: Callable  # (model, stage) -> the module alone (``--plan``: parameter counts)
    prepare: Callable | None = None  # (module, dataset), after the trainable set is applied
    heads: str | None = None  # name prefix of the parameters the objective adds (not saved)


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "lm": ObjectiveSpec("lm", ("answer_prior", "prefix_lm"), lm.setup, lm.module),
    "contrastive": ObjectiveSpec(
        "contrastive", ("region",), contrastive.setup, contrastive.module, contrastive.prepare, heads="clip_"
    ),
    "qformer": ObjectiveSpec("qformer", ("qformer",), qformer.setup, qformer.module),
}


def get(name: str) -> ObjectiveSpec:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
