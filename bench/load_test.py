"""Bounded load test of ``modalign serve`` on loopback: N concurrent clients for S seconds vs one
client at a time, same tiny model. Prints requests, failures and throughput.

    python bench/load_test.py [--clients 32] [--seconds 20]
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
import uvicorn

from modalign import MLLM, MLLMConfig
from modalign.data.tokenizer import Tokenizer
from modalign.infer.chat import ChatModel
from modalign.serve.app import ServeConfig, create_app


def serve():
    torch.manual_seed(0)
    model = MLLM(MLLMConfig.from_name("tiny-shapes")).eval()
    tok = Tokenizer.train_bpe(
        ["what colour is the shape in the picture red blue green yes no"] * 50, vocab_size=300
    )
    tok.template_name = "chatml"
    app = create_app(ChatModel(model, tok), ServeConfig(model_name="tiny", max_batch=32))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", app, server


def hammer(url: str, clients: int, seconds: float) -> dict:
    stop = time.monotonic() + seconds
    ok = failed = tokens = 0
    lock = threading.Lock()

    def worker(i):
        nonlocal ok, failed, tokens
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < stop:
                r = c.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": f"colour {i}?"}],
                                                               "max_tokens": 16, "temperature": 0})  # fmt: skip
                with lock:
                    if r.status_code == 200:
                        ok += 1
                        tokens += r.json()["usage"]["completion_tokens"]
                    else:
                        failed += 1

    t = time.monotonic()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(worker, range(clients)))
    dt = time.monotonic() - t
    return {"clients": clients, "requests": ok, "failed": failed, "req_s": ok / dt, "tok_s": tokens / dt}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    url, app, server = serve()
    one = hammer(url, 1, args.seconds)
    many = hammer(url, args.clients, args.seconds)
    for r in (one, many):
        print(f"{r['clients']:>3} client(s): {r['requests']} requests, {r['failed']} failed, "
              f"{r['req_s']:.1f} req/s, {r['tok_s']:.0f} completion tok/s")  # fmt: skip
    print(
        f"throughput ratio {many['req_s'] / one['req_s']:.2f}x; engine batches: {app.state.batcher.batches}"
    )
    server.should_exit = True


if __name__ == "__main__":
    main()
