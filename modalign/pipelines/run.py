"""Running the caption pipelines over a question file: the local captioner, the chat-form
completer, and one loop for PICa, Img2LLM and PNP-VQA (``modalign pipeline`` and the miniature's
rows both use it)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modalign.infer.chat import ChatModel, user_message
from modalign.infer.engine import Prompt

PIPELINES = ("pica", "img2llm", "pnp-vqa")
CAPTION_PROMPT = "Describe the image briefly."


class Captioner:
    """A modalign model asked ``prompt`` about each image [N, 3, S, S]: greedy, or sampled
    (temperature 1, top-k) with ``seed``."""

    def __init__(
        self, cm: ChatModel, prompt: str = CAPTION_PROMPT, max_new_tokens: int = 64, batch_size: int = 64
    ):
        self.cm, self.prompt, self.max_new_tokens, self.batch_size = cm, prompt, max_new_tokens, batch_size
        self.calls = 0

    def __call__(self, pixels: torch.Tensor, seed: int | None = None, top_k: int = 0) -> list[str]:
        ids = self.cm.prompt_ids([user_message(self.prompt, 1)])
        kw = {"temperature": 1.0, "top_k": top_k, "seed": seed} if seed is not None else {}
        params = self.cm.params(max_new_tokens=self.max_new_tokens, **kw)
        out = []
        for i in range(0, len(pixels), self.batch_size):
            chunk = pixels[i : i + self.batch_size]
            self.calls += len(chunk)
            out += [
                c.text.strip() for c in self.cm.engine.generate([Prompt(ids, [p]) for p in chunk], params)
            ]
        return out


class ChatCompleter:
    """A local LLM prompted in its chat template (the prompt as one user turn), greedy, the reply
    up to its first newline; no log-probabilities."""

    def __init__(self, model, tok, template: str = "chatml"):
        self.cm = ChatModel(model, tok, template)
        self.calls = self.tokens = 0

    def complete(self, prompt: str, max_tokens: int = 10):
        ids = self.cm.prompt_ids([user_message(prompt, 0)])
        c = self.cm.engine.generate([Prompt(ids)], self.cm.params(max_new_tokens=max_tokens))[0]
        self.calls += 1
        self.tokens += len(ids) + len(c.token_ids)
        return c.text.split("\n")[0].strip(), None


def load_questions(path: str | Path) -> list[dict]:
    """A LLaVA-format JSON list (``id``, ``image``, ``conversations``: the first human turn is the
    question, the first gpt turn or ``answer`` the reference) -> records with ``question``,
    ``answer`` (or None), ``image`` and the record's other fields."""
    path = Path(path)
    try:
        recs = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON list of question records ({e})") from None
    if not isinstance(recs, list):
        raise ValueError(f"{path}: expected a JSON list of question records")
    out = []
    for i, r in enumerate(recs):
        rid = r.get("id", i) if isinstance(r, dict) else i
        if not isinstance(r, dict) or not isinstance(r.get("image"), str) or not r.get("conversations"):
            raise ValueError(f"{path}: record {rid} needs an 'image' path and 'conversations'")
        conv = r["conversations"]
        answer = r.get("answer") or next((t["value"] for t in conv[1:] if t.get("from") == "gpt"), None)
        out.append({**r, "id": rid, "question": conv[0]["value"].replace("<image>", "").strip(),
                    "answer": answer})  # fmt: skip
    return out


@dataclass
class PipelineRun:
    predictions: list[str]
    samples: list[dict]
    settings: dict
    seconds: float
    llm_calls: int
    llm_tokens: int
    caption_calls: int


