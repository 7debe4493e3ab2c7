"""Constrained decoding: tool calls valid by construction, JSON answers valid for their schema.

The model is the base Gemma 3 270M (not trained for tools, so only the constraint makes its calls
valid); outputs are checked with ``jsonschema`` against the declared schemas, made strict (no
undeclared properties), and parsed back with ``parse_tool_calls``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gemma_rs
from gemma_rs import tools as T
from gemma_rs.chat import normalize_tools

TOOLS: list[dict[str, Any]] = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris."},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 10},
            },
            "required": ["city"],
        },
    },
    {
        "name": "create_event",
        "description": "Puts an event in the calendar.",
        "parameters": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 40},
                "start": {
                    "type": "object",
                    "properties": {
                        "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                        "minute": {"type": "integer", "minimum": 0, "maximum": 59},
                    },
                    "required": ["hour", "minute"],
                },
                "attendees": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                "online": {"type": "boolean"},
                "notes": {"type": ["string", "null"]},
            },
            "required": ["title", "start", "online"],
        },
    },
    {
        "name": "set_thermostat",
        "description": "Sets the heating.",
        "parameters": {
            "type": "object",
            "properties": {
                "celsius": {"type": "number", "minimum": 5, "maximum": 30},
                "rooms": {
                    "type": "array",
                    "maxItems": 3,
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"enum": ["kitchen", "bedroom", "office"]},
                            "on": {"type": "boolean"},
                        },
                        "required": ["name", "on"],
                    },
                },
                "mode": {"enum": ["heat", "cool", None]},
            },
            "required": ["celsius"],
        },
    },
]
CHAT = [
    {"role": "developer", "content": "You can call the following functions."},
    {"role": "user", "content": "Book a meeting with Ana tomorrow at 9:30 and warm up the office."},
]
MAX_NEW = 700
SEEDS = [None, 0, 1, 2, 3]  # None: greedy; the others at temperature 1.0


def strict(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object: no undeclared keys."""
    schema = copy.deepcopy(schema)

    def walk(s: Any) -> None:
        if isinstance(s, dict):
            if s.get("type") == "object" or "properties" in s:
                s.setdefault("additionalProperties", False)
            for v in s.get("properties", {}).values():
                walk(v)
            walk(s.get("items"))
            for v in s.get("anyOf", []):
                walk(v)

    walk(schema)
    return schema


def assert_valid_calls(r: gemma_rs.ChatResult, tools: list[dict[str, Any]]) -> None:
    assert r.finish_reason == "tool_calls", r
    assert r.tool_calls, r.raw
    assert len(r.completion.token_ids) < MAX_NEW
    declared = {t["name"]: t["parameters"] for t in tools}
    for call in r.tool_calls:
        assert call.name in declared, r.raw
        jsonschema.validate(call.arguments, strict(declared[call.name]))
    # Every call block the model opened is one of the calls (none left unparsed as text).
    assert r.raw.count(T.CALL_START) == r.raw.count(T.CALL_END) == len(r.tool_calls), r.raw


def sampling(seed: int | None) -> dict[str, Any]:
    return {} if seed is None else {"temperature": 1.0, "seed": seed}


@pytest.fixture(scope="module")
def model(real_model_gguf: Path) -> gemma_rs.Model:
    return gemma_rs.load(real_model_gguf, max_inference_len=1536)


@pytest.fixture(autouse=True)
def _no_control_token_warning() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lacks FunctionGemma's control tokens")
        yield


@pytest.mark.parametrize("seed", SEEDS)
def test_required_gives_valid_calls_of_declared_tools(model, seed):
    r = model.chat(CHAT, TOOLS, tool_choice="required", max_new_tokens=MAX_NEW, **sampling(seed))
    assert_valid_calls(r, TOOLS)
    assert r.text == "" and len(r.tool_calls) <= T.MAX_PARALLEL_CALLS


@pytest.mark.parametrize("seed", SEEDS)
def test_a_named_tool_choice_calls_that_tool_once(model, seed):
    for choice in ("create_event", {"type": "function", "function": {"name": "set_thermostat"}}):
        r = model.chat(CHAT, TOOLS, tool_choice=choice, max_new_tokens=MAX_NEW, **sampling(seed))
        assert_valid_calls(r, TOOLS)
        name = choice if isinstance(choice, str) else choice["function"]["name"]
        assert [c.name for c in r.tool_calls] == [name]


