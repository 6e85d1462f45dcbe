"""``medir prepare mayo``: AAPM-Mayo low-dose CT DICOM -> paired full / quarter dose slices, split by patient.

Two releases are read the same way, from the DICOM headers rather than from file order:

* the 2016 Grand Challenge folders (``L067/full_1mm/*.IMA`` and ``L067/quarter_1mm/*.IMA``, file names
  ``L067_FD_1_1.CT.0001...IMA`` / ``L067_QD_1_1...``, often under ``1mm B30/`` or ``3mm D45/``);
* TCIA's "LDCT-and-Projection-data" (``L067/<study>/<n>-Full Dose Images-<id>/1-001.dcm`` and
  ``...-Low Dose Images-...``; its projection series, which carry no image position, are skipped).

The dose of a file comes from its SeriesDescription, else its file name (``_FD_`` / ``_QD_``), else the nearest
folder whose name says full / quarter / low dose. Within a patient the full- and quarter-dose series of the same
slice thickness and reconstruction kernel are paired slice by slice on the position along the slice normal
(``ImagePositionPatient`` on the ``ImageOrientationPatient`` normal), and each pair must share rows, columns, pixel
spacing, orientation and in-plane position. The papers test on one patient with 211 slices, L506 at 1 mm in the
2016 release, which is the default ``--test`` patient when it is present.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...tasks import get_task
from ..io import DICOM_SUFFIXES, DataError
from .common import PreparedLayout, split_subjects

__all__ = ["MAYO_DEFAULT_SPLIT", "MAYO_TEST_PATIENT", "CTSlice", "scan_mayo", "pair_mayo", "prepare_mayo"]

TASK = "ct_denoise"
MAYO_DEFAULT_SPLIT = (0.8, 0.1, 0.1)
"""Patients per split when ``--split`` is not given (10 patients of the 2016 release: 8 / 1 / 1)."""
MAYO_TEST_PATIENT = "L506"
"""The papers' test patient (211 slices at 1 mm), fixed to the test split when present and no ``--test`` is given."""
POSITION_DECIMALS = 2  # slice positions are matched to 0.01 mm
GEOMETRY_TOLERANCE_MM = 0.01
_QUARTER = re.compile(r"quarter|(?<![a-z])qd(?![a-z])|low[ _-]?dose|ldct")
_FULL = re.compile(r"full|(?<![a-z])fd(?![a-z])|normal[ _-]?dose|ndct")


@dataclass(frozen=True)
class CTSlice:
    """Header facts of one CT image file."""

    path: Path
    patient: str
    dose: str  # "full" or "quarter"
    thickness: float
    kernel: str
    position: float  # along the slice normal, mm
    rows: int
    columns: int
    spacing: tuple[float, float]  # PixelSpacing (row, column), mm
    orientation: tuple[float, ...]
    origin_xy: tuple[float, float]  # the two in-plane coordinates of ImagePositionPatient

    @property
    def series(self) -> str:
        return f"{self.thickness:g} mm {self.kernel}".strip()


def _dose_of(path: Path, root: Path, description: str) -> str | None:
    """``"full"`` / ``"quarter"`` from the series description, the file name, then the folders (nearest first)."""
    relative = path.relative_to(root)
    texts = [description, relative.name, *reversed(relative.parent.parts)]
    for text in texts:
        text = str(text).lower()
        quarter, full = bool(_QUARTER.search(text)), bool(_FULL.search(text))
        if quarter != full:
            return "quarter" if quarter else "full"
    return None


def _is_candidate(path: Path) -> bool:
    from ..dicom import looks_like_dicom

    return path.is_file() and not path.name.startswith(".") and path.name.upper() != "DICOMDIR" and (
        path.name.lower().endswith(DICOM_SUFFIXES) or looks_like_dicom(path))


