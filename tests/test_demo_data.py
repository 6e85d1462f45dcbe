"""The embedded demo dataset, built from scans inside installed wheels (``medir demo-data``).

The default run builds a small MRI + PET demo (``--max-slices 2``, seconds) through the CLI; the CT
part (512 x 512 projections, the slow one) is ``@pytest.mark.slow``.
"""

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medir_monai.cli import main
from medir_monai.data import DataError, restoration_dataset, scan_authors_layout
from medir_monai.data.demo import (
    MANIFEST_NAME,
    MR_SOURCES_EXTENDED,
    SOURCES_NAME,
    demo_is_complete,
    demo_sources,
    ensure_demo_dataset,
    source_of,
)
from medir_monai.metrics import psnr_paper, to_eval_window
from medir_monai.tasks import get_task
from medir_monai.transforms import estimate_noise_std

MAX_SLICES = 2
SPLITS = ("train", "validation", "test")
# LQ vs HQ PSNR (paper convention, dB) must be finite and below these bounds: the LQ is measurably worse.
# Typical values of the full build: see the report in SOURCES.md / the lead's notes (MRI ~27, CT ~31, PET ~29).
PSNR_UPPER = {"mri_sr": 40.0, "ct_denoise": 40.0, "pet_synthesis": 40.0}
PSNR_LOWER = 15.0  # and not garbage


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))


