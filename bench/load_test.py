"""Load test of ``modalign serve`` on loopback: N concurrent clients for S seconds, in rounds, against
one client at a time, on the same model. Clients share a few prompts and images and mix streaming
with non-streaming requests. Prints requests, failures, throughput, latency percentiles, and the
server's resident memory after each round (the server runs in its own process).

    python bench/load_test.py [--clients 64] [--seconds 20] [--rounds 2] [--single-seconds 20]
                              [--model DIR] [--engine eager|compiled|both] [--prefix-cache-mb MB] [--json]

``--engine``: the server's decode step, eager (``serve``'s default) or compiled (``--compile``);
``both`` runs the whole test against each, one server after the other, and prints the ratios.
``--prefix-cache-mb``: the server's prefix cache (``serve``'s default without it; 0: off). The
clients repeat a few prompts, so with the cache most of each prompt is reused.

Without ``--model`` a tiny random model (the quickstart's shape) is written to a temporary folder.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

KEY = "sk-load"
PROMPTS = ["what colour is the shape?", "how many shapes are there?", "is there a red circle?", "describe it"]


def tiny_model(path: Path) -> Path:
    import torch
    from PIL import Image  # noqa: F401

    from modalign import MLLM, MLLMConfig
    from modalign.data.tokenizer import Tokenizer

    torch.manual_seed(0)
    MLLM(MLLMConfig.from_name("tiny-shapes")).save_pretrained(path)
    tok = Tokenizer.train_bpe([" ".join(PROMPTS) + " red blue green yes no"] * 50, vocab_size=300)
    tok.template_name = "chatml"
    tok.save(path)
    return path


def images() -> list[str]:
    from PIL import Image

    out = []
    for colour in ((200, 30, 30), (30, 30, 200)):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), colour).save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def start_server(
    model: Path, tmp: Path, max_batch: int, compile: bool = False, prefix_cache_mb: float | None = None
) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp / "key").write_text(KEY)
    cmd = [sys.executable, "-m", "modalign.cli", "serve", "--model", str(model), "--port", str(port),
           "--api-key-file", str(tmp / "key"), "--max-batch", str(max_batch),
           *(["--compile"] if compile else []),
           *(["--prefix-cache-mb", str(prefix_cache_mb)] if prefix_cache_mb is not None else [])]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):  # a compiled server compiles its decode step before it listens
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
    raise RuntimeError("the server did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_request(c: httpx.Client, url: str, rng: random.Random, imgs: list[str]) -> tuple[bool, int, str]:
    """(succeeded, completion tokens, what went wrong)."""
    content = [{"type": "text", "text": rng.choice(PROMPTS)}]
    if rng.random() < 0.5:
        content.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(imgs)}})
    stream = rng.random() < 0.5
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": rng.choice([4, 16, 32]),
            "temperature": rng.choice([0, 0.7]), "stream": stream, "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    if not stream:
        r = c.post(url + "/v1/chat/completions", json=body, headers=headers)
        if r.status_code != 200:
            return False, 0, f"{r.status_code} {r.text[:200]}"
        return True, r.json()["usage"]["completion_tokens"], ""
    with c.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    if r.status_code != 200 or not lines or lines[-1] != "data: [DONE]" or any('"error"' in x for x in lines):
        return False, 0, f"{r.status_code} stream ended with {lines[-2:] if lines else 'nothing'}"
    usage = [json.loads(x[6:]) for x in lines[:-1] if '"usage"' in x]
    return True, usage[-1]["usage"]["completion_tokens"] if usage else 0, ""


def hammer(url: str, clients: int, seconds: float, imgs: list[str]) -> dict:
    stop = time.monotonic() + seconds
    lat, tokens, errors = [], [0], []
    lock = threading.Lock()

    def worker(i):
        rng = random.Random(i)
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < stop:
                t = time.monotonic()
                try:
                    ok, n, why = one_request(c, url, rng, imgs)
                except httpx.HTTPError as e:
                    ok, n, why = False, 0, f"{type(e).__name__}: {e}"
                with lock:
                    if ok:
                        lat.append(time.monotonic() - t)
                        tokens[0] += n
                    else:
                        errors.append(why)

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(worker, range(clients)))
    dt = time.monotonic() - t0
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
    return {"clients": clients, "requests": len(lat), "failed": len(errors), "errors": errors[:5],
            "req_s": len(lat) / dt, "tok_s": tokens[0] / dt, "p50_s": q[49], "p99_s": q[98]}  # fmt: skip


def run(model: Path, tmp: Path, args, compile: bool) -> dict:
    t0 = time.monotonic()
    proc, url = start_server(model, tmp, args.max_batch, compile, args.prefix_cache_mb)
    started = time.monotonic() - t0
    try:
        imgs = images()
        single = hammer(url, 1, args.single_seconds, imgs) if args.single_seconds else None
        rounds = []
        for _ in range(args.rounds):
            r = hammer(url, args.clients, args.seconds, imgs)
            time.sleep(1.0)  # the worker goes idle (and hands freed memory back)
            health = httpx.get(url + "/health", timeout=10).json()
            metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
            in_flight = next(
                float(x.split()[1]) for x in metrics.splitlines() if x.startswith("modalign_in_flight ")
            )
            r |= {"rss_mb": rss_mb(proc.pid), "running_after": health["running"], "pending_after": health["pending"],
                  "in_flight_after": in_flight}  # fmt: skip
            rounds.append(r)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"engine": "compiled" if compile else "eager", "start_s": started, "single": single, "rounds": rounds,
            "ratio": rounds[-1]["req_s"] / single["req_s"] if single and single["req_s"] else None}  # fmt: skip


def report(out: dict, clients: int) -> None:
    print(f"{out['engine']} decode step (server ready in {out['start_s']:.1f} s):")
    for r in ([out["single"]] if out["single"] else []) + out["rounds"]:
        extra = f", server RSS {r['rss_mb']:.0f} MB" if "rss_mb" in r else ""
        print(f"  {r['clients']:>3} client(s): {r['requests']} requests, {r['failed']} failed, {r['req_s']:.1f} req/s, "
              f"{r['tok_s']:.0f} completion tok/s, p50 {r['p50_s'] * 1000:.0f} ms, p99 {r['p99_s'] * 1000:.0f} ms{extra}")  # fmt: skip
    if out["ratio"]:
        print(f"  throughput: {clients} clients {out['ratio']:.2f}x one client (requests per second)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the concurrent load (memory after each)")
    ap.add_argument("--single-seconds", type=float, default=20, help="one client at a time (0: skip)")
    ap.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    ap.add_argument("--model", default=None, help="model directory (default: a tiny random model)")
    ap.add_argument("--engine", choices=["eager", "compiled", "both"], default="eager",
                    help="the server's decode step (both: one server each, then the ratios)")  # fmt: skip
    ap.add_argument("--prefix-cache-mb", type=float, default=None,
                    help="the server's --prefix-cache-mb (default: the server's default; 0: off)")  # fmt: skip
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    engines = {"compiled": [True], "eager": [False], "both": [False, True]}[args.engine]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else tiny_model(tmp / "model")
        runs = [run(model, tmp, args, c) for c in engines]
    out = runs[0] if len(runs) == 1 else {"runs": runs}
    if len(runs) == 2:
        e, c = runs
        out["compiled_vs_eager"] = {
            "single": c["single"]["req_s"] / e["single"]["req_s"] if c["single"] and e["single"] else None,
            "concurrent": c["rounds"][-1]["req_s"] / e["rounds"][-1]["req_s"],
            "p99": c["rounds"][-1]["p99_s"] / e["rounds"][-1]["p99_s"],
        }
    if args.json:
        print(json.dumps(out))
        return out
    for r in runs:
        report(r, args.clients)
    if len(runs) == 2:
        v = out["compiled_vs_eager"]
        single = f"one client {v['single']:.2f}x, " if v["single"] else ""
        print(f"compiled against eager: {single}{args.clients} clients {v['concurrent']:.2f}x requests per second, "
              f"p99 latency {v['p99']:.2f}x")  # fmt: skip
    return out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
