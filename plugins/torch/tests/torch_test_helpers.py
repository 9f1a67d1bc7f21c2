"""Shared builders for the torch backend tests (tiny model, arithmetic vocabulary)."""

from __future__ import annotations

from typing import Any

from rllm_core.config import load_config
from rllm_core.types import Step, Trajectory, TrajectoryGroup

VOCAB = [str(i) for i in range(19)] + ["+", "="]


def make_config(**overrides: Any):
    """A config for the torch backend; ``overrides`` are dotted keys (``torch.seed=3``)."""
    base = {
        "backend": "torch",
        "torch": {"device": "cpu", "seed": 0, "num_threads": 1, "tiny": {"hidden_size": 32, "vocab": VOCAB}},
        "algorithm": {"optim": {"lr": 1e-2}},
    }
    return load_config(base, overrides=[f"{k}={v}" for k, v in overrides.items()])


def backend(**overrides: Any):
    from rllm_torch.backend import TorchBackend

    b = TorchBackend(make_config(**overrides))
    b.init_rollout_engine()
    return b


def groups_from_outputs(outputs, rewards, task_id: str = "t") -> list[TrajectoryGroup]:
    """One group of single-step trajectories; rewards set and advantages = reward - mean."""
    trajs = []
    mean = sum(rewards) / len(rewards)
    for out, r in zip(outputs, rewards, strict=False):
        step = Step.from_model_output(out, [{"role": "user", "content": "x"}])
        step.advantage = r - mean
        trajs.append(Trajectory(name="solver", steps=[step], reward=r))
    return [TrajectoryGroup(task_id=task_id, role="solver", trajectories=trajs)]


class Recorder:
    """A logger (``module:attr`` name) keeping every metrics dict it sees, in ``Recorder.history``."""

    history: list[tuple[int, dict[str, float]]] = []

    def __init__(self, settings=None, *, run_dir=None, config=None):
        Recorder.history = []

    def log_config(self, config):
        pass

    def log_metrics(self, step, metrics):
        Recorder.history.append((step, dict(metrics)))

    def log_episodes(self, step, episodes):
        pass

    def close(self):
        pass


def say_seven_reward(task, action) -> float:
    """The easiest thing to learn from scratch: always answer 7."""
    return 1.0 if str(action).strip() == "7" else 0.0
