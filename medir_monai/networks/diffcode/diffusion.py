"""DiffCode stage II: latent diffusion that estimates the HQ latent from the LQ image.

Chen et al., DiffCode, MICCAI 2025 (https://arxiv.org/abs/2507.19874), stage II, in the style of DiffIR
(Xia et al., ICCV 2023): a short diffusion chain (``T = 8``) over the stage-I latent tokens, conditioned on an
encoding of the LQ image, trained jointly with the condition encoder by ``L1(z, z_hat)`` where ``z = E(HQ)`` is
the frozen stage-I encoder's latent and ``z_hat`` the output of the whole reverse chain. The estimate is then
re-quantised with the task's codebook (done by :class:`~medir_monai.networks.diffcode.DiffCode`).

Schedule (0-based steps ``t = 0..T-1``, as in :class:`monai.networks.schedulers.DDPMScheduler`):
``beta_t`` linear from 0.1 to 0.99, ``alpha_t = 1 - beta_t``, ``alphabar_t = prod_{s<=t} alpha_s``
(``alphabar_{-1} = 1``), forward process ``q(z_t | z) = N(sqrt(alphabar_t) z, (1 - alphabar_t) I)``.

Reverse step (the paper's eq. 5, the DDPM posterior; ``c`` is the LQ condition, ``u ~ N(0, I)``)::

    z_{t-1} = mu_t + sigma_t * u
    eps form:  mu_t = 1/sqrt(alpha_t) * (z_t - (1 - alpha_t)/sqrt(1 - alphabar_t) * eps_theta(z_t, c, t))
    x0 form:   mu_t = sqrt(alphabar_{t-1}) beta_t/(1 - alphabar_t) * x0_theta(z_t, c, t)
                      + sqrt(alpha_t) (1 - alphabar_{t-1})/(1 - alphabar_t) * z_t
    sigma_t^2 = (1 - alphabar_{t-1})/(1 - alphabar_t) * beta_t

Substituting ``x0 = (z_t - sqrt(1 - alphabar_t) eps)/sqrt(alphabar_t)`` turns the x0 form into the eps form, so
both are eq. 5; they differ in what the network predicts. Default: the x0 form without the noise term
(``prediction_type="sample"``, ``stochastic=False``), as DiffIR's code does, because (i) with ``beta`` up to 0.99,
``alphabar_{T-1} ~ 3.3e-5`` and the eps form multiplies the network's error by ``1/sqrt(alphabar_t)`` (up to
~174) on the way to ``z_hat``, which destabilises training through the whole chain with an L1 loss on its end,
while the x0 coefficients are at most 1; (ii) the target is one deterministic latent per image, so ``sigma_t u``
only adds variance; (iii) at ``t = 0`` the x0 form returns ``x0_theta`` exactly. ``prediction_type="epsilon"``
and ``stochastic=True`` give the textbook DDPM sampler (identical to ``DDPMScheduler.step`` with
``clip_sample=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler

from .naf import NAFEncoder

__all__ = ["LatentDenoiser", "LatentDiffusion"]

#: what the denoiser predicts (names of :class:`monai.networks.schedulers.ddpm.DDPMPredictionType`)
PREDICTION_TYPES = ("sample", "epsilon")


class LatentDenoiser(nn.Module):
    """Denoiser of ``num_layers`` linear layers applied to every latent token (DiffCode stage II).

    Each token's input is ``cat(z_t, c, t / T)`` (``2C + 1`` features: the noisy token, the LQ condition token at
    the same position, the normalised step); layers ``Linear(2C+1 -> H)``, ``(num_layers - 2) x Linear(H -> H)``,
    ``Linear(H -> C)`` with LeakyReLU between them and none after the last (the output is a latent or a noise,
    both signed).

    Args:
        embedding_dim: token channels ``C``.
        hidden_dim: width ``H`` of the hidden layers.
        num_layers: linear layers in total (5 in the paper), >= 2.
        num_train_timesteps: ``T``, to normalise the step index.
        negative_slope: LeakyReLU slope (DiffIR: 0.1).
    """

    def __init__(
        self,
        embedding_dim: int = 256,
        hidden_dim: int = 256,
        num_layers: int = 5,
        num_train_timesteps: int = 8,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"LatentDenoiser: num_layers must be >= 2, got {num_layers}.")
        if embedding_dim < 1 or hidden_dim < 1 or num_train_timesteps < 1:
            raise ValueError(
                "LatentDenoiser: embedding_dim, hidden_dim and num_train_timesteps must be >= 1, got "
                f"{embedding_dim}, {hidden_dim}, {num_train_timesteps}."
            )
        self.embedding_dim = embedding_dim
        self.num_train_timesteps = num_train_timesteps
        widths = [2 * embedding_dim + 1] + [hidden_dim] * (num_layers - 1) + [embedding_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.LeakyReLU(negative_slope))
        self.layers = nn.Sequential(*layers)

    def forward(self, z_t: torch.Tensor, condition: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``z_t``, ``condition`` ``[B, C, h, w]``, ``t`` ``[B]`` step indices -> ``[B, C, h, w]``."""
        b, c, h, w = z_t.shape
        step = (t.to(z_t.dtype) / self.num_train_timesteps).view(b, 1, 1, 1).expand(b, h, w, 1)
        tokens = torch.cat([z_t.permute(0, 2, 3, 1), condition.permute(0, 2, 3, 1), step], dim=-1)  # [B,h,w,2C+1]
        return self.layers(tokens).permute(0, 3, 1, 2)


