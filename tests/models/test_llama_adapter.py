"""Multimodal LLaMA-Adapter (V2): visual prompts in the first layers (``fusion: adapter``), text
prompts in the last, bias tuning of the decoder's linears. Identity at initialisation, early
fusion (which layers learn from which batch), generation through the KV cache, save/load, the
trainable patterns of V2's disjoint training, and the bias-tuning merge."""

import copy

import pytest
import torch

from modalign import MLLM, MLLMConfig, PlaceholderMismatch
from modalign.config import AdapterConfig, ConnectorConfig, LLMConfig, LoRAConfig, VisionConfig
from modalign.infer.engine import Engine, Prompt, SamplingParams
from modalign.models.decoder import LLM
from modalign.models.modality import (
    enable_adapter,
    enable_lora,
    enable_mam,
    merge_bias_tuning,
    set_lora_merged,
)
from modalign.train.freeze import apply_trainable
from tests.models.fusion import (
    continuous_batching_matches_greedy,
    decoder_without,
    greedy_without_cache,
    mixed_prompts,
    packed_row_matches_samples_alone,
    pixels,
    save_load_round_trip,
    two_rows,
)

IMG = 63  # the image token: an ordinary id of the vocabulary
LAYERS = 3  # visual prompts in layer 0, nothing in layer 1, text prompts in layer 2


def config(prompt_len=4, visual_layers=1, num_layers=1, bias_tuning=True, fused_qkv=False) -> MLLMConfig:
    """A tiny LLaMA-Adapter V2: 16-px images in 4 patches, a 2-layer MLP connector (4 visual tokens
    per image: added token by token to a 4-row prompt, as their mean to any other length)."""
    adapter = AdapterConfig(num_layers=num_layers, prompt_len=prompt_len, visual_layers=visual_layers,
                            bias_tuning=bias_tuning)  # fmt: skip
    return MLLMConfig(
        llm=LLMConfig(vocab_size=64, hidden_size=40, intermediate_size=64, num_layers=LAYERS, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=128, fused_qkv=fused_qkv, adapter=adapter),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=16,
                            patch_size=8),
        connector=ConnectorConfig(type="mlp2x_gelu"),
        image_token_id=IMG,
        fusion="adapter",
    )  # fmt: skip


def tiny(seed=0, trained=False, **kw) -> MLLM:
    torch.manual_seed(seed)
    m = MLLM(config(**kw)).eval()
    if trained:  # as after training: gates open, biases and scales moved
        train_like(m)
    return m


