"""Flamingo-style gated cross-attention (models/xattn.py): identity at initialisation, media-aware
masking, generation through the KV cache (engine and continuous batching), save/load, a frozen
decoder in training, a decoder released without the blocks, and a reference check against
OpenFlamingo's own modules (where the open-flamingo package is installed) and against the masking
rule written out."""

import importlib.util
from pathlib import Path

import pytest
import torch

from modalign import MLLM, MLLMConfig, PlaceholderMismatch
from modalign.config import ConnectorConfig, CrossAttentionConfig, LLMConfig, VisionConfig
from modalign.infer.engine import Engine, Prompt, SamplingParams
from modalign.infer.fast_decode import supported
from modalign.models.decoder import LLM
from modalign.models.layers import positions_from_mask
from modalign.models.xattn import GatedCrossAttentionBlock, Media
from tests.models.fusion import (
    continuous_batching_matches_greedy,
    decoder_without,
    greedy_without_cache,
    mixed_prompts,
    packed_row_matches_samples_alone,
    pixels,
    save_load_round_trip,
    two_rows,
)

IMG = 5  # the image token: an ordinary id of the vocabulary


def config(every=2, only_immediate=True, layers=4, media_dim=None, hidden=40) -> MLLMConfig:
    """A tiny Flamingo: 16-px images in 4 patches, a 32-wide tower, a 3-latent resampler, a
    ``hidden``-wide decoder with gated blocks before every ``every``-th layer."""
    xattn = CrossAttentionConfig(every=every, num_heads=2, head_dim=12, intermediate_size=80,
                                 media_dim=media_dim, only_immediate=only_immediate)  # fmt: skip
    return MLLMConfig(
        llm=LLMConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_layers=layers, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=128, cross_attention=xattn),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=16,
                            patch_size=8),
        connector=ConnectorConfig(type="resampler", num_queries=3, num_layers=2, num_heads=2, head_dim=12,
                                  hidden_size=32, intermediate_size=64, layer_norm_eps=1e-5,
                                  output_proj=media_dim is None),
        image_token_id=IMG,
        fusion="cross_attention",
    )  # fmt: skip


def blocks(m: MLLM) -> dict[int, GatedCrossAttentionBlock]:
    return {i: la.gated_cross_attn for i, la in enumerate(m.llm.layers) if la.gated_cross_attn is not None}


def tiny(seed=0, open_gates=False, **kw) -> MLLM:
    torch.manual_seed(seed)
    m = MLLM(config(**kw)).eval()
    if open_gates:  # as after training: the images now matter
        with torch.no_grad():
            for b in blocks(m).values():
                b.attn_gate.fill_(2.0)
                b.ff_gate.fill_(-0.7)
    return m


def base_llm(m: MLLM) -> LLM:
    """The same decoder without its cross-attention blocks."""
    return decoder_without(m, "cross_attention", ".gated_cross_attn.")


IDS, MASK = two_rows(IMG)


# ------------------------------------------------------------------------------ structure


def test_blocks_go_before_every_nth_layer_with_closed_gates():
    assert sorted(blocks(tiny(every=2))) == [1, 3]  # OpenFlamingo: (layer + 1) % every == 0
    assert sorted(blocks(tiny(every=1))) == [0, 1, 2, 3]
    assert sorted(blocks(tiny(every=3, layers=6))) == [2, 5]
    for b in blocks(tiny()).values():
        assert b.attn_gate.item() == 0.0 and b.ff_gate.item() == 0.0
    names = [n for n, _ in tiny().named_parameters() if ".gated_cross_attn." in n]
    assert "llm.layers.1.gated_cross_attn.attn.to_kv.weight" in names and all(
        n.startswith("llm.layers.") for n in names
    )


