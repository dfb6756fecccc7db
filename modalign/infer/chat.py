"""A chat session over the engine: messages + images -> prompt ids -> (streamed) reply.
Used by ``modalign generate``, ``modalign chat`` and the server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from modalign.data.conversation import (
    IMAGE_MARK,
    IMAGE_PLACEHOLDER,
    Conversation,
    Message,
    get_template,
    render,
)
from modalign.data.images import ImageProcessor
from modalign.data.tokenizer import Tokenizer
from modalign.infer.engine import Completion, Engine, Prompt, SamplingParams
from modalign.models.mllm import MLLM


def stop_token_ids(tok: Tokenizer, template=None) -> list[int]:
    """The ids that end a reply: EOS, the common end-of-turn tokens, and the template's own."""
    names = ("<|im_end|>", "<|eot_id|>", "<|end|>", *(getattr(template, "stop_tokens", ()) or ()))
    ids = {tok.eos_id, *(tok.token_id(n) for n in names)}
    return sorted(i for i in ids if i is not None)


class TextDelta:
    """Incremental detokenisation: the new text each token adds (multi-byte safe), in time that
    does not grow with the reply. Each push decodes a window, not the whole reply: the ids from a
    little before the last piece returned (up to ``BACK`` tokens), far enough back that the
    window's known part holds a character other than white space (tokenizers drop leading
    spaces: SentencePiece up to two; past such a character both decodes of the window drop the
    same ones), else from where the last window began (which held one already)."""

    BACK = 4

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids = tok, []
        self.start = self.done = 0  # the window begins at ids[start]; ids[:done] were returned
        self.before = ""  # the decode of ids[start:done]

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids[self.start :], skip_special_tokens=True)
        # an incomplete UTF-8 sequence (wait for more bytes), or nothing new
        if text.endswith("\ufffd") or len(text) <= len(self.before):
            return ""
        new, self.done = text[len(self.before) :], len(self.ids)
        for s in range(self.done - 1, max(self.start, self.done - self.BACK) - 1, -1):
            before = self.tok.decode(self.ids[s : self.done], skip_special_tokens=True)
            if before.strip():
                self.start, self.before = s, before
                break
        else:  # white space only close by: the window keeps its start, whose text is ``text``
            self.before = text
        return new


def find_stop(text: str, new: int, stops) -> int | None:
    """Where the first of ``stops`` (in their order) that occurs in ``text`` begins, looking only
    where the last ``new`` characters could have completed one (earlier text was looked at
    already); None if none does."""
    stops = [s for s in stops if s]
    if not stops:
        return None
    lo = max(0, len(text) - new - max(map(len, stops)) + 1)
    for s in stops:
        at = text.find(s, lo)
        if at >= 0:
            return at
    return None


