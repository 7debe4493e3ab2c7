"""FunctionGemma's function-call syntax, parsed and written.

FunctionGemma (Gemma 3 270M fine-tuned for tool calling) writes a call as::

    <start_function_call>call:NAME{key:value,key:value}<end_function_call>

and reads a tool's result as::

    <start_function_response>response:NAME{key:value}<end_function_response>

Values are strings wrapped in ``<escape>…<escape>`` (any character inside, including braces,
commas, colons, quotes and newlines), numbers, ``true``/``false``, ``null``, objects
``{k:v,...}`` and arrays ``[v,...]``. Keys are bare names.

>>> out = parse_tool_calls(
...     "Sure.<start_function_call>call:get_weather{city:<escape>Tokyo<escape>,days:3}"
...     "<end_function_call>")
>>> out.text, out.tool_calls
('Sure.', [ToolCall(name='get_weather', arguments={'city': 'Tokyo', 'days': 3})])
>>> format_call("get_weather", {"city": "Tokyo", "days": 3})
'<start_function_call>call:get_weather{city:<escape>Tokyo<escape>,days:3}<end_function_call>'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

__all__ = [
    "CALL_END",
    "CALL_START",
    "CONTROL_TOKENS",
    "ESCAPE",
    "RESPONSE_END",
    "RESPONSE_START",
    "ParsedOutput",
    "ToolCall",
    "format_call",
    "format_response",
    "format_value",
    "parse_tool_calls",
    "tool_grammar",
]

CALL_START = "<start_function_call>"
CALL_END = "<end_function_call>"
RESPONSE_START = "<start_function_response>"
RESPONSE_END = "<end_function_response>"
ESCAPE = "<escape>"
#: FunctionGemma's seven control tokens (its ids 46-52; base Gemma 3's <unused40>..<unused46>).
CONTROL_TOKENS = (
    "<start_function_declaration>",
    "<end_function_declaration>",
    CALL_START,
    CALL_END,
    RESPONSE_START,
    RESPONSE_END,
    ESCAPE,
)

_CALL_PREFIX = "call:"
_RESPONSE_PREFIX = "response:"
_VALUE_KEY = "value"
"""The key a non-dict tool response is wrapped under (see :func:`format_response`)."""

# Characters that cannot appear in a bare name (function name or key): the syntax of the format,
# the start of a control token, quotes; and any whitespace (``str.isspace``).
_NAME_STOP = frozenset("{}[]:,<>\"'")
_NUMBER_CHARS = frozenset("+-0123456789.eE")


@dataclass(frozen=True)
class ToolCall:
    """One function call the model made."""

    name: str
    """The function's name."""
    arguments: dict[str, Any]
    """The arguments, typed: ``str``, ``int``, ``float``, ``bool``, ``None``, ``list``, ``dict``."""


@dataclass(frozen=True)
class ParsedOutput:
    """A model output split into its text and its function calls."""

    text: str
    """The output with every ``<start_function_call>…<end_function_call>`` block removed; the
    text around the blocks is kept exactly (no whitespace is added or stripped). If the output
    does not parse, this is the whole output, unchanged."""
    tool_calls: list[ToolCall]
    """The calls in the order they were written (several for parallel calls); empty if the
    output has none or does not parse."""


def _is_name_char(c: str) -> bool:
    return c not in _NAME_STOP and not c.isspace()


class _ParseError(Exception):
    """Raised inside the parser; never escapes :func:`parse_tool_calls`."""


