"""``gemma-rs serve``: the OpenAI API over HTTP, for apps and agents in other processes.

    gemma-rs serve [MODEL] --host 127.0.0.1 --port 8080 --parallel 4

Endpoints: ``POST /v1/chat/completions`` (tools, ``tool_choice``, ``response_format``, streamed
or not), ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``. It runs on Starlette and
uvicorn (``pip install 'gemma-rs[serve]'``).

How it works: ``--parallel N`` slots, each a session (its own KV cache) over the one copy of the
weights. A request goes to the free slot whose cached tokens share the longest prefix with its
prompt; when every slot is busy it waits in a queue of ``--queue`` requests, and beyond that is
answered 503 with ``Retry-After``. One worker thread steps every running generation together
(:class:`gemma_rs._gemma_rs.Batch`: their decode steps share one pass over the weights) without
the GIL, and hands each piece of text to the event loop, which writes it to its client. A client
that goes away cancels its generation and frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gemma_rs

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger("gemma_rs.serve")

#: The environment variable that gives the API key when ``--api-key`` does not.
API_KEY_ENV = "GEMMA_RS_API_KEY"
#: ``max_tokens`` of a completion that names none (OpenAI's default for /v1/completions).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Limits:
    """What the server accepts: body bytes, ``max_tokens``, and waiting requests."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 2048
    queue: int = 16


class ApiError(Exception):
    """A request the API refuses: its HTTP status and OpenAI's ``{"error": {...}}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def response(self) -> Response:
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# ----------------------------------------------------------------------------------------------
# Requests: the JSON body checked into what a generation needs


@dataclass
class Job:
    """One request's generation: what the worker starts, and the queue its events go to."""

    kind: str  # "chat" or "completion"
    ids: list[int]
    max_tokens: int
    options: dict[str, Any]
    # Made on the event loop's thread by the handler (an asyncio.Queue binds to its loop).
    loop: Any = None
    events: Any = None
    cancelled: bool = False
    slot: int | None = None
    stream: Any = None  # the gemma_rs Stream, while it runs

    def send(self, kind: str, value: Any) -> None:
        """From the worker thread: an event for the request's handler."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


def _field(body: Mapping[str, Any], name: str, types: Any, what: str, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python: a number field refuses it explicitly.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise ApiError(400, f"'{name}' must be {what}, not {json.dumps(value)[:60]}", param=name)
    return value


def _tuple(types: Any) -> tuple[Any, ...]:
    return types if isinstance(types, tuple) else (types,)


def _sampling(body: Mapping[str, Any]) -> gemma_rs.Sampling:
    temperature = _field(body, "temperature", (int, float), "a number from 0 to 2", 1.0)
    top_p = _field(body, "top_p", (int, float), "a number in (0, 1]", 1.0)
    seed = _field(body, "seed", int, "an integer")
    if not 0 <= temperature <= 2:
        raise ApiError(
            400, f"'temperature' must be from 0 to 2, not {temperature}", param="temperature"
        )
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], not {top_p}", param="top_p")
    try:
        return gemma_rs.Sampling(temperature=float(temperature), top_p=float(top_p), seed=seed)
    except (ValueError, TypeError, OverflowError) as e:
        raise ApiError(400, str(e)) from None


def _max_tokens(body: Mapping[str, Any], limits: Limits, default: int) -> int:
    names = [n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None]
    if not names:
        return default
    name = names[0]
    n = _field(body, name, int, "a positive integer")
    if n < 1:
        raise ApiError(400, f"'{name}' must be at least 1, not {n}", param=name)
    if n > limits.max_tokens:
        raise ApiError(
            400, f"'{name}' is {n}, above this server's limit ({limits.max_tokens})", param=name
        )
    return n


def _stop(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    if len(stop) > 4:
        raise ApiError(400, "'stop' takes at most 4 strings", param="stop")
    return stop


def _common(body: Mapping[str, Any], model_id: str) -> None:
    """Checks what every generation request shares: the model, n and stream."""
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required: a model id from GET /v1/models", param="model")
    if model != model_id:
        raise ApiError(
            404,
            f"The model '{model}' does not exist; this server serves '{model_id}'",
            param="model",
            code="model_not_found",
        )
    if _field(body, "n", int, "an integer", 1) != 1:
        raise ApiError(400, "'n' must be 1: one choice per request", param="n")
    _field(body, "stream", bool, "a boolean")
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "'logprobs' is not supported", param="logprobs")


def _response_format(body: Mapping[str, Any]) -> Any:
    """The JSON Schema of ``response_format`` (None for text)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, Mapping) or not isinstance(rf.get("type"), str):
        raise ApiError(
            400, "'response_format' must be an object with a 'type'", param="response_format"
        )
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), (Mapping, bool)):
            raise ApiError(
                400,
                "'response_format.json_schema' must be an object with a 'schema'",
                param="response_format",
            )
        return spec.get("schema", {})
    raise ApiError(
        400,
        f"'response_format.type' must be text, json_object or json_schema, not {kind!r}",
        param="response_format",
    )


