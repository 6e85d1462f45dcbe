"""Helpers the bundle configs call: locating the bundle folder and the latest checkpoint.

The bundles live in ``bundles/`` of a source checkout; a wheel installs their configs and docs inside the package
(``medir_monai/bundles/<name>``), so ``medir restore --bundle amir --config pretrained.json`` also works after a
plain ``pip install``: :func:`find_bundle` and :func:`find_bundle_config` accept a bundle name and a config name
as well as paths.

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
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "bundle_parser",
    "bundle_root",
    "bundles_dir",
    "config_files_from_argv",
    "find_bundle",
    "find_bundle_config",
    "latest_checkpoint",
]

_CKPT_PATTERN = re.compile(r"checkpoint_(?:iteration|iter)=(\d+)\.pt$")
#: ``bundles/`` of the source checkout this package runs from (absent in a wheel install)
_CHECKOUT_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
#: where a wheel installs the bundles' configs and docs
_INSTALLED_BUNDLES = Path(__file__).resolve().parent / "bundles"


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


def bundles_dir() -> Path:
    """The folder holding the bundles: ``bundles/`` of the source checkout this package runs from, else the
    copy a wheel installs inside the package."""
    return _CHECKOUT_BUNDLES if _CHECKOUT_BUNDLES.is_dir() else _INSTALLED_BUNDLES


def _is_bundle(folder: Path) -> bool:
    return (folder / "configs").is_dir()


def find_bundle(name_or_path: str | os.PathLike) -> Path:
    """The bundle folder ``name_or_path`` names: a folder with ``configs/``, or the name of a bundle in
    :func:`bundles_dir` (``"amir"``, ``"tat"``, ...).

    Raises:
        ValueError: neither; the message lists the bundles there are.
    """
    path = Path(name_or_path).expanduser()
    if _is_bundle(path):
        return path.resolve()
    installed = bundles_dir()
    if len(path.parts) == 1 and _is_bundle(installed / path.name):
        return installed / path.name
    known = sorted(p.name for p in installed.iterdir() if _is_bundle(p)) if installed.is_dir() else []
    raise ValueError(f"{name_or_path}: not a bundle folder (no configs/ in it) and not one of the bundles "
                     f"{', '.join(known) or '(none found)'} in {installed}")


def find_bundle_config(bundle: str | os.PathLike, name_or_path: str | os.PathLike) -> Path:
    """The config file ``name_or_path``: an existing file, or a file of the bundle's ``configs/``
    (``"pretrained.json"`` or ``"pretrained"``).

    Raises:
        ValueError: neither; the message lists the bundle's configs.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    configs = find_bundle(bundle) / "configs"
    if len(path.parts) == 1:
        for candidate in (configs / path.name, configs / f"{path.name}.json"):
            if candidate.is_file():
                return candidate
    known = sorted(p.name for p in configs.glob("*.json"))
    raise ValueError(f"{name_or_path}: config file does not exist (nor in {configs}: {', '.join(known)})")


def bundle_parser(bundle: str | os.PathLike, config: str, extra: Sequence[str | os.PathLike] | None = None):
    """A MONAI ``ConfigParser`` over ``<bundle>/configs/<config>`` with the ``extra`` config files merged over it
    (:func:`find_bundle_config`: paths or names of the bundle's configs) and ``bundle_root`` set; also the bundle
    folder (:func:`find_bundle`).

    Raises:
        ValueError: no such bundle, no ``configs/<config>`` in it, or a missing extra config (each named).
    """
    from monai.bundle import ConfigParser

    root = find_bundle(bundle)
    main_cfg = root / "configs" / config
    if not main_cfg.is_file():
        raise ValueError(f"{main_cfg}: no such bundle config (is {root} a bundle folder?)")
    files = [main_cfg] + [find_bundle_config(root, f) for f in (extra or [])]
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser["bundle_root"] = str(root)
    return parser, root


def bundle_root(name: str, argv: list[str] | None = None) -> str:
    """Absolute path of the bundle folder ``bundles/<name>``.

    Resolution order: the folder above ``configs/`` of the first ``--config_file`` given on the command line;
    ``./bundles/<name>`` when the working directory holds that bundle; the bundle of :func:`bundles_dir` (the
    source checkout's, or the installed copy).
    """
    for cfg in config_files_from_argv(argv):
        cfg = cfg.expanduser().resolve()
        if cfg.parent.name == "configs" and (cfg.parent.parent / "configs").is_dir():
            return str(cfg.parent.parent)
    checkout = _CHECKOUT_BUNDLES / name
    if checkout.is_dir():
        return str(checkout)
    local = Path.cwd() / "bundles" / name
    if _is_bundle(local) or not _is_bundle(bundles_dir() / name):
        return str(local.resolve())
    return str(bundles_dir() / name)


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
