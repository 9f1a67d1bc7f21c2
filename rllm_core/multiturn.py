"""Token-exact multi-turn: continue a conversation from the tokens the engine sampled.

A request whose messages are an earlier request's messages + the assistant reply the engine produced
for it + new messages (tool results, a user turn) gets the prompt::

    earlier prompt_ids + sampled completion_ids + bridge(new messages)

never a re-render of the history, so what is trained on is what was sampled and the core's rows
merge the whole trajectory into one row. The bridge is the template's own rendering of the new
messages, found as differences of three renders of the real conversation (so templates whose
rendering depends on context, e.g. tools in the system prompt, are respected)::

    head   = render(messages before the reply, add_generation_prompt=True)   # the reply's prompt
    prev   = render(messages up to the reply,  add_generation_prompt=False)
    full   = render(all messages,              add_generation_prompt=True)
    turn   = prev[len(common_prefix(head, prev)):]                           # the reply as rendered
    bridge = tail + full[len(prev):]

Renders are text (a chat template, then tokenized: rllm-torch) or token ids (a tinker-cookbook
renderer: rllm-tinker); :func:`bridge` works on either. ``tail`` is what the template writes after
the reply's end-of-turn marker (Qwen's ``"\\n"`` after ``<|im_end|>``). When the sampled completion
ended with an end-of-sequence token (it is the last of ``completion_ids``), tail is what follows that
token in ``turn``, so the marker is neither duplicated nor lost. When it did not (cut by
``max_tokens``, a stop string or another stop token), tail starts at the template's end-of-turn
marker: the bridge closes the turn (loss mask 0 there). If ``full`` does not begin with ``prev`` (a
template that rewrites earlier turns once new messages arrive, e.g. one that drops old reasoning),
the request is rendered in full instead.

Conversations are recognised by a fingerprint: a hash chained over the tools and each message
(canonical JSON), and for the reply its content (stripped), its tool calls (names and arguments;
not ids) and, when the message carries it, its reasoning. A reply is stored under the forms a
workflow appends: ``ModelOutput.assistant_message()`` with and without ``reasoning_content``, and
``{"role": "assistant", "content": text}``. Two rollouts that sampled the same text with different
tokens share a key: the later one wins, and the other's next prompt does not extend its rows (the
core counts that break as ``rows/breaks/not_prefix``).

Pure Python (no tokenizer here): engines own the rendering and pass it in.
"""

from __future__ import annotations

import array
import hashlib
import json
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Sampled", "Turn", "TurnCache", "bridge", "last_reply", "template_messages"]


def _plain(value: Any) -> Any:
    """JSON-like copy: mappings become dicts, tuples lists (chat views hand out read-only ones)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain dicts for a chat template; tool-call ``arguments`` given as a JSON string become a dict
    (templates render them with ``tojson`` or iterate them; OpenAI's format sends a string)."""
    out = []
    for message in messages:
        m = _plain(message)
        for call in m.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    args = json.loads(fn["arguments"])
                except json.JSONDecodeError:
                    continue
                if isinstance(args, dict):
                    fn["arguments"] = args
        out.append(m)
    return out


def _canonical(value: Any) -> str:
    return json.dumps(_plain(value), sort_keys=True, ensure_ascii=False, default=str)


def _reply_key(message: Mapping[str, Any]) -> str:
    """What identifies an assistant reply: content, tool calls (name and arguments), reasoning if given."""
    calls = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, Mapping) else {}
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        calls.append([fn.get("name"), args])
    reasoning = message.get("reasoning_content", message.get("reasoning"))
    key: dict[str, Any] = {"content": (message.get("content") or "").strip(), "tool_calls": calls}
    if reasoning is not None:
        key["reasoning"] = reasoning.strip()
    return "A" + _canonical(key)


