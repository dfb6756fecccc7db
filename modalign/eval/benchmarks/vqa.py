"""VQAv2: the official questions JSON with ``--references`` annotations JSON (COCO image names),
or a JSON list / JSONL of ``{"question_id"|"id", "image", "question", "answers": [10 strings]}``.
The reply goes through the EvalAI answer processor, as LLaVA submits it and lmms-eval scores it
(``metrics.evalai_answer``), and is scored as the official ``vqaEval.py`` scores that string
(``metrics.vqa_accuracy``: the humans' answers normalised only where they disagree, min(#agreeing /
3, 1) over the leave-one-out subsets): the local score is what EvalAI gives the submitted file."""

from __future__ import annotations

import json
from pathlib import Path

from modalign.eval import metrics as M
from modalign.eval import submission
from modalign.eval.benchmarks import Benchmark, need, read_rows, register, strings

SUFFIX = "\nAnswer the question using a single word or phrase."


def _row(r: dict, where: str) -> dict:
    need(r, ("image", "question", "answers"), where)
    if not isinstance(r["answers"], list):
        raise ValueError(f"{where}: answers must be a list (VQAv2 gives 10), got {r['answers']!r:.80}")
    # VQA's accuracy leaves each human answer out in turn: one answer alone can never score
    ans = strings([a.get("answer") if isinstance(a, dict) else a for a in r["answers"]], "answers", where, 2)
    return {"id": r.get("question_id", r.get("id")), "image": r["image"], "question": r["question"],
            "gold": ans, "category": r.get("answer_type", "all")}  # fmt: skip


def _official(path: Path, doc: dict, references: Path | None) -> list[dict]:
    if references is None:
        raise ValueError(f"{path.name} holds VQA questions only; pass the annotations file with --references")
    anns = {a["question_id"]: a for a in json.loads(Path(references).read_text())["annotations"]}
    split = doc.get("data_subtype", "val2014")
    out = []
    for i, q in enumerate(doc["questions"]):
        need(q, ("image_id", "question", "question_id"), f"{path.name} question {i}")
        a = anns.get(q["question_id"])
        if a is None:
            raise ValueError(f"{Path(references).name}: no annotation for question_id {q['question_id']}")
        out.append({"id": q["question_id"], "image": f"COCO_{split}_{q['image_id']:012d}.jpg", "question": q["question"],
                    "gold": [x["answer"] for x in a["answers"]], "category": a.get("answer_type", "all")})  # fmt: skip
    return out


def read(path: Path, references: Path | None = None) -> list[dict]:
    if path.suffix != ".jsonl":
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and "questions" in doc:
            return _official(path, doc, references)
    return read_rows(_row)(path)


def score(r: dict, opts, gold, raw: str) -> dict:
    answer = M.evalai_answer(raw)
    return {"answer": answer, "score": M.vqa_accuracy(answer, gold)}


register(Benchmark("vqa", read, score, SUFFIX, submission=submission.vqav2))
