"""The gateway in front of the tinker engine: an agent on the official ``openai`` client, trained on
the tinker backend through the stand-in, with token-exact multi-turn across the HTTP hop."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("peft", reason="the stand-in's LoRA needs peft (pip install 'rllm-tinker[test]')")
pytest.importorskip("rllm_torch", reason="the stand-in's model comes from rllm-torch (pip install 'rllm-tinker[test]')")
pytest.importorskip("rllm_gateway", reason="the gateway is rllm-gateway (plugins/gateway)")
sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "plugins" / "gateway" / "tests"))

import openai
from gateway_helpers import ADD, ask, client, trace_fields
from rllm_gateway import Gateway, trajectories_from_traces
from rllm_tinker.engine import TinkerRolloutEngine
from rllm_tinker.testing import TOOLS_BASE_MODEL, LocalTinker
from tinker_cookbook import renderers
from tinker_helpers import Scripted

from rllm_core.config import load_config
from rllm_core.rows import build_rows
from rllm_core.trainer import UnifiedTrainer
from rllm_core.types import TrajectoryGroup

# text before the call: the cookbook renderer would write this reply back with another newline
CALL = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    service = LocalTinker(tmp_path_factory.mktemp("tinker-gateway"), context_window=2048)
    yield service.tokenizer(TOOLS_BASE_MODEL)
    service.close()


def _stopped(tokenizer, text: str) -> tuple[list[int], str]:
    return [*tokenizer.encode(text, add_special_tokens=False), tokenizer.convert_tokens_to_ids("<|im_end|>")], "stop"


def test_tinker_engine_through_the_gateway_is_token_exact_streamed_or_not(tokenizer):
    engine = TinkerRolloutEngine(context_window=2048)
    engine.attach(renderers.get_renderer("qwen3_instruct", tokenizer), tokenizer, "qwen3_instruct")
    engine.set_sampling_client(Scripted(*[_stopped(tokenizer, t) for t in (CALL, "7", CALL, "7")]), 0)

    async def conversation(gw: Gateway, sid: str, stream: bool):
        url, key = gw.open(sid)
        c = client(url, key)
        messages: list[dict] = [{"role": "user", "content": "3 + 4?"}]
        first = await ask(c, messages, stream, tools=[ADD])
        messages.append(first["message"])
        call = first["message"]["tool_calls"][0]
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": "7"})
        second = await ask(c, messages, stream, tools=[ADD])
        return first, second, gw.consume(sid)

    async def main():
        gw = Gateway(engine).start()
        try:
            return await conversation(gw, "plain", False), await conversation(gw, "stream", True)
        finally:
            gw.stop()

    plain, streamed = asyncio.run(main())
    first, second, record = plain
    assert first["finish_reason"] == "tool_calls"
    assert first["message"]["content"] == "Let me add.\n"
    assert json.loads(first["message"]["tool_calls"][0]["function"]["arguments"]) == {"a": 3, "b": 4}
    assert second["message"]["content"] == "7"
    assert (streamed[0], streamed[1]) == (first, second)
    assert trace_fields(streamed[2]) == trace_fields(record)
    one, two = record.traces
    sampled = [*one.prompt_ids, *one.completion_ids]
    assert two.prompt_ids[: len(sampled)] == sampled  # continued, though a re-render would drift
    assert engine.pop_counters()["engine/multiturn/continued"] == 2.0
    trajectories = trajectories_from_traces(record.traces)
    rows = build_rows([TrajectoryGroup(task_id="t", role="agent", trajectories=trajectories)])
    assert len(rows) == 1 and rows.metrics["rows/breaks"] == 0
    assert rows.tokens[0] == [*two.prompt_ids, *two.completion_ids]


async def two_turn_agent(task, base_url, api_key):
    """An agent that knows nothing of rLLM: asks, asks again, then scores itself (any reply of odd
    length is "right", so a group's rewards differ and GRPO has something to push on)."""
    import httpx

    c = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    messages = [{"role": "user", "content": task["question"]}]
    r = await c.chat.completions.create(model="rllm", messages=messages, max_tokens=6)
    messages += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "sure?"}]
    r = await c.chat.completions.create(model="rllm", messages=messages, max_tokens=6)
    reward = float(len(r.choices[0].message.content or "") % 2)
    async with httpx.AsyncClient() as h:
        await h.post(
            base_url.removesuffix("/v1") + "/reward",
            json={"reward": reward},
            headers={"Authorization": f"Bearer {api_key}"},
        )
    return r.choices[0].message.content


def test_an_openai_agent_trains_on_the_tinker_backend_through_the_gateway(tmp_path, monkeypatch):
    monkeypatch.setenv("RLLM_TINKER_LOCAL_ROOT", str(tmp_path / "service"))
    config = load_config(
        {
            "backend": "tinker",
            "workflow": {"name": "blackbox", "args": {"agent": f"{__name__}:two_turn_agent", "timeout": 60}},
            "data": {"train": [{"id": str(i), "question": f"{i} + 1?"} for i in range(4)], "train_batch_size": 2},
            "rollout": {"n": 4, "train_sampling": {"temperature": 1.0}},
            "algorithm": {"adv_estimator": "grpo", "loss": {"name": "ppo"}, "optim": {"lr": 1e-3}},
            "trainer": {"total_steps": 2, "run_dir": str(tmp_path / "run"), "val_every": 0, "val_at_end": False},
            "tinker": {
                "base_model": TOOLS_BASE_MODEL,
                "renderer_name": "qwen3_instruct",
                "service_factory": "rllm_tinker.testing:local_service_client",
                "rest_factory": "rllm_tinker.testing:local_rest_client",
                "context_window": 512,
            },
            "loggers": {"jsonl": {}},
        }
    )
    UnifiedTrainer(config).fit()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "train/reward/mean" in m]
    assert len(steps) == 2
    for m in steps:
        assert m["train/episodes/count"] == 8 and m.get("train/episodes/termination/error", 0) == 0
        assert m["gateway/requests"] == 16  # two calls per episode, all through the gateway
        assert m["engine/multiturn/continued"] == 8  # every second call continued the sampled tokens
        assert m["rows/breaks"] == 0 and m["rows/per_trajectory"] == 1.0  # one row per conversation
        # the trainer's logprobs of the rows' action tokens are the sampler's: the rows are what was sampled
        assert m["tinker/logprob_gap_mean"] < 1e-4
    assert [m["trainer/weight_version"] for m in steps] == [1, 2]
    assert sum(m["tinker/optim_steps"] for m in steps) >= 1  # the sampler's tokens were trained on
