"""The tinker backend end to end, through the in-process stand-in of the service (rllm_tinker.testing)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft", reason="the stand-in's LoRA needs peft (pip install 'rllm-tinker[test]')")
pytest.importorskip("rllm_torch", reason="the stand-in's model comes from rllm-torch (pip install 'rllm-tinker[test]')")

import torch
from rllm_tinker.backend import TinkerBackend
from rllm_tinker.datums import loss_fn_config, rows_to_datums
from rllm_tinker.testing import shared_local_tinker
from rllm_torch.losses import policy_loss
from rllm_torch.sampling import score

from rllm_core.config import LossConfig, RLLMConfig, load_config
from rllm_core.protocol import TrainerState
from rllm_core.rows import build_rows
from rllm_core.trainer import UnifiedTrainer
from rllm_core.types import Episode, Step, TerminationReason, Trajectory, TrajectoryGroup

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "arith" / "config_tinker.yaml"


@pytest.fixture
def local_root(tmp_path, monkeypatch):
    root = tmp_path / "tinker-service"
    monkeypatch.setenv("RLLM_TINKER_LOCAL_ROOT", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def config(run_dir: Path, *overrides: str) -> RLLMConfig:
    return load_config(
        CONFIG,
        overrides=[
            f"trainer.run_dir={run_dir}",
            "loggers={jsonl: {}}",
            "trainer.val_every=0",
            "trainer.val_at_end=false",
            *overrides,
        ],
    )


def rewards(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/reward/mean"] for r in rows if "train/reward/mean" in r]


# -- learning ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_start(tmp_path_factory):
    """A LoRA state after a short SFT (15 steps of Tinker's cross_entropy on the facts, saved with
    save_state), as a Tinker user starts RL from an SFT checkpoint: it has the format (two digits,
    end-of-turn) and about 2% of the sums. From a random tiny model, a right answer is a 1-in-20,000
    draw, too rare for a test of this length to find reliably."""
    import tinker
    from rllm_tinker.testing import LocalTinker
    from tinker_cookbook import renderers

    root = tmp_path_factory.mktemp("tinker-service")
    service = LocalTinker(root)
    training = service.service_client().create_lora_training_client("rllm/tiny-arith", rank=32, seed=0).result()
    tokenizer = training.get_tokenizer()
    renderer = renderers.get_renderer("qwen3_instruct", tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rng = np.random.default_rng(0)
    for _ in range(15):
        datums = []
        for _ in range(32):
            a, b = (int(v) for v in rng.integers(0, 10, size=2))
            x, y = divmod(a + b, 10)
            prompt = renderer.build_generation_prompt([{"role": "user", "content": f"{a} + {b} ="}]).to_ints()
            answer = [*tokenizer.encode(f"{x} {y}", add_special_tokens=False), end]
            tokens = prompt + answer
            weights = [0.0] * (len(prompt) - 1) + [1.0 / 96] * len(answer)
            datums.append(
                tinker.Datum(
                    model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": np.asarray(tokens[1:]), "weights": np.asarray(weights)},
                )
            )
        training.forward_backward(datums, "cross_entropy").result()
        training.optim_step(tinker.AdamParams(learning_rate=3e-3, eps=1e-8)).result()
    path = training.save_state("format").result().path
    service.close()
    return root, path


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_main_jobs_task_learns_through_the_stand_in(sft_start, tmp_path, monkeypatch, mode):
    root, state = sft_start
    monkeypatch.setenv("RLLM_TINKER_LOCAL_ROOT", str(root))
    run = tmp_path / mode
    cfg = config(
        run,
        f"trainer.mode={mode}",
        "trainer.total_steps=40",
        "trainer.save_every=0",
        f"tinker.resume_from={state}",
        "tinker.resume_optimizer=false",
    )
    UnifiedTrainer(cfg).fit()
    r = rewards(run)
    assert len(r) == 40
    # Measured from about 0.02-0.03 at the start, mean of the last 5 steps at lr 1e-3: 0.43-0.46 in sync
    # mode, 0.30-0.36 in async mode (one step stale); RL must at least quadruple it, and leave the
    # start's noise well behind.
    start, end = np.mean(r[:3]), np.mean(r[-5:])
    assert start < 0.05, r
    assert end > max(0.15, 4 * start), r


# -- one loss, two backends -------------------------------------------------------------------


def _rows():
    rng = np.random.default_rng(0)
    groups = []
    for g in range(2):
        trajs, episodes = [], []
        for i in range(3):
            prompt = [3, 11, 18 + g, 25, 19, 26, 4, 3, 12]
            response = [int(x) for x in rng.integers(15, 27, size=2 + i)] + [4]
            step = Step(prompt_ids=prompt, response_ids=response, logprobs=[0.0] * len(response), advantage=i - 1.0)
            traj = Trajectory(name="solver", steps=[step])
            trajs.append(traj)
            done = TerminationReason.ENV_DONE
            episodes.append(Episode(task_id=str(g), rollout_idx=i, trajectories=[traj], termination_reason=done))
        groups.append(TrajectoryGroup(task_id=str(g), role="solver", trajectories=trajs, episodes=episodes))
    return groups


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("name", ["importance_sampling", "ppo"])
def test_same_rows_same_loss_as_the_torch_backend(local_root, agg_mode, name):
    service = shared_local_tinker(local_root)
    training = service.service_client().create_lora_training_client("rllm/tiny-arith", rank=4).result()
    groups = _rows()
    # Sampling logprobs off the current policy, so that ratios differ from 1 and ppo clips some tokens.
    pad = service.tokenizer("rllm/tiny-arith").pad_token_id
    pairs = [(s.prompt_ids, s.response_ids) for g in groups for t in g.trajectories for s in t.steps]
    current = score(training.model, pairs, pad_id=pad)
    rng = np.random.default_rng(1)
    steps = [s for g in groups for t in g.trajectories for s in t.steps]
    for step, lp in zip(steps, current, strict=True):
        step.logprobs = [x + float(rng.normal(0, 0.3)) for x in lp]
    rows = build_rows(groups)
    rows.fill_advantages()
    loss = LossConfig(name=name, agg_mode=agg_mode)

    # torch backend: sum_t w_t * policy_loss_t with the core's weights
    w = rows.loss_weights(agg_mode)
    logp = torch.tensor([x for lp in current for x in lp], dtype=torch.float64)
    old = torch.tensor(rows.logprobs[rows.loss_mask], dtype=torch.float64)
    adv = torch.tensor(rows.advantages[rows.loss_mask], dtype=torch.float64)
    per_token, stats = policy_loss(logp, old, adv, name=name, clip_low=loss.clip_low, clip_high=loss.clip_high)
    expected = float((torch.tensor(w[rows.loss_mask]) * per_token).sum())
    if name == "ppo":
        assert 0 < float(stats["clipped"].sum()) < len(per_token)  # the clip is exercised both ways

    datums, _, _ = rows_to_datums(rows, loss, max_train_length=1024)
    out = training.forward_backward(datums, name, loss_fn_config(loss)).result()
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5, abs=1e-6)


# -- checkpoints and resume -------------------------------------------------------------------


def _fixed_state(step: int) -> TrainerState:
    groups = _rows()
    rows = build_rows(groups)
    rows.fill_advantages()
    return TrainerState(step=step, groups=groups, rows=rows)


def _backend(run_dir: Path, **tinker_cfg) -> TinkerBackend:
    cfg = config(run_dir, "algorithm.loss.name=importance_sampling", "algorithm.optim.mini_batch_size=null")
    cfg = RLLMConfig.model_validate({**cfg.to_dict(), "tinker": {**cfg.to_dict()["tinker"], **tinker_cfg}})
    return TinkerBackend(cfg)


async def _train(backend: TinkerBackend, steps: range) -> list[float]:
    losses = []
    for step in steps:
        state = _fixed_state(step)  # fixed sampling logprobs (0): the loss -sum w * p_t * A_t moves with the weights
        await backend.update_policy(state)
        losses.append(state.metrics["train/loss"])
        await backend.on_policy_updated(state, step + 1)
    return losses


@pytest.mark.parametrize(
    "split", ["algorithm.optim.mini_batches=4", "algorithm.optim.mini_batch_size=4", "algorithm.optim.shuffle=groups"]
)
def test_optimiser_steps_follow_the_cores_mini_batch_rule(local_root, tmp_path, split):
    """One optim_step per part of ``TokenRows.mini_batches`` (every backend's rule), the parts'
    rows sent in that order."""
    cfg = config(tmp_path, "algorithm.loss.name=importance_sampling", "algorithm.optim.mini_batch_size=null")
    cfg = load_config(cfg, overrides=["algorithm.optim.mini_batch_size=2", split] if "shuffle" in split else [split])
    backend = TinkerBackend(cfg)
    state = _fixed_state(3)
    parts = state.rows.mini_batches(3, backend.seed, cfg.algorithm.optim)
    assert len(parts) > 1
    sent: list[list[int]] = []
    forward_backward = None

    async def run() -> None:
        nonlocal forward_backward
        await backend.on_train_start(TrainerState())
        forward_backward = backend.training.forward_backward

        def spy(datums, *args):
            sent.append([len(d.model_input.to_ints()) for d in datums])
            return forward_backward(datums, *args)

        backend.training.forward_backward = spy
        await backend.update_policy(state)
        await backend.shutdown()

    asyncio.run(run())
    assert state.metrics["tinker/optim_steps"] == len(parts)
    lengths = state.rows.offsets[1:] - state.rows.offsets[:-1]
    assert sent == [[int(lengths[r]) - 1 for r in part] for part in parts]


def test_resume_restores_weights_and_adam_state(local_root, tmp_path):
    async def run() -> tuple[list[float], list[float], list[float]]:
        straight = _backend(tmp_path / "a")
        await straight.on_train_start(TrainerState())
        first = await _train(straight, range(2))
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        await straight.save_checkpoint(ckpt)
        rest = await _train(straight, range(2, 4))

        resumed = _backend(tmp_path / "b")
        await resumed.load_checkpoint(ckpt)
        await resumed.on_train_start(TrainerState())  # already attached: no new client
        after = await _train(resumed, range(2, 4))

        cold = _backend(
            tmp_path / "c",
            resume_from=json.loads((ckpt / "tinker.json").read_text())["state_path"],
            resume_optimizer=False,
        )
        await cold.on_train_start(TrainerState())
        cold_after = await _train(cold, range(2, 4))
        for b in (straight, resumed, cold):
            await b.shutdown()
        return first + rest, after, cold_after

    straight, after, cold = asyncio.run(run())
    assert after == pytest.approx(straight[2:], rel=1e-6)  # same weights, same Adam moments
    assert cold[0] == pytest.approx(straight[2], rel=1e-6)  # weights alone give the same next loss...
    assert cold[1] != pytest.approx(straight[3], rel=1e-4)  # ...but the step after it needs the moments


def test_kill_and_resume_through_the_trainer_expires_old_remote_checkpoints(local_root, tmp_path):
    run = tmp_path / "run"
    common = ["trainer.save_every=2", "trainer.keep_checkpoints=1", "data.train_batch_size=4", "rollout.n=4"]
    common.append("algorithm.filter.dynamic_sampling=false")  # an update every step: 6 updates in 6 steps
    UnifiedTrainer(config(run, "trainer.total_steps=4", *common)).fit()
    service = shared_local_tinker(local_root)
    record = json.loads((run / "checkpoints" / "step_00000004" / "backend" / "tinker.json").read_text())
    live = set(service.checkpoint_paths())
    assert {record["state_path"], record["sampler_path"]} <= live
    assert len(live) == 2  # step 2's state and sampler weights were deleted with its directory

    resumed = UnifiedTrainer(config(run, "trainer.total_steps=6", *common))
    resumed.fit()
    assert resumed.resumed_from is not None and resumed.step == 6
    assert resumed.backend.updates == 6
    assert len(rewards(run)) == 6  # each step logged once


# -- the engine through the stand-in ----------------------------------------------------------


def test_engine_precedence_greedy_validation_and_context_limit(local_root, tmp_path):
    from rllm_core.engine import PROMPT_TOO_LONG, SamplingEngine

    async def run():
        backend = _backend(tmp_path / "e", context_window=16)
        await backend.on_train_start(TrainerState())
        service = shared_local_tinker(local_root)
        train = SamplingEngine(backend.engine, {"temperature": 1.0, "max_tokens": 4})
        val = SamplingEngine(backend.engine, {"temperature": 0.0, "max_tokens": 4}, is_validation=True)
        msgs = [{"role": "user", "content": "3 + 4 ="}]
        one = await train.get_model_response(msgs, max_tokens=1, stop=[])
        assert len(one.completion_ids) == 1 and one.finish_reason == "length"
        assert train.sampling == {"temperature": 1.0, "max_tokens": 4}  # a per-call change never leaks
        full = await train.get_model_response(msgs, stop=[])
        assert len(full.completion_ids) == 4
        greedy = [(await val.get_model_response(msgs)).completion_ids for _ in range(3)]
        assert greedy[0] == greedy[1] == greedy[2]
        assert one.weight_version == 0 and one.backend_data["sequence_id"]
        sent = service.calls["sample"]
        long = await train.get_model_response([{"role": "user", "content": "1 + 2 + 3 + 4 + 5 + 6 ="}])
        assert long.finish_reason == PROMPT_TOO_LONG and long.completion_ids == []
        assert service.calls["sample"] == sent  # never sent: the service would answer 400
        assert backend.engine.pop_counters()["tinker/prompt_too_long"] == 1
        clamped = await train.get_model_response([{"role": "user", "content": "1 + 2 + 3 ="}], max_tokens=10, stop=[])
        assert len(clamped.completion_ids) == 16 - len(clamped.prompt_ids) < 10  # max_tokens clamped to the room left
        await backend.shutdown()

    asyncio.run(run())


def test_reference_refresh_and_empty_batches(local_root, tmp_path):
    async def run():
        backend = _backend(tmp_path / "r", max_train_length=8)
        await backend.on_train_start(TrainerState())
        service = shared_local_tinker(local_root)
        prompt, response = [3, 11, 18, 25, 19, 26, 4, 3, 12], [16, 17, 4]
        before = await backend.engine.compute_logprobs(prompt, response)
        await backend.engine.refresh_reference()
        assert await backend.engine.compute_logprobs(prompt, response, model="reference") == pytest.approx(before)
        # every row longer than max_train_length: nothing is sent, and the step says so
        state = _fixed_state(0)
        calls = dict(service.calls)
        await backend.update_policy(state)
        assert state.metrics["tinker/dropped_rows"] == len(state.rows)
        assert state.metrics["train/skipped_updates"] == 1.0
        assert service.calls.get("forward_backward", 0) == calls.get("forward_backward", 0)
        assert service.calls.get("optim_step", 0) == calls.get("optim_step", 0)
        await backend.shutdown()

    asyncio.run(run())
