"""The OpenAI-compatible server, driven by the official ``openai`` client on 127.0.0.1: text,
images, streaming with usage, every request limit (status code + the server stays healthy),
and a bounded concurrent load that loses nothing and is batched."""

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from modalign.serve.app import ServeConfig, create_app  # noqa: E402
from modalign.serve.images import ImagePolicy  # noqa: E402
from tests.serve.helpers import KEY, bomb_data_url, png_data_url, start, tiny_chat_model  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    img_dir = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (30, 30), (0, 0, 255)).save(img_dir / "blue.png")
    app = create_app(tiny_chat_model(), ServeConfig(model_name="tiny", api_key=KEY, max_body_bytes=200_000,
                                                    max_images=2, max_batch=8, images=ImagePolicy(local_dir=str(img_dir))))  # fmt: skip
    url, stop = start(app)
    yield url, app, img_dir
    stop()


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def ask(url, **kw):
    args = {"model": "tiny", "messages": [{"role": "user", "content": "what colour?"}], "max_tokens": 5,
            "temperature": 0} | kw  # fmt: skip
    return client(url).chat.completions.create(**args)


def test_text_image_multi_image_and_usage(server):
    url, _, _ = server
    r = ask(url)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    img = [
        {"type": "image_url", "image_url": {"url": png_data_url()}},
        {"type": "text", "text": "what colour?"},
    ]
    r1 = ask(url, messages=[{"role": "user", "content": img}])
    r2 = ask(url, messages=[{"role": "user", "content": img[:1] + img}])
    assert r2.usage.prompt_tokens - r1.usage.prompt_tokens == 9  # one more image: 9 visual tokens
    local = [
        {"type": "image_url", "image_url": {"url": "blue.png"}},
        {"type": "text", "text": "what colour?"},
    ]
    assert (
        ask(url, messages=[{"role": "user", "content": local}]).usage.prompt_tokens == r1.usage.prompt_tokens
    )
    assert [m.id for m in client(url).models.list().data] == ["tiny"]
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_streaming_equals_non_streaming(server):
    url, _, _ = server
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                         {"type": "text", "text": "what colour?"}]}]  # fmt: skip
    full = ask(url, messages=msgs, max_tokens=8)
    chunks = list(client(url).chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    raw = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"messages": msgs, "max_tokens": 3, "stream": True}).text  # fmt: skip
    assert raw.rstrip().endswith("data: [DONE]")


def test_a_stop_string_across_tokens_is_cut_whole_streaming_or_not(server):
    """A stop string whose first characters end one token and whose rest begins the next: the
    reply ends before it, streamed or not (its first characters were sent before it completed)."""
    url, _, _ = server
    tok = tiny_chat_model().tok  # the served model's
    full = ask(url, max_tokens=12).choices[0].message.content
    ids = tok.encode(full)
    pieces = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    bounds = [len(p) for p in pieces[1:-1] if 0 < len(p) < len(full)]
    if not bounds:
        pytest.skip(f"the greedy reply {full!r} has no boundary between two tokens inside it")
    at = bounds[0]
    stop = full[at - 1 : at + 1]  # one character either side of a token boundary
    want = full[: full.index(stop)]
    r = ask(url, max_tokens=12, stop=[stop])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = list(client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "what colour?"}],
                                                      max_tokens=12, temperature=0, stop=[stop], stream=True))  # fmt: skip
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == want


BAD = [
    ("no api key", {}, {"key": None}, 401),
    ("body too large", {"messages": [{"role": "user", "content": "x" * 300_000}]}, {}, 413),
    ("too many images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url()}}] * 3}]}, {}, 400),
    ("image pixels", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bomb_data_url()}}]}]}, {}, 400),
    ("context length", {"max_tokens": 500}, {}, 400),
    ("malformed part", {"messages": [{"role": "user", "content": [{"type": "video", "video": 1}]}]}, {}, 400),
    ("invalid base64", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, {}, 400),
    ("undecodable image", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}}]}]}, {}, 400),
    ("http images off", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}, {}, 400),
    ("path escape", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "../etc/passwd"}}]}]}, {}, 400),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, {}, 400),
    ("n=2", {"n": 2}, {}, 400),
    ("temperature", {"temperature": 9}, {}, 400),
    ("not json", None, {"raw": b"{nope"}, 400),
]  # fmt: skip


