"""Modality-aware parts: Partial LoRA, MAM, LoRA (+PEFT), zero-init adapters, freezing."""

import copy

import pytest
import torch
import torch.nn.functional as F

from modalign import MLLM, MLLMConfig
from modalign.config import AdapterConfig, LoRAConfig, PLoRAConfig
from modalign.models.layers import RMSNorm
from modalign.models.modality import (
    ALinear,
    Multiway,
    enable_adapter,
    enable_lora,
    enable_mam,
    enable_plora,
    set_lora_merged,
)
from modalign.train.freeze import apply_trainable, param_groups


def tiny(seed=0, **llm):
    torch.manual_seed(seed)
    cfg = MLLMConfig.from_name("tiny-llava")
    cfg.llm.num_layers, cfg.vision.num_layers = 2, 2
    cfg.vision.image_size, cfg.vision.patch_size = 32, 8  # 16 visual tokens
    for k, v in llm.items():
        setattr(cfg.llm, k, v)
    return MLLM(cfg).eval()


def inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ph = model.config.image_token_id
    ids = torch.randint(4, 500, (2, 9), generator=g)
    ids[:, 0] = 1
    ids[0, 2] = ph
    ids[1, 5] = ph
    return ids, torch.randn(2, 3, 32, 32, generator=g)


