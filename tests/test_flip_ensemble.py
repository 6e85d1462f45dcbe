"""Test-time flip ensemble: the inferer, restore_array's option, the bundle configs, ``medir restore`` and Deploy."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer, SlidingWindowInferer

from medir_monai.cli import main
from medir_monai.restore import FLIP_VIEWS, FlipEnsembleInferer, restore_array
from medir_monai.tasks import get_task

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ("amir", "tat", "restormer", "diffcode")


def lopsided_conv(seed: int = 0) -> torch.nn.Module:
    """A 3x3 convolution with a random (so neither left-right nor up-down symmetric) kernel."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    return conv.eval()


def test_the_ensemble_is_the_mean_of_the_four_mirrored_passes():
    net = lopsided_conv()
    x = torch.rand(2, 1, 12, 10)
    with torch.no_grad():
        single = net(x)
        expected = (net(x) + net(x.flip(-1)).flip(-1) + net(x.flip(-2)).flip(-2) + net(x.flip(-2, -1)).flip(-2, -1)) / 4
        ensemble = FlipEnsembleInferer(SimpleInferer())(x, net)
        disabled = FlipEnsembleInferer(SimpleInferer(), enabled=False)(x, net)
    assert torch.allclose(ensemble, expected, atol=1e-6)
    assert not torch.allclose(ensemble, single, atol=1e-3)  # the kernel is lopsided, so the views differ
    assert torch.equal(disabled, single)
    # averaging over the mirrors turns the kernel into its symmetrised version: the output is flip-equivariant
    with torch.no_grad():
        mirrored = FlipEnsembleInferer(SimpleInferer())(x.flip(-1), net).flip(-1)
    assert torch.allclose(mirrored, ensemble, atol=1e-6)


def test_a_shift_is_averaged_with_its_mirror():
    shift = lambda x: torch.roll(x, 1, -1)  # noqa: E731  (moves everything one column right)
    row = torch.arange(4.0).reshape(1, 1, 1, 4)
    out = FlipEnsembleInferer(SimpleInferer(), views=((), (-1,)))(row, shift)
    assert out.flatten().tolist() == [2.0, 1.0, 2.0, 1.0]  # mean of the right shift and the left shift


def test_bad_views_are_refused():
    with pytest.raises(ValueError, match="at least one view"):
        FlipEnsembleInferer(SimpleInferer(), views=())
    with pytest.raises(ValueError, match="dims -2 / -1"):
        FlipEnsembleInferer(SimpleInferer(), views=((), (1,)))
    assert FLIP_VIEWS[0] == () and len(set(FLIP_VIEWS)) == 4


def test_restore_array_averages_whole_slices_before_clipping():
    net = lopsided_conv(1)
    hu = np.random.default_rng(0).normal(40, 200, (150, 140)).astype(np.float32)  # larger than the window
    options = dict(task="ct_denoise", roi_size=64, progress=False, clip=False)
    ensemble = restore_array(net, hu, flip_ensemble=True, **options)
    views = [restore_array(net, np.ascontiguousarray(np.flip(hu, axes)), **options) for axes in ((), (1,), (0,), (0, 1))]
    expected = np.mean([np.flip(v, axes) for v, axes in zip(views, ((), (1,), (0,), (0, 1)))], axis=0)
    assert np.allclose(ensemble, expected, atol=1e-3)
    single = views[0]
    assert np.abs(ensemble - single).max() > 1.0  # HU
    clipped = restore_array(net, hu, flip_ensemble=True, task="ct_denoise", roi_size=64, progress=False)
    low, high = get_task("ct_denoise").norm_range
    assert clipped.min() >= low - 1e-3 and clipped.max() <= high + 1e-3


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_configs_switch_the_ensemble_where_restoration_happens(bundle):
    configs = REPO_ROOT / "bundles" / bundle / "configs"
    inference = json.loads((configs / "inference.json").read_text())
    assert inference["flip_ensemble"] is False  # the papers test single-pass
    assert inference["inferer"]["flip_ensemble"] == "@flip_ensemble"
    train = ConfigParser()
    train.read_config([str(configs / "train.json")])
    flip = train.get_parsed_content("validate#inferer", instantiate=True)  # MONAI's val_inferer property
    assert isinstance(flip, FlipEnsembleInferer) and not flip.enabled
    assert isinstance(flip.inferer, SlidingWindowInferer)
    assert train["validate#evaluator#inferer"].replace("::", "#") == "@validate#inferer"
    # evaluate.json measures what restoration writes: it follows flip_ensemble, training validation does not
    evaluate = ConfigParser()
    evaluate.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    evaluate["flip_ensemble"] = True
    assert evaluate.get_parsed_content("validate#inferer", instantiate=True).enabled
    train["flip_ensemble"] = True
    assert not train.get_parsed_content("validate#inferer", instantiate=True).enabled


