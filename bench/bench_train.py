"""Training throughput: transformers' LlavaForConditionalGeneration vs modalign's MLLM on the same
LLaVA config and weights, same batch, in one run (forward + backward + AdamW step).

    python bench/bench_train.py [--size tiny|mid] [--steps 20] [--batch 8] [--threads 2] [--rounds 3]
                                [--precision fp32,bf16] [--supervised K] [--text 100] [--compile]
                                [--lora RANK [--lora-dropout P]]

``--size``: the decode benchmark's models (``tiny``: CLIP 2x128 at 64/16, Llama 4x256; ``mid``:
CLIP 4x256 at 224/16, Llama 6x512 with a 32000-token vocabulary). Each sample is <s>, the image's
visual tokens, then ``--text`` random text tokens.

modalign's side is called as its trainer calls it (the lm objective, ``LMObjective``: the LM head
runs on the supervised positions only); transformers' computes the logits of every position. Both
step with fused AdamW, as modalign's trainer and transformers' Trainer (its default since torch
2.8) do. By default
every text token is supervised (as in captioning / pretraining); ``--supervised K`` supervises
only the last K, as instruction data supervise the answer and not the prompt.

``--compile``: modalign's LLM forward also through ``torch.compile`` (as a recipe stage's
``compile: true`` runs it), timed as a third side after its compile; its ratio is printed beside
the eager one.

``--lora RANK``: LoRA training instead of full fine-tuning, as mPLUG-Owl's stage 2 trains: adapters
of that rank (alpha 2 x rank, ``--lora-dropout``, default 0.1) on the language model's seven
projections, through PEFT on transformers' side and modalign's own on the other, with the same A
matrices (B starts at zero on both); only the adapters train.

The two models take turns for ``--rounds`` rounds and the medians are compared, so a shared
host's speed drifting during the run shifts both sides alike; each round's ratio is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from bench_decode import IMAGE, build  # the same tiny LLaVA as the decode benchmark


def run(model, batch, steps, precision, hf, compiled=False):
    if not hf:
        from modalign.train.objectives.lm import LMObjective

        vars(model.llm).pop(
            "forward", None
        )  # the class's forward again (an earlier round may have compiled it)
        if compiled:  # as the trainer does for a stage with ``compile: true``
            model.llm.forward = torch.compile(model.llm.forward, dynamic=True)
        model = LMObjective(model)
        inputs = {"input_ids": batch["ids"], "pixel_values": batch["px"], "attention_mask": batch["mask"],
                  "labels": batch["labels"], "ids": [str(i) for i in range(len(batch["ids"]))]}  # fmt: skip
    model.train()
    # fused AdamW on both sides: modalign's trainer uses it, as transformers' Trainer does by default
    # (``adamw_torch_fused``, torch 2.8 or later)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with ctx:
            if hf:
                loss = model(input_ids=batch["ids"], pixel_values=batch["px"], attention_mask=batch["mask"],
                             labels=batch["labels"]).loss  # fmt: skip
            else:
                loss, _ = model(inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch["ids"].shape[0] / (time.perf_counter() - t)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_version() -> str:
    import peft

    return peft.__version__


def add_lora(ref, ours, rank: int, dropout: float):
    """The same LoRA on both sides: PEFT's on the reference's language model, then modalign's with
    PEFT's A matrices copied in; returns the PEFT-wrapped reference."""
    from peft import LoraConfig, get_peft_model

    from modalign.config import LoRAConfig
    from modalign.models.modality import enable_lora
    from modalign.train.freeze import apply_trainable

    pattern = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(LORA_TARGETS) + ")"
    ref = get_peft_model(
        ref, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=pattern)
    )
    enable_lora(ours, LoRAConfig(rank=rank, alpha=2 * rank, dropout=dropout, targets=LORA_TARGETS))
    theirs = {
        n.split("language_model.", 1)[1]: m
        for n, m in ref.named_modules()
        if hasattr(m, "lora_A") and "language_model." in n
    }
    copied = 0
    with torch.no_grad():
        for name, m in ours.llm.named_modules():
            if getattr(m, "lora_A", None) is not None:
                m.lora_A.weight.copy_(theirs[name].lora_A["default"].weight)
                m.lora_B.weight.copy_(theirs[name].lora_B["default"].weight)
                copied += 1
    if copied != len(theirs) or not copied:
        raise SystemExit(f"--lora: {copied} of PEFT's {len(theirs)} adapters matched")
    apply_trainable(ours, ["llm.**.lora_*"])
    return ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("tiny", "mid"), default="tiny")
    ap.add_argument("--text", type=int, default=100, help="text tokens per sample")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--compile", action="store_true", help="also time modalign with its LLM compiled")
    ap.add_argument(
        "--supervised", type=int, default=0, help="supervise only the last K tokens (0: all text)"
    )
    ap.add_argument(
        "--lora",
        type=int,
        default=0,
        help="train LoRA of this rank on the LLM instead (PEFT's on transformers)",
    )
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours = build(tmp, args.size)
        if args.lora:
            ref = add_lora(ref, ours, args.lora, args.lora_dropout)
        n, px = ours.num_image_tokens(), ours.config.vision.image_size
        g = torch.Generator().manual_seed(0)
        ids = torch.cat([torch.ones(args.batch, 1, dtype=torch.long), torch.full((args.batch, n), IMAGE),
                         torch.randint(3, 400, (args.batch, args.text), generator=g)], 1)  # fmt: skip
        labels = ids.masked_fill(ids == IMAGE, -100)
        if args.supervised:
            labels[:, : -args.supervised] = -100
        batch = {"ids": ids, "px": torch.randn(args.batch, 3, px, px, generator=g), "mask": torch.ones_like(ids),
                 "labels": labels}  # fmt: skip
        for precision in args.precision.split(","):
            rounds = []
            for _ in range(args.rounds):
                r = [
                    run(ref, batch, args.steps, precision, hf=True),
                    run(ours, batch, args.steps, precision, hf=False),
                ]
                if args.compile:
                    r.append(run(ours, batch, args.steps, precision, hf=False, compiled=True))
                rounds.append(r)
            a, b = (statistics.median(r[i] for r in rounds) for i in (0, 1))
            lora = (
                f", LoRA rank {args.lora} dropout {args.lora_dropout} (PEFT {peft_version()})"
                if args.lora
                else ""
            )
            per = " ".join(f"{r[1] / r[0]:.2f}" for r in rounds)
            comp = ""
            if args.compile:
                c = statistics.median(r[2] for r in rounds)
                comp = (f" | compiled {c:7.1f} samples/s, ratio {c / a:4.2f}x (per round "
                        f"{' '.join(f'{r[2] / r[0]:.2f}' for r in rounds)})")  # fmt: skip
            print(f"{precision}: transformers {a:7.1f} samples/s | modalign {b:7.1f} samples/s | ratio {b / a:4.2f}x{comp} "
                  f"(medians of {args.rounds} rounds; per round {per}; {args.size} model, batch {args.batch}, {ids.shape[1]} tokens, "
                  f"{int((labels != -100).sum()) // args.batch} supervised{lora})")  # fmt: skip


if __name__ == "__main__":
    main()