def perturb(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


# ------------------------------------------------------------------------- Partial LoRA


def test_plora_text_and_zero_init_bit_identical_then_only_image_rows_change():
    base = tiny()
    model = copy.deepcopy(base)
    n = enable_plora(model, PLoRAConfig(rank=8, alpha=16))
    assert n == 2 * 7  # q k v o gate up down per layer
    ids, px = inputs(model)
    text = ids.masked_fill(ids == model.config.image_token_id, 7)
    with torch.no_grad():
        assert torch.equal(model(text).logits, base(text).logits)
        # the text-only path with explicit all-text modality ids (as training passes them)
        mod0 = torch.zeros_like(text)
        assert torch.equal(model(text, modality_ids=mod0).logits, base(text).logits)
        assert torch.equal(model(ids, pixel_values=px).logits, base(ids, pixel_values=px).logits)
    perturb([p for n, p in model.named_parameters() if "plora_B" in n])
    outs, logits = {}, {}
    for name, m in (("base", base), ("plora", model)):
        # the first layer's projections: PLoRA changes exactly the image rows
        hook = m.llm.layers[0].self_attn.k_proj.register_forward_hook(
            lambda mod, a, o, name=name: outs.__setitem__(name, o)
        )
        with torch.no_grad():
            out = m(ids, pixel_values=px)
        logits[name] = out.logits
        hook.remove()
    img = out.modality_ids.bool()
    diff = (outs["plora"] - outs["base"]).abs().amax(-1)
    assert (diff[~img] == 0).all() and (diff[img] > 1e-3).all()
    # text rows before the first image (causal) see no change at all, down to the logits
    first = img.float().argmax(-1)
    for r in range(2):
        assert torch.equal(logits["plora"][r, : first[r]], logits["base"][r, : first[r]])
        assert (logits["plora"][r, first[r] :] - logits["base"][r, first[r] :]).abs().max() > 1e-3


def test_plora_on_fused_qkv_and_params_stay_in_graph_without_images():
    model = tiny(fused_qkv=True)
    enable_plora(model, PLoRAConfig(rank=4, alpha=4, targets=["qkv_proj", "o_proj"]))
    assert model.llm.layers[0].self_attn.qkv_proj.plora_A is not None
    apply_trainable(model, ["llm.**.plora_*"])
    ids = torch.randint(4, 500, (2, 6))
    model.train()
    loss = model(ids, modality_ids=torch.zeros_like(ids), labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "plora" in n]
    assert len(grads) == 8 and all(g is not None for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "plora" not in n)


def test_adapters_equal_their_formulas_in_values_and_gradients():
    """LoRA (one ``addmm``) and Partial LoRA (on a CPU: the image rows gathered, then added back)
    against W x + b + s B A x (times the image mask), forward and backward."""
    torch.manual_seed(0)
    for kind in ("lora", "plora"):
        lin = ALinear(24, 20, bias=True)
        getattr(lin, f"add_{kind}")(4, 8.0)
        a, b = getattr(lin, f"{kind}_A").weight, getattr(lin, f"{kind}_B").weight
        perturb([b])
        x = torch.randn(3, 7, 24, requires_grad=True)
        img = torch.rand(3, 7) < 0.4
        mask = img.unsqueeze(-1).float() if kind == "plora" else 1.0
        ref = F.linear(x, lin.weight, lin.bias) + F.linear(F.linear(x, a), b) * 2.0 * mask
        y = lin(x, img)
        torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
        g = torch.randn_like(y)
        for got, want in zip(
            torch.autograd.grad(y, (x, a, b), g), torch.autograd.grad(ref, (x, a, b), g), strict=True
        ):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if kind == "plora":  # no image rows: the base alone, and A and B still get (zero) gradients
            none = torch.zeros(3, 7, dtype=torch.bool)
            y0 = lin(x, none)
            assert torch.equal(y0, F.linear(x, lin.weight, lin.bias))
            assert all(torch.equal(gr, torch.zeros_like(gr)) for gr in torch.autograd.grad(y0.sum(), (a, b)))


@pytest.mark.parametrize(
    ("dtype", "p"), [(torch.float32, 0.25), (torch.float32, 0.01), (torch.bfloat16, 0.01)]
)
def test_lora_dropout_keeps_each_input_feature_with_probability_1_minus_p(dtype, p):
    torch.manual_seed(0)
    lin = ALinear(64, 64, bias=False, dtype=dtype)
    lin.add_lora(64, 64.0, dropout=p)  # scale 1, A = B = I, W = 0: the output is dropout(x) itself
    with torch.no_grad():
        lin.weight.zero_()
        lin.lora_A.weight.copy_(torch.eye(64))
        lin.lora_B.weight.copy_(torch.eye(64))
    x = (torch.rand(2000, 64) + 1.0).to(dtype)
    lin.train()
    y = lin(x)
    kept = y != 0
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(
        y[kept], x[kept] / (1 - p), atol=0, rtol=tol
    )  # survivors scaled by 1 / (1 - p)
    sd = (p * (1 - p) / kept.numel()) ** 0.5  # 128,000 draws; a bf16 draw would drop 0.0119 for 0.01
    assert abs(1 - kept.float().mean().item() - p) < 4 * sd
    assert not torch.equal(kept, lin(x) != 0)  # a new mask each call
    lin.eval()
    assert torch.equal(lin(x), x)


def test_frozen_lora_with_zero_b_is_skipped_and_training_stays_bit_identical(monkeypatch):
    """A curriculum step that freezes some adapters before their first update (B still zero)
    skips computing them; its losses and weights equal computing them, bit for bit, dropout
    draws included (the skipped adapter's draw is still made, so the others' masks are the same)."""

    def run(skip: bool):
        if not skip:
            monkeypatch.setattr(ALinear, "_lora_adds_nothing", lambda self, a, b: False)
        model = tiny()
        enable_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1,
                                      targets=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]))  # fmt: skip
        apply_trainable(model, ["connector.*", "llm.**.lora_*", "!llm.layers.*.mlp.*"])
        perturb([p for n, p in model.named_parameters() if "self_attn" in n and "lora_B" in n])
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(5)
        ids, px = inputs(model)
        losses = []
        for _ in range(3):
            loss = model(ids, pixel_values=px, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        monkeypatch.undo()
        return losses, model.state_dict(), torch.get_rng_state()

    calls = []
    real = ALinear._lora_adds_nothing
    monkeypatch.setattr(
        ALinear, "_lora_adds_nothing", lambda self, a, b: calls.append(real(self, a, b)) or calls[-1]
    )
    fast = run(skip=True)
    assert sum(calls) == 3 * 2 * 3 and len(calls) == 3 * 2 * 5  # the MLPs' adapters, every step and layer
    slow = run(skip=False)
    assert fast[0] == slow[0] and torch.equal(fast[2], slow[2])
    assert all(torch.equal(fast[1][k], slow[1][k]) for k in fast[1])
    # once B has trained it is computed again, however it was written (a fused AdamW step and a
    # .data write leave its version counter as it was)
    lin = ALinear(8, 8)
    lin.add_lora(2, 4)
    a, b = lin.lora_A.weight.requires_grad_(False), lin.lora_B.weight.requires_grad_(False)
    x = torch.randn(3, 8)
    assert lin._lora_adds_nothing(a, b) and torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    b.requires_grad_(True)
    opt = torch.optim.AdamW([b], lr=0.1, fused=True)
    lin(x).sum().backward()
    opt.step()
    b.requires_grad_(False)
    assert b.count_nonzero() and not lin._lora_adds_nothing(a, b)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias) + 2 * x @ a.T @ b.T)
    b.data = torch.zeros_like(b)
    assert lin._lora_adds_nothing(a, b)
    b.data[0, 0] = 1.0
    assert not lin._lora_adds_nothing(a, b)
    assert not lin._lora_adds_nothing(a.requires_grad_(True), b.zero_())


