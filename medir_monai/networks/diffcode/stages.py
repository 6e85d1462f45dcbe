"""DiffCode's stage networks as MONAI's engines and inferers see them: one image out of ``forward``.

* :class:`CodebookReconstruction` (stage I): ``forward(hq, task) -> recon``, the quantiser loss left on
  ``aux_loss`` for :class:`~medir_monai.losses.CodebookStageLoss`;
* :class:`DecodedPrior` (stage-II validation): ``forward(lq, task) -> prior``, the latent estimate re-quantised and
  decoded, so the prior is scored in image space against HQ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..blocks import crop_to_size, pad_to_multiple

__all__ = ["CodebookReconstruction", "DecodedPrior"]


class CodebookReconstruction(nn.Module):
    """Stage-I view of a :class:`~medir_monai.networks.diffcode.DiffCodeAutoencoder`: ``forward(hq, task) -> recon``.

    The quantiser loss of the last forward is kept on :attr:`aux_loss` (with gradient) and its two terms on
    :attr:`last_terms`, which is how :class:`CodebookStageLoss` reads them; the image output is what MONAI's
    inferers, metrics and image handlers expect.
    """

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, hq: torch.Tensor, task: torch.Tensor | int | Sequence[int]) -> torch.Tensor:
        recon, vq_loss, _ = self.autoencoder(hq, task)
        self.aux_loss = vq_loss
        self.last_terms = dict(getattr(self.autoencoder.quantizer, "last_terms", {}))
        return recon


class DecodedPrior(nn.Module):
    """The codebook prior of an LQ image as an image: stage II's estimate, re-quantised with the task's codebook
    and decoded by stage I (what stage III receives next to the LQ input).

    ``forward(lq, task) -> prior`` ``[B, 1, H, W]`` (any size: padded to the latent grid and cropped back). Used to
    validate stage II in image space. Both stages stay in eval mode here.

    Args:
        autoencoder: stage-I :class:`~medir_monai.networks.diffcode.DiffCodeAutoencoder`.
        diffusion: stage-II :class:`~medir_monai.networks.diffcode.LatentDiffusion`.
        sample_seed: seed of the reverse chain's starting noise (deterministic validation); ``None``: global RNG.
    """

    def __init__(self, autoencoder: nn.Module, diffusion: nn.Module, sample_seed: int | None = 0):
        super().__init__()
        self.autoencoder = autoencoder
        self.diffusion = diffusion
        self.sample_seed = sample_seed

    def forward(self, lq: torch.Tensor, task: torch.Tensor | int | Sequence[int]) -> torch.Tensor:
        padded, size = pad_to_multiple(lq, int(self.autoencoder.downsample_factor))
        generator = None
        if self.sample_seed is not None:
            generator = torch.Generator(device=lq.device).manual_seed(int(self.sample_seed))
        z_hat = self.diffusion.sample(padded, generator=generator)
        z_q, _, _ = self.autoencoder.quantize(z_hat, task)
        return crop_to_size(self.autoencoder.decode(z_q), size)
