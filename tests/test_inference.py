"""Whole-scan restoration: sliding window, task resolution, NIfTI / DICOM I/O, safety rules."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import LoadImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage, generate_uid

from medir_monai import restore as inf
from medir_monai.data.io import DataError
from medir_monai.networks.restormer import Restormer
from medir_monai.tasks import get_task, task_names

torch.set_num_threads(1)
CT = get_task("ct_denoise")
PET = get_task("pet_synthesis")


# ---- tiny "networks" ---------------------------------------------------------------------------------------
class AddConstant(torch.nn.Module):
    """Adds ``c`` in model space: the output is the input plus ``c * (high - low)`` physical units."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x):
        return x + self.c


class SliceMax(torch.nn.Module):
    """Replaces every pixel by its window's maximum: depends on which axis is the slice axis (zero padding of a
    window larger than the slice cannot change the maximum of non-negative model-space values)."""

    def forward(self, x):
        return x.amax(dim=(-2, -1), keepdim=True).expand_as(x)


def pointwise_conv(seed: int = 0) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(1, 1, kernel_size=1)
    with torch.no_grad():
        conv.weight.fill_(0.8)
        conv.bias.fill_(0.05)
    return conv.eval()


def tiny_restormer() -> Restormer:
    torch.manual_seed(0)
    return Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 1, 1, 1)).eval()


def whole_image(network, x: np.ndarray, task) -> np.ndarray:
    """Reference: the whole slice through the network at once (no windows)."""
    with torch.no_grad():
        y = network(task.normalise(torch.from_numpy(x))[None, None])[0, 0].clamp(0, 1)
    return task.denormalise(y).numpy()


# ---- file builders -------------------------------------------------------------------------------------------
def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None, dtype=np.float32) -> Path:
    if affine is None:  # axes swapped and flipped, anisotropic: a geometry worth keeping
        affine = np.array([[0.0, -0.8, 0, 12.0], [0.9, 0, 0, -30.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.header.set_qform(affine, code=1)
    img.to_filename(str(path))
    return path


def _series_base(modality: str, sop_class: str, study_uid: str, series_uid: str, k: int, size: tuple[int, int]):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Test^Patient", "P-0042", "19700101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.SeriesDate, ds.SeriesTime = "20240102", "20240102", "110000"
    ds.SeriesDescription, ds.SeriesNumber = "low dose", 3
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = k + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-10.0, -12.0, 5.0 + 2.5 * k]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.6], 2.5
    return ds


def write_ct_series(folder: Path, n: int = 4, size=(32, 24), seed: int = 0, series_uid: str | None = None):
    """A CT series (uint16, slope 1, intercept -1024), files named against position order.

    Returns the HU volume in MONAI order ``(columns, rows, slices)`` sorted by position.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), series_uid or generate_uid()
    planes = []
    for k in range(n):
        hu = rng.integers(-1024, 1500, size=size)  # (rows, columns)
        ds = _series_base("CT", CTImageStorage, study, series, k, size)
        ds.set_pixel_data((hu + 1024).astype(np.uint16), "MONOCHROME2", 12, generate_instance_uid=False)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "-1024", "HU"
        ds.save_as(folder / f"slice_{n - k:03d}.dcm", enforce_file_format=True)  # reverse name order
        planes.append(hu.T.astype(np.float32))
    return np.stack(planes, axis=-1)


def write_pet_series(folder: Path, n: int = 3, size=(20, 20), seed: int = 1):
    """A PET series in Bq/ml with per-slice slopes and the tags for body-weight SUV.

    Returns the Bq/ml volume (MONAI order) and the expected SUV factor."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    weight_kg, dose_bq, half_life, elapsed = 70.0, 3.7e8, 6586.2, 3600.0
    planes = []
    for k in range(n):
        ds = _series_base("PT", PositronEmissionTomographyImageStorage, study, series, k, size)
        ds.Units, ds.DecayCorrection, ds.PatientWeight = "BQML", "START", str(weight_kg)
        info = Dataset()
        info.RadionuclideTotalDose, info.RadionuclideHalfLife = str(dose_bq), str(half_life)
        info.RadiopharmaceuticalStartTime = "100000"  # one hour before SeriesTime 110000
        ds.RadiopharmaceuticalInformationSequence = [info]
        stored = rng.integers(0, 30000, size=size).astype(np.uint16)
        slope = 0.5 + 0.25 * k
        ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
        ds.RescaleSlope, ds.RescaleIntercept = str(slope), "0"
        ds.save_as(folder / f"pet_{k:03d}.dcm", enforce_file_format=True)
        planes.append((stored * slope).T.astype(np.float32))
    factor = weight_kg * 1000.0 / (dose_bq * np.exp(-np.log(2.0) * elapsed / half_life))
    return np.stack(planes, axis=-1), factor


def tree_digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def read_series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def stored_to_volume(datasets) -> np.ndarray:
    """(columns, rows, slices) physical volume sorted by z position."""
    datasets = sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([apply_modality_lut(d.pixel_array, d).T for d in datasets], axis=-1)


# ---- restore_array -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("roi", [(16, 16), (13, 20), (64, 64)])
def test_sliding_window_equals_whole_image_for_pointwise_network(roi):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1200, 3200, size=(40, 52)).astype(np.float32)  # some values outside the norm range
    net = pointwise_conv()
    out = inf.restore_array(net, x, "ct_denoise", roi_size=roi, overlap=0.5, sw_batch_size=3, progress=False)
    assert isinstance(out, np.ndarray) and out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, whole_image(net, x, CT), atol=2e-3)  # float32 on a 4095-HU range


