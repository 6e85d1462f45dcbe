"""Handlers for MONAI engines: per-task metrics, TensorBoard images and routing, atomic checkpoints, EMA, reports."""

from .checkpoint import BestModelSaver, ResumableCheckpoint, atomic_save
from .ema import EMAHandler, EMAModel
from .metrics import TaskMeanMetric, TaskMetricCollector, task_metrics
from .report import EvalReportHandler, format_report, write_metrics_csv
from .tensorboard import RoutingHandler, TaskImageHandler, display_image

__all__ = [
    "BestModelSaver",
    "EMAHandler",
    "EMAModel",
    "EvalReportHandler",
    "ResumableCheckpoint",
    "RoutingHandler",
    "SamplerEpochHandler",
    "TaskImageHandler",
    "TaskMeanMetric",
    "TaskMetricCollector",
    "atomic_save",
    "display_image",
    "format_report",
    "task_metrics",
    "write_metrics_csv",
]


class SamplerEpochHandler:
    """Call ``sampler.set_epoch(epoch - 1)`` at each epoch start (deterministic, resumable batch order)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.sampler.set_epoch(e.state.epoch - 1))
