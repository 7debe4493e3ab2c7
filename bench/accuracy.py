"""How close gemma_rs is to transformers on the real model: prints, for every golden case of a
reference file (fixtures/gemma-3-270m/reference-{f32,bf16}.json), whether the greedy ids match,
the largest error on the reference's top-10 logits, and the perplexity case's mean NLL.

    python bench/accuracy.py ~/.cache/gemma_rs/gemma-3-270m-f32 \\
        tests/fixtures/gemma-3-270m/reference-f32.json --weights f32 [--kv-dtype f16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import gemma_rs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("reference", type=Path)
    p.add_argument("--weights", default="bf16")
    p.add_argument("--kv-dtype", default="f32", choices=["f32", "f16"])
    a = p.parse_args()
    ref = json.loads(a.reference.read_text())
    model = gemma_rs.load(a.model, weights=a.weights, kv_dtype=a.kv_dtype)
    print(f"{'case':<12} {'prompt':>6} {'greedy ids':>10} {'top-10 max |err|':>17}")
    for case in ref["generate"]:
        want = case["greedy_ids"]
        got = model.complete(case["prompt_ids"], max_new_tokens=len(want)).token_ids
        start = len(case["prompt_ids"]) - 1
        logits = model.logits(case["prompt_ids"] + want[:-1])[start:]
        err = max(
            float(np.abs(logits[i][s["top_ids"]] - s["top_logits"]).max())
            for i, s in enumerate(case["steps"])
        )
        same = "equal" if got == want else "DIFFER"
        print(f"{case['name']:<12} {len(case['prompt_ids']):>6} {same:>10} {err:>17.2e}")
    for case in ref["perplexity"]:
        nll = -float(model.logprobs(case["ids"]).astype(np.float64).mean())
        print(f"{case['name']}: mean NLL {nll:.6f}, reference {case['mean_nll']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
