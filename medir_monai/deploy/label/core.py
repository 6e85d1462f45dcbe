"""The parts of the MONAI Label app that need no MONAI Label: model discovery and restoring one image to NIfTI.

MONAI Label serves annotation models; an image-to-image model fits as an ``InferType.OTHERS`` infer task whose
"label" file is the restored image (float32 NIfTI in physical units, input geometry kept), which viewers such as
3D Slicer load as a volume.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medir_monai.deploy.models import RestorationModel, bundle_of_config, model_kind
from medir_monai.deploy.series import restore_with_model
from medir_monai.restore import (
    DEFAULT_OVERLAP,
    DEFAULT_SW_BATCH_SIZE,
    SERIES_DESCRIPTION_TEMPLATE,
    ScanImage,
    read_scan,
    write_scan,
)
from medir_monai.weights import shipped_models

__all__ = [
    "DEFAULT_MODELS",
    "ensure_pydicom_seg_compat",
    "default_bundles_dir",
    "discover_models",
    "dicom_affine",
    "restore_to_nifti",
]

DEFAULT_MODELS = ("amir", "restormer", "tat")
"""Bundles offered when the app config gives no ``models``."""
_CHECKPOINT = Path("models") / "model.pt"
_PRETRAINED_CONFIG = Path("configs") / "pretrained.json"
_NIFTI_DESCRIP_CHARS = 80  # NIfTI-1 header ``descrip`` field length
_LOG = logging.getLogger(__name__)


def ensure_pydicom_seg_compat() -> bool:
    """Let ``pydicom-seg`` 0.4.1 (a MONAI Label 0.8.5 dependency) import under pydicom 3, which this package needs.

    pydicom-seg imports ``SegmentationStorage`` from ``pydicom._storage_sopclass_uids``, a private module that
    pydicom 3 removed; the same UID constants live in ``pydicom.uid``. When the module is missing, an alias to
    ``pydicom.uid`` is registered (only the SEG writer/reader of MONAI Label's DICOM datastore use pydicom-seg; the
    restoration task never does). Returns True when the alias was added.
    """
    name = "pydicom._storage_sopclass_uids"
    if name in sys.modules:
        return False
    try:
        __import__(name)
        return False
    except ImportError:
        import pydicom.uid

        alias = types.ModuleType(name, "alias of pydicom.uid for pydicom-seg under pydicom >= 3 (medir_monai)")
        alias.__dict__.update({k: v for k, v in vars(pydicom.uid).items() if not k.startswith("__")})
        sys.modules[name] = alias
        return True


def default_bundles_dir() -> Path:
    """``bundles/`` of the source checkout this package runs from (``$MEDIR_BUNDLES_DIR`` overrides)."""
    env = os.environ.get("MEDIR_BUNDLES_DIR")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[3] / "bundles"


def discover_models(conf: Mapping[str, Any], bundles_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Infer-task name -> model path from the app config.

    ``conf["models"]``: comma-separated entries, each a bundle name under ``bundles_dir`` (``amir``), a bundle folder
    or an exported model file (``.ts`` / ``.pt`` / ``.onnx``) or a bundle config file (``bundles/amir/configs/
    pretrained.json``); ``name=path`` sets the task name. Without it, every bundle of :data:`DEFAULT_MODELS` is
    offered with its own trained weights (``models/model.pt``), else with the weights shipped in the package
    (its ``configs/pretrained.json``).

    Raises:
        ValueError: an entry that is no model (names the entry), or duplicate task names.
    """
    root = Path(bundles_dir) if bundles_dir is not None else default_bundles_dir()
    text = str(conf.get("models", "") or "").strip()
    found: dict[str, Path] = {}
    if not text:
        shipped = set(shipped_models())
        for name in DEFAULT_MODELS:
            if (root / name / _CHECKPOINT).is_file():
                found[name] = root / name
            elif name in shipped and (root / name / _PRETRAINED_CONFIG).is_file():
                found[name] = root / name / _PRETRAINED_CONFIG
        return found
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, _, target = entry.partition("=") if "=" in entry else ("", "", entry)
        path = Path(target).expanduser()
        if not path.exists() and (root / target).exists():
            path = root / target
        try:
            model_kind(path)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"models entry {entry!r}: {err}") from err
        bundle = bundle_of_config(path) if path.is_file() else None
        name = name.strip() or (path.name if path.is_dir() else bundle.name if bundle else path.stem)
        if name in found:
            raise ValueError(f"models entry {entry!r}: task name {name!r} is used twice; write name=path")
        found[name] = path
    return found


