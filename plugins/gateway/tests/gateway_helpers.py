"""Test support for the gateway tests: a deterministic tools-capable engine and client helpers."""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any

import openai

from rllm_core.engine import RolloutEngine
from rllm_core.parsers import build_parser
from rllm_core.testing import ADD_TOOL
from rllm_core.types import ModelOutput


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


class ScriptedEngine(RolloutEngine):
    """Answers from the last message, in Hermes format when it calls tools.

    ``tools:N`` -> N parallel ``add`` calls; a tool result -> ``the answer is <sum of results>``;
    ``boom`` -> the engine raises; anything else -> ``echo: <text>``. Prompt ids encode every message,
    so a trace names its session's messages. ``gate``, when set, holds each call until it is set.
    """

    supports_tools = True

    def __init__(self) -> None:
        super().__init__(tool_parser=build_parser("tool_parser", "hermes"))
        self.gate: asyncio.Event | None = None
        self.started: asyncio.Event | None = None
        self.calls = 0
        self.cancelled = 0
        """Calls cancelled while held at the gate."""

    async def _generate(self, messages: list[dict[str, Any]], tools: Any = None, **sampling: Any) -> ModelOutput:
        self.calls += 1
        if self.started is not None:
            self.started.set()
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        last = messages[-1]
        content = str(last.get("content") or "")
        if content == "boom":
            raise RuntimeError("the engine broke")
        if last.get("role") == "tool":
            results = []
            for m in reversed(messages):
                if m.get("role") != "tool":
                    break
                results.append(int(m["content"]))
            text = f"the answer is {sum(results)}"
        elif content.startswith("tools:") and tools:
            text = "let me add." + "".join(
                f'<tool_call>{{"name": "add", "arguments": {{"a": {i}, "b": 1}}}}</tool_call>'
                for i in range(int(content.split(":")[1]))
            )
        else:
            text = f"echo: {content}"
        rendered = json.dumps([[m.get("role"), m.get("content"), m.get("tool_calls")] for m in messages], default=str)
        prompt = [zlib.crc32(rendered.encode()) % 1000, *_ids(content)]
        completion = _ids(text)
        stop = int(sampling.get("max_tokens") or 10_000)
        finish = "length" if len(completion) > stop else "stop"
        completion = completion[:stop]
        return self.parse(
            ModelOutput(
                text=text,
                content=text,
                prompt_ids=prompt,
                completion_ids=completion,
                logprobs=[-0.01 * (i % 7) for i in range(len(completion))],
                finish_reason=finish,
            )
        )


ADD = ADD_TOOL


def client(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)


async def ask(c: openai.AsyncOpenAI, messages: list[dict], stream: bool, **kw: Any) -> dict[str, Any]:
    """The assistant message as a client would append it (a stream is merged by tool-call index)."""
    if not stream:
        r = await c.chat.completions.create(model="rllm", messages=messages, **kw)
        msg = r.choices[0].message
        out: dict[str, Any] = {"role": "assistant", "content": msg.content}
        if msg.tool_calls:
            out["tool_calls"] = [tc.model_dump() for tc in msg.tool_calls]
        return {"message": out, "finish_reason": r.choices[0].finish_reason}
    content, calls, finish = "", {}, None
    async for chunk in await c.chat.completions.create(model="rllm", messages=messages, stream=True, **kw):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                call = calls.setdefault(
                    tc.index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                )
                call["id"] = tc.id or call["id"]
                if tc.function is not None:
                    call["function"]["name"] += tc.function.name or ""
                    call["function"]["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    out = {"role": "assistant", "content": content or None}
    if calls:
        out["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"message": out, "finish_reason": finish}


async def tool_conversation(c: openai.AsyncOpenAI, stream: bool) -> list[dict]:
    """User asks; the model makes 3 parallel calls; the tools answer; the model answers."""
    messages: list[dict] = [{"role": "user", "content": "tools:3"}]
    first = await ask(c, messages, stream, tools=[ADD])
    assert first["finish_reason"] == "tool_calls"
    messages.append(first["message"])
    for call in first["message"]["tool_calls"]:
        args = json.loads(call["function"]["arguments"])
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": str(args["a"] + args["b"])})
    second = await ask(c, messages, stream, tools=[ADD])
    messages.append(second["message"])
    return messages


def trace_fields(record) -> list[tuple]:
    return [
        (t.prompt_ids, t.completion_ids, t.logprobs, t.finish_reason, t.response, t.engine_messages, t.parent)
        for t in record.traces
    ]
