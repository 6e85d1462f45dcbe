"""MONAI Label infer task restoring an image with a medir model (``InferType.OTHERS``: image in, image out).

Needs MONAI Label (``pip install -e .[label]``). The task keeps MONAI Label's request flow (pre-transforms,
inferer, post-transforms, writer, latencies in the result JSON) but replaces each stage: the pre-transform reads
the scan in physical units (:func:`medir_monai.restore.read_scan`), the inferer is medir's slice-by-slice sliding
window, and the writer produces a float32 NIfTI instead of an integer label map.

Request keys besides MONAI Label's own (``image``, ``device``, ...): ``task`` (``mri_sr`` / ``ct_denoise`` /
``pet_synthesis``; default: the app config, else the DICOM Modality), ``overlap``, ``sw_batch_size``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medir_monai.deploy.label.core import ensure_pydicom_seg_compat

ensure_pydicom_seg_compat()  # before MONAI Label pulls in pydicom-seg

try:
    from monailabel.interfaces.tasks.infer_v2 import InferType
    from monailabel.tasks.infer.basic_infer import BasicInferTask
except ImportError as _err:
    raise ImportError(f"the MONAI Label app needs monailabel ({_err}); install it in its own environment "
                      "with pip install -e .[label] (docs/deploy.md)") from _err

from medir_monai.deploy.label.core import restore_to_nifti  # noqa: E402
from medir_monai.deploy.models import RestorationModel, load_restoration_model  # noqa: E402
from medir_monai.restore import DEFAULT_OVERLAP, DEFAULT_SW_BATCH_SIZE  # noqa: E402

__all__ = ["RestorationInfer"]

_LOG = logging.getLogger(__name__)


class _ResolvePath:
    """Pre-transform: keep the image path (the scan is read by the inferer, in physical units)."""

    def __call__(self, data: dict) -> dict:
        if not isinstance(data.get("image"), str):
            raise ValueError("restoration needs an image path (NIfTI / ITK file, DICOM file or series folder)")
        data["image_path"] = data["image"]
        return data


class RestorationInfer(BasicInferTask):
    """Image-to-image restoration with an exported model or a bundle (loaded on first use).

    Args:
        model_path: TorchScript / ONNX file or bundle folder (see :func:`~medir_monai.deploy.models.load_restoration_model`).
        task: default task (``None``: from the DICOM Modality; NIfTI requests must then give ``task``).
        overlap, sw_batch_size: sliding-window defaults (a request may override them).
        description: shown by MONAI Label clients.
    """

    def __init__(self, model_path: str | Path, task: str | None = None, overlap: float = DEFAULT_OVERLAP,
                 sw_batch_size: int = DEFAULT_SW_BATCH_SIZE,
                 description: str | None = None) -> None:
        self.model_path = Path(model_path)
        self._model: RestorationModel | None = None
        super().__init__(
            path=None,
            network=None,
            type=InferType.OTHERS,
            labels=None,
            dimension=3,
            description=description or f"medir restoration with {self.model_path.name} (image to image)",
            config={"task": task or "", "overlap": overlap, "sw_batch_size": sw_batch_size},
        )

    def is_valid(self) -> bool:
        return self.model_path.exists()

    def model(self) -> RestorationModel:
        if self._model is None:
            self._model = load_restoration_model(self.model_path)
            _LOG.info(f"loaded {self._model.name} ({self._model.kind}, roi {self._model.roi_size}) from {self.model_path}")
        return self._model

    def pre_transforms(self, data: dict | None = None) -> Sequence[Callable]:
        return [_ResolvePath()]

    def inverse_transforms(self, data: dict | None = None) -> None:
        return None  # nothing to invert: the restored image is written on the input grid

    def post_transforms(self, data: dict | None = None) -> Sequence[Callable]:
        return []

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        output = Path(tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name)
        path, summary = restore_to_nifti(
            self.model(),
            data["image_path"],
            output,
            task=data.get("task") or None,
            overlap=float(data.get("overlap", DEFAULT_OVERLAP)),
            sw_batch_size=int(data.get("sw_batch_size", 4)),
        )
        data[self.output_label_key] = str(path)
        data[self.output_json_key] = summary
        return data

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
        return data[self.output_label_key], dict(data[self.output_json_key])
