"""Captioning: COCO captions annotations JSON, or a JSON list / JSONL of ``{"id", "image",
"captions": [...]}``; BLEU-4 and CIDEr-D over the corpus."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from modalign.eval import metrics as M
from modalign.eval.benchmarks import Benchmark, need, read_rows, register


def _row(r: dict, where: str) -> dict:
    need(r, ("image", "captions"), where)
    return {"id": r.get("id"), "image": r["image"], "question": "", "gold": r["captions"], "category": "all"}


def _coco(doc: dict) -> list[dict]:
    files = {im["id"]: im["file_name"] for im in doc.get("images", [])}
    caps = defaultdict(list)
    for a in doc["annotations"]:
        caps[a["image_id"]].append(a["caption"])
    return [{"id": i, "image": files.get(i, f"{i}.jpg"), "question": "", "gold": c, "category": "all"}
            for i, c in caps.items()]  # fmt: skip


def read(path: Path, references: Path | None = None) -> list[dict]:
    if path.suffix != ".jsonl":
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and "annotations" in doc:
            return _coco(doc)
    return read_rows(_row)(path)


def score(r: dict, opts, gold, raw: str) -> dict:
    return {"answer": raw.strip(), "score": None}


def aggregate(samples: list[dict], circular: bool) -> dict:
    if not samples:
        return {"bleu4": None, "cider": None}
    cands, refs = [s["answer"] for s in samples], [s["gold"] for s in samples]
    return {"bleu4": M.bleu4(cands, refs), "cider": M.cider_d(cands, refs)}


register(Benchmark("caption", read, score, "\nDescribe the image briefly.", aggregate))
