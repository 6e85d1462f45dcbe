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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.pixels
import torch

import medir_monai.transforms
from .io import atomic_write_bytes, write_nifti_slice
from medir_monai.transforms import (
    CT_FULL_DOSE_PHOTONS,
    PET_FULL_COUNTS,
    KSpaceTruncate,
    simulate_low_dose_ct,
    simulate_pet_pair,
)

from ..tasks import get_task
from .io import DataError, load_image

__all__ = [
    "DEMO_VERSION",
    "DEMO_TASKS",
    "MANIFEST_NAME",
    "SOURCES_NAME",
    "MRI_INTENSITY_SCALE",
    "default_demo_dir",
    "demo_is_complete",
    "code_fingerprint",
    "build_demo_dataset",
    "ensure_demo_dataset",
    "demo_sources",
    "source_names",
    "source_of",
    "wheel_file",
]

DEMO_VERSION = 2
"""Bumped whenever the content changes, so older builds are rebuilt."""
MANIFEST_NAME = "manifest.json"
SOURCES_NAME = "SOURCES.md"
LOCK_NAME = ".build.lock"
DEMO_SEED = 20240901

# ---- MRI -----------------------------------------------------------------------------------------------
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

# ---- CT ------------------------------------------------------------------------------------------------


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
CT_SIM_ARGS = {"dose_fraction": 0.25, "mode": "insert_noise", "num_views": CT_VIEWS}

