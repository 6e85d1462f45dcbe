"""Losses: TAT sample-adaptive balancing (fixture parity), task-level uncertainty weighting, cv_squared."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import load_fixture

from medir_monai.losses import TATLossBalancing, TaskUncertaintyLoss, cv_squared

TOL = 1e-5



@pytest.fixture(scope="module")
def balancing():
    data = load_fixture("tat_loss_balancing_official.pt")
    loss_fn = TATLossBalancing()
    loss_fn.load_state_dict(data["state_dict"])  # official key names load directly
    return loss_fn, data


def test_tat_balancing_parity(balancing):
    loss_fn, data = balancing
    loss = loss_fn(data["restored"], data["hq"], data["lq"])
    err = abs(loss.item() - data["loss"].item())
    assert err <= TOL, f"max abs error {err:.3g} > {TOL}"


def test_tat_balancing_argument_order_matters(balancing):
    loss_fn, data = balancing
    swapped = loss_fn(data["lq"], data["hq"], data["restored"])  # output and LQ exchanged
    assert abs(swapped.item() - data["loss"].item()) > 1e-4


def test_tat_balancing_parameter_count_and_init():
    loss_fn = TATLossBalancing()
    assert sum(p.numel() for p in loss_fn.parameters()) == 8577
    torch.manual_seed(0)
    restored, target, lq = torch.rand(5, 1, 8, 8), torch.rand(5, 1, 8, 8), torch.rand(5, 1, 8, 8)
    sigma = loss_fn.sigma(restored, target, lq)
    torch.testing.assert_close(sigma, torch.ones(5), atol=0, rtol=0)
    # at sigma = 1: mean_i 0.5 / (1 + eps) * L1(out_i, HQ_i) + 0.5 * log 2
    l1 = (restored - target).abs().mean()
    expected = 0.5 / (1 + 1e-8) * l1 + 0.5 * math.log(2.0)
    torch.testing.assert_close(loss_fn(restored, target, lq), expected)


def test_tat_balancing_gradients(balancing):
    """Only L1(out, HQ) carries gradient to the output; the estimator's inputs are detached."""
    loss_fn, data = balancing
    restored = data["restored"].clone().requires_grad_(True)
    loss_fn.zero_grad()
    loss = loss_fn(restored, data["hq"], data["lq"])
    loss.backward()
    with torch.no_grad():
        sigma = loss_fn.sigma(data["restored"], data["hq"], data["lq"])
    b, n = restored.shape[0], restored[0].numel()
    weight = (0.5 / (sigma**2 + 1e-8) / (b * n)).view(b, 1, 1, 1)
    expected = weight * torch.sign(data["restored"] - data["hq"])
    torch.testing.assert_close(restored.grad, expected, atol=1e-7, rtol=1e-5)
    assert loss_fn.weight_estimator.fc_out.bias.grad.abs().item() > 0


def test_tat_balancing_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        TATLossBalancing()(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 5))


def test_task_uncertainty_loss():
    loss_fn = TaskUncertaintyLoss(3)
    losses = torch.tensor([0.2, 0.4, 0.6])
    expected = (0.5 / (1 + 1e-8) * losses + 0.5 * math.log(2.0)).sum()
    torch.testing.assert_close(loss_fn(losses), expected)
    torch.testing.assert_close(loss_fn([losses[0], losses[1], losses[2]]), expected)
    masked = loss_fn(losses, present=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(masked, (0.5 / (1 + 1e-8) * losses[[0, 2]] + 0.5 * math.log(2.0)).sum())
    mean_fn = TaskUncertaintyLoss(3, reduction="mean")
    torch.testing.assert_close(mean_fn(losses), expected / 3)
    # larger sigma down-weights a task: the gradient on sigma of a large loss is negative
    loss_fn(torch.tensor([10.0, 0.0, 0.0])).backward()
    assert loss_fn.sigma.grad[0] < 0 < loss_fn.sigma.grad[1]
    with pytest.raises(ValueError, match="expected 3"):
        loss_fn(torch.tensor([0.1, 0.2]))


def test_cv_squared():
    x = torch.tensor([1.0, 2.0, 4.0, 7.0])
    values = x.numpy()
    expected = np.var(values, ddof=1) / (values.mean() ** 2 + 1e-10)
    assert abs(cv_squared(x).item() - expected) < 1e-6
    assert cv_squared(torch.tensor([3.0])).item() == 0.0
    assert cv_squared(torch.full((4,), 2.0)).item() == 0.0
    with pytest.raises(ValueError, match="1-D"):
        cv_squared(torch.ones(2, 2))
