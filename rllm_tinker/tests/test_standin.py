"""The in-process Tinker stand-in (``rllm_tinker.testing``): SDK types, sampling, losses, AdamW, checkpoints,
and the service's failure modes. Expected values are computed here from the documented formulas on the
stand-in's own torch module, never with the stand-in's helpers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import pickle

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("peft", reason="the stand-in's LoRA needs peft (pip install 'rllm-tinker[test]')")
pytest.importorskip("rllm_torch", reason="the stand-in's model comes from rllm-torch (pip install 'rllm-tinker[test]')")

import numpy as np
import tinker
import torch
from rllm_tinker.testing import (
    DEFAULT_BASE_MODEL,
    TOOLS_BASE_MODEL,
    LocalRestClient,
    LocalTinker,
    local_service_client,
    shared_local_tinker,
)
from tinker import types
from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture

BASE = DEFAULT_BASE_MODEL


@pytest.fixture
def service(tmp_path):
    local = LocalTinker(tmp_path, context_window=64, max_train_length=48)
    yield local
    local.close()


@pytest.fixture
def client(service):
    return service.service_client()


def _trainer(client, **kw):
    return client.create_lora_training_client(BASE, rank=4, **kw).result()


def _tokens(service, text: str = "3 + 4 = 7 + 1 = 8") -> list[int]:
    return service.tokenizer(BASE).encode(text, add_special_tokens=False)


def _datum(tokens: list[int], **inputs) -> types.Datum:
    """Next-token alignment: the model sees tokens[:-1] and is scored on tokens[1:]."""
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], **inputs},
    )


def _hand_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].double()


def _hand_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | tokens[:i]) for i >= 1, straight from the torch module."""
    logits = _hand_logits(model, tokens[:-1])
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None]).squeeze(-1)


def _grads(tc) -> dict[str, torch.Tensor | None]:
    return {
        n: (p.grad.clone() if p.grad is not None else None) for n, p in tc.model.named_parameters() if p.requires_grad
    }


# -- SDK types and futures -------------------------------------------------------------------------


def test_clients_and_futures_are_the_sdk_types(service, client):
    assert isinstance(client, tinker.ServiceClient)
    created = client.create_lora_training_client(BASE, rank=4)
    assert isinstance(created, tinker.BackcompatTrainingClientFuture)
    assert isinstance(created, tinker.APIFuture)
    tc = created.result()
    assert isinstance(tc, tinker.TrainingClient)
    fb = tc.forward_backward([_datum(_tokens(service))], "cross_entropy")
    assert isinstance(fb, AwaitableConcurrentFuture)
    snap = tc.save_weights_and_get_sampling_client()
    assert isinstance(snap, tinker.BackcompatSamplingClientFuture)
    sampler = snap.result()
    assert isinstance(sampler, tinker.SamplingClient)
    sampled = sampler.sample(types.ModelInput.from_ints(_tokens(service)), 1, types.SamplingParams(max_tokens=2))
    assert isinstance(sampled, tinker.APIFuture)
    assert isinstance(sampled, concurrent.futures.Future)  # the SDK's dual future
    assert isinstance(sampled.result(), types.SampleResponse)
    assert isinstance(service.rest_client(), tinker.RestClient)
    assert isinstance(fb.result(), types.ForwardBackwardOutput)


def test_futures_are_awaitable_from_an_event_loop(service, client):
    tokens = _tokens(service)

    async def run():
        tc = await client.create_lora_training_client(BASE, rank=4)
        out = await tc.forward_backward([_datum(tokens)], "cross_entropy")
        sampler = await tc.save_weights_and_get_sampling_client()
        response = await sampler.sample(types.ModelInput.from_ints(tokens), 2, types.SamplingParams(max_tokens=3))
        logprobs = await sampler.compute_logprobs(types.ModelInput.from_ints(tokens))
        return out, response, logprobs

    out, response, logprobs = asyncio.run(run())
    assert math.isfinite(out.metrics["loss:sum"])
    assert len(response.sequences) == 2
    assert len(logprobs) == len(tokens)


