"""Trainer runs through the verl backend: a config, a reward the tiny model learns fast, a recorder."""

from __future__ import annotations

from typing import Any

from rllm_core.config import load_config

VOCAB = [str(i) for i in range(19)] + ["+", "="]


def say_seven_reward(task: Any, action: Any) -> float:
    """The easiest thing to learn from scratch: always answer 7 (one token; chance is 1 in 27)."""
    return 1.0 if str(action).strip() == "7" else 0.0


class Recorder:
    """A logger (``module:attr`` name) keeping every metrics dict it sees, in ``Recorder.history``."""

    history: list[tuple[int, dict[str, float]]] = []

    def __init__(self, settings: Any = None, *, run_dir: Any = None, config: Any = None) -> None:
        Recorder.history = []

    def log_config(self, config: Any) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        Recorder.history.append((step, dict(metrics)))

    def log_episodes(self, step: int, episodes: Any) -> None:
        pass

    def close(self) -> None:
        pass


def verl_config(run_dir: str, **overrides: Any) -> Any:
    """The say-seven task on 8 prompts x 8 rollouts, trained by the verl backend on two CPU ranks."""
    base = {
        "backend": "verl",
        "verl": {
            "device": "cpu",
            "world_size": 2,
            "ray_num_cpus": 4,
            "env": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
            "tiny": {"hidden_size": 32, "vocab": VOCAB},
        },
        "workflow": {"name": "rllm_example_arith.workflow:arith_workflow"},
        "reward": {"name": "verl_run_helpers:say_seven_reward"},
        "data": {"train_batch_size": 8},
        "rollout": {"n": 8, "train_sampling": {"max_tokens": 1}},
        "algorithm": {"optim": {"lr": 1e-2}},
        "trainer": {"total_steps": 12, "epochs": 100, "run_dir": run_dir, "resume": "off", "val_every": 0},
        "loggers": {"verl_run_helpers:Recorder": {}},
    }
    config = load_config(base, overrides=[f"{k}={v}" for k, v in overrides.items()])
    config.data.train = [{"id": str(i), "question": f"{i}+{i}="} for i in range(8)]
    return config


def rewards() -> list[float]:
    return [m["train/reward/mean"] for _, m in Recorder.history if "train/reward/mean" in m]
