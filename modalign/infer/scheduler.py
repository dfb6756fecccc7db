"""Continuous batching: every running request decodes one token per step, new requests join the
running batch at the next step, finished ones leave at once, and each row samples with its own
settings (temperature, top-k, top-p, penalties, logit bias, seed, logprobs).

    waiting requests --prefill (their own left-padded batch)--> rows (KV, next token)
       --merge--> running batch: KV slots [B, H, S, D], valid [B, S], position per row
       --step--> one token per row (fused decode step where it applies) --> per-row sampling

A new row's cache slots are placed right-aligned at the running batch's frontier: positions are
each row's own (RoPE is applied before the keys are stored), so where a row's keys sit among the
slots does not matter; the validity mask says which slots each row attends to. A finished row
leaves a free batch row behind: the next request admitted takes it over (its prefilled keys are
written into that row alone), so under steady load the running batch is neither copied to drop a
row nor to add one; free rows are dropped only when nothing waits to take them and they are half
the batch or more. The scheduler belongs to one thread; failures are isolated: a request whose
prefill fails fails alone, and a decode step that fails fails the rows of that step, never the
scheduler.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from modalign.infer.engine import Engine, Prompt, SamplingParams, draw
from modalign.infer.fast_decode import FEW_ROWS, PACK_ROWS, supported
from modalign.models.decoder import KVCache
from modalign.models.xattn import Media

log = logging.getLogger("modalign")


@dataclass(eq=False)  # identity, not field equality: a request holds tensors
class Request:
    """One generation: the prompt, its own sampling settings, and where its tokens go.
    ``on_token(token, logprobs)``, ``on_end(reason)`` and ``on_error(exc)`` are called from the
    scheduler's thread; setting ``cancelled`` ends the request at the next step ("cancelled")."""

    prompt: Prompt
    params: SamplingParams
    on_token: Callable[[int, dict | None], None]
    on_end: Callable[[str], None]
    on_error: Callable[[BaseException], None]
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    cancelled: bool = False
    generated: int = 0


@dataclass(eq=False)
class _Row:
    req: Request
    gen: torch.Generator
    seen: list[int]  # prompt + generated ids (repetition penalty)
    counts: dict[int, int] = field(default_factory=dict)  # generated ids (presence / frequency penalties)
    finish: str | None = None  # "stop" | "length" once the row has ended
    images: tuple[list[bytes], list[int]] | None = None  # its images' digests and token counts (prefix cache)
    weights: list | None = None  # the prefix cache's weight versions when it was prefilled
    failed: bool = False  # its sampling or its request's token callback raised: it ended with on_error


