"""The example backend on its own: engine, policy-gradient step, checkpoints, config, a short run.

The run drives the backend's stages by hand with the core's workflow engine, grouping and
advantages (what ``UnifiedTrainer`` does), so the template's tests need nothing but rllm-core.
"""

from __future__ import annotations

import asyncio
import math

import pytest
from rllm_example_backend.backend import ExampleBackend, prompt_key
from rllm_example_backend.tasks import answer_workflow, exact_match, make_tasks

from rllm_core.config import ConfigError, load_config, validate_plugin_sections
from rllm_core.grouping import group_episodes
from rllm_core.protocol import TrainerState
from rllm_core.rows import build_rows
from rllm_core.types import Step, Trajectory, TrajectoryGroup
from rllm_core.workflows import WorkflowEngine

MESSAGES = [{"role": "user", "content": "2 + 3 = ?"}]


def make_backend(**overrides):
    config = load_config(
        {
            "backend": "example",
            "example": {"answers": ["a", "b", "c"], "lr": 1.0, **overrides},
            "workflow": {"name": "rllm_example_backend.tasks:answer_workflow"},
            "reward": {"name": "rllm_example_backend.tasks:exact_match"},
        }
    )
    backend = ExampleBackend(config)
    return backend, backend.init_rollout_engine()


def run(coro):
    return asyncio.run(coro)


def one_step_group(engine, token: int, advantage, logprob=None) -> TrajectoryGroup:
    prompt_ids = run(engine.encode_messages(MESSAGES))
    lp = [logprob] if logprob is not None else []
    step = Step(prompt_ids=prompt_ids, response_ids=[token], logprobs=lp, advantage=advantage)
    return TrajectoryGroup(task_id="t", role="solver", trajectories=[Trajectory(steps=[step])])


def state_for(groups: list[TrajectoryGroup]) -> TrainerState:
    """The state ``update_policy`` gets from the trainer: the groups as token rows, advantages filled."""
    rows = build_rows(groups)
    rows.fill_advantages()
    return TrainerState(groups=groups, rows=rows)


def test_sampled_logprobs_equal_compute_logprobs():
    backend, engine = make_backend()
    backend.logits[prompt_key(run(engine.encode_messages(MESSAGES)))] = [0.5, -1.0, 2.0]
    engine.load_weights(backend.logits)
    for _ in range(5):
        out = run(engine.get_model_response(MESSAGES))
        assert out.completion_ids[0] in (0, 1, 2)
        assert out.text == ["a", "b", "c"][out.completion_ids[0]]
        scored = run(engine.compute_logprobs(out.prompt_ids, out.completion_ids))
        assert scored == pytest.approx(out.logprobs)
        z = math.log(sum(math.exp(x) for x in (0.5, -1.0, 2.0)))
        assert out.logprobs[0] == pytest.approx([0.5, -1.0, 2.0][out.completion_ids[0]] - z)


def test_greedy_sampling_picks_the_top_answer():
    backend, engine = make_backend()
    backend.logits[prompt_key(run(engine.encode_messages(MESSAGES)))] = [0.0, 3.0, 1.0]
    engine.load_weights(backend.logits)
    assert {run(engine.get_model_response(MESSAGES, temperature=0)).text for _ in range(5)} == {"b"}


def test_update_follows_the_policy_gradient_formula():
    backend, engine = make_backend(lr=0.5)
    state = state_for([one_step_group(engine, token=2, advantage=1.5)])
    run(backend.update_policy(state))
    row = backend.logits[prompt_key(state.groups[0].trajectories[0].steps[0].prompt_ids)]
    # uniform start: grad = A * (onehot(2) - 1/3), ratio 1
    assert row == pytest.approx([0.5 * 1.5 * (-1 / 3), 0.5 * 1.5 * (-1 / 3), 0.5 * 1.5 * (2 / 3)])


def test_negative_advantage_lowers_the_token_probability():
    backend, engine = make_backend()
    state = state_for([one_step_group(engine, token=0, advantage=-1.0)])
    run(backend.update_policy(state))
    run(backend.on_policy_updated(state, 1))
    lp = run(engine.compute_logprobs(run(engine.encode_messages(MESSAGES)), [0]))[0]
    assert lp < math.log(1 / 3)


def test_per_token_list_advantage_acts_like_the_same_scalar():
    b1, e1 = make_backend()
    b2, e2 = make_backend()
    run(b1.update_policy(state_for([one_step_group(e1, 1, 0.7)])))
    run(b2.update_policy(state_for([one_step_group(e2, 1, [0.7])])))
    assert b1.logits == b2.logits


def test_importance_ratio_uses_the_sampling_logprob():
    backend, engine = make_backend(lr=1.0)
    # sampled when the token had probability 0.5; now it has 1/3: ratio 2/3
    state = state_for([one_step_group(engine, token=0, advantage=1.0, logprob=math.log(0.5))])
    run(backend.update_policy(state))
    row = next(iter(backend.logits.values()))
    assert row[0] == pytest.approx((2 / 3) * (2 / 3))


