"""Consistency safeguards (``medir_monai.safeguard``): noise estimate, CT noise consistency, MRI k-space
consistency, and their use in ``restore_array`` and in validation."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medir_monai.handlers import SafeguardHandler
from medir_monai.restore import ScanInferer, restore_array
from medir_monai.safeguard import RestorationSafeguard, estimate_noise_std, kspace_consistency, noise_consistency
from medir_monai.tasks import get_task
from medir_monai.transforms import kspace_truncate, simulate_low_dose_ct

REPO = Path(__file__).resolve().parents[1]
CT_GUARD = {"ct_denoise": {"method": "noise", "lowpass_sigma": 1.5, "window": 5, "object_threshold": -500.0}}


def _phantom(size: int = 96) -> torch.Tensor:
    """A water disk in air with two soft-tissue inserts (HU)."""
    yy, xx = torch.meshgrid(torch.arange(size) / size - 0.5, torch.arange(size) / size - 0.5, indexing="ij")
    image = torch.full((size, size), -1000.0)
    image[yy**2 + xx**2 < 0.4**2] = 0.0
    image[(yy + 0.15) ** 2 + xx**2 < 0.08**2] = 60.0
    image[(yy - 0.15) ** 2 + (xx - 0.1) ** 2 < 0.06**2] = -80.0
    return image


def _rmse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b)[mask].pow(2).mean().sqrt())


def test_noise_estimate_finds_white_noise_and_ignores_edges_and_air():
    clean = _phantom()
    g = torch.Generator().manual_seed(0)
    noisy = clean + 12.0 * torch.randn(clean.shape, generator=g)
    assert estimate_noise_std(noisy, object_threshold=-500.0) == pytest.approx(12.0, rel=0.1)
    assert estimate_noise_std(clean, object_threshold=-500.0) == 0.0  # piecewise constant: edges do not count
    air_noise_only = clean.clone()
    air_noise_only[clean < -500] += 50.0 * torch.randn(int((clean < -500).sum()), generator=g)
    assert estimate_noise_std(air_noise_only, object_threshold=-500.0) < 1.0  # the object is clean
    with pytest.raises(ValueError, match="2-D"):
        estimate_noise_std(torch.zeros(2, 8, 8))


def test_noise_consistency_keeps_a_good_denoiser_and_damps_a_painter():
    clean = _phantom()
    body = clean > -500
    g = torch.Generator().manual_seed(1)
    lq = clean + 10.0 * torch.randn(clean.shape, generator=g)
    lq_error = _rmse(lq, clean, body)
    # a good denoiser (the clean image) stays far better than the input
    kept = noise_consistency(lq, clean, object_threshold=-500.0)
    assert _rmse(kept, clean, body) < 0.45 * lq_error
    # a network that paints texture three times the noise level ends up better than the input, not worse
    painter = clean + 30.0 * torch.randn(clean.shape, generator=g)
    assert _rmse(painter, clean, body) > 2.5 * lq_error
    assert _rmse(noise_consistency(lq, painter, object_threshold=-500.0), clean, body) < lq_error
    # a network with an intensity bias: the low-pass band comes from the input, the bias goes
    biased = clean + 8.0
    fixed = noise_consistency(lq, biased, object_threshold=-500.0)
    inner = torch.zeros_like(body)
    inner[30:66, 30:66] = True
    assert abs(float((fixed - clean)[inner].mean())) < 1.5
    assert abs(float((biased - clean)[inner].mean())) == pytest.approx(8.0)


def test_noise_consistency_returns_a_noise_free_input_unchanged():
    clean = _phantom()
    painter = clean + 20.0 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(noise_consistency(clean, painter, object_threshold=-500.0), clean, atol=1e-3)


def test_noise_consistency_bad_options():
    x = torch.zeros(16, 16)
    with pytest.raises(ValueError, match="differ in shape"):
        noise_consistency(x, torch.zeros(16, 8))
    with pytest.raises(ValueError, match="lowpass_sigma"):
        noise_consistency(x, x, lowpass_sigma=-1.0)
    with pytest.raises(ValueError, match="window"):
        noise_consistency(x, x, window=0)


def test_kspace_consistency_keeps_the_acquired_band_of_the_input():
    g = torch.Generator().manual_seed(3)
    hq = torch.rand(64, 48, generator=g) * 1000
    lq = kspace_truncate(hq[None], 0.25)[0]
    restored = lq + 50.0 * torch.randn(lq.shape, generator=g)  # changes every band
    out = kspace_consistency(lq, restored, keep_fraction=0.25)
    spectrum = lambda x: torch.fft.fftshift(torch.fft.fft2(x))  # noqa: E731
    band = (slice(32 - 7, 32 + 8), slice(24 - 5, 24 + 6))  # |k| <= 7 and <= 5: the 16 / 12 kept, less the unpaired one
    assert torch.allclose(spectrum(out)[band], spectrum(lq)[band], atol=1e-5 * float(spectrum(lq).abs().max()))
    outside = torch.ones(64, 48, dtype=torch.bool)
    outside[band] = False
    assert torch.allclose(spectrum(out - lq)[outside], spectrum(restored - lq)[outside], atol=1e-1)
    assert torch.equal(kspace_consistency(lq, lq), lq)


def test_restoration_safeguard_settings_and_units():
    guard = RestorationSafeguard(CT_GUARD)
    assert guard and not RestorationSafeguard(None)
    with pytest.raises(ValueError, match="method must be one of"):
        RestorationSafeguard({"ct_denoise": {"method": "nois"}})
    with pytest.raises(ValueError, match="unknown task"):
        RestorationSafeguard({"ct_denoize": {"method": "noise"}})
    mri = torch.rand(32, 32)
    assert torch.equal(guard(mri, mri + 1, "mri_sr"), mri + 1)  # task not listed: unchanged
    # the same slice in HU and in model space gives the same result (validation measures what restore writes)
    task = get_task("ct_denoise")
    clean = _phantom().clamp(min=-900.0)  # no value reaches the range's clip at -1024 HU
    lq = clean + 15.0 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(4))
    restored = clean + 5.0
    physical = guard(lq, restored, task)
    normalised = guard(task.normalise(lq), task.normalise(restored), task, normalised=True)
    assert torch.allclose(task.denormalise(normalised), physical, atol=0.05)


def test_restore_array_applies_the_safeguard_to_a_biased_network():
    """A network that adds 20 HU everywhere: the safeguard takes the low-pass band from the input and removes it."""
    clean = _phantom(64).numpy()
    lq = np.asarray(simulate_low_dose_ct(clean, dose_fraction=0.25, pixel_size_mm=1.0, num_views=90,
                                         mode="insert_noise", rng=5))
    bias = 20.0 / 4095.0
    biased_net = lambda x: x + bias  # noqa: E731
    plain = restore_array(biased_net, lq, "ct_denoise", roi_size=32, progress=False)
    guarded = restore_array(biased_net, lq, "ct_denoise", roi_size=32, progress=False, safeguard=CT_GUARD)
    inside = clean > -500
    assert float((plain - lq)[inside].mean()) == pytest.approx(20.0, abs=0.5)
    assert abs(float((guarded - lq)[inside].mean())) < 1.0
    inferer = ScanInferer(roi_size=32, progress=False, safeguard=CT_GUARD)
    via_inferer = inferer(torch.from_numpy(lq), biased_net, task="ct_denoise")
    assert np.allclose(via_inferer.numpy(), guarded, atol=1e-4)


def test_safeguard_handler_changes_only_the_listed_tasks():
    task = get_task("ct_denoise")
    clean = _phantom(48)
    lq_ct = task.normalise(clean + 10.0 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(6)))
    lq = torch.stack([lq_ct, torch.rand(48, 48)])[:, None]  # (2, 1, H, W): a CT and an MRI slice
    pred = lq + 0.01
    engine = SimpleNamespace(state=SimpleNamespace(output={"image": lq, "pred": pred.clone(), "label": lq},
                                                   batch={"task_name": ["ct_denoise", "mri_sr"]}))
    SafeguardHandler(CT_GUARD)(engine)
    out = engine.state.output["pred"]
    assert torch.equal(out[1], pred[1])
    assert float((out[0] - lq[0]).abs().mean()) < 0.2 * 0.01  # the 41 HU offset is gone


def test_quick_configs_turn_the_safeguards_on_and_paper_configs_leave_them_off():
    for bundle in ("amir", "tat", "restormer", "diffcode"):
        configs = REPO / "bundles" / bundle / "configs"
        assert json.loads((configs / "train.json").read_text())["safeguard"] is None
        assert json.loads((configs / "inference.json").read_text())["safeguard"] is None
        quick = json.loads((configs / "quick.json").read_text())["safeguard"]
        # the README main job's bundle also keeps the acquired k-space band of MRI inputs, at the degradation's own
        # kept fraction; the other quick configs keep the CT safeguard only (their documented figures)
        assert set(quick) == ({"ct_denoise", "mri_sr"} if bundle == "amir" else {"ct_denoise"})
        assert RestorationSafeguard(quick)
        if "mri_sr" in quick:
            kept = get_task("mri_sr").degradation_args["keep_fraction"]
            assert quick["mri_sr"] == {"method": "kspace", "keep_fraction": kept}
        # validation, evaluation and inference all apply it (the tables measure what medir restore writes)
        assert '"medir_monai.handlers.SafeguardHandler"' in (configs / "train.json").read_text()
        handlers = json.loads((configs / "evaluate.json").read_text())["validate#handlers"]
        assert {"_target_": "medir_monai.handlers.SafeguardHandler", "settings": "@safeguard"} in handlers
        assert json.loads((configs / "inference.json").read_text())["inferer"]["safeguard"] == "@safeguard"
