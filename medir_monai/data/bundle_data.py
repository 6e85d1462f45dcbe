"""The data entry points the bundle configs call (``medir_monai.data.build_dataset`` etc.).

``dataset_dir`` in a bundle is either a folder in the authors' layout ``<root>/<MRI|CT|PET>/<split>/<LQ|HQ>/``
(the embedded demo set is one) or a MONAI-style JSON datalist whose lists are keyed by split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medir_monai.transforms import (
    RandDoseScaled,
    RandForTasksd,
    RandIntensityScaled,
    RandPixelSized,
    RandPixelSizedResimulated,
)

from ..tasks import DEFAULT_ZOOM_TASKS, PAPER_PATCH_SIZE, get_task
from .dataset import degradation_for, restoration_dataset
from .demo import default_demo_dir, ensure_demo_dataset, extended_demo_dir
from .io import DataError, is_image_file
from .layout import load_datalist, scan_authors_layout

__all__ = ["build_dataset", "prepare_dataset_dir", "list_images", "robust_augmentations", "CheckFinited", "DATALIST_SPLITS"]

# split names of the authors' layout -> keys of a MONAI datalist
DATALIST_SPLITS = {"train": "training", "validation": "validation", "test": "test"}


def _same_folder(path: str | os.PathLike, other: str | os.PathLike) -> bool:
    return Path(path).expanduser().resolve() == Path(other).expanduser().resolve()


def prepare_dataset_dir(dataset_dir: str | os.PathLike) -> str:
    """Make sure ``dataset_dir`` can be read: the embedded demo set and the extended corpus
    (:func:`~medir_monai.data.demo.extended_demo_dir`) are built on first use; anything else must exist."""
    if _same_folder(dataset_dir, default_demo_dir()):
        return str(ensure_demo_dataset(dataset_dir))
    if _same_folder(dataset_dir, extended_demo_dir()):
        return str(ensure_demo_dataset(dataset_dir, verbose=True, extended=True))
    path = Path(dataset_dir).expanduser()
    if not path.exists():
        raise DataError(
            f"{path}: dataset_dir does not exist (give a folder in the layout <root>/<MRI|CT|PET>/<split>/<LQ|HQ>/ "
            f"or a JSON datalist; the demo set lives in {default_demo_dir()})"
        )
    return str(path)


def _even_subset(items: list[dict], limit: int | None) -> list[dict]:
    """At most ``limit`` items per task, spread evenly over each task's (sorted) list."""
    if limit is None:
        return items
    out: list[dict] = []
    for task in dict.fromkeys(it["task"] for it in items):
        own = [it for it in items if it["task"] == task]
        if len(own) > limit:
            picks = np.linspace(0, len(own) - 1, limit).round().astype(int)
            own = [own[i] for i in picks]
        out += own
    return out


