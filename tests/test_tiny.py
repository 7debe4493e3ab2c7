"""Exactness of the forward pass on the tiny random checkpoints, the KV cache and the cap."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gemma_rs

TINY = ["tiny-gqa", "tiny-mqa-softcap"]


@pytest.fixture(scope="module", params=TINY)
def tiny(request, fixtures_dir: Path):
    d = fixtures_dir / "tiny" / request.param
    ref = load_file(str(d / "reference.safetensors"))
    return (
        d,
        ref["input_ids"].reshape(-1).tolist(),
        ref["logits"].reshape(len(ref["input_ids"].reshape(-1)), -1),
    )


@pytest.mark.parametrize("threads", [1, 2])
def test_logits_match_transformers(tiny, threads):
    d, ids, want = tiny
    model = gemma_rs.load(d, weights="f32", threads=threads)
    got = model.logits(ids)
    assert got.shape == want.shape == (40, 512)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    # Logits reach tens: the tolerance is tight, and the test sees a missing `1 +` or softcap.
    assert np.abs(want).max() > 10


def test_tokens_through_the_kv_cache_one_by_one(tiny):
    """Each call extends the previous sequence by one token: only that token is computed."""
    d, ids, want = tiny
    model = gemma_rs.load(d, weights="f32")
    for k in range(1, len(ids) + 1):
        c = model.complete(ids[:k], max_new_tokens=1)
        assert c.reused_tokens == k - 1
        assert c.token_ids == [int(np.argmax(want[k - 1]))], f"position {k - 1}"


def test_bf16_weights_stay_close(tiny):
    d, ids, want = tiny
    got = gemma_rs.load(d, weights="bf16").logits(ids)
    # Rounding the weights to bf16 moves logits by a few hundredths at most on these models.
    assert np.abs(got - want).max() < 0.25
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_logprobs_are_log_softmax_of_logits(tiny):
    d, ids, _ = tiny
    model = gemma_rs.load(d, weights="f32")
    logits = model.logits(ids).astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = logits[np.arange(len(ids) - 1), ids[1:]] - lse[:-1]
    got = model.logprobs(ids)
    assert got.shape == (len(ids) - 1,)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_cap_and_default(tiny):
    d, ids, _ = tiny
    model = gemma_rs.load(d)
    assert model.max_inference_len == 256  # max_position_embeddings < 4096
    small = gemma_rs.load(d, max_inference_len=16)
    assert small.max_inference_len == 16
    with pytest.raises(ValueError, match=r"17 tokens.*max_inference_len \(16\)"):
        small.complete(ids[:17])
    c = small.complete(ids[:13], max_new_tokens=10)
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    # A prompt that fills the cap leaves no room: an error that says so, not 0 tokens.
    with pytest.raises(ValueError, match=r"16 tokens, which fills max_inference_len \(16\)"):
        small.complete(ids[:16], max_new_tokens=10)
    assert small.complete(ids[:16], max_new_tokens=0).token_ids == []
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gemma_rs.load(d, max_inference_len=257)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_inference_len"):
            gemma_rs.load(d, max_inference_len=bad)


def test_memory_and_config(tiny):
    d, _, _ = tiny
    model = gemma_rs.load(d, weights="f32", max_inference_len=32)
    m = model.memory
    c = json.loads((d / "config.json").read_text())
    assert model.config["hidden_size"] == c["hidden_size"] == 64
    n_params = sum(v.size for v in load_file(str(d / "model.safetensors")).values())
    assert m["weights"] == 4 * n_params
    kv_dim = c["num_key_value_heads"] * c["head_dim"]
    assert m["kv_cache"] == 2 * c["num_hidden_layers"] * 32 * kv_dim * 4
    assert m["tokenizer"] == 0 and m["scratch"] > 0
    bf16 = gemma_rs.load(d, weights="bf16", max_inference_len=32).memory["weights"]
    assert bf16 < 0.6 * m["weights"]


def test_sampling_is_reproducible_with_a_seed(tiny):
    d, ids, _ = tiny
    model = gemma_rs.load(d)
    # A high temperature: the tiny random model is too peaked to vary at 1.0.
    kw = dict(max_new_tokens=20, temperature=5.0, top_k=100, top_p=0.95, min_p=0.01, seed=1234)
    a = model.complete(ids[:5], **kw).token_ids
    assert a == model.complete(ids[:5], **kw).token_ids
    assert len(a) == 20
    assert a != model.complete(ids[:5], **{**kw, "seed": 99}).token_ids


def test_without_tokenizer_text_methods_raise(tiny):
    d, ids, _ = tiny
    model = gemma_rs.load(d)
    assert not model.has_tokenizer
    for call in (
        lambda: model.tokenize("hi"),
        lambda: model.detokenize([1, 2]),
        lambda: model.generate("hi"),
        lambda: model.complete(ids[:3], stop=["x"]),
    ):
        with pytest.raises(gemma_rs.GemmaError, match="tokenizer.json"):
            call()
    with pytest.raises(gemma_rs.GemmaError, match="tokenizer.json"):
        model.generate(ids[:3])
    with pytest.raises(gemma_rs.GemmaError, match="tokenizer.json"):
        model.stream(ids[:3])
    # Token-id methods work.
    c = model.complete(ids[:3], max_new_tokens=2)
    assert len(c.token_ids) == 2 and c.text == ""


def test_a_copy_without_generation_config_uses_config_eos(tiny, tmp_path):
    d, _, _ = tiny
    for f in ("config.json", "model.safetensors"):
        shutil.copy(d / f, tmp_path / f)
    assert gemma_rs.load(tmp_path).eos_token_ids == [1]


def test_sharded_and_f16_checkpoints(fixtures_dir, tmp_path):
    """A sharded checkpoint loads like the single file; F16 tensors are widened exactly."""
    src = fixtures_dir / "tiny" / "tiny-gqa"
    ids = load_file(str(src / "reference.safetensors"))["input_ids"].reshape(-1).tolist()
    tensors = load_file(str(src / "model.safetensors"))
    want = gemma_rs.load(src, weights="f32").logits(ids)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(src / "config.json", sharded / "config.json")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / fname))
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(gemma_rs.load(sharded, weights="f32").logits(ids), want)

    half, widened = tmp_path / "f16", tmp_path / "f16-widened"
    for d, dtype in ((half, np.float16), (widened, np.float32)):
        d.mkdir()
        shutil.copy(src / "config.json", d / "config.json")
        rounded = {n: t.astype(np.float16).astype(dtype) for n, t in tensors.items()}
        save_file(rounded, str(d / "model.safetensors"))
    a = gemma_rs.load(half, weights="f32").logits(ids)
    np.testing.assert_array_equal(a, gemma_rs.load(widened, weights="f32").logits(ids))
    assert np.abs(a - want).max() < 0.1


def test_concurrent_calls_are_serialized_and_equal_to_calls_alone(tiny):
    import threading

    d, ids, _ = tiny
    model = gemma_rs.load(d, weights="f32")
    prompts = [ids[i : i + 12] for i in range(0, 24, 3)]
    alone = [model.complete(p, max_new_tokens=20).token_ids for p in prompts]
    results: dict[int, list[int]] = {}

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = model.complete(prompts[i], max_new_tokens=20).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(len(prompts))] == alone


def test_a_forked_child_can_use_the_model(tiny):
    """multiprocessing's fork copies only the calling thread: the child must not wait for the
    parent's worker threads, neither while computing nor when the model is freed."""
    import os

    d, ids, _ = tiny
    model = gemma_rs.load(d, weights="f32", threads=2)
    want = model.logits(ids)
    pid = os.fork()
    if pid == 0:  # the child: compute, free the model, exit with the verdict
        ok = np.array_equal(model.logits(ids), want)
        del model
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("the forked child hung")
