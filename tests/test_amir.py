"""AMIR: parity with the authors' code (whole model and one MoE layer), paper sizes, routing, balance loss."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import load_fixture, official_backbone_kwargs

from medir_monai.networks.amir import AMIR, SpatialMoE, cv_squared
from medir_monai.networks.official import load_official_state_dict, to_official_state_dict

PARITY_TOL = 1e-5
PAPER_PARAMS = 23_540_498
TINY = dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)



def amir_from_official_config(cfg: dict, **kwargs) -> AMIR:
    return AMIR(
        **official_backbone_kwargs(cfg),
        atom_num=cfg["atom_num"],
        atom_dim=cfg["atom_dim"],
        num_experts=cfg["num_experts"],
        top_k=cfg["top_k"],
        **kwargs,
    )


def moe_from_official_config(cfg: dict, **kwargs) -> SpatialMoE:
    return SpatialMoE(
        cfg["dim"], mlp_ratio=cfg["mlp_ratio"], num_experts=cfg["num_experts"], top_k=cfg["top_k"], **kwargs
    )


def srms(model: AMIR):
    return [getattr(model, f"spatial_routing_encoder_level{level}") for level in (1, 2, 3)]


def tiny_amir(**kwargs) -> AMIR:
    """Tiny AMIR with the CRM modulation switched on (gamma/beta are zero at init)."""
    torch.manual_seed(0)
    model = AMIR(**TINY, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.normal_(0.0, 0.5)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def paper_model() -> AMIR:
    torch.manual_seed(0)
    return AMIR().eval()


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_official_parity(dispatch):
    fx = load_fixture("amir_official_tiny.pt")
    model = amir_from_official_config(fx["config"], moe_dispatch=dispatch).eval()
    load_official_state_dict(model, fx["state_dict"])
    with torch.no_grad():
        out = model(fx["input"])
    err = (out - fx["output_eval"]).abs().max().item()
    assert err <= PARITY_TOL, f"max abs error {err}"
    assert model.aux_loss.ndim == 0 and torch.isfinite(model.aux_loss)


def test_official_state_dict_round_trip():
    fx = load_fixture("amir_official_tiny.pt")
    model = amir_from_official_config(fx["config"])
    load_official_state_dict(model, fx["state_dict"])
    back = to_official_state_dict(model)
    assert sorted(back) == sorted(fx["state_dict"])
    assert all(torch.equal(back[k], fx["state_dict"][k]) for k in back)


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_moe_layer_parity(dispatch):
    fx = load_fixture("amir_moe_official.pt")
    moe = moe_from_official_config(fx["config"], dispatch=dispatch).eval()
    load_official_state_dict(moe, fx["state_dict"])
    with torch.no_grad():
        y, balance, top1 = moe(fx["x"], fx["prompt"])
    y_err = (y - fx["y_eval"]).abs().max().item()
    loss_err = (balance - fx["balance_loss_eval"]).abs().item()
    assert y_err <= PARITY_TOL, f"output max abs error {y_err}"
    assert loss_err <= PARITY_TOL, f"balance loss abs error {loss_err}"
    assert top1.shape == (fx["x"].shape[0], *fx["x"].shape[2:]) and top1.max() < fx["config"]["num_experts"]
    back = moe.to_official_state_dict()
    assert sorted(back) == sorted(fx["state_dict"])


def test_paper_parameter_count(paper_model):
    assert sum(p.numel() for p in paper_model.parameters()) == PAPER_PARAMS


@pytest.mark.parametrize("size", [(128, 128), (192, 400)])
def test_paper_output_shape_and_records(paper_model, size):
    x = torch.rand(1, 1, *size)
    with torch.no_grad():
        out = paper_model(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert paper_model.aux_loss.ndim == 0 and torch.isfinite(paper_model.aux_loss)
    assert paper_model.last_instruction.shape == (1, 256)
    h, w = size
    assert [tuple(r.shape) for r in paper_model.last_routing] == [(1, h, w), (1, h // 2, w // 2), (1, h // 4, w // 4)]


def reference_moe(moe: SpatialMoE, x: torch.Tensor, prompt: torch.Tensor, combine: str) -> torch.Tensor:
    """Clean top-k gating and a loop over tokens: the maths of the layer written plainly."""
    b, c, h, w = x.shape
    tokens = x.permute(0, 2, 3, 1).reshape(-1, c)
    cond = prompt.repeat_interleave(h * w, dim=0)
    logits = torch.cat([tokens, cond], 1) @ moe.w_gate
    vals, idx = logits.topk(moe.top_k, dim=1)
    gates = vals.softmax(1)
    rows = []
    for t in range(tokens.shape[0]):
        outs = torch.stack([moe.experts[int(e)](tokens[t]) for e in idx[t]])  # [k, C]
        g = gates[t].unsqueeze(1)
        rows.append((g * outs).sum(0) if combine == "linear" else (g * outs.exp()).sum(0).log())
    return torch.stack(rows).view(b, h, w, c).permute(0, 3, 1, 2)


def test_linear_combine_matches_paper_formula_and_differs_from_log():
    torch.manual_seed(3)
    x, prompt = torch.randn(2, 6, 3, 4), torch.randn(2, 6)
    log_moe = SpatialMoE(6, combine="log").eval()
    lin_moe = SpatialMoE(6, combine="linear").eval()
    lin_moe.load_state_dict(log_moe.state_dict())
    with torch.no_grad():
        y_log, loss_log, _ = log_moe(x, prompt)
        y_lin, loss_lin, _ = lin_moe(x, prompt)
        torch.testing.assert_close(y_log, reference_moe(log_moe, x, prompt, "log"))
        torch.testing.assert_close(y_lin, reference_moe(lin_moe, x, prompt, "linear"))
    assert (y_log - y_lin).abs().max() > 1e-3
    torch.testing.assert_close(loss_log, loss_lin)  # routing is the same, only the mixing differs

    model = tiny_amir(moe_combine="linear").eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 16, 16)).shape == (1, 1, 16, 16)


def test_balance_loss_backprops_into_gate_and_noise_weights():
    torch.manual_seed(0)
    moe = SpatialMoE(8).train()
    x, prompt = torch.randn(2, 8, 6, 6), torch.randn(2, 8)
    _, balance, _ = moe(x, prompt)
    assert balance.ndim == 0 and balance.requires_grad
    balance.backward()
    assert moe.w_gate.grad is not None and moe.w_gate.grad.abs().sum() > 0
    assert moe.w_noise.grad is not None and moe.w_noise.grad.abs().sum() > 0
    assert all(p.grad is None for p in moe.experts.parameters())  # the balance loss does not touch the experts


def test_eval_balance_loss_uses_hard_counts():
    torch.manual_seed(0)
    moe = SpatialMoE(5).eval()
    x, prompt = torch.randn(1, 5, 4, 4), torch.randn(1, 5)
    with torch.no_grad():
        _, balance, _ = moe(x, prompt)
        logits = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, 5), prompt.expand(16, 5)], 1) @ moe.w_gate
        vals, idx = logits.topk(2, dim=1)
        gates = torch.zeros_like(logits).scatter(1, idx, vals.softmax(1))
        counts = torch.bincount(idx.flatten(), minlength=4).float()
    torch.testing.assert_close(balance, cv_squared(gates.sum(0)) + cv_squared(counts))


def test_tiny_training_step():
    model = tiny_amir().train()
    x, target = torch.rand(2, 1, 32, 40), torch.rand(2, 1, 32, 40)
    out = model(x)
    assert out.shape == x.shape
    assert model.aux_loss.ndim == 0 and model.aux_loss.requires_grad
    loss = (out - target).abs().mean() + 0.001 * model.aux_loss
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    for srm in srms(model):
        assert srm.moe.w_noise.grad.abs().sum() > 0
    copy.deepcopy(model)  # EMA / best-model copies must work after a training forward


def test_sparse_and_dense_dispatch_agree_in_training():
    model = tiny_amir().train()
    x = torch.rand(2, 1, 24, 32)
    torch.manual_seed(5)
    out_sparse = model(x)
    loss_sparse = model.aux_loss
    for srm in srms(model):
        srm.moe.dispatch = "dense"
    torch.manual_seed(5)  # same gating noise
    torch.testing.assert_close(model(x), out_sparse)
    torch.testing.assert_close(model.aux_loss, loss_sparse)


@pytest.mark.parametrize("size", [(37, 50), (20, 9)])
def test_sizes_not_divisible_by_8(size):
    model = tiny_amir().eval()
    x = torch.rand(1, 1, *size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    h, w = size
    expected = [(1, -(-h // 2**i), -(-w // 2**i)) for i in range(3)]
    assert [tuple(r.shape) for r in model.last_routing] == expected


def test_bad_arguments():
    with pytest.raises(ValueError, match="combine"):
        AMIR(**TINY, moe_combine="mean")
    with pytest.raises(ValueError, match="top_k"):
        AMIR(**TINY, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match=">= 9"):
        AMIR(**TINY)(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="prompt"):
        SpatialMoE(4)(torch.rand(1, 4, 2, 2), torch.rand(1, 3))


def test_trace_eval_generalises_to_other_sizes():
    model = tiny_amir().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.rand(1, 1, 32, 32))
    for size in [(2, 1, 40, 24), (1, 1, 27, 35)]:
        x = torch.rand(size)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x))
