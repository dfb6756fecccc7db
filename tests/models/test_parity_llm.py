"""Decoder parity with transformers: Llama (GQA, rope scaling), Mistral (sliding window),
Qwen2 (q/k/v bias, tied embeddings); left padding; KV-cache decoding."""

import pytest
import torch

from modalign import MLLM
from tests.helpers import assert_close_where, randomize, tiny_llama_config, transformers


def _save(tmp_path, cls, cfg_cls, **kw):
    torch.manual_seed(0)
    ref = randomize(cls(cfg_cls(**tiny_llama_config(**kw)))).eval()
    ref.save_pretrained(tmp_path / "m")
    return ref, MLLM.from_pretrained(tmp_path / "m")


def _batch(t=12, b=3, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(1, b):  # left padding of different lengths
        mask[i, : 2 * i] = 0
        ids[i, : 2 * i] = 0
    return ids, mask


LLAMA_CASES = {
    "gqa": {},
    "llama3_rope": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        rope_theta=500000.0,
    ),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic_rope": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8),
    "mha_bias_headdim": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True, head_dim=8),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_parity(tmp_path, case):
    ref, ours = _save(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig, **LLAMA_CASES[case])
    ids, mask = _batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert_close_where(got, want, mask)


def test_dynamic_rope_long_sequence_no_padding(tmp_path):
    # no padding: positions are identical in both, and the sequence exceeds max_position (8)
    kw = dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8)
    ref, ours = _save(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig, **kw)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_mistral_sliding_window_parity(tmp_path):
    ref, ours = _save(tmp_path, transformers.MistralForCausalLM, transformers.MistralConfig, sliding_window=4)
    assert ours.config.llm.sliding_window == 4
    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours(ids).logits
        # the window matters: without it the logits differ
        ours.config.llm.sliding_window = None
        no_window = ours(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (no_window - want).abs().max() > 1e-3


def test_qwen2_bias_tied_parity(tmp_path):
    ref, ours = _save(
        tmp_path, transformers.Qwen2ForCausalLM, transformers.Qwen2Config, tie_word_embeddings=True
    )
    llm = ours.llm
    assert llm.lm_head.weight is llm.embed_tokens.weight
    assert llm.layers[0].self_attn.q_proj.bias is not None and llm.layers[0].self_attn.o_proj.bias is None
    ids, mask = _batch()
    with torch.no_grad():
        assert_close_where(
            ours(ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits, mask
        )


def test_kv_cache_greedy_equals_full_forward_and_hf_generate(tmp_path):
    ref, ours = _save(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig)
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    steps = 10
    with torch.no_grad():
        # cached
        cache = ours.llm.new_cache(1, ids.shape[1] + steps)
        logits = ours(ids, cache=cache).logits
        cached = []
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            cached.append(nxt.item())
            logits = ours(nxt, cache=cache).logits
        # full forward per step
        seq = ids
        full = []
        for _ in range(steps):
            nxt = ours(seq).logits[:, -1].argmax(-1, keepdim=True)
            full.append(nxt.item())
            seq = torch.cat([seq, nxt], 1)
        hf = ref.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
    assert cached == full == hf[0, ids.shape[1] :].tolist()


def test_text_only_checkpoint_has_no_vision(tmp_path):
    _, ours = _save(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig)
    assert not ours.has_vision and ours.num_image_tokens() == 0
    with pytest.raises(ValueError, match="no vision tower"):
        ours.encode_images(torch.zeros(1, 3, 28, 28))
