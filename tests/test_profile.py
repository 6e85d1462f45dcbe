"""Training profiles (``medir_monai.data.profile``): what the training data looked like, and the input guard of
``medir restore`` (a warning naming the numbers; ``--strict`` refuses with exit status 2 and writes nothing)."""

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from medir_monai.cli import main
from medir_monai.data.profile import check_scan, profile_items, slice_statistics
from medir_monai.handlers import BestModelSaver
from medir_monai.networks import load_official_state_dict
from medir_monai.networks.restormer import Restormer

REPO = Path(__file__).resolve().parents[1]
TINY_NET = {"network_def#dim": 8, "network_def#num_blocks": [1, 1, 1, 1], "network_def#num_refinement_blocks": 1,
            "patch_size": [32, 32]}


def _ct_slice(size: int, noise: float, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    image = np.where(yy**2 + xx**2 < 0.4**2, 40.0, -1000.0).astype(np.float32)
    image[(yy**2 + xx**2 < 0.1**2)] = 900.0  # bone-like insert
    return image + np.random.default_rng(seed).normal(0, noise, image.shape).astype(np.float32)


def _write(path: Path, image: np.ndarray, pixel_mm: float) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, np.diag([pixel_mm, pixel_mm, 1.0, 1.0])), str(path))
    return str(path)


