"""Atomic checkpoints: trainer state plus whatever the backend saves.

Layout::

    <run_dir>/checkpoints/step_00000012/
        trainer_state.json   step, epoch, weight version, data loader position, config
        rng.pkl              python and numpy global RNG states
        backend/             the backend's own files (``Backend.save_checkpoint(path)``)

A checkpoint is written into a hidden temporary directory next to its final place, flushed, and
renamed with ``os.replace``: a directory named ``step_*`` is always complete, so a run killed while
saving resumes from the previous checkpoint. ``trainer_state.json`` is written last, and
:func:`latest_checkpoint` only considers directories that have it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["latest_checkpoint", "load_checkpoint", "resolve_resume", "rng_state", "save_checkpoint"]

STATE_FILE = "trainer_state.json"
_PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """The python (and numpy, when imported) global RNG states, as :func:`save_checkpoint` stores them."""
    state: dict[str, Any] = {"python": random.getstate()}
    np = sys.modules.get("numpy")  # only if someone uses it; importing numpy costs 100+ ms
    if np is not None:
        state["numpy"] = np.random.get_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    backend: Any,
    keep: int = 2,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint for ``step`` atomically; keep the newest ``keep``.

    ``rng``: the :func:`rng_state` to store, taken by a caller that writes from a thread while
    its event loop goes on drawing numbers (default: the states now).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    backend_dir = tmp / "backend"
    backend_dir.mkdir()
    backend.save_checkpoint(backend_dir)
    with (tmp / "rng.pkl").open("wb") as f:
        pickle.dump(rng if rng is not None else rng_state(), f)
        f.flush()
        os.fsync(f.fileno())
    with (tmp / STATE_FILE).open("w", encoding="utf-8") as f:
        json.dump(trainer_state, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved twice (e.g. save_every and the end of training)
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for stale in _checkpoints(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in root.glob(".tmp-*"):
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def _checkpoints(root: Path) -> list[Path]:
    found = []
    for path in root.glob(f"{_PREFIX}*"):
        if (path / STATE_FILE).is_file():
            try:
                found.append((int(path.name[len(_PREFIX) :]), path))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir/checkpoints`` (None if there is none)."""
    found = _checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint that ``trainer.resume`` (``auto``, ``off`` or a path) points to."""
    if resume == "off":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        from rllm_core.config import ConfigError

        raise ConfigError(f"trainer.resume: no checkpoint at {path} (expected a step_* directory or a run dir)")
    return found


def load_checkpoint(path: Path, backend: Any) -> dict[str, Any]:
    """Restore RNG states and the backend from ``path``; return the trainer state dict."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    rng_file = path / "rng.pkl"
    if rng_file.is_file():
        with rng_file.open("rb") as f:
            _set_rng_state(pickle.load(f))
    backend.load_checkpoint(path / "backend")
    return state
