"""DiffCode: the full restoration pipeline (stage III) built on the stage-I codebook bank and the stage-II diffusion.

Chen et al., "All-in-One Medical Image Restoration with Latent Diffusion-Enhanced Vector-Quantized Codebook
Prior", MICCAI 2025 (https://arxiv.org/abs/2507.19874), Fig. 1. For an LQ image ``y``:

1. the task classifier reads ``y`` and gives the global gating vector ``V`` (softmax over the experts); the
   task index ``k`` of the codebook is the one given by the caller (``task`` argument or the
   :attr:`DiffCode.task` attribute);
2. stage II estimates the HQ latent ``z_hat`` from ``y`` (reverse diffusion from noise);
3. ``z_hat`` is re-quantised with codebook ``k`` (residual quantisation) and decoded by the stage-I decoder
   into the prior image ``x_p``;
4. the routed NAF backbone restores ``cat(y, x_p)``, every routing module gated by ``V`` (Eq. 8); the output is
   added to ``y`` (global residual). Stage III trains with ``L1(restored, x)`` alone (Eq. 7).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..blocks import crop_to_size, pad_to_multiple
from .codebook import DiffCodeAutoencoder, as_task_tensor
from .diffusion import LatentDiffusion
from .restoration import RoutedNAFNet, TaskClassifier

__all__ = ["DiffCode"]


def _build(kind: type, given: Any, defaults: dict[str, Any], where: str) -> Any:
    """An instance of ``kind``: ``given`` itself, or ``kind(**defaults, **given)`` for a mapping / ``None``."""
    if isinstance(given, kind):
        return given
    if given is None:
        return kind(**defaults)
    if isinstance(given, Mapping):
        return kind(**{**defaults, **given})
    raise TypeError(
        f"DiffCode: {where} must be a {kind.__name__}, a mapping of its arguments or None, "
        f"got {type(given).__name__}."
    )


class DiffCode(nn.Module):
    """DiffCode stage III pipeline: ``forward(lq, task=None) -> restored`` (same shape as ``lq``).

    The stage-I autoencoder (:attr:`autoencoder`) and stage-II diffusion (:attr:`diffusion`) are sub-modules;
    load their trained weights with :meth:`load_prior` (or a full DiffCode state dict). With ``freeze_prior``
    (default) they get no gradient, run without autograd and stay in eval mode, so a stage-III run trains the
    backbone and the task classifier only.

    Which codebook an image uses: ``task`` (int, sequence or ``[B]`` tensor of registry indices) if given, else
    the :attr:`task` attribute (e.g. ``model.task = 1`` before a ``SlidingWindowInferer`` run, so that every
    window of a volume uses the same codebook); one of them is required. Training passes the true task (MONAI
    trainers: return it in the ``kwargs`` of ``prepare_batch``). The routing is gated by the classifier's ``V`` in
    training and inference alike; the classifier has no loss of its own and learns through ``V`` from the L1.

    After every forward the model keeps (overwritten by the next forward; Python attributes, not exported):
    ``last_gate`` ``[B, num_experts]`` (``V``), ``last_task`` ``[B]`` (the codebooks used), ``last_prior``
    ``[B, 1, H, W]`` (decoded prior) and ``last_routing`` (one ``[B]`` int64 tensor of top-1 experts per routing
    module), all detached.

    Args:
        in_channels: image channels (the output has as many).
        num_tasks: tasks (codebooks).
        autoencoder: stage-I :class:`DiffCodeAutoencoder`, or a mapping of its arguments (``in_channels`` and
            ``num_tasks`` default to the above), or ``None`` for the paper configuration.
        diffusion: stage-II :class:`LatentDiffusion`, a mapping of its arguments, or ``None``; the defaults take
            ``embedding_dim`` and the encoder levels from the autoencoder.
        channels, num_blocks: backbone widths and NAF blocks of encoder levels 1-3 and the latent level.
        num_experts, top_k, expert_dispatch, expert_expand, routing_levels: routing modules, see
            :class:`RoutedNAFNet` / :class:`TaskGlobalRouting`.
        classifier_channels: conv widths of the :class:`TaskClassifier`.
        freeze_prior: keep stage I and II fixed (see above).
        residual: add the LQ input to the backbone output.
        sample_seed: if set, every forward draws the diffusion's starting noise from a generator seeded with it
            (deterministic outputs); ``None`` uses the global RNG as the paper does.
        task: initial value of the :attr:`task` attribute (registry index; a traced or exported model keeps it as
            its codebook).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_tasks: int = 3,
        autoencoder: DiffCodeAutoencoder | Mapping[str, Any] | None = None,
        diffusion: LatentDiffusion | Mapping[str, Any] | None = None,
        channels: Sequence[int] = (64, 128, 256, 256),
        num_blocks: Sequence[int] = (2, 2, 4, 4),
        num_experts: int = 4,
        top_k: int = 1,
        expert_dispatch: str = "sparse",
        expert_expand: int = 2,
        routing_levels: Sequence[str] = ("encoder1", "encoder2", "encoder3", "latent"),
        classifier_channels: Sequence[int] = (32, 64, 128),
        freeze_prior: bool = True,
        residual: bool = True,
        sample_seed: int | None = None,
        task: int | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_tasks < 1:
            raise ValueError(f"DiffCode: in_channels and num_tasks must be >= 1, got {in_channels}, {num_tasks}.")
        self.in_channels = in_channels
        self.num_tasks = num_tasks
        self.autoencoder: DiffCodeAutoencoder = _build(
            DiffCodeAutoencoder, autoencoder, {"in_channels": in_channels, "num_tasks": num_tasks}, "autoencoder"
        )
        ae = self.autoencoder
        encoder_layout = {"channels": ae.encoder.channels, "num_blocks": ae.encoder.num_blocks}
        self.diffusion: LatentDiffusion = _build(
            LatentDiffusion,
            diffusion,
            {"in_channels": in_channels, "embedding_dim": ae.embedding_dim, **encoder_layout},
            "diffusion",
        )
        self._check_stages()
        self.task_classifier = TaskClassifier(in_channels, num_experts, classifier_channels)
        self.backbone = RoutedNAFNet(
            in_channels=2 * in_channels,
            out_channels=in_channels,
            channels=channels,
            num_blocks=num_blocks,
            num_experts=num_experts,
            top_k=top_k,
            dispatch=expert_dispatch,
            expert_expand=expert_expand,
            routing_levels=routing_levels,
        )
        self.size_multiple = math.lcm(ae.downsample_factor, RoutedNAFNet.size_multiple)
        self.freeze_prior = freeze_prior
        self.residual = residual
        self.sample_seed = sample_seed
        if task is not None and not 0 <= int(task) < num_tasks:
            raise ValueError(f"DiffCode: task must be a registry index in 0..{num_tasks - 1}, got {task}.")
        #: task index (codebook) of every forward without a ``task`` argument
        self.task: int | None = None if task is None else int(task)
        if freeze_prior:
            for module in (self.autoencoder, self.diffusion):
                module.requires_grad_(False)
                module.eval()

        self.last_gate: torch.Tensor | None = None
        self.last_task: torch.Tensor | None = None
        self.last_prior: torch.Tensor | None = None
        self.last_routing: list[torch.Tensor] = []

    def _check_stages(self) -> None:
        ae, df = self.autoencoder, self.diffusion
        problems = []
        if ae.in_channels != self.in_channels or df.in_channels != self.in_channels:
            problems.append(
                f"in_channels (model {self.in_channels}, stage I {ae.in_channels}, stage II {df.in_channels})"
            )
        if ae.num_tasks != self.num_tasks:
            problems.append(f"num_tasks (model {self.num_tasks}, stage I {ae.num_tasks})")
        if ae.embedding_dim != df.embedding_dim:
            problems.append(f"embedding_dim (stage I {ae.embedding_dim}, stage II {df.embedding_dim})")
        if ae.downsample_factor != df.downsample_factor:
            problems.append(f"latent down-sampling (stage I {ae.downsample_factor}, stage II {df.downsample_factor})")
        if problems:
            raise ValueError("DiffCode: the stages disagree on " + "; ".join(problems) + ".")

    def train(self, mode: bool = True) -> DiffCode:
        """As ``nn.Module.train``; a frozen prior (stage I and II) stays in eval mode."""
        super().train(mode)
        if self.freeze_prior:
            self.autoencoder.eval()
            self.diffusion.eval()
        return self

    def load_prior(
        self,
        autoencoder_state: Mapping[str, torch.Tensor] | None = None,
        diffusion_state: Mapping[str, torch.Tensor] | None = None,
        strict: bool = True,
    ) -> None:
        """Load trained stage-I and/or stage-II state dicts (as saved from the stage modules themselves)."""
        if autoencoder_state is not None:
            self.autoencoder.load_state_dict(autoencoder_state, strict=strict)
        if diffusion_state is not None:
            self.diffusion.load_state_dict(diffusion_state, strict=strict)

    # -- pipeline pieces ------------------------------------------------------------------------------------
    def resolve_task(self, task: Any, batch: int, device: torch.device) -> torch.Tensor:
        """Task index per sample ``[B]``: the ``task`` argument, else the :attr:`task` attribute."""
        given = task if task is not None else self.task
        if given is None:
            raise ValueError(
                "DiffCode.forward: which task codebook? pass task= (registry index per sample) or set model.task"
            )
        return as_task_tensor(given, batch, self.num_tasks, device, "DiffCode.forward")

    def prior(self, lq: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Decoded codebook prior ``[B, C_in, H, W]`` of an LQ image (H, W multiples of :attr:`size_multiple`):
        stage-II estimate, re-quantised with each sample's task codebook, stage-I decoder."""
        generator = None
        if self.sample_seed is not None and not torch.jit.is_tracing():
            generator = torch.Generator(device=lq.device).manual_seed(int(self.sample_seed))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_prior):
            z_hat = self.diffusion.sample(lq, generator=generator)
            z_q, _, _ = self.autoencoder.quantize(z_hat, task)
            return self.autoencoder.decode(z_q)

    def forward(self, lq: torch.Tensor, task: int | Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Restore ``lq`` ``[B, in_channels, H, W]`` (any H, W: padded to :attr:`size_multiple`, cropped back)."""
        if not torch.jit.is_tracing() and (lq.ndim != 4 or lq.shape[1] != self.in_channels):
            raise ValueError(f"DiffCode.forward: lq must be (B, {self.in_channels}, H, W), got {tuple(lq.shape)}.")
        gate = torch.softmax(self.task_classifier(lq), dim=1)  # V: [B, num_experts], one per image
        task_idx = self.resolve_task(task, lq.shape[0], lq.device)
        padded, size = pad_to_multiple(lq, self.size_multiple)
        prior = self.prior(padded, task_idx)
        restored, choices = self.backbone(torch.cat([padded, prior], dim=1), gate)
        if self.residual:
            restored = restored + padded
        self.last_gate = gate.detach()
        self.last_task = task_idx.detach()
        self.last_prior = crop_to_size(prior, size).detach()
        self.last_routing = [c.detach() for c in choices]
        return crop_to_size(restored, size)
