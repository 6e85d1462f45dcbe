"""Shared pieces of the low-dose CT and PET simulations: seeding, slice batching, the cached projector, the PSF
blur, the noise estimate, and the checks of the MONAI transforms in :mod:`.lowdose_ct` and :mod:`.lowdose_pet`."""


from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from .projector import ParallelBeamProjector

__all__ = [
    "MAD_TO_STD",
    "SeedLike",
    "as_slices",
    "cached_projector",
    "check_finite",
    "estimate_noise_std",
    "gaussian_blur",
    "pixel_size_of",
    "slices_of",
    "torch_generator",
]

SeedLike = int | np.random.RandomState | np.random.Generator | torch.Generator | None

MAD_TO_STD = 0.6745
"""Median absolute deviation of a standard normal variable: ``std = median(|x|) / 0.6745``."""


def torch_generator(rng: SeedLike) -> torch.Generator:
    """A torch generator from an int seed, a numpy random state/generator (a seed is drawn), or None."""
    if isinstance(rng, torch.Generator):
        return rng
    gen = torch.Generator()
    if rng is None:
        gen.seed()
    elif isinstance(rng, (int, np.integer)):
        gen.manual_seed(int(rng))
    elif isinstance(rng, np.random.RandomState):
        gen.manual_seed(int(rng.randint(0, 2**31 - 1)))
    elif isinstance(rng, np.random.Generator):
        gen.manual_seed(int(rng.integers(0, 2**31 - 1)))
    else:
        raise TypeError(f"rng must be an int, numpy RandomState/Generator, torch.Generator or None, got {type(rng)}")
    return gen


def as_slices(data: Any, name: str) -> tuple[torch.Tensor, bool]:
    """``(H, W)`` or ``(B, H, W)`` array -> float32 ``(B, H, W)`` tensor (and whether a batch axis was added)."""
    tensor = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data.as_subclass(torch.Tensor))
    if tensor.ndim not in (2, 3):
        raise ValueError(f"{name} must be (H, W) or (B, H, W), got shape {tuple(tensor.shape)}")
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return (tensor[None], True) if tensor.ndim == 2 else (tensor, False)


@lru_cache(maxsize=2)
def cached_projector(
    shape: tuple[int, int], pixel_size_mm: float, num_views: int, circle: bool, num_subsets: int
) -> ParallelBeamProjector:
    """Projectors are reused across calls with the same geometry (their sparse blocks are cached)."""
    return ParallelBeamProjector(shape, pixel_size_mm, num_views, circle=circle, num_subsets=num_subsets)


def gaussian_blur(images: torch.Tensor, fwhm_mm: float, pixel_size_mm: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, H, W)`` images with zero padding (a self-adjoint operator).

    Models the scanner's point-spread function (PET, ``FWHM = 2 sqrt(2 ln 2) sigma``); ``fwhm_mm <= 0``
    returns the input.
    """
    if fwhm_mm <= 0:
        return images
    sigma = fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / pixel_size_mm  # in pixels
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = images[:, None]
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1), padding=(0, radius))
    return out[:, 0]



def slices_of(img: torch.Tensor, name: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Channel-first ``(C, H, W)`` / ``(C, H, W, D)`` -> ``(N, H, W)`` slices and the inverse reshaping."""
    if img.ndim == 3:
        channels, height, width = img.shape
        return img.reshape(channels, height, width), lambda out: out.reshape(channels, height, width)
    if img.ndim == 4:
        channels, height, width, depth = img.shape
        stacked = img.permute(0, 3, 1, 2).reshape(channels * depth, height, width)
        return stacked, lambda out: out.reshape(channels, depth, height, width).permute(0, 2, 3, 1)
    raise ValueError(f"{name} must be channel-first (C, H, W) or (C, H, W, D), got shape {tuple(img.shape)}")


def pixel_size_of(img: Any, default: float | None, fallback: float, name: str) -> float:
    """The explicit pixel size, else the in-plane spacing of a MetaTensor (must be isotropic), else fallback."""
    if default is not None:
        return float(default)
    if isinstance(img, MetaTensor):  # spacing of the two in-plane axes = norms of the affine's first columns
        affine = img.affine
        dy, dx = (float(v) for v in torch.linalg.norm(affine[:-1, :2].double(), dim=0))
        if abs(dy - dx) > 0.01 * max(dy, dx):
            raise ValueError(f"{name}: in-plane spacing {dy} x {dx} mm is not isotropic; resample first (Spacingd)")
        return dy
    return fallback


def check_finite(img: torch.Tensor, name: str) -> None:
    if not torch.isfinite(img).all():
        raise ValueError(f"{name} contains NaN or Inf values")


def estimate_noise_std(image: torch.Tensor, object_threshold: float | None = None) -> float:
    """Noise standard deviation of a slice from its finest-scale diagonal Haar coefficients (robust MAD;
    Donoho & Johnstone, Biometrika 1994).

    Args:
        image: ``(H, W)`` slice.
        object_threshold: only 2 x 2 blocks whose mean exceeds this count (the object, not the air or padding
            around it, where CT noise is clipped); ``None`` uses every block. Falls back to every block when none
            is above it.

    Returns:
        the estimate, in the image's units (0 for a noise-free piecewise-constant image).
    """
    x = torch.as_tensor(image).float()
    if x.ndim != 2:
        raise ValueError(f"image must be one 2-D slice (H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    if h == 0 or w == 0:
        raise ValueError(f"image of shape {tuple(x.shape)} is too small for a noise estimate (needs 2 x 2)")
    x = x[:h, :w]
    a, b, c, d = x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]
    diagonal = (a - b - c + d) / 2  # unit gain for white noise
    if object_threshold is not None:
        inside = (a + b + c + d) / 4 > object_threshold
        if bool(inside.any()):
            diagonal = diagonal[inside]
    return float(diagonal.abs().median() / MAD_TO_STD)
