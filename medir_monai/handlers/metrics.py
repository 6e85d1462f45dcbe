"""Per-task validation metrics for MONAI evaluators (paper convention and MONAI's, side by side).

One :class:`TaskMetricCollector` computes the per-slice metrics of an evaluator iteration once (restored vs HQ
and LQ vs HQ); the :class:`TaskMeanMetric` objects are ignite metrics that average one of them over one task (or
over tasks, the papers' "Average"). :func:`task_metrics` builds the dictionaries a ``SupervisedEvaluator`` takes
as ``key_val_metric`` and ``additional_metrics``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.utils import CommonKeys as Keys

from ..metrics import hot_spot_recovery, monai_metrics, paper_metrics
from ..tasks import get_task

__all__ = ["TaskMetricCollector", "TaskMeanMetric", "task_metrics"]

ROW_METRICS = (
    "psnr", "ssim", "rmse", "monai_psnr", "monai_ssim", "hot_recovery", "lq_psnr", "lq_ssim", "lq_rmse", "lq_hot_recovery"
)
TASK_SPECIFIC_METRICS = ("hot_recovery", "lq_hot_recovery")
"""Row metrics only tasks with a :attr:`~medir_monai.tasks.Task.hot_spot` get (PET lesion uptake)."""


def _batch_task_names(batch: dict, size: int) -> list[str]:
    names = batch.get("task_name")
    if names is None:
        raise KeyError("validation batches need a 'task_name' entry to report metrics per task")
    if isinstance(names, str):
        names = [names]
    return [str(n) for n in names][:size]


def _batch_files(batch: dict, size: int) -> list[str]:
    files = batch.get("file", [""] * size)
    if isinstance(files, str):
        files = [files]
    return [str(f) for f in files][:size]


class TaskMetricCollector:
    """Computes and keeps the per-slice rows of one evaluation run.

    Each row: ``task``, ``file``, and the restored-vs-HQ ``psnr``, ``ssim``, ``rmse`` (paper convention),
    ``monai_psnr``, ``monai_ssim`` (MONAI metrics, fixed eval-window range) and the LQ-vs-HQ baseline
    ``lq_psnr``, ``lq_ssim``, ``lq_rmse``; for a task with a hot spot (PET) also ``hot_recovery`` and
    ``lq_hot_recovery`` (:func:`medir_monai.metrics.hot_spot_recovery`: lesion uptake kept).
    """

    def __init__(self, include_lq: bool = True):
        self.include_lq = include_lq
        self.rows: list[dict[str, Any]] = []
        self._seen_iteration: tuple[int, int] | None = None

    def reset(self) -> None:
        self.rows = []
        self._seen_iteration = None

    def update(self, engine: Engine) -> None:
        """Add the rows of the engine's current iteration (idempotent within one iteration)."""
        stamp = (id(engine), engine.state.iteration)
        if stamp == self._seen_iteration:
            return
        self._seen_iteration = stamp
        out, batch = engine.state.output, engine.state.batch
        pred = torch.as_tensor(out[Keys.PRED]).detach().float().cpu()
        label = torch.as_tensor(out[Keys.LABEL]).detach().float().cpu()
        lq = torch.as_tensor(out[Keys.IMAGE]).detach().float().cpu()
        names = _batch_task_names(batch, pred.shape[0])
        files = _batch_files(batch, pred.shape[0])
        for i, (task, file) in enumerate(zip(names, files)):
            row: dict[str, Any] = {"task": task, "file": file}
            p, y = pred[i : i + 1], label[i : i + 1]
            row.update({k: float(v) for k, v in paper_metrics(p, y, task).items()})
            row.update({k: float(v) for k, v in monai_metrics(p, y, task).items()})
            measures_hot_spot = get_task(task).hot_spot is not None
            if measures_hot_spot:
                row["hot_recovery"] = float(hot_spot_recovery(p, y, task))
            if self.include_lq:
                row.update({f"lq_{k}": float(v) for k, v in paper_metrics(lq[i : i + 1], y, task).items()})
                if measures_hot_spot:
                    row["lq_hot_recovery"] = float(hot_spot_recovery(lq[i : i + 1], y, task))
            self.rows.append(row)

    def per_task_means(self) -> dict[str, dict[str, float]]:
        """``{task: {metric: mean over that task's slices}}``, tasks in registry order of appearance."""
        sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in self.rows:
            for name in ROW_METRICS:
                if name in row and math.isfinite(row[name]):
                    sums[row["task"]][name].append(row[name])
        return {t: {n: sum(v) / len(v) for n, v in m.items() if v} for t, m in sums.items()}

    def infinite_counts(self) -> dict[str, dict[str, int]]:
        """``{task: {metric: slices}}`` of the infinite values :meth:`per_task_means` leaves out (a PSNR of a
        slice identical to its label); empty when there are none."""
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for row in self.rows:
            for name in ROW_METRICS:
                if name in row and math.isinf(row[name]):
                    counts[row["task"]][name] += 1
        return {t: dict(m) for t, m in counts.items()}


