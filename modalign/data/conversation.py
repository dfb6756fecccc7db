"""Conversations and chat templates, rendered in one pass into ``(input_ids, labels)``.

A template turns messages into one string plus the character spans that carry loss (each
assistant reply and its end-of-turn). The string is tokenised once (split only at image
marks), and a token is trained iff its character span overlaps a loss span:

    text  : <s>SYSTEM USER: ◆ what colour? ASSISTANT: red</s>USER: ...
    spans :                                          [-------]
    ids   :  1  ...  [img x N]  ...                   ' red' '</s>'
    labels: -100 ... -100 ...                          ' red' '</s>'

Built-in templates: plain, interleaved, vicuna_v1, llava_v1, chatml, llama3, mistral_instruct, mplug_owl,
mplug_owl2, internlm2, blip2, minigpt4, alpaca; ``jinja``
renders a checkpoint's own ``chat_template`` in a sandboxed Jinja environment, as transformers'
``apply_chat_template`` does, with its replies' spans from ``{% generation %}`` blocks or by probing
(see ``JinjaTemplate``).
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from modalign.data.tokenizer import Tokenizer

IGNORE_INDEX = -100
IMAGE_MARK = "\ue000"  # where an image goes inside message text (private-use code point)
IMAGE_PLACEHOLDER = "<image>"  # where an image goes in data set text (LLaVA JSON, messages)
_OPEN, _CLOSE = "\ue001", "\ue002"  # reserved (sentinels of earlier versions; the server strips them)
_IN, _OUT = "\ue003", "\ue004"
RESERVED = {ord(c): None for c in (_OPEN, _CLOSE, _IN, _OUT)}  # removed from message text (not Jinja's)
ROLES = ("system", "user", "assistant")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` is a short code counted by the skip policy."""

    def __init__(self, reason: str, message: str, sample_id: str | None = None):
        self.reason, self.sample_id = reason, sample_id
        super().__init__(f"sample {sample_id}: {message}" if sample_id is not None else message)


@dataclass
class Message:
    role: str
    content: str  # text; IMAGE_MARK where an image goes
    # an assistant's tool calls, [{"type": "function", "function": {"name": ..., "arguments": {...}}}],
    # for a checkpoint's Jinja template that writes them (modalign serve's tool calls)
    tool_calls: list | None = None

    @property
    def num_images(self) -> int:
        return self.content.count(IMAGE_MARK)


@dataclass
class Conversation:
    messages: list[Message]
    images: list[Any] = field(default_factory=list)  # paths (relative to a root) or PIL images
    id: str = ""
    source: str = ""

    def validate(self) -> None:
        if not self.messages:
            raise BadSample("empty conversation", "has no messages", self.id)
        for m in self.messages:
            if m.role not in ROLES:
                raise BadSample(
                    "unknown role", f"unknown role {m.role!r} (expected {', '.join(ROLES)})", self.id
                )
        if not any(m.role == "assistant" for m in self.messages):
            raise BadSample("empty conversation", "has no assistant reply to learn from", self.id)
        marks = sum(m.num_images for m in self.messages)
        if marks != len(self.images):
            raise BadSample(
                "image count mismatch",
                f"has {marks} image placeholder(s) in its text but {len(self.images)} image(s)",
                self.id,
            )

    @property
    def is_text_only(self) -> bool:
        return not self.images


# ------------------------------------------------------------------------------ templates


