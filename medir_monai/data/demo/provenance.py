"""``SOURCES.md`` of a built demo folder: every source, its package and licence, its split, and what is simulated."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


from ...tasks import get_task
from . import sources
from .builders import _pet_full_counts
from .sources import (
    _version,
    CT_REALISATIONS,
    CT_SIM_ARGS,
    CT_SOURCES,
    CT_VIEWS,
    DEMO_VERSION,
    MNI_FILES,
    MR_SOURCES,
    MRI_INTENSITY_SCALE,
    MRI_NORMALISED_SCALE,
    MRI_TEMPLATE_PLANES,
    NILEARN_DATA,
    PET_BODY_FLIPS,
    PET_BODY_LESIONS,
    PET_BODY_PIXEL_MM,
    PET_BODY_REALISATIONS,
    PET_BODY_SOURCES,
    PET_BODY_SUV,
    PET_MU_PER_MM,
    PET_PIXEL_MM,
    PET_REALISATIONS,
    PET_SHELL_MM,
    PET_SIM_ARGS,
    PET_SUV,
    PET_Z_RANGE,
    SPLITS,
)


def _sources_markdown(
    counts: dict, seed: int, max_slices: int | None, extended: bool = False, splits: Sequence[str] = SPLITS
) -> str:
    nilearn_v, pydicom_v, pdd_v = _version("nilearn"), _version("pydicom"), _version("pydicom-data")
    ct_rows = "\n".join(
        f"| {s.name} | `{s.distribution}` {_version(s.distribution)} | `{s.module}/{s.relpath}` "
        f"| {s.region} | {s.split} |"
        for s in CT_SOURCES
    )
    mr_rows = "\n".join(
        (f"| {s.name} | Debian `{s.distribution}` (licence: /usr/share/doc/{s.distribution}/copyright) | `{s.relpath}` "
         if s.debian else f"| {s.name} | `{s.distribution}` {_version(s.distribution)} | `{s.module}/{s.relpath}` ")
        + f"| {s.description} | {s.split} |"
        for s in MR_SOURCES + (sources.MR_SOURCES_EXTENDED if extended else ())
    )
    dipy_v, nibabel_v = _version("dipy"), _version("nibabel")
    bounds = [-np.inf] + [u for u, _ in PET_BODY_SUV[:-1]]
    body_suv_text = ", ".join(f"{v:g} ({'HU >= ' + format(lo, 'g') if np.isfinite(lo) else 'HU'} < {u:g})".replace(" < inf", "")
                                  for lo, (u, v) in zip(bounds, PET_BODY_SUV))
    table = "\n".join(
        f"| {task} | " + " | ".join(str(len(counts[task].get(split, []))) for split in SPLITS) + " |"
        for task in counts
    )
    origin = " or, for the extended corpus, an installed Debian package" if extended else ""
    return f"""# medir-monai demo dataset: sources

Built by `medir demo-data` (medir_monai.data.demo, format version {DEMO_VERSION}, seed {seed}, max_slices
{max_slices}, splits {", ".join(splits)}). Nothing was downloaded: every scan comes from a file inside an installed Python wheel{origin}.
Layout: `<TASK>/<split>/<LQ|HQ>/<name>.nii.gz`, 2-D slices in physical units. **For software testing and
demonstration only; not for clinical use, and not comparable with the papers' numbers.**

| task | train | validation | test |
|---|---|---|---|
{table}

## MRI (`MRI/`, task `mri_sr`): real scans, simulated degradation
Every row is one source (a subject / volume / scanner) and goes to exactly one split.

| name | wheel | file | what | split |
|---|---|---|---|---|
{mr_rows}

- Intensities are each scanner's own raw values (DICOM rescale applied, negatives clipped to 0), so the
  set spans raw scales from a few hundred to 4095; exceptions: the MNI template, x {MRI_INTENSITY_SCALE}
  (0..255 -> 0..3060), and dipy's T1 slice, stored in [0, 1], x {MRI_NORMALISED_SCALE:g}.
  Axial template planes {MRI_TEMPLATE_PLANES[0]}..{MRI_TEMPLATE_PLANES[1] - 1} every {MRI_TEMPLATE_PLANES[2]} mm,
  zero-padded to 256 x 256; other sources keep their grid (after the stated block mean).
- Licences: nilearn {nilearn_v} (BSD-3-Clause; the MNI ICBM152 2009a template: (c) McConnell Brain
  Imaging Centre, Montreal Neurological Institute, Fonov et al. 2011, permissive notice requiring the
  copyright statement), dipy {dipy_v} (BSD-3-Clause, its test data), nibabel {nibabel_v} (MIT, its test
  data), pydicom {pydicom_v} and pydicom-data {pdd_v} (MIT, de-identified public test files).
- Contrasts: T1 (template, dipy T1), T2-weighted b0 (dipy), T2*-weighted EPI (nibabel), clinical
  musculoskeletal and abdominal sequences (pydicom-data); the papers' IXI T2 is not among them.
