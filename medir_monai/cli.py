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

__all__ = ["COMMANDS", "register_command", "build_parser", "main"]

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def register_command(name: str, add_parser: Callable[[argparse._SubParsersAction], None]) -> None:
    """Register a sub-command: ``add_parser(subparsers)`` adds it and sets ``func`` (called with the args)."""
    if name in COMMANDS:
        raise ValueError(f"medir sub-command {name!r} is already registered")
    COMMANDS[name] = add_parser


# ---- demo-data ------------------------------------------------------------------------------------------
def _run_demo_data(args: argparse.Namespace) -> int:
    from .data.demo import default_demo_dir, ensure_demo_dataset

    out = Path(args.out) if args.out else default_demo_dir()
    path = ensure_demo_dataset(
        out, force=args.force, max_slices=args.max_slices, verbose=not args.quiet, tasks=args.tasks
    )
    print(path)
    return 0


def _add_demo_data(subparsers: argparse._SubParsersAction) -> None:
    from .data.demo import DEMO_TASKS

    p = subparsers.add_parser(
        "demo-data",
        help="build the embedded demo dataset (real scans from installed wheels; no download)",
        description=(
            "Build the embedded demo dataset in the authors' layout <out>/<MRI|CT|PET>/<train|validation|test>/"
            "<LQ|HQ>/ from scans shipped inside installed Python wheels (MNI152 T1 and tissue maps from nilearn, "
            "real CT slices from pydicom / pydicom-data); PET is simulated. Nothing is downloaded. The build is "
            "skipped when a complete one exists. Provenance: <out>/SOURCES.md."
        ),
    )
    p.add_argument("--out", default=None, help="output folder (default: $MEDIR_DEMO_DIR or ~/.cache/medir_monai/demo)")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    p.add_argument(
        "--max-slices",
        type=int,
        default=None,
        help="at most this many slices per task and split (small builds for tests)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=list(DEMO_TASKS),
        metavar="TASK",
        help=f"tasks to build (default: {' '.join(DEMO_TASKS)}; ct_denoise is the slow one)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=_run_demo_data)


register_command("demo-data", _add_demo_data)


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

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DataError, ValueError, FileExistsError) as err:
        print(f"medir {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
