"""DiffCode: residual quantisation, straight-through gradients, eq. 5, task-aware routing, the full pipeline."""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.networks.layers.vector_quantizer import EMAQuantizer
from monai.networks.schedulers import DDPMScheduler

from medir_monai.losses import DiffCodeCodebookLoss
from medir_monai.networks.diffcode import (
    DiffCode,
    DiffCodeAutoencoder,
    LatentDiffusion,
    NAFBlock,
    TaskCodebookBank,
    TaskGlobalRouting,
    codebook_perplexity,
)

EMB = 8
TINY_AE = dict(num_embeddings=16, embedding_dim=EMB, depth=3, channels=(8, 8), num_blocks=(1, 1))
TINY_DIFF = dict(embedding_dim=EMB, channels=(8, 8), num_blocks=(1, 1), hidden_dim=16)
TINY = dict(
    autoencoder=TINY_AE,
    channels=(8, 8, 8, 8),
    num_blocks=(1, 1, 1, 1),
    classifier_channels=(4,),
)
PAPER_BETAS = (0.1, 0.99, 8)


def tiny_model(**kwargs) -> DiffCode:
    torch.manual_seed(0)
    return DiffCode(**{**TINY, **kwargs})


@contextmanager
def no_tracer_warnings():
    """Fail if tracing warns that it baked a run-time value into the graph."""
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        yield
    baked = [str(w.message) for w in log if issubclass(w.category, torch.jit.TracerWarning)]
    assert not baked, baked