def test_config_round_trips_and_is_checked():
    cfg = config()
    assert MLLMConfig.from_dict(cfg.to_dict()) == cfg
    bad = config()
    bad.llm.cross_attention = None
    with pytest.raises(ValueError, match="needs llm.cross_attention"):
        MLLM(bad)
    bad = config()
    bad.image_token_id = -200
    with pytest.raises(ValueError, match="image_token_id in the vocabulary"):
        MLLM(bad)
    bad = config()
    bad.fusion = "interleave"
    with pytest.raises(ValueError, match="unknown fusion"):
        MLLM(bad)
    m = tiny()
    assert m.num_image_tokens() == 1  # the image token itself; the latents go to the blocks
    with pytest.raises(PlaceholderMismatch, match="3 image token"):
        m(IDS, pixels(2), MASK)


# ------------------------------------------------------------------------------ identity at init


@pytest.mark.parametrize("every", [1, 2])
def test_fresh_blocks_leave_the_decoder_exactly_as_it_was(every):
    m = tiny(every=every)
    base = base_llm(m)
    with torch.no_grad():
        got = m(IDS, pixels(3), MASK).logits
        want = base(IDS, attention_mask=MASK)
        assert torch.equal(got, want)
        assert torch.equal(m(IDS[:, :3]).logits, base(IDS[:, :3]))  # text only
        m.train()  # training builds the media even without images (the blocks stay in the graph)
        assert torch.equal(m(IDS[:, :3]).logits, base(IDS[:, :3]))


# ------------------------------------------------------------------------------ media-aware masking


def test_text_sees_images_only_after_them():
    """Changing image A changes the logits from its token on, never before; changing image B
    (row 0's second) changes them from B's token on."""
    m = tiny(open_gates=True)
    px = pixels(3)
    with torch.no_grad():
        ref = m(IDS, px, MASK).logits
        a = px.clone()
        a[0] = torch.randn(3, 16, 16)
        got = m(IDS, a, MASK).logits
        assert torch.equal(got[0, :3], ref[0, :3])  # before A
        assert (got[0, 3:] - ref[0, 3:]).abs().amax(-1).min() > 1e-4  # A's token and after
        assert torch.equal(got[1], ref[1])  # the other row
        b = px.clone()
        b[1] = torch.randn(3, 16, 16)
        got = m(IDS, b, MASK).logits
        assert torch.equal(got[0, :6], ref[0, :6])
        assert (got[0, 6:] - ref[0, 6:]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("only_immediate", [True, False])
def test_a_token_reads_the_image_before_it(only_immediate):
    """At the first block (before layer 0: its input is the token embeddings, no self-attention
    has mixed positions yet) a token after image B reads B's latents only (Flamingo), or A's and
    B's (``only_immediate: false``); tokens before A read none."""
    m = tiny(open_gates=True, every=1, only_immediate=only_immediate)
    seen = []
    hook = m.llm.layers[0].gated_cross_attn.register_forward_hook(lambda mod, inp, out: seen.append(out))
    px = pixels(3)
    a, b = px.clone(), px.clone()
    a[0], b[1] = torch.randn(3, 16, 16), torch.randn(3, 16, 16)
    with torch.no_grad():
        for p in (px, a, b):
            m(IDS, p, MASK)
    hook.remove()
    ref, by_a, by_b = (x[0] for x in seen)

    def changed(x):
        return ((x - ref).abs().amax(-1) > 0).tolist()

    assert changed(by_a) == [False] * 3 + [True] * 3 + [not only_immediate] * 3
    assert changed(by_b) == [False] * 6 + [True] * 3


def reference_attention(block: GatedCrossAttentionBlock, x, latents, time, only_immediate, first=None):
    """The cross-attention written out token by token: the latents of the images a token may
    see, softmax(q k / sqrt(d)) v per head, zero where it may see none."""
    att = block.attn
    h, d = att.heads, att.head_dim
    out = torch.zeros(*x.shape[:2], h * d)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            k_img = int(time[b, t])
            lo = 1 if first is None else int(first[b, t])
            images = [k_img] if only_immediate else list(range(lo, k_img + 1))
            images = [j for j in images if lo <= j <= k_img and j > 0]
            if not images:
                continue
            lat = torch.cat([latents[b, j - 1] for j in images])
            q = att.to_q(att.norm(x[b, t])).view(h, d)
            k, v = att.to_kv(lat).view(len(lat), 2, h, d).unbind(1)
            w = torch.einsum("hd,nhd->hn", q, k).mul(d**-0.5).softmax(-1)
            out[b, t] = torch.einsum("hn,nhd->hd", w, v).reshape(-1)
    return att.to_out(out)


@pytest.mark.parametrize("only_immediate", [True, False])
def test_masked_cross_attention_equals_the_rule_written_out(only_immediate):
    torch.manual_seed(0)
    cfg = CrossAttentionConfig(num_heads=2, head_dim=12, media_dim=24, only_immediate=only_immediate)
    block = GatedCrossAttentionBlock(cfg, 40, 0)
    ids = torch.tensor([[3, IMG, 4, 4, IMG, 4, IMG, 4], [3, 3, 4, IMG, 4, 4, 4, 4], [3, 3, 3, 3, 3, 3, 3, 3]])
    lat = torch.randn(4, 5, 24)  # 3 images in row 0, 1 in row 1, none in row 2
    media = Media.from_ids(ids, IMG, lat)
    assert media.latents.shape == (3, 3, 5, 24) and torch.equal(media.latents[1, 0], lat[3])
    x = torch.randn(3, 8, 40)
    with torch.no_grad():
        got = block.attn(x, media, only_immediate, 0)
        want = reference_attention(block, x, media.latents, media.time, only_immediate)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2], torch.zeros_like(got[2]))  # no image: nothing read


