"""The survey's other designs in miniature (tiny-blip2, tiny-minigpt4, tiny-flamingo,
tiny-llama-adapter): each recipe runs through the quickstart's method path for a few steps per
stage, and what its paper keeps frozen is bit-identical to where it started."""

import json

import pytest
import torch

from modalign import MLLM
from modalign.shapesworld.quickstart import METHODS
from tests.tiny import tiny_method

NEW = ("blip2", "minigpt4", "flamingo", "llama-adapter")
STAGES = ("qformer", "align", "basic", "ground", "instruct")


def _frozen(method: str, name: str) -> bool:
    """Whether the method's paper never trains stage 0's parameter ``name``: the tower and the
    whole LLM (LLaMA-Adapter V2 tunes the LLM's norms)."""
    if method == "llama-adapter" and name.startswith("llm.") and "norm" in name:
        return False
    return name.startswith(("vision.", "llm."))


@pytest.mark.parametrize("method", NEW)
def test_method_runs_in_miniature_with_its_papers_freezing(method, stage0):
    assert METHODS[method] == f"tiny-{method}"
    stages = [s for s in STAGES if s != "qformer" or method in ("blip2", "minigpt4")]
    res = tiny_method(method, stage0, stages)
    out = stage0 / method
    assert json.loads((out / "results.json").read_text())["method"] == method
    assert list(res["trainable_params"]) == stages and 0 <= res["heldout_accuracy"] <= 1  # the recipe's order
    model = MLLM.from_pretrained(out / "model", dtype=torch.float32)
    base = dict(MLLM.from_pretrained(stage0 / "stage0" / "model", dtype=torch.float32).named_parameters())
    for name, p in model.named_parameters():
        if name in base and _frozen(method, name):
            assert torch.equal(p, base[name]), name
    if method == "minigpt4":  # after BLIP-2's stage 1, only the projection into the LLM trains
        q = dict(MLLM.from_pretrained(out / "qformer" / "model", dtype=torch.float32).named_parameters())
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, q[n])}
        assert changed == {"connector.language_projection.weight", "connector.language_projection.bias"}
    if method == "flamingo":
        assert model.config.fusion == "cross_attention"
        gates = [la.gated_cross_attn.attn_gate for la in model.llm.layers if la.gated_cross_attn is not None]
        assert len(gates) == 2 and all(g.abs().item() > 0 for g in gates)  # the gates opened
    if method == "llama-adapter":
        assert model.config.fusion == "adapter" and model.config.llm.adapter.bias_tuning


def test_method_names_and_groups():
    from modalign.shapesworld.quickstart import method_list

    assert method_list("all") == list(METHODS) and len(METHODS) == 8
    assert method_list("seed") == ["llava", "mplug-owl", "mplug-owl2", "xcomposer2"]
    assert method_list("survey") == list(NEW)
    assert method_list("llava, blip2,llava") == ["llava", "blip2"]
    with pytest.raises(ValueError, match=r"unknown method 'blip3'; known: llava, .*, all, seed, survey"):
        method_list("llava,blip3")
