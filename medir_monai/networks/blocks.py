"""Restormer building blocks shared by :class:`Restormer`, :class:`AMIR` and :class:`TAT`.

Zamir et al., "Restormer: Efficient Transformer for High-Resolution Image Restoration", CVPR 2022
(https://arxiv.org/abs/2111.09881), section 3. The two inner blocks are MONAI's:
:class:`monai.networks.blocks.cablock.CABlock` is the multi-Dconv head transposed attention (MDTA, Sec. 3.1)
and :class:`monai.networks.blocks.cablock.FeedForward` the gated-Dconv feed-forward network (GDFN, Sec. 3.2).
They compute exactly what the authors' ``Attention`` / ``FeedForward`` compute (checked against the authors'
code with the fixtures in ``tests/test_restormer.py``); their convolutions are MONAI ``Convolution`` wrappers,
so each weight sits one level deeper (``attn.qkv.conv.weight`` for the authors'
``attn.qkv.weight``). The layer norm over channels is ours: MONAI's Restormer block normalises differently.

Official checkpoint key names differ from ours in two ways, both handled by :data:`TRANSFORMER_BLOCK_KEY_RULES`:

* ``<block>.norm{1,2}.body.{weight,bias}`` (authors) <-> ``<block>.norm{1,2}.{weight,bias}`` (ours);
* ``<block>.attn.{qkv,qkv_dwconv,project_out}.{weight,bias}`` and
  ``<block>.ffn.{project_in,dwconv,project_out}.{weight,bias}`` (authors) <-> the same with ``.conv.`` inserted.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.cablock import CABlock, FeedForward

from .official import KeyRule

__all__ = [
    "ChannelLayerNorm",
    "TransformerBlock",
    "OverlapPatchEmbed",
    "Downsample",
    "Upsample",
    "pad_to_multiple",
    "crop_to_size",
    "TRANSFORMER_BLOCK_KEY_RULES",
]

#: renamings between the authors' transformer-block keys and ours (see the module docstring)
TRANSFORMER_BLOCK_KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("{pre}norm{n}.body.{p}", "{pre}norm{n}.{p}", {"n": "[12]"}),
    KeyRule("{pre}attn.{conv}.{p}", "{pre}attn.{conv}.conv.{p}", {"conv": "qkv|qkv_dwconv|project_out"}),
    KeyRule("{pre}ffn.{conv}.{p}", "{pre}ffn.{conv}.conv.{p}", {"conv": "project_in|dwconv|project_out"}),
)


class ChannelLayerNorm(nn.Module):
    """Layer normalisation over the channel axis of a ``(B, C, H, W)`` tensor, at every pixel.

    ``bias=True`` is the authors' "WithBias" variant, ``(x - mean_c) / sqrt(var_c + eps) * weight + bias``.
    ``bias=False`` is their "BiasFree" variant, ``x / sqrt(var_c + eps) * weight``: the variance is still taken
    around the channel mean, but the mean is not subtracted from ``x``. Variances are biased (divide by C).

    Args:
        dim: number of channels C.
        bias: WithBias (True) or BiasFree (False).
        eps: added to the variance.
    """

    def __init__(self, dim: int, bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"ChannelLayerNorm: dim must be >= 1, got {dim}.")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            # channels to the last axis, fused layer norm, back: (B,C,H,W) -> (B,H,W,C) -> (B,C,H,W)
            y = F.layer_norm(x.permute(0, 2, 3, 1), (self.dim,), self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return x / torch.sqrt(var + self.eps) * self.weight.view(1, -1, 1, 1)


class TransformerBlock(nn.Module):
    """Restormer transformer block (Restormer Sec. 3): ``x + MDTA(LN(x))`` then ``x + GDFN(LN(x))``.

    Args:
        dim: channels.
        num_heads: attention heads of the MDTA (must divide ``dim``).
        ffn_expansion_factor: GDFN hidden width is ``int(dim * ffn_expansion_factor)``.
        bias: bias in the MDTA / GDFN convolutions.
        layer_norm_bias: WithBias (True, the published models) or BiasFree layer norm.
    """

    def __init__(
        self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layer_norm_bias: bool = True
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"TransformerBlock: num_heads={num_heads} must be >= 1 and divide dim={dim}.")
        self.norm1 = ChannelLayerNorm(dim, bias=layer_norm_bias)
        self.attn = CABlock(spatial_dims=2, dim=dim, num_heads=num_heads, bias=bias)
        self.norm2 = ChannelLayerNorm(dim, bias=layer_norm_bias)
        self.ffn = FeedForward(spatial_dims=2, dim=dim, ffn_expansion_factor=ffn_expansion_factor, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """Shallow feature extraction: one 3x3 convolution, stride 1 (Restormer Sec. 3, "overall pipeline")."""

    def __init__(self, in_c: int, embed_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, stride=1, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halve the resolution, double the channels: 3x3 conv to ``n_feat // 2`` then pixel-unshuffle by 2."""

    def __init__(self, n_feat: int) -> None:
        super().__init__()
        if n_feat % 2 != 0:
            raise ValueError(f"Downsample: n_feat must be even, got {n_feat}.")
        self.body = nn.Sequential(
            nn.Conv2d(n_feat, n_feat // 2, kernel_size=3, stride=1, padding=1, bias=False), nn.PixelUnshuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double the resolution, halve the channels: 3x3 conv to ``2 * n_feat`` then pixel-shuffle by 2."""

    def __init__(self, n_feat: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(n_feat, n_feat * 2, kernel_size=3, stride=1, padding=1, bias=False), nn.PixelShuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two axes of ``x`` at the bottom/right up to a multiple of ``multiple``.

    Reflect padding where the axis is long enough, replicate otherwise. Returns the padded tensor and the
    original ``(h, w)``, to be restored with :func:`crop_to_size`.
    """
    if multiple < 1:
        raise ValueError(f"pad_to_multiple: multiple must be >= 1, got {multiple}.")
    h, w = x.shape[-2], x.shape[-1]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if torch.jit.is_tracing():
        # no Python branches on sizes, so a traced graph pads any input size (needs sides >= multiple)
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect"), (h, w)
    if pad_h == 0 and pad_w == 0:
        return x, (h, w)
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), (h, w)


def crop_to_size(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: keep the top-left ``size = (h, w)`` of the last two axes."""
    return x[..., : size[0], : size[1]]
