"""Prefill and decode speed of gemma_rs against llama.cpp on the same GGUF file (Q8_0 by default).

    python bench/compare_llama_cpp.py [--threads 2] [--repeat 5] [--weights stored]
        [--prefill-tokens 512] [--decode-prompt-tokens 64] [--new-tokens 128] [--memory]
        [--gguf FILE] [--model PATH]

``--gguf ~/.cache/gemma_rs/gemma-3-270m-q4_k_m.gguf`` compares on the PyPI Q4_K_M file itself
(Q5_0, Q4_K, Q6_K and Q8_0 tensors), which both engines run in its stored types. The bytes of
weights each engine reads per decoded token (every matrix once: gemma_rs's ``memory["weights"]``,
llama.cpp's tensor bytes in the file) are printed with the decode speeds.

Both engines run the real Gemma 3 270M in one process, alternating (gemma_rs, llama.cpp,
gemma_rs, ...) for --repeat rounds after --warmup untimed rounds, with the same thread count and
the same token ids (tokenized once by gemma_rs, BOS included; llama.cpp is fed the ids, so it adds
no BOS of its own). Every call starts with a different word after BOS, so neither engine reuses a
cached prefix beyond BOS.

- prefill tokens/s = prompt tokens / time to the first new token's logits (gemma_rs:
  Completion.prefill_seconds of ``complete(ids, 1)``; llama.cpp: ``Llama.eval(ids)`` after
  ``reset()``, plus an argmax of the last logits);
- decode tokens/s = (new tokens - 1) / time of the forward passes after the first new token
  (gemma_rs: Completion.decode_seconds; llama.cpp: a greedy loop of single-token ``eval`` calls
  and an argmax of ``llama_get_logits_ith(ctx, -1)``). llama.cpp always decodes the full count;
  gemma_rs stops at <eos>, so the prompt is ordinary text and the actual counts are printed.

Weights. Both engines load the same file, ``gemma-3-270m-q8_0.gguf``, written once into
``$GEMMA_RS_CACHE`` (default ``~/.cache/gemma_rs``) by ``gemma_rs.pack`` from the PyPI Q4_K_M
GGUF: every 2-D tensor dequantized as ggml does and quantized to Q8_0 with ggml's reference
rounding, norms F32, the metadata copied (but the file type). gemma_rs maps its Q8_0 blocks in
place
(``--model`` loads another source, e.g. a Hugging Face directory, instead).

llama.cpp comes from llama-cpp-python built from the PyPI sdist for this CPU (-march=native)
but without AMX (its AMX kernels crash on Gemma 3 270M Q8_0) into the same venv as gemma_rs:

    bash scripts/build-llama-cpp "$(which python)"

The benchmark prints llama.cpp's system info and refuses a build that lists AMX. Both sides use
their own defaults otherwise: llama-cpp-python disables flash attention unless --llama-flash-attn.

The CPU time that other processes (and VM steal) take during the timed rounds is printed, with
a warning above 0.1 CPU: with as many threads as cores, any competing process slows both engines
and llama.cpp's (OpenMP, spin-waiting) threads far more, so such numbers mean little.

The 25-tool prompt (unless --no-long-prompt): the chat turn of bench/prompt_state.py, the 25
tool declarations of tests/data/tools25.json and one user request rendered by gemma_rs's
``Model.chat_prompt`` (2,945 tokens), prefilled from an empty cache by each engine in every
round (gemma_rs after ``reset()``), timed as the 512-token prompt is.

GMAC/s: the multiply-adds of the prompt's matrix products per second of prefill — per token and
layer q, k, v, o, gate, up and down (from the model's config: 100 M per token for Gemma 3 270M),
plus the lm_head for the last token; attention's q·k and p·v products are left out, so both
engines are credited alike. The nominal int8 peak is cores × multiply-adds per cycle × clock:
per core 128 for AVX-512 VNNI (two 512-bit ``vpdpbusd`` a cycle, as on Intel's server cores
since Ice Lake; AMD Zen 4 issues one 512-bit op as two halves), 64 for AVX-VNNI (two 256-bit),
32 for AVX2 (``vpmaddubsw`` + ``vpmaddwd`` for 32 products) — ``--macs-per-cycle`` overrides it —
and the clock from /proc/cpuinfo's ``cpu MHz`` (a VM reports the nominal clock; turbo runs
faster) or ``--clock-ghz``.

--memory additionally runs each engine in fresh child processes (load with a 64-token context,
generate 32 tokens) and reports the median load time and the child's peak RSS (VmHWM), next to
children that only import the Python packages (gemma_rs; numpy and llama_cpp).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gemma_rs
from gemma_rs import demo

Q8_0_GGUF_NAME = "gemma-3-270m-q8_0.gguf"
TEXT = (
    "Licensed under the Apache License, Version 2.0 (the License); you may not use this file "
    "except in compliance with the License. You may obtain a copy of the License at "
)
SALTS = (
    "Alpha Bravo Charlie Delta Echo Foxtrot Golf Hotel India Juliett Kilo Lima Mike November "
    "Oscar Papa Quebec Romeo Sierra Tango Uniform Victor Whiskey Xray Yankee Zulu"
).split()


def log(message: str) -> None:
    print(f"[compare] {message}", file=sys.stderr, flush=True)


# --- the Q8_0 GGUF ------------------------------------------------------------------------------


def q8_0_gguf_path() -> Path:
    """The Q8_0 GGUF in the cache, packed once from the PyPI Q4_K_M GGUF."""
    dst = demo.cache_dir() / Q8_0_GGUF_NAME
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.with_name(dst.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        if not dst.exists():
            src = demo.gguf_path()
            log(f"packing {dst} from {src.name} (once)")
            gemma_rs.pack(src, dst, "q8_0")
    return dst


# --- the engines --------------------------------------------------------------------------------


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a GGUF file (what llama.cpp's CPU backend reads per token)."""
    return sum(t.bytes for t in gemma_rs.inspect(path).tensors)


