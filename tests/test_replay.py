"""algorithm.replay: earlier successes replayed into groups that came back all wrong."""

from __future__ import annotations

import json

import pytest

from rllm_core.config import ConfigError
from rllm_core.replay import REPLAYED_KEY, SuccessReplay, fresh
from rllm_core.rows import TEMPERATURE_KEY, build_rows
from rllm_core.testing import RecordingHooks, SimulatedBackend, simulated_config
from rllm_core.trainer import UnifiedTrainer
from rllm_core.types import Episode, Step, Trajectory, TrajectoryGroup

pytestmark = pytest.mark.timeout(60)


def _episode(task_id: str, correct: bool, idx: int = 0, response: list[int] | None = None) -> Episode:
    response = response or [7, 8, idx]
    step = Step(
        prompt_ids=[1, 2], response_ids=response, logprobs=[-0.5] * len(response), temperature=2.0, weight_version=3
    )
    return Episode(
        task_id=task_id,
        rollout_idx=idx,
        trajectories=[Trajectory(name="solver", steps=[step], reward=float(correct))],
        is_correct=correct,
        info={TEMPERATURE_KEY: 2.0},
    )


def _group(task_id: str, n: int = 4, correct: tuple[int, ...] = ()) -> list[Episode]:
    return [_episode(task_id, i in correct, i) for i in range(n)]


def test_an_all_wrong_group_gets_the_latest_success_in_place_of_its_last_rollout():
    replay = SuccessReplay(per_group=1, max_tasks=10)
    old, new = _episode("t", True, 5, [1, 1]), _episode("t", True, 6, [2, 2])
    replay.observe([old, _episode("t", False, 1)])
    replay.observe([new])
    group = _group("t")
    out = replay.fill(group)
    assert out[:3] == group[:3]
    copy = out[3]
    assert copy.info[REPLAYED_KEY] and copy.rollout_idx == 3 and copy.is_correct
    step = copy.trajectories[0].steps[0]
    assert step.response_ids == [2, 2]  # the latest success
    # trained as a sample of the current policy, at the run's temperature
    assert step.logprobs == [] and step.temperature is None and TEMPERATURE_KEY not in copy.info
    assert step.weight_version is None  # a sample of no served version: not counted as stale
    # a copy: what is stored is untouched
    assert new.trajectories[0].steps[0].logprobs == [-0.5, -0.5] and REPLAYED_KEY not in new.info
    rows = build_rows([TrajectoryGroup(task_id="t", role="solver", trajectories=[e.trajectories[0] for e in out])])
    assert rows.temperature[3] != rows.temperature[3]  # NaN: the run's temperature
    assert all(v != v for v in rows.logprobs[rows.offsets[3] : rows.offsets[4]][rows.loss_mask[rows.offsets[3] :]])


def test_groups_with_a_success_or_nothing_stored_or_a_single_rollout_are_left_alone():
    replay = SuccessReplay(per_group=1, max_tasks=10)
    replay.observe([_episode("t", True)])
    with_success = _group("t", correct=(2,))
    assert replay.fill(with_success) is with_success
    unknown = _group("u")
    assert replay.fill(unknown) is unknown
    single = _group("t", n=1)
    assert replay.fill(single) is single  # one replayed success alone would be uniform again


def test_several_successes_replace_at_most_all_but_one_rollout():
    replay = SuccessReplay(per_group=3, max_tasks=10)
    wins = [_episode("t", True, 10 + i, [i, i]) for i in range(4)]
    replay.observe(wins)
    assert [e.rollout_idx for e in replay.successes("t")] == [11, 12, 13]  # the latest three
    out = replay.fill(_group("t", n=3))
    assert [bool(e.info.get(REPLAYED_KEY)) for e in out] == [False, True, True]
    assert [e.trajectories[0].steps[0].response_ids for e in out[1:]] == [[2, 2], [3, 3]]


def test_replayed_copies_are_never_stored_and_fresh_drops_them():
    replay = SuccessReplay(per_group=1, max_tasks=10)
    replay.observe([_episode("t", True, 0, [4, 4])])
    out = replay.fill(_group("t"))
    replay.observe(out)  # the copy is correct, but not a new success
    assert replay.successes("t")[0].info.get(REPLAYED_KEY) is None
    assert fresh(out) == out[:3]


def test_the_least_recently_successful_task_is_forgotten_first():
    replay = SuccessReplay(per_group=1, max_tasks=2)
    replay.observe([_episode("a", True)])
    replay.observe([_episode("b", True)])
    replay.observe([_episode("a", True, 1)])  # a is fresh again
    replay.observe([_episode("c", True)])
    assert len(replay) == 2 and replay.successes("b") == [] and replay.successes("a") and replay.successes("c")


def test_state_round_trips_through_json():
    replay = SuccessReplay(per_group=2, max_tasks=10)
    replay.observe([_episode("a", True, 0, [1]), _episode("a", True, 1, [2]), _episode("b", True, 0, [3])])
    again = SuccessReplay(per_group=2, max_tasks=10)
    again.load_state_dict(json.loads(json.dumps(replay.state_dict())))
    assert again.state_dict() == replay.state_dict()
    assert [e.trajectories[0].steps[0].response_ids for e in again.successes("a")] == [[1], [2]]


