"""The typed API surface: one Sampling object for every generation method, results as typed
objects, inspect() public, and the Rust module's stub true to the module (stubtest runs in
scripts/test)."""

from __future__ import annotations

import dataclasses
import inspect as pyinspect

import pytest

import gemma_rs
from gemma_rs import _gemma_rs


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return gemma_rs.load(fixtures_dir / "tiny" / "tiny-gqa", max_inference_len=64)


def test_sampling_object_is_the_keyword_arguments(model):
    s = gemma_rs.Sampling(temperature=30.0, top_k=50, top_p=0.9, seed=7)
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty, s.seed) == (
        30.0,
        50,
        pytest.approx(0.9),
        0.0,
        1.0,
        7,
    )
    assert s == gemma_rs.Sampling(temperature=30.0, top_k=50, top_p=0.9, seed=7)
    assert "top_k=50" in repr(s)
    ids = [2, 10, 11, 12]
    by_keywords = model.complete(ids, 12, temperature=30.0, top_k=50, top_p=0.9, seed=7)
    by_object = model.complete(ids, 12, sampling=s)
    assert by_object.token_ids == by_keywords.token_ids
    # The tiny random model's logits span tens: at temperature 30 the seed shows.
    other = model.complete(ids, 12, sampling=gemma_rs.Sampling(temperature=30.0, seed=8))
    assert other.token_ids != by_keywords.token_ids
    with pytest.raises(TypeError, match="not both"):
        model.complete(ids, 4, sampling=s, temperature=1.0)
    with pytest.raises(TypeError, match="gemma_rs.Sampling"):
        model.complete(ids, 4, sampling={"temperature": 1.0})


def test_sampling_checks_its_values_once():
    with pytest.raises(ValueError, match="top_p must be in"):
        gemma_rs.Sampling(top_p=0.0)
    with pytest.raises(TypeError, match="top_k must be an int, got float"):
        gemma_rs.Sampling(top_k=1.5)
    with pytest.raises(TypeError, match="temperature must be a number, got bool"):
        gemma_rs.Sampling(temperature=True)
    with pytest.raises(TypeError):
        gemma_rs.Sampling(0.5)  # keyword-only


def test_completion_is_a_typed_frozen_result(real_model_bf16_dir):
    model = gemma_rs.load(real_model_bf16_dir, max_inference_len=32)
    c = model.complete("The capital of France is", 4)
    assert isinstance(c, gemma_rs.Completion)
    assert c.finish_reason == "length" and len(c.token_ids) == 4
    with pytest.raises(AttributeError):
        c.text = "x"  # frozen
    assert "Completion(" in repr(c)
    sampling = gemma_rs.Sampling(temperature=0.8, seed=3)
    s = model.stream("The capital of France is", 4, sampling=sampling)
    assert isinstance(s, gemma_rs.Stream)
    with pytest.raises(RuntimeError, match="not finished"):
        _ = s.completion
    assert "".join(s) == s.completion.text
    done = model.complete("The capital of France is", 4, sampling=sampling)
    assert s.completion.token_ids == done.token_ids


def test_inspect_is_public_and_typed(fixtures_dir):
    info = gemma_rs.inspect(fixtures_dir / "tiny" / "tiny-gqa")
    assert dataclasses.is_dataclass(info) and info.format == "safetensors"
    assert info.config["num_hidden_layers"] == 7
    # The schema's tensors: 2 outside the blocks, 13 per block.
    assert len(info.tensors) == 2 + 13 * 7
    assert {t.type for t in info.tensors} == {"F32"}
    up = next(t for t in info.tensors if t.name == "model.layers.3.mlp.up_proj.weight")
    assert up.shape == (160, 64) and up.bytes == 160 * 64 * 4
    assert info.vocab_size is None  # no tokenizer.json beside it


def test_generation_methods_share_one_signature():
    names = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "sampling"]
    for method in (gemma_rs.Model.complete, gemma_rs.Model.generate, gemma_rs.Model.stream):
        params = pyinspect.signature(method).parameters
        assert list(params)[:3] == ["self", "prompt", "max_new_tokens"]
        assert all(params[n].kind is pyinspect.Parameter.KEYWORD_ONLY for n in names)
    chat = pyinspect.signature(gemma_rs.Model.chat).parameters
    assert all(n in chat for n in [*names, "max_new_tokens"])


def test_test_kernels_are_in_a_private_submodule():
    assert not hasattr(_gemma_rs, "_q8_0_matmul") and not hasattr(_gemma_rs, "quantize_q8_0")
    assert callable(_gemma_rs._testing.q8_0_matmul)
