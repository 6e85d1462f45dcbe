"""``prepare_batch`` callables for MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``: what the network gets
from a batch of the restoration datasets (docs/design.md, section 4).

* :func:`prepare_lq_hq`: the LQ image is the input, the HQ image the target (Restormer, AMIR, TAT);
* DiffCode's stages (``bundles/diffcode``): :func:`prepare_hq_task_batch` (stage I, HQ in and out),
  :class:`LatentTargetBatch` (stage II, the target is the stage-I latent of HQ) and :func:`prepare_task_batch`
  (stage III), each passing the samples' task index as ``task=`` to the forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..networks.blocks import pad_to_multiple
from ..wrappers import unwrap

__all__ = ["prepare_lq_hq", "prepare_task_batch", "prepare_hq_task_batch", "LatentTargetBatch"]


def prepare_lq_hq(batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` for the engines: the LQ image is the network input, the HQ image the target."""
    lq = batchdata["lq"].to(device=device, non_blocking=non_blocking, **kwargs)
    hq = batchdata["hq"].to(device=device, non_blocking=non_blocking, **kwargs) if "hq" in batchdata else None
    return lq, hq


def _task_tensor(batchdata: Mapping, device: Any, non_blocking: bool) -> torch.Tensor:
    if "task" not in batchdata:
        raise KeyError("DiffCode batches need a 'task' entry (registry index per sample); see medir_monai.data")
    return torch.as_tensor(batchdata["task"]).long().reshape(-1).to(device=device, non_blocking=non_blocking)


def prepare_task_batch(
    batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
):
    """``prepare_batch`` for stage III (and stage-II validation): ``(LQ, HQ, (), {"task": [B] int64})``.

    MONAI engines call ``network(LQ, task=task)`` with it, so the codebook
    uses each sample's true task.
    """
    lq = batchdata["lq"].to(device=device, non_blocking=non_blocking, **kwargs)
    hq = batchdata["hq"].to(device=device, non_blocking=non_blocking, **kwargs) if "hq" in batchdata else None
    return lq, hq, (), {"task": _task_tensor(batchdata, device, non_blocking)}


def prepare_hq_task_batch(
    batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
):
    """``prepare_batch`` for stage I: the HQ image is input and target, ``(HQ, HQ, (), {"task": [B] int64})``."""
    hq = batchdata["hq"].to(device=device, non_blocking=non_blocking, **kwargs)
    return hq, hq, (), {"task": _task_tensor(batchdata, device, non_blocking)}


class LatentTargetBatch:
    """``prepare_batch`` for stage II: ``(LQ, z, (), {"z_hq": z})`` with ``z = E(HQ)`` from the frozen stage-I encoder.

    The engine then calls ``diffusion(LQ, z_hq=z)`` (:meth:`LatentDiffusion.forward`: the reverse chain from
    ``q(z_{T-1} | z)``) and the loss compares its ``z_hat`` with the target ``z``. LQ and HQ are padded (reflect) to a
    multiple of the latent down-sampling factor.

    Args:
        autoencoder: the trained stage-I :class:`~medir_monai.networks.diffcode.DiffCodeAutoencoder` (kept in eval
            mode, no gradient).
    """

    def __init__(self, autoencoder: nn.Module):
        self.autoencoder = autoencoder

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        ae = unwrap(self.autoencoder)
        factor = int(ae.downsample_factor)
        lq = batchdata["lq"].to(device=device, non_blocking=non_blocking, **kwargs)
        hq = batchdata["hq"].to(device=device, non_blocking=non_blocking, **kwargs)
        lq, _ = pad_to_multiple(lq, factor)
        hq, _ = pad_to_multiple(hq, factor)
        ae.eval()
        with torch.no_grad():
            z = ae.encode(hq)  # [B, C, H/f, W/f]
        return lq, z, (), {"z_hq": z}
