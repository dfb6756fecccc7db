"""Continuous batching: requests joining a running batch at any step decode exactly as they do
alone, each with its own settings; finished rows leave at once; a failing request fails alone."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modalign import MLLM
from modalign.infer.engine import Engine, Prompt, SamplingParams
from modalign.infer.scheduler import Request, Scheduler
from tests.infer.test_engine import full_forward_greedy, prompts, require_compiled, tiny

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


class Sink:
    def __init__(self):
        self.tokens, self.logprobs, self.end, self.error = [], [], None, None

    def request(self, prompt, params, **kw):
        return Request(prompt, params, self.on_token, self.on_end, self.on_error, **kw)

    def on_token(self, t, lp):
        self.tokens.append(t)
        self.logprobs.append(lp)

    def on_end(self, reason):
        self.end = reason

    def on_error(self, e):
        self.error = e


def run(sched, arrivals, max_steps=200):
    """``arrivals``: {step: [requests]}; steps until every request has ended."""
    for step in range(max_steps):
        for r in arrivals.get(step, []):
            sched.add(r)
        sched.step()
        if step > max(arrivals) and not sched.active and not sched.waiting:
            return step
    raise AssertionError("did not finish")


def test_requests_joining_at_any_step_decode_as_alone():
    model = tiny()
    ps = prompts(model, n=5, seed=3)
    lengths = [9, 4, 12, 6, 3]
    want = [full_forward_greedy(model, p, n) for p, n in zip(ps, lengths, strict=True)]
    sinks = [Sink() for _ in ps]
    reqs = [
        s.request(p, SamplingParams(max_new_tokens=n)) for s, p, n in zip(sinks, ps, lengths, strict=True)
    ]
    sched = Scheduler(Engine(model), max_batch=3)
    run(sched, {0: reqs[:2], 2: reqs[2:4], 5: reqs[4:]})
    for s, w in zip(sinks, want, strict=True):
        assert s.error is None and s.end == "length"
        assert s.tokens == w
    assert sched.active == 0 and sched.cache is None  # nothing left behind


def test_each_row_samples_with_its_own_settings_and_seed():
    model = tiny(1)
    p = prompts(model, n=2, seed=5)
    eng = Engine(model)
    seeded = eng.generate([p[1]], SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7))[
        0
    ].token_ids
    greedy = eng.generate([p[0]], SamplingParams(max_new_tokens=8))[0].token_ids
    a, b, c = Sink(), Sink(), Sink()
    sched = Scheduler(eng, max_batch=4)
    run(sched, {0: [a.request(p[0], SamplingParams(max_new_tokens=8)),
                    b.request(p[1], SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7))],
                1: [c.request(p[0], SamplingParams(max_new_tokens=8), logprobs=2,
                              logit_bias={greedy[0]: -100.0})]})  # fmt: skip
    assert a.tokens == greedy and b.tokens == seeded
    assert c.tokens[0] != greedy[0]  # the bias ruled the greedy token out
    lp = c.logprobs[0]
    assert lp["token"] == c.tokens[0] and len(lp["top"]) == 2 and lp["top"][0][1] >= lp["top"][1][1]
    assert lp["logprob"] <= 0


def test_rows_sharing_settings_sample_together_as_each_would_alone(monkeypatch):
    """Sampled rows with the same temperature, top-k and top-p have their logits adjusted and
    their softmax taken as one batch, each drawing from its own generator: every token and every
    generator's state after equal sampling each row alone, over several steps. Rows with a
    penalty or a bias sample alone; a group with non-finite logits, or whose batch fails, falls
    back to row by row, where a row that fails alone too ends with its own error, once."""
    from modalign.infer import engine as engine_mod
    from modalign.infer.scheduler import _Row

    settings = ([{"temperature": 0.7}] * 4 + [{"temperature": 0.9, "top_p": 0.8}] * 3
                + [{"temperature": 1.0, "top_k": 5}, {}, {}, {"temperature": 0.7, "repetition_penalty": 1.3},
                   {"temperature": 0.7}])  # fmt: skip
    bias = {11: {3: 5.0}}  # the last row: 0.7 as the first four, but with a logit bias

    def rows(errors):
        return [
            _Row(
                Request(
                    Prompt([1]),
                    SamplingParams(seed=i, **kw),
                    None,
                    None,
                    errors.append,
                    logit_bias=bias.get(i, {}),
                ),  # fmt: skip
                torch.Generator().manual_seed(100 + i),
                [1, 5, 7],
            )
            for i, kw in enumerate(settings)
        ]

    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(len(settings), 64, generator=g) * 3 for _ in range(4)]
    steps[1][2] = float("nan")  # a row of the 0.7 group: that step, the group row by row
    steps[3][5, 0] = 1234.5  # a row of the top-p group whose adjustment fails, together or alone
    real, batched, step = engine_mod.process_logits, [], [0]

    def counted(logits, *a):  # at step 2 a batch's adjustment fails: its rows sample alone
        batched.append(logits.shape[0])
        if (logits.shape[0] > 1 and step[0] == 2) or bool((logits == 1234.5).any()):
            raise RuntimeError("broken")
        return real(logits, *a)

    monkeypatch.setattr(engine_mod, "process_logits", counted)
    sched, ref = Scheduler.__new__(Scheduler), Scheduler.__new__(Scheduler)
    alone_calls, sample_row = [], sched._sample_row
    sched._sample_row = lambda row, lg: alone_calls.append(step[0]) or sample_row(row, lg)
    errors, ref_errors = [], []
    together, alone = rows(errors), rows(ref_errors)
    for step[0], logits in enumerate(steps):
        got = sched._sample(together, logits)
        want = [ref._sample_row(r, logits[i]) for i, r in enumerate(alone)]
        assert got == want
    assert all(
        torch.equal(a.gen.get_state(), b.gen.get_state()) for a, b in zip(together, alone, strict=True)
    )
    # alone: the top-k row, the penalised one and the biased one every step; the 0.7 group at
    # step 1 (NaN), both groups at step 2 (the batch failed), the top-p group at step 3 (row 5)
    assert [alone_calls.count(k) for k in range(4)] == [3, 7, 10, 6]
    assert batched.count(4) == 4 and batched.count(3) == 4  # one batched call per group and step
    assert [r.failed for r in together] == [i == 5 for i in range(12)]
    assert len(errors) == 1 and str(errors[0]) == "broken" and len(ref_errors) == 1


def test_stop_tokens_cancel_and_a_failing_prefill_fail_alone():
    model = tiny(2)
    ps = prompts(model, n=3, seed=1)
    eng = Engine(model)
    free = eng.generate([ps[0]], SamplingParams(max_new_tokens=10))[0].token_ids
    stop, ok, cancel, bad = Sink(), Sink(), Sink(), Sink()
    broken = Prompt([1, model.config.image_token_id, 5], [])  # a placeholder with no image
    reqs = [stop.request(ps[0], SamplingParams(max_new_tokens=10, stop_token_ids=[free[3]])),
            ok.request(ps[1], SamplingParams(max_new_tokens=5)),
            cancel.request(ps[2], SamplingParams(max_new_tokens=50)),
            bad.request(broken, SamplingParams(max_new_tokens=5))]  # fmt: skip
    sched = Scheduler(eng, max_batch=8)
    for r in reqs:
        sched.add(r)
    sched.step()
    assert bad.error is not None and "placeholder" in str(bad.error)
    assert sched.active == 3
    reqs[2].cancelled = True
    for _ in range(12):
        sched.step()
    assert stop.end == "stop" and stop.tokens == free[:3]
    assert ok.end == "length" and len(ok.tokens) == 5 and ok.error is None
    assert cancel.end == "cancelled" and len(cancel.tokens) < 50
    assert sched.active == 0


def test_per_image_model_matches_golden_in_a_running_batch():
    model = MLLM.from_pretrained(GOLDEN / "mplug_owl2")
    inp = load_file(str(GOLDEN / "mplug_owl2" / "inputs.safetensors"))
    exp = load_file(str(GOLDEN / "mplug_owl2" / "expected.safetensors"))
    ids = inp["multi.input_ids"][0].tolist()
    px = inp["multi.pixel_values"]
    text, multi = Sink(), Sink()
    sched = Scheduler(Engine(model), max_batch=2)
    run(sched, {0: [text.request(Prompt(inp["text.input_ids"][0].tolist()), SamplingParams(max_new_tokens=8))],
                3: [multi.request(Prompt(ids, list(px)), SamplingParams(max_new_tokens=8))]})  # fmt: skip
    assert text.tokens == exp["text.generated_ids"][0].tolist()
    assert multi.tokens == exp["multi.generated_ids"][0].tolist()


def test_a_broken_decode_step_fails_its_rows_and_the_scheduler_goes_on(monkeypatch):
    model = tiny()
    ps = prompts(model, n=2)
    sched = Scheduler(Engine(model), max_batch=2)
    first = Sink()
    sched.add(first.request(ps[0], SamplingParams(max_new_tokens=6)))
    sched.step()
    real = sched._forward
    monkeypatch.setattr(sched, "_forward", lambda: (_ for _ in ()).throw(RuntimeError("device lost")))
    sched.step()
    assert isinstance(first.error, RuntimeError) and sched.active == 0
    monkeypatch.setattr(sched, "_forward", real)
    again = Sink()
    run(sched, {0: [again.request(ps[1], SamplingParams(max_new_tokens=4))]})
    assert again.tokens == full_forward_greedy(model, ps[1], 4)


@pytest.mark.parametrize("n", [1, 6])
def test_rows_leaving_compact_the_slots(n):
    """A long prompt that finishes first leaves slots nobody reads: they are dropped, and the
    rows that stay decode on unchanged."""
    model = tiny()
    ps = prompts(model, n=3, seed=2)  # 4, 22 and 40 tokens
    order, lengths = [2, 0, 1], [n, 30, 12]
    sinks = [Sink() for _ in order]
    sched = Scheduler(Engine(model), max_batch=4, headroom=8)
    slots = []
    real = sched.step

    def step():
        real()
        slots.append(sched.cache.length if sched.cache is not None else 0)

    sched.step = step
    run(sched, {0: [sinks[0].request(ps[2], SamplingParams(max_new_tokens=lengths[0])),
                    sinks[1].request(ps[0], SamplingParams(max_new_tokens=lengths[1]))],
                2: [sinks[2].request(ps[1], SamplingParams(max_new_tokens=lengths[2]))]})  # fmt: skip
    for s, i, k in zip(sinks, order, lengths, strict=True):
        assert s.tokens == full_forward_greedy(model, ps[i], k)
    assert any(b < a for a, b in zip(slots, slots[1:], strict=False)), slots  # compacted at least once


def test_a_new_request_takes_over_a_finished_row():
    """Under load a finished row is taken over by the next request: its prefilled keys are
    written into that row (moving the others right when its prompt is longer), the batch is not
    rebuilt, and every request decodes exactly as alone."""
    model = tiny()
    ps = prompts(model, n=3, seed=2)  # 4, 22 and 40 tokens
    jobs = [(ps[0], 30), (ps[1], 3), (ps[2], 6), (ps[1], 5)]
    sinks = [Sink() for _ in jobs]
    reqs = [s.request(p, SamplingParams(max_new_tokens=n)) for s, (p, n) in zip(sinks, jobs, strict=True)]
    sched = Scheduler(Engine(model), max_batch=2, headroom=8)
    merges, shifts, batch = [], [], []
    real_merge, real_shift, real_step = sched._merge, sched._shift, sched.step
    sched._merge = lambda *a: (merges.append(1), real_merge(*a))[1]
    sched._shift = lambda by: (shifts.append(by), real_shift(by))[1]

    def step():
        real_step()
        batch.append(len(sched.rows))

    sched.step = step
    run(sched, {0: reqs[:2], 1: reqs[2:]})  # the last two wait for a free row
    for s, (p, n) in zip(sinks, jobs, strict=True):
        assert s.error is None and s.end == "length"
        assert s.tokens == full_forward_greedy(model, p, n)
    assert len(merges) == 1  # the first two started the batch; the others took over free rows
    assert shifts  # a prompt longer than the running slots moved the running rows right
    assert max(batch) == 2 and sched.cache is None


def test_a_compiled_engine_serves_the_running_batch_as_alone_with_no_compile_after_warmup():
    """With ``Engine(compile=True)`` the scheduler's steps run the compiled step for any batch
    size and cache length (``dynamic``): rows joining, leaving and taking over, slots compacted
    and grown, each request decoding its greedy tokens as alone; after ``warmup`` no request
    waits for the compiler (no new graph)."""
    from torch._dynamo.utils import counters

    model = tiny()
    ps = prompts(model, n=3, seed=2)  # 4, 22 and 40 tokens
    jobs = [(ps[0], 30), (ps[1], 3), (ps[2], 6), (ps[1], 5), (ps[0], 12), (ps[2], 40)]
    sched = Scheduler(Engine(model, compile=True), max_batch=3, headroom=8)
    sched.warmup()
    require_compiled(sched.engine.fast)
    assert sched.active == 0 and sched.cache is None
    fast, used = sched.engine.fast, []
    real = fast.compiled_step
    fast.compiled_step = lambda *a, **k: used.append(k.get("dynamic")) or real(*a, **k)
    graphs = counters["stats"]["unique_graphs"]
    sinks = [Sink() for _ in jobs]
    reqs = [s.request(p, SamplingParams(max_new_tokens=n)) for s, (p, n) in zip(sinks, jobs, strict=True)]
    steps = run(sched, {0: reqs[:2], 1: reqs[2:4], 9: reqs[4:]})
    for s, (p, n) in zip(sinks, jobs, strict=True):
        assert s.error is None and s.end == "length"
        assert s.tokens == full_forward_greedy(model, p, n)
    assert len(used) >= steps and set(used) == {True}  # every decode step compiled
    assert counters["stats"]["unique_graphs"] == graphs  # warm-up compiled every graph the steps used


@pytest.mark.parametrize("forms", [("linear", "packed", "tall"), ("tall", "linear", "tall")])
def test_a_compiled_scheduler_takes_every_matrix_form_with_no_compile_after_warmup(forms, monkeypatch):
    """Above ``FEW_ROWS`` and ``PACK_ROWS`` rows the decode step may multiply its matrices in
    other forms (packed copies made when a step first needs them): the warm-up compiles the
    graphs of every range of batch sizes, and batches growing from 1 to 10 rows and shrinking
    again decode each request as alone with no graph compiled after it."""
    from torch._dynamo.utils import counters

    from modalign.infer import fast_decode as fd
    from tests.infer.test_engine import _force_forms

    if "packed" in forms and not fd._has_packed():
        pytest.skip("this torch has no MKL packed products")
    _force_forms(monkeypatch, fd, forms)
    model = tiny()
    ps = prompts(model, n=10, seed=5)
    sched = Scheduler(Engine(model, compile=True), max_batch=10, headroom=8)
    sched.warmup()
    fast = sched.engine.fast
    require_compiled(fast)
    assert fast.plan.packed == ("packed" in forms)
    used, real = [], fast.compiled_step
    fast.compiled_step = lambda *a, **k: used.append(k.get("dynamic")) or real(*a, **k)
    graphs = counters["stats"]["unique_graphs"]
    lengths = [12 + i for i in range(10)]  # all ten running at step 9
    sinks = [Sink() for _ in ps]
    reqs = [
        s.request(p, SamplingParams(max_new_tokens=n)) for s, p, n in zip(sinks, ps, lengths, strict=True)
    ]
    steps = run(sched, {i: [r] for i, r in enumerate(reqs)})
    for s, p, n in zip(sinks, ps, lengths, strict=True):
        assert s.error is None and s.tokens == full_forward_greedy(model, p, n)
    assert len(used) >= steps and set(used) == {True} and fast.compiled  # every step compiled
    assert counters["stats"]["unique_graphs"] == graphs
