"""Engine: greedy equals step-by-step full forward; batched equals one at a time; works for
per-image placeholder models (mPLUG-Owl2 golden) and sampling is seeded."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modalign import MLLM, MLLMConfig
from modalign.infer.engine import Engine, Prompt, SamplingParams

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = MLLMConfig.from_name("tiny-llava")
    cfg.llm.num_layers = cfg.vision.num_layers = 2
    cfg.vision.image_size, cfg.vision.patch_size = 32, 8
    cfg.placeholder = "per_token"
    return MLLM(cfg).eval()


def prompts(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ph, k = model.config.image_token_id, model.num_image_tokens()
    out = []
    for i in range(n):
        text = torch.randint(4, 500, (3 + 2 * i,), generator=g).tolist()
        imgs = [torch.randn(3, 32, 32, generator=g) for _ in range(i % 3)]
        ids = [1] + sum(([ph] * k for _ in imgs), []) + text
        out.append(Prompt(ids, imgs))
    return out


def require_compiled(fast) -> None:
    """Skip when this machine cannot compile at all (no C++ compiler); fail when the compiler works
    but the decode step did not compile (the engine then falls back to eager, which must not hide
    a broken compiled step)."""
    if fast.compiled and fast.failed is None:
        return
    try:
        torch.compile(lambda t: t * 2, fullgraph=True)(torch.ones(3))
    except Exception:  # noqa: BLE001
        pytest.skip(f"torch.compile is unavailable here: {fast.failed}")
    pytest.fail(f"the decode step did not compile: {fast.failed}")


def full_forward_greedy(model, p: Prompt, n: int) -> list[int]:
    ids = torch.tensor([p.input_ids])
    px = torch.stack(p.pixel_values) if p.pixel_values else None
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids, pixel_values=px).logits[0, -1].argmax().item()
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def test_greedy_equals_full_forward_and_batched_equals_single():
    model = tiny()
    eng = Engine(model)
    ps = prompts(model)
    params = SamplingParams(max_new_tokens=7)
    batched = eng.generate(ps, params)
    for p, r in zip(ps, batched, strict=True):
        assert r.token_ids == full_forward_greedy(model, p, 7)
        assert eng.generate([p], params)[0].token_ids == r.token_ids
        assert r.finish_reason == "length" and r.prompt_tokens == len(p.input_ids)


def test_stop_tokens_and_seeded_sampling():
    model = tiny()
    eng = Engine(model)
    p = prompts(model, 1)[0]
    greedy = eng.generate([p], SamplingParams(max_new_tokens=6))[0].token_ids
    stopped = eng.generate([p], SamplingParams(max_new_tokens=6, stop_token_ids=[greedy[2]]))[0]
    assert stopped.token_ids == greedy[:2] and stopped.finish_reason == "stop"
    sp = SamplingParams(
        max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=3
    )
    a, b = eng.generate([p], sp)[0].token_ids, eng.generate([p], sp)[0].token_ids
    assert a == b
    sp.seed = 4
    assert eng.generate([p], sp)[0].token_ids != a
    with pytest.raises(ValueError, match="top_p"):
        eng.generate([p], SamplingParams(top_p=0))


def test_engine_on_per_image_model_matches_golden():
    model = MLLM.from_pretrained(GOLDEN / "mplug_owl2")
    inp = load_file(str(GOLDEN / "mplug_owl2" / "inputs.safetensors"))
    exp = load_file(str(GOLDEN / "mplug_owl2" / "expected.safetensors"))
    ids, px = inp["multi.input_ids"][0].tolist(), inp["multi.pixel_values"]
    r = Engine(model).generate([Prompt(ids, list(px))], SamplingParams(max_new_tokens=8))[0]
    assert r.token_ids == exp["multi.generated_ids"][0].tolist()
    # batched with a text-only prompt of another length
    text = inp["text.input_ids"][0].tolist()
    rs = Engine(model).generate([Prompt(text), Prompt(ids, list(px))], SamplingParams(max_new_tokens=8))
    assert rs[0].token_ids == exp["text.generated_ids"][0].tolist()
    assert rs[1].token_ids == exp["multi.generated_ids"][0].tolist()


def test_decode_plan_follows_weight_updates():
    """The fast path caches fused weights; an in-place update (training) must be seen."""
    model = tiny()
    eng = Engine(model)
    p = prompts(model, 1)[0]
    a = eng.generate([p], SamplingParams(max_new_tokens=6))[0].token_ids
    with torch.no_grad():
        for layer in model.llm.layers:
            layer.self_attn.q_proj.weight.mul_(-3.0)
            layer.mlp.up_proj.weight.add_(0.5)
    b = eng.generate([p], SamplingParams(max_new_tokens=6))[0].token_ids
    assert b == full_forward_greedy(model, p, 6) and b != a
    # a module replaced after the plan was made (new parameter objects) is seen too
    from modalign.models.modality import ALinear

    for layer in model.llm.layers:
        old = layer.self_attn.q_proj
        new = ALinear(old.in_features, old.out_features, bias=old.bias is not None)
        with torch.no_grad():
            new.weight.copy_(old.weight * 2.0)
        layer.self_attn.q_proj = new
    c = eng.generate([p], SamplingParams(max_new_tokens=6))[0].token_ids
    assert c == full_forward_greedy(model, p, 6) and c != b


def test_compiled_decoding_equals_eager_on_a_padded_batch():
    """Engine(compile=True): the torch.compile'd static-shape step (whole-cache attention with a
    validity mask) gives the eager engine's greedy tokens on a left-padded batch with stops,
    and the logits of one step agree to float rounding."""
    from modalign.infer.fast_decode import FastDecoder

    model = tiny(3)
    ps = prompts(model, n=3, seed=4)
    eager = Engine(model).generate(ps, SamplingParams(max_new_tokens=12))
    stop = eager[1].token_ids[4]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=[stop])
    want = Engine(model).generate(ps, params)
    eng = Engine(model, compile=True)
    got = eng.generate(ps, params)
    require_compiled(eng.fast)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    assert eng.fast.shapes == {(3, 128)}
    # warm-up compiles the graphs later requests of those batch sizes and lengths use
    assert eng.warmup((1, 2), prompt_len=8, max_new_tokens=100) > 0
    assert eng.fast.shapes == {(3, 128), (1, 128), (2, 128)}
    eng.generate(ps[:1], SamplingParams(max_new_tokens=12))
    assert eng.fast.shapes == {(3, 128), (1, 128), (2, 128)}
    # one step on the same cache state, both ways
    llm, ids = model.llm, torch.tensor([[7], [9]])
    with torch.no_grad():
        c1, c2 = llm.new_cache(2, 128), llm.new_cache(2, 128)
        for c in (c1, c2):
            llm(torch.tensor([[1, 5, 6], [1, 8, 2]]), cache=c)
            c.prefill_length = c.length
        a = FastDecoder(llm).step(ids, c1)
        valid = torch.zeros(2, 128, dtype=torch.bool)
        valid[:, : c2.length + 1] = True
        b = FastDecoder(llm, compile=True).compiled_step(ids, c2, torch.full((2, 1), 3), valid)
    assert c1.length == c2.length == 4
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert torch.allclose(c1.k[0][:, :, :4], c2.k[0][:, :, :4], atol=1e-6)


def test_the_compiled_step_raises_the_graph_limit_in_the_thread_that_runs_it():
    """The compiler's settings hold per thread: a server's scheduler thread runs the compiled
    step with the decoder's graph limit, not the compiler's default of 8 (which a server with
    several batch-size ranges and cache lengths would hit, then decode eagerly)."""
    import threading

    import torch._dynamo

    from modalign.infer.fast_decode import FastDecoder

    llm = tiny().llm
    dec = FastDecoder(llm, compile=True, max_graphs=40)
    seen = []
    dec.fn = lambda *a: seen.append(torch._dynamo.config.cache_size_limit) or torch.zeros(1, 8)

    def run():
        torch._dynamo.config.cache_size_limit = 8  # the default (a thread's own in recent torch)
        seen.append(torch._dynamo.config.cache_size_limit)
        with torch.no_grad():
            cache = llm.new_cache(1, 16)
            llm(torch.tensor([[1, 5, 6]]), cache=cache)
            cache.prefill_length = cache.length
            valid = torch.zeros(1, 16, dtype=torch.bool)
            valid[:, :4] = True
            dec.compiled_step(torch.tensor([[7]]), cache, torch.full((1, 1), 3), valid)

    limit = torch._dynamo.config.cache_size_limit
    try:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        torch._dynamo.config.cache_size_limit = limit  # where settings are global (older torch)
    assert seen == [8, 40]


def test_image_cache_reuses_visual_tokens_and_follows_weight_updates():
    from modalign.infer.image_cache import ImageCache, image_key

    model = tiny()
    ps = prompts(model, 4)  # 0, 1, 2 and 0 images
    params = SamplingParams(max_new_tokens=5)
    plain = Engine(model, image_cache_mb=0).generate(ps, params)
    eng = Engine(model)
    first = eng.generate(ps, params)
    n_img = sum(len(p.pixel_values) for p in ps)
    assert eng.image_cache.misses == n_img and eng.image_cache.hits == 0 and len(eng.image_cache) == n_img
    # each entry holds its own tokens, not a view that keeps the whole batch's output alive
    assert n_img > 1 and eng.image_cache.bytes == sum(
        t.untyped_storage().nbytes() for t in eng.image_cache.entries.values()
    )
    again = eng.generate(ps, params)  # every image met before: no tower, no connector
    assert eng.image_cache.hits == n_img and eng.image_cache.misses == n_img
    assert [r.token_ids for r in first] == [r.token_ids for r in again] == [r.token_ids for r in plain]
    # one image twice in one prompt is encoded once, and a tensor equal in value is the same key
    p = ps[2]
    twin = Prompt(p.input_ids, [p.pixel_values[0], p.pixel_values[0].clone()])
    eng.image_cache.clear()
    eng.generate([twin], params)
    assert len(eng.image_cache) == 1 and image_key(twin.pixel_values[0]) == image_key(twin.pixel_values[1])
    # a training step on the tower changes the visual tokens: the cache must not serve the old ones
    hits = eng.image_cache.hits
    with torch.no_grad():
        model.vision.embeddings.patch_embedding.weight.mul_(-2.0)
    changed = eng.generate([ps[1]], params)[0].token_ids
    assert changed == full_forward_greedy(model, ps[1], 5)
    assert eng.image_cache.hits == hits and len(eng.image_cache) == 1

    # least recently used out first, within the byte bound; an entry larger than the bound is not kept
    c = ImageCache(max_bytes=3 * 4 * 10)  # three [10] float32 tensors
    for k in (b"a", b"b", b"c"):
        c.put(k, torch.zeros(10))
    assert c.get(b"a") is not None  # a is now the most recent
    c.put(b"d", torch.zeros(10))
    assert set(c.entries) == {b"a", b"c", b"d"} and c.bytes == 120
    c.put(b"e", torch.zeros(31))
    assert b"e" not in c.entries and c.bytes == 120
    with pytest.raises(ValueError, match="image cache size"):
        ImageCache(-1)
    with pytest.raises(ValueError, match="image_cache_mb must be >= 0"):
        Engine(model, image_cache_mb=-1)


def test_weight_versions_sees_in_place_updates_replaced_tensors_and_modules():
    from modalign.infer.fast_decode import weight_versions

    model = tiny()
    parts = [model.vision, model.connector]
    want = [(t.data_ptr(), t._version) for m in parts for t in (*m.parameters(), *m.buffers())]
    before = weight_versions(parts, buffers=True)
    assert sorted(before) == sorted(want) and len(before) == len(want)
    assert weight_versions([model.llm]) == [(p.data_ptr(), p._version) for p in model.llm.parameters()]
    assert weight_versions(parts, buffers=True) == before  # nothing changed: an equal list
    lin = model.connector.linear_1
    with torch.no_grad():
        lin.bias.add_(1.0)  # in place: the version counter moves
    after_update = weight_versions(parts, buffers=True)
    assert after_update != before
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone())  # a tensor replaced
    after_param = weight_versions(parts, buffers=True)
    assert after_param != after_update
    model.connector.linear_1 = torch.nn.Linear(lin.in_features, lin.out_features)  # a module replaced
    assert weight_versions(parts, buffers=True) != after_param
    model.connector.register_buffer("scale", torch.ones(3))  # buffers count where asked for
    assert len(weight_versions(parts, buffers=True)) == len(weight_versions(parts)) + 1
    # a module shared by two parents is walked once, and a module that holds itself ends the walk
    shared = torch.nn.Linear(2, 2)
    a, b = torch.nn.Sequential(shared), torch.nn.Sequential(shared)
    assert len(weight_versions([a, b])) == 2
    a.add_module("loop", a)
    assert len(weight_versions([a])) == 2


@pytest.mark.parametrize("backend", ["dynamic", "weight_only"])
def test_int8_linear_matches_its_dequantized_weight(backend):
    from modalign.infer.quant import Int8Linear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    lin = Int8Linear(w, b, backend=backend)
    wq = lin.dequantize()
    # per-row scale max|w| / 127: every weight within half a step of its int8 value
    assert torch.all((wq - w).abs() <= w.abs().amax(1, keepdim=True) / 254 + 1e-6)
    x = torch.randn(2, 3, 32, generator=g)
    y = lin(x)
    ref = x @ wq.t() + b
    assert y.shape == (2, 3, 48)
    # weight-only: exact up to float rounding; dynamic: the activations are quantized too (7 bits)
    tol = 1e-4 if backend == "weight_only" else 2 * x.abs().max() / 127 * wq.abs().sum(1).max()
    assert (y - ref).abs().max() <= tol


def test_int4_linear_matches_its_dequantized_weight():
    from modalign.infer.quant import Int4Linear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 96, generator=g), torch.randn(48, generator=g)
    lin = Int4Linear(w, b)
    assert lin.group_size == 32  # the largest of 128, 64, 32 dividing 96
    wq = lin.dequantize()
    # groups of 32 along a row, 16 levels from the group's min to its max: within half a level
    # (and the bfloat16 rounding of the group's scale and offset)
    wg = w.view(48, 3, 32)
    half = (wg.amax(-1, keepdim=True) - wg.amin(-1, keepdim=True)) / 30
    assert torch.all((wq.view(48, 3, 32) - wg).abs() <= half * 1.05 + 2e-2 * wg.abs().amax(-1, keepdim=True))
    x = torch.randn(2, 3, 96, generator=g)
    ref = x.bfloat16().float() @ wq.t() + b  # the product in bfloat16, as the kernel runs it
    torch.testing.assert_close(lin(x), ref, atol=2e-2 * ref.abs().max().item(), rtol=1e-2)
    assert lin(x).dtype == torch.float32
    # half a byte a weight; a bfloat16 scale and offset a group
    assert lin.nbytes == 48 * 96 // 2 + 3 * 48 * 2 * 2
    with pytest.raises(ValueError, match="input width 40 of a \\[48, 40\\] matrix is not a multiple of 32"):
        Int4Linear(torch.randn(48, 40))
    with pytest.raises(ValueError, match="output width 40 of a \\[40, 64\\] matrix is not a multiple of 16"):
        Int4Linear(torch.randn(40, 64))
    with pytest.raises(ValueError, match="group size 48 is not one the kernel takes"):
        Int4Linear(torch.randn(48, 96), group_size=48)
    with pytest.raises(ValueError, match="this weight is on meta"):
        Int4Linear(torch.empty(16, 32, device="meta"))


def test_int4_decode_step_is_the_fp32_step_on_its_dequantized_weights():
    """One int4 decode step equals, to float rounding, the fp32 step of a model whose decoder
    matrices are their int4 values (same cache state); the engine decodes on it end to end."""
    import copy

    from modalign.infer.fast_decode import DecodePlan, FastDecoder
    from modalign.infer.quant import Int4Linear, Int8Linear, quantize_llm_

    # the tiny LLM's MLP is 344 wide: down_proj's input is no multiple of 32, so it stays int8
    plan = DecodePlan(quantize_llm_(tiny(1).llm, "int4"))
    assert [type(m.w) for m in plan.layers[0][1:3] + plan.layers[0][4:]] == [Int4Linear] * 3 + [Int8Linear]
    torch.manual_seed(1)
    cfg = MLLMConfig.from_name("tiny-llava")
    cfg.llm.num_layers = cfg.vision.num_layers = 2
    cfg.vision.image_size, cfg.vision.patch_size = 32, 8
    cfg.placeholder = "per_token"
    cfg.llm.intermediate_size = 352  # every matrix in the kernel's shapes
    model = MLLM(cfg).eval()
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in deq.llm.named_modules():
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in (
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"
            ):  # fmt: skip
                m.weight.copy_(Int4Linear(m.weight).dequantize())
    ids = torch.tensor([[7], [9]])
    with torch.no_grad():
        caches = []
        for _ in range(3):
            c = model.llm.new_cache(2, 16)
            model.llm(torch.tensor([[1, 5, 6], [1, 8, 2]]), cache=c)  # the same prefilled state
            c.prefill_length = c.length
            caches.append(c)
        b = FastDecoder(deq.llm).step(ids, caches[1])
        fp32 = FastDecoder(model.llm).step(ids, caches[2])
        quant = copy.deepcopy(model)  # the caches above were filled by the fp32 model
        fast = FastDecoder(quantize_llm_(quant.llm, "int4"))
        a = fast.step(ids, caches[0])
    assert all(isinstance(m.w, Int4Linear) for m in fast.plan.mats()[:-1])
    # products in bfloat16: equal to its rounding, with the same greedy token
    torch.testing.assert_close(a, b, atol=3e-2 * b.abs().max().item(), rtol=0)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert (a - fp32).abs().max() > (a - b).abs().max()  # nearer its 4-bit weights than fp32's
    ps = prompts(model)
    out = Engine(model, quantize="int4").generate(ps, SamplingParams(max_new_tokens=4))
    assert [len(r.token_ids) for r in out] == [4, 4, 4]


def test_int8_decoding_follows_fp32_and_refuses_what_it_does_not_cover():
    model = tiny()
    ps = prompts(model)
    params = SamplingParams(max_new_tokens=8)
    fp32 = [r.token_ids for r in Engine(model).generate(ps, params)]
    eng = Engine(model, quantize="int8")
    int8 = [r.token_ids for r in eng.generate(ps, params)]
    agree = sum(a == b for x, y in zip(fp32, int8, strict=True) for a, b in zip(x, y, strict=True))
    assert agree >= 0.75 * sum(map(len, fp32))  # random weights have near-ties; most tokens agree
    from modalign.infer.quant import Int8Linear

    assert all(isinstance(m.w, Int8Linear) for m in eng.fast.plan.mats()[:-1])
    assert isinstance(eng.fast.plan.head.w, Int8Linear)
    with pytest.raises(ValueError, match="unknown scheme"):
        Engine(model, quantize="int3")
    model.config.llm.lora = None
    model.llm.cfg.hidden_act = "gelu"  # a decoder the fused step does not cover
    with pytest.raises(ValueError, match="Llama-family"):
        Engine(model, quantize="int8")


def tiny_variant(kind: str, seed: int = 2):
    """The tiny LLaVA with every matrix in the int4 kernel's shapes, plain, with MAM or with
    Partial LoRA; the image-side parts randomised so that routing matters."""
    from modalign.config import PLoRAConfig

    torch.manual_seed(seed)
    cfg = MLLMConfig.from_name("tiny-llava")
    cfg.llm.num_layers = cfg.vision.num_layers = 2
    cfg.vision.image_size, cfg.vision.patch_size = 32, 8
    cfg.placeholder = "per_token"
    cfg.llm.intermediate_size = 352
    cfg.llm.mam = kind == "mam"
    if kind == "plora":
        cfg.llm.plora = PLoRAConfig(rank=8, alpha=16, dropout=0.0)
    model = MLLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "plora_B" in name or "multiway.1" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("kind", ["plain", "mam", "plora"])
def test_quantize_in_place_replaces_the_matrices_for_prefill_and_decode(kind):
    """``quantize_llm_``: every decoder matrix and the head are held quantized only (the fp32
    weights dropped; plain q/k/v and gate/up fused), a forward with images equals the fp32
    forward of the model whose matrices are their int4 values (MAM's image copies and Partial
    LoRA still applied), and the engine's decode plan reads the same quantized objects."""
    import copy

    from modalign.infer.quant import Int4Linear, QuantizedLinear, linear_bytes, quantize_llm_
    from modalign.models.modality import ALinear

    model = tiny_variant(kind)
    deq = copy.deepcopy(model)
    with torch.no_grad():
        for m in [*deq.llm.layers.modules(), deq.llm.lm_head]:
            if isinstance(m, ALinear) or m is deq.llm.lm_head:  # not Partial LoRA's A and B
                m.weight.copy_(Int4Linear(m.weight).dequantize())
    fp32_bytes = linear_bytes(model.llm)
    quantize_llm_(model.llm, "int4")
    attn, mlp = model.llm.layers[0].self_attn, model.llm.layers[0].mlp
    assert hasattr(mlp, "gate_up_proj") == (kind != "plora")
    assert hasattr(attn, "qkv_proj") == (kind == "plain")
    linears = [m for m in model.llm.modules() if isinstance(m, ALinear)]
    assert linears and all(m.weight is None and isinstance(m.quantized, Int4Linear) for m in linears)
    assert isinstance(model.llm.lm_head, QuantizedLinear)
    assert not any(n.endswith("proj.weight") or "multiway" in n and "weight" in n and "norm" not in n
                   for n, _ in model.llm.named_parameters())  # fmt: skip
    adapters = sum(p.numel() * 4 for n, p in model.llm.named_parameters() if "plora" in n)  # stay fp32
    assert linear_bytes(model.llm) - adapters < (fp32_bytes - adapters) / 6  # 4 bits a weight + scales
    p = prompts(model, 3)[2]  # two images
    ids, px = torch.tensor([p.input_ids]), torch.stack(p.pixel_values)
    with torch.no_grad():
        got, want = model(ids, pixel_values=px).logits, deq(ids, pixel_values=px).logits
    torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=0)  # bfloat16 products
    eng = Engine(model)
    eng.generate([p], SamplingParams(max_new_tokens=2))
    ops = {id(m.quantized) for m in model.llm.modules() if getattr(m, "quantized", None) is not None}
    plan = eng.fast.plan
    held = [op for m in plan.mats() for op in getattr(m.w, "ops", [m.w])]
    assert {id(op) for op in held} <= ops  # no second copy
    Engine(model, quantize="int4")  # already int4: nothing to do
    with pytest.raises(ValueError, match="already int4"):
        Engine(model, quantize="int8")
    with pytest.raises(ValueError, match="merge LoRA first"):
        lora = tiny_variant("plain")
        from modalign.models.modality import apply_lora

        apply_lora(lora.llm, 4, 8, 0.0, ["q_proj"])
        quantize_llm_(lora.llm, "int8")


