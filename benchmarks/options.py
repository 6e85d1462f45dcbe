"""Speed options users switch on in a bundle config, measured on one paper-size model.

Usage::

    python benchmarks/options.py                       # AMIR, every option
    python benchmarks/options.py --model tat --skip compile

Each option is timed against the default in one process, alternating runs (minimum and median of ``--repeats``
after one warm-up, same weights), and the largest output difference is printed:

* ``layout``: ``channels_last`` (network argument, default on) against NCHW features;
* ``checkpointing``: ``activation_checkpointing`` (network argument, default off), training step and the
  activations the forward keeps for the backward;
* ``compile``: ``torch.compile(dynamic=False)`` (the trainer's ``compile`` flag with the bundles'
  ``compile_kwargs``), with its compilation time;
* ``bf16``: ``torch.autocast`` in bfloat16 (the trainer's ``amp`` flag with ``amp_dtype``; MONAI autocasts on CUDA
  only, this measures what the same precision does on the CPU);
* ``sliding``: MONAI ``SlidingWindowInferer`` on a 512x512 slice with the training patch as window:
  ``sw_batch_size`` and ``buffer_steps``, time and resident-set growth (fresh process each).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import models as model_bench  # benchmarks/models.py

OPTIONS = ("layout", "checkpointing", "compile", "bf16", "sliding")
SLIDING_CONFIGS = ((1, None), (4, None), (8, None), (8, 1))  # (sw_batch_size, buffer_steps)


def _pair(name: str, repeats: int, size: int, batch: int, what: str, **variant_kwargs) -> dict:
    """Default model against a variant with the same weights: times and output difference."""
    import torch

    torch.manual_seed(0)
    base = model_bench.build_ours(name)
    variant = type(base)(**variant_kwargs)
    variant.load_state_dict(base.state_dict())
    runners = {"default": model_bench.Runner(base, what, batch, size),
               "option": model_bench.Runner(variant, what, batch, size)}
    with torch.no_grad():
        probe = torch.rand(1, 1, 64, 64)
        diff = float((base.eval()(probe) - variant.eval()(probe)).abs().max())
    for runner in runners.values():
        runner.model.train(what == "train")
    times = model_bench.alternate({k: r.step for k, r in runners.items()}, repeats)
    return {"times": times, "max_abs_difference": diff}


def worker_layout(args: argparse.Namespace) -> dict:
    return {what: _pair(args.model, args.repeats, args.size, args.batch, what, channels_last=False)
            for what in ("train", "forward")}


def worker_checkpointing(args: argparse.Namespace) -> dict:
    import torch

    result = _pair(args.model, args.repeats, args.size, args.batch, "train", activation_checkpointing=True)
    saved = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = model_bench.build_ours(args.model, flag).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if t.untyped_storage().data_ptr() not in params:
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.rand(1, 1, model_bench.TRAIN_PATCH, model_bench.TRAIN_PATCH))
        saved["on" if flag else "off"] = total / 2**20
    result["saved_mb_per_patch"] = saved
    return result


def worker_compile(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    out: dict = {}
    for what in ("forward", "train"):
        eager = model_bench.build_ours(args.model)
        compiled_model = model_bench.build_ours(args.model)
        compiled_model.load_state_dict(eager.state_dict())
        runners = {"default": model_bench.Runner(eager, what, args.batch, args.size),
                   "option": model_bench.Runner(torch.compile(compiled_model, dynamic=False), what, args.batch,
                                                args.size)}
        start = time.perf_counter()
        runners["option"].step()  # compilation happens here
        compile_s = time.perf_counter() - start
        with torch.no_grad():
            probe = runners["default"].x[:1]
            eager.eval()
            compiled_model.eval()
            diff = float((eager(probe) - runners["option"].model(probe)).abs().max()) if what == "forward" else None
            eager.train(what == "train")
            compiled_model.train(what == "train")
        out[what] = {"times": model_bench.alternate({k: r.step for k, r in runners.items()}, args.repeats),
                     "compile_s": compile_s, "max_abs_difference": diff}
    return out


def worker_bf16(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    model = model_bench.build_ours(args.model).eval()
    x = torch.rand(1, 1, args.size, args.size)

    def fp32():
        with torch.no_grad():
            return model(x)

    def bf16():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    diff = float((fp32() - bf16().float()).abs().max())
    return {"forward": {"times": model_bench.alternate({"default": fp32, "option": bf16}, args.repeats),
                        "max_abs_difference": diff}}


def worker_sliding(args: argparse.Namespace) -> dict:
    import torch
    from monai.inferers import SlidingWindowInferer

    torch.manual_seed(0)
    model = model_bench.build_ours(args.model).eval()
    x = torch.rand(1, 1, 512, 512)
    buffer_steps = None if args.buffer_steps < 1 else args.buffer_steps
    inferer = SlidingWindowInferer(roi_size=(model_bench.TRAIN_PATCH,) * 2, sw_batch_size=args.sw_batch_size,
                                   overlap=0.25, mode="gaussian", buffer_steps=buffer_steps, buffer_dim=-1)
    before = model_bench._current_rss_mb()

    def run():
        with torch.no_grad():
            return inferer(x, model)

    times = model_bench.alternate({"option": run}, args.repeats)
    return {"times": times, "rss_growth_mb": model_bench._peak_rss_mb() - before}


WORKERS = {"layout": worker_layout, "checkpointing": worker_checkpointing, "compile": worker_compile,
           "bf16": worker_bf16, "sliding": worker_sliding}


def _run(kind: str, args: argparse.Namespace, **extra) -> dict | None:
    options = {"model": args.model, "threads": args.threads, "repeats": args.repeats, "size": args.size,
               "batch": args.batch, **extra}
    return model_bench.run_worker_script(__file__, kind, options, f"{kind} {extra}")


def _row(label: str, what: str, result: dict | None, note: str = "") -> None:
    if not result:
        print(f"| {label} | {what} | n/a | n/a | n/a | {note} |")
        return
    default, option = result["times"].get("default"), result["times"]["option"]
    ratio = f"{statistics.median(option) / statistics.median(default):.2f}" if default else ""
    diff = result.get("max_abs_difference")
    diff_text = f"max abs diff {diff:.1e}" if diff is not None else ""
    print(f"| {label} | {what} | {model_bench._min_med(default)} | {model_bench._min_med(option)} | {ratio} | "
          f"{'; '.join(t for t in (diff_text, note) if t)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="amir", choices=list(model_bench.CHECKPOINTABLE))
    parser.add_argument("--skip", nargs="*", default=[], choices=OPTIONS)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="forward slice size (square)")
    parser.add_argument("--batch", type=int, default=1, help="patches per training step")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--sw-batch-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--buffer-steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_bench.run_worker_here(args, WORKERS)
        return

    import torch

    started = time.perf_counter()
    print(f"# benchmarks/options.py  {time.strftime('%Y-%m-%d')}  {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} threads, model {args.model}, repeats {args.repeats} (+1 warm-up)")
    print("| option | measured | default min / median (s) | option min / median (s) | option / default (median) | "
          "notes |")
    print("|" + "---|" * 6)
    train_what, fwd_what = f"train step {args.batch}x128x128", f"forward {args.size}x{args.size}"
    if "layout" not in args.skip:
        layout = _run("layout", args) or {}
        _row("NCHW features (channels_last=false)", train_what, layout.get("train"))
        _row("NCHW features (channels_last=false)", fwd_what, layout.get("forward"))
    if "checkpointing" not in args.skip:
        ckpt = _run("checkpointing", args)
        saved = (ckpt or {}).get("saved_mb_per_patch", {})
        note = (f"activations kept per patch {saved.get('off', float('nan')):.0f} MB -> "
                f"{saved.get('on', float('nan')):.0f} MB") if saved else ""
        _row("activation_checkpointing=true", train_what, ckpt, note)
    if "compile" not in args.skip:
        compiled = _run("compile", args) or {}
        for what, label in (("forward", fwd_what), ("train", train_what)):
            res = compiled.get(what)
            note = f"compilation {res['compile_s']:.0f} s" if res else ""
            _row("torch.compile (trainer compile=true)", label, res, note)
    if "bf16" not in args.skip:
        _row("bf16 autocast on the CPU", fwd_what, (_run("bf16", args) or {}).get("forward"))
    if "sliding" not in args.skip:
        print("\n| SlidingWindowInferer on 512x512, roi 128, overlap 0.25 | min / median (s) | resident-set growth (MB) |")
        print("|---|---|---|")
        for sw_batch, buffer_steps in SLIDING_CONFIGS:
            res = _run("sliding", args, sw_batch_size=sw_batch, buffer_steps=buffer_steps or 0)
            label = f"sw_batch_size={sw_batch}, buffer_steps={buffer_steps}"
            times = (res or {}).get("times", {}).get("option")
            growth = (res or {}).get("rss_growth_mb", float("nan"))
            print(f"| {label} | {model_bench._min_med(times)} | {growth:.0f} |", flush=True)
    print(f"# total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
