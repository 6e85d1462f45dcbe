"""DiffCode stage III: NAF-block restoration backbone with task-aware global routing.

Chen et al., DiffCode, MICCAI 2025 (https://arxiv.org/abs/2507.19874), stage III. The backbone is a NAFNet
(Chen et al., "Simple Baselines for Image Restoration", ECCV 2022) U-Net of NAF blocks, ``[2, 2, 4, 4]`` blocks and
``[64, 128, 256, 256]`` channels at encoder levels 1-3 and the latent level (the decoder mirrors levels 3-1),
fed with ``cat(LQ, decoded prior)``.

Task-aware global routing (TGR, our reading of the paper's Fig. 1g; see ``bundles/diffcode/docs/README.md``): an
image-level task classifier reads the LQ image; its task probabilities ``p`` gate a mixture of experts at the
input of encoder levels 1-3 and of the latent level. Routing is *global*: one gate per image, not per pixel.
Each module computes gate logits ``g = W p + b`` over ``E = 4`` experts, keeps the top-1 and applies
``x + sum_{j in top-k} w_j E_j(x)`` with ``w = softmax`` over the selected logits (the paper). With ``k = 1`` that
weight is exactly 1 and carries no gradient, so by default the full-softmax probability of the chosen expert is
added straight-through (``w + P_j - sg[P_j]``): the forward value is the paper's, and the gate gets the
Switch-Transformer gradient (Fedus et al., 2022).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ...losses import cv_squared
from ..blocks import ChannelLayerNorm

__all__ = ["NAFBlock", "TaskClassifier", "TaskGlobalRouting", "RoutedNAFNet", "ROUTING_POSITIONS"]

#: where :class:`RoutedNAFNet` can place routing modules (the input of that level's block stack)
ROUTING_POSITIONS = ("encoder1", "encoder2", "encoder3", "latent", "decoder3", "decoder2", "decoder1")
#: gate weighting modes of :class:`TaskGlobalRouting`
GATE_GRADIENT_MODES = ("straight_through", "switch", "selected_softmax")
#: expert dispatch modes of :class:`TaskGlobalRouting`
DISPATCH_MODES = ("sparse", "dense")
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


class TaskClassifier(nn.Module):
    """Image-level task classifier: stride-2 3x3 convs with GELU, global average pooling, a linear layer.

    ``forward(x) -> logits [B, num_tasks]``. Works on any input size (padded convs).

    Args:
        in_channels: image channels.
        num_tasks: classes.
        channels: widths of the conv layers (each halves the resolution).
    """

    def __init__(self, in_channels: int = 1, num_tasks: int = 3, channels: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        if num_tasks < 1 or len(channels) < 1:
            raise ValueError(f"TaskClassifier: need num_tasks >= 1 and one conv at least, got {num_tasks}, {channels}.")
        layers: list[nn.Module] = []
        prev = in_channels
        for width in channels:
            layers += [nn.Conv2d(prev, width, kernel_size=3, stride=2, padding=1), nn.GELU()]
            prev = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_tasks)

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
    """Task-aware global routing module: image-level top-k mixture of experts gated by task probabilities.

    ``forward(x, task_probs) -> (x + mixed, balance, choice)``: ``x`` ``[B, C, H, W]``, ``task_probs``
    ``[B, num_tasks]`` (the task classifier's softmax, or a one-hot), ``balance`` a 0-dim float32 tensor
    ``cv^2(importance) + cv^2(load)`` over the batch (importance: summed full-softmax gate probabilities, load:
    images routed to each expert), ``choice`` ``[B]`` int64, the top-1 expert of every image.

    Args:
        dim: channels C.
        num_tasks: length of the gate input.
        num_experts: experts E (4).
        top_k: experts per image (1).
        expert_expand: hidden width factor of an expert.
        gate_gradient: ``"straight_through"`` (default: weights = softmax over the selected logits, plus
            ``P_sel - sg[P_sel]`` of the full softmax, so the forward value is the paper's and the gate is
            trainable at ``top_k = 1``), ``"switch"`` (weights = full-softmax probabilities of the selected
            experts) or ``"selected_softmax"`` (the paper's weights only; no gate gradient at ``top_k = 1``).
        dispatch: ``"sparse"`` (each expert runs on its images only; one host sync) or ``"dense"`` (every
            expert on every image, then gathered). Tracing always uses ``"dense"``.
    """

    def __init__(
        self,
        dim: int,
        num_tasks: int,
        num_experts: int = 4,
        top_k: int = 1,
        expert_expand: int = 2,
        gate_gradient: str = "straight_through",
        dispatch: str = "sparse",
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"TaskGlobalRouting: need 1 <= top_k <= num_experts, got {top_k}, {num_experts}.")
        if gate_gradient not in GATE_GRADIENT_MODES:
            raise ValueError(
                f"TaskGlobalRouting: gate_gradient must be one of {GATE_GRADIENT_MODES}, got {gate_gradient!r}."
            )
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"TaskGlobalRouting: dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}.")
        self.dim = dim
        self.num_tasks = num_tasks
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate_gradient = gate_gradient
        self.dispatch = dispatch
        self.gate = nn.Linear(num_tasks, num_experts)
        self.experts = nn.ModuleList([_Expert(dim, expert_expand) for _ in range(num_experts)])

    def gate_weights(self, task_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weights [B, k], experts [B, k], full_softmax [B, E])`` for gate input ``task_probs`` ``[B, T]``."""
        logits = self.gate(task_probs)  # [B, E]
        full = torch.softmax(logits, dim=-1)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        selected_full = full.gather(1, top_idx)
        if self.gate_gradient == "switch":
            return selected_full, top_idx, full
        weights = torch.softmax(top_logits, dim=-1)
        if self.gate_gradient == "straight_through":
            weights = weights + (selected_full - selected_full.detach())
        return weights, top_idx, full

    def _use_dense(self) -> bool:
        if self.dispatch == "dense" or torch.jit.is_scripting() or torch.jit.is_tracing():
            return True
        return bool(torch.compiler.is_compiling())

    def _run_experts(self, x: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """Outputs of every image's selected experts, ``[B, k, C, H, W]`` in the order of ``top_idx``."""
        b, k = top_idx.shape
        if self._use_dense():
            every = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, C, H, W]
            index = top_idx.view(b, k, 1, 1, 1).expand(b, k, *every.shape[2:])
            return every.gather(1, index)
        flat = top_idx.reshape(-1)  # assignment j belongs to image j // k
        order = torch.argsort(flat, stable=True)
        routed = x.index_select(0, order // k)  # images grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        outs = [expert(chunk) for expert, chunk in zip(self.experts, routed.split(counts)) if chunk.shape[0]]
        grouped = torch.cat(outs, dim=0)
        return torch.zeros_like(grouped).index_copy(0, order, grouped).view(b, k, *x.shape[1:])

    def forward(
        self, x: torch.Tensor, task_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not torch.jit.is_tracing():
            if x.ndim != 4 or x.shape[1] != self.dim:
                raise ValueError(f"TaskGlobalRouting: x must be (B, {self.dim}, H, W), got {tuple(x.shape)}.")
            if task_probs.shape != (x.shape[0], self.num_tasks):
                raise ValueError(
                    f"TaskGlobalRouting: task_probs must be ({x.shape[0]}, {self.num_tasks}), "
                    f"got {tuple(task_probs.shape)}."
                )
        weights, top_idx, full = self.gate_weights(task_probs.to(x.dtype))
        expert_out = self._run_experts(x, top_idx)  # [B, k, C, H, W]
        mixed = (weights.view(*weights.shape, 1, 1, 1) * expert_out).sum(1)
        return x + mixed, self._balance(full, top_idx), top_idx[:, 0]

    def _balance(self, full: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """``cv^2(importance) + cv^2(load)`` over the batch (0 in traced graphs, which need no loss)."""
        if torch.jit.is_tracing():
            return full.new_zeros((), dtype=torch.float32)
        load = torch.bincount(top_idx.reshape(-1), minlength=self.num_experts).to(full.dtype)
        return (cv_squared(full.sum(0)) + cv_squared(load)).float()


class RoutedNAFNet(nn.Module):
    """NAFNet U-Net with :class:`TaskGlobalRouting` modules (DiffCode stage III backbone), no global residual.

    Encoder levels 1-3 hold ``num_blocks[0..2]`` NAF blocks of ``channels[0..2]`` channels, the latent level
    ``num_blocks[3]`` of ``channels[3]``; a 2x2 stride-2 conv goes down, a 1x1 conv + pixel shuffle goes up and
    the skip is added (NAFNet); decoder level ``l`` repeats encoder level ``l``'s block count and width.

    ``forward(x, task_probs) -> (y, balance, choices)``: ``x`` ``[B, in_channels, H, W]`` with H, W multiples
    of ``2**3``, ``y`` ``[B, out_channels, H, W]``, ``balance`` the summed routing balance losses (0-dim),
    ``choices`` one ``[B]`` tensor of top-1 experts per routing module, in network order (the order of
    :data:`ROUTING_POSITIONS`, which :attr:`routing_levels` is sorted to).

    Args:
        in_channels: input channels (``cat(LQ, prior)``: 2).
        out_channels: output channels.
        channels: widths of encoder levels 1-3 and the latent level.
        num_blocks: NAF blocks of encoder levels 1-3 and the latent level.
        num_tasks: gate input length of the routing modules.
        num_experts, top_k, gate_gradient, dispatch, expert_expand: see :class:`TaskGlobalRouting`.
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
        num_tasks: int = 3,
        num_experts: int = 4,
        top_k: int = 1,
        gate_gradient: str = "straight_through",
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
        self.in_channels, self.out_channels = in_channels, out_channels
        self.routing_levels = tuple(p for p in ROUTING_POSITIONS if p in routing_levels)  # network order
        c = list(channels)
        self.intro = nn.Conv2d(in_channels, c[0], kernel_size=3, padding=1)
        self.encoders = nn.ModuleList([self._stage(c[i], num_blocks[i]) for i in range(3)])
        self.downs = nn.ModuleList([nn.Conv2d(c[i], c[i + 1], kernel_size=2, stride=2) for i in range(3)])
        self.latent = self._stage(c[3], num_blocks[3])
        # ups[i] goes from level i+2 to level i+1 (i = 0..2); decoders[i] works at level i+1
        self.ups = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(c[i + 1], c[i] * 4, kernel_size=1, bias=False), nn.PixelShuffle(2))
                for i in range(3)
            ]
        )
        self.decoders = nn.ModuleList([self._stage(c[i], num_blocks[i]) for i in range(3)])
        self.ending = nn.Conv2d(c[0], out_channels, kernel_size=3, padding=1)
        width = {"encoder1": c[0], "encoder2": c[1], "encoder3": c[2], "latent": c[3]}
        width.update({"decoder1": c[0], "decoder2": c[1], "decoder3": c[2]})
        route_kw: dict[str, Any] = dict(
            num_experts=num_experts,
            top_k=top_k,
            expert_expand=expert_expand,
            gate_gradient=gate_gradient,
            dispatch=dispatch,
        )
        self.routing = nn.ModuleDict(
            {p: TaskGlobalRouting(width[p], num_tasks, **route_kw) for p in self.routing_levels}
        )

    @staticmethod
    def _stage(dim: int, blocks: int) -> nn.Sequential:
        return nn.Sequential(*[NAFBlock(dim) for _ in range(blocks)])

    def forward(
        self, x: torch.Tensor, task_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        if not torch.jit.is_tracing():
            if x.ndim != 4 or x.shape[1] != self.in_channels:
                raise ValueError(f"RoutedNAFNet: x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}.")
            if x.shape[-2] % self.size_multiple or x.shape[-1] % self.size_multiple:
                raise ValueError(
                    f"RoutedNAFNet: height and width must be multiples of {self.size_multiple}, got {tuple(x.shape)}."
                )
        balances: list[torch.Tensor] = []
        choices: list[torch.Tensor] = []

        def route(name: str, feat: torch.Tensor) -> torch.Tensor:
            if name not in self.routing:
                return feat
            feat, balance, choice = self.routing[name](feat, task_probs)
            balances.append(balance)
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
        balance = torch.stack(balances).sum() if balances else x.new_zeros((), dtype=torch.float32)
        return self.ending(feat), balance, choices
