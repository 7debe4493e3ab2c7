"""tests/data/functiongemma.jinja, rendered by MiniJinja (render_template), gives the same text as
gemma_rs.chat.render_chat: the cases of render-cases.json and a few built here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gemma_rs._gemma_rs import render_template
from gemma_rs.chat import render_chat

TEMPLATE = (Path(__file__).resolve().parent / "data" / "functiongemma.jinja").read_text()
DEV = "You are a model that can do function calling with the following functions"


def _render(messages: list[Any], tools: list[Any] | None, add_generation_prompt: bool) -> str:
    context = {
        "messages": messages,
        "tools": tools,
        "add_generation_prompt": add_generation_prompt,
        "bos_token": "<bos>",
    }
    return render_template(TEMPLATE, json.dumps(context))


def _cases(fixtures_dir: Path) -> list[dict[str, Any]]:
    data = json.loads((fixtures_dir / "functiongemma" / "render-cases.json").read_text())
    return data["cases"]


def test_fixture_cases(fixtures_dir: Path) -> None:
    cases = _cases(fixtures_dir)
    assert cases
    for case in cases:
        text = _render(case["messages"], case["tools"], case["add_generation_prompt"])
        assert text == "<bos>" + case["expected"], case["name"]
        expected = render_chat(case["messages"], case["tools"], case["add_generation_prompt"])
        assert text == "<bos>" + expected, case["name"]


NESTED_TOOL = {
    "type": "function",
    "function": {
        "name": "create_event",
        "description": "Create a calendar event.",
        "parameters": {
            "type": "object",
            "properties": {
                "when": {
                    "type": "object",
                    "description": "Time span.",
                    "properties": {
                        "start": {"type": "string", "description": "ISO start"},
                        "end": {"type": "string"},
                        "all_day": {"type": "boolean", "default": False},
                    },
                    "required": ["start"],
                },
                "attendees": {
                    "type": "array",
                    "description": "People to invite.",
                    "items": {
                        "type": "object",
                        "properties": {
                            "email": {"type": "string"},
                            "Role": {"type": "string", "enum": ["required", "optional"]},
                        },
                    },
                    "maxItems": 10,
                },
                "tags": {"type": "array", "items": {"type": "string"}},
                "priority": {"type": ["integer", "null"], "minimum": 1, "maximum": 2.5},
            },
            "required": ["when"],
        },
    },
}

SIMPLE_TOOL = {
    "type": "function",
    "function": {
        "name": "ping",
        "parameters": {"type": "object", "properties": {}, "required": []},
    },
}

CHAT = [
    {"role": "system", "content": "  Be brief.\n"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! "},
    {
        "role": "user",
        "content": [{"type": "text", "text": " How are"}, {"type": "text", "text": "you?"}],
    },
]

EXTRA_CASES = [
    ("plain_chat", CHAT, None, True),
    ("plain_chat_no_prompt", CHAT, None, False),
    ("plain_chat_empty_tools", CHAT[1:], [], True),
    (
        "model_role",
        [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}],
        None,
        True,
    ),
    (
        "nested_with_developer",
        [{"role": "developer", "content": DEV}, CHAT[1]],
        [NESTED_TOOL],
        True,
    ),
    ("nested_without_developer", CHAT[1:], [NESTED_TOOL, SIMPLE_TOOL], True),
    ("bare_tool_dicts", [{"role": "system", "content": DEV}], [NESTED_TOOL["function"]], False),
]


@pytest.mark.parametrize(
    ("messages", "tools", "add_generation_prompt"),
    [c[1:] for c in EXTRA_CASES],
    ids=[c[0] for c in EXTRA_CASES],
)
def test_extra_cases(
    messages: list[Any], tools: list[Any] | None, add_generation_prompt: bool
) -> None:
    text = _render(messages, tools, add_generation_prompt)
    assert text == "<bos>" + render_chat(messages, tools, add_generation_prompt)


def test_nested_declaration_text() -> None:
    text = _render([{"role": "user", "content": "x"}], [NESTED_TOOL], False)
    assert text.startswith("<bos><start_of_turn>developer\n<start_function_declaration>")
    assert (
        "when:{description:<escape>Time span.<escape>,properties:{all_day:{default:false,"
        "type:<escape>BOOLEAN<escape>},end:{type:<escape>STRING<escape>},start:{description:"
        "<escape>ISO start<escape>,type:<escape>STRING<escape>}},required:[<escape>start<escape>],"
        "type:<escape>OBJECT<escape>}" in text
    )
    assert (
        "attendees:{description:<escape>People to invite.<escape>,items:{properties:{Role:{enum:"
        "[<escape>required<escape>,<escape>optional<escape>],type:<escape>STRING<escape>},email:"
        "{type:<escape>STRING<escape>}},type:<escape>OBJECT<escape>},maxItems:10,"
        "type:<escape>ARRAY<escape>}" in text
    )
    assert (
        "priority:{maximum:2.5,minimum:1,type:[<escape>INTEGER<escape>,<escape>NULL<escape>]}"
        in text
    )


def test_unknown_role_raises() -> None:
    with pytest.raises(Exception, match="unsupported role"):
        _render([{"role": "narrator", "content": "x"}], None, True)