def dicom_affine(scan: ScanImage) -> np.ndarray:
    """RAS affine of a DICOM scan in MONAI index order ``(columns, rows[, slices])`` (what NIfTI needs).

    Column index ``i`` moves along the row direction cosine by the column spacing, row index ``j`` along the column
    cosine by the row spacing, slice index ``k`` from the first to the last ImagePositionPatient (or along the
    normal by SliceThickness for one slice); LPS is turned into RAS.
    """
    first = scan.source[0]
    orient = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_cos, col_cos = orient[:3], orient[3:]
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.asarray(first.ImagePositionPatient, dtype=np.float64)
    if len(scan.source) > 1:
        last = np.asarray(scan.source[-1].ImagePositionPatient, dtype=np.float64)
        step = (last - origin) / (len(scan.source) - 1)
    else:
        step = np.cross(row_cos, col_cos) * float(getattr(first, "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * col_spacing, col_cos * row_spacing, step, origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def restore_to_nifti(
    model: RestorationModel,
    image_path: str | os.PathLike,
    output_path: str | os.PathLike,
    task: str | None = None,
    overlap: float = DEFAULT_OVERLAP,
    sw_batch_size: int = DEFAULT_SW_BATCH_SIZE,
) -> tuple[Path, dict[str, Any]]:
    """Restore a NIfTI / ITK file, DICOM file or DICOM series folder and write a float32 NIfTI (physical units).

    NIfTI / ITK inputs keep their header and affine (:func:`~medir_monai.restore.write_scan`); DICOM inputs get
    :func:`dicom_affine`. ``task=None`` reads it from the DICOM Modality (NIfTI needs it). The model's restoration
    settings apply as in ``medir restore``; a scan outside the weights' training profile
    (:func:`~medir_monai.deploy.models.check_input`) is restored, logged as a warning and named in the summary.

    Returns:
        the written path and a JSON-able summary (``task``, ``unit``, ``model``, ``shape``, ``min``, ``max``,
        ``guard``: ``"inside the training data"``, ``"no training profile"`` or the warning).

    Raises:
        DataError / AmbiguousTaskError / OutputExistsError: see :mod:`medir_monai.restore`.
    """
    import nibabel as nib

    out = Path(output_path)
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise ValueError(f"{out}: the restored image is written as NIfTI; use a .nii or .nii.gz name")
    scan = read_scan(image_path)
    item, warning = restore_with_model(model, scan, task, overlap=overlap, sw_batch_size=sw_batch_size, progress=False)
    if warning:
        _LOG.warning(warning)
    if scan.kind in ("nifti", "itk"):
        write_scan(scan, item.restored, out, item.task, model_name=model.name, overwrite=True)
    else:
        image = nib.Nifti1Image(item.restored.astype(np.float32), dicom_affine(scan))
        image.header["descrip"] = SERIES_DESCRIPTION_TEMPLATE.format(model=model.name)[:_NIFTI_DESCRIP_CHARS].encode()
        image.to_filename(str(out))
    summary = {
        "task": item.task.name,
        "unit": item.task.unit,
        "model": model.name,
        "shape": [int(v) for v in item.restored.shape],
        "min": float(item.restored.min()),
        "max": float(item.restored.max()),
        "guard": warning or ("inside the training data" if model.training_profile else "no training profile"),
    }
    return out, summary
