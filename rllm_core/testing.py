"""A simulated backend and fixtures for testing trainers and plugins without a model.

:class:`SimulatedBackend` (backend ``simulated``) answers arithmetic questions ``"What is a+b?"``.
Its policy is one number, ``skill``: the chance of a correct answer is
``p0 + (1 - p0) * (1 - exp(-skill))``, and every update raises ``skill`` by
``learn_rate * (fraction of trajectories with a positive advantage and a correct answer)``, so the
reward rises when the trainer's advantages point the right way. The sampler serves the skill of
the last version pushed by ``on_policy_updated``, so stale weights are really stale.

Latencies are ``asyncio.sleep``s: ``gen_latency`` per model call, ``train_latency`` per update
(each with an optional uniform ``jitter`` fraction), so overlap and staleness can be measured.

It records every stage and lifecycle call in order (``backend.calls``), each version it was told
about (``backend.policy_versions``) and what each update trained on (``backend.trained``); with
``trace_file`` set it appends one JSON line per update (the kill-and-resume test reads it).

Use it in a plugin's tests::

    from rllm_core.testing import simulated_config
    trainer = UnifiedTrainer(simulated_config(tmp_path, hooks={"my_hook": {}}))
    trainer.fit()
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from rllm_core.engine import RolloutEngine
from rllm_core.hookspecs import hookimpl
from rllm_core.protocol import Backend, TrainerState
from rllm_core.types import ModelOutput, Step, Trajectory

__all__ = [
    "ADD_TOOL",
    "RecordingHooks",
    "SimulatedBackend",
    "SimulatedConfig",
    "SimulatedEngine",
    "simulated_config",
    "simulated_reward",
    "simulated_tasks",
    "simulated_workflow",
]


class SimulatedConfig(BaseModel):
    """The ``simulated:`` config section."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    gen_latency: float = Field(0.0, ge=0)
    """Seconds per model call."""
    train_latency: float = Field(0.0, ge=0)
    """Seconds per policy update."""
    jitter: float = Field(0.0, ge=0, le=1)
    """Latencies are drawn uniformly from ``latency * (1 +- jitter)``."""
    p0: float = Field(0.2, ge=0, le=1)
    """Chance of a correct answer before any update."""
    learn_rate: float = Field(0.5, ge=0)
    """Skill gained per update (scaled by the fraction of rewarded, positively-advantaged trajectories)."""
    seed: int = 0
    response_tokens: int = Field(4, ge=1)
    """Tokens in each simulated response."""
    trace_file: str | None = None
    """Append one JSON line per update (step, versions, task ids) to this file."""


ADD_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
    },
}
"""An OpenAI-format function tool, for tests of tool calling (engines, parsers, the gateway)."""

_QUESTION = re.compile(r"(-?\d+)\s*\+\s*(-?\d+)")


def _p_correct(p0: float, skill: float) -> float:
    return p0 + (1.0 - p0) * (1.0 - math.exp(-skill))


class SimulatedEngine(RolloutEngine):
    """Answers ``a+b`` questions correctly with the served policy's probability."""

    supports_logprobs = True

    def __init__(self, backend: SimulatedBackend) -> None:
        super().__init__()
        self.backend = backend
        self.served_skill = 0.0
        self.calls = 0
        self._rng = random.Random(backend.backend_config.seed)

    def _latency(self, base: float) -> float:
        jitter = self.backend.backend_config.jitter
        return base * (1.0 + jitter * (2 * self._rng.random() - 1)) if base else 0.0

    async def _generate(self, messages: list[Mapping[str, Any]], **sampling: Any) -> ModelOutput:
        cfg = self.backend.backend_config
        self.calls += 1
        delay = self._latency(cfg.gen_latency)
        if delay:
            await asyncio.sleep(delay)
        text = str(messages[-1].get("content", "")) if messages else ""
        match = _QUESTION.search(text)
        truth = int(match.group(1)) + int(match.group(2)) if match else 0
        correct = self._rng.random() < _p_correct(cfg.p0, self.served_skill)
        answer = truth if correct else truth + self._rng.choice([-2, -1, 1, 2])
        n = cfg.response_tokens
        ids = [self._rng.randrange(1, 100) for _ in range(n)]
        return ModelOutput(
            text=str(answer),
            content=str(answer),
            prompt_ids=[len(text) % 97, 1, 2],
            completion_ids=ids,
            logprobs=[-0.5] * n,
            finish_reason="stop",
        )

    async def encode_messages(self, messages: Any, add_generation_prompt: bool = True) -> list[int]:
        return [len(str(m.get("content", ""))) % 97 for m in messages]

    async def compute_logprobs(self, prompt_ids: Any, response_ids: Any, *, model: str = "policy") -> list[float]:
        return [-0.5 if model == "policy" else -0.7] * len(response_ids)


