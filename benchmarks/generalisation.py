"""Leave-one-source-out generalisation: does a model restore a scan from a source it never saw?

For each fold, the demo corpus's sources (subjects / volumes / scanners, see the demo's ``SOURCES.md``) are
split into *left out* (one source per task, or two MRI sources) and *training* (all the others); a small model
is trained with a bundle's training config on the training sources only (validation only once, at the end, on
the left-out sources: no model selection on them), then every left-out LQ slice is restored with the bundle's
restore path (:func:`medir_monai.restore.restore_array`, per-scan normalisation, the config's safeguard and flip
ensemble setting included; the last two columns are the same network without the safeguard, and with the other
flip ensemble setting) and compared with its HQ. Prints LQ vs restored per task and per left-out source, paper
convention (PSNR / SSIM / RMSE in physical units, eval window) and MONAI's PSNR / SSIM; for the MR sources a
second table compares the network's guess of the missing k-space band with the truth
(:func:`out_of_band_agreement`).

    python benchmarks/generalisation.py                       # AMIR quick config, all folds
    python benchmarks/generalisation.py --folds 0 --iterations 300
    python benchmarks/generalisation.py --bundle bundles/restormer --config bundles/restormer/configs/quick.json
    python benchmarks/generalisation.py --models-dir loso_models   # keep each fold's network; a rerun restores only

``--models-dir`` saves every fold's trained network (``fold<N>.pt`` and ``fold<N>.json``: left-out sources,
iterations, seed); a later run with the same folder, fold split, iterations and seed loads it instead of training
again, so restore-time options (``safeguard``, ``flip_ensemble``) can be compared on the same networks. The
folder does not record the training options: empty it after changing one.

Never part of the test suite's pass/fail (``tests/test_generalisation.py`` is the slow test that asserts one fold).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]

from medir_monai.atomic import atomic_save, atomic_write_text  # noqa: E402
from medir_monai.bundle import bundle_parser  # noqa: E402
from medir_monai.data import ensure_demo_dataset  # noqa: E402
from medir_monai.data.demo import demo_sources  # noqa: E402
from medir_monai.data.io import load_image  # noqa: E402
from medir_monai.restore import restore_array  # noqa: E402
from medir_monai.metrics import monai_metrics, paper_metrics  # noqa: E402
from medir_monai.safeguard import RestorationSafeguard, kspace_consistency  # noqa: E402
from medir_monai.tasks import get_task  # noqa: E402

TASKS = ("mri_sr", "ct_denoise", "pet_synthesis")


def make_folds(sources: list[dict], mri_per_fold: int = 2) -> list[dict[str, list[str]]]:
    """Folds that leave out every source once: fold ``i`` holds the ``i``-th CT and PET source and
    ``mri_per_fold`` MRI sources (MRI has the most); ``{task: [left-out source names]}`` per fold."""
    names = {t: [s["source"] for s in sources if s["task"] == t] for t in TASKS}
    per_fold = {t: (mri_per_fold if t == "mri_sr" else 1) for t in TASKS}
    count = max(-(-len(names[t]) // per_fold[t]) for t in TASKS if names[t])
    folds = []
    for i in range(count):
        fold = {}
        for t in TASKS:
            groups = [names[t][j : j + per_fold[t]] for j in range(0, len(names[t]), per_fold[t])]
            if groups:
                fold[t] = groups[i % len(groups)]
        folds.append(fold)
    return folds


def write_datalist(sources: list[dict], left_out: dict[str, list[str]], path: Path) -> dict[str, int]:
    """A JSON datalist: training = every slice of the other sources, validation / test = the left-out ones."""
    train, held = [], []
    for s in sources:
        (held if s["source"] in left_out.get(s["task"], []) else train).extend(s["items"])
    path.write_text(json.dumps({"training": train, "validation": held, "test": held}, indent=1))
    return {"train": len(train), "left_out": len(held)}


def train_fold(bundle: Path, configs: list[Path], datalist: Path, work: Path, iterations: int, seed: int):
    """Train with the bundle's own config on ``datalist`` into ``work``; returns the network and the parser."""
    parser, _ = bundle_parser(bundle, "train.json", configs)
    parser["dataset_dir"] = str(datalist)
    parser["ckpt_dir"] = str(work / "models")
    parser["output_dir"] = str(work / "runs")
    parser["cache_dir"] = str(work / "cache")
    parser["max_iterations"] = iterations
    parser["val_interval"] = iterations  # one validation, at the end: nothing is selected on the left-out data
    parser["epoch_length"] = iterations  # one epoch, as the leave-one-source-out tables were measured
    parser["val_max_per_task"] = 1  # (the figures come from evaluate_source, on the restore path)
    parser["seed"] = seed
    parser["device"] = "$torch.device('cpu')"
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("training")
    return parser.get_parsed_content("network"), parser


