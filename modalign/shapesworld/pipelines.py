"""The caption pipelines in miniature: PICa, Img2LLM, PNP-VQA and the tool agent answer
ShapesWorld's held-out questions with a frozen LLM reasoning over text that the miniature's own
vision models produce, measured on the same questions as the trained methods.

- captioner: ``tiny-captioner`` (the quickstart's LLaVA model fine-tuned on captions);
- frozen reasoner: stage 0's chat-tuned text LLM (``OUT/stage0/model``), run locally;
- PNP-VQA's matching model: ``tiny-itm`` (BLIP-2's stage-1 Q-Former with its itm head);
- the agent: ``tiny-agent-llm`` (stage 0's LLM tool-tuned on text-only chats) served by
  ``modalign serve`` on loopback, calling the ``vqa`` tool backed by the LLaVA model.

Each row reports accuracy (overall, per type, unseen colour-shape pairs) and the cost: LLM calls,
LLM tokens (prompt and completion) and seconds per question.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import torch

from modalign.data.conversation import Message
from modalign.data.images import ImageProcessor, resolve_image_path
from modalign.data.tokenizer import Tokenizer
from modalign.infer.chat import ChatModel
from modalign.models.mllm import MLLM
from modalign.pipelines.pica import LocalCompleter
from modalign.pipelines.run import (
    PIPELINES,
    Captioner,
    ChatCompleter,
    build_shots,
    load_questions,
    run_pipeline,
    score,
)
from modalign.shapesworld import RECIPES
from modalign.shapesworld.quickstart import METHODS, markdown_table, prepare_data, run_method
from modalign.train.recipe import load_recipe
from modalign.train.run import run_recipe

# the miniature's settings: the stage-0 LLM was trained on 128-token texts, so PICa takes 2 examples
# a prompt (the paper: 16) and Img2LLM 10 answer candidates (the paper: 30); 9 patches make an image
SETTINGS = {"pica": {"n_shot": 2, "n_ensemble": 3}, "img2llm": {"captions_per_image": 5, "n_answers": 10},
            "pnp-vqa": {"num_patches": 3, "num_captions": 3,
                        "qa_format": "A picture shows {context} {question}"}}  # fmt: skip


PARTS = ("captioner", "itm", "agent-llm")  # what the pipelines train besides the quickstart's runs
AGENT_TOOLS = ("vqa",)  # the system turn with one tool is ~600 tokens; each more adds ~170
SHAPES_PIPELINES = (*PIPELINES, "agent")


def agent_chats(records: list[dict], n: int, seed: int = 0, swap: float = 0.5) -> list[dict]:
    """Text-only tool-use chats (LLaVA JSON) from answered questions, written as ``modalign
    serve`` writes a conversation with the agent's tools: the question naming image_1, a vqa call
    with the question, the tool's answer, that answer given. In a ``swap`` share of the chats the
    tool's answer is another question's of the same kind (the same first two words): the
    controller learns to give what the tool saw, not what the question makes likely."""
    from modalign.pipelines.agent import SYSTEM, Experts, ImageTable, vision_tools
    from modalign.serve.tools import ToolSpec, write

    tools = [t.spec() for t in vision_tools(Experts(None), ImageTable(), AGENT_TOOLS)]
    spec = ToolSpec(tools, "auto", True, list(AGENT_TOOLS))
    rng = random.Random(seed)
    kind: dict[str, list[str]] = {}
    for r in records:
        kind.setdefault(" ".join(r["question"].lower().split()[:2]), []).append(r["answer"])
    role = {"system": "system", "user": "human", "assistant": "gpt"}
    out = []
    for r in rng.sample(records, min(n, len(records))):
        q, a = r["question"], r["answer"]
        if rng.random() < swap:
            a = rng.choice(kind[" ".join(q.lower().split()[:2])])
        msgs = [Message("system", SYSTEM), Message("user", f"{q}\n(images: image_1)"), Message("assistant", ""),
                Message("tool", a), Message("assistant", a)]  # fmt: skip
        conv = write(msgs, {2: [("vqa", {"image": "image_1", "question": q})]}, spec)
        out.append(
            {
                "id": f"agent-{r['id']}",
                "conversations": [{"from": role[x.role], "value": x.content} for x in conv],
            }
        )
    return out


def _sets(sets: list[str], part: str) -> list[str]:
    return [x[len(part) + 1 :] for x in sets if x.startswith(part + ".")]


def ensure_parts(
    out: Path, variables: dict, need: set[str], progress: bool, sets: list[str] | None = None
) -> None:
    """Train what the pipelines read and ``out`` lacks: stage 0, the LLaVA miniature (the captioner
    starts from it), ``tiny-captioner``, ``tiny-itm`` and ``tiny-agent-llm``. ``sets``: recipe
    overrides prefixed with the part (``captioner.stages.caption.stop.max_steps=2``; ``stage0.``,
    ``llava.``)."""
    sets = sets or []
    if not (out / "stage0" / "model").is_dir():
        run_recipe(load_recipe(RECIPES / "tiny-stage0.yaml", variables, _sets(sets, "stage0")), out / "stage0",
                   progress=progress)  # fmt: skip
    if not (out / "llava" / "model").is_dir():
        run_method("llava", out, variables, _sets(sets, "llava"), progress)
    if "agent-llm" in need and not (out / "agent-llm" / "model").is_dir():
        train = [r for r in load_questions(Path(variables["data"]) / "instruct.json") if r["answer"]]
        chats = out / "agent-llm" / "chats.json"
        chats.parent.mkdir(parents=True, exist_ok=True)
        chats.write_text(json.dumps(agent_chats(train, 4000)))
    for name, recipe in (
        ("captioner", "tiny-captioner"),
        ("itm", "tiny-itm"),
        ("agent-llm", "tiny-agent-llm"),
    ):
        if name in need and not (out / name / "model").is_dir():
            run_recipe(load_recipe(RECIPES / f"{recipe}.yaml", variables, _sets(sets, name)), out / name,
                       progress=progress)  # fmt: skip


def heldout_subset(data: Path, images: int) -> list[dict]:
    """The held-out questions about the first ``images`` held-out images."""
    recs = load_questions(data / "eval.json")
    keep = set(list(dict.fromkeys(r["image"] for r in recs))[:images])
    return [r for r in recs if r["image"] in keep]


def method_on_subset(out: Path, method: str, records: list[dict]) -> dict | None:
    """A trained method's accuracy on the same questions, from its evaluation's samples."""
    f = out / method / "eval_samples.jsonl"
    if not f.is_file():
        return None
    pred = {s["id"]: s["prediction"] for s in map(json.loads, f.read_text().splitlines())}
    if not all(r["id"] in pred for r in records):
        return None
    return score(records, [pred[r["id"]] for r in records])


def run_pipelines(names: list[str], out: str | Path = "runs/quickstart", images: int = 100,
                  progress: bool = True, seed: int = 0, sets: list[str] | None = None) -> list[dict]:  # fmt: skip
    """Run the named pipelines on the held-out questions about the first ``images`` images of the
    quickstart run in ``out`` (training what they read where it is missing); write
    ``OUT/pipelines/<name>.json`` and ``comparison.json`` (with the trained methods found in
    ``out`` on the same questions) and return the rows."""
    for n in names:
        if n not in SHAPES_PIPELINES:
            raise ValueError(f"unknown pipeline {n!r}; known: {', '.join(SHAPES_PIPELINES)}")
    out = Path(out)
    data = out / "data"
    prepare_data(data)
    variables = {"data": str(data), "stage0": str(out / "stage0"), "out": str(out)}
    need = (
        {"captioner"}
        | ({"itm"} if "pnp-vqa" in names else set())
        | ({"agent-llm"} if "agent" in names else set())
    )
    ensure_parts(out, variables, need, progress, sets or [])
    torch.manual_seed(seed)
    tok = Tokenizer.from_dir(data / "tokenizer")
    cm = ChatModel.load(out / "captioner" / "model", template="chatml", dtype="float32", device="cpu")
    captioner = Captioner(cm)
    llm = MLLM.from_pretrained(out / "stage0" / "model", dtype=torch.float32)
    records = heldout_subset(data, images)
    paths = list(dict.fromkeys(r["image"] for r in records))
    pixels = {p: cm.images(resolve_image_path(data, p, p)) for p in paths}
    rows = []
    for name in names:
        if name == "agent":
            rows.append(_agent_row(out, data, records, cm, progress))
            continue
        kw = dict(SETTINGS[name])
        if name == "pica":  # the training questions about as many training images, as examples
            train = [r for r in load_questions(data / "instruct.json") if len(r["conversations"]) == 2]
            keep = set(list(dict.fromkeys(r["image"] for r in train))[:images])
            train = [r for r in train if r["image"] in keep]
            spx = {
                p: cm.images(resolve_image_path(data, p, p)) for p in dict.fromkeys(r["image"] for r in train)
            }
            kw["shots"] = build_shots(train, spx, captioner, llm, tok)
            completer = LocalCompleter(llm, tok)  # PICa's prompt is plain text, as a base LM reads it
        elif name == "img2llm":
            completer = LocalCompleter(llm, tok)
        else:  # the prompted-LLM stand-in for UnifiedQA: the stage-0 LLM in its chat form
            completer = ChatCompleter(llm, tok)
            itm = MLLM.from_pretrained(out / "itm" / "model", dtype=torch.float32)
            kw["itm"] = (itm, tok)
            proc = ImageProcessor(itm.config.vision)
            kw["itm_pixels"] = {p: proc(resolve_image_path(data, p, p)) for p in paths}
        run = run_pipeline(name, records, pixels, captioner, completer, llm=llm, tok=tok, progress=progress,
                           seed=seed, **kw)  # fmt: skip
        row = {"method": name, **score(records, run.predictions), "llm_calls": run.llm_calls,
               "llm_tokens": run.llm_tokens, "caption_calls": run.caption_calls,
               "seconds_per_question": run.seconds / max(len(records), 1), "settings": run.settings}  # fmt: skip
        rows.append(row)
        _write(out, row, run.samples)
    for m in METHODS:
        r = method_on_subset(out, m, records)
        if r is not None:
            rows.append({"method": m, **r, "trained": True})
    (out / "pipelines" / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_rows(rows, out / "pipelines" / "comparison.png")
    print(format_rows(rows))
    return rows


def plot_rows(rows: list[dict], png: Path) -> None:
    """Held-out accuracy per question type, one group of bars per row (pipelines and trained
    methods on the same questions), the pipelines' LLM tokens per question in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted({t for r in rows for t in r["accuracy_by_type"]})
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    w = 0.8 / max(len(rows), 1)
    for k, r in enumerate(rows):
        n = max(r["questions"], 1)
        cost = "trained" if r.get("trained") else f"{r['llm_tokens'] / n:.0f} LLM tokens/q"
        ax.bar([i + (k - (len(rows) - 1) / 2) * w for i in range(len(types))],
               [r["accuracy_by_type"].get(t, 0) for t in types], w,
               label=f"{r['method']} {r['heldout_accuracy']:.1%} ({cost})")  # fmt: skip
    ax.set_xticks(range(len(types)), types)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("ShapesWorld: frozen LLMs over captions and tools vs trained methods")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _write(out: Path, row: dict, samples: list[dict]) -> None:
    (out / "pipelines").mkdir(parents=True, exist_ok=True)
    (out / "pipelines" / f"{row['method']}.json").write_text(json.dumps(row, indent=2) + "\n")
    with (out / "pipelines" / f"{row['method']}_samples.jsonl").open("w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")


