"""The speed and memory options compute the same function: channels-last layout, split GDFN halves, the attention
fast paths, per-sample depthwise convs, activation checkpointing, the MoE dispatch choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks.cablock import FeedForward

from torch.utils._python_dispatch import TorchDispatchMode

from medir_monai.networks import blocks
from medir_monai.networks.amir import AMIR, SpatialMoE
from medir_monai.networks.blocks import GatedFeedForward, channel_attention
from medir_monai.networks.moe import dense_dispatch, run_top_k_experts
from medir_monai.networks.restormer import Restormer
from medir_monai.networks.tat import TAT, per_sample_depthwise_conv
from medir_monai.networks.tat_adaptive import _depthwise_shift_and_add

TOL = 1e-5
TINY = dict(dim=8, num_blocks=(1, 1, 1, 2), num_refinement_blocks=1)
MODELS = {"restormer": Restormer, "amir": AMIR, "tat": lambda **kw: TAT(train_size=32, **kw)}


pytestmark = pytest.mark.usefixtures("one_thread")


def naive_channel_attention(qkv: torch.Tensor, heads: int, temperature: torch.Tensor) -> torch.Tensor:
    """Restormer Eq. 1 written the textbook way (F.normalize on q and k, per-head softmax)."""
    b, c3, h, w = qkv.shape
    q, k, v = (t.reshape(b, heads, c3 // 3 // heads, h * w) for t in qkv.chunk(3, dim=1))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    attn = ((q @ k.transpose(-2, -1)) * temperature).softmax(dim=-1)
    return (attn @ v).reshape(b, c3 // 3, h, w)


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_attention_matches_the_formula_in_both_layouts(heads, channels_last):
    torch.manual_seed(0)
    qkv = torch.randn(2, 3 * 12, 9, 7)
    temperature = torch.rand(heads, 1, 1) + 0.5
    expected = naive_channel_attention(qkv, heads, temperature)
    if channels_last:
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    out = channel_attention(qkv.requires_grad_(), heads, temperature)
    assert (out - expected).abs().max() <= TOL
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    out.sum().backward()
    assert torch.isfinite(qkv.grad).all()


def test_channel_attention_does_not_overflow_in_half_precision():
    """The un-normalised q k^T sums over all pixels: it must not run in float16 (max 65504)."""
    torch.manual_seed(0)
    qkv = 8.0 * torch.randn(1, 3 * 4, 64, 64)  # |q_i . k_j| up to ~1e5 > 65504
    expected = naive_channel_attention(qkv, 1, torch.ones(1, 1, 1))
    for layout in (torch.contiguous_format, torch.channels_last):
        out = channel_attention(qkv.half().contiguous(memory_format=layout), 1, torch.ones(1, 1, 1).half())
        assert torch.isfinite(out).all()
        assert (out.float() - expected).abs().max() <= 0.05


def test_channel_attention_gradient_is_finite_for_an_all_zero_channel():
    """The norms are floored before the square root: a dead channel (e.g. a blank image) must not give NaN."""
    qkv = torch.randn(1, 3 * 4, 6, 6)
    qkv[:, 0] = 0.0  # an all-zero query channel
    qkv[:, 4] = 0.0  # an all-zero key channel
    qkv = qkv.contiguous(memory_format=torch.channels_last).requires_grad_()
    channel_attention(qkv, 1, torch.ones(1, 1, 1)).square().sum().backward()
    assert torch.isfinite(qkv.grad).all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_gated_feed_forward_equals_monai_feed_forward(channels_last):
    torch.manual_seed(0)
    ours = GatedFeedForward(10, 2.66, bias=True)
    x = torch.randn(2, 10, 8, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ours, x_monai = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(x_ours)
    expected = FeedForward.forward(ours, x_monai)  # MONAI's chunked forward, same parameters
    assert (out - expected).abs().max() <= TOL
    out.square().sum().backward()
    grads = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    expected.square().sum().backward()
    for got, want in zip(grads, (p.grad for p in ours.parameters())):
        assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    assert (x_ours.grad - x_monai.grad).abs().max() <= 1e-4


def test_gated_feed_forward_no_grad_is_in_place_safe():
    """The in-place gating (no grad) must give the same values and leave the input untouched."""
    torch.manual_seed(0)
    ffn = GatedFeedForward(6, 2.0, bias=False)
    x = torch.randn(1, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    keep = x.clone()
    with torch.no_grad():
        out = ffn(x)
    assert torch.equal(x, keep)
    assert (out - FeedForward.forward(ffn, x)).abs().max() <= TOL


@pytest.mark.parametrize("batch", [1, 3])
def test_per_sample_depthwise_conv_paths_agree(batch):
    torch.manual_seed(0)
    x = torch.randn(batch, 5, 9, 8)
    kernel = torch.randn(batch, 5, 1, 3, 3)
    reference = _depthwise_shift_and_add(x, kernel[:, :, 0])
    for layout in (torch.contiguous_format, torch.channels_last):
        out = per_sample_depthwise_conv(x.contiguous(memory_format=layout), kernel)
        assert (out - reference).abs().max() <= TOL
    # each sample really uses its own kernel
    if batch > 1:
        swapped = per_sample_depthwise_conv(x, kernel.flip(0))
        assert (swapped - reference).abs().max() > 1e-2


def _train_forward(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor):
    torch.manual_seed(123)  # AMIR's gating noise
    out = model(x)
    loss = (out - target).abs().mean()
    if isinstance(model, AMIR):
        loss = loss + 1e-3 * model.aux_loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("name", list(MODELS))
def test_layout_and_checkpointing_options_do_not_change_the_model(name):
    """Same weights: channels-last on/off and activation checkpointing on/off give the same outputs and
    gradients in a training step (AMIR with its noisy gating, same seed)."""
    torch.manual_seed(0)
    base = MODELS[name](**TINY, channels_last=False).train()
    x, target = torch.rand(2, 1, 32, 24), torch.rand(2, 1, 32, 24)
    ref_out, ref_grads = _train_forward(base, x, target)
    for options in ({"channels_last": True}, {"channels_last": True, "activation_checkpointing": True}):
        variant = MODELS[name](**TINY, **options).train()
        variant.load_state_dict(base.state_dict())
        assert variant.activation_checkpointing == options.get("activation_checkpointing", False)
        out, grads = _train_forward(variant, x, target)
        assert (out - ref_out).abs().max() <= TOL, options
        assert grads.keys() == ref_grads.keys()
        for key, grad in grads.items():
            want = ref_grads[key]
            assert (grad - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max())), (options, key)
        assert out.is_contiguous()  # NCHW out whatever the body's layout


class _CountPointwiseConvolutions(TorchDispatchMode):
    """Counts the 1x1 ``aten.convolution`` calls (forward) of the code run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and tuple(args[1].shape[-2:]) == (1, 1):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(MODELS))