def test_roi_equal_to_image_gives_whole_image_output_of_a_real_network():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 4095, size=(32, 40)).astype(np.float32)
    net = tiny_restormer()
    out = inf.restore_array(net, torch.from_numpy(x), "mri_sr", roi_size=(32, 40), progress=False)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), whole_image(net, x, get_task("mri_sr")), atol=1e-2)


def test_volume_larger_than_roi_with_real_network_and_mode_restored():
    net = tiny_restormer().train()
    x = torch.rand(48, 40, 3) * 4000.0
    out = inf.restore_array(net, x, "mri_sr", roi_size=(32, 32), overlap=0.25, sw_batch_size=2, progress=False)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert net.training  # eval only during the call
    # windows of a real (non-pointwise) network differ from the whole-image result, but only a little
    whole = whole_image(net.eval(), x[..., 1].numpy(), get_task("mri_sr"))
    assert 0 < np.abs(out[..., 1].numpy() - whole).mean() < 0.05 * 4095


def test_units_and_clipping_with_a_constant_network():
    x = np.array([[-3000.0, -1024.0, 0.0], [40.0, 1000.0, 3071.0]], dtype=np.float32)
    out = inf.restore_array(AddConstant(0.01), x, "ct_denoise", roi_size=8, progress=False)
    span = CT.norm_range[1] - CT.norm_range[0]
    expected = np.minimum(np.clip(x, *CT.norm_range) + 0.01 * span, CT.norm_range[1])
    np.testing.assert_allclose(out, expected, atol=1e-3)
    unclipped = inf.restore_array(AddConstant(0.01), x, "ct_denoise", roi_size=8, progress=False, clip=False)
    assert unclipped[1, 2] == pytest.approx(3071.0 + 0.01 * span, abs=1e-2)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_acquisition_axis(axis):
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 20, size=(6, 7, 5)).astype(np.float32)
    out = inf.restore_array(SliceMax(), x, "pet_synthesis", roi_size=(16, 16), progress=False, axis=axis)
    planes = np.moveaxis(x, axis, 0)
    expected = np.moveaxis(np.broadcast_to(planes.max(axis=(1, 2), keepdims=True), planes.shape), 0, axis)
    np.testing.assert_allclose(out, expected, rtol=1e-4)


def test_restore_array_rejects_bad_arrays():
    with pytest.raises(ValueError, match="2-D"):
        inf.restore_array(AddConstant(0.0), np.zeros((2, 3, 4, 5)), "ct_denoise", progress=False)
    with pytest.raises(ValueError, match="NaN"):
        inf.restore_array(AddConstant(0.0), np.full((4, 4), np.nan), "ct_denoise", progress=False)
    with pytest.raises(ValueError, match="same shape"):
        inf.restore_array(lambda t: t[..., :2], np.zeros((4, 4)), "ct_denoise", roi_size=4, progress=False)