class Ours:
    name = "gemma_rs"

    def __init__(
        self, model: Path, ctx: int, weights: str, threads: int, fast: bool = False
    ) -> None:
        t0 = time.perf_counter()
        self.model = gemma_rs.load(model, ctx, weights=weights, threads=threads, fast_lm_head=fast)
        self.load_seconds = time.perf_counter() - t0
        self.argmax_checked = 0
        self.argmax_mismatches = 0

    def check_argmax(self, ids: list[int], toks: list[int]) -> None:
        """Each greedy token against the argmax of the teacher-forced exact logits at its step."""
        logits = self.model.logits(ids + toks[:-1])[len(ids) - 1 :]
        for row, t in zip(logits, toks):
            self.argmax_checked += 1
            self.argmax_mismatches += int(row.argmax()) != t

    def prefill(self, ids: list[int]) -> float:
        c = self.model.complete(ids, 1, stop=None)
        return c.prefill_seconds

    def decode(self, ids: list[int], new: int) -> tuple[list[int], float]:
        c = self.model.complete(ids, new, stop=None)
        return list(c.token_ids), c.decode_seconds


class Llama:
    name = "llama.cpp"

    def __init__(self, gguf_file: Path, ctx: int, threads: int, flash_attn: bool) -> None:
        import llama_cpp

        self.lib = llama_cpp
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(
            str(gguf_file),
            n_ctx=ctx,
            n_batch=512,
            n_ubatch=512,
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=flash_attn,
            logits_all=False,
            verbose=False,
        )
        self.load_seconds = time.perf_counter() - t0
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        import numpy as np  # here, not at the top: a gemma_rs child must not pay for numpy

        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)
        )
        return int(logits.argmax())

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        self._argmax()
        return time.perf_counter() - t0

    def decode(self, ids: list[int], new: int) -> tuple[list[int], float]:
        self.llm.reset()
        self.llm.eval(ids)
        out = [self._argmax()]
        t0 = time.perf_counter()
        for _ in range(new - 1):
            self.llm.eval(out[-1:])
            out.append(self._argmax())
        return out, time.perf_counter() - t0