def test_ppo_clip_drops_tokens_outside_the_range():
    backend, engine = make_backend()
    backend.config.algorithm.loss.name = "ppo"
    # ratio (1/3)/0.1 = 3.3 > 1.28 with a positive advantage: clipped, no gradient
    state = state_for([one_step_group(engine, token=0, advantage=1.0, logprob=math.log(0.1))])
    run(backend.update_policy(state))
    assert state.metrics["example/clip_fraction"] == 1.0
    assert next(iter(backend.logits.values())) == [0.0, 0.0, 0.0]


def test_sampler_weights_change_only_on_policy_updated():
    backend, engine = make_backend()
    prompt_ids = run(engine.encode_messages(MESSAGES))
    before = run(engine.compute_logprobs(prompt_ids, [2]))
    state = state_for([one_step_group(engine, token=2, advantage=1.0)])
    run(backend.update_policy(state))
    assert run(engine.compute_logprobs(prompt_ids, [2])) == before
    run(backend.on_policy_updated(state, 1))
    assert run(engine.compute_logprobs(prompt_ids, [2]))[0] > before[0]
    assert engine.weight_version == 1
    assert run(engine.get_model_response(MESSAGES)).weight_version == 1


def test_reference_stays_initial_until_refreshed():
    backend, engine = make_backend()
    prompt_ids = run(engine.encode_messages(MESSAGES))
    state = state_for([one_step_group(engine, token=1, advantage=1.0)])
    run(backend.update_policy(state))
    run(backend.on_policy_updated(state, 1))
    assert run(engine.compute_logprobs(prompt_ids, [1], model="reference"))[0] == pytest.approx(math.log(1 / 3))
    run(engine.refresh_reference())
    assert run(engine.compute_logprobs(prompt_ids, [1], model="reference")) == run(
        engine.compute_logprobs(prompt_ids, [1])
    )
    with pytest.raises(ValueError, match="model must be"):
        run(engine.compute_logprobs(prompt_ids, [1], model="teacher"))


def test_checkpoint_round_trip_restores_weights_and_sampler(tmp_path):
    backend, engine = make_backend()
    state = state_for([one_step_group(engine, token=1, advantage=1.0)])
    run(backend.update_policy(state))
    run(backend.on_policy_updated(state, 1))
    backend.save_checkpoint(tmp_path / "ckpt")
    expected = [run(engine.get_model_response(MESSAGES)).completion_ids[0] for _ in range(20)]

    restored, restored_engine = make_backend()
    restored.load_checkpoint(tmp_path / "ckpt")
    assert restored.logits == backend.logits
    assert restored.updates == 1
    assert restored_engine.weight_version == 1
    got = [run(restored_engine.get_model_response(MESSAGES)).completion_ids[0] for _ in range(20)]
    assert got == expected


def test_checkpoint_from_other_answers_is_refused(tmp_path):
    backend, _ = make_backend()
    backend.save_checkpoint(tmp_path)
    other, _ = make_backend(answers=["x", "y"])
    with pytest.raises(ValueError, match=r"example\.answers"):
        other.load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"example_policy\.json"):
        other.load_checkpoint(tmp_path / "missing")


def test_config_section_is_validated_with_field_paths():
    config = load_config({"backend": "example", "example": {"lr": -1}, "loggers": {}})
    with pytest.raises(ConfigError, match=r"example\.lr"):
        validate_plugin_sections(config)
    config = load_config({"backend": "example", "example": {"answers": ["a", "a"]}, "loggers": {}})
    with pytest.raises(ConfigError, match=r"example\.answers"):
        validate_plugin_sections(config)
    config = validate_plugin_sections(load_config({"backend": "example", "example": {"lr": 0.25}, "loggers": {}}))
    assert ExampleBackend(config).settings.lr == 0.25


def test_validate_config_names_the_unsupported_loss():
    backend, _ = make_backend()
    config = load_config({"algorithm": {"loss": {"name": "dpo"}}})
    with pytest.raises(ConfigError, match=r"algorithm\.loss\.name"):
        backend.validate_config(config)


def test_backend_stages_learn_the_task():
    """Drive the stages like the trainer does; the reward rises from chance."""
    config = load_config(
        {
            "backend": "example",
            "example": {"lr": 2.0},
            "rollout": {"n": 8},
            "workflow": {"name": "rllm_example_backend.tasks:answer_workflow"},
            "reward": {"name": "rllm_example_backend.tasks:exact_match"},
        }
    )
    backend = ExampleBackend(config)
    engine = backend.init_rollout_engine()
    workflow_engine = WorkflowEngine(answer_workflow, config, engine, reward_fn=exact_match)
    tasks = make_tasks(4)

    async def train(steps: int) -> list[float]:
        rewards = []
        for version in range(1, steps + 1):
            state = TrainerState(batch=tasks)
            state.episodes = await backend.generate_episodes(tasks, workflow_engine)
            rewards.append(sum(e.is_correct for e in state.episodes) / len(state.episodes))
            state.groups = group_episodes(state.episodes)
            state.rows = build_rows(state.groups)
            state.backend_batch = await backend.transform_to_backend_batch(state)
            await backend.process_backend_batch(state)
            await backend.compute_advantages(state, config.algorithm)
            state.rows.fill_advantages()
            await backend.update_policy(state)
            await backend.on_policy_updated(state, version)
        return rewards

    rewards = run(train(25))
    workflow_engine.close()
    assert sum(rewards[:3]) / 3 < 0.4
    assert sum(rewards[-3:]) / 3 > 0.8
