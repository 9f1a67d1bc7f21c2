"""The built-in ``opsd`` hook: per-token self-distillation advantages.

Unit tests use ``TableEngine``, a ``RolloutEngine`` whose logprobs are a table written in the test
(so the expected advantages are computed by hand); the end-to-end test runs the local torch
backend with the hook switched on from config alone.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from rllm_core.advantages import compute_advantages
from rllm_core.builtins.opsd import OPSDConfig, OPSDHook, opsd_advantages
from rllm_core.config import ConfigError, load_config, validate_plugin_sections
from rllm_core.engine import RolloutEngine
from rllm_core.grouping import group_episodes
from rllm_core.hookspecs import hookimpl
from rllm_core.plugins import get_registry
from rllm_core.types import Episode, Step, Trajectory


class TableEngine(RolloutEngine):
    """Logprobs looked up by (prompt text, model): one logprob per response position.

    ``encode_messages`` turns the last message's text into code points, so a prompt id list maps
    back to its text. Every scoring call yields to the loop once, and the engine records how many
    were in flight at once.
    """

    supports_logprobs = True

    def __init__(self, table: dict[tuple[str, str], list[float]]):
        super().__init__()
        self.table = dict(table)
        self.calls: list[tuple[str, str, int]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.refreshes = 0

    async def encode_messages(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True):
        return [ord(c) for c in messages[-1]["content"]]

    async def compute_logprobs(self, prompt_ids, response_ids, *, model: str = "policy") -> list[float]:
        text = "".join(map(chr, prompt_ids))
        self.calls.append((text, model, len(response_ids)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        return self.table[(text, model)][: len(response_ids)]

    async def refresh_reference(self) -> None:
        self.refreshes += 1


def step(prompt: str, teacher: str | None, n_tokens: int, logprobs: list[float] | None = None) -> Step:
    info = {"teacher_messages": [{"role": "user", "content": teacher}]} if teacher is not None else {}
    return Step(
        prompt_ids=[ord(c) for c in prompt],
        response_ids=list(range(n_tokens)),
        logprobs=logprobs or [],
        info=info,
    )


def run(coro):
    return asyncio.run(coro)


def test_formula_by_hand():
    teacher = [-1.0, -0.5, -2.0]
    student = [-1.5, -0.5, -1.0]
    # r = coef * (teacher - student) = 2 * [0.5, 0.0, -1.0] = [1.0, 0.0, -2.0]
    assert opsd_advantages(teacher, student, coef=2.0) == [1.0, 0.0, -2.0]
    # gamma 0.5: A3 = -2; A2 = 0 + 0.5 * -2 = -1; A1 = 1 + 0.5 * -1 = 0.5
    assert opsd_advantages(teacher, student, coef=2.0, gamma=0.5) == [0.5, -1.0, -2.0]
    # clip 0.75 after discounting
    assert opsd_advantages(teacher, student, coef=2.0, gamma=0.5, clip=0.75) == [0.5, -0.75, -0.75]
    with pytest.raises(ValueError, match="teacher scored 3 tokens"):
        opsd_advantages(teacher, student[:2])


def test_hook_writes_per_token_advantages_computed_by_hand():
    engine = TableEngine(
        {
            ("Q 2+3 ANSWER 5", "reference"): [-0.2, -1.0, -0.1],
            ("Q 2+3", "policy"): [-0.7, -0.4, -3.0],
            ("Q 2+3 then", "policy"): [-0.3, -0.3],
            ("Q 2+3 then ANSWER 5", "reference"): [-0.1, -2.3],
        }
    )
    first = step("Q 2+3", "Q 2+3 ANSWER 5", 3, logprobs=[-0.5, -0.5, -0.5])  # sampling logprobs on the step
    second = step("Q 2+3 then", "Q 2+3 then ANSWER 5", 2)  # none: computed under the policy
    episode = Episode(task_id="t", trajectories=[Trajectory(name="solver", steps=[first, second])])
    hook = OPSDHook({"coef": 0.5})
    run(hook.postprocess_opsd(episode=episode, engine=engine, config=None))

    assert first.advantage == pytest.approx([0.5 * (-0.2 + 0.5), 0.5 * (-1.0 + 0.5), 0.5 * (-0.1 + 0.5)])
    assert second.advantage == pytest.approx([0.5 * (-0.1 + 0.3), 0.5 * (-2.3 + 0.3)])
    assert ("Q 2+3", "policy", 3) not in engine.calls  # the step's own logprobs were used
    assert ("Q 2+3 then", "policy", 2) in engine.calls
    assert episode.metrics["opsd/steps"] == 2.0
    assert episode.metrics["opsd/advantage_mean"] == pytest.approx((sum(first.advantage) + sum(second.advantage)) / 5)


def test_hook_applies_gamma_and_clip():
    engine = TableEngine({("T", "reference"): [0.0, 0.0, 0.0]})
    s = step("S", "T", 3, logprobs=[-1.0, 0.0, -3.0])  # r = [1, 0, 3]
    hook = OPSDHook({"gamma": 0.5, "clip": 2.0})
    run(hook.process(Episode(trajectories=[Trajectory(steps=[s])]), engine))
    # A = [1 + 0.5*(0 + 0.5*3), 0 + 0.5*3, 3] = [1.75, 1.5, 3] -> clip 2
    assert s.advantage == pytest.approx([1.75, 1.5, 2.0])


def test_teacher_current_scores_under_the_policy():
    engine = TableEngine({("T", "policy"): [-1.0]})
    s = step("S", "T", 1, logprobs=[-2.0])
    run(OPSDHook({"teacher": "current"}).process(Episode(trajectories=[Trajectory(steps=[s])]), engine))
    assert s.advantage == pytest.approx([1.0])
    assert engine.calls == [("T", "policy", 1)]


def test_scoring_calls_of_an_episode_run_concurrently():
    engine = TableEngine({(f"T{i}", "reference"): [0.0] for i in range(6)})
    steps = [step(f"S{i}", f"T{i}", 1, logprobs=[-1.0]) for i in range(6)]
    run(OPSDHook().process(Episode(trajectories=[Trajectory(steps=steps)]), engine))
    assert engine.max_in_flight == 6
    assert all(s.advantage == [1.0] for s in steps)


def test_only_listed_roles_are_touched():
    engine = TableEngine({("T", "reference"): [0.0, 0.0]})
    solver = step("S", "T", 2, logprobs=[-1.0, -1.0])
    judge = step("S", "T", 2, logprobs=[-1.0, -1.0])
    episode = Episode(trajectories=[Trajectory(name="solver", steps=[solver]), Trajectory(name="judge", steps=[judge])])
    run(OPSDHook({"roles": ["solver"]}).process(episode, engine))
    assert solver.advantage == [1.0, 1.0]
    assert judge.advantage is None


def test_steps_without_teacher_context_are_skipped_or_zeroed():
    engine = TableEngine({("T", "reference"): [0.0]})
    with_teacher, without = step("S", "T", 1, logprobs=[-1.0]), step("S", None, 3)
    run(OPSDHook().process(Episode(trajectories=[Trajectory(steps=[with_teacher, without])]), engine))
    assert without.advantage is None
    without = step("S", None, 3)
    run(OPSDHook({"missing_teacher": "zero"}).process(Episode(trajectories=[Trajectory(steps=[without])]), engine))
    assert without.advantage == [0.0, 0.0, 0.0]


def test_malformed_teacher_context_names_the_step():
    bad = Step(response_ids=[1], logprobs=[-1.0], info={"teacher_messages": "just a string"})
    episode = Episode(task_id="t9", rollout_idx=2, trajectories=[Trajectory(name="solver", steps=[bad])])
    with pytest.raises(ValueError, match=r"task_id='t9', rollout_idx=2\) role 'solver' step 0"):
        run(OPSDHook().process(episode, TableEngine({})))


def test_refreshed_teacher_every_k_versions():
    engine = TableEngine({})

    class Trainer:
        pass

    trainer = Trainer()
    trainer.engine = engine
    hook = OPSDHook({"teacher": "refresh", "refresh_every": 2})
    for version in range(1, 6):
        run(hook.on_policy_updated(trainer=trainer, version=version))
    assert engine.refreshes == 2 and hook.teacher_version == 4
    frozen = OPSDHook({"teacher": "initial"})
    for version in range(1, 6):
        run(frozen.on_policy_updated(trainer=trainer, version=version))
    assert engine.refreshes == 2


def test_fresh_run_snapshots_the_initial_teacher_but_a_resumed_one_does_not():
    engine = TableEngine({})

    class Trainer:
        def __init__(self, resumed_from, step):
            self.engine, self.resumed_from, self.step, self.served_version = engine, resumed_from, step, step

    run(OPSDHook().on_train_start(trainer=Trainer(None, 0)))
    assert engine.refreshes == 1
    hook = OPSDHook({"teacher": "refresh", "refresh_every": 3})
    run(hook.on_train_start(trainer=Trainer("runs/x/checkpoints/step_5", 5)))
    assert engine.refreshes == 1 and hook.teacher_version == 5
    run(OPSDHook({"teacher": "current"}).on_train_start(trainer=Trainer(None, 0)))
    assert engine.refreshes == 1


def test_registered_as_a_builtin_hook_with_a_validated_section():
    reg = get_registry().get("hook", "opsd")
    assert reg.obj is OPSDHook and reg.plugin == "rllm.opsd"
    assert reg.config_model is OPSDConfig
    config = load_config({"backend": "example", "loggers": {}, "hooks": {"opsd": {"gamma": 1.5}}})
    with pytest.raises(ConfigError, match=r"hooks\.opsd\.gamma"):
        validate_plugin_sections(config)
    config = validate_plugin_sections(load_config({"backend": "example", "loggers": {}, "hooks": {"opsd": None}}))
    assert config.hooks["opsd"]["teacher_key"] == "teacher_messages"


def test_mixed_run_keeps_opsd_lists_and_gives_the_other_role_grpo():
    engine = TableEngine({("T", "reference"): [0.0, 0.0]})
    episodes = []
    for i, reward in enumerate([1.0, 0.0]):
        solver = Trajectory(name="solver", steps=[step("S", "T", 2, logprobs=[-1.0, -0.5])], reward=reward)
        judge = Trajectory(name="judge", steps=[step("J", None, 1)], reward=reward)
        episodes.append(Episode(task_id="t", rollout_idx=i, trajectories=[solver, judge]))
    hook = OPSDHook({"roles": ["solver"]})
    for e in episodes:
        run(hook.process(e, engine))
    groups = group_episodes(episodes)
    algorithm = load_config({"algorithm": {"use_precomputed_advantage": True}}).algorithm
    compute_advantages(groups, algorithm)
    by_role = {g.role: g for g in groups}
    assert [t.steps[0].advantage for t in by_role["solver"].trajectories] == [[1.0, 0.5], [1.0, 0.5]]
    judge_adv = [t.steps[0].advantage for t in by_role["judge"].trajectories]
    # GRPO on [1, 0]: centred +-0.5 over the unbiased std sqrt(1/2)
    assert judge_adv[0] == pytest.approx(0.5**0.5, abs=1e-4) and judge_adv[1] == pytest.approx(-(0.5**0.5), abs=1e-4)


# -- end to end on the local torch backend -------------------------------------------------------


class ReferenceCheck:
    """Runs after ``opsd`` on each episode and recomputes its advantages from the engine."""

    def __init__(self) -> None:
        self.checked = 0
        self.max_error = 0.0

    @hookimpl(trylast=True)
    async def postprocess_opsd(self, episode: Episode, engine: Any) -> None:
        for trajectory in episode.trajectories:
            for s in trajectory.steps:
                prompt = await engine.encode_messages(s.info["teacher_messages"])
                teacher = await engine.compute_logprobs(prompt, s.response_ids, model="reference")
                expected = [t - lp for t, lp in zip(teacher, s.logprobs, strict=True)]
                assert isinstance(s.advantage, list) and len(s.advantage) == len(s.response_ids)
                errors = [abs(a - e) for a, e in zip(s.advantage, expected, strict=True)]
                self.max_error = max([self.max_error, *errors])
                self.checked += 1


@pytest.mark.slow
def test_torch_backend_trains_with_opsd_switched_on_from_config(tmp_path):
    pytest.importorskip("rllm_torch")
    pytest.importorskip("rllm_example_opsd")
    from rllm_core.trainer import UnifiedTrainer

    config = load_config(
        Path(__file__).resolve().parents[1] / "examples" / "opsd" / "config.yaml",
        overrides=[
            "hooks.opsd.teacher=initial",
            "trainer.total_steps=2",
            "trainer.val_every=0",
            "data.train_batch_size=4",
            "rollout.n=2",
            f"trainer.run_dir={tmp_path}",
            "loggers={}",
        ],
    )
    trainer = UnifiedTrainer(config)
    check = ReferenceCheck()
    trainer.runner.add("reference_check", check)
    metrics = trainer.fit()

    assert check.checked == 2 * 4 * 2  # steps x tasks x rollouts
    assert check.max_error < 1e-4  # advantages = teacher (initial policy) - student, token by token
    assert trainer.runner.failures == {}
    assert metrics["hooks/failures"] == 0.0
    final = [s for g in trainer.state.groups for t in g.trajectories for s in t.steps]
    assert final and all(isinstance(s.advantage, list) for s in final)
    assert all(len(s.advantage) == len(s.response_ids) and all(map(math.isfinite, s.advantage)) for s in final)
