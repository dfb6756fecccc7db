"""LLaVA-style visual instruction data through any OpenAI-compatible LLM.

A text-only LLM sees an image's captions and object boxes (never the pixels) and writes a
conversation, a detailed description or a complex-reasoning Q&A. Prompts are a versioned
system message plus few-shot examples per kind, in editable JSON files
(``modalign/data/synth_prompts/<kind>.json``; ``--prompts DIR`` overrides them).

Robustness: bounded concurrency, retries with backoff (429 / 5xx / timeouts), per-request
timeout; results are appended to ``OUT.partial.jsonl`` as each image finishes (flushed), so a
crash loses at most the requests in flight and a re-run skips finished ids; replies that do not
parse are rejected with a reason (``OUT.rejected.jsonl``) and never written; the final LLaVA JSON
is written atomically.

Annotation inputs: a JSONL of ``{"id", "image", "captions": [...], "objects": [{"category",
"bbox": [x1, y1, x2, y2] normalised}]}`` (what ``modalign data shapes`` writes as
``scenes.jsonl``), or COCO ``instances_*.json`` (+ ``--captions captions_*.json``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from modalign.llm_client import LLMClient, LLMError

KINDS = ("conversation", "detail", "reasoning")
PROMPTS_DIR = Path(__file__).parent / "synth_prompts"
DETAIL_INSTRUCTIONS = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Explain the various aspects of the image before you.",
    "Write an exhaustive depiction of the given image.",
)


class Rejected(ValueError):
    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


# ------------------------------------------------------------------------------ annotations


def read_annotations(path: str | Path, captions: str | Path | None = None) -> list[dict]:
    """-> [{"id", "image", "captions", "objects": [{"category", "bbox"}]}]; errors name the record."""
    path = Path(path)
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path.name}:{n}: not a JSON object ({e})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path.name}:{n}: expected a JSON object, got {type(r).__name__}")
            missing = [k for k in ("id", "image") if k not in r]
            if missing or not (r.get("captions") or r.get("objects")):
                raise ValueError(f"{path.name}:{n}: needs id, image and captions or objects")
            caps = r.get("captions", [])
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise ValueError(f"{path.name}:{n}: captions must be a list of strings")
            objs = r.get("objects", [])
            if not isinstance(objs, list):
                raise ValueError(f"{path.name}:{n}: objects must be a list")
            for j, o in enumerate(objs):
                b = o.get("bbox") if isinstance(o, dict) else None
                if (
                    not isinstance(b, list)
                    or len(b) != 4
                    or not all(
                        isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x <= 1 for x in b
                    )
                ):
                    raise ValueError(f"{path.name}:{n}: objects[{j}].bbox must be 4 numbers in [0, 1]")
                if not isinstance(o.get("category"), str) or not o["category"]:
                    raise ValueError(f"{path.name}:{n}: objects[{j}].category must be a non-empty string")
            out.append({"id": str(r["id"]), "image": r["image"], "captions": list(r.get("captions", [])),
                        "objects": r.get("objects", [])})  # fmt: skip
        return out
    doc = json.loads(path.read_text())
    if "images" not in doc:
        raise ValueError(f"{path.name}: expected COCO JSON with 'images' (or a .jsonl of annotations)")
    cats = {c["id"]: c["name"] for c in doc.get("categories", [])}
    images = {im["id"]: {"id": str(im["id"]), "image": im["file_name"], "captions": [], "objects": [],
                         "_wh": (im["width"], im["height"])} for im in doc["images"]}  # fmt: skip
    for a in doc.get("annotations", []):
        im = images.get(a["image_id"])
        if im is None:
            continue
        if "bbox" in a:
            x, y, w, h = a["bbox"]
            iw, ih = im["_wh"]
            im["objects"].append({"category": cats.get(a["category_id"], str(a["category_id"])),
                                  "bbox": [x / iw, y / ih, (x + w) / iw, (y + h) / ih]})  # fmt: skip
        if "caption" in a:
            im["captions"].append(a["caption"])
    if captions is not None:
        for a in json.loads(Path(captions).read_text()).get("annotations", []):
            if a["image_id"] in images:
                images[a["image_id"]]["captions"].append(a["caption"])
    out = []
    for im in images.values():
        im.pop("_wh")
        if im["captions"] or im["objects"]:
            out.append(im)
    return out


def context(ann: dict) -> str:
    lines = [c.strip() for c in ann["captions"]]
    lines += [f"{o['category']}: [{', '.join(f'{float(x):.3f}' for x in o['bbox'])}]" for o in ann["objects"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ prompts


def load_prompt(kind: str, directory: str | Path | None = None) -> dict:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    f = Path(directory or PROMPTS_DIR) / f"{kind}.json"
    doc = json.loads(f.read_text())
    for k in ("version", "system", "examples"):
        if k not in doc:
            raise ValueError(f"{f}: missing '{k}'")
    return doc


def messages(prompt: dict, ann: dict) -> list[dict]:
    msgs = [{"role": "system", "content": prompt["system"]}]
    for ex in prompt["examples"]:
        msgs += [{"role": "user", "content": ex["context"]}, {"role": "assistant", "content": ex["response"]}]
    return msgs + [{"role": "user", "content": context(ann)}]


# ------------------------------------------------------------------------------ parsing

_QA = re.compile(r"Question:\s*(.+?)\s*Answer:\s*(.+?)\s*(?=(?:===|Question:|\Z))", re.S | re.I)


def parse_reply(kind: str, reply: str, ann: dict) -> list[dict]:
    """Reply -> LLaVA conversation turns, or ``Rejected`` with a reason."""
    text = (reply or "").strip()
    if not text:
        raise Rejected("empty reply", "the model returned nothing")
    if "<image>" in text:  # the record places its one image itself; another would not load
        raise Rejected("image placeholder", "the reply writes <image>, which would place a second image")
    if kind == "detail":
        if re.search(r"^\s*(Question|Answer):", text, re.M):
            raise Rejected("wrong format", "a description was asked for, the reply has Q/A turns")
        if len(text.split()) < 8:
            raise Rejected("too short", f"description of {len(text.split())} words")
        instr = random.Random(ann["id"]).choice(DETAIL_INSTRUCTIONS)
        return [{"from": "human", "value": "<image>\n" + instr}, {"from": "gpt", "value": text}]
    pairs = [(q.strip(), a.strip()) for q, a in _QA.findall(text)]
    pairs = [(q, a) for q, a in pairs if q and a]
    if not pairs:
        raise Rejected("no question/answer", "no 'Question: ... Answer: ...' turns in the reply")
    if kind == "reasoning":
        pairs = pairs[:1]
    turns = []
    for k, (q, a) in enumerate(pairs):
        if "===" in a or "Question:" in a:
            raise Rejected("wrong format", "an answer runs into the next turn")
        turns += [
            {"from": "human", "value": ("<image>\n" if k == 0 else "") + q},
            {"from": "gpt", "value": a},
        ]
    return turns


# ------------------------------------------------------------------------------ running


@dataclass
class Summary:
    total: int = 0
    already_done: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    failed: int = 0

    def to_dict(self, client: LLMClient) -> dict:
        u = client.usage
        return {"images": self.total, "already_done": self.already_done, "accepted": self.accepted,
                "rejected": dict(self.rejected), "failed_requests": self.failed, "requests": u.requests,
                "retries": u.retries, "retry_reasons": u.retry_reasons, "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens}  # fmt: skip


def _records_of(partial: Path, kind: str, version: str) -> dict[str, dict]:
    """The finished records of an earlier run into the same ``--out`` (by id); a file of another
    kind or prompt version is refused (resuming from it would write its records as this run's)."""
    out, other = {}, Counter()
    if partial.is_file():
        for line in partial.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (r.get("kind"), r.get("prompt_version")) != (kind, version):
                other[(r.get("kind"), r.get("prompt_version"))] += 1
            else:
                out.setdefault(r["id"], r)
    if other:
        (k, v), n = other.most_common(1)[0]
        raise ValueError(f"{partial} holds {n} record(s) of kind {k!r}, prompt version {v!r}; this run makes "
                         f"{kind!r}, {version!r}: give another --out, or remove that file to start over")  # fmt: skip
    return out


def _cut_torn_line(path: Path) -> None:
    """A line a crash cut short (no newline at the end) removed, so the next record starts a line
    of its own (appended to it, both were lost)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _append(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def _run(anns, kind, prompt, client, partial, rejected_f, concurrency, summary, progress):
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(anns), desc=f"synthesize {kind}", disable=not progress, dynamic_ncols=True)
    async with httpx.AsyncClient() as http:

        async def one(ann):
            async with sem:
                try:
                    doc = await client.achat(
                        http, messages(prompt, ann), temperature=0.7, max_tokens=1024, raw=True
                    )
                    reply = doc["choices"][0]["message"]["content"] or ""
                    cut = doc["choices"][0].get("finish_reason") == "length"
                except LLMError as e:
                    summary.failed += 1
                    _append(
                        rejected_f,
                        {"id": ann["id"], "reason": "request failed", "message": str(e), "retryable": True},
                    )
                    bar.update(1)
                    return
            try:
                if cut:  # the last turn (or the description) ends mid-sentence
                    raise Rejected("truncated", "the reply reached max_tokens (finish_reason length)")
                turns = parse_reply(kind, reply, ann)
                _append(partial, {"id": ann["id"], "image": ann["image"], "conversations": turns,
                                  "kind": kind, "prompt_version": prompt["version"]})  # fmt: skip
                summary.accepted += 1
            except Rejected as e:
                summary.rejected[e.reason] += 1
                _append(rejected_f, {"id": ann["id"], "reason": e.reason, "message": str(e), "reply": reply,
                                     "kind": kind, "prompt_version": prompt["version"]})  # fmt: skip
            bar.update(1)

        await asyncio.gather(*(one(a) for a in anns))
    bar.close()


def synthesize(annotations, kind: str, client: LLMClient, out: str | Path, concurrency: int = 8,
               limit: int | None = None, prompts_dir=None, captions=None, progress: bool = True) -> dict:  # fmt: skip
    """Generate ``kind`` data for every annotated image; returns the summary."""
    out = Path(out)
    prompt = load_prompt(kind, prompts_dir)
    anns = read_annotations(annotations, captions)[:limit]
    partial = out.with_name(out.stem + ".partial.jsonl")
    rejected_f = out.with_name(out.stem + ".rejected.jsonl")
    for f in (partial, rejected_f):
        _cut_torn_line(f)
    kept = _records_of(partial, kind, prompt["version"])  # before anything is rewritten
    # request failures are retried by a re-run; parsed rejections (of this kind and version) are final
    final_rejects = set()
    if rejected_f.is_file():
        keep = []
        for line in rejected_f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not r.get("retryable"):
                keep.append(line)
                if (r.get("kind"), r.get("prompt_version")) == (kind, prompt["version"]):
                    final_rejects.add(r["id"])
        rejected_f.write_text("".join(x + "\n" for x in keep))
    done = set(kept) | final_rejects
    summary = Summary(total=len(anns), already_done=sum(a["id"] in done for a in anns))
    todo = [a for a in anns if a["id"] not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(_run(todo, kind, prompt, client, partial, rejected_f, concurrency, summary, progress))
    records = [
        {"id": r["id"], "image": r["image"], "conversations": r["conversations"]}
        for r in _records_of(partial, kind, prompt["version"]).values()
    ]
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(out)
    return summary.to_dict(client) | {"written": len(records), "prompt_version": prompt["version"]}
