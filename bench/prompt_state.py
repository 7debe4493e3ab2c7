"""Time to the first token of a FunctionGemma chat turn with 25 tool declarations, in fresh
processes: cold (the whole prompt prefilled) against the declarations' state restored.

    python bench/prompt_state.py [--model PATH] [--threads 2] [--repeat 3] [--new-tokens 16]

The tools are tests/data/tools25.json (a home/office assistant); the chat is a developer turn
declaring them and one user request, rendered by ``Model.chat_prompt`` (2,927 + 18 tokens with
Gemma 3's tokenizer). Once, the declarations' turn is saved with ``Model.save_state``; then each
round starts two child processes, alternating:

- cold: ``load``, then ``chat``; time to first token = ``Completion.prefill_seconds``;
- restored: ``load``, ``load_state``, then ``chat`` (only the user's turn is prefilled);
- prompt_cache: ``load(..., prompt_cache=DIR)`` after another process (another user request)
  saved the declarations' turn there, then ``chat``, which restores it by itself.

Time to first token = the ``chat`` call's wall time less its ``decode_seconds`` (rendering,
tokenizing, any restoring from the cache and the prefill), plus ``load_state``'s time when
called.

Both print their greedy tokens, which must be equal. ``load`` itself is the same for both and
reported apart. The model defaults to bench/compare_llama_cpp.py's: the Q8_0 GGUF packed once
into ``$GEMMA_RS_CACHE`` from the PyPI Q4_K_M.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tests" / "data" / "tools25.json"
SYSTEM = {
    "role": "developer",
    "content": "You are a model that can do function calling with the following functions",
}
CHAT = [SYSTEM, {"role": "user", "content": "Turn off the lights in the kitchen, please."}]

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import gemma_rs
model, threads, state, cache, tools, chat, new = sys.argv[1:8]
t0 = time.perf_counter()
m = gemma_rs.load(model, max_inference_len=4096, threads=int(threads),
                  prompt_cache=None if cache == "-" else cache)
t1 = time.perf_counter()
restored = 0.0
if state != "-":
    m.load_state(state)
    restored = time.perf_counter() - t1
tools, chat = json.load(open(tools)), json.loads(chat)
t2 = time.perf_counter()
r = m.chat(chat, tools, max_new_tokens=int(new))
call = time.perf_counter() - t2
c = r.completion
print(json.dumps({"load": t1 - t0, "load_state": restored, "prefill": c.prefill_seconds,
                  "first": restored + call - c.decode_seconds,
                  "reused": c.reused_tokens, "prompt": c.prompt_tokens, "tokens": c.token_ids}))
"""


def child(model: str, threads: int, state: str, new: int, cache: str = "-") -> dict:
    args = [model, str(threads), state, cache, str(TOOLS), json.dumps(CHAT), str(new)]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model path (default: the packed Q8_0 file of the cache)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()

    import gemma_rs

    sys.path.insert(0, str(Path(__file__).parent))
    from compare_llama_cpp import cpu_model, q8_0_gguf_path

    model = args.model or str(q8_0_gguf_path())
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "tools.state")
        m = gemma_rs.load(model, max_inference_len=4096, threads=args.threads)
        tools = json.loads(TOOLS.read_text())
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prefix = m.chat_prompt([SYSTEM], tools, add_generation_prompt=False)
        t = time.perf_counter()
        m.save_state(state, prefix)
        saved = time.perf_counter() - t
        size = os.path.getsize(state)
        del m
        # Another process fills the prompt cache first (its user turn differs from CHAT's).
        cache = os.path.join(tmp, "prompt-cache")
        filler = [SYSTEM, {"role": "user", "content": "What's the weather in Zurich?"}]
        subprocess.run(
            [sys.executable, "-c", CHILD, model, str(args.threads), "-", cache, str(TOOLS),
             json.dumps(filler), "1"],
            check=True, capture_output=True,
        )  # fmt: skip
        cold, warm, cached = [], [], []
        for _ in range(args.repeat):
            cold.append(child(model, args.threads, "-", args.new_tokens))
            warm.append(child(model, args.threads, state, args.new_tokens))
            cached.append(child(model, args.threads, "-", args.new_tokens, cache))

    med = lambda rows, f: statistics.median(f(r) for r in rows)  # noqa: E731
    ttft_cold = med(cold, lambda r: r["first"])
    ttft_warm = med(warm, lambda r: r["first"])
    ttft_cached = med(cached, lambda r: r["first"])
    same = all(r["tokens"] == cold[0]["tokens"] for r in cold + warm + cached)
    print(f"command: python bench/prompt_state.py --threads {args.threads} --repeat {args.repeat}")
    print(f"cpu: {cpu_model()} ({os.cpu_count()} CPUs), {args.threads} threads; model {model}")
    print(
        f"prompt: {cold[0]['prompt']} tokens, of which the declarations' turn {len(prefix)}; "
        f"state file {size / 1e6:.1f} MB, saved in {saved:.2f} s (prefill included)"
    )
    print(f"load (both): {med(cold + warm, lambda r: r['load']):.2f} s")
    print(f"cold:     time to first token {ttft_cold:.3f} s (prefill of the whole prompt)")
    print(
        f"restored: time to first token {ttft_warm:.3f} s "
        f"(load_state {med(warm, lambda r: r['load_state']):.3f} s + prefill "
        f"{med(warm, lambda r: r['prefill']):.3f} s of {cold[0]['prompt'] - warm[0]['reused']} "
        f"tokens), {ttft_cold / ttft_warm:.1f}x"
    )
    print(
        f"prompt_cache (filled by another process): time to first token {ttft_cached:.3f} s, "
        f"{ttft_cold / ttft_cached:.1f}x (reused {cached[0]['reused']} tokens)"
    )
    print(f"greedy tokens identical in all {3 * args.repeat} runs: {same}")
    if not same:
        sys.exit("the restored runs gave other tokens than the cold ones")


if __name__ == "__main__":
    main()