class Template:
    """Render messages to (text, loss spans, content spans). Subclasses define ``_render``, which
    appends (text, trained) pieces, or (text, trained, True) for a message's own content: the
    content spans are tokenized as text, so a user cannot write the template's control tokens."""

    name = "base"
    # the sequence starts with the tokenizer's BOS id and the text is tokenized as a fresh input
    # after it, as the reference code does (``tokenizer(prompt)`` adds BOS; a SentencePiece
    # tokenizer then puts its ``▁`` prefix on the first word: "<s>▁A chat", not "<s>A chat")
    bos_first = False
    stop_tokens: tuple[str, ...] = ()  # tokens that end a reply besides EOS (its end-of-turn)
    stop_strings: tuple[str, ...] = ()  # text that ends a reply where no single token does
    needs_image = False  # a sample without an image trains nothing (``interleaved``)

    def render(
        self, messages: list[Message], tok: Tokenizer, add_generation_prompt: bool = False, tools=None
    ):
        if tools or any(m.tool_calls for m in messages):
            raise ValueError(
                f"template {self.name!r} does not write tools or tool calls (a Jinja template does)"
            )
        parts: list[tuple] = []  # (text, trained[, content])
        self._render(_clean(messages), tok, parts, add_generation_prompt)
        text, spans, content, pos = [], [], [], 0
        for s, trained, *is_content in parts:
            if trained and s:
                spans.append((pos, pos + len(s)))
            if is_content and is_content[0] and s:
                content.append((pos, pos + len(s)))
            text.append(s)
            pos += len(s)
        return "".join(text), spans, content

    def _render(self, messages, tok, out, gen):  # pragma: no cover - interface
        raise NotImplementedError


def _specials(tok: Tokenizer) -> tuple[str, str]:
    return tok.bos_token or "<s>", tok.eos_token or "</s>"


def _clean(messages: list[Message]) -> list[Message]:
    """Messages without modalign's reserved sentinel characters (they mark spans while rendering)."""
    return [Message(m.role, m.content.translate(RESERVED), m.tool_calls) for m in messages]


class PlainTemplate(Template):
    """Stage-1 captions: images + caption + newline; loss on caption and newline."""

    name = "plain"
    bos_first = True

    def _render(self, messages, tok, out, gen):
        for m in messages:
            if m.role == "user":
                out.append((IMAGE_MARK * m.num_images, False))
            elif m.role == "assistant":
                out.append((m.content.replace(IMAGE_MARK, ""), True, True))
                out.append(("\n", True))


class InterleavedTemplate(Template):
    """Interleaved image-text documents (MMC4, OBELICS) and image-caption pairs as a Flamingo-style
    model trains on them (OpenFlamingo's ``train_utils``): an assistant message's text with each
    image where it stands in it, then EOS; the loss on that text after the sample's first image
    (text before any image has none to read) and never on an image token. A document is one
    assistant message with ``<image>`` where each image goes; a caption pair is an ``<image>`` turn
    and its caption. Other turns give only their images, in place, as ``plain``'s do (their words
    are an instruction, not the document's text), so a chat prompt is its images and the model
    goes on with the text that follows them. A sample without an image trains nothing and is
    refused. OpenFlamingo ends each image's chunk with an added ``<|endofchunk|>`` token; here
    the sample's EOS alone is learnt."""

    name = "interleaved"
    bos_first = True
    needs_image = True

    def _render(self, messages, tok, out, gen):
        _, eos = _specials(tok)
        seen = False  # an image came before
        for m in messages:
            if m.role != "assistant":
                if m.num_images:
                    out.append((IMAGE_MARK * m.num_images, False))
                    seen = True
                continue
            for i, piece in enumerate(m.content.split(IMAGE_MARK)):
                if i:
                    out.append((IMAGE_MARK, False))
                    seen = True
                if piece:
                    out.append((piece, seen, True))
            out.append((eos, seen))


class SepTemplate(Template):
    """Vicuna v1 / LLaVA v1: ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``."""

    bos_first = True

    def __init__(self, name: str, system: str | None):
        self.name, self.system = name, system  # None: no system part (mPLUG-Owl2's TWO_NO_SYS)

    def _render(self, messages, tok, out, gen):
        _, eos = _specials(tok)
        system = next((m.content for m in messages if m.role == "system"), None)
        if system is not None or self.system is not None:
            out.append((self.system, False) if system is None else (system, False, True))
            out.append((" ", False))
        for m in messages:
            if m.role == "user":
                out += [("USER: ", False), (m.content, False, True), (" ", False)]
            elif m.role == "assistant":
                out.append(("ASSISTANT: ", False))
                out += [(m.content, True, True), (eos, True)]
        if gen:
            out.append(("ASSISTANT:", False))


