"""Robust-training transforms (``medir_monai.transforms.augment``) and their use in datasets and restoration."""

import math

import numpy as np
import pytest
import torch

from medir_monai.data import restoration_dataset
from medir_monai.restore import restore_array
from medir_monai.transforms import (
    ForTasksd,
    KSpaceTruncate,
    RandDoseScaled,
    RandForTasksd,
    RandIntensityScaled,
    RandPixelSized,
    RandPixelSizedResimulated,
    ScaleToReference,
    ScaleToReferenced,
    dose_noise_factor,
    simulate_low_dose_ct,
)


def _water_disk(size: int = 128, radius: float = 0.4) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    return np.where(yy**2 + xx**2 < radius**2, 40.0, -1000.0).astype(np.float32)


def test_redosed_pair_matches_the_noise_of_a_simulation_at_that_dose():
    """Scaling a quarter-dose residual to 10 % dose gives the noise level of a 10 % dose simulation."""
    hq = np.repeat(_water_disk()[None], 4, axis=0)
    inside = np.broadcast_to(_water_disk() > 0, hq.shape)
    sim = dict(pixel_size_mm=1.0, num_views=180, mode="insert_noise")
    quarter = np.asarray(simulate_low_dose_ct(hq, dose_fraction=0.25, rng=1, **sim))
    tenth = np.asarray(simulate_low_dose_ct(hq, dose_fraction=0.1, rng=2, **sim))
    redose = RandDoseScaled(("lq", "hq"), dose_range=(0.1, 0.1), nominal_dose=0.25, noise_model="insert")
    out = redose({"lq": torch.from_numpy(quarter), "hq": torch.from_numpy(hq)})
    scaled_std = float((out["lq"].numpy() - hq)[inside].std())
    direct_std = float((tenth - hq)[inside].std())
    assert scaled_std == pytest.approx(direct_std, rel=0.1)
    assert scaled_std > 1.5 * float((quarter - hq)[inside].std())  # sqrt(0.25 / 0.1) = 1.58 times the quarter dose
    assert float(out["lq"][torch.from_numpy(inside.copy())].mean()) == pytest.approx(40.0, abs=3.0)  # no bias


def test_dose_factor_of_both_noise_models():
    for model in ("insert", "thinning"):
        assert dose_noise_factor(0.25, 0.25, model) == pytest.approx(1.0)
    assert dose_noise_factor(0.1, 0.25, "insert") == pytest.approx(2.5**0.5)
    assert dose_noise_factor(1.0, 0.25, "thinning") == 0.0  # a thinned pair at full dose has no noise left
    hq = torch.rand(1, 8, 8)
    out = RandDoseScaled(dose_range=(1.0, 1.0), nominal_dose=0.25, noise_model="thinning")({"lq": hq + 1.0, "hq": hq})
    assert torch.equal(out["lq"], hq)


def test_dose_draws_stay_in_range_and_follow_the_seed():
    t = RandDoseScaled(dose_range=(0.1, 0.5), nominal_dose=0.25).set_random_state(3)
    factors = []
    for _ in range(50):
        t.randomize()
        factors.append(t.factor)
    low, high = dose_noise_factor(0.5, 0.25), dose_noise_factor(0.1, 0.25)
    assert low <= min(factors) < max(factors) <= high
    again = RandDoseScaled(dose_range=(0.1, 0.5), nominal_dose=0.25).set_random_state(3)
    again.randomize()
    assert again.factor == factors[0]


def test_dose_is_drawn_log_uniformly():
    # a dose is a scale: over 0.1-4.0 each factor of 40 ** (1 / 4) in dose gets a quarter of the draws (a uniform
    # draw would put 96 % of them above a quarter dose and ~2 % below 0.25)
    t = RandDoseScaled(dose_range=(0.1, 4.0), nominal_dose=0.25).set_random_state(0)
    doses = []
    for _ in range(4000):
        t.randomize()
        doses.append(0.25 / t.factor**2)  # insert model: factor = sqrt(d0 / d)
    doses = np.asarray(doses)
    assert doses.min() >= 0.1 - 1e-9 and doses.max() <= 4.0 + 1e-9
    below_quarter = float(np.mean(doses < 0.25))
    assert below_quarter == pytest.approx(math.log(2.5) / math.log(40.0), abs=0.03)  # ~0.25
    assert float(np.median(doses)) == pytest.approx((0.1 * 4.0) ** 0.5, rel=0.08)  # geometric mean 0.63


