"""Tools on the tinker engine: the renderer renders the tool specs and reads the calls back; finish
reasons as rllm_core.parsers defines them; multi-turn with tool results.

Completions are either scripted (token ids built here with the stand-in's byte-level tokenizer, fed
through the engine's sampling path) or sampled by the stand-in from a LoRA trained to call the tool.
Expected prompts are written out as text here, not produced by the engine's helpers."""

from __future__ import annotations

import asyncio
import json
import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("peft", reason="the stand-in's LoRA needs peft (pip install 'rllm-tinker[test]')")
pytest.importorskip("rllm_torch", reason="the stand-in's model comes from rllm-torch (pip install 'rllm-tinker[test]')")

import tinker
from rllm_tinker.engine import TinkerRolloutEngine, to_renderer_messages, to_tool_specs
from rllm_tinker.testing import TOOLS_BASE_MODEL, LocalTinker
from tinker_cookbook import renderers
from tinker_helpers import Scripted

from rllm_core.testing import ADD_TOOL
from rllm_core.types import ModelOutput

ADD = ADD_TOOL
MUL = {"type": "function", "function": {"name": "mul", "parameters": {"type": "object", "properties": {}}}}
ADD_JSON = (
    '{"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": '
    '{"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}'
)
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
BAD_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 3,}}\n</tool_call>'
USER = {"role": "user", "content": "3 + 4?"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    local = LocalTinker(tmp_path_factory.mktemp("tinker-tools"), context_window=2048)
    yield local
    local.close()


@pytest.fixture(scope="module")
def tokenizer(service):
    return service.tokenizer(TOOLS_BASE_MODEL)


def _engine(tokenizer, sampler=None, renderer_name: str = "qwen3_instruct") -> TinkerRolloutEngine:
    engine = TinkerRolloutEngine(context_window=2048)
    engine.attach(renderers.get_renderer(renderer_name, tokenizer), tokenizer, renderer_name)
    engine.set_sampling_client(sampler or Scripted(), 0)
    return engine


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stopped(tokenizer, text: str) -> tuple[list[int], str]:
    """A completion that ended with <|im_end|> (the renderer's stop token)."""
    return [*_ids(tokenizer, text), tokenizer.convert_tokens_to_ids("<|im_end|>")], "stop"


def _respond(engine, messages, **kw) -> ModelOutput:
    return asyncio.run(engine.get_model_response(messages, **kw))


# -- rendering --------------------------------------------------------------------------------------


def test_the_tool_specs_go_into_the_system_turn_after_the_system_prompt(tokenizer):
    engine = _engine(tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, USER]
    text = tokenizer.decode(asyncio.run(engine.encode_messages(messages, tools=[ADD])))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n" + TOOLS_HEADER + ADD_JSON + "\n</tools>\n\n")
    assert text.endswith("</tool_call><|im_end|>\n<|im_start|>user\n3 + 4?<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>system") == 1  # the system message became the prefix's prompt


def test_without_a_system_message_the_tools_open_the_conversation(tokenizer):
    text = tokenizer.decode(asyncio.run(_engine(tokenizer).encode_messages([USER], tools=[ADD, MUL])))
    assert text.startswith("<|im_start|>system\n" + TOOLS_HEADER + ADD_JSON + "\n")
    # a tool without a description gets an empty one; its own keys keep their order
    mul = (
        '{"type": "function", "function": {"name": "mul", "parameters": {"type": "object", "properties": {}}, '
        '"description": ""}}'
    )
    assert ADD_JSON + "\n" + mul + "\n</tools>" in text


def test_prompts_are_cached_per_messages_and_tools(tokenizer):
    engine = _engine(tokenizer)
    plain = asyncio.run(engine.encode_messages([USER]))
    with_add = asyncio.run(engine.encode_messages([USER], tools=[ADD]))
    with_both = asyncio.run(engine.encode_messages([USER], tools=[ADD, MUL]))
    assert tokenizer.decode(plain) == "<|im_start|>user\n3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    assert len({tuple(plain), tuple(with_add), tuple(with_both)}) == 3
    assert asyncio.run(engine.encode_messages([USER], tools=[ADD])) == with_add
    assert asyncio.run(engine.encode_messages([USER], tools=[])) == plain  # no tools: no tool prompt


def test_a_renderer_without_tool_support_is_an_error_naming_the_setting(tokenizer):
    engine = _engine(tokenizer, renderer_name="role_colon")
    with pytest.raises(NotImplementedError, match=r"tinker\.renderer_name: the renderer 'role_colon'"):
        _respond(engine, [USER], tools=[ADD])


def test_a_bare_tool_spec_is_taken_as_it_is():
    flat = {"type": "function", "name": "mul", "description": "", "parameters": {"type": "object"}}
    assert to_tool_specs([flat]) == [{"name": "mul", "description": "", "parameters": {"type": "object"}}]


def test_a_tool_that_is_not_an_openai_function_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"tools\[1\]: expected an OpenAI function tool"):
        to_tool_specs([ADD, {"type": "function", "function": {"description": "no name"}}])


