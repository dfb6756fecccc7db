"""Conversations and chat templates, rendered in one pass into ``(input_ids, labels)``.

A template turns messages into one string plus the character spans that carry loss (each
assistant reply and its end-of-turn). The string is tokenised once (split only at image
marks), and a token is trained iff its character span overlaps a loss span:

    text  : <s>SYSTEM USER: ◆ what colour? ASSISTANT: red</s>USER: ...
    spans :                                          [-------]
    ids   :  1  ...  [img x N]  ...                   ' red' '</s>'
    labels: -100 ... -100 ...                          ' red' '</s>'

Built-in templates: plain, vicuna_v1, llava_v1, chatml, llama3, mistral_instruct; ``jinja``
renders a checkpoint's own ``chat_template`` in a sandboxed Jinja environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modalign.data.tokenizer import Tokenizer

IGNORE_INDEX = -100
IMAGE_MARK = "\ue000"  # where an image goes inside message text (private-use code point)
IMAGE_PLACEHOLDER = "<image>"  # where an image goes in data set text (LLaVA JSON, messages)
_OPEN, _CLOSE = "\ue001", "\ue002"  # loss-span sentinels used with Jinja templates
_IN, _OUT = "\ue003", "\ue004"  # message-content sentinels used with Jinja templates
RESERVED = {ord(c): None for c in (_OPEN, _CLOSE, _IN, _OUT)}  # removed from message text
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
    eot_follows_span = False  # Jinja: a special token right after a reply is its end-of-turn
    # the sequence starts with the tokenizer's BOS id and the text is tokenized as a fresh input
    # after it, as the reference code does (``tokenizer(prompt)`` adds BOS; a SentencePiece
    # tokenizer then puts its ``▁`` prefix on the first word: "<s>▁A chat", not "<s>A chat")
    bos_first = False
    stop_tokens: tuple[str, ...] = ()  # tokens that end a reply besides EOS (its end-of-turn)

    def render(self, messages: list[Message], tok: Tokenizer, add_generation_prompt: bool = False):
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
    return [Message(m.role, m.content.translate(RESERVED)) for m in messages]


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


class JinjaTemplate(Template):
    """A checkpoint's own ``chat_template`` in a sandboxed Jinja environment. Replies are
    wrapped in sentinels while rendering to find their spans, then the sentinels are removed."""

    name = "jinja"
    eot_follows_span = True

    def __init__(self, source: str):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise BadSample("template error", f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)

    def render(self, messages, tok, add_generation_prompt=False):
        bos, eos = _specials(tok)
        msgs = [
            {"role": m.role,
             "content": f"{_OPEN}{_IN}{m.content}{_OUT}{_CLOSE}" if m.role == "assistant" else f"{_IN}{m.content}{_OUT}"}
            for m in _clean(messages)
        ]  # fmt: skip
        raw = self.template.render(
            messages=msgs, bos_token=bos, eos_token=eos, add_generation_prompt=add_generation_prompt
        )
        text, spans, content, start, cstart = [], [], [], None, None
        pos = 0
        for ch in raw:
            if ch == _OPEN:
                start = pos
            elif ch == _CLOSE:
                spans.append((start, pos))
            elif ch == _IN:
                cstart = pos
            elif ch == _OUT:
                content.append((cstart, pos))
            else:
                text.append(ch)
                pos += 1
        return "".join(text), spans, content


TEMPLATES = {
    "plain": PlainTemplate(),
    "vicuna_v1": SepTemplate("vicuna_v1", VICUNA_SYSTEM),
    "llava_v1": SepTemplate("llava_v1", LLAVA_SYSTEM),
    "chatml": ChatMLTemplate(),
    "internlm2": ChatMLTemplate("internlm2", "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]", bos_first=True),
    "mplug_owl2": SepTemplate("mplug_owl2", None),
    "llama3": Llama3Template(),
    "mistral_instruct": MistralTemplate(),
    "mplug_owl": OwlTemplate(),
    "blip2": Blip2Template(),
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
) -> Rendered:
    """Conversation -> ids + labels. Each image becomes ``image_tokens`` placeholder ids (an
    int for all images, or one count per image). Truncation never splits an image block."""
    text, spans, content = template.render(conv.messages, tok, add_generation_prompt)
    chunks = text.split(IMAGE_MARK)
    n_images = len(chunks) - 1
    if n_images and image_token_id is None:
        raise BadSample("image count mismatch", "has images but the model takes none", conv.id)
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
    if template.eot_follows_span:
        for i in range(1, len(ids)):
            if ids[i] in tok.special_ids and trained[i - 1] and not trained[i]:
                trained[i] = True
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
