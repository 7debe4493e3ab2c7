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

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
