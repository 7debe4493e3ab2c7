"""Gemma / FunctionGemma chat prompts, and tool schemas from Python functions.

>>> from gemma_rs.chat import render_chat
>>> render_chat([{"role": "user", "content": "Hi"}])
'<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n'

The text has no BOS: tokenizing it with BOS (``model.tokenize(text)``) gives the model's input.

The format (FunctionGemma's, which is Gemma 3's plus function-calling tokens):

- Turns are ``<start_of_turn>ROLE\\n...<end_of_turn>\\n`` with ROLE ``developer``, ``user`` or
  ``model``; ``system`` and ``developer`` messages become ``developer`` turns, ``assistant`` and
  ``model`` messages ``model`` turns. Message text is stripped of surrounding whitespace, as
  Gemma's own chat templates do.
- Tool declarations, ``<start_function_declaration>declaration:NAME{...}<end_function_declaration>``
  one after the other, follow the text of the first message when it is a ``system``/``developer``
  message, with no separator. Without one, a developer turn holding only the declarations opens
  the prompt.
- An assistant's tool calls follow its text in its model turn, as
  ``<start_function_call>call:NAME{...}<end_function_call>``; that turn stays open: each ``tool``
  message's response, ``<start_function_response>response:NAME{...}<end_function_response>``,
  follows directly (no newline, no turn markers), and the next assistant message continues the
  same model turn, which its ``<end_of_turn>\\n`` closes. Any other message after a tool response
  closes the open model turn first.
- ``add_generation_prompt`` appends ``<start_of_turn>model\\n``, except when a model turn is still
  open (the prompt ends with a tool call or a tool response): then the model continues it and
  nothing is appended.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

__all__ = [
    "Message",
    "check_messages",
    "function_schema",
    "normalize_tools",
    "render_chat",
    "trim_history",
]

Message = dict
"""A chat message: ``{"role": ..., "content": ...}``, with optional ``"tool_calls"`` (assistant)
and ``"name"`` / ``"tool_call_id"`` (tool)."""

_ESCAPE = "<escape>"
_ROLES = {
    "system": "developer",
    "developer": "developer",
    "user": "user",
    "assistant": "model",
    "model": "model",
}


# ----------------------------------------------------------------------------------------------
# Declarations (the schema syntax)


def _decl_value(value: Any) -> str:
    """A value inside a declaration: strings in ``<escape>``, JSON scalars, lists, mappings."""
    if isinstance(value, str):
        return f"{_ESCAPE}{value}{_ESCAPE}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return _decl_schema(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_decl_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} value {value!r} in a tool declaration")


def _decl_type(value: Any) -> str:
    if isinstance(value, str):
        return _decl_value(value.upper())
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_decl_type(v) for v in value) + "]"
    return _decl_value(value)


def _schema_key_order(key: str) -> tuple[int, str]:
    return (0 if key == "description" else 2 if key == "type" else 1, key)


def _decl_schema(schema: Mapping[str, Any]) -> str:
    """A schema object: keys sorted, ``description`` first and ``type`` last (upper-cased);
    ``properties`` maps sorted names to schemas."""
    parts = []
    for key in sorted(schema, key=_schema_key_order):
        value = schema[key]
        if key == "type":
            text = _decl_type(value)
        elif key == "properties" and isinstance(value, Mapping):
            text = "{" + ",".join(f"{n}:{_decl_schema(value[n])}" for n in sorted(value)) + "}"
        else:
            text = _decl_value(value)
        parts.append(f"{key}:{text}")
    return "{" + ",".join(parts) + "}"


def _declaration(tool: Mapping[str, Any]) -> str:
    body = {k: v for k, v in tool.items() if k != "name" and v is not None}
    if not body.get("required", True):
        del body["required"]
    params = body.get("parameters")
    if isinstance(params, Mapping) and "required" in params and not params["required"]:
        body["parameters"] = {k: v for k, v in params.items() if k != "required"}
    return (
        f"<start_function_declaration>declaration:{tool['name']}"
        f"{_decl_schema(body)}<end_function_declaration>"
    )


def normalize_tools(tools: Sequence[Any] | None) -> list[dict[str, Any]]:
    """Tools as bare schema dicts ``{"name", "description", "parameters"}``.

    Each tool is an OpenAI-style dict ``{"type": "function", "function": {...}}``, a bare schema
    dict (with a ``"name"``), or a Python callable (see :func:`function_schema`).
    """
    out: list[dict[str, Any]] = []
    for tool in tools or ():
        if isinstance(tool, Mapping):
            if "function" in tool and isinstance(tool["function"], Mapping):
                tool = tool["function"]
            if "name" not in tool:
                raise ValueError(f"tool dict without a 'name': {tool!r}")
            out.append(dict(tool))
        elif callable(tool):
            out.append(function_schema(tool))
        else:
            raise TypeError(f"a tool must be a dict or a callable, not {type(tool).__name__}")
    return out


# ----------------------------------------------------------------------------------------------
# Schemas from Python functions

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_LISTS = (list, Sequence, typing.List, typing.Sequence)  # noqa: UP006
_DICTS = (dict, Mapping, typing.Dict, typing.Mapping)  # noqa: UP006
_UNION_TYPES: tuple[Any, ...] = (Union,) + (
    (types.UnionType,) if hasattr(types, "UnionType") else ()
)


def _literal_type(values: Sequence[Any]) -> str:
    kinds = {_SCALARS.get(type(v)) for v in values}
    if len(kinds) != 1 or None in kinds:
        raise TypeError(f"Literal values must all be str, int, float or bool: {values!r}")
    return kinds.pop()  # type: ignore[return-value]


def _annotation_schema(ann: Any, param: str) -> tuple[dict[str, Any], bool]:
    """The JSON schema of an annotation, and whether it admits None (Optional)."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann in _SCALARS:
        return {"type": _SCALARS[ann]}, False
    if origin in _UNION_TYPES:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            schema, _ = _annotation_schema(rest[0], param)
            return schema, True
        raise TypeError(f"parameter {param!r}: unsupported union annotation {ann!r}")
    if origin is typing.Literal:
        return {"type": _literal_type(args), "enum": list(args)}, False
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        values = [m.value for m in ann]
        return {"type": _literal_type(values), "enum": values}, False
    if ann in _LISTS or origin in _LISTS:
        schema: dict[str, Any] = {"type": "array"}
        if args:
            schema["items"], _ = _annotation_schema(args[0], param)
        return schema, False
    if ann in _DICTS or origin in _DICTS:
        return {"type": "object"}, False
    raise TypeError(f"parameter {param!r}: unsupported annotation {ann!r}")


