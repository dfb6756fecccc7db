"""The sampling settings by value: ``process_logits`` against transformers' logits processors in
the order ``generate`` applies them; the server's per-request ``adjust`` (logit bias, presence and
frequency penalties) against OpenAI's formula; reported log-probabilities against log-softmax."""

from types import SimpleNamespace

import pytest
import torch

from modalign.infer.engine import SamplingParams, process_logits
from modalign.infer.scheduler import _logprobs, adjust

transformers = pytest.importorskip("transformers")


def reference(logits, seen, p: SamplingParams):
    """transformers' processors: repetition penalty, then temperature, top-k and top-p warpers."""
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = seen if seen is not None else torch.zeros(logits.shape[0], 0, dtype=torch.long)
    out = logits.clone()
    if p.repetition_penalty != 1.0:
        out = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, out)
    if p.temperature <= 0:
        return out
    out = TemperatureLogitsWarper(p.temperature)(ids, out)
    if p.top_k:
        out = TopKLogitsWarper(p.top_k)(ids, out)
    if p.top_p < 1.0:
        out = TopPLogitsWarper(p.top_p)(ids, out)
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0.7},
        {"temperature": 1.0, "top_k": 5},
        {"temperature": 1.3, "top_p": 0.8},
        {"temperature": 0.9, "top_k": 12, "top_p": 0.6},
        {"temperature": 0.0, "repetition_penalty": 1.3},
        {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.2},
    ],
)
def test_process_logits_equals_transformers_processors(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 97, generator=g) * 3  # positive and negative scores
    seen = torch.randint(0, 97, (4, 15), generator=g)  # repeats included
    p = SamplingParams(**kw)
    got, want = process_logits(logits, seen, p), reference(logits, seen, p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))  # the same tokens survive
    kept = ~torch.isinf(want)
    torch.testing.assert_close(got[kept], want[kept], rtol=1e-6, atol=1e-6)
    if p.top_k or p.top_p < 1.0:
        assert kept.sum(-1).lt(97).all()  # the case does cut tokens


def row(counts=None, seen=(), **req):
    params = req.pop("params", SamplingParams(temperature=0.0))
    r = SimpleNamespace(params=params, logit_bias=req.get("logit_bias", {}),
                        presence_penalty=req.get("presence_penalty", 0.0),
                        frequency_penalty=req.get("frequency_penalty", 0.0))  # fmt: skip
    return SimpleNamespace(req=r, counts=dict(counts or {}), seen=list(seen))


def test_adjust_applies_openai_bias_and_penalties_then_the_engines_settings():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, generator=g)
    counts = {3: 2, 7: 1, 11: 5}
    bias = {5: 2.5, 3: -1.0, 10_000: 4.0}  # an id outside the vocabulary is ignored
    r = row(counts, logit_bias=bias, presence_penalty=0.4, frequency_penalty=0.3)
    want = logits.clone()
    for j in range(50):  # mu[j] - c[j] * frequency - (c[j] > 0) * presence + bias[j]
        c = counts.get(j, 0)
        want[j] = logits[j] - c * 0.3 - (0.4 if c > 0 else 0.0) + bias.get(j, 0.0)
    torch.testing.assert_close(adjust(logits, r), want, rtol=0, atol=1e-6)
    assert torch.equal(logits, torch.randn(50, generator=torch.Generator().manual_seed(1)))  # untouched

    # with a repetition penalty and sampling settings, these follow on the adjusted scores
    p = SamplingParams(temperature=0.7, top_k=9, repetition_penalty=1.25)
    seen = [3, 3, 8, 40]
    r = row(counts, seen, params=p, logit_bias=bias, presence_penalty=0.4, frequency_penalty=0.3)
    got = adjust(logits, r)
    ref = reference(want[None], torch.tensor([seen]), p)[0]
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got[~torch.isinf(ref)], ref[~torch.isinf(ref)], rtol=1e-6, atol=1e-6)


def test_logprobs_are_log_softmax_values_with_the_top_k_in_order():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(40, generator=g)
    lp = torch.log_softmax(logits, -1)
    out = _logprobs(logits, 17, 3)
    assert out["token"] == 17 and out["logprob"] == pytest.approx(float(lp[17]), abs=1e-6)
    top = lp.topk(3)
    assert [t for t, _ in out["top"]] == top.indices.tolist()
    assert [v for _, v in out["top"]] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert "top" not in _logprobs(logits, 17, 0)


