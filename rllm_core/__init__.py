"""rllm-core: plugin-oriented RL post-training for LLM agents.

Importing the package is cheap: the public names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rllm_core.hookspecs import hookimpl

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # types
    "Step": "rllm_core.types",
    "Trajectory": "rllm_core.types",
    "Episode": "rllm_core.types",
    "TrajectoryGroup": "rllm_core.types",
    "ModelOutput": "rllm_core.types",
    "TokenInput": "rllm_core.types",
    "TerminationReason": "rllm_core.types",
    "RewardOutput": "rllm_core.types",
    "ChatView": "rllm_core.types",
    # contracts
    "BackendProtocol": "rllm_core.protocol",
    "Backend": "rllm_core.protocol",
    "TrainerState": "rllm_core.protocol",
    "RolloutEngine": "rllm_core.engine",
    "Logger": "rllm_core.loggers",
    "Workflow": "rllm_core.workflows",
    "WorkflowEngine": "rllm_core.workflows",
    # config and plugins
    "RLLMConfig": "rllm_core.config",
    "ConfigError": "rllm_core.config",
    "load_config": "rllm_core.config",
    "get_registry": "rllm_core.plugins",
    "UnknownPluginError": "rllm_core.plugins",
    # algorithms and the loop
    "compute_advantages": "rllm_core.advantages",
    "UnifiedTrainer": "rllm_core.trainer",
}

__all__ = ["__version__", "hookimpl", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rllm_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from rllm_core.advantages import compute_advantages
    from rllm_core.config import ConfigError, RLLMConfig, load_config
    from rllm_core.engine import RolloutEngine
    from rllm_core.loggers import Logger
    from rllm_core.plugins import UnknownPluginError, get_registry
    from rllm_core.protocol import Backend, BackendProtocol, TrainerState
    from rllm_core.trainer import UnifiedTrainer
    from rllm_core.types import (
        ChatView,
        Episode,
        ModelOutput,
        RewardOutput,
        Step,
        TerminationReason,
        TokenInput,
        Trajectory,
        TrajectoryGroup,
    )
    from rllm_core.workflows import Workflow, WorkflowEngine
