"""A calculator agent written against the OpenAI API, with nothing of rLLM in it.

It is the kind of script an agent author writes: the official ``openai`` client, configured from the
environment (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``) as every OpenAI agent is, two tools (the
calculator's ``add`` and ``subtract`` keys) and the usual loop: ask, run the tool calls the model
makes, send their results, stop at the first reply without a call (at most ``MAX_TURNS`` model
calls). Run as a program it reads the task (JSON with a ``question``) from stdin and prints the
conversation as one JSON line::

    echo '{"question": "7 - 3 ="}' | OPENAI_BASE_URL=... OPENAI_API_KEY=... python -m rllm_example_calculator.agent

rLLM trains it unmodified through the gateway (rllm-gateway's ``blackbox`` workflow), either as that
program (``workflow.args.command``) or in-process as the coroutine :func:`solve`
(``workflow.args.agent``; the gateway then passes the session's URL and key instead of the
environment). The native workflow (:mod:`rllm_example_calculator.workflow`) runs the same loop on the
engine and imports its tools from here, so both sides press the same keys.
"""

from __future__ import annotations

import asyncio
import json
import operator
import os
import re
import sys
import weakref
from collections.abc import Mapping
from typing import Any

from openai import AsyncOpenAI

__all__ = ["MAX_TURNS", "TOOLS", "run_tool", "solve"]


def _key(name: str, does: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The first number of the user's question {does} the second.",
            "parameters": {"type": "object", "properties": {}},
        },
    }


TOOLS: list[dict[str, Any]] = [_key("add", "plus"), _key("subtract", "minus")]
"""The calculator's two keys, in OpenAI's format. They read the question's numbers themselves, as a
coding agent's ``run_tests`` reads its repository: the model chooses the key and relays the result."""

MAX_TURNS = 2
"""Model calls per task: one to press a key, one to answer."""

_KEYS = {"add": operator.add, "subtract": operator.sub}


def run_tool(name: str, question: str) -> str:
    """The result of pressing key ``name`` for ``question`` (``"7 - 3 ="``), as text; ``error`` for a
    key that does not exist or a question without two numbers."""
    numbers = re.findall(r"\d+", question)
    if name not in _KEYS or len(numbers) != 2:
        return "error"
    return str(_KEYS[name](int(numbers[0]), int(numbers[1])))


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncOpenAI] = weakref.WeakKeyDictionary()


def _client(base_url: str | None, api_key: str | None) -> AsyncOpenAI:
    """A client for this base URL and key on one shared connection pool per event loop. OpenAI's advice
    (make one client, reuse it) matters here: a new client costs 10-20 ms (an SSL context), more than
    a whole episode of this task, and the in-process agent runs hundreds of episodes a step."""
    loop = asyncio.get_running_loop()
    shared = _clients.get(loop)
    if shared is None:
        shared = _clients[loop] = AsyncOpenAI(base_url=base_url, api_key=api_key)
    return shared.with_options(base_url=base_url, api_key=api_key)


async def solve(task: Mapping[str, Any], base_url: str | None = None, api_key: str | None = None) -> list[dict]:
    """Answer ``task["question"]`` with the calculator's help; returns the conversation (OpenAI messages).

    ``base_url`` / ``api_key``: None reads ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``, as the client does.
    """
    client = _client(base_url, api_key)
    model = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
    messages: list[dict[str, Any]] = [{"role": "user", "content": task["question"]}]
    for _ in range(MAX_TURNS):
        response = await client.chat.completions.create(model=model, messages=messages, tools=TOOLS)
        message = response.choices[0].message
        reply: dict[str, Any] = {"role": "assistant", "content": message.content or ""}
        if message.tool_calls:
            reply["tool_calls"] = [call.model_dump(exclude_none=True) for call in message.tool_calls]
        messages.append(reply)
        if not message.tool_calls:
            break
        for call in message.tool_calls:
            result = run_tool(call.function.name, task["question"])
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return messages


async def _main(task: Mapping[str, Any]) -> list[dict]:
    try:
        return await solve(task)
    finally:
        await _client(None, None).close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_main(json.load(sys.stdin)))))
