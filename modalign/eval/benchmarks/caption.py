"""Captioning: COCO captions annotations JSON, or a JSON list / JSONL of ``{"id", "image",
"captions": [...], ["objects": [...]]}``; BLEU-4 and CIDEr-D over the corpus, and CHAIR (object
hallucination, ``eval/chair.py``) where the images' objects are known: the rows' ``objects``, or
COCO instance annotations given as ``--references instances_val2014.json``."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from modalign.eval import chair as C
from modalign.eval import metrics as M
from modalign.eval.benchmarks import Benchmark, need, read_rows, register, strings


def _row(r: dict, where: str) -> dict:
    need(r, ("image", "captions"), where)
    objects = r.get("objects")
    if objects is not None and not (isinstance(objects, list) and all(isinstance(o, str) for o in objects)):
        raise ValueError(f"{where}: objects must be a list of category names")
    gold = strings(r["captions"], "captions", where)
    return {"id": r.get("id"), "image": r["image"], "question": "", "gold": gold, "category": "all",
            "objects": objects}  # fmt: skip


def _coco(doc: dict, instances: dict | None) -> list[dict]:
    files = {im["id"]: im["file_name"] for im in doc.get("images", [])}
    caps = defaultdict(list)
    for a in doc["annotations"]:
        caps[a["image_id"]].append(a["caption"])
    objects: dict | None = None
    if instances is not None:
        names = {c["id"]: c["name"] for c in instances["categories"]}
        objects = defaultdict(set)
        for a in instances["annotations"]:
            objects[a["image_id"]].add(names[a["category_id"]])
    return [{"id": i, "image": files.get(i, f"{i}.jpg"), "question": "", "gold": c, "category": "all",
             "objects": sorted(objects[i]) if objects is not None else None}
            for i, c in caps.items()]  # fmt: skip


def read(path: Path, references: Path | None = None) -> list[dict]:
    instances = None
    if references is not None:
        instances = json.loads(Path(references).read_text())
        if not isinstance(instances, dict) or "categories" not in instances or "annotations" not in instances:
            raise ValueError(
                f"{references}: not COCO instance annotations (needs 'categories' and 'annotations')"
            )
    if path.suffix != ".jsonl":
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and "annotations" in doc:
            return _coco(doc, instances)
    if instances is not None:
        raise ValueError("--references (COCO instances) goes with a COCO captions file; rows carry 'objects'")
    return read_rows(_row)(path)


def score(r: dict, opts, gold, raw: str) -> dict:
    out = {"answer": raw.strip(), "score": None}
    if r.get("objects") is not None:
        truth = C.ground_truth(r["objects"], gold)  # annotated objects + those the references mention
        out["chair"] = C.caption_chair(out["answer"], truth)
    return out


def aggregate(samples: list[dict], circular: bool) -> dict:
    if not samples:
        return {"bleu4": None, "cider": None}
    cands, refs = [s["answer"] for s in samples], [s["gold"] for s in samples]
    res = {"bleu4": M.bleu4(cands, refs), "cider": M.cider_d(cands, refs)}
    per = [s["chair"] for s in samples if "chair" in s]
    if per:
        res |= C.chair_totals(per)
    return res


register(Benchmark("caption", read, score, "\nDescribe the image briefly.", aggregate))
