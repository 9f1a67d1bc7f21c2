"""Built-in loggers: the console progress bar and the JSONL files."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest

from rllm_core.builtins.loggers import ConsoleLogger, JsonlLogger
from rllm_core.loggers import Logger, MultiLogger
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


class _SlowRemote(Logger):
    """A logger whose calls block like an HTTP request."""

    blocking = True

    def __init__(self, settings=None, **kw):
        super().__init__(settings, **kw)
        self.seen = []
        self.threads = set()
        self.closed = False

    def log_metrics(self, step, metrics):
        time.sleep(0.05)
        self.threads.add(threading.current_thread())
        if metrics.get("fail"):
            raise OSError("server down")
        self.seen.append((step, dict(metrics)))

    def close(self):
        self.closed = True


def test_blocking_logger_runs_in_order_on_its_own_thread_and_is_flushed_at_close():
    slow = _SlowRemote()
    multi = MultiLogger({"slow": slow})
    start = time.perf_counter()
    for step in range(1, 6):
        metrics = {"x": float(step)}
        multi.log_metrics(step, metrics)
        metrics["x"] = -1.0  # the caller may reuse its dict: what was logged is a copy
    assert time.perf_counter() - start < 0.2  # the caller did not wait for the writes (5 x 0.05 s)
    multi.close()
    assert slow.seen == [(step, {"x": float(step)}) for step in range(1, 6)] and slow.closed
    assert len(slow.threads) == 1 and threading.main_thread() not in slow.threads


def test_blocking_logger_that_raises_is_disabled_with_a_warning():
    slow = _SlowRemote()
    multi = MultiLogger({"slow": slow})
    multi.log_metrics(1, {"fail": 1.0})
    multi.log_metrics(2, {"x": 2.0})
    with pytest.warns(RuntimeWarning, match=r"logger 'slow' raised.*server down"):
        multi.close()
    assert multi.failures == {"slow": 1} and slow.seen == []


def _records(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_jsonl_drops_what_an_interrupted_run_logged_after_the_resumed_step(tmp_path):
    first = JsonlLogger({}, run_dir=tmp_path)
    ep = Episode(task={"q": 1}, task_id="t")
    for step in (1, 2, 3):
        first.log_metrics(step, {"a": float(step)})
        first.log_episodes(step, [ep])
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "a": ')  # a line cut short by a kill

    resumed = JsonlLogger({}, run_dir=tmp_path)
    resumed.on_resume(2, tmp_path / "checkpoints" / "step_00000002")
    resumed.log_metrics(3, {"a": 30.0})
    resumed.close()
    assert _records(tmp_path / "metrics.jsonl") == [
        {"step": 1, "a": 1.0},
        {"step": 2, "a": 2.0},
        {"step": 3, "a": 30.0},
    ]
    assert [r["step"] for r in _records(tmp_path / "episodes.jsonl")] == [1, 2]


def test_console_says_which_checkpoint_it_resumed_from(tmp_path):
    out = io.StringIO()
    logger = ConsoleLogger({}, stream=out)
    logger.on_resume(12, tmp_path / "step_00000012")
    assert out.getvalue() == f"rllm: resumed from {tmp_path / 'step_00000012'} at step 12\n"
