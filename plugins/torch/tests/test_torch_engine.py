"""The sampler: tokenizer and chat template, dynamic batching, stop/max_tokens, logprob agreement."""

from __future__ import annotations

import asyncio
import threading

import pytest
from torch_test_helpers import VOCAB, backend

pytest.importorskip("torch")

MSG = [{"role": "user", "content": "3+4="}]


@pytest.fixture(scope="module")
def be():
    b = backend()
    yield b
    asyncio.run(b.shutdown())


def test_tiny_tokenizer_chat_template_round_trip():
    from rllm_torch.model import build_tiny_tokenizer

    tok = build_tiny_tokenizer(VOCAB)
    text = tok.apply_chat_template(MSG, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<|user|>", "3", "+", "4", "=", "<eos>", "<|assistant|>"]
    assert tok.decode(ids, skip_special_tokens=True) == "3 + 4 ="
    # numbers of the vocabulary are single tokens; unknown words map to <unk>
    assert tok("13 99", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("13"), tok.unk_token_id]


def test_encode_messages_uses_the_chat_template(be):
    ids = asyncio.run(be.rollout_engine.encode_messages(MSG))
    assert ids[-1] == be.tokenizer.convert_tokens_to_ids("<|assistant|>")
    no_prompt = asyncio.run(be.rollout_engine.encode_messages(MSG, add_generation_prompt=False))
    assert no_prompt == ids[:-1]


def test_concurrent_requests_are_generated_in_one_batch(be):
    engine = be.rollout_engine
    engine.window_s = 0.05
    before = len(be.runtime.batch_sizes)

    async def many():
        return await asyncio.gather(*[engine.get_model_response(MSG, max_tokens=3) for _ in range(24)])

    outs = asyncio.run(many())
    assert be.runtime.batch_sizes[before:] == [24]
    assert all(o.prompt_ids == outs[0].prompt_ids for o in outs)
    assert all(len(o.logprobs) == len(o.completion_ids) for o in outs)


def test_max_tokens_truncates_with_finish_reason_length(be):
    eos = be.tokenizer.eos_token_id

    async def run():
        return await asyncio.gather(*[be.rollout_engine.get_model_response(MSG, max_tokens=4) for _ in range(40)])

    for out in asyncio.run(run()):
        assert 1 <= len(out.completion_ids) <= 4
        if out.finish_reason == "length":
            assert len(out.completion_ids) == 4 and out.completion_ids[-1] != eos
        else:
            assert out.finish_reason == "stop" and out.completion_ids[-1] == eos


def test_stop_string_and_stop_token_end_generation(be):
    engine = be.rollout_engine
    first = asyncio.run(engine.get_model_response(MSG, max_tokens=1, temperature=0.0))
    word = be.tokenizer.decode(first.completion_ids)
    # greedy decoding is deterministic: the same first token again, now a stop string
    out = asyncio.run(engine.get_model_response(MSG, max_tokens=5, temperature=0.0, stop=[word]))
    assert out.finish_reason == "stop" and out.completion_ids == first.completion_ids and out.text == ""
    out = asyncio.run(
        engine.get_model_response(MSG, max_tokens=5, temperature=0.0, stop_token_ids=first.completion_ids)
    )
    assert out.finish_reason == "stop" and len(out.completion_ids) == 1


def test_unknown_sampling_parameter_is_named(be):
    with pytest.raises(ValueError, match="temprature"):
        asyncio.run(be.rollout_engine.get_model_response(MSG, temprature=0.5))


def test_top_k_one_is_greedy(be):
    engine = be.rollout_engine
    greedy = asyncio.run(engine.get_model_response(MSG, max_tokens=4, temperature=0.0))
    for _ in range(3):
        out = asyncio.run(engine.get_model_response(MSG, max_tokens=4, temperature=1.5, top_k=1))
        assert out.completion_ids == greedy.completion_ids


def test_sampler_logprobs_match_recomputed_logprobs(be):
    """Tolerance 1e-4 (float32): the sampler's incremental KV-cache pass vs one full teacher-forced pass."""
    engine = be.rollout_engine

    async def run():
        outs = await asyncio.gather(
            *[engine.get_model_response([{"role": "user", "content": f"{a}+{a}="}], max_tokens=6) for a in range(10)]
        )
        rescored = [await engine.compute_logprobs(o.prompt_ids, o.completion_ids) for o in outs]
        return outs, rescored

    outs, rescored = asyncio.run(run())
    diffs = [abs(a - b) for o, r in zip(outs, rescored, strict=False) for a, b in zip(o.logprobs, r, strict=False)]
    assert len(diffs) >= 10 and max(diffs) < 1e-4
    assert all(lp <= 0 for o in outs for lp in o.logprobs)


def test_reference_logprobs_follow_refresh(be):
    engine = be.rollout_engine
    out = asyncio.run(engine.get_model_response(MSG, max_tokens=3))
    asyncio.run(engine.refresh_reference())
    ref = asyncio.run(engine.compute_logprobs(out.prompt_ids, out.completion_ids, model="reference"))
    pol = asyncio.run(engine.compute_logprobs(out.prompt_ids, out.completion_ids, model="policy"))
    assert ref == pytest.approx(pol, abs=1e-6)
    with pytest.raises(ValueError, match="model must be"):
        asyncio.run(engine.compute_logprobs(out.prompt_ids, out.completion_ids, model="teacher"))


def test_shared_prompt_scoring_matches_full_sequences(be):
    """Prompts of different lengths (left padding in the shared pass), each repeated, vs one pass per row."""
    import random

    from rllm_torch.sampling import score

    rng = random.Random(0)
    prompts = [[rng.randrange(6, 27) for _ in range(n)] for n in (2, 5, 9)]
    rows = [(rng.choice(prompts), [rng.randrange(6, 27) for _ in range(rng.randint(1, 5))]) for _ in range(24)]
    shared = score(be.policy, rows, pad_id=be.tokenizer.pad_token_id)
    plain = score(be.policy, rows, pad_id=be.tokenizer.pad_token_id, share_prompts=False)
    assert [len(s) for s in shared] == [len(r) for _, r in rows]
    diffs = [abs(a - b) for s, p in zip(shared, plain, strict=True) for a, b in zip(s, p, strict=True)]
    assert max(diffs) < 1e-5


def test_chat_template_and_decode_run_off_the_event_loop_and_prompts_stay_cached(be, monkeypatch):
    tok = be.tokenizer
    calls = []

    def recording(name):
        original = getattr(tok, name)

        def call(*args, **kwargs):
            calls.append((name, threading.current_thread()))
            return original(*args, **kwargs)

        return call

    for name in ("apply_chat_template", "decode"):
        monkeypatch.setattr(tok, name, recording(name))
    prompt = [{"role": "user", "content": "5+6="}]  # not used by another test: not cached yet

    async def run():
        loop_thread = threading.current_thread()
        first = await be.rollout_engine.get_model_response(prompt, max_tokens=3)
        outs = await asyncio.gather(*[be.rollout_engine.get_model_response(prompt, max_tokens=3) for _ in range(8)])
        return loop_thread, first, outs

    loop_thread, first, outs = asyncio.run(run())
    assert all(o.prompt_ids == first.prompt_ids for o in outs)
    assert {name for name, _ in calls} == {"apply_chat_template", "decode"}
    assert all(thread is not loop_thread for _, thread in calls)
    assert [name for name, _ in calls].count("apply_chat_template") == 1  # the other 8 prompts were cache hits


def test_a_batch_runs_its_rows_in_call_order_whatever_order_the_prompts_were_encoded_in(monkeypatch):
    """Which random numbers a row draws must not depend on which encoding came back first."""
    prompts = [[{"role": "user", "content": f"{a}+{a}="}] for a in range(6)]

    def sample(delay_first: bool):
        b = backend(**{"torch.gen_batch_window_ms": 300})
        engine = b.rollout_engine
        encode = engine.encode_messages

        async def slow_first(messages, *args, **kwargs):
            if delay_first and messages == prompts[0]:
                await asyncio.sleep(0.1)  # the first call's prompt arrives last
            return await encode(messages, *args, **kwargs)

        monkeypatch.setattr(engine, "encode_messages", slow_first)

        async def run():
            return await asyncio.gather(*[engine.get_model_response(p, max_tokens=3) for p in prompts])

        outs = asyncio.run(run())
        assert b.runtime.batch_sizes == [len(prompts)]
        asyncio.run(b.shutdown())
        return [o.completion_ids for o in outs]

    assert sample(delay_first=True) == sample(delay_first=False)