class SimulatedBackend(Backend):
    """Backend ``simulated``: no model, configurable latency, a policy that learns."""

    name: ClassVar[str] = "simulated"
    config_model: ClassVar[Any] = SimulatedConfig
    recomputes_old_logprobs: ClassVar[bool] = True  # its updates read no logprobs at all

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if not isinstance(self.backend_config, SimulatedConfig):
            self.backend_config = SimulatedConfig.model_validate(self.backend_config or {})
        self.skill = 0.0
        self.updates = 0
        self.calls: list[str] = []
        self.policy_versions: list[int] = []
        self.trained: list[dict[str, Any]] = []
        self._rng = random.Random(self.backend_config.seed + 1)

    def init_rollout_engine(self, **kwargs: Any) -> SimulatedEngine:
        self.rollout_engine = SimulatedEngine(self)
        return self.rollout_engine

    @property
    def p_correct(self) -> float:
        """Chance of a correct answer under the trainer's current policy."""
        return _p_correct(self.backend_config.p0, self.skill)

    async def generate_episodes(self, batch, workflow_engine, is_validation: bool = False):
        self.calls.append("generate_episodes")
        return await super().generate_episodes(batch, workflow_engine, is_validation)

    async def transform_to_backend_batch(self, state: TrainerState) -> Any:
        self.calls.append("transform_to_backend_batch")
        return [t for g in state.groups for t in g.trajectories]

    async def process_backend_batch(self, state: TrainerState) -> None:
        self.calls.append("process_backend_batch")

    async def compute_advantages(self, state: TrainerState, algorithm: Any) -> None:
        self.calls.append("compute_advantages")
        await super().compute_advantages(state, algorithm)

    async def update_policy(self, state: TrainerState) -> None:
        self.calls.append("update_policy")
        cfg = self.backend_config
        delay = cfg.train_latency * (1.0 + cfg.jitter * (2 * self._rng.random() - 1)) if cfg.train_latency else 0.0
        if delay:
            await asyncio.sleep(delay)
        trajectories = state.backend_batch or []
        good = 0
        for traj in trajectories:
            adv = traj.steps[0].advantage if traj.steps else None
            adv = sum(adv) / len(adv) if isinstance(adv, list) and adv else adv
            if adv is not None and adv > 0 and traj.total_reward > 0:
                good += 1
        self.skill += cfg.learn_rate * good / max(1, len(trajectories))
        self.updates += 1
        versions = [s.weight_version for t in trajectories for s in t.steps if s.weight_version is not None]
        task_ids = sorted({g.task_id for g in state.groups})
        mixed = sum(len({s.weight_version for s in t.steps}) > 1 for t in trajectories)
        record = {
            "update": self.updates,
            "step": state.step,
            "policy_version": self.updates - 1,
            "min_sample_version": min(versions) if versions else None,
            "max_sample_version": max(versions) if versions else None,
            "task_ids": task_ids,
            "episode_versions_mixed": mixed,
            "batch_ids": [str(t.get(self.config.data.id_key)) for t in state.batch if isinstance(t, dict)],
        }
        self.trained.append(record)
        state.metrics["simulated/p_correct"] = self.p_correct
        if cfg.trace_file:
            with open(cfg.trace_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    async def on_policy_updated(self, state: TrainerState, version: int) -> None:
        self.calls.append("on_policy_updated")
        self.policy_versions.append(version)
        assert self.rollout_engine is not None
        self.rollout_engine.served_skill = self.skill
        await super().on_policy_updated(state, version)

    async def on_train_start(self, state: TrainerState) -> None:
        self.calls.append("on_train_start")

    async def on_train_end(self, state: TrainerState) -> None:
        self.calls.append("on_train_end")

    async def on_epoch_start(self, state: TrainerState) -> None:
        self.calls.append("on_epoch_start")

    async def on_epoch_end(self, state: TrainerState) -> None:
        self.calls.append("on_epoch_end")

    async def on_batch_start(self, state: TrainerState) -> None:
        self.calls.append("on_batch_start")

    async def on_batch_end(self, state: TrainerState) -> None:
        self.calls.append("on_batch_end")

    async def on_validation_start(self, state: TrainerState) -> None:
        self.calls.append("on_validation_start")

    async def on_validation_end(self, state: TrainerState) -> None:
        self.calls.append("on_validation_end")

    def save_checkpoint(self, path: Path) -> None:
        self.calls.append("save_checkpoint")
        state = {"skill": self.skill, "updates": self.updates}
        if self.rollout_engine is not None:
            state["served_skill"] = self.rollout_engine.served_skill
        (Path(path) / "simulated.json").write_text(json.dumps(state), encoding="utf-8")

    def load_checkpoint(self, path: Path) -> None:
        self.calls.append("load_checkpoint")
        state = json.loads((Path(path) / "simulated.json").read_text(encoding="utf-8"))
        self.skill = state["skill"]
        self.updates = state["updates"]
        if self.rollout_engine is not None:
            self.rollout_engine.served_skill = state.get("served_skill", self.skill)

    async def shutdown(self) -> None:
        self.calls.append("shutdown")


async def simulated_workflow(task: dict[str, Any], engine: Any, turns: int = 1) -> Trajectory:
    """Ask the task's question ``turns`` times (one model call each); the reward fn scores the last answer."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": task["question"]}]
    steps = []
    for turn in range(turns):
        out = await engine.get_model_response(messages)
        messages = [*messages, {"role": "assistant", "content": out.content}]
        steps.append(Step.from_model_output(out, messages[:-1], action=out.content, done=turn == turns - 1))
        if turn < turns - 1:
            messages.append({"role": "user", "content": f"Again: {task['question']}"})
    return Trajectory(name="solver", steps=steps)


def simulated_reward(task: dict[str, Any], action: Any) -> float:
    """1.0 when ``action`` equals the task's ``answer``, else 0.0."""
    return 1.0 if str(action).strip() == str(task.get("answer", "")).strip() else 0.0


def simulated_tasks(n: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` arithmetic tasks ``{"id", "question", "answer", "data_source"}``."""
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        tasks.append(
            {
                "id": f"t{i}",
                "question": f"What is {a}+{b}?",
                "answer": str(a + b),
                "data_source": "small" if a + b < 100 else "large",
            }
        )
    return tasks


class RecordingHooks:
    """A hook plugin that records every trainer hook call as ``(hook, detail)``.

    Switch it on with ``hooks: {"rllm_core.testing:RecordingHooks": {}}`` and read it back from
    ``trainer.hook_plugins``.
    """

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings = dict(settings or {})
        self.calls: list[tuple[str, Any]] = []
        self.metrics_by_step: dict[int, dict[str, float]] = {}
        """What the trainer handed ``on_batch_end`` (and so its loggers), by step."""

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    @hookimpl
    def on_train_start(self, trainer: Any) -> None:
        self.calls.append(("on_train_start", trainer.step))

    @hookimpl
    def on_train_end(self, trainer: Any) -> None:
        self.calls.append(("on_train_end", trainer.step))

    @hookimpl
    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.calls.append(("on_epoch_start", epoch))

    @hookimpl
    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        self.calls.append(("on_epoch_end", epoch))

    @hookimpl
    def on_batch_start(self, trainer: Any, step: int) -> None:
        self.calls.append(("on_batch_start", step))

    @hookimpl
    def on_batch_end(self, trainer: Any, metrics: dict) -> None:
        self.calls.append(("on_batch_end", metrics.get("trainer/step")))
        self.metrics_by_step[trainer.step] = dict(metrics)

    @hookimpl
    def on_policy_updated(self, trainer: Any, version: int) -> None:
        self.calls.append(("on_policy_updated", version))

    @hookimpl
    def on_validation_start(self, trainer: Any) -> None:
        self.calls.append(("on_validation_start", trainer.step))

    @hookimpl
    def on_validation_end(self, trainer: Any, metrics: dict) -> None:
        self.calls.append(("on_validation_end", dict(metrics)))


def simulated_config(run_dir: str | Path, *sources: Any, overrides: list[str] | tuple[str, ...] = (), **sections: Any):
    """An ``RLLMConfig`` for the simulated backend writing to ``run_dir``; ``sections`` are merged on top.

    Defaults: 32 tasks, batch 4, n 4, one epoch, no loggers, resume off.
    """
    from rllm_core.config import load_config

    base: dict[str, Any] = {
        "backend": "simulated",
        "workflow": {"name": "simulated"},
        "reward": {"name": "simulated"},
        "data": {"train": simulated_tasks(32), "train_batch_size": 4},
        "rollout": {"n": 4},
        "trainer": {"run_dir": str(run_dir), "resume": "off"},
        "loggers": {},
    }
    extra = {k.rstrip("_") if k == "async_" else k: v for k, v in sections.items()}
    return load_config(base, *sources, extra, overrides=list(overrides))
