"""``modalign generate`` and ``modalign chat`` as a user drives them: the printed text and token
ids against a plain greedy loop over full forward passes (no KV cache, no engine), multi-turn
history, ``/image``, ``/reset`` and bad input in the chat loop, and the real console script
driven through a pipe."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from modalign.cli import main
from modalign.data.conversation import Message
from modalign.infer.chat import ChatModel, user_message


@pytest.fixture(scope="module")
def cm(tiny_model):
    return ChatModel.load(tiny_model, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def image(world):
    rec = json.loads((world / "eval.json").read_text())[0]
    return str(world / rec["image"])


def reference_greedy(cm: ChatModel, messages: list[Message], images: list, max_new: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step, stopping at a stop token."""
    p = cm.prompt(messages, images)
    ids = list(p.input_ids)
    px = torch.stack(p.pixel_values) if p.pixel_values else None
    stops = set(cm.params().stop_token_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            t = int(cm.model(torch.tensor([ids]), pixel_values=px).logits[0, -1].argmax())
            if t in stops:
                break
            out.append(t)
            ids.append(t)
    return out


def test_generate_prints_the_greedy_reply(cm, tiny_model, image, capsys):
    base = ["generate", "--model", str(tiny_model), "--image", image, "--prompt", "What colour is the square?",
            "--max-new-tokens", "8", "--device", "cpu"]  # fmt: skip
    want = reference_greedy(cm, [user_message("What colour is the square?", 1)], [image], 8)
    assert main([*base, "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["token_ids"] == want
    assert got["text"] == cm.tok.decode(want)
    assert got["finish_reason"] == ("length" if len(want) == 8 else "stop")
    assert got["prompt_tokens"] == len(
        cm.prompt([user_message("What colour is the square?", 1)], [image]).input_ids
    )
    # the streamed text (the default output) is the same reply
    assert main(base) == 0
    assert capsys.readouterr().out == got["text"] + "\n"


def test_generate_places_images_where_the_prompt_names_them(cm, tiny_model, image, capsys):
    argv = ["generate", "--model", str(tiny_model), "--image", image, "--image", image, "--prompt",
            "Compare <image> with <image>.", "--max-new-tokens", "4", "--json"]  # fmt: skip
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    msg = user_message("Compare <image> with <image>.", 2)
    assert msg.content.index("Compare") == 0  # the images stay inside the text, not in front of it
    assert got["token_ids"] == reference_greedy(cm, [msg], [image, image], 4)


def test_generate_with_a_missing_image_fails_clearly(tiny_model, tmp_path, capsys):
    argv = ["generate", "--model", str(tiny_model), "--image", str(tmp_path / "nope.png"), "--prompt", "hi"]
    assert main(argv) != 0
    assert "nope.png" in capsys.readouterr().err


def run_chat(monkeypatch, capsys, argv: list[str], lines: list[str]) -> tuple[int, list[str]]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    rc = main(argv)
    out = capsys.readouterr().out
    replies = [seg.split("\n", 1)[0] for seg in out.split("assistant> ")[1:]]
    return rc, replies, out


def test_chat_keeps_history_images_and_reset(cm, tiny_model, image, tmp_path, monkeypatch, capsys):
    argv = ["chat", "--model", str(tiny_model), "--max-new-tokens", "6", "--device", "cpu"]
    lines = ["/image " + image, "What colour is the square?", "/image " + str(tmp_path / "missing.png"),
             "And the circle?", "/reset", "Hello", "/quit", "never read"]  # fmt: skip
    rc, replies, out = run_chat(monkeypatch, capsys, argv, lines)
    assert rc == 0
    assert "(no such file: " in out and "missing.png" in out
    assert "(conversation cleared)" in out
    assert len(replies) == 3

    def text(ids):
        return cm.tok.decode(ids)

    u1 = user_message("What colour is the square?", 1)
    r1 = text(reference_greedy(cm, [u1], [image], 6))
    assert replies[0] == r1.split("\n")[0]
    # the second turn sees the first turn and its image; the missing image was not attached
    u2 = user_message("And the circle?", 0)
    r2 = text(reference_greedy(cm, [u1, Message("assistant", r1), u2], [image], 6))
    assert replies[1] == r2.split("\n")[0]
    # after /reset only the new message is in the context
    r3 = text(reference_greedy(cm, [user_message("Hello", 0)], [], 6))
    assert replies[2] == r3.split("\n")[0]


def test_chat_ends_at_end_of_input(tiny_model, monkeypatch, capsys):
    rc, replies, _ = run_chat(monkeypatch, capsys, ["chat", "--model", str(tiny_model), "--max-new-tokens", "2"],
                              ["", "Hello"])  # fmt: skip
    assert rc == 0 and len(replies) == 1  # the empty line asked nothing


def test_the_console_script_through_a_pipe(cm, tiny_model, image):
    """The command in a real process (python -m modalign.cli), its stdin a pipe."""
    cmd = [sys.executable, "-m", "modalign.cli",
           "chat", "--model", str(tiny_model), "--max-new-tokens", "5", "--image", image]  # fmt: skip
    p = subprocess.run(cmd, input="What colour is the square?\n/quit\n", capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    want = cm.tok.decode(reference_greedy(cm, [user_message("What colour is the square?", 1)], [image], 5))
    assert p.stdout.split("assistant> ")[1].split("\n")[0] == want.split("\n")[0]


def test_text_never_places_an_image(cm):
    """The private-use character that marks an image inside message text, written by a user or by
    a model whose output is fed back (a caption, a tool's answer), is dropped; the text prompt
    then has no image placeholder and runs."""
    from modalign.data.conversation import IMAGE_MARK

    msg = user_message(f"a{IMAGE_MARK}b", 0)
    assert msg.content == "ab" and msg.num_images == 0
    assert cm.model.config.image_token_id not in cm.prompt([msg], []).input_ids
    assert user_message(f"{IMAGE_MARK}<image> c", 1).num_images == 1


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_generate_quantized(scheme, cm, tiny_model, image, capsys, monkeypatch):
    """``--quantize int8`` / ``int4``: the answer is the quantized model's own greedy answer (the
    whole sequence re-run each step), its next-token logits are near fp32's (int8: activations
    in 7 bits, weights in 8; int4: 16 levels a group, products in bfloat16), and every decoder
    matrix is held in the scheme only; an unknown scheme is refused."""
    from modalign.infer.engine import Engine
    from modalign.infer.quant import int4_problem

    q = "What colour is the square?"
    qcm = ChatModel.load(tiny_model, device="cpu", dtype="float32", quantize=scheme)
    want = reference_greedy(qcm, [user_message(q, 1)], [image], 8)
    args = ["generate", "--model", str(tiny_model), "--image", image, "--prompt", q, "--max-new-tokens", "8",
            "--device", "cpu", "--json"]  # fmt: skip
    engines, init = [], Engine.__init__
    monkeypatch.setattr(
        Engine, "__init__", lambda self, *a, **kw: (init(self, *a, **kw), engines.append(self))[0]
    )
    assert main([*args, "--quantize", scheme]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["token_ids"] == want
    assert [e.quantize for e in engines] == [scheme]

    def next_logits(c):
        p = c.prompt([user_message(q, 1)], [image])
        with torch.no_grad():
            return c.model(torch.tensor([p.input_ids]), pixel_values=torch.stack(p.pixel_values)).logits[
                0, -1
            ]

    fp32, quant = next_logits(cm), next_logits(qcm)
    assert (quant - fp32).abs().max() <= {"int8": 0.05, "int4": 0.2}[scheme] * fp32.abs().max()
    llm = engines[0].model.llm
    for m in llm.modules():  # every matrix in the scheme, but where int4's kernel cannot take it
        if (op := getattr(m, "quantized", None)) is not None:
            int4 = scheme == "int4" and int4_problem((op.out_features, op.in_features)) is None
            assert type(op).__name__ == ("Int4Linear" if int4 else "Int8Linear")
            assert getattr(m, "weight", None) is None
    assert type(llm.lm_head).__name__ == "QuantizedLinear"
    with pytest.raises(SystemExit):
        main([*args, "--quantize", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_a_failed_turn_is_undone_with_its_images(cm, tiny_model, image, tmp_path, monkeypatch, capsys):
    """A corrupt image attached with /image fails its turn, and only that one: the next turn's
    reply is the one a conversation without it gives (the images of the failed turn stayed
    attached and failed every later turn)."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    argv = ["chat", "--model", str(tiny_model), "--max-new-tokens", "6", "--device", "cpu"]
    rc, replies, out = run_chat(
        monkeypatch, capsys, argv, ["/image " + str(bad), "What colour?", "Hello", "/quit"]
    )
    assert rc == 0 and "(error: " in out and "bad.png" in out and "1 image(s) dropped" in out
    want = cm.tok.decode(reference_greedy(cm, [user_message("Hello", 0)], [], 6))
    assert replies[1] == want.split("\n")[0]


def test_a_chat_past_the_context_says_so_and_goes_on(tiny_model, monkeypatch, capsys):
    argv = ["chat", "--model", str(tiny_model), "--max-new-tokens", "4", "--device", "cpu"]
    rc, replies, out = run_chat(monkeypatch, capsys, argv, ["word " * 5000, "Hello", "/quit"])
    assert rc == 0 and "fills the model's context length" in out and "/reset" in out
    assert len(replies) == 2 and "(error" not in replies[1]
