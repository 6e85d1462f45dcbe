"""Low-dose CT / PET simulation and the torch parallel-beam projector behind them.

Acceptance tests of the issue: CT noise doubles at quarter dose on a water cylinder with unbiased mean,
noiseless FBP returns the input; PET HQ / LQ means agree, LQ noise > 2.5x HQ, counts follow the stated
Poisson / binomial model; the projector agrees with scikit-image and its back-projector is its adjoint.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medir_monai.transforms import (
    LowDoseCT,
    LowDoseCTd,
    LowDosePET,
    LowDosePETd,
    ParallelBeamProjector,
    simulate_low_dose_ct,
    simulate_pet_pair,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def disk(size: int, radius: float, inside: float, outside: float, supersample: int = 4) -> np.ndarray:
    """Anti-aliased disk centred in a size x size image (partial-volume edge, like a scanned object)."""
    offsets = (np.arange(size * supersample) + 0.5) / supersample - size / 2.0
    yy, xx = np.meshgrid(offsets, offsets, indexing="ij")
    cover = (xx**2 + yy**2 < radius**2).reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return (outside + (inside - outside) * cover).astype(np.float32)


def radius_map(size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    return np.sqrt(xx**2 + yy**2)


# ---- projector ------------------------------------------------------------------------------------
def test_projector_matches_skimage_radon():
    """Same geometry as skimage.transform.radon (odd size: both centre at (N - 1) / 2), close values."""
    from skimage.data import shepp_logan_phantom
    from skimage.transform import radon, resize

    size, views = 127, 60
    phantom = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True)
    phantom[radius_map(size) > (size - 1) / 2.0] = 0.0
    reference = radon(phantom, theta=np.arange(views) * 180.0 / views, circle=True).T  # (V, D)
    projector = ParallelBeamProjector((size, size), pixel_size_mm=1.0, num_views=views, circle=True)
    ours = projector.forward(torch.from_numpy(phantom))[0].double().numpy()
    assert ours.shape == reference.shape
    relative = np.linalg.norm(ours - reference) / np.linalg.norm(reference)
    assert relative < 0.01  # measured 0.3 %: box footprint vs skimage's rotate-and-sum
    for view in (0, views // 2):  # axis-aligned views: both are exact row / column sums
        np.testing.assert_allclose(ours[view], reference[view], rtol=1e-5, atol=1e-4)
    # the scale follows the pixel size (line integrals in mm)
    scaled = ParallelBeamProjector((size, size), pixel_size_mm=2.0, num_views=views, circle=True)
    np.testing.assert_allclose(scaled.forward(torch.from_numpy(phantom))[0].numpy(), 2.0 * ours, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cache_mb, subsets", [(1024.0, 1), (0.0, 1), (1024.0, 4)])
def test_backprojector_is_the_adjoint(cache_mb, subsets):
    """<A x, y> == <x, A^T y>, for the cached (sparse) and streaming (scatter) paths and for subsets."""
    generator = torch.Generator().manual_seed(0)
    projector = ParallelBeamProjector((40, 52), 1.3, 36, num_subsets=subsets, cache_mb=cache_mb, dtype=torch.float64)
    image = torch.rand(3, 40, 52, generator=generator, dtype=torch.float64)
    for subset in [None] + list(range(subsets)):
        views = projector.num_views if subset is None else len(projector.subset_views[subset])
        sino = torch.rand(3, views, projector.num_detectors, generator=generator, dtype=torch.float64)
        lhs = (projector.forward(image, subset=subset) * sino).sum()
        rhs = (image * projector.adjoint(sino, subset=subset)).sum()
        assert abs(lhs - rhs) <= 1e-10 * abs(lhs)
    # subsets partition the full sinogram
    full = projector.forward(image)
    for k, views in enumerate(projector.subset_views):
        torch.testing.assert_close(projector.forward(image, subset=k), full[:, views])


def test_fbp_reconstructs_a_noiseless_cylinder():
    """Noiseless FBP of an anti-aliased water-equivalent cylinder: interior mean abs error < 3 HU."""
    size = 128
    mu = disk(size, 50.0, 0.0192, 0.0)
    projector = ParallelBeamProjector((size, size), pixel_size_mm=1.5, num_views=180)
    for filter_name in ("ramlak", "hann"):
        recon = projector.fbp(projector.forward(torch.from_numpy(mu)), filter_name=filter_name)[0].numpy()
        error_hu = 1000.0 * (recon - mu) / 0.0192
        interior = radius_map(size) < 40
        assert abs(error_hu[interior].mean()) < 1.0
        assert np.abs(error_hu[interior]).mean() < 3.0  # measured 1.9 HU (ramlak)


# ---- CT -------------------------------------------------------------------------------------------
CT_GEOMETRY = {"pixel_size_mm": 1.5, "num_views": 180}


def test_ct_quarter_dose_doubles_the_noise_on_a_water_cylinder():
    size = 128
    water = disk(size, 50.0, 0.0, -1000.0)  # HU
    interior = radius_map(size) < 40
    stack = np.stack([water] * 4)
    noiseless = simulate_low_dose_ct(water, dose_fraction=1.0, i0=1e15, rng=0, **CT_GEOMETRY)
    # noiseless setting: FBP returns the input (interior mean abs error < 3 HU)
    assert np.abs(noiseless - water)[interior].mean() < 3.0
    for i0 in (1e5, None):  # a noisy setting, and the calibrated default
        kwargs = {**CT_GEOMETRY} if i0 is None else {**CT_GEOMETRY, "i0": i0}
        full = simulate_low_dose_ct(stack, dose_fraction=1.0, rng=1, **kwargs)
        quarter = simulate_low_dose_ct(stack, dose_fraction=0.25, rng=2, **kwargs)
        assert full.shape == quarter.shape == stack.shape and full.dtype == np.float32
        # noise = deviation from the noiseless reconstruction
        sigma_full = np.mean([(img - noiseless)[interior].std() for img in full])
        sigma_quarter = np.mean([(img - noiseless)[interior].std() for img in quarter])
        assert 2.0 * 0.85 < sigma_quarter / sigma_full < 2.0 * 1.15
        assert abs(quarter[:, interior].mean() - water[interior].mean()) < 5.0
        assert abs(full[:, interior].mean() - water[interior].mean()) < 5.0
    # at 1e5 photons the noise swamps the discretisation error: the plain standard deviations double too
    assert 1.7 < np.mean([q[interior].std() for q in quarter]) / np.mean([f[interior].std() for f in full]) < 2.3


def test_ct_insert_noise_mode():
    size = 96
    water = disk(size, 36.0, 40.0, -1000.0)
    interior = radius_map(size) < 30
    noiseless = simulate_low_dose_ct(water, i0=1e15, mode="insert_noise", rng=0, **CT_GEOMETRY)
    assert np.abs(noiseless - water).max() < 0.5  # only noise is added: the input comes back
    stack = np.stack([water] * 3)
    full = simulate_low_dose_ct(stack, dose_fraction=1.0, i0=1e5, mode="insert_noise", rng=1, **CT_GEOMETRY)
    quarter = simulate_low_dose_ct(stack, dose_fraction=0.25, i0=1e5, mode="insert_noise", rng=1, **CT_GEOMETRY)
    ratio = np.mean([q[interior].std() for q in quarter]) / np.mean([f[interior].std() for f in full])
    assert 1.7 < ratio < 2.3
    assert abs(quarter[:, interior].mean() - 40.0) < 5.0


def test_ct_match_input_noise_makes_a_noisy_reference_a_quarter_dose_of_itself():
    """A reference noisier than the calibration gets 3x its own noise variance added at a quarter dose (so the LQ has
    4x it); a clean reference keeps the calibrated noise; the option needs insert_noise; LowDoseCT passes it on."""
    size = 96
    water = disk(size, 36.0, 40.0, -1000.0)
    interior = radius_map(size) < 30
    g = np.random.default_rng(0)
    body_noise = np.where(radius_map(size) < 36, 30.0 * g.standard_normal(water.shape), 0.0)
    noisy_reference = (water + body_noise).astype(np.float32)
    settings = dict(dose_fraction=0.25, i0=1e7, mode="insert_noise", rng=1, **CT_GEOMETRY)
    calibrated = simulate_low_dose_ct(water, **settings) - water
    assert calibrated[interior].std() < 15.0  # the calibrated quarter dose: well below 30 * sqrt(3)
    matched = simulate_low_dose_ct(noisy_reference, match_input_noise=True, **settings) - noisy_reference
    assert matched[interior].std() == pytest.approx(30.0 * math.sqrt(3.0), rel=0.1)
    unmatched = simulate_low_dose_ct(noisy_reference, **settings) - noisy_reference
    np.testing.assert_allclose(matched, unmatched * (matched[interior].std() / unmatched[interior].std()), atol=1e-2)
    clean_kept = simulate_low_dose_ct(water, match_input_noise=True, **settings)
    np.testing.assert_array_equal(clean_kept, simulate_low_dose_ct(water, **settings))  # quieter than the calibration
    tenth = simulate_low_dose_ct(noisy_reference, match_input_noise=True, **{**settings, "dose_fraction": 0.1})
    assert (tenth - noisy_reference)[interior].std() == pytest.approx(30.0 * 3.0, rel=0.1)  # sqrt(1/0.1 - 1) = 3
    with pytest.raises(ValueError, match="match_input_noise needs mode='insert_noise'"):
        simulate_low_dose_ct(water, match_input_noise=True, mode="reconstruct", **CT_GEOMETRY)
    transform = LowDoseCT(i0=1e7, mode="insert_noise", match_input_noise=True, pixel_size_mm=1.5, num_views=180)
    transform.set_random_state(0)
    added = np.asarray(transform(noisy_reference[None]))[0] - noisy_reference
    assert added[interior].std() == pytest.approx(30.0 * math.sqrt(3.0), rel=0.1)


def test_ct_electronic_noise_and_circle():
    size = 64
    water = disk(size, 25.0, 0.0, -1000.0)
    interior = radius_map(size) < 20
    plain = simulate_low_dose_ct(np.stack([water] * 2), i0=1e5, rng=3, **CT_GEOMETRY)
    noisy = simulate_low_dose_ct(np.stack([water] * 2), i0=1e5, electronic_noise_std=200.0, rng=3, **CT_GEOMETRY)
    assert noisy[:, interior].std() > 1.05 * plain[:, interior].std()
    chunked = simulate_low_dose_ct(np.stack([water] * 3), i0=1e5, rng=3, batch_size=2, **CT_GEOMETRY)
    assert chunked.shape == (3, size, size) and not np.array_equal(chunked[1], chunked[2])
    assert abs(chunked[2][interior].std() / plain[0][interior].std() - 1.0) < 0.2  # the same noise level
    corner = np.full((size, size), -1000.0, np.float32)
    corner[:4, :4] = 500.0  # outside the inscribed circle: left as is with circle=True
    out = simulate_low_dose_ct(corner, circle=True, rng=0, **CT_GEOMETRY)
    assert np.all(out[:4, :4] == 500.0)


def test_low_dose_ct_transforms():
    size = 48
    water = disk(size, 18.0, 0.0, -1000.0)[None]  # (1, H, W)
    transform = LowDoseCT(num_views=90, i0=1e5)
    transform.set_random_state(seed=7)
    first = transform(water)
    transform.set_random_state(seed=7)
    np.testing.assert_array_equal(transform(water), first)  # seedable
    assert not np.array_equal(transform(water), first)  # and random
    assert isinstance(first, np.ndarray) and first.shape == water.shape and first.dtype == np.float32

    # (C, H, W, D) torch volume: every slice simulated, same type back; pixel size from the MetaTensor
    volume = MetaTensor(
        torch.from_numpy(np.repeat(water[..., None], 3, axis=-1)), affine=torch.diag(torch.tensor([1.5, 1.5, 3.0, 1.0]))
    )
    out = LowDoseCT(num_views=90, i0=1e5)(volume)
    assert isinstance(out, MetaTensor) and out.shape == volume.shape
    assert not torch.equal(out[..., 0], out[..., 1])  # independent noise per slice

    d = LowDoseCTd(keys="hq", output_keys="lq", num_views=90, i0=1e5).set_random_state(seed=1)({"hq": water})
    assert d["hq"] is water and d["lq"].shape == water.shape
    assert abs(float(d["lq"][0][radius_map(size) < 14].mean())) < 20.0


def test_ct_errors():
    with pytest.raises(ValueError, match="dose_fraction"):
        simulate_low_dose_ct(np.zeros((16, 16)), dose_fraction=0.0)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(B, H, W\)"):
        simulate_low_dose_ct(np.zeros((1, 1, 16, 16)))
    with pytest.raises(ValueError, match="NaN"):
        simulate_low_dose_ct(np.full((16, 16), np.nan))
    with pytest.raises(ValueError, match="mode"):
        simulate_low_dose_ct(np.zeros((16, 16)), mode="other")
    with pytest.raises(ValueError, match="key 'hq'.*channel-first"):
        LowDoseCTd(keys="hq")({"hq": np.zeros((16, 16))})
    with pytest.raises(ValueError, match="isotropic"):
        LowDoseCT()(MetaTensor(torch.zeros(1, 16, 16), affine=torch.diag(torch.tensor([1.0, 2.0, 1.0, 1.0]))))


@pytest.mark.slow
def test_ct_calibration_on_a_real_abdominal_slice():
    """Calibrated I0: quarter dose adds +15 to +30 HU of noise over the full-dose liver (AAPM-Mayo range)."""
    import pydicom

    path = pytest.importorskip("data_store").__path__[0] + "/data/explicit_VR-UN.dcm"  # the pydicom-data wheel
    ds = pydicom.dcmread(path)
    hu = (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.float32)
    liver = (slice(220, 270), slice(140, 180))
    quarter = simulate_low_dose_ct(np.stack([hu] * 2), pixel_size_mm=float(ds.PixelSpacing[0]), rng=0)
    excess = np.mean([q[liver].std() for q in quarter]) - hu[liver].std()
    assert 15.0 < excess < 30.0


# ---- PET ------------------------------------------------------------------------------------------
def pet_phantom(size: int = 80) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Activity (SUV-like), attenuation (1/mm), body mask and a uniform region of a small body phantom."""
    radius = radius_map(size)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    body = radius < 0.4 * size
    activity = np.where(body, 1.0, 0.0).astype(np.float32)
    activity[(xx - 0.15 * size) ** 2 + yy**2 < (0.1 * size) ** 2] = 4.0  # a hot lesion
    mu = np.where(body, 0.0096, 0.0).astype(np.float32)  # water at 511 keV
    uniform = (xx + 0.15 * size) ** 2 + (yy + 0.05 * size) ** 2 < (0.1 * size) ** 2
    return activity, mu, body, uniform


