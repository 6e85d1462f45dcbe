"""MONAI Label app: every medir model as an image-to-image infer task.

Start (needs ``pip install -e .[label]``; see ``docs/deploy.md``)::

    monailabel start_server --app medir_monai/deploy/label --studies STUDIES_DIR \\
        --conf models amir,tat --conf task ct_denoise

App config (``--conf KEY VALUE``):
    models: comma-separated bundle names (under ``bundles/``), bundle folders or exported ``.ts`` / ``.onnx`` files,
        optionally ``name=path`` (default: every bundle with trained weights).
    task: default task for requests without one (default: the DICOM Modality; NIfTI needs a task).
    overlap, sw_batch_size: sliding-window defaults.

One-off run without a server::

    python -m monailabel.interfaces.utils.app -a medir_monai/deploy/label -s STUDIES_DIR -m infer \\
        -r '{"model": "amir", "image": "scan.nii.gz", "task": "ct_denoise"}' -o result.json
"""

from __future__ import annotations

import logging
from typing import Any

from medir_monai.deploy.label.core import ensure_pydicom_seg_compat

ensure_pydicom_seg_compat()

try:
    from monailabel.interfaces.app import MONAILabelApp
    from monailabel.interfaces.tasks.infer_v2 import InferTask
except ImportError as _err:
    raise ImportError(f"the MONAI Label app needs monailabel ({_err}); install it in its own environment "
                      "with pip install -e .[label] (docs/deploy.md)") from _err

from medir_monai.deploy.label.core import discover_models  # noqa: E402
from medir_monai.deploy.label.infer import RestorationInfer  # noqa: E402
from medir_monai.restore import DEFAULT_OVERLAP  # noqa: E402
from medir_monai.tasks import get_task  # noqa: E402

__all__ = ["MedirRestorationApp"]

_LOG = logging.getLogger(__name__)


class MedirRestorationApp(MONAILabelApp):
    """MONAI Label app offering restoration infer tasks (no trainers, no active-learning strategies)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, Any]) -> None:
        conf = dict(conf or {})
        task = conf.get("task") or None
        self.default_task = get_task(task).name if task else None
        self.overlap = float(conf.get("overlap", DEFAULT_OVERLAP))
        self.sw_batch_size = int(conf.get("sw_batch_size", 4))
        self.models = discover_models(conf)
        if not self.models:
            _LOG.warning("no restoration model found: pass --conf models <bundle or exported file>[,...]")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="medir-monai restoration",
                         description="All-in-one medical image restoration (MRI SR, low-dose CT, low-dose PET)",
                         version="0.1.0")

    def init_infers(self) -> dict[str, InferTask]:
        return {
            name: RestorationInfer(path, task=self.default_task, overlap=self.overlap, sw_batch_size=self.sw_batch_size)
            for name, path in self.models.items()
        }
