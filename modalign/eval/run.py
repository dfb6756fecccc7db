"""``modalign eval``: read a benchmark's file (``eval/benchmarks``), prompt the model through the
batched engine, score, aggregate, and write ``samples.jsonl``, ``results.json``, ``report.md`` and
a per-category plot; ``compare`` prints several results side by side."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from modalign.data.conversation import BadSample
from modalign.data.datasets import BadSamplePolicy
from modalign.data.images import resolve_image_path
from modalign.eval import benchmarks, submission
from modalign.eval import metrics as M
from modalign.infer.chat import ChatModel, user_message


def _prompt_text(bench, rec: dict, options: dict | None = None) -> str:
    q = rec["question"]
    if options:
        q += "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())
    return q + bench.suffix


def evaluate(cm: ChatModel, task: str, data: Path, images: Path | None, out: Path, limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 32, circular: bool = False, bad_samples: str = "skip",
             progress: bool = True, judge=None, references: Path | None = None, judge_cache: Path | None = None) -> dict:  # fmt: skip
    bench = benchmarks.get(task)
    if bench.judge is not None and judge is None:
        raise ValueError(f"task {task} needs a judge: --judge-endpoint URL --judge-model NAME")
    data = Path(data)
    recs = bench.read(data, references)[:limit]
    root = Path(images) if images else (data if data.is_dir() else data.parent)
    policy = BadSamplePolicy(bad_samples, max_skip_fraction=1.0)
    params = cm.params(max_new_tokens=max_new_tokens)
    jobs = []  # (record, options or None, gold for this job)
    for r in recs:
        if circular and r.get("options"):
            jobs += [(r, o, g) for o, g in M.circular_options(r["options"], r["gold"])]
        else:
            jobs.append((r, r.get("options"), r["gold"]))
    samples, skipped = [], []
    bar = tqdm(total=len(jobs), desc=f"eval {task}", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(jobs), batch_size):
        chunk, prompts = [], []
        for r, opts, gold in jobs[s : s + batch_size]:
            text = _prompt_text(bench, r, opts)
            try:
                imgs = []
                if r.get("image") is not None:
                    src = (
                        r["image"]
                        if isinstance(r["image"], bytes)
                        else resolve_image_path(root, r["image"], str(r["id"]))
                    )
                    imgs = [src]
                prompts.append(cm.prompt([user_message(text, len(imgs))], imgs))
                chunk.append((r, opts, gold, text))
                policy.ok()
            except BadSample as e:
                policy.bad(e)
                skipped.append({"id": r["id"], "reason": e.reason, "message": str(e)})
        for (r, opts, gold, text), res in zip(
            chunk, cm.engine.generate(prompts, params) if prompts else [], strict=True
        ):
            samples.append({"id": r["id"], "category": r["category"], "prompt": text, "raw": res.text, "gold": gold}
                           | bench.score(r, opts, gold, res.text))  # fmt: skip
        bar.update(len(jobs[s : s + batch_size]))
    bar.close()
    if recs and not samples:  # a wrong --images, say: no score at all rather than one of 0
        reasons = ", ".join(f"{k}: {v}" for k, v in policy.skipped.items())
        raise ValueError(f"no {task} question could be asked: all {len(jobs)} skipped ({reasons}); first: "
                         f"{skipped[0]['message']}")  # fmt: skip
    judged = {}
    if bench.judge is not None:
        from modalign.eval.judge import JudgeCache

        cache = JudgeCache(judge_cache)
        rows = [{"id": s["id"], "question": s["prompt"], "answer": s["answer"], "reference": s["gold"],
                 "category": s["category"], "image_root": root} | s.get("judge_input", {}) for s in samples]  # fmt: skip
        rows, judged = bench.judge(rows, judge, cache)
        for s, row in zip(samples, rows, strict=True):
            s["judge_output"] = row["judge_output"]
            s["judge"] = row.get("scores") or row.get("grade")
        judged |= {"judge_model": judge.model, "judge_cache_hits": cache.hits, "judge_requests": judge.usage.requests,
                   "judge_retries": judge.usage.retries}  # fmt: skip
    results = aggregate(bench, samples, circular) | judged
    results |= {
        "task": task, "model": str(getattr(cm, "path", "")), "data": str(data),
        "data_sha256": _sha256(data), "prompt_version": f"{task}-{bench.prompt_version}",
        "generation": asdict(params), "samples": len(samples), "skipped": len(skipped),
        "skipped_by_reason": dict(policy.skipped),
    }  # fmt: skip
    write_outputs(out, samples, skipped, results)
    return results


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file() and f.suffix in (".txt", ".json", ".jsonl", ".tsv"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def aggregate(bench, samples: list[dict], circular: bool = False) -> dict:
    """Accuracy overall and per category (over scored samples), plus the benchmark's own metrics."""
    by_cat = defaultdict(list)
    for s in samples:
        if s["score"] is not None:
            by_cat[s["category"]].append(s["score"])
    res: dict = {"accuracy_by_category": {k: sum(v) / len(v) for k, v in sorted(by_cat.items())}}
    scored = [s["score"] for s in samples if s["score"] is not None]
    res["accuracy"] = sum(scored) / len(scored) if scored else None
    if bench.aggregate is not None:
        res |= bench.aggregate(samples, circular)
    return res


