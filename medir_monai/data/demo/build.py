"""Building, checking and locking a demo folder: :func:`build_demo_dataset`, :func:`ensure_demo_dataset`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path


import medir_monai.transforms

from ...tasks import get_task
from ..io import DataError, atomic_write_bytes
from .builders import _BUILDERS, _source_table
from .provenance import _sources_markdown
from .sources import (
    _version,
    default_demo_dir,
    DEMO_SEED,
    DEMO_TASKS,
    DEMO_VERSION,
    LOCK_NAME,
    MANIFEST_NAME,
    SOURCES_NAME,
    SPLITS,
)


_OWN_ENTRIES = {"MRI", "CT", "PET", MANIFEST_NAME, SOURCES_NAME, LOCK_NAME}


def _check_target(out: Path) -> None:
    """Refuse to build into a folder that holds anything but a (partial) demo build."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN_ENTRIES and not p.name.startswith("."))
        if foreign:
            raise DataError(
                f"{out}: folder is not empty and does not look like a medir demo folder "
                f"(found {', '.join(foreign[:5])}); choose a new or empty folder"
            )


def code_fingerprint() -> str:
    """Hash of the code that makes the data (this package and ``medir_monai.transforms``): a build made by
    other code is rebuilt."""
    digest = hashlib.sha256()
    files = sorted(Path(__file__).parent.glob("*.py")) + sorted(Path(medir_monai.transforms.__file__).parent.glob("*.py"))
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _checked_splits(splits: Sequence[str]) -> list[str]:
    """``splits`` in the canonical order; a clear error for an empty or unknown one."""
    wanted = [splits] if isinstance(splits, str) else list(splits)
    unknown = sorted(set(wanted) - set(SPLITS))
    if unknown or not wanted:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {wanted}")
    return [split for split in SPLITS if split in wanted]


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def demo_sources(root: str | os.PathLike) -> list[dict]:
    """Every source of a complete demo build: ``{"task", "source", "split", "items": [{"hq", "lq", "task"}]}``
    (for leave-one-source-out experiments: ``benchmarks/generalisation.py``)."""
    root = Path(root)
    manifest = _read_manifest(root)
    if not manifest or "sources" not in manifest:
        raise DataError(f"{root}: no complete demo build of version {DEMO_VERSION} (run `medir demo-data`)")
    out = []
    for task, entries in manifest["sources"].items():
        folder = root / get_task(task).folder
        for source, entry in entries.items():
            items = [
                {"hq": str(folder / entry["split"] / "HQ" / n), "lq": str(folder / entry["split"] / "LQ" / n), "task": task}
                for n in entry["files"]
            ]
            out.append({"task": task, "source": source, "split": entry["split"], "items": items})
    return out


def demo_is_complete(
    out: str | os.PathLike,
    max_slices: int | None = None,
    tasks: Sequence[str] = DEMO_TASKS,
    extended: bool = False,
    splits: Sequence[str] = SPLITS,
) -> bool:
    """Whether ``out`` holds a complete build of this version, code, ``max_slices``, tasks, splits and corpus, with
    all files."""
    out = Path(out)
    manifest = _read_manifest(out)
    if not manifest or manifest.get("version") != DEMO_VERSION or manifest.get("max_slices") != max_slices:
        return False
    if bool(manifest.get("extended", False)) != bool(extended):
        return False
    if manifest.get("splits", list(SPLITS)) != _checked_splits(splits):
        return False
    if manifest.get("code") != code_fingerprint():
        return False
    if sorted(manifest.get("files", {})) != sorted(get_task(t).name for t in tasks):
        return False
    for task, splits in manifest.get("files", {}).items():
        folder = get_task(task).folder
        for split, names in splits.items():
            for name in names:
                if not all((out / folder / split / pair / name).is_file() for pair in ("HQ", "LQ")):
                    return False
    return True


def _remove_stale(out: Path, files: dict) -> None:
    """Delete slices of an earlier build (our own folders only) that this build did not write."""
    for task in DEMO_TASKS:
        folder = out / get_task(task).folder
        splits = files.get(task, {})
        for split in SPLITS:
            keep = set(splits.get(split, []))
            for pair in ("HQ", "LQ"):
                for path in (folder / split / pair).glob("*.nii.gz"):
                    if path.name not in keep:
                        path.unlink()


