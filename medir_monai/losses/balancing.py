"""Loss balancing: TAT's sample-adaptive weights, task uncertainty weights, AMIR's balance term
(docs/design.md, section 4).

* :class:`TATLossBalancing`: TAT's sample-adaptive loss balancing (TAT, MICCAI 2025, Sec. 2.3). A small
  MLP looks at three detached per-sample L1 distances and predicts an uncertainty ``sigma_i`` that
  re-weights each sample's restoration loss, Kendall-style:
  ``L = mean_i [ 0.5 / (sigma_i^2 + eps) * L1(out_i, HQ_i) + 0.5 * log(1 + sigma_i^2) ]``.
* :class:`TaskUncertaintyLoss`: the task-level variant (Kendall et al., CVPR 2018, with the
  ``log(1 + sigma^2)`` regulariser): one learnable ``sigma`` per task, same formula.
* :func:`cv_squared`: squared coefficient of variation, the building block of AMIR's MoE balance loss
  (AMIR, MICCAI 2024, Sec. 2.2; ``balance = cv2(importance) + cv2(load)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["TATLossBalancing", "TaskUncertaintyLoss", "cv_squared", "uncertainty_weighted"]


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var_unbiased(x) / (mean(x)^2 + eps)`` of a 1-D tensor.

    A one-element (or empty) tensor has no spread; the result is then ``0`` (the unbiased variance
    would be NaN).

    Args:
        x: 1-D tensor, e.g. per-expert importance or load.
        eps: added to the squared mean for numerical stability.

    Returns:
        0-dim tensor (float32 or wider).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"cv_squared: x must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 1:
        raise ValueError(f"cv_squared: x must be 1-D (one value per expert), got shape {tuple(x.shape)}.")
    if x.numel() < 2:
        return x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))
    xf = x.float() if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16) else x
    return xf.var(unbiased=True) / (xf.mean() ** 2 + eps)


def uncertainty_weighted(loss: torch.Tensor, sigma: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Element-wise uncertainty weighting ``0.5 / (sigma^2 + eps) * loss + 0.5 * log(1 + sigma^2)``.

    This is the per-term objective of both TAT's balancing (per sample) and :class:`TaskUncertaintyLoss`
    (per task); the caller reduces it.
    """
    sigma_sq = sigma**2
    return 0.5 / (sigma_sq + eps) * loss + 0.5 * torch.log1p(sigma_sq)


class _ResidualMLP(nn.Module):
    """Pre-norm residual MLP ``x + fc2(GELU(fc1(LayerNorm(x))))``."""

    def __init__(self, channels: int, expansion: int) -> None:
        super().__init__()
        hidden = channels * expansion
        # attribute names follow the authors' checkpoint keys (``res_block.fc1`` ...)
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class _SigmaEstimator(nn.Module):
    """Maps per-sample loss statistics ``[B, num_terms]`` to one uncertainty ``sigma`` per sample ``[B]``.

    ``fc_out`` starts at weight 0 / bias ``initial_sigma`` so that every sample starts with the same
    weight (TAT, Sec. 2.3).
    """

    def __init__(self, num_terms: int, hidden_channels: int, expansion: int, initial_sigma: float) -> None:
        super().__init__()
        self.fc_in = nn.Linear(num_terms, hidden_channels)
        self.res_block = _ResidualMLP(hidden_channels, expansion)
        self.fc_out = nn.Linear(hidden_channels, 1)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.constant_(self.fc_out.bias, initial_sigma)

    def forward(self, stats: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.res_block(self.fc_in(stats))).reshape(-1)


