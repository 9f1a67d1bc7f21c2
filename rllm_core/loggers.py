"""The logger interface and the multiplexer the trainer talks to.

A logger plugin registers a class: ``register("name", MyLogger)``. The trainer builds it as
``MyLogger(settings, run_dir=..., config=...)`` for each name under ``loggers:`` in the config.
A logger that raises is disabled with a warning naming it; training goes on.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from rllm_core.types import Episode

__all__ = ["Logger", "MultiLogger"]


class Logger:
    """Base class: override what you need; every method is optional."""

    config_model: Any = None
    """Optional pydantic model validating this logger's settings."""

    def __init__(self, settings: dict[str, Any] | None = None, *, run_dir: Path | None = None, config: Any = None):
        self.settings = dict(settings or {})
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config = config

    def log_config(self, config: dict[str, Any]) -> None:
        """The whole resolved config, once at the start."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Aggregated metrics of one step (training or validation)."""

    def log_episodes(self, step: int, episodes: list[Episode]) -> None:
        """A sample of the step's episodes."""

    def close(self) -> None:
        """Flush and release."""


class MultiLogger(Logger):
    """Fans calls out to several loggers and isolates their failures."""

    def __init__(self, loggers: dict[str, Logger]):
        super().__init__()
        self.loggers = dict(loggers)
        self.failures: dict[str, int] = {}

    def _each(self, method: str, *args: Any) -> None:
        for name, logger in list(self.loggers.items()):
            try:
                getattr(logger, method)(*args)
            except Exception as exc:
                self.failures[name] = self.failures.get(name, 0) + 1
                self.loggers.pop(name, None)
                warnings.warn(
                    f"logger {name!r} raised in {method}: {exc!r}; it is disabled", RuntimeWarning, stacklevel=3
                )
                if method != "close":
                    try:
                        logger.close()
                    except Exception:
                        pass

    def log_config(self, config: dict[str, Any]) -> None:
        self._each("log_config", config)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._each("log_metrics", step, metrics)

    def log_episodes(self, step: int, episodes: list[Episode]) -> None:
        self._each("log_episodes", step, episodes)

    def close(self) -> None:
        self._each("close")