PET_SMALL = {"num_views": 90, "iterations": 3, "subsets": 6, "pixel_size_mm": 3.0}


def test_pet_pair_means_noise_and_counts():
    activity, mu, body, uniform = pet_phantom()
    batch = 4
    hq, lq, counts = simulate_pet_pair(
        np.stack([activity] * batch), mu_map=mu, rng=0, return_counts=True, full_counts=3e5, batch_size=3, **PET_SMALL
    )  # two chunks (3 + 1 slices)
    assert hq.shape == lq.shape == (batch, *activity.shape) and hq.dtype == np.float32
    # means agree (LQ rescaled by the dose fraction) and match the true activity
    assert abs(lq[:, body].mean() / hq[:, body].mean() - 1.0) < 0.05
    assert abs(hq[:, body].mean() / activity[body].mean() - 1.0) < 0.05
    # LQ noise > 2.5x HQ noise in a uniform region (sqrt(12) = 3.5 for pure count scaling)
    noise_hq = np.mean([img[uniform].std() for img in hq])
    noise_lq = np.mean([img[uniform].std() for img in lq])
    assert noise_lq > 2.5 * noise_hq

    full, low, expected = counts["full"], counts["low"], counts["expected"]
    assert full.dtype == np.int64 and low.dtype == np.int64 and full.shape == expected.shape
    assert np.all(low <= full) and np.all(low >= 0)
    np.testing.assert_allclose(full.sum(axis=(1, 2)), 3e5, rtol=0.01)  # expected prompts per slice
    fraction = 1.0 / 12.0
    ratio = low.sum() / full.sum()
    assert abs(ratio - fraction) < 4.0 * math.sqrt(fraction * (1 - fraction) / full.sum())
    # Poisson: variance == mean (normalised squared residuals average 1), for full and thinned counts
    busy = expected > 5
    assert abs(((full - expected) ** 2 / expected)[busy].mean() - 1.0) < 0.05
    low_mean = fraction * expected
    assert abs(((low - low_mean) ** 2 / low_mean)[busy].mean() - 1.0) < 0.05
    # randoms: the stated fraction of the prompts
    assert abs(counts["randoms"].sum() / expected.sum() - 0.05) < 1e-6


