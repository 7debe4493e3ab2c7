"""`load(..., prompt_cache=DIR)`: prefixes saved by one process are restored by the next."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gemma_rs
import real_model

TOOLS = json.loads((Path(__file__).parent / "data" / "tools25.json").read_text())[:8]
SYSTEM = {"role": "developer", "content": "You can call these functions."}


def chat(text: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": text}]


# A child process: load with the cache, one chat turn; prints what it reused and generated.
CHILD = """
import json, sys, warnings
warnings.simplefilter("ignore", UserWarning)  # the base model's missing control tokens
import gemma_rs
model, cache, limit, msgs, tools = sys.argv[1:6]
m = gemma_rs.load(model, max_inference_len=2048, prompt_cache=cache, prompt_cache_bytes=int(limit))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", RuntimeWarning)
    warnings.filterwarnings("always", message="prompt cache")
    r = m.chat(json.loads(msgs), json.loads(tools), max_new_tokens=8)
dropped = [str(w.message) for w in caught if "prompt cache" in str(w.message)]
print(json.dumps([r.completion.reused_tokens, r.completion.token_ids, dropped]))
"""


def run(model: Path, cache: Path, msgs: list[dict], limit: int = 1 << 30) -> tuple:
    out = real_model.run_python(CHILD, model, cache, limit, json.dumps(msgs), json.dumps(TOOLS))
    return tuple(json.loads(out))


@pytest.fixture(scope="module")
def cold(packed_q8_0) -> dict[str, list[int]]:
    """Greedy tokens of each request without any cache."""
    m = gemma_rs.load(packed_q8_0, max_inference_len=2048)
    with pytest.warns(UserWarning, match="control tokens"):
        return {
            t: m.chat(chat(t), TOOLS, max_new_tokens=8).completion.token_ids
            for t in ("Lights off in the kitchen.", "Set a timer for ten minutes.")
        }


def prefix_len(model: Path) -> int:
    m = gemma_rs.load(model, max_inference_len=64)
    return len(m.chat_prompt([SYSTEM], TOOLS, add_generation_prompt=False))


def test_a_later_process_restores_the_declarations(packed_q8_0, cold, tmp_path):
    n = prefix_len(packed_q8_0)
    assert n > 256
    # The first process prefills the declarations' turn to save it, then the call reuses it.
    reused, tokens, dropped = run(packed_q8_0, tmp_path, chat("Lights off in the kitchen."))
    assert (reused, tokens, dropped) == (n, cold["Lights off in the kitchen."], [])
    entries = list(tmp_path.glob("*.state"))
    assert len(entries) == 1 and not list(tmp_path.glob("*.tmp"))
    reused, tokens, dropped = run(packed_q8_0, tmp_path, chat("Set a timer for ten minutes."))
    assert (reused, tokens, dropped) == (n, cold["Set a timer for ten minutes."], [])


def test_a_damaged_entry_is_dropped_and_the_call_gives_the_same_tokens(packed_q8_0, cold, tmp_path):
    run(packed_q8_0, tmp_path, chat("Lights off in the kitchen."))
    (entry,) = tmp_path.glob("*.state")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x20
    entry.write_bytes(bytes(data))
    reused, tokens, dropped = run(packed_q8_0, tmp_path, chat("Set a timer for ten minutes."))
    assert tokens == cold["Set a timer for ten minutes."]
    assert len(dropped) == 1 and "damaged" in dropped[0], dropped
    # Saved again, intact: the next process restores it.
    reused, tokens, dropped = run(packed_q8_0, tmp_path, chat("Lights off in the kitchen."))
    assert reused > 256 and tokens == cold["Lights off in the kitchen."] and dropped == []


def test_least_recently_used_entries_go_first(packed_q8_0, tmp_path):
    m = gemma_rs.load(packed_q8_0, max_inference_len=2048, prompt_cache=tmp_path)
    sizes = []
    with pytest.warns(UserWarning):
        for k in range(3):
            system = {"role": "developer", "content": f"Assistant number {k}."}
            m.chat([system, {"role": "user", "content": "Hi"}], TOOLS, max_new_tokens=1)
            sizes.append(sum(p.stat().st_size for p in tmp_path.glob("*.state")))
    one = sizes[0]
    assert sizes == [one, 2 * one, 3 * one]
    # A limit of two entries: a fourth prefix evicts the oldest.
    oldest = min(tmp_path.glob("*.state"), key=lambda p: p.stat().st_mtime)
    m2 = gemma_rs.load(
        packed_q8_0, max_inference_len=2048, prompt_cache=tmp_path, prompt_cache_bytes=2 * one
    )
    with pytest.warns(UserWarning):
        system = {"role": "developer", "content": "Assistant number 3."}
        m2.chat([system, {"role": "user", "content": "Hi"}], TOOLS, max_new_tokens=1)
    left = list(tmp_path.glob("*.state"))
    assert len(left) == 2 and oldest not in left


def test_processes_sharing_the_directory(packed_q8_0, cold, tmp_path):
    """Two processes at once, the same prompt: both save, one file survives, no partial file;
    both give the cold tokens."""
    msgs = json.dumps(chat("Lights off in the kitchen."))
    args = [packed_q8_0, tmp_path, 1 << 30, msgs, json.dumps(TOOLS)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, *map(str, args)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert [o[1] for o in outs] == [cold["Lights off in the kitchen."]] * 2
    assert len(list(tmp_path.glob("*.state"))) == 1 and not list(tmp_path.glob("*.tmp"))


def test_bad_arguments(packed_q8_0, tmp_path):
    with pytest.raises(TypeError, match="prompt_cache_bytes"):
        gemma_rs.load(packed_q8_0, 64, prompt_cache=tmp_path, prompt_cache_bytes="1G")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompt_cache_bytes"):
        gemma_rs.load(packed_q8_0, 64, prompt_cache=tmp_path, prompt_cache_bytes=-1)
