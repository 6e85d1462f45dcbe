"""Faults that trusted imaging and training tools are tested against: a training process killed at any moment,
a disk that fills up, two jobs writing the same place. (Corrupted inputs: ``test_fuzz.py``.)

Every test runs the real command in a subprocess (``python -m monai.bundle run training``,
``python -m medir_monai.cli restore``), because what is under test is what the operating system does to it.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import REPO_ROOT
from pydicom.data import get_testdata_file
from test_bundles import TINY, _write_layout

from medir_monai.atomic import DestinationExistsError, NoSpaceError, atomic_path
from medir_monai.atomic import atomic_output
from medir_monai.restore import read_scan

AMIR = REPO_ROOT / "bundles" / "amir" / "configs" / "train.json"
DRIVER = Path(__file__).with_name("killed_run.py")
KILL_SEED = 7  # seeds the random kill times; a failure names the kills it made
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_layout(tmp_path_factory.mktemp("layout"))


def _training_command(dataset: Path, root: Path, **overrides) -> list[str]:
    """The bundle's training command, as a user types it, with the tiny sizes of the bundle tests."""
    args = [sys.executable, str(DRIVER), "run", "training", "--config_file", str(AMIR)]
    for key, value in {**TINY, "max_iterations": 8, "dataset_dir": str(dataset), "bundle_root": str(root),
                       "seed": 3, **overrides}.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _train(dataset: Path, root: Path, kill_at: str | None = None, limit_bytes: int | None = None, **overrides):
    env = {**ENV, "MEDIR_KILL_AT": kill_at or ""}
    preexec = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))) if limit_bytes else None
    return subprocess.run(_training_command(dataset, root, **overrides), capture_output=True, text=True, env=env,
                          timeout=600, preexec_fn=preexec)


def _complete_checkpoints(models: Path) -> dict[int, Path]:
    """The checkpoints under their final names; each must load (a partial file under a final name is a defect)."""
    found = {}
    for path in models.glob("checkpoint_iteration=*.pt"):
        state = torch.load(path, weights_only=True)
        found[int(state["trainer"]["iteration"])] = path
    return found


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp*"))


def _same_weights(a: Path, b: Path) -> bool:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    x, y = x.get("model", x), y.get("model", y)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---- 1. killed training resumes ----------------------------------------------------------------------------
def _kill_and_rerun(dataset: Path, root: Path, kills: list[str]) -> list[str]:
    """Run the training command once per kill point (each run killed there, or ending first), then once more
    without a kill; returns what happened. Checks after every kill that each checkpoint under a final name loads."""
    history, temporary_left = [], False
    for kill_at in [*kills, None]:
        proc = _train(dataset, root, kill_at=kill_at)
        history.append(f"{kill_at or 'rerun'} -> {proc.returncode}")
        if temporary_left:  # the run after a kill inside a checkpoint write removes the temporary, never reads it
            assert "left by an interrupted write" in proc.stderr, (history, proc.stderr[-3000:])
            temporary_left = False
        if kill_at is None or proc.returncode == 0:  # the last run, or the run ended before its timer
            assert proc.returncode == 0, (history, proc.stderr[-3000:])
            if kill_at is None:
                break
            continue
        assert proc.returncode == -signal.SIGKILL, (history, proc.stderr[-3000:])
        complete = _complete_checkpoints(root / "models")  # loads every final-named checkpoint
        if kill_at.startswith("checkpoint_write"):
            # killed after the bytes, before the rename: the new checkpoint exists only under its temporary name
            assert any("checkpoint_iteration=" in p.name for p in _temporaries(root / "models")), history
            assert max(complete) < 8, (history, sorted(complete))
            temporary_left = True
        if complete and kill_at.startswith("trainer_iteration"):
            assert f"resumed from {complete[max(complete)]}" in proc.stderr or len(history) == 1, history
    return history


