"""The Q8_0 kernels of this CPU against the scalar one, and which kernel a model runs.

On x86_64 these are AVX2 and AVX-512 VNNI; on aarch64 NEON with and without dotprod, which
``scripts/test-aarch64`` runs under qemu on CPU models with and without the extension and sets
``GEMMA_RS_EXPECT_KERNEL`` so that the kernel detected is asserted, not just reported.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

import gemma_rs
from gemma_rs import _gemma_rs
from ggml_blocks import LOW_BIT, random_blocks

FEATURES = gemma_rs.cpu_features()
# How to start this Python in a child process: under qemu-user (scripts/test-aarch64) an
# aarch64 interpreter cannot exec itself without binfmt_misc, so the script names the command.
PYTHON = shlex.split(os.environ.get("GEMMA_RS_TEST_PYTHON", "")) or [sys.executable]


def test_cpu_features_name_the_kernel_in_use():
    f = FEATURES
    assert f.arch == platform.machine().replace("arm64", "aarch64")
    assert f.kernels[-1] == "scalar" and len(set(f.kernels)) == len(f.kernels)
    assert hash(f) == hash(gemma_rs.cpu_features())
    wanted = os.environ.get("GEMMA_RS_KERNEL")
    assert f.kernel == (wanted if wanted in f.kernels else f.kernels[0])
    if f.arch == "aarch64":
        assert "neon" in f.features
        simd = ["neon-dotprod", "neon"] if "dotprod" in f.features else ["neon"]
        if "i8mm" in f.features:
            simd.insert(0, "neon-i8mm")
        assert f.kernels == (*simd, "scalar")
    if f.arch == "x86_64" and {"avx2", "fma", "f16c"} <= set(f.features):
        assert "avx2" in f.kernels
    expected = os.environ.get("GEMMA_RS_EXPECT_KERNEL")
    if expected:
        assert f.kernel == expected, f"expected the {expected} kernel, this CPU runs {f.kernel}"


def q8_0_rows(rng: np.random.Generator, rows: int, cols: int, mode: str) -> tuple[bytes, Any]:
    """Q8_0 weights `(rows, cols)` and their values, from data of one of several shapes."""
    if mode == "normal":
        w = rng.standard_normal((rows, cols))
    elif mode == "extreme":  # every block saturates: ±127 after scaling
        scales = rng.uniform(0.5, 2.0, (rows, cols // 32, 1)).repeat(32, axis=2)
        w = rng.choice([-1.0, 1.0], (rows, cols)) * scales.reshape(rows, cols)
    elif mode == "tiny":  # f16 scales in the subnormal range (below 6.1e-5)
        w = rng.standard_normal((rows, cols)) * 1e-4
    else:  # mixed magnitudes, some all-zero blocks
        w = rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-3, 3, (rows, 1))
        w[:, :32] = 0
    w = w.astype(np.float32)
    blocks = _gemma_rs._testing.quantize_q8_0(w.tobytes())
    raw = np.frombuffer(blocks, dtype=[("d", "<f2"), ("qs", "i1", 32)]).reshape(rows, cols // 32)
    values = (raw["d"].astype(np.float64)[..., None] * raw["qs"]).reshape(rows, cols)
    return blocks, values


def matmul(kernel: str, w: bytes, rows: int, x: np.ndarray) -> np.ndarray:
    out = _gemma_rs._testing.q8_0_matmul(kernel, w, rows, np.ascontiguousarray(x, "<f4").tobytes())
    return np.frombuffer(out, "<f4").reshape(len(x), rows)


@pytest.mark.parametrize("kernel", FEATURES.kernels)
def test_every_kernel_matches_the_scalar_one(kernel):
    """Each kernel against the scalar one, through the tiled product (4×4 register tiles, rows
    and tokens left over): equal within f32 rounding of Σ|w·x|, and to float64 within the
    activations' 8-bit quantization."""
    rng = np.random.default_rng(7)
    checked = 0
    shapes = [(1, 32, 1), (5, 64, 4), (9, 96, 7), (16, 640, 5), (3, 2048, 9), (8, 4096, 1)]
    for rows, cols, n in shapes:
        for mode in ["normal", "extreme", "tiny", "mixed"]:
            w, values = q8_0_rows(rng, rows, cols, mode)
            x = rng.standard_normal((n, cols)).astype(np.float32)
            got, want = matmul(kernel, w, rows, x), matmul("scalar", w, rows, x)
            exact = x.astype(np.float64) @ values.T
            mag = np.abs(x.astype(np.float64)) @ np.abs(values.T)
            assert np.all(np.abs(got - want) <= 1e-6 * mag + 1e-30), (kernel, rows, cols, n, mode)
            assert np.all(np.abs(got - exact) <= 0.02 * mag + 1e-30), (kernel, rows, cols, n, mode)
            checked += got.size
    assert checked == 4 * (1 + 20 + 63 + 80 + 27 + 8)


