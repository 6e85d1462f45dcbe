"""The ``medir`` console script.

Sub-commands are registered in :data:`COMMANDS` (name -> function adding its parser); each parser sets
``func`` through ``set_defaults``. Other modules add theirs (``restore``, ``evaluate``, ``compare``) with
:func:`register_command`, e.g.::

    def _add_restore(subparsers):
        p = subparsers.add_parser("restore", help="restore a volume")
        p.add_argument("input")
        p.set_defaults(func=run_restore)

    register_command("restore", _add_restore)

``main(argv)`` returns the exit status: 0 on success, 2 for bad input (a :class:`DataError` /
``ValueError``, printed as one line naming the file and the problem).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .bundle import bundle_parser, find_bundle

__all__ = ["COMMANDS", "register_command", "build_parser", "main"]

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def register_command(name: str, add_parser: Callable[[argparse._SubParsersAction], None]) -> None:
    """Register a sub-command: ``add_parser(subparsers)`` adds it and sets ``func`` (called with the args)."""
    if name in COMMANDS:
        raise ValueError(f"medir sub-command {name!r} is already registered")
    COMMANDS[name] = add_parser


# ---- demo-data ------------------------------------------------------------------------------------------
def _run_demo_data(args: argparse.Namespace) -> int:
    from .data.demo import default_demo_dir, ensure_demo_dataset, extended_demo_dir

    out = Path(args.out) if args.out else (extended_demo_dir() if args.extended else default_demo_dir())
    path = ensure_demo_dataset(
        out,
        force=args.force,
        max_slices=args.max_slices,
        verbose=not args.quiet,
        tasks=args.tasks,
        extended=args.extended,
        splits=args.splits,
    )
    print(path)
    return 0


def _add_demo_data(subparsers: argparse._SubParsersAction) -> None:
    from .data.demo import DEMO_TASKS, SPLITS

    p = subparsers.add_parser(
        "demo-data",
        help="build the embedded demo dataset (real scans from installed wheels; no download)",
        description=(
            "Build the embedded demo dataset in the authors' layout <out>/<MRI|CT|PET>/<train|validation|test>/"
            "<LQ|HQ>/ from scans shipped inside installed Python wheels (real MR of nilearn, dipy, nibabel, pydicom and "
            "pydicom-data; real CT slices of pydicom / pydicom-data), each source in one split; PET is simulated. "
            "Nothing is downloaded. The build is "
            "skipped when a complete one exists. Provenance: <out>/SOURCES.md."
        ),
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: $MEDIR_DEMO_DIR or ~/.cache/medir_monai/demo; with --extended $MEDIR_EXTENDED_DIR "
        "or ~/.cache/medir_monai/extended, where the bundles' pretrained.json read it)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    p.add_argument(
        "--max-slices",
        type=int,
        default=None,
        help="at most this many slices per source (small builds for tests)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=list(DEMO_TASKS),
        metavar="TASK",
        help=f"tasks to build (default: {' '.join(DEMO_TASKS)}; ct_denoise is the slow one)",
    )
    p.add_argument(
        "--splits",
        nargs="+",
        default=list(SPLITS),
        choices=SPLITS,
        metavar="SPLIT",
        help=f"splits to build (default: {' '.join(SPLITS)}); e.g. test alone to evaluate shipped weights",
    )
    p.add_argument(
        "--extended",
        action="store_true",
        help="also the training sources of Debian packages (mricron-data, insighttoolkit5-examples): the corpus for "
        "training shipped weights; a missing package is named",
    )
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=_run_demo_data)


register_command("demo-data", _add_demo_data)


# ---- prepare: the papers' public datasets -> the authors' layout -------------------------------------------
def _run_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

    common = dict(out=args.out, seed=args.seed, progress=not args.quiet)
    if args.split is not None:
        common["split"] = prepare.parse_split(args.split)
    if args.dataset == "ixi":
        layout = prepare.prepare_ixi(args.input, **common)
    elif args.dataset == "mayo":
        names = lambda text: [n for n in (text or "").split(",") if n]  # noqa: E731
        layout = prepare.prepare_mayo(
            args.input, test=None if args.test is None else names(args.test), validation=names(args.validation),
            thickness=args.thickness, kernel=args.kernel, **common,
        )
    else:
        layout = prepare.prepare_pet(args.hq, lq_dir=args.lq, **common)
    print(layout.summary())
    print(f"subject -> split and settings: {layout.manifest_path}")
    print(f"train on it: python -m monai.bundle run training --config_file bundles/amir/configs/train.json "
          f"--dataset_dir {layout.out}")
    return 0


def _add_prepare(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="the papers' public datasets (IXI, AAPM-Mayo, PET) -> train/validation/test folders",
        description=(
            "Read a downloaded public dataset and write the papers' slices in the authors' layout "
            "<out>/<MRI|CT|PET>/<train|validation|test>/<LQ|HQ>/, split by subject / patient, with <out>/prepare.json "
            "saying which subject went where. Resumable (a rerun skips finished subjects); never overwrites. "
            "Nothing is downloaded."
        ),
    )
    sub = p.add_subparsers(dest="dataset", metavar="DATASET")
    sub.required = True

    def common(q: argparse.ArgumentParser, split_help: str) -> None:
        q.add_argument("--out", required=True, help="output folder (new or empty; or an earlier run to resume)")
        q.add_argument("--split", default=None, help=split_help)
        q.add_argument("--seed", type=int, default=0, help="seed of the subject shuffle (and of simulated noise)")
        q.add_argument("--quiet", action="store_true", help="no progress bar")
        q.set_defaults(func=_run_prepare)

    ixi = sub.add_parser("ixi", help="IXI T2 MRI: central 100 axial slices, 4x k-space truncated LQ")
    ixi.add_argument("--input", required=True, help="folder of IXI<id>-<site>-<n>-T2.nii.gz files")
    common(ixi, "subjects per split as fractions (default 0.7,0.1,0.2) or counts (e.g. 405,59,114 for all 578)")
    mayo = sub.add_parser("mayo", help="AAPM-Mayo 2016 / TCIA LDCT: full and quarter dose paired by slice position")
    mayo.add_argument("--input", required=True, help="the release folder (patients L067, ...; DICOM .IMA / .dcm)")
    mayo.add_argument("--test", default=None, help="comma-separated test patients (default: L506 when present)")
    mayo.add_argument("--validation", default="", help="comma-separated validation patients")
    mayo.add_argument("--thickness", type=float, default=None, help="slice thickness to use (mm), when several")
    mayo.add_argument("--kernel", default=None, help="reconstruction kernel to use (e.g. B30f), when several")
    common(mayo, "patients per split as fractions (default 0.8,0.1,0.1) or counts")
    pet = sub.add_parser("pet", help="PET volumes in SUV: 192x400 slices along the papers' axis, air dropped")
    pet.add_argument("--hq", required=True, help="folder of full-dose volumes (NIfTI in SUV, or DICOM series folders)")
    pet.add_argument("--lq", default=None, help="folder of low-dose volumes with the same names (default: simulate 1/12 dose)")
    common(pet, "subjects per split as fractions (default 0.7,0.1,0.2) or counts")


register_command("prepare", _add_prepare)


# ---- bundles: restore / compare / interference ---------------------------------------------------------
def _bundle_parser(bundle: str, config: str, extra: Sequence[str] | None, overrides: dict):
    """:func:`medir_monai.bundle.bundle_parser` with the command's ``overrides`` (``None`` values left out)."""
    parser, _ = bundle_parser(bundle, config, extra)
    for key, value in overrides.items():
        if value is not None:
            parser[key] = value
    return parser


