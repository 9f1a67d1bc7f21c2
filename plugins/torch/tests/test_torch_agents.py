"""Agents on the torch backend: the tiny chat template with tools, tool calls parsed from sampled
tokens, and token-exact multi-turn (for the tiny template and a Qwen-style Hugging Face template).

Samples are real engine samples from a real tiny model whose next tokens are dictated by the test
(:class:`agent_helpers.ScriptedModel`), so the completions are the ones a trained model would write.
"""

from __future__ import annotations

import asyncio

import pytest
from agent_helpers import ScriptedModel, qwen_like_engine
from torch_test_helpers import VOCAB

pytest.importorskip("torch")

from rllm_core.config import load_config
from rllm_core.rows import build_rows
from rllm_core.testing import ADD_TOOL
from rllm_core.types import Step, Trajectory, TrajectoryGroup

AGENT_VOCAB = [*VOCAB, "add", "a", "b", "so", "ok", "again", "hi", "true"]
ADD = ADD_TOOL
OLD_TINY_TEMPLATE = (  # the template before tools existed: plain conversations must render exactly so
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_backend(**rollout):
    from rllm_torch.backend import TorchBackend

    config = load_config(
        {
            "backend": "torch",
            "torch": {"device": "cpu", "seed": 0, "num_threads": 1, "tiny": {"hidden_size": 32, "vocab": AGENT_VOCAB}},
            "rollout": rollout,
        }
    )
    backend = TorchBackend(config)
    backend.init_rollout_engine()
    return backend


@pytest.fixture(scope="module")
def tiny():
    """A tiny-model backend with the tiny tool parser and the think reasoning parser, sampling scripted."""
    backend = tiny_backend(tool_parser="tiny", reasoning_parser="think")
    scripted = ScriptedModel(backend.runtime.model)
    backend.runtime.model = scripted
    yield backend, scripted
    asyncio.run(backend.shutdown())


def say(backend, scripted, words: str) -> None:
    """The next completion will be these tokens."""
    scripted.script = backend.tokenizer.convert_tokens_to_ids(words.split())


def tokens(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(ids)


def one_trajectory_rows(steps: list[Step]):
    return build_rows(
        [TrajectoryGroup(task_id="t", role="agent", trajectories=[Trajectory(name="agent", steps=steps)])]
    )


def assert_extends(later, earlier) -> None:
    """``later``'s prompt begins exactly with ``earlier``'s prompt + sampled completion."""
    sampled = earlier.prompt_ids + earlier.completion_ids
    assert later.prompt_ids[: len(sampled)] == sampled


# -- the tiny chat template ---------------------------------------------------------------------


@pytest.mark.parametrize("agent_tokens", [False, True])
def test_tiny_template_renders_plain_conversations_exactly_as_before(agent_tokens):
    from rllm_torch.model import build_tiny_tokenizer

    tok = build_tiny_tokenizer(AGENT_VOCAB, agent_tokens=agent_tokens)
    convo = [
        {"role": "system", "content": "hi"},
        {"role": "user", "content": "3+4="},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": ""},
    ]
    for gen in (True, False):
        new = tok.apply_chat_template(convo, add_generation_prompt=gen, tokenize=False)
        old_tok = build_tiny_tokenizer(AGENT_VOCAB, agent_tokens=agent_tokens)
        old_tok.chat_template = OLD_TINY_TEMPLATE
        assert new == old_tok.apply_chat_template(convo, add_generation_prompt=gen, tokenize=False)


def test_agent_tokens_come_after_the_vocabulary_and_only_with_agent_features():
    from rllm_torch.model import AGENT_TOKENS, SPECIAL_TOKENS, build_tiny_tokenizer

    plain, agent = build_tiny_tokenizer(AGENT_VOCAB), build_tiny_tokenizer(AGENT_VOCAB, agent_tokens=True)
    words = [*SPECIAL_TOKENS, *AGENT_VOCAB]
    assert agent.convert_tokens_to_ids(words) == plain.convert_tokens_to_ids(words) == list(range(len(words)))
    assert agent.convert_tokens_to_ids(AGENT_TOKENS) == list(range(len(words), len(words) + len(AGENT_TOKENS)))
    assert len(plain) == len(words)
    # the backend adds them when a parser is configured (or torch.tiny.agent_tokens says so), else not
    assert len(tiny_backend().tokenizer) == len(words)
    backend = tiny_backend(reasoning_parser="think")
    assert len(backend.tokenizer) == len(words) + len(AGENT_TOKENS)
    assert backend.policy.get_input_embeddings().num_embeddings == len(backend.tokenizer)


def test_tiny_template_renders_tools_tool_calls_results_and_reasoning_with_single_tokens(tiny):
    backend, _ = tiny
    tok = backend.tokenizer
    convo = [
        {"role": "user", "content": "3+4="},
        {
            "role": "assistant",
            "content": "ok",
            "reasoning_content": "so",
            "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}
            ],
        },
        {"role": "tool", "content": "7", "tool_call_id": "call_0"},
    ]
    ids = asyncio.run(backend.rollout_engine.encode_messages(convo, tools=[ADD]))
    assert " ".join(tokens(tok, ids)) == (
        "<|tools|> <tool_call> add <arg> a <arg> b </tool_call> <eos> "
        "<|user|> 3 + 4 = <eos> "
        "<|assistant|> <think> so </think> ok <tool_call> add <arg> a 3 <arg> b 4 </tool_call> <eos> "
        "<|tool|> 7 <eos> <|assistant|>"
    )
    assert tok.unk_token_id not in ids


def test_tiny_format_round_trips_from_the_template_to_the_parser(tiny):
    from rllm_core.parsers import build_parser

    backend, _ = tiny
    tok = backend.tokenizer
    calls = [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 14}'}},
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 0, "b": true}'}},
    ]
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "tool_calls": calls}]
    ids = asyncio.run(backend.rollout_engine.encode_messages(convo, add_generation_prompt=False))
    start = ids.index(tok.convert_tokens_to_ids("<|assistant|>")) + 1
    reply = tok.decode(ids[start:-1], skip_special_tokens=False)  # what the model would have sampled, as text
    parsed = build_parser("tool_parser", "tiny").parse(reply)
    assert parsed.tool_calls == calls and parsed.content == "ok" and parsed.errors == []


