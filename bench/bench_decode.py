"""Decode speed: transformers' LlavaForConditionalGeneration.generate vs modalign's Engine on the
same tiny random LLaVA checkpoint, in one run. Prints tokens/s and the ratio.

    python bench/bench_decode.py [--new-tokens 128] [--threads 2] [--no-compile]

Decode tokens/s = new tokens / (time(N new tokens) - time(1 new token)), i.e. prefill excluded.
modalign runs twice: the eager engine and ``Engine(compile=True)`` (torch.compile'd decode
step; its one-off compile time per batch size is printed separately and not in the rate).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import transformers

from modalign import MLLM
from modalign.infer.engine import Engine, Prompt, SamplingParams

IMAGE = 500


def build(tmp: str):
    vc = transformers.CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=64, patch_size=16)  # fmt: skip
    tc = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)  # fmt: skip
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE)
    torch.manual_seed(0)
    ref = transformers.LlavaForConditionalGeneration(cfg).eval()
    ref.save_pretrained(tmp)
    return ref, MLLM.from_pretrained(tmp).eval()


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled engine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours = build(tmp)
        n_img = ours.num_image_tokens()
        engines = {"eager": Engine(ours)}
        if not args.no_compile:
            engines["compiled"] = Engine(ours, compile=True)
        for batch in (1, 8):
            g = torch.Generator().manual_seed(batch)
            ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n_img), IMAGE),
                             torch.randint(3, 400, (batch, 20), generator=g)], 1)  # fmt: skip
            px = torch.randn(batch, 3, 64, 64, generator=g)
            mask = torch.ones_like(ids)

            def hf(n, ids=ids, px=px, mask=mask):
                with torch.inference_mode():
                    return ref.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=n,
                                        min_new_tokens=n, do_sample=False)  # fmt: skip

            def me(n, eng, ids=ids, px=px, batch=batch):
                prompts = [Prompt(ids[i].tolist(), [px[i]]) for i in range(batch)]
                return eng.generate(prompts, SamplingParams(max_new_tokens=n))

            n = args.new_tokens
            expected = hf(n)[:, ids.shape[1] :].tolist()
            t_hf = timed(lambda: hf(n)) - timed(lambda: hf(1))  # noqa: B023
            hf_tps = batch * (n - 1) / t_hf
            print(f"batch {batch}: transformers {hf_tps:8.1f} tok/s")
            for name, eng in engines.items():
                t0 = time.perf_counter()
                got = [r.token_ids for r in me(n, eng)]  # the first call compiles
                # leading greedy tokens equal to transformers' (min over rows): random weights have
                # near-ties that float rounding can flip late in a long generation
                same = min(
                    next((k for k, (a, b) in enumerate(zip(g, e, strict=False)) if a != b), n)
                    for g, e in zip(got, expected, strict=True)
                )
                warm = time.perf_counter() - t0
                t_me = timed(lambda: me(n, eng)) - timed(lambda: me(1, eng))  # noqa: B023
                me_tps = batch * (n - 1) / t_me
                print(f"batch {batch}: modalign {name:8s} {me_tps:8.1f} tok/s | ratio {me_tps / hf_tps:5.2f}x | "
                      f"same greedy tokens: {same}/{n} | first call {warm:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
