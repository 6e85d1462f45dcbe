"""``benchmarks/generalisation.py --models-dir``: a fold's network is trained once, saved, and reloaded by a later
run of the same fold (so restore-time options can be compared on the same networks), never for another fold."""

from pathlib import Path

import pytest
import torch

from conftest import import_benchmark
from medir_monai.bundle import bundle_parser

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "amir"


@pytest.fixture()
def generalisation():
    return import_benchmark("generalisation")


def test_fold_networks_are_saved_and_reloaded_only_for_the_same_fold(generalisation, tmp_path, monkeypatch):
    trained = []

    def fake_train_fold(bundle, configs, datalist, work, iterations, seed):  # a fresh quick-size AMIR, no training
        parser, _ = bundle_parser(bundle, "train.json", configs)
        torch.manual_seed(len(trained))
        trained.append(iterations)
        return parser.get_parsed_content("network_def"), parser

    monkeypatch.setattr(generalisation, "train_fold", fake_train_fold)
    configs = [BUNDLE / "configs" / "quick.json"]
    record = {"fold": 2, "left_out": {"mri_sr": ["emri"]}, "iterations": 800, "seed": 0}
    models = tmp_path / "models"

    def call(rec):
        return generalisation.fold_network(BUNDLE, configs, tmp_path / "d.json", tmp_path, rec["iterations"], 0, rec,
                                           models)

    first, _, fresh = call(record)
    assert fresh and trained == [800] and (models / "fold2.pt").is_file() and (models / "fold2.json").is_file()
    again, parser, fresh = call(record)
    assert not fresh and trained == [800]  # loaded, not trained
    assert parser.get_parsed_content("patch_size") == [64, 64]  # the bundle's configs, for the restore options
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    other, _, fresh = call({**record, "iterations": 300})  # another run's network is not reused
    assert fresh and trained == [800, 300]
    assert not torch.equal(next(iter(other.state_dict().values())), next(iter(first.state_dict().values())))
    assert '"iterations": 300' in (models / "fold2.json").read_text()


def test_out_of_band_agreement_measures_the_guess_of_the_missing_band(generalisation):
    """A guess that is half the missing band has energy 0.5, correlation 1 and least-squares scale 2; a guess with
    the sign flipped correlates at -1; anything the network changes inside the acquired band does not count."""
    from medir_monai.transforms import KSpaceTruncate

    torch.manual_seed(0)
    hq = torch.rand(48, 40) * 100
    lq = KSpaceTruncate(keep_fraction=0.25)(hq[None])[0]
    missing = generalisation.kspace_consistency(lq, hq, 0.25) - lq  # HQ - LQ outside the band
    in_band_change = (lq - lq.mean()) * 0.3  # a change of the acquired band only
    in_band_change = in_band_change - (generalisation.kspace_consistency(lq, lq + in_band_change, 0.25) - lq)

    half = generalisation.out_of_band_agreement(lq, hq, lq + 0.5 * missing + in_band_change, 0.25)
    assert half == pytest.approx({"energy": 0.5, "correlation": 1.0, "scale": 2.0}, rel=1e-4)
    flipped = generalisation.out_of_band_agreement(lq, hq, lq - missing, 0.25)
    assert flipped == pytest.approx({"energy": 1.0, "correlation": -1.0, "scale": -1.0}, rel=1e-4)
    unrelated = generalisation.out_of_band_agreement(lq, hq, lq + in_band_change, 0.25)
    assert unrelated["energy"] < 1e-4  # no change outside the band: no guess
    rows = [{"fold": 2, "source": "emri", "out_of_band": half}, {"fold": 2, "source": "thorax"}]
    assert generalisation.band_table(rows).splitlines()[2:] == ["| 2 | emri | 0.50 | 1.00 | 2.00 |"]  # MR rows only
