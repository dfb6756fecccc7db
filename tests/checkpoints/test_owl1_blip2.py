"""mPLUG-Owl (v1) and BLIP-2 with OPT and Flan-T5 as released (tests/golden, made with the official
mPLUG-Owl code and transformers' own BLIP-2): logits within 1e-4 and greedy ids equal through the
public API, and the same from the PNG and the question text through ``modalign generate``."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modalign import MLLM
from modalign.cli import main
from modalign.infer.chat import ChatModel, user_message

G = Path(__file__).resolve().parents[1] / "golden"


def golden(name: str, case: str):
    d = G / name
    return load_file(str(d / f"{case}.inputs.safetensors")), load_file(str(d / f"{case}.outputs.safetensors"))


@pytest.mark.parametrize("case", ["one_image", "two_images", "text_only"])
def test_mplug_owl_logits_and_stages(case):
    model = MLLM.from_pretrained(G / "mplug_owl" / "checkpoint")
    inp, out = golden("mplug_owl", case)
    with torch.no_grad():
        px = inp.get("pixel_values")
        if px is not None:
            torch.testing.assert_close(
                model.vision(px), out["vision_last_hidden_state"], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(model.encode_images(px), out["image_embeds_lm"], atol=1e-5, rtol=1e-5)
        got = model(inp["input_ids"], pixel_values=px, attention_mask=inp["attention_mask"].long())
    torch.testing.assert_close(got.logits, out["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["blip2_opt", "blip2_opt_std0.2", "blip2_flan_t5", "blip2_flan_t5_std0.2"])
def test_blip2_logits_loss_and_stages(name):
    """OPT: the decoder-only family's OPT switches; Flan-T5: the encoder-decoder, with labels and with
    explicit decoder inputs. The std-0.2 sets (larger activations) are compared relative to the
    logits' size."""
    model = MLLM.from_pretrained(G / name / "checkpoint")
    inp, out = golden(name, "one_image")
    px = inp["pixel_values"]
    t5 = "t5" in name
    with torch.no_grad():
        torch.testing.assert_close(model.vision(px), out["vision_last_hidden_state"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.encode_images(px), out["language_model_inputs"], atol=1e-5, rtol=1e-5
        )
        got = model(
            inp["input_ids"], pixel_values=px, attention_mask=inp["attention_mask"], labels=inp["labels"]
        )
        ref = out["logits_with_labels" if t5 else "logits"]
        atol = 1e-4 * max(1.0, float(ref.abs().max()) / 2)
        torch.testing.assert_close(got.logits, ref, atol=atol, rtol=1e-4)
        assert got.loss.item() == pytest.approx(out["loss"].item(), abs=1e-5)
        if t5:
            dec = model(inp["input_ids"], pixel_values=px, attention_mask=inp["attention_mask"],
                        decoder_input_ids=inp["decoder_input_ids"])  # fmt: skip
            torch.testing.assert_close(dec.logits, out["logits_with_decoder_input_ids"], atol=atol, rtol=1e-4)


CASES = {  # name: (question, images, how the official output starts)
    "mplug_owl": ("What is in the image?", ["image_70x40.png"], 1),  # a dummy BOS before the new ids
    "blip2_opt": (
        "Question: what is in the image? Answer:",
        ["image_70x40.png"],
        None,
    ),  # the prompt, then new ids
    "blip2_opt_std0.2": ("Question: what is in the image? Answer:", ["image_70x40.png"], None),
    "blip2_flan_t5": ("Question: what is in the image? Answer:", ["image_70x40.png"], 1),  # the decoder start
    "blip2_flan_t5_std0.2": ("Question: what is in the image? Answer:", ["image_70x40.png"], 1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_from_the_png_and_the_question(name, capsys):
    """The release's conversation format, tokenizer, image preprocessing and greedy decoding, from
    the files: the official prompt ids, pixel values and generated ids."""
    question, images, skip = CASES[name]
    d = G / name
    inp, out = golden(name, "one_image")
    cm = ChatModel.load(d / "checkpoint")
    ids = cm.prompt_ids([user_message(question, len(images))])
    assert ids == inp["input_ids"][0].tolist()
    assert torch.equal(cm.images(d / "images" / images[0]), inp["pixel_values"][0])
    want = out["generated_ids"][0].tolist()
    want = want[skip:] if skip else want[len(ids) :]
    args = ["generate", "--model", str(d / "checkpoint"), "--prompt", question, "--max-new-tokens", str(len(want)),
            "--json", *[a for im in images for a in ("--image", str(d / "images" / im))]]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"] == want
