"""Readers: NIfTI, DICOM series (HU), ITK formats, the authors' .bin files, and one test per bad input."""

import os
import pickle
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medir_monai.data.io import DataError, load_bin, load_image, reader_name

RNG = np.random.default_rng(0)


def write_nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def write_ct_series(folder: Path, stored: np.ndarray, slope: float, intercept: float) -> Path:
    """A tiny CT series (one file per slice along the last axis of ``stored``, rows x columns x slices)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for k in range(stored.shape[-1]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.Rows, ds.Columns = stored.shape[:2]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.0 * k]
        ds.InstanceNumber = k + 1  # MONAI stacks by InstanceNumber; the file names below are shuffled
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[..., k].astype(np.uint16)).tobytes()
        ds.save_as(folder / f"IM{(stored.shape[-1] - 1 - k):04d}.dcm", enforce_file_format=True)  # names reversed
    return folder


# ---- reading ------------------------------------------------------------------------------------------
def test_nifti_2d_and_3d(tmp_path):
    vol = RNG.normal(size=(6, 5, 4)).astype(np.float32)
    x = load_image(write_nifti(tmp_path / "v.nii.gz", vol))
    assert x.shape == (6, 5, 4) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), vol)
    s = load_image(write_nifti(tmp_path / "s.nii", vol[..., :1]))  # (H, W, 1) counts as a 2-D slice
    assert s.shape == (6, 5)
    assert reader_name(tmp_path / "v.nii.gz") == "NibabelReader"


def test_dicom_series_folder_in_hounsfield_units(tmp_path):
    stored = RNG.integers(0, 3000, size=(4, 6, 3))
    folder = write_ct_series(tmp_path / "series", stored, slope=2.0, intercept=-1024.0)
    assert reader_name(folder) == "PydicomReader"
    x = load_image(folder)
    # MONAI order (columns, rows, slices), slices stacked by InstanceNumber whatever the file names
    assert x.shape == (6, 4, 3)
    expected = np.transpose(stored * 2.0 - 1024.0, (1, 0, 2))
    np.testing.assert_allclose(x.numpy(), expected)


def test_real_ct_slice_from_wheel_in_hounsfield_units():
    # pydicom's own test file: a JPEG 2000 head CT slice (decoded by pylibjpeg-openjpeg)
    path = Path(pydicom.__file__).parent / "data" / "test_files" / "J2K_pixelrep_mismatch.dcm"
    x = load_image(path)
    assert x.shape == (512, 512)
    brain = float(x[236:276, 236:276].median())
    assert 0.0 < brain < 80.0  # brain tissue, HU
    assert float(x.max()) > 1000.0  # skull


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats(tmp_path, suffix):
    arr = RNG.normal(size=(3, 4, 5)).astype(np.float32)  # ITK array order (z, y, x)
    path = tmp_path / f"img{suffix}"
    itk.imwrite(itk.image_from_array(arr), str(path))
    assert reader_name(path) == "ITKReader"
    x = load_image(path)
    assert x.shape == (5, 4, 3)  # MONAI order (x, y, z)
    np.testing.assert_allclose(x.numpy(), np.transpose(arr, (2, 1, 0)), rtol=1e-6)


def test_bin_written_by_pickle_and_by_torch_save(tmp_path):
    t = torch.rand(1, 16, 12)
    with open(tmp_path / "authors.bin", "wb") as f:
        pickle.dump(t, f)  # how the authors wrote theirs
    torch.save(t, tmp_path / "saved.bin")
    with open(tmp_path / "numpy.bin", "wb") as f:
        pickle.dump(t.numpy().astype(np.float64), f)
    for name in ("authors.bin", "saved.bin", "numpy.bin"):
        assert torch.equal(load_bin(tmp_path / name), t), name
        x = load_image(tmp_path / name, ndim=(2,))
        assert x.shape == (16, 12)


def test_bin_refuses_code_in_pickle(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(DataError, match=r"evil\.bin: unreadable or corrupt .bin file.*refusing"):
        load_bin(tmp_path / "evil.bin")


# ---- bad input: one test per case, each message names the file and the problem --------------------------
def test_corrupt_nifti_is_named(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=r"broken\.nii\.gz: unreadable or corrupt image"):
        load_image(path)


def test_truncated_nifti_is_named(tmp_path):
    path = write_nifti(tmp_path / "cut.nii", RNG.normal(size=(32, 32, 8)).astype(np.float32))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError, match=r"cut\.nii: unreadable or corrupt image"):
        load_image(path)


def test_corrupt_dicom_is_named(tmp_path):
    path = tmp_path / "slice.dcm"
    path.write_bytes(b"\0" * 300)
    with pytest.raises(DataError, match=r"slice\.dcm: unreadable or corrupt image \(PydicomReader\)"):
        load_image(path)


def test_corrupt_bin_is_named(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"x\.bin: unreadable or corrupt \.bin file"):
        load_image(path)


@pytest.mark.parametrize("bad, word", [(np.nan, "1 NaN, 0 Inf"), (np.inf, "0 NaN, 1 Inf")])
def test_non_finite_values_are_named(tmp_path, bad, word):
    arr = np.ones((4, 4), np.float32)
    arr[1, 2] = bad
    path = write_nifti(tmp_path / "hole.nii", arr)
    with pytest.raises(DataError, match=rf"hole\.nii: image holds non-finite values \({word}"):
        load_image(path)


def test_wrong_dimensionality_is_named(tmp_path):
    path = write_nifti(tmp_path / "fmri.nii.gz", np.zeros((4, 4, 3, 2), np.float32))
    with pytest.raises(DataError, match=r"fmri\.nii\.gz: wrong dimensionality: image is 4-D .*expected 2-D or 3-D"):
        load_image(path)
    vol = write_nifti(tmp_path / "vol.nii.gz", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(DataError, match=r"vol\.nii\.gz: wrong dimensionality: image is 3-D .*expected 2-D"):
        load_image(vol, ndim=(2,))


def test_empty_folder_is_named(tmp_path):
    folder = tmp_path / "series_empty"
    folder.mkdir()
    with pytest.raises(DataError, match=r"series_empty: empty folder"):
        load_image(folder)


def test_missing_file_and_unknown_suffix_are_named(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.nii: file does not exist"):
        load_image(tmp_path / "nowhere.nii")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type"):
        load_image(tmp_path / "notes.txt")