def test_pointwise_convolutions_as_gemms_are_the_same_model(name, monkeypatch):
    """The GEMM path of the 1x1 convolutions (taken on AVX2-only CPUs) gives the outputs and gradients of
    oneDNN's convolution, and replaces every 1x1 convolution of the transformer blocks and skip reductions."""
    torch.manual_seed(0)
    model = MODELS[name](**TINY).train()
    x, target = torch.rand(2, 1, 32, 24), torch.rand(2, 1, 32, 24)
    results, pointwise_convs = {}, {}
    for as_gemm in (False, True):
        monkeypatch.setattr(blocks, "POINTWISE_AS_GEMM", as_gemm)
        model.zero_grad(set_to_none=True)
        with _CountPointwiseConvolutions() as counter:
            results[as_gemm] = _train_forward(model, x, target)
        pointwise_convs[as_gemm] = counter.count
    (conv_out, conv_grads), (gemm_out, gemm_grads) = results[False], results[True]
    assert (gemm_out - conv_out).abs().max() <= TOL
    assert gemm_grads.keys() == conv_grads.keys()
    for key, grad in gemm_grads.items():
        assert (grad - conv_grads[key]).abs().max() <= 1e-4 * max(1.0, float(conv_grads[key].abs().max())), key
    # left as convolutions: AMIR's instruction network (three, on 6 px maps), TAT's fused tail (one, in a Sequential)
    assert pointwise_convs[True] == {"amir": 3, "tat": 1}.get(name, 0) < pointwise_convs[False]


