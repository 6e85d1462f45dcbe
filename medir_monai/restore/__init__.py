"""Whole-scan restoration: sliding-window inference slice by slice, NIfTI / ITK / DICOM in and out.

The networks are 2-D and all-in-one (AMIR, TAT, DiffCode, Restormer: ``(B, 1, H, W) -> (B, 1, H, W)``), but
the intensity normalisation and the output range are task-specific (docs/design.md, section 2), so every call needs
a task: given explicitly, or read from the DICOM Modality tag (``CT`` / ``MR`` / ``PT``).

Pipeline of :func:`restore_file`::

    read (NIfTI: nibabel; DICOM file / series folder: pydicom; other ITK formats: MONAI ITKReader)
      -> physical units (CT in HU, PET in SUV, MRI raw intensity)
      -> per slice along the acquisition axis: task.normalise (clip to norm_range, min-max to [0, 1])
         -> monai SlidingWindowInferer (roi = training patch, gaussian blending; with flip_ensemble on the slice
            and its three mirror images, averaged) -> clip to [0, 1]
         -> task.denormalise
      -> write like the input: NIfTI with the input affine and header (float32, physical units), or a NEW
         DICOM series (new UIDs, DERIVED\\SECONDARY, integer pixels with RescaleSlope / RescaleIntercept).

Array convention: images are handled in MONAI's index order (the file's voxel axes ``(i, j[, k])``, as
:func:`medir_monai.data.io.load_image` and the training data loaders read them); a DICOM slice is therefore
``pixel_array.T`` (columns, rows), exactly what MONAI's ``PydicomReader`` returns, and a DICOM series is
stacked along the last axis in slice-position order.

Modules, in the order a scan passes through them: :mod:`~medir_monai.restore.scans` (input kind, task, reading
in physical units), :mod:`~medir_monai.restore.window` (the network call), :mod:`~medir_monai.restore.outputs`
(output names and rules), :mod:`~medir_monai.restore.writers` (NIfTI / ITK / DICOM), :mod:`~medir_monai.restore.api`
(:func:`restore_file`, :class:`Restorer`); :mod:`~medir_monai.restore.engine` is the same pipeline as MONAI-engine
pieces for the bundles' ``inference.json``.

Safety rules: an input is never modified; an output that equals, contains or lies inside the input is
refused; an existing output needs ``overwrite=True``; outputs are written to a temporary file (or folder)
beside the final path and renamed into place, so a failure leaves nothing half-written.

Example::

    >>> from medir_monai.restore import restore_file
    >>> restore_file(net, "scan.nii.gz", "out/scan_restored.nii.gz", task="ct_denoise", model_name="AMIR")
"""

from medir_monai.data.dicom import dicom_plane, looks_like_dicom, read_dicom_header, suv_factor

from .api import Restorer, restore_file
from .engine import InputGuard, LoadScand, RestoredScanWriter, ScanInferer, list_inputs, prepare_scan_batch
from .outputs import OutputExistsError, OutputPathError, check_output_path, output_path_for
from .scans import (
    AmbiguousTaskError,
    ScanImage,
    check_one_series,
    input_kind,
    read_scan,
    resolve_task,
    scan_pixel_size,
    scan_slice_axis,
    slice_order,
    task_unit_factor,
)
from .window import (
    DEFAULT_OVERLAP,
    DEFAULT_ROI_SIZE,
    DEFAULT_SW_BATCH_SIZE,
    FLIP_VIEWS,
    FlipEnsembleInferer,
    restore_array,
)
from .writers import DERIVED_SERIES_OFFSET, SERIES_DESCRIPTION_TEMPLATE, derived_series_number, write_scan

__all__ = [
    "AmbiguousTaskError",
    "OutputPathError",
    "OutputExistsError",
    "ScanImage",
    "Restorer",
    "DEFAULT_OVERLAP",
    "DEFAULT_ROI_SIZE",
    "DEFAULT_SW_BATCH_SIZE",
    "FLIP_VIEWS",
    "FlipEnsembleInferer",
    "DERIVED_SERIES_OFFSET",
    "SERIES_DESCRIPTION_TEMPLATE",
    "restore_array",
    "resolve_task",
    "read_scan",
    "scan_pixel_size",
    "scan_slice_axis",
    "write_scan",
    "restore_file",
    "output_path_for",
    "check_output_path",
    "derived_series_number",
    "task_unit_factor",
    "suv_factor",
    "input_kind",
    "list_inputs",
    "read_dicom_header",
    "check_one_series",
    "slice_order",
    "dicom_plane",
    "looks_like_dicom",
    "InputGuard",
    "LoadScand",
    "prepare_scan_batch",
    "ScanInferer",
    "RestoredScanWriter",
]
