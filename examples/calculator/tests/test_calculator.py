"""The calculator example: its tool, its reward, its two configs, and the token identity of its two ways
of running the same agent (the native workflow, and the OpenAI-client script through the gateway)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from rllm_example_calculator.agent import TOOLS, run_tool
from rllm_example_calculator.data import VOCAB, make_tasks, train_tasks, val_tasks
from rllm_example_calculator.reward import calculator_reward

from rllm_core.config import load_config

EXAMPLE = Path(__file__).resolve().parents[1]


def call(name: str) -> dict:
    return {"id": "call_0", "type": "function", "function": {"name": name, "arguments": "{}"}}


def chat(question: str, first: dict, *rest: dict) -> list[dict]:
    return [{"role": "user", "content": question}, first, *rest]


def score(task: dict, action) -> tuple[float, bool]:
    out = asyncio.run(calculator_reward(task, action))
    return pytest.approx(out.reward), out.is_correct


def test_the_keys_compute_from_the_question():
    assert run_tool("add", "7 + 3 =") == "10"
    assert run_tool("subtract", "7 - 3 =") == "4"
    assert run_tool("subtract", "2 + 5 =") == "-3"  # the key decides, not the question's operator
    assert run_tool("multiply", "7 + 3 =") == "error"
    assert run_tool("add", "seven plus three") == "error"


def test_train_and_validation_facts_are_disjoint_and_speak_the_vocabulary():
    train, val = train_tasks(), val_tasks()
    assert len(train) + len(val) == 110 and not {t["id"] for t in train} & {t["id"] for t in val}
    words = {w for t in train + val for w in t["question"].split()} | {str(t["answer"]) for t in train + val}
    assert words <= set(VOCAB)
    assert {t["function"]["name"] for t in TOOLS} <= set(VOCAB)


TASK = {"question": "7 - 3 =", "expression": "7 - 3", "answer": 4}
PRESS = {"role": "assistant", "content": "", "tool_calls": [call("subtract")]}


def test_the_reward_pays_the_whole_skill_in_full():
    conversation = chat("7 - 3 =", PRESS, {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"})
    assert score(TASK, conversation) == (1.0, True)
    assert score(TASK, json.dumps(conversation)) == (1.0, True)  # the agent script prints it as JSON


def test_the_reward_gives_partial_credit_part_by_part():
    wrong_key = {"role": "assistant", "content": "", "tool_calls": [call("add")]}
    relayed = chat("7 - 3 =", wrong_key, {"role": "tool", "content": "10"}, {"role": "assistant", "content": "10"})
    assert score(TASK, relayed) == (0.3 * 2 / 4 + 0.5, False)  # the wrong key's name earns nothing
    near_miss = chat("7 - 3 =", PRESS, {"role": "tool", "content": "4"}, {"role": "assistant", "content": "6"})
    assert score(TASK, near_miss) == (0.3 + 0.5 * (1 - 2 / 5), False)
    half_written = chat("7 - 3 =", {"role": "assistant", "content": "<tool_call> subtract 4"})
    assert score(TASK, half_written) == (0.3 * 2 / 4, False)  # two words in place, not a call


def test_an_answer_without_a_tool_call_earns_nothing():
    assert score(TASK, chat("7 - 3 =", {"role": "assistant", "content": "4"})) == (0.0, False)
    assert score(TASK, "not a conversation") == (0.0, False)


def test_the_two_configs_differ_only_in_how_the_agent_runs():
    native = load_config(EXAMPLE / "config.yaml").to_dict()
    gateway = load_config(EXAMPLE / "config_gateway.yaml").to_dict()
    assert native["workflow"]["name"] == "calculator" and gateway["workflow"]["name"] == "blackbox"
    assert gateway["workflow"]["args"]["agent"] == "rllm_example_calculator.agent:solve"
    for config in (native, gateway):
        del config["workflow"], config["trainer"]["name"]
    assert native == gateway
    assert native["torch"]["tiny"]["vocab"] == VOCAB


# -- token identity: the same sampled turns make the same rows, natively and through the gateway -------

# question -> (first reply, reply after the tool results); None: the untrained model's own greedy reply
REPLIES = {
    "7 - 3 =": ("<tool_call> subtract </tool_call> <eos>", "4 <eos>"),  # the whole skill: reward 1
    "2 + 5 =": ("<tool_call> subtract </tool_call> <eos>", None),  # the wrong key (-3), then the model
    "5 - 4 =": ("<tool_call> add </tool_call> <tool_call> subtract </tool_call> <eos>", "1 <eos>"),  # two calls
    "8 - 2 =": ("<tool_call> add </tool_call> <eos>", "<tool_call> subtract </tool_call> <eos>"),  # out of turns
    "6 + 1 =": ("<tool_call> </tool_call> <eos>", None),  # malformed (no name): no tool result, one turn
    "4 + 4 =": (None, None),  # the model's own first reply
}


def scripted_reply(prompt: list[str]) -> list[str]:
    user = prompt.index("<|user|>")
    question = " ".join(prompt[user + 1 : prompt.index("<eos>", user)])
    first, after_tool = REPLIES[question]
    reply = after_tool if "<|tool|>" in prompt else first
    return reply.split() if reply else []


@pytest.fixture(scope="module")
def scripted_engine():
    pytest.importorskip("rllm_torch")
    pytest.importorskip("rllm_gateway")
    from rllm_torch.backend import TorchBackend
    from scripted_policy import ScriptedPolicy

    config = load_config(
        EXAMPLE / "config.yaml",
        overrides=["torch.num_threads=1", "torch.gen_batch_window_ms=0", "rollout.train_sampling.temperature=0"],
    )
    backend = TorchBackend(config)
    engine = backend.init_rollout_engine()
    backend.runtime.model = ScriptedPolicy(backend.runtime.model, backend.tokenizer, scripted_reply)
    yield engine
    asyncio.run(backend.shutdown())


def run_one_by_one(engine, workflow: dict) -> tuple[list, dict]:
    """Each task's episode, one after the other (greedy, so the untrained model's own replies repeat),
    and the engine's counters over them."""
    from rllm_core.workflows import WorkflowEngine

    config = load_config(EXAMPLE / "config.yaml", overrides=["rollout.train_sampling.temperature=0"])
    config.workflow.name, config.workflow.args = workflow["name"], workflow.get("args", {})
    runner = WorkflowEngine(None, config, engine)
    facts = {t["question"]: t for t in make_tasks()}
    tasks = [facts[question] for question in REPLIES]

    async def main():
        engine.pop_counters()
        return [await runner.run_episode(task, 0) for task in tasks], engine.pop_counters()

    return asyncio.run(main())


