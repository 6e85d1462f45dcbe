"""DiffCode stage I: VQ autoencoder on HQ images with a task-adaptive codebook bank (residual quantisation).

Chen et al., "All-in-One Medical Image Restoration with Latent Diffusion-Enhanced Vector-Quantized Codebook
Prior" (DiffCode), MICCAI 2025 (https://arxiv.org/abs/2507.19874), stage I. The paper releases no code; this is
our reading of it (every choice is listed in ``bundles/diffcode/docs/README.md``):

* an encoder ``E`` maps an HQ image to a grid of latent tokens ``z = E(x)`` (``[B, C, H/f, W/f]``);
* each task ``k`` owns a codebook ``B_k`` of ``num_embeddings`` codes of ``embedding_dim`` channels (the
  "codebook bank"); a token of an image of task ``k`` is quantised with ``B_k`` only;
* quantisation is residual (RQ-VAE, Lee et al., CVPR 2022): ``r_0 = z``, and for ``d = 1..D``
  ``c_d = argmin_{e in B_k} ||r_{d-1} - e||_2``, ``r_d = r_{d-1} - c_d``; the quantised token is
  ``z_q = sum_d c_d``. By default the ``D`` levels share the task's codebook (the paper gives one codebook per
  task); ``shared_codebook=False`` gives each level its own;
* the decoder ``G`` sees ``z + sg[z_q - z]`` (straight-through estimator, van den Oord et al. 2017), so the
  reconstruction gradient reaches the encoder unchanged;
* loss ``L = L1(G(z_q), x) + ||sg[z] - z_q||^2 + beta ||z - sg[z_q]||^2`` with ``beta = 0.25``; the two
  squared norms are means over elements (as in :class:`monai.networks.layers.vector_quantizer.EMAQuantizer`).

The encoder and decoder are the paper's NAF-block ones (:class:`~medir_monai.networks.diffcode.naf.NAFEncoder` /
``NAFDecoder``: [2, 2, 4, 4] blocks, [64, 128, 256, 256] channels). MONAI's VQ-VAE quantiser is not reused: it
learns its codebook by exponential moving averages and has a single codebook, while the paper trains the codebooks
by gradient (the ``||sg[z] - z_q||^2`` term) and needs one per task and residual levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from ..blocks import crop_to_size, pad_to_multiple
from .naf import NAFDecoder, NAFEncoder

__all__ = ["TaskCodebookBank", "DiffCodeAutoencoder", "residual_quantize", "codebook_perplexity", "as_task_tensor"]

#: loss variants of :class:`TaskCodebookBank` (``depth_loss``)
DEPTH_LOSS_MODES = ("final", "cumulative")
#: codebook initialisations of :class:`TaskCodebookBank`
CODEBOOK_INITS = ("uniform", "normal")


def as_task_tensor(
    task: int | Sequence[int] | torch.Tensor, batch: int, num_tasks: int, device: torch.device, where: str
) -> torch.Tensor:
    """Task index per sample as an int64 tensor ``[batch]`` (an int or 0-dim tensor is broadcast).

    Raises ``ValueError`` naming ``where`` for a wrong length or an index outside ``0..num_tasks-1``.
    """
    if torch.jit.is_tracing() and isinstance(task, torch.Tensor):
        return task.long().reshape(-1).expand(batch)  # traced graphs keep the data flow; checks run eagerly
    t = task.to(device) if isinstance(task, torch.Tensor) else torch.as_tensor(task, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{where}: task must hold integer indices, got dtype {t.dtype}.")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{where}: task must have one entry per sample ({batch}), got {t.numel()}.")
    if not torch.jit.is_tracing() and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_tasks):
        raise ValueError(f"{where}: task indices must be in 0..{num_tasks - 1}, got {t.tolist()}.")
    return t


@torch.no_grad()
def residual_quantize(
    tokens: torch.Tensor, books: torch.Tensor, depth: int, shared: bool | None = None
) -> torch.Tensor:
    """Greedy residual quantisation: the code index chosen at every level, ``[B, N, depth]`` int64.

    Level ``d`` picks, for each token, the code nearest (L2) to what the previous levels left,
    ``r_{d-1} = tokens - sum_{j<d} c_j``. Only indices are returned (no gradient): the caller gathers the codes
    with gradient from the codebook.

    Args:
        tokens: ``[B, N, C]`` tokens to quantise (sample ``b`` uses ``books[b]``).
        books: ``[B, S, K, C]`` codebooks per sample; ``S == 1`` (shared by all levels) or ``S == depth``.
        depth: number of residual levels ``D``.
        shared: whether ``S == 1``; ``None`` reads it from the shape (pass it when tracing, so that the graph
            does not branch on a shape).
    """
    if shared is None:
        shared = books.shape[1] == 1
    if not shared and books.shape[1] < depth:
        raise ValueError(f"residual_quantize: need one codebook per level ({depth}), got {books.shape[1]}.")
    residual = tokens.float()
    books = books.float()
    sq_norms = (books**2).sum(-1)  # [B, S, K]
    chosen = []
    for level in range(depth):
        s = 0 if shared else level
        book = books[:, s]  # [B, K, C]
        # ||r - e||^2 = ||r||^2 - 2 r.e + ||e||^2; the first term does not change the argmin
        dist = torch.baddbmm(sq_norms[:, s].unsqueeze(1), residual, book.transpose(1, 2), alpha=-2.0)  # [B, N, K]
        idx = dist.argmin(dim=-1)  # [B, N]
        residual = residual - torch.gather(book, 1, idx.unsqueeze(-1).expand(-1, -1, book.shape[-1]))
        chosen.append(idx)
    return torch.stack(chosen, dim=-1)


def codebook_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """Perplexity ``exp(H(p))`` of code-usage counts ``[..., K]`` (``p = counts / sum``); 0 where nothing was counted.

    A perplexity equal to ``K`` means uniform usage; the number of codes in use bounds it from above.
    """
    counts = counts.double()
    total = counts.sum(-1, keepdim=True)
    p = counts / total.clamp_min(1.0)
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), torch.zeros_like(entropy))


class TaskCodebookBank(nn.Module):
    """The task-adaptive codebook bank: one residual-quantisation codebook per task (DiffCode stage I).

    Args:
        num_tasks: number of codebooks (tasks are integer indices ``0..num_tasks-1``).
        num_embeddings: codes per codebook ``K`` (8192 in the paper).
        embedding_dim: channels of a code and of the latent tokens ``C`` (256 in the paper).
        depth: residual quantisation levels ``D`` (8 in the paper).
        commitment_cost: ``beta`` of the commitment term (0.25).
        shared_codebook: the ``D`` levels use the task's single codebook (default, "one codebook per task") or
            one codebook per level (``D`` times the parameters).
        depth_loss: ``"final"`` (default, the paper's formula on the final ``z_q``) or ``"cumulative"``
            (RQ-VAE: both squared terms are summed over the partial sums ``sum_{j<=d} c_j``, ``d = 1..D``).
        codebook_init: ``"uniform"`` on ``[-1/K, 1/K]`` (default, taming-transformers' VQGAN) or ``"normal"``
            (``N(0, 1)``, like ``torch.nn.Embedding``).

    ``forward(z, task)`` returns ``(z_q, vq_loss, indices)``: ``z_q`` ``[B, C, h, w]`` with straight-through
    gradient, ``vq_loss`` a 0-dim tensor, ``indices`` ``[B, D, h, w]`` int64. After a forward the module keeps
    ``last_terms`` (detached ``codebook`` / ``commitment`` terms) and ``last_perplexity`` (``[num_tasks]``,
    perplexity of this batch's codes per task, 0 for absent tasks); in training mode it also counts code usage
    (see :meth:`usage`).
    """

    def __init__(
        self,
        num_tasks: int,
        num_embeddings: int = 8192,
        embedding_dim: int = 256,
        depth: int = 8,
        commitment_cost: float = 0.25,
        shared_codebook: bool = True,
        depth_loss: str = "final",
        codebook_init: str = "uniform",
    ) -> None:
        super().__init__()
        for name, value in (("num_tasks", num_tasks), ("num_embeddings", num_embeddings)):
            if value < 1:
                raise ValueError(f"TaskCodebookBank: {name} must be >= 1, got {value}.")
        if embedding_dim < 1 or depth < 1:
            raise ValueError(f"TaskCodebookBank: embedding_dim and depth must be >= 1, got {embedding_dim}, {depth}.")
        if depth_loss not in DEPTH_LOSS_MODES:
            raise ValueError(f"TaskCodebookBank: depth_loss must be one of {DEPTH_LOSS_MODES}, got {depth_loss!r}.")
        if codebook_init not in CODEBOOK_INITS:
            raise ValueError(f"TaskCodebookBank: codebook_init must be one of {CODEBOOK_INITS}, got {codebook_init!r}.")
        self.num_tasks = num_tasks
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.depth = depth
        self.commitment_cost = commitment_cost
        self.depth_loss = depth_loss
        books_per_task = 1 if shared_codebook else depth
        self.books_per_task = books_per_task
        self.codebooks = nn.Parameter(torch.empty(num_tasks, books_per_task, num_embeddings, embedding_dim))
        if codebook_init == "uniform":
            nn.init.uniform_(self.codebooks, -1.0 / num_embeddings, 1.0 / num_embeddings)
        else:
            nn.init.normal_(self.codebooks)
        # running code-usage counts (diagnostics only, not saved): [num_tasks, books_per_task, K]
        self.register_buffer("code_counts", torch.zeros(num_tasks, books_per_task, num_embeddings), persistent=False)
        self.last_terms: dict[str, torch.Tensor] = {}
        self.last_perplexity: torch.Tensor = torch.zeros(num_tasks)

    @property
    def shared_codebook(self) -> bool:
        return self.books_per_task == 1

    def _check_latent(self, z: torch.Tensor, where: str) -> None:
        if not torch.jit.is_tracing() and (z.ndim != 4 or z.shape[1] != self.embedding_dim):
            raise ValueError(f"{where}: z must be (B, {self.embedding_dim}, h, w), got {tuple(z.shape)}.")

    def lookup(self, indices: torch.Tensor, task: torch.Tensor | int | Sequence[int]) -> torch.Tensor:
        """Quantised latent ``sum_d c_d`` from code indices ``[B, D, h, w]`` -> ``[B, C, h, w]`` (with gradient
        to the codebooks)."""
        if indices.ndim != 4 or indices.shape[1] != self.depth:
            raise ValueError(
                f"TaskCodebookBank.lookup: indices must be (B, {self.depth}, h, w), got {tuple(indices.shape)}."
            )
        b, d, h, w = indices.shape
        task = as_task_tensor(task, b, self.num_tasks, indices.device, "TaskCodebookBank.lookup")
        flat = indices.permute(0, 2, 3, 1).reshape(b, h * w, d)
        z_q = self._gather_levels(self.codebooks.index_select(0, task), flat).sum(2)  # [B, N, C]
        return z_q.transpose(1, 2).reshape(b, self.embedding_dim, h, w)

    def _gather_levels(self, books: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, N, D, C]`` at indices ``idx`` ``[B, N, D]`` from ``books`` ``[B, S, K, C]``."""
        b, n, d = idx.shape
        c = books.shape[-1]
        if self.shared_codebook:
            flat = idx.reshape(b, n * d, 1).expand(b, n * d, c)
            return torch.gather(books[:, 0], 1, flat).reshape(b, n, d, c)
        levels = [torch.gather(books[:, j], 1, idx[..., j : j + 1].expand(b, n, c)) for j in range(d)]
        return torch.stack(levels, dim=2)

    def forward(
        self, z: torch.Tensor, task: torch.Tensor | int | Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise ``z`` ``[B, C, h, w]`` with each sample's task codebook -> ``(z_q, vq_loss, indices)``."""
        self._check_latent(z, "TaskCodebookBank.forward")
        b, c, h, w = z.shape
        task = as_task_tensor(task, b, self.num_tasks, z.device, "TaskCodebookBank.forward")
        with torch.autocast(device_type=z.device.type, enabled=False):
            tokens = z.float().permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, N, C]
            books = self.codebooks.index_select(0, task).float()  # [B, S, K, C]
            idx = residual_quantize(tokens.detach(), books.detach(), self.depth, self.shared_codebook)  # [B, N, D]
            codes = self._gather_levels(books, idx)  # [B, N, D, C], gradient to the codebooks
            z_q = codes.sum(2)
            if torch.jit.is_tracing():  # exported graphs restore images; they need no loss
                codebook_term = commitment_term = z_q.new_zeros(())
            else:
                codebook_term, commitment_term = self._loss_terms(tokens, codes, z_q)
        vq_loss = codebook_term + self.commitment_cost * commitment_term
        self.last_terms = {"codebook": codebook_term.detach(), "commitment": commitment_term.detach()}
        self._record_usage(idx, task)

        z_q = z_q.to(z.dtype).transpose(1, 2).reshape(b, c, h, w)
        z_q = z + (z_q - z).detach()  # straight-through: forward value z_q, gradient of the identity to z
        indices = idx.transpose(1, 2).reshape(b, self.depth, h, w)
        return z_q, vq_loss, indices

    def _loss_terms(
        self, tokens: torch.Tensor, codes: torch.Tensor, z_q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(||sg[z] - z_q||^2, ||z - sg[z_q]||^2)`` as element means; cumulative mode sums over partial sums."""
        if self.depth_loss == "final":
            return F.mse_loss(z_q, tokens.detach()), F.mse_loss(tokens, z_q.detach())
        partial = codes.cumsum(2)  # [B, N, D, C]
        target = tokens.unsqueeze(2).expand_as(partial)
        codebook_term = F.mse_loss(partial, target.detach(), reduction="none").mean(dim=(0, 1, 3)).sum()
        commitment_term = F.mse_loss(target, partial.detach(), reduction="none").mean(dim=(0, 1, 3)).sum()
        return codebook_term, commitment_term

    @torch.no_grad()
    def _record_usage(self, idx: torch.Tensor, task: torch.Tensor) -> None:
        """Per-task perplexity of this batch; in training also add the codes to the running counts."""
        if torch.jit.is_tracing():
            return
        b, n, d = idx.shape
        k = self.num_embeddings
        books_per_task = self.books_per_task
        level = torch.arange(d, device=idx.device).view(1, 1, d) if books_per_task > 1 else torch.zeros_like(idx)
        slot = (task.view(b, 1, 1) * books_per_task + level) * k + idx  # flat index into code_counts
        counts = torch.bincount(slot.reshape(-1), minlength=self.code_counts.numel()).view_as(self.code_counts)
        self.last_perplexity = codebook_perplexity(counts.sum(1)).float()
        if self.training:
            self.code_counts += counts.to(self.code_counts.dtype)

    @torch.no_grad()
    def usage(self, reset: bool = False) -> dict[int, dict[str, float]]:
        """Code usage per task since the last reset (training forwards only).

        Returns ``{task: {"perplexity", "used_codes", "dead_codes", "tokens"}}``; with per-level codebooks the
        counts of all levels are pooled for the perplexity and a code counts as used if any level used it.
        ``dead_codes`` are codes never selected.
        """
        stats: dict[int, dict[str, float]] = {}
        pooled = self.code_counts.sum(1)  # [num_tasks, K]
        ppl = codebook_perplexity(pooled)
        for t in range(self.num_tasks):
            used = int((self.code_counts[t] > 0).any(0).sum())
            stats[t] = {
                "perplexity": float(ppl[t]),
                "used_codes": used,
                "dead_codes": self.num_embeddings - used,
                "tokens": float(pooled[t].sum()),
            }
        if reset:
            self.code_counts.zero_()
        return stats


class DiffCodeAutoencoder(nn.Module):
    """DiffCode stage I: VQ autoencoder on HQ images with a :class:`TaskCodebookBank` in its bottleneck.

    ``forward(hq, task) -> (recon, vq_loss, indices)``. A stage-I training step computes
    ``loss = L1(recon, hq) + vq_loss`` (:class:`medir_monai.losses.DiffCodeCodebookLoss`), with ``task`` the
    registry index of each sample. Inputs whose size is not a multiple of :attr:`downsample_factor` are padded
    (reflect) and the reconstruction cropped back; ``indices`` then cover the padded grid.

    The encoder / decoder are :class:`~medir_monai.networks.diffcode.naf.NAFEncoder` / ``NAFDecoder``.

    Args:
        in_channels: image channels (1).
        num_tasks: codebooks in the bank.
        num_embeddings, embedding_dim, depth, commitment_cost, shared_codebook, depth_loss, codebook_init: see
            :class:`TaskCodebookBank` (paper: 8192, 256, 8, 0.25).
        channels: encoder widths per level, the last the latent level (paper: 64, 128, 256, 256); the decoder
            mirrors them. The latent grid is ``H / 2**(len(channels) - 1)``.
        num_blocks: NAF blocks per level (paper: 2, 2, 4, 4).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_tasks: int = 3,
        num_embeddings: int = 8192,
        embedding_dim: int = 256,
        depth: int = 8,
        commitment_cost: float = 0.25,
        shared_codebook: bool = True,
        depth_loss: str = "final",
        codebook_init: str = "uniform",
        channels: Sequence[int] = (64, 128, 256, 256),
        num_blocks: Sequence[int] = (2, 2, 4, 4),
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"DiffCodeAutoencoder: in_channels must be >= 1, got {in_channels}.")
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.num_tasks = num_tasks
        self.encoder = NAFEncoder(in_channels, embedding_dim, channels, num_blocks)
        self.decoder = NAFDecoder(embedding_dim, in_channels, channels, num_blocks)
        #: the latent grid is the image size divided by this
        self.downsample_factor = self.encoder.downsample_factor
        self.quantizer = TaskCodebookBank(
            num_tasks,
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            depth=depth,
            commitment_cost=commitment_cost,
            shared_codebook=shared_codebook,
            depth_loss=depth_loss,
            codebook_init=codebook_init,
        )

    def _check_image(self, x: torch.Tensor, where: str) -> None:
        if not torch.jit.is_tracing() and (x.ndim != 4 or x.shape[1] != self.in_channels):
            raise ValueError(f"{where}: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}.")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latent ``z = E(x)``: ``[B, 1, H, W] -> [B, C, H/f, W/f]`` (H, W multiples of ``f``)."""
        self._check_image(x, "DiffCodeAutoencoder.encode")
        f = self.downsample_factor
        if not torch.jit.is_tracing() and (x.shape[-2] % f or x.shape[-1] % f):
            raise ValueError(
                f"DiffCodeAutoencoder.encode: height and width must be multiples of {self.downsample_factor}, "
                f"got {tuple(x.shape[-2:])} (forward pads automatically)."
            )
        return self.encoder(x)

    def quantize(
        self, z: torch.Tensor, task: torch.Tensor | int | Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_q, vq_loss, indices)`` of a latent with each sample's task codebook (see :class:`TaskCodebookBank`)."""
        return self.quantizer(z, task)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Image from a (quantised) latent ``[B, C, h, w] -> [B, 1, h*f, w*f]``."""
        return self.decoder(z_q)

    def decode_indices(self, indices: torch.Tensor, task: torch.Tensor | int | Sequence[int]) -> torch.Tensor:
        """Image from code indices ``[B, D, h, w]`` of the given tasks' codebooks."""
        return self.decode(self.quantizer.lookup(indices, task))

    def forward(
        self, hq: torch.Tensor, task: torch.Tensor | int | Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct ``hq`` ``[B, 1, H, W]`` through the task codebooks -> ``(recon, vq_loss, indices)``."""
        self._check_image(hq, "DiffCodeAutoencoder.forward")
        padded, size = pad_to_multiple(hq, self.downsample_factor)
        z_q, vq_loss, indices = self.quantize(self.encoder(padded), task)
        return crop_to_size(self.decode(z_q), size), vq_loss, indices

    def usage(self, reset: bool = False) -> dict[int, dict[str, float]]:
        """Per-task codebook usage (perplexity, used / dead codes), see :meth:`TaskCodebookBank.usage`."""
        return self.quantizer.usage(reset=reset)
