"""Decode speed: transformers' LlavaForConditionalGeneration.generate vs modalign's Engine on the
same random LLaVA checkpoint, in one run. Prints tokens/s, the ratio and, per engine, the share of
the memory-bandwidth roofline: the bytes a decode step reads (every LLM weight but the input
embedding, plus the KV cache) over the rate at which this machine reads that many bytes (probed
by summing a tensor of the same size, so a model that fits the CPU's caches gets their speed).

    python bench/bench_decode.py [--size tiny|mid] [--new-tokens 128] [--threads 2] [--no-compile] [--json]

``tiny``: CLIP 2x128 at 64/16, Llama 4x256 (GQA 8/4), vocabulary 512. ``mid``: CLIP 4x256 at
224/16, Llama 6x512 (GQA 8/4, MLP 1376), vocabulary 32000.

Decode tokens/s = new tokens / (time(N new tokens) - time(1 new token)), i.e. prefill excluded.
modalign runs three times: the eager engine, ``Engine(compile=True)`` (torch.compile'd decode
step; its one-off compile time per batch size is printed separately and not in the rate) and
``Engine(quantize="int8")`` and ``Engine(quantize="int4")`` (``--no-int8`` / ``--no-int4`` skip
them). For each quantized engine it also prints, against modalign's
fp32 engine: the speed ratio, the greedy tokens that agree (leading tokens equal, and the share
of positions equal), the largest logit difference over the fp32 greedy sequence fed to both
(teacher-forced, batch 1, the prefill included), the prefill's time, and the bytes of the LLM's
matrices each holds. A quantized engine quantizes its own copy of the model in place.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
import transformers

from modalign import MLLM
from modalign.infer.engine import Engine, Prompt, SamplingParams
from modalign.infer.quant import linear_bytes

IMAGE = 500


SIZES = {
    "tiny": (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=16),
             dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=1024)),
    "mid": (dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224,
                 patch_size=16),
            dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=2048)),
}  # fmt: skip


def build(tmp: str, size: str = "tiny"):
    v, t = SIZES[size]
    vc = transformers.CLIPVisionConfig(**v)
    tc = transformers.LlamaConfig(**t)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE)
    torch.manual_seed(0)
    ref = transformers.LlavaForConditionalGeneration(cfg).eval()
    ref.save_pretrained(tmp)
    return ref, MLLM.from_pretrained(tmp).eval()


def read_gbs(nbytes: int, repeat: int = 10) -> float:
    """GB/s reading ``nbytes`` (summing an fp32 tensor of that size; best of ``repeat``)."""
    x = torch.ones(max(nbytes // 4, 1))
    x.sum()
    return x.numel() * 4 / timed(lambda: x.sum(), repeat) / 1e9


def bandwidth(threads: int, mib: int = 512, repeat: int = 5) -> dict:
    """Memory bandwidth (GB/s, best of ``repeat``): summing a ``mib`` MiB fp32 tensor (main
    memory), and the matrix-vector product of a 32000 x 512 fp32 matrix (an LM head's read)."""
    torch.set_num_threads(threads)
    w, v = torch.randn(32000, 512), torch.randn(512)
    w @ v  # warm
    t_mv = timed(lambda: w @ v, max(repeat, 20))
    return {"sum_gbs": read_gbs(mib * 2**20, repeat), "matvec_gbs": w.numel() * 4 / t_mv / 1e9}


def step_bytes(model: MLLM, context: int) -> int:
    """Bytes one decode step reads: the LLM's weights but the input embedding, and the KV cache."""
    llm = model.llm
    weights = sum(p.numel() * p.element_size() for n, p in llm.named_parameters() if "embed_tokens" not in n)
    c = model.config.llm
    kv_dim = (c.head_dim or c.hidden_size // c.num_heads) * c.num_kv_heads
    return weights + 2 * c.num_layers * kv_dim * context * 4


def _plan_bytes(plan, shared: set[int]) -> int:
    """Bytes of the decode plan's own matrices (q|k|v, o, gate|up and down of every layer, and
    the LM head) that are no views of ``shared`` storages, and of their packed copies, where a
    step with more rows made them (opaque MKL buffers of float32)."""
    own = sum(m.w.numel() * m.w.element_size() for m in plan.mats()
              if m.w.untyped_storage().data_ptr() not in shared)  # fmt: skip
    return own + sum(m.packed.numel() * 4 for m in plan.mats() if m.packed is not None)


def quant_report(fp32: Engine, quant: Engine, prompt: Prompt, tokens: list[int]) -> dict:
    """The largest logit difference between the fp32 and quantized engines over ``tokens`` (the
    fp32 greedy continuation of ``prompt``, fed to both: the prefill's logits, then each decode
    step's), the prefill's time in each, and the bytes of the LLM's matrices each holds (fp32:
    the model's and the decode plan's own copies, its fused q|k|v and gate|up and any packed
    copies; its other matrices are views of the model's; quantized: one copy, read by both)."""
    logits, prefill_s = [], []
    for eng in (fp32, quant):
        with torch.inference_mode():
            pre = eng.prefill([prompt], len(tokens) + 1)
            steps = [eng.fast.step(torch.tensor([[t]]), pre.cache) for t in tokens[:-1]]
            prefill_s.append(timed(lambda eng=eng: eng.prefill([prompt], 1), repeat=5))
        logits.append(torch.cat([pre.logits, *steps]))
    err = (logits[0] - logits[1]).abs()
    shared = {p.untyped_storage().data_ptr() for p in fp32.model.llm.parameters()}
    plan_mb = _plan_bytes(fp32.fast.plan, shared) / 1e6
    return {"max_logit_err": float(err.max()), "logit_range": float(logits[0].max() - logits[0].min()),
            "fp32_mb": linear_bytes(fp32.model.llm) / 1e6 + plan_mb, "quant_mb": linear_bytes(quant.model.llm) / 1e6,
            "prefill_tokens": len(prompt.input_ids), "fp32_prefill_s": prefill_s[0], "prefill_s": prefill_s[1]}  # fmt: skip


def leading_same(got: list[list[int]], ref: list[list[int]], n: int) -> int:
    """Leading tokens equal, the minimum over rows."""
    return min(
        next((k for k, (a, b) in enumerate(zip(g, e, strict=False)) if a != b), n)
        for g, e in zip(got, ref, strict=True)
    )


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def batch_sizes(text: str) -> list[int]:
    """``--batches``: positive batch sizes, comma-separated."""
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sizes


def main():
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled engine")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 engine")
    ap.add_argument("--no-int4", action="store_true", help="skip the int4 engine")
    ap.add_argument("--json", action="store_true", help="print one JSON document at the end")
    ap.add_argument(
        "--batches", type=batch_sizes, default="1,8", help="batch sizes, comma-separated (default 1,8)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = bandwidth(args.threads)
    print(f"bandwidth: {bw['sum_gbs']:.1f} GB/s (sum), {bw['matvec_gbs']:.1f} GB/s (32000x512 matrix-vector)")
    out = {
        "size": args.size,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "bandwidth": bw,
        "batches": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours = build(tmp, args.size)
        n_img = ours.num_image_tokens()
        side = SIZES[args.size][0]["image_size"]
        engines = {"eager": Engine(ours)}
        if not args.no_compile:
            engines["compiled"] = Engine(ours, compile=True)
        if not args.no_int8:  # quantized in place: on a copy of the model
            engines["int8"] = Engine(copy.deepcopy(ours), quantize="int8")
        if not args.no_int4:
            from modalign.infer.quant import int4_unavailable

            problem = int4_unavailable("cpu")
            if problem is None:
                engines["int4"] = Engine(copy.deepcopy(ours), quantize="int4")
            else:
                print(f"int4 skipped: {problem}")
        for batch in args.batches:
            g = torch.Generator().manual_seed(batch)
            ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n_img), IMAGE),
                             torch.randint(3, 400, (batch, 20), generator=g)], 1)  # fmt: skip
            px = torch.randn(batch, 3, side, side, generator=g)
            mask = torch.ones_like(ids)
            n = args.new_tokens
            # the roofline: the bytes a step reads at the mean context of the generation, at the rate
            # this machine reads that many bytes (a working set that fits the CPU's caches reads faster)
            nbytes = step_bytes(ours, ids.shape[1] + n // 2)
            rate = read_gbs(nbytes)
            roof = rate * 1e9 / nbytes * batch

            def hf(n, ids=ids, px=px, mask=mask):
                with torch.inference_mode():
                    return ref.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=n,
                                        min_new_tokens=n, do_sample=False)  # fmt: skip

            def me(n, eng, ids=ids, px=px, batch=batch):
                prompts = [Prompt(ids[i].tolist(), [px[i]]) for i in range(batch)]
                return eng.generate(prompts, SamplingParams(max_new_tokens=n))

            expected = hf(n)[:, ids.shape[1] :].tolist()
            t_hf = timed(lambda: hf(n)) - timed(lambda: hf(1))  # noqa: B023
            hf_tps = batch * (n - 1) / t_hf
            row = {
                "roofline_tps": roof,
                "step_mb": nbytes / 1e6,
                "read_gbs": rate,
                "transformers_tps": hf_tps,
            }
            print(f"batch {batch}: roofline {roof:8.1f} tok/s ({nbytes / 1e6:.1f} MB a step at {rate:.1f} GB/s) | "
                  f"transformers {hf_tps:8.1f} tok/s ({hf_tps / roof:.0%} of the roofline)")  # fmt: skip
            for name, eng in engines.items():
                t0 = time.perf_counter()
                got = [r.token_ids for r in me(n, eng)]  # the first call compiles
                # leading greedy tokens equal to transformers' (min over rows): random weights have
                # near-ties that float rounding can flip late in a long generation
                same = leading_same(got, expected, n)
                if name == "eager":
                    fp32_tokens = got
                warm = time.perf_counter() - t0
                t_me = timed(lambda: me(n, eng)) - timed(lambda: me(1, eng))  # noqa: B023
                me_tps = batch * (n - 1) / t_me
                row[name] = {"tps": me_tps, "ratio": me_tps / hf_tps, "roofline_share": me_tps / roof,
                             "same_greedy": same, "first_call_s": warm}  # fmt: skip
                print(f"batch {batch}: modalign {name:8s} {me_tps:8.1f} tok/s | ratio {me_tps / hf_tps:5.2f}x | "
                      f"{me_tps / roof:.0%} of the roofline | same greedy tokens: {same}/{n} | first call {warm:.1f} s")  # fmt: skip
                if name in ("int8", "int4"):
                    q = row[name]
                    q["vs_fp32"] = me_tps / row["eager"]["tps"]
                    q["same_as_fp32"] = leading_same(got, fp32_tokens, n)
                    q["agree_fp32"] = sum(a == b for g, e in zip(got, fp32_tokens, strict=True)
                                          for a, b in zip(g, e, strict=False)) / (batch * n)  # fmt: skip
                    if batch == 1:
                        q |= quant_report(
                            engines["eager"], eng, Prompt(ids[0].tolist(), [px[0]]), fp32_tokens[0]
                        )
                        print(f"{name}: max logit difference {q['max_logit_err']:.3f} (fp32 logits span "
                              f"{q['logit_range']:.1f}); LLM matrices held {q['fp32_mb']:.0f} MB fp32, "
                              f"{q['quant_mb']:.0f} MB {name}; prefill of {q['prefill_tokens']} tokens "
                              f"{q['fp32_prefill_s'] * 1e3:.0f} ms fp32, {q['prefill_s'] * 1e3:.0f} ms {name}")  # fmt: skip
                    print(f"batch {batch}: {name} {q['vs_fp32']:.2f}x fp32 | greedy tokens equal to fp32: leading "
                          f"{q['same_as_fp32']}/{n}, {q['agree_fp32']:.0%} of positions")  # fmt: skip
            out["batches"][str(batch)] = row
        # how this machine multiplies the fp32 matrices (timed when the first plan was built)
        from modalign.infer import fast_decode as fd

        plan = engines["eager"].fast.plan
        # _FORMS keys: (out, in, threads, bytes timed)
        out["forms"] = {f"{key[0]}x{key[1]}": list(f) for key, f in fd._FORMS.items()}
        out["packed_mb"] = sum(m.packed.numel() * 4 for m in plan.mats() if m.packed is not None) / 1e6
        print("decode forms (1 row / 8 rows / 8 rows unpacked) per [out, in] matrix: "
              + "; ".join(f"{k} {'/'.join(v)}" for k, v in out["forms"].items())
              + f" | packed copies {out['packed_mb']:.0f} MB")  # fmt: skip
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