@pytest.mark.parametrize("name,body,opts,status", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_and_server_stays_healthy(server, name, body, opts, status):
    url, _, _ = server
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    headers = {} if opts.get("key", KEY) is None else {"Authorization": f"Bearer {KEY}"}
    if "raw" in opts:
        r = httpx.post(url + "/v1/chat/completions", headers=headers | {"content-type": "application/json"},
                       content=opts["raw"])  # fmt: skip
    else:
        r = httpx.post(url + "/v1/chat/completions", headers=headers, json=base | body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if name == "context length":
        assert "500" in err["message"] and "128" in err["message"]
    assert ask(url).choices[0].message.content is not None  # the next normal request succeeds


def test_concurrent_load_is_batched_and_loses_nothing(server):
    url, app, _ = server
    before = app.state.batcher.steps
    n = 24

    def one(i):
        return ask(url, max_tokens=2 + i % 5, messages=[{"role": "user", "content": f"what colour {i}?"}])

    t = time.perf_counter()
    seq = [one(i) for i in range(4)]
    per_request = (time.perf_counter() - t) / 4
    t = time.perf_counter()
    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(one, range(n)))
    parallel = (time.perf_counter() - t) / n
    assert len(results) == n and all(r.choices[0].message.content is not None for r in results)
    # each reply is its own prompt's greedy reply, as the model gives it alone
    from modalign.infer.chat import user_message

    cm = tiny_chat_model()  # the server's model (seeded)
    want = []
    for i in range(n):
        msgs, params = [user_message(f"what colour {i}?", 0)], cm.params(max_new_tokens=2 + i % 5)
        r = cm.reply(msgs, [], params)
        # the text as streamed (a trailing incomplete UTF-8 character is held back, as the server does)
        want.append(("".join(cm.stream(msgs, [], params)), r.completion_tokens))
    assert len(set(want)) > 1  # replies differ (lengths too), so one delivered to another request would show
    assert [(r.choices[0].message.content, r.usage.completion_tokens) for r in results] == want
    assert [(r.choices[0].message.content, r.usage.completion_tokens) for r in seq] == want[:4]
    tokens = sum(r.usage.completion_tokens for r in seq + results)
    steps = app.state.batcher.steps - before
    assert steps < tokens  # concurrent requests decoded in shared steps
    print(f"sequential {per_request * 1000:.0f} ms/request, concurrent {parallel * 1000:.0f} ms/request, "
          f"{tokens} tokens in {steps} decode steps")  # fmt: skip


def test_client_disconnect_frees_its_slot(server):
    url, app, _ = server
    with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True}) as r:  # fmt: skip
        next(r.iter_lines())
    for _ in range(100):
        if app.state.batcher.busy == 0:
            break
        time.sleep(0.05)
    assert app.state.batcher.busy == 0
    assert httpx.get(url + "/metrics").status_code == 401  # with a key set, /metrics needs it too
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "modalign_requests_total" in metrics and "modalign_in_flight" in metrics
    json.loads(httpx.get(url + "/health").text)


