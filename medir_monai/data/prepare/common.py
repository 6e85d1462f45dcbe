"""What the ``medir prepare`` commands share: the split by subject, the resumable writer of the authors' layout
and the summary table.

A prepared folder is the authors' layout ``<out>/<MRI|CT|PET>/<train|validation|test>/<LQ|HQ>/<subject>_<k>.nii``
(2-D slices in physical units, LQ and HQ under the same name), so a bundle trains on it unchanged with
``--dataset_dir <out>``; the three commands can share one ``<out>`` (each owns its task folder), which gives the
all-in-one training set. ``<out>/<MRI|CT|PET>/prepare.json`` records the command's settings, which subject went to
which split and the subjects already finished: a rerun with the same settings skips those (resume), a rerun with
other settings, or a non-empty task folder that no ``medir prepare`` wrote, is refused (nothing is overwritten).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ...tasks import Task, get_task
from ..io import DataError, atomic_write_bytes, write_nifti_slice
from ..layout import PAIR_FOLDERS, SPLITS

__all__ = [
    "PREPARE_MANIFEST",
    "DEFAULT_SPLIT",
    "parse_split",
    "split_subjects",
    "PreparedLayout",
]

PREPARE_MANIFEST = "prepare.json"
DEFAULT_SPLIT = (0.7, 0.1, 0.2)
"""Fractions of subjects for train / validation / test when a command is not given ``--split``."""
SLICE_SUFFIX = ".nii"  # the authors' release stores uncompressed 2-D NIfTI slices


def parse_split(text: str | Sequence[float]) -> tuple[float, ...]:
    """``"0.7,0.1,0.2"`` (fractions of the subjects) or ``"405,59,114"`` (subject counts) -> a 3-tuple.

    Raises:
        ValueError: not three non-negative numbers, or fractions that do not sum to 1.
    """
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    if len(values) != len(SPLITS) or any(v < 0 for v in values):
        raise ValueError(f"--split needs three non-negative numbers (train,validation,test), got {text!r}")
    if not _are_counts(values) and abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"--split fractions must sum to 1 (or give whole subject counts), got {text!r}")
    return tuple(values)


def _are_counts(values: Sequence[float]) -> bool:
    return all(float(v).is_integer() for v in values) and sum(values) > 1


def _split_sizes(n: int, split: Sequence[float]) -> list[int]:
    """Subjects per split: counts as given (they must add up to ``n``), or fractions by largest remainder."""
    if _are_counts(split):
        sizes = [int(v) for v in split]
        if sum(sizes) != n:
            raise DataError(f"--split counts {sizes} add up to {sum(sizes)} subjects, but {n} were found")
        return sizes
    exact = [f * n for f in split]
    sizes = [int(np.floor(v)) for v in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - sizes[i], reverse=True)[: n - sum(sizes)]:
        sizes[i] += 1
    for i, fraction in enumerate(split):  # a split asked for gets at least one subject, taken from the largest
        largest = int(np.argmax(sizes))
        if fraction > 0 and sizes[i] == 0 and sizes[largest] > 1:
            sizes[i], sizes[largest] = 1, sizes[largest] - 1
    return sizes


def split_subjects(
    subjects: Iterable[str],
    split: Sequence[float] = DEFAULT_SPLIT,
    seed: int = 0,
    fixed: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Assign every subject to exactly one of train / validation / test.

    Args:
        subjects: subject names (patients / volumes); duplicates are an error.
        split: fractions or counts per split (see :func:`parse_split`).
        seed: seed of the shuffle of the subjects not in ``fixed`` (sorted first, so the input order does not count).
        fixed: subject -> split assignments made before the shuffle (e.g. the papers' test patient); they count
            towards the split sizes.

    Returns:
        subject -> split name, in sorted subject order.

    Raises:
        DataError: a fixed subject that was not found, a split left without subjects, counts that do not match.
    """
    names = list(subjects)
    if len(set(names)) != len(names):
        raise DataError(f"subject names are not unique: {sorted({n for n in names if names.count(n) > 1})}")
    names = sorted(names)
    fixed = dict(fixed or {})
    for subject, where in fixed.items():
        if subject not in names:
            raise DataError(f"subject {subject!r} given for the {where} split was not found (found: {', '.join(names)})")
        if where not in SPLITS:
            raise DataError(f"unknown split {where!r} for subject {subject!r} (one of {', '.join(SPLITS)})")
    sizes = dict(zip(SPLITS, _split_sizes(len(names), split)))
    needed = {s: sizes[s] - sum(1 for w in fixed.values() if w == s) for s in SPLITS}
    for s in SPLITS:
        if needed[s] < 0:
            raise DataError(f"more subjects are fixed to the {s} split than it holds ({sizes[s]})")
    free = [n for n in names if n not in fixed]
    order = [free[i] for i in np.random.default_rng(seed).permutation(len(free))]
    assignment = dict(fixed)
    for s in ("test", "validation", "train"):
        for subject in order[: needed[s]]:
            assignment[subject] = s
        order = order[needed[s]:]
    empty = [s for s in SPLITS if s not in assignment.values()]
    if empty:
        raise DataError(
            f"{len(names)} subject(s) leave the {', '.join(empty)} split(s) empty: every split needs at least one "
            "subject (the bundles read train, validation and test); give more subjects or another --split"
        )
    return {n: assignment[n] for n in names}


