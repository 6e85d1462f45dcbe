"""The embedded demo dataset: built on any machine, with no download, from scans inside installed wheels.

Layout (the authors'): ``<dir>/<MRI|CT|PET>/<train|validation|test>/<LQ|HQ>/<name>.nii.gz``, 2-D slices in
physical units (MRI raw intensity, CT HU, PET SUV), plus ``SOURCES.md`` (provenance, what is simulated, the
parameters) and ``manifest.json`` (written last; its presence marks a complete build).

* **MRI** (``mri_sr``): axial slices of the MNI152 2009a symmetric T1 template in the ``nilearn`` wheel
  (1 mm, 197 x 233 x 189, skull-stripped), zero-padded to 256 x 256 and scaled by
  :data:`MRI_INTENSITY_SCALE` (template 0..255 -> 0..3060, inside the [0, 4095] raw range of IXI).
  The contrast is T1, not IXI's T2. LQ: k-space truncation (central 1/4 per axis), the task's degradation.
  Validation and test are two separate 10-slice blocks, with 2-slice gaps to the training slices.
* **CT** (``ct_denoise``): the real 512 x 512 CT slices shipped in ``pydicom`` / ``pydicom-data``, in HU.
  Two for training (head, abdomen), one for validation (neck), one for test (head): test anatomy is never
  seen in training. LQ: quarter dose by projection-domain Poisson noise insertion
  (:func:`medir_monai.transforms.simulate_low_dose_ct`, ``mode="insert_noise"``). With four real slices,
  counts come from several independent noise realisations per slice, each also stored flipped (identity,
  left-right, up-down, both): HQ images repeat, LQ noise differs.
* **PET** (``pet_synthesis``): no real PET ships in any wheel, so it is **simulated**: an FDG-like SUV
  map from the template's grey / white matter probability maps (GM 8, WM 2 SUV: about 4:1), a 6 mm
  soft-tissue shell (skull and scalp) at 0.7 SUV, water attenuation 0.0096/mm, at 2 mm pixels
  (128 x 128) and 2 mm slices, through :func:`medir_monai.transforms.simulate_pet_pair`
  (PSF 4.5 mm FWHM, 5 % randoms, OSEM): HQ = full-count reconstruction, LQ = 1/12 list-mode thinning of
  the same counts, same reconstruction.

The build is seeded (deterministic), takes a few minutes on two cores, writes every file through a
temporary name and a rename (a killed build leaves no half-written file), never writes outside its
folder and refuses a folder holding anything else. :func:`ensure_demo_dataset` builds on first use.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import medir_monai.transforms
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
    "wheel_file",
]

DEMO_VERSION = 1
"""Bumped whenever the content changes, so older builds are rebuilt."""
MANIFEST_NAME = "manifest.json"
SOURCES_NAME = "SOURCES.md"
LOCK_NAME = ".build.lock"
DEMO_SEED = 20240901

# ---- MRI -----------------------------------------------------------------------------------------------
MRI_INTENSITY_SCALE = 12.0
"""Template intensities 0..255 times 12 -> 0..3060: a raw-intensity range inside IXI's [0, 4095]."""
MRI_SLICE_SIZE = (256, 256)
MRI_Z_RANGE = (25, 135)  # axial template planes used (1 mm), the brain's central part
MRI_HELD_OUT = {"validation": (50, 60), "test": (95, 105)}  # z blocks [start, stop)
MRI_GAP = 2  # planes dropped on each side of a held-out block

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
PET_HELD_OUT = {"validation": (22, 28), "test": (46, 52)}
PET_GAP = 1
PET_REALISATIONS = {"train": 2, "validation": 2, "test": 2}
PET_BATCH = 16  # slices simulated together
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


# ---- writing -------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_slice(path: Path, image: np.ndarray, spacing_mm: tuple[float, float], dtype) -> None:
    """Write a 2-D NIfTI slice atomically (temporary hidden name in the same folder, then rename)."""
    affine = np.diag([spacing_mm[0], spacing_mm[1], spacing_mm[0], 1.0])
    array = np.asarray(image)
    if np.issubdtype(np.dtype(dtype), np.integer):
        array = np.rint(array)
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    _atomic_write_bytes(path, img.to_bytes() if not path.name.endswith(".gz") else _gzip(img.to_bytes()))


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)  # mtime=0: byte-identical rebuilds


