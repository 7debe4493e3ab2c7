"""The README's main job: the default model rebuilt from the PyPI GGUF equals the reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gemma_rs


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, real_model_bf16_dir) -> Path:
    # real_model_bf16_dir makes sure the GGUF is assembled (or the test skips / fails in CI).
    from gemma_rs import demo

    return demo.gguf_to_hf(demo.gguf_path(), tmp_path_factory.mktemp("demo") / "gemma-3-270m")


def test_rebuilt_tokenizer_equals_transformers(demo_dir, fixtures_dir):
    ours = json.loads((demo_dir / "tokenizer.json").read_text())
    ref = json.loads((fixtures_dir / "gemma-3-270m" / "tokenizer.json").read_text())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert ours[key] == ref[key], key
    assert ours["model"]["vocab"] == ref["model"]["vocab"]
    assert ours["model"]["merges"] == ref["model"]["merges"]


def test_rebuilt_model_generates_the_reference(demo_dir, real_model_bf16_dir, fixtures_dir):
    ref = json.loads((fixtures_dir / "gemma-3-270m" / "reference-bf16.json").read_text())
    # bf16 weights: exactly the reference checkpoint's values.
    model = gemma_rs.load(demo_dir, max_inference_len=128, weights="bf16")
    fixture = gemma_rs.load(real_model_bf16_dir, max_inference_len=128, weights="bf16")
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "sliding_window")
    assert {k: model.config[k] for k in keys} == {k: fixture.config[k] for k in keys}
    assert model.max_inference_len == 128 and model.eos_token_ids == [1]
    assert (demo_dir / "model.safetensors").read_bytes() == (
        real_model_bf16_dir / "model.safetensors"
    ).read_bytes()
    case = next(g for g in ref["generate"] if g["name"] == "capital")
    got = model.complete(case["prompt"], max_new_tokens=len(case["greedy_ids"]))
    assert got.token_ids == case["greedy_ids"]
    assert got.text == case["greedy_text"]


def test_demo_command_prints_the_continuation(demo_dir, monkeypatch):
    # The cache holds the model under the name `model_dir()` expects.
    cache = demo_dir.parent
    (cache / "gemma-3-270m-demo").symlink_to(demo_dir, target_is_directory=True)
    out = subprocess.run(
        [sys.executable, "-m", "gemma_rs.demo", "The capital of France is", "--max-new-tokens=8"],
        env={"GEMMA_RS_CACHE": str(cache), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert out.stdout.startswith("The capital of France is the capital")
    assert "tok/s" in out.stderr
