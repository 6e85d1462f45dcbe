"""Volumes -> the task's 2-D slices, and simulated LQ slices, for ``medir prepare``.

The same rules as training (:mod:`medir_monai.tasks`: ``slice_axis``, ``central_slices``, ``air_threshold``) and the
same simulation (:class:`~medir_monai.data.dataset.SimulateLowQualityd`, seeded per file name and slice), so a
prepared folder holds the pairs the datalist path would have made on the fly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medir_monai.transforms import extract_slices

from ...tasks import get_task
from ..io import DataError
from ..layout import load_volume

__all__ = ["load_task_volume", "volume_slices", "simulate_lq"]


def load_task_volume(path: str | os.PathLike, task: str) -> MetaTensor:
    """A 3-D volume (NIfTI / ITK file or DICOM series folder) re-oriented to RAS, in the task's units.

    A PET DICOM series in Bq/ml is turned into SUV from its header (patient weight, decayed dose).

    Raises:
        DataError: unreadable input, a 2-D image, missing SUV header fields.
    """
    from ..dicom import read_dicom_header, suv_factor

    task = get_task(task)
    path = Path(path)
    volume = load_volume(path, "RAS")
    if volume.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {tuple(volume.shape)}")
    if task.unit.upper() == "SUV" and path.is_dir():
        first = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))[0]
        volume = volume * suv_factor(read_dicom_header(first), first)
    return volume


def volume_slices(volume: MetaTensor | str | os.PathLike, task: str) -> tuple[list[tuple[int, np.ndarray]], tuple]:
    """The kept ``(index, slice)`` pairs of a volume along the task's axis, and their in-plane spacing in mm.

    Args:
        volume: a RAS volume in the task's units, or a path for :func:`load_task_volume`.
        task: registry name.

    Raises:
        DataError: no slice kept (an all-air volume).
    """
    task = get_task(task)
    name = str(volume) if not isinstance(volume, torch.Tensor) else "volume"
    if not isinstance(volume, torch.Tensor):
        volume = load_task_volume(volume, task.name)
    slices, indices = extract_slices(
        volume, axis=task.slice_axis, central=task.central_slices, air_threshold=task.air_threshold, name=name
    )
    if not slices:
        raise DataError(f"{name}: no slice kept by the rules of task {task.name!r} (all air?)")
    affine = slices[0].affine if isinstance(slices[0], MetaTensor) else torch.eye(4)
    spacing = tuple(float(torch.linalg.norm(affine[:3, i])) for i in range(2))
    planes = [(k, np.asarray(s[0].numpy() if isinstance(s, torch.Tensor) else s[0], dtype=np.float32))
              for k, s in zip(indices, slices)]
    return planes, spacing


def simulate_lq(hq: np.ndarray, task: str, spacing_mm: Sequence[float], seed: int, file_name: str,
                index: int) -> np.ndarray:
    """The task's simulated LQ of one HQ slice ``(H, W)`` (or of every ``(H, W)`` plane of an ``(H, W, D)`` volume,
    ``index=-1``), exactly as training simulates it for an HQ-only item; ``spacing_mm`` is the ``(H, W)`` pixel size."""
    from ..dataset import SimulateLowQualityd

    item = {"task": get_task(task).name, "hq": torch.from_numpy(np.ascontiguousarray(hq))[None], "lq": None,
            "file": file_name, "slice": index, "spacing": tuple(float(v) for v in spacing_mm)}
    return SimulateLowQualityd(seed=seed)(item)["lq"][0].numpy()