def _chain(h: bytes, part: str) -> bytes:
    return hashlib.blake2b(h + part.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _history_hash(tools: Any, messages: Sequence[Mapping[str, Any]]) -> bytes:
    h = _chain(b"", "T" + _canonical(tools))
    for m in messages:
        h = _chain(h, "M" + _canonical(m))
    return h


def last_reply(messages: Sequence[Mapping[str, Any]]) -> int:
    """Index of the last assistant message (-1: none)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    return -1


@dataclass(eq=False)
class Turn:
    """A sampled turn: its prompt + completion ids, and the end-of-sequence text it ended with."""

    ids: array.array
    ended_with: str | int | None
    """The end-of-sequence token the completion ended with, as the engine's renders hold it (its text
    for text renders, its id for token renders); None: it did not end with one."""
    keys: list[bytes] = field(default_factory=list)


@dataclass
class Sampled:
    """What :meth:`TurnCache.remember` keeps of an answered request until a lookup needs its keys."""

    messages: Sequence[Mapping[str, Any]]
    tools: Any
    content: str
    text: str
    tool_calls: list[dict[str, Any]]
    reasoning: str | None
    prompt_ids: list[int]
    completion_ids: list[int]
    ended_with: str | int | None

    @classmethod
    def from_output(
        cls, messages: Sequence[Mapping[str, Any]], tools: Any, out: Any, ended_with: str | int | None
    ) -> Sampled:
        """The turn of ``out`` (a ``ModelOutput``) answering ``messages``; the messages are copied, as a
        workflow may edit its list (compaction) before a lookup reads them."""
        return cls(
            messages=[dict(m) for m in messages],
            tools=tools,
            content=out.content,
            text=out.text,
            tool_calls=out.tool_calls,
            reasoning=out.reasoning,
            prompt_ids=out.prompt_ids,
            completion_ids=out.completion_ids,
            ended_with=ended_with,
        )

    def replies(self) -> list[dict[str, Any]]:
        """The forms of the reply a workflow may append (see the module docstring)."""
        reply: dict[str, Any] = {"content": self.content, "tool_calls": self.tool_calls}
        forms = [reply, {"content": self.text}]
        if self.reasoning is not None:
            forms.append({**reply, "reasoning_content": self.reasoning})
        return forms


class TurnCache:
    """The last ``max_size`` sampled turns, by conversation fingerprint (least recently used out).

    Remembering costs an append: fingerprints are computed when a lookup first needs them, so a
    single-turn workload never pays for them. Used from one thread (the engine's text thread).
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._keys: dict[bytes, Turn] = {}
        self._lru: OrderedDict[Turn, None] = OrderedDict()
        self._pending: deque[Sampled] = deque(maxlen=max(max_size, 0))

    def __len__(self) -> int:
        self._flush()
        return len(self._lru)

    def find(self, messages: Sequence[Mapping[str, Any]], tools: Any, reply: int) -> Turn | None:
        """The turn that produced ``messages[reply]`` after ``messages[:reply]``, if remembered."""
        self._flush()
        key = _chain(_history_hash(tools, messages[:reply]), _reply_key(messages[reply]))
        turn = self._keys.get(key)
        if turn is not None:
            self._lru.move_to_end(turn)
        return turn

    def remember(self, sampled: Sampled) -> None:
        """Keep a sampled turn (the request's messages, its reply and token ids)."""
        if self.max_size > 0:
            self._pending.append(sampled)

    def _flush(self) -> None:
        while self._pending:
            s = self._pending.popleft()
            h = _history_hash(s.tools, s.messages)
            turn = Turn(array.array("i", [*s.prompt_ids, *s.completion_ids]), s.ended_with)
            for reply in s.replies():
                key = _chain(h, _reply_key(reply))
                if key in turn.keys:  # two forms that read the same
                    continue
                old = self._keys.get(key)
                if old is not None:  # the same reply sampled again: the later turn wins
                    old.keys.remove(key)
                    if not old.keys:
                        self._lru.pop(old, None)
                self._keys[key] = turn
                turn.keys.append(key)
            self._lru[turn] = None
            while len(self._lru) > self.max_size:
                oldest, _ = self._lru.popitem(last=False)
                for key in oldest.keys:
                    del self._keys[key]


def _common_prefix_len(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case: the reply's prompt is a prefix of the rendered reply
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def _rfind(seq: Sequence[Any], item: Any) -> int:
    """Last position of ``item`` in ``seq``: a substring of a text, an element of a token list; -1 if absent."""
    if isinstance(seq, str):
        return seq.rfind(item)
    for i in range(len(seq) - 1, -1, -1):
        if seq[i] == item:
            return i
    return -1


def bridge(
    render: Any, messages: Sequence[Mapping[str, Any]], reply: int, turn: Turn, eots: Sequence[str | int]
) -> Any:
    """What to append to ``turn.ids`` so that it becomes the prompt for ``messages`` (see the module
    docstring): text or token ids, as ``render`` gives; None when the template does not render the
    conversation as an extension of its history.

    ``render(messages, add_generation_prompt)`` is the template, returning a ``str`` or a token list;
    ``eots`` are the end-of-sequence tokens in the same form (the end-of-turn marker among them).
    """
    try:
        head = render(messages[:reply], True)
        prev = render(messages[: reply + 1], False)
        full = render(messages, True)
    except Exception:  # e.g. a template that cannot render a conversation without a user turn
        return None
    if full[: len(prev)] != prev:
        return None
    rendered_reply = prev[_common_prefix_len(head, prev) :]
    p = _rfind(rendered_reply, turn.ended_with) if turn.ended_with is not None else -1
    if p >= 0:
        tail = rendered_reply[p + (len(turn.ended_with) if isinstance(turn.ended_with, str) else 1) :]
    else:  # the completion did not end with the marker: the bridge closes the turn
        p = max((_rfind(rendered_reply, t) for t in eots if t != ""), default=-1)
        tail = rendered_reply[p:] if p >= 0 else rendered_reply[:0]
    return tail + full[len(prev) :]
