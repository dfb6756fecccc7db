"""The OpenAI chat-completions request, checked: every field the server reads is validated with
an error naming it (OpenAI's ``param``), cheap limits (messages, characters, images) are checked
before anything is rendered or decoded, and fields the server does not implement are refused by
name rather than ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from modalign.data.conversation import IMAGE_MARK, RESERVED, Message
from modalign.serve.images import ImagePolicy, RequestError
from modalign.serve.tools import ToolSpec, parse_call, parse_tools

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# fields of the API that this server does not implement: refused by name, never silently ignored
UNSUPPORTED = ("functions", "function_call", "audio", "prediction", "web_search_options")  # fmt: skip
SEED_RANGE = (-(2**63), 2**63 - 1)


@dataclass
class Limits:
    max_messages: int = 256
    max_chars: int = 200_000  # characters of text in one request, over all messages
    max_images: int = 8


@dataclass
class ChatRequest:
    messages: list[Message]
    images: list[tuple[str, str]]  # (image_url, param) in order; fetched and decoded later
    sampling: dict  # SamplingParams fields
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: off; k: the chosen token's and the top k
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    tools: ToolSpec | None = None  # tools / tool_choice (modalign.serve.tools)
    calls: dict[int, list[tuple[str, dict]]] = field(default_factory=dict)  # message index -> its tool calls


def _text(value, param: str) -> str:
    """A string from the request as text: lone surrogates refused, reserved characters removed."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("text must be valid Unicode (no lone surrogates)", param=param) from None
    return value.translate(RESERVED).replace(IMAGE_MARK, "")


