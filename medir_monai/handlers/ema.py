"""Exponential moving average of the network weights (TAT validates and saves the EMA model).

The schedule follows the TAT authors' training (they use the ``ema_pytorch`` package with ``beta = 0.999``):
the first update copies the weights, and update ``n >= 2`` uses the warm-up decay
``d_n = min(beta, 1 - n ** (-power))`` with ``power = 2/3``, i.e. ``ema <- d_n * ema + (1 - d_n) * weights``.
Buffers are copied.
"""

from __future__ import annotations

import copy

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..wrappers import unwrap

__all__ = ["EMAModel", "EMAHandler"]


class EMAModel(nn.Module):
    """A frozen copy of ``network`` holding the moving average; call it like the network.

    Args:
        network: the trained network.
        decay: the final EMA factor ``beta`` (TAT: 0.999).
        power: warm-up exponent (``ema_pytorch`` default 2/3); ``0`` disables the warm-up (constant decay).
    """

    def __init__(self, network: nn.Module, decay: float = 0.999, power: float = 2.0 / 3.0):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(unwrap(network)).eval().requires_grad_(False)
        self.decay = float(decay)
        self.power = float(power)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self, n: int) -> float:
        """Decay used at update number ``n`` (1-based); the first update copies (decay 0)."""
        if n <= 1:
            return 0.0
        if self.power == 0:
            return self.decay
        return min(self.decay, 1.0 - n ** (-self.power))

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        self.num_updates += 1
        decay = self.current_decay(int(self.num_updates))
        for ema_p, p in zip(self.module.parameters(), network.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), network.buffers()):
            ema_b.copy_(b)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True):  # the average is only ever evaluated
        super().train(False)
        self.module.eval()
        return self


class EMAHandler:
    """Update an :class:`EMAModel` after every training iteration."""

    def __init__(self, ema: EMAModel, network: nn.Module):
        self.ema = ema
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.ema.update(unwrap(self.network))
