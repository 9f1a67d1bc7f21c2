"""Training steps, micro-batching, async weight sync, checkpoints and export of the torch backend."""

from __future__ import annotations

import asyncio
import threading

import pytest
from torch_test_helpers import backend, groups_from_outputs

from rllm_core.protocol import TrainerState
from rllm_core.rows import build_rows

torch = pytest.importorskip("torch")

MSG = [{"role": "user", "content": "3+4="}]


def _sample(b, n=16, max_tokens=3):
    async def run():
        return await asyncio.gather(
            *[b.rollout_engine.get_model_response(MSG, max_tokens=max_tokens) for _ in range(n)]
        )

    return asyncio.run(run())


def _train(b, groups, version=None):
    """The trainer's stages on ``groups`` whose steps already carry advantages."""

    async def run():
        state = TrainerState(groups=groups, rows=build_rows(groups))
        await b.transform_to_backend_batch(state)
        await b.process_backend_batch(state)
        state.rows.fill_advantages()
        await b.update_policy(state)
        if version is not None:
            await b.on_policy_updated(state, version)
        return state

    return asyncio.run(run())


def _params(b):
    return {k: v.detach().clone() for k, v in b.policy.state_dict().items()}


def test_update_on_policy_data_has_unit_ratio_and_reports_metrics():
    b = backend()
    outs = _sample(b)
    state = _train(b, groups_from_outputs(outs, [float(i % 2) for i in range(16)]))
    m = state.metrics
    # sampler logprobs == trainer logprobs before the step, so the importance ratio is 1
    assert m["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["actor/num_seqs"] == 16 and m["actor/num_tokens"] == sum(len(o.completion_ids) for o in outs)
    for key in ("actor/loss", "actor/entropy", "actor/grad_norm", "actor/lr", "actor/tokens_per_s"):
        assert key in m
    assert b.updates == 1


def test_rows_without_sampling_logprobs_are_trained_on_recomputed_ones():
    """What algorithm.replay relies on (``recomputes_old_logprobs``): a replayed success carries no
    sampling logprobs; the backend scores it under the current weights, so its ratio starts at 1."""
    b = backend()
    assert type(b).recomputes_old_logprobs
    outs = _sample(b)
    torch.manual_seed(0)
    with torch.no_grad():  # the weights move on after sampling: the sampler's logprobs are stale
        for p in b.policy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    stale = _train(b, groups_from_outputs(outs, [float(i % 2) for i in range(16)])).metrics
    assert abs(stale["actor/ratio_mean"] - 1.0) > 1e-3
    groups = groups_from_outputs(outs, [float(i % 2) for i in range(16)])
    for traj in groups[0].trajectories:
        traj.steps[0].logprobs = []
    m = _train(b, groups).metrics
    assert m["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # first mini-batch: exactly on-policy
    assert m["actor/loss"] == m["actor/loss"]  # not NaN


def test_micro_batches_accumulate_to_the_same_update():
    big, small = backend(), backend(**{"torch.micro_batch_tokens": 16})
    outs = _sample(big)
    rewards = [float(len(o.completion_ids) % 2) for o in outs]
    for mode in ("token-mean", "seq-mean-token-mean"):
        big.config.algorithm.loss.agg_mode = small.config.algorithm.loss.agg_mode = mode
        m_big = _train(big, groups_from_outputs(outs, rewards)).metrics
        m_small = _train(small, groups_from_outputs(outs, rewards)).metrics
        assert m_small["actor/grad_norm"] == pytest.approx(m_big["actor/grad_norm"], rel=1e-4)
    for k, v in _params(big).items():
        torch.testing.assert_close(_params(small)[k], v, atol=1e-5, rtol=1e-4)


def test_per_token_advantages_are_honoured_and_checked():
    b = backend()
    outs = [o for o in _sample(b, n=32, max_tokens=3) if len(o.completion_ids) == 3][:4]
    groups = groups_from_outputs(outs, [0.0] * len(outs))
    for traj in groups[0].trajectories:
        traj.steps[0].advantage = [0.0, 0.0, 0.0]
    before = _params(b)
    _train(b, groups)
    # zero advantages everywhere: no gradient, parameters unchanged (AdamW without decay)
    for k, v in _params(b).items():
        torch.testing.assert_close(v, before[k])
    groups[0].trajectories[0].steps[0].advantage = [1.0]
    with pytest.raises(ValueError, match="per-token advantage has 1 entries for 3 response tokens"):
        _train(b, groups)


def test_async_sampler_keeps_old_weights_until_policy_update():
    b = backend(**{"trainer.mode": "async"})
    assert b.separate_sampler and b.runtime.model is not b.policy
    outs = _sample(b)
    engine = b.rollout_engine
    probe = outs[0]
    before = asyncio.run(engine.compute_logprobs(probe.prompt_ids, probe.completion_ids))
    _train(b, groups_from_outputs(outs, [float(i % 2) for i in range(16)]))
    still = asyncio.run(engine.compute_logprobs(probe.prompt_ids, probe.completion_ids))
    assert still == before and engine.weight_version == 0
    _train(b, groups_from_outputs(outs, [float(i % 2) for i in range(16)]), version=2)
    after = asyncio.run(engine.compute_logprobs(probe.prompt_ids, probe.completion_ids))
    assert after != before and engine.weight_version == 2
    assert _sample(b, n=2)[0].weight_version == 2


def test_checkpoint_resume_gives_the_same_next_step(tmp_path):
    outs_by_step = {}
    # One sampler batch per call, however loaded the machine: the random stream depends on batching
    same_batches = {"torch.gen_batch_window_ms": 500, "torch.gen_max_batch": 16}
    a = backend(**same_batches)
    for step in range(3):
        outs_by_step[step] = _sample(a)
        if step == 1:
            a.save_checkpoint(tmp_path / "ckpt")
            rng_after_save = torch.get_rng_state()
        m_a = _train(a, groups_from_outputs(outs_by_step[step], [float(i % 3 == 0) for i in range(16)]), step + 1)
        if step == 1:
            loss_a, params_step2 = m_a.metrics["actor/loss"], _params(a)
    b = backend(**{"torch.seed": 123}, **same_batches)  # different init: everything must come from the checkpoint
    b.load_checkpoint(tmp_path / "ckpt")
    assert b.rollout_engine.weight_version == 1 and b.updates == 1
    torch.testing.assert_close(torch.get_rng_state(), rng_after_save)
    m_b = _train(b, groups_from_outputs(outs_by_step[1], [float(i % 3 == 0) for i in range(16)]), 2)
    assert m_b.metrics["actor/loss"] == pytest.approx(loss_a, abs=1e-7)
    for k, v in _params(b).items():
        torch.testing.assert_close(v, params_step2[k])
    # the sampler resumed its random stream too: the next samples are the same
    assert [o.completion_ids for o in _sample(b)] == [o.completion_ids for o in outs_by_step[2]]


def test_export_writes_a_loadable_hugging_face_directory(tmp_path):
    from rllm_torch.backend import TorchBackend

    a = backend()
    outs = _sample(a, n=4)
    _train(a, groups_from_outputs(outs, [1.0, 0.0, 1.0, 0.0]), 1)
    a.save_checkpoint(tmp_path / "ckpt")
    out_dir = TorchBackend.export(tmp_path / "ckpt", tmp_path / "hf")
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file()
    b = backend(**{"torch.model_path": str(out_dir)})
    p, r = outs[0].prompt_ids, outs[0].completion_ids
    lp_a = asyncio.run(a.rollout_engine.compute_logprobs(p, r))
    lp_b = asyncio.run(b.rollout_engine.compute_logprobs(p, r))
    assert lp_b == pytest.approx(lp_a, abs=1e-5)
    assert asyncio.run(b.rollout_engine.encode_messages(MSG)) == p


def test_lora_trains_only_adapters():
    pytest.importorskip("peft")
    b = backend(**{"torch.lora.r": 4})
    trainable = [n for n, p in b.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    outs = _sample(b, n=8)
    m = _train(b, groups_from_outputs(outs, [float(i % 2) for i in range(8)])).metrics
    assert m["actor/grad_norm"] > 0


def test_bad_settings_name_the_field():
    from torch_test_helpers import make_config

    from rllm_core.config import ConfigError, validate_plugin_sections

    with pytest.raises(ConfigError, match=r"torch\.dtype"):
        validate_plugin_sections(make_config(**{"torch.dtype": "float8"}))
    with pytest.raises(ConfigError, match=r"algorithm\.loss\.name"):
        b = backend()
        b.validate_config(make_config(**{"algorithm.loss.name": "dpo"}))


def test_a_bad_model_path_is_a_config_error_naming_the_field_before_start_up(tmp_path):
    from rllm_torch.config import TorchBackendConfig
    from torch_test_helpers import make_config

    from rllm_core.config import ConfigError, validate_plugin_sections

    with pytest.raises(ConfigError, match=r"  torch\.model_path: .*/nonexistent/model is not a directory"):
        validate_plugin_sections(make_config(**{"torch.model_path": "/nonexistent/model"}))
    with pytest.raises(ConfigError, match=r"  torch\.model_path: .*no config\.json"):
        validate_plugin_sections(make_config(**{"torch.model_path": str(tmp_path)}))
    # Settings read back from a checkpoint do not need the original directory.
    assert TorchBackendConfig.model_validate({"model_path": "/gone"}, context={"check_paths": False}).model_path


def test_torch_is_the_default_backend_and_registers_reward_curve():
    from rllm_core.plugins import get_registry

    reg = get_registry()
    assert reg.default_backend() == "torch"
    assert reg.get("backend", "torch").options["priority"] == 100
    assert "reward_curve" in reg.names("logger")


def test_entropy_bonus_raises_entropy_without_advantages():
    b = backend(**{"torch.entropy_coef": 1.0})
    outs = _sample(b, n=16)
    first = _train(b, groups_from_outputs(outs, [0.0] * 16)).metrics["actor/entropy"]
    for _ in range(3):
        last = _train(b, groups_from_outputs(outs, [0.0] * 16)).metrics["actor/entropy"]
    assert last > first


def _forward_kl(b, groups) -> float:
    """KL(reference || policy) per action token, by plain full forwards of both models."""
    total = n = 0.0
    with torch.no_grad():
        for s in (s for g in groups for t in g.trajectories for s in t.steps):
            ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
            cut = len(s.prompt_ids) - 1
            ref = torch.log_softmax(b.runtime.reference(ids).logits[0, cut:-1].float(), -1)
            pol = torch.log_softmax(b.policy(ids).logits[0, cut:-1].float(), -1)
            total += float((ref.exp() * (ref - pol)).sum())
            n += len(s.response_ids)
    return total / n


def test_forward_kl_is_the_exact_divergence_and_pulls_the_policy_back():
    b = backend(**{"algorithm.loss.forward_kl_coef": 1.0})
    assert b.runtime.reference is not None  # the forward KL alone needs a reference
    torch.manual_seed(0)
    with torch.no_grad():  # the policy drifts away from the reference
        for p in b.policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    groups = groups_from_outputs(_sample(b, n=8), [0.0] * 8)  # no advantage: only the KL term acts
    before = _forward_kl(b, groups)
    assert before > 0.05
    m = _train(b, groups).metrics
    assert m["actor/forward_kl"] == pytest.approx(before, rel=1e-4)  # the term is the exact divergence
    for _ in range(5):
        _train(b, groups)
    assert _forward_kl(b, groups) < 0.5 * before


def test_forward_kl_on_no_signal_rows_acts_only_where_the_advantage_is_zero():
    b = backend(**{"algorithm.loss.forward_kl_coef": 1.0, "algorithm.loss.forward_kl_rows": "no_signal"})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in b.policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    outs = _sample(b, n=16)
    silent = groups_from_outputs(outs[:8], [0.0] * 8, task_id="silent")  # advantage 0 everywhere
    mixed = groups_from_outputs(outs[8:], [float(i % 2) for i in range(8)], task_id="mixed")
    tokens = {name: sum(len(o.completion_ids) for o in part) for name, part in (("s", outs[:8]), ("m", outs[8:]))}
    expected = _forward_kl(b, silent) * tokens["s"] / (tokens["s"] + tokens["m"])
    m = _train(b, silent + mixed).metrics
    assert m["actor/forward_kl"] == pytest.approx(expected, rel=1e-4) and expected > 0.01


def test_the_reference_runs_once_per_micro_batch_beside_training_and_k3_is_the_same_with_both_kl_terms():
    """k3 alone and k3 with the forward KL both run the reference inside the training step, on the
    reference thread (no pre-pass on the training thread), once per micro-batch; k3 agrees."""
    runs = {}
    for forward in (0.0, 1e-9):
        b = backend(**{"algorithm.loss.kl_coef": 0.1, "algorithm.loss.forward_kl_coef": forward})
        torch.manual_seed(0)
        with torch.no_grad():
            for p in b.policy.parameters():
                p.add_(0.3 * torch.randn_like(p))
        calls = []
        hook = b.runtime.reference.register_forward_pre_hook(
            lambda m, a, calls=calls: calls.append(threading.current_thread().name)
        )
        groups = groups_from_outputs(_sample(b, n=8), [0.0] * 8)
        m = _train(b, groups).metrics
        hook.remove()
        runs[forward] = (m, calls)
    (m_k3, calls_k3), (m_both, calls_both) = runs[0.0], runs[1e-9]
    assert m_both["actor/kl"] == pytest.approx(m_k3["actor/kl"], rel=1e-4) and m_k3["actor/kl"] > 1e-3
    # a shared-prompt pass is two forwards (prompts, then responses)
    assert len(calls_both) == len(calls_k3) == 2
    assert all(name.startswith("rllm-torch-reference") for name in calls_k3 + calls_both)


@pytest.mark.parametrize("micro_batch_tokens", [16384, 16])
def test_k3_is_that_of_the_reference_models_logprobs_however_the_step_is_micro_batched(micro_batch_tokens):
    """The step's KL equals k3 of the policy's and the reference's own teacher-forced logprobs, token
    mean over the action tokens, at the sampling temperature, in one micro-batch or in many."""
    from rllm_torch.sampling import score

    b = backend(**{"algorithm.loss.kl_coef": 0.1, "torch.micro_batch_tokens": micro_batch_tokens})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in b.policy.parameters():
            p.add_(0.3 * torch.randn_like(p))

    async def sample():
        calls = [b.rollout_engine.get_model_response(MSG, max_tokens=3, temperature=0.7) for _ in range(8)]
        return await asyncio.gather(*calls)

    outs = asyncio.run(sample())
    assert {o.temperature for o in outs} == {0.7}
    rows = [(o.prompt_ids, o.completion_ids) for o in outs]
    policy = score(b.policy, rows, pad_id=b._pad, temperature=0.7)
    reference = score(b.runtime.reference, rows, pad_id=b._pad, temperature=0.7)
    pairs = zip(policy, reference, strict=True)
    d = torch.tensor([p - r for lp, lr in pairs for p, r in zip(lp, lr, strict=True)])
    expected = float((torch.exp(-d) + d - 1.0).clamp(max=10.0).mean())  # kl_clamp: 10
    m = _train(b, groups_from_outputs(outs, [0.0] * 8)).metrics
    assert expected > 1e-3
    assert m["actor/kl"] == pytest.approx(expected, rel=1e-4)


def test_prefetched_keeps_order_and_runs_one_item_ahead_on_the_executor():
    from concurrent.futures import ThreadPoolExecutor

    from rllm_torch.backend import _Prefetched

    started: list[tuple[int, str]] = []
    first = threading.Event()

    def work(i: int) -> int:
        started.append((i, threading.current_thread().name))
        if i == 0:
            first.set()
        return i * i

    with ThreadPoolExecutor(1, thread_name_prefix="ahead") as ex:
        ahead = _Prefetched(ex, work, list(range(5)))
        assert first.wait(5)  # the first item starts at construction, before anyone asks for it
        out = []
        for k, value in enumerate(ahead):
            out.append(value)
            assert max(i for i, _ in started) <= k + 1  # never more than one item ahead of the consumer
        assert out == [0, 1, 4, 9, 16]
        assert all(name.startswith("ahead") for _, name in started)
    started.clear()
    inline = _Prefetched(None, work, [3, 4])
    assert started == []
    assert next(inline) == 9 and started == [(3, threading.current_thread().name)]  # lazily, here
    assert list(inline) == [16]


def test_prompt_sharing_and_zero_advantage_skipping_give_the_same_update():
    """Both shortcuts are exact: the same parameters after a step as the plain full-sequence pass."""
    plain = backend(**{"torch.share_prompt_prefix": "false", "torch.skip_zero_advantage": "false"})
    fast = backend()
    outs = _sample(plain, n=16, max_tokens=3)
    groups = groups_from_outputs(outs[:8], [float(i % 2) for i in range(8)], task_id="a")
    groups += groups_from_outputs(outs[8:], [1.0] * 8, task_id="b")  # equal rewards: advantages all 0
    m_plain = _train(plain, groups).metrics
    m_fast = _train(fast, groups).metrics
    assert m_plain["actor/trained_seqs"] == 16 and m_fast["actor/trained_seqs"] == 8
    assert m_fast["actor/forward_tokens"] < m_plain["actor/forward_tokens"]
    assert m_fast["actor/grad_norm"] == pytest.approx(m_plain["actor/grad_norm"], rel=1e-4)
    # gradients, not parameters: Adam's first step turns float noise in ~0 gradients into +-lr
    grads = {n: p.grad for n, p in fast.policy.named_parameters()}
    for name, p in plain.policy.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4)


def test_identical_rows_switch_gives_the_same_update_from_fewer_tokens():
    """``torch.share_identical_rows``: a group whose answers repeat trains as before (same gradient,
    KL and entropy terms included), feeding each distinct row once."""
    extra = {"algorithm.loss.kl_coef": "0.1", "algorithm.loss.forward_kl_coef": "0.5", "torch.entropy_coef": "0.01"}
    plain = backend(**extra)
    dedup = backend(**extra, **{"torch.share_identical_rows": "true"})
    outs = _sample(plain, n=4, max_tokens=3)
    copies = [outs[0], outs[0], outs[0], outs[1], outs[1], outs[2], outs[3], outs[3]]
    groups = groups_from_outputs(copies, [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0], task_id="a")
    m_plain = _train(plain, groups).metrics
    m_dedup = _train(dedup, groups).metrics
    assert m_dedup["actor/forward_tokens"] < m_plain["actor/forward_tokens"]
    for key in ("actor/grad_norm", "actor/kl", "actor/forward_kl", "actor/entropy"):
        assert m_dedup[key] == pytest.approx(m_plain[key], rel=1e-4), key
    grads = {n: p.grad for n, p in dedup.policy.named_parameters()}
    for name, p in plain.policy.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4)


def test_the_thread_count_holds_in_the_sampler_and_trainer_threads():
    """torch.set_num_threads binds only the calling thread's OpenMP team: the backend's own threads
    must get the setting too, or their kernels run on every core whatever was configured."""
    import ctypes
    import os

    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    maps = [line.split()[-1] for line in open("/proc/self/maps")]
    gomp = next((path for path in maps if "libgomp" in path and path.startswith(torch_lib)), None)
    if gomp is None or (os.cpu_count() or 1) < 2:
        pytest.skip("needs torch's GNU OpenMP and two cores to tell one thread from several")
    omp_threads = ctypes.CDLL(gomp).omp_get_max_threads
    b = backend(**{"torch.num_threads": 1})
    try:
        for executor in (b.runtime.executor, b._train_executor, b._reference_executor):
            assert executor.submit(omp_threads).result() == 1
    finally:
        asyncio.run(b.shutdown())


def test_a_small_model_gets_one_cpu_thread_unless_configured(monkeypatch):
    import os

    import torch
    from rllm_torch import backend as backend_module

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    try:
        backend(**{"torch.num_threads": "null"})
        assert torch.get_num_threads() == 1  # the tiny test model: its ops are too small to split
        monkeypatch.setattr(backend_module, "SMALL_MODEL_PARAMS", 1000)  # now it counts as a real model
        backend(**{"torch.num_threads": "null"})
        assert torch.get_num_threads() == 8  # every core in sync mode
        backend(**{"torch.num_threads": "null", "trainer.mode": "async"})
        assert torch.get_num_threads() == 4  # half each for the sampler and the trainer
        backend(**{"torch.num_threads": 3})
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def _sampled_at(groups, temperature):
    """Mark every trajectory's episode as sampled at ``temperature`` (what ``rollout.explore`` does)."""
    from rllm_core.rows import TEMPERATURE_KEY
    from rllm_core.types import Episode

    for g in groups:
        g.episodes = [
            Episode(task_id=g.task_id, trajectories=[t], info={TEMPERATURE_KEY: temperature}) for t in g.trajectories
        ]
    return groups


def _unstamped(groups):
    """The steps as an engine that does not report its sampling temperature would leave them."""
    for g in groups:
        for t in g.trajectories:
            for s in t.steps:
                s.temperature = None
    return groups


@pytest.mark.parametrize("how", ["episode", "step"])
def test_rows_sampled_at_their_own_temperature_train_as_in_a_run_at_that_temperature(how):
    """Rows sampled at another temperature than the run's get the update (KL, forward KL and entropy
    terms included) of a run whose training temperature is that one: whether the episode is marked
    (``rollout.explore``) or the steps record it (the engine stamps ``ModelOutput.temperature``,
    e.g. for a workflow that passes its own ``temperature=``)."""
    extra = {"algorithm.loss.kl_coef": "0.1", "algorithm.loss.forward_kl_coef": "0.5", "torch.entropy_coef": "0.01"}
    hot = backend(**extra, **{"rollout.train_sampling.temperature": "2.0"})
    marked, plain = backend(**extra), backend(**extra)
    assert type(marked).trains_row_temperature

    async def sample():
        calls = [hot.rollout_engine.get_model_response(MSG, max_tokens=3, temperature=2.0) for _ in range(16)]
        return await asyncio.gather(*calls)

    outs = asyncio.run(sample())
    assert {o.temperature for o in outs} == {2.0}
    rewards = [float(i % 2) for i in range(len(outs))]
    m_hot = _train(hot, groups_from_outputs(outs, rewards)).metrics
    if how == "episode":
        m_marked = _train(marked, _sampled_at(_unstamped(groups_from_outputs(outs, rewards)), 2.0)).metrics
    else:
        m_marked = _train(marked, groups_from_outputs(outs, rewards)).metrics
    m_plain = _train(plain, _unstamped(groups_from_outputs(outs, rewards))).metrics
    # sampled at 2.0, so the ratio is 1 only when the trainer takes logprobs at 2.0 as well
    assert m_hot["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert m_plain["actor/ratio_mean"] != pytest.approx(1.0, abs=1e-3)
    for key in ("actor/ratio_mean", "actor/grad_norm", "actor/kl", "actor/forward_kl", "actor/entropy"):
        assert m_marked[key] == pytest.approx(m_hot[key], rel=1e-4), key
    grads = {n: p.grad for n, p in marked.policy.named_parameters()}
    for name, p in hot.policy.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4)


def test_scoring_takes_one_temperature_per_row():
    from rllm_torch.sampling import score

    b = backend()
    outs = _sample(b, n=4, max_tokens=3)
    rows = [(o.prompt_ids, o.completion_ids) for o in outs]
    temps = [1.0, 2.0, 0.5, 2.0]
    together = score(b.policy, rows, pad_id=b._pad, temperature=temps)
    for row, t, got in zip(rows, temps, together, strict=True):
        alone = score(b.policy, [row], pad_id=b._pad, temperature=t)[0]
        assert got == pytest.approx(alone, abs=1e-5)
    assert together[1] != pytest.approx(score(b.policy, rows, pad_id=b._pad)[1], abs=1e-3)
