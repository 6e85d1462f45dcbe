"""Model figures at the paper configurations: parameters, GFLOPs, CPU forward / training-step time, peak memory.

Usage::

    python benchmarks/models.py                      # all models, defaults below
    python benchmarks/models.py --models amir --train-batch 8 --repeats 3

Each measurement runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own.
Times are the minimum and median of ``--repeats`` runs after one warm-up; on a shared machine compare figures
from the same run only. Forward GFLOPs are counted with ``torch.utils.flop_counter`` (multiply-add = 2 FLOPs).
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

MODELS = {
    "restormer": ("medir_monai.networks.restormer", "Restormer"),
    "amir": ("medir_monai.networks.amir", "AMIR"),
    "tat": ("medir_monai.networks.tat", "TAT"),
    "diffcode": ("medir_monai.networks.diffcode", "DiffCode"),  # stages I + II + III (the prior is frozen in III)
}


def _build(name: str):
    import importlib

    module, cls = MODELS[name]
    return getattr(importlib.import_module(module), cls)()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _worker(args: argparse.Namespace) -> dict:
    """One measurement in this process; prints a JSON line."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = _build(args.model)
    result: dict = {"model": args.model, "what": args.what}
    if args.what == "params":
        result["params"] = sum(p.numel() for p in model.parameters())
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.rand(1, 1, 128, 128))
        result["gflops_128"] = counter.get_total_flops() / 1e9
    elif args.what == "forward":
        model.eval()
        x = torch.rand(1, 1, args.size, args.size)
        times = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
        result.update(times=times[1:], size=args.size)
    elif args.what == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=2e-4)
        x = torch.rand(args.train_batch, 1, 128, 128)
        y = torch.rand(args.train_batch, 1, 128, 128)
        times = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = (out - y).abs().mean()
            aux = getattr(model, "aux_loss", None)
            if aux is not None:
                loss = loss + 0.001 * aux
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        result.update(times=times[1:], batch=args.train_batch)
    result["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)
    return result


def _run(model: str, what: str, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--what", what, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--size", str(args.size), "--train-batch", str(args.train_batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  {model}/{what} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="forward slice size (square)")
    parser.add_argument("--train-batch", type=int, default=1, help="patches per training step (paper: 8)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--what", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    import torch

    print(f"# benchmarks/models.py  {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, repeats {args.repeats}")
    header = (f"| model | params | GFLOPs @128 | fwd {args.size}x{args.size} min / median (s) | fwd peak RSS (MB) | "
              f"train step {args.train_batch}x128x128 min / median (s) | train peak RSS (MB) |")
    print(header)
    print("|" + "---|" * 7)
    for name in args.models:
        p = _run(name, "params", args) or {}
        f = _run(name, "forward", args) or {}
        t = {} if args.skip_train else (_run(name, "train", args) or {})

        def fmt(r: dict) -> str:
            return f"{min(r['times']):.2f} / {statistics.median(r['times']):.2f}" if r.get("times") else "n/a"

        print(f"| {name} | {p.get('params', 'n/a'):,} | {p.get('gflops_128', float('nan')):.1f} | {fmt(f)} | "
              f"{f.get('peak_rss_mb', float('nan')):.0f} | {fmt(t)} | {t.get('peak_rss_mb', float('nan')):.0f} |")


if __name__ == "__main__":
    main()
