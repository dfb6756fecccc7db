"""The prefix cache: a prompt that begins with a sequence already run prefills only the rest, and
gives the tokens and logits of a prompt run whole (plain, MAM and Partial LoRA decoders, images
before, inside and after the reused part; the engine alone and the continuous batch)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modalign import MLLM
from modalign.infer.engine import Engine, Prompt, SamplingParams
from modalign.infer.prefix_cache import BLOCK, PrefixCache, block_keys
from modalign.infer.scheduler import Scheduler
from tests.infer.test_engine import full_forward_greedy, tiny_variant
from tests.infer.test_scheduler import Sink, run

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def text(n, seed):
    return torch.randint(4, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def image(seed):
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(100 + seed))


def turn(model, prompt: Prompt, reply: list[int], new_text: list[int], new_images=()) -> Prompt:
    """The next turn's prompt: the last prompt, its reply, then new text (after new images)."""
    ph, k = model.config.image_token_id, model.num_image_tokens()
    ids = prompt.input_ids + reply + sum(([ph] * k for _ in new_images), []) + new_text
    return Prompt(ids, [*prompt.pixel_values, *new_images])


@pytest.mark.parametrize("kind", ["plain", "mam", "plora"])
def test_a_chat_reuses_its_earlier_turns_and_decodes_as_without(kind):
    model = tiny_variant(kind)
    ph, k = model.config.image_token_id, model.num_image_tokens()
    cached, plain = Engine(model, prefix_cache_mb=16), Engine(model)
    params = SamplingParams(max_new_tokens=6)
    p = Prompt([1] + [ph] * k + text(20, 0), [image(0)])
    reused = []
    for i in range(4):
        got = cached.generate([p], params)[0]
        reused.append(cached.prefix.hit_tokens)
        want = plain.generate([p], params)[0]
        assert got.token_ids == want.token_ids == full_forward_greedy(model, p, 6)
        a = cached.prefill([p], 4).logits  # now from this turn's own sequence
        b = plain.prefill([p], 4).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        # turn 2 adds text, turn 3 a second image and text, turn 4 text again
        p = turn(model, p, got.token_ids, text(9 + i, i + 1), [image(i + 1)] if i == 1 else ())
    assert cached.prefix.hits >= 6 and reused[0] == 0
    # each later turn ran only what followed the last turn's whole blocks
    assert all(b > a for a, b in zip(reused, reused[1:], strict=False))


def test_a_reused_part_ends_before_an_image_it_would_cut_and_other_images_miss():
    model = tiny_variant("plain")
    ph, k = model.config.image_token_id, model.num_image_tokens()
    assert 1 + k > BLOCK  # the image's tokens run past the first block
    eng, plain = Engine(model, prefix_cache_mb=16), Engine(model)
    params = SamplingParams(max_new_tokens=1)
    eng.generate(
        [Prompt([1] + [ph] * k + [5, 6], [image(0)])], params
    )  # one block held: [1] + 15 image tokens
    assert len(eng.prefix) == 1
    p = Prompt([1] + [ph] * k + text(12, 3), [image(0)])
    before = eng.prefix.hit_tokens
    assert eng.generate([p], params)[0].token_ids == plain.generate([p], params)[0].token_ids
    assert eng.prefix.hit_tokens - before == 1  # the BOS only: the image is run whole
    other = Prompt([1] + [ph] * k + text(12, 3), [image(7)])  # the same ids, another picture
    hits = eng.prefix.hits
    eng.prefill([other], 2)
    assert eng.prefix.hits == hits
    # new weights: nothing held is reused
    with torch.no_grad():
        model.llm.layers[0].mlp.down_proj.weight.mul_(0.5)
    eng.prefill([p], 2)
    assert eng.prefix.hits == hits and len(eng.prefix) == 0


