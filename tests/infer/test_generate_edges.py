"""The engine's edges: stop strings end a row where they begin (text and ids agree), the
checkpoint's own EOS ids end a reply, prompts past the context or empty, and sampling settings
that are not numbers."""

from __future__ import annotations

import pytest
import torch

from modalign.infer.engine import Prompt, SamplingParams
from tests.serve.helpers import tiny_chat_model


@pytest.fixture(scope="module")
def cm():
    return tiny_chat_model(context=64)


def scripted(engine, monkeypatch, tokens: list[int]):
    """The engine's stream replaced by one that emits ``tokens`` (ending a row when asked)."""
    steps = []

    def stream(prompts, params, cancelled=None):
        engine.last_finish = ["length"]
        for t in tokens[: params.max_new_tokens]:
            steps.append(t)
            yield [t]
            if cancelled is not None and cancelled(0):
                engine.last_finish = ["cancelled"]
                return

    monkeypatch.setattr(engine, "stream", stream)
    return steps


def test_a_stop_string_over_several_tokens_ends_the_row_with_its_ids_cut(cm, monkeypatch):
    tok = cm.tok
    pieces = [" blue", "#", "#", "#", " red", " blue"]
    ids = [tok.encode(p)[-1] for p in pieces]
    assert [tok.decode([i]) for i in ids] == pieces
    steps = scripted(cm.engine, monkeypatch, ids)
    c = cm.engine.generate([Prompt([1, 2, 3])], SamplingParams(max_new_tokens=6, stop=["###"]))[0]
    assert c.text == " blue" and c.finish_reason == "stop"
    assert c.token_ids == ids[:1] and c.completion_tokens == 1  # the text's tokens, not the stop's
    assert steps == ids[:4]  # decoding ended with the stop string, not at max_new_tokens
    # the earliest of several stops, whatever their order
    scripted(cm.engine, monkeypatch, ids)
    c = cm.engine.generate([Prompt([1, 2, 3])], SamplingParams(max_new_tokens=6, stop=[" red", "##"]))[0]
    assert c.text == " blue"
    # the streamed reply shows none of a stop string that completes later
    scripted(cm.engine, monkeypatch, ids)
    params = cm.params(max_new_tokens=6, stop=["###"])
    assert list(cm.stream([], [], params)) == [" blue"]


def test_the_checkpoints_eos_ids_end_a_reply(cm):
    cm.model.config.llm.eos_token_id = [2, 77]
    try:
        assert {2, 77} <= set(cm.params().stop_token_ids)
    finally:
        cm.model.config.llm.eos_token_id = 2


def test_prompts_past_the_context_or_empty_are_refused_and_long_replies_end_at_it(cm):
    with pytest.raises(ValueError, match=r"prompt \(64 tokens, images expanded\) fills the model's context"):
        cm.engine.generate([Prompt([5] * 64)], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        cm.engine.generate([Prompt([5]), Prompt([])], SamplingParams(max_new_tokens=2))
    out = cm.engine.generate([Prompt([5] * 60)], SamplingParams(max_new_tokens=50))[0]
    assert len(out.token_ids) <= 4 and out.finish_reason in ("length", "stop")
    # within the context, the same greedy tokens as a full forward pass gives
    with torch.no_grad():
        seq = [5] * 60
        for t in out.token_ids:
            assert int(cm.model(torch.tensor([seq])).logits[0, -1].argmax()) == t
            seq.append(t)


@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty"])
def test_sampling_settings_that_are_not_numbers_are_refused(cm, name):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        cm.engine.generate([Prompt([5, 6])], SamplingParams(**{name: float("nan")}))
