"""POPE (object hallucination): JSONL ``{"question_id", "image", "text", "label": yes|no}``;
accuracy, precision, recall, F1 and the yes-ratio."""

from __future__ import annotations

from modalign.eval import metrics as M
from modalign.eval.benchmarks import Benchmark, need, read_rows, register


def _row(r: dict, where: str) -> dict:
    need(r, ("image", "text", "label"), where)
    if r["label"] not in ("yes", "no"):
        raise ValueError(f"{where}: label {r['label']!r} is not yes/no")
    return {"id": r.get("question_id"), "image": r["image"], "question": r["text"], "gold": r["label"],
            "category": r.get("category", "all")}  # fmt: skip


def score(r: dict, opts, gold: str, raw: str) -> dict:
    answer = M.pope_answer(raw)
    return {"answer": answer, "score": float(answer == gold.lower())}


def aggregate(samples: list[dict], circular: bool) -> dict:
    return M.pope_metrics([s["answer"] for s in samples], [s["gold"] for s in samples])


register(Benchmark("pope", read_rows(_row), score, "\nAnswer yes or no.", aggregate))
