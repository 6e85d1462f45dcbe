"""Paper-convention image quality metrics (docs/design.md, section 5).

The AMIR / TAT papers evaluate each 2-D test slice as follows:

1. de-normalise output and label from model space ``[0, 1]`` to physical units and clip both to the task's
   normalisation range (``Task.norm_range``);
2. clip both to the task's evaluation window (``Task.eval_window``; CT soft tissue [-160, 240] HU);
3. ``data_range = max(label) - min(label)`` of *that slice*;
4. ``PSNR = 10 log10(data_range^2 / MSE)``, ``RMSE = sqrt(MSE)`` in physical units, and SSIM with an 11x11 Gaussian
   window (sigma 1.5), zero-padded ("same") convolution, ``C1 = (0.01 data_range)^2``, ``C2 = (0.03 data_range)^2``,
   averaged over the whole map (borders included).

Tables report the mean over slices per task and the average over tasks.

MONAI's :class:`monai.metrics.PSNRMetric` / :class:`monai.metrics.SSIMMetric` differ slightly (a fixed
``max_val`` / ``data_range`` instead of the per-slice label range, and SSIM over the valid region only);
:func:`monai_metrics` computes them on the same windowed images so both conventions can be reported side by
side. Every table produced by this package says which convention it uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric

from .tasks import TASKS, Task, get_task

__all__ = [
    "METRIC_NAMES",
    "gaussian_window",
    "to_eval_window",
    "ssim_paper",
    "psnr_paper",
    "rmse_paper",
    "paper_metrics",
    "monai_metrics",
    "hot_spot_mask",
    "hot_spot_recovery",
]

METRIC_NAMES = ("psnr", "ssim", "rmse")
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    """(H,W), (1,H,W) or (B,1,H,W) -> (B,1,H,W) float64 (double keeps PSNR of near-perfect slices exact)."""
    x = torch.as_tensor(x)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected a 2-D slice shaped (H,W), (1,H,W) or (B,1,H,W), got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def gaussian_window(size: int = SSIM_WINDOW_SIZE, sigma: float = SSIM_SIGMA, dtype=torch.float64) -> torch.Tensor:
    """Normalised 2-D Gaussian window of shape (1, 1, size, size)."""
    coords = torch.arange(size, dtype=dtype) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def to_eval_window(x: torch.Tensor, task: str | Task, normalised: bool = True) -> torch.Tensor:
    """Steps 1-2 of the protocol: (de-normalise and) clip to the norm range, then clip to the eval window."""
    task = get_task(task)
    x = _as_batch(x)
    if normalised:
        x = task.denormalise(x).clamp(*task.norm_range)
    return x.clamp(*task.eval_window)


def _data_range(label: torch.Tensor) -> torch.Tensor:
    """Per-slice ``max - min`` of the label, shape (B,)."""
    flat = label.flatten(1)
    return flat.amax(1) - flat.amin(1)


def psnr_paper(pred: torch.Tensor, label: torch.Tensor, data_range: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR per slice (B,) of physical, already windowed images; ``data_range`` defaults to the label's range."""
    pred, label = _as_batch(pred), _as_batch(label)
    rng = _data_range(label) if data_range is None else torch.as_tensor(data_range, dtype=torch.float64)
    mse = ((pred - label) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(rng**2 / mse)


def rmse_paper(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """RMSE per slice (B,) in physical units."""
    pred, label = _as_batch(pred), _as_batch(label)
    return ((pred - label) ** 2).flatten(1).mean(1).sqrt()


def ssim_paper(pred: torch.Tensor, label: torch.Tensor, data_range: torch.Tensor | None = None) -> torch.Tensor:
    """SSIM per slice (B,): 11x11 Gaussian (sigma 1.5), zero padding, mean over the whole map."""
    pred, label = _as_batch(pred), _as_batch(label)
    rng = _data_range(label) if data_range is None else torch.as_tensor(data_range, dtype=torch.float64)
    rng = rng.reshape(-1, 1, 1, 1)
    window = gaussian_window(dtype=pred.dtype)
    pad = SSIM_WINDOW_SIZE // 2

    def blur(img: torch.Tensor) -> torch.Tensor:
        return F.conv2d(img, window, padding=pad)

    mu_p, mu_l = blur(pred), blur(label)
    var_p = blur(pred * pred) - mu_p**2
    var_l = blur(label * label) - mu_l**2
    cov = blur(pred * label) - mu_p * mu_l
    c1, c2 = (SSIM_K1 * rng) ** 2, (SSIM_K2 * rng) ** 2
    ssim_map = ((2 * mu_p * mu_l + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_l**2 + c1) * (var_p + var_l + c2))
    return ssim_map.flatten(1).mean(1)


def paper_metrics(
    pred: torch.Tensor, label: torch.Tensor, task: str | Task, normalised: bool = True
) -> dict[str, torch.Tensor]:
    """PSNR / SSIM / RMSE per slice with the papers' protocol.

    Args:
        pred: restored slice(s), (H,W), (1,H,W) or (B,1,H,W).
        label: reference slice(s), same shape.
        task: registry task (name or :class:`~medir_monai.tasks.Task`).
        normalised: inputs are in model space ``[0, 1]`` (default) rather than physical units.

    Returns:
        ``{"psnr": (B,), "ssim": (B,), "rmse": (B,)}`` float64 tensors (RMSE in ``task.unit``).
    """
    if tuple(pred.shape) != tuple(label.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    pred_w = to_eval_window(pred, task, normalised)
    label_w = to_eval_window(label, task, normalised)
    rng = _data_range(label_w)
    return {
        "psnr": psnr_paper(pred_w, label_w, rng),
        "ssim": ssim_paper(pred_w, label_w, rng),
        "rmse": rmse_paper(pred_w, label_w),
    }


def monai_metrics(
    pred: torch.Tensor, label: torch.Tensor, task: str | Task, normalised: bool = True
) -> dict[str, torch.Tensor]:
    """MONAI's PSNR / SSIM on the same windowed images, with the fixed eval-window width as data range.

    Returns ``{"monai_psnr": (B,), "monai_ssim": (B,)}``. MONAI's SSIM uses a valid (unpadded) 11x11 Gaussian
    window, so it differs from :func:`ssim_paper` at the borders.
    """
    task = get_task(task)
    pred_w = to_eval_window(pred, task, normalised).float()
    label_w = to_eval_window(label, task, normalised).float()
    width = float(task.eval_window[1] - task.eval_window[0])
    psnr = PSNRMetric(max_val=width, reduction="none")(pred_w, label_w)
    ssim = SSIMMetric(spatial_dims=2, data_range=width, reduction="none")(pred_w, label_w)
    return {"monai_psnr": psnr.reshape(-1).double(), "monai_ssim": ssim.reshape(-1).double()}


def hot_spot_mask(label: torch.Tensor, body_threshold: float, hot_fraction: float) -> torch.Tensor:
    """The label's hottest ``hot_fraction`` of its body (``label > body_threshold``), per slice, (B,1,H,W) bool.

    A slice whose body has fewer than ``1 / hot_fraction`` pixels has no hottest fraction to speak of: its mask
    is empty (its recovery is NaN).
    """
    label = _as_batch(label)
    masks = torch.zeros_like(label, dtype=torch.bool)
    for i, image in enumerate(label):
        body = image > body_threshold
        if body.sum() * hot_fraction < 1.0:
            continue
        cutoff = torch.quantile(image[body], 1.0 - hot_fraction)
        masks[i] = body & (image >= cutoff)
    return masks


def hot_spot_recovery(
    pred: torch.Tensor, label: torch.Tensor, task: str | Task, normalised: bool = True
) -> torch.Tensor:
    """Lesion uptake kept, per slice (B,): mean of ``pred`` over the label's hot spot / mean of the label there.

    The hot spot is the hottest ``task.hot_spot[1]`` of the body (label above ``task.hot_spot[0]``, physical
    units), where a model that smooths loses uptake first while its PSNR barely moves (1.0: uptake kept; a
    Gaussian blur of a PET slice gives about 0.8). Not a paper metric: the papers report PSNR / SSIM / RMSE only.

    Raises:
        ValueError: the task defines no hot spot, or the shapes differ.
    """
    task = get_task(task)
    if task.hot_spot is None:
        raise ValueError(f"task {task.name!r} defines no hot spot (Task.hot_spot); recovery is measured for "
                         f"{[t.name for t in TASKS.values() if t.hot_spot is not None]}")
    if tuple(pred.shape) != tuple(label.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    pred, label = _as_batch(pred), _as_batch(label)
    if normalised:
        pred = task.denormalise(pred).clamp(*task.norm_range)
        label = task.denormalise(label).clamp(*task.norm_range)
    mask = hot_spot_mask(label, *task.hot_spot).to(pred.dtype)
    return (pred * mask).flatten(1).sum(1) / (label * mask).flatten(1).sum(1)  # an empty mask gives 0 / 0 = NaN


def mean_over_tasks(per_task: dict[str, dict[str, float]], names: Sequence[str] = METRIC_NAMES) -> dict[str, float]:
    """The papers' "Average" column: unweighted mean over tasks of each per-task mean metric."""
    out = {}
    for name in names:
        values = [m[name] for m in per_task.values() if name in m and not math.isnan(m[name])]
        out[name] = float(sum(values) / len(values)) if values else float("nan")
    return out