# ---- task resolution ---------------------------------------------------------------------------------------
def test_task_from_modality_and_ambiguous_nifti(tmp_path):
    write_ct_series(tmp_path / "ct", n=2)
    assert inf.resolve_task(tmp_path / "ct").name == "ct_denoise"
    assert inf.resolve_task(tmp_path / "ct" / "slice_001.dcm").name == "ct_denoise"
    with pytest.warns(UserWarning, match="Modality"):
        assert inf.resolve_task(tmp_path / "ct", "mri_sr").name == "mri_sr"
    nii = write_nifti(tmp_path / "vol.nii.gz", np.zeros((4, 4, 2)))
    with pytest.raises(inf.AmbiguousTaskError) as err:
        inf.resolve_task(nii)
    assert "vol.nii.gz" in str(err.value) and all(name in str(err.value) for name in task_names())
    with pytest.raises(inf.AmbiguousTaskError):
        inf.restore_file(AddConstant(0.0), nii, tmp_path / "out.nii.gz", progress=False)
    assert not (tmp_path / "out.nii.gz").exists()


# ---- NIfTI -------------------------------------------------------------------------------------------------
def test_nifti_volume_roundtrip_keeps_geometry_and_units(tmp_path):
    rng = np.random.default_rng(3)
    hu = rng.integers(-1500, 3500, size=(20, 18, 3)).astype(np.float32)
    src = write_nifti(tmp_path / "ct.nii.gz", hu, dtype=np.int16)
    before = tree_digest(src)
    out = inf.restore_file(torch.nn.Identity(), src, tmp_path / "o" / "ct_restored.nii.gz", task="ct_denoise",
                           model_name="AMIR", roi_size=(16, 16), progress=False)
    assert out == tmp_path / "o" / "ct_restored.nii.gz" and tree_digest(src) == before
    back, ref = nib.load(str(out)), nib.load(str(src))
    assert back.shape == ref.shape and back.get_data_dtype() == np.float32
    np.testing.assert_allclose(back.affine, ref.affine)
    assert int(back.header["qform_code"]) == int(ref.header["qform_code"])
    np.testing.assert_allclose(back.get_fdata(), np.clip(hu, *CT.norm_range), atol=2e-3)
    assert b"AMIR" in bytes(back.header["descrip"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["ct_restored.nii.gz"]  # no temp left


def test_nifti_2d_slice_with_scaling_and_tiny_restormer(tmp_path):
    img = nib.Nifti1Image(np.arange(24 * 30, dtype=np.int16).reshape(24, 30, 1), np.diag([0.5, 0.5, 3, 1]))
    img.header.set_slope_inter(2.0, 100.0)  # on-disk scaling: physical = 2 * stored + 100
    img.to_filename(str(tmp_path / "s.nii"))
    net = tiny_restormer()
    out = inf.restore_file(net, tmp_path / "s.nii", tmp_path / "r.nii", task="mri_sr", progress=False,
                           roi_size=(16, 16))
    back = nib.load(str(out))
    assert back.shape == (24, 30, 1)
    physical = nib.load(str(tmp_path / "s.nii")).get_fdata()[..., 0].astype(np.float32)
    expected = inf.restore_array(net, physical, "mri_sr", progress=False, roi_size=(16, 16))
    np.testing.assert_allclose(back.get_fdata()[..., 0], expected, atol=1e-3)


def test_itk_nrrd_keeps_spacing(tmp_path):
    itk = pytest.importorskip("itk")
    arr = np.random.default_rng(4).uniform(0, 20, size=(3, 10, 12)).astype(np.float32)  # itk order (z, y, x)
    image = itk.image_from_array(arr)
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    itk.imwrite(image, str(tmp_path / "p.nrrd"))
    out = inf.restore_file(torch.nn.Identity(), tmp_path / "p.nrrd", tmp_path / "q.nrrd", task="pet_synthesis",
                           progress=False, roi_size=8)
    back = itk.imread(str(out))
    np.testing.assert_allclose(tuple(back.GetSpacing()), (0.5, 0.75, 2.0))
    np.testing.assert_allclose(tuple(back.GetOrigin()), (1.0, 2.0, 3.0))
    np.testing.assert_allclose(itk.array_from_image(back), arr, atol=1e-4)


# ---- DICOM -------------------------------------------------------------------------------------------------
def test_dicom_ct_series_becomes_a_new_derived_series(tmp_path):
    src = tmp_path / "in"
    hu = write_ct_series(src)
    originals = read_series(src)
    before = tree_digest(src)
    # our reader gives what the training loaders (MONAI PydicomReader) give: HU, (columns, rows, slices)
    np.testing.assert_array_equal(inf.read_scan(src).array, hu)
    np.testing.assert_array_equal(np.asarray(LoadImage(image_only=True, reader="PydicomReader")(str(src))), hu)
    shift = 100.0 / (CT.norm_range[1] - CT.norm_range[0])  # +100 HU
    out = inf.restore_file(AddConstant(shift), src, tmp_path / "out", model_name="AMIR", roi_size=(16, 16),
                           progress=False)
    assert tree_digest(src) == before
    restored = read_series(out)
    assert len(restored) == len(originals)
    series_uids = {d.SeriesInstanceUID for d in restored}
    assert len(series_uids) == 1 and series_uids.isdisjoint({d.SeriesInstanceUID for d in originals})
    sops = {d.SOPInstanceUID for d in restored}
    assert len(sops) == len(restored) and sops.isdisjoint({d.SOPInstanceUID for d in originals})
    for d in restored:
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert list(d.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "restored by AMIR (medir-monai)" in d.SeriesDescription
        assert (d.PatientName, d.PatientID) == ("Test^Patient", "P-0042")
        assert d.StudyInstanceUID == originals[0].StudyInstanceUID
        assert d.SourceImageSequence[0].ReferencedSOPInstanceUID in {o.SOPInstanceUID for o in originals}
    expected = np.minimum(np.clip(hu, *CT.norm_range) + 100.0, CT.norm_range[1])
    step = float(restored[0].RescaleSlope)
    np.testing.assert_allclose(stored_to_volume(restored), expected, atol=step / 2 + 1e-3)
    # MONAI readers see the same volume (MONAI index order, slices sorted by position)
    monai_vol = LoadImage(image_only=True, reader="PydicomReader")(str(out))
    np.testing.assert_allclose(np.asarray(monai_vol), expected, atol=step / 2 + 1e-3)
    itk_vol = LoadImage(image_only=True, reader="ITKReader")(str(out))
    np.testing.assert_allclose(np.asarray(itk_vol), expected, atol=step / 2 + 1e-3)
    np.testing.assert_allclose(itk_vol.pixdim[:3], [0.6, 0.7, 2.5], atol=1e-4)  # column, row spacing, slice gap


def test_single_dicom_file(tmp_path):
    write_ct_series(tmp_path / "in", n=1)
    src = next((tmp_path / "in").iterdir())
    out = inf.restore_file(torch.nn.Identity(), src, tmp_path / "one.dcm", progress=False, roi_size=(16, 16))
    d, o = pydicom.dcmread(out), pydicom.dcmread(src)
    np.testing.assert_allclose(apply_modality_lut(d.pixel_array, d), apply_modality_lut(o.pixel_array, o), atol=0.51)
    assert d.SeriesInstanceUID != o.SeriesInstanceUID


def test_one_file_dicom_folder_restores_like_the_file(tmp_path):
    """A series folder holding one real slice (pydicom's CT_small.dcm) restores and is written as a one-file series."""
    import shutil

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm", src / "CT_small.dcm")
    before = tree_digest(src)
    out = inf.restore_file(torch.nn.Identity(), src, tmp_path / "out", progress=False, roi_size=(32, 32))
    assert tree_digest(src) == before
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["IM00001.dcm"]
    d, o = pydicom.dcmread(files[0]), pydicom.dcmread(src / "CT_small.dcm")
    np.testing.assert_allclose(apply_modality_lut(d.pixel_array, d), apply_modality_lut(o.pixel_array, o),
                               atol=float(d.RescaleSlope) / 2 + 1e-3)


def test_derived_series_gets_its_own_series_number(tmp_path):
    write_ct_series(tmp_path / "in", n=2)
    originals = read_series(tmp_path / "in")
    out = inf.restore_file(torch.nn.Identity(), tmp_path / "in", tmp_path / "out", progress=False, roi_size=(16, 16))
    numbers = {int(d.SeriesNumber) for d in read_series(out)}
    source = int(originals[0].SeriesNumber) if "SeriesNumber" in originals[0] else 0
    assert numbers == {source + inf.DERIVED_SERIES_OFFSET}
    assert inf.derived_series_number(Dataset()) == inf.DERIVED_SERIES_OFFSET  # none in the source


def _dciodvfy_errors(path: Path) -> set[str]:
    import subprocess

    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")}


@pytest.mark.skipif(__import__("shutil").which("dciodvfy") is None,
                    reason="dciodvfy not installed (Debian package dicom3tools; .ci/run installs it)")
@pytest.mark.parametrize("source", ["CT_small.dcm", "MR_small.dcm", "written_ct_series"])
def test_written_dicom_passes_dciodvfy_with_no_new_error(tmp_path, source):
    if source == "written_ct_series":
        write_ct_series(tmp_path / "in", n=2)
        inputs = sorted((tmp_path / "in").iterdir())
        out = inf.restore_file(torch.nn.Identity(), tmp_path / "in", tmp_path / "out", progress=False,
                               roi_size=(16, 16))
        outputs = sorted(out.iterdir())
    else:
        src = Path(pydicom.__file__).parent / "data" / "test_files" / source
        task = "ct_denoise" if source.startswith("CT") else "mri_sr"
        outputs = [inf.restore_file(torch.nn.Identity(), src, tmp_path / source, task=task, progress=False,
                                    roi_size=(32, 32))]
        inputs = [src]
    allowed = set().union(*(_dciodvfy_errors(p) for p in inputs))
    for written in outputs:
        assert _dciodvfy_errors(written) <= allowed, written


def test_real_compressed_ct_slice_from_pydicom_data(tmp_path):
    """A real 512 x 512 abdomen CT slice (JPEG 2000, signed) through a pointwise network, written uncompressed."""
    from medir_monai.data.demo import wheel_file

    src = wheel_file("data_store", "data/explicit_VR-UN.dcm")
    net = pointwise_conv()
    out = inf.restore_file(net, src, tmp_path / "abdomen.dcm", model_name="Restormer", progress=False,
                           device="cpu", sw_device="cpu")
    hu = inf.read_scan(src).array
    assert hu.shape == (512, 512) and hu.min() < -1000 and hu.max() > 500  # real HU values
    r = pydicom.dcmread(out)
    assert not r.file_meta.TransferSyntaxUID.is_compressed and r.Modality == "CT"
    np.testing.assert_allclose(apply_modality_lut(r.pixel_array, r).T, whole_image(net, hu, CT),
                               atol=float(r.RescaleSlope) / 2 + 2e-3)


def test_dicom_pet_in_bqml_is_restored_in_suv_and_written_back_in_bqml(tmp_path):
    bqml, factor = write_pet_series(tmp_path / "pet")
    image = inf.read_scan(tmp_path / "pet")
    assert inf.task_unit_factor(image, PET) == pytest.approx(factor, rel=1e-9)
    out = inf.restore_file(torch.nn.Identity(), tmp_path / "pet", tmp_path / "pet_out", progress=False, roi_size=16)
    restored = read_series(out)
    expected = np.clip(bqml * factor, *PET.norm_range) / factor  # identity in SUV, back to Bq/ml
    slopes = {float(d.RescaleSlope) for d in restored}
    assert len(slopes) == 1  # one series-wide mapping (the inputs had per-slice slopes)
    np.testing.assert_allclose(stored_to_volume(restored), expected, atol=slopes.pop() / 2 + 1e-3 * expected.max())
    assert all(d.Units == "BQML" and d.Modality == "PT" for d in restored)


# ---- bad inputs ----------------------------------------------------------------------------------------------
def test_bad_inputs_give_errors_naming_the_file(tmp_path):
    net = torch.nn.Identity()
    nan = np.zeros((4, 4, 2), np.float32)
    nan[1, 1, 1] = np.nan
    cases = {
        "nan.nii.gz": (write_nifti(tmp_path / "nan.nii.gz", nan), "NaN"),
        "4d.nii.gz": (write_nifti(tmp_path / "4d.nii.gz", np.zeros((4, 4, 2, 3))), "dimensionality"),
    }
    (tmp_path / "empty").mkdir()
    cases["empty"] = (tmp_path / "empty", "empty folder")
    write_ct_series(tmp_path / "corrupt", n=2)
    (tmp_path / "corrupt" / "zzz.dcm").write_bytes(b"not a dicom at all" * 10)
    cases["zzz.dcm"] = (tmp_path / "corrupt", "not a DICOM")
    write_ct_series(tmp_path / "mixed", n=2, seed=5)
    write_ct_series(tmp_path / "other", n=1, seed=6)
    next((tmp_path / "other").iterdir()).rename(tmp_path / "mixed" / "extra.dcm")
    cases["mixed"] = (tmp_path / "mixed", "mixed series")
    cases["missing.nii"] = (tmp_path / "missing.nii", "does not exist")
    for name, (path, what) in cases.items():
        with pytest.raises(DataError, match=what) as err:
            out = inf.output_path_for(path, tmp_path / "results")
            inf.restore_file(net, path, out, task="ct_denoise", progress=False)
        assert name in str(err.value)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


# ---- safety: overwrite, in-place, atomicity ---------------------------------------------------------------
def test_existing_output_needs_overwrite(tmp_path):
    src = write_nifti(tmp_path / "a.nii.gz", np.full((6, 6, 2), 50.0))
    out = tmp_path / "b.nii.gz"
    out.write_bytes(b"precious")
    with pytest.raises(inf.OutputExistsError, match="overwrite"):
        inf.restore_file(AddConstant(0.0), src, out, task="ct_denoise", progress=False)
    assert out.read_bytes() == b"precious"
    inf.restore_file(AddConstant(0.0), src, out, task="ct_denoise", progress=False, overwrite=True)
    np.testing.assert_allclose(nib.load(str(out)).get_fdata(), 50.0, atol=1e-3)
    # a series folder is replaced as a whole
    write_ct_series(tmp_path / "ct", n=2)
    (tmp_path / "ct_out").mkdir()
    (tmp_path / "ct_out" / "old.txt").write_text("old")
    with pytest.raises(inf.OutputExistsError):
        inf.restore_file(AddConstant(0.0), tmp_path / "ct", tmp_path / "ct_out", progress=False)
    inf.restore_file(AddConstant(0.0), tmp_path / "ct", tmp_path / "ct_out", progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "ct_out").iterdir()) == ["IM00001.dcm", "IM00002.dcm"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_may_not_touch_the_input(tmp_path):
    (tmp_path / "d").mkdir()
    src = write_nifti(tmp_path / "d" / "a.nii.gz", np.zeros((4, 4, 2)))
    before = tree_digest(src)
    for output in (src, tmp_path / "d" / ".." / "d" / "a.nii.gz"):
        with pytest.raises(inf.OutputPathError, match="input"):
            inf.restore_file(AddConstant(0.0), src, output, task="ct_denoise", overwrite=True, progress=False)
    (tmp_path / "link.nii.gz").symlink_to(src)
    with pytest.raises(inf.OutputPathError):
        inf.restore_file(AddConstant(0.0), src, tmp_path / "link.nii.gz", task="ct_denoise", overwrite=True,
                         progress=False)
    with pytest.raises(inf.OutputPathError, match="contain"):
        inf.restore_file(AddConstant(0.0), src, tmp_path / "d", task="ct_denoise", overwrite=True, progress=False)
    write_ct_series(tmp_path / "ct", n=2)
    with pytest.raises(inf.OutputPathError, match="inside the input"):
        inf.restore_file(AddConstant(0.0), tmp_path / "ct", tmp_path / "ct" / "restored", progress=False)
    with pytest.raises(inf.OutputPathError, match="NIfTI"):
        inf.restore_file(AddConstant(0.0), src, tmp_path / "x.dcm", task="ct_denoise", progress=False)
    assert tree_digest(src) == before and len(list((tmp_path / "ct").iterdir())) == 2


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    src = write_nifti(tmp_path / "a.nii.gz", np.zeros((6, 6, 2)))

    def half_then_fail(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        inf.restore_file(AddConstant(0.0), src, tmp_path / "out" / "b.nii.gz", task="ct_denoise", progress=False)
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.undo()

    write_ct_series(tmp_path / "ct", n=3)
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "keep.dcm").write_bytes(b"previous result")
    calls = {"n": 0}
    real_save = pydicom.Dataset.save_as

    def save_twice_then_fail(self, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("writer crashed")
        return real_save(self, filename, *args, **kwargs)

    monkeypatch.setattr(pydicom.Dataset, "save_as", save_twice_then_fail)
    with pytest.raises(RuntimeError, match="crashed"):
        inf.restore_file(AddConstant(0.0), tmp_path / "ct", tmp_path / "res" / "series", progress=False)
    with pytest.raises(RuntimeError, match="crashed"):  # overwrite of an existing output: the old one survives
        calls["n"] = 0
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "x.dcm").write_bytes(b"old")
        inf.restore_file(AddConstant(0.0), tmp_path / "ct", tmp_path / "old", progress=False, overwrite=True)
    assert [p.name for p in (tmp_path / "res").iterdir()] == ["keep.dcm"]
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["x.dcm"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_path_for_and_restorer(tmp_path):
    assert inf.output_path_for("/x/scan.nii.gz", tmp_path) == tmp_path / "scan_restored.nii.gz"
    assert inf.output_path_for("/x/a.dcm", tmp_path) == tmp_path / "a_restored.dcm"
    write_ct_series(tmp_path / "series", n=2)
    target = inf.output_path_for(tmp_path / "series", tmp_path / "out")
    assert target == tmp_path / "out" / "series_restored"
    restorer = inf.Restorer(AddConstant(0.0), model_name="TAT", roi_size=(16, 16), progress=False)
    assert restorer(tmp_path / "series", target) == target
    assert "TAT" in pydicom.dcmread(next(target.iterdir())).SeriesDescription


def test_pet_volumes_are_restored_along_their_coronal_axis_ct_along_the_acquisition_axis(tmp_path):
    """PET models learn coronal slices (Task.slice_axis 1): a PET volume is restored plane by plane along the array
    axis that runs anterior-posterior, whatever the file's axis order; CT keeps the acquisition axis."""
    from medir_monai.restore import LoadScand, prepare_scan_batch, read_scan, scan_slice_axis

    seen: list[tuple[int, ...]] = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[-2:]))
        return x

    volume = np.random.default_rng(0).random((10, 6, 14)).astype(np.float32) + 0.5  # stored (X, Z, Y)
    affine = np.array([[2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 2.5, 0, 0], [0, 0, 0, 1]])  # file axis 2 runs A-P
    path = tmp_path / "pet.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    assert scan_slice_axis(read_scan(path), "pet_synthesis") == 2
    assert scan_slice_axis(read_scan(path), "ct_denoise") == -1
    out = inf.restore_file(recording, path, tmp_path / "out.nii.gz", task="pet_synthesis", roi_size=(10, 6), sw_batch_size=1,
                       progress=False, safeguard=None)
    assert seen == [(10, 6)] * 14  # one window per (X, Z) plane; along file axis 1 it would be 6 planes of 10x14
    np.testing.assert_allclose(nib.load(str(out)).get_fdata(), volume, atol=1e-5)
    item = LoadScand("pet_synthesis")({"image": str(path)})
    assert item["axis"] == 2 and prepare_scan_batch([item])[3] == {"task": "pet_synthesis", "axis": 2}
