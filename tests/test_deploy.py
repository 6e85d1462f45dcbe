"""MONAI Deploy application and MONAI Label app.

The SDK-free glue (series -> scan, restore, write; model discovery; NIfTI output with DICOM geometry) is tested
everywhere. The application tests run when the extras are installed (``pip install -e .[deploy]`` /
``.[label]``, or ``scripts/deploy_envs.sh``) and are skipped with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medir_monai.data.io import DataError
from medir_monai.deploy.export import export_torchscript
from medir_monai.deploy.label import core as label_core
from medir_monai.deploy.models import load_restoration_model
from medir_monai.deploy.series import restore_scan, scan_from_datasets, series_output_name, task_for_scan, write_restored
from medir_monai.restore import AmbiguousTaskError, read_scan, restore_array, restore_file
from medir_monai.networks import AMIR

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[1]
ROI = (32, 32)
TINY = {"dim": 8, "num_blocks": (1, 1, 1, 1), "num_refinement_blocks": 1}
HAVE_DEPLOY = importlib.util.find_spec("monai.deploy") is not None
HAVE_LABEL = importlib.util.find_spec("monailabel") is not None
NO_DEPLOY = "MONAI Deploy App SDK not installed (pip install -e .[deploy], see docs/deploy.md)"
NO_LABEL = "MONAI Label not installed (pip install -e .[label] in its own environment, see docs/deploy.md)"


# ---- data and model ----------------------------------------------------------------------------------------
def write_ct_series(folder: Path, n: int = 3, size=(40, 36), seed: int = 0, series_uid: str | None = None,
                    series_number: int = 2) -> Path:
    """A CT series in HU (uint16, intercept -1024), files named against the position order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series = "1.2.826.0.1.3680043.8.498.77", series_uid or generate_uid()
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Test^Deploy", "D-0001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyDate, ds.SeriesDate, ds.SeriesTime = "20240102", "20240102", "110000"
        ds.SeriesNumber, ds.SeriesDescription = series_number, "quarter dose"
        ds.ImageType, ds.InstanceNumber = ["ORIGINAL", "PRIMARY", "AXIAL"], k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-20.0, -18.0, 10.0 + 2.0 * k]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.7], 2.0
        hu = rng.integers(-1000, 1200, size=size)  # (rows, columns)
        ds.set_pixel_data((hu + 1024).astype(np.uint16), "MONOCHROME2", 12, generate_instance_uid=False)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "-1024", "HU"
        ds.save_as(folder / f"im{n - k:03d}.dcm", enforce_file_format=True)
    return folder


