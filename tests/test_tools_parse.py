"""FunctionGemma's call syntax: parse-cases.json, round trips, malformed outputs, formatting."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import real_model
from gemma_rs.tools import (
    ESCAPE,
    ParsedOutput,
    ToolCall,
    format_call,
    format_response,
    format_value,
    parse_tool_calls,
)


def typed(value: Any) -> Any:
    """`value` with every scalar paired with its exact type, so 1, 1.0 and True differ."""
    if isinstance(value, dict):
        return ("dict", [(k, typed(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return ("list", [typed(v) for v in value])
    return (type(value).__name__, value)


def assert_parsed(out: ParsedOutput, calls: list[tuple[str, dict[str, Any]]], text: str) -> None:
    assert out.text == text
    assert [c.name for c in out.tool_calls] == [name for name, _ in calls]
    for got, (_, arguments) in zip(out.tool_calls, calls):
        assert typed(got.arguments) == typed(arguments)


PARSE_CASES = Path("functiongemma") / "parse-cases.json"


def _load_cases(fixtures: Path) -> list[dict[str, Any]]:
    return json.loads((fixtures / PARSE_CASES).read_text(encoding="utf-8"))["cases"]


def _case_count() -> int:
    """The number of parse cases (1 if the fixtures are missing: the fixture then skips)."""
    try:
        return len(_load_cases(real_model.fixtures_dir()))
    except (real_model.MissingFixture, OSError):
        return 1


@pytest.mark.parametrize("index", range(_case_count()))
def test_parse_cases(fixtures_dir: Path, index: int) -> None:
    case = _load_cases(fixtures_dir)[index]
    out = parse_tool_calls(case["output"])
    expected = [(c["name"], c["arguments"]) for c in case["calls"]]
    assert_parsed(out, expected, case["text"])
    assert all(isinstance(c, ToolCall) for c in out.tool_calls)


# -- round trips ---------------------------------------------------------------------------------

keys = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_",
    min_size=1,
    max_size=8,
)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
strings = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("{}[],:\"'<>\n\t escape/\\")), st.characters(codec="utf-8")
    ),
    max_size=30,
).filter(lambda s: ESCAPE not in s)
scalars = st.one_of(
    strings,
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
arguments_st = st.dictionaries(keys, values, max_size=5)
# Text around calls: anything but a call's start token.
around = st.text(max_size=20).filter(lambda s: "<start_function_call>" not in s)


@settings(max_examples=300, deadline=None)
@given(name=names, arguments=arguments_st)
def test_round_trip_one_call(name: str, arguments: dict[str, Any]) -> None:
    out = parse_tool_calls(format_call(name, arguments))
    assert_parsed(out, [(name, arguments)], "")


@settings(max_examples=300, deadline=None)
@given(name=names, arguments=arguments_st, before=around, after=around)
def test_round_trip_with_text(
    name: str, arguments: dict[str, Any], before: str, after: str
) -> None:
    out = parse_tool_calls(before + format_call(name, arguments) + after)
    assert_parsed(out, [(name, arguments)], before + after)


@settings(max_examples=300, deadline=None)
@given(
    name1=names,
    args1=arguments_st,
    name2=names,
    args2=arguments_st,
    before=around,
    between=around,
    after=around,
)
def test_round_trip_two_calls(
    name1: str,
    args1: dict[str, Any],
    name2: str,
    args2: dict[str, Any],
    before: str,
    between: str,
    after: str,
) -> None:
    raw = before + format_call(name1, args1) + between + format_call(name2, args2) + after
    out = parse_tool_calls(raw)
    assert_parsed(out, [(name1, args1), (name2, args2)], before + between + after)


@settings(max_examples=300, deadline=None)
@given(text=around)
def test_text_without_calls_is_kept(text: str) -> None:
    assert parse_tool_calls(text) == ParsedOutput(text=text, tool_calls=[])


def test_numbers_are_typed() -> None:
    raw = format_call("f", {}).replace("{}", "{a:1,b:-2,c:1.5,d:-1e3,e:2E-2,f:0.0,g:10e+2}")
    (call,) = parse_tool_calls(raw).tool_calls
    expected = {"a": 1, "b": -2, "c": 1.5, "d": -1000.0, "e": 0.02, "f": 0.0, "g": 1000.0}
    assert typed(call.arguments) == typed(expected)


def test_whitespace_between_tokens_is_tolerated() -> None:
    raw = "<start_function_call>call:f{ a : [ 1 , true ] ,\n b:{c:null} }<end_function_call>"
    (call,) = parse_tool_calls(raw).tool_calls
    assert call == ToolCall("f", {"a": [1, True], "b": {"c": None}})


def test_stray_end_token_is_text() -> None:
    raw = "a<end_function_call>b" + format_call("f", {"x": 1})
    out = parse_tool_calls(raw)
    assert out == ParsedOutput("a<end_function_call>b", [ToolCall("f", {"x": 1})])


# -- malformed outputs ---------------------------------------------------------------------------

GOOD = "<start_function_call>call:f{a:1}<end_function_call>"


@pytest.mark.parametrize(
    "raw",
    [
        "<start_function_call>call:f{a:<escape>abc}<end_function_call>",  # unterminated escape
        "<start_function_call>call:f{a:1<end_function_call>",  # missing closing brace
        "<start_function_call>call:f a:1}<end_function_call>",  # missing opening brace
        "<start_function_call>call:f xyz{a:1}<end_function_call>",  # garbage after name
        "<start_function_call>call:f{a:1}garbage<end_function_call>",  # garbage after object
        "<start_function_call>call:f{a:1}",  # no end token
        "<start_function_call>call:{a:1}<end_function_call>",  # no name
        "<start_function_call>f{a:1}<end_function_call>",  # no call: prefix
        "<start_function_call>call:f{a:1,}<end_function_call>",  # trailing comma
        "<start_function_call>call:f{a}<end_function_call>",  # key without value
        "<start_function_call>call:f{a:celsius}<end_function_call>",  # bare word
        "<start_function_call>call:f{a:1.2.3}<end_function_call>",  # bad number
        "<start_function_call>call:f{a:[1,2}<end_function_call>",  # unclosed array
        "<start_function_call>call:f{a:{b:1}<end_function_call>",  # unclosed nested object
        "<start_function_call>call:f{a:1 2}<end_function_call>",  # two values
        "<start_function_call>",
        "text " + GOOD + " then <start_function_call>call:g{b:<escape>trunc",  # one bad block
        # nesting deeper than Python's recursion limit: no RecursionError escapes
        "<start_function_call>call:f{a:" + "[" * 5000 + "]" * 5000 + "}<end_function_call>",
    ],
)
def test_malformed_keeps_text(raw: str) -> None:
    out = parse_tool_calls(raw)
    assert out == ParsedOutput(text=raw, tool_calls=[])


@settings(max_examples=300, deadline=None)
@given(name=names, arguments=arguments_st, cut=st.integers(min_value=1))
def test_truncated_call_never_raises(name: str, arguments: dict[str, Any], cut: int) -> None:
    raw = format_call(name, arguments)
    prefix = raw[: cut % len(raw)]
    out = parse_tool_calls(prefix)
    assert out == ParsedOutput(text=prefix, tool_calls=[])


# -- formatting ----------------------------------------------------------------------------------


def test_format_value_examples() -> None:
    assert format_value("a {b}, c: d") == "<escape>a {b}, c: d<escape>"
    assert format_value(True) == "true"
    assert format_value(False) == "false"
    assert format_value(None) == "null"
    assert format_value(3) == "3"
    assert format_value(-2) == "-2"
    assert format_value(21.5) == "21.5"
    assert format_value(1.0) == "1.0"
    assert format_value(1e16) == "1e+16"
    assert format_value({"b": 1, "a": [1, "x"]}) == "{b:1,a:[1,<escape>x<escape>]}"
    assert format_value(("a", 2)) == "[<escape>a<escape>,2]"
    assert format_value([]) == "[]"
    assert format_value({}) == "{}"


def test_format_call_matches_fixture() -> None:
    raw = format_call(
        "run_job", {"extra_args": {"nprocs": 16, "tags": ["a", "b,c"]}, "name": "train"}
    )
    assert raw == (
        "<start_function_call>call:run_job{extra_args:{nprocs:16,tags:[<escape>a<escape>,"
        "<escape>b,c<escape>]},name:<escape>train<escape>}<end_function_call>"
    )


def test_format_response() -> None:
    assert format_response("get_weather", {"temperature": 15, "weather": "sunny"}) == (
        "<start_function_response>response:get_weather{temperature:15,"
        "weather:<escape>sunny<escape>}<end_function_response>"
    )
    assert format_response("f", "ok") == (
        "<start_function_response>response:f{value:<escape>ok<escape>}<end_function_response>"
    )
    assert format_response("f", [1, 2]) == (
        "<start_function_response>response:f{value:[1,2]}<end_function_response>"
    )


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", 1j, {"a": object()}, [object()]])
def test_format_value_rejects_unsupported_types(value: Any) -> None:
    with pytest.raises(TypeError):
        format_value(value)


def test_format_value_rejects_non_str_key() -> None:
    with pytest.raises(TypeError):
        format_value({1: "a"})


@pytest.mark.parametrize(
    "value",
    [
        "a<escape>b",
        ESCAPE,
        ["ok", "x<escape>"],
        {"k": {"n": "<escape>"}},
        math.nan,
        math.inf,
        {"bad key": 1},
        {"": 1},
        {"a:b": 1},
    ],
)
def test_format_value_rejects_bad_values(value: Any) -> None:
    with pytest.raises(ValueError):
        format_value(value)


@pytest.mark.parametrize("name", ["", "a b", "f{", "a:b", "<x>"])
def test_format_call_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        format_call(name, {})
    with pytest.raises(ValueError):
        format_response(name, {})
