"""DiffCode (Chen et al., MICCAI 2025, https://arxiv.org/abs/2507.19874): codebook prior + latent diffusion.

Three stages, each its own training run (docs/design.md, section 4):

* stage I, :class:`DiffCodeAutoencoder`: VQ autoencoder on HQ images (:class:`NAFEncoder` / :class:`NAFDecoder`,
  the paper's [2, 2, 4, 4] NAF blocks of [64, 128, 256, 256] channels) with a :class:`TaskCodebookBank` (one
  residual-quantisation codebook per task); ``forward(hq, task) -> (recon, vq_loss, indices)``;
* stage II, :class:`LatentDiffusion`: LQ condition encoder (a :class:`NAFEncoder`) + :class:`LatentDenoiser` (5 linear layers over the
  latent tokens), ``T = 8``; ``forward(lq, z_hq) -> {"loss", "z_hat"}``, ``sample(lq) -> z_hat``;
* stage III, :class:`DiffCode`: the full pipeline, ``forward(lq, task) -> restored``, with the
  :class:`RoutedNAFNet` backbone (NAF blocks + :class:`TaskGlobalRouting`) gated by one global vector from a
  :class:`TaskClassifier`.

The paper has no public code; ``bundles/diffcode/docs/README.md`` lists every reading of it we had to choose.
"""

from .codebook import DiffCodeAutoencoder, TaskCodebookBank, codebook_perplexity, residual_quantize
from .diffusion import LatentDenoiser, LatentDiffusion
from .model import DiffCode
from .naf import NAFDecoder, NAFEncoder
from .restoration import NAFBlock, RoutedNAFNet, TaskClassifier, TaskGlobalRouting
from .stages import CodebookReconstruction, DecodedPrior

__all__ = [
    "DiffCode",
    "DiffCodeAutoencoder",
    "TaskCodebookBank",
    "LatentDiffusion",
    "LatentDenoiser",
    "RoutedNAFNet",
    "TaskGlobalRouting",
    "TaskClassifier",
    "NAFBlock",
    "NAFEncoder",
    "NAFDecoder",
    "residual_quantize",
    "codebook_perplexity",
    "CodebookReconstruction",
    "DecodedPrior",
]
