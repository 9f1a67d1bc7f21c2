"""Tasks: loading, validation split, and a resumable, seeded batch loader.

A task is a plain dict. ``data.train``/``data.val`` may be an inline list of dicts, a JSONL or
JSON file, a Parquet file (needs ``pyarrow``: ``pip install rllm-core[parquet]``), or a
``module:attr`` naming a list or a callable that returns one (generated example data).

Every task gets ``task[data.id_key]`` set to its row index (as a string) when it has no id, so
``task_id`` is stable across runs and resumes. The loader's order is a pure function of
``(seed, epoch)``; its whole state is ``(epoch, position)``, which is what makes a resumed run see
exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rllm_core.config import ConfigError, DataConfig

__all__ = ["TaskLoader", "load_tasks", "load_train_val"]


def _read_file(path: Path, field: str) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ConfigError(f"{field}: {path}:{lineno}: invalid JSON: {exc.msg}") from None
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else data.get("tasks", data)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"{field}: reading {path} needs pyarrow; pip install rllm-core[parquet]") from None
        return pq.read_table(path).to_pylist()
    raise ConfigError(f"{field}: unsupported file type {path.suffix!r} ({path}); use .jsonl, .json or .parquet")


def load_tasks(source: Any, field: str = "data.train") -> list[dict[str, Any]]:
    """Load a list of task dicts from any supported ``source`` (see the module docstring)."""
    if source is None:
        return []
    if isinstance(source, str):
        path = Path(source)
        if path.exists():
            rows: Any = _read_file(path, field)
        elif ":" in source and not source.endswith((".jsonl", ".json", ".parquet")):
            from rllm_core.plugins import import_object

            try:
                obj = import_object(source)
            except (ImportError, AttributeError, ValueError) as exc:
                raise ConfigError(f"{field}: cannot import {source!r}: {exc}") from None
            rows = obj() if callable(obj) else obj
        else:
            raise ConfigError(f"{field}: file not found: {source}")
    else:
        rows = source
    if not isinstance(rows, Sequence) or isinstance(rows, str):
        raise ConfigError(f"{field}: expected a list of task dicts, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ConfigError(f"{field}[{i}]: a task must be a dict, got {type(row).__name__}")
    return [dict(r) for r in rows]


def _with_ids(rows: list[dict[str, Any]], id_key: str) -> list[dict[str, Any]]:
    for i, row in enumerate(rows):
        if row.get(id_key) is None:
            row[id_key] = str(i)
    return rows


def load_train_val(data: DataConfig, seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and validation tasks, ids filled; ``val_fraction`` holds out a seeded random subset."""
    train = _with_ids(load_tasks(data.train, "data.train"), data.id_key)
    if data.val is not None:
        val = _with_ids(load_tasks(data.val, "data.val"), data.id_key)
    elif data.val_fraction > 0 and train:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        k = max(1, round(len(train) * data.val_fraction))
        held = set(order[:k])
        val = [train[i] for i in sorted(held)]
        train = [t for i, t in enumerate(train) if i not in held]
    else:
        val = []
    return train, val


class TaskLoader:
    """Batches of tasks over epochs, shuffled per epoch with ``seed``; resumable mid-epoch."""

    def __init__(
        self, tasks: list[dict[str, Any]], batch_size: int, *, epochs: int = 1, shuffle: bool = True, seed: int = 0
    ) -> None:
        if not tasks:
            raise ConfigError("data.train: no training tasks")
        self.tasks = tasks
        self.batch_size = batch_size
        self.epochs = epochs
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0
        """Index of the next task within the current epoch's order."""
        self._order_cache: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        """The task order of ``epoch``: a pure function of ``(seed, epoch)``."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        order = list(range(len(self.tasks)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        self._order_cache = (epoch, order)
        return order

    def task_at(self, epoch: int, position: int) -> dict[str, Any]:
        return self.tasks[self.order(epoch)[position]]

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.tasks) // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs

    def next_batch(self) -> tuple[int, list[dict[str, Any]]] | None:
        """``(epoch, tasks)`` of the next batch, or None when all epochs are done."""
        if self.finished:
            return None
        epoch, start = self.epoch, self.position
        end = min(start + self.batch_size, len(self.tasks))
        order = self.order(epoch)
        batch = [self.tasks[i] for i in order[start:end]]
        self.position = end
        if self.position >= len(self.tasks):
            self.epoch, self.position = epoch + 1, 0
        return epoch, batch

    def next_task(self) -> tuple[int, int, dict[str, Any]] | None:
        """``(epoch, position, task)`` of the next task (the async generation loop's unit)."""
        if self.finished:
            return None
        epoch, pos = self.epoch, self.position
        task = self.task_at(epoch, pos)
        self.position += 1
        if self.position >= len(self.tasks):
            self.epoch, self.position = epoch + 1, 0
        return epoch, pos, task

    def __iter__(self) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        while (item := self.next_batch()) is not None:
            yield item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_tasks": len(self.tasks)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("num_tasks", len(self.tasks)) != len(self.tasks):
            import warnings

            warnings.warn(
                f"resuming with {len(self.tasks)} training tasks but the checkpoint saw {state['num_tasks']}; "
                "the batch sequence will differ from the original run",
                RuntimeWarning,
                stacklevel=2,
            )
        self.epoch = int(state["epoch"])
        self.position = min(int(state["position"]), len(self.tasks))