# -- reading completions ----------------------------------------------------------------------------


def test_a_well_formed_call_comes_back_as_an_openai_tool_call(tokenizer):
    sampler = Scripted(_stopped(tokenizer, CALL))
    engine = _engine(tokenizer, sampler)
    out = _respond(engine, [USER], tools=[ADD])
    assert out.finish_reason == "tool_calls"
    assert out.tool_calls == [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}
    ]
    assert (out.content, out.tool_call_errors) == ("", [])
    assert sampler.prompts == [asyncio.run(engine.encode_messages([USER], tools=[ADD]))]
    assert engine.pop_counters() == {"engine/tool_calls": 1.0}


def test_parallel_calls_are_numbered_in_order(tokenizer):
    mul = '<tool_call>\n{"name": "mul", "arguments": {}}\n</tool_call>'
    out = _respond(_engine(tokenizer, Scripted(_stopped(tokenizer, f"{CALL}\n{mul}"))), [USER], tools=[ADD, MUL])
    assert [(c["id"], c["function"]["name"]) for c in out.tool_calls] == [("call_0", "add"), ("call_1", "mul")]
    assert out.finish_reason == "tool_calls"


def test_a_reply_without_calls_stops(tokenizer):
    out = _respond(_engine(tokenizer, Scripted(_stopped(tokenizer, "7"))), [USER], tools=[ADD])
    assert (out.finish_reason, out.content, out.tool_calls) == ("stop", "7", [])


def test_a_malformed_call_is_reported_and_its_raw_text_stays_in_the_content(tokenizer):
    engine = _engine(tokenizer, Scripted(_stopped(tokenizer, f"Sure. {BAD_CALL} then {CALL} done")))
    out = _respond(engine, [USER], tools=[ADD])
    assert out.finish_reason == "malformed_tool_call"
    assert [c["function"]["name"] for c in out.tool_calls] == ["add"]  # the valid call beside it is kept
    assert out.content == f"Sure. {BAD_CALL} then  done"  # where the model wrote it
    assert len(out.tool_call_errors) == 1 and "Invalid JSON" in out.tool_call_errors[0]
    counters = engine.pop_counters()
    assert counters["tinker/malformed_tool_calls"] == 1
    assert counters["engine/tool_calls/malformed"] == 1


def test_an_unterminated_call_in_a_reply_that_stopped_is_malformed(tokenizer):
    open_call = 'ok <tool_call>\n{"name": "add"'
    out = _respond(_engine(tokenizer, Scripted(_stopped(tokenizer, open_call))), [USER], tools=[ADD])
    assert out.finish_reason == "malformed_tool_call"
    assert out.content == open_call  # once, not twice
    assert out.tool_calls == [] and "unterminated tool block" in out.tool_call_errors[0]


def test_a_completion_cut_by_the_budget_keeps_length_and_lists_its_calls(tokenizer):
    cut = _ids(tokenizer, f'{CALL}\n<tool_call>\n{{"name": "ad')
    engine = _engine(tokenizer, Scripted((cut, "length")))
    out = _respond(engine, [USER], tools=[ADD])
    assert out.finish_reason == "length"
    assert [c["function"]["name"] for c in out.tool_calls] == ["add"]
    assert len(out.tool_call_errors) == 1 and "unterminated" in out.tool_call_errors[0]
    assert "tinker/malformed_tool_calls" not in engine.pop_counters()  # counted for replies that stopped


def test_engine_parse_reads_text_with_the_renderer(tokenizer):
    engine = _engine(tokenizer)
    out = engine.parse(ModelOutput(text=CALL + "<|im_end|>", finish_reason="stop"))
    assert out.finish_reason == "tool_calls"
    assert json.loads(out.tool_calls[0]["function"]["arguments"]) == {"a": 3, "b": 4}


# -- multi-turn -------------------------------------------------------------------------------------


