"""The KV cache a board can afford: sliding-window rings, prefix reuse, a memory plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import gemma_rs


@pytest.fixture(scope="module")
def ref(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "gemma-3-270m" / "reference-f32.json").read_text())


@pytest.fixture(scope="module")
def long_apache(ref) -> dict:
    case = next(g for g in ref["generate"] if g["name"] == "long_apache")
    assert len(case["prompt_ids"]) == 739  # longer than the 512-token window
    return case


@pytest.fixture(scope="module")
def f32_1024(real_model_f32_dir) -> gemma_rs.Model:
    return gemma_rs.load(real_model_f32_dir, max_inference_len=1024, weights="f32")


def test_long_prompt_across_the_ring_in_one_prefill(f32_1024, long_apache):
    f32_1024.reset()
    got = f32_1024.complete(long_apache["prompt_ids"], len(long_apache["greedy_ids"]))
    assert got.reused_tokens == 0
    assert got.token_ids == long_apache["greedy_ids"]


def test_long_prompt_grown_100_tokens_at_a_time_through_prefix_reuse(f32_1024, long_apache):
    """Each call reuses the previous prompt's cache and prefills 100 more tokens; the sliding
    layers' rings (639 slots) wrap on the way to 739 tokens."""
    ids = long_apache["prompt_ids"]
    f32_1024.reset()
    previous = 0
    for end in range(100, len(ids), 100):
        c = f32_1024.complete(ids[:end], 1)
        assert c.reused_tokens == previous, end
        previous = end
    got = f32_1024.complete(ids, len(long_apache["greedy_ids"]))
    assert got.reused_tokens == 700
    assert got.token_ids == long_apache["greedy_ids"]


def test_prefix_reuse_gives_the_output_of_a_fresh_model(real_model_gguf, long_apache):
    """A 600-token prefix with two different 10-token suffixes: the second call prefills only
    its suffix, and both outputs equal those of a model that computes everything."""
    prefix = long_apache["prompt_ids"][:600]
    suffixes = [list(range(1000, 1010)), list(range(2000, 2010))]
    model = gemma_rs.load(real_model_gguf, max_inference_len=1024)
    fresh = gemma_rs.load(real_model_gguf, max_inference_len=1024)
    for i, suffix in enumerate(suffixes):
        got = model.complete(prefix + suffix, 16)
        fresh.reset()
        want = fresh.complete(prefix + suffix, 16)
        assert got.reused_tokens == (600 if i else 0)
        assert want.reused_tokens == 0
        assert got.token_ids == want.token_ids and got.text == want.text
    model.reset()
    assert model.complete(prefix + suffixes[0], 1).reused_tokens == 0


def test_reuse_is_refused_when_the_ring_lost_what_it_needs(real_model_gguf, long_apache):
    """After 739 tokens the rings hold positions 100..738: continuing at 300 would read 0..299,
    of which 0..99 were overwritten, so everything is recomputed, with the output of a fresh
    model. And after a shorter sequence that reused a wrapped one, the rings still hold the
    longer one's positions in some slots: reuse is refused there too."""
    ids = long_apache["prompt_ids"]
    model = gemma_rs.load(real_model_gguf, max_inference_len=1024)
    model.complete(ids, 1)
    other = ids[:300] + list(range(3000, 3020))
    got = model.complete(other, 8)
    assert got.reused_tokens == 0
    model.reset()
    assert model.complete(other, 8).token_ids == got.token_ids
    # 700 tokens (slots 0..60 hold positions 639..699), then 573 reused (+1 new), then 100:
    # positions 0..99 are not all there any more.
    model.complete(ids[:700], 1)
    assert model.complete(ids[:573] + [5000], 1).reused_tokens == 573
    third = ids[:100] + [6000, 6001]
    got = model.complete(third, 8)
    assert got.reused_tokens == 0
    model.reset()
    assert model.complete(third, 8).token_ids == got.token_ids


