"""Layouts (authors' folders, JSON datalists), slice expansion and the MONAI datasets built on them."""

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medir_monai.data import (
    DataError,
    expand_to_slices,
    get_task_labels,
    load_datalist,
    restoration_dataset,
    scan_authors_layout,
)
from medir_monai.tasks import UnknownTaskError, get_task

RNG = np.random.default_rng(0)


def write_nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.eye(4)), str(path))
    return path


def make_layout(root: Path, folder: str, split: str, names, shape=(40, 36), low=0.0, high=4095.0) -> None:
    """Authors' layout with HQ uniform in [low, high] and LQ = HQ / 2 (so pairs can be checked pixel-wise)."""
    for name in names:
        hq = RNG.uniform(low, high, size=shape)
        write_nifti(root / folder / split / "HQ" / name, hq)
        write_nifti(root / folder / split / "LQ" / name, hq / 2 if low >= 0 else hq)


# ---- the authors' layout ------------------------------------------------------------------------------
def test_scan_authors_layout_pairs_by_name(tmp_path):
    make_layout(tmp_path, "MRI", "train", ["b.nii", "a.nii"])
    make_layout(tmp_path, "CT", "train", ["x.nii"], low=-1024, high=3071)
    make_layout(tmp_path, "MRI", "test", ["t.nii"])
    make_layout(tmp_path, "CT", "test", ["t.nii", "u.nii"], low=-1024, high=3071)
    items = scan_authors_layout(tmp_path, "train")
    assert [(it["task"], Path(it["lq"]).name) for it in items] == [
        ("mri_sr", "a.nii"),
        ("mri_sr", "b.nii"),
        ("ct_denoise", "x.nii"),
    ]
    for it in items:
        assert Path(it["lq"]).parent.name == "LQ" and Path(it["hq"]).parent.name == "HQ"
        assert Path(it["lq"]).name == Path(it["hq"]).name
    assert [it["task"] for it in scan_authors_layout(tmp_path, "train", tasks=["ct_denoise"])] == ["ct_denoise"]
    assert len(scan_authors_layout(tmp_path, "test")) == 3


def test_scan_authors_layout_reads_bin_files(tmp_path):
    for sub in ("LQ", "HQ"):
        (tmp_path / "PET" / "train" / sub).mkdir(parents=True)
        with open(tmp_path / "PET" / "train" / sub / "0001.bin", "wb") as f:
            pickle.dump(torch.rand(1, 32, 32) * 20, f)
    items = scan_authors_layout(tmp_path, "train")
    ds = restoration_dataset(items, train=False)
    sample = ds[0]
    assert sample["lq"].shape == (1, 32, 32) and sample["task_name"] == "pet_synthesis"


def test_lq_without_hq_partner_is_named(tmp_path):
    make_layout(tmp_path, "MRI", "train", ["a.nii"])
    write_nifti(tmp_path / "MRI" / "train" / "LQ" / "orphan.nii", np.zeros((8, 8)))
    with pytest.raises(DataError, match=r"LQ/orphan\.nii: LQ file has no HQ partner \(expected .*HQ/orphan\.nii\)"):
        scan_authors_layout(tmp_path, "train")


def test_hq_without_lq_partner_is_named(tmp_path):
    make_layout(tmp_path, "MRI", "train", ["a.nii"])
    write_nifti(tmp_path / "MRI" / "train" / "HQ" / "lonely.nii", np.zeros((8, 8)))
    with pytest.raises(DataError, match=r"HQ/lonely\.nii: HQ file has no LQ partner"):
        scan_authors_layout(tmp_path, "train")