# -- tool calls from the engine -----------------------------------------------------------------


def test_the_engine_renders_tools_and_returns_the_tool_calls_it_sampled(tiny):
    backend, scripted = tiny
    engine = backend.rollout_engine
    engine.pop_counters()
    say(backend, scripted, "<think> so </think> <tool_call> add <arg> a 3 <arg> b 4 </tool_call> <eos>")
    out = asyncio.run(engine.get_model_response([{"role": "user", "content": "3+4="}], tools=[ADD], max_tokens=20))
    assert tokens(backend.tokenizer, out.prompt_ids)[:9] == [
        "<|tools|>", "<tool_call>", "add", "<arg>", "a", "<arg>", "b", "</tool_call>", "<eos>"
    ]  # fmt: skip
    assert out.tool_calls == [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}
    ]
    assert (out.content, out.reasoning, out.finish_reason) == ("", "so", "tool_calls")
    assert out.text == "<think> so </think> <tool_call> add <arg> a 3 <arg> b 4 </tool_call>"
    assert len(out.logprobs) == len(out.completion_ids) == 13
    assert engine.pop_counters() == {"engine/tool_calls": 1.0}


def test_a_malformed_call_the_engine_sampled_is_reported_and_counted(tiny):
    from rllm_core.testing import simulated_config
    from rllm_core.workflows import WorkflowEngine

    backend, scripted = tiny
    engine = backend.rollout_engine
    engine.pop_counters()

    async def workflow(task, engine):
        messages = [{"role": "user", "content": "3+4="}]
        out = await engine.get_model_response(messages, tools=[ADD], max_tokens=20)
        return Trajectory(steps=[Step.from_model_output(out, messages)])

    say(backend, scripted, "<tool_call> add <arg> a </tool_call> <eos>")  # an argument without a value
    config = simulated_config(None, rollout={"n": 1})
    runner = WorkflowEngine(workflow, config, engine)
    (episode,) = asyncio.run(runner.execute_tasks([{"id": "t"}]))
    step = episode.trajectories[0].steps[0]
    assert step.finish_reason == "malformed_tool_call"
    assert step.model_response == "<tool_call> add <arg> a </tool_call>"  # the raw call, not dropped
    assert runner.pop_counters() == {"engine/tool_calls/malformed": 1.0}


