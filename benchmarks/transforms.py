"""Speed and calibration figures of the degradation transforms (not part of the test suite).

Prints slices per second (one thread unless ``--threads``) for k-space truncation, low-dose CT and the PET
pair; the torch projector against scikit-image's radon / iradon at the same geometry in the same run;
and the calibration figures: CT noise in the liver of the real abdominal slice shipped in
``pydicom-data`` at full and quarter dose, and the PET LQ / HQ noise ratio on a phantom.

Usage: ``python benchmarks/transforms.py [--threads 1] [--quick]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from medir_monai.transforms import (
    CT_FULL_DOSE_PHOTONS,
    KSpaceTruncate,
    ParallelBeamProjector,
    simulate_low_dose_ct,
    simulate_pet_pair,
)

LIVER_ROI = (slice(220, 270), slice(140, 180))  # uniform liver region of explicit_VR-UN.dcm


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def abdominal_slice() -> tuple[np.ndarray, float] | None:
    """The real 512 x 512 abdominal CT slice of pydicom-data, in HU, and its pixel size (None if absent)."""
    try:
        import data_store
        import pydicom
    except ImportError:
        return None
    path = Path(data_store.__path__[0]) / "data" / "explicit_VR-UN.dcm"
    if not path.exists():
        return None
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu, float(ds.PixelSpacing[0])


def shepp_logan(size: int) -> np.ndarray:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    phantom = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True).astype(np.float32)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    phantom[xx**2 + yy**2 > ((size - 1) / 2.0) ** 2] = 0.0
    return phantom


def bench_kspace(size: int, batch: int) -> None:
    images = torch.rand(batch, size, size)  # channel-first: every channel is one slice
    transform = KSpaceTruncate(0.25)
    transform(images[:2])
    _, seconds = timed(transform, images)
    print(f"k-space truncation {size}x{size}: {batch / seconds:8.1f} slices/s ({batch} slices)")


def bench_ct(batch: int, views: int) -> None:
    loaded = abdominal_slice()
    if loaded is None:
        print("CT: pydicom-data not installed, skipped")
        return
    hu, pixel = loaded
    stack = np.stack([hu] * batch)
    for mode in ("reconstruct", "insert_noise"):
        geometry = {"pixel_size_mm": pixel, "num_views": views, "mode": mode}
        quarter, seconds = timed(simulate_low_dose_ct, stack, 0.25, rng=1, **geometry)
        full = simulate_low_dose_ct(stack, 1.0, rng=2, **geometry)
        sigma_q = np.mean([img[LIVER_ROI].std() for img in quarter])
        sigma_f = np.mean([img[LIVER_ROI].std() for img in full])
        print(
            f"CT 512x512 quarter dose ({mode}, {views} views, I0={CT_FULL_DOSE_PHOTONS:.1e}): "
            f"{batch / seconds:6.2f} slices/s (batch {batch}); liver noise sigma: input {hu[LIVER_ROI].std():.1f} HU, "
            f"simulated full dose {sigma_f:.1f} HU, quarter dose {sigma_q:.1f} HU "
            f"(+{sigma_q - hu[LIVER_ROI].std():.1f} HU over the input)"
        )
    single, seconds = timed(simulate_low_dose_ct, hu, 0.25, pixel_size_mm=pixel, num_views=views, rng=3)
    print(f"CT 512x512 quarter dose, one slice per call: {1 / seconds:6.2f} slices/s")


def pet_phantom(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    body = (xx / (0.33 * size)) ** 2 + (yy / (0.24 * size)) ** 2 < 1
    activity = np.where(body, 1.0, 0.0).astype(np.float32)
    activity[(xx - 0.16 * size) ** 2 + yy**2 < (0.08 * size) ** 2] = 2.5
    activity[(xx + 0.2 * size) ** 2 + (yy - 0.04 * size) ** 2 < (0.025 * size) ** 2] = 8.0
    mu = np.where(body, 0.0096, 0.0).astype(np.float32)
    uniform = (xx + 0.08 * size) ** 2 + (yy + 0.1 * size) ** 2 < (0.06 * size) ** 2
    return activity, mu, uniform


def bench_pet(size: int, batch: int, pixel_mm: float) -> None:
    activity, mu, uniform = pet_phantom(size)
    stack = np.stack([activity] * batch)
    simulate_pet_pair(stack[:1], mu_map=mu, pixel_size_mm=pixel_mm, rng=0)  # builds and caches the projector
    (hq, lq), seconds = timed(simulate_pet_pair, stack, mu_map=mu, pixel_size_mm=pixel_mm, rng=1)
    cov_hq = np.mean([img[uniform].std() / img[uniform].mean() for img in hq])
    cov_lq = np.mean([img[uniform].std() / img[uniform].mean() for img in lq])
    body = activity > 0
    print(
        f"PET pair {size}x{size} ({pixel_mm} mm, 1/12 dose, 180 views, 3 it x 6 subsets): {batch / seconds:6.2f} "
        f"slices/s (batch {batch}); noise CoV HQ {cov_hq:.3f} LQ {cov_lq:.3f} ratio {cov_lq / cov_hq:.2f}; "
        f"mean LQ/HQ {lq[:, body].mean() / hq[:, body].mean():.4f}"
    )


def bench_projector(size: int, views: int, batch: int) -> None:
    from skimage.transform import iradon, radon

    phantom = shepp_logan(size)
    theta = np.arange(views) * 180.0 / views
    sino_sk, t_radon = timed(radon, phantom, theta=theta, circle=True)
    recon_sk, t_iradon = timed(iradon, sino_sk, theta=theta, circle=True, filter_name="ramp")

    projector = ParallelBeamProjector((size, size), 1.0, views, circle=True)
    stack = torch.from_numpy(np.stack([phantom] * batch))
    _, t_build = timed(projector.forward, stack[:1])  # first call: builds the sparse blocks when they are cached
    sino, t_fwd = timed(projector.forward, stack)
    recon, t_fbp = timed(projector.fbp, sino)
    _, t_fwd1 = timed(projector.forward, stack[:1])
    _, t_fbp1 = timed(projector.fbp, sino[:1])
    error = np.linalg.norm(sino[0].numpy() - sino_sk.T) / np.linalg.norm(sino_sk)
    t_skimage = t_radon + t_iradon
    mode = f"cached sparse, first call {t_build:.2f} s" if projector.cached else "streamed"
    print(
        f"projector {size}x{size}, {views} views ({mode}): skimage radon {t_radon:.2f} s + iradon {t_iradon:.2f} s "
        f"per slice; torch forward {t_fwd / batch:.3f} s + FBP {t_fbp / batch:.3f} s per slice (batch {batch}), "
        f"{t_fwd1:.2f} s + {t_fbp1:.2f} s (one slice); speed-up {t_skimage / ((t_fwd + t_fbp) / batch):.1f}x "
        f"batched, {t_skimage / (t_fwd1 + t_fbp1):.1f}x single; sinogram rel. difference {error:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-core figures)")
    parser.add_argument("--quick", action="store_true", help="smaller batches and geometries")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    quick = args.quick
    bench_kspace(256, 64 if quick else 256)
    bench_pet(128, 16, 2.0)
    if not quick:
        bench_pet(256, 16, 2.0)
    bench_ct(2 if quick else 8, 720)
    bench_projector(255 if quick else 511, 360 if quick else 720, 4 if quick else 8)
    bench_projector(255, 180, 16)


if __name__ == "__main__":
    main()
