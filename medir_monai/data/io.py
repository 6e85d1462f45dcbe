"""Image readers with clear errors (docs/design.md, section 3).

Everything goes through MONAI :class:`~monai.transforms.LoadImage` with an explicit reader chosen from the
file name: NIfTI -> ``NibabelReader``, DICOM (a ``.dcm`` file or a folder holding a series) ->
``PydicomReader`` (which applies ``RescaleSlope`` / ``RescaleIntercept``, so CT comes out in HU), other
ITK formats (``.nrrd``, ``.mha``, ``.mhd``, ``.nhdr``, ...) -> ``ITKReader``. The authors' training ``.bin``
files (pickled ``(1, 256, 256)`` tensors) are read by :func:`load_bin`.

Arrays come back in MONAI's index order (the file's voxel axes ``(i, j[, k])``, no channel). That is the
transpose of the SimpleITK ``(rows, columns)`` arrays the authors' scripts use; LQ and HQ are always read the
same way, so pairs stay aligned.

Every failure raises :class:`DataError` naming the file and the problem: missing or unreadable file, empty
folder, NaN / Inf values, wrong dimensionality.
"""

from __future__ import annotations

import collections
import functools
import gzip
import io
import os
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import monai.data
import torch
from monai.data import ImageReader, MetaTensor
from monai.transforms import LoadImage

from ..atomic import atomic_write_bytes

__all__ = [
    "DataError",
    "NIFTI_SUFFIXES",
    "DICOM_SUFFIXES",
    "ITK_SUFFIXES",
    "BIN_SUFFIXES",
    "IMAGE_SUFFIXES",
    "is_image_file",
    "reader_name",
    "load_bin",
    "load_image",
    "check_image",
    "atomic_write_bytes",
    "write_nifti_slice",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".img", ".img.gz", ".tif", ".tiff", ".vtk")
BIN_SUFFIXES = (".bin",)
IMAGE_SUFFIXES = NIFTI_SUFFIXES + DICOM_SUFFIXES + ITK_SUFFIXES + BIN_SUFFIXES
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class DataError(ValueError):
    """Bad input data; the message names the file (or folder) and what is wrong with it."""


def _lower_name(path: str | os.PathLike) -> str:
    return Path(path).name.lower()


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a suffix this module can read (folders are DICOM series, not files)."""
    return Path(path).is_file() and _lower_name(path).endswith(IMAGE_SUFFIXES)


def reader_name(path: str | os.PathLike) -> str:
    """Name of the MONAI reader (or ``"bin"``) for ``path``: chosen by suffix; a folder is a DICOM series.

    Raises:
        DataError: for a suffix no reader handles.
    """
    name = _lower_name(path)
    if Path(path).is_dir():
        return "PydicomReader"
    if name.endswith(NIFTI_SUFFIXES):
        return "NibabelReader"
    if name.endswith(DICOM_SUFFIXES):
        return "PydicomReader"
    if name.endswith(BIN_SUFFIXES):
        return "bin"
    if name.endswith(ITK_SUFFIXES):
        return "ITKReader"
    raise DataError(
        f"{path}: unsupported file type; expected NIfTI ({', '.join(NIFTI_SUFFIXES)}), DICOM (a .dcm file or a "
        f"series folder), an ITK format ({', '.join(ITK_SUFFIXES)}) or the authors' .bin"
    )


# ---- the authors' .bin files ------------------------------------------------------------------------------
def _storage_from_legacy_bytes(data: bytes):
    """Rebuild a tensor storage that plain ``pickle`` embedded as legacy ``torch.save`` bytes, safely."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _ndarray_reconstruct(cls, shape, dtype):
    """Empty-array constructor a pickled ndarray calls before restoring its state (only ``ndarray`` allowed)."""
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to rebuild {cls!r} (only numpy.ndarray is allowed)")
    return np.ndarray.__new__(cls, shape, dtype)


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a pickled tensor / ndarray needs; anything else is refused."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _storage_from_legacy_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _ndarray_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            msg = f"refusing to load global {module}.{name} (only tensors are allowed)"
            raise pickle.UnpicklingError(msg) from None


