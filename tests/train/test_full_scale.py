"""Dress rehearsals of the full-scale recipes: each shipped recipe (its real stage structure,
trainable sets, templates, precision) runs through ``modalign train`` for 2 steps per stage from
tiny parts in exactly the formats they are released in, written by the reference libraries:
transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``LlamaForCausalLM`` folders
(single and sharded safetensors, ``.bin`` and ``.bin`` shards), an InternLM2 folder in its release
layout, and a SentencePiece ``tokenizer.model`` trained on the fly. What each stage froze is
bit-identical to the file it came from; the LLaVA-shaped result exports to transformers' LLaVA
format and gives there the same logits and greedy tokens as ``modalign generate``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modalign import MLLM
from modalign.cli import main
from tests.helpers import randomize, save_as_bin

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

VOCAB = 400
CAPTIONS = (
    "blip_laion_cc_sbu_558k.json",
    "captions.json",
    "pretrain.json",
    "laion_captions.json",
    "coco_captions.json",
)
INSTRUCT = ("llava_v1_5_mix665k.json", "llava_instruct_150k.json", "multimodal_instructions.json",
            "sft_multimodal.json", "instructions.json")  # fmt: skip
TEXT = (
    "alpaca.json",
    "vicuna.json",
    "baize.json",
    "text_instructions.json",
    "sft_text.json",
    "gpt4_llm_52k.json",
)
CHATML = ["[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"]  # InternLM2's end / start of a turn


# ----------------------------------------------------------------------------- released parts


def _data(root: Path) -> Path:
    """Every data file the recipes name, from a small ShapesWorld: LLaVA-format JSON with images
    relative to ``images/`` (as the released data sets are), and text-only conversations."""
    from modalign.shapesworld.data import generate

    src = root / "sw"
    generate(src, num_train=8, num_eval=2, num_text=6, seed=0, image_size=64)
    data = root / "data"
    (data / "images").mkdir(parents=True)
    for png in (src / "images").glob("train_*.png"):
        (data / "images" / png.name).write_bytes(png.read_bytes())

    def rel(records):
        return [
            r | {"image": r["image"].removeprefix("images/")}
            for r in records
            if "train_" in r.get("image", "")
        ]

    caps = rel(json.loads((src / "captions.json").read_text()))
    inst = rel(json.loads((src / "instruct.json").read_text()))[:24]
    text = [json.loads(line) for line in (src / "text.jsonl").read_text().splitlines()]
    convs = [{"id": t["id"], "conversations": [{"from": "human", "value": "Describe the scene in words."},
                                               {"from": "gpt", "value": t["text"]}]} for t in text]  # fmt: skip
    for names, records in ((CAPTIONS, caps), (INSTRUCT, inst), (TEXT, convs)):
        for name in names:
            (data / name).write_text(json.dumps(records))
    # MMC4-style documents: text, then two images, each followed by its caption
    docs = []
    for i, (a, b) in enumerate(zip(caps, caps[1:], strict=False)):
        text = f"A page of pictures. <image> {a['conversations'][-1]['value']} <image> {b['conversations'][-1]['value']}"
        docs.append({"id": f"doc-{i}", "image": [a["image"], b["image"]],
                     "conversations": [{"from": "gpt", "value": text}]})  # fmt: skip
    (data / "mmc4_interleaved.json").write_text(json.dumps(docs))
    return data


def _tokenizer(dst: Path, texts: list[str], chatml: bool = False) -> None:
    """A SentencePiece model with Llama's settings (BPE, byte fallback, digits split, no
    normalisation, <unk> <s> </s> = 0 1 2) trained on the data, with a tokenizer_config.json as
    transformers writes one."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=VOCAB, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=CHATML if chatml else [], minloglevel=2,
    )  # fmt: skip
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "legacy": False, "add_bos_token": True, "add_eos_token": False}  # fmt: skip
    if chatml:
        proc = spm.SentencePieceProcessor(model_proto=buf.getvalue())
        cfg["added_tokens_decoder"] = {
            str(proc.piece_to_id(t)): {"content": t, "special": True} for t in CHATML
        }
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))


def _llama(dst: Path, seed: int, fmt: str) -> None:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = randomize(transformers.LlamaForCausalLM(cfg), seed)
    if fmt == "sharded":
        model.save_pretrained(dst, max_shard_size="100KB")
        assert (dst / "model.safetensors.index.json").is_file()
    else:
        tmp = dst.with_name(dst.name + "-st")
        model.save_pretrained(tmp)
        save_as_bin(tmp, dst, shards=3 if fmt == "bin-sharded" else 1)


