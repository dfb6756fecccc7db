"""The trainer: one stage of a recipe, resumable exactly.

Per optimiser step: ``grad_accum`` micro-batches (forward under autocast for bf16, backward),
non-finite check per parameter group, clipping, AdamW, LR from the schedule (a pure function of
the step, so nothing but the step needs saving). Logs to a progress bar (loss, LR, tokens/s,
ETA), ``metrics.jsonl`` and TensorBoard; saves atomically every ``save_every`` steps; draws the
loss curve at the end. Data order is a pure function of (seed, epoch), so the data position is
(epoch, micro-batch index) and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from modalign.data.collate import LengthGroupedSampler
from modalign.data.datasets import BadSamplePolicy
from modalign.train import state as st
from modalign.train.freeze import param_groups
from modalign.train.parallel import Dist, all_mean, barrier, unwrap
from modalign.train.recipe import Stage

log = logging.getLogger("modalign")


class NonFiniteError(RuntimeError):
    """Loss or gradients became NaN/inf; the last good checkpoint is kept."""


def lr_factor(step: int, total: int, warmup: float, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimiser step ``step`` (0-based)."""
    w = int(warmup if warmup >= 1 else round(warmup * total))
    if w and step < w:
        return (step + 1) / w
    if decay == "constant" or total <= w:
        return 1.0
    p = min((step - w) / max(total - w, 1), 1.0)
    f = 0.5 * (1 + math.cos(math.pi * p)) if decay == "cosine" else 1 - p
    return min_ratio + (1 - min_ratio) * f


def anneal_factor(i: int, steps: int, start: float, min_ratio: float) -> float:
    """``stop_anneal``: the multiplier ``i`` steps (0-based) after a stage's stop condition was met, going
    linearly from ``start`` (the schedule's value there) down to ``min_ratio`` at the last of ``steps``."""
    return min_ratio + (start - min_ratio) * (1 - (i + 1) / steps)


def lm_loss(model: nn.Module, batch: dict, device, prior=None) -> tuple[torch.Tensor, int]:
    """The supervised tokens' loss; with ``prior`` (an ``AnswerPrior``), against its answer prior."""
    px = batch["pixel_values"]
    if isinstance(px, torch.Tensor):
        px = px.to(device)
    elif isinstance(px, list):
        px = [p.to(device) for p in px]
    out = model(
        input_ids=batch["input_ids"].to(device),
        pixel_values=px,
        attention_mask=batch["attention_mask"].to(device),
        labels=batch["labels"].to(device),
        return_logits=False,  # the LM head runs on the supervised positions only
        **({"image_keys": batch["image_keys"]} if batch.get("image_keys") is not None else {}),
        **({"answer_bias": prior.bias(batch["ids"]).to(device)} if prior is not None else {}),
    )
    return out.loss, out.num_tokens


@dataclass
class StageResult:
    steps: int
    final_loss: float
    seconds: float
    tokens: int
    skipped: dict


