"""Robust-training augmentations for LQ/HQ pairs: one model for many scanners, grids, doses and scales.

The papers train on one scanner per task (IXI T2, AAPM-Mayo quarter dose, one PET protocol) without
augmentation; a model trained that way learns one noise level, one pixel size and one intensity scale and
paints texture into scans that differ. These transforms vary what a scanner varies, on cached pairs, so
the (expensive) degradation physics still runs once:

* :class:`RandDoseScaled`: the dose (CT photons, PET counts). To first order the noise ``LQ - HQ`` of a
  low-dose pair is zero-mean with a variance set by the dose fraction ``d`` (``~ 1/d`` for noise inserted
  into a noise-free reference, ``~ 1/d - 1`` for thinned quanta), so the pair of another dose is
  ``HQ + s (LQ - HQ)`` (:func:`dose_noise_factor`).
* :class:`RandPixelSized`: the pixel size / grid (both images resampled by one random factor, anti-aliased,
  so a coarser grid also averages the noise as a coarser reconstruction grid does).
* :class:`RandPixelSizedResimulated`: the pixel size / grid for a degradation defined on the acquired grid (MRI
  k-space truncation keeps a fraction of *the image's* bandwidth): the HQ image is resampled and its LQ simulated
  again, so the pair stays a pair of the same problem (resampling a stored pair would make a 4x problem a 2x or
  6x one).
* :class:`RandIntensityScaled`: the raw intensity scale (MRI has no physical unit; k-space truncation is
  linear, so scaling HQ and LQ together gives a valid pair).
* :class:`ScaleToReference` / :class:`ScaleToReferenced`: per-scan normalisation, a robust percentile
  of the (LQ) image mapped to a reference value, used the same way in training and at inference.
* :class:`ForTasksd` / :class:`RandForTasksd`: apply a dictionary transform only to items of some tasks.

Imports MONAI / torch / numpy only (never ``medir_monai``), like the rest of this package.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform

__all__ = [
    "ForTasksd",
    "RandForTasksd",
    "RandDoseScaled",
    "RandIntensityScaled",
    "RandPixelSized",
    "RandPixelSizedResimulated",
    "ScaleToReference",
    "ScaleToReferenced",
    "dose_noise_factor",
]


def _range(value: Sequence[float], name: str, low: float, high: float | None = None, high_closed: bool = True):
    """``(a, b)`` with ``low < a <= b`` (and ``b <= high`` / ``b < high``); a clear error naming the option."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min, max) of numbers, got {value!r}") from None
    upper_ok = high is None or (b <= high if high_closed else b < high)
    if not (math.isfinite(a) and math.isfinite(b) and low < a <= b and upper_ok):
        bound = "" if high is None else f" and max {'<=' if high_closed else '<'} {high}"
        raise ValueError(f"{name} must satisfy {low} < min <= max{bound}, got {value!r}")
    return a, b


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


NOISE_MODELS = ("insert", "thinning")


def dose_noise_factor(
    dose_fraction: float | torch.Tensor, nominal_dose: float, noise_model: str = "insert"
) -> float | torch.Tensor:
    """Factor ``s`` scaling the noise ``LQ - HQ`` of a pair made at ``nominal_dose`` to the noise at ``dose_fraction``.

    * ``"insert"``: the HQ is the noise-free reference and the LQ noise was inserted at dose ``d`` (variance
      ``~ 1/d``; this project's :func:`~medir_monai.transforms.simulate_low_dose_ct` with ``mode="insert_noise"``):
      ``s = sqrt(d0 / d)``.
    * ``"thinning"``: LQ keeps a fraction ``d`` of the quanta of the HQ acquisition (real paired scans, PET
      list-mode thinning), so ``LQ - HQ`` has variance ``~ 1/d - 1``: ``s = sqrt((1/d - 1) / (1/d0 - 1))``
      (0 at ``d = 1``).
    """
    if not 0.0 < nominal_dose < 1.0:
        raise ValueError(f"nominal_dose must lie in (0, 1), got {nominal_dose!r}")
    if noise_model == "insert":
        return (nominal_dose / dose_fraction) ** 0.5
    if noise_model == "thinning":
        return ((1.0 / dose_fraction - 1.0) / (1.0 / nominal_dose - 1.0)) ** 0.5
    raise ValueError(f"noise_model must be one of {NOISE_MODELS}, got {noise_model!r}")