def test_medir_restore_follows_the_config_unless_told(tmp_path):
    from medir_monai.networks.restormer import Restormer

    torch.manual_seed(0)
    net = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    tiny_net = {"network_def#dim": 8, "network_def#num_blocks": [1, 1, 1, 1], "network_def#num_refinement_blocks": 1,
                "patch_size": [32, 32]}
    on = tmp_path / "on.json"
    on.write_text(json.dumps({**tiny_net, "flip_ensemble": True}))
    hu = np.random.default_rng(1).normal(40, 30, (48, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "slice.nii.gz"))
    base = ["restore", "--bundle", str(REPO_ROOT / "bundles" / "restormer"), "--checkpoint", str(ckpt),
            "--input", str(tmp_path / "slice.nii.gz"), "--task", "ct_denoise"]
    assert main(base + ["--config", str(on), "--output", str(tmp_path / "config_on")]) == 0
    assert main(base + ["--config", str(on), "--output", str(tmp_path / "cli_off"), "--no-flip-ensemble"]) == 0
    written = {name: nib.load(str(tmp_path / name / "slice_restored.nii.gz")).get_fdata()
               for name in ("config_on", "cli_off")}
    options = dict(task="ct_denoise", roi_size=32, progress=False)
    with torch.no_grad():
        expected_on = restore_array(net.eval(), hu, flip_ensemble=True, **options)
        expected_off = restore_array(net, hu, **options)
    assert np.abs(expected_on - expected_off).max() > 1.0  # the untrained network is not flip-equivariant
    assert np.allclose(written["config_on"], expected_on, atol=0.05)
    assert np.allclose(written["cli_off"], expected_off, atol=0.05)


def test_deploy_models_carry_the_setting(tmp_path):
    from medir_monai.deploy.models import load_bundle_network

    torch.manual_seed(0)
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"network_def#dim": 8, "network_def#num_blocks": [1, 1, 1, 1],
                                 "network_def#num_refinement_blocks": 1, "flip_ensemble": True}))
    _, info = load_bundle_network(REPO_ROOT / "bundles" / "restormer", config_files=[extra], untrained=True)
    assert info["settings"]["flip_ensemble"] is True
    _, info = load_bundle_network(REPO_ROOT / "bundles" / "restormer", untrained=True)
    assert info["settings"]["flip_ensemble"] is False


def test_the_main_job_restores_with_the_ensemble_and_validates_single_pass():
    """AMIR quick.json (the README main job): ``medir restore`` and evaluate.json average the four mirrored passes, the
    validation inside training stays one pass (the job's time); the other quick configs keep their one pass."""
    configs = REPO_ROOT / "bundles" / "amir" / "configs"
    restore = ConfigParser()
    restore.read_config([str(configs / "inference.json"), str(configs / "quick.json")])
    assert restore.get_parsed_content("flip_ensemble") is True
    job = ConfigParser()
    job.read_config([str(configs / "train.json"), str(configs / "quick.json")])
    assert not job.get_parsed_content("validate#inferer", instantiate=True).enabled
    evaluate = ConfigParser()
    evaluate.read_config([str(configs / f) for f in ("train.json", "quick.json", "evaluate.json")])
    assert evaluate.get_parsed_content("validate#inferer", instantiate=True).enabled
    for bundle in ("restormer", "tat", "diffcode"):
        quick = json.loads((REPO_ROOT / "bundles" / bundle / "configs" / "quick.json").read_text())
        assert not quick.get("flip_ensemble", False), bundle
