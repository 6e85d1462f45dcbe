"""Fuzzed inputs: real NIfTI and DICOM files from the installed wheels, mutated in a few hundred seeded ways, go
through the readers and ``medir restore``. Every case must end in one of two ways: a finite output of the input's
shape (exit status 0), or one line ``medir restore: error: ...`` with exit status 2, no traceback, nothing written
and the input untouched.

The cases are reproducible: ``MEDIR_FUZZ_SEED`` (default below) seeds every random mutation, and a failure names
the case (source file, mutation, its parameters; ``MEDIR_FUZZ_MATCH=<part of a name>`` reruns only the cases
whose name holds it, ``python tests/test_fuzz.py`` lists them). The whole set through ``medir restore`` is a slow test; the
default suite runs the readers on every case and ``medir restore`` on a seeded sample.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import REPO_ROOT
from pydicom.data import get_testdata_file

from medir_monai.cli import main
from medir_monai.data.io import DataError, load_image
from medir_monai.restore import read_scan
from medir_monai.tasks import UnknownTaskError

SEED = int(os.environ.get("MEDIR_FUZZ_SEED", "20261206"))
NIFTI_SOURCES = ("anatomical.nii", "example4d.nii.gz", "standard.nii.gz")
DICOM_SOURCES = ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm")
BYTE_MUTATIONS_PER_FILE = 24
RESTORE_SAMPLE = 40  # cases through ``medir restore`` in the default suite (all of them in the slow test)
USER_ERRORS = (DataError, ValueError, FileExistsError, FileNotFoundError, UnknownTaskError)
NIFTI_TASK = "mri_sr"  # the NIfTI sources are brain MR; a NIfTI carries no modality, so ``--task`` is given


@dataclass
class Case:
    """One mutated input: ``name`` says the source, the mutation and its parameters."""

    name: str
    write: Callable[[Path], Path]  # writes the case under a folder, returns the input path


def _nifti_source(name: str) -> Path:
    return Path(nib.__file__).parent / "tests" / "data" / name


def _raw_nifti(name: str) -> bytes:
    """The uncompressed bytes of a NIfTI source (header mutations need them unzipped)."""
    import gzip

    data = _nifti_source(name).read_bytes()
    return gzip.decompress(data) if name.endswith(".gz") else data


def _bytes_case(name: str, data: bytes, suffix: str) -> Case:
    def write(folder: Path) -> Path:
        path = folder / f"input{suffix}"
        path.write_bytes(data)
        return path

    return Case(name, write)


def _byte_mutations(label: str, data: bytes, header_end: int, suffix: str, rng: np.random.Generator) -> Iterator[Case]:
    """Truncation, flipped bytes in the header and in the pixel data, zeroed blocks, garbage appended."""
    size = len(data)
    for _ in range(BYTE_MUTATIONS_PER_FILE // 4):
        cut = int(rng.integers(0, size))
        yield _bytes_case(f"{label}: truncated at byte {cut} of {size}", data[:cut], suffix)
    for region, lo, hi in (("header", 0, header_end), ("pixel data", header_end, size)):
        for _ in range(BYTE_MUTATIONS_PER_FILE // 4):
            count = int(rng.integers(1, 9))
            where = sorted(int(i) for i in rng.integers(lo, max(lo + 1, hi), count))
            mutated = bytearray(data)
            for i in where:
                mutated[i] ^= int(rng.integers(1, 256))
            yield _bytes_case(f"{label}: {count} bytes flipped in the {region} at {where}", bytes(mutated), suffix)
    for _ in range(BYTE_MUTATIONS_PER_FILE // 8):
        start, length = int(rng.integers(0, size)), int(rng.integers(1, 512))
        mutated = bytearray(data)
        mutated[start:start + length] = bytes(len(mutated[start:start + length]))
        yield _bytes_case(f"{label}: {length} bytes zeroed at {start}", bytes(mutated), suffix)
    for _ in range(BYTE_MUTATIONS_PER_FILE // 8):
        extra = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
        yield _bytes_case(f"{label}: {len(extra)} garbage bytes appended", data + extra, suffix)


# ---- NIfTI: header fields set to wrong or absurd values ----------------------------------------------------
NIFTI_FIELDS = {  # field -> values that are wrong for it (nibabel header field names)
    "dim0": [0, 1, 5, 7, 8, -1],
    "dim1": [0, -3, 2, 30000],
    "dim3": [0, 1000],
    "datatype": [0, 1, 32, 128, 255, 1536, 2304, 1792],
    "bitpix": [0, 3, 128],
    "scl_slope": [float("nan"), float("inf"), 0.0, 1e38, -1e-38],
    "scl_inter": [float("nan"), float("inf"), 1e38],
    "pixdim1": [0.0, -1.0, float("nan"), float("inf"), 1e30, 1e-30],
    "pixdim3": [0.0, float("nan"), 1e30],
    "vox_offset": [0.0, 1e9, 100.0, -352.0],
    "sizeof_hdr": [0, 540, 347],
    "magic": [b"xxx\x00", b"ni1\x00"],
    "qform_code": [99],
    "srow_x": [[float("nan")] * 4, [0.0] * 4],
}


def _set_nifti_field(raw: bytes, field: str, value) -> bytes:
    """``raw`` with one NIfTI-1 header field overwritten at its byte offset (little or big endian as found)."""
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    offsets = {"sizeof_hdr": (0, "i"), "datatype": (70, "h"), "bitpix": (72, "h"), "vox_offset": (108, "f"),
               "scl_slope": (112, "f"), "scl_inter": (116, "f"), "qform_code": (252, "h"), "magic": (344, "4s")}
    mutated = bytearray(raw)
    if field.startswith("dim"):
        struct.pack_into(f"{endian}h", mutated, 40 + 2 * int(field[3:]), value)
    elif field.startswith("pixdim"):
        struct.pack_into(f"{endian}f", mutated, 76 + 4 * int(field[6:]), value)
    elif field == "srow_x":
        struct.pack_into(f"{endian}4f", mutated, 280, *value)
    else:
        offset, fmt = offsets[field]
        struct.pack_into(f"{endian}{fmt}", mutated, offset, value)
    return bytes(mutated)


def _nifti_value_cases(label: str, raw: bytes) -> Iterator[Case]:
    if struct.unpack("<i", raw[:4])[0] not in (348,) and struct.unpack(">i", raw[:4])[0] != 348:
        return  # NIfTI-2 source: the byte-level mutations cover it
    for field, values in NIFTI_FIELDS.items():
        for value in values:
            yield _bytes_case(f"{label}: header {field} = {value!r}", _set_nifti_field(raw, field, value), ".nii")
    img = nib.Nifti1Image.from_bytes(raw)
    data = np.asarray(img.dataobj).astype(np.float32)
    for what, values in (("NaN voxels", np.where(np.arange(data.size).reshape(data.shape) % 97 == 0, np.nan, data)),
                         ("Inf voxels", np.where(np.arange(data.size).reshape(data.shape) % 89 == 0, np.inf, data)),
                         ("a constant image", np.full_like(data, 7.0)),
                         ("values of 1e30", data * 0 + 1e30),
                         ("one voxel deep", data[..., :1]),
                         ("a 1-D image", data.reshape(-1)[:50])):
        case = nib.Nifti1Image(values, img.affine)
        yield _bytes_case(f"{label}: {what}", case.to_bytes(), ".nii")


# ---- DICOM: required tags removed, values wrong ----------------------------------------------------------
DICOM_REMOVED = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
                 "PhotometricInterpretation", "PixelData", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
                 "Modality", "ImagePositionPatient", "ImageOrientationPatient", "SOPClassUID", "NumberOfFrames")
DICOM_VALUES = {
    "Rows": [0, 1, 4096], "Columns": [0, 3], "BitsAllocated": [1, 8, 12, 32, 64], "BitsStored": [0, 40],
    "HighBit": [31], "PixelRepresentation": [1, 7], "SamplesPerPixel": [0, 3],
    "PhotometricInterpretation": ["RGB", "PALETTE COLOR", "YBR_FULL", "NOTATYPE"], "NumberOfFrames": [0, 4, -1],
    "PixelSpacing": [[0, 0], [-1, 1], [1e9, 1e9], ["nan", "nan"], [1]], "SliceThickness": ["inf", -5],
    "RescaleSlope": [0, "nan", "inf", 1e30, -1], "RescaleIntercept": ["nan", 1e30],
    "Modality": ["PT", "XX", "SEG", ""], "ImageOrientationPatient": [[0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], [1]],
    "ImagePositionPatient": [["nan", 0, 0], [1]],
}
DICOM_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.2", "1.2.3.4")


def _dicom_case(name: str, ds: pydicom.Dataset) -> Case:
    def write(folder: Path) -> Path:
        path = folder / "input.dcm"
        ds.save_as(path, enforce_file_format=False)
        return path

    return Case(name, write)


def _with_transfer_syntax(ds: pydicom.Dataset, syntax: str) -> bytes:
    """The file bytes of ``ds`` (explicit little endian) under a file meta that announces ``syntax``: pydicom
    refuses to write such a file, a damaged or hand-edited one can still be one."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    meta = pydicom.dataset.FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = syntax
    body = pydicom.Dataset(ds)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=False)
    write_dataset(fp, body)
    return fp.getvalue()