def test_fill_all_keeps_the_list_when_nothing_is_replayed():
    replay = SuccessReplay(per_group=1, max_tasks=10)
    episodes = _group("a", correct=(0,)) + _group("b")
    assert replay.fill_all(episodes) is episodes
    replay.observe([_episode("b", True, 9)])
    out = replay.fill_all(episodes)
    assert [e.task_id for e in out] == ["a"] * 4 + ["b"] * 4 and out[-1].info[REPLAYED_KEY]


# -- in the trainer ----------------------------------------------------------------------------

# p0 = 0.1, no learning, groups of 4: most groups are all wrong, and a task that succeeded once
# fails all four rollouts of a later group about 2 times in 3.
SETTINGS = {
    "simulated": {"p0": 0.1, "learn_rate": 0.0, "seed": 3},
    "data": {"train_batch_size": 4},
    "trainer": {"epochs": 50, "total_steps": 12},
    "algorithm": {"filter": {"dynamic_sampling": True, "max_sample_rounds": 4}, "replay": {"successes": 1}},
}


class _Watching(SimulatedBackend):
    """Keeps every fresh correct episode generated, and every replayed copy trained."""

    def __init__(self, config):
        super().__init__(config)
        self.successes: list[Episode] = []
        self.replayed: list[tuple[int, Episode]] = []
        self.fresh_seen = 0

    async def generate_episodes(self, batch, workflow_engine, is_validation=False):
        episodes = await super().generate_episodes(batch, workflow_engine, is_validation)
        self.successes += [e for e in episodes if e.is_correct]
        self.fresh_seen += len(episodes)
        return episodes

    async def transform_to_backend_batch(self, state):
        self.replayed += [(state.step, e) for e in state.episodes if e.info.get(REPLAYED_KEY)]
        return await super().transform_to_backend_batch(state)


def _run(tmp_path, mode: str, **changes):
    config = simulated_config(tmp_path, SETTINGS, {"trainer": {"mode": mode}}, **changes)
    backend = _Watching(config)
    trainer = UnifiedTrainer(config, backend=backend)
    recorder = RecordingHooks()
    trainer.runner.add("recorder", recorder)
    trainer.fit()
    return trainer, backend, recorder.metrics_by_step


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_trainer_replays_earlier_successes_and_measures_only_fresh_episodes(tmp_path, mode):
    _, backend, metrics = _run(tmp_path, mode)
    assert len(backend.replayed) >= 3
    answers = {(e.task_id, e.trajectories[0].steps[0].model_response) for e in backend.successes}
    for _, copy in backend.replayed:
        # a success the policy generated before, trained as the current policy's sample
        assert (copy.task_id, copy.trajectories[0].steps[0].model_response) in answers
        assert copy.trajectories[0].steps[0].logprobs == []
    assert sum(m["replay/episodes"] for m in metrics.values()) == len(backend.replayed)
    # the train metrics count what was generated, not the copies (in async mode the generation
    # loop runs ahead: what it made for steps that never came is in no step's metrics)
    count = sum(m["train/episodes/count"] for m in metrics.values())
    correct = sum(m["train/reward/mean"] * m["train/episodes/count"] for m in metrics.values())
    if mode == "sync":
        assert count == backend.fresh_seen and correct == pytest.approx(len(backend.successes))
    else:
        assert count <= backend.fresh_seen and correct <= len(backend.successes) + 1e-9


def test_replay_off_replays_nothing(tmp_path):
    _, backend, metrics = _run(tmp_path, "sync", algorithm={"replay": {"successes": 0}})
    assert backend.replayed == [] and all("replay/episodes" not in m for m in metrics.values())


def test_replay_without_dynamic_sampling_fills_the_trained_groups(tmp_path):
    _, backend, _ = _run(tmp_path, "sync", algorithm={"filter": {"dynamic_sampling": False}})
    assert backend.replayed


def test_a_backend_that_needs_sampling_logprobs_is_refused(tmp_path):
    class NeedsLogprobs(SimulatedBackend):
        recomputes_old_logprobs = False

    config = simulated_config(tmp_path, SETTINGS)
    with pytest.raises(ConfigError, match=r"algorithm\.replay\.successes: backend 'simulated'"):
        UnifiedTrainer(config, backend=NeedsLogprobs(config))


def test_the_store_is_checkpointed_and_resumed(tmp_path):
    trainer, _, _ = _run(tmp_path, "sync", trainer={"total_steps": 4, "resume": "off"})
    saved = trainer.replay.state_dict()
    assert saved
    config = simulated_config(tmp_path, SETTINGS, trainer={"total_steps": 4, "resume": "auto"})
    again = UnifiedTrainer(config, backend=_Watching(config))
    again.fit()  # resumes at step 4 of 4: nothing left to train
    assert again.step == 4 and again.replay.state_dict() == saved
