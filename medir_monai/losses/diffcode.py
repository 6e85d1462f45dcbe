"""DiffCode's objectives (DiffCode, MICCAI 2025; docs/design.md, section 4), one per training stage.

* :class:`DiffCodeCodebookLoss`: stage I, ``L1(recon, HQ) + vq``; :class:`CodebookStageLoss` is the same behind the
  ``loss_function(pred, label)`` interface of MONAI's trainer (``vq`` read from the network's ``aux_loss``);
* :class:`LatentStageLoss`: stage II, ``L1(z_hat, z)`` on the latent;
* :class:`DiffCodeLoss`: stage III, the paper's Eq. 7, ``L1(restored, HQ)``.

The trainer-facing losses write their terms into ``engine.state.output`` when attached (``AttachHandler``), for
``StatsHandler`` / TensorBoard / the progress bar.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import IterationEvents
from torch import nn

from ..wrappers import unwrap

__all__ = ["DiffCodeCodebookLoss", "CodebookStageLoss", "LatentStageLoss", "DiffCodeLoss"]


class DiffCodeCodebookLoss(nn.Module):
    """DiffCode stage-I objective (DiffCode, MICCAI 2025, stage I): ``l1_weight * L1(recon, HQ) + vq_weight * vq``.

    ``vq`` is the quantiser's ``||sg[z] - z_q||^2 + beta ||z - sg[z_q]||^2`` returned by
    :class:`medir_monai.networks.diffcode.DiffCodeAutoencoder` (``beta = 0.25``); both weights are 1 in the paper.

    Example::

        recon, vq_loss, _ = autoencoder(hq, task)
        loss = DiffCodeCodebookLoss()(recon, hq, vq_loss)

    After a call, ``last_terms`` holds the detached ``l1`` and ``vq`` terms (for logging).
    """

    def __init__(self, l1_weight: float = 1.0, vq_weight: float = 1.0) -> None:
        super().__init__()
        if l1_weight < 0 or vq_weight < 0:
            raise ValueError(f"DiffCodeCodebookLoss: weights must be >= 0, got {l1_weight}, {vq_weight}.")
        self.l1_weight = float(l1_weight)
        self.vq_weight = float(vq_weight)
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, recon: torch.Tensor, target: torch.Tensor, vq_loss: torch.Tensor) -> torch.Tensor:
        """Total stage-I loss (0-dim) from the reconstruction, the HQ target and the quantiser loss."""
        if recon.shape != target.shape:
            raise ValueError(
                f"DiffCodeCodebookLoss: recon and target must have the same shape, got {tuple(recon.shape)}, "
                f"{tuple(target.shape)}."
            )
        if vq_loss.numel() != 1:
            raise ValueError(f"DiffCodeCodebookLoss: vq_loss must be a scalar, got shape {tuple(vq_loss.shape)}.")
        l1 = torch.mean(torch.abs(recon - target))
        self.last_terms = {"l1": l1.detach(), "vq": vq_loss.detach().reshape(())}
        return self.l1_weight * l1 + self.vq_weight * vq_loss.reshape(())


class _TermLogger(nn.Module):
    """Writes ``last_terms`` into the trainer output after the loss (for ``StatsHandler`` / TensorBoard / tqdm)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_terms: dict[str, float] = {}

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._log_terms)

    def _log_terms(self, engine: Any) -> None:
        engine.state.output.update(self.last_terms)


class CodebookStageLoss(_TermLogger):
    """Stage-I objective ``l1_weight * L1(recon, HQ) + vq_weight * vq``, computed by
    :class:`~medir_monai.losses.DiffCodeCodebookLoss`.

    ``vq = ||sg[z] - z_q||^2 + beta ||z - sg[z_q]||^2`` is read from ``network.aux_loss`` (a
    :class:`CodebookReconstruction`, possibly inside DDP). Logged terms: ``l1``, ``vq``, ``codebook``, ``commitment``.
    Attach it to the trainer (``AttachHandler``) to log them.

    Args:
        network: the stage-I network the trainer runs.
        l1_weight, vq_weight: weights of the two terms (1 and 1 in the paper).
    """

    def __init__(self, network: nn.Module, l1_weight: float = 1.0, vq_weight: float = 1.0):
        super().__init__()
        self._network = [network]  # a list: not registered as a sub-module
        self.objective = DiffCodeCodebookLoss(l1_weight=l1_weight, vq_weight=vq_weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        net = unwrap(self._network[0])
        vq = getattr(net, "aux_loss", None)
        if not isinstance(vq, torch.Tensor):
            raise RuntimeError("CodebookStageLoss: the network must leave its quantiser loss on .aux_loss "
                               "(wrap the autoencoder in CodebookReconstruction)")
        loss = self.objective(pred, target, vq)
        terms = {k: float(v) for k, v in self.objective.last_terms.items()}
        terms.update({k: float(v) for k, v in getattr(net, "last_terms", {}).items()})
        self.last_terms = terms
        return loss


class LatentStageLoss(_TermLogger):
    """Stage-II objective ``L1(z_hat, z)`` on the latent (``pred`` is :meth:`LatentDiffusion.forward`'s dict or the
    estimate itself, ``target`` the stage-I latent of the HQ image). Logged term: ``latent_l1``."""

    def forward(self, pred: Mapping[str, torch.Tensor] | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z_hat = pred["z_hat"] if isinstance(pred, Mapping) else pred
        if z_hat.shape != target.shape:
            raise ValueError(f"LatentStageLoss: z_hat {tuple(z_hat.shape)} and target {tuple(target.shape)} differ")
        loss = F.l1_loss(z_hat, target)
        self.last_terms = {"latent_l1": float(loss.detach())}
        return loss


class DiffCodeLoss(_TermLogger):
    """Stage-III objective (the paper's Eq. 7): ``L1(restored, HQ)``, nothing else: the task classifier that
    gates the routing learns through the gating vector from this loss alone. Logged terms: ``l1`` and ``gate_max``
    (the batch mean of the largest entry of the gating vector ``V``: 1 / num_experts when the classifier has not
    learnt to choose, towards 1 when it routes decisively).
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self._network = [network]

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        l1 = torch.mean(torch.abs(pred - target))
        terms = {"l1": float(l1.detach())}
        gate = getattr(unwrap(self._network[0]), "last_gate", None)
        if isinstance(gate, torch.Tensor) and gate.ndim == 2:
            terms["gate_max"] = float(gate.max(dim=1).values.mean())
        self.last_terms = terms
        return l1
