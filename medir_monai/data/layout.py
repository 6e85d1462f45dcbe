"""Folder layouts and datalists -> lists of LQ/HQ items (docs/design.md, section 3).

Two inputs are accepted:

* the authors' released layout ``<root>/<PET|CT|MRI>/<train|validation|test>/<LQ|HQ>/`` holding 2-D slices
  (``.nii`` / ``.nii.gz``, or the training ``.bin`` tensors), paired by file name
  (:func:`scan_authors_layout`);
* MONAI-style JSON datalists (read with :func:`monai.data.load_decathlon_datalist`) whose items carry
  ``hq`` (required), ``lq`` (optional: missing means HQ-only, LQ is simulated with the task's default
  degradation) and ``task`` (a registry name) (:func:`load_datalist`).

Both give items ``{"task": name, "hq": path, "lq": path}`` (``lq`` is ``None`` for HQ-only items).
Volumes are then cut into 2-D slice items by :func:`expand_to_slices` with the task's rules
(``slice_axis``, ``central_slices``, ``air_threshold`` in :mod:`medir_monai.tasks`); every slice item has a ``slice`` key
(``-1``: the file itself is one 2-D slice, as in the authors' layout).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import Orientation

from ..tasks import UnknownTaskError, get_task, task_names
from .io import DataError, load_image

__all__ = [
    "SPLITS",
    "PAIR_FOLDERS",
    "scan_authors_layout",
    "load_datalist",
    "kept_slice_indices",
    "expand_to_slices",
    "load_volume",
    "check_same_shape",
]

SPLITS = ("train", "validation", "test")
PAIR_FOLDERS = ("LQ", "HQ")
WHOLE_FILE = -1  # ``slice`` value of an item whose file already is a 2-D slice
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


# ---- the authors' layout --------------------------------------------------------------------------------
def _child_dir(parent: Path, name: str) -> Path | None:
    """Sub-folder ``name`` of ``parent``, matched case-insensitively (``MRI`` / ``mri``)."""
    exact = parent / name
    if exact.is_dir():
        return exact
    for child in parent.iterdir() if parent.is_dir() else ():
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    return None


def _image_files(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Image files of ``folder`` keyed by file name; an empty folder is an error naming it."""
    files = {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(tuple(suffixes))
    }
    if not files:
        raise DataError(f"{folder}: empty folder: no image files ({', '.join(suffixes)}) found")
    return files


