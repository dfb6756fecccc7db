"""A GPU machine's five-minute check of the real-hardware path: save and load a LLaVA-shaped model
straight to the device in bf16, generate, and train 10 steps (bf16 with fp32 master weights,
gradient checkpointing) through the recipe runner; prints load time, tokens/s and peak memory.

    python bench/gpu_check.py                      # ~1.4B: CLIP ViT-L/14-336 + a 1.1B Llama, on CUDA
    python bench/gpu_check.py --size tiny --device cpu   # the same path in seconds, anywhere

Nothing is downloaded: the weights are random (the check is of the machinery, not the answers) and
the training data is a small generated ShapesWorld. One JSON line at the end holds the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from modalign import MLLM
from modalign.checkpoints import build
from modalign.config import MLLMConfig
from modalign.devices import resolve_device, resolve_dtype

SIZES = {  # LLM overrides of the llava-1.5-7b preset (the tower stays CLIP ViT-L/14-336)
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_layers": 22,
        "num_heads": 32,
        "num_kv_heads": 4,
    },
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "image_size": 56}


def config(size: str) -> MLLMConfig:
    cfg = MLLMConfig.from_name("llava-1.5-7b")
    for k, v in SIZES[size].items():
        setattr(cfg.llm, k, v)
    if size == "tiny":
        for k, v in TINY_VISION.items():
            setattr(cfg.vision, k, v)
    return cfg


def random_model(cfg: MLLMConfig, device, dtype) -> MLLM:
    """Built on the meta device, then given random weights on ``device`` (no host copy)."""
    model = build(cfg, dtype, device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02, generator=g)
            elif "norm" in name or "layrnorm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    return model


def peak(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def check_generate(model: MLLM, device, batch: int, new: int) -> dict:
    from modalign.infer.engine import Engine, Prompt, SamplingParams

    eng = Engine(model)
    px = torch.randn(3, model.config.vision.image_size, model.config.vision.image_size)
    prompts = [Prompt(input_ids=[1, *range(100, 120), model.config.image_token_id, *range(200, 230)],
                      pixel_values=[px]) for _ in range(batch)]  # fmt: skip
    params = SamplingParams(max_new_tokens=new, temperature=0.0)  # no stop tokens: every row runs to the end
    eng.generate(prompts[:1], SamplingParams(max_new_tokens=4, temperature=0.0))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = eng.generate(prompts, params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n = sum(len(c.token_ids) for c in out)
    return {"generate_tokens": n, "generate_tok_per_s": n / (time.perf_counter() - t)}


def check_train(model_dir: Path, data: Path, out: Path, steps: int, batch: int, device) -> dict:
    from modalign.train.parallel import Dist
    from modalign.train.recipe import load_recipe
    from modalign.train.run import run_recipe

    doc = {
        "name": "gpu-check", "seed": 0,
        "model": {"config": MLLMConfig.from_dict(json.loads((model_dir / "config.json").read_text())["modalign"]).to_dict(),
                  "init": {"all": str(model_dir)}, "tokenizer": str(data / "tokenizer")},
        "stages": [{"name": "finetune", "trainable": ["connector.*", "llm.*"], "precision": "bf16-pure",
                    "gradient_checkpointing": True,
                    "data": {"sources": [{"path": str(data / "instruct.json")}], "template": "chatml",
                             "batch_size": batch, "max_length": 1024},
                    "optim": {"lr": 1e-5}, "stop": {"max_steps": steps}, "checkpoints": {"every": 0}}],
    }  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    res = run_recipe(load_recipe(doc), out, Dist(device=device), progress=False)["finetune"]
    recs = [json.loads(x) for x in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tok_per_s"] for r in recs if "tok_per_s" in r][2:]  # after the warm-up steps
    return {"train_steps": res.steps, "train_seconds": time.perf_counter() - t, "train_final_loss": res.final_loss,
            "train_tok_per_s": sum(tps) / max(len(tps), 1), "train_peak_gib": peak(device)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg = config(args.size)
    report = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "size": args.size}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_model(cfg, device, torch.float32)
        report["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
        model.save_pretrained(tmp / "model")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        model = MLLM.from_pretrained(tmp / "model", device=device, dtype=dtype)
        report["load_seconds"] = time.perf_counter() - t
        report["load_peak_gib"] = peak(device)
        assert all(p.device.type == device.type and p.dtype == dtype for p in model.parameters())
        report |= check_generate(model, device, args.batch, args.new_tokens)
        report["generate_peak_gib"] = peak(device)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        from modalign.data.datasets import load_samples
        from modalign.data.tokenizer import Tokenizer
        from modalign.shapesworld import data as shapes

        shapes.generate(tmp / "data", num_train=64, num_eval=4, num_text=8, seed=0)
        texts = [m.content for s in load_samples(tmp / "data" / "instruct.json") for m in s.messages]
        Tokenizer.train_bpe(texts, vocab_size=512).save(tmp / "data" / "tokenizer")
        report |= check_train(tmp / "model", tmp / "data", tmp / "run", args.steps, args.batch, device)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
