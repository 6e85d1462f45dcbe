"""Generalisation to sources never seen in training (slow: trains a small AMIR for a few minutes).

Runs ``benchmarks/generalisation.py`` on the fold that leaves out the demo's test sources (CT: another
patient's head, MRI: a T2-weighted brain of another scanner, PET: a body anatomy), trains on all the other
sources with the quick config and restores the left-out slices on the restore path (safeguard included).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import import_benchmark
from medir_monai.data.demo import demo_sources, ensure_demo_dataset

REPO = Path(__file__).resolve().parents[1]
LEFT_OUT = (("ct_denoise", "head1149"), ("mri_sr", "dipy_b0"))

pytestmark = pytest.mark.slow


def _fold_of_test_sources(root: Path) -> int:
    folds = import_benchmark("generalisation").make_folds(demo_sources(root))
    for index, fold in enumerate(folds):
        if all(source in fold[task] for task, source in LEFT_OUT):
            return index
    raise AssertionError(f"no fold leaves out both test sources: {folds}")


@pytest.fixture(scope="module")
def loso_rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loso")
    root = ensure_demo_dataset(tmp / "demo", max_slices=8)
    out = tmp / "loso.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "generalisation.py"), "--demo-dir", str(root), "--max-slices", "8",
           "--folds", str(_fold_of_test_sources(root)), "--iterations", "800", "--json", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp, timeout=1500)
    return {(r["task"], r["source"]): r for r in json.loads(out.read_text())}


def test_left_out_sources_are_restored_and_measured(loso_rows):
    for key in LEFT_OUT:
        row = loso_rows[key]
        assert row["slices"] > 0
        for side in ("lq", "restored"):
            assert 10.0 < row[side]["psnr"] < 60.0 and 0.0 < row[side]["ssim"] <= 1.0, (key, row)
        assert row["restored"]["psnr"] != row["lq"]["psnr"]  # the model changed the image


def test_small_model_beats_lq_on_a_ct_source_it_never_saw(loso_rows):
    """With the CT safeguard and flip ensemble of quick.json (the restore path), another patient's head CT comes out
    better."""
    lq, restored = loso_rows[("ct_denoise", "head1149")]["lq"], loso_rows[("ct_denoise", "head1149")]["restored"]
    assert restored["psnr"] > lq["psnr"] + 0.3, (lq, restored)
    assert restored["ssim"] > lq["ssim"], (lq, restored)


@pytest.mark.xfail(
    strict=False,
    reason="thin margin (generalisation issue still open): with the k-space safeguard and flip ensemble of "
    "quick.json an 800-iteration dim-16 model gains 0.13-0.15 dB on this brain in the full demo, close to the 0.1 dB "
    "asked here; benchmarks/README.md has the leave-one-source-out table",
)
def test_small_model_beats_lq_on_an_mr_source_it_never_saw(loso_rows):
    lq, restored = loso_rows[("mri_sr", "dipy_b0")]["lq"], loso_rows[("mri_sr", "dipy_b0")]["restored"]
    assert restored["psnr"] > lq["psnr"] + 0.1, (lq, restored)
    assert restored["ssim"] > lq["ssim"], (lq, restored)
