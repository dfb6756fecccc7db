"""Tool calls (OpenAI ``tools`` / ``tool_choice``) in Qwen2's format, for chat templates of the
ChatML family (``chatml``, or a checkpoint's own Jinja template that writes ``<tool_call>``).

A checkpoint's Jinja template writes the tools, the calls and the results itself: it is given
``tools`` and messages with ``tool_calls`` and the ``tool`` role, as transformers'
``apply_chat_template(messages, tools=...)`` gives them (``native``). For ``chatml`` modalign
writes them (``write``), as Qwen2.5 / Qwen3's chat templates do:

- the system turn: the request's system message, a blank line, then the tools block::

      # Tools

      You may call one or more functions to assist with the user query.

      You are provided with function signatures within <tools></tools> XML tags:
      <tools>
      {"type": "function", "function": {...}}
      </tools>

      For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
      <tool_call>
      {"name": <function-name>, "arguments": <args-json-object>}
      </tool_call>

- an assistant turn that called tools: its text (if any) and a newline, then per call
  ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``, calls joined by a newline;
- tool results: consecutive ``tool`` messages make one user turn of
  ``<tool_response>\\n...\\n</tool_response>`` blocks joined by a newline.
- with no system message the tools block is the whole system turn (as Qwen3 writes it).

The reply is parsed back: each ``<tool_call>`` block holding a JSON object whose ``name`` is one
of the request's tools and whose ``arguments`` is an object becomes a ``tool_calls`` entry
(``finish_reason: tool_calls``), the text before the first block the message's content; a
reply without a valid block is plain content. ``tool_choice``: ``none`` leaves the tools out of
the prompt (the model answers in text), ``auto`` lets the model choose, ``required`` starts the
reply with ``<tool_call>\\n``, a named function with ``<tool_call>\\n{"name": "f", "arguments": ``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from modalign.data.conversation import IMAGE_MARK, RESERVED, Message
from modalign.serve.images import RequestError

TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 64


def _dumps(x) -> str:
    """As the chat templates' ``tojson`` writes it, less modalign's reserved characters (an image
    mark in a tool's description must not place an image)."""
    return json.dumps(x, ensure_ascii=False).translate(RESERVED).replace(IMAGE_MARK, "")


def _unicode(x, param: str) -> None:
    """Valid Unicode throughout (no lone surrogates), and not nested past what can be rendered."""
    try:
        json.dumps(x, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("text must be valid Unicode (no lone surrogates)", param=param) from None
    except RecursionError:
        raise RequestError("nested too deeply", param=param) from None


@dataclass
class ToolSpec:
    tools: list[dict]  # as the request gives them
    choice: str | None  # "none" | "auto" | "required" | a function name
    parallel: bool = True
    names: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def parse_tools(body: dict) -> ToolSpec | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a request, checked."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise RequestError("'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise RequestError(f"'tools' must be a list of at most {MAX_TOOLS} functions", param="tools")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise RequestError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param=f"tools[{i}]"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise RequestError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -",
                               param=f"tools[{i}].function.name")  # fmt: skip
        if name in names:
            raise RequestError(
                f"tools[{i}]: a second function named {name!r}", param=f"tools[{i}].function.name"
            )
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON Schema object",
                               param=f"tools[{i}].function.parameters")  # fmt: skip
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise RequestError(f"tools[{i}].function.description must be a string",
                               param=f"tools[{i}].function.description")  # fmt: skip
        _unicode(t, f"tools[{i}]")
        names.append(name)
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in names:
            raise RequestError("tool_choice must name one of the request's tools", param="tool_choice")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise RequestError("tool_choice must be none, auto, required or {'type': 'function', ...}",
                           param="tool_choice")  # fmt: skip
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError("'parallel_tool_calls' must be true or false", param="parallel_tool_calls")
    return ToolSpec(tools, choice, parallel, names)


