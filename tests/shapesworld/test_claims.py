"""``modalign quickstart --study claims`` in miniature: the variants differ from their method's
recipe exactly as the claim says, Partial LoRA's claim holds even after one step a stage (text-only
perplexity unchanged to the last digit, where LoRA on all tokens and full fine-tuning move it),
and the verdicts follow the per-seed results."""

from __future__ import annotations

import json

import pytest

from modalign.cli import main
from modalign.shapesworld.claims import CLAIMS, Claim, Variant, claim_list, summarise

SETS = [f"stage0.stages.{s}.stop.max_steps=2" for s in ("lm", "clip", "chat")] + [
    f"stages.{s}.stop.max_steps=1" for s in ("align", "basic", "ground", "instruct")
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    args = ["quickstart", "--study", "claims", "--claims", "llava-align,xc2-plora", "--seeds", "0", "--scale",
            "0.02", "--out", str(out), "--no-progress", *(x for s in SETS for x in ("--set", s))]  # fmt: skip
    assert main(args) == 0
    return out, json.loads((out / "claims.json").read_text())


def test_the_study_runs_each_variant_as_its_claim_describes(study):
    out, report = study
    assert set(report["runs"]) == {
        "llava",
        "llava-no-align",
        "xcomposer2",
        "xcomposer2-lora",
        "xcomposer2-full",
    }
    run = out / "seed0"
    assert (run / "llava" / "align").is_dir() and not (run / "llava-no-align" / "align").exists()
    stages = json.loads((run / "llava-no-align" / "resolved_recipe.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["basic", "ground", "instruct"]
    cfg = {v: json.loads((run / v / "model" / "config.json").read_text())["modalign"] for v in report["runs"]}
    llm = {v: c["llm"] for v, c in cfg.items()}
    assert llm["xcomposer2"]["plora"] and not llm["xcomposer2"].get("lora")
    assert llm["xcomposer2-lora"]["lora"] and not llm["xcomposer2-lora"].get("plora")
    assert not llm["xcomposer2-full"].get("lora") and not llm["xcomposer2-full"].get("plora")
    # Partial LoRA leaves text-only inputs on the untouched LLM: perplexity exactly as before;
    # LoRA on every token and full fine-tuning change it
    r = {v: runs["0"] for v, runs in report["runs"].items()}
    assert r["xcomposer2"]["text_ppl_after"] == r["xcomposer2"]["text_ppl_before"]
    for v in ("xcomposer2-lora", "xcomposer2-full"):
        assert r[v]["text_ppl_after"] != r[v]["text_ppl_before"]
    full = r["xcomposer2-full"]["trainable_params"]["instruct"]
    assert full > r["xcomposer2"]["trainable_params"]["instruct"]
    verdicts = {c["id"]: c["verdict"] for c in report["claims"]}
    assert verdicts["xc2-plora"] == "holds in miniature"
    text = (out / "claims.md").read_text()
    assert "**holds in miniature**" in text and "| xc2-plora   | xcomposer2-full" in text
    # one step cannot meet the curriculum stages' stop rules: each run's basic and ground say so
    notes = [line for line in text.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2 * len(report["runs"])
    assert "note: llava-no-align (seed 0)'s basic stage ran to its cap (1 step; last loss" in text
    assert (out / "claims_accuracy.png").stat().st_size > 10_000
    assert (out / "claims_text_vs_image.png").stat().st_size > 10_000


def _runs(a: dict[str, list[float]]) -> dict:
    return {v: {str(s): {"heldout_accuracy": x} for s, x in enumerate(xs)} for v, xs in a.items()}


def test_verdicts_follow_every_seed():
    claim = Claim("c", "P", "ours wins", [Variant("ours", "llava"), Variant("a", "llava"), Variant("b", "llava")],
                  [("heldout_accuracy", "higher")])  # fmt: skip
    assert summarise(claim, _runs({"ours": [0.9, 0.8], "a": [0.5, 0.7], "b": [0.1, 0.2]}))["verdict"] == (
        "holds in miniature"
    )
    # it must beat every alternative on a seed: losing to one on one seed makes it mixed
    res = summarise(claim, _runs({"ours": [0.9, 0.8], "a": [0.5, 0.85], "b": [0.1, 0.2]}))
    assert res["verdict"] == "mixed (1 of 2 seeds)"
    assert res["per_metric"]["heldout_accuracy"]["wins_per_seed"] == {"0": True, "1": False}
    assert summarise(claim, _runs({"ours": [0.5, 0.5], "a": [0.5, 0.6], "b": [0.1, 0.2]}))["verdict"] == (
        "does not hold"
    )  # a tie is not a win


def test_claim_names_are_checked_before_training():
    assert [c.id for c in claim_list(None)] == [c.id for c in CLAIMS]
    with pytest.raises(ValueError, match="unknown nope"):
        claim_list("llava-align,nope")
    # every variant's recipe changes load (sets and stages left out name what the recipes have)
    import yaml

    from modalign.shapesworld import RECIPES
    from modalign.shapesworld.quickstart import METHODS
    from modalign.train.recipe import apply_overrides, load_recipe

    for c in CLAIMS:
        for v in c.variants:
            doc = apply_overrides(yaml.safe_load((RECIPES / f"{METHODS[v.method]}.yaml").read_text()), v.sets)
            names = [s["name"] for s in doc["stages"]]
            assert set(v.without) <= set(names)
            doc["stages"] = [s for s in doc["stages"] if s["name"] not in v.without]
            load_recipe(doc, {"data": "d", "stage0": "s", "out": "o"})


def test_a_claim_on_two_metrics_can_hold_on_one_only():
    claim = Claim("t", "P", "text kept", [Variant("ours", "mplug-owl"), Variant("a", "mplug-owl")],
                  [("text_qa_after", "higher"), ("text_ppl_after", "lower")])  # fmt: skip
    runs = {"ours": {"0": {"text_qa_after": 0.44, "text_ppl_after": 2.87}},
            "a": {"0": {"text_qa_after": 0.31, "text_ppl_after": 2.62}}}  # fmt: skip
    assert summarise(claim, runs)["verdict"] == (
        "partly: text_qa_after (higher) holds in miniature; text_ppl_after (lower) does not hold"
    )
