"""LLaVA / CLIP / SigLIP parity with transformers, KV-cache generation, and the HF round trip."""

import json

import pytest
import torch

from modalign import MLLM, PlaceholderMismatch
from modalign.checkpoints import CheckpointError, load_vision_tower
from modalign.cli import main as cli_main
from tests.helpers import (
    IMAGE_TOKEN,
    assert_close_where,
    clip_vision_config,
    llava_inputs,
    make_llava,
    randomize,
    save_as_bin,
    siglip_vision_config,
    tiny_llama_config,
    transformers,
)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("layer", [-1, -2, 1])
def test_vision_features_at_selected_layer(tmp_path, kind, layer):
    if kind == "clip":
        ref = transformers.CLIPVisionModel(clip_vision_config())
    else:
        ref = transformers.SiglipVisionModel(siglip_vision_config())
    randomize(ref).eval().save_pretrained(tmp_path / "v")
    select = "patch" if kind == "clip" else "full"
    tower = load_vision_tower(tmp_path / "v", feature_layer=layer, feature_select=select)
    px = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = ref(pixel_values=px, output_hidden_states=True).hidden_states[layer]
        want = hs[:, 1:] if kind == "clip" else hs
        torch.testing.assert_close(tower(px), want, atol=1e-4, rtol=1e-4)


def test_full_clip_checkpoint_reads_vision_part(tmp_path):
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
        vision_config=clip_vision_config().to_dict(),
        projection_dim=16,
    )
    ref = randomize(transformers.CLIPModel(cfg)).eval()
    ref.save_pretrained(tmp_path / "clip")
    tower = load_vision_tower(tmp_path / "clip", feature_layer=-1, feature_select="full")
    px = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        want = ref.vision_model(pixel_values=px, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(tower(px), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "layer,strategy,vision", [(-2, "default", "clip"), (-1, "default", "clip"), (-2, "full", "clip"),
                              (-1, "full", "clip"), ([-3, -1], "default", "clip"), (-2, "full", "siglip"),
                              (-2, "default", "siglip")]  # transformers drops the first token for "default"
)  # fmt: skip
def test_llava_logits_parity_left_padded_batch(tmp_path, layer, strategy, vision):
    ref, path = make_llava(tmp_path, feature_layer=layer, strategy=strategy, vision=vision)
    ours = MLLM.from_pretrained(path)
    n_tok = ours.num_image_tokens()
    assert n_tok == 16 + (strategy == "full" and vision == "clip") - (
        strategy == "default" and vision == "siglip"
    )
    ids, mask = llava_inputs(n_tok, lengths=(9, 4, 6), images_per_row=(1, 2, 0))
    px = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        out = ours(ids, pixel_values=px, attention_mask=mask)
    assert_close_where(out.logits, want, mask)
    assert out.modality_ids.sum().item() == 3 * n_tok
    assert (out.modality_ids.bool() == (ids == IMAGE_TOKEN)).all()


def test_llava_loss_matches_reference(tmp_path):
    ref, path = make_llava(tmp_path)
    ours = MLLM.from_pretrained(path)
    ids, mask = llava_inputs(ours.num_image_tokens(), lengths=(9, 9), pad_left=False)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    labels[:, :3] = -100
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=px, attention_mask=mask, labels=labels).loss
        got = ours(ids, pixel_values=px, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_placeholder_mismatch_names_both_counts(tmp_path):
    _, path = make_llava(tmp_path)
    ours = MLLM.from_pretrained(path)
    ids, _ = llava_inputs(ours.num_image_tokens() - 1, lengths=(5,), images_per_row=(1,))
    with pytest.raises(PlaceholderMismatch, match=r"15 image placeholder tokens but 1 image\(s\) x 16"):
        ours(ids, pixel_values=torch.randn(1, 3, 28, 28))
    ids, _ = llava_inputs(16, lengths=(5,), images_per_row=(1,))
    with pytest.raises(PlaceholderMismatch, match="no images were given"):
        ours(ids)


def test_llava_greedy_cache_equals_full_forward_and_hf_generate(tmp_path):
    ref, path = make_llava(tmp_path)
    ours = MLLM.from_pretrained(path)
    ids, mask = llava_inputs(ours.num_image_tokens(), lengths=(6,))
    px = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    steps = 8
    with torch.no_grad():
        cache = ours.llm.new_cache(1, ids.shape[1] + steps)
        logits = ours(ids, pixel_values=px, cache=cache).logits
        cached = []
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            cached.append(nxt.item())
            logits = ours(nxt, cache=cache).logits
        seq, full = ids, []
        for _ in range(steps):
            nxt = ours(seq, pixel_values=px).logits[:, -1].argmax(-1, keepdim=True)
            full.append(nxt.item())
            seq = torch.cat([seq, nxt], 1)
        hf = ref.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=steps,
                          min_new_tokens=steps, do_sample=False)  # fmt: skip
    assert cached == full == hf[0, ids.shape[1] :].tolist()


