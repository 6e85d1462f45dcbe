"""Restormer and the shared blocks: parity with the authors' code, paper sizes, padding, checkpoint loading."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import load_fixture, official_backbone_kwargs
import torch.nn.functional as F

from medir_monai.networks.blocks import ChannelLayerNorm, TransformerBlock, crop_to_size, pad_to_multiple
from medir_monai.networks.official import load_official_state_dict, to_official_state_dict
from medir_monai.networks.restormer import Restormer

PARITY_TOL = 1e-5
PAPER_PARAMS = 26_124_052
TINY = dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1)



def restormer_from_official_config(cfg: dict) -> Restormer:
    return Restormer(
        **official_backbone_kwargs(cfg),
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def paper_model() -> Restormer:
    torch.manual_seed(0)
    return Restormer().eval()


def test_official_parity():
    fx = load_fixture("restormer_official_tiny.pt")
    model = restormer_from_official_config(fx["config"]).eval()
    load_official_state_dict(model, fx["state_dict"])
    with torch.no_grad():
        out = model(fx["input"])
    err = (out - fx["output_eval"]).abs().max().item()
    assert err <= PARITY_TOL, f"max abs error {err}"


def test_official_state_dict_round_trip():
    fx = load_fixture("restormer_official_tiny.pt")
    model = restormer_from_official_config(fx["config"])
    load_official_state_dict(model, fx["state_dict"])
    back = to_official_state_dict(model)
    assert sorted(back) == sorted(fx["state_dict"])
    assert all(torch.equal(back[k], fx["state_dict"][k]) for k in back)
    # the MONAI blocks keep their weights under ".conv"
    assert "encoder_level1.0.attn.qkv.conv.weight" in model.state_dict()


def test_paper_parameter_count(paper_model):
    assert sum(p.numel() for p in paper_model.parameters()) == PAPER_PARAMS


@pytest.mark.parametrize("size", [(128, 128), (192, 400)])
def test_paper_output_shape(paper_model, size):
    x = torch.rand(1, 1, *size)
    with torch.no_grad():
        out = paper_model(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_channel_layer_norm_matches_formula():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 5, 7)
    with_bias, bias_free = ChannelLayerNorm(6, bias=True), ChannelLayerNorm(6, bias=False)
    for norm in (with_bias, bias_free):
        torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(with_bias.bias)
    mu = x.mean(1, keepdim=True)
    var = x.var(1, keepdim=True, unbiased=False)
    w, b = with_bias.weight.view(1, -1, 1, 1), with_bias.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(with_bias(x), (x - mu) / torch.sqrt(var + 1e-5) * w + b)
    torch.testing.assert_close(bias_free(x), x / torch.sqrt(var + 1e-5) * bias_free.weight.view(1, -1, 1, 1))
    assert "bias" not in dict(bias_free.named_parameters())


def test_transformer_block_bad_heads():
    with pytest.raises(ValueError, match="num_heads"):
        TransformerBlock(10, 3, 2.66, False)


def test_tiny_forward_backward():
    torch.manual_seed(0)
    model = Restormer(**TINY).train()
    x = torch.rand(2, 1, 32, 48)
    out = model(x)
    assert out.shape == x.shape
    out.abs().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    assert model.output.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [(37, 50), (41, 8), (8, 13)])
def test_sizes_not_divisible_by_8_are_padded_and_cropped(size):
    torch.manual_seed(0)
    model = Restormer(**TINY).eval()
    x = torch.rand(1, 1, *size)
    padded, orig = pad_to_multiple(x, 8)
    assert orig == size and padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    torch.testing.assert_close(crop_to_size(padded, orig), x)
    with torch.no_grad():
        out = model(x)
        # same as running the padded image and cropping (the residual of the crop is x itself)
        ref = crop_to_size(model(padded), orig)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref)


def test_pad_uses_reflection():
    x = torch.arange(10.0).view(1, 1, 1, 10).expand(1, 1, 9, 10)
    padded, _ = pad_to_multiple(x, 8)
    torch.testing.assert_close(padded, F.pad(x, (0, 6, 0, 7), mode="reflect"))


def test_bad_input_and_config():
    model = Restormer(**TINY)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="heads"):
        Restormer(dim=6, heads=(4, 2, 4, 8))
    with pytest.raises(ValueError, match="residual"):
        Restormer(in_channels=1, out_channels=3)
    assert Restormer(in_channels=1, out_channels=3, residual=False, **TINY)(torch.rand(1, 1, 16, 16)).shape[1] == 3


def test_loader_wrappers_and_errors(tmp_path):
    fx = load_fixture("restormer_official_tiny.pt")
    model = restormer_from_official_config(fx["config"]).eval()
    # a DDP-prefixed state dict wrapped in a checkpoint dictionary, read from a file
    wrapped = {"state_dict": {f"module.{k}": v for k, v in fx["state_dict"].items()}, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    load_official_state_dict(model, path)
    with torch.no_grad():
        assert (model(fx["input"]) - fx["output_eval"]).abs().max() <= PARITY_TOL

    broken = dict(fx["state_dict"])
    broken.pop("output.weight")
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \(1\): output.weight[\s\S]*unexpected \(1\): extra.weight"):
        load_official_state_dict(model, broken)
    other = Restormer(dim=16, num_blocks=(1, 1, 1, 2), num_refinement_blocks=1)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_official_state_dict(other, fx["state_dict"])
    with pytest.raises(ValueError, match=r"\(ckpt.pth\) into Restormer: shape mismatch"):  # read once, named by its file
        load_official_state_dict(other, fx["state_dict"], source="ckpt.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_official_state_dict(model, tmp_path / "nope.pth")


def test_checkpoints_load_into_wrapped_models():
    """DataParallel and torch.compile wrappers (nested too) are looked through: the bare model's keys load."""
    from medir_monai.wrappers import unwrap

    fx = load_fixture("restormer_official_tiny.pt")
    model = restormer_from_official_config(fx["config"]).eval()
    wrapped = torch.nn.DataParallel(torch.compile(model))  # compiling happens at the first call, never here
    assert unwrap(wrapped) is model and unwrap(model) is model
    load_official_state_dict(wrapped, fx["state_dict"])
    with torch.no_grad():
        assert (model(fx["input"]) - fx["output_eval"]).abs().max() <= PARITY_TOL


def test_trace_generalises_to_other_sizes():
    torch.manual_seed(0)
    model = Restormer(**TINY).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.rand(1, 1, 32, 32))
    for size in [(2, 1, 40, 24), (1, 1, 27, 35)]:
        x = torch.rand(size)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x))
