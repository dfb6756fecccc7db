"""Evaluation tasks: read a benchmark's public file format, prompt the model (batched engine),
extract answers, score, and write ``samples.jsonl``, ``results.json`` and a report.

Formats (users bring the files; fixtures in tests use the same formats):
- ``shapes``: ShapesWorld ``eval.json`` (built in).
- ``vqa``: VQAv2's questions JSON with ``--references`` annotations JSON (COCO image names), or a
  JSON list of ``{"question_id"|"id", "image", "question", "answers": [10 strings]}``.
- ``exact``: JSON list of ``{"id", "image", "question", "answer"}`` (TextVQA/GQA style).
- ``mc``: ScienceQA's ``problems.json`` (images at ``<split>/<id>/<image>``), a JSON list of
  ``{"id", "image", "question", "choices": [...], "answer": index}``,
  or an MMBench ``.tsv`` (``index, question, A..D, answer, category, image`` base64); ``--circular``
  runs MMBench's circular evaluation.
- ``pope``: JSONL ``{"question_id", "image", "text", "label": yes|no}``.
- ``mme``: the MME release folder (``<subtask>/images`` + ``questions_answers_YN/*.txt``), or JSONL
  ``{"subtask", "image", "question", "answer": Yes|No}``.
- ``caption``: COCO captions annotations JSON, or a JSON list of ``{"id", "image", "captions": [...]}``
  (BLEU-4, CIDEr-D).
- ``llava-bench``: questions JSONL ``{"question_id", "image", "text", "category"}`` + ``--references``
  answers JSONL; ``owleval``: ``{"id", "image", "question"}``. Both need a judge endpoint.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from modalign.chat import ChatModel, user_message
from modalign.data.conversation import BadSample
from modalign.data.datasets import BadSamplePolicy
from modalign.data.images import resolve_image_path
from modalign.eval import metrics as M
from modalign.eval.shapes import heldout_question, normalize_answer, position_parts

PROMPT_VERSION = "v1"
TASKS = ("shapes", "vqa", "exact", "mc", "pope", "mme", "caption", "llava-bench", "owleval")
JUDGED = ("llava-bench", "owleval")
SUFFIX = {
    "vqa": "\nAnswer the question using a single word or phrase.",
    "exact": "\nAnswer the question using a single word or phrase.",
    "mc": "\nAnswer with the option's letter from the given choices directly.",
    "pope": "\nAnswer yes or no.",
    "mme": "\nPlease answer yes or no.",
    "caption": "\nDescribe the image briefly.",
    "shapes": "",
    "llava-bench": "",
    "owleval": "",
}


def _need(rec: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")


def read_records(task: str, path: Path, references: Path | None = None) -> list[dict]:
    """Task file -> records {id, image, prompt, gold, category, ...}; errors name the record."""
    if task == "mc" and path.suffix == ".tsv":
        return _mmbench(path)
    if task == "mme" and path.is_dir():
        return _mme_dir(path)
    if path.suffix != ".jsonl":
        doc = json.loads(path.read_text())
        if task == "vqa" and isinstance(doc, dict) and "questions" in doc:
            return _vqa_official(path, doc, references)
        if task == "mc" and isinstance(doc, dict):  # ScienceQA problems.json: {id: problem}
            return _scienceqa(path, doc)
        if task == "caption" and isinstance(doc, dict) and "annotations" in doc:
            return _coco_captions(path, doc)
    if path.suffix == ".jsonl":
        rows = [
            (f"{path.name}:{n}", json.loads(line))
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if line.strip()
        ]
    else:
        data = json.loads(path.read_text())
        rows = [(f"{path.name} record {i}", r) for i, r in enumerate(data)]
    out = []
    for where, r in rows:
        if task == "shapes":
            _need(r, ("id", "image", "conversations", "answer", "type"), where)
            out.append({"id": r["id"], "image": r["image"], "question": heldout_question(r), "gold": r["answer"], "category": r["type"],
                        "unseen": r.get("unseen", False)})  # fmt: skip
        elif task == "vqa":
            _need(r, ("image", "question", "answers"), where)
            ans = [a["answer"] if isinstance(a, dict) else a for a in r["answers"]]
            out.append({"id": r.get("question_id", r.get("id")), "image": r["image"], "question": r["question"],
                        "gold": ans, "category": r.get("answer_type", "all")})  # fmt: skip
        elif task == "exact":
            _need(r, ("image", "question", "answer"), where)
            out.append({"id": r.get("id"), "image": r["image"], "question": r["question"], "gold": r["answer"],
                        "category": r.get("category", "all")})  # fmt: skip
        elif task == "mc":
            _need(r, ("question", "choices", "answer"), where)
            letters = [chr(65 + i) for i in range(len(r["choices"]))]
            if not isinstance(r["answer"], int) or not 0 <= r["answer"] < len(letters):
                raise ValueError(
                    f"{where}: answer {r['answer']!r} is not an index into its {len(letters)} choices"
                )
            out.append({"id": r.get("id"), "image": r.get("image"), "question": r["question"],
                        "options": dict(zip(letters, r["choices"], strict=True)), "gold": letters[r["answer"]],
                        "category": r.get("subject", r.get("category", "all"))})  # fmt: skip
        elif task == "pope":
            _need(r, ("image", "text", "label"), where)
            if r["label"] not in ("yes", "no"):
                raise ValueError(f"{where}: label {r['label']!r} is not yes/no")
            out.append({"id": r.get("question_id"), "image": r["image"], "question": r["text"], "gold": r["label"],
                        "category": r.get("category", "all")})  # fmt: skip
        elif task == "mme":
            _need(r, ("subtask", "image", "question", "answer"), where)
            if r["answer"].lower() not in ("yes", "no"):
                raise ValueError(f"{where}: answer {r['answer']!r} is not Yes/No")
            out.append({"id": f"{r['subtask']}/{r['image']}/{r['question'][:20]}", "image": r["image"],
                        "question": r["question"], "gold": r["answer"], "category": r["subtask"]})  # fmt: skip
        elif task == "llava-bench":
            _need(r, ("question_id", "image", "text"), where)
            out.append({"id": r["question_id"], "image": r["image"], "question": r["text"], "gold": None,
                        "category": r.get("category", "all")})  # fmt: skip
        elif task == "owleval":
            _need(r, ("image", "question"), where)
            out.append({"id": r.get("id", r.get("question_id")), "image": r["image"], "question": r["question"],
                        "gold": None, "category": r.get("category", "all")})  # fmt: skip
        elif task == "caption":
            _need(r, ("image", "captions"), where)
            out.append(
                {
                    "id": r.get("id"),
                    "image": r["image"],
                    "question": "",
                    "gold": r["captions"],
                    "category": "all",
                }
            )
        else:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return out


def _vqa_official(path: Path, doc: dict, references: Path | None) -> list[dict]:
    """VQAv2 questions JSON + annotations JSON (``--references``); COCO image names."""
    if references is None:
        raise ValueError(f"{path.name} holds VQA questions only; pass the annotations file with --references")
    anns = {a["question_id"]: a for a in json.loads(Path(references).read_text())["annotations"]}
    split = doc.get("data_subtype", "val2014")
    out = []
    for i, q in enumerate(doc["questions"]):
        _need(q, ("image_id", "question", "question_id"), f"{path.name} question {i}")
        a = anns.get(q["question_id"])
        if a is None:
            raise ValueError(f"{Path(references).name}: no annotation for question_id {q['question_id']}")
        out.append({"id": q["question_id"], "image": f"COCO_{split}_{q['image_id']:012d}.jpg", "question": q["question"],
                    "gold": [x["answer"] for x in a["answers"]], "category": a.get("answer_type", "all")})  # fmt: skip
    return out


def _scienceqa(path: Path, doc: dict) -> list[dict]:
    """ScienceQA ``problems.json``; images at ``<split>/<id>/<image>``; text-only problems skipped."""
    out = []
    for pid, p in doc.items():
        _need(p, ("question", "choices", "answer"), f"{path.name} problem {pid}")
        if not p.get("image"):
            continue
        letters = [chr(65 + i) for i in range(len(p["choices"]))]
        if not isinstance(p["answer"], int) or not 0 <= p["answer"] < len(letters):
            raise ValueError(
                f"{path.name} problem {pid}: answer {p['answer']!r} is not an index into its choices"
            )
        q = (f"Context: {p['hint']}\n" if p.get("hint") else "") + p["question"]
        out.append({"id": pid, "image": f"{p.get('split', 'test')}/{pid}/{p['image']}", "question": q,
                    "options": dict(zip(letters, p["choices"], strict=True)), "gold": letters[p["answer"]],
                    "category": p.get("subject", "all")})  # fmt: skip
    return out


def _coco_captions(path: Path, doc: dict) -> list[dict]:
    files = {im["id"]: im["file_name"] for im in doc.get("images", [])}
    caps = defaultdict(list)
    for a in doc["annotations"]:
        caps[a["image_id"]].append(a["caption"])
    return [{"id": i, "image": files.get(i, f"{i}.jpg"), "question": "", "gold": c, "category": "all"}
            for i, c in caps.items()]  # fmt: skip


def _mme_dir(root: Path) -> list[dict]:
    """MME release layout: ``<subtask>/images/*`` + ``<subtask>/questions_answers_YN/*.txt``, or
    image files beside same-named ``.txt`` files; each txt line is ``question<TAB>answer``."""
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        qa = sub / "questions_answers_YN"
        txts = sorted(qa.glob("*.txt")) if qa.is_dir() else sorted(sub.glob("*.txt"))
        img_dir = sub / "images" if (sub / "images").is_dir() else sub
        for t in txts:
            img = next(
                (p for p in img_dir.glob(t.stem + ".*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")),
                None,
            )
            if img is None:
                raise ValueError(f"{t}: no image named {t.stem}.* in {img_dir}")
            for n, line in enumerate(t.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                q, _, a = line.rpartition("\t")
                if a.strip().lower() not in ("yes", "no"):
                    raise ValueError(f"{t}:{n}: answer {a.strip()!r} is not Yes/No")
                out.append({"id": f"{sub.name}/{t.stem}/{n}", "image": str(img.relative_to(root)), "question": q.strip(),
                            "gold": a.strip(), "category": sub.name})  # fmt: skip
    return out


def _mmbench(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)
    out = []
    with path.open(newline="") as f:
        for n, r in enumerate(csv.DictReader(f, delimiter="\t"), 2):
            _need(r, ("index", "question", "A", "B", "answer"), f"{path.name}:{n}")
            opts = {k: r[k] for k in "ABCDEF" if r.get(k)}
            if r["answer"] not in opts:
                raise ValueError(
                    f"{path.name}:{n}: answer key {r['answer']!r} is not one of the options {sorted(opts)}"
                )
            img = base64.b64decode(r["image"]) if r.get("image") else None
            out.append({"id": r["index"], "image": img, "question": r["question"], "options": opts, "gold": r["answer"],
                        "category": r.get("category", "all")})  # fmt: skip
    return out


def _prompt_text(task: str, rec: dict, options: dict | None = None) -> str:
    q = rec["question"]
    if options:
        q += "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())
    return q + SUFFIX[task]


def evaluate(cm: ChatModel, task: str, data: Path, images: Path | None, out: Path, limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 32, circular: bool = False, bad_samples: str = "skip",
             progress: bool = True, judge=None, references: Path | None = None, judge_cache: Path | None = None) -> dict:  # fmt: skip
    data = Path(data)
    recs = read_records(task, data, references)[:limit]
    if task in JUDGED and judge is None:
        raise ValueError(f"task {task} needs a judge: --judge-endpoint URL --judge-model NAME")
    if task == "llava-bench":
        if references is None:
            raise ValueError("task llava-bench needs --references (the reference answers JSONL)")
        refs = {}
        for n, line in enumerate(Path(references).read_text().splitlines(), 1):
            if line.strip():
                r = json.loads(line)
                _need(r, ("question_id", "text"), f"{Path(references).name}:{n}")
                refs[r["question_id"]] = r["text"]
        for r in recs:
            if r["id"] not in refs:
                raise ValueError(f"{Path(references).name}: no reference answer for question_id {r['id']!r}")
            r["gold"] = refs[r["id"]]
    root = Path(images) if images else (data if data.is_dir() else data.parent)
    policy = BadSamplePolicy(bad_samples, max_skip_fraction=1.0)
    params = cm.params(max_new_tokens=max_new_tokens)
    jobs = []  # (record, options or None, gold for this job)
    for r in recs:
        if task == "mc" and circular:
            jobs += [(r, o, g) for o, g in M.circular_options(r["options"], r["gold"])]
        else:
            jobs.append((r, r.get("options"), r["gold"]))
    samples, skipped = [], []
    bar = tqdm(total=len(jobs), desc=f"eval {task}", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(jobs), batch_size):
        chunk, prompts = [], []
        for r, opts, gold in jobs[s : s + batch_size]:
            text = _prompt_text(task, r, opts)
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
            samples.append(_score(task, r, opts, gold, text, res.text))
        bar.update(len(jobs[s : s + batch_size]))
    bar.close()
    judged = {}
    if task in JUDGED:
        from modalign.eval import judge as J

        cache = J.JudgeCache(judge_cache)
        rows = [{"id": s["id"], "question": s["prompt"], "answer": s["answer"], "reference": s["gold"],
                 "category": s["category"]} for s in samples]  # fmt: skip
        rows, judged = (J.llava_bench if task == "llava-bench" else J.owleval)(rows, judge, cache)
        for s, row in zip(samples, rows, strict=True):
            s["judge_output"] = row["judge_output"]
            s["judge"] = row.get("scores") or row.get("grade")
        judged |= {"judge_model": judge.model, "judge_cache_hits": cache.hits, "judge_requests": judge.usage.requests,
                   "judge_retries": judge.usage.retries}  # fmt: skip
    results = aggregate(task, samples, circular) | judged
    results |= {
        "task": task, "model": str(getattr(cm, "path", "")), "data": str(data),
        "data_sha256": _sha256(data), "prompt_version": f"{task}-{PROMPT_VERSION}",
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


def _score(task, r, opts, gold, prompt, raw) -> dict:
    s = {"id": r["id"], "category": r["category"], "prompt": prompt, "raw": raw, "gold": gold}
    if task == "shapes":
        s["answer"] = normalize_answer(raw)
        s["score"] = float(s["answer"] == normalize_answer(gold))
        s["unseen"] = r.get("unseen", False)
    elif task == "vqa":
        s["answer"], s["score"] = M.normalize_vqa(raw), M.vqa_accuracy(raw, gold)
    elif task == "exact":
        s["answer"], s["score"] = M.normalize_vqa(raw), M.exact_match(raw, gold)
    elif task == "mc":
        s["answer"] = M.extract_choice(raw, opts)
        s["score"] = float(s["answer"] == gold)
        s["options"] = opts
    elif task in ("pope", "mme"):
        s["answer"] = M.yes_no(raw)
        s["score"] = float(s["answer"] == gold.lower())
        s["image"] = r["image"] if isinstance(r["image"], str) else None
    elif task in ("caption", "llava-bench", "owleval"):
        s["answer"], s["score"] = raw.strip(), None
    return s


def aggregate(task: str, samples: list[dict], circular: bool = False) -> dict:
    by_cat = defaultdict(list)
    for s in samples:
        if s["score"] is not None:
            by_cat[s["category"]].append(s["score"])
    res: dict = {"accuracy_by_category": {k: sum(v) / len(v) for k, v in sorted(by_cat.items())}}
    scored = [s["score"] for s in samples if s["score"] is not None]
    res["accuracy"] = sum(scored) / len(scored) if scored else None
    if task == "shapes":
        un = [s["score"] for s in samples if s.get("unseen")]
        res["unseen_pairs_accuracy"] = sum(un) / len(un) if un else None
        split = defaultdict(list)
        for s in samples:
            split[(s["category"], "unseen" if s.get("unseen") else "seen")].append(s["score"])
        res["accuracy_by_category_seen_unseen"] = {
            c: {k: sum(v) / len(v) for k in ("seen", "unseen") if (v := split.get((c, k)))}
            for c in sorted(by_cat)
        }
        res["position_parts"] = position_parts(
            [{"type": s["category"], "answer": s["gold"], "prediction": s["answer"]} for s in samples]
        )
    if task == "mc" and circular:
        per = defaultdict(list)
        for s in samples:
            per[s["id"]].append(s["score"])
        res["circular_accuracy"] = sum(all(v) for v in per.values()) / max(len(per), 1)
    if task == "pope":
        res |= M.pope_metrics([s["answer"] for s in samples], [s["gold"] for s in samples])
    if task == "mme":
        res |= M.mme_scores([{"subtask": s["category"], "image": s["image"], "prediction": s["answer"],
                              "answer": s["gold"]} for s in samples])  # fmt: skip
    if task == "caption":
        res["bleu4"] = (
            M.bleu4([s["answer"] for s in samples], [s["gold"] for s in samples]) if samples else None
        )
        res["cider"] = (
            M.cider_d([s["answer"] for s in samples], [s["gold"] for s in samples]) if samples else None
        )
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
