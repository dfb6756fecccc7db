"""transformers-format checkpoints: configs written as diffs against their class's defaults (a
LLaVA release's text_config), the image processor's pad-to-square, what an export refuses, shard
indexes, and the tokenizer a converted folder keeps."""

import json

import pytest
import torch

from modalign import MLLM, MLLMConfig
from modalign.checkpoints import CheckpointError
from modalign.checkpoints.hf import image_settings, llava_config_from_hf, llava_config_to_hf

transformers = pytest.importorskip("transformers")

VISION = {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
          "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [  # llava-1.5-7b-hf's text_config as transformers wrote it (sizes equal to Llama's defaults left out)
        {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32064},
        {"model_type": "mistral", "vocab_size": 32064},
        {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 32, "num_attention_heads": 14,
         "num_key_value_heads": 2, "intermediate_size": 4864, "use_sliding_window": True},
    ],
    ids=["llama", "mistral", "qwen2"],
)  # fmt: skip
def test_a_text_config_written_as_a_diff_takes_the_defaults_transformers_fills_in(text):
    doc = {"model_type": "llava", "text_config": text, "vision_config": VISION, "image_token_index": 32000}
    ours = llava_config_from_hf(doc).llm
    ref = transformers.LlavaConfig(**doc).text_config
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_layers, ours.num_heads) == (
        ref.vocab_size,
        ref.hidden_size,
        ref.intermediate_size,
        ref.num_hidden_layers,
        ref.num_attention_heads,
    )
    assert ours.num_kv_heads == (ref.num_key_value_heads or ref.num_attention_heads)
    assert (
        ours.max_position_embeddings == ref.max_position_embeddings and ours.rms_norm_eps == ref.rms_norm_eps
    )
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    types = getattr(ref, "layer_types", None)  # which layers attend within the window
    if types is None and getattr(ref, "sliding_window", None):
        types = ["sliding_attention"] * ref.num_hidden_layers
    if types is not None and "sliding_attention" in types:  # Mistral's default window; Qwen2's from layer 28
        assert ours.sliding_window == ref.sliding_window
        assert ours.layer_types == ["sliding" if t == "sliding_attention" else "full" for t in types]
    else:
        assert ours.sliding_window is None and ours.layer_types is None


def test_pad_to_square_reads_back_as_pad(tmp_path):
    from modalign.config import VisionConfig

    for doc, mode in [({"pad_to_square": True, "do_center_crop": False}, "pad"),
                      ({"do_pad": True, "image_processor_type": "LlavaImageProcessor"}, "pad"),
                      ({"do_center_crop": False}, "squash"), ({"do_center_crop": True}, "crop")]:  # fmt: skip
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(doc))
        assert image_settings(tmp_path, VisionConfig()).resize_mode == mode, doc


def test_export_refuses_what_transformers_llava_cannot_hold():
    from modalign.config import LoRAConfig

    cfg = MLLMConfig.from_name("tiny-llava")
    llava_config_to_hf(cfg)  # a plain LLaVA exports
    with_lora = MLLMConfig.from_name("tiny-llava")
    with_lora.llm.lora = LoRAConfig(rank=4)
    with pytest.raises(CheckpointError, match="unmerged LoRA"):
        llava_config_to_hf(with_lora)


def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(tmp_path):
    from modalign.checkpoints.io import weight_files

    (tmp_path / "m").mkdir()
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "../elsewhere.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"shard '\.\./elsewhere\.safetensors' is not a file inside"):
        weight_files(tmp_path / "m")


def test_convert_into_a_used_folder_keeps_only_the_sources_tokenizer(tmp_path):
    from modalign.cli import main
    from modalign.data.tokenizer import Tokenizer

    torch.manual_seed(0)
    cfg = MLLMConfig.from_name("tiny-llava")
    cfg.llm.num_layers = cfg.vision.num_layers = 1
    MLLM(cfg).save_pretrained(tmp_path / "with-tok")
    Tokenizer.train_bpe(["red green blue"] * 20, vocab_size=270).save(tmp_path / "with-tok")
    MLLM(cfg).save_pretrained(tmp_path / "no-tok")
    assert main(["convert", str(tmp_path / "with-tok"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert main(["convert", str(tmp_path / "no-tok"), str(tmp_path / "out")]) == 0
    assert not list((tmp_path / "out").glob("tokenizer*"))  # not the earlier source's


def test_llava_v1_folders_without_a_projector_type_are_original_llava(tmp_path):
    """LLaVA v1 saved ``model_type: llava`` (or ``llama`` for a LoRA run) and ``mm_vision_tower``
    before ``mm_projector_type`` existed: read as the original format (its linear projector), not
    as a transformers LLaVA; a transformers LLaVA config (no ``mm_vision_tower``) stays one."""
    from modalign.checkpoints import formats

    for mt in ("llava", "llama"):
        doc = {"model_type": mt, "mm_vision_tower": "openai/clip-vit-large-patch14", "hidden_size": 64}
        assert formats.detect(doc, tmp_path).name == "llava-original", mt
    assert formats.detect({"model_type": "llava", "text_config": {}}, tmp_path).name != "llava-original"


def test_a_malformed_checkpoint_names_its_folder_and_format(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        json.dumps({"model_type": "llava", "text_config": {"model_type": "gpt2"}})
    )
    with pytest.raises(CheckpointError, match=r"m \(read as .*\): unsupported language model_type 'gpt2'"):
        MLLM.from_pretrained(tmp_path / "m")
