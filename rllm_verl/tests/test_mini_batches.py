"""How a training step's rows are split into optimiser steps (the torch backend's rule)."""

from __future__ import annotations

import pytest
from rllm_verl.workers import mini_batches


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