def test_training_run_ids_and_info_follow_the_sdk(service, client):
    tc = _trainer(client)
    info = tc.get_info()
    assert info.model_id == tc.model_id
    assert (info.model_data.model_name, info.is_lora, info.lora_rank) == (BASE, True, 4)
    path = tc.save_state("step-1").result().path
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(path)
    assert (parsed.training_run_id, parsed.checkpoint_type) == (tc.model_id, "training")
    with pytest.warns(FutureWarning):  # the SDK's deprecated path, inherited as is
        rest = client.create_rest_client()
    assert isinstance(rest, LocalRestClient)
    models = rest.get_server_capabilities().result().supported_models
    assert [(m.model_name, m.max_context_length) for m in models] == [(BASE, 64), (TOOLS_BASE_MODEL, 64)]


def test_chat_markers_are_single_tokens_and_the_qwen3_renderer_works(service):
    from tinker_cookbook import renderers

    tok = service.tokenizer(BASE)
    for marker in ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]:
        assert len(tok.encode(marker, add_special_tokens=False)) == 1, marker
    assert tok.eos_token == "<|im_end|>"
    renderer = renderers.get_renderer("qwen3_instruct", tok)
    prompt = renderer.build_generation_prompt([{"role": "user", "content": "3 + 4 ="}])
    assert tok.decode(prompt.to_ints()).startswith("<|im_start|> user 3 + 4 =")
    assert renderer.get_stop_sequences() == [tok.eos_token_id]
    message, _ = renderer.parse_response([*tok.encode("7", add_special_tokens=False), tok.eos_token_id])
    assert message["content"] == "7"


def test_the_tools_model_tokenizer_round_trips_any_text_with_single_token_markers(service):
    tok = service.tokenizer(TOOLS_BASE_MODEL)
    markers = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]
    for marker in [*markers, "<tool_response>", "</tool_response>"]:
        assert len(tok.encode(marker, add_special_tokens=False)) == 1, marker
    assert len(tok) == 256 + 9  # one token per byte, plus the markers
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for text in ['{"name": "add", "arguments": {"a": 3}}\n', "  héllo\t→ wörld  ", "<tool_call>\n{}\n</tool_call>"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    plain = "x" + "ä" * 3  # bytes, not characters: "ä" is two
    assert len(tok.encode(plain, add_special_tokens=False)) == 1 + 2 * 3
    # the renderer writes content with split_special_tokens: a marker typed in text is its bytes
    assert len(tok.encode("<|im_end|>", add_special_tokens=False, split_special_tokens=True)) == len("<|im_end|>")


# -- sampling --------------------------------------------------------------------------------------


def test_sample_without_stops_runs_to_max_tokens(service, client):
    sampler = client.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints(_tokens(service))
    response = sampler.sample(prompt, 3, types.SamplingParams(max_tokens=5, stop=[])).result()
    assert [len(s.tokens) for s in response.sequences] == [5, 5, 5]
    assert [s.stop_reason for s in response.sequences] == ["length"] * 3
    assert all(len(s.logprobs) == 5 for s in response.sequences)


def test_sample_stops_at_stop_tokens_and_stop_strings(service, client):
    sampler = client.create_sampling_client(base_model=BASE).result()
    tok = service.tokenizer(BASE)
    prompt = types.ModelInput.from_ints(_tokens(service))
    every_id = list(range(len(tok)))
    every_text = [tok.decode([i]) for i in every_id]
    for stop in (every_id, every_text):  # whatever comes first is a stop
        response = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=6, stop=stop)).result()
        assert [(len(s.tokens), s.stop_reason) for s in response.sequences] == [(1, "stop"), (1, "stop")]


def test_temperature_zero_picks_the_most_likely_token(service, client):
    sampler = client.create_sampling_client(base_model=BASE).result()
    tokens = _tokens(service)
    response = sampler.sample(types.ModelInput.from_ints(tokens), 1, types.SamplingParams(max_tokens=1, temperature=0))
    assert response.result().sequences[0].tokens == [int(_hand_logits(sampler.model, tokens)[-1].argmax())]


def test_seeded_samples_repeat_whatever_else_is_in_the_batch(service, client):
    sampler = client.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints(_tokens(service))
    params = types.SamplingParams(max_tokens=8, stop=[], seed=7)
    alone = [s.tokens for s in sampler.sample(prompt, 2, params).result().sequences]

    async def crowded():
        others = [sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, stop=[])) for _ in range(10)]
        mine = sampler.sample(prompt, 2, params)
        await asyncio.gather(*others)
        return await mine

    assert [s.tokens for s in asyncio.run(crowded()).sequences] == alone
    other_seed = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=8, stop=[], seed=8)).result()
    assert [s.tokens for s in other_seed.sequences] != alone