- LQ (simulated): `medir_monai.transforms.KSpaceTruncate({get_task("mri_sr").degradation_args})`: 2-D FFT,
  keep the central 1/4 of each axis (6.25 % of k-space), zero-fill, inverse FFT, magnitude.

## CT (`CT/`, task `ct_denoise`): real slices, simulated quarter dose
| name | wheel | file | region | split |
|---|---|---|---|---|
{ct_rows}

- pydicom {pydicom_v} (MIT) and pydicom-data {pdd_v} (MIT) test files; they are de-identified public
  images (pydicom's `test_files/README.txt`: `explicit_VR-UN.dcm` from The Cancer Imaging Archive;
  `693_*.dcm` from pydicom issue 693, `bad_sequence.dcm` from issue 1067, `J2K_pixelrep_mismatch.dcm`
  from issue 1149). Compressed ones are decoded by pylibjpeg (JPEG 2000 / JPEG lossless).
- HQ: the slice in HU (RescaleSlope / RescaleIntercept applied), clipped to [-1024, 3071] HU (the
  -2000 / -3024 outside the scan circle become air), stored as int16 with the DICOM pixel spacing.
- LQ (simulated): `medir_monai.transforms.simulate_low_dose_ct(**{CT_SIM_ARGS})` with the slice's
  pixel size and {720 // CT_VIEWS}x the default photons per view ({CT_VIEWS} instead of 720 views: same total
  dose and noise level, half the build time): parallel-beam projection, Poisson noise at a quarter of
  the full-dose photon count, the noise reconstructed by FBP (Ram-Lak) and added to the HQ image. The
  HQ slice is itself a clinical (full-dose) image with its own noise; where that noise (estimated per slice)
  is above the calibrated full dose's, the added noise is raised to 3x its variance (`match_input_noise`:
  a quarter of the scan's own dose, so the LQ is never quieter relative to its HQ than a real quarter dose).
- Counts: per slice, {CT_REALISATIONS} independent noise realisations (train / validation / test),
  each stored 4 times: as is, flipped left-right, up-down, and both (LQ and HQ flipped together). HQ
  images therefore repeat. Test and validation slices are other patients / regions than the training ones.

## PET (`PET/`, task `pet_synthesis`): fully simulated
- **No real PET data ships in any wheel; this PET is simulated** from the MNI152 2009a grey / white
  matter probability maps (`nilearn/{NILEARN_DATA}/{MNI_FILES["gm"]}`, `{MNI_FILES["wm"]}`).
- Activity (FDG-like, SUV): {PET_SUV["gm"]} x p(GM) + {PET_SUV["wm"]} x p(WM) + {PET_SUV["csf"]} x (rest of
  the brain mask) + {PET_SUV["shell"]} in a {PET_SHELL_MM:g} mm shell around the brain (skull / scalp);
  GM:WM = {PET_SUV["gm"] / PET_SUV["wm"]:g}:1.
  Attenuation: {PET_MU_PER_MM}/mm (water at 511 keV) inside brain and shell. Resampled to 2 mm voxels
  (2 x 2 x 2 mean), slices padded to 128 x 128.
- `medir_monai.transforms.simulate_pet_pair(pixel_size_mm={PET_PIXEL_MM}, **{PET_SIM_ARGS})` (full-dose
  count level: the transforms' default `full_counts`, {_pet_full_counts():.3g} expected prompts per slice): PSF blur,
  projection, attenuation, Poisson prompts with uniform randoms at the full count level; LQ = binomial
  thinning of the same prompts to 1/12 (list-mode decimation); both reconstructed by the same OSEM with
  attenuation, randoms and PSF modelling. HQ = full-count OSEM, LQ = 1/12-count OSEM, both in SUV.
- Training: brain planes {PET_Z_RANGE[0]}..{PET_Z_RANGE[1] - 1} (2 mm), {PET_REALISATIONS["train"]} independent
  count realisations per plane.
- **Body anatomy from real CT slices** (CT table below; a patient keeps its CT split):
  {", ".join(f"{n} ({sp})" for n, sp in PET_BODY_SOURCES.items())}, turned into FDG-like maps by tissue class: SUV {body_suv_text}, plus
  {PET_BODY_LESIONS["count"]} hot spots of SUV {PET_BODY_LESIONS["suv"]:g} (radius {PET_BODY_LESIONS["radius_mm"]:g} mm)
  in soft tissue; attenuation {PET_MU_PER_MM}/mm x (1 + HU/1000); block-averaged to about
  {PET_BODY_PIXEL_MM:g} mm pixels; {PET_BODY_REALISATIONS} count realisations (train / validation / test) x flips
  {PET_BODY_FLIPS}, same simulation as above. **The validation (neck) and test (a head without brain-specific
  uptake) regions are never in PET training**, which holds the brain and the abdomen phantom.
"""
