"""Dynamic sampling (DAPO): uninformative tasks are replaced until the step has a full batch."""

from __future__ import annotations

import pytest

from rllm_core.advantages import is_collapsed
from rllm_core.testing import RecordingHooks, SimulatedBackend, simulated_config
from rllm_core.trainer import UnifiedTrainer
from rllm_core.types import Episode, Step, Trajectory

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


def _episode(task_id: str, response: list[int], reward: float) -> Episode:
    step = Step(prompt_ids=[1, 2], response_ids=response, logprobs=[-1.0] * len(response), reward=reward)
    return Episode(
        task_id=task_id,
        trajectories=[Trajectory(name="solver", steps=[step], reward=reward)],
        is_correct=reward > 0,
    )


def test_a_task_is_collapsed_when_its_rollouts_fail_alike_and_mostly_give_one_answer():
    same = [_episode("t", [5, 6], 0.0) for _ in range(3)] + [_episode("t", [7], 0.0)]
    assert is_collapsed(same, 0.5) and is_collapsed(same, 0.75) and not is_collapsed(same, 0.8)
    diverse = [_episode("t", [i], 0.0) for i in range(4)]  # has not found the answer: not collapsed
    assert not is_collapsed(diverse, 0.5)
    one_right = [*same[:3], _episode("t", [9], 1.0)]  # informative: GRPO has a signal
    assert not is_collapsed(one_right, 0.5)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_collapsed_tasks_are_kept_beside_the_informative_ones_with_advantage_zero(tmp_path, mode):
    # p0 0.1 and answers of four tokens drawn from 99 ids: failures differ, so nothing collapses
    backend, metrics = run(tmp_path / "diverse", mode, algorithm={"filter": {"anchor_collapsed": 3}})
    assert all(m["dynamic/anchored_tasks"] == 0 for m in metrics.values())
    assert all(len(r["task_ids"]) == 4 for r in backend.trained)
    # with a share of 0.1 (one answer of four) every all-failed task counts as collapsed
    backend, metrics = run(
        tmp_path / "same",
        mode,
        simulated={"response_tokens": 1, "seed": 3},
        algorithm={"filter": {"anchor_collapsed": 3, "collapse_share": 0.1}},
    )
    anchored = [m["dynamic/anchored_tasks"] for m in metrics.values()]
    assert max(anchored) > 0 and all(a <= 3 for a in anchored)
    for record, a in zip(backend.trained, anchored, strict=True):
        assert len(set(record["task_ids"])) == 4 + a  # the batch, plus the anchored tasks
    for m in metrics.values():
        assert m["filter/dropped_uniform"] == 0  # kept through the uniform-reward filter


def test_async_anchors_also_come_from_uninformative_tasks_taken_once_the_discard_budget_is_spent(tmp_path):
    # one round: nothing may be discarded, so every uninformative task is taken into the batch
    backend, metrics = run(
        tmp_path,
        "async",
        simulated={"response_tokens": 1, "seed": 3},
        algorithm={"filter": {"max_sample_rounds": 1, "anchor_collapsed": 3, "collapse_share": 0.1}},
    )
    assert all(m.get("dynamic/discarded_tasks", 0.0) == 0 for m in metrics.values())
    anchored = [m["dynamic/anchored_tasks"] for m in metrics.values()]
    assert max(anchored) > 0 and all(a <= 3 for a in anchored)
    for record, m in zip(backend.trained, metrics.values(), strict=True):
        # the anchored tasks are trained (once each) beside the informative ones
        assert m["filter/groups_kept"] == len(set(record["task_ids"])) == len(record["task_ids"])
        assert m["filter/groups_kept"] + m["filter/dropped_uniform"] == m["filter/groups_in"]


def test_anchoring_collapsed_tasks_needs_dynamic_sampling(tmp_path):
    with pytest.raises(ValueError, match=r"algorithm\.filter\.anchor_collapsed needs filter\.dynamic_sampling"):
        changes = {"algorithm": {"filter": {"anchor_collapsed": 2, "dynamic_sampling": False}}}
        simulated_config(tmp_path, SETTINGS, changes)
