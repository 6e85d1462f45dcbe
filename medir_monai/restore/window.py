"""The network call: one 2-D network restores a slice or a volume, slice by slice, through MONAI's sliding window.

:func:`restore_array` is where the task enters: each slice is normalised with the task's range (docs/design.md,
section 2), optionally scaled to the training intensity reference first, restored window by window, clipped to
the trained range, de-normalised and, when the bundle asks for it, passed through a consistency safeguard
(:mod:`medir_monai.safeguard`). With ``flip_ensemble`` each slice is restored as it is and mirrored three ways
(:class:`FlipEnsembleInferer`) and the four outputs are averaged. Everything before (reading) and after (writing)
lives in the sibling modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from tqdm.auto import tqdm

from medir_monai.safeguard import RestorationSafeguard
from medir_monai.tasks import PAPER_PATCH_SIZE, Task, get_task
from medir_monai.transforms import ScaleToReference

DEFAULT_ROI_SIZE = (PAPER_PATCH_SIZE, PAPER_PATCH_SIZE)
"""The papers' training patch (docs/design.md, section 4): the natural sliding-window size."""
DEFAULT_OVERLAP = 0.25
"""Sliding-window overlap of every restoration path (``medir restore``, the bundles, the Deploy and Label apps)."""
DEFAULT_SW_BATCH_SIZE = 4
"""Windows per network call."""
FLIP_VIEWS = ((), (-1,), (-2,), (-2, -1))
"""The flip ensemble's views of a slice, as the spatial dims to mirror: as it is, left-right, up-down, both."""


class FlipEnsembleInferer(Inferer):
    """Test-time flip ensemble around another inferer: the mean of its outputs on mirrored copies of the input,
    each mirrored back (the "self-ensemble" of image restoration; docs/design.md, section 9).

    The degradations (k-space truncation, CT and PET noise) are the same in a mirrored image, so every view is a
    valid input; averaging them cancels what the network does differently per orientation. It costs one
    inference per view.

    Args:
        inferer: the inferer run on each view (the bundles' ``SlidingWindowInferer``).
        views: the spatial dims to mirror per view (``()``: the input as it is); default :data:`FLIP_VIEWS`.
        enabled: ``False`` calls ``inferer`` once, unchanged (so a bundle config can switch the ensemble).

    Raises:
        ValueError: no views, or a view naming a dim other than the last two (the image plane).
    """

    def __init__(self, inferer: Inferer, views: Sequence[Sequence[int]] = FLIP_VIEWS, enabled: bool = True) -> None:
        super().__init__()
        self.inferer = inferer
        self.views = tuple(tuple(int(d) for d in view) for view in views)
        if not self.views:
            raise ValueError("FlipEnsembleInferer needs at least one view")
        for view in self.views:
            if any(d not in (-1, -2) for d in view):
                raise ValueError(f"flip views mirror the image plane, dims -2 / -1; got {view!r}")
        self.enabled = bool(enabled)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.enabled:
            return self.inferer(inputs, network, *args, **kwargs)
        total = None
        for view in self.views:  # inputs: (B, C, H, W)
            mirrored = torch.flip(inputs, view) if view else inputs
            out = self.inferer(mirrored, network, *args, **kwargs)
            out = torch.flip(out, view) if view else out
            total = out if total is None else total + out
        return total / len(self.views)


def _module_device(network: Callable) -> torch.device:
    """Device of the first parameter (or buffer) of ``network``; CPU for parameter-free callables."""
    if isinstance(network, torch.nn.Module):
        for tensor in network.parameters():
            return tensor.device
        for tensor in network.buffers():
            return tensor.device
    return torch.device("cpu")