def fold_network(bundle: Path, configs: list[Path], datalist: Path, work: Path, iterations: int, seed: int,
                 record: dict, models_dir: Path | None):
    """:func:`train_fold`, or the network saved in ``models_dir`` for the same ``record`` (fold, left-out sources,
    iterations, seed); a newly trained one is saved there (atomically). Returns ``(network, parser, trained_now)``."""
    weights = json_path = None
    if models_dir is not None:
        weights, json_path = models_dir / f"fold{record['fold']}.pt", models_dir / f"fold{record['fold']}.json"
        if weights.is_file() and json_path.is_file() and json.loads(json_path.read_text()) == record:
            parser, _ = bundle_parser(bundle, "train.json", configs)
            network = parser.get_parsed_content("network_def")
            network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return network, parser, False
    network, parser = train_fold(bundle, configs, datalist, work, iterations, seed)
    if weights is not None:
        models_dir.mkdir(parents=True, exist_ok=True)
        atomic_save(network.state_dict(), weights)
        atomic_write_text(json_path, json.dumps(record, indent=1))
    return network, parser, True


def out_of_band_agreement(lq: torch.Tensor, hq: torch.Tensor, restored: torch.Tensor,
                          keep_fraction: float = 0.25) -> dict[str, float]:
    """How the network's guess of the missing k-space band of a 4x-truncated MR slice compares with the truth.

    ``guess`` and ``truth`` are the parts of ``restored - lq`` and ``hq - lq`` outside the acquired central band
    (what the ``"kspace"`` safeguard keeps of each). Returns ``energy`` = |guess| / |truth|, ``correlation`` =
    <guess, truth> / (|guess| |truth|) and ``scale`` = <guess, truth> / |guess|^2, the least-squares factor on the
    guess (above 1: the network under-predicts the missing band; near 0: its guess is unrelated to it).
    """
    guess = (kspace_consistency(lq, restored, keep_fraction) - lq).double()
    truth = (kspace_consistency(lq, hq, keep_fraction) - lq).double()
    tiny = torch.finfo(torch.float64).tiny
    guess_norm, truth_norm = guess.norm().clamp_min(tiny), truth.norm().clamp_min(tiny)
    inner = float((guess * truth).sum())
    return {"energy": float(guess_norm / truth_norm), "correlation": inner / float(guess_norm * truth_norm),
            "scale": inner / float(guess_norm * guess_norm)}


def evaluate_source(network, source: dict, parser: ConfigParser, max_slices: int | None = None) -> dict[str, dict[str, float]]:
    """LQ and restored metrics (means over the source's slices, at most ``max_slices`` evenly spread) against HQ, in
    physical units."""
    task = get_task(source["task"])
    patch = parser.get_parsed_content("patch_size")
    reference = parser.get_parsed_content("intensity_reference")
    guard = RestorationSafeguard(parser.get_parsed_content("safeguard"))
    ensemble = bool(parser.get_parsed_content("flip_ensemble"))
    rows = {"lq": [], "restored": [], "unguarded": [], "other_ensemble": []}
    band_rows = []  # MRI only: the network's guess of the missing band against the truth
    items = source["items"]
    if max_slices is not None and len(items) > max_slices:
        items = [items[i] for i in np.linspace(0, len(items) - 1, max_slices).round().astype(int)]
    windows = parser.get_parsed_content("val_sw_batch_size")  # windows per network call: speed only
    for item in items:
        lq = load_image(item["lq"], ndim=(2,)).as_tensor().float()
        hq = load_image(item["hq"], ndim=(2,)).as_tensor().float()
        options = dict(roi_size=patch, overlap=0.25, sw_batch_size=windows, progress=False, intensity_reference=reference)
        unguarded = restore_array(network, lq, task, flip_ensemble=ensemble, **options)
        restored = guard(lq, unguarded, task) if guard else unguarded  # what restore_array(safeguard=...) returns
        other = restore_array(network, lq, task, flip_ensemble=not ensemble, safeguard=guard, **options)
        for key, image in (("lq", lq), ("restored", restored), ("unguarded", unguarded), ("other_ensemble", other)):
            m = paper_metrics(image[None], hq[None], task, normalised=False)
            m.update(monai_metrics(image[None], hq[None], task, normalised=False))
            rows[key].append({k: float(v[0]) for k, v in m.items()})
        if task.name == "mri_sr":
            band_rows.append(out_of_band_agreement(lq, hq, unguarded, task.degradation_args["keep_fraction"]))
    means = {key: _column_means(vals) for key, vals in rows.items()}
    if band_rows:
        means["out_of_band"] = _column_means(band_rows)
    return {**means, "slices": len(items), "flip_ensemble": ensemble}