def _check_inputs_against_profile(ckpt: Path, input_path: Path, task: str | None, strict: bool) -> None:
    """Warn (or, ``strict``, refuse before anything is written) about inputs outside the checkpoint's training
    profile (the bundles' :class:`~medir_monai.restore.InputGuard`, applied to every input first); a checkpoint
    without one gets a note that inputs are not checked."""
    from .data.io import DataError
    from .restore import InputGuard, list_inputs, read_scan, resolve_task, task_unit_factor

    guard = InputGuard(ckpt, strict=strict)
    if not guard.profile:
        print(f"medir restore: note: {ckpt} records no training profile (an older or external checkpoint): "
              "inputs are not checked against what the model learnt from", file=sys.stderr)
        if strict:
            raise DataError(f"{ckpt}: --strict needs a checkpoint with a training profile (train it with this version)")
        return
    refused = []
    for item in list_inputs(input_path):
        path = Path(item["image"])
        chosen = resolve_task(path, task)
        scan = read_scan(path)
        message = guard.check(path, scan.array * task_unit_factor(scan, chosen), chosen.name, scan)
        if message:
            print(f"medir restore: warning: {message}", file=sys.stderr)
            refused.append(str(path))
    if strict and refused:
        raise DataError(f"--strict: {len(refused)} input(s) outside the training data, nothing written: "
                        f"{', '.join(refused[:3])}{' ...' if len(refused) > 3 else ''}")