def test_empty_pair_folder_is_named(tmp_path):
    (tmp_path / "CT" / "validation" / "LQ").mkdir(parents=True)
    (tmp_path / "CT" / "validation" / "HQ").mkdir(parents=True)
    with pytest.raises(DataError, match=r"CT/validation/LQ: empty folder"):
        scan_authors_layout(tmp_path, "validation")


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(DataError, match=r"nope: dataset folder does not exist"):
        scan_authors_layout(tmp_path / "nope")
    with pytest.raises(DataError, match=r"no task folder found \(expected one of MRI, CT, PET\)"):
        scan_authors_layout(tmp_path)
    make_layout(tmp_path, "MRI", "train", ["a.nii"])
    with pytest.raises(DataError, match=r"MRI/test: split folder does not exist \(found: \['train'\]\)"):
        scan_authors_layout(tmp_path, "test")
    with pytest.raises(DataError, match=r"PET: folder of task 'pet_synthesis' does not exist"):
        scan_authors_layout(tmp_path, "train", tasks=["pet_synthesis"])


def test_lq_hq_shape_mismatch_is_named_when_loaded(tmp_path):
    write_nifti(tmp_path / "MRI" / "train" / "HQ" / "s.nii", np.zeros((40, 36)))
    write_nifti(tmp_path / "MRI" / "train" / "LQ" / "s.nii", np.zeros((40, 30)))
    items = scan_authors_layout(tmp_path, "train")  # names pair up; shapes are checked on load
    ds = restoration_dataset(items, train=False, cache="none")
    msg = r"LQ/HQ shape mismatch: LQ .*LQ/s\.nii has shape \(40, 30\) but HQ .*HQ/s\.nii"
    with pytest.raises(DataError, match=msg):
        ds[0]
    with pytest.raises(DataError, match=msg):  # the memory cache loads everything up front
        restoration_dataset(items, train=False, cache="memory")


