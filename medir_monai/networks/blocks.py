"""Restormer building blocks shared by :class:`Restormer`, :class:`AMIR` and :class:`TAT`.

Zamir et al., "Restormer: Efficient Transformer for High-Resolution Image Restoration", CVPR 2022
(https://arxiv.org/abs/2111.09881), section 3. The two inner blocks are MONAI's:
:class:`monai.networks.blocks.cablock.CABlock` is the multi-Dconv head transposed attention (MDTA, Sec. 3.1)
and :class:`monai.networks.blocks.cablock.FeedForward` the gated-Dconv feed-forward network (GDFN, Sec. 3.2).
They compute exactly what the authors' ``Attention`` / ``FeedForward`` compute (checked against the authors'
code with the fixtures in ``tests/test_restormer.py``); their convolutions are MONAI ``Convolution`` wrappers,
so each weight sits one level deeper (``attn.qkv.conv.weight`` for the authors'
``attn.qkv.weight``). The layer norm over channels is ours: MONAI's Restormer block normalises differently.

Memory layout: the models run their features in channels-last memory format by default (``channels_last=True``
of the networks). On CPU, oneDNN's 1x1 and depthwise convolutions are 2-5x faster on channels-last tensors
(forward and backward, see ``benchmarks/README.md``). :class:`ChannelAttention` and :class:`GatedFeedForward`
keep MONAI's parameters and maths and only re-implement the forward so that no step works on strided
channel slices: single-head attention runs as two GEMMs on the ``(B, H*W, C)`` view of the channels-last map,
and the feed-forward computes its two gated halves with two half-width convolutions instead of slicing one
full-width result (a depthwise conv acts per channel, so this is the same function).
The 1x1 convolutions go through :func:`pointwise`: on Intel CPUs where oneDNN has no AVX-512 kernels, a 1x1
convolution of a channels-last map runs as one GEMM on its ``(B, H, W, C)`` view (1.2-2.5x faster there, forward
and backward; oneDNN's own kernel is the faster one with AVX-512, and on AVX2-only AMD CPUs), see
:data:`POINTWISE_AS_GEMM`.
The ``activation_checkpointing`` flag of the blocks recomputes each block's activations in the backward pass
instead of storing them (``torch.utils.checkpoint``): less memory, one more forward per step.

Official checkpoint key names differ from ours in two ways, both handled by :data:`TRANSFORMER_BLOCK_KEY_RULES`:

* ``<block>.norm{1,2}.body.{weight,bias}`` (authors) <-> ``<block>.norm{1,2}.{weight,bias}`` (ours);
* ``<block>.attn.{qkv,qkv_dwconv,project_out}.{weight,bias}`` and
  ``<block>.ffn.{project_in,dwconv,project_out}.{weight,bias}`` (authors) <-> the same with ``.conv.`` inserted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.cablock import CABlock, FeedForward
from torch.utils.checkpoint import checkpoint

from .official import KeyRule

__all__ = [
    "ChannelLayerNorm",
    "ChannelAttention",
    "GatedFeedForward",
    "CheckpointedBlock",
    "ActivationCheckpointing",
    "TransformerBlock",
    "channel_attention",
    "gated_halves",
    "gate",
    "residual_add",
    "OverlapPatchEmbed",
    "Downsample",
    "Upsample",
    "pad_to_multiple",
    "pointwise",
    "pointwise_conv",
    "POINTWISE_AS_GEMM",
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
            # channels to the last axis, fused layer norm, back: (B,C,H,W) -> (B,H,W,C) -> (B,C,H,W); free for a
            # channels-last x, and (outside traces) the result keeps x's layout
            y = F.layer_norm(x.permute(0, 2, 3, 1), (self.dim,), self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
            if self.dim > 1 and not torch.jit.is_tracing() and not x.is_contiguous(memory_format=torch.channels_last):
                y = y.contiguous()
            return y
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return x / torch.sqrt(var + self.eps) * self.weight.view(1, -1, 1, 1)


#: ``F.normalize``'s floor of the norm, which the authors' attention uses
NORMALIZE_EPS = 1e-12


def cpuinfo_field(name: str) -> str:
    """The first value of field ``name`` in ``/proc/cpuinfo`` (``"vendor_id"`` -> ``"GenuineIntel"``,
    ``"model name"`` -> ``"AMD EPYC"``), or ``""`` where it cannot be read (not Linux, or no such line)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The CPU's vendor string as the kernel reports it (``"GenuineIntel"``, ``"AuthenticAMD"``), or ``""``."""
    return cpuinfo_field("vendor_id")


