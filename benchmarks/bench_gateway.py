"""Per-call latency the gateway adds, at 256 concurrent sessions, against a direct engine call.

Both phases run the same agents: ``--sessions`` concurrent sessions, each making ``--calls`` chat
calls in conversations of ``--turns`` turns (each turn extends the last: the lineage path), with a
think time drawn from [0, ``--think``] s between calls and a random start, so calls spread out as
real agents' do. The engine is the core's simulated engine (a real ``RolloutEngine``) with a fixed
``--gen-latency`` per call, so a call's latency minus that constant is what the way to the engine
costs:

- direct: the agents call ``engine.get_model_response`` in this process (a native workflow);
- gateway: the engine and the gateway run in this process as in training (the engine on this
  process's event loop, the server on its own thread), the agents in a child process (as a
  black-box agent's command does) with the official ``openai`` client, one per session, against
  the real server on 127.0.0.1. ``--client httpx``: a bare ``httpx.AsyncClient`` posting JSON;
  ``--client raw``: a minimal keep-alive HTTP/1.1 client on asyncio streams (the server's cost with
  almost no client cost).

Prints median and p99 of (latency - gen_latency) for both and their differences (what the gateway
adds), the call rate, CPU per call of each process, and the gateway's own counters (time spent in
the app, engine aside). The garbage collector is frozen after set-up, as the trainer does at the
start of ``fit``. Never asserts on time.

    .venv/bin/python benchmarks/bench_gateway.py [--sessions 256] [--gen-latency 1.0] [--client openai]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

HERE = os.path.abspath(__file__)
Call = Callable[[list[dict[str, str]]], Awaitable[str]]


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[round(0.99 * (len(ordered) - 1))]


# -- the agents ---------------------------------------------------------------------------------


async def _agent(call: Call, session: int, args: argparse.Namespace, rng: random.Random) -> list[float]:
    """One session's calls (content unique to the session); returns each call's latency."""
    latencies = []
    messages: list[dict[str, str]] = []
    await asyncio.sleep(rng.uniform(0, args.gen_latency + args.think))
    for i in range(args.calls):
        if i % args.turns == 0:
            messages = []
        messages.append({"role": "user", "content": f"session {session} call {i}: What is {session}+{i}?"})
        start = time.perf_counter()
        reply = await call(messages)
        latencies.append(time.perf_counter() - start)
        messages.append({"role": "assistant", "content": reply})
        await asyncio.sleep(rng.uniform(0, args.think))
    return latencies


async def _run_agents(calls: list[Call], warmup: Call, args: argparse.Namespace) -> tuple[list[float], float]:
    for _ in range(2):  # first-call costs (lazy imports, the first connection) are not the gateway's
        await warmup([{"role": "user", "content": "What is 1+1?"}])
    rng = random.Random(args.seed)
    start = time.perf_counter()
    results = await asyncio.gather(
        *(_agent(call, i, args, random.Random(rng.random())) for i, call in enumerate(calls))
    )
    return [x for r in results for x in r], time.perf_counter() - start


def _openai_call(url: str, key: str, tls: Any) -> Call:
    import httpx
    import openai

    # One client (and connection) per agent; one TLS context for all (each would load the CA store: ~30 ms).
    http = httpx.AsyncClient(verify=tls, timeout=60)
    client = openai.AsyncOpenAI(base_url=url, api_key=key, http_client=http, max_retries=0)

    async def call(messages: list[dict[str, str]]) -> str:
        r = await client.chat.completions.create(model="rllm", messages=messages, max_tokens=32)
        return r.choices[0].message.content

    return call


def _httpx_call(url: str, key: str, tls: Any) -> Call:
    import httpx

    client = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, verify=tls, timeout=60)

    async def call(messages: list[dict[str, str]]) -> str:
        r = await client.post("/chat/completions", json={"model": "rllm", "messages": messages, "max_tokens": 32})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    return call


def _raw_call(url: str, key: str, tls: Any) -> Call:
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    head = (
        f"POST {parts.path}/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
    )
    conn: list[Any] = []

    async def call(messages: list[dict[str, str]]) -> str:
        if not conn:
            conn.extend(await asyncio.open_connection(parts.hostname, parts.port))
        reader, writer = conn
        body = json.dumps({"model": "rllm", "messages": messages, "max_tokens": 32}).encode()
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status, *headers = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        if " 200 " not in status:
            raise RuntimeError(status)
        length = next(int(h.split(":")[1]) for h in headers if h.lower().startswith("content-length:"))
        return json.loads(await reader.readexactly(length))["choices"][0]["message"]["content"]

    return call


def _client_worker() -> None:
    """The gateway phase's child process: the agents over HTTP; prints their latencies as JSON."""
    import ssl

    spec = json.load(sys.stdin)
    args = argparse.Namespace(**spec["args"])
    make = {"openai": _openai_call, "httpx": _httpx_call, "raw": _raw_call}[args.client]
    tls = ssl.create_default_context()

    async def main() -> tuple[list[float], float]:
        calls = [make(url, key, tls) for url, key in spec["sessions"]]
        return await _run_agents(calls, make(*spec["warmup"], tls), args)

    cpu0 = time.process_time()
    latencies, wall = asyncio.run(main())
    json.dump({"latencies": latencies, "wall": wall, "client_cpu": time.process_time() - cpu0}, sys.stdout)


