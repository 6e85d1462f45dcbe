"""AMIR: all-in-one medical image restoration via task-adaptive routing.

Yang et al., "All-In-One Medical Image Restoration via Task-Adaptive Routing", MICCAI 2024
(https://arxiv.org/abs/2405.19769). A Restormer whose features are routed by an instruction vector that a small
network reads from the degraded input:

* RIN, the restoration instruction network (``dict_generator``): image -> softmax weights over a learnt
  dictionary of instruction atoms -> instruction ``[B, atom_dim]``;
* SRM, spatial routing modules at the inputs of encoder levels 1-3: a noisy top-k mixture of experts over the
  pixel tokens, gated by the token and the instruction (:class:`SpatialMoE`), with a load-balancing loss;
* CRM, channel routing modules at the latent input and the decoder inputs: an instruction-gated affine
  modulation of the channels (:class:`ChannelRouting`).

Defaults follow the authors' code, which produced the published numbers (23,540,498 parameters at one
channel): 32 dictionary atoms (the paper text says 16), and the experts are mixed in log space,
``log(sum_k g_k exp(E_k(x)))``; the paper's ``sum_k g_k E_k(x)`` is ``moe_combine="linear"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks.mlp import MLPBlock

from ..losses import cv_squared
from .blocks import TRANSFORMER_BLOCK_KEY_RULES, pad_to_multiple
from .moe import DISPATCH_MODES, dense_dispatch, run_top_k_experts
from .official import KeyRule, rename_state_dict
from .restormer import NUM_LEVELS, Restormer

__all__ = ["AMIR", "SpatialMoE", "SpatialRouting", "ChannelRouting", "InstructionGenerator", "cv_squared"]

#: combine modes of :class:`SpatialMoE`
MOE_COMBINE_MODES = ("log", "linear")
#: the authors replace exact zeros of the mixed output by float64 machine epsilon before the log
LOG_COMBINE_EPS = float(torch.finfo(torch.float64).eps)

#: renamings of the SpatialMoE keys (relative to the MoE module)
_MOE_KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("{pre}experts.{i}.fc1.{p}", "{pre}experts.{i}.linear1.{p}"),
    KeyRule("{pre}experts.{i}.fc2.{p}", "{pre}experts.{i}.linear2.{p}"),
    # constant N(0, 1) parameters the authors keep as buffers; we do not store them
    KeyRule("{pre}{buf}", None, {"buf": "mean|std"}),
)
#: renamings of the AMIR keys that are not transformer-block keys
_AMIR_KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("dict_generator.CondNet.{i}.{p}", "dict_generator.cond_net.{i}.{p}"),
    KeyRule("dict_generator.lastOut.{p}", "dict_generator.to_logits.{p}"),
    KeyRule(
        "{route}_{name}.fc.{p}", "{route}_{name}.instruction_proj.{p}", {"route": "spatial_routing|channel_routing"}
    ),
    KeyRule("spatial_routing_{name}.moe.experts.{i}.fc1.{p}", "spatial_routing_{name}.moe.experts.{i}.linear1.{p}"),
    KeyRule("spatial_routing_{name}.moe.experts.{i}.fc2.{p}", "spatial_routing_{name}.moe.experts.{i}.linear2.{p}"),
    KeyRule("spatial_routing_{name}.moe.{buf}", None, {"buf": "mean|std"}),
)


def _standard_normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


class SpatialMoE(nn.Module):
    """Noisy top-k mixture of experts over the pixel tokens of a feature map (the MoE inside AMIR's SRM).

    Every pixel of ``x`` (B, C, H, W) is a token; its gate input is ``cat(token, prompt[b])``. Gating follows
    Shazeer et al. 2017: logits ``g @ w_gate``, in training plus noise ``randn * (softplus(g @ w_noise) + eps)``;
    the top ``top_k`` logits are soft-maxed into gates. Each expert is an MLP ``C -> int(mlp_ratio*C) -> C``
    (GELU) and sees only the tokens routed to it.

    Balance loss: ``cv_squared(importance) + cv_squared(load)``, importance = gates summed over tokens, load =
    in training the differentiable probability of each expert being in the top k (Normal CDF of the noise),
    in evaluation the number of tokens routed to each expert.

    Args:
        dim: channels C of the tokens (and of the output).
        prompt_dim: channels of the prompt concatenated to every token (default ``dim``).
        mlp_ratio: expert hidden width factor.
        num_experts: number of experts.
        top_k: experts per token.
        combine: ``"log"`` (authors' code: ``log(sum_k g_k exp(E_k))``, exact zeros replaced by ``log_eps``) or
            ``"linear"`` (paper: ``sum_k g_k E_k``).
        noisy_gating: add the learnt gating noise in training.
        noise_eps: floor of the noise standard deviation.
        dispatch: ``"sparse"``: one sort and one gather, each expert runs on its own tokens only (the
            per-expert token counts are read on the host: free on CPU, one device sync per call on a GPU);
            ``"dense"``: every expert runs on every token and the top-k outputs are gathered (no sync, same
            result, about num_experts/top_k times the expert FLOPs); ``"auto"`` (default): sparse on CPU,
            dense on accelerators. Tracing, scripting and ``torch.compile`` always use ``"dense"``, so
            exported graphs do not bake in token counts.
        log_eps: replacement for exact zeros before the log (``combine="log"``).
        cv_eps: epsilon of :func:`cv_squared`.

    Forward returns ``(y, balance_loss, top1)``: ``y`` (B, C, H, W) the mixed expert outputs (no residual),
    ``balance_loss`` a 0-dim float32 tensor, ``top1`` (B, H, W) the index of each token's highest-gated expert.
    """

    def __init__(
        self,
        dim: int,
        prompt_dim: int | None = None,
        mlp_ratio: float = 2.66,
        num_experts: int = 4,
        top_k: int = 2,
        combine: str = "log",
        noisy_gating: bool = True,
        noise_eps: float = 0.01,
        dispatch: str = "auto",
        log_eps: float = LOG_COMBINE_EPS,
        cv_eps: float = 1e-10,
    ) -> None:
        super().__init__()
        if combine not in MOE_COMBINE_MODES:
            raise ValueError(f"SpatialMoE: combine must be one of {MOE_COMBINE_MODES}, got {combine!r}.")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"SpatialMoE: dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}.")
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"SpatialMoE: need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}."
            )
        if dim < 1:
            raise ValueError(f"SpatialMoE: dim must be >= 1, got {dim}.")
        self.dim = dim
        self.prompt_dim = dim if prompt_dim is None else prompt_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.combine = combine
        self.noisy_gating = noisy_gating
        self.noise_eps = noise_eps
        self.dispatch = dispatch
        self.log_eps = log_eps
        self.cv_eps = cv_eps
        hidden = int(dim * mlp_ratio)
        self.experts = nn.ModuleList(
            [MLPBlock(dim, hidden, dropout_rate=0.0, act="GELU", dropout_mode="vista3d") for _ in range(num_experts)]
        )
        gate_in = dim + self.prompt_dim
        self.w_gate = nn.Parameter(torch.randn(gate_in, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(gate_in, num_experts))

    # -- gating -------------------------------------------------------------------------------------------
    def _gate(self, gate_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noisy top-k gating of ``gate_in`` [N, C+P].

        Returns top-k gates [N, k], their expert indices [N, k] (descending gate), dense gates [N, E], load [E].
        """
        clean = gate_in @ self.w_gate  # [N, E]
        noisy = self.noisy_gating and self.training
        noise_std = clean  # placeholder so the name is always bound; only read when noisy
        logits = clean
        if noisy:
            noise_std = F.softplus(gate_in @ self.w_noise) + self.noise_eps
            logits = clean + torch.randn_like(clean) * noise_std
        top_vals, top_idx = logits.topk(min(self.top_k + 1, self.num_experts), dim=1)
        k = self.top_k
        top_gates = torch.softmax(top_vals[:, :k], dim=1)
        top_idx = top_idx[:, :k]
        dense = torch.zeros_like(logits).scatter(1, top_idx, top_gates)
        if noisy and k < self.num_experts:
            load = self._soft_load(clean, logits, noise_std, top_vals)
        else:
            load = (dense > 0).sum(0).to(dense.dtype)
        return top_gates, top_idx, dense, load

    def _soft_load(
        self, clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, top_vals: torch.Tensor
    ) -> torch.Tensor:
        """Sum over tokens of P(expert in top k) under re-drawn noise (Shazeer et al. 2017, Appendix A)."""
        k = self.top_k
        threshold_in = top_vals[:, k : k + 1]  # an expert inside the top k must stay above the (k+1)-th value
        threshold_out = top_vals[:, k - 1 : k]  # one outside must beat the k-th value
        prob_in = _standard_normal_cdf((clean - threshold_in) / noise_std)
        prob_out = _standard_normal_cdf((clean - threshold_out) / noise_std)
        return torch.where(noisy > threshold_in, prob_in, prob_out).sum(0)

    def _balance_loss(self, importance: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
        """``cv_squared(importance) + cv_squared(load)``; 0 with a single expert."""
        if self.num_experts == 1:
            return importance.new_zeros((), dtype=torch.float32)
        return cv_squared(importance, self.cv_eps) + cv_squared(load, self.cv_eps)

    # -- experts ------------------------------------------------------------------------------------------
    def _run_experts(self, tokens: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """Outputs of each token's chosen experts, [N, k, C] in the order of ``top_idx``."""
        return run_top_k_experts(tokens, top_idx, self.experts, dense_dispatch(self.dispatch, tokens.device))

    def _mix(self, expert_out: torch.Tensor, top_gates: torch.Tensor) -> torch.Tensor:
        """Gate-weighted mix over the k chosen experts; ``expert_out`` [N, k, C], ``top_gates`` [N, k]."""
        gates = top_gates.unsqueeze(-1)
        if self.combine == "linear":
            return (gates * expert_out).sum(1)
        weighted = gates.float() * expert_out.float().exp()
        # a gate that underflowed to 0 drops its expert (also avoids 0 * inf)
        weighted = torch.where(gates > 0, weighted, torch.zeros_like(weighted))
        mixed = weighted.sum(1)
        mixed = torch.where(mixed == 0, torch.full_like(mixed, self.log_eps), mixed)
        return mixed.log()

    def forward(
        self, x: torch.Tensor, prompt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (B, C, H, W), ``prompt`` (B, prompt_dim) -> ``(y, balance_loss, top1)`` (see class docstring)."""
        if not torch.jit.is_tracing():  # shapes are constants of a traced graph
            if x.ndim != 4 or x.shape[1] != self.dim:
                raise ValueError(f"SpatialMoE.forward: x must be (B, {self.dim}, H, W), got {tuple(x.shape)}.")
            if prompt.shape != (x.shape[0], self.prompt_dim):
                raise ValueError(
                    f"SpatialMoE.forward: prompt must be ({x.shape[0]}, {self.prompt_dim}), got {tuple(prompt.shape)}."
                )
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # token order (b, h, w)
        cond = prompt.unsqueeze(1).expand(b, h * w, self.prompt_dim).reshape(b * h * w, self.prompt_dim)
        top_gates, top_idx, dense_gates, load = self._gate(torch.cat([tokens, cond], dim=1))
        balance = self._balance_loss(dense_gates.sum(0), load)
        mixed = self._mix(self._run_experts(tokens, top_idx), top_gates).to(x.dtype)
        y = mixed.view(b, h, w, c).permute(0, 3, 1, 2)
        return y, balance, top_idx[:, 0].reshape(b, h, w)

    @staticmethod
    def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keys of the authors' ``MoE`` -> ours (drops their constant ``mean``/``std`` buffers)."""
        return rename_state_dict(state_dict, _MOE_KEY_RULES)

    def to_official_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's state dict under the authors' ``MoE`` key names (with their N(0,1) buffers)."""
        out = rename_state_dict(self.state_dict(), _MOE_KEY_RULES, reverse=True)
        return {**out, **_normal_buffers(self.w_gate, "")}


def _normal_buffers(like: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """The authors' ``mean`` / ``std`` buffers of a standard normal, as they appear in their checkpoints."""
    return {
        f"{prefix}mean": torch.zeros(1, dtype=like.dtype, device=like.device),
        f"{prefix}std": torch.ones(1, dtype=like.dtype, device=like.device),
    }


class SpatialRouting(nn.Module):
    """SRM, AMIR's spatial routing module: ``x + SpatialMoE(x, Linear(instruction))``.

    Forward returns ``(x_routed, balance_loss, top1)``.
    """

    def __init__(self, dim: int, atom_dim: int, **moe_kwargs: Any) -> None:
        super().__init__()
        self.instruction_proj = nn.Linear(atom_dim, dim)
        self.moe = SpatialMoE(dim, prompt_dim=dim, **moe_kwargs)

    def forward(
        self, x: torch.Tensor, instruction: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, balance, top1 = self.moe(x, self.instruction_proj(instruction))
        return x + y, balance, top1


class ChannelRouting(nn.Module):
    """CRM, AMIR's channel routing module: ``x + (gamma * x + beta) * sigmoid(Linear(instruction))`` per channel.

    ``gamma`` and ``beta`` start at zero, so the module starts as the identity.
    """

    def __init__(self, dim: int, atom_dim: int) -> None:
        super().__init__()
        self.instruction_proj = nn.Linear(atom_dim, dim)
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.instruction_proj(instruction))[:, :, None, None]  # [B, C, 1, 1]
        return x + (x * self.gamma + self.beta) * gate


class InstructionGenerator(nn.Module):
    """RIN, AMIR's restoration instruction network: degraded image -> instruction vector ``[B, atom_dim]``.

    Two 3x3 stride-3 convs and three 1x1 convs (LeakyReLU between), global average pooling, a linear layer to
    ``atom_num`` logits, softmax, a weighted sum of the learnt dictionary atoms, GELU.
    The input needs height and width >= ``min_size`` (9: two unpadded stride-3 convs).

    Args:
        in_channels: image channels.
        atom_num: dictionary atoms (32 in the authors' code).
        atom_dim: instruction length.
        hidden_dim: conv width.
        feature_dim: channels of the last conv (input of the logits layer).
        negative_slope: LeakyReLU slope.
    """

    #: smallest input height/width the two stride-3 convs accept
    min_size: int = 9

    def __init__(
        self,
        in_channels: int,
        atom_num: int = 32,
        atom_dim: int = 256,
        hidden_dim: int = 64,
        feature_dim: int = 32,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        self.cond_net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=3),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, stride=3),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size=1),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size=1),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(hidden_dim, feature_dim, kernel_size=1),
        )
        self.to_logits = nn.Linear(feature_dim, atom_num)
        self.dictionary = nn.Parameter(torch.randn(atom_num, atom_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and min(x.shape[-2], x.shape[-1]) < self.min_size:
            raise ValueError(
                f"InstructionGenerator: input height and width must be >= {self.min_size}, got {tuple(x.shape)}."
            )
        feat = self.cond_net(x).mean(dim=(2, 3))  # [B, feature_dim]
        weights = torch.softmax(self.to_logits(feat), dim=-1)  # [B, atom_num]
        return F.gelu(weights @ self.dictionary)  # [B, atom_dim]


class _RoutingRecord:
    """What one AMIR forward collects: the instruction, the SRM balance losses and top-1 expert maps."""

    def __init__(self, instruction: torch.Tensor) -> None:
        self.instruction = instruction
        self.losses: list[torch.Tensor] = []
        self.top1: list[torch.Tensor] = []


class AMIR(Restormer):
    """AMIR (Yang et al., MICCAI 2024): Restormer with instruction-driven spatial and channel routing.

    The defaults build the published model (23,540,498 parameters at one channel). ``forward(x)`` returns the
    restored image in training and in evaluation, so MONAI inferers, ``SlidingWindowInferer`` and TorchScript
    tracing work unchanged. Sizes not divisible by 8 are reflect-padded and cropped back; the RIN reads the
    unpadded input (height and width >= 9).

    After every forward the model keeps (overwritten by the next forward):

    * ``aux_loss``: 0-dim float32 tensor, the sum of the three SRM balance losses (with grad in training;
      train with ``loss = l1 + 0.001 * model.aux_loss``). In evaluation the load is the hard token count.
    * ``last_routing``: list of three ``(B, H_l, W_l)`` int64 tensors (detached), per SRM (encoder levels 1..3)
      the index of each pixel's highest-gated expert, cropped to the unpadded area.
    * ``last_instruction``: ``(B, atom_dim)`` detached instruction vectors.

    These are Python attributes: a traced or scripted export returns only the image.

    Args:
        in_channels, out_channels, dim, num_blocks, num_refinement_blocks, heads, ffn_expansion_factor, bias,
            layer_norm_bias, residual: see :class:`Restormer` (defaults are AMIR's sizes).
        atom_num: RIN dictionary atoms (32 in the code, 16 in the paper text).
        atom_dim: instruction length.
        num_experts, top_k: SRM experts and experts per token.
        moe_combine: ``"log"`` (authors' code, default) or ``"linear"`` (paper), see :class:`SpatialMoE`.
        moe_noise_eps: floor of the gating noise standard deviation.
        moe_dispatch: ``"auto"``, ``"sparse"`` or ``"dense"`` expert dispatch, see :class:`SpatialMoE`.
        channels_last, activation_checkpointing: see :class:`Restormer` (the SRM/CRM are not checkpointed).
    """

    #: encoder levels with an SRM at their input
    spatial_levels: tuple[int, ...] = (1, 2, 3)

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        dim: int = 42,
        num_blocks: Sequence[int] = (5, 7, 7, 9),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        layer_norm_bias: bool = True,
        residual: bool = True,
        atom_num: int = 32,
        atom_dim: int = 256,
        num_experts: int = 4,
        top_k: int = 2,
        moe_combine: str = "log",
        moe_noise_eps: float = 0.01,
        moe_dispatch: str = "auto",
        channels_last: bool = True,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            dim=dim,
            num_blocks=num_blocks,
            num_refinement_blocks=num_refinement_blocks,
            heads=heads,
            ffn_expansion_factor=ffn_expansion_factor,
            bias=bias,
            layer_norm_bias=layer_norm_bias,
            residual=residual,
            channels_last=channels_last,
            activation_checkpointing=activation_checkpointing,
        )
        widths = [dim * 2**level for level in range(NUM_LEVELS)]
        moe_kwargs: dict[str, Any] = dict(
            mlp_ratio=ffn_expansion_factor,
            num_experts=num_experts,
            top_k=top_k,
            combine=moe_combine,
            noise_eps=moe_noise_eps,
            dispatch=moe_dispatch,
        )
        self.dict_generator = InstructionGenerator(in_channels, atom_num=atom_num, atom_dim=atom_dim)
        self.spatial_routing_encoder_level1 = SpatialRouting(widths[0], atom_dim, **moe_kwargs)
        self.spatial_routing_encoder_level2 = SpatialRouting(widths[1], atom_dim, **moe_kwargs)
        self.spatial_routing_encoder_level3 = SpatialRouting(widths[2], atom_dim, **moe_kwargs)
        self.channel_routing_latent = ChannelRouting(widths[3], atom_dim)
        self.channel_routing_decoder_level3 = ChannelRouting(widths[2], atom_dim)
        self.channel_routing_decoder_level2 = ChannelRouting(widths[1], atom_dim)
        self.channel_routing_decoder_level1 = ChannelRouting(widths[1], atom_dim)  # after the skip concat

        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_routing: list[torch.Tensor] = []
        self.last_instruction: torch.Tensor | None = None

    def _route_encoder(self, level: int, x: torch.Tensor, context: Any) -> torch.Tensor:
        srm = {
            1: self.spatial_routing_encoder_level1,
            2: self.spatial_routing_encoder_level2,
            3: self.spatial_routing_encoder_level3,
        }[level]
        x, balance, top1 = srm(x, context.instruction)
        context.losses.append(balance)
        context.top1.append(top1)
        return x

    def _route_decoder(self, level: int, x: torch.Tensor, context: Any) -> torch.Tensor:
        crm = {
            4: self.channel_routing_latent,
            3: self.channel_routing_decoder_level3,
            2: self.channel_routing_decoder_level2,
            1: self.channel_routing_decoder_level1,
        }[level]
        return crm(x, context.instruction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore ``x`` (B, in_channels, H, W); also sets ``aux_loss``, ``last_routing``, ``last_instruction``."""
        self._check_input(x)
        record = _RoutingRecord(self.dict_generator(x))
        padded, size = pad_to_multiple(x, self.size_multiple)
        out = self._finish(self._restore(padded, record), x, size)

        self.aux_loss = torch.stack(record.losses).sum()
        self.last_instruction = record.instruction.detach()
        self.last_routing = [
            top1[:, : -(-size[0] // 2**i), : -(-size[1] // 2**i)].detach() for i, top1 in enumerate(record.top1)
        ]
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Copy/pickle support: ``aux_loss`` of a training forward is a graph node, keep only its value."""
        state = self.__dict__.copy()
        state["aux_loss"] = self.aux_loss.detach()
        return state

    @staticmethod
    def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Authors' AMIR key names -> ours (idempotent; drops their constant N(0,1) MoE buffers)."""
        return rename_state_dict(state_dict, TRANSFORMER_BLOCK_KEY_RULES + _AMIR_KEY_RULES)

    def to_official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's state dict under the authors' key names (their MoE buffers included)."""
        out = rename_state_dict(self.state_dict(), TRANSFORMER_BLOCK_KEY_RULES + _AMIR_KEY_RULES, reverse=True)
        for level in self.spatial_levels:
            out.update(_normal_buffers(self.dict_generator.dictionary, f"spatial_routing_encoder_level{level}.moe."))
        return out
