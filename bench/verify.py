"""What checking a packed file's digests costs: ``load(path)`` against ``load(path, verify=True)``
and ``gemma_rs.verify(path)`` alone, on the packed Gemma 3 270M Q8_0 file.

    python bench/verify.py [--gguf FILE] [--repeat 7] [--threads N]

The file is packed once from the PyPI Q4_K_M GGUF (tests/real_model.py builds it) unless
``--gguf`` names a file written by ``gemma-rs pack``. Rounds alternate (plain, verified, ...)
after one untimed load, so that both read the file from the page cache: this measures the
hashing, not the disk. Prints the median of each and the difference; the issue's bound is
0.3 s more for a verified load on x86.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from compare_llama_cpp import cpu_model  # bench/ is the script's directory

import gemma_rs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="a file written by gemma-rs pack")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = a.gguf
        if path is None:
            import real_model

            path = Path(tmp) / "gemma-3-270m-q8_0.gguf"
            gemma_rs.pack(real_model.gguf_path(), path, progress=False)
        gemma_rs.load(path, 256, threads=a.threads)  # untimed: the page cache
        plain, verified, alone = [], [], []
        for _ in range(a.repeat):
            t = time.perf_counter()
            m = gemma_rs.load(path, 256, threads=a.threads)
            plain.append(time.perf_counter() - t)
            del m
            t = time.perf_counter()
            m = gemma_rs.load(path, 256, threads=a.threads, verify=True)
            verified.append(time.perf_counter() - t)
            del m
            t = time.perf_counter()
            gemma_rs.verify(path, threads=a.threads)
            alone.append(time.perf_counter() - t)
        size = path.stat().st_size
        threads = a.threads or gemma_rs.load(path, 16).threads
    med = statistics.median
    print(f"CPU: {cpu_model()}, {threads} threads; {path.name}: {size / 1e6:.1f} MB")
    print("| | median s |")
    print("|---|---:|")
    print(f"| load | {med(plain):.3f} |")
    print(f"| load(verify=True) | {med(verified):.3f} |")
    print(f"| difference | {med(verified) - med(plain):+.3f} |")
    print(f"| verify() alone | {med(alone):.3f} ({size / med(alone) / 1e9:.1f} GB/s) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
