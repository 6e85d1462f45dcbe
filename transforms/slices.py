"""Slices from volumes (docs/design.md, sections 2-3).

The papers train and evaluate on 2-D slices: the central 100 slices of each IXI T2 volume (MRI), and
every slice that is not only air for PET and CT. :func:`extract_slices` / :class:`ExtractSlicesd` cut
them (the dictionary version returns one dictionary per slice, as MONAI's patch transforms do). A task's
physical range maps to the model's ``[0, 1]`` with MONAI's ``ScaleIntensityRanged`` in the data pipeline and
back with the task registry's ``Task.denormalise``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import TransformBackends, convert_to_tensor

__all__ = ["ExtractSlicesd", "extract_slices", "select_slices"]


def _check_volume(volume: NdarrayOrTensor, name: str) -> NdarrayOrTensor:
    """A channel-first ``(C, X, Y, Z)`` view of a ``(C, X, Y, Z)`` or ``(X, Y, Z)`` finite volume."""
    if not isinstance(volume, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(volume).__name__}")
    if volume.ndim not in (3, 4):
        raise ValueError(f"{name} must be (X, Y, Z) or channel-first (C, X, Y, Z), got shape {tuple(volume.shape)}")
    finite = torch.isfinite(convert_to_tensor(volume, track_meta=False)).all()
    if not finite:
        raise ValueError(f"{name} contains NaN or Inf values")
    return volume[None] if volume.ndim == 3 else volume


def select_slices(
    volume: NdarrayOrTensor,
    axis: int = -1,
    central: int | None = None,
    air_threshold: float | None = None,
    min_foreground_fraction: float = 0.0,
    name: str = "volume",
) -> list[int]:
    """Indices of the slices :func:`extract_slices` keeps (same arguments), in increasing order."""
    volume = _check_volume(volume, name)
    spatial_axis = _spatial_axis(axis, name)
    depth = volume.shape[1 + spatial_axis]
    if central is not None:
        if central < 1:
            raise ValueError(f"central must be >= 1, got {central}")
        start = max(0, (depth - central) // 2)
        candidates = list(range(start, min(depth, start + central)))
    else:
        candidates = list(range(depth))
    if air_threshold is None:
        return candidates
    if not 0.0 <= min_foreground_fraction <= 1.0:
        raise ValueError(f"min_foreground_fraction must be in [0, 1], got {min_foreground_fraction}")
    data = convert_to_tensor(volume, track_meta=False)
    foreground = (data > air_threshold).any(dim=0)  # (X, Y, Z): any channel above air
    fraction = foreground.movedim(spatial_axis, -1).flatten(0, 1).float().mean(dim=0)  # (depth,)
    return [k for k in candidates if fraction[k] > 0 and fraction[k] >= min_foreground_fraction]


def _spatial_axis(axis: int, name: str) -> int:
    if not -3 <= axis <= 2:
        raise ValueError(f"{name}: axis must index one of the 3 spatial axes (-3..2), got {axis}")
    return axis % 3


def _take_slice(volume: NdarrayOrTensor, spatial_axis: int, index: int) -> NdarrayOrTensor:
    """``(C, H, W)`` slice ``index`` of a ``(C, X, Y, Z)`` volume along ``spatial_axis`` (MetaTensor aware).

    A MetaTensor slice keeps the volume's meta data plus ``slice_index``; its affine has the two in-plane
    columns first, the sliced axis last and the origin moved to the slice, so that ``(i, j, 0)`` maps to
    the right world position and the norms of its first two columns are the in-plane spacing.
    """
    plain = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    taken = plain[(slice(None),) * (1 + spatial_axis) + (index,)]
    if isinstance(taken, np.ndarray):
        return np.ascontiguousarray(taken)
    taken = taken.contiguous()
    if not isinstance(volume, MetaTensor):
        return taken
    affine = volume.affine.clone()
    order = [a for a in range(3) if a != spatial_axis] + [spatial_axis]
    new_affine = affine.clone()
    new_affine[:3, :3] = affine[:3, order]
    new_affine[:3, 3] = affine[:3, 3] + affine[:3, spatial_axis] * index
    meta = {key: deepcopy(value) for key, value in volume.meta.items() if key != "affine"}
    meta["slice_index"] = index
    meta["slice_axis"] = spatial_axis
    return MetaTensor(taken, affine=new_affine, meta=meta)


def extract_slices(
    volume: NdarrayOrTensor,
    axis: int = -1,
    central: int | None = None,
    air_threshold: float | None = None,
    min_foreground_fraction: float = 0.0,
    name: str = "volume",
) -> tuple[list[NdarrayOrTensor], list[int]]:
    """Cut a volume into 2-D slices, keeping the central ones and/or dropping air-only ones.

    Args:
        volume: ``(C, X, Y, Z)`` or ``(X, Y, Z)`` (a channel axis is added), numpy or torch.
        axis: spatial axis to slice along (``-1``: the last, axial for RAS volumes).
        central: keep only the ``central`` middle slices (start ``(depth - central) // 2``); None: all.
            MRI uses 100.
        air_threshold: drop slices whose every pixel is ``<= air_threshold`` in all channels (physical
            units, e.g. -900 HU, 0.05 SUV); None: keep all.
        min_foreground_fraction: with ``air_threshold``, also drop slices whose fraction of pixels above it
            is below this.
        name: how errors refer to the input (e.g. a key or file name).

    Returns:
        ``(slices, indices)``: the ``(C, H, W)`` slices (same array type as ``volume``) and their indices
        along ``axis``; the central selection is applied first, then the air test.
    """
    indices = select_slices(volume, axis, central, air_threshold, min_foreground_fraction, name)
    volume = _check_volume(volume, name)
    spatial_axis = _spatial_axis(axis, name)
    return [_take_slice(volume, spatial_axis, k) for k in indices], indices


class ExtractSlicesd(MapTransform):
    """Dictionary version of :func:`extract_slices`: one output dictionary per kept slice.

    All ``keys`` are cut at the same indices, chosen on ``reference_key`` (default: the first key), so
    paired LQ / HQ volumes stay aligned; other entries are copied into every output dictionary. Like
    MONAI's ``RandCropByPosNegLabeld``, the transform returns a list of dictionaries (a
    ``Dataset`` / ``DataLoader`` flattens them).

    Args:
        keys: keys of the volumes to cut (same spatial shape).
        axis, central, air_threshold, min_foreground_fraction: see :func:`extract_slices`.
        reference_key: key whose content decides which slices are kept.
        slice_index_key: key under which each dictionary records its slice index (None: not recorded).
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        keys: KeysCollection,
        axis: int = -1,
        central: int | None = None,
        air_threshold: float | None = None,
        min_foreground_fraction: float = 0.0,
        reference_key: Hashable | None = None,
        slice_index_key: Hashable | None = "slice_index",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.axis = axis
        self.central = central
        self.air_threshold = air_threshold
        self.min_foreground_fraction = min_foreground_fraction
        self.reference_key = reference_key if reference_key is not None else self.keys[0]
        self.slice_index_key = slice_index_key

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if self.reference_key not in d:
            raise KeyError(f"ExtractSlicesd: reference key {self.reference_key!r} is not in the data")
        reference = d[self.reference_key]
        indices = select_slices(
            reference, self.axis, self.central, self.air_threshold, self.min_foreground_fraction,
            name=f"key {self.reference_key!r}",
        )
        spatial_axis = _spatial_axis(self.axis, f"key {self.reference_key!r}")
        reference_shape = tuple(_check_volume(reference, f"key {self.reference_key!r}").shape[1:])
        volumes = {}
        for key in present:
            volume = _check_volume(d[key], f"key {key!r}")
            if tuple(volume.shape[1:]) != reference_shape:
                raise ValueError(
                    f"key {key!r}: spatial shape {tuple(volume.shape[1:])} differs from that of reference key "
                    f"{self.reference_key!r}, {reference_shape}"
                )
            volumes[key] = volume
        results = []
        for k in indices:
            item = {key: value for key, value in d.items() if key not in volumes}
            for key, volume in volumes.items():
                item[key] = _take_slice(volume, spatial_axis, k)
            if self.slice_index_key is not None:
                item[self.slice_index_key] = k
            results.append(item)
        return results