def _dicom_value_cases(label: str, source: Path) -> Iterator[Case]:
    def fresh() -> pydicom.Dataset:
        return pydicom.dcmread(source)

    for keyword in DICOM_REMOVED:
        ds = fresh()
        if keyword in ds:
            del ds[keyword]
            yield _dicom_case(f"{label}: {keyword} removed", ds)
    for keyword, values in DICOM_VALUES.items():
        for value in values:
            ds = fresh()
            try:
                setattr(ds, keyword, value)
            except (ValueError, TypeError):
                continue
            yield _dicom_case(f"{label}: {keyword} = {value!r}", ds)
    for syntax in DICOM_SYNTAXES:
        yield _bytes_case(f"{label}: transfer syntax {syntax} with uncompressed little-endian pixels",
                          _with_transfer_syntax(fresh(), syntax), ".dcm")
    ds = fresh()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    yield _dicom_case(f"{label}: half the pixel data", ds)


def _series_cases(rng: np.random.Generator) -> Iterator[Case]:
    """A three-slice CT series folder with one file mutated (the reader must name that file)."""
    source = Path(get_testdata_file("CT_small.dcm"))
    data = source.read_bytes()

    def series(mutate: Callable[[int, pydicom.Dataset], None], name: str) -> Case:
        def write(folder: Path) -> Path:
            out = folder / "series"
            out.mkdir()
            for i in range(3):
                ds = pydicom.dcmread(source)
                ds.InstanceNumber = i + 1
                ds.ImagePositionPatient = [-158.0, -179.0, -75.0 + 5.0 * i]
                ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{i + 1}"
                mutate(i, ds)
                ds.save_as(out / f"slice{i}.dcm", enforce_file_format=False)
            return out

        return Case(f"CT series: {name}", write)

    yield series(lambda i, ds: setattr(ds, "Rows", 64) if i == 1 else None, "one slice of another size")
    yield series(lambda i, ds: setattr(ds, "ImagePositionPatient", [-158.0, -179.0, -75.0]), "all at one position")
    yield series(lambda i, ds: setattr(ds, "SeriesInstanceUID", f"1.2.3.{i}"), "three series in one folder")
    yield series(lambda i, ds: setattr(ds, "PixelSpacing", [1.0, 1.0]) if i == 2 else None, "one pixel spacing differs")
    yield series(lambda i, ds: setattr(ds, "Modality", "MR") if i == 0 else None, "modalities mixed")
    yield series(lambda i, ds: ds.__delitem__("ImagePositionPatient") if i == 1 else None, "one position missing")

    def truncated(folder: Path) -> Path:
        out = series(lambda i, ds: None, "").write(folder)
        cut = int(rng.integers(0, len(data)))
        (out / "slice1.dcm").write_bytes((out / "slice1.dcm").read_bytes()[:cut])
        return out

    yield Case("CT series: one file truncated", truncated)

    def stray(folder: Path) -> Path:
        out = series(lambda i, ds: None, "").write(folder)
        (out / "notes.txt").write_text("not an image")
        (out / "empty.dcm").write_bytes(b"")
        return out

    yield Case("CT series: a text file and an empty .dcm among the slices", stray)


