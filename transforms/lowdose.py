"""Low-dose CT and PET simulation (the LQ inputs of the ``ct_denoise`` and ``pet_synthesis`` tasks).

CT (:func:`simulate_low_dose_ct`): HU -> linear attenuation -> parallel-beam sinogram -> Poisson
transmission noise at ``dose_fraction * i0`` photons per detector bin (+ optional Gaussian electronic
noise) -> ``-log`` -> filtered back-projection -> HU. The photon count is calibrated so that a quarter-dose
reconstruction of a real abdominal slice (0.86 mm pixels, 720 views, Ram-Lak) carries 17-19 HU more
noise than the full-dose input, within the +15 to +30 HU between the AAPM-Mayo 2016 full- and
quarter-dose pairs the papers use.

PET (:func:`simulate_pet_pair`): activity -> PSF blur -> projection with attenuation factors ->
Poisson prompts at the full count level (plus uniform randoms) -> binomial thinning with
``p = dose_fraction`` (list-mode decimation; a thinned Poisson is Poisson) -> OSEM of both count sets
with the same system model, attenuation and randoms correction, in activity units. HQ and LQ therefore
differ only by counting noise, as between the papers' full-dose and 1/12-dose FDG reconstructions.

Both use :class:`~.projector.ParallelBeamProjector` (torch, batched over slices). Transforms take
channel-first ``(C, H, W)`` or ``(C, H, W, D)`` arrays (numpy or torch, every 2-D ``(H, W)`` slice is
simulated, batched) and return the same type.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple_rep

from .projector import FBP_FILTERS, ParallelBeamProjector

__all__ = [
    "CT_FULL_DOSE_PHOTONS",
    "MU_WATER_PER_MM",
    "PET_FULL_COUNTS",
    "PET_REFERENCE_ACTIVITY",
    "LowDoseCT",
    "LowDoseCTd",
    "LowDosePET",
    "LowDosePETd",
    "gaussian_blur",
    "osem",
    "simulate_low_dose_ct",
    "simulate_pet_pair",
]

MU_WATER_PER_MM = 0.0192
"""Linear attenuation of water at ~70 keV, the effective energy of a 120 kVp CT beam (NIST XCOM
0.193 cm^2/g x 1 g/cm^3 = 0.0193 /mm); HU = 1000 (mu / mu_water - 1)."""

CT_FULL_DOSE_PHOTONS = 2.0e6
"""Full-dose incident photons per detector bin and view (0.86 mm bins, 720 views over 180 degrees),
calibrated on the ``pydicom-data`` abdominal slice (``explicit_VR-UN.dcm``, liver region, Ram-Lak): the
simulated quarter dose has a noise standard deviation of 31.7 HU (``reconstruct``) / 33.4 HU
(``insert_noise``) against 14.4 HU in the full-dose input, i.e. +17 to +19 HU, within the +15 to +30 HU
of the AAPM-Mayo 2016 quarter-dose data; the simulated full dose (18-21 HU) is close to the real one.
Noise variance scales as 1 / (photons x views): with fewer views scale ``i0`` up by the same factor.
``benchmarks/transforms.py`` prints these figures."""

PET_FULL_COUNTS = 1.0e6
"""Expected prompts (trues + randoms) per 2-D slice at full dose. On a 256 x 256 body-sized phantom
(2 mm pixels, 3 iterations x 6 subsets) the full-dose OSEM image has about 10 % noise (coefficient of
variation) in a uniform region, like a clinical FDG scan, and the 1/12-dose one about 3.3 times more."""

PET_REFERENCE_ACTIVITY = math.pi * 150.0**2
"""Activity integral (activity unit x mm^2) of the slice that yields :data:`PET_FULL_COUNTS` expected prompts
when ``count_scaling="activity"``: a 30 cm body at a mean SUV of 1 (70,686 SUV mm^2). Slices with less activity
get proportionally fewer counts (noisier), hotter or larger ones more."""

PET_COUNT_SCALINGS = ("slice", "activity")
"""How :func:`simulate_pet_pair` sets the counts of a slice: ``full_counts`` per slice whatever its activity, or in
proportion to the slice's activity integral (:data:`PET_REFERENCE_ACTIVITY`)."""

PET_MODES = ("reconstruct", "insert_noise")
"""What :class:`LowDosePET` returns: the low-dose reconstruction, or the input plus the simulated extra noise."""