def _seed(*parts) -> int:
    """Stable 31-bit seed from the build seed and a name."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


def _subsample(items: list, max_slices: int | None) -> list:
    """At most ``max_slices`` items, evenly spread (small builds for tests)."""
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


def _build_mri(out: Path, max_slices: int | None, seed: int, log: Callable[[str], None]) -> dict:
    task = get_task("mri_sr")
    t1 = _mni("t1") * MRI_INTENSITY_SCALE
    degrade = KSpaceTruncate(**task.degradation_args)
    files: dict[str, list[str]] = {}
    for split, planes in _split_planes(MRI_Z_RANGE, MRI_HELD_OUT, MRI_GAP).items():
        planes = _subsample(planes, max_slices)
        hq = np.stack([_pad_to(t1[:, :, z], MRI_SLICE_SIZE) for z in planes])  # (N, 256, 256)
        lq = np.asarray(degrade(torch.from_numpy(hq)), dtype=np.float32)  # every slice on its own (C = N)
        names = []
        for z, h, l_img in zip(planes, hq, lq):
            name = f"mni_t1_z{z:03d}.nii.gz"
            _write_slice(out / task.folder / split / "HQ" / name, h, (1.0, 1.0), np.float32)
            _write_slice(out / task.folder / split / "LQ" / name, l_img, (1.0, 1.0), np.float32)
            names.append(name)
        files[split] = names
        log(f"  MRI {split}: {len(names)} slices")
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
        chosen = _subsample(plan[split], max_slices)
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
                _write_slice(out / task.folder / split / "HQ" / name, _flip(hq, flip), spacing, np.int16)
                _write_slice(out / task.folder / split / "LQ" / name, _flip(lq[r], flip), spacing, np.int16)
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


def _build_pet(out: Path, max_slices: int | None, seed: int, log: Callable[[str], None]) -> dict:
    task = get_task("pet_synthesis")
    suv, mu = _pet_phantom()
    files: dict[str, list[str]] = {}
    for split, planes in _split_planes(PET_Z_RANGE, PET_HELD_OUT, PET_GAP).items():
        jobs = _subsample([(z, r) for z in planes for r in range(PET_REALISATIONS[split])], max_slices)
        names = []
        for start in range(0, len(jobs), PET_BATCH):
            chunk = jobs[start : start + PET_BATCH]
            act = np.stack([_pad_to(suv[:, :, z], PET_SLICE_SIZE) for z, _ in chunk])  # (B, 128, 128)
            att = np.stack([_pad_to(mu[:, :, z], PET_SLICE_SIZE) for z, _ in chunk])
            hq, lq = simulate_pet_pair(
                act, mu_map=att, pixel_size_mm=PET_PIXEL_MM, rng=_seed(seed, "pet", split, *chunk[0]), **PET_SIM_ARGS
            )
            for (z, r), h, l_img in zip(chunk, np.asarray(hq), np.asarray(lq)):
                name = f"mni_fdg_z{z:03d}_r{r}.nii.gz"
                spacing = (PET_PIXEL_MM, PET_PIXEL_MM)
                _write_slice(out / task.folder / split / "HQ" / name, h, spacing, np.float32)
                _write_slice(out / task.folder / split / "LQ" / name, l_img, spacing, np.float32)
                names.append(name)
        files[split] = names
        log(f"  PET {split}: {len(names)} slices")
    return files


_BUILDERS = {"mri_sr": _build_mri, "ct_denoise": _build_ct, "pet_synthesis": _build_pet}


def _pet_full_counts() -> float:
    return float(PET_SIM_ARGS.get("full_counts", PET_FULL_COUNTS))


# ---- provenance ----------------------------------------------------------------------------------------
def _sources_markdown(counts: dict, seed: int, max_slices: int | None) -> str:
    nilearn_v, pydicom_v, pdd_v = _version("nilearn"), _version("pydicom"), _version("pydicom-data")
    ct_rows = "\n".join(
        f"| {s.name} | `{s.distribution}` {_version(s.distribution)} | `{s.module}/{s.relpath}` "
        f"| {s.region} | {s.split} |"
        for s in CT_SOURCES
    )
    table = "\n".join(
        f"| {task} | " + " | ".join(str(len(counts[task].get(split, []))) for split in SPLITS) + " |"
        for task in counts
    )
    return f"""# medir-monai demo dataset: sources

Built by `medir demo-data` (medir_monai.data.demo, format version {DEMO_VERSION}, seed {seed}, max_slices
{max_slices}). Nothing was downloaded: every scan comes from a file inside an installed Python wheel.
Layout: `<TASK>/<split>/<LQ|HQ>/<name>.nii.gz`, 2-D slices in physical units. **For software testing and
demonstration only; not for clinical use, and not comparable with the papers' numbers.**

