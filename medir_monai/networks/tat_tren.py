"""TREN, TAT's task representation extraction network (TAT Sec. 2.2): from the (detached) latent input to one
generated depthwise kernel per block group."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn


class _ResidualConvBlock(nn.Module):
    """``x + Conv3x3(GELU(Conv3x3(x)))`` (convs with bias)."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=pad),
            nn.GELU(),
            nn.Conv2d(channels, channels, kernel_size, padding=pad),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class TaskRepresentationEncoder(nn.Module):
    """TREN, the task representation extraction network of TAT (Sec. 2.2), generating depthwise kernels.

    On the **detached** latent input ``(B, 8*dim, H/8, W/8)``: ``PixelShuffle(shuffle)`` to
    ``8*dim/shuffle**2`` channels, ``Conv3x3 -> GELU``, ``num_res_blocks`` residual conv blocks,
    ``Conv3x3 (F->F) -> GELU -> Conv3x3 (F->2F) -> GELU -> Conv3x3 (2F->4F) -> GELU`` (no bias), global average
    pool, ``2 x (Linear(4F->4F) -> GELU)`` and one ``Linear(4F -> C*k*k) -> GELU`` head per kernel group.
    The stop-gradient means the restoration loss trains TREN only through the generated kernels.

    Args:
        in_channels: channels of the latent input (before the pixel shuffle).
        kernel_channels: ``{group name: depthwise channels C}``, one head per entry.
        features: F (64 in the paper's code).
        num_res_blocks: residual blocks after the first conv (2).
        shuffle: pixel-shuffle factor (4); ``in_channels`` must be divisible by ``shuffle**2``.
        kernel_size: k of the generated depthwise kernels (3).

    ``forward(latent) -> {group name: (B, C, 1, k, k)}``.
    """

    def __init__(
        self,
        in_channels: int,
        kernel_channels: Mapping[str, int],
        features: int = 64,
        num_res_blocks: int = 2,
        shuffle: int = 4,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if in_channels % (shuffle**2) != 0:
            raise ValueError(
                f"TaskRepresentationEncoder: in_channels={in_channels} must be divisible by shuffle**2={shuffle**2}."
            )
        self.kernel_size = kernel_size
        self.shuffle = nn.PixelShuffle(shuffle)
        width = features * 4  # the representation's length
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels // shuffle**2, features, 3, padding=1),
            nn.GELU(),
            *[_ResidualConvBlock(features) for _ in range(num_res_blocks)],
            nn.Conv2d(features, features, 3, padding=1, bias=False),
            nn.GELU(),
            nn.Conv2d(features, features * 2, 3, padding=1, bias=False),
            nn.GELU(),
            nn.Conv2d(features * 2, width, 3, padding=1, bias=False),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.mlp = nn.Sequential(
            nn.Linear(width, width, bias=False), nn.GELU(), nn.Linear(width, width, bias=False), nn.GELU()
        )
        self.kernel_heads = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Linear(width, channels * kernel_size**2, bias=False), nn.GELU())
                for name, channels in kernel_channels.items()
            }
        )

    def representation(self, latent: torch.Tensor) -> torch.Tensor:
        """The task representation ``(B, 4F)`` (stop-gradient on ``latent``)."""
        feats = self.encoder(self.shuffle(latent.detach()))  # (B, 4F, 1, 1)
        return self.mlp(feats.flatten(1))

    def forward(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        rep = self.representation(latent)
        b, k = rep.shape[0], self.kernel_size
        return {name: head(rep).reshape(b, -1, 1, k, k) for name, head in self.kernel_heads.items()}
