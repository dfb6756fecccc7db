"""Training an encoder-decoder LLM (BLIP-2 Flan-T5's stage 2): the lm objective gives the encoder
everything before the last reply and trains the decoder on that reply; its loss equals
transformers' ``Blip2ForConditionalGeneration`` (T5) loss on the same ids."""

import pytest
import torch

from modalign import MLLM
from modalign.data.collate import collate
from modalign.data.conversation import IGNORE_INDEX, BadSample, get_template
from modalign.data.datasets import Example, load_samples
from modalign.data.images import ImageProcessor
from modalign.data.tokenizer import Tokenizer
from modalign.train.objectives.lm import LMObjective, seq2seq_processor, to_seq2seq
from tests.helpers import randomize, transformers

IMG = 410


def blip2_t5(tmp_path):
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7)  # fmt: skip
    qc = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              encoder_hidden_size=32, cross_attention_frequency=1)  # fmt: skip
    tc = transformers.T5Config(vocab_size=420, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                               num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)  # fmt: skip
    cfg = transformers.Blip2Config(vision_config=vc, qformer_config=qc, text_config=tc.to_dict(), num_query_tokens=4,
                                   image_token_index=IMG)  # fmt: skip
    torch.manual_seed(0)
    ref = randomize(transformers.Blip2ForConditionalGeneration(cfg)).eval()
    ref.save_pretrained(tmp_path / "t5")
    return ref, MLLM.from_pretrained(tmp_path / "t5", dtype=torch.float32).eval()


def test_to_seq2seq_splits_at_the_last_reply():
    ex = Example("s", [1, 5, 6, 7, 8, 9, 10, 11, 12], [-100, -100, 6, 7, -100, -100, 10, 11, -100])
    got = to_seq2seq(ex)
    assert got.input_ids == [1, 5, 6, 7, 8, 9] and got.labels == [10, 11]  # earlier turns are context
    with pytest.raises(BadSample, match="no supervised token"):
        to_seq2seq(Example("t", [1, 2], [IGNORE_INDEX, IGNORE_INDEX]))


def test_t5_stage_loss_equals_transformers(tmp_path, world):
    ref, ours = blip2_t5(tmp_path)
    tok = Tokenizer.from_dir(world / "tokenizer")
    template = get_template("blip2", tok)
    proc = seq2seq_processor()(tok, template, world, ImageProcessor(ours.config.vision), IMG, 4, 96)
    samples = [s for s in load_samples(world / "instruct.json") if len(s.images) == 1][:3]
    batch = collate([proc(s) for s in samples], tok.pad_id)
    assert batch["input_ids"].eq(IMG).sum(1).tolist() == [4, 4, 4]  # the queries' placeholders, encoder side
    loss, n = LMObjective(ours)(batch)
    with torch.no_grad():
        want = ref(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                   attention_mask=batch["attention_mask"], labels=batch["labels"])  # fmt: skip
    assert n == int((batch["labels"] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, want.loss, atol=1e-5, rtol=1e-5)
    # the decoder is trained on the last reply only: each row's labels are one reply and its EOS
    reply = samples[0].messages[-1].content
    row = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert row == tok.encode(reply) + [tok.eos_id]


def test_a_t5_folder_is_an_llm_part(tmp_path):
    """A text-only Flan-T5 folder loads as a model and as a recipe's ``init.llm`` (BLIP-2 Flan-T5)."""
    from modalign.checkpoints.parts import build_from_parts, merge_part_configs
    from modalign.config import MLLMConfig

    ref, blip = blip2_t5(tmp_path)
    t5 = transformers.T5ForConditionalGeneration(ref.config.text_config)
    t5.load_state_dict(ref.language_model.state_dict())
    t5.eval()
    t5.save_pretrained(tmp_path / "flan-t5")
    alone = MLLM.from_pretrained(tmp_path / "flan-t5", dtype=torch.float32).eval()
    ids, dec = torch.randint(3, 400, (2, 7)), torch.randint(3, 400, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(alone(ids, decoder_input_ids=dec).logits, t5(input_ids=ids, decoder_input_ids=dec).logits,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    init = {"llm": str(tmp_path / "flan-t5")}
    cfg = MLLMConfig.from_dict(merge_part_configs(blip.config.to_dict(), init))
    model = build_from_parts(cfg, init, seed=0)
    for k, v in blip.llm.state_dict().items():
        assert torch.equal(model.llm.state_dict()[k], v), k


def test_t5_stage_through_the_trainer_uses_the_frozen_towers_cache(tmp_path, world):
    """A stage with the tower frozen runs it once per image (the feature cache, on by default);
    the encoder-decoder path must read the cached features, not the blank stand-in pixels: the
    losses equal a run with the cache off."""
    import json

    from modalign.train.recipe import load_recipe
    from modalign.train.run import run_recipe

    blip2_t5(tmp_path)
    losses = []
    for mb in (256, 0):
        doc = {"name": "t5", "seed": 0, "model": {"preset": "tiny-shapes", "tokenizer": str(world / "tokenizer"),
                                                   "init": {"all": str(tmp_path / "t5")}},
               "stages": [{"name": "s", "trainable": ["connector.*"], "stop": {"max_steps": 3}, "optim": {"lr": 1e-3},
                           "data": {"sources": [{"path": str(world / "instruct.json")}], "template": "blip2",
                                    "batch_size": 4, "feature_cache_mb": mb}}]}  # fmt: skip
        run_recipe(load_recipe(doc), tmp_path / f"run{mb}", progress=False)
        rows = (tmp_path / f"run{mb}" / "s" / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(r)["loss"] for r in rows if '"loss"' in r])
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_prefix_lm_splits_the_reply_between_encoder_and_decoder():
    """BLIP-2's prefix LM: a caption's first part joins the encoder's input, the rest is the target;
    the split is drawn per sample (the same each epoch) from the inner token boundaries."""
    ex = Example("cap-7", [410, 410, 5, 6, 7, 8, 2], [-100, -100, 5, 6, 7, 8, 2])
    cuts = set()
    for seed in range(30):
        got = to_seq2seq(ex, prefix_seed=seed)
        assert got.input_ids + got.labels == ex.input_ids  # nothing lost, nothing repeated
        assert got.input_ids[:2] == [410, 410] and len(got.labels) >= 2 and got.labels[-1] == 2
        cuts.add(len(got.input_ids))
        assert to_seq2seq(ex, prefix_seed=seed).labels == got.labels  # deterministic
    assert cuts == {3, 4, 5}  # after 1, 2 or 3 of the caption's 4 words
    short = Example("s", [410, 9, 2], [-100, 9, 2])
    assert to_seq2seq(short, prefix_seed=0).labels == [9, 2]  # one word: not split
