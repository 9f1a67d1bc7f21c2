"""The data model: what workflows produce and what trainers consume.

A workflow returns an :class:`Episode`: one task, one rollout, one or more :class:`Trajectory`
(one per role, e.g. ``solver`` and ``judge``), each a list of :class:`Step` (one model call each).
The trainer groups trajectories of one role for one task into a :class:`TrajectoryGroup`, which is
what advantage estimators see.

``Step.chat_completions`` is a :class:`ChatView`: an immutable snapshot of the conversation as it
was when the step was built. Consecutive snapshots of one growing conversation share one
append-only buffer, so a 200-turn conversation costs one copy of each message, not 200 copies of
the history.
"""

from __future__ import annotations

import copy
import enum
import itertools
import weakref
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, model_validator
from pydantic_core import core_schema

__all__ = [
    "ChatView",
    "Episode",
    "ModelOutput",
    "RewardOutput",
    "Step",
    "TerminationReason",
    "TokenInput",
    "Trajectory",
    "TrajectoryGroup",
]


class TerminationReason(str, enum.Enum):
    """Why an episode ended."""

    ENV_DONE = "env_done"
    MAX_TURNS = "max_turns"
    MAX_PROMPT_LENGTH = "max_prompt_length"
    MAX_RESPONSE_LENGTH = "max_response_length"
    TIMEOUT = "timeout"
    ERROR = "error"
    UNKNOWN = "unknown"


_ATOMIC = frozenset({str, int, float, bool, type(None)})