@pytest.mark.slow
def test_training_killed_anywhere_resumes_to_the_weights_of_an_uninterrupted_run(dataset, tmp_path):
    """SIGKILL mid-iteration, during validation, between a checkpoint's write and its rename, and at seeded random
    times; rerunning the same command each time ends with the weights of a run that was never interrupted."""
    straight = tmp_path / "straight"
    started = time.monotonic()
    done = _train(dataset, straight)
    duration = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]

    planned = ["trainer_iteration:3", "evaluator_iteration:2", "checkpoint_write:1", "trainer_iteration:1"]
    rng = np.random.default_rng(KILL_SEED)  # random moments of a run: start-up, data loading, training, writing
    timed = [f"after_seconds:{f * duration:.2f}" for f in rng.uniform(0.3, 1.0, 5)]
    for name, kills in (("planned", planned), ("timed", timed)):
        root = tmp_path / name
        history = _kill_and_rerun(dataset, root, kills)
        print(f"{name} kills:", "; ".join(history))
        assert _same_weights(straight / "models" / "model_final.pt", root / "models" / "model_final.pt"), history
        assert _same_weights(straight / "models" / "model.pt", root / "models" / "model.pt"), history
        assert sorted(_complete_checkpoints(root / "models")) == [8], history
        assert not _temporaries(root / "models"), history


# ---- 2. full disk -------------------------------------------------------------------------------------------
def _restore_command(bundle: tuple[Path, Path], source: Path, out: Path, *extra: str) -> list[str]:
    config, ckpt = bundle
    return [sys.executable, "-m", "medir_monai.cli", "restore", "--bundle", str(REPO_ROOT / "bundles" / "restormer"),
            "--config", str(config), "--checkpoint", str(ckpt), "--input", str(source), "--output", str(out), *extra]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A NIfTI CT slice and a three-file CT DICOM series (pydicom's CT_small at three positions)."""
    folder = tmp_path_factory.mktemp("inputs")
    hu = np.random.default_rng(0).normal(40, 30, (64, 64)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.diag([0.7, 0.7, 5.0, 1.0])), str(folder / "slice.nii.gz"))
    series = folder / "series"
    series.mkdir()
    for i in range(3):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.InstanceNumber, ds.SOPInstanceUID = i + 1, f"{ds.SOPInstanceUID}.{i + 1}"
        ds.ImagePositionPatient = [-158.0, -179.0, -75.0 + 5.0 * i]
        ds.save_as(series / f"slice{i}.dcm", enforce_file_format=False)
    return {"nifti": folder / "slice.nii.gz", "series": series}


def _one_error_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"medir {command}: error")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("kind", ["nifti", "series"])
def test_restore_into_a_size_limited_filesystem_fails_in_one_line_and_leaves_nothing(kind, inputs, tiny_bundle,
                                                                                    tmp_path):
    """``RLIMIT_FSIZE`` below the output's size: the write fails with EFBIG, as a full quota would."""
    out = tmp_path / "out"
    out.mkdir()
    source = inputs[kind]
    before = {p: p.read_bytes() for p in ([source] if source.is_file() else sorted(source.iterdir()))}
    limit = 4096
    proc = subprocess.run(_restore_command(tiny_bundle, source, out, "--task", "ct_denoise"), capture_output=True,
                          text=True, env=ENV, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr, "restore")
    assert "no space" in line and str(out) in line, line
    assert not any(out.iterdir()), sorted(out.rglob("*"))  # no partial output, no temporary left
    assert all(p.read_bytes() == data for p, data in before.items())  # the input untouched

    proc = subprocess.run(_restore_command(tiny_bundle, source, out, "--task", "ct_denoise"), capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]  # with space, the same command succeeds


