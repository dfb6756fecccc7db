"""A scripted OpenAI-compatible server on 127.0.0.1 for tests of clients (judge, synthesis):
replies come from a function of the request; it can answer 429s, stall past a timeout, and
count requests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


class FakeLLM:
    def __init__(self, reply, fail_first: int = 0, stall_on: set[int] | None = None, stall_s: float = 3.0):
        self.reply, self.fail_first, self.stall_on, self.stall_s = (
            reply,
            fail_first,
            stall_on or set(),
            stall_s,
        )
        self.requests, self.lock = [], threading.Lock()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with self.lock:
                n = len(self.requests)
                self.requests.append(body)
            if n < self.fail_first:
                return JSONResponse({"error": {"message": "slow down"}}, 429, headers={"retry-after": "0"})
            if n in self.stall_on:
                time.sleep(self.stall_s)
            text = self.reply(body)
            if isinstance(text, bytes):  # a raw body (a truncated or malformed one)
                return Response(text, 200, media_type="application/json")
            choice = {"index": 0, "finish_reason": "stop"}
            if isinstance(text, dict) and "finish_reason" in text:  # {"content", "finish_reason"}
                text = dict(text)
                choice["finish_reason"] = text.pop("finish_reason")
                text = text["content"]
            if isinstance(text, dict):  # a whole assistant message (e.g. with tool_calls)
                choice |= {"message": {"role": "assistant", **text},
                           "finish_reason": "tool_calls" if text.get("tool_calls") else "stop"}  # fmt: skip
                return {"id": f"x{n}", "object": "chat.completion", "model": body.get("model"), "choices": [choice],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}  # fmt: skip
            if isinstance(text, tuple):  # (text, [(token, logprob), ...]): with log-probabilities
                text, lps = text
                choice["logprobs"] = {"content": [{"token": t, "logprob": lp} for t, lp in lps]}
            choice["message"] = {"role": "assistant", "content": text}
            return {"id": f"x{n}", "object": "chat.completion", "model": body.get("model"), "choices": [choice],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}  # fmt: skip

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=5)
