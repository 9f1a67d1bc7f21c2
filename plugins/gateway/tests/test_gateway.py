"""The gateway with the real ``openai`` client against the real server on 127.0.0.1."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from gateway_helpers import ADD, ScriptedEngine, ask, client, tool_conversation, trace_fields
from rllm_gateway import trajectories_from_traces


def test_streaming_and_non_streaming_record_identical_traces(gateway):
    async def main():
        recorded, conversations = [], []
        for i, stream in enumerate([False, True]):
            url, key = gateway.open(f"s{i}")
            conversations.append(await tool_conversation(client(url, key), stream))
            recorded.append(gateway.consume(f"s{i}"))
        return recorded, conversations

    (plain, streamed), (conv_plain, conv_streamed) = asyncio.run(main())
    assert conv_plain == conv_streamed
    assert [c["function"]["name"] for c in conv_plain[1]["tool_calls"]] == ["add"] * 3
    assert conv_plain[-1]["content"] == "the answer is 6"
    assert trace_fields(plain) == trace_fields(streamed)
    assert len(plain.traces) == 2 and plain.traces[1].parent == 0


def test_client_echo_of_a_reply_is_replaced_by_the_recorded_reply(gateway):
    """The client reformats the reply (null content, new ids, respaced arguments); the engine sees the original."""

    async def main():
        url, key = gateway.open("echo")
        c = client(url, key)
        first = await ask(c, [{"role": "user", "content": "tools:1"}], False, tools=[ADD])
        reply = first["message"]
        reply["tool_calls"][0]["id"] = "call_xyz"
        reply["tool_calls"][0]["function"]["arguments"] = '{"a":0,   "b":1}'
        msgs = [
            {"role": "user", "content": "tools:1"},
            reply,
            {"role": "tool", "tool_call_id": "call_xyz", "content": "1"},
        ]
        await ask(c, msgs, False, tools=[ADD])
        return gateway.consume("echo")

    record = asyncio.run(main())
    first, second = record.traces
    assert second.parent == 0
    assert second.engine_messages[:2] == [*first.engine_messages, first.response]
    (traj,) = trajectories_from_traces(record.traces)
    assert [s.prompt_ids for s in traj.steps] == [first.prompt_ids, second.prompt_ids]


def test_lineage_not_position_builds_trajectories(gateway):
    """Two interleaved conversations in one session become two trajectories of two steps each."""

    async def main():
        url, key = gateway.open("lin")
        c = client(url, key)
        a = [{"role": "user", "content": "alpha"}]
        b = [{"role": "system", "content": "subagent"}, {"role": "user", "content": "beta"}]
        ra = await ask(c, a, False)
        rb = await ask(c, b, False)
        a += [ra["message"], {"role": "user", "content": "alpha again"}]
        b += [rb["message"], {"role": "user", "content": "beta again"}]
        await ask(c, b, False)
        await ask(c, a, False)
        return gateway.consume("lin")

    record = asyncio.run(main())
    trajs = trajectories_from_traces(record.traces)
    assert [t.info["gateway_traces"] for t in trajs] == [[0, 3], [1, 2]]
    assert [s.model_response for s in trajs[0].steps] == ["echo: alpha", "echo: alpha again"]


def test_duplicate_resend_records_no_new_turn(gateway):
    async def main():
        url, key = gateway.open("dup")
        c = client(url, key)
        msgs = [{"role": "user", "content": "hello"}]
        r1 = await c.chat.completions.create(model="rllm", messages=msgs)
        r2 = await c.chat.completions.create(model="rllm", messages=msgs)
        # two identical requests at once: the second joins the first
        r3, r4 = await asyncio.gather(
            c.chat.completions.create(model="rllm", messages=[{"role": "user", "content": "x"}]),
            c.chat.completions.create(model="rllm", messages=[{"role": "user", "content": "x"}]),
        )
        return r1, r2, r3, r4, gateway.consume("dup")

    r1, r2, r3, r4, record = asyncio.run(main())
    assert r1.id == r2.id and r1.choices[0].message.content == r2.choices[0].message.content
    assert r3.id == r4.id
    assert len(record.traces) == 2


def test_weight_update_during_a_call_stamps_the_dispatch_version():
    from rllm_gateway import Gateway

    engine = ScriptedEngine()
    gw = Gateway(engine).start()

    async def main():
        engine.gate, engine.started = asyncio.Event(), asyncio.Event()
        engine.set_weight_version(3)
        url, key = gw.open("wv")
        call = asyncio.ensure_future(
            client(url, key).chat.completions.create(model="rllm", messages=[{"role": "user", "content": "q"}])
        )
        await engine.started.wait()
        engine.set_weight_version(4)  # the update lands while the call is in flight
        engine.gate.set()
        await call
        return gw.consume("wv")

    try:
        record = asyncio.run(main())
    finally:
        gw.stop()
    assert record.traces[0].weight_version == 3
    (traj,) = trajectories_from_traces(record.traces)
    assert traj.steps[0].weight_version == 3


def test_bad_or_missing_key_is_refused(gateway):
    async def main():
        url, key = gateway.open("auth")
        _, key2 = gateway.open("auth2")
        msgs = [{"role": "user", "content": "hi"}]
        for bad in ["wrong", key2]:
            with pytest.raises(openai.AuthenticationError):
                await client(url, bad).chat.completions.create(model="rllm", messages=msgs)
        async with httpx.AsyncClient() as h:
            r = await h.post(f"{url}/chat/completions", json={"messages": msgs})
            models = await h.get(f"{url}/models")
            good = await h.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"})
        gateway.consume("auth2")
        return r.status_code, models.status_code, good.json(), gateway.consume("auth")

    missing, models, good, record = asyncio.run(main())
    assert missing == 401 and models == 401
    assert good["data"][0]["id"] == "rllm"
    assert record.traces == []


def test_n_greater_than_one_is_refused_and_not_recorded(gateway):
    async def main():
        url, key = gateway.open("n2")
        with pytest.raises(openai.BadRequestError, match="n=2"):
            await client(url, key).chat.completions.create(
                model="rllm", messages=[{"role": "user", "content": "hi"}], n=2
            )
        return gateway.consume("n2")

    assert asyncio.run(main()).traces == []


def test_reward_posted_by_the_agent_is_kept(gateway):
    async def main():
        url, key = gateway.open("rw")
        async with httpx.AsyncClient() as h:
            bad = await h.post(url.removesuffix("/v1") + "/reward", json={"reward": 1.5})
            ok = await h.post(
                url.removesuffix("/v1") + "/reward", json={"reward": 1.5}, headers={"Authorization": f"Bearer {key}"}
            )
        return bad.status_code, ok.status_code, gateway.consume("rw")

    bad, ok, record = asyncio.run(main())
    assert (bad, ok, record.reward) == (401, 200, 1.5)


def test_200_concurrent_sessions_never_mix_traces(gateway):
    n = 200

    async def agent(i: int) -> None:
        url, key = gateway.open(f"c{i}")
        c = client(url, key)
        msgs = [{"role": "user", "content": f"session {i}"}]
        r = await ask(c, msgs, stream=i % 2 == 1)
        msgs += [r["message"], {"role": "user", "content": f"session {i} turn 2"}]
        await ask(c, msgs, stream=i % 2 == 0)

    async def main():
        await asyncio.gather(*(agent(i) for i in range(n)))
        return [gateway.consume(f"c{i}") for i in range(n)]

    records = asyncio.run(main())
    for i, record in enumerate(records):
        assert len(record.traces) == 2
        for trace in record.traces:
            users = [m["content"] for m in trace.messages if m["role"] == "user"]
            assert all(u.startswith(f"session {i}") and u.split()[1] == str(i) for u in users)
            assert trace.response["content"] == f"echo: {users[-1]}"
        assert record.traces[1].parent == 0


def test_store_is_bounded_and_counts_evictions():
    from rllm_gateway import Gateway

    gw = Gateway(ScriptedEngine(), max_sessions=3)

    async def main():
        for i in range(5):
            gw.open(f"e{i}")

    asyncio.run(main())
    assert len(gw) == 3 and gw.evicted == 2
    with pytest.raises(KeyError, match="e0"):
        gw.consume("e0")
