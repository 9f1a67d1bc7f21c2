"""``WandbLogger``: an rllm logger writing to a Weights & Biases run.

Contract (``rllm_core.loggers.Logger``): built as ``WandbLogger(settings, run_dir=..., config=...)``
when the config lists ``wandb`` under ``loggers``; ``log_config`` becomes the run's config,
``log_metrics(step, metrics)`` one history row at ``step``, ``log_episodes(step, episodes)`` a
``wandb.Table`` under the key ``episodes`` with one row per trajectory (task_id, rollout, role,
prompt, response, reward, is_correct). ``mode: offline`` writes the run under
``<dir>/wandb/offline-run-*`` for ``wandb sync`` later; it is what the tests use.

wandb is imported when the logger is built, never when the plugin is listed. Building tables and
``run.finish`` (which uploads) block, so the logger is ``blocking``: the trainer makes its calls
on a thread of their own, in order, and waits for them only at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rllm_core.loggers import Logger
from rllm_core.types import Episode

__all__ = ["WandbLogger", "WandbSettings", "episode_rows"]

COLUMNS = ["step", "task_id", "rollout", "role", "prompt", "response", "reward", "is_correct"]


class WandbSettings(BaseModel):
    """Settings under ``loggers.wandb``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    project: str | None = None
    """wandb project; default ``trainer.project``."""
    entity: str | None = None
    """Team or user; default your wandb default entity."""
    name: str | None = None
    """Run name; default ``trainer.name``."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """``offline`` writes locally (sync later with ``wandb sync``); ``disabled`` logs nothing."""
    dir: str | None = None
    """Directory under which wandb writes ``wandb/``; default the run directory."""
    tags: list[str] = Field(default_factory=list)
    group: str | None = None
    episodes_table_size: int = Field(16, ge=0)
    """Most rows (trajectories) per episodes table; 0 logs no table."""
    max_text_chars: int = Field(4000, ge=1)
    """Prompts and responses longer than this are cut (tables must stay small)."""
    init_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for ``wandb.init`` (e.g. ``{notes: ..., resume: allow, id: ...}``)."""


def _render(messages: Iterable[Any]) -> str:
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in messages)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def episode_rows(step: int, episodes: Iterable[Episode], limit: int, max_chars: int = 4000) -> list[list[Any]]:
    """One row per trajectory, in ``COLUMNS`` order, at most ``limit`` rows."""
    rows: list[list[Any]] = []
    for episode in episodes:
        for trajectory in episode.trajectories:
            if len(rows) >= limit:
                return rows
            steps = trajectory.steps
            prompt = _render(steps[0].chat_completions) if steps else ""
            response = "\n---\n".join(s.model_response for s in steps)
            rows.append(
                [
                    step,
                    episode.task_id,
                    episode.rollout_idx,
                    trajectory.name,
                    _cut(prompt, max_chars),
                    _cut(response, max_chars),
                    trajectory.total_reward,
                    bool(episode.is_correct),
                ]
            )
    return rows


class WandbLogger(Logger):
    """Logs to one wandb run per trainer."""

    config_model = WandbSettings
    blocking = True

    def __init__(self, settings: dict[str, Any] | WandbSettings | None = None, *, run_dir=None, config=None):
        if isinstance(settings, WandbSettings):
            settings = settings.model_dump()
        super().__init__(settings, run_dir=run_dir, config=config)
        self.options = WandbSettings.model_validate(self.settings)
        import wandb

        trainer = getattr(config, "trainer", None)
        directory = Path(self.options.dir or self.run_dir or ".")
        directory.mkdir(parents=True, exist_ok=True)
        init_kwargs = {
            "project": self.options.project or getattr(trainer, "project", None) or "rllm",
            "entity": self.options.entity,
            "name": self.options.name or getattr(trainer, "name", None),
            "mode": self.options.mode,
            "dir": str(directory),
            "tags": self.options.tags or None,
            "group": self.options.group,
            # One trainer, one run, even when several trainers share a process (tests, notebooks).
            "reinit": "create_new",
            # Console capture and system stats are what make wandb slow to start and stop; the
            # trainer logs what matters.
            "settings": wandb.Settings(console="off", x_disable_stats=True, silent=True, disable_git=True),
            **self.options.init_kwargs,
        }
        self._wandb = wandb
        self.run = wandb.init(**init_kwargs)
        self.run_path = Path(self.run.dir).parent if self.options.mode != "disabled" else None
        """The run's local directory (``.../wandb/offline-run-*`` offline)."""

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def log_episodes(self, step: int, episodes: list[Episode]) -> None:
        if self.options.episodes_table_size == 0:
            return
        rows = episode_rows(step, episodes, self.options.episodes_table_size, self.options.max_text_chars)
        if rows:
            self.run.log({"episodes": self._wandb.Table(columns=COLUMNS, data=rows)}, step=step)

    def close(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish()