def _internlm2(dst: Path, seed: int) -> None:
    """An InternLM2 folder as released (``model_type: internlm2``, ``wqkv`` grouped per KV head,
    ``tok_embeddings`` / ``output``), written from a transformers Llama of the same maths."""
    _llama(dst.with_name("llama-for-internlm2"), seed, "sharded")
    src = dst.with_name("llama-for-internlm2")
    state = {}
    for f in src.glob("*.safetensors"):
        state |= load_file(str(f))
    c = json.loads((src / "config.json").read_text())
    nh, nkv, hd = (
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["hidden_size"] // c["num_attention_heads"],
    )
    out = {"model.tok_embeddings.weight": state["model.embed_tokens.weight"], "output.weight": state["lm_head.weight"],
           "model.norm.weight": state["model.norm.weight"]}  # fmt: skip
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q = state[p + "self_attn.q_proj.weight"].view(nkv, nh // nkv, hd, -1)
        k = state[p + "self_attn.k_proj.weight"].view(nkv, 1, hd, -1)
        v = state[p + "self_attn.v_proj.weight"].view(nkv, 1, hd, -1)
        out[p + "attention.wqkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, c["hidden_size"])
        out[p + "attention.wo.weight"] = state[p + "self_attn.o_proj.weight"]
        out[p + "attention_norm.weight"] = state[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[p + f"feed_forward.{a}.weight"] = state[p + f"mlp.{b}.weight"]
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    doc = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": VOCAB,
           "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
           "num_hidden_layers": c["num_hidden_layers"], "num_attention_heads": nh, "num_key_value_heads": nkv,
           "rms_norm_eps": c["rms_norm_eps"], "rope_theta": 10000.0, "max_position_embeddings": 4096,
           "bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False}  # fmt: skip
    (dst / "config.json").write_text(json.dumps(doc))


def _tower(dst: Path, kind: str, fmt: str, seed: int) -> None:
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56,
              patch_size=14)  # fmt: skip
    torch.manual_seed(seed)
    if kind == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kw))
        proc = transformers.SiglipImageProcessorPil(size={"height": 56, "width": 56})
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw))
        proc = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
        )
    randomize(model, seed)
    if fmt == "bin":
        tmp = dst.with_name(dst.name + "-st")
        model.save_pretrained(tmp)
        save_as_bin(tmp, dst)
    else:
        model.save_pretrained(dst)
    proc.save_pretrained(dst)


# recipe -> (vision tower kind, its format, llm kind, its format)
PARTS = {
    "llava-1.5": ("clip", "safetensors", "llama", "sharded"),
    "mplug-owl": ("clip", "bin", "llama", "bin-sharded"),
    "mplug-owl2": ("clip", "safetensors", "llama", "bin"),
    "xcomposer2": ("clip", "bin", "internlm2", None),
    "blip2-style": ("siglip", "safetensors", "llama", "sharded"),
    "openflamingo": ("clip", "safetensors", "llama", "sharded"),
    "llama-adapter-v2": ("clip", "bin", "llama", "bin"),
}
# the rehearsal's decoders have 2 layers: blocks before every 2nd (the recipe's every 4th has none);
# its 400-piece tokenizer writes Alpaca's prompt and a caption in ~150 pieces (LLaMA's in ~60): the
# caption stage's 96 would leave no caption to learn; OpenFlamingo's sources carry their own batch
# sizes (mix: batch), 2 each here
EXTRA = {"openflamingo": ["model.overrides.llm.cross_attention.every=2",
                          "stages.pretrain.data.sources=[{path: '${data}/laion_captions.json', images: '${data}/images', "
                          "batch_size: 2, max_length: 32, loss_weight: 0.2}, {path: '${data}/mmc4_interleaved.json', "
                          "images: '${data}/images', batch_size: 2, max_length: 256}]"],
         "llama-adapter-v2": ["stages.captions.data.max_length=192"]}  # fmt: skip


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    data = _data(root)
    texts = []
    for name in (CAPTIONS[0], INSTRUCT[0], TEXT[0]):
        for r in json.loads((data / name).read_text()):
            texts += [t["value"] for t in r["conversations"]]
    texts = texts * 3 + ["USER: ASSISTANT: Human: AI: A chat between a curious user and an assistant."]
    parts = {}
    for i, (recipe, (tower, tfmt, llm, lfmt)) in enumerate(PARTS.items()):
        v, m = root / f"{recipe}-vision", root / f"{recipe}-llm"
        _tower(v, tower, tfmt, seed=i)
        if llm == "internlm2":
            _internlm2(m, seed=10 + i)
        else:
            _llama(m, 10 + i, lfmt)
        _tokenizer(m, texts, chatml=llm == "internlm2")
        parts[recipe] = (v, m)
    return data, parts


