"""PICa: the prompt in the paper's format, example selection by question and image similarity,
multi-query ensembling by log-probability, the answer cleaning, and the two LLM back ends (an
OpenAI-compatible endpoint, scripted on loopback; a local modalign model)."""

import pytest
import torch

from modalign.llm_client import LLMClient
from modalign.pipelines.pica import (
    EndpointCompleter,
    LocalCompleter,
    PICa,
    Shot,
    build_prompt,
    clean_answer,
)
from tests.fake_llm import FakeLLM


def unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_prompt_is_the_papers():
    shots = [
        Shot("a dog on a sofa", "what animal is this?", "dog"),
        Shot("two red buses", "how many buses?", "2"),
    ]
    got = build_prompt(shots, "a cat on a mat", "what is the cat on?")
    # gpt3_api_okvqa.py: the header, then 'Context: %s\n===\n' + 'Q: %s\nA: %s\n\n===\n' per example,
    # then 'Context: %s\n===\n' + 'Q: %s\nA:'
    want = ("Please answer the question according to the above context.\n===\n"
            "Context: a dog on a sofa\n===\nQ: what animal is this?\nA: dog\n\n===\n"
            "Context: two red buses\n===\nQ: how many buses?\nA: 2\n\n===\n"
            "Context: a cat on a mat\n===\nQ: what is the cat on?\nA:")  # fmt: skip
    assert got == want


def test_answers_are_cleaned_as_the_paper_cleans_them():
    assert clean_answer("The Red, car.") == "red car"
    assert clean_answer("to the left") == "left"
    assert clean_answer("A") == ""


class Scripted:
    """A completer answering from a table keyed by the prompt's first example's answer."""

    def __init__(self, table):
        self.table, self.prompts = table, []

    def complete(self, prompt, max_tokens=5):
        self.prompts.append(prompt)
        first = prompt.split("A: ", 1)[1].split("\n", 1)[0]
        return self.table[first]


def test_selection_and_ensemble():
    # question similarity alone ranks 0 > 1 > 2 > 3; adding the image's reorders to 2 > 0 > 3 > 1
    qs = [unit(1, 0), unit(0.9, 0.1), unit(0.8, 0.2), unit(0, 1)]
    ims = [unit(0, 1), unit(-1, 0), unit(1, 0), unit(1, 0.2)]
    shots = [Shot(f"c{i}", f"q{i}", f"a{i}", qs[i], ims[i]) for i in range(4)]
    table = {"a2": ("Blue.", -0.5), "a3": ("red", -0.2), "a0": ("green", -3.0)}
    comp = Scripted(table)
    pica = PICa(comp, shots, n_shot=2, n_ensemble=2, metric="imagequestion")
    assert pica.select(unit(1, 0), unit(1, 0)) == [2, 0, 3, 1]
    out = pica.answer("what colour?", "a caption", unit(1, 0), unit(1, 0))
    assert out.candidates == ["blue", "red"] and out.logprobs == [-0.5, -0.2]
    assert out.answer == "red"  # the higher summed log-probability
    assert "Context: c2" in comp.prompts[0] and "Context: c0" in comp.prompts[0] and "c3" in comp.prompts[1]
    q_only = PICa(comp, shots, n_shot=1, n_ensemble=3, metric="question")
    assert q_only.select(unit(1, 0)) == [0, 1, 2]
    # without log-probabilities: the most frequent answer
    votes = Scripted({"a0": ("red", None), "a1": ("blue", None), "a2": ("blue", None)})
    assert (
        PICa(votes, shots, n_shot=1, n_ensemble=3, metric="question").answer("q", "c", unit(1, 0)).answer
        == "blue"
    )
    # an empty answer is no vote (it won with two of three before); only when every prompt gave one
    blanks = Scripted({"a0": ("", None), "a1": ("", None), "a2": ("blue", None)})
    assert (
        PICa(blanks, shots, n_shot=1, n_ensemble=3, metric="question").answer("q", "c", unit(1, 0)).answer
        == "blue"
    )
    none = Scripted({"a0": ("", None), "a1": ("", None), "a2": ("", None)})
    assert (
        PICa(none, shots, n_shot=1, n_ensemble=3, metric="question").answer("q", "c", unit(1, 0)).answer == ""
    )
    with pytest.raises(ValueError, match="8 examples, 4 given"):
        PICa(comp, shots, n_shot=4, n_ensemble=2)
    with pytest.raises(ValueError, match="example 0 has no i_vec"):
        PICa(comp, [Shot("c", "q", "a", qs[0])], n_shot=1)


