"""Whole-scan restoration: sliding-window inference slice by slice, NIfTI / ITK / DICOM in and out.

The networks are 2-D and all-in-one (AMIR, TAT, DiffCode, Restormer: ``(B, 1, H, W) -> (B, 1, H, W)``), but
the intensity normalisation and the output range are task-specific (docs/design.md, section 2), so every call needs
a task: given explicitly, or read from the DICOM Modality tag (``CT`` / ``MR`` / ``PT``).

Pipeline of :func:`restore_file`::

    read (NIfTI: nibabel; DICOM file / series folder: pydicom; other ITK formats: MONAI ITKReader)
      -> physical units (CT in HU, PET in SUV, MRI raw intensity)
      -> per slice along the acquisition axis: task.normalise (clip to norm_range, min-max to [0, 1])
         -> monai SlidingWindowInferer (roi = training patch, gaussian blending) -> clip to [0, 1]
         -> task.denormalise
      -> write like the input: NIfTI with the input affine and header (float32, physical units), or a NEW
         DICOM series (new UIDs, DERIVED\\SECONDARY, integer pixels with RescaleSlope / RescaleIntercept).

Array convention: images are handled in MONAI's index order (the file's voxel axes ``(i, j[, k])``, as
:func:`medir_monai.data.io.load_image` and the training data loaders read them); a DICOM slice is therefore
``pixel_array.T`` (columns, rows), exactly what MONAI's ``PydicomReader`` returns, and a DICOM series is
stacked along the last axis in slice-position order.

Safety rules: an input is never modified; an output that equals, contains or lies inside the input is
refused; an existing output needs ``overwrite=True``; outputs are written to a temporary file (or folder)
beside the final path and renamed into place, so a failure leaves nothing half-written.

Example::

    >>> from medir_monai.inference import restore_file
    >>> restore_file(net, "scan.nii.gz", "out/scan_restored.nii.gz", task="ct_denoise", model_name="AMIR")
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import errno
import math
import os
import shutil
import struct
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from tqdm.auto import tqdm

from medir_monai.atomic import DestinationExistsError, atomic_path, commit_no_clobber, raise_if_no_space
from medir_monai.data.dicom import dicom_plane, looks_like_dicom, read_dicom_header, suv_factor
from medir_monai.data.io import DICOM_SUFFIXES, ITK_SUFFIXES, NIFTI_SUFFIXES, DataError, check_image
from medir_monai.safeguard import RestorationSafeguard
from medir_monai.tasks import Task, get_task, task_from_modality, task_names
from medir_monai.transforms import ScaleToReference

__all__ = [
    "AmbiguousTaskError",
    "OutputPathError",
    "OutputExistsError",
    "ScanImage",
    "Restorer",
    "DEFAULT_ROI_SIZE",
    "SERIES_DESCRIPTION_TEMPLATE",
    "restore_array",
    "resolve_task",
    "read_scan",
    "scan_slice_axis",
    "write_scan",
    "restore_file",
    "output_path_for",
    "check_output_path",
    "task_unit_factor",
    "suv_factor",
    "input_kind",
    "list_inputs",
    "read_dicom_header",
    "check_one_series",
    "slice_order",
    "dicom_plane",
    "looks_like_dicom",
    "LoadScand",
    "prepare_scan_batch",
    "ScanInferer",
    "RestoredScanWriter",
]

DEFAULT_ROI_SIZE = (128, 128)
"""The papers' training patch (docs/design.md, section 4): the natural sliding-window size."""
SERIES_DESCRIPTION_TEMPLATE = "restored by {model} (medir-monai)"
"""Text written to DICOM SeriesDescription (appended to the original) and the NIfTI ``descrip`` field."""
DICOM_STORED_BITS = 16
"""Restored DICOM pixels are stored as 16-bit integers (uint16, or int16 when the mapping needs negatives)."""
_LO_MAX_CHARS = 64  # DICOM LO value length (SeriesDescription)
_NIFTI_DESCRIP_CHARS = 80  # NIfTI-1 header ``descrip`` field length
_POSITION_TOLERANCE_MM = 1e-4  # two slices closer than this along the normal sit at the same position
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
_DERIVED_IMAGE_TYPE = ("DERIVED", "SECONDARY")
# elements whose values describe the old stored integers and become wrong once pixels are re-quantised
_STALE_PIXEL_TAGS = (
    "ModalityLUTSequence",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "FloatPixelData",
    "DoubleFloatPixelData",
)


# ---- errors ---------------------------------------------------------------------------------------------
class AmbiguousTaskError(ValueError):
    """The task cannot be told from the input (a NIfTI / ITK image carries no modality); pass ``task``."""


class OutputPathError(ValueError):
    """The output path would modify the input (equal to it, inside it, or containing it) or has a wrong type."""


class OutputExistsError(FileExistsError):
    """The output exists and ``overwrite`` was not given."""