def _column_means(rows: list[dict[str, float]]) -> dict[str, float]:
    """``[{name: value}, ...]`` (one dict per slice, same names) -> ``{name: mean over the slices}``."""
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def band_table(results: list[dict]) -> str:
    """The MR rows' :func:`out_of_band_agreement` (means over slices)."""
    lines = ["| fold | MR source | out-of-band energy, guess / truth | correlation | least-squares scale |",
             "|---|---|---|---|---|"]
    for r in results:
        if "out_of_band" in r:
            band = r["out_of_band"]
            lines.append(f"| {r['fold']} | {r['source']} | {band['energy']:.2f} | {band['correlation']:.2f} "
                         f"| {band['scale']:.2f} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = [
        "| fold | task | left-out source | slices | LQ PSNR | restored PSNR | LQ SSIM | restored SSIM | LQ RMSE | restored RMSE "
        "| LQ MONAI PSNR | restored MONAI PSNR | better? | without safeguard: PSNR / SSIM "
        f"| flip ensemble {'off' if results and results[0]['flip_ensemble'] else 'on'}: PSNR / SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lq, rs, raw, other = r["lq"], r["restored"], r["unguarded"], r["other_ensemble"]
        better = "yes" if rs["psnr"] > lq["psnr"] and rs["ssim"] > lq["ssim"] else "**no**"
        lines.append(
            f"| {r['fold']} | {r['task']} | {r['source']} | {r['slices']} | {lq['psnr']:.2f} | {rs['psnr']:.2f} "
            f"| {lq['ssim']:.4f} | {rs['ssim']:.4f} | {lq['rmse']:.4g} | {rs['rmse']:.4g} "
            f"| {lq['monai_psnr']:.2f} | {rs['monai_psnr']:.2f} | {better} | {raw['psnr']:.2f} / {raw['ssim']:.4f} "
            f"| {other['psnr']:.2f} / {other['ssim']:.4f} |"
        )
    return "\n".join(lines)


def run(bundle: Path, configs: list[Path], demo_dir: Path | None, folds: list[int] | None, iterations: int,
        seed: int, mri_per_fold: int, max_slices: int | None = None, eval_slices: int | None = 12,
        models_dir: Path | None = None) -> list[dict]:
    root = ensure_demo_dataset(demo_dir, max_slices=max_slices, verbose=True)
    sources = demo_sources(root)
    all_folds = make_folds(sources, mri_per_fold)
    results = []
    for index in folds if folds is not None else range(len(all_folds)):
        left_out = all_folds[index]
        with tempfile.TemporaryDirectory(prefix=f"medir_loso{index}_") as tmp:
            work = Path(tmp)
            counts = write_datalist(sources, left_out, work / "datalist.json")
            print(f"fold {index}: leaving out {left_out} ({counts['train']} training slices)", file=sys.stderr, flush=True)
            start = time.perf_counter()
            record = {"fold": index, "left_out": left_out, "iterations": iterations, "seed": seed}
            network, parser, fresh = fold_network(bundle, configs, work / "datalist.json", work, iterations, seed,
                                                  record, models_dir)
            trained = time.perf_counter() - start if fresh else None
            if not fresh:
                print(f"fold {index}: network loaded from {models_dir}", file=sys.stderr, flush=True)
            for s in sources:
                if s["source"] in left_out.get(s["task"], []):
                    metrics = evaluate_source(network, s, parser, eval_slices)
                    results.append({"fold": index, "task": s["task"], "source": s["source"], "train_seconds": trained,
                                    **metrics})
            print(table([r for r in results if r["fold"] == index]), file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=str(REPO / "bundles" / "amir"))
    p.add_argument("--config", nargs="*", default=None, help="configs merged over train.json (default: the bundle's quick.json)")
    p.add_argument("--demo-dir", default=None, help="demo folder (default: the usual one, built if missing)")
    p.add_argument("--max-slices", type=int, default=None, help="demo build with at most this many slices per source")
    p.add_argument("--folds", type=int, nargs="*", default=None, help="fold indices to run (default: all)")
    p.add_argument("--iterations", type=int, default=800)
    p.add_argument("--mri-per-fold", type=int, default=2)
    p.add_argument("--eval-slices", type=int, default=12, help="left-out slices restored per source, evenly spread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--models-dir", default=None,
                   help="save each fold's network here, or load it when a previous run saved the same fold")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    bundle = Path(args.bundle).resolve()
    configs = [Path(c) for c in args.config] if args.config else [bundle / "configs" / "quick.json"]
    start = time.perf_counter()
    results = run(bundle, configs, Path(args.demo_dir) if args.demo_dir else None, args.folds, args.iterations,
                  args.seed, args.mri_per_fold, args.max_slices, args.eval_slices,
                  Path(args.models_dir) if args.models_dir else None)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"# benchmarks/generalisation.py  {time.strftime('%Y-%m-%d')}  bundle {bundle.name}, configs "
          f"{[c.name for c in configs]}, {args.iterations} iterations per fold, CPU {capability}, "
          f"{time.perf_counter() - start:.0f} s\n")
    print("Leave-one-source-out: each row's source was not in that fold's training data. Paper convention "
          "(per slice, eval window, label range; RMSE in the task's unit), mean over the source's slices.\n")
    print(table(results))
    if any("out_of_band" in r for r in results):
        print("\nMRI: the network's guess of the missing k-space band (its change outside the acquired band, without "
              "the safeguard) against the truth (HQ - LQ there), mean over the source's slices.\n")
        print(band_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
