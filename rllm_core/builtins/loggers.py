"""Built-in plugin ``rllm.loggers``: ``console`` (a live progress bar) and ``jsonl`` (metrics and episodes).

``console`` redraws one line on stderr per step (``\\r``), e.g.::

    [########------------]  40/100  reward 0.53  correct 0.50  stale 0.4  2.1 it/s  ETA 28s

When stderr is not a terminal it prints a full line every ``every`` steps instead, so CI logs
stay readable. Validation metrics are printed on their own line, and so is the checkpoint a run
resumed from.

``jsonl`` appends ``{"step": ..., **metrics}`` to ``<run_dir>/metrics.jsonl`` and the sampled
episodes (``trainer.log_episodes`` per step) to ``<run_dir>/episodes.jsonl``, one JSON object per
line, flushed each time so a killed run keeps what it logged. On resume it drops the records of
steps after the checkpoint (the resumed run logs them again), so each step appears once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field

from rllm_core.hookspecs import hookimpl
from rllm_core.loggers import Logger
from rllm_core.types import Episode

__all__ = ["ConsoleLogger", "JsonlLogger"]


class ConsoleSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    width: int = Field(24, ge=5)
    """Characters of the bar itself."""
    every: int = Field(1, ge=1)
    """Print every k steps when stderr is not a terminal."""
    keys: list[str] = Field(default_factory=list)
    """Extra metric keys to show (shown as their last path segment)."""


_DEFAULT_KEYS = [
    ("train/reward/mean", "reward"),
    ("train/correct_frac", "correct"),
    ("async/staleness/mean", "stale"),
]


def _fmt(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if abs(value) >= 1000 or (value and abs(value) < 0.01):
        return f"{value:.3g}"
    return f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))


class ConsoleLogger(Logger):
    """A live progress bar with the key metrics of each step, on stderr."""

    config_model = ConsoleSettings

    def __init__(self, settings=None, *, run_dir=None, config=None, stream: TextIO | None = None):
        super().__init__(settings, run_dir=run_dir, config=config)
        self.opts = ConsoleSettings.model_validate(self.settings)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start: float | None = None
        self._first_step: int | None = None
        self._drawn = False

    def log_config(self, config: dict[str, Any]) -> None:
        trainer = config.get("trainer", {})
        self._line(
            f"rllm: backend={config.get('backend')} mode={trainer.get('mode')} "
            f"run_dir={self.run_dir} workflow={config.get('workflow', {}).get('name')}"
        )

    def on_resume(self, step: int, checkpoint: Path) -> None:
        self._line(f"rllm: resumed from {checkpoint} at step {step}")

    def render(self, step: int, metrics: dict[str, float]) -> str:
        """The progress line for ``step`` (public for tests and for custom consoles)."""
        now = time.perf_counter()
        if self._start is None:
            self._start, self._first_step = now, step - 1
        total = int(metrics.get("trainer/total_steps", 0)) or None
        done = step
        parts = []
        if total:
            frac = min(1.0, done / total)
            filled = round(frac * self.opts.width)
            parts.append(f"[{'#' * filled}{'-' * (self.opts.width - filled)}] {done:>{len(str(total))}}/{total}")
        else:
            parts.append(f"step {done}")
        keys = _DEFAULT_KEYS + [(k, k.rsplit("/", 1)[-1]) for k in self.opts.keys]
        for key, label in keys:
            if key in metrics:
                parts.append(f"{label} {_fmt(float(metrics[key]))}")
        elapsed = now - self._start
        steps_done = done - (self._first_step or 0)
        if elapsed > 0 and steps_done > 0:
            rate = steps_done / elapsed
            parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it")
            if total and done < total:
                parts.append(f"ETA {int((total - done) / rate)}s")
        return "  ".join(parts)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if any(k.startswith("val/") for k in metrics) and not any(k.startswith("train/") for k in metrics):
            shown = {k: v for k, v in metrics.items() if "pass@" in k or k == "val/reward/mean"}
            self._line(f"validation @ step {step}: " + "  ".join(f"{k} {_fmt(float(v))}" for k, v in shown.items()))
            return
        line = self.render(step, metrics)
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self.stream.flush()
            self._drawn = True
        elif step % self.opts.every == 0 or step == int(metrics.get("trainer/total_steps", -1)):
            self.stream.write(line + "\n")
            self.stream.flush()

    def _line(self, text: str) -> None:
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class JsonlSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    metrics_file: str = "metrics.jsonl"
    episodes_file: str = "episodes.jsonl"
    """Set to an empty string to skip episodes."""


class JsonlLogger(Logger):
    """Metrics and sampled episodes as JSON lines in the run directory."""

    config_model = JsonlSettings

    def __init__(self, settings=None, *, run_dir=None, config=None):
        super().__init__(settings, run_dir=run_dir, config=config)
        self.opts = JsonlSettings.model_validate(self.settings)
        self._root = Path(self.run_dir or ".")
        self._root.mkdir(parents=True, exist_ok=True)
        self._metrics = (self._root / self.opts.metrics_file).open("a", encoding="utf-8")
        self._episodes = (
            (self._root / self.opts.episodes_file).open("a", encoding="utf-8") if self.opts.episodes_file else None
        )

    def on_resume(self, step: int, checkpoint: Path) -> None:
        self._metrics.close()
        self._metrics = _truncate_after(self._root / self.opts.metrics_file, step)
        if self._episodes is not None:
            self._episodes.close()
            self._episodes = _truncate_after(self._root / self.opts.episodes_file, step)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._metrics.write(json.dumps({"step": step, **metrics}, default=float) + "\n")
        self._metrics.flush()

    def log_episodes(self, step: int, episodes: list[Episode]) -> None:
        if self._episodes is None:
            return
        for ep in episodes:
            record = {"step": step, **ep.model_dump(mode="json", exclude={"task"})}
            record["task"] = ep.task
            self._episodes.write(json.dumps(record, default=str) + "\n")
        self._episodes.flush()

    def close(self) -> None:
        self._metrics.close()
        if self._episodes is not None:
            self._episodes.close()


def _truncate_after(path: Path, step: int) -> TextIO:
    """Keep the records of ``path`` up to ``step`` (atomically); return it open for appending.

    A line cut short by a kill is dropped too.
    """
    kept = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.open("a", encoding="utf-8")


@hookimpl
def register_loggers(register: Any) -> None:
    register("console", ConsoleLogger, config_model=ConsoleSettings)
    register("jsonl", JsonlLogger, config_model=JsonlSettings)
