"""BLIP-2 (Q-Former + Llama) parity with transformers' Blip2ForConditionalGeneration."""

import torch

from modalign import MLLM
from tests.helpers import (
    IMAGE_TOKEN,
    assert_close_where,
    llava_inputs,
    randomize,
    tiny_llama_config,
    transformers,
)


def make_blip2(tmp_path, layers=3, every=2, instruct=False, qformer_vocab=100, qformer_positions=32):
    """A tiny random BLIP-2 (or InstructBLIP) with a Llama LM, saved and loaded by modalign."""
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7)  # fmt: skip
    qc = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
              encoder_hidden_size=32, cross_attention_frequency=every, vocab_size=qformer_vocab,
              max_position_embeddings=qformer_positions)  # fmt: skip
    tc = transformers.LlamaConfig(**tiny_llama_config())
    config_cls = transformers.InstructBlipConfig if instruct else transformers.Blip2Config
    model_cls = (
        transformers.InstructBlipForConditionalGeneration
        if instruct
        else transformers.Blip2ForConditionalGeneration
    )
    cfg = config_cls(vision_config=vc, qformer_config=qc, text_config=tc.to_dict(), num_query_tokens=5,
                     image_token_index=IMAGE_TOKEN)  # fmt: skip
    torch.manual_seed(0)
    ref = randomize(model_cls(cfg)).eval()
    ref.save_pretrained(tmp_path / "ref")
    return ref, MLLM.from_pretrained(tmp_path / "ref")


def test_blip2_logits_parity(tmp_path):
    ref, ours = make_blip2(tmp_path)
    assert ours.num_image_tokens() == 5
    ids, mask = llava_inputs(5, lengths=(8, 4, 6), images_per_row=(1, 2, 1))
    px = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        got = ours(ids, pixel_values=px, attention_mask=mask).logits
        feats = ref.get_image_features(pixel_values=px).pooler_output
        torch.testing.assert_close(ours.encode_images(px), torch.stack(list(feats)), atol=1e-4, rtol=1e-4)
    assert_close_where(got, want, mask)


def test_blip2_save_load_identical(tmp_path):
    _, ours = make_blip2(tmp_path, layers=2, every=1)
    ours.save_pretrained(tmp_path / "native")
    again = MLLM.from_pretrained(tmp_path / "native")
    ids, _ = llava_inputs(5, lengths=(6,))
    px = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(again(ids, pixel_values=px).logits, ours(ids, pixel_values=px).logits)


def test_instructblip_logits_parity(tmp_path):
    ref, ours = make_blip2(tmp_path, instruct=True, qformer_vocab=90, qformer_positions=40)
    ids, mask = llava_inputs(5, lengths=(7, 5))
    px = torch.randn(2, 3, 28, 28)
    q_ids = torch.randint(1, 90, (2, 6))
    q_mask = torch.ones_like(q_ids)
    q_mask[1, 4:] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=px, attention_mask=mask, qformer_input_ids=q_ids,
                   qformer_attention_mask=q_mask).logits  # fmt: skip
        got = ours(
            ids, pixel_values=px, attention_mask=mask, qformer_input_ids=q_ids, qformer_attention_mask=q_mask
        ).logits
        other = ours(ids, pixel_values=px, attention_mask=mask, qformer_input_ids=q_ids.flip(1)).logits
    assert_close_where(got, want, mask)
    assert (other - got).abs().max() > 1e-3  # the instruction changes the visual tokens