@pytest.mark.parametrize("kernel", FEATURES.kernels)
def test_a_token_gives_the_same_bits_alone_and_in_a_batch(kernel):
    """A token's products do not depend on its batch: the 4×4 tile, the four-token and the
    one-token paths of a kernel give the same bits (so prefill and decode agree)."""
    rng = np.random.default_rng(11)
    w, _ = q8_0_rows(rng, 6, 256, "normal")
    x = rng.standard_normal((9, 256)).astype(np.float32)
    batch = matmul(kernel, w, 6, x)
    for t in range(len(x)):
        alone = matmul(kernel, w, 6, x[t : t + 1])
        np.testing.assert_array_equal(alone[0].view(np.uint32), batch[t].view(np.uint32))


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="not available"):
        _gemma_rs._testing.q8_0_matmul("sve2", b"\0" * 34, 1, b"\0" * 128)


def test_q8_0_tiny_checkpoint_stays_close_to_the_reference(fixtures_dir: Path):
    """The whole forward pass with Q8_0 weights on the kernel of this CPU (``cpu_features``)."""
    for name in ["tiny-gqa", "tiny-mqa-softcap"]:
        d = fixtures_dir / "tiny" / name
        ref = load_file(str(d / "reference.safetensors"))
        ids = ref["input_ids"].reshape(-1).tolist()
        want = ref["logits"].reshape(len(ids), -1)
        got = gemma_rs.load(d).logits(ids)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 0.05, (name, FEATURES.kernel, err)
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9, (name, FEATURES.kernel)


LOGITS_CHILD = """
import sys, gemma_rs
from safetensors.numpy import load_file
ref = load_file(sys.argv[1] + "/reference.safetensors")
logits = gemma_rs.load(sys.argv[1]).logits(ref["input_ids"].reshape(-1).tolist())
print(gemma_rs.cpu_features().kernel)
sys.stdout.flush()
open(sys.argv[2], "wb").write(logits.tobytes())
"""


def test_q8_0_logits_of_every_kernel_agree(fixtures_dir: Path, tmp_path: Path):
    """The whole Q8_0 forward pass on each kernel of this CPU (a fresh process each, with
    ``GEMMA_RS_KERNEL``) against the scalar kernel. The kernels' sums differ only in rounding
    order (1.6e-7 of the logits' range on x86_64); a difference could move an activation across
    a rounding step of the next layer's int8 quantization, hence a bound above that, but one far
    below what a wrong block, scale or lane would give."""
    d = fixtures_dir / "tiny" / "tiny-gqa"
    logits = {}
    for kernel in FEATURES.kernels:
        out = tmp_path / f"{kernel}.f32"
        env = {**os.environ, "GEMMA_RS_KERNEL": kernel}
        cmd = [*PYTHON, "-c", LOGITS_CHILD, str(d), str(out)]
        ran = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        assert ran.strip() == kernel
        logits[kernel] = np.fromfile(out, dtype=np.float32)
    scalar = logits["scalar"]
    for kernel, got in logits.items():
        err = np.abs(got - scalar).max() / np.abs(scalar).max()
        assert err < 1e-4, (kernel, err)


def low_bit_matmul(kernel: str, name: str, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    rows = len(w)
    out = _gemma_rs._testing.low_bit_matmul(
        kernel,
        name,
        np.ascontiguousarray(w).tobytes(),
        rows,
        np.ascontiguousarray(x, "<f4").tobytes(),
    )
    return np.frombuffer(out, "<f4").reshape(len(x), rows)


@pytest.mark.parametrize("kernel", FEATURES.low_bit_kernels)
@pytest.mark.parametrize("name", LOW_BIT)
def test_every_low_bit_kernel_gives_the_scalar_bits(kernel, name):
    """Each low-bit kernel against the scalar one on random blocks of each type: the same bits
    (the kernels do the same float operations in the same order), a token alone as in a batch."""
    rng = np.random.default_rng(hash(name) % 1000)
    for rows, cols, n in [(1, 256, 1), (9, 512, 7), (16, 1024, 5), (21, 2048, 2)]:
        w = random_blocks(rng, name, rows, cols)
        x = rng.standard_normal((n, cols)).astype(np.float32)
        got, want = low_bit_matmul(kernel, name, w, x), low_bit_matmul("scalar", name, w, x)
        np.testing.assert_array_equal(
            got.view(np.uint32), want.view(np.uint32), err_msg=f"{kernel} {name}"
        )
        alone = low_bit_matmul(kernel, name, w, x[-1:])
        np.testing.assert_array_equal(alone[0].view(np.uint32), got[-1].view(np.uint32))


def test_the_low_bit_kernel_follows_the_q8_0_one():
    assert (
        FEATURES.low_bit_kernels[-1] == "scalar"
        and FEATURES.low_bit_kernel in FEATURES.low_bit_kernels
    )
    if FEATURES.kernel in FEATURES.low_bit_kernels:
        assert FEATURES.low_bit_kernel == FEATURES.kernel
