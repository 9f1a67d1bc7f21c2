"""Pluggy hook specifications (project ``rllm``, entry-point group ``rllm``).

Two kinds of hooks:

* Registration hooks, called once when the registry is built. Each receives a ``register``
  callback: ``register(name, obj, **options)``. The host owns names and duplicates.
* Trainer hooks, called by the trainer on the hook plugins that the config switches on
  (``hooks: {name: {...settings}}``). An implementation may be sync or async; the host awaits
  either. A hook that raises is reported and skipped; training goes on.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("rllm")
hookimpl = pluggy.HookimplMarker("rllm")

# ---------------------------------------------------------------------------------------------
# Registration hooks


@hookspec
def register_backends(register: Any) -> None:
    """Register backends: ``register(name, backend_cls, priority=0, auto=True)``.

    ``backend_cls`` is built as ``backend_cls(config)``; its ``config_model`` class attribute (a
    pydantic model) validates the config section named like the backend. The installed backend
    with the highest ``priority`` is the default (``backend: auto``); one registered with
    ``auto=False`` (test support) is used only when named.
    """


@hookspec
def register_rewards(register: Any) -> None:
    """Register reward functions: ``register(name, fn)``.

    ``fn(task, episode_or_action) -> float | RewardOutput``, sync or async.
    """


@hookspec
def register_loggers(register: Any) -> None:
    """Register loggers: ``register(name, logger_cls, config_model=None)``."""


@hookspec
def register_workflows(register: Any) -> None:
    """Register workflows: ``register(name, workflow)`` (an async function or ``Workflow`` class)."""


@hookspec
def register_advantage_estimators(register: Any) -> None:
    """Register advantage estimators: ``register(name, fn)``; see ``rllm_core.advantages``."""


@hookspec
def register_hooks(register: Any) -> None:
    """Register trainer-hook plugins: ``register(name, factory, config_model=None)``.

    ``factory(settings)`` returns an object whose ``@hookimpl`` methods implement trainer hooks;
    it is instantiated only when the config names it under ``hooks``.
    """


@hookspec
def register_tool_parsers(register: Any) -> None:
    """Register tool-call parsers: ``register(name, parser_cls)``.

    ``parser_cls()`` returns an object with ``parse(text) -> ParsedCompletion`` that splits a
    completion into content and OpenAI-format tool calls (see ``rllm_core.parsers``); selected by
    ``rollout.tool_parser``.
    """


@hookspec
def register_reasoning_parsers(register: Any) -> None:
    """Register reasoning parsers: ``register(name, parser_cls)``.

    ``parser_cls()`` returns an object with ``parse(text) -> ParsedCompletion`` that splits a
    completion into reasoning and content (see ``rllm_core.parsers``); selected by
    ``rollout.reasoning_parser``.
    """


# ---------------------------------------------------------------------------------------------
# Trainer hooks


@hookspec(firstresult=True)
def trajectory_grouping_hook(episodes: list, config: Any) -> list | None:
    """Group episodes into ``TrajectoryGroup``s; first non-None result wins.

    The built-in implementation groups by ``(task_id, trajectory.name)``.
    """


@hookspec
def postprocess_opsd(episode: Any, engine: Any, config: Any) -> None:
    """Post-process one episode before grouping (e.g. on-policy self-distillation)."""


@hookspec
def on_policy_updated(trainer: Any, version: int) -> None:
    """The sampler now serves ``version``: once per version it gets (``sync_every > 1``: synced ones only)."""


@hookspec
def on_train_start(trainer: Any) -> None:
    """Training is about to start (after resume)."""


@hookspec
def on_train_end(trainer: Any) -> None:
    """Training finished or stopped."""


@hookspec
def on_epoch_start(trainer: Any, epoch: int) -> None:
    """An epoch of the training data starts."""


@hookspec
def on_epoch_end(trainer: Any, epoch: int) -> None:
    """An epoch of the training data ended: every task of it was trained on (async: or given up)."""


@hookspec
def on_batch_start(trainer: Any, step: int) -> None:
    """A training step starts."""


@hookspec
def on_batch_end(trainer: Any, metrics: dict) -> None:
    """A training step ended; ``metrics`` are that step's aggregated metrics."""


@hookspec
def on_validation_start(trainer: Any) -> None:
    """Validation is about to run."""


@hookspec
def on_validation_end(trainer: Any, metrics: dict) -> None:
    """Validation ended with ``metrics``."""


REGISTRATION_HOOKS = {
    "backend": "register_backends",
    "reward": "register_rewards",
    "logger": "register_loggers",
    "workflow": "register_workflows",
    "estimator": "register_advantage_estimators",
    "hook": "register_hooks",
    "tool_parser": "register_tool_parsers",
    "reasoning_parser": "register_reasoning_parsers",
}

TRAINER_HOOKS = (
    "trajectory_grouping_hook",
    "postprocess_opsd",
    "on_policy_updated",
    "on_train_start",
    "on_train_end",
    "on_epoch_start",
    "on_epoch_end",
    "on_batch_start",
    "on_batch_end",
    "on_validation_start",
    "on_validation_end",
)