def parse_messages(body: dict, limits: Limits, extra_chars: int = 0):
    """(messages, images as (url, param), tool calls by message index). ``extra_chars``: text the
    request holds besides its messages (its tool definitions), counted against the same limit."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    if len(msgs) > limits.max_messages:
        raise RequestError(f"at most {limits.max_messages} messages per request", param="messages",
                           code="too_many_messages")  # fmt: skip
    out, images, chars, calls = [], [], extra_chars, {}

    def count(text: str, param: str) -> str:
        nonlocal chars
        chars += len(text)
        if chars > limits.max_chars:
            raise RequestError(f"the messages (and tools) hold more than {limits.max_chars} characters",
                               param=param, code="context_length_exceeded")  # fmt: skip
        return text

    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role must be system, developer, user, assistant or tool",
                               param=f"messages[{i}].role")  # fmt: skip
        content, where = m.get("content"), f"messages[{i}].content"
        if content is None and m["role"] == "assistant":
            content = ""
        if isinstance(content, str):
            text = count(_text(content, where), where)
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                pw = f"{where}[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(count(_text(part["text"], pw), pw))
                elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                    if len(images) >= limits.max_images:
                        raise RequestError(f"at most {limits.max_images} images per request", param=pw,
                                           code="too_many_images")  # fmt: skip
                    url = part["image_url"].get("url")
                    if not isinstance(url, str) or not url:
                        raise RequestError("image_url.url must be a non-empty string", param=pw,
                                           code="invalid_image_url")  # fmt: skip
                    images.append((url, pw))
                    pieces.append(IMAGE_MARK)
                else:
                    raise RequestError(f"{pw}: expected a text or image_url content part", param=pw)
            text = "".join(pieces)
        else:
            raise RequestError(f"{where} must be a string or a list of parts", param=where)
        if m["role"] == "tool" and IMAGE_MARK in text:
            raise RequestError(f"{where}: a tool result is text only", param=where)
        if m["role"] == "assistant" and m.get("tool_calls"):
            tc = m["tool_calls"]
            if not isinstance(tc, list):
                raise RequestError(
                    f"messages[{i}].tool_calls must be a list", param=f"messages[{i}].tool_calls"
                )
            calls[i] = [parse_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(tc)]
            for j, (name, args) in enumerate(calls[i]):  # the arguments are rendered as text too
                count(name + json.dumps(args, ensure_ascii=False), f"messages[{i}].tool_calls[{j}]")
        out.append(Message(ROLES[m["role"]], text))
    if out[-1].role not in ("user", "tool"):
        raise RequestError("the last message must come from the user (or a tool)", param="messages")
    return out, images, calls


def _number(body: dict, name: str, lo, hi, default, kind=float, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    if (
        isinstance(v, bool)
        or not isinstance(v, int | float)
        or not (lo < v if lo_open else lo <= v)
        or v > hi
    ):
        raise RequestError(f"'{name}' must be a number in {'(' if lo_open else '['}{lo}, {hi}]", param=name)
    if kind is int and v != int(v):
        raise RequestError(f"'{name}' must be an integer", param=name)
    return kind(v)


def parse_request(body, limits: Limits) -> ChatRequest:
    """Check a parsed JSON body; raise ``RequestError`` naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise RequestError(
                f"'{name}' is not supported by this server", param=name, code="unsupported_parameter"
            )
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise RequestError(f"response_format {kind!r} is not supported (only 'text')", param="response_format",
                           code="unsupported_parameter")  # fmt: skip
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError("only n=1 is supported", param="n")
    tools = parse_tools(body)
    tool_chars = len(json.dumps(tools.tools, ensure_ascii=False)) if tools is not None else 0
    if tool_chars > limits.max_chars:
        raise RequestError(f"the tool definitions hold more than {limits.max_chars} characters", param="tools",
                           code="context_length_exceeded")  # fmt: skip
    msgs, images, calls = parse_messages(body, limits, tool_chars)
    max_tokens = _number(body, "max_tokens", 1, 1 << 20, None, int)
    if body.get("max_completion_tokens") is not None:  # the newer name wins
        max_tokens = _number(body, "max_completion_tokens", 1, 1 << 20, None, int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]
    ):
        raise RequestError(f"'seed' must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", param="stream")
    opts = body.get("stream_options")
    if opts is not None and (
        not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool)
    ):
        raise RequestError(
            "'stream_options' must be an object like {\"include_usage\": true}", param="stream_options"
        )
    want_lp = body.get("logprobs", False)
    if want_lp is not None and not isinstance(want_lp, bool):
        raise RequestError("'logprobs' must be true or false", param="logprobs")
    top = _number(body, "top_logprobs", 0, 20, None, int)
    if top is not None and not want_lp:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict) or len(bias) > 300:
        raise RequestError("'logit_bias' must map at most 300 token ids to numbers", param="logit_bias")
    logit_bias = {}
    for k, v in bias.items():
        if (
            not (isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 12)  # "²" is a digit too
            or isinstance(v, bool)
            or not isinstance(v, int | float)
            or not -100 <= v <= 100
        ):
            raise RequestError(
                "'logit_bias' must map token ids to numbers in [-100, 100]", param="logit_bias"
            )
        logit_bias[int(k)] = float(v)
    return ChatRequest(
        messages=msgs, images=images, stop=stop, stream=stream, tools=tools, calls=calls,
        include_usage=bool((opts or {}).get("include_usage")),
        logprobs=(top or 0) if want_lp else None, logit_bias=logit_bias,
        presence_penalty=_number(body, "presence_penalty", -2, 2, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", -2, 2, 0.0),
        sampling={
            "max_new_tokens": max_tokens,
            "temperature": _number(body, "temperature", 0, 2, 1.0),
            "top_p": _number(body, "top_p", 0, 1, 1.0, lo_open=True),
            "top_k": _number(body, "top_k", 0, 1 << 20, 0, int),
            "repetition_penalty": _number(body, "repetition_penalty", 0, 10, 1.0, lo_open=True),
            "seed": seed,
        },
    )  # fmt: skip


__all__ = ["ChatRequest", "ImagePolicy", "Limits", "RequestError", "parse_request"]
