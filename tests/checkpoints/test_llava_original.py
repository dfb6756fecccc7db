"""The original LLaVA releases (tests/golden/llava_original, made with haotian-liu/LLaVA's own code):
a full checkpoint as safetensors and as .bin, a Mistral one keeping the class token, a pretraining
run's projector over a base, and a LoRA run over a base, each reproduced through the public API
(logits within 1e-4, greedy ids equal) and through ``modalign generate`` from the PNG and the
question text; the SentencePiece tokenizer gives the ids of transformers' slow LlamaTokenizer."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modalign import MLLM
from modalign.checkpoints import CheckpointError
from modalign.cli import main
from modalign.data.tokenizer import Tokenizer
from modalign.infer.chat import ChatModel, user_message

G = Path(__file__).resolve().parents[1] / "golden" / "llava_original"
BASE = G / "vicuna-tiny-base"
QUESTION = "What is shown in this image?"
RUNS = {  # name: (golden folder, checkpoint, base)
    "llava_llama": ("llava_llama", "llava-v1.5-tiny-llama", None),
    "llava_llama_bin": ("llava_llama", "llava-v1.5-tiny-llama-bin", None),
    "llava_mistral": ("llava_mistral", "llava-v1.6-tiny-mistral", None),
    "pretrain_plus_base": ("llava_llama", "../llava_llama_pretrain/llava-v1.5-tiny-llama-pretrain", BASE),
    "lora_plus_base": ("llava_llama_lora", "llava-v1.5-tiny-llama-lora", BASE),
}


def golden(case_dir: str):
    return load_file(str(G / case_dir / "inputs.safetensors")), load_file(
        str(G / case_dir / "outputs.safetensors")
    )


@pytest.mark.parametrize("name", sorted(RUNS))
def test_logits_and_greedy_ids_match_the_official_code(name, monkeypatch):
    monkeypatch.chdir(G)  # the configs name their vision tower relative to this folder
    sub, ckpt, base = RUNS[name]
    inp, out = golden(sub)
    model = MLLM.from_pretrained(G / sub / ckpt, base=base)
    with torch.no_grad():
        for case in ("one_image", "two_images", "text_only"):
            got = model(inp[f"{case}.input_ids"], pixel_values=inp.get(f"{case}.pixel_values")).logits
            torch.testing.assert_close(got, out[f"{case}.logits"], atol=1e-4, rtol=1e-4, msg=case)
        # a left-padded batch: the reference merges and re-pads on the right (or left); compare real tokens
        res = model(
            inp["batch2.input_ids"],
            pixel_values=inp["batch2.pixel_values"],
            attention_mask=inp["batch2.attention_mask"],
        )
        for case in ("batch2", "batch2_cfgleft"):
            ref, ref_mask = out[f"{case}.logits"], out[f"{case}.merged_attention_mask"].bool()
            for r in range(2):
                ours = res.logits[r][res.attention_mask[r].bool()]
                torch.testing.assert_close(
                    ours, ref[r][ref_mask[r]], atol=1e-4, rtol=1e-4, msg=f"{case} row {r}"
                )
    cm = ChatModel.load(G / sub / ckpt, "llava_v1", base=base, device="cpu", dtype="float32")
    r = cm.reply([user_message(QUESTION, 1)], [G / "images" / "img_70x40.png"], cm.params(max_new_tokens=8))
    assert r.token_ids == out["one_image.generate_new_ids"][0].tolist()


@pytest.mark.parametrize("name", ["llava_llama", "llava_mistral"])
def test_prompt_ids_and_pixels_are_the_official_ones(name, monkeypatch):
    """llava_v1's prompt through the checkpoint's SentencePiece tokenizer gives tokenizer_image_token's
    ids; the PNG through the release's preprocessing (pad to a square with the mean colour, CLIP's
    resize and crop) gives the official pixel values exactly."""
    monkeypatch.chdir(G)
    sub, ckpt, _ = RUNS[name]
    inp, _ = golden(sub)
    cm = ChatModel.load(G / sub / ckpt, "llava_v1")
    assert cm.prompt_ids([user_message(QUESTION, 1)]) == inp["one_image.input_ids"][0].tolist()
    two = "<image>\n<image>\nWhat is different between these two images?"
    assert cm.prompt_ids([user_message(two, 2)]) == inp["two_images.input_ids"][0].tolist()
    text = "Describe a red circle on a blue square."
    assert cm.prompt_ids([user_message(text, 0)]) == inp["text_only.input_ids"][0].tolist()
    meta = json.loads((G / sub / "meta.json").read_text())["cases"]
    for case, k in (("one_image", 0), ("two_images", 0), ("two_images", 1)):
        png = G / meta[case]["image_paths"][k]
        assert torch.equal(cm.images(png), inp[f"{case}.pixel_values"][k]), (case, k)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_modalign_generate_reproduces_the_official_greedy_output(name, monkeypatch, capsys):
    monkeypatch.chdir(G)
    sub, ckpt, base = RUNS[name]
    _, out = golden(sub)
    args = ["generate", "--model", str(G / sub / ckpt), "--image", "images/img_70x40.png", "--prompt", QUESTION,
            "--max-new-tokens", "8", "--json", *(["--base", str(base)] if base else [])]  # fmt: skip
    if name == "llava_mistral":  # its golden was made with llava_v1's prompt, not the 1.6 default
        args += ["--template", "llava_v1"]
    assert main(args) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reply["token_ids"] == out["one_image.generate_new_ids"][0].tolist()
    if name.startswith("llava_llama"):
        assert reply["prompt_tokens"] == 162 - 1 + 16  # the -200 becomes 16 visual tokens
    if name == "llava_llama":
        assert (
            reply["text"]
            == json.loads((G / sub / "meta.json").read_text())["cases"]["one_image"]["generate"]["text"][0]
        )


def test_lora_merge_and_conversion_to_the_native_format(tmp_path, monkeypatch):
    monkeypatch.chdir(G)
    model = MLLM.from_pretrained(G / "llava_llama_lora" / "llava-v1.5-tiny-llama-lora", base=BASE)
    merged = load_file(str(G / "llava_llama_lora" / "merged_state_dict.safetensors"))
    ours = model.state_dict()
    for k, v in merged.items():
        name = "llm.lm_head.weight" if k == "lm_head.weight" else "llm." + k.removeprefix("model.")
        if k.startswith("model.mm_projector."):
            i, _, p = k.removeprefix("model.mm_projector.").partition(".")
            name = f"connector.linear_{int(i) // 2 + 1}.{p}"
        torch.testing.assert_close(ours[name], v, atol=1e-6, rtol=0, msg=k)
    # a converted run is a self-contained native model with its tokenizer and conversation format
    assert main(["convert", str(G / "llava_llama_lora" / "llava-v1.5-tiny-llama-lora"), str(tmp_path / "n"),
                 "--base", str(BASE)]) == 0  # fmt: skip
    cm = ChatModel.load(tmp_path / "n")
    assert cm.template.name == "llava_v1" and Tokenizer.from_dir(tmp_path / "n").vocab_size == 320
    _, out = golden("llava_llama_lora")
    r = cm.reply([user_message(QUESTION, 1)], [G / "images" / "img_70x40.png"], cm.params(max_new_tokens=8))
    assert r.token_ids == out["one_image.generate_new_ids"][0].tolist()


def test_missing_parts_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"LoRA run \(it was trained over 'vicuna-tiny-base'\): pass the base"
    ):
        MLLM.from_pretrained(G / "llava_llama_lora" / "llava-v1.5-tiny-llama-lora")
    with pytest.raises(CheckpointError, match=r"pretraining run .*: pass the base"):
        MLLM.from_pretrained(G / "llava_llama_pretrain" / "llava-v1.5-tiny-llama-pretrain")
    ckpt = tmp_path / "llava-v1.5-copy"
    shutil.copytree(G / "llava_llama" / "llava-v1.5-tiny-llama", ckpt)
    with pytest.raises(
        CheckpointError, match=r"vision tower 'openai/clip-vit-tiny-patch14-56' is not a local folder"
    ):
        MLLM.from_pretrained(ckpt)
    model = MLLM.from_pretrained(ckpt, vision_tower=G / "openai" / "clip-vit-tiny-patch14-56")
    monkeypatch.setenv("MODALIGN_MODELS", str(G))
    assert torch.equal(MLLM.from_pretrained(ckpt).connector.linear_1.weight, model.connector.linear_1.weight)


@pytest.mark.parametrize("legacy", [False, True])
def test_sentencepiece_ids_equal_transformers_slow_tokenizer(legacy):
    """Ids and decoded text of transformers 4.37.2's slow LlamaTokenizer (legacy true and false) on
    strings with special tokens, leading spaces, newlines, digits and multi-byte characters
    (slow_tokenizer_ids.json)."""
    from modalign.data.spm import SentencePieceTokenizer
    from modalign.data.tokenizer import read_tokenizer_config

    ref = json.loads((G / "slow_tokenizer_ids.json").read_text())
    d = G / "llava_llama" / "llava-v1.5-tiny-llama"
    tok = SentencePieceTokenizer(d / "tokenizer.model", read_tokenizer_config(d) | {"legacy": legacy})
    for text, ids in ref[str(legacy)].items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids, skip_special_tokens=True) == ref[f"{legacy}_decode"][text], text
    # message content is text: a user's "</s>" is not the end-of-sequence token
    ids, _ = tok.encode_offsets("a</s>b", protected=[(0, 6)])
    assert tok.eos_id not in ids and tok.decode(ids) == "a</s>b"


def test_a_lora_run_holding_what_the_merge_would_leave_out_is_refused(tmp_path):
    """The LoRA run's loader merges A / B pairs at one scale and reads the projector from
    non_lora_trainables.bin: per-module scales, tensors that are no A / B pair and trained tensors
    beyond the projector are refused by name rather than left out."""
    src = G / "llava_llama_lora" / "llava-v1.5-tiny-llama-lora"
    run = tmp_path / "run"  # a copy: its tower named by folder
    tower = G / "openai" / "clip-vit-tiny-patch14-56"
    shutil.copytree(src, run)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps(cfg | {"alpha_pattern": {"q_proj": 64}}))
    with pytest.raises(CheckpointError, match="alpha_pattern"):
        MLLM.from_pretrained(run, base=BASE, vision_tower=tower)
    (run / "adapter_config.json").write_text(json.dumps(cfg))
    extra = torch.load(src / "non_lora_trainables.bin", weights_only=True)
    torch.save(
        extra | {"base_model.model.model.embed_tokens.weight": torch.zeros(2, 2)},
        run / "non_lora_trainables.bin",
    )
    with pytest.raises(
        CheckpointError, match=r"beyond the projector \(base_model\.model\.model\.embed_tokens"
    ):
        MLLM.from_pretrained(run, base=BASE, vision_tower=tower)
    shutil.copy(src / "non_lora_trainables.bin", run / "non_lora_trainables.bin")
    a, b = (
        MLLM.from_pretrained(run, base=BASE, vision_tower=tower).state_dict(),
        MLLM.from_pretrained(src, base=BASE).state_dict(),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # restored: loads as released


def test_writes_never_replace_what_is_not_a_checkpoint_and_keep_the_tokenizer(tmp_path, capsys, monkeypatch):
    """A conversion into a folder holding its source (or a user's files) is refused, not replaced
    with everything in it; a save into a converted folder keeps its SentencePiece tokenizer; a
    failed <image> check leaves the destination as it was; a model whose LoRA is merged for
    speed is not saved with it twice."""
    monkeypatch.chdir(G)  # where the release's vision tower is found
    src = tmp_path / "p" / "src"
    shutil.copytree(G / "llava_llama" / "llava-v1.5-tiny-llama", src)
    (tmp_path / "p" / "notes.txt").write_text("mine")
    assert main(["convert", str(src), str(tmp_path / "p"), "--to", "hf-llava"]) == 2
    assert "would replace" in capsys.readouterr().err and (tmp_path / "p" / "notes.txt").is_file()
    assert main(["convert", str(src), str(src)]) == 2 and (src / "tokenizer.model").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    assert main(["convert", str(src), str(tmp_path / "mine")]) == 2
    assert "thesis.tex" in capsys.readouterr().err and (tmp_path / "mine" / "thesis.tex").is_file()
    # a converted folder saved over: its tokenizer.model stays (only tokenizer*.json did)
    assert main(["convert", str(src), str(tmp_path / "n")]) == 0
    before = sorted(p.name for p in (tmp_path / "n").iterdir())
    assert "tokenizer.model" in before
    MLLM.from_pretrained(tmp_path / "n").save_pretrained(tmp_path / "n")
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == before
    assert Tokenizer.from_dir(tmp_path / "n").vocab_size == Tokenizer.from_dir(src).vocab_size
    # LoRA merged into the weights (set_lora_merged, for speed) is refused by name, not saved twice
    from modalign.config import LoRAConfig
    from modalign.models.modality import enable_lora, set_lora_merged

    model = MLLM.from_pretrained(src)
    enable_lora(model, LoRAConfig(rank=2, alpha=4, targets=["q_proj"]))
    set_lora_merged(model, True)
    with pytest.raises(ValueError, match="is merged into their weights"):
        model.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
