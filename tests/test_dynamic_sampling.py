"""Dynamic sampling (DAPO): uninformative tasks are replaced until the step has a full batch."""

from __future__ import annotations

import pytest

from rllm_core.testing import RecordingHooks, SimulatedBackend, simulated_config
from rllm_core.trainer import UnifiedTrainer

pytestmark = pytest.mark.timeout(60)

# p0 = 0.1, no learning, groups of 4: a task is informative (rewards differ) with
# probability 1 - 0.9^4 - 0.1^4 ~ 0.34, so a batch of 4 usually needs several rounds.
SETTINGS = {
    "simulated": {"p0": 0.1, "learn_rate": 0.0, "seed": 3},
    "data": {"train_batch_size": 4},
    "trainer": {"epochs": 50, "total_steps": 6},
    "algorithm": {"filter": {"dynamic_sampling": True, "max_sample_rounds": 8}},
}


def run(tmp_path, mode: str, **changes):
    config = simulated_config(tmp_path, SETTINGS, {"trainer": {"mode": mode}}, **changes)
    trainer = UnifiedTrainer(config)
    recorder = RecordingHooks()
    trainer.runner.add("recorder", recorder)
    trainer.fit()
    backend: SimulatedBackend = trainer.backend
    return backend, recorder.metrics_by_step


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_every_step_trains_on_a_full_batch_of_informative_tasks(tmp_path, mode):
    backend, metrics = run(tmp_path, mode)
    assert len(backend.trained) == 6
    for record in backend.trained:
        assert len(record["task_ids"]) == 4  # refilled up to the batch size
    replaced = sum(m.get("dynamic/discarded_tasks", 0.0) for m in metrics.values())  # async
    rounds = [m.get("dynamic/rounds", 1.0) for m in metrics.values()]  # sync
    assert replaced > 0 or max(rounds) > 1
    for m in metrics.values():
        assert m["filter/dropped_uniform"] == 0  # nothing uninformative reached the update
        # the train metrics describe everything generated, not only the kept (informative) tasks
        assert m["train/episodes/count"] >= 16


def test_sync_metrics_count_rounds_and_tasks(tmp_path):
    _, metrics = run(tmp_path, "sync")
    for m in metrics.values():
        assert m["dynamic/informative_tasks"] >= 4 or m["dynamic/rounds"] == 8
        assert m["dynamic/tasks_generated"] == 4 * m["dynamic/rounds"]
        assert m["train/episodes/count"] == 4 * m["dynamic/tasks_generated"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rounds_are_bounded(tmp_path, mode):
    # one round: no replacement, the uninformative tasks are only dropped
    backend, metrics = run(tmp_path, mode, algorithm={"filter": {"max_sample_rounds": 1}})
    assert any(len(r["task_ids"]) < 4 for r in backend.trained)
    assert all(m.get("dynamic/discarded_tasks", 0.0) == 0 for m in metrics.values())
    assert all(m.get("dynamic/rounds", 1.0) == 1 for m in metrics.values())


def test_without_dynamic_sampling_uniform_groups_are_trained_as_they_come(tmp_path):
    backend, metrics = run(tmp_path, "sync", algorithm={"filter": {"dynamic_sampling": False}})
    assert all(len(r["task_ids"]) == 4 for r in backend.trained)  # kept, uniform or not
    assert all("dynamic/rounds" not in m for m in metrics.values())