def test_sampled_logprobs_are_untempered_and_top_k_is_respected(service, client):
    sampler = client.create_sampling_client(base_model=BASE).result()
    tokens = _tokens(service)
    params = types.SamplingParams(max_tokens=6, stop=[], temperature=0.5, top_k=3, seed=1)
    seq = sampler.sample(types.ModelInput.from_ints(tokens), 1, params).result().sequences[0]
    logits = _hand_logits(sampler.model, tokens + seq.tokens[:-1])[len(tokens) - 1 :]
    chosen = torch.tensor(seq.tokens)[:, None]
    raw = torch.log_softmax(logits, -1).gather(-1, chosen).squeeze(-1)
    tempered = torch.log_softmax(logits / 0.5, -1).gather(-1, chosen).squeeze(-1)
    np.testing.assert_allclose(seq.logprobs, raw.numpy(), atol=1e-4)
    assert not np.allclose(seq.logprobs, tempered.numpy(), atol=1e-3)
    top3 = logits.topk(3, dim=-1).indices
    assert all(t in top3[i].tolist() for i, t in enumerate(seq.tokens))


def test_compute_logprobs_matches_the_model(service, client):
    sampler = client.create_sampling_client(base_model=BASE).result()
    tokens = _tokens(service)
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert len(logprobs) == len(tokens) and logprobs[0] is None
    np.testing.assert_allclose(logprobs[1:], _hand_logprobs(sampler.model, tokens).numpy(), atol=1e-5)
    last = sampler.compute_logprobs(types.ModelInput.from_ints(tokens), prompt_logprobs_last_n=2).result()
    assert last[:-2] == [None] * (len(tokens) - 2)
    np.testing.assert_allclose(last[-2:], logprobs[-2:], atol=1e-6)


def test_prompt_plus_max_tokens_over_the_context_window_is_a_bad_request(service, client):
    sampler = client.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints(_tokens(service, " ".join(["1"] * 60)))
    assert len(sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, stop=[])).result().sequences[0].tokens) == 4
    with pytest.raises(
        tinker.BadRequestError, match="Prompt length plus max_tokens exceeds the model's context window"
    ):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=5)).result()


def test_concurrent_sample_requests_share_generation_batches(service, client):
    sampler = client.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints(_tokens(service))

    async def burst():
        return await asyncio.gather(*[sampler.sample(prompt, 1, types.SamplingParams(max_tokens=3)) for _ in range(40)])

    assert len(asyncio.run(burst())) == 40
    assert sum(service.sample_batch_sizes) == 40
    assert len(service.sample_batch_sizes) <= 4


# -- losses ----------------------------------------------------------------------------------------


def test_cross_entropy_is_the_weighted_sum_of_target_logprobs(service, client):
    tc = _trainer(client)
    a, b = _tokens(service), _tokens(service, "9 + 9 = 1 8")
    wa = np.linspace(0.0, 1.0, len(a) - 1).astype(np.float32)
    wb = np.ones(len(b) - 1, dtype=np.float32)
    lp_a, lp_b = _hand_logprobs(tc.model, a), _hand_logprobs(tc.model, b)
    out = tc.forward_backward([_datum(a, weights=wa), _datum(b, weights=wb)], "cross_entropy").result()
    expected = -(lp_a.numpy() * wa).sum() - (lp_b.numpy() * wb).sum()
    assert out.metrics["loss:sum"] == pytest.approx(expected, abs=1e-4)
    np.testing.assert_allclose(out.loss_fn_outputs[0]["logprobs"].to_numpy(), lp_a.numpy(), atol=1e-5)
    np.testing.assert_allclose(out.loss_fn_outputs[1]["logprobs"].to_numpy(), lp_b.numpy(), atol=1e-5)


def test_gradients_accumulate_until_optim_step(service, client):
    tc = _trainer(client)
    data = [_datum(_tokens(service))]
    tc.forward_backward(data, "cross_entropy").result()
    first = _grads(tc)
    assert any(g is not None and g.abs().sum() > 0 for g in first.values())
    tc.forward_backward(data, "cross_entropy").result()
    for name, g in _grads(tc).items():
        if first[name] is not None:
            torch.testing.assert_close(g, 2 * first[name], rtol=1e-5, atol=1e-7)
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert all(g is None for g in _grads(tc).values())


