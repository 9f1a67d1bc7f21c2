"""``MlflowLogger``: an rllm logger writing to an MLflow tracking store.

Contract (``rllm_core.loggers.Logger``): built as ``MlflowLogger(settings, run_dir=..., config=...)``
when the config lists ``mlflow`` under ``loggers``. One MLflow run per trainer:

* ``log_config``: the flattened config as params (``algorithm.optim.lr``...) and the whole config
  as the artifact ``config.yaml``;
* ``log_metrics(step, metrics)``: numeric metrics at ``step`` (keys MLflow refuses are sanitised);
* ``log_episodes(step, episodes)``: one JSON artifact per step, ``episodes/step_000012.json``.

The tracking URI is ``tracking_uri`` from the settings, else ``$MLFLOW_TRACKING_URI``, else a
SQLite store in the run directory (``sqlite:///<run_dir>/mlflow.db``). A remote server that is
down or fails must not stop training: the failure becomes a warning, the logger keeps trying, and
after ``max_failures`` consecutive failures it disables itself with a second warning.

Every call is a blocking HTTP (or database) request, so the logger is ``blocking``: the trainer
makes its calls on a thread of their own, in order, and never waits for them on its event loop.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rllm_core.loggers import Logger
from rllm_core.types import Episode

__all__ = ["MlflowLogger", "MlflowSettings", "episode_records", "flatten"]

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")
_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH_PARAMS = 100  # MLflow's limit of params per log_batch
_BATCH_METRICS = 1000


class MlflowSettings(BaseModel):
    """Settings under ``loggers.mlflow``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    tracking_uri: str | None = None
    """``http(s)://host:port`` of a tracking server, ``sqlite:///path.db`` or ``file:/path``; default
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<run_dir>/mlflow.db``."""
    experiment: str | None = None
    """Experiment name; default ``trainer.project``."""
    run_name: str | None = None
    """Run name; default ``trainer.name``."""
    tags: dict[str, str] = Field(default_factory=dict)
    artifact_location: str | None = None
    """Where a new experiment keeps artifacts; default ``<run_dir>/mlflow-artifacts`` for local stores
    (a remote server decides for itself)."""
    episodes_per_step: int = Field(16, ge=0)
    """Most trajectories per episodes artifact; 0 logs none."""
    request_timeout: float | None = Field(None, gt=0)
    """Seconds per HTTP request to a tracking server (sets ``MLFLOW_HTTP_REQUEST_TIMEOUT``)."""
    max_retries: int | None = Field(None, ge=0)
    """HTTP retries per request (sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``); mlflow's default
    retries for minutes, which a training loop should not wait for."""
    max_failures: int = Field(3, ge=1)
    """Consecutive failed calls after which the logger disables itself."""


def flatten(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``{"a": {"b": 1}}`` -> ``("a.b", "1")``; lists and scalars become JSON text."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, name + ".")
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            yield name, text[:_PARAM_CHARS]


def episode_records(episodes: list[Episode], limit: int) -> list[dict[str, Any]]:
    """One JSON-able record per trajectory, at most ``limit``."""
    records: list[dict[str, Any]] = []
    for episode in episodes:
        for trajectory in episode.trajectories:
            if len(records) >= limit:
                return records
            steps = trajectory.steps
            records.append(
                {
                    "task_id": episode.task_id,
                    "rollout": episode.rollout_idx,
                    "role": trajectory.name,
                    "prompt": steps[0].chat_completions.to_list() if steps else [],
                    "responses": [s.model_response for s in steps],
                    "reward": trajectory.total_reward,
                    "is_correct": bool(episode.is_correct),
                    "termination_reason": str(episode.termination_reason.value),
                }
            )
    return records


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/", ".")) or "://" not in uri


class MlflowLogger(Logger):
    """Logs to one MLflow run per trainer; tolerant of a tracking server that is down."""

    config_model = MlflowSettings
    blocking = True

    def __init__(self, settings: dict[str, Any] | MlflowSettings | None = None, *, run_dir=None, config=None):
        if isinstance(settings, MlflowSettings):
            settings = settings.model_dump()
        super().__init__(settings, run_dir=run_dir, config=config)
        self.options = MlflowSettings.model_validate(self.settings)
        self.failures = 0
        self._consecutive = 0
        self.disabled = False
        self.client: Any = None
        self.run_id: str | None = None
        run_dir_path = Path(self.run_dir or ".").resolve()
        self.tracking_uri = (
            self.options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir_path}/mlflow.db"
        )
        # mlflow reads its HTTP client settings from the environment only.
        if self.options.request_timeout is not None:
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(math.ceil(self.options.request_timeout))
        if self.options.max_retries is not None:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.options.max_retries)
        trainer = getattr(config, "trainer", None)
        self.experiment = self.options.experiment or getattr(trainer, "project", None) or "rllm"
        run_name = self.options.run_name or getattr(trainer, "name", None)
        if self.tracking_uri.startswith("sqlite:"):
            run_dir_path.mkdir(parents=True, exist_ok=True)
        artifact_location = self.options.artifact_location
        if artifact_location is None and _is_local(self.tracking_uri):
            artifact_location = (run_dir_path / "mlflow-artifacts").as_uri()
        self._call("start", self._start, run_name, artifact_location)
        if self.run_id is None:
            self.disabled = True

    # -- failure isolation ----------------------------------------------------------------

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        if self.disabled:
            return None
        try:
            result = fn(*args)
        except Exception as exc:
            self.failures += 1
            self._consecutive += 1
            if what == "start" or self._consecutive >= self.options.max_failures:
                self.disabled = True
                warnings.warn(
                    f"mlflow logger: {what} failed against {self.tracking_uri} ({type(exc).__name__}: "
                    f"{str(exc)[:300]}); mlflow logging is off for this run, training goes on",
                    RuntimeWarning,
                    stacklevel=3,
                )
            elif self._consecutive == 1:
                warnings.warn(
                    f"mlflow logger: {what} failed against {self.tracking_uri} ({type(exc).__name__}); "
                    f"will retry, and give up after {self.options.max_failures} failures in a row",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None
        self._consecutive = 0
        return result

    # -- mlflow calls ---------------------------------------------------------------------

    def _start(self, run_name: str | None, artifact_location: str | None) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = client.create_experiment(self.experiment, artifact_location=artifact_location)
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(self.options.tags))
        self.client, self.run_id = client, run.info.run_id

    def _log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in flatten(config)]
        for i in range(0, len(params), _BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=params[i : i + _BATCH_PARAMS])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def _log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(_BAD_KEY_CHARS.sub("_", key), float(value), now, int(step))
            for key, value in metrics.items()
            if isinstance(value, numbers.Real)
        ]
        for i in range(0, len(batch), _BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=batch[i : i + _BATCH_METRICS])

    def _log_episodes(self, step: int, episodes: list[Episode]) -> None:
        records = episode_records(episodes, self.options.episodes_per_step)
        if records:
            self.client.log_dict(self.run_id, records, f"episodes/step_{int(step):06d}.json")

    # -- Logger ---------------------------------------------------------------------------

    def log_config(self, config: dict[str, Any]) -> None:
        self._call("log_config", self._log_config, dict(config))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._call("log_metrics", self._log_metrics, step, metrics)

    def log_episodes(self, step: int, episodes: list[Episode]) -> None:
        if self.options.episodes_per_step:
            self._call("log_episodes", self._log_episodes, step, episodes)

    def close(self) -> None:
        if self.run_id is not None:
            status = "FINISHED"
            self._call("close", lambda: self.client.set_terminated(self.run_id, status=status))
        self.disabled = True