def _run_restore(args: argparse.Namespace) -> int:
    from .networks import load_official_state_dict

    overrides = {"dataset_dir": str(Path(args.input).expanduser()), "output_dir": str(Path(args.output).expanduser()),
                 "overwrite": args.overwrite, "overlap": args.overlap, "sw_batch_size": args.sw_batch_size}
    if args.device:
        overrides["device"] = f"$torch.device({args.device!r})"
    parser = _bundle_parser(args.bundle, "inference.json", args.config, overrides)
    parser["task"] = args.task  # None: from the DICOM Modality tag
    if args.no_safeguard:
        parser["safeguard"] = None
    if args.flip_ensemble is not None:  # None: the config's setting
        parser["flip_ensemble"] = args.flip_ensemble
    if args.checkpoint:
        parser["ckpt_path"] = str(Path(args.checkpoint).expanduser())
    ckpt = Path(parser.get_parsed_content("ckpt_path"))
    if not ckpt.is_file():
        pretrained = find_bundle(args.bundle) / "configs" / "pretrained.json"
        hint = f", or use the shipped weights: --config {pretrained}" if pretrained.is_file() else ""
        raise ValueError(f"{ckpt}: no trained weights (train the bundle first, pass --checkpoint{hint})")
    # the weights are loaded here (also the authors' checkpoints), so drop the bundle's CheckpointLoader; inputs are
    # checked against the training profile here too, all of them before anything is written, so drop its InputGuard
    parser["handlers"] = [h for h in parser["handlers"]
                          if not any(name in str(h.get("_target_", "")) for name in ("CheckpointLoader", "InputGuard"))]
    network = parser.get_parsed_content("network")
    load_official_state_dict(network, str(ckpt))
    network.eval()
    _check_inputs_against_profile(ckpt, Path(args.input).expanduser(), args.task, args.strict)
    output = Path(args.output).expanduser()
    output_existed = output.exists()
    evaluator = parser.get_parsed_content("evaluator")
    try:
        evaluator.run()
    except BaseException:
        if not output_existed and output.is_dir() and not any(output.iterdir()):
            output.rmdir()  # a failed run leaves no trace, not even the empty folder it made
        raise
    for handler in parser.get_parsed_content("handlers"):
        for path in getattr(handler, "written", []):
            print(path)
    return 0


def _add_restore(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "restore",
        help="restore a slice, a NIfTI volume or a DICOM series with a trained bundle",
        description="Restore slice by slice along the acquisition axis with a sliding window (the training patch). "
        "The task (normalisation and output range) comes from the DICOM Modality tag or --task; NIfTI input needs "
        "--task. Inputs are never modified; outputs are written atomically; existing outputs need --overwrite.",
    )
    p.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/amir")
    p.add_argument("--input", required=True, help="a NIfTI / ITK file, a DICOM file or series folder, or a folder of NIfTI files")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--task", default=None, help="mri_sr, ct_denoise or pet_synthesis (default: from DICOM Modality)")
    p.add_argument("--checkpoint", default=None, help="weights (default: the bundle's models/model.pt)")
    p.add_argument("--config", nargs="*", default=None, help="extra config files merged over inference.json: paths, or names of the bundle's configs "
                   "(quick.json, pretrained.json)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default 0.25)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda:0")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--strict", action="store_true",
                   help="refuse inputs outside the model's training data (exit status 2, nothing written) instead "
                   "of warning")
    p.add_argument("--no-safeguard", action="store_true",
                   help="write the network output as it is, without the config's consistency safeguard")
    p.add_argument("--flip-ensemble", action=argparse.BooleanOptionalAction, default=None,
                   help="restore each slice and its three mirror images and average them (4x the time); default: "
                   "the config's flip_ensemble")
    p.set_defaults(func=_run_restore)


