"""What a model's training data looked like, per task, and whether an input scan lies inside it.

A *training profile* holds, for each task, the range over the training LQ slices of: the in-plane pixel size
(mm), the grid (the longer image side, pixels), the robust intensity maximum (99th percentile over the object, in
the task's unit) and, for the denoising tasks, the noise level (:func:`~medir_monai.transforms.estimate_noise_std`
inside the object). The ranges are widened by the robust-training augmentations the model saw (a random pixel size
scales pixel size, grid and noise; a random dose scales the noise; an MRI intensity scale scales the intensities),
since those are part of what it learnt from. Tasks normalised per scan (``intensity_reference``) skip the
intensity check: every input is brought to the training reference before the network sees it.

The bundles compute it when training starts (:class:`~medir_monai.handlers.BestModelSaver` stores it with
``model.pt``); ``medir restore`` compares every input with it (:func:`check_scan`) and prints one warning naming
the numbers, or refuses the input with ``--strict``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..tasks import DEFAULT_ZOOM_TASKS, get_task
from ..transforms import estimate_noise_std
from .dataset import _cached_volume, _slice_spacing, _take_slice
from .layout import WHOLE_FILE

__all__ = ["PROFILE_VERSION", "check_scan", "profile_items", "slice_statistics"]

PROFILE_VERSION = 1
MAX_SLICES_PER_TASK = 200
"""Training slices read per task for the profile (evenly spread over the task's items)."""
RANGE_MARGIN = 0.10
"""Relative tolerance on every range before an input counts as outside it."""
OBJECT_THRESHOLD = {"ct_denoise": -500.0}
"""Lower bound of the object in the task's unit (CT: soft tissue and bone, not air or lung); other tasks use
their ``air_threshold``, MRI a tenth of the slice's 99th percentile."""
NOISE_TASKS = ("ct_denoise", "pet_synthesis")
"""Tasks whose degradation is noise, so an input's noise level says whether the model knows it."""


def _object_threshold(image: torch.Tensor, task) -> float:
    if task.name in OBJECT_THRESHOLD:
        return OBJECT_THRESHOLD[task.name]
    if task.air_threshold is not None:
        return float(task.air_threshold)
    return 0.1 * float(torch.quantile(image.flatten().float(), 0.99))


def slice_statistics(image: torch.Tensor | np.ndarray, task: str, pixel_size_mm: float | None = None) -> dict[str, float]:
    """The profile quantities of one ``(H, W)`` slice in physical units (``pixel_size_mm`` if known)."""
    task = get_task(task)
    x = torch.as_tensor(np.asarray(image, dtype=np.float32) if isinstance(image, np.ndarray) else image).float()
    if x.ndim != 2:
        raise ValueError(f"slice_statistics needs one (H, W) slice, got shape {tuple(x.shape)}")
    threshold = _object_threshold(x, task)
    inside = x[x > threshold]
    stats = {
        "grid": float(max(x.shape)),
        "intensity_p99": float(torch.quantile(inside if inside.numel() else x.flatten(), 0.99)),
    }
    if pixel_size_mm is not None and pixel_size_mm > 0:
        stats["pixel_size_mm"] = float(pixel_size_mm)
    if task.name in NOISE_TASKS and min(x.shape) >= 2:
        stats["noise_std"] = estimate_noise_std(x, threshold)
    return stats


def _spread(items: Sequence[dict], count: int) -> list[dict]:
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def _item_slice(item: Mapping) -> tuple[torch.Tensor, float | None]:
    """The item's LQ (else HQ) slice as the training datasets read it (RAS volume, slice along the task's
    ``slice_axis``) and its mean in-plane spacing; an item not yet cut into slices gives its middle slice."""
    key = "lq" if item.get("lq") is not None else "hq"
    axis = get_task(item["task"]).slice_axis
    volume, spacing = _cached_volume(str(item[key]), "RAS")
    index = int(item.get("slice", WHOLE_FILE))
    if index == WHOLE_FILE and volume.ndim == 3:
        index = volume.shape[axis] // 2
    data = _take_slice(volume, index, axis)
    in_plane = _slice_spacing(spacing, volume, index, axis)
    return data.float(), (float(np.mean(in_plane)) if in_plane else None)


def _widen(low: float, high: float, factors: tuple[float, float]) -> list[float]:
    return [low * min(factors), high * max(factors)]


def profile_items(
    items: Sequence[Mapping],
    robust: Mapping[str, Any] | None = None,
    intensity_reference: Mapping[str, Any] | None = None,
    max_slices: int = MAX_SLICES_PER_TASK,
) -> dict[str, Any]:
    """The training profile of datalist ``items`` (``{"task", "hq", "lq", "slice"}``, physical-unit files).

    Args:
        items: training items (at most ``max_slices`` per task are read, evenly spread).
        robust: the bundle's ``robust`` options (:func:`~medir_monai.data.robust_augmentations`), to widen the ranges.
        intensity_reference: the bundle's per-scan normalisation; its tasks skip the intensity range.

    Returns:
        ``{"version", "tasks": {task: {"slices", "pixel_size_mm": [lo, hi], "grid": [lo, hi], "intensity_p99":
        [lo, hi] | None, "noise_std": [lo, hi]}}}`` (JSON-able; quantities that no slice had are left out).
    """
    robust = dict(robust or {})
    normalised = set(intensity_reference or {})
    zoom = tuple(robust.get("zoom_range") or (1.0, 1.0))
    zoom_tasks = set(robust.get("zoom_tasks", DEFAULT_ZOOM_TASKS)) if robust.get("zoom_range") else set()
    by_task: dict[str, list[Mapping]] = {}
    for item in items:
        by_task.setdefault(get_task(item["task"]).name, []).append(item)
    tasks: dict[str, Any] = {}
    for name, task_items in by_task.items():
        task = get_task(name)
        rows = []
        for item in _spread(task_items, max_slices):
            image, spacing = _item_slice(item)
            rows.append(slice_statistics(image, name, spacing))
        entry: dict[str, Any] = {"slices": len(rows)}
        for key in ("pixel_size_mm", "grid", "intensity_p99", "noise_std"):
            values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
            if values:
                entry[key] = [float(min(values)), float(max(values))]
        if name in zoom_tasks:  # output size / input size z: pixel size / z, grid * z, noise averaged down to ~ z
            if "pixel_size_mm" in entry:
                entry["pixel_size_mm"] = _widen(*entry["pixel_size_mm"], (1.0 / zoom[1], 1.0 / zoom[0]))
            entry["grid"] = _widen(*entry["grid"], zoom)
            if "noise_std" in entry:
                entry["noise_std"] = _widen(*entry["noise_std"], (min(zoom[0], 1.0), 1.0))
        dose_range = robust.get({"ct_denoise": "ct_dose_range", "pet_synthesis": "pet_dose_range"}.get(name, ""))
        nominal = task.degradation_args.get("dose_fraction")
        if dose_range and nominal and "noise_std" in entry:  # re-dosed pairs: noise * sqrt(d0 / d)
            entry["noise_std"] = _widen(*entry["noise_std"], (math.sqrt(nominal / max(dose_range)),
                                                               math.sqrt(nominal / min(dose_range))))
        if name in normalised:
            entry["intensity_p99"] = None  # every scan is scaled to the reference first
        elif name == "mri_sr" and robust.get("mri_scale_range") and "intensity_p99" in entry:
            entry["intensity_p99"] = _widen(*entry["intensity_p99"], tuple(robust["mri_scale_range"]))
        if name == "pet_synthesis" and robust.get("pet_scale_range"):  # SUV scaled: percentiles and noise alike
            for key in ("intensity_p99", "noise_std"):
                if entry.get(key):
                    entry[key] = _widen(*entry[key], tuple(robust["pet_scale_range"]))
        tasks[name] = entry
    return {"version": PROFILE_VERSION, "tasks": tasks}


_LABELS = {
    "pixel_size_mm": ("pixel size", "mm", "{:.2f}"),
    "grid": ("image size", "pixels", "{:.0f}"),
    "intensity_p99": ("intensity (99th percentile)", None, "{:.4g}"),
    "noise_std": ("noise level", None, "{:.3g}"),
}


def check_scan(
    profile: Mapping[str, Any] | None,
    image: torch.Tensor | np.ndarray,
    task: str,
    pixel_size_mm: float | None = None,
    axis: int = -1,
    max_slices: int = 8,
) -> list[str]:
    """Reasons why a scan lies outside the training profile (empty when it lies inside, or nothing is known).

    Args:
        profile: :func:`profile_items` output (``None``: no guard, nothing to say).
        image: ``(H, W)`` or ``(H, W, D)`` in physical units (slices along ``axis``).
        task: the task the scan is restored with.
        pixel_size_mm: in-plane pixel size of the scan, if known.
        max_slices: slices of a volume measured (evenly spread; the median of each quantity is compared).

    Returns:
        one phrase per quantity out of range, e.g. ``"pixel size 0.96 mm outside the training range 0.62-0.78 mm"``.
    """
    task = get_task(task)
    entry = ((profile or {}).get("tasks") or {}).get(task.name)
    if not entry:
        return [] if profile is None else [f"the model was not trained on {task.name}"]
    x = torch.as_tensor(np.asarray(image, dtype=np.float32) if isinstance(image, np.ndarray) else image).float()
    planes = [x] if x.ndim == 2 else list(torch.movedim(x, axis, 0))
    keep = np.linspace(0, len(planes) - 1, min(max_slices, len(planes))).round().astype(int)
    rows = [slice_statistics(planes[i], task.name, pixel_size_mm) for i in sorted(set(keep.tolist()))]
    reasons = []
    unit = task.unit
    for key, (label, fixed_unit, fmt) in _LABELS.items():
        bounds = entry.get(key)
        values = [r[key] for r in rows if key in r]
        if not bounds or not values:
            continue
        value = float(np.median(values))
        low, high = bounds
        if value < low - RANGE_MARGIN * abs(low) or value > high + RANGE_MARGIN * abs(high):
            shown = fixed_unit or unit
            reasons.append(f"{label} {fmt.format(value)} {shown} outside the training range "
                           f"{fmt.format(low)}-{fmt.format(high)} {shown}")
    return reasons
