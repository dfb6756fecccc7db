"""``modalign quickstart --study claims``: each seed paper's central claim measured in miniature.

A claim compares the paper's choice (its first variant) with what the paper argues against (the
others), on the same data, stage-0 parts and budget, over several stage-0 seeds:

    for each seed: stage 0 (seed s) -> every variant's recipe -> held-out and text evaluations
    -> claims.json, claims.md (means and ranges, a verdict per claim), two plots

A variant is a method's miniature recipe with ``--set`` overrides and stages left out. A verdict
is "holds in miniature" when the paper's choice wins on every seed, "does not hold" when it wins
on none, and "mixed" otherwise, for each metric the claim names ("partly" when the metrics
disagree); a claim that text ability is kept exactly holds when the text perplexity after training
equals the one before to the last digit, on every seed.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from modalign.shapesworld import RECIPES
from modalign.shapesworld.quickstart import markdown_table, prepare_data, run_method, unconverged_notes
from modalign.train.recipe import load_recipe
from modalign.train.run import run_recipe

log = logging.getLogger("modalign")

LORA = "{rank: 32, alpha: 32, dropout: 0.1, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}"
XC2_STAGES = ("align", "basic", "ground", "instruct")


@dataclass
class Variant:
    name: str  # the run's folder and row label
    method: str  # the quickstart method whose recipe it starts from
    sets: list[str] = field(default_factory=list)
    without: tuple[str, ...] = ()  # stages left out


@dataclass
class Claim:
    id: str
    paper: str
    claim: str
    variants: list[Variant]  # the paper's choice first
    metrics: list[tuple[str, str]]  # (results key, "higher" | "lower" | "unchanged")


CLAIMS = [
    Claim("llava-align", "LLaVA", "a feature-alignment stage (the projector on captions) before instruction tuning helps",
          [Variant("llava", "llava"), Variant("llava-no-align", "llava", without=("align",))],
          [("heldout_accuracy", "higher")]),
    Claim("llava-mlp", "LLaVA-1.5", "a two-layer MLP projector beats a linear one",
          [Variant("llava", "llava"), Variant("llava-linear", "llava", ["model.overrides={connector: {type: linear}}"])],
          [("heldout_accuracy", "higher")]),
    Claim("owl-text", "mPLUG-Owl", "text-only instructions beside the multimodal ones in stage 2 keep the LLM's text ability",
          [Variant("mplug-owl", "mplug-owl"),
           Variant("mplug-owl-no-text", "mplug-owl", ['stages.instruct.data.sources=[{path: "${data}/instruct.json"}]'])],
          [("text_qa_after", "higher"), ("text_ppl_after", "lower")]),
    Claim("owl2-mam", "mPLUG-Owl2", "the Modality-Adaptive Module beats shared weights, for images and for text",
          [Variant("mplug-owl2", "mplug-owl2"),
           Variant("mplug-owl2-shared", "mplug-owl2", ["model.enable={}", "stages.align.trainable=[vision.*, connector.*]"])],
          [("heldout_accuracy", "higher"), ("text_qa_after", "higher")]),
    Claim("xc2-plora", "InternLM-XComposer2", "Partial LoRA keeps text ability exactly; LoRA on all tokens and full fine-tuning do not",
          [Variant("xcomposer2", "xcomposer2"),
           Variant("xcomposer2-lora", "xcomposer2", [f"model.enable={{lora: {LORA}}}"] + [
               f'stages.{s}.trainable=[vision.*, connector.*, "llm.**.lora_*"]' for s in XC2_STAGES]),
           Variant("xcomposer2-full", "xcomposer2", ["model.enable={}"] + [
               f"stages.{s}.trainable=[vision.*, connector.*, llm.*]" for s in XC2_STAGES])],
          [("text_ppl_after", "unchanged")]),
]  # fmt: skip


def claim_list(only: str | None) -> list[Claim]:
    if not only:
        return CLAIMS
    ids = [x.strip() for x in only.split(",") if x.strip()]
    known = {c.id: c for c in CLAIMS}
    bad = [i for i in ids if i not in known]
    if bad:
        raise ValueError(f"--claims: unknown {', '.join(bad)}; known: {', '.join(known)}")
    return [known[i] for i in ids]


def run_claims(out: str | Path = "runs/claims", seeds: list[int] | tuple[int, ...] = (0, 1, 2), scale: float = 1.0,
               sets: list[str] | None = None, only: str | None = None, progress: bool = True) -> dict:  # fmt: skip
    """Every variant of the chosen claims on every stage-0 seed; writes ``claims.json``,
    ``claims.md``, ``claims_accuracy.png`` and ``claims_text_vs_image.png`` in ``out``."""
    claims = claim_list(only)  # a wrong name fails before any training
    if not seeds:
        raise ValueError("--seeds: at least one stage-0 seed is needed")
    out, sets = Path(out), list(sets or [])
    data = out / "data"
    prepare_data(data, scale)
    stage0_sets = [s[len("stage0.") :] for s in sets if s.startswith("stage0.")]
    method_sets = [s for s in sets if not s.startswith("stage0.")]
    runs: dict[str, dict[str, dict]] = {}  # variant -> seed -> results
    t0 = time.perf_counter()
    for seed in seeds:
        sdir = out / f"seed{seed}"
        variables = {"data": str(data), "stage0": str(sdir / "stage0"), "out": str(sdir)}
        stage0 = load_recipe(RECIPES / "tiny-stage0.yaml", variables, [*stage0_sets, f"seed={seed}"])
        run_recipe(stage0, sdir / "stage0", progress=progress)
        done: set[str] = set()
        for claim in claims:
            for v in claim.variants:
                if v.name in done:  # a variant two claims share (llava) runs once per seed
                    continue
                done.add(v.name)
                cached = sdir / v.name / "results.json"
                if cached.is_file():  # a finished run (resume after an interruption)
                    res = json.loads(cached.read_text())
                else:
                    res = run_method(v.method, sdir, variables, [*method_sets, *v.sets], progress, name=v.name,
                                     without=v.without)  # fmt: skip
                res = {k: res[k] for k in res if k not in ("questions",)}
                runs.setdefault(v.name, {})[str(seed)] = res
    report = {"seeds": list(seeds), "scale": scale, "sets": sets, "wall_seconds": time.perf_counter() - t0,
              "claims": [summarise(c, runs) for c in claims], "runs": runs}  # fmt: skip
    (out / "claims.json").write_text(json.dumps(report, indent=2) + "\n")
    table = format_claims(report)
    notes = unconverged_notes(
        [
            {**r, "method": f"{name} (seed {seed})"}
            for name, by_seed in runs.items()
            for seed, r in by_seed.items()
        ]
    )
    table += "".join(f"\n{line}" for line in notes)
    (out / "claims.md").write_text(table + "\n")
    plot_claims(report, out / "claims_accuracy.png", out / "claims_text_vs_image.png")
    print(table)
    return report


def summarise(claim: Claim, runs: dict[str, dict[str, dict]]) -> dict:
    """The claim's verdict from its variants' per-seed results: per metric, then overall."""
    ours, others = claim.variants[0].name, [v.name for v in claim.variants[1:]]
    seeds = sorted(runs[ours])
    per_metric = {}
    for key, how in claim.metrics:
        wins = []  # per seed: whether the paper's choice beat every other variant on this metric
        for s in seeds:
            a = runs[ours][s][key]
            ok = True
            for o in others:
                b = runs[o][s][key]
                if how == "higher":
                    ok &= a > b
                elif how == "lower":
                    ok &= a < b
                else:  # unchanged: ours kept it exactly, the others did not
                    base = key.replace("_after", "_before")
                    ok &= a == runs[ours][s][base] and b != runs[o][s][base]
            wins.append(bool(ok))
        per_metric[key] = {"how": how, "wins_per_seed": dict(zip(seeds, wins, strict=True)),
                           "verdict": _verdict(wins)}  # fmt: skip
    verdicts = {m["verdict"] for m in per_metric.values()}
    if len(verdicts) == 1:
        verdict = verdicts.pop()
    else:
        verdict = "partly: " + "; ".join(f"{k} ({m['how']}) {m['verdict']}" for k, m in per_metric.items())
    return {"id": claim.id, "paper": claim.paper, "claim": claim.claim, "variants": [v.name for v in claim.variants],
            "metrics": claim.metrics, "per_metric": per_metric, "verdict": verdict}  # fmt: skip


def _verdict(wins: list[bool]) -> str:
    n = sum(wins)
    return (
        "holds in miniature"
        if n == len(wins)
        else "does not hold"
        if n == 0
        else f"mixed ({n} of {len(wins)} seeds)"
    )


def _mean_range(vals: list[float], pct: bool = True) -> str:
    f = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:.3f}")  # noqa: E731
    if len(vals) == 1:
        return f(vals[0])
    return f"{f(statistics.mean(vals))} ({f(min(vals))}-{f(max(vals))})"


def format_claims(report: dict) -> str:
    runs = report["runs"]
    types = sorted({t for v in runs.values() for r in v.values() for t in r["accuracy_by_type"]})
    verdicts = [f"- **{c['paper']}**: {c['claim']}: **{c['verdict']}** ({', '.join(c['variants'])}; "
                f"compared on {', '.join(f'{k} {h}' for k, h in c['metrics'])})" for c in report["claims"]]  # fmt: skip
    head = ["claim", "variant", "held-out", "unseen pairs", *types, "text QA before", "after", "text ppl before",
            "after", "trainable (last stage)", "wall s"]  # fmt: skip
    rows = []
    for c in report["claims"]:
        for name in c["variants"]:
            rs = list(runs[name].values())

            def col(key, pct=True, rs=rs):
                vals = [r[key] for r in rs if r.get(key) is not None]
                return _mean_range(vals, pct) if vals else "-"

            last = list(rs[0]["trainable_params"].values())[-1] if rs[0]["trainable_params"] else 0
            rows.append([c["id"], name, col("heldout_accuracy"), col("unseen_pairs_accuracy"),
                         *(_mean_range([r["accuracy_by_type"].get(t, 0.0) for r in rs]) for t in types),
                         col("text_qa_before"), col("text_qa_after"), col("text_ppl_before", False),
                         col("text_ppl_after", False), f"{last:,}",
                         f"{statistics.mean(r['wall_seconds'] for r in rs):.0f}"])  # fmt: skip
    seeds = ", ".join(str(s) for s in report["seeds"])
    return "\n".join([f"Stage-0 seeds {seeds}: mean (range) over the seeds.", "", *verdicts, "",
                      markdown_table(head, rows)])  # fmt: skip


def plot_claims(report: dict, accuracy_png: Path, scatter_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    names = list(runs)
    types = sorted({t for v in runs.values() for r in v.values() for t in r["accuracy_by_type"]})
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(types) + 0.25 * len(names)), 3.6), dpi=110)
    w = 0.8 / len(names)
    cmap = plt.get_cmap("tab10")
    for j, name in enumerate(names):
        rs = list(runs[name].values())
        means = [statistics.mean(r["accuracy_by_type"].get(t, 0.0) for r in rs) for t in types]
        ax.bar([i - 0.4 + w * (j + 0.5) for i in range(len(types))], means, w, color=cmap(j % 10), label=name)
    ax.set_xticks(range(len(types)), types)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(
        f"Claims in miniature: accuracy per question type (mean over {len(report['seeds'])} seed(s))"
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(accuracy_png)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for j, name in enumerate(names):
        rs = list(runs[name].values())
        xs, ys = [r["heldout_accuracy"] for r in rs], [r["text_qa_after"] for r in rs]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        ax.errorbar(mx, my, xerr=[[mx - min(xs)], [max(xs) - mx]], yerr=[[my - min(ys)], [max(ys) - my]],
                    fmt="o", color=cmap(j % 10), capsize=3, label=name)  # fmt: skip
    before = [r["text_qa_before"] for v in runs.values() for r in v.values()]
    ax.axhline(statistics.mean(before), color="k", lw=0.8, ls="--", label="text QA of the LLM before")
    ax.set_xlabel("image ability: held-out accuracy")
    ax.set_ylabel("text ability: text QA accuracy after")
    ax.set_title("Text ability against image ability (one point per variant)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(scatter_png)
    plt.close(fig)
