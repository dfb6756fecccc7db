"""Generation engine, separate from the model: multimodal prefill, then text decode from a
preallocated KV cache; batched (left padding), greedy or sampled, streaming.

    prompts (ids with image placeholders, images) --left pad--> prefill (splice + decoder)
      -> loop: pick next token per row (processors: repetition penalty, temperature, top-k,
         top-p), append, stop rows on stop ids / stop strings / max_new_tokens
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from modalign.infer.fast_decode import FastDecoder, supported
from modalign.infer.image_cache import ImageCache, encode, encode_cached, image_key
from modalign.infer.prefix_cache import Entry, PrefixCache, block_keys, image_spans
from modalign.infer.quant import check_quantize, quantize_llm_
from modalign.models.decoder import KVCache
from modalign.models.mllm import MLLM

log = logging.getLogger("modalign")


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings (cut from the text)
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("temperature", "top_p", "repetition_penalty"):  # NaN passes every comparison
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError(
                "temperature >= 0, 0 < top_p <= 1, top_k >= 0 and repetition_penalty > 0 are required"
            )


@dataclass
class Prompt:
    input_ids: list[int]
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # one [3, S, S] per image, in order
    # set by the engine: placeholders already one per visual token; the images' digests and counts
    expanded: bool = field(default=False, repr=False, compare=False)
    digests: tuple[list[bytes], list[int]] | None = field(default=None, repr=False, compare=False)


@dataclass
class Prefilled:
    """A batch after its prompt forward: the cache, each row's next-token logits [B, V] (float32),
    the left-padded ids and attention mask [B, T], whether rows were padded, each prompt's length."""

    cache: KVCache
    logits: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    padded: bool
    lengths: list[int]


@dataclass
class Reuse:
    """A prompt (placeholders expanded) whose first ``tokens`` tokens the prefix cache's ``entry``
    holds; ``images``: its pictures after them (those that still run)."""

    prompt: Prompt
    tokens: int
    entry: Entry
    images: list[torch.Tensor]


@dataclass
class Completion:
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


MIN_TEMPERATURE = 1e-4  # below it, logits over the temperature could overflow float32 (inf, then NaN)


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, p: SamplingParams) -> torch.Tensor:
    """[B, V] logits -> adjusted logits (repetition penalty, temperature, top-k, top-p).
    ``seen``: [B, N] ids the repetition penalty applies to, once per distinct id; ids outside the
    vocabulary (image placeholders, -1 for padding) are not tokens and are passed over. A
    temperature above 0 counts as at least ``MIN_TEMPERATURE`` (sampling there is greedy but for
    exact ties)."""
    if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
        v = logits.shape[-1]
        valid = (seen >= 0) & (seen < v)
        hit = torch.zeros_like(logits).scatter_reduce_(
            1, seen.clamp(0, v - 1), valid.to(logits.dtype), "amax"
        )
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(hit > 0, penalised, logits)
    if p.temperature <= 0:
        return logits
    logits = logits / max(p.temperature, MIN_TEMPERATURE)
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return logits


def distributions(probs: torch.Tensor) -> torch.Tensor:
    """[B] whether each row of a softmax [B, V] is a distribution to draw from (finite, not all 0)."""
    return torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)