def write_nifti(path: Path, seed: int = 1) -> Path:
    vol = np.random.default_rng(seed).uniform(-1000, 1500, size=(40, 36, 3)).astype(np.float32)
    affine = np.array([[0.0, -0.8, 0, 12.0], [0.7, 0, 0, -30.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(vol, affine).to_filename(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_amir() -> AMIR:
    torch.manual_seed(0)
    return AMIR(**TINY).eval()


@pytest.fixture(scope="module")
def exported(tiny_amir, tmp_path_factory) -> Path:
    return export_torchscript(tiny_amir, tmp_path_factory.mktemp("model") / "amir_tiny.ts", (1, 1, *ROI),
                              model_name="AMIR-tiny")


def datasets_of(folder: Path, shuffle_seed: int = 3) -> list:
    files = sorted(folder.iterdir())
    np.random.default_rng(shuffle_seed).shuffle(files)
    return [pydicom.dcmread(f) for f in files]


# ---- SDK-free glue -----------------------------------------------------------------------------------------
def test_scan_from_datasets_matches_reading_the_folder(tmp_path):
    folder = write_ct_series(tmp_path / "ct")
    from_disk = read_scan(folder)
    from_memory = scan_from_datasets(datasets_of(folder), folder)
    assert from_memory.kind == "dicom_series" and from_memory.modality == "CT" and from_memory.path == folder
    np.testing.assert_array_equal(from_memory.array, from_disk.array)  # same order and HU
    assert [f.name for f in from_memory.files] == [f.name for f in from_disk.files]
    assert task_for_scan(from_memory).name == "ct_denoise"


def test_scan_from_datasets_refuses_bad_series(tmp_path):
    with pytest.raises(DataError, match="no DICOM instances"):
        scan_from_datasets([], tmp_path)
    a = datasets_of(write_ct_series(tmp_path / "a", n=2))
    b = datasets_of(write_ct_series(tmp_path / "b", n=2, seed=5))
    with pytest.raises(DataError, match="mixed series"):
        scan_from_datasets(a + b, tmp_path)
    no_pixels = datasets_of(tmp_path / "a")
    del no_pixels[0].PixelData
    with pytest.raises(DataError, match="without pixel data"):
        scan_from_datasets(no_pixels, tmp_path / "a")


def test_restore_and_write_equal_medir_restore_file(tmp_path, exported):
    folder = write_ct_series(tmp_path / "ct")
    model = load_restoration_model(exported)
    item = restore_scan(model.network, scan_from_datasets(datasets_of(folder), folder), roi_size=model.roi_size,
                        progress=False)
    out = write_restored(item, tmp_path / "out", model.name)
    assert out == tmp_path / "out" / "ct_restored"
    reference = restore_file(model.network, folder, tmp_path / "ref" / "ct_restored", roi_size=model.roi_size,
                             model_name=model.name, progress=False)
    np.testing.assert_allclose(read_scan(out).array, read_scan(reference).array, atol=0.5)  # 16-bit storage step
    src, written = pydicom.dcmread(sorted(folder.iterdir())[0]), [pydicom.dcmread(p) for p in sorted(out.iterdir())]
    assert {ds.SeriesInstanceUID for ds in written} != {src.SeriesInstanceUID} and len(written) == 3
    assert all(ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == "D-0001" for ds in written)
    assert all(ds.ImageType[0] == "DERIVED" and "AMIR-tiny" in ds.SeriesDescription for ds in written)
    with pytest.raises(FileExistsError):
        write_restored(item, tmp_path / "out", model.name)


def test_nifti_needs_a_task_and_output_names_stay_unique(tmp_path):
    scan = read_scan(write_nifti(tmp_path / "v.nii.gz"))
    with pytest.raises(AmbiguousTaskError, match="--task"):
        task_for_scan(scan)
    assert task_for_scan(scan, "mri_sr").name == "mri_sr"
    assert series_output_name(scan, 0, 1) == "v_restored.nii.gz"
    folder = write_ct_series(tmp_path / "ct")
    series = scan_from_datasets(datasets_of(folder), folder)
    names = {series_output_name(series, i, 2) for i in range(2)}
    assert names == {"ct_01_series2_restored", "ct_02_series2_restored"}


# ---- MONAI Label core (no MONAI Label needed) ------------------------------------------------------------------
def test_discover_models(tmp_path, exported):
    bundles = tmp_path / "bundles"
    for name in ("amir", "tat"):
        (bundles / name / "configs").mkdir(parents=True)
        (bundles / name / "configs" / "inference.json").write_text("{}")
    (bundles / "amir" / "models").mkdir()
    (bundles / "amir" / "models" / "model.pt").write_bytes(b"")
    assert label_core.discover_models({}, bundles) == {"amir": bundles / "amir"}  # only trained bundles
    (bundles / "tat" / "configs" / "pretrained.json").write_text("{}")  # tat ships weights in the package
    assert label_core.discover_models({}, bundles) == {"amir": bundles / "amir",
                                                       "tat": bundles / "tat" / "configs" / "pretrained.json"}
    found = label_core.discover_models({"models": f"tat, fast={exported}"}, bundles)
    assert found == {"tat": bundles / "tat", "fast": exported}
    found = label_core.discover_models({"models": str(bundles / "tat" / "configs" / "pretrained.json")}, bundles)
    assert found == {"tat": bundles / "tat" / "configs" / "pretrained.json"}  # named after its bundle
    with pytest.raises(ValueError, match="'nothing'"):
        label_core.discover_models({"models": "nothing"}, bundles)
    with pytest.raises(ValueError, match="used twice"):
        label_core.discover_models({"models": f"tat,tat={exported}"}, bundles)


def test_dicom_affine_matches_monai_readers(tmp_path):
    from monai.transforms import LoadImage

    folder = write_ct_series(tmp_path / "ct")
    scan = read_scan(folder)
    for reader in ("ITKReader", "PydicomReader"):
        image = LoadImage(reader=reader, image_only=True)(str(folder))
        np.testing.assert_array_equal(np.asarray(image), scan.array)
        np.testing.assert_allclose(np.asarray(image.affine), label_core.dicom_affine(scan), atol=1e-4)


def test_restore_to_nifti_keeps_geometry_and_units(tmp_path, exported):
    model = load_restoration_model(exported)
    source = write_nifti(tmp_path / "v.nii.gz")
    out, summary = label_core.restore_to_nifti(model, source, tmp_path / "r.nii.gz", task="ct_denoise")
    restored, original = nib.load(str(out)), nib.load(str(source))
    np.testing.assert_allclose(restored.affine, original.affine)
    assert restored.get_data_dtype() == np.float32 and summary["task"] == "ct_denoise" and summary["unit"] == "HU"
    expected = restore_array(model.network, original.get_fdata(dtype=np.float32), "ct_denoise", roi_size=ROI,
                             progress=False)
    np.testing.assert_allclose(restored.get_fdata(dtype=np.float32), expected, atol=1e-3)
    folder = write_ct_series(tmp_path / "ct")
    out, summary = label_core.restore_to_nifti(model, folder, tmp_path / "d.nii.gz")  # task from Modality
    assert summary["task"] == "ct_denoise" and nib.load(str(out)).shape == read_scan(folder).array.shape
    with pytest.raises(ValueError, match="NIfTI"):
        label_core.restore_to_nifti(model, source, tmp_path / "r.dcm", task="ct_denoise")


SAFEGUARD = {"ct_denoise": {"method": "noise", "lowpass_sigma": 1.5, "window": 5, "object_threshold": -500.0}}


def ct_profile(pixel_size_mm: tuple[float, float]) -> dict:
    """A training profile (the form :func:`medir_monai.data.profile.profile_items` writes) for CT only."""
    from medir_monai.data.profile import PROFILE_VERSION

    return {"version": PROFILE_VERSION,
            "tasks": {"ct_denoise": {"slices": 4, "pixel_size_mm": list(pixel_size_mm), "grid": [30, 50]}}}


def test_export_carries_settings_and_profile_to_both_apps(tmp_path, tiny_amir):
    """An export made from a bundle restores with the bundle's safeguard and warns like ``medir restore``."""
    from medir_monai.deploy.models import check_input

    folder = write_ct_series(tmp_path / "ct")  # 0.8 x 0.7 mm pixels, 40 x 36
    outside = export_torchscript(tiny_amir, tmp_path / "outside.ts", (1, 1, *ROI), model_name="AMIR-tiny",
                                 deployment={"settings": {"safeguard": SAFEGUARD},
                                             "training_profile": ct_profile((2.0, 3.0))})
    inside = export_torchscript(tiny_amir, tmp_path / "inside.ts", (1, 1, *ROI), model_name="AMIR-tiny",
                                deployment={"settings": {"safeguard": SAFEGUARD},
                                            "training_profile": ct_profile((0.5, 1.0))})
    model = load_restoration_model(outside)
    assert model.settings == {"safeguard": SAFEGUARD} and model.training_profile == ct_profile((2.0, 3.0))
    scan = read_scan(folder)
    message = check_input(model, scan, "ct_denoise")
    assert message and str(folder) in message and "pixel size" in message and "2.00-3.00 mm" in message
    assert check_input(load_restoration_model(inside), scan, "ct_denoise") is None

    out, summary = label_core.restore_to_nifti(model, folder, tmp_path / "r.nii.gz")
    assert summary["guard"] == message  # the Label app's result names the warning
    guarded = restore_array(model.network, scan.array, "ct_denoise", roi_size=ROI, progress=False, safeguard=SAFEGUARD)
    plain = restore_array(model.network, scan.array, "ct_denoise", roi_size=ROI, progress=False)
    written = nib.load(str(out)).get_fdata(dtype=np.float32)
    np.testing.assert_allclose(written, guarded, atol=1e-3)  # the safeguard of the bundle was applied
    assert np.abs(written - plain).max() > 1.0
    _, summary = label_core.restore_to_nifti(load_restoration_model(inside), folder, tmp_path / "i.nii.gz")
    assert summary["guard"] == "inside the training data"


def test_a_bundle_config_file_is_a_model_path(tmp_path):
    """``bundles/amir/configs/pretrained.json`` as ``-m`` / ``--conf models``: the bundle with the shipped weights,
    their settings and training profile."""
    from medir_monai.deploy.models import model_kind

    config = REPO_ROOT / "bundles" / "amir" / "configs" / "pretrained.json"
    assert model_kind(config) == "bundle"
    model = load_restoration_model(config)
    assert model.kind == "bundle" and model.roi_size == (64, 64) and model.training_profile is not None
    assert model.settings["safeguard"]["ct_denoise"]["method"] == "noise"
    stray = tmp_path / "configs" / "x.json"
    stray.parent.mkdir()
    stray.write_text("{}")
    with pytest.raises(ValueError, match="bundle config file"):
        model_kind(stray)  # a config outside a bundle


def test_models_without_a_profile_restore_unguarded(tmp_path, exported):
    from medir_monai.deploy.models import check_input

    model = load_restoration_model(exported)
    assert model.settings == {} and model.training_profile is None
    folder = write_ct_series(tmp_path / "ct")
    assert check_input(model, read_scan(folder), "ct_denoise") is None
    _, summary = label_core.restore_to_nifti(model, folder, tmp_path / "r.nii.gz")
    assert summary["guard"] == "no training profile"


def test_pydicom_seg_alias_and_label_package_import_without_monailabel():
    import medir_monai.deploy.label as label

    assert (label.APP_DIR / "main.py").is_file()
    label_core.ensure_pydicom_seg_compat()
    from pydicom._storage_sopclass_uids import SegmentationStorage
    from pydicom.uid import SegmentationStorage as expected

    assert SegmentationStorage == expected
    if not HAVE_LABEL:
        with pytest.raises(ImportError, match="monailabel"):
            importlib.import_module("medir_monai.deploy.label.main")


# ---- MONAI Deploy application --------------------------------------------------------------------------------
def run_app(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOLOSCAN_LOG_LEVEL": "WARN"}
    return subprocess.run([sys.executable, "-m", "medir_monai.deploy.app", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.skipif(not HAVE_DEPLOY, reason=NO_DEPLOY)
def test_deploy_app_restores_a_dicom_series_as_a_new_series(tmp_path, exported):
    folder = write_ct_series(tmp_path / "in" / "ct")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    proc = run_app("-i", str(folder), "-o", str(tmp_path / "out"), "-m", str(exported))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out" / "ct_restored"
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # input untouched
    written = [pydicom.dcmread(p) for p in sorted(out.iterdir())]
    src = pydicom.dcmread(next(folder.iterdir()))
    assert len(written) == 3 and len({ds.SOPInstanceUID for ds in written}) == 3
    assert {ds.SeriesInstanceUID for ds in written} != {src.SeriesInstanceUID}
    assert all(ds.StudyInstanceUID == src.StudyInstanceUID and ds.ImageType[0] == "DERIVED" for ds in written)
    assert all("AMIR-tiny" in ds.SeriesDescription for ds in written)
    model = load_restoration_model(exported)
    reference = restore_file(model.network, folder, tmp_path / "ref", roi_size=ROI, progress=False)
    np.testing.assert_allclose(read_scan(out).array, read_scan(reference).array, atol=0.5)


@pytest.mark.skipif(not HAVE_DEPLOY, reason=NO_DEPLOY)
def test_deploy_app_restores_nifti_with_a_bundle_and_needs_a_task(tmp_path, tiny_amir):
    source = write_nifti(tmp_path / "in" / "vol.nii.gz")
    ckpt, tiny = tmp_path / "w.pt", tmp_path / "tiny.json"
    torch.save(tiny_amir.state_dict(), ckpt)
    tiny.write_text(json.dumps({"network_def#dim": 8, "network_def#num_blocks": [1, 1, 1, 1],
                                "network_def#num_refinement_blocks": 1, "patch_size": list(ROI)}))
    bundle = ["-m", str(REPO_ROOT / "bundles" / "amir"), "--config", str(tiny), "--checkpoint", str(ckpt)]
    refused = run_app("-i", str(source), "-o", str(tmp_path / "out"), *bundle)
    assert refused.returncode == 2 and "medir deploy: error:" in refused.stderr
    assert "ambiguous" in refused.stderr and "--task" in refused.stderr
    assert not (tmp_path / "out" / "vol_restored.nii.gz").exists()
    proc = run_app("-i", str(source), "-o", str(tmp_path / "out"), "--task", "ct_denoise", *bundle)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = nib.load(str(tmp_path / "out" / "vol_restored.nii.gz"))
    original = nib.load(str(source))
    np.testing.assert_allclose(out.affine, original.affine)
    expected = restore_array(tiny_amir, original.get_fdata(dtype=np.float32), "ct_denoise", roi_size=ROI, progress=False)
    np.testing.assert_allclose(out.get_fdata(dtype=np.float32), expected, atol=1e-3)


# ---- MONAI Label app -------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_LABEL, reason=NO_LABEL)
def test_label_app_offers_restoration_as_an_infer_task(tmp_path, exported):
    from monailabel.interfaces.utils.app import app_instance

    from medir_monai.deploy.label import APP_DIR

    studies = tmp_path / "studies"
    studies.mkdir()
    source = write_nifti(studies / "ct_vol.nii.gz")
    app = app_instance(app_dir=str(APP_DIR), studies=str(studies), conf={"models": f"tiny={exported}"})
    info = app.info()
    assert info["models"]["tiny"]["type"] == "others"
    result = app.infer({"model": "tiny", "image": "ct_vol", "task": "ct_denoise"})
    params = result["params"]
    assert params["task"] == "ct_denoise" and params["model"] == "AMIR-tiny" and "latencies" in params
    restored = nib.load(result["file"])
    assert restored.get_data_dtype() == np.float32
    np.testing.assert_allclose(restored.affine, nib.load(str(source)).affine)
    expected = restore_array(load_restoration_model(exported).network,
                             nib.load(str(source)).get_fdata(dtype=np.float32), "ct_denoise", roi_size=ROI,
                             progress=False)
    np.testing.assert_allclose(restored.get_fdata(dtype=np.float32), expected, atol=1e-3)
    folder = write_ct_series(tmp_path / "ct")
    result = app.infer({"model": "tiny", "image": str(folder)})  # a DICOM series path: task from Modality
    assert result["params"]["task"] == "ct_denoise" and nib.load(result["file"]).shape == (36, 40, 3)