def penalised_greedy(model, p, n: int, penalty: float) -> list[int]:
    """A greedy loop over full forward passes with transformers' repetition penalty on the
    prompt's text ids and the tokens made (never on image placeholders)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    proc = RepetitionPenaltyLogitsProcessor(penalty)
    ids = torch.tensor([p.input_ids])
    px = torch.stack(p.pixel_values) if p.pixel_values else None
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, pixel_values=px).logits[:, -1].float()
            text = ids[ids >= 0][None]
            nxt = int(proc(text, logits).argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def negative_placeholder_model():
    """The engine tests' tiny model with its image placeholder at -200, as LLaVA's original
    releases, mPLUG-Owl2 and InternLM-XComposer2 number it."""
    from modalign import MLLM, MLLMConfig

    torch.manual_seed(0)
    cfg = MLLMConfig.from_name("tiny-llava")
    cfg.llm.num_layers = cfg.vision.num_layers = 2
    cfg.vision.image_size, cfg.vision.patch_size = 32, 8
    cfg.placeholder, cfg.image_token_id = "per_token", -200
    return MLLM(cfg).eval()


def test_repetition_penalty_passes_over_image_placeholders_and_padding():
    """A repetition penalty on prompts with images whose placeholder id is negative: the engine
    (left-padded batch) and the scheduler give the reference loop's tokens instead of failing."""
    from modalign.infer.engine import Engine
    from modalign.infer.scheduler import Scheduler
    from tests.infer.test_engine import prompts
    from tests.infer.test_scheduler import Sink, run

    model = negative_placeholder_model()
    ps = prompts(model, n=3, seed=1)
    assert any(-200 in p.input_ids for p in ps)
    params = SamplingParams(max_new_tokens=6, repetition_penalty=1.5)
    want = [penalised_greedy(model, p, 6, 1.5) for p in ps]
    assert [r.token_ids for r in Engine(model).generate(ps, params)] == want
    sinks = [Sink() for _ in ps]
    run(
        Scheduler(Engine(model), max_batch=3),
        {0: [s.request(p, params) for s, p in zip(sinks, ps, strict=True)]},
    )
    assert [s.tokens for s in sinks] == want and all(s.error is None for s in sinks)


def test_a_tiny_temperature_samples_the_greedy_tokens_and_a_failing_row_fails_alone(monkeypatch):
    """A temperature far below float32's range (1e-30) samples as greedy (no inf or NaN); a row
    whose sampling raises ends with its own error while the rows beside it finish."""
    import modalign.infer.scheduler as sched_mod
    from modalign.infer.engine import Engine
    from modalign.infer.scheduler import Scheduler
    from tests.infer.test_engine import full_forward_greedy, prompts, tiny
    from tests.infer.test_scheduler import Sink, run

    model = tiny()
    ps = prompts(model, n=3, seed=2)
    want = [full_forward_greedy(model, p, 5) for p in ps]
    tiny_t = SamplingParams(max_new_tokens=5, temperature=1e-30, seed=0)
    assert [r.token_ids for r in Engine(model).generate(ps, tiny_t)] == want
    sinks = [Sink() for _ in ps]
    # the failing row samples alone (a temperature of its own); the two others together
    reqs = [s.request(p, SamplingParams(max_new_tokens=5, temperature=2e-30 if i == 1 else 1e-30, seed=i))
            for i, (s, p) in enumerate(zip(sinks, ps, strict=True))]  # fmt: skip
    real = sched_mod.adjust
    bad = reqs[1]

    def adjust(logits, row):
        if row.req is bad and len(row.seen) > len(ps[1].input_ids) + 1:  # its third token
            raise RuntimeError("broken settings")
        return real(logits, row)

    monkeypatch.setattr(sched_mod, "adjust", adjust)
    run(Scheduler(Engine(model), max_batch=3), {0: reqs})
    assert [sinks[i].tokens for i in (0, 2)] == [want[0], want[2]]
    assert [sinks[i].end for i in (0, 2)] == ["length", "length"]
    assert (
        str(sinks[1].error) == "broken settings" and sinks[1].tokens == want[1][:2] and sinks[1].end is None
    )
