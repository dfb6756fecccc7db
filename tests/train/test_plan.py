"""``modalign train RECIPE --plan``: the time per step is the sum of each part's work over the rows it
reads (tower per image position, connector per row it reads, LLM per token); objectives that never
run the LLM neither cost it nor keep its activations; a tower that trains keeps activations."""

from __future__ import annotations

import json

import pytest
import torch

from modalign.cli import main
from modalign.config import MLLMConfig
from modalign.models.mllm import MLLM
from modalign.train.plan import plan
from modalign.train.recipe import load_recipe

TFLOPS, MFU = 100.0, 0.5
FULL = {n: "nowhere" for n in ("data", "llm", "vision", "bert")}


def _numel(module, skip=()) -> int:
    drop = {id(p) for m in skip for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in drop)


def _tiny(preset: str, sources: list[dict], trainable: list[str], ckpt: bool = True) -> dict:
    return {"name": "plan-test", "model": {"preset": preset},
            "stages": [{"name": "s", "trainable": trainable, "gradient_checkpointing": ckpt, "precision": "bf16",
                        "data": {"sources": sources, "batch_size": 4, "max_length": 40},
                        "optim": {"grad_accum": 3}, "stop": {"max_steps": 5}}]}  # fmt: skip


@pytest.mark.parametrize("preset", ["tiny-shapes", "tiny-llava"])  # per-token / per-image placeholders
def test_step_flops_are_each_parts_parameters_times_the_rows_it_reads(preset):
    with torch.device("meta"):
        m = MLLM(MLLMConfig.from_name(preset))
    cfg = m.config
    # the tower runs up to its feature layer (-2: all but the top layer) over every position
    n_vis = _numel(m.vision, m.vision.encoder.layers[cfg.vision.num_layers - 1 :])
    positions = cfg.vision.grid**2 + 1  # patches + the class token
    n_con, patches = _numel(m.connector), cfg.vision.grid**2  # an MLP projector reads every patch
    n_llm = _numel(m.llm, [m.llm.embed_tokens])  # the input table is a lookup; the head counts
    tokens = 40 + (patches - 1 if cfg.placeholder == "per_image" else 0)  # the splice's visual tokens
    samples = 4 * 3  # batch x grad_accum

    row = plan(load_recipe(_tiny(preset, [{"path": "nowhere/x.json"}], ["connector.*"])), 1, TFLOPS, MFU)[0]
    vision = 2 * n_vis * positions  # frozen, first: forward only
    connector = 3 * 2 * n_con * patches  # forward, input and weight gradients
    llm = 3 * 2 * n_llm * tokens  # forward, input gradients, the checkpointed forward again
    want = {"vision": samples * vision, "connector": samples * connector, "llm": samples * llm}
    assert row["seconds_per_step"] == pytest.approx(sum(want.values()) / (TFLOPS * 1e12 * MFU))
    assert row["flops_per_step"] == pytest.approx(want)

    # the tower and the LLM train too, without checkpointing: weight gradients on every part
    row = plan(load_recipe(_tiny(preset, [{"path": "nowhere/x.json"}], ["vision.*", "connector.*", "llm.*"],
                                 ckpt=False)), 1, TFLOPS, MFU)[0]  # fmt: skip
    n_llm_w = n_llm  # the embedding table trains but its gradient is a scatter: no FLOPs
    want = {"vision": samples * 3 * 2 * n_vis * positions, "connector": samples * connector,
            "llm": samples * (2 * 2 * n_llm + 2 * n_llm_w) * tokens}  # fmt: skip
    assert row["seconds_per_step"] == pytest.approx(sum(want.values()) / (TFLOPS * 1e12 * MFU))
    assert row["flops_per_step"] == pytest.approx(want)


def test_images_per_sample_come_from_the_data_where_it_can_be_read(tmp_path):
    def conv(i, image):
        rec = {"id": str(i), "conversations": [{"from": "human", "value": "<image>\nWhat?" if image else "Hi"},
                                               {"from": "gpt", "value": "Shapes."}]}  # fmt: skip
        return rec | ({"image": f"{i}.png"} if image else {})

    (tmp_path / "caps.json").write_text(json.dumps([conv(i, True) for i in range(6)]))
    (tmp_path / "text.json").write_text(json.dumps([conv(i, False) for i in range(4)]))
    with torch.device("meta"):
        m = MLLM(MLLMConfig.from_name("tiny-shapes"))
    fwd = 2 * _numel(m.vision, m.vision.encoder.layers[-1:]) * (m.config.vision.grid**2 + 1)

    def row(sources):
        return plan(load_recipe(_tiny("tiny-shapes", sources, ["connector.*"])), 1, TFLOPS, MFU)[0]

    def vision(sources):
        return row(sources)["flops_per_step"]["vision"]

    text, caps = {"path": str(tmp_path / "text.json")}, {"path": str(tmp_path / "caps.json")}
    assert row([text])["seconds_per_step"] < row([caps])["seconds_per_step"]
    assert vision([text]) == 0  # text-only data runs no tower
    assert vision([caps]) == pytest.approx(12 * fwd)
    assert vision([caps | {"weight": 3}, text]) == pytest.approx(12 * 0.75 * fwd)  # as the mixture draws
    assert vision([{"path": str(tmp_path / "missing.json")}]) == pytest.approx(12 * fwd)  # unknown: one image


