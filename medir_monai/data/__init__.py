"""Data: readers, layouts, 2-D slice datasets, task-balanced sampling, the embedded demo set (DESIGN.md section 3)."""

from .dataset import (
    LoadSlicePaird,
    NormaliseByTaskd,
    SimulateLowQualityd,
    degradation_for,
    get_task_labels,
    restoration_dataset,
    restoration_transforms,
)
from .io import DataError, load_bin, load_image
from .layout import expand_to_slices, kept_slice_indices, load_datalist, scan_authors_layout
from .sampler import TaskBalancedBatchSampler

__all__ = [
    "DataError",
    "load_image",
    "load_bin",
    "scan_authors_layout",
    "load_datalist",
    "expand_to_slices",
    "kept_slice_indices",
    "restoration_dataset",
    "restoration_transforms",
    "get_task_labels",
    "degradation_for",
    "LoadSlicePaird",
    "SimulateLowQualityd",
    "NormaliseByTaskd",
    "TaskBalancedBatchSampler",
]
