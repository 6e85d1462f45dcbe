"""Export the restoration networks to TorchScript (tracing) and ONNX, and check the exports against eager mode.

Both exports trace the network on one example input (``torch.jit.trace``; ``torch.onnx.export`` with the
TorchScript-based exporter, ``dynamo=False``), so what a traced graph can do is decided by the Python code that ran
while tracing:

* **Restormer**: no size-dependent Python branches; the traced graph restores any batch size and any ``H, W``
  (sizes not divisible by 8 are reflect-padded inside the graph, so each side must be >= 8).
* **AMIR**: the spatial MoE layers switch from sparse dispatch (each expert runs only on its routed tokens, a
  data-dependent split) to dense dispatch under tracing (every expert runs on every token, the top-k outputs are
  gathered). The output is the same to float rounding, but the exported SRMs do ``num_experts / top_k`` (= 2) times
  the expert work of eager mode. Any batch size and ``H, W`` (>= 9, the RIN's strided convolutions).
* **TAT**: the test-time local converter chooses its attention windows from the feature-map sizes with Python
  integer arithmetic, so the window layout is frozen into the graph at trace time. A traced TAT is therefore only
  valid at the traced ``H, W`` (any batch size: the sample-adaptive depthwise convolution is traced as a sum of
  shifted copies that does not depend on the batch). :func:`export_torchscript` wraps such a model in a scripted
  size guard that raises on any other size, and :func:`export_onnx` gives it static ``H, W`` (dynamic batch only).
  Restore with a sliding window whose roi is the traced size (the training patch, 128 x 128): every window then
  has exactly the traced size.
* **DiffCode** is not covered here (its stage-III network takes a task-dependent codebook prior).

Example::

    >>> from medir_monai.deploy.export import export_torchscript, export_onnx, max_abs_difference
    >>> export_torchscript(net, "amir.ts", input_shape=(1, 1, 128, 128), model_name="AMIR")
    >>> export_onnx(net, "amir.onnx", input_shape=(1, 1, 128, 128), model_name="AMIR")

Command line (prints the parity table; see ``docs/deploy.md``)::

    python -m medir_monai.deploy.export --bundle bundles/amir --output-dir exported --onnx --check 128x128 96x160
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from .models import METADATA_KEY, OnnxNetwork, load_bundle_network

__all__ = [
    "DEFAULT_EXPORT_SHAPE",
    "ONNX_OPSET",
    "METADATA_KEY",
    "OnnxNetwork",
    "size_dependence",
    "export_torchscript",
    "export_onnx",
    "max_abs_difference",
    "parity_table",
    "parse_size",
    "main",
]

DEFAULT_EXPORT_SHAPE = (1, 1, 128, 128)
"""Example input of the exports: one 1-channel slice of the training patch size (docs/design.md, section 4)."""
ONNX_OPSET = 17
"""ONNX opset: the first with LayerNormalization, supported by onnxruntime >= 1.14."""
_INPUT_NAME, _OUTPUT_NAME = "image", "pred"


# ---- what a traced graph keeps from the Python code -------------------------------------------------------
def size_dependence(network: torch.nn.Module) -> str | None:
    """Why a traced ``network`` is only valid at the traced ``H, W``, or ``None`` when it is valid at any size.

    Today only TAT's test-time local converter (``local_window_ratio`` not ``None``) freezes a size-dependent layout.
    """
    ratio = getattr(network, "local_window_ratio", None)
    if ratio is not None and hasattr(network, "train_size"):
        return (f"{type(network).__name__}: the local-converter attention windows ({ratio} x training size "
                f"{tuple(network.train_size)} per level) are laid out from the feature-map size at trace time")
    return None


def _check_shape(input_shape: Sequence[int], network: torch.nn.Module) -> tuple[int, ...]:
    shape = tuple(int(v) for v in input_shape)
    channels = getattr(network, "in_channels", None)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be (B, C, H, W) with positive sizes; got {tuple(input_shape)}")
    if channels is not None and shape[1] != channels:
        raise ValueError(f"input_shape {shape} has {shape[1]} channel(s) but the network takes {channels}")
    return shape


def _metadata(network: torch.nn.Module, shape: tuple[int, ...], model_name: str | None, fmt: str,
              deployment: Mapping[str, Any] | None = None) -> dict[str, Any]:
    reason = size_dependence(network)
    carried = {key: deployment[key] for key in ("settings", "training_profile") if deployment and deployment.get(key)}
    return {
        **carried,
        "model_name": model_name or type(network).__name__,
        "network_class": f"{type(network).__module__}.{type(network).__qualname__}",
        "format": fmt,
        "input_shape": list(shape),
        "fixed_size": reason is not None,
        "fixed_size_reason": reason or "",
    }


# ---- TorchScript -----------------------------------------------------------------------------------------
class _SizeGuard(torch.nn.Module):
    """Scripted wrapper refusing inputs whose ``H, W`` differ from the traced ones (a clear error, not wrong output)."""

    def __init__(self, inner: torch.nn.Module, height: int, width: int) -> None:
        super().__init__()
        self.inner = inner
        self.height = height
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.height or x.shape[-1] != self.width:
            raise RuntimeError(
                "exported model is only valid for inputs of {}x{} (traced size), got {}x{}; restore with a sliding "
                "window of that roi".format(self.height, self.width, x.shape[-2], x.shape[-1])
            )
        return self.inner(x)


def export_torchscript(
    network: torch.nn.Module,
    filepath: str | os.PathLike,
    input_shape: Sequence[int] = DEFAULT_EXPORT_SHAPE,
    model_name: str | None = None,
    extra_metadata: dict[str, Any] | None = None,
    deployment: Mapping[str, Any] | None = None,
) -> Path:
    """Trace ``network`` (eval mode, no grad) on a random input of ``input_shape`` and save it with metadata.

    The file is a TorchScript archive (``torch.jit.load``, MONAI Deploy's ``TorchScriptModel``) holding MONAI's
    ``metadata.json`` extra file (:func:`monai.data.save_net_with_metadata`) with an entry ``"medir"``:
    ``model_name``, ``input_shape``, ``fixed_size`` (see :func:`size_dependence`). Size-dependent networks are
    wrapped in a scripted guard that raises on other ``H, W``. The file is written atomically.

    Args:
        network: 2-D restoration network ``(B, C, H, W) -> (B, C, H, W)``; its train/eval mode is restored.
        filepath: output file (``.ts`` or ``.pt`` by convention).
        input_shape: ``(B, C, H, W)`` of the example input.
        model_name: name stored in the metadata (default: the class name).
        extra_metadata: more entries for ``metadata.json`` (e.g. the bundle's ``metadata.json`` content).
        deployment: ``{"settings", "training_profile"}`` of the weights (the info of
            :func:`~medir_monai.deploy.models.load_bundle_network`), stored in the ``"medir"`` entry so that the
            Deploy and Label apps restore with the bundle's settings and check inputs with its guard.

    Returns:
        the written path.
    """
    from monai.data import save_net_with_metadata

    shape = _check_shape(input_shape, network)
    meta = _metadata(network, shape, model_name, "torchscript", deployment)
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            example = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
            traced = torch.jit.trace(network, example, check_trace=False)
            if meta["fixed_size"]:
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in torch 2.13
                traced = torch.jit.script(_SizeGuard(traced, shape[-2], shape[-1]))
    finally:
        network.train(was_training)
    final = Path(filepath)
    with atomic_path(final) as tmp:
        save_net_with_metadata(traced, str(tmp), meta_values={**(extra_metadata or {}), METADATA_KEY: meta})
    return final


# ---- ONNX ------------------------------------------------------------------------------------------------
def export_onnx(
    network: torch.nn.Module,
    filepath: str | os.PathLike,
    input_shape: Sequence[int] = DEFAULT_EXPORT_SHAPE,
    model_name: str | None = None,
    opset_version: int = ONNX_OPSET,
    deployment: Mapping[str, Any] | None = None,
) -> Path:
    """Export ``network`` to ONNX with the TorchScript-based exporter (:func:`monai.networks.utils.convert_to_onnx`).

    Input ``"image"``, output ``"pred"``. Batch, height and width are dynamic axes, except for size-dependent
    networks (:func:`size_dependence`), which get static ``H, W`` so that onnxruntime refuses other sizes. The
    :func:`size_dependence` metadata (and ``deployment``, as in :func:`export_torchscript`) is stored in the
    model's ``metadata_props`` (key ``"medir"``, JSON). The file is written atomically.

    Raises:
        ImportError: ``onnx`` is not installed (``pip install -e .[deploy]``).
    """
    try:
        import onnx
    except ImportError as err:
        raise ImportError("export_onnx needs the 'onnx' package (pip install -e .[deploy])") from err
    from monai.networks.utils import convert_to_onnx

    shape = _check_shape(input_shape, network)
    meta = _metadata(network, shape, model_name, "onnx", deployment)
    axes = {0: "batch"} if meta["fixed_size"] else {0: "batch", 2: "height", 3: "width"}
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    example = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = network.training
    final = Path(filepath)
    try:
        with atomic_path(final) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python ints taken from shapes
            convert_to_onnx(network, [example], input_names=[_INPUT_NAME], output_names=[_OUTPUT_NAME],
                            opset_version=opset_version, dynamic_axes={_INPUT_NAME: axes, _OUTPUT_NAME: axes},
                            filename=str(tmp), verify=False, use_trace=True, dynamo=False)
            model = onnx.load(str(tmp))
            entry = model.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, json.dumps(meta)
            onnx.save(model, str(tmp))
    finally:
        network.train(was_training)
    return final


# ---- parity ------------------------------------------------------------------------------------------------
def max_abs_difference(
    reference: Callable[[torch.Tensor], Any],
    candidate: Callable[[torch.Tensor], Any],
    input_shape: Sequence[int],
    seed: int = 0,
) -> float:
    """``max |candidate(x) - reference(x)|`` on one random input ``x`` in ``[0, 1)`` of ``input_shape`` (no grad).

    A tuple / list output uses its first item. Modules are put in eval mode.
    """
    x = torch.rand(tuple(int(v) for v in input_shape), generator=torch.Generator().manual_seed(seed))
    outs = []
    for fn in (reference, candidate):
        if isinstance(fn, torch.nn.Module):
            fn.eval()
        with torch.no_grad():
            y = fn(x)
        outs.append((y[0] if isinstance(y, (tuple, list)) else y).detach().float().cpu())
    if outs[0].shape != outs[1].shape:
        raise ValueError(f"output shapes differ: {tuple(outs[0].shape)} vs {tuple(outs[1].shape)}")
    return float((outs[0] - outs[1]).abs().max())


def _last_line(err: Exception, limit: int = 200) -> str:
    """The informative line of an error (TorchScript puts the raised message on the last line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    named = re.match(r"^[\w.]*(Error|Exception):", text) is not None
    return (text if named else f"{type(err).__name__}: {text}")[:limit]


def parity_table(
    reference: torch.nn.Module,
    candidates: dict[str, Callable[[torch.Tensor], Any]],
    shapes: Sequence[Sequence[int]],
) -> list[dict[str, Any]]:
    """Rows ``{"format", "shape", "max_abs_diff" or "error"}`` comparing every candidate with ``reference``."""
    rows = []
    for name, fn in candidates.items():
        for shape in shapes:
            row: dict[str, Any] = {"format": name, "shape": tuple(int(v) for v in shape)}
            try:
                row["max_abs_diff"] = max_abs_difference(reference, fn, shape)
            except Exception as err:  # an export refusing a size is a result to print, not a crash
                row["error"] = _last_line(err)
            rows.append(row)
    return rows


# ---- command line -----------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """``"128x128"`` -> ``(128, 128)``; a clear error otherwise."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"size must look like HxW with positive integers, e.g. 128x128; got {text!r}")
    return int(parts[0]), int(parts[1])


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medir_monai.deploy.export",
        description="Export a bundle's network to TorchScript (and ONNX) and print the max |exported - eager| "
        "on the traced size and on other sizes.",
    )
    p.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/amir")
    p.add_argument("--config", nargs="*", default=None, help="extra config files merged over inference.json")
    p.add_argument("--checkpoint", default=None, help="weights (default: the bundle's ckpt_path)")
    p.add_argument("--untrained", action="store_true",
                   help="export the randomly initialised network (parity checks only; no checkpoint needed)")
    p.add_argument("--output-dir", required=True, help="folder for <bundle>.ts and <bundle>.onnx")
    p.add_argument("--size", type=parse_size, default=None, help="traced H x W (default: the bundle's patch_size)")
    p.add_argument("--onnx", action="store_true", help="also export ONNX (needs onnx + onnxruntime)")
    p.add_argument("--check", nargs="*", type=parse_size, default=[], help="more H x W sizes to compare at")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 when a parity check at the traced size fails)."""
    args = _build_parser().parse_args(argv)
    torch.manual_seed(0)
    network, info = load_bundle_network(args.bundle, config_files=args.config, checkpoint=args.checkpoint,
                                        untrained=args.untrained)
    size = args.size or info["roi_size"]
    shape = (1, network.in_channels if hasattr(network, "in_channels") else 1, *size)
    out_dir = Path(args.output_dir)
    stem = Path(args.bundle).resolve().name
    candidates: dict[str, Callable] = {}
    ts_path = export_torchscript(network, out_dir / f"{stem}.ts", shape, model_name=info["model_name"], deployment=info)
    candidates["torchscript"] = torch.jit.load(str(ts_path))
    print(f"wrote {ts_path} ({ts_path.stat().st_size / 2**20:.1f} MiB)")
    if args.onnx:
        onnx_path = export_onnx(network, out_dir / f"{stem}.onnx", shape, model_name=info["model_name"],
                                deployment=info)
        candidates["onnx"] = OnnxNetwork(onnx_path)
        print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 2**20:.1f} MiB)")
    reason = size_dependence(network)
    print(f"model {info['model_name']} ({type(network).__name__}), traced at {shape}; "
          + (f"valid only at the traced size: {reason}" if reason else "valid at any size"))
    shapes = [shape, (2, *shape[1:])] + [(1, shape[1], *hw) for hw in args.check]
    status = 0
    for row in parity_table(network, candidates, shapes):
        where = "x".join(str(v) for v in row["shape"])
        if "error" in row:
            print(f"  {row['format']:<12} {where:<14} refused: {row['error']}")
        else:
            print(f"  {row['format']:<12} {where:<14} max|diff| = {row['max_abs_diff']:.3e}")
            if row["shape"][-2:] == shape[-2:] and row["max_abs_diff"] > 1e-4:
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