def _gemm_is_faster_than_onednn(capability: str | None = None, vendor: str | None = None) -> bool:
    """True on Intel CPUs whose PyTorch kernels stop below AVX-512 (``torch.backends.cpu.get_cpu_capability()``):
    there oneDNN runs its AVX2 1x1 convolution, slower than MKL's GEMM. On an AVX2-only AMD EPYC the GEMM was
    the slower path, and an unknown vendor keeps PyTorch's own choice, the convolution (``benchmarks/README.md``,
    CPU kinds)."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    if capability not in ("AVX2", "DEFAULT"):
        return False  # no need to read /proc/cpuinfo at import
    return (cpu_vendor() if vendor is None else vendor) == "GenuineIntel"


#: run 1x1 convolutions of channels-last CPU maps as GEMMs (decided once from the CPU's kernels and vendor;
#: assign ``blocks.POINTWISE_AS_GEMM`` to force either path: both compute the same function)
POINTWISE_AS_GEMM: bool = _gemm_is_faster_than_onednn()


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """1x1 convolution ``(B, C, H, W) -> (B, O, H, W)`` with ``weight`` ``(O, C, 1, 1)``.

    A channels-last CPU map is a ``(B, H, W, C)`` matrix, so with :data:`POINTWISE_AS_GEMM` the convolution is
    ``linear(x_nhwc, weight)``: no copy, output channels-last. Otherwise, under tracing (an exported graph must
    not depend on the exporting CPU) and for other layouts or devices: ``F.conv2d``.
    """
    if (
        POINTWISE_AS_GEMM
        and x.device.type == "cpu"
        and x.ndim == 4
        and x.shape[1] > 1
        and not torch.jit.is_tracing()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias)


def pointwise(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a 1x1 ``nn.Conv2d`` or a MONAI ``Convolution`` wrapping one, via :func:`pointwise_conv`."""
    conv = getattr(layer, "conv", layer)
    return pointwise_conv(x, conv.weight, conv.bias)


def _normalised_logits(q: torch.Tensor, k_t: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor) -> torch.Tensor:
    """``normalize(q) @ normalize(k)^T`` as ``(q @ k^T) / (|q| |k|^T)``, given ``k_t = k^T`` and the floored norms:
    the division runs on the small ``(C, C)`` logits instead of the two ``(C, H*W)`` maps (same value).

    The un-normalised product sums over all pixels, so it runs in float32 whatever the autocast dtype (in float16
    it would overflow at 128x128 and above); the logits are small, the cost is two casts of q and k."""
    if q.dtype in (torch.float16, torch.bfloat16):
        with torch.autocast(q.device.type, enabled=False):
            return _normalised_logits(q.float(), k_t.float(), q_norm.float(), k_norm.float())
    return (q @ k_t) / (q_norm.unsqueeze(-1) * k_norm.unsqueeze(-2))


def _column_norms(m: torch.Tensor) -> torch.Tensor:
    """``(B, N, C) -> (B, C)``: Euclidean norm of every column (in float32), floored at :data:`NORMALIZE_EPS`.

    The sum of squares runs as a GEMV with a ones vector, which is 2-3x faster than a strided column reduction
    over a channels-last map; flooring the square before the root keeps the gradient finite at zero.
    """
    if m.dtype in (torch.float16, torch.bfloat16):
        with torch.autocast(m.device.type, enabled=False):
            return _column_norms(m.float())
    squares = m.new_ones(m.shape[0], 1, m.shape[1]) @ (m * m)  # (B, 1, C)
    return squares.squeeze(1).clamp_min(NORMALIZE_EPS**2).sqrt()


