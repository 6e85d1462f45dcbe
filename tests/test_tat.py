"""TAT (MICCAI 2025): parity with the authors' code (fixtures), published size, kernels, local converter."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import load_fixture, official_backbone_kwargs
import torch.nn.functional as F

from medir_monai.networks.official import load_official_state_dict
from medir_monai.networks.tat import (
    TAT,
    SampleAdaptiveDepthwiseConv,
    channel_attention,
    local_converter,
    local_window_starts,
)

TOL = 1e-5
PAPER_PARAMS = 41_687_424



def _from_official_config(cfg: dict, **kwargs) -> TAT:
    return TAT(
        **official_backbone_kwargs(cfg),
        **kwargs,
    )


def _tiny(**kwargs) -> TAT:
    cfg = dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, tren_features=8)
    cfg.update(kwargs)
    return TAT(**cfg)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def official():
    data = load_fixture("tat_official_tiny.pt")
    model = _from_official_config(data["config"]).eval()
    load_official_state_dict(model, data["state_dict"])
    return model, data


# -- parity with the authors' code ----------------------------------------------------------------------
@pytest.mark.parametrize("size", ["128x128", "96x160"])
def test_official_parity(official, size):
    model, data = official
    with torch.no_grad():
        out = model(data[f"input_{size}"])
    err = (out - data[f"output_{size}"]).abs().max().item()
    assert err <= TOL, f"{size}: max abs error {err:.3g} > {TOL}"


def test_official_keys_round_trip(official):
    model, data = official
    direct = _from_official_config(data["config"])
    result = direct.load_state_dict(direct.convert_official_state_dict(data["state_dict"]), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(model.to_official_state_dict()) == set(data["state_dict"])
    # conversion is idempotent: our own keys pass through unchanged
    assert set(model.convert_official_state_dict(model.state_dict())) == set(model.state_dict())


def test_official_fixture_exercises_generated_kernels(official):
    """The fixture's lambda is non-zero, so the generated kernels matter.

    Their effect on the fixture output is small (TREN's kernels are ~1e-5 at random init), so check that
    the parity above resolves it: dropping the kernels (lambda = 0) moves the output by more than the
    tolerance and by at least 10x the error of the full model.
    """
    model, data = official
    probe = _from_official_config(data["config"]).eval()
    probe.load_state_dict(model.state_dict())
    for name, p in probe.named_parameters():
        if name.endswith("lambda_dw"):
            p.data.zero_()
    x, ref = data["input_128x128"], data["output_128x128"]
    with torch.no_grad():
        without_kernels = (probe(x) - ref).abs().max().item()
        full = (model(x) - ref).abs().max().item()
    assert without_kernels > TOL
    assert without_kernels > 10 * full


# -- published configuration ----------------------------------------------------------------------------
def test_paper_parameter_count():
    model = TAT()
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS
    # TREN's first conv sees 8 * dim / 16 channels after the pixel shuffle
    assert model.tren.encoder[0].in_channels == 48 * 8 // 16


@pytest.mark.parametrize("size", [(128, 128), pytest.param((192, 400), marks=pytest.mark.slow)])
def test_paper_config_shapes(size):
    torch.manual_seed(0)
    model = TAT().eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, *size))
    assert out.shape == (1, 1, *size)
    assert torch.isfinite(out).all()


# -- sample-adaptive kernels and TREN ---------------------------------------------------------------------
def test_sample_adaptive_conv_matches_per_sample_conv():
    torch.manual_seed(0)
    conv = SampleAdaptiveDepthwiseConv(6)
    conv.lambda_dw.data.normal_()
    x, gen = torch.randn(3, 6, 9, 7), torch.randn(3, 6, 1, 3, 3)
    out = conv(x, gen)
    for b in range(3):
        kernel = (conv.weight[0] + conv.lambda_dw[0] * gen[b]).reshape(6, 1, 3, 3)
        expected = F.conv2d(x[b : b + 1], kernel, padding=1, groups=6)
        torch.testing.assert_close(out[b : b + 1], expected, atol=1e-5, rtol=1e-5)


def test_zero_lambda_makes_tren_irrelevant():
    """W = W_shared + lambda * W_generated with lambda zero-initialised: TREN cannot change the output."""
    torch.manual_seed(0)
    model = _tiny().eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        before = model(x)
        for p in model.tren.parameters():
            p.add_(torch.randn_like(p))
        after = model(x)
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_tren_stop_gradient_and_kernel_gradient():
    torch.manual_seed(0)
    model = _tiny()
    for name, p in model.named_parameters():
        if name.endswith("lambda_dw"):
            p.data.fill_(0.5)
    captured = {}
    hook = model.tren.register_forward_hook(lambda mod, args, out: captured.update(inp=args[0], out=out))
    out = model(torch.rand(2, 1, 32, 32))
    hook.remove()
    lat_in = captured["inp"]
    assert lat_in.requires_grad  # the latent input itself is part of the graph...
    kernel_sum = sum(k.sum() for k in captured["out"].values())
    # ...but none of the generated kernels depends on it through TREN (stop-gradient)
    assert torch.autograd.grad(kernel_sum, lat_in, retain_graph=True, allow_unused=True)[0] is None
    out.abs().mean().backward()
    tren_grads = [p.grad for p in model.tren.parameters()]
    assert all(g is not None for g in tren_grads)
    assert sum(g.abs().sum().item() for g in tren_grads) > 0  # trained through the kernels


def test_tiny_forward_backward_padding_and_batch():
    torch.manual_seed(0)
    model = _tiny()
    x = torch.rand(2, 1, 36, 50, requires_grad=True)  # not multiples of 8
    out = model(x)
    assert out.shape == x.shape
    out.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # samples are independent: a batch equals its samples run one by one (kernels are per sample)
    model.eval()
    for name, p in model.named_parameters():
        if name.endswith("lambda_dw"):
            p.data.fill_(0.3)
    with torch.no_grad():
        batched = model(x.detach())
        single = torch.cat([model(x.detach()[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_traced_model_accepts_other_batch_sizes():
    """Under torch.jit.trace the adaptive convs avoid batch-sized groups: a batch-1 trace runs batch 3."""
    torch.manual_seed(0)
    model = _tiny(train_size=16).eval()  # 32x32 inputs go through the local converter's windows
    for name, p in model.named_parameters():
        if name.endswith("lambda_dw"):
            p.data.fill_(0.3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.rand(1, 1, 32, 32))
        x = torch.rand(3, 1, 32, 32)
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)


# -- test-time local converter ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, window, expected",
    [(128, 192, [0]), (192, 192, [0]), (256, 192, [0, 64]), (300, 192, [0, 108]), (400, 192, [0, 104, 208]),
     (10, 4, [0, 3, 6])],
)
def test_local_window_starts(size, window, expected):
    assert local_window_starts(size, window) == expected


@pytest.mark.parametrize("size, window", [(37, 5), (100, 24), (97, 96), (1, 3)])
def test_local_windows_cover_the_axis(size, window):
    starts = local_window_starts(size, window)
    win = min(size, window)
    covered = torch.zeros(size)
    for s in starts:
        assert 0 <= s <= size - win
        covered[s : s + win] += 1
    assert (covered > 0).all()


def test_local_converter_averages_overlapping_windows():
    torch.manual_seed(0)
    heads, temperature = 2, torch.rand(2, 1, 1) + 0.5
    qkv = torch.randn(2, 12, 6, 10)

    def attend(t):
        return channel_attention(t, heads, temperature)

    torch.testing.assert_close(local_converter(qkv, attend, (6, 10)), attend(qkv))  # one window = global
    torch.testing.assert_close(local_converter(qkv, attend, None), attend(qkv))
    out = local_converter(qkv, attend, (6, 7))  # columns [0, 7) and [3, 10)
    left, right = attend(qkv[..., 0:7]), attend(qkv[..., 3:10])
    torch.testing.assert_close(out[..., 0:3], left[..., 0:3])
    torch.testing.assert_close(out[..., 7:10], right[..., 4:7])
    torch.testing.assert_close(out[..., 3:7], 0.5 * (left[..., 3:7] + right[..., 0:4]))


def test_local_converter_in_model():
    """Larger-than-window maps use windows (output differs from global attention) and keep the shape."""
    torch.manual_seed(0)
    windowed = _tiny(train_size=16).eval()  # level-1 window 24: a 48x40 input needs several windows
    plain = _tiny(train_size=16, local_window_ratio=None).eval()
    plain.load_state_dict(windowed.state_dict())
    x = torch.rand(1, 1, 48, 40)
    with torch.no_grad():
        a, b = windowed(x), plain(x)
        small = torch.rand(1, 1, 16, 16)  # training size: no windows at any level
        torch.testing.assert_close(windowed(small), plain(small))
    assert a.shape == x.shape
    assert (a - b).abs().max().item() > 1e-6


# -- training options outside the paper (depthwise init, Restormer-style output) -------------------------------
def _shared_depthwise_kernels(model: TAT) -> dict[str, torch.Tensor]:
    """The shared kernels of the attention ("attn") and feed-forward ("ffn") depthwise convs, concatenated."""
    kernels: dict[str, list[torch.Tensor]] = {"attn": [], "ffn": []}
    for name, module in model.named_modules():
        if isinstance(module, SampleAdaptiveDepthwiseConv):
            kernels["attn" if ".attn." in name else "ffn"].append(module.weight.detach().flatten())
    return {target: torch.cat(weights) for target, weights in kernels.items()}


def test_depthwise_init_authors_and_uniform():
    """Authors: N(0, 1) attention, Kaiming fan-out (std sqrt(2 / 9)) feed-forward; uniform: +-1/3 for 3x3."""
    torch.manual_seed(0)
    authors = _shared_depthwise_kernels(_tiny(dim=16))
    assert authors["attn"].std().item() == pytest.approx(1.0, rel=0.05)
    assert authors["ffn"].std().item() == pytest.approx((2.0 / 9.0) ** 0.5, rel=0.05)
    uniform = _shared_depthwise_kernels(_tiny(dim=16, depthwise_init="uniform"))
    for weights in uniform.values():
        assert weights.abs().max().item() <= 1.0 / 3.0
        assert weights.std().item() == pytest.approx(1.0 / 3.0 / 3.0**0.5, rel=0.05)  # std of U(-b, b) = b / sqrt 3


def test_conv_tail_replaces_the_fused_tail():
    torch.manual_seed(0)
    fused, conv = _tiny(), _tiny(tail="conv")
    assert hasattr(fused, "reduce_final") and not hasattr(conv, "reduce_final")
    assert conv.output.in_channels == 2 * 8  # the refinement's 2 * dim channels
    fused_params = sum(p.numel() for p in fused.parameters())
    conv_params = sum(p.numel() for p in conv.parameters())
    # fused: conv3x3 (5 dim -> dim) + conv1x1 (dim -> dim) + conv3x3 (dim -> 1); conv: conv3x3 (2 dim -> 1)
    assert fused_params - conv_params == 9 * 40 * 8 + 8 * 8 + 9 * 8 - 9 * 16
    x = torch.rand(2, 1, 24, 24, requires_grad=True)
    out = conv(x)
    out.mean().backward()
    assert out.shape == x.shape and conv.output.weight.grad is not None


# -- errors ---------------------------------------------------------------------------------------------------
def test_bad_config_and_input():
    with pytest.raises(ValueError, match="tail"):
        TAT(tail="restormer")
    with pytest.raises(ValueError, match="TAT: depthwise_init"):
        TAT(depthwise_init="normal")
    with pytest.raises(ValueError, match="dim"):
        TAT(dim=7)
    with pytest.raises(ValueError, match="heads"):
        TAT(dim=8, heads=(3, 2, 4, 8))
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        TAT(in_channels=1, out_channels=2)
    with pytest.raises(ValueError, match="local_window_ratio"):
        TAT(local_window_ratio=0)
    with pytest.raises(ValueError, match="expected input"):
        _tiny()(torch.rand(1, 2, 16, 16))