class ChatMLTemplate(Template):
    """``<|im_start|>role\ncontent<|im_end|>\n``; InternLM2 / XComposer2 write the same with
    ``[UNUSED_TOKEN_146]`` / ``[UNUSED_TOKEN_145]`` after a BOS."""

    def __init__(self, name: str = "chatml", start: str = "<|im_start|>", end: str = "<|im_end|>",
                 bos_first: bool = False):  # fmt: skip
        self.name, self.start, self.end, self.bos_first = name, start, end, bos_first
        self.stop_tokens = (end,)

    def _render(self, messages, tok, out, gen):
        for m in messages:
            out.append((f"{self.start}{m.role}\n", False))
            if m.role == "assistant":
                out += [(m.content, True, True), (self.end, True), ("\n", False)]
            else:
                out += [(m.content, False, True), (f"{self.end}\n", False)]
        if gen:
            out.append((f"{self.start}assistant\n", False))


class Llama3Template(Template):
    name = "llama3"

    def _render(self, messages, tok, out, gen):
        out.append(("<|begin_of_text|>", False))
        for m in messages:
            out.append((f"<|start_header_id|>{m.role}<|end_header_id|>\n\n", False))
            out += [(m.content.strip(), m.role == "assistant", True), ("<|eot_id|>", m.role == "assistant")]
        if gen:
            out.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))


class MistralTemplate(Template):
    """``<s>[INST] q [/INST] a</s>[INST] ...``; a system message is prepended to the first query."""

    name = "mistral_instruct"
    bos_first = True

    def _render(self, messages, tok, out, gen):
        _, eos = _specials(tok)
        system = next((m.content for m in messages if m.role == "system"), None)
        first = True
        for m in messages:
            if m.role == "user":
                out.append(("[INST] ", False))
                if first and system:
                    out += [(system, False, True), ("\n\n", False)]
                out += [(m.content, False, True), (" [/INST]", False)]
                first = False
            elif m.role == "assistant":
                out.append((" ", False))
                out += [(m.content, True, True), (eos, True)]


OWL_SYSTEM = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class OwlTemplate(Template):
    """mPLUG-Owl: ``SYSTEM\nHuman: <image>\nHuman: q\nAI: a</s>``; each image is a "Human:" line
    of its own, before the turn's text (the release's prompts)."""

    name = "mplug_owl"
    bos_first = True

    def _render(self, messages, tok, out, gen):
        _, eos = _specials(tok)
        system = next((m.content for m in messages if m.role == "system"), None)
        out.append((OWL_SYSTEM, False) if system is None else (system, False, True))
        for m in messages:
            if m.role == "user":
                text = " ".join(p.strip("\n") for p in m.content.split(IMAGE_MARK) if p.strip("\n"))
                out += [("\nHuman: ", False), (IMAGE_MARK, False)] * m.num_images
                out += [("\nHuman: ", False), (text, False, True)]
            elif m.role == "assistant":
                out += [("\nAI: ", False), (m.content, True, True), (eos, True)]
        if gen:
            out.append(("\nAI: ", False))


class Blip2Template(Template):
    """BLIP-2 / InstructBLIP: the images' query placeholders, then the prompt as the tokenizer
    encodes it on its own (a BOS before it where the tokenizer has one, as OPT's and Llama's do; an
    EOS after it where it has none, as T5's does); a reply follows with its EOS."""

    name = "blip2"

    def _render(self, messages, tok, out, gen):
        _, eos = _specials(tok)
        for m in messages:
            if m.role == "user":
                text = "".join(m.content.split(IMAGE_MARK)).strip("\n")
                out.append((IMAGE_MARK * m.num_images, False))
                if tok.bos_token:
                    out += [(tok.bos_token, False), (text, False, True)]
                else:
                    out += [(text, False, True), (eos, False)]
            elif m.role == "assistant":
                out += [(m.content, True, True), (eos, True)]


