"""A corpus of broken model files, made here from the tiny checkpoint: each load raises a clear
error naming the file and what is wrong, within a second, without allocating more than 100 MB.

(GGUF files are broken in many more ways by test_gguf.py; the fuzz harness in fuzz/ mutates all
of these formats at random, and scripts/test runs it.)
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import gemma_rs
import gguf_edit
from real_model import rss_kib

FIRST = "model.layers.0.mlp.down_proj.weight"


def st_parts(d: Path) -> tuple[dict, bytes]:
    b = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", b)
    return json.loads(b[8 : 8 + n]), b[8 + n :]


def st_write(d: Path, header: dict | bytes, data: bytes) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + data)


def st_edit(f: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        h, data = st_parts(d)
        f(h)
        st_write(d, h, data)

    return edit


def st_bytes(f: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        p = d / "model.safetensors"
        p.write_bytes(f(p.read_bytes()))

    return edit


def config(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        c = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
        (d / "config.json").write_text(json.dumps(c))

    return edit


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        p = d / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())

    return edit


def set_key(key: str, value) -> Callable[[dict], None]:
    def f(h: dict) -> None:
        h[FIRST][key] = value

    return f


def overlap(h: dict) -> None:
    names = [k for k in h if k != "__metadata__"]
    h[names[1]]["data_offsets"] = h[names[0]]["data_offsets"]


def swap_offsets(h: dict) -> None:
    a, b = h[FIRST]["data_offsets"]
    h[FIRST]["data_offsets"] = [b, a]


def grow_end(h: dict) -> None:
    h[FIRST]["data_offsets"][1] += 10**6


def drop_tensor(h: dict) -> None:
    del h[FIRST]


def double_rows(h: dict) -> None:
    h[FIRST]["shape"] = [h[FIRST]["shape"][0] * 2, h[FIRST]["shape"][1]]


def not_json_header(d: Path) -> None:
    h, data = st_parts(d)
    st_write(d, json.dumps(h).encode()[:-5] + b"xxxxx", data)


# (name, how to break the tiny copy, exception, file named, what the message says)
SAFETENSORS = [
    ("offsets past the data", st_edit(grow_end), "model.safetensors", "data_offsets give"),
    ("offsets that overlap", st_edit(overlap), "model.safetensors", "data_offsets give"),
    ("offsets reversed", st_edit(swap_offsets), "model.safetensors", "outside the"),
    ("dtype wider than data", st_edit(set_key("dtype", "F64")), "model.safetensors", "F64 needs"),
    ("unknown dtype", st_edit(set_key("dtype", "Q9")), "model.safetensors", 'unknown dtype "Q9"'),
    ("shape larger than data", st_edit(double_rows), "model.safetensors", r"\[128, 160\] of F32"),
    (
        "shape that overflows",
        st_edit(set_key("shape", [2**40, 2**40])),
        "model.safetensors",
        "overflow",
    ),
    ("negative dimension", st_edit(set_key("shape", [-1, 64])), "model.safetensors", "shape"),
    ("tensor missing", st_edit(drop_tensor), "model.safetensors", f"{FIRST} is missing"),
    ("truncated data", st_bytes(lambda b: b[: len(b) // 2]), "model.safetensors", "truncated"),
    (
        "header length past the end",
        st_bytes(lambda b: struct.pack("<Q", 2**40) + b[8:]),
        "model.safetensors",
        "runs past the end",
    ),
    (
        "header length 2**64 - 1",
        st_bytes(lambda b: struct.pack("<Q", 2**64 - 1) + b[8:]),
        "model.safetensors",
        "runs past the end",
    ),
    ("header not JSON", not_json_header, "model.safetensors", "not valid JSON"),
    (
        "header not an object",
        lambda d: st_write(d, b"[1, 2, 3]", b""),
        "model.safetensors",
        "not a JSON object",
    ),
    ("empty file", write("model.safetensors", b""), "model.safetensors", "too short"),
    ("7 bytes", write("model.safetensors", b"\1\2\3\4\5\6\7"), "model.safetensors", "too short"),
]

CONFIG = [
    ("config not JSON", write("config.json", "{ not json"), "config.json", "not valid JSON"),
    ("config empty", write("config.json", ""), "config.json", "not valid JSON"),
    ("config an array", write("config.json", "[]"), "config.json", "not an object"),
    ("zero heads", config(num_attention_heads=0), "config.json", "num_attention_heads must be"),
    ("zero kv heads", config(num_key_value_heads=0), "config.json", "num_key_value_heads must"),
    ("heads not a multiple", config(num_key_value_heads=3), "config.json", "not a multiple"),
    ("head_dim not matching", config(head_dim=48), "model.safetensors", "config's sizes imply"),
    ("hidden_size not matching", config(hidden_size=96), "model.safetensors", "config's sizes"),
    ("negative hidden_size", config(hidden_size=-64), "config.json", "positive integer, got -64"),
    ("hidden_size a string", config(hidden_size="64"), "config.json", "positive integer"),
    ("hidden_size fractional", config(hidden_size=64.5), "config.json", "positive integer"),
    ("hidden_size missing", config(hidden_size=None), "config.json", "hidden_size is missing"),
    ("zero layers", config(num_hidden_layers=0), "config.json", "positive integer, got 0"),
    (
        "a billion layers",
        config(num_hidden_layers=10**9, layer_types=None),
        "config.json",
        r"num_hidden_layers \(1000000000\) is above 1024",
    ),
    ("huge vocab", config(vocab_size=2**62), "config.json", "vocab_size"),
    ("huge intermediate", config(intermediate_size=2**50), "config.json", "intermediate_size"),
    ("negative eps", config(rms_norm_eps=-1.0), "config.json", "rms_norm_eps"),
    ("zero window", config(sliding_window=0), "config.json", "sliding_window"),
    ("short layer_types", config(layer_types=["sliding_attention"]), "config.json", "layer_types"),
    ("unknown layer type", config(layer_types=["full_attention"] * 6 + ["x"]), "config.json", "x"),
    ("rope scaling", config(rope_scaling={"factor": 8.0}), "config.json", "rope_scaling"),
]


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def tok(change: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    def edit(d: Path, tj: dict) -> None:
        tj = json.loads(json.dumps(tj))
        change(tj)
        (d / "tokenizer.json").write_text(json.dumps(tj))

    return edit


def model_type(tj: dict) -> None:
    tj["model"]["type"] = "WordPiece"


def id_out_of_range(tj: dict) -> None:
    tj["model"]["vocab"]["hello"] = 2**40


def unknown_merge(tj: dict) -> None:
    tj["model"]["merges"].insert(0, ["zzqq", "qqzz"])


def no_model(tj: dict) -> None:
    del tj["model"]


def shrink_vocab(tj: dict) -> None:
    """The tiny model's 512 ids and a tokenizer of 600: more tokens than the model has rows."""
    keep = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])[:600]
    tj["model"]["vocab"] = dict(keep)
    tj["model"]["merges"] = []
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < 600]