def test_gated_block_adds_tanh_gated_attention_then_a_tanh_gated_feed_forward():
    """Flamingo's gated xattn-dense block written out: y = x + tanh(a) * attn(x);
    out = y + tanh(f) * W2 gelu(W1 LayerNorm(y)); without images only the feed-forward term."""
    import torch.nn.functional as F

    torch.manual_seed(1)
    cfg = CrossAttentionConfig(num_heads=2, head_dim=12, media_dim=24, only_immediate=True)
    block = GatedCrossAttentionBlock(cfg, 40, 0)
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.4)
        block.ff.norm.weight.normal_()
        block.ff.norm.bias.normal_()
    ids = torch.tensor([[3, IMG, 4, 4, IMG, 4], [3, 3, IMG, 4, 4, 4]])
    media = Media.from_ids(ids, IMG, torch.randn(3, 5, 24))
    x = torch.randn(2, 6, 40)

    def ff(y):
        n = F.layer_norm(y, (40,), block.ff.norm.weight, block.ff.norm.bias, block.ff.norm.eps)
        return F.gelu(n @ block.ff.fc_in.weight.T) @ block.ff.fc_out.weight.T

    with torch.no_grad():
        y = x + torch.tanh(torch.tensor(0.7)) * reference_attention(block, x, media.latents, media.time, True)
        want = y + torch.tanh(torch.tensor(-0.4)) * ff(y)
        torch.testing.assert_close(block(x, media), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            block(x, None), x + torch.tanh(torch.tensor(-0.4)) * ff(x), atol=1e-5, rtol=1e-5
        )


