"""Load a restoration model for deployment: an exported TorchScript / ONNX file, a bundle folder or a config file
of a bundle (``configs/pretrained.json``: the shipped weights).

The MONAI Deploy application and the MONAI Label app both take one ``--model`` path and need the same things:
a callable network ``(B, 1, H, W) -> (B, 1, H, W)`` in model space ``[0, 1]``, a name to write into the outputs,
the sliding-window roi (the traced size for exports, the bundle's ``patch_size`` otherwise), whether the
network only accepts that size (see :func:`medir_monai.deploy.export.size_dependence`), the bundle's restoration
settings (``intensity_reference``, ``safeguard``, ``flip_ensemble``: what ``medir restore`` applies around the
network) and the training profile of its weights (the input guard, :func:`check_input`). An export from a bundle
carries the last two in its metadata, so a deployed file restores and warns as ``medir restore`` does.

Example::

    >>> from medir_monai.deploy.models import load_restoration_model
    >>> model = load_restoration_model("exported/amir.ts")
    >>> model.name, model.roi_size, model.fixed_size
    ('AMIR', (128, 128), False)
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medir_monai.bundle import bundle_parser
from medir_monai.restore import DEFAULT_ROI_SIZE

__all__ = ["METADATA_KEY", "OnnxNetwork", "RestorationModel", "bundle_of_config", "check_input",
           "load_bundle_network", "load_restoration_model", "model_kind"]

METADATA_KEY = "medir"
"""Key of this package's entry in the TorchScript ``metadata.json`` extra file and ONNX ``metadata_props``."""

_INFERENCE_CONFIG = "inference.json"


class OnnxNetwork:
    """An ONNX restoration model run with onnxruntime, callable like the network: ``(B, 1, H, W)`` tensor in and out.

    Args:
        path: ``.onnx`` file written by :func:`export_onnx` (or any model with one input and one output).
        providers: onnxruntime execution providers (default: CPU).
        num_threads: intra-op threads (``None``: onnxruntime's default).

    Attributes:
        metadata: the ``"medir"`` metadata entry (empty dict when absent).
        input_shape: the model's input dims (``int`` for static axes, ``str`` names for dynamic ones).

    Raises:
        ImportError: onnxruntime is not installed.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 num_threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError("running an ONNX model needs 'onnxruntime' (pip install -e .[deploy])") from err
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX model does not exist")
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=list(providers))
        self._input = self.session.get_inputs()[0]
        self.input_shape = list(self._input.shape)
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, Any] = json.loads(props[METADATA_KEY]) if METADATA_KEY in props else {}
        self.training = False  # looks like an eval-mode module to callers that check it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fixed = [d for d in self.input_shape[2:] if isinstance(d, int)]
        if len(fixed) == 2 and tuple(x.shape[-2:]) != tuple(fixed):
            raise ValueError(f"{self.path}: model only accepts {fixed[0]}x{fixed[1]} inputs (static axes), "
                             f"got {tuple(x.shape)}; restore with a sliding window of that roi")
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {self._input.name: array})[0]
        return torch.from_numpy(np.ascontiguousarray(out)).to(x.device)

    def eval(self) -> OnnxNetwork:
        return self


@dataclass
class RestorationModel:
    """A loaded restoration model and how to run it.

    Attributes:
        network: callable ``(B, 1, H, W) -> (B, 1, H, W)`` (a module, a TorchScript module or an ``OnnxNetwork``).
        name: model name written into DICOM SeriesDescription / NIfTI ``descrip`` (e.g. ``"AMIR"``).
        kind: ``"torchscript"``, ``"onnx"`` or ``"bundle"``.
        roi_size: sliding-window size to use (traced size of an export, ``patch_size`` of a bundle).
        fixed_size: the network only accepts ``roi_size`` inputs (a traced TAT).
        source: the path it was loaded from.
        settings: keyword arguments of :func:`~medir_monai.restore.restore_array` that belong to the model
            (``intensity_reference``, ``safeguard``, ``flip_ensemble``; empty for an export made without a bundle).
        training_profile: what the weights' training data looked like (:mod:`medir_monai.data.profile`);
            ``None`` when the weights record none (no input guard).
    """

    network: Callable[[torch.Tensor], Any]
    name: str
    kind: str
    roi_size: tuple[int, int]
    fixed_size: bool
    source: Path
    settings: dict[str, Any] = field(default_factory=dict)
    training_profile: dict[str, Any] | None = None


SETTING_KEYS = ("intensity_reference", "safeguard", "flip_ensemble")
"""Bundle config entries that :func:`~medir_monai.restore.restore_array` applies around the network."""


def check_input(model: RestorationModel, scan: Any, task: Any) -> str | None:
    """The input guard for deployed models: one message naming what of ``scan`` lies outside the training
    profile of ``model`` for ``task`` (as ``medir restore`` prints it), or ``None`` (inside, or no profile)."""
    from medir_monai.restore.engine import outside_profile
    from medir_monai.restore.scans import task_unit_factor
    from medir_monai.tasks import get_task

    if not model.training_profile:
        return None
    task = get_task(task)
    image = scan.array * np.float32(task_unit_factor(scan, task))
    return outside_profile(model.training_profile, scan.path, image, task.name, scan)


def bundle_of_config(path: str | os.PathLike) -> Path | None:
    """The bundle folder of a config file inside it (``bundles/amir/configs/pretrained.json`` -> ``bundles/amir``),
    or ``None`` when ``path`` is not a ``.json`` file in a bundle's ``configs/``."""
    path = Path(path)
    if path.suffix.lower() == ".json" and path.parent.name == "configs" and (path.parent / _INFERENCE_CONFIG).is_file():
        return path.parent.parent
    return None


