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

The defaults give the published model (41,687,424 parameters at one input and one output channel).
Checkpoints written by the authors' code load through :meth:`TAT.convert_official_state_dict` (used by
:func:`medir_monai.networks.official.load_official_state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.convolutions import Convolution

from .blocks import (
    TRANSFORMER_BLOCK_KEY_RULES,
    ActivationCheckpointing,
    ChannelLayerNorm,
    CheckpointedBlock,
    Downsample,
    OverlapPatchEmbed,
    TransformerBlock,
    Upsample,
    channel_attention,
    gate,
    gated_halves,
    residual_add,
    crop_to_size,
    pad_to_multiple,
)
from .official import KeyRule, rename_state_dict
from .restormer import check_backbone_config

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


# ----------------------------------------------------------------------------------------------------------
# attention and the test-time local converter
# ----------------------------------------------------------------------------------------------------------
def local_window_starts(size: int, window: int) -> list[int]:
    """Start offsets of the overlapping windows covering ``size`` pixels along one axis.

    ``n = ceil(size / window)`` windows of length ``window`` (clipped to ``size``) with the stride
    ``ceil((size - window) / (n - 1))``; the last window is shifted back to end at ``size`` (the placement
    used by the authors' local converter).
    """
    if size < 1 or window < 1:
        raise ValueError(f"local_window_starts: size and window must be >= 1, got size={size}, window={window}.")
    window = min(size, window)
    count = (size - 1) // window + 1
    if count == 1:
        return [0]
    stride = math.ceil((size - window) / (count - 1) - 1e-8)
    starts: list[int] = []
    pos = 0
    while pos + window < size:
        starts.append(pos)
        pos += stride
    starts.append(size - window)
    return starts


def local_converter(
    qkv: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor], window: tuple[int, int] | None
) -> torch.Tensor:
    """Run ``attend`` on overlapping windows of ``qkv`` and average the results where windows overlap.

    Args:
        qkv: ``(B, 3C, H, W)``.
        attend: maps a ``(N, 3C, h, w)`` qkv map to its ``(N, C, h, w)`` attention output.
        window: ``(height, width)`` of the windows, or None for global attention.

    Returns:
        ``(B, C, H, W)``. With a single window (map no larger than ``window``) this is ``attend(qkv)``.
    """
    if window is None:
        return attend(qkv)
    b, _, h, w = qkv.shape
    win_h, win_w = min(h, window[0]), min(w, window[1])
    rows, cols = local_window_starts(h, win_h), local_window_starts(w, win_w)
    if len(rows) == 1 and len(cols) == 1:
        return attend(qkv)
    corners = [(i, j) for i in rows for j in cols]
    # all windows of all samples in one batch: (n * B, 3C, win_h, win_w)
    windows = torch.cat([qkv[:, :, i : i + win_h, j : j + win_w] for i, j in corners], dim=0)
    outs = attend(windows)
    outs = outs.reshape(len(corners), b, *outs.shape[1:])
    channels_last = not torch.jit.is_tracing() and qkv.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    total = torch.empty((b, outs.shape[2], h, w), dtype=qkv.dtype, device=qkv.device, memory_format=layout).zero_()
    count = qkv.new_zeros((1, 1, h, w))
    for n, (i, j) in enumerate(corners):
        total[:, :, i : i + win_h, j : j + win_w] += outs[n]
        count[:, :, i : i + win_h, j : j + win_w] += 1.0
    return total / count


def _window_at_level(train_size: tuple[int, int], ratio: float | None, level: int) -> tuple[int, int] | None:
    """Local-converter window of level ``level`` (0-based): ``int(ratio * train_size // 2**level)`` per axis."""
    if ratio is None:
        return None
    return (int(ratio * train_size[0] // 2**level), int(ratio * train_size[1] // 2**level))


# ----------------------------------------------------------------------------------------------------------
# static (encoder) block
# ----------------------------------------------------------------------------------------------------------
class LocalConverterTransformerBlock(TransformerBlock):
    """The shared Restormer block whose attention goes through the test-time local converter.

    Same parameters (and key names) as :class:`~medir_monai.networks.blocks.TransformerBlock`; only the
    forward differs when the map is larger than ``window``.

    Args:
        dim, num_heads, ffn_expansion_factor, bias, layer_norm_bias: as for ``TransformerBlock``.
        window: ``(height, width)`` of the local-converter windows, or None (always global attention).
        activation_checkpointing: as for ``TransformerBlock``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_expansion_factor: float,
        bias: bool,
        layer_norm_bias: bool = True,
        window: tuple[int, int] | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(dim, num_heads, ffn_expansion_factor, bias, layer_norm_bias, activation_checkpointing)
        self.window = window

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn  # ChannelAttention: qkv / qkv_dwconv / project_out convolutions and temperature
        out = local_converter(
            attn.mixed_qkv(x), lambda t: channel_attention(t, attn.num_heads, attn.temperature), self.window
        )
        return attn.project_out(out)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = residual_add(x, self._attention(self.norm1(x)))
        return residual_add(x, self.ffn(self.norm2(x)))


# ----------------------------------------------------------------------------------------------------------
# sample-adaptive (latent / decoder / refinement) block
# ----------------------------------------------------------------------------------------------------------
class SampleAdaptiveDepthwiseConv(nn.Module):
    """Depthwise ``k x k`` conv with one kernel per sample: ``W_b = W_shared + lambda * W_generated(b)``.

    TAT Sec. 2.2. The convolution itself is :func:`per_sample_depthwise_conv`. No bias (as in the authors'
    code).

    Args:
        channels: C.
        kernel_size: k (odd; "same" padding).
        init: ``"normal"`` (standard normal, the authors' init of the attention kernel) or ``"kaiming"``
            (Kaiming normal, fan-out, ReLU gain, the authors' init of the feed-forward kernel).

    Shapes: ``forward(x (B, C, H, W), generated (B, C, 1, k, k) or (B, C*k*k)) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, init: str = "normal") -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SampleAdaptiveDepthwiseConv: kernel_size must be odd and >= 1, got {kernel_size}.")
        self.channels = channels
        self.kernel_size = kernel_size
        # W_shared, (1, C, 1, k, k) so it broadcasts against the generated (B, C, 1, k, k)
        self.weight = nn.Parameter(torch.empty(1, channels, 1, kernel_size, kernel_size))
        self.lambda_dw = nn.Parameter(torch.zeros(1, channels, 1, 1, 1))
        if init == "normal":
            nn.init.normal_(self.weight)
        elif init == "kaiming":
            nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        else:
            raise ValueError(f"SampleAdaptiveDepthwiseConv: init must be 'normal' or 'kaiming', got {init!r}.")

    def kernel(self, generated: torch.Tensor, batch: int) -> torch.Tensor:
        """The per-sample kernels ``W_shared + lambda * W_generated``, ``(B, C, 1, k, k)``."""
        k = self.kernel_size
        return self.weight + self.lambda_dw * generated.reshape(batch, self.channels, 1, k, k)

    def forward(self, x: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        return per_sample_depthwise_conv(x, self.kernel(generated, x.shape[0]))


def per_sample_depthwise_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise "same" convolution of each sample of ``x`` (B, C, H, W) with its own ``kernel`` (B, C, 1, k, k).

    Channels-last inputs (and single samples) run one depthwise conv per sample (oneDNN's fast path, layout
    kept); NCHW batches run as one grouped convolution over ``B * C`` groups; traced graphs use shifted sums.
    """
    b, c, h, w = x.shape
    k = kernel.shape[-1]
    if torch.jit.is_tracing():
        return _depthwise_shift_and_add(x, kernel[:, :, 0])
    if b == 1 or x.is_contiguous(memory_format=torch.channels_last):
        # no reshape of x: a reshaped channels-last tensor gets strides that make conv2d fall back to NCHW
        per_sample = kernel.unbind(0)  # B x (C, 1, k, k)
        outs = [F.conv2d(x[i : i + 1], per_sample[i], padding=k // 2, groups=c) for i in range(b)]
        return outs[0] if b == 1 else torch.cat(outs)
    out = F.conv2d(x.reshape(1, b * c, h, w), kernel.reshape(b * c, 1, k, k), padding=k // 2, groups=b * c)
    return out.reshape(b, c, h, w)


def _depthwise_shift_and_add(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-sample depthwise "same" convolution as a sum of ``k*k`` shifted copies of ``x``.

    Same result as the grouped convolution (up to summation order), but the graph does not depend on
    the batch size, so a model traced with one batch size (``torch.jit.trace``) runs with any other.

    Args:
        x: ``(B, C, H, W)``.
        kernel: ``(B, C, k, k)``.
    """
    k = kernel.shape[-1]
    pad = k // 2
    padded = F.pad(x, (pad, pad, pad, pad))
    out = torch.zeros_like(x)
    for dy in range(k):
        for dx in range(k):
            # window of padded starting at (dy, dx) with the size of x; negative ends keep it size-agnostic
            end_y = dy - (k - 1) if dy < k - 1 else None
            end_x = dx - (k - 1) if dx < k - 1 else None
            out = out + kernel[:, :, dy, dx, None, None] * padded[:, :, dy:end_y, dx:end_x]
    return out


def _pointwise(in_channels: int, out_channels: int, bias: bool) -> Convolution:
    """1x1 conv as a MONAI ``Convolution`` (weights under ``.conv``, like the shared blocks)."""
    return Convolution(2, in_channels, out_channels, kernel_size=1, bias=bias, conv_only=True)


class AdaptiveChannelAttention(nn.Module):
    """MDTA (Restormer Eq. 1) whose qkv depthwise conv takes sample-specific kernels (TAT Sec. 2.2).

    Args:
        dim: channels C; the generated kernels cover the ``3C`` qkv channels.
        num_heads: attention heads (divide C).
        bias: bias of the 1x1 convs.
        window: local-converter window ``(height, width)`` or None.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool, window: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = _pointwise(dim, dim * 3, bias)
        self.dynamic_dwconv = SampleAdaptiveDepthwiseConv(dim * 3, init="normal")
        self.project_out = _pointwise(dim, dim, bias)

    def forward(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        qkv = self.dynamic_dwconv(self.qkv(x), kernel)  # (B, 3C, H, W)
        out = local_converter(qkv, lambda t: channel_attention(t, self.num_heads, self.temperature), self.window)
        return self.project_out(out)


class AdaptiveGatedFeedForward(nn.Module):
    """GDFN (Restormer Eq. 2) whose depthwise conv takes sample-specific kernels (TAT Sec. 2.2).

    ``project_out(GELU(x1) * x2)`` with ``(x1, x2) = dwconv(project_in(x))``; hidden width
    ``int(dim * ffn_expansion_factor)``, the generated kernels cover its ``2x``.
    """

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool) -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = _pointwise(dim, hidden * 2, bias)
        self.dynamic_dwconv = SampleAdaptiveDepthwiseConv(hidden * 2, init="kaiming")
        self.project_out = _pointwise(hidden, dim, bias)

    def forward(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        kernels = self.dynamic_dwconv.kernel(kernel, x.shape[0])  # (B, 2 * hidden, 1, k, k)
        x1, x2 = gated_halves(
            x, self.project_in.conv, lambda h, part: per_sample_depthwise_conv(h, kernels[:, part])
        )
        return self.project_out(gate(x1, x2))


class AdaptiveTransformerBlock(CheckpointedBlock):
    """Transformer block with sample-adaptive depthwise kernels: ``x + MDTA(LN(x))``, ``x + GDFN(LN(x))``.

    ``forward(x, attn_kernel, ffn_kernel)``: kernels ``(B, 3C, 1, 3, 3)`` and ``(B, 2*hidden, 1, 3, 3)``.
    ``activation_checkpointing`` as for :class:`~medir_monai.networks.blocks.TransformerBlock`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_expansion_factor: float,
        bias: bool,
        layer_norm_bias: bool = True,
        window: tuple[int, int] | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(activation_checkpointing)
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"AdaptiveTransformerBlock: num_heads={num_heads} must be >= 1 and divide dim={dim}.")
        self.norm1 = ChannelLayerNorm(dim, bias=layer_norm_bias)
        self.attn = AdaptiveChannelAttention(dim, num_heads, bias, window)
        self.norm2 = ChannelLayerNorm(dim, bias=layer_norm_bias)
        self.ffn = AdaptiveGatedFeedForward(dim, ffn_expansion_factor, bias)

    def _forward(  # type: ignore[override]
        self, x: torch.Tensor, attn_kernel: torch.Tensor, ffn_kernel: torch.Tensor
    ) -> torch.Tensor:
        x = residual_add(x, self.attn(self.norm1(x), attn_kernel))
        return residual_add(x, self.ffn(self.norm2(x), ffn_kernel))


class _AdaptiveStage(nn.ModuleList):
    """A sequence of :class:`AdaptiveTransformerBlock` sharing the same generated kernels."""

    def forward(self, x: torch.Tensor, attn_kernel: torch.Tensor, ffn_kernel: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x, attn_kernel, ffn_kernel)
        return x


# ----------------------------------------------------------------------------------------------------------
# TREN
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# TAT
# ----------------------------------------------------------------------------------------------------------
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
        channels_last: bool = True,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        _check_config(in_channels, out_channels, dim, num_blocks, heads, residual, tren_shuffle)
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
            return _window_at_level(train_hw, local_window_ratio, level)

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

        def adaptive_stage(level: int, width: int, depth: int, num_heads: int) -> _AdaptiveStage:
            return _AdaptiveStage(
                [
                    AdaptiveTransformerBlock(
                        width,
                        num_heads,
                        ffn_expansion_factor,
                        bias,
                        layer_norm_bias,
                        window(level),
                        activation_checkpointing,
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

        # fused tail over cat(enc1 (dim), dec1 (2 dim), refined (2 dim)) = 5 dim channels
        tail_in = widths[0] + 2 * widths[1]
        self.reduce_final = nn.Sequential(
            nn.Conv2d(tail_in, dim, kernel_size=3, padding=1, bias=bias),
            nn.GELU(),
            nn.Conv2d(dim, dim, kernel_size=1, bias=bias),
        )
        self.output = nn.Conv2d(dim, out_channels, kernel_size=3, padding=1, bias=bias)

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

        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(lat), enc3], dim=1))
        dec3 = self.decoder_level3(dec3, kernels["level3_attn"], kernels["level3_ffn"])
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], dim=1))
        dec2 = self.decoder_level2(dec2, kernels["level2_attn"], kernels["level2_ffn"])
        dec1 = torch.cat([self.up2_1(dec2), enc1], dim=1)
        dec1 = self.decoder_level1(dec1, kernels["level1_attn"], kernels["level1_ffn"])
        refined = self.refinement(dec1, kernels["level1_attn"], kernels["level1_ffn"])

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