def _per_sample_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per sample: ``[B, ...] x [B, ...] -> [B]``."""
    return (a - b).abs().reshape(a.shape[0], -1).mean(dim=1)


class TATLossBalancing(nn.Module):
    """Sample-adaptive loss balancing of TAT (MICCAI 2025, Sec. 2.3, Eq. for the balanced loss).

    For each sample ``i`` of a mixed-task batch, three L1 distances (per-sample means) are computed:
    ``d_i = [L1(LQ, HQ), L1(LQ, out), L1(out, HQ)]``: how degraded the input is, how much the network
    changed it and how far the result still is from the target. ``d_i`` is **detached** and fed to a small
    MLP (``Linear(3->16)``, a residual block ``LayerNorm -> Linear(16->256) -> GELU -> Linear(256->16)``,
    ``Linear(16->1)``) that predicts ``sigma_i``. The loss is

    ``L = mean_i [ 0.5 / (sigma_i^2 + eps) * L1(out_i, HQ_i) + 0.5 * log(1 + sigma_i^2) ]``

    where only the restoration term ``L1(out_i, HQ_i)`` carries gradient to the network and ``sigma_i``
    carries gradient to the estimator. The estimator's parameters must be given to the optimiser
    together with the network's (the authors use one AdamW over both).

    Parameter names match the authors' checkpoints (``weight_estimator.fc_in.weight``, ...), so their
    state dict loads directly. The default configuration has 8,577 parameters.

    Args:
        hidden_channels: width of the estimator (16 in the paper's code).
        expansion: expansion of the residual block's hidden layer (16, i.e. 256 units).
        initial_sigma: initial ``sigma`` for every sample (bias of the last layer, weight zero).
        eps: added to ``sigma^2`` in the weight's denominator.

    Example::

        balancer = TATLossBalancing()
        loss = balancer(restored, target, lq)   # note the order: output, HQ, LQ
        optimizer = torch.optim.AdamW([*net.parameters(), *balancer.parameters()], lr=2e-4)
    """

    num_terms: int = 3

    def __init__(
        self, hidden_channels: int = 16, expansion: int = 16, initial_sigma: float = 1.0, eps: float = 1e-8
    ) -> None:
        super().__init__()
        if hidden_channels < 1 or expansion < 1:
            raise ValueError(
                f"TATLossBalancing: hidden_channels and expansion must be >= 1, got {hidden_channels}, {expansion}."
            )
        self.eps = eps
        self.weight_estimator = _SigmaEstimator(self.num_terms, hidden_channels, expansion, initial_sigma)

    def loss_statistics(self, restored: torch.Tensor, target: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """Per-sample ``[L1(LQ, HQ), L1(LQ, out), L1(out, HQ)]``, shape ``[B, 3]`` (not detached)."""
        return torch.stack(
            [_per_sample_l1(lq, target), _per_sample_l1(lq, restored), _per_sample_l1(restored, target)], dim=1
        )

    def sigma(self, restored: torch.Tensor, target: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """The estimated per-sample uncertainty ``sigma``, shape ``[B]``."""
        self._check(restored, target, lq)
        return self.weight_estimator(self.loss_statistics(restored, target, lq).detach())

    def forward(self, restored: torch.Tensor, target: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """Balanced loss (0-dim tensor).

        Args:
            restored: network output ``[B, C, H, W]`` (gradient flows through it).
            target: high-quality ground truth (HQ), same shape.
            lq: the low-quality network input (LQ), same shape.
        """
        self._check(restored, target, lq)
        stats = self.loss_statistics(restored, target, lq)  # [B, 3]
        sigma = self.weight_estimator(stats.detach())  # [B]
        self.last_sigma = sigma.detach()  # for logging
        return uncertainty_weighted(stats[:, 2], sigma, self.eps).mean()

    @staticmethod
    def _check(restored: torch.Tensor, target: torch.Tensor, lq: torch.Tensor) -> None:
        if restored.shape != target.shape or restored.shape != lq.shape:
            raise ValueError(
                "TATLossBalancing: restored, target and lq must have the same shape, got "
                f"{tuple(restored.shape)}, {tuple(target.shape)}, {tuple(lq.shape)}."
            )
        if restored.ndim < 2:
            raise ValueError(
                f"TATLossBalancing: expected a batch [B, ...] of images, got shape {tuple(restored.shape)}."
            )


class TaskUncertaintyLoss(nn.Module):
    """Task-level uncertainty weighting (Kendall et al., CVPR 2018), an option beside :class:`TATLossBalancing`.

    One learnable ``sigma_t`` per task (initialised to ``initial_sigma``):
    ``L = sum_t [ 0.5 / (sigma_t^2 + eps) * L_t + 0.5 * log(1 + sigma_t^2) ]`` (``reduction="mean"``
    divides by the number of tasks).

    Args:
        num_tasks: number of task losses to balance.
        initial_sigma: initial value of every ``sigma_t``.
        eps: added to ``sigma^2`` in the weight's denominator.
        reduction: ``"sum"`` (default) or ``"mean"`` over tasks.

    Call with a sequence of ``num_tasks`` 0-dim losses or a tensor of shape ``[num_tasks]``; a task that
    is absent from a batch can be given a mask: ``loss_fn(losses, present=torch.tensor([1, 0, 1]))``.
    """

    def __init__(
        self, num_tasks: int, initial_sigma: float = 1.0, eps: float = 1e-8, reduction: str = "sum"
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"TaskUncertaintyLoss: num_tasks must be >= 1, got {num_tasks}.")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"TaskUncertaintyLoss: reduction must be 'sum' or 'mean', got {reduction!r}.")
        self.num_tasks = num_tasks
        self.eps = eps
        self.reduction = reduction
        self.sigma = nn.Parameter(torch.full((num_tasks,), float(initial_sigma)))

    def forward(
        self, losses: torch.Tensor | Sequence[torch.Tensor], present: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Weighted sum (or mean) of the per-task losses; ``present`` (bool/0-1, ``[num_tasks]``) masks tasks."""
        stacked = losses if isinstance(losses, torch.Tensor) else torch.stack([torch.as_tensor(v) for v in losses])
        stacked = stacked.reshape(-1)
        if stacked.numel() != self.num_tasks:
            raise ValueError(
                f"TaskUncertaintyLoss: expected {self.num_tasks} task losses, got {stacked.numel()}."
            )
        terms = uncertainty_weighted(stacked, self.sigma, self.eps)
        if present is not None:
            mask = torch.as_tensor(present, device=terms.device).reshape(-1).to(terms.dtype)
            if mask.numel() != self.num_tasks:
                raise ValueError(
                    f"TaskUncertaintyLoss: present must have {self.num_tasks} entries, got {mask.numel()}."
                )
            terms = terms * mask
            count = mask.sum().clamp_min(1.0)
        else:
            count = terms.new_tensor(float(self.num_tasks))
        total = terms.sum()
        return total / count if self.reduction == "mean" else total
