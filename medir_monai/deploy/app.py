"""MONAI Deploy App SDK application: restore a DICOM series (or a NIfTI volume) and write a new restored series.

Operator graph::

    DICOM folder:  DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator (Modality CT / MR / PT, all matches)
                     -> SeriesToScanOperator ----+
    NIfTI / ITK / one DICOM file:                 |
                   ScanFileLoaderOperator -------+-> RestoreOperator -> RestoredScanWriterOperator

* The two loaders are the SDK's; :class:`SeriesToScanOperator` turns each selected series into a
  :class:`~medir_monai.restore.ScanImage` with the same ordering and physical units as ``medir restore``.
* :class:`RestoreOperator` runs the model given with ``-m`` (a TorchScript file from
  :func:`~medir_monai.deploy.export.export_torchscript` or ``monai.bundle ckpt_export``, an ``.onnx`` file, or a bundle
  folder) slice by slice through MONAI's sliding-window inferer; the task (normalisation and output range) comes from
  the DICOM Modality, or ``--task`` for NIfTI. Values stay float32 in physical units end to end: the SDK's stock
  ``MonaiBundleInferenceOperator`` casts its output image to ``uint8`` (made for label maps), which would destroy a
  restored image, so it is not used.
* Inputs outside the training profile recorded with the weights (bundle checkpoints, and exports made from a
  bundle) are logged as a warning naming the numbers, the same message as ``medir restore``'s.
* :class:`RestoredScanWriterOperator` writes with :func:`medir_monai.restore.write_scan`: DICOM as a NEW series
  (new Series / SOP Instance UIDs, ``DERIVED\\SECONDARY``, SeriesDescription naming the model, patient and study tags
  kept, 16-bit pixels with RescaleSlope / RescaleIntercept), NIfTI as float32 with the input affine; atomically.

Run (needs ``pip install -e .[deploy]``; see ``docs/deploy.md``)::

    python -m medir_monai.deploy.app -i DICOM_DIR -o OUT -m exported/amir.ts

The SDK's own options and environment variables apply (``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH``,
``HOLOSCAN_MODEL_PATH`` inside a MONAI Application Package).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from monai.deploy.conditions import CountCondition
    from monai.deploy.core import AppContext, Application, Fragment, Operator, OperatorSpec
    from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator
except ImportError as _err:
    raise ImportError(
        f"medir_monai.deploy.app needs the MONAI Deploy App SDK ({_err}); install it with "
        "pip install -e .[deploy] (docs/deploy.md)"
    ) from _err

from medir_monai.deploy.models import RestorationModel, load_restoration_model
from medir_monai.deploy.series import RestoredScan, restore_with_model, scan_from_datasets, write_restored
from medir_monai.data.io import DataError
from medir_monai.restore import DEFAULT_OVERLAP, DEFAULT_SW_BATCH_SIZE, input_kind, read_scan
from medir_monai.tasks import TASKS, UnknownTaskError, get_task

__all__ = [
    "SERIES_SELECTION_RULES",
    "ScanFileLoaderOperator",
    "SeriesToScanOperator",
    "RestoreOperator",
    "RestoredScanWriterOperator",
    "MedirRestoreApp",
    "main",
]

SERIES_SELECTION_RULES = (
    '{"selections": [{"name": "restorable series", "conditions": {"Modality": "(?i)^(%s)$"}}]}'
    % "|".join(sorted({task.modality for task in TASKS.values()}))
)
"""DICOMSeriesSelectorOperator rules: every series whose Modality has a task (CT, MR, PT)."""

_LOG = logging.getLogger(__name__)


class ScanFileLoaderOperator(Operator):
    """Read one NIfTI / ITK file or single DICOM file with :func:`medir_monai.restore.read_scan`.

    Output ``scans``: a one-item list of :class:`~medir_monai.restore.ScanImage`.
    """

    def __init__(self, fragment: Fragment, *args: Any, input_path: Path, **kwargs: Any) -> None:
        self.input_path = Path(input_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("scans")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        op_output.emit([read_scan(self.input_path)], "scans")


class SeriesToScanOperator(Operator):
    """Turn the SDK's selected DICOM series into :class:`~medir_monai.restore.ScanImage` objects.

    Input ``study_selected_series_list`` (SDK ``StudySelectedSeries`` list); output ``scans``.

    Raises:
        ValueError: no series with a restorable modality was found under the input folder.
    """

    def __init__(self, fragment: Fragment, *args: Any, input_path: Path, **kwargs: Any) -> None:
        self.input_path = Path(input_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study_selected_series_list")
        spec.output("scans")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        selected = op_input.receive("study_selected_series_list") or []
        scans = []
        for study in selected:
            for item in study.selected_series:
                datasets = [sop.get_native_sop_instance() for sop in item.series.get_sop_instances()]
                scans.append(scan_from_datasets(datasets, self.input_path))
        if not scans:
            modalities = ", ".join(sorted({t.modality for t in TASKS.values()}))
            raise ValueError(f"{self.input_path}: no DICOM series with Modality {modalities} found")
        _LOG.info(f"{len(scans)} series selected under {self.input_path}")
        op_output.emit(scans, "scans")


class RestoreOperator(Operator):
    """Restore every scan with the model (sliding window, roi = the model's roi) in its task's physical units,
    with the model's restoration settings (intensity reference, safeguard, flip ensemble), as ``medir restore`` does.

    Each scan first goes through the input guard (:func:`~medir_monai.deploy.models.check_input`): a scan outside
    the weights' training profile is still restored, with one warning in the log naming the numbers (kept in
    :attr:`warnings`).

    Input ``scans``; output ``restored`` (list of :class:`~medir_monai.deploy.series.RestoredScan`).

    Args:
        model: the loaded model (see :func:`~medir_monai.deploy.models.load_restoration_model`).
        task: task name for every scan; ``None`` reads it from each scan's DICOM Modality.
        overlap, sw_batch_size: sliding-window settings.
    """

    def __init__(self, fragment: Fragment, *args: Any, model: RestorationModel, task: str | None = None,
                 overlap: float = DEFAULT_OVERLAP, sw_batch_size: int = DEFAULT_SW_BATCH_SIZE, **kwargs: Any) -> None:
        self.model = model
        self.task = task
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.warnings: list[str] = []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("scans")
        spec.output("restored")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        results: list[RestoredScan] = []
        for scan in op_input.receive("scans"):
            item, warning = restore_with_model(self.model, scan, self.task, overlap=self.overlap,
                                               sw_batch_size=self.sw_batch_size, progress=False)
            if warning:
                _LOG.warning(warning)
                self.warnings.append(warning)
            _LOG.info(f"restored {scan.path} ({scan.kind}, {item.task.name}, shape {scan.array.shape}) "
                      f"with {self.model.name}")
            results.append(item)
        op_output.emit(results, "restored")


class RestoredScanWriterOperator(Operator):
    """Write each restored scan into ``output_folder`` with :func:`medir_monai.restore.write_scan`.

    Input ``restored``. The written paths are kept in :attr:`written`.
    """

    def __init__(self, fragment: Fragment, *args: Any, output_folder: Path, model_name: str,
                 overwrite: bool = False, **kwargs: Any) -> None:
        self.output_folder = Path(output_folder)
        self.model_name = model_name
        self.overwrite = overwrite
        self.written: list[Path] = []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("restored")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        items = op_input.receive("restored")
        for index, item in enumerate(items):
            out = write_restored(item, self.output_folder, self.model_name, index=index, count=len(items),
                                 overwrite=self.overwrite)
            self.written.append(out)
            _LOG.info(f"wrote {out}")


class MedirRestoreApp(Application):
    """Restore a DICOM series folder or a NIfTI file with an exported model or a bundle (see the module docstring).

    Input, output and model paths come from the SDK's ``-i`` / ``-o`` / ``-m`` options (or its environment
    variables); the other settings are constructor arguments.

    Args:
        task: task for NIfTI input (required there) or to override the DICOM Modality.
        overlap, sw_batch_size: sliding-window settings.
        overwrite: replace existing outputs.
        config_files, checkpoint: bundle options (when ``-m`` is a bundle folder).
    """

    def __init__(self, *args: Any, task: str | None = None, overlap: float = DEFAULT_OVERLAP,
                 sw_batch_size: int = DEFAULT_SW_BATCH_SIZE,
                 overwrite: bool = False, config_files: Sequence[str] | None = None,
                 checkpoint: str | None = None, **kwargs: Any) -> None:
        self.task = get_task(task).name if task else None
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.overwrite = overwrite
        self.config_files = list(config_files or [])
        self.checkpoint = checkpoint
        self.writer: RestoredScanWriterOperator | None = None
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        context: AppContext = Application.init_app_context(self.argv)
        input_path, output_path = Path(context.input_path), Path(context.output_path)
        model = load_restoration_model(context.model_path, config_files=self.config_files, checkpoint=self.checkpoint)
        _LOG.info(f"model {model.name} ({model.kind}, roi {model.roi_size}) from {model.source}")

        restore = RestoreOperator(self, model=model, task=self.task, overlap=self.overlap,
                                  sw_batch_size=self.sw_batch_size, name="restore")
        self.writer = RestoredScanWriterOperator(self, output_folder=output_path, model_name=model.name,
                                                 overwrite=self.overwrite, name="writer")
        if input_kind(input_path) == "dicom_series":
            loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_path, name="dicom_loader")
            selector = DICOMSeriesSelectorOperator(self, rules=SERIES_SELECTION_RULES, all_matched=True,
                                                   name="series_selector")
            to_scan = SeriesToScanOperator(self, input_path=input_path, name="series_to_scan")
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, to_scan, {("study_selected_series_list", "study_selected_series_list")})
        else:
            to_scan = ScanFileLoaderOperator(self, CountCondition(self, 1), input_path=input_path, name="file_loader")
        self.add_flow(to_scan, restore, {("scans", "scans")})
        self.add_flow(restore, self.writer, {("restored", "restored")})


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medir_monai.deploy.app",
        description="MONAI Deploy application: restore a DICOM series folder (task from Modality) or a NIfTI file "
        "(--task) with an exported TorchScript / ONNX model or a bundle, writing a new restored series / file.",
    )
    p.add_argument("-i", "--input", required=True, help="DICOM series folder, or a NIfTI / ITK / DICOM file")
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    p.add_argument("-m", "--model", required=True, help="TorchScript file (.ts/.pt), .onnx file, or bundle folder")
    p.add_argument("--task", default=None, help="mri_sr, ct_denoise or pet_synthesis (default: DICOM Modality)")
    p.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, help=f"sliding-window overlap (default {DEFAULT_OVERLAP})")
    p.add_argument("--sw-batch-size", type=int, default=DEFAULT_SW_BATCH_SIZE,
                   help=f"windows per forward pass (default {DEFAULT_SW_BATCH_SIZE})")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--config", nargs="*", default=None, help="bundle only: extra config files (e.g. quick.json)")
    p.add_argument("--checkpoint", default=None, help="bundle only: weights (default: the bundle's ckpt_path)")
    p.add_argument("-l", "--log-level", default="INFO", help="SDK log level (default INFO)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, run the application once and print the written paths; returns the exit status."""
    args = _build_parser().parse_args(argv)
    for flag, value in (("--input", args.input), ("--model", args.model)):
        if not Path(value).expanduser().exists():
            raise SystemExit(f"{flag} {value}: does not exist")
    Path(args.output).expanduser().mkdir(parents=True, exist_ok=True)
    # Holoscan drops argv[0] (the interpreter); the SDK parser then drops the program name
    sdk_argv = [sys.executable, "medir-deploy", "-i", str(Path(args.input).expanduser()),
                "-o", str(Path(args.output).expanduser()), "-m", str(Path(args.model).expanduser()),
                "-l", args.log_level.upper()]
    try:
        task = get_task(args.task).name if args.task else None
        app = MedirRestoreApp(sdk_argv, task=task, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                              overwrite=args.overwrite, config_files=args.config, checkpoint=args.checkpoint)
        app.run()
    except (DataError, UnknownTaskError, ValueError, FileExistsError, FileNotFoundError) as err:
        # bad input, ambiguous task, existing output, unusable model: one clear line (the SDK logged the rest)
        print(f"medir deploy: error: {err}", file=sys.stderr)
        return 2
    written = app.writer.written if app.writer is not None else []
    for path in written:
        print(path)
    return 0 if written else 1


if __name__ == "__main__":
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
    sys.exit(main())
