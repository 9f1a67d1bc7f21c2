"""rllm_core.multiturn: the bridge on text renders and on token renders, and the turn cache."""

from __future__ import annotations

import array

import pytest

from rllm_core.multiturn import Sampled, Turn, TurnCache, bridge

USER = {"role": "user", "content": "hi"}
REPLY = {"role": "assistant", "content": "yo"}
TOOL = {"role": "tool", "content": "7"}

# A template in the shape of Qwen's: "<s>" opens a turn, "</s>" closes it, "\n" follows.
TEXT = {"user": "hi", "assistant": "yo", "tool": "7"}


def render_text(messages, generation: bool) -> str:
    out = "".join(f"<s>{m['role']}\n{TEXT[m['role']]}</s>\n" for m in messages)
    return out + ("<s>assistant\n" if generation else "")


IDS = {"<s>": 1, "</s>": 2, "\n": 3, "user": 4, "assistant": 5, "tool": 6, "hi": 7, "yo": 8, "7": 9}


def render_ids(messages, generation: bool) -> list[int]:
    out: list[int] = []
    for m in messages:
        out += [1, IDS[m["role"]], 3, IDS[TEXT[m["role"]]], 2, 3]
    return out + ([1, 5, 3] if generation else [])


@pytest.mark.parametrize(
    ("render", "eos", "sampled", "expected"),
    [
        (render_text, "</s>", "yo</s>", "\n<s>tool\n7</s>\n<s>assistant\n"),
        (render_ids, 2, [8, 2], [3, 1, 6, 3, 9, 2, 3, 1, 5, 3]),
    ],
    ids=["text", "token_ids"],
)
def test_the_bridge_keeps_the_sampled_end_of_turn_once(render, eos, sampled, expected):
    turn = Turn(array.array("i"), eos)
    assert bridge(render, [USER, REPLY, TOOL], 1, turn, [eos]) == expected


@pytest.mark.parametrize(
    ("render", "eos", "expected"),
    [(render_text, "</s>", "</s>\n<s>tool\n7</s>\n<s>assistant\n"), (render_ids, 2, [2, 3, 1, 6, 3, 9, 2, 3, 1, 5, 3])],
    ids=["text", "token_ids"],
)
def test_a_completion_that_did_not_end_its_turn_is_closed_by_the_bridge(render, eos, expected):
    assert bridge(render, [USER, REPLY, TOOL], 1, Turn(array.array("i"), None), [eos]) == expected


def test_a_template_that_rewrites_history_gives_no_bridge():
    def forgetful(messages, generation):  # keeps an assistant turn only while it is the last message
        kept = [m for i, m in enumerate(messages) if m["role"] != "assistant" or i == len(messages) - 1]
        return render_ids(kept, generation)

    assert forgetful([USER, REPLY], False)[-3:] == [8, 2, 3]  # the reply itself renders

    assert bridge(forgetful, [USER, REPLY, TOOL], 1, Turn(array.array("i"), 2), [2]) is None


def test_the_cache_finds_a_reply_in_the_forms_a_workflow_appends_and_forgets_the_oldest():
    cache = TurnCache(max_size=1)

    def sampled(content: str) -> Sampled:
        return Sampled([USER], None, content, content + "!", [], None, [1, 2], [8, 2], 2)

    cache.remember(sampled("yo"))
    assert cache.find([USER, {"role": "assistant", "content": " yo "}], None, 1) is not None  # stripped
    found = cache.find([USER, {"role": "assistant", "content": "yo!"}], None, 1)  # the text form
    assert found is not None and list(found.ids) == [1, 2, 8, 2] and found.ended_with == 2
    assert cache.find([USER, {"role": "assistant", "content": "yo"}], [{"name": "t"}], 1) is None  # other tools
    cache.remember(sampled("hey"))
    assert cache.find([USER, {"role": "assistant", "content": "yo"}], None, 1) is None
    assert len(cache) == 1
