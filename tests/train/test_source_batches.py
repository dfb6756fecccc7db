"""``data.mix: batch``: every optimiser step takes one batch of each source, with the source's own
batch size, token limit and loss weight (OpenFlamingo's LAION and MMC4 batches)."""

import copy
import json
import shutil
from collections import Counter

import pytest
import torch

from modalign import MLLM
from modalign.config import ConfigError
from modalign.data.collate import SourceBatches
from modalign.data.conversation import BadSample
from modalign.data.datasets import SourcesDataset
from modalign.data.tokenizer import Tokenizer
from modalign.train import trainer as tr
from modalign.train.recipe import load_recipe
from modalign.train.run import run_recipe, setup_stage
from tests.tiny import recipe_doc


@pytest.fixture
def data(world):
    return world


def joint_doc(data, steps=4, save_every=2, weights=(0.2, 1.0), grad_accum=1, chat_max=None):
    doc = recipe_doc(data, steps=steps, save_every=save_every)
    inst = doc["stages"][1]
    inst["data"]["mix"] = "batch"
    inst["data"]["sources"] = [
        {"path": str(data / "instruct.json"), "batch_size": 3, "max_length": 64, "loss_weight": weights[0]},
        {"path": str(data / "text_instruct.json"), "batch_size": 2, "max_length": chat_max, "loss_weight": weights[1]},
    ]  # fmt: skip
    inst["optim"]["grad_accum"] = grad_accum
    return doc


class _Sizes:
    def __init__(self, sizes):
        self.datasets = [range(n) for n in sizes]
        self.names = [f"s{k}" for k in range(len(sizes))]

    def sizes(self):
        return [len(d) for d in self.datasets]

    @property
    def offsets(self):
        out = [0]
        for d in self.datasets:
            out.append(out[-1] + len(d))
        return out


def test_rounds_hold_one_full_batch_of_each_source_and_cycle_the_smaller():
    ds = _Sizes([10, 3])
    s = SourceBatches(ds, [4, 2], seed=5)
    assert s.rounds == 3 and len(s) == 6  # ceil(10 / 4) rounds
    b = s.batches()
    assert [len(x) for x in b] == [4, 2] * 3 and [s.source_of(i) for i in range(6)] == [0, 1] * 3
    big = [i for x in b[0::2] for i in x]
    small = [i - 10 for x in b[1::2] for i in x]
    assert all(0 <= i < 10 for i in big) and all(0 <= i < 3 for i in small)
    assert sorted(big[:10]) == list(range(10))  # the largest source drawn whole, then its next cycle
    assert sorted(small[:3]) == list(range(3)) and sorted(small[3:6]) == list(
        range(3)
    )  # whole before repeats
    assert (
        SourceBatches(ds, [4, 2], seed=5).batches() == b and SourceBatches(ds, [4, 2], seed=6).batches() != b
    )
    s.set_epoch(1)  # the next epoch goes on along each cycle
    nxt = [i for x in s.batches()[0::2] for i in x]
    assert Counter(big[10:] + nxt[:8]) == Counter(range(10))
    with pytest.raises(ValueError, match="data source s1 holds no samples"):
        SourceBatches(_Sizes([4, 0]), [2, 2])


def _set(path, value):
    def edit(doc):
        node = doc["stages"][1]["data"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    "edit, error",
    [
        (_set(["mix"], "rounds"), r"stages\[1\]\.data\.mix: expected sample or batch, got 'rounds'"),
        (_set(["sources", 0, "weight"], 0.5), r"sources\[0\]\.weight: with .*mix: batch every step"),
        (_set(["packing"], True), r"data\.packing: not with mix: batch"),
        (_set(["samples"], 10), r"data\.samples: mixture draws do not apply"),
        (_set(["sources", 1, "loss_weight"], -1.0), r"sources\[1\]\.loss_weight: expected a finite number"),
        (_set(["sources", 1, "max_length"], 0), r"sources\[1\]\.max_length: expected a token count"),
        (_set(["sources", 0, "batch_size"], 0), r"sources\[0\]\.batch_size: expected >= 1"),
    ],
)
def test_joint_recipe_errors_name_the_key(data, edit, error):
    doc = joint_doc(data)
    edit(doc)
    with pytest.raises(ConfigError, match=error):
        load_recipe(doc)


