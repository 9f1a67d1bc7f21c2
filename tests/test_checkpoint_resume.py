"""Checkpoints are atomic, resume restores everything, and a SIGKILLed run resumes onto the same batches."""

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

from rllm_core.checkpoint import latest_checkpoint, resolve_resume, save_checkpoint
from rllm_core.config import ConfigError
from rllm_core.testing import SimulatedBackend, simulated_config
from rllm_core.trainer import UnifiedTrainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _resume_worker import make_config  # noqa: E402


def _trace(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _batches_by_step(records: list[dict]) -> dict[int, list[str]]:
    return {r["step"]: r["batch_ids"] for r in records}  # a redone step overwrites: last write wins


def test_sigkill_between_steps_then_resume_sees_the_same_batches(tmp_path):
    ref_trace = tmp_path / "ref.jsonl"
    UnifiedTrainer(make_config(str(tmp_path / "ref"), str(ref_trace))).fit()
    reference = _batches_by_step(_trace(ref_trace))
    assert len(reference) == 16

    run_dir, trace = tmp_path / "run", tmp_path / "run.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_resume_worker.py"), str(run_dir), str(trace), "sync"], env=env
    )
    deadline = time.monotonic() + 30
    while len(_trace(trace)) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "worker finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before_kill = _trace(trace)
    assert 6 <= len(before_kill) < 16

    resumed = UnifiedTrainer(make_config(str(run_dir), str(trace)))
    resumed.fit()
    assert resumed.resumed_from is not None
    records = _trace(trace)
    first_resumed = records[len(before_kill)]
    assert 0 < first_resumed["step"] <= len(before_kill)
    assert _batches_by_step(records) == reference
    # The backend's own state came back too: its update counter continues from the checkpoint.
    assert all(r["update"] == r["step"] + 1 for r in records)
    # Steps logged after the checkpoint by the killed run were dropped on resume, so each appears once.
    logged = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 17))


def test_resume_restores_step_version_loader_and_backend(tmp_path):
    cfg = simulated_config(tmp_path, trainer={"total_steps": 3, "resume": "auto", "epochs": 2})
    first = UnifiedTrainer(cfg)
    first.fit()
    cfg2 = simulated_config(tmp_path, trainer={"resume": "auto", "epochs": 2})
    second = UnifiedTrainer(cfg2)
    asyncio.run(second._maybe_resume())
    assert second.step == 3 and second.weight_version == 3 and second.engine.weight_version == 3
    assert second.loader.state_dict() == first.loader.state_dict()
    assert second.backend.skill == pytest.approx(first.backend.skill)
    assert second.backend.rollout_engine.served_skill == pytest.approx(first.backend.skill)


def test_resume_off_starts_fresh(tmp_path):
    UnifiedTrainer(simulated_config(tmp_path, trainer={"total_steps": 2})).fit()
    fresh = UnifiedTrainer(simulated_config(tmp_path, trainer={"resume": "off", "total_steps": 1}))
    fresh.fit()
    assert fresh.resumed_from is None and fresh.backend.updates == 1


def test_resume_from_explicit_path_and_bad_path(tmp_path):
    UnifiedTrainer(simulated_config(tmp_path / "a", trainer={"total_steps": 2, "save_every": 1})).fit()
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000001"
    assert resolve_resume(str(ckpt), tmp_path) == ckpt
    assert resolve_resume(str(tmp_path / "a"), tmp_path).name == "step_00000002"
    with pytest.raises(ConfigError, match=r"trainer\.resume"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)


class _CrashingSave(SimulatedBackend):
    def save_checkpoint(self, path):
        (Path(path) / "partial.bin").write_bytes(b"x" * 10)
        raise OSError("disk full")


def test_failed_save_leaves_no_directory_resume_would_pick(tmp_path):
    cfg = simulated_config(tmp_path, trainer={"total_steps": 2, "save_every": 1})
    good = SimulatedBackend(cfg)
    good.init_rollout_engine()
    save_checkpoint(tmp_path, 1, {"step": 1}, good)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"step": 2}, _CrashingSave(cfg))
    (tmp_path / "checkpoints" / "step_00000009").mkdir()  # no trainer_state.json: incomplete
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_keep_checkpoints_prunes_old_ones(tmp_path):
    UnifiedTrainer(simulated_config(tmp_path, trainer={"save_every": 1, "keep_checkpoints": 2})).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000007", "step_00000008"]


def test_async_resume_regenerates_pending_tasks(tmp_path):
    overrides = {"mode": "async", "resume": "auto"}
    sim = {"gen_latency": 0.005, "train_latency": 0.005}
    first = UnifiedTrainer(
        simulated_config(tmp_path, trainer={**overrides, "total_steps": 3}, simulated=sim, async_={"max_staleness": 4})
    )
    first.fit()
    assert first.step == 3 and first._pending  # tasks in flight or queued at the stop
    second = UnifiedTrainer(simulated_config(tmp_path, trainer=overrides, simulated=sim, async_={"max_staleness": 4}))
    second.fit()
    trained = [t for b in (first.backend, second.backend) for r in b.trained for t in r["task_ids"]]
    assert sorted(trained) == sorted(f"t{i}" for i in range(32))


@pytest.mark.timeout(60)
def test_resume_restores_the_trainers_weight_version_not_the_served_one(tmp_path):
    """With sync_every 2, the step-3 checkpoint holds 3 updates while the sampler serves version 2."""
    sync = {"sync_every": 2, "max_staleness": 1}
    first = UnifiedTrainer(
        simulated_config(
            tmp_path, trainer={"mode": "async", "save_every": 1, "total_steps": 3, "keep_checkpoints": 5}, async_=sync
        )
    )
    first.fit()
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    saved = json.loads((ckpt / "trainer_state.json").read_text())
    assert (saved["weight_version"], saved["served_version"]) == (3, 2)

    second = UnifiedTrainer(simulated_config(tmp_path, trainer={"mode": "async", "resume": str(ckpt)}, async_=sync))
    second.fit()
    # The sampler is synced to the loaded weights first, then every 2 steps, then the last update.
    assert second.backend.policy_versions == [3, 5, 7, 8]
    assert second.weight_version == second.backend.updates == 8


class _CrashOnFourthUpdate(SimulatedBackend):
    async def update_policy(self, state):
        if self.updates == 3:
            raise RuntimeError("out of memory")
        await super().update_policy(state)


@pytest.mark.timeout(60)
def test_resume_after_a_crash_logs_each_step_once_and_says_where_it_resumed(tmp_path, capsys):
    sections = {"loggers": {"jsonl": {}, "console": {}}}
    cfg = simulated_config(tmp_path, trainer={"save_every": 2}, **sections)
    with pytest.raises(RuntimeError, match="out of memory"):
        UnifiedTrainer(cfg, backend=_CrashOnFourthUpdate(cfg)).fit()  # steps 1-3 logged, checkpoint at 2
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    capsys.readouterr()

    UnifiedTrainer(simulated_config(tmp_path, trainer={"resume": "auto"}, **sections)).fit()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    episode_steps = [json.loads(x)["step"] for x in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert sorted(set(episode_steps)) == episode_steps[::4] == list(range(1, 9))
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000002'} at step 2" in capsys.readouterr().err