def fuzz_cases(seed: int = SEED) -> list[Case]:
    """Every case, in a fixed order for ``seed``."""
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    for name in NIFTI_SOURCES:
        raw = _raw_nifti(name)
        header_end = 352 if struct.unpack("<i", raw[:4])[0] in (348,) or struct.unpack(">i", raw[:4])[0] == 348 else 544
        cases += _byte_mutations(name, raw, header_end, ".nii", rng)
        cases += _nifti_value_cases(name, raw)
    for name in DICOM_SOURCES:
        source = Path(get_testdata_file(name))
        data = source.read_bytes()
        pixel_offset = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
        cases += _byte_mutations(name, data, max(pixel_offset, 132), ".dcm", rng)
        cases += _dicom_value_cases(name, source)
    cases += _series_cases(rng)
    return cases


def _read_both(path: Path) -> np.ndarray | None:
    """The deployment reader and the training reader; ``None`` when they refuse the input with a user error."""
    try:
        scan = read_scan(path)
    except USER_ERRORS:
        return None
    if not path.is_dir():
        try:
            load_image(path)
        except USER_ERRORS:
            pass
    return scan.array


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return fuzz_cases()


def _matching(cases: list[Case]) -> list[Case]:
    """``MEDIR_FUZZ_MATCH=text`` runs only the cases whose name holds ``text`` (to reproduce a failure)."""
    text = os.environ.get("MEDIR_FUZZ_MATCH")
    return [c for c in cases if text in c.name] if text else cases


