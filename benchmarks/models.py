"""Model figures at the paper configurations, optionally side by side with the authors' code.

Usage::

    python benchmarks/models.py                                  # our models: params, GFLOPs, times, memory
    python benchmarks/models.py --reference ~/src/AMIR ~/src/TAT ~/src/Restormer
    python benchmarks/models.py --models amir --train-batch 1 --repeats 3
    python benchmarks/models.py --models amir --reference ~/src/AMIR --isa avx2   # AVX2 kernels on any x86 CPU

``--reference`` takes local clones of the authors' repositories (never committed or vendored here):
``Yaziwel/All-In-One-Medical-Image-Restoration-via-Task-Adaptive-Routing`` (``model/Model_AMIR.py``),
``Yaziwel/TAT`` (``model/TAT.py``) and ``swz30/Restormer`` (``basicsr/models/archs/restormer_arch.py``); their code
needs ``einops``. Each reference model is built with seed 0 and its weights are loaded into ours with
:func:`medir_monai.networks.load_official_state_dict`, so both compute the same function (the table prints the
largest output difference). Timings then alternate between the two models step by step in one process (the order
flips every repeat) and report the minimum and median of ``--repeats`` runs after one warm-up; ratios are ours /
reference. Memory is measured in a fresh process per model: the growth of the resident set over one training step
(``ru_maxrss`` minus the resident set before it) divided by the batch size.

Our table also times a training step with ``activation_checkpointing`` at ``--train-batch`` and, once and without
warm-up, at the papers' batch (``--paper-batch``, 8 x 128x128), with that process's peak resident set.

``--isa avx2`` / ``--isa avx512`` sets ``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` for this process and its
workers, so PyTorch's and oneDNN's kernels are those an AVX2-only (or AVX-512) CPU runs; the header prints the
capability PyTorch reports and the CPU model. Figures of different CPU kinds are not comparable; ratios measured in
the same run are.

Times are CPU times of ``torch.set_num_threads(--threads)``; on a shared machine compare figures from the same run
only. Forward GFLOPs are counted with ``torch.utils.flop_counter`` (multiply-add = 2 FLOPs).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

MODELS = {
    "restormer": ("medir_monai.networks.restormer", "Restormer"),
    "amir": ("medir_monai.networks.amir", "AMIR"),
    "tat": ("medir_monai.networks.tat", "TAT"),
    "diffcode": ("medir_monai.networks.diffcode", "DiffCode"),  # stages I + II + III (the prior is frozen in III)
}
#: the authors' file, class and constructor arguments for a 1-channel model at the paper configuration
REFERENCE = {
    "restormer": ("basicsr/models/archs/restormer_arch.py", "Restormer", {"inp_channels": 1, "out_channels": 1}),
    "amir": ("model/Model_AMIR.py", "AMIR", {}),
    "tat": ("model/TAT.py", "TAT", {}),
}
#: models whose blocks support activation checkpointing
CHECKPOINTABLE = ("restormer", "amir", "tat")
#: weight of the AMIR balance loss in the timed training step (docs/design.md, as in our bundles)
BALANCE_WEIGHT = 1e-3
LEARNING_RATE = 2e-4
TRAIN_PATCH = 128
#: ``--isa`` choice -> (ATen capability, oneDNN ISA cap); "native" leaves the variables as they are
ISA_ENVIRONMENT = {"avx2": ("avx2", "AVX2"), "avx512": ("avx512", "AVX512_CORE")}


# ---------------------------------------------------------------------------------------------------------
# model construction
# ---------------------------------------------------------------------------------------------------------
def build_ours(name: str, activation_checkpointing: bool = False):
    module, cls = MODELS[name]
    kwargs = {"activation_checkpointing": True} if activation_checkpointing else {}
    return getattr(importlib.import_module(module), cls)(**kwargs)


def find_reference(name: str, roots: list[str]) -> Path | None:
    """The authors' source file of ``name`` under one of ``roots``, or None."""
    if name not in REFERENCE:
        return None
    relative = REFERENCE[name][0]
    for root in roots:
        path = Path(root).expanduser() / relative
        if path.is_file():
            return path
    return None