def test_an_fp32_partial_lora_on_a_bf16_layer_keeps_the_layers_dtype_on_both_paths(monkeypatch):
    """Image rows alone (the CPU path) or the whole input masked (CUDA, torch.compile): a bf16
    output, the fp32 adapter added before one rounding, so both paths agree exactly."""
    from modalign.models import modality

    torch.manual_seed(0)
    lin = ALinear(16, 16, dtype=torch.bfloat16)
    lin.add_plora(4, 8)
    lin.plora_A.float(), lin.plora_B.float()
    torch.nn.init.normal_(lin.plora_B.weight)
    x = torch.randn(2, 5, 16).to(torch.bfloat16)
    img = torch.zeros(2, 5, dtype=torch.bool)
    img[0, 1:3] = img[1, 4] = True
    rows = lin(x, img)
    monkeypatch.setattr(modality, "image_rows", lambda x, img: None)
    masked = lin(x, img)
    assert rows.dtype == masked.dtype == torch.bfloat16 and torch.equal(rows, masked)
    base = F.linear(x, lin.weight, lin.bias).float()
    delta = (x.float() @ lin.plora_A.weight.T @ lin.plora_B.weight.T) * 2
    assert torch.equal(masked, (base + delta * img.unsqueeze(-1)).to(torch.bfloat16))


def test_lora_dropout_of_one_drops_the_adapter():
    lin = ALinear(8, 8)
    lin.add_lora(2, 2.0, dropout=1.0)
    perturb([lin.lora_B.weight])
    x = torch.randn(3, 8)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


# ------------------------------------------------------------------------- MAM


def test_mam_conversion_preserves_outputs_and_routes_by_modality():
    base = tiny()
    model = copy.deepcopy(base)
    enable_mam(model)
    ids, px = inputs(model)
    text = ids.masked_fill(ids == model.config.image_token_id, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pixel_values=px).logits, base(ids, pixel_values=px).logits,
                                   atol=1e-5, rtol=0)  # fmt: skip
    perturb([p for n, p in model.named_parameters() if ".multiway.1." in n])
    with torch.no_grad():
        assert torch.equal(model(text).logits, base(text).logits)
        assert torch.equal(model(text, modality_ids=torch.zeros_like(text)).logits, base(text).logits)
        assert (model(ids, pixel_values=px).logits - base(ids, pixel_values=px).logits).abs().max() > 1e-2
    names = [n for n, _ in model.named_parameters()]
    assert "llm.layers.0.self_attn.k_proj.multiway.1.weight" in names
    assert "llm.layers.1.post_attention_layernorm.multiway.0.weight" in names
    assert not any("q_proj.multiway" in n or "mlp.gate_proj.multiway" in n for n in names)


