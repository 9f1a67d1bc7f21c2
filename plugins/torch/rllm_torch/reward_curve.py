"""``reward_curve`` logger: a PNG plot of reward metrics, refreshed every ``every`` steps and at close.

Enable it with ``loggers: {reward_curve: {every: 10}}``; it writes ``reward_curve.png`` (or
``filename``) in the run directory. Metrics whose key matches ``pattern`` are plotted, one line
each (training and validation reward by default). matplotlib's ``Agg`` backend is used, so no
display is needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rllm_core.loggers import Logger

__all__ = ["RewardCurveLogger", "RewardCurveSettings"]


class RewardCurveSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    every: int = Field(10, ge=1)
    """Redraw the PNG every k logged steps (always at close)."""
    pattern: str = r"^(train|val)/reward/mean$"
    """Regex selecting the metric keys to plot."""
    filename: str = "reward_curve.png"
    target: float | None = None
    """Draw a horizontal line at this reward (e.g. the example's 0.9 goal)."""


class RewardCurveLogger(Logger):
    config_model = RewardCurveSettings

    def __init__(self, settings: dict[str, Any] | None = None, *, run_dir: Path | None = None, config: Any = None):
        super().__init__(settings, run_dir=run_dir, config=config)
        self.opts = RewardCurveSettings.model_validate(self.settings)
        self._regex = re.compile(self.opts.pattern)
        self.series: dict[str, list[tuple[int, float]]] = {}
        self._logged = 0
        self.path: Path | None = (self.run_dir / self.opts.filename) if self.run_dir is not None else None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if self._regex.search(key) and isinstance(value, int | float):
                self.series.setdefault(key, []).append((step, float(value)))
        self._logged += 1
        if self._logged % self.opts.every == 0:
            self.draw()

    def draw(self) -> Path | None:
        """Write the PNG now (nothing to draw: no file)."""
        if self.path is None or not self.series:
            return None
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for key, points in sorted(self.series.items()):
            xs, ys = zip(*points, strict=False)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key)
        if self.opts.target is not None:
            ax.axhline(self.opts.target, color="grey", linestyle="--", linewidth=1, label=f"target {self.opts.target}")
        ax.set_xlabel("step")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(self.path)
        return self.path

    def close(self) -> None:
        self.draw()
