"""Data side: templates with exact loss masks, tokenizer, datasets, bad samples, collation."""

import json
import random
import string

import numpy as np
import pytest
import torch
from PIL import Image

from modalign.config import VisionConfig
from modalign.data.collate import LengthGroupedSampler, collate
from modalign.data.conversation import (
    IGNORE_INDEX,
    IMAGE_MARK,
    BadSample,
    Conversation,
    Message,
    get_template,
    render,
)
from modalign.data.datasets import (
    BadSamplePolicy,
    ConversationDataset,
    MixtureDataset,
    SampleProcessor,
    SkipBudgetExceeded,
    load_samples,
    mixture_indices,
    parse_record,
)
from modalign.data.images import ImageProcessor, open_image, patch_at, resolve_image_path
from modalign.data.tokenizer import Tokenizer
from tests.tiny import labelled_runs

SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]  # fmt: skip
IMG = 3  # "<image>" id


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 7))) for _ in range(300)
    ]
    corpus = [
        " ".join(rng.choice(words) for _ in range(30)) + " USER ASSISTANT INST SYSTEM" for _ in range(200)
    ]
    return Tokenizer.train_bpe(corpus, vocab_size=600, special_tokens=SPECIALS)


CONV = Conversation(
    [
        Message("user", IMAGE_MARK + "\nWhat is it?"),
        Message("assistant", "A red circle."),
        Message("user", "And the size?"),
        Message("assistant", "It is large."),
    ],
    images=["x.png"],
)