def test_web_page_in_headless_chromium(server, tmp_path):
    """Upload a ShapesWorld image in the page, ask, and see the streamed answer appear."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    sync_api = pytest.importorskip("playwright.sync_api")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed")
    from modalign.shapesworld import data as shapes

    url, app, _ = server
    shapes.generate(tmp_path / "sw", num_train=1, num_eval=1, seed=0, num_text=1)
    image = tmp_path / "sw" / "images" / "train_00000.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])  # fmt: skip
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#q", "first without the key")
        page.click("#send")
        page.wait_for_selector(".msg.error", timeout=30000)
        assert "API key" in page.inner_text(".msg.error")
        page.fill("#key", KEY)  # the page sends it as a bearer token
        page.dispatch_event("#key", "change")
        page.set_input_files("#img", str(image))
        page.fill("#q", "How many shapes are there?")
        page.click("#send")
        page.wait_for_selector("#answer-2[data-done='1']", timeout=30000)
        answer = page.inner_text("#answer-2")
        assert page.evaluate("sessionStorage.getItem('modalign-key')") == KEY
        assert page.locator("img.thumb").count() == 1  # the uploaded image is shown
        page.screenshot(path=str(tmp_path / "chat.png"))
        browser.close()
    assert answer.startswith("assistant: ") and len(answer) > len("assistant: ")
    assert (tmp_path / "chat.png").stat().st_size > 5000


def test_an_image_met_again_is_not_encoded_again(server, monkeypatch):
    """The next turn of a chat carries its image again: its visual tokens come from the cache
    (counted in /metrics), and the reply is the one a cold cache gives; its bytes are decoded
    once (the decoded-image cache), the answers the same."""
    from modalign.data import images as images_mod

    opened, real = [], images_mod.open_image
    monkeypatch.setattr(images_mod, "open_image", lambda src, *a, **k: opened.append(1) or real(src, *a, **k))
    url, app, _ = server
    cache = app.state.batcher.engine.image_cache
    img = [{"type": "image_url", "image_url": {"url": png_data_url((10, 200, 10))}},
           {"type": "text", "text": "what colour?"}]  # fmt: skip
    first = ask(url, messages=[{"role": "user", "content": img}])
    hits, misses = cache.hits, cache.misses
    turn2 = [{"role": "user", "content": img}, {"role": "assistant", "content": first.choices[0].message.content or "no"},
             {"role": "user", "content": "and the shape?"}]  # fmt: skip
    warm = ask(url, messages=turn2).choices[0].message.content
    assert (cache.hits, cache.misses) == (hits + 1, misses)
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert f'modalign_image_cache_lookups_total{{result="hit"}} {float(cache.hits)}' in metrics
    assert f"modalign_image_cache_entries {float(len(cache))}" in metrics
    cache.clear()
    assert ask(url, messages=turn2).choices[0].message.content == warm and cache.misses == misses + 1
    assert len(opened) <= 1  # the same upload three times: decoded at most once (once unless seen before)


def test_a_chat_served_with_the_prefix_cache_runs_only_each_turns_new_part(server):
    """``serve --prefix-cache-mb``: each turn of a chat with a picture reuses the keys and values
    of the turns before (counted in /metrics) and answers as the server without the cache."""
    from modalign.cli import build_parser
    from modalign.infer.chat import ChatModel

    assert build_parser().parse_args(["serve", "--model", "m"]).prefix_cache_mb == 1024
    assert build_parser().parse_args(["chat", "--model", "m", "--prefix-cache-mb", "0"]).prefix_cache_mb == 0
    plain_url, app, _ = server
    base = app.state.batcher.engine.model
    cm = tiny_chat_model()
    cached = ChatModel(base, cm.tok, prefix_cache_mb=16)
    url, stop = start(create_app(cached, ServeConfig(model_name="tiny", api_key=KEY, max_batch=4)))
    try:
        pc, reused = cached.engine.prefix, 0
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url((9, 9, 200))}},
                                             {"type": "text", "text": "what colour is the shape in the picture?"}]}]  # fmt: skip
        for i, q in enumerate(["and is it red?", "is it green or blue?", "what shape?"]):
            got = ask(url, messages=msgs, max_tokens=6).choices[0].message.content
            assert got == ask(plain_url, messages=msgs, max_tokens=6).choices[0].message.content
            assert (pc.hit_tokens > reused) == (i > 0)  # every turn after the first reuses the ones before
            reused = pc.hit_tokens
            msgs += [{"role": "assistant", "content": got or "no"}, {"role": "user", "content": q}]
        metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert f"modalign_prefix_cache_reused_tokens_total {float(pc.hit_tokens)}" in metrics
        assert f'modalign_prefix_cache_lookups_total{{result="hit"}} {float(pc.hits)}' in metrics
    finally:
        stop()


def test_a_compiled_server_compiles_before_it_listens_and_answers_as_the_eager_one():
    """``serve --compile``: the app's start-up runs the scheduler's warm-up, so the decode graphs
    exist before the first request; requests of one and of several rows then compile nothing
    more, and greedy answers equal the eager server's."""
    from torch._dynamo.utils import counters

    from modalign.cli import build_parser
    from modalign.infer.chat import ChatModel

    assert build_parser().parse_args(["serve", "--model", "m", "--compile"]).compile
    assert not build_parser().parse_args(["serve", "--model", "m"]).compile
    eager = tiny_chat_model()
    compiled = ChatModel(eager.model, eager.tok, compile=True)
    if not compiled.engine.fast.compiled:
        pytest.skip(f"torch.compile is unavailable here: {compiled.engine.fast.failed}")
    answers = {}
    for name, cm in (("eager", eager), ("compiled", compiled)):
        graphs = counters["stats"]["unique_graphs"]
        url, stop = start(create_app(cm, ServeConfig(model_name="tiny", api_key=KEY, max_batch=4)))
        try:
            warm = counters["stats"]["unique_graphs"]
            prompts = ["what colour?", "is it red?", "what shape is in the picture?"]
            with ThreadPoolExecutor(3) as ex:  # several rows at once as well as one
                got = list(ex.map(lambda q, u=url: ask(u, messages=[{"role": "user", "content": q}], max_tokens=8),
                                  prompts))  # fmt: skip
            got.append(ask(url, max_tokens=8))
            answers[name] = [r.choices[0].message.content for r in got]
            if name == "compiled":
                assert warm > graphs  # compiled before the server answered anything
                assert counters["stats"]["unique_graphs"] == warm  # and nothing after
        finally:
            stop()
    assert answers["compiled"] == answers["eager"]