# ---- PET -----------------------------------------------------------------------------------------------
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
PET_BODY_SOURCES = {"neck": "validation", "abdomen": "test"}
"""Real CT slices (of :data:`CT_SOURCES`) turned into body FDG phantoms, and their split: the PET validation and
test anatomy, never in PET training."""
PET_BODY_PIXEL_MM = 2.0
PET_BODY_SUV = (  # (upper HU bound, SUV) by tissue class of the CT
    (-900.0, 0.0),  # air
    (-200.0, 0.5),  # lung
    (-20.0, 0.4),  # fat
    (150.0, 1.5),  # soft tissue
    (float("inf"), 0.8),  # bone (marrow)
)
PET_BODY_LESIONS = {"count": 2, "suv": 8.0, "radius_mm": 5.0}  # hot spots placed in soft tissue
PET_BODY_REALISATIONS = 3
PET_BODY_FLIPS = ("id", "lr")
PET_SIM_ARGS = {
    "dose_fraction": 1.0 / 12.0,
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


# ---- locations -----------------------------------------------------------------------------------------
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


def _seed(*parts) -> int:
    """Stable 31-bit seed from the build seed and a name."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


def _subsample(items: list, max_slices: int | None) -> list:
    """At most ``max_slices`` items (of one source), evenly spread (small builds for tests)."""
    if max_slices is None or len(items) <= max_slices:
        return items
    keep = np.linspace(0, len(items) - 1, max_slices).round().astype(int)
    return [items[i] for i in keep]


def _pad_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Zero-pad (centred) a 2-D array to ``size``."""
    pads = []
    for have, want in zip(image.shape, size):
        if have > want:
            raise ValueError(f"slice of size {image.shape} does not fit in {size}")
        before = (want - have) // 2
        pads.append((before, want - have - before))
    return np.pad(image, pads)


def _split_planes(z_range, held_out, gap) -> dict[str, list[int]]:
    """Planes per split: held-out blocks for validation / test, the rest minus ``gap`` planes around them."""
    blocked = set()
    for start, stop in held_out.values():
        blocked.update(range(start - gap, stop + gap))
    planes = {"train": [z for z in range(*z_range) if z not in blocked]}
    planes.update({split: list(range(*block)) for split, block in held_out.items()})
    return planes


# ---- MRI -----------------------------------------------------------------------------------------------
def _mni(name: str) -> np.ndarray:
    """One of the MNI152 2009a volumes in the nilearn wheel, (x, y, z) RAS at 1 mm, float32."""
    return nib.load(wheel_file("nilearn", f"{NILEARN_DATA}/{MNI_FILES[name]}")).get_fdata(dtype=np.float32)


def _block_mean(image: np.ndarray, block: int) -> np.ndarray:
    """In-plane ``block`` x ``block`` mean of the last two axes (trailing rows / columns dropped)."""
    if block == 1:
        return image
    h, w = (s // block * block for s in image.shape[-2:])
    v = image[..., :h, :w]
    return v.reshape(*v.shape[:-2], h // block, block, w // block, block).mean(axis=(-3, -1))


def debian_file(package: str, path: str) -> Path:
    """A data file of a Debian package; a clear error naming the package when it is not installed."""
    found = Path(path)
    if not found.is_file():
        raise DataError(f"{found}: missing; this source of the extended corpus comes with the Debian package "
                        f"{package!r} (apt-get install {package})")
    return found


def _mr_slices(source: _MRSource) -> tuple[np.ndarray, tuple[float, float]]:
    """The source's axial slices ``(N, H, W)`` in its raw intensities (float32) and the in-plane spacing (mm)."""
    path = debian_file(source.distribution, source.relpath) if source.debian else wheel_file(source.module, source.relpath)
    slices, spacing = _read_mr(source, path)
    if source.planes is not None:
        slices = slices[slice(*source.planes)]
    return slices, spacing


def _read_mr(source: _MRSource, path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    if source.reader == "template":
        volume = _mni("t1") * MRI_INTENSITY_SCALE
        planes = range(*MRI_TEMPLATE_PLANES)
        return np.stack([_pad_to(volume[:, :, z], MRI_SLICE_SIZE) for z in planes]), (1.0, 1.0)
    if source.reader == "npy_unit":
        return (np.load(path).astype(np.float32) * MRI_NORMALISED_SCALE)[None], (1.0, 1.0)
    if source.reader == "nifti":
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        while data.ndim > 3:  # 4-D (time / diffusion): the first volume
            data = data[..., 0]
        spacing = tuple(float(z) for z in img.header.get_zooms()[:2])
        return np.moveaxis(data, -1, 0), spacing
    if source.reader == "itk":
        image = load_image(path, ndim=(2, 3))
        data = image.numpy().astype(np.float32)
        data = data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)
        return data, tuple(float(v) for v in image.pixdim[:2])
    ds = pydicom.dcmread(str(path))  # one slice or a multi-frame volume (frames first)
    data = pydicom.pixels.apply_rescale(ds.pixel_array, ds).astype(np.float32)
    data = data[None] if data.ndim == 2 else data
    pixel_spacing = ds.get("PixelSpacing") or _frame_spacing(ds)
    spacing = tuple(float(v) for v in pixel_spacing) if pixel_spacing else (1.0, 1.0)
    data = _block_mean(data, source.block)
    return data.clip(min=0.0), (spacing[0] * source.block, spacing[1] * source.block)


def _frame_spacing(ds) -> list | None:
    """PixelSpacing of an enhanced (multi-frame) DICOM, from its shared functional groups."""
    try:
        return list(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing)
    except (AttributeError, IndexError, KeyError):
        return None


def _build_mri(out: Path, max_slices: int | None, seed: int, log: Callable[[str], None], extended: bool = False) -> dict:
    task = get_task("mri_sr")
    degrade = KSpaceTruncate(**task.degradation_args)
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    for source in MR_SOURCES + (MR_SOURCES_EXTENDED if extended else ()):
        slices, spacing = _mr_slices(source)
        # a single-slice source is also stored flipped (as the CT slices are), so it is not drowned by volumes
        flips = CT_FLIPS if len(slices) == 1 else ("id",)
        keep = _subsample([(i, f) for i in range(len(slices)) for f in flips], max_slices)
        hq = np.stack([_flip(slices[i], f) for i, f in keep])  # (N, H, W)
        lq = np.asarray(degrade(torch.from_numpy(np.ascontiguousarray(hq))), dtype=np.float32)  # each slice alone
        for (index, flip), h, l_img in zip(keep, hq, lq):
            name = f"{source.name}_s{index:03d}{'' if flip == 'id' else '_' + flip}.nii.gz"
            write_nifti_slice(out / task.folder / source.split / "HQ" / name, h, spacing, np.float32)
            write_nifti_slice(out / task.folder / source.split / "LQ" / name, l_img, spacing, np.float32)
            files[source.split].append(name)
    for split in SPLITS:
        log(f"  MRI {split}: {len(files[split])} slices")
    return files


# ---- CT ------------------------------------------------------------------------------------------------
def _flip(image: np.ndarray, how: str) -> np.ndarray:
    if "lr" in how:
        image = image[:, ::-1]
    if "ud" in how:
        image = image[::-1, :]
    return np.ascontiguousarray(image)


def _load_ct(source: _CTSource) -> tuple[np.ndarray, tuple[float, float]]:
    """A real CT slice in HU (rescale slope / intercept applied by the reader), clipped to the task range."""
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)  # bad_sequence.dcm has non-conformant UIDs; the pixels are fine
    try:
        image = load_image(wheel_file(source.module, source.relpath), ndim=(2,))
    finally:
        pydicom_log.setLevel(level)
    spacing = tuple(float(s) for s in image.pixdim[:2]) if hasattr(image, "pixdim") else (1.0, 1.0)
    low, high = get_task("ct_denoise").norm_range
    # outside the scan circle the files hold -2000 / -3024 padding: air for the simulation
    return image.numpy().clip(low, high).astype(np.float32), spacing


def _build_ct(out: Path, max_slices: int | None, seed: int, log: Callable[[str], None]) -> dict:
    task = get_task("ct_denoise")
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    plan: dict[str, list[tuple[_CTSource, int, str]]] = {split: [] for split in SPLITS}
    for source in CT_SOURCES:
        for r in range(CT_REALISATIONS[source.split]):
            for flip in CT_FLIPS:
                plan[source.split].append((source, r, flip))
    for split in SPLITS:
        chosen = [job for source in CT_SOURCES for job in _subsample([j for j in plan[split] if j[0] is source], max_slices)]
        for source in CT_SOURCES:
            wanted = sorted({r for s, r, _ in chosen if s is source})
            if not wanted:
                continue
            hq, spacing = _load_ct(source)
            # all realisations of a slice in one batch (independent noise per batch element)
            noisy = simulate_low_dose_ct(
                np.repeat(hq[None], len(wanted), axis=0),
                pixel_size_mm=float(np.mean(spacing)),
                i0=CT_FULL_DOSE_PHOTONS * 720 / CT_VIEWS,
                rng=_seed(seed, "ct", source.name, *wanted),
                **CT_SIM_ARGS,
            )
            lq = dict(zip(wanted, np.asarray(noisy)))
            for s, r, flip in chosen:
                if s is not source:
                    continue
                name = f"{source.name}_r{r:02d}_{flip}.nii.gz"
                write_nifti_slice(out / task.folder / split / "HQ" / name, _flip(hq, flip), spacing, np.int16)
                write_nifti_slice(out / task.folder / split / "LQ" / name, _flip(lq[r], flip), spacing, np.int16)
                files[split].append(name)
        log(f"  CT {split}: {len(files[split])} slices")
    return files


# ---- PET -----------------------------------------------------------------------------------------------
def _downsample2(volume: np.ndarray) -> np.ndarray:
    """2 x 2 x 2 block mean (1 mm -> 2 mm voxels); a trailing odd plane is dropped."""
    x, y, z = (s // 2 * 2 for s in volume.shape)
    v = volume[:x, :y, :z]
    return v.reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))


def _pet_phantom() -> tuple[np.ndarray, np.ndarray]:
    """SUV and attenuation (1/mm) volumes at 2 mm from the template's tissue probability maps."""
    from scipy import ndimage

    gm, wm = _mni("gm") / 255.0, _mni("wm") / 255.0
    brain = _mni("t1") > 0  # the template is skull-stripped: non-zero = brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    shell_vox = int(round(PET_SHELL_MM))  # template voxels are 1 mm
    head = ndimage.binary_dilation(brain, iterations=shell_vox)
    shell = (head & ~brain).astype(np.float32)
    suv = PET_SUV["gm"] * gm + PET_SUV["wm"] * wm + PET_SUV["csf"] * csf + PET_SUV["shell"] * shell
    mu = PET_MU_PER_MM * head.astype(np.float32)
    return _downsample2(suv).astype(np.float32), _downsample2(mu).astype(np.float32)


def _body_phantom(source: _CTSource, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """SUV and attenuation (1/mm) maps from a real CT slice (tissue classes by HU, :data:`PET_BODY_SUV`, plus
    :data:`PET_BODY_LESIONS`), block-averaged to about :data:`PET_BODY_PIXEL_MM`; returns them and the pixel size."""
    hu, spacing = _load_ct(source)
    block = max(1, int(round(PET_BODY_PIXEL_MM / float(np.mean(spacing)))))
    suv = np.zeros_like(hu)
    lower = -np.inf
    for upper, value in PET_BODY_SUV:
        suv[(hu >= lower) & (hu < upper)] = value
        lower = upper
    pixel = float(np.mean(spacing)) * block
    rng = np.random.default_rng(_seed(seed, "pet-body", source.name))
    soft = np.argwhere((hu >= PET_BODY_SUV[2][0]) & (hu < PET_BODY_SUV[3][0]))
    yy, xx = np.mgrid[: hu.shape[0], : hu.shape[1]]
    radius_px = PET_BODY_LESIONS["radius_mm"] / float(np.mean(spacing))
    for y, x in soft[rng.choice(len(soft), size=PET_BODY_LESIONS["count"], replace=False)]:
        suv[(yy - y) ** 2 + (xx - x) ** 2 <= radius_px**2] = PET_BODY_LESIONS["suv"]
    mu = PET_MU_PER_MM * np.clip(1.0 + hu / 1000.0, 0.0, None)
    suv, mu = (_block_mean(v, block).astype(np.float32) for v in (suv, mu))
    size = tuple(max(s, p) for s, p in zip(suv.shape, PET_SLICE_SIZE))
    return _pad_to(suv, size), _pad_to(mu, size), pixel


def _write_pet_pairs(out: Path, split: str, named: list[str], hq, lq, pixel_mm: float) -> list[str]:
    task = get_task("pet_synthesis")
    for name, h, l_img in zip(named, np.asarray(hq), np.asarray(lq)):
        write_nifti_slice(out / task.folder / split / "HQ" / name, h, (pixel_mm, pixel_mm), np.float32)
        write_nifti_slice(out / task.folder / split / "LQ" / name, l_img, (pixel_mm, pixel_mm), np.float32)
    return named


def _build_pet(out: Path, max_slices: int | None, seed: int, log: Callable[[str], None]) -> dict:
    suv, mu = _pet_phantom()
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    for split, planes in _split_planes(PET_Z_RANGE, PET_HELD_OUT, PET_GAP).items():
        jobs = _subsample([(z, r) for z in planes for r in range(PET_REALISATIONS[split])], max_slices)
        for start in range(0, len(jobs), PET_BATCH):
            chunk = jobs[start : start + PET_BATCH]
            act = np.stack([_pad_to(suv[:, :, z], PET_SLICE_SIZE) for z, _ in chunk])  # (B, 128, 128)
            att = np.stack([_pad_to(mu[:, :, z], PET_SLICE_SIZE) for z, _ in chunk])
            hq, lq = simulate_pet_pair(
                act, mu_map=att, pixel_size_mm=PET_PIXEL_MM, rng=_seed(seed, "pet", split, *chunk[0]), **PET_SIM_ARGS
            )
            names = [f"mni_fdg_z{z:03d}_r{r}.nii.gz" for z, r in chunk]
            files[split] += _write_pet_pairs(out, split, names, hq, lq, PET_PIXEL_MM)
    by_name = {s.name: s for s in CT_SOURCES}
    for name, split in PET_BODY_SOURCES.items():
        body_suv, body_mu, pixel = _body_phantom(by_name[name], seed)
        jobs = _subsample([(r, f) for r in range(PET_BODY_REALISATIONS) for f in PET_BODY_FLIPS], max_slices)
        act = np.stack([_flip(body_suv, f) for _, f in jobs])
        att = np.stack([_flip(body_mu, f) for _, f in jobs])
        hq, lq = simulate_pet_pair(act, mu_map=att, pixel_size_mm=pixel, rng=_seed(seed, "pet-body", name), **PET_SIM_ARGS)
        names = [f"{name}_body_r{r}_{f}.nii.gz" for r, f in jobs]
        files[split] += _write_pet_pairs(out, split, names, hq, lq, pixel)
    for split in SPLITS:
        log(f"  PET {split}: {len(files[split])} slices")
    return files


_BUILDERS = {"mri_sr": _build_mri, "ct_denoise": _build_ct, "pet_synthesis": _build_pet}


def source_names(task: str) -> list[str]:
    """The demo's sources (subject / volume / scanner) of a task; every file name starts with ``<source>_``."""
    task = get_task(task).name
    if task == "mri_sr":
        return [s.name for s in MR_SOURCES + MR_SOURCES_EXTENDED]
    if task == "ct_denoise":
        return [s.name for s in CT_SOURCES]
    return ["mni_fdg"] + [f"{name}_body" for name in PET_BODY_SOURCES]


def source_of(task: str, file_name: str) -> str:
    """The source a demo file belongs to (longest matching ``<source>_`` prefix)."""
    matches = [s for s in source_names(task) if os.path.basename(file_name).startswith(f"{s}_")]
    if not matches:
        raise DataError(f"{file_name}: not a file of the demo's {task} sources ({', '.join(source_names(task))})")
    return max(matches, key=len)


def _source_table(files: dict) -> dict:
    """``{task: {source: {"split": ..., "files": [...]}}}`` of a build (each source in exactly one split)."""
    table: dict = {}
    for task, splits in files.items():
        for split, names in splits.items():
            for name in names:
                entry = table.setdefault(task, {}).setdefault(source_of(task, name), {"split": split, "files": []})
                if entry["split"] != split:
                    raise AssertionError(f"demo source {source_of(task, name)!r} of {task} is in two splits")
                entry["files"].append(name)
    return table


def demo_sources(root: str | os.PathLike) -> list[dict]:
    """Every source of a complete demo build: ``{"task", "source", "split", "items": [{"hq", "lq", "task"}]}``
    (for leave-one-source-out experiments: ``benchmarks/generalisation.py``)."""
    root = Path(root)
    manifest = _read_manifest(root)
    if not manifest or "sources" not in manifest:
        raise DataError(f"{root}: no complete demo build of version {DEMO_VERSION} (run `medir demo-data`)")
    out = []
    for task, sources in manifest["sources"].items():
        folder = root / get_task(task).folder
        for source, entry in sources.items():
            items = [
                {"hq": str(folder / entry["split"] / "HQ" / n), "lq": str(folder / entry["split"] / "LQ" / n), "task": task}
                for n in entry["files"]
            ]
            out.append({"task": task, "source": source, "split": entry["split"], "items": items})
    return out


def _pet_full_counts() -> float:
    return float(PET_SIM_ARGS.get("full_counts", PET_FULL_COUNTS))


# ---- provenance ----------------------------------------------------------------------------------------
def _sources_markdown(counts: dict, seed: int, max_slices: int | None, extended: bool = False) -> str:
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
        for s in MR_SOURCES + (MR_SOURCES_EXTENDED if extended else ())
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
{max_slices}). Nothing was downloaded: every scan comes from a file inside an installed Python wheel{origin}.
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
  HQ slice is itself a clinical (full-dose) image with its own noise.
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
- **Validation and test: body anatomy never in PET training.** The real CT slices
  {", ".join(f"{n} ({sp})" for n, sp in PET_BODY_SOURCES.items())} (CT table below) turned into FDG-like maps by tissue class: SUV {body_suv_text}, plus
  {PET_BODY_LESIONS["count"]} hot spots of SUV {PET_BODY_LESIONS["suv"]:g} (radius {PET_BODY_LESIONS["radius_mm"]:g} mm)
  in soft tissue; attenuation {PET_MU_PER_MM}/mm x (1 + HU/1000); block-averaged to about
  {PET_BODY_PIXEL_MM:g} mm pixels; {PET_BODY_REALISATIONS} count realisations x flips {PET_BODY_FLIPS}, same
  simulation as above.
"""


# ---- build / ensure ------------------------------------------------------------------------------------
_OWN_ENTRIES = {"MRI", "CT", "PET", MANIFEST_NAME, SOURCES_NAME, LOCK_NAME}


def _check_target(out: Path) -> None:
    """Refuse to build into a folder that holds anything but a (partial) demo build."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN_ENTRIES and not p.name.startswith("."))
        if foreign:
            raise DataError(
                f"{out}: folder is not empty and does not look like a medir demo folder "
                f"(found {', '.join(foreign[:5])}); choose a new or empty folder"
            )


def code_fingerprint() -> str:
    """Hash of the code that makes the data (this module and ``medir_monai.transforms``): a build made by
    other code is rebuilt."""
    digest = hashlib.sha256()
    sources = [Path(__file__)] + sorted(Path(medir_monai.transforms.__file__).parent.glob("*.py"))
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def demo_is_complete(
    out: str | os.PathLike, max_slices: int | None = None, tasks: Sequence[str] = DEMO_TASKS, extended: bool = False
) -> bool:
    """Whether ``out`` holds a complete build of this version, code, ``max_slices``, tasks and corpus, with all files."""
    out = Path(out)
    manifest = _read_manifest(out)
    if not manifest or manifest.get("version") != DEMO_VERSION or manifest.get("max_slices") != max_slices:
        return False
    if bool(manifest.get("extended", False)) != bool(extended):
        return False
    if manifest.get("code") != code_fingerprint():
        return False
    if sorted(manifest.get("files", {})) != sorted(get_task(t).name for t in tasks):
        return False
    for task, splits in manifest.get("files", {}).items():
        folder = get_task(task).folder
        for split, names in splits.items():
            for name in names:
                if not all((out / folder / split / pair / name).is_file() for pair in ("HQ", "LQ")):
                    return False
    return True


def _remove_stale(out: Path, files: dict) -> None:
    """Delete slices of an earlier build (our own folders only) that this build did not write."""
    for task in DEMO_TASKS:
        folder = out / get_task(task).folder
        splits = files.get(task, {})
        for split in SPLITS:
            keep = set(splits.get(split, []))
            for pair in ("HQ", "LQ"):
                for path in (folder / split / pair).glob("*.nii.gz"):
                    if path.name not in keep:
                        path.unlink()


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """Exclusive lock so parallel processes (e.g. DDP ranks) do not build the same folder twice."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_NAME, "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover (Windows): no lock
            pass
        yield


def build_demo_dataset(
    out: str | os.PathLike,
    max_slices: int | None = None,
    seed: int = DEMO_SEED,
    verbose: bool = True,
    tasks: Sequence[str] = DEMO_TASKS,
    extended: bool = False,
) -> dict:
    """Build the demo dataset into ``out`` (see the module docstring); returns the manifest.

    Args:
        out: output folder (created; must be empty or an earlier demo build).
        max_slices: at most this many slices per source (small builds for tests).
        seed: seed of every simulation (the build is deterministic).
        verbose: print progress to stderr.
        tasks: the tasks to build (default all three; CT is the slow one).
        extended: also the training sources of Debian packages (:data:`MR_SOURCES_EXTENDED`; a missing package is
            named in the error).
    """
    out = Path(out).expanduser()
    _check_target(out)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None)
    if max_slices is not None and max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until the new manifest lands
    start = time.perf_counter()
    files = {}
    timings = {}
    wanted = [get_task(t).name for t in tasks]
    unknown = sorted(set(wanted) - set(DEMO_TASKS))
    if unknown or not wanted:
        raise ValueError(f"tasks must be a non-empty subset of {DEMO_TASKS}, got {list(tasks)}")
    for task in DEMO_TASKS:
        if task not in wanted:
            continue
        builder = _BUILDERS[task]
        t0 = time.perf_counter()
        log(f"medir demo-data: building {task} in {out}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            files[task] = builder(out, max_slices, seed, log, extended) if task == "mri_sr" else builder(out, max_slices, seed, log)
        timings[task] = round(time.perf_counter() - t0, 1)
    _remove_stale(out, files)
    atomic_write_bytes(out / SOURCES_NAME, _sources_markdown(files, seed, max_slices, extended).encode())
    manifest = {
        "version": DEMO_VERSION,
        "code": code_fingerprint(),
        "seed": seed,
        "max_slices": max_slices,
        "extended": bool(extended),
        "counts": {t: {s: len(n) for s, n in splits.items()} for t, splits in files.items()},
        "files": files,
        "sources": _source_table(files),
        "build_seconds": timings,
        "packages": {d: _version(d) for d in ("nilearn", "dipy", "nibabel", "pydicom", "pydicom-data", "torch", "monai")},
    }
    atomic_write_bytes(out / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    log(f"medir demo-data: done in {time.perf_counter() - start:.0f} s: {manifest['counts']}")
    return manifest


def ensure_demo_dataset(
    dir: str | os.PathLike | None = None,
    force: bool = False,
    max_slices: int | None = None,
    verbose: bool = False,
    tasks: Sequence[str] = DEMO_TASKS,
    extended: bool = False,
) -> Path:
    """The demo dataset folder, built first if missing or incomplete (or when ``force``).

    Args:
        dir: folder (default :func:`default_demo_dir`).
        force: rebuild even if a complete build exists.
        max_slices: at most this many slices per source.
        verbose: print build progress.
        tasks: the tasks to build (default all three).
        extended: also the Debian-package training sources (see :func:`build_demo_dataset`).

    Returns:
        the folder, ready for :func:`medir_monai.data.scan_authors_layout`.
    """
    out = Path(dir).expanduser() if dir is not None else default_demo_dir()
    if not force and demo_is_complete(out, max_slices, tasks, extended):
        return out
    _check_target(out)
    with _build_lock(out):
        if force or not demo_is_complete(out, max_slices, tasks, extended):  # another process may have built it meanwhile
            build_demo_dataset(out, max_slices=max_slices, verbose=verbose, tasks=tasks, extended=extended)
    return out