def channel_attention(qkv: torch.Tensor, num_heads: int, temperature: torch.Tensor) -> torch.Tensor:
    """Transposed (channel) self-attention of Restormer (Restormer Eq. 1) on a mixed ``qkv`` map.

    ``softmax(normalize(q) normalize(k)^T * temperature) v`` per head, where ``q``, ``k``, ``v`` are
    ``(C/heads, H*W)`` matrices and ``normalize`` makes every channel's row unit-length over the pixels
    (``F.normalize``, norm floored at 1e-12).

    Args:
        qkv: ``(B, 3C, H, W)``, the concatenation of queries, keys and values.
        num_heads: heads; must divide ``C``.
        temperature: ``(num_heads, 1, 1)`` learnable scale of the attention logits.

    Returns:
        ``(B, C, H, W)`` in the memory format of ``qkv``.
    """
    b, c3, h, w = qkv.shape
    c = c3 // 3
    # layout branches stay out of traced graphs (their choice could differ between input sizes)
    channels_last = c3 > 3 and not torch.jit.is_tracing() and qkv.is_contiguous(memory_format=torch.channels_last)
    if channels_last and num_heads == 1:
        # the channels-last map is a (B, H*W, 3C) matrix: two GEMMs, no copies, output channels-last
        q, k, v = qkv.permute(0, 2, 3, 1).reshape(b, h * w, c3).split(c, dim=-1)
        logits = _normalised_logits(q.transpose(1, 2), k, _column_norms(q), _column_norms(k))  # (B, C, C)
        attn = (logits * temperature.reshape(1, 1, 1)).softmax(dim=-1).to(v.dtype)
        return (v @ attn.transpose(1, 2)).view(b, h, w, c).permute(0, 3, 1, 2)
    # (B, 3C, H, W) -> 3 x (B, heads, C/heads, H*W)
    q, k, v = qkv.reshape(b, 3, num_heads, c // num_heads, h * w).unbind(dim=1)
    q_norm, k_norm = (t.float().norm(dim=-1).clamp_min(NORMALIZE_EPS) for t in (q, k))
    logits = _normalised_logits(q, k.transpose(-2, -1), q_norm, k_norm)  # (B, heads, C/h, C/h)
    out = ((logits * temperature).softmax(dim=-1).to(v.dtype) @ v).reshape(b, c, h, w)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class ChannelAttention(CABlock):
    """MDTA (Restormer Eq. 1): MONAI's :class:`~monai.networks.blocks.cablock.CABlock` (same parameters and
    maths) with a memory-format-aware forward (:func:`channel_attention`); 2-D only."""

    def __init__(self, dim: int, num_heads: int, bias: bool) -> None:
        super().__init__(spatial_dims=2, dim=dim, num_heads=num_heads, bias=bias)

    def mixed_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, 3C, H, W)``: the 1x1 projection and the 3x3 depthwise mixing."""
        return self.qkv_dwconv(pointwise(self.qkv, x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise(self.project_out, channel_attention(self.mixed_qkv(x), self.num_heads, self.temperature))


def gated_halves(
    x: torch.Tensor, project_in: nn.Conv2d, depthwise: Callable[[torch.Tensor, slice], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x1, x2) = dwconv(project_in(x)).chunk(2, dim=1)``, computed as two half-width conv pairs.

    The 1x1 and the depthwise conv act on each output channel separately, so half ``i`` only needs rows
    ``i`` of their weights. Each half comes out contiguous in the input's memory format, so the gating and its
    backward never run on strided channel slices (2x faster in channels-last on CPU, same result).

    Args:
        x: ``(B, C, H, W)``.
        project_in: the ``C -> 2 * hidden`` 1x1 convolution.
        depthwise: ``depthwise(h, part)`` applies the depthwise conv of channels ``part`` (a slice of
            ``range(2 * hidden)``) to ``h`` (``(B, hidden, H, W)``).
    """
    hidden = project_in.out_channels // 2
    halves = []
    for part in (slice(0, hidden), slice(hidden, 2 * hidden)):
        bias = None if project_in.bias is None else project_in.bias[part]
        halves.append(depthwise(pointwise_conv(x, project_in.weight[part], bias), part))
    return halves[0], halves[1]


