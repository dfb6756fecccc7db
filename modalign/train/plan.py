"""``modalign train RECIPE --plan [--gpus N]``: per stage, trainable/frozen parameters, memory per
GPU for the recipe's strategy and precision, and an estimate of the time per step and per stage,
split over the parts that run (vision tower, connector, LLM), computed on the meta device (no
weights are read or allocated).

Which parts run is the stage objective's (its ``module(model, stage)``): ``lm`` runs the tower,
the connector and the LLM, in that order; ``qformer`` (BLIP-2 stage 1) the tower and the Q-Former,
never the LLM; ``contrastive`` the tower and, side by side, the LLM over the caption (a frozen
LLM's caption embeddings are cached before training unless the recipe's strategy is FSDP: then it
costs nothing per step). Gradients flow through a part that trains and through every part after
one that trains in that order (``contrastive``: each branch alone).

Per sample, at the longest sequences (an upper bound):
    images     qformer, contrastive: 1; lm: the mean number per sample of the stage's data files,
               weighted as the mixture draws, where they can be read; else 1 (a text-only source
               is then costed as if each of its samples had an image). 0 without a tower.
    positions  a tower's rows per image: patches + the class token where the config has one (an
               HD layout: its global view and one tile, the fewest it runs).
    tokens     the LLM's rows: lm, max_length (the stage's, or the largest of its sources'), plus,
               where the splice expands one placeholder per image (``placeholder: per_image``),
               each image's visual tokens less that placeholder (``per_token`` placeholders are
               inside max_length); contrastive, the caption: max_length.

Forward FLOPs per sample (matrix products only: attention scores, norms and activation functions
are left out):
    tower      2 x the tower's parameters that run (its layers up to the feature layer it hands
               on; every layer under contrastive) x positions x images
    connector  2 x (weight + bias) of each of its linear layers x the rows that layer reads,
               counted by running the connector on the meta device over one image's features,
               x images. An MLP projector reads every patch; a query connector's layers read its
               queries, the keys and values of its cross-attention the patches (abstractor,
               resampler: patches and queries). The Q-Former under ``qformer`` runs its losses'
               passes with a max_length caption: itc the queries, and the text alone; itm three
               [queries; text] pairs (the pair and two hard negatives); itg [queries; text] and
               its vocabulary head.
    LLM        2 x its parameters less the input embedding table and learned positions (lookups)
               x tokens; the LM head counts where it runs (lm: every token, though it runs only
               at supervised ones; contrastive: none). Every parameter counts per token, the
               modality-routed ones (MAM, Partial LoRA) and cross-attention blocks included; an
               encoder-decoder LLM as if every token passed both stacks.
Backward, per part: the forward FLOPs again (input gradients) where gradients flow through it,
plus 2 per trainable parameter per row it reads (weight gradients); with gradient checkpointing
the tower's and the LLM's forward once more where they keep activations. Within the connector,
gradients flow through its linear layers from the first one that trains, in the order they run
(all of them where the tower trains): a frozen Q-Former under a trained projection (MiniGPT-4)
costs its forward alone. A step is batch x grad_accum samples per GPU (``mix: batch``: one
micro-batch of each source, each its own batch size and max_length) at ``mfu`` of
``gpu_tflops``. A frozen tower's feature cache (lm, not under FSDP, 256 MiB by default: a small
share of a full-scale data set) is not counted.

Memory per GPU (bytes per parameter; FSDP divides every term but activations by the GPU count):

    precision   weights                       gradients        optimiser (AdamW)
    fp32        4 x all                       4 x trainable    8 x trainable
    bf16        4 x all (autocast)            4 x trainable    8 x trainable
    bf16-pure   2 x all + 4 x trainable       2 x trainable    8 x trainable
                (fp32 master copies; under FSDP the shards are the fp32 masters: 4 x all)
    with ``optim.ema`` the optimiser holds 4 x trainable more (the weights' fp32 average)

Activations, kept only by the parts gradients flow through (a frozen tower that feeds the rest
keeps none; an LLM the objective does not run none), in bf16 (fp32: twice), per micro-batch
(``mix: batch``: the largest):
    LLM        batch x tokens x hidden x layers x 34 bytes, or batch x tokens x hidden x
               (2 x layers + 34) with gradient checkpointing
    tower      batch x images x positions x hidden x layers that run x 34 bytes, or
               x (2 x layers + 34) with gradient checkpointing
    connector  batch x images x 2 bytes x (in + out features) per row of each linear layer
               gradients flow through (rows as counted for the FLOPs; about the 34 x hidden bytes
               per row of a transformer layer)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from modalign.checkpoints.io import CheckpointError
from modalign.models.mllm import MLLM
from modalign.train import objectives
from modalign.train.freeze import apply_trainable
from modalign.train.recipe import Recipe

FLOW = ("vision", "connector", "llm")  # the order data flows through the parts (objective lm)


def _config(recipe: Recipe) -> tuple:
    """(config, note): part shapes from the init checkpoints where they exist, else the preset's."""
    try:
        return recipe.model.build_config(), None
    except CheckpointError as e:
        return recipe.model.build_config(read_init=False), f"part shapes from the preset ({e})"


