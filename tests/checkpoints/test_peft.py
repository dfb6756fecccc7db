"""LoRA adapters in PEFT's format, checked against peft on the equivalent transformers model."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modalign import MLLM
from modalign.checkpoints.io import CheckpointError
from modalign.checkpoints.peft import export_peft, import_peft, merge_lora
from modalign.cli import main
from modalign.config import LoRAConfig
from modalign.models.modality import enable_lora
from tests.helpers import (
    assert_close_where,
    llava_inputs,
    make_llava,
    randomize,
    tiny_llama_config,
    transformers,
)

peft = pytest.importorskip("peft")


def _trained_lora(path):
    model = MLLM.from_pretrained(path)
    enable_lora(model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    return _random_b(model)


def test_peft_export_matches_peft_on_transformers(tmp_path):
    _, path = make_llava(tmp_path)
    model = _trained_lora(path)
    export_peft(model, tmp_path / "adapter")
    base = transformers.LlavaForConditionalGeneration.from_pretrained(path)
    ref = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids, mask = llava_inputs(model.num_image_tokens(), lengths=(7, 4))
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        got = model(ids, pixel_values=px, attention_mask=mask).logits
        plain = MLLM.from_pretrained(path)(ids, pixel_values=px, attention_mask=mask).logits
    assert_close_where(got, want, mask)
    assert (got - plain).abs().max() > 1e-2  # the adapter is not a no-op
    # only language-model projections were adapted (the vision tower has q_proj/v_proj too)
    n_lora = sum(1 for n, _ in ref.named_modules() if n.endswith(".lora_A"))
    assert n_lora == 2 * 4


def test_peft_import_round_trip_and_errors(tmp_path):
    _, path = make_llava(tmp_path)
    model = _trained_lora(path)
    export_peft(model, tmp_path / "adapter")
    fresh = MLLM.from_pretrained(path)
    assert import_peft(fresh, tmp_path / "adapter") == 8
    ids, mask = llava_inputs(model.num_image_tokens(), lengths=(5,))
    px = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(fresh(ids, pixel_values=px).logits, model(ids, pixel_values=px).logits)
    with pytest.raises(CheckpointError, match="no LoRA adapter"):
        export_peft(MLLM.from_pretrained(path), tmp_path / "none")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        import_peft(MLLM.from_pretrained(path), tmp_path)


# ------------------------------------------------------------------ causal LMs, LLaVA layouts, InternLM2

TOL = dict(atol=1e-5, rtol=0)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(tmp_path):
    ref = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_llama_config())), 1).eval()
    ref.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def _text_ids():
    g = torch.Generator().manual_seed(5)
    return torch.randint(3, 110, (2, 9), generator=g)


def _random_b(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _lora_tensors(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def _assert_same_lora(a, b):
    ta, tb = _lora_tensors(a), _lora_tensors(b)
    assert ta.keys() == tb.keys() and ta
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    la, lb = a.config.llm.lora, b.config.llm.lora
    assert (la.rank, la.alpha, la.dropout, sorted(la.targets)) == (
        lb.rank,
        lb.alpha,
        lb.dropout,
        sorted(lb.targets),
    )


def _peft_adapter(base, out, seed=4, **kw):
    """An adapter made by peft itself (B random, so that it is no no-op)."""
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=12, **kw))
    _random_b(pm, seed)
    pm.save_pretrained(out)
    return pm.eval()


def test_causal_lm_export_loads_in_peft_and_round_trips(tmp_path):
    path = _llama(tmp_path)
    model = _random_b(MLLM.from_pretrained(path))
    enable_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL))
    _random_b(model)
    export_peft(model, tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    ref = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(path), tmp_path / "adapter"
    )
    ids = _text_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref.eval()(input_ids=ids).logits, **TOL)
    fresh = MLLM.from_pretrained(path)
    assert import_peft(fresh, tmp_path / "adapter") == 2 * len(ALL)
    _assert_same_lora(fresh, model)


def test_peft_made_causal_lm_adapter_imports(tmp_path):
    path = _llama(tmp_path)
    base = transformers.LlamaForCausalLM.from_pretrained(path)
    ref = _peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                        task_type="CAUSAL_LM")  # fmt: skip
    model = MLLM.from_pretrained(path)
    assert import_peft(model, tmp_path / "adapter") == 8
    assert model.config.llm.lora == LoRAConfig(
        rank=4, alpha=12.0, targets=["k_proj", "o_proj", "q_proj", "up_proj"]
    )
    ids = _text_ids()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        torch.testing.assert_close(model(ids).logits, want, **TOL)
        assert (want - MLLM.from_pretrained(path)(ids).logits).abs().max() > 1e-2


def test_peft_made_llava_adapter_in_both_transformers_layouts(tmp_path):
    _, path = make_llava(tmp_path)
    base = transformers.LlavaForConditionalGeneration.from_pretrained(path)
    ref = _peft_adapter(
        base, tmp_path / "v5", target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)"
    )
    ids, mask = llava_inputs(MLLM.from_pretrained(path).num_image_tokens(), lengths=(7, 4))
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    # transformers 4.x wrote the same adapter under language_model.model.*
    tensors = load_file(str(tmp_path / "v5" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in tensors)
    (tmp_path / "v4").mkdir()
    shutil.copy(tmp_path / "v5" / "adapter_config.json", tmp_path / "v4")
    v4 = {
        k.replace("model.model.language_model.", "model.language_model.model."): v for k, v in tensors.items()
    }
    save_file(v4, str(tmp_path / "v4" / "adapter_model.safetensors"))
    for layout in ("v5", "v4"):
        model = MLLM.from_pretrained(path)
        assert import_peft(model, tmp_path / layout) == 6
        with torch.no_grad():
            assert_close_where(model(ids, pixel_values=px, attention_mask=mask).logits, want, mask, atol=1e-5)
    # PEFT's plain name list also adapts the vision tower's q_proj / v_proj: named, refused
    base = transformers.LlavaForConditionalGeneration.from_pretrained(path)
    _peft_adapter(base, tmp_path / "both", target_modules=["q_proj", "v_proj"])
    with pytest.raises(CheckpointError, match=r"both/adapter_model.safetensors: tensor 'base_model.model.model"
                       r".vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight' adapts .*outside"):  # fmt: skip
        import_peft(MLLM.from_pretrained(path), tmp_path / "both")
    # a LLaVA adapter on a text-only model
    with pytest.raises(CheckpointError, match="LLaVA adapter .* no vision tower"):
        import_peft(MLLM.from_pretrained(_llama(tmp_path)), tmp_path / "v5")


def _edit_config(d, **kw):
    f = d / "adapter_config.json"
    f.write_text(json.dumps(json.loads(f.read_text()) | kw))


def test_unsupported_adapters_are_named(tmp_path):
    path = _llama(tmp_path)
    base = transformers.LlamaForCausalLM.from_pretrained(path)
    _peft_adapter(base, tmp_path / "save", target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(CheckpointError, match=r"save/adapter_config.json: modules_to_save \['lm_head'\]"):
        import_peft(MLLM.from_pretrained(path), tmp_path / "save")
    base = transformers.LlamaForCausalLM.from_pretrained(path)
    _peft_adapter(base, tmp_path / "head", target_modules=["q_proj", "lm_head"])
    with pytest.raises(CheckpointError, match=r"head/adapter_model.safetensors: tensor 'base_model.model.lm_head"
                       r".lora_A.weight' adapts 'lm_head', outside the language model's decoder layers"):  # fmt: skip
        import_peft(MLLM.from_pretrained(path), tmp_path / "head")
    model = MLLM.from_pretrained(path)
    enable_lora(model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    export_peft(model, tmp_path / "a")
    _edit_config(tmp_path / "a", target_modules=["q_proj"])
    with pytest.raises(CheckpointError, match=r"a/adapter_model.safetensors: tensor '.*v_proj.lora_A.weight' is "
                       r"not among adapter_config.json's target_modules \['q_proj'\]"):  # fmt: skip
        import_peft(MLLM.from_pretrained(path), tmp_path / "a")
    _edit_config(tmp_path / "a", target_modules=["q_proj", "v_proj", "k_proj"])
    with pytest.raises(CheckpointError, match=r"missing \['layers.0.self_attn.k_proj.lora_A.weight'"):
        import_peft(MLLM.from_pretrained(path), tmp_path / "a")
    _edit_config(tmp_path / "a", target_modules=["q_proj", "v_proj"], r=8)
    with pytest.raises(CheckpointError, match=r"layers.0.self_attn.q_proj.lora_A.weight: adapter \(4, 64\) vs "
                       r"model \(8, 64\) \(r = 8\)"):  # fmt: skip
        import_peft(MLLM.from_pretrained(path), tmp_path / "a")
    _edit_config(tmp_path / "a", r=4, use_dora=True)
    with pytest.raises(CheckpointError, match="a/adapter_config.json: use_dora: True is not supported"):
        import_peft(MLLM.from_pretrained(path), tmp_path / "a")
    _edit_config(tmp_path / "a", use_dora=False)
    with pytest.raises(CheckpointError, match="already has a LoRA adapter"):
        import_peft(model, tmp_path / "a")
    assert import_peft(MLLM.from_pretrained(path), tmp_path / "a") == 4


def _internlm2(tmp_path):
    """A text-only InternLM2 release checkpoint (official names, Partial LoRA included)."""
    src = Path(__file__).resolve().parents[1] / "golden" / "internlm2_plora"
    d = tmp_path / "internlm2"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    keep = {k: v for k, v in load_file(str(src / "model.safetensors")).items()
            if k.startswith("model.") or k == "output.weight"}  # fmt: skip
    save_file(keep, str(d / "model.safetensors"))
    return d, keep


def test_internlm2_adapter_in_official_names(tmp_path):
    path, official = _internlm2(tmp_path)
    model = MLLM.from_pretrained(path)
    targets = ["qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    enable_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets))
    _random_b(model)
    export_peft(model, tmp_path / "adapter")
    doc = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert doc["target_modules"] == [
        "attention.wo", "attention.wqkv", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"
    ]  # fmt: skip
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(
        f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight"
        for i in range(2) for m in doc["target_modules"] for ab in "AB"
    )  # fmt: skip
    fresh = MLLM.from_pretrained(path)
    assert import_peft(fresh, tmp_path / "adapter") == 10
    _assert_same_lora(fresh, model)
    # the official-layout adapter merged into the official weights (W + alpha/r * B A, wqkv's rows
    # grouped per KV head as in the release) gives the same model
    merged = dict(official)
    for k in tensors:
        if k.endswith("lora_A.weight"):
            w = k.removeprefix("base_model.model.").removesuffix("lora_A.weight") + "weight"
            merged[w] = merged[w] + 2.0 * tensors[k.replace("lora_A", "lora_B")] @ tensors[k]
    save_file(merged, str(path / "model.safetensors"))
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(MLLM.from_pretrained(path)(ids).logits, model(ids).logits, **TOL)
    # modalign's earlier exports named the fused linear self_attn.qkv_proj ([q; k; v] rows)
    (tmp_path / "old").mkdir()
    old = {k.replace(".attention.wqkv.", ".self_attn.qkv_proj."): v for k, v in tensors.items()}
    for k in old:
        if ".qkv_proj.lora_B" in k:
            old[k] = model.state_dict()["llm." + k.removeprefix("base_model.model.model.")]
    save_file(old, str(tmp_path / "old" / "adapter_model.safetensors"))
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(doc | {"target_modules": ".*"}))
    save_file(official, str(path / "model.safetensors"))
    again = MLLM.from_pretrained(path)
    import_peft(again, tmp_path / "old")
    _assert_same_lora(again, model)
    with pytest.raises(CheckpointError, match="in InternLM2's layout; the model is a 'llama' decoder"):
        import_peft(MLLM.from_pretrained(_llama(tmp_path)), tmp_path / "adapter")


def test_convert_to_and_from_peft(tmp_path):
    path = _llama(tmp_path)
    model = MLLM.from_pretrained(path)
    enable_lora(model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "down_proj"]))
    _random_b(model)
    model.save_pretrained(tmp_path / "lora")
    assert main(["convert", str(tmp_path / "lora"), str(tmp_path / "adapter"), "--to", "peft"]) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]  # fmt: skip
    assert main(["convert", str(tmp_path / "adapter"), str(tmp_path / "back"), "--from", "peft",
                 "--base", str(path)]) == 0  # fmt: skip
    back = MLLM.from_pretrained(tmp_path / "back")
    _assert_same_lora(back, model)
    assert main(["convert", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--from", "peft",
                 "--base", str(path), "--merge"]) == 0  # fmt: skip
    merged = MLLM.from_pretrained(tmp_path / "merged")
    assert merged.config.llm.lora is None and not _lora_tensors(merged)
    ids = _text_ids()
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(back(ids).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(merged(ids).logits, want, **TOL)
    with pytest.raises(SystemExit, match="needs --base"):
        main(["convert", str(tmp_path / "adapter"), str(tmp_path / "x"), "--from", "peft"])
    assert main(["convert", str(path), str(tmp_path / "x"), "--to", "peft"]) == 2  # no LoRA: named error


def test_an_adapter_beside_parts_peft_cannot_hold_is_refused(tmp_path):
    """LoRA trained with Partial LoRA or LLaMA-Adapter's bias tuning: the PEFT adapter would load
    without them (another model, 0.07 apart in logits) and was written anyway."""
    from modalign import MLLMConfig
    from modalign.config import AdapterConfig, LoRAConfig, PLoRAConfig
    from modalign.models.modality import enable_adapter, enable_lora, enable_plora

    for extra in (lambda m: enable_plora(m, PLoRAConfig(rank=2, alpha=2, targets=["q_proj"])),
                  lambda m: enable_adapter(m, AdapterConfig(bias_tuning=True))):  # fmt: skip
        model = MLLM(MLLMConfig.from_name("tiny-shapes"))
        enable_lora(model, LoRAConfig(rank=2, alpha=4, targets=["q_proj"]))
        extra(model)
        with pytest.raises(CheckpointError, match="which a PEFT LoRA adapter cannot hold"):
            export_peft(model, tmp_path / "adapter")
        assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------------ an fp32 adapter on a bf16 base


def _fp32_adapter_on_bf16(tmp_path):
    """A peft-made fp32 adapter (A as peft initialises it, B random: values bf16 cannot hold),
    imported onto the bf16 model, and peft's own bf16 model with it (peft keeps the adapter in
    fp32: ``autocast_adapter_dtype``)."""
    path = _llama(tmp_path)
    _peft_adapter(transformers.LlamaForCausalLM.from_pretrained(path), tmp_path / "adapter",
                  target_modules=ALL, task_type="CAUSAL_LM")  # fmt: skip
    model = MLLM.from_pretrained(path, dtype=torch.bfloat16)
    assert import_peft(model, tmp_path / "adapter") == 2 * len(ALL)
    base = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ref = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    return path, model, ref


def test_fp32_adapter_on_bf16_base_keeps_its_values_and_matches_peft(tmp_path):
    path, model, ref = _fp32_adapter_on_bf16(tmp_path)
    file = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in file.values()} == {torch.float32}
    ours = _lora_tensors(model)
    assert len(ours) == len(file)
    for k, t in file.items():  # bit for bit: not rounded to the base's bf16
        got = ours["llm." + k.removeprefix("base_model.model.model.")]
        assert got.dtype == torch.float32 and torch.equal(got, t), k
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if ".lora_" not in n)
    assert {p.dtype for n, p in ref.named_parameters() if ".lora_" in n} == {torch.float32}
    ids = _text_ids()
    with torch.no_grad():
        got, want = model(ids).logits, ref(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    # the bf16 base computes as transformers' does and the LoRA as peft's Linear.forward (input cast
    # to fp32, B A x in fp32, the sum rounded once to bf16): the same logits. With the adapter
    # rounded to bf16 they were a bf16 step (0.06) apart.
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # greedy generation through the unmerged adapter: peft's tokens
    from modalign.infer.engine import Engine, Prompt, SamplingParams

    prompt = ids[:1]
    with torch.no_grad():
        tokens = ref.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    out = Engine(model).generate([Prompt(prompt[0].tolist())], SamplingParams(max_new_tokens=8))
    assert out[0].token_ids == tokens[0, prompt.shape[1] :].tolist()
    # merged (W + alpha/r B A computed in fp32, rounded once into the bf16 weight): peft's merge
    merge_lora(model)
    merged = ref.merge_and_unload()
    assert not _lora_tensors(model) and all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged(input_ids=ids).logits, atol=0, rtol=0)


def test_fp32_adapter_on_bf16_base_exports_unchanged_and_trains(tmp_path):
    path, model, ref = _fp32_adapter_on_bf16(tmp_path)
    export_peft(model, tmp_path / "again")
    want = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for k, t in want.items():  # written as read: fp32, bit for bit
        assert got[k].dtype == torch.float32 and torch.equal(got[k], t), k
    fresh = MLLM.from_pretrained(path, dtype=torch.bfloat16)
    import_peft(fresh, tmp_path / "again")
    _assert_same_lora(fresh, model)
    # a native save and load keeps the fp32 adapter on the bf16 model (it was rounded to bf16)
    model.save_pretrained(tmp_path / "native")
    back = MLLM.from_pretrained(tmp_path / "native")
    for k, t in _lora_tensors(model).items():
        got = _lora_tensors(back)[k]
        assert got.dtype == torch.float32 and torch.equal(got, t), k
    assert all(p.dtype == torch.bfloat16 for n, p in back.named_parameters() if ".lora_" not in n)
    with torch.no_grad():
        torch.testing.assert_close(back(_text_ids()).logits, model(_text_ids()).logits, atol=0, rtol=0)
    # so does a load that asks for bf16 (chat, serve and eval on a GPU ask for it)
    asked = MLLM.from_pretrained(tmp_path / "native", dtype=torch.bfloat16)
    assert {t.dtype for t in _lora_tensors(asked).values()} == {torch.float32}
    # a training step on the bf16 model (no autocast): fp32 gradients for the fp32 adapter, equal to
    # peft's on its bf16 model (the same operations)
    ids = _text_ids()
    grads = {}
    for name, m in (("ours", model), ("peft", ref)):
        m.train()
        for n, p in m.named_parameters():
            p.requires_grad_(".lora_" in n)
        logits = m(ids).logits if name == "ours" else m(input_ids=ids).logits
        logits.float().logsumexp(-1).mean().backward()
        grads[name] = {n.removeprefix("llm.").removeprefix("base_model.model.model.").replace(".default", ""): p.grad
                       for n, p in m.named_parameters() if p.requires_grad}  # fmt: skip
    assert grads["ours"].keys() == grads["peft"].keys() and len(grads["ours"]) == 4 * len(ALL)
    for k, g in grads["ours"].items():
        assert g.dtype == torch.float32, k
        torch.testing.assert_close(g, grads["peft"][k], atol=1e-6, rtol=1e-4)
    lora = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in lora]
    torch.optim.AdamW(lora, lr=1e-3).step()
    assert all(p.dtype == torch.float32 and not torch.equal(p, q) for p, q in zip(lora, before, strict=True))
    # under autocast (the bf16 training precisions) the adapter runs in bf16 as before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