@pytest.mark.parametrize(
    "make, option",
    [
        (lambda: RandDoseScaled(dose_range=(-0.1, 0.5)), "dose_range"),
        (lambda: RandDoseScaled(dose_range=(0.1, 1.5), noise_model="thinning"), "dose_range"),
        (lambda: RandDoseScaled(dose_range=(0.5, 0.1)), "dose_range"),
        (lambda: RandDoseScaled(nominal_dose=0.0), "nominal_dose"),
        (lambda: RandDoseScaled(noise_model="gaussian"), "noise_model"),
        (lambda: RandDoseScaled(prob=2.0), "prob"),
        (lambda: RandIntensityScaled(scale_range=(0.0, 1.0)), "scale_range"),
        (lambda: RandIntensityScaled(scale_range="big"), "scale_range"),
        (lambda: RandPixelSized(zoom_range=(0.0, 1.0)), "zoom_range"),
        (lambda: ScaleToReference(reference=0.0), "reference"),
        (lambda: ScaleToReference(percentile=0.0), "percentile"),
        (lambda: ForTasksd(RandIntensityScaled(), tasks="mri_sr"), "tasks"),
    ],
)
def test_bad_options_name_the_option(make, option):
    with pytest.raises(ValueError, match=option):
        make()


def test_intensity_scale_keeps_the_pair_and_clips():
    hq = torch.rand(1, 16, 16) * 0.6
    lq = hq * 0.9 + 0.05
    t = RandIntensityScaled(scale_range=(2.0, 2.0), clip=(0.0, 1.0))
    out = t({"lq": lq, "hq": hq})
    assert torch.allclose(out["hq"], (hq * 2).clamp(0, 1)) and torch.allclose(out["lq"], (lq * 2).clamp(0, 1))
    t = RandIntensityScaled(scale_range=(0.25, 4.0)).set_random_state(0)
    for _ in range(20):
        out = t({"lq": lq, "hq": hq})
        ratio = out["hq"] / hq
        assert torch.allclose(out["lq"] / lq, ratio, rtol=1e-5)  # one factor for both images
        assert 0.25 <= float(ratio.mean()) <= 4.0


def test_pixel_size_resamples_both_images_and_averages_noise():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 128, 128, generator=g)
    t = RandPixelSized(zoom_range=(0.5, 0.5), prob=1.0)
    out = t({"lq": 100.0 + noise, "hq": torch.full((1, 128, 128), 100.0)})
    assert out["lq"].shape == out["hq"].shape == (1, 64, 64)
    assert float(out["hq"].mean()) == pytest.approx(100.0)
    assert float((out["lq"] - 100.0).std()) < 0.6  # a coarser grid averages the noise (not sub-sampled)
    up = RandPixelSized(zoom_range=(1.5, 1.5), prob=1.0)({"lq": noise, "hq": noise})
    assert up["lq"].shape == (1, 192, 192)
    same = RandPixelSized(zoom_range=(0.5, 0.5), prob=0.0)({"lq": noise, "hq": noise})
    assert same["lq"] is noise


def test_resimulated_pixel_size_keeps_the_mri_problem_a_4x_one():
    hq = torch.from_numpy(_water_disk(128))[None] / 1000.0 + 1.0  # (1, 128, 128), a sharp-edged object
    truncate = KSpaceTruncate(keep_fraction=0.25)
    stored = {"hq": hq, "lq": truncate(hq), "task_name": "mri_sr"}
    out = RandPixelSizedResimulated(truncate, zoom_range=(0.5, 0.5), prob=1.0)(stored)
    assert out["hq"].shape == out["lq"].shape == (1, 64, 64)
    assert torch.equal(out["lq"], truncate(out["hq"]))  # a quarter of the new grid's bandwidth, not of the old one
    resampled_pair = RandPixelSized(zoom_range=(0.5, 0.5), prob=1.0)(stored)["lq"]  # what resampling the pair gives
    assert float((resampled_pair - out["lq"]).abs().max()) > 0.05  # (a 2x problem on the new grid)
    kept = RandPixelSizedResimulated(truncate, zoom_range=(0.5, 0.5), prob=0.0)(stored)
    assert kept["lq"] is stored["lq"] and kept["hq"] is stored["hq"]
    with pytest.raises(TypeError, match="degrade must be a callable"):
        RandPixelSizedResimulated("KSpaceTruncate")
    with pytest.raises(ValueError, match="must be a .C, H, W. image"):
        RandPixelSizedResimulated(truncate, prob=1.0)({"hq": hq[0], "lq": hq[0]})


