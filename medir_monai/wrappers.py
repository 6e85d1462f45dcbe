"""The bare model inside the wrappers that training puts around it.

DDP and DataParallel keep the model under ``.module``, ``torch.compile`` under ``._orig_mod``; checkpoints, EMA
copies, forward hooks and the auxiliary losses need the model itself (its own state-dict keys, its attributes
such as AMIR's ``aux_loss``).
"""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap"]


def unwrap(network: nn.Module) -> nn.Module:
    """The bare model inside any nesting of DDP / DataParallel / ``torch.compile`` wrappers (itself if none)."""
    while True:
        inner = getattr(network, "module", None)
        if isinstance(inner, nn.Module):
            network = inner
        elif isinstance(getattr(network, "_orig_mod", None), nn.Module):
            network = network._orig_mod
        else:
            return network
