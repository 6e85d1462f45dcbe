"""The demo corpus's sources (one row per subject / volume / scanner, with its split), the simulation
parameters, and where the files are found (wheels, Debian packages)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


from ...tasks import get_task
from ..io import DataError

DEMO_VERSION = 3
"""Bumped whenever the content changes, so older builds are rebuilt."""
MANIFEST_NAME = "manifest.json"
SOURCES_NAME = "SOURCES.md"
LOCK_NAME = ".build.lock"
DEMO_SEED = 20240901

MRI_INTENSITY_SCALE = 12.0
"""Template intensities 0..255 times 12 -> 0..3060: a raw-intensity range inside IXI's [0, 4095]."""
MRI_SLICE_SIZE = (256, 256)
MRI_TEMPLATE_PLANES = (25, 135, 3)  # axial template planes used (1 mm): start, stop, step
MRI_NORMALISED_SCALE = 3000.0
"""A source stored as [0, 1] (dipy's T1 slice) is brought to raw-like units with this factor."""


@dataclass(frozen=True)
class _MRSource:
    """One MR volume (a subject / scanner): ``reader`` returns its axial slices and the in-plane spacing."""

    name: str
    distribution: str  # installed distribution (wheel) holding the file
    module: str  # importable top-level package of that wheel
    relpath: str  # path inside the package
    description: str
    split: str
    reader: str  # "template", "npy_unit", "nifti", "itk" or "dicom"
    block: int = 1  # in-plane block-mean factor (very fine grids brought nearer 256 x 256)
    debian: bool = False  # a Debian package's file (absolute relpath), for the extended corpus only
    planes: tuple[int, int, int] | None = None  # (start, stop, step) of the axial planes kept (None: all)


MR_SOURCES = (
    _MRSource("mni_t1", "nilearn", "nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
              "MNI152 2009a T1 template (average of 152 adults), brain, 1 mm", "train", "template"),
    _MRSource("dipy_t1", "dipy", "dipy", "data/files/t1_coronal_slice.npy",
              "T1 brain, coronal slice (skull-stripped), 256 x 256", "train", "npy_unit"),
    _MRSource("dipy_aniso", "dipy", "dipy", "data/files/aniso_vox.nii.gz",
              "b0 (T2-weighted) brain, 4 x 4 x 5 mm, 58 x 58", "train", "nifti"),
    _MRSource("shoulder", "pydicom-data", "data_store", "data/MR2_UNCR.dcm",
              "Philips shoulder MR, 1024 x 1024 at 0.2 mm, block-mean 4x to 256 x 256", "train", "dicom", 4),
    _MRSource("abdomen_mr", "pydicom-data", "data_store", "data/MR-SIEMENS-DICOM-WithOverlays.dcm",
              "Siemens abdomen MR, 484 x 484 at 0.72 mm, block-mean 2x", "train", "dicom", 2),
    _MRSource("emri", "pydicom-data", "data_store", "data/emri_small.dcm",
              "enhanced MR, head, 64 x 64 x 10", "train", "dicom"),
    _MRSource("mr_small", "pydicom", "pydicom", "data/test_files/MR_small.dcm",
              "Toshiba MR, 64 x 64", "train", "dicom"),
    _MRSource("nib_epi", "nibabel", "nibabel", "tests/data/example4d.nii.gz",
              "EPI (T2*-weighted) brain, 128 x 96 at 2 mm, first volume, 24 slices", "validation", "nifti"),
    _MRSource("dipy_b0", "dipy", "dipy", "data/files/S0_10slices.nii.gz",
              "b0 (T2-weighted) brain, 128 x 128 at 2 mm, 10 slices", "test", "nifti"),
)

MR_SOURCES_EXTENDED = (
    _MRSource("colin27_t1", "mricron-data", "", "/usr/share/mricron/templates/ch2.nii.gz",
              "Colin27 T1 (one adult scanned 27 times, averaged), 1 mm, axial planes every 3 mm", "train", "nifti",
              debian=True, planes=(30, 150, 3)),
    _MRSource("colin27_pd", "insighttoolkit5-examples", "",
              "/usr/share/doc/insighttoolkit5-examples/examples/Data/BrainProtonDensity3Slices.mha",
              "proton-density slices simulated on the Colin27 anatomy (ITK example data), 1 mm", "train", "itk",
              debian=True),
)
"""Training-only MR sources from Debian packages (``medir demo-data --extended``): a pip install cannot bring
them, so the default demo does not use them. Both are the Colin27 subject."""


@dataclass(frozen=True)
class _CTSource:
    name: str
    distribution: str  # installed distribution (wheel) holding the file
    module: str  # importable top-level package of that wheel
    relpath: str  # path inside the package
    region: str
    split: str