# ---- the network call -------------------------------------------------------------------------------------
def _module_device(network: Callable) -> torch.device:
    """Device of the first parameter (or buffer) of ``network``; CPU for parameter-free callables."""
    if isinstance(network, torch.nn.Module):
        for tensor in network.parameters():
            return tensor.device
        for tensor in network.buffers():
            return tensor.device
    return torch.device("cpu")


def _image_only(network: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap ``network`` so that it returns only the image and check that it keeps the input shape.

    Networks with side outputs return a tuple / list whose first item is the image (AMIR's MoE layers), or a
    dict holding ``"pred"``; both are accepted.
    """

    def call(x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, h, w) windows
        y = network(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        elif isinstance(y, dict):
            if "pred" not in y:
                raise TypeError(f"network returned a dict without a 'pred' key (keys: {sorted(y)})")
            y = y["pred"]
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"network must map (B, 1, H, W) to the same shape; got {got} for input {tuple(x.shape)}")
        if not y.is_contiguous() or y.data_ptr() == x.data_ptr():
            y = y.clone(memory_format=torch.contiguous_format)  # the inferer weights the output in place
        return y

    return call


def _as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(value), int(value)) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints (2-D networks); got {value!r}")
    return pair  # type: ignore[return-value]


def restore_array(
    network: Callable,
    image: torch.Tensor | np.ndarray,
    task: str | Task,
    roi_size: int | Sequence[int] = DEFAULT_ROI_SIZE,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
    sw_device: torch.device | str | None = None,
    progress: bool = True,
    axis: int = -1,
    clip: bool = True,
    intensity_reference: Mapping[str, Mapping] | None = None,
    safeguard: Mapping[str, Mapping] | RestorationSafeguard | None = None,
    **inferer_kwargs: Any,
) -> torch.Tensor | np.ndarray:
    """Restore a 2-D slice or a 3-D volume given in physical units, slice by slice.

    Each slice along ``axis`` is normalised with the task's range (clip to ``norm_range``, min-max to
    ``[0, 1]``, docs/design.md, section 2), restored through MONAI's
    :class:`~monai.inferers.SlidingWindowInferer` (windows of the training patch size blended with a
    Gaussian weight, as in the papers' full-resolution testing) and mapped back to physical units.

    Args:
        network: 2-D network (or any callable) ``(B, 1, H, W) -> (B, 1, H, W)`` in model space ``[0, 1]``; a
            tuple / list output uses its first item. Modules are put in eval mode for the call (and restored).
        image: ``(H, W)`` or ``(H, W, D)`` tensor or array in physical units (HU, SUV, raw MRI intensity).
        task: task name or :class:`~medir_monai.tasks.Task` (sets the normalisation range).
        roi_size: sliding-window size (the training patch, 128 x 128 by default). Images smaller than it are
            padded (``padding_mode`` / ``cval`` of the inferer, default zeros = the range's low end).
        overlap: fraction of window overlap.
        sw_batch_size: windows per network call.
        mode: window blending, ``"gaussian"`` or ``"constant"``.
        device: where each slice's output is stitched (``None``: the input's device, CPU for arrays), so a
            large volume can stay on the CPU while windows run on the GPU.
        sw_device: where windows are sent for the network (``None``: the network's device).
        progress: show a tqdm bar over slices.
        axis: the acquisition (slice) axis of a 3-D input; ignored for 2-D input.
        clip: clip the network output to ``[0, 1]`` (the trained range) before de-normalising.
        intensity_reference: per task name, :class:`~medir_monai.transforms.ScaleToReference` arguments: each
            slice of that task is scaled so its robust percentile meets the reference before normalisation,
            and the restored slice is scaled back (the per-scan normalisation the model was trained with; the
            bundle configs' ``intensity_reference``).
        safeguard: per task name, a :mod:`medir_monai.safeguard` setting (``{"method": "noise", ...}``) applied
            to each restored slice against its input, in physical units (the bundle configs' ``safeguard``).
        inferer_kwargs: further :class:`~monai.inferers.SlidingWindowInferer` arguments (``sigma_scale``,
            ``padding_mode``, ``cval``, ``buffer_steps``, ...).

    Returns:
        the restored image, same shape, float32, in physical units: a numpy array for array input, a tensor
        on the input's device otherwise.

    Raises:
        ValueError: for an image that is not 2-D / 3-D, empty or not finite, or a network that changes the shape.
    """
    task = get_task(task)
    roi = _as_pair(roi_size, "roi_size")
    as_numpy = isinstance(image, np.ndarray)
    x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32) if as_numpy else image)
    if isinstance(x, MetaTensor):  # drop the metadata, keep the data
        x = x.as_tensor()
    if x.ndim not in (2, 3):
        raise ValueError(f"image must be 2-D (H, W) or 3-D (H, W, D); got shape {tuple(x.shape)}")
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        raise ValueError(f"image of shape {tuple(x.shape)} is empty or holds NaN / Inf values")
    x = x.to(torch.float32)
    axis = axis % x.ndim if x.ndim == 3 else 0
    planes = x[None] if x.ndim == 2 else torch.movedim(x, axis, 0)  # (S, H, W)

    inferer = SlidingWindowInferer(
        roi_size=roi,
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        mode=mode,
        sw_device=sw_device if sw_device is not None else _module_device(network),
        device=device,
        progress=False,
        **inferer_kwargs,
    )
    call = _image_only(network)
    reference = (intensity_reference or {}).get(task.name)
    scaler = ScaleToReference(**reference) if reference else None
    guard = safeguard if isinstance(safeguard, RestorationSafeguard) else RestorationSafeguard(safeguard)
    out = torch.empty_like(planes)
    was_training = network.training if isinstance(network, torch.nn.Module) else None
    if was_training is not None:
        network.eval()
    try:
        with torch.no_grad():
            bar = tqdm(range(planes.shape[0]), desc=f"restore {task.name}", unit="slice", disable=not progress)
            for s in bar:
                factor = scaler.factor_of(planes[s]) if scaler is not None else 1.0
                model_in = task.normalise(planes[s] * factor)[None, None]  # (1, 1, H, W) in [0, 1]
                model_out = inferer(model_in, call)[0, 0]
                if clip:
                    model_out = model_out.clamp(0.0, 1.0)
                restored = (task.denormalise(model_out) / factor).to(out.device, torch.float32)
                out[s] = guard(planes[s], restored, task) if guard else restored
    finally:
        if was_training is not None:
            network.train(was_training)
    restored = out[0] if x.ndim == 2 else torch.movedim(out, 0, axis)
    return restored.cpu().numpy() if as_numpy else restored


# ---- input kinds and task resolution -------------------------------------------------------------------
def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


def input_kind(path: str | os.PathLike) -> str:
    """Kind of an input: ``"dicom_series"`` (a folder), ``"dicom"`` (one file), ``"nifti"`` or ``"itk"``.

    Raises:
        DataError: missing path or unsupported file type.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: input does not exist")
    if path.is_dir():
        return "dicom_series"
    if _has_suffix(path, NIFTI_SUFFIXES):
        return "nifti"
    if _has_suffix(path, DICOM_SUFFIXES) or looks_like_dicom(path):
        return "dicom"
    if _has_suffix(path, ITK_SUFFIXES):
        return "itk"
    raise DataError(
        f"{path}: unsupported input; expected a NIfTI file ({', '.join(NIFTI_SUFFIXES)}), a DICOM file or series "
        f"folder, or an ITK image ({', '.join(ITK_SUFFIXES)})"
    )


def _dicom_files(folder: Path) -> list[Path]:
    """Visible regular files of a series folder (``DICOMDIR`` index files excluded)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in files if p.name.upper() != "DICOMDIR"]
    if not files:
        raise DataError(f"{folder}: empty folder (expected the files of one DICOM series)")
    return files


def _modality_of(path: Path) -> str | None:
    first = path if path.is_file() else _dicom_files(path)[0]
    modality = str(getattr(read_dicom_header(first), "Modality", "") or "").strip().upper()
    return modality or None


def resolve_task(path: str | os.PathLike, task: str | Task | None = None) -> Task:
    """The task for restoring ``path``: ``task`` when given, else the DICOM Modality tag (CT / MR / PT).

    An explicit ``task`` wins; a DICOM modality that disagrees with it only raises a warning.

    Raises:
        AmbiguousTaskError: a NIfTI / ITK input (no modality) or a DICOM without Modality and no ``task``.
        medir_monai.tasks.UnknownTaskError: unknown task name or a modality no task handles.
        DataError: missing or unreadable input.
    """
    path = Path(path)
    kind = input_kind(path)
    choices = ", ".join(task_names())
    if task is not None:
        chosen = get_task(task)
        if kind.startswith("dicom"):
            modality = _modality_of(path)
            if modality and modality != chosen.modality:
                warnings.warn(
                    f"{path}: DICOM Modality is {modality!r} but task {chosen.name!r} expects "
                    f"{chosen.modality!r}; using {chosen.name!r} as requested",
                    stacklevel=2,
                )
        return chosen
    if kind.startswith("dicom"):
        modality = _modality_of(path)
        if not modality:
            raise AmbiguousTaskError(f"{path}: the DICOM Modality tag is missing, so the task is ambiguous; "
                                     f"pass task= one of: {choices}")
        return task_from_modality(modality)
    raise AmbiguousTaskError(
        f"{path}: the task is ambiguous for a {kind.upper()} image (it carries no modality); "
        f"pass task= (--task) one of: {choices}"
    )


# ---- reading ------------------------------------------------------------------------------------------------
@dataclass
class ScanImage:
    """An input scan in physical units plus what is needed to write a result like it.

    Attributes:
        array: float32 image in physical units, MONAI index order; a DICOM series is ``(columns, rows, slices)``
            in slice-position order (acquisition axis last).
        path: the input path.
        kind: ``"nifti"``, ``"itk"``, ``"dicom"`` (one file) or ``"dicom_series"``.
        modality: DICOM Modality (``None`` for NIfTI / ITK).
        source: the nibabel image (NIfTI), MONAI metadata dict (ITK) or the sorted pydicom datasets (DICOM).
        files: for DICOM, the files in the order of ``source``.
    """

    array: np.ndarray
    path: Path
    kind: str
    modality: str | None = None
    source: Any = None
    files: list[Path] = field(default_factory=list)


def _read_nifti(path: Path) -> ScanImage:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))  # applies scl_slope / scl_inter
    except Exception as err:
        raise DataError(f"{path}: unreadable or corrupt NIfTI file: {type(err).__name__}: {err}") from err
    if not np.isfinite(img.affine).all():
        raise DataError(f"{path}: its orientation (qform / sform affine) holds NaN or Inf; the restored image could not "
                        "be placed in space")
    array = check_image(torch.from_numpy(data), path).numpy()
    return ScanImage(array=array, path=path, kind="nifti", source=img)


def _read_itk(path: Path) -> ScanImage:
    from medir_monai.data.io import load_image

    image = load_image(path, reader="ITKReader")
    return ScanImage(array=image.numpy().astype(np.float32), path=path, kind="itk", source=dict(image.meta))


def slice_order(datasets: list, files: list[Path]) -> list[int]:
    """Order of a series' slices: position along the slice normal, else InstanceNumber, else file name.

    Raises:
        DataError: two slices at the same position (or with the same InstanceNumber).
    """
    n = len(datasets)
    if n == 1:
        return [0]
    have_geometry = all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in datasets)
    if have_geometry:
        orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:])
        keys = np.array([float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)) for ds in datasets])
        what, tolerance = "position along the slice normal", _POSITION_TOLERANCE_MM
    elif all("InstanceNumber" in ds and ds.InstanceNumber is not None for ds in datasets):
        keys = np.array([float(ds.InstanceNumber) for ds in datasets])
        what, tolerance = "InstanceNumber", 0.0
    else:
        warnings.warn(f"{files[0].parent}: slices carry neither ImagePositionPatient nor InstanceNumber; "
                      "ordering them by file name", stacklevel=3)
        return list(range(n))
    order = [int(i) for i in np.argsort(keys, kind="stable")]
    gaps = np.diff(keys[order])
    if np.any(np.abs(gaps) <= tolerance):
        k = int(np.argmin(np.abs(gaps)))
        raise DataError(
            f"{files[0].parent}: two slices share the same {what} ({files[order[k]].name}, "
            f"{files[order[k + 1]].name}); is this more than one acquisition?"
        )
    return order


def check_one_series(datasets: list, files: list[Path], folder: Path) -> None:
    """Refuse folders mixing series, image sizes or modalities."""
    def distinct(tag: str) -> dict:
        seen: dict = {}
        for ds, f in zip(datasets, files):
            seen.setdefault(str(getattr(ds, tag, None)), []).append(f.name)
        return seen

    for tag in ("SeriesInstanceUID", "Modality", "Rows", "Columns"):
        seen = distinct(tag)
        if len(seen) > 1:
            detail = "; ".join(f"{value}: {len(names)} file(s), e.g. {names[0]}" for value, names in seen.items())
            raise DataError(f"{folder}: mixed series: files differ in {tag} ({detail}); put one series per folder")


def _read_dicom(path: Path, kind: str) -> ScanImage:
    files = _dicom_files(path) if kind == "dicom_series" else [path]
    datasets = [read_dicom_header(f, stop_before_pixels=False) for f in files]
    for ds, f in zip(datasets, files):
        if getattr(ds, "SOPClassUID", None) == _DICOMDIR_SOP_CLASS or "PixelData" not in ds:
            raise DataError(f"{f}: DICOM file without pixel data (not an image slice)")
    folder = path if kind == "dicom_series" else path.parent
    check_one_series(datasets, files, folder)
    order = slice_order(datasets, files)
    datasets = [datasets[i] for i in order]
    files = [files[i] for i in order]
    planes = [dicom_plane(ds, f) for ds, f in zip(datasets, files)]
    array = planes[0] if kind == "dicom" else np.stack(planes, axis=-1)  # (columns, rows[, slices])
    array = check_image(torch.from_numpy(np.ascontiguousarray(array)), path).numpy()
    modality = str(getattr(datasets[0], "Modality", "") or "").upper() or None
    return ScanImage(array=array, path=path, kind=kind, modality=modality, source=datasets, files=files)


def scan_pixel_size(scan: ScanImage) -> float | None:
    """Mean in-plane pixel size of a scan in mm (NIfTI zooms, ITK spacing, DICOM PixelSpacing); ``None`` if unknown."""
    try:
        if scan.kind == "nifti":
            zooms = scan.source.header.get_zooms()[:2]
        elif scan.kind == "itk":
            zooms = list(np.asarray(scan.source.get("spacing", scan.source.get("pixdim", [])), dtype=float))[:2]
        else:
            zooms = [float(v) for v in scan.source[0].PixelSpacing][:2]
        values = [float(z) for z in zooms if float(z) > 0]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    return float(np.mean(values)) if values else None


def _array_directions(scan: ScanImage) -> np.ndarray | None:
    """3x3 matrix whose column ``j`` is the patient direction (RAS or LPS, signs aside) of array axis ``j``."""
    try:
        if scan.kind == "nifti":
            return np.asarray(scan.source.affine, dtype=float)[:3, :3]
        if scan.kind == "itk":
            return np.asarray(scan.source["affine"], dtype=float)[:3, :3]
        row, column = (np.asarray([float(v) for v in scan.source[0].ImageOrientationPatient], dtype=float)[i:i + 3]
                       for i in (0, 3))
        return np.stack([row, column, np.cross(row, column)], axis=1)  # (columns, rows, slices) order
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


def scan_slice_axis(scan: ScanImage, task: str | Task) -> int:
    """Axis of ``scan.array`` to restore plane by plane: the task's ``slice_axis`` found in the scan's orientation.

    Axial tasks (``slice_axis`` 2: MRI, CT) use the acquisition axis (the last one), as before; PET, trained on
    coronal slices, is restored along the array axis that runs most nearly anterior-posterior. ``-1`` when the scan
    is 2-D or carries no orientation.
    """
    task = get_task(task)
    if scan.array.ndim != 3 or task.slice_axis == 2:
        return -1
    directions = _array_directions(scan)
    if directions is None or directions.shape != (3, 3):
        return -1
    return int(np.argmax(np.abs(directions[task.slice_axis, :])))


def read_scan(path: str | os.PathLike) -> ScanImage:
    """Read a NIfTI file, an ITK image, a DICOM file or a DICOM series folder in physical units.

    DICOM values go through the Modality LUT (RescaleSlope / RescaleIntercept), so CT is in HU and PET in the
    file's units (usually Bq/ml; :func:`restore_file` converts to SUV for the PET task).

    Raises:
        DataError: naming the file, for missing / unreadable / corrupt input, an empty folder, a folder mixing
            series, duplicate slice positions, multi-frame or colour DICOM, wrong dimensionality, NaN / Inf.
    """
    path = Path(path)
    kind = input_kind(path)
    if kind == "nifti":
        return _read_nifti(path)
    if kind == "itk":
        return _read_itk(path)
    return _read_dicom(path, kind)


# ---- PET units -------------------------------------------------------------------------------------------
def task_unit_factor(image: ScanImage, task: Task) -> float:
    """Multiplier from the file's units to the task's units (PET Bq/ml -> SUV; 1 otherwise)."""
    if image.modality == "PT" and task.unit.upper() == "SUV" and image.kind.startswith("dicom"):
        return suv_factor(image.source[0], image.path)
    return 1.0


# ---- output paths ----------------------------------------------------------------------------------------
def _full_suffix(path: Path, known: Sequence[str]) -> str:
    name = path.name.lower()
    for suffix in sorted(known, key=len, reverse=True):
        if name.endswith(suffix):
            return path.name[-len(suffix):]
    return path.suffix


def output_path_for(input_path: str | os.PathLike, output_dir: str | os.PathLike, suffix: str = "_restored") -> Path:
    """Default output path in ``output_dir`` for ``input_path``: ``a.nii.gz -> a_restored.nii.gz``,
    ``a.dcm -> a_restored.dcm``, series folder ``s -> s_restored`` (a folder)."""
    input_path = Path(input_path)
    if input_path.is_dir():
        return Path(output_dir) / f"{input_path.name}{suffix}"
    ext = _full_suffix(input_path, NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES)
    stem = input_path.name[: len(input_path.name) - len(ext)] if ext else input_path.name
    return Path(output_dir) / f"{stem}{suffix}{ext}"


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that writing ``output_path`` cannot touch ``input_path``; return the output path.

    Paths are compared after resolving symbolic links (and by inode when both exist).

    Raises:
        OutputPathError: output equal to the input, inside the input folder, or containing the input.
        OutputExistsError: the output exists and ``overwrite`` is False.
    """
    src, dst = Path(input_path).resolve(), Path(output_path).resolve()
    if src == dst or (dst.exists() and os.path.samefile(src, dst)):
        raise OutputPathError(f"{output_path}: the output is the input itself; inputs are never overwritten")
    if src in dst.parents:
        raise OutputPathError(f"{output_path}: the output lies inside the input folder {input_path}; "
                              "inputs are never modified, choose another folder")
    if dst in src.parents:
        raise OutputPathError(f"{output_path}: the output would contain (and replace) the input {input_path}")
    if (dst.exists() or Path(output_path).is_symlink()) and not overwrite:
        raise OutputExistsError(f"{output_path}: output exists; pass overwrite=True (--overwrite) to replace it")
    return Path(output_path)


def _check_output_type(kind: str, output: Path) -> None:
    if kind == "nifti" and not _has_suffix(output, NIFTI_SUFFIXES):
        raise OutputPathError(f"{output}: a NIfTI input is written as NIfTI; use a {' or '.join(NIFTI_SUFFIXES)} name")
    if kind == "itk" and not _has_suffix(output, NIFTI_SUFFIXES + ITK_SUFFIXES):
        raise OutputPathError(f"{output}: an ITK input is written as NIfTI or an ITK format; "
                              f"use one of {', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)}")
    if kind == "dicom" and output.suffix and not _has_suffix(output, DICOM_SUFFIXES):
        raise OutputPathError(f"{output}: a DICOM file is written as DICOM; use a .dcm name")
    if kind == "dicom_series" and _has_suffix(output, NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES):
        raise OutputPathError(f"{output}: a DICOM series is written as a new series folder; give a folder name")
    if kind == "dicom_series" and output.is_file():
        raise OutputPathError(f"{output}: is a file; a DICOM series output is a folder")
    if kind != "dicom_series" and output.is_dir():
        raise OutputPathError(f"{output}: is a folder; this input is written as one file")


# ---- atomic writing --------------------------------------------------------------------------------------
def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _commit(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move ``tmp`` onto ``final``; an existing ``final`` is swapped out first and restored if that fails.

    Without ``overwrite``, a ``final`` that appeared meanwhile (another run writing the same output) is kept:
    :class:`~medir_monai.atomic.DestinationExistsError`."""
    if not overwrite:
        if tmp.is_file():
            commit_no_clobber(tmp, final)
            return
        exists = DestinationExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(final))
        if os.path.lexists(final) and not (final.is_dir() and not any(final.iterdir())):
            raise exists
        try:  # a folder: rename fails onto a non-empty folder or a file that appeared since the check
            os.rename(tmp, final)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
            raise exists from None
        return
    if tmp.is_file() and (final.is_file() or not os.path.lexists(final)):
        os.replace(tmp, final)  # atomic for a file
        return
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    backup = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(final, backup)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(backup, final)
        raise
    _remove(backup)


@contextlib.contextmanager
def _atomic_output(final: Path, as_folder: bool, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (same suffix); rename it to ``final`` on success, delete it on error
    (a full disk becomes :class:`~medir_monai.atomic.NoSpaceError` naming ``final``). Without ``overwrite`` an
    output that another run wrote meanwhile is kept and this one discarded."""
    if not as_folder:
        with atomic_path(final, overwrite=overwrite) as tmp:
            yield tmp
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _commit(tmp, final, overwrite)
    except BaseException as err:
        _remove(tmp)
        raise_if_no_space(err, final)
        raise


# ---- writers ---------------------------------------------------------------------------------------------
def _description(model_name: str) -> str:
    return SERIES_DESCRIPTION_TEMPLATE.format(model=model_name)


def _write_nifti(image: ScanImage, restored: np.ndarray, path: Path, model_name: str) -> None:
    """Float32 NIfTI with the input's affine, header (qform / sform codes, units) and on-disk shape."""
    src = image.source
    header = src.header.copy()
    header.set_data_dtype(np.float32)
    data = np.asarray(restored, dtype=np.float32).reshape(src.shape)  # restore squeezed size-1 axes
    out = type(src)(data, src.affine, header)
    out.header.set_slope_inter(1.0, 0.0)  # stored values are physical
    with contextlib.suppress(KeyError):
        out.header["cal_min"], out.header["cal_max"] = 0.0, 0.0  # 0 / 0: display range unset
        out.header["descrip"] = _description(model_name)[:_NIFTI_DESCRIP_CHARS].encode()
    out.to_filename(str(path))


def _write_itk(image: ScanImage, restored: np.ndarray, path: Path, model_name: str) -> None:
    """Float32 image in the output's format with the input's geometry (MONAI ITKWriter, affine from the reader)."""
    from monai.data import ITKWriter

    writer = ITKWriter(output_dtype=np.float32, affine_lps_to_ras=True)
    writer.set_data_array(np.asarray(restored, dtype=np.float32), channel_dim=None)
    writer.set_metadata(image.source, resample=False)
    writer.write(str(path))


def _ds_number(value: float) -> float:
    """``value`` as the float a reader gets back from its DICOM DS string (at most 16 characters)."""
    from pydicom.valuerep import format_number_as_ds

    return float(format_number_as_ds(float(value)))


def _rescale_for(datasets: list, values: Sequence[np.ndarray]) -> tuple[float, float, np.dtype]:
    """Series-wide ``(slope, intercept, dtype)`` storing ``values`` (physical, file units) in 16 bits.

    The input's own RescaleSlope / RescaleIntercept are kept when every slice shares them and the restored
    range fits (same quantisation step as the input, e.g. 1 HU for CT). Otherwise a new mapping spans the
    restored range over the full uint16 range. Either way ``stored * slope + intercept`` is the restored value
    to within half a step.
    """
    low = float(min(v.min() for v in values))
    high = float(max(v.max() for v in values))
    pairs = {(float(getattr(ds, "RescaleSlope", 1.0) or 1.0), float(getattr(ds, "RescaleIntercept", 0.0) or 0.0))
             for ds in datasets}
    if len(pairs) == 1 and not any("ModalityLUTSequence" in ds for ds in datasets):
        slope, intercept = pairs.pop()
        if slope > 0:
            lo, hi = math.floor((low - intercept) / slope + 0.5), math.floor((high - intercept) / slope + 0.5)
            for dtype in (np.dtype(np.uint16), np.dtype(np.int16)):
                info = np.iinfo(dtype)
                if info.min <= lo and hi <= info.max:
                    return slope, intercept, dtype
    levels = np.iinfo(np.uint16).max
    intercept = _ds_number(low)
    slope = _ds_number(max(high - intercept, 0.0) / levels * (1.0 + 1e-6)) if high > intercept else 1.0
    return (slope if slope > 0 else 1.0), intercept, np.dtype(np.uint16)


_PIXEL_DATA_TAG = 0x7FE00010  # (7FE0,0010) Pixel Data


def _derived_dataset(src, stored: np.ndarray, slope: float, intercept: float, series_uid: str,
                     model_name: str, task: Task):
    """A copy of ``src`` holding ``stored`` (rows, columns) as a new instance of the new derived series."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import format_number_as_ds

    ds = copy.deepcopy(src)
    for tag in [t for t in ds.keys() if t > _PIXEL_DATA_TAG]:  # trailing padding or damage: not image data
        del ds[tag]
    for keyword in _STALE_PIXEL_TAGS:
        if keyword in ds:
            delattr(ds, keyword)
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_little_endian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    photometric = str(getattr(src, "PhotometricInterpretation", "MONOCHROME2"))
    ds.set_pixel_data(stored, photometric_interpretation=photometric, bits_stored=DICOM_STORED_BITS,
                      generate_instance_uid=False)
    ds.RescaleSlope = format_number_as_ds(float(slope))
    ds.RescaleIntercept = format_number_as_ds(float(intercept))
    if "RescaleType" not in ds and getattr(src, "Modality", "") == "CT":
        ds.RescaleType = "HU"

    sop_uid = generate_uid()
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    if "SOPClassUID" in ds:
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SeriesInstanceUID = series_uid
    old_type = list(src.ImageType) if "ImageType" in src else []
    ds.ImageType = list(_DERIVED_IMAGE_TYPE) + [str(v) for v in old_type[len(_DERIVED_IMAGE_TYPE):]]
    note = _description(model_name)
    old = str(getattr(src, "SeriesDescription", "") or "").strip()
    joined = f"{old} {note}" if old else note
    ds.SeriesDescription = joined if len(joined) <= _LO_MAX_CHARS else note[:_LO_MAX_CHARS]
    ds.DerivationDescription = f"{task.description}: {note}"
    if "SOPClassUID" in src and "SOPInstanceUID" in src:
        ref = Dataset()
        ref.ReferencedSOPClassUID = src.SOPClassUID
        ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        ds.SourceImageSequence = [ref]
    now = datetime.datetime.now()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    return ds


DERIVED_SERIES_OFFSET = 1000
"""A derived series is numbered ``source SeriesNumber + 1000`` (``1000`` when the source has none), as scanners
number their reformats and derived series apart from the acquired ones."""


def derived_series_number(src) -> int:
    """The SeriesNumber of the derived series made from the series of dataset ``src``."""
    try:
        number = int(str(getattr(src, "SeriesNumber", "") or "").strip())
    except ValueError:
        number = 0
    number = number + DERIVED_SERIES_OFFSET
    return number if number < 2**31 else DERIVED_SERIES_OFFSET  # IS holds a signed 32-bit integer


def _write_dicom(image: ScanImage, restored: np.ndarray, out: Path, model_name: str, task: Task,
                 unit_factor: float) -> None:
    """Write the restored planes as a new series: one file per input slice (``out`` is a folder or one file)."""
    from pydicom.uid import generate_uid

    datasets = image.source
    restored = np.asarray(restored)
    # a one-file series folder reads as one 2-D plane, like a single file
    planes = [restored] if restored.ndim == 2 else [restored[..., k] for k in range(restored.shape[-1])]
    values = [np.asarray(p, dtype=np.float64).T / unit_factor for p in planes]  # (rows, columns), file units
    slope, intercept, dtype = _rescale_for(datasets, values)
    info = np.iinfo(dtype)
    series_uid = generate_uid()
    series_number = derived_series_number(datasets[0])
    for k, (src, v) in enumerate(zip(datasets, values)):
        stored = np.clip(np.floor((v - intercept) / slope + 0.5), info.min, info.max).astype(dtype)
        ds = _derived_dataset(src, stored, slope, intercept, series_uid, model_name, task)
        ds.SeriesNumber = series_number
        target = out if image.kind == "dicom" else out / f"IM{k + 1:05d}.dcm"
        try:
            ds.save_as(str(target), enforce_file_format=True)
        except (TypeError, ValueError, OverflowError, struct.error) as err:  # a header element that cannot be written
            raise DataError(f"{image.files[k] if image.files else image.path}: its header cannot be copied into the "
                            f"derived series ({type(err).__name__}: {str(err).splitlines()[0]})") from err


def write_scan(
    image: ScanImage,
    restored: np.ndarray,
    output_path: str | os.PathLike,
    task: str | Task,
    model_name: str = "model",
    overwrite: bool = False,
    unit_factor: float = 1.0,
) -> Path:
    """Write ``restored`` (same shape as ``image.array``, task units) like ``image``, atomically.

    NIfTI / ITK: float32 with the input geometry. DICOM: a new series (new Series / SOP Instance UIDs,
    ``DERIVED\\SECONDARY``, SeriesDescription noting ``model_name``, patient / study tags kept, 16-bit integers
    with RescaleSlope / RescaleIntercept), a folder for a series input, one file for a single-file input.

    Args:
        unit_factor: the factor that took the file's units to the task's (PET: Bq/ml -> SUV); divided out.

    Raises:
        OutputPathError, OutputExistsError: see :func:`check_output_path`; also a wrong output type.
        ValueError: ``restored`` with a shape other than the input's.
    """
    task = get_task(task)
    out = check_output_path(image.path, output_path, overwrite)
    _check_output_type(image.kind, out)
    restored = np.asarray(restored, dtype=np.float32)
    if restored.shape != image.array.shape:
        raise ValueError(f"restored shape {restored.shape} differs from the input's {image.array.shape} ({image.path})")
    if not np.isfinite(restored).all():
        raise ValueError(f"restored image for {image.path} holds NaN / Inf; nothing written")
    with _atomic_output(out, as_folder=image.kind == "dicom_series", overwrite=overwrite) as tmp:
        if image.kind == "nifti":
            _write_nifti(image, restored, tmp, model_name)
        elif image.kind == "itk":
            _write_itk(image, restored, tmp, model_name)
        else:
            _write_dicom(image, restored, tmp, model_name, task, unit_factor)
    return out


# ---- one call -----------------------------------------------------------------------------------------
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
    _check_output_type(kind, out)
    chosen = resolve_task(input_path, task)
    image = read_scan(input_path)
    factor = task_unit_factor(image, chosen)
    sw_kwargs.setdefault("axis", scan_slice_axis(image, chosen))
    restored = restore_array(network, image.array * np.float32(factor), chosen, **sw_kwargs)
    return write_scan(image, restored, out, chosen, model_name=model_name, overwrite=overwrite, unit_factor=factor)


class Restorer:
    """A network plus sliding-window settings, callable on files (:func:`restore_file` with fixed options), for
    scripts that restore many inputs with one model. The bundles' ``inference.json`` uses the MONAI-engine form
    below (:class:`LoadScand`, :class:`ScanInferer`, :class:`RestoredScanWriter`), which runs the same functions.

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


# ---- the MONAI-engine form used by the bundles' inference.json --------------------------------------------
def list_inputs(input_path: str | os.PathLike) -> list[dict]:
    """Datalist ``[{"image": path}]`` of one input (file or DICOM series) or of every image file of a plain folder."""
    source = Path(input_path).expanduser()
    if not source.exists():
        raise DataError(f"{source}: input does not exist")
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")) if source.is_dir() else []
    if source.is_dir() and files and all(_has_suffix(p, NIFTI_SUFFIXES + ITK_SUFFIXES) for p in files):
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
        roi_size, overlap, sw_batch_size, mode, sw_device, device, progress, intensity_reference, safeguard:
            :func:`restore_array` options.
        axis: plane axis for every scan; ``None`` (default): each scan's own (:func:`scan_slice_axis`, passed by
            :func:`prepare_scan_batch`).
    """

    def __init__(self, roi_size: int | Sequence[int] = DEFAULT_ROI_SIZE, overlap: float = 0.25, sw_batch_size: int = 4,
                 mode: str = "gaussian", sw_device: Any = None, device: Any = None, axis: int | None = None,
                 progress: bool = True,
                 intensity_reference: Mapping[str, Mapping] | None = None,
                 safeguard: Mapping[str, Mapping] | None = None):
        super().__init__()
        self.kwargs = dict(roi_size=roi_size, overlap=overlap, sw_batch_size=sw_batch_size, mode=mode,
                           sw_device=sw_device, device=device, axis=axis, progress=progress,
                           intensity_reference=intensity_reference,
                           safeguard=RestorationSafeguard(safeguard))

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, task: str | Task = "",
                 axis: int = -1, **kwargs: Any):
        options = dict(self.kwargs)
        if options["axis"] is None:  # the scan's own plane axis (LoadScand / prepare_scan_batch)
            options["axis"] = axis
        return restore_array(network, inputs, task, **options)


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
        from medir_monai.data.profile import check_scan

        reasons = check_scan(self.profile, image, task, scan_pixel_size(scan))
        return f"{path} lies outside the model's training data ({task}): {'; '.join(reasons)}" if reasons else None

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