@pytest.mark.parametrize("seed", SEEDS)
def test_parallel_tool_calls_false_makes_one_call(model, seed):
    r = model.chat(
        CHAT,
        TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_new_tokens=MAX_NEW,
        **sampling(seed),
    )
    assert_valid_calls(r, TOOLS)
    assert len(r.tool_calls) == 1


@pytest.mark.parametrize("seed", SEEDS)
def test_none_never_starts_a_call_and_auto_output_always_parses(model, seed):
    r = model.chat(CHAT, TOOLS, tool_choice="none", max_new_tokens=40, **sampling(seed))
    assert r.tool_calls == [] and r.finish_reason != "tool_calls"
    assert not any(t in r.raw for t in (*T.CONTROL_TOKENS, "<start_of_turn>", "<end_of_turn>"))
    r = model.chat(CHAT, TOOLS, max_new_tokens=MAX_NEW, **sampling(seed))  # "auto"
    if T.CALL_START in r.raw:  # calls, all valid: the text before them has no control text
        assert_valid_calls(r, TOOLS)
        assert r.raw.startswith(r.text)
    else:
        assert r.tool_calls == [] and r.text == r.raw


def test_the_mask_comes_before_top_k_and_temperature(model):
    """top_k=1 at temperature 1 keeps the most likely allowed token: the greedy constrained call."""
    greedy = model.chat(CHAT, TOOLS, tool_choice="required", max_new_tokens=MAX_NEW)
    top1 = model.chat(
        CHAT,
        TOOLS,
        tool_choice="required",
        max_new_tokens=MAX_NEW,
        temperature=1.0,
        top_k=1,
        seed=9,
    )
    assert top1.raw == greedy.raw
    # Unconstrained, the same prompt gives no valid call: the constraint made the difference.
    free = model.complete(model.chat_prompt(CHAT, TOOLS), 60)
    assert T.parse_tool_calls(free.text).tool_calls == []


def test_control_tokens_as_special_tokens(functiongemma_dir):
    """FunctionGemma's tokenizer: the call syntax is its single special tokens, not their text."""
    m = gemma_rs.load(functiongemma_dir, max_inference_len=1536)
    assert m._special_controls() == frozenset(T.CONTROL_TOKENS)
    for seed in (None, 1):
        r = m.chat(CHAT, TOOLS, tool_choice="required", max_new_tokens=MAX_NEW, **sampling(seed))
        assert_valid_calls(r, TOOLS)
        ids = r.completion.token_ids
        start, end, esc = (
            m.tokenize(t, add_bos=False)[0] for t in (T.CALL_START, T.CALL_END, T.ESCAPE)
        )
        assert ids[0] == start and ids.count(start) == ids.count(end) == len(r.tool_calls)
        assert ids.count(esc) == r.raw.count(T.ESCAPE)  # every <escape> is the one token


def test_constrained_chat_reuses_the_cached_prefix_and_streams(model):
    # One tool and a short answer: prompt and reply fit in the sliding window (512), so the
    # second call reuses all of the first's prompt.
    tools = TOOLS[:1]
    model.reset()
    a = model.chat(CHAT, tools, tool_choice="required", max_new_tokens=300)
    b = model.chat(CHAT, tools, tool_choice="required", max_new_tokens=300)
    assert a.finish_reason == "tool_calls"
    assert a.completion.prompt_tokens + len(a.completion.token_ids) < 512
    assert b.completion.reused_tokens == b.completion.prompt_tokens - 1 and b.raw == a.raw
    ids = model.chat_prompt(CHAT, tools)
    grammar = T.tool_grammar(normalize_tools(tools), "required", True, model._special_controls())
    s = model.stream(ids, 300, grammar=grammar)
    pieces = list(s)
    assert "".join(pieces) == a.raw and len(pieces) > 5
    assert s.completion.finish_reason == "stop" and s.completion.constraint_seconds > 0


# ----------------------------------------------------------------------------------------------
# JSON answers

JSON_SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "population": {"type": "integer", "minimum": 0, "maximum": 50000000},
            "capital": {"type": "boolean"},
        },
        "required": ["city", "population", "capital"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "minItems": 1,
        "maxItems": 4,
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "kind": {"enum": ["museum", "park", "tower"]},
                "rating": {"type": ["number", "null"], "minimum": 0, "maximum": 5},
            },
            "required": ["name", "kind"],
            "additionalProperties": False,
        },
    },
    {"enum": ["yes", "no", 3, None]},
]


