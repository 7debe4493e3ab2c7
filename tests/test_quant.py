"""Q8_0 packing against the oracle: the `gguf` package's `quantize(..., Q8_0)`, which reproduces
ggml's reference `quantize_row_q8_0` bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from safetensors.numpy import load_file

from gemma_rs import _gemma_rs


def oracle(x: np.ndarray) -> bytes:
    return quants.quantize(x.reshape(-1, 32), GGMLQuantizationType.Q8_0).tobytes()


def ours(x: np.ndarray) -> bytes:
    return _gemma_rs._testing.quantize_q8_0(np.ascontiguousarray(x, dtype="<f4").tobytes())


def test_random_and_edge_blocks_give_the_oracle_bytes():
    rng = np.random.default_rng(0)
    blocks = [
        rng.standard_normal(32 * 1000),
        rng.standard_normal(32 * 100) * 1e-4,  # scales in f16's subnormal range
        rng.standard_normal(32 * 100) * 1e-6,  # scales that underflow f16 to zero or 1 ulp
        rng.standard_normal(32 * 100) * 1e4,
        np.zeros(32 * 3),
        np.tile(np.arange(-16, 16) * 0.5, 4),  # exact half steps: roundf goes away from zero
        rng.integers(-127, 128, 32 * 50) * (1 / 127),
        np.full(32, -3.0),
    ]
    for x in blocks:
        x = x.astype(np.float32)
        assert ours(x) == oracle(x)


def to_bf16_values(x: np.ndarray) -> np.ndarray:
    """f32 rounded to the nearest bf16 (ties to even), as the bf16 checkpoint holds them."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).view(np.float32)


def test_real_weights_give_the_oracle_bytes(real_model_f32_dir):
    t = load_file(str(real_model_f32_dir / "model.safetensors"))
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.17.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ]
    for name in names:
        x = t[name][:20000].astype(np.float32)
        assert ours(x) == oracle(x), name
        xb = to_bf16_values(x)
        assert ours(xb) == oracle(xb), f"{name} as bf16"


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="32-float blocks"):
        _gemma_rs._testing.quantize_q8_0(b"\0" * 4 * 31)