@pytest.fixture(scope="module")
def ct_items(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    return [{"task": "ct_denoise", "hq": _write(root / f"hq{i}.nii.gz", _ct_slice(64, 0.0, i), 0.7),
             "lq": _write(root / f"lq{i}.nii.gz", _ct_slice(64, 20.0, i), 0.7)} for i in range(3)]


def test_profile_ranges_and_their_widening_by_robust_training(ct_items):
    plain = profile_items(ct_items)["tasks"]["ct_denoise"]
    assert plain["slices"] == 3
    assert plain["pixel_size_mm"] == pytest.approx([0.7, 0.7])
    assert plain["grid"] == [64.0, 64.0]
    assert 15.0 < plain["noise_std"][0] <= plain["noise_std"][1] < 25.0  # the 20 HU inserted
    robust = {"zoom_range": [0.5, 1.25], "ct_dose_range": [0.1, 1.0]}
    wide = profile_items(ct_items, robust=robust)["tasks"]["ct_denoise"]
    assert wide["pixel_size_mm"] == pytest.approx([0.7 / 1.25, 0.7 / 0.5])
    assert wide["grid"] == pytest.approx([32.0, 80.0])
    low, high = plain["noise_std"]
    assert wide["noise_std"] == pytest.approx([low * 0.5 * np.sqrt(0.25 / 1.0), high * np.sqrt(0.25 / 0.1)])
    normalised = profile_items(ct_items, intensity_reference={"ct_denoise": {"reference": 1.0}})
    assert normalised["tasks"]["ct_denoise"]["intensity_p99"] is None
    json.dumps(wide)  # stored in checkpoints: plain JSON-able values


def test_mri_grid_is_widened_only_when_the_zoom_option_names_mri(tmp_path):
    yy, xx = np.mgrid[:64, :64] / 64 - 0.5
    head = np.where(yy**2 + xx**2 < 0.35**2, 800.0, 0.0).astype(np.float32)
    hq, lq = (_write(tmp_path / f"{name}.nii.gz", head, 1.0) for name in ("hq", "lq"))
    items = [{"task": "mri_sr", "hq": hq, "lq": lq}]
    zoom = {"zoom_range": [0.5, 1.25]}
    default = profile_items(items, robust=zoom)["tasks"]["mri_sr"]
    assert default["grid"] == [64.0, 64.0] and default["pixel_size_mm"] == pytest.approx([1.0, 1.0])
    named = profile_items(items, robust={**zoom, "zoom_tasks": ["ct_denoise", "mri_sr"]})["tasks"]["mri_sr"]
    assert named["grid"] == pytest.approx([32.0, 80.0])
    assert named["pixel_size_mm"] == pytest.approx([1.0 / 1.25, 1.0 / 0.5])


def test_pet_scale_widens_intensity_and_noise_of_the_pet_profile(tmp_path):
    def pet(seed: int, noise: float) -> np.ndarray:
        yy, xx = np.mgrid[:64, :64] / 64 - 0.5
        body = np.where(yy**2 + xx**2 < 0.35**2, 1.5, 0.0).astype(np.float32)
        return body + (body > 0) * np.random.default_rng(seed).normal(0, noise, body.shape).astype(np.float32)

    items = [{"task": "pet_synthesis", "hq": _write(tmp_path / f"hq{i}.nii.gz", pet(i, 0.0), 2.0),
              "lq": _write(tmp_path / f"lq{i}.nii.gz", pet(i, 0.1), 2.0)} for i in range(2)]
    plain = profile_items(items)["tasks"]["pet_synthesis"]
    wide = profile_items(items, robust={"pet_scale_range": [0.5, 2.0]})["tasks"]["pet_synthesis"]
    for key in ("intensity_p99", "noise_std"):
        assert wide[key] == pytest.approx([plain[key][0] * 0.5, plain[key][1] * 2.0])
    assert wide["pixel_size_mm"] == plain["pixel_size_mm"]  # a scale changes no geometry
    # an SUV-scaled scan of the same body: outside the plain profile, inside the widened one
    profile = {"version": 1, "tasks": {"pet_synthesis": plain}}
    assert any("intensity" in r for r in check_scan(profile, 1.8 * pet(5, 0.1), "pet_synthesis", 2.0))
    assert check_scan({"version": 1, "tasks": {"pet_synthesis": wide}}, 1.8 * pet(5, 0.1), "pet_synthesis", 2.0) == []


def test_check_scan_names_what_lies_outside(ct_items):
    profile = profile_items(ct_items)
    assert check_scan(profile, _ct_slice(64, 20.0, 7), "ct_denoise", 0.7) == []
    reasons = check_scan(profile, _ct_slice(64, 20.0, 7), "ct_denoise", 0.96)
    assert reasons == ["pixel size 0.96 mm outside the training range 0.70-0.70 mm"]
    big_clean = check_scan(profile, _ct_slice(256, 3.0, 8), "ct_denoise", 0.7)
    assert any(r.startswith("image size 256 pixels outside") for r in big_clean)
    assert any(r.startswith("noise level") and "HU outside the training range" in r for r in big_clean)
    volume = np.stack([_ct_slice(64, 20.0, k) for k in range(4)], axis=-1)  # (H, W, D): median over slices
    assert check_scan(profile, volume, "ct_denoise", 0.7) == []
    assert check_scan(profile, np.zeros((32, 32)), "mri_sr") == ["the model was not trained on mri_sr"]
    assert check_scan(None, np.zeros((32, 32)), "mri_sr") == []  # no profile: nothing to say
    stats = slice_statistics(_ct_slice(64, 0.0, 1), "ct_denoise")
    assert stats["noise_std"] == 0.0 and "pixel_size_mm" not in stats


def test_best_model_saver_stores_the_profile_and_loaders_read_both_forms(tmp_path, ct_items):
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    net = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    profile = profile_items(ct_items)
    saver = BestModelSaver(str(tmp_path), net, profile=profile)
    saver(SimpleNamespace(state=SimpleNamespace(key_metric_name="psnr", metrics={"psnr": 30.0})))
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["training_profile"] == profile and set(saved) == {"model", "training_profile"}
    other = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    load_official_state_dict(other, tmp_path / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    third = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    loader = CheckpointLoader(load_path=str(tmp_path / "model.pt"), load_dict={"model": third}, map_location="cpu")
    loader(Engine(lambda engine, batch: None))  # MONAI's loader, as in the bundles' inference.json
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), third.state_dict().values()))


def test_medir_restore_warns_or_refuses_inputs_outside_the_profile(tmp_path, ct_items, capsys):
    net = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    torch.save({"model": net.state_dict(), "training_profile": profile_items(ct_items)}, tmp_path / "guarded.pt")
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(TINY_NET))
    inside = _write(tmp_path / "in" / "inside.nii.gz", _ct_slice(64, 20.0, 5), 0.7)
    outside = _write(tmp_path / "out_of_range" / "wide.nii.gz", _ct_slice(64, 20.0, 6), 0.96)

    def restore(ckpt, src, out, *extra):
        return main(["restore", "--bundle", str(REPO / "bundles" / "restormer"), "--config", str(tiny), "--checkpoint",
                     str(tmp_path / ckpt), "--input", src, "--output", str(tmp_path / out), "--task", "ct_denoise",
                     *extra])

    assert restore("guarded.pt", inside, "a") == 0
    assert "warning" not in capsys.readouterr().err
    assert restore("guarded.pt", outside, "b") == 0  # written, with one warning naming the numbers
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "pixel size 0.96 mm outside the training range 0.70-0.70 mm" in warnings[0]
    assert (tmp_path / "b" / "wide_restored.nii.gz").is_file()
    assert restore("guarded.pt", outside, "c", "--strict") == 2  # refused: nothing written
    assert "--strict" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert restore("guarded.pt", inside, "d", "--strict") == 0
    assert restore("plain.pt", outside, "e") == 0  # an older checkpoint: restored as before, with a note
    assert "records no training profile" in capsys.readouterr().err


