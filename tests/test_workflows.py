"""The workflow engine: rollouts per task, ids, concurrency, retries, rewards, normalisation."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest

from rllm_core.config import ConfigError
from rllm_core.hookspecs import hookimpl
from rllm_core.plugins import registered
from rllm_core.testing import SimulatedBackend, simulated_config
from rllm_core.types import Episode, RewardOutput, Step, TerminationReason, Trajectory
from rllm_core.workflows import Workflow, WorkflowEngine


def _engine(tmp_path, wf, reward=None, **sections):
    cfg = simulated_config(tmp_path, **sections)
    backend = SimulatedBackend(cfg)
    return WorkflowEngine(wf, cfg, backend.init_rollout_engine(), reward_fn=reward)


async def answer_wf(task, engine):
    messages = [{"role": "user", "content": task["question"]}]
    out = await engine.get_model_response(messages)
    return Trajectory(steps=[Step.from_model_output(out, messages, action=out.content)])


TASKS = [
    {"id": "a|b#1", "question": "What is 1+2?", "answer": "3"},
    {"id": "x", "question": "What is 1+2?", "answer": "3"},
]


def test_n_rollouts_per_task_with_ids_and_rewards(tmp_path):
    eng = _engine(tmp_path, answer_wf, reward="simulated", rollout={"n": 3})
    episodes = asyncio.run(eng.execute_tasks(TASKS))
    assert [(e.task_id, e.rollout_idx) for e in episodes] == [("a|b#1", i) for i in range(3)] + [
        ("x", i) for i in range(3)
    ]
    for e in episodes:
        assert e.task is not None and e.trajectories[0].reward in (0.0, 1.0)
        assert e.is_correct == (e.trajectories[0].reward > 0)
    validation = asyncio.run(eng.execute_tasks(TASKS, is_validation=True))
    assert len(validation) == 2  # n_val defaults to 1
    assert all(s.weight_version == 0 for e in episodes for t in e.trajectories for s in t.steps)


def test_reward_output_sets_is_correct_and_async_reward_works(tmp_path):
    async def reward(task, action):
        return RewardOutput(reward=0.5, is_correct=False)

    episodes = asyncio.run(_engine(tmp_path, answer_wf, reward=reward, rollout={"n": 2}).execute_tasks(TASKS[:1]))
    assert all(e.trajectories[0].reward == 0.5 and not e.is_correct for e in episodes)


def test_async_rewards_that_wait_hang_or_raise(tmp_path):
    """An async reward runs in the episode's task up to its first wait; from there on the timeout
    holds. One that finishes at once, waits then finishes, hangs, or raises before or after waiting."""
    cleaned = []

    async def reward(task, action):
        kind = task["kind"]
        if kind == "raise_now":
            raise ValueError("bad answer format")
        if kind == "at_once":
            return 1.0
        try:
            await asyncio.sleep(10 if kind == "hang" else 0.01)
        finally:
            cleaned.append(kind)  # the hung call is cancelled inside the reward, not abandoned
        if kind == "raise_later":
            raise ValueError("judge said no")
        return 0.75

    kinds = ["at_once", "wait", "hang", "raise_now", "raise_later"]
    tasks = [{"id": k, "kind": k, "question": "What is 1+2?"} for k in kinds]
    cfg = simulated_config(tmp_path, rollout={"n": 1}, reward={"name": "x", "timeout": 0.2})
    eng = WorkflowEngine(answer_wf, cfg, SimulatedBackend(cfg).init_rollout_engine(), reward_fn=reward)
    start = time.perf_counter()
    episodes = asyncio.run(eng.execute_tasks(tasks))
    assert time.perf_counter() - start < 5
    rewards = {e.task_id: e.trajectories[0].reward for e in episodes}
    assert rewards == {"at_once": 1.0, "wait": 0.75, "hang": 0.0, "raise_now": 0.0, "raise_later": 0.0}
    assert eng.pop_counters() == {"reward/timeouts": 1.0, "reward/errors": 2.0}
    errors = {e.task_id: e.info.get("reward_error", "") for e in episodes}
    assert "reward.timeout=0.2s" in errors["hang"] and "bad answer format" in errors["raise_now"]
    assert "judge said no" in errors["raise_later"] and not errors["wait"] and not errors["at_once"]
    assert sorted(cleaned) == ["hang", "raise_later", "wait"]


def test_a_cancelled_episode_cancels_the_async_reward_it_is_waiting_on(tmp_path):
    seen = []

    async def reward(task, action):
        seen.append("waiting")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return 1.0

    cfg = simulated_config(tmp_path, rollout={"n": 1}, reward={"name": "x", "timeout": 30})
    eng = WorkflowEngine(answer_wf, cfg, SimulatedBackend(cfg).init_rollout_engine(), reward_fn=reward)

    async def main():
        run = asyncio.ensure_future(eng.execute_tasks(TASKS[:1]))
        for _ in range(500):
            if seen:
                break
            await asyncio.sleep(0.01)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(main())
    assert seen == ["waiting", "cancelled"]


def test_reward_left_alone_when_workflow_set_it(tmp_path):
    async def wf(task, engine):
        return Episode(trajectories=[Trajectory(reward=2.0, steps=[Step(action="zzz")])], is_correct=True)

    calls = []

    def reward(task, action):
        calls.append(action)
        return 0.0

    (ep,) = asyncio.run(_engine(tmp_path, wf, reward=reward, rollout={"n": 1}).execute_tasks(TASKS[:1]))
    assert ep.trajectories[0].reward == 2.0 and ep.is_correct and calls == []


def test_class_workflow_gets_args_and_a_fresh_instance_per_episode(tmp_path):
    instances = []

    class Wf(Workflow):
        def __init__(self, greeting: str):
            super().__init__(greeting=greeting)
            self.greeting = greeting
            instances.append(self)

        async def run(self, task, engine):
            return Trajectory(steps=[Step(action=self.greeting)])

    eng = _engine(tmp_path, Wf, workflow={"name": "x", "args": {"greeting": "hi"}}, rollout={"n": 3})
    episodes = asyncio.run(eng.execute_tasks(TASKS[:1]))
    assert len(instances) == 3 and len({id(i) for i in instances}) == 3
    assert all(e.trajectories[0].steps[0].action == "hi" for e in episodes)


def test_function_workflow_args_and_unknown_arg_error(tmp_path):
    async def wf(task, engine, turns=1):
        return [Trajectory(name=f"r{i}") for i in range(turns)]

    eng = _engine(tmp_path, wf, workflow={"name": "x", "args": {"turns": 2}}, rollout={"n": 1})
    (ep,) = asyncio.run(eng.execute_tasks(TASKS[:1]))
    assert [t.name for t in ep.trajectories] == ["r0", "r1"]
    with pytest.raises(ConfigError, match=r"workflow\.args\.colour"):
        _engine(tmp_path, wf, workflow={"name": "x", "args": {"colour": 2}})


def test_workflow_by_registered_name_and_module_path(tmp_path):
    class Plugin:
        @hookimpl
        def register_workflows(self, register):
            register("answer", answer_wf)

    with registered(Plugin()):
        eng = _engine(tmp_path, None, workflow={"name": "answer"}, rollout={"n": 1})
        assert len(asyncio.run(eng.execute_tasks(TASKS))) == 2
    eng = _engine(tmp_path, None, workflow={"name": "rllm_core.testing:simulated_workflow"}, rollout={"n": 1})
    assert len(asyncio.run(eng.execute_tasks(TASKS))) == 2
    with pytest.raises(ConfigError, match=r"workflow\.name"):
        _engine(tmp_path, None, workflow={"name": None})


def test_an_answer_cut_by_the_token_limit_ends_the_episode_as_max_response_length(tmp_path):
    async def wf(task, engine):
        finish = task["finish"]
        step = Step(prompt_ids=[1], response_ids=[2], finish_reason=finish, done=True)
        return Episode(trajectories=[Trajectory(steps=[step])], termination_reason=TerminationReason.ENV_DONE)

    async def timed_out(task, engine):
        step = Step(prompt_ids=[1], response_ids=[2], finish_reason="length")
        return Episode(trajectories=[Trajectory(steps=[step])], termination_reason=TerminationReason.MAX_TURNS)

    tasks = [{"id": "cut", "finish": "length"}, {"id": "ok", "finish": "stop"}]
    episodes = asyncio.run(_engine(tmp_path, wf, rollout={"n": 1}).execute_tasks(tasks))
    assert [e.termination_reason for e in episodes] == [
        TerminationReason.MAX_RESPONSE_LENGTH,
        TerminationReason.ENV_DONE,
    ]
    # a reason the workflow chose itself is kept
    kept = asyncio.run(_engine(tmp_path, timed_out, rollout={"n": 1}).execute_tasks(tasks[:1]))
    assert kept[0].termination_reason is TerminationReason.MAX_TURNS


def test_concurrency_limit(tmp_path):
    running = peak = 0

    async def wf(task, engine):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1
        return Trajectory(steps=[Step()])

    eng = _engine(tmp_path, wf, workflow={"name": "x", "max_concurrency": 3}, rollout={"n": 5})
    assert len(asyncio.run(eng.execute_tasks(TASKS))) == 10
    assert peak == 3


def test_retries_recover_a_flaky_workflow(tmp_path):
    attempts = {}

    async def flaky(task, engine):
        attempts[task["id"]] = attempts.get(task["id"], 0) + 1
        if attempts[task["id"]] < 3:
            raise RuntimeError("flaky")
        return Trajectory(steps=[Step()])

    eng = _engine(tmp_path, flaky, workflow={"name": "x", "retries": 2}, rollout={"n": 1})
    (ep,) = asyncio.run(eng.execute_tasks(TASKS[:1]))
    assert ep.termination_reason is not TerminationReason.ERROR and ep.info["attempts"] == 3
    assert eng.pop_counters() == {"workflow/errors": 2.0, "workflow/retries": 2.0}


def test_raise_on_error_reraises(tmp_path):
    async def bad(task, engine):
        raise KeyError("boom")

    eng = _engine(tmp_path, bad, workflow={"name": "x", "raise_on_error": True}, rollout={"n": 1})
    with pytest.raises(KeyError):
        asyncio.run(eng.execute_tasks(TASKS[:1]))


def test_stream_yields_each_task_when_complete(tmp_path):
    async def wf(task, engine):
        await asyncio.sleep(0.03 if task["id"] == "a|b#1" else 0.0)
        return Trajectory(steps=[Step()])

    eng = _engine(tmp_path, wf, rollout={"n": 2})

    async def collect():
        return [[e.task_id for e in eps] async for eps in eng.stream(TASKS)]

    assert asyncio.run(collect()) == [["x", "x"], ["a|b#1", "a|b#1"]]


def test_sync_reward_runs_off_the_loop_and_blocking_calls_overlap(tmp_path):
    lock = threading.Lock()
    running = peak = 0
    threads = set()

    def reward(task, action):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        threads.add(threading.get_ident())
        time.sleep(0.02)  # blocking I/O, e.g. a sandbox or a judge server
        with lock:
            running -= 1
        return 1.0

    eng = _engine(tmp_path, answer_wf, reward=reward, rollout={"n": 12})
    episodes = asyncio.run(eng.execute_tasks(TASKS[:1]))
    assert [e.trajectories[0].reward for e in episodes] == [1.0] * 12
    assert threading.get_ident() not in threads
    assert peak > 1  # queued calls do not wait for one worker to finish the others
    eng.close()


def test_a_hung_sync_reward_does_not_hold_up_the_calls_queued_behind_it(tmp_path):
    release = threading.Event()
    calls = []

    def reward(task, action):
        calls.append(action)
        if len(calls) == 1:
            release.wait(5)  # hangs well past reward.timeout
        return 1.0

    cfg = simulated_config(tmp_path, rollout={"n": 6}, reward={"name": "x", "timeout": 0.5})
    eng = WorkflowEngine(answer_wf, cfg, SimulatedBackend(cfg).init_rollout_engine(), reward_fn=reward)
    try:
        episodes = asyncio.run(eng.execute_tasks(TASKS[:1]))
        counters = eng.pop_counters()
    finally:
        release.set()
        eng.close()
    rewards = sorted(e.trajectories[0].reward for e in episodes)
    assert rewards == [0.0] + [1.0] * 5
    assert counters == {"reward/timeouts": 1.0, "reward/stuck_threads": 1.0}
    assert sum("reward_error" in e.info for e in episodes) == 1


def _reward_threads(other: set[threading.Thread]) -> int:
    return sum(t.name == "rllm-reward" and t not in other for t in threading.enumerate())


@pytest.mark.timeout(60)
def test_hung_sync_rewards_cost_one_thread_each_and_later_rewards_still_score(tmp_path):
    release = threading.Event()

    def reward(task, action):
        if task["hang"]:
            release.wait(60)  # time.sleep(1000) that the test can end
        return 1.0

    hung = [{"id": f"h{i}", "hang": True, "question": "What is 1+2?"} for i in range(40)]
    good = [{"id": f"g{i}", "hang": False, "question": "What is 1+2?"} for i in range(200)]
    cfg = simulated_config(tmp_path, rollout={"n": 1}, reward={"name": None, "timeout": 1.0})
    eng = WorkflowEngine(answer_wf, cfg, SimulatedBackend(cfg).init_rollout_engine(), reward_fn=reward)
    max_workers = eng._rewards.max_workers
    earlier = set(threading.enumerate())  # idle reward threads of other tests' engines exit on their own
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Each round hangs more calls than there are workers: before, the first round left every
            # worker stuck, and every later reward timed out without running.
            for _ in range(2):
                episodes = asyncio.run(eng.execute_tasks(hung))
                assert [e.trajectories[0].reward for e in episodes] == [0.0] * 40
                assert eng.pop_counters()["reward/timeouts"] == 40
            later = asyncio.run(eng.execute_tasks(good))
        assert [e.trajectories[0].reward for e in later] == [1.0] * 200
        assert any("never ran" in e.info["reward_error"] for e in episodes)  # the calls past max_workers
        # One thread lost per hung call that was running (a worker's), none for those that never ran.
        assert eng.pop_counters() == {"reward/stuck_threads": 2 * max_workers}
        assert _reward_threads(earlier) <= 3 * max_workers
        assert any("still running after reward.timeout=1.0s" in str(w.message) for w in caught)
    finally:
        release.set()
        eng.close()
    deadline = time.monotonic() + 10
    while (eng._rewards.stuck or _reward_threads(earlier)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert eng._rewards.stuck == 0 and _reward_threads(earlier) == 0, "released and idle threads exit"


_HANG_REWARD = """
import time

