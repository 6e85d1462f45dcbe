"""Slice extraction (central N, air dropping) on synthetic volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medir_monai.transforms import (
    ExtractSlicesd,
    extract_slices,
    select_slices,
)


def numbered_volume(shape=(1, 6, 5, 10)) -> np.ndarray:
    """Every slice along the last axis is filled with its own index."""
    return np.broadcast_to(np.arange(shape[-1], dtype=np.float32), shape).copy()


def test_central_slices():
    volume = numbered_volume()
    slices, indices = extract_slices(volume, central=4)
    assert indices == [3, 4, 5, 6]
    assert [float(s.mean()) for s in slices] == [3.0, 4.0, 5.0, 6.0]
    assert all(s.shape == (1, 6, 5) and isinstance(s, np.ndarray) for s in slices)
    assert select_slices(numbered_volume((1, 2, 2, 11)), central=4) == [3, 4, 5, 6]  # (11 - 4) // 2
    assert select_slices(volume, central=100) == list(range(10))  # fewer slices than asked: all
    assert select_slices(volume) == list(range(10))


def test_air_slices_are_dropped():
    volume = np.full((2, 8, 8, 10), -1000.0, dtype=np.float32)  # two channels of air (HU)
    volume[0, :, :, 3:7] = 40.0  # tissue in slices 3..6
    volume[1, 0, 0, 2] = 0.0  # one pixel above air in the second channel only
    volume[0, :2, :, 7] = 40.0  # a quarter of slice 7
    assert select_slices(volume, air_threshold=-900.0) == [2, 3, 4, 5, 6, 7]
    assert select_slices(volume, air_threshold=-900.0, min_foreground_fraction=0.2) == [3, 4, 5, 6, 7]
    assert select_slices(volume, air_threshold=-900.0, min_foreground_fraction=0.5) == [3, 4, 5, 6]
    assert select_slices(volume, air_threshold=50.0) == []  # everything is "air" at that threshold
    # central first, then air: central 4 of 10 is 3..6
    slices, indices = extract_slices(volume, central=4, air_threshold=-900.0)
    assert indices == [3, 4, 5, 6] and slices[0].shape == (2, 8, 8)


def test_axis_channel_and_torch():
    volume = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)  # (X, Y, Z), no channel
    slices, indices = extract_slices(volume, axis=0)
    assert indices == [0, 1, 2, 3]
    assert all(isinstance(s, torch.Tensor) and s.shape == (1, 5, 6) for s in slices)
    assert torch.equal(slices[2][0], volume[2])
    slices, _ = extract_slices(volume, axis=1, central=1)
    assert slices[0].shape == (1, 4, 6) and torch.equal(slices[0][0], volume[:, 2])


def test_meta_tensor_slices_keep_world_position():
    affine = torch.tensor([[2.0, 0, 0, 10.0], [0, 3.0, 0, 20.0], [0, 0, 4.0, 30.0], [0, 0, 0, 1]], dtype=torch.float64)
    volume = MetaTensor(torch.rand(1, 3, 4, 5), affine=affine, meta={"filename_or_obj": "v.nii"})
    slices, indices = extract_slices(volume, axis=-1)
    third = slices[2]
    assert isinstance(third, MetaTensor) and third.meta["slice_index"] == 2
    assert third.meta["filename_or_obj"] == "v.nii"
    assert torch.allclose(third.affine[:3, 3], torch.tensor([10.0, 20.0, 38.0], dtype=torch.float64))
    spacing = torch.linalg.norm(third.affine[:3, :2], dim=0)  # in-plane columns
    assert torch.allclose(spacing, torch.tensor([2.0, 3.0], dtype=torch.float64))
    along_x = extract_slices(volume, axis=0)[0][1]
    spacing = torch.linalg.norm(along_x.affine[:3, :2], dim=0)
    assert torch.allclose(spacing, torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert torch.allclose(along_x.affine[:3, 3], torch.tensor([12.0, 20.0, 30.0], dtype=torch.float64))


def test_extract_slices_dict_returns_aligned_items():
    hq = numbered_volume((1, 4, 4, 8))
    hq[..., :2] = 0.0  # slices 0, 1 empty in the reference
    lq = hq + 100.0  # never "air": the reference key decides
    items = ExtractSlicesd(keys=("hq", "lq"), air_threshold=0.5, reference_key="hq")(
        {"hq": hq, "lq": lq, "task": "ct_denoise"}
    )
    assert [item["slice_index"] for item in items] == [2, 3, 4, 5, 6, 7]
    for item in items:
        assert item["task"] == "ct_denoise"
        assert float(item["hq"].mean()) == item["slice_index"]
        assert float(item["lq"].mean()) == item["slice_index"] + 100.0
    items = ExtractSlicesd(keys="hq", central=2, slice_index_key=None)({"hq": hq})
    assert len(items) == 2 and "slice_index" not in items[0]


def test_slice_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"volume must be \(X, Y, Z\).*\(4, 4\)"):
        extract_slices(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        extract_slices(np.full((2, 2, 2), np.inf))
    with pytest.raises(ValueError, match="axis"):
        extract_slices(np.zeros((2, 2, 2)), axis=3)
    with pytest.raises(ValueError, match="central"):
        extract_slices(np.zeros((2, 2, 2)), central=0)
    with pytest.raises(ValueError, match="key 'lq'.*differs"):
        ExtractSlicesd(keys=("hq", "lq"))({"hq": np.zeros((1, 4, 4, 3)), "lq": np.zeros((1, 4, 4, 2))})
    with pytest.raises(ValueError, match="key 'lq'.*NaN"):
        ExtractSlicesd(keys=("hq", "lq"))({"hq": np.zeros((1, 4, 4, 3)), "lq": np.full((1, 4, 4, 3), np.nan)})
    with pytest.raises(KeyError, match="reference key 'mask'"):
        ExtractSlicesd(keys="hq", reference_key="mask")({"hq": np.zeros((1, 4, 4, 3))})