def _tools(body: Mapping[str, Any]) -> tuple[Any, Any, bool]:
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list of tools", param="tools")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto"
    parallel = _field(body, "parallel_tool_calls", bool, "a boolean", True)
    return tools or None, choice, parallel


def chat_job(model: gemma_rs.Model, body: Mapping[str, Any], limits: Limits) -> Job:
    """The job of a chat completion request (the prompt rendered and tokenized, the tool
    grammar built): every check made, an :class:`ApiError` for the first that fails."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of messages", param="messages")
    tools, choice, parallel = _tools(body)
    schema = _response_format(body)
    max_tokens = _max_tokens(body, limits, limits.max_tokens)
    try:
        ids, options = model._chat_request(
            "chat", messages, tools, choice, parallel, schema, True, _stop(body),
            _sampling(body), 0.0, 0, 1.0, 0.0, 1.0, None,
        )  # fmt: skip
    except (TypeError, ValueError, KeyError) as e:
        raise ApiError(400, str(e).replace("Model.chat(): ", "")) from None
    return Job("chat", ids, max_tokens, options)


def completion_job(model: gemma_rs.Model, body: Mapping[str, Any], limits: Limits) -> Job:
    """The job of a (legacy) completion request: ``prompt`` a string, a one-string list or a
    list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "'prompt' is empty", param="prompt")
        ids = model.tokenize(prompt)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary", param="prompt")
    else:
        raise ApiError(
            400, "'prompt' must be a string, or a list of token ids (one prompt)", param="prompt"
        )
    if body.get("echo") or body.get("suffix") or (body.get("best_of") or 1) != 1:
        raise ApiError(400, "'echo', 'suffix' and 'best_of' are not supported")
    max_tokens = _max_tokens(body, limits, COMPLETIONS_DEFAULT_MAX_TOKENS)
    options = {"stop": _stop(body), "sampling": _sampling(body)}
    return Job("completion", ids, max_tokens, options)


# ----------------------------------------------------------------------------------------------
# The worker: slots, the waiting queue, and the batched generation loop


class Busy(Exception):
    """Every slot is busy and the queue is full."""


