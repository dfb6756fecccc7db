"""Training throughput: transformers' LlavaForConditionalGeneration vs modalign's MLLM on the same
LLaVA config and weights, same batch, in one run (forward + backward + AdamW step).

    python bench/bench_train.py [--size tiny|mid] [--steps 20] [--batch 8] [--threads 2] [--rounds 3]
                                [--precision fp32,bf16,bf16-pure] [--supervised K] [--text 100] [--compile]
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

``--precision bf16-pure`` times modalign as a ``precision: bf16-pure`` stage trains (bf16 weights,
fp32 master copies stepped by the optimiser) against transformers under bf16 autocast (its
Trainer's ``bf16=True``).

Each side's first warm-up step runs under torch's FLOP counter (matrix products and attention):
the FLOPs a sample takes on each side, their ratio (the speed-up equal kernels would give) and
the rate each side ran at are printed below the timings.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from bench_decode import IMAGE, build
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode  # the same tiny LLaVA as the decode benchmark


def run(model, batch, steps, precision, hf, compiled=False):
    """(samples/s over ``steps`` timed steps, FLOPs of one step or None where compiled)."""
    masters = None
    if not hf:
        if precision == "bf16-pure":  # as the trainer runs a bf16-pure stage: a bf16 copy, fp32 masters
            import copy

            from modalign.train.precision import MasterWeights

            model = copy.deepcopy(model)
            masters = MasterWeights(model)
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
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [m for _, m in masters.named_parameters()] if masters else params, lr=1e-4, fused=True
    )
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32")

    def step():
        with ctx:
            if hf:
                loss = model(input_ids=batch["ids"], pixel_values=batch["px"], attention_mask=batch["mask"],
                             labels=batch["labels"]).loss  # fmt: skip
            else:
                loss, _ = model(inputs)
        loss.backward()
        if masters:
            masters.grads_to_masters()
        opt.step()
        if masters:
            masters.masters_to_model()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    flops = None
    if compiled:
        step()
    else:  # the first warm-up step, its matrix products and attention counted
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch["ids"].shape[0] / (time.perf_counter() - t), flops


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:  # fmt: skip
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _count_cpu_attention() -> None:
    """torch's FLOP counter knows the CUDA attention kernels; the CPU's flash kernel (what SDPA runs
    here, on both sides) is counted as they are: its two products, causal or not."""
    ops = torch.ops.aten
    for op, formula in ((ops._scaled_dot_product_flash_attention_for_cpu, _cpu_flash_flops),
                        (ops._scaled_dot_product_flash_attention_for_cpu_backward, _cpu_flash_backward_flops)):  # fmt: skip
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


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
    ap.add_argument("--precision", default="fp32,bf16",
                    help="comma-separated: fp32, bf16 (autocast on both sides), bf16-pure (modalign's bf16 "
                         "weights and fp32 masters against transformers' autocast)")  # fmt: skip
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
    _count_cpu_attention()
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
            a, b = (statistics.median(r[i][0] for r in rounds) for i in (0, 1))
            lora = (
                f", LoRA rank {args.lora} dropout {args.lora_dropout} (PEFT {peft_version()})"
                if args.lora
                else ""
            )
            per = " ".join(f"{r[1][0] / r[0][0]:.2f}" for r in rounds)
            comp = ""
            if args.compile:
                c = statistics.median(r[2][0] for r in rounds)
                comp = (f" | compiled {c:7.1f} samples/s, ratio {c / a:4.2f}x (per round "
                        f"{' '.join(f'{r[2][0] / r[0][0]:.2f}' for r in rounds)})")  # fmt: skip
            theirs = " (autocast)" if precision == "bf16-pure" else ""
            print(f"{precision}: transformers{theirs} {a:7.1f} samples/s | modalign {b:7.1f} samples/s | ratio {b / a:4.2f}x{comp} "
                  f"(medians of {args.rounds} rounds; per round {per}; {args.size} model, batch {args.batch}, {ids.shape[1]} tokens, "
                  f"{int((labels != -100).sum()) // args.batch} supervised{lora})")  # fmt: skip
            fa, fb = (rounds[0][i][1] / args.batch for i in (0, 1))
            print(f"  a sample's step computes {fa / 1e9:.1f} GFLOP in transformers, {fb / 1e9:.1f} in modalign "
                  f"({fa / fb:.2f}x fewer: the ratio at equal kernel speed); they ran at {a * fa / 1e9:.0f} and "
                  f"{b * fb / 1e9:.0f} GFLOP/s (matrix products and attention counted)")  # fmt: skip


if __name__ == "__main__":
    main()
