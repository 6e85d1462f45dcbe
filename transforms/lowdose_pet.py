"""Low-dose PET simulation (the LQ inputs of the ``pet_synthesis`` task).

:func:`simulate_pet_pair`: activity -> PSF blur -> projection with attenuation factors ->
Poisson prompts at the full count level (plus uniform randoms) -> binomial thinning with
``p = dose_fraction`` (list-mode decimation; a thinned Poisson is Poisson) -> OSEM of both count sets
with the same system model, attenuation and randoms correction, in activity units. HQ and LQ therefore
differ only by counting noise, as between the papers' full-dose and 1/12-dose FDG reconstructions.

Uses :class:`~.projector.ParallelBeamProjector` (torch, batched over slices). The transforms take
channel-first ``(C, H, W)`` or ``(C, H, W, D)`` arrays (numpy or torch, every 2-D ``(H, W)`` slice is
simulated, batched) and return the same type.
"""


from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple_rep

from .projector import ParallelBeamProjector
from .simulation import (
    SeedLike,
    as_slices,
    cached_projector,
    check_finite,
    gaussian_blur,
    pixel_size_of,
    slices_of,
    torch_generator,
)

__all__ = ["PET_FULL_COUNTS", "PET_REFERENCE_ACTIVITY", "LowDosePET", "LowDosePETd", "osem", "simulate_pet_pair"]

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
    rng: SeedLike = None,
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
    x, added = as_slices(activity, "activity")
    if (x < 0).any():
        raise ValueError("activity must be non-negative")
    if projector is None:
        projector = cached_projector(tuple(x.shape[-2:]), float(pixel_size_mm), int(num_views), False, int(subsets))
    elif projector.num_subsets != subsets:
        raise ValueError(f"projector has {projector.num_subsets} subsets, expected {subsets}")
    gen = torch_generator(rng)
    mu = None
    if mu_map is not None:
        mu, _ = as_slices(mu_map, "mu_map")
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
        check_finite(tensor, name)
        if (tensor < 0).any():
            raise ValueError(f"{name}: activity must be non-negative")
        stacked, restore = slices_of(tensor, name)
        mu_stacked = None
        if mu_map is not None:
            mu_tensor = convert_to_tensor(mu_map, track_meta=False, dtype=torch.float32)
            if mu_tensor.shape != tensor.shape:
                raise ValueError(f"{name}: attenuation map shape {tuple(mu_tensor.shape)} != {tuple(tensor.shape)}")
            mu_stacked, _ = slices_of(mu_tensor, name)
        pixel = pixel_size_of(img, self.pixel_size_mm, 2.0, name)
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

