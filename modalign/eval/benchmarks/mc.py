"""Multiple choice: ScienceQA's ``problems.json`` (images at ``<split>/<id>/<image>``; text-only
problems skipped), an MMBench ``.tsv`` (``index, question, A..F, answer, category, image`` as
base64), or a JSON list / JSONL of ``{"id", "image", "question", "choices": [...], "answer":
index}``. ``--circular`` runs MMBench's circular evaluation (every rotation of the options must
be answered right)."""

from __future__ import annotations

import base64
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

from modalign.eval import metrics as M
from modalign.eval import submission
from modalign.eval.benchmarks import Benchmark, need, read_rows, register


def _letters(n: int) -> list[str]:
    return [chr(65 + i) for i in range(n)]


def _answer_index(answer, n: int, where: str) -> int:
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < n:
        raise ValueError(f"{where}: answer {answer!r} is not an index into its {n} choices")
    return answer


def _row(r: dict, where: str) -> dict:
    need(r, ("question", "choices", "answer"), where)
    letters = _letters(len(r["choices"]))
    k = _answer_index(r["answer"], len(letters), where)
    return {"id": r.get("id"), "image": r.get("image"), "question": r["question"],
            "options": dict(zip(letters, r["choices"], strict=True)), "gold": letters[k],
            "category": r.get("subject", r.get("category", "all"))}  # fmt: skip


def _scienceqa(path: Path, doc: dict) -> list[dict]:
    out = []
    for pid, p in doc.items():
        where = f"{path.name} problem {pid}"
        need(p, ("question", "choices", "answer"), where)
        if not p.get("image"):
            continue
        letters = _letters(len(p["choices"]))
        k = _answer_index(p["answer"], len(letters), where)
        q = (f"Context: {p['hint']}\n" if p.get("hint") else "") + p["question"]
        out.append({"id": pid, "image": f"{p.get('split', 'test')}/{pid}/{p['image']}", "question": q,
                    "options": dict(zip(letters, p["choices"], strict=True)), "gold": letters[k],
                    "category": p.get("subject", "all")})  # fmt: skip
    return out


def _mmbench(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)
    out = []
    with path.open(newline="") as f:
        for n, r in enumerate(csv.DictReader(f, delimiter="\t"), 2):
            need(r, ("index", "question", "A", "B", "answer"), f"{path.name}:{n}")
            opts = {k: r[k] for k in "ABCDEF" if r.get(k)}
            if r["answer"] not in opts:
                raise ValueError(
                    f"{path.name}:{n}: answer key {r['answer']!r} is not one of the options {sorted(opts)}"
                )
            img = base64.b64decode(r["image"]) if r.get("image") else None
            out.append({"id": r["index"], "image": img, "question": r["question"], "options": opts, "gold": r["answer"],
                        "category": r.get("category", "all")})  # fmt: skip
    return out


def read(path: Path, references: Path | None = None) -> list[dict]:
    if path.suffix == ".tsv":
        return _mmbench(path)
    if path.suffix != ".jsonl":
        doc = json.loads(path.read_text())
        if isinstance(doc, dict):  # ScienceQA problems.json: {id: problem}
            return _scienceqa(path, doc)
    return read_rows(_row)(path)


def score(r: dict, opts: dict, gold, raw: str) -> dict:
    answer = M.extract_choice(raw, opts)
    return {"answer": answer, "score": float(answer == gold), "options": opts}


def aggregate(samples: list[dict], circular: bool) -> dict:
    if not circular:
        return {}
    per = defaultdict(list)
    for s in samples:
        per[s["id"]].append(s["score"])
    return {"circular_accuracy": sum(all(v) for v in per.values()) / max(len(per), 1)}


register(Benchmark("mc", read, score, "\nAnswer with the option's letter from the given choices directly.",
                   aggregate, submission=submission.mmbench))  # fmt: skip
