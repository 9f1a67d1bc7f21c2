"""Token-in/token-out sampling from one or more vLLM servers over HTTP (``/v1/completions``).

:class:`VLLMHttpRollout` sends each prompt (token ids) as its own completion request with
``return_token_ids`` and ``logprobs=0``, and returns the exact completion token ids and the
log-probability of each sampled token, as :class:`rllm_torch.sampling.GenResult`. Requests run
concurrently on a private event loop; each goes to the server with the fewest requests in flight
(servers that just failed are avoided for a short while). Transient failures (connection refused
or reset, 502/503/504) are retried with exponential backoff; any other failure raises
:class:`HttpRolloutError` naming the server, the status and the server's message.

**Which log-probabilities.** vLLM's sampler can return four things (server flag ``--logprobs-mode``):

* ``raw_logprobs`` (vLLM's default): ``log_softmax(logits)`` of the model's output, before
  penalties, temperature and top-k/top-p: the temperature-1 value whatever the request's temperature.
* ``processed_logprobs``: ``log_softmax`` of the logits the sampler drew from: after penalties,
  division by the temperature (1 for greedy requests) and top-k/top-p masking.

rllm-core's convention is ``log_softmax(logits / T)`` without top-k/top-p truncation (see
``rllm_torch.sampling``). With ``processed_logprobs`` (what :func:`rllm_verl.vllm_server.start_vllm_server`
starts servers with, and this client's default assumption) that is exactly what comes back for
requests without top-k/top-p; with top-k or top-p < 1 vLLM returns the log-probability under the
*truncated, renormalised* distribution it sampled from (larger by ``-log`` of the kept mass), and
nothing on the server gives the untruncated value. For servers running ``raw_logprobs``, pass
``logprobs_mode="raw_logprobs"``: requests with a temperature other than 1 (or 0) are then refused,
since their log-probs would be of another distribution. Servers are asked not to skip special
tokens when matching stop strings, as the local sampler matches on the full text.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx
from rllm_torch.sampling import GenParams, GenResult

__all__ = [
    "TRANSIENT_STATUS",
    "HttpRolloutError",
    "RetryPolicy",
    "VLLMHttpRollout",
    "is_transient",
    "retry_sync",
]

TRANSIENT_STATUS = frozenset({502, 503, 504})
"""HTTP statuses worth retrying: a proxy or a server that is starting, restarting or overloaded."""

T = TypeVar("T")


class HttpRolloutError(RuntimeError):
    """A request to a vLLM server failed for good (or kept failing past the retry budget)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient failures: ``attempts`` tries in all, waiting
    ``min(max_backoff_s, backoff_s * 2**i)`` after the i-th failure."""

    attempts: int = 6
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0

    def delay(self, failure: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**failure)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed HTTP call may succeed if repeated: the connection was refused, reset or
    dropped (a server restarting, a proxy in between), or the answer was 502, 503 or 504.
    Timeouts are not: a server that hangs once usually hangs again, and the caller's deadline decides."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in TRANSIENT_STATUS
    return isinstance(exc, (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError))


def _describe(exc: BaseException) -> str:
    """A one-line account of a failed call: the status and the server's message, or the transport error."""
    if isinstance(exc, httpx.HTTPStatusError):
        body = exc.response.text.strip().replace("\n", " ")
        return f"HTTP {exc.response.status_code} from {exc.request.url}: {body[:500]}"
    if isinstance(exc, httpx.RequestError):
        return f"{type(exc).__name__} on {exc.request.url}: {exc or 'no detail'}"
    return f"{type(exc).__name__}: {exc}"


def retry_sync(call: Callable[[], T], retry: RetryPolicy, what: str, deadline: float | None = None) -> T:
    """``call()``, repeated on transient failures per ``retry`` (and never past ``deadline``, a
    ``time.monotonic()`` value); other failures, and the last transient one, raise :class:`HttpRolloutError`."""
    for failure in itertools.count():
        try:
            return call()
        except httpx.HTTPError as exc:
            wait = retry.delay(failure)
            late = deadline is not None and time.monotonic() + wait > deadline
            if not is_transient(exc) or failure + 1 >= retry.attempts or late:
                tries = f" (after {failure + 1} tries)" if is_transient(exc) else ""
                raise HttpRolloutError(f"{what} failed{tries}: {_describe(exc)}") from exc
            time.sleep(wait)
    raise AssertionError("unreachable")


