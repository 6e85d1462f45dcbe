"""The trained weights shipped in the package (``medir_monai/weights``): manifest, sha256, size, loading through
``bundles/<name>/configs/pretrained.json``, the training profile they carry, and one restored slice of each
test source (real MR and CT of sources the weights never saw in training) that must beat its degraded input.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medir_monai import weights
from medir_monai.weights import MAX_FILE_BYTES, WeightsError, manifest, sha256_of, weights_file

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("amir", "restormer", "tat")

pytestmark = pytest.mark.usefixtures("one_thread")


def pretrained_config(name: str) -> Path:
    return REPO / "bundles" / name / "configs" / "pretrained.json"


@pytest.mark.parametrize("name", SHIPPED)
def test_manifest_entry_matches_the_shipped_file(name):
    entry = manifest()[name]
    path = weights_file(name)  # verifies the sha256
    assert path.parent == Path(weights.__file__).parent
    assert path.stat().st_size == entry["bytes"] < MAX_FILE_BYTES
    assert sha256_of(path) == entry["sha256"] and len(entry["sha256"]) == 64
    assert (REPO / entry["card"]).is_file() and (REPO / entry["config"]).samefile(pretrained_config(name))
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert set(saved) == {"model", "training_profile"}
    dtypes = {v.dtype for v in saved["model"].values() if torch.is_floating_point(v)}
    assert dtypes == {getattr(torch, entry["dtype"])}
    assert sum(v.numel() for v in saved["model"].values() if torch.is_floating_point(v)) == entry["parameters"]
    assert set(saved["training_profile"]["tasks"]) == {"mri_sr", "ct_denoise", "pet_synthesis"}


@pytest.fixture
def amir_copy(tmp_path, monkeypatch) -> Path:
    """The package's weights copied to ``tmp_path`` and made the shipped ones; returns the copy of ``amir.pt``."""
    copy = tmp_path / "weights"
    shutil.copytree(Path(weights.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    monkeypatch.setattr(weights, "WEIGHTS_DIR", copy)
    return copy / manifest()["amir"]["file"]


def test_weights_file_names_what_is_wrong(amir_copy):
    with pytest.raises(WeightsError, match=r"no shipped weights for model 'diffcode' \(shipped: amir, restormer, tat\)"):
        weights_file("diffcode")
    target = amir_copy
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 .* differs from the manifest"):
        weights_file("amir")
    assert weights_file("amir", verify=False) == target
    target.unlink()
    with pytest.raises(WeightsError, match="missing; reinstall"):
        weights_file("amir")


def test_medir_restore_refuses_damaged_shipped_weights(tmp_path, amir_copy, capsys):
    """A damaged install gives one line and status 2, and writes nothing."""
    from medir_monai.cli import main

    target = amir_copy
    target.write_bytes(target.read_bytes()[:-100])
    scan = tmp_path / "scan.nii.gz"
    import nibabel as nib

    nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)).to_filename(str(scan))
    status = main(["restore", "--bundle", str(REPO / "bundles" / "amir"), "--config", str(pretrained_config("amir")),
                   "--task", "ct_denoise", "--input", str(scan), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "sha256" in err and "reinstall medir-monai" in err, err
    assert not (tmp_path / "out").exists()


def test_bundles_and_their_configs_are_found_by_name():
    from medir_monai.bundle import find_bundle, find_bundle_config

    assert find_bundle("amir") == REPO / "bundles" / "amir"
    assert find_bundle(REPO / "bundles" / "tat") == REPO / "bundles" / "tat"
    assert find_bundle_config("amir", "pretrained") == pretrained_config("amir")
    assert find_bundle_config("amir", "pretrained.json") == pretrained_config("amir")
    assert find_bundle_config("amir", pretrained_config("tat")) == pretrained_config("tat")  # a path wins
    with pytest.raises(ValueError, match=r"nope: not a bundle folder .* amir, diffcode, restormer, tat"):
        find_bundle("nope")
    with pytest.raises(ValueError, match=r"fast.json: config file does not exist .*pretrained.json"):
        find_bundle_config("amir", "fast.json")


@pytest.mark.parametrize("name", SHIPPED)
def test_pretrained_config_loads_the_shipped_network(name):
    from medir_monai.deploy.models import load_bundle_network

    network, info = load_bundle_network(REPO / "bundles" / name, config_files=[pretrained_config(name)])
    assert Path(info["checkpoint"]) == weights_file(name)
    shipped = torch.load(weights_file(name), map_location="cpu", weights_only=True)
    for key, value in network.state_dict().items():
        assert value.dtype == torch.float32, key  # half-precision storage is widened on load
        torch.testing.assert_close(value, shipped["model"][key].to(value.dtype), rtol=0, atol=0)
    assert info["training_profile"] == shipped["training_profile"]
    config = json.loads(pretrained_config(name).read_text())
    assert info["settings"] == {key: config[key] for key in ("intensity_reference", "safeguard", "flip_ensemble")}
    assert info["settings"]["flip_ensemble"] is True  # the restoration the cards measure


@pytest.mark.parametrize("name", SHIPPED)
def test_metadata_describes_the_shipped_weights(name):
    """``metadata.json`` names the shipped weights and their measured figures; MONAI's checks pass with them."""
    from monai.bundle import verify_net_in_out

    bundle = REPO / "bundles" / name
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert "pretrained.json" in meta["changelog"][meta["version"]] and "not for clinical use" in meta["intended_use"]
    shipped = meta["eval_metrics"]["shipped_weights_test_sources"]
    assert set(shipped) == {"mri_sr", "ct_denoise", "pet_synthesis"}
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=[str(bundle / "configs" / "inference.json"), str(pretrained_config(name))],
                      device="cpu", p=1, n=1, any=8)


@pytest.fixture(scope="module")
def test_sources(tmp_path_factory):
    """One slice of each MR / CT / PET test source of the corpus (never in the shipped weights' training)."""
    from medir_monai.data.demo import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", max_slices=1, splits=("test",))


@pytest.mark.parametrize("task, folder", [("mri_sr", "MRI"), ("ct_denoise", "CT"), ("pet_synthesis", "PET")])
def test_shipped_amir_improves_a_slice_of_an_unseen_source(test_sources, task, folder):
    from medir_monai.data import load_image
    from medir_monai.deploy.models import load_restoration_model
    from medir_monai.restore import restore_array
    from medir_monai.metrics import paper_metrics
    from medir_monai.transforms import ScaleToReference

    model = load_restoration_model(REPO / "bundles" / "amir", config_files=[pretrained_config("amir")])
    lq_file = sorted((test_sources / folder / "test" / "LQ").glob("*.nii.gz"))[0]
    lq = load_image(lq_file).squeeze()
    hq = load_image(lq_file.parent.parent / "HQ" / lq_file.name).squeeze()
    with torch.no_grad():
        restored = restore_array(model.network, lq, task, roi_size=model.roi_size, progress=False, **model.settings)
    # the bundles' metric convention: an MR slice is measured after the per-scan normalisation the model uses (the
    # LQ sets the factor), so raw values above the task's window are not clipped away
    reference = model.settings.get("intensity_reference", {}).get(task)
    factor = ScaleToReference(**reference).factor_of(torch.as_tensor(lq)) if reference else 1.0
    lq, hq, restored = (torch.as_tensor(np.asarray(x)) * factor for x in (lq, hq, restored))
    before = paper_metrics(lq, hq, task, normalised=False)
    after = paper_metrics(restored, hq, task, normalised=False)
    assert float(after["psnr"]) > float(before["psnr"]), (lq_file.name, before, after)
    assert float(after["ssim"]) > float(before["ssim"]), (lq_file.name, before, after)


def test_the_wheel_carries_the_weights_and_their_manifest(tmp_path):
    """``pip wheel`` of the project (built from a copy, so the checkout stays clean) holds every manifest file,
    byte for byte."""
    import hashlib
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in ("medir_monai", "transforms", "bundles"):  # bundles without trained models / runs / eval outputs
        shutil.copytree(REPO / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "models", "runs", "eval"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("medir_monai-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = set(archive.namelist())
        for init in sorted((REPO / "medir_monai").rglob("__init__.py")):
            assert f"medir_monai/{init.relative_to(REPO / 'medir_monai')}" in packaged, f"{init}: package not in the wheel"
        shipped = json.loads(archive.read("medir_monai/weights/MANIFEST.json"))
        assert shipped == manifest()
        for name, entry in shipped.items():
            data = archive.read(f"medir_monai/weights/{entry['file']}")
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        for name in SHIPPED:  # the configs a pip install needs to restore with the shipped weights
            for config in ("inference.json", "pretrained.json", "metadata.json"):
                assert f"medir_monai/bundles/{name}/configs/{config}" in packaged, (name, config)
            assert f"medir_monai/bundles/{name}/docs/model_card.md" in packaged, name
        site = tmp_path / "site"
        archive.extractall(site)

    # the unpacked wheel as a pip install would lay it out, run from a folder without bundles/: restore by names
    scan = tmp_path / "work" / "head_ct.nii.gz"
    scan.parent.mkdir()
    import nibabel as nib

    hu = np.random.default_rng(0).normal(40.0, 20.0, (48, 48)).astype(np.float32)
    hu[:, :6] = -1000.0  # some air
    nib.Nifti1Image(hu, np.diag([0.7, 0.7, 5.0, 1.0])).to_filename(str(scan))
    run = subprocess.run(
        [sys.executable, "-c", "import sys, medir_monai.cli as cli; print(cli.__file__); sys.exit(cli.main(sys.argv[1:]))",
         "restore", "--bundle", "amir", "--config", "pretrained.json", "--task", "ct_denoise",
         "--input", str(scan), "--output", "restored"],
        cwd=scan.parent, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(str(site)), run.stdout  # the wheel's copy ran, not the checkout
    written = list((scan.parent / "restored").rglob("*.nii.gz"))
    assert len(written) == 1 and nib.load(str(written[0])).shape[:2] == (48, 48)


@pytest.mark.parametrize("name", ["amir", "restormer", "tat"])
def test_guard_of_the_shipped_weights_is_silent_on_the_test_sources(test_sources, name):
    """The test sources are other patients / scanners of the kinds the weights trained on: no warning; the same
    slices far outside (0.1 mm pixels) are flagged."""
    import nibabel as nib

    from medir_monai.data import load_image
    from medir_monai.data.profile import check_scan

    profile = torch.load(weights_file(name), weights_only=True, map_location="cpu")["training_profile"]
    for task, folder in (("mri_sr", "MRI"), ("ct_denoise", "CT"), ("pet_synthesis", "PET")):
        lq_file = sorted((test_sources / folder / "test" / "LQ").glob("*.nii.gz"))[0]
        lq = np.asarray(load_image(lq_file).squeeze())
        pixel = float(abs(nib.load(str(lq_file)).affine[0, 0]))
        assert check_scan(profile, lq, task, pixel) == [], (name, lq_file.name)
        assert any("pixel size" in r for r in check_scan(profile, lq, task, 0.1)), (name, task)
