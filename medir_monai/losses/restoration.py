"""The papers' training losses behind the ``loss_function(pred, label)`` interface of MONAI's ``SupervisedTrainer``.

The models keep one forward contract (``forward(x) -> restored``), so the stock MONAI engines run them; what
differs per paper is only the loss, which :class:`RestorationLoss` provides:

* Restormer: ``L1(restored, HQ)``;
* AMIR: ``L1 + aux_weight * balance`` where ``balance`` is the summed MoE balance loss that AMIR leaves on
  ``network.aux_loss`` after each forward (AMIR paper Sec. 2.3; ``aux_weight = 0.001`` in the authors' code);
* TAT: the sample-adaptive loss balancing of :class:`medir_monai.losses.TATLossBalancing`, which needs the
  LQ input too. The trainer passes only ``(pred, label)`` to a loss, so the loss attaches itself to the trainer
  as a handler and picks the LQ batch up at ``FORWARD_COMPLETED``.

The individual loss terms are written into ``engine.state.output`` (``l1``, ``balance``, ``sigma``) so that
``StatsHandler`` / ``TensorBoardStatsHandler`` log them.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn

from ..wrappers import unwrap

__all__ = ["RestorationLoss"]


class RestorationLoss(nn.Module):
    """The papers' training losses behind the ``loss_function(pred, label)`` interface of MONAI's trainer.

    Args:
        network: the trained network (only read for auxiliary losses such as AMIR's ``aux_loss``).
        aux_weight: weight of ``network.aux_loss`` (AMIR: 0.001). 0 disables it.
        balancer: optional :class:`medir_monai.losses.TATLossBalancing` (or another module called as
            ``balancer(restored, target, lq)``) replacing the plain L1 term (TAT).

    Attach it to the trainer (list it in ``train_handlers``) so it can see the LQ batch and log its terms.
    """

    def __init__(self, network: nn.Module | None = None, aux_weight: float = 0.0, balancer: nn.Module | None = None):
        super().__init__()
        self._network = [network]  # a list, so the network is not registered as a sub-module twice
        self.aux_weight = float(aux_weight)
        self.balancer = balancer
        self._lq: torch.Tensor | None = None
        self.last_terms: dict[str, float] = {}

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._grab_input)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._log_terms)

    def _grab_input(self, engine: Any) -> None:
        self._lq = engine.state.output[Keys.IMAGE]

    def _log_terms(self, engine: Any) -> None:
        engine.state.output.update(self.last_terms)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        l1 = torch.mean(torch.abs(pred - target))
        terms = {"l1": l1.detach()}
        if self.balancer is not None:
            if self._lq is None:
                raise RuntimeError("RestorationLoss with a balancer must be attached to the trainer (train_handlers)")
            loss = self.balancer(pred, target, self._lq)
            sigma = getattr(self.balancer, "last_sigma", None)
            if sigma is not None:
                terms["sigma"] = sigma.detach().mean()
        else:
            loss = l1
        network = self._network[0]
        aux = getattr(unwrap(network), "aux_loss", None) if network is not None else None
        if self.aux_weight and aux is not None:
            loss = loss + self.aux_weight * aux
            terms["balance"] = aux.detach()
        self.last_terms = {k: float(v) for k, v in terms.items()}
        return loss