class VLLMHttpRollout:
    """Samples from vLLM servers (``base_urls`` such as ``http://10.0.0.5:8000``) token-in/token-out.

    ``model``: the served model name (default: the first one each server lists at ``/v1/models``).
    ``timeout_s``: the longest one request may take (a long completion on a busy server).
    ``logprobs_mode``: what the servers were started with (see the module docstring).
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        *,
        model: str | None = None,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs",
        max_connections: int = 256,
    ) -> None:
        if not base_urls:
            raise ValueError("VLLMHttpRollout needs at least one server base URL")
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.model = model
        self.retry = retry or RetryPolicy()
        self.logprobs_mode = logprobs_mode
        self.in_flight = dict.fromkeys(self.base_urls, 0)
        """Requests in flight per server (read-only; updated on the client's loop)."""
        self.requests_sent = dict.fromkeys(self.base_urls, 0)
        """Requests sent per server so far, retries included."""
        self._avoid_until = dict.fromkeys(self.base_urls, 0.0)
        self._models: dict[str, str] = {}
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-http-rollout", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient = self._run(self._make_client())
        self._closed = False

    async def _make_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self._timeout, limits=self._limits)

    def _run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def generate(self, prompts: list[list[int]], params: list[GenParams]) -> list[GenResult]:
        """Sample one completion per prompt; results in the prompts' order. Blocking: call it from a
        worker thread (never from inside :meth:`agenerate`'s own calls)."""
        if self._closed:
            raise HttpRolloutError("VLLMHttpRollout.generate called after close()")
        return self._run(self._generate(prompts, params))

    async def agenerate(self, prompts: list[list[int]], params: list[GenParams]) -> list[GenResult]:
        """:meth:`generate`, awaitable from any event loop (the requests run on the client's own)."""
        if self._closed:
            raise HttpRolloutError("VLLMHttpRollout.agenerate called after close()")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._generate(prompts, params), self._loop))

    async def _generate(self, prompts: list[list[int]], params: list[GenParams]) -> list[GenResult]:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} GenParams")
        for p in params:
            self._check(p)
        return list(await asyncio.gather(*(self._one(list(pr), p) for pr, p in zip(prompts, params, strict=True))))

    def _check(self, p: GenParams) -> None:
        if self.logprobs_mode == "raw_logprobs" and p.temperature not in (0.0, 1.0):
            raise ValueError(
                f"temperature={p.temperature}: these servers return raw (temperature-1) log-probs, "
                "not those of the distribution sampled at this temperature; start them with "
                "--logprobs-mode processed_logprobs (start_vllm_server does) and pass "
                "logprobs_mode='processed_logprobs', or sample at temperature 1"
            )

    def _pick(self) -> str:
        now = time.monotonic()
        healthy = [u for u in self.base_urls if self._avoid_until[u] <= now] or self.base_urls
        return min(healthy, key=lambda u: self.in_flight[u])

    async def _model_of(self, url: str) -> str:
        if self.model is not None:
            return self.model
        if url not in self._models:
            resp = await self._client.get(f"{url}/v1/models")
            resp.raise_for_status()
            data = resp.json().get("data") or []
            if not data:
                raise HttpRolloutError(f"{url}/v1/models lists no model; pass model= to VLLMHttpRollout")
            self._models[url] = data[0]["id"]
        return self._models[url]

    async def _one(self, prompt: list[int], p: GenParams) -> GenResult:
        if p.max_tokens <= 0:
            return GenResult([], [], "length")
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k if p.top_k > 0 else -1,  # -1: off, in every vLLM version
            "stop": list(p.stop),
            "stop_token_ids": list(p.stop_token_ids),
            "logprobs": 0,  # the sampled token's log-prob only
            "return_token_ids": True,
            "skip_special_tokens": False,
            "include_stop_str_in_output": False,
            "n": 1,
        }
        if p.seed is not None:
            body["seed"] = p.seed  # vLLM samples a seeded request from its own generator
        for failure in itertools.count():
            url = self._pick()
            self.in_flight[url] += 1
            self.requests_sent[url] += 1
            try:
                body["model"] = await self._model_of(url)
                resp = await self._client.post(f"{url}/v1/completions", json=body)
                resp.raise_for_status()
                return self._parse(url, resp.json(), p)
            except httpx.HTTPError as exc:
                if not is_transient(exc) or failure + 1 >= self.retry.attempts:
                    tries = f" (after {failure + 1} tries)" if is_transient(exc) else ""
                    raise HttpRolloutError(f"completion request to {url} failed{tries}: {_describe(exc)}") from exc
                wait = self.retry.delay(failure)
                self._avoid_until[url] = time.monotonic() + wait
                await asyncio.sleep(wait)
            finally:
                self.in_flight[url] -= 1
        raise AssertionError("unreachable")

    @staticmethod
    def _parse(url: str, data: dict[str, Any], p: GenParams) -> GenResult:
        from rllm_torch.sampling import GenResult  # torch is imported only where results are made

        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise HttpRolloutError(f"{url}/v1/completions answered without choices: {str(data)[:300]}") from None
        ids = choice.get("token_ids")
        if ids is None:
            raise HttpRolloutError(
                f"{url} returned no token_ids: the server does not support return_token_ids "
                "(vLLM 0.10.2 or newer is needed)"
            )
        lps = (choice.get("logprobs") or {}).get("token_logprobs")
        if lps is None or len(lps) != len(ids):
            n = "none" if lps is None else len(lps)
            raise HttpRolloutError(f"{url} returned {len(ids)} token ids but {n} log-probs")
        reason = choice.get("finish_reason")
        if reason not in ("stop", "length"):
            raise HttpRolloutError(
                f"{url} ended a completion with finish_reason={reason!r} (aborted: was the server "
                "paused with mode=abort or sent /abort_requests during a weight sync?)"
            )
        stop = choice.get("stop_reason")
        return GenResult(
            completion_ids=[int(t) for t in ids],
            logprobs=[float(x) for x in lps],
            finish_reason=reason,
            stop_text=stop if isinstance(stop, str) else None,
        )

    def close(self) -> None:
        """Close the connections and stop the client's loop."""
        if self._closed:
            return
        self._closed = True
        self._run(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> VLLMHttpRollout:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
