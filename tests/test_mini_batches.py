"""How a training step's rows are split into optimiser steps (every backend's rule)."""

from __future__ import annotations

import pytest

from rllm_core.rows import mini_batches


def test_one_step_on_all_rows_without_a_mini_batch_size():
    assert mini_batches(5, step=0, seed=0, mini_batch_size=None, epochs=1) == [[0, 1, 2, 3, 4]]
    assert mini_batches(5, step=0, seed=0, mini_batch_size=8, epochs=1) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize(("n", "size", "epochs"), [(9, 4, 1), (9, 4, 2), (8, 3, 3), (5, 5, 2)])
def test_each_epoch_covers_every_row_once_in_mini_batches_of_at_most_the_size(n, size, epochs):
    parts = mini_batches(n, step=2, seed=1, mini_batch_size=size, epochs=epochs)
    per_epoch = -(-n // size)
    assert len(parts) == per_epoch * epochs
    for e in range(epochs):
        epoch = parts[e * per_epoch : (e + 1) * per_epoch]
        assert sorted(i for part in epoch for i in part) == list(range(n))
        assert all(len(part) <= size for part in epoch)


def test_the_shuffle_depends_on_the_seed_and_the_step_only():
    a = mini_batches(20, step=1, seed=0, mini_batch_size=4, epochs=1)
    assert a == mini_batches(20, step=1, seed=0, mini_batch_size=4, epochs=1)
    assert a != mini_batches(20, step=2, seed=0, mini_batch_size=4, epochs=1)
    assert a != mini_batches(20, step=1, seed=1, mini_batch_size=4, epochs=1)


@pytest.mark.parametrize("epochs", [1, 2])
def test_shuffling_groups_keeps_each_groups_rows_together_in_row_order(epochs):
    groups = [g for g in range(6) for _ in range(4)]  # six groups of four rows, contiguous
    groups = groups[12:] + groups[:12]  # a group's rows need not start at 0
    parts = mini_batches(24, step=3, seed=0, mini_batch_size=8, epochs=epochs, groups=groups)
    assert len(parts) == 3 * epochs
    for e in range(epochs):
        order = [i for part in parts[3 * e : 3 * e + 3] for i in part]
        assert sorted(order) == list(range(24))
        runs = [groups[i] for i in order]
        # each group appears as one run of its four rows, in row order
        assert [runs[i] for i in range(0, 24, 4)] == [runs[i + 3] for i in range(0, 24, 4)]
        assert len({runs[i] for i in range(0, 24, 4)}) == 6
        for i in range(0, 24, 4):
            assert order[i : i + 4] == sorted(order[i : i + 4])
        # mini-batches of 8 rows hold two whole groups each
        assert all(len({groups[i] for i in part}) == 2 for part in parts[3 * e : 3 * e + 3])


def test_the_group_shuffle_depends_on_the_seed_and_the_step():
    groups = [g for g in range(10) for _ in range(3)]
    a = mini_batches(30, step=1, seed=0, mini_batch_size=6, epochs=1, groups=groups)
    assert a == mini_batches(30, step=1, seed=0, mini_batch_size=6, epochs=1, groups=groups)
    assert a != mini_batches(30, step=2, seed=0, mini_batch_size=6, epochs=1, groups=groups)


def test_token_rows_split_by_the_optim_config():
    from rllm_core.config import OptimConfig
    from rllm_core.rows import build_rows
    from rllm_core.types import Step, Trajectory, TrajectoryGroup

    groups = [
        TrajectoryGroup(
            task_id=f"t{g}",
            role="solver",
            trajectories=[Trajectory(steps=[Step(prompt_ids=[1], response_ids=[2])]) for _ in range(3)],
        )
        for g in range(4)
    ]
    rows = build_rows(groups)
    for shuffle in ("rows", "groups"):
        optim = OptimConfig(mini_batch_size=6, epochs=2, shuffle=shuffle)
        expected = mini_batches(12, 5, 7, 6, 2, rows.group_index if shuffle == "groups" else None)
        assert rows.mini_batches(step=5, seed=7, optim=optim) == expected
    assert rows.mini_batches(5, 7, OptimConfig(mini_batch_size=6, shuffle="rows")) != rows.mini_batches(
        5, 7, OptimConfig(mini_batch_size=6, shuffle="groups")
    )


@pytest.mark.parametrize(("n", "count", "epochs"), [(800, 4, 1), (10, 4, 1), (9, 4, 2), (3, 4, 1), (1, 4, 1)])
def test_a_count_cuts_each_epoch_into_that_many_near_equal_mini_batches(n, count, epochs):
    parts = mini_batches(n, step=4, seed=2, mini_batch_size=None, epochs=epochs, count=count)
    per_epoch = min(count, n)
    assert len(parts) == per_epoch * epochs
    for e in range(epochs):
        epoch = parts[e * per_epoch : (e + 1) * per_epoch]
        assert sorted(i for part in epoch for i in part) == list(range(n))
        assert max(map(len, epoch)) - min(map(len, epoch)) <= 1


def test_a_count_of_one_is_every_row_in_one_step():
    assert mini_batches(7, step=0, seed=0, mini_batch_size=None, epochs=1, count=1) == [list(range(7))]


def test_a_full_batch_splits_the_same_by_size_or_by_count():
    """800 rows in four steps of 200: the two rules agree where the size divides the batch."""
    assert mini_batches(800, 3, 1, 200, 1) == mini_batches(800, 3, 1, None, 1, count=4)


def test_the_optim_config_takes_a_size_or_a_count_not_both():
    from rllm_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"mini_batch_size .* or mini_batches"):
        load_config(overrides=["algorithm.optim.mini_batch_size=200", "algorithm.optim.mini_batches=4"])
