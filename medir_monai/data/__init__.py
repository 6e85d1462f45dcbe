"""Data: readers, layouts, 2-D slice datasets, task-balanced sampling, the embedded demo set (docs/design.md, section 3)."""

from .dataset import (
    LoadSlicePaird,
    NormaliseByTaskd,
    SimulateLowQualityd,
    degradation_for,
    get_task_labels,
    restoration_dataset,
    restoration_transforms,
)
from .batches import LatentTargetBatch, prepare_hq_task_batch, prepare_lq_hq, prepare_task_batch
from .bundle_data import (
    CheckFinited,
    build_dataset,
    list_images,
    prepare_dataset_dir,
    robust_augmentations,
    training_profile,
)
from .demo import default_demo_dir, ensure_demo_dataset, extended_demo_dir
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
    "default_demo_dir",
    "extended_demo_dir",
    "ensure_demo_dataset",
    "CheckFinited",
    "build_dataset",
    "list_images",
    "prepare_dataset_dir",
    "robust_augmentations",
    "training_profile",
    "prepare_lq_hq",
    "prepare_task_batch",
    "prepare_hq_task_batch",
    "LatentTargetBatch",
]
