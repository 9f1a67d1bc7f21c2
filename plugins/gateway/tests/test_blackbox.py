"""The ``blackbox`` workflow: agents as callables and as commands, failures, and training through it."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import openai
import pytest
from gateway_helpers import ScriptedEngine

from rllm_core.testing import simulated_config, simulated_tasks
from rllm_core.trainer import UnifiedTrainer
from rllm_core.types import TerminationReason
from rllm_core.workflows import WorkflowEngine

HERE = __name__


async def two_turn_agent(task, base_url, api_key):
    """An async agent on the official client: asks, asks again, answers with the last reply."""
    c = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    messages = [{"role": "user", "content": task["question"]}]
    r = await c.chat.completions.create(model="rllm", messages=messages)
    messages += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "sure?"}]
    r = await c.chat.completions.create(model="rllm", messages=messages)
    return r.choices[0].message.content


def sync_agent(task, base_url, api_key):
    c = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    r = c.chat.completions.create(model="rllm", messages=[{"role": "user", "content": task["question"]}])
    return r.choices[0].message.content


def rewarding_agent(task, base_url, api_key):
    sync_agent(task, base_url, api_key)
    httpx.post(
        base_url.removesuffix("/v1") + "/reward", json={"reward": 0.25}, headers={"Authorization": f"Bearer {api_key}"}
    )


async def raising_agent(task, base_url, api_key):
    c = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    await c.chat.completions.create(model="rllm", messages=[{"role": "user", "content": "before the crash"}])
    raise RuntimeError("agent crashed")


async def hanging_agent(task, base_url, api_key):
    await asyncio.sleep(3600)


AGENT_SCRIPT = """
import json, os, sys
from openai import OpenAI
task = json.load(sys.stdin)
c = OpenAI(max_retries=0)  # OPENAI_BASE_URL / OPENAI_API_KEY come from the environment
r = c.chat.completions.create(model="rllm", messages=[{"role": "user", "content": task["question"]}])
print("log line")
print(r.choices[0].message.content)
sys.exit(int(task.get("exit", 0)))
"""


def exact_reward(task, action):
    return 1.0 if action == f"echo: {task['question']}" else 0.0


def run_workflow(tmp_path, tasks, **args):
    config = simulated_config(
        tmp_path, workflow={"name": "blackbox", "args": args}, reward={"name": f"{HERE}:exact_reward"}
    )
    wf = WorkflowEngine(None, config, ScriptedEngine())

    async def main():
        return await asyncio.gather(*(wf.run_episode(t, 0) for t in tasks))

    return asyncio.run(main())


def test_async_callable_agent_gives_a_rewarded_multi_turn_episode(tmp_path):
    (ep,) = run_workflow(tmp_path, [{"id": "a", "question": "q1"}], agent=f"{HERE}:two_turn_agent")
    assert ep.termination_reason is TerminationReason.ENV_DONE
    (traj,) = ep.trajectories
    assert [s.model_response for s in traj.steps] == ["echo: q1", "echo: sure?"]
    assert traj.steps[-1].action == "echo: sure?" and traj.reward == 0.0  # the reward fn scored the answer
    assert ep.info["gateway_calls"] == 2


def test_sync_callable_agent_is_scored_by_the_reward_function(tmp_path):
    eps = run_workflow(tmp_path, [{"id": str(i), "question": f"q{i}"} for i in range(4)], agent=f"{HERE}:sync_agent")
    assert [e.trajectories[0].reward for e in eps] == [1.0] * 4 and all(e.is_correct for e in eps)


def test_reward_posted_by_the_agent_wins(tmp_path):
    (ep,) = run_workflow(tmp_path, [{"id": "a", "question": "q"}], agent=f"{HERE}:rewarding_agent")
    assert ep.trajectories[0].reward == 0.25 and ep.is_correct


def test_raising_agent_gives_an_error_episode(tmp_path):
    (ep,) = run_workflow(tmp_path, [{"id": "a", "question": "q"}], agent=f"{HERE}:raising_agent")
    assert ep.termination_reason is TerminationReason.ERROR
    assert "agent crashed" in ep.info["error"]
    assert ep.trajectories[0].reward is None  # what it recorded is kept, unrewarded


def test_hanging_agent_gives_a_timeout_episode(tmp_path):
    start = time.monotonic()
    (ep,) = run_workflow(tmp_path, [{"id": "a", "question": "q"}], agent=f"{HERE}:hanging_agent", timeout=0.5)
    assert ep.termination_reason is TerminationReason.TIMEOUT
    assert time.monotonic() - start < 5


def test_command_agent_reads_the_task_and_answers_on_its_last_line(tmp_path):
    tasks = [{"id": "ok", "question": "q"}, {"id": "bad", "question": "q", "exit": 3}]
    ok, bad = run_workflow(tmp_path, tasks, command=[sys.executable, "-c", AGENT_SCRIPT], timeout=30)
    assert ok.termination_reason is TerminationReason.ENV_DONE and ok.trajectories[0].reward == 1.0
    assert bad.termination_reason is TerminationReason.ERROR and "status 3" in bad.info["error"]


def test_hanging_command_is_killed_at_its_timeout(tmp_path):
    (ep,) = run_workflow(
        tmp_path,
        [{"id": "a", "question": "q"}],
        command=[sys.executable, "-c", "import time; time.sleep(60)"],
        timeout=0.5,
    )
    assert ep.termination_reason is TerminationReason.TIMEOUT


def test_agent_or_command_is_required(tmp_path):
    (ep,) = run_workflow(tmp_path, [{"id": "a", "question": "q"}])
    assert ep.termination_reason is TerminationReason.ERROR and "exactly one of agent" in ep.info["error"]


def test_trainer_trains_a_blackbox_agent_for_two_steps(tmp_path):
    config = simulated_config(
        tmp_path,
        workflow={"name": "blackbox", "args": {"agent": f"{HERE}:two_turn_agent", "timeout": 30}},
        data={"train": simulated_tasks(8), "train_batch_size": 4},
        rollout={"n": 2},
    )
    trainer = UnifiedTrainer(config)
    trainer.fit()
    assert trainer.backend.policy_versions == [1, 2]
    assert trainer.engine.calls == 8 * 2 * 2  # every agent call went through the gateway to the engine
    assert len(trainer.backend.trained) == 2


async def counted_agent(task, base_url, api_key):
    """Per episode: 4 requests, of which 1 identical resend and 1 refused (n=2)."""
    c = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    messages = [{"role": "user", "content": task["question"]}]
    r = await c.chat.completions.create(model="rllm", messages=messages)
    await c.chat.completions.create(model="rllm", messages=messages)  # a client retry
    with pytest.raises(openai.BadRequestError):
        await c.chat.completions.create(model="rllm", messages=messages, n=2)
    messages += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "and?"}]
    r = await c.chat.completions.create(model="rllm", messages=messages, stream=True)
    return "".join([chunk.choices[0].delta.content or "" async for chunk in r if chunk.choices])


def test_gateway_counters_reach_each_steps_metrics(tmp_path):
    config = simulated_config(
        tmp_path,
        workflow={"name": "blackbox", "args": {"agent": f"{HERE}:counted_agent", "timeout": 30}},
        data={"train": simulated_tasks(8), "train_batch_size": 4},
        rollout={"n": 2},
        loggers={"jsonl": {}},
    )
    UnifiedTrainer(config).fit()
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2
    for m in steps:  # 8 episodes per step
        assert (m["gateway/requests"], m["gateway/resends"], m["gateway/errors"]) == (32, 8, 8)
        assert m["gateway/sessions/opened"] == 8 and 1 <= m["gateway/sessions/open_max"] <= 8
        assert 0 < m["gateway/engine_s"] < m["gateway/latency_s"]
        assert 0 < m["gateway/overhead_s_max"] <= m["gateway/latency_s"]


@pytest.fixture(autouse=True)
def _no_session_left():
    yield
    from rllm_gateway.workflow import get_gateway

    assert len(get_gateway()) == 0


_flaky_calls: dict[str, int] = {}


async def flaky_agent(task, base_url, api_key):
    """Fails on a refused connection the first ``task["fail"]`` times, then answers through the gateway."""
    n = _flaky_calls[task["id"]] = _flaky_calls.get(task["id"], 0) + 1
    if n <= task["fail"]:
        c = openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key=api_key, max_retries=0)
        await c.chat.completions.create(model="rllm", messages=[{"role": "user", "content": "x"}])
    c = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    r = await c.chat.completions.create(model="rllm", messages=[{"role": "user", "content": task["question"]}])
    return r.choices[0].message.content


def test_transient_connection_errors_are_retried_with_backoff_then_give_up(tmp_path):
    _flaky_calls.clear()
    start = time.monotonic()
    ok, lost = run_workflow(
        tmp_path,
        [{"id": "ok", "question": "q", "fail": 2}, {"id": "lost", "question": "q", "fail": 5}],
        agent=f"{HERE}:flaky_agent",
        retries=2,
        backoff_s=0.05,
    )
    assert ok.termination_reason is TerminationReason.ENV_DONE and ok.info["connection_retries"] == 2
    assert ok.trajectories[0].reward == 1.0 and len(ok.trajectories) == 1  # only the good session's call
    assert lost.termination_reason is TerminationReason.ERROR and lost.info["connection_retries"] == 2
    assert "Connection" in lost.info["error"]
    assert _flaky_calls == {"ok": 3, "lost": 3}  # 1 try + 2 retries each
    assert time.monotonic() - start >= 0.05 + 0.1  # backoff 0.05, then 0.1


def test_a_raising_agent_is_not_retried(tmp_path):
    (ep,) = run_workflow(tmp_path, [{"id": "a", "question": "q"}], agent=f"{HERE}:raising_agent", retries=3)
    assert ep.termination_reason is TerminationReason.ERROR and "connection_retries" not in ep.info


def test_a_wildcard_bind_advertises_this_hosts_name():
    import socket

    from rllm_gateway.server import Gateway

    gw = Gateway(ScriptedEngine(), host="0.0.0.0").start()
    loop = asyncio.new_event_loop()
    try:
        assert gw.advertise == socket.getfqdn()
        base_url, _ = gw.open("s1", loop=loop)
        assert base_url.startswith(f"http://{socket.getfqdn()}:{gw.port}/sessions/s1/v1")
        # reachable on this machine's loopback too (bound on every interface)
        r = httpx.get(f"http://127.0.0.1:{gw.port}/v1/models", timeout=5)
        assert r.status_code == 200
    finally:
        gw.stop()
        loop.close()
    assert Gateway(host="127.0.0.1", advertise="gw.example").base_url.startswith("http://gw.example:")
