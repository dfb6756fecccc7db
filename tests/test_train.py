"""Training: recipes validate and plan on the meta device, frozen parameters stay bit-identical,
a SIGKILLed run resumes to the same losses (also DDP with 2 gloo processes), NaN stops cleanly."""

import json
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

from modalign import MLLM
from modalign.config import ConfigError
from modalign.data import shapes
from modalign.data.datasets import load_samples
from modalign.data.tokenizer import Tokenizer
from modalign.train.plan import plan
from modalign.train.recipe import RECIPES_DIR, load_recipe
from modalign.train.run import run_recipe
from modalign.train.state import checkpoints

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2},
    "llm": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    shapes.generate(d, num_train=48, num_eval=4, seed=0, num_text=48)
    texts = [m.content for s in load_samples(d / "instruct.json") for m in s.messages]
    Tokenizer.train_bpe(texts + [s.text for s in load_samples(d / "text.jsonl")], vocab_size=400).save(
        d / "tokenizer"
    )
    return d


def recipe_doc(data: Path, strategy="none", steps=6, save_every=2) -> dict:
    stage = {"batch_size": 8, "max_steps": steps, "save_every": save_every, "keep_last": 2, "lr": 1e-2,
             "max_length": 96, "schedule": {"warmup": 2, "decay": "cosine"}}  # fmt: skip
    return {
        "name": "tiny-test",
        "seed": 1,
        "parallel": {"strategy": strategy},
        "model": {"preset": "tiny-shapes", "overrides": TINY, "tokenizer": str(data / "tokenizer")},
        "stages": [
            {"name": "align", "data": [{"path": str(data / "captions.json")}], "template": "plain",
             "trainable": ["connector.*"], **stage},
            {"name": "instruct", "data": [{"path": str(data / "instruct.json"), "weight": 0.8},
                                          {"path": str(data / "text_instruct.json"), "weight": 0.2}],
             "template": "chatml", "trainable": ["connector.*", "llm.*"], "dropout": 0.1, **stage},
        ],
    }  # fmt: skip