def reward(task, action):
    if int(task["id"][1:]) % 2:
        time.sleep(1000)
    return 1.0
"""


@pytest.mark.timeout(120)
def test_a_trainer_whose_sync_reward_hangs_exits_promptly(tmp_path):
    (tmp_path / "hang_reward.py").write_text(_HANG_REWARD)
    config = {
        "backend": "simulated",
        "workflow": {"name": "simulated"},
        "reward": {"name": "hang_reward:reward", "timeout": 1},
        "data": {"train": "rllm_core.testing:simulated_tasks", "train_batch_size": 4},
        "rollout": {"n": 2},
        "trainer": {"total_steps": 2, "run_dir": str(tmp_path / "run"), "resume": "off"},
        "loggers": {"jsonl": {}},
    }
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLLM_")}
    start = time.monotonic()
    # Before, the reward pool's threads were joined at exit: the process waited for time.sleep(1000).
    out = subprocess.run(
        [sys.executable, "-m", "rllm_core.cli", "train", "config.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - start < 40
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(r["reward/timeouts"] > 0 and r["train/correct_frac"] > 0 for r in rows)


def test_counters_include_the_rollout_engines_counters(tmp_path):
    async def counting_wf(task, engine):
        engine.engine.count("engine/tool_calls/malformed")  # what an engine does when a call cannot be read
        return await answer_wf(task, engine)

    eng = _engine(tmp_path, counting_wf, rollout={"n": 2})
    asyncio.run(eng.execute_tasks(TASKS))
    assert eng.pop_counters() == {"engine/tool_calls/malformed": 4.0}
    assert eng.pop_counters() == {} and eng.engine.counters == {}