def test_pet_dose_fraction_one_gives_identical_counts():
    activity, _, _, _ = pet_phantom(48)
    hq, lq, counts = simulate_pet_pair(activity, dose_fraction=1.0, rng=5, return_counts=True, **PET_SMALL)
    np.testing.assert_array_equal(counts["low"], counts["full"])
    np.testing.assert_allclose(lq, hq, rtol=1e-5, atol=1e-5)


def test_low_dose_pet_transforms():
    activity, mu, body, _ = pet_phantom(48)
    image = torch.from_numpy(activity)[None]  # (1, H, W)
    transform = LowDosePET(**{k: v for k, v in PET_SMALL.items() if k != "pixel_size_mm"}, pixel_size_mm=3.0)
    transform.set_random_state(seed=3)
    first = transform(image)
    transform.set_random_state(seed=3)
    assert torch.equal(transform(image), first)
    assert isinstance(first, torch.Tensor) and first.shape == image.shape

    pet_d = LowDosePETd(keys="pet", output_keys="lq", hq_output_keys="hq", mu_keys="mu", **PET_SMALL)
    out = pet_d.set_random_state(seed=0)({"pet": activity[None], "mu": mu[None]})
    assert out["pet"] is not None and out["lq"].shape == out["hq"].shape == (1, 48, 48)
    assert abs(out["lq"][0][body].mean() / out["hq"][0][body].mean() - 1.0) < 0.1
    # (C, H, W, D) volumes are simulated slice by slice
    volume = np.repeat(activity[None, ..., None], 2, axis=-1)
    assert LowDosePET(**PET_SMALL)(volume).shape == volume.shape