def test_perceiver_resampler_equals_openflamingos_rule_written_out():
    """OpenFlamingo's resampler: per layer the latents attend (queries from the normed latents) over
    concat(normed media, normed latents), keys and values the two halves of one projection, then
    a residual GELU feed-forward; a final LayerNorm, then the output projection."""
    import torch.nn.functional as F

    from modalign.models.connectors import PerceiverResampler

    torch.manual_seed(2)
    cfg = ConnectorConfig(type="resampler", num_queries=3, num_layers=2, num_heads=2, head_dim=8, hidden_size=16,
                          intermediate_size=24, output_proj=True)  # fmt: skip
    r = PerceiverResampler(cfg, d_vis=12, d_llm=20, num_features=5)
    with torch.no_grad():
        r.pos.normal_()
        for m in r.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_()
                m.bias.normal_()
    feats = torch.randn(2, 5, 12)

    def ln(t, m):
        return F.layer_norm(t, (16,), m.weight, m.bias, m.eps)

    with torch.no_grad():
        x = feats @ r.input_proj.weight.T + r.input_proj.bias + r.pos
        want = []
        for n in range(2):
            lat = r.latents.clone()
            for layer in r.layers:
                xm, lm = ln(x[n], layer.norm_media), ln(lat, layer.norm_latents)
                kv = torch.cat([xm, lm]) @ layer.to_kv.weight.T
                k, v = kv[:, :16], kv[:, 16:]  # OpenFlamingo: to_kv(...).chunk(2, dim=-1)
                q = lm @ layer.to_q.weight.T
                heads = []
                for h in range(2):
                    sl = slice(8 * h, 8 * h + 8)
                    w = (q[:, sl] * 8**-0.5 @ k[:, sl].T).softmax(-1)
                    heads.append(w @ v[:, sl])
                lat = lat + torch.cat(heads, -1) @ layer.to_out.weight.T
                lat = lat + F.gelu(ln(lat, layer.ff_norm) @ layer.ff_in.weight.T) @ layer.ff_out.weight.T
            want.append(ln(lat, r.norm) @ r.proj.weight.T + r.proj.bias)
        torch.testing.assert_close(r(feats), torch.stack(want), atol=1e-5, rtol=1e-5)
    assert r(feats).shape == (2, 3, 20) and r.num_output_tokens(5) == 3


def test_packed_rows_see_only_their_own_samples_images():
    """Packed rows (``seq_ids``): a sample's tokens never read an earlier sample's image."""
    torch.manual_seed(0)
    ids = torch.tensor([[IMG, 4, 4, 3, 4, IMG, 4, 0]])
    seq = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0]])
    media = Media.from_ids(ids, IMG, torch.randn(2, 5, 24), seq)
    assert media.time.tolist() == [[1, 1, 1, 0, 0, 2, 2, 0]]
    block = GatedCrossAttentionBlock(
        CrossAttentionConfig(num_heads=2, head_dim=12, media_dim=24, only_immediate=False), 40, 0
    )
    x = torch.randn(1, 8, 40)
    with torch.no_grad():
        got = block.attn(x, media, False, 0)
        want = reference_attention(block, x, media.latents, media.time, False, media.first)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_packed_row_gives_each_sample_its_own_logits():
    packed_row_matches_samples_alone(tiny(open_gates=True), IMG, pixels(2))


# ------------------------------------------------------------------------------ generation


def flamingo_prompts():
    return mixed_prompts(IMG, pixels(4, seed=3))


def test_a_cross_attention_batch_drops_its_free_rows_while_requests_keep_waiting():
    """Rows of a batch with cross-attention latents are never taken over (new rows are appended):
    under a steady queue the finished rows are still dropped, so the batch stays within twice
    ``max_batch`` rows while a long request runs, and every request gets its greedy tokens."""
    from modalign.infer.scheduler import Scheduler
    from tests.infer.test_scheduler import Sink

    m = tiny(open_gates=True)
    ps = flamingo_prompts()
    sched = Scheduler(Engine(m), max_batch=3, headroom=4)
    long = Sink()
    sched.add(long.request(ps[1], SamplingParams(max_new_tokens=30)))
    shorts, sizes = [], []
    for _ in range(30):
        while len(sched.waiting) < 3:  # a queue that never empties
            shorts.append((Sink(), ps[len(shorts) % 4]))
            sched.add(shorts[-1][0].request(shorts[-1][1], SamplingParams(max_new_tokens=2)))
        sched.step()
        sizes.append(len(sched.rows))
    assert max(sizes) <= 2 * 3 and len(shorts) > 20
    assert long.tokens == greedy_without_cache(m, ps[1].input_ids, ps[1].pixel_values, 30)
    for sink, p in shorts:
        if sink.end is not None:
            assert sink.tokens == greedy_without_cache(m, p.input_ids, p.pixel_values, 2)