def draw(adjusted: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row [B] from adjusted logits [B, V]: a draw from their softmax; a row whose
    softmax is not a distribution (non-finite logits, e.g. from a degenerate repetition penalty)
    takes its largest logit instead of failing."""
    probs = adjusted.softmax(-1)
    ok = distributions(probs)
    if bool(ok.all()):
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)
    greedy = torch.nan_to_num(adjusted, nan=float("-inf")).argmax(-1)
    drawn = torch.multinomial(torch.where(ok[:, None], probs, 1.0), 1, generator=gen).squeeze(1)
    return torch.where(ok, drawn, greedy)


class Engine:
    """Batched generation for any ``MLLM`` design."""

    def __init__(self, model: MLLM, tokenizer=None, compile: bool = False, image_cache_mb: float = 256,
                 quantize: str | None = None, prefix_cache_mb: float = 0):  # fmt: skip
        """``compile``: decode steps run through ``torch.compile`` (a one-off compile per batch
        size and cache-length bucket, then several times fewer dispatched ops per token).
        ``image_cache_mb``: visual tokens of images already seen are kept up to this size and
        reused (``ImageCache``; 0 keeps none). ``quantize``: "int8" replaces the LLM's matrices
        by int8 values, "int4" by 4-bit groupwise values (CPU; a matrix the int4 kernel does not
        take is int8), in place: ``model`` is inference-only afterwards (``quantize_llm_`` in
        ``infer/quant.py``; the decode step is then eager). ``prefix_cache_mb``: keys and values
        of finished one-prompt generations (and the scheduler's requests) are kept up to this
        size, and a prompt that begins with one of them prefills only the rest (``PrefixCache``:
        the next turn of a chat; 0 keeps none; decoders that splice images in, not cross-attention
        ones)."""
        self.model, self.tok = model.eval(), tokenizer
        self.quantize = check_quantize(quantize)
        if self.quantize and not supported(model.llm, None):
            raise ValueError(
                f"quantize {self.quantize}: the quantized decode step covers Llama-family decoders (RMSNorm, RoPE, "
                "gated SiLU MLP, LoRA merged); this model decodes through its modules, in its own dtype"
            )
        if image_cache_mb < 0:
            raise ValueError(f"image_cache_mb must be >= 0 (0: no cache), got {image_cache_mb}")
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0 (0: no cache), got {prefix_cache_mb}")
        if self.quantize:
            quantize_llm_(model.llm, self.quantize)
        compile = compile and getattr(model.llm, "quantized_scheme", None) is None  # quantized: eager
        self.fast = FastDecoder(model.llm, compile=compile)
        self.image_cache = ImageCache(int(image_cache_mb * (1 << 20))) if image_cache_mb else None
        reusable = model.config.fusion == "splice" and not model.config.llm.is_encoder_decoder
        self.prefix = PrefixCache(int(prefix_cache_mb * (1 << 20))) if prefix_cache_mb and reusable else None

    def _device(self):
        return self.model.llm.embed_tokens.weight.device

    @torch.inference_mode()
    def prefill(
        self, prompts: list[Prompt], room: int, round_to_graphs: bool = False, reuse: bool = True
    ) -> Prefilled:
        """Run the prompts (left-padded into one batch) through the model into a new KV cache with
        ``room`` slots left for new tokens; returns the cache and each row's next-token logits.
        One prompt that begins with a sequence the prefix cache holds (``reuse``) runs only the
        tokens after it."""
        if reuse and len(prompts) == 1 and (found := self.find_reuse(prompts[0])) is not None:
            return self.prefill_reused([found], room, round_to_graphs)
        prompts = [self._expand(p) for p in prompts]
        dev = self._device()
        b = len(prompts)
        lengths = [len(p.input_ids) for p in prompts]
        t = max(lengths)
        ids = torch.zeros((b, t), dtype=torch.long)
        mask = torch.zeros(b, t, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, t - lengths[i] :] = torch.tensor(p.input_ids)
            mask[i, t - lengths[i] :] = 1
        tokens = self._image_tokens([px for p in prompts for px in p.pixel_values])
        ids, mask = ids.to(dev), mask.to(dev)
        padded = min(lengths) != t
        need = t + room
        cache = self.model.llm.new_cache(b, self.fast.round_cache_len(need) if round_to_graphs else need)
        # per-image placeholders were expanded already (``_expand``), so the splice keeps every
        # row's length; an all-text batch passes no modality ids (no image branch runs)
        sp = self.model.embed(
            ids, None, mask if padded else None, image_tokens=tokens, placeholder="per_token"
        )
        out = self.model(inputs_embeds=sp.inputs_embeds, modality_ids=sp.modality_ids if tokens is not None else None,
                         attention_mask=sp.attention_mask, cache=cache, logits_to_keep=1,
                         media=sp.media)  # fmt: skip
        return Prefilled(cache, out.logits[:, -1].float(), ids, mask, padded, lengths)

    def image_digests(self, p: Prompt) -> tuple[list[bytes], list[int]]:
        """Each image's digest and placeholder count in the prompt ``_expand`` made (kept on it)."""
        if p.digests is None:
            p.digests = ([image_key(px) for px in p.pixel_values],
                         [self.model.num_image_tokens(tuple(px.shape[-2:])) for px in p.pixel_values])  # fmt: skip
        return p.digests

    def prefix_keys(self, ids: list[int], images: tuple[list[bytes], list[int]]) -> list[bytes]:
        return block_keys(ids, self.model.config.image_token_id, *images, self.prefix.block)

    def find_reuse(self, prompt: Prompt, follow: bool = True) -> Reuse | None:
        """What the prefix cache holds of ``prompt``'s beginning (never its last token, never part of
        a picture's tokens); None when it holds none or no cache is kept. ``follow``: check the
        weights first (``PrefixCache.follow``; a caller looking up many prompts at once checks once)."""
        if self.prefix is None:
            return None
        p = self._expand(prompt)
        if follow:
            self.prefix.follow(self.model)
        images = self.image_digests(p)
        hit = self.prefix.lookup(self.prefix_keys(p.input_ids, images), len(p.input_ids) - 1)
        if hit is None:
            return None
        h = hit.tokens
        spans = image_spans(p.input_ids, self.model.config.image_token_id, images[1])
        for start, end in spans:  # an image is run whole: not from the middle of its tokens
            if start < h < end:
                h = start
        if h == 0:
            return None
        self.prefix.hit_tokens += h
        return Reuse(
            p, h, hit.entry, [px for (start, _), px in zip(spans, p.pixel_values, strict=True) if start >= h]
        )

    @torch.inference_mode()
    def prefill_reused(self, reuses: list[Reuse], room: int, round_to_graphs: bool = False) -> Prefilled:
        """``prefill`` of prompts that begin with sequences the prefix cache holds (``find_reuse``):
        each row's held keys and values are copied in, right-aligned at the cache's first ``H``
        slots (``H`` the longest held part), and only the rest of each prompt runs, left-padded
        after them; the attention mask leaves the gaps out, so every token keeps its position."""
        dev = self._device()
        b = len(reuses)
        held = max(r.tokens for r in reuses)
        rest = [len(r.prompt.input_ids) - r.tokens for r in reuses]
        t = max(rest)
        need = held + t + room
        cache = self.model.llm.new_cache(b, self.fast.round_cache_len(need) if round_to_graphs else need)
        ids = torch.zeros(b, held + t, dtype=torch.long)
        mask = torch.zeros(b, held + t, dtype=torch.long)
        for i, r in enumerate(reuses):
            h, ps = r.tokens, r.prompt.input_ids
            for layer in range(len(cache.k)):
                cache.k[layer][i, :, held - h : held] = r.entry.k[layer][:, :h]
                cache.v[layer][i, :, held - h : held] = r.entry.v[layer][:, :h]
            ids[i, held - h : held] = torch.tensor(ps[:h])
            ids[i, held + t - rest[i] :] = torch.tensor(ps[h:])
            mask[i, held - h : held] = 1
            mask[i, held + t - rest[i] :] = 1
        cache.length = held
        ids, mask = ids.to(dev), mask.to(dev)
        tokens = self._image_tokens([px for r in reuses for px in r.images])
        padded = min(rest) != t
        sp = self.model.embed(ids[:, held:], None, mask[:, held:] if padded else None, image_tokens=tokens,
                              placeholder="per_token")  # fmt: skip
        out = self.model(inputs_embeds=sp.inputs_embeds, modality_ids=sp.modality_ids if tokens is not None else None,
                         attention_mask=mask, cache=cache, logits_to_keep=1)  # fmt: skip
        cache.prefill_length = cache.length
        holes = b > 1 and any(r.tokens != held for r in reuses)
        return Prefilled(cache, out.logits[:, -1].float(), ids, mask, padded or holes,
                         [len(r.prompt.input_ids) for r in reuses])  # fmt: skip

    def keep_prefix(self, ids: list[int], images: tuple[list[bytes], list[int]], k: list[torch.Tensor],
                    v: list[torch.Tensor], slots: torch.Tensor | None = None) -> None:  # fmt: skip
        """Offer the prefix cache the keys and values (per layer [H_kv, S, D]) of the ``n`` tokens
        ``ids`` (the prompt and the generated tokens fed back): the first ``n`` slots, or the
        ``slots`` given (gathered into copies the cache keeps as they are). A failure (memory)
        keeps nothing and is only logged."""
        if self.prefix is None or len(ids) < self.prefix.block:
            return
        try:
            if slots is not None:
                k, v = [t[:, slots] for t in k], [t[:, slots] for t in v]
            self.prefix.put(self.prefix_keys(ids, images), k, v, owned=slots is not None)
        except Exception as e:  # noqa: BLE001 - the cache is an optimisation: a failed copy keeps nothing
            log.warning("prefix cache: not kept (%s: %s)", type(e).__name__, e)

    @torch.inference_mode()
    def stream(
        self, prompts: list[Prompt], params: SamplingParams, cancelled=None
    ) -> Iterator[list[int | None]]:
        """Yield, per decode step, the new token of every row (None once a row has finished).
        The last yield is followed by ``self.last_finish`` holding each row's finish reason.
        ``cancelled(i)`` (checked after each step) ends row ``i`` early."""
        params.validate()
        if self.model.config.llm.is_encoder_decoder:
            yield from self._stream_seq2seq(prompts, params, cancelled)
            return
        prompts = [self._expand(p) for p in prompts]  # once: later expansions return them as they are
        params = self._within_context(prompts, params)
        dev = self._device()
        b = len(prompts)
        compiled = self.fast.compiled
        pre = self.prefill(prompts, params.max_new_tokens + 1, round_to_graphs=compiled)
        cache, logits, ids, mask, padded = pre.cache, pre.logits, pre.ids, pre.mask, pre.padded
        t = ids.shape[1]
        pos = (mask.sum(1, keepdim=True) - 1) if padded else None  # last position per row
        gen = torch.Generator(device=dev)
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        finish = ["length"] * b
        seen = ids.masked_fill(mask == 0, -1) if params.repetition_penalty != 1.0 else None  # not the padding
        stops = set(params.stop_token_ids)
        done_l = [False] * b
        fast = supported(self.model.llm, cache)
        valid = None
        if compiled and fast:  # slots the compiled step attends to: prompt, then new tokens
            valid = torch.zeros(b, cache.max_len, dtype=torch.bool, device=dev)
            valid[:, :t] = mask.bool()
        fed: list[int] = []  # tokens fed back (their keys and values are in the cache)
        held = self.prefix.weights if self.prefix is not None else None  # the weights they are made with
        try:
            for step in range(params.max_new_tokens):
                adj = process_logits(logits, seen, params)
                if params.temperature > 0:
                    nxt = draw(adj, gen)
                else:
                    nxt = adj.argmax(-1)
                toks = nxt.tolist()
                row = [None if done_l[i] else t for i, t in enumerate(toks)]
                for i, t in enumerate(row):
                    if t is not None and t in stops:
                        finish[i], done_l[i] = "stop", True
                yield row
                if cancelled is not None:  # e.g. a client that went away, or a row at its own limit
                    for i in range(b):
                        if not done_l[i] and cancelled(i):
                            finish[i], done_l[i] = "cancelled", True
                if all(done_l) or step == params.max_new_tokens - 1:
                    break
                if seen is not None:
                    seen = torch.cat([seen, nxt[:, None]], 1)
                step_ids = nxt[:, None]
                if b == 1:
                    fed.append(toks[0])
                if padded:  # rows keep their own positions; finished rows stop attending to new tokens
                    done = torch.tensor(done_l, device=dev)
                    mask = torch.cat([mask, (~done).long()[:, None]], 1)
                    pos = pos + 1
                fast = fast and supported(self.model.llm, cache)
                logits = None
                if valid is not None and fast:
                    valid[:, cache.length] = ~done if padded else True
                    step_pos = (
                        pos if padded else torch.full((b, 1), cache.length, dtype=torch.long, device=dev)
                    )
                    logits = self.fast.compiled_step(step_ids, cache, step_pos, valid)
                if logits is None and fast:
                    logits = self.fast.step(
                        step_ids, cache, pos if padded else None, mask if padded else None
                    )
                elif logits is None:
                    kw = {"attention_mask": mask, "position_ids": pos} if padded else {}
                    logits = self.model(step_ids, cache=cache, **kw).logits[:, -1]
                logits = logits.float()
        except GeneratorExit:  # the caller stopped reading (a stop token or string): what ran is kept
            self._keep_streamed(prompts, fed, cache, held)
            raise
        self.last_finish = finish
        self._keep_streamed(prompts, fed, cache, held)

    def _keep_streamed(self, prompts: list[Prompt], fed: list[int], cache: KVCache, held) -> None:
        """Offer the prefix cache one prompt's keys and values and those of the tokens fed back,
        if the weights are still those it was prefilled with (``held``)."""
        if (
            self.prefix is not None
            and len(prompts) == 1
            and cache.media is None
            and held is self.prefix.weights
        ):
            p = prompts[0]
            self.keep_prefix(
                p.input_ids + fed, self.image_digests(p), [t[0] for t in cache.k], [t[0] for t in cache.v]
            )

    def _stream_seq2seq(self, prompts: list[Prompt], params: SamplingParams, cancelled=None):
        """``stream`` for an encoder-decoder LLM (T5): the prompts (left-padded) through the encoder
        once, then the decoder from its start token, one token per step, keys and values cached."""
        dev, llm, c = self._device(), self.model.llm, self.model.config.llm
        lengths = [len(p.input_ids) for p in prompts]
        t, b = max(lengths), len(prompts)
        ids = torch.zeros(b, t, dtype=torch.long, device=dev)
        mask = torch.zeros(b, t, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            ids[i, t - lengths[i] :] = torch.tensor(p.input_ids, device=dev)
            mask[i, t - lengths[i] :] = 1
        tokens = self._image_tokens([px for p in prompts for px in p.pixel_values])
        sp = self.model.embed(ids, None, mask, image_tokens=tokens)
        enc = llm.encode(sp.inputs_embeds, mask)
        gen = torch.Generator(device=dev)
        gen.manual_seed(params.seed) if params.seed is not None else gen.seed()
        step = torch.full((b, 1), c.decoder_start_token_id or 0, dtype=torch.long, device=dev)
        seen = step.clone() if params.repetition_penalty != 1.0 else None
        cache: dict = {}
        finish, done, stops = ["length"] * b, [False] * b, set(params.stop_token_ids)
        for _ in range(params.max_new_tokens):
            logits = process_logits(llm.decode(step, enc, mask, cache)[:, -1].float(), seen, params)
            nxt = draw(logits, gen) if params.temperature > 0 else logits.argmax(-1)
            row = [None if done[i] else tok for i, tok in enumerate(nxt.tolist())]
            for i, tok in enumerate(row):
                if tok is not None and tok in stops:
                    finish[i], done[i] = "stop", True
            yield row
            for i in range(b):
                if cancelled is not None and not done[i] and cancelled(i):
                    finish[i], done[i] = "cancelled", True
            if all(done):
                break
            step = nxt[:, None]
            if seen is not None:
                seen = torch.cat([seen, step], 1)
        self.last_finish = finish

    def warmup(self, batch_sizes=(1,), prompt_len: int = 16, max_new_tokens: int = 64) -> float:
        """Compile the decode step before the first real request (a compiled engine compiles one
        graph per batch size and cache length, which otherwise the first request waits for).
        Prompts of ``prompt_len`` tokens and ``max_new_tokens`` share a cache length with real
        requests up to the same total, rounded up to 128. Returns the seconds it took."""
        t0 = time.perf_counter()
        if not self.fast.compiled:
            return 0.0
        tok = self.warmup_token()
        for b in batch_sizes:  # the cache length of a request up to prompt_len + max_new_tokens
            prompts = [Prompt([tok] * prompt_len) for _ in range(b)]
            for _ in self.stream(prompts, SamplingParams(max_new_tokens=max_new_tokens)):
                pass
            if not self.fast.compiled:
                break
        return time.perf_counter() - t0

    def warmup_token(self) -> int:
        """A text token to fill warm-up prompts with: BOS, or 1 where there is none (or it is the
        image placeholder)."""
        tok = self.model.config.llm.bos_token_id
        return 1 if tok is None or tok == self.model.config.image_token_id else tok

    def _image_tokens(self, images: list[torch.Tensor]):
        """The visual tokens of ``images`` in order ([N, L, D], or a list where their lengths differ),
        from the image cache where it holds them; None without images."""
        if not images:
            return None
        if self.image_cache is None:
            return encode(self.model, images)
        tokens = encode_cached(self.model, images, self.image_cache)
        return torch.stack(tokens) if all(t.shape == tokens[0].shape for t in tokens) else tokens

    def _expand(self, p: Prompt) -> Prompt:
        """Per-image placeholders (one id per image) -> one id per visual token, so that rows
        keep their length through the splice and left padding stays on the left."""
        cfg = self.model.config
        if p.expanded:
            return p
        if cfg.placeholder != "per_image" or not p.pixel_values:
            return Prompt(p.input_ids, p.pixel_values, expanded=True)
        counts = [self.model.num_image_tokens(tuple(px.shape[-2:])) for px in p.pixel_values]
        ids, k = [], 0
        for t in p.input_ids:
            if t == cfg.image_token_id:
                if k >= len(counts):
                    raise ValueError(
                        f"the prompt has more image placeholders than its {len(counts)} image(s)"
                    )
                ids += [t] * counts[k]
                k += 1
            else:
                ids.append(t)
        if k != len(counts):
            raise ValueError(f"the prompt has {k} image placeholder(s) but {len(counts)} image(s)")
        return Prompt(ids, p.pixel_values, expanded=True)

    def _within_context(self, prompts: list[Prompt], params: SamplingParams) -> SamplingParams:
        """``params`` with ``max_new_tokens`` at most what the model's context leaves after the
        longest prompt (images expanded); an empty prompt, or one that fills the context, is a
        ValueError (past the context, learned positions fail and rotary ones give noise)."""
        for k, p in enumerate(prompts):
            if not p.input_ids:
                raise ValueError(f"prompt {k} is empty: there is nothing to continue from")
        ctx = self.model.config.llm.max_position_embeddings
        longest = max(len(p.input_ids) for p in prompts)
        if ctx and longest >= ctx:
            raise ValueError(f"the prompt ({longest} tokens, images expanded) fills the model's context "
                             f"length of {ctx} tokens")  # fmt: skip
        if ctx and longest + params.max_new_tokens > ctx:
            return dataclasses.replace(params, max_new_tokens=ctx - longest)
        return params

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Completion]:
        """Run ``stream`` to the end; decode text if a tokenizer is set. A row whose text reaches a
        stop string ends there: its text is cut before it, and its ids are those whose text lies
        wholly before it."""
        from modalign.infer.detok import StopText

        toks: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        # the text followed token by token only where a stop string may end it; else decoded once
        watch = self.tok is not None and any(params.stop)
        texts = [StopText(self.tok, params.stop) for _ in prompts] if watch else None
        stopped = (lambda i: texts[i].stopped) if watch else None
        for row in self.stream(prompts, params, stopped):
            for i, t in enumerate(row):
                if t is not None and not finished[i]:
                    if t in params.stop_token_ids:
                        finished[i] = True
                        continue
                    toks[i].append(t)
                    if texts is not None:
                        texts[i].push(t)
                        finished[i] = texts[i].stopped
        results = []
        for i, p in enumerate(prompts):
            ids, text, reason = toks[i], None, self.last_finish[i]
            if texts is not None and texts[i].stopped:
                text, reason = texts[i].text, "stop"
                while ids and len(self.tok.decode(ids, skip_special_tokens=True)) > len(text):
                    ids = ids[:-1]
            elif self.tok is not None:
                text = self.tok.decode(ids, skip_special_tokens=True)
            results.append(Completion(ids, text, reason, len(self._expand(p).input_ids)))  # images expanded
        return results
