"""Open-ended answers graded by an LLM judge (``eval/judge.py``).

LLaVA-Bench, in its public layout: ``--data questions.jsonl`` (``{"question_id", "image", "text",
"category"}``), ``--references answers_gpt4.jsonl`` (``{"question_id", "text"}``, the reference
answers) and the judge's context found next to the questions (or the references):
``context.jsonl`` (``{"image", "caption"}``, LLaVA-Bench-in-the-Wild) or ``caps_boxes*.jsonl``
(``{"image", "captions", "instances": [{"category", "bbox"}]}``, LLaVA-Bench-COCO). ``--data`` may
also be the folder holding ``questions.jsonl``, ``answers_gpt4.jsonl`` and ``context.jsonl``
(images: ``--images FOLDER/images``).

OwlEval: ``questions.jsonl`` (``{"question_id", "image", "question", "category"}``; images with
``--images OwlEval/cases``); a reference answer per row (``"reference"``) or from ``--references``
(JSONL ``{"question_id", "answer" or "text"}``) is shown to the judge where present.
"""

from __future__ import annotations

import json
from pathlib import Path

from modalign.eval import judge, submission
from modalign.eval.benchmarks import Benchmark, need, read_rows, register


def _jsonl(path: Path) -> list[tuple[str, dict]]:
    return [(f"{path.name}:{n}", json.loads(line))
            for n, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]  # fmt: skip


def _llava_row(r: dict, where: str) -> dict:
    need(r, ("question_id", "image", "text"), where)
    return {"id": r["question_id"], "image": r["image"], "question": r["text"], "gold": None,
            "category": r.get("category", "all")}  # fmt: skip


def _find_context(*folders: Path) -> Path | None:
    for d in folders:
        for f in [d / "context.jsonl", *sorted(d.glob("caps_boxes*.jsonl"))]:
            if f.is_file():
                return f
    return None


def read_llava_bench(path: Path, references: Path | None = None) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        if references is None and (path / "answers_gpt4.jsonl").is_file():
            references = path / "answers_gpt4.jsonl"
        path = path / "questions.jsonl"
    recs = read_rows(_llava_row)(path)
    if references is None:
        raise ValueError(
            "task llava-bench needs --references (the reference answers JSONL, answers_gpt4.jsonl)"
        )
    references = Path(references)
    refs = {}
    for where, r in _jsonl(references):
        need(r, ("question_id", "text"), where)
        refs[r["question_id"]] = r["text"]
    ctx_file = _find_context(path.parent, references.parent)
    if ctx_file is None:
        raise ValueError(f"task llava-bench needs the judge's context: context.jsonl (captions) or caps_boxes*.jsonl "
                         f"(COCO captions and boxes) in {path.parent} or {references.parent}")  # fmt: skip
    contexts = {}
    for where, c in _jsonl(ctx_file):
        need(c, ("image",), where)
        contexts[c["image"]] = judge.llava_context(c)
    for r in recs:
        if r["id"] not in refs:
            raise ValueError(f"{references.name}: no reference answer for question_id {r['id']!r}")
        if r["image"] not in contexts:
            raise ValueError(
                f"{ctx_file.name}: no context for image {r['image']!r} (question_id {r['id']!r})"
            )
        r["gold"] = refs[r["id"]]
        r["context"], r["boxes"] = contexts[r["image"]]
        judge.llava_rule_key(r["category"], r["boxes"] is not None)  # fail now on an unknown category
    return recs


def _owl_row(r: dict, where: str) -> dict:
    need(r, ("image", "question"), where)
    cat = r.get("category", "all")
    return {"id": r.get("id", r.get("question_id")), "image": r["image"], "question": r["question"],
            "gold": r.get("reference"), "category": ",".join(cat) if isinstance(cat, list) else cat}  # fmt: skip


def read_owleval(path: Path, references: Path | None = None) -> list[dict]:
    recs = read_rows(_owl_row)(Path(path))
    if references is not None:
        refs = {}
        for where, r in _jsonl(Path(references)):
            need(r, ("question_id",), where)
            if "answer" not in r and "text" not in r:
                raise ValueError(f"{where}: missing field(s) answer (or text)")
            refs[r["question_id"]] = r.get("answer", r.get("text"))
        for r in recs:
            r["gold"] = refs.get(r["id"], r["gold"])
    return recs


def score(r: dict, opts, gold, raw: str) -> dict:
    """No score of its own (the judge's); ``judge_input`` carries what the judge needs besides the
    answer: the question as the benchmark words it, the image, the LLaVA-Bench context."""
    extra = {k: r[k] for k in ("context", "boxes") if k in r}
    image = {"image": r["image"]} if isinstance(r.get("image"), str) else {}
    return {
        "answer": raw.strip(),
        "score": None,
        "judge_input": {"question_text": r["question"], **image, **extra},
    }


register(
    Benchmark(
        "llava-bench", read_llava_bench, score, judge=judge.llava_bench, submission=submission.llava_bench
    )
)
register(Benchmark("owleval", read_owleval, score, judge=judge.owleval))