class MiniGPT4Template(Template):
    """MiniGPT-4 (Vicuna v0): ``###Human: <Img>◆</Img> q ###Assistant: a###``, the release's
    stage-2 prompt template (``'###Human: {} ###Assistant: '``, the reply ended by ``###``); an
    image stands in ``<Img>...</Img>`` where the message puts it. A system message, as the demo's
    conversation has one, goes first; a reply's closing ``###`` opens the next turn (``a###Human:``),
    as the release's conversation joins turns. Generation stops at ``###``."""

    name = "minigpt4"
    bos_first = True
    stop_strings = ("###",)

    def _render(self, messages, tok, out, gen):
        system = next((m.content for m in messages if m.role == "system"), None)
        if system is not None:
            out.append((system, False, True))
        after_reply = False  # a reply's closing ### also opens the next turn
        for m in messages:
            if m.role == "user":
                out.append(("Human: " if after_reply else "###Human: ", False))
                pieces = [p.strip() for p in m.content.split(IMAGE_MARK)]
                for i, p in enumerate(pieces):
                    if i:
                        out.append(
                            (
                                ("<Img>" if i == 1 and not pieces[0] else " <Img>") + IMAGE_MARK + "</Img>",
                                False,
                            )
                        )
                    if p:
                        out += [(" " if i else "", False), (p, False, True)]
                out.append((" ", False))
            elif m.role == "assistant":
                out += [("###Assistant: ", False), (m.content, True, True), ("###", True)]
            after_reply = m.role == "assistant"
        if gen:
            out.append(("###Assistant: ", False))


ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


class AlpacaTemplate(Template):
    """Alpaca's prompt, as Stanford Alpaca and LLaMA-Adapter (V1 and V2) train and generate with it:

        <s>PREAMBLE\n\n### Instruction:\nq\n\n### Response:a</s>
        <s>PREAMBLE_INPUT\n\n### Instruction:\nq\n\n### Input:\nx\n\n### Response:a</s>

    The reply follows the colon directly and is trained with its EOS; the prompt to generate from
    ends at ``### Response:``. The input variant: a user message followed directly by another user
    message (an Alpaca record's ``instruction``, then its ``input``; more than one after the first
    are joined with blank lines), whose first turn also picks the preamble that says so. A system
    message takes the preamble's place. Alpaca is single-turn and LLaMA-Adapter's releases have no
    multi-turn form of it (their chatbot speaks Vicuna's ``###Human:``): a later turn repeats the
    blocks after the previous reply's EOS, ``a</s>\n\n### Instruction:\nq2\n\n### Response:``.
    An image stands where the message puts it (LLaVA data: at the instruction's start, where the
    release's prompts keep the ``<image>`` text of LLaVA's questions)."""

    name = "alpaca"
    bos_first = True

    def _render(self, messages, tok, out, gen):
        _, eos = _specials(tok)
        turns: list[tuple[str, list[str]]] = []  # ("user", [instruction, *inputs]) | ("assistant", [reply])
        for m in messages:
            if m.role == "user" and turns and turns[-1][0] == "user":
                turns[-1][1].append(m.content)
            elif m.role in ("user", "assistant"):
                turns.append((m.role, [m.content]))
        system = next((m.content for m in messages if m.role == "system"), None)
        if system is None:
            first = next((body for role, body in turns if role == "user"), [])
            out.append((ALPACA_SYSTEM_INPUT if len(first) > 1 else ALPACA_SYSTEM, False))
        else:
            out.append((system, False, True))
        gap = "\n\n" if system != "" else ""  # blocks are separated by a blank line
        for role, body in turns:
            if role == "user":
                out += [(f"{gap}### Instruction:\n", False), (body[0], False, True)]
                for k, x in enumerate(body[1:]):
                    out += [("\n\n" if k else "\n\n### Input:\n", False), (x, False, True)]
            else:
                out += [(f"{gap}### Response:", False), (body[0], True, True), (eos, True)]
            gap = "\n\n"
        if gen:
            out.append((f"{gap}### Response:", False))