# -- token-exact multi-turn ---------------------------------------------------------------------


def test_tiny_multi_turn_continues_the_sampled_tokens_and_merges_into_one_row(tiny):
    backend, scripted = tiny
    engine, tok = backend.rollout_engine, backend.tokenizer
    engine.pop_counters()

    async def conversation():
        messages = [{"role": "system", "content": "hi"}, {"role": "user", "content": "3+4="}]
        steps, outs = [], []
        # the reply puts content after the call: a re-render would write "ok" first, so only the
        # sampled tokens themselves can make the next prompt extend this one
        script = [
            "<think> so </think> <tool_call> add <arg> a 3 <arg> b 4 </tool_call> ok <eos>",
            "<think> ok </think> 7 <eos>",
            "7 <eos>",
        ]
        follow_ups = [{"role": "tool", "content": "7", "tool_call_id": "call_0"}, {"role": "user", "content": "again"}]
        for k, words in enumerate(script):
            say(backend, scripted, words)
            out = await engine.get_model_response(messages, tools=[ADD], max_tokens=20)
            steps.append(Step.from_model_output(out, messages))
            outs.append(out)
            if k < len(follow_ups):
                messages = [*messages, out.assistant_message(), follow_ups[k]]
        return steps, outs, messages

    steps, outs, messages = asyncio.run(conversation())
    assert [o.finish_reason for o in outs] == ["tool_calls", "stop", "stop"]
    assert (outs[1].reasoning, outs[1].content) == ("ok", "7")
    assert_extends(outs[1], outs[0])
    assert_extends(outs[2], outs[1])
    # the bridge is exactly the rendered new messages, nothing re-rendered
    n0 = len(outs[0].prompt_ids) + len(outs[0].completion_ids)
    assert tokens(tok, outs[1].prompt_ids[n0:]) == ["<|tool|>", "7", "<eos>", "<|assistant|>"]
    n1 = len(outs[1].prompt_ids) + len(outs[1].completion_ids)
    assert tokens(tok, outs[2].prompt_ids[n1:]) == ["<|user|>", "again", "<eos>", "<|assistant|>"]
    # a full re-render would not have extended the sampled tokens
    rerendered = asyncio.run(engine.encode_messages(messages[:4], tools=[ADD]))
    assert rerendered[:n0] != outs[0].prompt_ids + outs[0].completion_ids
    assert engine.pop_counters() == {"engine/tool_calls": 1.0, "engine/multiturn/continued": 2.0}

    rows = one_trajectory_rows(steps)
    assert len(rows) == 1 and rows.metrics["rows/per_trajectory"] == 1.0 and rows.metrics["rows/breaks"] == 0
    assert rows.tokens[0] == outs[2].prompt_ids + outs[2].completion_ids
    mask = rows.loss_mask.tolist()
    expected = [False] * len(rows.tokens[0])
    for out in outs:  # exactly the sampled tokens are trained on
        start = len(out.prompt_ids)
        expected[start : start + len(out.completion_ids)] = [True] * len(out.completion_ids)
    assert mask == expected