def test_cache_size_with_sliding_rings(real_model_gguf):
    """Gemma 3 270M: 15 sliding layers keep rings of 512 + 127 positions, 3 global layers keep
    every position: at 4096 the f32 cache is at most 45 MB (every layer at 4096: 151 MB), and
    it grows by 3 layers x 2 KiB per token beyond."""
    plan = {n: gemma_rs.memory_plan(real_model_gguf, n)["kv_cache"] for n in (512, 4096, 8192)}
    assert plan[4096] <= 45e6
    assert plan[8192] - plan[4096] == 4096 * 3 * 2 * 1024
    naive = 2 * 18 * 4096 * 256 * 4
    assert naive > 150e6 and plan[4096] < naive / 3


@pytest.mark.parametrize("weights", ["q8_0", "bf16", "f32"])
@pytest.mark.parametrize("cap", [8, 100, 256])
def test_memory_plan_equals_the_loaded_model(fixtures_dir, weights, cap):
    for name in ("tiny-gqa", "tiny-mqa-softcap"):
        path = fixtures_dir / "tiny" / name
        plan = gemma_rs.memory_plan(path, cap, weights, threads=2)
        model = gemma_rs.load(path, cap, weights=weights, threads=2)
        assert plan == model.memory, (name, weights, cap)


@pytest.mark.parametrize("cap", [32, 4096, None])
def test_memory_plan_of_the_real_model(real_model_gguf, packed_q8_0, cap):
    for path, weights in ((real_model_gguf, "q8_0"), (packed_q8_0, "q8_0"), (packed_q8_0, "bf16")):
        plan = gemma_rs.memory_plan(path, cap, weights)
        assert plan == gemma_rs.load(path, cap, weights=weights).memory, (path, weights, cap)


def test_memory_limit(packed_q8_0):
    plan = gemma_rs.memory_plan(packed_q8_0, 4096)
    total = sum(plan.values())
    with pytest.raises(MemoryError, match=r"memory_limit.*max_inference_len"):
        gemma_rs.load(packed_q8_0, 4096, memory_limit=total - 1)
    model = gemma_rs.load(packed_q8_0, 4096, memory_limit=total)
    assert model.memory == plan
    with pytest.raises(ValueError, match="memory_limit"):
        gemma_rs.load(packed_q8_0, memory_limit=0)
    with pytest.raises(TypeError, match="memory_limit"):
        gemma_rs.load(packed_q8_0, memory_limit=1.5e9)


def test_an_f16_cache_keeps_the_greedy_references_and_the_perplexity(real_model_f32_dir, ref):
    """kv_dtype="f16" with the f32 weights: every greedy reference case (the 739-token one
    across the rings included) gives transformers' tokens, the top-10 logits stay within 0.03
    of the reference, the perplexity case's mean NLL within 1e-4; the cache takes half the
    bytes, as memory_plan says."""
    import numpy as np

    model = gemma_rs.load(real_model_f32_dir, max_inference_len=1024, weights="f32", kv_dtype="f16")
    assert model.kv_dtype == "f16"
    for case in ref["generate"]:
        want = case["greedy_ids"]
        model.reset()
        assert model.complete(case["prompt_ids"], len(want)).token_ids == want, case["name"]
        start = len(case["prompt_ids"]) - 1
        logits = model.logits(case["prompt_ids"] + want[:-1])[start:]
        for i, step in enumerate(case["steps"]):
            err = np.abs(logits[i][step["top_ids"]] - step["top_logits"]).max()
            assert err < 0.03, (case["name"], i, err)
    (ppl,) = ref["perplexity"]
    nll = -float(model.logprobs(ppl["ids"]).astype(np.float64).mean())
    assert abs(nll - ppl["mean_nll"]) < 1e-4, nll
    f32_plan = gemma_rs.memory_plan(real_model_f32_dir, 1024, "f32")
    f16_plan = gemma_rs.memory_plan(real_model_f32_dir, 1024, "f32", kv_dtype="f16")
    assert model.memory == f16_plan
    assert 2 * f16_plan["kv_cache"] - f32_plan["kv_cache"] == 15 * 639 * 4  # ring tags stay u32
    with pytest.raises(ValueError, match="kv_dtype"):
        gemma_rs.load(real_model_f32_dir, 64, weights="f32", kv_dtype="bf16")  # type: ignore[arg-type]