def model_kind(path: str | os.PathLike) -> str:
    """``"bundle"`` (a folder with ``configs/inference.json``, or a config file in it such as
    ``configs/pretrained.json``, merged over ``inference.json``), ``"onnx"`` (``.onnx``) or ``"torchscript"`` (a zip).

    Raises:
        FileNotFoundError: missing path. ValueError: anything else, naming the path.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model path does not exist")
    if path.is_file() and bundle_of_config(path) is not None:
        return "bundle"
    if path.is_dir():
        if (path / "configs" / _INFERENCE_CONFIG).is_file():
            return "bundle"
        raise ValueError(f"{path}: a model folder must be a bundle with configs/{_INFERENCE_CONFIG}")
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(path):
        return "torchscript"
    raise ValueError(f"{path}: not a TorchScript archive (zip), an .onnx file, a bundle folder or a bundle config file")


def _pair(value: Any, what: str) -> tuple[int, int]:
    values = [int(v) for v in value]
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"{what}: expected two positive sizes, got {value!r}")
    return values[0], values[1]


def load_bundle_network(
    bundle: str | os.PathLike,
    config_files: Sequence[str | os.PathLike] | None = None,
    checkpoint: str | os.PathLike | None = None,
    untrained: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The eval-mode network of a bundle, with its weights, and ``{"model_name", "roi_size", "checkpoint",
    "settings", "training_profile"}`` (see :class:`RestorationModel`).

    ``bundle`` is a bundle folder or the name of an installed bundle (``"amir"``); ``config_files`` are paths or
    names of the bundle's configs (``"pretrained.json"``). Reads ``<bundle>/configs/inference.json`` (plus
    ``config_files`` merged over it, e.g. ``quick.json``), builds
    ``network_def`` and loads ``checkpoint`` (default: the config's ``ckpt_path``) with
    :func:`medir_monai.networks.load_official_state_dict` (this package's and the authors' key names).

    Args:
        untrained: skip the weights (random initialisation; for export parity checks only).

    Raises:
        ValueError: not a bundle folder or a missing extra config; FileNotFoundError: no weights.
    """
    from medir_monai.networks import load_official_state_dict
    from medir_monai.networks.official import load_weights_file

    parser, root = bundle_parser(bundle, _INFERENCE_CONFIG, config_files)
    network = parser.get_parsed_content("network_def", instantiate=True)
    ckpt = None
    if not untrained:
        ckpt = Path(checkpoint).expanduser() if checkpoint else Path(parser.get_parsed_content("ckpt_path"))
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt}: no trained weights for bundle {root.name} "
                                    "(train it first, pass a checkpoint, or export --untrained for parity checks)")
    saved = load_weights_file(ckpt) if ckpt else None  # read once: the weights and the training profile
    if saved is not None:
        load_official_state_dict(network, saved, source=str(ckpt))
    profile = saved.get("training_profile") if isinstance(saved, dict) else None
    settings = {key: parser.get_parsed_content(key) for key in SETTING_KEYS if key in parser}
    network = network.to(device).eval()
    name = parser.get("model_name", None) or type(network).__name__
    roi = _pair(parser.get_parsed_content("patch_size"), f"{root / 'configs' / _INFERENCE_CONFIG} patch_size") if "patch_size" in parser else DEFAULT_ROI_SIZE
    return network, {"model_name": str(name), "roi_size": roi, "checkpoint": str(ckpt) if ckpt else None,
                     "settings": settings, "training_profile": profile}


