"""Task-balanced batch sampler (docs/design.md, section 3: AMIR proportional batches of 8, TAT 4 per task)."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from medir_monai.data.sampler import TaskBalancedBatchSampler

# unequal slice counts per task, interleaved so that index order says nothing about the task
COUNTS = {0: 60, 1: 13, 2: 27}
RNG = np.random.default_rng(123)
LABELS = RNG.permutation(np.repeat(list(COUNTS), list(COUNTS.values()))).tolist()


def test_per_task_gives_exactly_four_of_each_task_in_every_batch():
    sampler = TaskBalancedBatchSampler(LABELS, batch_size=12, mode="per_task", per_task=4, num_batches=200, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 200
    for batch in batches:
        assert len(batch) == 12
        assert Counter(LABELS[i] for i in batch) == {0: 4, 1: 4, 2: 4}
    # the rare task (13 slices) is cycled through: every one of its slices shows up
    seen = {i for b in batches for i in b if LABELS[i] == 1}
    assert seen == {i for i, t in enumerate(LABELS) if t == 1}


def test_per_task_batch_size_is_derived_or_checked():
    assert TaskBalancedBatchSampler(LABELS, batch_size=None, mode="per_task", per_task=2).batch_size == 6
    with pytest.raises(ValueError, match="batch_size=8 does not match per_task=4"):
        TaskBalancedBatchSampler(LABELS, batch_size=8, mode="per_task", per_task=4)


def test_proportional_frequencies_match_slice_counts():
    sampler = TaskBalancedBatchSampler(LABELS, batch_size=8, mode="proportional", num_batches=1000, seed=7)
    drawn = Counter(LABELS[i] for batch in sampler for i in batch)
    total = sum(drawn.values())
    assert total == 8000
    for task, count in COUNTS.items():
        expected = count / len(LABELS)
        assert abs(drawn[task] / total - expected) < 0.01, (task, drawn[task] / total, expected)
    # batches are mixed: not every batch is single-task
    assert any(len({LABELS[i] for i in b}) > 1 for b in sampler)


def test_proportional_is_a_shuffled_pass_without_repeats():
    sampler = TaskBalancedBatchSampler(LABELS, batch_size=10, mode="proportional", seed=3)
    flat = [i for b in sampler for i in b]
    assert len(sampler) == len(LABELS) // 10
    assert sorted(flat) == list(range(len(LABELS)))  # one full pass, each index once
    assert flat != list(range(len(LABELS)))


@pytest.mark.parametrize("mode", ["proportional", "per_task"])
def test_seeded_and_reproducible(mode):
    kw = dict(batch_size=None if mode == "per_task" else 8, mode=mode, num_batches=20)
    a = list(TaskBalancedBatchSampler(LABELS, seed=5, **kw))
    b = list(TaskBalancedBatchSampler(LABELS, seed=5, **kw))
    c = list(TaskBalancedBatchSampler(LABELS, seed=6, **kw))
    assert a == b
    assert a != c
    sampler = TaskBalancedBatchSampler(LABELS, seed=5, **kw)
    first, second = list(sampler), list(sampler)
    assert first == a and second != first  # epochs differ
    sampler.set_epoch(0)
    assert list(sampler) == a


@pytest.mark.parametrize("mode", ["proportional", "per_task"])
def test_ranks_get_disjoint_shares(mode):
    kw = dict(batch_size=None if mode == "per_task" else 8, mode=mode, num_batches=30, seed=11)
    ranks = [list(TaskBalancedBatchSampler(LABELS, num_replicas=3, rank=r, **kw)) for r in range(3)]
    for step in range(30):
        shares = [set(ranks[r][step]) for r in range(3)]
        assert all(len(s) == len(ranks[0][step]) for s in shares)
        assert not (shares[0] & shares[1]) and not (shares[0] & shares[2]) and not (shares[1] & shares[2])
        if mode == "per_task":
            for r in range(3):
                assert Counter(LABELS[i] for i in ranks[r][step]) == {0: 4, 1: 4, 2: 4}


def test_works_as_dataloader_batch_sampler():
    data = TensorDataset(torch.arange(len(LABELS)), torch.tensor(LABELS))
    sampler = TaskBalancedBatchSampler(LABELS, batch_size=None, mode="per_task", per_task=4, num_batches=5)
    batches = list(DataLoader(data, batch_sampler=sampler))
    assert len(batches) == 5
    for idx, task in batches:
        assert idx.shape == (12,)
        assert torch.bincount(task, minlength=3).tolist() == [4, 4, 4]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode must be one of"):
        TaskBalancedBatchSampler(LABELS, mode="uniform")
    with pytest.raises(ValueError, match="rank"):
        TaskBalancedBatchSampler(LABELS, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="task_labels"):
        TaskBalancedBatchSampler([])