class Scheduler:
    """``add`` queues requests; ``step`` admits up to ``max_batch`` of them and decodes one token
    for every running row. ``active`` and ``waiting`` say how much work is left."""

    def __init__(self, engine: Engine, max_batch: int = 8, headroom: int = 64):
        self.engine, self.max_batch, self.headroom = engine, max_batch, headroom
        self.model = engine.model
        self.waiting: list[Request] = []
        self.rows: list[_Row | None] = []  # batch rows; None: a free row (decoded, ignored)
        self.cache: KVCache | None = None  # the running batch's slots (cache.length: slots in use)
        self.valid: torch.Tensor | None = None  # [B, S] slots each row attends to
        self.pos: torch.Tensor | None = None  # [B] each row's next position
        self.next: torch.Tensor | None = None  # [B] each row's next input token
        self.steps = 0

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def add(self, req: Request) -> None:
        req.params.validate()
        self.waiting.append(req)

    # ------------------------------------------------------------------ admission

    @torch.inference_mode()
    def admit(self) -> None:
        """Prefill waiting requests (as many as the batch has room for) and merge them in."""
        self.waiting = [r for r in self.waiting if not self._drop_cancelled(r)]
        room = self.max_batch - self.active
        if room <= 0 or not self.waiting:
            return
        new, self.waiting = self.waiting[:room], self.waiting[room:]
        if self.engine.prefix is not None:
            new = self._admit_reused(new)
            if not new:
                return
        try:
            self._prefill(new)
        except Exception:  # noqa: BLE001 - find the request that failed; the others go on
            if len(new) == 1:
                raise _Failed(new) from None
            failed = []
            for r in new:
                try:
                    self._prefill([r])
                except Exception as e:  # noqa: BLE001
                    r.on_error(e)
                    failed.append(r)
            if failed and len(failed) == len(new):
                return

    def _drop_cancelled(self, r: Request) -> bool:
        if r.cancelled:
            r.on_end("cancelled")
        return r.cancelled

    def _admit_reused(self, reqs: list[Request]) -> list[Request]:
        """Admit the requests the engine's prefix cache holds a beginning of, prefilled together
        from what it holds (one at a time if that fails, or where a sliding window counts slots:
        a batch of them leaves gaps inside rows); a failure fails its request only. Returns the
        others."""
        eng, found, rest = self.engine, [], []
        try:
            eng.prefix.follow(self.model)
        except Exception as e:  # noqa: BLE001 - nothing was admitted: these requests fail, the others go on
            for r in reqs:
                r.on_error(e)
            return []
        for r in reqs:
            try:
                r.prompt = eng._expand(r.prompt)  # once: its digests stay with it
                reuse = eng.find_reuse(r.prompt, follow=False)
            except Exception as e:  # noqa: BLE001 - e.g. a placeholder count the prompt gets wrong
                r.on_error(e)
                continue
            (rest if reuse is None else found).append((r, reuse))
        pre = None
        if len(found) > 1 and self.model.config.llm.sliding_window is None:
            try:
                pre = eng.prefill_reused(
                    [u for _, u in found], max(r.params.max_new_tokens for r, _ in found) + 1
                )
            except Exception:  # noqa: BLE001 - one at a time below: the failing request fails alone
                pre = None
        if pre is not None:
            self._admit_safely([r for r, _ in found], pre)
        else:
            for r, u in found:
                try:
                    one = eng.prefill_reused([u], r.params.max_new_tokens + 1)
                except Exception as e:  # noqa: BLE001
                    r.on_error(e)
                    continue
                self._admit_safely([r], one)
        return [r for r, _ in rest]

    def _prefill(self, reqs: list[Request]) -> None:
        """Prefill ``reqs`` in one left-padded batch and merge them in (a failure of the prefill
        raises with nothing admitted)."""
        room = max(r.params.max_new_tokens for r in reqs) + 1
        self._admit_safely(reqs, self.engine.prefill([r.prompt for r in reqs], room, reuse=False))

    def _admit_safely(self, reqs: list[Request], pre) -> None:
        """``_admit_prefilled``; if it fails once rows are placed (memory, a callback that raises),
        those rows are freed and the requests fail: never admitted twice, never left running."""
        try:
            self._admit_prefilled(reqs, pre)
        except Exception as e:  # noqa: BLE001
            mine = {id(r) for r in reqs}
            for i, row in enumerate(self.rows):
                if row is not None and id(row.req) in mine:
                    self.rows[i] = None
                    self.valid[i] = False
            for r in reqs:
                r.on_error(e)

    def _admit_prefilled(self, reqs: list[Request], pre) -> None:
        dev, eng = self.engine._device(), self.engine
        rows = []
        for i, r in enumerate(reqs):
            gen = torch.Generator(device=dev)
            gen.manual_seed(r.params.seed) if r.params.seed is not None else gen.seed()
            rows.append(_Row(r, gen, pre.ids[i][pre.mask[i].bool()].tolist()))
            if eng.prefix is not None:
                rows[-1].images = eng.image_digests(eng._expand(r.prompt))
                rows[-1].weights = eng.prefix.weights
        tokens = self._sample(rows, pre.logits)
        positions = pre.mask.sum(1)  # the next position of each row
        slots = self._place(pre.cache, pre.mask.bool(), positions, rows)
        self._emit(rows, tokens, pre.logits, slots)

    def _place(
        self, cache: KVCache, valid: torch.Tensor, positions: torch.Tensor, rows: list[_Row]
    ) -> list[int]:
        """Put prefilled rows into the running batch: into free rows first, the rest appended.
        Returns each row's batch index."""
        free = [i for i, r in enumerate(self.rows) if r is None]
        if self.cache is None or self.cache.media is not None or cache.media is not None or not free:
            start = len(self.rows)  # cross-attention latents are per row: those rows are appended
            self._merge(cache, valid, positions, rows)
            return list(range(start, start + len(rows)))
        take = min(len(free), len(rows))
        slots = free[:take]
        n = cache.length
        if n > self.cache.length:  # a prompt longer than the running rows' slots: move them right
            self._shift(n - self.cache.length)
        end = self.cache.length
        idx = torch.tensor(slots, device=self.valid.device)
        for layer in range(len(self.cache.k)):
            self.cache.k[layer][idx, :, end - n : end] = cache.k[layer][:take, :, :n]
            self.cache.v[layer][idx, :, end - n : end] = cache.v[layer][:take, :, :n]
        self.valid[idx] = False
        self.valid[idx, end - n : end] = valid[:take, :n]
        self.pos[idx] = positions[:take]
        for i, row in zip(slots, rows[:take], strict=True):
            self.rows[i] = row
        if take == len(rows):
            return slots
        rest = torch.arange(take, len(rows), device=positions.device)
        cache.select(rest)
        start = len(self.rows)
        self._merge(cache, valid[take:], positions[take:], rows[take:])
        return slots + list(range(start, start + len(rows) - take))

    def _shift(self, by: int) -> None:
        """Move every row's slots ``by`` to the right (room on the left for a longer prompt)."""
        cap = max(self.cache.max_len, _round(self.cache.length + by + self.headroom, self.headroom))
        self._realloc(cap, by)

    def _merge(self, cache: KVCache, valid: torch.Tensor, positions: torch.Tensor, rows: list[_Row]) -> None:
        """Append prefilled rows to the running batch, their slots right-aligned at the frontier."""
        n = cache.length
        if self.cache is None:
            self.cache, self.valid, self.pos = cache, _pad_to(valid, cache.max_len), positions
            self.next = torch.zeros(len(rows), dtype=torch.long, device=positions.device)
            self.rows = rows
            return
        old = self.cache
        front = max(old.length, n)
        live = [r for r in [*self.rows, *rows] if r is not None]
        need = front + max(r.req.params.max_new_tokens - r.req.generated for r in live) + 1
        cap = max(old.max_len, _round(need, self.headroom))
        shift = front - old.length  # existing rows move right to make room for a longer prompt
        b_old, b_new = len(self.rows), len(rows)
        merged = KVCache(self.model.config.llm, b_old + b_new, cap, old.k[0].dtype, old.k[0].device)
        valid_m = torch.zeros(b_old + b_new, cap, dtype=torch.bool, device=self.valid.device)
        for layer in range(len(old.k)):
            for dst, src in ((merged.k, old.k), (merged.v, old.v)):
                dst[layer][:b_old, :, shift : shift + old.length] = src[layer][:, :, : old.length]
            for dst, src in ((merged.k, cache.k), (merged.v, cache.v)):
                dst[layer][b_old:, :, front - n : front] = src[layer][:, :, :n]
        valid_m[:b_old, shift : shift + old.length] = self.valid[:, : old.length]
        valid_m[b_old:, front - n : front] = valid[:, :n]
        merged.length = merged.prefill_length = front
        merged.media = Media.concat(old.media, b_old, cache.media, b_new)  # cross-attention models
        self.cache, self.valid = merged, valid_m
        self.pos = torch.cat([self.pos, positions])
        self.next = torch.cat([self.next, torch.zeros(b_new, dtype=torch.long, device=self.next.device)])
        self.rows = [*self.rows, *rows]

    @torch.inference_mode()
    def warmup(self, prompt_len: int = 8, max_new_tokens: int = 4) -> float:
        """Compile the decode step before the first request (a compiled engine: the graph for one
        row and, for any cache length, those for 2 to ``FEW_ROWS`` rows, up to ``PACK_ROWS`` and
        more, as far as ``max_batch`` reaches), so that no request waits for the compiler. A step
        of more than ``FEW_ROWS`` rows makes the plan's packed copies where it uses them
        (``DecodePlan.pack``). Returns the seconds it took (0.0 for an eager engine)."""
        if not self.engine.fast.compiled or not supported(self.model.llm, None):
            return 0.0
        t0 = time.perf_counter()
        tok = self.engine.warmup_token()
        errors: list[BaseException] = []
        # the decode step may take other matrix forms above FEW_ROWS and PACK_ROWS rows
        for batch in [b for b in (1, 2, FEW_ROWS + 1, PACK_ROWS + 1) if b <= self.max_batch]:
            for i in range(batch):
                self.add(Request(Prompt([tok] * (prompt_len + i)), SamplingParams(max_new_tokens=max_new_tokens),
                                 on_token=lambda t, lp: None, on_end=lambda r: None, on_error=errors.append))  # fmt: skip
            while self.active or self.waiting:
                self.step()
        if errors:
            raise errors[0]
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ decoding

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests, then decode one token for every running row."""
        try:
            self.admit()
        except _Failed as f:
            for r in f.requests:
                r.on_error(f.__cause__ or RuntimeError("prefill failed"))
        self._evict()
        if not self.rows:
            return
        try:
            logits = self._forward()
        except Exception as e:  # noqa: BLE001 - the running rows fail; the scheduler goes on
            rows, self.rows = self.rows, []
            self._reset()
            for row in rows:
                if row is not None:
                    row.req.on_error(e)
            return
        slots = [i for i, r in enumerate(self.rows) if r is not None]
        rows = [self.rows[i] for i in slots]
        if len(slots) < len(self.rows):
            logits = logits[slots]  # the live rows' logits, in their order
        tokens = self._sample(rows, logits)
        self._emit(rows, tokens, logits, slots)
        self._evict()
        self.steps += 1

    def _forward(self) -> torch.Tensor:
        cache, llm = self.cache, self.model.llm
        if cache.length >= cache.max_len:
            self._grow(cache.length + self.headroom)
            cache = self.cache
        slot = cache.length
        self.valid[:, slot] = True
        ids, pos = self.next[:, None], self.pos[:, None]
        mask = self.valid[:, : slot + 1]
        fast = self.engine.fast
        logits = None
        if supported(llm, cache):
            if fast.compiled:  # one graph for every batch size and cache length (``dynamic``)
                logits = fast.compiled_step(ids, cache, pos, self.valid, dynamic=True)
            if logits is None:
                logits = fast.step(ids, cache, pos, mask)
        else:
            logits = self.model(ids, cache=cache, attention_mask=mask.long(), position_ids=pos).logits[:, -1]
        self.pos = self.pos + 1
        free = [i for i, r in enumerate(self.rows) if r is None]
        if free:  # a free row's position stays put (it may wait long for a request)
            self.pos[free] = 0
        return logits.float()

    def _grow(self, need: int) -> None:
        self._realloc(_round(need, self.headroom))

    def _realloc(self, cap: int, shift: int = 0) -> None:
        """The running batch in a cache of ``cap`` slots, every row's slots moved ``shift`` right."""
        old = self.cache
        new = KVCache(self.model.config.llm, len(self.rows), cap, old.k[0].dtype, old.k[0].device)
        for layer in range(len(old.k)):
            new.k[layer][:, :, shift : shift + old.length] = old.k[layer][:, :, : old.length]
            new.v[layer][:, :, shift : shift + old.length] = old.v[layer][:, :, : old.length]
        valid = torch.zeros(len(self.rows), cap, dtype=torch.bool, device=self.valid.device)
        valid[:, shift : shift + old.length] = self.valid[:, : old.length]
        new.length = new.prefill_length = old.length + shift
        new.media = old.media
        self.cache, self.valid = new, valid

    def _emit(self, rows: list[_Row], tokens: list[int], logits: torch.Tensor, slots: list[int]) -> None:
        """Hand each row its token (and logprobs); mark rows that end (stop token, max tokens).
        ``logits``: one row per row; ``slots``: each row's batch index (into ``self.next``)."""
        self.next[slots] = torch.tensor(tokens, dtype=self.next.dtype, device=self.next.device)
        for i, (row, tok) in enumerate(zip(rows, tokens, strict=True)):
            if row.failed:  # its sampling failed (``_sample``): it was told so, it gets no token
                continue
            r = row.req
            row.seen.append(tok)
            row.counts[tok] = row.counts.get(tok, 0) + 1
            if tok in r.params.stop_token_ids:
                row.finish = "stop"
                continue
            r.generated += 1
            lp = _logprobs(logits[i], tok, r.logprobs) if r.logprobs is not None else None
            try:
                r.on_token(tok, lp)
            except Exception as e:  # noqa: BLE001 - a callback that raises ends its own row only
                row.finish, row.failed = "error", True
                try:
                    r.on_error(e)
                except Exception:  # noqa: BLE001
                    log.exception("a request's error callback raised")
                continue
            if r.generated >= r.params.max_new_tokens:
                row.finish = "length"

    def _evict(self) -> None:
        """End finished and cancelled rows, leaving free rows behind; drop free rows when nothing
        waits to take them and they are half the batch or more; compact slots no row attends to
        any more."""
        for i, row in enumerate(self.rows):
            if row is None:
                continue
            reason = row.finish or ("cancelled" if row.req.cancelled else None)
            if reason:
                if not row.failed:  # a failed row was told so already
                    self._keep_prefix(i, row)
                    row.req.on_end(reason)
                self.rows[i] = None
                self.valid[i] = False  # it attends to its own new slot only until it is taken over
        keep = [i for i, r in enumerate(self.rows) if r is not None]
        if not keep:
            self.rows = []
            self._reset()
            return
        # free rows nobody will take soon: none waits, or a batch with cross-attention latents (its
        # new rows are always appended, so waiting requests never take a free row over)
        media = self.cache is not None and self.cache.media is not None
        if (not self.waiting or media) and 2 * len(keep) <= len(self.rows):
            idx = torch.tensor(keep, device=self.valid.device)
            self.rows = [self.rows[i] for i in keep]
            self.cache.select(idx)
            self.valid, self.pos, self.next = self.valid[idx], self.pos[idx], self.next[idx]
        used = self.valid[:, : self.cache.length].any(0)
        first = int(used.float().argmax()) if bool(used.any()) else self.cache.length
        if first >= max(self.headroom, self.cache.length // 4):  # a left part nobody reads any more
            n = self.cache.length - first
            self.cache.k = [_dense(t[:, :, first:]) for t in self.cache.k]
            self.cache.v = [_dense(t[:, :, first:]) for t in self.cache.v]
            self.cache.max_len -= first
            self.cache.length = self.cache.prefill_length = n
            self.valid = _dense(self.valid[:, first:])

    def _keep_prefix(self, i: int, row: _Row) -> None:
        """Offer the engine's prefix cache the keys and values of row ``i``'s tokens that have them:
        the prompt and every generated token but the last (never fed back); not if the weights
        changed since its prefill. A failure (memory) keeps nothing and fails no request."""
        eng = self.engine
        if eng.prefix is None or row.images is None or self.cache.media is not None:
            return
        if row.weights is not eng.prefix.weights:
            return
        ids = row.seen[:-1]
        n = len(ids) // eng.prefix.block * eng.prefix.block
        if n == 0:
            return
        slots = self.valid[i, : self.cache.length].nonzero().squeeze(1)
        if len(slots) != len(ids):  # not the row's own tokens, in order: keep nothing
            return
        eng.keep_prefix(
            ids, row.images, [t[i] for t in self.cache.k], [t[i] for t in self.cache.v], slots[:n]
        )

    def _reset(self) -> None:
        self.cache = self.valid = self.pos = self.next = None

    def fail_all(self, exc: BaseException) -> None:
        """End every running and waiting request with ``exc`` (shutdown, a broken engine)."""
        for r in [*(row.req for row in self.rows if row is not None), *self.waiting]:
            r.on_error(exc)
        self.rows, self.waiting = [], []
        self._reset()

    # ------------------------------------------------------------------ sampling

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """One token per row, each with its own settings (see ``adjust``) and its own generator:
        rows decoding greedily with nothing to adjust take one batched argmax; sampled rows whose
        settings are temperature, top-k and top-p alone have their logits adjusted and their
        softmax taken together, one batch per distinct setting, and each then draws from its own
        row (the same values, row for row, as alone)."""
        from modalign.infer.engine import distributions, process_logits

        plain = [_plain_greedy(row) for row in rows]
        greedy = logits.argmax(-1).tolist() if any(plain) else None
        out = [0] * len(rows)
        shared: dict[tuple, list[int]] = {}  # settings -> the rows sampled with them
        for i, row in enumerate(rows):
            if plain[i]:
                out[i] = greedy[i]
            elif _settings_alone(row):
                p = row.req.params
                shared.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
            else:
                out[i] = self._sample_row(row, logits[i])
        for idx in shared.values():
            if len(idx) == 1:
                out[idx[0]] = self._sample_row(rows[idx[0]], logits[idx[0]])
                continue
            try:
                probs = process_logits(logits[idx], None, rows[idx[0]].req.params).softmax(-1)
                ok = bool(distributions(probs).all())
            except Exception as e:  # noqa: BLE001 - each row then finds (and ends with) its own error
                log.debug("sampling %d rows together failed (%s): row by row", len(idx), e)
                ok = False
            for j, i in enumerate(idx):  # non-finite logits (``draw``'s fallback) or a failed batch:
                try:  # row by row, where a row that fails alone too ends
                    out[i] = (int(torch.multinomial(probs[j : j + 1], 1, generator=rows[i].gen)[0, 0]) if ok
                              else self._sample_row(rows[i], logits[i]))  # fmt: skip
                except Exception:  # noqa: BLE001
                    out[i] = self._sample_row(rows[i], logits[i])
        return out

    def _sample_row(self, row: _Row, logits: torch.Tensor) -> int:
        """One row's token, its settings applied alone; a row whose settings fail ends (its
        request told why) and gets a stand-in token."""
        try:
            adj = adjust(logits, row)
            p = row.req.params
            return int(draw(adj[None], row.gen)[0]) if p.temperature > 0 else int(adj.argmax())
        except Exception as e:  # noqa: BLE001 - a row whose settings fail ends alone
            row.finish, row.failed = "error", True
            try:
                row.req.on_error(e)
            except Exception:  # noqa: BLE001
                log.exception("a request's error callback raised")
            return 0  # a stand-in: the row leaves at the next eviction


def _settings_alone(row: _Row) -> bool:
    """Whether ``row`` samples with temperature, top-k and top-p alone."""
    return row.req.params.temperature > 0 and _unadjusted(row)


def _unadjusted(row: _Row) -> bool:
    """Whether ``row`` has no penalty or bias (which depend on the row's own tokens)."""
    r = row.req
    return (r.params.repetition_penalty == 1.0 and not r.logit_bias and not r.presence_penalty
            and not r.frequency_penalty)  # fmt: skip


def _plain_greedy(row: _Row) -> bool:
    return row.req.params.temperature <= 0 and _unadjusted(row)


class _Failed(Exception):
    def __init__(self, requests: list[Request]):
        super().__init__(f"{len(requests)} request(s) failed")
        self.requests = requests


def adjust(logits: torch.Tensor, row: _Row) -> torch.Tensor:
    """One row's logits [V] with its request's settings applied: logit bias, presence and
    frequency penalties (OpenAI's definitions), then the engine's repetition penalty,
    temperature, top-k and top-p (``process_logits``)."""
    from modalign.infer.engine import process_logits

    r = row.req
    if r.logit_bias or r.presence_penalty or r.frequency_penalty:
        logits = logits.clone()
        for tok, b in r.logit_bias.items():
            if 0 <= tok < logits.shape[-1]:
                logits[tok] += b
        for tok, n in row.counts.items():
            logits[tok] -= r.presence_penalty + r.frequency_penalty * n
    seen = None
    if r.params.repetition_penalty != 1.0:  # process_logits passes over ids that are not tokens
        seen = torch.tensor([row.seen], device=logits.device)
    return process_logits(logits[None], seen, r.params)[0]


def _logprobs(logits: torch.Tensor, token: int, k: int) -> dict:
    lp = torch.log_softmax(logits.float(), -1)
    out = {"token": token, "logprob": float(lp[token])}
    if k:
        vals, ids = lp.topk(min(k, lp.shape[-1]))
        out["top"] = [(int(t), float(v)) for t, v in zip(ids, vals, strict=True)]
    return out


def _round(n: int, multiple: int) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A copy with the strides its sizes give (``contiguous`` keeps a one-row slice's strides,
    which a compiled step's stride guards would then compile again for)."""
    return t.clone(memory_format=torch.contiguous_format)


def _pad_to(valid: torch.Tensor, cols: int) -> torch.Tensor:
    out = torch.zeros(valid.shape[0], cols, dtype=torch.bool, device=valid.device)
    out[:, : valid.shape[1]] = valid
    return out


__all__ = ["Prompt", "Request", "SamplingParams", "Scheduler"]