CT_SOURCES = (
    _CTSource("head693", "pydicom-data", "data_store", "data/693_UNCR.dcm", "head", "train"),
    _CTSource("abdomen", "pydicom-data", "data_store", "data/explicit_VR-UN.dcm", "abdomen (pancreas)", "train"),
    _CTSource("neck", "pydicom-data", "data_store", "data/bad_sequence.dcm", "neck (cervical spine)", "validation"),
    _CTSource("thorax", "pydicom", "pydicom", "data/test_files/CT_small.dcm", "thorax (spine), 128 x 128", "train"),
    _CTSource("head1149", "pydicom", "pydicom", "data/test_files/J2K_pixelrep_mismatch.dcm", "head", "test"),
)
CT_REALISATIONS = {"train": 10, "validation": 3, "test": 3}
CT_FLIPS = ("id", "lr", "ud", "lrud")
CT_VIEWS = 360
"""Half the transforms' default 720 views, with twice the photons per view (same total dose, same noise
level), which halves the build time."""
CT_SIM_ARGS = {**get_task("ct_denoise").degradation_args, "num_views": CT_VIEWS}  # the registry's quarter dose

PET_PIXEL_MM = 2.0
PET_SLICE_SIZE = (128, 128)
PET_SUV = {"gm": 8.0, "wm": 2.0, "csf": 0.5, "shell": 0.7}
PET_SHELL_MM = 6.0
PET_MU_PER_MM = 0.0096
PET_Z_RANGE = (10, 70)  # 2 mm planes used (template planes 20..139)
PET_HELD_OUT: dict[str, tuple[int, int]] = {}  # every brain plane trains; validation / test are body anatomy
PET_GAP = 1
PET_REALISATIONS = {"train": 2, "validation": 2, "test": 2}
PET_BATCH = 16  # slices simulated together
PET_BODY_SOURCES = {"abdomen": "train", "neck": "validation", "head1149": "test"}
"""Real CT slices (of :data:`CT_SOURCES`) turned into FDG phantoms by tissue class, and their split. A patient keeps
its CT split (the neck is validation and the head 1149 test in both tasks), so PET training holds body anatomy
(clinical PET is mostly whole-body) besides the brain, and the PET validation (neck) and test (a head without
brain-specific uptake) are regions no PET training slice shows. Not used: the head 693 (no head phantom trains)
and the 128 x 128 thorax crop (a 43-pixel body at PET resolution)."""
PET_BODY_PIXEL_MM = 2.0
PET_BODY_SUV = (  # (upper HU bound, SUV) by tissue class of the CT
    (-900.0, 0.0),  # air
    (-200.0, 0.5),  # lung
    (-20.0, 0.4),  # fat
    (150.0, 1.5),  # soft tissue
    (float("inf"), 0.8),  # bone (marrow)
)
PET_BODY_LESIONS = {"count": 2, "suv": 8.0, "radius_mm": 5.0}  # hot spots placed in soft tissue
PET_BODY_REALISATIONS = {"train": 20, "validation": 3, "test": 3}
PET_BODY_FLIPS = ("id", "lr")
PET_SIM_ARGS = {
    "dose_fraction": get_task("pet_synthesis").degradation_args["dose_fraction"],  # the registry's 1/12
    "psf_fwhm_mm": 4.5,
    "randoms_fraction": 0.05,
    "iterations": 3,
    "subsets": 6,
    "num_views": 180,
}

NILEARN_DATA = "datasets/data"
MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
SPLITS = ("train", "validation", "test")
DEMO_TASKS = ("mri_sr", "ct_denoise", "pet_synthesis")


def default_demo_dir() -> Path:
    """``$MEDIR_DEMO_DIR`` if set, else ``~/.cache/medir_monai/demo``."""
    env = os.environ.get("MEDIR_DEMO_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medir_monai" / "demo"


def extended_demo_dir() -> Path:
    """``$MEDIR_EXTENDED_DIR`` if set, else ``extended`` beside the default demo folder
    (``~/.cache/medir_monai/extended``): where the bundles' ``pretrained.json`` build and read the extended corpus."""
    env = os.environ.get("MEDIR_EXTENDED_DIR")
    return Path(env).expanduser() if env else default_demo_dir().parent / "extended"


def wheel_file(module: str, relpath: str) -> Path:
    """A data file inside an installed package (no download); a clear error if it is missing."""
    try:
        mod = __import__(module)
    except ImportError as err:
        raise DataError(f"package {module!r} is not installed; the demo data needs it (pip install it)") from err
    path = Path(mod.__file__).parent / relpath
    if not path.is_file():
        raise DataError(f"{path}: expected data file of package {module!r} is missing (reinstall the package)")
    return path


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
