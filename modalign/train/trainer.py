"""The trainer: one stage of a recipe, resumable exactly.

Per optimiser step: ``grad_accum`` micro-batches (forward under autocast for bf16 and bf16-pure,
backward; bf16-pure steps fp32 master weights: ``precision.py``),
non-finite check per parameter group, clipping, AdamW, LR from the schedule (a pure function of
the step, so nothing but the step needs saving). Logs to a progress bar (loss, LR, tokens/s,
ETA), ``metrics.jsonl`` and TensorBoard; saves atomically every ``checkpoints.every`` steps; draws the
loss curve at the end. Data order is a pure function of (seed, epoch), so the data position is
(epoch, micro-batch index) and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from modalign.data.collate import LengthGroupedSampler, SourceBatches
from modalign.data.datasets import BadSamplePolicy
from modalign.devices import keep_freed_host_memory
from modalign.train import state as st
from modalign.train.feature_cache import FeatureCache, RunCache
from modalign.train.freeze import param_groups
from modalign.train.parallel import Dist, all_sum, barrier, unwrap
from modalign.train.precision import MasterWeights
from modalign.train.precision import autocast as precision_autocast
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


@dataclass
class StageResult:
    steps: int
    final_loss: float
    seconds: float
    tokens: int
    skipped: dict
    # with a ``stop.at_loss`` rule: whether it was met (False: the stage ran to its cap unlearnt)
    converged: bool | None = None


@dataclass
class Progress:
    """Where a stage is: what a checkpoint saves (``state.json``'s ``info``) and a resume restores."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # micro-batches of ``epoch`` consumed
    tokens: int = 0
    recent: deque = field(default_factory=deque)  # the last losses, for the stop rule
    stop_at: int | None = None  # the step at which the stop rule was met

    def info(self, stage: str, policy: BadSamplePolicy, layout: dict | None = None) -> dict:
        return {"step": self.step, "epoch": self.epoch, "micro": self.micro, "tokens": self.tokens, "stage": stage,
                "seen": policy.seen, "skipped": dict(policy.skipped), "recent_losses": list(self.recent),
                "stop_at": self.stop_at, **({"layout": layout} if layout else {})}  # fmt: skip


@contextlib.contextmanager
def residual_dropout(llm: nn.Module | None, p: float):
    """Dropout on every decoder layer's attention and MLP outputs (the residual branches) while
    training: forward hooks, added for a stage and removed after it, so the model itself carries
    no training setting."""
    if not p or llm is None:
        yield
        return

    def hook(module, args, out):
        return torch.nn.functional.dropout(out, p, module.training)

    handles = [m.register_forward_hook(hook) for layer in llm.layers for m in (layer.self_attn, layer.mlp)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Trainer:
    """Trains one stage: ``model`` is the stage's objective module (``train/objectives``), possibly
    DDP/FSDP-wrapped, whose ``forward(batch)`` returns (loss, tokens)."""

    def __init__(
        self,
        model: nn.Module,
        stage: Stage,
        dataset,
        collator: Callable,
        out: Path,
        seed: int = 0,
        dist: Dist | None = None,
        progress: bool = True,
        cache: RunCache | None = None,
        masters: MasterWeights | None = None,
    ):
        self.model, self.stage, self.dataset, self.collator = model, stage, dataset, collator
        self.masters = masters  # bf16-pure: the optimiser steps these fp32 copies (train/precision.py)
        self.out, self.seed, self.d, self.progress = Path(out), seed, dist or Dist(), progress
        self.cache = cache if cache is not None else RunCache()  # what stages of a run share
        if self.d.device.type == "cpu":  # a step's tensors reuse freed memory, not fresh pages
            keep_freed_host_memory()
        opt = stage.optim
        self.groups = param_groups(unwrap(model), opt.lr, opt.weight_decay, opt.lr_groups)
        if not self.groups:
            raise ValueError(f"stage {stage.name}: no trainable parameters")
        for g in self.groups:
            g["initial_lr"] = g["lr"]
        if masters is not None:
            masters.swap(self.groups)
        params = [p for g in self.groups for p in g["params"]]
        # the fused kernel (one pass over each tensor; 4-5x faster than foreach on the CPU) where it
        # applies: plain tensors on one CPU or CUDA device; else (FSDP's DTensors) foreach
        fused = _plain([p.data for p in params]) and params[0].device.type in ("cpu", "cuda")
        self.opt = torch.optim.AdamW(self.groups, lr=opt.lr, betas=tuple(opt.betas), eps=1e-8,
                                     **({"fused": True} if fused else {"foreach": True}))  # fmt: skip
        data = stage.data
        if len(dataset) < self.d.world:  # the sampler would give no batch, and the step would wait forever
            files = ", ".join(src.path for src in data.sources)
            raise ValueError(f"stage {stage.name}: its data ({files}) holds {len(dataset)} sample(s)"
                             + (f", fewer than the {self.d.world} processes" if len(dataset) else ": no samples"))  # fmt: skip
        # ``mix: batch``: each step takes whole rounds (one batch of every source), each batch's
        # loss times its source's loss_weight; else one batch holds samples of any source
        self.joint = data.mix == "batch"
        if self.joint:
            sizes = [(src.batch_size or data.batch_size) * self.d.world for src in data.sources]
            self.sampler = SourceBatches(dataset, sizes, seed)
            self.loss_weights = [src.loss_weight for src in data.sources]
        else:
            self.sampler = LengthGroupedSampler(
                dataset, data.batch_size * self.d.world, seed, data.group_by_modality,
                mega=32 if data.group_by_length else 1,
            )  # fmt: skip
        self.micro_per_step = opt.grad_accum * (self.sampler.num_sources if self.joint else 1)
        self.micro_per_epoch = len(self.sampler)  # (SourceBatches counts rounds without drawing them)
        if stage.stop.max_steps is not None:
            self.total = stage.stop.max_steps
        else:
            self.total = max(1, math.ceil(stage.stop.epochs * self.micro_per_epoch / self.micro_per_step))
        self.policy = BadSamplePolicy(data.bad_samples.mode, data.bad_samples.max_fraction)
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics_file = self.out / "metrics.jsonl"
        self._padding = 0.0  # the last step's padded share of its token cells

    # ------------------------------------------------------------------ data

    def _micro_batches(self, epoch: int, start: int):
        """Micro-batches from (epoch, index) on, forever; yields (epoch, index, batch)."""
        while True:
            self.sampler.set_epoch(epoch)
            batches = self.sampler.batches()
            for i in range(start, len(batches)):
                if len(batches[i]) < self.d.world:  # a tail too short to give every process a row:
                    continue  # left out this epoch on every process (a process without rows would
                    # skip the step's collectives while the others wait in them)
                rows = batches[i][self.d.rank :: self.d.world]
                batch = self.collator([self.dataset[j] for j in rows])
                if self.joint:  # which source's batch: its loss weight (``_step``)
                    batch["source"] = self.sampler.source_of(i)
                yield epoch, i, batch
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------ run

    def run(self, resume: bool = True) -> StageResult:
        core = unwrap(self.model)
        features = self._attach_feature_cache(core)
        llm = getattr(core, "llm", None)
        compiled = self.stage.compile and llm is not None
        if compiled:  # for this stage only: the saved model and later stages run eagerly
            llm.forward = torch.compile(llm.forward, dynamic=True)
        try:
            with residual_dropout(llm, self.stage.optim.dropout):
                return self._run(resume)
        finally:
            if compiled:
                del llm.forward  # the class's forward again
            if features is not None:
                self._detach_feature_cache(core, features)

    def _attach_feature_cache(self, core):
        """A frozen tower's output per image file, computed once, in file order, before training
        (kept from an earlier stage with the same frozen tower); None where the stage cannot use it
        (its tower trains, the cache is off, an HD layout, FSDP, an objective without images)."""
        vision = getattr(core, "vision", None)
        usable = (self.stage.data.feature_cache_mb > 0 and vision is not None and hasattr(core, "features")
                  and hasattr(self.dataset, "image_files") and not core.config.vision.hd_layout
                  and not st.is_sharded(core) and not any(p.requires_grad for p in vision.parameters()))  # fmt: skip
        if not usable:  # a stage without the cache lets an earlier stage's go
            self.cache.features = None
            return None
        t0 = time.perf_counter()
        fc = FeatureCache.for_tower(vision, self.stage.data.feature_cache_mb, reuse=self.cache.features)
        held = len(fc)  # from an earlier stage with the same frozen tower: not computed again
        n = fc.fill(vision, self.dataset.image_files(skip=fc))
        core.features = fc
        self.dataset.hold_images(fc)  # what it holds is not read again
        log.info("stage %s: vision features of %d images cached in %.1f s (%d from the previous stage)",
                 self.stage.name, n, time.perf_counter() - t0, held)  # fmt: skip
        return fc

    def _detach_feature_cache(self, core, fc) -> None:
        self.dataset.hold_images(())
        self.cache.features = fc
        core.features = None

    def _resume(self, core, resume: bool) -> Progress:
        """The progress of the newest checkpoint that verifies (a corrupt one is named and skipped:
        the run goes back to the one before); a fresh start where there is none."""
        prev = st.checkpoints(self.ckpt_dir)
        pr = Progress(recent=deque(maxlen=self.stage.stop.window))
        if not (resume and prev):
            torch.manual_seed(self.seed * 7919 + 17 + self.d.rank)  # dropout masks differ by rank
            return pr
        load = st.load_training_state_sharded if st.is_sharded(core) else st.load_training_state
        problems = []
        for path in reversed(prev):
            try:
                info = (
                    load(path, core, self.opt, self.masters) if self.masters else load(path, core, self.opt)
                )
                break
            except st.CorruptCheckpoint as e:
                problems.append(str(e))
                if self.d.main:
                    log.warning("stage %s: checkpoint %s is corrupt: %s; falling back to the one before",
                                self.stage.name, path.name, e)  # fmt: skip
        else:
            raise st.CorruptCheckpoint(f"stage {self.stage.name}: no usable checkpoint in {self.ckpt_dir} "
                                       f"({'; '.join(problems)}); remove the directory to start the stage afresh")  # fmt: skip
        saved, now = info.get("layout"), self._layout()
        if saved is not None and saved != now:  # (older checkpoints hold none)
            raise ValueError(
                f"stage {self.stage.name}: {path} was saved with {saved}, this run has {now}: its position "
                f"(epoch {info['epoch']}, micro-batch {info['micro']}) would point elsewhere in the data. Resume with "
                f"the same global batch (batch size x processes), grad_accum, data and seed, or remove {self.ckpt_dir} "
                "to train the stage afresh"
            )
        self._resume_average(info, path)
        pr.step, pr.epoch, pr.micro, pr.tokens = info["step"], info["epoch"], info["micro"], info["tokens"]
        pr.recent.extend(info.get("recent_losses", []))
        pr.stop_at = info.get("stop_at", pr.step if self._learnt(pr.recent) else None)
        self.policy.seen = info["seen"]
        self.policy.skipped.update(info["skipped"])
        if self.d.main:
            log.info("stage %s: resumed from %s (step %d)", self.stage.name, path.name, pr.step)
        return pr

    def _resume_average(self, info: dict, path: Path) -> None:
        """A checkpoint's averages go on where the stage keeps one (a checkpoint without them, saved
        before ``optim.ema`` was set: the average begins at the resumed weights, said in the log),
        and are dropped where it no longer does."""
        state = self.opt.state
        if not self.stage.optim.ema:
            for p in self._params():
                state.get(p, {}).pop(st.AVERAGE, None)
        elif not info.get("average") and self.d.main:
            log.warning("stage %s: %s holds no average of the weights: the average (ema %s) begins anew from its "
                        "weights", self.stage.name, path.name, self.stage.optim.ema)  # fmt: skip
        elif info["average"] != self.stage.optim.ema and self.d.main:
            log.warning("stage %s: %s averaged the weights with decay %s; the average goes on with %s",
                        self.stage.name, path.name, info["average"], self.stage.optim.ema)  # fmt: skip

    def _layout(self) -> dict:
        """What a saved position (epoch, micro-batch) means: the sampler's global batch, the
        micro-batches a step takes, the data's size and the seed of its order."""
        if self.joint:  # each source's size and global batch (the stage's batch_size is unused)
            return {"source_samples": self.sampler.sizes, "source_batches": self.sampler.batch_sizes,
                    "grad_accum": self.stage.optim.grad_accum, "seed": self.seed}  # fmt: skip
        return {"global_batch": self.stage.data.batch_size * self.d.world, "grad_accum": self.stage.optim.grad_accum,
                "samples": len(self.dataset), "seed": self.seed}  # fmt: skip

    def _end(self, pr: Progress) -> int:
        """The last step: max_steps (or the epochs' steps), or where the stop rule was met."""
        return self.total if pr.stop_at is None else min(self.total, pr.stop_at)

    def _run(self, resume: bool) -> StageResult:
        s = self.stage
        core = unwrap(self.model)
        pr = self._resume(core, resume)
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(self.metrics_file, pr.step)
        tb = _tensorboard(self.out / "tb") if self.d.main else None
        self.model.train()
        self._set_checkpointing(core, s.gradient_checkpointing)
        data = self._micro_batches(pr.epoch, pr.micro)
        bar = tqdm(total=self.total, initial=pr.step, desc=s.name, disable=not (self.d.main and self.progress),
                   dynamic_ncols=True, leave=True)  # fmt: skip
        t0, loss_val = time.perf_counter(), (pr.recent[-1] if pr.recent else float("nan"))
        empty = 0  # steps in a row without a usable sample
        while pr.step < self._end(pr):
            ts = time.perf_counter()
            sched = s.optim.schedule
            f = lr_factor(pr.step, self.total, sched.warmup, sched.decay, sched.min_lr_ratio)
            for g in self.opt.param_groups:
                g["lr"] = g["initial_lr"] * f
            loss_val, ntok, gnorm = self._step(pr, data)
            if loss_val is None:  # no usable sample in the whole step: no update, no step counted
                empty += 1
                if empty * self.micro_per_step >= max(self.micro_per_epoch, 1):
                    raise ValueError(f"stage {s.name}: no usable sample in a whole epoch of its data "
                                     f"(skipped: {dict(self.policy.skipped)})")  # fmt: skip
                continue
            empty = 0
            pr.step += 1
            pr.tokens += ntok * self.d.world
            rec = {"stage": s.name, "step": pr.step, "loss": loss_val, "lr": self.opt.param_groups[0]["lr"],
                   "grad_norm": gnorm, "tokens": pr.tokens,
                   "tok_per_s": ntok * self.d.world / max(time.perf_counter() - ts, 1e-9), "epoch": pr.epoch,
                   "skipped": sum(self.policy.skipped.values())}  # fmt: skip
            if s.data.packing:  # the share of the step's token cells that were padding
                rec["padding"] = self._padding
            if self.joint:  # each source's loss (mean over the step's batches of it), unweighted
                rec["source_loss"] = self._source_loss
            if self.d.main:
                self._log(rec, tb, bar)
            pr.recent.append(loss_val)
            met = pr.stop_at is None and self._learnt(pr.recent)
            if met:
                pr.stop_at = pr.step
                bar.total = self._end(pr)
            if (s.checkpoints.every and pr.step % s.checkpoints.every == 0) or pr.step == self._end(pr):
                self._save(core, pr)
            if met:
                self._note_stop(pr)
        bar.close()
        if tb is not None:
            tb.close()
        self.policy.check(final=True)
        if s.optim.ema:
            self._take_average()
        converged = None if s.stop.at_loss is None else pr.stop_at is not None
        if self.d.main:
            if converged is False:
                self._note_unconverged(pr)
            plot_loss(self.metrics_file, self.out / "loss.png", s.name)
        self._set_checkpointing(core, False)
        return StageResult(pr.step, loss_val, time.perf_counter() - t0, pr.tokens, dict(self.policy.skipped),
                           converged)  # fmt: skip

    def _step(self, pr: Progress, data) -> tuple[float | None, int, float | None]:
        """One optimiser step over ``grad_accum`` micro-batches (``mix: batch``: ``grad_accum``
        rounds of one batch per source): (mean loss, tokens, grad norm). With ``mix: batch`` the
        loss is the sum over the sources of loss_weight x the source's loss, as the gradient."""
        s = self.stage
        autocast = precision_autocast(s.precision, self.d.device)
        losses, ntok, cells = [], 0, 0
        by_source: dict[int, list[float]] = {}
        for _ in range(self.micro_per_step):
            pr.epoch, pr.micro, batch = next(data)
            pr.micro += 1
            for bad in batch["bad"]:
                self.policy.bad(bad)
            for _ in batch["ids"]:
                self.policy.ok()
            if not batch["ids"]:
                if self.d.world > 1:  # every process runs the step's collectives: a stand-in forward
                    self._stand_in_step(autocast, pr)  # and backward with no gradient
                continue
            if self.d.world > 1:  # kept for a stand-in step (``_stand_in_step``); alone, nothing needs it
                self._last_batch = batch
            with autocast:
                loss, _ = self.model(batch)
            if not torch.isfinite(loss):
                raise NonFiniteError(
                    f"stage {s.name}, step {pr.step}: loss is {loss.item()} (batch {batch['ids'][:4]}...); "
                    f"the last good checkpoint is kept in {self.ckpt_dir}; lower the LR or use fp32"
                )
            w = 1.0
            if self.joint:
                w = self.loss_weights[batch["source"]]
                by_source.setdefault(batch["source"], []).append(loss.item())
            (loss * w / s.optim.grad_accum).backward()
            losses.append(loss.item())
            ntok += int(batch["attention_mask"].sum())  # real tokens (packed or padded rows)
            cells += batch["attention_mask"].numel()
        self._padding = 1 - ntok / max(cells, 1)
        k_src = self.sampler.num_sources if self.joint else 0  # per source: its losses' sum and count
        per = [x for k in range(k_src) for x in (sum(by_source.get(k, [])), len(by_source.get(k, [])))]
        # every process's micro-batches
        total, count, *per = all_sum([sum(losses), len(losses), *per], self.d)
        if count == 0:  # every sample of the step was bad (within the budget), on every process:
            self.opt.zero_grad(set_to_none=True)  # no update, and no loss of 0.0 for the stop rule
            return None, 0, None
        if self.joint:  # the step's loss: sum over the sources of loss_weight x the source's mean loss
            means = {k: per[2 * k] / per[2 * k + 1] for k in range(k_src) if per[2 * k + 1]}
            self._source_loss = {self.dataset.names[k]: m for k, m in means.items()}
            total, count = sum(self.loss_weights[k] * m for k, m in means.items()), 1
        if self.masters is not None:
            self.masters.grads_to_masters()
        self._check_grads(pr.step)
        gnorm = None
        if s.optim.clip:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self._params(), s.optim.clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if s.optim.ema:
            self._average()
        if self.masters is not None:
            self.masters.masters_to_model()
        return total / count, ntok, gnorm

    def _params(self) -> list[torch.Tensor]:
        """What the optimiser steps: the trainable parameters (bf16-pure: their fp32 masters)."""
        return [p for g in self.opt.param_groups for p in g["params"]]

    @torch.no_grad()
    def _average(self) -> None:
        """``optim.ema``: each parameter's average (fp32, in the optimiser's state, so checkpoints
        carry it) moves toward the weights just stepped; the first step's weights begin it. A
        parameter AdamW has not stepped yet (no gradient so far) has none: its weights are their
        own average, and its state stays empty for AdamW to begin."""
        state, new, avgs, cur = self.opt.state, [], [], []
        for p in self._params():
            if not state.get(p):
                continue
            a = state[p].get(st.AVERAGE)
            if a is None:
                new.append(p)
            else:
                avgs.append(a)
                cur.append(p.detach().float())  # (the tensor itself where it is fp32)
        for p in new:
            state[p][st.AVERAGE] = p.detach().float().clone()
        if avgs and _plain(avgs + cur):
            torch._foreach_lerp_(avgs, cur, 1.0 - self.stage.optim.ema)
        else:  # DTensor shards (FSDP): one at a time
            for a, c in zip(avgs, cur, strict=True):
                a.lerp_(c, 1.0 - self.stage.optim.ema)

    @torch.no_grad()
    def _take_average(self) -> None:
        """The stage's model becomes its weights' average (bf16-pure: the fp32 masters do, which
        the stage then saves)."""
        params = [p for p in self._params() if st.AVERAGE in self.opt.state.get(p, {})]
        for p in params:
            p.copy_(self.opt.state[p][st.AVERAGE])
        if self.masters is not None:
            self.masters.masters_to_model()
        if params and self.d.main:
            log.info("stage %s: the model is the average of its weights (ema %s)", self.stage.name,
                     self.stage.optim.ema)  # fmt: skip

    def _stand_in_step(self, autocast, pr: Progress) -> None:
        """Under DDP / FSDP, for a micro-batch whose rows on this process are all bad: the last
        usable batch through the model with its loss times 0, so this process joins the
        collectives of the forward and backward (its gradient for that micro-batch is zero)."""
        last = getattr(self, "_last_batch", None)
        for j in range(len(self.dataset)) if last is None else ():  # none yet: the first usable sample
            batch = self.collator([self.dataset[j]])
            if batch["ids"]:
                last = self._last_batch = batch
                break
        if last is None:
            raise ValueError(f"stage {self.stage.name}: no usable sample in its data (skipped so far: "
                             f"{dict(self.policy.skipped)})")  # fmt: skip
        with autocast:
            loss, _ = self.model(last)
        (loss * 0.0).backward()

    def _log(self, rec: dict, tb, bar) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if tb is not None:
            for k in ("loss", "lr", "grad_norm", "tok_per_s"):
                if rec[k] is not None:
                    tb.add_scalar(f"{self.stage.name}/{k}", rec[k], rec["step"])
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:.0f}")
        bar.update(1)

    def _note(self, pr: Progress, key: str, msg: str, level: int = logging.INFO) -> None:
        """A line in the log and a ``{key: msg}`` record in metrics.jsonl (main rank only)."""
        if self.d.main:
            log.log(level, msg)
            with self.metrics_file.open("a") as fh:
                fh.write(json.dumps({"stage": self.stage.name, "step": pr.step, key: msg}) + "\n")

    def _note_stop(self, pr: Progress) -> None:
        stop = self.stage.stop
        self._note(pr, "stopped", f"stage {self.stage.name}: mean loss of the last {stop.window} steps "
                   f"{sum(pr.recent) / stop.window:.4f} <= stop.at_loss {stop.at_loss} at step {pr.step} of "
                   f"{self.total}: stopped at step {pr.step}")  # fmt: skip

    def _note_unconverged(self, pr: Progress) -> None:
        """A stage with a stop rule that ran to its last step without meeting it: said once in the
        log and in metrics.jsonl, since where such a stage ends depends on the run's float rounding."""
        mean = sum(pr.recent) / len(pr.recent) if pr.recent else float("nan")
        msg = (f"stage {self.stage.name}: ended at its last step ({pr.step}) with the mean loss of the last "
               f"{len(pr.recent)} steps {mean:.4f}, above stop.at_loss {self.stage.stop.at_loss}: not learnt")  # fmt: skip
        last = self.metrics_file.read_text().splitlines()[-1:] if self.metrics_file.is_file() else []
        if any(json.loads(x).get("unconverged") for x in last):  # a resume at the end records it once
            log.warning(msg)
        else:
            self._note(pr, "unconverged", msg, logging.WARNING)

    @staticmethod
    def _set_checkpointing(core, on: bool) -> None:
        for name in ("llm", "vision"):
            if getattr(core, name, None) is not None:
                getattr(core, name).gradient_checkpointing = on

    def _learnt(self, recent: deque) -> bool:
        """The stop rule: the mean of the last ``stop.window`` losses is at or below ``stop.at_loss``."""
        stop = self.stage.stop
        return (
            stop.at_loss is not None
            and len(recent) == stop.window
            and sum(recent) / len(recent) <= stop.at_loss
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

    def _save(self, core, pr: Progress) -> None:
        info = pr.info(self.stage.name, self.policy, self._layout())
        if self.stage.optim.ema:  # the optimiser state holds the weights' averages (a sharded load looks)
            info["average"] = self.stage.optim.ema
        path = self.ckpt_dir / f"step-{pr.step:06d}"
        ranks = st.gather_rank_rng()  # collective: each rank's generator (its dropout masks go on from it)
        if st.is_sharded(core):  # FSDP: every rank writes its shards (collective)
            st.save_training_state_sharded(path, core, self.opt, info, self.d.main, ranks)
        elif self.d.main:
            st.save_training_state(path, core, self.opt, info, ranks, self.masters)
        if self.d.main:
            st.prune(self.ckpt_dir, self.stage.checkpoints.keep_last)
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