def rows_of(episodes):
    from rllm_core.rows import build_rows
    from rllm_core.types import TrajectoryGroup

    groups = [TrajectoryGroup(task_id=e.task_id, role="agent", trajectories=e.trajectories) for e in episodes]
    rows = build_rows(groups)
    return rows, [
        (list(rows.tokens[r]), rows.loss_mask[a:b].tolist(), int(rows.prompt_lens[r]), rows.logprobs[a:b].tolist())
        for r, (a, b) in enumerate(zip(rows.offsets[:-1], rows.offsets[1:], strict=True))
    ]


@pytest.mark.timeout(120)
def test_native_and_gateway_runs_of_the_same_turns_make_token_identical_rows(scripted_engine):
    agent_script = [sys.executable, "-m", "rllm_example_calculator.agent"]
    native, native_counts = run_one_by_one(scripted_engine, {"name": "calculator"})
    runs = {
        "command": run_one_by_one(scripted_engine, {"name": "blackbox", "args": {"command": agent_script}}),
        "callable": run_one_by_one(
            scripted_engine, {"name": "blackbox", "args": {"agent": "rllm_example_calculator.agent:solve"}}
        ),
    }
    native_rows, native_fields = rows_of(native)
    # the scenarios happened: the full skill, two turns where a tool answered, one turn elsewhere
    assert [len(e.trajectories[0].steps) for e in native] == [2, 2, 2, 2, 1, 1]
    assert native[0].trajectories[0].reward == 1.0 and native[0].is_correct
    assert native_counts["engine/multiturn/continued"] == 4
    assert len(native_rows) == 6 and native_rows.metrics["rows/breaks"] == 0  # one row per trajectory
    for how, (episodes, counts) in runs.items():
        assert [e.termination_reason for e in episodes] == [e.termination_reason for e in native], how
        assert [len(e.trajectories) for e in episodes] == [1] * 6, how  # every call joined its lineage
        assert counts["engine/multiturn/continued"] == 4, how
        assert rows_of(episodes)[1] == native_fields, how  # prompt and response ids, loss masks, logprobs
        assert [e.trajectories[0].reward for e in episodes] == [e.trajectories[0].reward for e in native], how