def write_outputs(out: Path, samples: list[dict], skipped: list[dict], results: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w") as f:
        for s in samples:
            f.write(json.dumps(s, default=str) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = [f"# {results['task']} evaluation", "", f"- data: `{results['data']}` (sha256 {results['data_sha256'][:12]})",
             f"- prompt version: {results['prompt_version']}", f"- samples: {results['samples']}, skipped: {results['skipped']}",
             ""]  # fmt: skip
    for k in ("accuracy", "circular_accuracy", "unseen_pairs_accuracy", "f1", "precision", "recall", "yes_ratio",
              "perception", "cognition", "bleu4", "cider", "relative_score"):  # fmt: skip
        if results.get(k) is not None:
            lines.append(f"- **{k}**: {results[k]:.4f}")
    if results["accuracy_by_category"]:
        lines += ["", "| category | accuracy |", "|---|---|"]
        lines += [f"| {k} | {v:.1%} |" for k, v in results["accuracy_by_category"].items()]
        lines += ["", "![accuracy by category](accuracy_by_category.png)"]
        _plot(results, out / "accuracy_by_category.png")
    bench = benchmarks.REGISTRY.get(results["task"])
    writer = submission.writer_for(bench) if bench is not None else None
    files = writer(out, samples, results) if writer is not None else []
    if files:
        lines += ["", "Leaderboard file(s): " + ", ".join(f"`{Path(f).relative_to(out)}`" for f in files)]
    if skipped:
        lines += [
            "",
            "## Skipped samples",
            *(f"- {s['id']}: [{s['reason']}] {s['message']}" for s in skipped),
        ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = results["accuracy_by_category"]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(cats) + 2), 3.2), dpi=110)
    ax.bar(list(cats), list(cats.values()), color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{results['task']} — accuracy by category")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def compare(paths: list[str]) -> str:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    keys = [k for k in ("accuracy", "circular_accuracy", "unseen_pairs_accuracy", "f1", "perception", "cognition",
                        "bleu4", "cider") if any(r.get(k) is not None for r in runs)]  # fmt: skip
    cats = sorted({c for r in runs for c in r.get("accuracy_by_category", {})})
    head = ["run", "task", *keys, *cats]
    rows = [[p, r["task"], *(f"{r[k]:.4f}" if r.get(k) is not None else "-" for k in keys),
             *(f"{r['accuracy_by_category'][c]:.1%}" if c in r.get("accuracy_by_category", {}) else "-" for c in cats)]
            for p, r in zip(paths, runs, strict=True)]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join(
        [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(fmt(r) for r in rows)]
    )
