"""Bad paths, bad files and bad arguments raise the documented exceptions, never crash."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gemma_rs


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        gemma_rs.load(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(gemma_rs.GemmaError, match="config.json"):
        gemma_rs.load(tmp_path)


def test_config_that_is_not_json(tiny_copy):
    (tiny_copy / "config.json").write_text("{not json")
    with pytest.raises(gemma_rs.GemmaError, match="config.json.*JSON"):
        gemma_rs.load(tiny_copy)


def test_config_with_absurd_values(tiny_copy):
    c = json.loads((tiny_copy / "config.json").read_text())
    c["num_attention_heads"] = 0
    (tiny_copy / "config.json").write_text(json.dumps(c))
    with pytest.raises(gemma_rs.GemmaError, match="num_attention_heads"):
        gemma_rs.load(tiny_copy)


def test_missing_weights_file(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(gemma_rs.GemmaError, match="model.safetensors"):
        gemma_rs.load(tiny_copy)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_safetensors(tiny_copy, keep):
    f = tiny_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(gemma_rs.GemmaError, match="model.safetensors"):
        gemma_rs.load(tiny_copy)


def test_header_length_past_the_end(tiny_copy):
    f = tiny_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 60)
    f.write_bytes(bytes(data))
    with pytest.raises(gemma_rs.GemmaError, match="header length"):
        gemma_rs.load(tiny_copy)


def test_tensor_of_the_wrong_shape(tiny_copy):
    f = tiny_copy / "model.safetensors"
    tensors = load_file(str(f))
    name = "model.layers.3.mlp.up_proj.weight"
    tensors[name] = np.zeros((tensors[name].shape[0] + 1, tensors[name].shape[1]), np.float32)
    save_file(tensors, str(f))
    with pytest.raises(gemma_rs.GemmaError, match=r"up_proj.*\[161, 64\].*\[160, 64\]"):
        gemma_rs.load(tiny_copy)


def test_missing_tensor(tiny_copy):
    f = tiny_copy / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.6.self_attn.k_norm.weight"]
    save_file(tensors, str(f))
    with pytest.raises(gemma_rs.GemmaError, match="layers.6.self_attn.k_norm.weight"):
        gemma_rs.load(tiny_copy)


def test_a_file_is_not_a_model_directory(tiny_copy):
    with pytest.raises(gemma_rs.GemmaError, match="directory"):
        gemma_rs.load(tiny_copy / "config.json")


def test_bad_load_arguments(tiny_copy):
    with pytest.raises(ValueError, match="weights"):
        gemma_rs.load(tiny_copy, weights="int3")
    for threads in (0, -2, 10**9, 2**62):
        with pytest.raises(ValueError, match="threads"):
            gemma_rs.load(tiny_copy, threads=threads)
    with pytest.raises(TypeError, match="max_inference_len"):
        gemma_rs.load(tiny_copy, max_inference_len=1.5)


def test_bad_generation_arguments(tiny_copy):
    model = gemma_rs.load(tiny_copy)
    cases = [
        (ValueError, dict(max_new_tokens=-1), "max_new_tokens must be >= 0, got -1"),
        (ValueError, dict(temperature=-0.5), "temperature must be >= 0"),
        (ValueError, dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (ValueError, dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (ValueError, dict(top_k=-3), "top_k must be >= 0"),
        (ValueError, dict(min_p=2.0), "min_p"),
        (ValueError, dict(repetition_penalty=0.0), "repetition_penalty"),
        (ValueError, dict(seed=-1), "seed"),
        (TypeError, dict(stop=5), "stop must be a str or a list of str, got int"),
        (TypeError, dict(stop=[1, 2]), "stop must be a str or a list of str"),
        (ValueError, dict(stop=[""]), "stop strings must not be empty"),
        (TypeError, dict(max_new_tokens=1.5), "max_new_tokens must be an int, got float"),
        (TypeError, dict(max_new_tokens="3"), "max_new_tokens must be an int, got str"),
        (TypeError, dict(max_new_tokens=True), "max_new_tokens must be an int, got bool"),
        (TypeError, dict(max_new_tokens=None), "max_new_tokens must be an int, got NoneType"),
        (ValueError, dict(max_new_tokens=2**63), r"max_new_tokens must be below 2\*\*63"),
        (TypeError, dict(top_k=2.5), "top_k must be an int, got float"),
        (TypeError, dict(temperature="hot"), "temperature must be a number, got str"),
        (ValueError, dict(temperature=float("nan")), "temperature must be >= 0, got NaN"),
        (ValueError, dict(top_p=float("nan")), "top_p"),
        (TypeError, dict(seed=1.5), "seed must be an int, got float"),
        (ValueError, dict(seed=2**64), r"seed must be in \[0, 2\*\*64\)"),
    ]
    for exc, kw, msg in cases:
        with pytest.raises(exc, match=msg):
            model.complete([2, 5, 6], **kw)
    # The largest seed is a seed.
    assert model.complete([2, 5, 6], 3, temperature=1.0, seed=2**64 - 1).token_ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.complete([2, 512])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits([2, -1])
    with pytest.raises(ValueError, match="empty"):
        model.complete([])
    with pytest.raises(TypeError, match="prompt"):
        model.complete(3.5)
    with pytest.raises(TypeError, match="bytes"):
        model.complete(b"\x02\x05")
    with pytest.raises(ValueError, match="empty"):
        model.complete("")
    with pytest.raises(TypeError, match="token ids"):
        model.complete(["a", "b"])
    # numpy integers and arrays are integers and sequences of them.
    want = model.complete([2, 5, 6], max_new_tokens=3).token_ids
    got = model.complete(np.array([2, 5, 6]), max_new_tokens=np.int64(3), temperature=np.float32(0))
    assert got.token_ids == want
    with pytest.raises(TypeError):
        model.logits("text")


@pytest.mark.parametrize(
    "key, value",
    [
        ("tie_word_embeddings", False),
        ("attention_bias", True),
        ("use_bidirectional_attention", True),
    ],
)
def test_configs_this_engine_cannot_run_are_refused(tiny_copy, key, value):
    c = json.loads((tiny_copy / "config.json").read_text())
    c[key] = value
    (tiny_copy / "config.json").write_text(json.dumps(c))
    with pytest.raises(gemma_rs.GemmaError, match=key):
        gemma_rs.load(tiny_copy)
