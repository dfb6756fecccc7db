"""``modalign quickstart``: train a complete miniature multimodal LLM on a laptop CPU.

ShapesWorld data -> BPE tokenizer -> stage 0 (LM on text; vision tower CLIP-style)
  -> the method's recipe (stage 1 + stage 2, frozen exactly as the paper says)
  -> held-out evaluation (per type, unseen colour-shape pairs), text perplexity before/after
  -> OUT/<method>/model, OUT/<method>/results.json, plots, a table
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
import yaml

from modalign.data.datasets import load_samples
from modalign.data.tokenizer import Tokenizer
from modalign.eval.perplexity import text_perplexity
from modalign.models.mllm import MLLM
from modalign.shapesworld import RECIPES
from modalign.shapesworld import data as shapes
from modalign.shapesworld.evaluate import evaluate_shapes, evaluate_text_qa
from modalign.train.recipe import apply_overrides, load_recipe
from modalign.train.run import run_recipe

METHODS = {"llava": "tiny-llava", "mplug-owl": "tiny-mplug-owl", "mplug-owl2": "tiny-mplug-owl2",
           "xcomposer2": "tiny-xcomposer2", "blip2": "tiny-blip2", "minigpt4": "tiny-minigpt4",
           "flamingo": "tiny-flamingo", "llama-adapter": "tiny-llama-adapter"}  # fmt: skip
log = logging.getLogger("modalign")


GROUPS = {"all": list(METHODS), "seed": ["llava", "mplug-owl", "mplug-owl2", "xcomposer2"],
          "survey": ["blip2", "minigpt4", "flamingo", "llama-adapter"]}  # fmt: skip


def method_list(method: str) -> list[str]:
    """``--method``: one name, several comma-separated, or a group (all, seed, survey)."""
    out: list[str] = []
    for name in (m.strip() for m in method.split(",")):
        for m in GROUPS.get(name, [name]):
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; known: {', '.join(METHODS)}, {', '.join(GROUPS)}")
            if m not in out:
                out.append(m)
    return out


def _data_is_current(data: Path) -> bool:
    """Whether ``data`` holds every file of a ShapesWorld data set written by this version."""
    if not all((data / name).is_file() for name in shapes.FILES):
        return False
    try:
        return json.loads((data / "meta.json").read_text()).get("version") == shapes.DATA_VERSION
    except ValueError:
        return False


def prepare_data(data: Path, scale: float = 1.0) -> bool:
    """Write ShapesWorld and train its tokenizer where ``data`` lacks them; returns whether it wrote
    the data set (absent, or written by an older version: then the tokenizer is trained anew too)."""
    wrote = not _data_is_current(data)
    if wrote:
        shutil.rmtree(data / "tokenizer", ignore_errors=True)
        shapes.generate(
            data, num_train=int(4000 * scale), num_eval=int(400 * scale), seed=0, num_text=int(4000 * scale)
        )
    if not (data / "tokenizer" / "tokenizer.json").is_file():
        texts = []
        for name in ("text.jsonl", "captions.json", "instruct.json", "text_instruct.json"):
            for s in load_samples(data / name):
                texts += [s.text] if hasattr(s, "text") else [m.content for m in s.messages]
        Tokenizer.train_bpe(texts, vocab_size=1024).save(data / "tokenizer")
    return wrote


def run_method(method: str, out: Path, variables: dict, sets: list[str], progress: bool,
               name: str | None = None, without: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """Train ``method``'s recipe into ``out / name`` (default: the method's name) and evaluate it.
    ``without``: stages left out of the recipe (e.g. a study's run without the alignment stage)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    t0 = time.perf_counter()
    doc = apply_overrides(yaml.safe_load((RECIPES / f"{METHODS[method]}.yaml").read_text()), sets)
    if without:
        names = [st["name"] for st in doc["stages"]]
        missing = [w for w in without if w not in names]
        if missing:
            raise ValueError(
                f"{method}: no stage named {', '.join(missing)} to leave out (stages: {', '.join(names)})"
            )
        doc["stages"] = [st for st in doc["stages"] if st["name"] not in without]
    recipe = load_recipe(doc, variables)
    mdir = out / (name or method)
    done = run_recipe(recipe, mdir, progress=progress)
    data, stage0 = Path(variables["data"]), Path(variables["stage0"])
    tok = Tokenizer.from_dir(mdir / "model")
    model = MLLM.from_pretrained(mdir / "model", dtype=torch.float32)
    template = recipe.stages[-1].data.template
    ev = evaluate_shapes(model, tok, data / "eval.json", template=template, progress=progress)
    base = MLLM.from_pretrained(stage0 / "model", dtype=torch.float32)
    before = text_perplexity(base, tok, data / "text_eval.jsonl")
    after = text_perplexity(model, tok, data / "text_eval.jsonl")
    qa_before = evaluate_text_qa(base, tok, data / "text_qa_eval.json", template)["accuracy"]
    qa_after = evaluate_text_qa(model, tok, data / "text_qa_eval.json", template)["accuracy"]
    trainable = _trainable_params(mdir, [st.name for st in recipe.stages])
    results = {
        "method": name or method,
        "heldout_accuracy": ev["accuracy"],
        "unseen_pairs_accuracy": ev["unseen_pairs_accuracy"],
        "accuracy_by_type": ev["accuracy_by_type"],
        "accuracy_by_type_seen_unseen": ev["accuracy_by_type_seen_unseen"],
        "position_parts": ev["position_parts"],
        "text_ppl_before": before,
        "text_ppl_after": after,
        "text_qa_before": qa_before,
        "text_qa_after": qa_after,
        "trainable_params": trainable,
        "stages": {
            st.name: {
                "steps": done[st.name].steps,
                "final_loss": done[st.name].final_loss,
                "stop_at_loss": st.stop.at_loss,
                "converged": done[st.name].converged,
            }
            for st in recipe.stages
        },
        "wall_seconds": time.perf_counter() - t0,
        "questions": ev["questions"],
        "recipe": METHODS[method],
    }
    (mdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with (mdir / "eval_samples.jsonl").open("w") as f:
        for s in ev["samples"]:
            f.write(json.dumps(s) + "\n")
    plot_accuracy(results, mdir / "accuracy_by_type.png")
    return results


def _trainable_params(mdir: Path, stages: list[str]) -> dict:
    """Trainable parameters per stage, in the recipe's stage order, from the tables the stages logged."""
    out = {}
    for name in stages:
        f = mdir / name / "trainable.json"
        if f.is_file():
            out[name] = json.loads(f.read_text())["trainable"]
    return out


def quickstart(method: str = "llava", out: str | Path = "runs/quickstart", scale: float = 1.0,
               sets: list[str] | None = None, progress: bool = True) -> list[dict]:  # fmt: skip
    t0 = time.perf_counter()
    methods = method_list(method)  # a wrong name fails before any training
    out = Path(out)
    data = out / "data"
    stale = [out / "stage0", *(out / m for m in METHODS)] if (data / "meta.json").is_file() else []
    if prepare_data(data, scale):
        for d in (d for d in stale if d.is_dir()):  # trained on the data set just replaced
            log.warning("%s was trained on an older ShapesWorld: removing it to train anew", d)
            shutil.rmtree(d)
    variables = {"data": str(data), "stage0": str(out / "stage0"), "out": str(out)}
    stage0 = load_recipe(
        RECIPES / "tiny-stage0.yaml",
        variables,
        [s[len("stage0.") :] for s in (sets or []) if s.startswith("stage0.")],
    )
    run_recipe(stage0, out / "stage0", progress=progress)
    method_sets = [s for s in (sets or []) if not s.startswith("stage0.")]
    results = [run_method(m, out, variables, method_sets, progress) for m in methods]
    total = time.perf_counter() - t0
    for r in results:
        r["total_wall_seconds"] = total
    print(format_results(results))
    if len(results) > 1:
        (out / "comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_results(results: list[dict]) -> str:
    types = sorted({t for r in results for t in r["accuracy_by_type"]})
    head = [
        "method",
        "held-out",
        "unseen pairs",
        *types,
        "text QA before",
        "after",
        "text ppl before",
        "after",
        "trainable (last stage)",
        "wall s",
    ]
    rows = []
    for r in results:
        last = list(r["trainable_params"].values())[-1] if r["trainable_params"] else 0
        unseen = r["unseen_pairs_accuracy"]
        rows.append([r["method"], f"{r['heldout_accuracy']:.1%}", "-" if unseen is None else f"{unseen:.1%}",
                     *(f"{r['accuracy_by_type'].get(t, 0):.0%}" for t in types), f"{r['text_qa_before']:.1%}",
                     f"{r['text_qa_after']:.1%}", f"{r['text_ppl_before']:.3f}",
                     f"{r['text_ppl_after']:.3f}", f"{last:,}", f"{r['wall_seconds']:.0f}"])  # fmt: skip
    return markdown_table(head, rows) + "".join(f"\n{line}" for line in unconverged_notes(results))


def unconverged_notes(results: list[dict]) -> list[str]:
    """One line per curriculum stage that ran to its cap without meeting its stop rule: such a
    run's result moves with float rounding, so it may differ on another CPU."""
    notes = []
    for r in results:
        for name, st in (r.get("stages") or {}).items():
            if st.get("converged") is False:
                notes.append(
                    f"note: {r['method']}'s {name} stage ran to its cap ({st['steps']} step{'s' * (st['steps'] != 1)}; last loss "
                    f"{st['final_loss']:.3f}, stop.at_loss {st['stop_at_loss']}) without the loss it stops at: "
                    "where such a run ends depends on float rounding (docs/shapesworld.md)"
                )
    return notes


def markdown_table(head: list[str], rows: list[list]) -> str:
    """A Markdown table with its columns padded to their widest cell."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def plot_accuracy(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = results["accuracy_by_type"]
    split = results.get("accuracy_by_type_seen_unseen") or {}
    fig, ax = plt.subplots(figsize=(7.6, 3.3), dpi=110)
    names = list(acc)
    x = range(len(names))
    w = 0.27
    ax.bar([i - w for i in x], [acc[k] for k in names], w, color="#4c72b0", label="all")
    for off, part, colour in ((0, "seen", "#8fb3d9"), (w, "unseen", "#dd8452")):
        vals = [(i + off, split[k][part]) for i, k in zip(x, names, strict=True) if part in split.get(k, {})]
        if vals:
            ax.bar(
                [v[0] for v in vals],
                [v[1] for v in vals],
                w,
                color=colour,
                label=f"{part} colour-shape pairs",
            )
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 1.05)
    ax.axhline(
        results["heldout_accuracy"],
        color="k",
        lw=0.8,
        ls="--",
        label=f"overall {results['heldout_accuracy']:.1%}",
    )
    ax.set_title(f"ShapesWorld held-out accuracy — {results['method']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)  # outside: no bar hidden
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
