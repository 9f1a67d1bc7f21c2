"""Workflows and the engine that runs them over tasks.

A workflow is user code that plays one rollout of one task::

    async def solve(task: dict, engine) -> Episode | Trajectory | list[Trajectory]: ...

or a subclass of :class:`Workflow` implementing ``async def run(self, task, engine)``. Extra
keyword arguments come from ``workflow.args`` (a class gets them in its constructor, once per
episode, so instances may hold per-episode state; a function gets them as keyword arguments).

:class:`WorkflowEngine` runs ``rollout.n`` rollouts per task (``rollout.n_val`` in validation)
with a concurrency limit, a per-episode timeout and retries, and turns whatever happens into an
:class:`Episode`: a workflow that raises, hangs past its timeout or returns something that is not
an episode gives an episode with termination reason ``error``/``timeout`` and the traceback in
``info["error"]``; training goes on. It fills ``task``, ``task_id`` (``task[data.id_key]``, which
the data loader sets to the row index when missing) and ``rollout_idx``, and applies the
configured reward function to trajectories whose ``reward`` is None. A sync reward function runs in
worker threads, never on the event loop; the calls submitted in one loop tick share thread hops. A
reward function that raises or exceeds ``reward.timeout`` scores 0 and is counted, never a crash;
a thread stuck in a call past its timeout is replaced, never waited for (see :class:`_RewardRunner`).
Counters of such events are kept in :attr:`WorkflowEngine.counters` and drained by the trainer
once per step (``reward/stuck_threads`` is not an event count but how many such threads remain).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import queue
import sys
import threading
import time
import traceback
import types
import warnings
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rllm_core.engine import PROMPT_TOO_LONG, RolloutEngine, SamplingEngine
from rllm_core.rows import TEMPERATURE_KEY
from rllm_core.types import Episode, RewardOutput, TerminationReason, Trajectory

if TYPE_CHECKING:
    from rllm_core.config import RLLMConfig

__all__ = ["Workflow", "WorkflowEngine", "resolve_reward", "resolve_workflow"]


class Workflow:
    """Base class for class-based workflows; one instance per episode, built with ``workflow.args``."""

    def __init__(self, **args: Any) -> None:
        self.args = args

    async def run(self, task: dict[str, Any], engine: SamplingEngine) -> Episode | Trajectory | list[Trajectory]:
        raise NotImplementedError(f"{type(self).__name__} must implement async run(task, engine)")


def _accepted_kwargs(fn: Callable[..., Any], args: Mapping[str, Any], where: str, skip: int) -> dict[str, Any]:
    """The subset of ``args`` ``fn`` accepts; unknown keys are an error naming ``where``."""
    if not args:
        return {}
    try:
        params = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):
        return dict(args)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(args)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(args) - names)
    if unknown:
        from rllm_core.config import ConfigError

        raise ConfigError(
            f"{where}.{unknown[0]}: {getattr(fn, '__qualname__', fn)!s} accepts no argument {unknown[0]!r}; "
            f"it accepts: {', '.join(sorted(names)) or '(none)'}"
        )
    return dict(args)


def _resolve_name(kind: str, spec: str) -> Any:
    """The object registered as ``spec`` (or imported from ``module:attr``); errors name ``<kind>.name``."""
    from rllm_core.config import ConfigError
    from rllm_core.plugins import UnknownPluginError, get_registry

    try:
        return get_registry().resolve(kind, spec)
    except UnknownPluginError as exc:
        raise ConfigError(f"{kind}.name: {exc}") from None


def resolve_workflow(spec: Any, args: Mapping[str, Any] | None = None) -> Callable[[dict, SamplingEngine], Any]:
    """A callable ``(task, engine) -> awaitable`` for a registered name, ``module:attr`` or object.

    A bad name, or one that is not a workflow, is a ``ConfigError`` naming ``workflow.name``;
    an argument the workflow does not take names ``workflow.args.<key>``.
    """
    from rllm_core.config import ConfigError

    args = dict(args or {})
    obj = _resolve_name("workflow", spec) if isinstance(spec, str) else spec
    if inspect.isclass(obj):
        if not callable(getattr(obj, "run", None)):
            raise ConfigError(f"workflow.name: workflow class {obj.__name__} has no run(task, engine) method")
        init_kwargs = _accepted_kwargs(obj.__init__, args, "workflow.args", skip=1)

        async def run_class(task: dict, engine: SamplingEngine) -> Any:
            return await obj(**init_kwargs).run(task, engine)

        run_class.__qualname__ = obj.__qualname__
        return run_class
    if isinstance(obj, Workflow):
        return obj.run
    if not callable(obj):
        raise ConfigError(f"workflow.name: {spec!r} is neither a function nor a Workflow class")
    kwargs = _accepted_kwargs(obj, args, "workflow.args", skip=2)

    async def run_fn(task: dict, engine: SamplingEngine) -> Any:
        result = obj(task, engine, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    run_fn.__qualname__ = getattr(obj, "__qualname__", repr(obj))
    return run_fn


def resolve_reward(spec: Any, args: Mapping[str, Any] | None = None) -> Callable[..., Any] | None:
    """The reward function for a registered name, ``module:attr`` or callable (None: no reward fn).

    A bad name, or one that is not callable, is a ``ConfigError`` naming ``reward.name``; an
    argument the function does not take names ``reward.args.<key>``.
    """
    from rllm_core.config import ConfigError

    if spec is None:
        return None
    fn = _resolve_name("reward", spec) if isinstance(spec, str) else spec
    if not callable(fn):
        raise ConfigError(f"reward.name: {spec!r} is not callable (a reward is fn(task, action))")
    kwargs = _accepted_kwargs(fn, dict(args or {}), "reward.args", skip=2)
    if not kwargs:
        return fn

    def bound(task: Any, action: Any) -> Any:
        return fn(task, action, **kwargs)

    bound._rllm_async = inspect.iscoroutinefunction(fn)  # type: ignore[attr-defined]
    return bound


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class _Call:
    """One queued reward call; a worker thread writes ``result``/``error``, then ``finished``."""

    __slots__ = (
        "action",
        "batch",
        "error",
        "expired",
        "finished",
        "future",
        "result",
        "started",
        "task",
        "written_off",
    )

    def __init__(self, task: Any, action: Any, future: asyncio.Future, batch: _Batch) -> None:
        self.task = task
        self.action = action
        self.future = future
        self.batch = batch
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = False
        self.finished = False
        self.expired = False
        self.written_off = False


class _Batch:
    """The calls submitted in one event-loop tick: they share one timeout timer."""

    __slots__ = ("calls", "remaining", "timer")

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.remaining = 0
        self.timer: asyncio.TimerHandle | None = None


class _RewardRunner:
    """Runs a blocking reward function in worker threads, many calls per thread hop.

    One thread hop per call (``run_in_executor`` + ``wait_for``, ~85 us here) costs more than a
    typical reward function, and a step scores ~1,000 trajectories that mostly finish in the same
    event-loop tick. So calls go to a shared queue; a *drainer* job on a worker thread runs queued
    calls until the queue is empty and hands results back to the loop in batches. While calls stay
    queued (slow rewards, or one that hangs), a supervisor adds a drainer every few milliseconds,
    up to ``max_workers``, so blocking (I/O, subprocess) rewards still get the pool's parallelism
    and a hung call never holds the others up. A call's timeout runs from its submission, as with
    one executor job per call; a call whose timeout passes before a drainer reaches it never runs.

    Python cannot stop a thread, so a call still running at its timeout is *written off*: its
    thread stops counting against ``max_workers`` (another drainer may take its place at once) and
    exits, dropping the result, when the call returns, if ever. Worker threads are daemon threads,
    so stuck calls never keep the process alive at exit (``ThreadPoolExecutor`` joins its threads
    at exit, which is why it is not used). At most ``max_stuck`` threads are written off at a time,
    so a reward that always hangs cannot create threads without bound: past that, a stuck worker
    keeps its place and later calls time out waiting. Reward functions are never pickled, so any
    callable works (closures, lambdas, objects holding state or connections).
    """

    _post_every = 0.002
    """Seconds a drainer may hold finished results before handing them to the loop."""
    _idle_exit = 10.0
    """Seconds an idle worker thread waits for a job before it exits."""

    def __init__(self, fn: Callable[..., Any], timeout: float, max_workers: int = 32, max_stuck: int = 128) -> None:
        self.fn = fn
        self.timeout = timeout
        self.max_workers = max_workers
        self.max_stuck = max_stuck
        self.stuck = 0
        """Threads written off and still inside a call that outlived its timeout."""
        self._supervise_every = min(0.005, timeout / 10)
        self._lock = threading.Lock()
        self._queue: collections.deque[_Call] = collections.deque()
        self._active = 0  # drainer jobs queued or running (<= max_workers)
        self._workers = 0  # live worker threads, written-off ones excluded
        self._jobs: queue.SimpleQueue[asyncio.AbstractEventLoop | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # one token per worker waiting for a job
        self._closed = False
        self._warnings = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batch: _Batch | None = None
        self._supervising = False

    def submit(self, task: Any, action: Any) -> asyncio.Future:
        """Queue ``fn(task, action)``; the future gets its result, its exception or ``TimeoutError``."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new asyncio.run(): callbacks scheduled on the old loop are gone
            self._loop = loop
            self._batch = None
            self._supervising = False
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
            loop.call_soon(self._flush)
        call = _Call(task, action, loop.create_future(), batch)
        batch.calls.append(call)
        return call.future

    def close(self) -> None:
        """Let idle and busy workers exit; written-off threads exit when their call returns."""
        with self._lock:
            self._closed = True
            workers = self._workers
        for _ in range(workers):
            self._jobs.put(None)

    # -- loop side -------------------------------------------------------------------------

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        loop = self._loop
        if batch is None or loop is None:
            return
        batch.remaining = len(batch.calls)
        batch.timer = loop.call_later(self.timeout, self._expire, batch)
        with self._lock:
            self._queue.extend(batch.calls)
        self._kick(loop)

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._spawn()
        if not self._supervising:
            self._supervising = True
            loop.call_later(self._supervise_every, self._supervise, loop)

    def _spawn(self) -> None:
        with self._lock:
            if self._closed or not self._queue or self._active >= self.max_workers:
                return
            self._active += 1
            # An idle worker takes the job, else a new thread (busy workers take it when they are done).
            new_thread = not self._idle.acquire(blocking=False) and self._workers < self.max_workers
            if new_thread:
                self._workers += 1
        self._jobs.put(self._loop)
        if new_thread:
            threading.Thread(target=self._work, name="rllm-reward", daemon=True).start()

    def _supervise(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            return
        with self._lock:
            waiting = bool(self._queue)
        if waiting and not self._closed:
            # Calls still queued a supervision period later: the drainers are slow or stuck.
            self._spawn()
            loop.call_later(self._supervise_every, self._supervise, loop)
        else:
            self._supervising = False

    @staticmethod
    def _resolve(call: _Call) -> None:
        fut = call.future
        if fut.done():
            return
        if call.error is not None:
            fut.set_exception(call.error)
        else:
            fut.set_result(call.result)
        batch = call.batch
        batch.remaining -= 1
        if batch.remaining == 0 and batch.timer is not None:
            batch.timer.cancel()  # releases the batch (and its tasks) now rather than at the timeout

    def _deliver(self, calls: list[_Call]) -> None:
        for call in calls:
            self._resolve(call)

    def _expire(self, batch: _Batch) -> None:
        written_off = 0
        with self._lock:
            for call in batch.calls:
                if call.future.done() or call.finished:
                    continue
                call.expired = True
                if call.started and self.stuck < self.max_stuck:
                    call.written_off = True
                    self.stuck += 1
                    self._active -= 1
                    self._workers -= 1
                    written_off += 1
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        for call in batch.calls:
            if call.future.done():
                continue
            if call.finished:  # done in its thread, not yet handed over
                self._resolve(call)
            elif call.started:
                call.future.set_exception(
                    asyncio.TimeoutError(f"reward function {name} exceeded reward.timeout={self.timeout}s")
                )
            else:
                call.future.set_exception(
                    asyncio.TimeoutError(
                        f"reward call never ran: no reward worker was free within reward.timeout={self.timeout}s "
                        f"({self.stuck} worker threads are stuck in calls that timed out)"
                    )
                )
        if written_off:
            # Once when it first happens, once more if the cap is reached.
            if self._warnings == 0 or (self._warnings == 1 and self.stuck >= self.max_stuck):
                self._warnings += 1
                warnings.warn(
                    f"reward function {name} is still running after reward.timeout={self.timeout}s; Python cannot "
                    f"stop a thread, so it is left to finish and another takes its place ({self.stuck} stuck; "
                    f"past {self.max_stuck}, none is replaced). A reward that can hang should limit its own work, "
                    "e.g. run it in a subprocess with a timeout",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if self._loop is not None:
                self._kick(self._loop)

    # -- worker side -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                loop = self._jobs.get(timeout=self._idle_exit)
            except queue.Empty:
                with self._lock:
                    # Taking back this thread's idle token fails only when a drainer job was just
                    # assigned to it: then stay for that job.
                    if self._idle.acquire(blocking=False):
                        self._workers -= 1
                        return
                continue
            if loop is None or not self._drain(loop):
                return
            self._idle.release()

    def _drain(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Run queued calls until none is left; False when this thread was written off."""
        fn = self.fn
        done: list[_Call] = []
        last_post = time.perf_counter()
        call: _Call | None = None
        while True:
            with self._lock:
                if call is not None and call.written_off:
                    self.stuck -= 1
                    kept = False
                    break
                if not self._queue or self._closed:
                    self._active -= 1
                    kept = True
                    break
                call = self._queue.popleft()
                call.started = True
            if call.expired:
                continue
            try:
                call.result = fn(call.task, call.action)
            except StopIteration as exc:  # a future cannot carry StopIteration
                call.error = RuntimeError(f"reward function raised StopIteration: {exc!r}")
            except BaseException as exc:
                call.error = exc
            call.finished = True
            done.append(call)
            now = time.perf_counter()
            if now - last_post >= self._post_every:
                self._post(loop, done)
                done, last_post = [], now
        if done:
            self._post(loop, done)
        return kept

    def _post(self, loop: asyncio.AbstractEventLoop, calls: list[_Call]) -> None:
        try:
            loop.call_soon_threadsafe(self._deliver, calls)
        except RuntimeError:  # that loop is closed: nobody waits for these any more
            pass


class WorkflowEngine:
    """Runs a workflow over tasks; what ``Backend.generate_episodes`` calls.

    ``workflow`` is a registered name, ``module:attr``, function, class or instance; when None it
    is taken from ``config.workflow.name``. ``reward_fn`` likewise (default ``config.reward.name``).
    """

    def __init__(
        self,
        workflow: Any,
        config: RLLMConfig,
        engine: RolloutEngine,
        reward_fn: Any = None,
    ) -> None:
        self.config = config
        wf_cfg = config.workflow
        spec = workflow if workflow is not None else wf_cfg.name
        if spec is None:
            from rllm_core.config import ConfigError

            raise ConfigError("workflow.name: no workflow configured; set a registered name or 'module:attr'")
        self.workflow_name = spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))
        self._run = resolve_workflow(spec, wf_cfg.args)
        self.reward_fn = resolve_reward(reward_fn if reward_fn is not None else config.reward.name, config.reward.args)
        self._reward_is_async = bool(
            self.reward_fn is not None
            and (inspect.iscoroutinefunction(self.reward_fn) or getattr(self.reward_fn, "_rllm_async", False))
        )
        self.engine = engine
        self.train_engine = SamplingEngine(engine, config.rollout.train_sampling, is_validation=False)
        self.val_engine = SamplingEngine(engine, config.rollout.val_sampling, is_validation=True)
        temperature = config.rollout.explore.temperature
        self.explore_engine = (
            SamplingEngine(engine, config.rollout.train_sampling, forced={"temperature": temperature})
            if temperature is not None
            else None
        )
        self.explore_tasks: set[str] = set()
        """Ids of the training tasks sampled at ``rollout.explore.temperature`` (the trainer keeps it)."""
        self._semaphore: asyncio.Semaphore | None = None
        self._rewards: _RewardRunner | None = None
        if self.reward_fn is not None and not self._reward_is_async:
            self._rewards = _RewardRunner(self.reward_fn, config.reward.timeout)
        self.counters: dict[str, float] = {}
        """Event counts since the last :meth:`pop_counters` (retries, reward failures...)."""

    # -- public API -----------------------------------------------------------------------

    async def execute_tasks(self, tasks: Sequence[dict[str, Any]], is_validation: bool = False) -> list[Episode]:
        """All rollouts of all ``tasks`` (``n`` or ``n_val`` each), in task then rollout order."""
        n = self.config.rollout.n_val if is_validation else self.config.rollout.n
        # One flat gather: a task per episode and no intermediate per-task gather.
        return list(await asyncio.gather(*(self.run_episode(t, i, is_validation) for t in tasks for i in range(n))))

    async def run_task(self, task: dict[str, Any], is_validation: bool = False, n: int | None = None) -> list[Episode]:
        """The ``n`` rollouts of one task (the unit the async loop streams)."""
        if n is None:
            n = self.config.rollout.n_val if is_validation else self.config.rollout.n
        return list(await asyncio.gather(*(self.run_episode(task, i, is_validation) for i in range(n))))

    async def stream(
        self, tasks: Sequence[dict[str, Any]], is_validation: bool = False
    ) -> AsyncIterator[list[Episode]]:
        """Yield each task's rollouts as soon as they are all complete (completion order)."""
        pending = {asyncio.ensure_future(self.run_task(t, is_validation=is_validation)) for t in tasks}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()

    async def run_episode(self, task: dict[str, Any], rollout_idx: int, is_validation: bool = False) -> Episode:
        """One rollout, with timeout, retries and reward; never raises unless ``raise_on_error``."""
        cfg = self.config.workflow
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(cfg.max_concurrency)
        task_id = self.task_id(task)
        engine = self.val_engine if is_validation else self.train_engine
        explore = not is_validation and self.explore_engine is not None and task_id in self.explore_tasks
        if explore:
            engine = self.explore_engine
        attempt = 0
        while True:
            async with self._semaphore:
                episode = await self._attempt(task, engine)
            if episode.termination_reason is not TerminationReason.ERROR or attempt >= cfg.retries:
                break
            attempt += 1
            self._count("workflow/retries")
        episode.task = task
        episode.task_id = task_id
        episode.rollout_idx = rollout_idx
        if explore:
            episode.info[TEMPERATURE_KEY] = self.config.rollout.explore.temperature
        if attempt:
            episode.info["attempts"] = attempt + 1
        if episode.termination_reason in _OPEN_ENDINGS:
            cut = _cut_by_length(episode)
            if cut == PROMPT_TOO_LONG:  # the engine had no room left in the context for an answer
                episode.termination_reason = TerminationReason.MAX_PROMPT_LENGTH
            elif cut:
                # The answer ran into max_tokens: that is what ``mask_termination_reasons:
                # [max_response_length]`` (overlong masking) keys on.
                episode.termination_reason = TerminationReason.MAX_RESPONSE_LENGTH
        if episode.termination_reason not in (TerminationReason.ERROR, TerminationReason.TIMEOUT):
            await self._apply_reward(task, episode)
        return episode

    def task_id(self, task: Any) -> str:
        key = self.config.data.id_key
        if (type(task) is dict or isinstance(task, Mapping)) and task.get(key) is not None:
            return str(task[key])
        return str(id(task))  # only for tasks that bypassed the data loader, which always sets it

    def pop_counters(self) -> dict[str, float]:
        """Event counts since the last call: the workflow engine's and the rollout engine's (tool calls,
        multi-turn continuations)."""
        counters, self.counters = self.counters, {}
        pop_engine = getattr(self.engine, "pop_counters", None)
        if pop_engine is not None:
            for key, value in pop_engine().items():
                counters[key] = counters.get(key, 0.0) + value
        if self._rewards is not None and self._rewards.stuck:
            # Not an event count: how many reward threads are still inside calls that timed out.
            counters["reward/stuck_threads"] = float(self._rewards.stuck)
        return counters

    def close(self) -> None:
        if self._rewards is not None:
            self._rewards.close()

    # -- internals ------------------------------------------------------------------------

    def _count(self, key: str, value: float = 1.0) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + value

    async def _attempt(self, task: dict[str, Any], engine: SamplingEngine) -> Episode:
        cfg = self.config.workflow
        try:
            if cfg.timeout is not None:
                result = await asyncio.wait_for(self._run(task, engine), cfg.timeout)
            else:
                result = await self._run(task, engine)
        except asyncio.TimeoutError:
            if cfg.raise_on_error:
                raise
            self._count("workflow/timeouts")
            return Episode(
                termination_reason=TerminationReason.TIMEOUT,
                info={"error": f"workflow {self.workflow_name} exceeded workflow.timeout={cfg.timeout}s"},
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if cfg.raise_on_error:
                raise
            self._count("workflow/errors")
            return Episode(termination_reason=TerminationReason.ERROR, info={"error": _error_text(exc)})
        try:
            return self._normalise(result)
        except TypeError as exc:
            if cfg.raise_on_error:
                raise
            self._count("workflow/malformed")
            return Episode(termination_reason=TerminationReason.ERROR, info={"error": str(exc)})

    def _normalise(self, result: Any) -> Episode:
        if isinstance(result, Episode):
            if not all(isinstance(t, Trajectory) for t in result.trajectories):
                raise TypeError(f"workflow {self.workflow_name} returned an Episode with non-Trajectory items")
            result.info.setdefault("_derive_correct", False)
            return result
        if isinstance(result, Trajectory):
            trajectories = [result]
        elif isinstance(result, list | tuple) and result and all(isinstance(t, Trajectory) for t in result):
            trajectories = list(result)
        else:
            raise TypeError(
                f"workflow {self.workflow_name} returned {type(result).__name__}; "
                "expected Episode, Trajectory or a non-empty list of Trajectory"
            )
        done = trajectories[-1].steps and trajectories[-1].steps[-1].done
        return Episode(
            trajectories=trajectories,
            termination_reason=TerminationReason.ENV_DONE if done else TerminationReason.UNKNOWN,
            info={"_derive_correct": True},
        )

    async def _apply_reward(self, task: dict[str, Any], episode: Episode) -> None:
        derive = episode.info.pop("_derive_correct", True)
        correct: list[bool] = []
        if self.reward_fn is not None:
            todo = []
            for traj in episode.trajectories:
                if traj.reward is not None or not traj.steps:
                    continue
                last = traj.steps[-1]
                todo.append((traj, last.action if last.action is not None else last.model_response))
            timeout = self.config.reward.timeout
            # Sync rewards: submit every trajectory before awaiting any, so they share worker-thread
            # hops. Async rewards are called one at a time below.
            futures = [self._rewards.submit(task, action) for _, action in todo] if self._rewards is not None else None
            for i, (traj, action) in enumerate(todo):
                try:
                    out = await futures[i] if futures is not None else self.reward_fn(task, action)
                    if inspect.isawaitable(out):
                        out = await _with_timeout(out, timeout)
                    traj.reward, is_correct = _reward_value(out)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    traj.reward, is_correct = self._reward_failed(exc, episode)
                correct.append(is_correct)
        if correct:
            episode.is_correct = any(correct)
        elif derive and episode.trajectories:
            episode.is_correct = sum(t.total_reward for t in episode.trajectories) > 0

    def _reward_failed(self, exc: Exception, episode: Episode) -> tuple[float, bool]:
        """A reward call that raised or timed out scores 0 and is counted."""
        if isinstance(exc, asyncio.TimeoutError):
            self._count("reward/timeouts")
            episode.info["reward_error"] = (
                str(exc) or f"reward function exceeded reward.timeout={self.config.reward.timeout}s"
            )
        else:
            self._count("reward/errors")
            episode.info["reward_error"] = _error_text(exc)
        return 0.0, False


_OPEN_ENDINGS = (TerminationReason.UNKNOWN, TerminationReason.ENV_DONE)


async def _with_timeout(awaitable: Any, timeout: float) -> Any:
    """``await awaitable`` within ``timeout`` seconds, in the caller's task (no task per call, unlike
    ``wait_for``). A coroutine runs here up to its first suspension first: one that finishes without
    waiting on anything (a trivial async reward, the common case) never arms a timer, which was a
    third of the cost of such a call; one that waits goes on under the timeout."""
    if not inspect.iscoroutine(awaitable):
        return await _under_timeout(awaitable, timeout)
    try:
        yielded = awaitable.send(None)
    except StopIteration as done:
        return done.value
    return await _under_timeout(_resume(awaitable, yielded), timeout)


if sys.version_info >= (3, 11):

    async def _under_timeout(awaitable: Any, timeout: float) -> Any:
        async with asyncio.timeout(timeout):
            return await awaitable

else:  # pragma: no cover - Python 3.10

    async def _under_timeout(awaitable: Any, timeout: float) -> Any:
        return await asyncio.wait_for(awaitable, timeout)


@types.coroutine
def _resume(coro: Any, yielded: Any) -> Any:
    """Go on awaiting ``coro``, which was driven by hand to a suspension where it yielded ``yielded``:
    that goes to the event loop, and what the loop sends or throws back goes to ``coro``."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation (the timeout's included)
            try:
                yielded = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as done:
                return done.value


def _cut_by_length(episode: Episode) -> str | None:
    """``length`` or ``prompt_too_long`` when the last step of some trajectory ended so, else None."""
    ends = {t.steps[-1].finish_reason for t in episode.trajectories if t.steps}
    return PROMPT_TOO_LONG if PROMPT_TOO_LONG in ends else ("length" if "length" in ends else None)


def _reward_value(out: Any) -> tuple[float, bool]:
    """(reward, is_correct) from what a reward function returned."""
    if isinstance(out, RewardOutput):
        reward = float(out.reward)
        return reward, out.is_correct if out.is_correct is not None else reward > 0
    reward = float(out)
    return reward, reward > 0