def _rl_datum(tokens: list[int], old: np.ndarray, adv: np.ndarray) -> types.Datum:
    return _datum(tokens, logprobs=old.astype(np.float32), advantages=adv.astype(np.float32))


def test_ppo_clips_the_ratio_at_the_thresholds(service, client):
    tc = _trainer(client)
    tokens = _tokens(service, "1 2 3 4 5")  # 4 targets
    lp = tc.forward([_datum(tokens)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    ratio = np.array([1.5, 1.5, 0.5, 0.5])
    adv = np.array([1.0, -1.0, 1.0, -1.0])
    datum = _rl_datum(tokens, lp - np.log(ratio), adv)
    # -min(r A, clip(r, 0.8, 1.2) A) per token: -1.2, +1.5, -0.5, +0.8
    out = tc.forward([datum], "ppo").result()
    assert out.metrics["loss:sum"] == pytest.approx(-1.2 + 1.5 - 0.5 + 0.8, abs=1e-4)
    # thresholds 0.9 / 1.1: -1.1, +1.5, -0.5, +0.9
    custom = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    assert tc.forward([datum], "ppo", custom).result().metrics["loss:sum"] == pytest.approx(0.8, abs=1e-4)
    # A token whose ratio is clipped contributes no gradient; an unclipped one does.
    clipped = _rl_datum(tokens, lp - np.log(1.5), np.ones(4))
    tc.forward_backward([clipped], "ppo").result()
    assert all(g is None or not g.any() for g in _grads(tc).values())
    tc.forward_backward([_rl_datum(tokens, lp, np.ones(4))], "ppo").result()
    assert any(g is not None and g.any() for g in _grads(tc).values())


@pytest.mark.parametrize(
    ("loss_fn", "config", "formula"),
    [
        ("importance_sampling", None, lambda lp, old, a: -(np.exp(lp - old) * a).sum()),
        ("cispo", None, lambda lp, old, a: -(np.clip(np.exp(lp - old), 0.0, 4.0) * lp * a).sum()),
        ("dro", {"beta": 0.05}, lambda lp, old, a: -(lp * a - 0.5 * 0.05 * (lp - old) ** 2).sum()),
    ],
)
def test_rl_losses_follow_the_documented_formulas(service, client, loss_fn, config, formula):
    tc = _trainer(client)
    tokens = _tokens(service)
    lp = tc.forward([_datum(tokens)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    rng = np.random.default_rng(0)
    old = (lp - rng.uniform(-2.0, 2.0, lp.shape)).astype(np.float32)  # ratios from e^-2 to e^2: cispo's clip bites
    adv = rng.normal(size=lp.shape).astype(np.float32)
    out = tc.forward([_rl_datum(tokens, old, adv)], loss_fn, config).result()
    expected = formula(lp.astype(np.float64), old.astype(np.float64), adv.astype(np.float64))
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


# -- optimizer and checkpoints ---------------------------------------------------------------------


def test_optim_step_is_torch_adamw_with_the_step_params(service, client):
    tc = _trainer(client)
    data = [_datum(_tokens(service))]
    live = {n: p for n, p in tc.model.named_parameters() if p.requires_grad}
    initial = {n: p.detach().clone() for n, p in live.items()}
    ref = {n: p.detach().clone().requires_grad_() for n, p in live.items()}
    params = types.AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1, grad_clip_norm=0.5)
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=1e-2, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1)
    for _ in range(2):
        tc.forward_backward(data, "cross_entropy").result()
        for n, p in ref.items():
            p.grad = live[n].grad.clone()
        norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), 0.5)
        ref_opt.step()
        metrics = tc.optim_step(params).result().metrics
        assert metrics["grad_norm:mean"] == pytest.approx(float(norm), rel=1e-5)
    assert float(norm) > 0.5  # clipping was exercised
    for n, p in live.items():
        torch.testing.assert_close(p.detach(), ref[n].detach(), rtol=0, atol=1e-6)
    assert all(not torch.equal(p.detach(), initial[n]) for n, p in live.items() if "lora_B" in n)


def _step(tc, data, lr: float = 5e-2) -> None:
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=lr)).result()


def _loss(tc, data) -> float:
    return tc.forward(data, "cross_entropy").result().metrics["loss:sum"]


