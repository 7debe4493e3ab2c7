"""Saved prompt state: `Model.save_state` / `load_state` (format: docs/STATE_FORMAT.md).

A state restored in a fresh process continues exactly as the process that computed it would
have; a file that is empty, truncated, damaged, of another model, of the same model loaded as
another type, or longer than the cap is a GemmaError saying which.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma_rs
import real_model

IDS = [2] + [(i * 37 % 500) + 5 for i in range(1, 150)]


def tiny(fixtures_dir: Path, name: str = "tiny-gqa", **kw) -> gemma_rs.Model:
    return gemma_rs.load(fixtures_dir / "tiny" / name, max_inference_len=256, weights="f32", **kw)


def test_a_state_continues_in_a_fresh_model(fixtures_dir, tmp_path):
    prompt = IDS + [7, 8, 9]
    cold = tiny(fixtures_dir).complete(prompt, 6)

    a = tiny(fixtures_dir)
    a.complete(IDS[:20], 2)  # it holds something else first
    path = tmp_path / "prefix.state"  # a pathlib.Path is accepted
    assert a.save_state(path, IDS) == 150
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # renamed into place

    b = tiny(fixtures_dir)
    assert b.load_state(str(path)) == 150
    warm = b.complete(prompt, 6)
    assert warm.reused_tokens == 150
    assert warm.token_ids == cold.token_ids
    # Without a prompt: the tokens the model holds (prompt and generated ids but the last).
    held = tmp_path / "held.state"
    assert b.save_state(held) == len(prompt) + len(warm.token_ids) - 1
    c = tiny(fixtures_dir)
    c.load_state(held)
    assert c.complete(prompt + warm.token_ids, 1).reused_tokens == len(prompt) + 5


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b"", "it is empty"),
        (lambda b: b"GGUF" + b[4:], "not a gemma_rs state file"),
        (lambda b: b[:40], "shorter than its header"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\0", "truncated or damaged"),
        (lambda b: b[:8] + b"\x02" + b[9:], "version 2"),
        (lambda b: flip(b, len(b) // 2), "checksum of its KV data"),
        (lambda b: flip(b, 70), "header's checksum"),
    ],
    ids=["empty", "foreign", "short", "truncated", "long", "version", "payload", "header"],
)
def test_a_bad_state_file_is_refused_and_leaves_the_model_usable(
    fixtures_dir, tmp_path, damage, why
):
    good = tmp_path / "good.state"
    tiny(fixtures_dir).save_state(good, IDS)
    bad = tmp_path / "bad.state"
    bad.write_bytes(damage(good.read_bytes()))
    m = tiny(fixtures_dir)
    with pytest.raises(gemma_rs.GemmaError, match=why):
        m.load_state(bad)
    assert m.complete(IDS, 1).reused_tokens == 0  # nothing of the bad file is reused
    assert m.load_state(good) == 150


def flip(b: bytes, at: int) -> bytes:
    return b[:at] + bytes([b[at] ^ 0x04]) + b[at + 1 :]


def test_a_state_of_another_model_or_type_or_a_longer_one_is_refused(fixtures_dir, tmp_path):
    path = tmp_path / "s.state"
    tiny(fixtures_dir).save_state(path, IDS)
    with pytest.raises(gemma_rs.GemmaError, match="saved from another model"):
        tiny(fixtures_dir, "tiny-mqa-softcap").load_state(path)
    q8 = gemma_rs.load(fixtures_dir / "tiny" / "tiny-gqa", max_inference_len=256)
    with pytest.raises(gemma_rs.GemmaError, match="saved from another model"):
        q8.load_state(path)
    short = gemma_rs.load(fixtures_dir / "tiny" / "tiny-gqa", max_inference_len=100, weights="f32")
    with pytest.raises(gemma_rs.GemmaError, match="max_inference_len of at least 151"):
        short.load_state(path)
    with pytest.raises(FileNotFoundError):
        tiny(fixtures_dir).load_state(tmp_path / "missing.state")
    with pytest.raises(ValueError, match="holds no tokens"):
        tiny(fixtures_dir).save_state(tmp_path / "empty.state")
    with pytest.raises(ValueError, match="more than max_inference_len"):
        short.save_state(tmp_path / "long.state", IDS)
    with pytest.raises(TypeError, match="bytes"):
        tiny(fixtures_dir).save_state(tmp_path / "b.state", b"abc")
    with pytest.raises(ValueError, match="is a directory"):
        tiny(fixtures_dir).save_state(tmp_path, IDS)
    # A file refused by its header leaves what the model held: its prefix is still reused.
    m = tiny(fixtures_dir)
    m.complete(IDS, 1)
    with pytest.raises(gemma_rs.GemmaError, match="is a directory"):
        m.load_state(tmp_path)
    with pytest.raises(FileNotFoundError):
        m.load_state(tmp_path / "missing.state")
    other = tmp_path / "other.state"
    tiny(fixtures_dir, "tiny-mqa-softcap").save_state(other, IDS)
    with pytest.raises(gemma_rs.GemmaError, match="saved from another model"):
        m.load_state(other)
    assert m.complete(IDS + [7], 1).reused_tokens == len(IDS)


def save_reference_state(fixtures_dir: Path, path: str | os.PathLike[str]) -> None:
    """The state of IDS in tiny-gqa (f32): what scripts/test-aarch64 writes on the x86_64 host
    (``python tests/test_state.py FIXTURES PATH``) for the aarch64 test below."""
    tiny(fixtures_dir).save_state(path, IDS)


def kv_of(path: Path) -> tuple[bytes, np.ndarray]:
    """(header, the payload's keys and values as floats) of a state file (docs/STATE_FORMAT.md)."""
    b = path.read_bytes()
    layers, _dim, n = struct.unpack_from("<III", b, 24)
    header = 48 + 4 * layers + 8
    return b[:header], np.frombuffer(b[header + 4 * n : -8], dtype="<f4")


def test_a_state_written_on_another_host_continues_within_rounding(fixtures_dir, tmp_path):
    """Under qemu (scripts/test-aarch64), GEMMA_RS_FOREIGN_STATE is a file written on the
    x86_64 host: its fingerprint is this host's, its keys and values are this host's within
    float rounding, and the continuation from it is this host's. Natively, a child process
    writes the file."""
    foreign = os.environ.get("GEMMA_RS_FOREIGN_STATE")
    if foreign is None:
        foreign = tmp_path / "foreign.state"
        code = (
            "import sys, json, gemma_rs\n"
            "m = gemma_rs.load(sys.argv[1], max_inference_len=256, weights='f32')\n"
            "m.save_state(sys.argv[2], json.loads(sys.argv[3]))\n"
        )
        real_model.run_python(code, fixtures_dir / "tiny" / "tiny-gqa", foreign, json.dumps(IDS))
    local = tmp_path / "local.state"
    save_reference_state(fixtures_dir, local)
    (h_foreign, kv_foreign), (h_local, kv_local) = kv_of(Path(foreign)), kv_of(local)
    assert h_foreign == h_local  # the same fingerprint, layout and length
    np.testing.assert_allclose(kv_foreign, kv_local, rtol=1e-4, atol=1e-4)
    prompt = IDS + [7, 8, 9]
    m = tiny(fixtures_dir)
    assert m.load_state(foreign) == 150
    warm = m.complete(prompt, 6)
    assert warm.reused_tokens == 150
    assert warm.token_ids == tiny(fixtures_dir).complete(prompt, 6).token_ids


def test_a_fine_tune_with_the_same_shapes_is_another_model(fixtures_dir, tiny_copy, tmp_path):
    """As FunctionGemma and Gemma 3 270M: every shape equal, every weight a little different
    (here each scaled by 1.001): the fingerprint tells them apart."""
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "s.state"
    tiny(fixtures_dir).save_state(path, IDS)
    weights = load_file(tiny_copy / "model.safetensors")
    tuned = {k: v * np.float32(1.001) for k, v in weights.items()}
    save_file(tuned, tiny_copy / "model.safetensors")
    model = gemma_rs.load(tiny_copy, max_inference_len=256, weights="f32")
    with pytest.raises(gemma_rs.GemmaError, match="saved from another model"):
        model.load_state(path)


def tools25() -> list[dict]:
    return json.loads((Path(__file__).parent / "data" / "tools25.json").read_text())


SYSTEM = {
    "role": "developer",
    "content": "You are a model that can do function calling with the following functions",
}
CHAT = [SYSTEM, {"role": "user", "content": "Turn off the lights in the kitchen, please."}]


@pytest.mark.filterwarnings("ignore:this tokenizer lacks FunctionGemma's control tokens")
def test_the_tool_declarations_state_in_a_fresh_process(packed_q8_0, tmp_path):
    """The 25-tool chat turn: its declarations' state saved here, restored in a fresh process,
    gives the cold run's greedy tokens, prefilling only the user's turn. (Time to first token,
    cold against restored: bench/prompt_state.py.)"""
    tools = tools25()
    m = gemma_rs.load(packed_q8_0, max_inference_len=4096)
    prefix = m.chat_prompt([SYSTEM], tools, add_generation_prompt=False)
    full = m.chat_prompt(CHAT, tools)
    assert full[: len(prefix)] == prefix and 2_800 < len(prefix) < 3_000
    state = tmp_path / "tools.state"
    assert m.save_state(state, prefix) == len(prefix)
    # About the prefix's live KV bytes: 3 global layers every token, 15 sliding 512, 2 KiB a row.
    rows = 3 * len(prefix) + 15 * 512
    assert os.path.getsize(state) == 56 + 4 * 18 + 4 * len(prefix) + rows * 2048 + 8

    cold = gemma_rs.load(packed_q8_0, max_inference_len=4096).chat(CHAT, tools, max_new_tokens=16)
    code = (
        "import sys, json, gemma_rs\n"
        "m = gemma_rs.load(sys.argv[1], max_inference_len=4096)\n"
        "n = m.load_state(sys.argv[2])\n"
        "tools = json.loads(open(sys.argv[3]).read())\n"
        "chat = json.loads(sys.argv[4])\n"
        "r = m.chat(chat, tools, max_new_tokens=16)\n"
        "print(json.dumps([n, r.completion.reused_tokens, r.completion.token_ids]))\n"
    )
    tools_path = Path(__file__).parent / "data" / "tools25.json"
    out = real_model.run_python(code, packed_q8_0, state, tools_path, json.dumps(CHAT))
    n, reused, tokens = json.loads(out)
    assert n == len(prefix) and reused == len(prefix)
    assert tokens == cold.completion.token_ids


if __name__ == "__main__":
    save_reference_state(Path(sys.argv[1]), sys.argv[2])
