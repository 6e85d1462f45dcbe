"""Consistency safeguards: keep a restored slice within what its low-quality input can support.

A small or briefly trained network has an error floor of its own (a few HU of painted texture and a bias of
2 to 4 HU in soft tissue for the CPU-size AMIR of the README main job). When an input is cleaner than the
training data (a 256 x 256 CT, a higher dose, more projection views), that floor exceeds the input's noise and
the "restored" image is worse than the input. A safeguard post-processes each restored slice with what the
degradation physics says about the input, and needs no training and no ground truth:

* ``"noise"`` (denoising tasks: ``ct_denoise``). Filtered back-projection noise has almost no energy at the
  lowest spatial frequencies (the ramp filter vanishes at zero frequency), so the restored slice takes its
  Gaussian low-pass band (``lowpass_sigma`` pixels) from the input, which removes any intensity bias of the
  network. The remaining residual ``r = restored - input`` is then shrunk where it exceeds the input's noise
  level: ``input + alpha * r`` with ``alpha = min(1, sigma^2 / mean_window(r^2))`` (a local Wiener weight;
  when ``r`` is mostly removed noise, ``mean(r^2) ~ sigma^2`` and the restoration is kept, when the network
  changes the image by more than the noise could explain, the change is damped). ``sigma`` is estimated from
  the input itself: the median absolute finest-scale diagonal Haar coefficient / 0.6745 (Donoho & Johnstone,
  Biometrika 1994) inside the object (``object_threshold``, e.g. above -500 HU).
* ``"kspace"`` (``mri_sr`` by k-space truncation). The input holds the true central k-space exactly, so the
  restoration keeps only the residual outside that band (``keep_fraction`` per axis, the degradation's), the
  data-consistency step of model-based MRI reconstruction.

The papers' configurations use none (``safeguard: null``); the ``quick.json`` configs turn on ``"noise"`` for CT,
and AMIR's (the README main job) also ``"kspace"`` for MRI. The measured effect: the leave-one-source-out tables of
``benchmarks/README.md`` (with and without the safeguard).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from medir_monai.tasks import Task, UnknownTaskError, get_task
from medir_monai.transforms import central_window, estimate_noise_std

__all__ = [
    "SAFEGUARD_METHODS",
    "RestorationSafeguard",
    "estimate_noise_std",
    "kspace_consistency",
    "noise_consistency",
]

def _plane(image: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(image)
    if x.ndim != 2:
        raise ValueError(f"{name} must be one 2-D slice (H, W), got shape {tuple(x.shape)}")
    return x.float()


def _gaussian_lowpass(image: torch.Tensor, sigma: float) -> torch.Tensor:
    return GaussianFilter(spatial_dims=2, sigma=sigma)(image[None, None])[0, 0]


def _window_mean(image: torch.Tensor, window: int) -> torch.Tensor:
    pad = window // 2
    padded = F.pad(image[None, None], (pad, window - 1 - pad, pad, window - 1 - pad), mode="replicate")
    return F.avg_pool2d(padded, window, stride=1)[0, 0]


def noise_consistency(
    lq: torch.Tensor,
    restored: torch.Tensor,
    lowpass_sigma: float = 1.5,
    window: int = 5,
    object_threshold: float | None = None,
    noise_std: float | None = None,
) -> torch.Tensor:
    """The ``"noise"`` safeguard (module docstring): low-pass band from ``lq``, residual shrunk to the noise level.

    Args:
        lq: ``(H, W)`` noisy input slice.
        restored: ``(H, W)`` network output for it, same units.
        lowpass_sigma: Gaussian standard deviation (pixels) of the band taken from ``lq``; 0 keeps the network's.
        window: side (pixels) of the square window over which the residual power is averaged.
        object_threshold: see :func:`estimate_noise_std` (same units as the images).
        noise_std: the input's noise standard deviation if known; estimated from ``lq`` otherwise.

    Returns:
        the safeguarded slice, ``(H, W)`` float32.
    """
    lq, restored = _plane(lq, "lq"), _plane(restored, "restored")
    if lq.shape != restored.shape:
        raise ValueError(f"lq {tuple(lq.shape)} and restored {tuple(restored.shape)} differ in shape")
    if lowpass_sigma < 0 or window < 1:
        raise ValueError(f"lowpass_sigma must be >= 0 and window >= 1, got {lowpass_sigma} and {window}")
    if lowpass_sigma > 0:
        restored = restored - _gaussian_lowpass(restored, lowpass_sigma) + _gaussian_lowpass(lq, lowpass_sigma)
    sigma = estimate_noise_std(lq, object_threshold) if noise_std is None else float(noise_std)
    residual = restored - lq
    residual_power = _window_mean(residual * residual, window)
    weight = (sigma * sigma / residual_power.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    return lq + weight * residual


def _symmetric_band(shape: tuple[int, int], keep_fraction: float) -> torch.Tensor:
    """Boolean mask over (uncentred) 2-D frequencies: ``|k| <= (m - 1) // 2`` per axis, ``m`` the kept count of
    :func:`~medir_monai.transforms.central_window`: the truncation's band without its one unpaired frequency, so
    the projection of a real image onto it is real and idempotent."""
    axes = []
    for n in shape:
        window = central_window(n, keep_fraction)
        half = (window.stop - window.start - 1) // 2
        axes.append(torch.fft.fftfreq(n, d=1.0 / n).round().abs() <= half)
    return axes[0][:, None] & axes[1][None, :]


def kspace_consistency(lq: torch.Tensor, restored: torch.Tensor, keep_fraction: float = 0.25) -> torch.Tensor:
    """The ``"kspace"`` safeguard: ``lq`` plus the part of ``restored - lq`` outside the acquired central band.

    Args:
        lq: ``(H, W)`` k-space-truncated input (the magnitude image on the full grid).
        restored: ``(H, W)`` network output for it.
        keep_fraction: the truncation's kept fraction per axis (0.25: the papers' 4x).
    """
    lq, restored = _plane(lq, "lq"), _plane(restored, "restored")
    if lq.shape != restored.shape:
        raise ValueError(f"lq {tuple(lq.shape)} and restored {tuple(restored.shape)} differ in shape")
    residual = restored - lq
    band = _symmetric_band(tuple(residual.shape), keep_fraction)
    in_band = torch.fft.ifft2(torch.fft.fft2(residual) * band).real
    return lq + residual - in_band


SAFEGUARD_METHODS = {"noise": noise_consistency, "kspace": kspace_consistency}
"""Safeguard name -> function ``(lq, restored, **options)``."""


class RestorationSafeguard:
    """Per-task safeguards, built from a bundle config's ``safeguard`` mapping.

    Args:
        settings: ``{task name: {"method": "noise" | "kspace", **options of that method}}``; tasks not listed
            are returned unchanged. ``object_threshold`` is given in the task's physical unit (e.g. HU).

    Example (AMIR's ``quick.json``)::

        "safeguard": {"ct_denoise": {"method": "noise", "lowpass_sigma": 1.5, "window": 5, "object_threshold": -500},
                      "mri_sr": {"method": "kspace", "keep_fraction": 0.25}}
    """

    def __init__(self, settings: Mapping[str, Mapping[str, Any]] | None = None):
        self.settings: dict[str, dict[str, Any]] = {}
        for task_name, options in (settings or {}).items():
            try:
                task = get_task(task_name)
            except UnknownTaskError as err:
                raise ValueError(f"safeguard: {err}") from None
            options = dict(options)
            method = options.pop("method", None)
            if method not in SAFEGUARD_METHODS:
                raise ValueError(
                    f"safeguard for {task.name}: method must be one of {sorted(SAFEGUARD_METHODS)}, got {method!r}"
                )
            self.settings[task.name] = {"method": method, **options}

    def __bool__(self) -> bool:
        return bool(self.settings)

    def __call__(self, lq: torch.Tensor, restored: torch.Tensor, task: str | Task, normalised: bool = False) -> torch.Tensor:
        """Safeguard one ``(H, W)`` slice of ``task``; ``normalised``: the images are in model space ``[0, 1]``
        (a physical ``object_threshold`` is mapped there), physical units otherwise."""
        task = get_task(task)
        options = dict(self.settings.get(task.name, {}))
        if not options:
            return restored
        method = SAFEGUARD_METHODS[options.pop("method")]
        threshold = options.get("object_threshold")
        if normalised and threshold is not None:
            options["object_threshold"] = float(task.normalise(torch.tensor(float(threshold))))
        out = method(lq, restored, **options)
        return out.to(dtype=torch.as_tensor(restored).dtype, device=torch.as_tensor(restored).device)