class _Files:
    """The data files a plan reads (each once): their samples, or None where a file is missing."""

    def __init__(self, read: bool):
        self.read, self._memo = read, {}

    def samples(self, path: str) -> list | None:
        if not self.read or not Path(path).is_file():
            return None
        if path not in self._memo:
            from modalign.data.datasets import load_samples

            self._memo[path] = load_samples(Path(path))
        return self._memo[path]

    def images_per_sample(self, path: str) -> float | None:
        """Mean images per sample of a file (rejected records left out); None where it is missing."""
        samples = self.samples(path)
        if samples is None:
            return None
        good = [s for s in samples if not isinstance(s, Exception)]
        return sum(len(getattr(s, "images", ())) for s in good) / max(len(good), 1)


def _micro_per_epoch(stage, files: _Files, gpus: int) -> int | None:
    """The micro-batches of an epoch over every GPU (``mix: batch``: rounds of one batch per
    source, as many as the largest source needs); None where a data file is missing."""
    data = stage.data
    sizes = []
    for src in data.sources:
        samples = files.samples(src.path)
        if samples is None:
            return None
        sizes.append(len(samples))
    if data.mix == "batch":
        return max(
            math.ceil(n / ((s.batch_size or data.batch_size) * gpus))
            for n, s in zip(sizes, data.sources, strict=True)
        )
    return math.ceil((data.samples if data.samples is not None else sum(sizes)) / (data.batch_size * gpus))


@dataclass
class _Batch:
    """One micro-batch of a step: its samples per GPU, token limit and mean images per sample."""

    size: int
    max_length: int
    images: float


def _batches(stage, files: _Files, per_file: bool) -> list[_Batch]:
    """A step's micro-batches before accumulation (``mix: batch``: one per source); ``per_file``:
    images per sample read from the files (the lm objective), else 1."""
    data = stage.data

    def images(srcs) -> float:
        if not per_file:
            return 1.0
        each = [files.images_per_sample(s.path) for s in srcs]
        if any(x is None for x in each):
            return 1.0
        weights = [s.weight for s in srcs]
        return sum(w * x for w, x in zip(weights, each, strict=True)) / max(sum(weights), 1e-12)

    def length(src) -> int:
        return src.max_length or data.max_length

    if data.mix == "batch":
        return [_Batch(s.batch_size or data.batch_size, length(s), images([s])) for s in data.sources]
    return [_Batch(data.batch_size, max(length(s) for s in data.sources), images(data.sources))]


def _count(params, skip: set[int] = frozenset()) -> tuple[int, int]:
    """(all, trainable) elements of ``params`` (each tensor once) but those whose id is in ``skip``."""
    seen, total, trainable = set(), 0, 0
    for p in params:
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def _per_layer(layers: int, checkpointing: bool) -> int:
    """Activation bytes per row per hidden unit of ``layers`` transformer layers (16-bit)."""
    return 2 * layers + 34 if checkpointing else 34 * layers


