"""The sampler: tokenizer and chat template, dynamic batching, stop/max_tokens, logprob agreement."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
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


@pytest.mark.parametrize("temperature", [0.0, 0.5, 2.0])
def test_each_output_reports_the_temperature_of_its_logprobs(be, temperature):
    """What a row is trained at: the call's temperature, and 1.0 for a greedy call (whose logprobs are
    those of the untempered distribution, as compute_logprobs gives them)."""
    engine = be.rollout_engine
    out = asyncio.run(engine.get_model_response(MSG, max_tokens=4, temperature=temperature))
    assert out.temperature == (temperature or 1.0)
    if temperature == 0.0:
        again = asyncio.run(engine.compute_logprobs(out.prompt_ids, out.completion_ids))
        assert max(abs(a - b) for a, b in zip(out.logprobs, again, strict=True)) < 1e-4


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


def test_identical_rows_run_once_and_get_the_gradient_of_every_copy(be):
    """A group's repeated answers: each distinct row is fed once, every copy gets its logits, and the
    gradient through the gather is the sum over the copies, as in one pass per row."""
    import random

    import torch
    from rllm_torch.sampling import response_logits, token_logprobs

    rng = random.Random(2)
    prompts = [[rng.randrange(6, 27) for _ in range(n)] for n in (3, 6)]
    answers = [[rng.randrange(6, 27) for _ in range(rng.randint(1, 4))] for _ in range(5)]
    rows = [(rng.choice(prompts), list(rng.choice(answers))) for _ in range(30)]
    distinct = {(tuple(p), tuple(r)) for p, r in rows}
    assert len(distinct) < len(rows)
    weights = torch.tensor([rng.uniform(-1, 1) for _, r in rows for _ in r])
    model, pad = be.policy, be.tokenizer.pad_token_id

    fed: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[0]), with_kwargs=True)
    grads = {}
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        fed.clear()
        logits, targets = response_logits(model, rows, pad_id=pad, share_prompts=share, share_rows=share)
        assert targets.tolist() == [t for _, r in rows for t in r]
        (token_logprobs(logits, targets) * weights).sum().backward()
        grads[share] = ({n: p.grad.clone() for n, p in model.named_parameters()}, logits.detach(), list(fed))
    hook.remove()
    model.zero_grad(set_to_none=True)
    (g_shared, l_shared, fed_shared), (g_plain, l_plain, fed_plain) = grads[True], grads[False]
    torch.testing.assert_close(l_shared, l_plain, atol=1e-5, rtol=1e-5)
    for name, g in g_plain.items():
        torch.testing.assert_close(g_shared[name], g, atol=1e-6, rtol=1e-4)
    assert fed_plain == [len(rows)]
    assert fed_shared == [len({p for p, _ in distinct}), len(distinct)]  # distinct prompts, then distinct rows


def test_rows_that_finish_leave_the_decoding_batch_and_the_rest_decode_as_if_alone(be):
    """Budgets 1-6 and a stop token: later forwards see only the rows still decoding, and every row's
    tokens and logprobs are those it gets when generated alone (greedy)."""
    import random

    from rllm_torch.sampling import GenParams, generate

    rng = random.Random(1)
    model, pad = be.policy, be.tokenizer.pad_token_id
    eos = {be.tokenizer.eos_token_id}
    prompts = [[rng.randrange(6, 18) for _ in range(rng.randint(2, 7))] for _ in range(12)]
    greedy = GenParams(max_tokens=6, temperature=0.0)
    alone = [generate(model, [p], [greedy], pad_id=pad, eos_ids=eos)[0] for p in prompts]
    stop_on = alone[0].completion_ids[1]  # row 0's second token: a stop token for rows 0-3
    params = [
        GenParams(max_tokens=1 + i % 6, temperature=0.0, stop_token_ids=[stop_on] if i < 4 else [])
        for i in range(len(prompts))
    ]
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        batched = generate(model, prompts, params, pad_id=pad, eos_ids=eos)
    finally:
        hook.remove()
    for i, (got, ref) in enumerate(zip(batched, alone, strict=True)):
        ids = ref.completion_ids[: params[i].max_tokens]
        if i < 4 and stop_on in ids:
            ids = ids[: ids.index(stop_on) + 1]
        assert got.completion_ids == ids, i
        assert got.logprobs == pytest.approx(ref.logprobs[: len(ids)], abs=1e-5)
    assert sizes[0] == len(prompts)  # the prompt pass
    assert sizes[1:] == sorted(sizes[1:], reverse=True) and sizes[-1] < sizes[1] < len(prompts)
    # sampled rows with their own seeds: the same tokens in the shrinking batch as alone
    seeded = [GenParams(max_tokens=1 + i % 6, temperature=1.0, seed=i) for i in range(len(prompts))]
    alone = [generate(model, [p], [q], pad_id=pad, eos_ids=eos)[0] for p, q in zip(prompts, seeded, strict=True)]
    batched = generate(model, prompts, seeded, pad_id=pad, eos_ids=eos)
    assert [r.completion_ids for r in batched] == [r.completion_ids for r in alone]


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


def _sample_calls(prompts, max_tokens=4, sampler_seed=None, **settings):
    """Completions and logprobs of one concurrent call per prompt, and the sampler's batch sizes."""
    b = backend(**settings)
    if sampler_seed is not None:
        b.runtime.seed = sampler_seed

    async def run():
        return await asyncio.gather(*[b.rollout_engine.get_model_response(p, max_tokens=max_tokens) for p in prompts])

    outs = asyncio.run(run())
    sizes = list(b.runtime.batch_sizes)
    asyncio.run(b.shutdown())
    return [o.completion_ids for o in outs], [o.logprobs for o in outs], sizes