def _agent_row(out: Path, data: Path, records: list[dict], captioner_cm: ChatModel, progress: bool) -> dict:
    """The agent on the held-out questions: ``tiny-agent-llm`` served by ``modalign serve`` on
    loopback drives the tools; the LLaVA model answers behind vqa."""
    from tqdm.auto import tqdm

    from modalign.llm_client import LLMClient
    from modalign.pipelines.agent import Experts, vision_agent
    from modalign.serve.app import ServeConfig, create_app
    from modalign.serve.server import serve_in_thread

    ctl = ChatModel.load(out / "agent-llm" / "model", template="chatml", dtype="float32", device="cpu")
    vqa = ChatModel.load(out / "llava" / "model", template="chatml", dtype="float32", device="cpu")
    experts = Experts(captioner_cm, vqa, max_new_tokens=8)
    url, stop = serve_in_thread(create_app(ctl, ServeConfig(model_name="agent-llm")))
    preds, samples, calls, tokens, tool_calls = [], [], 0, 0, 0
    stops: dict[str, int] = {}
    t0 = time.perf_counter()
    try:
        from concurrent.futures import ThreadPoolExecutor

        client = LLMClient(url + "/v1", "agent-llm")
        local = threading.local()  # an agent per worker: each holds the image table of its question

        def one(r):
            if not hasattr(local, "agent"):
                local.agent = vision_agent(client, experts, AGENT_TOOLS, max_steps=4, max_tokens=8192,
                                           max_reply_tokens=128)  # fmt: skip
            return local.agent.run(
                r["question"], {"image_1": str(resolve_image_path(data, r["image"], r["id"]))}
            )

        with ThreadPoolExecutor(4) as pool:  # concurrent requests share the server's decode batches
            results = list(
                tqdm(pool.map(one, records), total=len(records), desc="agent", disable=not progress)
            )
        for r, res in zip(records, results, strict=True):
            preds.append(res.answer or "")
            calls, tokens, tool_calls = (
                calls + res.llm_calls,
                tokens + res.tokens,
                tool_calls + res.tool_calls,
            )
            stops[res.stop] = stops.get(res.stop, 0) + 1
            samples.append({"id": r["id"], "prediction": res.answer, "stop": res.stop, "steps": res.steps})
    finally:
        stop()
    row = {"method": "agent", **score(records, preds), "llm_calls": calls, "llm_tokens": tokens,
           "caption_calls": experts.calls, "seconds_per_question": (time.perf_counter() - t0) / max(len(records), 1),
           "settings": {"tools": list(AGENT_TOOLS), "max_steps": 4, "tool_calls": tool_calls, "stops": stops}}  # fmt: skip
    _write(out, row, samples)
    return row


def format_rows(rows: list[dict]) -> str:
    types = sorted({t for r in rows for t in r["accuracy_by_type"]})
    head = ["method", "held-out", "unseen pairs", *types, "LLM calls/q", "LLM tokens/q", "s/q"]
    lines = []
    for r in rows:
        n = max(r["questions"], 1)
        u = r["unseen_pairs_accuracy"]
        cost = ["-", "-", "-"] if r.get("trained") else [
            f"{r['llm_calls'] / n:.1f}", f"{r['llm_tokens'] / n:.0f}", f"{r['seconds_per_question']:.2f}"]  # fmt: skip
        lines.append([r["method"], f"{r['heldout_accuracy']:.1%}", "-" if u is None else f"{u:.1%}",
                      *(f"{r['accuracy_by_type'].get(t, 0):.0%}" for t in types), *cost])  # fmt: skip
    return markdown_table(head, lines)
