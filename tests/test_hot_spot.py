"""PET lesion uptake: ``hot_spot_recovery``, its validation metric, its report lines and the checkpoint floor."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine
from monai.utils import CommonKeys as Keys
from scipy import ndimage

from conftest import pet_lesion_phantom

from medir_monai.handlers import BestModelSaver, TaskMetricCollector, format_report, task_metrics
from medir_monai.handlers.report import csv_rows
from medir_monai.metrics import hot_spot_mask, hot_spot_recovery
from medir_monai.networks.restormer import Restormer
from medir_monai.tasks import get_task

PET = get_task("pet_synthesis")
REPO = Path(__file__).resolve().parents[1]


def _phantom_suv() -> torch.Tensor:
    """(1,1,64,64) SUV: the shared lesion phantom (a body at 1 SUV on air, a 29-pixel lesion at 8 SUV)."""
    return torch.as_tensor(pet_lesion_phantom())[None, None]


def _normalised(suv: torch.Tensor) -> torch.Tensor:
    return PET.normalise(suv).float()


def test_recovery_is_one_for_the_label_and_drops_with_a_flattened_or_blurred_lesion():
    hq = _phantom_suv()
    lesion = hq == 8.0
    halved = torch.where(lesion, 4.0, hq)
    warmer_background = torch.where(lesion | (hq == 0), hq, hq + 0.3)
    blurred = torch.as_tensor(ndimage.gaussian_filter(hq[0, 0].numpy(), 1.5))[None, None]
    recovery = lambda x: float(hot_spot_recovery(_normalised(x), _normalised(hq), PET))  # noqa: E731
    assert recovery(hq) == pytest.approx(1.0)
    assert recovery(halved) == pytest.approx(0.5, abs=1e-6)  # the hottest 1 % of the body lies inside the lesion
    assert recovery(warmer_background) == pytest.approx(1.0, abs=1e-6)  # an error outside the lesion is not counted
    assert 0.3 < recovery(blurred) < 0.95
    # physical units give the same figure as model space
    assert float(hot_spot_recovery(halved, hq, "pet_synthesis", normalised=False)) == pytest.approx(0.5, abs=1e-6)
    mask = hot_spot_mask(hq, *PET.hot_spot)
    assert 20 <= int(mask.sum()) <= int(lesion.sum()) and not bool((mask & ~lesion).any())


def test_recovery_is_per_slice_nan_without_a_body_and_refused_for_tasks_without_a_hot_spot():
    hq = _phantom_suv()
    batch = torch.cat([_normalised(hq), torch.zeros_like(_normalised(hq))])  # the second slice is all air
    values = hot_spot_recovery(batch * 0.9, batch, PET)
    assert values.shape == (2,) and values[0] == pytest.approx(0.9) and math.isnan(float(values[1]))
    with pytest.raises(ValueError, match=r"'ct_denoise' defines no hot spot.*pet_synthesis"):
        hot_spot_recovery(batch, batch, "ct_denoise")
    with pytest.raises(ValueError, match="differs from label shape"):
        hot_spot_recovery(batch[:, :, :32], batch, PET)


def _evaluated_collector() -> TaskMetricCollector:
    """A collector fed one PET slice (restored with its lesion halved, LQ noisy) and one CT slice."""
    hq = _normalised(_phantom_suv())
    halved = _normalised(torch.where(_phantom_suv() == 8.0, 4.0, _phantom_suv()))
    noisy = (hq + 0.002 * torch.randn(hq.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    collector = TaskMetricCollector()
    engine = Engine(lambda e, b: None)
    for task, pred, label, lq in (("pet_synthesis", halved, hq, noisy), ("ct_denoise", hq * 0.9, hq, hq * 0.8)):
        engine.state.iteration += 1
        engine.state.output = {Keys.PRED: pred, Keys.LABEL: label, Keys.IMAGE: lq}
        engine.state.batch = {"task_name": [task], "file": [f"{task}.nii.gz"]}
        collector.update(engine)
    return collector


def test_validation_rows_metrics_and_report_carry_the_recovery_for_pet_only():
    collector = _evaluated_collector()
    pet_row, ct_row = collector.rows
    assert pet_row["hot_recovery"] == pytest.approx(0.5, abs=1e-3) and 0.95 < pet_row["lq_hot_recovery"] < 1.05
    assert "hot_recovery" not in ct_row and "lq_hot_recovery" not in ct_row
    means = collector.per_task_means()
    assert means["pet_synthesis"]["hot_recovery"] == pytest.approx(0.5, abs=1e-3) and "hot_recovery" not in means["ct_denoise"]
    rows = csv_rows(collector.rows)
    key, extra = task_metrics(["mri_sr", "ct_denoise", "pet_synthesis"], collector)  # (its metrics reset the collector)
    assert "val_hot_recovery_pet_synthesis" in extra
    assert not {"val_hot_recovery_ct_denoise", "val_hot_recovery_mri_sr", "val_mean_hot_recovery"} & set(extra)
    report = format_report(means, "tiny")
    assert "Hot-spot uptake kept" in report
    assert f"| pet_synthesis | {means['pet_synthesis']['lq_hot_recovery']:.3f} | 0.500 |" in report
    assert [r["hot_recovery"] for r in rows if r["task"] == "pet_synthesis"] == [pet_row["hot_recovery"], pet_row["lq_hot_recovery"]]
    assert all(r["hot_recovery"] == "" for r in rows if r["task"] == "ct_denoise")
    assert "Hot-spot" not in format_report({"ct_denoise": means["ct_denoise"]}, "tiny")


def _round(saver: BestModelSaver, psnr: float, recovery: float) -> None:
    metrics = {"val_mean_psnr": psnr, "val_hot_recovery_pet_synthesis": recovery}
    saver(SimpleNamespace(state=SimpleNamespace(key_metric_name="val_mean_psnr", metrics=metrics)))


def test_best_model_floor_keeps_the_round_that_kept_the_lesions(tmp_path):
    net = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    saver = BestModelSaver(str(tmp_path), net, floors={"val_hot_recovery_pet_synthesis": 0.85})
    path = tmp_path / "model.pt"

    def saved_first_weight() -> torch.Tensor:
        return next(iter(torch.load(path, weights_only=True).values()))

    _round(saver, 30.0, 0.80)  # below the floor, but the only round so far: it is the best
    assert saver.best == 30.0 and not saver.best_meets_floors and path.is_file()
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    _round(saver, 29.0, 0.90)  # lower PSNR, meets the floor: ranks above
    assert saver.best == 29.0 and saver.best_meets_floors
    kept = saved_first_weight().clone()
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    _round(saver, 31.0, 0.70)  # higher PSNR, lesions flattened: not saved
    _round(saver, 30.5, float("nan"))  # no PET slice measured: misses the floor too
    assert saver.best == 29.0 and torch.equal(saved_first_weight(), kept)
    _round(saver, 29.5, 0.86)
    assert saver.best == 29.5 and not torch.equal(saved_first_weight(), kept)
    resumed = BestModelSaver(str(tmp_path), net, floors={"val_hot_recovery_pet_synthesis": 0.85})
    resumed.load_state_dict(saver.state_dict())
    assert (resumed.best, resumed.best_meets_floors) == (29.5, True)
    _round(resumed, 40.0, 0.5)
    assert resumed.best == 29.5


def test_best_model_without_floors_follows_the_key_metric_and_an_unknown_floor_is_named(tmp_path):
    net = Restormer(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)
    plain = BestModelSaver(str(tmp_path), net)
    _round(plain, 30.0, 0.9)
    _round(plain, 31.0, 0.1)
    assert plain.best == 31.0
    legacy = BestModelSaver(str(tmp_path), net, floors={"val_hot_recovery_pet_synthesis": 0.85})
    legacy.load_state_dict({"best": 31.0})  # a checkpoint written before floors existed
    assert legacy.best_meets_floors
    typo = BestModelSaver(str(tmp_path), net, floors={"val_hot_recovery_pet": 0.85})
    with pytest.raises(RuntimeError, match=r"floor on 'val_hot_recovery_pet'.*val_hot_recovery_pet_synthesis"):
        _round(typo, 30.0, 0.9)


@pytest.mark.parametrize("bundle", ["amir", "tat", "restormer"])
def test_shipped_recipes_floor_a_metric_their_validation_computes(bundle):
    configs = REPO / "bundles" / bundle / "configs"
    train = json.loads((configs / "train.json").read_text())
    floors = json.loads((configs / "pretrained.json").read_text())["best_floors"]
    assert train["best_floors"] == {}  # the paper configuration keeps the papers' rule
    _, extra = task_metrics(train["tasks"])
    assert floors and set(floors) <= set(extra)
