"""Writing a restored scan like its input: float32 NIfTI / ITK with the input geometry, or a new DICOM series.

A DICOM result is a new DERIVED series: new Series and SOP Instance UIDs, ``DERIVED\\SECONDARY``, the
SeriesDescription noting the model, patient and study tags kept, 16-bit pixels with RescaleSlope /
RescaleIntercept; :func:`write_scan` commits it atomically (:mod:`medir_monai.restore.outputs`).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medir_monai.atomic import atomic_output
from medir_monai.data.io import DataError
from medir_monai.tasks import Task, get_task

from .outputs import check_output_path, check_output_type
from .scans import ScanImage

SERIES_DESCRIPTION_TEMPLATE = "restored by {model} (medir-monai)"
"""Text written to DICOM SeriesDescription (appended to the original) and the NIfTI ``descrip`` field."""
DICOM_STORED_BITS = 16
"""Restored DICOM pixels are stored as 16-bit integers (uint16, or int16 when the mapping needs negatives)."""
_LO_MAX_CHARS = 64  # DICOM LO value length (SeriesDescription)
_NIFTI_DESCRIP_CHARS = 80  # NIfTI-1 header ``descrip`` field length
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
    check_output_type(image.kind, out)
    restored = np.asarray(restored, dtype=np.float32)
    if restored.shape != image.array.shape:
        raise ValueError(f"restored shape {restored.shape} differs from the input's {image.array.shape} ({image.path})")
    if not np.isfinite(restored).all():
        raise ValueError(f"restored image for {image.path} holds NaN / Inf; nothing written")
    with atomic_output(out, as_folder=image.kind == "dicom_series", overwrite=overwrite) as tmp:
        if image.kind == "nifti":
            _write_nifti(image, restored, tmp, model_name)
        elif image.kind == "itk":
            _write_itk(image, restored, tmp, model_name)
        else:
            _write_dicom(image, restored, tmp, model_name, task, unit_factor)
    return out