def _torchscript(path: Path, device: str | torch.device) -> RestorationModel:
    from monai.data import load_net_with_metadata

    try:
        network, meta, _ = load_net_with_metadata(str(path), map_location=torch.device(device))
    except Exception as err:
        raise ValueError(f"{path}: cannot load the TorchScript model: {type(err).__name__}: {err}") from err
    ours = meta.get(METADATA_KEY, {}) if isinstance(meta, dict) else {}
    if ours.get("input_shape"):
        roi = _pair(ours["input_shape"][-2:], f"{path} metadata input_shape")
    else:  # a bundle's own ckpt_export: metadata.json carries network_data_format
        spatial = meta.get("network_data_format", {}).get("inputs", {}).get("image", {}).get("spatial_shape")
        roi = _pair(spatial, f"{path} metadata spatial_shape") if spatial else DEFAULT_ROI_SIZE
    name = ours.get("model_name") or meta.get("name") or path.stem
    return RestorationModel(network.eval(), str(name), "torchscript", roi, bool(ours.get("fixed_size", False)), path,
                            dict(ours.get("settings") or {}), ours.get("training_profile"))


def _onnx(path: Path) -> RestorationModel:
    network = OnnxNetwork(path)
    meta = network.metadata
    static = [d for d in network.input_shape[2:] if isinstance(d, int)]
    if meta.get("input_shape"):
        roi = _pair(meta["input_shape"][-2:], f"{path} metadata input_shape")
    elif len(static) == 2:
        roi = (static[0], static[1])
    else:
        roi = DEFAULT_ROI_SIZE
    fixed = bool(meta.get("fixed_size", len(static) == 2))
    return RestorationModel(network, str(meta.get("model_name") or path.stem), "onnx", roi, fixed, path,
                            dict(meta.get("settings") or {}), meta.get("training_profile"))


def load_restoration_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    config_files: Sequence[str | os.PathLike] | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> RestorationModel:
    """Load a TorchScript archive (``.ts`` / ``.pt`` from :func:`~medir_monai.deploy.export.export_torchscript` or
    ``monai.bundle ckpt_export``), an ``.onnx`` file, a bundle folder, or a bundle config file (e.g.
    ``bundles/amir/configs/pretrained.json``: the shipped weights) (``config_files`` / ``checkpoint`` only apply to
    bundles).

    Raises:
        FileNotFoundError / ValueError: naming the path, for a missing or unrecognised model.
    """
    path = Path(path).expanduser()
    kind = model_kind(path)
    if kind == "onnx":
        return _onnx(path)
    if kind == "torchscript":
        return _torchscript(path, device)
    if path.is_file():  # a config file of a bundle: the bundle with that config merged over inference.json
        path, config_files = bundle_of_config(path), [path, *(config_files or [])]
    network, info = load_bundle_network(path, config_files=config_files, checkpoint=checkpoint, device=device)
    # an eager network (TAT included) handles any size; fixed_size only describes traced graphs
    return RestorationModel(network, info["model_name"], "bundle", info["roi_size"], False, path, info["settings"],
                            info["training_profile"])
