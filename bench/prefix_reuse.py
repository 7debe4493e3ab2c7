"""Prefix reuse: a long shared prompt (e.g. FunctionGemma's tool declarations) prefilled once.

    python bench/prefix_reuse.py [MODEL] [--prefix 600] [--suffix 10] [--repeat 5] [--threads 2]

Per round (after one untimed warm-up round): `model.reset()`, then a prefix of --prefix tokens
+ a --suffix-token suffix A (the whole prompt is prefilled), then the same prefix + another
suffix B (only B is prefilled: the cache of the prefix is reused). Prints the prefill times of
both calls, their ratio (median of --repeat rounds), and checks that call B's output equals a
fresh model's. MODEL defaults to the
Q8_0 GGUF packed by bench/compare_llama_cpp.py (or the PyPI Q4_K_M GGUF).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

import gemma_rs
from gemma_rs import demo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=None)
    p.add_argument("--prefix", type=int, default=600)
    p.add_argument("--suffix", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    path = a.model
    if path is None:
        packed = demo.cache_dir() / "gemma-3-270m-q8_0.gguf"
        path = packed if packed.exists() else demo.gguf_path()
    model = gemma_rs.load(path, a.prefix + 2 * a.suffix + 64, threads=a.threads)
    fresh = gemma_rs.load(path, a.prefix + 2 * a.suffix + 64, threads=a.threads)
    vocab_ids = list(range(1000, 1000 + a.prefix))  # plain vocabulary, no special tokens
    first, second, ratios = [], [], []
    for r in range(a.repeat + 1):  # round 0 is a warm-up (first reads of the mapped weights)
        prefix = [2, 3000 + r] + vocab_ids[: a.prefix - 2]
        suffix_a = list(range(5000 + 100 * r, 5000 + 100 * r + a.suffix))
        suffix_b = list(range(9000 + 100 * r, 9000 + 100 * r + a.suffix))
        model.reset()
        ca = model.complete(prefix + suffix_a, 1)
        cb = model.complete(prefix + suffix_b, 8, stop=None)
        assert ca.reused_tokens == 0 and cb.reused_tokens == a.prefix, (ca, cb)
        fresh.reset()
        want = fresh.complete(prefix + suffix_b, 8, stop=None)
        assert cb.token_ids == want.token_ids, "prefix reuse changed the output"
        if r == 0:
            continue
        first.append(ca.prefill_seconds)
        second.append(cb.prefill_seconds)
        ratios.append(ca.prefill_seconds / cb.prefill_seconds)
    print(f"command: {Path(sys.executable).name} {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {path}")
    print(
        f"prefill of {a.prefix} + {a.suffix} tokens (nothing cached): "
        f"{statistics.median(first) * 1e3:.1f} ms (median of {a.repeat})"
    )
    print(
        f"prefill of the same {a.prefix} + another {a.suffix} (prefix reused): "
        f"{statistics.median(second) * 1e3:.1f} ms"
    )
    print(
        f"ratio: {statistics.median(ratios):.1f}x (per round: "
        f"{', '.join(f'{x:.1f}' for x in ratios)}); outputs equal to a fresh model's"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