def _image_only(network: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap ``network`` so that it returns only the image and check that it keeps the input shape.

    Networks with side outputs return a tuple / list whose first item is the image (AMIR's MoE layers), or a
    dict holding ``"pred"``; both are accepted.
    """

    def call(x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, h, w) windows
        y = network(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        elif isinstance(y, dict):
            if "pred" not in y:
                raise TypeError(f"network returned a dict without a 'pred' key (keys: {sorted(y)})")
            y = y["pred"]
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"network must map (B, 1, H, W) to the same shape; got {got} for input {tuple(x.shape)}")
        if not y.is_contiguous() or y.data_ptr() == x.data_ptr():
            y = y.clone(memory_format=torch.contiguous_format)  # the inferer weights the output in place
        return y

    return call


def _as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(value), int(value)) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints (2-D networks); got {value!r}")
    return pair  # type: ignore[return-value]


def restore_array(
    network: Callable,
    image: torch.Tensor | np.ndarray,
    task: str | Task,
    roi_size: int | Sequence[int] = DEFAULT_ROI_SIZE,
    overlap: float = DEFAULT_OVERLAP,
    sw_batch_size: int = DEFAULT_SW_BATCH_SIZE,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
    sw_device: torch.device | str | None = None,
    progress: bool = True,
    axis: int = -1,
    clip: bool = True,
    intensity_reference: Mapping[str, Mapping] | None = None,
    safeguard: Mapping[str, Mapping] | RestorationSafeguard | None = None,
    flip_ensemble: bool = False,
    **inferer_kwargs: Any,
) -> torch.Tensor | np.ndarray:
    """Restore a 2-D slice or a 3-D volume given in physical units, slice by slice.

    Each slice along ``axis`` is normalised with the task's range (clip to ``norm_range``, min-max to
    ``[0, 1]``, docs/design.md, section 2), restored through MONAI's
    :class:`~monai.inferers.SlidingWindowInferer` (windows of the training patch size blended with a
    Gaussian weight, as in the papers' full-resolution testing) and mapped back to physical units.

    Args:
        network: 2-D network (or any callable) ``(B, 1, H, W) -> (B, 1, H, W)`` in model space ``[0, 1]``; a
            tuple / list output uses its first item. Modules are put in eval mode for the call (and restored).
        image: ``(H, W)`` or ``(H, W, D)`` tensor or array in physical units (HU, SUV, raw MRI intensity).
        task: task name or :class:`~medir_monai.tasks.Task` (sets the normalisation range).
        roi_size: sliding-window size (the training patch, 128 x 128 by default). Images smaller than it are
            padded (``padding_mode`` / ``cval`` of the inferer, default zeros = the range's low end).
        overlap: fraction of window overlap.
        sw_batch_size: windows per network call.
        mode: window blending, ``"gaussian"`` or ``"constant"``.
        device: where each slice's output is stitched (``None``: the input's device, CPU for arrays), so a
            large volume can stay on the CPU while windows run on the GPU.
        sw_device: where windows are sent for the network (``None``: the network's device).
        progress: show a tqdm bar over slices.
        axis: the acquisition (slice) axis of a 3-D input; ignored for 2-D input.
        clip: clip the network output to ``[0, 1]`` (the trained range) before de-normalising.
        intensity_reference: per task name, :class:`~medir_monai.transforms.ScaleToReference` arguments: each
            slice of that task is scaled so its robust percentile meets the reference before normalisation,
            and the restored slice is scaled back (the per-scan normalisation the model was trained with; the
            bundle configs' ``intensity_reference``).
        safeguard: per task name, a :mod:`medir_monai.safeguard` setting (``{"method": "noise", ...}``) applied
            to each restored slice against its input, in physical units (the bundle configs' ``safeguard``).
        flip_ensemble: restore each slice and its three mirror images and average the four (see
            :class:`FlipEnsembleInferer`; the bundle configs' ``flip_ensemble``), before clipping and the safeguard.
        inferer_kwargs: further :class:`~monai.inferers.SlidingWindowInferer` arguments (``sigma_scale``,
            ``padding_mode``, ``cval``, ``buffer_steps``, ...).

    Returns:
        the restored image, same shape, float32, in physical units: a numpy array for array input, a tensor
        on the input's device otherwise.

    Raises:
        ValueError: for an image that is not 2-D / 3-D, empty or not finite, or a network that changes the shape.
    """
    task = get_task(task)
    roi = _as_pair(roi_size, "roi_size")
    as_numpy = isinstance(image, np.ndarray)
    x = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32) if as_numpy else image)
    if isinstance(x, MetaTensor):  # drop the metadata, keep the data
        x = x.as_tensor()
    if x.ndim not in (2, 3):
        raise ValueError(f"image must be 2-D (H, W) or 3-D (H, W, D); got shape {tuple(x.shape)}")
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        raise ValueError(f"image of shape {tuple(x.shape)} is empty or holds NaN / Inf values")
    x = x.to(torch.float32)
    axis = axis % x.ndim if x.ndim == 3 else 0
    planes = x[None] if x.ndim == 2 else torch.movedim(x, axis, 0)  # (S, H, W)

    windows = SlidingWindowInferer(
        roi_size=roi,
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        mode=mode,
        sw_device=sw_device if sw_device is not None else _module_device(network),
        device=device,
        progress=False,
        **inferer_kwargs,
    )
    inferer = FlipEnsembleInferer(windows, enabled=flip_ensemble)
    call = _image_only(network)
    reference = (intensity_reference or {}).get(task.name)
    scaler = ScaleToReference(**reference) if reference else None
    guard = safeguard if isinstance(safeguard, RestorationSafeguard) else RestorationSafeguard(safeguard)
    out = torch.empty_like(planes)
    was_training = network.training if isinstance(network, torch.nn.Module) else None
    if was_training is not None:
        network.eval()
    try:
        with torch.no_grad():
            bar = tqdm(range(planes.shape[0]), desc=f"restore {task.name}", unit="slice", disable=not progress)
            for s in bar:
                factor = scaler.factor_of(planes[s]) if scaler is not None else 1.0
                model_in = task.normalise(planes[s] * factor)[None, None]  # (1, 1, H, W) in [0, 1]
                model_out = inferer(model_in, call)[0, 0]
                if clip:
                    model_out = model_out.clamp(0.0, 1.0)
                restored = (task.denormalise(model_out) / factor).to(out.device, torch.float32)
                out[s] = guard(planes[s], restored, task) if guard else restored
    finally:
        if was_training is not None:
            network.train(was_training)
    restored = out[0] if x.ndim == 2 else torch.movedim(out, 0, axis)
    return restored.cpu().numpy() if as_numpy else restored


