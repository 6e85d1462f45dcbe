"""What the consistency safeguard does to a trained bundle's output on scans it has not seen.

Restores held-out scans of the demo set (CT: the test patient's head slice, re-degraded at other grids, doses
and view counts; MRI: the validation and test sources, and the Colin27 volumes of the extended corpus when their
Debian packages are installed) with and without each safeguard method, and prints paper-convention PSNR / SSIM
against HQ beside the LQ's.

    python benchmarks/safeguard.py                                   # AMIR, quick.json, models/quick/model.pt
    python benchmarks/safeguard.py --bundle bundles/restormer --config bundles/restormer/configs/quick.json

Never part of the test suite (``tests/test_safeguard.py`` tests the methods).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]

from medir_monai.data import ensure_demo_dataset  # noqa: E402
from medir_monai.data.demo import CT_SOURCES, MR_SOURCES_EXTENDED, demo_sources  # noqa: E402
from medir_monai.data.demo.builders import _load_ct, _mr_slices  # noqa: E402
from medir_monai.data.io import load_image  # noqa: E402
from medir_monai.deploy.models import load_bundle_network  # noqa: E402
from medir_monai.restore import restore_array  # noqa: E402
from medir_monai.metrics import paper_metrics  # noqa: E402
from medir_monai.safeguard import RestorationSafeguard  # noqa: E402
from medir_monai.tasks import get_task  # noqa: E402
from medir_monai.transforms import kspace_truncate, simulate_low_dose_ct  # noqa: E402

CT_CASES = (  # (block-mean factor of the grid, dose fraction, projection views)
    (1, 0.25, 720),
    (2, 0.25, 720),
    (2, 0.25, 360),
    (2, 0.6, 720),
)
KSPACE = {"mri_sr": {"method": "kspace", "keep_fraction": 0.25}}


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image
    h, w = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    return image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean((1, 3)).astype(np.float32)


def _metrics(image, hq, task) -> tuple[float, float]:
    m = paper_metrics(torch.as_tensor(image)[None].float(), torch.as_tensor(hq)[None].float(), task, normalised=False)
    return float(m["psnr"][0]), float(m["ssim"][0])


def _row(label: str, results: list[dict[str, tuple[float, float]]]) -> str:
    keys = list(results[0])
    cells = [f"{np.mean([r[k][0] for r in results]):.2f} / {np.mean([r[k][1] for r in results]):.4f}" for k in keys]
    return f"| {label} | {len(results)} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=str(REPO / "bundles" / "amir"))
    p.add_argument("--config", default=None, help="config merged over inference.json (default: the bundle's quick.json)")
    p.add_argument("--checkpoint", default=None, help="weights (default: the config's ckpt_path)")
    p.add_argument("--mri-slices", type=int, default=6, help="slices per MRI source, evenly spread")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    bundle = Path(args.bundle).resolve()
    config = Path(args.config) if args.config else bundle / "configs" / "quick.json"
    network, info = load_bundle_network(bundle, [config], checkpoint=args.checkpoint)
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "inference.json"), str(config)])
    parser["bundle_root"] = str(bundle)
    reference = parser.get_parsed_content("intensity_reference")
    guard = parser.get_parsed_content("safeguard") or {}
    patch = info["roi_size"]
    start = time.perf_counter()

    def restore(lq, task):
        return restore_array(network, lq, task, roi_size=patch, progress=False, sw_batch_size=4,
                             intensity_reference=reference)

    def guarded(settings, lq, restored, task):  # what restore_array(safeguard=settings) returns, network run once
        return RestorationSafeguard(settings)(torch.as_tensor(lq), torch.as_tensor(restored), task)

    print(f"# benchmarks/safeguard.py  {time.strftime('%Y-%m-%d')}  {bundle.name}, {config.name}, "
          f"{info['checkpoint']}, CPU {torch.backends.cpu.get_cpu_capability()}\n")
    ct = get_task("ct_denoise")
    ct_guard = {"ct_denoise": guard["ct_denoise"]} if "ct_denoise" in guard else None
    print(f"CT (paper convention, PSNR / SSIM), safeguard {ct_guard}\n")
    print("| CT source, grid, dose, views | slices | LQ | network | network + safeguard |")
    print("|---|---|---|---|---|")
    for source in CT_SOURCES:
        if source.split != "test":
            continue
        hu, spacing = _load_ct(source)
        for factor, dose, views in CT_CASES:
            hq = _block_mean(hu, factor)
            lq = np.asarray(simulate_low_dose_ct(hq, dose_fraction=dose, pixel_size_mm=spacing[0] * factor,
                                                 mode="insert_noise", num_views=views, rng=1))
            restored = restore(lq, ct)
            result = {"lq": _metrics(lq, hq, ct), "net": _metrics(restored, hq, ct)}
            if ct_guard:
                result["guarded"] = _metrics(guarded(ct_guard, lq, restored, ct), hq, ct)
            label = f"{source.name}, {hq.shape[0]} x {hq.shape[1]} at {spacing[0] * factor:.2f} mm, {dose}, {views}"
            print(_row(label, [result]))

    mr = get_task("mri_sr")
    print("\nMRI (paper convention, PSNR / SSIM), the \"kspace\" method\n")
    print("| MR source | slices | LQ | network | network + kspace consistency |")
    print("|---|---|---|---|---|")
    root = ensure_demo_dataset(None)
    pairs: dict[str, list] = {}
    for source in demo_sources(root):
        if source["task"] == "mri_sr" and source["split"] != "train":
            items = source["items"]
            picks = np.linspace(0, len(items) - 1, min(args.mri_slices, len(items))).round().astype(int)
            pairs[source["source"]] = [(load_image(items[i]["lq"], ndim=(2,)).as_tensor().float(),
                                        load_image(items[i]["hq"], ndim=(2,)).as_tensor().float()) for i in picks]
    for source in MR_SOURCES_EXTENDED:
        try:
            planes, _ = _mr_slices(source)
        except Exception as err:  # a missing Debian package: say so, go on
            print(f"| {source.name} | 0 | skipped: {err} | | |")
            continue
        picks = np.linspace(0, len(planes) - 1, min(args.mri_slices, len(planes))).round().astype(int)
        pairs[source.name] = [(kspace_truncate(torch.as_tensor(planes[i]).float()[None], 0.25)[0],
                               torch.as_tensor(planes[i]).float()) for i in picks]
    for name, slices in pairs.items():
        results = []
        for lq, hq in slices:
            restored = restore(lq, mr)
            results.append({"lq": _metrics(lq, hq, mr), "net": _metrics(restored, hq, mr),
                            "kspace": _metrics(guarded(KSPACE, lq, restored, mr), hq, mr)})
        print(_row(name, results))
    print(f"\n# total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