def test_what_a_run_samples_does_not_depend_on_how_its_requests_were_batched():
    """Each call draws from its own seed (the run's seed, the call's place in call order)."""
    prompts = [[{"role": "user", "content": f"{a}+{a}="}] for a in range(8)] * 2
    together, lp_together, sizes_together = _sample_calls(prompts, **{"torch.gen_batch_window_ms": 300})
    alone, lp_alone, sizes_alone = _sample_calls(prompts, **{"torch.gen_max_batch": 1})
    assert sizes_together == [16] and sizes_alone == [1] * 16
    assert alone == together
    for a, b in zip(lp_alone, lp_together, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert together[:8] != together[8:]  # the same prompt twice: two different calls, two draws
    other_seed, _, _ = _sample_calls(prompts, sampler_seed=5, **{"torch.gen_batch_window_ms": 300})
    assert other_seed != together  # same weights, another run seed


def test_a_request_seed_gives_the_same_completion_in_any_batch(be):
    engine = be.rollout_engine

    async def run():
        alone = await engine.get_model_response(MSG, max_tokens=8, seed=7)
        crowd = await asyncio.gather(
            *[engine.get_model_response(MSG, max_tokens=8) for _ in range(5)],
            engine.get_model_response(MSG, max_tokens=8, seed=7),
            *[engine.get_model_response(MSG, max_tokens=8, seed=s) for s in range(8, 14)],
        )
        return alone, crowd

    alone, crowd = asyncio.run(run())
    assert crowd[5].completion_ids == alone.completion_ids
    assert crowd[5].logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    assert len({tuple(o.completion_ids) for o in crowd[6:]}) > 1  # other seeds, other draws


def test_rows_are_drawn_from_their_tempered_truncated_distribution():
    import torch
    from rllm_torch.sampling import _sample, _uniforms

    n = 40_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0]).repeat(n, 1)
    u = torch.from_numpy(_uniforms(np.arange(n, dtype=np.uint64) * np.uint64(7919), 0))

    def freq(temp=1.0, top_k=0, top_p=1.0):
        tokens = _sample(
            logits, torch.full((n,), temp), torch.full((n,), top_k), torch.full((n,), top_p, dtype=torch.float32), u
        )
        return torch.bincount(tokens, minlength=6).double() / n

    def target(probs):
        return torch.tensor(probs, dtype=torch.float64)

    p = torch.softmax(logits[0].double(), -1)
    torch.testing.assert_close(freq(), p, atol=0.01, rtol=0)
    p_hot = torch.softmax(logits[0].double() / 2.0, -1)
    torch.testing.assert_close(freq(temp=2.0), p_hot, atol=0.01, rtol=0)
    top2 = p[:2] / p[:2].sum()
    torch.testing.assert_close(freq(top_k=2), target([*top2.tolist(), 0, 0, 0, 0]), atol=0.01, rtol=0)
    # top_p 0.8: the two likeliest tokens hold 0.77 of the mass, so the third is kept as well
    top3 = p[:3] / p[:3].sum()
    torch.testing.assert_close(freq(top_p=0.8), target([*top3.tolist(), 0, 0, 0]), atol=0.01, rtol=0)
    assert freq(temp=0.0).tolist() == [1.0, 0, 0, 0, 0, 0]
    broken = logits[:4].clone()
    broken[2, 1] = float("nan")
    with pytest.raises(RuntimeError, match=r"NaN in batch rows \[2\]"):
        _sample(broken, torch.ones(4), torch.zeros(4, dtype=torch.long), torch.ones(4), u[:4])


def _splitmix64_reference(state: int, n: int) -> list[int]:
    """SplitMix64 as Vigna wrote it, on Python ints: the first ``n`` outputs from ``state``."""
    mask, out = (1 << 64) - 1, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def test_seed_keys_and_uniforms_are_splitmix64_bit_for_bit():
    """Every run's stream is built from these: a changed bit changes what every run samples."""
    from rllm_torch.sampling import _uniforms, mix_seed

    first = _splitmix64_reference(0, 4)
    assert first[:2] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]  # the published test vector
    assert mix_seed(0) == first[0]
    # chained parts: each part is added to the last output, which is then mixed again
    assert mix_seed(7, 123456) == _splitmix64_reference((_splitmix64_reference(7, 1)[0] + 123456), 1)[0]
    assert mix_seed(-1) == _splitmix64_reference((1 << 64) - 1, 1)[0]  # parts are taken mod 2**64
    # the run-seed keys of seed 3 (pinned: a run's whole stream hangs on them)
    assert [mix_seed(3, i) for i in range(3)] == [0xBCCDFD9C96A18897, 0xBCA402F674DDD08D, 0x2371C8A9B8068EBA]
    keys = np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64)
    for step in (0, 1, 41):
        want = [_splitmix64_reference((int(k) + step * 0x9E3779B97F4A7C15) % 2**64, 1)[0] >> 11 for k in keys]
        assert (_uniforms(keys, step) * 2.0**53).astype(np.uint64).tolist() == want