class _Parser:
    """A recursive-descent parser over ``text``, with a cursor ``pos``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    # -- low-level helpers -------------------------------------------------------------------

    def _skip_ws(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos].isspace():
            pos += 1
        self.pos = pos

    def _peek(self) -> str:
        self._skip_ws()
        if self.pos >= len(self.text):
            raise _ParseError("unexpected end of input")
        return self.text[self.pos]

    def _startswith(self, literal: str) -> bool:
        return self.text.startswith(literal, self.pos)

    def _expect(self, literal: str) -> None:
        if not self._startswith(literal):
            raise _ParseError(f"expected {literal!r} at {self.pos}")
        self.pos += len(literal)

    def _name(self) -> str:
        """A bare name: a run of characters that are not syntax, control-token or whitespace."""
        text, start = self.text, self.pos
        end = start
        while end < len(text) and _is_name_char(text[end]):
            end += 1
        if end == start:
            raise _ParseError(f"expected a name at {start}")
        self.pos = end
        return text[start:end]

    # -- grammar -----------------------------------------------------------------------------

    def call(self) -> ToolCall:
        """``<start_function_call>call:NAME{...}<end_function_call>`` at the cursor."""
        self._expect(CALL_START)
        self._skip_ws()
        self._expect(_CALL_PREFIX)
        name = self._name()
        self._skip_ws()
        arguments = self.object()
        self._skip_ws()
        self._expect(CALL_END)
        return ToolCall(name=name, arguments=arguments)

    def value(self) -> Any:
        ch = self._peek()
        if ch == "{":
            return self.object()
        if ch == "[":
            return self.array()
        if self._startswith(ESCAPE):
            return self.string()
        for literal, result in (("true", True), ("false", False), ("null", None)):
            if self._startswith(literal):
                self.pos += len(literal)
                return result
        return self.number()

    def string(self) -> str:
        self._expect(ESCAPE)
        end = self.text.find(ESCAPE, self.pos)
        if end < 0:
            raise _ParseError("unterminated <escape> string")
        s = self.text[self.pos : end]
        self.pos = end + len(ESCAPE)
        return s

    def number(self) -> int | float:
        text, start = self.text, self.pos
        end = start
        while end < len(text) and text[end] in _NUMBER_CHARS:
            end += 1
        token = text[start:end]
        if not token:
            raise _ParseError(f"expected a value at {start}")
        try:
            result: int | float = float(token) if any(c in token for c in ".eE") else int(token, 10)
        except ValueError:
            raise _ParseError(f"bad number {token!r} at {start}") from None
        self.pos = end
        return result

    def key(self) -> str:
        self._skip_ws()
        if self._startswith(ESCAPE):  # tolerate keys written as <escape>key<escape>
            return self.string()
        return self._name()

    def object(self) -> dict[str, Any]:
        self._skip_ws()
        self._expect("{")
        result: dict[str, Any] = {}
        if self._peek() == "}":
            self.pos += 1
            return result
        while True:
            k = self.key()
            self._skip_ws()
            self._expect(":")
            result[k] = self.value()
            ch = self._peek()
            self.pos += 1
            if ch == "}":
                return result
            if ch != ",":
                raise _ParseError(f"expected ',' or '}}' at {self.pos - 1}")

    def array(self) -> list[Any]:
        self._expect("[")
        result: list[Any] = []
        if self._peek() == "]":
            self.pos += 1
            return result
        while True:
            result.append(self.value())
            ch = self._peek()
            self.pos += 1
            if ch == "]":
                return result
            if ch != ",":
                raise _ParseError(f"expected ',' or ']' at {self.pos - 1}")


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split a FunctionGemma output into its text and its function calls.

    Every ``<start_function_call>`` must begin a complete, well-formed call ending in
    ``<end_function_call>``; the blocks are removed and the text between them is concatenated
    unchanged. Any other text (including stray end tokens) is ordinary text.

    An output that does not parse (an unterminated or malformed block anywhere in it) keeps all
    its text and has no calls: the result is all-or-nothing and this function never raises.
    Whitespace is tolerated between the tokens of a call (the model writes none).
    """
    if CALL_START not in text:
        return ParsedOutput(text=text, tool_calls=[])
    parser = _Parser(text)
    pieces: list[str] = []
    calls: list[ToolCall] = []
    try:
        while True:
            start = text.find(CALL_START, parser.pos)
            if start < 0:
                pieces.append(text[parser.pos :])
                break
            pieces.append(text[parser.pos : start])
            parser.pos = start
            calls.append(parser.call())
    except (_ParseError, RecursionError):
        return ParsedOutput(text=text, tool_calls=[])
    return ParsedOutput(text="".join(pieces), tool_calls=calls)


