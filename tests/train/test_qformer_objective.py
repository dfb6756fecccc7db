"""The qformer objective (BLIP-2 stage 1): its three losses against a direct, pair-by-pair
implementation of the paper's definitions; hard-negative mining; a recipe stage that trains it."""

import json

import pytest
import torch
import torch.nn.functional as F

from modalign import MLLM
from modalign.config import MLLMConfig
from modalign.train.objectives.qformer import QFormerObjective, hard_negatives
from tests.helpers import randomize
from tests.tiny import TINY


def random_blip2():
    cfg = MLLMConfig.from_name("tiny-blip2")
    for part, kw in TINY.items():
        for k, v in kw.items():
            setattr(getattr(cfg, part), k, v)
    torch.manual_seed(0)
    return randomize(MLLM(cfg)).eval()


def batch(b=4, t=6, vocab=1024):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(6, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return ids, mask


def smoothed_ce(logits_row: torch.Tensor, target: int, eps: float) -> float:
    """-(1 - eps) log p(target) - eps * mean_k log p(k): label smoothing as the paper's code uses it."""
    logp = logits_row.log_softmax(-1)
    return float(-(1 - eps) * logp[target] - eps * logp.mean())


def test_losses_equal_the_definitions():
    model = random_blip2()
    obj = QFormerObjective(model)
    c, eps = model.connector, 0.1
    ids, mask = batch()
    image = torch.randn(4, model.num_image_tokens(), 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        c.temp.fill_(0.2)
        torch.manual_seed(11)
        got = obj.losses(image, ids, mask)
        text, tmask = obj.frame(ids, mask, c.cfg.text_cls_id)
        # framing: [CLS] words [SEP], padded with [PAD]
        assert text[3, :4].tolist() == [1, *ids[3, :2].tolist(), 2] and text[3, 4:].eq(0).all()
        # itc, pair by pair: the best query's cosine over the temperature
        n = len(ids)
        s = torch.zeros(n, n)
        for i in range(n):
            q = c.query_states(image[i : i + 1])[0]
            v = F.normalize(c.vision_projection(q), dim=-1)
            for j in range(n):
                row = text[j : j + 1, : int(tmask[j].sum())]  # the text alone, unpadded
                cls = c.text_states(row)[0, 0]
                tj = F.normalize(c.text_projection(cls), dim=-1)
                s[i, j] = max(float(v[k] @ tj) for k in range(len(v))) / 0.2
        itc = (
            sum(smoothed_ce(s[i], i, eps) for i in range(n))
            + sum(smoothed_ce(s[:, j], j, eps) for j in range(n))
        ) / (2 * n)
        assert float(got["itc"]) == pytest.approx(itc, abs=1e-5)
        # itm: the same negatives (same draw), each triple scored on its own, unpadded
        torch.manual_seed(11)
        neg_img, neg_txt = hard_negatives(s, text, tmask)
        triples = [(i, i, 1) for i in range(n)] + [(int(neg_img[j]), j, 0) for j in range(n)]
        triples += [(i, int(neg_txt[i]), 0) for i in range(n)]
        itm = 0.0
        for i, j, label in triples:
            row = text[j : j + 1, : int(tmask[j].sum())]
            logits = c.itm_head(c.joint_states(image[i : i + 1], row)[0, : c.cfg.num_queries]).mean(0)
            itm += -float(logits.log_softmax(-1)[label])
        assert float(got["itm"]) == pytest.approx(itm / len(triples), abs=1e-5)
        # itg: [DEC] words [SEP], token t + 1 predicted from the queries and tokens <= t only:
        # the prefix alone gives the same prediction
        dec, dmask = obj.frame(ids, mask, c.cfg.text_dec_id)
        assert dec[:, 0].eq(4).all()
        total, count = 0.0, 0
        for r in range(n):
            length = int(dmask[r].sum())
            for t in range(length - 1):
                prefix = dec[r : r + 1, : t + 1]
                logits = c.itg_logits(image[r : r + 1], prefix)[0, -1]
                total += smoothed_ce(logits, int(dec[r, t + 1]), eps)
                count += 1
        assert float(got["itg"]) == pytest.approx(total / count, abs=1e-5)


def test_hard_negatives_never_the_pair_or_an_identical_text():
    text = torch.tensor([[1, 7, 8, 2], [1, 9, 2, 0], [1, 7, 8, 2], [1, 5, 6, 2]])
    mask = (text != 0).long()
    mask[:, 0] = 1
    sim = torch.zeros(4, 4)
    sim[0, 2] = sim[2, 0] = 50.0  # 0 and 2 have the same text: never each other's negative
    sim[1, 3] = 30.0  # image 1 is most like text 3: its negative text, nearly always
    torch.manual_seed(0)
    for _ in range(50):
        neg_img, neg_txt = hard_negatives(sim, text, mask)
        for k in range(4):
            assert neg_img[k] != k and neg_txt[k] != k
        assert neg_img[0] != 2 and neg_img[2] != 0 and neg_txt[0] != 2 and neg_txt[2] != 0
    picks = [hard_negatives(sim, text, mask) for _ in range(50)]
    assert [int(p[1][1]) for p in picks].count(3) == 50  # image 1's negative text: text 3
    assert [int(p[0][3]) for p in picks].count(1) == 50  # text 3's negative image: image 1


def test_objective_names_the_missing_head():
    cfg = MLLMConfig.from_name("tiny-blip2")
    cfg.connector.text_heads = ["itc", "itm"]
    with pytest.raises(
        ValueError, match=r"itg loss needs the Q-Former's itg head .* objective\.qformer\.itg: 0"
    ):
        QFormerObjective(MLLM(cfg))
    assert QFormerObjective(MLLM(cfg), itg=0).weights == {"itc": 1.0, "itm": 1.0, "itg": 0}
    cfg.connector.text_heads = ["itm", "itg"]  # itm draws its negatives from itc's similarities
    with pytest.raises(ValueError, match=r"itc loss needs the Q-Former's itc head"):
        QFormerObjective(MLLM(cfg), itc=0)


def test_idle_heads_get_zero_gradients():
    """A head without a loss this step (weight 0; itm on a batch of one) still gets a gradient
    (zero), as DDP needs of every trained parameter."""
    for b, itg in ((1, 1.0), (2, 0.0)):
        model = random_blip2()
        ids, mask = batch()
        ids, mask = ids[:b], mask[:b]
        image = torch.randn(b, model.num_image_tokens(), 32)
        obj = QFormerObjective(model, itg=itg)
        parts = obj.losses(image, ids, mask)
        assert set(parts) == ({"itc", "itg"} if b == 1 else {"itc", "itm"})
        model.vision.forward = lambda px, image=image: image  # the tower's output, given
        loss, _ = obj({"input_ids": ids, "attention_mask": mask, "pixel_values": torch.zeros(b)})
        loss.backward()
        idle = "itm_head" if b == 1 else "itg_head"
        grads = [p.grad for p in getattr(model.connector, idle).parameters()]
        assert all(g is not None and not g.any() for g in grads), idle
        busy = "itg_head" if b == 1 else "itm_head"
        assert any(p.grad.abs().sum() > 0 for p in getattr(model.connector, busy).parameters()), busy


def test_qformer_stage_trains_the_heads_and_saves_them(world, tmp_path):
    """A recipe: BLIP-2's stage 1 (qformer objective, Q-Former only) then stage 2 (Q-Former and its
    projection into the frozen LLM, lm objective); the heads train in stage 1 and are saved."""
    from safetensors import safe_open

    from modalign.train.recipe import load_recipe
    from modalign.train.run import run_recipe

    doc = {
        "name": "tiny-blip2-test", "seed": 0,
        "model": {"preset": "tiny-blip2", "overrides": TINY, "tokenizer": str(world / "tokenizer")},
        "stages": [
            {"name": "qformer", "objective": {"name": "qformer"}, "trainable": ["connector.*", "!connector.language_projection.*"],
             "data": {"sources": [{"path": str(world / "captions.json")}], "template": "plain", "batch_size": 8, "max_length": 48},
             "optim": {"lr": 3e-3}, "stop": {"max_steps": 12}},
            {"name": "generate", "trainable": ["connector.*"],
             "data": {"sources": [{"path": str(world / "captions.json")}], "template": "plain", "batch_size": 8},
             "optim": {"lr": 1e-3}, "stop": {"max_steps": 2}},
        ],
    }  # fmt: skip
    recipe = load_recipe(doc)
    run_recipe(recipe, tmp_path / "run", progress=False)
    losses = [
        json.loads(x)["loss"]
        for x in (tmp_path / "run" / "qformer" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    with safe_open(str(tmp_path / "run" / "model" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"connector.itm_head.weight", "connector.itg_head.bias", "connector.temp",
            "connector.qformer.embeddings.word_embeddings.weight"} <= names  # fmt: skip
    again = MLLM.from_pretrained(tmp_path / "run" / "model")
    assert again.config.connector.text_heads == ["itc", "itm", "itg"]
