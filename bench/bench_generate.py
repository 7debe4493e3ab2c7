"""Prefill and decode speed and peak memory of gemma_rs on one model.

    python bench/bench_generate.py MODEL_DIR [--weights q8_0] [--threads 2]
        [--prompt-tokens 64 512] [--new-tokens 128] [--repeat 3]

Prefill tokens/s = prompt tokens / Completion.prefill_seconds (up to the first new token's
logits); decode tokens/s = (new tokens - 1) / Completion.decode_seconds. Each run uses a fresh
prompt (no prefix reuse). Peak RSS is the whole process's high-water mark (ru_maxrss).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import gemma_rs

TEXT = (
    "Licensed under the Apache License, Version 2.0 (the License); you may not use this file "
    "except in compliance with the License. You may obtain a copy of the License at "
)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(model: gemma_rs.Model, n: int, salt: int) -> list[int]:
    ids = model.tokenize(f"{salt} " + TEXT * (1 + n // 20))
    return ids[:n]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--weights", default="q8_0")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[64, 512])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-inference-len", type=int, default=None)
    a = p.parse_args()

    t0 = time.perf_counter()
    cap = a.max_inference_len or max(a.prompt_tokens) + a.new_tokens
    model = gemma_rs.load(a.model, cap, weights=a.weights, threads=a.threads)
    load_s = time.perf_counter() - t0
    mem = {k: round(v / 2**20, 1) for k, v in model.memory.items()}
    print(f"model {a.model}  weights={a.weights}  threads={model.threads}  load {load_s:.2f}s")
    print(f"memory MiB {mem}  peak RSS after load {rss_mb():.0f} MiB")
    print(f"{'prompt':>7} {'new':>5} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for n in a.prompt_tokens:
        pre, dec = [], []
        for r in range(a.repeat):
            c = model.complete(prompt_ids(model, n, r), a.new_tokens, stop=None)
            # Greedy text may hit <eos>; only count what was generated.
            pre.append(c.prompt_tokens / c.prefill_seconds)
            if len(c.token_ids) > 1:
                dec.append((len(c.token_ids) - 1) / c.decode_seconds)
        decode = f"{statistics.median(dec):13.1f}" if dec else f"{'-':>13}"
        print(f"{n:>7} {a.new_tokens:>5} {statistics.median(pre):14.1f} {decode}")
    print(f"peak RSS {rss_mb():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