def build_reference(name: str, path: Path):
    """The authors' model ``name`` from ``path`` (imported under a private module name)."""
    spec = importlib.util.spec_from_file_location(f"_reference_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, cls, kwargs = REFERENCE[name]
    return getattr(module, cls)(**kwargs)


def restored(output):
    """The image of a forward output (the authors' AMIR returns ``(image, balance_loss)``)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def training_loss(model, output, target):
    """L1 plus the AMIR balance loss (ours keeps it on the module, the authors' model returns it)."""
    loss = (restored(output) - target).abs().mean()
    if isinstance(output, (tuple, list)) and len(output) > 1:
        return loss + BALANCE_WEIGHT * output[1]
    aux = getattr(model, "aux_loss", None)
    return loss if aux is None else loss + BALANCE_WEIGHT * aux


class Runner:
    """One model with its optimiser and fixed inputs; ``step()`` is one timed unit."""

    def __init__(self, model, what: str, batch: int, size: int) -> None:
        import torch

        self.model, self.what = model, what
        self.model.train(what == "train")
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE) if what == "train" else None
        side = TRAIN_PATCH if what == "train" else size
        generator = torch.Generator().manual_seed(1)
        self.x = torch.rand(batch, 1, side, side, generator=generator)
        self.y = torch.rand(batch, 1, side, side, generator=generator)

    def step(self) -> None:
        import torch

        if self.optimizer is None:
            with torch.no_grad():
                self.model(self.x)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            training_loss(self.model, self.model(self.x), self.y).backward()
            self.optimizer.step()


def alternate(steps: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Time the callables alternately ``repeats`` times (the order flips every round), after one warm-up each."""
    if warmup:
        for step in steps.values():
            step()  # allocations, oneDNN primitive caches
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for _ in range(repeats):
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
        order.reverse()
    return times


# ---------------------------------------------------------------------------------------------------------
# workers (one measurement per fresh process)
# ---------------------------------------------------------------------------------------------------------
def _current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def worker_params(args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = build_ours(args.model).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 1, TRAIN_PATCH, TRAIN_PATCH))
    return {"params": sum(p.numel() for p in model.parameters()), "gflops_128": counter.get_total_flops() / 1e9}


def worker_time(args: argparse.Namespace) -> dict:
    """Times ``args.what`` for ours and, with a reference, the authors' model with the same weights, alternating."""
    import torch

    from medir_monai.networks import load_official_state_dict

    torch.manual_seed(0)
    models = {}
    result: dict = {}
    if args.reference_file:
        models["reference"] = build_reference(args.model, Path(args.reference_file))
    ours = build_ours(args.model, args.checkpointing)
    if "reference" in models:
        load_official_state_dict(ours, models["reference"].state_dict())
        probe = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            outs = [restored(m.eval()(probe)) for m in (ours, models["reference"])]
        result["max_abs_difference"] = float((outs[0] - outs[1]).abs().max())
    models["ours"] = ours
    steps = {name: Runner(model, args.what, args.batch, args.size).step for name, model in models.items()}
    result["times"] = alternate(steps, args.repeats, warmup=not args.no_warmup)
    result["peak_rss_mb"] = _peak_rss_mb()  # of all models of this process
    return result


def worker_memory(args: argparse.Namespace) -> dict:
    """Resident-set growth of one training step of one model (ours or the authors'), per patch."""
    import torch

    torch.manual_seed(0)
    if args.impl == "reference":
        model = build_reference(args.model, Path(args.reference_file))
    else:
        model = build_ours(args.model, args.checkpointing)
    runner = Runner(model, "train", args.batch, args.size)
    before = _current_rss_mb()
    runner.step()
    peak = _peak_rss_mb()
    return {"peak_rss_mb": peak, "per_patch_mb": (peak - before) / args.batch}


WORKERS = {"params": worker_params, "time": worker_time, "memory": worker_memory}


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
def run_worker_script(script: str, kind: str, options: dict, label: str) -> dict | None:
    """Run ``script --worker kind`` with ``options`` as flags in a fresh process; its ``RESULT`` JSON, or None."""
    cmd = [sys.executable, script, "--worker", kind]
    for key, value in options.items():
        if value is True:
            cmd.append(f"--{key.replace('_', '-')}")
        elif value not in (None, False):
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
    print(f"  {label} failed (exit {proc.returncode}): {tail[0]}", file=sys.stderr)
    return None


def run_worker_here(args: argparse.Namespace, workers: dict) -> None:
    """Worker side of :func:`run_worker_script`: set the threads, run ``workers[args.worker]``, print its JSON."""
    import torch

    torch.set_num_threads(args.threads)
    print("RESULT " + json.dumps(workers[args.worker](args)), flush=True)


def _run_worker(kind: str, model: str, args: argparse.Namespace, **extra) -> dict | None:
    options = {"model": model, "threads": args.threads, "repeats": args.repeats, "size": args.size, **extra}
    return run_worker_script(__file__, kind, options, f"{model}/{kind} {extra}")


def _min_med(times: list[float] | None) -> str:
    return f"{min(times):.2f} / {statistics.median(times):.2f}" if times else "n/a"


def _ratio(ours: list[float] | None, ref: list[float] | None) -> str:
    if not ours or not ref:
        return "n/a"
    return f"{min(ours) / min(ref):.2f} / {statistics.median(ours) / statistics.median(ref):.2f}"


def _times(result: dict | None, impl: str) -> list[float] | None:
    return (result or {}).get("times", {}).get(impl)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere); after torch's import."""
    from medir_monai.networks.blocks import cpuinfo_field

    return cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def select_isa(isa: str) -> None:
    """Set the kernel-selection variables of ``isa`` before torch is imported (inherited by the workers)."""
    if isa == "native":
        return
    aten, onednn = ISA_ENVIRONMENT[isa]
    os.environ["ATEN_CPU_CAPABILITY"] = aten
    os.environ["ONEDNN_MAX_CPU_ISA"] = onednn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--reference", nargs="+", default=[], metavar="DIR",
                        help="local clones of the authors' repositories (see above)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up")
    parser.add_argument("--size", type=int, default=256, help="forward slice size (square)")
    parser.add_argument("--train-batch", type=int, default=2, help="patches per timed training step")
    parser.add_argument("--paper-batch", type=int, default=8,
                        help="patches of the activation-checkpointing step (the papers' batch); 0 skips it")
    parser.add_argument("--isa", choices=["native", *ISA_ENVIRONMENT], default="native",
                        help="kernels to run: the CPU's best (native) or capped at AVX2 / AVX-512")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--what", default="train", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--reference-file", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-warmup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker_here(args, WORKERS)
        return
    select_isa(args.isa)

    import torch

    started = time.perf_counter()
    print(f"# benchmarks/models.py  {time.strftime('%Y-%m-%d')}  {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} threads, repeats {args.repeats} (+1 warm-up)")
    print(f"# CPU: {cpu_model()}; kernels: {torch.backends.cpu.get_cpu_capability()} (--isa {args.isa}"
          f"{', ONEDNN_MAX_CPU_ISA=' + os.environ['ONEDNN_MAX_CPU_ISA'] if 'ONEDNN_MAX_CPU_ISA' in os.environ else ''})")
    refs = {name: find_reference(name, args.reference) for name in args.models} if args.reference else {}
    for name in args.models:
        if args.reference and name in REFERENCE and refs[name] is None:
            print(f"# no reference for {name}: {REFERENCE[name][0]} not under {args.reference}")

    b, pb = args.train_batch, args.paper_batch
    print(f"| model | params | GFLOPs @128 | fwd {args.size}x{args.size} (s) | train {b}x128x128 (s) | "
          f"memory / patch (MB) | train {b}x128x128, checkpointing (s) | memory / patch, checkpointing (MB) | "
          f"train {pb}x128x128 with checkpointing (DiffCode without), one step (s) | its peak RSS (MB) |")
    print("|" + "---|" * 10)
    comparisons = []
    for name in args.models:
        ref_file = str(refs[name]) if refs.get(name) else None
        params = _run_worker("params", name, args) or {}
        fwd = _run_worker("time", name, args, what="forward", batch=1, reference_file=ref_file)
        train = _run_worker("time", name, args, what="train", batch=b, reference_file=ref_file)
        memory = _run_worker("memory", name, args, batch=b) or {}
        ckpt = ckpt_mem = paper = {}
        checkpointable = name in CHECKPOINTABLE
        if checkpointable:
            ckpt = _run_worker("time", name, args, what="train", batch=b, checkpointing=True) or {}
            ckpt_mem = _run_worker("memory", name, args, batch=b, checkpointing=True) or {}
        if pb > 0:  # one step, no warm-up: it takes about 12x the batch-2 step (DiffCode fits without checkpointing)
            paper = _run_worker("time", name, args, what="train", batch=pb, checkpointing=checkpointable, repeats=1,
                                no_warmup=True) or {}
        print(f"| {name} | {params.get('params', 0):,} | {params.get('gflops_128', float('nan')):.1f} | "
              f"{_min_med(_times(fwd, 'ours'))} | {_min_med(_times(train, 'ours'))} | "
              f"{memory.get('per_patch_mb', float('nan')):.0f} | {_min_med(_times(ckpt, 'ours'))} | "
              f"{ckpt_mem.get('per_patch_mb', float('nan')):.0f} | {_min_med(_times(paper, 'ours'))} | "
              f"{paper.get('peak_rss_mb', float('nan')):.0f} |", flush=True)
        if ref_file:
            ref_memory = _run_worker("memory", name, args, batch=b, impl="reference", reference_file=ref_file) or {}
            comparisons.append((name, fwd, train, memory, ref_memory))

    if comparisons:
        print("\nOurs against the authors' code, same weights, alternating runs (min / median; ratio = ours / theirs)")
        print(f"| model | max abs output difference | fwd {args.size}x{args.size} ours (s) | theirs (s) | ratio | "
              f"train {b}x128x128 ours (s) | theirs (s) | ratio | memory / patch ours (MB) | theirs (MB) | ratio |")
        print("|" + "---|" * 11)
        for name, fwd, train, memory, ref_memory in comparisons:
            ours_mem, ref_mem = memory.get("per_patch_mb"), ref_memory.get("per_patch_mb")
            mem_ratio = f"{ours_mem / ref_mem:.2f}" if ours_mem and ref_mem else "n/a"
            print(f"| {name} | {(fwd or {}).get('max_abs_difference', float('nan')):.1e} | "
                  f"{_min_med(_times(fwd, 'ours'))} | {_min_med(_times(fwd, 'reference'))} | "
                  f"{_ratio(_times(fwd, 'ours'), _times(fwd, 'reference'))} | "
                  f"{_min_med(_times(train, 'ours'))} | {_min_med(_times(train, 'reference'))} | "
                  f"{_ratio(_times(train, 'ours'), _times(train, 'reference'))} | "
                  f"{ours_mem or float('nan'):.0f} | {ref_mem or float('nan'):.0f} | {mem_ratio} |")
    print(f"# total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
