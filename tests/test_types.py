"""The data model: round-trips, validation, and ChatView snapshot semantics."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from rllm_core.types import (
    ChatView,
    Episode,
    ModelOutput,
    Step,
    TerminationReason,
    Trajectory,
    TrajectoryGroup,
)

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | st.text(max_size=10)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": st.text(max_size=30)}
    ),
    max_size=5,
)


@st.composite
def steps(draw) -> Step:
    n = draw(st.integers(0, 6))
    advantage = draw(st.none() | finite | st.lists(finite, min_size=n, max_size=n))
    return Step(
        prompt_ids=draw(st.lists(st.integers(0, 2**31), max_size=8)),
        response_ids=draw(st.lists(st.integers(0, 2**31), min_size=n, max_size=n)),
        logprobs=draw(st.just([]) | st.lists(finite, min_size=n, max_size=n)),
        chat_completions=draw(messages),
        model_response=draw(st.text(max_size=30)),
        reasoning=draw(st.none() | st.text(max_size=10)),
        action=draw(json_scalars),
        observation=draw(json_scalars),
        reward=draw(finite),
        done=draw(st.booleans()),
        info=draw(st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)),
        advantage=advantage,
        weight_version=draw(st.none() | st.integers(0, 1000)),
        finish_reason=draw(st.none() | st.sampled_from(["stop", "length"])),
    )


@st.composite
def episodes(draw) -> Episode:
    trajectories = [
        Trajectory(
            name=draw(st.text(max_size=8)), steps=draw(st.lists(steps(), max_size=3)), reward=draw(st.none() | finite)
        )
        for _ in range(draw(st.integers(0, 2)))
    ]
    return Episode(
        task={"question": draw(st.text(max_size=20))},
        task_id=draw(st.text(max_size=20)),
        rollout_idx=draw(st.integers(0, 64)),
        trajectories=trajectories,
        is_correct=draw(st.booleans()),
        termination_reason=draw(st.sampled_from(list(TerminationReason))),
        metrics={"m": draw(finite)},
    )


@settings(max_examples=60, deadline=None)
@given(step=steps())
def test_step_round_trips_through_dump_and_json(step):
    assert Step.model_validate(step.model_dump()) == step
    assert Step.model_validate_json(step.model_dump_json()) == step
    assert Step.model_validate(json.loads(json.dumps(step.model_dump(mode="json")))) == step


@settings(max_examples=30, deadline=None)
@given(episode=episodes())
def test_episode_round_trips_through_dump_and_json(episode):
    assert Episode.model_validate(episode.model_dump()) == episode
    back = Episode.model_validate_json(episode.model_dump_json())
    assert back == episode
    assert back.task_id == episode.task_id
    assert back.termination_reason is episode.termination_reason


def test_trajectory_round_trip_keeps_reward_none():
    traj = Trajectory(name="judge", steps=[Step(reward=1.5), Step(reward=2.0)])
    back = Trajectory.model_validate_json(traj.model_dump_json())
    assert back.reward is None
    assert back.total_reward == 3.5


def test_logprobs_length_mismatch_is_a_validation_error():
    with pytest.raises(ValidationError, match="logprobs has 2 entries but response_ids has 3"):
        Step(response_ids=[1, 2, 3], logprobs=[-0.1, -0.2])
    with pytest.raises(ValueError, match="logprobs"):
        Step.from_model_output(ModelOutput(completion_ids=[1], logprobs=[-0.1, -0.2]), [])


def test_empty_logprobs_mean_unknown():
    assert Step(response_ids=[1, 2], logprobs=[]).logprobs == []


def test_from_model_output_copies_engine_fields():
    out = ModelOutput(
        text="<think>x</think>4",
        content="4",
        reasoning="x",
        prompt_ids=[5, 6],
        completion_ids=[7, 8],
        logprobs=[-0.5, -0.25],
        finish_reason="stop",
        weight_version=3,
    )
    step = Step.from_model_output(out, [{"role": "user", "content": "2+2?"}], action="4", reward=1.0)
    assert (step.prompt_ids, step.response_ids, step.logprobs) == ([5, 6], [7, 8], [-0.5, -0.25])
    assert (step.model_response, step.reasoning, step.action, step.reward) == ("4", "x", "4", 1.0)
    assert (step.weight_version, step.finish_reason) == (3, "stop")
    assert step.chat_completions == [{"role": "user", "content": "2+2?"}]


@pytest.mark.parametrize("fields", [{}, {"done": True}, {"done": False}, {"done": True, "reward": 1.0}, {"done": 1}])
def test_from_model_output_builds_what_validation_builds(fields):
    out = ModelOutput(text="4", prompt_ids=[5], completion_ids=[7, 8], logprobs=[-0.5, -0.25], finish_reason="stop")
    msgs = [{"role": "user", "content": "2+2?"}]
    step = Step.from_model_output(out, msgs, action="4", **fields)
    checked = Step(
        prompt_ids=[5],
        response_ids=[7, 8],
        logprobs=[-0.5, -0.25],
        chat_completions=msgs,
        model_response="4",
        action="4",
        finish_reason="stop",
        **fields,
    )
    assert step.model_dump() == checked.model_dump()
    assert step.done is bool(fields.get("done"))
    assert ("done" in step.model_fields_set) == bool(fields.get("done"))


# ---------------------------------------------------------------------------------------------
# ChatView


def test_appending_after_the_step_does_not_change_it():
    msgs = [{"role": "user", "content": "hi"}]
    step = Step.from_model_output(ModelOutput(text="hello"), msgs)
    msgs.append({"role": "assistant", "content": "hello"})
    msgs.append({"role": "user", "content": "again"})
    assert len(step.chat_completions) == 1
    assert step.chat_completions.to_list() == [{"role": "user", "content": "hi"}]


def test_mutating_a_message_in_place_does_not_change_the_snapshot():
    msgs = [{"role": "user", "content": "original", "parts": [{"type": "text", "text": "a"}]}]
    step = Step.from_model_output(ModelOutput(), msgs)
    msgs[0]["content"] = "changed"
    msgs[0]["parts"][0]["text"] = "b"
    msgs[0]["parts"].append({"type": "text", "text": "c"})
    assert step.chat_completions.to_list() == [
        {"role": "user", "content": "original", "parts": [{"type": "text", "text": "a"}]}
    ]


def test_snapshot_messages_are_read_only():
    view = ChatView.snapshot([{"role": "user", "content": "x"}])
    with pytest.raises(TypeError):
        view[0]["content"] = "y"  # type: ignore[index]
    with pytest.raises(TypeError):
        view[0] = {}  # type: ignore[index]


def test_consecutive_snapshots_share_one_linear_buffer():
    msgs: list[dict] = [{"role": "system", "content": "s" * 200}]
    views = []
    for turn in range(200):
        msgs.append({"role": "user", "content": f"{turn}" * 200})
        views.append(Step.from_model_output(ModelOutput(), msgs).chat_completions)
        msgs.append({"role": "assistant", "content": "a" * 200})
    buffers = {id(v._conv) for v in views}
    assert len(buffers) == 1  # one shared store, not 200 copies
    store = views[0]._conv
    # every message stored once: 1 system + 200 user (the last assistant reply came after the last snapshot)
    assert len(store.frozen) == 1 + 200 + 199
    assert [len(v) for v in views] == [2 + 2 * t for t in range(200)]
    assert views[10][-1]["content"] == "10" * 200
    assert views[10].to_list() == msgs[: len(views[10])]


def test_two_conversations_do_not_share_storage():
    a = [{"role": "user", "content": "a"}]
    b = [{"role": "user", "content": "b"}]
    va, vb = ChatView.snapshot(a), ChatView.snapshot(b)
    assert va._conv is not vb._conv
    assert va.to_list() != vb.to_list()


def test_a_rewritten_history_starts_a_new_buffer():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    first = ChatView.snapshot(msgs)
    msgs[1] = {"role": "assistant", "content": "replaced"}
    second = ChatView.snapshot(msgs)
    assert first.to_list()[1]["content"] == "b"
    assert second.to_list()[1]["content"] == "replaced"


def test_chat_view_serialises_to_plain_list_of_dicts():
    msgs = [{"role": "user", "content": "x", "tool_calls": [{"id": "1", "args": {"k": 1}}]}]
    step = Step.from_model_output(ModelOutput(), msgs)
    dumped = step.model_dump()["chat_completions"]
    assert type(dumped) is list
    assert type(dumped[0]) is dict and type(dumped[0]["tool_calls"]) is list
    assert type(dumped[0]["tool_calls"][0]["args"]) is dict
    assert dumped == msgs
    assert json.loads(step.model_dump_json())["chat_completions"] == msgs


def test_chat_view_rejects_non_dict_messages():
    with pytest.raises(ValidationError, match="message 1 must be a dict"):
        Step(chat_completions=[{"role": "user", "content": "x"}, "oops"])


def test_chat_view_sequence_behaviour():
    view = ChatView.snapshot([{"role": "user", "content": str(i)} for i in range(5)])
    assert len(view) == 5
    assert view[-1]["content"] == "4"
    assert [m["content"] for m in view[1:3]] == ["1", "2"]
    with pytest.raises(IndexError):
        view[5]
    assert view == [{"role": "user", "content": str(i)} for i in range(5)]
    assert ChatView.snapshot(None) == []


# ---------------------------------------------------------------------------------------------
# Ids


@pytest.mark.parametrize("task_id", ["a:b:c", "id with spaces", "#1", "ünïcødé/∂", "", "a#0", "\n\t"])
def test_task_ids_with_any_character_survive(task_id):
    ep = Episode(task_id=task_id, rollout_idx=3, trajectories=[Trajectory(name="r:1")])
    back = Episode.model_validate_json(ep.model_dump_json())
    assert back.task_id == task_id
    assert back.rollout_idx == 3
    assert back.id == f"{task_id}#3"


def test_trajectory_group_dump_leaves_out_episodes():
    group = TrajectoryGroup(task_id="t", role="solver", trajectories=[Trajectory()], episodes=[Episode()])
    assert "episodes" not in group.model_dump()
    assert group.group_id == ("t", "solver")


def test_from_model_output_fast_path_equals_the_validated_step():
    out = ModelOutput(text="t", content="c", prompt_ids=[1, 2], completion_ids=[3, 4], logprobs=[-0.1, -0.2])
    msgs = [{"role": "user", "content": "q"}]
    fast = Step.from_model_output(out, msgs, action="a")
    full = Step(
        prompt_ids=[1, 2],
        response_ids=[3, 4],
        logprobs=[-0.1, -0.2],
        chat_completions=msgs,
        model_response="c",
        action="a",
        finish_reason=None,
    )
    assert fast.model_dump() == full.model_dump()
    assert set(Step.model_fields) == set(fast.__dict__)
    assert Step.model_validate_json(fast.model_dump_json()).model_dump() == fast.model_dump()
    fast.reward = 1.0
    assert fast.model_dump()["reward"] == 1.0


def test_from_model_output_rejects_mismatched_logprobs():
    out = ModelOutput(completion_ids=[3, 4], logprobs=[-0.1])
    with pytest.raises(ValueError, match="logprobs has 1 entries but response_ids has 2"):
        Step.from_model_output(out, [])