def load_bin(path: str | os.PathLike) -> torch.Tensor:
    """Read one of the authors' training ``.bin`` files: a pickled ``(1, H, W)`` tensor (float32 out).

    Files written by ``torch.save`` are read with ``torch.load(path, weights_only=True)``. The authors wrote
    theirs with plain ``pickle.dump``, which ``weights_only`` refuses; those are read by an unpickler that
    resolves only the tensor / ndarray rebuild functions, so a crafted file cannot run code.

    Raises:
        DataError: missing file, not a tensor pickle, or not a numeric tensor / array.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol before failing
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as torch_err:  # not a torch.save file: try the authors' plain pickle
        try:
            with open(path, "rb") as f:
                obj = _TensorOnlyUnpickler(f).load()
        except Exception as pickle_err:
            raise DataError(
                f"{path}: unreadable or corrupt .bin file (expected a pickled (1, H, W) tensor): "
                f"{type(pickle_err).__name__}: {pickle_err}"
            ) from torch_err
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if not isinstance(obj, torch.Tensor) or not (obj.is_floating_point() or obj.dtype in _INT_DTYPES):
        raise DataError(f"{path}: .bin file holds {type(obj).__name__}, expected a numeric tensor of shape (1, H, W)")
    return obj.to(torch.float32)


# ---- checks ---------------------------------------------------------------------------------------------
def _squeeze_trailing_axes(x: torch.Tensor, min_ndim: int) -> torch.Tensor:
    """Drop trailing size-1 axes down to ``min_ndim`` axes: an ``(H, W, 1)`` file is a 2-D slice."""
    while x.ndim > min_ndim and x.shape[-1] == 1:
        x = x[..., 0]
    return x


def _squeeze_extra_axes(x: torch.Tensor, max_ndim: int) -> torch.Tensor:
    """Drop size-1 axes (trailing first, then leading) while the array has more than ``max_ndim`` axes."""
    while x.ndim > max_ndim and x.shape[-1] == 1:
        x = x[..., 0]
    while x.ndim > max_ndim and x.shape[0] == 1:
        x = x[0]
    return x


def check_image(x: torch.Tensor, path: str | os.PathLike, ndim: Sequence[int] = (2, 3)) -> torch.Tensor:
    """Squeeze size-1 axes beyond ``max(ndim)`` and check dimensionality and finiteness.

    Args:
        x: spatial array (no channel axis).
        path: the file it came from (for the message).
        ndim: accepted numbers of spatial dimensions.

    Raises:
        DataError: wrong dimensionality, empty array or NaN / Inf values.
    """
    ndim = tuple(ndim)
    x = _squeeze_trailing_axes(x, min(ndim))
    x = _squeeze_extra_axes(x, max(ndim))
    if x.ndim not in ndim:
        want = " or ".join(f"{n}-D" for n in ndim)
        raise DataError(
            f"{path}: wrong dimensionality: image is {x.ndim}-D with shape {tuple(x.shape)}, expected {want}"
        )
    if x.numel() == 0:
        raise DataError(f"{path}: image is empty (shape {tuple(x.shape)})")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise DataError(f"{path}: image holds non-finite values ({n_nan} NaN, {n_inf} Inf of {x.numel()} voxels)")
    return x


def _check_folder(path: Path) -> None:
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DataError(f"{path}: empty folder (expected a DICOM series)")
    if not any(p.is_file() for p in entries):
        raise DataError(f"{path}: folder holds no files (expected a DICOM series)")


# ---- the reader -----------------------------------------------------------------------------------------
def load_image(
    path: str | os.PathLike, ndim: Sequence[int] = (2, 3), reader: str | None = None, dtype=np.float32
) -> MetaTensor:
    """Load one image (NIfTI, DICOM file or series folder, ITK format, or ``.bin``) as a spatial array.

    Args:
        path: a file, or a folder holding one DICOM series.
        ndim: accepted spatial dimensionalities (size-1 axes beyond ``max(ndim)`` are squeezed, so a
            ``(H, W, 1)`` NIfTI or a ``(1, H, W)`` ``.bin`` counts as 2-D).
        reader: MONAI reader name to force (default: chosen by :func:`reader_name`).
        dtype: output dtype.

    Returns:
        a :class:`~monai.data.MetaTensor` of shape ``(i, j)`` or ``(i, j, k)`` in physical units (CT in HU)
        with ``meta["filename_or_obj"]`` set.

    Raises:
        DataError: missing / unreadable / corrupt file, empty folder, wrong dimensionality, NaN / Inf.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if path.is_dir():
        _check_folder(path)
    reader = reader or reader_name(path)
    if reader == "bin":
        x = MetaTensor(load_bin(path).to(torch.float32 if dtype == np.float32 else torch.float64))
        x.meta["filename_or_obj"] = str(path)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = _loader(dtype)(str(path), reader=_reader(reader))
        except Exception as err:
            lines = str(err).strip().splitlines()
            msg = lines[-1] if lines else "no details"
            raise DataError(f"{path}: unreadable or corrupt image ({reader}): {type(err).__name__}: {msg}") from err
    if path.suffix.lower() in BIN_SUFFIXES and x.ndim == 3 and x.shape[0] == 1:
        x = x[0]  # (1, H, W) -> (H, W): the .bin files carry a leading channel axis
    return check_image(x, path, ndim)


@functools.lru_cache(maxsize=None)
def _loader(dtype) -> LoadImage:
    """One :class:`~monai.transforms.LoadImage` per dtype (building one registers every reader, so reuse it)."""
    return LoadImage(image_only=True, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _reader(name: str) -> ImageReader:
    """The MONAI reader instance called directly, so its own error reaches the user (no silent fallback)."""
    return getattr(monai.data, name)()


# ---- writing ---------------------------------------------------------------------------------------------
def write_nifti_slice(path: str | os.PathLike, image: np.ndarray, spacing_mm: Sequence[float], dtype=np.float32) -> None:
    """Write a 2-D slice as NIfTI (``.nii``, or gzip-compressed for ``.nii.gz``) atomically.

    The affine holds the in-plane pixel size ``spacing_mm = (sx, sy)`` (what the slice loaders read back); integer
    ``dtype`` values are rounded, not truncated. Compression uses ``mtime=0``, so rebuilds are byte-identical.
    """
    import nibabel as nib

    path = Path(path)
    sx, sy = (float(v) for v in spacing_mm)
    array = np.asarray(image)
    if np.issubdtype(np.dtype(dtype), np.integer):
        array = np.rint(array)
    img = nib.Nifti1Image(array.astype(dtype), np.diag([sx, sy, sx, 1.0]))
    img.header.set_xyzt_units("mm")
    data = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write_bytes(path, data)