def test_zoom_option_resimulates_mri_and_resamples_ct_pairs():
    from medir_monai.data import robust_augmentations

    default = robust_augmentations(zoom_range=(0.5, 0.5), zoom_prob=1.0)
    assert len(default) == 1 and default[0].tasks == {"ct_denoise", "pet_synthesis"}  # MRI left alone by default
    pairs, mri = robust_augmentations(zoom_range=(0.5, 0.5), zoom_prob=1.0,
                                      zoom_tasks=["ct_denoise", "pet_synthesis", "mri_sr"])
    x = torch.rand(1, 64, 64)
    ct = pairs({"lq": x + 0.1, "hq": x, "task_name": "ct_denoise"})
    assert torch.allclose(ct["lq"] - ct["hq"], torch.full((1, 32, 32), 0.1), atol=1e-5)  # the pair resampled together
    out = mri({"lq": x + 0.1, "hq": x, "task_name": "mri_sr"})
    assert torch.equal(out["lq"], KSpaceTruncate(keep_fraction=0.25)(out["hq"]))  # the registry's degradation


def test_scale_to_reference_maps_the_percentile_and_inverts():
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(64, 64)
    img[16:48, 16:48] = torch.rand(32, 32, generator=g) * 1000 + 10
    scaler = ScaleToReference(percentile=99.0, reference=1500.0)
    out = scaler(img)
    assert float(torch.quantile(out[out > 0], 0.99)) == pytest.approx(1500.0, rel=1e-3)
    assert scaler.factor_of(img * 3) == pytest.approx(scaler.factor / 3, rel=1e-4)  # any raw scale lands alike
    assert scaler.factor_of(torch.zeros(8, 8)) == 1.0  # nothing but background: left alone
    assert ScaleToReference(reference=1500.0, factor_range=(0.5, 1.2)).factor_of(img) == 1.2  # clipped factor
    d = ScaleToReferenced(("lq", "hq"), ref_key="lq", percentile=99.0, reference=1500.0)({"lq": img, "hq": img * 2})
    assert torch.allclose(d["hq"], d["lq"] * 2) and d["intensity_factor"] == pytest.approx(scaler.factor)


def test_task_gate_applies_only_to_its_tasks():
    gate = RandForTasksd(RandIntensityScaled(scale_range=(3.0, 3.0)), tasks=["mri_sr"])
    x = torch.ones(1, 4, 4)
    assert torch.equal(gate({"lq": x, "hq": x, "task_name": "mri_sr"})["lq"], 3 * x)
    ct = {"lq": x, "hq": x, "task_name": "ct_denoise"}
    assert gate(ct) is ct


def test_pet_scale_option_scales_pet_pairs_only():
    from medir_monai.data import robust_augmentations

    (gate,) = robust_augmentations(pet_scale_range=(2.0, 2.0))
    pet = {"lq": torch.full((1, 4, 4), 0.2), "hq": torch.full((1, 4, 4), 0.1), "task_name": "pet_synthesis"}
    out = gate(pet)
    assert torch.allclose(out["lq"], 2 * pet["lq"]) and torch.allclose(out["hq"], 2 * pet["hq"])  # pair kept
    assert torch.allclose(gate({**pet, "lq": torch.full((1, 4, 4), 0.8)})["lq"], torch.ones(1, 4, 4))  # model range
    mri = {**pet, "task_name": "mri_sr"}
    assert gate(mri) is mri

@pytest.mark.parametrize(
    "option, value",
    [("ct_dose_range", (-0.1, 1.0)), ("pet_dose_range", (0.05, 1.5)), ("mri_scale_range", (0.0, 2.0)),
     ("pet_scale_range", (2.0, 0.5)), ("zoom_range", (0.0, 1.0))],
)
def test_a_bad_robust_option_is_refused_by_its_config_name(option, value):
    from medir_monai.data import robust_augmentations

    with pytest.raises(ValueError, match=f"robust option {option}"):
        robust_augmentations(**{option: value})


def test_dataset_applies_the_options(tmp_path):
    import nibabel as nib

    g = np.random.default_rng(0)
    items = []
    for task, folder, value in (("mri_sr", "MRI", 20000.0), ("ct_denoise", "CT", 40.0)):
        hq = np.where(_water_disk(96) > 0, value, 0.0 if task == "mri_sr" else -1000.0).astype(np.float32)
        lq = hq + g.normal(0, 0.02 * abs(value), hq.shape).astype(np.float32)
        for name, arr in (("hq", hq), ("lq", lq)):
            nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / f"{folder}_{name}.nii.gz"))
        items.append({"hq": str(tmp_path / f"{folder}_hq.nii.gz"), "lq": str(tmp_path / f"{folder}_lq.nii.gz"), "task": task})
    reference = {"mri_sr": {"percentile": 99.0, "reference": 2047.5}}
    plain = restoration_dataset(items, train=False, cache="none")
    normalised = restoration_dataset(items, train=False, cache="none", intensity_reference=reference)
    assert float(plain[0]["hq"].max()) == 1.0  # raw 20000 saturates the [0, 4095] range without it
    # the LQ (noisy, 2 %) sets the factor: its 99th percentile lands at 2047.5, the flat HQ a little lower
    assert float(normalised[0]["hq"].max()) == pytest.approx(0.5 / (1 + 2.33 * 0.02), abs=0.01)
    assert torch.equal(plain[1]["hq"], normalised[1]["hq"])  # CT untouched
    zoom = [RandPixelSized(zoom_range=(0.5, 0.5), prob=1.0)]
    train = restoration_dataset(items, train=True, patch_size=32, cache="memory", augmentations=zoom)
    sample = train[0]
    assert sample["lq"].shape == sample["hq"].shape == (1, 32, 32)


