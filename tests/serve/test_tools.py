"""Tool calls in ``modalign serve``: the conversation written in Qwen2's tool format, the reply's
calls parsed back, tool_choice, requests checked, and the prompt the server runs."""

import json

import httpx
import pytest

from modalign.data.conversation import Message
from modalign.serve.app import Reply, ServeConfig, create_app
from modalign.serve.protocol import Limits, parse_request
from modalign.serve.tools import forced_prefix, parse_reply, parse_tools, write
from tests.serve.helpers import KEY, start, tiny_chat_model

AUTH = {"Authorization": f"Bearer {KEY}"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def test_conversation_is_written_in_qwen2s_tool_format():
    spec = parse_tools({"tools": [WEATHER, TIME]})
    msgs = [Message("system", "Be brief."), Message("user", "Weather in Paris and the time?"),
            Message("assistant", "Checking."), Message("tool", "18 C"), Message("tool", "12:00"),
            Message("user", "Thanks")]  # fmt: skip
    calls = {2: [("get_weather", {"city": "Paris"}), ("get_time", {})]}
    got = write(msgs, calls, spec)
    tools = json.dumps(WEATHER) + "\n" + json.dumps(TIME)
    system = ("Be brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + tools +
              "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
              "<args-json-object>}\n</tool_call>")  # fmt: skip
    assert [(m.role, m.content) for m in got] == [
        ("system", system),
        ("user", "Weather in Paris and the time?"),
        ("assistant", 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                      '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
        ("user", "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n12:00\n</tool_response>"),
        ("user", "Thanks"),
    ]  # fmt: skip
    # no system message: the tools block alone; tool_choice none: no tools block at all
    assert write([Message("user", "hi")], {}, spec)[0].content == system[len("Be brief.\n\n") :]
    none = parse_tools({"tools": [WEATHER], "tool_choice": "none"})
    assert [m.role for m in write([Message("user", "hi")], {}, none)] == ["user"]


def test_reply_calls_are_parsed_back():
    spec = parse_tools({"tools": [WEATHER, TIME]})
    content, calls = parse_reply('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                                 '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
                                 spec)  # fmt: skip
    assert content == "Let me look."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Oslo"}), ("function", "get_time", {})]  # fmt: skip
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    # an unknown function, broken JSON or non-object arguments: plain text
    for text in ('<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>',
                 '<tool_call>\n{"name": "get_time", "arguments": {\n</tool_call>',
                 '<tool_call>\n{"name": "get_time", "arguments": [1]}\n</tool_call>', "It is sunny."):  # fmt: skip
        assert parse_reply(text, spec) == (text, [])
    # the closing tag may be cut off (a stop string, max_tokens)
    assert (
        parse_reply('<tool_call>\n{"name": "get_time", "arguments": {}}', spec)[1][0]["function"]["name"]
        == "get_time"
    )
    one = parse_tools({"tools": [WEATHER, TIME], "parallel_tool_calls": False})
    two = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_time"}</tool_call>'
    assert len(parse_reply(two, one)[1]) == 1 and len(parse_reply(two, spec)[1]) == 2


def test_tool_choice_prefixes():
    assert forced_prefix(parse_tools({"tools": [WEATHER]})) == ""
    assert forced_prefix(parse_tools({"tools": [WEATHER], "tool_choice": "required"})) == "<tool_call>\n"
    named = parse_tools(
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    )
    assert forced_prefix(named) == '<tool_call>\n{"name": "get_weather", "arguments": '
    assert forced_prefix(parse_tools({"tools": [WEATHER], "tool_choice": "none"})) == ""


def test_reply_message_with_calls_and_finish_reason():
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}  # fmt: skip
    req = parse_request(body, Limits())
    reply = Reply.__new__(Reply)
    reply.req = req
    msg, finish = reply._message(
        '{"city": "Rome"}}\n</tool_call>', "stop"
    )  # the text after the forced prefix
    assert finish == "tool_calls" and msg["content"] is None
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert reply._message("no call", "stop") == (
        {"role": "assistant", "content": prefix_of(req) + "no call"},
        "stop",
    )


def prefix_of(req):
    return forced_prefix(req.tools)


@pytest.fixture(scope="module")
def server():
    cm = tiny_chat_model(context=1024)
    url, stop = start(create_app(cm, ServeConfig(model_name="tiny", api_key=KEY)))
    yield url, cm
    stop()


def post(url, body):
    return httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 3, "temperature": 0} | body,
                      headers=AUTH, timeout=60)  # fmt: skip


