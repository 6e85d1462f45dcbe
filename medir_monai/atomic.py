"""Atomic file writing, the one implementation every writer of the package uses.

A file is written under a hidden temporary name in its destination folder and renamed onto the final name only
when complete (``os.replace``: atomic on one filesystem), so a process killed at any moment leaves either the
previous file or the new one, never a truncated one; on any error the temporary file is removed. A full disk (or
quota, or file-size limit) becomes :class:`NoSpaceError`, whose message names the destination and says "no space".
Temporary names start with ``.`` and end with ``.tmp`` plus the final suffix; :func:`remove_stale_temporaries`
cleans the ones a killed process left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "NoSpaceError",
    "NO_SPACE_ERRNOS",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save",
    "raise_if_no_space",
    "remove_stale_temporaries",
]

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""Errors meaning "the data does not fit": device full, quota exceeded, file-size limit (``RLIMIT_FSIZE``)."""


class NoSpaceError(OSError):
    """A write that did not fit on the destination's filesystem; nothing was left under the destination's name."""

    def __str__(self) -> str:
        return f"{self.filename}: no space left to write it ({self.strerror}); nothing was written there"


def raise_if_no_space(err: BaseException, destination: str | os.PathLike) -> None:
    """Re-raise ``err`` as :class:`NoSpaceError` naming ``destination`` when it is a no-space error."""
    if isinstance(err, OSError) and not isinstance(err, NoSpaceError) and err.errno in NO_SPACE_ERRNOS:
        raise NoSpaceError(err.errno, os.strerror(err.errno), str(destination)) from err


def _ordinary_permissions(path: Path) -> None:
    """``mkstemp`` creates 0600 files; give the result the permissions a plain ``open`` would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``final`` (same suffix, so writers that read the suffix pick the right format),
    renamed onto ``final`` when the block ends without error and removed otherwise."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{''.join(final.suffixes[-2:])}",
                                dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _ordinary_permissions(tmp)
        os.replace(tmp, final)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        raise_if_no_space(err, final)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, sync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (``sync``: also flush it to the disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        if sync:
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically and synced (checkpoints must survive a crash right after)."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def remove_stale_temporaries(folder: str | os.PathLike, name_glob: str = "*") -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` that a killed process left in ``folder`` (for final names
    matching ``name_glob``); returns them."""
    folder = Path(folder)
    stale = [p for p in folder.glob(f".{name_glob}.*.tmp*") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