class CallTextFilter:
    """The text of a reply as it streams, without its function-call blocks: :meth:`feed` takes
    each generated piece and returns what may be shown (text that could begin a call block is
    held back from its first ``<``), :meth:`end` the held text that turned out not to be one."""

    def __init__(self) -> None:
        self._held = ""  # text that may begin a call block, or is inside one
        self._in_call = False

    def feed(self, piece: str) -> str:
        text, out = self._held + piece, []
        while True:
            if self._in_call:
                j = text.find(CALL_END)
                if j < 0:
                    self._held = text[-(len(CALL_END) - 1) :]
                    return "".join(out)
                text, self._in_call = text[j + len(CALL_END) :], False
                continue
            i = text.find(CALL_START)
            if i >= 0:
                out.append(text[:i])
                text, self._in_call = text[i + len(CALL_START) :], True
                continue
            # Hold back a tail that could be the beginning of a call block.
            keep = next(
                (k for k in range(min(len(text), len(CALL_START) - 1), 0, -1)
                 if CALL_START.startswith(text[-k:])),
                0,
            )  # fmt: skip
            self._held = text[len(text) - keep :]
            out.append(text[: len(text) - keep])
            return "".join(out)

    def end(self) -> str:
        """At the end of the reply: the held text, unless it is inside a call block."""
        tail, self._held = ("" if self._in_call else self._held), ""
        return tail


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name or not all(_is_name_char(c) for c in name):
        raise ValueError(
            f"{what} {name!r} must be non-empty and contain none of {{}}[]:,<>\"' or whitespace"
        )
    return name


def _format_object(mapping: Mapping[Any, Any]) -> str:
    items = (f"{_check_name(k, 'key')}:{format_value(v)}" for k, v in mapping.items())
    return "{" + ",".join(items) + "}"