class PreparedLayout:
    """Writes one task's slices into the authors' layout, subject by subject, resumably.

    Args:
        out: the output root.
        task: registry task (its folder: ``MRI`` / ``CT`` / ``PET``).
        dataset: name of the source dataset (``ixi``, ``mayo``, ``pet``), recorded in the manifest.
        settings: everything that determines the output (inputs, seed, split, options); a rerun must match.
        assignment: subject -> split.

    Raises:
        FileExistsError: ``out`` holds files that this command did not write, or a manifest with other settings.
    """

    def __init__(self, out: str | os.PathLike, task: str | Task, dataset: str, settings: Mapping,
                 assignment: Mapping[str, str]) -> None:
        self.out = Path(out)
        self.task = get_task(task)
        self.task_dir = self.out / self.task.folder
        self.manifest_path = self.task_dir / PREPARE_MANIFEST
        wanted = {"dataset": dataset, "task": self.task.name, "settings": json.loads(json.dumps(dict(settings))),
                  "splits": dict(assignment)}
        previous = self._read_manifest()
        if previous is not None and not previous.get("done") and not self._slice_files():
            previous = None  # an earlier run stopped before writing anything: nothing to keep
            self.manifest_path.unlink()
        if previous is None:
            if self.out.exists() and not self.out.is_dir():
                raise FileExistsError(f"{self.out}: exists and is not a folder; give a new --out folder")
            if self.task_dir.exists() and (not self.task_dir.is_dir() or any(self.task_dir.iterdir())):
                raise FileExistsError(
                    f"{self.task_dir}: exists and is not an earlier 'medir prepare' output; it is never overwritten: "
                    "give a new --out folder"
                )
            self.manifest = dict(wanted, done={})
            self._save()
        else:
            changed = [k for k in ("dataset", "task", "settings", "splits") if previous.get(k) != wanted[k]]
            if changed:
                raise FileExistsError(
                    f"{self.out}: prepared earlier with other {', '.join(changed)} ({self.manifest_path}); "
                    "nothing is overwritten: give a new --out folder, or rerun with the earlier settings to resume"
                )
            self.manifest = previous
        self.notes: list[str] = []
        self.resumed = 0  # subjects found finished by an earlier run and skipped

    def _slice_files(self) -> list[Path]:
        return [p for p in self.task_dir.rglob("*") if p.is_file() and p.name != PREPARE_MANIFEST] \
            if self.task_dir.is_dir() else []

    def _read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise FileExistsError(f"{self.manifest_path}: unreadable prepare manifest ({err}); give a new --out") from err

    def _save(self) -> None:
        atomic_write_bytes(self.manifest_path, (json.dumps(self.manifest, indent=1) + "\n").encode())

    def split_of(self, subject: str) -> str:
        return self.manifest["splits"][subject]

    def is_done(self, subject: str) -> bool:
        """True when ``subject`` was completely written by an earlier (possibly interrupted) run."""
        return subject in self.manifest["done"]

    def folder(self, split: str, pair: str) -> Path:
        return self.task_dir / split / pair

    def _remove_partial(self, subject: str) -> None:
        """Slices of ``subject`` left by a run killed while writing it (it was not marked done)."""
        pattern = re.compile(re.escape(subject) + r"_\d+\.nii(\.gz)?$")
        for split in SPLITS:
            for pair in PAIR_FOLDERS:
                folder = self.folder(split, pair)
                for path in folder.iterdir() if folder.is_dir() else ():
                    if pattern.fullmatch(path.name):
                        path.unlink()

    def write_subject(self, subject: str, pairs: Iterable[tuple[int, np.ndarray, np.ndarray]],
                      spacing_mm: Sequence[float], source: str, dtype=np.float32, extra: Mapping | None = None) -> dict:
        """Write the ``(index, hq, lq)`` slices of ``subject`` (2-D arrays, physical units) and mark it done.

        ``dtype`` is the stored type (integer types are rounded); ``extra`` adds facts to the subject's record.

        Returns:
            the subject's record: split, slice count, slice shape, HQ / LQ value ranges, source file(s).
        """
        self._remove_partial(subject)
        split = self.split_of(subject)
        count, shapes = 0, set()
        hq_range, lq_range = [np.inf, -np.inf], [np.inf, -np.inf]
        for index, hq, lq in pairs:
            if hq.shape != lq.shape:
                raise DataError(f"{source}: slice {index}: LQ shape {lq.shape} differs from HQ shape {hq.shape}")
            name = f"{subject}_{index:04d}{SLICE_SUFFIX}"
            write_nifti_slice(self.folder(split, "HQ") / name, hq, spacing_mm, dtype)
            write_nifti_slice(self.folder(split, "LQ") / name, lq, spacing_mm, dtype)
            count += 1
            shapes.add("x".join(str(v) for v in hq.shape))
            hq_range = [min(hq_range[0], float(hq.min())), max(hq_range[1], float(hq.max()))]
            lq_range = [min(lq_range[0], float(lq.min())), max(lq_range[1], float(lq.max()))]
        if count == 0:
            raise DataError(f"{source}: no slice kept for subject {subject!r} (all air?)")
        record = {"split": split, "slices": count, "shape": sorted(shapes), "hq_range": hq_range,
                  "lq_range": lq_range, "source": source, **dict(extra or {})}
        self.manifest["done"][subject] = record
        self._save()
        return record

    def summary(self) -> str:
        """A text table: subjects, slices, slice shapes and value ranges per split (physical units)."""
        unit = self.task.unit
        papers = "x".join(str(v) for v in self.task.slice_size)
        header = f"{'split':<11}{'subjects':>9}{'slices':>8}  {'slice shape':<18}{'HQ range (' + unit + ')':<22}LQ range ({unit})"
        lines = [f"{self.task.folder} ({self.task.name}) in {self.out}", header]
        for split in SPLITS:
            records = [r for r in self.manifest["done"].values() if r["split"] == split]
            if not records:
                lines.append(f"{split:<11}{0:>9}{0:>8}")
                continue
            shapes = sorted({s for r in records for s in r["shape"]})
            hq = (min(r["hq_range"][0] for r in records), max(r["hq_range"][1] for r in records))
            lq = (min(r["lq_range"][0] for r in records), max(r["lq_range"][1] for r in records))
            lines.append(
                f"{split:<11}{len(records):>9}{sum(r['slices'] for r in records):>8}  {','.join(shapes):<18}"
                f"{hq[0]:>9.4g} .. {hq[1]:<9.4g}{lq[0]:>9.4g} .. {lq[1]:.4g}"
            )
        other = sorted({s for r in self.manifest["done"].values() for s in r["shape"]} - {papers})
        if other:
            lines.append(f"note: the papers' {self.task.name} slices are {papers}; these are {', '.join(other)}")
        if self.resumed:
            lines.append(f"resumed: {self.resumed} subject(s) finished by an earlier run were skipped")
        return "\n".join(lines + [n for n in self.notes if n])
