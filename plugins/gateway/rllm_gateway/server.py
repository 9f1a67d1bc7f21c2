"""An OpenAI-compatible HTTP server in front of a ``RolloutEngine``, recording every call as a trace.

Contract:

- ``Gateway.start()`` serves its ASGI app (:meth:`Gateway.app`) with uvicorn on a thread of its own
  (own event loop);
  ``stop()`` ends it. ``open(session_id, engine=..., sampling=...)`` returns ``(base_url, api_key)``
  for one agent run; ``consume(session_id)`` closes the session and returns what it recorded.
- Routes: ``POST /sessions/{sid}/v1/chat/completions`` (JSON, or SSE with ``stream: true``),
  ``GET /sessions/{sid}/v1/models``, ``POST /sessions/{sid}/reward`` (``{"reward": x}``) and
  ``GET /v1/models``. Session routes need ``Authorization: Bearer <the session's key>`` (401 otherwise).
- The engine runs on the loop the session was opened from (the trainer's): each call is handed to
  that loop as a task and its result handed back (:func:`_on_loop`), so neither loop blocks on the other.
- Every call becomes a :class:`Trace`: the messages as sent, the messages the engine saw, the tools,
  the response message, prompt/completion ids, logprobs, finish reason and the weight version read
  when the call was dispatched (before awaiting the engine: a weight update during the call does
  not relabel it). ``n > 1`` is refused (400) rather than half-recorded.
- Lineage: a call whose messages are an earlier trace's messages + that trace's response (+ new
  messages) is that trace's child. The engine is then sent the earlier trace's exact messages and
  response (what it sampled, not the client's echo of it), so an engine that continues
  conversations from its sampled tokens (the torch engine) recognises the conversation.
- An identical resend in a session (a client retry) is answered with the recorded response, or
  joins the call still in flight, and records nothing new.
- The store is bounded: opening a session beyond ``max_sessions`` evicts the least recently used
  sessions with no call in flight (``evicted`` counts them).
- Counters (:meth:`Gateway.pop_counters`): requests, errors, resends, sessions opened / evicted / open at
  most, and the time calls spent in the gateway and in the engine. The ``blackbox`` workflow moves them
  into the rollout engine's counters, which the workflow engine drains into each step's metrics.
- Admin routes, only with ``admin_key`` (what ``rllm serve`` uses): ``POST /sessions`` opens a session on
  the default engine, ``GET /sessions/{sid}/traces`` shows what a session recorded, ``DELETE
  /sessions/{sid}`` consumes it; they need ``Authorization: Bearer <admin_key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import json
import logging
import re
import secrets
import socket
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from rllm_core.types import ModelOutput

__all__ = ["Gateway", "SessionRecord", "Trace"]

log = logging.getLogger("rllm.gateway")

_OPENAI_FINISH = {"stop", "length", "tool_calls", "content_filter", "function_call"}
_FINISH_AS = {"malformed_tool_call": "stop", "prompt_too_long": "length"}
# Request fields passed to the engine as sampling parameters (the session's overrides win over them).
_SAMPLING_FIELDS = ("temperature", "top_p", "stop", "seed", "frequency_penalty", "presence_penalty")


@dataclass
class Trace:
    """One chat-completions call of a session."""

    index: int
    """Position in the session's record (traces are recorded as their calls complete)."""
    messages: list[dict[str, Any]]
    """The messages as the client sent them."""
    engine_messages: list[dict[str, Any]]
    """The messages the engine was given (the parent's exact history and response, then the new ones)."""
    tools: list[dict[str, Any]] | None
    response: dict[str, Any]
    """The assistant message returned (``ModelOutput.assistant_message()``)."""
    output: ModelOutput
    """The engine's output: prompt and completion ids, logprobs, finish reason."""
    weight_version: int
    """The engine's weight version when the call was dispatched."""
    parent: int | None
    """Index of the trace this call extends (None: it starts a new lineage)."""
    latency_s: float = 0.0

    @property
    def prompt_ids(self) -> list[Any]:
        return self.output.prompt_ids

    @property
    def completion_ids(self) -> list[int]:
        return self.output.completion_ids

    @property
    def logprobs(self) -> list[float] | None:
        return self.output.logprobs

    @property
    def finish_reason(self) -> str | None:
        return self.output.finish_reason

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (what ``GET /sessions/{sid}/traces`` shows)."""
        return {
            "index": self.index,
            "parent": self.parent,
            "messages": self.messages,
            "engine_messages": self.engine_messages,
            "tools": self.tools,
            "response": self.response,
            "prompt_ids": list(self.prompt_ids),
            "completion_ids": list(self.completion_ids),
            "logprobs": None if self.logprobs is None else list(self.logprobs),
            "finish_reason": self.finish_reason,
            "weight_version": self.weight_version,
            "latency_s": self.latency_s,
        }


@dataclass
class SessionRecord:
    """What a consumed session hands back."""

    session_id: str
    traces: list[Trace]
    reward: float | None
    """A reward the agent posted to ``/sessions/{sid}/reward`` (None: none)."""


@dataclass
class _Session:
    id: str
    key: str
    engine: Any
    loop: asyncio.AbstractEventLoop
    sampling: dict[str, Any]
    traces: list[Trace] = field(default_factory=list)
    by_request: dict[bytes, int] = field(default_factory=dict)
    """Request fingerprint -> trace index (identical resends)."""
    inflight: dict[bytes, asyncio.Future] = field(default_factory=dict)
    """Request fingerprint -> the call in flight (on the server's loop)."""
    ends: dict[bytes, int] = field(default_factory=dict)
    """Fingerprint of (tools, messages + response) of each trace -> its index, the longest lineage match wins."""
    reward: float | None = None
    closed: bool = False


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _error(status: int, message: str, code: str) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


# -- message normalisation ----------------------------------------------------------------------


def _text(content: Any) -> Any:
    """Content parts that are all text become one string (what chat templates expect)."""
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return content


def _clean(message: Mapping[str, Any]) -> dict[str, Any]:
    """The message without keys whose value is None (clients send ``refusal: null`` and the like)."""
    out = {k: v for k, v in message.items() if v is not None}
    if "content" in out:
        out["content"] = _text(out["content"])
    elif out.get("role") == "assistant":
        out["content"] = ""
    return out


def _arguments(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


def _identity(message: Mapping[str, Any]) -> Any:
    """What makes two messages the same turn: role, text, tool calls (names, parsed arguments), tool ids.

    Assistant text is compared stripped and reasoning is ignored: clients drop it or trim it.
    """
    role = message.get("role")
    content = _text(message.get("content"))
    if role == "assistant":
        calls = []
        for call in message.get("tool_calls") or []:
            fn = call.get("function", {}) if isinstance(call, Mapping) else {}
            calls.append([fn.get("name"), _arguments(fn.get("arguments"))])
        return ["assistant", (content or "").strip() if isinstance(content, str | None) else content, calls]
    return [role, content, message.get("tool_call_id"), message.get("name")]


def _canonical(item: Any) -> bytes:
    return json.dumps(item, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass") + b"\x1e"


def _extend(digest: bytes, message: Mapping[str, Any]) -> bytes:
    """The fingerprint of a conversation (``digest``) extended by one more message."""
    return hashlib.blake2b(digest + _canonical(_identity(message)), digest_size=16).digest()


def _prefix_digests(tools: Any, messages: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """``out[k]``: the fingerprint of the tools and the first ``k`` messages' identities. A hash chain, so
    every prefix of a conversation is fingerprinted in one pass over it."""
    out = [hashlib.blake2b(_canonical(tools), digest_size=16).digest()]
    for message in messages:
        out.append(_extend(out[-1], message))
    return out


# -- OpenAI wire format -------------------------------------------------------------------------


def _finish(reason: str | None) -> str:
    reason = _FINISH_AS.get(reason or "stop", reason or "stop")
    return reason if reason in _OPENAI_FINISH else "stop"


def _wire_message(response: Mapping[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": response.get("content") or None}
    if response.get("tool_calls"):
        message["tool_calls"] = response["tool_calls"]
    else:
        message["content"] = response.get("content") or ""
    if response.get("reasoning_content") is not None:
        message["reasoning_content"] = response["reasoning_content"]
    return message


def _wire_logprobs(trace: Trace) -> dict[str, Any] | None:
    if trace.logprobs is None:
        return None
    return {
        "content": [
            {"token": f"token_id:{t}", "logprob": lp, "bytes": None, "top_logprobs": []}
            for t, lp in zip(trace.completion_ids, trace.logprobs, strict=False)
        ]
    }


def _usage(trace: Trace) -> dict[str, int]:
    p, c = len(trace.prompt_ids), len(trace.completion_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class Gateway:
    """The HTTP server and its session store (see the module docstring).

    ``engine`` is the default engine of sessions opened without one, and ``loop`` the loop it runs
    on for sessions opened without one (None: the loop :meth:`open` is called from). ``host`` is
    where it binds; ``port=0`` picks a free port. ``advertise`` is the host its URLs name (what
    agents on other machines connect to); None: ``host``, or this machine's fully-qualified name when
    ``host`` is a wildcard (``0.0.0.0``, ``::``), as a gateway for runs across machines must.
    ``admin_key``: turns the admin routes on (None: off, as in training). ``gc_threshold``: the
    garbage collector's thresholds while it serves (``gc.set_threshold``; the process's own are
    restored by :meth:`stop`; None: left alone). The default young-generation threshold, 50,000
    allocations instead of Python's 700, cut the p99 the gateway adds from 12 to 1.5 ms at 256
    sessions (benchmarks/README.md): hundreds of calls in flight hold objects that every pass walks.
    """

    def __init__(
        self,
        engine: Any = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
        model_name: str = "rllm",
        max_sessions: int = 10_000,
        keepalive_s: float = 5.0,
        loop: asyncio.AbstractEventLoop | None = None,
        admin_key: str | None = None,
        gc_threshold: tuple[int, int, int] | None = (50_000, 20, 100),
    ) -> None:
        self.engine = engine
        self.loop = loop
        self.host = host
        self.port = port
        if advertise is None:
            advertise = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
        self.advertise = advertise
        self.model_name = model_name
        self.max_sessions = max_sessions
        self.keepalive_s = keepalive_s
        self.evicted = 0
        """Sessions dropped by the bounded store before they were consumed."""
        self.admin_key = admin_key
        self.gc_threshold = tuple(gc_threshold) if gc_threshold is not None else None
        self._saved_gc_threshold: tuple[int, ...] | None = None
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()
        self._counters: dict[str, float] = {}
        self._open_max = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        session = "/sessions/(?P<sid>.+)"
        self._routes: list[tuple[re.Pattern[str], dict[str, Any]]] = [
            (re.compile(f"{session}/v1/chat/completions"), {"POST": self._chat}),
            (re.compile(f"{session}/v1/models"), {"GET": self._session_models}),
            (re.compile(f"{session}/reward"), {"POST": self._reward}),
            (re.compile("/v1/models"), {"GET": self._models}),
            (re.compile("/sessions"), {"POST": self._admin_open}),
            (re.compile(f"{session}/traces"), {"GET": self._admin_traces}),
            (re.compile(session), {"DELETE": self._admin_consume}),
        ]

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI app: a route table over Starlette's requests and responses.

        Not a Starlette app: its router and middleware keep a dozen more objects alive per call in
        flight, and with hundreds of calls waiting on the engine, the garbage collector's passes over
        them were the gateway's slowest calls (benchmarks/README.md).
        """
        if scope["type"] != "http":
            return
        path, method, allowed = scope["path"], scope["method"], False
        for pattern, handlers in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            handler = handlers.get(method)
            if handler is None:
                allowed = True
                continue
            scope["path_params"] = match.groupdict()
            try:
                response = await handler(Request(scope, receive))
            except Exception:
                log.exception("gateway: %s %s failed", method, path)
                response = self._failed(_HTTPError(500, f"internal error in {method} {path}", "internal_error"))
            break
        else:
            status, what = (405, "method not allowed") if allowed else (404, "not found")
            response = _error(status, f"{method} {path}: {what}", what.replace(" ", "_"))
        await response(scope, receive, send)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host = f"[{self.advertise}]" if ":" in self.advertise else self.advertise
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 30.0) -> Gateway:
        """Serve on a background thread; returns once the server accepts connections."""
        import uvicorn

        if self.running:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets whose proto says TCP, and with it on,
        # each response written in two parts waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, interface="asgi3", log_level="warning", lifespan="off", access_log=False, timeout_keep_alive=30
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="rllm-gateway", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"gateway: the server did not start on {self.base_url}")
            time.sleep(0.01)
        if self.gc_threshold is not None and self._saved_gc_threshold is None:
            self._saved_gc_threshold = gc.get_threshold()
            gc.set_threshold(*self.gc_threshold)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None
        if self._saved_gc_threshold is not None:
            gc.set_threshold(*self._saved_gc_threshold)
            self._saved_gc_threshold = None

    # -- sessions -------------------------------------------------------------------------------

    def open(
        self,
        session_id: str,
        *,
        engine: Any = None,
        sampling: Mapping[str, Any] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[str, str]:
        """Open a session; returns ``(base_url, api_key)`` for an OpenAI client (``base_url`` ends in ``/v1``).

        ``engine`` (default: the gateway's) answers its calls on ``loop`` (default: the gateway's
        ``loop`` for its own engine, else the running loop); ``sampling`` overrides what the client
        asks for (``max_tokens``, ``temperature``...).
        """
        if engine is None:
            engine, loop = self.engine, loop or self.loop
        if engine is None:
            raise ValueError("gateway.open: no engine given and the gateway has no default engine")
        loop = loop if loop is not None else asyncio.get_running_loop()
        key = "sk-rllm-" + secrets.token_urlsafe(24)
        with self._lock:
            if session_id in self._sessions:
                raise ValueError(f"gateway.open: session {session_id!r} is already open; consume it first")
            self._evict(len(self._sessions) + 1 - self.max_sessions)
            self._sessions[session_id] = _Session(session_id, key, engine, loop, dict(sampling or {}))
            self._open_max = max(self._open_max, len(self._sessions))
            self._counters["gateway/sessions/opened"] = self._counters.get("gateway/sessions/opened", 0.0) + 1
        return f"{self.base_url}/sessions/{urllib.parse.quote(session_id, safe='')}/v1", key

    def consume(self, session_id: str) -> SessionRecord:
        """Close the session and return its traces (in dispatch order) and posted reward."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise KeyError(f"gateway: no open session {session_id!r} (consumed, evicted or never opened)")
        session.closed = True
        return SessionRecord(session_id, sorted(session.traces, key=lambda t: t.index), session.reward)

    def __len__(self) -> int:
        return len(self._sessions)

    def pop_counters(self) -> dict[str, float]:
        """The gateway's counters since the last call (and reset them).

        Sums: ``gateway/requests`` (chat calls received), ``gateway/errors`` (answered with an error),
        ``gateway/resends`` (identical resends answered from the record or joined to the call in
        flight), ``gateway/sessions/opened``, ``gateway/sessions/evicted``, ``gateway/latency_s`` (request
        received to reply or error ready, summed over chat calls) and ``gateway/engine_s`` (of which in
        the engine). Maxima (keys ending in ``_max``): ``gateway/sessions/open_max`` (most sessions open at
        once) and ``gateway/overhead_s_max`` (the most time one call spent in the gateway, engine aside).
        """
        with self._lock:
            counters, self._counters = self._counters, {}
            counters["gateway/sessions/open_max"] = float(max(self._open_max, len(self._sessions)))
            self._open_max = len(self._sessions)
        return counters

    def _count(self, key: str, value: float = 1.0) -> None:
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + value

    def _count_answer(self, start: float, engine_s: float) -> None:
        latency = time.perf_counter() - start
        with self._lock:
            c = self._counters
            c["gateway/latency_s"] = c.get("gateway/latency_s", 0.0) + latency
            c["gateway/engine_s"] = c.get("gateway/engine_s", 0.0) + engine_s
            c["gateway/overhead_s_max"] = max(c.get("gateway/overhead_s_max", 0.0), latency - engine_s)

    def _failed(self, exc: _HTTPError) -> JSONResponse:
        self._count("gateway/errors")
        return _error(exc.status, exc.message, exc.code)

    def _evict(self, n: int) -> None:
        if n <= 0:
            return
        for sid in [s.id for s in self._sessions.values() if not s.inflight][:n]:
            self._sessions.pop(sid).closed = True
            self.evicted += 1
            self._counters["gateway/sessions/evicted"] = self._counters.get("gateway/sessions/evicted", 0.0) + 1

    def _session(self, request: Request) -> _Session:
        sid = request.path_params["sid"]
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None:
                self._sessions.move_to_end(sid)
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if session is None or not hmac.compare_digest(token.encode(), session.key.encode()):
            # An unknown session and a wrong key read the same: a key is the only way in.
            raise _HTTPError(401, f"session {sid!r}: missing or invalid API key", "invalid_api_key")
        return session

    # -- routes ---------------------------------------------------------------------------------

    def _model_list(self) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "rllm"}]}
        )

    async def _models(self, request: Request) -> Response:
        return self._model_list()

    async def _session_models(self, request: Request) -> Response:
        try:
            self._session(request)
        except _HTTPError as exc:
            return self._failed(exc)
        return self._model_list()

    async def _reward(self, request: Request) -> Response:
        try:
            session = self._session(request)
            body = await _json_body(request)
            reward = body.get("reward")
            if isinstance(reward, bool) or not isinstance(reward, int | float):
                raise _HTTPError(400, 'reward: expected {"reward": <number>}', "invalid_reward")
        except _HTTPError as exc:
            return self._failed(exc)
        session.reward = float(reward)
        return JSONResponse({"ok": True, "reward": session.reward})

    async def _chat(self, request: Request) -> Response:
        start = time.perf_counter()
        self._count("gateway/requests")
        try:
            session = self._session(request)
            body = await _json_body(request)
            messages, tools, sampling = self._parse(body, session)
        except _HTTPError as exc:
            self._count_answer(start, 0.0)
            return self._failed(exc)
        call = self._call(session, messages, tools, sampling)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(call, start, bool(body.get("logprobs")), include_usage), media_type="text/event-stream"
            )
        try:
            trace, engine_s = await call
        except _HTTPError as exc:
            self._count_answer(start, 0.0)
            return self._failed(exc)
        response = JSONResponse(self._completion(session, trace, bool(body.get("logprobs"))))
        self._count_answer(start, engine_s)
        return response

    # -- admin routes (``admin_key``) --------------------------------------------------------------

    def _admin(self, request: Request) -> None:
        if self.admin_key is None:
            raise _HTTPError(404, "admin routes are off (the gateway has no admin_key)", "not_found")
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.admin_key.encode()):
            raise _HTTPError(401, "admin route: missing or invalid admin key", "invalid_api_key")

    async def _admin_open(self, request: Request) -> Response:
        """``{"session_id"?: str, "sampling"?: {...}}`` -> ``{"session_id", "base_url", "api_key"}``."""
        try:
            self._admin(request)
            body = await _json_body(request) if await request.body() else {}
            sid = body.get("session_id") or f"session-{secrets.token_hex(4)}"
            sampling = body.get("sampling") or {}
            if not isinstance(sid, str) or not isinstance(sampling, Mapping):
                raise _HTTPError(400, "expected {session_id: string, sampling: object}", "invalid_request")
            try:
                base_url, key = self.open(sid, sampling=sampling)
            except ValueError as exc:
                raise _HTTPError(409 if "already open" in str(exc) else 400, str(exc), "invalid_session") from exc
        except _HTTPError as exc:
            return self._failed(exc)
        return JSONResponse({"session_id": sid, "base_url": base_url, "api_key": key})

    async def _admin_traces(self, request: Request) -> Response:
        try:
            self._admin(request)
            sid = request.path_params["sid"]
            with self._lock:
                session = self._sessions.get(sid)
            if session is None:
                raise _HTTPError(404, f"no open session {sid!r}", "session_not_found")
        except _HTTPError as exc:
            return self._failed(exc)
        traces = sorted(session.traces, key=lambda t: t.index)
        return JSONResponse({"session_id": sid, "reward": session.reward, "traces": [t.as_dict() for t in traces]})

    async def _admin_consume(self, request: Request) -> Response:
        try:
            self._admin(request)
            sid = request.path_params["sid"]
            try:
                record = self.consume(sid)
            except KeyError as exc:
                raise _HTTPError(404, f"no open session {sid!r}", "session_not_found") from exc
        except _HTTPError as exc:
            return self._failed(exc)
        traces = [t.as_dict() for t in record.traces]
        return JSONResponse({"session_id": sid, "reward": record.reward, "traces": traces})

    # -- chat -----------------------------------------------------------------------------------

    def _parse(self, body: Mapping[str, Any], session: _Session) -> tuple[list[dict], list[dict] | None, dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, Mapping) for m in messages):
            raise _HTTPError(400, "messages: expected a non-empty list of message objects", "invalid_messages")
        n = body.get("n", 1)
        if n not in (None, 1):
            raise _HTTPError(400, f"n={n}: only one choice per request is supported (n=1)", "unsupported_n")
        tools = body.get("tools") or None
        if body.get("tool_choice") == "none":
            tools = None
        sampling = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None:
            sampling["max_tokens"] = max_tokens
        sampling.update(session.sampling)  # the launcher's settings win over the agent's
        return [dict(m) for m in messages], tools, sampling

    async def _call(
        self, session: _Session, messages: list[dict], tools: list | None, sampling: dict
    ) -> tuple[Trace, float]:
        """The trace of this request (recorded before: a resend; in flight; or made now) and the seconds
        this request spent in the engine (0 for a resend)."""
        prefixes = _prefix_digests(tools, messages)
        request_key = hashlib.blake2b(prefixes[-1] + _canonical(sampling), digest_size=16).digest()
        done = session.by_request.get(request_key)
        if done is not None:
            self._count("gateway/resends")
            return session.traces[done], 0.0
        pending = session.inflight.get(request_key)
        if pending is not None:
            self._count("gateway/resends")
            return await asyncio.shield(pending), 0.0
        future = asyncio.get_running_loop().create_future()
        session.inflight[request_key] = future
        try:
            trace, engine_s = await self._dispatch(session, messages, tools, sampling, prefixes)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc if isinstance(exc, Exception) else _HTTPError(499, "request cancelled"))
                future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            session.inflight.pop(request_key, None)
        session.by_request[request_key] = trace.index
        future.set_result(trace)
        return trace, engine_s

    async def _dispatch(
        self, session: _Session, messages: list[dict], tools: list | None, sampling: dict, prefixes: list[bytes]
    ) -> tuple[Trace, float]:
        parent = None
        for cut in range(len(messages) - 1, 0, -1):  # the longest recorded (messages + response) prefix
            if messages[cut - 1].get("role") == "assistant":
                parent = session.ends.get(prefixes[cut])
                if parent is not None:
                    break
        if parent is not None:
            p = session.traces[parent]
            engine_messages = [*p.engine_messages, p.response, *(_clean(m) for m in messages[len(p.messages) + 1 :])]
        else:
            engine_messages = [_clean(m) for m in messages]
        engine = session.engine
        version = int(engine.weight_version)  # at dispatch: a weight update during the call does not relabel it
        start = time.perf_counter()
        coro = engine.get_model_response(engine_messages, tools=tools, **sampling)
        try:
            out, engine_s = await _on_loop(coro, session.loop)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _HTTPError(500, f"engine error: {type(exc).__name__}: {exc}", "engine_error") from exc
        trace = Trace(
            index=-1,
            messages=messages,
            engine_messages=engine_messages,
            tools=tools,
            response=out.assistant_message(),
            output=out,
            weight_version=version,
            parent=parent,
            latency_s=time.perf_counter() - start,
        )
        if not session.closed:
            trace.index = len(session.traces)
            session.traces.append(trace)
            session.ends[_extend(prefixes[-1], trace.response)] = trace.index
        return trace, engine_s

    def _completion(self, session: _Session, trace: Trace, logprobs: bool) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{trace.index}-{session.key[-8:]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": _wire_message(trace.response),
                    "finish_reason": _finish(trace.finish_reason),
                    "logprobs": _wire_logprobs(trace) if logprobs else None,
                }
            ],
            "usage": _usage(trace),
        }

    async def _stream(self, call: Any, start: float, logprobs: bool, include_usage: bool):
        """SSE: comments while the engine works, then the response as OpenAI's chunks."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.keepalive_s)
                if done:
                    break
                yield b": keepalive\n\n"
            try:
                trace, engine_s = task.result()
            except _HTTPError as exc:
                self._count("gateway/errors")
                self._count_answer(start, 0.0)
                yield _sse({"error": {"message": exc.message, "type": "server_error", "code": exc.code}})
                return
        finally:
            if not task.done():
                task.cancel()
        self._count_answer(start, engine_s)
        head = {"id": f"chatcmpl-{trace.index}", "object": "chat.completion.chunk", "created": int(time.time())}
        head["model"] = self.model_name

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            return _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]})

        message = _wire_message(trace.response)
        yield chunk({"role": "assistant", "content": ""})
        if message.get("reasoning_content"):
            yield chunk({"reasoning_content": message["reasoning_content"]})
        if message.get("content"):
            yield chunk({"content": message["content"]}, logprobs=_wire_logprobs(trace) if logprobs else None)
        for i, call_ in enumerate(message.get("tool_calls") or []):
            fn = call_.get("function", {})
            yield chunk(
                {
                    "tool_calls": [
                        {"index": i, "id": call_.get("id"), "type": "function", "function": {"name": fn.get("name")}}
                    ]
                }
            )
            yield chunk({"tool_calls": [{"index": i, "function": {"arguments": fn.get("arguments", "")}}]})
        yield chunk({}, _finish(trace.finish_reason))
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(trace)})
        yield b"data: [DONE]\n\n"


async def _on_loop(coro: Any, loop: asyncio.AbstractEventLoop) -> tuple[Any, float]:
    """Run ``coro`` as a task on ``loop`` (the engine's, on another thread) and await its result and
    the seconds it ran, without blocking either loop. Cancelling the wait cancels the task.

    What ``run_coroutine_threadsafe`` + ``wrap_future`` do, with one callback each way instead of a
    concurrent future, its lock and six closures: fewer objects alive per call in flight (see ``app``).
    """
    bridge = _Bridge(coro, loop)
    loop.call_soon_threadsafe(bridge.start)
    try:
        return await bridge.done
    except asyncio.CancelledError:
        bridge.cancel()
        raise


class _Bridge:
    """One engine call handed to another loop (see :func:`_on_loop`)."""

    __slots__ = ("coro", "done", "here", "loop", "started", "task")

    def __init__(self, coro: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.coro, self.loop = coro, loop
        self.here = asyncio.get_running_loop()
        self.done = self.here.create_future()
        self.task: asyncio.Task | None = None
        self.started = 0.0

    def start(self) -> None:  # on the engine's loop
        self.started = time.perf_counter()
        self.task = self.loop.create_task(self.coro)
        if self.done.cancelled():  # given up before it started (see cancel)
            self.task.cancel()
        else:
            self.task.add_done_callback(self.finished)

    def finished(self, task: asyncio.Task) -> None:  # on the engine's loop
        elapsed = time.perf_counter() - self.started
        with contextlib.suppress(RuntimeError):  # the server's loop is closed: nobody waits any more
            self.here.call_soon_threadsafe(self.settle, task, elapsed)

    def settle(self, task: asyncio.Task, elapsed: float) -> None:  # on the server's loop
        if task.cancelled():
            self.done.cancel()
            return
        exc = task.exception()  # retrieved even when nobody waits any more
        if self.done.cancelled():
            return
        if exc is not None:
            self.done.set_exception(exc)
        else:
            self.done.set_result((task.result(), elapsed))

    def cancel(self) -> None:  # on the server's loop, once ``done`` is cancelled
        # ``start`` sets ``task`` before it reads ``done``: either the task exists now, or it will see
        # ``done`` cancelled and cancel the task itself.
        if self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)


def _sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    with contextlib.suppress(ValueError):
        body = json.loads(raw)
        if isinstance(body, dict):
            return body
    raise _HTTPError(400, "the request body must be a JSON object", "invalid_json")