_SECTION = re.compile(
    r"^(Args|Arguments|Parameters|Returns?|Yields?|Raises|Examples?|Notes?|Attributes|"
    r"See Also|Warnings?|Todo):\s*$"
)
_ARG = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The first paragraph, and the ``Args:`` descriptions, of a Google-style docstring."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION.match(line.strip()):
            break
        summary.append(line.strip())
    args: dict[str, str] = {}
    in_args = False
    arg_indent: int | None = None
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not in_args:
            if indent == 0 and stripped in ("Args:", "Arguments:", "Parameters:"):
                in_args, arg_indent, current = True, None, None
            continue
        if not stripped:
            continue
        if indent == 0:  # the next section (or text) ends Args
            in_args = False
            if stripped in ("Args:", "Arguments:", "Parameters:"):
                in_args, arg_indent, current = True, None, None
            continue
        if arg_indent is None:
            arg_indent = indent
        match = _ARG.match(stripped)
        if indent <= arg_indent and match:
            current = match.group(1)
            args[current] = match.group(2).strip()
        elif current is not None:  # a continuation line
            args[current] = f"{args[current]} {stripped}".strip()
    return " ".join(summary), args


def function_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The bare tool schema ``{"name", "description", "parameters"}`` of a Python function.

    The description is the docstring's first paragraph and the parameter descriptions come from
    its Google-style ``Args:`` section. Annotations map to JSON schema: ``str`` → string, ``int``
    → integer, ``float`` → number, ``bool`` → boolean, ``list[X]`` / ``List[X]`` → array of X,
    ``dict`` → object, ``Literal["a", "b"]`` (or an ``Enum``) → string with ``enum``;
    ``Optional[X]`` / ``X | None`` is X and not required, nor is a parameter with a default.
    ``"required"`` (signature order) and ``"description"`` are left out when empty.

    Raises:
        TypeError: a parameter without an annotation, with an unsupported one, or ``*args`` /
            ``**kwargs``; the message names the parameter.
    """
    name = getattr(fn, "__name__", None)
    if not name:
        raise TypeError(f"{fn!r} has no __name__")
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # e.g. `X | None` as a string on Python 3.9: resolve per parameter
        hints = {}
    description, arg_docs = _parse_docstring(inspect.getdoc(fn))
    properties: dict[str, Any] = {}
    required: list[str] = []
    for pname, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"parameter {pname!r}: *args and **kwargs are not supported")
        ann = hints.get(pname, param.annotation)
        if ann is inspect.Parameter.empty:
            raise TypeError(f"parameter {pname!r} of {name} has no type annotation")
        if isinstance(ann, str):
            try:
                ann = eval(ann, getattr(fn, "__globals__", {}))  # noqa: S307
            except Exception as e:
                raise TypeError(f"parameter {pname!r}: cannot resolve annotation {ann!r}") from e
        schema, optional = _annotation_schema(ann, pname)
        if pname in arg_docs and arg_docs[pname]:
            schema = {"description": arg_docs[pname], **schema}
        properties[pname] = schema
        if not optional and param.default is inspect.Parameter.empty:
            required.append(pname)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    out: dict[str, Any] = {"name": name}
    if description:
        out["description"] = description
    out["parameters"] = parameters
    return out


# ----------------------------------------------------------------------------------------------
# Messages


def check_messages(messages: Any, where: str = "render_chat()") -> None:
    """Checks the shape of a conversation before any work: a non-empty list of dicts, each with
    a known ``role`` and a ``content`` (an assistant message may have ``tool_calls`` instead).
    Errors are ``TypeError`` / ``ValueError`` that start with ``where`` (the method called) and
    name the message."""
    if isinstance(messages, (str, bytes)):
        raise TypeError(
            f"{where}: messages must be a list of message dicts, not {type(messages).__name__}; "
            f"for one user message: [{{'role': 'user', 'content': {str(messages)[:40]!r}}}]"
        )
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
        raise TypeError(
            f"{where}: messages must be a list of {{'role': ..., 'content': ...}} dicts, "
            f"not {type(messages).__name__}"
        )
    if not messages:
        raise ValueError(f"{where}: messages is empty; give at least one message")
    roles = sorted({*_ROLES, "tool"})
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"{where}: messages[{i}] must be a dict, not {type(m).__name__}")
        role = m.get("role")
        if role is None:
            raise ValueError(f"{where}: messages[{i}] has no 'role' (one of {roles})")
        if role not in roles:
            raise ValueError(f"{where}: messages[{i}] has the unknown role {role!r} ({roles})")
        content = m.get("content")
        if content is None and not (_ROLES.get(role) == "model" and m.get("tool_calls")):
            raise ValueError(
                f"{where}: messages[{i}] ({role}) has no 'content'"
                + (" (nor 'tool_calls')" if _ROLES.get(role) == "model" else "")
            )
        if role != "tool" and not isinstance(content, (str, list, tuple, type(None))):
            raise TypeError(
                f"{where}: messages[{i}] ({role}): content must be a str or a list of text "
                f"parts, not {type(content).__name__}"
            )


def trim_history(
    messages: Sequence[Mapping[str, Any]], fits: Callable[[list[Mapping[str, Any]]], bool]
) -> list[Mapping[str, Any]]:
    """The conversation without its oldest exchanges, as few removed as make ``fits(kept)``
    true: the leading system/developer messages (and so the tool declarations, which follow
    them) are always kept, and an exchange — a user message and every message up to the next
    user message — goes whole. Returns ``messages`` as a new list when it fits already; raises
    ``ValueError`` when even the last user message alone (with the system messages) does not.

    >>> chat = [{"role": "system", "content": "Be brief."},
    ...         {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
    ...         {"role": "user", "content": "c"}]
    >>> [m["content"] for m in trim_history(chat, lambda kept: len(kept) <= 2)]
    ['Be brief.', 'c']
    """
    head = 0
    while head < len(messages) and messages[head].get("role") in ("system", "developer"):
        head += 1
    system, rest = list(messages[:head]), list(messages[head:])
    while True:
        kept = system + rest
        if fits(kept):
            return kept
        users = [i for i, m in enumerate(rest) if m.get("role") == "user"]
        if len(users) < 2:
            raise ValueError("the last message alone does not fit in max_inference_len")
        rest = rest[users[1] :]


def _text(content: Any, role: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, Sequence):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for item in content:
            if isinstance(item, Mapping) and item.get("type") == "text":
                parts.append(str(item.get("text", "")).strip())
            else:
                raise ValueError(f"{role} message: unsupported content part {item!r}")
        return "".join(parts)
    raise ValueError(f"{role} message: unsupported content {content!r}")


def _arguments(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"tool call arguments are not JSON ({e}): {value[:60]!r}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"tool call arguments must be an object, not {value!r}")
    return dict(value)


def _tool_call(call: Any) -> tuple[str, dict[str, Any], str | None]:
    """(name, arguments, id) of an OpenAI-style dict, a bare dict or a ``ToolCall``."""
    if isinstance(call, Mapping):
        call_id = call.get("id")
        fn = call.get("function", call)
        if not isinstance(fn, Mapping) or "name" not in fn:
            raise ValueError(f"tool call without a name: {call!r}")
        return str(fn["name"]), _arguments(fn.get("arguments")), call_id
    name = getattr(call, "name", None)
    if name is None:
        raise ValueError(f"unsupported tool call {call!r}")
    return str(name), _arguments(getattr(call, "arguments", None)), getattr(call, "id", None)


def _is_named_response(content: Any) -> bool:
    return isinstance(content, Mapping) and set(content) == {"name", "response"}


def tool_calls_openai(calls: Sequence[Any]) -> list[dict[str, Any]]:
    """Tool calls (``ToolCall``s, OpenAI-style or ``{name, arguments}`` dicts) in the OpenAI
    form chat templates read: ``{"type": "function", "function": {"name", "arguments"}}``."""
    out = []
    for call in calls:
        name, arguments, call_id = _tool_call(call)
        d: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if call_id is not None:
            d["id"] = call_id
        out.append(d)
    return out


def _response(content: Any) -> dict[str, Any]:
    """A tool message's content as the response object: a dict, a JSON string of one, or
    anything else as ``{"value": content}``."""
    if isinstance(content, Mapping):
        return dict(content)
    if isinstance(content, str):
        try:
            parsed = json.loads(content)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
        return {"value": content.strip()}
    if isinstance(content, Sequence) and all(
        isinstance(p, Mapping) and p.get("type") == "text" for p in content
    ):
        return _response(_text(content, "tool"))
    return {"value": content}


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The Gemma / FunctionGemma prompt text (without BOS) of a conversation.

    Args:
        messages: dicts with ``role`` (``system``, ``developer``, ``user``, ``assistant``,
            ``model`` or ``tool``) and ``content`` (a string, or a list of ``{"type": "text"}``
            parts). An assistant message may have ``tool_calls``: OpenAI-style
            ``{"type": "function", "function": {"name", "arguments"}}`` (arguments a dict or a
            JSON string), ``{"name", "arguments"}`` or ``gemma_rs.tools.ToolCall`` objects. A
            tool message's content is a dict or a JSON string of one (anything else is sent as
            ``{"value": content}``); its function name is its ``name``, or that of the call with
            its ``tool_call_id``, or that of the next unanswered call of the previous assistant.
            Content of the form ``{"name": ..., "response": {...}}`` (Google's FunctionGemma
            guide), or a list of those, gives one response per item under its own name.
        tools: OpenAI-style tool dicts, bare ``{"name", "description", "parameters"}`` dicts or
            Python functions (see :func:`normalize_tools`). Their declarations follow the text of
            the first message if it is a system/developer message; otherwise a developer turn
            with no text, holding only the declarations, is put first.
        add_generation_prompt: append ``<start_of_turn>model\\n`` (nothing when the prompt ends
            inside a model turn, after a tool call or tool response).

    Raises:
        ValueError: an unknown role, a tool response whose function name cannot be found, or
            malformed content / tool calls.
    """
    from .tools import format_call, format_response

    declarations = "".join(_declaration(t) for t in normalize_tools(tools))
    out: list[str] = []
    rest = list(messages)
    if declarations:
        first = rest[0] if rest else None
        text = ""
        if first is not None and first.get("role") in ("system", "developer"):
            text = _text(first.get("content"), str(first["role"]))
            rest = rest[1:]
        out.append(f"<start_of_turn>developer\n{text}{declarations}<end_of_turn>\n")

    open_model_turn = False  # a model turn left open by tool calls / responses
    pending: list[tuple[str, str | None]] = []  # calls of that turn not yet answered
    for message in rest:
        role = message.get("role")
        if role == "tool":
            if not open_model_turn:
                raise ValueError("a tool message must follow an assistant message with tool calls")
            name = message.get("name")
            call_id = message.get("tool_call_id")
            if not name and call_id is not None:
                name = next((n for n, i in pending if i == call_id), None)
            if not name and pending:
                name = pending[0][0]
            if not name:
                raise ValueError(f"tool message without a function name: {dict(message)!r}")
            for k, (n, i) in enumerate(pending):
                if (call_id is not None and i == call_id) or (call_id is None and n == name):
                    del pending[k]
                    break
            content = message.get("content")
            # Google's FunctionGemma guide writes responses as {"name", "response"} (a list of
            # them for parallel calls): one function response each.
            if _is_named_response(content):
                content = [content]
            if isinstance(content, list) and content and all(map(_is_named_response, content)):
                for r in content:
                    out.append(format_response(str(r["name"]), _response(r["response"])))
                    pending = [(n, i) for n, i in pending if n != r["name"]]
                continue
            out.append(format_response(str(name), _response(content)))
            continue
        if role not in _ROLES:
            raise ValueError(f"unknown role {role!r} (expected one of {sorted(_ROLES)} or 'tool')")
        turn = _ROLES[role]
        if open_model_turn and turn != "model":
            out.append("<end_of_turn>\n")
            open_model_turn = False
        if not open_model_turn:
            out.append(f"<start_of_turn>{turn}\n")
        out.append(_text(message.get("content"), str(role)))
        calls = message.get("tool_calls") if turn == "model" else None
        if calls:
            pending = []
            for call in calls:
                name, arguments, call_id = _tool_call(call)
                pending.append((name, call_id))
                out.append(format_call(name, arguments))
            open_model_turn = True
        else:
            out.append("<end_of_turn>\n")
            open_model_turn = False
    if add_generation_prompt and not open_model_turn:
        out.append("<start_of_turn>model\n")
    return "".join(out)