def _train(recipe: str, data: Path, vision: Path, llm: Path, out: Path) -> dict:
    from modalign.train.recipe import load_recipe

    r = load_recipe(
        recipe,
        {"data": str(data), "llm": str(llm), "vision": str(vision), "out": str(out)},
        EXTRA.get(recipe, []),
    )
    sets = []
    for s in r.stages:  # 2 steps per stage, 2 samples per step: everything else is the recipe's
        sets += [
            "--set",
            f"stages.{s.name}.stop={{max_steps: 2}}",
            "--set",
            f"stages.{s.name}.data.batch_size=2",
        ]
    for extra in EXTRA.get(recipe, []):
        sets += ["--set", extra]
    argv = ["train", recipe, "--out", str(out), "--data", str(data), "--var", f"llm={llm}", "--var",
            f"vision={vision}", "--no-progress", *sets]  # fmt: skip
    assert main(argv) == 0
    return {s.name: s for s in r.stages}


def _frozen_equal_to_files(stage_model: Path, vision: Path, llm: Path, trainable: list[str]) -> None:
    """What a stage did not train is what the released files hold (the tower's position table is
    compared where the grid is the file's)."""
    from modalign.checkpoints import load_pretrained
    from modalign.checkpoints.parts import read_part

    model = MLLM.from_pretrained(stage_model)
    if not any(t.startswith("vision") for t in trainable):
        want = read_part(vision, "vision", model.config)
        got = model.vision.state_dict()
        for k, v in want.items():
            assert torch.equal(got[k], v.float()), k
    if not any(t.startswith("llm") for t in trainable):
        src = load_pretrained(llm, dtype=torch.float32).llm.state_dict()
        got = model.llm.state_dict()
        plain = {
            k: v for k, v in got.items() if "multiway.1" not in k and "plora" not in k and "lora_" not in k
        }
        for k, v in plain.items():
            assert torch.equal(v, src[k.replace(".multiway.0", "")]), k


def _stage_froze_what_it_should(before: Path, after: Path, trainable: list[str]) -> None:
    """A stage leaves every parameter its trainable patterns do not name bit-identical to the
    stage before it, and changes some that they name (parameters it added, such as LoRA, aside)."""
    from modalign.train.freeze import match_any

    a = dict(MLLM.from_pretrained(before).named_parameters())
    b = dict(MLLM.from_pretrained(after).named_parameters())
    changed = []
    for k, v in b.items():
        if k not in a:
            continue
        same = torch.equal(a[k].float(), v.float())
        if not match_any(k, trainable):
            assert same, f"{after.parent.name}: {k} is frozen there but changed"
        elif not same:
            changed.append(k)
    assert changed, f"{after.parent.name}: nothing it trains changed ({trainable})"


