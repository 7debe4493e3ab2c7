"""What the abi3 wheel costs against a wheel for one CPython version: both built here, then
timed alternately in fresh processes on the packed Q8_0 Gemma 3 270M (bench/compare_llama_cpp.py
makes it).

    python bench/abi3_cost.py [--rounds 4]

Per process: the median of 20 000 ``tokenize`` calls (the Python boundary alone), and of 5
streams of 64 greedy tokens (one boundary crossing per token).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path("~/.cache/gemma_rs/gemma-3-270m-q8_0.gguf").expanduser()

CHILD = r"""
import statistics, sys, time
import gemma_rs
m = gemma_rs.load(sys.argv[1], 256, threads=2)
prompt = "The history of the city of Paris begins"
calls, stream = [], []
for _ in range(5):
    t = time.perf_counter()
    for _ in range(20000):
        m.tokenize("hello world")
    calls.append((time.perf_counter() - t) / 20000 * 1e6)
    t = time.perf_counter()
    n = sum(1 for _ in m.stream(prompt, max_new_tokens=64, temperature=0))
    stream.append(n / (time.perf_counter() - t))
print(statistics.median(calls), statistics.median(stream))
"""


def build(tmp: Path, abi3: bool) -> Path:
    """The release wheel installed into its own directory (abi3 off by editing a copy of the
    crate's manifest)."""
    src = tmp / ("src-abi3" if abi3 else "src-cp")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("target", ".venv", "dist", ".git"))
    if not abi3:
        manifest = src / "Cargo.toml"
        text = manifest.read_text()
        text, n = re.subn(r', "abi3-py\d+"', "", text)
        assert n == 1, "no abi3 feature found in Cargo.toml"
        manifest.write_text(text)
    out = tmp / ("dist-abi3" if abi3 else "dist-cp")
    cmd = [sys.executable, "-m", "maturin", "build", "--release", "--strip", "-i", sys.executable]
    cmd += ["--out", str(out)]
    subprocess.run(cmd, cwd=src, check=True)
    site = tmp / ("site-abi3" if abi3 else "site-cp")
    wheel = next(out.glob("*.whl"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
    subprocess.run([*pip, str(wheel)], check=True)
    print(f"built {wheel.name}", file=sys.stderr)
    return site


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    if not MODEL.exists():
        sys.exit(f"{MODEL} is missing: python bench/compare_llama_cpp.py makes it")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        cp = f"cp{sys.version_info[0]}{sys.version_info[1]}"
        sites = {"abi3": build(tmp, True), cp: build(tmp, False)}
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in sites}
        for _ in range(args.rounds):
            for name, site in sites.items():
                env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
                cmd = [sys.executable, "-c", CHILD, str(MODEL)]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                calls, stream = out.stdout.split()
                results[name].append((float(calls), float(stream)))
    print(f"| wheel | tokenize call, µs | stream, tokens/s ({args.rounds} processes) |")
    print("|---|---|---|")
    for name, rs in results.items():
        calls = statistics.median(r[0] for r in rs)
        stream = ", ".join(f"{r[1]:.1f}" for r in rs)
        print(f"| {name} | {calls:.2f} | {stream} |")


if __name__ == "__main__":
    main()
