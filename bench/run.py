"""Every benchmark in one command: decode (tiny and mid-size model, against the memory-bandwidth
roofline), a multi-turn chat about a picture (the prefix cache), training throughput and the
server under load, each against transformers (or one client) in one run. Prints the figures and writes them, with the machine's CPU model and flags,
into ``docs/benchmarks.md`` (between the "bench/run.py" markers; the rest of the file is kept).

    python bench/run.py [--threads 2] [--quick] [--no-write]

``--quick``: fewer tokens, steps and seconds (a smoke run; its figures are noisier).
The benchmarks run one after another in their own processes, never side by side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench/run.py: begin -->", "<!-- bench/run.py: end -->"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")


def machine() -> dict:
    cpu, flags = platform.processor() or "unknown", set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.+)", info).group(1).strip()
        flags = set(re.search(r"flags\s*:\s*(.+)", info).group(1).split())
    except (OSError, AttributeError):
        pass
    return {"cpu": cpu, "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip


def run(args: list[str], threads: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    print("$ python", " ".join(args), flush=True)
    p = subprocess.run(
        [sys.executable, *args], cwd=HERE, env=env, capture_output=True, text=True, check=False
    )
    if p.returncode:
        raise SystemExit(f"{args[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    lines = [x for x in p.stdout.splitlines() if x.strip()]
    for x in lines:
        if not x.startswith("{"):
            print("  " + x)
    return p.stdout


def last_json(text: str) -> dict:
    return json.loads(next(x for x in reversed(text.splitlines()) if x.startswith("{")))


def decode_rows(d: dict) -> list[str]:
    rows = []
    for b, r in d["batches"].items():
        for eng in ("eager", "compiled"):
            if eng in r:
                e = r[eng]
                rows.append(f"| {d['size']} | {b} | {r['roofline_tps']:,.0f} ({r['step_mb']:.0f} MB at "
                            f"{r['read_gbs']:.0f} GB/s) | {r['transformers_tps']:,.1f} "
                            f"({r['transformers_tps'] / r['roofline_tps']:.0%}) | {eng} {e['tps']:,.1f} "
                            f"({e['roofline_share']:.0%}) | {e['ratio']:.2f}x | {e['same_greedy']}/{d['new_tokens']} |")  # fmt: skip
    return rows


def quant_rows(d: dict) -> list[str]:
    rows = []
    for b, r in d["batches"].items():
        for name in ("int8", "int4"):
            q = r.get(name)
            if q is None:
                continue
            err = f"{q['max_logit_err']:.3f} (span {q['logit_range']:.1f})" if "max_logit_err" in q else "-"
            mem = f"{q['fp32_mb']:.0f} → {q['quant_mb']:.0f}" if "fp32_mb" in q else "-"
            pre = (f"{q['fp32_prefill_s'] * 1e3:.0f} → {q['prefill_s'] * 1e3:.0f} ms ({q['prefill_tokens']} tokens)"
                   if "prefill_s" in q else "-")  # fmt: skip
            rows.append(f"| {d['size']} | {b} | {name} | {r['eager']['tps']:,.1f} | {q['tps']:,.1f} | {q['vs_fp32']:.2f}x | "
                        f"{q['ratio']:.2f}x | {q['same_as_fp32']}/{d['new_tokens']}, {q['agree_fp32']:.0%} | {err} | {mem} | {pre} |")  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    t = str(args.threads)
    m = machine()
    print(f"{m['cpu']} | {m['cores']} cores, {args.threads} threads | flags {' '.join(m['flags']) or '-'} | "
          f"torch {m['torch']}")  # fmt: skip
    tokens = "32" if args.quick else "128"
    decode = [last_json(run(["bench_decode.py", "--size", s, "--new-tokens", tokens, "--threads", t, "--json"],
                            args.threads)) for s in ("tiny", "mid")]  # fmt: skip
    chat = last_json(run(["bench_chat.py", "--size", "mid", "--turns", "3" if args.quick else "6", "--threads", t,
                          "--json"], args.threads))  # fmt: skip
    quick = ["--steps", "5", "--rounds", "1"] if args.quick else []
    train = {size: run(["bench_train.py", "--size", size, "--threads", t, *extra, *quick], args.threads)
             for size, extra in (("tiny", []), ("mid", ["--batch", "4", "--text", "180", "--steps", "10"]))}  # fmt: skip
    train["tiny LoRA"] = run(["bench_train.py", "--size", "tiny", "--threads", t, "--precision", "fp32", "--lora", "16",
                              *quick], args.threads)  # fmt: skip
    secs = "5" if args.quick else "20"
    load = last_json(run(["load_test.py", "--seconds", secs, "--single-seconds", secs, "--rounds", "1",
                          "--engine", "both", "--json"], args.threads))  # fmt: skip
    bw = decode[1]["bandwidth"]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [BEGIN, "", f"## Latest `python bench/run.py`{' --quick' if args.quick else ''}", "",
             f"{when}; {m['cpu']}, {m['cores']} cores, {args.threads} threads; CPU flags: "
             f"{', '.join(m['flags']) or 'none of ' + ', '.join(FLAGS)}; torch {m['torch']}, Python {m['python']}.",
             f"Memory bandwidth probe: {bw['sum_gbs']:.1f} GB/s summing 512 MiB, {bw['matvec_gbs']:.1f} GB/s in a "
             "32000 x 512 fp32 matrix-vector product.", "",
             "Decode (greedy, fp32). The roofline is the bytes a step reads (the LLM's weights but the input "
             "embedding, plus the KV cache) over the rate at which this machine reads that many bytes (a "
             "tensor of the same size summed): a model that fits the CPU's caches is bounded by their speed.",
             "",
             "| model | batch | roofline tok/s | transformers tok/s (of roofline) | modalign tok/s (of roofline) | "
             "ratio | same greedy tokens |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in decode:
        lines += decode_rows(d)
    lines += ["", "How the decode step multiplies each fp32 matrix here, as timed on this machine (once, then saved: `MODALIGN_DECODE_FORMS`) (with 1 row / with "
              "8 rows / with 8 rows where no packed copies are made; `linear`: `x @ W.T`, `tall`: `(W @ x.T).T`, "
              "`packed`: MKL's GEMM on a copy packed for 8 rows, `onednn`: oneDNN's product on its packed copy, "
              "`onednn-any`: the same for any step of more than 4 rows, where it also won with 32): "
              + "; ".join(f"{d['size']} " + ", ".join(f"{k} {'/'.join(v)}" for k, v in d.get("forms", {}).items())
                          + f" (packed copies {d.get('packed_mb', 0):.0f} MB)" for d in decode) + "."]  # fmt: skip
    lines += ["", "Quantized decode (`--quantize int8` / `int4`) against modalign's fp32 eager decode on the same model: greedy "
              "tokens equal to fp32's (leading, then the share of positions), the largest logit difference "
              "over fp32's greedy sequence fed to both (batch 1, prefill included), the LLM's matrices held in MB "
              "(fp32: the model's and the decode plan's copies; quantized: one copy, replacing them) and the "
              "prefill's time (batch 1).", "",
              "| model | batch | scheme | fp32 tok/s | quantized tok/s | quantized / fp32 | quantized / transformers | "
              "same greedy tokens | max logit difference | matrices MB | prefill fp32 → quantized |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in decode:
        lines += quant_rows(d)
    c = chat
    lines += ["", f"A chat of {c['turns']} turns about one picture ({c['size']} model, {c['reply_tokens']}-token greedy "
              "replies; each prompt is the last one, its reply and a new message; `bench/bench_chat.py`): time to "
              "the first token from the second turn on, mean, transformers "
              f"{c['transformers_ttft_later_mean'] * 1e3:.0f} ms, modalign {c['modalign_ttft_later_mean'] * 1e3:.0f} ms, "
              f"with its prefix cache {c['modalign+prefix_ttft_later_mean'] * 1e3:.0f} ms "
              f"({c['transformers_ttft_later_mean'] / c['modalign+prefix_ttft_later_mean']:.1f}x transformers); the "
              f"whole chat {c['transformers_chat']:.2f} / {c['modalign_chat']:.2f} / {c['modalign+prefix_chat']:.2f} s; "
              f"same greedy tokens as modalign without the cache: "
              + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in c["same_tokens"].items()) + "."]  # fmt: skip
    lines += ["", "Training (forward + backward + AdamW; `bf16` is autocast on both sides; below each, the FLOPs a "
              "sample's step computes on each side, counted by torch's FLOP counter):", "", "```text",
              *[x for out in train.values() for x in out.splitlines() if x.startswith(("fp32", "bf16", "  a sample"))],
              "```", ""]  # fmt: skip
    lines += [
        "Server under load (tiny model), its decode step eager (the default) and compiled (`--compile`):",
        "",
    ]
    for one in load["runs"]:
        single, rnd = one["single"], one["rounds"][-1]
        lines += [f"- {one['engine']}: {rnd['clients']} mixed clients {rnd['req_s']:.1f} req/s against one client's "
                  f"{single['req_s']:.1f} ({one['ratio']:.2f}x); p50 {rnd['p50_s'] * 1000:.0f} ms, "
                  f"p99 {rnd['p99_s'] * 1000:.0f} ms; {rnd['failed']} failed; ready in {one['start_s']:.1f} s."]  # fmt: skip
    v = load["compiled_vs_eager"]
    lines += [f"- compiled against eager: one client {v['single']:.2f}x, {rnd['clients']} clients {v['concurrent']:.2f}x "
              f"requests per second, p99 latency {v['p99']:.2f}x.", "", END]  # fmt: skip
    block = "\n".join(lines)
    print(block)
    if args.no_write:
        return
    text = DOC.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        head, sep, rest = text.partition("\n## ")
        text = head.rstrip() + "\n\n" + block + "\n\n" + (sep.lstrip("\n") + rest if sep else "")
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