@pytest.mark.parametrize("schema", JSON_SCHEMAS, ids=["object", "array", "enum"])
@pytest.mark.parametrize("seed", SEEDS)
def test_json_schema_outputs_parse_and_validate(model, schema, seed):
    c = model.complete("Facts about Paris, as JSON:\n", 400, json_schema=schema, **sampling(seed))
    assert c.finish_reason in ("stop", "eos"), c
    jsonschema.validate(json.loads(c.text), schema)


def test_json_schema_as_text_and_in_generate_stream_and_chat(model):
    schema = JSON_SCHEMAS[0]
    want = model.complete("Paris:", 200, json_schema=schema).text
    assert model.generate("Paris:", 200, json_schema=json.dumps(schema)) == want
    assert "".join(model.stream("Paris:", 200, json_schema=schema)) == want
    r = model.chat([{"role": "user", "content": "Describe Paris."}], json_schema=schema)
    jsonschema.validate(json.loads(r.text), schema)
    assert r.finish_reason in ("stop", "eos") and r.tool_calls == []


def test_max_new_tokens_reached_says_length(model):
    c = model.complete("Paris:", 3, json_schema=JSON_SCHEMAS[0])
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    r = model.chat(CHAT, TOOLS, tool_choice="required", max_new_tokens=4)
    assert r.finish_reason == "length" and r.tool_calls == []


def test_a_lark_grammar(model):
    c = model.complete("The answer, yes or no:", 20, grammar='start: " " ("yes" | "no") "."')
    assert c.text in (" yes.", " no.") and c.finish_reason == "stop"


# ----------------------------------------------------------------------------------------------
# Errors: before anything is generated, naming the problem


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"json_schema": {"type": "strin"}}, "strin"),
        ({"json_schema": {"type": "integer", "minimum": 3, "maximum": 1}}, "JSON schema"),
        ({"json_schema": [1, 2]}, "json_schema must be"),
        ({"grammar": "start: foo"}, "foo"),
        ({"grammar": 'start: A\nA: "a" & "b"'}, "grammar"),
        ({"grammar": 'start: "a"', "json_schema": {"type": "string"}}, "not both"),
    ],
)
def test_bad_schemas_and_grammars_fail_before_generation(model, kwargs, message):
    model.reset()
    ids = model.tokenize("Paris is")
    with pytest.raises((ValueError, TypeError), match=message):
        model.complete(ids, 8, **kwargs)
    assert model._inner.held_prefix(ids) == 0  # nothing was prefilled


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        (TOOLS, "send_email", r"'send_email' is not a declared tool \(declared: \['get_weather'"),
        (TOOLS, {"type": "function"}, "names no function"),
        ([], "required", "needs tools"),
        (None, "get_weather", "needs tools"),
        (TOOLS, 3, "tool_choice must be"),
        (
            [
                {
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {"x": {"type": "string", "pattern": "a+"}},
                    },
                }
            ],
            "auto",
            r"tool 'f' parameters\.x: unsupported schema keyword\(s\) \['pattern'\]",
        ),
        (
            [{"name": "f", "parameters": {"type": "object", "properties": {"x": {}}}}],
            "auto",
            "without a type",
        ),
        ([{"name": "f", "parameters": {"type": "array"}}], "auto", "must be an object schema"),
    ],
)
def test_bad_tools_and_tool_choices_fail_before_generation(model, tools, choice, message):
    with pytest.raises((ValueError, TypeError), match=message):
        model.chat(CHAT, tools, tool_choice=choice)


# ----------------------------------------------------------------------------------------------
# The grammar, without a model


def test_excluding_regexes_match_exactly_the_strings_without_the_texts():
    words = ["<", "escape>", "e", "s", "<escape", "end_of_turn>", "<start_function_call>", "x"]
    words += ["\n", "<start_of_turn>", "<end_function_call>", "st", "<e"]
    import random

    rng = random.Random(0)
    for texts, nonempty in (
        (T._NOT_IN_TEXT, False),
        (T._NOT_IN_TEXT, True),
        (["<a>", "<b>"], False),
    ):
        rx = re.compile(T._excluding(texts, nonempty)[1:-1], re.S)
        for _ in range(5000):
            s = "".join(rng.choice(words) for _ in range(rng.randint(0, 6)))
            want = not any(t in s for t in texts) and (bool(s) or not nonempty)
            assert (rx.fullmatch(s) is not None) == want, s


