"""How a trained bundle restores the hottest structures of a PET slice (lesion uptake, SUVmax).

PSNR over a whole PET slice is dominated by the large warm background; a model can gain there and still flatten
small high-uptake structures, which is what a reader measures (SUVmax, SUVmean of a lesion). This script restores the
PET test slices of the corpus (sources in no training split) with each model and prints, per slice and as the range
over slices:

- the mean SUV of the **hottest 1 % of the body** (body: HQ above ``--body-suv``; hottest: the HQ's top
  ``--hot-fraction`` of the body) in HQ, LQ, a Gaussian-blurred LQ (sigma ``--blur-sigma`` pixels: what plain
  smoothing gives) and each model's output, and that mean divided by the HQ's (uptake kept: what the bundles'
  validation logs per PET slice as ``val_hot_recovery_pet_synthesis`` and ``pretrained.json`` floors in checkpoint
  selection; same definition, ``Task.hot_spot``);
- the hottest pixel (SUVmax) of HQ and of each output;
- the share of each output's squared error (over the whole slice) that lies in that hottest 1 %.

    python benchmarks/pet_hot_spots.py                                    # the shipped AMIR, TAT and Restormer
    python benchmarks/pet_hot_spots.py --models tat --checkpoint tat=bundles/tat/models/pretrained/model.pt

Each model is restored as its ``configs/pretrained.json`` restores (flip ensemble included; ``--no-flip-ensemble``
for one pass); ``--checkpoint NAME=FILE`` replaces a model's shipped weights with another file of the same
configuration (e.g. a retrained one before it is shipped); ``--split validation`` restores the validation slices
instead (those checkpoint selection sees). Never part of the test suite
(``tests/test_pet_hot_spots.py`` tests the measures).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]

from medir_monai.data.demo import demo_sources, ensure_demo_dataset, extended_demo_dir  # noqa: E402
from medir_monai.data.io import load_image  # noqa: E402
from medir_monai.deploy.models import load_restoration_model  # noqa: E402
from medir_monai.metrics import hot_spot_mask, paper_metrics  # noqa: E402
from medir_monai.restore import restore_array  # noqa: E402
from medir_monai.tasks import get_task  # noqa: E402

TASK = "pet_synthesis"
BODY_SUV, HOT_FRACTION = get_task(TASK).hot_spot  # the validation metric's definition (val_hot_recovery_...)


def hot_spot_measures(
    hq: np.ndarray, others: dict[str, np.ndarray], body_suv: float = BODY_SUV, hot_fraction: float = HOT_FRACTION
) -> dict[str, dict[str, float]]:
    """Per image of ``others`` (same shape as ``hq``, SUV): mean over the HQ's hottest ``hot_fraction`` of the body
    (``hq > body_suv``), its hottest pixel and the share of its squared error (over the slice) inside those pixels;
    ``"hq"`` gets the same mean and peak."""
    if hq.ndim != 2 or any(o.shape != hq.shape for o in others.values()):
        raise ValueError(f"expected 2-D images of one shape, got HQ {hq.shape} and {[o.shape for o in others.values()]}")
    hot = hot_spot_mask(torch.as_tensor(hq), body_suv, hot_fraction)[0, 0].numpy()
    if not hot.any():
        raise ValueError(f"fewer than {1.0 / hot_fraction:.0f} body pixels (HQ > {body_suv} SUV): no hottest "
                         f"{hot_fraction:.0%} to measure")
    out = {"hq": {"hot_mean": float(hq[hot].mean()), "peak": float(hq.max()), "hot_pixels": int(hot.sum())}}
    for name, image in others.items():
        squared = (image.astype(np.float64) - hq) ** 2
        total = float(squared.sum())
        out[name] = {
            "hot_mean": float(image[hot].mean()),
            "peak": float(image.max()),
            "error_share_in_hot": float(squared[hot].sum() / total) if total > 0 else 0.0,
        }
    return out


def _psnr(image: np.ndarray, hq: np.ndarray) -> float:
    as_batch = lambda a: torch.as_tensor(a, dtype=torch.float32)[None]  # noqa: E731
    return float(paper_metrics(as_batch(image), as_batch(hq), TASK, normalised=False)["psnr"][0])


def _split_slices(dataset_dir: Path, split: str = "test") -> list[dict]:
    return [item for source in demo_sources(dataset_dir) if source["task"] == TASK and source["split"] == split
            for item in source["items"]]


def _range(values: list[float], fmt: str) -> str:
    return f"{min(values):{fmt}}-{max(values):{fmt}}" if len(values) > 1 else f"{values[0]:{fmt}}"


def _parse_checkpoints(pairs: list[str]) -> dict[str, Path]:
    out = {}
    for pair in pairs:
        name, sep, file = pair.partition("=")
        if not sep or not file:
            raise SystemExit(f"--checkpoint {pair!r}: expected NAME=FILE, e.g. tat=bundles/tat/models/pretrained/model.pt")
        out[name] = Path(file)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["amir", "tat", "restormer"])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--dataset-dir", type=Path, default=None, help="corpus (default: the extended corpus)")
    parser.add_argument("--split", default="test", choices=("test", "validation"),
                        help="the corpus split to restore (validation: the slices checkpoint selection sees)")
    parser.add_argument("--body-suv", type=float, default=BODY_SUV)
    parser.add_argument("--hot-fraction", type=float, default=HOT_FRACTION)
    parser.add_argument("--blur-sigma", type=float, default=1.5)
    parser.add_argument("--no-flip-ensemble", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write every per-slice figure here")
    args = parser.parse_args(argv)
    checkpoints = _parse_checkpoints(args.checkpoint)
    dataset_dir = args.dataset_dir or ensure_demo_dataset(extended_demo_dir(), extended=True)
    slices = _split_slices(dataset_dir, args.split)
    if not slices:
        raise SystemExit(f"{dataset_dir}: no PET {args.split} slices")
    models = {}
    for name in args.models:
        model = load_restoration_model(REPO / "bundles" / name / "configs" / "pretrained.json",
                                       checkpoint=checkpoints.get(name))
        settings = dict(model.settings)
        if args.no_flip_ensemble:
            settings["flip_ensemble"] = False
        models[name] = (model, settings)
    rows = []
    for item in slices:
        lq = np.asarray(load_image(item["lq"]).squeeze(), dtype=np.float32)
        hq = np.asarray(load_image(item["hq"]).squeeze(), dtype=np.float64)
        images = {"lq": lq, "blurred_lq": ndimage.gaussian_filter(lq, args.blur_sigma)}
        for name, (model, settings) in models.items():
            with torch.no_grad():
                images[name] = np.asarray(restore_array(model.network, lq, TASK, roi_size=model.roi_size,
                                                        progress=False, **settings))
        measures = hot_spot_measures(hq, images, args.body_suv, args.hot_fraction)
        for name, image in images.items():
            measures[name]["psnr"] = _psnr(image, hq)
        rows.append({"slice": Path(item["lq"]).name, **measures})
    print(f"PET {args.split} slices: {len(rows)} ({dataset_dir}); hottest {args.hot_fraction:.0%} of the body (HQ > "
          f"{args.body_suv} SUV); flip ensemble {'off' if args.no_flip_ensemble else 'as pretrained.json'}")
    for row in rows:
        for name in images:
            row[name]["kept"] = row[name]["hot_mean"] / row["hq"]["hot_mean"]
    print("| image | PSNR (dB), mean (range) | hottest-1 % mean (SUV) | uptake kept, mean (range) | SUVmax | "
          "share of squared error in the hottest 1 % |")
    print("|---|---|---|---|---|---|")
    print(f"| HQ | | {_range([r['hq']['hot_mean'] for r in rows], '.2f')} | | {_range([r['hq']['peak'] for r in rows], '.2f')} | |")
    for name in images:
        label = {"lq": "LQ", "blurred_lq": f"LQ, Gaussian sigma {args.blur_sigma:g} px"}.get(name, name)
        psnr = [r[name]["psnr"] for r in rows]
        kept = [r[name]["kept"] for r in rows]
        cells = [f"{np.mean(psnr):.2f} ({_range(psnr, '.2f')})", _range([r[name]["hot_mean"] for r in rows], ".2f"),
                 f"{np.mean(kept):.3f} ({_range(kept, '.3f')})"] + [
            _range([r[name][k] for r in rows], fmt) for k, fmt in (("peak", ".2f"), ("error_share_in_hot", ".0%"))
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
