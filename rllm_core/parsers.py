"""Tool-call and reasoning parsers: how a completion's text becomes content, reasoning and tool calls.

Parsers are plugins. A tool parser is registered with ``register_tool_parsers`` and chosen by
``rollout.tool_parser``; a reasoning parser with ``register_reasoning_parsers`` and
``rollout.reasoning_parser``. Each is registered as a class (any zero-argument factory); the engine
builds it once and calls ``parse(text) -> ParsedCompletion`` on every completion::

    reasoning, rest             = reasoning_parser.parse(text)     (when one is configured)
    content, tool_calls, errors = tool_parser.parse(rest)          (when one is configured)

Tool calls are OpenAI's ``{"id": "call_<n>", "type": "function", "function": {"name": str,
"arguments": json-string}}``, numbered from 0 within one completion (a parser may set its own ids).
A call that cannot be read (bad JSON, an unterminated block, no name) is never dropped: its raw
text stays in ``content``, ``errors`` says what is wrong with it, the valid calls beside it are
kept, and a completion that stopped by itself (``finish_reason == "stop"``) gets
``finish_reason = "malformed_tool_call"``. One cut by the token budget keeps ``length``, because
overlong masking keys on it; its errors are still listed. A completion with valid calls and no
error gets ``finish_reason = "tool_calls"``, as OpenAI's API reports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from rllm_core.types import ModelOutput

__all__ = [
    "MALFORMED_TOOL_CALL",
    "TOOL_CALLS",
    "ParsedCompletion",
    "Parser",
    "build_parser",
    "parse_completion",
    "parse_output",
    "tool_call",
]

MALFORMED_TOOL_CALL = "malformed_tool_call"
"""``finish_reason`` of a completion that stopped by itself with a tool call that could not be parsed."""
TOOL_CALLS = "tool_calls"
"""``finish_reason`` of a completion that stopped by itself with parsed tool calls and no malformed one."""


@dataclass
class ParsedCompletion:
    """What a parser read from a completion's text."""

    content: str
    """The text without reasoning and tool-call markup (a malformed call's raw text stays in it)."""
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """OpenAI-format tool calls, in the order the model wrote them."""
    errors: list[str] = field(default_factory=list)
    """One line per malformed tool call: which one and what is wrong with it."""


class Parser(Protocol):
    """What a registered parser class builds."""

    def parse(self, text: str) -> ParsedCompletion: ...


def tool_call(index: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-format tool call; ``arguments`` is serialised to a JSON string."""
    return {
        "id": f"call_{index}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def parse_completion(
    text: str, tool_parser: Parser | None = None, reasoning_parser: Parser | None = None
) -> ParsedCompletion:
    """Reasoning first (tool calls inside the reasoning are not calls), then tool calls."""
    reasoning = None
    rest = text
    if reasoning_parser is not None:
        parsed = reasoning_parser.parse(text)
        reasoning, rest = parsed.reasoning, parsed.content
    if tool_parser is None:
        return ParsedCompletion(content=rest.strip() if reasoning_parser is not None else rest, reasoning=reasoning)
    parsed = tool_parser.parse(rest)
    for i, call in enumerate(parsed.tool_calls):
        call.setdefault("id", f"call_{i}")
        call.setdefault("type", "function")
    return ParsedCompletion(
        content=parsed.content, reasoning=reasoning, tool_calls=parsed.tool_calls, errors=list(parsed.errors)
    )


def parse_output(out: ModelOutput, tool_parser: Parser | None, reasoning_parser: Parser | None) -> ModelOutput:
    """Fill ``content``, ``reasoning``, ``tool_calls``, ``tool_call_errors`` and the finish reason from ``out.text``."""
    if tool_parser is None and reasoning_parser is None:
        return out
    parsed = parse_completion(out.text, tool_parser, reasoning_parser)
    out.content = parsed.content
    out.reasoning = parsed.reasoning
    out.tool_calls = parsed.tool_calls
    out.tool_call_errors = parsed.errors
    if out.finish_reason == "stop":
        if parsed.errors:
            out.finish_reason = MALFORMED_TOOL_CALL
        elif parsed.tool_calls:
            out.finish_reason = TOOL_CALLS
    return out


_FIELDS = {"tool_parser": "rollout.tool_parser", "reasoning_parser": "rollout.reasoning_parser"}


def build_parser(kind: str, name: str | None, registry: Any = None) -> Parser | None:
    """The parser registered as ``name`` (kind ``tool_parser`` or ``reasoning_parser``), built; None for None.

    Raises ``UnknownPluginError`` for a name nobody registered and ``ConfigError`` (naming the config
    field) for a registration that does not build a parser.
    """
    if name is None:
        return None
    from rllm_core.config import ConfigError
    from rllm_core.plugins import get_registry

    where = _FIELDS.get(kind, kind)
    obj = (registry or get_registry()).resolve(kind, name)
    try:
        parser = obj()
    except Exception as exc:
        raise ConfigError(f"{where}: building {kind} {name!r} failed: {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(parser, "parse", None)):
        raise ConfigError(
            f"{where}: {kind} {name!r} built a {type(parser).__name__}, which has no parse(text) method; "
            "register a class whose instances have parse(text) -> ParsedCompletion"
        )
    return parser