def test_pet_errors():
    with pytest.raises(ValueError, match="non-negative"):
        simulate_pet_pair(-np.ones((16, 16)))
    with pytest.raises(ValueError, match="randoms_fraction"):
        simulate_pet_pair(np.ones((16, 16)), randoms_fraction=1.0)
    with pytest.raises(ValueError, match="mu_map shape"):
        simulate_pet_pair(np.ones((16, 16)), mu_map=np.zeros((8, 8)), num_views=30)
    with pytest.raises(KeyError, match="attenuation map key 'mu'"):
        LowDosePETd(keys="pet", mu_keys="mu")({"pet": np.ones((1, 16, 16))})


def test_pet_counts_scale_with_activity_when_asked():
    """count_scaling="activity": a slice with a quarter of the activity gets a quarter of the counts, so its
    reconstruction is about twice as noisy (relative); "slice" (the demo's) gives every slice the same counts."""
    from medir_monai.transforms import PET_FULL_COUNTS, PET_REFERENCE_ACTIVITY

    yy, xx = np.mgrid[:48, :48]
    disc = ((yy - 24) ** 2 + (xx - 24) ** 2 < 18**2).astype(np.float32)
    pixel = 2 * PET_SMALL["pixel_size_mm"]  # a larger field of view than PET_SMALL's for the same grid
    settings = {**PET_SMALL, "pixel_size_mm": pixel, "randoms_fraction": 0.0}
    hot, cold = 4.0 * disc, 1.0 * disc

    core = ((yy - 24) ** 2 + (xx - 24) ** 2 < 12**2)

    def relative_noise(activity, scaling, seed):  # from two realisations: the image's own shape cancels
        first, _, counts = simulate_pet_pair(activity, rng=seed, count_scaling=scaling, return_counts=True, **settings)
        second, _ = simulate_pet_pair(activity, rng=seed + 100, count_scaling=scaling, **settings)
        noise = (first - second)[core].std() / np.sqrt(2)
        return float(noise / first[core].mean()), float(counts["expected"].sum())

    hot_noise, hot_counts = relative_noise(hot, "activity", 1)
    cold_noise, cold_counts = relative_noise(cold, "activity", 2)
    integral = float(hot.sum()) * pixel * pixel
    assert hot_counts == pytest.approx(PET_FULL_COUNTS * integral / PET_REFERENCE_ACTIVITY, rel=1e-6)
    assert cold_counts == pytest.approx(hot_counts / 4, rel=1e-6)
    assert cold_noise / hot_noise == pytest.approx(2.0, rel=0.25)  # sqrt(4)
    same_hot, same_hot_counts = relative_noise(hot, "slice", 1)
    same_cold, same_cold_counts = relative_noise(cold, "slice", 2)
    assert same_hot_counts == pytest.approx(same_cold_counts) == pytest.approx(PET_FULL_COUNTS)
    assert same_cold / same_hot == pytest.approx(1.0, rel=0.2)
    with pytest.raises(ValueError, match="count_scaling"):
        simulate_pet_pair(hot, count_scaling="dose", **settings)


def test_pet_insert_noise_mode_is_the_same_in_the_array_and_dict_transforms():
    """mode="insert_noise": HQ is the input itself, LQ the input plus the simulated extra noise (zero mean), and
    LowDosePET / LowDosePETd give the same LQ for the same seed."""
    from medir_monai.transforms import LowDosePET, LowDosePETd

    activity = torch.zeros(1, 48, 48)
    activity[:, 8:40, 8:40] = 2.0
    settings = {**PET_SMALL, "mode": "insert_noise"}
    array_form = LowDosePET(**settings).set_random_state(4)
    dict_form = LowDosePETd(keys="activity", output_keys="lq", hq_output_keys="hq", **settings).set_random_state(4)
    lq = array_form(activity)
    pair = dict_form({"activity": activity})
    assert pair["hq"] is activity and torch.equal(pair["lq"], lq)
    noise = (lq - activity)[:, 10:38, 10:38]
    assert float(noise.std()) > 0.05 and abs(float(noise.mean())) < 0.1