def losses(run: Path) -> list[tuple]:
    out = []
    for stage in ("align", "instruct"):
        for line in (run / stage / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "loss" in r:
                out.append((stage, r["step"], r["loss"]))
    return out


# ------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates_and_plans_on_meta(path):
    recipe = load_recipe(path, {"data": "data", "stage0": "runs/stage0", "llm": "llm", "vision": "vision"})
    rows = plan(recipe)
    assert len(rows) == len(recipe.stages)
    for r in rows:
        assert r["trainable"] > 0 and r["memory_total_gib"] > 0


def test_recipe_errors_name_the_key(data):
    doc = recipe_doc(data)
    doc["stages"][0]["learning_rate"] = 1
    with pytest.raises(ConfigError, match=r"recipe\.stages\[0\]: unknown key\(s\) learning_rate"):
        load_recipe(doc)
    doc = recipe_doc(data)
    with pytest.raises(ConfigError, match=r"recipe\.stages\[1\]\.lr: expected a number"):
        load_recipe(doc, sets=["stages.instruct.lr=fast"])
    with pytest.raises(ConfigError, match="give exactly one of max_steps and epochs"):
        load_recipe(doc, sets=["stages.0.epochs=1"])
    with pytest.raises(
        ConfigError, match=r"recipe\.stages\[1\]\.token_cache_mb: expected a size in MiB >= 0"
    ):
        load_recipe(doc, sets=["stages.instruct.token_cache_mb=-1"])
    assert load_recipe(doc, sets=["stages.align.lr=3e-4"]).stages[0].lr == 3e-4
    # a mapping's values are checked too: YAML reads 1e-3 (no dot) as a string, which is a number here
    sets = ['stages.align.lr_groups={"connector.*": 1e-3}']
    assert load_recipe(doc, sets=sets).stages[0].lr_groups == {"connector.*": 1e-3}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.lr_groups\['connector\.\*'\]: expected a number"):
        load_recipe(doc, sets=['stages.align.lr_groups={"connector.*": fast}'])
    with pytest.raises(
        ConfigError, match=r"recipe\.stages\[1\]\.dropout: expected a probability in \[0, 1\)"
    ):
        load_recipe(doc, sets=["stages.instruct.dropout=1"])
    # 1/512 and below, the CPU's byte masks would drop nothing: an error, not a silent no-op
    with pytest.raises(
        ConfigError, match=r"stages\[1\]\.dropout: 0\.001953125 rounds to no dropout .* at least 0\.002"
    ):
        load_recipe(doc, sets=["stages.instruct.dropout=0.001953125"])
    assert load_recipe(doc, sets=["stages.instruct.dropout=0.002"]).stages[1].dropout == 0.002
    # a value YAML cannot parse names the key and the value, and says how to quote it
    with pytest.raises(ConfigError, match=r"--set stages\.align\.data: value .* is not valid YAML \(quote"):
        load_recipe(doc, sets=["stages.align.data=[{path: ${data}/x.json}]"])
    sets = ['stages.align.data=[{path: "${data}/x.json"}]']
    assert load_recipe(doc, {"data": "D"}, sets=sets).stages[0].data[0].path == "D/x.json"


def test_stage_dropout_trains_with_masks_and_leaves_the_model_without(data, tmp_path):
    """``dropout`` drops the LLM's residual branches only in training mode and only during its
    stage: in eval mode the outputs are the plain model's, and the stage's model runs without it."""
    from modalign.data.collate import Collator
    from modalign.train.freeze import apply_trainable
    from modalign.train.run import build_dataset
    from modalign.train.trainer import Trainer

    recipe = load_recipe(recipe_doc(data, steps=2, save_every=0))
    torch.manual_seed(0)
    model = MLLM(recipe.model.build_config())
    ids = torch.randint(4, 200, (2, 12))
    with torch.no_grad():
        plain_train = model.train()(ids).logits
        model.llm.set_dropout(0.3)
        dropped = model(ids).logits
        evaluated = model.eval()(ids).logits
    assert torch.equal(evaluated, plain_train) and not torch.allclose(dropped, plain_train)
    with pytest.raises(ValueError, match="dropout: expected a probability"):
        model.llm.set_dropout(1.0)
    with pytest.raises(ValueError, match="dropout: 0.001 rounds to no dropout"):
        model.llm.set_dropout(0.001)
    # during a stage with dropout every layer has it; after the stage none does
    seen = []
    forward = type(model.llm.layers[0]).forward
    stage = recipe.stages[1]
    assert stage.dropout == 0.1
    trained = MLLM(recipe.model.build_config())
    tok = Tokenizer.from_dir(data / "tokenizer")
    apply_trainable(trained, stage.trainable)
    layer_cls = type(trained.llm.layers[0])
    try:
        layer_cls.forward = lambda self, *a: seen.append(self.dropout) or forward(self, *a)
        Trainer(trained, stage, build_dataset(stage, trained, tok), Collator(tok.pad_id), tmp_path / "s",
                progress=False).run()  # fmt: skip
    finally:
        layer_cls.forward = forward
    assert seen and set(seen) == {0.1}
    assert {layer.dropout for layer in trained.llm.layers} == {0.0}


def test_byte_dropout_drops_its_share_and_keeps_the_mean():
    """CPU dropout masks from random bytes: 26 in 256 elements dropped at p=0.1, the rest scaled so
    the mean is kept; the masks come from torch's generator (a seed gives the same masks); a p below
    half a byte's step drops nothing; gradients flow through the kept elements only."""
    from modalign.models.decoder import byte_dropout

    x = torch.ones(400_000, requires_grad=True)
    torch.manual_seed(3)
    y = byte_dropout(x, 0.1)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 26 / 256) < 0.002
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 256 / 230))
    assert abs(y.mean().item() - 1.0) < 0.005
    torch.manual_seed(3)
    assert torch.equal(byte_dropout(x, 0.1), y)
    assert not torch.equal(byte_dropout(x, 0.1), y)  # the generator moved on
    assert byte_dropout(x, 0.001) is x
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    z = byte_dropout(torch.ones(3, 5, 7), 0.5)  # shapes whose size is not a multiple of 8
    assert z.shape == (3, 5, 7) and set(z.unique().tolist()) <= {0.0, 2.0}
    w = byte_dropout(torch.ones(80_000), 0.999)  # p < 1 rounds to 255 in 256, never to all 256
    assert w.isfinite().all() and set(w.unique().tolist()) <= {0.0, 256.0} and w.count_nonzero() > 0


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


