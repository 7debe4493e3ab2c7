"""The compact tokenizer against transformers' ids and the `tokenizers` library as an oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gemma_rs


@pytest.fixture(scope="module")
def model(real_model_bf16_dir: Path):
    return gemma_rs.load(real_model_bf16_dir, max_inference_len=32)


@pytest.fixture(scope="module")
def oracle(tokenizer_json: Path) -> tokenizers.Tokenizer:
    """Hugging Face `tokenizers`, the test oracle (never a dependency of gemma_rs)."""
    return tokenizers.Tokenizer.from_file(str(tokenizer_json))


@pytest.fixture(scope="module")
def reference(fixtures_dir: Path):
    return json.loads((fixtures_dir / "gemma-3-270m" / "reference-f32.json").read_text())


def test_reference_cases(model, reference):
    assert len(reference["tokenizer"]) >= 16
    for case in reference["tokenizer"]:
        ids = model.tokenize(case["text"])
        assert ids == case["ids"], case["text"]
        assert model.detokenize(ids, skip_special_tokens=True) == case["decoded"]
        assert model.tokenize(case["text"], add_bos=False) == case["ids"][1:]


def test_special_tokens_in_text(model):
    ids = model.tokenize("<start_of_turn>user\nHi<end_of_turn>", add_bos=False)
    assert ids[0] == 105 and ids[-1] == 106
    assert model.detokenize(ids) == "<start_of_turn>user\nHi<end_of_turn>"
    assert model.detokenize(ids, skip_special_tokens=True) == "user\nHi"


def test_whole_fixture_text(model, oracle, fixtures_dir):
    text = (fixtures_dir / "text" / "apache-2.0.txt").read_text()
    ids = model.tokenize(text)
    assert ids == oracle.encode(text).ids
    assert model.detokenize(ids[1:]) == text
    for line in text.splitlines():
        assert model.tokenize(line) == oracle.encode(line).ids


_alphabet = st.one_of(
    st.characters(codec="utf-8"),  # any code point but the surrogates (not valid in UTF-8)
    st.sampled_from(list(" \n\t  ▁éß東京🚀👍🏽\u200b\x00<>")),
    st.sampled_from(
        ["<start_of_turn>", "<end_of_turn>", "<bos>", "<unused5>", "<start_of", "\n\n"]
    ),
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(_alphabet, max_size=40).map("".join))
def test_random_text_matches_oracle(model, oracle, text):
    ids = model.tokenize(text)
    assert ids == oracle.encode(text).ids
    for skip in (False, True):
        assert model.detokenize(ids, skip_special_tokens=skip) == oracle.decode(
            ids, skip_special_tokens=skip
        )


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.one_of(st.integers(0, 262143), st.integers(230, 500)), max_size=30))
def test_decoding_any_ids_matches_oracle(model, oracle, ids):
    # ids 238..493 are the byte tokens <0x00>..<0xFF>: invalid UTF-8 runs become U+FFFD.
    for skip in (False, True):
        assert model.detokenize(ids, skip_special_tokens=skip) == oracle.decode(
            ids, skip_special_tokens=skip
        )


def test_out_of_vocab_ids(model):
    with pytest.raises(ValueError, match="262144"):
        model.detokenize([262144])


def test_tokenizer_memory_is_reported_and_small(model):
    m = model.memory["tokenizer"]
    assert 1_000_000 < m < 40_000_000
