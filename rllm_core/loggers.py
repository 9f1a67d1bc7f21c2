"""The logger interface and the multiplexer the trainer talks to.

A logger plugin registers a class: ``register("name", MyLogger)``. The trainer builds it as
``MyLogger(settings, run_dir=..., config=...)`` for each name under ``loggers:`` in the config.
A logger that raises is disabled with a warning naming it; training goes on.

The trainer calls loggers from its event loop. A logger whose calls block (an HTTP request per
call, as mlflow's) sets ``blocking = True``: :class:`MultiLogger` then makes its calls on a
thread of its own, in order, and waits for them at ``close``.
"""

from __future__ import annotations

import queue
import threading
import warnings
from pathlib import Path
from typing import Any

from rllm_core.types import Episode

__all__ = ["Logger", "MultiLogger"]


class Logger:
    """Base class: override what you need; every method is optional."""

    config_model: Any = None
    """Optional pydantic model validating this logger's settings."""
    blocking: bool = False
    """Calls block on I/O: make them on a background thread (in order, flushed at ``close``)."""

    def __init__(self, settings: dict[str, Any] | None = None, *, run_dir: Path | None = None, config: Any = None):
        self.settings = dict(settings or {})
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config = config

    def log_config(self, config: dict[str, Any]) -> None:
        """The whole resolved config, once at the start."""

    def on_resume(self, step: int, checkpoint: Path) -> None:
        """The run resumed from ``checkpoint`` at ``step``: what was logged for later steps is redone."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Aggregated metrics of one step (training or validation)."""

    def log_episodes(self, step: int, episodes: list[Episode]) -> None:
        """A sample of the step's episodes."""

    def close(self) -> None:
        """Flush and release."""


class _Background:
    """Makes one blocking logger's calls on its own thread, in the order they were made.

    A call that raises makes the thread skip the calls after it (but ``close``); the error is
    raised from the next call made here (or from ``join``), so :class:`MultiLogger` disables the
    logger as it would any other.
    """

    def __init__(self, name: str, logger: Any) -> None:
        self.logger = logger
        self.error: Exception | None = None
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"rllm-logger-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            method, args = item
            if self.error is None or method == "close":
                try:
                    getattr(self.logger, method)(*args)
                except Exception as exc:
                    self.error = self.error or exc

    def call(self, method: str, *args: Any) -> None:
        if self.error is not None:
            raise self.error
        self._calls.put((method, args))

    def finish(self) -> None:
        """Queue the logger's ``close`` and the end of the thread."""
        self._calls.put(("close", ()))
        self._calls.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"still writing after {timeout:.0f} s; the rest is dropped")
        if self.error is not None:
            raise self.error


class MultiLogger(Logger):
    """Fans calls out to several loggers and isolates their failures."""

    close_timeout = 120.0
    """Seconds ``close`` waits for a blocking logger's queued calls."""

    def __init__(self, loggers: dict[str, Logger]):
        super().__init__()
        self.loggers = dict(loggers)
        self.failures: dict[str, int] = {}
        self._background = {
            name: _Background(name, logger)
            for name, logger in self.loggers.items()
            if getattr(logger, "blocking", False)
        }

    def _each(self, method: str, *args: Any) -> None:
        for name, logger in list(self.loggers.items()):
            try:
                if name in self._background:
                    if method == "close":
                        self._background[name].finish()
                        self._background[name].join(self.close_timeout)
                    else:
                        self._background[name].call(method, *args)
                elif (fn := getattr(logger, method, None)) is not None:  # loggers need not subclass Logger
                    fn(*args)
            except Exception as exc:
                self.failures[name] = self.failures.get(name, 0) + 1
                self.loggers.pop(name, None)
                background = self._background.pop(name, None)
                warnings.warn(
                    f"logger {name!r} raised in {method}: {exc!r}; it is disabled", RuntimeWarning, stacklevel=3
                )
                if background is not None:
                    if method != "close":
                        background.finish()  # closes it on its thread; nothing here waits for that
                elif method != "close":
                    try:
                        logger.close()
                    except Exception:
                        pass

    def log_config(self, config: dict[str, Any]) -> None:
        self._each("log_config", config)

    def on_resume(self, step: int, checkpoint: Path) -> None:
        self._each("on_resume", step, checkpoint)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._each("log_metrics", step, dict(metrics))  # a copy: a background write sees it as logged

    def log_episodes(self, step: int, episodes: list[Episode]) -> None:
        self._each("log_episodes", step, list(episodes))

    def close(self) -> None:
        self._each("close")