class Scheduler:
    """The slots and the one thread that generates for all of them."""

    def __init__(self, model: gemma_rs.Model, parallel: int, queue: int) -> None:
        self.model = model
        self.slots: list[gemma_rs.Model] = [model] + [model.session() for _ in range(parallel - 1)]
        self._free = list(range(parallel))
        self._used = [0.0] * parallel  # when each slot was last given out
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._queue = queue
        self._cond = threading.Condition()
        self._stopping = False
        self._batch = gemma_rs._gemma_rs.Batch()
        self._thread = threading.Thread(target=self._run, name="gemma-rs-decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queues `job`; :class:`Busy` when it would wait behind ``queue`` others."""
        with self._cond:
            free = len(self._free) - len(self._waiting)
            if free <= 0 and len(self._waiting) >= self._queue:
                raise Busy()
            self._waiting.append(job)
            self._cond.notify()

    def wake(self) -> None:
        """Tells the worker that a job was cancelled (it frees its slot at once)."""
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    @property
    def busy(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self._running), len(self._waiting)

    def _best_slot(self, ids: Sequence[int]) -> int:
        """The free slot holding the longest prefix of `ids` (the least recently used of ties)."""
        held = {i: self.slots[i]._inner.held_prefix(ids) for i in self._free}
        return max(self._free, key=lambda i: (held[i], -self._used[i]))

    def _start(self, job: Job) -> None:
        job.slot = slot = self._best_slot(job.ids)
        self._free.remove(slot)
        self._used[slot] = time.monotonic()
        try:
            job.stream = self.slots[slot].stream(job.ids, job.max_tokens, **job.options)
        except Exception as e:  # noqa: BLE001 - a refused prompt is that request's error
            self._free.append(slot)
            job.send("error", e)
            return
        self._running.append(job)

    def _finish(self, job: Job, kind: str, value: Any) -> None:
        self._running.remove(job)
        assert job.slot is not None
        self._free.append(job.slot)
        job.stream = None
        job.send(kind, value)

    def _run(self) -> None:
        # Only this thread changes _running and _free; submit() reads their lengths.
        while True:
            with self._cond:
                while not self._stopping and not self._running and not self._waiting:
                    self._cond.wait()
                if self._stopping:
                    break
                for job in [j for j in self._running if j.cancelled]:
                    self._finish(job, "cancelled", None)
                self._waiting = deque(j for j in self._waiting if not j.cancelled)
                n = min(len(self._waiting), len(self._free))
                starting = [self._waiting.popleft() for _ in range(n)]
            for job in starting:  # slot choice and prompt-cache reads, off the lock
                self._start(job)
            if not self._running:
                continue
            jobs = list(self._running)
            try:
                steps = self._batch.step([j.stream for j in jobs])
            except Exception as e:  # noqa: BLE001 - never lose the worker
                steps = [e] * len(jobs)
            for job, step in zip(jobs, steps):
                if isinstance(step, BaseException):
                    self._finish(job, "error", step)
                elif step is None:
                    self._finish(job, "done", job.stream.completion)
                elif step:
                    job.send("text", step)
        for job in self._running + list(self._waiting):
            job.send("error", RuntimeError("the server is shutting down"))


# ----------------------------------------------------------------------------------------------
# The HTTP layer


_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def _usage(c: gemma_rs.Completion) -> dict[str, Any]:
    n = len(c.token_ids)
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": c.prompt_tokens + n,
        "prompt_tokens_details": {"cached_tokens": c.reused_tokens},
    }


