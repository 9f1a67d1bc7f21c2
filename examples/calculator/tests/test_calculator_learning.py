"""Learning tests: the example's two configs, trained from scratch for a few dozen steps, raise the reward.

A learning test, not a timing test: each run is the README's config cut to ``STEPS`` steps, and the
assertion is on the reward the trainer logged, well above where the random model starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("rllm_torch")
pytest.importorskip("rllm_gateway")

from rllm_core import UnifiedTrainer, load_config

EXAMPLE = Path(__file__).resolve().parents[1]
STEPS = 40


class Rewards:
    """A logger (``module:attr`` name) keeping the mean training reward of each step."""

    history: list[float] = []

    def __init__(self, settings=None, *, run_dir=None, config=None):
        Rewards.history = []

    def log_config(self, config):
        pass

    def log_metrics(self, step, metrics):
        if "train/reward/mean" in metrics:
            Rewards.history.append(metrics["train/reward/mean"])

    def log_episodes(self, step, episodes):
        pass

    def close(self):
        pass


def train(config_file: str, tmp_path: Path) -> list[float]:
    config = load_config(
        EXAMPLE / config_file,
        overrides=[
            f"trainer.total_steps={STEPS}",
            "algorithm.optim.schedule=constant",  # the README run's first steps (its cosine is still ~1 here)
            "trainer.val_every=0",
            "trainer.val_at_end=false",
            f"trainer.run_dir={tmp_path / 'run'}",
        ],
    )
    config.loggers = {f"{__name__}:Rewards": {}}
    UnifiedTrainer(config).fit()
    return list(Rewards.history)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("config_file", ["config.yaml", "config_gateway.yaml"])
def test_the_reward_rises_from_scratch(config_file, tmp_path):
    """Native workflow and the OpenAI-client agent through the gateway alike: from the random model's
    score (about 0.01) to about 0.15 by step 40 (README), the call part of the reward learned first."""
    rewards = train(config_file, tmp_path)
    assert len(rewards) == STEPS
    start, end = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert start < 0.03, rewards[:3]
    assert end > start + 0.07, rewards