def test_endpoint_completer_sends_the_prompt_and_sums_logprobs():
    def reply(body):
        if body["messages"][0]["content"].endswith("Q: second\nA:"):
            return "no log-probabilities"
        return " red car", [(" red", -0.25), (" car", -0.5)]

    with FakeLLM(reply) as fake:
        comp = EndpointCompleter(LLMClient(fake.url, "m"))
        assert comp.complete(build_prompt([], "c", "first")) == ("red car", -0.75)
        assert comp.complete(build_prompt([], "c", "second")) == ("no log-probabilities", None)
        body = fake.requests[0]
    assert body["stop"] == ["\n"] and body["logprobs"] is True and body["temperature"] == 0.0
    assert body["max_tokens"] == 5 and body["messages"] == [
        {"role": "user", "content": build_prompt([], "c", "first")}
    ]


def test_local_completer_logprob_equals_a_teacher_forced_pass(world):
    from modalign import MLLM
    from modalign.config import LLMConfig, MLLMConfig
    from modalign.data.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(world / "tokenizer")
    torch.manual_seed(0)
    model = MLLM(MLLMConfig(llm=LLMConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=2, num_kv_heads=1, bos_token_id=1, eos_token_id=2))).eval()  # fmt: skip
    prompt = build_prompt([], "A small red circle at the top left.", "What colour is the circle?")
    text, lp = LocalCompleter(model, tok).complete(prompt, max_tokens=4)
    ids = [tok.bos_id] + tok.encode(prompt)
    gen = []
    with torch.no_grad():  # a plain greedy loop, then one teacher-forced pass for the log-probabilities
        for _ in range(4):
            t = int(model(torch.tensor([ids + gen])).logits[0, -1].argmax())
            if t == tok.eos_id or "\n" in tok.decode([t]):
                break
            gen.append(t)
        logp = model(torch.tensor([ids + gen])).logits[0].log_softmax(-1)
    want = sum(float(logp[len(ids) - 1 + k, g]) for k, g in enumerate(gen))
    assert len(gen) == 4 and text == tok.decode(gen).strip() and lp == pytest.approx(want, abs=1e-4)


def test_embeddings_for_example_selection(world):
    """Question embeddings: each text's mean last hidden state, padding never read (a batch equals
    each text alone); image embeddings: the tower's mean feature; both unit vectors."""
    from modalign import MLLM
    from modalign.config import MLLMConfig
    from modalign.data.tokenizer import Tokenizer
    from modalign.pipelines.pica import embed_images, embed_texts
    from tests.tiny import TINY

    tok = Tokenizer.from_dir(world / "tokenizer")
    cfg = MLLMConfig.from_name("tiny-shapes")
    for part, kw in TINY.items():
        for k, v in kw.items():
            setattr(getattr(cfg, part), k, v)
    torch.manual_seed(0)
    model = MLLM(cfg).eval()
    texts = ["What colour is the star?", "How many shapes are there in the picture?"]
    got = embed_texts(model, tok, texts, batch_size=2)
    with torch.no_grad():
        for i, t in enumerate(texts):
            alone = model.llm(input_ids=torch.tensor([tok.encode(t)]), return_hidden=True).mean(1)[0]
            torch.testing.assert_close(
                got[i], torch.nn.functional.normalize(alone, dim=-1), atol=1e-5, rtol=1e-5
            )
        px = torch.randn(3, 3, 96, 96)
        want = torch.nn.functional.normalize(model.vision(px).mean(1), dim=-1)
    torch.testing.assert_close(embed_images(model, px, batch_size=2), want, atol=1e-5, rtol=1e-5)