class RandDoseScaled(Randomizable, MapTransform):
    """Re-dose an LQ/HQ pair: ``LQ <- HQ + s (LQ - HQ)``, ``s`` from a dose fraction drawn log-uniformly in
    ``dose_range`` (see :func:`dose_noise_factor`). Works in physical or normalised units alike (linear).

    The draw is log-uniform because a dose is a scale: every factor of two in dose gets the same share of the
    samples. A uniform draw over a wide range such as 0.1-4.0 puts 96 % of the samples above a quarter dose, so a
    model trained with it sees almost only inputs quieter than the quarter-dose scans it is evaluated on.

    Args:
        keys: ``(lq_key, hq_key)``.
        dose_range: ``(min, max)`` dose fractions of the full dose, ``0 < min <= max`` (``max <= 1`` for
            ``"thinning"``; with ``"insert"`` a fraction above 1 means less noise than the calibrated full dose).
        nominal_dose: the dose fraction the stored LQ was made at (CT quarter dose 0.25, PET 1/12).
        noise_model: how the pair's noise relates to the dose, ``"insert"`` or ``"thinning"``
            (:func:`dose_noise_factor`).
        prob: probability of re-dosing a sample (otherwise it keeps its nominal dose).
    """

    def __init__(
        self,
        keys: KeysCollection = ("lq", "hq"),
        dose_range: Sequence[float] = (0.1, 0.5),
        nominal_dose: float = 0.25,
        noise_model: str = "insert",
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 2:
            raise ValueError(f"RandDoseScaled keys must be (lq_key, hq_key), got {self.keys!r}")
        # a thinned pair cannot go above the dose of its HQ; inserted noise can be scaled below the reference's (a
        # dose above the calibrated full dose: higher-dose protocols, thicker slices)
        self.dose_range = _range(dose_range, "dose_range", 0.0, 1.0 if noise_model == "thinning" else None)
        dose_noise_factor(self.dose_range[0], nominal_dose, noise_model)  # validates nominal_dose and noise_model
        self.nominal_dose = float(nominal_dose)
        self.noise_model = noise_model
        self.prob = _probability(prob)
        self.factor = 1.0

    def randomize(self, data: Any = None) -> None:
        apply = self.R.random_sample() < self.prob
        dose = _log_uniform(self.R, self.dose_range) if apply else self.nominal_dose
        self.factor = float(dose_noise_factor(dose, self.nominal_dose, self.noise_model))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        self.randomize()
        d = dict(data)
        lq_key, hq_key = self.keys
        lq, hq = _as_tensor(d[lq_key]), _as_tensor(d[hq_key])
        d[lq_key] = hq + self.factor * (lq - hq)
        return d


class RandIntensityScaled(Randomizable, MapTransform):
    """Multiply all ``keys`` by one factor drawn log-uniformly in ``scale_range`` (intensity-scale
    augmentation for unit-less MRI; the k-space degradation is linear so the pair stays valid).

    Args:
        keys: images scaled together (LQ and HQ).
        scale_range: ``(min, max)`` factors, ``0 < min <= max``.
        prob: probability of scaling a sample.
        clip: ``(low, high)`` to clip the results to (e.g. the model-space ``[0, 1]``); ``None``: no clipping.
    """

    def __init__(
        self,
        keys: KeysCollection = ("lq", "hq"),
        scale_range: Sequence[float] = (0.25, 1.5),
        prob: float = 1.0,
        clip: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scale_range = _range(scale_range, "scale_range", 0.0)
        self.prob = _probability(prob)
        self.clip = None if clip is None else _range(clip, "clip", -math.inf)
        self.factor = 1.0

    def randomize(self, data: Any = None) -> None:
        self.factor = _log_uniform_or_one(self.R, self.scale_range, self.prob)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        self.randomize()
        d = dict(data)
        for key in self.key_iterator(d):
            out = _as_tensor(d[key]) * self.factor
            d[key] = out.clamp(*self.clip) if self.clip is not None else out
        return d


class RandPixelSized(Randomizable, MapTransform):
    """Resample all ``keys`` (``(C, H, W)``) by one zoom factor drawn log-uniformly in ``zoom_range``:
    a factor 0.5 turns a 512 grid at 0.5 mm into a 256 grid at 1 mm, as another scanner's reconstruction
    would. Bilinear with anti-aliasing (``torch.nn.functional.interpolate(antialias=True)``), so a
    down-sampled image averages its noise instead of sub-sampling it.

    Args:
        keys: images resampled together (LQ and HQ).
        zoom_range: ``(min, max)`` zoom factors (output size / input size), ``0 < min <= max``.
        prob: probability of resampling a sample.
        min_size: smallest output side in pixels (zoom is raised to reach it).
    """

    def __init__(
        self,
        keys: KeysCollection = ("lq", "hq"),
        zoom_range: Sequence[float] = (0.5, 1.5),
        prob: float = 0.5,
        min_size: int = 16,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.zoom_range = _range(zoom_range, "zoom_range", 0.0)
        self.prob = _probability(prob)
        if int(min_size) < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size!r}")
        self.min_size = int(min_size)
        self.zoom = 1.0

    def randomize(self, data: Any = None) -> None:
        self.zoom = _log_uniform_or_one(self.R, self.zoom_range, self.prob)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        self.randomize()
        d = dict(data)
        if self.zoom == 1.0:
            return d
        for key in self.key_iterator(d):
            d[key] = _resampled(_as_tensor(d[key]), self.zoom, self.min_size, f"RandPixelSized: {key!r}")
        return d


class RandPixelSizedResimulated(RandPixelSized):
    """Resample the HQ image by a zoom factor drawn log-uniformly in ``zoom_range`` (as :class:`RandPixelSized`)
    and simulate its LQ again with ``degrade``: another grid for a degradation defined on the acquired grid.

    MRI k-space truncation keeps a quarter of the bandwidth of the image it is applied to, so a scan of another
    matrix size or field of view is a 4x problem on *its* grid; resampling a stored pair would change the factor
    instead. A sample that is not resampled (probability ``1 - prob``) keeps its stored pair unchanged.

    Args:
        degrade: the task's degradation, ``(C, H, W) -> (C, H, W)`` (e.g. :class:`~.kspace.KSpaceTruncate`).
        hq_key: the high-quality image (resampled).
        lq_key: where the simulated low-quality image is written.
        zoom_range: ``(min, max)`` zoom factors (output size / input size), ``0 < min <= max``.
        prob: probability of resampling a sample.
        min_size: smallest output side in pixels (zoom is raised to reach it).
    """

    def __init__(
        self,
        degrade: Callable[[torch.Tensor], Any],
        hq_key: str = "hq",
        lq_key: str = "lq",
        zoom_range: Sequence[float] = (0.5, 1.5),
        prob: float = 0.5,
        min_size: int = 16,
    ) -> None:
        if not callable(degrade):
            raise TypeError(f"degrade must be a callable transform, got {type(degrade).__name__}")
        super().__init__((hq_key,), zoom_range=zoom_range, prob=prob, min_size=min_size)
        self.degrade = degrade
        self.hq_key, self.lq_key = hq_key, lq_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        self.randomize()
        d = dict(data)
        if self.zoom == 1.0:
            return d
        what = f"RandPixelSizedResimulated: {self.hq_key!r}"
        hq = _resampled(_as_tensor(d[self.hq_key]), self.zoom, self.min_size, what)
        d[self.hq_key] = hq
        d[self.lq_key] = _as_tensor(self.degrade(hq)).to(hq.dtype)
        return d


def _resampled(img: torch.Tensor, zoom: float, min_size: int, what: str) -> torch.Tensor:
    """A ``(C, H, W)`` image resampled by ``zoom`` (bilinear, anti-aliased; no side below ``min_size``)."""
    if img.ndim != 3:
        raise ValueError(f"{what} must be a (C, H, W) image, got shape {tuple(img.shape)}")
    size = [max(min_size, round(s * zoom)) for s in img.shape[1:]]
    return F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]


class ScaleToReference(Transform):
    """Per-scan intensity normalisation: multiply an image so that its ``percentile`` (over pixels above
    ``floor``, i.e. the object, not the air) becomes ``reference``. The factor is kept in ``self.factor`` and
    returned by :meth:`factor_of` so a restored image can be mapped back (divide by it).

    Args:
        percentile: robust upper percentile of the object's intensities (0-100), e.g. 99.
        reference: the value it is mapped to (the training data's typical value, in the image's units).
        floor: pixels at or below it are background and ignored (0 for magnitude MRI).
        factor_range: the factor is clipped to this ``(min, max)`` (a nearly empty slice must not be
            amplified without bound).
    """

    def __init__(
        self,
        percentile: float = 99.0,
        reference: float = 2000.0,
        floor: float = 0.0,
        factor_range: Sequence[float] = (0.05, 20.0),
    ) -> None:
        if not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must lie in (0, 100], got {percentile!r}")
        if not (math.isfinite(float(reference)) and float(reference) > 0):
            raise ValueError(f"reference must be a positive number, got {reference!r}")
        self.percentile = float(percentile)
        self.reference = float(reference)
        self.floor = float(floor)
        self.factor_range = _range(factor_range, "factor_range", 0.0)
        self.factor = 1.0

    def factor_of(self, img: Any) -> float:
        """The factor that maps ``img``'s percentile to the reference (1 for an image with no object)."""
        x = _as_tensor(img).detach().float().reshape(-1)
        x = x[x > self.floor]
        if x.numel() == 0:
            return 1.0
        value = float(torch.quantile(x[:: max(1, x.numel() // 1_000_000)], self.percentile / 100.0))
        if value <= 0:
            return 1.0
        return float(np.clip(self.reference / value, *self.factor_range))

    def __call__(self, img: Any) -> torch.Tensor:
        self.factor = self.factor_of(img)
        return _as_tensor(img) * self.factor


class ScaleToReferenced(MapTransform):
    """Dictionary form of :class:`ScaleToReference`: the factor is measured on ``ref_key`` (the LQ image,
    the one available at inference) and applied to every key; it is stored under ``factor_key``.

    Args:
        keys: images to scale (LQ and HQ).
        ref_key: image whose percentile sets the factor.
        factor_key: where the factor is stored (``None``: not stored).
        kwargs: :class:`ScaleToReference` arguments.
    """

    def __init__(
        self,
        keys: KeysCollection = ("lq", "hq"),
        ref_key: str = "lq",
        factor_key: str | None = "intensity_factor",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = ScaleToReference(**kwargs)
        self.ref_key = ref_key
        self.factor_key = factor_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        factor = self.scaler.factor_of(d[self.ref_key])
        for key in self.key_iterator(d):
            d[key] = _as_tensor(d[key]) * factor
        if self.factor_key is not None:
            d[self.factor_key] = factor
        return d


class ForTasksd(Transform):
    """Apply ``transform`` only to items whose ``task_key`` value is one of ``tasks`` (others pass through).

    Lets one pipeline carry per-task steps (MRI per-scan normalisation, CT dose, MRI scale) in a bundle
    config. For a random ``transform`` use :class:`RandForTasksd`, so that MONAI's caching datasets stop caching
    before it and its random state follows ``set_random_state``.

    Args:
        transform: a dictionary transform.
        tasks: task names it applies to.
        task_key: the item key holding the task name.
    """

    def __init__(self, transform: Any, tasks: Sequence[str], task_key: str = "task_name") -> None:
        if not callable(transform):
            raise ValueError(f"transform must be callable, got {transform!r}")
        if isinstance(tasks, str) or not tasks:
            raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
        self.transform = transform
        self.tasks = frozenset(str(t) for t in tasks)
        self.task_key = task_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        if str(data.get(self.task_key)) not in self.tasks:
            return data
        return self.transform(data)


class RandForTasksd(Randomizable, ForTasksd):
    """:class:`ForTasksd` for a random ``transform`` (the robust-training augmentations)."""

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandForTasksd:
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:  # the wrapped transform draws its own numbers
        pass


def _log_uniform_or_one(rng: np.random.RandomState, value_range: tuple[float, float], prob: float) -> float:
    """A factor drawn log-uniformly in ``value_range`` with probability ``prob``, else 1 (always two draws of ``rng``
    when applied, one when not, so seeded sequences stay reproducible)."""
    if rng.random_sample() >= prob:
        return 1.0
    return _log_uniform(rng, value_range)


def _log_uniform(rng: np.random.RandomState, value_range: tuple[float, float]) -> float:
    """A value drawn log-uniformly in ``value_range`` (one draw of ``rng``): each factor of two gets the same share."""
    low, high = value_range
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _probability(prob: float) -> float:
    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"prob must lie in [0, 1], got {prob!r}")
    return float(prob)
