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
    return {"id": r.get("id", where), "image": r.get("image"), "question": r["question"],
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


def cell_given(v) -> bool:
    """A TSV cell that holds something (pandas writes missing cells as "nan")."""
    return bool(v) and v.strip().lower() not in ("nan", "none")


def _mmbench(path: Path) -> list[dict]:
    """The rows of an MMBench ``.tsv``, the hint before the question as the official inference
    writes it. Rows at index + k x 1,000,000 are the rotated copies of a circular set, and are
    left out: ``--circular`` makes the rotations itself."""
    csv.field_size_limit(sys.maxsize)
    out = []
    with path.open(newline="") as f:
        rows = list(enumerate(csv.DictReader(f, delimiter="\t"), 2))
    indices = {r.get("index") for _, r in rows}
    for n, r in rows:
        need(r, ("index", "question", "A", "B", "answer"), f"{path.name}:{n}")
        if (
            r["index"].isdigit()
            and int(r["index"]) >= 1_000_000
            and str(int(r["index"]) % 1_000_000) in indices
        ):
            continue
        opts = {k: r[k] for k in "ABCDEF" if cell_given(r.get(k))}
        if r["answer"] not in opts:
            raise ValueError(
                f"{path.name}:{n}: answer key {r['answer']!r} is not one of the options {sorted(opts)}"
            )
        img = base64.b64decode(r["image"]) if r.get("image") else None
        q = f"{r['hint']}\n{r['question']}" if cell_given(r.get("hint")) else r["question"]
        out.append({"id": r["index"], "image": img, "question": q, "options": opts, "gold": r["answer"],
                    "category": r.get("category", "all")})  # fmt: skip
    return out


def read(path: Path, references: Path | None = None) -> list[dict]:
    """The questions, each id once (the circular evaluation groups a question's rotations by it)."""
    if path.suffix == ".tsv":
        out = _mmbench(path)
    elif path.suffix != ".jsonl" and isinstance(doc := json.loads(path.read_text()), dict):
        out = _scienceqa(path, doc)  # ScienceQA problems.json: {id: problem}
    else:
        out = read_rows(_row)(path)
    seen = set()
    for r in out:
        if r["id"] in seen:
            raise ValueError(f"{path.name}: question id {r['id']!r} is given to more than one question")
        seen.add(r["id"])
    return out


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
