"""A multi-turn chat about one picture: transformers' LlavaForConditionalGeneration.generate vs
modalign's Engine without and with its prefix cache, on the same random LLaVA checkpoint
(``bench_decode.py``'s sizes), in one run. Each turn's prompt is the last prompt, the reply and a
new message, so every turn re-reads the picture and the whole history unless something keeps it.

    python bench/bench_chat.py [--size tiny|mid] [--turns 6] [--reply 16] [--threads 2] [--json]

Prints per turn the prompt's length, the time to the first token (TTFT) and to the whole reply
for each engine, and the ratios; then the means over the turns after the first and the whole
chat's time. Both modalign engines keep visual tokens of pictures seen (the image cache, on by
default). Greedy replies: the three engines' tokens are compared (all equal on ``tiny``; on
random ``mid`` weights near-ties may part them, which the output says).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from modalign.infer.engine import Engine, Prompt, SamplingParams

try:
    from bench_decode import IMAGE, build
except ImportError:  # run as a module
    from bench.bench_decode import IMAGE, build


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="mid", choices=["tiny", "mid"])
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--reply", type=int, default=16, help="tokens per reply")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ref, model = build(tmp, args.size)
    n_img = model.num_image_tokens()
    s = model.config.vision.image_size
    px = torch.randn(3, s, s, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    vocab = model.config.llm.vocab_size

    def words(n):  # text ids: never the image placeholder
        return [
            t if t != IMAGE else t + 1
            for t in torch.randint(10, min(vocab, 4000), (n,), generator=g).tolist()
        ]

    # both with the image cache (the default): the picture's visual tokens are not made again
    engines = {"modalign": Engine(model), "modalign+prefix": Engine(model, prefix_cache_mb=1024)}
    ids = [1] + [IMAGE] * n_img + words(30)
    rows, replies = [], {}
    params = SamplingParams(max_new_tokens=args.reply)
    for turn in range(args.turns):
        row = {"turn": turn + 1, "prompt_tokens": len(ids)}
        t = torch.tensor([ids])
        with torch.inference_mode():
            t0 = time.perf_counter()
            ref.generate(input_ids=t, pixel_values=px[None], max_new_tokens=1, do_sample=False)
            row["transformers_ttft"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = ref.generate(input_ids=t, pixel_values=px[None], max_new_tokens=args.reply, min_new_tokens=args.reply,
                               do_sample=False)  # fmt: skip
            row["transformers_turn"] = time.perf_counter() - t0
        replies.setdefault("transformers", []).append(out[0, len(ids) :].tolist())
        for name, eng in engines.items():
            toks, first = [], None
            t0 = time.perf_counter()
            for step in eng.stream([Prompt(ids, [px])], params):
                first = first or time.perf_counter()
                toks.append(step[0])
            row[f"{name}_turn"] = time.perf_counter() - t0
            row[f"{name}_ttft"] = first - t0
            replies.setdefault(name, []).append(toks)
        reply = replies["modalign"][-1]
        ids = ids + reply + words(20)
        rows.append(row)
        print(
            f"turn {row['turn']}: {row['prompt_tokens']} prompt tokens; TTFT transformers {row['transformers_ttft'] * 1e3:.0f} ms, "
            f"modalign {row['modalign_ttft'] * 1e3:.0f} ms, with the prefix cache {row['modalign+prefix_ttft'] * 1e3:.0f} ms "
            f"({row['transformers_ttft'] / row['modalign+prefix_ttft']:.1f}x transformers, "
            f"{row['modalign_ttft'] / row['modalign+prefix_ttft']:.1f}x without the cache); whole reply "
            f"{row['transformers_turn'] * 1e3:.0f} / {row['modalign_turn'] * 1e3:.0f} / {row['modalign+prefix_turn'] * 1e3:.0f} ms",
            flush=True,
        )
    later = rows[1:]
    summary = {
        "size": args.size,
        "turns": args.turns,
        "reply_tokens": args.reply,
        "threads": args.threads,
        "rows": rows,
        "same_tokens": {k: v == replies["modalign"] for k, v in replies.items()},
        "reused_tokens": engines["modalign+prefix"].prefix.hit_tokens,
    }
    for name in ("transformers", "modalign", "modalign+prefix"):
        summary[f"{name}_ttft_later_mean"] = (
            statistics.mean(r[f"{name}_ttft"] for r in later) if later else None
        )
        summary[f"{name}_chat"] = sum(r[f"{name}_turn"] for r in rows)
    if later:
        m = summary
        print(f"turns 2-{args.turns}, mean TTFT: transformers {m['transformers_ttft_later_mean'] * 1e3:.0f} ms, modalign "
              f"{m['modalign_ttft_later_mean'] * 1e3:.0f} ms, with the prefix cache {m['modalign+prefix_ttft_later_mean'] * 1e3:.0f} ms: "
              f"{m['transformers_ttft_later_mean'] / m['modalign+prefix_ttft_later_mean']:.1f}x transformers, "
              f"{m['modalign_ttft_later_mean'] / m['modalign+prefix_ttft_later_mean']:.1f}x without the cache")  # fmt: skip
    print(f"the whole chat: transformers {summary['transformers_chat']:.2f} s, modalign {summary['modalign_chat']:.2f} s, "
          f"with the prefix cache {summary['modalign+prefix_chat']:.2f} s "
          f"({summary['transformers_chat'] / summary['modalign+prefix_chat']:.2f}x transformers); "
          f"{summary['reused_tokens']} prompt tokens reused; same greedy tokens as modalign without the cache: "
          f"{summary['same_tokens']}")  # fmt: skip
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
