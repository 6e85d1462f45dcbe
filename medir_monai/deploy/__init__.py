"""Deployment: exports (TorchScript, ONNX), a MONAI Deploy App SDK application and a MONAI Label app.

What is importable without the optional extras: :mod:`.export`, :mod:`.models` and :mod:`.series` (their public
names are also reachable from this package, loaded on first use). The SDK application
(:mod:`medir_monai.deploy.app`, ``pip install -e .[deploy]``) and the MONAI Label app
(:mod:`medir_monai.deploy.label`, ``pip install -e .[label]``) import their frameworks only when used. See
``docs/deploy.md`` for the working installs and what they printed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_EXPORT_SHAPE": "export",
    "OnnxNetwork": "export",
    "export_onnx": "export",
    "export_torchscript": "export",
    "max_abs_difference": "export",
    "parity_table": "export",
    "size_dependence": "export",
    "RestorationModel": "models",
    "check_input": "models",
    "load_bundle_network": "models",
    "load_restoration_model": "models",
    "model_kind": "models",
    "RestoredScan": "series",
    "restore_scan": "series",
    "restore_with_model": "series",
    "scan_from_datasets": "series",
    "task_for_scan": "series",
    "write_restored": "series",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    # lazy, so that ``python -m medir_monai.deploy.export`` / ``.app`` do not import their module twice
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
