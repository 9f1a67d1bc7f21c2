"""RolloutEngine stamping and SamplingEngine precedence / copy semantics."""

from __future__ import annotations

import asyncio

import pytest

from rllm_core.engine import RolloutEngine, SamplingEngine
from rllm_core.types import ModelOutput, TokenInput


class EchoEngine(RolloutEngine):
    """Answers with the sampling parameters it received (what a backend's engine would use)."""

    def __init__(self, default_sampling=None, gate: asyncio.Event | None = None):
        super().__init__(default_sampling)
        self.gate = gate
        self.seen: list[dict] = []

    async def _generate(self, messages, **sampling):
        self.seen.append(dict(sampling))
        sampling["mutated_by_engine"] = True  # must not leak into anyone's defaults
        if self.gate is not None:
            await self.gate.wait()
        return ModelOutput(text=messages[-1]["content"], completion_ids=[1, 2])


class PinnedVersionEngine(EchoEngine):
    async def _generate(self, messages, **sampling):
        out = await super()._generate(messages, **sampling)
        out.weight_version = 7
        return out


class TokenEngine(EchoEngine):
    supports_token_in_token_out = True

    async def _generate_tokens(self, token_input, **sampling):
        self.seen.append(dict(sampling))
        return ModelOutput(completion_ids=list(reversed(token_input.prompt_ids)))


MSGS = [{"role": "user", "content": "hi"}]


def test_outputs_are_stamped_with_the_weight_version_and_validation_flag():
    engine = EchoEngine()
    out = asyncio.run(engine.get_model_response(MSGS))
    assert (out.weight_version, out.is_validation) == (0, False)
    engine.set_weight_version(3)
    out = asyncio.run(engine.get_model_response(MSGS, is_validation=True))
    assert (out.weight_version, out.is_validation) == (3, True)


def test_the_version_is_the_one_serving_when_the_request_started():
    async def scenario():
        gate = asyncio.Event()
        engine = EchoEngine(gate=gate)
        engine.set_weight_version(1)
        pending = asyncio.create_task(engine.get_model_response(MSGS))
        await asyncio.sleep(0)
        engine.set_weight_version(2)  # a weight sync lands mid-request
        gate.set()
        return await pending

    assert asyncio.run(scenario()).weight_version == 1


def test_a_version_set_by_the_engine_itself_is_kept():
    engine = PinnedVersionEngine()
    engine.set_weight_version(2)
    assert asyncio.run(engine.get_model_response(MSGS)).weight_version == 7


def test_sampling_precedence_per_call_over_bound_over_engine_defaults():
    engine = EchoEngine({"temperature": 0.5, "max_tokens": 10, "top_k": 5})
    bound = SamplingEngine(engine, {"temperature": 0.9, "top_p": 0.95})
    asyncio.run(bound.get_model_response(MSGS))
    asyncio.run(bound.get_model_response(MSGS, temperature=0.1, max_tokens=3))
    assert engine.seen[0] == {"temperature": 0.9, "max_tokens": 10, "top_k": 5, "top_p": 0.95}
    assert engine.seen[1] == {"temperature": 0.1, "max_tokens": 3, "top_k": 5, "top_p": 0.95}


def test_per_call_sampling_never_leaks_into_defaults():
    defaults = {"temperature": 0.9}
    engine = EchoEngine({"max_tokens": 10})
    bound = SamplingEngine(engine, defaults)
    defaults["temperature"] = 0.0  # the caller's dict was copied
    asyncio.run(bound.get_model_response(MSGS, temperature=0.2, stop=["x"]))
    asyncio.run(bound.get_model_response(MSGS))
    assert engine.seen[1] == {"max_tokens": 10, "temperature": 0.9}
    assert bound.sampling == {"temperature": 0.9}
    assert engine.default_sampling == {"max_tokens": 10}


def test_sampling_engine_carries_the_validation_flag_and_version():
    engine = EchoEngine()
    engine.set_weight_version(4)
    val = SamplingEngine(engine, {"temperature": 0.0}, is_validation=True)
    out = asyncio.run(val.get_model_response(MSGS))
    assert out.is_validation and out.weight_version == 4
    assert val.weight_version == 4
    assert not asyncio.run(SamplingEngine(engine).get_model_response(MSGS)).is_validation


