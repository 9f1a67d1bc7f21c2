"""Atomic checkpoints: trainer state plus whatever the backend saves.

Layout::

    <run_dir>/checkpoints/step_00000012/
        trainer_state.json   step, epoch, weight version, data loader position, config
        rng.pkl              python and numpy global RNG states
        backend/             the backend's own files (``Backend.save_checkpoint(path)``)

A backend's ``save_checkpoint`` / ``load_checkpoint`` may be coroutines (a save that goes over the
network); an optional ``delete_checkpoint(path)`` is called for each checkpoint dropped by
``keep`` before its directory goes, so a backend can expire what it keeps elsewhere (remote copies).

A checkpoint is written into a hidden temporary directory next to its final place, flushed, and
renamed with ``os.replace``: a directory named ``step_*`` is always complete, so a run killed while
saving resumes from the previous checkpoint. ``trainer_state.json`` is written last, and
:func:`latest_checkpoint` only considers directories that have it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "latest_checkpoint",
    "load_checkpoint",
    "load_checkpoint_async",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "save_checkpoint_async",
]

log = logging.getLogger(__name__)

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


def _begin(run_dir: Path, step: int) -> tuple[Path, Path, Path]:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "backend").mkdir(parents=True)
    return root, tmp, final


def _finish(
    root: Path, tmp: Path, final: Path, trainer_state: dict[str, Any], rng: dict[str, Any] | None, keep: int
) -> list[Path]:
    """Seal ``tmp`` as ``final``; return the checkpoints now beyond ``keep`` (the caller deletes them)."""
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
    for leftover in root.glob(".tmp-*"):
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return _checkpoints(root)[:-keep]


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn)


def _delete_sync(stale: list[Path], backend: Any) -> None:
    delete = getattr(backend, "delete_checkpoint", None)
    for path in stale:
        if delete is not None:
            try:
                delete(path / "backend")
            except Exception as exc:  # a remote copy left behind must not fail the save
                log.warning("backend could not delete checkpoint %s: %s", path, exc)
        shutil.rmtree(path, ignore_errors=True)


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
    its event loop goes on drawing numbers (default: the states now). A backend whose
    ``save_checkpoint`` is a coroutine needs :func:`save_checkpoint_async` (this runs it on a new
    event loop when none is running in this thread).
    """
    if _is_async(backend.save_checkpoint) or _is_async(getattr(backend, "delete_checkpoint", None)):
        return _run_new_loop(save_checkpoint_async(run_dir, step, trainer_state, backend, keep, rng))
    root, tmp, final = _begin(run_dir, step)
    backend.save_checkpoint(tmp / "backend")
    _delete_sync(_finish(root, tmp, final, trainer_state, rng, keep), backend)
    return final


async def save_checkpoint_async(
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    backend: Any,
    keep: int = 2,
    rng: dict[str, Any] | None = None,
) -> Path:
    """:func:`save_checkpoint` for an event loop: files are written in threads; a backend's
    ``save_checkpoint`` / ``delete_checkpoint`` that are coroutines are awaited here (network
    saves, e.g. Tinker's), plain ones run in a thread. The loop keeps running meanwhile."""
    root, tmp, final = await asyncio.to_thread(_begin, run_dir, step)
    await _call(backend.save_checkpoint, tmp / "backend")
    stale = await asyncio.to_thread(_finish, root, tmp, final, trainer_state, rng, keep)
    delete = getattr(backend, "delete_checkpoint", None)
    for path in stale:
        if delete is not None:
            try:
                await _call(delete, path / "backend")
            except Exception as exc:  # a remote copy left behind must not fail the save
                log.warning("backend could not delete checkpoint %s: %s", path, exc)
        await asyncio.to_thread(shutil.rmtree, path, True)
    return final


async def _call(fn: Any, *args: Any) -> Any:
    if _is_async(fn):
        return await fn(*args)
    return await asyncio.to_thread(fn, *args)


def _run_new_loop(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError("this backend saves and loads asynchronously: await the *_async checkpoint functions")


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


def _read_state(path: Path) -> dict[str, Any]:
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    rng_file = path / "rng.pkl"
    if rng_file.is_file():
        with rng_file.open("rb") as f:
            _set_rng_state(pickle.load(f))
    return state


def load_checkpoint(path: Path, backend: Any) -> dict[str, Any]:
    """Restore RNG states and the backend from ``path``; return the trainer state dict."""
    path = Path(path)
    if _is_async(backend.load_checkpoint):
        return _run_new_loop(load_checkpoint_async(path, backend))
    state = _read_state(path)
    backend.load_checkpoint(path / "backend")
    return state


async def load_checkpoint_async(path: Path, backend: Any) -> dict[str, Any]:
    """:func:`load_checkpoint` for an event loop (awaits a coroutine ``load_checkpoint``)."""
    path = Path(path)
    state = await asyncio.to_thread(_read_state, path)
    await _call(backend.load_checkpoint, path / "backend")
    return state
