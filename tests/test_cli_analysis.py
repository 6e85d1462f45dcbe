"""`medir compare`, `medir interference` and `medir restore`."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from medir_monai.analysis import compare_evaluations, task_interference
from medir_monai.cli import main
from medir_monai.handlers.report import CSV_FIELDS
from medir_monai.networks.restormer import Restormer

TINY_NET = {"network_def#dim": 8, "network_def#num_blocks": [1, 1, 1, 1], "network_def#num_refinement_blocks": 1}


def _metrics_csv(path, psnr_by_task):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for task, values in psnr_by_task.items():
            for i, v in enumerate(values):
                writer.writerow({"task": task, "file": f"{task}_{i}.nii", "source": "restored", "psnr": v, "ssim": 0.9,
                                 "rmse": 1.0, "monai_psnr": v, "monai_ssim": 0.9})
                writer.writerow({"task": task, "file": f"{task}_{i}.nii", "source": "lq", "psnr": v - 5, "ssim": 0.8,
                                 "rmse": 2.0, "monai_psnr": "", "monai_ssim": ""})


def test_compare_paired_t_test(tmp_path, capsys):
    rng = np.random.default_rng(0)
    base = rng.normal(30, 2, 20)
    _metrics_csv(tmp_path / "a", {"ct_denoise": base + 0.5 + rng.normal(0, 0.1, 20), "mri_sr": base})
    _metrics_csv(tmp_path / "b", {"ct_denoise": base, "mri_sr": base + rng.normal(0, 0.1, 20)})
    result = compare_evaluations(tmp_path / "a", tmp_path / "b")
    assert result["ct_denoise"]["psnr"]["p"] < 1e-6 and result["ct_denoise"]["psnr"]["diff"] == pytest.approx(0.5, abs=0.1)
    assert result["mri_sr"]["psnr"]["p"] > 0.01
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| ct_denoise | psnr | 20 |" in out and "yes" in out


def test_compare_names_same_named_evaluations_apart(tmp_path, capsys):
    """Two bundles' ``eval/pretrained`` folders: the columns say which is which."""
    _metrics_csv(tmp_path / "amir" / "eval" / "pretrained", {"ct_denoise": [30.0, 31.0, 32.5]})
    _metrics_csv(tmp_path / "tat" / "eval" / "pretrained", {"ct_denoise": [29.0, 30.5, 31.0]})
    assert main(["compare", str(tmp_path / "amir" / "eval" / "pretrained"), str(tmp_path / "tat" / "eval" / "pretrained")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "| amir/eval/pretrained | tat/eval/pretrained |" in header, header


def test_compare_refuses_unrelated_evaluations(tmp_path):
    _metrics_csv(tmp_path / "a", {"ct_denoise": [1.0, 2.0]})
    _metrics_csv(tmp_path / "b", {"mri_sr": [1.0, 2.0]})
    with pytest.raises(ValueError, match="share no"):
        compare_evaluations(tmp_path / "a", tmp_path / "b")


def test_interference_matrix():
    torch.manual_seed(0)
    net = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    make = lambda: [(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)) for _ in range(3)]  # noqa: E731
    shared = make()
    tasks, same = task_interference(net, {"mri_sr": shared, "ct_denoise": shared})
    assert tasks == ["mri_sr", "ct_denoise"]
    assert np.allclose(same, 1.0)  # identical data: no interference at all
    tasks, m = task_interference(net, {"mri_sr": make(), "ct_denoise": [(x, 1 - y) for x, y in make()]})
    assert np.allclose(np.diag(m), 1.0)
    assert m.shape == (2, 2) and np.all(np.isfinite(m)) and not np.allclose(m, 1.0)
    with pytest.raises(ValueError, match="no parameter"):
        task_interference(net, {"mri_sr": shared}, param_pattern="nothing_matches")


def test_medir_restore_with_a_bundle(tmp_path):
    torch.manual_seed(0)
    net = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({**TINY_NET, "patch_size": [32, 32]}))
    data = tmp_path / "in"
    data.mkdir()
    hu = np.random.default_rng(0).normal(40, 30, (48, 40)).astype(np.float32)
    affine = np.diag([0.7, 0.7, 5.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), str(data / "slice.nii.gz"))
    before = (data / "slice.nii.gz").read_bytes()
    args = ["restore", "--bundle", str(REPO_ROOT / "bundles" / "restormer"), "--config", str(tiny), "--checkpoint",
            str(ckpt), "--input", str(data / "slice.nii.gz"), "--output", str(tmp_path / "out"), "--task", "ct_denoise"]
    assert main(args) == 0
    out = nib.load(str(tmp_path / "out" / "slice_restored.nii.gz"))
    assert out.shape == hu.shape and np.allclose(out.affine, affine)
    restored = out.get_fdata()
    assert np.isfinite(restored).all() and restored.min() >= -1024 and restored.max() <= 3071  # HU, norm range
    assert not np.allclose(restored, hu)  # the (random) network changed it
    assert (data / "slice.nii.gz").read_bytes() == before  # input untouched
    assert main(args) == 2  # exists: needs --overwrite
    assert main(args + ["--overwrite"]) == 0
    assert main([*args[:-2]]) == 2  # NIfTI without --task is ambiguous


