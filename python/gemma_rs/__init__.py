"""gemma_rs: Gemma 3 270M-class models on small CPUs, from Python.

>>> import gemma_rs
>>> model = gemma_rs.load("path/to/gemma-3-270m")          # doctest: +SKIP
>>> model.generate("The capital of France is", max_new_tokens=8)  # doctest: +SKIP
' the capital of the country of France.'

The weights, the KV cache, the tokenizer and the sampler live in Rust (``gemma_rs._gemma_rs``);
this module is the typed facade. Every call releases the GIL while it computes; calls on one
model are serialized (it has one KV cache).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

from . import _gemma_rs
from ._gemma_rs import Completion, GemmaError, Sampling, Stream, __version__

if TYPE_CHECKING:  # numpy is imported only where an array is returned
    from pathlib import Path

    import numpy as np

    from .chat import function_schema, render_chat
    from .tools import ParsedOutput, ToolCall, ToolChoice, parse_tool_calls

# Modules imported only where they are used (json, logging, pathlib, numpy): on a board every
# megabyte of the interpreter's own counts, and these are several.

__all__ = [
    "ChatResult",
    "Completion",
    "CpuFeatures",
    "GemmaError",
    "Model",
    "ModelInfo",
    "Session",
    "Sampling",
    "Stream",
    "TensorInfo",
    "__version__",
    "cpu_features",
    "inspect",
    "load",
    "memory_plan",
    "pack",
    "verify",
    "ChatStream",
    "ParsedOutput",
    "ToolCall",
    "function_schema",
    "parse_tool_calls",
    "render_chat",
]

# Chat and tool-call helpers live in submodules imported on first use (they import json, re and
# inspect, which a process that only generates text does not need).
_LAZY = {
    "render_chat": "chat",
    "function_schema": "chat",
    "parse_tool_calls": "tools",
    "ToolCall": "tools",
    "ParsedOutput": "tools",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


Prompt = Union[str, Sequence[int]]
Stop = Union[str, Sequence[str], None]
JsonSchema = Union[Mapping[str, Any], bool, str, None]
ChatFinishReason = Literal["eos", "stop", "length", "tool_calls"]


PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


def _path(path: Any, method: str, what: str = "path") -> str:
    """A path argument (``str``, ``bytes`` or ``os.PathLike``) as the ``str`` the extension
    takes; any other type is a ``TypeError`` naming ``method``."""
    try:
        return os.fsdecode(path)
    except TypeError:
        kind = type(path).__name__
        raise TypeError(
            f"{method}: {what} must be a str, bytes or os.PathLike, not {kind}"
        ) from None


def _schema_text(schema: JsonSchema) -> str | None:
    """A ``json_schema`` argument as JSON text (Rust parses and checks it)."""
    if schema is None or isinstance(schema, str):
        return schema
    if not isinstance(schema, (Mapping, bool)):
        kind = type(schema).__name__
        raise TypeError(f"json_schema must be a dict, a bool or JSON text, not {kind}")
    import json

    return json.dumps(schema)


@dataclass(frozen=True)
class ChatResult:
    """The result of :meth:`Model.chat`."""

    text: str
    """What is left for the user: the output without its function-call blocks."""
    tool_calls: list[ToolCall]
    """The function calls the model wrote, arguments as typed Python values."""
    finish_reason: ChatFinishReason
    """``"tool_calls"`` when the reply made calls (and did not run out of tokens); else ``"stop"``
    at a chat stop written as text (``<end_of_turn>``, ``<start_function_response>``), a caller's
    stop or the end of a ``json_schema`` document, ``"eos"`` at an end-of-sequence id (a GGUF's
    end-of-turn id is one), or ``"length"``."""
    raw: str
    """The generated text as the model wrote it (cut before the stop sequence)."""
    completion: Completion


_SAMPLING_DEFAULTS = {
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "seed": None,
}


def _sampling(sampling: Sampling | None, **options: Any) -> Sampling:
    """The options of a call: ``sampling`` as given, or a :class:`Sampling` of the keyword
    arguments (its constructor, in Rust, checks their types and ranges)."""
    if sampling is None:
        return Sampling(**options)
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a gemma_rs.Sampling, got {type(sampling).__name__}")
    given = [k for k, v in options.items() if v != _SAMPLING_DEFAULTS[k]]
    if given:
        raise TypeError(f"pass sampling= or the keyword arguments {given}, not both")
    return sampling


def _is_seq(x: Any) -> bool:
    return isinstance(x, Sequence) or (hasattr(x, "__iter__") and hasattr(x, "__len__"))


def _chat_result(c: Completion) -> ChatResult:
    """A chat turn's :class:`ChatResult` from its completion."""
    from .tools import parse_tool_calls

    parsed = parse_tool_calls(c.text)
    finish: ChatFinishReason = c.finish_reason
    if parsed.tool_calls and finish != "length":
        finish = "tool_calls"
    return ChatResult(
        text=parsed.text, tool_calls=parsed.tool_calls, finish_reason=finish, raw=c.text,
        completion=c,
    )  # fmt: skip


