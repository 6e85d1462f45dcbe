"""Evaluator handler applying the bundle's consistency safeguards to validation predictions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from medir_monai.safeguard import RestorationSafeguard

from .metrics import _batch_task_names

__all__ = ["SafeguardHandler"]


class SafeguardHandler:
    """Apply :class:`~medir_monai.safeguard.RestorationSafeguard` to each validation prediction (model space).

    Runs when the forward pass completes, before the metrics, the images and the best-model choice read the
    prediction, so validation measures what ``medir restore`` writes. The batch needs a ``task_name`` entry.

    Args:
        settings: the bundle config's ``safeguard`` mapping (``None`` or empty: nothing is attached).
    """

    def __init__(self, settings: Mapping[str, Mapping[str, Any]] | None = None):
        self.guard = RestorationSafeguard(settings)

    def attach(self, engine: Any) -> None:
        if self.guard:
            engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        output = engine.state.output
        pred, lq = output[Keys.PRED], output[Keys.IMAGE]
        names = _batch_task_names(engine.state.batch, pred.shape[0])
        guarded = pred.detach().clone()
        for i, task in enumerate(names):  # (B, 1, H, W) model space
            guarded[i, 0] = self.guard(lq[i, 0].detach(), pred[i, 0].detach(), task, normalised=True)
        output[Keys.PRED] = guarded