def qwen_conversation(engine, scripted, tok, replies, follow_ups, messages, max_tokens=64):
    """Run the turns: each reply is scripted text ending with <|im_end|> unless it is cut."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    async def run():
        steps, outs, msgs = [], [], list(messages)
        for k, reply in enumerate(replies):
            scripted.script = tok(reply, add_special_tokens=False)["input_ids"] + [im_end]
            out = await engine.get_model_response(msgs, tools=[ADD], max_tokens=max_tokens)
            steps.append(Step.from_model_output(out, msgs))
            outs.append(out)
            if k < len(follow_ups):
                msgs = [*msgs, out.assistant_message(), *follow_ups[k]]
        return steps, outs, msgs

    return asyncio.run(run())


QWEN_REPLIES = [
    "<think>\nI should call the tool.\n</think>\n"
    '<tool_call>\n{"name": "add", "arguments": {"a":3,"b":4}}\n</tool_call>',
    "<think>\nThe tool said 7.\n</think>\nThe answer is 7.",
    "2",
]
QWEN_FOLLOW_UPS = [
    [{"role": "tool", "content": "7", "tool_call_id": "call_0"}],
    [{"role": "user", "content": "Thanks! And 1 + 1?"}],
]


def test_qwen_like_multi_turn_continues_the_sampled_tokens_and_merges_into_one_row():
    engine, scripted, tok = qwen_like_engine()
    start = [{"role": "user", "content": "What is 3 + 4?"}]
    steps, outs, messages = qwen_conversation(engine, scripted, tok, QWEN_REPLIES, QWEN_FOLLOW_UPS, start)
    assert outs[0].tool_calls == [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}
    ]
    assert (outs[0].reasoning, outs[0].finish_reason) == ("I should call the tool.", "tool_calls")
    assert (outs[1].reasoning, outs[1].content, outs[2].content) == ("The tool said 7.", "The answer is 7.", "2")
    assert_extends(outs[1], outs[0])
    assert_extends(outs[2], outs[1])
    # the sampled <|im_end|> is kept once, the template's "\n" after it added, then the new turns
    n0 = len(outs[0].prompt_ids) + len(outs[0].completion_ids)
    assert tok.decode(outs[0].completion_ids[-1:]) == "<|im_end|>"
    assert tok.decode(outs[1].prompt_ids[n0:]) == (
        "\n<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    n1 = len(outs[1].prompt_ids) + len(outs[1].completion_ids)
    assert (
        tok.decode(outs[2].prompt_ids[n1:])
        == "\n<|im_start|>user\nThanks! And 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    )
    # Qwen's template re-renders the call as tojson and drops the reasoning: a re-render would not extend
    rerendered = asyncio.run(engine.encode_messages(messages[:3], tools=[ADD]))
    assert rerendered[:n0] != outs[0].prompt_ids + outs[0].completion_ids
    assert engine.pop_counters() == {"engine/tool_calls": 1.0, "engine/multiturn/continued": 2.0}

    rows = one_trajectory_rows(steps)
    assert len(rows) == 1 and rows.metrics["rows/per_trajectory"] == 1.0
    assert rows.tokens[0] == outs[2].prompt_ids + outs[2].completion_ids
    assert rows.num_action_tokens == sum(len(o.completion_ids) for o in outs)


def test_a_turn_cut_by_max_tokens_is_closed_by_the_bridge():
    engine, scripted, tok = qwen_like_engine()
    start = [{"role": "user", "content": "What is 3 + 4?"}]
    replies = ["The answer is 7 and that is all.", "2"]
    follow = [[{"role": "user", "content": "And 1 + 1?"}]]
    # the first reply runs into max_tokens: no <|im_end|> was sampled
    _, outs, _ = qwen_conversation(engine, scripted, tok, replies, follow, start, max_tokens=4)
    assert outs[0].finish_reason == "length" and tok.convert_tokens_to_ids("<|im_end|>") not in outs[0].completion_ids
    assert_extends(outs[1], outs[0])
    n0 = len(outs[0].prompt_ids) + len(outs[0].completion_ids)
    assert (
        tok.decode(outs[1].prompt_ids[n0:])
        == "<|im_end|>\n<|im_start|>user\nAnd 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_workflow_that_appends_the_raw_text_is_continued_too():
    engine, scripted, tok = qwen_like_engine()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    async def run():
        messages = [{"role": "user", "content": "What is 3 + 4?"}]
        scripted.script = tok("<think>\nadd\n</think>\n7", add_special_tokens=False)["input_ids"] + [im_end]
        first = await engine.get_model_response(messages)
        messages = [*messages, {"role": "assistant", "content": first.text}, {"role": "user", "content": "Sure?"}]
        scripted.script = [im_end]
        return first, await engine.get_model_response(messages)

    first, second = asyncio.run(run())
    assert first.content == "7" and first.text != first.content
    assert_extends(second, first)
    assert engine.pop_counters() == {"engine/multiturn/continued": 1.0}


def test_editing_the_history_starts_a_new_row_and_the_break_is_counted():
    engine, scripted, tok = qwen_like_engine()
    start = [{"role": "user", "content": "What is 3 + 4?"}]
    steps, outs, _ = qwen_conversation(engine, scripted, tok, QWEN_REPLIES[:2], QWEN_FOLLOW_UPS[:1], start)
    engine.pop_counters()
    # compaction: the workflow replaces the tool exchange by a summary
    compacted = [
        *start,
        {"role": "assistant", "content": "The tool said 7."},
        {"role": "user", "content": "And 1 + 1?"},
    ]
    _, (third,), _ = qwen_conversation(engine, scripted, tok, ["2"], [], compacted)
    steps.append(Step.from_model_output(third, compacted))
    assert engine.pop_counters() == {"engine/multiturn/rerendered/unknown_history": 1.0}
    assert third.prompt_ids == asyncio.run(engine.encode_messages(compacted, tools=[ADD]))  # rendered in full

    rows = one_trajectory_rows(steps)
    assert len(rows) == 2 and rows.metrics["rows/per_trajectory"] == 2.0
    assert rows.metrics["rows/breaks/not_prefix"] == 1.0
    assert rows.tokens[0] == outs[1].prompt_ids + outs[1].completion_ids
    assert rows.tokens[1] == third.prompt_ids + third.completion_ids


def test_the_turn_cache_is_bounded():
    engine, scripted, tok = qwen_like_engine(multiturn_cache_size=2)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    async def run():
        firsts = []
        for q in ("What is 3 + 4?", "And 1 + 1?", "Thanks!"):
            messages = [{"role": "user", "content": q}]
            scripted.script = [*tok("7", add_special_tokens=False)["input_ids"], im_end]
            firsts.append((messages, await engine.get_model_response(messages)))
        # each reply is stored under its forms (assistant message and raw text: the same key here)
        assert len(engine.turns) == 2
        seconds = []
        for messages, out in (firsts[2], firsts[0]):  # the newest conversation, then the oldest
            scripted.script = [im_end]
            follow = [*messages, out.assistant_message(), {"role": "user", "content": "Sure?"}]
            seconds.append(await engine.get_model_response(follow))
        return firsts, seconds

    firsts, (newest, _oldest) = asyncio.run(run())
    assert len(engine.turns) == 2
    assert_extends(newest, firsts[2][1])
    assert engine.pop_counters() == {
        "engine/multiturn/continued": 1.0,
        "engine/multiturn/rerendered/unknown_history": 1.0,  # the oldest conversation was evicted
    }


def test_a_zero_cache_size_renders_every_request_in_full():
    engine, scripted, tok = qwen_like_engine(multiturn_cache_size=0)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "Hi"}]
    scripted.script = [im_end]
    out = asyncio.run(engine.get_model_response(messages))
    follow = [*messages, out.assistant_message(), {"role": "user", "content": "Sure?"}]
    again = asyncio.run(engine.get_model_response(follow))
    assert again.prompt_ids == asyncio.run(engine.encode_messages(follow))
    assert len(engine.turns) == 0 and engine.pop_counters() == {}


def test_a_message_edited_in_place_is_not_taken_for_the_sampled_history():
    engine, scripted, tok = qwen_like_engine()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    async def run():
        messages = [{"role": "user", "content": "What is 3 + 4?"}]
        scripted.script = [*tok("7", add_special_tokens=False)["input_ids"], im_end]
        first = await engine.get_model_response(messages)
        messages[0]["content"] = "What is 1 + 1?"  # the workflow rewrites its history in place
        follow = [*messages, first.assistant_message(), {"role": "user", "content": "Sure?"}]
        scripted.script = [im_end]
        return follow, await engine.get_model_response(follow)

    follow, second = asyncio.run(run())
    assert engine.pop_counters() == {"engine/multiturn/rerendered/unknown_history": 1.0}
    assert second.prompt_ids == asyncio.run(engine.encode_messages(follow))
