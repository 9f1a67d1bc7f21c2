"""``rollout.explore``: tasks no rollout solved are sampled, and trained, at a temperature of their own."""

from __future__ import annotations

import asyncio
import math
from typing import Any, ClassVar

import pytest

from rllm_core.config import ConfigError
from rllm_core.rows import TEMPERATURE_KEY
from rllm_core.testing import RecordingHooks, SimulatedBackend, SimulatedEngine, simulated_config, simulated_tasks
from rllm_core.trainer import UnifiedTrainer
from rllm_core.types import ModelOutput

pytestmark = pytest.mark.timeout(60)

# p0 = 0.3 and no learning: with groups of 4 a task fails all four about a quarter of the time.
SETTINGS = {
    "simulated": {"p0": 0.3, "learn_rate": 0.0, "seed": 5},
    "data": {"train": simulated_tasks(8), "train_batch_size": 4},  # each task comes back every other step
    "rollout": {"n": 4, "explore": {"temperature": 2.0, "after_correct": 0.0}},
    "trainer": {"epochs": 50, "total_steps": 8},
}


class _TemperatureEngine(SimulatedEngine):
    """Records the temperature each call was sampled at on its output (and so on its step)."""

    async def _generate(self, messages: list[Any], **sampling: Any) -> ModelOutput:
        out = await super()._generate(messages, **sampling)
        out.backend_data["temperature"] = sampling.get("temperature", 1.0)
        return out


class _TemperedBackend(SimulatedBackend):
    """A simulated backend that claims per-row temperatures and records what each update saw."""

    name: ClassVar[str] = "simulated"
    trains_row_temperature: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.seen: list[dict[str, Any]] = []

    def init_rollout_engine(self, **kwargs: Any) -> SimulatedEngine:
        self.rollout_engine = _TemperatureEngine(self)
        return self.rollout_engine

    async def update_policy(self, state: Any) -> None:
        rows = state.rows
        seen = []
        for r in range(len(rows)):
            group = state.groups[int(rows.group_index[r])]
            episode = group.episodes[int(rows.member_index[r])]
            step = episode.trajectories[0].steps[0]
            seen.append((episode.task_id, float(rows.temperature[r]), episode.info, step.backend_data["temperature"]))
        self.seen.append({"rows": seen, "explore_before": set(self._explore_at_generation)})
        await super().update_policy(state)

    async def generate_episodes(self, batch, workflow_engine, is_validation: bool = False):
        if not is_validation:
            self._explore_at_generation = set(workflow_engine.explore_tasks)
        return await super().generate_episodes(batch, workflow_engine, is_validation)


def _trainer(tmp_path, mode: str = "sync", backend: Any = None, **changes: Any) -> UnifiedTrainer:
    config = simulated_config(tmp_path, SETTINGS, {"trainer": {"mode": mode}}, **changes)
    return UnifiedTrainer(config, backend=backend if backend is not None else _TemperedBackend(config))


def test_explore_needs_a_backend_that_trains_each_row_at_its_own_temperature(tmp_path):
    config = simulated_config(tmp_path, SETTINGS)
    with pytest.raises(ConfigError, match=r"rollout\.explore\.temperature: backend 'simulated'"):
        UnifiedTrainer(config, backend=SimulatedBackend(config))


def test_the_explore_temperature_must_be_positive(tmp_path):
    with pytest.raises(Exception, match=r"rollout\.explore\.temperature"):
        simulated_config(tmp_path, SETTINGS, {"rollout": {"explore": {"temperature": 0.0}}})


def test_unsolved_tasks_are_sampled_and_trained_at_the_explore_temperature(tmp_path):
    trainer = _trainer(tmp_path)
    recorder = RecordingHooks()
    trainer.runner.add("recorder", recorder)
    trainer.fit()
    backend: _TemperedBackend = trainer.backend
    tempered_rows = 0
    for update in backend.seen:
        explored = update["explore_before"]
        for task_id, row_temperature, info, sampled_at in update["rows"]:
            if task_id in explored:
                # sampled at 2.0 (forced over the run's default), marked, and trained at 2.0
                assert sampled_at == 2.0 and info[TEMPERATURE_KEY] == 2.0 and row_temperature == 2.0
                tempered_rows += 1
            else:
                assert sampled_at == 1.0 and TEMPERATURE_KEY not in info and math.isnan(row_temperature)
    assert tempered_rows > 0
    metrics = list(recorder.metrics_by_step.values())
    assert metrics[-1]["explore/tasks"] == len(trainer.workflow_engine.explore_tasks)
    assert sum(m["explore/episodes"] for m in metrics) == tempered_rows


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_task_joins_the_set_when_its_group_fails_and_leaves_it_when_one_rollout_succeeds(tmp_path, mode):
    trainer = _trainer(tmp_path, mode)
    engine = trainer.workflow_engine
    history: list[tuple[dict[str, bool], set[str]]] = []
    original = UnifiedTrainer._update_explore

    def spy(self: UnifiedTrainer, episodes: list, metrics: dict) -> None:
        solved: dict[str, bool] = {}
        for e in episodes:
            solved[e.task_id] = solved.get(e.task_id, False) or bool(e.is_correct)
        before = set(engine.explore_tasks)
        original(self, episodes, metrics)
        history.append((solved, before, set(engine.explore_tasks)))

    trainer._update_explore = spy.__get__(trainer)
    trainer.fit()
    joined = left = 0
    for solved, before, after in history:
        expected = (before - {t for t, ok in solved.items() if ok}) | {t for t, ok in solved.items() if not ok}
        assert after == expected
        joined += len(after - before)
        left += len(before - after)
    assert joined > 0 and left > 0


def test_nothing_is_tempered_before_the_steps_rollouts_are_correct_enough(tmp_path):
    trainer = _trainer(tmp_path, rollout={"explore": {"temperature": 2.0, "after_correct": 0.95}})
    recorder = RecordingHooks()
    trainer.runner.add("recorder", recorder)
    trainer.fit()
    assert all(m["explore/tasks"] == 0 and m["explore/episodes"] == 0 for m in recorder.metrics_by_step.values())
    assert all(math.isnan(t) for update in trainer.backend.seen for _, t, _, _ in update["rows"])


def test_validation_is_never_tempered(tmp_path):
    engine = _trainer(tmp_path).workflow_engine
    tasks = simulated_tasks(3)
    engine.explore_tasks = {engine.task_id(t) for t in tasks}
    for is_validation, sampled_at in ((True, 0.0), (False, 2.0)):
        episodes = asyncio.run(engine.execute_tasks(tasks, is_validation=is_validation))
        assert len(episodes) == (3 if is_validation else 12)
        assert all(e.trajectories[0].steps[0].backend_data["temperature"] == sampled_at for e in episodes)
        assert all((TEMPERATURE_KEY in e.info) is (not is_validation) for e in episodes)


def test_the_set_survives_a_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, trainer={"total_steps": 3, "save_every": 3})
    trainer.fit()
    saved = set(trainer.workflow_engine.explore_tasks)
    assert saved  # p0 0.3, groups of 4: some task failed its last group
    resumed = _trainer(tmp_path, trainer={"total_steps": 3, "resume": "auto"})
    asyncio.run(resumed._maybe_resume())
    assert resumed.workflow_engine.explore_tasks == saved