def scan_authors_layout(
    root: str | os.PathLike,
    split: str = "train",
    tasks: Iterable[str] | None = None,
    suffixes: Sequence[str] = (".nii", ".nii.gz", ".bin"),
) -> list[dict]:
    """Pair the LQ and HQ slices of the authors' layout ``<root>/<MRI|CT|PET>/<split>/<LQ|HQ>/``.

    Args:
        root: dataset root.
        split: ``train``, ``validation`` or ``test`` (any sub-folder name is accepted).
        tasks: registry names to read; default: every registered task whose folder exists under ``root``.
        suffixes: file suffixes counted as slices.

    Returns:
        items ``{"task": name, "lq": path, "hq": path, "slice": -1}`` sorted by task (registry order) and
        file name.

    Raises:
        DataError: missing root / task / split / LQ / HQ folder, empty folder, or a file without partner
            (an LQ slice without its HQ file or the reverse), each naming the path.
        UnknownTaskError: a name in ``tasks`` that is not registered.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    wanted = [get_task(t) for t in tasks] if tasks is not None else None
    candidates = wanted if wanted is not None else [get_task(n) for n in task_names()]
    items: list[dict] = []
    found_any = False
    for task in candidates:
        task_dir = _child_dir(root, task.folder)
        if task_dir is None:
            if wanted is not None:
                raise DataError(f"{root / task.folder}: folder of task {task.name!r} does not exist")
            continue
        found_any = True
        split_dir = _child_dir(task_dir, split)
        if split_dir is None:
            present = sorted(p.name for p in task_dir.iterdir() if p.is_dir())
            raise DataError(f"{task_dir / split}: split folder does not exist (found: {present or 'nothing'})")
        pair_dirs = {}
        for name in PAIR_FOLDERS:
            pair_dirs[name] = _child_dir(split_dir, name)
            if pair_dirs[name] is None:
                raise DataError(
                    f"{split_dir / name}: folder does not exist (expected {split_dir}/LQ and {split_dir}/HQ)"
                )
        lq_files = _image_files(pair_dirs["LQ"], suffixes)
        hq_files = _image_files(pair_dirs["HQ"], suffixes)
        for name, path in lq_files.items():
            if name not in hq_files:
                raise DataError(f"{path}: LQ file has no HQ partner (expected {pair_dirs['HQ'] / name})")
        for name, path in hq_files.items():
            if name not in lq_files:
                raise DataError(f"{path}: HQ file has no LQ partner (expected {pair_dirs['LQ'] / name})")
        items += [
            {"task": task.name, "lq": str(lq_files[n]), "hq": str(hq_files[n]), "slice": WHOLE_FILE}
            for n in sorted(lq_files)
        ]
    if not found_any:
        folders = ", ".join(get_task(n).folder for n in task_names())
        raise DataError(f"{root}: no task folder found (expected one of {folders})")
    return items


# ---- JSON datalists -------------------------------------------------------------------------------------
def load_datalist(
    path: str | os.PathLike,
    split: str = "training",
    base_dir: str | os.PathLike | None = None,
    default_task: str | None = None,
) -> list[dict]:
    """Read a MONAI-style JSON datalist of restoration items.

    The JSON holds lists keyed by split (``"training"``, ``"validation"``, ``"test"``), items like
    ``{"hq": "vol.nii.gz", "lq": "vol_lq.nii.gz", "task": "ct_denoise"}``; relative paths are resolved
    against ``base_dir`` (default: the JSON's folder). ``lq`` may be missing (HQ-only: LQ is simulated).

    Args:
        path: the JSON file.
        split: list key to read.
        base_dir: folder relative paths are resolved against.
        default_task: task of items without a ``task`` key (``None``: the key is required).

    Returns:
        items ``{"task", "hq", "lq" (path or None), ...}`` (other keys are kept).

    Raises:
        DataError: missing / malformed file, missing split, an item without ``hq`` or ``task``, a missing
            image file; messages name the datalist, the item and the file.
        UnknownTaskError: an unknown task name (the message lists the known tasks).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: datalist file does not exist")
    try:
        raw = load_decathlon_datalist(path, is_segmentation=False, data_list_key=split, base_dir=base_dir)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from err
    except (ValueError, TypeError) as err:
        raise DataError(f"{path}: bad datalist: {err}") from err
    items = []
    for i, item in enumerate(raw):
        where = f"{path}: {split!r} item {i}"
        if "hq" not in item:
            raise DataError(f"{where}: missing required key 'hq' (keys: {sorted(item)})")
        name = item.get("task", default_task)
        if name is None:
            raise DataError(f"{where}: missing key 'task' (one of: {', '.join(task_names())})")
        try:
            task = get_task(name)
        except UnknownTaskError as err:
            raise UnknownTaskError(f"{where}: {err}") from None
        out = dict(item, task=task.name, lq=item.get("lq"))
        for key in ("hq", "lq"):
            if out[key] is not None and not Path(out[key]).exists():
                raise DataError(f"{where}: {key} file {out[key]} does not exist")
            out[key] = None if out[key] is None else str(out[key])
        items.append(out)
    if not items:
        raise DataError(f"{path}: {split!r} list is empty")
    return items


# ---- volumes -> 2-D slices ------------------------------------------------------------------------------
def load_volume(path: str | os.PathLike, axcodes: str | None = "RAS") -> MetaTensor:
    """Load a 2-D slice or 3-D volume in physical units; 3-D volumes are re-oriented to ``axcodes``.

    Slices are later taken along the task's ``slice_axis`` (2: axial for ``"RAS"``).
    """
    x = load_image(path, ndim=(2, 3))
    if x.ndim == 3 and axcodes is not None:
        x = Orientation(axcodes=axcodes, labels=_RAS_LABELS)(x[None])[0]
    return x


def kept_slice_indices(volume: torch.Tensor, task: str) -> list[int]:
    """Indices along the task's ``slice_axis`` of a 3-D RAS volume kept by its slice rules
    (:func:`medir_monai.transforms.select_slices`).

    ``central_slices = N``: only the N central slices (MRI: 100); ``air_threshold = t``: slices whose every
    voxel is at or below ``t`` (air only) are dropped (CT: -900 HU, PET: 0.05 SUV).
    """
    from medir_monai.transforms import select_slices

    task = get_task(task)
    plain = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    return select_slices(plain, axis=task.slice_axis, central=task.central_slices, air_threshold=task.air_threshold)


def expand_to_slices(items: Sequence[dict], axcodes: str | None = "RAS") -> list[dict]:
    """Cut 3-D items into one item per kept 2-D slice (``"slice": k`` along the task's ``slice_axis``: axial for
    MRI and CT, coronal for PET).

    Items that already carry a ``slice`` key pass through. 2-D files become one item with ``slice = -1``.
    LQ and HQ volumes must have the same shape.

    Raises:
        DataError: unreadable files, LQ/HQ shape mismatch (naming both files), a volume with no kept slice.
    """
    out = []
    for item in items:
        if "slice" in item:
            out.append(dict(item))
            continue
        hq = load_volume(item["hq"], axcodes)
        if item.get("lq") is not None:
            lq = load_volume(item["lq"], axcodes)
            check_same_shape(lq, hq, item["lq"], item["hq"])
        if hq.ndim == 2:
            out.append(dict(item, slice=WHOLE_FILE))
            continue
        kept = kept_slice_indices(hq, item["task"])
        if not kept:
            raise DataError(f"{item['hq']}: no slice kept by the rules of task {item['task']!r} (all air?)")
        out += [dict(item, slice=k) for k in kept]
    return out


def check_same_shape(lq: torch.Tensor, hq: torch.Tensor, lq_path, hq_path) -> None:
    """Raise :class:`DataError` naming both files when LQ and HQ shapes differ."""
    if tuple(lq.shape) != tuple(hq.shape):
        raise DataError(
            f"LQ/HQ shape mismatch: LQ {lq_path} has shape {tuple(lq.shape)} but HQ {hq_path} has shape "
            f"{tuple(hq.shape)}"
        )
