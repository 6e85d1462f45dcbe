"""``medir prepare pet``: full-dose (and optionally low-dose) PET volumes -> the papers' PET slices in SUV.

Each volume is a subject: a NIfTI / ITK file (assumed to be in SUV already) or a DICOM series folder (turned into
body-weight SUV from its header). Volumes are re-oriented to RAS and cut along the PET task's ``slice_axis`` (a
192x192x400 volume gives 192 slices of 192x400, as in the papers); slices that are air in HQ and LQ (every voxel
at or under the task's ``air_threshold``) are dropped; negative SUV (reconstruction noise) is set to 0. Without
``--lq`` the 1/12-dose LQ is simulated with the task's transform (``LowDosePET``) in the volume's axial planes,
where PET is reconstructed, seeded per volume, before the cut.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medir_monai.transforms import extract_slices

from ...tasks import get_task
from ..io import IMAGE_SUFFIXES, DataError
from ..layout import check_same_shape
from .common import DEFAULT_SPLIT, PreparedLayout, split_subjects
from .slices import load_task_volume, simulate_lq

__all__ = ["MAX_PLAUSIBLE_SUV", "find_pet_volumes", "prepare_pet"]

TASK = "pet_synthesis"
MAX_PLAUSIBLE_SUV = 1000.0
"""A NIfTI volume with larger values is taken to be in Bq/ml, not SUV, and refused (SUV rarely exceeds ~100)."""


def _subject_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_pet_volumes(folder: str | os.PathLike) -> dict[str, Path]:
    """Subject -> volume of a folder: image files and DICOM series sub-folders (one level, hidden names skipped).

    Raises:
        DataError: missing or empty folder, two volumes with the same subject name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: PET input folder does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not (path.is_dir() or path.name.lower().endswith(IMAGE_SUFFIXES)):
            continue
        subject = _subject_name(path)
        if subject in found:
            raise DataError(f"two PET volumes named {subject!r}: {found[subject]} and {path}")
        found[subject] = path
    if not found:
        raise DataError(f"{folder}: no PET volume found (expected NIfTI / ITK files or DICOM series folders)")
    return found


def _pet_volume(path: Path) -> torch.Tensor:
    volume = load_task_volume(path, TASK)
    if not path.is_dir():
        peak = float(volume.max())
        if peak > MAX_PLAUSIBLE_SUV:
            raise DataError(f"{path}: values up to {peak:.4g} look like Bq/ml, not SUV; convert the volume to SUV "
                            "(or give the DICOM series, whose header holds weight and dose)")
    return volume.clamp(min=0.0)


def _slices(hq_path: Path, lq_path: Path | None, subject: str, seed: int):
    task = get_task(TASK)
    hq = _pet_volume(hq_path)
    if lq_path is not None:
        lq = _pet_volume(lq_path)
        check_same_shape(lq, hq, lq_path, hq_path)
    else:  # counting noise is simulated in the transaxial (axial) planes, where PET is reconstructed
        axial_spacing = tuple(float(torch.linalg.norm(hq.affine[:3, i])) for i in range(2))
        try:
            simulated = simulate_lq(hq.numpy(), TASK, axial_spacing, seed, f"{subject}.nii", -1)
        except DataError as err:
            raise DataError(f"{hq_path}: cannot simulate its low-dose pair: {str(err).split(': ', 2)[-1]}") from err
        lq = torch.from_numpy(simulated).clamp(min=0.0)
    stacked = MetaTensor(torch.stack([hq.as_tensor(), lq.as_tensor() if isinstance(lq, MetaTensor) else lq]),
                         affine=hq.affine)
    slices, indices = extract_slices(stacked, axis=task.slice_axis, air_threshold=task.air_threshold, name=str(hq_path))
    if not slices:
        raise DataError(f"{hq_path}: no slice kept by the rules of task {task.name!r} (all air?)")
    affine = slices[0].affine
    spacing = tuple(float(torch.linalg.norm(affine[:3, i])) for i in range(2))
    pairs = ((k, pair[0].numpy().astype(np.float32), pair[1].numpy().astype(np.float32))
             for k, pair in zip(indices, slices))
    return pairs, spacing


def prepare_pet(
    hq_dir: str | os.PathLike,
    out: str | os.PathLike,
    lq_dir: str | os.PathLike | None = None,
    split: Sequence[float] = DEFAULT_SPLIT,
    seed: int = 0,
    progress: bool = True,
) -> PreparedLayout:
    """Write PET slices into ``<out>/PET/<split>/<LQ|HQ>/<subject>_<k>.nii`` (SUV), resumably.

    Args:
        hq_dir: folder of full-dose volumes.
        out: output root.
        lq_dir: folder of low-dose volumes with the same subject names (``None``: simulate 1/12 dose).
        split: train / validation / test fractions or subject counts.
        seed: seed of the subject shuffle and of the simulated noise.
        progress: tqdm bar over subjects.

    Raises:
        DataError: an HQ volume without LQ partner or the reverse, shape mismatch (naming both), non-SUV values.
    """
    from tqdm.auto import tqdm

    hq_files = find_pet_volumes(hq_dir)
    lq_files = find_pet_volumes(lq_dir) if lq_dir is not None else None
    if lq_files is not None:
        for subject, path in hq_files.items():
            if subject not in lq_files:
                raise DataError(f"{path}: HQ volume has no LQ partner named {subject!r} in {lq_dir}")
        for subject, path in lq_files.items():
            if subject not in hq_files:
                raise DataError(f"{path}: LQ volume has no HQ partner named {subject!r} in {hq_dir}")
    assignment = split_subjects(hq_files, split, seed)
    task = get_task(TASK)
    settings = {"hq": str(Path(hq_dir).resolve()), "lq": None if lq_dir is None else str(Path(lq_dir).resolve()),
                "split": list(split), "seed": seed, "slice_axis": task.slice_axis,
                "air_threshold": task.air_threshold,
                "simulation": None if lq_dir is not None else {task.degradation: task.degradation_args}}
    layout = PreparedLayout(out, TASK, "pet", settings, assignment)
    for subject in tqdm(sorted(hq_files), desc="prepare pet", unit="volume", disable=not progress):
        if layout.is_done(subject):
            layout.resumed += 1
            continue
        pairs, spacing = _slices(hq_files[subject], None if lq_files is None else lq_files[subject], subject, seed)
        layout.write_subject(subject, pairs, spacing, str(hq_files[subject]),
                             extra={"lq_source": "simulated" if lq_files is None else str(lq_files[subject])})
    return layout