def test_a_sources_batch_size_needs_mix_batch(data):
    doc = joint_doc(data)
    doc["stages"][1]["data"]["mix"] = "sample"
    with pytest.raises(ConfigError, match=r"sources\[0\]\.batch_size: a source's own batch_size needs"):
        load_recipe(doc)


def test_a_step_is_the_weighted_sum_of_one_batch_per_source(data, tmp_path):
    """The step's gradient is 0.2 x grad(loss of the first source's batch) + grad(loss of the
    second's), each batch as long as its source's limit; the logged loss is that sum."""
    recipe = load_recipe(joint_doc(data, chat_max=72))
    tok = Tokenizer.from_dir(data / "tokenizer")
    torch.manual_seed(0)
    model = MLLM(recipe.model.build_config())
    target, dataset, collator, _ = setup_stage(recipe, 1, model, tok)
    assert isinstance(dataset, SourcesDataset)
    t = tr.Trainer(target, recipe.stages[1], dataset, collator, tmp_path / "s", progress=False)
    b0, b1 = t.sampler.batches()[:2]
    assert len(b0) == 3 and len(b1) == 2 and all(dataset.locate(i)[0] == 1 for i in b1)
    # the text chats (41-86 tokens) are cut at their source's 72, not at the stage's 96: some
    # lose their reply (bad samples, skipped), the others hold at most 72 tokens
    chats = [dataset[i] for i in range(len(dataset)) if dataset.locate(i)[0] == 1]
    kept = [len(x.input_ids) for x in chats if not isinstance(x, BadSample)]
    assert max(kept) <= 72 and len(kept) < len(chats) and max(kept) > 64
    ref = copy.deepcopy(target)
    params = [p for p in ref.parameters() if p.requires_grad]
    l0, _ = ref(collator([dataset[i] for i in b0]))
    l1, _ = ref(collator([dataset[i] for i in b1]))
    want = torch.autograd.grad(0.2 * l0 + 1.0 * l1, params)
    name_of = {id(p): n for n, p in target.named_parameters()}
    got = {}
    t.opt.step = lambda: got.update(
        {name_of[id(p)]: p.grad.clone() for g in t.opt.param_groups for p in g["params"]}
    )
    t.stage.optim.clip = None
    from modalign.train.trainer import Progress

    pr = Progress()
    loss, ntok, _ = t._step(pr, t._micro_batches(0, 0))
    assert pr.micro == 2 and loss == pytest.approx(0.2 * l0.item() + l1.item(), rel=1e-6)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert sorted(got) == sorted(names)
    for n, w in zip(names, want, strict=True):
        torch.testing.assert_close(got[n], w, rtol=1e-5, atol=1e-7)
    assert t._source_loss == {recipe.stages[1].data.sources[0].path: pytest.approx(l0.item(), rel=1e-6),
                              recipe.stages[1].data.sources[1].path: pytest.approx(l1.item(), rel=1e-6)}  # fmt: skip


def test_joint_stage_resumes_exactly(data, tmp_path):
    doc = joint_doc(data, steps=4, save_every=2, grad_accum=2)
    run = tmp_path / "run"
    first = run_recipe(load_recipe(doc), run, progress=False)
    assert first["instruct"].steps == 4
    recs = [json.loads(x) for x in (run / "instruct" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r["source_loss"]) == {s["path"] for s in doc["stages"][1]["data"]["sources"]}
               for r in recs if "loss" in r)  # fmt: skip
    want = MLLM.from_pretrained(run / "model").state_dict()
    # as if killed after step 2: its checkpoint is the newest, the stage unfinished
    ckpts = sorted((run / "instruct" / "checkpoints").iterdir())
    shutil.rmtree(ckpts[-1])
    for p in ("model", "instruct/model"):
        shutil.rmtree(run / p, ignore_errors=True)
    (run / "instruct" / "result.json").unlink()
    again = run_recipe(load_recipe(doc), run, progress=False)
    assert again["instruct"].steps == 4
    got = MLLM.from_pretrained(run / "model").state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    # another per-source batch size is another data layout: refused, not resumed elsewhere
    shutil.rmtree(run / "instruct" / "model")
    (run / "instruct" / "result.json").unlink()
    doc["stages"][1]["data"]["sources"][1]["batch_size"] = 1
    doc["stages"][1]["stop"]["max_steps"] = 6
    with pytest.raises(ValueError, match="source_batches"):
        run_recipe(load_recipe(doc), run, progress=False)