def _tool_result(call: dict) -> dict:
    return {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"], "content": "7"}


def test_a_tool_result_renders_after_the_call_and_the_next_prompt_extends_the_last(tokenizer):
    sampler = Scripted(_stopped(tokenizer, CALL), _stopped(tokenizer, "7"))
    engine = _engine(tokenizer, sampler)
    messages = [USER]
    first = _respond(engine, messages, tools=[ADD])
    messages = [*messages, first.assistant_message(), _tool_result(first.tool_calls[0])]
    second = _respond(engine, messages, tools=[ADD])
    sampled = [*first.prompt_ids, *first.completion_ids]
    assert second.prompt_ids[: len(sampled)] == sampled
    bridge = tokenizer.decode(second.prompt_ids[len(sampled) :])
    assert bridge == "\n<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert (second.finish_reason, second.content) == ("stop", "7")


def test_tool_call_arguments_as_a_dict_or_a_json_string_render_alike(tokenizer):
    engine = _engine(tokenizer)

    def prompt(arguments) -> list[int]:
        call = {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": arguments}}
        reply = {"role": "assistant", "content": "", "tool_calls": [call]}
        return asyncio.run(engine.encode_messages([USER, reply, _tool_result(call)], tools=[ADD]))

    assert prompt({"a": 3, "b": 4}) == prompt('{"a": 3, "b": 4}')
    assert CALL + "<|im_end|>" in tokenizer.decode(prompt({"a": 3, "b": 4}))


def test_reasoning_content_goes_back_to_the_renderer_as_thinking():
    (msg,) = to_renderer_messages([{"role": "assistant", "content": "7", "reasoning_content": "3 + 4"}])
    assert msg["content"] == [{"type": "thinking", "thinking": "3 + 4"}, {"type": "text", "text": "7"}]


DRIFT = pytest.mark.parametrize(
    ("reply", "rerendered"),
    [
        (f"Let me add.\n{CALL}", f"Let me add.\n\n{CALL}"),
        ('<tool_call>\n{"name":"add","arguments":{"a":3,"b":4}}\n</tool_call>', CALL),
    ],
    ids=["text_before_the_call", "json_spaced_otherwise"],
)
"""Known drift of the cookbook renderer (0.5.8): it parses "text\\n<tool_call>" into the text "text\\n"
and renders it back with another "\\n" before the call, and re-serialises arguments with json.dumps."""

TOOL_RESULT_BRIDGE = "\n<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def _two_turns(engine, tokenizer, reply: str, stop_reason: str = "stop"):
    engine.sampling_client.completions += [
        _stopped(tokenizer, reply) if stop_reason == "stop" else (_ids(tokenizer, reply), "length"),
        _stopped(tokenizer, "7"),
    ]
    first = _respond(engine, [USER], tools=[ADD])
    call = first.tool_calls[0] if first.tool_calls else {"id": "call_0", "function": {"name": "add"}}
    second = _respond(engine, [USER, first.assistant_message(), _tool_result(call)], tools=[ADD])
    return first, second


@DRIFT
def test_a_reply_the_renderer_writes_back_differently_is_continued_from_the_sampled_tokens(
    tokenizer, reply, rerendered
):
    engine = _engine(tokenizer)
    first, second = _two_turns(engine, tokenizer, reply)
    assert first.finish_reason == "tool_calls"
    sampled = [*first.prompt_ids, *first.completion_ids]
    assert second.prompt_ids[: len(sampled)] == sampled
    assert tokenizer.decode(second.prompt_ids[len(sampled) :]) == TOOL_RESULT_BRIDGE
    assert engine.pop_counters() == {"engine/tool_calls": 1.0, "engine/multiturn/continued": 1.0}
    # what a re-render would have sent instead
    messages = [USER, first.assistant_message(), _tool_result(first.tool_calls[0])]
    full = asyncio.run(engine.encode_messages(messages, tools=[ADD]))
    assert full[: len(sampled)] != sampled and rerendered + "<|im_end|>" in tokenizer.decode(full)


@DRIFT
def test_without_the_turn_cache_the_drifting_reply_is_re_rendered(tokenizer, reply, rerendered):
    engine = TinkerRolloutEngine(context_window=2048, multiturn_cache_size=0)
    engine.attach(renderers.get_renderer("qwen3_instruct", tokenizer), tokenizer, "qwen3_instruct")
    engine.set_sampling_client(Scripted(), 0)
    first, second = _two_turns(engine, tokenizer, reply)
    sampled = [*first.prompt_ids, *first.completion_ids]
    assert second.prompt_ids[: len(sampled)] != sampled
    assert rerendered + "<|im_end|>" in tokenizer.decode(second.prompt_ids[len(first.prompt_ids) :])
    assert engine.pop_counters() == {"engine/tool_calls": 1.0}  # nothing continued, nothing counted as such


def test_the_continued_conversation_is_one_row(tokenizer):
    """Three turns (a call with text before it, a tool result, a user follow-up): the core's rows
    merge them into one row that is exactly what was sampled."""
    from rllm_core.rows import build_rows
    from rllm_core.types import Step, Trajectory, TrajectoryGroup

    engine = _engine(tokenizer, Scripted(_stopped(tokenizer, f"Let me add.\n{CALL}"), _stopped(tokenizer, "7")))
    engine.sampling_client.completions.append(_stopped(tokenizer, "Still 7."))
    messages, steps, outs = [USER], [], []
    for follow_up in (None, "tool", {"role": "user", "content": "Sure?"}):
        if follow_up == "tool":
            messages = [*messages, outs[-1].assistant_message(), _tool_result(outs[-1].tool_calls[0])]
        elif follow_up is not None:
            messages = [*messages, {"role": "assistant", "content": outs[-1].text}, follow_up]
        out = _respond(engine, messages, tools=[ADD])
        outs.append(out)
        steps.append(Step.from_model_output(out, messages))
    assert outs[1].text == "7"  # the end-of-turn token is not part of the text
    bridge = outs[2].prompt_ids[len(outs[1].prompt_ids) + len(outs[1].completion_ids) :]
    assert tokenizer.decode(bridge) == "\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n"
    assert engine.pop_counters() == {"engine/tool_calls": 1.0, "engine/multiturn/continued": 2.0}
    group = TrajectoryGroup(task_id="t", role="agent", trajectories=[Trajectory(name="agent", steps=steps)])
    rows = build_rows([group])
    assert len(rows) == 1 and rows.metrics["rows/breaks"] == 0
    assert rows.tokens[0] == [*outs[2].prompt_ids, *outs[2].completion_ids]


def test_a_reply_cut_by_the_budget_is_closed_by_the_bridge(tokenizer):
    engine = _engine(tokenizer)
    first, second = _two_turns(engine, tokenizer, CALL, stop_reason="length")
    assert first.finish_reason == "length" and first.tool_calls  # parsed as if it had ended there
    sampled = [*first.prompt_ids, *first.completion_ids]
    assert second.prompt_ids[: len(sampled)] == sampled
    assert tokenizer.decode(second.prompt_ids[len(sampled) :]) == "<|im_end|>" + TOOL_RESULT_BRIDGE


def test_an_edited_reply_or_a_renderer_that_rewrites_history_is_re_rendered_and_counted(tokenizer):
    engine = _engine(tokenizer, Scripted(_stopped(tokenizer, "8"), _stopped(tokenizer, "7")))
    first = _respond(engine, [USER])
    edited = [USER, {"role": "assistant", "content": "7"}, {"role": "user", "content": "Sure?"}]
    second = _respond(engine, edited)
    assert second.prompt_ids == asyncio.run(engine.encode_messages(edited))
    assert engine.pop_counters() == {"engine/multiturn/rerendered/unknown_history": 1.0}
    assert first.text == "8"

    # qwen3 drops the thinking of earlier turns from the history it renders
    think = _stopped(tokenizer, "<think>\nadd them\n</think>\n\n7")
    engine = _engine(tokenizer, Scripted(think, _stopped(tokenizer, "yes")), renderer_name="qwen3")
    first = _respond(engine, [USER])
    assert (first.reasoning, first.content) == ("add them", "7")
    messages = [USER, first.assistant_message(), {"role": "user", "content": "Sure?"}]
    second = _respond(engine, messages)
    assert second.prompt_ids == asyncio.run(engine.encode_messages(messages))
    assert "add them" not in tokenizer.decode(second.prompt_ids)
    assert engine.pop_counters() == {"engine/multiturn/rerendered/template_rewrote_history": 1.0}


# -- through the stand-in's sampler -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_sampler(service, tokenizer):
    """A LoRA trained (Tinker's cross_entropy) on a two-turn tool conversation: call add, then answer."""
    renderer = renderers.get_renderer("qwen3_instruct", tokenizer)
    training = service.service_client().create_lora_training_client(TOOLS_BASE_MODEL, rank=32, seed=0).result()
    history = [*renderer.create_conversation_prefix_with_tools(to_tool_specs([ADD])), USER]
    first = renderer.build_generation_prompt(history).to_ints()
    call = _stopped(tokenizer, CALL)[0]
    message, _ = renderer.parse_response(call)
    second = renderer.build_generation_prompt([*history, message, {"role": "tool", "content": "7"}]).to_ints()
    answer = _stopped(tokenizer, "7")[0]
    datums = []
    for prompt, reply in [(first, call), (second, answer)]:
        tokens = prompt + reply
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(reply)
        datums.append(
            tinker.Datum(
                model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": np.asarray(tokens[1:]), "weights": np.asarray(weights)},
            )
        )
    greedy = tinker.SamplingParams(max_tokens=64, top_k=1, stop=renderer.get_stop_sequences())
    for step in range(1, 201):  # until greedy sampling writes both turns (about 80 steps)
        training.forward_backward(datums, "cross_entropy").result()
        training.optim_step(tinker.AdamParams(learning_rate=4e-3, eps=1e-8)).result()
        if step % 10 == 0:
            sampler = training.save_weights_and_get_sampling_client().result()
            got = [
                list(sampler.sample(tinker.ModelInput.from_ints(p), 1, greedy).result().sequences[0].tokens)
                for p in (first, second)
            ]
            if got == [call, answer]:
                break
    return sampler


def test_a_model_that_calls_the_tool_gets_a_tool_call_and_then_answers(tokenizer, tool_sampler):
    engine = _engine(tokenizer, tool_sampler)
    greedy = {"temperature": 0.0, "max_tokens": 64}
    first = _respond(engine, [USER], tools=[ADD], **greedy)
    assert first.finish_reason == "tool_calls", first.text
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in first.tool_calls] == [
        ("add", {"a": 3, "b": 4})
    ]
    assert len(first.logprobs) == len(first.completion_ids)
    messages = [USER, first.assistant_message(), _tool_result(first.tool_calls[0])]
    second = _respond(engine, messages, tools=[ADD], **greedy)
    assert (second.finish_reason, second.content) == ("stop", "7"), second.text
    assert second.prompt_ids[: len(first.prompt_ids) + len(first.completion_ids)] == [
        *first.prompt_ids,
        *first.completion_ids,
    ]


# -- config -----------------------------------------------------------------------------------------


def test_the_core_tool_parser_setting_is_reported_as_unused():
    from rllm_tinker.backend import TinkerBackend

    from rllm_core.config import RLLMConfig

    cfg = RLLMConfig.model_validate({"backend": "tinker", "rollout": {"tool_parser": "hermes"}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TinkerBackend(cfg).validate_config(cfg)
    assert any("rollout.tool_parser: not used by the tinker backend" in str(w.message) for w in caught)


def test_a_forward_kl_is_refused_by_name():
    from rllm_tinker.backend import TinkerBackend

    from rllm_core.config import ConfigError, RLLMConfig

    cfg = RLLMConfig.model_validate({"backend": "tinker", "algorithm": {"loss": {"forward_kl_coef": 0.05}}})
    with pytest.raises(ConfigError, match=r"algorithm\.loss\.forward_kl_coef"):
        TinkerBackend(cfg).validate_config(cfg)


@pytest.mark.parametrize(
    ("renderer_name", "continued", "rerender_extends"),
    [
        ("qwen3_instruct", True, True),
        ("kimi_k2", True, False),
        ("kimi_k25", True, False),
        ("nemotron3", True, False),
        ("qwen3_5", False, False),  # these write an assistant turn one way as the prompt's last, another in history
        ("qwen3_disable_thinking", False, False),
    ],
)
def test_every_renderer_either_continues_the_sampled_tokens_or_re_renders_in_full(
    tokenizer, renderer_name, continued, rerender_extends
):
    """The cookbook renderers that work with the byte-level tokenizer (the others need their own
    special tokens). Where a full re-render would not extend the sampled tokens (kimi, nemotron), only
    continuing keeps the trajectory one row."""
    engine = _engine(tokenizer, renderer_name=renderer_name)
    (stop,) = [s for s in engine.stop if isinstance(s, int)]
    reply = ([*_ids(tokenizer, "7"), stop], "stop")
    engine.sampling_client.completions += [reply, reply]
    first = _respond(engine, [USER])
    messages = [USER, first.assistant_message(), {"role": "user", "content": "Sure?"}]
    second = _respond(engine, messages)
    sampled = [*first.prompt_ids, *first.completion_ids]
    full = asyncio.run(engine.encode_messages(messages))
    assert (full[: len(sampled)] == sampled) is rerender_extends
    if continued:
        assert second.prompt_ids[: len(sampled)] == sampled
        assert engine.pop_counters() == {"engine/multiturn/continued": 1.0}
    else:
        assert second.prompt_ids == full
        assert engine.pop_counters() == {"engine/multiturn/rerendered/template_rewrote_history": 1.0}
