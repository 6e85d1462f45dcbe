"""Restormer (Zamir et al., CVPR 2022, https://arxiv.org/abs/2111.09881), the baseline of AMIR and TAT.

The defaults give the published model at one input channel (26,124,052 parameters). Module names are the
authors' (``patch_embed``, ``encoder_level1``, ``down1_2``, ..., ``latent``, ``up4_3``, ``reduce_chan_level3``,
``decoder_level3``, ..., ``refinement``, ``output``), so an official checkpoint loads through
:meth:`Restormer.convert_official_state_dict` (see :mod:`medir_monai.networks.official`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .blocks import (
    TRANSFORMER_BLOCK_KEY_RULES,
    ActivationCheckpointing,
    Downsample,
    OverlapPatchEmbed,
    TransformerBlock,
    Upsample,
    crop_to_size,
    pad_to_multiple,
    pointwise,
)
from .official import rename_state_dict

__all__ = ["Restormer"]

#: encoder-decoder levels of the U-shaped body; each level below the first halves the resolution
NUM_LEVELS = 4


class Restormer(ActivationCheckpointing, nn.Module):
    """Restormer image-restoration network for 2-D images (Restormer Sec. 3, Fig. 2).

    Four-level encoder-decoder of :class:`~medir_monai.networks.blocks.TransformerBlock` stages; level ``l``
    has ``dim * 2**(l-1)`` channels (the level-1 decoder and refinement work on ``2 * dim`` channels after the
    skip concatenation) and the output is added to the input (global residual).

    Inputs whose height or width is not a multiple of 8 (three 2x down-samplings) are reflect-padded at the
    bottom/right and the output is cropped back to the input size.

    Args:
        in_channels: input image channels.
        out_channels: output image channels (must equal ``in_channels`` when ``residual``).
        dim: channels of level 1.
        num_blocks: transformer blocks at levels 1..4 (encoder and decoder of a level use the same count).
        num_refinement_blocks: transformer blocks after the decoder.
        heads: attention heads at levels 1..4 (the refinement uses ``heads[0]``).
        ffn_expansion_factor: GDFN width factor.
        bias: bias in the transformer-block convolutions, the channel reductions and the output conv. As in
            the authors' code, the patch embedding and the resampling convs never have a bias.
        layer_norm_bias: WithBias (True, published) or BiasFree layer norm.
        residual: add the input to the output (the published model does).
        channels_last: run the features in channels-last memory format (same maths; 1.5-2x faster on CPU,
            see :mod:`medir_monai.networks.blocks`). Inputs and outputs can have any layout.
        activation_checkpointing: recompute every transformer block's activations in the backward pass
            instead of storing them (about 4x less training memory for about 1.3x the step time; results
            unchanged). Off by default.
    """

    #: height and width of the body's input must be multiples of this (2 ** number of down-samplings)
    size_multiple: int = 2 ** (NUM_LEVELS - 1)

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        layer_norm_bias: bool = True,
        residual: bool = True,
        channels_last: bool = True,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_backbone_config(type(self).__name__, in_channels, out_channels, dim, num_blocks, heads, residual)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.residual = residual
        self.channels_last = channels_last
        widths = [dim * 2**level for level in range(NUM_LEVELS)]  # channels of levels 1..4

        def stage(width: int, depth: int, num_heads: int) -> nn.Sequential:
            return nn.Sequential(
                *[
                    TransformerBlock(
                        width, num_heads, ffn_expansion_factor, bias, layer_norm_bias, activation_checkpointing
                    )
                    for _ in range(depth)
                ]
            )

        self.patch_embed = OverlapPatchEmbed(in_channels, dim, bias=False)
        self.encoder_level1 = stage(widths[0], num_blocks[0], heads[0])
        self.down1_2 = Downsample(widths[0])
        self.encoder_level2 = stage(widths[1], num_blocks[1], heads[1])
        self.down2_3 = Downsample(widths[1])
        self.encoder_level3 = stage(widths[2], num_blocks[2], heads[2])
        self.down3_4 = Downsample(widths[2])
        self.latent = stage(widths[3], num_blocks[3], heads[3])

        self.up4_3 = Upsample(widths[3])
        self.reduce_chan_level3 = nn.Conv2d(widths[3], widths[2], kernel_size=1, bias=bias)
        self.decoder_level3 = stage(widths[2], num_blocks[2], heads[2])
        self.up3_2 = Upsample(widths[2])
        self.reduce_chan_level2 = nn.Conv2d(widths[2], widths[1], kernel_size=1, bias=bias)
        self.decoder_level2 = stage(widths[1], num_blocks[1], heads[1])
        self.up2_1 = Upsample(widths[1])  # to dim channels; the skip concat brings it back to 2 * dim
        self.decoder_level1 = stage(widths[1], num_blocks[0], heads[0])

        self.refinement = stage(widths[1], num_refinement_blocks, heads[0])
        self.output = nn.Conv2d(widths[1], out_channels, kernel_size=3, stride=1, padding=1, bias=bias)

    # -- hooks for networks that modulate the features (AMIR); identity here -------------------------------
    def _route_encoder(self, level: int, x: torch.Tensor, context: Any) -> torch.Tensor:
        """Called on the input of encoder level ``level`` (1..3)."""
        return x

    def _route_decoder(self, level: int, x: torch.Tensor, context: Any) -> torch.Tensor:
        """Called on the input of the latent stage (``level`` 4) and of decoder levels 3..1."""
        return x

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Shallow features of the padded input, in the body's memory format."""
        feat = self.patch_embed(x)  # its layout would follow the 1-channel input's ambiguous strides
        return feat.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _restore(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
        """The U-shaped body on a padded input; returns the output conv's result (no global residual)."""
        enc1 = self.encoder_level1(self._route_encoder(1, self._embed(x), context))
        enc2 = self.encoder_level2(self._route_encoder(2, self.down1_2(enc1), context))
        enc3 = self.encoder_level3(self._route_encoder(3, self.down2_3(enc2), context))
        lat = self.latent(self._route_decoder(4, self.down3_4(enc3), context))

        dec3 = pointwise(self.reduce_chan_level3, torch.cat([self.up4_3(lat), enc3], dim=1))
        dec3 = self.decoder_level3(self._route_decoder(3, dec3, context))
        dec2 = pointwise(self.reduce_chan_level2, torch.cat([self.up3_2(dec3), enc2], dim=1))
        dec2 = self.decoder_level2(self._route_decoder(2, dec2, context))
        dec1 = torch.cat([self.up2_1(dec2), enc1], dim=1)
        dec1 = self.decoder_level1(self._route_decoder(1, dec1, context))
        return self.output(self.refinement(dec1))

    def _check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing():  # shapes are constants of a traced graph
            return
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}.forward: expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}."
            )

    def _finish(self, body_out: torch.Tensor, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out = crop_to_size(body_out, size).contiguous()  # NCHW out, whatever the body's layout
        return out + x if self.residual else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore ``x`` of shape (B, in_channels, H, W); returns (B, out_channels, H, W)."""
        self._check_input(x)
        padded, size = pad_to_multiple(x, self.size_multiple)
        return self._finish(self._restore(padded), x, size)

    # -- official checkpoints ---------------------------------------------------------------------------
    @staticmethod
    def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Authors' key names -> ours (idempotent; see :mod:`medir_monai.networks.blocks`)."""
        return rename_state_dict(state_dict, TRANSFORMER_BLOCK_KEY_RULES)

    def to_official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's state dict under the authors' key names."""
        return rename_state_dict(self.state_dict(), TRANSFORMER_BLOCK_KEY_RULES, reverse=True)


def check_backbone_config(
    owner: str,
    in_channels: int,
    out_channels: int,
    dim: int,
    num_blocks: Sequence[int],
    heads: Sequence[int],
    residual: bool,
) -> None:
    """Clear errors for configurations the U-shaped body cannot build."""
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"{owner}: in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}.")
    if residual and in_channels != out_channels:
        raise ValueError(
            f"{owner}: the global residual needs in_channels == out_channels (got {in_channels}, {out_channels}); "
            "pass residual=False otherwise."
        )
    if dim < 2 or dim % 2 != 0:
        raise ValueError(f"{owner}: dim must be even and >= 2 (pixel-unshuffle halves it), got {dim}.")
    if len(num_blocks) != NUM_LEVELS or len(heads) != NUM_LEVELS:
        raise ValueError(
            f"{owner}: num_blocks and heads need {NUM_LEVELS} entries (levels 1..4), got {list(num_blocks)}, "
            f"{list(heads)}."
        )
    for level, (n_heads, depth) in enumerate(zip(heads, num_blocks)):
        width = dim * 2**level
        if n_heads < 1 or width % n_heads != 0:
            raise ValueError(f"{owner}: heads[{level}]={n_heads} must divide the level's {width} channels.")
        if depth < 0:
            raise ValueError(f"{owner}: num_blocks[{level}] must be >= 0, got {depth}.")
    # the level-1 decoder and refinement run on 2 * dim channels with heads[0] heads
    if (2 * dim) % heads[0] != 0:
        raise ValueError(f"{owner}: heads[0]={heads[0]} must divide 2 * dim = {2 * dim}.")
