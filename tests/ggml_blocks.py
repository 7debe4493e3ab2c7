"""GGUF block layouts for the tests (ggml-common.h), without the gguf package, which the
aarch64 stage's Python lacks: values and bytes per block, where the f16 scales sit, and random
blocks with sane scales."""

from __future__ import annotations

import numpy as np

# (values, bytes) per block.
BLOCKS = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}

# Byte offsets of the f16 scale fields in each block: d, and m or dmin if any.
SCALE_OFFSETS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}

# The types the low-bit kernels multiply in their bits (everything quantized but Q8_0).
LOW_BIT = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def random_blocks(rng: np.random.Generator, name: str, rows: int, cols: int) -> np.ndarray:
    """`rows` rows of `cols` values of type `name`: random bytes, the scales replaced by f16
    values of either sign up to 0.05, one block in 11 with zero scales. uint8 `(rows, bytes)`."""
    values, size = BLOCKS[name]
    n = rows * cols // values
    b = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for at in SCALE_OFFSETS[name]:
        s = rng.uniform(-0.05, 0.05, n).astype(np.float16)
        s[::11] = 0
        b[:, at : at + 2] = s.view(np.uint8).reshape(n, 2)
    return b.reshape(rows, -1)
