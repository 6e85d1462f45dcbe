"""The MONAI-engine form of scan restoration, used by the bundles' ``inference.json``.

A datalist of inputs (:func:`list_inputs`) -> :class:`LoadScand` (a scan in physical units and its task) ->
``SupervisedEvaluator`` with :func:`prepare_scan_batch` and :class:`ScanInferer` (:func:`restore_array`) ->
handlers :class:`InputGuard` (the training profile) and :class:`RestoredScanWriter` (:func:`write_scan`). It runs
the same functions as :func:`~medir_monai.restore.restore_file`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer

from medir_monai.data.io import ITK_SUFFIXES, NIFTI_SUFFIXES, DataError
from medir_monai.safeguard import RestorationSafeguard
from medir_monai.tasks import Task

from .outputs import check_output_path, output_path_for
from .scans import ScanImage, has_suffix, read_scan, resolve_task, scan_pixel_size, scan_slice_axis, task_unit_factor
from .window import DEFAULT_OVERLAP, DEFAULT_ROI_SIZE, DEFAULT_SW_BATCH_SIZE, restore_array
from .writers import write_scan


def list_inputs(input_path: str | os.PathLike) -> list[dict]:
    """Datalist ``[{"image": path}]`` of one input (file or DICOM series) or of every image file of a plain folder."""
    source = Path(input_path).expanduser()
    if not source.exists():
        raise DataError(f"{source}: input does not exist")
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")) if source.is_dir() else []
    if source.is_dir() and files and all(has_suffix(p, NIFTI_SUFFIXES + ITK_SUFFIXES) for p in files):
        return [{"image": str(p)} for p in files]
    return [{"image": str(source)}]


class LoadScand:
    """Dataset transform: read ``d["image"]`` (a path) with :func:`read_scan` and resolve its task.

    Output: ``{"image": float32 tensor in physical units (task units), "scan": ScanImage, "task": task name,
    "unit_factor": float, "path": str, "axis": the plane axis (:func:`scan_slice_axis`)}``. Use with ``collate_fn=monai.data.utils.no_collation``.
    """

    def __init__(self, task: str | Task | None = None):
        self.task = task

    def __call__(self, item: dict) -> dict:
        path = Path(item["image"])
        task = resolve_task(path, self.task)
        scan = read_scan(path)
        factor = task_unit_factor(scan, task)
        image = torch.as_tensor(scan.array * np.float32(factor))
        return {"image": image, "scan": scan, "task": task.name, "unit_factor": factor, "path": str(path),
                "axis": scan_slice_axis(scan, task)}


def prepare_scan_batch(batchdata: list[dict], device: Any = None, non_blocking: bool = False, **kwargs: Any):
    """``prepare_batch`` for one un-collated scan: the image stays where it is (``ScanInferer`` moves windows)."""
    if len(batchdata) != 1:
        raise ValueError("scan inference runs one scan per batch (batch_size=1)")
    item = batchdata[0]
    return item["image"], None, (), {"task": item["task"], "axis": item.get("axis", -1)}


class ScanInferer(Inferer):
    """MONAI inferer restoring a whole scan in physical units slice by slice (see :func:`restore_array`).

    Args:
        roi_size, overlap, sw_batch_size, mode, sw_device, device, progress, intensity_reference, safeguard,
        flip_ensemble: :func:`restore_array` options.
        axis: plane axis for every scan; ``None`` (default): each scan's own (:func:`scan_slice_axis`, passed by
            :func:`prepare_scan_batch`).
    """

    def __init__(self, roi_size: int | Sequence[int] = DEFAULT_ROI_SIZE, overlap: float = DEFAULT_OVERLAP,
                 sw_batch_size: int = DEFAULT_SW_BATCH_SIZE,
                 mode: str = "gaussian", sw_device: Any = None, device: Any = None, axis: int | None = None,
                 progress: bool = True,
                 intensity_reference: Mapping[str, Mapping] | None = None,
                 safeguard: Mapping[str, Mapping] | None = None, flip_ensemble: bool = False):
        super().__init__()
        self.kwargs = dict(roi_size=roi_size, overlap=overlap, sw_batch_size=sw_batch_size, mode=mode,
                           sw_device=sw_device, device=device, axis=axis, progress=progress,
                           intensity_reference=intensity_reference,
                           safeguard=RestorationSafeguard(safeguard), flip_ensemble=bool(flip_ensemble))

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, task: str | Task = "",
                 axis: int = -1, **kwargs: Any):
        options = dict(self.kwargs)
        if options["axis"] is None:  # the scan's own plane axis (LoadScand / prepare_scan_batch)
            options["axis"] = axis
        return restore_array(network, inputs, task, **options)


def outside_profile(profile: Mapping[str, Any] | None, path: str | os.PathLike, image: Any, task: str,
                    scan: ScanImage) -> str | None:
    """The input guard's message: what of ``scan`` (``image`` in the task's units) lies outside the training
    ``profile`` for ``task`` (:func:`medir_monai.data.profile.check_scan`), named with ``path``; ``None`` when it
    lies inside or there is no profile. ``medir restore``, the bundles and the Deploy / Label apps all print it."""
    from medir_monai.data.profile import check_scan

    reasons = check_scan(profile, image, task, scan_pixel_size(scan))
    return f"{path} lies outside the model's training data ({task}): {'; '.join(reasons)}" if reasons else None


class InputGuard:
    """Evaluator handler checking each scan against the checkpoint's training profile before it is restored
    (:func:`medir_monai.data.profile.check_scan`): a warning naming the numbers, or with ``strict`` a
    :class:`~medir_monai.data.io.DataError` before anything of that scan is written.

    Args:
        checkpoint: the weights file (``model.pt``); one without a ``training_profile`` gets a note and no checks.
        strict: refuse scans outside the profile instead of warning.
    """

    def __init__(self, checkpoint: str | os.PathLike, strict: bool = False):
        from medir_monai.networks.official import load_weights_file

        self.checkpoint = Path(checkpoint)
        saved = load_weights_file(self.checkpoint) if self.checkpoint.is_file() else None
        self.profile = saved.get("training_profile") if isinstance(saved, dict) else None
        self.strict = bool(strict)
        self.warnings: list[str] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if self.profile is None:
            engine.logger.warning(f"{self.checkpoint} records no training profile: inputs are not checked")
            return
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def check(self, path: str | os.PathLike, image: Any, task: str, scan: ScanImage) -> str | None:
        """One message naming what lies outside the profile for this scan (physical units), or ``None``."""
        return outside_profile(self.profile, path, image, task, scan)

    def __call__(self, engine: Any) -> None:
        item = engine.state.batch[0]
        message = self.check(item["path"], item["image"], item["task"], item["scan"])
        if message is None:
            return
        if self.strict:
            raise DataError(f"strict: {message}; nothing written for it")
        self.warnings.append(message)
        engine.logger.warning(message)


class RestoredScanWriter:
    """Evaluator handler writing each restored scan like its input (:func:`write_scan`, atomic) into ``output_dir``."""

    def __init__(self, output_dir: str | os.PathLike, model_name: str = "model", overwrite: bool = False):
        self.output_dir = Path(output_dir)
        self.model_name = model_name
        self.overwrite = overwrite
        self.written: list[Path] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self._check)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _check(self, engine: Any) -> None:  # fail before the (long) inference
        item = engine.state.batch[0]
        check_output_path(item["path"], output_path_for(item["path"], self.output_dir), self.overwrite)

    def __call__(self, engine: Any) -> None:
        item = engine.state.batch[0]
        restored = engine.state.output["pred"]
        restored = restored.detach().cpu().numpy() if isinstance(restored, torch.Tensor) else np.asarray(restored)
        out = write_scan(item["scan"], restored, output_path_for(item["path"], self.output_dir), item["task"],
                         model_name=self.model_name, overwrite=self.overwrite, unit_factor=item["unit_factor"])
        self.written.append(out)
        engine.logger.info(f"restored {item['path']} -> {out}")
