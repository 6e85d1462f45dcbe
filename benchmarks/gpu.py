"""One prepared GPU run: training step and 512x512 inference per model at the paper config, fp32 and bf16.

Usage (on a machine with CUDA; ``--device cpu`` runs the same script on the CPU as a smoke test)::

    python benchmarks/gpu.py                      # restormer, amir, tat; batch 8 x 128x128; 512x512 slice
    python benchmarks/gpu.py --models amir --repeats 20

Times are CUDA-event-synchronised (``torch.cuda.synchronize`` before reading the clock), minimum and median of
``--repeats`` after ``--warmup`` runs. bf16 uses ``torch.autocast(dtype=torch.bfloat16)`` as the bundles do with
``amp=true`` (``amp_dtype``); the training step is Adam on L1 (+ 0.001 x AMIR balance loss). Peak memory is
``torch.cuda.max_memory_allocated``. Paste the printed table into ``benchmarks/README.md`` with the date and GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import models as model_bench  # benchmarks/models.py


def _clock(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(name: str, device, dtype, what: str, batch: int, size: int, warmup: int, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    model = model_bench.build_ours(name).to(device).train(what == "train")
    optimizer = torch.optim.Adam(model.parameters(), lr=model_bench.LEARNING_RATE) if what == "train" else None
    side = model_bench.TRAIN_PATCH if what == "train" else size
    x = torch.rand(batch, 1, side, side, device=device)
    y = torch.rand_like(x)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step() -> None:
        if optimizer is None:
            with torch.no_grad(), autocast:
                model(x)
            return
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
            loss = model_bench.training_loss(model, out.float(), y)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = _clock(device)
        step()
        times.append(_clock(device) - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"times": times, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(model_bench.CHECKPOINTABLE),
                        choices=list(model_bench.MODELS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    import torch

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# benchmarks/gpu.py  {time.strftime('%Y-%m-%d')}  {name}, torch {torch.__version__}, "
          f"warm-up {args.warmup}, repeats {args.repeats}")
    print(f"| model | precision | train {args.train_batch}x128x128 min / median (ms) | peak (MB) | "
          f"inference {args.size}x{args.size} min / median (ms) | peak (MB) |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        for dtype in ("fp32", "bf16"):
            train = measure(model, device, dtype, "train", args.train_batch, args.size, args.warmup, args.repeats)
            infer = measure(model, device, dtype, "forward", 1, args.size, args.warmup, args.repeats)

            def fmt(r: dict) -> str:
                return f"{1e3 * min(r['times']):.1f} / {1e3 * statistics.median(r['times']):.1f}"

            print(f"| {model} | {dtype} | {fmt(train)} | {train['peak_mb']:.0f} | {fmt(infer)} | "
                  f"{infer['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