class ChatModel:
    """A loaded model with its tokenizer, template and image preprocessing."""

    def __init__(self, model: MLLM, tok: Tokenizer, template: str | None = None, compile: bool = False,
                 image_cache_mb: float = 256, quantize: str | None = None, prefix_cache_mb: float = 0):  # fmt: skip
        self.model, self.tok = model.eval(), tok
        name = template or tok.template_name or ("jinja" if tok.chat_template else "vicuna_v1")
        self.template = get_template(name, tok)
        self.engine = Engine(model, tok, compile=compile, image_cache_mb=image_cache_mb, quantize=quantize,
                             prefix_cache_mb=prefix_cache_mb)  # fmt: skip
        self.images = ImageProcessor(model.config.vision) if model.has_vision else None

    @classmethod
    def load(cls, path: str | Path, template: str | None = None, device=None, dtype=None, compile: bool = False,
             base: str | Path | None = None, vision_tower: str | Path | None = None,
             image_cache_mb: float = 256, quantize: str | None = None, prefix_cache_mb: float = 0) -> ChatModel:  # fmt: skip
        """A model directory (any supported format) ready to chat: ``device`` and ``dtype`` by name
        or "auto" (the best available: a GPU in bf16 where it supports it, else the CPU in fp32);
        ``base`` / ``vision_tower`` as for ``MLLM.from_pretrained``; the template is the given one,
        else the tokenizer's, else the one the checkpoint's release uses; ``compile``:
        torch.compile the decode step; ``image_cache_mb``: visual tokens of images seen kept for
        reuse up to this size; ``quantize``: "int8" or "int4" decodes on quantized weights;
        ``prefix_cache_mb``: keys and values of earlier turns kept for the next (see ``Engine``)."""
        from modalign.checkpoints import default_template
        from modalign.devices import resolve_device, resolve_dtype

        dev = resolve_device(device)
        model = MLLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev), device=dev, base=base,
                                     vision_tower=vision_tower)  # fmt: skip
        tok_dir = Path(path)
        if base is not None and not any(
            (tok_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")
        ):
            tok_dir = Path(base)  # a training-run folder: the base's tokenizer, as the reference loads it
        tok = Tokenizer.from_dir(tok_dir)
        if template is None and tok.template_name is None and not tok.chat_template:
            template = default_template(path)
        return cls(model, tok, template, compile=compile, image_cache_mb=image_cache_mb, quantize=quantize,
                   prefix_cache_mb=prefix_cache_mb)  # fmt: skip

    def prompt(self, messages: list[Message], images: list) -> Prompt:
        """Render with the generation prompt; ``images`` are paths, bytes or PIL images."""
        if images and self.images is None:
            raise ValueError("this model takes no images")
        pixels = [self.images(im) for im in images] if images else []
        return Prompt(self.prompt_ids(messages), pixels)

    def prompt_ids(self, messages: list[Message], tools: list | None = None) -> list[int]:
        """The rendered prompt (with the generation prompt); image marks become placeholders.
        ``tools``: function definitions, for a Jinja template that writes them."""
        cfg = self.model.config
        per = self.model.num_image_tokens() if cfg.placeholder == "per_token" else 1
        conv = Conversation(messages, [None] * sum(m.num_images for m in messages))
        return render(
            conv, self.tok, self.template, cfg.image_token_id, per, add_generation_prompt=True, tools=tools
        ).input_ids

    def params(self, **kw) -> SamplingParams:
        p = SamplingParams(**kw)
        p.stop_token_ids = sorted(set(p.stop_token_ids) | set(stop_token_ids(self.tok, self.template)))
        p.stop = list(dict.fromkeys([*p.stop, *getattr(self.template, "stop_strings", ())]))
        return p

    def reply(self, messages: list[Message], images: list, params: SamplingParams) -> Completion:
        return self.engine.generate([self.prompt(messages, images)], params)[0]

    def stream(self, messages: list[Message], images: list, params: SamplingParams) -> Iterator[str]:
        """Text deltas of the reply as they are generated (stop strings honoured)."""
        delta, text = TextDelta(self.tok), ""
        stops = set(params.stop_token_ids)
        for row in self.engine.stream([self.prompt(messages, images)], params):
            t = row[0]
            if t is None or t in stops:
                break
            piece = delta.push(t)
            text += piece
            cut = find_stop(text, len(piece), params.stop)
            if cut is not None:
                yield piece[: max(0, len(piece) - (len(text) - cut))]
                return
            if piece:
                yield piece


def user_message(text: str, n_images: int) -> Message:
    """A user turn with ``n_images`` images: where ``text`` names their places with ``<image>`` (as
    many as there are images, like a data set record), they go there; otherwise they lead the text.
    The text's own image marks (the private-use character that stands for an image inside message
    text) are dropped: only ``<image>`` or ``n_images`` places images, never text a model wrote."""
    text = text.replace(IMAGE_MARK, "")
    if n_images and text.count(IMAGE_PLACEHOLDER) == n_images:
        return Message("user", text.replace(IMAGE_PLACEHOLDER, IMAGE_MARK))
    return Message("user", IMAGE_MARK * n_images + ("\n" if n_images else "") + text)
