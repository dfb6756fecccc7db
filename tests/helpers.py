"""Tiny random transformers checkpoints for parity tests (saved with ``save_pretrained``)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN = 120


def tiny_llama_config(**kw):
    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    base.update(kw)
    return base


def clip_vision_config(**kw):
    base = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        projection_dim=16,
    )
    base.update(kw)
    return transformers.CLIPVisionConfig(**base)


def siglip_vision_config(**kw):
    base = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
    )
    base.update(kw)
    return transformers.SiglipVisionConfig(**base)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with non-trivial random values (norms not all ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def make_llava(tmp_path, *, feature_layer=-2, strategy="default", vision="clip", text_kw=None, seed=0):
    tc = transformers.LlamaConfig(**tiny_llama_config(**(text_kw or {})))
    vc = clip_vision_config() if vision == "clip" else siglip_vision_config()
    cfg = transformers.LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    ref = randomize(transformers.LlavaForConditionalGeneration(cfg), seed).eval()
    path = tmp_path / "llava"
    ref.save_pretrained(path)
    return ref, path


def llava_inputs(n_img_tokens: int, lengths=(9, 6), seed=0, images_per_row=None, pad_left=True):
    """Left-padded batch: each row is text, one block of image placeholders per image, text."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    images_per_row = images_per_row or (1,) * len(lengths)
    for n_text, n_img in zip(lengths, images_per_row, strict=True):
        ids = [1] + torch.randint(3, 110, (n_text,), generator=g).tolist()
        for _ in range(n_img):
            cut = 2
            ids = ids[:cut] + [IMAGE_TOKEN] * n_img_tokens + ids[cut:]
        rows.append(ids)
    t = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        if pad_left:
            input_ids[i, t - len(r) :] = torch.tensor(r)
            mask[i, t - len(r) :] = 1
        else:
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
    return input_ids, mask


def assert_close_where(ours, ref, mask, atol=1e-4):
    """Compare logits only at real (unpadded) positions."""
    m = mask.bool()
    diff = (ours[m] - ref[m]).abs().max().item()
    assert diff <= atol, f"max |Δ| = {diff:.2e} > {atol}"
    return diff


def save_as_bin(src, dst, shards: int = 1) -> None:
    """A transformers checkpoint directory rewritten the way transformers 4.x saved ``.bin``
    weights: ``pytorch_model.bin``, or ``pytorch_model-0000k-of-0000n.bin`` shards with
    ``pytorch_model.bin.index.json`` (transformers 5 writes safetensors only)."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and not f.name.endswith(".safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return
    keys = sorted(state)
    weight_map = {}
    for k in range(shards):
        name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {key: state[key] for key in keys[k::shards]}
        torch.save(part, dst / name)
        weight_map |= dict.fromkeys(part, name)
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