class Trainer:
    def __init__(
        self,
        model: nn.Module,  # possibly DDP-wrapped
        stage: Stage,
        dataset,
        collator: Callable,
        out: Path,
        seed: int = 0,
        dist: Dist | None = None,
        loss_fn: Callable = lm_loss,
        eval_fn: Callable | None = None,
        progress: bool = True,
        carry: dict | None = None,
    ):
        self.model, self.stage, self.dataset, self.collator = model, stage, dataset, collator
        self.out, self.seed, self.d = Path(out), seed, dist or Dist()
        self.loss_fn, self.eval_fn, self.progress = loss_fn, eval_fn, progress
        # what one stage leaves to the next of the same run (the frozen tower's feature cache)
        self.carry = carry if carry is not None else {}
        core = unwrap(model)
        self.groups = param_groups(core, stage.lr, stage.weight_decay, stage.lr_groups)
        if not self.groups:
            raise ValueError(f"stage {stage.name}: no trainable parameters")
        for g in self.groups:
            g["initial_lr"] = g["lr"]
        self.opt = torch.optim.AdamW(self.groups, lr=stage.lr, betas=(0.9, 0.98), eps=1e-8, foreach=True)
        self.sampler = LengthGroupedSampler(
            dataset, stage.batch_size * self.d.world, seed, stage.group_by_modality,
            mega=32 if stage.group_by_length else 1,
        )  # fmt: skip
        self.micro_per_epoch = len(self.sampler.batches())
        if stage.max_steps is not None:
            self.total = stage.max_steps
        else:
            self.total = max(1, math.ceil(stage.epochs * self.micro_per_epoch / stage.grad_accum))
        self.policy = BadSamplePolicy(stage.bad_samples.mode, stage.bad_samples.max_fraction)
        self.ckpt_dir = self.out / "checkpoints"

    # ------------------------------------------------------------------ data

    def _micro_batches(self, epoch: int, start: int):
        """Micro-batches from (epoch, index) on, forever; yields (epoch, index, batch)."""
        while True:
            self.sampler.set_epoch(epoch)
            batches = self.sampler.batches()
            for i in range(start, len(batches)):
                rows = batches[i][self.d.rank :: self.d.world]
                yield epoch, i, self.collator([self.dataset[j] for j in rows])
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------ run

    def run(self, resume: bool = True) -> StageResult:
        core = unwrap(self.model)
        vision = getattr(core, "vision", None)
        cache = (self.stage.feature_cache_mb > 0 and vision is not None and hasattr(core, "cache_vision_features")
                 and hasattr(self.dataset, "image_files") and not core.config.vision.hd_layout
                 and not st.is_sharded(core) and not any(p.requires_grad for p in vision.parameters()))  # fmt: skip
        if cache:  # a frozen tower: its output per image file, computed once, in file order
            t0 = time.perf_counter()
            fc = core.cache_vision_features(self.stage.feature_cache_mb, reuse=self.carry.get("features"))
            held = len(fc)  # from an earlier stage with the same frozen tower: not computed again
            n = fc.fill(vision, self.dataset.image_files(skip=fc))
            hold = getattr(self.dataset, "hold_images", None)
            if hold is not None:
                hold(fc)  # what it holds is not read again
            log.info("stage %s: vision features of %d images cached in %.1f s (%d from the previous stage)",
                     self.stage.name, n, time.perf_counter() - t0, held)  # fmt: skip
        else:  # a stage without the cache (its tower trains, or the cache is off) lets it go
            self.carry.pop("features", None)
        llm = getattr(core, "llm", None)
        if self.stage.dropout and llm is not None:
            llm.set_dropout(self.stage.dropout)
        try:
            return self._run(resume)
        finally:
            if self.stage.dropout and llm is not None:
                llm.set_dropout(0.0)
            if cache:
                if hold is not None:
                    hold(())
                self.carry["features"] = fc
                core.cache_vision_features(0)

    def _run(self, resume: bool) -> StageResult:
        s = self.stage
        step, epoch, micro, tokens_total, stop_at = 0, 0, 0, 0, None
        recent: deque[float] = deque(maxlen=s.stop_window)  # the last losses, for stop_at_loss
        core = unwrap(self.model)
        prev = st.checkpoints(self.ckpt_dir)
        if resume and prev:
            load = st.load_training_state_sharded if st.is_sharded(core) else st.load_training_state
            info = load(prev[-1], core, self.opt)
            step, epoch, micro, tokens_total = info["step"], info["epoch"], info["micro"], info["tokens"]
            recent.extend(info.get("recent_losses", []))
            stop_at = info.get("stop_at", step if self._learnt(recent) else None)
            self.policy.seen = info["seen"]
            self.policy.skipped.update(info["skipped"])
            if self.d.main:
                log.info("stage %s: resumed from %s (step %d)", s.name, prev[-1].name, step)
        else:
            torch.manual_seed(self.seed * 7919 + 17 + self.d.rank)  # dropout masks differ by rank
        metrics_f = self.out / "metrics.jsonl"
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(metrics_f, step)
        tb = _tensorboard(self.out / "tb") if self.d.main else None
        self.model.train()
        if s.gradient_checkpointing:
            core.llm.gradient_checkpointing = True
            if hasattr(core, "vision"):
                core.vision.gradient_checkpointing = True
        autocast = torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
        data = self._micro_batches(epoch, micro)
        bar = tqdm(total=self.total, initial=step, desc=s.name, disable=not (self.d.main and self.progress),
                   dynamic_ncols=True, leave=True)  # fmt: skip
        t0, loss_val = time.perf_counter(), (recent[-1] if recent else float("nan"))
        sched = s.schedule

        def factor(i: int) -> float:
            return lr_factor(i, self.total, sched.warmup, sched.decay, sched.min_lr_ratio)

        def end() -> int:  # the last step: max_steps, or stop_anneal steps after stop_at_loss was met
            return self.total if stop_at is None else min(self.total, stop_at + s.stop_anneal)

        while step < end():
            ts = time.perf_counter()
            f = (factor(step) if stop_at is None
                 else anneal_factor(step - stop_at, s.stop_anneal, factor(stop_at), sched.min_lr_ratio))  # fmt: skip
            for g in self.opt.param_groups:
                g["lr"] = g["initial_lr"] * f
            losses, ntok = [], 0
            for _ in range(s.grad_accum):
                epoch, micro, batch = next(data)
                micro += 1
                for bad in batch["bad"]:
                    self.policy.bad(bad)
                for _ in batch["ids"]:
                    self.policy.ok()
                if not batch["ids"]:
                    continue
                with autocast:
                    loss, n = self.loss_fn(self.model, batch, self.d.device)
                if not torch.isfinite(loss):
                    raise NonFiniteError(
                        f"stage {s.name}, step {step}: loss is {loss.item()} (batch {batch['ids'][:4]}...); "
                        f"the last good checkpoint is kept in {self.ckpt_dir}; lower the LR or use fp32"
                    )
                (loss / s.grad_accum).backward()
                losses.append(loss.item())
                ntok += int(batch["attention_mask"].sum())
            self._check_grads(step)
            gnorm = None
            if s.clip:
                params = [p for g in self.opt.param_groups for p in g["params"]]
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, s.clip))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            step += 1
            loss_val = all_mean(sum(losses) / max(len(losses), 1), self.d)
            tokens_total += ntok * self.d.world
            dt = time.perf_counter() - ts
            rec = {"stage": s.name, "step": step, "loss": loss_val, "lr": self.opt.param_groups[0]["lr"],
                   "grad_norm": gnorm, "tokens": tokens_total, "tok_per_s": ntok * self.d.world / max(dt, 1e-9),
                   "epoch": epoch, "skipped": sum(self.policy.skipped.values())}  # fmt: skip
            if self.d.main:
                with metrics_f.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                if tb is not None:
                    for k in ("loss", "lr", "grad_norm", "tok_per_s"):
                        if rec[k] is not None:
                            tb.add_scalar(f"{s.name}/{k}", rec[k], step)
                bar.set_postfix(
                    loss=f"{loss_val:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:.0f}"
                )
                bar.update(1)
            if self.eval_fn and s.eval_every and step % s.eval_every == 0:
                res = self.eval_fn(core, step)
                if self.d.main and res:
                    with metrics_f.open("a") as f:
                        f.write(json.dumps({"stage": s.name, "step": step, "eval": res}) + "\n")
            recent.append(loss_val)
            met = stop_at is None and self._learnt(recent)
            if met:
                stop_at = step
                bar.total = end()
            if (s.save_every and step % s.save_every == 0) or step == end():
                self._save(core, step, epoch, micro, tokens_total, list(recent), stop_at)
            if met:
                msg = (f"stage {s.name}: mean loss of the last {s.stop_window} steps "
                       f"{sum(recent) / s.stop_window:.4f} <= stop_at_loss {s.stop_at_loss} at step {step} of "
                       f"{self.total}: ")  # fmt: skip
                msg += (f"stopped at step {step}" if end() == step else
                        f"the LR anneals to min_lr_ratio over {end() - step} more steps")  # fmt: skip
                if self.d.main:
                    log.info(msg)
                    with metrics_f.open("a") as fh:
                        fh.write(json.dumps({"stage": s.name, "step": step, "stopped": msg}) + "\n")
        bar.close()
        if tb is not None:
            tb.close()
        self.policy.check(final=True)
        if self.d.main:
            plot_loss(metrics_f, self.out / "loss.png", s.name)
        core.llm.gradient_checkpointing = False
        return StageResult(step, loss_val, time.perf_counter() - t0, tokens_total, dict(self.policy.skipped))

    def _learnt(self, recent: deque) -> bool:
        """``stop_at_loss``: the mean of the last ``stop_window`` losses is at or below it."""
        s = self.stage
        return (
            s.stop_at_loss is not None
            and len(recent) == s.stop_window
            and sum(recent) / len(recent) <= s.stop_at_loss
        )

    def _check_grads(self, step: int) -> None:
        for g in self.opt.param_groups:
            grads = [p.grad for p in g["params"] if p.grad is not None]
            if not grads or (
                _plain(grads) and bool(torch.stack(torch._foreach_norm(grads, 1)).isfinite().all())
            ):
                continue  # one check per group: a non-finite element makes its tensor's L1 norm non-finite
            # (a finite tensor's norm can overflow too: so a failed check is confirmed tensor by tensor;
            # sharded DTensor gradients are checked that way, each check a collective)
            if not all(torch.isfinite(x).all() for x in grads):
                raise NonFiniteError(
                    f"stage {self.stage.name}, step {step}: non-finite gradients in parameter group "
                    f"{g['name']!r}; the last good checkpoint is kept in {self.ckpt_dir}"
                )

    def _save(self, core, step, epoch, micro, tokens, recent: list[float], stop_at: int | None) -> None:
        info = {"step": step, "epoch": epoch, "micro": micro, "tokens": tokens, "stage": self.stage.name,
                "seen": self.policy.seen, "skipped": dict(self.policy.skipped), "recent_losses": recent,
                "stop_at": stop_at}  # fmt: skip
        path = self.ckpt_dir / f"step-{step:06d}"
        ranks = st.gather_rank_rng()  # collective: each rank's generator (its dropout masks go on from it)
        if st.is_sharded(core):  # FSDP: every rank writes its shards (collective)
            st.save_training_state_sharded(path, core, self.opt, info, self.d.main, ranks)
        elif self.d.main:
            st.save_training_state(path, core, self.opt, info, ranks)
        if self.d.main:
            st.prune(self.ckpt_dir, self.stage.keep_last)
        barrier(self.d)


def _plain(tensors: list[torch.Tensor]) -> bool:
    """Whether these are ordinary tensors (not DTensors) on one device, as the fused kernels need."""
    return all(type(t) is torch.Tensor and t.device == tensors[0].device for t in tensors)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    keep = [
        line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))


def plot_loss(metrics: Path, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    recs = [r for r in recs if "loss" in r]
    if not recs:
        return
    steps, losses = [r["step"] for r in recs], [r["loss"] for r in recs]
    k = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, losses, alpha=0.3, label="loss")
    ax.plot(steps, smooth, label=f"mean of {k}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    if min(losses) > 0 and max(losses) / min(losses) > 30:  # early steps would flatten the rest
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