@pytest.mark.parametrize("recipe", list(PARTS))
def test_full_scale_recipe_dress_rehearsal(recipe, released, tmp_path, capsys):
    data, parts = released
    vision, llm = parts[recipe]
    out = tmp_path / "run"
    stages = _train(recipe, data, vision, llm, out)
    first = next(iter(stages.values()))
    _frozen_equal_to_files(out / first.name / "model", vision, llm, first.trainable)
    names = list(stages)
    for prev, name in zip(names[:-1], names[1:], strict=True):  # each later stage against the one before
        _stage_froze_what_it_should(out / prev / "model", out / name / "model", stages[name].trainable)
    for name in stages:
        assert json.loads((out / name / "result.json").read_text())["steps"] == 2
    model = MLLM.from_pretrained(out / "model")
    cfg = model.config
    # part shapes came from the files; the system's choices from the recipe
    assert (cfg.llm.hidden_size, cfg.llm.vocab_size, cfg.vision.hidden_size) == (64, VOCAB, 32)
    if recipe == "mplug-owl2":
        assert cfg.llm.mam and any(".multiway.1." in n for n, _ in model.named_parameters())
    if recipe == "xcomposer2":
        assert cfg.llm.plora is not None and cfg.llm.fused_qkv
    if recipe == "openflamingo":  # every step trained on a batch of each source, the documents too
        rows = [json.loads(x) for x in (out / first.name / "metrics.jsonl").read_text().splitlines()]
        losses = [r["source_loss"] for r in rows if "source_loss" in r]
        assert len(losses) == 2 and all(
            {Path(k).stem for k in x} == {"laion_captions", "mmc4_interleaved"} for x in losses
        )
        assert all(0 < v < 100 for x in losses for v in x.values())
    png = data / "images" / "train_00000.png"
    argv = ["generate", "--model", str(out / "model"), "--image", str(png), "--prompt", "What is in the image?",
            "--max-new-tokens", "6", "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(reply["token_ids"]) >= 1
    if recipe == "llava-1.5":
        _same_in_transformers(out / "model", tmp_path / "hf", png, reply, capsys)


def _same_in_transformers(model_dir: Path, hf_dir: Path, png: Path, reply: dict, capsys) -> None:
    """Exported to transformers' LLaVA format: the same next-token logits and greedy tokens."""
    from modalign.data.tokenizer import Tokenizer
    from modalign.infer.chat import ChatModel, user_message

    assert main(["convert", str(model_dir), str(hf_dir), "--to", "hf-llava"]) == 0
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    cm = ChatModel.load(model_dir)
    ids = cm.prompt_ids([user_message("What is in the image?", 1)])
    tok = Tokenizer.from_dir(hf_dir)
    img = tok.token_id("<image>")
    assert img == ref.config.image_token_index == VOCAB  # a new token after the vocabulary
    n = ref.config.image_seq_length
    expanded = [t for i in ids for t in ([img] * n if i == cm.model.config.image_token_id else [i])]
    x = torch.tensor([expanded])
    px = cm.images(png)[None]
    with torch.no_grad():
        ours = cm.model(torch.tensor([ids]), pixel_values=px).logits[0, -1]
        theirs = ref(input_ids=x, pixel_values=px).logits[0, -1]
    torch.testing.assert_close(theirs[:VOCAB], ours, atol=1e-4, rtol=0)
    gen = ref.generate(input_ids=x, pixel_values=px, max_new_tokens=6, do_sample=False)
    assert gen[0, x.shape[1] :].tolist()[: len(reply["token_ids"])] == reply["token_ids"]


def test_the_released_parts_read_as_their_reference_libraries_read_them(released):
    """The InternLM2 folder (written from a transformers Llama) gives that Llama's logits; the
    SentencePiece tokenizers give transformers' LlamaTokenizer ids on the rehearsal's prompts."""
    from modalign.data.conversation import get_template
    from modalign.data.datasets import load_samples
    from modalign.data.tokenizer import Tokenizer

    data, parts = released
    _, m = parts["xcomposer2"]
    ref = transformers.LlamaForCausalLM.from_pretrained(m.with_name("llama-for-internlm2")).eval()
    ours = MLLM.from_pretrained(m).eval()
    assert ours.config.llm.fused_qkv and ours.config.source_format == "internlm2"
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    for recipe, template in (
        ("llava-1.5", "vicuna_v1"),
        ("xcomposer2", "internlm2"),
        ("mplug-owl2", "mplug_owl2"),
        ("llama-adapter-v2", "alpaca"),
    ):
        tok = Tokenizer.from_dir(parts[recipe][1])
        hf = transformers.LlamaTokenizer.from_pretrained(parts[recipe][1])
        for s in load_samples(data / INSTRUCT[0])[:6] + load_samples(data / TEXT[0])[:2]:
            text, _, _ = get_template(template, tok).render(s.messages, tok)
            text = text.replace("<image>", "")
            assert tok.encode(text) == hf(text, add_special_tokens=False).input_ids, text


def test_llama_adapter_v2_plans_within_an_80_gb_gpu_at_the_releases_batch():
    """The release's batch (4 per GPU on 8 GPUs, no accumulation: 32) at its lengths, without
    gradient checkpointing as its scripts: each stage's plan (LLaMA-7B shapes from the preset, no
    weights) fits an 80 GB GPU under DDP, which keeps the whole model on every GPU (at batch 64 the
    instruction stage planned 162 GiB)."""
    from modalign.train.plan import plan
    from modalign.train.recipe import load_recipe

    r = load_recipe("llama-adapter-v2", {"data": "nowhere", "llm": "missing-llm", "vision": "missing-vision"})
    assert r.parallel.strategy == "ddp"
    for gpus in (1, 8):
        rows = plan(r, gpus=gpus, count_samples=False)
        assert "part shapes from the preset" in rows[0]["note"]
        for stage, row in zip(r.stages, rows, strict=True):
            assert stage.data.batch_size * stage.optim.grad_accum * 8 == 32, stage.name
            assert not stage.gradient_checkpointing and stage.data.template == "alpaca"
            assert row["memory_bytes"]["weights"] > 26 * 2**30  # the whole 7B model in fp32, per GPU
            assert sum(row["memory_bytes"].values()) < 80e9, (stage.name, row["memory_total_gib"])
    assert [s.data.max_length for s in r.stages] == [96, 512]  # the release's max_words


def test_mplug_owl2_global_batches_are_the_papers_on_8_gpus():
    """Per-GPU batch x 8 GPUs x accumulation: 8,192 for pre-training, 256 for instruction tuning."""
    from modalign.train.recipe import load_recipe

    r = load_recipe("mplug-owl2", {"data": "d", "llm": "l", "vision": "v"})
    assert [s.data.batch_size * 8 * s.optim.grad_accum for s in r.stages] == [8192, 256]


def test_init_from_a_pretraining_runs_projector_equals_the_released_run():
    """``init: {connector: .../mm_projector.bin}`` with the run's LLM and tower gives exactly the
    model the released pretraining run loads as (original LLaVA layout, golden files)."""
    from modalign.checkpoints.parts import build_from_parts
    from modalign.train.recipe import load_recipe

    g = Path(__file__).resolve().parents[1] / "golden" / "llava_original"
    run, base, tower = g / "llava_llama_pretrain" / "llava-v1.5-tiny-llama-pretrain", g / "vicuna-tiny-base", (
        g / "openai" / "clip-vit-tiny-patch14-56")  # fmt: skip
    r = load_recipe("llava-1.5", {"data": "d", "llm": str(base), "vision": str(tower)},
                    sets=[f"model.init.connector={run / 'mm_projector.bin'}", "model.overrides={vision: {image_size: 56}}"])  # fmt: skip
    ours = build_from_parts(r.model.build_config(), r.model.init, seed=0)
    want = MLLM.from_pretrained(run, base=base, vision_tower=tower)
    a, b = ours.state_dict(), want.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].float()) for k in a)
    assert (ours.config.vision.resize_mode, ours.config.vision.image_mean) == (
        "pad",
        want.config.vision.image_mean,
    )


