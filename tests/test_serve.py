"""``gemma-rs serve``: the server started as a subprocess on a free loopback port and driven with
the official ``openai`` client (and plain HTTP for what a client library would not send).

Its outputs are checked against the Python API on the same file (temperature 0, and seeded
sampling), which the other tests check against transformers; the completions of the
transformers reference prompts are also checked against its greedy texts where the file's
own greedy run matches them.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import gemma_rs

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

MAX_LEN = 1024
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 10},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "description": "Sets an alarm.",
            "parameters": {
                "type": "object",
                "properties": {
                    "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                    "minute": {"type": "integer", "minimum": 0, "maximum": 59},
                    "label": {"type": "string", "maxLength": 20},
                },
                "required": ["hour", "minute"],
                "additionalProperties": False,
            },
        },
    },
]
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris tomorrow?"},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``gemma-rs serve`` subprocess and clients for it."""

    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = open(os.devnull, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gemma_rs", "serve", str(model), "--port", str(self.port),
             "--max-inference-len", str(MAX_LEN), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}: {self.lines}")
            try:
                status, _, _ = self.request("GET", "/health")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        self.model_id = Path(model).name.removesuffix(".gguf")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, api_key: str = "unused", **kw: Any) -> Any:
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, **kw)

    def request(
        self, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def wait_for_line(self, match: Any, since: int, count: int = 1, timeout: float = 30) -> bool:
        """Whether `count` log lines after the first `since` match, waiting for the reader."""
        deadline = time.monotonic() + timeout
        while sum(map(match, self.lines[since:])) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(real_model_gguf: Path) -> Iterator[Server]:
    s = Server(real_model_gguf, "--parallel", "4", "--max-tokens-limit", "512")
    yield s
    assert s.stop() == 0, s.lines


@pytest.fixture(scope="module")
def model(real_model_gguf: Path) -> gemma_rs.Model:
    return gemma_rs.load(real_model_gguf, MAX_LEN)


@pytest.fixture(autouse=True)
def _quiet_chat_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the base model's "not for chat" warnings
        yield


def stream_chat(client: Any, **kw: Any) -> tuple[str, list[Any], str | None, Any]:
    """A streamed chat: its text, tool-call deltas, finish reason and usage."""
    text, calls, finish, usage = "", [], None, None
    for chunk in client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kw
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            calls.extend(choice.delta.tool_calls or [])
            finish = choice.finish_reason or finish
    return text, calls, finish, usage


def test_models_and_health(server: Server) -> None:
    models = server.client().models.list().data
    assert [m.id for m in models] == [server.model_id]
    assert server.client().models.retrieve(server.model_id).id == server.model_id
    status, _, body = server.request("GET", "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["slots"] == 4


def test_chat_plain_and_streamed_give_the_apis_reply(server: Server, model: gemma_rs.Model):
    client = server.client()
    kw = dict(model=server.model_id, messages=CHAT, temperature=0, max_tokens=40)
    r = client.chat.completions.create(**kw)
    want = model.chat(CHAT, max_new_tokens=40)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant" and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == {"eos": "stop"}.get(want.finish_reason, want.finish_reason)
    assert r.usage.prompt_tokens == want.completion.prompt_tokens
    assert r.usage.completion_tokens == len(want.completion.token_ids)
    text, calls, finish, usage = stream_chat(client, **kw)
    assert text == r.choices[0].message.content and not calls
    assert finish == r.choices[0].finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens
    # The second request found the first's prefix in its slot.
    assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 1


def test_seeded_sampling_is_the_apis(server: Server, model: gemma_rs.Model) -> None:
    kw = dict(temperature=0.9, top_p=0.9, seed=7)
    r = server.client().completions.create(
        model=server.model_id, prompt="Once upon a time", max_tokens=24, **kw
    )
    assert r.choices[0].text == model.generate("Once upon a time", 24, **kw)


def check_calls(calls: list[dict[str, Any]]) -> None:
    """Each call names a declared tool and has JSON arguments valid for its schema."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert name in schemas, name
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])


@pytest.mark.parametrize("parallel", [False, True])
def test_required_tool_calls_are_valid_and_the_same_when_streamed(
    server: Server, parallel: bool
) -> None:
    client = server.client()
    kw = dict(
        model=server.model_id, messages=CHAT, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=parallel, temperature=0, max_tokens=300,
    )  # fmt: skip
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = [c.model_dump() for c in r.choices[0].message.tool_calls]
    check_calls(calls)
    if not parallel:
        assert len(calls) == 1
    text, deltas, finish, _ = stream_chat(client, **kw)
    assert finish == "tool_calls" and text == (r.choices[0].message.content or "")
    # Every tool-call chunk repeats the call's id, type and name.
    for d in deltas:
        assert d.id and d.type == "function" and d.function.name, d
    streamed = [(d.function.name, json.loads(d.function.arguments)) for d in deltas]
    whole = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert streamed == whole
    assert [d.index for d in deltas] == list(range(len(deltas)))


def test_a_named_tool_choice_and_a_tool_result_turn(server: Server) -> None:
    client = server.client()
    r = client.chat.completions.create(
        model=server.model_id,
        messages=[{"role": "user", "content": "Wake me at 7:15."}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "set_alarm"}},
        temperature=0,
        max_tokens=200,
    )
    calls = [c.model_dump() for c in r.choices[0].message.tool_calls]
    assert [c["function"]["name"] for c in calls] == ["set_alarm"]
    check_calls(calls)
    # The call and its result go back as messages; the answer is text.
    history = [
        {"role": "user", "content": "Wake me at 7:15."},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"ok": true}'},
    ]
    r = client.chat.completions.create(
        model=server.model_id, messages=history, tools=TOOLS, tool_choice="none",
        temperature=0, max_tokens=30,
    )  # fmt: skip
    assert not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 30


def test_json_schema_content_validates(server: Server) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    for seed in (None, 1, 2):
        r = server.client().chat.completions.create(
            model=server.model_id,
            messages=[{"role": "user", "content": "Describe a person as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
            temperature=0 if seed is None else 1.0,
            seed=seed,
            max_tokens=200,
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_completions_plain_streamed_and_against_the_reference(
    server: Server, model: gemma_rs.Model, fixtures_dir: Path
) -> None:
    ref = json.loads((fixtures_dir / "gemma-3-270m" / "reference-f32.json").read_text())
    client = server.client()
    matched = 0
    for g in ref["generate"]:
        n = len(g["greedy_ids"])
        r = client.completions.create(
            model=server.model_id, prompt=g["prompt"], max_tokens=n, temperature=0
        )
        want = model.complete(g["prompt"], n)
        assert r.choices[0].text == want.text, g["name"]
        assert r.usage.completion_tokens == len(want.token_ids)
        if want.token_ids == g["greedy_ids"]:
            assert r.choices[0].text == g["greedy_text"], g["name"]
            matched += 1
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model=server.model_id,
                prompt=g["prompt"],
                max_tokens=n,
                temperature=0,
                stream=True,
            )  # fmt: skip
            if c.choices
        )
        assert streamed == want.text, g["name"]
    assert matched >= 2  # test_low_bit: the others part from transformers at near ties
    # Token ids as the prompt.
    ids = model.tokenize("The capital of France is")
    r = client.completions.create(model=server.model_id, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == model.generate(ids, 8)


def test_four_concurrent_streams_complete_with_their_own_text(
    server: Server, model: gemma_rs.Model
) -> None:
    prompts = ["Once upon a time", "The best way to cook rice is", "def fibonacci(n):", "Paris is"]
    want = [model.generate(p, 48) for p in prompts]
    got: dict[int, Any] = {}

    def run(i: int) -> None:
        text, finish = "", None
        for c in server.client().completions.create(
            model=server.model_id, prompt=prompts[i], max_tokens=48, temperature=0, stream=True
        ):
            if c.choices:
                text += c.choices[0].text
                finish = c.choices[0].finish_reason or finish
        got[i] = (text, finish)

    seen = len(server.lines)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    # Batched decoding gives each stream the tokens it gets alone.
    assert [got[i][0] for i in range(4)] == want
    assert all(got[i][1] in ("stop", "length") for i in range(4))
    # They ran at once, each in its own slot (their log lines follow their last chunk).
    streamed = lambda line: "/v1/completions 200" in line and "stream" in line  # noqa: E731
    server.wait_for_line(streamed, since=seen, count=4)
    slots = {x.split("slot=")[1].split()[0] for x in server.lines[seen:] if streamed(x)}
    assert len(slots) == 4, server.lines[seen:]


def test_a_dropped_stream_frees_its_slot(server: Server, model: gemma_rs.Model) -> None:
    client = server.client()
    seen = len(server.lines)
    stream = client.completions.create(
        model=server.model_id, prompt="Once upon a time", max_tokens=500, temperature=0,
        stream=True,
    )  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while json.loads(server.request("GET", "/health")[2])["running"]:
        assert time.monotonic() < deadline, "the dropped stream still runs"
        time.sleep(0.1)
    assert server.wait_for_line(lambda line: " 499 " in line, since=seen), server.lines[seen:]
    r = client.completions.create(
        model=server.model_id, prompt="Paris is", max_tokens=8, temperature=0
    )
    assert r.choices[0].text == model.generate("Paris is", 8)


BAD = [
    # (body, status, text in the message)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "'model' is required"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "@", "messages": []}, 400, "non-empty list"),
    ({"model": "@", "messages": "hi"}, 400, "non-empty list"),
    ({"model": "@", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role"),
    ({"model": "@", "messages": [{"role": "user"}]}, 400, "no 'content'"),
    ({"model": "@", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "'temperature' must be"),
    ({"model": "@", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400,
     "from 0 to 2"),
    ({"model": "@", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400,
     "above this server's limit"),
    ({"model": "@", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400,
     "at least 1"),
    ({"model": "@", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "'n' must be 1"),
    ({"model": "@", "messages": [{"role": "user", "content": "x"}], "stop": 5}, 400, "'stop'"),
    ({"model": "@", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400,
     "'stream' must be"),
    ({"model": "@", "messages": [{"role": "user", "content": "x"}], "tools": {"a": 1}}, 400,
     "'tools' must be"),
    ({"model": "@", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
      "tool_choice": "sometimes"}, 400, "tool_choice"),
    ({"model": "@", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "nope"),
    ({"model": "@", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}},
     400, ""),
    ({"model": "@", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"model": "@", "messages": [{"role": "user", "content": "x" * 20000}]}, 400,
     "max_inference_len"),
]  # fmt: skip


@pytest.mark.parametrize("body,status,message", BAD)
def test_bad_requests_get_openai_style_errors(server: Server, body: Any, status: int, message: str):
    if isinstance(body, dict):
        body = json.dumps(body).replace('"@"', json.dumps(server.model_id)).encode()
    got, headers, raw = server.request(
        "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    assert got == status, raw
    assert headers["content-type"] == "application/json"
    error = json.loads(raw)["error"]
    assert message in error["message"] and error["type"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_requests_through_the_client_and_other_paths(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model_id, prompt=[10**9])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model_id, prompt="")
    status, _, raw = server.request("POST", "/v1/completions", b"x" * (2 << 20))
    assert status == 413 and "larger than" in json.loads(raw)["error"]["message"]
    status, _, raw = server.request("GET", "/v1/nothing")
    assert status == 404 and json.loads(raw)["error"]["message"]
    status, _, raw = server.request("GET", "/v1/chat/completions")
    assert status == 405 and json.loads(raw)["error"]["message"]
    # Still answering.
    assert server.request("GET", "/health")[0] == 200


def test_rss_stays_flat_over_100_requests(server: Server) -> None:
    client = server.client()

    def one(i: int) -> None:
        if i % 2:
            client.completions.create(
                model=server.model_id, prompt=f"Request {i}:", max_tokens=4, temperature=0
            )
        else:
            list(client.chat.completions.create(
                model=server.model_id, messages=[{"role": "user", "content": f"Say {i}"}],
                max_tokens=4, temperature=0, stream=True,
            ))  # fmt: skip

    for i in range(20):
        one(i)
    before = server.rss_kib()
    for i in range(100):
        one(i)
    grown = server.rss_kib() - before
    assert grown < 8 * 1024, f"RSS grew {grown} KiB over 100 requests"


def test_the_api_key_is_enforced(real_model_gguf: Path) -> None:
    s = Server(real_model_gguf, env={"GEMMA_RS_API_KEY": "sesame"})
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client("wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").completions.create(model=s.model_id, prompt="hi", max_tokens=2)
        status, _, _ = s.request("POST", "/v1/chat/completions", b"{}")
        assert status == 401
        assert [m.id for m in s.client("sesame").models.list().data] == [s.model_id]
        r = s.client("sesame").completions.create(model=s.model_id, prompt="hi", max_tokens=2)
        assert r.usage.completion_tokens >= 1
    finally:
        assert s.stop() == 0


def test_a_full_queue_answers_503_and_sigterm_stops_cleanly(real_model_gguf: Path) -> None:
    s = Server(real_model_gguf, "--parallel", "1", "--queue", "0")
    try:
        client = s.client()
        long = client.completions.create(
            model=s.model_id, prompt="Once upon a time", max_tokens=400, temperature=0,
            stream=True,
        )  # fmt: skip
        next(iter(long))
        status, headers, raw = s.request(
            "POST", "/v1/completions",
            json.dumps({"model": s.model_id, "prompt": "hi", "max_tokens": 2}),
        )  # fmt: skip
        assert status == 503 and headers["retry-after"] == "1", raw
        assert json.loads(raw)["error"]["code"] == "server_busy"
        # SIGTERM with a stream running: a clean exit.
        t0 = time.monotonic()
        assert s.stop() == 0
        assert time.monotonic() - t0 < 20
    finally:
        s.stop()


def test_the_prompt_cache_survives_a_restart(real_model_gguf: Path, tmp_path: Path) -> None:
    system = "You answer questions about the weather. " * 40  # a first turn of ~320 tokens
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Rome?"}]
    usages = []
    for _ in range(2):
        s = Server(real_model_gguf, "--prompt-cache", str(tmp_path))
        try:
            r = s.client().chat.completions.create(
                model=s.model_id, messages=messages, max_tokens=4, temperature=0
            )
            usages.append(r.usage)
        finally:
            assert s.stop() == 0
    assert list(tmp_path.glob("*.state"))
    # The restarted server's first request restored the saved first turn.
    assert usages[1].prompt_tokens_details.cached_tokens >= 256
    assert usages[1].prompt_tokens == usages[0].prompt_tokens