def test_outbox_hands_a_steps_events_over_in_one_call():
    """Events the worker thread makes are held until ``flush`` and reach each event loop in one
    call, in order; events from another thread go at once; a closed loop is no error."""
    import asyncio
    import threading

    from modalign.serve.batcher import Outbox

    class Loop:  # records what the worker would schedule on the event loop
        def __init__(self, closed=False):
            self.calls, self.closed = [], closed

        def call_soon_threadsafe(self, fn, *args):
            if self.closed:
                raise RuntimeError("Event loop is closed")
            self.calls.append((fn, args))

    box, a, b = Outbox(), Loop(), Loop()
    qa, qb, qc = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
    box.owner = threading.get_ident()
    for item in (("token", 1, None), ("token", 2, None), ("end", "stop", None)):
        box.put(a, qa, item)
    box.put(a, qb, ("token", 7, None))
    box.put(b, qc, ("error", "x", None))
    assert not a.calls and not b.calls
    box.flush()
    assert len(a.calls) == len(b.calls) == 1 and not box.items
    for fn, args in a.calls + b.calls:
        fn(*args)
    assert [qa.get_nowait() for _ in range(3)] == [
        ("token", 1, None),
        ("token", 2, None),
        ("end", "stop", None),
    ]
    assert qb.get_nowait() == ("token", 7, None) and qc.get_nowait() == ("error", "x", None)
    box.flush()  # nothing held: no call
    assert len(a.calls) == 1
    box.owner = None  # another thread's events go at once
    box.put(a, qa, ("end", "length", None))
    assert len(a.calls) == 2
    box.owner = threading.get_ident()
    box.put(Loop(closed=True), qa, ("token", 3, None))
    box.flush()  # the loop is gone: dropped quietly