def _run_compare(args: argparse.Namespace) -> int:
    from .analysis import compare_evaluations, format_comparison

    result = compare_evaluations(args.a, args.b)
    print(format_comparison(result, *_distinct_labels(Path(args.a), Path(args.b))))
    return 0


def _distinct_labels(a: Path, b: Path) -> tuple[str, str]:
    """Column names for two evaluations: the shortest path tails that tell them apart (``amir/eval/pretrained``
    and ``restormer/eval/pretrained`` give ``amir/eval/pretrained`` and ``restormer/eval/pretrained``)."""
    a_parts, b_parts = a.resolve().parts, b.resolve().parts
    for depth in range(1, max(len(a_parts), len(b_parts)) + 1):
        label_a, label_b = "/".join(a_parts[-depth:]), "/".join(b_parts[-depth:])
        if label_a != label_b:
            return label_a, label_b
    return "A", "B"


def _add_compare(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="paired t-test per task between two evaluations (eval folders or metrics.csv)")
    p.add_argument("a", help="first evaluation: an eval/ folder or its metrics.csv")
    p.add_argument("b", help="second evaluation")
    p.set_defaults(func=_run_compare)


def _run_interference(args: argparse.Namespace) -> int:
    import torch

    from .analysis import format_interference, task_interference
    from .networks import load_official_state_dict

    overrides = {"dataset_dir": args.dataset_dir}
    parser = _bundle_parser(args.bundle, "train.json", args.config, overrides)
    parser["device"] = "$torch.device('cpu')"
    torch.manual_seed(args.seed)
    network = parser.get_parsed_content("network_def")
    if args.checkpoint:
        load_official_state_dict(network, args.checkpoint)
    from .data.bundle_data import build_dataset, prepare_dataset_dir

    root = prepare_dataset_dir(parser.get_parsed_content("dataset_dir"))
    tasks = parser.get_parsed_content("tasks")
    patch = parser.get_parsed_content("patch_size")
    batches = {}
    for task in tasks:
        ds = build_dataset(root, "train", [task], patch_size=patch, seed=args.seed)
        ds.transform.set_random_state(args.seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(args.seed))
        batches[task] = []
        for batch in loader:
            batches[task].append((batch["lq"], batch["hq"]))
            if len(batches[task]) == args.batches:
                break
    aux = float(parser.get("balance_weight", 0.0) or 0.0)
    names, matrix = task_interference(network, batches, param_pattern=args.params, aux_weight=aux)
    print(format_interference(names, matrix))
    return 0


def _add_interference(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "interference",
        help="task-interference matrix (AMIR Fig. 1b, Uni-Perceiver-MoE definition) for a checkpoint and data",
    )
    p.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/amir")
    p.add_argument("--checkpoint", default=None, help="weights to analyse (default: the network's initialisation)")
    p.add_argument("--config", nargs="*", default=None, help="extra config files merged over train.json (e.g. quick.json)")
    p.add_argument("--dataset-dir", default=None, help="dataset (default: the bundle's dataset_dir)")
    p.add_argument("--batches", type=int, default=8, help="mini-batches per task (N)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--params", default=r"ffn\.project_out", help="regex of the parameters whose gradients are compared")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_interference)


register_command("restore", _add_restore)
register_command("compare", _add_compare)
register_command("interference", _add_interference)


# ---- entry point ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``medir`` parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="medir", description="All-in-one medical image restoration on MONAI.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in COMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``medir`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from .data.io import DataError
    from .tasks import UnknownTaskError

    from .atomic import NO_SPACE_ERRNOS, NoSpaceError
    from .weights import WeightsError

    user_errors = (DataError, ValueError, FileExistsError, FileNotFoundError, UnknownTaskError, NoSpaceError,
                   WeightsError)
    args = build_parser().parse_args(argv)
    try:
        try:
            return int(args.func(args) or 0)
        except RuntimeError as wrapped:  # MONAI wraps errors raised inside transforms / engines
            cause: BaseException | None = wrapped
            while cause is not None and not isinstance(cause, user_errors):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None
    except user_errors as err:
        print(f"medir {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk met outside the package's atomic writers
        if err.errno not in NO_SPACE_ERRNOS:
            raise
        print(f"medir {args.command}: error: {err.filename or 'output'}: no space left to write it ({err.strerror})",
              file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
