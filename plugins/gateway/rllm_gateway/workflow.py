"""The ``blackbox`` workflow: train an agent that talks to the model through the OpenAI API.

Per episode: open a gateway session, run the agent against it, build the episode from the session's
traces (one trajectory per lineage, :mod:`rllm_gateway.lineage`), close the session. The agent is

- a Python callable ``agent(task, base_url, api_key)``, sync (run in a worker thread) or async
  (``workflow.args.agent: "module:attr"``); its return value is the final answer; or
- a command (``workflow.args.command: [...]``) run with ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` (and
  ``RLLM_SESSION_ID``) in its environment and the task as JSON on stdin; its last non-empty stdout
  line is the final answer.

The reward: a reward the agent posted to ``POST {base_url without /v1}/reward {"reward": x}`` is set
on every trajectory; otherwise the configured reward function (``reward.name``) scores the final
answer (it is the ``action`` of each trajectory's last step). An agent that raises, exits non-zero
or outlives ``timeout`` gives an ``error`` / ``timeout`` episode (what it recorded is kept, with no
reward) and training goes on. A sync callable cannot be stopped: past its timeout it is left to
finish in its thread.

One gateway per process, started on first use (:func:`get_gateway`) and stopped at exit. Its counters
(:meth:`Gateway.pop_counters`) are moved into the rollout engine's as each episode ends, so the
workflow engine drains them into the step's metrics with the engine's own.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import itertools
import json
import os
import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from rllm_core.types import Episode, TerminationReason
from rllm_gateway.lineage import trajectories_from_traces
from rllm_gateway.server import Gateway, SessionRecord

__all__ = ["blackbox", "get_gateway"]

_gateway: Gateway | None = None
_gateway_lock = threading.Lock()
_session_ids = itertools.count()


def get_gateway(**settings: Any) -> Gateway:
    """The process's gateway, started on first call (``settings`` go to :class:`Gateway` then)."""
    global _gateway
    with _gateway_lock:
        if _gateway is None or not _gateway.running:
            _gateway = Gateway(**settings).start()
            atexit.register(_gateway.stop)
        return _gateway


class AgentError(RuntimeError):
    """The agent failed (raised, or its command exited non-zero)."""


async def blackbox(
    task: dict[str, Any],
    engine: Any,
    *,
    agent: Any = None,
    command: Sequence[str] | None = None,
    timeout: float = 600.0,
    sampling: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    role: str = "agent",
    retries: int = 2,
    backoff_s: float = 0.5,
    gateway: Mapping[str, Any] | None = None,
) -> Episode:
    """Run one black-box agent episode (see the module docstring).

    ``agent``: ``"module:attr"`` or a callable; ``command``: argv of a program (exactly one of the
    two). ``timeout``: seconds for the agent. ``sampling``: settings that override what the agent
    asks for (e.g. ``max_tokens``). ``env``: extra environment for ``command``. ``role``: the
    trajectories' name. ``retries`` / ``backoff_s``: an agent run that failed on a transient
    connection error (refused, reset, a dropped connection; not an HTTP error status) is run again in
    a fresh session after ``backoff_s * 2**attempt`` seconds, up to ``retries`` times, before the
    episode counts as an error. ``gateway``: settings of the process's gateway when this call starts
    it (``host``, ``port``, ``advertise``; e.g. ``{host: 0.0.0.0}`` for agents on other machines).
    """
    if (agent is None) == (command is None):
        raise ValueError("workflow.args: set exactly one of agent ('module:attr') and command ([argv...])")
    server = get_gateway(**dict(gateway or {}))
    base_id = task.get("id", "task") if isinstance(task, Mapping) else "task"
    attempt = 0
    while True:
        session_id = f"{base_id}:{next(_session_ids)}"
        base_url, key = server.open(session_id, engine=engine, sampling=sampling)
        reason, error, answer, transient = TerminationReason.ENV_DONE, None, None, False
        try:
            if agent is not None:
                answer = await asyncio.wait_for(_run_callable(_resolve(agent), task, base_url, key), timeout)
            else:
                answer = await _run_command(list(command or []), task, base_url, key, session_id, timeout, env)
        except (asyncio.TimeoutError, TimeoutError):
            reason, error = TerminationReason.TIMEOUT, f"agent exceeded workflow.args.timeout={timeout}s"
        except AgentError as exc:
            reason, error = TerminationReason.ERROR, str(exc)
        except Exception as exc:
            transient = _is_connection_error(exc)
            reason = TerminationReason.ERROR
            error = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        finally:
            record = server.consume(session_id)
            _drain_counters(server, engine)
        if not transient or attempt >= retries:
            episode = _episode(record, reason, error, answer, role)
            if attempt:
                episode.info["connection_retries"] = attempt
            return episode
        await asyncio.sleep(backoff_s * 2**attempt)
        attempt += 1


def _drain_counters(server: Gateway, engine: Any) -> None:
    """Move the gateway's counters into the rollout engine's (sums added, ``*_max`` keys maxed).

    Runs on the trainer's loop, the only thread that touches the engine's counters.
    """
    target = getattr(engine, "engine", engine)  # workflows get a SamplingEngine around the RolloutEngine
    counters = getattr(target, "counters", None)
    if not isinstance(counters, dict):
        return
    for key, value in server.pop_counters().items():
        counters[key] = max(counters.get(key, 0.0), value) if key.endswith("_max") else counters.get(key, 0.0) + value


def _is_connection_error(exc: BaseException) -> bool:
    """A transient transport failure (anywhere in the cause chain): worth another try."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ConnectionError) or type(exc).__name__ in (
            "APIConnectionError",
            "ConnectError",
            "RemoteProtocolError",
            "ReadError",
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _episode(record: SessionRecord, reason: TerminationReason, error: str | None, answer: Any, role: str) -> Episode:
    trajectories = trajectories_from_traces(record.traces, name=role)
    episode = Episode(
        trajectories=trajectories,
        termination_reason=reason,
        info={"gateway_session": record.session_id, "gateway_calls": len(record.traces), "answer": answer},
    )
    if error is not None:
        episode.info["error"] = error
        return episode
    for traj in trajectories:
        last = traj.steps[-1]
        last.done = True
        if answer is not None:
            last.action = answer
        if record.reward is not None:
            traj.reward = record.reward
    if record.reward is not None:
        episode.is_correct = record.reward > 0
    return episode


def _resolve(agent: Any) -> Any:
    if isinstance(agent, str):
        from rllm_core.plugins import import_object

        return import_object(agent)
    if not callable(agent):
        raise ValueError(f"workflow.args.agent: {agent!r} is not callable")
    return agent


async def _run_callable(fn: Any, task: Any, base_url: str, key: str) -> Any:
    if inspect.iscoroutinefunction(fn):
        result = await fn(task, base_url, key)
    else:
        result = await asyncio.to_thread(fn, task, base_url, key)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _run_command(
    argv: list[str],
    task: Any,
    base_url: str,
    key: str,
    session_id: str,
    timeout: float,
    env: Mapping[str, str] | None,
) -> str | None:
    if not argv:
        raise ValueError("workflow.args.command: an empty command")
    environ = {**os.environ, **(env or {}), "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": key}
    environ["RLLM_SESSION_ID"] = session_id
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(json.dumps(task, default=str).encode()), timeout)
    finally:
        if proc.returncode is None:  # timed out or cancelled: the agent must not outlive its episode
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        tail = stderr.decode(errors="replace")[-2000:]
        raise AgentError(f"agent command {argv[0]!r} exited with status {proc.returncode}: {tail}")
    lines = [line for line in stdout.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else None