| task | train | validation | test |
|---|---|---|---|
{table}

## MRI (`MRI/`, task `mri_sr`): real template, simulated degradation
- Source: MNI ICBM152 2009a symmetric T1 template (non-linear average of 152 adults, skull-stripped,
  1 mm, 197 x 233 x 189), file `nilearn/{NILEARN_DATA}/{MNI_FILES["t1"]}` of the `nilearn` wheel
  {nilearn_v} (BSD-3-Clause). Template: (c) McConnell Brain Imaging Centre, Montreal Neurological
  Institute (Fonov et al., NeuroImage 2011; Collins et al. 1999); distributed with a permissive notice
  requiring the copyright statement (see http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009);
  nilearn's own description lists the licence as "unknown".
- **Contrast is T1**, not the T2 of IXI used in the papers. One (average) brain only.
- HQ: axial planes z = {MRI_Z_RANGE[0]}..{MRI_Z_RANGE[1] - 1}, zero-padded to 256 x 256, intensities
  x {MRI_INTENSITY_SCALE} (0..255 -> 0..3060 raw units, inside the [0, 4095] range the task normalises).
- Split by plane: validation z in [{MRI_HELD_OUT["validation"][0]}, {MRI_HELD_OUT["validation"][1]}), test z in
  [{MRI_HELD_OUT["test"][0]}, {MRI_HELD_OUT["test"][1]}), training the rest minus {MRI_GAP} planes on each side
  of those blocks.
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
- Split by 2 mm plane: validation [{PET_HELD_OUT["validation"][0]}, {PET_HELD_OUT["validation"][1]}), test
  [{PET_HELD_OUT["test"][0]}, {PET_HELD_OUT["test"][1]}), training planes {PET_Z_RANGE[0]}..{PET_Z_RANGE[1] - 1}
  minus {PET_GAP} plane around those; {PET_REALISATIONS} independent count realisations per plane.
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
    out: str | os.PathLike, max_slices: int | None = None, tasks: Sequence[str] = DEMO_TASKS
) -> bool:
    """Whether ``out`` holds a complete build of this version, code, ``max_slices`` and tasks, with all files."""
    out = Path(out)
    manifest = _read_manifest(out)
    if not manifest or manifest.get("version") != DEMO_VERSION or manifest.get("max_slices") != max_slices:
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
) -> dict:
    """Build the demo dataset into ``out`` (see the module docstring); returns the manifest.

    Args:
        out: output folder (created; must be empty or an earlier demo build).
        max_slices: at most this many slices per task and split (small builds for tests).
        seed: seed of every simulation (the build is deterministic).
        verbose: print progress to stderr.
        tasks: the tasks to build (default all three; CT is the slow one).
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
            files[task] = builder(out, max_slices, seed, log)
        timings[task] = round(time.perf_counter() - t0, 1)
    _remove_stale(out, files)
    _atomic_write_bytes(out / SOURCES_NAME, _sources_markdown(files, seed, max_slices).encode())
    manifest = {
        "version": DEMO_VERSION,
        "code": code_fingerprint(),
        "seed": seed,
        "max_slices": max_slices,
        "counts": {t: {s: len(n) for s, n in splits.items()} for t, splits in files.items()},
        "files": files,
        "build_seconds": timings,
        "packages": {d: _version(d) for d in ("nilearn", "pydicom", "pydicom-data", "torch", "monai")},
    }
    _atomic_write_bytes(out / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    log(f"medir demo-data: done in {time.perf_counter() - start:.0f} s: {manifest['counts']}")
    return manifest


def ensure_demo_dataset(
    dir: str | os.PathLike | None = None,
    force: bool = False,
    max_slices: int | None = None,
    verbose: bool = False,
    tasks: Sequence[str] = DEMO_TASKS,
) -> Path:
    """The demo dataset folder, built first if missing or incomplete (or when ``force``).

    Args:
        dir: folder (default :func:`default_demo_dir`).
        force: rebuild even if a complete build exists.
        max_slices: at most this many slices per task and split.
        verbose: print build progress.
        tasks: the tasks to build (default all three).

    Returns:
        the folder, ready for :func:`medir_monai.data.scan_authors_layout`.
    """
    out = Path(dir).expanduser() if dir is not None else default_demo_dir()
    if not force and demo_is_complete(out, max_slices, tasks):
        return out
    _check_target(out)
    with _build_lock(out):
        if force or not demo_is_complete(out, max_slices, tasks):  # another process may have built it meanwhile
            build_demo_dataset(out, max_slices=max_slices, verbose=verbose, tasks=tasks)
    return out