def _header_slice(path: Path, root: Path) -> CTSlice | None:
    """The :class:`CTSlice` of a file, ``None`` for DICOM that is not a CT image slice (projections, reports)."""
    from ..dicom import read_dicom_header

    ds = read_dicom_header(path)
    if str(getattr(ds, "Modality", "")).upper() != "CT":
        return None
    needed = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    if any(getattr(ds, key, None) in (None, "") for key in needed):
        return None
    dose = _dose_of(path, root, str(getattr(ds, "SeriesDescription", "") or ""))
    if dose is None:
        raise DataError(
            f"{path}: cannot tell whether this is a full- or a quarter-dose image (its SeriesDescription, file name "
            "and folders name neither 'full' nor 'quarter' / 'low dose'); keep the release's folder names"
        )
    try:
        orientation = tuple(float(v) for v in ds.ImageOrientationPatient)
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        kernel = ds.get("ConvolutionKernel", "")
        kernel = str(kernel) if isinstance(kernel, str) else "/".join(str(k) for k in kernel)  # VM may be > 1
        thickness = float(ds.get("SliceThickness", 0) or 0)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: malformed geometry tags: {err}") from err
    patient = str(getattr(ds, "PatientID", "") or "").strip() or path.relative_to(root).parts[0]
    return CTSlice(path, patient, dose, thickness, kernel.strip(), float(position @ normal), int(ds.Rows),
                   int(ds.Columns), spacing, orientation, (float(position[0]), float(position[1])))


def scan_mayo(input_dir: str | os.PathLike, thickness: float | None = None, kernel: str | None = None,
              progress: bool = False) -> tuple[list[CTSlice], int]:
    """Header facts of every CT image slice under ``input_dir`` (recursively), optionally only one thickness /
    kernel; returns them and the number of DICOM files skipped as not CT image slices.

    Raises:
        DataError: missing folder, no CT image found, a slice whose dose cannot be told, unreadable DICOM.
    """
    from tqdm.auto import tqdm

    root = Path(input_dir)
    if not root.is_dir():
        raise DataError(f"{root}: Mayo input folder does not exist")
    files = [p for p in sorted(root.rglob("*")) if _is_candidate(p)]
    slices, skipped = [], 0
    for path in tqdm(files, desc="read headers", unit="file", disable=not progress):
        found = _header_slice(path, root)
        if found is None:
            skipped += 1
            continue
        if thickness is not None and abs(found.thickness - thickness) > 1e-3:
            continue
        if kernel is not None and found.kernel.lower() != kernel.lower():
            continue
        slices.append(found)
    if not slices:
        wanted = " with " + ", ".join(f for f in (f"{thickness:g} mm" if thickness else "", kernel or "") if f)
        raise DataError(f"{root}: no CT image slice found{wanted if thickness or kernel else ''} "
                        f"({len(files)} DICOM file(s) read)")
    return slices, skipped


def _check_geometry(full: CTSlice, quarter: CTSlice) -> None:
    problems = []
    if (full.rows, full.columns) != (quarter.rows, quarter.columns):
        problems.append(f"size {full.rows}x{full.columns} vs {quarter.rows}x{quarter.columns}")
    if not np.allclose(full.spacing, quarter.spacing, atol=1e-4):
        problems.append(f"pixel spacing {full.spacing} vs {quarter.spacing}")
    if not np.allclose(full.orientation, quarter.orientation, atol=1e-4):
        problems.append(f"orientation {full.orientation} vs {quarter.orientation}")
    if not np.allclose(full.origin_xy, quarter.origin_xy, atol=GEOMETRY_TOLERANCE_MM):
        problems.append(f"in-plane position {full.origin_xy} vs {quarter.origin_xy}")
    if problems:
        raise DataError(f"geometry mismatch between full dose {full.path} and quarter dose {quarter.path}: "
                        + "; ".join(problems))


def _by_position(slices: list[CTSlice]) -> dict[float, CTSlice]:
    out: dict[float, CTSlice] = {}
    for s in slices:
        key = round(s.position, POSITION_DECIMALS)
        if key in out:
            raise DataError(f"two {s.dose}-dose slices of patient {s.patient} at position {key} mm: "
                            f"{out[key].path} and {s.path}")
        out[key] = s
    return out


