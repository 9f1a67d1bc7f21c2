"""The gateway in front of the real torch engine (tiny model, samples scripted token by token)."""

from __future__ import annotations

import asyncio
import pathlib
import sys

import pytest

pytest.importorskip("rllm_torch")
sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "torch" / "tests"))  # the torch tests' ScriptedModel

from agent_helpers import ScriptedModel
from gateway_helpers import ADD, ask, client, trace_fields
from rllm_gateway import Gateway, trajectories_from_traces

from rllm_core.config import load_config
from rllm_core.rows import build_rows
from rllm_core.types import TrajectoryGroup

VOCAB = [*(str(i) for i in range(19)), "+", "=", "add", "a", "b"]
TWO_CALLS = "<tool_call> add <arg> a 3 <arg> b 4 </tool_call> <tool_call> add <arg> a 1 <arg> b 1 </tool_call> <eos>"


@pytest.fixture(scope="module")
def torch_gateway():
    from rllm_torch.backend import TorchBackend

    config = load_config(
        {
            "backend": "torch",
            "torch": {"device": "cpu", "seed": 0, "num_threads": 1, "tiny": {"hidden_size": 32, "vocab": VOCAB}},
            "rollout": {"tool_parser": "tiny"},
        }
    )
    backend = TorchBackend(config)
    engine = backend.init_rollout_engine()
    scripted = ScriptedModel(backend.runtime.model)
    backend.runtime.model = scripted
    gw = Gateway(engine).start()
    yield backend, scripted, gw
    gw.stop()
    asyncio.run(backend.shutdown())


def test_torch_engine_through_the_gateway_is_token_exact_streamed_or_not(torch_gateway):
    backend, scripted, gw = torch_gateway
    tok = backend.tokenizer

    async def conversation(sid: str, stream: bool):
        url, key = gw.open(sid)
        c = client(url, key)
        messages = [{"role": "user", "content": "3 + 4 ="}]
        scripted.script = tok.convert_tokens_to_ids(TWO_CALLS.split())
        first = await ask(c, messages, stream, tools=[ADD], temperature=1.0)
        messages.append(first["message"])
        for call, result in zip(first["message"]["tool_calls"], ["7", "2"], strict=True):
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        scripted.script = tok.convert_tokens_to_ids(["9", "<eos>"])
        second = await ask(c, messages, stream, tools=[ADD])
        return first, second, gw.consume(sid)

    async def main():
        backend.rollout_engine.pop_counters()
        plain = await conversation("t-plain", False)
        streamed = await conversation("t-stream", True)
        return plain, streamed, backend.rollout_engine.pop_counters()

    plain, streamed, counters = asyncio.run(main())
    first, second, record = plain
    assert first["finish_reason"] == "tool_calls"
    assert [c["function"]["arguments"] for c in first["message"]["tool_calls"]] == [
        '{"a": 3, "b": 4}',
        '{"a": 1, "b": 1}',
    ]
    assert second["message"]["content"] == "9"
    assert (streamed[0], streamed[1]) == (first, second)
    assert trace_fields(streamed[2]) == trace_fields(record)
    # the second call continued from the sampled tokens: one row for the whole trajectory
    assert counters.get("engine/multiturn/continued") == 2
    t0, t1 = record.traces
    assert t1.prompt_ids[: len(t0.prompt_ids) + len(t0.completion_ids)] == t0.prompt_ids + t0.completion_ids
    (traj,) = trajectories_from_traces(record.traces)
    rows = build_rows([TrajectoryGroup(task_id="t", role="agent", trajectories=[traj])])
    assert len(rows) == 1 and rows.metrics["rows/breaks"] == 0
    assert rows.tokens[0] == t1.prompt_ids + t1.completion_ids
