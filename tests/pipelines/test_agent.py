"""The MM-REACT-style agent against a scripted OpenAI-compatible endpoint on loopback: tools
offered, calls run on the named image, observations sent back, the loop's bounds, the log; and
the whole loop on modalign models (``modalign serve`` as the LLM's endpoint)."""

import json

import pytest

from modalign.data.conversation import IMAGE_MARK
from modalign.llm_client import LLMClient
from modalign.pipelines.agent import SYSTEM, Agent, Experts, ImageTable, Tool, vision_agent, vision_tools
from tests.fake_llm import FakeLLM


class FakeChat:
    """Stands in for a ChatModel: answers from a table keyed by (image, prompt)."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def params(self, **kw):
        return kw

    def reply(self, messages, images, params):
        prompt = messages[0].content.replace(IMAGE_MARK, "").strip()
        self.asked.append((images[0], prompt))
        return type("R", (), {"text": self.table.get((images[0], prompt), "?")})()


def call(name, **args):
    return {
        "id": f"call_{name}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
    }


def test_agent_calls_experts_and_answers(tmp_path):
    script = iter([
        {"content": None, "tool_calls": [call("caption", image="image_1")]},
        {"content": None, "tool_calls": [call("count", image="image_1", object="stars"),
                                          call("vqa", image="image_2", question="What colour is it?")]},
        {"content": "Two red stars."},
    ])  # fmt: skip
    cap = FakeChat({("a.png", "Describe the image briefly."): "red stars"})
    vqa = FakeChat({("a.png", "How many stars are there?"): "two", ("b.png", "What colour is it?"): "red"})
    log = tmp_path / "steps.jsonl"
    with FakeLLM(lambda body: next(script)) as fake:
        agent = vision_agent(LLMClient(fake.url, "m"), Experts(cap, vqa), log=log)
        res = agent.run("How many red stars?", ["a.png", "b.png"])
        reqs = fake.requests
    assert (
        res.answer == "Two red stars." and res.stop == "answer" and res.llm_calls == 3 and res.tool_calls == 3
    )
    assert res.tokens == 45 and cap.asked == [("a.png", "Describe the image briefly.")]
    assert vqa.asked == [("a.png", "How many stars are there?"), ("b.png", "What colour is it?")]
    first = reqs[0]
    assert first["messages"] == [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": "How many red stars?\n(images: image_1, image_2)"}]  # fmt: skip
    assert [t["function"]["name"] for t in first["tools"]] == [
        "caption",
        "vqa",
        "list_objects",
        "count",
        "read_text",
    ]
    assert first["tool_choice"] == "auto" and first["temperature"] == 0.0
    last = reqs[2]["messages"]
    assert last[2] == {"role": "assistant", "content": None, "tool_calls": [call("caption", image="image_1")]}
    assert last[3] == {"role": "tool", "tool_call_id": "call_caption", "content": "red stars"}
    assert [m["content"] for m in last[5:]] == ["two", "red"] and last[5]["tool_call_id"] == "call_count"
    logged = [json.loads(x) for x in log.read_text().splitlines()]
    assert logged == res.steps and [len(s["tool_calls"]) for s in logged] == [1, 2, 0]
    assert logged[1]["tool_calls"][1]["observation"] == "red"


def test_bad_calls_become_observations_and_the_loop_is_bounded():
    replies = [
        {"content": None, "tool_calls": [call("vqa", image="/etc/passwd", question="q")]},
        {"content": None, "tool_calls": [call("nope"), {"id": "x", "type": "function",
                                                         "function": {"name": "caption", "arguments": "{oops"}}]},
        {"content": None, "tool_calls": [call("vqa", image="image_1"), {"id": "y", "function": "caption"}]},
    ]  # fmt: skip
    it = iter(replies)
    vqa = FakeChat({})
    with FakeLLM(lambda body: next(it) if body["tool_choice"] == "auto" else {"content": "no idea"}) as fake:
        agent = vision_agent(LLMClient(fake.url, "m"), Experts(vqa), max_steps=4)
        res = agent.run("q?", {"image_1": "a.png"})
        choices = [r["tool_choice"] for r in fake.requests]
    obs = [c["observation"] for s in res.steps for c in s["tool_calls"]]
    assert obs[0].startswith("error: unknown image '/etc/passwd'") and vqa.asked == []  # never opened
    assert obs[1].startswith("error: no tool named 'nope'") and obs[2].startswith(
        "error: the arguments of caption"
    )
    assert obs[3] == "error: vqa needs the argument(s) question"
    assert obs[4].startswith("error: no tool named None")  # a function that is no object (it crashed the run)
    assert choices == ["auto", "auto", "auto", "none"] and res.answer == "no idea" and res.llm_calls == 4
    with FakeLLM(lambda body: {"content": None, "tool_calls": [call("t")]}) as fake:
        agent = Agent(
            LLMClient(fake.url, "m"), [Tool("t", "d", {"type": "object"}, lambda a: "x")], max_tokens=30
        )
        res = agent.run("q", [])
    assert res.stop == "max_tokens" and res.answer is None and res.llm_calls == 2 and res.tokens == 30


def test_failing_experts_and_malformed_replies_end_cleanly():
    def broken(a):
        raise OSError("cannot identify image file 'a.png'")

    tools = [Tool("look", "d", {"type": "object"}, broken)]
    replies = iter([{"content": None, "tool_calls": [{"id": "1", "type": "function",
                                                      "function": {"name": "look", "arguments": {"x": 1}}}]},
                    {"content": "done"}])  # fmt: skip
    with FakeLLM(lambda body: next(replies)) as fake:
        res = Agent(LLMClient(fake.url, "m"), tools).run("q", [])
    assert res.answer == "done" and res.steps[0]["tool_calls"][0]["observation"].startswith("error: OSError")
    with FakeLLM(lambda body: {"content": None, "tool_calls": "oops"}) as fake:
        res = Agent(LLMClient(fake.url, "m"), tools).run("q", [])
    assert res.stop == "error" and res.answer is None and "tool_calls" in res.steps[0]["error"]


def test_tools_are_checked():
    with pytest.raises(ValueError, match="unknown agent tool"):
        vision_tools(Experts(None), ImageTable(), ("caption", "ocr"))
    t = Tool("t", "d", {"type": "object"}, lambda a: "x")
    with pytest.raises(ValueError, match="distinct names"):
        Agent(None, [t, t])


def test_agent_runs_on_modalign_serve(tmp_path):
    """The LLM is a modalign model behind ``modalign serve`` (random weights: it answers without a
    call; tool_choice none on the last step); the request with tools is accepted and rendered."""
    from modalign.serve.app import ServeConfig, create_app
    from tests.serve.helpers import start, tiny_chat_model

    url, stop = start(create_app(tiny_chat_model(context=2048), ServeConfig(model_name="tiny")))
    try:
        agent = vision_agent(LLMClient(url + "/v1", "tiny"), Experts(FakeChat({})), ("vqa",), max_steps=2,
                             max_reply_tokens=4)  # fmt: skip
        res = agent.run("What colour?", ["a.png"])
    finally:
        stop()
    assert res.stop == "answer" and isinstance(res.answer, str) and res.llm_calls == 1 and res.tokens > 300


def test_agent_and_pipeline_commands(world, tiny_model, tmp_path, capsys):
    """``modalign agent`` and ``modalign pipeline`` end to end: a modalign model as the expert /
    captioner, the LLM a scripted endpoint; results, steps and prompts written."""
    from modalign.cli import main

    rec = json.loads((world / "eval.json").read_text())[0]
    image = str(world / rec["image"])
    script = iter([{"content": None, "tool_calls": [call("vqa", image="image_1", question="What colour?")]},
                   {"content": "red"}])  # fmt: skip
    with FakeLLM(lambda body: next(script)) as fake:
        rc = main(["agent", "--llm-endpoint", fake.url, "--llm-model", "m", "--captioner", str(tiny_model),
                   "--image", image, "--question", "What colour?", "--json", "--log", str(tmp_path / "log.jsonl"),
                   "--tools", "vqa,caption"])  # fmt: skip
        tools = [t["function"]["name"] for t in fake.requests[0]["tools"]]
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["answer"] == "red" and out["llm_calls"] == 2 and tools == ["vqa", "caption"]
    assert isinstance(out["steps"][0]["tool_calls"][0]["observation"], str)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2
    assert main(["agent", "--llm-endpoint", "http://127.0.0.1:9/v1", "--llm-model", "m", "--captioner",
                 str(tiny_model), "--image", str(tmp_path / "absent.png"), "--question", "q"]) == 2  # fmt: skip

    with FakeLLM(lambda body: " Red. more") as fake:
        rc = main(["pipeline", "img2llm", "--questions", str(world / "eval.json"), "--captioner", str(tiny_model),
                   "--llm-endpoint", fake.url, "--llm-model", "m", "--limit", "3", "--captions-per-image", "2",
                   "--out", str(tmp_path / "i2l"), "--no-progress"])  # fmt: skip
        prompts = [b["messages"][0]["content"] for b in fake.requests]
    res = json.loads((tmp_path / "i2l" / "results.json").read_text())
    assert rc == 0 and res["questions"] == 3 and res["llm_calls"] == 3 == len(prompts)
    assert all(p.startswith("Please reason the answer") for p in prompts)
    samples = [json.loads(x) for x in (tmp_path / "i2l" / "samples.jsonl").read_text().splitlines()]
    assert [s["prediction"] for s in samples] == ["red"] * 3
    with FakeLLM(lambda body: ("yes", [("yes", -0.5)])) as fake:
        rc = main(["pipeline", "pica", "--questions", str(world / "eval.json"), "--shots", str(world / "instruct.json"),
                   "--captioner", str(tiny_model), "--llm-endpoint", fake.url, "--llm-model", "m", "--limit", "2",
                   "--metric", "random", "--n-shot", "2", "--n-ensemble", "2", "--no-progress"])  # fmt: skip
        assert rc == 0 and len(fake.requests) == 4
        assert all(b["messages"][0]["content"].count("\nA: ") == 2 for b in fake.requests)
    assert (
        main(
            [
                "pipeline",
                "pnp-vqa",
                "--questions",
                str(world / "eval.json"),
                "--captioner",
                str(tiny_model),
                "--llm-endpoint",
                "http://127.0.0.1:9/v1",
                "--llm-model",
                "m",
            ]
        )
        == 2
    )  # no --itm: a clear error
