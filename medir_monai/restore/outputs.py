"""Where a restored scan goes: default output names, the rules that keep inputs untouched, atomic commits.

An output that equals, contains or lies inside its input is refused; an existing output needs ``overwrite``; a
result is written to a temporary file (or folder) beside its final path and renamed into place, so a failure
leaves nothing half-written, and two runs writing the same output never clobber each other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


from medir_monai.data.io import DICOM_SUFFIXES, ITK_SUFFIXES, NIFTI_SUFFIXES

from .scans import has_suffix


class OutputPathError(ValueError):
    """The output path would modify the input (equal to it, inside it, or containing it) or has a wrong type."""


class OutputExistsError(FileExistsError):
    """The output exists and ``overwrite`` was not given."""


def _full_suffix(path: Path, known: Sequence[str]) -> str:
    name = path.name.lower()
    for suffix in sorted(known, key=len, reverse=True):
        if name.endswith(suffix):
            return path.name[-len(suffix):]
    return path.suffix


def output_path_for(input_path: str | os.PathLike, output_dir: str | os.PathLike, suffix: str = "_restored") -> Path:
    """Default output path in ``output_dir`` for ``input_path``: ``a.nii.gz -> a_restored.nii.gz``,
    ``a.dcm -> a_restored.dcm``, series folder ``s -> s_restored`` (a folder)."""
    input_path = Path(input_path)
    if input_path.is_dir():
        return Path(output_dir) / f"{input_path.name}{suffix}"
    ext = _full_suffix(input_path, NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES)
    stem = input_path.name[: len(input_path.name) - len(ext)] if ext else input_path.name
    return Path(output_dir) / f"{stem}{suffix}{ext}"


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that writing ``output_path`` cannot touch ``input_path``; return the output path.

    Paths are compared after resolving symbolic links (and by inode when both exist).

    Raises:
        OutputPathError: output equal to the input, inside the input folder, or containing the input.
        OutputExistsError: the output exists and ``overwrite`` is False.
    """
    src, dst = Path(input_path).resolve(), Path(output_path).resolve()
    if src == dst or (dst.exists() and os.path.samefile(src, dst)):
        raise OutputPathError(f"{output_path}: the output is the input itself; inputs are never overwritten")
    if src in dst.parents:
        raise OutputPathError(f"{output_path}: the output lies inside the input folder {input_path}; "
                              "inputs are never modified, choose another folder")
    if dst in src.parents:
        raise OutputPathError(f"{output_path}: the output would contain (and replace) the input {input_path}")
    if (dst.exists() or Path(output_path).is_symlink()) and not overwrite:
        raise OutputExistsError(f"{output_path}: output exists; pass overwrite=True (--overwrite) to replace it")
    return Path(output_path)


def check_output_type(kind: str, output: Path) -> None:
    if kind == "nifti" and not has_suffix(output, NIFTI_SUFFIXES):
        raise OutputPathError(f"{output}: a NIfTI input is written as NIfTI; use a {' or '.join(NIFTI_SUFFIXES)} name")
    if kind == "itk" and not has_suffix(output, NIFTI_SUFFIXES + ITK_SUFFIXES):
        raise OutputPathError(f"{output}: an ITK input is written as NIfTI or an ITK format; "
                              f"use one of {', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)}")
    if kind == "dicom" and output.suffix and not has_suffix(output, DICOM_SUFFIXES):
        raise OutputPathError(f"{output}: a DICOM file is written as DICOM; use a .dcm name")
    if kind == "dicom_series" and has_suffix(output, NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES):
        raise OutputPathError(f"{output}: a DICOM series is written as a new series folder; give a folder name")
    if kind == "dicom_series" and output.is_file():
        raise OutputPathError(f"{output}: is a file; a DICOM series output is a folder")
    if kind != "dicom_series" and output.is_dir():
        raise OutputPathError(f"{output}: is a folder; this input is written as one file")