def test_the_continuous_batch_reuses_finished_requests():
    """Requests that begin with finished ones join the running batch together, each from its own
    held length (the shorter ones' slots right-aligned, the gaps masked), and decode as alone."""
    model = tiny_variant("mam")
    ph, k = model.config.image_token_id, model.num_image_tokens()
    first = Prompt([1] + [ph] * k + text(22, 5), [image(2)])
    want1 = full_forward_greedy(model, first, 8)
    second = turn(model, first, want1, text(7, 6), [image(3)])  # a second picture after the held part
    other = Prompt([1] + text(59, 9))
    ps = [first, other, second, first, other]
    lengths = [8, 9, 5, 8, 9]
    want = [full_forward_greedy(model, p, n) for p, n in zip(ps, lengths, strict=True)]
    sinks = [Sink() for _ in ps]
    sched = Scheduler(Engine(model, prefix_cache_mb=16), max_batch=4)
    reqs = [
        s.request(p, SamplingParams(max_new_tokens=n)) for s, p, n in zip(sinks, ps, lengths, strict=True)
    ]
    run(sched, {0: reqs[:2], 12: reqs[2:]})  # the last three are admitted in one step
    for s, w in zip(sinks, want, strict=True):
        assert s.error is None and s.tokens == w
    pc = sched.engine.prefix
    n, m = len(first.input_ids), len(other.input_ids)  # held: each prompt and 7 / 8 of its tokens
    assert pc.hits == 3
    assert pc.hit_tokens == (n + 7) // BLOCK * BLOCK + (n - 1) // BLOCK * BLOCK + (m - 1) // BLOCK * BLOCK
    assert (n - 1) // BLOCK != (m - 1) // BLOCK  # held parts of different lengths in one prefill
    assert sched.active == 0 and sched.cache is None
    # the next-token logits of such a prefill are those of each prompt run whole
    eng, plain = sched.engine, Engine(model)
    reuses = [eng.find_reuse(p) for p in (second, first, other)]
    assert len({u.tokens for u in reuses}) == 3  # 64, 32 and 48 tokens held
    got = eng.prefill_reused(reuses, 4).logits
    for row, p in zip(got, (second, first, other), strict=True):
        torch.testing.assert_close(row, plain.prefill([p], 4).logits[0], atol=1e-5, rtol=1e-5)


def test_a_per_image_placeholder_model_reuses_its_prompt_and_matches_golden():
    model = MLLM.from_pretrained(GOLDEN / "mplug_owl2")
    inp = load_file(str(GOLDEN / "mplug_owl2" / "inputs.safetensors"))
    exp = load_file(str(GOLDEN / "mplug_owl2" / "expected.safetensors"))
    p = Prompt(inp["multi.input_ids"][0].tolist(), list(inp["multi.pixel_values"]))
    eng = Engine(model, prefix_cache_mb=64)
    params = SamplingParams(max_new_tokens=8)
    for _ in range(2):
        assert eng.generate([p], params)[0].token_ids == exp["multi.generated_ids"][0].tolist()
    assert eng.prefix.hits == 1 and eng.prefix.hit_tokens > 0
    # in the continuous batch: the prompt expanded once, reused by the request after it
    sinks = [Sink(), Sink()]
    sched = Scheduler(Engine(model, prefix_cache_mb=64), max_batch=2)
    run(sched, {0: [sinks[0].request(p, params)], 10: [sinks[1].request(p, params)]})
    assert [s.tokens for s in sinks] == [exp["multi.generated_ids"][0].tolist()] * 2
    assert sched.engine.prefix.hits == 1 and p.input_ids == inp["multi.input_ids"][0].tolist()


