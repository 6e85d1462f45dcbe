"""DICOM primitives shared by the readers of training data and of scans to restore: recognising a DICOM file,
reading its header, one frame in physical units (the Modality LUT applied), and PET's body-weight SUV factor.
Every problem is a :class:`~medir_monai.data.io.DataError` naming the file."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

import numpy as np

from .io import DataError

__all__ = ["looks_like_dicom", "read_dicom_header", "dicom_plane", "suv_factor"]

_SECONDS_PER_DAY = 86400.0


def looks_like_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then ``DICM``."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_dicom_header(path: Path, stop_before_pixels: bool = True):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as err:
        raise DataError(f"{path}: not a DICOM file ({err})") from err
    except Exception as err:  # truncated / corrupt
        raise DataError(f"{path}: unreadable or corrupt DICOM file: {type(err).__name__}: {err}") from err


def dicom_plane(ds, path: Path) -> np.ndarray:
    """One DICOM frame in physical units (Modality LUT / RescaleSlope / RescaleIntercept applied), (columns, rows)."""
    from pydicom.pixels import apply_modality_lut

    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise DataError(f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames) is not supported; "
                        "convert it to one file per slice or to NIfTI")
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise DataError(f"{path}: colour DICOM (SamplesPerPixel={ds.SamplesPerPixel}) is not a scan to restore")
    try:
        stored = ds.pixel_array
    except Exception as err:
        raise DataError(f"{path}: cannot decode the DICOM pixel data: {type(err).__name__}: {err}") from err
    if stored.ndim != 2:
        raise DataError(f"{path}: expected one 2-D frame, got pixel data of shape {stored.shape}")
    physical = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    return physical.T  # (rows, columns) -> MONAI index order (columns, rows)


def _seconds(date: Any, time: Any) -> float:
    """Seconds since an arbitrary origin for a DICOM DA / TM pair (date may be empty)."""
    from pydicom.valuerep import DA, TM

    t = TM(str(time).strip())
    day = DA(str(date).strip()) if date and str(date).strip() else datetime.date(2000, 1, 1)
    return (datetime.datetime.combine(day, t) - datetime.datetime(1970, 1, 1)).total_seconds()


def suv_factor(ds, path: Path) -> float:
    """Factor turning this PET series' values into body-weight SUV (g/ml).

    ``SUV = C * weight / dose_at_reference`` with ``C`` in Bq/ml, the weight in grams and the injected dose
    decayed (half-life) from the injection to the reference time of the decay correction (``START``: series
    start; ``ADMIN``: the injection itself). Images already in ``GML`` pass unchanged.

    Raises:
        DataError: units other than BQML / GML, or missing patient weight / dose / times.
    """
    units = str(getattr(ds, "Units", "")).strip().upper()
    if units == "GML":
        return 1.0
    if units != "BQML":
        raise DataError(f"{path}: PET Units {units or '(missing)'!r} cannot be turned into SUV; "
                        "the PET task needs BQML (with patient weight and injected dose) or GML")
    try:
        weight_g = float(ds.PatientWeight) * 1000.0
        info = ds.RadiopharmaceuticalInformationSequence[0]
        dose_bq = float(info.RadionuclideTotalDose)
        half_life_s = float(info.RadionuclideHalfLife)
        correction = str(getattr(ds, "DecayCorrection", "START")).strip().upper()
        if correction == "ADMIN":
            elapsed = 0.0
        elif correction == "START":
            if "RadiopharmaceuticalStartDateTime" in info and info.RadiopharmaceuticalStartDateTime:
                text = str(info.RadiopharmaceuticalStartDateTime)
                start = _seconds(text[:8], text[8:] or "000000")
            else:
                start = _seconds(getattr(ds, "SeriesDate", ""), info.RadiopharmaceuticalStartTime)
            elapsed = _seconds(getattr(ds, "SeriesDate", ""), ds.SeriesTime) - start
            if not getattr(ds, "SeriesDate", "") and elapsed < 0:
                elapsed += _SECONDS_PER_DAY  # times only, injection before midnight
        else:
            raise DataError(f"{path}: PET DecayCorrection {correction!r} is not supported (START or ADMIN)")
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: PET in BQML needs PatientWeight, RadiopharmaceuticalInformationSequence "
                        f"(RadionuclideTotalDose, RadionuclideHalfLife, start time) and SeriesTime to compute "
                        f"SUV: {type(err).__name__}: {err}") from err
    if weight_g <= 0 or dose_bq <= 0 or half_life_s <= 0:
        raise DataError(f"{path}: PET SUV needs positive weight, dose and half-life "
                        f"(got {weight_g} g, {dose_bq} Bq, {half_life_s} s)")
    dose_at_reference = dose_bq * math.exp(-math.log(2.0) * elapsed / half_life_s)
    return weight_g / dose_at_reference
