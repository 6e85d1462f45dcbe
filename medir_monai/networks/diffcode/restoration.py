"""DiffCode stage III: NAF-block restoration backbone with task-aware global routing.

Chen et al., DiffCode, MICCAI 2025 (https://arxiv.org/abs/2507.19874), stage III. The backbone is a NAFNet
(Chen et al., "Simple Baselines for Image Restoration", ECCV 2022) U-Net of NAF blocks, ``[2, 2, 4, 4]`` blocks and
``[64, 128, 256, 256]`` channels at encoder levels 1-3 and the latent level (the decoder mirrors levels 3-1),
fed with ``cat(LQ, decoded prior)``.

Task-aware global routing (the paper's TARS / TARM modules, Eq. 8): an image-level task classifier reads the LQ
image and gives **one global gating vector** ``V = softmax(classifier(LQ))`` over the ``E = 4`` experts, shared
by every routing module of the network (no per-module gate). Each module keeps the top-k entries of ``V`` (k = 1)
and replaces its features by the gated experts, without a residual:
``y = sum_{j in TopK(V)} V_j E_j(x)``. Routing is *global*: one choice per image, not per pixel. The classifier has
no loss of its own: it learns through ``V_j`` from the restoration loss (Eq. 7) alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ..blocks import ChannelLayerNorm
from ..moe import dense_dispatch, run_top_k_experts
from .naf import NAF_LAYER_NORM_EPS, NAFBlock, SimpleGate, naf_stage

__all__ = ["NAFBlock", "TaskClassifier", "TaskGlobalRouting", "RoutedNAFNet", "ROUTING_POSITIONS"]

#: where :class:`RoutedNAFNet` can place routing modules (the input of that level's block stack)
ROUTING_POSITIONS = ("encoder1", "encoder2", "encoder3", "latent", "decoder3", "decoder2", "decoder1")
#: expert dispatch modes of :class:`TaskGlobalRouting`
DISPATCH_MODES = ("sparse", "dense")


class TaskClassifier(nn.Module):
    """Image-level task classifier: stride-2 3x3 convs with GELU, global average pooling, a linear layer.

    ``forward(x) -> logits [B, num_outputs]``; their softmax is DiffCode's global gating vector ``V`` over the
    experts. Works on any input size (padded convs).

    Args:
        in_channels: image channels.
        num_outputs: gate entries (the number of experts).
        channels: widths of the conv layers (each halves the resolution).
    """

    def __init__(self, in_channels: int = 1, num_outputs: int = 4, channels: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        if num_outputs < 1 or len(channels) < 1:
            raise ValueError(f"TaskClassifier: need num_outputs >= 1 and one conv at least, got {num_outputs}, {channels}.")
        layers: list[nn.Module] = []
        prev = in_channels
        for width in channels:
            layers += [nn.Conv2d(prev, width, kernel_size=3, stride=2, padding=1), nn.GELU()]
            prev = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class _Expert(nn.Module):
    """One routing expert: ``conv1x1(SG(dwconv3x3(conv1x1(LN(x)))))`` (a NAF-style gated branch)."""

    def __init__(self, dim: int, expand: int) -> None:
        super().__init__()
        hidden = dim * expand
        self.body = nn.Sequential(
            ChannelLayerNorm(dim, bias=True, eps=NAF_LAYER_NORM_EPS),
            nn.Conv2d(dim, hidden, kernel_size=1),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden),
            SimpleGate(),
            nn.Conv2d(hidden // 2, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TaskGlobalRouting(nn.Module):
    """Task-aware global routing module (Eq. 8): ``y = sum_{j in TopK(V)} V_j E_j(x)``, no residual.

    ``forward(x, gate) -> (y, choice)``: ``x`` ``[B, C, H, W]``, ``gate`` ``[B, E]`` the global gating vector ``V``
    (a probability vector per image, shared by all modules), ``choice`` ``[B]`` int64, the top-1 expert of every
    image. The weights are the entries of ``V`` themselves (not renormalised over the top k), so the classifier
    that produces ``V`` receives the restoration loss's gradient also at ``k = 1``.

    Args:
        dim: channels C.
        num_experts: experts E (4).
        top_k: experts per image (1).
        expert_expand: hidden width factor of an expert.
        dispatch: ``"sparse"`` (each expert runs on its images only; one host sync) or ``"dense"`` (every
            expert on every image, then gathered; the same numbers). Tracing always uses ``"dense"``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int = 4,
        top_k: int = 1,
        expert_expand: int = 2,
        dispatch: str = "sparse",
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"TaskGlobalRouting: need 1 <= top_k <= num_experts, got {top_k}, {num_experts}.")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"TaskGlobalRouting: dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}.")
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.dispatch = dispatch
        self.experts = nn.ModuleList([_Expert(dim, expert_expand) for _ in range(num_experts)])

    def _run_experts(self, x: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """Outputs of every image's selected experts, ``[B, k, C, H, W]`` in the order of ``top_idx``."""
        return run_top_k_experts(x, top_idx, self.experts, dense_dispatch(self.dispatch, x.device), skip_idle=True)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.jit.is_tracing():
            if x.ndim != 4 or x.shape[1] != self.dim:
                raise ValueError(f"TaskGlobalRouting: x must be (B, {self.dim}, H, W), got {tuple(x.shape)}.")
            if gate.shape != (x.shape[0], self.num_experts):
                raise ValueError(
                    f"TaskGlobalRouting: gate must be ({x.shape[0]}, {self.num_experts}), got {tuple(gate.shape)}."
                )
        weights, top_idx = gate.to(x.dtype).topk(self.top_k, dim=-1)  # [B, k]: V_j of the selected experts
        expert_out = self._run_experts(x, top_idx)  # [B, k, C, H, W]
        return (weights.view(*weights.shape, 1, 1, 1) * expert_out).sum(1), top_idx[:, 0]


class RoutedNAFNet(nn.Module):
    """NAFNet U-Net with :class:`TaskGlobalRouting` modules (DiffCode stage III backbone), no global residual.

    Encoder levels 1-3 hold ``num_blocks[0..2]`` NAF blocks of ``channels[0..2]`` channels, the latent level
    ``num_blocks[3]`` of ``channels[3]``; a 2x2 stride-2 conv goes down, a 1x1 conv + pixel shuffle goes up and
    the skip is added (NAFNet); decoder level ``l`` repeats encoder level ``l``'s block count and width.

    ``forward(x, gate) -> (y, choices)``: ``x`` ``[B, in_channels, H, W]`` with H, W multiples of ``2**3``,
    ``gate`` ``[B, num_experts]`` the global gating vector ``V``, ``y`` ``[B, out_channels, H, W]``, ``choices``
    one ``[B]`` tensor of top-1 experts per routing module, in network order (the order of
    :data:`ROUTING_POSITIONS`, which :attr:`routing_levels` is sorted to).

    Args:
        in_channels: input channels (``cat(LQ, prior)``: 2).
        out_channels: output channels.
        channels: widths of encoder levels 1-3 and the latent level.
        num_blocks: NAF blocks of encoder levels 1-3 and the latent level.
        num_experts, top_k, dispatch, expert_expand: see :class:`TaskGlobalRouting`.
        routing_levels: positions of the routing modules, a subset of :data:`ROUTING_POSITIONS` (each at the
            input of that level's blocks). Default: encoder levels 1-3 and the latent level.
    """

    #: input height/width must be multiples of this
    size_multiple: int = 8

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256, 256),
        num_blocks: Sequence[int] = (2, 2, 4, 4),
        num_experts: int = 4,
        top_k: int = 1,
        dispatch: str = "sparse",
        expert_expand: int = 2,
        routing_levels: Sequence[str] = ("encoder1", "encoder2", "encoder3", "latent"),
    ) -> None:
        super().__init__()
        if len(channels) != 4 or len(num_blocks) != 4:
            raise ValueError(
                "RoutedNAFNet: channels and num_blocks need 4 entries (levels 1-3 + latent), "
                f"got {channels}, {num_blocks}."
            )
        unknown = [p for p in routing_levels if p not in ROUTING_POSITIONS]
        if unknown or len(set(routing_levels)) != len(routing_levels):
            raise ValueError(
                f"RoutedNAFNet: routing_levels must be distinct names from {ROUTING_POSITIONS}, got {routing_levels}."
            )
        self.in_channels, self.out_channels, self.num_experts = in_channels, out_channels, num_experts
        self.routing_levels = tuple(p for p in ROUTING_POSITIONS if p in routing_levels)  # network order
        c = list(channels)
        self.intro = nn.Conv2d(in_channels, c[0], kernel_size=3, padding=1)
        self.encoders = nn.ModuleList([naf_stage(c[i], num_blocks[i]) for i in range(3)])
        self.downs = nn.ModuleList([nn.Conv2d(c[i], c[i + 1], kernel_size=2, stride=2) for i in range(3)])
        self.latent = naf_stage(c[3], num_blocks[3])
        # ups[i] goes from level i+2 to level i+1 (i = 0..2); decoders[i] works at level i+1
        self.ups = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(c[i + 1], c[i] * 4, kernel_size=1, bias=False), nn.PixelShuffle(2))
                for i in range(3)
            ]
        )
        self.decoders = nn.ModuleList([naf_stage(c[i], num_blocks[i]) for i in range(3)])
        self.ending = nn.Conv2d(c[0], out_channels, kernel_size=3, padding=1)
        width = {"encoder1": c[0], "encoder2": c[1], "encoder3": c[2], "latent": c[3]}
        width.update({"decoder1": c[0], "decoder2": c[1], "decoder3": c[2]})
        route_kw: dict[str, Any] = dict(
            num_experts=num_experts,
            top_k=top_k,
            expert_expand=expert_expand,
            dispatch=dispatch,
        )
        self.routing = nn.ModuleDict({p: TaskGlobalRouting(width[p], **route_kw) for p in self.routing_levels})

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not torch.jit.is_tracing():
            if x.ndim != 4 or x.shape[1] != self.in_channels:
                raise ValueError(f"RoutedNAFNet: x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}.")
            if x.shape[-2] % self.size_multiple or x.shape[-1] % self.size_multiple:
                raise ValueError(
                    f"RoutedNAFNet: height and width must be multiples of {self.size_multiple}, got {tuple(x.shape)}."
                )
        choices: list[torch.Tensor] = []

        def route(name: str, feat: torch.Tensor) -> torch.Tensor:
            if name not in self.routing:
                return feat
            feat, choice = self.routing[name](feat, gate)
            choices.append(choice)
            return feat

        feat = self.intro(x)
        if not torch.jit.is_tracing():  # channels-last features: oneDNN's fast convolutions on CPU
            feat = feat.contiguous(memory_format=torch.channels_last)
        skips = []
        for i in range(3):
            feat = self.encoders[i](route(f"encoder{i + 1}", feat))
            skips.append(feat)
            feat = self.downs[i](feat)
        feat = self.latent(route("latent", feat))
        for i in reversed(range(3)):
            feat = self.ups[i](feat) + skips[i]
            feat = self.decoders[i](route(f"decoder{i + 1}", feat))
        return self.ending(feat), choices
