"""Task-balanced batch sampling for all-in-one training (docs/design.md, sections 3-4).

Two policies, matching the authors' training scripts:

* ``"proportional"`` (AMIR): every batch is drawn from the union of all tasks' slices, shuffled, so each
  task appears in proportion to its slice count (AMIR: batch 8).
* ``"per_task"`` (TAT): every batch holds exactly ``per_task`` slices of each task (TAT: 4 x 3 tasks = 12).

Both are iteration based: the sampler walks an endless stream of shuffled passes over the data (a new
permutation as soon as one is used up, per task in ``"per_task"`` mode) and an "epoch" is simply
``num_batches`` batches cut from that stream. Training for N iterations is therefore
``num_batches = N`` with one epoch, or any split of N into epochs; nothing is dropped or repeated beyond
what the shuffled passes imply.

Distributed training: all ranks build the same global stream from the same seed; every global step takes
``num_replicas`` batches' worth of indices and rank ``r`` keeps the ``r``-th share, so the ranks' batches
are disjoint at every step (in ``"per_task"`` mode each rank still gets ``per_task`` of each task). This
holds while a task has at least ``per_task * num_replicas`` slices (``batch_size * num_replicas`` slices in
all for ``"proportional"``); smaller sets must repeat slices within a step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["TaskBalancedBatchSampler", "SAMPLING_MODES"]

SAMPLING_MODES = ("proportional", "per_task")


class _ShuffledStream:
    """Endless stream of indices: consecutive random permutations of ``pool``.

    When a draw spans two permutations, the indices still pending from the old one are moved to the end of
    the new one, so a draw of ``n <= len(pool)`` never holds an index twice.
    """

    def __init__(self, pool: np.ndarray, rng: np.random.Generator) -> None:
        self.pool = pool
        self.rng = rng
        self.buffer = np.empty(0, dtype=np.int64)

    def take(self, n: int) -> np.ndarray:
        while self.buffer.size < n:
            fresh = self.rng.permutation(self.pool)
            pending = np.isin(fresh, self.buffer)
            self.buffer = np.concatenate([self.buffer, fresh[~pending], fresh[pending]])
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out


class TaskBalancedBatchSampler(Sampler[list[int]]):
    """Batch sampler over a dataset of 2-D slices labelled by task index; pass it as ``batch_sampler``.

    Args:
        task_labels: task index of every dataset item (e.g. :func:`medir_monai.data.get_task_labels`).
        batch_size: slices per batch on each rank (AMIR 8; TAT 12). In ``"per_task"`` mode it must equal
            ``per_task * number of tasks``, or be ``None`` to be derived.
        mode: ``"proportional"`` (union, proportional to slice counts) or ``"per_task"`` (fixed count per task).
        per_task: slices of each task per batch in ``"per_task"`` mode (TAT: 4).
        num_batches: batches per epoch on each rank. Default: one pass over the data,
            ``len(task_labels) // (batch_size * num_replicas)`` (at least 1).
        seed: random seed; the same seed, epoch and settings give the same batches.
        num_replicas: number of distributed ranks (world size).
        rank: this rank, in ``[0, num_replicas)``.

    Example::

        sampler = TaskBalancedBatchSampler(get_task_labels(ds), mode="per_task", per_task=4, num_batches=1000)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=2)
    """

    def __init__(
        self,
        task_labels: Sequence[int],
        batch_size: int | None = 8,
        mode: str = "proportional",
        per_task: int = 4,
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        labels = np.asarray(list(task_labels), dtype=np.int64)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("task_labels must be a non-empty sequence of task indices (one per dataset item)")
        if mode not in SAMPLING_MODES:
            raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}"
            )
        self.labels = labels
        self.tasks = sorted(set(labels.tolist()))
        self.mode = mode
        self.per_task = int(per_task)
        if mode == "per_task":
            if self.per_task < 1:
                raise ValueError(f"per_task must be >= 1, got {per_task}")
            derived = self.per_task * len(self.tasks)
            if batch_size is not None and batch_size != derived:
                raise ValueError(
                    f"batch_size={batch_size} does not match per_task={self.per_task} x {len(self.tasks)} tasks "
                    f"present in task_labels (= {derived}); pass batch_size=None or {derived}"
                )
            batch_size = derived
        if batch_size is None or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        default_batches = max(1, labels.size // (self.batch_size * self.num_replicas))
        self.num_batches = int(num_batches) if num_batches is not None else default_batches
        if self.num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass (like ``DistributedSampler``); otherwise epochs count up by themselves."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def _rank_share(self, chunk: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of a chunk of ``num_replicas * k`` indices."""
        size = chunk.size // self.num_replicas
        return chunk[self.rank * size : (self.rank + 1) * size]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1  # the next pass differs; set_epoch() overrides this
        if self.mode == "proportional":
            stream = _ShuffledStream(np.arange(self.labels.size), rng)
            for _ in range(self.num_batches):
                yield self._rank_share(stream.take(self.batch_size * self.num_replicas)).tolist()
        else:
            streams = [_ShuffledStream(np.flatnonzero(self.labels == t), rng) for t in self.tasks]
            for _ in range(self.num_batches):
                parts = [self._rank_share(s.take(self.per_task * self.num_replicas)) for s in streams]
                yield np.concatenate(parts).tolist()
