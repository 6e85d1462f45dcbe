"""TAT's task-adaptive blocks (TAT Sec. 2.2): depthwise convolutions whose kernels are ``W_shared + lambda *
W_generated(b)`` per sample, in the channel attention's qkv and in the gated feed-forward network."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.convolutions import Convolution

from .blocks import (
    ChannelLayerNorm,
    CheckpointedBlock,
    channel_attention,
    gate,
    gated_halves,
    pointwise,
    residual_add,
)
from .tat_local import local_converter


#: ``depthwise_init`` of an adaptive block -> inits of its (attention, feed-forward) shared depthwise kernels
DEPTHWISE_INITS: dict[str, tuple[str, str]] = {"authors": ("normal", "kaiming"), "uniform": ("uniform", "uniform")}


def depthwise_inits(depthwise_init: str, owner: str) -> tuple[str, str]:
    """The (attention, feed-forward) inits of ``depthwise_init``; a ValueError naming ``owner`` for an unknown one."""
    if depthwise_init not in DEPTHWISE_INITS:
        raise ValueError(f"{owner}: depthwise_init must be one of {list(DEPTHWISE_INITS)}, got {depthwise_init!r}.")
    return DEPTHWISE_INITS[depthwise_init]


class SampleAdaptiveDepthwiseConv(nn.Module):
    """Depthwise ``k x k`` conv with one kernel per sample: ``W_b = W_shared + lambda * W_generated(b)``.

    TAT Sec. 2.2. The convolution itself is :func:`per_sample_depthwise_conv`. No bias (as in the authors'
    code).

    Args:
        channels: C.
        kernel_size: k (odd; "same" padding).
        init: ``"normal"`` (standard normal, the authors' init of the attention kernel), ``"kaiming"``
            (Kaiming normal, fan-out, ReLU gain, the authors' init of the feed-forward kernel) or ``"uniform"``
            (uniform in ``+-1/k``, what ``nn.Conv2d`` draws for a depthwise ``k x k`` kernel, as in Restormer).

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
        elif init == "uniform":
            # nn.Conv2d's default (Kaiming uniform, a = sqrt(5)) for fan-in k * k: bound 1 / k
            nn.init.uniform_(self.weight, -1.0 / kernel_size, 1.0 / kernel_size)
        else:
            raise ValueError(
                f"SampleAdaptiveDepthwiseConv: init must be 'normal', 'kaiming' or 'uniform', got {init!r}."
            )

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
        depthwise_init: init of the shared qkv depthwise kernel (``"normal"`` in the authors' code; see
            :class:`SampleAdaptiveDepthwiseConv`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bias: bool,
        window: tuple[int, int] | None = None,
        depthwise_init: str = "normal",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = _pointwise(dim, dim * 3, bias)
        self.dynamic_dwconv = SampleAdaptiveDepthwiseConv(dim * 3, init=depthwise_init)
        self.project_out = _pointwise(dim, dim, bias)

    def forward(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        qkv = self.dynamic_dwconv(pointwise(self.qkv, x), kernel)  # (B, 3C, H, W)
        out = local_converter(qkv, lambda t: channel_attention(t, self.num_heads, self.temperature), self.window)
        return pointwise(self.project_out, out)


class AdaptiveGatedFeedForward(nn.Module):
    """GDFN (Restormer Eq. 2) whose depthwise conv takes sample-specific kernels (TAT Sec. 2.2).

    ``project_out(GELU(x1) * x2)`` with ``(x1, x2) = dwconv(project_in(x))``; hidden width
    ``int(dim * ffn_expansion_factor)``, the generated kernels cover its ``2x``; ``depthwise_init`` initialises
    the shared depthwise kernel (``"kaiming"`` in the authors' code; see :class:`SampleAdaptiveDepthwiseConv`).
    """

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool, depthwise_init: str = "kaiming") -> None:
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = _pointwise(dim, hidden * 2, bias)
        self.dynamic_dwconv = SampleAdaptiveDepthwiseConv(hidden * 2, init=depthwise_init)
        self.project_out = _pointwise(hidden, dim, bias)

    def forward(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        kernels = self.dynamic_dwconv.kernel(kernel, x.shape[0])  # (B, 2 * hidden, 1, k, k)
        x1, x2 = gated_halves(
            x, self.project_in.conv, lambda h, part: per_sample_depthwise_conv(h, kernels[:, part])
        )
        return pointwise(self.project_out, gate(x1, x2))


class AdaptiveTransformerBlock(CheckpointedBlock):
    """Transformer block with sample-adaptive depthwise kernels: ``x + MDTA(LN(x))``, ``x + GDFN(LN(x))``.

    ``forward(x, attn_kernel, ffn_kernel)``: kernels ``(B, 3C, 1, 3, 3)`` and ``(B, 2*hidden, 1, 3, 3)``.
    ``activation_checkpointing`` as for :class:`~medir_monai.networks.blocks.TransformerBlock`.
    ``depthwise_init``: ``"authors"`` (standard normal for the attention's shared depthwise kernel, Kaiming
    fan-out for the feed-forward's, as in the authors' code) or ``"uniform"`` (both as ``nn.Conv2d`` draws them).
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
        depthwise_init: str = "authors",
    ) -> None:
        super().__init__(activation_checkpointing)
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"AdaptiveTransformerBlock: num_heads={num_heads} must be >= 1 and divide dim={dim}.")
        attn_init, ffn_init = depthwise_inits(depthwise_init, "AdaptiveTransformerBlock")
        self.norm1 = ChannelLayerNorm(dim, bias=layer_norm_bias)
        self.attn = AdaptiveChannelAttention(dim, num_heads, bias, window, attn_init)
        self.norm2 = ChannelLayerNorm(dim, bias=layer_norm_bias)
        self.ffn = AdaptiveGatedFeedForward(dim, ffn_expansion_factor, bias, ffn_init)

    def _forward(  # type: ignore[override]
        self, x: torch.Tensor, attn_kernel: torch.Tensor, ffn_kernel: torch.Tensor
    ) -> torch.Tensor:
        x = residual_add(x, self.attn(self.norm1(x), attn_kernel))
        return residual_add(x, self.ffn(self.norm2(x), ffn_kernel))


class AdaptiveStage(nn.ModuleList):
    """A sequence of :class:`AdaptiveTransformerBlock` sharing the same generated kernels."""

    def forward(self, x: torch.Tensor, attn_kernel: torch.Tensor, ffn_kernel: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x, attn_kernel, ffn_kernel)
        return x
