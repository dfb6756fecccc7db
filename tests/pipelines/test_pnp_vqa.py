"""PNP-VQA: the GradCAM over the Q-Former's cross-attention against finite differences, patch
sampling, painting the other patches over, the UnifiedQA passages, and the whole loop with a
scripted captioner and QA model."""

import math
import types

import pytest
import torch

from modalign import MLLM
from modalign.config import MLLMConfig
from modalign.pipelines.pnp_vqa import (
    PNPVQA,
    itm_ids,
    keep_patches,
    qa_passages,
    question_gradcam,
    sample_patches,
    to_grid,
)
from tests.helpers import randomize
from tests.tiny import TINY


class Tok:
    """Word ids from a fixed table (the matching head's text)."""

    words = {w: i + 10 for i, w in enumerate("what colour is the star where circle red how many".split())}

    def encode(self, text):
        return [self.words.get(w, 5) for w in text.lower().split()]


@pytest.fixture(scope="module")
def itm_model():
    cfg = MLLMConfig.from_name("tiny-blip2")
    for part, kw in TINY.items():
        for k, v in kw.items():
            setattr(getattr(cfg, part), k, v)
    cfg.connector.text_heads = ["itc", "itm"]
    torch.manual_seed(0)
    return randomize(MLLM(cfg)).eval()


def test_kept_probabilities_change_nothing(itm_model):
    att = itm_model.connector.qformer.encoder.layer[0].crossattention.attention
    x, kv = torch.randn(2, 5, att.query.in_features), torch.randn(2, 7, att.key.in_features)
    want = att(x, kv)
    att.keep_probs = True
    try:
        got = att(x, kv)
        assert att.probs.shape == (2, att.heads, 5, 7)
        torch.testing.assert_close(att.probs.sum(-1), torch.ones(2, att.heads, 5))
    finally:
        att.keep_probs, att.probs = False, None
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_gradcam_equals_finite_differences(itm_model):
    """relevance[p] = mean over heads and queries of probs * relu(d match-logit / d probs), the
    gradient taken here by central differences through an attention written out by hand."""
    m, tok = itm_model, Tok()
    torch.manual_seed(1)
    px = torch.randn(3, m.config.vision.image_size, m.config.vision.image_size)
    got = question_gradcam(m, px, "what colour is the star?", tok)
    conn = m.connector
    att = [lyr.crossattention.attention for lyr in conn.qformer.encoder.layer if lyr.crossattention][-1]
    ids = itm_ids("what colour is the star?", tok, conn.cfg)
    state = {}

    def forward(self, x, kv, mask=None):
        n, lq, d = x.shape
        h = self.heads

        def split(t):
            return t.view(n, -1, h, d // h).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(kv)), split(self.value(kv))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(d // h)).softmax(-1)
        state["probs"] = probs
        return ((probs + state["delta"]) @ v).transpose(1, 2).reshape(n, lq, d)

    with torch.no_grad():
        image = m.vision(px[None])
        att.forward = types.MethodType(forward, att)
        try:
            state["delta"] = 0.0
            conn.itm_logits(image, ids)
            probs = state["probs"].clone()
            grad = torch.zeros_like(probs)
            eps = 1e-3
            for idx in torch.cartesian_prod(*(torch.arange(s) for s in probs.shape[1:])):
                e = torch.zeros_like(probs)
                e[(0, *idx.tolist())] = eps
                state["delta"] = e.double().float()
                up = conn.itm_logits(image, ids)[0, 1]
                state["delta"] = -e
                down = conn.itm_logits(image, ids)[0, 1]
                grad[(0, *idx.tolist())] = (up - down) / (2 * eps)
        finally:
            del att.forward
    want = (probs * grad.clamp(min=0)).mean(1)[0].mean(0)
    assert got.shape == (m.config.vision.num_features,) and (got >= 0).all()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-2)
    assert not question_gradcam(m, px, "how many circle?", tok).equal(got)  # the question matters