def test_server_runs_the_written_prompt(server):
    url, cm = server
    msgs = [{"role": "user", "content": "what colour"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"red\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "blue"}]  # fmt: skip
    ours = [Message("user", "what colour"), Message("assistant", ""), Message("tool", "blue")]
    for choice, prefix in (("auto", ""), ({"type": "function", "function": {"name": "get_time"}}, None)):
        r = post(url, {"messages": msgs, "tools": [WEATHER, TIME], "tool_choice": choice})
        assert r.status_code == 200, r.text
        spec = parse_tools({"tools": [WEATHER, TIME], "tool_choice": choice})
        ids = cm.prompt_ids(write(ours, {1: [("get_weather", {"city": "red"})]}, spec))
        ids += cm.tok.encode(forced_prefix(spec))
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        assert prefix is not None or forced_prefix(spec).endswith('"arguments": ')
    # streaming with tools: whole chunks, a finish reason, [DONE]
    with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny", "max_tokens": 3, "messages": msgs, "tools": [WEATHER],
                            "stream": True}) as r:  # fmt: skip
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    finishes = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
    assert finishes[-1] in ("stop", "length", "tool_calls") and finishes[:-1] == [None] * (len(finishes) - 1)


def test_templates_without_tool_format_refuse_tools():
    cm = tiny_chat_model(context=512)
    from modalign.data.conversation import get_template

    cm.template = get_template("vicuna_v1")
    url, stop = start(create_app(cm, ServeConfig(model_name="tiny", api_key=KEY)))
    try:
        r = post(url, {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        r = post(
            url, {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "tool_choice": "none"}
        )
        assert r.status_code == 200  # no tools in the prompt: any template
    finally:
        stop()


def test_a_checkpoints_jinja_template_writes_the_tools_itself():
    """A Jinja template that writes <tool_call>: the server hands it tools, calls and tool
    messages as transformers would (the ids equal ``apply_chat_template``'s: tests/data)."""
    from modalign.data.conversation import get_template
    from modalign.serve.tools import native
    from tests.data.test_chat_templates import TOOLS

    cm = tiny_chat_model(context=2048)
    cm.tok.chat_template = TOOLS
    cm.template = get_template("jinja", cm.tok)
    url, stop = start(create_app(cm, ServeConfig(model_name="tiny", api_key=KEY)))
    msgs = [{"role": "user", "content": "what colour"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"red\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "blue"}]  # fmt: skip
    try:
        r = post(url, {"messages": msgs, "tools": [WEATHER]})
    finally:
        stop()
    assert r.status_code == 200, r.text
    ours = native([Message("user", "what colour"), Message("assistant", ""), Message("tool", "blue")],
                  {1: [("get_weather", {"city": "red"})]})  # fmt: skip
    ids = cm.prompt_ids(ours, tools=[WEATHER])
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    assert "# Tools" in cm.tok.decode(ids) and "get_weather" in cm.tok.decode(ids)


def test_call_bodies_are_the_tagged_spans_a_lazy_pattern_finds():
    """One pass finds what ``<tool_call>\\s*(.*?)\\s*</tool_call>`` finds, on random replies of tags,
    white space and text (the pattern took quadratic time on many unclosed tags)."""
    import random
    import re

    from modalign.serve.tools import _call_bodies

    pattern = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
    parts = ["<tool_call>", "</tool_call>", " ", "\n", "\u2003", '{"name": "f"}', "x", "<tool", "call>"]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))
        assert _call_bodies(text) == [m.group(1) for m in pattern.finditer(text)], text
    many = "</tool_call>" + "<tool_call>x" * 20000  # every tag opened after the last closing one
    assert _call_bodies(many) == []