def test_generation_with_the_cache_equals_a_greedy_loop_without():
    m = tiny(open_gates=True)
    prompts = flamingo_prompts()
    want = [greedy_without_cache(m, p.input_ids, p.pixel_values, 6) for p in prompts]
    assert all(IMG not in w for w in want)  # (a generated image token would have no image)
    eng = Engine(m)
    got = [c.token_ids for c in eng.generate(prompts, SamplingParams(max_new_tokens=6))]
    assert got == want
    pre = eng.prefill(prompts[:2], 4)
    assert pre.cache.media is not None and not supported(m.llm, pre.cache)  # the module path
    assert sorted(pre.cache.media.kv) == sorted(blocks(m))  # keys/values projected once
    # the images matter: other pixels, other tokens
    other = [Prompt(p.input_ids, [torch.randn(3, 16, 16) for _ in p.pixel_values]) for p in prompts]
    assert [c.token_ids for c in eng.generate(other, SamplingParams(max_new_tokens=6))] != got


def test_continuous_batching_keeps_each_rows_images():
    continuous_batching_matches_greedy(tiny(open_gates=True), flamingo_prompts())


# ------------------------------------------------------------------------------ checkpoints, training


def test_save_load_round_trip(tmp_path):
    save_load_round_trip(tiny(open_gates=True), tmp_path / "m", "cross_attention", IDS, pixels(3), MASK)


def test_a_frozen_decoder_trains_only_the_blocks_and_connector():
    from modalign.train.freeze import apply_trainable

    m = tiny().train()
    apply_trainable(m, ["connector.*", "llm.layers.*.gated_cross_attn.*"])
    out = m(IDS, pixels(3), MASK, labels=IDS.masked_fill(MASK == 0, -100))
    assert out.num_tokens == 6 + 6  # the image tokens' labels are ignored (as the padding's)
    out.loss.backward()
    named = dict(m.named_parameters())
    assert all(p.grad is None for n, p in named.items() if not (n.startswith("connector.") or ".gated_" in n))
    for b in blocks(m).values():  # closed gates: only the gates learn at first, as in Flamingo
        assert b.attn_gate.grad.abs().item() > 0 and b.ff_gate.grad.abs().item() > 0
    m.zero_grad()
    m(IDS[:, :3], labels=IDS[:, :3]).loss.backward()  # no image: the blocks stay in the graph (DDP)
    assert all(p.grad is not None for n, p in named.items() if ".gated_" in n)


