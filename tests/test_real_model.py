"""The real Gemma 3 270M against transformers' golden outputs (fixtures/gemma-3-270m)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gemma_rs
import real_model

KINDS = ["f32", "bf16"]


@pytest.fixture(scope="module", params=KINDS)
def real(request, fixtures_dir: Path):
    """(model, reference) for one weight file, loaded with the matching `weights=`."""
    kind = request.param
    d = request.getfixturevalue(f"real_model_{kind}_dir")
    ref = json.loads((fixtures_dir / "gemma-3-270m" / f"reference-{kind}.json").read_text())
    return gemma_rs.load(d, weights=kind), ref


def _case_names():
    return ["capital", "recipe", "code", "chat", "long_apache"]


@pytest.mark.parametrize("name", _case_names())
def test_greedy_generation_and_top10_logits(real, name):
    model, ref = real
    case = next(g for g in ref["generate"] if g["name"] == name)
    prompt_ids = model.tokenize(case["prompt"])
    assert prompt_ids == case["prompt_ids"]

    want = case["greedy_ids"]
    got = model.complete(case["prompt"], max_new_tokens=len(want)).token_ids
    steps = case["steps"]
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            gap = steps[i]["top_logits"][0] - steps[i]["top_logits"][1]
            assert gap < 1e-2, f"{name}: step {i} chose {g}, reference {w} (top-2 gap {gap:.4f})"
            break
    else:
        assert len(got) == len(want), f"{name}: stopped after {len(got)} of {len(want)} tokens"

    # Teacher-forced on the reference continuation: every step's top-10 logits within 5e-3.
    seq = case["prompt_ids"] + want[:-1]
    start = len(case["prompt_ids"]) - 1
    logits = model.logits(seq)[start:]
    for i, step in enumerate(steps):
        ours = logits[i][step["top_ids"]]
        np.testing.assert_allclose(
            ours, step["top_logits"], atol=5e-3, rtol=0, err_msg=f"{name} step {i}"
        )
        lse = np.log(np.exp(logits[i].astype(np.float64) - logits[i].max()).sum()) + logits[i].max()
        assert abs(lse - step["logsumexp"]) < 5e-3


def test_perplexity(real, fixtures_dir):
    model, ref = real
    case = ref["perplexity"][0]
    text = (fixtures_dir / case["file"]).read_text()
    assert model.tokenize(text)[: case["n_tokens"]] == case["ids"]
    nll = -model.logprobs(case["ids"]).astype(np.float64).mean()
    assert abs(nll - case["mean_nll"]) < 2e-3, (nll, case["mean_nll"])


def test_default_cap_and_small_cap(real_model_bf16_dir):
    assert gemma_rs.load(real_model_bf16_dir).max_inference_len == 4096
    model = gemma_rs.load(real_model_bf16_dir, max_inference_len=64)
    assert model.max_inference_len == 64
    ids = model.tokenize("word " * 200)
    with pytest.raises(ValueError, match=r"100 tokens.*\(64\)"):
        model.generate(ids[:100])
    c = model.complete(ids[:60], max_new_tokens=50)
    assert (len(c.token_ids), c.finish_reason, c.prompt_tokens) == (4, "length", 60)


def test_stream_equals_complete_and_stops(real_model_bf16_dir):
    model = gemma_rs.load(real_model_bf16_dir, max_inference_len=256)
    prompt = "The capital of France is"
    full = model.complete(prompt, max_new_tokens=24)
    stream = model.stream(prompt, max_new_tokens=24)
    first = next(stream)
    with pytest.raises(RuntimeError, match="not finished"):
        _ = stream.completion
    pieces = [first, *stream]
    assert "".join(pieces) == full.text == stream.completion.text
    assert stream.completion.token_ids == full.token_ids
    assert full.text == model.detokenize(full.token_ids)

    # A stop string inside the greedy text: the text ends right before it, in both paths.
    stop = full.text[10:14]
    cut = full.text[: full.text.index(stop)]
    c = model.complete(prompt, max_new_tokens=24, stop=[stop, "zzzz"])
    assert (c.text, c.finish_reason) == (cut, "stop")
    assert "".join(model.stream(prompt, max_new_tokens=24, stop=stop)) == cut
    assert model.generate(prompt, max_new_tokens=24, stop="zzzz") == full.text


def test_timings_and_prefix_reuse(real_model_bf16_dir):
    model = gemma_rs.load(real_model_bf16_dir, max_inference_len=256)
    a = model.complete("The capital of France is", max_new_tokens=8)
    assert a.prefill_seconds > 0 and a.decode_seconds > 0 and a.reused_tokens == 0
    b = model.complete("The capital of France is", max_new_tokens=8)
    assert b.reused_tokens == a.prompt_tokens - 1
    assert b.token_ids == a.token_ids


def test_stream_never_splits_a_character(real_model_bf16_dir):
    model = gemma_rs.load(real_model_bf16_dir, max_inference_len=256)
    prompt = "日本の首都は東京です。東京には"
    full = model.complete(prompt, max_new_tokens=32)
    pieces = list(model.stream(prompt, max_new_tokens=32))
    assert "".join(pieces) == full.text
    assert any(ord(ch) > 0x3000 for ch in full.text)  # the continuation is Japanese
    assert "\ufffd" not in full.text


def test_the_gil_is_released_while_computing(real_model_bf16_dir):
    model = gemma_rs.load(real_model_bf16_dir, max_inference_len=512)
    ids = model.tokenize("hello world " * 150)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (model.logprobs(ids), done.set()))
    ticks = 0
    worker.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    assert ticks > 50  # the main thread kept running during a call of about half a second


def test_q8_0_default_weights_stay_close_to_the_reference(real_model_bf16_dir, fixtures_dir):
    """The default weights (Q8_0 packed at load) on the bf16 checkpoint: perplexity within 2% of
    transformers' bf16 reference, the same top-1 token wherever the reference is not a near tie,
    and the weights in at most 300 MB."""
    ref = json.loads((fixtures_dir / "gemma-3-270m" / "reference-bf16.json").read_text())
    model = gemma_rs.load(real_model_bf16_dir, max_inference_len=1024)
    assert model.memory["weights"] <= 300e6, model.memory

    case = ref["perplexity"][0]
    nll = -model.logprobs(case["ids"]).astype(np.float64).mean()
    assert abs(np.exp(nll - case["mean_nll"]) - 1) <= 0.02, (nll, case["mean_nll"])

    clear = 0
    for g in ref["generate"]:
        seq = g["prompt_ids"] + g["greedy_ids"][:-1]
        logits = model.logits(seq)[len(g["prompt_ids"]) - 1 :]
        for i, step in enumerate(g["steps"]):
            top = step["top_logits"]
            np.testing.assert_allclose(logits[i][step["top_ids"]], top, atol=2.5, rtol=0)
            if top[0] - top[1] > 0.25:
                clear += 1
                assert int(np.argmax(logits[i])) == step["top_ids"][0], (g["name"], i)
    assert clear > 100


def test_peak_memory_of_a_whole_process_with_q8_0(real_model_bf16_dir):
    """Load the bf16 checkpoint (536 MB on disk) packing Q8_0, generate 32 tokens: the process's
    peak RSS, interpreter included, stays at most 400 MB (llama.cpp's with the Q8_0 GGUF: 371)."""
    tokens, peak = real_model.peak_rss_of_load_and_generate(real_model_bf16_dir)
    assert tokens > 0
    assert peak / 2**20 <= 400, f"peak RSS {peak / 2**20:.0f} MiB"
