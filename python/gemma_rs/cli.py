"""The ``gemma-rs`` command (also ``python -m gemma_rs``).

gemma-rs pack SRC DST [--weights q8_0|bf16|f32] [--threads N] [--quiet]
"""

from __future__ import annotations

import argparse
import sys

import gemma_rs


def _pack(a: argparse.Namespace) -> int:
    progress = False if a.quiet else None  # None: a progress line when stderr is a terminal
    dst = gemma_rs.pack(a.src, a.dst, a.weights, threads=a.threads, progress=progress)
    if not a.quiet:
        print(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gemma-rs", description="Gemma 3 270M-class models on small CPUs."
    )
    p.add_argument("--version", action="version", version=f"gemma-rs {gemma_rs.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pk = sub.add_parser(
        "pack",
        help="write a model as a GGUF file (Q8_0 by default) that loads in place and in llama.cpp",
        description="Write SRC (a Hugging Face directory or a GGUF file) to DST as a GGUF file.",
    )
    pk.add_argument("src", help="a Hugging Face model directory or a .gguf file")
    pk.add_argument("dst", help="the GGUF file to write")
    pk.add_argument("--weights", choices=["q8_0", "bf16", "f32"], default="q8_0")
    pk.add_argument("--threads", type=int, default=None)
    pk.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    pk.set_defaults(run=_pack)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.run(a)
    except (gemma_rs.GemmaError, OSError, ValueError) as e:
        print(f"gemma-rs {a.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ngemma-rs {a.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