def parse_call(call, where: str) -> tuple[str, dict]:
    """An assistant message's ``tool_calls`` entry -> (name, arguments object)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
        raise RequestError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}",
                           param=where)  # fmt: skip
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except (ValueError, RecursionError):
            raise RequestError(f"{where}.function.arguments must be a JSON object", param=where) from None
    if not isinstance(args, dict):
        raise RequestError(f"{where}.function.arguments must be a JSON object", param=where)
    _unicode(args, where)
    return fn["name"], args


def call_text(name: str, args: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {_dumps(args)}}}\n</tool_call>'


def system_text(system: str | None, tools: list[dict]) -> str:
    block = TOOLS_HEAD + "".join("\n" + _dumps(t) for t in tools) + TOOLS_TAIL
    return f"{system}\n\n{block}" if system else block


def write(
    messages: list[Message], calls: dict[int, list[tuple[str, dict]]], spec: ToolSpec | None
) -> list[Message]:
    """The conversation as the template reads it: tools in the system turn (when active), the
    assistant's calls and the tools' results written as text (module docstring)."""
    out: list[Message] = []
    for i, m in enumerate(messages):
        if m.role == "tool":
            block = f"<tool_response>\n{m.content}\n</tool_response>"
            if i and messages[i - 1].role == "tool":  # consecutive results share one user turn
                out[-1] = Message("user", out[-1].content + "\n" + block)
            else:
                out.append(Message("user", block))
            continue
        if m.role == "assistant" and calls.get(i):
            text = "\n".join(call_text(n, a) for n, a in calls[i])
            out.append(Message("assistant", f"{m.content}\n{text}" if m.content else text))
            continue
        out.append(Message(m.role, m.content))
    if spec is not None and spec.active:
        if out and out[0].role == "system":
            out[0] = Message("system", system_text(out[0].content, spec.tools))
        else:
            out.insert(0, Message("system", system_text(None, spec.tools)))
    return out


def clean(x):
    """Tools or arguments without modalign's reserved characters (every string, keys included)."""
    from modalign.data.conversation import _map_strings

    return _map_strings(x, lambda t: t.translate(RESERVED).replace(IMAGE_MARK, ""))


def native(messages: list[Message], calls: dict[int, list[tuple[str, dict]]]) -> list[Message]:
    """The conversation for a checkpoint's own Jinja template, which writes tools, calls and
    results itself: each assistant message carries its calls (``tool_calls``), tool results
    keep their role."""
    return [Message(m.role, m.content, [{"type": "function", "function": {"name": n, "arguments": clean(a)}}
                                        for n, a in calls[i]] if calls.get(i) else None)
            for i, m in enumerate(messages)]  # fmt: skip


def forced_prefix(spec: ToolSpec | None) -> str:
    """The text the reply is made to start with (``required`` or a named function)."""
    if spec is None or not spec.active or spec.choice == "auto":
        return ""
    if spec.choice == "required":
        return "<tool_call>\n"
    return f'<tool_call>\n{{"name": "{spec.choice}", "arguments": '


def parse_reply(text: str, spec: ToolSpec) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply (the forced prefix included)."""
    calls = []
    for body in _call_bodies(text if "</tool_call>" in text else text + "</tool_call>"):
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            continue
        if (
            not isinstance(doc, dict)
            or doc.get("name") not in spec.names
            or not isinstance(doc.get("arguments", {}), dict)
        ):
            continue
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": doc["name"], "arguments": _dumps(doc.get("arguments", {}))}})  # fmt: skip
        if not spec.parallel:
            break
    if not calls:
        return text, []
    head = text[: text.index("<tool_call>")].strip()
    return head or None, calls


def _call_bodies(text: str) -> list[str]:
    """What each <tool_call> ... </tool_call> holds, stripped, in order: one pass over the text
    (a pattern with a lazy body retried from every opening tag takes quadratic time when a reply
    opens many tags after its last closing one)."""
    out, i = [], 0
    while (a := text.find("<tool_call>", i)) >= 0 and (b := text.find("</tool_call>", a + 11)) >= 0:
        out.append(text[a + 11 : b].strip())
        i = b + 12
    return out


def supports_tools(template) -> bool:
    """ChatML-family templates: ``chatml`` or a Jinja template that writes ``<tool_call>``."""
    if template.name == "chatml":
        return True
    return template.name == "jinja" and "<tool_call>" in getattr(template, "source", "")