def test_resume_with_optimizer_repeats_the_uninterrupted_run(service, client):
    data = [_datum(_tokens(service))]
    run = _trainer(client)
    _step(run, data)
    _step(run, data)
    path = run.save_state("mid").result().path
    _step(run, data)
    uninterrupted = _loss(run, data)

    resumed = client.create_training_client_from_state_with_optimizer(path).result()
    assert [int(s["step"]) for s in resumed.optimizer.state.values()] == [2] * len(resumed.optimizer.state)
    _step(resumed, data)
    assert _loss(resumed, data) == pytest.approx(uninterrupted, abs=1e-5)
    assert resumed.model_id != run.model_id


def test_resume_from_state_loads_weights_but_resets_adam(service, client):
    data = [_datum(_tokens(service))]
    run = _trainer(client)
    _step(run, data)
    _step(run, data)
    at_save = _loss(run, data)
    path = run.save_state("mid").result().path
    _step(run, data)
    uninterrupted = _loss(run, data)

    fresh_adam = client.create_training_client_from_state(path).result()
    assert _loss(fresh_adam, data) == pytest.approx(at_save, abs=1e-5)  # the weights came back
    assert len(fresh_adam.optimizer.state) == 0  # the moments did not
    _step(fresh_adam, data)
    assert abs(_loss(fresh_adam, data) - uninterrupted) > 1e-3


def test_sampler_weights_round_trip_through_disk(service, client, tmp_path):
    tc = _trainer(client)
    _step(tc, [_datum(_tokens(service))])
    prompt = types.ModelInput.from_ints(_tokens(service))
    snapshot = tc.save_weights_and_get_sampling_client().result()
    path = tc.save_weights_for_sampler("trained").result().path
    assert types.ParsedCheckpointTinkerPath.from_tinker_path(path).checkpoint_type == "sampler"
    another_service = LocalTinker(tmp_path, context_window=64)  # same root: a later process
    from_disk = another_service.service_client().create_sampling_client(model_path=path).result()
    base = client.create_sampling_client(base_model=BASE).result()
    expected = snapshot.compute_logprobs(prompt).result()
    np.testing.assert_allclose(from_disk.compute_logprobs(prompt).result()[1:], expected[1:], atol=1e-6)
    assert not np.allclose(base.compute_logprobs(prompt).result()[1:], expected[1:], atol=1e-4)


def test_sampling_clients_pickle_by_reference_to_the_root(service, client):
    tc = _trainer(client)
    _step(tc, [_datum(_tokens(service))])
    snapshot = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(_tokens(service))
    copy = pickle.loads(pickle.dumps(snapshot))
    assert copy.get_base_model() == BASE
    np.testing.assert_allclose(
        copy.compute_logprobs(prompt).result()[1:], snapshot.compute_logprobs(prompt).result()[1:], atol=1e-6
    )


