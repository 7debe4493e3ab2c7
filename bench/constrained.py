"""The cost of constrained decoding: decode speed with a constraint against the same generation
without one, the mask's time per token, and the one-time cost of the token trie.

    python bench/constrained.py [MODEL] [--threads 2] [--repeat 5]

Workloads, each run greedily with and without its constraint in alternating rounds (after one
untimed warm-up round), the unconstrained run told to make as many tokens as the constrained one
made (``max_new_tokens``):

- ``tools25``: a chat turn declaring the 25 tools of tests/data/tools25.json with
  ``tool_choice="required"`` (the Lark grammar of ``gemma_rs.tools.tool_grammar``);
- ``json``: a JSON answer for a schema of nested objects, arrays, enums and numbers
  (``json_schema``).

Decode speed is tokens after the first over ``Completion.decode_seconds``; the mask's time is
``Completion.constraint_seconds`` per generated token (computing the mask and advancing the
parser, included in the decode time). The trie (llguidance's view of the 262,144-token
vocabulary) is built once per model, on its first constrained call: its time and the resident
memory it adds are reported apart. MODEL defaults to bench/compare_llama_cpp.py's: the Q8_0 GGUF
packed once from the PyPI Q4_K_M.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import gemma_rs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_llama_cpp import cpu_model, q8_0_gguf_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "landmarks": {
            "type": "array",
            "maxItems": 8,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 60},
                    "kind": {"enum": ["museum", "park", "church", "tower", "bridge", "other"]},
                    "free": {"type": "boolean"},
                },
                "required": ["name", "kind", "free"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["city", "country", "population", "landmarks"],
    "additionalProperties": False,
}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def rate(c: gemma_rs.Completion) -> float:
    return (len(c.token_ids) - 1) / c.decode_seconds if c.decode_seconds > 0 else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    path = a.model or q8_0_gguf_path()
    warnings.simplefilter("ignore")  # base Gemma 3 lacks FunctionGemma's control tokens
    model = gemma_rs.load(path, 4096, threads=a.threads)

    before = rss_bytes()
    t0 = time.perf_counter()
    model.complete([2], 1, grammar='start: "a"')
    trie_seconds = time.perf_counter() - t0
    trie_bytes = rss_bytes() - before

    tools = json.loads((ROOT / "tests" / "data" / "tools25.json").read_text())
    chat = [{"role": "user", "content": "Turn off the lights in the kitchen, please."}]
    tool_ids = model.chat_prompt(chat, tools)
    json_ids = model.tokenize("A JSON description of Paris and its landmarks:\n")

    def constrained(name: str) -> gemma_rs.Completion:
        if name == "tools25":
            return model.chat(chat, tools, tool_choice="required", max_new_tokens=1024).completion
        return model.complete(json_ids, 1024, json_schema=SCHEMA)

    results: dict[str, dict[str, list[float]]] = {}
    for name, ids in (("tools25", tool_ids), ("json", json_ids)):
        r = results[name] = {"with": [], "without": [], "mask_us": [], "tokens": []}
        for round_ in range(a.repeat + 1):
            c = constrained(name)
            n = len(c.token_ids)
            u = model.complete(ids, n)
            if round_ == 0:
                continue
            r["with"].append(rate(c))
            r["without"].append(rate(u))
            r["mask_us"].append(c.constraint_seconds / n * 1e6)
            r["tokens"].append(n)

    print(f"command: {Path(sys.executable).name} {' '.join(sys.argv)}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {a.threads} threads; {path}")
    print(
        f"token trie of {model.vocab_size} tokens, built on the first constrained call: "
        f"{trie_seconds:.2f} s, +{trie_bytes / 2**20:.0f} MiB resident"
    )
    print(
        f"{'workload':<9} {'tokens':>6} {'with':>9} {'without':>9} {'ratio':>6} {'mask/token':>11}"
    )
    for name, r in results.items():
        w, wo = statistics.median(r["with"]), statistics.median(r["without"])
        ratios = [x / y for x, y in zip(r["with"], r["without"])]
        print(
            f"{name:<9} {int(statistics.median(r['tokens'])):>6} {w:>5.1f} t/s {wo:>5.1f} t/s "
            f"{statistics.median(ratios):>5.2f}x {statistics.median(r['mask_us']):>8.0f} us"
        )
    print(f"(medians of {a.repeat} alternating rounds; ratio = with / without, per round)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