def test_patch_sampling_follows_the_relevance():
    g = torch.Generator().manual_seed(0)
    rel = torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0, 3.0])
    for _ in range(20):
        got = sample_patches(rel, 3, g)
        assert got == [1, 3, 5]  # without replacement, never a patch of zero relevance while others remain
    draws = [tuple(sample_patches(rel, 2, g)) for _ in range(300)]
    assert {d for d in draws} <= {(1, 3), (1, 5), (3, 5)} and draws.count((1, 5)) > draws.count((1, 3))
    assert sorted(set(sample_patches(torch.zeros(4), 4, g))) == [0, 1, 2, 3]  # no relevance: uniform


def test_other_patches_are_painted_with_the_background():
    px = torch.full((3, 6, 6), 0.5)
    px[:, 0:3, 3:6] = torch.tensor([1.0, 2.0, 3.0])[:, None, None]  # patch 1 of a 2 x 2 grid
    px[:, 3:6, 0:3] = -1.0  # patch 2
    out = keep_patches(px, [1], 3)
    torch.testing.assert_close(out[:, 0:3, 3:6], px[:, 0:3, 3:6])
    border = torch.cat([px[:, 0], px[:, -1], px[:, :, 0], px[:, :, -1]], 1).mean(1)
    for ys, xs in ((slice(0, 3), slice(0, 3)), (slice(3, 6), slice(0, 3)), (slice(3, 6), slice(3, 6))):
        torch.testing.assert_close(out[:, ys, xs], border[:, None, None].expand(3, 3, 3))


def test_unifiedqa_passages_are_the_papers():
    # prepare_qa_input: question.lower().strip() + " \\n " + ("cap. " per caption).lower().strip()
    assert qa_passages("What Is It?", ["A Dog", "a cat."], per_passage=2) == [
        "what is it? \\n a dog. a cat.."
    ]
    assert qa_passages("q", ["a", "b", "c"], per_passage=2) == ["q \\n a. b.", "q \\n c."]


def test_loop_drops_repeated_captions_and_prompts_the_qa_model(itm_model):
    seen = []

    def captioner(images, seed):
        seen.append(images.shape[0])
        return ["a red star", "a red star at the top", "a red star", "two circles"][: images.shape[0]]

    class QA:
        def __init__(self):
            self.prompts = []

        def complete(self, prompt, max_tokens=10):
            self.prompts.append(prompt)
            return " red.\n", None

    qa = QA()
    pnp = PNPVQA(itm_model, Tok(), captioner, qa, num_patches=2, num_captions=3, max_tries=8)
    px = torch.randn(3, itm_model.config.vision.image_size, itm_model.config.vision.image_size)
    out = pnp.answer("What colour is the star?", px)
    # "a red star" is inside "a red star at the top" ... kept captions are never substrings of kept ones
    assert out.answer == "red" and out.captions[0] == "a red star"
    assert all(not any(c in k for k in out.captions[:i]) for i, c in enumerate(out.captions))
    assert len(out.patches) == len(out.captions) and all(len(p) == 2 for p in out.patches)
    assert qa.prompts == [out.prompt] and out.prompt == (
        "Context: "
        + " ".join(c + "." for c in out.captions)
        + "\nQuestion: What colour is the star?\nAnswer:"
    )
    assert sum(seen) <= 8


def test_a_tower_with_its_class_token_and_another_grid(itm_model):
    """BLIP-2's tower keeps its CLS token (``feature_select: full``): the relevance is over the
    patches alone; a matcher's grid is resampled onto the captioner's."""
    import copy

    m = copy.deepcopy(itm_model)
    m.config.vision.feature_select = "full"
    px = torch.randn(3, m.config.vision.image_size, m.config.vision.image_size)
    grid = (m.config.vision.image_size // m.config.vision.patch_size) ** 2
    got = question_gradcam(m, px, "what colour is the star?", Tok())
    assert m.vision(px[None]).shape[1] == grid + 1 and got.shape == (grid,)
    rel = torch.arange(4.0)
    assert to_grid(rel, 2).equal(rel)
    big = to_grid(rel, 4).view(4, 4)
    assert big.shape == (4, 4) and big[0, 0] < big[3, 3] and big[0, 3] < big[3, 0]
    with pytest.raises(ValueError, match="square"):
        to_grid(torch.ones(5), 2)
