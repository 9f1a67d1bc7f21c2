"""The fully-async coordinator: staleness bound, weight syncs, pause and drain, tasks given back.

Versions count optimiser updates. A sample's staleness when trained is ``v - w``: ``v`` the
version of the policy being updated, ``w`` the oldest ``weight_version`` among the episode's
steps. The bound ``v - w <= max_staleness`` is kept in two ways:

* Admission: generation may start a task only while the number of tasks admitted is below
  ``(synced_steps + max_staleness + 1) * batch_size`` plus the tasks given back. In the order
  tasks are admitted, this is exactly the bound; it also stops generation from running ahead.
* Consumption: completion order can differ from admission order (a slow episode finishes late),
  so the training loop checks each result when it takes it and drops those that would break the
  bound (``async/dropped_stale``).

A task whose result was dropped as stale, or whose generation failed, is *given back*: its
admission slot is freed and the task is generated again ahead of new ones (``async/requeued``), up
to ``max_requeues`` times; after that it is given up (``async/given_up``). Without this a run
would train on fewer tasks than its data holds, and lose the slow (long, multi-turn) rollouts
first, and abandoned admissions would never be freed: training would wait for results that
generation could never be admitted to produce.

Around a weight sync, unless ``partial_rollout``, the coordinator pauses admission and waits for
in-flight rollouts to finish (drain), so no episode mixes two policies. With ``partial_rollout``
generation runs through the sync and episodes may span versions (their oldest version counts).

Every wait ends early on :meth:`Coordinator.request_stop` (Ctrl-C) and :meth:`Coordinator.fail`
(an error the training loop must raise).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from rllm_core.types import Episode

__all__ = ["Coordinator", "TaskResult"]

Key = tuple[int, int]
"""A task's ``(epoch, position)`` in the data loader's order."""


@dataclass
class TaskResult:
    """The rollouts of one task, as the generation loop queues them."""

    epoch: int
    position: int
    episodes: list[Episode]
    key: Key = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.epoch, self.position)

    @property
    def oldest_version(self) -> int | None:
        versions = [s.weight_version for e in self.episodes for t in e.trajectories for s in t.steps]
        versions = [v for v in versions if v is not None]
        return min(versions) if versions else None


class Coordinator:
    """Shared state between the async generation and training loops (one event loop)."""

    def __init__(
        self,
        batch_size: int,
        max_staleness: int,
        sync_every: int,
        partial_rollout: bool,
        *,
        start_step: int = 0,
        max_requeues: int = 2,
        todo: Iterable[Key] = (),
    ) -> None:
        self.batch_size = batch_size
        self.max_staleness = max_staleness
        self.sync_every = sync_every
        self.partial_rollout = partial_rollout
        self.max_requeues = max_requeues
        self.start_step = start_step
        self.synced_step = start_step
        """Trainer step count at the last weight sync."""
        self.admitted = 0
        self.released = 0
        """Admission slots freed by tasks given back (each lets one more task in)."""
        self.todo: deque[Key] = deque(todo)
        """Tasks to generate before new ones: given back, or pending in the checkpoint resumed from."""
        self.waiting: set[Key] = set()
        self.in_flight: dict[Key, Any] = {}
        self.queue: deque[TaskResult] = deque()
        self.requeues: dict[Key, int] = {}
        self.paused = False
        self.generation_done = False
        self.stopping = False
        self.error: BaseException | None = None
        self.counters = dict.fromkeys(_COUNTERS, 0.0)
        self.discarded: list[TaskResult] = []
        """Results the last :meth:`take` discarded as uninformative (dynamic sampling)."""
        self._cond = asyncio.Condition()
        self._wake: asyncio.Task | None = None
        # Busy-time accounting for the generation side (at least one rollout in flight).
        self._gen_busy = 0.0
        self._gen_busy_since: float | None = None

    # -- generation side ----------------------------------------------------------------------

    def capacity(self) -> int:
        return (self.synced_step - self.start_step + self.max_staleness + 1) * self.batch_size + self.released

    def next_todo(self) -> Key | None:
        """The next task given back (or pending from the checkpoint), now counted as waiting."""
        if not self.todo:
            return None
        key = self.todo.popleft()
        self.waiting.add(key)
        return key

    def hold(self, key: Key) -> None:
        """Count a task just taken from the data loader as waiting (pending if the run stops now)."""
        self.waiting.add(key)

    async def admit(self, key: Key, payload: Any = None) -> bool:
        """Wait until a waiting task may start; count it as in flight. False when stopping."""
        async with self._cond:
            await self._cond.wait_for(
                lambda: self._interrupted() or (not self.paused and self.admitted < self.capacity())
            )
            if self._interrupted():
                return False
            self.waiting.discard(key)
            self.admitted += 1
            if not self.in_flight:
                self._gen_busy_since = time.perf_counter()
            self.in_flight[key] = payload
            return True

    async def complete(self, result: TaskResult) -> None:
        async with self._cond:
            self.in_flight.pop(result.key, None)
            self._mark_idle_if_empty()
            self.queue.append(result)
            self._cond.notify_all()

    async def give_back(self, key: Key, *, failed: bool = False) -> None:
        """A task whose generation failed (``failed``) or whose result was too stale: requeue or give up."""
        async with self._cond:
            self.in_flight.pop(key, None)
            self._mark_idle_if_empty()
            if failed:
                self.counters["async/generate_failures"] += 1
            self._give_back(key)

    def _give_back(self, key: Key) -> None:
        self.released += 1
        count = self.requeues.get(key, 0)
        if count < self.max_requeues:
            self.requeues[key] = count + 1
            self.todo.append(key)
            self.counters["async/requeued"] += 1
        else:
            self.requeues.pop(key, None)
            self.counters["async/given_up"] += 1
        self._cond.notify_all()

    async def wait_for_todo(self) -> bool:
        """When the data is exhausted: wait until a task is given back (True) or none can be (False).

        A result can be given back while it is in flight or queued; once both are empty, and
        nothing waits to be regenerated, generation is over.
        """
        async with self._cond:
            await self._cond.wait_for(
                lambda: self.todo or self._interrupted() or (not self.in_flight and not self.queue)
            )
            return bool(self.todo) and not self._interrupted()

    async def finish_generation(self) -> None:
        async with self._cond:
            self.generation_done = True
            self._cond.notify_all()

    def _mark_idle_if_empty(self) -> None:
        if not self.in_flight and self._gen_busy_since is not None:
            self._gen_busy += time.perf_counter() - self._gen_busy_since
            self._gen_busy_since = None

    def gen_busy_time(self) -> float:
        """Seconds with at least one rollout in flight, since the start."""
        extra = time.perf_counter() - self._gen_busy_since if self._gen_busy_since is not None else 0.0
        return self._gen_busy + extra

    # -- either side --------------------------------------------------------------------------

    def _interrupted(self) -> bool:
        return self.stopping or self.error is not None

    async def fail(self, error: BaseException) -> None:
        """Make the training loop raise ``error`` (the first one wins) from its current or next wait."""
        async with self._cond:
            if self.error is None:
                self.error = error
            self._cond.notify_all()

    def request_stop(self) -> None:
        """End every wait now (the run is stopping). Call it from the event loop's thread."""
        self.stopping = True
        self._wake = asyncio.ensure_future(self._notify())  # notify_all needs the lock: a task takes it

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    def pop_counters(self) -> dict[str, float]:
        """Drops, requeues, give-ups and generation failures since the last call (per-step metrics)."""
        counters, self.counters = self.counters, dict.fromkeys(_COUNTERS, 0.0)
        return counters

    # -- training side ------------------------------------------------------------------------

    async def take(
        self,
        current_version: int,
        keep: Callable[[TaskResult], bool] | None = None,
        max_discards: int = 0,
    ) -> list[TaskResult]:
        """Up to ``batch_size`` fresh task results (fewer only when generation is done).

        Results too stale for ``current_version`` are given back. With ``keep`` (dynamic sampling),
        up to ``max_discards`` results it rejects are discarded: their slots let new tasks in, and
        they are left in :attr:`discarded` for the step's metrics. Returns nothing when the run is
        stopping (results taken so far stay queued, so a checkpoint keeps them pending); raises
        the error of :meth:`fail`.
        """
        taken: list[TaskResult] = []
        self.discarded = []
        async with self._cond:
            while len(taken) < self.batch_size:
                await self._cond.wait_for(
                    lambda: self.queue or self._interrupted() or (self.generation_done and not self.in_flight)
                )
                if self.error is not None:
                    raise self.error
                if self.stopping:
                    self.queue.extendleft(reversed(taken))
                    return []
                if not self.queue:
                    break
                result = self.queue.popleft()
                self._cond.notify_all()  # generation may be waiting for the queue to empty
                oldest = result.oldest_version
                if oldest is not None and current_version - oldest > self.max_staleness:
                    self.counters["async/dropped_stale"] += 1
                    self._give_back(result.key)
                    continue
                if keep is not None and len(self.discarded) < max_discards and not keep(result):
                    self.discarded.append(result)
                    self.counters["dynamic/discarded_tasks"] += 1
                    self.released += 1  # generated and judged: its slot goes to a new task
                    continue
                taken.append(result)
        for result in (*taken, *self.discarded):
            self.requeues.pop(result.key, None)
        return taken

    def pending_keys(self) -> list[Key]:
        """Tasks admitted or taken from the loader but not yet trained on, for checkpoints."""
        return sorted({*self.todo, *self.waiting, *self.in_flight, *(r.key for r in self.queue)})

    async def sync(self, step: int, publish: Callable[[], Awaitable[None]]) -> float:
        """Push new weights: pause and drain unless ``partial_rollout``; returns seconds waited to drain.

        A stop or an error ends the drain early: what is still in flight then is never trained.
        """
        waited = 0.0
        async with self._cond:
            if not self.partial_rollout:
                self.paused = True
                start = time.perf_counter()
                await self._cond.wait_for(lambda: not self.in_flight or self._interrupted())
                waited = time.perf_counter() - start
        try:
            await publish()
        finally:
            await self.mark_synced(step)
        return waited

    async def mark_synced(self, step: int) -> None:
        """The sampler serves the weights of ``step``: admission opens up to the bound again."""
        async with self._cond:
            self.synced_step = step
            self.paused = False
            self._cond.notify_all()


_COUNTERS = (
    "async/dropped_stale",
    "async/requeued",
    "async/given_up",
    "async/generate_failures",
    "dynamic/discarded_tasks",
)