def prompt_ids(model: gemma_rs.Model, n: int, salt: int) -> list[int]:
    word = SALTS[salt % len(SALTS)] + ("" if salt < len(SALTS) else f" {salt}")
    ids = model.tokenize(f"{word}: " + TEXT * (2 + n // 20))
    if len(ids) < n:
        raise SystemExit(f"prompt of {len(ids)} tokens is shorter than {n}")
    return ids[:n]


def tools_prompt_ids(model_path: Path) -> list[int]:
    """The 25-tool chat turn of bench/prompt_state.py, as gemma_rs renders it."""
    import json
    import warnings

    from prompt_state import CHAT, TOOLS  # bench/, this script's directory

    m = gemma_rs.load(model_path, 64, threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m.chat_prompt(CHAT, json.loads(TOOLS.read_text()))


def prompt_macs(config: dict, n: int) -> int:
    """Multiply-adds of the matrix products of an n-token prompt: every layer's q, k, v, o,
    gate, up and down for each token, and the lm_head for the last one."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    return n * config["num_hidden_layers"] * layer + config["vocab_size"] * h


def nominal_peak(
    kernel: str, threads: int, clock_ghz: float | None, macs_per_cycle: int | None
) -> tuple[float, str]:
    """(GMAC/s, how it was computed) of the threads' cores at their nominal int8 rate."""
    per_cycle = macs_per_cycle or {"avx512vnni": 128, "avxvnni": 64, "avx2": 32}.get(kernel)
    if clock_ghz is None:
        try:
            mhz = [
                float(line.split(":")[1])
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("cpu MHz")
            ]
            clock_ghz = max(mhz) / 1000 if mhz else None
        except OSError:
            clock_ghz = None
    if not per_cycle or not clock_ghz:
        return 0.0, f"unknown for {kernel} (give --macs-per-cycle and --clock-ghz)"
    peak = threads * per_cycle * clock_ghz
    return peak, (
        f"{threads} cores x {per_cycle} MACs/cycle ({kernel}) x {clock_ghz:.2f} GHz "
        f"= {peak:.0f} GMAC/s"
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --- --memory: one engine per child process -----------------------------------------------------


def peak_rss_mib() -> float:
    """This process's VmHWM. Unlike ru_maxrss, it restarts at exec: a child forked from a
    process holding both models would otherwise inherit that process's RSS."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(a: argparse.Namespace) -> int:
    """Loads a 64-token context and generates 32 tokens (*-import: only imports), then prints
    the load seconds and the peak RSS."""
    ids = [2, *range(1000, 1015)]  # 16 ids: BOS and plain vocabulary
    t0 = time.perf_counter()
    if a.child == "gemma_rs":
        m = gemma_rs.load(a.model, 64, weights=a.weights, threads=a.threads)
        load = time.perf_counter() - t0
        m.complete(ids, 32, stop=None)
    elif a.child == "llama.cpp":
        llama = Llama(a.gguf, 64, a.threads, a.llama_flash_attn)
        load = time.perf_counter() - t0
        llama.decode(ids, 32)
    elif a.child == "llama.cpp-import":
        import llama_cpp  # noqa: F401

        load = 0.0
    else:
        load = 0.0
    print(load, peak_rss_mib())
    return 0


def child_load_and_peak(a: argparse.Namespace, which: str) -> tuple[float, float]:
    """(load seconds, peak RSS MiB) of a fresh child process."""
    cmd = [sys.executable, __file__, "--child", which, "--threads", str(a.threads)]
    cmd += ["--weights", a.weights, "--model", str(a.model), "--gguf", str(a.gguf)]
    cmd += ["--llama-flash-attn"] if a.llama_flash_attn else []
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    load, peak = out.split()[-2:]
    return float(load), float(peak)


# --- main ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by the whole machine (VM steal included) and by this process."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    r = resource.getrusage(resource.RUSAGE_SELF)
    return machine, r.ru_utime + r.ru_stime


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument(
        "--weights", default="stored", help="gemma_rs weights (stored: the file's types)"
    )
    p.add_argument(
        "--fast-lm-head", action="store_true", help="gemma_rs loads with fast_lm_head=True"
    )
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--gguf", type=Path, default=None, help="default: cache/" + Q8_0_GGUF_NAME)
    p.add_argument("--model", type=Path, default=None, help="gemma_rs's model (default: --gguf)")
    p.add_argument("--llama-flash-attn", action="store_true", help="flash attention in llama.cpp")
    p.add_argument(
        "--memory", action="store_true", help="peak RSS of each engine in a child process"
    )
    p.add_argument(
        "--no-long-prompt",
        action="store_true",
        help="skip the 25-tool prompt (2,945 tokens) prefill",
    )
    p.add_argument("--clock-ghz", type=float, default=None, help="default: /proc/cpuinfo")
    p.add_argument(
        "--macs-per-cycle",
        type=int,
        default=None,
        help="int8 multiply-adds per cycle and core (default: from gemma_rs's kernel)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    try:
        import llama_cpp
    except ImportError as e:
        raise SystemExit(f'{e}; run: bash scripts/build-llama-cpp "$(which python)"') from e
    a.gguf = a.gguf or q8_0_gguf_path()
    a.model = a.model or a.gguf

    print(f"command: {Path(sys.executable).name} {' '.join(sys.argv)}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"gemma_rs {gemma_rs.__version__} weights={a.weights} model={a.model}")
    info = llama_cpp.llama_print_system_info().decode().strip()
    print(f"llama-cpp-python {llama_cpp.__version__} ({a.gguf}) flash_attn={a.llama_flash_attn}")
    print(f"llama.cpp system info: {info}")
    f = gemma_rs.cpu_features()
    print(
        f"kernels: gemma_rs {f.kernel} (of {', '.join(f.kernels)}; CPU features "
        f"{', '.join(f.features)}); llama.cpp: its ggml-cpu build for the flags above (Q8_0 "
        "with REPACK and LLAMAFILE when listed)"
    )
    if "AMX" in info:
        raise SystemExit(
            "this llama.cpp uses AMX, whose kernels crash on Gemma 3 270M Q8_0: rebuild "
            'it with bash scripts/build-llama-cpp "$(which python)"'
        )
    if a.weights in ("stored", "q8_0") and a.model == a.gguf:
        print(f"weights: the same file for both engines (gemma_rs weights={a.weights})")
    else:
        print(f"weights: NOT the same file (gemma_rs {a.weights} of {a.model} vs {a.gguf})")

    long_ids = [] if a.no_long_prompt else tools_prompt_ids(a.model)
    ctx = max(a.prefill_tokens + 1, a.decode_prompt_tokens + a.new_tokens, len(long_ids) + 1)
    ours = Ours(a.model, ctx, a.weights, a.threads, a.fast_lm_head)
    llama = Llama(a.gguf, ctx, a.threads, a.llama_flash_attn)
    engines = (ours, llama)
    print(
        f"threads={a.threads} context={ctx} load: gemma_rs {ours.load_seconds:.2f}s, "
        f"llama.cpp {llama.load_seconds:.2f}s; rounds: {a.warmup} warm-up + {a.repeat} timed"
    )

    prefill: dict[str, list[float]] = {e.name: [] for e in engines}
    decode: dict[str, list[float]] = {e.name: [] for e in engines}
    long_seconds: dict[str, list[float]] = {e.name: [] for e in engines}
    counts: list[int] = []
    agree: list[int] = []
    other_cpu = wall = 0.0  # CPU seconds other processes used during the timed rounds
    for r in range(a.warmup + a.repeat):
        timed = r >= a.warmup
        t0, (machine0, self0) = time.perf_counter(), cpu_seconds()
        pre_ids = prompt_ids(ours.model, a.prefill_tokens, 2 * r)
        dec_ids = prompt_ids(ours.model, a.decode_prompt_tokens, 2 * r + 1)
        outs = {}
        for e in engines:
            seconds = e.prefill(pre_ids)
            toks, dec_seconds = e.decode(dec_ids, a.new_tokens)
            outs[e.name] = toks
            if e is ours and timed:
                ours.check_argmax(dec_ids, toks)
            if long_ids:
                if e is ours:
                    ours.model.reset()
                long = e.prefill(long_ids)
            if timed:
                prefill[e.name].append(len(pre_ids) / seconds)
                if len(toks) > 1:
                    decode[e.name].append((len(toks) - 1) / dec_seconds)
                if long_ids:
                    long_seconds[e.name].append(long)
        if timed:
            machine1, self1 = cpu_seconds()
            other_cpu += max(0.0, (machine1 - machine0) - (self1 - self0))
            wall += time.perf_counter() - t0
            counts.append(len(outs[ours.name]))
            agree.append(common_prefix(outs[ours.name], outs[llama.name]))

    w = 30
    print()
    print(f"{'engine':<22} {'prefill ' + str(a.prefill_tokens) + ' tok/s':>{w}}", end="")
    print(f" {f'decode {a.decode_prompt_tokens}+{a.new_tokens} tok/s':>{w}}")
    print(f"{'':<22} {'median (min-max)':>{w}} {'median (min-max)':>{w}}")
    for e in engines:
        label = f"{e.name} {a.weights if e is ours else 'as stored'}"
        print(f"{label:<22} {fmt(prefill[e.name]):>{w}} {fmt(decode[e.name]):>{w}}")
    ratio_p = statistics.median(prefill[ours.name]) / statistics.median(prefill[llama.name])
    ratio_d = statistics.median(decode[ours.name]) / statistics.median(decode[llama.name])
    print(f"{'ratio gemma_rs/llama':<22} {ratio_p:>{w}.2f} {ratio_d:>{w}.2f}")
    ours_bytes = ours.model.memory["weights"]
    if a.fast_lm_head:
        # Held, not read: the full Q8_0 head (the shadow stands in; the rescored rows, ~1 MB,
        # are left out).
        c = ours.model.config
        ours_bytes -= c["vocab_size"] * c["hidden_size"] // 32 * 34
    file_bytes = gguf_tensor_bytes(a.gguf)
    ours_gbs = statistics.median(decode[ours.name]) * ours_bytes / 1e9
    llama_gbs = statistics.median(decode[llama.name]) * file_bytes / 1e9
    print(
        f"weight bytes read per decoded token: gemma_rs {ours_bytes / 1e6:.1f} MB "
        f"({ours_gbs:.1f} GB/s), llama.cpp {file_bytes / 1e6:.1f} MB ({llama_gbs:.1f} GB/s)"
    )
    if long_ids:
        print(f"\nthe 25-tool prompt ({len(long_ids)} tokens), prefill from an empty cache:")
        for e in engines:
            sec = statistics.median(long_seconds[e.name])
            lo, hi = min(long_seconds[e.name]), max(long_seconds[e.name])
            tps = len(long_ids) / sec
            print(f"  {e.name:<10} {sec:6.2f} s ({lo:.2f}-{hi:.2f}), {tps:6.0f} tok/s")
        ratio_l = statistics.median(long_seconds[llama.name]) / statistics.median(
            long_seconds[ours.name]
        )
        print(f"  ratio gemma_rs/llama {ratio_l:.2f}")
    macs = prompt_macs(ours.model.config, a.prefill_tokens)
    peak, how = nominal_peak(f.kernel, a.threads, a.clock_ghz, a.macs_per_cycle)
    print(
        f"\nprefill multiply-adds ({macs / a.prefill_tokens / 1e6:.1f} M per token: the layers' "
        f"products, the lm_head once; attention left out), {a.prefill_tokens}-token prompt:"
    )
    for e in engines:
        gmacs = statistics.median(prefill[e.name]) / a.prefill_tokens * macs / 1e9
        share = f", {100 * gmacs / peak:.0f}% of the nominal int8 peak" if peak else ""
        print(f"  {e.name:<10} {gmacs:6.1f} GMAC/s{share}")
    print(f"  nominal int8 peak: {how}")
    print(
        f"\ngemma_rs new tokens per decode run: {counts} (llama.cpp: always {a.new_tokens}); "
        f"greedy tokens identical to llama.cpp's before the first difference: {agree}"
    )
    print(
        f"gemma_rs greedy tokens equal to the argmax of its exact teacher-forced logits(): "
        f"{ours.argmax_checked - ours.argmax_mismatches} of {ours.argmax_checked}"
        + (" (fast lm_head)" if a.fast_lm_head else "")
    )

    busy = other_cpu / wall
    print(f"other processes and VM steal used {busy:.2f} CPUs during the timed rounds")
    if busy > 0.1:
        print("WARNING: the CPUs were shared; these numbers are not reliable. Rerun when idle.")

    if a.memory:
        print(
            f"\nfresh child processes (context 64, 32 new tokens, {a.threads} threads), "
            "median of 3: load seconds, peak RSS"
        )
        for which in ("gemma_rs", "llama.cpp", "gemma_rs-import", "llama.cpp-import"):
            runs = [child_load_and_peak(a, which) for _ in range(3)]
            load = statistics.median(r[0] for r in runs)
            peak = statistics.median(r[1] for r in runs)
            print(f"  {which:<18} {load:6.2f} s {peak:7.0f} MiB ({peak * 1.048576:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
