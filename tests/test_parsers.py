"""Tool-call and reasoning parsers: the built-ins on good, parallel and malformed completions, the finish
reasons they lead to, and how a parser is chosen (registry, config, plugins)."""

from __future__ import annotations

import json

import pytest

from rllm_core import hookimpl
from rllm_core.config import ConfigError, load_config
from rllm_core.parsers import (
    MALFORMED_TOOL_CALL,
    TOOL_CALLS,
    ParsedCompletion,
    build_parser,
    parse_completion,
    parse_output,
)
from rllm_core.plugins import UnknownPluginError, registered
from rllm_core.types import ModelOutput


def parser(name: str):
    return build_parser("tool_parser", name)


def calls(parsed: ParsedCompletion) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, arguments read back from their JSON string."""
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]


# -- hermes -------------------------------------------------------------------------------------


def test_hermes_reads_one_call_into_openai_format():
    parsed = parser("hermes").parse(
        'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
    )
    assert parsed.tool_calls == [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}
    ]
    assert parsed.content == "Let me add." and parsed.errors == []


def test_hermes_reads_parallel_calls_in_order_with_their_own_ids():
    text = (
        '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "mul", "parameters": {"x": [1, 2]}}</tool_call>\n'
        '<tool_call>{"name": "neg", "arguments": "{\\"y\\": -1}"}</tool_call>'
    )
    parsed = parser("hermes").parse(text)
    assert calls(parsed) == [("add", {"a": 1}), ("mul", {"x": [1, 2]}), ("neg", {"y": -1})]
    assert [c["id"] for c in parsed.tool_calls] == ["call_0", "call_1", "call_2"]
    assert parsed.content == "" and parsed.errors == []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('<tool_call>{"name": "add", "arguments": {"a": 1}</tool_call>', "invalid JSON"),
        ('<tool_call>{"arguments": {"a": 1}}</tool_call>', "no 'name'"),
        ('<tool_call>{"name": "add", "arguments": [1]}</tool_call>', "must be a JSON object"),
        ('<tool_call>{"name": "add", "arguments": {"a": 1}}', "not closed by </tool_call>"),
        ('{"name": "add"}</tool_call>', "</tool_call> without an opening <tool_call>"),
    ],
)
def test_hermes_reports_a_malformed_call_and_keeps_its_text(text, error):
    parsed = parser("hermes").parse(text)
    assert parsed.tool_calls == []
    assert len(parsed.errors) == 1 and error in parsed.errors[0]
    assert parsed.content == text.strip()  # never dropped


def test_hermes_keeps_the_valid_calls_beside_a_malformed_one():
    text = '<tool_call>{"name": "add", "arguments": {}}</tool_call> <tool_call>{oops}</tool_call>'
    parsed = parser("hermes").parse(text)
    assert calls(parsed) == [("add", {})]
    assert parsed.errors[0].startswith("<tool_call> block 2: invalid JSON")
    assert parsed.content == "<tool_call>{oops}</tool_call>"


# -- llama3_json --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "search", "parameters": {"q": "rl"}}',
        '<|python_tag|>{"name": "search", "parameters": {"q": "rl"}}',
        '  {"name": "search", "arguments": {"q": "rl"}}\n',
    ],
)
def test_llama3_json_reads_the_whole_content_as_a_call(text):
    parsed = parser("llama3_json").parse(text)
    assert calls(parsed) == [("search", {"q": "rl"})]
    assert parsed.content == "" and parsed.errors == []


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": ";"}}',
        '[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"x": ";"}}]',
    ],
)
def test_llama3_json_reads_parallel_calls(text):
    parsed = parser("llama3_json").parse(text)
    assert calls(parsed) == [("a", {}), ("b", {"x": ";"})]
    assert [c["id"] for c in parsed.tool_calls] == ["call_0", "call_1"]


def test_llama3_json_leaves_plain_text_alone():
    parsed = parser("llama3_json").parse("The answer is {x | x > 1}.")
    assert parsed == ParsedCompletion(content="The answer is {x | x > 1}.")


@pytest.mark.parametrize(
    "text", ['{"name": "a", "parameters": {', "<|python_tag|>print(1)", '{"answer": 4}', '{"name": "a"} trailing']
)
def test_llama3_json_reports_a_malformed_call_and_keeps_its_text(text):
    parsed = parser("llama3_json").parse(text)
    assert parsed.tool_calls == [] and len(parsed.errors) == 1
    assert parsed.content == text


# -- tiny ---------------------------------------------------------------------------------------


def test_tiny_reads_names_arguments_and_values():
    parsed = parser("tiny").parse("ok <tool_call> add <arg> a 3 <arg> b true <arg> c hello world </tool_call>")
    assert calls(parsed) == [("add", {"a": 3, "b": True, "c": "hello world"})]
    assert parsed.content == "ok" and parsed.errors == []


def test_tiny_reads_parallel_calls():
    parsed = parser("tiny").parse("<tool_call> add <arg> a 1 </tool_call> <tool_call> now </tool_call>")
    assert calls(parsed) == [("add", {"a": 1}), ("now", {})]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("add <arg> a", "argument 'a' has no value"),
        ("add <arg> a 1 <arg> a 2", "given twice"),
        ("<arg> a 1", "expected the tool name"),
        ("add up <arg> a 1", "expected the tool name"),
        ("add <arg> <arg> a 1", "empty <arg>"),
    ],
)
def test_tiny_reports_a_malformed_call(body, error):
    text = f"<tool_call> {body} </tool_call>"
    parsed = parser("tiny").parse(text)
    assert parsed.tool_calls == [] and error in parsed.errors[0] and parsed.content == text


def test_tiny_reports_an_unterminated_call():
    parsed = parser("tiny").parse("sure <tool_call> add <arg> a 1")
    assert parsed.errors == ["<tool_call> block 1 is not closed by </tool_call>"]
    assert parsed.content == "sure <tool_call> add <arg> a 1"


# -- think --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("<think>\nadd them\n</think>\n\nThe answer is 7.", "add them", "The answer is 7."),
        ("add them</think>7", "add them", "7"),  # the template opened <think> in the generation prompt
        ("<think>still thinking", "still thinking", ""),  # cut by the token budget
        ("7", None, "7"),
    ],
)
def test_think_splits_reasoning_from_content(text, reasoning, content):
    parsed = build_parser("reasoning_parser", "think").parse(text)
    assert (parsed.reasoning, parsed.content) == (reasoning, content)


def test_tool_calls_inside_the_reasoning_are_not_calls():
    text = '<think><tool_call>{"name": "x", "arguments": {}}</tool_call></think>done'
    parsed = parse_completion(text, parser("hermes"), build_parser("reasoning_parser", "think"))
    assert parsed.tool_calls == [] and parsed.content == "done"
    assert parsed.reasoning == '<tool_call>{"name": "x", "arguments": {}}</tool_call>'


# -- finish reasons -----------------------------------------------------------------------------


def output(text: str, finish_reason: str) -> ModelOutput:
    return ModelOutput(text=text, content=text, finish_reason=finish_reason)


def test_a_completion_that_stopped_with_calls_finishes_with_tool_calls():
    out = parse_output(output("<tool_call> add <arg> a 1 </tool_call>", "stop"), parser("tiny"), None)
    assert out.finish_reason == TOOL_CALLS and len(out.tool_calls) == 1 and out.tool_call_errors == []


def test_a_completion_that_stopped_with_a_malformed_call_finishes_malformed():
    text = "<tool_call> add <arg> a 1 </tool_call> <tool_call> add <arg> b </tool_call>"
    out = parse_output(output(text, "stop"), parser("tiny"), None)
    assert out.finish_reason == MALFORMED_TOOL_CALL
    assert len(out.tool_calls) == 1 and len(out.tool_call_errors) == 1
    assert out.content == "<tool_call> add <arg> b </tool_call>"


def test_a_call_cut_by_the_token_budget_keeps_finish_reason_length_and_lists_the_error():
    out = parse_output(output("<tool_call> add <arg> a", "length"), parser("tiny"), None)
    assert out.finish_reason == "length" and out.tool_call_errors == [
        "<tool_call> block 1 is not closed by </tool_call>"
    ]


def test_without_parsers_the_output_is_left_as_it_is():
    out = parse_output(output(" <tool_call> x </tool_call> ", "stop"), None, None)
    assert (out.content, out.tool_calls, out.finish_reason) == (" <tool_call> x </tool_call> ", [], "stop")


def test_assistant_message_carries_content_tool_calls_and_reasoning():
    out = parse_output(
        output("<think>r</think>ok <tool_call> add <arg> a 1 </tool_call>", "stop"),
        parser("tiny"),
        build_parser("reasoning_parser", "think"),
    )
    message = out.assistant_message()
    assert message == {"role": "assistant", "content": "ok", "tool_calls": out.tool_calls, "reasoning_content": "r"}
    message["tool_calls"][0]["function"]["name"] = "changed"
    assert out.tool_calls[0]["function"]["name"] == "add"  # a copy


# -- choosing a parser --------------------------------------------------------------------------


def test_the_built_ins_are_registered_by_name():
    from rllm_core.plugins import get_registry

    registry = get_registry()
    assert registry.names("tool_parser") == ["hermes", "llama3_json", "tiny"]
    assert registry.names("reasoning_parser") == ["think"]


def test_config_names_an_unknown_parser_by_its_field():
    with pytest.raises(ConfigError, match=r"rollout\.tool_parser: tool_parser 'hermez' is not registered.*'hermes'"):
        load_config({"backend": "simulated", "rollout": {"tool_parser": "hermez"}}, validate_plugins=True)
    with pytest.raises(ConfigError, match=r"rollout\.reasoning_parser: reasoning_parser 'thinking'"):
        load_config({"backend": "simulated", "rollout": {"reasoning_parser": "thinking"}}, validate_plugins=True)


def test_config_refuses_a_registered_parser_that_has_no_parse_method():
    class NotAParser:
        pass

    class Plugin:
        @hookimpl
        def register_tool_parsers(self, register):
            register("broken", NotAParser)

    with registered(Plugin(), name="t_broken_parser"):
        with pytest.raises(ConfigError, match=r"rollout\.tool_parser: tool_parser 'broken' built a NotAParser"):
            load_config({"backend": "simulated", "rollout": {"tool_parser": "broken"}}, validate_plugins=True)


class UpperParser:
    """A third-party tool parser: ``CALL name`` lines."""

    def parse(self, text: str) -> ParsedCompletion:
        found = [line.split()[1] for line in text.splitlines() if line.startswith("CALL ")]
        rest = "\n".join(line for line in text.splitlines() if not line.startswith("CALL "))
        return ParsedCompletion(content=rest, tool_calls=[{"function": {"name": n, "arguments": "{}"}} for n in found])


def test_a_plugin_registers_a_tool_parser_and_config_selects_it():
    class Plugin:
        @hookimpl
        def register_tool_parsers(self, register):
            register("upper", UpperParser)

        @hookimpl
        def register_reasoning_parsers(self, register):
            register("none_at_all", lambda: build_parser("reasoning_parser", "think"))

    with registered(Plugin(), name="t_upper") as registry:
        assert "upper" in registry.names("tool_parser") and "none_at_all" in registry.names("reasoning_parser")
        config = load_config(
            {"backend": "simulated", "rollout": {"tool_parser": "upper", "reasoning_parser": "none_at_all"}},
            validate_plugins=True,
        )
        tool = build_parser("tool_parser", config.rollout.tool_parser)
        parsed = parse_completion("hi\nCALL lookup", tool)
        # ids and type are filled in for a parser that leaves them out
        assert parsed.tool_calls == [
            {"id": "call_0", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        ]
        assert parsed.content == "hi"


def test_a_module_attr_path_works_as_a_parser_name():
    tool = build_parser("tool_parser", "test_parsers:UpperParser")
    assert calls(tool.parse("CALL x")) == [("x", {})]


def test_an_unknown_parser_name_raises_unknown_plugin_error():
    with pytest.raises(UnknownPluginError, match="registered tool_parsers: hermes, llama3_json, tiny"):
        build_parser("tool_parser", "nope")