@pytest.mark.parametrize(
    "capability, vendor, as_gemm",
    [
        ("AVX2", "GenuineIntel", True),  # oneDNN's AVX2 1x1 conv is the slower one on Intel
        ("DEFAULT", "GenuineIntel", True),
        ("AVX512", "GenuineIntel", False),  # oneDNN's AVX-512 kernel wins
        ("AVX2", "AuthenticAMD", False),  # MKL's GEMM loses to oneDNN on an AVX2-only AMD EPYC
        ("AVX512", "AuthenticAMD", False),
        ("AVX2", "", False),  # vendor unknown: PyTorch's own choice, the convolution
    ],
)
def test_pointwise_path_is_chosen_by_kernels_and_vendor(capability, vendor, as_gemm):
    assert blocks._gemm_is_faster_than_onednn(capability, vendor) is as_gemm


def test_cpu_vendor_reads_the_kernels_vendor_string():
    vendor = blocks.cpu_vendor()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        assert vendor == ""
        return
    lines = [line for line in cpuinfo.read_text(errors="replace").splitlines() if line.startswith("vendor_id")]
    assert vendor == (lines[0].split(":", 1)[1].strip() if lines else "")


def test_traced_graphs_keep_the_convolution_whatever_the_cpu(monkeypatch):
    """An exported graph must not depend on the exporting CPU: tracing takes the convolution path."""
    monkeypatch.setattr(blocks, "POINTWISE_AS_GEMM", True)
    model = Restormer(**TINY).eval()
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        graph = str(torch.jit.trace(model, x).inlined_graph)
    assert "aten::linear" not in graph and "aten::_convolution" in graph


def _saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the activations the forward keeps for the backward (tensors that are views of parameters are
    free and not counted)."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if t.untyped_storage().data_ptr() not in parameter_storages:
            saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)  # what the forward keeps for the backward pass
    out.mean().backward()  # (recomputations in here are transient)
    return saved


@pytest.mark.parametrize("name", list(MODELS))
def test_activation_checkpointing_saves_far_fewer_activations(name):
    torch.manual_seed(0)
    model = MODELS[name](**TINY).train()
    x = torch.rand(1, 1, 32, 32)
    plain = _saved_activation_bytes(model, x)
    model.activation_checkpointing = True
    checkpointed = _saved_activation_bytes(model, x)
    assert checkpointed < 0.5 * plain
    model.activation_checkpointing = False
    assert not model.activation_checkpointing and _saved_activation_bytes(model, x) == plain


def test_activation_checkpointing_is_off_in_evaluation():
    torch.manual_seed(0)
    model = Restormer(**TINY, activation_checkpointing=True).eval()
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    assert _saved_activation_bytes(model, x) > 0  # a plain graph, no recomputation wrappers


def test_moe_auto_dispatch_is_sparse_on_cpu_and_dense_on_accelerators():
    moe = SpatialMoE(6)
    assert moe.dispatch == "auto"
    assert not dense_dispatch(moe.dispatch, torch.device("cpu"))
    assert dense_dispatch(moe.dispatch, torch.device("cuda"))
    assert dense_dispatch("dense", torch.device("cpu")) and not dense_dispatch("sparse", torch.device("cuda"))
    with pytest.raises(ValueError, match="dispatch"):
        SpatialMoE(6, dispatch="fast")


@pytest.mark.parametrize("item_shape", [(5,), (3, 4, 6)])
@pytest.mark.parametrize("skip_idle", [False, True])
def test_sparse_and_dense_expert_dispatch_agree(item_shape, skip_idle):
    """The shared dispatcher (AMIR tokens [N, C], DiffCode images [B, C, H, W]): entry [i, j] is
    experts[top_idx[i, j]](items[i]) both ways; with ``skip_idle`` an unchosen expert is not called."""
    torch.manual_seed(0)
    experts = [torch.nn.Linear(item_shape[-1], item_shape[-1]) for _ in range(4)]
    items = torch.randn(7, *item_shape)
    top_idx = torch.tensor([[0, 2], [2, 0], [1, 2], [0, 1], [2, 1], [1, 0], [0, 2]])  # expert 3 idle
    calls = []
    handle = experts[3].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    sparse = run_top_k_experts(items, top_idx, experts, dense=False, skip_idle=skip_idle)
    assert calls == ([] if skip_idle else [0])
    handle.remove()
    dense = run_top_k_experts(items, top_idx, experts, dense=True)
    assert sparse.shape == dense.shape == (7, 2, *item_shape)
    assert (sparse - dense).abs().max() <= TOL
    assert torch.allclose(sparse[2, 1], experts[2](items[2]), atol=TOL)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("training", [False, True])
