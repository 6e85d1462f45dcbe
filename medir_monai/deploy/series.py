"""Glue between in-memory DICOM series (e.g. MONAI Deploy's ``DICOMSeries``) and :mod:`medir_monai.restore`.

MONAI Deploy's loader hands over pydicom datasets, not a folder, so a series becomes a
:class:`~medir_monai.restore.ScanImage` here with the same rules as :func:`~medir_monai.restore.read_scan`
(one series, slices ordered along the normal, Modality LUT applied, ``(columns, rows, slices)`` index order); the
result can then go through :func:`~medir_monai.restore.restore_array` and
:func:`~medir_monai.restore.write_scan` exactly like a folder read from disk. No SDK import here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medir_monai.data.io import DataError, check_image
from medir_monai.restore import (
    AmbiguousTaskError,
    ScanImage,
    check_one_series,
    dicom_plane,
    output_path_for,
    restore_array,
    scan_slice_axis,
    slice_order,
    task_unit_factor,
    write_scan,
)
from medir_monai.deploy.models import RestorationModel, check_input
from medir_monai.tasks import Task, get_task, task_from_modality, task_names

__all__ = ["RestoredScan", "scan_from_datasets", "task_for_scan", "restore_scan", "restore_with_model", "write_restored",
           "series_output_name"]


@dataclass
class RestoredScan:
    """A restored scan waiting to be written: the input, the result (task units), the task and the unit factor."""

    scan: ScanImage
    restored: np.ndarray
    task: Task
    unit_factor: float


def scan_from_datasets(datasets: Sequence[Any], path: str | os.PathLike) -> ScanImage:
    """A :class:`~medir_monai.restore.ScanImage` (kind ``"dicom_series"``) from the pydicom datasets of one series.

    Args:
        datasets: pydicom datasets with pixel data (any order).
        path: the input folder the series came from (used in messages and to keep outputs out of it).

    Raises:
        DataError: no datasets, datasets without pixel data, mixed series, duplicate positions, multi-frame or
            colour images, NaN / Inf values (messages name the file).
    """
    path = Path(path)
    datasets = list(datasets)
    if not datasets:
        raise DataError(f"{path}: no DICOM instances in the series")
    files = [Path(str(getattr(ds, "filename", None) or path / f"instance{i:05d}")) for i, ds in enumerate(datasets)]
    for ds, f in zip(datasets, files):
        if "PixelData" not in ds:
            raise DataError(f"{f}: DICOM instance without pixel data (not an image slice)")
    check_one_series(datasets, files, path)
    order = slice_order(datasets, files)
    datasets = [datasets[i] for i in order]
    files = [files[i] for i in order]
    array = np.stack([dicom_plane(ds, f) for ds, f in zip(datasets, files)], axis=-1)  # (columns, rows, slices)
    array = check_image(torch.from_numpy(np.ascontiguousarray(array)), path).numpy()
    modality = str(getattr(datasets[0], "Modality", "") or "").upper() or None
    return ScanImage(array=array, path=path, kind="dicom_series", modality=modality, source=datasets, files=files)


def task_for_scan(scan: ScanImage, task: str | Task | None = None) -> Task:
    """``task`` when given, else the task of the scan's DICOM Modality (CT / MR / PT).

    Raises:
        AmbiguousTaskError: no ``task`` and no modality (NIfTI / ITK input).
    """
    if task is not None:
        return get_task(task)
    if not scan.modality:
        raise AmbiguousTaskError(f"{scan.path}: the task is ambiguous for a {scan.kind.upper()} image (it carries no "
                                 f"modality); pass --task, one of: {', '.join(task_names())}")
    return task_from_modality(scan.modality)


def restore_scan(network: Any, scan: ScanImage, task: str | Task | None = None, **sw_kwargs: Any) -> RestoredScan:
    """Restore ``scan`` in its task's units (PET: SUV) slice by slice (see :func:`~medir_monai.restore.restore_array`)."""
    chosen = task_for_scan(scan, task)
    factor = task_unit_factor(scan, chosen)
    sw_kwargs.setdefault("axis", scan_slice_axis(scan, chosen))  # PET: coronal planes, as trained
    restored = restore_array(network, scan.array * np.float32(factor), chosen, **sw_kwargs)
    return RestoredScan(scan=scan, restored=np.asarray(restored, dtype=np.float32), task=chosen, unit_factor=factor)


def restore_with_model(model: RestorationModel, scan: ScanImage, task: str | Task | None = None,
                       **sw_kwargs: Any) -> tuple[RestoredScan, str | None]:
    """Restore ``scan`` as a deployed model does: its input guard first (:func:`~medir_monai.deploy.models.check_input`),
    then :func:`restore_scan` with the model's roi and restoration settings. Returns the result and the guard's
    warning (``None``: inside the training data, or no profile); the caller logs it."""
    chosen = task_for_scan(scan, task)
    warning = check_input(model, scan, chosen)
    item = restore_scan(model.network, scan, chosen, roi_size=model.roi_size, **model.settings, **sw_kwargs)
    return item, warning


def series_output_name(scan: ScanImage, index: int, count: int) -> str:
    """Folder / file name of a result: like ``medir restore`` for a single input, numbered when a folder held several."""
    base = output_path_for(scan.path, ".").name
    if count == 1:
        return base
    number = getattr(scan.source[0], "SeriesNumber", None) if isinstance(scan.source, list) and scan.source else None
    tag = f"{index + 1:02d}" + (f"_series{int(number)}" if number not in (None, "") else "")  # index: unique
    return base.replace("_restored", f"_{tag}_restored", 1)


def write_restored(item: RestoredScan, output_dir: str | os.PathLike, model_name: str, index: int = 0,
                   count: int = 1, overwrite: bool = False) -> Path:
    """Write ``item`` into ``output_dir`` with :func:`~medir_monai.restore.write_scan` (atomic; a new DERIVED series
    for DICOM, float32 NIfTI with the input geometry otherwise)."""
    target = Path(output_dir) / series_output_name(item.scan, index, count)
    return write_scan(item.scan, item.restored, target, item.task, model_name=model_name, overwrite=overwrite,
                      unit_factor=item.unit_factor)