EXPECTED = {
    "vicuna_v1": "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: \ue000\nWhat is it? ASSISTANT: A red "
    "circle.</s>USER: And the size? ASSISTANT: It is large.</s>",
    "llava_v1": "<s>A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions. USER: \ue000\nWhat is it? ASSISTANT: A red "
    "circle.</s>USER: And the size? ASSISTANT: It is large.</s>",
    "chatml": "<|im_start|>user\n\ue000\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
    "<|im_start|>user\nAnd the size?<|im_end|>\n<|im_start|>assistant\nIt is large.<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n\ue000\nWhat is it?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nA red circle.<|eot_id|><|start_header_id|>user<|end_header_id|>"
    "\n\nAnd the size?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nIt is large.<|eot_id|>",
    "mistral_instruct": "<s>[INST] \ue000\nWhat is it? [/INST] A red circle.</s>[INST] And the size? [/INST] It is large.</s>",
    "plain": "<s>\ue000A red circle.\nIt is large.\n",
    "interleaved": "<s>\ue000A red circle.</s>It is large.</s>",
    # Alpaca's prompt; a later turn repeats the blocks after the reply's EOS
    "alpaca": "<s>Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n\ue000\nWhat is it?\n\n### Response:A red circle.</s>\n\n### Instruction:\n"
    "And the size?\n\n### Response:It is large.</s>",
}
EOT = {"vicuna_v1": "</s>", "llava_v1": "</s>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>",
       "mistral_instruct": "</s>", "plain": "\n", "alpaca": "</s>", "interleaved": "</s>"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_golden_text_and_labelled_spans(tok, name):
    """Each template's text (those that start with BOS put its id first and tokenize the text
    after it as a fresh input, as ``tokenizer(prompt)`` does) and the spans that are trained."""
    t = get_template(name)
    text, _, _ = t.render(CONV.messages, tok)
    assert (tok.bos_token + text if t.bos_first else text) == EXPECTED[name]
    r = render(CONV, tok, t, IMG, image_tokens=5)
    assert (r.input_ids[0] == tok.bos_id) == t.bos_first
    assert r.input_ids.count(IMG) == 5 and r.num_images == 1
    runs = [tok.decode(run).lstrip(" ") for run in labelled_runs(r.input_ids, r.labels)]
    replies = ["A red circle." + EOT[name], "It is large." + EOT[name]]
    if name in ("plain", "interleaved"):  # caption / document text: the replies are adjacent, one trained run
        replies = ["".join(replies)]
    assert runs == replies


def test_interleaved_document_trains_the_text_after_its_first_image(tok):
    """An MMC4-style document (one ``gpt`` turn, two images inside its text) keeps its images where
    they stand; the loss covers the text after the first image and the EOS, not the text before
    it nor the image tokens (OpenFlamingo's masking)."""
    rec = {"id": "doc-1", "image": ["a.png", "b.png"], "conversations": [
        {"from": "gpt", "value": "The blue house.<image>A red circle.<image>It is large."}]}  # fmt: skip
    conv = parse_record(rec, "doc-1", "mmc4")
    r = render(conv, tok, get_template("interleaved"), IMG, image_tokens=3)
    assert r.num_images == 2
    ids, labels = r.input_ids, r.labels
    blocks = [i for i, t in enumerate(ids) if t == IMG and ids[i - 1] != IMG]  # each image's first token
    assert len(blocks) == 2 and all(ids[b : b + 3] == [IMG] * 3 for b in blocks)
    pieces = [ids[1 : blocks[0]], ids[blocks[0] + 3 : blocks[1]], ids[blocks[1] + 3 :]]
    assert [tok.decode(p) for p in pieces] == ["The blue house.", "A red circle.", "It is large.</s>"]
    trained = [i for i, label in enumerate(labels) if label != -100]
    assert trained == [*range(blocks[0] + 3, blocks[1]), *range(blocks[1] + 3, len(ids))]
    assert all(labels[i] == ids[i] for i in trained)


def test_interleaved_chat_prompt_is_its_images_and_a_sample_without_one_is_refused(tok):
    """A chat turn gives its images alone (as in ``plain``), so the prompt ends where the model
    writes the text that follows them; a sample without an image has nothing to learn and is
    refused by name."""
    t = get_template("interleaved")
    conv = Conversation(
        [Message("system", "Be brief."), Message("user", IMAGE_MARK + "\nWhat is it?")], ["x.png"]
    )
    r = render(conv, tok, t, IMG, image_tokens=4, add_generation_prompt=True)
    assert r.input_ids == [tok.bos_id] + [IMG] * 4 and r.num_trained == 0
    text_only = Conversation([Message("user", "hi"), Message("assistant", "A red circle.")], id="t-1")
    with pytest.raises(BadSample, match="t-1.*interleaved.*first image") as e:
        render(text_only, tok, t, IMG)
    assert e.value.reason == "no image"


def test_generation_prompt_has_no_labels(tok):
    conv = Conversation([Message("user", IMAGE_MARK + " hi")], ["x.png"])
    r = render(conv, tok, get_template("vicuna_v1"), IMG, 4, add_generation_prompt=True)
    assert tok.decode(r.input_ids[-3:]).endswith("ASSISTANT:") and r.num_trained == 0


def test_jinja_template_matches_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[U] {{ m['content'] }}\n"
        "{% elif m['role'] == 'assistant' %}[A] {{ m['content'] }}{{ eos_token }}\n{% else %}"
        "{{ raise_exception('bad role') }}{% endif %}{% endfor %}{% if add_generation_prompt %}[A]{% endif %}"
    )
    tok.chat_template = template
    tok.save(tmp_path / "tok")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"),
                                              bos_token="<s>", eos_token="</s>")  # fmt: skip
    hf.chat_template = template
    conv = Conversation([Message("user", "what is abc"), Message("assistant", "xyz ok"),
                         Message("user", "and"), Message("assistant", "done")])  # fmt: skip
    msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
    want = hf.apply_chat_template(msgs, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    loaded = Tokenizer.from_dir(tmp_path / "tok")
    r = render(conv, loaded, get_template("jinja", loaded), None)
    assert r.input_ids == list(want)
    runs = [tok.decode(run) for run in labelled_runs(r.input_ids, r.labels)]
    assert [s.lstrip() for s in runs] == ["xyz ok</s>", "done</s>"]
    with pytest.raises(BadSample, match="bad role"):
        render(Conversation([Message("system", "s"), Message("assistant", "a")]), loaded,
               get_template("jinja", loaded), None)  # fmt: skip


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml", "llama3", "mistral_instruct", "alpaca"])
def test_property_labelled_ids_decode_to_assistant_texts(tok, name):
    rng = random.Random(1)
    vocab = ["red", "blue", "circle", "big", "it", "is", "the", "a", "yes", "no", "two", "left", "of"]
    for _ in range(60):
        msgs, replies, images = [], [], []
        for _turn in range(rng.randint(1, 4)):
            q = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6)))
            if rng.random() < 0.4:
                q = IMAGE_MARK + "\n" + q
                images.append("i.png")
            a = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 8)))
            msgs += [Message("user", q), Message("assistant", a)]
            replies.append(a + EOT[name])
        r = render(Conversation(msgs, images), tok, get_template(name), IMG, image_tokens=3)
        assert r.input_ids.count(IMG) == 3 * len(images)
        runs = [tok.decode(run).lstrip(" ") for run in labelled_runs(r.input_ids, r.labels)]
        assert runs == replies


def test_truncation_keeps_whole_images_and_rejects_when_nothing_left(tok):
    conv = Conversation([Message("user", IMAGE_MARK + " q"), Message("assistant", "answer here"),
                         Message("user", IMAGE_MARK + " q2"), Message("assistant", "more words here")],
                        ["a.png", "b.png"])  # fmt: skip
    full = render(conv, tok, get_template("chatml"), IMG, image_tokens=10)
    second = full.input_ids.index(IMG, full.input_ids.index(IMG) + 10)
    cut = render(conv, tok, get_template("chatml"), IMG, image_tokens=10, max_length=second + 4)
    assert cut.num_images == 1 and cut.input_ids.count(IMG) == 10 and len(cut.input_ids) == second
    with pytest.raises(BadSample, match="no supervised token left after truncation") as e:
        render(conv, tok, get_template("chatml"), IMG, image_tokens=10, max_length=8)
    assert e.value.reason == "no supervised token left after truncation"


