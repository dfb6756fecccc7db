"""A small client for any OpenAI-compatible chat endpoint (hosted, vLLM, or ``modalign serve``):
per-request timeout, retries with exponential backoff on 429 / 5xx / timeouts / connection
errors, token usage accounting. Used by the LLM judge and by data synthesis."""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field

import httpx


class LLMError(RuntimeError):
    pass


@dataclass
class Usage:
    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_reasons: dict = field(default_factory=dict)

    def add_retry(self, why: str) -> None:
        self.retries += 1
        self.retry_reasons[why] = self.retry_reasons.get(why, 0) + 1


@dataclass
class LLMClient:
    endpoint: str  # base URL, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    usage: Usage = field(default_factory=Usage)

    @classmethod
    def from_env(cls, endpoint: str, model: str, api_key_env: str | None, **kw) -> LLMClient:
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if key is None:
                raise ValueError(f"environment variable {api_key_env} (the API key) is not set")
        return cls(endpoint.rstrip("/"), model, key, **kw)

    def _url(self) -> str:
        return self.endpoint + (
            "/chat/completions" if not self.endpoint.endswith("/chat/completions") else ""
        )

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_backoff_s)
            except ValueError:
                pass
        return min(self.backoff_s * 2**attempt, self.max_backoff_s) * (0.5 + random.random() / 2)

    def _payload(self, messages, temperature, max_tokens, extra=None) -> dict:
        return {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            **(extra or {}),
        }

    def _handle(self, r: httpx.Response, raw: bool = False):
        doc = r.json()  # a body that is no JSON object: ``_outcome`` retries it
        if not isinstance(doc, dict):
            raise ValueError(f"a JSON {type(doc).__name__}, not an object")
        u = doc.get("usage") or {}
        self.usage.prompt_tokens += int(u.get("prompt_tokens", 0) or 0)
        self.usage.completion_tokens += int(u.get("completion_tokens", 0) or 0)
        try:
            text = doc["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"malformed response from {self._url()}: {str(doc)[:200]}") from None
        return doc if raw else text

    def _outcome(
        self, attempt: int, r: httpx.Response | None = None, exc: Exception | None = None, raw=False
    ):
        """(text, 0, "") on success; (None, delay, why) when the attempt should be retried."""
        if exc is not None:
            self.usage.add_retry("timeout" if isinstance(exc, httpx.TimeoutException) else "connection")
            return None, self._delay(attempt, None), type(exc).__name__
        if r.status_code == 429 or r.status_code >= 500:
            self.usage.add_retry(str(r.status_code))
            return None, self._delay(attempt, r.headers.get("retry-after")), f"HTTP {r.status_code}"
        if r.status_code != 200:
            self.usage.failures += 1
            raise LLMError(f"{self._url()} answered {r.status_code}: {r.text[:200]}")
        try:
            return self._handle(r, raw), 0.0, ""
        except ValueError as e:  # a body cut short (or no JSON object): as a failed attempt
            self.usage.add_retry("malformed body")
            return None, self._delay(attempt, None), f"malformed body ({e})"

    def _give_up(self, last: str) -> LLMError:
        self.usage.failures += 1
        return LLMError(f"{self._url()}: gave up after {self.max_retries + 1} attempts (last: {last})")

    def chat(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 512, extra: dict | None = None,
             raw: bool = False):  # fmt: skip
        """One completion's text (``raw``: the whole response document; ``extra``: more request
        fields, e.g. ``stop``, ``logprobs``); retries transient failures; raises ``LLMError`` when
        out of retries."""
        last = ""
        with httpx.Client(timeout=self.timeout_s) as client:
            for attempt in range(self.max_retries + 1):
                self.usage.requests += 1
                try:
                    r = client.post(self._url(), json=self._payload(messages, temperature, max_tokens, extra),
                                    headers=self._headers())  # fmt: skip
                    text, delay, last = self._outcome(attempt, r=r, raw=raw)
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    text, delay, last = self._outcome(attempt, exc=e)
                if text is not None:
                    return text
                if attempt < self.max_retries:  # no wait after the last attempt
                    time.sleep(delay)
        raise self._give_up(last)

    async def achat(self, client: httpx.AsyncClient, messages: list[dict], temperature: float = 0.0,
                    max_tokens: int = 512, raw: bool = False):  # fmt: skip
        """The async twin of ``chat`` (bounded concurrency is the caller's semaphore)."""
        last = ""
        for attempt in range(self.max_retries + 1):
            self.usage.requests += 1
            try:
                r = await client.post(self._url(), json=self._payload(messages, temperature, max_tokens),
                                      headers=self._headers(), timeout=self.timeout_s)  # fmt: skip
                text, delay, last = self._outcome(attempt, r=r, raw=raw)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                text, delay, last = self._outcome(attempt, exc=e)
            if text is not None:
                return text
            if attempt < self.max_retries:
                await asyncio.sleep(delay)
        raise self._give_up(last)
