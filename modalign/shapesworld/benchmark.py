"""``modalign eval --task shapes``: ShapesWorld's held-out ``eval.json`` as a benchmark of the
general evaluation loop (``modalign.eval``), with the miniature's own figures (unseen colour-shape
pairs, position questions split into row and column)."""

from __future__ import annotations

from collections import defaultdict

from modalign.eval.benchmarks import Benchmark, need, read_rows, register
from modalign.shapesworld.evaluate import heldout_question, normalize_answer, position_parts


def _row(r: dict, where: str) -> dict:
    need(r, ("id", "image", "conversations", "answer", "type"), where)
    return {"id": r["id"], "image": r["image"], "question": heldout_question(r), "gold": r["answer"],
            "category": r["type"], "unseen": r.get("unseen", False)}  # fmt: skip


def score(r: dict, opts, gold: str, raw: str) -> dict:
    answer = normalize_answer(raw)
    return {
        "answer": answer,
        "score": float(answer == normalize_answer(gold)),
        "unseen": r.get("unseen", False),
    }


def aggregate(samples: list[dict], circular: bool) -> dict:
    un = [s["score"] for s in samples if s.get("unseen")]
    split, cats = defaultdict(list), sorted({s["category"] for s in samples})
    for s in samples:
        split[(s["category"], "unseen" if s.get("unseen") else "seen")].append(s["score"])
    return {
        "unseen_pairs_accuracy": sum(un) / len(un) if un else None,
        "accuracy_by_category_seen_unseen": {
            c: {k: sum(v) / len(v) for k in ("seen", "unseen") if (v := split.get((c, k)))} for c in cats
        },
        "position_parts": position_parts(
            [{"type": s["category"], "answer": s["gold"], "prediction": s["answer"]} for s in samples]
        ),
    }


SHAPES = register(Benchmark("shapes", read_rows(_row), score, aggregate=aggregate))
