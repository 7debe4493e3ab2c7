"""The GGUF written by ``gemma_rs.pack`` loads in llama.cpp (llama-cpp-python) and agrees with
gemma_rs: same tokenization, same greedy tokens.

llama.cpp runs in a child interpreter (``real_model.run_python``), so that a crash in its native
code (its AMX kernels segfault on Gemma 3 270M Q8_0) fails one test with the signal and stderr
instead of killing pytest. scripts/build-llama-cpp builds it native and without AMX; a test here
checks that. Without ``llama_cpp`` importable the tests skip, except under ``CI=true``, where
they fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import gemma_rs
import real_model

NEW_TOKENS = 16
MUST_AGREE = 8  # the first tokens must be identical; later ones may flip on near-ties
THREADS = 2
CTX = 128

# argv: model path, prompt text, prompt ids (JSON), new tokens, threads, context. Prints one JSON
# object: llama.cpp's metadata, its tokenization of the prompt and its greedy continuation
# (argmax of the last position's logits, fed back one token at a time).
_LLAMA_CHILD = """
import ctypes, json, sys
import numpy as np
import llama_cpp

path, prompt, ids, new, threads, ctx = sys.argv[1:]
ids, new, threads, ctx = json.loads(ids), int(new), int(threads), int(ctx)
llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                      seed=1234, logits_all=False, verbose=False)
n_vocab = llm.n_vocab()

def argmax():
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n_vocab,))
    return int(logits.argmax())

llm.eval(ids)
out = [argmax()]
while len(out) < new:
    llm.eval(out[-1:])
    out.append(argmax())
print(json.dumps({
    "architecture": llm.metadata["general.architecture"],
    "block_count": int(llm.metadata["gemma3.block_count"]),
    "n_vocab": n_vocab,
    "prompt_ids": llm.tokenize(prompt.encode(), add_bos=True, special=True),
    "greedy": out,
}))
llm.close()
"""

_SYSTEM_INFO_CHILD = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"


@pytest.fixture(scope="module")
def llama_cpp_installed() -> None:
    """Skips (fails under CI=true) when llama-cpp-python is not installed."""
    try:
        import llama_cpp  # noqa: F401  (only imported here: the engine itself runs in children)
    except ImportError as e:
        reason = f"llama-cpp-python is not importable ({e}); run: bash scripts/build-llama-cpp"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: not skipped)", pytrace=False)
        pytest.skip(reason)


def test_llama_cpp_is_built_without_amx(llama_cpp_installed):
    info = real_model.run_python(_SYSTEM_INFO_CHILD)
    assert "CPU :" in info or "CPU:" in info, info  # it is llama.cpp's system info
    assert "AMX" not in info, f"llama.cpp was built with AMX, which crashes on Q8_0: {info}"


def test_a_crashing_child_is_one_failure_with_its_signal_and_stderr():
    crash = (
        "import os, signal, sys\n"
        "print('about to crash', file=sys.stderr, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    with pytest.raises(real_model.ChildFailed, match="killed by SIGSEGV") as e:
        real_model.run_python(crash)
    assert "about to crash" in str(e.value)
    with pytest.raises(real_model.ChildFailed, match="exited with status 3"):
        real_model.run_python("raise SystemExit(3)")
    assert real_model.run_python("print('ok')") == "ok\n"


def test_packed_gguf_in_llama_cpp(llama_cpp_installed, packed_q8_0: Path, fixtures_dir: Path):
    agrees_with_llama_cpp(packed_q8_0, fixtures_dir)


@pytest.mark.parametrize("weights", ["q4_k_m", "q4_0"])
def test_low_bit_packs_in_llama_cpp(
    llama_cpp_installed, weights: str, real_model_f32_dir: Path, fixtures_dir: Path, tmp_path: Path
):
    """Files `pack` writes with its own Q4_0 / Q4_K / Q6_K / Q5_0 quantizers (from the f32
    checkpoint) run in llama.cpp, which agrees with gemma_rs running them as stored."""
    dst = gemma_rs.pack(real_model_f32_dir, tmp_path / f"{weights}.gguf", weights, progress=False)
    types = {t.type for t in gemma_rs.inspect(dst).tensors}
    assert types == (
        {"F32", "Q8_0", "Q4_0"} if weights == "q4_0" else {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}
    )
    # Q4_0 moves this small model's logits most (perplexity about 1.4× here): more near ties.
    agrees_with_llama_cpp(dst, fixtures_dir, must_agree=4 if weights == "q4_0" else MUST_AGREE)


def agrees_with_llama_cpp(path: Path, fixtures_dir: Path, must_agree: int = MUST_AGREE) -> None:
    """llama.cpp reads `path` as Gemma 3 270M, tokenizes the reference prompt alike, its first
    `must_agree` greedy tokens are gemma_rs's, and where the two first differ gemma_rs's logits
    of both choices are within 0.5 (a near tie, not a different model)."""
    ref = json.loads((fixtures_dir / "gemma-3-270m" / "reference-f32.json").read_text())
    case = next(g for g in ref["generate"] if g["name"] == "capital")
    prompt_ids = case["prompt_ids"]  # BOS first

    args = (path, case["prompt"], json.dumps(prompt_ids), NEW_TOKENS, THREADS, CTX)
    theirs = json.loads(real_model.run_python(_LLAMA_CHILD, *args))
    assert theirs["architecture"] == "gemma3"
    assert theirs["n_vocab"] == 262144
    assert theirs["block_count"] == 18
    assert theirs["prompt_ids"] == prompt_ids, "llama.cpp's tokenization differs from the reference"

    model = gemma_rs.load(path, max_inference_len=CTX)
    ours = model.complete(prompt_ids, max_new_tokens=NEW_TOKENS).token_ids

    agree = 0
    for a, b in zip(ours, theirs["greedy"]):
        if a != b:
            break
        agree += 1
    same = sum(a == b for a, b in zip(ours, theirs["greedy"]))
    summary = (
        f"the first {agree} of {NEW_TOKENS} greedy tokens agree ({same} positions equal)\n"
        f"  gemma_rs:  {list(ours)}\n  llama.cpp: {theirs['greedy']}"
    )
    assert agree >= must_agree, summary
    if agree < min(len(ours), len(theirs["greedy"])):
        logits = model.logits(prompt_ids + list(ours[:agree]))[-1]
        gap = float(logits[ours[agree]] - logits[theirs["greedy"][agree]])
        assert 0 <= gap < 0.5, f"{summary}\n  gemma_rs's logit gap at the first difference: {gap}"
        summary += f"\n  first difference a near tie for gemma_rs: {gap:.3f}"
    print(summary)