def test_blip2_stage_one_runs_no_llm_and_is_the_towers_cost():
    recipe = load_recipe("blip2", FULL)
    cfg = recipe.model.build_config(read_init=False)
    with torch.device("meta"):
        m = MLLM(cfg)
    rep, gen = plan(recipe, 1, TFLOPS, MFU)
    assert rep["objective"] == "qformer"
    # ViT-g at 224 px over every image (256 patches + class token), frozen: its forward alone
    assert cfg.vision.grid**2 + 1 == 257
    tower = recipe.stages[0].data.batch_size * 2 * _numel(m.vision) * 257
    assert rep["seconds_per_step"] > tower / (TFLOPS * 1e12 * MFU)
    # nothing of OPT: a deeper LLM changes neither the time nor the memory of stage 1 (it does stage 2's)
    deep = plan(load_recipe("blip2", FULL, sets=["model.overrides={llm: {num_layers: 64}}"]), 1, TFLOPS, MFU)
    assert deep[0]["seconds_per_step"] == pytest.approx(rep["seconds_per_step"])
    assert deep[0]["memory_bytes"]["activations_estimate"] == rep["memory_bytes"]["activations_estimate"]
    assert deep[1]["seconds_per_step"] > 1.5 * gen["seconds_per_step"]
    assert deep[1]["memory_bytes"]["activations_estimate"] > gen["memory_bytes"]["activations_estimate"]
    assert rep["flops_per_step"]["llm"] == 0 and rep["activations_bytes"]["llm"] == 0
    assert rep["flops_per_step"]["vision"] == pytest.approx(tower)


def test_a_tower_that_trains_keeps_its_activations():
    train = plan(load_recipe("mplug-owl", FULL), 1, TFLOPS, MFU)[0]  # stage 1: tower + abstractor
    frozen = plan(
        load_recipe("mplug-owl", FULL, sets=["stages.pretrain.trainable=[connector.*]"]), 1, TFLOPS, MFU
    )[0]
    recipe = load_recipe("mplug-owl", FULL)
    stage, v = recipe.stages[0], recipe.model.build_config(read_init=False).vision
    assert stage.gradient_checkpointing and v.feature_layer == -1  # every layer runs, checkpointed
    # batch x images x positions x hidden x (2 x layers + 34) bytes
    term = stage.data.batch_size * 1 * (v.grid**2 + 1) * v.hidden_size * (2 * v.num_layers + 34)
    act = "activations_estimate"
    assert train["memory_bytes"][act] - frozen["memory_bytes"][act] == term
    assert train["activations_bytes"]["vision"] == term and frozen["activations_bytes"]["vision"] == 0
    # its time: input and weight gradients and the checkpointed forward on top of the forward
    assert train["flops_per_step"]["vision"] == pytest.approx(4 * frozen["flops_per_step"]["vision"])
    assert train["flops_per_step"]["llm"] == pytest.approx(frozen["flops_per_step"]["llm"])


def test_plan_prints_the_flops_of_each_part(capsys):
    assert main(["train", "blip2", "--plan", "--var", "llm=nowhere", "--var", "vision=nowhere",
                 "--var", "bert=nowhere", "--data", "nowhere"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("TFLOP per GPU per step (forward + backward): ")]
    assert len(lines) == 2 and "llm 0.0;" in lines[0] and "vision " in lines[0] and "connector " in lines[0]


def test_a_frozen_connector_under_a_trained_projection_keeps_only_the_projections_activations():
    """MiniGPT-4 trains the Q-Former's last linear layer alone: gradients stop there."""
    names = {"data": "nowhere", "llm": "nowhere", "blip2": "nowhere", "qformer": "nowhere"}
    recipe = load_recipe("minigpt4", names)
    cfg = recipe.model.build_config(read_init=False)
    row = plan(recipe, 1, TFLOPS, MFU)[0]
    q, d, llm = cfg.connector.num_queries, cfg.connector.hidden_size, cfg.llm.hidden_size
    batch = recipe.stages[0].data.batch_size
    proj = 2 * (d * llm + llm)  # the projection's forward FLOPs per query row
    stage, n = recipe.stages[0], cfg.llm.num_layers
    # one placeholder per image, which the splice replaces by the queries' tokens
    tokens = stage.data.max_length + (q - 1 if cfg.placeholder == "per_image" else 0)
    decoder = batch * tokens * llm * (2 * n + 34 if stage.gradient_checkpointing else 34 * n)
    assert row["memory_bytes"]["activations_estimate"] == decoder + batch * q * 2 * (d + llm)
    assert row["activations_bytes"]["connector"] == batch * q * 2 * (d + llm)
    assert row["activations_bytes"]["vision"] == 0
    # the whole Q-Former forward, plus the projection's input and weight gradients
    frozen = plan(
        load_recipe("minigpt4", names, sets=["stages.pretrain.trainable=[llm.norm.*]"]), 1, TFLOPS, MFU
    )[0]
    assert row["flops_per_step"]["connector"] == pytest.approx(
        frozen["flops_per_step"]["connector"] + batch * 2 * q * proj
    )
