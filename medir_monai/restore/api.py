"""The one-call API: read a scan, restore it, write it like the input (:func:`restore_file`, :class:`Restorer`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medir_monai.tasks import Task

from .outputs import check_output_path, check_output_type
from .scans import input_kind, read_scan, resolve_task, scan_slice_axis, task_unit_factor
from .window import restore_array
from .writers import write_scan


def restore_file(
    network: Callable,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    task: str | Task | None = None,
    model_name: str = "model",
    overwrite: bool = False,
    **sw_kwargs: Any,
) -> Path:
    """Restore one scan file or DICOM series folder and write the result like the input.

    Args:
        network: 2-D restoration network (see :func:`restore_array`).
        input_path: NIfTI file, ITK image, DICOM file or DICOM series folder.
        output_path: file (NIfTI / ITK / single DICOM) or folder (DICOM series) to create.
        task: task name; ``None`` reads it from the DICOM Modality tag (see :func:`resolve_task`).
        model_name: written into SeriesDescription / NIfTI ``descrip`` (e.g. ``"AMIR"``).
        overwrite: replace an existing output.
        sw_kwargs: :func:`restore_array` options (``roi_size``, ``overlap``, ``sw_batch_size``, ``mode``,
            ``device``, ``sw_device``, ``progress``, ``axis``, ...).

    Returns:
        the output path.

    Raises:
        DataError: bad input (see :func:`read_scan`); AmbiguousTaskError: no task for a NIfTI / ITK input;
        OutputPathError / OutputExistsError: output rules (checked before any inference runs).
    """
    input_path = Path(input_path)
    kind = input_kind(input_path)
    out = check_output_path(input_path, output_path, overwrite)  # fail before the (long) inference
    check_output_type(kind, out)
    chosen = resolve_task(input_path, task)
    image = read_scan(input_path)
    factor = task_unit_factor(image, chosen)
    sw_kwargs.setdefault("axis", scan_slice_axis(image, chosen))
    restored = restore_array(network, image.array * np.float32(factor), chosen, **sw_kwargs)
    return write_scan(image, restored, out, chosen, model_name=model_name, overwrite=overwrite, unit_factor=factor)


class Restorer:
    """A network plus sliding-window settings, callable on files (:func:`restore_file` with fixed options), for
    scripts that restore many inputs with one model. The bundles' ``inference.json`` uses the MONAI-engine form
    (:mod:`medir_monai.restore.engine`), which runs the same functions.

    Example::

        restorer = Restorer(network, model_name="AMIR", roi_size=(128, 128), overlap=0.25)
        restorer("ct_series/", "out/ct_series_restored")

    Args:
        network: 2-D restoration network.
        model_name: name written into the outputs.
        sw_kwargs: defaults for :func:`restore_array` (overridable per call).
    """

    def __init__(self, network: Callable, model_name: str = "model", **sw_kwargs: Any) -> None:
        self.network = network
        self.model_name = model_name
        self.sw_kwargs = sw_kwargs

    def __call__(self, input_path: str | os.PathLike, output_path: str | os.PathLike,
                 task: str | Task | None = None, overwrite: bool = False, **sw_kwargs: Any) -> Path:
        return restore_file(self.network, input_path, output_path, task=task, model_name=self.model_name,
                            overwrite=overwrite, **{**self.sw_kwargs, **sw_kwargs})

    def restore_array(self, image: torch.Tensor | np.ndarray, task: str | Task, **sw_kwargs: Any):
        """:func:`restore_array` with this restorer's network and settings."""
        return restore_array(self.network, image, task, **{**self.sw_kwargs, **sw_kwargs})