def test_medir_interference_prints_a_task_table(tmp_path, capsys):
    from test_bundles import _write_layout

    layout = _write_layout(tmp_path / "layout")
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({**TINY_NET, "patch_size": [32, 32]}))
    args = ["interference", "--bundle", str(REPO_ROOT / "bundles" / "amir"), "--config", str(tiny),
            "--dataset-dir", str(layout), "--batches", "2", "--batch-size", "1"]
    assert main(args) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| mri_sr") or line.startswith("| ct_denoise")
            or line.startswith("| pet_synthesis")]
    assert len(rows) == 3
    diagonal = [float(row.split("|")[i + 2]) for i, row in enumerate(rows)]
    assert diagonal == pytest.approx([1.0, 1.0, 1.0])


def test_medir_restore_applies_the_config_safeguard_unless_told_not_to(tmp_path):
    torch.manual_seed(0)
    net = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    guard = {"ct_denoise": {"method": "noise", "lowpass_sigma": 1.5, "window": 5, "object_threshold": -500.0}}
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({**TINY_NET, "patch_size": [32, 32], "safeguard": guard}))
    hu = np.random.default_rng(1).normal(40, 30, (48, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "slice.nii.gz"))
    base = ["restore", "--bundle", str(REPO_ROOT / "bundles" / "restormer"), "--config", str(tiny), "--checkpoint",
            str(ckpt), "--input", str(tmp_path / "slice.nii.gz"), "--task", "ct_denoise"]
    assert main(base + ["--output", str(tmp_path / "guarded")]) == 0
    assert main(base + ["--output", str(tmp_path / "raw"), "--no-safeguard"]) == 0
    guarded = nib.load(str(tmp_path / "guarded" / "slice_restored.nii.gz")).get_fdata()
    raw = nib.load(str(tmp_path / "raw" / "slice_restored.nii.gz")).get_fdata()
    change = lambda x: float(np.sqrt(np.mean((x - hu) ** 2)))  # noqa: E731
    assert change(raw) > 100.0  # an untrained network: far from its input
    assert change(guarded) < 30.0  # held within the input's noise level (30 HU)


class _RunsCode:
    """A pickle payload that would call a function on load (a harmless one: never reached)."""

    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_medir_restore_refuses_unsafe_and_corrupt_checkpoints_in_one_line(tmp_path, capsys):
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({**TINY_NET, "patch_size": [32, 32]}))
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), str(tmp_path / "slice.nii.gz"))
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _RunsCode()}, evil)
    torn = tmp_path / "torn.pt"
    torch.save(Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1).state_dict(), torn)
    torn.write_bytes(torn.read_bytes()[:2000])
    for ckpt, why in ((evil, "its pickle would run code"), (torn, "truncated or corrupt")):
        args = ["restore", "--bundle", str(REPO_ROOT / "bundles" / "restormer"), "--config", str(tiny), "--checkpoint",
                str(ckpt), "--input", str(tmp_path / "slice.nii.gz"), "--output", str(tmp_path / "out"),
                "--task", "ct_denoise"]
        assert main(args) == 2
        captured = capsys.readouterr()
        assert "this pickle ran code" not in captured.out
        lines = [line for line in captured.err.splitlines() if line.startswith("medir restore: error")]
        assert len(lines) == 1 and str(ckpt) in lines[0] and why in lines[0], captured.err
        assert "Traceback" not in captured.err
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
