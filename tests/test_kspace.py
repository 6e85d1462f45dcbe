"""k-space truncation (MRI 4x SR degradation): the issue's acceptance test plus conventions and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medir_monai.transforms import KSpaceTruncate, KSpaceTruncated, central_window, kspace_mask, kspace_truncate


def centred_kspace(image: np.ndarray) -> np.ndarray:
    """Centred, orthonormal 2-D FFT over the last two axes (the convention of monai.data.fft_utils)."""
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(image, axes=axes), axes=axes, norm="ortho"), axes=axes)


def centred_image(kspace: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(kspace, axes=axes), axes=axes, norm="ortho"), axes=axes)


def test_central_window_convention():
    assert central_window(256, 0.25) == slice(96, 160)  # frequencies -32 .. 31 around the DC at 128
    assert central_window(255, 0.25) == slice(95, 159)  # 64 kept, DC at 127
    assert central_window(9, 1 / 3) == slice(3, 6)  # odd kept count: symmetric around the DC at 4
    assert central_window(10, 1.0) == slice(0, 10)
    assert central_window(4, 0.01) == slice(2, 3)  # at least the DC
    mask = kspace_mask((64, 48), 0.25)
    assert mask.sum() == 16 * 12 and mask[32, 24] and not mask[23, 24]


def test_random_image_kspace_is_cut_exactly():
    """Before the magnitude step: zero energy outside the central H/4 x W/4, unchanged inside."""
    rng = np.random.default_rng(0)
    image = rng.random((1, 64, 48))
    out = kspace_truncate(image, 0.25, magnitude=False)
    k_in, k_out = centred_kspace(image), centred_kspace(out)
    mask = kspace_mask((64, 48), 0.25).numpy()
    assert np.abs(k_in[:, ~mask]).max() > 0.1  # the input does have energy there
    assert np.abs(k_out[:, ~mask]).max() < 1e-12
    np.testing.assert_allclose(k_out[:, mask], k_in[:, mask], atol=1e-12)


@pytest.mark.parametrize("size", [(64, 64), (60, 52), (63, 45)])
def test_magnitude_output_on_phase_free_image(size):
    """The issue's acceptance test through the magnitude: an image whose truncated version is real and positive.

    Its centred spectrum is random but real and point-symmetric about the DC (so the image is real), the
    kept frequency line whose mirror lies outside the window is empty (with its mirror), and a large DC keeps the
    truncated image positive: then |ifft| changes nothing and the output spectrum must equal the input's
    inside the window and vanish outside.
    """
    rng = np.random.default_rng(1)
    height, width = size
    spectrum = rng.standard_normal(size)
    centre = (height // 2, width // 2)
    mirror = ((2 * centre[0] - np.arange(height)) % height)[:, None], ((2 * centre[1] - np.arange(width)) % width)[None]
    spectrum = spectrum + spectrum[mirror]  # real and symmetric: real image
    windows = [central_window(n, 0.25) for n in size]
    for axis, (n, window) in enumerate(zip(size, windows)):
        if (window.stop - window.start) % 2 == 0:  # even kept count: its lowest frequency has no partner
            for line in (window.start, (2 * centre[axis] - window.start) % n):  # empty it and its mirror
                index = [slice(None), slice(None)]
                index[axis] = line
                spectrum[tuple(index)] = 0.0
    spectrum[centre] = 50.0 * np.abs(spectrum).sum() / np.sqrt(height * width)
    image = centred_image(spectrum)
    assert np.abs(image.imag).max() < 1e-10
    image = image.real[None].astype(np.float64)

    out = kspace_truncate(image, 0.25)
    assert out.dtype == np.float64 and out.shape == image.shape
    mask = kspace_mask(size, 0.25).numpy()
    k_in, k_out = centred_kspace(image), centred_kspace(out)
    assert np.abs(k_in[:, ~mask]).max() > 1.0
    assert np.abs(k_out[:, ~mask]).max() < 1e-9
    np.testing.assert_allclose(k_out[:, mask], k_in[:, mask], atol=1e-9)


def test_types_shapes_and_meta():
    rng = np.random.default_rng(2)
    volume = rng.random((2, 32, 40, 5)).astype(np.float32)
    out = KSpaceTruncate(0.25)(volume)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == volume.shape
    # slice by slice: a slice of the volume result equals the result on that slice
    np.testing.assert_allclose(out[..., 3], kspace_truncate(volume[..., 3]), atol=1e-6)
    tensor = MetaTensor(torch.from_numpy(volume[..., 0]), meta={"filename_or_obj": "x.nii"})
    out_t = KSpaceTruncate(0.25)(tensor)
    assert isinstance(out_t, MetaTensor) and out_t.meta["filename_or_obj"] == "x.nii"
    assert torch.allclose(out_t.as_tensor(), torch.from_numpy(out[..., 0]), atol=1e-5)
    ints = kspace_truncate(np.full((1, 16, 16), 7, dtype=np.int16))
    assert ints.dtype == np.float32
    np.testing.assert_allclose(ints, 7.0, atol=1e-4)  # a constant image only has a DC term


def test_per_axis_fraction_and_3d():
    rng = np.random.default_rng(3)
    image = rng.random((1, 32, 32))
    out = kspace_truncate(image, (1.0, 0.25), magnitude=False)
    k_out = centred_kspace(out)
    assert np.abs(k_out[:, :, :12]).max() < 1e-12 and np.abs(k_out[:, :, 12:20]).max() > 0
    assert np.abs(k_out[:, 0, 12:20]).max() > 0  # every row kept
    volume = rng.random((1, 16, 16, 16))
    out3 = kspace_truncate(volume, 0.5, spatial_dims=3, magnitude=False)
    k3 = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(out3, axes=(1, 2, 3)), axes=(1, 2, 3)), axes=(1, 2, 3))
    assert np.abs(k3[:, :4]).max() < 1e-10 and np.abs(k3[:, :, :, 12:]).max() < 1e-10


def test_dictionary_version_keeps_input():
    image = torch.rand(1, 32, 32)
    data = KSpaceTruncated(keys="hq", output_keys="lq")({"hq": image, "other": 1})
    assert data["hq"] is image and data["other"] == 1
    assert torch.allclose(data["lq"], KSpaceTruncate()(image))
    in_place = KSpaceTruncated(keys="hq")({"hq": image})
    assert torch.allclose(in_place["hq"], data["lq"])
    assert KSpaceTruncated(keys="missing", allow_missing_keys=True)({"hq": image})["hq"] is image


def test_errors():
    with pytest.raises(ValueError, match="channel-first"):
        kspace_truncate(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="NaN"):
        kspace_truncate(np.full((1, 8, 8), np.nan))
    with pytest.raises(ValueError, match="keep_fraction"):
        KSpaceTruncate(0.0)
    with pytest.raises(ValueError, match="one value per spatial axis"):
        KSpaceTruncate((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="key 'hq'"):
        KSpaceTruncated(keys="hq")({"hq": np.zeros((8, 8))})
