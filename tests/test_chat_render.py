"""gemma_rs.chat: FunctionGemma prompts (render-cases.json, prompt-tokens.json) and tool schemas."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, List, Literal, Optional  # noqa: UP035 (typing spellings are tested)

import pytest

from gemma_rs.chat import function_schema, normalize_tools, render_chat
from gemma_rs.tools import ToolCall

DEV = "You are a model that can do function calling with the following functions"


def _assert_text(actual: str, expected: str) -> None:
    if actual != expected:
        diff = "\n".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                "expected",
                "actual",
                lineterm="",
            )
        )
        pytest.fail(f"rendered text differs:\n{diff}\nactual:   {actual!r}\nexpected: {expected!r}")


def _cases(fixtures_dir: Path) -> dict[str, dict[str, Any]]:
    data = json.loads((fixtures_dir / "functiongemma" / "render-cases.json").read_text())
    return {c["name"]: c for c in data["cases"]}


def test_render_cases(fixtures_dir: Path) -> None:
    cases = _cases(fixtures_dir)
    assert cases
    for case in cases.values():
        text = render_chat(
            case["messages"], case.get("tools"), case.get("add_generation_prompt", True)
        )
        _assert_text(text, case["expected"])


def test_bare_tool_dicts_render_the_same(fixtures_dir: Path) -> None:
    for case in _cases(fixtures_dir).values():
        bare = [t["function"] for t in case["tools"]]
        assert normalize_tools(case["tools"]) == bare
        _assert_text(render_chat(case["messages"], bare), case["expected"])


@pytest.fixture(scope="module")
def functiongemma_model(functiongemma_dir: Path) -> Any:
    import gemma_rs

    return gemma_rs.load(functiongemma_dir, max_inference_len=128)


def test_paris_weather_tokens(fixtures_dir: Path, functiongemma_model: Any) -> None:
    case = _cases(fixtures_dir)["paris_weather"]
    expected = json.loads((fixtures_dir / "functiongemma" / "prompt-tokens.json").read_text())
    text = render_chat(case["messages"], case["tools"])
    assert text == expected["prompt"]
    ids = functiongemma_model.tokenize(text)
    assert len(ids) == 85
    assert ids == expected["ids_with_bos"]


# ----------------------------------------------------------------------------------------------
# Schemas from Python functions


def search_flights(
    origin: str,
    destination: str,
    passengers: int,
    max_price: float,
    nonstop: bool,
    airlines: list[str],
    cabin: Literal["economy", "business", "first"] = "economy",
    notes: Optional[str] = None,  # noqa: UP045 (the typing spelling is what is tested)
    tags: Optional[List[str]] = None,  # noqa: UP006, UP045
) -> list[dict]:
    """Search for flights between two airports.

    Returns the cheapest matching flights first.

    Args:
        origin: IATA code of the departure airport,
            e.g. "SFO".
        destination (str): IATA code of the arrival airport.
        passengers: Number of travellers.
        max_price: Highest acceptable price in USD.
        nonstop: Only direct flights.
        airlines: Allowed airlines.
        cabin: Cabin class.
        notes: Free-text notes.

    Returns:
        The flights.
    """
    return []


SEARCH_FLIGHTS = {
    "name": "search_flights",
    "description": "Search for flights between two airports.",
    "parameters": {
        "type": "object",
        "properties": {
            "origin": {
                "type": "string",
                "description": 'IATA code of the departure airport, e.g. "SFO".',
            },
            "destination": {"type": "string", "description": "IATA code of the arrival airport."},
            "passengers": {"type": "integer", "description": "Number of travellers."},
            "max_price": {"type": "number", "description": "Highest acceptable price in USD."},
            "nonstop": {"type": "boolean", "description": "Only direct flights."},
            "airlines": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Allowed airlines.",
            },
            "cabin": {
                "type": "string",
                "enum": ["economy", "business", "first"],
                "description": "Cabin class.",
            },
            "notes": {"type": "string", "description": "Free-text notes."},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["origin", "destination", "passengers", "max_price", "nonstop", "airlines"],
    },
}


def test_function_schema_matches_hand_written() -> None:
    assert function_schema(search_flights) == SEARCH_FLIGHTS
    assert normalize_tools([search_flights]) == [SEARCH_FLIGHTS]
    messages = [{"role": "system", "content": DEV}, {"role": "user", "content": "SFO to JFK?"}]
    from_fn = render_chat(messages, [search_flights])
    _assert_text(from_fn, render_chat(messages, [{"type": "function", "function": SEARCH_FLIGHTS}]))
    _assert_text(from_fn, render_chat(messages, [SEARCH_FLIGHTS]))
    decl = from_fn.split("<start_function_declaration>")[1].split("<end_function_declaration>")[0]
    assert decl.startswith(
        "declaration:search_flights{description:<escape>Search for flights between two airports."
        "<escape>,parameters:{properties:{airlines:{"
    )
    assert (
        "airlines:{description:<escape>Allowed airlines.<escape>,"
        "items:{type:<escape>STRING<escape>},type:<escape>ARRAY<escape>}" in decl
    )
    assert (
        "cabin:{description:<escape>Cabin class.<escape>,enum:[<escape>economy<escape>,"
        "<escape>business<escape>,<escape>first<escape>],type:<escape>STRING<escape>}" in decl
    )
    assert decl.endswith(
        "required:[<escape>origin<escape>,<escape>destination<escape>,<escape>passengers<escape>,"
        "<escape>max_price<escape>,<escape>nonstop<escape>,<escape>airlines<escape>],"
        "type:<escape>OBJECT<escape>}}"
    )


def test_nested_schema_declaration() -> None:
    tool = {
        "name": "create_event",
        "parameters": {
            "type": "object",
            "properties": {
                "when": {
                    "type": "object",
                    "description": "Time span.",
                    "properties": {"start": {"type": "string"}, "end": {"type": "string"}},
                    "required": ["start"],
                },
                "attendees": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"email": {"type": "string"}}},
                },
            },
        },
    }
    text = render_chat([{"role": "user", "content": "x"}], [tool], add_generation_prompt=False)
    assert text == (
        "<start_of_turn>developer\n<start_function_declaration>declaration:create_event{"
        "parameters:{properties:{"
        "attendees:{items:{properties:{email:{type:<escape>STRING<escape>}},"
        "type:<escape>OBJECT<escape>},type:<escape>ARRAY<escape>},"
        "when:{description:<escape>Time span.<escape>,properties:{"
        "end:{type:<escape>STRING<escape>},start:{type:<escape>STRING<escape>}},"
        "required:[<escape>start<escape>],type:<escape>OBJECT<escape>}},"
        "type:<escape>OBJECT<escape>}}<end_function_declaration><end_of_turn>\n"
        "<start_of_turn>user\nx<end_of_turn>\n"
    )


# ----------------------------------------------------------------------------------------------
# Conversations with tool calls and responses


def _weather_turns(call: Any, response: Any) -> list[dict[str, Any]]:
    return [
        {"role": "developer", "content": DEV},
        {"role": "user", "content": "Weather in Tokyo?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": response},
    ]


CALL_AND_RESPONSE = (
    "<start_of_turn>user\nWeather in Tokyo?<end_of_turn>\n<start_of_turn>model\n"
    "<start_function_call>call:get_current_weather{location:<escape>Tokyo, Japan<escape>}"
    "<end_function_call><start_function_response>response:get_current_weather{temperature:15,"
    "weather:<escape>sunny<escape>}<end_function_response>"
)


@pytest.mark.parametrize(
    "call",
    [
        {
            "type": "function",
            "function": {"name": "get_current_weather", "arguments": {"location": "Tokyo, Japan"}},
        },
        {
            "type": "function",
            "function": {
                "name": "get_current_weather",
                "arguments": json.dumps({"location": "Tokyo, Japan"}),
            },
        },
        {"name": "get_current_weather", "arguments": {"location": "Tokyo, Japan"}},
        ToolCall("get_current_weather", {"location": "Tokyo, Japan"}),
    ],
)
@pytest.mark.parametrize(
    "response", [{"temperature": 15, "weather": "sunny"}, '{"temperature": 15, "weather": "sunny"}']
)
def test_tool_call_and_response(call: Any, response: Any) -> None:
    messages = _weather_turns(call, response)
    text = render_chat(messages[1:])
    assert text == CALL_AND_RESPONSE  # the model continues its open turn: no generation prompt
    final = {"role": "assistant", "content": "It is sunny and 15 degrees in Tokyo."}
    text = render_chat([*messages[1:], final, {"role": "user", "content": "Thanks"}])
    assert text == (
        CALL_AND_RESPONSE + "It is sunny and 15 degrees in Tokyo.<end_of_turn>\n"
        "<start_of_turn>user\nThanks<end_of_turn>\n<start_of_turn>model\n"
    )


def test_parallel_calls_and_named_responses() -> None:
    messages = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "a", "function": {"name": "weather", "arguments": {"city": "Paris"}}},
                {"id": "b", "function": {"name": "time", "arguments": {"city": "Paris"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "b", "content": {"time": "10:00"}},
        {"role": "tool", "content": {"sky": "clear"}},  # the next unanswered call: weather
        {"role": "tool", "name": "extra", "content": "plain text"},
        {"role": "user", "content": "And?"},
    ]
    assert render_chat(messages, add_generation_prompt=False) == (
        "<start_of_turn>user\nWeather and time in Paris?<end_of_turn>\n<start_of_turn>model\n"
        "<start_function_call>call:weather{city:<escape>Paris<escape>}<end_function_call>"
        "<start_function_call>call:time{city:<escape>Paris<escape>}<end_function_call>"
        "<start_function_response>response:time{time:<escape>10:00<escape>}"
        "<end_function_response>"
        "<start_function_response>response:weather{sky:<escape>clear<escape>}"
        "<end_function_response>"
        "<start_function_response>response:extra{value:<escape>plain text<escape>}"
        "<end_function_response><end_of_turn>\n"
        "<start_of_turn>user\nAnd?<end_of_turn>\n"
    )


def test_plain_chat_roles() -> None:
    messages = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "model", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert render_chat(messages) == (
        "<start_of_turn>developer\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert render_chat(messages[:2], add_generation_prompt=False).endswith("Hi<end_of_turn>\n")


def test_tools_without_developer_message_open_with_a_developer_turn() -> None:
    tool = {"name": "ping", "description": "Ping."}
    assert render_chat([{"role": "user", "content": "go"}], [tool]) == (
        "<start_of_turn>developer\n<start_function_declaration>declaration:ping{description:"
        "<escape>Ping.<escape>}<end_function_declaration><end_of_turn>\n"
        "<start_of_turn>user\ngo<end_of_turn>\n<start_of_turn>model\n"
    )


# ----------------------------------------------------------------------------------------------
# Errors


def test_unsupported_annotation_names_the_parameter() -> None:
    def f(ok: str, when: complex) -> None:
        """F."""

    with pytest.raises(TypeError, match="'when'"):
        function_schema(f)

    def g(pair: tuple[int, int]) -> None: ...

    with pytest.raises(TypeError, match="'pair'"):
        function_schema(g)

    def h(either: int | str) -> None: ...

    with pytest.raises(TypeError, match="'either'"):
        function_schema(h)

    def k(untyped) -> None: ...  # type: ignore[no-untyped-def]

    with pytest.raises(TypeError, match="'untyped'"):
        function_schema(k)

    with pytest.raises(TypeError, match="'f'|'when'"):
        render_chat([{"role": "user", "content": "x"}], [f])


def test_unknown_role() -> None:
    with pytest.raises(ValueError, match="'robot'"):
        render_chat([{"role": "robot", "content": "beep"}])


def test_tool_message_without_a_call() -> None:
    with pytest.raises(ValueError):
        render_chat([{"role": "user", "content": "x"}, {"role": "tool", "content": {}}])