def test_the_trainers_objective_trains_the_blocks_padded_and_packed():
    """LMObjective (the trainer's loss) on a padded and on a packed batch of the same samples:
    the loss of MLLM.forward, and gradients on the gates (the images reach the blocks)."""
    from modalign.data.collate import collate
    from modalign.data.datasets import Example
    from modalign.train.objectives.lm import LMObjective

    m = tiny(open_gates=True).train()
    rows = [[1, 7, 8, IMG, 9, 10, IMG, 11, 12], [1, 13, 14, IMG, 15, 16, 17], [1, 20, 21, 22]]
    exs = [Example(f"s{i}", r, [-100 if t == IMG else t for t in r], list(pixels(r.count(IMG), seed=10 + i)),
                   image_keys=[f"s{i}-{k}" for k in range(r.count(IMG))]) for i, r in enumerate(rows)]  # fmt: skip
    flat, packed = collate(exs, 0), collate(exs, 0, pack_length=32)
    assert packed["input_ids"].shape[0] == 1
    losses = []
    for batch in (flat, packed):
        m.zero_grad(set_to_none=True)
        loss, n = LMObjective(m)(batch)
        loss.backward()
        losses.append(loss.item())
        assert all(b.attn_gate.grad.abs().item() > 0 for b in blocks(m).values())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.connector.parameters())
    want = m(flat["input_ids"], flat["pixel_values"], flat["attention_mask"], labels=flat["labels"]).loss
    assert abs(losses[0] - want.item()) < 1e-6
    # packed: each sample's first label is ignored (nothing is predicted across samples); here those
    # are BOS labels of the padded batch's rows, so drop them there and the two losses agree
    first_off = flat["labels"].clone()
    first_off[:, 0] = -100
    want = m(flat["input_ids"], flat["pixel_values"], flat["attention_mask"], labels=first_off).loss
    assert abs(losses[1] - want.item()) < 1e-5


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    m = tiny(open_gates=True).train()
    losses, grads = [], []
    for ckpt in (False, True):
        m.zero_grad()
        m.llm.gradient_checkpointing = ckpt
        loss = m(IDS, pixels(3), MASK, labels=IDS).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(blocks(m)[1].attn.to_kv.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_a_released_decoder_gets_fresh_blocks(tmp_path):
    """``model.init.llm`` from a text-only decoder: the blocks are added after loading it, so the
    model starts as that decoder exactly."""
    from modalign.checkpoints.parts import build_from_parts

    text = MLLMConfig(llm=MLLMConfig.from_dict(config().to_dict()).llm)
    text.llm.cross_attention = None
    torch.manual_seed(5)
    lm = MLLM(text).eval()
    lm.save_pretrained(tmp_path / "lm")
    cfg = config(media_dim=32)
    m = build_from_parts(cfg, {"llm": str(tmp_path / "lm")}, seed=0).eval()
    assert sorted(blocks(m)) == [1, 3] and m.config.llm.cross_attention == cfg.llm.cross_attention
    assert m.connector.proj.__class__.__name__ == "Identity"  # OpenFlamingo: latents at the vision width
    with torch.no_grad():
        assert torch.equal(m(IDS, pixels(3), MASK).logits, lm(IDS, attention_mask=MASK).logits)


def test_a_loaded_model_trains_its_blocks_on_text_only_batches():
    """A stage starting from a saved model gets it in eval mode and trains its parts through the
    objective: text-only batches still reach every block (DDP needs each parameter's gradient)."""
    from modalign.data.collate import collate
    from modalign.data.datasets import Example
    from modalign.train.objectives.lm import LMObjective

    m = tiny(open_gates=True)  # eval mode, as MLLM.from_pretrained returns it
    obj = LMObjective(m).train()
    batch = collate([Example("t", [1, 20, 21, 22], [1, 20, 21, 22], [], image_keys=[])], 0)
    loss, _ = obj(batch)
    loss.backward()
    for b in blocks(m).values():
        assert b.attn_gate.grad is not None and b.attn.to_kv.weight.grad is not None


def test_adding_blocks_checks_the_model_first():
    from modalign.models.xattn import enable_cross_attention

    plain = config()
    plain.llm.cross_attention, plain.fusion = None, "splice"
    m = MLLM(plain)
    with pytest.raises(ValueError, match="32-wide media .* connector gives 40"):
        enable_cross_attention(m, CrossAttentionConfig(every=2, num_heads=2, head_dim=12, media_dim=32))
    assert m.config.fusion == "splice" and not blocks(m)  # nothing changed
    m.config.image_token_id = None
    with pytest.raises(ValueError, match="image_token_id in the vocabulary"):
        enable_cross_attention(m, CrossAttentionConfig(every=2, num_heads=2, head_dim=12))


# ------------------------------------------------------------------------------ OpenFlamingo


def open_flamingo_helpers():
    """OpenFlamingo's ``src/helpers.py`` (perceiver, masked cross-attention, gated block), loaded
    from the installed package by path: the package's ``__init__`` also imports open_clip and a
    transformers factory that these modules do not need."""
    spec = importlib.util.find_spec("open_flamingo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-flamingo is not installed")
    pytest.importorskip("einops")
    pytest.importorskip("einops_exts")
    path = Path(next(iter(spec.submodule_search_locations))) / "src" / "helpers.py"
    mod_spec = importlib.util.spec_from_file_location("_open_flamingo_helpers", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def copy_from_open_flamingo(m: MLLM, perceiver, of_blocks) -> None:
    def put(dst, src):
        dst.load_state_dict(src.state_dict())

    res = m.connector
    with torch.no_grad():
        res.latents.copy_(perceiver.latents)
        res.pos.zero_()
        for ours, (attn, ff) in zip(res.layers, perceiver.layers, strict=True):
            for name in ("norm_media", "norm_latents", "to_q", "to_kv", "to_out"):
                put(getattr(ours, name), getattr(attn, name))
            put(ours.ff_norm, ff[0]), put(ours.ff_in, ff[1]), put(ours.ff_out, ff[3])
        put(res.norm, perceiver.norm)
        for i, b in blocks(m).items():
            ref = of_blocks[i]
            for name in ("norm", "to_q", "to_kv", "to_out"):
                put(getattr(b.attn, name), getattr(ref.attn, name))
            put(b.ff.norm, ref.ff[0]), put(b.ff.fc_in, ref.ff[1]), put(b.ff.fc_out, ref.ff[3])
            b.attn_gate.copy_(ref.attn_gate)
            b.ff_gate.copy_(ref.ff_gate)


def test_matches_open_flamingo(capsys):
    """OpenFlamingo's PerceiverResampler and GatedCrossAttentionBlocks (weights copied in), run as
    its FlamingoLayer runs them (the block, then the decoder layer) around modalign's decoder
    layers, give modalign's logits; and its cached-media step gives modalign's decode step."""
    of = open_flamingo_helpers()
    torch.manual_seed(0)
    m = tiny(media_dim=32)  # latents at the tower's width, as OpenFlamingo keeps them
    perceiver = of.PerceiverResampler(dim=32, depth=2, dim_head=12, heads=2, num_latents=3, ff_mult=2)
    of_blocks = {i: of.GatedCrossAttentionBlock(dim=40, dim_visual=32, dim_head=12, heads=2, ff_mult=2)
                 for i in blocks(m)}  # fmt: skip
    with torch.no_grad():
        for i, b in of_blocks.items():
            b.attn_gate.fill_(0.9 + 0.1 * i)
            b.ff_gate.fill_(-0.6)
    copy_from_open_flamingo(m, perceiver, of_blocks)
    m.eval()
    px = pixels(3)
    with torch.no_grad():
        feats = m.vision(px)  # [3, 4, 32]
        ours_lat = m.connector(feats)
        # OpenFlamingo's layout: [B, T_img, F, v, D]; row 1 has one image (its second is never read)
        vis = torch.stack([feats[:2], torch.stack([feats[2], torch.zeros_like(feats[2])])])[:, :, None]
        of_lat = perceiver(vis)  # [B, T_img, n, D]
        d_perceiver = (of_lat[0] - ours_lat[:2]).abs().max().item()
        d_perceiver = max(d_perceiver, (of_lat[1, 0] - ours_lat[2]).abs().max().item())

        base = base_llm(m)
        x = base.embed_tokens(IDS)
        cos, sin = base.rotary(positions_from_mask(MASK, 0, IDS.shape[1], x.device), x.dtype)
        masks = base._masks(MASK, *IDS.shape, 0, x.device)
        for i, layer in enumerate(base.layers):
            if i in of_blocks:
                x = of_blocks[i](x, of_lat, media_locations=IDS == IMG)
            x = layer(x, None, cos, sin, masks, None, 0)
        want = base.lm_head(base.norm(x))
        got = m(IDS, px, MASK).logits
        d_logits = (got - want).abs().max().item()

        # a decode step after the prompt: OpenFlamingo's use_cached_media, modalign's cached media
        new = torch.randn(2, 3, 40)
        media = Media.from_ids(IDS, IMG, ours_lat).for_cache().step(2, 3)
        d_step = max((blocks(m)[i](new, media) - of_blocks[i](new, of_lat, media_locations=IDS == IMG,
                                                              use_cached_media=True)).abs().max().item()
                     for i in of_blocks)  # fmt: skip
    with capsys.disabled():
        print(f"\nOpenFlamingo reference: max |diff| perceiver {d_perceiver:.2e}, logits {d_logits:.2e}, "
              f"cached step {d_step:.2e}")  # fmt: skip
    assert d_perceiver < 1e-5 and d_logits < 1e-5 and d_step < 1e-5
    assert (got - base(IDS, attention_mask=MASK)).abs().max() > 1e-3  # the images did matter