def test_multiway_equals_selecting_between_both_copies_in_values_and_gradients():
    """On a CPU the image copy runs on the image rows alone; the result is where(img, image, text)."""
    torch.manual_seed(0)
    for part in (ALinear(16, 12, bias=True), RMSNorm(16, 1e-6)):
        m = Multiway(part)
        perturb(list(m.multiway[1].parameters()))
        x = torch.randn(2, 9, 16, requires_grad=True)
        img = torch.rand(2, 9) < 0.4
        ref = torch.where(img.unsqueeze(-1), m.multiway[1](x), m.multiway[0](x))
        y = m(x, img)
        torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
        g = torch.randn_like(y)
        params = (x, *m.parameters())
        for got, want in zip(
            torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g), strict=True
        ):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mam_on_a_fused_qkv_decoder_with_partial_lora_splits_it_exactly(tmp_path):
    """InternLM2 (one ``qkv_proj``, Partial LoRA on it): MAM splits the projection into q/k/v
    (LoRA A shared, B cut by rows), so outputs are unchanged; only K/V get image copies; the
    converted model saves and loads as itself."""
    base = tiny(fused_qkv=True)
    enable_plora(base, PLoRAConfig(rank=4, alpha=8, targets=["qkv_proj", "o_proj"]))
    perturb([p for n, p in base.named_parameters() if "plora_B" in n])
    model = copy.deepcopy(base)
    enable_mam(model)
    ids, px = inputs(model)
    attn = model.llm.layers[0].self_attn
    assert not hasattr(attn, "qkv_proj") and not model.config.llm.fused_qkv
    assert attn.q_proj.plora_A is not None and attn.k_proj.multiway[1].plora_A is not None
    assert sorted(model.config.llm.plora.targets) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with torch.no_grad():
        want = base(ids, pixel_values=px).logits
        torch.testing.assert_close(model(ids, pixel_values=px).logits, want, atol=1e-5, rtol=0)
    perturb([p for n, p in model.named_parameters() if ".multiway.1." in n])
    text = ids.masked_fill(ids == model.config.image_token_id, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(text).logits, base(text).logits, atol=1e-5, rtol=0)
        assert (model(ids, pixel_values=px).logits - want).abs().max() > 1e-2
    model.save_pretrained(tmp_path / "m")
    back = MLLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(ids, pixel_values=px).logits, model(ids, pixel_values=px).logits)


def test_splitting_rows_keeps_an_adapter_wider_than_the_weight():
    """An fp32 LoRA / Partial LoRA on a bf16 fused projection stays fp32 in each row piece (its
    values were rounded to bf16), and the pieces compute what the whole did."""
    from modalign.models.modality import _rows

    torch.manual_seed(0)
    lin = ALinear(16, 24, bias=False, dtype=torch.bfloat16)
    lin.add_lora(4, 8)
    lin.add_plora(4, 8)
    for sub in (lin.lora_A, lin.lora_B, lin.plora_A, lin.plora_B):
        sub.float()
        torch.nn.init.normal_(sub.weight)
    x = torch.randn(3, 16).to(torch.bfloat16)
    img = torch.tensor([True, False, True])
    pieces = [_rows(lin, 0, 8), _rows(lin, 8, 24)]
    for piece, (lo, hi) in zip(pieces, [(0, 8), (8, 24)], strict=True):
        assert {piece.lora_B.weight.dtype, piece.plora_A.weight.dtype} == {torch.float32}
        assert torch.equal(piece.lora_B.weight, lin.lora_B.weight[lo:hi])
    with torch.no_grad():
        assert torch.equal(torch.cat([p(x, img) for p in pieces], -1), lin(x, img))


@pytest.mark.parametrize("part", ["mam", "plora", "mam+plora", "adapter"])
def test_kv_cache_decoding_equals_full_forward_with_images(part):
    model = tiny()
    if "mam" in part:
        enable_mam(model)
    if "plora" in part:
        enable_plora(model, PLoRAConfig(rank=4, alpha=8))
    if part == "adapter":
        enable_adapter(model, AdapterConfig(num_layers=1, prompt_len=3))
    perturb(
        [p for n, p in model.named_parameters() if "multiway.1" in n or "plora_B" in n or "adapter_gate" in n]
    )
    ids, px = inputs(model)
    ids, px = ids[:1], px[:1]
    steps = 6
    with torch.no_grad():
        cache = model.llm.new_cache(1, 64)
        logits = model(ids, pixel_values=px, cache=cache).logits
        cached = []
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            cached.append(nxt.item())
            logits = model(nxt, cache=cache).logits
        seq, full, full_logits = ids, [], None
        for _ in range(steps):
            full_logits = model(seq, pixel_values=px).logits
            nxt = full_logits[:, -1:].argmax(-1)
            full.append(nxt.item())
            seq = torch.cat([seq, nxt], 1)
    assert cached == full


# ------------------------------------------------------------------------- adapters, LoRA


def test_zero_init_adapter_is_identity_until_gate_moves():
    base = tiny()
    model = copy.deepcopy(base)
    assert enable_adapter(model, AdapterConfig(num_layers=1, prompt_len=4)) == 1
    assert model.llm.layers[0].self_attn.adapter_prompt is None
    ids, px = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=px).logits, base(ids, pixel_values=px).logits)
        model.llm.layers[1].self_attn.adapter_gate.fill_(0.5)
        assert (model(ids, pixel_values=px).logits - base(ids, pixel_values=px).logits).abs().max() > 1e-3