def test_random_training_steps_run_on_plain_tensors_with_the_same_values():
    """The random steps after the cache run without MONAI's metadata tracking: plain tensors out, the values the
    same steps give with tracking on (same seed), and the global tracking flag restored, also after an error."""
    from monai.data import MetaTensor, get_track_meta
    from monai.transforms import Compose, Randomizable, RandSpatialCropd, SpatialPadd

    from medir_monai.data.dataset import RandWithoutMetaTracking, without_meta_tracking

    def steps(untracked: bool = False):
        plain = [RandSpatialCropd(("lq", "hq"), roi_size=(8, 8), random_size=False), RandPixelSized(zoom_range=(0.5, 1.5), prob=1.0)]
        return Compose([without_meta_tracking(step) for step in plain] if untracked else plain)

    image = MetaTensor(torch.rand(1, 24, 24), meta={"filename_or_obj": "x.nii.gz"})
    sample = {"lq": image, "hq": image.clone(), "task": "ct_denoise"}
    tracked = steps().set_random_state(seed=3)(dict(sample))
    untracked = steps(untracked=True).set_random_state(seed=3)(dict(sample))
    assert isinstance(tracked["lq"], MetaTensor)
    assert type(untracked["lq"]) is torch.Tensor and type(untracked["hq"]) is torch.Tensor
    assert torch.equal(untracked["lq"], tracked["lq"].as_tensor()) and torch.equal(untracked["hq"], tracked["hq"].as_tensor())
    assert get_track_meta()
    assert all(isinstance(step, RandWithoutMetaTracking) for step in steps(untracked=True).transforms)
    # a step that draws nothing must not become random: a Compose would hand it a seed and shift the others' seeds
    assert not isinstance(without_meta_tracking(SpatialPadd(("lq", "hq"), (32, 32))), Randomizable)
    with pytest.raises(Exception):
        steps(untracked=True)({"lq": image})  # no "hq": the crop fails
    assert get_track_meta()


def test_restore_with_intensity_reference_keeps_raw_values_beyond_the_range():
    """An identity network restores a raw-valued MRI above the task's range unchanged only with per-scan
    normalisation (without it, values above 4095 are clipped)."""
    image = np.zeros((64, 64), np.float32)
    image[16:48, 16:48] = np.linspace(100, 20000, 32 * 32, dtype=np.float32).reshape(32, 32)
    identity = lambda x: x  # noqa: E731
    clipped = restore_array(identity, image, "mri_sr", roi_size=32, progress=False)
    assert clipped.max() == pytest.approx(4095.0)
    ref = {"mri_sr": {"percentile": 99.0, "reference": 1500.0}}
    kept = restore_array(identity, image, "mri_sr", roi_size=32, progress=False, intensity_reference=ref)
    assert np.allclose(kept, image, rtol=1e-4, atol=0.5)


def test_disk_cache_is_not_shared_across_intensity_references(tmp_path):
    import nibabel as nib

    hq = np.where(_water_disk(64) > 0, 20000.0, 0.0).astype(np.float32)
    nib.save(nib.Nifti1Image(hq, np.eye(4)), str(tmp_path / "hq.nii.gz"))
    items = [{"hq": str(tmp_path / "hq.nii.gz"), "lq": str(tmp_path / "hq.nii.gz"), "task": "mri_sr"}]
    cache = tmp_path / "cache"
    plain = restoration_dataset(items, train=False, cache="disk", cache_dir=cache)[0]["hq"]
    reference = {"mri_sr": {"percentile": 99.0, "reference": 2047.5}}
    scaled = restoration_dataset(items, train=False, cache="disk", cache_dir=cache, intensity_reference=reference)[0]["hq"]
    assert float(plain.max()) == 1.0 and float(scaled.max()) == pytest.approx(0.5, abs=0.01)