def test_a_frozen_vision_tower_runs_once_per_image(data, tmp_path, monkeypatch):
    """With the tower frozen (both stages here), its output per image file is computed before the
    first stage, once, in file order (``feature_cache_mb``), and the second stage, whose tower is the
    same, reuses it; training then never calls it, and logs the losses of a run that calls it on
    every batch (the sigkill test checks exact resume with it)."""
    from modalign.data.images import ImageProcessor
    from modalign.models.mllm import FeatureCache
    from modalign.models.vision import VisionTower

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
        sets = [f"stages.{st}.feature_cache_mb={mb}" for st in ("align", "instruct")]
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

    torch.manual_seed(0)
    model = MLLM(MLLMConfig.from_name("tiny-shapes")).eval()
    px = torch.randn(5, 3, 96, 96)
    with torch.no_grad():
        want = model.vision(px)
    one = want[0].numel() * 4  # bytes of one image's features
    cache = model.cache_vision_features(2.5 * one / 2**20)
    assert cache.fill(model.vision, [(f"f{i}", px[i]) for i in (0, 1, 0, 2, 3)], batch_size=2) == 2
    assert cache.bytes == 2 * one
    # held keys come from the cache (f1 named on image 0 gives image 1's features), the rest are encoded
    got = cache(model.vision, px, ["f1", "f0", None, "f3", "f4"])
    assert (cache.hits, cache.misses) == (2, 3)
    torch.testing.assert_close(got, want[[1, 0, 2, 3, 4]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 keys for 5 images"):
        cache(model.vision, px, ["f0", "f1"])
    tokens = model.encode_images(px, ["f1", "f0", None, "f3", "f4"])
    torch.testing.assert_close(tokens, model.connector(want[[1, 0, 2, 3, 4]]), rtol=1e-5, atol=1e-5)
    assert model.cache_vision_features(0) is None and model._features is None
    # a later stage keeps the cache only for the same tower (weights, buffers, config) and limit
    mb = 2.5 * one / 2**20
    assert model.cache_vision_features(mb, reuse=cache) is cache
    assert model.cache_vision_features(2 * mb, reuse=cache) is not cache
    with torch.no_grad():
        model.vision.encoder.layers[0].mlp.fc1.weight[0, 0] += 1e-3
    fresh = model.cache_vision_features(mb, reuse=cache)
    assert fresh is not cache and len(fresh) == 0 and fresh.fingerprint != cache.fingerprint


def test_stop_at_loss_ends_a_learnt_stage_and_stays_ended_on_resume(data, tmp_path):
    doc = recipe_doc(data, steps=6, save_every=0)
    doc["stages"] = doc["stages"][:1]
    run = tmp_path / "met"
    res = run_recipe(load_recipe(doc, sets=["stages.align.stop_at_loss=100", "stages.align.stop_window=3"]), run,
                     progress=False)  # fmt: skip
    recs = [json.loads(x) for x in (run / "align" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in recs if "loss" in r]
    assert res["align"].steps == 3 and len(logged) == 3
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
    again = run_recipe(load_recipe(doc, sets=["stages.align.stop_at_loss=100", "stages.align.stop_window=3"]), run,
                       progress=False)["align"]  # fmt: skip
    assert again.steps == 3 and again.final_loss == logged[-1]
    assert [json.loads(x).get("loss") for x in (run / "align" / "metrics.jsonl").read_text().splitlines()][
        :3
    ] == logged
    # a threshold no loss meets: the whole schedule
    unmet = run_recipe(
        load_recipe(doc, sets=["stages.align.stop_at_loss=1e-9"]), tmp_path / "unmet", progress=False
    )
    assert unmet["align"].steps == 6
    with pytest.raises(ConfigError, match=r"stages\[0\]\.stop_at_loss: expected a loss > 0"):
        load_recipe(doc, sets=["stages.align.stop_at_loss=0"])


def test_stop_anneal_decays_the_lr_after_the_stop_and_resumes_mid_anneal(data, tmp_path):
    doc = recipe_doc(data, steps=10, save_every=1)
    doc["stages"] = doc["stages"][:1]
    doc["stages"][0]["keep_last"] = 10
    doc["stages"][0]["schedule"]["min_lr_ratio"] = 0.1
    sets = ["stages.align.stop_at_loss=100", "stages.align.stop_window=3", "stages.align.stop_anneal=4"]
    run = tmp_path / "run"
    res = run_recipe(load_recipe(doc, sets=sets), run, progress=False)["align"]
    recs = [json.loads(x) for x in (run / "align" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs if "loss" in r]
    assert res.steps == 7 and len(lrs) == 7  # met at step 3, then 4 annealing steps
    assert "at step 3 of 10: the LR anneals to min_lr_ratio over 4 more steps" in recs[3]["stopped"]
    # steps 1-3 follow the schedule (warmup 2, cosine over 10); from step 4 a line from the schedule's
    # value at step 4 (0-based index 3) down to 0.1 of the peak at step 7
    peak, at3 = 1e-2, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / 8))
    want = [peak * 0.5, peak, peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(0)))] + [
        peak * (0.1 + (at3 - 0.1) * (1 - (i + 1) / 4)) for i in range(4)
    ]
    assert lrs == pytest.approx(want, rel=1e-6)
    assert lrs[-1] == pytest.approx(peak * 0.1)
    assert (
        json.loads((run / "align" / "checkpoints" / "step-000005" / "state.json").read_text())["info"][
            "stop_at"
        ]
        == 3
    )
    # killed mid-anneal (the checkpoints after step 5 gone): the resumed run logs the same steps
    for c in checkpoints(run / "align" / "checkpoints")[5:]:
        shutil.rmtree(c)
    shutil.rmtree(run / "align" / "model")
    (run / "align" / "result.json").unlink()
    again = run_recipe(load_recipe(doc, sets=sets), run, progress=False)["align"]
    recs2 = [json.loads(x) for x in (run / "align" / "metrics.jsonl").read_text().splitlines()]
    assert again.steps == 7
    assert [(r["step"], r["loss"], r["lr"]) for r in recs2 if "loss" in r] == [
        (r["step"], r["loss"], r["lr"]) for r in recs if "loss" in r
    ]
    with pytest.raises(ConfigError, match=r"stages\[0\]\.stop_anneal: expected a number of steps >= 0"):
        load_recipe(doc, sets=["stages.align.stop_anneal=-1"])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.stop_anneal: anneals after stop_at_loss is met"):
        load_recipe(doc, sets=["stages.align.stop_anneal=4"])


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


