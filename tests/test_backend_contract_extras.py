"""Core pieces remote backends need: async checkpoint hooks with retention, per-role losses,
per-step backend data, prompts that do not fit, and the shared learning-rate schedule."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from pathlib import Path

import pytest

from rllm_core.checkpoint import latest_checkpoint
from rllm_core.config import ConfigError, OptimConfig, RLLMConfig
from rllm_core.engine import PROMPT_TOO_LONG
from rllm_core.testing import SimulatedBackend, simulated_config
from rllm_core.trainer import UnifiedTrainer
from rllm_core.types import ModelOutput, Step, TerminationReason, Trajectory


class AsyncSavingBackend(SimulatedBackend):
    """Saves and loads with coroutines on the trainer's loop, like a backend whose state is remote."""

    def __init__(self, config):
        super().__init__(config)
        self.remote: dict[str, dict] = {}
        self.deleted: list[str] = []
        self.loop_threads: set[str] = set()

    async def save_checkpoint(self, path: Path) -> None:
        self.loop_threads.add(threading.current_thread().name)
        asyncio.get_running_loop()  # raises outside a loop
        await asyncio.sleep(0)
        name = f"remote-{self.updates}"
        self.remote[name] = {"skill": self.skill, "updates": self.updates}
        (Path(path) / "record.json").write_text(json.dumps({"name": name}))

    async def load_checkpoint(self, path: Path) -> None:
        await asyncio.sleep(0)
        name = json.loads((Path(path) / "record.json").read_text())["name"]
        self.skill, self.updates = self.remote[name]["skill"], self.remote[name]["updates"]

    async def delete_checkpoint(self, path: Path) -> None:
        name = json.loads((Path(path) / "record.json").read_text())["name"]
        self.deleted.append(name)
        del self.remote[name]


def test_async_checkpoint_hooks_run_on_the_loop_and_expired_checkpoints_are_deleted(tmp_path):
    cfg = simulated_config(tmp_path, trainer={"total_steps": 6, "save_every": 1, "keep_checkpoints": 2})
    backend = AsyncSavingBackend(cfg)
    UnifiedTrainer(cfg, backend=backend).fit()
    assert backend.loop_threads == {threading.main_thread().name}
    # 6 saves, 2 kept: the 4 older ones were deleted remotely before their directories went.
    assert backend.deleted == ["remote-1", "remote-2", "remote-3", "remote-4"]
    assert sorted(backend.remote) == ["remote-5", "remote-6"]
    assert len(list((tmp_path / "checkpoints").glob("step_*"))) == 2

    cfg2 = simulated_config(tmp_path, trainer={"total_steps": 8, "resume": "auto"})
    resumed_backend = AsyncSavingBackend(cfg2)
    resumed_backend.remote = backend.remote
    resumed = UnifiedTrainer(cfg2, backend=resumed_backend)
    resumed.fit()
    assert resumed.resumed_from == tmp_path / "checkpoints" / "step_00000006"
    assert resumed_backend.updates == 8


def test_a_failing_remote_delete_does_not_fail_the_save(tmp_path, caplog):
    class Flaky(AsyncSavingBackend):
        async def delete_checkpoint(self, path: Path) -> None:
            raise ConnectionError("service went away")

    cfg = simulated_config(tmp_path, trainer={"total_steps": 3, "save_every": 1, "keep_checkpoints": 1})
    UnifiedTrainer(cfg, backend=Flaky(cfg)).fit()
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert len(list((tmp_path / "checkpoints").glob("step_*"))) == 1
    assert "could not delete checkpoint" in caplog.text


def test_loss_by_role_merges_over_loss_and_names_the_bad_field():
    cfg = RLLMConfig.model_validate(
        {"algorithm": {"loss": {"name": "ppo", "clip_high": 0.3}, "loss_by_role": {"judge": {"name": "cispo"}}}}
    )
    judge = cfg.algorithm.loss_for("judge")
    assert (judge.name, judge.clip_high) == ("cispo", 0.3)
    assert cfg.algorithm.loss_for("solver") is cfg.algorithm.loss
    with pytest.raises(Exception, match=r"loss_by_role\.judge\.clip_low"):
        RLLMConfig.model_validate({"algorithm": {"loss_by_role": {"judge": {"clip_low": -1}}}})


def test_the_torch_backend_refuses_per_role_losses_it_cannot_train():
    pytest.importorskip("rllm_torch")  # installed with the repo; a core-only install has no torch backend
    from rllm_torch.backend import TorchBackend

    cfg = RLLMConfig.model_validate({"algorithm": {"loss_by_role": {"judge": {"name": "ppo"}}}})
    with pytest.raises(ConfigError, match="loss_by_role"):
        TorchBackend.validate_config(object.__new__(TorchBackend), cfg)


def test_backend_data_travels_from_the_model_output_to_the_step():
    out = ModelOutput(completion_ids=[1], logprobs=[-0.1], backend_data={"sequence_id": "s-1"})
    assert Step.from_model_output(out, []).backend_data == {"sequence_id": "s-1"}
    assert Step.from_model_output(out, [], reward=1.0).backend_data == {"sequence_id": "s-1"}


def test_a_prompt_with_no_room_ends_the_episode_with_max_prompt_length(tmp_path):
    async def workflow(task, engine):
        out = ModelOutput(prompt_ids=[1, 2, 3], finish_reason=PROMPT_TOO_LONG)
        return Trajectory(steps=[Step.from_model_output(out, [], done=True)])

    cfg = simulated_config(tmp_path, trainer={"total_steps": 1})
    trainer = UnifiedTrainer(cfg, workflow=workflow)
    episodes = asyncio.run(trainer.workflow_engine.execute_tasks([{"id": "0", "question": "1+1", "answer": 2}]))
    assert {e.termination_reason for e in episodes} == {TerminationReason.MAX_PROMPT_LENGTH}


def test_lr_schedule_warms_up_then_decays_to_zero():
    cos = OptimConfig(schedule="cosine", warmup_steps=2)
    assert [cos.lr_factor(s, 10) for s in (0, 1)] == [0.5, 1.0]
    assert cos.lr_factor(2, 10) == 1.0 and cos.lr_factor(10, 10) == pytest.approx(0.0)
    assert cos.lr_factor(6, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert OptimConfig(schedule="linear").lr_factor(5, 10) == pytest.approx(0.5)
    assert OptimConfig().lr_factor(99, None) == 1.0
