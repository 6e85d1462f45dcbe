"""Handlers for MONAI engines: per-task metrics, TensorBoard images and routing, atomic checkpoints, EMA, reports,
DiffCode's stages."""

from .checkpoint import BestModelSaver, ResumableCheckpoint, atomic_save
from .diffcode import (
    CodebookUsageHandler,
    MissingStageError,
    SampleSeedHandler,
    ScanTaskHandler,
    StageWeightsLoader,
    load_stage_weights,
    require_stage_files,
)
from .ema import EMAHandler, EMAModel
from .metrics import TaskMeanMetric, TaskMetricCollector, task_metrics
from .report import EvalReportHandler, ValidationSummaryHandler, format_report, write_metrics_csv
from .safeguard import SafeguardHandler
from .tensorboard import RoutingHandler, TaskImageHandler, display_image

__all__ = [
    "AttachHandler",
    "BestModelSaver",
    "CodebookUsageHandler",
    "MissingStageError",
    "SampleSeedHandler",
    "ScanTaskHandler",
    "StageWeightsLoader",
    "load_stage_weights",
    "require_stage_files",
    "EMAHandler",
    "EMAModel",
    "EvalReportHandler",
    "ResumableCheckpoint",
    "RoutingHandler",
    "SafeguardHandler",
    "EpochSeedHandler",
    "LearningRateLogger",
    "ProgressBar",
    "loss_terms",
    "rank_zero_only",
    "TaskImageHandler",
    "ValidationSummaryHandler",
    "TaskMeanMetric",
    "TaskMetricCollector",
    "atomic_save",
    "display_image",
    "format_report",
    "task_metrics",
    "write_metrics_csv",
]


from .training import AttachHandler, EpochSeedHandler, LearningRateLogger, ProgressBar, loss_terms, rank_zero_only  # noqa: E402