def _pairs(root: Path, task: str, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    folder = root / get_task(task).folder / split
    names = sorted(p.name for p in (folder / "HQ").glob("*.nii.gz"))
    assert names == sorted(p.name for p in (folder / "LQ").glob("*.nii.gz"))
    return [(_read(folder / "LQ" / n), _read(folder / "HQ" / n)) for n in names]


def _psnr(lq: np.ndarray, hq: np.ndarray, task: str) -> float:
    """Paper-convention PSNR (eval window, label's range) of physical-unit slices."""
    lq_w = to_eval_window(torch.from_numpy(lq), task, normalised=False)
    hq_w = to_eval_window(torch.from_numpy(hq), task, normalised=False)
    return float(psnr_paper(lq_w, hq_w)[0])


def _outer_kspace_fraction(image: np.ndarray) -> float:
    """Share of the spectrum's energy outside the central quarter of each axis."""
    k = np.abs(np.fft.fftshift(np.fft.fft2(image))) ** 2
    h, w = image.shape
    inner = k[h // 2 - h // 8 : h // 2 + h // 8, w // 2 - w // 8 : w // 2 + w // 8].sum()
    return float(1.0 - inner / k.sum())


def _digest(root: Path) -> dict[str, str]:
    files = sorted(root.rglob("*.nii.gz"))
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "medir_demo"
    argv = ["demo-data", "--out", str(out), "--max-slices", str(MAX_SLICES), "--tasks", "mri_sr", "pet_synthesis"]
    assert main(argv + ["--quiet"]) == 0
    return out


def test_layout_counts_and_provenance(demo):
    manifest = json.loads((demo / MANIFEST_NAME).read_text())
    # max_slices caps each source: MRI has 7 training sources, PET two (the brain and the abdomen phantom); one
    # source per other split
    assert manifest["counts"] == {
        "mri_sr": {"train": 7 * MAX_SLICES, "validation": MAX_SLICES, "test": MAX_SLICES},
        "pet_synthesis": {"train": 2 * MAX_SLICES, "validation": MAX_SLICES, "test": MAX_SLICES},
    }
    for task in ("mri_sr", "pet_synthesis"):
        for split in SPLITS:
            assert len(_pairs(demo, task, split)) == manifest["counts"][task][split]
    assert not (demo / "CT").exists()
    sources = (demo / SOURCES_NAME).read_text()
    needles = ("nilearn", "mni_icbm152_t1_tal_nlin_sym_09a", "dipy", "nibabel", "MR2_UNCR.dcm", "PET is simulated",
               "KSpaceTruncate", "never in PET training")
    for needle in needles:
        assert needle in sources, needle


def test_every_source_is_in_exactly_one_split(demo):
    """Split by source (subject / volume / scanner), never by slice: no source of the test or validation
    split has a single slice in training."""
    manifest = json.loads((demo / MANIFEST_NAME).read_text())
    for task, table in manifest["sources"].items():
        folder = demo / get_task(task).folder
        for split in SPLITS:
            names = {p.name for p in (folder / split / "HQ").glob("*.nii.gz")}
            listed = {n for entry in table.values() if entry["split"] == split for n in entry["files"]}
            assert names == listed
            for name in names:
                assert table[source_of(task, name)]["split"] == split
        by_split = {split: {s for s, e in table.items() if e["split"] == split} for split in SPLITS}
        assert all(by_split.values())  # every split has a source
    assert demo_sources(demo)[0]["items"][0]["hq"].endswith(".nii.gz")


def test_mri_slices_physical_units_and_lq_worse(demo):
    maxima = []
    for split in SPLITS:
        for lq, hq in _pairs(demo, "mri_sr", split):
            assert hq.shape == lq.shape and min(hq.shape) >= 58
            assert hq.min() >= 0.0 and hq.max() <= 4095.0  # each scanner's raw intensity
            maxima.append(float(hq.max()))
            assert lq.min() >= 0.0  # magnitude image
            psnr = _psnr(lq, hq, "mri_sr")
            assert PSNR_LOWER < psnr < PSNR_UPPER["mri_sr"], psnr
            # k-space truncation removes fine detail: much less energy outside the central k-space quarter
            assert _outer_kspace_fraction(lq) < 0.5 * _outer_kspace_fraction(hq)
    assert min(maxima) < 1000.0 < 3000.0 < max(maxima)  # raw scales differ between scanners


def test_pet_slices_in_suv_and_lq_worse(demo):
    for split in SPLITS:
        for lq, hq in _pairs(demo, "pet_synthesis", split):
            assert hq.shape == lq.shape and min(hq.shape) >= 128
            body = hq > 0.3
            assert body.sum() > 500
            assert 0.5 < hq[body].mean() < 8.0 and hq.max() < 20.0  # SUV
            assert hq.min() >= 0.0 and lq.min() >= 0.0  # OSEM is non-negative
            assert abs(lq[body].mean() / hq[body].mean() - 1.0) < 0.1  # same mean: only counts differ
            psnr = _psnr(lq, hq, "pet_synthesis")
            assert PSNR_LOWER < psnr < PSNR_UPPER["pet_synthesis"], psnr
    # the test anatomy is a CT-based phantom (a head with two hot lesions of SUV 8), not the brain template
    (_, test_hq), *_ = _pairs(demo, "pet_synthesis", "test")
    assert test_hq.max() > 4.0 and (test_hq > 0.3).sum() > 3000


def test_demo_feeds_the_datasets(demo):
    items = scan_authors_layout(demo, "train")
    assert {it["task"] for it in items} == {"mri_sr", "pet_synthesis"}
    ds = restoration_dataset(items, train=True, patch_size=128)
    for i in range(len(ds)):
        s = ds[i]
        assert s["lq"].shape == s["hq"].shape == (1, 128, 128)
        assert 0.0 <= float(s["lq"].min()) and float(s["lq"].max()) <= 1.0


def test_complete_build_is_reused(demo):
    manifest = demo / MANIFEST_NAME
    before_mtime, before = manifest.stat().st_mtime_ns, _digest(demo)
    tasks = ("mri_sr", "pet_synthesis")
    assert demo_is_complete(demo, MAX_SLICES, tasks)
    assert not demo_is_complete(demo, None, tasks)  # a full build is a different request
    assert not demo_is_complete(demo, MAX_SLICES, ("mri_sr",))
    assert ensure_demo_dataset(demo, max_slices=MAX_SLICES, tasks=tasks) == demo
    assert manifest.stat().st_mtime_ns == before_mtime and _digest(demo) == before  # nothing rebuilt
    assert not list(demo.rglob(".*.tmp"))  # no temporary files left


def test_one_split_alone_holds_the_files_of_the_full_build(demo, tmp_path):
    """``splits=("test",)`` writes exactly the test files of a full build, byte for byte (each simulation is seeded by
    its source), and nothing of the other splits; the manifest records the request."""
    tasks = ("mri_sr", "pet_synthesis")
    out = ensure_demo_dataset(tmp_path / "t", max_slices=MAX_SLICES, tasks=tasks, splits=("test",))
    full_test = {name: digest for name, digest in _digest(demo).items() if Path(name).parts[1] == "test"}
    assert full_test and _digest(out) == full_test
    assert demo_is_complete(out, MAX_SLICES, tasks, splits=["test"])
    assert not demo_is_complete(out, MAX_SLICES, tasks)  # a full build is a different request
    assert not demo_is_complete(demo, MAX_SLICES, tasks, splits=["test"])
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["splits"] == ["test"] and manifest["counts"]["mri_sr"]["train"] == 0
    assert {s["split"] for s in demo_sources(out)} == {"test"}
    assert "splits test)" in (out / SOURCES_NAME).read_text()
    with pytest.raises(ValueError, match=r"splits must be a non-empty subset of .*got \['testing'\]"):
        ensure_demo_dataset(tmp_path / "u", max_slices=1, tasks=("mri_sr",), splits=("testing",))
    with pytest.raises(SystemExit):  # argparse names the valid choices
        main(["demo-data", "--out", str(tmp_path / "v"), "--splits", "testing", "--quiet"])
    assert not (tmp_path / "u").exists() and not (tmp_path / "v").exists()


def test_interrupted_build_is_redone_identically(tmp_path):
    out = ensure_demo_dataset(tmp_path / "d", max_slices=1, tasks=("mri_sr",))
    before = _digest(out)
    assert len(before) == 2 * 9  # one slice of each of the 9 MRI sources, LQ and HQ
    # a killed build leaves no manifest (it is written last): the next call rebuilds, identically (seeded)
    (out / MANIFEST_NAME).unlink()
    sorted((out / "MRI" / "test" / "LQ").glob("*.nii.gz"))[0].unlink()  # and a file it was about to replace
    assert not demo_is_complete(out, 1, ("mri_sr",))
    ensure_demo_dataset(out, max_slices=1, tasks=("mri_sr",))
    assert (out / MANIFEST_NAME).is_file() and _digest(out) == before


def test_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match=r"not empty and does not look like a medir demo folder \(found thesis\.tex\)"):
        ensure_demo_dataset(tmp_path, max_slices=1, tasks=("mri_sr",))
    assert main(["demo-data", "--out", str(tmp_path), "--max-slices", "1", "--tasks", "mri_sr", "--quiet"]) == 2
    assert (tmp_path / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


@pytest.mark.slow
def test_ct_from_real_slices_in_hounsfield_units(tmp_path):
    out = ensure_demo_dataset(tmp_path / "ct", max_slices=1, tasks=("ct_denoise",))
    counts = {split: len(_pairs(out, "ct_denoise", split)) for split in SPLITS}
    assert counts == {"train": 3, "validation": 1, "test": 1}  # one slice of each source (max_slices caps a source)
    for split in SPLITS:
        for lq, hq in _pairs(out, "ct_denoise", split):
            assert hq.shape == lq.shape and hq.shape in ((512, 512), (128, 128))
            assert -1024.0 <= hq.min() < -800.0 and hq.max() > 1000.0  # air or lung, and bone, HU (clipped at -1024)
            body = hq > -200.0
            assert np.median(hq[body]) == pytest.approx(40.0, abs=100.0)  # soft tissue around 0-100 HU
            noise = (lq - hq)[body].std()
            assert 3.0 < noise < 150.0, noise  # quarter-dose noise in HU
            # never quieter than a quarter of the reference's own dose: the LQ has >= 4x the HQ's noise variance
            inserted = float(np.sqrt(np.mean((lq - hq)[hq > -500.0] ** 2)))
            own = estimate_noise_std(torch.from_numpy(hq), -500.0)
            assert inserted >= 0.95 * np.sqrt(3.0) * own, (inserted, own)
            psnr = _psnr(lq, hq, "ct_denoise")
            assert PSNR_LOWER < psnr < PSNR_UPPER["ct_denoise"], psnr


def test_extended_corpus_names_the_missing_debian_package(tmp_path, monkeypatch):
    import medir_monai.data.demo as demo

    missing = demo.sources._MRSource("colin27_t1", "mricron-data", "", str(tmp_path / "nowhere" / "ch2.nii.gz"), "T1",
                             "train", "nifti", debian=True)
    monkeypatch.setattr(demo.sources, "MR_SOURCES_EXTENDED", (missing,))
    with pytest.raises(DataError, match=r"Debian package 'mricron-data' \(apt-get install mricron-data\)"):
        ensure_demo_dataset(tmp_path / "ext", max_slices=1, tasks=("mri_sr",), extended=True)
    assert main(["demo-data", "--out", str(tmp_path / "ext2"), "--max-slices", "1", "--tasks", "mri_sr", "--extended",
                 "--quiet"]) == 2
    assert not (tmp_path / "ext2" / MANIFEST_NAME).exists()  # no build claims to be complete


@pytest.mark.skipif(not all(Path(s.relpath).is_file() for s in MR_SOURCES_EXTENDED),
                    reason="Debian packages mricron-data / insighttoolkit5-examples not installed")
def test_extended_corpus_adds_training_sources(tmp_path):
    out = ensure_demo_dataset(tmp_path / "ext", max_slices=1, tasks=("mri_sr",), extended=True)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["extended"] is True
    assert manifest["sources"]["mri_sr"]["colin27_t1"]["split"] == "train"
    assert manifest["counts"]["mri_sr"]["train"] == 7 + 2  # the wheels' seven training sources, two from Debian
    assert not demo_is_complete(out, 1, ("mri_sr",))  # a plain build is a different request
    assert "Debian `mricron-data`" in (out / SOURCES_NAME).read_text()


def test_validation_report_names_the_demo_sources():
    from medir_monai.handlers.report import demo_sources_of

    rows = [
        {"task": "mri_sr", "file": "/d/MRI/validation/HQ/nib_epi_s003.nii.gz"},
        {"task": "mri_sr", "file": "/d/MRI/validation/HQ/nib_epi_s004.nii.gz"},
        {"task": "ct_denoise", "file": "/d/CT/validation/HQ/neck_r01_lr.nii.gz"},
        {"task": "pet_synthesis", "file": "/d/PET/test/HQ/abdomen_body_r0_id.nii.gz"},
    ]
    assert demo_sources_of(rows) == {"mri_sr": ["nib_epi"], "ct_denoise": ["neck"], "pet_synthesis": ["abdomen_body"]}
    assert source_of("pet_synthesis", "abdomen_body_r0_id.nii.gz") == "abdomen_body"  # not the CT source "abdomen"
    assert demo_sources_of(rows + [{"task": "ct_denoise", "file": "/mayo/L067_0001.nii.gz"}]) == {}  # not the demo


@pytest.mark.parametrize("extended", [False, True])
def test_demo_data_command_writes_the_folder_the_configs_read(tmp_path, monkeypatch, extended):
    """Without --out, `medir demo-data` builds where the bundles look: the demo folder (quick.json / train.json),
    or with --extended the extended folder (pretrained.json), never one over the other."""
    import medir_monai.data.demo as demo_module

    monkeypatch.setenv("MEDIR_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.setenv("MEDIR_EXTENDED_DIR", str(tmp_path / "ext"))
    calls = []
    monkeypatch.setattr(demo_module, "ensure_demo_dataset", lambda out, **kw: calls.append((out, kw)) or out)
    assert main(["demo-data", "--quiet"] + (["--extended"] if extended else [])) == 0
    (out, kwargs), = calls
    assert out == (tmp_path / ("ext" if extended else "demo")) and kwargs["extended"] is extended
