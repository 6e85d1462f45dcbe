"""``medir prepare ixi | mayo | pet`` on small look-alike inputs with the real naming and folder conventions."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medir_monai.cli import main
from medir_monai.data import scan_authors_layout
from medir_monai.data.io import DataError
from medir_monai.data.prepare import (
    PREPARE_MANIFEST,
    parse_split,
    prepare_ixi,
    prepare_mayo,
    prepare_pet,
    split_subjects,
)
from medir_monai.tasks import get_task
from medir_monai.transforms import KSpaceTruncate

IXI_SUBJECTS = ("IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-HH-1212", "IXI014-HH-1236", "IXI015-HH-1258")
IXI_DEPTH = 110  # IXI T2 volumes hold 130 axial slices; the papers keep the central 100


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing in ``medir prepare`` may reach the network."""

    def refuse(*args, **kwargs):
        raise AssertionError("medir prepare tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _slices(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".nii"))


# ---- splits ------------------------------------------------------------------------------------------------
def test_split_subjects_counts_fractions_and_fixed():
    names = [f"s{i:02d}" for i in range(20)]
    by_fraction = split_subjects(names, (0.7, 0.1, 0.2), seed=3)
    assert sorted(by_fraction) == names
    assert [list(by_fraction.values()).count(s) for s in ("train", "validation", "test")] == [14, 2, 4]
    assert split_subjects(reversed(names), (0.7, 0.1, 0.2), seed=3) == by_fraction  # input order does not count
    assert split_subjects(names, (0.7, 0.1, 0.2), seed=4) != by_fraction
    by_count = split_subjects(names, parse_split("15,3,2"), seed=0, fixed={"s07": "test"})
    assert by_count["s07"] == "test"
    assert [list(by_count.values()).count(s) for s in ("train", "validation", "test")] == [15, 3, 2]
    with pytest.raises(DataError, match="add up to 21"):
        split_subjects(names, parse_split("15,3,3"))
    with pytest.raises(DataError, match="'s99'.*not found"):
        split_subjects(names, fixed={"s99": "test"})
    with pytest.raises(DataError, match="empty"):
        split_subjects(["a", "b"], (0.7, 0.1, 0.2))
    with pytest.raises(ValueError, match="sum to 1"):
        parse_split("0.5,0.1,0.1")


# ---- IXI ---------------------------------------------------------------------------------------------------
def _ixi_volume(i: int, axial_first: bool = False) -> nib.Nifti1Image:
    """A T2-like volume: axial slice k holds a disc whose intensity encodes k (so slices can be identified)."""
    xx, yy = np.mgrid[:24, :20]
    disc = ((xx - 12) ** 2 + (yy - 10) ** 2 < 60).astype(np.float32)
    volume = np.stack([disc * (100.0 + 10 * k + i) for k in range(IXI_DEPTH)], axis=-1)  # (X, Y, Z), RAS
    affine = np.diag([0.94, 0.94, 1.2, 1.0])
    if axial_first:  # stored (Z, X, Y): the axial axis is the file's first one
        volume = np.moveaxis(volume, -1, 0)
        affine = np.array([[0, 0.94, 0, 0], [0, 0, 0.94, 0], [1.2, 0, 0, 0], [0, 0, 0, 1.0]])
    return nib.Nifti1Image(volume.astype(np.int16), affine)


@pytest.fixture()
def ixi_dir(tmp_path) -> Path:
    root = tmp_path / "IXI-T2"
    root.mkdir()
    for i, name in enumerate(IXI_SUBJECTS):
        nib.save(_ixi_volume(i, axial_first=(i == 1)), str(root / f"{name}-T2.nii.gz"))
    nib.save(_ixi_volume(9), str(root / f"{IXI_SUBJECTS[0]}-PD.nii.gz"))  # another contrast: ignored
    return root


def test_prepare_ixi_central_slices_kspace_lq_and_split(ixi_dir, tmp_path):
    out = tmp_path / "prepared"
    layout = prepare_ixi(ixi_dir, out, split=(0.6, 0.2, 0.2), seed=1, progress=False)
    manifest = json.loads((out / "MRI" / PREPARE_MANIFEST).read_text())
    subjects = [n.split("-")[0] for n in IXI_SUBJECTS]
    assert sorted(manifest["splits"]) == subjects and sorted(manifest["done"]) == subjects
    assert sorted(manifest["splits"].values()) == ["test", "train", "train", "train", "validation"]
    central = get_task("mri_sr").central_slices
    first = (IXI_DEPTH - central) // 2
    for subject, split in manifest["splits"].items():
        for other in {"train", "validation", "test"} - {split}:  # every subject in exactly one split
            assert not any(n.startswith(subject + "_") for n in _slices(out / "MRI" / other / "HQ"))
        names = [n for n in _slices(out / "MRI" / split / "HQ") if n.startswith(subject + "_")]
        assert len(names) == central
        assert names == [n for n in _slices(out / "MRI" / split / "LQ") if n.startswith(subject + "_")]
        i = subjects.index(subject)
        hq_img = nib.load(str(out / "MRI" / split / "HQ" / names[0]))
        hq = hq_img.get_fdata()
        lq = nib.load(str(out / "MRI" / split / "LQ" / names[0])).get_fdata()
        assert hq.shape == (24, 20)  # axial (X, Y) whatever the file's axis order
        assert hq.max() == pytest.approx(100.0 + 10 * first + i)  # the first kept slice is the central block's
        assert hq_img.header.get_zooms()[:2] == pytest.approx((0.94, 0.94))
        expected = KSpaceTruncate(0.25)(torch.from_numpy(hq.astype(np.float32))[None])[0].numpy()
        np.testing.assert_allclose(lq, expected, atol=1e-3)
    assert "MRI (mri_sr)" in layout.summary() and "note: the papers' mri_sr slices are 256x256" in layout.summary()
    for split in ("train", "validation", "test"):
        items = scan_authors_layout(out, split)
        assert {it["task"] for it in items} == {"mri_sr"}


def test_prepare_ixi_resumes_and_refuses_to_overwrite(ixi_dir, tmp_path):
    out = tmp_path / "prepared"
    prepare_ixi(ixi_dir, out, seed=0, progress=False)
    manifest_path = out / "MRI" / PREPARE_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    # a run killed while writing IXI013: it is not marked done and one of its slices is missing
    victim = "IXI013"
    split = manifest["done"].pop(victim)["split"]
    manifest_path.write_text(json.dumps(manifest))
    victim_files = sorted((out / "MRI" / split / "HQ").glob(f"{victim}_*.nii"))
    victim_files[-1].unlink()
    kept = next(p for p in (out / "MRI").rglob("*.nii") if not p.name.startswith(victim))
    before = kept.stat().st_mtime_ns
    prepare_ixi(ixi_dir, out, seed=0, progress=False)
    assert kept.stat().st_mtime_ns == before  # finished subjects are skipped
    assert len(list((out / "MRI" / split / "HQ").glob(f"{victim}_*.nii"))) == len(victim_files)
    assert victim in json.loads(manifest_path.read_text())["done"]
    with pytest.raises(FileExistsError, match="other settings"):
        prepare_ixi(ixi_dir, out, seed=5, progress=False)
    stranger = tmp_path / "stranger"
    (stranger / "MRI").mkdir(parents=True)
    (stranger / "MRI" / "notes.txt").write_text("mine")
    assert main(["prepare", "ixi", "--input", str(ixi_dir), "--out", str(stranger), "--quiet"]) == 2
    assert (stranger / "MRI" / "notes.txt").read_text() == "mine"


def test_prepare_ixi_errors_name_the_problem(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prepare", "ixi", "--input", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no IXI T2 volume found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- Mayo --------------------------------------------------------------------------------------------------
MAYO_PATIENTS = ("L067", "L096", "L109", "L506")


def _ct_file(path: Path, patient: str, dose: str, z: float, hu: np.ndarray, instance: int, series_uid: str,
             spacing=(0.7, 0.7), description: str = "") -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "CT", patient, series_uid
    ds.SeriesDescription = description
    ds.InstanceNumber = instance
    ds.SliceThickness, ds.ConvolutionKernel = 1.0, "B30f"
    ds.ImagePositionPatient = [-180.0, -180.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


def _mayo_hu(patient: int, z: float, dose: str) -> np.ndarray:
    """Body-like slice whose mean encodes patient and position; quarter dose adds a small offset."""
    yy, xx = np.mgrid[:16, :16]
    body = ((xx - 8) ** 2 + (yy - 8) ** 2 < 40)
    value = 10 * patient + 2 * z + (3 if dose == "quarter" else 0)
    return np.where(body, value, -1000).astype(np.int16)


@pytest.fixture()
def mayo_dir(tmp_path) -> Path:
    """The 2016 challenge layout (``L067/full_1mm/L067_FD_1_1.CT....IMA``), quarter-dose files shuffled in name
    order, plus one patient in TCIA's LDCT-and-Projection-data layout."""
    root = tmp_path / "Mayo"
    rng = random.Random(0)
    for p, patient in enumerate(MAYO_PATIENTS):
        zs = [-100.0 - k for k in range(5)]
        for dose, tag in (("full", "FD"), ("quarter", "QD")):
            numbers = list(range(1, 6))
            if dose == "quarter":
                rng.shuffle(numbers)  # file order is not slice order
            uid = f"1.2.826.0.1.3680043.8.498.{p + 1}{int(dose == 'full')}"
            for z, n in zip(zs, numbers):
                if patient == "L506":  # TCIA layout: dose only in the series folder / description
                    series = "1.000000-Full Dose Images-12345" if dose == "full" else "1.000000-Low Dose Images-67890"
                    path = root / patient / "08-23-2018-NA-NA-62208" / series / f"1-{n:03d}.dcm"
                    desc = "Full Dose Images" if dose == "full" else "Low Dose Images"
                else:
                    path = root / patient / f"{dose}_1mm" / f"{patient}_{tag}_1_1.CT.0001.{n:04d}.2015.12.22.IMA"
                    desc = ""
                _ct_file(path, patient, dose, z, _mayo_hu(p, z, dose), n, uid, description=desc)
    return root


def test_prepare_mayo_pairs_by_position_and_splits_by_patient(mayo_dir, tmp_path):
    out = tmp_path / "prepared"
    layout = prepare_mayo(mayo_dir, out, split=(0.5, 0.25, 0.25), progress=False)
    manifest = json.loads((out / "CT" / PREPARE_MANIFEST).read_text())
    assert manifest["splits"]["L506"] == "test"  # the papers' test patient
    assert sorted(manifest["splits"].values()) == ["test", "train", "train", "validation"]
    for patient, split in manifest["splits"].items():
        p = MAYO_PATIENTS.index(patient)
        names = [n for n in _slices(out / "CT" / split / "HQ") if n.startswith(patient + "_")]
        assert len(names) == 5 and manifest["done"][patient]["unpaired"] == 0
        for name in names:
            hq = nib.load(str(out / "CT" / split / "HQ" / name)).get_fdata()
            lq = nib.load(str(out / "CT" / split / "LQ" / name)).get_fdata()
            assert hq.shape == (16, 16)
            assert hq.max() - 10 * p == pytest.approx(lq.max() - 10 * p - 3)  # same position in both
            z = (hq.max() - 10 * p) / 2
            assert z in [-100.0 - k for k in range(5)]
    assert scan_authors_layout(out, "test", ["ct_denoise"])
    assert "CT (ct_denoise)" in layout.summary()


def test_prepare_mayo_geometry_mismatch_names_both_files(mayo_dir, tmp_path):
    from pydicom import dcmread

    victim = sorted((mayo_dir / "L096" / "quarter_1mm").iterdir())[2]
    ds = dcmread(victim)
    ds.PixelSpacing = [0.8, 0.8]
    ds.save_as(victim)
    with pytest.raises(DataError, match="geometry mismatch") as err:
        prepare_mayo(mayo_dir, tmp_path / "o", progress=False)
    assert str(victim) in str(err.value) and "full_1mm" in str(err.value)
    assert not (tmp_path / "o" / "CT").exists()


def test_prepare_mayo_unknown_dose_and_several_series(mayo_dir, tmp_path, capsys):
    odd = mayo_dir / "L067" / "misc" / "scan.dcm"
    _ct_file(odd, "L067", "full", -50.0, _mayo_hu(0, -50.0, "full"), 1, "1.2.3.4")
    assert main(["prepare", "mayo", "--input", str(mayo_dir), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "cannot tell whether this is a full- or a quarter-dose" in capsys.readouterr().err
    odd.unlink()
    from pydicom import dcmread

    for path in (mayo_dir / "L067" / "full_1mm").iterdir():  # a second, 3 mm, full-dose series
        ds = dcmread(path)
        ds.SliceThickness = 3.0
        ds.save_as(mayo_dir / "L067" / "full_1mm" / ("b_" + path.name))
        ds.save_as(mayo_dir / "L067" / "quarter_1mm" / ("b_" + path.name.replace("_FD_", "_QD_")))
    with pytest.raises(DataError, match="several series kinds"):
        prepare_mayo(mayo_dir, tmp_path / "o", progress=False)
    layout = prepare_mayo(mayo_dir, tmp_path / "o", thickness=1.0, progress=False)
    assert layout.manifest["done"]["L067"]["series"] == "1 mm B30f"


# ---- PET ---------------------------------------------------------------------------------------------------
def _pet_volume(i: int) -> np.ndarray:
    """(X, Y, Z) SUV volume: a body in the central coronal planes only (the outer ones are air)."""
    rng = np.random.default_rng(i)
    volume = np.zeros((24, 24, 16), dtype=np.float32)
    volume[4:20, 8:16, 2:14] = 1.0 + 0.1 * rng.random((16, 8, 12))
    volume[12, 10, 8] = 6.0 + i  # a hot spot
    return volume


@pytest.fixture()
def pet_dirs(tmp_path) -> tuple[Path, Path]:
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    hq.mkdir()
    lq.mkdir()
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    for i in range(4):
        volume = _pet_volume(i)
        nib.save(nib.Nifti1Image(volume, affine), str(hq / f"patient{i}.nii.gz"))
        nib.save(nib.Nifti1Image(volume * 0.9, affine), str(lq / f"patient{i}.nii.gz"))
    return hq, lq


def test_prepare_pet_coronal_slices_air_dropped_given_and_simulated_lq(pet_dirs, tmp_path):
    hq_dir, lq_dir = pet_dirs
    given = prepare_pet(hq_dir, tmp_path / "given", lq_dir=lq_dir, split=(0.5, 0.25, 0.25), progress=False)
    manifest = given.manifest
    assert all(r["slices"] == 8 for r in manifest["done"].values())  # coronal planes Y = 8..15 hold the body
    split = manifest["splits"]["patient1"]
    names = [n for n in _slices(tmp_path / "given" / "PET" / split / "HQ") if n.startswith("patient1_")]
    assert names == [f"patient1_{k:04d}.nii" for k in range(8, 16)]
    hq_img = nib.load(str(tmp_path / "given" / "PET" / split / "HQ" / names[1]))
    lq = nib.load(str(tmp_path / "given" / "PET" / split / "LQ" / names[1])).get_fdata()
    hq = hq_img.get_fdata()
    assert hq.shape == (24, 16)  # (X, Z): the papers' 192x400 from 192x192x400
    assert hq_img.header.get_zooms()[:2] == pytest.approx((2.0, 2.5))
    np.testing.assert_allclose(hq, _pet_volume(1)[:, 9, :], atol=1e-6)
    np.testing.assert_allclose(lq, 0.9 * _pet_volume(1)[:, 9, :], atol=1e-6)

    simulated = prepare_pet(hq_dir, tmp_path / "sim", split=(0.5, 0.25, 0.25), progress=False)
    split = simulated.manifest["splits"]["patient2"]
    folder = tmp_path / "sim" / "PET" / split
    hq = np.stack([nib.load(str(folder / "HQ" / f"patient2_{k:04d}.nii")).get_fdata() for k in range(8, 16)])
    lq = np.stack([nib.load(str(folder / "LQ" / f"patient2_{k:04d}.nii")).get_fdata() for k in range(8, 16)])
    body = hq > 0.5
    assert np.abs(lq - hq)[body].mean() > 0.01  # counting noise was added
    assert lq[body].mean() == pytest.approx(hq[body].mean(), rel=0.1)  # on the HQ's mean (insert_noise)


def test_prepare_pet_errors(pet_dirs, tmp_path, capsys):
    hq_dir, lq_dir = pet_dirs
    (lq_dir / "patient3.nii.gz").unlink()
    assert main(["prepare", "pet", "--hq", str(hq_dir), "--lq", str(lq_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "patient3.nii.gz: HQ volume has no LQ partner" in err
    bq = tmp_path / "bq"
    bq.mkdir()
    for i in range(3):
        nib.save(nib.Nifti1Image(_pet_volume(i) * 5000.0, np.eye(4)), str(bq / f"p{i}.nii"))
    with pytest.raises(DataError, match="look like Bq/ml"):
        prepare_pet(bq, tmp_path / "o2", progress=False)


# ---- all three into one folder: the bundles train on it unchanged ------------------------------------------
def test_prepared_folder_trains_a_bundle_unchanged(ixi_dir, mayo_dir, pet_dirs, tmp_path):
    from monai.bundle import ConfigWorkflow

    from conftest import REPO_ROOT

    out = tmp_path / "papers"
    assert main(["prepare", "ixi", "--input", str(ixi_dir), "--out", str(out), "--quiet"]) == 0
    assert main(["prepare", "mayo", "--input", str(mayo_dir), "--out", str(out), "--split", "2,1,1", "--quiet"]) == 0
    assert main(["prepare", "pet", "--hq", str(pet_dirs[0]), "--lq", str(pet_dirs[1]), "--out", str(out),
                 "--split", "2,1,1", "--quiet"]) == 0
    tiny = {"network_def#dim": 8, "network_def#num_blocks": [1, 1, 1, 1], "network_def#num_refinement_blocks": 1,
            "patch_size": [16, 16], "batch_size": 3, "max_iterations": 2, "val_interval": 2, "val_max_per_task": 1,
            "num_workers": 0}
    # no capsys in this test: the bundle's logging handlers keep the stdout they are created with
    workflow = ConfigWorkflow(config_file=str(REPO_ROOT / "bundles" / "amir" / "configs" / "train.json"),
                              workflow_type="train", dataset_dir=str(out), bundle_root=str(tmp_path / "bundle"),
                              **tiny)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2
    for split in ("train", "validation", "test"):
        tasks = {item["task"] for item in scan_authors_layout(out, split)}
        assert tasks == {"mri_sr", "ct_denoise", "pet_synthesis"}, split
    metrics = workflow.parser.get_parsed_content("validate#evaluator").state.metrics
    assert any("pet_synthesis" in key for key in metrics), sorted(metrics)


def test_prepare_pet_dicom_series_in_suv(tmp_path):
    from test_inference import write_pet_series

    hq_dir, lq_dir = tmp_path / "pet_dicom", tmp_path / "pet_dicom_low"
    volumes = {}
    for i in range(3):
        volumes[f"study{i}"] = write_pet_series(hq_dir / f"study{i}", n=3, size=(20, 20), seed=i)
        write_pet_series(lq_dir / f"study{i}", n=3, size=(20, 20), seed=10 + i)
    with pytest.raises(DataError, match=r"study0: cannot simulate its low-dose pair: .*not isotropic"):
        prepare_pet(hq_dir, tmp_path / "o", split=(1, 1, 1), progress=False)  # 0.7 x 0.6 mm pixels
    layout = prepare_pet(hq_dir, tmp_path / "o", lq_dir=lq_dir, split=(1, 1, 1), progress=False)
    for subject, (bqml, factor) in volumes.items():
        record = layout.manifest["done"][subject]
        assert record["slices"] == 20 and record["shape"] == ["20x3"]  # 20 coronal slices of (X, Z)
        assert record["hq_range"][1] == pytest.approx(float(bqml.max()) * factor, rel=1e-5)  # Bq/ml -> SUV
