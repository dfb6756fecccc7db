"""What stands between the network and the app: one ASGI middleware and the HTTP protocol.

``Guard`` (ASGI middleware), before any route runs:
- ``Host`` must be on the allow list when the server has no API key (a browser page on another
  site cannot reach a loopback server through DNS rebinding);
- ``Authorization: Bearer KEY`` on ``/v1/*`` and ``/metrics`` when a key is set, compared in
  constant time;
- request bodies: ``application/json`` only on the API, the size limit enforced while reading
  (chunked bodies too), and a deadline for the whole body;
- every response is counted in ``/metrics`` by route template and status (never the raw path).

``GuardedH11`` (uvicorn's h11 protocol): a connection that has not sent a complete request head
within ``header_timeout`` seconds (a new connection, or an idle kept-alive one) is closed; one
whose client stops reading (the response's bytes wait in a full write buffer for
``write_timeout`` seconds) is aborted, so it neither holds a connection slot nor its generation;
one that sends more than ``max_pipelined`` bytes ahead of its response is aborted too.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from uvicorn.protocols.http.h11_impl import H11Protocol

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("modalign_requests", "HTTP responses by route and status", ["endpoint", "status"],
                                registry=self.registry)  # fmt: skip
        self.latency = Histogram("modalign_request_seconds", "chat completion latency", ["endpoint"],
                                 registry=self.registry)  # fmt: skip
        self.tokens = Counter("modalign_tokens", "tokens processed", ["kind"], registry=self.registry)
        self.in_flight = Gauge(
            "modalign_in_flight", "chat completions being generated", registry=self.registry
        )
        self.stream_errors = Counter("modalign_stream_errors", "streams ended by an error event", ["code"],
                                     registry=self.registry)  # fmt: skip

    def watch_image_cache(self, cache) -> None:
        """Report an engine's ``ImageCache`` (lookups by result, entries, bytes) at each scrape."""
        if cache is not None:
            self.registry.register(_CacheCollector(cache, "image_cache", "visual-token cache", lambda c: [
                GaugeMetricFamily("modalign_image_cache_entries", "images whose visual tokens are cached", len(c)),
                GaugeMetricFamily("modalign_image_cache_bytes", "bytes of cached visual tokens", c.bytes)]))  # fmt: skip

    def watch_prefix_cache(self, cache) -> None:
        """Report an engine's ``PrefixCache`` (lookups by result, tokens reused, bytes) at each scrape."""
        if cache is not None:
            self.registry.register(_CacheCollector(cache, "prefix_cache", "prompt-prefix cache", lambda c: [
                CounterMetricFamily("modalign_prefix_cache_reused_tokens", "prompt tokens not prefilled (reused)",
                                    c.hit_tokens),
                GaugeMetricFamily("modalign_prefix_cache_bytes", "bytes of cached keys and values", c.bytes)]))  # fmt: skip


class _CacheCollector:
    """A cache's lookups by result (its ``hits`` and ``misses``), then the figures ``extra(cache)``
    makes, read at each scrape."""

    def __init__(self, cache, name: str, what: str, extra):
        self.cache, self.name, self.what, self.extra = cache, name, what, extra

    def collect(self):
        c = self.cache
        lookups = CounterMetricFamily(f"modalign_{self.name}_lookups", f"{self.what} lookups by result",
                                      labels=["result"])  # fmt: skip
        lookups.add_metric(["hit"], c.hits)
        lookups.add_metric(["miss"], c.misses)
        yield lookups
        yield from self.extra(c)


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


def error_body(status: int, message: str, param=None, code=None) -> bytes:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 408: "timeout",
            413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
            503: "server_error", 504: "timeout"}.get(status, "invalid_request_error" if status < 500 else "server_error")  # fmt: skip
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def _host_name(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1 : value.find("]")] if "]" in value else None
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    def __init__(self, app, cfg, metrics: Metrics):
        self.app, self.cfg, self.metrics = app, cfg, metrics
        self.hosts = {h.lower() for h in (*LOCAL_HOSTS, *cfg.allowed_hosts)}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        label = route_label(scope["path"])

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(label, str(message["status"])).inc()
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._check(scope, headers)
        if refusal is not None:
            return await _respond(counted, *refusal)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, refusal = await self._read_body(receive, headers)
            if refusal is not None:
                return await _respond(counted, *refusal)
            receive = _replay(body, receive)
        await self.app(scope, receive, counted)

    def _check(self, scope, headers) -> tuple | None:
        cfg, path = self.cfg, scope["path"]
        if (
            cfg.api_key is None
            and "*" not in self.hosts
            and _host_name(headers.get("host")) not in self.hosts
        ):
            return (
                403,
                "this server answers only to its allowed host names (--allowed-host)",
                None,
                "host_not_allowed",
            )
        if cfg.api_key and (path.startswith("/v1/") or path == "/metrics"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                return 401, "invalid or missing API key", None, "invalid_api_key"
        if scope["method"] == "POST" and path.startswith("/v1/"):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return (
                    415,
                    f"the body must be application/json, not {ctype or 'untyped'}",
                    None,
                    "unsupported_media_type",
                )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            return 413, f"request body over {cfg.max_body_bytes} bytes", None, "request_too_large"
        return None

    async def _read_body(self, receive, headers) -> tuple[bytes, tuple | None]:
        """The whole body, read under the size limit and the body deadline."""
        limit, body = self.cfg.max_body_bytes, bytearray()
        deadline = time.monotonic() + self.cfg.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                return b"", (408, f"the request body did not arrive within {self.cfg.body_timeout_s:g} s", None,
                             "request_timeout")  # fmt: skip
            if message["type"] == "http.disconnect":
                return b"", (400, "the client went away", None, "client_disconnected")
            body += message.get("body", b"")
            if len(body) > limit:
                return b"", (413, f"request body over {limit} bytes", None, "request_too_large")
            if not message.get("more_body"):
                return bytes(body), None


async def _respond(send, status: int, message: str, param=None, code=None) -> None:
    body = error_body(status, message, param, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive):
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the connection's own events (a disconnect)

    return again


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections that do not send a request head in time and
    aborting those that stop reading what they are sent."""

    header_timeout = 10.0
    write_timeout = 60.0
    max_pipelined = 21 << 20  # bytes a client may send ahead of its response (a next request)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # bytes sent after a complete request wait in h11's buffer until its response is done; a
        # client that keeps sending (read while the server checks for a disconnect) is cut off
        if len(self.conn.trailing_data[0]) > self.max_pipelined:
            self.transport.abort()

    def pause_writing(self) -> None:  # the transport's buffer is full: the client is not reading
        super().pause_writing()
        self._stop("_write_timer")
        self._write_timer = self.loop.call_later(self.write_timeout, self._write_expired)

    def resume_writing(self) -> None:
        self._stop("_write_timer")
        super().resume_writing()

    def _write_expired(self) -> None:
        self.transport.abort()  # close() would wait for the buffer to drain, which never happens

    def _stop(self, name: str) -> None:
        timer = getattr(self, name, None)
        if timer is not None:
            timer.cancel()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired, self.cycle)

    def _head_expired(self, cycle) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no new request began since
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._stop("_head_timer")
        self._stop("_write_timer")
        super().connection_lost(exc)