# -- the phases ---------------------------------------------------------------------------------


def _engine(args: argparse.Namespace, run_dir: str) -> Any:
    from rllm_core.testing import SimulatedBackend, simulated_config

    config = simulated_config(run_dir, simulated={"gen_latency": args.gen_latency, "response_tokens": 32})
    return SimulatedBackend(config).init_rollout_engine()


async def _direct(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    async def call(messages: list[dict[str, str]]) -> str:
        return (await engine.get_model_response(messages, max_tokens=32)).content

    cpu0 = time.process_time()
    latencies, wall = await _run_agents([call] * args.sessions, call, args)
    return {"latencies": latencies, "wall": wall, "cpu": time.process_time() - cpu0, "client_cpu": 0.0}


async def _through_gateway(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    from rllm_gateway import Gateway

    settings: dict[str, Any] = {} if args.gc_threshold is None else {"gc_threshold": tuple(args.gc_threshold) or None}
    gateway = Gateway(engine, max_sessions=args.sessions + 1, **settings).start()
    print(f"gateway's gc thresholds while it serves: {gc.get_threshold()}")
    try:
        sessions = [gateway.open(f"bench-{i}") for i in range(args.sessions)]
        spec = {"args": vars(args), "sessions": sessions, "warmup": gateway.open("warmup")}
        cpu0 = time.process_time()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, HERE, "--client-worker", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate(json.dumps(spec).encode())
        if proc.returncode != 0:
            raise RuntimeError(f"the client process failed (exit {proc.returncode})")
        result = json.loads(out)
        result["cpu"] = time.process_time() - cpu0
        result["traces"] = sum(len(gateway.consume(f"bench-{i}").traces) for i in range(args.sessions))
        result["counters"] = gateway.pop_counters()
    finally:
        gateway.stop()
    return result


def _report(name: str, result: dict[str, Any], args: argparse.Namespace) -> tuple[float, float]:
    extra = [x - args.gen_latency for x in result["latencies"]]
    med, p99 = _percentiles(extra)
    n = len(extra)
    print(
        f"{name:8s} {n} calls in {result['wall']:.1f} s ({n / result['wall']:.0f} calls/s): latency - gen_latency "
        f"median {med * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, max {max(extra) * 1e3:.1f} ms; CPU per call: "
        f"this process {result['cpu'] / n * 1e3:.2f} ms, agents' process {result['client_cpu'] / n * 1e3:.2f} ms"
    )
    return med, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--calls", type=int, default=12, help="calls per session")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation")
    parser.add_argument("--gen-latency", type=float, default=1.0, help="seconds per engine call")
    parser.add_argument("--think", type=float, default=0.2, help="most seconds between a reply and the next call")
    parser.add_argument("--client", choices=["openai", "httpx", "raw"], default="openai")
    parser.add_argument("--phases", default="direct,gateway", help="comma-separated: direct, gateway")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gc-threshold",
        type=int,
        nargs="*",
        default=None,
        metavar="N",
        help="the gateway's gc_threshold (3 ints; none given: Python's own, left alone; default: the gateway's)",
    )
    parser.add_argument("--client-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_worker:
        _client_worker()
        return
    del args.client_worker
    import uvicorn.protocols.http.auto as http_auto

    print(f"load average (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(
        f"{args.sessions} sessions x {args.calls} calls ({args.turns} turns per conversation), engine "
        f"{args.gen_latency * 1e3:.0f} ms per call, think 0-{args.think * 1e3:.0f} ms, client {args.client}, "
        f"server HTTP {http_auto.AutoHTTPProtocol.__name__}"
    )

    async def run() -> dict[str, dict[str, Any]]:
        results = {}
        with tempfile.TemporaryDirectory() as run_dir:
            engine = _engine(args, run_dir)
            gc.freeze()  # as the trainer does at the start of fit: set-up objects are not rescanned
            try:
                for phase in args.phases.split(","):
                    results[phase] = await (_direct if phase == "direct" else _through_gateway)(engine, args)
            finally:
                gc.unfreeze()
        return results

    results = asyncio.run(run())
    figures = {name: _report(name, result, args) for name, result in results.items()}
    if "gateway" in results:
        g, c = results["gateway"], results["gateway"]["counters"]
        in_app = (c["gateway/latency_s"] - c["gateway/engine_s"]) / c["gateway/requests"]
        print(
            f"gateway: {g['traces']} traces recorded, {c['gateway/requests']:.0f} requests, "
            f"{c.get('gateway/errors', 0):.0f} errors; in the app, engine aside: mean {in_app * 1e3:.2f} ms, "
            f"max {c['gateway/overhead_s_max'] * 1e3:.1f} ms (HTTP parsing and writing not included)"
        )
    if len(figures) == 2:
        (dm, dp), (gm, gp) = figures["direct"], figures["gateway"]
        print(f"gateway adds: median {(gm - dm) * 1e3:.2f} ms (target < 2 ms), p99 {(gp - dp) * 1e3:.2f} ms (< 10 ms)")


if __name__ == "__main__":
    main()
