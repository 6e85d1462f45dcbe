"""Helpers the bundle configs call: locating the bundle folder and the latest checkpoint.

``python -m monai.bundle run training --config_file bundles/amir/configs/train.json`` gives the config no
notion of where it lives, so ``bundle_root`` is resolved here: from the ``--config_file`` argument on the
command line when there is one, otherwise from this package's source checkout, otherwise from the
working directory. Users can always override it with ``--bundle_root DIR``.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

__all__ = ["bundle_root", "latest_checkpoint", "config_files_from_argv"]

_CKPT_PATTERN = re.compile(r"checkpoint_(?:iteration|iter)=(\d+)\.pt$")


def config_files_from_argv(argv: list[str] | None = None) -> list[Path]:
    """The config files named by ``--config_file`` on the command line (a path or a list literal)."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        value = value.strip()
        if value.startswith("["):
            try:
                files = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                files = [v.strip(" '\"") for v in value.strip("[]").split(",")]
        else:
            files = value.split(",") if "," in value and not Path(value).exists() else [value]
        return [Path(f) for f in files if f]
    return []


def bundle_root(name: str, argv: list[str] | None = None) -> str:
    """Absolute path of the bundle folder ``bundles/<name>``.

    Resolution order: the folder above ``configs/`` of the first ``--config_file`` given on the command line;
    ``<source checkout>/bundles/<name>`` when this package is installed from a checkout (editable install);
    ``./bundles/<name>``.
    """
    for cfg in config_files_from_argv(argv):
        cfg = cfg.expanduser().resolve()
        if cfg.parent.name == "configs" and (cfg.parent.parent / "configs").is_dir():
            return str(cfg.parent.parent)
    checkout = Path(__file__).resolve().parents[1] / "bundles" / name
    if checkout.is_dir():
        return str(checkout)
    return str((Path.cwd() / "bundles" / name).resolve())


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """Path of the newest ``checkpoint_iteration=N.pt`` in ``ckpt_dir`` (highest N), or ``None``."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for path in folder.iterdir():
        match = _CKPT_PATTERN.search(path.name)
        if match and path.is_file() and not path.name.startswith("."):  # hidden: an unfinished atomic write
            it = int(match.group(1))
            if best is None or it > best[0]:
                best = (it, path)
    return str(best[1]) if best else None
