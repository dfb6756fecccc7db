"""LAVIS's BLIP-2 files and MiniGPT-4's projection as connector parts, and MiniGPT-4's template."""

import pytest
import torch

from modalign.checkpoints.io import CheckpointError
from modalign.checkpoints.parts import build_from_parts, merge_part_configs
from modalign.config import MLLMConfig
from tests.models.test_qformer_stage1 import retrieval_pair, texts

# transformers' Blip2ForImageTextRetrieval names -> LAVIS's Blip2Qformer names (LAVIS's Qformer.py)
LAVIS_NAMES = [
    ("embeddings.word_embeddings.", "Qformer.bert.embeddings.word_embeddings."),
    ("embeddings.position_embeddings.", "Qformer.bert.embeddings.position_embeddings."),
    ("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm."),
    ("qformer.encoder.", "Qformer.bert.encoder."),
    ("vision_projection.", "vision_proj."),
    ("text_projection.", "text_proj."),
    ("itm_head.", "itm_head."),
    ("query_tokens", "query_tokens"),
]


def lavis_file(ref, path):
    """``ref``'s Q-Former saved as LAVIS saves a BLIP-2 stage-1 run: ``{"model": {...}}``."""
    out = {}
    for k, v in ref.state_dict().items():
        for src, dst in LAVIS_NAMES:
            if k.startswith(src):
                name = dst + k[len(src) :]
                name = name.replace(".attention.attention.", ".attention.self.")
                out[name.replace(".crossattention.attention.", ".crossattention.self.")] = v.clone()
    out["temp"] = torch.tensor(0.05)
    out["visual_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)  # the ViT: not connector weights
    out["ln_vision.weight"] = torch.ones(3)
    torch.save({"model": out}, path)
    return out


def test_lavis_qformer_file_gives_the_same_logits(tmp_path):
    ref, ours = retrieval_pair(tmp_path)
    lavis_file(ref, tmp_path / "blip2_pretrained.pth")
    init = {"vision": str(tmp_path / "itm"), "connector": str(tmp_path / "blip2_pretrained.pth")}
    cfg = MLLMConfig.from_dict(merge_part_configs(ours.config.to_dict(), init))
    again = build_from_parts(cfg, init, seed=0).eval()
    ids, mask = texts()
    px = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        feats = ours.vision(px)
        want = ref(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        torch.testing.assert_close(
            again.connector.itm_logits(feats, ids, mask), want.logits_per_image, atol=1e-5, rtol=1e-5
        )
        itc = ref(pixel_values=px, input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(
            again.connector.itc_similarity(feats, ids, mask), itc.logits_per_image, atol=1e-5, rtol=1e-5
        )
    assert again.connector.temp.item() == pytest.approx(0.05)  # LAVIS saves its temperature


def test_minigpt4_projection_over_blip2_qformer(tmp_path):
    """MiniGPT-4: BLIP-2's Q-Former without its text branch, and the released ``llama_proj``."""
    ref, ours = retrieval_pair(tmp_path)
    lavis_file(ref, tmp_path / "blip2_pretrained.pth")
    base = ours.config.to_dict()
    base["connector"] |= {"text_vocab_size": None, "text_heads": []}  # MiniGPT-4 drops the text branch
    d_llm = ours.config.llm.hidden_size
    proj = {"llama_proj.weight": torch.randn(d_llm, 48), "llama_proj.bias": torch.randn(d_llm)}
    torch.save({"model": proj}, tmp_path / "pretrained_minigpt4.pth")
    init = {"vision": str(tmp_path / "itm"),
            "connector": [str(tmp_path / "blip2_pretrained.pth"), str(tmp_path / "pretrained_minigpt4.pth")]}  # fmt: skip
    model = build_from_parts(MLLMConfig.from_dict(base), init, seed=0).eval()
    c = model.connector
    assert not hasattr(c.qformer, "embeddings") and not hasattr(c, "itm_head")
    assert torch.equal(c.language_projection.weight, proj["llama_proj.weight"])
    assert torch.equal(c.language_projection.bias, proj["llama_proj.bias"])
    # the embeddings' LayerNorm is the queries' LayerNorm, and the queries' output is BLIP-2's
    assert torch.equal(c.qformer.layernorm.weight, ref.qformer.layernorm.weight)
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        feats = model.vision(px)
        q = ref.qformer(
            query_embeds=ref.query_tokens.expand(2, -1, -1), encoder_hidden_states=feats
        ).last_hidden_state
        torch.testing.assert_close(model.encode_images(px), q @ proj["llama_proj.weight"].t() + proj["llama_proj.bias"],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    # a file laid over must fit the part
    torch.save({"model": {"llama_proj.weight": torch.randn(3, 48)}}, tmp_path / "bad.pth")
    init["connector"][1] = str(tmp_path / "bad.pth")
    with pytest.raises(
        CheckpointError,
        match=r"init\.connector: .*bad\.pth \(connector\): language_projection\.weight has shape \(3, 48\)",
    ):
        build_from_parts(MLLMConfig.from_dict(base), init, seed=0)


def test_minigpt4_template_is_the_release_prompt():
    from modalign.data.conversation import IMAGE_MARK, Message, get_template

    class Tok:
        bos_token, eos_token = "<s>", "</s>"

    t = get_template("minigpt4")
    text, spans, _ = t.render(
        [
            Message("user", IMAGE_MARK + "\nDescribe this image in detail."),
            Message("assistant", "A red circle."),
        ],
        Tok(),
    )
    # the stage-2 training prompt: '###Human: {} ###Assistant: ' + answer + end_sym '###'
    assert (
        text
        == "###Human: <Img>"
        + IMAGE_MARK
        + "</Img> Describe this image in detail. ###Assistant: A red circle.###"
    )
    assert [text[a:b] for a, b in spans] == ["A red circle.", "###"]
    # the demo's conversation: system + '###' + 'Human: ' + message + '###' + 'Assistant: ' ...
    system = "Give the following image: <Img>ImageContent</Img>. Please answer my questions."
    msgs = [Message("system", system), Message("user", IMAGE_MARK + " What is it?"), Message("assistant", "A cat."),
            Message("user", "Which colour?")]  # fmt: skip
    text, _, _ = t.render(msgs, Tok(), add_generation_prompt=True)
    assert text == (system + "###Human: <Img>" + IMAGE_MARK + "</Img> What is it? ###Assistant: A cat.###"
                    "Human: Which colour? ###Assistant: ")  # fmt: skip
    assert t.stop_strings == ("###",)


def test_lavis_itg_head_names():
    """LAVIS's BERT LM head (``Qformer.cls.predictions``) is the itg head; its decoder is tied."""
    from modalign.checkpoints.blip2 import fit_qformer_state, lavis_connector_state

    t = {k: torch.randn(2) for k in ("Qformer.cls.predictions.bias", "Qformer.cls.predictions.transform.dense.weight",
                                     "Qformer.cls.predictions.transform.LayerNorm.weight",
                                     "Qformer.cls.predictions.decoder.weight", "Qformer.cls.predictions.decoder.bias")}  # fmt: skip
    got = lavis_connector_state(t)
    assert set(got) == {"connector.itg_head.bias", "connector.itg_head.transform.dense.weight",
                        "connector.itg_head.transform.LayerNorm.weight"}  # fmt: skip
    cfg = MLLMConfig.from_name("tiny-blip2").connector
    state = {k[len("connector.") :]: v for k, v in got.items()}
    assert set(fit_qformer_state(state, cfg)) == set(state)  # the miniature's Q-Former has the itg head
    cfg.text_heads = ["itc", "itm"]
    assert fit_qformer_state(state, cfg) == {}