def test_every_convolution_sees_channels_last_features(name, training, monkeypatch):
    """A single op that returns NCHW silently turns the rest of the network NCHW (several times slower on CPU):
    every multi-channel conv input must stay channels-last, including TAT's local converter (input larger
    than its window) and the per-sample depthwise convs."""
    layouts: list[tuple[tuple[int, ...], bool]] = []
    conv2d = F.conv2d

    def recording_conv2d(x, weight, *args, **kwargs):
        if x.shape[1] > 1 and x.shape[-1] * x.shape[-2] > 1 and x.shape[0] * x.shape[1] > 1:
            layouts.append((tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last)))
        return conv2d(x, weight, *args, **kwargs)

    torch.manual_seed(0)
    kwargs = dict(TINY, train_size=16) if name == "tat" else TINY
    model = (TAT if name == "tat" else MODELS[name])(**kwargs).train(training)
    monkeypatch.setattr(F, "conv2d", recording_conv2d)
    x = torch.rand(2, 1, 40, 48)
    with torch.set_grad_enabled(training):
        model(x)
    # AMIR's instruction network reads the 1-channel image itself (NCHW, tiny): skip its convs
    body = [ok for shape, ok in layouts if not (name == "amir" and shape[1] == model.dict_generator.cond_net[0].out_channels)]
    assert body and all(body), [shape for shape, ok in layouts if not ok]


def _quick_parser(bundle: str):
    """A parser of the bundle's ``train.json`` with its ``quick.json`` merged over it."""
    from monai.bundle import ConfigParser

    from conftest import REPO_ROOT

    configs = REPO_ROOT / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "quick.json")])
    return parser


@pytest.mark.parametrize("bundle", ["restormer", "amir", "tat"])
def test_bundle_switches_reach_the_network_and_trainer(bundle):
    parser = _quick_parser(bundle)
    assert parser["channels_last"] is True and parser["activation_checkpointing"] is False  # the defaults
    parser["activation_checkpointing"] = True
    parser["channels_last"] = False
    network = parser.get_parsed_content("network_def")
    assert network.activation_checkpointing and not network.channels_last
    trainer = parser["train"]["trainer"]
    assert trainer["compile"] == "@compile" and trainer["compile_kwargs"] == {"dynamic": False}
    assert trainer["amp_kwargs"] == {"dtype": "@amp_dtype"}
    assert parser.get_parsed_content("amp_dtype") is torch.bfloat16


def _optimizers(parser) -> list[torch.optim.Optimizer]:
    names = ["optimizer"] + [f"{stage}#optimizer" for stage in ("stage1", "stage2") if stage in parser.config]
    return [parser.get_parsed_content(name) for name in names]


@pytest.mark.parametrize("bundle", ["restormer", "amir", "tat", "diffcode"])
def test_fused_optimizer_switch_keeps_torch_default_unless_asked(bundle):
    """``fused_optimizer: null`` leaves torch's choice (foreach on GPUs; an explicit ``False`` would turn that off);
    ``true`` gives every optimiser of the bundle the fused kernel."""
    parser = _quick_parser(bundle)
    if bundle == "amir":
        assert parser["fused_optimizer"] is True  # the README main job's speed setting
    parser["fused_optimizer"] = None
    parser.parse()
    defaults = [opt.defaults["fused"] for opt in _optimizers(parser)]
    assert defaults == [None] * (3 if bundle == "diffcode" else 1)
    parser["fused_optimizer"] = True
    parser.parse()
    assert all(opt.defaults["fused"] is True for opt in _optimizers(parser))


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
def test_fused_adam_takes_the_same_steps_as_the_loop(optimizer):
    torch.manual_seed(0)
    model = AMIR(**TINY)
    fused_model = AMIR(**TINY)
    fused_model.load_state_dict(model.state_dict())
    start = [p.detach().clone() for p in model.parameters()]
    plain = optimizer(model.parameters(), lr=5e-4, weight_decay=1e-4)
    fused = optimizer(fused_model.parameters(), lr=5e-4, weight_decay=1e-4, fused=True)
    for step in range(3):
        x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(step))
        for net, opt in ((model, plain), (fused_model, fused)):
            opt.zero_grad()
            torch.manual_seed(step)  # the same routing noise for both
            out = net(x)
            (out[0] if isinstance(out, tuple) else out).square().mean().backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), fused_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    assert sum(not torch.equal(a, a0) for a, a0 in zip(model.parameters(), start)) > len(start) // 2  # they moved