def test_finetune_alone_from_a_released_projector(released, tmp_path):
    """Skipping stage 1 with a released projector: ``--stage finetune`` from ``init`` parts."""
    data, _ = released
    g = Path(__file__).resolve().parents[1] / "golden" / "llava_original"
    run, base, tower = g / "llava_llama_pretrain" / "llava-v1.5-tiny-llama-pretrain", g / "vicuna-tiny-base", (
        g / "openai" / "clip-vit-tiny-patch14-56")  # fmt: skip
    out = tmp_path / "run"
    argv = ["train", "llava-1.5", "--out", str(out), "--data", str(data), "--var", f"llm={base}", "--var",
            f"vision={tower}", "--stage", "finetune", "--no-progress",
            "--set", f"model.init.connector={run / 'mm_projector.bin'}", "--set", "stages.finetune.init_from=none",
            "--set", "stages.finetune.stop={max_steps: 2}", "--set", "stages.finetune.data.batch_size=2",
            "--set", "model.overrides={vision: {image_size: 56}}"]  # fmt: skip
    assert main(argv) == 0
    assert not (out / "pretrain").exists()
    start = MLLM.from_pretrained(run, base=base, vision_tower=tower).state_dict()
    end = MLLM.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(end[k], v.float()) for k, v in start.items() if k.startswith("vision."))
    trained = [k for k in start if k.startswith(("connector.", "llm."))]
    assert all(not torch.equal(end[k], start[k].float()) for k in trained if k.endswith("proj.weight"))


def test_fresh_parts_are_drawn_as_the_whole_model_draws_them(tmp_path):
    """A part initialised fresh beside loaded ones gets what ``MLLM(cfg)`` gives it under the
    seed, so loading a part never changes the others' starting point."""
    from modalign.checkpoints.parts import build_from_parts
    from modalign.config import MLLMConfig

    cfg = MLLMConfig.from_name("tiny-llava")
    torch.manual_seed(3)
    whole = MLLM(cfg)
    whole.save_pretrained(tmp_path / "m")
    for init in (
        {"vision": tmp_path / "m", "llm": tmp_path / "m"},
        {"vision": tmp_path / "m"},
        {"llm": tmp_path / "m"},
    ):
        built = build_from_parts(cfg, {k: str(v) for k, v in init.items()}, seed=3)
        a, b = built.state_dict(), whole.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), init
