"""Training precisions and devices: bf16 autocast and pure bf16 with fp32 master weights (exact
resume, masters in the checkpoints), ``--dtype`` / ``--device`` on ``modalign train``, and the
per-GPU memory plan."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from modalign import MLLM
from modalign.cli import main
from modalign.train.plan import plan
from modalign.train.recipe import load_recipe
from modalign.train.run import run_recipe
from modalign.train.state import checkpoints
from tests.tiny import recipe_doc


def _losses(run):
    return [(s, r["step"], r["loss"]) for s in ("align", "instruct")
            for r in map(json.loads, (run / s / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # fmt: skip


def _bf16(t: torch.Tensor) -> bool:
    return torch.equal(t.float(), t.bfloat16().float())


def test_pure_bf16_steps_fp32_masters_and_resumes_exactly(world, tmp_path):
    doc = recipe_doc(world, steps=6, save_every=2)
    for s in doc["stages"]:
        s["precision"] = "bf16-pure"
    full = tmp_path / "full"
    run_recipe(load_recipe(doc), full, progress=False)
    # a checkpoint holds the fp32 masters of what trains and the bf16 weights of what does not
    last = load_file(str(checkpoints(full / "instruct" / "checkpoints")[-1] / "model.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in last.items() if k.startswith(("llm.", "connector.")))
    assert not all(_bf16(v) for k, v in last.items() if k.startswith("llm.layers."))
    assert all(v.dtype == torch.bfloat16 for k, v in last.items() if k.startswith("vision."))
    # cut after step 4 of the second stage: the resumed run ends bit-identical
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for p in (cut / "model", cut / "instruct" / "model", cut / "instruct" / "checkpoints" / "step-000006"):
        shutil.rmtree(p)
    (cut / "instruct" / "result.json").unlink()
    run_recipe(load_recipe(doc), cut, progress=False)
    assert _losses(cut) == _losses(full) and len(_losses(full)) == 12
    a, b = MLLM.from_pretrained(full / "model"), MLLM.from_pretrained(cut / "model")
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    # the stage's result is the fp32 masters, not their rounding
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert not all(_bf16(p) for n, p in a.named_parameters() if n.startswith("llm.layers."))
    fp32 = tmp_path / "fp32"
    doc32 = recipe_doc(world, steps=6, save_every=2)
    run_recipe(load_recipe(doc32), fp32, progress=False)
    l16, l32 = [x[2] for x in _losses(full)], [x[2] for x in _losses(fp32)]
    assert l16 != l32 and max(abs(x - y) for x, y in zip(l16, l32, strict=True)) < 0.25  # the same training


@pytest.mark.parametrize(
    "dtype,precision", [("bfloat16", "bf16"), ("bfloat16-pure", "bf16-pure"), ("float32", "fp32")]
)
def test_train_dtype_sets_every_stage_precision(world, tmp_path, dtype, precision):
    import yaml

    doc = recipe_doc(world, steps=1, save_every=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    assert (
        main(["train", str(recipe), "--out", str(out), "--dtype", dtype, "--device", "cpu", "--no-progress"])
        == 0
    )
    resolved = json.loads((out / "resolved_recipe.json").read_text())
    assert [s["precision"] for s in resolved["stages"]] == [precision, precision]


def test_train_device_and_dtype_errors_name_the_flag(world, tmp_path, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_doc(world, steps=1)))
    assert main(["train", str(recipe), "--out", str(tmp_path / "a"), "--dtype", "half"]) == 2
    assert "--dtype: unknown 'half'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", str(recipe), "--out", str(tmp_path / "b"), "--device", "cuda:3"]) == 2
        assert "device 'cuda:3' is not available here" in capsys.readouterr().err


def test_plan_divides_sharded_state_by_the_gpus_and_counts_bf16_pure():
    r = load_recipe("llava-1.5", {"data": "nowhere", "llm": "missing-llm", "vision": "missing-vision"})
    one, eight = plan(r, gpus=1), plan(r, gpus=8)
    assert "part shapes from the preset" in one[0]["note"]
    ft1, ft8 = one[1]["memory_bytes"], eight[1]["memory_bytes"]  # finetune: LLM + projector train
    for k in ("weights", "gradients", "optimizer"):
        assert ft8[k] == pytest.approx(ft1[k] / 8)
    assert ft8["activations_estimate"] == ft1["activations_estimate"]
    n, t = one[1]["trainable"] + one[1]["frozen"], one[1]["trainable"]
    assert ft1["weights"] == 4 * n and ft1["optimizer"] == 8 * t
    assert 6.5e9 < t < 7.2e9 and one[0]["trainable"] < 3e7  # a 7B decoder; stage 1 trains the projector
    r.stages[1].precision = "bf16-pure"
    pure = plan(r, gpus=1)[1]["memory_bytes"]
    assert pure["weights"] == 2 * n + 4 * t
    per_token = [r["seconds_per_step"] / r["tokens_per_step_max"] for r in eight]
    assert per_token[1] > per_token[0] * 1.25  # the LLM's weight gradients on top of the backward through it
    assert one[0]["steps"] is None  # no data here: no step count
