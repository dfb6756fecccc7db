"""Training: recipes validate and plan on the meta device, frozen parameters stay bit-identical,
a SIGKILLed run resumes to the same losses (also DDP with 2 gloo processes), NaN stops cleanly."""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from modalign import MLLM
from modalign.checkpoints import CheckpointError
from modalign.config import ConfigError
from modalign.data.datasets import load_samples
from modalign.data.tokenizer import Tokenizer
from modalign.shapesworld import RECIPES as TINY_RECIPES
from modalign.train.plan import plan
from modalign.train.recipe import RECIPES_DIR, load_recipe
from modalign.train.run import run_recipe, setup_stage
from modalign.train.state import checkpoints
from tests.tiny import recipe_doc

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SHIPPED = sorted([*RECIPES_DIR.glob("*.yaml"), *TINY_RECIPES.glob("*.yaml")])


@pytest.fixture
def data(world):
    return world


def losses(run: Path) -> list[tuple]:
    out = []
    for stage in ("align", "instruct"):
        for line in (run / stage / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "loss" in r:
                out.append((stage, r["step"], r["loss"]))
    return out


# ------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates_and_plans_on_meta(path):
    names = ("data", "stage0", "llm", "vision", "blip2", "qformer", "bert")
    recipe = load_recipe(path, {n: n for n in names})
    rows = plan(recipe)
    assert len(rows) == len(recipe.stages)
    for r in rows:
        assert r["trainable"] > 0 and r["memory_total_gib"] > 0


RECIPE_ERRORS = [
    ("stages.instruct.optim.lr=fast", r"recipe\.stages\[1\]\.optim\.lr: expected a number"),
    ("stages.0.stop.epochs=1", r"stages\[0\]\.stop: give exactly one of max_steps and epochs"),
    ("stages.instruct.data.token_cache_mb=-1", r"recipe\.stages\[1\]\.data\.token_cache_mb: expected a size in MiB >= 0"),
    ('stages.align.optim.lr_groups={"connector.*": fast}', r"stages\[0\]\.optim\.lr_groups\['connector\.\*'\]: expected a number"),
    ("stages.instruct.optim.dropout=1", r"recipe\.stages\[1\]\.optim\.dropout: expected a probability in \[0, 1\)"),
    # a value YAML cannot parse names the key and the value, and says how to quote it
    ("stages.align.data.sources=[{path: ${data}/x.json}]", r"--set stages\.align\.data\.sources: value .* is not valid YAML \(quote"),
    # objectives: a known name, and only their own options
    ("stages.align.objective=clip", r"stages\[0\]\.objective\.name: expected one of lm, contrastive"),
    ("stages.align.objective={name: lm, region: {weight: 1}}", r"stages\[0\]\.objective\.region: not an option of the lm objective"),
    ("stages.align.objective={name: lm, answer_prior: {min_count: 0}}", r"stages\[0\]\.objective\.answer_prior\.min_count: expected a sample count >= 1"),
    ("stages.align.objective={name: contrastive, answer_prior: {weight: 1}}", r"stages\[0\]\.objective\.answer_prior: not an option of the contrastive"),
    ("stages.align.objective={name: contrastive, region: {phrase: '{colour}'}}", r"stages\[0\]\.objective\.region\.phrase: only \{category\} and \{where\}"),
    ("stages.align.objective={name: contrastive, prefix_lm: true}", r"stages\[0\]\.objective\.prefix_lm: not an option of the contrastive"),
    ("stages.align.objective={name: qformer, qformer: {itc: 0, itm: 0, itg: 0}}", r"stages\[0\]\.objective\.qformer: every loss has weight 0"),
    # values whose range was not checked: gradient ascent, a negative LR, cuts that drop every token
    ("stages.align.optim.clip=-1", r"stages\[0\]\.optim\.clip: expected a gradient norm >= 0"),
    ("stages.align.optim.schedule={min_lr_ratio: -0.1}", r"stages\[0\]\.optim\.schedule\.min_lr_ratio"),
    ("stages.align.data.max_length=0", r"stages\[0\]\.data\.max_length: expected a token count >= 1"),
    ("stages.align.data.samples=-1", r"stages\[0\]\.data\.samples: expected a number of draws >= 1"),
    ("stages.align.data.bad_samples={max_fraction: 5}", r"stages\[0\]\.data\.bad_samples\.max_fraction: expected a fraction in \[0, 1\] \(0\.05 is 5%\)"),
    ("stages.align.stop={max_steps: 0}", r"stages\[0\]\.stop: max_steps must be >= 1"),
    ("stages.align.name=model", r"stages\[0\]\.name: 'model' is not a stage name"),
    ("stages.align.name=../x", r"stages\[0\]\.name: '\.\./x' is not a stage name"),
    # parts a later stage switches on are checked when the recipe is read, not after earlier stages trained
    ("stages.instruct.enable={lora: {rnak: 16}}", r"stages\[1\]\.enable\.lora: unknown key\(s\) rnak"),
    ("stages.instruct.enable={lora: 16}", r"stages\[1\]\.enable\.lora: expected a mapping"),
    ("stages.instruct.enable={lorra: {}}", r"stages\[1\]\.enable: unknown part 'lorra'"),
    ("model.enable={mam: yes please}", r"recipe\.model\.enable\.mam: expected true or false"),
]  # fmt: skip


@pytest.mark.parametrize("override,error", RECIPE_ERRORS, ids=[e[0] for e in RECIPE_ERRORS])
def test_recipe_errors_name_the_key(data, override, error):
    with pytest.raises(ConfigError, match=error):
        load_recipe(recipe_doc(data), sets=[override])


def test_recipe_values_are_checked_and_coerced(data, tmp_path):
    doc = recipe_doc(data)
    del doc["stages"][0]["stop"]
    with pytest.raises(ConfigError, match=r"recipe\.stages\[0\]: missing required key\(s\) stop"):
        load_recipe(doc)
    doc = recipe_doc(data)
    doc["stages"][0]["learning_rate"] = 1
    with pytest.raises(ConfigError, match=r"recipe\.stages\[0\]: unknown key\(s\) learning_rate"):
        load_recipe(doc)
    doc = recipe_doc(data)
    assert load_recipe(doc, sets=["stages.align.optim.lr=3e-4"]).stages[0].optim.lr == 3e-4
    # a mapping's values are checked too: YAML reads 1e-3 (no dot) as a string, which is a number here
    sets = ['stages.align.optim.lr_groups={"connector.*": 1e-3}']
    assert load_recipe(doc, sets=sets).stages[0].optim.lr_groups == {"connector.*": 1e-3}
    sets = ['stages.align.data.sources=[{path: "${data}/x.json"}]']
    assert load_recipe(doc, {"data": "D"}, sets=sets).stages[0].data.sources[0].path == "D/x.json"
    # AdamW's betas: the recipe's reach the optimiser (LLaVA's trainer keeps 0.999)
    from modalign.train.trainer import Trainer

    recipe = load_recipe(doc, sets=["stages.instruct.optim.betas=[0.9, 0.999]"])
    target, dataset, collator, _ = setup_stage(recipe, 1, MLLM(recipe.model.build_config()),
                                               Tokenizer.from_dir(data / "tokenizer"))  # fmt: skip
    t = Trainer(target, recipe.stages[1], dataset, collator, tmp_path / "betas", progress=False)
    assert t.opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert load_recipe(RECIPES_DIR / "llava-1.5.yaml", {n: n for n in ("data", "llm", "vision")}).stages[
        1
    ].optim.betas == [0.9, 0.999]
    with pytest.raises(ConfigError, match=r"stages\[0\]\.optim\.betas: expected two numbers in \[0, 1\)"):
        load_recipe(doc, sets=["stages.align.optim.betas=[0.9]"])


def test_the_recipe_seed_draws_the_mixture(data):
    """A mixture's draws follow the recipe's seed: a source drawn in part gives other samples under
    another seed (every seed drew the same subset before)."""
    doc = recipe_doc(data)
    doc["stages"][1]["data"]["samples"] = 40  # 32 draws of instruct.json (a part of it), 8 of the text chats
    tok = Tokenizer.from_dir(data / "tokenizer")

    def pairs(seed):
        recipe = load_recipe({**doc, "seed": seed})
        _, ds, _, _ = setup_stage(recipe, 1, MLLM(recipe.model.build_config()), tok)
        return ds.pairs

    assert pairs(1) == pairs(1) and len(pairs(1)) == 40
    drawn = [{i for k, i in pairs(seed) if k == 0} for seed in (1, 2)]
    assert drawn[0] != drawn[1]


def test_a_source_balanced_by_a_field_draws_each_group_by_its_size_to_the_alpha(data):
    """``balance: {by: type, alpha: a}`` splits a source by its records' ``type`` into mixture
    sources drawn in proportion to group size ** a: alpha 1 draws every record once (the file's
    proportions, to rounding), alpha 0 every group equally, 0.5 in between; each group holds its type only."""
    types = {r["id"]: r["type"] for r in json.loads((data / "instruct.json").read_text())}
    sizes: dict[str, int] = {}
    for t in types.values():
        sizes[t] = sizes.get(t, 0) + 1
    assert len(sizes) >= 5  # colour, shape, position, exist, count, ... in the test's small data set
    doc = recipe_doc(data)
    tok = Tokenizer.from_dir(data / "tokenizer")

    def draws(alpha):
        src = {"path": str(data / "instruct.json"), "balance": {"by": "type", "alpha": alpha}}
        recipe = load_recipe(doc, sets=[f"stages.instruct.data.sources=[{json.dumps(src)}]"])
        _, ds, _, _ = setup_stage(recipe, 1, MLLM(recipe.model.build_config()), tok)
        names = sorted(sizes)
        assert [sorted({types[s.id] for s in d.samples}) for d in ds.datasets] == [[n] for n in names]
        counts = [0] * len(names)
        for k, _ in ds.pairs:
            counts[k] += 1
        assert sum(counts) == len(types)  # an epoch is still the file's size
        return dict(zip(names, counts, strict=True)), ds

    one = draws(1.0)[0]
    assert all(abs(one[t] - n) <= 1 for t, n in sizes.items())
    equal = draws(0.0)[0]
    assert max(equal.values()) - min(equal.values()) <= 1
    half = draws(0.5)[0]
    norm = sum(math.sqrt(n) for n in sizes.values())
    assert all(abs(half[t] - len(types) * math.sqrt(n) / norm) <= 1 for t, n in sizes.items())
    with pytest.raises(
        ConfigError, match=r"sources\[0\]\.balance: instruct\.json:0: record .* no field 'kind'"
    ):
        src = {"path": str(data / "instruct.json"), "balance": {"by": "kind"}}
        recipe = load_recipe(doc, sets=[f"stages.instruct.data.sources=[{json.dumps(src)}]"])
        setup_stage(recipe, 1, MLLM(recipe.model.build_config()), tok)
    with pytest.raises(ConfigError, match=r"sources\[0\]\.balance\.alpha: expected a finite number >= 0"):
        load_recipe(doc, sets=["stages.instruct.data.sources.0.balance={by: type, alpha: -1}"])
    with pytest.raises(ConfigError, match=r"sources\[0\]\.balance: needs .*mix: sample"):
        load_recipe(doc, sets=["stages.instruct.data.sources.0.balance={by: type}", "stages.instruct.data.mix=batch",
                               "stages.instruct.data.sources.0.weight=1.0"])  # fmt: skip


def test_a_recipe_in_the_flat_layout_says_where_each_key_went(data):
    """Recipes written before the sections existed get an error naming the new place of a key."""
    doc = recipe_doc(data)
    for key, value, where in (("lr", 1e-3, "optim.lr"), ("max_steps", 5, "stop.max_steps"),
                              ("stop_at_loss", 0.1, "stop.at_loss"), ("template", "plain", "data.template"),
                              ("answer_prior", 1.0, "objective.answer_prior.weight"),
                              ("save_every", 10, "checkpoints.every")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"recipe\.stages\[0\]\.{key}: .* use {where}"):
            load_recipe(doc, sets=[f"stages.align.{key}={value}"])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.stop_anneal: this key was removed"):
        load_recipe(doc, sets=["stages.align.stop_anneal=3"])
    doc["stages"][0]["data"] = [{"path": "x.json"}]
    with pytest.raises(ConfigError, match=r"stages\[0\]\.data: a mapping now"):
        load_recipe(doc)


def test_stage_dropout_drops_residual_branches_only_while_its_stage_trains(data, tmp_path):
    """``optim.dropout`` drops every decoder layer's attention and MLP outputs in training mode,
    only during its stage (forward hooks the trainer adds and removes): the model carries no
    dropout setting, in eval mode its outputs are the plain model's, and after the stage no hook
    is left."""
    from modalign.train.trainer import residual_dropout

    recipe = load_recipe(recipe_doc(data, steps=2, save_every=0))
    torch.manual_seed(0)
    model = MLLM(recipe.model.build_config())
    ids = torch.randint(4, 200, (2, 12))
    with torch.no_grad():
        plain_train = model.train()(ids).logits
        with residual_dropout(model.llm, 0.3):
            dropped = model(ids).logits
            evaluated = model.eval()(ids).logits
            torch.manual_seed(5)
            a = model.train()(ids).logits
            torch.manual_seed(5)
            b = model(ids).logits
        after = model(ids).logits
    assert torch.equal(evaluated, plain_train) and not torch.allclose(dropped, plain_train)
    assert torch.equal(a, b)  # the masks come from torch's generator
    assert torch.equal(after, plain_train)
    assert not any(m._forward_hooks for m in model.modules())
    # a stage with dropout: the hooks are there while it trains (one per attention and MLP block)
    seen = []
    import modalign.train.trainer as trainer_mod

    real = trainer_mod.Trainer._run

    def spy(self, resume):
        core = self.model
        seen.append(sum(len(m._forward_hooks) for m in core.modules()))
        return real(self, resume)

    trainer_mod.Trainer._run = spy
    try:
        run_recipe(recipe, tmp_path / "run", progress=False)
    finally:
        trainer_mod.Trainer._run = real
    assert seen == [0, 2 * 2]  # align: none; instruct (dropout 0.1): 2 layers x (attention, MLP)
    assert not any(m._forward_hooks for m in MLLM.from_pretrained(tmp_path / "run" / "model").modules())


# ------------------------------------------------------------------------------ training


def test_each_stage_changes_exactly_its_trainable_parameters(data, tmp_path):
    recipe = load_recipe(recipe_doc(data, steps=3, save_every=0))
    torch.manual_seed(recipe.seed)
    init = MLLM(recipe.model.build_config()).state_dict()
    run_recipe(recipe, tmp_path / "run", progress=False)
    after1 = MLLM.from_pretrained(tmp_path / "run" / "align" / "model").state_dict()
    after2 = MLLM.from_pretrained(tmp_path / "run" / "instruct" / "model").state_dict()
    for name in init:
        assert torch.equal(init[name], after1[name]) != name.startswith("connector."), name
        assert torch.equal(after1[name], after2[name]) == name.startswith("vision."), name
    counts = json.loads((tmp_path / "run" / "align" / "trainable.json").read_text())
    assert counts["trainable"] == sum(v.numel() for k, v in init.items() if k.startswith("connector."))
    assert (tmp_path / "run" / "instruct" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "model" / "tokenizer.json").is_file()


def test_a_stage_with_ema_saves_the_average_of_its_steps_weights(data, tmp_path, monkeypatch, caplog):
    """``optim.ema``: after every optimiser step each trainable weight's fp32 average moves toward
    it (the first step's weights begin it); the stage's model is the average, its frozen parts
    untouched, and the checkpoints carry the averages. A resume from a checkpoint without them
    (saved before the setting) begins them anew, and one without the setting drops them."""
    from modalign.train import trainer as tr
    from modalign.train.state import AVERAGE

    doc = recipe_doc(data, steps=5, save_every=0)
    doc["stages"] = doc["stages"][:1]
    doc["stages"][0]["optim"]["ema"] = 0.6
    stepped = []
    real = tr.Trainer._average

    def spy(self):  # the weights just stepped (bf16-pure: their fp32 masters)
        src = self.masters.named_parameters() if self.masters else self.model.named_parameters()
        stepped.append({n: p.detach().clone() for n, p in src if p.requires_grad})
        real(self)

    def average(sets):
        stepped.clear()
        run_recipe(load_recipe(doc, sets=sets), tmp_path / "_".join(["ema", *sets]), progress=False)
        assert len(stepped) == 5
        want = dict(stepped[0])
        for w in stepped[1:]:
            want = {n: torch.lerp(want[n], w[n], 1 - 0.6) for n in want}
        return want, dict(
            MLLM.from_pretrained(tmp_path / "_".join(["ema", *sets]) / "align" / "model").named_parameters()
        )

    monkeypatch.setattr(tr.Trainer, "_average", spy)
    want, model = average(["stages.align.precision=bf16-pure"])  # the masters' average, in fp32
    assert all(model[n].dtype == torch.float32 and torch.equal(model[n], want[n]) for n in want) and want
    want, model = average([])
    assert all(torch.equal(model[n], want[n]) for n in want) and want
    assert not any(torch.equal(model[n], stepped[-1][n]) for n in want)  # the average, not the last step
    plain = run_recipe(
        load_recipe(doc, sets=["stages.align.optim.ema=0"]), tmp_path / "plain", progress=False
    )
    assert plain["align"].steps == 5
    last = dict(MLLM.from_pretrained(tmp_path / "plain" / "align" / "model").named_parameters())
    assert all(torch.equal(last[n], model[n]) for n in last if n not in want)  # the frozen parts alike
    assert all(torch.equal(last[n], stepped[-1][n]) for n in want)  # without: the last step's weights
    # checkpoints: the averages beside AdamW's moments; a resume goes on with them
    with pytest.raises(ConfigError, match=r"optim\.ema: expected a decay in \[0, 1\)"):
        load_recipe(doc, sets=["stages.align.optim.ema=1"])
    saved = recipe_doc(data, steps=5, save_every=2)
    saved["stages"] = saved["stages"][:1]
    saved["stages"][0]["optim"]["ema"] = 0.6
    run_recipe(load_recipe(saved), tmp_path / "saved", progress=False)
    ckpt = checkpoints(tmp_path / "saved" / "align" / "checkpoints")[-1]
    opt_keys = list(load_file(ckpt / "optimizer.safetensors"))
    assert sum(k.endswith(f"/{AVERAGE}") for k in opt_keys) == len(want)
    assert json.loads((ckpt / "state.json").read_text())["info"]["average"] == 0.6
    run = tmp_path / "saved" / "align"
    assert all(torch.equal(MLLM.from_pretrained(run / "model").state_dict()[n], want[n]) for n in want)

    def resume(sets):  # from step 4's checkpoint: the fifth step again
        shutil.rmtree(run / "model")
        (run / "result.json").unlink()
        shutil.rmtree(checkpoints(run / "checkpoints")[-1])
        stepped.clear()
        run_recipe(load_recipe(saved, sets=sets), tmp_path / "saved", progress=False)
        return MLLM.from_pretrained(run / "model").state_dict()

    assert [p.name for p in checkpoints(run / "checkpoints")] == ["step-000004", "step-000005"]
    after = resume([])
    assert len(stepped) == 1 and all(torch.equal(after[n], want[n]) for n in want)  # exactly as unbroken
    after = resume(["stages.align.optim.ema=0"])  # averages dropped: the fifth step's weights
    assert not stepped and all(torch.equal(after[n], last[n]) for n in want)
    ckpt = checkpoints(run / "checkpoints")[-1]
    assert not any(k.endswith(f"/{AVERAGE}") for k in load_file(ckpt / "optimizer.safetensors"))
    # that checkpoint (no averages) resumed with the setting: said in the log, the average begins anew
    shutil.rmtree(run / "model")
    (run / "result.json").unlink()
    shutil.rmtree(checkpoints(run / "checkpoints")[0])
    with caplog.at_level(logging.WARNING, logger="modalign"):
        run_recipe(load_recipe(saved), tmp_path / "saved", progress=False)
    assert "step-000005 holds no average of the weights" in caplog.text
    after = MLLM.from_pretrained(run / "model").state_dict()
    assert not stepped and all(torch.equal(after[n], last[n]) for n in want)


def test_ema_leaves_a_parameter_adamw_has_not_stepped_to_adamw():
    """A trainable parameter without a gradient so far (a part the loss has not reached) gets no
    average and no optimiser state: AdamW begins its moments at its first gradient, and the average
    begins then too."""
    from types import SimpleNamespace

    from modalign.train import trainer as tr
    from modalign.train.state import AVERAGE

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([a, b], lr=0.1)
    t = SimpleNamespace(opt=opt, stage=SimpleNamespace(optim=SimpleNamespace(ema=0.5)))
    t._params = lambda: tr.Trainer._params(t)
    a.sum().backward()
    opt.step()
    tr.Trainer._average(t)
    assert torch.equal(opt.state[a][AVERAGE], a.detach()) and not opt.state.get(b)
    first = a.detach().clone()
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()  # b's first step
    tr.Trainer._average(t)
    assert torch.equal(opt.state[b][AVERAGE], b.detach()) and int(opt.state[b]["step"]) == 1
    assert torch.equal(opt.state[a][AVERAGE], torch.lerp(first, a.detach(), 0.5))


def test_a_frozen_vision_tower_runs_once_per_image(data, tmp_path, monkeypatch):
    """With the tower frozen (both stages here), its output per image file is computed before the
    first stage, once, in file order (``feature_cache_mb``), and the second stage, whose tower is the
    same, reuses it; training then never calls it, and logs the losses of a run that calls it on
    every batch (the sigkill test checks exact resume with it)."""
    from modalign.data.images import ImageProcessor
    from modalign.models.vision import VisionTower
    from modalign.train.feature_cache import FeatureCache

    calls, hits, reads = [], [], []
    forward, cache_call, load = VisionTower.forward, FeatureCache.__call__, ImageProcessor.load
    monkeypatch.setattr(
        ImageProcessor, "load", lambda self, src, *a: reads.append(src) or load(self, src, *a)
    )
    monkeypatch.setattr(
        VisionTower, "forward", lambda self, px, *a, **k: calls.append(len(px)) or forward(self, px, *a, **k)
    )
    monkeypatch.setattr(FeatureCache, "__call__",
                        lambda self, t, px, ks: (cache_call(self, t, px, ks), hits.append(self.hits))[0])  # fmt: skip
    runs = {}
    for mb in (256, 0):
        calls.clear(), reads.clear()
        sets = [f"stages.{st}.data.feature_cache_mb={mb}" for st in ("align", "instruct")]
        run_recipe(
            load_recipe(recipe_doc(data, steps=4, save_every=0), sets=sets),
            tmp_path / str(mb),
            progress=False,
        )
        runs[mb] = (losses(tmp_path / str(mb)), list(calls))
        if mb:  # each image is read once, for the cache; training does not read what it holds
            assert (
                len(reads)
                == len(set(reads))
                == len({s.images[0] for s in load_samples(data / "captions.json")})
            )
    (cached, cached_calls), (plain, plain_calls) = runs[256], runs[0]
    assert [x[:2] for x in cached] == [x[:2] for x in plain]
    assert [x[2] for x in cached] == pytest.approx([x[2] for x in plain], rel=1e-4)
    n_images = len({s.images[0] for s in load_samples(data / "captions.json")})
    assert cached_calls == [n_images]  # one pass in all (48 images: one chunk of 64)
    assert len(hits) == len(plain_calls) >= 5 and hits[-1] == sum(plain_calls)  # one cache, both stages


def test_feature_cache_holds_what_fits_and_encodes_the_rest_with_the_batch():
    from modalign import MLLMConfig
    from modalign.train.feature_cache import FeatureCache

    torch.manual_seed(0)
    model = MLLM(MLLMConfig.from_name("tiny-shapes")).eval()
    px = torch.randn(5, 3, 96, 96)
    with torch.no_grad():
        want = model.vision(px)
    one = want[0].numel() * 4  # bytes of one image's features
    cache = FeatureCache.for_tower(model.vision, 2.5 * one / 2**20)
    assert cache.fill(model.vision, [(f"f{i}", px[i]) for i in (0, 1, 0, 2, 3)], batch_size=2) == 2
    assert cache.bytes == 2 * one
    # held keys come from the cache (f1 named on image 0 gives image 1's features), the rest are encoded
    got = cache(model.vision, px, ["f1", "f0", None, "f3", "f4"])
    assert (cache.hits, cache.misses) == (2, 3)
    torch.testing.assert_close(got, want[[1, 0, 2, 3, 4]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 keys for 5 images"):
        cache(model.vision, px, ["f0", "f1"])
    # the model takes the features through its explicit argument: the same visual tokens
    tokens = model.encode_images(image_features=got)
    torch.testing.assert_close(tokens, model.connector(want[[1, 0, 2, 3, 4]]), rtol=1e-5, atol=1e-5)
    # a later stage keeps the cache only for the same tower (weights, buffers, config) and limit
    mb = 2.5 * one / 2**20
    assert FeatureCache.for_tower(model.vision, mb, reuse=cache) is cache
    assert FeatureCache.for_tower(model.vision, 2 * mb, reuse=cache) is not cache
    with torch.no_grad():
        model.vision.encoder.layers[0].mlp.fc1.weight[0, 0] += 1e-3
    fresh = FeatureCache.for_tower(model.vision, mb, reuse=cache)
    assert fresh is not cache and len(fresh) == 0 and fresh.fingerprint != cache.fingerprint


def test_stop_at_loss_ends_a_learnt_stage_and_stays_ended_on_resume(data, tmp_path):
    doc = recipe_doc(data, steps=6, save_every=0)
    doc["stages"] = doc["stages"][:1]
    run = tmp_path / "met"
    res = run_recipe(load_recipe(doc, sets=["stages.align.stop.at_loss=100", "stages.align.stop.window=3"]), run,
                     progress=False)  # fmt: skip
    recs = [json.loads(x) for x in (run / "align" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in recs if "loss" in r]
    assert res["align"].steps == 3 and len(logged) == 3 and res["align"].converged is True
    assert (
        "mean loss of the last 3 steps" in recs[-1]["stopped"]
        and "at step 3 of 6: stopped at step 3" in recs[-1]["stopped"]
    )
    (ckpt,) = checkpoints(run / "align" / "checkpoints")
    assert ckpt.name == "step-000003"
    assert json.loads((ckpt / "state.json").read_text())["info"]["recent_losses"] == logged
    # resumed from that checkpoint (the stage's model not yet written), it trains no further step
    shutil.rmtree(run / "align" / "model")
    (run / "align" / "result.json").unlink()
    again = run_recipe(load_recipe(doc, sets=["stages.align.stop.at_loss=100", "stages.align.stop.window=3"]), run,
                       progress=False)["align"]  # fmt: skip
    assert again.steps == 3 and again.final_loss == logged[-1]
    assert [json.loads(x).get("loss") for x in (run / "align" / "metrics.jsonl").read_text().splitlines()][
        :3
    ] == logged
    # a threshold no loss meets: the whole schedule
    unmet = run_recipe(
        load_recipe(doc, sets=["stages.align.stop.at_loss=1e-9"]), tmp_path / "unmet", progress=False
    )
    assert unmet["align"].steps == 6 and unmet["align"].converged is False
    recs = [json.loads(x) for x in (tmp_path / "unmet" / "align" / "metrics.jsonl").read_text().splitlines()]
    assert (
        "ended at its last step (6)" in recs[-1]["unconverged"]
        and "above stop.at_loss 1e-09" in recs[-1]["unconverged"]
    )
    assert sum("unconverged" in r for r in recs) == 1 and not any("stopped" in r for r in recs)
    # read back from result.json when the run is asked again (finished stages are not retrained)
    again = run_recipe(
        load_recipe(doc, sets=["stages.align.stop.at_loss=1e-9"]), tmp_path / "unmet", progress=False
    )
    assert again["align"].converged is False and again["align"].steps == 6
    # no stop rule: nothing to converge to
    plain = run_recipe(load_recipe(doc), tmp_path / "plain", progress=False)
    assert plain["align"].converged is None
    assert not any(
        "unconverged" in x for x in (tmp_path / "plain" / "align" / "metrics.jsonl").read_text().splitlines()
    )
    with pytest.raises(ConfigError, match=r"stages\[0\]\.stop\.at_loss: expected a loss > 0"):
        load_recipe(doc, sets=["stages.align.stop.at_loss=0"])


def _train_cmd(recipe: Path, out: Path, data: Path, ddp: bool) -> list[str]:
    base = [
        "-m",
        "modalign.cli",
        "train",
        str(recipe),
        "--out",
        str(out),
        "--data",
        str(data),
        "--no-progress",
    ]
    if ddp:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
                "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", *base]  # fmt: skip
    return [sys.executable, *base]


def test_ddp_runs_through_short_tails_and_bad_rows_without_losing_step(data, tmp_path):
    """Two processes, one sample each a micro-batch, five samples of which one has no image: the
    tail batch of one sample (no row for the second process) is left out, and a process whose row
    is bad still runs the step's collectives (a stand-in with no gradient), so neither waits for
    the other forever; the run ends with the steps it was given."""
    recs = json.loads((data / "instruct.json").read_text())[:5]
    recs[2]["image"] = "gone.png"
    (tmp_path / "five.json").write_text(json.dumps(recs))
    doc = recipe_doc(data, "ddp", steps=5, save_every=0)
    doc["stages"] = doc["stages"][1:]
    doc["stages"][0]["data"] |= {"sources": [{"path": str(tmp_path / "five.json"), "images": str(data)}],
                                 "batch_size": 1, "bad_samples": {"max_fraction": 0.5}}  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    r = subprocess.run(
        _train_cmd(recipe, out, data, True), env=ENV, capture_output=True, timeout=400, text=True
    )
    assert r.returncode == 0, [x for x in r.stderr.splitlines() if "error" in x.lower()][:5]
    steps = [json.loads(x)["step"] for x in (out / "instruct" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    # what each process is given, in one process: the same micro-batch indices, each with a row
    # (the tail of one sample is left out on both), and a stand-in step that gives no gradient
    from contextlib import nullcontext

    from modalign.train import trainer as tr
    from modalign.train.parallel import Dist

    recipe_obj = load_recipe(doc)
    model = MLLM(recipe_obj.model.build_config())
    target, dataset, collator, _ = setup_stage(recipe_obj, 0, model, Tokenizer.from_dir(data / "tokenizer"))
    seen = {}
    for rank in (0, 1):
        t = tr.Trainer(target, recipe_obj.stages[0], dataset, collator, tmp_path / f"r{rank}", progress=False,
                       dist=Dist(rank=rank, world=2))  # fmt: skip
        gen = t._micro_batches(0, 0)
        got = [next(gen) for _ in range(6)]
        seen[rank] = [(e, i) for e, i, _ in got]
        assert all(len(b["ids"]) + len(b["bad"]) == 1 for _, _, b in got)
        t.sampler.set_epoch(0)
        batches = t.sampler.batches()  # two of two samples and a tail of one
        assert sorted(len(b) for b in batches) == [1, 2, 2]
        assert [i for e, i in seen[rank] if e == 0] == [i for i, b in enumerate(batches) if len(b) == 2]
    assert seen[0] == seen[1]
    t._stand_in_step(nullcontext(), tr.Progress())
    grads = [p.grad for p in target.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)


@pytest.mark.parametrize("strategy", ["none", "ddp", "fsdp"], ids=["single", "ddp-gloo-2", "fsdp-gloo-2"])
def test_sigkill_and_resume_logs_the_same_losses(data, tmp_path, strategy):
    ddp = strategy != "none"  # launched as two torchrun processes
    recipe = tmp_path / "recipe.yaml"
    doc = recipe_doc(data, strategy)
    doc["stages"][1]["objective"] = {
        "name": "lm",
        "answer_prior": {"weight": 1.0, "min_count": 5},
    }  # resumes exactly with it too
    doc["stages"][1]["optim"]["ema"] = 0.8  # and with the weights' average (the saved model: equal below)
    recipe.write_text(yaml.safe_dump(doc))
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_train_cmd(recipe, full, data, ddp), env=ENV, check=True, capture_output=True, timeout=600)
    for _ in range(3):  # killed after the stage's last save, a resume would train nothing: try again
        shutil.rmtree(cut, ignore_errors=True)
        proc = subprocess.Popen(_train_cmd(recipe, cut, data, ddp), env=ENV, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 300
        while not checkpoints(cut / "instruct" / "checkpoints") and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-stage: step 2 (or 4) is saved, the run goes on
        proc.wait()
        assert not (cut / "instruct" / "result.json").exists(), "the run finished before it could be killed"
        left = checkpoints(cut / "instruct" / "checkpoints")
        if int(left[-1].name.split("-")[1]) < 6:
            break
    assert int(left[-1].name.split("-")[1]) < 6, "every try was killed after the last save"
    subprocess.run(_train_cmd(recipe, cut, data, ddp), env=ENV, check=True, capture_output=True, timeout=600)
    assert losses(cut) == losses(full)
    assert len(losses(full)) == 12
    a, b = MLLM.from_pretrained(full / "model"), MLLM.from_pretrained(cut / "model")
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    if strategy == "fsdp":  # sharded checkpoints: each rank wrote its part, no gather, no pickle
        import torch.distributed.checkpoint as dcp

        last = checkpoints(full / "instruct" / "checkpoints")[-1]
        assert json.loads((last / "state.json").read_text())["info"]["step"] == 6
        assert sorted(p.suffix for p in last.rglob("*") if p.is_file()) == [".json", *[".safetensors"] * 3]
        assert len(list((last / "sharded").glob("shard-*.safetensors"))) == 2
        # one process reads the shards back (DCP reshards) into the final weights: the trained
        # ones' averages (the stage's model), the frozen ones as they are
        trained = {k for k, _ in a.named_parameters() if k.startswith(("connector.", "llm."))}
        keys = {k: f"optim/{k}/average" if k in trained else f"model/{k}" for k in a.state_dict()}
        sd = {keys[k]: torch.zeros_like(v) for k, v in a.state_dict().items()}
        dcp.load(sd, storage_reader=dcp.HuggingFaceStorageReader(str(last / "sharded")))
        assert trained and all(torch.equal(sd[keys[k]], v) for k, v in a.state_dict().items())


def test_a_full_checkpoint_with_averages_resumes_under_fsdp(data, tmp_path):
    """A stage saved by one process with ``optim.ema`` resumed under FSDP (two gloo processes, the
    same global batch): its averages are scattered to the shards as the weights are (left whole,
    they stood as plain tensors beside the sharded weights and the next step failed), the run goes
    on, and its model is the uninterrupted run's up to FSDP's other order of sums."""
    doc = recipe_doc(data, steps=6, save_every=2)
    doc["stages"] = doc["stages"][:1]
    doc["stages"][0]["optim"]["ema"] = 0.8
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(
        _train_cmd(recipe, full, data, False), env=ENV, check=True, capture_output=True, timeout=300
    )
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "align" / "model")
    shutil.rmtree(cut / "model")
    (cut / "align" / "result.json").unlink()
    shutil.rmtree(checkpoints(cut / "align" / "checkpoints")[-1])  # step 6: resumed from step 4
    doc["parallel"]["strategy"] = "fsdp"
    doc["stages"][0]["data"]["batch_size"] = 4  # per process: 8 a step, as saved
    recipe.write_text(yaml.safe_dump(doc))
    r = subprocess.run(
        _train_cmd(recipe, cut, data, True), env=ENV, capture_output=True, timeout=400, text=True
    )
    assert r.returncode == 0, [x for x in r.stderr.splitlines() if "Error" in x][-3:]
    assert (
        [x[0] for x in losses_of(cut / "align")]
        == [x[0] for x in losses_of(full / "align")]
        == list(range(1, 7))
    )
    a, b = MLLM.from_pretrained(full / "model").state_dict(), MLLM.from_pretrained(cut / "model").state_dict()
    trained = [k for k in a if k.startswith("connector.")]
    assert trained and all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3) for k in trained)
    assert all(torch.equal(a[k], b[k]) for k in a if k not in trained)


def test_interrupted_save_is_ignored_and_nan_stops_with_checkpoint(data, tmp_path):
    from modalign.train import trainer as tr
    from modalign.train.objectives.lm import LMObjective

    recipe = load_recipe(recipe_doc(data, steps=6, save_every=1), sets=["stages.0.stop.max_steps=2"])
    run_recipe(recipe, tmp_path / "run", progress=False, stages=["align"])
    ckdir = tmp_path / "run" / "instruct" / "checkpoints"

    calls = {"n": 0}
    real = LMObjective.forward

    def poisoned(self, batch):
        loss, n = real(self, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), n

    LMObjective.forward = poisoned
    try:
        with pytest.raises(tr.NonFiniteError, match=r"stage instruct, step 3: loss is nan"):
            run_recipe(recipe, tmp_path / "run", progress=False)
    finally:
        LMObjective.forward = real
    done = checkpoints(ckdir)
    assert [p.name for p in done] == ["step-000002", "step-000003"]
    # a save killed halfway: a temp dir and a step dir without state.json; both are ignored
    (ckdir / ".step-000004.tmp-abc").mkdir()
    (ckdir / "step-000005").mkdir()
    assert checkpoints(ckdir)[-1].name == "step-000003"
    res = run_recipe(recipe, tmp_path / "run", progress=False)
    assert res["instruct"].steps == 6


def test_data_with_no_sample_or_no_usable_sample_is_an_error_not_a_hang(data, tmp_path):
    """An empty source used to give the sampler no batch and the step waited forever; a source
    whose every sample is bad (within a budget of 100%) trained to its end on losses of 0.0."""
    from modalign.train import trainer as tr

    (tmp_path / "empty.json").write_text("[]")
    recipe = load_recipe(recipe_doc(data, steps=4, save_every=0), sets=[
        f"stages.instruct.data.sources=[{{path: {tmp_path / 'empty.json'}}}]"])  # fmt: skip
    model = MLLM(recipe.model.build_config())
    target, dataset, collator, _ = setup_stage(recipe, 1, model, Tokenizer.from_dir(data / "tokenizer"))
    with pytest.raises(
        ValueError, match=r"stage instruct: its data \(.*empty\.json\) holds 0 sample\(s\): no samples"
    ):
        tr.Trainer(target, recipe.stages[1], dataset, collator, tmp_path / "s", progress=False)
    recs = json.loads((data / "instruct.json").read_text())[:6]
    for r in recs:
        r["image"] = "gone.png"  # every sample's image missing
    (tmp_path / "bad.json").write_text(json.dumps(recs))
    recipe = load_recipe(recipe_doc(data, steps=4, save_every=0), sets=[
        f"stages.instruct.data.sources=[{{path: {tmp_path / 'bad.json'}, images: {data / 'images'}}}]",
        "stages.instruct.data.bad_samples={max_fraction: 1.0}", "stages.instruct.data.batch_size=2"])  # fmt: skip
    model = MLLM(recipe.model.build_config())
    target, dataset, collator, _ = setup_stage(recipe, 1, model, Tokenizer.from_dir(data / "tokenizer"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = tr.Trainer(target, recipe.stages[1], dataset, collator, tmp_path / "s2", progress=False)
    with pytest.raises(
        ValueError, match=r"stage instruct: no usable sample in a whole epoch .*missing image"
    ):
        t.run()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no update was made


def test_under_ddp_a_step_without_rows_anywhere_makes_no_update(data, tmp_path, monkeypatch):
    """Under DDP / FSDP (one process standing in for two, the collective summed by hand): a step
    with no usable row on any process makes no update and gives the stop rule no loss of 0.0 (it
    took an AdamW step on zero gradients); one where only the other process had rows steps on
    their mean loss (this process's stand-in gives no gradient)."""
    from modalign.data.conversation import BadSample
    from modalign.train import trainer as tr
    from modalign.train.parallel import Dist

    recipe = load_recipe(recipe_doc(data, steps=4, save_every=0))
    model = MLLM(recipe.model.build_config())
    target, dataset, collator, _ = setup_stage(recipe, 1, model, Tokenizer.from_dir(data / "tokenizer"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = tr.Trainer(target, recipe.stages[1], dataset, collator, tmp_path / "s", progress=False,
                   dist=Dist(rank=0, world=2))  # fmt: skip

    def no_rows():  # every micro-batch of this process's step is bad
        while True:
            yield 0, 0, {"ids": [], "bad": [BadSample("missing image", "gone.png", "x")]}

    def other_process(rows: list[float]):
        return lambda xs, d: [x + y for x, y in zip(xs, rows, strict=True)]

    monkeypatch.setattr(tr, "all_sum", other_process([0.0, 0]))
    assert t._step(tr.Progress(), no_rows()) == (None, 0, None) and not t.opt.state
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    monkeypatch.setattr(tr, "all_sum", other_process([3.0, 2]))  # two micro-batch losses: 1.0 and 2.0
    assert t._step(tr.Progress(), no_rows())[0] == 1.5 and t.opt.state


def test_a_resume_with_another_data_layout_is_refused(data, tmp_path):
    """A checkpoint's position (epoch, micro-batch) means something only for the global batch,
    grad_accum, data and seed it was saved with: another batch size stops with both layouts named;
    the same layout resumes."""
    from modalign.train import trainer as tr

    def trainer(sets):
        recipe = load_recipe(recipe_doc(data, steps=2, save_every=2), sets=sets)
        model = MLLM(recipe.model.build_config())
        target, dataset, collator, _ = setup_stage(recipe, 1, model, Tokenizer.from_dir(data / "tokenizer"))
        return tr.Trainer(target, recipe.stages[1], dataset, collator, tmp_path / "s", progress=False)

    assert trainer([]).run().steps == 2
    with pytest.raises(
        ValueError, match=r"was saved with \{'global_batch': 8, .*this run has \{'global_batch': 4, .*remove"
    ):
        trainer(["stages.instruct.data.batch_size=4", "stages.instruct.stop.max_steps=4"]).run()
    assert trainer(["stages.instruct.stop.max_steps=4"]).run().steps == 4


def test_nonfinite_gradients_name_the_group(data, tmp_path):
    from modalign.train import trainer as tr

    recipe = load_recipe(recipe_doc(data, steps=4, save_every=0))
    model = MLLM(recipe.model.build_config())
    target, dataset, collator, _ = setup_stage(recipe, 1, model, Tokenizer.from_dir(data / "tokenizer"))
    model.llm.norm.weight.register_hook(lambda g: g * float("inf"))
    t = tr.Trainer(target, recipe.stages[1], dataset, collator, tmp_path / "s", progress=False)
    with pytest.raises(
        tr.NonFiniteError, match=r"step 0: non-finite gradients in parameter group 'default \(no decay\)'"
    ):
        t.run()


def test_gradient_check_is_exact_where_the_fused_norm_overflows(data, tmp_path):
    """The one-norm-per-group check: gradients too large for an fp32 L1 norm but finite pass; one
    NaN element among them stops the run, naming the group."""
    from modalign.train import trainer as tr

    recipe = load_recipe(recipe_doc(data, steps=4, save_every=0))
    model = MLLM(recipe.model.build_config())
    target, dataset, collator, _ = setup_stage(recipe, 1, model, Tokenizer.from_dir(data / "tokenizer"))
    t = tr.Trainer(target, recipe.stages[1], dataset, collator, tmp_path / "s", progress=False)
    for q in model.parameters():
        q.grad = torch.zeros_like(q) if q.requires_grad else None
    w = model.llm.norm.weight
    w.grad = torch.full_like(w, 3e38)
    assert not torch.stack(torch._foreach_norm([w.grad], 1)).isfinite().all()  # the fused norm overflows
    t._check_grads(7)  # but every element is finite
    w.grad[5] = float("nan")
    with pytest.raises(
        tr.NonFiniteError, match=r"step 7: non-finite gradients in parameter group 'default \(no decay\)'"
    ):
        t._check_grads(7)


def test_sharded_checkpoint_resumes_exactly_in_one_process(tmp_path):
    """The FSDP checkpoint format (DCP shards in safetensors) read back by a process without FSDP:
    weights, optimiser moments and RNG come back, and the next step matches the original's."""
    from modalign.train import state as st

    def make(seed):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)

    def step(m, opt):
        opt.zero_grad()
        m(torch.randn(4, 6)).square().mean().backward()
        opt.step()

    m, opt = make(0)
    for _ in range(3):
        step(m, opt)
    info = {"step": 3, "epoch": 0, "micro": 3, "tokens": 0, "seen": 12, "skipped": {}}
    st.save_training_state_sharded(tmp_path / "step-000003", m, opt, info, main=True)
    assert (tmp_path / "step-000003" / "sharded").is_dir() and not (
        tmp_path / "step-000003.tmp-sharded"
    ).exists()
    step(m, opt)  # the original run goes on

    m2, opt2 = make(1)
    assert st.load_training_state(tmp_path / "step-000003", m2, opt2) == info
    step(m2, opt2)  # the same RNG draws, moments and weights: bit-identical
    assert all(
        torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True)
    )
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


def test_region_contrastive_stage_reads_boxes_and_trains_the_region_term(data, tmp_path):
    """Stage 0's clip stage on ShapesWorld's annotations: each object's box becomes (the patch of
    its grid cell, "<size> <colour> <shape> at the <cell>"); the region term adds a positive
    InfoNCE that reaches the tower and its projection; the shipped stage trains end to end."""
    from modalign.data.collate import collate
    from modalign.shapesworld import data as shapes
    from modalign.train.objectives.contrastive import ContrastiveCollator, ContrastiveModel, RegionExample

    tok_dir = data / "tokenizer"
    stage0 = TINY_RECIPES / "tiny-stage0.yaml"
    recipe = load_recipe(stage0, {"data": str(data)}, [f"model.tokenizer={tok_dir}", "stages.lm.stop.max_steps=2",
                         "stages.clip.stop.max_steps=3", "stages.clip.data.batch_size=8",
                         "stages.lm.data.batch_size=8"])  # fmt: skip
    clip = recipe.stages[1]
    assert clip.objective.region.weight > 0 and clip.data.sources[0].path.endswith("scenes.jsonl")
    model = MLLM(recipe.model.build_config())
    tok = Tokenizer.from_dir(tok_dir)
    _, ds, _, _ = setup_stage(recipe, 1, model, tok)
    scenes = [json.loads(line) for line in (data / "scenes.jsonl").read_text().splitlines()]
    for i in range(5):
        ex, sc = ds[i], shapes.Scene.from_dict(scenes[i]["scene"])
        assert isinstance(ex, RegionExample) and ex.id == scenes[i]["id"]
        want = sorted(
            (o.cell, f"{o.size} {o.colour} {o.shape} at the {shapes.POSITIONS[o.cell]}") for o in sc.objects
        )
        assert sorted((p, tok.decode(ids)) for p, ids in ex.regions) == want
    batch = ContrastiveCollator(tok.pad_id)([ds[i] for i in range(6)])
    assert batch["regions"] == [ds[i].regions for i in range(6)]
    torch.manual_seed(0)
    model.requires_grad_(True)
    cm = ContrastiveModel(model, region_weight=1.0)
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    plain = cm.loss(*args)
    with_regions = cm.loss(*args, batch["regions"])
    assert cm(batch) == (with_regions, int(batch["attention_mask"].sum()))
    assert with_regions > plain
    want_plain, want_regions = _contrastive_written_out(cm, batch)
    assert plain.item() == pytest.approx(want_plain, abs=1e-5)
    assert with_regions.item() == pytest.approx(want_plain + want_regions, abs=1e-5)
    with torch.no_grad():  # the learned temperature is clamped at 100
        cm.clip_logit_scale.fill_(math.log(150.0))
        want_plain, want_regions = _contrastive_written_out(cm, batch)
        assert cm.loss(*args, batch["regions"]).item() == pytest.approx(want_plain + want_regions, abs=1e-5)
        cm.clip_logit_scale.fill_(math.log(1 / 0.07))
    with_regions.backward()
    assert cm.clip_region_proj.weight.grad.abs().sum() > 0
    assert model.vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    # text_cache: with the LM frozen each distinct text is embedded once and kept: before training,
    # every text of the data set, 64 at a time (then no forward calls the LM), or a text the fill
    # did not see, on its own; the loss equals the padded batch's; while the LM trains nothing is kept
    from modalign.train.objectives.contrastive import fill_text_cache

    cached = ContrastiveModel(model, region_weight=1.0, text_cache=True)
    cached.load_state_dict(cm.state_dict())
    assert fill_text_cache(cached, ds) == 0
    assert cached.loss(*args, batch["regions"]).item() == pytest.approx(with_regions.item(), rel=1e-5)
    assert not cached._text_memo
    calls = []
    hook = model.llm.register_forward_hook(lambda *a: calls.append(1))
    model.llm.requires_grad_(False)
    texts = {
        tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    }
    texts |= {tuple(ids) for regs in batch["regions"] for _, ids in regs}
    first = cached.loss(*args, batch["regions"])  # on its own, each text
    assert len(calls) == len(cached._text_memo) == len(texts)
    every = {tuple(t) for s in ds.samples for t in ds.processor.texts(s)}
    assert texts < every
    filled = ContrastiveModel(model, region_weight=1.0, text_cache=True)
    filled.load_state_dict(cm.state_dict())
    calls.clear()
    assert fill_text_cache(filled, ds) == len(every) and len(calls) == -(-len(every) // 64)
    again = filled.loss(*args, batch["regions"])
    hook.remove()
    model.llm.requires_grad_(True)
    assert len(calls) == -(-len(every) // 64)  # the forward called no LM
    assert first.item() == pytest.approx(with_regions.item(), rel=1e-5)
    assert again.item() == pytest.approx(with_regions.item(), rel=1e-5)
    assert "regions" not in collate([ds[0]], tok.pad_id)
    # the conversation files still load for the class-token loss; a region term without boxes is refused
    from modalign.data.conversation import Conversation
    from modalign.train.objectives.contrastive import load_caption_samples

    assert all(isinstance(x, Conversation) for x in load_caption_samples(data / "captions.json"))
    no_boxes = load_recipe(stage0, {"data": str(data)}, [f"model.tokenizer={tok_dir}",
                           f"stages.clip.data.sources.0.path={data / 'captions.json'}", "stages.clip.init_from=none"])  # fmt: skip
    with pytest.raises(
        ValueError, match=r"stage clip: objective.region.weight is 1.0 but its data .*captions.json"
    ):
        run_recipe(no_boxes, tmp_path / "no-boxes", progress=False, stages=["clip"])
    res = run_recipe(recipe, tmp_path / "stage0", progress=False)
    assert res["clip"].steps == 3 and (tmp_path / "stage0" / "model" / "model.safetensors").is_file()
    # the contrastive heads are seeded by the recipe, not by whatever ran before: the clip stage run
    # alone on the finished lm stage (a resumed quickstart) logs the same losses
    shutil.copytree(tmp_path / "stage0" / "lm", tmp_path / "again" / "lm")
    torch.manual_seed(1234)
    run_recipe(recipe, tmp_path / "again", progress=False, stages=["clip"])
    losses = [[json.loads(x)["loss"] for x in (d / "clip" / "metrics.jsonl").read_text().splitlines()]
              for d in (tmp_path / "stage0", tmp_path / "again")]  # fmt: skip
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def _contrastive_written_out(cm, batch) -> tuple[float, float]:
    """The contrastive loss pair by pair, from the parts: CLIP's symmetric InfoNCE between the
    tower's class token (after its post-LayerNorm) and the LM's mean last hidden state over each
    caption's own tokens, at the learned temperature clamped to 100; and the region term: the
    tower's state at the connector's layer under each box's patch (after the class token) against
    the batch's distinct phrases, each phrase embedded alone. Returns (image-text loss, region
    loss times its weight)."""
    model_v, llm = cm.vision, cm.llm
    with torch.no_grad():
        states = model_v.hidden_states(batch["pixel_values"])
        img = model_v.post_layernorm(states[-1][:, 0])

        def embed(ids):
            return llm(input_ids=torch.tensor([ids]), return_hidden=True)[0].mean(0)

        rows = [
            r[m.bool()].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        txt = torch.stack([embed(r) for r in rows])
        a = torch.nn.functional.normalize(cm.clip_image_proj(img), dim=-1)
        b = torch.nn.functional.normalize(cm.clip_text_proj(txt), dim=-1)
        s = min(math.exp(cm.clip_logit_scale.item()), 100.0)
        n = len(rows)
        i2t = t2i = 0.0
        for i in range(n):
            sims = [s * float(a[i] @ b[j]) for j in range(n)]
            i2t += -(sims[i] - math.log(sum(math.exp(x) for x in sims)))
            sims = [s * float(a[j] @ b[i]) for j in range(n)]
            t2i += -(sims[i] - math.log(sum(math.exp(x) for x in sims)))
        clip_loss = (i2t / n + t2i / n) / 2
        vc = model_v.cfg
        fl = vc.feature_layer if isinstance(vc.feature_layer, int) else vc.feature_layer[0]
        layer = fl % (vc.num_layers + 1)
        phrases = list(dict.fromkeys(tuple(ids) for regs in batch["regions"] for _, ids in regs))
        t = torch.nn.functional.normalize(
            cm.clip_text_proj(torch.stack([embed(list(p)) for p in phrases])), dim=-1
        )
        terms = []
        for row, regs in enumerate(batch["regions"]):
            for patch, ids in regs:
                r = torch.nn.functional.normalize(cm.clip_region_proj(states[layer][row, 1 + patch]), dim=-1)
                sims = [s * float(r @ t[k]) for k in range(len(phrases))]
                terms.append(-(sims[phrases.index(tuple(ids))] - math.log(sum(math.exp(x) for x in sims))))
        return clip_loss, cm.region_weight * sum(terms) / len(terms)


def _corrupt(ckpt: Path, how: str) -> str:
    """Damage one checkpoint the way a disk or a kill can; returns the file named in the warning."""
    if how == "truncated model":
        f = ckpt / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "empty rng":
        f = ckpt / "rng.safetensors"
        f.write_bytes(b"")
    elif how == "flipped bytes":
        f = ckpt / "optimizer.safetensors"
        raw = bytearray(f.read_bytes())
        raw[-100] ^= 0xFF  # inside tensor data: the file still parses
        f.write_bytes(bytes(raw))
    else:  # state.json without step
        f = ckpt / "state.json"
        doc = json.loads(f.read_text())
        del doc["info"]["step"]
        f.write_text(json.dumps(doc))
    return f.name


@pytest.mark.parametrize("how", ["truncated model", "empty rng", "flipped bytes", "no step"])
def test_a_corrupt_latest_checkpoint_is_named_and_the_run_falls_back(data, tmp_path, caplog, how):
    """The latest checkpoint damaged: a warning names the file, the run resumes from the one before
    and logs exactly the losses of an uninterrupted run; with no good checkpoint left it stops with
    an error naming each problem."""
    doc = recipe_doc(data, steps=6, save_every=2)
    doc["stages"] = doc["stages"][:1]
    doc["stages"][0]["checkpoints"]["keep_last"] = 3
    recipe = load_recipe(doc)
    full = tmp_path / "full"
    run_recipe(recipe, full, progress=False)
    want = losses_of(full / "align")
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "align" / "model")
    (cut / "align" / "result.json").unlink()
    ckdir = cut / "align" / "checkpoints"
    assert [p.name for p in checkpoints(ckdir)] == ["step-000002", "step-000004", "step-000006"]
    shutil.rmtree(ckdir / "step-000006")
    name = _corrupt(ckdir / "step-000004", how)
    with caplog.at_level("WARNING", logger="modalign"):
        res = run_recipe(recipe, cut, progress=False)["align"]
    assert "checkpoint step-000004 is corrupt" in caplog.text and name in caplog.text
    assert res.steps == 6 and losses_of(cut / "align") == want
    # nothing usable: a clear error, not a raw SafetensorError or KeyError
    shutil.rmtree(cut / "align" / "model")
    (cut / "align" / "result.json").unlink()
    for p in checkpoints(ckdir):
        _corrupt(p, how)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step-00000\d"):
        run_recipe(recipe, cut, progress=False)


def losses_of(stage_dir: Path) -> list[tuple]:
    recs = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def test_leftovers_of_a_killed_commit_are_recovered_at_the_next_start(data, tmp_path):
    """A kill between the two renames of a directory commit leaves ``.model.old-PID`` and no
    ``model``: the next start puts it back; unfinished writes (``.*.tmp-*``) are removed."""
    doc = recipe_doc(data, steps=2, save_every=0)
    doc["stages"] = doc["stages"][:1]
    recipe = load_recipe(doc)
    run = tmp_path / "run"
    run_recipe(recipe, run, progress=False)
    weights = (run / "model" / "model.safetensors").read_bytes()
    os.replace(run / "model", run / ".model.old-4242")  # killed right after the first rename
    (run / ".model.tmp-abc").mkdir()
    (run / ".model.tmp-abc" / "model.safetensors").write_bytes(b"half")
    (run / "align" / "checkpoints" / ".step-000009.tmp-xyz").mkdir()
    (run / "align" / ".model.old-77").mkdir()  # beside an intact model: stale
    run_recipe(recipe, run, progress=False)
    assert (run / "model" / "model.safetensors").read_bytes() == weights
    left = [p.name for d in (run, run / "align", run / "align" / "checkpoints") for p in d.iterdir()
            if p.name.startswith(".")]  # fmt: skip
    assert left == []


def test_the_trainer_steps_with_fused_adamw(data, tmp_path):
    """On plain CPU tensors the trainer's AdamW is the fused kernel, and its step equals the
    single-tensor AdamW's with the same groups and settings, to float rounding."""
    from modalign.train import trainer as tr

    recipe = load_recipe(recipe_doc(data, steps=4, save_every=0))
    model = MLLM(recipe.model.build_config())
    target, dataset, collator, _ = setup_stage(recipe, 1, model, Tokenizer.from_dir(data / "tokenizer"))
    t = tr.Trainer(target, recipe.stages[1], dataset, collator, tmp_path / "s", progress=False)
    assert t.opt.defaults["fused"] is True
    g = torch.Generator().manual_seed(0)
    params = [p for grp in t.opt.param_groups for p in grp["params"]]
    copies = {p: torch.nn.Parameter(p.detach().clone()) for p in params}
    ref = torch.optim.AdamW(
        [{**{k: v for k, v in grp.items() if k not in ("params", "fused", "foreach")},
          "params": [copies[p] for p in grp["params"]]} for grp in t.opt.param_groups], foreach=False,
    )  # fmt: skip
    assert not any(grp["fused"] or grp["foreach"] for grp in ref.param_groups)  # the single-tensor loop
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
            copies[p].grad = p.grad.clone()
        t.opt.step()
        ref.step()
    for p in params:
        torch.testing.assert_close(p.detach(), copies[p].detach(), atol=1e-6, rtol=1e-5)


def test_blip2_stage_two_leaves_out_only_the_text_branch_of_the_qformer():
    """The generative stage leaves out the Q-Former's text FFN (layer.N.intermediate / output, as
    LAVIS removes them), not the output projections of its self- and cross-attention, whose
    names also hold ".output." (a glob's * crosses dots: 10.7M trained parameters were frozen)."""
    from modalign import MLLMConfig
    from modalign.train.freeze import match_any

    recipe = load_recipe(RECIPES_DIR / "blip2.yaml", {n: n for n in ("data", "llm", "vision", "bert")})
    patterns = next(s for s in recipe.stages if s.name == "generative").trainable
    names = [
        n for n, _ in MLLM(MLLMConfig.from_name("tiny-blip2")).named_parameters() if "qformer.encoder" in n
    ]
    kept = {n for n in names if match_any(n, patterns)}
    attention_out = [n for n in names if ".attention.output." in n or ".crossattention.output." in n]
    text_ffn = [
        n for n in names if any(f".{k}.{p}" in n for k in range(99) for p in ("output.", "intermediate."))
    ]
    assert attention_out and text_ffn and set(attention_out) <= kept and not kept & set(text_ffn)
    assert any(".output_query." in n for n in kept) and any(".intermediate_query." in n for n in kept)
