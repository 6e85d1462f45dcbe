"""Trained weights shipped inside the package: one small model per bundle (AMIR, TAT, Restormer).

Each file is the ``model.pt`` a bundle's ``configs/pretrained.json`` training wrote (``{"model": state_dict,
"training_profile": ...}``, the profile feeding the input guard), copied here by ``scripts/ship_weights.py``,
which also records its sha256 in ``MANIFEST.json``. ``bundles/<name>/configs/pretrained.json`` points the bundle's
``ckpt_path`` at :func:`weights_file`, so a fresh install restores without training; what each file was trained on,
the command that made it and its measured limits are in ``bundles/<name>/docs/model_card.md``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["MAX_FILE_BYTES", "WeightsError", "manifest", "shipped_models", "sha256_of", "weights_file"]

WEIGHTS_DIR = Path(__file__).parent
MANIFEST_NAME = "MANIFEST.json"
MAX_FILE_BYTES = 25 * 1000 * 1000
"""Largest weights file the package ships (25 MB): a larger model is stored in float16."""


class WeightsError(RuntimeError):
    """A shipped weights file is unknown, missing or not the file its manifest names."""


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest() -> dict[str, dict]:
    """``MANIFEST.json``: model name -> ``{"file", "sha256", "bytes", "dtype", "card", ...}``."""
    path = WEIGHTS_DIR / MANIFEST_NAME
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def shipped_models() -> list[str]:
    """Names of the models whose weights ship in this package (sorted)."""
    return sorted(manifest())


def weights_file(name: str, verify: bool = True) -> Path:
    """Path of the shipped weights of model ``name`` (``"amir"``, ``"tat"``, ``"restormer"``).

    Args:
        name: the bundle's model name.
        verify: compare the file's sha256 with the manifest (a few milliseconds for these sizes).

    Raises:
        WeightsError: ``name`` ships no weights, the file is missing (a broken install), or its sha256 differs
            from the manifest (a modified or truncated file).
    """
    entries = manifest()
    if name not in entries:
        shipped = ", ".join(sorted(entries)) or "none"
        raise WeightsError(f"no shipped weights for model {name!r} (shipped: {shipped}); train the bundle instead")
    entry = entries[name]
    path = WEIGHTS_DIR / entry["file"]
    if not path.is_file():
        raise WeightsError(f"{path}: shipped weights of {name!r} are missing; reinstall medir-monai")
    if verify:
        found = sha256_of(path)
        if found != entry["sha256"]:
            raise WeightsError(
                f"{path}: sha256 {found} differs from the manifest's {entry['sha256']}; the file was modified or "
                "truncated: reinstall medir-monai"
            )
    return path
