"""NAF blocks (NAFNet, Chen et al., ECCV 2022) and the NAF-block encoder / decoder of DiffCode.

DiffCode's implementation paragraph: "The encoders and decoders utilize [2, 2, 4, 4] NAF blocks, with channels
[64, 128, 256, 256] at each feature level." :class:`NAFEncoder` and :class:`NAFDecoder` are those encoders and
decoders: the stage-I VQ encoder and decoder, and the stage-II LQ condition encoder, are built from them, and the
stage-III backbone (:class:`~medir_monai.networks.diffcode.RoutedNAFNet`) uses the same levels with skips. A level
holds ``num_blocks[l]`` NAF blocks of ``channels[l]`` channels; between levels NAFNet's resampling (2x2 stride-2
conv down, 1x1 conv + pixel shuffle up); the last level is the latent one, so the latent grid is the image size
divided by ``2 ** (levels - 1)`` (8 with the paper's four levels: a 128x128 patch becomes 16x16 tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..blocks import ChannelLayerNorm

__all__ = ["SimpleGate", "NAFBlock", "NAFEncoder", "NAFDecoder", "NAF_LAYER_NORM_EPS", "naf_stage"]

#: NAFNet's layer-norm epsilon
NAF_LAYER_NORM_EPS = 1e-6


class SimpleGate(nn.Module):
    """NAFNet's gate: split the channels in two halves and multiply them (``[B, 2C, ...] -> [B, C, ...]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """Nonlinear-activation-free block (NAFNet, ECCV 2022, Sec. 3.3, Fig. 3c).

    ``y = x + beta * conv(SCA(SG(dwconv(conv(LN(x))))))`` then ``y + gamma * conv(SG(conv(LN(y))))`` with
    ``SG`` the :class:`SimpleGate`, ``SCA`` simplified channel attention ``u * conv1x1(avgpool(u))``, and
    ``beta``, ``gamma`` zero-initialised per-channel scales.

    Args:
        dim: channels.
        dw_expand: width factor of the spatial branch before the gate.
        ffn_expand: width factor of the channel branch before the gate.
    """

    def __init__(self, dim: int, dw_expand: int = 2, ffn_expand: int = 2) -> None:
        super().__init__()
        if dim < 1 or dw_expand < 1 or ffn_expand < 1:
            raise ValueError(
                f"NAFBlock: dim, dw_expand, ffn_expand must be >= 1, got {dim}, {dw_expand}, {ffn_expand}."
            )
        dw_ch, ffn_ch = dim * dw_expand, dim * ffn_expand
        self.norm1 = ChannelLayerNorm(dim, bias=True, eps=NAF_LAYER_NORM_EPS)
        self.conv1 = nn.Conv2d(dim, dw_ch, kernel_size=1)
        self.conv2 = nn.Conv2d(dw_ch, dw_ch, kernel_size=3, padding=1, groups=dw_ch)
        self.gate = SimpleGate()
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw_ch // 2, dw_ch // 2, kernel_size=1))
        self.conv3 = nn.Conv2d(dw_ch // 2, dim, kernel_size=1)
        self.norm2 = ChannelLayerNorm(dim, bias=True, eps=NAF_LAYER_NORM_EPS)
        self.conv4 = nn.Conv2d(dim, ffn_ch, kernel_size=1)
        self.conv5 = nn.Conv2d(ffn_ch // 2, dim, kernel_size=1)
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.gate(self.conv2(self.conv1(self.norm1(x))))
        y = x + self.beta * self.conv3(u * self.sca(u))
        return y + self.gamma * self.conv5(self.gate(self.conv4(self.norm2(y))))


def _check_levels(owner: str, channels: Sequence[int], num_blocks: Sequence[int]) -> None:
    if len(channels) < 1 or len(channels) != len(num_blocks):
        raise ValueError(
            f"{owner}: channels and num_blocks need one entry per level (at least one), got {channels}, {num_blocks}."
        )
    if any(c < 1 for c in channels) or any(n < 0 for n in num_blocks):
        raise ValueError(f"{owner}: channels must be >= 1 and num_blocks >= 0, got {channels}, {num_blocks}.")


def naf_stage(dim: int, blocks: int) -> nn.Sequential:
    """``blocks`` NAF blocks of ``dim`` channels in a row (one level of an encoder, decoder or U-Net)."""
    return nn.Sequential(*[NAFBlock(dim) for _ in range(blocks)])


class NAFEncoder(nn.Module):
    """Image -> latent tokens: 3x3 conv, then per level ``num_blocks[l]`` NAF blocks of ``channels[l]`` channels
    with a 2x2 stride-2 conv between levels, then a 1x1 conv to ``out_channels``.

    ``forward(x)``: ``[B, in_channels, H, W] -> [B, out_channels, H/f, W/f]`` with ``f =``
    :attr:`downsample_factor` ``= 2 ** (len(channels) - 1)``; H, W multiples of ``f``.

    Args:
        in_channels: image channels.
        out_channels: latent channels (the codebook's ``embedding_dim``).
        channels: widths per level, the last one the latent level (paper: 64, 128, 256, 256).
        num_blocks: NAF blocks per level (paper: 2, 2, 4, 4).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 256,
        channels: Sequence[int] = (64, 128, 256, 256),
        num_blocks: Sequence[int] = (2, 2, 4, 4),
    ) -> None:
        super().__init__()
        _check_levels("NAFEncoder", channels, num_blocks)
        self.channels, self.num_blocks = tuple(channels), tuple(num_blocks)
        self.downsample_factor = 2 ** (len(channels) - 1)
        self.intro = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.levels = nn.ModuleList([naf_stage(c, n) for c, n in zip(channels, num_blocks)])
        self.downs = nn.ModuleList(
            [nn.Conv2d(channels[i], channels[i + 1], kernel_size=2, stride=2) for i in range(len(channels) - 1)]
        )
        self.project = nn.Conv2d(channels[-1], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.intro(x)
        for i, level in enumerate(self.levels):
            feat = level(feat)
            if i < len(self.downs):
                feat = self.downs[i](feat)  # [B, C_{i+1}, H / 2**(i+1), W / 2**(i+1)]
        return self.project(feat)


class NAFDecoder(nn.Module):
    """Latent tokens -> image, the mirror of :class:`NAFEncoder`: 1x1 conv to the latent width, per level (latent
    first) its NAF blocks with a 1x1 conv + pixel shuffle (x2) between levels, then a 3x3 conv to ``out_channels``.

    ``forward(z)``: ``[B, in_channels, h, w] -> [B, out_channels, h*f, w*f]``, ``f = 2 ** (len(channels) - 1)``.

    Args:
        in_channels: latent channels.
        out_channels: image channels.
        channels, num_blocks: as the encoder's, listed from the image level to the latent level.
    """

    def __init__(
        self,
        in_channels: int = 256,
        out_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256, 256),
        num_blocks: Sequence[int] = (2, 2, 4, 4),
    ) -> None:
        super().__init__()
        _check_levels("NAFDecoder", channels, num_blocks)
        self.channels, self.num_blocks = tuple(channels), tuple(num_blocks)
        self.upsample_factor = 2 ** (len(channels) - 1)
        self.project = nn.Conv2d(in_channels, channels[-1], kernel_size=1)
        # levels[i] works at encoder level i; ups[i] goes from level i+1 to level i
        self.levels = nn.ModuleList([naf_stage(c, n) for c, n in zip(channels, num_blocks)])
        self.ups = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(channels[i + 1], channels[i] * 4, kernel_size=1, bias=False), nn.PixelShuffle(2))
                for i in range(len(channels) - 1)
            ]
        )
        self.ending = nn.Conv2d(channels[0], out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        feat = self.levels[-1](self.project(z))
        for i in reversed(range(len(self.ups))):
            feat = self.levels[i](self.ups[i](feat))  # [B, C_i, 2x, 2x]
        return self.ending(feat)
