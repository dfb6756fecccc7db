"""OpenAI-compatible HTTP server (FastAPI): ``POST /v1/chat/completions`` (text and ``image_url``
parts, streaming as server-sent events, logprobs), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus) and a web chat page at ``GET /``. No model logic lives here:
requests are checked (``protocol.py``), rendered off the event loop, and handed to the worker
(``batcher.py``), which runs them in a continuous batch.

Every request has a deadline; a client that leaves frees its row; one request's failure never
reaches another; every error is an OpenAI-shaped JSON body (a stream ends with an error event
and ``[DONE]``). ``docs/security.md`` has the threat model and the limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from modalign.data.conversation import BadSample
from modalign.data.images import DEFAULT_MAX_ASPECT, ImageProcessor
from modalign.devices import in_own_thread
from modalign.infer.chat import ChatModel
from modalign.infer.detok import StopText
from modalign.infer.engine import Prompt
from modalign.serve.batcher import Batcher, Job
from modalign.serve.guard import Guard, Metrics, error_body
from modalign.serve.images import ImagePolicy, RequestError, load_image_bytes
from modalign.serve.protocol import ChatRequest, Limits, parse_request
from modalign.serve.tools import clean as clean_tools
from modalign.serve.tools import forced_prefix, parse_reply, supports_tools
from modalign.serve.tools import native as native_tools
from modalign.serve.tools import write as write_tools

log = logging.getLogger("modalign.serve")


@dataclass
class ServeConfig:
    model_name: str = "modalign"
    api_key: str | None = None
    allowed_hosts: list[str] = field(default_factory=list)  # Host names besides localhost (no key set)
    max_body_bytes: int = 20 * 1024 * 1024
    body_timeout_s: float = 30.0
    request_timeout_s: float = 600.0  # from the request's arrival to its last token
    max_messages: int = 256
    max_chars: int | None = None  # characters of text per request (default: 16 per context token)
    max_images: int = 8
    max_image_pixels: int = 16_000_000
    max_image_aspect: float = DEFAULT_MAX_ASPECT
    # uploads seen before skip decoding and resizing: their pixels kept by a digest of the bytes
    decoded_image_cache_mb: float = 64
    max_tokens_default: int = 256
    max_batch: int = 32
    stall_s: float = 60.0  # /health answers 503 when work waits and no step finished for this long
    images: ImagePolicy = field(default_factory=ImagePolicy)
    # threads that fetch remote images (a slow host holds one for up to images.timeout_s), apart
    # from those that parse bodies and render prompts, which a slow host can therefore never hold
    fetch_threads: int = 16
    prepare_threads: int = 4


def _err(status: int, message: str, param=None, code=None) -> Response:
    return Response(error_body(status, message, param, code), status, media_type="application/json")


class Deadline(Exception):
    pass


class GenerationFailed(Exception):
    pass


class ClientGone(Exception):
    pass


def create_app(cm: ChatModel, cfg: ServeConfig | None = None) -> FastAPI:
    cfg = cfg or ServeConfig()
    if cm.model.config.llm.is_encoder_decoder:
        raise ValueError("serving an encoder-decoder (T5) language model is not supported yet; "
                         "modalign generate, chat and eval run it")  # fmt: skip
    context = cm.model.config.llm.max_position_embeddings
    limits = Limits(cfg.max_messages, cfg.max_chars or 16 * context, cfg.max_images)
    images = (ImageProcessor(cm.model.config.vision, max_pixels=cfg.max_image_pixels, max_aspect=cfg.max_image_aspect,
                             cache_mb=cfg.decoded_image_cache_mb)
              if cm.model.has_vision else None)  # fmt: skip
    batcher = Batcher(cm.engine, cfg.max_batch, cfg.stall_s)
    metrics = Metrics()
    metrics.watch_image_cache(cm.engine.image_cache)
    metrics.watch_prefix_cache(cm.engine.prefix)
    for name in ("fetch_threads", "prepare_threads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"ServeConfig.{name} must be at least 1, got {getattr(cfg, name)}")
    fetch = ThreadPoolExecutor(cfg.fetch_threads, thread_name_prefix="modalign-fetch")
    prepare = ThreadPoolExecutor(cfg.prepare_threads, thread_name_prefix="modalign-prepare")

    async def in_pool(pool, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def image_bytes(req: ChatRequest) -> list[bytes]:
        """The request's images: remote ones on the fetch threads, the rest on the prepare ones."""
        if req.images and images is None:
            raise RequestError("this model takes no images", param="messages")
        jobs = [in_pool(fetch if url.startswith(("http://", "https://")) else prepare, load_image_bytes, url,
                        cfg.images, param) for url, param in req.images]  # fmt: skip
        got = await asyncio.gather(*jobs, return_exceptions=True)
        for x in got:  # the first image's error, as one after the other would give
            if isinstance(x, BaseException):
                raise x
        return got

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # a compiled engine: its graphs before the first request, in a thread that ends with them,
        # so that the worker's OpenMP threads are the process's only ones (``in_own_thread``)
        secs = in_own_thread(batcher.scheduler.warmup)
        if secs:
            log.info("compiled the decode step in %.1f s", secs)
        batcher.start()
        yield
        batcher.stop()
        for pool in (fetch, prepare):
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="modalign", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.config = batcher, metrics, cfg
    app.add_middleware(Guard, cfg=cfg, metrics=metrics)
    _error_handlers(app)
    page = (Path(__file__).parent / "static" / "index.html").read_text()

    @app.get("/health")
    async def health():
        ok, details = batcher.health()
        return JSONResponse({"model": cfg.model_name, **details}, 200 if ok else 503)

    @app.get("/metrics")
    async def prom():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "modalign"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.monotonic()
        deadline = t0 + cfg.request_timeout_s
        try:
            body = await in_pool(prepare, _parse_json, await request.body())
            req = parse_request(body, limits)
            data = await image_bytes(req)
            prompt, n_prompt = await in_pool(prepare, _build_prompt, cm, images, req, data)
            params = _sampling(cm, req, n_prompt, context, cfg)
        except RequestError as e:
            return _err(e.status, str(e), e.param, e.code)
        except BadSample as e:
            code = {"image too large": "image_too_large", "template error": "template_error"}.get(
                e.reason, "invalid_image"
            )
            return _err(400, str(e), "messages", code)
        except Exception as e:  # noqa: BLE001 - never a plain-text 500, and counted
            log.exception("preparing a request failed")
            return _err(
                500, f"internal error preparing the request ({type(e).__name__})", None, "internal_error"
            )
        job = Job(prompt, params, asyncio.get_running_loop(), n_prompt, req.logprobs, req.logit_bias,
                  req.presence_penalty, req.frequency_penalty)  # fmt: skip
        metrics.in_flight.inc()
        batcher.submit(job)
        reply = Reply(cm, job, req, cfg.model_name, deadline, request)

        def done():
            job.cancel()
            metrics.in_flight.dec()
            metrics.tokens.labels("prompt").inc(n_prompt)
            metrics.tokens.labels("completion").inc(job.generated)
            metrics.latency.labels("chat").observe(time.monotonic() - t0)

        if req.stream:
            return StreamingResponse(reply.events(done, metrics), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        try:
            return await reply.whole()
        except Deadline:
            return _err(504, f"generation did not finish within {cfg.request_timeout_s:g} s", None, "timeout")
        except GenerationFailed as e:
            return _err(500, f"generation failed: {e}", None, "generation_failed")
        except ClientGone:
            return _err(499, "the client closed the connection", None, "client_closed")
        finally:
            done()

    return app


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _err(422, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _err(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("unhandled error")
        return _err(500, f"internal error ({type(exc).__name__})", None, "internal_error")


def _parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        msg = "nested too deeply" if isinstance(e, RecursionError) else getattr(e, "msg", str(e))
        raise RequestError(f"invalid JSON body: {msg}") from None


def _build_prompt(cm: ChatModel, images: ImageProcessor | None, req: ChatRequest, data: list[bytes]):
    """Decode the images' bytes (sizes checked before decoding) and render the prompt; runs on a
    prepare thread. Returns the prompt and its length as the model sees it (images expanded)."""
    pixels = [images(b, f"image {k}") for k, b in enumerate(data)]
    msgs = req.messages
    if (req.tools is not None and req.tools.active) or req.calls or any(m.role == "tool" for m in msgs):
        if not supports_tools(cm.template):
            raise RequestError(f"this model's chat template ({cm.template.name}) does not write tool calls; "
                               "tools need a ChatML-family template (chatml, or a Jinja one with <tool_call>)",
                               param="tools", code="unsupported_parameter")  # fmt: skip
        if cm.template.name == "jinja":  # the checkpoint's template writes them itself
            active = req.tools is not None and req.tools.active
            ids = cm.prompt_ids(
                native_tools(msgs, req.calls), tools=clean_tools(req.tools.tools) if active else None
            )
        else:
            ids = cm.prompt_ids(write_tools(msgs, req.calls, req.tools))
    else:
        ids = cm.prompt_ids(msgs)
    prefix = forced_prefix(req.tools)
    if prefix:  # tool_choice required / a named function: the reply starts with the call's opening
        ids += cm.tok.encode(prefix)
    model = cm.model
    ph = model.config.image_token_id
    per = model.num_image_tokens() if model.config.placeholder == "per_token" else 1
    if model.has_vision and sum(t == ph for t in ids) != per * len(pixels):  # never from user text
        raise RequestError("the prompt's image placeholders do not match its images", param="messages")
    n = len(ids)
    if model.config.placeholder == "per_image":
        n += sum(model.num_image_tokens(tuple(px.shape[-2:])) - 1 for px in pixels)
    return Prompt(ids, pixels), n


def _sampling(cm: ChatModel, req: ChatRequest, n_prompt: int, context: int, cfg: ServeConfig):
    args = dict(req.sampling)
    room = context - n_prompt
    if room < 1:
        raise RequestError(f"the prompt ({n_prompt} tokens) fills the context length of {context} tokens",
                           param="messages", code="context_length_exceeded")  # fmt: skip
    if args["max_new_tokens"] is None:
        args["max_new_tokens"] = min(cfg.max_tokens_default, room)
    elif n_prompt + args["max_new_tokens"] > context:
        raise RequestError(f"the prompt ({n_prompt} tokens) plus max_tokens ({args['max_new_tokens']}) exceeds the "
                           f"context length of {context} tokens", param="max_tokens", code="context_length_exceeded")  # fmt: skip
    return cm.params(**args)


class Reply:
    """Turns a job's token events into an OpenAI completion (whole, or as server-sent events)."""

    def __init__(
        self, cm: ChatModel, job: Job, req: ChatRequest, model: str, deadline: float, request: Request
    ):
        self.cm, self.job, self.req, self.model = cm, job, req, model
        self.deadline, self.request = deadline, request
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self.check_at = time.monotonic() + 0.5  # when to look for a client that left next

    async def _event(self, watch_client: bool):
        """The job's next event; raises ``Deadline`` past the deadline; a client that left (when
        ``watch_client``: checked every half second) cancels the job."""
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                raise Deadline
            if watch_client and now >= self.check_at:
                self.check_at = now + 0.5
                if await self.request.is_disconnected():
                    self.job.cancel()
                    raise ClientGone
            try:
                return self.job.out.get_nowait()
            except asyncio.QueueEmpty:
                pass
            try:
                async with asyncio.timeout(min(self.deadline - now, 0.5)):
                    return await self.job.out.get()
            except TimeoutError:
                continue

    async def pieces(self, watch_client: bool):
        """(text delta, finish reason or None, logprob entries) until the job ends; honours stop
        strings (text that could begin one is held back until it cannot)."""
        text = StopText(self.cm.tok, [*self.req.stop, *getattr(self.cm.template, "stop_strings", ())])
        while True:
            kind, value, lp = await self._event(watch_client)
            if kind == "error":
                raise GenerationFailed(value)
            if kind == "end":
                yield text.flush(), "length" if value == "cancelled" else value, []
                return
            piece = text.push(value)
            entries = [_logprob_entry(self.cm.tok, lp)] if lp is not None else []
            if text.stopped:
                self.job.cancel()
                yield piece, "stop", entries
                return
            if piece or entries:
                yield piece, None, entries

    def usage(self) -> dict:
        n, g = self.job.prompt_tokens, self.job.generated
        return {"prompt_tokens": n, "completion_tokens": g, "total_tokens": n + g}

    async def _collect(self, watch_client: bool):
        text, finish, entries = "", "length", []
        async for piece, fin, lp in self.pieces(watch_client=watch_client):
            text += piece
            entries += lp
            finish = fin or finish
        return text, finish, entries

    def _message(self, text: str, finish: str) -> tuple[dict, str]:
        """The assistant message (tool calls parsed where tools are active) and the finish reason."""
        spec = self.req.tools
        if spec is None or not spec.active:
            return {"role": "assistant", "content": text}, finish
        content, calls = parse_reply(forced_prefix(spec) + text, spec)
        if not calls:
            return {"role": "assistant", "content": content}, finish
        return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"

    async def whole(self) -> dict:
        text, finish, entries = await self._collect(watch_client=True)
        message, finish = self._message(text, finish)
        choice = {"index": 0, "message": message, "finish_reason": finish,
                  "logprobs": {"content": entries} if self.req.logprobs is not None else None}  # fmt: skip
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage()}  # fmt: skip

    def _chunk(self, delta: dict, finish=None, entries=None, with_usage=False) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if self.req.logprobs is not None:
            choice["logprobs"] = {"content": entries or []}
        doc = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [choice]}  # fmt: skip
        if with_usage:
            doc["choices"], doc["usage"] = [], self.usage()
        return f"data: {json.dumps(doc)}\n\n"

    async def events(self, done, metrics: Metrics):
        """Server-sent events; a stream always ends with ``[DONE]``, after an error event if one."""
        try:
            try:
                yield self._chunk({"role": "assistant", "content": ""})
                if self.req.tools is not None and self.req.tools.active:  # a call is parsed once it is whole
                    text, fin, entries = await self._collect(watch_client=False)
                    message, fin = self._message(text, fin)
                    if message["content"]:
                        yield self._chunk({"content": message["content"]}, entries=entries)
                    if message.get("tool_calls"):
                        calls = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
                        yield self._chunk(
                            {"tool_calls": calls}, entries=None if message["content"] else entries
                        )
                    yield self._chunk({}, fin)
                else:
                    async for piece, fin, entries in self.pieces(watch_client=False):
                        if piece or entries:
                            yield self._chunk({"content": piece}, entries=entries)
                        if fin:
                            yield self._chunk({}, fin)
                if self.req.include_usage:
                    yield self._chunk({}, with_usage=True)
            except (Deadline, GenerationFailed) as e:
                code = "timeout" if isinstance(e, Deadline) else "generation_failed"
                metrics.stream_errors.labels(code).inc()
                msg = (
                    "generation did not finish in time"
                    if isinstance(e, Deadline)
                    else f"generation failed: {e}"
                )
                yield f"data: {json.dumps({'error': json.loads(error_body(500, msg, None, code))['error']})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: its row is freed in the worker
            done()


def _logprob_entry(tok, lp: dict) -> dict:
    def one(t: int, v: float) -> dict:
        s = tok.decode([t])
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

    return {**one(lp["token"], lp["logprob"]), "top_logprobs": [one(t, v) for t, v in lp.get("top", [])]}
