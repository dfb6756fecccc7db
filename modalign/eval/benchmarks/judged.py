"""Open-ended answers graded by an LLM judge (``eval/judge.py``): LLaVA-Bench (questions JSONL
``{"question_id", "image", "text", "category"}`` + ``--references`` answers JSONL; the relative
score) and OwlEval-style A-D grades (``{"id", "image", "question"}``)."""

from __future__ import annotations

import json
from pathlib import Path

from modalign.eval import judge
from modalign.eval.benchmarks import Benchmark, need, read_rows, register


def _llava_row(r: dict, where: str) -> dict:
    need(r, ("question_id", "image", "text"), where)
    return {"id": r["question_id"], "image": r["image"], "question": r["text"], "gold": None,
            "category": r.get("category", "all")}  # fmt: skip


def read_llava_bench(path: Path, references: Path | None = None) -> list[dict]:
    recs = read_rows(_llava_row)(path)
    if references is None:
        raise ValueError("task llava-bench needs --references (the reference answers JSONL)")
    refs = {}
    for n, line in enumerate(Path(references).read_text().splitlines(), 1):
        if line.strip():
            r = json.loads(line)
            need(r, ("question_id", "text"), f"{Path(references).name}:{n}")
            refs[r["question_id"]] = r["text"]
    for r in recs:
        if r["id"] not in refs:
            raise ValueError(f"{Path(references).name}: no reference answer for question_id {r['id']!r}")
        r["gold"] = refs[r["id"]]
    return recs


def _owl_row(r: dict, where: str) -> dict:
    need(r, ("image", "question"), where)
    return {"id": r.get("id", r.get("question_id")), "image": r["image"], "question": r["question"],
            "gold": None, "category": r.get("category", "all")}  # fmt: skip


def score(r: dict, opts, gold, raw: str) -> dict:
    return {"answer": raw.strip(), "score": None}


register(Benchmark("llava-bench", read_llava_bench, score, judge=judge.llava_bench))
register(Benchmark("owleval", read_rows(_owl_row), score, judge=judge.owleval))