@dataclass
class _Part:
    """One part's work per sample: forward FLOPs, weight-gradient FLOPs, input-gradient FLOPs and
    activation bytes (16-bit) where gradients flow through it, and the forward it runs again in
    the backward (gradient checkpointing)."""

    flops: float = 0.0
    weight_flops: float = 0.0
    grad_flops: float = 0.0
    act: float = 0.0
    recompute: float = 0.0

    def scaled(self, k: float) -> _Part:
        return _Part(*(k * x for x in dataclasses.astuple(self)))

    @property
    def step_flops(self) -> float:
        return self.flops + self.weight_flops + self.grad_flops + self.recompute


def _linear_work(module: nn.Module, run, fed: bool) -> _Part:
    """The work of ``module``'s linear layers while ``run()`` runs on the meta device, per call: 2 x
    (weight + bias) x rows forward, 2 x the trainable ones x rows for their gradients, and, where
    gradients flow through the layer (``fed``: they come back from a part after it that trains;
    else from the first layer, in the order they run, that trains on), the forward again and 2 bytes
    x (in + out features) x rows kept. The Q-Former's vocabulary head, a product with the word
    embeddings, counts as a linear layer."""
    from modalign.models.qformer import QFormerLMHead

    acc = dict.fromkeys(("flops", "weight_flops", "grad_flops", "act"), 0.0)
    through = [fed]

    def add(rows: int, weights: list[torch.Tensor], d_in: int, d_out: int) -> None:
        f = 2 * rows * sum(w.numel() for w in weights)
        trained = sum(w.numel() for w in weights if w.requires_grad)
        through[0] = through[0] or trained > 0
        acc["flops"] += f
        acc["weight_flops"] += 2 * rows * trained
        if through[0]:
            acc["grad_flops"] += f
            acc["act"] += 2 * rows * (d_in + d_out)

    def on_linear(m, args, out):
        x = args[0]
        add(x.numel() // x.shape[-1], [p for p in (m.weight, m.bias) if p is not None], m.in_features,
            m.out_features)  # fmt: skip

    def on_vocab_head(m, args, out):
        h, table = args[0], args[1]
        add(h.numel() // h.shape[-1], [table, m.bias], table.shape[1], table.shape[0])

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(on_linear))
        elif isinstance(m, QFormerLMHead):
            hooks.append(m.register_forward_hook(on_vocab_head))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return _Part(**acc)