@contextlib.contextmanager
def _build_lock(out: Path) -> Iterator[None]:
    """Exclusive lock so parallel processes (e.g. DDP ranks) do not build the same folder twice."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_NAME, "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover (Windows): no lock
            pass
        yield


def build_demo_dataset(
    out: str | os.PathLike,
    max_slices: int | None = None,
    seed: int = DEMO_SEED,
    verbose: bool = True,
    tasks: Sequence[str] = DEMO_TASKS,
    extended: bool = False,
    splits: Sequence[str] = SPLITS,
) -> dict:
    """Build the demo dataset into ``out`` (see the module docstring); returns the manifest.

    Args:
        out: output folder (created; must be empty or an earlier demo build).
        max_slices: at most this many slices per source (small builds for tests).
        seed: seed of every simulation (the build is deterministic).
        verbose: print progress to stderr.
        tasks: the tasks to build (default all three; CT is the slow one).
        extended: also the training sources of Debian packages (:data:`~.sources.MR_SOURCES_EXTENDED`; a missing package is
            named in the error).
        splits: the splits to build (default all three). A split's files are the same as in a full build (every
            simulation is seeded by its source, not by the build's order), so a test that needs only the test sources
            can skip the training ones.
    """
    out = Path(out).expanduser()
    _check_target(out)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None)
    if max_slices is not None and max_slices < 1:
        raise ValueError(f"max_slices must be >= 1, got {max_slices}")
    splits = _checked_splits(splits)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until the new manifest lands
    start = time.perf_counter()
    files = {}
    timings = {}
    wanted = [get_task(t).name for t in tasks]
    unknown = sorted(set(wanted) - set(DEMO_TASKS))
    if unknown or not wanted:
        raise ValueError(f"tasks must be a non-empty subset of {DEMO_TASKS}, got {list(tasks)}")
    for task in DEMO_TASKS:
        if task not in wanted:
            continue
        builder = _BUILDERS[task]
        t0 = time.perf_counter()
        log(f"medir demo-data: building {task} in {out}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            extra = {"extended": extended} if task == "mri_sr" else {}
            files[task] = builder(out, max_slices, seed, log, splits=splits, **extra)
        timings[task] = round(time.perf_counter() - t0, 1)
    _remove_stale(out, files)
    atomic_write_bytes(out / SOURCES_NAME, _sources_markdown(files, seed, max_slices, extended, splits).encode())
    manifest = {
        "version": DEMO_VERSION,
        "code": code_fingerprint(),
        "seed": seed,
        "max_slices": max_slices,
        "extended": bool(extended),
        "splits": splits,
        "counts": {t: {s: len(n) for s, n in splits.items()} for t, splits in files.items()},
        "files": files,
        "sources": _source_table(files),
        "build_seconds": timings,
        "packages": {d: _version(d) for d in ("nilearn", "dipy", "nibabel", "pydicom", "pydicom-data", "torch", "monai")},
    }
    atomic_write_bytes(out / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    log(f"medir demo-data: done in {time.perf_counter() - start:.0f} s: {manifest['counts']}")
    return manifest


def ensure_demo_dataset(
    dir: str | os.PathLike | None = None,
    force: bool = False,
    max_slices: int | None = None,
    verbose: bool = False,
    tasks: Sequence[str] = DEMO_TASKS,
    extended: bool = False,
    splits: Sequence[str] = SPLITS,
) -> Path:
    """The demo dataset folder, built first if missing or incomplete (or when ``force``).

    Args:
        dir: folder (default :func:`default_demo_dir`).
        force: rebuild even if a complete build exists.
        max_slices: at most this many slices per source.
        verbose: print build progress.
        tasks: the tasks to build (default all three).
        extended: also the Debian-package training sources (see :func:`build_demo_dataset`).
        splits: the splits to build (default all; see :func:`build_demo_dataset`).

    Returns:
        the folder, ready for :func:`medir_monai.data.scan_authors_layout`.
    """
    out = Path(dir).expanduser() if dir is not None else default_demo_dir()
    splits = _checked_splits(splits)  # before anything is created
    if not force and demo_is_complete(out, max_slices, tasks, extended, splits):
        return out
    _check_target(out)
    with _build_lock(out):
        if force or not demo_is_complete(out, max_slices, tasks, extended, splits):  # another process built it meanwhile
            build_demo_dataset(out, max_slices=max_slices, verbose=verbose, tasks=tasks, extended=extended, splits=splits)
    return out
