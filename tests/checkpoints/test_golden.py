"""Released-checkpoint layouts reproduce the official implementations' logits (tests/golden: tiny
checkpoints + inputs + expected tensors made by the official code; see its README)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modalign import MLLM

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
TOL = dict(atol=1e-4, rtol=1e-4)
CLIP_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073))
CLIP_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711))


def _load(name):
    d = GOLDEN / name
    return (
        MLLM.from_pretrained(d),
        load_file(str(d / "inputs.safetensors")),
        load_file(str(d / "expected.safetensors")),
    )


def greedy(model, n, **prompt):
    """Greedy decoding with the KV cache (no EOS stop)."""
    first = prompt.get("input_ids", prompt.get("inputs_embeds"))
    b = first.shape[0]
    cache = model.llm.new_cache(b, 1400 + n)  # room for the expanded prompt
    logits = model(cache=cache, **prompt).logits
    out = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, cache=cache).logits
    return torch.cat(out, 1)


@pytest.fixture(scope="module")
def owl2():
    return _load("mplug_owl2")


@pytest.mark.parametrize("case", ["single", "multi"])
def test_mplug_owl2_multimodal(owl2, case):
    model, inp, exp = owl2
    ids, mask, px = inp[f"{case}.input_ids"], inp[f"{case}.attention_mask"], inp[f"{case}.pixel_values"]
    with torch.no_grad():
        states = model.vision.hidden_states(px)
        torch.testing.assert_close(
            model.vision.post_layernorm(states[-1]), exp[f"{case}.vision_last_hidden_state"], **TOL
        )
        torch.testing.assert_close(model.encode_images(px), exp[f"{case}.image_features"], **TOL)
        sp = model.embed(ids, px, mask)
        torch.testing.assert_close(sp.inputs_embeds, exp[f"{case}.inputs_embeds"], **TOL)
        assert torch.equal(sp.modality_ids, exp[f"{case}.modality_indicators"])
        assert torch.equal(sp.attention_mask.long(), exp[f"{case}.expanded_attention_mask"])
        out = model(ids, pixel_values=px, attention_mask=mask)
        torch.testing.assert_close(out.logits, exp[f"{case}.logits"], **TOL)
        gen = greedy(model, 8, input_ids=ids, pixel_values=px, attention_mask=mask)
    assert torch.equal(gen, exp[f"{case}.generated_ids"])


def test_mplug_owl2_text_only(owl2):
    model, inp, exp = owl2
    ids = inp["text.input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, attention_mask=inp["text.attention_mask"]).logits, exp["text.logits"], **TOL
        )
        assert torch.equal(greedy(model, 8, input_ids=ids), exp["text.generated_ids"])


@pytest.fixture(scope="module")
def ixc():
    return _load("internlm2_plora")


def test_internlm2_text(ixc):
    model, inp, exp = ixc
    ids = inp["text.input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, exp["text.logits"], **TOL)
        assert torch.equal(greedy(model, 8, input_ids=ids), exp["text.generated_ids"])


def test_internlm2_plora_on_given_embeddings(ixc):
    model, inp, exp = ixc
    emb, im = inp["embeds.inputs_embeds"], inp["embeds.im_mask"].long()
    with torch.no_grad():
        torch.testing.assert_close(
            model(inputs_embeds=emb, modality_ids=im).logits, exp["embeds.logits"], **TOL
        )
        off = model(inputs_embeds=emb, modality_ids=torch.zeros_like(im)).logits
        torch.testing.assert_close(off, exp["embeds.logits_im_mask_false"], **TOL)
        gen = greedy(model, 8, inputs_embeds=emb, modality_ids=im)
    assert torch.equal(gen, exp["embeds.generated_ids"])
    # the same rows built through the splice: -1 rows replaced by the stand-in features
    ids = inp["embeds.input_ids"]
    sp_emb = model.llm.embed_tokens(ids.clamp(min=0))
    sp_emb[ids == -1] = inp["embeds.image_features"]
    torch.testing.assert_close(sp_emb, emb, atol=0, rtol=0)


def test_xcomposer25_hd_image_path(ixc):
    model, inp, exp = ixc
    u8 = inp["full0.pixel_uint8"]
    px = (u8.float() / 255 - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]
    before, after = inp["full0.text_ids_before_image"], inp["full0.text_ids_after_image"]
    ids = torch.cat([before, torch.tensor([[model.config.image_token_id]]), after], 1)
    with torch.no_grad():
        hd = model.vision.encode_hd(px[0])
        torch.testing.assert_close(hd, exp["full0.vit_hd_tokens"][0], **TOL)
        assert model.num_image_tokens((1120, 560)) == hd.shape[0] == 1261
        torch.testing.assert_close(model.encode_images(px)[0], exp["full0.image_embeds"][0], **TOL)
        out = model(ids, pixel_values=px)
        assert torch.equal(out.modality_ids.bool()[0], exp["full0.im_mask"][0])
        torch.testing.assert_close(out.logits[:, :9], exp["full0.logits_head"], **TOL)
        torch.testing.assert_close(out.logits[:, -18:], exp["full0.logits_tail"], **TOL)
        gen = greedy(model, 8, input_ids=ids, pixel_values=px)
    assert torch.equal(gen, exp["full0.generated_ids"])


@pytest.mark.parametrize("name", ["mplug_owl2", "internlm2_plora"])
def test_golden_save_load_identical(tmp_path, name):
    model, inp, _ = _load(name)
    model.save_pretrained(tmp_path / "m")
    again = MLLM.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    ids = inp["text.input_ids"]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("rows", [577, 1226])
def test_ixc2_vl_490_layout_from_either_position_table(tmp_path, rows):
    """IXC2-VL (no GN tokens): the tower runs at 490 px whether the file holds CLIP-336's
    577-row table (resized on load) or the already resized 1226-row one."""
    import json
    import shutil

    from safetensors.torch import save_file

    src = GOLDEN / "internlm2_plora"
    tensors = load_file(str(src / "model.safetensors"))
    for k in ("plora_glb_GN", "plora_sub_GN"):
        tensors.pop(k)
    c = tensors["vit.vision_tower.vision_model.embeddings.class_embedding"].shape[0]
    tensors["vision_proj.0.weight"] = torch.randn(tensors["vision_proj.0.weight"].shape[0], c) * 0.1
    g = int((rows - 1) ** 0.5)
    table = torch.randn(g * g + 1, c)
    tensors["vit.vision_tower.vision_model.embeddings.position_embedding.weight"] = table
    out = tmp_path / "ixc2vl"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    shutil.copy(src / "config.json", out / "config.json")
    sub = json.loads((src / "IXC2d5_clip_l_560" / "config.json").read_text()) | {"image_size": 336}
    (out / "clip").mkdir()
    (out / "clip" / "config.json").write_text(json.dumps(sub))
    model = MLLM.from_pretrained(out)
    assert model.config.vision.image_size == 490 and model.config.vision.hd_layout is None
    assert model.num_image_tokens() == 35 * 35
    with torch.no_grad():
        assert model.encode_images(torch.randn(1, 3, 490, 490)).shape == (1, 1225, 64)
    # the file's table: CLIP-336's 24 x 24 grid resized to 35 x 35 on load, a 35 x 35 one as it is
    from modalign.models.vision import resize_position_table

    got = model.vision.embeddings.position_embedding.weight.detach()
    assert torch.equal(got, resize_position_table(table, 35) if rows == 577 else table)
