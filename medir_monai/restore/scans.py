"""Reading scans: what kind an input is, which task restores it, and the scan in physical units.

A :class:`ScanImage` carries the array (MONAI index order: a DICOM slice is ``pixel_array.T``, a series is stacked
along the last axis in slice-position order) and what a writer needs to write a result like it. DICOM goes
through pydicom (:mod:`medir_monai.data.dicom`), NIfTI through nibabel, other ITK formats through MONAI's reader.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medir_monai.data.dicom import dicom_plane, looks_like_dicom, read_dicom_header, suv_factor
from medir_monai.data.io import DICOM_SUFFIXES, ITK_SUFFIXES, NIFTI_SUFFIXES, DataError, check_image
from medir_monai.tasks import Task, get_task, task_from_modality, task_names

_POSITION_TOLERANCE_MM = 1e-4  # two slices closer than this along the normal sit at the same position
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


class AmbiguousTaskError(ValueError):
    """The task cannot be told from the input (a NIfTI / ITK image carries no modality); pass ``task``."""


def has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
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
    if has_suffix(path, NIFTI_SUFFIXES):
        return "nifti"
    if has_suffix(path, DICOM_SUFFIXES) or looks_like_dicom(path):
        return "dicom"
    if has_suffix(path, ITK_SUFFIXES):
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

