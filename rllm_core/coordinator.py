"""The fully-async coordinator: staleness bound, weight syncs, pause and drain.

Versions count optimiser updates. A sample's staleness when trained is ``v - w``: ``v`` the
version of the policy being updated, ``w`` the oldest ``weight_version`` among the episode's
steps. The bound ``v - w <= max_staleness`` is kept in two ways:

* Admission: generation may start a new task only while the number of tasks admitted is below
  ``(synced_steps + max_staleness + 1) * batch_size`` (plus tasks dropped as stale). In the order
  tasks are admitted, this is exactly the bound; it also stops generation from running ahead.
* Consumption: completion order can differ from admission order (a slow episode finishes late),
  so the training loop checks each group when it takes it and drops those that would break the
  bound (counted as ``async/dropped_stale``), replacing them with fresh ones.

Around a weight sync, unless ``partial_rollout``, the coordinator pauses admission and waits for
in-flight rollouts to finish (drain), so no episode mixes two policies. With ``partial_rollout``
generation runs through the sync and episodes may span versions (their oldest version counts).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from rllm_core.types import Episode

__all__ = ["Coordinator", "TaskResult"]


@dataclass
class TaskResult:
    """The rollouts of one task, as the generation loop queues them."""

    epoch: int
    position: int
    episodes: list[Episode]
    key: tuple[int, int] = field(init=False)

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
        self, batch_size: int, max_staleness: int, sync_every: int, partial_rollout: bool, *, start_step: int = 0
    ) -> None:
        self.batch_size = batch_size
        self.max_staleness = max_staleness
        self.sync_every = sync_every
        self.partial_rollout = partial_rollout
        self.start_step = start_step
        self.synced_step = start_step
        """Trainer step count at the last weight sync."""
        self.admitted = 0
        self.dropped = 0
        self.in_flight: dict[tuple[int, int], Any] = {}
        self.waiting: set[tuple[int, int]] = set()
        self.queue: deque[TaskResult] = deque()
        self.paused = False
        self.generation_done = False
        self._cond = asyncio.Condition()
        # Busy-time accounting for the generation side (at least one rollout in flight).
        self._gen_busy = 0.0
        self._gen_busy_since: float | None = None

    # -- generation side ----------------------------------------------------------------------

    def capacity(self) -> int:
        return (self.synced_step - self.start_step + self.max_staleness + 1) * self.batch_size + self.dropped

    async def admit(self, key: tuple[int, int], payload: Any = None) -> None:
        """Wait until a new task may start; then count it as in flight."""
        async with self._cond:
            # Taken from the loader but not started yet: still pending if the run stops now.
            self.waiting.add(key)
            await self._cond.wait_for(lambda: not self.paused and self.admitted < self.capacity())
            self.waiting.discard(key)
            self.admitted += 1
            if not self.in_flight:
                self._gen_busy_since = time.perf_counter()
            self.in_flight[key] = payload

    async def complete(self, result: TaskResult) -> None:
        async with self._cond:
            self.in_flight.pop(result.key, None)
            self._mark_idle_if_empty()
            self.queue.append(result)
            self._cond.notify_all()

    async def abandon(self, key: tuple[int, int]) -> None:
        async with self._cond:
            self.in_flight.pop(key, None)
            self._mark_idle_if_empty()
            self._cond.notify_all()

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

    # -- training side ------------------------------------------------------------------------

    async def take(self, current_version: int) -> tuple[list[TaskResult], int]:
        """Up to ``batch_size`` fresh task results (fewer only when generation is done).

        Returns the results and how many were dropped as too stale for ``current_version``.
        """
        taken: list[TaskResult] = []
        dropped = 0
        async with self._cond:
            while len(taken) < self.batch_size:
                await self._cond.wait_for(lambda: self.queue or (self.generation_done and not self.in_flight))
                if not self.queue:
                    break
                result = self.queue.popleft()
                oldest = result.oldest_version
                if oldest is not None and current_version - oldest > self.max_staleness:
                    dropped += 1
                    self.dropped += 1
                    self._cond.notify_all()  # capacity grew: generation may admit a replacement
                    continue
                taken.append(result)
        return taken, dropped

    def pending_keys(self) -> list[tuple[int, int]]:
        """Tasks admitted but not yet trained on (in flight or queued), for checkpoints."""
        return sorted({*self.waiting, *self.in_flight, *(r.key for r in self.queue)})

    async def sync(self, step: int, publish: Callable[[], Awaitable[None]]) -> float:
        """Push new weights: pause and drain unless ``partial_rollout``; returns seconds waited to drain."""
        waited = 0.0
        async with self._cond:
            if not self.partial_rollout:
                self.paused = True
                start = time.perf_counter()
                await self._cond.wait_for(lambda: not self.in_flight)
                waited = time.perf_counter() - start
        try:
            await publish()
        finally:
            async with self._cond:
                self.synced_step = step
                self.paused = False
                self._cond.notify_all()
        return waited
