"""Atomic file writing, the one implementation every writer of the package uses.

A file is written under a hidden temporary name in its destination folder and renamed onto the final name only
when complete (``os.replace``: atomic on one filesystem), so a process killed at any moment leaves either the
previous file or the new one, never a truncated one; on any error the temporary file is removed. A full disk (or
quota, or file-size limit) becomes :class:`NoSpaceError`, whose message names the destination and says "no space".
Temporary names start with ``.`` and end with ``.tmp`` plus the final suffix; :func:`remove_stale_temporaries`
cleans the ones a killed process left behind. :func:`atomic_output` does the same for a whole folder (a restored
DICOM series): it is written under a temporary folder name and renamed into place (:func:`commit_path`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "NoSpaceError",
    "DestinationExistsError",
    "NO_SPACE_ERRNOS",
    "atomic_path",
    "commit_no_clobber",
    "commit_path",
    "atomic_output",
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


class DestinationExistsError(FileExistsError):
    """A write that must not replace an existing file found one under its name when it was complete (another
    process wrote it meanwhile); the other file is kept and this one discarded."""

    def __str__(self) -> str:
        return (f"{self.filename}: appeared while this run was writing it (another run writing the same output?); "
                "it was kept and nothing was overwritten")


def raise_if_no_space(err: BaseException, destination: str | os.PathLike) -> None:
    """Re-raise ``err`` as :class:`NoSpaceError` naming ``destination`` when it is, or was caused by, a no-space
    error (writers such as pydicom re-raise the ``OSError`` without its errno, the original as the cause)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, NoSpaceError):
            return
        if isinstance(cause, OSError) and cause.errno in NO_SPACE_ERRNOS:
            raise NoSpaceError(cause.errno, os.strerror(cause.errno), str(destination)) from err
        cause = cause.__cause__ or cause.__context__


def _ordinary_permissions(path: Path) -> None:
    """``mkstemp`` creates 0600 files; give the result the permissions a plain ``open`` would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def commit_no_clobber(tmp: Path, final: Path) -> None:
    """Move the complete file ``tmp`` to ``final`` unless ``final`` exists, atomically (a hard link, which fails
    on an existing name, then the temporary name removed); :class:`DestinationExistsError` otherwise."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise DestinationExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(final)) from None
    except OSError as err:  # a filesystem without hard links: check, then rename (a narrow race remains)
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(final):
            raise DestinationExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(final)) from None
        os.replace(tmp, final)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path beside ``final`` (same suffix, so writers that read the suffix pick the right format),
    renamed onto ``final`` when the block ends without error and removed otherwise.

    ``overwrite=False``: an existing ``final`` (also one that another process wrote while this block ran) is never
    replaced: :class:`DestinationExistsError`, and the temporary file is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{''.join(final.suffixes[-2:])}",
                                dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _ordinary_permissions(tmp)
        if overwrite:
            os.replace(tmp, final)
        else:
            commit_no_clobber(tmp, final)
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


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree; nothing if it is gone."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def commit_path(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move ``tmp`` onto ``final``; an existing ``final`` is swapped out first and restored if that fails.

    Without ``overwrite``, a ``final`` that appeared meanwhile (another run writing the same output) is kept:
    :class:`DestinationExistsError`."""
    if not overwrite:
        if tmp.is_file():
            commit_no_clobber(tmp, final)
            return
        exists = DestinationExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(final))
        if os.path.lexists(final) and not (final.is_dir() and not any(final.iterdir())):
            raise exists
        try:  # a folder: rename fails onto a non-empty folder or a file that appeared since the check
            os.rename(tmp, final)
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
            raise exists from None
        return
    if tmp.is_file() and (final.is_file() or not os.path.lexists(final)):
        os.replace(tmp, final)  # atomic for a file
        return
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    backup = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(final, backup)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(backup, final)
        raise
    _remove(backup)


@contextlib.contextmanager
def atomic_output(final: Path, as_folder: bool, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary file or folder path beside ``final`` (same suffix); rename it to ``final`` on success,
    delete it on error (a full disk becomes :class:`NoSpaceError` naming ``final``). Without ``overwrite`` an
    output that another run wrote meanwhile is kept and this one discarded (:class:`DestinationExistsError`)."""
    if not as_folder:
        with atomic_path(final, overwrite=overwrite) as tmp:
            yield tmp
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        commit_path(tmp, final, overwrite)
    except BaseException as err:
        _remove(tmp)
        raise_if_no_space(err, final)
        raise
