"""Generalisation to sources never seen in training (slow: trains a small AMIR for a few minutes).

Runs ``benchmarks/generalisation.py`` on the fold that leaves out the demo's test sources (CT: another
patient's head, MRI: a T2-weighted brain of another scanner, PET: a body anatomy), trains on all the other
sources with the quick config and asserts that the restored slices beat the degraded input there.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medir_monai.data.demo import CT_SOURCES, MR_SOURCES, demo_sources, ensure_demo_dataset

REPO = Path(__file__).resolve().parents[1]


def _fold_of_test_sources(root: Path) -> int:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from generalisation import make_folds
    finally:
        sys.path.pop(0)
    folds = make_folds(demo_sources(root))
    for index, fold in enumerate(folds):
        if "head1149" in fold["ct_denoise"] and "dipy_b0" in fold["mri_sr"]:
            return index
    raise AssertionError(f"no fold leaves out both test sources: {folds}")


@pytest.mark.slow
def test_small_model_beats_lq_on_sources_it_never_saw(tmp_path):
    root = ensure_demo_dataset(tmp_path / "demo", max_slices=8)
    fold = _fold_of_test_sources(root)
    out = tmp_path / "loso.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "generalisation.py"), "--demo-dir", str(root), "--max-slices", "8",
           "--folds", str(fold), "--iterations", "600", "--json", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=1500)
    rows = {(r["task"], r["source"]): r for r in json.loads(out.read_text())}
    assert {s.name for s in CT_SOURCES if s.name == "head1149"} | {s.name for s in MR_SOURCES if s.name == "dipy_b0"} <= {
        source for _, source in rows
    }
    for key in (("ct_denoise", "head1149"), ("mri_sr", "dipy_b0")):
        lq, restored = rows[key]["lq"], rows[key]["restored"]
        assert restored["psnr"] > lq["psnr"], (key, lq, restored)
        assert restored["ssim"] > lq["ssim"], (key, lq, restored)