def format_value(value: Any) -> str:
    """Write an argument value in FunctionGemma's syntax (the inverse of the parser).

    ``str`` → ``<escape>s<escape>``; ``bool`` → ``true``/``false``; ``None`` → ``null``;
    ``int`` → its digits; ``float`` → its ``repr`` (so it parses back equal, always with ``.``
    or ``e``, hence back as a float); a mapping → ``{k:v,...}`` in its own key order; a list or
    tuple → ``[v,...]``.

    Raises ``TypeError`` for any other type (and non-``str`` keys), ``ValueError`` for a string
    containing ``<escape>`` (it would end the string), a non-finite float, or a key that is not a
    bare name.
    """
    if isinstance(value, str):
        if ESCAPE in value:
            raise ValueError(f"a string value cannot contain {ESCAPE!r}: {value!r}")
        return ESCAPE + value + ESCAPE
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a float value must be finite, not {value!r}")
        return repr(float(value))
    if isinstance(value, Mapping):
        return _format_object(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    raise TypeError(f"cannot format a value of type {type(value).__name__}")


def format_call(name: str, arguments: Mapping[str, Any]) -> str:
    """``<start_function_call>call:NAME{k:v,...}<end_function_call>``, arguments in their order.

    Raises like :func:`format_value`; ``name`` must be a bare name.
    """
    body = _format_object(arguments)
    return f"{CALL_START}{_CALL_PREFIX}{_check_name(name, 'name')}{body}{CALL_END}"


def format_response(name: str, response: Any) -> str:
    """``<start_function_response>response:NAME{...}<end_function_response>``.

    A mapping response is written as its ``{k:v,...}`` (keys in its own order). Any other
    response is wrapped as ``{value:VALUE}``. The fixtures do not show a tool response; the
    wrapping key ``value`` follows the tool-response block of Google's later Gemma chat
    templates (``'response:' + tool_name + '{value:' + format_argument(response) + '}'``).
    Those templates sort a mapping response's keys: pass a sorted dict to match them.

    Raises like :func:`format_value`; ``name`` must be a bare name.
    """
    _check_name(name, "name")
    body = (
        _format_object(response)
        if isinstance(response, Mapping)
        else "{" + _VALUE_KEY + ":" + format_value(response) + "}"
    )
    return f"{RESPONSE_START}{_RESPONSE_PREFIX}{name}{body}{RESPONSE_END}"


# ----------------------------------------------------------------------------------------------
# The language of valid calls, for constrained decoding

#: Caps that keep every constrained call finite when its schema sets no bound: a string argument
#: without ``maxLength`` ends within this many tokens, an array without ``maxItems`` within this
#: many items; a number without bounds has at most 16 digits before its point and 15 after.
STRING_MAX_TOKENS = 24
ARRAY_MAX_ITEMS = 6
_INTEGER = r"/-?(0|[1-9][0-9]{0,15})/"
_NUMBER = r"/-?(0|[1-9][0-9]{0,15})(\.[0-9]{1,15})?([eE][+-]?[0-9]{1,3})?/"
#: The most calls one turn makes when parallel calls are allowed.
MAX_PARALLEL_CALLS = 4
#: Text that free text and string values never contain: the call syntax's control tokens (a
#: string cannot end early or fake a call) and the chat's turn markers.
_NOT_IN_TEXT = (*CONTROL_TOKENS, "<start_of_turn>", "<end_of_turn>")

#: Schema keywords that describe and do not constrain (``format`` is an annotation in JSON Schema
#: 2019-09 and later, as validators treat it by default).
_ANNOTATIONS = frozenset(
    "title description default examples $schema $comment $id deprecated readOnly writeOnly "
    "format additionalProperties".split()
)
_KEYWORDS = {
    "string": {"minLength", "maxLength"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "boolean": set(),
    "null": set(),
    "array": {"items", "minItems", "maxItems"},
    "object": {"properties", "required"},
}
_GENERAL = {"type", "enum", "const", "anyOf", "nullable"}
ToolChoice = Union[str, Mapping[str, Any]]
"""``"auto"``, ``"required"``, ``"none"``, a tool's name, or ``{"type": "function", "function":
{"name": ...}}``."""


class _GrammarBuilder:
    """Lark rules (llguidance's dialect) for FunctionGemma calls whose arguments satisfy JSON
    schemas. ``special`` holds the control tokens that are single special tokens of the
    tokenizer: those are written ``<name>`` (the token), the others ``"<name>"`` (its text)."""

    def __init__(self, special: frozenset[str]) -> None:
        self.special = special
        self.rules: list[str] = []
        self.names: dict[str, str] = {}  # a rule's body (and attributes) -> its name
        self.count = 0

    def token(self, text: str) -> str:
        return text if text in self.special else json.dumps(text)

    def rule(self, body: str, attrs: str = "", terminal: bool = False) -> str:
        """The name of a rule (a terminal: a regex) with this body, written once."""
        key = f"{terminal}{attrs}: {body}"
        if key not in self.names:
            self.count += 1
            self.names[key] = name = f"{'S' if terminal else 'r'}{self.count}"
            self.rules.append(f"{name}{attrs}: {body}")
        return self.names[key]

    def literal(self, value: Any, where: str) -> str:
        """An exact value (``enum``/``const``), written as the call syntax writes it."""
        try:
            text = format_value(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: cannot be written in a call: {e}") from None
        if isinstance(value, str):
            esc = self.token(ESCAPE)
            return f"{esc} {json.dumps(value)} {esc}"
        if isinstance(value, (Mapping, list, tuple)) and ESCAPE in text:
            raise ValueError(f"{where}: enum/const objects with strings are not supported")
        return json.dumps(text)

    def value(self, schema: Any, where: str) -> str:
        """A rule (or inline expression) for values valid for ``schema``."""
        if schema is True or schema == {}:
            raise ValueError(f"{where}: a schema without a type cannot be constrained")
        if not isinstance(schema, Mapping):
            raise ValueError(f"{where}: a schema must be an object, got {schema!r}")
        types = schema.get("type")
        type_list = [types] if isinstance(types, str) else list(types or [])
        allowed = set(_GENERAL) | _ANNOTATIONS
        for t in type_list:
            if t not in _KEYWORDS:
                raise ValueError(f"{where}: unsupported type {t!r}")
            allowed |= _KEYWORDS[t]
        unknown = sorted(k for k in schema if k not in allowed)
        if unknown:
            raise ValueError(f"{where}: unsupported schema keyword(s) {unknown}")
        if "const" in schema:
            return self.literal(schema["const"], where)
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}: enum must be a non-empty list")
            return "(" + " | ".join(self.literal(v, where) for v in values) + ")"
        if "anyOf" in schema:
            options = schema["anyOf"]
            if not isinstance(options, list) or not options:
                raise ValueError(f"{where}: anyOf must be a non-empty list")
            return "(" + " | ".join(self.value(o, where) for o in options) + ")"
        if not type_list:
            raise ValueError(f"{where}: a schema needs a type, enum, const or anyOf")
        if schema.get("nullable") is True and "null" not in type_list:
            type_list.append("null")
        return "(" + " | ".join(self.typed(t, schema, where) for t in type_list) + ")"

    def typed(self, t: str, schema: Mapping[str, Any], where: str) -> str:
        if t == "boolean":
            return '("true" | "false")'
        if t == "null":
            return '"null"'
        if t in ("integer", "number"):
            numeric = {k: v for k, v in schema.items() if k in _KEYWORDS[t]}
            if not numeric:
                return _INTEGER if t == "integer" else _NUMBER
            if t == "number" and "multipleOf" not in numeric:
                numeric = _integer_bounds(numeric, where)
                t = "integer"
            # Bounds and multiples as llguidance's JSON compiler writes them (JSON's number
            # syntax is the call syntax's). A token cap here would let a number end before its
            # bounds are met (seen with llguidance 1.9), so there is none.
            return self.rule("%json " + json.dumps({"type": t, **numeric}))
        if t == "string":
            return self.string(schema, where)
        if t == "array":
            return self.array(schema, where)
        return self.object(schema, where)

    def string(self, schema: Mapping[str, Any], where: str) -> str:
        lo, hi = _count(schema, "minLength", 0, where), _count(schema, "maxLength", None, where)
        if hi is not None and hi < lo:
            raise ValueError(f"{where}: maxLength < minLength")
        count = f"{{{lo},{'' if hi is None else hi}}}" if lo or hi is not None else "*"
        if ESCAPE in self.special:
            body = _excluding(_NOT_IN_TEXT)
            if count != "*":
                body = f"/(?s:.){count}/ & {body}"
        else:
            # The closing <escape> is text: a string holds no "<" at all, so that a model that
            # starts to close it ("<escape", "<escape}") must finish the delimiter.
            body = f"/[^<]{count}/"
        attrs = "" if lo or hi is not None else f"[max_tokens={STRING_MAX_TOKENS}]"
        terminal = self.rule(body, terminal=True)
        inner = self.rule(terminal, attrs) if attrs else terminal
        esc = self.token(ESCAPE)
        return self.rule(f"{esc} {inner} {esc}")

    def array(self, schema: Mapping[str, Any], where: str) -> str:
        lo = _count(schema, "minItems", 0, where)
        hi = _count(schema, "maxItems", None, where)
        hi = max(lo, ARRAY_MAX_ITEMS) if hi is None else hi
        if hi < lo:
            raise ValueError(f"{where}: maxItems < minItems")
        if "items" not in schema:
            raise ValueError(f"{where}: an array needs 'items'")
        item = self.value(schema["items"], f"{where}[]")
        if hi == 0:
            return '"[" "]"'
        more = f'("," {item}){{{max(lo - 1, 0)},{hi - 1}}}' if hi > 1 else ""
        seq = f"{item} {more}"
        return self.rule(f'"[" {seq} "]"' if lo else f'"[" ({seq})? "]"')

    def object(self, schema: Mapping[str, Any], where: str) -> str:
        props = schema.get("properties") or {}
        if not isinstance(props, Mapping):
            raise ValueError(f"{where}: properties must be an object")
        required = schema.get("required") or []
        missing = [k for k in required if k not in props]
        if missing:
            raise ValueError(f"{where}: required {missing} not among the properties")
        items = [
            (f"{json.dumps(_check_name(k, 'key') + ':')} {self.value(s, f'{where}.{k}')}",
             k in required)
            for k, s in props.items()
        ]  # fmt: skip
        # Keys in declared order; rest(i, first): the properties from i on, after none (first) or
        # after at least one (each item then starts with a comma).
        memo: dict[tuple[int, bool], str] = {}

        def rest(i: int, first: bool) -> str:
            if i == len(items):
                return '""'
            if (i, first) not in memo:
                item, req = items[i]
                sep = "" if first else '"," '
                take = f"{sep}{item} {rest(i + 1, False)}"
                body = take if req else f"{take} | {rest(i + 1, first)}"
                memo[(i, first)] = self.rule(body)
            return memo[(i, first)]

        return self.rule(f'"{{" {rest(0, True)} "}}"')


def _integer_bounds(bounds: Mapping[str, Any], where: str) -> dict[str, int]:
    """A bounded number without ``multipleOf`` is written as an integer within its bounds:
    llguidance's number ranges let the fraction run on without end (``1.1000…``)."""
    out: dict[str, int] = {}
    for key, v in bounds.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{where}: {key} must be a finite number, got {v!r}")
    if "minimum" in bounds or "exclusiveMinimum" in bounds:
        lo = [math.ceil(bounds["minimum"])] if "minimum" in bounds else []
        lo += [math.floor(bounds["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in bounds else []
        out["minimum"] = max(lo)
    if "maximum" in bounds or "exclusiveMaximum" in bounds:
        hi = [math.floor(bounds["maximum"])] if "maximum" in bounds else []
        hi += [math.ceil(bounds["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in bounds else []
        out["maximum"] = min(hi)
    if out.get("minimum", 0) > out.get("maximum", out.get("minimum", 0)):
        raise ValueError(f"{where}: no integer within the bounds (give multipleOf)")
    return out


def _count(schema: Mapping[str, Any], key: str, default: int | None, where: str) -> Any:
    v = schema.get(key, default)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise ValueError(f"{where}: {key} must be a non-negative integer, got {v!r}")
    return v


def _excluding(texts: Sequence[str], nonempty: bool = False) -> str:
    """A regex (no negation or intersection: the engine's fast paths need plain regexes) of the
    strings that contain none of ``texts``, each of which starts with ``<`` and has no other.

    Such a string is ``[^<]*`` then pieces ``<X``, where ``X`` has no ``<`` and does not start
    with any text's rest after its ``<``: with those rests in a trie, ``X`` ends inside it
    (a proper prefix ``p``) or leaves it (``p``, a character no rest continues ``p`` with, then
    anything but ``<``)."""
    rests = [t[1:] for t in texts]
    assert all(t.startswith("<") and "<" not in r for t, r in zip(texts, rests))
    prefixes = sorted({r[:i] for r in rests for i in range(len(r))})
    alternatives = []
    for p in prefixes:
        nexts = {r[len(p)] for r in rests if r.startswith(p) and len(r) > len(p)}
        stop = "".join(sorted(nexts | {"<"}))
        cls = "".join("\\" + c if c in "\\]^-[" else c for c in stop)
        alternatives.append(f"{_regex(p)}([^{cls}][^<]*)?")
    piece = "<(" + "|".join(alternatives) + ")"
    if nonempty:
        return f"/([^<]+({piece})*|({piece})+)/"
    return f"/[^<]*({piece})*/"


def _regex(text: str) -> str:
    """``text`` as a literal inside a ``/regex/``."""
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}/" else c for c in text)


def tool_choice_name(tool_choice: ToolChoice, names: Sequence[str]) -> str | None:
    """The tool a ``tool_choice`` names (a name or OpenAI's ``{"type": "function", "function":
    {"name": ...}}``), None for ``"auto"``, ``"required"``, ``"none"``; ValueError for a name
    that is not declared."""
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str):
            raise ValueError(f"tool_choice {tool_choice!r} names no function")
    elif isinstance(tool_choice, str):
        if tool_choice in ("auto", "required", "none"):
            return None
        name = tool_choice
    else:
        raise TypeError(
            "tool_choice must be 'auto', 'required', 'none', a tool name or "
            f"{{'type': 'function', 'function': {{'name': ...}}}}, not {type(tool_choice).__name__}"
        )
    if name not in names:
        raise ValueError(f"tool_choice {name!r} is not a declared tool (declared: {list(names)})")
    return name


def tool_grammar(
    tools: Sequence[Mapping[str, Any]],
    tool_choice: ToolChoice = "auto",
    parallel_tool_calls: bool = True,
    special: frozenset[str] = frozenset(CONTROL_TOKENS),
) -> str:
    """A Lark grammar (llguidance's dialect) of a model turn with these tools: ``"auto"`` free
    text and/or calls, ``"required"`` one or more calls, ``"none"`` text that never starts a call,
    a tool's name one call of that tool. A call is FunctionGemma's syntax naming a declared tool,
    with the keys of its ``parameters`` schema in declared order (the ``required`` ones always)
    and values valid for their schemas; ``parallel_tool_calls=False`` allows one call (else up to
    :data:`MAX_PARALLEL_CALLS`). The turn ends after its calls. Free text and string values never
    contain a control token's or turn marker's text. Unbounded strings, arrays and numbers are
    capped (:data:`STRING_MAX_TOKENS`, :data:`ARRAY_MAX_ITEMS`, 16 + 15 digits) so that every
    call ends; a ``number`` with bounds and no ``multipleOf`` is written as an integer within
    them. Where ``<escape>`` is text, not a special token (base Gemma 3), string values hold no
    ``<``. ``tools`` are bare schemas (:func:`gemma_rs.chat.normalize_tools`);
    ``special``: the control tokens this tokenizer has as single special tokens.

    Raises ValueError for a schema it cannot enforce (naming the tool and the keyword), for an
    undeclared ``tool_choice`` name, and for a choice other than ``"none"`` without tools."""
    text = f"TEXT: {_excluding(_NOT_IN_TEXT, nonempty=True)}"
    if tool_choice == "none":
        return f"start: TEXT?\n{text}"
    if not tools:
        raise ValueError(f"tool_choice {tool_choice!r} needs tools")
    choice = tool_choice_name(tool_choice, [t["name"] for t in tools])
    b = _GrammarBuilder(special)
    if tool_choice == "auto":
        b.rules.append(text)
    alternatives = []
    for t in tools:
        if choice is not None and t["name"] != choice:
            continue
        params = t.get("parameters") or {"type": "object", "properties": {}}
        where = f"tool {t['name']!r} parameters"
        if not isinstance(params, Mapping) or params.get("type", "object") != "object":
            raise ValueError(f"{where}: must be an object schema")
        args = b.value({**params, "type": "object"}, where)
        alternatives.append(f"{json.dumps(_CALL_PREFIX + _check_name(t['name'], 'name'))} {args}")
    call = b.rule(f"{b.token(CALL_START)} ({' | '.join(alternatives)}) {b.token(CALL_END)}")
    many = parallel_tool_calls and choice is None
    calls = f"{call}{{1,{MAX_PARALLEL_CALLS}}}" if many else call
    start = f"TEXT? ({calls})?" if tool_choice == "auto" else calls
    return "\n".join([f"start: {start}", *b.rules])
