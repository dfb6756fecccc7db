"""ShapesWorld held-out evaluation: greedy answers to the held-out questions, exact match after
normalisation, per question type and for the colour-shape pairs no training image holds. The
quickstart calls ``evaluate_shapes``; ``modalign eval --task shapes`` runs the same questions
through the general evaluation loop (``benchmark.py``) and gets the same figures."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modalign.data.images import GRID_PLACES, resolve_image_path
from modalign.data.tokenizer import Tokenizer
from modalign.eval.metrics import normalize_answer
from modalign.infer.chat import ChatModel, user_message
from modalign.infer.engine import Prompt
from modalign.models.mllm import MLLM

PROMPT_VERSION = "shapes-v1"


def heldout_question(rec: dict) -> str:
    """A held-out record's question as both ShapesWorld evaluations prompt it: its first user turn,
    with ``<image>`` where the record puts it (before or after the question), as training renders it."""
    return rec["conversations"][0]["value"].strip()


def position_parts(samples: list[dict]) -> dict | None:
    """Position answers split into their row and column: the share of position questions whose
    predicted place has the right row, and the right column ("top right" for "top": row right,
    column wrong). An answer that names no place is wrong on both."""
    pos = [s for s in samples if s["type"] == "position" and normalize_answer(s["answer"]) in GRID_PLACES]
    if not pos:
        return None
    row = col = 0
    for s in pos:
        gold = GRID_PLACES.index(normalize_answer(s["answer"]))
        pred = GRID_PLACES.index(s["prediction"]) if s["prediction"] in GRID_PLACES else None
        row += pred is not None and pred // 3 == gold // 3
        col += pred is not None and pred % 3 == gold % 3
    return {"row_accuracy": row / len(pos), "column_accuracy": col / len(pos), "questions": len(pos)}


def evaluate_shapes(
    model: MLLM,
    tok: Tokenizer,
    eval_file: str | Path,
    template: str = "chatml",
    batch_size: int = 256,  # prompts per batch: short ones, so more per batch run faster on a CPU
    limit: int | None = None,
    progress: bool = True,
    max_new_tokens: int = 8,
) -> dict:
    """Greedy answers to the held-out questions; exact match after normalisation."""
    path = Path(eval_file)
    records = json.loads(path.read_text())[:limit]
    cm = ChatModel(model, tok, template)
    params = cm.params(max_new_tokens=max_new_tokens)
    by_type, unseen, samples = defaultdict(lambda: [0, 0]), [0, 0], []
    split = defaultdict(lambda: [0, 0])  # (type, seen|unseen) -> [correct, total]
    cache: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(records), desc="eval", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(records), batch_size):
        chunk = records[s : s + batch_size]
        prompts = []
        for rec in chunk:
            q = heldout_question(rec)
            img = rec["image"]
            if img not in cache:
                cache[img] = cm.images(resolve_image_path(path.parent, img, rec["id"]), rec["id"])
            prompts.append(Prompt(cm.prompt_ids([user_message(q, 1)]), [cache[img]]))
        for rec, r in zip(chunk, cm.engine.generate(prompts, params), strict=True):
            pred = normalize_answer(r.text)
            ok = pred == normalize_answer(rec["answer"])
            by_type[rec["type"]][0] += ok
            by_type[rec["type"]][1] += 1
            if rec.get("unseen"):
                unseen[0] += ok
                unseen[1] += 1
            cell = split[(rec["type"], "unseen" if rec.get("unseen") else "seen")]
            cell[0] += ok
            cell[1] += 1
            samples.append({"id": rec["id"], "type": rec["type"], "question": rec["conversations"][0]["value"],
                            "answer": rec["answer"], "prediction": pred, "raw": r.text, "correct": ok,
                            "unseen": bool(rec.get("unseen"))})  # fmt: skip
        bar.update(len(chunk))
    bar.close()
    correct = sum(v[0] for v in by_type.values())
    total = sum(v[1] for v in by_type.values())
    return {
        "accuracy": correct / max(total, 1),
        "accuracy_by_type": {k: v[0] / v[1] for k, v in sorted(by_type.items())},
        "count_by_type": {k: v[1] for k, v in sorted(by_type.items())},
        "unseen_pairs_accuracy": unseen[0] / unseen[1] if unseen[1] else None,
        "unseen_questions": unseen[1],
        "accuracy_by_type_seen_unseen": {
            t: {k: split[(t, k)][0] / split[(t, k)][1] for k in ("seen", "unseen") if split[(t, k)][1]}
            for t in sorted(by_type)
        },
        "position_parts": position_parts(samples),
        "questions": total,
        "prompt_version": PROMPT_VERSION,
        "samples": samples,
    }


def evaluate_text_qa(model: MLLM, tok: Tokenizer, file: str | Path, template: str = "chatml",
                     batch_size: int = 256, max_new_tokens: int = 8) -> dict:  # fmt: skip
    """The LLM's text ability in form and content: greedy answers to held-out questions about a
    scene described in words (no image), exact match after normalisation."""
    records = json.loads(Path(file).read_text())
    cm = ChatModel(model, tok, template)
    params = cm.params(max_new_tokens=max_new_tokens)
    correct = 0
    for s in range(0, len(records), batch_size):
        chunk = records[s : s + batch_size]
        prompts = [Prompt(cm.prompt_ids([user_message(r["conversations"][0]["value"], 0)])) for r in chunk]
        for rec, r in zip(chunk, cm.engine.generate(prompts, params), strict=True):
            correct += normalize_answer(r.text) == normalize_answer(rec["conversations"][1]["value"])
    return {"accuracy": correct / max(len(records), 1), "questions": len(records)}