def test_fused_projections_compute_what_the_separate_ones_did():
    from modalign.models.modality import fuse_projections

    model = tiny_variant("plain")
    p = prompts(model, 3)[2]
    ids, px = torch.tensor([p.input_ids]), torch.stack(p.pixel_values)
    with torch.no_grad():
        want = model(ids, pixel_values=px).logits
        assert fuse_projections(model.llm) == 2 * len(model.llm.layers)
        got = model(ids, pixel_values=px).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert Engine(model).generate([p], SamplingParams(max_new_tokens=5))[0].token_ids == full_forward_greedy(
        model, p, 5
    )


@pytest.mark.parametrize("shape", [(1, 1, 24), (3, 1, 24), (8, 24), (1, 24), (6, 1, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_products_equal_linear(shape, dtype):
    """The decode step's products in each form (float32 on the CPU: also the matrix times the
    rows' transpose, a single row doubled, and against MKL's packed copy, the rows padded) give
    F.linear's values, shape and bias for every row."""
    from modalign.infer import fast_decode as fd

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 24, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    x = torch.randn(*shape, generator=g).to(dtype)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    forms = [fd.LINEAR]
    if dtype == torch.float32:
        forms += [fd.TALL, fd.PACKED] if fd._has_packed() else [fd.TALL]
    for form in forms:
        m, nob = fd.Mat(w, b, (form,) * 3), fd.Mat(w, None, (form,) * 3)
        if form == fd.PACKED:  # only a step of FEW_ROWS to PACK_ROWS rows takes it
            m.packed = nob.packed = fd._pack(w)
        got = fd._lin(x, m)
        assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
        torch.testing.assert_close(fd._lin(x, nob).float(), want - b.float(), atol=tol, rtol=tol)


def test_int8_rows_are_scaled_apart():
    """The CPU int8 kernel quantizes a whole call's activations with one scale: a row with large
    activations (a BOS token's, another request's) must not change the other rows' outputs."""
    from modalign.infer.quant import Int8Linear

    g = torch.Generator().manual_seed(0)
    lin = Int8Linear(torch.randn(48, 64, generator=g), torch.randn(48, generator=g), backend="dynamic")
    x = torch.randn(3, 64, generator=g)
    x_big = x.clone()
    x_big[0] *= 300
    assert torch.equal(lin(x_big)[1:], lin(x)[1:])  # rows 1 and 2 untouched by row 0's size
    ref = x @ lin.dequantize().t() + lin.bias
    bound = 2 * x.abs().amax(1, keepdim=True) / 127 * lin.dequantize().abs().sum(1)  # 7-bit steps
    assert torch.all((lin(x_big)[1:] - ref[1:]).abs() <= bound[1:])


def test_a_quantized_model_is_not_saved(tmp_path):
    from modalign.infer.quant import quantize_llm_

    model = tiny()
    quantize_llm_(model.llm, "int8")
    with pytest.raises(ValueError, match="quantized \\(int8\\) for inference and cannot be saved"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


def _force_forms(monkeypatch, fd, forms):
    """Every matrix shape's forms timed as ``forms`` (``_forced_forms``), here and now: nothing
    kept from earlier timings, nothing read from a file."""
    monkeypatch.setattr(fd, "_times", _forced_forms(fd, forms))
    monkeypatch.setattr(fd, "_FORMS", {})
    monkeypatch.setenv("MODALIGN_DECODE_FORMS", "")


def _forced_forms(fd, forms):
    """``_times`` forced: ``forms`` = (few rows, more rows, more rows without packed copies) are
    timed fastest (``onednn-any``: oneDNN's copy with ``PACK_ROWS`` rows and with ``MORE_ROWS``;
    plain ``onednn``: with ``PACK_ROWS`` rows only)."""
    few, many, unpacked = forms

    def times(ws, rows, candidates, reps=3, cold=False):
        if rows == 1:
            order = [few]
        elif rows <= fd.PACK_ROWS:
            order = [fd.DNN if many == fd.DNN_ANY else many, unpacked]
        else:
            order = [fd.DNN, unpacked] if many == fd.DNN_ANY else [unpacked]
        return {f: (order.index(f) if f in order else 9) / 10 + 0.1 for f in candidates}

    return times


_FORM_CASES = [("linear", "linear", "linear"), ("tall", "tall", "tall"), ("tall", "linear", "linear"),
               ("linear", "tall", "tall"), ("tall", "packed", "linear"), ("linear", "packed", "tall"),
               ("tall", "onednn", "tall"), ("linear", "onednn", "linear"), ("tall", "onednn-any", "tall"),
               ("linear", "onednn-any", "linear")]  # fmt: skip


@pytest.mark.parametrize("forms", _FORM_CASES)
def test_every_matrix_form_decodes_as_the_full_forward(forms, monkeypatch):
    """The decode step multiplies each matrix as ``x @ W.T``, in the tall form or against a
    packed copy, as timed on the machine (``_forms``); whichever is chosen, with one row or
    several (a batch of 1, of 6 and of 10: up to ``FEW_ROWS``, up to ``PACK_ROWS`` and above),
    the greedy tokens are the full forward's, and each form is taken where it was chosen."""
    from modalign.infer import fast_decode as fd

    if "packed" in forms and not fd._has_packed():
        pytest.skip("this torch has no MKL packed products")
    if forms[1] in fd.DNNS and not fd._has_dnn():
        pytest.skip("this torch has no oneDNN packed products")
    _force_forms(monkeypatch, fd, forms)
    calls, product = [], fd._product
    monkeypatch.setattr(
        fd, "_product", lambda x, m, form: calls.append((x.shape[0], form)) or product(x, m, form)
    )
    model = tiny(5)
    ps = prompts(model, n=10, seed=6)
    eng = Engine(model)
    for batch in (ps[:1], ps[:6], ps):
        got = eng.generate(batch, SamplingParams(max_new_tokens=6))
        assert [r.token_ids for r in got] == [full_forward_greedy(model, p, 6) for p in batch]
        if len(batch) == 1:
            assert eng.fast.plan.packed is None  # copies are made only for a step that uses them
    assert set(fd._FORMS.values()) == {forms}
    above = (
        forms[1] if forms[1] == fd.DNN_ANY else forms[2]
    )  # ten rows: oneDNN's copy for any rows, or unpacked
    want = {(n, f) for n, f in ((1, forms[0]), (6, forms[1]), (10, above)) if f != fd.LINEAR}
    assert set(calls) == want
    assert eng.fast.plan.packed == (forms[1] in fd.PACKS)
    if forms[1] in fd.PACKS:  # MKL's copies are flat buffers, oneDNN's keep the matrix's shape
        mats = eng.fast.plan.mats()
        assert {m.packed.shape == m.w.shape for m in mats} == {forms[1] in fd.DNNS}


def test_onednn_copies_for_any_row_count_are_made_by_a_first_step_of_many_rows(monkeypatch):
    """Where oneDNN's copy was also the fastest with ``MORE_ROWS`` rows (``onednn-any``), a first
    step of ten rows makes the copies and multiplies them; where it won with ``PACK_ROWS`` rows
    only (``onednn``), ten rows make none and multiply unpacked, and a later step of six makes and
    takes them. The full forward's tokens throughout."""
    from modalign.infer import fast_decode as fd

    if not fd._has_dnn():
        pytest.skip("this torch has no oneDNN packed products")
    model = tiny(5)
    ps = prompts(model, n=10, seed=6)
    want = [full_forward_greedy(model, p, 5) for p in ps]
    product = fd._product
    for forms, made in (("tall", "onednn-any", "tall"), True), (("tall", "onednn", "tall"), False):
        _force_forms(monkeypatch, fd, forms)
        calls = []
        monkeypatch.setattr(
            fd, "_product", lambda x, m, form, calls=calls: calls.append(form) or product(x, m, form)
        )
        eng = Engine(model)
        assert [r.token_ids for r in eng.generate(ps, SamplingParams(max_new_tokens=5))] == want
        assert set(fd._FORMS.values()) == {forms}
        assert eng.fast.plan.packed is (True if made else None)
        assert ("onednn-any" in calls) is made and "onednn" not in calls
        if not made:
            six = eng.generate(ps[:6], SamplingParams(max_new_tokens=5))
            assert [r.token_ids for r in six] == want[:6]
            assert eng.fast.plan.packed and "onednn" in calls


def test_packed_copies_follow_weight_updates_and_leave_fewer_rows_graphs_valid(monkeypatch):
    """Packed copies are copies: after an in-place update the next generation's plan packs the
    new weights (tokens equal to the full forward's). A compiled engine's graph for one row,
    compiled before any copy exists, is still used after a six-row step made them (only steps
    of more than ``FEW_ROWS`` rows look at the copies)."""
    from torch._dynamo.utils import counters

    from modalign.infer import fast_decode as fd

    if not fd._has_packed():
        pytest.skip("this torch has no MKL packed products")
    _force_forms(monkeypatch, fd, ("linear", "packed", "tall"))
    model = tiny(5)
    ps = prompts(model, n=6, seed=6)
    eng = Engine(model)
    a = [r.token_ids for r in eng.generate(ps, SamplingParams(max_new_tokens=6))]
    assert eng.fast.plan.packed
    with torch.no_grad():
        for layer in model.llm.layers:  # matrices the step takes as views, packed above FEW_ROWS
            layer.self_attn.o_proj.weight.mul_(-2.0)
            layer.mlp.down_proj.weight.add_(0.3)
    b = [r.token_ids for r in eng.generate(ps, SamplingParams(max_new_tokens=6))]
    assert b == [full_forward_greedy(model, p, 6) for p in ps] and b != a

    eng = Engine(model, compile=True)
    eng.generate(ps[:1], SamplingParams(max_new_tokens=4))
    require_compiled(eng.fast)
    eng.generate(ps, SamplingParams(max_new_tokens=4))
    assert eng.fast.compiled and eng.fast.plan.packed
    graphs = counters["stats"]["unique_graphs"]
    got = eng.generate(ps[:1], SamplingParams(max_new_tokens=4))[0].token_ids
    assert got == full_forward_greedy(model, ps[0], 4)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_compiled_step_multiplies_unpacked_where_onednn_packed_copies_are_chosen(monkeypatch):
    """oneDNN's packed copies are opaque tensors the compiler does not trace: a compiled step of
    six rows takes the unpacked form instead, and no copies are made for it (the eager step makes
    and multiplies them), with the full forward's tokens either way."""
    from modalign.infer import fast_decode as fd

    if not fd._has_dnn():
        pytest.skip("this torch has no oneDNN packed products")
    _force_forms(monkeypatch, fd, ("tall", "onednn", "linear"))
    model = tiny(5)
    ps = prompts(model, n=6, seed=6)
    want = [full_forward_greedy(model, p, 5) for p in ps]
    eager = Engine(model)
    assert [r.token_ids for r in eager.generate(ps, SamplingParams(max_new_tokens=5))] == want
    assert eager.fast.plan.packed
    compiled = Engine(model, compile=True)
    assert [r.token_ids for r in compiled.generate(ps, SamplingParams(max_new_tokens=5))] == want
    require_compiled(compiled.fast)
    # no copies made for a step that cannot use them (and none tried: an eager step would make them)
    assert compiled.fast.plan.packed is None and all(m.packed is None for m in compiled.fast.plan.mats())


def test_packed_copies_are_skipped_when_memory_is_short(monkeypatch):
    """Packed copies take as much memory again as the matrices: with too little free memory
    the plan makes none and multiplies those matrices unpacked, with the same tokens."""
    from modalign.infer import fast_decode as fd

    if not fd._has_packed():
        pytest.skip("this torch has no MKL packed products")
    _force_forms(monkeypatch, fd, ("linear", "packed", "tall"))
    monkeypatch.setattr(fd, "_free_memory", lambda: 1000)
    model = tiny(5)
    ps = prompts(model, n=6, seed=6)
    eng = Engine(model)
    got = eng.generate(ps, SamplingParams(max_new_tokens=6))
    assert [r.token_ids for r in got] == [full_forward_greedy(model, p, 6) for p in ps]
    assert eng.fast.plan.packed is False
    assert all(m.packed is None for m in eng.fast.plan.mats())


def test_timed_forms_are_kept_on_disk_and_taken_by_later_processes(tmp_path, monkeypatch):
    """The forms timed on a machine are saved (``MODALIGN_DECODE_FORMS``) and a later process takes
    them without timing, so it sums in the same order as the one before; an unreadable file is
    timed anew and rewritten."""
    import json

    from modalign.infer import fast_decode as fd

    path = tmp_path / "forms.json"
    monkeypatch.setenv("MODALIGN_DECODE_FORMS", str(path))
    monkeypatch.setattr(fd, "_FORMS", {})
    monkeypatch.setattr(fd, "_times", _forced_forms(fd, ("tall", "tall", "tall")))
    llm = tiny(7).llm
    fd.DecodePlan(llm)
    first = dict(fd._FORMS)
    saved = json.loads(path.read_text())
    assert list(saved) == [fd._machine()] and len(saved[fd._machine()]) == len(first)
    assert set(first.values()) == {("tall", "tall", "tall")}

    def timed_again(*a, **k):
        raise AssertionError("timed again")

    monkeypatch.setattr(fd, "_FORMS", {})  # a later process
    monkeypatch.setattr(fd, "_times", timed_again)
    plan = fd.DecodePlan(llm)
    assert fd._FORMS == first and {m.forms for m in plan.mats()} == {("tall", "tall", "tall")}

    # a process that timed at the same moment takes the forms saved first
    name = next(iter(saved[fd._machine()]))
    assert fd._save_forms(name, ("linear",) * 3) == ("tall",) * 3

    # unreadable files and entries that are not forms (or not here) are timed anew, without error
    for bad in ("{not json", json.dumps({fd._machine(): {name: [[], [], []]}}),
                json.dumps({fd._machine(): {name: ["packed"] * 3}})):  # fmt: skip
        path.write_text(bad)
        monkeypatch.setattr(fd, "_FORMS", {})
        monkeypatch.setattr(fd, "_times", _forced_forms(fd, ("linear", "linear", "linear")))
        fd.DecodePlan(llm)
        assert set(fd._FORMS.values()) == {("linear",) * 3}
        assert {tuple(v) for v in json.loads(path.read_text())[fd._machine()].values()} == {("linear",) * 3}


def test_matrix_forms_are_timed_from_memory_where_the_plan_outgrows_the_last_level_cache(
    tmp_path, monkeypatch
):
    """A decode step reads its matrices from memory when all of them are more than the last-level
    cache holds, and from the cache when they fit: the forms are timed the same way (the caches
    flushed before every timed round, or never), kept apart in the process and saved under names
    that say which."""
    import json

    from modalign.infer import fast_decode as fd

    assert (fd._cache_size("32768K"), fd._cache_size("1M"), fd._cache_size("512")) == (32 * 2**20, 2**20, 512)
    assert fd._llc_bytes() >= 2**10 and 4 <= fd._flush_buffer().numel() * 4 <= 2**30
    llm = tiny(7).llm
    plan_bytes = sum(m.w.numel() * 4 for m in fd.DecodePlan(llm).mats())
    timed, product, seen, events = fd._times, fd._product, [], []

    def times(*a, **k):
        seen.append(k["cold"])
        return timed(*a, **k)

    class Flush:  # what _times reads before each timed round
        def sum(self):
            events.append("flush")

    def flush_buffer():
        events.append("buffer")
        return Flush()

    monkeypatch.setattr(fd, "_times", times)
    monkeypatch.setattr(fd, "_flush_buffer", flush_buffer)
    monkeypatch.setattr(fd, "_product", lambda *a: events.append("product") or product(*a))
    monkeypatch.setattr(fd, "_FORMS", {})
    path = tmp_path / "forms.json"
    monkeypatch.setenv("MODALIGN_DECODE_FORMS", str(path))
    for llc, cold in ((plan_bytes + 1, False), (plan_bytes - 1, True)):  # one process: both kept apart
        monkeypatch.setattr(fd, "_llc_bytes", lambda llc=llc: llc)
        seen.clear(), events.clear()
        fd.DecodePlan(llm)
        assert seen and set(seen) == {cold}  # timed again for the other case, as it says
        assert ("flush" in events) == ("buffer" in events) == cold
        if cold:  # every round (the warm-up too) after a flush: at most one shape's matrices between two
            runs = "".join(e[0] for e in events if e != "buffer").split("f")
            assert runs[0] == "" and 0 < max(map(len, runs)) <= len(llm.layers)
    names = list(json.loads(path.read_text())[fd._machine()])
    assert {("from memory" in n) for n in names} == {True, False}
    assert all(("from memory" in n) != ("from the cache" in n) for n in names)


def test_timing_the_matrix_forms_leaves_the_global_generator_alone(monkeypatch):
    """Building a decode plan times the matrix forms; that draws nothing from torch's global
    generator, so a seeded program samples the same with or without a plan built in between."""
    from modalign.infer import fast_decode as fd

    monkeypatch.setattr(fd, "_FORMS", {})
    monkeypatch.setenv("MODALIGN_DECODE_FORMS", "")  # timed here, not read from a file
    llm = tiny(7).llm
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    fd.DecodePlan(llm)
    assert fd._FORMS  # the forms were timed
    assert torch.equal(torch.rand(4), want)
