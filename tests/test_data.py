"""Task loading (inline, JSONL, Parquet, module:attr), ids, validation split, seeded resumable loader."""

from __future__ import annotations

import json

import pytest

from rllm_core.config import ConfigError, DataConfig
from rllm_core.data import TaskLoader, load_tasks, load_train_val

ROWS = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]


def test_jsonl_json_and_inline_give_the_same_tasks(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    js = tmp_path / "t.json"
    js.write_text(json.dumps(ROWS))
    assert load_tasks(str(jsonl)) == load_tasks(str(js)) == load_tasks(ROWS) == ROWS


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_tasks(str(path)) == ROWS


def test_module_attr_callable():
    tasks = load_tasks("rllm_core.testing:simulated_tasks")
    assert len(tasks) == 64 and tasks[0]["id"] == "t0"


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train: file not found"):
        load_tasks(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
        load_tasks(str(bad))
    with pytest.raises(ConfigError, match=r"data.val\[1\]"):
        load_tasks([{"a": 1}, "nope"], "data.val")
    with pytest.raises(ConfigError, match="unsupported file type"):
        (tmp_path / "t.csv").write_text("a\n")
        load_tasks(str(tmp_path / "t.csv"))


def test_ids_default_to_row_index_and_val_fraction_is_seeded():
    rows = [dict(r) for r in ROWS] + [{"id": 99, "question": "q"}]
    train, val = load_train_val(DataConfig(train=rows, val_fraction=0.3), seed=1)
    _, again_val = load_train_val(DataConfig(train=[dict(r) for r in rows], val_fraction=0.3), seed=1)
    assert [t["id"] for t in val] == [t["id"] for t in again_val]
    assert len(val) == 3 and len(train) == 8
    assert {t["id"] for t in train} | {t["id"] for t in val} == {*(str(i) for i in range(10)), 99}
    _, other_val = load_train_val(DataConfig(train=[dict(r) for r in rows], val_fraction=0.3), seed=2)
    assert [t["id"] for t in other_val] != [t["id"] for t in val]


def test_loader_shuffles_per_epoch_deterministically():
    tasks = [{"id": str(i)} for i in range(10)]
    a = [[t["id"] for t in b] for _, b in TaskLoader(tasks, 3, epochs=2, seed=5)]
    b = [[t["id"] for t in b] for _, b in TaskLoader(tasks, 3, epochs=2, seed=5)]
    assert a == b and len(a) == 8  # 4 batches per epoch, the last one partial
    epoch0 = [x for batch in a[:4] for x in batch]
    epoch1 = [x for batch in a[4:] for x in batch]
    assert sorted(epoch0) == sorted(epoch1) == sorted(str(i) for i in range(10))
    assert epoch0 != epoch1
    unshuffled = [t["id"] for _, b in TaskLoader(tasks, 4, shuffle=False) for t in b]
    assert unshuffled == [str(i) for i in range(10)]


def test_loader_resumes_mid_epoch_onto_the_same_batches():
    tasks = [{"id": str(i)} for i in range(10)]
    full = list(TaskLoader(tasks, 3, epochs=3, seed=1))
    first = TaskLoader(tasks, 3, epochs=3, seed=1)
    for _ in range(5):
        first.next_batch()
    second = TaskLoader(tasks, 3, epochs=3, seed=1)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert list(second) == full[5:]


def test_empty_training_data_is_an_error():
    with pytest.raises(ConfigError, match=r"data\.train"):
        TaskLoader([], 4)
