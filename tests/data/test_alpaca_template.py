"""The ``alpaca`` template against the prompt Stanford Alpaca and LLaMA-Adapter (V1, V2) train and
generate with: the text from the format's literal pieces as the releases write them
(tatsu-lab/stanford_alpaca ``train.py``; OpenGVLab/LLaMA-Adapter ``alpaca_finetuning_v1/finetuning.py``,
``llama_adapter_v2_multimodal7b/llama/utils.py``), and the ids and labels as the releases build them
from a SentencePiece model with LLaMA's settings: ``[BOS] + encode(prompt + answer) + [EOS]``, the
prompt's own ids (``[BOS] + encode(prompt)``) ignored by the loss."""

from __future__ import annotations

import io
import json

import pytest

from modalign.data.conversation import IGNORE_INDEX, IMAGE_MARK, Conversation, Message, get_template, render
from modalign.data.tokenizer import Tokenizer
from tests.tiny import labelled_runs

spm = pytest.importorskip("sentencepiece")

# the format's pieces, as the releases' PROMPT_DICT writes them
TASK = "Below is an instruction that describes a task. "
TASK_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
)
ASK = "Write a response that appropriately completes the request.\n\n"
INSTRUCTION, INPUT, RESPONSE = "### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:"


def no_input(instruction: str) -> str:
    return TASK + ASK + INSTRUCTION + instruction + RESPONSE


def with_input(instruction: str, inp: str) -> str:
    return TASK_INPUT + ASK + INSTRUCTION + instruction + INPUT + inp + RESPONSE


WORDS = ("the a of to and is are what which write give list name three tips for staying healthy sum numbers "
         "colour red blue circle square large small it answer question describe image picture").split()  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(modalign's Tokenizer, the SentencePiece processor the releases encode with) for one
    SentencePiece model with Llama's settings (BPE, byte fallback, <unk> <s> </s> = 0 1 2)."""
    import random

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(400)]
    corpus += [TASK + ASK, TASK_INPUT + ASK, "### Instruction: ### Input: ### Response:"] * 5
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        minloglevel=2,
    )  # fmt: skip
    d = tmp_path_factory.mktemp("llama-tokenizer")
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "legacy": False, "add_bos_token": True, "add_eos_token": False}  # fmt: skip
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer.from_dir(d), spm.SentencePieceProcessor(model_proto=buf.getvalue())


def release_sample(sp, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """ids and labels as LLaMA-Adapter's datasets (and Alpaca's ``preprocess``) build them."""
    ids = [sp.bos_id()] + sp.encode(prompt + answer) + [sp.eos_id()]
    n = 1 + len(sp.encode(prompt))
    assert ids[:n] == [sp.bos_id()] + sp.encode(prompt)  # the prompt's ids are a prefix: the cut is exact
    return ids, [IGNORE_INDEX] * n + ids[n:]


@pytest.mark.parametrize(
    "inp", [None, "1, 2 and 3"], ids=["no-input", "with-input"]
)  # an Alpaca record without / with its input
def test_ids_and_labels_are_the_releases(llama, inp):
    tok, sp = llama
    instruction, answer = "Give three tips for staying healthy.", "Eat well, sleep and move: three tips."
    msgs = (
        [Message("user", instruction)]
        + ([Message("user", inp)] if inp else [])
        + [Message("assistant", answer)]
    )
    t = get_template("alpaca")
    text, _, _ = t.render(msgs, tok)
    prompt = no_input(instruction) if inp is None else with_input(instruction, inp)
    assert text == prompt + answer + "</s>"  # the reply right after the colon, then EOS
    r = render(Conversation(msgs), tok, t, None)
    want_ids, want_labels = release_sample(sp, prompt, answer)
    assert r.input_ids == want_ids and r.labels == want_labels
    assert [tok.decode(run).lstrip(" ") for run in labelled_runs(r.input_ids, r.labels)] == [answer + "</s>"]


def test_generation_prompt_ends_at_response_as_the_release_generates(llama):
    """``format_prompt(instruction)`` encoded with BOS and without EOS (LLaMA-Adapter's generate)."""
    tok, sp = llama
    q = "What colour is the circle?"
    t = get_template("alpaca")
    text, spans, _ = t.render([Message("user", q)], tok, add_generation_prompt=True)
    assert text == no_input(q) and text.endswith("### Response:") and spans == []
    r = render(Conversation([Message("user", q)]), tok, t, None, add_generation_prompt=True)
    assert r.input_ids == [sp.bos_id()] + sp.encode(no_input(q)) and r.num_trained == 0
    two = [Message("user", "Sum the numbers."), Message("user", "1, 2")]  # with its input
    text, _, _ = t.render(two, tok, add_generation_prompt=True)
    assert text == with_input("Sum the numbers.", "1, 2")


def test_later_turns_repeat_the_blocks_and_a_system_message_takes_the_preambles_place(llama):
    tok, _ = llama
    t = get_template("alpaca")
    msgs = [Message("user", IMAGE_MARK + "\nDescribe the image."), Message("assistant", "A red circle."),
            Message("user", "Which colour?"), Message("assistant", "Red.")]  # fmt: skip
    text, _, _ = t.render(msgs, tok)
    first = no_input(IMAGE_MARK + "\nDescribe the image.") + "A red circle.</s>"
    assert text == first + "\n\n" + INSTRUCTION + "Which colour?" + RESPONSE + "Red.</s>"
    r = render(Conversation(msgs, ["x.png"]), tok, t, image_token_id=0, image_tokens=1)
    assert r.input_ids.count(0) == 1 and r.num_images == 1  # LLaMA-Adapter V2's <unk> image mark
    runs = [tok.decode(run).lstrip(" ") for run in labelled_runs(r.input_ids, r.labels)]
    assert runs == ["A red circle.</s>", "Red.</s>"]
    text, _, _ = t.render([Message("system", "Answer briefly.")] + msgs[:3], tok, add_generation_prompt=True)
    assert text == ("Answer briefly.\n\n" + INSTRUCTION + IMAGE_MARK + "\nDescribe the image." + RESPONSE
                    + "A red circle.</s>\n\n" + INSTRUCTION + "Which colour?" + RESPONSE)  # fmt: skip