@pytest.mark.parametrize("strategy", ["none", "ddp", "fsdp"], ids=["single", "ddp-gloo-2", "fsdp-gloo-2"])
def test_sigkill_and_resume_logs_the_same_losses(data, tmp_path, strategy):
    ddp = strategy != "none"  # launched as two torchrun processes
    recipe = tmp_path / "recipe.yaml"
    doc = recipe_doc(data, strategy)
    doc["stages"][1].update(answer_prior=1.0, answer_prior_min_count=5)  # resumes exactly with it too
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
        # one process reads the shards back (DCP reshards) into the final weights
        sd = {f"model/{k}": torch.zeros_like(v) for k, v in a.state_dict().items()}
        dcp.load(sd, storage_reader=dcp.HuggingFaceStorageReader(str(last / "sharded")))
        assert all(torch.equal(sd[f"model/{k}"], v) for k, v in a.state_dict().items())


def test_interrupted_save_is_ignored_and_nan_stops_with_checkpoint(data, tmp_path):
    from modalign.train import trainer as tr

    recipe = load_recipe(recipe_doc(data, steps=6, save_every=1), sets=["stages.0.max_steps=2"])
    run_recipe(recipe, tmp_path / "run", progress=False, stages=["align"])
    ckdir = tmp_path / "run" / "instruct" / "checkpoints"

    calls = {"n": 0}
    real = tr.lm_loss

    def poisoned(model, batch, device):
        loss, n = real(model, batch, device)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), n

    orig = tr.lm_loss
    tr.lm_loss = poisoned
    import modalign.train.run as run_mod

    run_mod.lm_loss = poisoned
    try:
        with pytest.raises(tr.NonFiniteError, match=r"stage instruct, step 3: loss is nan"):
            run_recipe(recipe, tmp_path / "run", progress=False)
    finally:
        tr.lm_loss = run_mod.lm_loss = orig
    done = checkpoints(ckdir)
    assert [p.name for p in done] == ["step-000002", "step-000003"]
    # a save killed halfway: a temp dir and a step dir without state.json; both are ignored
    (ckdir / ".step-000004.tmp-abc").mkdir()
    (ckdir / "step-000005").mkdir()
    assert checkpoints(ckdir)[-1].name == "step-000003"
    res = run_recipe(recipe, tmp_path / "run", progress=False)
    assert res["instruct"].steps == 6


