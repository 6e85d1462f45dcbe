"""Building the demo slices of each task from its sources: MRI (real, k-space truncated), CT (real, quarter dose
by sinogram noise insertion) and PET (simulated from anatomy); and reading which sources a built folder holds."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.pixels
import torch

from medir_monai.transforms import (
    CT_FULL_DOSE_PHOTONS,
    PET_FULL_COUNTS,
    KSpaceTruncate,
    simulate_low_dose_ct,
    simulate_pet_pair,
)

from ...tasks import get_task
from ..io import DataError, load_image, write_nifti_slice
from . import sources
from .sources import (
    _CTSource,
    _MRSource,
    CT_FLIPS,
    CT_REALISATIONS,
    CT_SIM_ARGS,
    CT_SOURCES,
    CT_VIEWS,
    MNI_FILES,
    MR_SOURCES,
    MRI_INTENSITY_SCALE,
    MRI_NORMALISED_SCALE,
    MRI_SLICE_SIZE,
    MRI_TEMPLATE_PLANES,
    NILEARN_DATA,
    PET_BATCH,
    PET_BODY_FLIPS,
    PET_BODY_LESIONS,
    PET_BODY_PIXEL_MM,
    PET_BODY_REALISATIONS,
    PET_BODY_SOURCES,
    PET_BODY_SUV,
    PET_GAP,
    PET_HELD_OUT,
    PET_MU_PER_MM,
    PET_PIXEL_MM,
    PET_REALISATIONS,
    PET_SHELL_MM,
    PET_SIM_ARGS,
    PET_SLICE_SIZE,
    PET_SUV,
    PET_Z_RANGE,
    SPLITS,
    wheel_file,
)


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


def _build_mri(
    out: Path, max_slices: int | None, seed: int, log: Callable[[str], None], splits: Sequence[str] = SPLITS,
    extended: bool = False,
) -> dict:
    task = get_task("mri_sr")
    degrade = KSpaceTruncate(**task.degradation_args)
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    for source in MR_SOURCES + (sources.MR_SOURCES_EXTENDED if extended else ()):
        if source.split not in splits:
            continue
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
    for split in splits:
        log(f"  MRI {split}: {len(files[split])} slices")
    return files


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


def _build_ct(
    out: Path, max_slices: int | None, seed: int, log: Callable[[str], None], splits: Sequence[str] = SPLITS
) -> dict:
    task = get_task("ct_denoise")
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    plan: dict[str, list[tuple[_CTSource, int, str]]] = {split: [] for split in SPLITS}
    for source in CT_SOURCES:
        for r in range(CT_REALISATIONS[source.split]):
            for flip in CT_FLIPS:
                plan[source.split].append((source, r, flip))
    for split in splits:
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


def _build_pet(
    out: Path, max_slices: int | None, seed: int, log: Callable[[str], None], splits: Sequence[str] = SPLITS
) -> dict:
    suv, mu = _pet_phantom()
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    for split, planes in _split_planes(PET_Z_RANGE, PET_HELD_OUT, PET_GAP).items():
        if split not in splits:
            continue
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
        if split not in splits:
            continue
        body_suv, body_mu, pixel = _body_phantom(by_name[name], seed)
        realisations = range(PET_BODY_REALISATIONS[split])
        jobs = _subsample([(r, f) for r in realisations for f in PET_BODY_FLIPS], max_slices)
        act = np.stack([_flip(body_suv, f) for _, f in jobs])
        att = np.stack([_flip(body_mu, f) for _, f in jobs])
        hq, lq = simulate_pet_pair(act, mu_map=att, pixel_size_mm=pixel, rng=_seed(seed, "pet-body", name), **PET_SIM_ARGS)
        names = [f"{name}_body_r{r}_{f}.nii.gz" for r, f in jobs]
        files[split] += _write_pet_pairs(out, split, names, hq, lq, pixel)
    for split in splits:
        log(f"  PET {split}: {len(files[split])} slices")
    return files


_BUILDERS = {"mri_sr": _build_mri, "ct_denoise": _build_ct, "pet_synthesis": _build_pet}


def source_names(task: str) -> list[str]:
    """The demo's sources (subject / volume / scanner) of a task; every file name starts with ``<source>_``."""
    task = get_task(task).name
    if task == "mri_sr":
        return [s.name for s in MR_SOURCES + sources.MR_SOURCES_EXTENDED]
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


def _pet_full_counts() -> float:
    return float(PET_SIM_ARGS.get("full_counts", PET_FULL_COUNTS))
