"""MONAI transforms for medical image degradation (installed as ``medir_monai.transforms``).

Imports MONAI / torch / numpy only (never ``medir_monai``): task ranges are passed in by callers.
"""

from .augment import (
    ForTasksd,
    RandDoseScaled,
    RandForTasksd,
    RandIntensityScaled,
    RandPixelSized,
    RandPixelSizedResimulated,
    ScaleToReference,
    ScaleToReferenced,
    dose_noise_factor,
)
from .kspace import KSpaceTruncate, KSpaceTruncated, central_window, kspace_mask, kspace_truncate
from .lowdose_ct import CT_FULL_DOSE_PHOTONS, MU_WATER_PER_MM, LowDoseCT, LowDoseCTd, simulate_low_dose_ct
from .lowdose_pet import PET_FULL_COUNTS, PET_REFERENCE_ACTIVITY, LowDosePET, LowDosePETd, osem, simulate_pet_pair
from .projector import FBP_FILTERS, ParallelBeamProjector, ramp_filter
from .simulation import estimate_noise_std, gaussian_blur
from .slices import ExtractSlicesd, extract_slices, select_slices

__all__ = [
    "ForTasksd",
    "RandDoseScaled",
    "RandForTasksd",
    "RandIntensityScaled",
    "RandPixelSized",
    "RandPixelSizedResimulated",
    "ScaleToReference",
    "ScaleToReferenced",
    "dose_noise_factor",
    "CT_FULL_DOSE_PHOTONS",
    "FBP_FILTERS",
    "MU_WATER_PER_MM",
    "PET_FULL_COUNTS",
    "PET_REFERENCE_ACTIVITY",
    "ExtractSlicesd",
    "KSpaceTruncate",
    "KSpaceTruncated",
    "LowDoseCT",
    "LowDoseCTd",
    "LowDosePET",
    "LowDosePETd",
    "ParallelBeamProjector",
    "central_window",
    "estimate_noise_std",
    "extract_slices",
    "gaussian_blur",
    "kspace_mask",
    "kspace_truncate",
    "osem",
    "ramp_filter",
    "select_slices",
    "simulate_low_dose_ct",
    "simulate_pet_pair",
]
