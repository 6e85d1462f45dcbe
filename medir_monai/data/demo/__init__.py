"""The embedded demo dataset: built on any machine, with no download, from scans inside installed wheels.

Layout (the authors'): ``<dir>/<MRI|CT|PET>/<train|validation|test>/<LQ|HQ>/<name>.nii.gz``, 2-D slices in
physical units (MRI raw intensity, CT HU, PET SUV), plus ``SOURCES.md`` (provenance, what is simulated, the
parameters) and ``manifest.json`` (written last; its presence marks a complete build).

Every split holds whole **sources** (a subject, a volume or a scanner), never slices of a source that another
split holds, so validation and test figures measure restoration of scans the model has never seen
(``manifest.json`` lists the sources; :func:`demo_sources` reads them).

* **MRI** (``mri_sr``): :data:`MR_SOURCES`, nine real MR volumes / slices from the ``nilearn``, ``dipy``,
  ``nibabel``, ``pydicom`` and ``pydicom-data`` wheels (brain T1 / T2 / EPI, shoulder, abdomen, head), in
  each scanner's own raw intensities. Validation: an EPI brain; test: a T2-weighted (b0) brain. LQ: k-space
  truncation (central 1/4 per axis), the task's degradation.
* **CT** (``ct_denoise``): the real CT slices shipped in ``pydicom`` / ``pydicom-data``, in HU
  (:data:`CT_SOURCES`): head, abdomen and thorax for training, neck for validation, another head for test.
  LQ: quarter dose by projection-domain Poisson noise insertion
  (:func:`medir_monai.transforms.simulate_low_dose_ct`, ``mode="insert_noise"``). With so few real slices,
  counts come from several independent noise realisations per slice, each also stored flipped (identity,
  left-right, up-down, both): HQ images repeat, LQ noise differs.
* **PET** (``pet_synthesis``): no real PET ships in any wheel, so it is **simulated** through
  :func:`medir_monai.transforms.simulate_pet_pair` (PSF 4.5 mm FWHM, 5 % randoms, attenuation, OSEM):
  HQ = full-count reconstruction, LQ = 1/12 list-mode thinning of the same counts, same reconstruction.
  Training: an FDG-like brain from the template's grey / white matter maps (GM 8, WM 2 SUV: about 4:1,
  a 6 mm soft-tissue shell at 0.7 SUV, 2 mm pixels). Validation and test: body phantoms made from the
  neck and abdomen CT slices (tissue classes by HU, two hot lesions), an anatomy PET training never sees.

The build is seeded (deterministic), takes a few minutes on two cores, writes every file through a
temporary name and a rename (a killed build leaves no half-written file), never writes outside its
folder and refuses a folder holding anything else. :func:`ensure_demo_dataset` builds on first use.

Modules: :mod:`.sources` (the source tables, simulation parameters and file locations), :mod:`.builders` (the
slices of each task), :mod:`.provenance` (``SOURCES.md``), :mod:`.build` (build, check, lock, manifest).
"""

from .build import build_demo_dataset, code_fingerprint, demo_is_complete, demo_sources, ensure_demo_dataset
from .builders import debian_file, source_names, source_of
from .sources import (
    CT_SOURCES,
    DEMO_TASKS,
    DEMO_VERSION,
    MANIFEST_NAME,
    MR_SOURCES,
    MR_SOURCES_EXTENDED,
    MRI_INTENSITY_SCALE,
    SOURCES_NAME,
    SPLITS,
    default_demo_dir,
    extended_demo_dir,
    wheel_file,
)

__all__ = [
    "DEMO_VERSION",
    "DEMO_TASKS",
    "MANIFEST_NAME",
    "SOURCES_NAME",
    "SPLITS",
    "MRI_INTENSITY_SCALE",
    "CT_SOURCES",
    "MR_SOURCES",
    "MR_SOURCES_EXTENDED",
    "default_demo_dir",
    "extended_demo_dir",
    "debian_file",
    "demo_is_complete",
    "code_fingerprint",
    "build_demo_dataset",
    "ensure_demo_dataset",
    "demo_sources",
    "source_names",
    "source_of",
    "wheel_file",
]
