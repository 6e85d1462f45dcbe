"""How much the data loader adds to a training step, with a bundle's own training pipeline.

Usage::

    python benchmarks/dataloader.py                                    # AMIR bundle, demo data, batch 2
    python benchmarks/dataloader.py --config bundles/tat/configs/train.json --dataset-dir /data/ixi_mayo_pet

The bundle's ``train#dataset`` is built (degradations and reads are cached once: ``cache`` memory or disk, the
random crops stay random per draw), then ``--batches`` batches are drawn from ``train#dataloader`` and the
bundle's paper-size network takes ``--steps`` Adam steps on them. Printed: cache fill time, loader seconds per
batch, step seconds, and the loader's share of a step (the target is under 10 %).

``--simulate N`` replaces the stored LQ/HQ pairs by a JSON datalist of the first ``N`` HQ-only training slices of
each task, so every LQ is simulated (k-space truncation, CT projection + Poisson noise + FBP, PET counts + OSEM):
the simulation happens once while the cache fills, the draws stay as cheap as with stored pairs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_hq_only_datalist(dataset_dir: str, per_task: int) -> str:
    """A temporary JSON datalist with the first ``per_task`` HQ training slices of each task and no LQ."""
    import json
    import tempfile
    from collections import defaultdict

    from medir_monai.data import scan_authors_layout

    chosen: dict[str, list[dict]] = defaultdict(list)
    for item in scan_authors_layout(dataset_dir, "train"):
        if len(chosen[item["task"]]) < per_task:
            chosen[item["task"]].append({"hq": str(item["hq"]), "task": item["task"]})
    path = Path(tempfile.mkdtemp(prefix="medir_bench_")) / "hq_only.json"
    path.write_text(json.dumps({"training": [it for items in chosen.values() for it in items]}))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "bundles" / "amir" / "configs" / "train.json"))
    parser.add_argument("--dataset-dir", default=None, help="default: the bundle's (the embedded demo set)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30, help="batches drawn to time the loader")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("--simulate", type=int, default=0, metavar="N",
                        help="use N HQ-only slices per task (LQ simulated into the cache) instead of stored pairs")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()

    import torch
    from monai.bundle import ConfigParser

    import medir_monai.data
    from medir_monai.data.batches import prepare_lq_hq

    torch.set_num_threads(args.threads)
    config = ConfigParser()
    config.read_config(args.config)
    sys.argv = [sys.argv[0], "--config_file", args.config]  # bundle_root resolves from the config path
    if args.dataset_dir:
        config["dataset_dir"] = args.dataset_dir
    config["batch_size"] = args.batch_size
    config["val_interval"] = config["epoch_length"] = max(args.batches, args.steps + 1)
    config["cache_dir"] = os.path.join(os.path.expanduser("~"), ".cache", "medir_monai", "bench_cache")
    dataset_dir = medir_monai.data.prepare_dataset_dir(config.get_parsed_content("dataset_dir"))
    if args.simulate:
        dataset_dir = write_hq_only_datalist(dataset_dir, args.simulate)
        config["cache"] = "memory"
    config["dataset_dir"] = dataset_dir

    print(f"# benchmarks/dataloader.py  {time.strftime('%Y-%m-%d')}  {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} threads")
    print(f"# config {os.path.relpath(args.config, REPO)}, data {dataset_dir}, batch {args.batch_size}, "
          f"num_workers {config['num_workers']}, cache {config['cache']}")
    start = time.perf_counter()
    dataset = config.get_parsed_content("train#dataset")
    fill_s = time.perf_counter() - start
    loader = config.get_parsed_content("train#dataloader")
    loader_times, batches = [], []
    iterator = iter(loader)
    for _ in range(args.batches):
        start = time.perf_counter()
        batch = next(iterator)
        loader_times.append(time.perf_counter() - start)
        batches.append(batch)
    first_lq = batches[0]["lq"]
    crops_differ = not torch.equal(batches[0]["lq"], batches[len(batches) // 2]["lq"])

    network = config.get_parsed_content("network_def").train()
    optimizer = torch.optim.Adam(network.parameters(), lr=float(config["learning_rate"]))
    step_times = []
    for index in range(args.steps + 1):
        lq, hq = prepare_lq_hq(batches[index % len(batches)])
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = (network(lq) - hq).abs().mean()
        aux = getattr(network, "aux_loss", None)
        if aux is not None:
            loss = loss + float(config.get("balance_weight", 0.0)) * aux
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
    step_times = step_times[1:]

    loader_med, step_med = statistics.median(loader_times), statistics.median(step_times)
    print("| dataset items | cache fill (s, once) | batch shape | loader per batch min / median (s) | "
          "training step min / median (s) | loader / step |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(dataset)} | {fill_s:.1f} | {tuple(first_lq.shape)} | {min(loader_times):.4f} / {loader_med:.4f} | "
          f"{min(step_times):.2f} / {step_med:.2f} | {100 * loader_med / step_med:.2f} % |")
    print(f"# crops differ between draws: {crops_differ}")


if __name__ == "__main__":
    main()