def test_tool_grammar_writes_control_tokens_as_tokens_or_text():
    g = T.tool_grammar(normalize_tools(TOOLS[:1]), "required", special=frozenset(T.CONTROL_TOKENS))
    assert "<start_function_call> (" in g and '"<start_function_call>"' not in g
    g = T.tool_grammar(normalize_tools(TOOLS[:1]), "required", special=frozenset())
    assert '"<start_function_call>" (' in g
    assert f"[max_tokens={T.STRING_MAX_TOKENS}]" in g  # "city" has no maxLength


# ----------------------------------------------------------------------------------------------
# Property-based: random schemas of the supported kinds


# The same examples on every run (CI stays reproducible); GEMMA_RS_HYPOTHESIS=N draws N fresh ones.
EXAMPLES = int(os.environ.get("GEMMA_RS_HYPOTHESIS", "12"))
DERANDOMIZE = "GEMMA_RS_HYPOTHESIS" not in os.environ


def _schemas(depth: int, json_mode: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    """Schemas of the supported kinds. In ``json_mode`` (llguidance's own JSON Schema compiler)
    a number needs ``multipleOf`` to end: its ranges leave the fraction unbounded."""
    numbers = [st.just({"type": "number", "minimum": -3, "maximum": 3, "multipleOf": 0.25})]
    if not json_mode:
        numbers += [
            st.just({"type": "number", "minimum": -10, "maximum": 10.5}),
            st.just({"type": "number"}),
            st.just({"type": "integer"}),
        ]
    scalars = st.one_of(
        *numbers,
        st.builds(lambda hi: {"type": "string", "maxLength": hi}, st.integers(1, 12)),
        st.builds(
            lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
            st.integers(-50, 50),
            st.integers(0, 100),
        ),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.lists(
            st.sampled_from(["red", "green", "blue", "x y", "a,b"]),
            min_size=1,
            max_size=3,
            unique=True,
        ).map(lambda v: {"enum": v}),
        st.just({"type": ["string", "null"], "maxLength": 8}),
    )
    if depth == 0:
        return scalars
    inner = _schemas(depth - 1, json_mode)
    return st.one_of(
        scalars,
        st.builds(
            lambda i, n: {"type": "array", "items": i, "maxItems": n}, inner, st.integers(0, 3)
        ),
        _objects(inner, closed=json_mode),
    )


def _objects(
    values: st.SearchStrategy[dict[str, Any]], closed: bool = False
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects of ``values``; ``closed`` ones say ``additionalProperties: false`` (a call's
    arguments never have undeclared keys; a JSON answer has them unless told so)."""
    keys = st.lists(
        st.sampled_from(["a", "b", "name", "count", "on", "x_1"]), max_size=4, unique=True
    )

    def build(draw_keys: list[str], vals: list[dict[str, Any]], req: list[bool]) -> dict[str, Any]:
        props = dict(zip(draw_keys, vals))
        schema = {
            "type": "object",
            "properties": props,
            "required": [k for k, r in zip(draw_keys, req) if r],
        }
        return {**schema, "additionalProperties": False} if closed else schema

    return keys.flatmap(
        lambda ks: st.builds(
            build,
            st.just(ks),
            st.lists(values, min_size=len(ks), max_size=len(ks)),
            st.lists(st.booleans(), min_size=len(ks), max_size=len(ks)),
        )
    )


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(params=_objects(_schemas(1)), seed=st.sampled_from(SEEDS))
def test_random_tool_schemas_give_valid_calls(model, params, seed):
    tools = [{"name": "tool", "description": "A tool.", "parameters": params}]
    r = model.chat(CHAT, tools, tool_choice="required", max_new_tokens=MAX_NEW, **sampling(seed))
    assert_valid_calls(r, tools)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(schema=_schemas(2, json_mode=True), seed=st.sampled_from(SEEDS))
def test_random_json_schemas_give_valid_documents(model, schema, seed):
    c = model.complete("Data:\n", 300, json_schema=schema, **sampling(seed))
    assert c.finish_reason in ("stop", "eos"), (schema, c)
    jsonschema.validate(json.loads(c.text), schema)
