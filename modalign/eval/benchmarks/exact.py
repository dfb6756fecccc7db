"""Single-answer VQA (TextVQA / GQA style): a JSON list / JSONL of ``{"id", "image", "question",
"answer"}``, scored by exact match after VQA normalisation."""

from __future__ import annotations

from modalign.eval import metrics as M
from modalign.eval.benchmarks import Benchmark, need, read_rows, register
from modalign.eval.benchmarks.vqa import SUFFIX


def _row(r: dict, where: str) -> dict:
    need(r, ("image", "question", "answer"), where)
    if not isinstance(r["answer"], str):
        raise ValueError(f"{where}: answer must be a string (several human answers: task vqa), "
                         f"got {r['answer']!r:.80}")  # fmt: skip
    return {"id": r.get("id"), "image": r["image"], "question": r["question"], "gold": r["answer"],
            "category": r.get("category", "all")}  # fmt: skip


def score(r: dict, opts, gold, raw: str) -> dict:
    return {"answer": M.normalize_vqa(raw), "score": M.exact_match(raw, gold)}


register(Benchmark("exact", read_rows(_row), score, SUFFIX))