def test_token_in_token_out_is_not_implemented_unless_supported():
    engine = EchoEngine()
    bound = SamplingEngine(engine)
    assert not bound.supports_token_in_token_out
    with pytest.raises(NotImplementedError, match="EchoEngine does not support token-in/token-out"):
        asyncio.run(bound.get_token_response(TokenInput(prompt_ids=[1, 2])))


def test_token_in_token_out_when_supported_is_stamped_and_uses_bound_sampling():
    engine = TokenEngine({"max_tokens": 4})
    engine.set_weight_version(5)
    bound = SamplingEngine(engine, {"temperature": 0.7}, is_validation=True)
    assert bound.supports_token_in_token_out
    out = asyncio.run(bound.get_token_response(TokenInput(prompt_ids=[1, 2, 3]), top_p=0.5))
    assert out.completion_ids == [3, 2, 1]
    assert (out.weight_version, out.is_validation) == (5, True)
    assert engine.seen == [{"max_tokens": 4, "temperature": 0.7, "top_p": 0.5}]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda e: e.encode_messages(MSGS), "cannot encode messages"),
        (lambda e: e.compute_logprobs([1], [2]), "cannot compute logprobs"),
        (lambda e: e.refresh_reference(), "has no reference model"),
    ],
)
def test_optional_capabilities_say_which_engine_lacks_them(call, match):
    with pytest.raises(NotImplementedError, match=f"EchoEngine {match}"):
        asyncio.run(call(SamplingEngine(EchoEngine())))


# -- tools --------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]


class ToolEngine(RolloutEngine):
    """Answers with a tiny-format call; records what ``_generate`` received."""

    supports_tools = True

    def __init__(self, text: str = "<tool_call> add <arg> a 1 </tool_call>", **kwargs):
        super().__init__(**kwargs)
        self.text = text
        self.calls: list[dict] = []

    async def _generate(self, messages, **sampling):
        self.calls.append(sampling)
        return self.parse(ModelOutput(text=self.text, content=self.text, finish_reason="stop"))

    async def encode_messages(self, messages, add_generation_prompt=True, *, tools=None):
        return [len(tools or [])]


def tiny_parser():
    from rllm_core.parsers import build_parser

    return build_parser("tool_parser", "tiny")


def test_tools_reach_the_engine_only_when_given():
    engine = ToolEngine(tool_parser=tiny_parser())
    bound = SamplingEngine(engine, {"temperature": 0.5})
    asyncio.run(bound.get_model_response(MSGS, tools=TOOLS))
    asyncio.run(bound.get_model_response(MSGS))
    assert engine.calls == [{"tools": TOOLS, "temperature": 0.5}, {"temperature": 0.5}]
    assert bound.supports_tools
    assert asyncio.run(bound.encode_messages(MSGS, tools=TOOLS)) == [1]


def test_tools_are_refused_by_an_engine_that_does_not_support_them():
    with pytest.raises(NotImplementedError, match="EchoEngine does not support tools"):
        asyncio.run(SamplingEngine(EchoEngine()).get_model_response(MSGS, tools=TOOLS))


def test_tools_without_a_tool_parser_are_refused_naming_the_config_field():
    with pytest.raises(ValueError, match=r"rollout\.tool_parser"):
        asyncio.run(ToolEngine().get_model_response(MSGS, tools=TOOLS))


def test_parsed_and_malformed_tool_calls_are_counted():
    good = ToolEngine(tool_parser=tiny_parser())
    out = asyncio.run(good.get_model_response(MSGS, tools=TOOLS))
    assert out.finish_reason == "tool_calls" and good.pop_counters() == {"engine/tool_calls": 1.0}
    assert good.pop_counters() == {}  # drained
    bad = ToolEngine("<tool_call> add <arg> a </tool_call> <tool_call> x </tool_call>", tool_parser=tiny_parser())
    out = asyncio.run(bad.get_model_response(MSGS, tools=TOOLS))
    assert out.finish_reason == "malformed_tool_call"
    assert bad.pop_counters() == {"engine/tool_calls": 1.0, "engine/tool_calls/malformed": 1.0}


def test_an_engine_written_before_tools_still_encodes_through_the_sampling_engine():
    class OldEngine(EchoEngine):
        async def encode_messages(self, messages, add_generation_prompt=True):  # no tools argument
            return [7]

    assert asyncio.run(SamplingEngine(OldEngine()).encode_messages(MSGS)) == [7]
