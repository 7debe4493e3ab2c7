"""Type stubs of the Rust extension (rust/python.rs), checked against the module by
``python -m mypy.stubtest gemma_rs._gemma_rs`` in scripts/test. Use the facade in
gemma_rs/__init__.py."""

import types
from collections.abc import Callable, Sequence
from typing import Any, Literal, final

__all__ = [
    "GemmaError",
    "__version__",
    "load",
    "pack",
    "verify",
    "memory_plan",
    "render_template",
    "cpu_features",
    "inspect",
    "check_max_new_tokens",
    "check_load_options",
    "Model",
    "Stream",
    "Batch",
    "Sampling",
    "Completion",
    "_testing",
]

__version__: str
_Prompt = str | Sequence[int]
_Stop = str | Sequence[str] | None
_testing: types.ModuleType  # kernels exposed for the tests alone

class GemmaError(Exception): ...

@final
class Sampling:
    # fmt: off
    def __new__(cls, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None) -> Sampling: ...  # noqa: E501
    # fmt: on
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int | None

@final
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: Literal["eos", "stop", "length"]
    prompt_tokens: int
    reused_tokens: int
    prefill_seconds: float
    decode_seconds: float
    constraint_seconds: float
    fast_head_tokens: int
    fast_head_fallbacks: int
    fast_head_candidates: int

@final
class Model:
    # fmt: off
    def complete(self, prompt: _Prompt, max_new_tokens: int, sampling: Sampling, stop: _Stop, text: bool, json_schema: str | None = None, grammar: str | None = None) -> Completion: ...  # noqa: E501
    def stream(self, prompt: _Prompt, max_new_tokens: int, sampling: Sampling, stop: _Stop, json_schema: str | None = None, grammar: str | None = None) -> Stream: ...  # noqa: E501
    # fmt: on
    def reset(self) -> None: ...
    def save_state(self, path: str, prompt: _Prompt | None = None) -> int: ...
    def load_state(self, path: str) -> int: ...
    def session(self) -> Model: ...
    def held_prefix(self, ids: Sequence[int]) -> int: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def kv_dtype(self) -> str: ...
    def tokenize(self, text: str, add_bos: bool) -> list[int]: ...
    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...
    def logits(self, ids: Sequence[int]) -> tuple[bytearray, int, int]: ...
    def logprobs(self, ids: Sequence[int]) -> bytearray: ...
    @property
    def config_json(self) -> str: ...
    @property
    def max_inference_len(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def has_tokenizer(self) -> bool: ...
    @property
    def eos_token_ids(self) -> list[int]: ...
    @property
    def threads(self) -> int: ...
    @property
    def memory(self) -> dict[str, int]: ...
    @property
    def chat_template(self) -> str | None: ...

@final
class Stream:
    def __iter__(self) -> Stream: ...
    def __next__(self) -> str: ...
    @property
    def completion(self) -> Completion: ...

@final
class Batch:
    def __init__(self) -> None: ...
    def step(self, streams: Sequence[Stream]) -> list[str | None | BaseException]: ...

def load(
    path: str,
    max_inference_len: int | None,
    weights: str,
    threads: int | None,
    memory_limit: int | None,
    kv_dtype: str = "f32",
    progress: Callable[[int, int], object] | None = None,
    verify: bool = False,
    fast_lm_head: bool = False,
) -> Model: ...
def memory_plan(
    path: str,
    max_inference_len: int | None,
    weights: str,
    threads: int | None,
    sessions: int,
    kv_dtype: str = "f32",
    fast_lm_head: bool = False,
) -> dict[str, int]: ...
def pack(
    src: str,
    dst: str,
    weights: str,
    threads: int | None,
    progress: Callable[[int, int], object] | None,
) -> tuple[int, int]: ...
def verify(path: str, threads: int | None = None) -> tuple[int, int]: ...
def render_template(template: str, context: str) -> str: ...
def cpu_features() -> dict[str, Any]: ...
def inspect(path: str) -> dict[str, Any]: ...
def check_max_new_tokens(max_new_tokens: int) -> int: ...
def check_load_options(
    max_inference_len: int | None, weights: str, threads: int | None
) -> None: ...