def gate(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The GDFN gating ``GELU(x1) * x2``; when no gradient is needed, computed in place in ``x1`` (a fresh conv
    output): at 256x256 every avoided full-size allocation saves its page faults (about 15 ms on CPU)."""
    if x1.requires_grad or x2.requires_grad or torch.jit.is_tracing():  # a trace must not depend on grad mode
        return F.gelu(x1) * x2
    return torch.ops.aten.gelu_(x1).mul_(x2)


def residual_add(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + branch``, accumulated into ``branch`` (a fresh conv output that autograd does not save) to spare
    one full-size allocation; out of place when dtypes or shapes differ (e.g. under autocast)."""
    if branch.dtype != x.dtype or branch.shape != x.shape:
        return x + branch
    return branch.add_(x)


class GatedFeedForward(FeedForward):
    """GDFN (Restormer Eq. 2): MONAI's :class:`~monai.networks.blocks.cablock.FeedForward` (same parameters
    and maths), ``project_out(GELU(x1) * x2)`` with ``(x1, x2) = dwconv(project_in(x))`` computed by
    :func:`gated_halves`; 2-D only."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool) -> None:
        super().__init__(spatial_dims=2, dim=dim, ffn_expansion_factor=ffn_expansion_factor, bias=bias)

    def _depthwise(self, h: torch.Tensor, part: slice) -> torch.Tensor:
        conv = self.dwconv.conv
        bias = None if conv.bias is None else conv.bias[part]
        return F.conv2d(h, conv.weight[part], bias, padding=conv.padding, groups=h.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = gated_halves(x, self.project_in.conv, self._depthwise)
        return pointwise(self.project_out, gate(x1, x2))


class CheckpointedBlock(nn.Module):
    """Base of the transformer blocks: ``activation_checkpointing`` recomputes the block in the backward pass.

    Subclasses implement ``_forward``. Checkpointing is active only in training with autograd on; the RNG
    state is restored for the recomputation, so the result and gradients are those of a plain forward.
    """

    def __init__(self, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.activation_checkpointing = activation_checkpointing

    def _forward(self, *args: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class ActivationCheckpointing:
    """Mixin for networks built of :class:`CheckpointedBlock`: a settable ``activation_checkpointing`` flag."""

    @property
    def activation_checkpointing(self) -> bool:
        """Whether the transformer blocks recompute their activations in the backward pass."""
        return any(m.activation_checkpointing for m in self.modules() if isinstance(m, CheckpointedBlock))  # type: ignore[attr-defined]

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():  # type: ignore[attr-defined]
            if isinstance(module, CheckpointedBlock):
                module.activation_checkpointing = bool(enabled)


class TransformerBlock(CheckpointedBlock):
    """Restormer transformer block (Restormer Sec. 3): ``x + MDTA(LN(x))`` then ``x + GDFN(LN(x))``.

    Args:
        dim: channels.
        num_heads: attention heads of the MDTA (must divide ``dim``).
        ffn_expansion_factor: GDFN hidden width is ``int(dim * ffn_expansion_factor)``.
        bias: bias in the MDTA / GDFN convolutions.
        layer_norm_bias: WithBias (True, the published models) or BiasFree layer norm.
        activation_checkpointing: recompute the block's activations in the backward pass (saves memory).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_expansion_factor: float,
        bias: bool,
        layer_norm_bias: bool = True,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(activation_checkpointing)
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"TransformerBlock: num_heads={num_heads} must be >= 1 and divide dim={dim}.")
        self.norm1 = ChannelLayerNorm(dim, bias=layer_norm_bias)
        self.attn = ChannelAttention(dim, num_heads, bias)
        self.norm2 = ChannelLayerNorm(dim, bias=layer_norm_bias)
        self.ffn = GatedFeedForward(dim, ffn_expansion_factor, bias)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = residual_add(x, self.attn(self.norm1(x)))
        return residual_add(x, self.ffn(self.norm2(x)))


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
