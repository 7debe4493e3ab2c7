"""`Model.chat` on the real base model: mechanics (the base model is not trained for tools)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal, Optional

import pytest

import gemma_rs


@pytest.fixture(scope="module")
def model(real_model_gguf: Path) -> gemma_rs.Model:
    return gemma_rs.load(real_model_gguf, max_inference_len=512)


def get_weather(location: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Gets the current weather in a given location.

    Args:
        location: The city, e.g. "Tokyo, JP".
        unit: The unit of the temperature.
    """
    return {"temperature": 21, "unit": unit}


def test_plain_chat_returns_a_chat_result(model):
    r = model.chat([{"role": "user", "content": "Hi! Who are you?"}], max_new_tokens=12)
    assert isinstance(r, gemma_rs.ChatResult)
    assert r.finish_reason == "length" and r.tool_calls == []
    assert r.raw == r.completion.text and r.text == r.raw  # no call blocks to remove
    prompt = gemma_rs.render_chat([{"role": "user", "content": "Hi! Who are you?"}])
    assert r.completion.prompt_tokens == len(model.tokenize(prompt))
    # Deterministic: the same as completing the rendered prompt.
    assert model.complete(prompt, 12).token_ids == r.completion.token_ids


def test_tool_chat_renders_declarations_and_warns_without_control_tokens(model):
    messages = [
        {"role": "developer", "content": "You can call the following functions"},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = model.chat(messages, tools=[get_weather], max_new_tokens=8, stop=["\n"])
    assert any("lacks FunctionGemma's control tokens" in str(w.message) for w in caught)
    assert isinstance(r, gemma_rs.ChatResult)
    text = gemma_rs.render_chat(messages, [get_weather])
    assert "declaration:get_weather{description:<escape>Gets the current weather" in text
    assert r.completion.prompt_tokens == len(model.tokenize(text))


def test_chat_stops_at_a_function_response(real_model_bf16_dir, tmp_path):
    """The base model ends a turn with ' mendatang' (id 217716) where a chat model writes
    <end_of_turn>. Spelling that token <start_function_response> in a copy of the tokenizer makes
    the model write a chat stop: generation ends there, before it."""
    tok = json.loads((real_model_bf16_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    old = next(t for t, i in vocab.items() if i == 217716)
    vocab["<start_function_response>"] = vocab.pop(old)
    merges = tok["model"]["merges"]
    tok["model"]["merges"] = [m for m in merges if old not in (*m, "".join(m))]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(real_model_bf16_dir / name)
    model = gemma_rs.load(tmp_path, max_inference_len=256)
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "What is 3+3?"},
    ]
    r = model.chat(messages, max_new_tokens=16)
    assert r.finish_reason == "stop", r
    assert r.raw == r.text and "<start_function_response>" not in r.raw
    assert len(r.completion.token_ids) < 16


def test_function_schema_of_a_python_function():
    def f(
        city: str,
        days: int,
        threshold: float,
        metric: bool,
        tags: list[str],
        unit: Literal["c", "f"] = "c",
        note: Optional[str] = None,  # noqa: UP045 (the issue names Optional)
    ) -> None:
        """Forecast.

        Args:
            city: The city.
            days: How many days.
            threshold: A threshold.
            metric: Metric units.
            tags: Labels.
            unit: The unit.
            note: A note.
        """

    s = gemma_rs.function_schema(f)
    props = s["parameters"]["properties"]
    assert s["name"] == "f" and s["description"] == "Forecast."
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "description": "Labels."}
    assert props["unit"]["enum"] == ["c", "f"]
    assert s["parameters"]["required"] == ["city", "days", "threshold", "metric", "tags"]


def test_chat_uses_the_checkpoints_own_template(real_model_bf16_dir, tmp_path):
    """With a chat template in tokenizer_config.json (here one written in FunctionGemma's rules),
    `chat` renders with it, through MiniJinja: the same prompt as the built-in renderer."""
    template = (Path(__file__).parent / "data" / "functiongemma.jinja").read_text()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).symlink_to(real_model_bf16_dir / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    model = gemma_rs.load(tmp_path, max_inference_len=256)
    assert model.chat_template == template
    messages = [
        {"role": "developer", "content": "You can call the following functions"},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = model.chat(messages, tools=[get_weather], max_new_tokens=4)
    want = model.complete(gemma_rs.render_chat(messages, [get_weather]), 4)
    assert r.completion.prompt_tokens == want.prompt_tokens
    assert r.completion.token_ids == want.token_ids


def test_a_template_reads_tool_calls_in_the_openai_form(real_model_bf16_dir, tmp_path):
    """ToolCall objects in a conversation reach a checkpoint's template as OpenAI-style dicts
    (what transformers passes), with tojson writing json.dumps's text."""
    template = (
        "{{ bos_token }}{% for m in messages %}{% for tc in m.tool_calls or [] %}"
        "{{ tc.function.name }}({{ tc.function.arguments | tojson }}){% endfor %}"
        "{{ m.content }}\n{% endfor %}"
    )
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).symlink_to(real_model_bf16_dir / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    model = gemma_rs.load(tmp_path, max_inference_len=128)
    call = gemma_rs.ToolCall("get_weather", {"location": "Paris, FR", "unit": "celsius"})
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    r = model.chat(messages, max_new_tokens=2)
    text = 'Weather?\nget_weather({"location": "Paris, FR", "unit": "celsius"})\n'
    assert r.completion.prompt_tokens == len(model.tokenize(text))


def test_google_style_tool_responses():
    """Google's guide writes a response as {"name", "response"}, a list of them for parallel
    calls: one function response each, under its own name."""
    calls = [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": [
            {"name": "a", "response": {"x": 1}}, {"name": "b", "response": {"y": "z"}}]},
    ]  # fmt: skip
    text = gemma_rs.render_chat(messages)
    assert text.endswith(
        "<start_function_response>response:a{x:1}<end_function_response>"
        "<start_function_response>response:b{y:<escape>z<escape>}<end_function_response>"
    )