# ---- JSON datalists ------------------------------------------------------------------------------------
def test_datalist_paired_and_hq_only_items(tmp_path):
    write_nifti(tmp_path / "vols" / "ct_hq.nii.gz", np.zeros((8, 8, 3)))
    write_nifti(tmp_path / "vols" / "ct_lq.nii.gz", np.zeros((8, 8, 3)))
    write_nifti(tmp_path / "vols" / "t2.nii.gz", np.zeros((8, 8, 3)))
    datalist = {
        "training": [
            {"hq": "vols/ct_hq.nii.gz", "lq": "vols/ct_lq.nii.gz", "task": "ct_denoise"},
            {"hq": "vols/t2.nii.gz", "task": "mri_sr", "subject": "IXI002"},
        ],
        "validation": [{"hq": "vols/t2.nii.gz"}],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    items = load_datalist(tmp_path / "datalist.json")
    assert items[0]["task"] == "ct_denoise" and Path(items[0]["lq"]) == tmp_path / "vols" / "ct_lq.nii.gz"
    assert items[1]["lq"] is None and items[1]["subject"] == "IXI002"
    assert Path(items[1]["hq"]).is_absolute()
    with pytest.raises(DataError, match=r"datalist\.json: 'validation' item 0: missing key 'task'"):
        load_datalist(tmp_path / "datalist.json", split="validation")
    assert load_datalist(tmp_path / "datalist.json", "validation", default_task="mri_sr")[0]["task"] == "mri_sr"


def test_datalist_unknown_task_lists_known_tasks(tmp_path):
    write_nifti(tmp_path / "v.nii.gz", np.zeros((8, 8, 3)))
    (tmp_path / "dl.json").write_text(json.dumps({"training": [{"hq": "v.nii.gz", "task": "xray_sr"}]}))
    msg = r"dl\.json: 'training' item 0: unknown task 'xray_sr'; known tasks: mri_sr, ct_denoise, pet_synthesis"
    with pytest.raises(UnknownTaskError, match=msg):
        load_datalist(tmp_path / "dl.json")


def test_datalist_bad_entries_are_named(tmp_path):
    (tmp_path / "dl.json").write_text(json.dumps({"training": [{"lq": "a.nii", "task": "mri_sr"}]}))
    with pytest.raises(DataError, match=r"dl\.json: 'training' item 0: missing required key 'hq'"):
        load_datalist(tmp_path / "dl.json")
    (tmp_path / "dl2.json").write_text(json.dumps({"training": [{"hq": "missing.nii.gz", "task": "mri_sr"}]}))
    with pytest.raises(DataError, match=r"dl2\.json: 'training' item 0: hq file .*missing\.nii\.gz does not exist"):
        load_datalist(tmp_path / "dl2.json")
    with pytest.raises(DataError, match=r"dl2\.json: bad datalist: Data list test not specified"):
        load_datalist(tmp_path / "dl2.json", split="test")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        load_datalist(tmp_path / "broken.json")


# ---- volumes -> slices ---------------------------------------------------------------------------------
def test_expand_keeps_central_mri_slices(tmp_path):
    depth = get_task("mri_sr").central_slices + 20
    vol = np.zeros((16, 12, depth), np.float32)
    vol[..., :] = np.arange(depth)  # slice k has value k everywhere
    items = [{"task": "mri_sr", "hq": str(write_nifti(tmp_path / "t2.nii.gz", vol)), "lq": None}]
    slices = expand_to_slices(items)
    assert [s["slice"] for s in slices] == list(range(10, 10 + depth - 20))
    ds = restoration_dataset(items, train=False, cache="none")
    sample = ds[5]
    assert float(sample["hq"].max() * 4095.0) == pytest.approx(15.0, abs=1e-3)  # slice index 15


def test_expand_drops_air_only_ct_slices(tmp_path):
    vol = np.full((16, 16, 6), -1024.0, np.float32)
    vol[4:12, 4:12, [1, 2, 4]] = 40.0  # soft tissue in three slices
    hq = write_nifti(tmp_path / "ct.nii.gz", vol)
    lq = write_nifti(tmp_path / "ct_lq.nii.gz", vol + 10.0)
    slices = expand_to_slices([{"task": "ct_denoise", "hq": str(hq), "lq": str(lq)}])
    assert [s["slice"] for s in slices] == [1, 2, 4]


def test_expand_shape_mismatch_names_both_volumes(tmp_path):
    hq = write_nifti(tmp_path / "a_hq.nii.gz", np.zeros((8, 8, 4)))
    lq = write_nifti(tmp_path / "a_lq.nii.gz", np.zeros((8, 8, 5)))
    with pytest.raises(DataError, match=r"LQ .*a_lq\.nii\.gz has shape \(8, 8, 5\) but HQ .*a_hq\.nii\.gz has shape"):
        expand_to_slices([{"task": "mri_sr", "hq": str(hq), "lq": str(lq)}])


def test_hq_only_items_get_simulated_lq_seeded_per_slice(tmp_path):
    vol = np.full((48, 48, 4), -1024.0, np.float32)
    yy, xx = np.mgrid[:48, :48]
    vol[(yy - 24) ** 2 + (xx - 24) ** 2 < 18**2] = 40.0  # a water-like disc in air
    hq = write_nifti(tmp_path / "ct.nii.gz", vol)
    items = [{"task": "ct_denoise", "hq": str(hq), "lq": None}]
    a = restoration_dataset(items, train=False, seed=1, num_workers=2)  # cache filled by two threads
    b = restoration_dataset(items, train=False, cache="none", seed=1)
    c = restoration_dataset(items, train=False, seed=2)
    assert len(a) == 4
    s0, s1 = a[0], a[1]
    assert not torch.equal(s0["lq"], s0["hq"])  # noise was added
    for k in range(4):  # cached (threaded) == uncached: seeded per slice
        assert torch.equal(a[k]["lq"], b[k]["lq"]), k
    assert not torch.equal(s0["lq"], c[0]["lq"])  # another seed, another realisation
    assert not torch.equal(s0["lq"] - s0["hq"], s1["lq"] - s1["hq"])  # slices get independent noise
    disc = s0["hq"][0] > 0.2
    assert abs(float((s0["lq"][0] - s0["hq"][0])[disc].mean())) < 0.01  # noise, no bias


# ---- datasets ------------------------------------------------------------------------------------------
def test_training_samples_share_one_random_window(tmp_path):
    make_layout(tmp_path, "MRI", "train", ["a.nii", "b.nii"], shape=(150, 140))
    make_layout(tmp_path, "CT", "train", ["c.nii"], shape=(130, 160), low=-1024, high=3071)
    ds = restoration_dataset(scan_authors_layout(tmp_path, "train"), train=True, patch_size=128)
    assert get_task_labels(ds) == [0, 0, 1]
    for i in range(len(ds)):
        s = ds[i]
        assert set(s) == {"lq", "hq", "task", "task_name", "file", "slice"}
        assert s["lq"].shape == s["hq"].shape == (1, 128, 128)
        assert s["lq"].dtype == torch.float32 and type(s["lq"]) is torch.Tensor
        assert 0.0 <= float(s["hq"].min()) and float(s["hq"].max()) <= 1.0
        assert s["task"] == get_task(s["task_name"]).index
        if s["task_name"] == "mri_sr":  # LQ = HQ / 2 pixel-wise: the same window was cut from both
            torch.testing.assert_close(s["lq"], s["hq"] / 2, atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(s["lq"], s["hq"], atol=1e-6, rtol=0)
    # windows are random: two draws of the same item differ
    assert not torch.equal(ds[0]["hq"], ds[0]["hq"])


def test_validation_returns_whole_normalised_slices(tmp_path):
    make_layout(tmp_path, "CT", "validation", ["c.nii"], shape=(48, 40), low=-2000, high=4000)
    ds = restoration_dataset(scan_authors_layout(tmp_path, "validation"), train=False)
    s = ds[0]
    assert s["hq"].shape == (1, 48, 40)
    hq_hu = nib.load(tmp_path / "CT" / "validation" / "HQ" / "c.nii").get_fdata()
    expected = (np.clip(hq_hu, -1024, 3071) + 1024) / 4095
    np.testing.assert_allclose(s["hq"][0].numpy(), expected, atol=1e-6)
    assert float(s["hq"].min()) == 0.0 and float(s["hq"].max()) == 1.0  # clipped at both ends
    assert s["file"].endswith("HQ/c.nii") and s["slice"] == -1


def test_disk_cache_writes_once_and_reads_back(tmp_path):
    make_layout(tmp_path / "data", "MRI", "validation", ["a.nii"], shape=(32, 32))
    items = scan_authors_layout(tmp_path / "data", "validation")
    cache = tmp_path / "cache"
    first = restoration_dataset(items, train=False, cache="disk", cache_dir=cache)[0]
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 1
    second = restoration_dataset(items, train=False, cache="disk", cache_dir=cache)[0]
    assert torch.equal(first["hq"], second["hq"]) and sorted(cache.glob("*.pt")) == files


def test_hq_only_pet_items_get_lq_that_differs_by_counting_noise_only(tmp_path):
    """A real full-dose PET given without its pair: LQ = HQ + the simulated extra noise of 1/12 dose, on the HQ's
    own resolution and mean (no blur, no bias), unlike a re-projected reconstruction of it."""
    from medir_monai.data.dataset import degradation_for
    from medir_monai.transforms import LowDosePET

    vol = np.zeros((96, 96, 3), np.float32)
    yy, xx = np.mgrid[:96, :96]
    body = (yy - 48) ** 2 + (xx - 48) ** 2 < 40**2  # a 32 cm body at 4 mm pixels
    vol[body] = 1.5  # SUV
    vol[(yy - 40) ** 2 + (xx - 56) ** 2 < 3**2] = 10.0  # a small hot lesion: blur would lower it
    hq_path = tmp_path / "pet.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([4.0, 4.0, 4.0, 1.0])), str(hq_path))
    items = [{"task": "pet_synthesis", "hq": str(hq_path), "lq": None}]
    ds = restoration_dataset(items, train=False, cache="none", seed=3)
    suv = get_task("pet_synthesis").denormalise
    # PET is cut coronally (slice_axis 1) but its noise is simulated in the axial planes of the whole volume:
    # put the coronal slices back together and look at the middle axial plane
    hq_vol, lq_vol = torch.zeros(96, 96, 3), torch.zeros(96, 96, 3)
    for k, item in enumerate(expand_to_slices(items)):
        pair = ds[k]
        hq_vol[:, item["slice"], :], lq_vol[:, item["slice"], :] = suv(pair["hq"][0]), suv(pair["lq"][0])
    hq, lq = hq_vol[..., 1], lq_vol[..., 1]
    assert torch.equal(ds[len(ds) // 2]["lq"], ds[len(ds) // 2]["lq"])  # deterministic (seeded per volume)
    inside = torch.from_numpy(body)
    assert float(lq[inside].mean() / hq[inside].mean()) == pytest.approx(1.0, abs=0.02)  # same mean within 2 %
    noise = (lq - hq)[inside]
    assert float(noise.std()) > 0.1  # 1/12 dose is noisy
    # blur would leave a difference that follows the HQ's edges (its high-pass); noise does not
    from monai.networks.layers import GaussianFilter

    def edge_correlation(image: torch.Tensor) -> float:
        edges = hq - GaussianFilter(2, 1.5)(hq[None, None])[0, 0]
        diff = image - hq
        return float(torch.corrcoef(torch.stack([diff.flatten(), edges.flatten()]))[0, 1])

    assert abs(edge_correlation(lq)) < 0.15
    assert float(lq[38:43, 54:59].mean()) == pytest.approx(float(hq[38:43, 54:59].mean()), abs=1.5)  # lesion kept
    assert degradation_for("pet_synthesis").mode == "insert_noise"
    # the reconstruction mode, for an activity phantom, blurs it (PSF + OSEM): the contrast with the above
    recon = LowDosePET(dose_fraction=1.0 / 12.0, pixel_size_mm=4.0, mode="reconstruct")
    recon.set_random_state(0)
    blurred = recon(hq[None])[0]
    assert edge_correlation(blurred) < -0.3
    assert float(blurred[38:43, 54:59].mean()) < float(hq[38:43, 54:59].mean()) - 2.0
    with pytest.raises(ValueError, match="mode must be one of"):
        LowDosePET(mode="simulate")


def test_slices_follow_the_task_slice_axis(tmp_path):
    """PET volumes are cut coronally (192x192x400 -> 192 slices of 192x400), MRI / CT axially (Task.slice_axis)."""
    import nibabel as nib
    import numpy as np

    from medir_monai.data import expand_to_slices
    from medir_monai.data.dataset import LoadSlicePaird
    from medir_monai.data.profile import _item_slice
    from medir_monai.tasks import get_task

    assert (get_task("pet_synthesis").slice_axis, get_task("ct_denoise").slice_axis) == (1, 2)
    volume = np.zeros((6, 5, 8), dtype=np.float32)
    volume[1:5, 1:4, :] = np.arange(8, dtype=np.float32)[None, None, :] + 1  # every Y plane holds activity
    path = tmp_path / "pet.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 3.0, 4.0, 1.0])), str(path))
    items = expand_to_slices([{"task": "pet_synthesis", "hq": str(path), "lq": None}])
    assert [it["slice"] for it in items] == [1, 2, 3]  # coronal planes with activity (air threshold)
    loaded = LoadSlicePaird()(items[1])
    assert tuple(loaded["hq"].shape) == (1, 6, 8) and loaded["spacing"] == (2.0, 4.0)
    np.testing.assert_array_equal(loaded["hq"][0].numpy(), volume[:, 2, :])
    data, spacing = _item_slice(items[1])
    assert tuple(data.shape) == (6, 8) and spacing == 3.0
    ct = expand_to_slices([{"task": "ct_denoise", "hq": str(path), "lq": None}])
    assert len(ct) == 8 and tuple(LoadSlicePaird()(ct[0])["hq"].shape) == (1, 6, 5)