def test_fuzz_case_set_is_large_and_reproducible(cases):
    assert len(cases) >= 300, len(cases)
    again = fuzz_cases()
    assert [c.name for c in again] == [c.name for c in cases]
    assert len({c.name for c in cases}) > 0.9 * len(cases)  # the mutations differ


def test_readers_never_raise_anything_but_a_clear_error(cases, tmp_path):
    """Both readers on every case: a finite array, or a user error naming the input (the ``DataError`` family)."""
    failures, refused = [], 0
    for i, case in enumerate(cases):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        path = case.write(folder)
        try:
            array = _read_both(path)
        except Exception as err:  # noqa: BLE001 - the point of the test
            failures.append(f"{case.name}: {type(err).__name__}: {err}"[:300])
            continue
        if array is None:
            refused += 1
        elif not np.isfinite(array).all():
            failures.append(f"{case.name}: read with non-finite values")
    assert not failures, f"seed {SEED}: {len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    assert 0 < refused < len(cases)  # some mutations are harmless, most are refused


def _restore_cases(cases: list[Case], tiny_bundle, tmp_path: Path, capsys) -> list[str]:
    """Run ``medir restore`` on each case; return what went wrong (empty: nothing)."""
    config, ckpt = tiny_bundle
    failures = []
    for i, case in enumerate(cases):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        path = case.write(folder)
        before = {p: p.read_bytes() for p in ([path] if path.is_file() else sorted(path.iterdir()))}
        out = tmp_path / f"out{i}"
        args = ["restore", "--bundle", str(REPO_ROOT / "bundles" / "restormer"), "--config", str(config),
                "--checkpoint", str(ckpt), "--input", str(path), "--output", str(out)]
        if path.suffix == ".nii":
            args += ["--task", NIFTI_TASK]
        capsys.readouterr()
        try:
            status = main(args)
        except BaseException as err:  # noqa: BLE001 - an escaped exception is a traceback for the user
            failures.append(f"{case.name}: escaped {type(err).__name__}: {err}"[:300])
            continue
        err_text = capsys.readouterr().err
        written = sorted(p for p in out.rglob("*")) if out.exists() else []
        changed = [str(p) for p, data in before.items() if p.read_bytes() != data]
        if changed:
            failures.append(f"{case.name}: input modified: {changed}")
        if "Traceback" in err_text:
            failures.append(f"{case.name}: traceback printed")
        if status == 2:
            lines = [line for line in err_text.splitlines() if line.startswith("medir restore: error")]
            if len(lines) != 1:
                failures.append(f"{case.name}: exit 2 with {len(lines)} error lines")
            if written:
                failures.append(f"{case.name}: exit 2 but wrote {written}")
        elif status == 0:
            files = [p for p in written if p.is_file()]
            try:
                restored = read_scan(files[0] if len(files) == 1 and path.is_file() else files[0].parent).array
                source = read_scan(path).array
            except Exception as err:  # noqa: BLE001
                failures.append(f"{case.name}: exit 0 but output unreadable: {type(err).__name__}: {err}"[:300])
                continue
            if restored.shape != source.shape or not np.isfinite(restored).all():
                failures.append(f"{case.name}: output {restored.shape} (finite: {np.isfinite(restored).all()}) "
                                f"for input {source.shape}")
        else:
            failures.append(f"{case.name}: exit status {status}")
    return failures


def test_medir_restore_on_a_sample_of_fuzzed_inputs(cases, tiny_bundle, tmp_path, capsys):
    rng = np.random.default_rng(SEED)
    sample = [cases[i] for i in sorted(rng.choice(len(cases), RESTORE_SAMPLE, replace=False))]
    failures = _restore_cases(sample, tiny_bundle, tmp_path, capsys)
    assert not failures, f"seed {SEED}:\n" + "\n".join(failures)


@pytest.mark.slow
def test_medir_restore_on_every_fuzzed_input(cases, tiny_bundle, tmp_path, capsys):
    chosen = _matching(cases)
    failures = _restore_cases(chosen, tiny_bundle, tmp_path, capsys)
    assert not failures, f"seed {SEED}: {len(failures)} of {len(chosen)} cases:\n" + "\n".join(failures)


if __name__ == "__main__":  # list the cases of a seed: python tests/test_fuzz.py [seed]
    for number, case in enumerate(fuzz_cases(int(sys.argv[1]) if len(sys.argv) > 1 else SEED)):
        print(number, case.name)
