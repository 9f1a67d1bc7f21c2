"""Built-in loggers: the console progress bar and the JSONL files."""

from __future__ import annotations

import io
import json

from rllm_core.builtins.loggers import ConsoleLogger, JsonlLogger
from rllm_core.plugins import get_registry
from rllm_core.types import Episode, Step, Trajectory


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_console_redraws_one_line_with_key_metrics():
    out = _Tty()
    logger = ConsoleLogger({"keys": ["train/loss"]}, stream=out)
    for step in (1, 2, 3):
        logger.log_metrics(step, {"trainer/total_steps": 10, "train/reward/mean": 0.25 * step, "train/loss": 1.5})
    logger.log_metrics(3, {"val/pass@1": 0.5})
    logger.close()
    text = out.getvalue()
    assert text.count("\r") == 3
    last_bar = text.split("\r")[-1]
    assert "3/10" in last_bar and "reward 0.75" in last_bar and "loss 1.5" in last_bar and "it/s" in last_bar
    assert "validation @ step 3: val/pass@1 0.5" in text
    assert text.endswith("\n")


def test_console_prints_lines_when_not_a_terminal():
    out = io.StringIO()
    logger = ConsoleLogger({"every": 2}, stream=out)
    for step in range(1, 6):
        logger.log_metrics(step, {"trainer/total_steps": 5, "train/reward/mean": 1.0})
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split("]")[1].split()[0] for line in lines] == ["2/5", "4/5", "5/5"]


def test_jsonl_writes_metrics_and_episodes(tmp_path):
    logger = JsonlLogger({}, run_dir=tmp_path)
    logger.log_metrics(1, {"a": 1.0})
    ep = Episode(
        task={"q": 1},
        task_id="t",
        trajectories=[Trajectory(steps=[Step(chat_completions=[{"role": "user", "content": "hi"}])])],
    )
    logger.log_episodes(1, [ep])
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "a": 1.0}
    rec = json.loads((tmp_path / "episodes.jsonl").read_text())
    assert rec["task"] == {"q": 1} and rec["trajectories"][0]["steps"][0]["chat_completions"][0]["content"] == "hi"


def test_builtin_loggers_are_registered_plugins():
    reg = get_registry()
    assert reg.resolve("logger", "console") is ConsoleLogger
    assert reg.resolve("logger", "jsonl") is JsonlLogger
    assert reg.get("backend", "simulated").options["priority"] == -100