def train_like(m: MLLM, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "adapter_gate" in n:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif n.endswith("adapter_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif n.endswith("adapter_scale"):
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)


def base_llm(m: MLLM) -> LLM:
    """The same decoder without any adapter part."""
    return decoder_without(m, "adapter", ".adapter_")


IDS, MASK = two_rows(IMG)


def visual(m: MLLM) -> dict[int, torch.nn.Parameter]:
    return {i: la.self_attn.adapter_prompt_visual for i, la in enumerate(m.llm.layers)
            if la.self_attn.adapter_prompt_visual is not None}  # fmt: skip


def text(m: MLLM) -> dict[int, torch.nn.Parameter]:
    return {
        i: la.self_attn.adapter_prompt
        for i, la in enumerate(m.llm.layers)
        if la.self_attn.adapter_prompt is not None
    }


# ------------------------------------------------------------------------------ structure


def test_prompts_gates_and_bias_tuning_where_the_config_puts_them():
    m = tiny()
    assert sorted(visual(m)) == [0] and sorted(text(m)) == [2]  # early fusion: images first, text last
    a = m.llm.layers[0].self_attn
    assert a.adapter_gate_visual.shape == (4,) and not a.adapter_gate_visual.any()  # per head, zero
    assert not m.llm.layers[2].self_attn.adapter_gate.any()
    tuned = {n for n, _ in m.named_parameters() if n.endswith("adapter_scale")}
    assert len(tuned) == LAYERS * 7 and "llm.layers.1.mlp.down_proj.adapter_scale" in tuned
    for n, p in m.named_parameters():
        if n.endswith("adapter_bias"):
            assert not p.any()
        elif n.endswith("adapter_scale"):
            assert torch.equal(p, torch.ones_like(p))
    assert m.num_image_tokens() == 1  # the image token itself; its features go to the prompts
    assert MLLMConfig.from_dict(m.config.to_dict()) == m.config


def test_config_is_checked():
    bad = config()
    bad.fusion = "splice"
    with pytest.raises(ValueError, match="visual_layers .* need fusion adapter"):
        MLLM(bad)
    bad = config(visual_layers=LAYERS + 1)
    with pytest.raises(ValueError, match="visual_layers must be in 0..3"):
        MLLM(bad)
    m = MLLM(config(visual_layers=0))  # fusion adapter without visual prompts: images have nowhere to go
    with pytest.raises(ValueError, match="no visual prompts"):
        m(IDS, pixels(3), MASK)
    with pytest.raises(PlaceholderMismatch, match="3 image token"):
        tiny()(IDS, pixels(2), MASK)


# ------------------------------------------------------------------------------ identity at init


@pytest.mark.parametrize("prompt_len", [4, 3])  # per-token features; their mean
def test_a_fresh_adapter_leaves_the_decoder_exactly_as_it_was(prompt_len):
    m = tiny(prompt_len=prompt_len)
    base = base_llm(m)
    with torch.no_grad():
        assert torch.equal(m(IDS, pixels(3), MASK).logits, base(IDS, attention_mask=MASK))
        assert torch.equal(m(IDS[:, :3]).logits, base(IDS[:, :3]))  # text only
        m.train()  # training builds the media even without images (the prompts stay in the graph)
        assert torch.equal(m(IDS[:, :3]).logits, base(IDS[:, :3]))
        assert torch.equal(m(IDS, pixels(3), MASK).logits, base(IDS, attention_mask=MASK))


# ------------------------------------------------------------------------------ early fusion


@pytest.mark.parametrize("prompt_len", [4, 3])
def test_images_reach_the_text_after_them_through_the_visual_prompts(prompt_len):
    m = tiny(prompt_len=prompt_len, trained=True)
    px = pixels(3)
    with torch.no_grad():
        ref = m(IDS, px, MASK).logits
        a = px.clone()
        a[0] = torch.randn(3, 16, 16)
        got = m(IDS, a, MASK).logits
        assert torch.equal(got[0, :3], ref[0, :3])  # before image A
        assert (got[0, 3:6] - ref[0, 3:6]).abs().amax(-1).min() > 1e-4  # A's token and the text after it
        assert torch.equal(got[1], ref[1])  # the other row
        b = px.clone()
        b[1] = torch.randn(3, 16, 16)
        got = m(IDS, b, MASK).logits
        assert torch.equal(got[0, :6], ref[0, :6])
        assert (got[0, 6:] - ref[0, 6:]).abs().amax(-1).min() > 1e-4
        # closed visual gates: the images matter no more, whatever the text prompts and biases do
        for la in m.llm.layers[:1]:
            la.self_attn.adapter_gate_visual.zero_()
        assert torch.equal(m(IDS, a, MASK).logits, m(IDS, px, MASK).logits)


def grads(m: MLLM) -> dict[str, set[int]]:
    """Which layers' prompts got a non-zero gradient, per kind."""
    out = {"visual": set(), "text": set()}
    for i, la in enumerate(m.llm.layers):
        for kind, name in (("visual", "adapter_prompt_visual"), ("text", "adapter_prompt")):
            p = getattr(la.self_attn, name)
            if p is not None and p.grad is not None and p.grad.abs().sum() > 0:
                out[kind].add(i)
    return out


def test_image_batches_train_the_early_prompts_text_batches_do_not():
    m = tiny(trained=True).train()
    m(IDS, pixels(3), MASK, labels=IDS.masked_fill(MASK == 0, -100)).loss.backward()
    assert grads(m) == {"visual": {0}, "text": {2}}
    m.zero_grad(set_to_none=True)
    m(IDS[:, :3], labels=IDS[:, :3]).loss.backward()  # text only
    assert grads(m) == {"visual": set(), "text": {2}}
    p = m.llm.layers[0].self_attn.adapter_prompt_visual  # in the graph (DDP), with a zero gradient
    assert p.grad is not None and not p.grad.any()


def test_v2_disjoint_training_patterns_train_only_their_parts():
    """Image-text data: the connector (V2's visual projector) and the early prompts; instruction
    data: the late prompts and the bias tuning. Fresh gates: only the gates learn at first."""
    image_stage = ["connector.*", "llm.layers.*.self_attn.adapter_*_visual"]
    text_stage = ["llm.layers.*.self_attn.adapter_prompt", "llm.layers.*.self_attn.adapter_gate",
                  "llm.**.adapter_bias", "llm.**.adapter_scale"]  # fmt: skip
    for patterns, batch, ok in (
        (image_stage, (IDS, pixels(3), MASK), lambda n: n.startswith("connector.") or n.endswith("_visual")),
        (text_stage, (IDS[:, :3], None, None), lambda n: ".adapter_" in n and not n.endswith("_visual")),
    ):
        m = tiny().train()
        apply_trainable(m, patterns)
        m(*batch, labels=batch[0]).loss.backward()
        named = dict(m.named_parameters())
        assert all(p.grad is None for n, p in named.items() if not ok(n))
        assert all(p.grad is not None for n, p in named.items() if ok(n))
        gate = "adapter_gate_visual" if patterns is image_stage else "adapter_gate"
        assert all(p.grad.abs().sum() > 0 for n, p in named.items() if n.endswith(gate))


def test_a_packed_row_gives_each_sample_its_own_logits():
    packed_row_matches_samples_alone(tiny(trained=True), IMG, pixels(2))


# ------------------------------------------------------------------------------ generation


def prompts():
    return mixed_prompts(IMG, pixels(4, seed=3))


@pytest.mark.parametrize("prompt_len", [4, 3])
def test_generation_with_the_cache_equals_a_greedy_loop_without(prompt_len):
    m = tiny(prompt_len=prompt_len, trained=True)
    ps = prompts()
    want = [greedy_without_cache(m, p.input_ids, p.pixel_values, 6) for p in ps]
    assert all(IMG not in w for w in want)  # (a generated image token would have no image)
    eng = Engine(m)
    got = [c.token_ids for c in eng.generate(ps, SamplingParams(max_new_tokens=6))]
    assert got == want
    pre = eng.prefill(ps[:2], 4)
    assert sorted(pre.cache.media.kv) == [("adapter", 0)]  # the visual prompts' keys/values, once
    other = [Prompt(p.input_ids, [torch.randn(3, 16, 16) for _ in p.pixel_values]) for p in ps]
    moved = (eng.prefill(other, 4).logits - eng.prefill(ps, 4).logits).abs().amax(-1)
    assert moved[[0, 1, 3]].min() > 1e-3 and moved[2] == 0  # the images matter, to their rows only


def test_continuous_batching_keeps_each_rows_images():
    continuous_batching_matches_greedy(tiny(trained=True), prompts())


# ------------------------------------------------------------------------------ checkpoints


def test_save_load_round_trip(tmp_path):
    save_load_round_trip(tiny(trained=True), tmp_path / "m", "adapter", IDS, pixels(3), MASK)


def test_enabling_on_a_splice_model_and_on_a_released_decoder(tmp_path):
    """``enable_adapter`` on a LLaVA-style model switches it to ``fusion: adapter``; ``model.init.llm``
    from a plain decoder adds the adapter after loading it, so the model starts as that decoder."""
    from modalign.checkpoints.parts import build_from_parts

    plain = config()
    plain.llm.adapter, plain.fusion = None, "splice"
    torch.manual_seed(5)
    lm = MLLM(plain).eval()
    m = copy.deepcopy(lm)
    assert enable_adapter(m, config().llm.adapter) == 1
    assert m.config.fusion == "adapter" and sorted(visual(m)) == [0] and m.num_image_tokens() == 1
    owl2 = copy.deepcopy(lm)
    owl2.config.image_token_id = -200  # a per-image placeholder outside the vocabulary
    with pytest.raises(ValueError, match="image_token_id in the vocabulary"):
        enable_adapter(owl2, config().llm.adapter)
    with torch.no_grad():
        want = lm.llm(IDS, attention_mask=MASK)  # the image token as an ordinary token
        assert torch.equal(m(IDS, pixels(3), MASK).logits, want)
    lm.save_pretrained(tmp_path / "lm")
    built = build_from_parts(config(), {"llm": str(tmp_path / "lm")}, seed=0).eval()
    assert built.config.llm.adapter == config().llm.adapter and sorted(visual(built)) == [0]
    with torch.no_grad():
        assert torch.equal(built(IDS, pixels(3), MASK).logits, want)


# ------------------------------------------------------------------------------ bias tuning


@pytest.mark.parametrize("lora_merged", [False, True])
def test_bias_tuning_merge_keeps_the_logits(lora_merged):
    m = tiny(trained=True, num_layers=3)
    enable_lora(m, LoRAConfig(rank=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        want = m(IDS, pixels(3), MASK).logits
        set_lora_merged(m, lora_merged)
        merge_bias_tuning(m)
        assert all(
            torch.equal(p, torch.ones_like(p)) for n, p in m.named_parameters() if n.endswith("_scale")
        )
        torch.testing.assert_close(m(IDS, pixels(3), MASK).logits, want, atol=1e-5, rtol=1e-5)
        set_lora_merged(m, not lora_merged)
        torch.testing.assert_close(m(IDS, pixels(3), MASK).logits, want, atol=1e-5, rtol=1e-5)


def test_bias_tuning_follows_a_fused_qkv_split_by_mam():
    m = tiny(trained=True, fused_qkv=True, num_layers=3)
    with torch.no_grad():
        want = m(IDS, pixels(3), MASK).logits
        enable_mam(m)
        assert m.llm.layers[0].self_attn.k_proj.multiway[1].adapter_scale.shape == (20,)
        torch.testing.assert_close(m(IDS, pixels(3), MASK).logits, want, atol=1e-5, rtol=1e-5)
