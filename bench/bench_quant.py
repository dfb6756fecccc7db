"""Quantized weights on a trained model: its benchmark score and answers against fp32, decode speed,
the LLM's matrices held and the largest logit difference, for fp32, int8 and int4 in one run.

    python bench/bench_quant.py [--run DIR] [--task shapes] [--threads 2] [--new-tokens 64] [--json]

``--run``: a ``modalign quickstart`` output folder (its ``data/eval.json`` and the model of the
method it trained, ``METHOD/model``); without it the README's first command trains one into a
temporary folder first (about 3-4 minutes on 2 cores). Each scheme loads the model as a user
does (``ChatModel.load(..., quantize=...)``) and answers every question of the held-out set with
``modalign eval``'s task; answers equal to fp32's are counted question by question. Decode speed
is greedy at batch 1 on the first question with an image, the EOS ignored, prefill excluded
(time of N new tokens less time of 1), as ``bench_decode.py`` measures it; the logit difference
and the matrices held are ``bench_decode.quant_report``'s.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_decode import leading_same, quant_report, timed

SCHEMES = ("none", "int8", "int4")


def trained_run(tmp: str) -> Path:
    out = Path(tmp) / "quickstart"
    cmd = [sys.executable, "-m", "modalign.cli", "quickstart", "--out", str(out), "--no-progress"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def model_dir(run: Path) -> Path:
    found = sorted(p.parent for p in run.glob("*/model/config.json") if p.parent.parent.name != "stage0")
    if len(found) != 1:
        raise SystemExit(f"{run}: expected one METHOD/model folder, found {[str(p) for p in found]}")
    return found[0]


def main():
    from modalign.eval.run import evaluate
    from modalign.infer.chat import ChatModel, user_message
    from modalign.infer.engine import Engine, SamplingParams
    from modalign.infer.quant import int4_unavailable
    from modalign.shapesworld import benchmark  # noqa: F401  (registers the "shapes" task)

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="a modalign quickstart output folder (default: train one)")
    ap.add_argument("--task", default="shapes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print one JSON document at the end")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    schemes = [s for s in SCHEMES if s != "int4" or int4_unavailable("cpu") is None]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else trained_run(tmp)
        model, data = model_dir(run), run / "data" / "eval.json"
        rows, answers = {}, {}
        for scheme in schemes:
            cm = ChatModel.load(
                model, device="cpu", dtype="float32", quantize=None if scheme == "none" else scheme
            )
            res = evaluate(cm, args.task, data, None, Path(tmp) / scheme, progress=False)
            answers[scheme] = [json.loads(x)["raw"] for x in (Path(tmp) / scheme / "samples.jsonl").open()]
            rows[scheme] = {k: v for k, v in res.items() if isinstance(v, int | float)}
        base = answers["none"]
        for scheme in schemes:
            rows[scheme]["same_answers"] = sum(
                a == b for a, b in zip(answers[scheme], base, strict=True)
            ) / len(base)

        # decode speed, logits and memory on the first question with an image (engines without
        # a tokenizer do not stop at EOS: every step is timed)
        cm = ChatModel.load(model, device="cpu", dtype="float32")
        rec = next(r for r in json.loads(data.read_text()) if r.get("image"))
        prompt = cm.prompt([user_message(rec["conversations"][0]["value"], 1)], [data.parent / rec["image"]])
        n = args.new_tokens
        engines = {"none": Engine(cm.model)}
        engines |= {s: Engine(copy.deepcopy(cm.model), quantize=s) for s in schemes if s != "none"}

        def gen(eng, k):
            return eng.generate([prompt], SamplingParams(max_new_tokens=k))[0].token_ids

        fp32_tokens = gen(engines["none"], n)
        for scheme, eng in engines.items():
            row = rows[scheme]
            row["tps"] = (n - 1) / (timed(lambda eng=eng: gen(eng, n)) - timed(lambda eng=eng: gen(eng, 1)))
            if scheme != "none":
                row["leading_same_tokens"] = leading_same([gen(eng, n)], [fp32_tokens], n)
                row |= quant_report(engines["none"], eng, prompt, fp32_tokens)
        fp32 = rows["none"]
        print(f"{model} ({args.task}, {fp32['samples']} questions; decode: batch 1, {n} new tokens, "
              f"{len(prompt.input_ids)}-token prompt)")  # fmt: skip
        for scheme in schemes:
            r = rows[scheme]
            extra = ""
            if scheme != "none":
                extra = (f" | {r['tps'] / fp32['tps']:.2f}x fp32 | greedy tokens equal to fp32's: leading "
                         f"{r['leading_same_tokens']}/{n} | max logit difference {r['max_logit_err']:.3f} (fp32 "
                         f"logits span {r['logit_range']:.1f}) | LLM matrices {r['fp32_mb']:.1f} MB fp32, "
                         f"{r['quant_mb']:.1f} MB {scheme}")  # fmt: skip
            unseen = (
                f", unseen pairs {r['unseen_pairs_accuracy']:.1%}" if "unseen_pairs_accuracy" in r else ""
            )
            print(f"{'fp32' if scheme == 'none' else scheme:5s}: accuracy {r['accuracy']:.1%}{unseen} | answers equal "
                  f"to fp32's {r['same_answers']:.1%} | decode {r['tps']:.1f} tok/s{extra}")  # fmt: skip
        if args.json:
            print(json.dumps({"model": str(model), "task": args.task, "new_tokens": n, "schemes": rows}))


if __name__ == "__main__":
    main()
