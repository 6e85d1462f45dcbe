"""TAT: task-adaptive transformer for all-in-one medical image restoration (MICCAI 2025).

A Restormer-shaped U-net (dim 48, blocks [4, 6, 6, 8], refinement 4, heads [1, 2, 4, 8]) in which the
blocks of the latent stage, the decoder and the refinement use **sample-specific** depthwise 3x3 kernels
(TAT Sec. 2.2, "task-adaptive weight generation"):

``W_b = W_shared + lambda * W_generated(b)``  (``lambda`` one scalar per channel, zero-initialised)

in both the attention's qkv depthwise conv and the feed-forward network's depthwise conv. The generated
kernels come from the task representation extraction network (TREN) that looks at the (stop-gradient)
latent input; the encoder blocks stay static. A fused tail merges encoder level 1, decoder level 1 and the
refinement: ``Conv3x3(cat(enc1, dec1, refined)) -> GELU -> Conv1x1 -> Conv3x3 -> + input``.

Test-time local converter (from the authors' code): every attention layer was trained on 128x128 crops,
i.e. on ``128 / 2**level`` maps. When a map is larger than ``1.5x`` that size, the channel attention runs on
overlapping ``1.5x`` windows and the outputs are averaged where windows overlap (Chu et al., "Improving
image restoration by revisiting global information aggregation", ECCV 2022). Maps that fit in one window
(including the training size) get ordinary global attention. This is size-dependent, not mode-dependent,
exactly as in the authors' code; pass ``local_window_ratio=None`` to switch it off.

The defaults give the published model (41,687,424 parameters at one input and one output channel). The blocks
live beside this module: the local converter in :mod:`.tat_local`, the adaptive blocks in :mod:`.tat_adaptive`,
TREN in :mod:`.tat_tren`.
Checkpoints written by the authors' code load through :meth:`TAT.convert_official_state_dict` (used by
:func:`medir_monai.networks.official.load_official_state_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from .blocks import (
    TRANSFORMER_BLOCK_KEY_RULES,
    ActivationCheckpointing,
    Downsample,
    OverlapPatchEmbed,
    Upsample,
    channel_attention,
    crop_to_size,
    pad_to_multiple,
    pointwise,
)
from .official import KeyRule, rename_state_dict
from .restormer import check_backbone_config
from .tat_adaptive import (
    AdaptiveStage,
    AdaptiveTransformerBlock,
    SampleAdaptiveDepthwiseConv,
    depthwise_inits,
    per_sample_depthwise_conv,
)
from .tat_local import LocalConverterTransformerBlock, local_converter, local_window_starts, window_at_level
from .tat_tren import TaskRepresentationEncoder

__all__ = [
    "TAT",
    "TaskRepresentationEncoder",
    "SampleAdaptiveDepthwiseConv",
    "per_sample_depthwise_conv",
    "AdaptiveTransformerBlock",
    "LocalConverterTransformerBlock",
    "channel_attention",
    "local_converter",
    "local_window_starts",
    "TAT_KEY_RULES",
]

#: encoder-decoder levels of the U-shaped body; each level below the first halves the resolution
NUM_LEVELS = 4
#: names of the four groups of generated kernels; "level1" serves decoder level 1 and the refinement
KERNEL_GROUPS: tuple[str, ...] = ("level1", "level2", "level3", "latent")
#: the two depthwise convs of an adaptive block that receive generated kernels
KERNEL_TARGETS: tuple[str, ...] = ("attn", "ffn")
#: output heads: "fused" is the published tail, "conv" Restormer's single output conv
TAILS: tuple[str, ...] = ("fused", "conv")

#: official (authors') key names -> ours, TAT-specific part; applied before the shared block rules
TAT_KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("{pre}attn.dw_kernel", "{pre}attn.dynamic_dwconv.weight"),
    KeyRule("{pre}attn.lambda_dw", "{pre}attn.dynamic_dwconv.lambda_dw"),
    KeyRule("{pre}ffn.dw_kernel", "{pre}ffn.dynamic_dwconv.weight"),
    KeyRule("{pre}ffn.lambda_dw", "{pre}ffn.dynamic_dwconv.lambda_dw"),
    KeyRule("{pre}tren.E.{rest}", "{pre}tren.encoder.{rest}", {"rest": r"\d+\..+"}),
    KeyRule(
        "{pre}tren.kernel_{group}.{i}.{p}",
        "{pre}tren.kernel_heads.{group}.{i}.{p}",
        {"group": "(?:" + "|".join(KERNEL_GROUPS) + ")_(?:" + "|".join(KERNEL_TARGETS) + ")"},
    ),
)



class TAT(ActivationCheckpointing, nn.Module):
    """Task-adaptive transformer (TAT, MICCAI 2025, Sec. 2 and Fig. 2) for 2-D images.

    Level ``l`` (1..4) has ``dim * 2**(l-1)`` channels; decoder level 1 and the refinement work on
    ``2 * dim`` channels after the skip concatenation and share the level-1 generated kernels. Encoder
    blocks are static (:class:`LocalConverterTransformerBlock`); latent, decoder and refinement blocks are
    :class:`AdaptiveTransformerBlock` fed by :class:`TaskRepresentationEncoder` (TREN).

    ``forward(x) -> restored`` in training and evaluation alike. Inputs whose height or width is not a
    multiple of 8 are padded (bottom/right) and the output is cropped back.

    Args:
        in_channels: input image channels.
        out_channels: output image channels (must equal ``in_channels`` when ``residual``).
        dim: channels of level 1 (even).
        num_blocks: transformer blocks at levels 1..4 (encoder and decoder of a level use the same count).
        num_refinement_blocks: adaptive blocks after decoder level 1.
        heads: attention heads at levels 1..4 (decoder level 1 and refinement use ``heads[0]``).
        ffn_expansion_factor: GDFN hidden width factor.
        bias: bias in the transformer-block 1x1 convs, channel reductions, fused tail and output conv (never
            in the patch embedding, resampling convs or adaptive depthwise convs, as in the authors' code).
        layer_norm_bias: WithBias (True, published) or BiasFree layer norm.
        train_size: training patch size (int or ``(h, w)``); the local converter's reference at level 1.
        local_window_ratio: local-converter window relative to the training size at each level (1.5), or
            None to always use global attention.
        tren_features: TREN width F (64).
        tren_res_blocks: TREN residual blocks (2).
        tren_shuffle: TREN pixel-shuffle factor (4); ``8 * dim`` must be divisible by its square.
        residual: add the input to the output (the published model does).
        depthwise_init: init of the shared depthwise kernels of the adaptive blocks: ``"authors"`` (standard
            normal in the attention, Kaiming fan-out in the feed-forward, as in the authors' code) or
            ``"uniform"`` (``nn.Conv2d``'s default, the scale Restormer's depthwise kernels start from).
        tail: ``"fused"`` (published: conv3x3 + GELU + conv1x1 over ``cat(enc1, dec1, refined)``, then the
            output conv) or ``"conv"`` (Restormer's output: one conv3x3 on the refinement's ``2 * dim``
            channels).
        channels_last, activation_checkpointing: see :class:`~medir_monai.networks.restormer.Restormer` (the
            TREN is not checkpointed).
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
        train_size: int | Sequence[int] = 128,
        local_window_ratio: float | None = 1.5,
        tren_features: int = 64,
        tren_res_blocks: int = 2,
        tren_shuffle: int = 4,
        residual: bool = True,
        depthwise_init: str = "authors",
        tail: str = "fused",
        channels_last: bool = True,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        _check_config(in_channels, out_channels, dim, num_blocks, heads, residual, tren_shuffle)
        if tail not in TAILS:
            raise ValueError(f"TAT: tail must be one of {list(TAILS)}, got {tail!r}.")
        depthwise_inits(depthwise_init, "TAT")  # checked here so the error names the model, not a block
        train_hw = _pair(train_size, "train_size")
        if local_window_ratio is not None and local_window_ratio <= 0:
            raise ValueError(f"TAT: local_window_ratio must be > 0 or None, got {local_window_ratio}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.residual = residual
        self.train_size = train_hw
        self.local_window_ratio = local_window_ratio
        self.channels_last = channels_last
        widths = [dim * 2**level for level in range(NUM_LEVELS)]  # channels of levels 1..4

        def window(level: int) -> tuple[int, int] | None:
            return window_at_level(train_hw, local_window_ratio, level)

        def static_stage(level: int, depth: int) -> nn.Sequential:
            return nn.Sequential(
                *[
                    LocalConverterTransformerBlock(
                        widths[level],
                        heads[level],
                        ffn_expansion_factor,
                        bias,
                        layer_norm_bias,
                        window(level),
                        activation_checkpointing,
                    )
                    for _ in range(depth)
                ]
            )

        def adaptive_stage(level: int, width: int, depth: int, num_heads: int) -> AdaptiveStage:
            return AdaptiveStage(
                [
                    AdaptiveTransformerBlock(
                        width,
                        num_heads,
                        ffn_expansion_factor,
                        bias,
                        layer_norm_bias,
                        window(level),
                        activation_checkpointing,
                        depthwise_init,
                    )
                    for _ in range(depth)
                ]
            )

        self.patch_embed = OverlapPatchEmbed(in_channels, dim, bias=False)
        self.encoder_level1 = static_stage(0, num_blocks[0])
        self.down1_2 = Downsample(widths[0])
        self.encoder_level2 = static_stage(1, num_blocks[1])
        self.down2_3 = Downsample(widths[1])
        self.encoder_level3 = static_stage(2, num_blocks[2])
        self.down3_4 = Downsample(widths[2])
        self.latent = adaptive_stage(3, widths[3], num_blocks[3], heads[3])

        self.up4_3 = Upsample(widths[3])
        self.reduce_chan_level3 = nn.Conv2d(widths[3], widths[2], kernel_size=1, bias=bias)
        self.decoder_level3 = adaptive_stage(2, widths[2], num_blocks[2], heads[2])
        self.up3_2 = Upsample(widths[2])
        self.reduce_chan_level2 = nn.Conv2d(widths[2], widths[1], kernel_size=1, bias=bias)
        self.decoder_level2 = adaptive_stage(1, widths[1], num_blocks[1], heads[1])
        self.up2_1 = Upsample(widths[1])  # to dim channels; the skip concat brings it back to 2 * dim
        self.decoder_level1 = adaptive_stage(0, widths[1], num_blocks[0], heads[0])
        self.refinement = adaptive_stage(0, widths[1], num_refinement_blocks, heads[0])

        self.tail = tail
        if tail == "fused":
            # fused tail over cat(enc1 (dim), dec1 (2 dim), refined (2 dim)) = 5 dim channels
            tail_in = widths[0] + 2 * widths[1]
            self.reduce_final = nn.Sequential(
                nn.Conv2d(tail_in, dim, kernel_size=3, padding=1, bias=bias),
                nn.GELU(),
                nn.Conv2d(dim, dim, kernel_size=1, bias=bias),
            )
            self.output = nn.Conv2d(dim, out_channels, kernel_size=3, padding=1, bias=bias)
        else:
            self.output = nn.Conv2d(widths[1], out_channels, kernel_size=3, padding=1, bias=bias)

        # depthwise channels per kernel group: level 1 (decoder + refinement) runs at 2 * dim like level 2
        group_width = {"level1": widths[1], "level2": widths[1], "level3": widths[2], "latent": widths[3]}
        kernel_channels: dict[str, int] = {}
        for group, width in group_width.items():
            kernel_channels[f"{group}_attn"] = 3 * width
            kernel_channels[f"{group}_ffn"] = 2 * int(width * ffn_expansion_factor)
        self.tren = TaskRepresentationEncoder(
            widths[3], kernel_channels, features=tren_features, num_res_blocks=tren_res_blocks, shuffle=tren_shuffle
        )

    def _restore(self, x: torch.Tensor) -> torch.Tensor:
        """The U-shaped body on a padded input; returns the output conv's result (no global residual)."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        enc1 = self.encoder_level1(self.patch_embed(x).contiguous(memory_format=layout))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        lat_in = self.down3_4(enc3)

        kernels = self.tren(lat_in)  # TREN detaches lat_in itself
        lat = self.latent(lat_in, kernels["latent_attn"], kernels["latent_ffn"])

        dec3 = pointwise(self.reduce_chan_level3, torch.cat([self.up4_3(lat), enc3], dim=1))
        dec3 = self.decoder_level3(dec3, kernels["level3_attn"], kernels["level3_ffn"])
        dec2 = pointwise(self.reduce_chan_level2, torch.cat([self.up3_2(dec3), enc2], dim=1))
        dec2 = self.decoder_level2(dec2, kernels["level2_attn"], kernels["level2_ffn"])
        dec1 = torch.cat([self.up2_1(dec2), enc1], dim=1)
        dec1 = self.decoder_level1(dec1, kernels["level1_attn"], kernels["level1_ffn"])
        refined = self.refinement(dec1, kernels["level1_attn"], kernels["level1_ffn"])

        if self.tail == "conv":
            return self.output(refined)
        return self.output(self.reduce_final(torch.cat([enc1, dec1, refined], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore ``x`` of shape (B, in_channels, H, W); returns (B, out_channels, H, W)."""
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != self.in_channels):
            raise ValueError(f"TAT.forward: expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}.")
        padded, size = pad_to_multiple(x, self.size_multiple)
        out = crop_to_size(self._restore(padded), size).contiguous()  # NCHW out, whatever the body's layout
        return out + x if self.residual else out

    # -- official checkpoints ---------------------------------------------------------------------------
    @staticmethod
    def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Authors' key names -> ours (idempotent: our own keys pass through unchanged).

        ``<blk>.attn.dw_kernel`` / ``lambda_dw`` -> ``<blk>.attn.dynamic_dwconv.weight`` / ``lambda_dw`` (same for
        ``ffn``), ``tren.E.*`` -> ``tren.encoder.*``, ``tren.kernel_<group>.*`` -> ``tren.kernel_heads.<group>.*``,
        then the shared block rules (``norm1.body.weight`` -> ``norm1.weight``, ``attn.qkv.weight`` ->
        ``attn.qkv.conv.weight``, ...).
        """
        return rename_state_dict(state_dict, TAT_KEY_RULES + TRANSFORMER_BLOCK_KEY_RULES)

    def to_official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's state dict under the authors' key names."""
        return rename_state_dict(self.state_dict(), TAT_KEY_RULES + TRANSFORMER_BLOCK_KEY_RULES, reverse=True)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"TAT: {name} must be a positive int or a pair of positive ints, got {value!r}.")
    return pair  # type: ignore[return-value]


def _check_config(
    in_channels: int,
    out_channels: int,
    dim: int,
    num_blocks: Sequence[int],
    heads: Sequence[int],
    residual: bool,
    tren_shuffle: int,
) -> None:
    """Clear errors for configurations TAT cannot build: the Restormer body's rules plus TREN's."""
    check_backbone_config("TAT", in_channels, out_channels, dim, num_blocks, heads, residual)
    if tren_shuffle < 1 or (8 * dim) % (tren_shuffle**2) != 0:
        raise ValueError(
            f"TAT: tren_shuffle={tren_shuffle}: the latent's 8 * dim = {8 * dim} channels must be divisible by "
            f"tren_shuffle**2."
        )