def _mount_tmpfs(folder: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_restore_onto_a_full_disk_fails_in_one_line_and_leaves_nothing(inputs, tiny_bundle, tmp_path):
    """A real ENOSPC: a 64 KiB tmpfs (needs root to mount; skipped otherwise) that the DICOM series does not fit."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("mounting a small tmpfs needs root (the RLIMIT_FSIZE tests cover the rest)")
    try:
        (disk / "filler.bin").write_bytes(bytes(16 * 1024))  # what was on the disk before
        proc = subprocess.run(_restore_command(tiny_bundle, inputs["series"], disk / "out"), capture_output=True,
                              text=True, env=ENV, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = _one_error_line(proc.stderr, "restore")
        assert "no space" in line and str(disk / "out") in line, line
        assert sorted(p.name for p in disk.iterdir()) == ["filler.bin"]  # nothing partial, nothing temporary
        assert (disk / "filler.bin").read_bytes() == bytes(16 * 1024)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_training_on_a_full_disk_keeps_the_last_checkpoint_and_resumes(dataset, tmp_path):
    """The next checkpoint does not fit: one line naming it and the intact previous checkpoint, exit status 2,
    no temporary file; with space again the same command resumes from that checkpoint."""
    root = tmp_path / "bundle"
    first = _train(dataset, root, max_iterations=2)
    assert first.returncode == 0, first.stderr[-3000:]
    kept = root / "models" / "checkpoint_iteration=2.pt"
    kept_bytes = kept.read_bytes()

    limit = len(kept_bytes) // 2  # the best-model file (weights only) fits, the full training state does not
    full = _train(dataset, root, limit_bytes=limit, max_iterations=4)
    assert full.returncode == 2, full.stderr[-3000:]
    line = _one_error_line(full.stderr, "training")
    assert "checkpoint_iteration=4.pt" in line and "no space" in line and f"{kept} is intact" in line, line
    assert kept.read_bytes() == kept_bytes and sorted(_complete_checkpoints(root / "models")) == [2]
    assert not _temporaries(root / "models")

    again = _train(dataset, root, max_iterations=4)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and str(kept) in again.stderr
    assert sorted(_complete_checkpoints(root / "models")) == [4]


# ---- 3. racing writers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("as_folder", [False, True])
def test_an_output_written_meanwhile_by_another_run_is_kept(as_folder, tmp_path):
    """The commit of a run that must not overwrite finds the output another run wrote while it worked."""
    final = tmp_path / ("series_restored" if as_folder else "slice_restored.nii.gz")
    with pytest.raises(DestinationExistsError, match="appeared while this run was writing it"):
        with atomic_output(final, as_folder=as_folder, overwrite=False) as tmp:
            (tmp / "IM00001.dcm" if as_folder else tmp).write_bytes(b"ours")
            if as_folder:
                final.mkdir()
                (final / "IM00001.dcm").write_bytes(b"theirs")
            else:
                final.write_bytes(b"theirs")
    kept = final / "IM00001.dcm" if as_folder else final
    assert kept.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]  # our temporary is gone

    with atomic_output(final, as_folder=as_folder, overwrite=True) as tmp:  # --overwrite: the newer one wins
        (tmp / "IM00001.dcm" if as_folder else tmp).write_bytes(b"ours")
    assert kept.read_bytes() == b"ours" and sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_atomic_path_reports_a_full_disk_as_no_space_naming_the_destination(tmp_path):
    import errno

    final = tmp_path / "a.bin"
    with pytest.raises(NoSpaceError, match="no space") as caught:
        with atomic_path(final):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert caught.value.filename == str(final) and not any(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["nifti", "series"])
def test_two_restores_into_the_same_output(kind, inputs, tiny_bundle, tmp_path):
    """Started together: one writes the output, the other refuses in one line (exit 2); the output is whole. With
    ``--overwrite`` both succeed and the output is one complete result."""
    name = "slice_restored.nii.gz" if kind == "nifti" else "series_restored"
    out = tmp_path / "out"
    command = _restore_command(tiny_bundle, inputs[kind], out, "--task", "ct_denoise")
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    line = _one_error_line(loser, "restore")
    assert str(out / name) in line and ("output exists" in line or "appeared while" in line), line
    restored = read_scan(out / name).array
    assert restored.shape == read_scan(inputs[kind]).array.shape and np.isfinite(restored).all()
    assert sorted(p.name for p in out.iterdir()) == [name]  # no temporary left by the loser

    procs = [subprocess.Popen(command + ["--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    again = read_scan(out / name).array
    assert np.array_equal(again, restored)  # the same network on the same input: one whole result either way
    assert sorted(p.name for p in out.iterdir()) == [name]


@pytest.mark.slow
def test_a_second_training_into_the_same_bundle_folder_refuses(dataset, tmp_path):
    root = tmp_path / "bundle"
    lock = root / "models" / ".training.lock"
    first = subprocess.Popen(_training_command(dataset, root, max_iterations=40), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**ENV, "MEDIR_KILL_AT": ""})
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:] if first.poll() else ""
        time.sleep(0.2)
    second = _train(dataset, root, max_iterations=40)
    assert first.poll() is None, "the first training ended before the second one started: no race was tested"
    assert second.returncode == 2, second.stderr[-3000:]
    line = _one_error_line(second.stderr, "training")
    assert str(root / "models") in line and f"process {first.pid}" in line, line
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    assert sorted(_complete_checkpoints(root / "models")) == [40]
    assert not _temporaries(root / "models")
