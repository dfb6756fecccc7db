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


def test_opt_parity_padding_cache_and_greedy(tmp_path):
    """OPT through the decoder's OPT switches (LayerNorm, learned positions offset by 2, ReLU fc1/fc2,
    tied head): logits on a left-padded batch, and greedy tokens equal transformers' generate."""
    from modalign.infer.engine import Engine, Prompt, SamplingParams

    cfg = transformers.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                 pad_token_id=1, bos_token_id=2, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    ref = randomize(transformers.OPTForCausalLM(cfg)).eval()
    ref.save_pretrained(tmp_path / "opt")
    ours = MLLM.from_pretrained(tmp_path / "opt")
    assert ours.config.llm.norm == "layer" and ours.llm.lm_head.weight is ours.llm.embed_tokens.weight
    ids, mask = _batch()
    with torch.no_grad():
        assert_close_where(
            ours(ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits, mask
        )
        prompt = torch.tensor([[2, 7, 19, 33, 4]])
        want = ref.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)[0, 5:].tolist()
    got = Engine(ours).generate([Prompt(prompt[0].tolist())], SamplingParams(max_new_tokens=10))[0].token_ids
    assert got == want


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])
def test_t5_parity_encoder_decoder_and_greedy(tmp_path, proj):
    """T5 (v1.1 / Flan gated GELU, and v1.0 ReLU with the tied, scaled head): decoder logits for a
    padded encoder batch, and greedy tokens equal transformers' generate."""
    from modalign.checkpoints.blip2 import llm_config_from_t5
    from modalign.config import MLLMConfig
    from modalign.infer.engine import Engine, Prompt, SamplingParams

    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                                num_heads=4, feed_forward_proj=proj, relative_attention_num_buckets=8,
                                relative_attention_max_distance=20, tie_word_embeddings=proj == "relu",
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    ref = randomize(transformers.T5ForConditionalGeneration(cfg)).eval()
    ours = MLLM(MLLMConfig(llm=llm_config_from_t5(cfg.to_dict()))).eval()
    sd = {"llm." + k: v for k, v in ref.state_dict().items() if not k.endswith("embed_tokens.weight")}
    ours.load_state_dict(sd, strict=not ours.config.llm.tie_word_embeddings)
    ids, mask = _batch(t=15, vocab=96)
    dec = torch.randint(2, 96, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = ours(ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        prompt = torch.tensor([[5, 9, 14, 22, 3, 1]])
        gen = [0]  # greedy with full forwards (transformers' generate cannot cache 3 decoder layers over 2)
        for _ in range(8):
            logits = ref(input_ids=prompt, decoder_input_ids=torch.tensor([gen])).logits
            gen.append(int(logits[0, -1].argmax()))
        gen = gen[1:]
    assert (
        Engine(ours).generate([Prompt(prompt[0].tolist())], SamplingParams(max_new_tokens=8))[0].token_ids
        == gen
    )
