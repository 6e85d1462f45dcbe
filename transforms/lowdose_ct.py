"""Low-dose CT simulation (the LQ inputs of the ``ct_denoise`` task).

:func:`simulate_low_dose_ct`: HU -> linear attenuation -> parallel-beam sinogram -> Poisson
transmission noise at ``dose_fraction * i0`` photons per detector bin (+ optional Gaussian electronic
noise) -> ``-log`` -> filtered back-projection -> HU. The photon count is calibrated so that a quarter-dose
reconstruction of a real abdominal slice (0.86 mm pixels, 720 views, Ram-Lak) carries 17-19 HU more
noise than the full-dose input, within the +15 to +30 HU between the AAPM-Mayo 2016 full- and
quarter-dose pairs the papers use. ``match_input_noise`` (on in the task registry) inserts at least the noise of a
quarter of the input scan's own dose when the input is noisier than that calibration.

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

from .projector import FBP_FILTERS, ParallelBeamProjector
from .simulation import (
    SeedLike,
    as_slices,
    cached_projector,
    check_finite,
    estimate_noise_std,
    pixel_size_of,
    slices_of,
    torch_generator,
)

__all__ = ["CT_FULL_DOSE_PHOTONS", "MU_WATER_PER_MM", "LowDoseCT", "LowDoseCTd", "simulate_low_dose_ct"]

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
    match_input_noise: bool = False,
    body_threshold_hu: float = -500.0,
    min_counts: float = 1.0,
    rng: SeedLike = None,
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

    ``match_input_noise=True`` (``insert_noise`` only) makes the pair a reduced-dose pair of *this* scan when the
    scan is noisier than the calibrated full dose: a scan at ``dose_fraction`` of the input's own dose has
    ``1 / dose_fraction`` times the input's noise variance, so the inserted noise needs a standard deviation of at
    least ``sigma_in * sqrt(1 / dose_fraction - 1)`` (the noise-insertion rule of Yu et al., Med. Phys. 2012, that
    made the AAPM-Mayo quarter-dose data from each patient's own projections). ``sigma_in`` is estimated per slice
    with :func:`~.simulation.estimate_noise_std` over the body (2 x 2 blocks above ``body_threshold_hu``), the
    simulated noise's level is its RMS over the body (pixels above ``body_threshold_hu``); where it falls short, it
    is scaled up to the target (a Gaussian, high-count approximation of the lower photon count it stands for). A
    scan quieter than the calibration (most clinical slices; a smooth reconstruction kernel also hides its noise
    from the estimate) keeps the calibrated noise: the LQ is at ``dose_fraction`` of the calibrated dose or of the
    scan's own dose, whichever is lower. Without it, a noisy reference (e.g. a small-pixel or low-dose full-dose
    scan) gets a "low-dose" input that is quieter relative to it than any real low-dose scan, and a denoiser, which
    removes the reference's noise too, cannot beat that input in PSNR.

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
        match_input_noise: insert at least the input's own noise scaled to ``dose_fraction`` (see above).
        body_threshold_hu: HU above which the input counts as body for ``match_input_noise`` (its 2 x 2 blocks for
            the input's noise estimate, its pixels for the inserted noise's RMS).
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
    if match_input_noise and mode != "insert_noise":
        raise ValueError(
            f"match_input_noise needs mode='insert_noise' (it scales the inserted noise), got mode={mode!r}"
        )
    slices, added = as_slices(hu, "hu")
    if projector is None:
        projector = cached_projector(tuple(slices.shape[-2:]), float(pixel_size_mm), int(num_views), circle, 1)
    gen = torch_generator(rng)
    parts = [
        _ct_chunk(
            chunk, dose_fraction * i0, electronic_noise_std, mu_water, filter_name, mode, min_counts, gen, projector
        )
        for chunk in slices.split(batch_size)
    ]
    out = torch.cat(parts)
    if circle:
        out = torch.where(projector.mask, out, slices)
    if match_input_noise:
        out = _noise_at_least_the_inputs(slices, out, dose_fraction, body_threshold_hu)
    out = out[0] if added else out
    return convert_to_dst_type(out, hu, dtype=torch.float32)[0]


def _noise_at_least_the_inputs(
    slices: torch.Tensor, simulated: torch.Tensor, dose_fraction: float, body_threshold_hu: float
) -> torch.Tensor:
    """``match_input_noise`` of :func:`simulate_low_dose_ct`: per slice of ``(B, H, W)``, scale the inserted noise
    ``simulated - slices`` up to ``sigma_in * sqrt(1 / dose_fraction - 1)`` when it is below."""
    out = simulated.clone()
    for index, (reference, low_dose) in enumerate(zip(slices, simulated)):
        noise = low_dose - reference
        sigma_in = estimate_noise_std(reference, body_threshold_hu)
        body = reference > body_threshold_hu
        sigma_inserted = float(noise[body].pow(2).mean().sqrt()) if bool(body.any()) else 0.0  # known noise: its RMS
        target = sigma_in * math.sqrt(1.0 / dose_fraction - 1.0)
        if 0.0 < sigma_inserted < target:
            out[index] = reference + noise * (target / sigma_inserted)
    return out


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
    ``match_input_noise=True`` adds at least that much, measured on the input (:func:`simulate_low_dose_ct`).
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
        match_input_noise: bool = False,
        body_threshold_hu: float = -500.0,
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
            match_input_noise=match_input_noise,
            body_threshold_hu=body_threshold_hu,
        )
        self.pixel_size_mm = pixel_size_mm
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True, name: str = "image") -> NdarrayOrTensor:
        if randomize:
            self.randomize()
        tensor = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        check_finite(tensor, name)
        stacked, restore = slices_of(tensor, name)
        pixel = pixel_size_of(img, self.pixel_size_mm, 0.86, name)
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


