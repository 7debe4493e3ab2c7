"""``gemma-rs serve`` under load: aggregate decode tokens/s with 1, 2 and 4 concurrent streams,
and the time to first token of a chat whose tool declarations are already cached (in the slot,
and on disk after a restart with ``--prompt-cache``).

    python bench/serve.py [--model FILE] [--tokens 128] [--streams 1 2 4] [--tools 25]

The server is started as a subprocess (``python -m gemma_rs serve``, ``--parallel`` = the most
streams); the client is plain ``http.client`` in threads of this process, which shares the
machine's cores with the server (on a 2-core host it takes a few percent). Streams are greedy
completions of different prompts, ``max_tokens`` each; a stream that ends early (an
end-of-sequence token) counts the tokens it made. Decode tokens/s is the tokens after each
stream's first, over the time from the last first token to the last token; end-to-end adds the
prefills.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from compare_llama_cpp import cpu_model  # noqa: E402

PROMPTS = [
    "Once upon a time, in a village by the sea,",
    "The history of the printing press begins",
    "Here is a recipe for a simple bread:",
    "The rules of chess are as follows.",
    "In the year 2050, cities will",
    "A guide to the planets of the solar system:",
    "The engineer opened the old machine and found",
    "Dear diary, today I learned",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, parallel: int, extra: list[str]) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gemma_rs", "serve", model, "--port", str(self.port),
             "--parallel", str(parallel), "--quiet", *extra],
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.post_or_get("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        self.model_id = json.loads(self.post_or_get("GET", "/v1/models")[1])["data"][0]["id"]

    def post_or_get(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, data, {"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def stream(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A streamed request: when it was sent, its first and last text, and its usage."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        body = {**body, "model": self.model_id, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        t0 = time.perf_counter()
        first = last = None
        usage = None
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200, r.read()
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                for c in event.get("choices", []):
                    if c.get("text") or (c.get("delta") or {}).get("content"):
                        last = time.perf_counter()
                        first = first or last
        finally:
            conn.close()
        return {"sent": t0, "first": first or t0, "last": last or t0, "usage": usage}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def concurrent(server: Server, k: int, tokens: int) -> dict[str, float]:
    results: list[dict[str, Any]] = [{}] * k

    def run(i: int) -> None:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0}
        results[i] = server.stream("/v1/completions", body)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = [r["usage"]["completion_tokens"] for r in results]
    end = max(r["last"] for r in results)
    decode_from = max(r["first"] for r in results)
    after_first = sum(n - 1 for n in made)
    # Tokens after the last first token: each stream's share of that window.
    in_window = sum(
        (n - 1) * (r["last"] - decode_from) / max(r["last"] - r["first"], 1e-9)
        for n, r in zip(made, results)
    )
    return {
        "tokens": sum(made),
        "decode": in_window / max(end - decode_from, 1e-9),
        "end_to_end": sum(made) / (end - t0),
        "ttft": sum(r["first"] - r["sent"] for r in results) / k,
        "after_first": after_first,
    }


def tool_declarations(n: int) -> list[dict[str, Any]]:
    """`n` plausible tools (a smart home's), ~115 prompt tokens each."""
    things = ["light", "thermostat", "blind", "speaker", "door lock", "camera", "oven", "kettle",
              "fan", "heater", "sprinkler", "alarm", "tv", "vacuum", "garage door", "washer",
              "dryer", "fridge", "doorbell", "router", "printer", "calendar", "timer",
              "reminder", "note"]  # fmt: skip
    tools = []
    for i in range(n):
        thing = things[i % len(things)]
        name = f"set_{thing.replace(' ', '_')}_{i}"
        tools.append({
            "type": "function",
            "function": {
                "name": name,
                "description": f"Changes the settings of the {thing} in a room of the house, "
                               f"or reads them back when no value is given.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "room": {"type": "string", "description": "The room, e.g. kitchen."},
                        "on": {"type": "boolean"},
                        "level": {"type": "integer", "minimum": 0, "maximum": 100},
                    },
                    "required": ["room"],
                },
            },
        })  # fmt: skip
    return tools


def chat_ttft(server: Server, tools: list[dict[str, Any]], question: str) -> tuple[float, Any]:
    body = {
        "messages": [
            {"role": "system", "content": "You control the house. Call the functions you need."},
            {"role": "user", "content": question},
        ],
        "tools": tools,
        "max_tokens": 1,
        "temperature": 0,
    }
    r = server.stream("/v1/chat/completions", body)
    # With max_tokens 1 the reply may be a held-back call: the end is the first token's time.
    t = (r["last"] if r["last"] > r["sent"] else time.perf_counter()) - r["sent"]
    return t, r["usage"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a .gguf or HF directory (default: the PyPI Gemma 3 270M)")
    p.add_argument("--tokens", type=int, default=128, help="max_tokens of each stream")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeat", type=int, default=2, help="runs of each stream count (best)")
    p.add_argument("--tools", type=int, default=25, help="tools declared in the TTFT chat")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    model = a.model
    if model is None:
        from gemma_rs import demo

        model = str(demo.gguf_path())
    extra = ["--max-inference-len", "4096"]
    if a.threads:
        extra += ["--threads", str(a.threads)]
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); model {model}")

    server = Server(model, max(a.streams), extra)
    try:
        chat_ttft(server, tool_declarations(1), "warm up")
        print(f"\n{'streams':>7} {'decode tok/s':>13} {'x one':>6} {'end-to-end':>11} "
              f"{'TTFT ms':>8} {'tokens':>7}")  # fmt: skip
        one = None
        for k in a.streams:
            best = max((concurrent(server, k, a.tokens) for _ in range(a.repeat)),
                       key=lambda r: r["decode"])  # fmt: skip
            one = one or best["decode"]
            d, e2e, ttft = best["decode"], best["end_to_end"], best["ttft"] * 1000
            print(
                f"{k:>7} {d:>13.1f} {d / one:>6.2f} {e2e:>11.1f} {ttft:>8.0f} {best['tokens']:>7}"
            )
        tools = tool_declarations(a.tools)
        cold, usage = chat_ttft(server, tools, "Turn on the kitchen light.")
        warm, usage2 = chat_ttft(server, tools, "Set the bedroom heater to eco.")
        print(f"\nTTFT, a chat declaring {a.tools} tools ({usage['prompt_tokens']} prompt tokens):")
        print(f"  cold (nothing cached)        {cold * 1000:8.0f} ms")
        print(
            f"  warm (the slot holds them)   {warm * 1000:8.0f} ms  "
            f"({usage2['prompt_tokens_details']['cached_tokens']} tokens cached)"
        )
    finally:
        server.stop()

    with tempfile.TemporaryDirectory() as cache:
        for run in ("fills the cache", "after a restart"):
            server = Server(model, 1, [*extra, "--prompt-cache", cache])
            try:
                t, usage = chat_ttft(server, tools, "Open the garage door.")
            finally:
                server.stop()
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            print(f"  --prompt-cache, {run:<15} {t * 1000:6.0f} ms  ({cached} tokens cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
