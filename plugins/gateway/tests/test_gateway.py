"""The gateway with the real ``openai`` client against the real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import resource
import ssl
import time

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


def test_a_client_that_leaves_a_stream_cancels_its_engine_call():
    from rllm_gateway import Gateway

    engine = ScriptedEngine()
    gw = Gateway(engine, keepalive_s=0.05).start()

    async def main():
        engine.gate, engine.started = asyncio.Event(), asyncio.Event()
        url, key = gw.open("gone")
        body = {"messages": [{"role": "user", "content": "q"}], "stream": True}
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as h:
            async with h.stream("POST", f"{url}/chat/completions", json=body) as r:
                assert r.status_code == 200
                await engine.started.wait()
            # left without reading: the connection is closed while the engine still works
        deadline = time.monotonic() + 10
        while not engine.cancelled and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return engine.cancelled, gw.consume("gone")

    try:
        cancelled, record = asyncio.run(main())
    finally:
        gw.stop()
    assert cancelled == 1
    assert record.traces == []


def test_an_engine_error_is_a_500_naming_it_counted_and_not_recorded():
    from rllm_gateway import Gateway

    gw = Gateway(ScriptedEngine()).start()

    async def main():
        url, key = gw.open("boom")
        c = client(url, key)
        with pytest.raises(openai.InternalServerError, match="RuntimeError: the engine broke"):
            await c.chat.completions.create(model="rllm", messages=[{"role": "user", "content": "boom"}])
        await c.chat.completions.create(model="rllm", messages=[{"role": "user", "content": "fine"}])
        return gw.consume("boom"), gw.pop_counters()

    try:
        record, counters = asyncio.run(main())
    finally:
        gw.stop()
    assert [t.response["content"] for t in record.traces] == ["echo: fine"]
    assert (counters["gateway/requests"], counters["gateway/errors"]) == (2, 1)


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


@pytest.mark.slow
def test_1000_concurrent_sessions_never_mix_traces():
    """1,000 sessions, all in the engine at once, two turns each (streamed or not): every reply and every
    recorded trace belongs to the session that sent it."""
    from rllm_gateway import Gateway

    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4 * n:  # a client and a server socket per session
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (4 * n if hard == resource.RLIM_INFINITY else min(4 * n, hard), hard)
        )
    engine = ScriptedEngine()
    gw = Gateway(engine, max_sessions=n).start()

    async def agent(i: int, url: str, key: str, http: httpx.AsyncClient) -> list[str]:
        async with http:
            c = openai.AsyncOpenAI(base_url=url, api_key=key, http_client=http, max_retries=0)
            msgs = [{"role": "user", "content": f"<{i}> first"}]
            first = await ask(c, msgs, stream=i % 2 == 1)
            msgs += [first["message"], {"role": "user", "content": f"<{i}> second"}]
            second = await ask(c, msgs, stream=i % 2 == 0)
        return [first["message"]["content"], second["message"]["content"]]

    async def main():
        engine.gate = asyncio.Event()
        sessions = [gw.open(f"c{i}") for i in range(n)]
        # A client (and connection) per agent, as separate agents have; one TLS context for all of them, since
        # building one per client (loading the CA store, ~30 ms) would be most of this test's time.
        tls = ssl.create_default_context()
        clients = [httpx.AsyncClient(verify=tls, timeout=120) for _ in range(n)]
        agents = [asyncio.ensure_future(agent(i, *sessions[i], clients[i])) for i in range(n)]
        deadline = time.monotonic() + 60
        while engine.calls < n and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        in_engine_at_once = engine.calls
        engine.gate.set()
        replies = await asyncio.gather(*agents)
        return in_engine_at_once, replies, [gw.consume(f"c{i}") for i in range(n)]

    try:
        in_engine_at_once, replies, records = asyncio.run(main())
    finally:
        gw.stop()
    assert in_engine_at_once == n
    for i, (reply, record) in enumerate(zip(replies, records, strict=True)):
        mine = [f"<{i}> first", f"<{i}> second"]
        assert reply == [f"echo: {m}" for m in mine]
        assert len(record.traces) == 2 and record.traces[1].parent == 0
        for k, trace in enumerate(record.traces):
            for messages in (trace.messages, trace.engine_messages):
                assert [m["content"] for m in messages if m["role"] == "user"] == mine[: k + 1]
                assert [m["content"] for m in messages if m["role"] == "assistant"] == reply[:k]
            assert trace.response["content"] == reply[k]
            assert trace.prompt_ids[1:] == [ord(ch) for ch in mine[k]]  # the engine saw this session's text
            assert trace.completion_ids == [ord(ch) for ch in reply[k]]


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


def test_admin_routes_are_off_without_an_admin_key(gateway):
    """A training run's gateway has no admin key: a session key opens nothing but its own session (and
    an unknown route or method is a 404 / 405)."""

    async def main():
        url, key = gateway.open("no-admin")
        base = url.split("/sessions/")[0]
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient() as h:
            codes = [
                (await h.post(f"{base}/sessions", json={"session_id": "x"}, headers=auth)).status_code,
                (await h.get(f"{base}/sessions/no-admin/traces", headers=auth)).status_code,
                (await h.delete(f"{base}/sessions/no-admin", headers=auth)).status_code,
                (await h.get(f"{base}/nowhere", headers=auth)).status_code,
                (await h.get(f"{url}/chat/completions", headers=auth)).status_code,
            ]
        return codes, gateway.consume("no-admin")  # still open: the DELETE did nothing

    codes, record = asyncio.run(main())
    assert codes == [404, 404, 404, 404, 405]
    assert record.traces == []


def test_the_collector_thresholds_are_the_gateways_while_it_serves_and_restored_after():
    import gc

    from rllm_gateway import Gateway

    before = gc.get_threshold()
    gateway = Gateway(ScriptedEngine(), gc_threshold=(12_345, 11, 12)).start()
    try:
        assert gc.get_threshold() == (12_345, 11, 12)
    finally:
        gateway.stop()
    assert gc.get_threshold() == before
    untouched = Gateway(ScriptedEngine(), gc_threshold=None).start()
    try:
        assert gc.get_threshold() == before
    finally:
        untouched.stop()
    assert Gateway().gc_threshold == (50_000, 20, 100)  # the default, measured in benchmarks/README.md