def _tool_calls(result: gemma_rs.ChatResult) -> list[dict[str, Any]]:
    return [
        {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        for call in result.tool_calls
    ]


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _error_of(e: BaseException) -> ApiError:
    """A generation's exception as the API's error."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (ValueError, TypeError)):
        return ApiError(400, str(e))
    return ApiError(500, f"{type(e).__name__}: {e}", type="server_error")


class _Gone(Exception):
    """The client disconnected."""


class Server:
    """The app's state: the model, its id, the scheduler, the limits and the key."""

    def __init__(
        self,
        model: gemma_rs.Model,
        model_id: str,
        *,
        parallel: int = 1,
        limits: Limits = Limits(),
        api_key: str | None = None,
    ) -> None:
        self.model, self.model_id, self.limits, self.api_key = model, model_id, limits, api_key
        self.parallel = parallel
        self.created = int(time.time())
        self.scheduler = Scheduler(model, parallel, limits.queue)

    # -- plumbing

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "Missing or wrong API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    async def _body(self, request: Request) -> dict[str, Any]:
        limit = self.limits.max_body_bytes
        too_big = ApiError(413, f"The request body is larger than {limit} bytes")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_big
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):
            raise ApiError(400, "The request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object")
        return body

    async def _next(self, job: Job, request: Request) -> tuple[str, Any]:
        """The job's next event; `_Gone` (its generation cancelled) if the client left."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self._cancel(job)
                    raise _Gone() from None

    def _cancel(self, job: Job) -> None:
        job.cancelled = True
        self.scheduler.wake()

    def _log(self, rid: str, request: Request, status: int, t0: float, job: Job | None,
             c: gemma_rs.Completion | None = None, ttft: float | None = None,
             note: str = "") -> None:  # fmt: skip
        parts = [rid, request.method, request.url.path, str(status)]
        if job is not None and job.slot is not None:
            parts.append(f"slot={job.slot}")
        if c is not None:
            parts.append(f"prompt={c.prompt_tokens} cached={c.reused_tokens}")
            parts.append(f"completion={len(c.token_ids)}")
        if ttft is not None:
            parts.append(f"ttft={ttft * 1000:.0f}ms")
        parts.append(f"total={(time.monotonic() - t0) * 1000:.0f}ms")
        if note:
            parts.append(note)
        log.info(" ".join(parts))

    async def _generate(self, request: Request, kind: str) -> Response:
        """A chat completion (`kind` "chat") or a completion: checked, queued, answered."""
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse, StreamingResponse

        t0 = time.monotonic()
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        job: Job | None = None
        try:
            self._authorize(request)
            body = await self._body(request)
            _common(body, self.model_id)
            make = chat_job if kind == "chat" else completion_job
            job = await run_in_threadpool(make, self.model, body, self.limits)
            job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
            try:
                self.scheduler.submit(job)
            except Busy:
                raise ApiError(
                    503,
                    "The server is busy: every slot is generating and the queue is full",
                    type="server_error",
                    code="server_busy",
                    headers={"Retry-After": "1"},
                ) from None
            first = await self._next(job, request)
            if first[0] == "error":
                raise _error_of(first[1])
        except ApiError as e:
            self._log(rid, request, e.status, t0, job, note=f"error={e.message[:80]!r}")
            return e.response()
        except _Gone:
            self._log(rid, request, 499, t0, job, note="client gone")
            return JSONResponse({}, status_code=499)
        ttft = time.monotonic() - t0
        stream_options = body.get("stream_options")
        usage = isinstance(stream_options, Mapping) and stream_options.get("include_usage") is True
        if body.get("stream"):
            events = self._events(rid, kind, job, first, request, t0, ttft, usage)
            return StreamingResponse(events, media_type="text/event-stream")
        event = first
        try:
            while event[0] == "text":
                event = await self._next(job, request)
        except _Gone:
            self._log(rid, request, 499, t0, job, note="client gone")
            return JSONResponse({}, status_code=499)
        if event[0] != "done":
            err = _error_of(event[1])
            self._log(rid, request, err.status, t0, job, note=f"error={err.message[:80]!r}")
            return err.response()
        c = event[1]
        self._log(rid, request, 200, t0, job, c, ttft)
        return JSONResponse(self._whole(rid, kind, c))

    def _whole(self, rid: str, kind: str, c: gemma_rs.Completion) -> dict[str, Any]:
        """The response body of a finished, non-streamed request."""
        head = {"id": rid, "created": int(time.time()), "model": self.model_id}
        if kind == "completion":
            choice = {"index": 0, "text": c.text, "logprobs": None,
                      "finish_reason": _FINISH[c.finish_reason]}  # fmt: skip
            return {**head, "object": "text_completion", "choices": [choice], "usage": _usage(c)}
        result = gemma_rs._chat_result(c)
        calls = _tool_calls(result)
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if calls:
            message["content"] = result.text or None
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": _FINISH[result.finish_reason]}  # fmt: skip
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(c)}

    async def _events(
        self, rid: str, kind: str, job: Job, first: tuple[str, Any], request: Request,
        t0: float, ttft: float, include_usage: bool,
    ) -> AsyncIterator[str]:  # fmt: skip
        """The server-sent events of a streamed request, from its first event on."""
        from .tools import CallTextFilter

        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: Any = None, finish: str | None = None, text: str = "") -> str:
            if kind == "chat":
                choice = {"index": 0, "delta": delta or {}, "logprobs": None,
                          "finish_reason": finish}  # fmt: skip
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return _sse({"id": rid, "object": obj, "created": created, "model": self.model_id,
                         "choices": [choice]})  # fmt: skip

        filt = CallTextFilter() if kind == "chat" else None
        status, c, done = 200, None, False
        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            event = first
            while True:
                what, value = event
                if what == "text":
                    text = filt.feed(value) if filt else value
                    if text:
                        yield chunk({"content": text}, text=text)
                elif what == "done":
                    c = value
                    if kind == "completion":
                        yield chunk(finish=_FINISH[c.finish_reason])
                    else:
                        assert filt is not None
                        tail = filt.end()
                        if tail:
                            yield chunk({"content": tail})
                        result = gemma_rs._chat_result(c)
                        for i, call in enumerate(_tool_calls(result)):
                            # Every tool-call chunk names the call whole: id, type and name.
                            yield chunk({"tool_calls": [{"index": i, **call}]})
                        yield chunk({}, _FINISH[result.finish_reason])
                    if include_usage:
                        yield _sse({"id": rid, "object": obj, "created": created,
                                    "model": self.model_id, "choices": [],
                                    "usage": _usage(c)})  # fmt: skip
                    yield "data: [DONE]\n\n"
                    done = True
                    return
                else:
                    e = _error_of(value)
                    status = e.status
                    yield _sse(e.body())
                    done = True
                    return
                event = await self._next(job, request)
        except _Gone:
            status = 499
        finally:
            if not done:
                self._cancel(job)
                status = 499
            self._log(rid, request, status, t0, job, c, ttft, "stream")

    # -- endpoints

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "gemma_rs"}  # fmt: skip

    async def models(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        name = request.path_params.get("name")
        try:
            self._authorize(request)
            if name is not None and name != self.model_id:
                raise ApiError(404, f"The model '{name}' does not exist", code="model_not_found")
        except ApiError as e:
            return e.response()
        if name is not None:
            return JSONResponse(self._model_card())
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def health(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        running, waiting = self.scheduler.busy
        return JSONResponse(
            {"status": "ok", "model": self.model_id, "slots": self.parallel,
             "running": running, "waiting": waiting}
        )  # fmt: skip

    def app(self) -> Starlette:
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            message = f"{request.method} {request.url.path}: {exc.detail}"
            return ApiError(exc.status_code, message, headers=exc.headers).response()

        async def server_error(request: Request, exc: Exception) -> Response:
            log.exception("unexpected error", exc_info=exc)
            return ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error").response()

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            self.scheduler.close()

        routes = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{name:path}", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        handlers = {HTTPException: http_error, Exception: server_error}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)  # type: ignore[arg-type]


def check_address(host: str, port: int) -> None:
    """An ``OSError`` naming `host`:`port` when the server could not listen there (checked
    before the model is loaded)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def model_id_of(path: str) -> str:
    """The id a model is served under by default: its file or directory name, without .gguf."""
    name = os.path.basename(os.path.normpath(path))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def run(
    model: gemma_rs.Model,
    model_id: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    parallel: int = 1,
    limits: Limits = Limits(),
    api_key: str | None = None,
    quiet: bool = False,
) -> None:
    """Serves `model` until SIGTERM or Ctrl-C (uvicorn's graceful shutdown: running requests
    get a few seconds, then are cancelled)."""
    import uvicorn

    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    server = Server(model, model_id, parallel=parallel, limits=limits, api_key=api_key)
    config = uvicorn.Config(
        server.app(),
        host=host,
        port=port,
        access_log=False,  # one line per request, ours
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    log.info(
        f"gemma-rs serve: {model_id} on http://{host}:{port}/v1 ({parallel} slot"
        f"{'s' if parallel != 1 else ''}, queue {limits.queue}"
        f"{', API key required' if api_key else ''})"
    )
    # uvicorn shuts down gracefully on SIGTERM and Ctrl-C, then raises the signal again for the
    # handler it found: this one makes that a clean exit (status 0), not a death by signal.
    import signal

    def stopped(signum: int, frame: Any) -> None:
        log.info(f"gemma-rs serve: stopped ({signal.Signals(signum).name})")

    previous = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