_SeedLike = int | np.random.RandomState | np.random.Generator | torch.Generator | None


# ---- helpers --------------------------------------------------------------------------------------
def _generator(rng: _SeedLike) -> torch.Generator:
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


def _as_slices(data: Any, name: str) -> tuple[torch.Tensor, bool]:
    """``(H, W)`` or ``(B, H, W)`` array -> float32 ``(B, H, W)`` tensor (and whether a batch axis was added)."""
    tensor = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data.as_subclass(torch.Tensor))
    if tensor.ndim not in (2, 3):
        raise ValueError(f"{name} must be (H, W) or (B, H, W), got shape {tuple(tensor.shape)}")
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return (tensor[None], True) if tensor.ndim == 2 else (tensor, False)


@lru_cache(maxsize=2)
def _cached_projector(
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


# ---- CT -------------------------------------------------------------------------------------------
def simulate_low_dose_ct(
    hu: NdarrayOrTensor,
    dose_fraction: float = 0.25,
    i0: float = CT_FULL_DOSE_PHOTONS,
    pixel_size_mm: float = 0.86,
    num_views: int = 720,
    electronic_noise_std: float = 0.0,
    mu_water: float = MU_WATER_PER_MM,
    filter_name: str = "ramlak",
    circle: bool = False,
    mode: str = "reconstruct",
    min_counts: float = 1.0,
    rng: _SeedLike = None,
    projector: ParallelBeamProjector | None = None,
    batch_size: int = 64,
) -> NdarrayOrTensor:
    """Simulate a reduced-dose CT slice (or batch of slices) from a full-dose one, in HU.

    Monochromatic parallel-beam model (no beam hardening or scatter):

    1. ``mu = mu_water * (1 + HU / 1000)``, clipped at 0 (air; padding below -1000 HU becomes air).
    2. ``p = A mu``: line integrals over ``num_views`` angles in [0, pi), bins of ``pixel_size_mm``.
    3. ``N ~ Poisson(dose_fraction * i0 * exp(-p))`` (+ ``Normal(0, electronic_noise_std)`` photons),
       clamped to ``>= min_counts`` so the log exists (photon starvation).
    4. ``p_hat = -log(N / (dose_fraction * i0))``, reconstructed by FBP (``"ramlak"`` or ``"hann"`` ramp).
    5. ``HU = 1000 (mu_hat / mu_water - 1)``.

    ``mode="reconstruct"`` returns that FBP image. ``mode="insert_noise"`` returns
    ``hu + FBP(p_hat - p)`` in HU: the same noise, added to the input, so the output keeps the input's
    resolution exactly and differs from it only by the simulated noise (FBP is linear).

    Args:
        hu: ``(H, W)`` or ``(B, H, W)`` full-dose image(s) in HU (numpy or torch).
        dose_fraction: dose of the simulated scan relative to full dose (0.25 = quarter dose).
        i0: full-dose incident photons per detector bin and view (see :data:`CT_FULL_DOSE_PHOTONS`).
        pixel_size_mm: in-plane pixel size (and detector bin width).
        num_views: projection angles over 180 degrees.
        electronic_noise_std: standard deviation of additive Gaussian detector noise, in photons.
        mu_water: attenuation of water in 1/mm (:data:`MU_WATER_PER_MM`).
        filter_name: FBP filter, ``"ramlak"`` or ``"hann"``.
        circle: only simulate inside the inscribed circle (scanner field of view); outside it the output
            is the input.
        mode: ``"reconstruct"`` or ``"insert_noise"`` (see above).
        min_counts: floor on detected counts before the log.
        rng: seed (int), numpy random state / generator (a seed is drawn from it), torch generator, or None.
        projector: a prebuilt projector (default: built and cached per geometry); its pixel size and views
            take precedence over ``pixel_size_mm`` and ``num_views``.
        batch_size: slices simulated together (memory: about 40 bytes per sinogram bin and slice).

    Returns:
        the simulated image(s), same shape and array type as ``hu``, float32, HU.
    """
    if not 0.0 < dose_fraction <= 1.0:
        raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
    if i0 <= 0 or mu_water <= 0 or pixel_size_mm <= 0:
        raise ValueError(f"i0, mu_water and pixel_size_mm must be > 0, got {i0}, {mu_water}, {pixel_size_mm}")
    if electronic_noise_std < 0 or min_counts <= 0:
        raise ValueError("electronic_noise_std must be >= 0 and min_counts > 0")
    if filter_name not in FBP_FILTERS:
        raise ValueError(f"filter_name must be one of {FBP_FILTERS}, got {filter_name!r}")
    if mode not in ("reconstruct", "insert_noise"):
        raise ValueError(f"mode must be 'reconstruct' or 'insert_noise', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    slices, added = _as_slices(hu, "hu")
    if projector is None:
        projector = _cached_projector(tuple(slices.shape[-2:]), float(pixel_size_mm), int(num_views), circle, 1)
    gen = _generator(rng)
    parts = [
        _ct_chunk(
            chunk, dose_fraction * i0, electronic_noise_std, mu_water, filter_name, mode, min_counts, gen, projector
        )
        for chunk in slices.split(batch_size)
    ]
    out = torch.cat(parts)
    if circle:
        out = torch.where(projector.mask, out, slices)
    out = out[0] if added else out
    return convert_to_dst_type(out, hu, dtype=torch.float32)[0]


def _ct_chunk(
    slices: torch.Tensor,
    photons: float,
    electronic_noise_std: float,
    mu_water: float,
    filter_name: str,
    mode: str,
    min_counts: float,
    gen: torch.Generator,
    projector: ParallelBeamProjector,
) -> torch.Tensor:
    """Steps 1-5 of :func:`simulate_low_dose_ct` for a batch ``(B, H, W)`` of HU slices."""
    mu = (mu_water * (1.0 + slices / 1000.0)).clamp_min(0.0)  # (B, H, W) 1/mm
    clean = projector.forward(mu).double()  # (B, V, D) line integrals
    counts = torch.poisson(photons * torch.exp(-clean), generator=gen)
    if electronic_noise_std > 0:
        counts = counts + electronic_noise_std * torch.randn(counts.shape, generator=gen, dtype=counts.dtype)
    noisy = -torch.log(counts.clamp_min(min_counts) / photons)
    if mode == "reconstruct":
        recon = projector.fbp(noisy.float(), filter_name)
        return 1000.0 * (recon / mu_water - 1.0)
    noise = projector.fbp((noisy - clean).float(), filter_name)
    return slices + 1000.0 * noise / mu_water


# ---- PET ------------------------------------------------------------------------------------------
def osem(
    counts: torch.Tensor,
    projector: ParallelBeamProjector,
    sensitivity_scale: torch.Tensor,
    attenuation: torch.Tensor,
    randoms: torch.Tensor,
    iterations: int,
    psf_fwhm_mm: float = 0.0,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ordered-subsets expectation maximisation (Hudson & Larkin, IEEE TMI 1994, eq. 2).

    System model per subset ``k``: ``ybar_k = s * a_k * A_k (G x) + r_k`` (``s`` counts per activity unit
    per slice, ``a`` attenuation factors, ``A_k`` the projector's subset ``k``, ``G`` the PSF blur, ``r``
    the expected randoms); update ``x <- x / (G^T A_k^T (s a_k)) * G^T A_k^T (s a_k y_k / ybar_k)``.

    Args:
        counts: ``(B, V, D)`` measured prompts.
        projector: projector built with the wanted number of subsets.
        sensitivity_scale: ``(B,)`` counts per activity unit ``s``.
        attenuation: ``(B, V, D)`` attenuation factors ``a`` in (0, 1].
        randoms: ``(B, V, D)`` expected randoms ``r`` (> 0 keeps ``ybar`` positive).
        iterations: full passes over the subsets.
        psf_fwhm_mm: resolution model ``G`` (0: none).
        initial: ``(B, H, W)`` start image (default: uniform, matching the total trues).

    Returns:
        ``(B, H, W)`` activity estimate, in the units ``s`` refers to.
    """
    batch = counts.shape[0]
    scale = sensitivity_scale.view(batch, 1, 1)
    blur = lambda img: gaussian_blur(img, psf_fwhm_mm, projector.pixel_size_mm)  # noqa: E731 (self-adjoint)
    weights = scale * attenuation  # (B, V, D)
    sensitivity = [  # G^T A_k^T (s a_k), one image per subset
        blur(projector.adjoint(weights[:, views], subset=k)) for k, views in enumerate(projector.subset_views)
    ]
    if initial is None:
        trues = (counts - randoms).sum(dim=(1, 2)).clamp_min(0.0)
        total_sens = sum(s.sum(dim=(1, 2)) for s in sensitivity)
        level = trues / total_sens.clamp_min(1e-12)
        image = level.view(batch, 1, 1) * projector.mask.to(counts.dtype).expand(batch, *projector.image_shape)
    else:
        image = initial.clone()
    tiny = torch.finfo(counts.dtype).tiny
    for _ in range(iterations):
        for k, views in enumerate(projector.subset_views):
            expected = weights[:, views] * projector.forward(blur(image), subset=k) + randoms[:, views]
            ratio = counts[:, views] / expected.clamp_min(tiny)
            correction = blur(projector.adjoint(weights[:, views] * ratio, subset=k))
            image = image * correction / sensitivity[k].clamp_min(tiny)
            image = torch.where(sensitivity[k] > 0, image, torch.zeros_like(image))
    return image


def simulate_pet_pair(
    activity: NdarrayOrTensor,
    dose_fraction: float = 1.0 / 12.0,
    full_counts: float = PET_FULL_COUNTS,
    mu_map: NdarrayOrTensor | None = None,
    pixel_size_mm: float = 2.0,
    psf_fwhm_mm: float = 4.5,
    randoms_fraction: float = 0.05,
    iterations: int = 3,
    subsets: int = 6,
    num_views: int = 180,
    post_filter_fwhm_mm: float = 0.0,
    count_scaling: str = "slice",
    reference_activity: float = PET_REFERENCE_ACTIVITY,
    rng: _SeedLike = None,
    return_counts: bool = False,
    projector: ParallelBeamProjector | None = None,
    batch_size: int = 32,
) -> tuple[NdarrayOrTensor, NdarrayOrTensor] | tuple[NdarrayOrTensor, NdarrayOrTensor, dict[str, np.ndarray]]:
    """Simulate a full-dose and a reduced-dose PET reconstruction of the same activity slice(s).

    1. Expected trues ``t = a * A (G x)``: PSF blur ``G`` (Gaussian, ``psf_fwhm_mm``), projection ``A``,
       attenuation factors ``a = exp(-A mu)``; scaled per slice so that the expected prompts are
       ``full_counts``, randoms (uniform over the sinogram) being ``randoms_fraction`` of them.
    2. ``y_full ~ Poisson(s t + r)`` (integers); ``y_low ~ Binomial(y_full, dose_fraction)`` (list-mode
       decimation, so ``y_low ~ Poisson(dose_fraction (s t + r))``).
    3. OSEM (:func:`osem`) of both with the same ``iterations`` x ``subsets``, system model (PSF,
       attenuation) and randoms estimate, the low-dose one with ``dose_fraction * s`` and
       ``dose_fraction * r``: both come out in the units of ``activity`` (e.g. SUV) and agree in mean.
    4. Optional Gaussian post-filter (``post_filter_fwhm_mm``).

    Args:
        activity: ``(H, W)`` or ``(B, H, W)`` non-negative activity (numpy or torch), e.g. SUV.
        dose_fraction: dose of the LQ scan relative to full dose (1/12 in the papers).
        full_counts: expected prompts per slice at full dose (:data:`PET_FULL_COUNTS`).
        mu_map: attenuation map in 1/mm, same shape as ``activity`` (None: no attenuation).
        pixel_size_mm: in-plane pixel size (and sinogram bin width).
        psf_fwhm_mm: scanner resolution, in the data and in the reconstruction's system model.
        randoms_fraction: fraction of the prompts that are randoms, in [0, 1).
        iterations: OSEM iterations (full passes over the subsets).
        subsets: OSEM subsets (interleaved views).
        num_views: sinogram angles over 180 degrees.
        post_filter_fwhm_mm: Gaussian filter applied to both reconstructions (0: none).
        count_scaling: ``"slice"``: every slice gets ``full_counts`` expected prompts whatever its activity (the
            demo's phantoms); ``"activity"``: ``full_counts * (sum of activity x pixel area) / reference_activity``,
            so a cold slice is noisier than a hot one, as in a real scan (the registry's default for HQ-only items).
        reference_activity: activity integral (activity unit x mm^2) that gets ``full_counts`` with
            ``count_scaling="activity"`` (:data:`PET_REFERENCE_ACTIVITY`).
        rng: seed (int), numpy random state / generator (a seed is drawn from it), torch generator, or None.
        return_counts: also return a dict of the count sinograms (see Returns).
        projector: a prebuilt projector with ``num_subsets == subsets`` (default: built and cached); its
            pixel size and views take precedence over ``pixel_size_mm`` and ``num_views``.
        batch_size: slices simulated (and reconstructed) together.

    Returns:
        ``(hq, lq)`` float32 reconstructions, same shape and array type as ``activity``; with
        ``return_counts`` also ``{"full", "low"}`` (int64 prompts), ``"expected"`` (the Poisson mean of
        ``full``), ``"randoms"`` (expected randoms at full dose), ``"scale"`` (counts per activity unit,
        per slice), as numpy arrays of shape ``(B, V, D)`` / ``(B,)``.
    """
    if not 0.0 < dose_fraction <= 1.0:
        raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
    if full_counts <= 0 or pixel_size_mm <= 0:
        raise ValueError(f"full_counts and pixel_size_mm must be > 0, got {full_counts}, {pixel_size_mm}")
    if not 0.0 <= randoms_fraction < 1.0:
        raise ValueError(f"randoms_fraction must be in [0, 1), got {randoms_fraction}")
    if count_scaling not in PET_COUNT_SCALINGS:
        raise ValueError(f"count_scaling must be one of {PET_COUNT_SCALINGS}, got {count_scaling!r}")
    if reference_activity <= 0:
        raise ValueError(f"reference_activity must be > 0, got {reference_activity}")
    if iterations < 1 or subsets < 1 or batch_size < 1:
        raise ValueError(f"iterations, subsets and batch_size must be >= 1, got {iterations}, {subsets}, {batch_size}")
    x, added = _as_slices(activity, "activity")
    if (x < 0).any():
        raise ValueError("activity must be non-negative")
    if projector is None:
        projector = _cached_projector(tuple(x.shape[-2:]), float(pixel_size_mm), int(num_views), False, int(subsets))
    elif projector.num_subsets != subsets:
        raise ValueError(f"projector has {projector.num_subsets} subsets, expected {subsets}")
    gen = _generator(rng)
    mu = None
    if mu_map is not None:
        mu, _ = _as_slices(mu_map, "mu_map")
        if mu.shape[-2:] != x.shape[-2:] or mu.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"mu_map shape {tuple(mu.shape)} does not match activity {tuple(x.shape)}")
        mu = mu.clamp_min(0.0).expand_as(x)
    settings = {
        "dose_fraction": dose_fraction,
        "full_counts": full_counts,
        "psf_fwhm_mm": psf_fwhm_mm,
        "randoms_fraction": randoms_fraction,
        "iterations": iterations,
        "post_filter_fwhm_mm": post_filter_fwhm_mm,
        "counts_per_activity": full_counts / reference_activity if count_scaling == "activity" else None,
    }
    parts = [
        _pet_chunk(x[i : i + batch_size], None if mu is None else mu[i : i + batch_size], projector, gen, **settings)
        for i in range(0, x.shape[0], batch_size)
    ]
    hq, lq = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if added:
        hq, lq = hq[0], lq[0]
    hq = convert_to_dst_type(hq, activity, dtype=torch.float32)[0]
    lq = convert_to_dst_type(lq, activity, dtype=torch.float32)[0]
    if not return_counts:
        return hq, lq
    sinograms = {name: torch.cat([p[2][name] for p in parts]).numpy() for name in parts[0][2]}
    return hq, lq, sinograms


def _pet_chunk(
    x: torch.Tensor,
    mu: torch.Tensor | None,
    projector: ParallelBeamProjector,
    gen: torch.Generator,
    dose_fraction: float,
    full_counts: float,
    psf_fwhm_mm: float,
    randoms_fraction: float,
    iterations: int,
    post_filter_fwhm_mm: float,
    counts_per_activity: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Steps 1-4 of :func:`simulate_pet_pair` for a batch ``(B, H, W)`` of activity slices."""
    batch, pixel = x.shape[0], projector.pixel_size_mm
    if mu is None:
        attenuation = torch.ones(batch, *projector.sinogram_shape)
    else:
        attenuation = torch.exp(-projector.forward(mu.contiguous()))
    trues_shape = attenuation * projector.forward(gaussian_blur(x, psf_fwhm_mm, pixel))  # (B, V, D)
    total = trues_shape.sum(dim=(1, 2)).double()
    prompts = torch.full((batch,), float(full_counts), dtype=torch.float64)  # expected prompts per slice
    if counts_per_activity is not None:  # in proportion to the slice's activity integral
        prompts = counts_per_activity * x.double().sum(dim=(1, 2)) * pixel * pixel
    scale = torch.where(total > 0, (1.0 - randoms_fraction) * prompts / total.clamp_min(1e-30), 0.0)
    num_bins = projector.num_views * projector.num_detectors
    randoms = (randoms_fraction * prompts / num_bins).view(batch, 1, 1).expand_as(trues_shape).clone()
    expected = scale.view(batch, 1, 1) * trues_shape.double() + randoms  # (B, V, D)
    full = torch.poisson(expected, generator=gen)
    low = torch.binomial(full, torch.full_like(full, dose_fraction), generator=gen)

    # both reconstructions in one batch: same geometry, counts per activity unit differ by dose_fraction
    counts = torch.cat([full, low]).float()
    recon_scale = torch.cat([scale, dose_fraction * scale]).float()
    recon_randoms = torch.cat([randoms, dose_fraction * randoms]).float().clamp_min(1e-6)
    recon_att = torch.cat([attenuation, attenuation]).float()
    images = osem(counts, projector, recon_scale, recon_att, recon_randoms, iterations, psf_fwhm_mm)
    images = gaussian_blur(images, post_filter_fwhm_mm, pixel)
    sinograms = {
        "full": full.to(torch.int64),
        "low": low.to(torch.int64),
        "expected": expected,
        "randoms": randoms,
        "scale": scale,
    }
    return images[:batch], images[batch:], sinograms


# ---- MONAI transforms -----------------------------------------------------------------------------
def _slices_of(img: torch.Tensor, name: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Channel-first ``(C, H, W)`` / ``(C, H, W, D)`` -> ``(N, H, W)`` slices and the inverse reshaping."""
    if img.ndim == 3:
        channels, height, width = img.shape
        return img.reshape(channels, height, width), lambda out: out.reshape(channels, height, width)
    if img.ndim == 4:
        channels, height, width, depth = img.shape
        stacked = img.permute(0, 3, 1, 2).reshape(channels * depth, height, width)
        return stacked, lambda out: out.reshape(channels, depth, height, width).permute(0, 2, 3, 1)
    raise ValueError(f"{name} must be channel-first (C, H, W) or (C, H, W, D), got shape {tuple(img.shape)}")


def _pixel_size(img: Any, default: float | None, fallback: float, name: str) -> float:
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


def _check_finite(img: torch.Tensor, name: str) -> None:
    if not torch.isfinite(img).all():
        raise ValueError(f"{name} contains NaN or Inf values")


class LowDoseCT(Randomizable, Transform):
    """Simulate a reduced-dose CT image in HU from a full-dose one (:func:`simulate_low_dose_ct`).

    Input ``(C, H, W)`` or ``(C, H, W, D)`` in HU; every ``(H, W)`` slice is simulated (batched).
    ``pixel_size_mm=None`` reads the spacing of a :class:`~monai.data.MetaTensor` (else 0.86 mm).
    Other arguments are those of :func:`simulate_low_dose_ct`. Seed with :meth:`set_random_state`.

    ``dose_fraction`` is relative to the calibrated full dose ``i0`` (:data:`CT_FULL_DOSE_PHOTONS`), not to
    the input's own dose, which a single image does not tell: the output carries the noise of a scan at
    ``dose_fraction * i0`` photons **added to** the input's own noise (``insert_noise``), so
    ``dose_fraction=1.0`` still adds the noise of a full-dose scan (the input is treated as noise-free). For a
    pair at the input's dose and a fraction ``f`` of it, the added variance should be ``(1 / f - 1)`` times
    the input's: pass ``dose_fraction = f / (1 - f)`` when the input itself is at the calibrated full dose.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        dose_fraction: float = 0.25,
        i0: float = CT_FULL_DOSE_PHOTONS,
        pixel_size_mm: float | None = None,
        num_views: int = 720,
        electronic_noise_std: float = 0.0,
        mu_water: float = MU_WATER_PER_MM,
        filter_name: str = "ramlak",
        circle: bool = False,
        mode: str = "reconstruct",
    ) -> None:
        self.kwargs = dict(
            dose_fraction=dose_fraction,
            i0=i0,
            num_views=num_views,
            electronic_noise_std=electronic_noise_std,
            mu_water=mu_water,
            filter_name=filter_name,
            circle=circle,
            mode=mode,
        )
        self.pixel_size_mm = pixel_size_mm
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True, name: str = "image") -> NdarrayOrTensor:
        if randomize:
            self.randomize()
        tensor = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        _check_finite(tensor, name)
        stacked, restore = _slices_of(tensor, name)
        pixel = _pixel_size(img, self.pixel_size_mm, 0.86, name)
        out = simulate_low_dose_ct(stacked, pixel_size_mm=pixel, rng=self._seed, **self.kwargs)
        return convert_to_dst_type(restore(out), img, dtype=torch.float32)[0]


class LowDoseCTd(Randomizable, MapTransform):
    """Dictionary version of :class:`LowDoseCT`.

    Args:
        keys: keys of the full-dose images.
        output_keys: where to write the simulated images (default: overwrite ``keys``); when given, the
            full-dose input is kept, e.g. ``LowDoseCTd(keys="hq", output_keys="lq")``.
        allow_missing_keys: don't raise if a key is missing.
        kwargs: arguments of :class:`LowDoseCT`.
    """

    backend = LowDoseCT.backend

    def __init__(
        self,
        keys: KeysCollection,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.output_keys = ensure_tuple_rep(output_keys, len(self.keys)) if output_keys is not None else self.keys
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"output_keys must match keys in length, got {self.output_keys} for {self.keys}")
        self.simulator = LowDoseCT(**kwargs)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> LowDoseCTd:
        super().set_random_state(seed, state)
        self.simulator.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        self.simulator.randomize()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.simulator(d[key], randomize=True, name=f"key {key!r}")
        return d


class LowDosePET(Randomizable, Transform):
    """Simulate a reduced-dose PET reconstruction from an activity image (:func:`simulate_pet_pair`).

    ``mode="reconstruct"``: returns the low-dose OSEM image of ``img`` taken as the activity;
    :class:`LowDosePETd` can also write the matching full-dose one (same counts model and reconstruction),
    the consistent HQ target. ``mode="insert_noise"`` (the registry's, for a real full-dose PET given without
    its low-dose pair): returns ``img + (lq - hq)``, the input plus the difference of the two simulated
    reconstructions, i.e. the extra counting noise of the reduced dose on the input's own resolution and mean,
    as CT's ``insert_noise`` does; the input stays the HQ, and LQ and HQ differ by noise only (no blur, no bias).
    Input ``(C, H, W)`` or ``(C, H, W, D)``; every ``(H, W)`` slice is simulated (batched).
    ``pixel_size_mm=None`` reads the spacing of a :class:`~monai.data.MetaTensor` (else 2 mm). Seed with
    :meth:`set_random_state`.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        dose_fraction: float = 1.0 / 12.0,
        full_counts: float = PET_FULL_COUNTS,
        pixel_size_mm: float | None = None,
        psf_fwhm_mm: float = 4.5,
        randoms_fraction: float = 0.05,
        iterations: int = 3,
        subsets: int = 6,
        num_views: int = 180,
        post_filter_fwhm_mm: float = 0.0,
        mode: str = "reconstruct",
        count_scaling: str = "slice",
    ) -> None:
        if mode not in PET_MODES:
            raise ValueError(f"mode must be one of {PET_MODES}, got {mode!r}")
        self.mode = mode
        self.kwargs = dict(
            dose_fraction=dose_fraction,
            full_counts=full_counts,
            psf_fwhm_mm=psf_fwhm_mm,
            randoms_fraction=randoms_fraction,
            iterations=iterations,
            subsets=subsets,
            num_views=num_views,
            post_filter_fwhm_mm=post_filter_fwhm_mm,
            count_scaling=count_scaling,
        )
        if count_scaling not in PET_COUNT_SCALINGS:
            raise ValueError(f"count_scaling must be one of {PET_COUNT_SCALINGS}, got {count_scaling!r}")
        self.pixel_size_mm = pixel_size_mm
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def simulate_pair(
        self, img: NdarrayOrTensor, mu_map: NdarrayOrTensor | None = None, randomize: bool = True, name: str = "image"
    ) -> tuple[NdarrayOrTensor, NdarrayOrTensor]:
        """``(hq, lq)`` reconstructions of ``img`` (and optional attenuation map, 1/mm), same type and shape."""
        if randomize:
            self.randomize()
        tensor = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        _check_finite(tensor, name)
        if (tensor < 0).any():
            raise ValueError(f"{name}: activity must be non-negative")
        stacked, restore = _slices_of(tensor, name)
        mu_stacked = None
        if mu_map is not None:
            mu_tensor = convert_to_tensor(mu_map, track_meta=False, dtype=torch.float32)
            if mu_tensor.shape != tensor.shape:
                raise ValueError(f"{name}: attenuation map shape {tuple(mu_tensor.shape)} != {tuple(tensor.shape)}")
            mu_stacked, _ = _slices_of(mu_tensor, name)
        pixel = _pixel_size(img, self.pixel_size_mm, 2.0, name)
        hq, lq = simulate_pet_pair(stacked, mu_map=mu_stacked, pixel_size_mm=pixel, rng=self._seed, **self.kwargs)
        hq = convert_to_dst_type(restore(hq), img, dtype=torch.float32)[0]
        lq = convert_to_dst_type(restore(lq), img, dtype=torch.float32)[0]
        return hq, lq

    def pair_for_mode(
        self, img: NdarrayOrTensor, mu_map: NdarrayOrTensor | None = None, randomize: bool = True, name: str = "image"
    ) -> tuple[NdarrayOrTensor, NdarrayOrTensor]:
        """``(hq, lq)`` as this transform's ``mode`` defines them: the two reconstructions (``"reconstruct"``), or
        ``img`` itself and ``img + (lq - hq)`` (``"insert_noise"``)."""
        hq, lq = self.simulate_pair(img, mu_map=mu_map, randomize=randomize, name=name)
        if self.mode == "reconstruct":
            return hq, lq
        source = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        extra_noise = convert_to_tensor(lq, track_meta=False) - convert_to_tensor(hq, track_meta=False)
        return img, convert_to_dst_type(source + extra_noise, img, dtype=torch.float32)[0]

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        return self.pair_for_mode(img, randomize=randomize)[1]


class LowDosePETd(Randomizable, MapTransform):
    """Dictionary version of :class:`LowDosePET`, writing the low-dose and (optionally) full-dose OSEM images.

    Args:
        keys: keys of the activity images.
        output_keys: where to write the low-dose reconstructions (default: overwrite ``keys``).
        hq_output_keys: where to write the full-dose reconstructions (default: not written).
        mu_keys: keys of attenuation maps in 1/mm, one per key (default: no attenuation).
        allow_missing_keys: don't raise if a key is missing.
        kwargs: arguments of :class:`LowDosePET`.

    Example: ``LowDosePETd(keys="activity", output_keys="lq", hq_output_keys="hq")``.
    """

    backend = LowDosePET.backend

    def __init__(
        self,
        keys: KeysCollection,
        output_keys: KeysCollection | None = None,
        hq_output_keys: KeysCollection | None = None,
        mu_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        count = len(self.keys)
        self.output_keys = ensure_tuple_rep(output_keys, count) if output_keys is not None else self.keys
        self.hq_output_keys = ensure_tuple_rep(hq_output_keys, count) if hq_output_keys is not None else (None,) * count
        self.mu_keys = ensure_tuple_rep(mu_keys, count) if mu_keys is not None else (None,) * count
        for name, value in (("output_keys", self.output_keys), ("hq_output_keys", self.hq_output_keys)):
            if len(value) != count:
                raise ValueError(f"{name} must match keys in length, got {value} for {self.keys}")
        self.simulator = LowDosePET(**kwargs)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> LowDosePETd:
        super().set_random_state(seed, state)
        self.simulator.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        self.simulator.randomize()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, out_key, hq_key, mu_key in self.key_iterator(d, self.output_keys, self.hq_output_keys, self.mu_keys):
            if mu_key is not None and mu_key not in d:
                raise KeyError(f"attenuation map key {mu_key!r} (for key {key!r}) is not in the data")
            mu_map = d[mu_key] if mu_key is not None else None
            hq, lq = self.simulator.pair_for_mode(d[key], mu_map=mu_map, randomize=True, name=f"key {key!r}")
            d[out_key] = lq
            if hq_key is not None:
                d[hq_key] = hq
        return d
