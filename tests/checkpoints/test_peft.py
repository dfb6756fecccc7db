"""LoRA adapters in PEFT's format, checked against peft on the equivalent transformers model."""

import pytest
import torch

from modalign import MLLM
from modalign.checkpoints.io import CheckpointError
from modalign.checkpoints.peft import export_peft, import_peft
from modalign.config import LoRAConfig
from modalign.models.modality import enable_lora
from tests.helpers import assert_close_where, llava_inputs, make_llava, transformers

peft = pytest.importorskip("peft")


def _trained_lora(path):
    model = MLLM.from_pretrained(path)
    enable_lora(model, LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


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