class ChatStream:
    """What :meth:`Model.chat_stream` returns: an iterator of the reply's text pieces as they
    are generated, without function-call blocks (their text is held back from the first ``<``
    that could begin one); :attr:`result` is the turn's :class:`ChatResult`."""

    def __init__(self, stream: Stream) -> None:
        from .tools import CallTextFilter

        self._stream = stream
        self._filter = CallTextFilter()
        self._result: ChatResult | None = None

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        while self._result is None:
            try:
                piece = next(self._stream)
            except StopIteration:
                self._result = _chat_result(self._stream.completion)
                tail = self._filter.end()
                if tail:
                    return tail
                break
            out = self._filter.feed(piece)
            if out:
                return out
        raise StopIteration

    @property
    def result(self) -> ChatResult:
        """The turn's :class:`ChatResult` (the rest of the reply is generated first if the
        stream was not exhausted)."""
        for _ in self:
            pass
        assert self._result is not None
        return self._result


class Model:
    """A loaded Gemma 3 model. Create it with :func:`load`."""

    def __init__(self, inner: _gemma_rs.Model, prompt_cache: Any = None) -> None:
        self._inner = inner
        self._config: dict | None = None
        self._prompt_cache = prompt_cache
        self._turn_id: int | None = -1
        self._controls: tuple[frozenset[str], frozenset[str]] | None = None
        self._chat_warned: set[str] = set()  # the warnings chat gave (once each)

    def _through_cache(self, prompt: Prompt) -> Prompt:
        """With a prompt cache: the prompt's ids, the model brought to the longest cached
        prefix of them, and the prefixes worth keeping saved (see :mod:`gemma_rs.prompt_cache`).
        A prompt that the call will refuse is passed through as given."""
        cache = self._prompt_cache
        if cache is None:
            return prompt
        vocab = self.vocab_size
        if isinstance(prompt, str):
            if not prompt or not self.has_tokenizer:
                return prompt
            ids = self.tokenize(prompt)
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and 0 <= t < vocab for t in prompt
        ):
            ids = list(prompt)
        else:
            return prompt
        if not 0 < len(ids) <= self.max_inference_len:
            return prompt
        if self._turn_id == -1:
            turn = self.tokenize("<start_of_turn>", add_bos=False) if self.has_tokenizer else []
            self._turn_id = turn[0] if len(turn) == 1 else None
        cache.prepare(self, ids, self._turn_id)
        return ids

    def __repr__(self) -> str:
        c = self.config
        return (
            f"<gemma_rs.Model {c.get('num_hidden_layers')} layers, hidden {c.get('hidden_size')}, "
            f"vocab {self.vocab_size}, max_inference_len {self.max_inference_len}>"
        )

    def complete(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Stop = None,
        sampling: Sampling | None = None,
        json_schema: JsonSchema = None,
        grammar: str | None = None,
    ) -> Completion:
        """Generates a continuation of ``prompt`` and reports how it went.

        ``prompt`` is a ``str`` (tokenized with BOS) or a list of token ids. The repetition
        penalty applies first; then ``temperature=0`` is greedy decoding, and otherwise tokens
        are sampled after temperature, top-k, top-p and min-p, in that order (as transformers
        does). Generation stops at an end-of-sequence id, a ``stop`` string, ``max_new_tokens``,
        or when the sequence reaches ``max_inference_len``. A prompt longer than
        ``max_inference_len`` is a ``ValueError``. Without a tokenizer, ``prompt`` must be ids
        and ``text`` is empty. ``sampling`` gives the sampling options as one
        :class:`Sampling` instead of keyword arguments.

        ``json_schema`` (a dict, or its JSON text) constrains the output to one JSON document valid
        for it; ``grammar`` to the language of a Lark grammar (llguidance's dialect: ``start`` is
        the top rule, ``<name>`` a special token, ``%json {...}`` a nested schema). At each step
        only tokens that keep the output inside the language can be chosen (masked before
        temperature, top-k and top-p); the generation ends (``finish_reason`` ``"stop"``) when
        the document is complete, or at an end-of-sequence id once it may end. A malformed or
        unsupported schema or grammar, or one that matches no text, is a ``ValueError`` before
        anything is generated. An unbounded language can still run into ``max_new_tokens``
        (``"length"``): bound strings and arrays (``maxLength``, ``maxItems``) where it matters.
        """
        s = _sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                      repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
        prompt = self._through_cache(prompt)
        schema = _schema_text(json_schema)
        return self._inner.complete(prompt, max_new_tokens, s, stop, False, schema, grammar)

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Stop = None,
        sampling: Sampling | None = None,
        json_schema: JsonSchema = None,
        grammar: str | None = None,
    ) -> str:
        """The text of :meth:`complete` (same arguments); needs the tokenizer."""
        s = _sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                      repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
        prompt = self._through_cache(prompt)
        schema = _schema_text(json_schema)
        return self._inner.complete(prompt, max_new_tokens, s, stop, True, schema, grammar).text

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Stop = None,
        sampling: Sampling | None = None,
        json_schema: JsonSchema = None,
        grammar: str | None = None,
    ) -> Stream:
        """Like :meth:`generate`, as an iterator of text pieces; after it is exhausted, its
        ``completion`` is the :class:`Completion` that :meth:`complete` would have returned."""
        s = _sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                      repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
        prompt = self._through_cache(prompt)
        schema = _schema_text(json_schema)
        return self._inner.stream(prompt, max_new_tokens, s, stop, schema, grammar)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Any] | None = None,
        *,
        tool_choice: ToolChoice = "auto",
        parallel_tool_calls: bool = True,
        json_schema: JsonSchema = None,
        add_generation_prompt: bool = True,
        stop: Stop = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        sampling: Sampling | None = None,
    ) -> ChatResult:
        """One model turn of a chat: renders ``messages`` (and ``tools``: OpenAI-style dicts,
        bare ``{name, description, parameters}`` dicts or Python functions) as a prompt,
        generates until the turn ends, and parses the function calls out of the output.

        ``messages`` is a non-empty list of ``{"role": ..., "content": ...}`` dicts (roles
        ``system``, ``developer``, ``user``, ``assistant``, ``model``, ``tool``; an assistant
        message may carry ``tool_calls`` instead of content): anything else is a ``TypeError`` or
        ``ValueError`` naming the message, before any work.

        The prompt is the model's own chat template when its files have one
        (:attr:`chat_template`, rendered as transformers' ``apply_chat_template`` would), else
        :func:`render_chat` (FunctionGemma's format). ``max_new_tokens`` and the sampling options
        are :meth:`complete`'s. A model with neither a chat template nor FunctionGemma's control
        tokens is a pretrained base model, which continues text instead of answering: the first
        chat warns so (load an instruction-tuned or FunctionGemma checkpoint for chat). A
        tokenizer without the control tokens still gets the tool prompt, with a warning.

        With ``tools``, the reply is constrained (:func:`gemma_rs.tools.tool_grammar`) so that
        every call is valid: FunctionGemma's call syntax, a declared tool, arguments that satisfy
        its ``parameters`` schema. ``tool_choice``: ``"auto"`` (text, calls or both),
        ``"required"`` (one or more calls), ``"none"`` (text; no call can start), or a tool's
        name (or ``{"type": "function", "function": {"name": ...}}``: one call of that tool).
        ``parallel_tool_calls=False`` allows one call. The turn ends after its calls
        (``finish_reason`` ``"tool_calls"``: the application runs them and sends the results
        back as ``{"role": "tool", ...}`` messages). A schema that cannot be enforced or an
        undeclared name is a ``ValueError`` before generation.

        Without tools, ``json_schema`` constrains the reply to one JSON document valid for it
        (see :meth:`complete`). Unconstrained, generation stops at ``<end_of_turn>`` or
        ``<start_function_response>`` written as text, at end-of-sequence, or at ``stop``.
        A conversation that leaves no room to generate within ``max_inference_len`` is a
        ``ValueError`` (drop its oldest turns: :func:`gemma_rs.chat.trim_history`).
        """
        ids, options = self._chat_request(
            "chat", messages, tools, tool_choice, parallel_tool_calls, json_schema,
            add_generation_prompt, stop, sampling, temperature, top_k, top_p, min_p,
            repetition_penalty, seed,
        )  # fmt: skip
        return _chat_result(self.complete(ids, max_new_tokens, **options))

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Any] | None = None,
        *,
        tool_choice: ToolChoice = "auto",
        parallel_tool_calls: bool = True,
        json_schema: JsonSchema = None,
        add_generation_prompt: bool = True,
        stop: Stop = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        sampling: Sampling | None = None,
    ) -> ChatStream:
        """:meth:`chat` as it is generated: a :class:`ChatStream` that yields the reply's text
        in pieces as the tokens come (function-call blocks left out), and whose ``result``, once
        it is exhausted, is the :class:`ChatResult` that :meth:`chat` would have returned (same
        arguments, same checks, made before the first piece)."""
        ids, options = self._chat_request(
            "chat_stream", messages, tools, tool_choice, parallel_tool_calls, json_schema,
            add_generation_prompt, stop, sampling, temperature, top_k, top_p, min_p,
            repetition_penalty, seed,
        )  # fmt: skip
        return ChatStream(self.stream(ids, max_new_tokens, **options))

    def _chat_request(
        self,
        method: str,
        messages: Any,
        tools: Any,
        tool_choice: Any,
        parallel_tool_calls: Any,
        json_schema: JsonSchema,
        add_generation_prompt: bool,
        stop: Stop,
        sampling: Sampling | None,
        *sampling_options: Any,
    ) -> tuple[list[int], dict[str, Any]]:
        """The prompt ids and :meth:`complete`'s options of a chat turn, every argument checked
        first (errors name ``Model.<method>()``)."""
        from . import tools as _tools
        from .chat import check_messages, normalize_tools

        where = f"{type(self).__name__}.{method}()"
        temperature, top_k, top_p, min_p, repetition_penalty, seed = sampling_options
        s = _sampling(sampling, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                      repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
        check_messages(messages, where)
        if tools is not None and (isinstance(tools, (str, bytes, Mapping)) or not _is_seq(tools)):
            raise TypeError(f"{where}: tools must be a list of tools, not {type(tools).__name__}")
        try:
            declared = normalize_tools(tools)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: tools: {e}") from None
        if not isinstance(parallel_tool_calls, bool):
            raise TypeError(f"{where}: parallel_tool_calls must be a bool")
        grammar = None
        if tools or tool_choice not in ("auto", "none"):  # without tools, "required" is an error
            if json_schema is not None:
                raise ValueError(
                    f"{where}: json_schema constrains a reply without tools: pass one of them"
                )
            grammar = _tools.tool_grammar(
                declared, tool_choice, parallel_tool_calls, self._special_controls()
            )
        self._warn_if_not_for_chat(bool(tools))
        ids = self.chat_prompt(messages, tools, add_generation_prompt=add_generation_prompt)
        # A constrained reply never contains these texts (and a stop could cut a call).
        stops = [] if grammar is not None else [_tools.RESPONSE_START, "<end_of_turn>"]
        if isinstance(stop, str):
            stops.append(stop)
        elif stop is not None:
            stops.extend(stop)
        options = dict(stop=stops, sampling=s, json_schema=json_schema, grammar=grammar)
        return ids, options

    def _warn_if_not_for_chat(self, with_tools: bool) -> None:
        """Warns, once per model and kind, that the model is a base model (no chat template,
        no FunctionGemma control tokens), or that tools meet a tokenizer without the control
        tokens."""
        from . import tools as _tools

        single = self._control_tokens()[0]
        missing = [t for t in _tools.CONTROL_TOKENS if t not in single]
        lacks = (
            f"this tokenizer lacks FunctionGemma's control tokens {missing}: the tools are "
            "declared in ordinary tokens, and only a FunctionGemma checkpoint is trained to "
            "call them"
        )
        parts = []
        if self.chat_template is None and len(missing) == len(_tools.CONTROL_TOKENS):
            if "base" not in self._chat_warned:
                parts.append(
                    "this model has no chat template and none of FunctionGemma's control "
                    "tokens: it is a pretrained base model, which continues the conversation's "
                    "text instead of answering it. For chat, load an instruction-tuned "
                    "checkpoint (gemma-3-270m-it) or FunctionGemma"
                )
                self._chat_warned.add("base")
        if with_tools and missing and "tools" not in self._chat_warned:
            parts.append(lacks)
            self._chat_warned.add("tools")
        if parts:
            import warnings

            warnings.warn("; ".join(parts), stacklevel=4)

    def _control_tokens(self) -> tuple[frozenset[str], frozenset[str]]:
        """FunctionGemma's control tokens that this tokenizer has as single tokens, and those of
        them that are special tokens (found once per model)."""
        from .tools import CONTROL_TOKENS

        if self._controls is None:
            ids = {t: self.tokenize(t, add_bos=False) for t in CONTROL_TOKENS}
            single = frozenset(t for t, i in ids.items() if len(i) == 1)
            special = frozenset(t for t in single if self.detokenize(ids[t], True) == "")
            self._controls = (single, special)
        return self._controls

    def _special_controls(self) -> frozenset[str]:
        """FunctionGemma's control tokens that this tokenizer has as single special tokens."""
        return self._control_tokens()[1]

    def chat_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Any] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """The token ids :meth:`chat` prefills for ``messages`` and ``tools`` (BOS first).

        The ids of the leading turns are a prefix of a longer chat's, so that the state of a
        system and tool-declaration turn can be saved once and serves every later request::

            prefix = model.chat_prompt([system], tools, add_generation_prompt=False)
            model.save_state("tools.state", prefix)
        """
        from . import chat as _chat

        template = self.chat_template
        if template is None:
            return self.tokenize(_chat.render_chat(messages, tools, add_generation_prompt))
        import json

        schemas = _chat.normalize_tools(tools or [])
        bos = self.config.get("bos_token_id")
        # Chat templates read tool calls in the OpenAI form (transformers passes them so).
        msgs = [
            {**m, "tool_calls": _chat.tool_calls_openai(m["tool_calls"])}
            if m.get("tool_calls")
            else dict(m)
            for m in messages
        ]
        context = {
            "messages": msgs,
            "tools": [{"type": "function", "function": t} for t in schemas] or None,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.detokenize([bos]) if isinstance(bos, int) else "<bos>",
            "eos_token": self.detokenize(self.eos_token_ids[:1]) if self.eos_token_ids else "",
        }
        text = _gemma_rs.render_template(template, json.dumps(context, ensure_ascii=False))
        return self.tokenize(text, add_bos=False)

    @property
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template (tokenizer_config.json's ``chat_template`` or a
        GGUF's ``tokenizer.chat_template``), or None."""
        return self._inner.chat_template

    def reset(self) -> None:
        """Forgets the cached sequence, so the next call computes its whole prompt. (A call
        whose prompt starts with the previous call's tokens otherwise reuses their KV cache:
        ``Completion.reused_tokens``.)"""
        self._inner.reset()

    def save_state(self, path: str | os.PathLike[str], prompt: Prompt | None = None) -> int:
        """Writes the KV cache of the tokens the model holds to ``path`` and returns their
        count; with ``prompt`` (a ``str``, tokenized with BOS, or ids), first makes the model
        hold exactly that prompt, prefilling only what its cache lacks.

        The file (format: docs/STATE_FORMAT.md) holds the live cache only (about 2 KiB per
        token for Gemma 3 270M, the sliding layers at most their window), the token ids and a
        fingerprint of this model as loaded; no logits. It is written to a temporary file and
        renamed, so readers never see a partial file. x86_64 and aarch64 hosts read each other's
        files.
        """
        return self._inner.save_state(_path(path, f"{type(self).__name__}.save_state()"), prompt)

    def load_state(self, path: str | os.PathLike[str]) -> int:
        """Restores a file written by :meth:`save_state` and returns its token count; the next
        call whose prompt starts with those tokens reuses them (``Completion.reused_tokens``;
        the last prompt token is always recomputed). A file that is empty, truncated, damaged,
        of another model (or of this one loaded with other ``weights`` or ``kv_dtype``) or
        longer than ``max_inference_len`` raises :class:`GemmaError` saying which; one refused
        by its header leaves the model as it was, one damaged in its data leaves it holding
        nothing."""
        return self._inner.load_state(_path(path, f"{type(self).__name__}.load_state()"))

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, as transformers gives them. Special tokens written in the
        text (``<start_of_turn>``) are parsed as such."""
        return self._inner.tokenize(text, add_bos)

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; invalid UTF-8 from byte tokens becomes U+FFFD."""
        return self._inner.detokenize(ids, skip_special_tokens)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Float32 logits of shape ``(len(ids), vocab_size)`` from a fresh forward pass."""
        import numpy as np

        buf, rows, vocab = self._inner.logits(ids)
        return np.frombuffer(buf, dtype=np.float32).reshape(rows, vocab)

    def logprobs(self, ids: Sequence[int]) -> np.ndarray:
        """``log p(ids[i] | ids[:i])`` for ``i`` in ``1..len(ids)``: shape ``(len(ids) - 1,)``,
        teacher-forced, without materialising all logits at once."""
        import numpy as np

        return np.frombuffer(self._inner.logprobs(ids), dtype=np.float32)

    @property
    def config(self) -> dict:
        """config.json as read (the ``text_config`` of a multimodal config), or built from a
        GGUF's ``gemma3.*`` metadata."""
        if self._config is None:
            import json

            self._config = json.loads(self._inner.config_json)
        return self._config

    @property
    def max_inference_len(self) -> int:
        """The most tokens (prompt + generated) one sequence may hold."""
        return self._inner.max_inference_len

    @property
    def vocab_size(self) -> int:
        return self._inner.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation (generation_config.json, else config.json; for a GGUF, its
        eos and eot ids)."""
        return self._inner.eos_token_ids

    @property
    def threads(self) -> int:
        return self._inner.threads

    @property
    def has_tokenizer(self) -> bool:
        """False when the model has no tokenizer (no tokenizer.json and, for a GGUF, no
        ``tokenizer.ggml.*`` metadata): text methods then raise."""
        return self._inner.has_tokenizer

    @property
    def memory(self) -> dict[str, int]:
        """Bytes held: ``weights``, ``kv_cache``, ``scratch`` (activations) and ``tokenizer``;
        ``kv_cache`` and ``scratch`` of the model's own session and of every :meth:`session`
        alive."""
        return self._inner.memory

    @property
    def kv_dtype(self) -> str:
        """``"f32"`` or ``"f16"``: how the KV caches hold keys and values (``load``'s choice)."""
        return self._inner.kv_dtype

    def session(self) -> Session:
        """A new session over the same weights (never a copy of them): an object with this
        class's generation, chat and state methods and its own KV cache and scratch (its cost:
        ``memory_plan(..., sessions=2)`` minus ``sessions=1``), starting empty. Its prefix reuse
        and saved state are its own. Sessions may be used from different Python threads at once
        (the GIL is released while they compute; their kernel jobs take turns on the model's
        threads); calls on one session or model from several threads wait for each other."""
        return Session(self._inner.session(), self._prompt_cache)


class Session(Model):
    """A session of a :class:`Model` (see :meth:`Model.session`): the same methods, its own
    KV cache. It keeps the weights alive; dropping it frees its cache."""

    def __repr__(self) -> str:
        return "<gemma_rs.Session of " + super().__repr__()[1:]


def load(
    path: str | os.PathLike[str],
    max_inference_len: int | None = None,
    *,
    weights: Literal["stored", "q8_0", "q4_k_m", "q4_0", "bf16", "f32"] = "stored",
    threads: int | None = None,
    memory_limit: int | None = None,
    progress: bool | Callable[[int, int], object] | None = None,
    prompt_cache: str | os.PathLike[str] | None = None,
    prompt_cache_bytes: int = 1 << 30,
    kv_dtype: Literal["f32", "f16"] = "f32",
    verify: bool = False,
    fast_lm_head: bool = False,
) -> Model:
    """Loads a Gemma 3 model: a Hugging Face directory or a GGUF file.

    ``path`` is a directory holding config.json, model.safetensors (or a sharded
    model.safetensors.index.json) and optionally tokenizer.json and generation_config.json; or a
    ``.gguf`` file (llama.cpp's format: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K
    and Q6_K tensors), or a directory holding one GGUF and no safetensors. A GGUF's tokenizer
    comes from its metadata unless a tokenizer.json lies beside it. A GGUF's quantized blocks
    are never requantized: they are regrouped for the matrix kernels.

    ``max_inference_len`` caps prompt + generated tokens of one sequence; the KV cache is sized
    from it once, here. ``None`` means ``min(max_position_embeddings, 4096)``.

    ``weights`` is how the matmul weights are held: ``"stored"`` (the default, as llama.cpp
    does) keeps each matrix of a GGUF in its stored type when the kernels multiply that type
    natively — Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K and Q8_0 — and holds any other (f32,
    f16, bf16: every Hugging Face checkpoint) as Q8_0; ``"q8_0"`` holds every matrix as GGML
    Q8_0 blocks (quantized at load unless the file holds them already: about a quarter of f32;
    a low-bit GGUF is widened exactly, then quantized); ``"bf16"`` (half of f32) or ``"f32"``
    (exact to the checkpoint). ``threads`` is the number of worker threads (``None``: every
    CPU this process may use).

    ``memory_limit`` (bytes): when :func:`memory_plan` says the model would hold more, loading
    stops before reading any weight with a ``MemoryError`` that gives the plan.

    ``progress``: ``None`` or ``False`` shows nothing, ``True`` a progress line on stderr when
    it is a terminal; a callable gets ``(done, total)`` bytes of tensor data after each tensor
    (an exception it raises stops loading). When the application uses :mod:`logging`, the
    ``gemma_rs`` logger gets the load (INFO) and its progress (DEBUG, every 10%).

    ``kv_dtype``: ``"f32"`` (exact) or ``"f16"``: keys and values held as IEEE halves, which
    halves the KV cache and its state files; the logits move by about a hundredth (README,
    "Memory").

    ``prompt_cache``: a directory (created if missing) where the state of prompt prefixes worth
    keeping — a chat's first turn (system and tool declarations), long prompts — is saved and
    restored by later calls and later processes, so that they do not prefill them again; the
    least recently used entries go first beyond ``prompt_cache_bytes`` (default 1 GiB).
    Processes may share the directory. See :mod:`gemma_rs.prompt_cache`.

    ``verify=True`` first checks the digests that :func:`pack` writes into a GGUF (see
    :func:`verify`; about 0.05 s for Gemma 3 270M here): a damaged file, or one without digests,
    raises :class:`GemmaError` instead of loading.

    ``fast_lm_head=True`` (when the tied embedding / lm_head is held as Q8_0; off by default):
    greedy tokens, and top-k sampling with ``top_k <= 64``, are decided from a 6-bit shadow of
    the head and an error bound per row, which leave about a hundred rows to score exactly; the
    token is the one the full head's logits give (its argmax, or the same seeded draw), while
    about 245 MB of weights are read per greedy token instead of 285 MB for Gemma 3 270M
    (decode 1.11× in one run on an Intel Xeon, ``bench/fast_head.py``). When more than 4096 rows
    could still be chosen, the full head runs. The shadow is held besides (+137 MB in
    ``memory["weights"]``, about 2 s more to load), hence off by default. Sampling otherwise,
    ``logits()`` and ``logprobs()`` always use the full head. ``Completion.fast_head_tokens``,
    ``fast_head_fallbacks`` and ``fast_head_candidates`` count its work.

    ``path`` (and ``prompt_cache``) may be ``str``, ``bytes`` or ``os.PathLike``.

    Raises ``FileNotFoundError`` for a missing path, ``ValueError`` for bad arguments,
    ``MemoryError`` above ``memory_limit`` and :class:`GemmaError` for a malformed model.
    """
    cache = None
    if prompt_cache is not None:
        from .prompt_cache import PromptCache

        directory = _path(prompt_cache, "gemma_rs.load()", "prompt_cache")
        cache = PromptCache(directory, prompt_cache_bytes)  # checked before loading
    path = _path(path, "gemma_rs.load()")
    for name, flag in (("verify", verify), ("fast_lm_head", fast_lm_head)):
        if not isinstance(flag, bool):
            raise TypeError(f"gemma_rs.load(): {name} must be a bool, not {type(flag).__name__}")
    what = f"loading {path}"
    report = _Progress(what, progress if progress is not None else False)
    start = time.perf_counter()
    try:
        inner = _gemma_rs.load(
            path,
            max_inference_len,
            weights,
            threads,
            memory_limit,
            kv_dtype,
            report.callback(),
            verify,
            fast_lm_head,
        )
    finally:
        report.close()
    if cache is not None:
        cache.fingerprint = inner.fingerprint
    model = Model(inner, cache)
    log = _logger()
    if log is not None:
        mem = model.memory
        log.info(
            "loaded %s in %.2f s: %s weights %.1f MB, KV cache %.1f MB (max_inference_len %d), "
            "%d threads",
            path,
            time.perf_counter() - start,
            weights,
            mem["weights"] / 1e6,
            mem["kv_cache"] / 1e6,
            model.max_inference_len,
            model.threads,
        )
    return model


def _logger() -> Any:
    """The ``gemma_rs`` logger when the application has imported :mod:`logging` (nothing else
    could be listening; importing it here would cost a board 1.6 MB), else None."""
    logging = sys.modules.get("logging")
    return None if logging is None else logging.getLogger("gemma_rs")


class _Progress:
    """What a long job reports: a callable of the caller's, a progress line on a terminal
    (``True``), and DEBUG records on the ``gemma_rs`` logger every 10%."""

    def __init__(self, what: str, progress: bool | Callable[[int, int], object]) -> None:
        if not (isinstance(progress, bool) or callable(progress)):
            raise TypeError(
                f"progress must be a bool, None or a callable, got {type(progress).__name__}"
            )
        self.what = what
        self.user = progress if callable(progress) else None
        self.line = _ProgressLine(what) if progress is True and sys.stderr.isatty() else None
        log = _logger()
        self.log = log if log is not None and log.isEnabledFor(10) else None  # DEBUG
        self.logged = -1

    def callback(self) -> Callable[[int, int], object] | None:
        """None when nobody listens: the Rust side then never takes the GIL to report."""
        return self if self.user or self.line or self.log else None

    def __call__(self, done: int, total: int) -> None:
        if self.user is not None:
            self.user(done, total)
        if self.line is not None:
            self.line(done, total)
        if self.log is not None:
            tenth = 10 * done // max(total, 1)
            if tenth > self.logged:
                self.logged = tenth
                self.log.debug(
                    "%s: %d%% (%.0f / %.0f MB)", self.what, 10 * tenth, done / 1e6, total / 1e6
                )

    def close(self) -> None:
        if self.line is not None:
            self.line.close()


def memory_plan(
    path: str | os.PathLike[str],
    max_inference_len: int | None = None,
    weights: Literal["stored", "q8_0", "q4_k_m", "q4_0", "bf16", "f32"] = "stored",
    *,
    threads: int | None = None,
    sessions: int = 1,
    kv_dtype: Literal["f32", "f16"] = "f32",
    fast_lm_head: bool = False,
) -> dict[str, int]:
    """The bytes :func:`load` with these arguments would hold — ``weights``, ``kv_cache``,
    ``scratch`` and ``tokenizer``, equal to ``Model.memory`` after loading — computed from the
    config and the tensors' shapes and types, without reading the weights (the tokenizer is
    built, a fraction of a second). ``sum(plan.values())`` is what ``memory_limit`` checks.
    ``sessions`` counts the model's own session and its :meth:`Model.session` objects alive:
    each adds a KV cache and a scratch, never weights."""
    return _gemma_rs.memory_plan(
        _path(path, "gemma_rs.memory_plan()"), max_inference_len, weights, threads, sessions,
        kv_dtype, fast_lm_head,
    )  # fmt: skip


@dataclass(frozen=True)
class CpuFeatures:
    """What :func:`cpu_features` reports."""

    arch: str
    """``"x86_64"``, ``"aarch64"``, ..."""
    features: tuple[str, ...]
    """The CPU features the Q8_0 kernels are chosen by, as detected at run time: ``avx2``,
    ``fma``, ``f16c``, ``avx512vnni``, ``avx512vl``, ``avx512f``, ``avx512bw``, ``avxvnni`` on
    x86_64; ``neon``, ``dotprod``, ``i8mm`` on aarch64."""
    kernels: tuple[str, ...]
    """The Q8_0 kernels this CPU runs, fastest first; ``"scalar"`` is always last."""
    kernel: str
    """The kernel every model of this process uses: the first of ``kernels``, or the one named by
    the environment variable ``GEMMA_RS_KERNEL`` when this CPU runs it (read once)."""
    low_bit_kernels: tuple[str, ...] = ()
    """The kernels of the low-bit types (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), fastest
    first; ``"scalar"`` is always last."""
    low_bit_kernel: str = "scalar"
    """The low-bit kernel every model uses: the one named as ``kernel`` when there is one, else
    the first of ``low_bit_kernels``."""


def cpu_features() -> CpuFeatures:
    """The CPU as the Q8_0 matrix products see it, and the kernel they use.

    >>> f = cpu_features()
    >>> f.kernel in f.kernels and f.kernels[-1] == "scalar"
    True
    """
    f = _gemma_rs.cpu_features()
    return CpuFeatures(
        f["arch"],
        tuple(f["features"]),
        tuple(f["kernels"]),
        f["kernel"],
        tuple(f["low_bit_kernels"]),
        f["low_bit_kernel"],
    )


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a model file, as :func:`inspect` lists it."""

    name: str
    """Its name in the file (GGUF or Hugging Face)."""
    type: str
    """Its ggml type as stored: ``"Q8_0"``, ``"F32"``, ``"BF16"``, ``"Q4_K"``, ..."""
    shape: tuple[int, ...]
    """Outermost dimension first."""
    bytes: int


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`inspect` reads from a model's files, without loading its weights."""

    path: str
    format: str
    """``"GGUF v3"``, ``"safetensors"``, ..."""
    config: dict
    """config.json as read, or as built from a GGUF's ``gemma3.*`` metadata."""
    tensors: tuple[TensorInfo, ...]
    """The tensors a Gemma 3 model uses, in load order."""
    vocab_size: int | None
    """The tokenizer's size, None without a tokenizer."""
    has_chat_template: bool
    eos_token_ids: tuple[int, ...]
    default_max_inference_len: int
    """What ``load(path)`` sizes the KV cache for when not told."""


def inspect(path: str | os.PathLike[str]) -> ModelInfo:
    """A model's config, tensors (names, types, shapes, bytes), tokenizer size, chat template
    and end-of-sequence ids, read from its files without loading its weights."""
    import json

    path = _path(path, "gemma_rs.inspect()")
    d = _gemma_rs.inspect(path)
    tensors = tuple(TensorInfo(n, t, tuple(shape), b) for n, t, shape, b in d["tensors"])
    return ModelInfo(
        path=path,
        format=d["format"],
        config=json.loads(d["config_json"]),
        tensors=tensors,
        vocab_size=d["vocab"],
        has_chat_template=d["chat_template"],
        eos_token_ids=tuple(d["eos_token_ids"]),
        default_max_inference_len=d["default_max_inference_len"],
    )


def pack(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    weights: Literal["q8_0", "q4_k_m", "q4_0", "bf16", "f32"] = "q8_0",
    *,
    threads: int | None = None,
    progress: bool | Callable[[int, int], object] | None = None,
) -> Path:
    """Writes the model at ``src`` (a Hugging Face directory or a GGUF file) to ``dst`` as a
    GGUF file that gemma_rs loads without quantizing and llama.cpp loads too.

    Matrices are stored as ``weights`` (Q8_0 by default, quantized exactly as :func:`load`
    quantizes, so the packed file and its source, both loaded with ``weights="q8_0"``, give the
    same logits to the bit); ``"q4_k_m"`` writes llama.cpp's Q4_K_M mix (Q4_K, Q6_K for some
    ``attn_v`` and ``ffn_down``, Q5_0 and Q8_0 where rows are not whole super-blocks; blocks the
    source holds in the wanted type are copied), ``"q4_0"`` Q4_0 (the tied embedding Q8_0 in
    both, as llama.cpp keeps its output matrix); norms as F32
    ``1 + w`` (GGUF's convention for Gemma), with llama.cpp's ``gemma3.*`` metadata, the
    tokenizer and the chat template when the source has them, and a digest of the header and of
    every tensor (:func:`verify` checks them). The file is written to ``dst + ".partial"`` and
    renamed when complete; ``dst`` may not be ``src`` (a ``ValueError``).

    ``progress``: ``None`` or ``True`` shows a progress line on stderr when it is a terminal,
    ``False`` never; a callable gets ``(done, total)`` source bytes instead. An exception it
    raises (or Ctrl-C) stops packing; the partial file is removed on any failure. The start and
    the result (tensors, MB, seconds) are logged (INFO) to the ``gemma_rs`` logger, the progress
    (DEBUG) every 10%, when the application uses :mod:`logging`.
    Returns ``Path(dst)``.
    """
    from pathlib import Path

    src, dst = _path(src, "gemma_rs.pack()", "src"), _path(dst, "gemma_rs.pack()", "dst")
    log = _logger()
    report = _Progress(f"packing {src}", True if progress is None else progress)
    start = time.perf_counter()
    if log is not None:
        log.info("packing %s into %s (%s)", src, dst, weights)
    try:
        nbytes, tensors = _gemma_rs.pack(src, dst, weights, threads, report.callback())
    finally:
        report.close()
    if log is not None:
        seconds = time.perf_counter() - start
        log.info("wrote %s: %d tensors, %.1f MB in %.1f s", dst, tensors, nbytes / 1e6, seconds)
    return Path(dst)


def verify(path: PathArg, *, threads: int | None = None) -> int:
    """Checks a GGUF file written by :func:`pack` (or ``gemma-rs pack``) against the digests it
    holds: one of the header and one of each tensor's bytes (64-bit, not cryptographic; they
    catch damage such as bits flipped on an SD card, not forgery). Returns the number of tensors
    checked. A damaged file raises :class:`GemmaError` naming the header or the first damaged
    tensor; a file without digests (not written by ``pack``: neither GGUF nor safetensors has
    checksums of its own) raises :class:`GemmaError` too. Reads the file once, at memory speed
    (0.05 s for the 292 MB Gemma 3 270M Q8_0 file here); ``load(path, verify=True)`` does the
    same before loading."""
    tensors, _ = _gemma_rs.verify(_path(path, "gemma_rs.verify()"), threads)
    return tensors


class _ProgressLine:
    """A one-line progress display on stderr, redrawn at most ten times a second."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        self.drawn = True
        pct = 100 * done // max(total, 1)
        sys.stderr.write(f"\r{self.what}: {pct:3d}% ({done / 1e6:.0f} / {total / 1e6:.0f} MB)")
        sys.stderr.flush()

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
