"""Built-in plugin ``rllm.parsers``: the tool-call parsers ``hermes``, ``llama3_json`` and ``tiny``, and
the reasoning parser ``think`` (see ``rllm_core.parsers`` for the contract).

* ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks
  anywhere in the text, any number of them (parallel calls). ``"parameters"`` is accepted for
  ``"arguments"``, and so is an arguments object given as a JSON string.
* ``llama3_json`` (Llama 3.1+ JSON tool calling): the whole content, optionally after
  ``<|python_tag|>``, is ``{"name": ..., "parameters": {...}}``; several calls may follow each other
  (separated by ``;`` or whitespace) or form a JSON array. Content that starts with ``{`` or ``[``
  is read as a call, so a JSON object that is not one is reported as malformed.
* ``tiny`` (the tiny model of ``rllm-torch``): ``<tool_call> NAME <arg> KEY VALUE <arg> KEY VALUE
  </tool_call>``, every marker a special token, so a word-level tokenizer can write it. ``VALUE`` is the
  words up to the next marker; one that reads as JSON (``3``, ``true``, ``null``) is that value, else
  the words joined by single spaces.
* ``think``: ``<think>reasoning</think>content``. A completion with ``</think>`` but no ``<think>``
  (templates that open the block in the generation prompt) is reasoning up to ``</think>``; one with
  an unclosed ``<think>`` (cut by the token budget) is reasoning to its end.

Stdlib only: these load with the core, which must import without torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from rllm_core.hookspecs import hookimpl
from rllm_core.parsers import ParsedCompletion, tool_call

__all__ = ["HermesToolParser", "Llama3JsonToolParser", "ThinkReasoningParser", "TinyToolParser"]

_Call = tuple[str, dict[str, Any]]


def _call_from_object(obj: Any) -> _Call:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object with 'name' and 'arguments', got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("no 'name' string")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            raise ValueError(f"'arguments' is a string that is not JSON: {exc}") from None
    if not isinstance(args, dict):
        raise ValueError(f"'arguments' must be a JSON object, got {type(args).__name__}")
    return name, args


def _scan_blocks(text: str, start: str, end: str, read: Callable[[str], _Call]) -> ParsedCompletion:
    """Every ``start ... end`` block of ``text`` read as one call; the rest is content."""
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    errors: list[str] = []
    pos = blocks = 0
    while True:
        i = text.find(start, pos)
        before = text[pos:] if i < 0 else text[pos:i]
        if end in before:
            errors.append(f"{end} without an opening {start}")
        content.append(before)
        if i < 0:
            break
        blocks += 1
        k = text.find(end, i + len(start))
        if k < 0:
            errors.append(f"{start} block {blocks} is not closed by {end}")
            content.append(text[i:])
            break
        try:
            name, args = read(text[i + len(start) : k])
        except ValueError as exc:
            errors.append(f"{start} block {blocks}: {exc}")
            content.append(text[i : k + len(end)])
        else:
            calls.append(tool_call(len(calls), name, args))
        pos = k + len(end)
    return ParsedCompletion(content="".join(content).strip(), tool_calls=calls, errors=errors)


class HermesToolParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes, Qwen)."""

    start = "<tool_call>"
    end = "</tool_call>"

    def parse(self, text: str) -> ParsedCompletion:
        return _scan_blocks(text, self.start, self.end, self._read)

    @staticmethod
    def _read(body: str) -> _Call:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc}") from None
        return _call_from_object(obj)


class Llama3JsonToolParser:
    """The whole content is a JSON tool call (Llama 3.1+), optionally after ``<|python_tag|>``."""

    tag = "<|python_tag|>"

    def parse(self, text: str) -> ParsedCompletion:
        stripped = text.strip()
        tagged = stripped.startswith(self.tag)
        body = stripped[len(self.tag) :].strip() if tagged else stripped
        if not tagged and not body.startswith(("{", "[")):
            return ParsedCompletion(content=stripped)
        try:
            objects = self._objects(body)
            calls = [tool_call(i, *_call_from_object(obj)) for i, obj in enumerate(objects)]
        except ValueError as exc:
            return ParsedCompletion(content=stripped, errors=[f"JSON tool call: {exc}"])
        return ParsedCompletion(content="", tool_calls=calls)

    @staticmethod
    def _objects(body: str) -> list[Any]:
        decoder = json.JSONDecoder()
        objects: list[Any] = []
        pos = 0
        while pos < len(body):
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON: {exc}") from None
            objects.extend(obj if isinstance(obj, list) else [obj])
            while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
                pos += 1
        if not objects:
            raise ValueError("no JSON object")
        return objects


class TinyToolParser:
    """``<tool_call> NAME <arg> KEY VALUE ... </tool_call>``: the tiny model's format (special tokens only)."""

    start = "<tool_call>"
    end = "</tool_call>"
    arg = "<arg>"

    def parse(self, text: str) -> ParsedCompletion:
        return _scan_blocks(text, self.start, self.end, self._read)

    def _read(self, body: str) -> _Call:
        head, *parts = body.split(self.arg)
        words = head.split()
        if len(words) != 1:
            raise ValueError(f"expected the tool name (one word) before the first {self.arg}, got {head.strip()!r}")
        args: dict[str, Any] = {}
        for part in parts:
            if not part.split():
                raise ValueError(f"an empty {self.arg} (no argument name)")
            key, *value = part.split()
            if key in args:
                raise ValueError(f"argument {key!r} is given twice")
            if not value:
                raise ValueError(f"argument {key!r} has no value")
            args[key] = _tiny_value(" ".join(value))
        return words[0], args


def _tiny_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class ThinkReasoningParser:
    """``<think>reasoning</think>content``."""

    start = "<think>"
    end = "</think>"

    def parse(self, text: str) -> ParsedCompletion:
        e = text.find(self.end)
        if e >= 0:
            head = text[:e]
            s = head.find(self.start)
            before, reasoning = (head[:s], head[s + len(self.start) :]) if s >= 0 else ("", head)
            return ParsedCompletion(content=(before + text[e + len(self.end) :]).strip(), reasoning=reasoning.strip())
        s = text.find(self.start)
        if s >= 0:
            return ParsedCompletion(content=text[:s].strip(), reasoning=text[s + len(self.start) :].strip())
        return ParsedCompletion(content=text.strip())


@hookimpl
def register_tool_parsers(register: Any) -> None:
    register("hermes", HermesToolParser)
    register("llama3_json", Llama3JsonToolParser)
    register("tiny", TinyToolParser)


@hookimpl
def register_reasoning_parsers(register: Any) -> None:
    register("think", ThinkReasoningParser)