def test_prefix_cache_keeps_the_newest_within_its_bound():
    def kv(n, fill=0.0):
        return [torch.full((2, n, 4), fill)], [torch.full((2, n, 4), fill)]

    keys = block_keys(list(range(64)), None, [], [])
    assert len(keys) == 4 and keys == block_keys(list(range(64)) + [7], None, [], [])
    assert block_keys(list(range(64)), 3, [b"a"], [2]) != keys  # an image's digest counts
    per_entry = 2 * 2 * 32 * 4 * 4  # k and v, 2 heads, 32 tokens, 4 dims, float32
    pc = PrefixCache(max_bytes=2 * per_entry)
    pc.put(keys[:2], *kv(40, 1.0))
    hit = pc.lookup(keys, 63)
    assert hit.tokens == 32 and hit.entry.k[0].shape == (2, 32, 4) and pc.bytes == per_entry
    assert pc.lookup(keys, 31).tokens == 16  # the prompt's last token is never reused
    pc.put(keys[:2], *kv(32, 2.0))  # held already: nothing copied
    assert len(pc) == 1 and pc.lookup(keys, 63).entry.k[0][0, 0, 0] == 1.0
    pc.put(keys[:4], *kv(64, 3.0))  # covers every block of the first: that one is dropped
    assert (
        len(pc) == 1 and pc.lookup(keys, 63).tokens == 48 and pc.lookup(keys, 40).entry.k[0][0, 0, 0] == 3.0
    )
    other = block_keys(list(range(100, 164)), None, [], [])
    pc.put(other[:1], *kv(16, 4.0))  # over the bound: the least recently used goes
    assert pc.bytes == per_entry // 2 and pc.lookup(keys, 63) is None and pc.lookup(other, 63).tokens == 16
    with pytest.raises(ValueError, match="prefix cache size"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        Engine(tiny_variant("plain"), prefix_cache_mb=-1)


def test_a_reply_the_caller_stops_reading_is_kept_and_a_failed_copy_fails_nothing(monkeypatch):
    model = tiny_variant("plain")
    eng = Engine(model, prefix_cache_mb=16)
    p = Prompt([1] + text(30, 4))
    gen = eng.stream([p], SamplingParams(max_new_tokens=8))
    got = [next(gen)[0] for _ in range(4)]  # a stop string or token found after four tokens
    gen.close()
    assert len(eng.prefix) == 1  # the prompt and the three tokens fed back: two blocks
    nxt = Prompt(p.input_ids + got + text(5, 5))
    assert eng.generate([nxt], SamplingParams(max_new_tokens=3))[0].token_ids == full_forward_greedy(
        model, nxt, 3
    )
    assert eng.prefix.hit_tokens == (len(p.input_ids) + 3) // BLOCK * BLOCK

    def fail(*a, **k):
        raise MemoryError("no room")

    held = len(eng.prefix)
    monkeypatch.setattr(PrefixCache, "put", fail)
    other = Prompt([1] + text(40, 6))
    assert eng.generate([other], SamplingParams(max_new_tokens=3))[0].token_ids == full_forward_greedy(
        model, other, 3
    )
    sink = Sink()
    sched = Scheduler(eng, max_batch=2)
    run(sched, {0: [sink.request(other, SamplingParams(max_new_tokens=3))]})
    assert (
        sink.error is None and sink.end == "length" and len(eng.prefix) == held
    )  # kept nothing, failed nothing


def test_a_sliding_window_model_reuses_one_request_at_a_time():
    """Rows prefilled together from held parts of different lengths have gaps inside them, and a
    sliding window counts slots: such a model's requests are prefilled from the cache one by one."""
    model = tiny_variant("plain")
    model.config.llm.sliding_window = 8
    model.config.llm.layer_types = ["sliding", "full"]
    for i, layer in enumerate(model.llm.layers):
        layer.self_attn.sliding = model.config.llm.layer_types[i] == "sliding"
    first, other = Prompt([1] + text(30, 7)), Prompt([1] + text(52, 8))
    later = [Prompt(first.input_ids + text(6, 9)), Prompt(other.input_ids + text(3, 10))]
    runs = {}
    for mb in (0, 16):
        sinks = [Sink() for _ in range(4)]
        sched = Scheduler(Engine(model, prefix_cache_mb=mb), max_batch=4)
        reqs = [s.request(p, SamplingParams(max_new_tokens=4), logprobs=0)
                for s, p in zip(sinks, [first, other, *later], strict=True)]  # fmt: skip
        run(sched, {0: reqs[:2], 8: reqs[2:]})
        assert all(s.error is None for s in sinks)
        runs[mb] = sinks
        if mb:
            assert sched.engine.prefix.hits == 2
    for a, b in zip(runs[0], runs[16], strict=True):
        assert a.tokens == b.tokens
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x["logprob"] - y["logprob"]) < 1e-5


def test_a_request_whose_admission_fails_after_its_row_is_placed_fails_alone():
    model = tiny_variant("plain")
    sched = Scheduler(Engine(model, prefix_cache_mb=16), max_batch=3)
    good, bad = Sink(), Sink()

    def boom(t, lp):
        raise RuntimeError("the client's queue is gone")

    p = Prompt([1] + text(20, 11))
    reqs = [
        good.request(p, SamplingParams(max_new_tokens=5)),
        bad.request(p, SamplingParams(max_new_tokens=5)),
    ]
    reqs[1].on_token = boom
    run(sched, {0: reqs})
    assert good.error is None and good.tokens == full_forward_greedy(model, p, 5)
    assert isinstance(bad.error, RuntimeError) and bad.end is None  # failed once, never decoded on
    assert sched.active == 0 and sched.cache is None