class TaskMeanMetric(Metric):
    """Mean of one per-slice metric over one task (``task=None``: unweighted mean over tasks).

    Args:
        collector: the shared :class:`TaskMetricCollector`.
        metric: a row metric name (``psnr``, ``ssim``, ``rmse``, ``monai_psnr``, ``lq_psnr``, ...).
        task: registry task name, or ``None`` for the average over tasks.
    """

    def __init__(self, collector: TaskMetricCollector, metric: str = "psnr", task: str | None = None):
        if metric not in ROW_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {ROW_METRICS}")
        if task is not None:
            get_task(task)
        self.collector, self.metric, self.task = collector, metric, task
        super().__init__(output_transform=lambda x: x)

    def reset(self) -> None:
        self.collector.reset()

    def update(self, output: Any) -> None:  # data comes from the engine, see iteration_completed
        pass

    def iteration_completed(self, engine: Engine) -> None:
        self.collector.update(engine)

    def compute(self) -> float:
        means = self.collector.per_task_means()
        if self.task is not None:
            return float(means.get(self.task, {}).get(self.metric, float("nan")))
        values = [m[self.metric] for m in means.values() if self.metric in m]
        return float(sum(values) / len(values)) if values else float("nan")

    def attach(self, engine: Engine, name: str, usage: Any = None) -> None:
        # every TaskMeanMetric of one collector resets it; doing so at EPOCH_STARTED is harmless (idempotent)
        if not engine.has_event_handler(self.started, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        if not engine.has_event_handler(self.iteration_completed, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.completed, name)


def task_metrics(
    tasks: Sequence[str],
    collector: TaskMetricCollector | None = None,
    prefix: str = "val_",
    metrics: Sequence[str] = ("psnr", "ssim", "rmse", "monai_psnr", "monai_ssim", "lq_psnr", "hot_recovery"),
) -> tuple[dict[str, TaskMeanMetric], dict[str, TaskMeanMetric]]:
    """``(key_val_metric, additional_metrics)`` for a ``SupervisedEvaluator``.

    The key metric is ``<prefix>mean_psnr`` (mean PSNR over tasks, the papers' model selection criterion);
    the others are ``<prefix><metric>_<task>`` and ``<prefix>mean_<metric>``. A task-specific metric
    (``hot_recovery``) gets only the per-task entries of the tasks that measure it (``val_hot_recovery_pet_synthesis``).
    """
    collector = collector or TaskMetricCollector()
    key = {f"{prefix}mean_psnr": TaskMeanMetric(collector, "psnr", None)}
    extra: dict[str, TaskMeanMetric] = {}
    for metric in metrics:
        specific = metric in TASK_SPECIFIC_METRICS
        if metric != "psnr" and not specific:
            extra[f"{prefix}mean_{metric}"] = TaskMeanMetric(collector, metric, None)
        for task in tasks:
            if not specific or get_task(task).hot_spot is not None:
                extra[f"{prefix}{metric}_{task}"] = TaskMeanMetric(collector, metric, task)
    return key, extra
