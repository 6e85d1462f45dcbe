"""Restore scans made from the embedded demo data with a tiny *trained* model."""

from __future__ import annotations

import copy

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import LoadImage
from pydicom.uid import generate_uid

from medir_monai.data.demo import ensure_demo_dataset, wheel_file
from medir_monai.data.io import load_image
from medir_monai.restore import OutputExistsError, restore_file
from medir_monai.networks.restormer import Restormer
from medir_monai.tasks import get_task


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo"), max_slices=3, tasks=["mri_sr"])


@pytest.fixture(scope="module")
def trained(demo):
    """A tiny Restormer trained for a few Adam steps on the demo MRI pairs; its loss must go down."""
    torch.manual_seed(0)
    task = get_task("mri_sr")
    pairs = []
    for hq_path in sorted((demo / "MRI" / "train" / "HQ").glob("mni_t1_*")):  # the 256 x 256 template slices
        lq = load_image(demo / "MRI" / "train" / "LQ" / hq_path.name)
        hq = load_image(hq_path)
        pairs.append((task.normalise(torch.as_tensor(lq))[None, None, 64:192, 64:192].float(),
                       task.normalise(torch.as_tensor(hq))[None, None, 64:192, 64:192].float()))
    lq, hq = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    net = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.mean(torch.abs(net(lq) - hq))
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    return net.eval()


def test_nifti_volume_from_demo_slices(demo, trained, tmp_path):
    files = sorted((demo / "MRI" / "test" / "LQ").iterdir())
    first = nib.load(str(files[0]))
    volume = np.stack([np.asarray(nib.load(str(f)).dataobj, dtype=np.float32).squeeze() for f in files], axis=-1)
    affine = first.affine.copy()
    affine[2, 2] = 2.5  # slice spacing of the stacked volume
    src = tmp_path / "mri_lq.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(src))
    out = restore_file(trained, src, tmp_path / "out" / "mri_restored.nii.gz", task="mri_sr", roi_size=(96, 96),
                       progress=False)
    img = nib.load(str(out))
    restored = img.get_fdata()
    assert img.shape == volume.shape and np.allclose(img.affine, affine)
    assert np.allclose(img.header.get_zooms()[:3], nib.load(str(src)).header.get_zooms()[:3])
    assert restored.min() >= 0 and restored.max() <= 4095  # raw MRI intensity units (the task's range)
    assert abs(restored.mean() - volume.mean()) < 0.2 * volume.mean()  # same scale as the input, not [0, 1]
    with pytest.raises(OutputExistsError):
        restore_file(trained, src, out, task="mri_sr", progress=False)


def test_dicom_series_from_the_demo_ct_source(trained, tmp_path):
    """A 3-slice CT series built from the real CT slice the demo uses; task taken from Modality."""
    base = pydicom.dcmread(str(wheel_file("data_store", "data/explicit_VR-UN.dcm")))
    if base.file_meta.TransferSyntaxUID.is_compressed:
        base.decompress()
    series_dir = tmp_path / "ct_series"
    series_dir.mkdir()
    series_uid = generate_uid()
    for i in range(3):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(5 * i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.Modality = "CT"
        ds.save_as(str(series_dir / f"{i:03d}.dcm"))
    before = {p.name: p.read_bytes() for p in series_dir.iterdir()}
    out = restore_file(trained, series_dir, tmp_path / "restored", roi_size=(128, 128), progress=False)
    written = sorted(out.iterdir())
    assert len(written) == 3
    new = [pydicom.dcmread(str(p)) for p in written]
    assert {d.SeriesInstanceUID for d in new} != {series_uid} and len({d.SeriesInstanceUID for d in new}) == 1
    assert len({d.SOPInstanceUID for d in new}) == 3
    assert all("DERIVED" in d.ImageType for d in new)
    assert all(d.PatientID == base.PatientID and d.StudyInstanceUID == base.StudyInstanceUID for d in new)
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in new])
    assert hu.min() >= -1024 - 1 and hu.max() <= 3071 + 1 and hu.shape == (3, base.Rows, base.Columns)
    assert np.median(hu) < 200  # soft tissue and air, in HU
    volume = LoadImage(image_only=True)(str(out))  # MONAI reads the new series back
    assert tuple(volume.shape) == (base.Columns, base.Rows, 3)
    assert {p.name: p.read_bytes() for p in series_dir.iterdir()} == before  # input untouched
