import math

import pytest
import torch
from conftest import load_fixture

from medir_monai.metrics import mean_over_tasks, monai_metrics, paper_metrics, ssim_paper, to_eval_window
from medir_monai.tasks import get_task, task_from_folder


@pytest.mark.parametrize("folder", ["MRI", "CT", "PET"])
def test_matches_authors_evaluation(folder):
    ref = load_fixture("metrics_official.pt")["tasks"][folder]
    task = task_from_folder(folder)
    got = paper_metrics(ref["pred"], ref["label"], task)
    for name in ("psnr", "ssim", "rmse"):
        assert abs(got[name].item() - float(ref[name])) <= 1e-4, (folder, name, got[name].item(), float(ref[name]))


def test_identical_images_give_perfect_scores():
    label = torch.rand(2, 1, 32, 40)
    m = paper_metrics(label, label, "mri_sr")
    assert torch.isinf(m["psnr"]).all()
    assert torch.allclose(m["ssim"], torch.ones(2, dtype=torch.float64))
    assert torch.all(m["rmse"] == 0)


def test_psnr_uses_per_slice_label_range_in_eval_window():
    task = get_task("ct_denoise")
    # label spans the whole CT window [-160, 240] -> data range 400 HU after windowing
    label_hu = torch.linspace(-500, 600, 64 * 64, dtype=torch.float64).reshape(1, 1, 64, 64)
    pred_hu = label_hu + 10.0  # 10 HU everywhere, but clipping at the window edges removes part of it
    m = paper_metrics(pred_hu, label_hu, task, normalised=False)
    lw, pw = to_eval_window(label_hu, task, False), to_eval_window(pred_hu, task, False)
    mse = ((lw - pw) ** 2).mean()
    assert math.isclose(m["psnr"].item(), 10 * math.log10(400.0**2 / mse.item()), rel_tol=1e-9)
    assert math.isclose(m["rmse"].item(), mse.sqrt().item(), rel_tol=1e-9)


def test_ssim_is_symmetric_and_drops_with_noise():
    g = torch.Generator().manual_seed(0)
    label = torch.rand(1, 1, 48, 48, generator=g)
    noisy = label + 0.1 * torch.randn(1, 1, 48, 48, generator=g)
    noisier = label + 0.3 * torch.randn(1, 1, 48, 48, generator=g)
    s1, s2 = ssim_paper(noisy, label), ssim_paper(noisier, label)
    assert s2 < s1 < 1
    assert torch.allclose(ssim_paper(label, noisy, data_range=torch.tensor([1.0])), ssim_paper(noisy, label, torch.tensor([1.0])))


def test_monai_metrics_side_by_side_are_close_but_not_identical():
    ref = load_fixture("metrics_official.pt")["tasks"]["MRI"]
    paper = paper_metrics(ref["pred"], ref["label"], "mri_sr")
    monai = monai_metrics(ref["pred"], ref["label"], "mri_sr")
    assert abs(monai["monai_ssim"].item() - paper["ssim"].item()) < 0.1
    assert monai["monai_ssim"].item() != pytest.approx(paper["ssim"].item(), abs=1e-9)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="differs"):
        paper_metrics(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9), "mri_sr")


def test_average_over_tasks():
    avg = mean_over_tasks({"a": {"psnr": 30.0, "ssim": 0.9, "rmse": 1.0}, "b": {"psnr": 40.0, "ssim": 0.8, "rmse": 3.0}})
    assert avg == pytest.approx({"psnr": 35.0, "ssim": 0.85, "rmse": 2.0})


def test_infinite_psnr_slices_are_counted_and_reported_not_silently_dropped():
    from medir_monai.handlers import TaskMetricCollector, format_report

    collector = TaskMetricCollector()
    row = {"ssim": 0.9, "rmse": 1.0, "monai_psnr": 30.0, "monai_ssim": 0.9, "lq_psnr": 20.0, "lq_ssim": 0.5, "lq_rmse": 3.0}
    collector.rows = [
        {"task": "ct_denoise", "file": "a", "psnr": 30.0, **row},
        {"task": "ct_denoise", "file": "b", "psnr": float("inf"), **row},  # identical to its label
        {"task": "mri_sr", "file": "c", "psnr": 25.0, **row},
    ]
    assert collector.per_task_means()["ct_denoise"]["psnr"] == 30.0
    assert collector.infinite_counts() == {"ct_denoise": {"psnr": 1}}
    report = format_report(collector.per_task_means(), "m", {"ct_denoise": 2, "mri_sr": 1}, collector.infinite_counts())
    assert "infinite and left out of the means (task, metric, slices): ct_denoise psnr 1" in report
    collector.rows = collector.rows[:1]
    assert collector.infinite_counts() == {}
    assert "infinite" not in format_report(collector.per_task_means(), "m", {"ct_denoise": 1}, collector.infinite_counts())