# -- stage I: codebook bank ------------------------------------------------------------------------------
def scaled_axis_codebook(depth: int, extra: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A codebook in which every sum of one code per level is recovered exactly by greedy residual quantisation.

    Level ``d`` owns the codes ``s_d * (+-e_{2d}), s_d * (+-e_{2d+1})`` with ``s_d = 2**(depth - d)`` (powers of two:
    exact in float32); ``extra`` distractor codes live on two more axes, orthogonal to all of them. Rows are
    shuffled. Returns ``(codebook [K, C], level_codes [depth, 4])`` (row indices of each level's codes).
    """
    dim = 2 * depth + 2
    rows, level_rows = [], []
    for d in range(depth):
        scale = 2.0 ** (depth - d)
        ids = []
        for axis in (2 * d, 2 * d + 1):
            for sign in (1.0, -1.0):
                code = torch.zeros(dim)
                code[axis] = sign * scale
                ids.append(len(rows))
                rows.append(code)
        level_rows.append(ids)
    for _ in range(extra):
        code = torch.zeros(dim)
        code[-2:] = torch.randn(2, generator=generator) * 3
        rows.append(code)
    perm = torch.randperm(len(rows), generator=generator)
    inverse = torch.argsort(perm)  # new position of old row i
    return torch.stack(rows)[perm], inverse[torch.tensor(level_rows)]


def test_residual_quantisation_recovers_a_sum_of_depth_codes_exactly():
    depth, extra = 4, 6
    g = torch.Generator().manual_seed(1)
    book, level_codes = scaled_axis_codebook(depth, extra, g)
    bank = TaskCodebookBank(num_tasks=1, num_embeddings=book.shape[0], embedding_dim=book.shape[1], depth=depth)
    bank.codebooks.data[0, 0] = book
    b, h, w = 2, 3, 5
    choice = torch.randint(0, 4, (b, depth, h, w), generator=g)  # which of its 4 codes each level contributes
    expected_idx = level_codes[torch.arange(depth).view(1, depth, 1, 1), choice]  # [B, D, h, w]
    z = book[expected_idx].sum(1).permute(0, 3, 1, 2).contiguous()  # [B, C, h, w]

    z_q, vq_loss, indices = bank(z, 0)
    assert torch.equal(indices, expected_idx)
    assert torch.equal(z_q, z)
    assert float(vq_loss.detach()) == 0.0
    assert torch.equal(bank.lookup(indices, 0), z)


def test_per_level_codebooks():
    bank = TaskCodebookBank(num_tasks=2, num_embeddings=4, embedding_dim=4, depth=2, shared_codebook=False)
    assert bank.codebooks.numel() == 2 * 2 * 4 * 4
    eye = torch.eye(4)
    coarse, fine = torch.cat([eye[:2], -eye[:2]]) * 8.0, torch.cat([eye[2:], -eye[2:]])  # levels on other axes
    bank.codebooks.data[1] = torch.stack([coarse, fine])
    a, b = torch.randint(0, 4, (1, 2, 3)), torch.randint(0, 4, (1, 2, 3))
    z = (coarse[a] + fine[b]).permute(0, 3, 1, 2)
    bank.train()
    z_q, _, indices = bank(z, 1)
    assert torch.equal(indices, torch.stack([a, b], dim=1)) and torch.equal(z_q, z)
    used = torch.cat([a.unique(), b.unique()]).unique().numel()
    assert bank.usage()[1]["used_codes"] == used and bank.usage()[1]["tokens"] == 2 * 6


def test_single_level_matches_monai_nearest_code_search():
    torch.manual_seed(0)
    monai_vq = EMAQuantizer(spatial_dims=2, num_embeddings=32, embedding_dim=6)
    bank = TaskCodebookBank(num_tasks=1, num_embeddings=32, embedding_dim=6, depth=1, codebook_init="normal")
    bank.codebooks.data[0, 0] = monai_vq.embedding.weight.data
    z = torch.randn(3, 6, 4, 5)
    _, _, ours = bank(z, 0)
    _, _, theirs = monai_vq.quantize(z)
    assert torch.equal(ours[:, 0], theirs)


def test_each_sample_uses_its_task_codebook():
    torch.manual_seed(0)
    bank = TaskCodebookBank(num_tasks=2, num_embeddings=8, embedding_dim=4, depth=1, codebook_init="normal")
    bank.codebooks.data[1] = bank.codebooks.data[0] + 10.0  # far apart: the wrong book is never nearest
    idx = torch.randint(0, 8, (2, 1, 3, 3))
    task = torch.tensor([0, 1])
    z = torch.stack([bank.codebooks.data[t, 0][idx[i, 0]] for i, t in enumerate(task.tolist())]).permute(0, 3, 1, 2)
    z_q, _, indices = bank(z, task)
    assert torch.equal(indices, idx)
    assert torch.allclose(z_q, z)
    with pytest.raises(ValueError, match="task indices must be in 0..1"):
        bank(z, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="one entry per sample"):
        bank(z, [0, 1, 1])
    with pytest.raises(ValueError, match="integer indices"):
        bank(z, torch.tensor([0.0, 1.0]))


def test_straight_through_passes_the_gradient_to_the_encoder():
    torch.manual_seed(0)
    bank = TaskCodebookBank(num_tasks=1, num_embeddings=16, embedding_dim=4, depth=2, codebook_init="normal")
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3)
    z_q, _, _ = bank(z, 0)
    (z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)  # identity gradient through the quantiser

    ae = DiffCodeAutoencoder(num_tasks=1, **TINY_AE)
    hq = torch.rand(2, 1, 8, 8)
    recon, _, _ = ae(hq, 0)
    F.l1_loss(recon, hq).backward()  # reconstruction term only: no vq loss
    grads = [p.grad for p in ae.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_vq_loss_terms_and_their_gradients():
    torch.manual_seed(0)
    beta = 0.25
    bank = TaskCodebookBank(num_tasks=1, num_embeddings=64, embedding_dim=4, depth=2, commitment_cost=beta)
    bank.codebooks.data.normal_()
    z = torch.randn(1, 4, 2, 3, requires_grad=True)
    z_q, vq_loss, indices = bank(z, 0)
    z_q = z_q.detach()
    mse = F.mse_loss(z_q, z.detach())
    assert torch.allclose(vq_loss, (1 + beta) * mse)
    assert torch.allclose(bank.last_terms["codebook"], mse) and torch.allclose(bank.last_terms["commitment"], mse)
    vq_loss.backward()
    # only the commitment term reaches z: d/dz beta * mean((z - sg z_q)^2)
    assert torch.allclose(z.grad, 2 * beta * (z.detach() - z_q) / z.numel(), atol=1e-7)
    # only codes that were selected receive codebook gradient
    row_has_grad = bank.codebooks.grad[0, 0].abs().sum(1) > 0
    used = torch.zeros(64, dtype=torch.bool)
    used[indices.unique()] = True
    assert torch.equal(row_has_grad, used)


def test_codebook_usage_statistics_per_task():
    bank = TaskCodebookBank(num_tasks=2, num_embeddings=8, embedding_dim=2, depth=1, codebook_init="normal")
    book = bank.codebooks.data[0, 0]
    z = torch.stack([book[0], book[3], book[0], book[3]], dim=0).T.reshape(1, 2, 2, 2)  # codes 0 and 3, twice each
    bank.eval()
    bank(z, 0)
    assert bank.code_counts.sum() == 0  # evaluation does not count
    assert math.isclose(float(bank.last_perplexity[0]), 2.0, rel_tol=1e-6) and float(bank.last_perplexity[1]) == 0.0
    bank.train()
    bank(z, 0)
    stats = bank.usage(reset=True)
    assert stats[0]["used_codes"] == 2 and stats[0]["dead_codes"] == 6 and stats[0]["tokens"] == 4
    assert math.isclose(stats[0]["perplexity"], 2.0, rel_tol=1e-6)
    assert stats[1]["used_codes"] == 0 and stats[1]["perplexity"] == 0.0
    assert bank.code_counts.sum() == 0
    assert math.isclose(float(codebook_perplexity(torch.tensor([1.0, 1.0, 1.0, 1.0]))), 4.0, rel_tol=1e-9)


def test_cumulative_depth_loss_sums_partial_sum_errors():
    torch.manual_seed(0)
    bank = TaskCodebookBank(
        1, num_embeddings=32, embedding_dim=3, depth=2, depth_loss="cumulative", codebook_init="normal"
    )
    z = torch.randn(1, 3, 2, 2)
    z_q, vq_loss, indices = bank(z, 0)
    codes = bank.codebooks.data[0, 0][indices[0].permute(1, 2, 0)]  # [h, w, D, C]
    tokens = z[0].permute(1, 2, 0)
    expected = sum(F.mse_loss(codes[:, :, : d + 1].sum(2), tokens) for d in range(2)) * 1.25
    assert torch.allclose(vq_loss, expected)


def test_autoencoder_pads_and_reports_indices():
    ae = DiffCodeAutoencoder(num_tasks=3, **TINY_AE)
    hq = torch.rand(2, 1, 9, 6)
    recon, vq_loss, indices = ae(hq, torch.tensor([0, 2]))
    assert recon.shape == hq.shape and vq_loss.ndim == 0
    assert indices.shape == (2, TINY_AE["depth"], 5, 3)
    assert torch.allclose(ae.decode_indices(indices, [0, 2]), ae.decode(ae.quantizer.lookup(indices, [0, 2])))
    with pytest.raises(ValueError, match="expected \\(B, 1, H, W\\)"):
        ae(torch.rand(2, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="multiples of 2"):
        ae.encode(torch.rand(1, 1, 9, 8))


def test_stage1_loss():
    loss_fn = DiffCodeCodebookLoss()
    recon, hq = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    assert torch.isclose(loss_fn(recon, hq, torch.tensor(0.25)), torch.tensor(0.75))
    assert torch.isclose(loss_fn.last_terms["l1"], torch.tensor(0.5))
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(recon, hq[..., :1], torch.tensor(0.0))


# -- stage II: latent diffusion --------------------------------------------------------------------------
def paper_schedule_by_hand(t: int) -> tuple[float, float, float, float]:
    """``(beta_t, alpha_t, alphabar_t, alphabar_{t-1})`` of the paper's linear schedule, in plain Python."""
    start, end, steps = PAPER_BETAS
    betas = [start + i * (end - start) / (steps - 1) for i in range(steps)]
    abar = math.prod(1 - b for b in betas[: t + 1])
    abar_prev = math.prod(1 - b for b in betas[:t])
    return betas[t], 1 - betas[t], abar, abar_prev


def test_schedule_is_the_papers():
    diff = LatentDiffusion(**TINY_DIFF)
    start, end, steps = PAPER_BETAS
    assert diff.num_train_timesteps == steps
    assert torch.allclose(diff.scheduler.betas, torch.linspace(start, end, steps))
    for t in (0, 3, 7):
        _, _, abar, _ = paper_schedule_by_hand(t)
        assert math.isclose(float(diff.sqrt_abar[t]) ** 2, abar, rel_tol=1e-5)


@pytest.mark.parametrize("t", [3, 7])
def test_reverse_step_is_eq5_on_hand_computed_numbers(t):
    beta, alpha, abar, abar_prev = paper_schedule_by_hand(t)
    x_t, eps, u = [0.5, -1.2], [0.3, 0.7], [1.0, -0.5]
    sigma = math.sqrt((1 - abar_prev) / (1 - abar) * beta)
    eps_expected = [
        1 / math.sqrt(alpha) * (x - (1 - alpha) / math.sqrt(1 - abar) * e) + sigma * n for x, e, n in zip(x_t, eps, u)
    ]
    diff_eps = LatentDiffusion(**TINY_DIFF, prediction_type="epsilon")
    got = diff_eps.reverse_step(torch.tensor(eps), t, torch.tensor(x_t), noise=torch.tensor(u))
    assert torch.allclose(got, torch.tensor(eps_expected), rtol=1e-5, atol=1e-5)

    # x0 form with the x0 implied by the same eps: identical step (the two forms are one equation)
    x0 = [(x - math.sqrt(1 - abar) * e) / math.sqrt(abar) for x, e in zip(x_t, eps)]
    x0_expected = [
        math.sqrt(abar_prev) * beta / (1 - abar) * a + math.sqrt(alpha) * (1 - abar_prev) / (1 - abar) * x
        for a, x in zip(x0, x_t)
    ]
    diff_x0 = LatentDiffusion(**TINY_DIFF, prediction_type="sample")
    got_x0 = diff_x0.reverse_step(torch.tensor(x0), t, torch.tensor(x_t))
    assert torch.allclose(got_x0, torch.tensor(x0_expected), rtol=1e-5, atol=1e-5)
    assert torch.allclose(got_x0 + sigma * torch.tensor(u), got, rtol=1e-4, atol=1e-4)


def test_last_reverse_step_returns_the_x0_prediction():
    diff = LatentDiffusion(**TINY_DIFF)
    x0, x_t = torch.randn(2, EMB, 2, 2), torch.randn(2, EMB, 2, 2)
    assert torch.allclose(diff.reverse_step(x0, 0, x_t, noise=torch.randn_like(x_t)), x0)
    with pytest.raises(ValueError, match="t must be in 0..7"):
        diff.reverse_step(x0, 8, x_t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_reverse_step_matches_monai_ddpm_scheduler(prediction_type):
    diff = LatentDiffusion(**TINY_DIFF, prediction_type=prediction_type)
    start, end, steps = PAPER_BETAS
    sched = DDPMScheduler(
        steps, "linear_beta", clip_sample=False, prediction_type=prediction_type, beta_start=start, beta_end=end
    )
    torch.manual_seed(0)
    out, x_t = torch.randn(2, EMB, 3, 3), torch.randn(2, EMB, 3, 3)
    for t in range(steps):
        theirs, _ = sched.step(out, t, x_t, generator=torch.Generator().manual_seed(t))
        noise = torch.randn(out.size(), generator=torch.Generator().manual_seed(t))
        assert torch.allclose(diff.reverse_step(out, t, x_t, noise), theirs, rtol=1e-4, atol=1e-5)


def test_diffusion_trains_condition_encoder_and_denoiser_through_the_whole_chain():
    torch.manual_seed(0)
    diff = LatentDiffusion(**TINY_DIFF)
    calls = []
    diff.denoiser.register_forward_hook(lambda m, i, o: calls.append(int(i[2][0])))
    lq, z_hq = torch.rand(2, 1, 8, 6), torch.randn(2, EMB, 4, 3)
    out = diff(lq, z_hq)
    assert calls == list(reversed(range(diff.num_train_timesteps)))  # T steps, t = T-1 .. 0
    assert torch.isclose(out["loss"], F.l1_loss(out["z_hat"], z_hq))
    out["loss"].backward()
    for part in (diff.condition_encoder, diff.denoiser):
        assert sum(float(p.grad.abs().sum()) for p in part.parameters()) > 0
    assert diff.sample(lq).shape == z_hq.shape
    with pytest.raises(ValueError, match="z_hq must be"):
        diff(lq, torch.randn(2, EMB, 2, 3))
    with pytest.raises(ValueError, match="multiples of 2"):
        diff.sample(torch.rand(1, 1, 7, 6))


def test_denoiser_has_the_configured_number_of_linear_layers():
    diff = LatentDiffusion(**TINY_DIFF)
    linears = [m for m in diff.denoiser.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 5
    assert linears[0].in_features == 2 * EMB + 1 and linears[-1].out_features == EMB


def test_seeded_sampling_is_deterministic_and_stochastic_mode_differs():
    diff = LatentDiffusion(**TINY_DIFF)
    lq = torch.rand(1, 1, 4, 4)
    a = diff.sample(lq, generator=torch.Generator().manual_seed(3))
    b = diff.sample(lq, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    diff.stochastic = True
    c = diff.sample(lq, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(a, c)


# -- stage III: routing and the pipeline -----------------------------------------------------------------
def routing_with_busy_experts(**kwargs) -> TaskGlobalRouting:
    torch.manual_seed(0)
    route = TaskGlobalRouting(dim=4, num_experts=4, top_k=1, **kwargs)
    with torch.no_grad():
        for expert in route.experts:  # make every expert do something
            for p in expert.parameters():
                p.normal_(0, 0.5)
    return route


def test_top1_routing_runs_exactly_one_expert_per_image_weighted_by_the_gate_without_residual():
    route = routing_with_busy_experts()
    seen = []
    for e, expert in enumerate(route.experts):
        expert.register_forward_hook(lambda m, i, o, e=e: seen.append((e, i[0].shape[0])))
    x = torch.randn(5, 4, 6, 6)
    gate = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6], [0.2, 0.1, 0.5, 0.2],
                         [0.05, 0.8, 0.1, 0.05], [0.0, 0.0, 0.1, 0.9]])
    y, choice = route(x, gate)
    assert choice.tolist() == [1, 3, 2, 1, 3]
    assert sum(n for _, n in seen) == 5 and sorted(e for e, _ in seen) == [1, 2, 3]
    for b in range(5):  # Eq. 8: V_j E_j(x), no residual, V_j not renormalised
        j = int(choice[b])
        assert torch.allclose(y[b : b + 1], gate[b, j] * route.experts[j](x[b : b + 1]), atol=1e-6)
    route.dispatch = "dense"
    y_dense, _ = route(x, gate)
    assert torch.allclose(y, y_dense, atol=1e-6)
    with pytest.raises(ValueError, match="gate must be"):
        route(x, gate[:, :3])


def test_routing_passes_the_restoration_gradient_to_the_gating_vector():
    x = torch.randn(3, 4, 5, 5)
    gate = torch.softmax(torch.randn(3, 4), dim=1).requires_grad_(True)
    y, _ = routing_with_busy_experts()(x, gate)
    y.square().mean().backward()
    assert gate.grad is not None and float(gate.grad.abs().sum()) > 0  # reaches the task classifier at top-1
    assert not any(isinstance(m, torch.nn.Linear) for m in routing_with_busy_experts().modules())  # no own gate


def test_naf_encoder_and_decoder_levels_and_shapes():
    from medir_monai.networks.diffcode import NAFDecoder, NAFEncoder

    enc = NAFEncoder(1, 6, channels=(4, 8, 8), num_blocks=(1, 0, 2))
    dec = NAFDecoder(6, 1, channels=(4, 8, 8), num_blocks=(1, 0, 2))
    x = torch.rand(2, 1, 12, 20)
    z = enc(x)
    assert enc.downsample_factor == 4 and z.shape == (2, 6, 3, 5)
    assert dec(z).shape == x.shape
    assert [len(level) for level in enc.levels] == [1, 0, 2] and [len(level) for level in dec.levels] == [1, 0, 2]
    with pytest.raises(ValueError, match="one entry per level"):
        NAFEncoder(1, 6, channels=(4, 8), num_blocks=(1,))


def test_naf_block_starts_as_identity():
    block = NAFBlock(8)
    x = torch.randn(2, 8, 5, 7)
    assert torch.equal(block(x), x)  # beta = gamma = 0 at initialisation


def test_pipeline_forward_backward_with_given_task():
    model = tiny_model()
    model.train()
    lq = torch.rand(2, 1, 20, 28)  # not multiples of 8: padded and cropped
    out = model(lq, task=torch.tensor([0, 2]))
    assert out.shape == lq.shape
    assert model.autoencoder.training is False and model.diffusion.training is False  # frozen prior stays in eval
    assert model.last_task.tolist() == [0, 2] and model.last_prior.shape == lq.shape
    assert model.last_gate.shape == (2, 4) and torch.allclose(model.last_gate.sum(1), torch.ones(2))
    assert len(model.last_routing) == 4 and all(r.shape == (2,) for r in model.last_routing)
    # one global gating vector: every routing module picks the same expert for an image
    assert all(torch.equal(r, model.last_gate.argmax(1)) for r in model.last_routing)
    F.l1_loss(out, torch.rand_like(lq)).backward()  # Eq. 7 alone
    for part in (model.backbone, model.task_classifier):  # the classifier learns through V
        assert sum(float(p.grad.abs().sum()) for p in part.parameters() if p.grad is not None) > 0
    for part in (model.autoencoder, model.diffusion):
        assert all(p.grad is None and not p.requires_grad for p in part.parameters())
    copy.deepcopy(model)  # EMA handlers copy the model after a training forward


def test_unfrozen_prior_receives_gradient():
    model = tiny_model(freeze_prior=False)
    model.train()
    out = model(torch.rand(1, 1, 8, 8), task=1)
    out.mean().backward()
    assert model.diffusion.training
    assert sum(float(p.grad.abs().sum()) for p in model.diffusion.denoiser.parameters()) > 0


def test_task_is_given_or_fixed_and_picks_the_codebook():
    model = tiny_model(sample_seed=7).eval()
    with torch.no_grad():
        for t in range(3):  # make the codebooks clearly different
            model.autoencoder.quantizer.codebooks[t].normal_(mean=float(t), std=1.0)
    lq = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        with pytest.raises(ValueError, match="which task codebook"):
            model(lq)  # the gate chooses experts, not codebooks: the task must be known
        model(lq, task=0)
        prior0 = model.last_prior
        model(lq, task=0)
        assert torch.equal(model.last_prior, prior0)  # seeded diffusion noise: deterministic
        model(lq, task=1)
        assert not torch.allclose(model.last_prior, prior0)
        model.task = 2
        model(lq)
        assert model.last_task.tolist() == [2, 2]
        model(lq, task=1)  # the argument wins over the attribute
        assert model.last_task.tolist() == [1, 1]
    with pytest.raises(ValueError, match="task indices must be in 0..2"):
        model(lq, task=3)
    with pytest.raises(ValueError, match="lq must be \\(B, 1, H, W\\)"):
        model(torch.rand(2, 2, 16, 16))


def test_sliding_window_inference():
    model = tiny_model().eval()
    model.task = 1
    inferer = SlidingWindowInferer(roi_size=(16, 16), sw_batch_size=2, overlap=0.25)
    lq = torch.rand(1, 1, 24, 40)
    with torch.no_grad():
        out = inferer(lq, model)
    assert out.shape == lq.shape and torch.isfinite(out).all()


def test_stage_mismatch_is_reported():
    with pytest.raises(ValueError, match="embedding_dim"):
        DiffCode(autoencoder=TINY_AE, diffusion={**TINY_DIFF, "embedding_dim": 4})
    with pytest.raises(TypeError, match="autoencoder must be"):
        DiffCode(autoencoder=3)


def test_paper_configuration_parameter_counts(capsys):
    model = DiffCode()  # paper sizes: 3 tasks x 8192 x 256 codes, depth 8, T = 8, NAF [2,2,4,4] x [64,128,256,256]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    bank = model.autoencoder.quantizer
    assert count(bank) == 3 * 8192 * 256 and bank.depth == 8
    c, h = 256, 256
    assert count(model.diffusion.denoiser) == (2 * c + 1) * h + h + 3 * (h * h + h) + h * c + c
    parts = {
        "stage I (autoencoder + bank)": count(model.autoencoder),
        "stage II (condition encoder + denoiser)": count(model.diffusion),
        "stage III (backbone + classifier)": count(model.backbone) + count(model.task_classifier),
    }
    assert sum(parts.values()) == count(model)
    with capsys.disabled():
        print("\nDiffCode paper-config parameters:", parts, "total", count(model))
    # the paper's NAF encoders / decoders: [2, 2, 4, 4] blocks, [64, 128, 256, 256] channels, stage I and II
    for coder in (model.autoencoder.encoder, model.autoencoder.decoder, model.diffusion.condition_encoder):
        assert [len(level) for level in coder.levels] == [2, 2, 4, 4]
        assert [level[0].conv1.in_channels for level in coder.levels] == [64, 128, 256, 256]
    assert model.autoencoder.downsample_factor == 8
    assert model.autoencoder.encode(torch.rand(1, 1, 128, 128)).shape == (1, 256, 16, 16)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 16, 24), task=1)
    assert out.shape == (1, 1, 16, 24)


def test_traced_model_follows_the_gate_and_the_task_on_other_sizes():
    model = tiny_model().eval()
    with no_tracer_warnings():  # the task is an input of the graph, not a constant
        traced = torch.jit.trace(model, (torch.rand(2, 1, 16, 16), torch.tensor([1, 1])), check_trace=False)
    with torch.no_grad():
        model.task_classifier.head.bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))  # now every image -> expert 2
    lq = torch.rand(1, 1, 24, 32)
    torch.manual_seed(0)
    got = traced(lq, torch.tensor([2]))
    torch.manual_seed(0)
    expected = model(lq, task=2)
    assert [int(r) for r in model.last_routing[0]] == [2] and model.last_task.tolist() == [2]
    assert torch.allclose(got, expected, atol=1e-6)