def test_tokenizer_round_trip(tok, tmp_path):
    tok.save(tmp_path / "t")
    again = Tokenizer.from_dir(tmp_path / "t")
    text = "the red circle <|im_end|> is left"
    assert again.encode(text) == tok.encode(text) and again.decode(again.encode(text)) == text
    assert again.bos_id == 1 and again.eos_id == 2 and again.pad_id == 0
    # the source's own tokenizer_config keys survive a save (transformers reads padding_side and
    # the class from them; left padding matters for its batched generation)
    cfg_file = tmp_path / "t" / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) | {"padding_side": "left", "model_max_length": 4096,
                                               "tokenizer_class": "Qwen2Tokenizer"}  # fmt: skip
    cfg_file.write_text(json.dumps(cfg))
    Tokenizer.from_dir(tmp_path / "t").save(tmp_path / "t2")
    saved = json.loads((tmp_path / "t2" / "tokenizer_config.json").read_text())
    assert {k: saved[k] for k in ("padding_side", "model_max_length", "tokenizer_class")} == {
        "padding_side": "left", "model_max_length": 4096, "tokenizer_class": "Qwen2Tokenizer"}  # fmt: skip


# ------------------------------------------------------------------------------ images


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(root / "ok.png")
    buf = (root / "ok.png").read_bytes()
    (root / "truncated.png").write_bytes(buf[: len(buf) // 2])
    (root / "empty.jpg").write_bytes(b"")
    gif = Image.new("P", (8, 8), 0)
    gif.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    gif.save(root / "renamed.jpg", format="GIF")
    # a PNG header that claims 30000 x 30000 pixels (the data are never decoded)
    big = Image.new("L", (1, 1))
    big.save(root / "small.png")
    raw = bytearray((root / "small.png").read_bytes())
    import struct
    import zlib

    raw[16:24] = struct.pack(">II", 30000, 30000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    (root / "bomb.png").write_bytes(bytes(raw))
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.save(root / "alpha.png")
    return root


def test_broken_images_have_reasons(image_dir):
    cases = {"truncated.png": "corrupt image", "empty.jpg": "corrupt image", "bomb.png": "image too large",
             "nothere.png": "missing image"}  # fmt: skip
    for name, reason in cases.items():
        with pytest.raises(BadSample) as e:
            open_image(image_dir / name, sample_id="s1")
        assert e.value.reason == reason and "s1" in str(e.value) and name in str(e.value)
    assert "30000x30000" in str(pytest.raises(BadSample, open_image, image_dir / "bomb.png").value)
    # a GIF named .jpg is decoded by its content, not its name, and loses nothing
    img = open_image(image_dir / "renamed.jpg")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 0, 0)
    # fully transparent red composites onto the background
    assert open_image(image_dir / "alpha.png", background=(0, 0, 255)).getpixel((1, 1)) == (0, 0, 255)


def test_paths_stay_inside_the_root(image_dir):
    for bad in ["../x.png", "/etc/passwd", "a/../../x.png", ""]:
        with pytest.raises(BadSample) as e:
            resolve_image_path(image_dir, bad, "s2")
        assert e.value.reason == "bad image path"
    assert resolve_image_path(image_dir, "sub/../ok.png") == (image_dir / "ok.png").resolve()


@pytest.mark.parametrize("mode", ["pad", "crop", "squash"])
def test_resize_policies(image_dir, mode):
    vc = VisionConfig(image_size=16, resize_mode=mode)
    x = ImageProcessor(vc)(image_dir / "ok.png")
    assert x.shape == (3, 16, 16)
    green = (torch.tensor([10, 200, 30]) / 255 - torch.tensor(vc.image_mean)) / torch.tensor(vc.image_std)
    torch.testing.assert_close(x[:, 8, 8], green, atol=1e-2, rtol=0)
    if mode == "pad":  # the 40x30 image is padded at top and bottom with the mean colour
        torch.testing.assert_close(x[:, 0, 8], torch.zeros(3), atol=4e-2, rtol=0)  # int(mean*255), bicubic


def test_image_cache_returns_the_same_pixels_within_its_bound(image_dir, tmp_path):
    """The cache changes nothing but speed: equal tensors to an uncached processor, least recently
    used out first at its byte bound, a file rewritten on disk is read again, bad files still fail."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    vc = VisionConfig(image_size=32, resize_mode="pad")
    plain = ImageProcessor(vc)
    cached = ImageProcessor(vc, cache_mb=2 * 3 * 32 * 32 / 2**20)  # room for exactly two images
    for f in files + files[2:] + files:
        want, size = plain.load(f)
        got, got_size = cached.load(f)
        assert torch.equal(got, want) and got_size == size
        assert len(cached._cache) <= 2 and cached.cache_bytes == 3 * 32 * 32 * len(cached._cache)
    assert [k[0] for k in cached._cache] == [str(files[2]), str(files[3])]  # the two used last
    got = cached(files[3])
    got.add_(1.0)  # callers may modify what they get
    assert torch.equal(cached(files[3]), plain(files[3]))
    Image.fromarray(rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)).save(files[3])
    assert torch.equal(cached(files[3]), plain(files[3]))  # rewritten: read again
    for name, reason in [("truncated.png", "corrupt image"), ("nothere.png", "missing image")]:
        with pytest.raises(BadSample) as e:
            cached(image_dir / name, sample_id="s9")
        assert e.value.reason == reason and "s9" in str(e.value)


def test_image_cache_keeps_uploaded_bytes_by_digest_across_threads(image_dir, monkeypatch):
    """Images given as bytes (a server's uploads) are cached by a digest of the bytes: the same
    bytes again skip decoding, with pixels equal to an uncached processor's; other bytes miss;
    bad bytes still fail; many threads at once get the right pixels; the processor pickles (a
    data-loader worker's copy) with its cache and a lock of its own."""
    import io
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from modalign.data import images as images_mod

    rng = np.random.default_rng(1)
    blobs = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    vc = VisionConfig(image_size=32, resize_mode="pad")
    plain = ImageProcessor(vc)
    want = [plain(b) for b in blobs]
    cached = ImageProcessor(vc, cache_mb=1)
    opened, real = [], images_mod.open_image
    monkeypatch.setattr(images_mod, "open_image", lambda src, *a, **k: opened.append(1) or real(src, *a, **k))
    for _ in range(3):
        for b, w in zip(blobs, want, strict=True):
            assert torch.equal(cached(b), w)
    assert len(opened) == 3 and len(cached._cache) == 3  # each image decoded once
    assert torch.equal(cached(bytearray(blobs[1])), want[1]) and len(opened) == 3  # same bytes, any type
    with pytest.raises(BadSample):
        cached(blobs[0][:40], sample_id="upload")
    fresh = ImageProcessor(vc, cache_mb=1)
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda k: (k % 3, fresh(blobs[k % 3])), range(48)))
    assert all(torch.equal(g, want[k]) for k, g in got) and len(fresh._cache) == 3
    assert fresh.cache_bytes == sum(e[0].numel() for e in fresh._cache.values())
    copy = pickle.loads(pickle.dumps(fresh))
    assert torch.equal(copy(blobs[2]), want[2]) and copy._lock is not fresh._lock


def test_clip_crop_matches_transformers(image_dir):
    transformers = pytest.importorskip("transformers")
    rng = torch.Generator().manual_seed(0)
    arr = (torch.rand(50, 70, 3, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(image_dir / "noise.png")
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    want = proc(Image.open(image_dir / "noise.png"), return_tensors="pt")["pixel_values"][0]
    got = ImageProcessor(VisionConfig(image_size=32, resize_mode="crop"))(image_dir / "noise.png")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ datasets


def _write(path, rows):
    path.write_text(json.dumps(rows))
    return path


def test_llava_and_messages_formats_and_bad_samples(tok, image_dir, tmp_path):
    rows = [
        {"id": "ok", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                          {"from": "gpt", "value": "yo"}]},
        {"id": "count", "image": "ok.png", "conversations": [{"from": "human", "value": "no image mark"},
                                                             {"from": "gpt", "value": "yo"}]},
        {"id": "corrupt", "image": "truncated.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                      {"from": "gpt", "value": "yo"}]},
        {"id": "escape", "image": "../secret.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                     {"from": "gpt", "value": "yo"}]},
        {"id": "role", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"id": "empty", "conversations": []},
        {"id": "text", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
    ]  # fmt: skip
    samples = load_samples(_write(tmp_path / "d.json", rows))
    proc = SampleProcessor(tok, get_template("chatml"), image_dir, ImageProcessor(VisionConfig(image_size=16)),
                           IMG, image_tokens=4)  # fmt: skip
    ds = ConversationDataset(samples, proc)
    out = [ds[i] for i in range(len(ds))]
    reasons = {x.sample_id: x.reason for x in out if isinstance(x, BadSample)}
    assert reasons == {"count": "image count mismatch", "corrupt": "corrupt image", "escape": "bad image path",
                       "role": "unknown role", "empty": "empty conversation"}  # fmt: skip
    assert out[0].pixel_values[0].shape == (3, 16, 16) and out[6].pixel_values == []
    # read twice through the token and image caches: the same examples and the same rejections as
    # a dataset that caches nothing
    cached = ConversationDataset(samples, SampleProcessor(
        tok, get_template("chatml"), image_dir, ImageProcessor(VisionConfig(image_size=16), cache_mb=1), IMG, 4))  # fmt: skip
    plain = ConversationDataset(samples, proc, token_cache_mb=0)
    for _ in range(2):
        for i in range(len(ds)):
            a, b = cached[i], plain[i]
            assert type(a) is type(b)
            if isinstance(a, BadSample):
                assert (a.sample_id, a.reason, str(a)) == (b.sample_id, b.reason, str(b))
            else:
                assert (a.id, a.input_ids, a.labels, a.source) == (b.id, b.input_ids, b.labels, b.source)
                assert type(a.input_ids) is list and len(a.pixel_values) == len(b.pixel_values)
                assert all(torch.equal(x, y) for x, y in zip(a.pixel_values, b.pixel_values, strict=True))
    assert sorted(cached._tokens) == [0, 2, 3, 6]  # tokens of every sample whose text renders
    assert cached.processor.images.cache_bytes == 3 * 16 * 16  # one good image file
    room = 8 * len(out[0].input_ids) / 2**20  # token ids and labels of sample 0 only
    small = ConversationDataset(samples, proc, token_cache_mb=room)
    assert [small[i].input_ids for i in (0, 6, 0, 6)] == [out[i].input_ids for i in (0, 6, 0, 6)]
    assert list(small._tokens) == [0]
    # the error policy stops at the first bad sample, naming it
    policy = BadSamplePolicy("error")
    with pytest.raises(BadSample, match="sample count"):
        for x in out:
            policy.bad(x) if isinstance(x, BadSample) else policy.ok()
    policy = BadSamplePolicy("skip", max_skip_fraction=0.9, min_seen=1)
    for x in out:
        policy.bad(x) if isinstance(x, BadSample) else policy.ok()
    assert sum(policy.skipped.values()) == 5 and "corrupt image: 1" in policy.report()
    with pytest.raises(SkipBudgetExceeded, match="skipped 5 of 6"):
        p = BadSamplePolicy("skip", max_skip_fraction=0.5, min_seen=6)
        for x in out:
            p.bad(x) if isinstance(x, BadSample) else p.ok()

    msgs = tmp_path / "m.jsonl"
    msgs.write_text(json.dumps({"id": "m1", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ok.png"}}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "yo"}]}) + "\n" + json.dumps({"text": "plain corpus text"}) + "\n")  # fmt: skip
    m = load_samples(msgs)
    assert isinstance(m[0], Conversation) and m[0].images == ["ok.png"]
    ex = SampleProcessor(
        tok, get_template("chatml"), image_dir, ImageProcessor(VisionConfig(image_size=16)), IMG, 4
    )(m[1])
    assert ex.labels == ex.input_ids and ex.input_ids[0] == tok.bos_id


def test_collate_and_sampler(tok, image_dir, tmp_path):
    rows = [{"id": f"s{i}", **({"image": "ok.png"} if i % 2 else {}), "conversations": [
        {"from": "human", "value": ("<image>" if i % 2 else "") + " q" * i}, {"from": "gpt", "value": "a"}]}
        for i in range(10)]  # fmt: skip
    proc = SampleProcessor(
        tok, get_template("chatml"), image_dir, ImageProcessor(VisionConfig(image_size=16)), IMG, 2
    )
    ds = ConversationDataset(load_samples(_write(tmp_path / "c.json", rows)), proc)
    b = collate([ds[1], ds[2], ds[3]], tok.pad_id)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert b["pixel_values"].shape == (2, 3, 16, 16) and b["image_counts"] == [1, 0, 1]
    lens = b["attention_mask"].sum(1).tolist()
    assert lens == [len(ds[1]), len(ds[2]), len(ds[3])] and b["attention_mask"][0, 0] == 1
    left = collate([ds[1], ds[2]], tok.pad_id, left=True)
    short = 0 if len(ds[1]) < len(ds[2]) else 1
    assert left["attention_mask"][:, -1].all() and left["input_ids"][short, 0] == tok.pad_id
    assert left["attention_mask"][short, 0] == 0
    s = LengthGroupedSampler(ds, batch_size=2, seed=0, by_modality=True)
    batches = s.batches()
    assert sorted(i for bt in batches for i in bt) == list(range(10))
    assert all(len({i % 2 for i in bt}) == 1 for bt in batches)  # modalities never mixed
    assert s.batches() == batches  # deterministic per epoch
    s.set_epoch(1)
    assert s.batches() != batches


def test_balanced_groups_split_by_value_with_shares_by_size_to_the_alpha():
    from modalign.data.datasets import balanced_groups

    samples = list(range(10))
    groups = ["b"] * 6 + ["a"] * 2 + [None] + ["c"]  # one malformed record (None)
    out = balanced_groups(samples, groups, 1.0)
    assert [(g, v) for g, v, _ in out] == [("a", [6, 7]), ("b", [0, 1, 2, 3, 4, 5, 8]), ("c", [9])]
    assert [round(w, 6) for *_, w in out] == [0.2, 0.7, 0.1]  # the malformed one joins the largest group
    assert [w for *_, w in balanced_groups(samples, groups, 0.0)] == [1 / 3] * 3
    w = [w for *_, w in balanced_groups(samples, groups, 0.5)]
    assert w == pytest.approx([x / (2**0.5 + 7**0.5 + 1) for x in (2**0.5, 7**0.5, 1)])
    with pytest.raises(ValueError, match="10 samples but 9 group values"):
        balanced_groups(samples, groups[:9], 1.0)


def test_mixture_proportions():
    pairs = mixture_indices([50, 10], [0.9, 0.1], 200, seed=0)
    from collections import Counter

    c = Counter(k for k, _ in pairs)
    assert c == {0: 180, 1: 20}
    # within a source every sample comes before any repeats: 20 draws of 10 samples are each
    # sample twice; 180 of 50, each three or four times (30 of them four: 3 x 50 + 30)
    assert Counter(i for k, i in pairs if k == 1) == {i: 2 for i in range(10)}
    per = Counter(i for k, i in pairs if k == 0)
    assert set(per) == set(range(50)) and sorted(Counter(per.values()).items()) == [(3, 20), (4, 30)]
    assert pairs != sorted(pairs) and mixture_indices([50, 10], [0.9, 0.1], 200, seed=0) == pairs
    assert mixture_indices([50, 10], [0.9, 0.1], 200, seed=1) != pairs
    with pytest.raises(ValueError, match="non-negative"):
        mixture_indices([1], [-1.0], 5)


def test_a_mixture_draws_the_next_samples_of_each_source_every_epoch():
    """A source drawn less than its size per epoch gives other samples the next epoch (the same
    draw every epoch left the rest of it unseen for the whole run), deterministically, with the
    sampler's lengths those of the epoch's draw; a source drawn whole keeps its list."""
    from collections import Counter

    def draws(epoch, k):
        return [i for s, i in mixture_indices([50, 10], [0.5, 0.5], 20, seed=3, epoch=epoch) if s == k]

    assert mixture_indices([50, 10], [0.5, 0.5], 20, seed=3) == mixture_indices(
        [50, 10], [0.5, 0.5], 20, 3, 0
    )
    # five epochs of ten draws from fifty samples: each sample once
    assert sorted(i for e in range(5) for i in draws(e, 0)) == list(range(50))
    assert all(draws(e, 1) == draws(0, 1) and sorted(draws(0, 1)) == list(range(10)) for e in range(3))
    assert Counter(i for e in range(10) for i in draws(e, 0)) == {i: 2 for i in range(50)}
    assert mixture_indices([50, 10], [0.5, 0.5], 20, 3, 2) != mixture_indices([50, 10], [0.5, 0.5], 20, 3, 1)

    class Source:  # sample j of source k is (k, j), of length 100 k + j
        def __init__(self, k, n):
            self.k, self.n = k, n

        def __len__(self):
            return self.n

        def __getitem__(self, j):
            return (self.k, j)

        def length(self, j):
            return 100 * self.k + j

        def is_text_only(self, j):
            return self.k == 1

    mix = MixtureDataset([Source(0, 50), Source(1, 10)], [0.5, 0.5], 20, seed=3)
    sampler = LengthGroupedSampler(mix, 4, seed=0, by_modality=True)
    for epoch in (1, 0, 4):  # any epoch, in any order (a resume starts mid-run)
        sampler.set_epoch(epoch)
        got = [mix[i] for b in sampler.batches() for i in b]
        assert sorted(got) == sorted(mixture_indices([50, 10], [0.5, 0.5], 20, 3, epoch))
        assert sampler.lengths == [100 * k + j for k, j in mix.pairs]
        assert all(len({mix[i][0] for i in b}) == 1 for b in sampler.batches())  # modalities apart


def test_cli_data_shapes_and_inspect(tmp_path, capsys):
    from modalign.cli import main

    args = ["--train", "20", "--eval", "4", "--text", "10", "--layout", "conversation", "--turns", "3",
            "--short-references", "0.5"]  # fmt: skip
    assert main(["data", "shapes", str(tmp_path / "sw"), *args]) == 0
    assert json.loads((tmp_path / "sw" / "meta.json").read_text())["short_references"] == 0.5
    rows = json.loads((tmp_path / "sw" / "instruct.json").read_text())
    rows[1]["image"] = "images/nope.png"
    rows[2]["conversations"][0]["from"] = "robot"
    (tmp_path / "sw" / "broken.json").write_text(json.dumps(rows))
    capsys.readouterr()
    assert (
        main(["data", "inspect", str(tmp_path / "sw" / "broken.json"), "--json", "--image-size", "96"]) == 0
    )
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["samples"] == 20 and report["usable"] == 18
    assert report["rejected_by_reason"] == {"missing image": 1, "unknown role": 1}
    assert 0 < report["supervised_fraction"] < 0.5
    assert main(["data", "inspect", str(tmp_path / "sw" / "broken.json"), "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "[[" in out and "train-00001: [missing image]" in out


@pytest.mark.parametrize("mode", ["squash", "pad", "crop"])
@pytest.mark.parametrize("size", [(90, 60), (60, 90)], ids=["wide", "tall"])
def test_patch_at_follows_the_resize_policy(mode, size):
    """A bright square drawn at a normalised point lands, after the processor's resize, in the
    patch ``patch_at`` names (or is cropped away exactly when it says None)."""
    cfg = VisionConfig(image_size=48, patch_size=16, resize_mode=mode, image_mean=(0.0, 0.0, 0.0),
                       image_std=(1.0, 1.0, 1.0))  # fmt: skip
    proc = ImageProcessor(cfg)
    w, h = size
    for x, y in [(0.5, 0.5), (0.1, 0.15), (0.85, 0.2), (0.3, 0.9), (0.95, 0.95)]:
        img = Image.new("RGB", size, (0, 0, 0))
        cx, cy = int(x * w), int(y * h)
        img.paste((255, 255, 255), (cx - 1, cy - 1, cx + 2, cy + 2))
        px = proc(img)[0]  # [48, 48]
        want = patch_at((cx + 0.5) / w, (cy + 0.5) / h, size, cfg)
        if px.max() < 0.5:  # the marker was cropped away
            assert want is None
            continue
        r, c = divmod(int(px.flatten().argmax()), 48)
        assert want == (r // 16) * 3 + c // 16, (mode, size, x, y)


def test_user_message_puts_images_where_the_text_names_them():
    from modalign.infer.chat import user_message

    # as many <image> as images: each goes in its place, as in a data set record
    assert (
        user_message("Compare <image> with <image>.", 2).content == f"Compare {IMAGE_MARK} with {IMAGE_MARK}."
    )
    assert user_message("Where is it?\n<image>", 1).content == f"Where is it?\n{IMAGE_MARK}"
    # none named (or a count that does not match): the images lead the text, on a line of their own
    assert user_message("What is it?", 1).content == f"{IMAGE_MARK}\nWhat is it?"
    assert user_message("a <image> b", 2).content == f"{IMAGE_MARK}{IMAGE_MARK}\na <image> b"
    assert user_message("no images", 0).content == "no images"


def test_training_examples_end_at_the_last_supervised_token(tok, image_dir, tmp_path):
    """A template's closing tokens after the last answer are dropped from training examples (they
    change no loss), never an image's placeholders; the loss of a model is the same either way."""
    from modalign import MLLMConfig
    from modalign.models.mllm import causal_lm_loss

    rows = [
        {"id": "a", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nq q"},
                                                         {"from": "gpt", "value": "a b"}]},
        {"id": "b", "image": "ok.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                                         {"from": "human", "value": "<image>"}]},
    ]  # fmt: skip
    samples = load_samples(_write(tmp_path / "t.json", rows))
    chatml = get_template("chatml")
    proc = SampleProcessor(tok, chatml, image_dir, ImageProcessor(VisionConfig(image_size=16)), IMG, 4)
    full = render(samples[0], tok, chatml, IMG, 4)
    last = max(i for i, x in enumerate(full.labels) if x != IGNORE_INDEX)
    assert last < len(full.labels) - 1  # chatml closes the reply with "\n"
    ex = proc(samples[0])
    assert ex.input_ids == full.input_ids[: last + 1] and ex.labels == full.labels[: last + 1]
    trailing_image = proc(samples[1])
    assert trailing_image.input_ids[-4:] == [IMG] * 4 and len(trailing_image.pixel_values) == 1
    cfg = MLLMConfig.from_name("tiny-llava").llm
    cfg.vocab_size = tok.vocab_size
    from modalign.models.decoder import LLM

    torch.manual_seed(0)
    llm = LLM(cfg)
    losses = [
        causal_lm_loss(llm(torch.tensor([r.input_ids])), torch.tensor([r.labels]))[0] for r in (full, ex)
    ]
    torch.testing.assert_close(losses[0], losses[1])


def test_images_are_never_lost_or_shifted_between_a_record_and_its_rendering(tok, image_dir, tmp_path):
    """The messages format takes ``image_url`` as a string too; images it lists with no placeholder
    are a count mismatch (not a text-only chat); a template that leaves out the turn holding an
    image (``plain`` drops images in replies) is a mismatch, not a shift of the images after it."""
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"id": "url-string", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "ok.png"},
                                                                        {"type": "text", "text": "what?"}]},
                                          {"role": "assistant", "content": "red"}]},
        {"id": "unplaced", "messages": [{"role": "user", "content": "what?"}, {"role": "assistant", "content": "red"}],
         "images": ["ok.png"]},
    ]))  # fmt: skip
    a, b = load_samples(tmp_path / "m.jsonl")
    assert isinstance(a, Conversation) and a.images == ["ok.png"]
    assert isinstance(b, BadSample) and b.reason == "image count mismatch" and "unplaced" in str(b)
    assert "lists 1 image(s) in 'images' but its messages have 0" in str(b)
    reply_image = Conversation([Message("user", "describe"), Message("assistant", f"{IMAGE_MARK}a red circle")],
                               ["ok.png"], "in-reply")  # fmt: skip
    proc = SampleProcessor(tok, get_template("plain"), image_dir, ImageProcessor(VisionConfig(image_size=16)), IMG,
                           image_tokens=4)  # fmt: skip
    with pytest.raises(
        BadSample, match=r"sample in-reply: the chat template \(plain\) rendered 0 of its 1 image"
    ):
        proc(reply_image)
    assert proc(Conversation([Message("user", f"{IMAGE_MARK}describe"), Message("assistant", "red")],
                             ["ok.png"], "fine")).pixel_values  # fmt: skip


def test_annotation_lines_with_wrong_shapes_name_their_line(tmp_path):
    from modalign.data.synthesize import read_annotations

    cases = [
        ('{"id": "s1", "image": "a.png", "captions": ["x"]', r"a\.jsonl:1: not a JSON object"),
        ('[1, 2]', r"a\.jsonl:1: expected a JSON object, got list"),
        ('{"id": "s1", "image": "a.png", "captions": "a red circle"}', r"a\.jsonl:1: captions must be a list of strings"),
        ('{"id": "s1", "image": "a.png", "captions": ["x"], "objects": [{"bbox": [0, 0, 0.5, 0.5]}]}',
         r"a\.jsonl:1: objects\[0\]\.category must be a non-empty string"),
        ('{"id": "s1", "image": "a.png", "objects": [{"category": "dog", "bbox": [0, 0, "1", 1]}]}',
         r"a\.jsonl:1: objects\[0\]\.bbox must be 4 numbers"),
    ]  # fmt: skip
    for line, err in cases:
        (tmp_path / "a.jsonl").write_text(line + "\n")
        with pytest.raises(ValueError, match=err):
            read_annotations(tmp_path / "a.jsonl")
    (tmp_path / "a.jsonl").write_text('{"id": 3, "image": "a.png", "captions": ["x"], "objects": [{"category": "dog", '
                                      '"bbox": [0, 0, 0.5, 1]}]}\n')  # fmt: skip
    assert read_annotations(tmp_path / "a.jsonl") == [
        {
            "id": "3",
            "image": "a.png",
            "captions": ["x"],
            "objects": [{"category": "dog", "bbox": [0, 0, 0.5, 1]}],
        }
    ]


def test_each_malformed_record_is_rejected_alone_naming_it(tok, image_dir, tmp_path, capsys):
    """Records whose fields have the wrong type, a NUL byte in a path, a lone surrogate in text, a
    line that is not UTF-8 or not JSON: under ``skip`` each is rejected with its line / id and
    reason and every good record is kept; under ``error`` the first stops with that message."""
    good = {"id": "good", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                              {"from": "gpt", "value": "yo"}]}  # fmt: skip
    lines = [
        json.dumps(good).encode(),
        json.dumps(good | {"id": "int-image", "image": 5}).encode(),
        json.dumps(good | {"id": "nul", "image": "x\u0000.png"}).encode(),
        json.dumps(good | {"id": "list-of-int", "image": ["ok.png", 3]}).encode(),
        b'{"id": "surrogate", "conversations": [{"from": "human", "value": "caf\\udcff"}, {"from": "gpt", "value": "x"}]}',
        b'{"id": "latin1", "text": "caf\xe9"}',
        b'{"id": "broken", ',
        json.dumps({"id": "msg-surrogate", "messages": [{"role": "user", "content": "a"},
                                                        {"role": "assistant", "content": "b"}]}).encode().replace(b'"b"', b'"\\ud800"'),
        json.dumps({"text": "a plain document"}).encode(),
        json.dumps(good | {"id": "good2"}).encode(),
    ]  # fmt: skip
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    samples = load_samples(path)
    assert len(samples) == len(lines)
    proc = SampleProcessor(tok, get_template("chatml"), image_dir, ImageProcessor(VisionConfig(image_size=16)),
                           IMG, image_tokens=4)  # fmt: skip
    ds = ConversationDataset(samples, proc)
    out = [ds[i] for i in range(len(ds))]
    bad = {str(x): x.reason for x in out if isinstance(x, BadSample)}
    kept = [x.id for x in out if not isinstance(x, BadSample)]
    assert kept == ["good", "mixed.jsonl:9", "good2"]
    assert len(bad) == 7
    assert any("int-image" in m and "field 'image'" in m for m in bad)
    assert any("nul" in m and r == "bad image path" for m, r in bad.items())
    assert any("surrogate" in m and r == "invalid text" and "lone surrogate" in m for m, r in bad.items())
    assert any("mixed.jsonl:6" in m and "not UTF-8" in m for m in bad)
    assert any("mixed.jsonl:7" in m and "invalid JSON" in m for m in bad)
    policy = BadSamplePolicy("error")
    policy.ok()
    with pytest.raises(BadSample, match=r"sample int-image: field 'image' must be a path"):
        policy.bad(out[1])
    # the data inspector reports them instead of crashing
    from modalign.cli import main

    assert (
        main(["data", "inspect", str(path), "--images", str(image_dir), "--template", "chatml", "--json"])
        == 0
    )
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") :])
    assert report["samples"] == 10 and report["usable"] == 3 and len(report["rejected"]) == 7
    assert report["rejected_by_reason"]["invalid text"] == 2


def test_inspect_with_a_model_renders_as_its_training_does(tok, image_dir, tmp_path, capsys):
    """``data inspect --model``: a model without vision refuses samples with images (image count
    mismatch), as its training does, instead of counting them as multimodal."""
    from modalign import MLLM, MLLMConfig
    from modalign.cli import main

    cfg = MLLMConfig.from_name("tiny-shapes")
    cfg.vision, cfg.connector = None, None
    cfg.llm.vocab_size = tok.vocab_size
    model = MLLM(cfg)
    model.save_pretrained(tmp_path / "lm")
    tok.save(tmp_path / "lm")
    rows = [{"id": "pic", "image": "ok.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red"}]},
            {"id": "txt", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]  # fmt: skip
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    assert main(["data", "inspect", str(path), "--images", str(image_dir), "--model", str(tmp_path / "lm"),
                 "--template", "chatml", "--json"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") :])
    assert report["usable"] == 1 and report["images"] == 0 and report["by_kind"] == {"text-only chat": 1}
    assert report["rejected"][0]["id"] == "pic" and report["rejected"][0]["reason"] == "image count mismatch"
