"""``BackendProtocol``: what a backend implements, and ``TrainerState``, what the stages share.

A backend owns the model, the sampler and the optimiser; the trainer owns the loop. Per training
step the trainer calls, in order::

    generate_episodes -> (group, filter) -> [token rows] -> transform_to_backend_batch
        -> process_backend_batch -> compute_advantages -> [row advantages] -> update_policy
        -> [on_policy_updated when the version changes]

Token rows (``state.rows``, :mod:`rllm_core.rows`) are the one form in which the groups reach a
backend: ids, loss mask, sampling logprobs and advantages aligned token by token. A backend turns
them into its own tensors (datums, ``DataProto``) in ``transform_to_backend_batch``; it never walks
the steps itself. ``compute_advantages`` comes after ``process_backend_batch`` so a backend can use
what that stage computed (reference logprobs for a KL-in-reward, values); it writes
``step.advantage`` and the trainer then copies those into ``state.rows.advantages``, which
``update_policy`` reads.

Subclass :class:`Backend` to get the defaults (episodes from the workflow engine, advantages
from the core estimators, no-op lifecycle hooks) and override what your backend needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from rllm_core.types import Episode, TrajectoryGroup

if TYPE_CHECKING:
    from rllm_core.config import AlgorithmConfig, RLLMConfig
    from rllm_core.engine import RolloutEngine
    from rllm_core.rows import TokenRows

__all__ = ["Backend", "BackendProtocol", "TrainerState"]


@dataclass
class TrainerState:
    """Shared, mutable state of one training (or validation) step."""

    step: int = 0
    """Optimiser updates done so far."""
    epoch: int = 0
    weight_version: int = 0
    """Policy version the sampler serves."""
    is_validation: bool = False
    batch: list[dict[str, Any]] = field(default_factory=list)
    episodes: list[Episode] = field(default_factory=list)
    groups: list[TrajectoryGroup] = field(default_factory=list)
    rows: TokenRows | None = None
    """The groups as token rows (:mod:`rllm_core.rows`), built by the trainer before
    ``transform_to_backend_batch``; their advantages are filled right after ``compute_advantages``."""
    backend_batch: Any = None
    """Whatever ``transform_to_backend_batch`` produced (tensors, datums, DataProto)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Metrics of this step; stages add theirs (prefix them, e.g. ``train/loss``)."""
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class BackendProtocol(Protocol):
    """The contract between ``UnifiedTrainer`` and a backend."""

    name: ClassVar[str]
    config_model: ClassVar[Any]

    def init_rollout_engine(self, **kwargs: Any) -> RolloutEngine: ...
    def validate_config(self, config: RLLMConfig) -> None: ...
    async def generate_episodes(
        self, batch: list[dict[str, Any]], workflow_engine: Any, is_validation: bool = False
    ) -> list[Episode]: ...
    async def transform_to_backend_batch(self, state: TrainerState) -> Any: ...
    async def process_backend_batch(self, state: TrainerState) -> None: ...
    async def compute_advantages(self, state: TrainerState, algorithm: AlgorithmConfig) -> None: ...
    async def update_policy(self, state: TrainerState) -> None: ...
    async def on_policy_updated(self, state: TrainerState, version: int) -> None: ...
    async def on_train_start(self, state: TrainerState) -> None: ...
    async def on_train_end(self, state: TrainerState) -> None: ...
    async def on_epoch_start(self, state: TrainerState) -> None: ...
    async def on_epoch_end(self, state: TrainerState) -> None: ...
    async def on_batch_start(self, state: TrainerState) -> None: ...
    async def on_batch_end(self, state: TrainerState) -> None: ...
    async def on_validation_start(self, state: TrainerState) -> None: ...
    async def on_validation_end(self, state: TrainerState) -> None: ...
    def save_checkpoint(self, path: Path) -> Any: ...
    def load_checkpoint(self, path: Path) -> Any: ...
    async def shutdown(self) -> None: ...


class Backend:
    """Convenience base with the protocol's defaults. ``config`` is the whole ``RLLMConfig``."""

    name: ClassVar[str] = "backend"
    config_model: ClassVar[Any] = None
    trains_row_temperature: ClassVar[bool] = False
    """Whether the loss uses each row's own sampling temperature (``TokenRows.temperature``), which
    ``rollout.explore`` needs; the trainer refuses that setting otherwise."""
    recomputes_old_logprobs: ClassVar[bool] = False
    """Whether the backend computes, under the current weights, the old logprobs of action tokens
    that have none (``NaN`` in ``TokenRows.logprobs``), which ``algorithm.replay`` needs."""

    def __init__(self, config: RLLMConfig) -> None:
        self.config = config
        self.backend_config = config.plugin_config(self.name)
        self.rollout_engine: RolloutEngine | None = None

    def init_rollout_engine(self, **kwargs: Any) -> RolloutEngine:
        raise NotImplementedError(f"backend {self.name!r} must implement init_rollout_engine")

    def validate_config(self, config: RLLMConfig) -> None:
        """Raise ``ConfigError`` naming the field when the run cannot work with this backend."""

    async def generate_episodes(
        self, batch: list[dict[str, Any]], workflow_engine: Any, is_validation: bool = False
    ) -> list[Episode]:
        return await workflow_engine.execute_tasks(batch, is_validation=is_validation)

    async def transform_to_backend_batch(self, state: TrainerState) -> Any:
        return state.groups

    async def process_backend_batch(self, state: TrainerState) -> None:
        return None

    async def compute_advantages(self, state: TrainerState, algorithm: AlgorithmConfig) -> None:
        from rllm_core.advantages import compute_advantages

        state.metrics.update(compute_advantages(state.groups, algorithm))

    async def update_policy(self, state: TrainerState) -> None:
        raise NotImplementedError(f"backend {self.name!r} must implement update_policy")

    async def on_policy_updated(self, state: TrainerState, version: int) -> None:
        if self.rollout_engine is not None:
            self.rollout_engine.set_weight_version(version)

    async def on_train_start(self, state: TrainerState) -> None: ...
    async def on_train_end(self, state: TrainerState) -> None: ...
    async def on_epoch_start(self, state: TrainerState) -> None: ...
    async def on_epoch_end(self, state: TrainerState) -> None: ...
    async def on_batch_start(self, state: TrainerState) -> None: ...
    async def on_batch_end(self, state: TrainerState) -> None: ...
    async def on_validation_start(self, state: TrainerState) -> None: ...
    async def on_validation_end(self, state: TrainerState) -> None: ...

    def save_checkpoint(self, path: Path) -> None:
        """Write the backend's state (model, optimiser, ...) under ``path`` (a fresh directory).

        Runs in a worker thread. A backend that saves over the network may define it (and
        :meth:`load_checkpoint`) as ``async def`` instead: the trainer then awaits it on its loop.
        """

    def load_checkpoint(self, path: Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote (may be ``async def``, as above)."""

    def delete_checkpoint(self, path: Path) -> None:
        """A checkpoint beyond ``trainer.keep_checkpoints`` is about to be removed: release what it
        holds outside ``path`` (remote copies). Sync or ``async def``; a failure is only logged."""

    async def shutdown(self) -> None:
        """Release resources (threads, processes, clusters)."""