def test_bundle_inference_warns_or_refuses_through_its_input_guard(tmp_path, ct_items):
    """``python -m monai.bundle run`` with inference.json: the InputGuard handler logs the same reasons, and
    ``--strict true`` stops before the scan is written."""
    from monai.bundle import ConfigWorkflow

    net = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    torch.save({"model": net.state_dict(), "training_profile": profile_items(ct_items)}, tmp_path / "model.pt")
    _write(tmp_path / "in" / "wide.nii.gz", _ct_slice(64, 20.0, 6), 0.96)
    configs = [str(REPO / "bundles" / "restormer" / "configs" / "inference.json")]
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(TINY_NET))

    def run(out: str, strict: bool):
        workflow = ConfigWorkflow(config_file=configs + [str(tiny)], workflow_type="infer", ckpt_path=str(tmp_path / "model.pt"),
                                  dataset_dir=str(tmp_path / "in"), output_dir=str(tmp_path / out), task="ct_denoise",
                                  strict=strict)
        workflow.initialize()
        guard = next(h for h in workflow.parser.get_parsed_content("handlers") if type(h).__name__ == "InputGuard")
        return workflow, guard

    workflow, guard = run("warned", False)
    workflow.run()
    assert guard.warnings == [f"{tmp_path / 'in' / 'wide.nii.gz'} lies outside the model's training data (ct_denoise): "
                              "pixel size 0.96 mm outside the training range 0.70-0.70 mm"]
    assert (tmp_path / "warned" / "wide_restored.nii.gz").is_file()
    workflow, guard = run("refused", True)
    with pytest.raises(Exception) as raised:
        workflow.run()
    causes, cause = [], raised.value
    while cause is not None:  # MONAI wraps errors raised in an evaluator
        causes.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    assert any(c.startswith("strict: ") and "pixel size 0.96 mm" in c for c in causes), causes
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


def test_monai_ckpt_export_reads_a_profiled_model_pt_with_key_in_ckpt(tmp_path, ct_items):
    """The bundle docs' export command (``--key_in_ckpt model``) works on the model.pt a bundle training writes."""
    from monai.bundle import ckpt_export

    net = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    saver = BestModelSaver(str(tmp_path), net, profile=profile_items(ct_items))
    saver(SimpleNamespace(state=SimpleNamespace(key_metric_name="psnr", metrics={"psnr": 1.0})))
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(TINY_NET))
    configs = REPO / "bundles" / "restormer" / "configs"
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
                key_in_ckpt="model", meta_file=str(configs / "metadata.json"),
                config_file=[str(configs / "inference.json"), str(tiny)], use_trace=True, input_shape=[1, 1, 32, 32])
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(exported(x), net.eval()(x), atol=1e-5)


def test_profile_reads_volume_slices_as_the_training_datasets_do(tmp_path):
    """A 3-D volume stored in another orientation: the profile measures the slices the dataset trains on (RAS,
    sliced along the last axis), not the file's own last axis."""
    from medir_monai.data import expand_to_slices, restoration_dataset

    volume = np.full((6, 40, 24), 40.0, np.float32)  # file axes: (slice, rows, columns)
    affine = np.array([[0, 0, 0.5, 0], [0, 0.5, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]], dtype=float)  # axis 0 is S-I
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "ct.nii.gz"))
    items = expand_to_slices([{"task": "ct_denoise", "hq": str(tmp_path / "ct.nii.gz"), "lq": str(tmp_path / "ct.nii.gz")}])
    sample = restoration_dataset(items, train=False, cache="none")[0]
    entry = profile_items(items)["tasks"]["ct_denoise"]
    assert entry["grid"] == [float(max(sample["hq"].shape[1:]))] * 2 == [40.0, 40.0]
    assert entry["pixel_size_mm"] == pytest.approx([0.5, 0.5])  # in-plane, not the 3 mm slice gap