def test_checkpoints_are_listed_and_deleted(service, client):
    tc = _trainer(client)
    state = tc.save_state("a").result().path
    sampler = tc.save_weights_for_sampler("a").result().path
    assert service.checkpoint_paths() == sorted([state, sampler])
    rest = service.rest_client()
    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert sorted((c.checkpoint_type, c.tinker_path) for c in listed) == [("sampler", sampler), ("training", state)]
    rest.delete_checkpoint_from_tinker_path(state).result()
    assert service.checkpoint_paths() == [sampler]
    with pytest.raises(tinker.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(state).result()


# -- failure modes ---------------------------------------------------------------------------------


def test_forward_backward_without_data_raises_at_once(service, client):
    tc = _trainer(client)
    with pytest.raises(ValueError, match="No data provided"):
        tc.forward_backward([], "cross_entropy")
    tc.forward_backward([_datum(_tokens(service))], "cross_entropy").result()  # not a failed request


def test_a_sequence_over_max_train_length_fails_with_a_user_error(service, client):
    tc = _trainer(client)
    too_long = _tokens(service, " ".join(["1"] * 50))  # 49 inputs > max_train_length 48
    with pytest.raises(tinker.RequestFailedError, match="sequence length 49 exceeds max sequence length 48") as info:
        tc.forward_backward([_datum(too_long)], "cross_entropy").result()
    assert info.value.category == types.RequestErrorCategory.User


def test_unknown_base_model_is_a_bad_request(client):
    created = client.create_lora_training_client("Qwen/Qwen3-8B", rank=4)
    with pytest.raises(tinker.BadRequestError, match=f"not supported; supported: {BASE}"):
        created.result()


def test_a_failed_request_poisons_the_training_client(service, client):
    tc = _trainer(client)
    data = [_datum(_tokens(service))]
    with pytest.raises(tinker.RequestFailedError, match="Unknown loss function") as first:
        tc.forward_backward(data, "nll").result()
    assert first.value.category == types.RequestErrorCategory.User
    with pytest.raises(RuntimeError, match="poisoned") as later:
        tc.forward_backward(data, "cross_entropy").result()
    assert later.value.__cause__ is first.value


def test_a_mask_input_is_rejected(service, client):
    tokens = _tokens(service)
    datum = _datum(tokens, weights=np.ones(len(tokens) - 1, np.float32), mask=np.ones(len(tokens) - 1, np.float32))
    with pytest.raises(tinker.RequestFailedError, match="does not take loss_fn_inputs \\['mask'\\]"):
        _trainer(client).forward_backward([datum], "cross_entropy").result()


def test_a_missing_api_key_fails_at_the_first_create(service, monkeypatch):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    keyless = service.service_client(api_key=None)  # lazy, like the SDK's: no error yet
    with pytest.raises(tinker.TinkerError, match="api_key client option must be set"):
        keyless.create_lora_training_client(BASE, rank=4)
    monkeypatch.setenv("TINKER_API_KEY", "tml-from-env")
    assert isinstance(
        service.service_client(api_key=None).create_lora_training_client(BASE, rank=4).result(), tinker.TrainingClient
    )


def test_fail_next_injects_one_failure(service, client):
    sampler = client.create_sampling_client(base_model=BASE).result()
    prompt = types.ModelInput.from_ints(_tokens(service))
    service.fail_next("sample", RuntimeError("sampler down"))
    with pytest.raises(RuntimeError, match="sampler down"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result()
    assert sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result().sequences  # once only
    tc = _trainer(client)
    service.fail_next("optim_step", tinker.InternalServerError("optimizer crashed", response=_response(500), body=None))
    with pytest.raises(tinker.InternalServerError, match="optimizer crashed"):
        tc.optim_step(types.AdamParams()).result()
    with pytest.raises(RuntimeError, match="poisoned"):
        tc.forward_backward([_datum(_tokens(service))], "cross_entropy").result()
    assert service.calls["sample"] == 2 and service.calls["optim_step"] == 1
    with pytest.raises(ValueError, match="unknown method"):
        service.fail_next("forward_backwards", RuntimeError())


def _response(status: int):
    import httpx

    return httpx.Response(status, request=httpx.Request("POST", "http://local-tinker/"))


def test_requests_run_in_call_order(service, client):
    data = [_datum(_tokens(service))]
    adam = types.AdamParams(learning_rate=5e-2)
    pipelined, awaited = _trainer(client, seed=3), _trainer(client, seed=3)
    futures = [
        pipelined.forward_backward(data, "cross_entropy"),
        pipelined.optim_step(adam),
        pipelined.forward_backward(data, "cross_entropy"),
    ]
    losses = [futures[0].result().metrics["loss:sum"], futures[2].result().metrics["loss:sum"]]
    expected = [awaited.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]]
    awaited.optim_step(adam).result()
    expected.append(awaited.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
    assert losses == pytest.approx(expected, abs=1e-6)
    assert abs(losses[1] - losses[0]) > 1e-3  # the step ran between the two


def test_closed_service_client_refuses_requests(service, client):
    tc = _trainer(client)
    client.close("success").result()
    with pytest.raises(RuntimeError, match="ServiceClient is closed"):
        client.create_lora_training_client(BASE, rank=4)
    with pytest.raises(tinker.RequestFailedError, match="is finished"):
        tc.forward_backward([_datum(_tokens(service))], "cross_entropy").result()


def test_local_service_client_factory_shares_one_service_per_root(tmp_path, monkeypatch):
    monkeypatch.setenv("RLLM_TINKER_LOCAL_ROOT", str(tmp_path))
    assert shared_local_tinker() is shared_local_tinker(tmp_path)
    first = local_service_client({"any": "config"})
    tc = first.create_lora_training_client(BASE, rank=4).result()
    path = tc.save_state("ckpt").result().path
    later = local_service_client().create_training_client_from_state_with_optimizer(path).result()
    assert later.get_info().lora_rank == 4
    assert path in shared_local_tinker().checkpoint_paths()
