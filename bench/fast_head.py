"""The exact fast lm_head against the full one: greedy decode speed, how often the shadow could
not decide (the full head ran), rows rescored and weight bytes read per token.

    python bench/fast_head.py [--model FILE] [--threads 2] [--tokens 128] [--repeat 3]

Both loads of the same file alternate, greedy, the same prompt. Bytes per token: every matrix
once, with the head replaced by the shadow, its bounds and the rescored rows' groups (16 rows
of 34 bytes per 32 values each) when the fast head decided.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import gemma_rs

sys.path.insert(0, str(Path(__file__).parent))
from compare_llama_cpp import cpu_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(os.path.expanduser("~/.cache/gemma_rs/gemma-3-270m-q8_0.gguf"))
    p.add_argument("--model", type=Path, default=default)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; model {a.model}")
    models = {
        fast: gemma_rs.load(a.model, 512, threads=a.threads, fast_lm_head=fast)
        for fast in (False, True)
    }
    info = gemma_rs.inspect(a.model)
    head = next(
        t for t in info.tensors if t.name in ("token_embd.weight", "model.embed_tokens.weight")
    )
    vocab, hidden = head.shape
    full_head = vocab * hidden // 32 * 34
    shadow = models[True].memory["weights"] - models[False].memory["weights"]
    ids = models[False].tokenize("Once upon a time, in a small village by the sea, there lived")
    speed: dict[bool, list[float]] = {False: [], True: []}
    stats = None
    for _ in range(a.repeat + 1):
        for fast, m in models.items():
            c = m.complete(ids, a.tokens, stop=None)
            speed[fast].append((len(c.token_ids) - 1) / c.decode_seconds)
            if fast:
                stats = c
    for fast in speed:
        speed[fast] = speed[fast][1:]  # the first round warms up
    assert stats is not None
    decided = stats.fast_head_tokens
    rows = stats.fast_head_candidates / max(decided, 1)
    layers = models[False].memory["weights"] - full_head
    fast_bytes = layers + shadow + rows * 16 * hidden // 32 * 34
    print(f"threads={a.threads}, {a.tokens} greedy tokens, medians of {a.repeat} rounds")
    for fast, label in ((False, "full head"), (True, "fast head")):
        per_token = fast_bytes if fast else models[False].memory["weights"]
        print(
            f"  {label}: decode {statistics.median(speed[fast]):6.1f} tok/s, "
            f"weight bytes read per token {per_token / 1e6:6.1f} MB"
        )
    total = decided + stats.fast_head_fallbacks
    print(
        f"  fast head: {decided} of {total} tokens decided by the shadow "
        f"(fallback rate {stats.fast_head_fallbacks / max(total, 1):.1%}), "
        f"{rows:.0f} rows rescored per token, shadow held {shadow / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