def pair_mayo(slices: Sequence[CTSlice]) -> dict[str, dict]:
    """Pair full / quarter dose slices per patient by slice position.

    Returns:
        patient -> ``{"pairs": [(full, quarter), ...] in position order, "series": str, "unpaired": int}``.

    Raises:
        DataError: a patient with several series kinds (thicknesses / kernels) to choose from, a patient with only
            one dose, duplicate positions, no common position, or a geometry mismatch (naming both files).
    """
    by_patient: dict[str, dict[str, list[CTSlice]]] = defaultdict(lambda: defaultdict(list))
    for s in slices:
        by_patient[s.patient][s.dose].append(s)
    out = {}
    for patient, doses in sorted(by_patient.items()):
        missing = [d for d in ("full", "quarter") if not doses.get(d)]
        if missing:
            raise DataError(f"patient {patient}: no {missing[0]}-dose images found "
                            f"(found {len(doses[('full', 'quarter')[missing[0] == 'full']])} of the other dose)")
        kinds = sorted({s.series for s in doses["full"]} & {s.series for s in doses["quarter"]})
        if not kinds:
            raise DataError(f"patient {patient}: full-dose series ({sorted({s.series for s in doses['full']})}) and "
                            f"quarter-dose series ({sorted({s.series for s in doses['quarter']})}) share no thickness "
                            "and kernel")
        if len(kinds) > 1:
            raise DataError(f"patient {patient}: several series kinds to pair ({', '.join(kinds)}); choose one with "
                            "--thickness and/or --kernel")
        full = _by_position([s for s in doses["full"] if s.series == kinds[0]])
        quarter = _by_position([s for s in doses["quarter"] if s.series == kinds[0]])
        common = sorted(set(full) & set(quarter))
        if not common:
            raise DataError(f"patient {patient}: full- and quarter-dose slices share no slice position")
        for z in common:
            _check_geometry(full[z], quarter[z])
        out[patient] = {"pairs": [(full[z], quarter[z]) for z in common], "series": kinds[0],
                        "unpaired": len(full) + len(quarter) - 2 * len(common)}
    return out


def _read_pair(full: CTSlice, quarter: CTSlice) -> tuple[np.ndarray, np.ndarray]:
    from ..dicom import dicom_plane, read_dicom_header

    hq = dicom_plane(read_dicom_header(full.path, stop_before_pixels=False), full.path)
    lq = dicom_plane(read_dicom_header(quarter.path, stop_before_pixels=False), quarter.path)
    return hq, lq


def prepare_mayo(
    input_dir: str | os.PathLike,
    out: str | os.PathLike,
    split: Sequence[float] = MAYO_DEFAULT_SPLIT,
    seed: int = 0,
    test: Sequence[str] | None = None,
    validation: Sequence[str] = (),
    thickness: float | None = None,
    kernel: str | None = None,
    progress: bool = True,
) -> PreparedLayout:
    """Write paired Mayo slices into ``<out>/CT/<split>/<LQ|HQ>/<patient>_<k>.nii`` (HU, int16), resumably.

    Args:
        input_dir: the release folder (2016 challenge or TCIA layout).
        out: output root.
        split: train / validation / test fractions or patient counts.
        seed: seed of the patient shuffle.
        test: patients fixed to the test split (default: L506 when present).
        validation: patients fixed to the validation split.
        thickness: keep only series of this slice thickness (mm), e.g. 1 or 3.
        kernel: keep only this reconstruction kernel, e.g. ``B30f``.
        progress: tqdm bars.
    """
    from tqdm.auto import tqdm

    slices, skipped = scan_mayo(input_dir, thickness, kernel, progress)
    patients = pair_mayo(slices)
    if test is None:
        test = [MAYO_TEST_PATIENT] if MAYO_TEST_PATIENT in patients else []
    fixed = {**{p: "validation" for p in validation}, **{p: "test" for p in test}}
    assignment = split_subjects(patients, split, seed, fixed)
    settings = {"input": str(Path(input_dir).resolve()), "split": list(split), "seed": seed,
                "fixed": fixed, "thickness": thickness, "kernel": kernel}
    layout = PreparedLayout(out, TASK, "mayo", settings, assignment)
    air = get_task(TASK).air_threshold
    for patient in tqdm(sorted(patients), desc="prepare mayo", unit="patient", disable=not progress):
        if layout.is_done(patient):
            layout.resumed += 1
            continue
        found = patients[patient]
        first = found["pairs"][0][0]
        spacing = (first.spacing[1], first.spacing[0])  # (column, row) spacing: MONAI index order

        def pairs(found=found):
            for k, (full, quarter) in enumerate(found["pairs"]):
                hq, lq = _read_pair(full, quarter)
                if hq.shape != lq.shape:
                    raise DataError(f"pixel data size differs: {full.path} {hq.shape} vs {quarter.path} {lq.shape}")
                if air is None or (hq > air).any():
                    yield k, hq, lq

        layout.write_subject(patient, pairs(), spacing, str(first.path.parent), dtype=np.int16,
                             extra={"series": found["series"], "unpaired": found["unpaired"]})
    layout.notes.append(f"{skipped} DICOM file(s) skipped as not CT image slices (projection data, reports)"
                        if skipped else "")
    return layout