def _freeze(value: Any) -> Any:
    """A read-only copy of a JSON-like message value (dicts become mapping proxies)."""
    if type(value) in _ATOMIC:  # the common case first: message contents are strings
        return value
    if isinstance(value, Mapping):
        return MappingProxyType({k: v if type(v) in _ATOMIC else _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _store(message: Any) -> Any:
    """How a message is kept: a plain dict copy (nested values frozen), wrapped read-only on access.

    A dict of strings is not tracked by the garbage collector, a mapping proxy is: at 100k steps
    that difference is most of the cost of building them.
    """
    if type(message) is dict or isinstance(message, Mapping):
        return {k: v if type(v) in _ATOMIC else _freeze(v) for k, v in message.items()}
    return _freeze(message)


def _view(stored: Any) -> Any:
    return MappingProxyType(stored) if type(stored) is dict else stored


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


class _Conversation:
    """Append-only storage shared by the snapshots of one conversation.

    ``originals`` holds the caller's message objects (to recognise the same conversation growing),
    ``frozen`` their read-only copies (what views hand out). Both only ever grow.
    """

    __slots__ = ("__weakref__", "frozen", "originals")

    def __init__(self) -> None:
        self.originals: list[Any] = []
        self.frozen: list[Any] = []


class ChatView(Sequence):
    """Read-only snapshot of a message list; serialises to a plain ``list[dict]``.

    Views of the same conversation share storage: building one per turn is linear in the number
    of messages, in time and memory.
    """

    __slots__ = ("_conv", "_len")

    # Latest conversation per caller list id, weakly held: storage lives exactly as long as some
    # view of it does. Lists cannot be weak-referenced, so the key is the list's id; a stale or reused
    # id is harmless because storage is only reused when the caller's messages are the very same
    # objects, in order, as the stored prefix.
    _recent: dict[int, weakref.ref[_Conversation]] = {}
    _RECENT_MAX = 8192

    def __init__(self, conv: _Conversation, length: int) -> None:
        self._conv = conv
        self._len = length

    @classmethod
    def snapshot(cls, messages: Sequence[Mapping[str, Any]] | ChatView | None) -> ChatView:
        """Snapshot ``messages``, sharing storage with an earlier snapshot of the same list."""
        if messages is None:
            return cls(_Conversation(), 0)
        if isinstance(messages, ChatView):
            return messages
        n = len(messages)
        key = id(messages)
        ref = cls._recent.get(key)
        conv = ref() if ref is not None else None
        k = 0
        if conv is not None:
            k = len(conv.originals)
            if k > n or not all(map(_is, itertools.islice(messages, k), conv.originals)):
                conv, k = None, 0
        if conv is None:
            conv = _Conversation()
            if len(cls._recent) >= cls._RECENT_MAX:
                cls._prune()
            cls._recent[key] = weakref.ref(conv)
        for message in itertools.islice(messages, k, None):
            conv.originals.append(message)
            conv.frozen.append(_store(message))
        return cls(conv, n)

    @classmethod
    def _prune(cls) -> None:
        dead = [k for k, r in cls._recent.items() if r() is None]
        for k in dead:
            del cls._recent[k]
        while len(cls._recent) >= cls._RECENT_MAX:
            cls._recent.pop(next(iter(cls._recent)))

    @classmethod
    def from_list(cls, messages: Sequence[Mapping[str, Any]]) -> ChatView:
        """A fresh, unshared snapshot."""
        conv = _Conversation()
        conv.frozen.extend(_store(m) for m in messages)
        return cls(conv, len(conv.frozen))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [_view(self._conv.frozen[i]) for i in range(*index.indices(self._len))]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("ChatView index out of range")
        return _view(self._conv.frozen[index])

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return map(_view, itertools.islice(self._conv.frozen, self._len))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChatView | list | tuple):
            return len(self) == len(other) and all(_thaw(a) == _thaw(b) for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def to_list(self) -> list[dict[str, Any]]:
        """Plain, mutable copy of the messages."""
        return [_thaw(m) for m in self]

    def __repr__(self) -> str:
        return f"ChatView({len(self)} messages)"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> Any:
        def validate(value: Any) -> ChatView:
            if isinstance(value, ChatView):
                return value
            if isinstance(value, list | tuple):
                for i, m in enumerate(value):
                    if not isinstance(m, Mapping):
                        raise ValueError(f"message {i} must be a dict, got {type(m).__name__}")
                # ``Step(chat_completions=messages)`` shares storage with the earlier snapshots of
                # the same growing list, exactly like ``Step.from_model_output``.
                return cls.snapshot(value)
            raise ValueError(f"expected a list of message dicts, got {type(value).__name__}")

        return core_schema.no_info_plain_validator_function(
            validate,
            json_schema_input_schema=core_schema.list_schema(core_schema.dict_schema()),
            serialization=core_schema.plain_serializer_function_ser_schema(lambda v: v.to_list()),
        )


def _is(a: Any, b: Any) -> bool:
    return a is b


class TokenInput(BaseModel):
    """Token-in request for engines that take token ids instead of messages."""

    prompt_ids: list[Any]
    """Prompt token ids (or opaque chunks, e.g. image segments, for backends that support them)."""


class ModelOutput(BaseModel):
    """One model response, as returned by ``RolloutEngine.get_model_response``."""

    model_config = ConfigDict(extra="allow")

    text: str = ""
    """The full decoded completion."""
    content: str = ""
    """The completion without reasoning or tool-call markup."""
    reasoning: str | None = None
    """Reasoning the reasoning parser took out of the text (``rollout.reasoning_parser``)."""
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    """OpenAI-format tool calls the tool parser read (``rollout.tool_parser``; see ``rllm_core.parsers``)."""
    tool_call_errors: list[str] = Field(default_factory=list)
    """What is wrong with each tool call that could not be read; the call's raw text stays in ``content``."""
    prompt_ids: list[Any] = Field(default_factory=list)
    completion_ids: list[int] = Field(default_factory=list)
    logprobs: list[float] | None = None
    """Per-token logprobs of ``completion_ids`` under the sampling policy."""
    finish_reason: str | None = None
    """``stop``, ``length``, ``tool_calls`` (stopped after parsed tool calls), ``malformed_tool_call``
    (stopped, but a tool call could not be read), ``prompt_too_long`` or engine specific."""
    weight_version: int | None = None
    """Policy version that produced this output."""
    temperature: float | None = None
    """The temperature the completion was sampled, and its ``logprobs`` taken, at, when the engine
    reports it (None: unknown). A greedy sample reports the temperature of its logprobs (1.0 for the
    torch engine)."""
    is_validation: bool = False
    backend_data: dict[str, Any] = Field(default_factory=dict)
    """What the backend's service returned beside the tokens (e.g. Tinker's ``sequence_id``); kept on the step."""

    def assistant_message(self) -> dict[str, Any]:
        """This response as the assistant message to append to the conversation (OpenAI format).

        ``content`` plus ``tool_calls`` when there are any and ``reasoning_content`` when there is
        reasoning. An engine that continues conversations token-exactly (the torch engine)
        recognises this message, and also ``{"role": "assistant", "content": text}``.
        """
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = copy.deepcopy(self.tool_calls)
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        return message


class RewardOutput(BaseModel):
    """What a reward function returns (a bare float is accepted too)."""

    reward: float
    is_correct: bool | None = None
    """None: the trainer derives it as ``reward > 0``."""
    metadata: dict[str, Any] = Field(default_factory=dict)


Advantage = float | list[float] | None


class Step(BaseModel):
    """One model call inside a trajectory, with what the environment answered."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    prompt_ids: list[Any] = Field(default_factory=list)
    """Token ids of the prompt (ints, or opaque chunks for multimodal backends)."""
    response_ids: list[int] = Field(default_factory=list)
    logprobs: list[float] = Field(default_factory=list)
    """Sampling logprobs, one per response token (or empty when unknown)."""
    chat_completions: ChatView = Field(default_factory=lambda: ChatView.snapshot(None))
    """The conversation as it was at this step (read-only)."""
    model_response: str = ""
    reasoning: str | None = None
    action: Any = None
    observation: Any = None
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = Field(default_factory=dict)
    advantage: Advantage = None
    """None until computed; a float (broadcast) or one float per response token."""
    weight_version: int | None = None
    """Policy version that produced ``response_ids``."""
    temperature: float | None = None
    """The temperature ``response_ids`` were sampled at (:attr:`ModelOutput.temperature`; None:
    unknown, taken as the run's). A backend that trains each row at its own temperature uses it."""
    finish_reason: str | None = None
    backend_data: dict[str, Any] = Field(default_factory=dict)
    """Backend-specific per-step data from :attr:`ModelOutput.backend_data`, for a loss that needs it."""

    @model_validator(mode="after")
    def _check_lengths(self) -> Step:
        if self.logprobs and len(self.logprobs) != len(self.response_ids):
            raise ValueError(
                f"logprobs has {len(self.logprobs)} entries but response_ids has "
                f"{len(self.response_ids)}; they must match one to one"
            )
        return self

    @classmethod
    def from_model_output(
        cls,
        model_output: ModelOutput,
        messages: Sequence[Mapping[str, Any]] | None = None,
        action: Any = None,
        **fields: Any,
    ) -> Step:
        """Build a step from an engine response and the messages that were sent.

        The token lists are taken from ``model_output`` as they are (it validated them already), not
        copied: this is the hot path of every rollout. Extra ``fields`` (but a bool ``done``) go through
        full validation.
        """
        completion_ids = model_output.completion_ids
        logprobs = model_output.logprobs or []
        done = fields.get("done", False)
        # subclasses may add fields or validators, and other fields need checking: validate fully
        if cls is not Step or type(done) is not bool or fields.keys() - {"done"}:
            return cls(
                prompt_ids=model_output.prompt_ids,
                response_ids=completion_ids,
                logprobs=logprobs,
                chat_completions=ChatView.snapshot(messages),
                model_response=model_output.content or model_output.text,
                reasoning=model_output.reasoning,
                action=action,
                weight_version=model_output.weight_version,
                temperature=model_output.temperature,
                finish_reason=model_output.finish_reason,
                backend_data=model_output.backend_data,
                **fields,
            )
        if logprobs and len(logprobs) != len(completion_ids):
            raise ValueError(
                f"logprobs has {len(logprobs)} entries but response_ids has {len(completion_ids)}; "
                "they must match one to one"
            )
        step = cls.__new__(cls)
        values = {
            "prompt_ids": model_output.prompt_ids,
            "response_ids": completion_ids,
            "logprobs": logprobs,
            "chat_completions": ChatView.snapshot(messages),
            "model_response": model_output.content or model_output.text,
            "reasoning": model_output.reasoning,
            "action": action,
            "observation": None,
            "reward": 0.0,
            "done": done,
            "info": {},
            "advantage": None,
            "weight_version": model_output.weight_version,
            "temperature": model_output.temperature,
            "finish_reason": model_output.finish_reason,
            "backend_data": model_output.backend_data,
        }
        # What ``model_construct`` does, without its per-field default handling (4x faster here).
        _set = object.__setattr__
        _set(step, "__dict__", values)
        _set(step, "__pydantic_fields_set__", set(_FROM_OUTPUT_FIELDS_DONE if done else _FROM_OUTPUT_FIELDS))
        _set(step, "__pydantic_extra__", None)
        _set(step, "__pydantic_private__", None)
        return step


_FROM_OUTPUT_FIELDS = frozenset(
    {
        "prompt_ids",
        "response_ids",
        "logprobs",
        "chat_completions",
        "model_response",
        "reasoning",
        "action",
        "weight_version",
        "temperature",
        "finish_reason",
        "backend_data",
    }
)
_FROM_OUTPUT_FIELDS_DONE = _FROM_OUTPUT_FIELDS | {"done"}


class Trajectory(BaseModel):
    """The steps of one role in one episode."""

    name: str = "default"
    """The role (``solver``, ``judge``...); groups and per-role estimators key on it."""
    steps: list[Step] = Field(default_factory=list)
    reward: float | None = None
    """Trajectory reward; None means the sum of step rewards (see :attr:`total_reward`)."""
    info: dict[str, Any] = Field(default_factory=dict)

    @property
    def total_reward(self) -> float:
        if self.reward is not None:
            return float(self.reward)
        return float(sum(s.reward for s in self.steps))


class Episode(BaseModel):
    """One rollout of one task."""

    task: Any = None
    task_id: str = ""
    """Stable id of the task; groups key on it (any characters allowed)."""
    rollout_idx: int = 0
    """Which of the ``rollout.n`` rollouts of this task this is."""
    trajectories: list[Trajectory] = Field(default_factory=list)
    is_correct: bool = False
    termination_reason: TerminationReason = TerminationReason.UNKNOWN
    metrics: dict[str, float] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)

    @property
    def id(self) -> str:
        """A display id; never parse it, use ``task_id`` and ``rollout_idx``."""
        return f"{self.task_id}#{self.rollout_idx}"


class TrajectoryGroup(BaseModel):
    """Trajectories of one role for one task: the unit an advantage estimator sees."""

    task_id: str
    role: str
    trajectories: list[Trajectory]
    episodes: list[Episode] = Field(default_factory=list, exclude=True, repr=False)
    """The episode each trajectory came from (same order), for metrics and filters."""

    @property
    def group_id(self) -> tuple[str, str]:
        return (self.task_id, self.role)
