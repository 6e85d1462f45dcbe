"""Inference figures: seconds per slice and per demo volume, whole image vs sliding window, and peak memory.

Usage::

    python benchmarks/inference.py                                  # defaults below (~10 min on 2 idle cores)
    python benchmarks/inference.py --models amir --sizes 512x512 --repeats 3
    python benchmarks/inference.py --volumes mri ct pet             # all demo test volumes (long on a CPU)

What is timed is :func:`medir_monai.restore.restore_array` on one input in physical units (normalisation,
network, de-normalisation included), with the paper-configuration networks (random weights: the time does not
depend on them):

* ``whole``: the slice in one forward pass (roi = the slice size, so the inferer makes a single window);
* ``sliding``: MONAI's sliding window with the training patch (roi 128 x 128, overlap 0.25, gaussian blending,
  ``--sw-batch-size`` windows per call), the setting of ``medir restore`` and the deploy apps.

Slices: 256x256 (MRI task), 512x512 (CT task), 192x400 (PET task). Volumes: the embedded demo set's
``<task>/test/LQ`` slices stacked (build it first with ``medir demo-data``), restored with the sliding window.
Each measurement runs in a fresh subprocess, so ``ru_maxrss`` is its own peak resident memory; ``model MB`` is the
resident memory after building the model and a small warm-up pass, before the timed call. Times are the minimum
over ``--repeats`` calls (and the median when repeats > 1); on a shared machine compare rows of the same run only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {
    "restormer": ("medir_monai.networks.restormer", "Restormer"),
    "amir": ("medir_monai.networks.amir", "AMIR"),
    "tat": ("medir_monai.networks.tat", "TAT"),
}
SLICE_TASK = {(256, 256): "mri_sr", (512, 512): "ct_denoise", (192, 400): "pet_synthesis"}
"""Task (normalisation range) used for each benchmark slice size; other sizes use the CT task."""
VOLUME_TASK = {"mri": "mri_sr", "ct": "ct_denoise", "pet": "pet_synthesis"}
DEFAULT_SIZES = ("256x256", "512x512", "192x400")
DEFAULT_VOLUMES = ("pet",)  # the cheap one (12 slices of 128 x 128); MRI / CT volumes take long on a CPU
WARMUP_SHAPE = (1, 1, 64, 64)


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _current_rss_mb() -> float:
    """Resident memory now (Linux /proc), falling back to the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _rss_mb()


def _volume(name: str):
    """The demo test volume of task ``name`` (``(H, W, N)`` numpy, physical units) and its slice count."""
    import nibabel as nib
    import numpy as np

    from medir_monai.data import default_demo_dir
    from medir_monai.tasks import get_task

    folder = default_demo_dir() / get_task(VOLUME_TASK[name]).folder / "test" / "LQ"
    files = sorted(folder.glob("*.nii*"))
    if not files:
        raise FileNotFoundError(f"{folder}: no demo slices; build the demo set with `medir demo-data`")
    planes = [np.asarray(nib.load(str(f)).get_fdata(dtype=np.float32)).squeeze() for f in files]
    return np.stack(planes, axis=-1)


def _worker(spec: dict) -> dict:
    """One measurement in this process (``spec``: model, kind, size or volume, mode, settings)."""
    import importlib

    import numpy as np
    import torch

    from medir_monai.restore import restore_array
    from medir_monai.tasks import get_task

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    module, cls = MODELS[spec["model"]]
    model = getattr(importlib.import_module(module), cls)().eval()
    with torch.no_grad():
        model(torch.rand(WARMUP_SHAPE))
    if spec["kind"] == "slice":
        h, w = spec["size"]
        task = get_task(SLICE_TASK.get((h, w), "ct_denoise"))
        low, high = task.norm_range
        image = np.random.default_rng(0).uniform(low, high, size=(h, w)).astype(np.float32)
    else:
        task = get_task(VOLUME_TASK[spec["volume"]])
        image = _volume(spec["volume"])
        if spec.get("max_slices"):
            image = image[..., : spec["max_slices"]]
    plane = image.shape[:2]
    roi = plane if spec["mode"] == "whole" else (spec["roi"], spec["roi"])
    model_mb = _current_rss_mb()
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        restore_array(model, image, task, roi_size=roi, overlap=spec["overlap"], sw_batch_size=spec["sw_batch_size"],
                      progress=False)
        times.append(time.perf_counter() - t0)
    slices = 1 if image.ndim == 2 else image.shape[-1]
    return {**spec, "task": task.name, "shape": list(image.shape), "slices": slices, "times": times,
            "model_mb": model_mb, "peak_mb": _rss_mb()}


def _run(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {**spec, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"size must look like HxW, e.g. 512x512; got {text!r}")
    return int(parts[0]), int(parts[1])


def _row(r: dict) -> str:
    what = "x".join(map(str, r["size"])) + " slice" if r["kind"] == "slice" else f"{r['volume'].upper()} demo volume"
    head = f"{r['model']:<10} {what:<18} {r['mode']:<8}"
    if "error" in r:
        return f"{head} error: {r['error']}"
    best = min(r["times"])
    median = f" (median {statistics.median(r['times']):.2f})" if len(r["times"]) > 1 else ""
    shape = "x".join(map(str, r["shape"]))
    return (f"{head} {shape:<12} {best / r['slices']:>9.2f} {best:>9.2f}{median:<17} {r['model_mb']:>8.0f} "
            f"{r['peak_mb']:>8.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--sizes", nargs="*", type=_parse_size, default=[_parse_size(s) for s in DEFAULT_SIZES],
                   help="slice sizes HxW (default: %(default)s)")
    p.add_argument("--modes", nargs="+", default=["whole", "sliding"], choices=["whole", "sliding"])
    p.add_argument("--volumes", nargs="*", default=list(DEFAULT_VOLUMES), choices=list(VOLUME_TASK),
                   help="demo test volumes, restored with the sliding window (default: pet)")
    p.add_argument("--volume-slices", type=int, default=0, help="use only the first N slices of a volume (0: all)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--roi", type=int, default=128, help="sliding-window size (the training patch)")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--sw-batch-size", type=int, default=4)
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    import torch

    common = {"threads": args.threads, "repeats": args.repeats, "roi": args.roi, "overlap": args.overlap,
              "sw_batch_size": args.sw_batch_size}
    specs = []
    for model in args.models:
        specs += [{**common, "model": model, "kind": "slice", "size": list(s), "mode": m}
                  for s in args.sizes for m in args.modes]
        specs += [{**common, "model": model, "kind": "volume", "volume": v, "mode": "sliding",
                   "max_slices": args.volume_slices} for v in args.volumes]
    print(f"# medir-monai inference benchmark: torch {torch.__version__}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"# paper-configuration networks; sliding window roi {args.roi}x{args.roi}, overlap {args.overlap}, "
          f"gaussian, {args.sw_batch_size} windows per call; repeats {args.repeats} (minimum shown)")
    print(f"{'model':<10} {'input':<18} {'mode':<8} {'shape':<12} {'s/slice':>9} {'total s':>9}{'':<17} "
          f"{'model MB':>8} {'peak MB':>8}")
    results = []
    start = time.perf_counter()
    for spec in specs:
        result = _run(spec)
        results.append(result)
        print(_row(result), flush=True)
    print(f"# {len(results)} measurements in {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
