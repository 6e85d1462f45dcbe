"""``medir prepare ixi``: IXI T2 volumes -> the papers' MRI super-resolution slices.

The papers keep the central 100 axial slices of every IXI T2 volume (``Task.central_slices``) and make the LQ
slice by k-space truncation (``KSpaceTruncate``, the central 25 % of each k-space axis). Subjects are split whole;
IXI's file names ``IXI<id>-<site>-<n>-T2.nii.gz`` give the subject (``IXI<id>``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ...tasks import get_task
from ..io import DataError
from .common import DEFAULT_SPLIT, PreparedLayout, split_subjects
from .slices import simulate_lq, volume_slices

__all__ = ["IXI_T2_NAME", "find_ixi_t2", "prepare_ixi"]

IXI_T2_NAME = re.compile(r"(IXI\d+)-([A-Za-z]+)-(\d+)-T2\.nii(\.gz)?", re.IGNORECASE)
"""An IXI T2 file name: subject ``IXI<id>``, site (``Guys``, ``HH``, ``IOP``), series number."""
TASK = "mri_sr"


def find_ixi_t2(folder: str | os.PathLike) -> dict[str, Path]:
    """Subject -> T2 file of an IXI download folder (searched recursively; other files are ignored).

    Raises:
        DataError: missing folder, no IXI T2 file, or two T2 files of one subject (naming both).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: IXI input folder does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        match = IXI_T2_NAME.fullmatch(path.name)
        if not match or not path.is_file():
            continue
        subject = match.group(1).upper()
        if subject in found:
            raise DataError(f"two T2 volumes of subject {subject}: {found[subject]} and {path}")
        found[subject] = path
    if not found:
        raise DataError(
            f"{folder}: no IXI T2 volume found (expected files named IXI<id>-<site>-<n>-T2.nii.gz, "
            "as in the IXI-T2 download)"
        )
    return found


def _pairs(path: Path, subject: str, seed: int) -> tuple[Iterator[tuple[int, np.ndarray, np.ndarray]], tuple]:
    slices, spacing = volume_slices(path, TASK)
    def pairs():
        for index, hq in slices:
            yield index, hq, simulate_lq(hq, TASK, spacing, seed, f"{subject}.nii", index)
    return pairs(), spacing


def prepare_ixi(
    input_dir: str | os.PathLike,
    out: str | os.PathLike,
    split: Sequence[float] = DEFAULT_SPLIT,
    seed: int = 0,
    progress: bool = True,
) -> PreparedLayout:
    """Write the MRI slices of an IXI T2 folder into ``<out>/MRI/<split>/<LQ|HQ>/`` (resumable).

    Args:
        input_dir: the IXI-T2 folder (``IXI002-Guys-0828-T2.nii.gz``, ...).
        out: output root (new or empty, or an earlier run of the same command to resume).
        split: train / validation / test fractions or subject counts.
        seed: seed of the subject shuffle.
        progress: show a tqdm bar over subjects.

    Returns:
        the :class:`PreparedLayout` (its ``summary()`` is the table the CLI prints).
    """
    from tqdm.auto import tqdm

    files = find_ixi_t2(input_dir)
    assignment = split_subjects(files, split, seed)
    task = get_task(TASK)
    settings = {"input": str(Path(input_dir).resolve()), "split": list(split), "seed": seed,
                "central_slices": task.central_slices, "slice_axis": task.slice_axis,
                "degradation": task.degradation, "degradation_args": task.degradation_args}
    layout = PreparedLayout(out, TASK, "ixi", settings, assignment)
    for subject in tqdm(sorted(files), desc="prepare ixi", unit="subject", disable=not progress):
        if layout.is_done(subject):
            layout.resumed += 1
            continue
        pairs, spacing = _pairs(files[subject], subject, seed)
        layout.write_subject(subject, pairs, spacing, str(files[subject]))
    return layout