TOKENIZER = [
    ("tokenizer not JSON", tok(lambda tj: None), "tokenizer.json", ""),  # replaced below
    ("tokenizer model type", tok(model_type), "tokenizer.json", '"WordPiece" is not supported'),
    ("tokenizer id out of range", tok(id_out_of_range), "tokenizer.json", "out of range"),
    ("tokenizer merge of unknown tokens", tok(unknown_merge), "tokenizer.json", "not in the vocab"),
    ("tokenizer without a model", tok(no_model), "tokenizer.json", 'no "model"'),
    ("tokenizer bigger than the model", tok(shrink_vocab), "tokenizer.json", "vocab_size is 512"),
]


def assert_refused(path: Path, file: str, what: str, exc: type = gemma_rs.GemmaError) -> None:
    """`load(path)` raises `exc` naming `file` and matching `what`, in under a second and
    under 100 MB above the resident memory before the call (peak reset by clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    with pytest.raises(exc) as e:
        gemma_rs.load(path)
    elapsed = time.perf_counter() - start
    peak_mb = (rss_kib("VmHWM") - before) / 1024
    msg = str(e.value)
    assert file in msg, f"the message does not name {file}: {msg}"
    if what:
        assert re.search(what, msg), f"{what!r} not in {msg!r}"
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    assert peak_mb < 100, f"peak {peak_mb:.0f} MB above the interpreter"
    # memory_plan reads the same files without the weights: the same bounds, error or not.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    try:
        gemma_rs.memory_plan(path)
    except (gemma_rs.GemmaError, FileNotFoundError) as e:
        assert not str(e).startswith("internal error"), e  # a caught panic is a bug
    assert time.perf_counter() - start < 1.0
    assert (rss_kib("VmHWM") - before) / 1024 < 100


@pytest.mark.parametrize(
    "name, brk, file, what", SAFETENSORS + CONFIG, ids=lambda v: v if isinstance(v, str) else ""
)
def test_broken_checkpoint_files(tiny_copy: Path, name, brk, file, what):
    brk(tiny_copy)
    assert_refused(tiny_copy, file, what)


@pytest.mark.parametrize(
    "name, brk, file, what", TOKENIZER, ids=lambda v: v if isinstance(v, str) else ""
)
def test_broken_tokenizer_files(tiny_copy: Path, tokenizer_json: Path, name, brk, file, what):
    if name == "tokenizer not JSON":
        (tiny_copy / "tokenizer.json").write_text('{"model": {oops')
        what = "expected"
    else:
        brk(tiny_copy, load_json(tokenizer_json))
    assert_refused(tiny_copy, file, what)


def test_truncated_and_binary_tokenizer_files(tiny_copy: Path, tokenizer_json: Path):
    text = tokenizer_json.read_bytes()
    for cut in (1, 1000, len(text) // 3, len(text) - 1):
        (tiny_copy / "tokenizer.json").write_bytes(text[:cut])
        assert_refused(tiny_copy, "tokenizer.json", "end of JSON|expected|unterminated")
    (tiny_copy / "tokenizer.json").write_bytes(bytes(range(256)) * 10)
    assert_refused(tiny_copy, "tokenizer.json", "expected")


def test_missing_files_are_file_not_found(tmp_path: Path, tiny_copy: Path):
    assert_refused(tmp_path / "nowhere", "nowhere", "no such file", FileNotFoundError)
    (tiny_copy / "model.safetensors").unlink()
    assert_refused(tiny_copy, str(tiny_copy), "model.safetensors")


@pytest.fixture(scope="module")
def tiny_gguf(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    dst = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return gemma_rs.pack(fixtures_dir / "tiny" / "tiny-gqa", dst, progress=False).read_bytes()


def test_broken_gguf_files(tiny_gguf: bytes, tmp_path: Path):
    lay = gguf_edit.layout(tiny_gguf)
    _, _, offset_at = lay.infos[3]
    arch_key, arch_value, _ = lay.kv["general.architecture"]
    cases = {
        "truncated in the header": (tiny_gguf[:100], "truncated|end of the file|past the end"),
        "truncated in the data": (tiny_gguf[: len(tiny_gguf) - 1000], "past the end|outside"),
        "tensor count lies": (
            tiny_gguf[:8] + struct.pack("<Q", 2**40) + tiny_gguf[16:],
            "tensor|count",
        ),
        "kv count lies": (tiny_gguf[:16] + struct.pack("<Q", 2**60) + tiny_gguf[24:], "count|past"),
        "tensor offset past the end": (
            tiny_gguf[:offset_at] + struct.pack("<Q", 2**50) + tiny_gguf[offset_at + 8 :],
            "past the end|outside|offset",
        ),
        "string length lies": (
            tiny_gguf[: arch_value + 4] + struct.pack("<Q", 2**62) + tiny_gguf[arch_value + 12 :],
            "past the end|string|length",
        ),
        "not a GGUF": (b"GGUG" + tiny_gguf[4:], "not a GGUF|magic"),
    }
    assert arch_key < arch_value
    for name, (data, what) in cases.items():
        p = tmp_path / (name.replace(" ", "_") + ".gguf")
        p.write_bytes(data)
        assert_refused(p, p.name, what)