@contextmanager
def _naming(option: str):
    """Re-raise a transform's ``ValueError`` with the ``robust`` option of the bundle config that set it."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"robust option {option}: {err}") from None


def robust_augmentations(
    ct_dose_range: Sequence[float] | None = None,
    ct_noise_model: str = "insert",
    pet_dose_range: Sequence[float] | None = None,
    pet_noise_model: str = "thinning",
    mri_scale_range: Sequence[float] | None = None,
    pet_scale_range: Sequence[float] | None = None,
    zoom_range: Sequence[float] | None = None,
    zoom_prob: float = 0.5,
    zoom_tasks: Sequence[str] = DEFAULT_ZOOM_TASKS,
) -> list:
    """The robust-training augmentations of the bundle configs' ``robust`` block (``None`` leaves one out).

    Each is a registered MONAI transform of :mod:`medir_monai.transforms.augment`, gated to its task by
    :class:`~medir_monai.transforms.RandForTasksd`; the nominal doses come from the task registry (the dose the
    stored or simulated LQ was made at).

    Args:
        ct_dose_range: CT dose fractions to re-dose pairs to (:class:`~medir_monai.transforms.RandDoseScaled`).
        ct_noise_model: ``"insert"`` for LQ simulated by noise insertion (the demo set), ``"thinning"`` for real
            paired scans (AAPM-Mayo quarter dose).
        pet_dose_range: PET count fractions (``"thinning"``: the simulated and the list-mode pairs alike).
        pet_noise_model: as ``ct_noise_model``, for PET.
        mri_scale_range: MRI intensity factors (:class:`~medir_monai.transforms.RandIntensityScaled`, clipped to
            the model range).
        pet_scale_range: PET SUV factors (:class:`~medir_monai.transforms.RandIntensityScaled`, clipped to the model
            range): the SUV normalisation (injected dose per body weight, calibration) scales a patient's image
            without changing its counts, so a scaled pair is another patient's valid pair.
        zoom_range: pixel-size factors (:class:`~medir_monai.transforms.RandPixelSized`).
        zoom_prob: probability of resampling a sample.
        zoom_tasks: the tasks resampled. CT and PET pairs are resampled together (noise and resolution do change
            with another scanner's pixel size). A task whose degradation is defined on the acquired grid (MRI: k-space
            truncated to a quarter of *its* bandwidth; a resampled pair would be a 2x or 6x problem) has its HQ
            resampled and its LQ simulated again with the registry's degradation
            (:class:`~medir_monai.transforms.RandPixelSizedResimulated`); not in the default list
            (:data:`~medir_monai.tasks.DEFAULT_ZOOM_TASKS`).
    """
    steps: list = []
    for task, option, dose_range, noise_model in (
        ("ct_denoise", "ct_dose_range", ct_dose_range, ct_noise_model),
        ("pet_synthesis", "pet_dose_range", pet_dose_range, pet_noise_model),
    ):
        if dose_range is not None:
            nominal = get_task(task).degradation_args["dose_fraction"]
            with _naming(option):
                redose = RandDoseScaled(("lq", "hq"), dose_range=dose_range, nominal_dose=nominal, noise_model=noise_model)
            steps.append(RandForTasksd(redose, tasks=[task]))
    for task, option, scale_range in (("mri_sr", "mri_scale_range", mri_scale_range),
                                      ("pet_synthesis", "pet_scale_range", pet_scale_range)):
        if scale_range is not None:
            with _naming(option):
                scale = RandIntensityScaled(("lq", "hq"), scale_range=scale_range, clip=(0.0, 1.0))
            steps.append(RandForTasksd(scale, tasks=[task]))
    if zoom_range is not None:
        with _naming("zoom_range / zoom_prob / zoom_tasks"):
            tasks = [get_task(t) for t in zoom_tasks]
            pair_tasks = [t.name for t in tasks if not t.degradation_on_grid]
            if pair_tasks:
                pairs = RandPixelSized(("lq", "hq"), zoom_range=zoom_range, prob=zoom_prob)
                steps.append(RandForTasksd(pairs, tasks=pair_tasks))
            for task in (t.name for t in tasks if t.degradation_on_grid):
                resimulated = RandPixelSizedResimulated(degradation_for(task), zoom_range=zoom_range, prob=zoom_prob)
                steps.append(RandForTasksd(resimulated, tasks=[task]))
    return steps


def build_dataset(
    root: str | os.PathLike,
    split: str = "train",
    tasks: Sequence[str] | None = None,
    patch_size: int | Sequence[int] | None = PAPER_PATCH_SIZE,
    cache: str = "memory",
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    max_per_task: int | None = None,
    num_workers: int = 0,
    augmentations: Sequence | None = None,
    intensity_reference: dict | None = None,
):
    """The dataset of one split for a bundle.

    Args:
        root: authors'-layout folder or JSON datalist.
        split: ``train``, ``validation`` or ``test``.
        tasks: registry task names to use (default: all found).
        patch_size: training crop (128 in the papers); ``None`` gives whole slices (validation / test).
        cache: ``memory``, ``disk`` (in ``cache_dir``) or ``none``.
        cache_dir: disk cache folder.
        seed: seed of simulated LQ for HQ-only datalist items.
        max_per_task: keep at most this many slices per task, evenly spread (quick validation).
        num_workers: threads filling the cache.
        augmentations: random training transforms after the cache, before the crop (the robust-training options of
            the bundle configs); ignored for whole-slice splits.
        intensity_reference: per-task per-scan normalisation (:func:`~medir_monai.data.restoration_dataset`).
    """
    root = Path(root).expanduser()
    if root.is_file() and root.suffix.lower() == ".json":
        items = load_datalist(root, DATALIST_SPLITS.get(split, split))
        if tasks is not None:
            items = [it for it in items if it["task"] in set(tasks)]
    else:
        items = scan_authors_layout(root, split, tasks)
    if not items:
        raise DataError(f"{root}: no {split!r} items for tasks {list(tasks) if tasks else 'any'}")
    items = _even_subset(items, max_per_task)
    if cache == "disk" and cache_dir is None:
        raise ValueError("cache='disk' needs cache_dir")
    return restoration_dataset(
        items,
        train=patch_size is not None,
        patch_size=PAPER_PATCH_SIZE if patch_size is None else patch_size,
        cache=cache,
        cache_dir=cache_dir,
        seed=seed,
        num_workers=num_workers,
        augmentations=augmentations,
        intensity_reference=intensity_reference,
    )


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files (NIfTI, ITK formats, DICOM files) directly inside ``folder``, sorted; an empty folder is an error."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: input folder does not exist")
    files = sorted(str(p) for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise DataError(f"{folder}: no image files found")
    return files


class CheckFinited(MapTransform):
    """Refuse images holding NaN or Inf, naming the file (``<key>_meta_dict["filename_or_obj"]`` or the MetaTensor's)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            if not torch.isfinite(img).all():
                meta = getattr(d[key], "meta", None) or d.get(f"{key}_meta_dict", {})
                name = meta.get("filename_or_obj", key) if isinstance(meta, dict) else key
                bad = int((~torch.isfinite(img)).sum())
                raise DataError(f"{name}: {bad} NaN/Inf values in {key!r}")
        return d


def training_profile(dataset: Any, robust: Mapping[str, Any] | None = None,
                     intensity_reference: Mapping[str, Any] | None = None) -> dict | None:
    """The training profile of a bundle's training dataset (:func:`medir_monai.data.profile.profile_items` of its
    items), stored with ``model.pt`` so ``medir restore`` can say when an input lies outside it. ``None`` (no
    guard, with a warning in the log) when the items cannot be profiled."""
    from .profile import profile_items

    items = getattr(dataset, "data", None)
    if not items:
        return None
    try:
        return profile_items(items, robust=robust, intensity_reference=intensity_reference)
    except Exception as err:  # the guard is an extra: never stop a training for it
        logging.getLogger(__name__).warning(f"no training profile (inputs will not be checked): {err}")
        return None