class _GenerationTracker:
    """Jinja extension for ``{% generation %}...{% endgeneration %}`` (the convention of
    transformers' ``return_assistant_tokens_mask``): the block renders its body unchanged and, while
    a render is tracked, records the body's character span in the output. Positions come from the
    output streamed so far by ``Template.generate``; the caller checks that each recorded span holds
    the body (a block inside a macro or a captured ``set`` block would not)."""

    _active: ContextVar = ContextVar("modalign_generation_spans", default=None)

    @classmethod
    def make(cls):
        from jinja2 import nodes
        from jinja2.ext import Extension

        class Generation(Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

            def _block(self, caller):
                body = caller()
                state = cls._active.get()
                if state is not None:
                    chunks, spans = state
                    start = sum(map(len, chunks))
                    spans.append((start, start + len(body), body))
                return body

        return Generation


def _strings(x):
    """Every string inside ``x`` (nested dicts, lists; keys included)."""
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(x, list | tuple):
        for v in x:
            yield from _strings(v)


def _map_strings(x, f):
    """``x`` with ``f`` applied to every string inside it (keys included)."""
    if isinstance(x, str):
        return f(x)
    if isinstance(x, dict):
        return {_map_strings(k, f): _map_strings(v, f) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_map_strings(v, f) for v in x]
    return x


def _fresh_chars(avoid: str, n: int) -> list[str]:
    """``n`` characters (Supplementary Private Use Area-A) that do not occur in ``avoid``."""
    out, cp = [], 0xF0000
    while len(out) < n:
        if chr(cp) not in avoid:
            out.append(chr(cp))
        cp += 1
    return out


class JinjaTemplate(Template):
    """A checkpoint's own ``chat_template``, rendered in a sandboxed Jinja environment exactly as
    transformers' ``apply_chat_template`` renders it (same environment options and helpers), for
    the real messages: nothing is inserted into the text the template sees or writes.

    Loss spans (the assistant replies as the template renders them, ``| trim`` and all):

    - a template with ``{% generation %}`` blocks: the blocks' spans, exactly (the mask of
      ``return_assistant_tokens_mask``); nothing is added to them.
    - otherwise, by probing: for each assistant message the conversation is rendered twice more,
      once with a probe character (one that occurs nowhere in the template or the messages) put
      before the reply's content and once put after it. Where the probe lands marks where the
      rendered reply starts (ends) in the real rendering: the text before (after) it is checked to
      equal the real rendering's, so leading (trailing) whitespace a filter strips stays outside
      the span. The whole conversation is rendered each time, so templates that write earlier turns
      differently once later ones exist are measured as they render. A template that changes
      otherwise when a reply's text changes (truncates it, branches on it) is refused
      (``BadSample("template error")``); give it ``{% generation %}`` blocks. A reply's span then
      takes in the end-of-turn right after it: a special token written by the template directly
      after the reply (``<|eot_id|>``, ``<|im_end|>``, ``</s>``), or the EOS string after
      whitespace only (`` </s>``), and never anything further (the next turn's header).

    Message content is tokenized as text: a special-token string inside a message (a user typing
    ``<|eot_id|>``) is rendered through the template as a probe-like stand-in character, and its
    place in the output is returned as a protected range, so the tokenizer reads it as text
    while the template's own control tokens stay special. Without such strings the ids equal
    ``apply_chat_template(messages, tokenize=True)``."""

    name = "jinja"

    def __init__(self, source: str):
        import json
        from datetime import datetime

        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise BadSample("template error", f"chat template: {msg}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)  # fmt: skip

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker.make(), loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self.template = env.from_string(source)
        self.has_generation = re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None

    def _text(self, contents, roles, tok, gen, track=False, calls=None, tools=None):
        msgs = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
        for m, c in zip(msgs, calls or [], strict=False):
            if c:
                m["tool_calls"] = c
        kw = dict(messages=msgs, add_generation_prompt=gen, bos_token=tok.bos_token or "<s>",
                  eos_token=tok.eos_token or "</s>")  # fmt: skip
        if tools:
            kw["tools"] = tools
        for name in ("pad_token", "unk_token"):
            if getattr(tok, name, None):
                kw[name] = getattr(tok, name)
        if not track:
            return self.template.render(**kw), []
        chunks, spans = [], []
        handle = _GenerationTracker._active.set((chunks, spans))
        try:
            for chunk in self.template.generate(**kw):
                chunks.append(chunk)
        finally:
            _GenerationTracker._active.reset(handle)
        text = "".join(chunks)
        for a, b, body in spans:
            if text[a:b] != body:
                raise BadSample("template error", "chat template: a {% generation %} block inside a macro "
                                "or a captured block cannot be located in the output")  # fmt: skip
        return text, [(a, b) for a, b, _ in spans]

    def render(self, messages, tok, add_generation_prompt=False, tools=None):
        roles = [m.role for m in messages]
        contents = [m.content for m in messages]
        calls = [m.tool_calls for m in messages]
        special_re = getattr(tok, "_special_re", None)
        texts = [*contents, *_strings(calls), *_strings(tools)]  # tool calls and tools are user text too
        forged = sorted({x for c in texts for x in special_re.findall(c)}) if special_re else []
        avoid = self.source + "".join(texts)
        *stand_ins, probe = _fresh_chars(avoid, len(forged) + 1)
        if forged:  # each special-token string a message holds becomes one stand-in character
            pattern = re.compile("|".join(re.escape(x) for x in sorted(forged, key=len, reverse=True)))
            to_char = dict(zip(forged, stand_ins, strict=True))

            def sub(c):
                return pattern.sub(lambda m: to_char[m.group()], c)

            contents = [sub(c) for c in contents]
            calls, tools = _map_strings(calls, sub), _map_strings(tools, sub)
        extra = {"calls": calls, "tools": tools}
        raw, spans = self._text(
            contents, roles, tok, add_generation_prompt, track=self.has_generation, **extra
        )
        if not self.has_generation and not add_generation_prompt:  # the replies' spans serve training
            # labels; a prompt to generate from needs none (and two more renders per reply, and
            # templates that rewrite earlier replies, such as reasoning models', cannot be probed)
            spans = [s for k in range(len(contents)) if roles[k] == "assistant"
                     for s in self._probe(raw, contents, roles, k, probe, tok, add_generation_prompt, extra)]  # fmt: skip
        elif not self.has_generation:
            spans = []
        # the stand-ins back to their strings: positions shift, and those ranges are protected
        text, where, protected, pos = [], [], [], 0
        back = dict(zip(stand_ins, forged, strict=False))
        for ch in raw:
            where.append(pos)
            s = back.get(ch, ch)
            if ch in back:
                protected.append((pos, pos + len(s)))
            text.append(s)
            pos += len(s)
        where.append(pos)
        text = "".join(text)
        spans = [(where[a], where[b]) for a, b in spans]
        if not self.has_generation:
            spans = [(a, self._end_of_turn(text, b, tok, protected)) for a, b in spans]
        return text, spans, protected

    def _probe(self, raw, contents, roles, k, probe, tok, gen, extra=None):
        """The span of message ``k``'s rendered reply in ``raw`` ([] where it is not rendered)."""
        c = contents[k]
        pre, _ = self._text([*contents[:k], probe + c, *contents[k + 1 :]], roles, tok, gen, **(extra or {}))
        post, _ = self._text([*contents[:k], c + probe, *contents[k + 1 :]], roles, tok, gen, **(extra or {}))
        if probe not in pre and probe not in post and pre == raw == post:
            return []  # the template leaves this message out
        a, b = pre.find(probe), post.find(probe)
        if a >= 0 and b >= 0 and pre.count(probe) == post.count(probe) == 1:
            end = len(raw) - (len(post) - b - 1)
            if (pre[:a] == raw[:a] and pre[a + 1 :].endswith(raw[a:]) and a <= end
                    and post[b + 1 :] == raw[end:] and post[:b].startswith(raw[:end])):  # fmt: skip
                return [(a, end)]
        raise BadSample(
            "template error",
            f"chat template: cannot locate assistant message {k} in the rendered text (the template "
            "changes otherwise when the reply's text changes); mark replies with {% generation %} blocks",
        )

    @staticmethod
    def _end_of_turn(text, end, tok, protected):
        """Where a reply's span ends once its end-of-turn is taken in (see the class docstring)."""
        special_re = getattr(tok, "_special_re", None)
        m = special_re.match(text, end) if special_re else None
        if m and not any(a < m.end() and m.start() < b for a, b in protected):
            return m.end()
        eos = tok.eos_token
        rest = text[end:].lstrip()
        if eos and rest.startswith(eos) and tok.token_id(eos) in tok.special_ids:
            at = len(text) - len(rest)
            if not any(a < at + len(eos) and at < b for a, b in protected):
                return at + len(eos)
        return end


TEMPLATES = {
    "plain": PlainTemplate(),
    "interleaved": InterleavedTemplate(),
    "vicuna_v1": SepTemplate("vicuna_v1", VICUNA_SYSTEM),
    "llava_v1": SepTemplate("llava_v1", LLAVA_SYSTEM),
    "chatml": ChatMLTemplate(),
    "internlm2": ChatMLTemplate("internlm2", "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]", bos_first=True),
    "mplug_owl2": SepTemplate("mplug_owl2", None),
    "llama3": Llama3Template(),
    "mistral_instruct": MistralTemplate(),
    "mplug_owl": OwlTemplate(),
    "blip2": Blip2Template(),
    "minigpt4": MiniGPT4Template(),
    "alpaca": AlpacaTemplate(),
}


def get_template(name: str, tok: Tokenizer | None = None) -> Template:
    if name == "jinja":
        if tok is None or not tok.chat_template:
            raise ValueError("template 'jinja' needs a tokenizer with a chat_template")
        return JinjaTemplate(tok.chat_template)
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {', '.join([*TEMPLATES, 'jinja'])}")
    return TEMPLATES[name]


# ------------------------------------------------------------------------------ rendering


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    num_images: int  # images whose placeholders survived truncation

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render(
    conv: Conversation,
    tok: Tokenizer,
    template: Template,
    image_token_id: int | None,
    image_tokens: int | list[int] = 1,
    max_length: int | None = None,
    add_generation_prompt: bool = False,
    tools: list | None = None,
) -> Rendered:
    """Conversation -> ids + labels. Each image becomes ``image_tokens`` placeholder ids (an
    int for all images, or one count per image). Truncation never splits an image block.
    ``tools``: function definitions for a Jinja template that writes them."""
    text, spans, content = template.render(conv.messages, tok, add_generation_prompt, tools=tools)
    chunks = text.split(IMAGE_MARK)
    n_images = len(chunks) - 1
    if n_images != len(conv.images):  # each placeholder takes the next image: one lost shifts the rest
        raise BadSample("image count mismatch", f"the chat template ({getattr(template, 'name', template)}) "
                        f"rendered {n_images} of its {len(conv.images)} image(s): it leaves out or moves the turn "
                        "that holds the others (a system turn, an image in a reply)", conv.id)  # fmt: skip
    if n_images and image_token_id is None:
        raise BadSample("image count mismatch", "has images but the model takes none", conv.id)
    if template.needs_image and not n_images and not add_generation_prompt:
        raise BadSample("no image", f"the chat template ({template.name}) trains the text after a sample's first "
                        "image, and this sample has none", conv.id)  # fmt: skip
    counts = [image_tokens] * n_images if isinstance(image_tokens, int) else list(image_tokens)
    ids: list[int] = []
    trained: list[bool] = []
    if template.bos_first and tok.bos_id is not None:
        ids, trained = [tok.bos_id], [False]
    image_starts: list[int] = []
    base, si = 0, 0
    for k, chunk in enumerate(chunks):
        end = base + len(chunk)  # message content inside this chunk, relative to it: tokenized as text
        protected = [(max(a, base) - base, min(b, end) - base) for a, b in content if a < end and b > base]
        cids, offs = tok.encode_offsets(chunk, protected)
        for tid, (a, b) in zip(cids, offs, strict=True):
            a, b = a + base, b + base
            while si < len(spans) and spans[si][1] <= a:
                si += 1
            ids.append(tid)
            trained.append(si < len(spans) and b > spans[si][0] and a < spans[si][1])
        base += len(chunk)
        if k < n_images:
            image_starts.append(len(ids))
            ids.extend([image_token_id] * counts[k])
            trained.extend([False] * counts[k])
            base += 1  # the image mark
    kept_images = n_images
    if max_length is not None and len(ids) > max_length:
        cut = max_length
        for k, s in enumerate(image_starts):
            if s < cut < s + counts[k] or s >= cut:  # an image block would be split or lost
                cut, kept_images = min(cut, s), k
                break
        ids, trained = ids[:cut], trained[:cut]
    labels = [t if tr else IGNORE_INDEX for t, tr in zip(ids, trained, strict=True)]
    if not add_generation_prompt and not any(trained):
        reason = "no supervised token left after truncation" if max_length else "no supervised token"
        raise BadSample(reason, f"{reason} (max_length {max_length}, {len(text)} characters)", conv.id)
    return Rendered(ids, labels, kept_images)
