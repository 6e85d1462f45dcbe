"""MONAI Label app: medir restoration models as image-to-image (``InferType.OTHERS``) infer tasks.

The app folder is this package (``monailabel start_server --app medir_monai/deploy/label ...``); its ``main.py``
defines :class:`~medir_monai.deploy.label.main.MedirRestorationApp`. Importing this package does not import MONAI
Label: :mod:`.core` (model discovery, restoring one image to NIfTI, the pydicom-seg compatibility alias) works
without it, :mod:`.infer` and :mod:`.main` need ``pip install -e .[label]``.
"""

from __future__ import annotations

from pathlib import Path

from .core import DEFAULT_MODELS, dicom_affine, discover_models, ensure_pydicom_seg_compat, restore_to_nifti

__all__ = ["APP_DIR", "DEFAULT_MODELS", "dicom_affine", "discover_models", "ensure_pydicom_seg_compat",
           "restore_to_nifti"]

APP_DIR = Path(__file__).resolve().parent
"""The folder to pass as ``--app`` to ``monailabel``."""
