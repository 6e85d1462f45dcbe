"""TAT's test-time local converter: attention on overlapping windows of 1.5x the training size (TAT, MICCAI 2025;
from the authors' code, after Chu et al., ECCV 2022), and the transformer block that uses it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .blocks import (
    TransformerBlock,
    channel_attention,
    pointwise,
    residual_add,
)


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


def window_at_level(train_size: tuple[int, int], ratio: float | None, level: int) -> tuple[int, int] | None:
    """Local-converter window of level ``level`` (0-based): ``int(ratio * train_size // 2**level)`` per axis."""
    if ratio is None:
        return None
    return (int(ratio * train_size[0] // 2**level), int(ratio * train_size[1] // 2**level))


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
        return pointwise(attn.project_out, out)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = residual_add(x, self._attention(self.norm1(x)))
        return residual_add(x, self.ffn(self.norm2(x)))
