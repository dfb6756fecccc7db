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
from modalign.infer.detok import StopText
from modalign.infer.engine import Completion, Engine, Prompt, SamplingParams
from modalign.models.mllm import MLLM


def stop_token_ids(tok: Tokenizer, template=None) -> list[int]:
    """The ids that end a reply: EOS, the common end-of-turn tokens, and the template's own."""
    names = ("<|im_end|>", "<|eot_id|>", "<|end|>", *(getattr(template, "stop_tokens", ()) or ()))
    ids = {tok.eos_id, *(tok.token_id(n) for n in names)}
    return sorted(i for i in ids if i is not None)


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
        eos = self.model.config.llm.eos_token_id  # the checkpoint's own (Llama-3.1: three of them)
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        p.stop_token_ids = sorted(set(p.stop_token_ids) | set(stop_token_ids(self.tok, self.template)) | eos)
        p.stop = list(dict.fromkeys([*p.stop, *getattr(self.template, "stop_strings", ())]))
        return p

    def reply(self, messages: list[Message], images: list, params: SamplingParams) -> Completion:
        return self.engine.generate([self.prompt(messages, images)], params)[0]

    def stream(self, messages: list[Message], images: list, params: SamplingParams) -> Iterator[str]:
        """Text deltas of the reply as they are generated; stop strings honoured (one split over
        several tokens is never shown in part)."""
        text = StopText(self.tok, params.stop)
        stops = set(params.stop_token_ids)
        for row in self.engine.stream([self.prompt(messages, images)], params):
            t = row[0]
            if t is None or t in stops:
                break
            piece = text.push(t)
            if piece:
                yield piece
            if text.stopped:
                return
        if rest := text.flush():
            yield rest


def user_message(text: str, n_images: int) -> Message:
    """A user turn with ``n_images`` images: where ``text`` names their places with ``<image>`` (as
    many as there are images, like a data set record), they go there; otherwise they lead the text.
    The text's own image marks (the private-use character that stands for an image inside message
    text) are dropped: only ``<image>`` or ``n_images`` places images, never text a model wrote."""
    text = text.replace(IMAGE_MARK, "")
    if n_images and text.count(IMAGE_PLACEHOLDER) == n_images:
        return Message("user", text.replace(IMAGE_PLACEHOLDER, IMAGE_MARK))
    return Message("user", IMAGE_MARK * n_images + ("\n" if n_images else "") + text)