def _connector_work(model: MLLM, target, stage, n_features: int, max_length: int, fed: bool) -> _Part:
    """``_linear_work`` of the connector over one image (see the module docstring); a text it reads
    (a Q-Former's caption or instruction) is ``max_length`` tokens, framed, within its positions."""
    c, cfg = model.connector, model.config
    meta = torch.device("meta")
    feats = torch.zeros(1, n_features, cfg.vision.feature_dim, device=meta)
    text = min(max_length, max(cfg.connector.text_max_positions - 2, 0)) + 2

    def ids(n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.zeros(n, text, dtype=torch.long, device=meta)
        return t, torch.ones_like(t)

    if stage.objective.name == "qformer":  # BLIP-2 stage 1: the passes of its losses
        w = target.weights

        def run():
            if w["itc"] or w["itm"]:
                c.itc_similarity(feats, *ids())
            if w["itm"]:  # the pair and, per image and per text, a hard negative
                c.itm_logits(feats.expand(3, -1, -1), *ids(3))
            if w["itg"]:
                c.itg_logits(feats, *ids())

    elif getattr(c, "instruction_input", False):  # InstructBLIP: the instruction enters the Q-Former

        def run():
            t, m = ids()
            c(feats, qformer_input_ids=t, qformer_attention_mask=m)

    else:

        def run():
            c(feats)

    return _linear_work(c, run, fed)


def _upstream(objective: str, parts: list[str]) -> dict[str, list[str]]:
    """The parts each part reads from, in the objective's data flow."""
    if objective == "contrastive":  # the tower and the LLM side by side
        return {p: [] for p in parts}
    return {p: parts[:i] for i, p in enumerate(parts)}


def _parts(model: MLLM, target, stage, batch: _Batch, strategy: str) -> dict[str, _Part]:
    """What each part the objective runs costs per sample of ``batch``."""
    cfg, obj = model.config, stage.objective.name
    ckpt = stage.gradient_checkpointing
    held = [p for p in FLOW if getattr(target, p, None) is not None]
    trains = {p: any(x.requires_grad for x in getattr(model, p).parameters()) for p in held}
    up = _upstream(obj, held)
    fed = {p: any(trains[u] for u in up[p]) for p in held}  # gradients come back through it
    images = batch.images if cfg.vision is not None else 0.0

    def part(n: int, t: int, rows: float, act_per_row: float, name: str) -> _Part:
        """A part whose every parameter acts on each of its ``rows`` (tower, LLM)."""
        through = trains[name] or fed[name]
        f = 2 * n * rows
        return _Part(f, 2 * t * rows, f if through else 0.0, rows * act_per_row if through else 0.0,
                     f if through and ckpt else 0.0)  # fmt: skip

    out = {}
    if "vision" in held:
        v = model.vision
        upto = cfg.vision.num_layers if obj == "contrastive" else max(v._layer_indices())
        skip = {id(p) for layer in v.encoder.layers[upto:] for p in layer.parameters()}
        n, t = _count(v.parameters(), skip)
        rows = cfg.vision.num_positions * (2 if cfg.vision.hd_layout else 1) * images
        out["vision"] = part(n, t, rows, cfg.vision.hidden_size * _per_layer(upto, ckpt), "vision")
    if "connector" in held:
        n_in = model.vision.hd_num_tokens(1, 1) if cfg.vision.hd_layout else cfg.vision.num_features
        work = _connector_work(model, target, stage, n_in, batch.max_length, fed["connector"])
        out["connector"] = work.scaled(images)
    if "llm" in held:
        llm = model.llm
        if obj == "contrastive" and not trains["llm"] and strategy != "fsdp":
            return out  # the caption embeddings are cached before training
        head = obj != "contrastive"  # contrastive reads the last hidden states
        lookups = {id(p) for p in llm.embed_tokens.parameters()}
        lookups |= {id(p) for p in getattr(llm, "embed_positions", nn.Identity()).parameters()}
        heads = {id(p) for p in llm.lm_head.parameters()}  # a tied head is the embedding table
        n, t = _count(llm.parameters(), lookups - heads if head else lookups | heads)
        tokens = batch.max_length
        if obj == "lm" and cfg.vision is not None and cfg.placeholder == "per_image":
            tokens += images * (model.num_image_tokens() - 1)
        out["llm"] = part(n, t, tokens, cfg.llm.hidden_size * _per_layer(cfg.llm.num_layers, ckpt), "llm")
    return out


def plan(recipe: Recipe, gpus: int = 1, gpu_tflops: float = 312.0, mfu: float = 0.4,
         count_samples: bool = True) -> list[dict]:  # fmt: skip
    """One row per stage (see the module docstring for the estimates)."""
    from modalign.train.run import enable_parts

    cfg, note = _config(recipe)
    with torch.device("meta"):
        model = MLLM(cfg)
        enable_parts(model, recipe.model.enable)
    fsdp = recipe.parallel.strategy == "fsdp" and gpus > 1
    files = _Files(count_samples)
    rows = []
    for stage in recipe.stages:
        with torch.device("meta"):
            enable_parts(model, stage.enable)
            target = objectives.get(stage.objective.name).module(model, stage)
        table = apply_trainable(target, stage.trainable)
        trainable = sum(r.trainable for r in table)
        total = trainable + sum(r.frozen for r in table)
        if stage.precision == "bf16-pure":
            weights = total * 4 if fsdp else total * 2 + trainable * 4
            grads = trainable * (4 if fsdp else 2)
        else:
            weights, grads = total * 4, trainable * 4
        shard = gpus if fsdp else 1
        accum = stage.optim.grad_accum
        flops = dict.fromkeys(FLOW, 0.0)
        acts, act = dict.fromkeys(FLOW, 0.0), 0.0
        images = tokens = 0.0
        for b in _batches(stage, files, per_file=stage.objective.name == "lm" and cfg.vision is not None):
            scale = 2 if stage.precision == "fp32" else 1  # the activation bytes are 16-bit ones
            micro = {}
            for name, p in _parts(model, target, stage, b, recipe.parallel.strategy).items():
                flops[name] += p.step_flops * b.size * accum
                micro[name] = p.act * b.size * scale
            if sum(micro.values()) >= act:  # the largest micro-batch sets the peak
                act, acts = sum(micro.values()), {**dict.fromkeys(FLOW, 0.0), **micro}
            images += (b.images if cfg.vision is not None else 0.0) * b.size * accum
            tokens += b.size * accum * b.max_length
        moments = 12 if stage.optim.ema else 8  # AdamW's two moments (and the weights' fp32 average)
        mem = {"weights": weights / shard, "gradients": grads / shard, "optimizer": trainable * moments / shard,
               "activations_estimate": act}  # fmt: skip
        step_s = sum(flops.values()) / (gpu_tflops * 1e12 * mfu)
        steps = stage.stop.max_steps
        if steps is None and count_samples:
            micro = _micro_per_epoch(stage, files, gpus)
            if micro is not None:
                steps = math.ceil(stage.stop.epochs * micro / accum)
        rows.append({"stage": stage.name, "trainable": trainable, "frozen": total - trainable, "groups": table,
                     "gpus": gpus, "strategy": recipe.parallel.strategy if gpus > 1 else "none",
                     "precision": stage.precision, "memory_bytes": mem, "activations_bytes": acts,
                     "memory_total_gib": sum(mem.values()) / 2**30, "tokens_per_step_max": int(tokens) * gpus,
                     "images_per_step": images * gpus, "flops_per_step": flops, "seconds_per_step": step_s,
                     "steps": steps, "hours": None if steps is None else steps * step_s / 3600,
                     "objective": stage.objective.name, "note": note})  # fmt: skip
    return rows


def format_plan(recipe: Recipe, rows: list[dict], gpu_tflops: float = 312.0, mfu: float = 0.4) -> str:
    from modalign.train.freeze import format_table

    out = [f"recipe {recipe.name}: {recipe.description}".rstrip(": ")]
    if rows and rows[0]["note"]:
        out.append(f"note: {rows[0]['note']}")
    for r in rows:
        m = r["memory_bytes"]
        out.append(f"\nstage {r['stage']} ({r['objective']}, {r['precision']}): trainable {r['trainable']:,}, "
                   f"frozen {r['frozen']:,}")  # fmt: skip
        out.append(format_table(r["groups"]))
        out.append(f"memory per GPU ({r['gpus']} GPU(s), {r['strategy']}), GiB: "
                   + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in m.items())
                   + f"; total ~{r['memory_total_gib']:.2f}")  # fmt: skip
        f = r["flops_per_step"]
        unit, div = ("TFLOP", 1e12) if sum(f.values()) >= 1e12 else ("GFLOP", 1e9)
        out.append(f"{unit} per GPU per step (forward + backward): "
                   + ", ".join(f"{k} {v / div:,.1f}" for k, v in f.items())
                   + f"; total {sum(f.values()) / div:,.1f}")  # fmt: skip
        steps = "steps unknown (data not found)" if r["steps"] is None else (
            f"{r['steps']:,} steps ~{r['hours']:.1f} h")  # fmt: skip
        out.append(f"tokens per optimiser step (at most): {r['tokens_per_step_max']:,}; images "
                   f"{r['images_per_step']:,.0f}; ~{r['seconds_per_step']:.2f} s/step at {mfu:.0%} of "
                   f"{gpu_tflops:g} TFLOP/s per GPU; {steps}")  # fmt: skip
    return "\n".join(out)