def test_nonfinite_gradients_name_the_group(data, tmp_path):
    from modalign.train import trainer as tr

    recipe = load_recipe(recipe_doc(data, steps=4, save_every=0))
    model = MLLM(recipe.model.build_config())
    from modalign.data.collate import Collator
    from modalign.train.freeze import apply_trainable
    from modalign.train.run import build_dataset

    tok = Tokenizer.from_dir(data / "tokenizer")
    stage = recipe.stages[1]
    apply_trainable(model, stage.trainable)
    model.llm.norm.weight.register_hook(lambda g: g * float("inf"))
    t = tr.Trainer(
        model, stage, build_dataset(stage, model, tok), Collator(tok.pad_id), tmp_path / "s", progress=False
    )
    with pytest.raises(
        tr.NonFiniteError, match=r"step 0: non-finite gradients in parameter group 'default \(no decay\)'"
    ):
        t.run()


def test_gradient_check_is_exact_where_the_fused_norm_overflows(data, tmp_path):
    """The one-norm-per-group check: gradients too large for an fp32 L1 norm but finite pass; one
    NaN element among them stops the run, naming the group."""
    from modalign.data.collate import Collator
    from modalign.train import trainer as tr
    from modalign.train.freeze import apply_trainable
    from modalign.train.run import build_dataset

    recipe = load_recipe(recipe_doc(data, steps=4, save_every=0))
    model = MLLM(recipe.model.build_config())
    tok = Tokenizer.from_dir(data / "tokenizer")
    stage = recipe.stages[1]
    apply_trainable(model, stage.trainable)
    t = tr.Trainer(
        model, stage, build_dataset(stage, model, tok), Collator(tok.pad_id), tmp_path / "s", progress=False
    )
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
    st.save_training_state_sharded(tmp_path / "step-000003", m, opt, {"step": 3}, main=True)
    assert (tmp_path / "step-000003" / "sharded").is_dir() and not (
        tmp_path / "step-000003.tmp-sharded"
    ).exists()
    step(m, opt)  # the original run goes on

    m2, opt2 = make(1)
    assert st.load_training_state(tmp_path / "step-000003", m2, opt2) == {"step": 3}
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
    from modalign.train.contrastive import (
        CaptionProcessor,
        ContrastiveCollator,
        ContrastiveModel,
        RegionExample,
    )
    from modalign.train.run import build_dataset

    tok_dir = data / "tokenizer"
    recipe = load_recipe("tiny-stage0", {"data": str(data)}, [f"model.tokenizer={tok_dir}", "stages.lm.max_steps=2",
                         "stages.clip.max_steps=3", "stages.clip.batch_size=8", "stages.lm.batch_size=8"])  # fmt: skip
    clip = recipe.stages[1]
    assert clip.region_contrastive > 0 and clip.data[0].path.endswith("scenes.jsonl")
    model = MLLM(recipe.model.build_config())
    tok = Tokenizer.from_dir(tok_dir)
    ds = build_dataset(clip, model, tok, CaptionProcessor)
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
    cm = ContrastiveModel(model, region_weight=1.0)
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    plain = cm(*args)
    with_regions = cm(*args, batch["regions"])
    assert with_regions > plain
    with_regions.backward()
    assert cm.clip_region_proj.weight.grad.abs().sum() > 0
    assert model.vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    # text_cache: with the LM frozen each distinct text is embedded once and kept: before training,
    # every text of the data set, 64 at a time (then no forward calls the LM), or a text the fill
    # did not see, on its own; the loss equals the padded batch's; while the LM trains nothing is kept
    from modalign.train.contrastive import fill_text_cache

    cached = ContrastiveModel(model, region_weight=1.0, text_cache=True)
    cached.load_state_dict(cm.state_dict())
    assert fill_text_cache(cached, ds) == 0
    assert cached(*args, batch["regions"]).item() == pytest.approx(with_regions.item(), rel=1e-5)
    assert not cached._text_memo
    calls = []
    hook = model.llm.register_forward_hook(lambda *a: calls.append(1))
    model.llm.requires_grad_(False)
    texts = {
        tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    }
    texts |= {tuple(ids) for regs in batch["regions"] for _, ids in regs}
    first = cached(*args, batch["regions"])  # on its own, each text
    assert len(calls) == len(cached._text_memo) == len(texts)
    every = {tuple(t) for s in ds.samples for t in ds.processor.texts(s)}
    assert texts < every
    filled = ContrastiveModel(model, region_weight=1.0, text_cache=True)
    filled.load_state_dict(cm.state_dict())
    calls.clear()
    assert fill_text_cache(filled, ds) == len(every) and len(calls) == -(-len(every) // 64)
    again = filled(*args, batch["regions"])
    hook.remove()
    model.llm.requires_grad_(True)
    assert len(calls) == -(-len(every) // 64)  # the forward called no LM
    assert first.item() == pytest.approx(with_regions.item(), rel=1e-5)
    assert again.item() == pytest.approx(with_regions.item(), rel=1e-5)
    assert "regions" not in collate([ds[0]], tok.pad_id)
    # whitening a contrastive stage reads its images the way training does (annotations here)
    from modalign.train.run import whiten_vision

    assert whiten_vision(model, clip, 6)["tokens"] == 6 * model.num_image_tokens()
    # the conversation files still load for the class-token loss; a region term without boxes is refused
    from modalign.data.conversation import Conversation
    from modalign.train.contrastive import load_caption_samples

    assert all(isinstance(x, Conversation) for x in load_caption_samples(data / "captions.json"))
    no_boxes = load_recipe("tiny-stage0", {"data": str(data)}, [f"model.tokenizer={tok_dir}",
                           f"stages.clip.data.0.path={data / 'captions.json'}", "stages.clip.init_from=none"])  # fmt: skip
    with pytest.raises(
        ValueError, match=r"stage clip: region_contrastive is 1.0 but its data .*captions.json"
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
