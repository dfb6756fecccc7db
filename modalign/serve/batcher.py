"""The generation worker: one thread that owns the continuous-batching scheduler
(``infer/scheduler.py``) and talks to the event loop through per-job queues.

    request handler --submit(job)--> inbox --> worker thread: admit, decode one step, repeat
         ^                                          |
         +---- job.out (asyncio.Queue) <-- one call_soon_threadsafe per step: ("token", id, logprobs)
                                                        | ("end", reason) | ("error", message) per job

The events a step makes for all its jobs reach the event loop in one callback (``Outbox``): one
wake-up of the loop per step, not one per token.

A job is identified by itself (no field equality), one job's failure reaches only that job, and
the worker survives whatever a step raises: it fails the rows concerned and goes on. ``health``
reports whether the thread is alive and when it last made progress; a dead thread is restarted
on the next submit or health check.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from modalign.infer.engine import Engine, Prompt, SamplingParams
from modalign.infer.scheduler import Request, Scheduler

log = logging.getLogger("modalign.serve")


def _malloc_trim():
    """glibc's ``malloc_trim``: hand freed heap pages back to the system (None elsewhere)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class Outbox:
    """Events made by the worker thread, held until ``flush`` hands them to their event loops in
    one ``call_soon_threadsafe`` per loop. Events from any other thread go at once."""

    def __init__(self):
        self.items: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, tuple]] = []
        self.owner: int | None = None  # the worker thread's ident

    def put(self, loop: asyncio.AbstractEventLoop, out: asyncio.Queue, item: tuple) -> None:
        if threading.get_ident() == self.owner:
            self.items.append((loop, out, item))
        else:
            _post(loop, [(out, item)])

    def flush(self) -> None:
        if not self.items:
            return
        items, self.items = self.items, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, out, item in items:
            by_loop.setdefault(loop, []).append((out, item))
        for loop, batch in by_loop.items():
            _post(loop, batch)


def _post(loop: asyncio.AbstractEventLoop, batch: list[tuple[asyncio.Queue, tuple]]) -> None:
    try:
        loop.call_soon_threadsafe(_deliver, batch)
    except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
        pass


def _deliver(batch: list[tuple[asyncio.Queue, tuple]]) -> None:
    for out, item in batch:
        out.put_nowait(item)


@dataclass(eq=False)
class Job:
    """One chat completion on its way through the worker; ``out`` receives its events."""

    prompt: Prompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    prompt_tokens: int = 0
    logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: int = 0
    request: Request | None = None
    outbox: Outbox | None = None  # set by ``Batcher.submit``

    def __post_init__(self):
        self.request = Request(self.prompt, self.params, self._token, self._end, self._error, self.logprobs,
                               self.logit_bias, self.presence_penalty, self.frequency_penalty)  # fmt: skip

    @property
    def cancelled(self) -> bool:
        return self.request.cancelled

    def cancel(self) -> None:
        """Free the job's row at the next step (client gone, stop string, deadline)."""
        self.request.cancelled = True

    def _emit(self, item) -> None:
        if self.outbox is not None:
            self.outbox.put(self.loop, self.out, item)
        else:
            _post(self.loop, [(self.out, item)])

    def _token(self, token: int, logprobs: dict | None) -> None:
        self.generated += 1
        self._emit(("token", token, logprobs))

    def _end(self, reason: str) -> None:
        self._emit(("end", reason, None))

    def _error(self, exc: BaseException) -> None:
        self._emit(("error", f"{type(exc).__name__}: {exc}", None))


class Batcher:
    """The worker thread and its inbox. ``submit`` never blocks; ``health`` never blocks."""

    def __init__(self, engine: Engine, max_batch: int = 32, stall_s: float = 60.0):
        self.engine, self.max_batch, self.stall_s = engine, max_batch, stall_s
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.scheduler = Scheduler(engine, max_batch)
        self.outbox = Outbox()
        self.stopping = False
        self.steps = 0
        self.restarts = 0
        self.last_progress = time.monotonic()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._trim, self._trimmed = _malloc_trim(), time.monotonic()

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            if self._thread is not None:  # it died: whatever it held is lost, say so to its jobs
                self.restarts += 1
                log.error("the generation worker died; restarting it (restart %d)", self.restarts)
                self.outbox.flush()  # what the dead thread made before it died
                self.scheduler.fail_all(RuntimeError("the generation worker restarted"))
            self.last_progress = time.monotonic()
            self._thread = threading.Thread(target=self._loop, daemon=True, name="modalign-worker")
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping = True
        self.inbox.put(None)  # wake the worker
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if self.stopping:
            job._error(RuntimeError("the server is shutting down"))
            return
        job.outbox = self.outbox
        self.start()  # restarts a dead worker
        self.inbox.put(job)

    # ------------------------------------------------------------------ state

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy(self) -> int:
        """Rows decoding now."""
        return self.scheduler.active

    def pending(self) -> int:
        return self.inbox.qsize() + len(self.scheduler.waiting)

    def health(self) -> tuple[bool, dict]:
        """(healthy, details): unhealthy when the worker is dead, or has work and has made no
        progress for ``stall_s`` seconds."""
        if not self.stopping:
            self.start()  # a dead worker is restarted
        since = time.monotonic() - self.last_progress
        working = self.busy or self.pending()
        stalled = bool(working) and since > self.stall_s
        ok = self.alive and not stalled
        status = "ok" if ok else ("stalled" if self.alive else "down")
        return ok, {"status": status, "running": self.busy, "pending": self.pending(),
                    "seconds_since_progress": round(since, 3), "steps": self.steps, "restarts": self.restarts}  # fmt: skip

    # ------------------------------------------------------------------ the worker

    def _take(self, block: bool) -> None:
        """Move jobs from the inbox to the scheduler (waiting up to 0.5 s when idle)."""
        try:
            job = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if job is not None:
                try:
                    self.scheduler.add(job.request)
                except Exception as e:  # noqa: BLE001 - e.g. invalid sampling settings
                    job._error(e)
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        sched = self.scheduler
        self.outbox.owner = threading.get_ident()
        while not self.stopping:
            try:
                idle = not (sched.active or sched.waiting)
                self._take(block=idle)
                if self.stopping:
                    break
                if sched.active or sched.waiting:
                    sched.step()
                    self.steps += 1
                elif self._trim is not None and time.monotonic() - self._trimmed > 5:
                    # idle: give back what a burst of requests freed (tensors of many sizes
                    # fragment the heap; without this the resident size creeps up burst by burst)
                    self._trim(0)
                    self._trimmed = time.monotonic()
                self.last_progress = time.monotonic()
            except Exception as e:  # noqa: BLE001 - what the scheduler did not isolate fails its rows only
                log.exception("generation step failed")
                sched.fail_all(e)
            finally:
                self.outbox.flush()  # this step's events, one call per event loop
        sched.fail_all(RuntimeError("the server is shutting down"))
        self.outbox.flush()
        while True:  # and whatever is still in the inbox
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job._error(RuntimeError("the server is shutting down"))
