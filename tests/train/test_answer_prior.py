"""Training against a question-only answer prior: the prior's rows, the loss it enters, and a stage
that trains with it (the saved model answers alone)."""

import math

import pytest
import torch
import torch.nn.functional as F

from modalign.data.conversation import Conversation, Message, get_template
from modalign.data.datasets import ConversationDataset, MixtureDataset, SampleProcessor, TextSample
from modalign.data.tokenizer import Tokenizer
from modalign.train.objectives.answer_prior import FLOOR, AnswerPrior
from modalign.train.objectives.lm import supervised_lm_loss
from tests.tiny import recipe_doc


def chat(sid, q, a):
    return Conversation([Message("user", q), Message("assistant", a)], [], sid)


@pytest.fixture(scope="module")
def tok():
    texts = ["What colour is the star?", "What colour is the circle?", "Is it round?", "orange blue red yes"]
    return Tokenizer.train_bpe(texts * 20, vocab_size=300)


def test_answer_prior_is_each_prompts_answers_against_its_types(tok):
    star, circle, rare = "What colour is the star?", "What colour is the circle?", "Is it round?"
    samples = (
        [chat(f"s{i}", star, "orange") for i in range(30)]
        + [chat(f"b{i}", star, "blue") for i in range(10)]
        + [chat(f"c{i}", circle, "red" if i < 20 else "blue") for i in range(40)]
        + [chat(f"r{i}", rare, "yes") for i in range(5)]  # under min_count: no prior
        + [TextSample("orange blue", "t0")]
        # s4's id again, in the other source, on a chat of two turns (no prior of its own): the
        # prior is looked up by id, so neither sample may take the star's row
        + [Conversation([Message("user", star), Message("assistant", "orange")] * 2, [], "s4")]
    )
    proc = SampleProcessor(tok, get_template("chatml", tok), max_length=64)
    half = len(samples) // 2
    ds = MixtureDataset([ConversationDataset(samples[:half], proc), ConversationDataset(samples[half:], proc)],
                        [1.0, 1.0])  # fmt: skip
    prior = AnswerPrior.from_dataset(ds, tok.vocab_size, min_count=20, weight=0.5)

    def first(a):
        r = proc.tokens(chat("x", star, a))
        return next(t for t in r.labels if t != -100)

    o, b, r = first("orange"), first("blue"), first("red")
    assert len({o, b, r}) == 3
    # one answer type (the two prompts share "blue"): orange 30, blue 30, red 20 of 80
    assert [sorted(t) for t in prior.types] == [sorted([o, b, r])]
    bias = prior.bias(["s3", "c0", "r0", "t0", "s4"])
    expect = torch.zeros(2, tok.vocab_size)
    for row, counts in enumerate([{o: 30, b: 10}, {r: 20, b: 20}]):
        n = sum(counts.values())
        for t, k in {o: 30, b: 30, r: 20}.items():
            expect[row, t] = 0.5 * (math.log(max(counts.get(t, 0) / n, FLOOR)) - math.log(k / 80))
    assert torch.equal(bias[:2], expect)
    assert torch.equal(bias[2:], torch.zeros(3, tok.vocab_size))
    assert bias[0, r] < -3 and (bias[0] != 0).sum() == 3  # "red" never followed "star"


def test_answer_bias_enters_the_loss_at_each_rows_first_answer_token():
    torch.manual_seed(0)
    b, t, v = 3, 7, 11
    logits = torch.randn(b, t, v)
    labels = torch.full((b, t), -100)
    labels[0, 4:6] = torch.tensor([2, 3])
    labels[1, 2:7] = torch.tensor([5, 1, 1, 4, 9])
    # row 2 has no answer (truncated away): nothing to add there
    bias = torch.randn(b, v)
    loss, n = supervised_lm_loss(logits, labels, answer_bias=bias)
    shifted = logits[:, :-1].clone()
    shifted[0, 3] += bias[0]
    shifted[1, 1] += bias[1]
    keep = labels[:, 1:] != -100
    ref = F.cross_entropy(shifted[keep], labels[:, 1:][keep])
    assert n == 7 and torch.allclose(loss, ref, atol=1e-6)
    plain, _ = supervised_lm_loss(logits, labels)
    assert not torch.allclose(loss, plain)


def test_a_stage_trains_against_the_prior_and_saves_a_model_that_answers_alone(world, tmp_path):
    import json

    from modalign import MLLM
    from modalign.config import ConfigError
    from modalign.train.recipe import load_recipe
    from modalign.train.run import run_recipe

    def stage_losses(run):
        lines = (run / "instruct" / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    doc = recipe_doc(world, steps=3, save_every=0)
    doc["stages"] = doc["stages"][1:]
    doc["stages"][0]["optim"]["dropout"] = 0.0
    run_recipe(load_recipe(doc), tmp_path / "plain", progress=False)
    prior = {"weight": 1.0, "min_count": 10**6}  # no prompt is that frequent: no bias anywhere
    doc["stages"][0]["objective"] = {"name": "lm", "answer_prior": prior}
    run_recipe(load_recipe(doc), tmp_path / "none", progress=False)
    prior["min_count"] = 5
    run_recipe(load_recipe(doc), tmp_path / "prior", progress=False)
    plain = stage_losses(tmp_path / "plain")
    assert stage_losses(tmp_path / "none") == plain and len(plain) == 3
    assert stage_losses(tmp_path / "prior")[0] != plain[0]  # same data and weights: only the prior differs
    # the saved model is the plain architecture: it loads and answers without the prior
    a = MLLM.from_pretrained(tmp_path / "prior" / "instruct" / "model")
    b = MLLM.from_pretrained(tmp_path / "plain" / "instruct" / "model")
    assert a.state_dict().keys() == b.state_dict().keys()
    prior["weight"] = -1.0
    with pytest.raises(
        ConfigError, match=r"stages\[0\]\.objective\.answer_prior\.weight: expected a weight >= 0"
    ):
        load_recipe(doc)