def test_a_source_without_usable_rows_leaves_the_logged_loss_the_others_weighted_sum(data, tmp_path):
    """A step whose text-chat batch is all bad (each chat cut to 8 tokens loses its reply) trains
    and logs 0.2 x the caption batch's loss alone, not that doubled."""
    doc = joint_doc(data, chat_max=8)
    doc["stages"][1]["data"]["bad_samples"] = {"mode": "skip", "max_fraction": 1.0}
    recipe = load_recipe(doc)
    torch.manual_seed(0)
    target, dataset, collator, _ = setup_stage(recipe, 1, MLLM(recipe.model.build_config()),
                                               Tokenizer.from_dir(data / "tokenizer"))  # fmt: skip
    t = tr.Trainer(target, recipe.stages[1], dataset, collator, tmp_path / "s", progress=False)
    b0 = t.sampler.batches()[0]
    with torch.no_grad():
        l0, _ = copy.deepcopy(target)(collator([dataset[i] for i in b0]))
    loss, _, _ = t._step(tr.Progress(), t._micro_batches(0, 0))
    assert loss == pytest.approx(0.2 * l0.item(), rel=1e-6)
    assert list(t._source_loss) == [recipe.stages[1].data.sources[0].path]


def test_under_ddp_a_text_only_source_trains_beside_an_image_one(data, tmp_path):
    """Two processes of 3 captions and 2 text chats a step (a text-only batch leaves the connector
    unused: its gradient reduction never completed and the second step failed) train as one
    process of 6 and 4 does, up to each process taking the mean over its own rows; every step's
    loss is 0.2 x the captions' loss + the chats' loss, each over both processes' rows."""
    import os
    import subprocess
    import sys

    import yaml

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    runs = {}
    for name, world in (("one", 1), ("two", 2)):
        doc = joint_doc(data, steps=3, save_every=0)
        doc["parallel"] = {"strategy": "ddp" if world > 1 else "none"}
        doc["stages"] = doc["stages"][1:]
        for src, b in zip(doc["stages"][0]["data"]["sources"], (3, 2), strict=True):
            src["batch_size"] = b * (2 // world)
        doc["stages"][0]["optim"]["dropout"] = 0.0
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
        out = tmp_path / name
        cmd = ["-m", "modalign.cli", "train", str(tmp_path / f"{name}.yaml"), "--out", str(out), "--data", str(data),
               "--no-progress"]  # fmt: skip
        if world > 1:
            cmd = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0", "--rdzv_backend=c10d",
                   "--rdzv_endpoint=127.0.0.1:0", *cmd]  # fmt: skip
        subprocess.run([sys.executable, *cmd], env=env, check=True, capture_output=True, timeout=600)
        recs = [json.loads(x) for x in (out / "instruct" / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([r["loss"] for r in recs if "loss" in r], [r["source_loss"] for r in recs if "loss" in r],
                      MLLM.from_pretrained(out / "model").state_dict())  # fmt: skip
    (la, sa, _), (lb, sb, _) = runs["one"], runs["two"]
    paths = [src["path"] for src in joint_doc(data)["stages"][1]["data"]["sources"]]
    for loss, by in zip(la + lb, sa + sb, strict=True):
        assert list(by) == paths and loss == pytest.approx(0.2 * by[paths[0]] + by[paths[1]], rel=1e-9)
    assert len(lb) == 3 and lb == pytest.approx(la, rel=2e-2)
