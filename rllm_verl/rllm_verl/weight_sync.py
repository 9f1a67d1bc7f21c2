"""New policy weights to vLLM servers outside verl's control, through Ray's object store.

:meth:`ObjectStoreWeightSync.push` takes named tensors (an HF ``state_dict().items()``, a verl
engine's per-tensor parameters: full tensors, HF names) and:

1. packs them into buckets of about ``bucket_bytes``, each serialised as one safetensors blob and
   put into the object store (at most ``max_buckets_in_flight`` buckets wait there at once);
2. a small actor on each server's host (one per Ray node, pinned there, ``num_cpus=0``) fetches
   each bucket and writes it as a file of a new folder ``<weights_dir>/v<version>/``;
3. per server, that actor asks the engine whether it answers (``GET /is_paused`` within
   ``first_call_timeout_s``: a hung server fails the sync at once instead of at the deadline), then
   ``/pause`` (``pause_mode``: ``wait`` lets requests in flight finish on the old weights),
   ``/collective_rpc`` ``reload_weights`` with ``weights_path`` set to the folder,
   ``/reset_prefix_cache`` (cached prefixes hold keys and values of the old weights),
   ``/update_weight_version`` and ``/resume`` (also after a failure);
4. with a :class:`ParityProbe`, each server scores the probe's tokens (``prompt_logprobs``) and the
   largest difference from the trainer's log-probs must be within ``tolerance``, else
   :class:`ParityError` (which carries the differences) is raised.

Transient HTTP failures (refused or reset connections, 502/503/504) are retried with exponential
backoff until ``deadline_s``; anything else raises :class:`WeightSyncError` naming the server and
the step. The servers need ``VLLM_SERVER_DEV_MODE=1`` (``start_vllm_server`` sets it) for those
endpoints. vLLM's in-process weight-transfer engines (``/init_weight_transfer_engine`` ...) are
NCCL or CUDA IPC, so GPU-only; the disk reload is what works on CPU and, for a server on another
machine, needs no shared file system: the folder is written on the server's own host.

Every parameter must be sent each time. Tied embeddings: vLLM 0.32's reload updates the input
embedding but not a tied output head, so serve untied models; the parity probe catches it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import httpx

from rllm_verl.http_rollout import HttpRolloutError, RetryPolicy, retry_sync

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "PARITY_TOLERANCE",
    "ObjectStoreWeightSync",
    "ParityError",
    "ParityProbe",
    "ServerSyncReport",
    "SyncReport",
    "SyncTarget",
    "WeightSyncError",
]

PARITY_TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-1, "float16": 2e-2}
"""Suggested ``tolerance`` (largest |log-prob difference| against the trainer's fp32 scores) by
the server's dtype. Stale weights differ by much more after any real update."""

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


class WeightSyncError(RuntimeError):
    """Weights could not be delivered to a server, or it did not load them."""


class ParityError(WeightSyncError):
    """A server's log-probs on the probe differ from the trainer's by more than the tolerance."""

    def __init__(self, message: str, max_diff: dict[str, float]) -> None:
        super().__init__(message)
        self.max_diff = max_diff
        """Largest |difference| per server base URL."""

    def __reduce__(self) -> Any:
        return (type(self), (self.args[0], self.max_diff))


@dataclass(frozen=True)
class SyncTarget:
    """A server to update; ``node_id``: the Ray node of its host (default: found from the URL's host)."""

    base_url: str
    node_id: str | None = None


@dataclass
class ParityProbe:
    """``expected_logprobs[i]`` = the trainer's ``log p(tokens[i + 1] | tokens[: i + 1])`` (fp32,
    temperature 1), so ``len(tokens) - 1`` values."""

    tokens: list[int]
    expected_logprobs: list[float]

    def __post_init__(self) -> None:
        if len(self.tokens) < 2 or len(self.expected_logprobs) != len(self.tokens) - 1:
            raise ValueError(
                f"ParityProbe: {len(self.tokens)} tokens need {max(len(self.tokens) - 1, 1)} expected "
                f"log-probs (one per token after the first), got {len(self.expected_logprobs)}"
            )


@dataclass
class ServerSyncReport:
    base_url: str
    reload_s: float = 0.0
    """``/pause`` to ``/resume``, the reload itself included."""
    parity_max_diff: float | None = None


@dataclass
class SyncReport:
    """What one :meth:`ObjectStoreWeightSync.push` moved, and how long each part took."""

    version: int
    bytes: int = 0
    """Serialised bytes put into the object store (each host fetched all of them)."""
    tensors: int = 0
    buckets: int = 0
    put_s: float = 0.0
    """Trainer side: packing, serialising and ``ray.put`` (including waits for full buckets to drain)."""
    write_s: float = 0.0
    """The slowest host's time writing the files (each bucket is fetched just before)."""
    reload_s: float = 0.0
    """The slowest server's pause-reload-resume."""
    parity_s: float = 0.0
    total_s: float = 0.0
    servers: list[ServerSyncReport] = field(default_factory=list)

    @property
    def max_parity_diff(self) -> float | None:
        diffs = [s.parity_max_diff for s in self.servers if s.parity_max_diff is not None]
        return max(diffs) if diffs else None


class ObjectStoreWeightSync:
    """Pushes weights to ``servers`` (base URLs or :class:`SyncTarget`) through Ray's object store.

    Ray must be initialised (this joins whatever cluster ``ray.init`` started).

    * ``bucket_bytes``: the size of one object-store object; ``max_buckets_in_flight`` of them at
      most wait in the store at once.
    * ``weights_dir``: a local folder on each host for the weights (default: a new temporary folder
      there); only the latest version's subfolder is kept.
    * ``pause_mode``: vLLM's ``/pause`` mode during the reload: ``wait`` (requests in flight finish
      on the old weights), ``keep`` (they are frozen, then recomputed and continued on the new
      ones), ``abort`` (they end with finish reason ``abort``).
    * ``tolerance``: the largest parity difference accepted; see :data:`PARITY_TOLERANCE`.
    * ``first_call_timeout_s``: how long the first call to a server (and any connect) may take;
      ``request_timeout_s``: any other call (a ``wait`` pause, a big reload); ``deadline_s``: all of
      one host's calls in one sync, retries included.
    """

    def __init__(
        self,
        servers: Sequence[str | SyncTarget],
        *,
        bucket_bytes: int = 256 << 20,
        max_buckets_in_flight: int = 4,
        weights_dir: str | None = None,
        pause_mode: Literal["wait", "keep", "abort"] = "wait",
        tolerance: float = PARITY_TOLERANCE["float32"],
        retry: RetryPolicy | None = None,
        first_call_timeout_s: float = 10.0,
        request_timeout_s: float = 600.0,
        deadline_s: float = 900.0,
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not ray.is_initialized():
            raise WeightSyncError("ObjectStoreWeightSync needs Ray: call ray.init() (or start the verl workers) first")
        if not servers:
            raise ValueError("ObjectStoreWeightSync needs at least one server")
        self.targets = [s if isinstance(s, SyncTarget) else SyncTarget(s) for s in servers]
        self.bucket_bytes = bucket_bytes
        self.max_buckets_in_flight = max(1, max_buckets_in_flight)
        self.tolerance = tolerance
        self._opts = _HttpOptions(
            pause_mode=pause_mode,
            retry=retry or RetryPolicy(attempts=8, backoff_s=0.25, max_backoff_s=8.0),
            first_call_timeout_s=first_call_timeout_s,
            request_timeout_s=request_timeout_s,
            deadline_s=deadline_s,
        )
        self.version = 0
        by_node: dict[str, list[str]] = collections.defaultdict(list)
        for t in self.targets:
            by_node[t.node_id or _node_of(t.base_url)].append(t.base_url.rstrip("/"))
        self._urls = dict(by_node)
        agent_cls = ray.remote(num_cpus=0, max_restarts=0)(_HostAgent)
        self._agents = {
            node: agent_cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                weights_dir
            )
            for node in self._urls
        }

    def push(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        *,
        version: int | None = None,
        probe: ParityProbe | None = None,
    ) -> SyncReport:
        """Deliver the weights to every server and reload them there; check parity if ``probe``.

        Tensors must be whole (call ``full_tensor()`` on DTensors first, on every rank). Returns
        the timings; raises :class:`WeightSyncError` or :class:`ParityError`.
        """
        import ray

        self.version = self.version + 1 if version is None else version
        report = SyncReport(version=self.version)
        start = time.perf_counter()
        agents = list(self._agents.values())
        _get(ray, [a.begin.remote(self.version) for a in agents], "preparing the weights folder")
        pending: collections.deque[list[Any]] = collections.deque()
        put_s = 0.0
        t0 = time.perf_counter()
        for index, blob in enumerate(_buckets(named_tensors, self.bucket_bytes, report)):
            ref = ray.put(blob)
            report.bytes += len(blob)
            del blob
            pending.append([a.write.remote(self.version, index, ref) for a in agents])
            del ref
            if len(pending) >= self.max_buckets_in_flight:
                put_s += time.perf_counter() - t0
                _get(ray, pending.popleft(), "writing a bucket")
                t0 = time.perf_counter()
        report.put_s = put_s + time.perf_counter() - t0
        while pending:
            _get(ray, pending.popleft(), "writing a bucket")
        if report.tensors == 0:
            raise ValueError("push: no tensors to send")
        calls = [
            agent.apply.remote(self.version, self._urls[node], self._opts, probe)
            for node, agent in self._agents.items()
        ]
        for host in _get(ray, calls, "reloading the weights"):
            report.write_s = max(report.write_s, host["write_s"])
            report.parity_s = max(report.parity_s, host["parity_s"])
            report.servers += [ServerSyncReport(**s) for s in host["servers"]]
        report.reload_s = max(s.reload_s for s in report.servers)
        report.total_s = time.perf_counter() - start
        if probe is not None:
            self._raise_on_mismatch({s.base_url: s.parity_max_diff for s in report.servers}, "after sync")
        return report

    def check_parity(self, probe: ParityProbe) -> dict[str, float]:
        """Each server's largest |log-prob difference| on the probe; :class:`ParityError` above ``tolerance``."""
        import ray

        calls = [agent.parity.remote(self._urls[node], self._opts, probe) for node, agent in self._agents.items()]
        diffs: dict[str, float] = {}
        for host in _get(ray, calls, "checking parity"):
            diffs.update(host)
        self._raise_on_mismatch(diffs, f"(weights version {self.version})")
        return diffs

    def _raise_on_mismatch(self, diffs: dict[str, float | None], when: str) -> None:
        bad = {u: d for u, d in diffs.items() if d is None or not d <= self.tolerance}  # NaN fails too
        if bad:
            worst = ", ".join(f"{u}: {'none' if d is None else f'{d:.3g}'}" for u, d in bad.items())
            raise ParityError(
                f"log-prob parity failed {when}: largest |server - trainer| difference {worst} > tolerance "
                f"{self.tolerance:g}. The server is serving other weights than the trainer's (a stale or "
                "partial sync, a tied output head, a different dtype: see PARITY_TOLERANCE)",
                {u: float(d) for u, d in diffs.items() if d is not None},
            )

    def close(self) -> None:
        """Remove the weight folders and end the host actors."""
        import ray

        with contextlib.suppress(Exception):
            ray.get([a.cleanup.remote() for a in self._agents.values()], timeout=30)
        for agent in self._agents.values():
            with contextlib.suppress(Exception):
                ray.kill(agent)
        self._agents = {}

    def __enter__(self) -> ObjectStoreWeightSync:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _get(ray: Any, refs: list[Any], what: str) -> Any:
    """``ray.get``, with the host actor's own error raised as itself."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, WeightSyncError):
            raise cause from None
        raise WeightSyncError(f"{what} failed on a server's host: {cause!r}") from exc
    except ray.exceptions.RayActorError as exc:
        raise WeightSyncError(f"{what}: a host actor died ({exc})") from exc


def _node_of(base_url: str) -> str:
    """The Ray node id of the host in ``base_url``."""
    import ray

    host = urlparse(base_url).hostname or ""
    if host in _LOCAL_HOSTS:
        return ray.get_runtime_context().get_node_id()
    try:
        ip = socket.gethostbyname(host)
    except OSError as exc:
        raise WeightSyncError(f"cannot resolve the host of {base_url}: {exc}") from exc
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for n in nodes:
        if ip in (n.get("NodeManagerAddress"), n.get("NodeManagerHostname")) or host == n.get("NodeManagerHostname"):
            return n["NodeID"]
    if ip.startswith("127."):
        return ray.get_runtime_context().get_node_id()
    known = ", ".join(sorted(str(n.get("NodeManagerAddress")) for n in nodes))
    raise WeightSyncError(
        f"the server {base_url} ({ip}) is not on a node of this Ray cluster (nodes: {known}); start a Ray "
        "node on its host, or give SyncTarget(base_url, node_id=...) for the node that can write its folder"
    )


def _plain_tensor(name: str, tensor: Any) -> Any:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"push: {name} is a {type(tensor).__name__}, not a torch.Tensor")
    if hasattr(tensor, "full_tensor") or type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise TypeError(
            f"push: {name} is a {type(tensor).__name__}; send whole tensors (DTensor.full_tensor(), on every rank)"
        )
    return tensor.detach().to("cpu")


def _buckets(named_tensors: Iterable[tuple[str, Any]], bucket_bytes: int, report: SyncReport) -> Iterator[bytes]:
    """Safetensors blobs of about ``bucket_bytes`` each (a larger tensor travels alone)."""
    from safetensors.torch import save

    bucket: dict[str, Any] = {}
    ptrs: set[int] = set()
    size = 0
    for name, tensor in named_tensors:
        if name in bucket:
            raise ValueError(f"push: tensor {name} given twice")
        t = _plain_tensor(name, tensor)
        # Tied or viewed tensors share storage, which safetensors refuses: each gets its own copy.
        if not t.is_contiguous() or t.untyped_storage().data_ptr() in ptrs:
            t = t.contiguous().clone()
        ptrs.add(t.untyped_storage().data_ptr())
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            report.buckets += 1
            yield save(bucket)
            bucket, ptrs, size = {}, {t.untyped_storage().data_ptr()}, 0
        bucket[name] = t
        size += nbytes
        report.tensors += 1
    if bucket:
        report.buckets += 1
        yield save(bucket)


@dataclass(frozen=True)
class _HttpOptions:
    pause_mode: str
    retry: RetryPolicy
    first_call_timeout_s: float
    request_timeout_s: float
    deadline_s: float


class _HostAgent:
    """Runs on a server's host (a Ray actor): writes the weight files, drives the servers' reload."""

    def __init__(self, weights_dir: str | None) -> None:
        self.owned = not weights_dir
        if weights_dir:
            self.root = Path(weights_dir)
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            self.root = Path(tempfile.mkdtemp(prefix="rllm-weights-"))
        self.write_s = 0.0
        self.models: dict[str, str] = {}

    def _dir(self, version: int, tmp: bool = False) -> Path:
        return self.root / (f".v{version}.tmp" if tmp else f"v{version}")

    def begin(self, version: int) -> str:
        path = self._dir(version, tmp=True)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        self.write_s = 0.0
        return str(path)

    def write(self, version: int, index: int, blob: bytes) -> int:
        start = time.perf_counter()
        with open(self._dir(version, tmp=True) / f"model-{index:05d}.safetensors", "wb") as f:
            f.write(blob)
        self.write_s += time.perf_counter() - start
        return len(blob)

    def apply(self, version: int, urls: list[str], opts: _HttpOptions, probe: ParityProbe | None) -> dict[str, Any]:
        final = self._dir(version)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(self._dir(version, tmp=True), final)
        deadline = time.monotonic() + opts.deadline_s
        reports = []
        with _client(opts) as client:
            servers = [_Server(client, url, opts, deadline) for url in urls]
            for server in servers:
                start = time.perf_counter()
                server.reload(str(final), version)
                reports.append({"base_url": server.url, "reload_s": time.perf_counter() - start})
            start = time.perf_counter()
            if probe is not None:
                for server, report in zip(servers, reports, strict=True):
                    report["parity_max_diff"] = server.parity(probe, self.models)
            parity_s = time.perf_counter() - start
        for old in self._versions():  # only the version the servers now point at is kept
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return {"write_s": self.write_s, "parity_s": parity_s, "servers": reports}

    def parity(self, urls: list[str], opts: _HttpOptions, probe: ParityProbe) -> dict[str, float]:
        deadline = time.monotonic() + opts.deadline_s
        with _client(opts) as client:
            return {url: _Server(client, url, opts, deadline).parity(probe, self.models) for url in urls}

    def _versions(self) -> list[Path]:
        return [p for p in self.root.iterdir() if p.is_dir() and re.fullmatch(r"\.?v\d+(\.tmp)?", p.name)]

    def cleanup(self) -> None:
        for path in self._versions():
            shutil.rmtree(path, ignore_errors=True)
        if self.owned:
            shutil.rmtree(self.root, ignore_errors=True)


def _client(opts: _HttpOptions) -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(opts.request_timeout_s, connect=opts.first_call_timeout_s))


@dataclass
class _Server:
    """One server's endpoints, each call retried on transient failures until ``deadline``."""

    client: httpx.Client
    url: str
    opts: _HttpOptions
    deadline: float

    def call(self, method: str, path: str, timeout: float | None = None, **kwargs: Any) -> httpx.Response:
        def once() -> httpx.Response:
            resp = self.client.request(method, self.url + path, timeout=timeout or httpx.USE_CLIENT_DEFAULT, **kwargs)
            resp.raise_for_status()
            return resp

        try:
            return retry_sync(once, self.opts.retry, f"{self.url}: {method} {path}", self.deadline)
        except HttpRolloutError as exc:
            cause = exc.__cause__
            hint = ""
            if isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 404:
                hint = " (start the server with VLLM_SERVER_DEV_MODE=1: these endpoints exist only then)"
            raise WeightSyncError(f"{exc}{hint}") from cause

    def reload(self, path: str, version: int) -> None:
        """Pause, reload from ``path``, drop cached prefixes, label the version, resume."""
        try:  # a short first call: a hung server fails the sync now, not at the deadline
            self.call("GET", "/is_paused", timeout=self.opts.first_call_timeout_s)
        except WeightSyncError as exc:
            if isinstance(exc.__cause__, httpx.TimeoutException):
                raise WeightSyncError(
                    f"{self.url} did not answer GET /is_paused within {self.opts.first_call_timeout_s:g} s: the "
                    f"server (or its engine) is hung; no weights were loaded there ({exc})"
                ) from None
            raise
        self.call("POST", "/pause", params={"mode": self.opts.pause_mode})
        try:
            rpc = {"method": "reload_weights", "kwargs": {"weights_path": path}, "timeout": self.opts.request_timeout_s}
            self.call("POST", "/collective_rpc", json=rpc)
            # Cached prefixes hold keys/values of the old weights; running requests are recomputed.
            reset = self.call("POST", "/reset_prefix_cache", params={"reset_running_requests": "true"})
            if reset.json().get("success") is False:
                raise WeightSyncError(
                    f"{self.url}: the prefix cache could not be reset after the reload; cached prompts would reuse "
                    "keys/values of the old weights"
                )
            with contextlib.suppress(WeightSyncError):  # older servers lack it; it is only a label
                self.call("POST", "/update_weight_version", json={"new_version": str(version)})
        except BaseException:
            with contextlib.suppress(WeightSyncError):  # the reload's error is the one to report
                self.call("POST", "/resume")
            raise
        self.call("POST", "/resume")

    def parity(self, probe: ParityProbe, models: dict[str, str]) -> float:
        """The largest |server - expected| log-prob over the probe (the server scores it as a prompt)."""
        if self.url not in models:
            models[self.url] = self.call("GET", "/v1/models").json()["data"][0]["id"]
        body = {
            "model": models[self.url],
            "prompt": list(probe.tokens),
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
        }
        scored = self.call("POST", "/v1/completions", json=body).json()["choices"][0].get("prompt_logprobs")
        if not scored or len(scored) != len(probe.tokens):
            raise WeightSyncError(f"{self.url} returned no prompt_logprobs for the parity probe")
        got = [scored[i][str(tok)]["logprob"] for i, tok in enumerate(probe.tokens) if i > 0]
        return max(abs(a - b) for a, b in zip(got, probe.expected_logprobs, strict=True))
