"""An MM-REACT / Visual ChatGPT-style agent: an LLM with tool calls (OpenAI ``tools`` over any
compatible endpoint, ``modalign serve`` included) decides which vision experts to call, observes
what they return and answers.

As in MM-REACT, the LLM never sees pixels: the user's message names each image by an id
(``image_1``), and the experts take that id as their ``image`` argument. Only the images given
to ``Agent.run`` can be named (an id or one of their paths); anything else is an error the LLM
observes. The loop is bounded: at most ``max_steps`` LLM calls (the last one with
``tool_choice: none``, so that it answers), and ``max_tokens`` LLM tokens over the whole run
(usage as the endpoint reports it; past it the run stops without an answer). Every step is
logged (``AgentResult.steps``; ``log`` writes each as a JSON line as it happens).

Experts (``vision_tools``), each a modalign model asked a fixed prompt:
``caption(image)``, ``vqa(image, question)``, ``list_objects(image)``, ``count(image, object)``
and ``read_text(image)``; ``Tool`` makes any other.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from modalign.llm_client import LLMError

SYSTEM = (
    "Answer the question about the images. You cannot see them: call the tools with an image's id "
    "(image_1, ...) to look, then answer in a few words."
)


@dataclass
class Tool:
    """A function the LLM may call: name, description, JSON-Schema parameters and ``run``
    (arguments -> observation text)."""

    name: str
    description: str
    parameters: dict
    run: Callable[[dict], str]

    def spec(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}  # fmt: skip


def _params(**props: str) -> dict:
    return {"type": "object", "properties": {k: {"type": "string", "description": v} for k, v in props.items()},
            "required": list(props)}  # fmt: skip


class Experts:
    """The vision experts behind the tools: ``captioner`` and ``vqa`` are ``ChatModel``s (the same
    one may serve both)."""

    def __init__(self, captioner, vqa=None, caption_prompt: str = "Describe the image briefly.",
                 max_new_tokens: int = 64):  # fmt: skip
        self.captioner, self.vqa = captioner, vqa or captioner
        self.caption_prompt, self.max_new_tokens = caption_prompt, max_new_tokens
        self.calls = 0
        self.lock = threading.Lock()  # agents in several threads share the experts

    def ask(self, cm, image: str, prompt: str) -> str:
        from modalign.infer.chat import user_message

        with self.lock:
            self.calls += 1
            r = cm.reply([user_message(prompt, 1)], [image], cm.params(max_new_tokens=self.max_new_tokens))
        return r.text.strip()


def vision_tools(experts: Experts, resolve: ImageTable,
                 names: tuple[str, ...] = ("caption", "vqa", "list_objects", "count", "read_text")) -> list[Tool]:  # fmt: skip
    """The expert tools; ``resolve`` (the agent's ``ImageTable``) turns the image the LLM names
    into a file."""
    e = experts
    img = "image id"
    made = {
        "caption": Tool("caption", "Describe an image in one sentence.", _params(image=img),
                        lambda a: e.ask(e.captioner, resolve(a["image"]), e.caption_prompt)),
        "vqa": Tool("vqa", "Answer a short question about an image.", _params(image=img, question="a question"),
                    lambda a: e.ask(e.vqa, resolve(a["image"]), a["question"])),
        "list_objects": Tool("list_objects", "List the objects in an image.", _params(image=img),
                             lambda a: e.ask(e.vqa, resolve(a["image"]), "List the objects in the image.")),
        "count": Tool("count", "Count the objects of a kind in an image.",
                      _params(image=img, object="what to count"),
                      lambda a: e.ask(e.vqa, resolve(a["image"]), f"How many {a['object']} are there?")),
        "read_text": Tool("read_text", "Read the text written in an image.", _params(image=img),
                          lambda a: e.ask(e.vqa, resolve(a["image"]), "What word is written in the image?")),
    }  # fmt: skip
    unknown = [n for n in names if n not in made]
    if unknown:
        raise ValueError(f"unknown agent tool(s) {', '.join(unknown)}; known: {', '.join(made)}")
    return [made[n] for n in names]


@dataclass
class AgentResult:
    answer: str | None
    stop: str  # "answer" | "max_steps" | "max_tokens" | "error" (the endpoint failed or answered malformed)
    steps: list[dict] = field(default_factory=list)
    llm_calls: int = 0
    tokens: int = 0
    tool_calls: int = 0


class Agent:
    def __init__(self, client, tools: list[Tool], table: ImageTable | None = None, max_steps: int = 6,
                 max_tokens: int = 4096, max_reply_tokens: int = 256, system: str = SYSTEM,
                 log: str | Path | None = None):  # fmt: skip
        if max_steps < 1 or max_tokens < 1:
            raise ValueError(
                f"the agent needs max_steps >= 1 and max_tokens >= 1, got {max_steps}, {max_tokens}"
            )
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"agent tools must have distinct names, got {names}")
        self.client, self.tools = client, {t.name: t for t in tools}
        self.max_steps, self.max_tokens, self.max_reply_tokens = max_steps, max_tokens, max_reply_tokens
        self.system, self.log = system, Path(log) if log else None
        self.table = table if table is not None else ImageTable()

    def _record(self, result: AgentResult, step: dict) -> None:
        result.steps.append(step)
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(json.dumps(step) + "\n")

    def _observe(self, name: str, raw_args) -> str:
        tool = self.tools.get(name)
        if tool is None:
            return f"error: no tool named {name!r}; the tools are {', '.join(self.tools)}"
        try:  # a JSON string, as the API sends it (some endpoints send the object itself)
            args = raw_args if isinstance(raw_args, dict) else json.loads(raw_args or "{}")
        except (TypeError, ValueError, RecursionError):
            return f"error: the arguments of {name} are not JSON: {str(raw_args)[:200]!r}"
        if not isinstance(args, dict):
            return f"error: the arguments of {name} must be a JSON object"
        missing = [k for k in tool.parameters.get("required", []) if not isinstance(args.get(k), str)]
        if missing:
            return f"error: {name} needs the argument(s) {', '.join(missing)}"
        try:
            return str(tool.run(args))
        except Exception as e:  # noqa: BLE001 - a failing expert is an observation, the run goes on
            return f"error: {type(e).__name__}: {e}" if not isinstance(e, ValueError) else f"error: {e}"

    def run(self, question: str, images: dict[str, str] | list[str]) -> AgentResult:
        """Answer ``question`` about ``images`` (id -> path, or paths: ids image_1, image_2, ...)."""
        if isinstance(images, list):
            images = {f"image_{i + 1}": p for i, p in enumerate(images)}
        self.table.images = dict(images)
        names = ", ".join(images)
        user = f"{question}\n(images: {names})" if images else question
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": user}]
        specs = [t.spec() for t in self.tools.values()]
        result = AgentResult(None, "max_steps")
        for step in range(self.max_steps):
            last = step == self.max_steps - 1
            t0 = time.perf_counter()
            try:
                doc = self.client.chat(messages, temperature=0.0, max_tokens=self.max_reply_tokens,
                                       extra={"tools": specs, "tool_choice": "none" if last else "auto"}, raw=True)  # fmt: skip
                result.llm_calls += 1
                result.tokens += int((doc.get("usage") or {}).get("total_tokens") or 0)
                msg = doc["choices"][0]["message"]
                if not isinstance(msg, dict) or not isinstance(msg.get("tool_calls") or [], list):
                    raise TypeError("the message is not an object with a tool_calls list")
                calls = msg.get("tool_calls") or []
            except (LLMError, KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
                result.stop = "error"
                self._record(result, {"step": step, "error": f"{type(e).__name__}: {e}"[:500], "tool_calls": [],
                                      "tokens": result.tokens, "seconds": time.perf_counter() - t0})  # fmt: skip
                return result
            entry = {"step": step, "content": msg.get("content"), "tool_calls": [], "tokens": result.tokens,
                     "seconds": 0.0}  # fmt: skip
            if not calls:
                result.answer, result.stop = (msg.get("content") or "").strip(), "answer"
                entry["seconds"] = time.perf_counter() - t0
                self._record(result, entry)
                return result
            messages.append({"role": "assistant", "content": msg.get("content"), "tool_calls": calls})
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                fn = fn if isinstance(fn, dict) else {}  # no object: an unknown tool, told to the LLM
                obs = self._observe(fn.get("name"), fn.get("arguments") or "{}")
                result.tool_calls += 1
                entry["tool_calls"].append({"name": fn.get("name"), "arguments": fn.get("arguments"),
                                            "observation": obs})  # fmt: skip
                messages.append({"role": "tool", "tool_call_id": (c.get("id") if isinstance(c, dict) else "") or "",
                                 "content": obs})  # fmt: skip
            entry["seconds"] = time.perf_counter() - t0
            self._record(result, entry)
            if result.tokens >= self.max_tokens:
                result.stop = "max_tokens"
                return result
        return result


class ImageTable:
    """The images of the current run: an id (or one of their paths) -> the path; anything else a
    ValueError (the LLM cannot make an expert open another file)."""

    def __init__(self, images: dict[str, str] | None = None):
        self.images = dict(images or {})

    def __call__(self, ref: str) -> str:
        ref = str(ref).strip()
        if ref in self.images:
            return self.images[ref]
        if ref in self.images.values():
            return ref
        raise ValueError(f"unknown image {ref!r}; the images are {', '.join(self.images) or 'none'}")


def vision_agent(client, experts: Experts, tools: tuple[str, ...] = ("caption", "vqa", "list_objects", "count",
                                                                     "read_text"), **kw) -> Agent:  # fmt: skip
    """An agent over the expert tools ``tools`` (``Agent``'s keywords in ``kw``)."""
    table = ImageTable()
    return Agent(client, vision_tools(experts, table, tools), table, **kw)
