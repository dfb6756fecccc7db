"""Dynamic batching: concurrent requests with the same sampling settings share one engine run.

A worker thread takes the oldest waiting job, gathers up to ``max_batch`` compatible jobs that
arrive within ``wait_ms``, and runs them together (left-padded prefill, batched decode). Each
job receives its tokens through its own queue; a job that reaches its own ``max_tokens``, hits a
stop string, or whose client disconnected is cancelled in the engine, which frees the row.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from modalign.infer.engine import Engine, Prompt, SamplingParams

log = logging.getLogger("modalign.serve")


@dataclass
class Job:
    prompt: Prompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    generated: int = 0

    def key(self) -> tuple:
        p = self.params
        return (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed, tuple(p.stop_token_ids))

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Batcher(threading.Thread):
    def __init__(self, engine: Engine, max_batch: int = 8, wait_ms: float = 5.0):
        super().__init__(daemon=True, name="modalign-batcher")
        self.engine, self.max_batch, self.wait = engine, max_batch, wait_ms / 1000
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.backlog: list[Job] = []
        self.busy = 0  # rows in the running batch
        self.batches = 0
        self.stopping = False

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def pending(self) -> int:
        return self.inbox.qsize() + len(self.backlog)

    def _take(self) -> list[Job]:
        if not self.backlog:
            self.backlog.append(self.inbox.get())
        deadline = time.monotonic() + self.wait
        while len(self.backlog) < 4 * self.max_batch:
            try:
                self.backlog.append(self.inbox.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        self.backlog = [j for j in self.backlog if not j.cancelled]
        if not self.backlog:
            return []
        key = self.backlog[0].key()
        batch = [j for j in self.backlog if j.key() == key][: self.max_batch]
        self.backlog = [j for j in self.backlog if j not in batch]
        return batch

    def run(self) -> None:
        while not self.stopping:
            batch = self._take()
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as e:  # a failure ends these requests, never the server
                log.exception("generation failed")
                for j in batch:
                    j.emit(("error", str(e)))
            finally:
                self.busy = 0

    def _run(self, batch: list[Job]) -> None:
        self.batches += 1
        self.busy = len(batch)
        params = SamplingParams(**{**batch[0].params.__dict__})
        params.max_new_tokens = max(j.params.max_new_tokens for j in batch)
        stops = set(params.stop_token_ids)

        def cancelled(i: int) -> bool:
            j = batch[i]
            return j.cancelled or j.generated >= j.params.max_new_tokens

        ended = [False] * len(batch)
        for row in self.engine.stream([j.prompt for j in batch], params, cancelled):
            for i, t in enumerate(row):
                j = batch[i]
                if t is None or ended[i]:
                    continue
                if t in stops:
                    ended[i] = True
                    j.emit(("end", "stop"))
                    continue
                j.generated += 1
                j.emit(("token", t))
                if j.generated >= j.params.max_new_tokens:
                    ended[i] = True
                    j.emit(("end", "length"))
        for i, j in enumerate(batch):
            if not ended[i]:
                j.emit(("end", "length"))