def run_pipeline(name: str, records: list[dict], pixels: dict, captioner: Captioner, completer, *,
                 shots: list | None = None, llm=None, tok=None, itm=None, progress: bool = True, seed: int = 0,
                 n_shot: int = 16, n_ensemble: int = 5, metric: str = "imagequestion", captions_per_image: int = 5,
                 n_answers: int = 30, num_patches: int = 20, num_captions: int = 5,
                 qa_format: str | None = None, itm_pixels: dict | None = None) -> PipelineRun:  # fmt: skip
    """Answer ``records`` (``question``, ``image``) with pipeline ``name``. ``pixels``: image path ->
    [3, S, S]. PICa needs ``shots`` (``Shot`` list) and, for the similarity metrics, ``llm`` / ``tok``
    (question embeddings) and the captioner's tower (image embeddings); PNP-VQA ``itm`` (model, tok)
    and ``itm_pixels`` (image path -> the image as the matching model reads it)."""
    from modalign.pipelines.img2llm import Img2LLM
    from modalign.pipelines.pica import PICa, embed_images, embed_texts
    from modalign.pipelines.pnp_vqa import DEFAULT_QA_FORMAT, PNPVQA

    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}")
    paths = list(dict.fromkeys(r["image"] for r in records))
    t0 = time.perf_counter()
    calls0 = captioner.calls
    preds, samples = [], []
    greedy, stack = {}, None
    if name in ("pica", "img2llm"):
        stack = torch.stack([pixels[p] for p in paths])
        greedy = dict(zip(paths, captioner(stack), strict=True))
    if name == "pica":
        if not shots:
            raise ValueError("PICa needs in-context examples (shots)")
        settings = {"n_shot": n_shot, "n_ensemble": n_ensemble, "metric": metric, "examples": len(shots)}
        pica = PICa(completer, shots, n_shot=n_shot, n_ensemble=n_ensemble, metric=metric, seed=seed)
        qv = (
            embed_texts(llm, tok, [r["question"] for r in records])
            if metric != "random"
            else [None] * len(records)
        )
        iv = {}
        if metric == "imagequestion":
            iv = dict(zip(paths, embed_images(captioner.cm.model, stack), strict=True))
        for r, q in tqdm(list(zip(records, qv, strict=True)), desc="pica", disable=not progress):
            a = pica.answer(r["question"], greedy[r["image"]], q, iv.get(r["image"]))
            preds.append(a.answer)
            samples.append(
                {"id": r["id"], "prediction": a.answer, "candidates": a.candidates, "prompt": a.prompts[0]}
            )
    elif name == "img2llm":
        settings = {
            "captions_per_image": captions_per_image,
            "n_answers": n_answers,
            "question_generation": "template",
        }
        pool = {}
        for i, p in enumerate(paths):  # sampled captions (top-k 50) besides the greedy one
            more = captioner(
                pixels[p][None].expand(captions_per_image - 1, -1, -1, -1), seed=seed + i, top_k=50
            )
            pool[p] = list(dict.fromkeys([greedy[p], *more]))
        i2l = Img2LLM(completer, n_answers=n_answers, n_captions=captions_per_image)
        for r in tqdm(records, desc="img2llm", disable=not progress):
            a = i2l.answer(r["question"], pool[r["image"]])
            preds.append(a.answer)
            samples.append({"id": r["id"], "prediction": a.answer, "prompt": a.prompt})
    else:
        if itm is None:
            raise ValueError("PNP-VQA needs an image-question matching model (a Q-Former with an itm head)")
        fmt = qa_format or DEFAULT_QA_FORMAT
        settings = {"num_patches": num_patches, "num_captions": num_captions, "qa_format": fmt}
        pnp = PNPVQA(itm[0], itm[1], lambda im, s: captioner(im, seed=s, top_k=50), completer,
                     num_patches=num_patches, num_captions=num_captions, qa_format=fmt, seed=seed,
                     caption_patch_size=captioner.cm.model.config.vision.patch_size)  # fmt: skip
        for r in tqdm(records, desc="pnp-vqa", disable=not progress):
            a = pnp.answer(r["question"], pixels[r["image"]], (itm_pixels or pixels)[r["image"]])
            preds.append(a.answer)
            samples.append({"id": r["id"], "prediction": a.answer, "prompt": a.prompt, "patches": a.patches})
    return PipelineRun(preds, samples, settings, time.perf_counter() - t0, completer.calls, completer.tokens,
                       captioner.calls - calls0)  # fmt: skip


def build_shots(records: list[dict], pixels: dict, captioner: Captioner, llm=None, tok=None) -> list:
    """PICa's in-context examples from answered records: each image captioned by ``captioner``
    (as the test images are), the question embedded by ``llm``, the image by the captioner's tower
    (without ``llm``: no embeddings, for random selection)."""
    from modalign.pipelines.pica import Shot, embed_images, embed_texts

    records = [r for r in records if r.get("answer")]
    paths = list(dict.fromkeys(r["image"] for r in records))
    stack = torch.stack([pixels[p] for p in paths])
    caps = dict(zip(paths, captioner(stack), strict=True))
    if llm is None:
        return [Shot(caps[r["image"]], r["question"], r["answer"]) for r in records]
    ivec = dict(zip(paths, embed_images(captioner.cm.model, stack), strict=True))
    qvec = embed_texts(llm, tok, [r["question"] for r in records])
    return [Shot(caps[r["image"]], r["question"], r["answer"], q, ivec[r["image"]])
            for r, q in zip(records, qvec, strict=True)]  # fmt: skip


def score(records: list[dict], preds: list[str]) -> dict:
    """Exact match after normalisation, overall, per ``type`` and on ``unseen`` records."""
    from collections import defaultdict

    from modalign.eval.metrics import normalize_answer

    by_type, unseen = defaultdict(lambda: [0, 0]), [0, 0]
    for r, p in zip(records, preds, strict=True):
        ok = normalize_answer(p) == normalize_answer(r["answer"])
        t = by_type[r.get("type") or "all"]
        t[0] += ok
        t[1] += 1
        if r.get("unseen"):
            unseen[0] += ok
            unseen[1] += 1
    n = sum(v[1] for v in by_type.values())
    return {
        "heldout_accuracy": sum(v[0] for v in by_type.values()) / max(n, 1),
        "unseen_pairs_accuracy": unseen[0] / unseen[1] if unseen[1] else None,
        "accuracy_by_type": {k: v[0] / v[1] for k, v in sorted(by_type.items())},
        "questions": n,
    }