def test_round_trip_hf_to_native_to_hf(tmp_path):
    ref, path = make_llava(tmp_path, feature_layer=-1, strategy="full")
    ours = MLLM.from_pretrained(path)
    ours.save_pretrained(tmp_path / "native")
    assert cli_main(["convert", str(tmp_path / "native"), str(tmp_path / "back"), "--to", "hf-llava"]) == 0
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    native = MLLM.from_pretrained(tmp_path / "native")
    ids, mask = llava_inputs(ours.num_image_tokens(), lengths=(7, 3))
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        got_back = back(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        got_native = native(ids, pixel_values=px, attention_mask=mask).logits
        got = ours(ids, pixel_values=px, attention_mask=mask).logits
    assert torch.equal(got_native, got)
    assert_close_where(got_back, want, mask, atol=1e-5)


def test_current_transformers_layout_is_read(tmp_path):
    """The layout transformers >= 4.52 writes: model.vision_tower / model.language_model / lm_head."""
    ref, path = make_llava(tmp_path)
    from safetensors.torch import save_file

    from modalign.checkpoints.io import read_tensors

    tensors = read_tensors(path)
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("language_model.lm_head"):
            renamed["lm_head.weight"] = v
        elif k.startswith("language_model.model."):
            renamed["model.language_model." + k[len("language_model.model.") :]] = v
        elif k.startswith("vision_tower."):
            rest = k[len("vision_tower.") :]
            rest = rest if rest.startswith("vision_model.") else "vision_model." + rest
            renamed["model.vision_tower." + rest] = v
        else:
            renamed["model." + k] = v
    new = tmp_path / "new_layout"
    new.mkdir()
    save_file(renamed, str(new / "model.safetensors"))
    (new / "config.json").write_text((path / "config.json").read_text())
    a, b = MLLM.from_pretrained(path), MLLM.from_pretrained(new)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_sharded_checkpoint_and_bad_tensors(tmp_path):
    ref, path = make_llava(tmp_path)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, b = MLLM.from_pretrained(path), MLLM.from_pretrained(tmp_path / "sharded")
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )

    from safetensors.torch import save_file

    from modalign.checkpoints.io import read_tensors

    tensors = read_tensors(path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    t = dict(tensors)
    t["multi_modal_projector.linear_1.weight"] = torch.zeros(3, 3)
    del t["language_model.model.norm.weight"]
    t["language_model.model.extra.weight"] = torch.zeros(1)
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        MLLM.from_pretrained(bad)
    msg = str(e.value)
    assert "llm.norm.weight" in msg and "llm.extra.weight" in msg
    assert "connector.linear_1.weight: checkpoint (3, 3) vs model (64, 32)" in msg


def test_unsupported_model_type_and_pickle_only(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'; supported: .*llava"):
        MLLM.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    with pytest.raises(CheckpointError, match="lacks required field.*hidden_size"):
        MLLM.from_pretrained(d)
    cfg = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8}
    (d / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 1, "num_attention_heads": 2}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: unreadable PyTorch file"):
        MLLM.from_pretrained(d)


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_bin_weights_load_with_weights_only_and_never_run_pickle(tmp_path, monkeypatch):
    """``.bin`` checkpoints (single and sharded) load through ``torch.load(weights_only=True)``,
    equal to safetensors; a pickle that would run code is refused and runs nothing."""
    ref = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_llama_config()))).eval()
    ref.save_pretrained(tmp_path / "st")
    save_as_bin(tmp_path / "st", tmp_path / "bin")
    save_as_bin(tmp_path / "st", tmp_path / "shards", shards=3)
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    assert (tmp_path / "shards" / "pytorch_model.bin.index.json").is_file()
    ids = torch.tensor([[1, 5, 9, 33, 4]])
    want = MLLM.from_pretrained(tmp_path / "st")(ids).logits
    for d in ("bin", "shards"):
        assert torch.equal(MLLM.from_pretrained(tmp_path / d)(ids).logits, want), d
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": _Boom()}, evil / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="refused: it holds more than tensors"):
        MLLM.from_pretrained(evil)
    assert not (tmp_path / "pwned").exists()
    # and once converted, it is safetensors
    from modalign.cli import main

    assert main(["convert", str(tmp_path / "bin"), str(tmp_path / "native")]) == 0
    assert (tmp_path / "native" / "model.safetensors").is_file()
    assert torch.equal(MLLM.from_pretrained(tmp_path / "native")(ids).logits, want)


def test_position_table_resize_matches_clip_interpolation(tmp_path):
    """The IXC2-VL loader resizes CLIP-336's table to the 490-px grid; the same bicubic
    resize is what transformers' CLIP does with interpolate_pos_encoding."""
    from modalign.checkpoints.internlm2 import resize_position_table
    from modalign.config import VisionConfig
    from modalign.models.vision import VisionTower

    ref = randomize(transformers.CLIPVisionModel(clip_vision_config())).eval()  # 28 px, grid 4
    px = torch.randn(1, 3, 42, 42)  # grid 6
    sd = {k.removeprefix("vision_model."): v for k, v in ref.state_dict().items() if "position_ids" not in k}
    sd["embeddings.position_embedding.weight"] = resize_position_table(
        sd["embeddings.position_embedding.weight"], 6
    )
    tower = VisionTower(VisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, image_size=42,
                                     patch_size=7, feature_layer=-1, feature_select="full"))  # fmt: skip
    tower.load_state_dict(sd)
    with torch.no_grad():
        want = ref(pixel_values=px, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[
            -1
        ]
        torch.testing.assert_close(tower.eval()(px), want, atol=1e-4, rtol=1e-4)
