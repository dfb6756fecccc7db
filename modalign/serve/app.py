"""OpenAI-compatible HTTP server (FastAPI): ``POST /v1/chat/completions`` (text and
``image_url`` parts, streaming as server-sent events), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus) and a small web chat page at ``GET /``. No model logic lives here:
requests become prompts for the engine, through the dynamic batcher."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from modalign.data.conversation import IMAGE_MARK, BadSample, Message
from modalign.data.images import open_image
from modalign.infer.chat import ChatModel, TextDelta
from modalign.serve.batcher import Batcher, Job
from modalign.serve.images import ImagePolicy, RequestError, load_image_bytes


@dataclass
class ServeConfig:
    model_name: str = "modalign"
    api_key: str | None = None
    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 8
    max_image_pixels: int = 16_000_000
    max_tokens_default: int = 256
    max_batch: int = 8
    images: ImagePolicy = field(default_factory=ImagePolicy)


def _err(status: int, message: str, param=None, code=None) -> JSONResponse:
    kind = {401: "authentication_error", 413: "invalid_request_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "modalign_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "modalign_request_seconds", "request latency", ["endpoint"], registry=self.registry
        )
        self.tokens = Counter("modalign_tokens", "tokens processed", ["kind"], registry=self.registry)
        self.in_flight = Gauge("modalign_in_flight", "requests being generated", registry=self.registry)


def parse_messages(body: dict, cfg: ServeConfig) -> tuple[list[Message], list[bytes]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out, images = [], []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(
                f"messages[{i}].role must be system, user or assistant", param=f"messages[{i}].role"
            )
        content = m.get("content")
        if isinstance(content, str):
            text = content.replace(IMAGE_MARK, "")
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(part["text"].replace(IMAGE_MARK, ""))
                elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                    if len(images) >= cfg.max_images:
                        raise RequestError(f"at most {cfg.max_images} images per request", param=where,
                                           code="too_many_images")  # fmt: skip
                    images.append(load_image_bytes(part["image_url"].get("url"), cfg.images, where))
                    pieces.append(IMAGE_MARK)
                else:
                    raise RequestError(f"{where}: expected a text or image_url content part", param=where)
            text = "".join(pieces)
        else:
            raise RequestError(
                f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content"
            )
        out.append(Message(m["role"], text))
    if out[-1].role != "user":
        raise RequestError("the last message must come from the user", param="messages")
    return out, images


def build_prompt(cm: ChatModel, msgs: list[Message], images: list[bytes], cfg: ServeConfig):
    """Decode the images (pixel limit checked before decoding) and render the prompt; runs in a
    worker thread so that decoding never blocks the event loop."""
    pil = [
        open_image(data, max_pixels=cfg.max_image_pixels, sample_id=f"image {k}")
        for k, data in enumerate(images)
    ]
    return cm.prompt(msgs, pil)


def sampling_args(body: dict, cfg: ServeConfig) -> dict:
    def num(name, lo, hi, default, kind=float):
        v = body.get(name, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise RequestError(f"'{name}' must be a number in [{lo}, {hi}]", param=name)
        return kind(v)

    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    max_tokens = num("max_tokens", 1, 1 << 20, cfg.max_tokens_default, int)
    if "max_completion_tokens" in body:  # the newer name wins
        max_tokens = num("max_completion_tokens", 1, 1 << 20, cfg.max_tokens_default, int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise RequestError("'stop' must be a string or a list of up to 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer", param="seed")
    return {
        "max_new_tokens": max_tokens,
        "temperature": num("temperature", 0, 2, 1.0),
        "top_p": num("top_p", 1e-6, 1, 1.0),
        "top_k": num("top_k", 0, 1 << 20, 0, int),
        "repetition_penalty": num("repetition_penalty", 0.01, 10, 1.0),
        "stop": stop,
        "seed": seed,
    }


def create_app(cm: ChatModel, cfg: ServeConfig | None = None) -> FastAPI:
    cfg = cfg or ServeConfig()
    app = FastAPI(title="modalign", docs_url=None, redoc_url=None)
    batcher = Batcher(cm.engine, cfg.max_batch)
    batcher.start()
    metrics = Metrics()
    app.state.batcher, app.state.metrics = batcher, metrics
    context = cm.model.config.llm.max_position_embeddings
    page = (Path(__file__).parent / "static" / "index.html").read_text()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/") and cfg.api_key:
            if request.headers.get("authorization") != f"Bearer {cfg.api_key}":
                metrics.requests.labels(path, "401").inc()
                return _err(401, "invalid or missing API key", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            metrics.requests.labels(path, "413").inc()
            return _err(413, f"request body over {cfg.max_body_bytes} bytes", code="request_too_large")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _err(422, f"invalid request: {exc.errors()[:3]}")

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": cfg.model_name,
            "pending": batcher.pending(),
            "running": batcher.busy,
        }

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
        t0 = time.perf_counter()
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            return _err(413, f"request body over {cfg.max_body_bytes} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            msgs, images = await asyncio.to_thread(parse_messages, body, cfg)
            args = sampling_args(body, cfg)
            prompt = await asyncio.to_thread(build_prompt, cm, msgs, images, cfg)
        except json.JSONDecodeError as e:
            metrics.requests.labels("chat", "400").inc()
            return _err(400, f"invalid JSON body: {e.msg}")
        except RequestError as e:
            metrics.requests.labels("chat", str(e.status)).inc()
            return _err(e.status, str(e), e.param, e.code)
        except BadSample as e:
            metrics.requests.labels("chat", "400").inc()
            code = "image_too_large" if e.reason == "image too large" else "invalid_image"
            return _err(400, str(e), "messages", code)
        except ValueError as e:
            metrics.requests.labels("chat", "400").inc()
            return _err(400, str(e))
        n_prompt = len(prompt.input_ids)
        if n_prompt + args["max_new_tokens"] > context:
            metrics.requests.labels("chat", "400").inc()
            return _err(400, f"the prompt ({n_prompt} tokens) plus max_tokens ({args['max_new_tokens']}) exceeds the "
                             f"context length of {context} tokens", "max_tokens", "context_length_exceeded")  # fmt: skip
        params = cm.params(**{k: v for k, v in args.items() if k != "stop"})
        job = Job(prompt, params, asyncio.get_running_loop())
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        stream = bool(body.get("stream"))
        usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage"))
        metrics.in_flight.inc()
        batcher.submit(job)

        async def pieces():
            """(text delta, finish reason) until the job ends; honours stop strings."""
            delta, text, stops = TextDelta(cm.tok), "", args["stop"]
            while True:
                kind, value = await job.out.get()
                if kind == "error":
                    raise RuntimeError(value)
                if kind == "end":
                    yield "", value
                    return
                piece = delta.push(value)
                text += piece
                cut = next((text.index(s) for s in stops if s in text), None)
                if cut is not None:
                    job.cancelled = True
                    yield piece[: max(0, len(piece) - (len(text) - cut))], "stop"
                    return
                if piece:
                    yield piece, None

        def usage():
            return {"prompt_tokens": n_prompt, "completion_tokens": job.generated,
                    "total_tokens": n_prompt + job.generated}  # fmt: skip

        def done():
            metrics.in_flight.dec()
            metrics.tokens.labels("prompt").inc(n_prompt)
            metrics.tokens.labels("completion").inc(job.generated)
            metrics.latency.labels("chat").observe(time.perf_counter() - t0)

        if not stream:
            try:
                text, finish = "", "length"
                async for piece, fin in pieces():
                    text += piece
                    finish = fin or finish
            except RuntimeError as e:
                job.cancelled = True
                done()
                metrics.requests.labels("chat", "500").inc()
                return _err(500, f"generation failed: {e}")
            done()
            metrics.requests.labels("chat", "200").inc()
            return {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                    "usage": usage()}  # fmt: skip

        def chunk(delta: dict, finish=None, with_usage=False) -> str:
            doc = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
            if with_usage:
                doc["choices"], doc["usage"] = [], usage()
            return f"data: {json.dumps(doc)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for piece, fin in pieces():
                    if piece:
                        yield chunk({"content": piece})
                    if fin:
                        yield chunk({}, fin)
                if usage_in_stream:
                    yield chunk({}, with_usage=True)
                yield "data: [DONE]\n\n"
                metrics.requests.labels("chat", "200").inc()
            finally:  # also when the client disconnects: its row is freed in the engine
                job.cancelled = True
                done()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return app
