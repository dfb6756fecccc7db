"""The four seed methods in miniature (tiny-llava, tiny-mplug-owl, tiny-mplug-owl2,
tiny-xcomposer2): each recipe runs through the quickstart's method path for a few steps per stage,
and after each stage what it trains has moved. Three recipes keep the LLM's MLPs (or their LoRA)
frozen in the curriculum steps (``basic``, ``ground``) and train them in ``instruct``; XComposer2's
Partial LoRA trains everywhere (the rule was tried on it and lost, docs/experiments.md)."""

import pytest
import torch

from modalign import MLLM
from modalign.shapesworld.quickstart import METHODS, method_list
from tests.tiny import tiny_method

STAGES = ("align", "basic", "ground", "instruct")


def _is_mlp(name: str) -> bool:
    return ".mlp." in name


def _llm_part(method: str, name: str) -> bool:
    """The LLM parameters a method trains in stage 2: its adapters, or the LLM itself."""
    if method == "mplug-owl":
        return ".lora_" in name
    if method == "xcomposer2":
        return ".plora_" in name
    return name.startswith("llm.") and ".lora_" not in name and ".plora_" not in name


@pytest.mark.parametrize("method", method_list("seed"))
def test_seed_method_trains_what_its_recipe_says(method, stage0):
    assert METHODS[method] == f"tiny-{method}"
    res = tiny_method(method, stage0, STAGES)
    assert list(res["trainable_params"]) == list(STAGES)
    models = {s: MLLM.from_pretrained(stage0 / method / s / "model", dtype=torch.float32) for s in STAGES}
    after = {s: dict(m.named_parameters()) for s, m in models.items()}
    for stage, before in (("basic", "align"), ("ground", "basic"), ("instruct", "ground")):
        now, then = after[stage], after[before]
        # a parameter new in this stage (mPLUG-Owl's LoRA, enabled in ``basic``) has moved when its
        # zero-initialised B has; its randomly drawn A is left out
        moved = {
            n
            for n, p in now.items()
            if (not torch.equal(p, then[n]) if n in then else ".lora_B" in n and p.any())
        }
        llm = {n for n in now if _llm_part(method, n) and (n in then or ".lora_B" in n)}
        mlp, attn = {n for n in llm if _is_mlp(n)}, {n for n in llm if not _is_mlp(n)}
        assert mlp and attn, (method, stage)
        assert attn & moved, (method, stage)  # attention (or its adapters) trains in every step
        if stage == "instruct" or method == "xcomposer2":
            assert mlp & moved, (method, stage)
        else:
            assert not mlp & moved, (method, stage, sorted(mlp & moved)[:3])
        if method == "mplug-owl":  # the paper freezes the tower in stage 2
            assert not {n for n in moved if n.startswith("vision.")}, (method, stage)
        if method in ("mplug-owl", "xcomposer2"):  # the LLM itself stays frozen: only its adapters move
            assert all(_llm_part(method, n) for n in moved if n.startswith("llm.")), (method, stage)
    if method == "mplug-owl":  # LoRA's scale 8 with dropout (see the recipe)
        lin = models["basic"].llm.layers[0].self_attn.q_proj
        assert lin.lora_scaling == 8.0 and lin.lora_dropout.p == 0.1