def test_lora_merge_unmerge():
    model = tiny()
    enable_lora(model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    perturb([p for n, p in model.named_parameters() if "lora_B" in n])
    ids, px = inputs(model)
    w0 = model.llm.layers[0].self_attn.q_proj.weight.clone()
    with torch.no_grad():
        a = model(ids, pixel_values=px).logits
        set_lora_merged(model, True)
        b = model(ids, pixel_values=px).logits
        set_lora_merged(model, False)
        c = model(ids, pixel_values=px).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # unmerging subtracts the same delta: equal up to float rounding of W + d - d
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.llm.layers[0].self_attn.q_proj.weight, w0, atol=1e-6, rtol=0)


def test_all_parts_survive_save_and_load(tmp_path):
    model = tiny()
    enable_mam(model)
    enable_plora(model, PLoRAConfig(rank=4, alpha=8, dropout=0.1))
    enable_lora(model, LoRAConfig(rank=2, alpha=2, targets=["o_proj"]))
    enable_adapter(model, AdapterConfig(num_layers=2, prompt_len=3))
    perturb([p for n, p in model.named_parameters() if "multiway.1" in n or "_B" in n or "gate" in n])
    model.save_pretrained(tmp_path / "m")
    again = MLLM.from_pretrained(tmp_path / "m")
    assert again.config == model.config and again.config.llm.plora.dropout == 0.1
    ids, px = inputs(model)
    with torch.no_grad():
        assert torch.equal(again(ids, pixel_values=px).logits, model(ids, pixel_values=px).logits)


# ------------------------------------------------------------------------- freezing


def test_gradients_reach_exactly_the_trainable_patterns():
    model = tiny()
    enable_mam(model)
    table = apply_trainable(model, ["connector.*", "llm.**.multiway.1.*"])
    rows = {r.group: r for r in table}
    assert rows["connector"].frozen == 0 and rows["vision"].trainable == 0
    assert rows["llm.layers (mam image)"].frozen == 0 and rows["llm.layers (mam text)"].trainable == 0
    assert rows["llm.layers"].trainable == 0
    model.train()
    ids, px = inputs(model)
    model(ids, pixel_values=px, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        trainable = n.startswith("connector.") or ".multiway.1." in n
        assert p.requires_grad == trainable, n
        assert (p.grad is not None) == trainable, n
    with pytest.raises(ValueError, match=r"match no parameter: llm\.\*\*\.plora_"):
        apply_trainable(model, ["llm.**.plora_*"])


def test_trainable_exclusions_freeze_what_they_match_in_any_order():
    model = tiny()
    for patterns in (
        ["connector", "llm.*", "!llm.layers.*.mlp.*"],
        ["!llm.layers.*.mlp.*", "llm.*", "connector"],
    ):
        apply_trainable(model, patterns)
        for n, p in model.named_parameters():
            want = n.startswith("connector.") or (n.startswith("llm.") and ".mlp." not in n)
            assert p.requires_grad == want, (patterns, n)
    assert any(".mlp." in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match=r"match no parameter: !llm\.\*\*\.plora_\*"):
        apply_trainable(model, ["llm.*", "!llm.**.plora_*"])


def test_param_groups_lr_and_no_decay():
    model = tiny()
    apply_trainable(model, ["connector", "llm"])
    groups = param_groups(model, lr=1e-4, weight_decay=0.1, lr_groups={"connector.*": 1e-3})
    by_name = {g["name"]: g for g in groups}
    assert by_name["connector.*"]["lr"] == 1e-3 and by_name["connector.*"]["weight_decay"] == 0.1
    assert "connector.linear_1.bias" in by_name["connector.* (no decay)"]["param_names"]
    nd = by_name["default (no decay)"]["param_names"]
    assert "llm.embed_tokens.weight" in nd and "llm.norm.weight" in nd
    assert "llm.layers.0.self_attn.q_proj.weight" in by_name["default"]["param_names"]
    total = sum(len(g["params"]) for g in groups)
    assert total == sum(1 for p in model.parameters() if p.requires_grad)