class LatentDiffusion(nn.Module):
    """DiffCode stage II: LQ condition encoder + :class:`LatentDenoiser` + a ``T``-step DDPM schedule.

    * ``forward(lq, z_hq) -> {"loss", "z_hat"}`` (training and validation): ``z_T ~ q(z_T | z_hq)``, the whole
      reverse chain with gradient, ``loss = L1(z_hat, z_hq)``. A stage-II training step:
      ``z = stage1.encode(hq)`` under ``torch.no_grad()`` (frozen stage I), ``loss = stage2(lq, z)["loss"]``.
    * ``sample(lq) -> z_hat``: the reverse chain from ``z_T ~ N(0, I)`` (inference; no HQ needed).

    Starting training chains from ``q(z_T | z_hq)`` follows DiffIR; with the paper's schedule
    ``sqrt(alphabar_{T-1}) ~ 0.006``, so it is practically the pure noise that inference starts from.

    The condition encoder is a :class:`~medir_monai.networks.diffcode.naf.NAFEncoder` (the paper's NAF-block
    encoder, own weights) with the stage-I encoder's levels, so its output tokens sit on the latent grid.

    Args:
        in_channels: LQ image channels.
        embedding_dim: latent channels ``C`` (stage I's ``embedding_dim``).
        channels, num_blocks: condition encoder levels, as
            :class:`~medir_monai.networks.diffcode.DiffCodeAutoencoder` (use the same number of levels).
        hidden_dim, num_layers, negative_slope: see :class:`LatentDenoiser`.
        num_train_timesteps: ``T`` (8).
        beta_start, beta_end: end points of the beta schedule (0.1, 0.99).
        schedule: a :data:`monai.networks.schedulers.NoiseSchedules` name; ``"linear_beta"`` (default, the
            paper's "linear") or ``"scaled_linear_beta"`` (what latent-diffusion code, DiffIR's included, calls
            "linear": linear in ``sqrt(beta)``).
        prediction_type: ``"sample"`` (x0, default) or ``"epsilon"``, see the module docstring.
        stochastic: add ``sigma_t u`` in the reverse steps (default off).
    """

    def __init__(
        self,
        in_channels: int = 1,
        embedding_dim: int = 256,
        channels: Sequence[int] = (64, 128, 256, 256),
        num_blocks: Sequence[int] = (2, 2, 4, 4),
        hidden_dim: int = 256,
        num_layers: int = 5,
        negative_slope: float = 0.1,
        num_train_timesteps: int = 8,
        beta_start: float = 0.1,
        beta_end: float = 0.99,
        schedule: str = "linear_beta",
        prediction_type: str = "sample",
        stochastic: bool = False,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"LatentDiffusion: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}."
            )
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"LatentDiffusion: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}.")
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.stochastic = stochastic
        self.condition_encoder = NAFEncoder(in_channels, embedding_dim, channels, num_blocks)
        self.downsample_factor = self.condition_encoder.downsample_factor
        self.denoiser = LatentDenoiser(embedding_dim, hidden_dim, num_layers, num_train_timesteps, negative_slope)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            schedule=schedule,
            clip_sample=False,
            prediction_type=prediction_type,
            beta_start=beta_start,
            beta_end=beta_end,
        )
        self._register_coefficients()

    def _register_coefficients(self) -> None:
        """Per-step constants of eq. 5 as (non-persistent) buffers, computed in float64 from the scheduler."""
        betas = self.scheduler.betas.double()
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        coefficients = {
            "sqrt_abar": abar.sqrt(),  # forward process mean
            "sqrt_one_minus_abar": (1.0 - abar).sqrt(),
            "x0_coef": abar_prev.sqrt() * betas / (1.0 - abar),  # posterior mean, x0 form
            "xt_coef": alphas.sqrt() * (1.0 - abar_prev) / (1.0 - abar),
            "eps_scale": 1.0 / alphas.sqrt(),  # posterior mean, eps form
            "eps_coef": betas / (1.0 - abar).sqrt(),
            "sigma": ((1.0 - abar_prev) / (1.0 - abar) * betas).sqrt(),
        }
        for name, value in coefficients.items():
            self.register_buffer(name, value.float(), persistent=False)

    # -- diffusion maths ------------------------------------------------------------------------------------
    def condition(self, lq: torch.Tensor) -> torch.Tensor:
        """LQ condition tokens ``[B, 1, H, W] -> [B, C, H/f, W/f]`` (H, W multiples of ``f``)."""
        if not torch.jit.is_tracing():
            if lq.ndim != 4 or lq.shape[1] != self.in_channels:
                raise ValueError(f"LatentDiffusion: lq must be (B, {self.in_channels}, H, W), got {tuple(lq.shape)}.")
            if lq.shape[-2] % self.downsample_factor or lq.shape[-1] % self.downsample_factor:
                raise ValueError(
                    f"LatentDiffusion: lq height and width must be multiples of {self.downsample_factor}, "
                    f"got {tuple(lq.shape[-2:])}."
                )
        return self.condition_encoder(lq)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Forward process ``z_t = sqrt(alphabar_t) z0 + sqrt(1 - alphabar_t) noise``."""
        return self.sqrt_abar[t] * z0 + self.sqrt_one_minus_abar[t] * noise

    def reverse_step(
        self, model_output: torch.Tensor, t: int, z_t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One reverse step of eq. 5 (module docstring): ``z_{t-1}`` from ``z_t`` and the denoiser's output.

        ``model_output`` is ``x0_theta`` or ``eps_theta`` (``prediction_type``); ``noise`` is ``u``, added as
        ``sigma_t u`` when given and ``t > 0`` (``sigma_0 = 0``).
        """
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"LatentDiffusion.reverse_step: t must be in 0..{self.num_train_timesteps - 1}, got {t}.")
        if self.prediction_type == "epsilon":
            mean = self.eps_scale[t] * (z_t - self.eps_coef[t] * model_output)
        else:
            mean = self.x0_coef[t] * model_output + self.xt_coef[t] * z_t
        if noise is not None and t > 0:
            mean = mean + self.sigma[t] * noise
        return mean

    def reverse_chain(
        self, z_start: torch.Tensor, condition: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Run steps ``T-1 .. 0`` from ``z_start`` (``z_{T-1}``) given the condition; returns ``z_hat``."""
        z = z_start
        b = z.shape[0]
        for t in reversed(range(self.num_train_timesteps)):
            steps = torch.full((b,), t, device=z.device, dtype=torch.long)
            out = self.denoiser(z, condition, steps)
            noise = None
            if self.stochastic and t > 0:
                noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = self.reverse_step(out, t, z, noise)
        return z

    # -- public entry points -------------------------------------------------------------------------------
    def sample(self, lq: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Estimated HQ latent ``z_hat`` ``[B, C, H/f, W/f]`` of an LQ image, from ``z_{T-1} ~ N(0, I)``."""
        cond = self.condition(lq)
        start = torch.randn(cond.shape, generator=generator, device=cond.device, dtype=cond.dtype)
        return self.reverse_chain(start, cond, generator)

    def forward(self, lq: torch.Tensor, z_hq: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training objective: ``{"loss": L1(z_hat, z_hq), "z_hat": z_hat}`` (chain from ``q(z_{T-1} | z_hq)``)."""
        cond = self.condition(lq)
        if not torch.jit.is_tracing() and z_hq.shape != cond.shape:
            raise ValueError(
                f"LatentDiffusion.forward: z_hq must be {tuple(cond.shape)} (the latent grid of lq), "
                f"got {tuple(z_hq.shape)}."
            )
        z_start = self.add_noise(z_hq, torch.randn_like(z_hq), self.num_train_timesteps - 1)
        z_hat = self.reverse_chain(z_start, cond)
        return {"loss": F.l1_loss(z_hat, z_hq), "z_hat": z_hat}
