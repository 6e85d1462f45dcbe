"""MONAI datasets of 2-D LQ/HQ slices for all-in-one restoration (docs/design.md, section 3).

Pipeline per slice item (from :mod:`medir_monai.data.layout`)::

    load (physical units; volumes re-oriented and sliced)      LoadSlicePaird
    -> simulate LQ from HQ if the item has none                 SimulateLowQualityd  (task's degradation)
    -> per-task normalisation: clip to norm_range, [0, 1]       NormaliseByTaskd     (ScaleIntensityRanged)
    -> cached: CacheDataset (memory) or PersistentDataset (disk), so the physics runs once
    -> training only: pad to the patch size if smaller, then one random 128x128 window, the same for LQ and
       HQ (RandSpatialCropd over both keys); no other augmentation (as in the papers)

Samples: ``{"lq": (1,H,W) float32 in [0,1], "hq": (1,H,W) float32 in [0,1], "task": int (registry index),
"task_name": str, "file": str (HQ path), "slice": int (-1 for 2-D files)}``. Validation / test samples are
whole slices; their sizes differ between tasks, so evaluate with ``batch_size=1``.

Simulation runs in physical units (HU, SUV, raw MRI intensity), before normalisation, because the physics
(attenuation, counts) needs them. It is seeded per slice from ``(seed, task, file name, slice)``, so a cached and an
uncached run, two workers or two machines produce the same LQ.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset, get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Randomizable,
    RandSpatialCropd,
    ScaleIntensityRanged,
    SpatialPadd,
    Transform,
)

import medir_monai.transforms
from medir_monai.transforms import ForTasksd, ScaleToReferenced

from ..tasks import PAPER_PATCH_SIZE, get_task
from .io import DataError
from .layout import WHOLE_FILE, check_same_shape, expand_to_slices, load_volume

__all__ = [
    "CACHE_MODES",
    "RestorationDataset",
    "RestorationCacheDataset",
    "RestorationPersistentDataset",
    "plain_data_errors",
    "LoadSlicePaird",
    "SimulateLowQualityd",
    "NormaliseByTaskd",
    "restoration_transforms",
    "restoration_dataset",
    "get_task_labels",
    "degradation_for",
]

CACHE_MODES = ("memory", "disk", "none")


def _cached_volume(path: str, axcodes: str | None) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """A volume as a plain tensor and its in-plane spacing in mm (``None`` when the file has none, e.g.
    ``.bin``); recently used ones are kept (consecutive slice items share a file), keyed by modification
    time so a rewritten file is read again."""
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        stamp = 0  # load_volume raises the clear error
    return _recent_volume(path, stamp, axcodes)


@functools.lru_cache(maxsize=4)
def _recent_volume(path: str, stamp: int, axcodes: str | None) -> tuple[torch.Tensor, tuple[float, ...] | None]:
    volume = load_volume(path, axcodes)
    spacing = None
    if isinstance(volume, MetaTensor) and not str(path).lower().endswith(".bin"):
        spacing = tuple(float(v) for v in volume.pixdim[: volume.ndim])
    return volume.as_tensor() if isinstance(volume, MetaTensor) else volume, spacing


def _take_slice(volume: torch.Tensor, index: int, axis: int = 2) -> torch.Tensor:
    """(H, W) slice ``index`` along ``axis`` of a 3-D volume (the task's ``slice_axis``); a 2-D image as is."""
    if index == WHOLE_FILE or volume.ndim == 2:
        return volume
    return volume.select(axis, index)


def _slice_spacing(spacing: tuple[float, ...] | None, volume: torch.Tensor, index: int, axis: int = 2):
    """In-plane spacing (mm) of what :func:`_take_slice` returns: the volume's spacing without the sliced axis."""
    if spacing is None or index == WHOLE_FILE or volume.ndim == 2:
        return None if spacing is None else tuple(spacing[:2])
    return tuple(s for i, s in enumerate(spacing[:3]) if i != axis % 3)


class LoadSlicePaird(Transform):
    """Load the ``hq`` (and ``lq`` when given) 2-D slice of an item as ``(1, H, W)`` float32, physical units.

    Args:
        axcodes: orientation volumes are brought to before slicing along the task's ``slice_axis`` (``None``: file
            order).

    Raises:
        DataError: unreadable files; LQ/HQ shape mismatch (naming both files).
    """

    def __init__(self, axcodes: str | None = "RAS") -> None:
        self.axcodes = axcodes

    def __call__(self, item: Mapping) -> dict:
        d = dict(item)
        index = int(d.get("slice", WHOLE_FILE))
        axis = get_task(d["task"]).slice_axis
        hq_vol, spacing = _cached_volume(str(d["hq"]), self.axcodes)
        d["spacing"] = _slice_spacing(spacing, hq_vol, index, axis)
        d["hq"] = _take_slice(hq_vol, index, axis)[None].float().contiguous()
        d["file"] = str(item["hq"])
        d["slice"] = index
        if d.get("lq") is not None:
            lq_vol, _ = _cached_volume(str(d["lq"]), self.axcodes)
            check_same_shape(lq_vol, hq_vol, item["lq"], item["hq"])
            d["lq"] = _take_slice(lq_vol, index, axis)[None].float().contiguous()
        else:
            d["lq"] = None
        if d["hq"].ndim != 3:
            raise DataError(f"{item['hq']}: slice {index} is not 2-D (shape {tuple(d['hq'].shape[1:])})")
        return d


def degradation_for(task: str, **overrides) -> Transform:
    """The task's default degradation transform (``Task.degradation`` in ``medir_monai.transforms``)."""
    task = get_task(task)
    cls = getattr(medir_monai.transforms, task.degradation, None) if task.degradation else None
    if cls is None:
        raise DataError(
            f"task {task.name!r}: degradation transform {task.degradation!r} not found in medir_monai.transforms; "
            "items of this task need an 'lq' file"
        )
    return cls(**{**task.degradation_args, **overrides})


def _slice_seed(seed: int, task: str, file: str, index: int) -> int:
    """Stable 32-bit seed of one slice: independent of item order, worker, process and of the folder the
    data lives in (only the file name counts)."""
    digest = hashlib.sha256(f"{seed}|{task}|{os.path.basename(file)}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@functools.lru_cache(maxsize=2)
def _simulated_volume(path: str, stamp: int, axcodes: str | None, task: str, seed: int, overrides: str) -> torch.Tensor:
    """The task's LQ of a whole volume, simulated in its axial planes (where CT and PET are reconstructed and the
    papers truncate MRI k-space); kept for the next slices of the same volume."""
    volume, spacing = _recent_volume(path, stamp, axcodes)
    degrade = degradation_for(task, **json.loads(overrides))
    if hasattr(degrade, "set_random_state"):
        degrade.set_random_state(seed=_slice_seed(seed, task, path, WHOLE_FILE))
    hq = volume[None].float()
    if spacing is not None:
        hq = MetaTensor(hq, affine=torch.diag(torch.tensor([*spacing[:3], 1.0], dtype=torch.float64)))
    try:
        lq = degrade(hq)
    except ValueError as err:
        raise DataError(f"{path}: cannot simulate LQ for {task!r}: {err}") from err
    return (lq.as_tensor() if isinstance(lq, MetaTensor) else torch.as_tensor(np.asarray(lq)))[0].float()


class SimulateLowQualityd(Transform):
    """Make ``lq`` from ``hq`` (physical units) with the task's degradation when the item has no LQ.

    Deterministic by design (seeded per slice, or per volume), so MONAI caches its output. The degradations are
    defined on axial planes; a slice cut along another axis (PET's coronal ``slice_axis``) is taken from the whole
    volume's LQ, simulated plane by plane in the axial direction.

    Args:
        seed: base seed of the simulation.
        degradation_overrides: per task name, keyword arguments overriding ``Task.degradation_args``.
        axcodes: orientation of the volumes the slices were cut from (as :class:`LoadSlicePaird`'s).
    """

    def __init__(self, seed: int = 0, degradation_overrides: Mapping[str, dict] | None = None,
                 axcodes: str | None = "RAS") -> None:
        self.seed = seed
        self.overrides = dict(degradation_overrides or {})
        self.axcodes = axcodes

    def _from_volume(self, d: Mapping) -> torch.Tensor | None:
        """LQ slice of a non-axial cut of a 3-D volume, else ``None``."""
        axis = get_task(d["task"]).slice_axis
        if axis == 2 or int(d.get("slice", WHOLE_FILE)) == WHOLE_FILE:
            return None
        path = str(d["file"])
        try:
            stamp = os.stat(path).st_mtime_ns
        except OSError:
            return None
        volume = _simulated_volume(path, stamp, self.axcodes, d["task"], self.seed,
                                   json.dumps(self.overrides.get(d["task"], {}), sort_keys=True))
        return _take_slice(volume, int(d["slice"]), axis)[None]

    def __call__(self, item: Mapping) -> dict:
        d = dict(item)
        if d.get("lq") is not None:
            return d
        from_volume = self._from_volume(d)
        if from_volume is not None:
            d["lq"] = from_volume.contiguous()
            return d
        # a fresh (cheap) transform per slice: CacheDataset fills its cache from several threads, and a shared
        # randomizable transform would mix up their seeds
        degrade = degradation_for(d["task"], **self.overrides.get(d["task"], {}))
        if hasattr(degrade, "set_random_state"):
            degrade.set_random_state(seed=_slice_seed(self.seed, d["task"], d["file"], d["slice"]))
        hq = d["hq"]
        if d.get("spacing") is not None:  # the physics reads the pixel size from the affine
            hq = MetaTensor(hq, affine=torch.diag(torch.tensor([*d["spacing"], 1.0, 1.0], dtype=torch.float64)))
        try:
            lq = degrade(hq)
        except ValueError as err:
            raise DataError(f"{d['file']} (slice {d['slice']}): cannot simulate LQ for {d['task']!r}: {err}") from err
        lq = lq.as_tensor() if isinstance(lq, MetaTensor) else torch.as_tensor(np.asarray(lq))
        d["lq"] = lq.float().contiguous()
        return d


class NormaliseByTaskd(MapTransform):
    """Clip each item to its task's ``norm_range`` and map it to ``[0, 1]`` (a ScaleIntensityRanged per task).

    Also sets ``task`` to the registry index and ``task_name`` to the name.
    """

    def __init__(self, keys: Sequence[Hashable] = ("lq", "hq")) -> None:
        super().__init__(keys)
        self._scalers: dict[str, ScaleIntensityRanged] = {}

    def _scaler(self, name: str) -> ScaleIntensityRanged:
        if name not in self._scalers:
            low, high = get_task(name).norm_range
            self._scalers[name] = ScaleIntensityRanged(
                self.keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32
            )
        return self._scalers[name]

    def __call__(self, item: Mapping) -> dict:
        task = get_task(item["task"])
        d = self._scaler(task.name)(dict(item))
        for key in self.key_iterator(d):
            d[key] = d[key].as_tensor() if hasattr(d[key], "as_tensor") else torch.as_tensor(d[key])
        d["task_name"] = task.name
        d["task"] = task.index
        return d


def _keep_sample_keys(item: Mapping) -> dict:
    return {k: item[k] for k in ("lq", "hq", "task", "task_name", "file", "slice")}


def intensity_reference_transforms(intensity_reference: Mapping[str, Mapping] | None) -> list:
    """Per-scan normalisation steps (physical units, before the task's range): for each task name, a
    :class:`~medir_monai.transforms.ScaleToReferenced` with the given arguments (``percentile``, ``reference``,
    ...), applied to that task's items only. The same mapping given to the restore path
    (:func:`medir_monai.restore.restore_array`) keeps training and inference alike."""
    steps = []
    for task, kwargs in (intensity_reference or {}).items():
        name = get_task(task).name  # unknown task names fail here, with the known ones listed
        scaler = ScaleToReferenced(("lq", "hq"), ref_key="lq", factor_key=None, **dict(kwargs))
        steps.append(ForTasksd(scaler, tasks=[name], task_key="task"))
    return steps


class WithoutMetaTracking(Transform):
    """Run ``transform`` (a training step after the cache) with MONAI's metadata tracking switched off.

    The random crops and augmentations need no metadata, and with tracking on every MONAI transform wraps its
    output in a new ``MetaTensor`` and copies the metadata: most of the loader's time per batch (benchmarks/README.md,
    the main job on slower CPUs). Outputs are plain tensors with the values the step gives with tracking on.
    Wrap steps with :func:`without_meta_tracking`, which keeps random steps random.
    """

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return self.transform(data)
        finally:
            set_track_meta(tracking)


class RandWithoutMetaTracking(Randomizable, WithoutMetaTracking):
    """:class:`WithoutMetaTracking` of a random step: ``set_random_state`` seeds the wrapped step, so a ``Compose``
    hands it the seed it would hand the step itself (the same draws as without the wrapper)."""

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        self.transform.set_random_state(seed=seed, state=state)
        return self

    def randomize(self, data: Any = None) -> None:  # the wrapped step draws its own numbers
        pass


def without_meta_tracking(step: Callable) -> WithoutMetaTracking:
    """``step`` wrapped to run without metadata tracking; random steps stay random (and seeded as before)."""
    return RandWithoutMetaTracking(step) if isinstance(step, Randomizable) else WithoutMetaTracking(step)


def _unwrap_all(transforms: Sequence[Callable]) -> list:
    """The transforms with task gates (:class:`~medir_monai.transforms.ForTasksd`) replaced by what they wrap."""
    return [t.transform if isinstance(t, ForTasksd) else t for t in transforms]


def restoration_transforms(
    train: bool = True,
    patch_size: int | Sequence[int] = PAPER_PATCH_SIZE,
    seed: int = 0,
    axcodes: str | None = "RAS",
    augmentations: Sequence[Callable] | None = None,
    intensity_reference: Mapping[str, Mapping] | None = None,
) -> Compose:
    """The deterministic (cacheable) steps followed, for training, by the random ``augmentations`` (e.g. the
    robust-training transforms of :mod:`medir_monai.transforms.augment`, on model-space ``[0, 1]`` pairs) and the
    shared random crop. ``intensity_reference``: per-task per-scan normalisation (see
    :func:`intensity_reference_transforms`), applied in training and evaluation alike."""
    steps: list = [LoadSlicePaird(axcodes), SimulateLowQualityd(seed, axcodes=axcodes)]
    steps += intensity_reference_transforms(intensity_reference)
    steps += [NormaliseByTaskd(), _keep_sample_keys]
    if train:
        size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        random_steps: list = []
        if augmentations:
            # the augmentations see a random window just large enough that a zoom down to its smallest factor still
            # fills the patch, not the whole slice (a 512 x 512 CT slice costs ~20x a 128 x 128 window)
            smallest_zoom = min([min(a.zoom_range) for a in _unwrap_all(augmentations) if hasattr(a, "zoom_range")] or [1.0])
            window = tuple(math.ceil(s / min(1.0, smallest_zoom)) + 2 for s in size)
            random_steps += [RandSpatialCropd(("lq", "hq"), roi_size=window, random_size=False), *augmentations]
        random_steps += [
            SpatialPadd(("lq", "hq"), spatial_size=size, mode="constant", value=0.0),
            RandSpatialCropd(("lq", "hq"), roi_size=size, random_size=False),
        ]
        steps += [without_meta_tracking(step) for step in random_steps]
        steps.append(EnsureTyped(("lq", "hq"), data_type="tensor", track_meta=False))
    return Compose(steps)


@contextmanager
def plain_data_errors() -> Iterator[None]:
    """Re-raise a :class:`DataError` hidden under MONAI's ``RuntimeError("applying transform ...")`` wrappers.

    MONAI wraps every transform failure (twice: Compose, then the dataset); the user should see which file is
    bad and why, not the name of a transform object.
    """
    try:
        yield
    except RuntimeError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


class RestorationDataset(Dataset):
    """:class:`monai.data.Dataset` whose bad-input errors surface as :class:`DataError`."""

    def __getitem__(self, index):
        with plain_data_errors():
            return super().__getitem__(index)


class RestorationCacheDataset(CacheDataset):
    """:class:`monai.data.CacheDataset` (in-memory cache) whose bad-input errors surface as :class:`DataError`."""

    def __init__(self, *args, **kwargs) -> None:
        with plain_data_errors():
            super().__init__(*args, **kwargs)

    def __getitem__(self, index):
        with plain_data_errors():
            return super().__getitem__(index)


class RestorationPersistentDataset(PersistentDataset):
    """:class:`monai.data.PersistentDataset` (disk cache) whose bad-input errors surface as :class:`DataError`."""

    def __getitem__(self, index):
        with plain_data_errors():
            return super().__getitem__(index)


def restoration_dataset(
    data: Sequence[dict],
    train: bool = True,
    patch_size: int | Sequence[int] = PAPER_PATCH_SIZE,
    cache: str = "memory",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    seed: int = 0,
    axcodes: str | None = "RAS",
    progress: bool = False,
    augmentations: Sequence[Callable] | None = None,
    intensity_reference: Mapping[str, Mapping] | None = None,
) -> Dataset:
    """A MONAI dataset of 2-D LQ/HQ samples from layout / datalist items.

    Args:
        data: items from :func:`~medir_monai.data.scan_authors_layout` or :func:`~medir_monai.data.load_datalist`;
            volumes are cut into slices here (:func:`~medir_monai.data.expand_to_slices`).
        train: add the shared random crop of ``patch_size`` (128 in the papers); otherwise whole slices.
        patch_size: training window.
        cache: ``"memory"`` (CacheDataset), ``"disk"`` (PersistentDataset in ``cache_dir``) or ``"none"``.
        cache_dir: folder of the disk cache (required for ``"disk"``).
        num_workers: threads filling the memory cache (0 or 1: the calling thread's pace, one at a time).
        seed: seed of the LQ simulation for HQ-only items (the crop uses MONAI's / the loader's RNG;
            call ``dataset.transform.set_random_state(seed)`` to fix it).
        axcodes: orientation volumes are brought to before slicing.
        progress: show the cache-filling progress bar.
        augmentations: random dictionary transforms applied to training pairs after the cache, before the crop
            (model-space ``[0, 1]`` images; items carry ``task_name`` for :class:`~medir_monai.transforms.ForTasksd`).
        intensity_reference: per task name, :class:`~medir_monai.transforms.ScaleToReferenced` arguments
            (per-scan normalisation; see :func:`intensity_reference_transforms`).

    Returns:
        the dataset; ``dataset.data`` is the list of slice items (see :func:`get_task_labels`).
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    items = expand_to_slices(data, axcodes)
    if not items:
        raise DataError("no slices to load: the item list is empty")
    transform = restoration_transforms(train, patch_size, seed, axcodes, augmentations, intensity_reference)
    if cache == "memory":
        return RestorationCacheDataset(items, transform, num_workers=max(1, num_workers), progress=progress)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs cache_dir")
        # the seed and the per-scan normalisation are part of each item so that other settings do not reuse stale
        # cache files (PersistentDataset keys its files on the item)
        reference = json.dumps(intensity_reference or {}, sort_keys=True)
        items = [dict(it, sim_seed=seed, intensity_reference=reference) for it in items]
        return RestorationPersistentDataset(items, transform, cache_dir=cache_dir)
    return RestorationDataset(items, transform)


def get_task_labels(dataset_or_items) -> list[int]:
    """Registry index of the task of every sample (``dataset.data`` or a list of items), for the sampler."""
    items = getattr(dataset_or_items, "data", dataset_or_items)
    return [get_task(it["task"]).index for it in items]
