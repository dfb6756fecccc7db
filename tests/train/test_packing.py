"""Sequence packing (several samples a row, block-diagonal attention, positions restarting per
sample): the same loss, gradients and per-sample logits as the padded batch, images kept with
their samples, and a recipe key that changes nothing while off; modality-length grouping."""

import json
import random
from pathlib import Path

import pytest
import torch

from modalign import MLLM, MLLMConfig
from modalign.data.collate import LengthGroupedSampler, balanced_pack, collate, pack
from modalign.data.conversation import IGNORE_INDEX
from modalign.data.datasets import Example
from modalign.train.objectives.lm import LMObjective
from modalign.train.recipe import _deep_merge, load_recipe
from modalign.train.run import run_recipe
from tests.tiny import TINY, recipe_doc

PAD, IMG = 0, 3


def tiny_model(placeholder: str = "per_token", **llm) -> MLLM:
    over = _deep_merge(TINY, {"placeholder": placeholder, "llm": llm})
    torch.manual_seed(0)
    return MLLM(MLLMConfig.from_dict(_deep_merge(MLLMConfig.from_name("tiny-shapes").to_dict(), over)))


def examples(per_image: int, seed: int = 0) -> list[Example]:
    """Image chats (1 or 2 images: placeholders, a prompt, a supervised reply) and text documents
    (every token supervised, the first one too), of mixed lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(9):
        n_img = [1, 0, 2, 0, 1, 1, 0, 2, 1][i]
        ids, labels = [1], [IGNORE_INDEX]
        for _ in range(n_img):
            ids += [IMG] * per_image + [rng.randrange(10, 400) for _ in range(rng.randrange(1, 4))]
        prompt = [rng.randrange(10, 400) for _ in range(rng.randrange(2, 9))]
        reply = [rng.randrange(10, 400) for _ in range(rng.randrange(2, 12))] + [2]
        if n_img:
            ids, labels = ids + prompt + reply, labels + [IGNORE_INDEX] * (len(ids) - 1 + len(prompt)) + reply
        else:  # a text document: loss on every token
            ids = prompt + reply
            labels = list(ids)
        px = [
            torch.randn(3, 96, 96, generator=torch.Generator().manual_seed(100 * i + k)) for k in range(n_img)
        ]
        out.append(Example(f"s{i}", ids, labels, px, image_keys=[f"im{i}-{k}" for k in range(n_img)]))
    return out


def test_first_fit_decreasing_fills_rows_up_to_the_length():
    lengths = [5, 3, 4, 2, 6, 1, 9, 12]
    bins = pack(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 or len(b) == 1 for b in bins)
    assert [7] in bins and [6] in bins  # longer than a row, or a row alone: a row of its own
    assert bins == pack(lengths, 8) and len(bins) == 5  # 9 | 12 | 6+2 | 5+3 | 4+1 (first fit decreasing)
    with pytest.raises(ValueError, match="pack length"):
        pack(lengths, 0)
    # evened out: as few rows (3 of 16 for 42 tokens) but 14 + 14 + 14 instead of 10 + 16 + 16
    even = balanced_pack(lengths, 16)
    assert sorted(sum(lengths[i] for i in b) for b in pack(lengths, 16)) == [10, 16, 16]
    assert [sum(lengths[i] for i in b) for b in even] == [14, 14, 14]
    assert sorted(i for b in even for i in b) == list(range(8)) and balanced_pack([3], 8) == [[0]]


# learned absolute positions: RoPE alone would not notice positions that fail to restart per sample
LLMS = {"per_token": {}, "per_image": {}, "mam": {"mam": True}, "learned": {"position": "learned"}}


@pytest.mark.parametrize("name", LLMS)
def test_packed_batch_gives_the_padded_batchs_loss_gradients_and_logits(name):
    placeholder = "per_image" if name == "per_image" else "per_token"
    model = tiny_model(placeholder, **LLMS[name]).train()  # no dropout anywhere: train mode is deterministic
    n_vis = model.num_image_tokens()
    per_image = n_vis if placeholder == "per_token" else 1
    extra = n_vis - 1 if placeholder == "per_image" else 0
    exs = examples(per_image)
    pack_length = 60
    flat, packed = collate(exs, PAD), collate(exs, PAD, pack_length=pack_length, image_extra=extra)
    assert packed["input_ids"].shape[0] < len(exs) and packed["input_ids"].shape[1] <= pack_length

    # the rows: whole samples, their images in order, the first label of each sample ignored
    assert sorted(packed["ids"]) == sorted(ex.id for ex in exs)
    by_id = {ex.id: ex for ex in exs}
    order = [by_id[i] for i in packed["ids"]]
    assert torch.equal(packed["pixel_values"], torch.stack([p for ex in order for p in ex.pixel_values]))
    assert packed["image_keys"] == [k for ex in order for k in ex.image_keys]
    assert sum(packed["image_counts"]) == sum(len(ex.pixel_values) for ex in exs)
    k = 0
    for r in range(packed["input_ids"].shape[0]):
        seq = packed["seq_ids"][r]
        assert int(packed["attention_mask"][r].sum()) == int((seq > 0).sum())
        assert int((seq > 0).sum()) + extra * packed["image_counts"][r] <= pack_length
        for n in range(1, int(seq.max()) + 1):
            ex, at = order[k], (seq == n).nonzero().flatten()
            assert packed["input_ids"][r, at].tolist() == ex.input_ids
            assert packed["labels"][r, at].tolist() == [IGNORE_INDEX, *ex.labels[1:]]
            k += 1
    assert k == len(exs)

    # the model: loss, per-sample logits and gradients, through MLLM.forward and the trainer's objective
    def run(batch, packed_batch: bool):
        model.zero_grad(set_to_none=True)
        mask = {"seq_ids": batch["seq_ids"]} if packed_batch else {"attention_mask": batch["attention_mask"]}
        out = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"], **mask)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        obj_loss, obj_n = LMObjective(model)(batch)
        obj_loss.backward()
        obj_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads, obj_loss.detach(), obj_n, obj_grads

    f_out, f_grads, f_obj, f_n, f_obj_grads = run(flat, False)
    p_out, p_grads, p_obj, p_n, p_obj_grads = run(packed, True)
    assert f_out.num_tokens == p_out.num_tokens == f_n == p_n > 0
    assert abs(f_out.loss.item() - p_out.loss.item()) < 1e-5
    assert abs(f_obj.item() - p_obj.item()) < 1e-5 and abs(f_obj.item() - f_out.loss.item()) < 1e-5
    assert f_grads.keys() == p_grads.keys() == f_obj_grads.keys() == p_obj_grads.keys()
    for name in f_grads:
        assert (f_grads[name] - p_grads[name]).abs().max() < 1e-5, name
        assert (f_obj_grads[name] - p_obj_grads[name]).abs().max() < 1e-5, name
    assert any(n.startswith("vision.") for n in f_grads)  # the images are in the gradient
    # each sample's logits, found after the splice (per-image placeholders grow the rows)
    f_mask, row = f_out.attention_mask, {ex.id: r for r, ex in enumerate(exs)}
    k = 0
    for r in range(p_out.seq_ids.shape[0]):
        for n in range(1, int(p_out.seq_ids[r].max()) + 1):
            sid = packed["ids"][k]
            mine = p_out.logits[r, p_out.seq_ids[r] == n]
            theirs = f_out.logits[row[sid], f_mask[row[sid]].bool()]
            assert mine.shape == theirs.shape and (mine - theirs).abs().max() < 1e-5, sid
            k += 1


def test_packed_positions_and_attention_stay_within_each_sample():
    from modalign.models.layers import positions_from_seq_ids

    seq = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert positions_from_seq_ids(seq).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    llm = tiny_model().llm
    masks = llm._masks(None, 2, 8, 0, seq.device, seq)["full"][:, 0]
    assert masks[0, 4].tolist() == [False, False, False, True, True, False, False, False]
    assert masks[0, 6].tolist() == [False] * 6 + [True, False]  # padding sees only itself
    assert torch.equal(masks[1], torch.ones(8, 8, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="seq_ids"):
        llm(torch.ones(1, 8, dtype=torch.long), attention_mask=torch.ones(1, 8), seq_ids=seq[:1])


def _losses(run: Path) -> list[tuple]:
    return [(s, r["step"], r["loss"], r["tokens"]) for s in ("align", "instruct")
            for r in map(json.loads, (run / s / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # fmt: skip


def _weights(run: Path) -> dict[str, bytes]:
    return {s: (run / s / "model" / "model.safetensors").read_bytes() for s in ("align", "instruct")}


def test_a_recipe_trains_packed_and_is_unchanged_with_packing_off(world, tmp_path):
    """Off (the default, or said): the same bytes. On: the same losses within float tolerance
    (no dropout: its masks follow the batch's shape) and the same real tokens counted."""
    doc = recipe_doc(world, steps=3, save_every=0)
    doc["stages"][1]["optim"]["dropout"] = 0.0
    run_recipe(load_recipe(doc), tmp_path / "plain", progress=False)
    off = ["stages.align.data.packing=false", "stages.instruct.data.packing=false"]
    run_recipe(load_recipe(doc, sets=off), tmp_path / "off", progress=False)
    assert _weights(tmp_path / "plain") == _weights(tmp_path / "off")
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "off")
    on = ["stages.align.data.packing=true", "stages.instruct.data.packing=true",
          "stages.instruct.data.pack_length=192"]  # fmt: skip
    run_recipe(load_recipe(doc, sets=on), tmp_path / "on", progress=False)
    plain, packed = _losses(tmp_path / "plain"), _losses(tmp_path / "on")
    assert [(s, n, t) for s, n, _, t in plain] == [(s, n, t) for s, n, _, t in packed]  # real tokens only
    for (_, _, a, _), (_, _, b, _) in zip(plain, packed, strict=True):
        assert abs(a - b) < 1e-4
    assert _weights(tmp_path / "plain") != _weights(tmp_path / "on")  # a different (packed) computation
    recs = [json.loads(x) for x in (tmp_path / "on" / "instruct" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["padding"] < 0.2 for r in recs)  # logged with packing on only
    assert "padding" not in (tmp_path / "plain" / "instruct" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("override,error", [
    ("stages.align.data.pack_length=0", r"stages\[0\]\.data\.pack_length: expected a token count >= 1"),
    ("stages.align.objective={name: lm, answer_prior: {weight: 1}}", r"stages\[0\]\.data\.packing: the answer prior"),
    ("stages.align.objective=contrastive", r"stages\[0\]\.data\.packing: only the lm objective"),
])  # fmt: skip
def test_packing_options_are_checked(world, override, error):
    from modalign.config import ConfigError

    with pytest.raises(ConfigError, match=error):
        load_recipe(recipe_doc(world), sets=["stages.align.data.packing=true", override])


class _Lengths:
    def __init__(self, n: int, seed: int = 0):
        rng = random.Random(seed)
        self.lens = [rng.randrange(5, 500) for _ in range(n)]
        self.text = [rng.random() < 0.3 for _ in range(n)]

    def __len__(self):
        return len(self.lens)

    def length(self, i):
        return self.lens[i]

    def is_text_only(self, i):
        return self.text[i]


def test_modality_length_grouping_keeps_modalities_apart_in_length_sorted_batches():
    ds = _Lengths(203)
    s = LengthGroupedSampler(ds, batch_size=4, seed=3, by_modality=True, mega=8)
    batches = s.batches()
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))  # a permutation of the data
    assert all(len({ds.text[i] for i in b}) == 1 for b in batches)  # never mixed, remainders neither
    assert sum(len(b) < 4 for b in batches) <= 2  # one short batch per modality at most
    assert all([ds.lens[i] for i in b] == sorted((ds.lens[i] for i in b), reverse=True) for b in batches)

    # length grouping: a batch's lengths are close (sorted within 32-sample mega-batches)
    def spread(bs):
        return sum(max(ds.lens[i] for i in b) - min(ds.lens[i] for i in b) for b in bs) / len(bs)

    plain = LengthGroupedSampler(ds, batch_size=4, seed=3, by_modality=True, mega=1).batches()
    assert spread(batches) < 0.5 * spread(plain)
    s.set_epoch(1)
    assert s.batches() != batches and sorted(i for b in s.batches() for i in b) == list(range(len(ds)))


def test_a_compiled_stage_trains_as_the_eager_one(world, tmp_path, monkeypatch):
    """``compile: true`` puts the LLM's forward through torch.compile for its stage only (here with
    dynamo's eager backend: the wiring, not inductor's kernels), packed rows included."""
    doc = recipe_doc(world, steps=2, save_every=0)
    doc["stages"][1]["optim"]["dropout"] = 0.0
    packed = ["stages.instruct.data.packing=true"]
    run_recipe(load_recipe(doc, sets=packed), tmp_path / "eager", progress=False)
    real, calls = torch.compile, []

    def spy(fn, **kw):
        calls.append(fn.__self__)
        return real(fn, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", spy)
    run_recipe(
        load_recipe(doc, sets=[*packed, "stages.instruct.compile=true"]),
        tmp_path / "compiled",
        progress=False,
    )
    assert len(calls) == 1 and "forward" not in vars(calls[0])  # the instruct stage's LLM, restored after it
    for (_, _, a, _), (_, _, b, _) in zip(
        _losses(tmp_path / "eager"), _losses(tmp_path / "compiled"), strict=True
    ):
        assert abs(a - b) < 1e-5
