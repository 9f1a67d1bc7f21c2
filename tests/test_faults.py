"""Faults in user code never kill training; each is counted in the step metrics."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from rllm_core.hookspecs import hookimpl
from rllm_core.loggers import Logger
from rllm_core.plugins import registered
from rllm_core.testing import SimulatedBackend, simulated_config, simulated_workflow
from rllm_core.trainer import UnifiedTrainer
from rllm_core.types import TerminationReason


def _metrics(tmp_path):
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def _sum(rows, key):
    return sum(r.get(key, 0.0) for r in rows)


async def faulty_workflow(task, engine):
    """Every fourth task raises, hangs, or returns garbage; the rest work."""
    kind = int(task["id"][1:]) % 4
    if kind == 1:
        raise ValueError("workflow bug")
    if kind == 2:
        await asyncio.sleep(10)
    if kind == 3:
        return {"not": "an episode"}
    return await simulated_workflow(task, engine)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_workflow_faults_become_counted_error_episodes(tmp_path, mode):
    cfg = simulated_config(
        tmp_path,
        loggers={"jsonl": {}},
        trainer={"mode": mode},
        workflow={"name": None, "timeout": 0.05},  # the workflow is passed in
        rollout={"n": 2},
    )
    trainer = UnifiedTrainer(cfg, workflow=faulty_workflow)
    trainer.fit()
    rows = _metrics(tmp_path)
    assert trainer.step == 8
    assert _sum(rows, "workflow/errors") == 8 * 2
    assert _sum(rows, "workflow/timeouts") == 8 * 2
    assert _sum(rows, "workflow/malformed") == 8 * 2
    assert _sum(rows, "train/episodes/termination/error") == 16 * 2
    assert _sum(rows, "train/episodes/termination/timeout") == 8 * 2
    # A batch whose episodes all failed has no group to train on: that step skips its update.
    assert trainer.backend.updates == 8 - _sum(rows, "train/skipped_updates") > 0
    episodes = [json.loads(x) for x in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    errors = [e for e in episodes if e["termination_reason"] == TerminationReason.ERROR.value]
    assert any("ValueError: workflow bug" in e["info"]["error"] for e in errors)


def test_reward_that_raises_or_hangs_scores_zero_and_is_counted(tmp_path):
    def reward(task, action):
        n = int(task["id"][1:])
        if n % 3 == 1:
            raise RuntimeError("reward bug")
        if n % 3 == 2:
            time.sleep(0.5)
        return 1.0

    cfg = simulated_config(
        tmp_path,
        loggers={"jsonl": {}},
        reward={"name": None, "timeout": 0.05},  # the reward is passed in
        trainer={"total_steps": 3},
        rollout={"n": 2},
    )
    trainer = UnifiedTrainer(cfg, reward_fn=reward)
    trainer.fit()
    rows = _metrics(tmp_path)
    tasks = [t for r in trainer.backend.trained for t in r["batch_ids"]]
    expect_err = sum(int(t[1:]) % 3 == 1 for t in tasks) * 2
    expect_to = sum(int(t[1:]) % 3 == 2 for t in tasks) * 2
    assert expect_err and expect_to
    assert _sum(rows, "reward/errors") == expect_err
    assert _sum(rows, "reward/timeouts") == expect_to
    good = sum(int(t[1:]) % 3 == 0 for t in tasks) * 2
    assert _sum(rows, "train/correct_frac") * 8 == pytest.approx(good)


class _BrokenLogger(Logger):
    def log_metrics(self, step, metrics):
        if step >= 2:
            raise OSError("log server down")


def test_logger_that_raises_is_disabled_and_training_goes_on(tmp_path):
    class Plugin:
        @hookimpl
        def register_loggers(self, register):
            register("broken", _BrokenLogger)

    with registered(Plugin()):
        cfg = simulated_config(tmp_path, loggers={"broken": {}, "jsonl": {}})
        trainer = UnifiedTrainer(cfg)
        with pytest.warns(RuntimeWarning, match="broken"):
            trainer.fit()
    rows = _metrics(tmp_path)
    assert trainer.step == 8 and len(rows) == 8
    assert rows[-1]["loggers/failures"] == 1.0
    assert "broken" not in trainer.logger.loggers


def test_hook_that_raises_is_counted(tmp_path):
    class Bad:
        def __init__(self, settings):
            pass

        @hookimpl
        def on_batch_end(self, trainer, metrics):
            raise RuntimeError("hook bug")

    class Plugin:
        @hookimpl
        def register_hooks(self, register):
            register("bad", Bad)

    with registered(Plugin()):
        trainer = UnifiedTrainer(simulated_config(tmp_path, hooks={"bad": {}}, loggers={"jsonl": {}}))
        with pytest.warns(RuntimeWarning, match="hook bug"):
            trainer.fit()
    assert trainer.step == 8 and trainer.runner.failures == {"bad.on_batch_end": 8}
    # Per step, like every other counter: each step's call fails after that step was logged.
    assert [r["hooks/failures"] for r in _metrics(tmp_path)] == [0.0] + [1.0] * 7


class _FlakyGeneration(SimulatedBackend):
    """``generate_episodes`` raises when ``fails(task_id, attempt)`` says so (attempt counts from 1)."""

    def __init__(self, config, fails):
        super().__init__(config)
        self.fails = fails
        self.attempts = {}

    async def generate_episodes(self, batch, workflow_engine, is_validation=False):
        task_id = batch[0]["id"]
        self.attempts[task_id] = attempt = self.attempts.get(task_id, 0) + 1
        if not is_validation and self.fails(task_id, attempt):
            raise RuntimeError("sampler hiccup")
        return await super().generate_episodes(batch, workflow_engine, is_validation)


def _flaky_run(tmp_path, fails, **async_):
    cfg = simulated_config(
        tmp_path, trainer={"mode": "async"}, async_=async_, hooks={"rllm_core.testing:RecordingHooks": {}}
    )
    trainer = UnifiedTrainer(cfg, backend=_FlakyGeneration(cfg, fails))
    trainer.fit()
    per_step = trainer.hook_plugins["rllm_core.testing:RecordingHooks"].metrics_by_step.values()
    totals = {k: sum(m.get(k, 0.0) for m in per_step) for k in ("async/requeued", "async/given_up")}
    trained = sorted(t for r in trainer.backend.trained for t in r["task_ids"])
    return trainer, totals, trained


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("max_staleness", "fails", "n_failures"),
    [
        (0, lambda task_id, attempt: task_id == "t0" and attempt == 1, 1),  # once
        (1, lambda task_id, attempt: int(task_id[1:]) % 5 == 0 and attempt == 1, 7),  # every 5th task
    ],
)
def test_async_generation_failure_is_retried_not_a_deadlock(tmp_path, max_staleness, fails, n_failures):
    trainer, totals, trained = _flaky_run(tmp_path, fails, max_staleness=max_staleness)
    assert trainer.step == 8
    assert trained == sorted(f"t{i}" for i in range(32))
    assert totals == {"async/requeued": n_failures, "async/given_up": 0}


@pytest.mark.timeout(60)
def test_async_task_that_keeps_failing_is_given_up_after_max_requeues(tmp_path):
    trainer, totals, trained = _flaky_run(tmp_path, lambda task_id, attempt: task_id == "t3", max_requeues=2)
    assert trainer.backend.attempts["t3"] == 3
    assert totals == {"async/requeued": 2, "async/given_up": 1}
    assert trained == sorted(f"t{i}" for i in range(32) if i != 3)


async def _raises_on_t5(task, engine):
    if task["id"] == "t5":
        raise ValueError("workflow bug")
    return await simulated_workflow(task, engine)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_raise_on_error_stops_training_with_the_workflow_error(tmp_path, mode):
    cfg = simulated_config(tmp_path, trainer={"mode": mode}, workflow={"name": "simulated", "raise_on_error": True})
    trainer = UnifiedTrainer(cfg, workflow=_raises_on_t5)
    with pytest.raises(ValueError, match="workflow bug"):
        trainer.fit()
    assert trainer.backend.calls[-1] == "shutdown"


def test_workflow_error_traceback_is_not_chained_to_the_trainers_internals(tmp_path):
    errors = []

    class Collect:
        def __init__(self, settings):
            pass

        @hookimpl
        def on_batch_end(self, trainer, metrics):
            errors.extend(e.info["error"] for e in trainer.state.episodes if "error" in e.info)

    class Plugin:
        @hookimpl
        def register_hooks(self, register):
            register("collect", Collect)

    with registered(Plugin()):
        cfg = simulated_config(tmp_path, workflow={"name": "simulated"}, hooks={"collect": {}})
        UnifiedTrainer(cfg, workflow=_raises_on_t5).fit()
    assert errors and all("ValueError: workflow bug" in e for e in errors)
    assert not any("no running event loop" in e or "During handling" in e for e in errors)
