"""Crash-safe checkpoint files.

A file is written to a temporary file in the same folder, flushed and fsynced, renamed over
its final name with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsynced so
the rename itself survives a power cut. A kill at any instant therefore leaves the old file or
the new one under the final name, never a torn one; only a ``*.tmp`` leftover can remain, and
:func:`remove_temporary_files` clears those at the next start.
"""

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TEMPORARY_PREFIX = ".tmp-"
TEMPORARY_SUFFIX = ".tmp"


def atomic_save(obj, path) -> int:
    """Write ``obj`` with ``torch.save`` to ``path`` crash-safely.

    Args:
        obj: anything ``torch.load(..., weights_only=True)`` can read back (tensors, dicts,
            lists, numbers, strings, None).
        path: final file name; its folder is created when missing.

    Returns:
        Bytes written.

    Raises:
        OSError: the write failed (disk full, permission, file-size limit). The temporary file
            is removed and any earlier file under ``path`` is untouched.
    """
    return _write_atomically(path, lambda handle: torch.save(obj, handle))


def atomic_copy(source, destination) -> int:
    """Copy a file crash-safely (same temporary-file, fsync and rename steps)."""
    def copy(handle):
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle)

    return _write_atomically(destination, copy)


def atomic_write_bytes(data: bytes, path) -> int:
    """Write raw bytes (a PNG, say) crash-safely."""
    return _write_atomically(path, lambda handle: handle.write(data))


def _write_atomically(path, write) -> int:
    """Temporary file beside ``path``, ``write(handle)``, flush, fsync, rename, folder fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX + path.name + ".",
                                             suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        # mkstemp creates the file 0600; a checkpoint gets the mode any new file would get.
        os.chmod(temporary, 0o666 & ~_current_umask())
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise
    _fsync_folder(path.parent)
    return size


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_temporary_files(folder) -> list:
    """Delete leftovers of interrupted writes in ``folder``; returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for leftover in folder.glob(f"{TEMPORARY_PREFIX}*{TEMPORARY_SUFFIX}"):
        _remove_quietly(leftover)
        removed.append(leftover)
    if removed:
        log.info("Removed %d temporary file(s) left by an interrupted save in %s",
                 len(removed), folder)
    return removed


def free_disk_bytes(folder) -> int:
    """Free bytes on the file system holding ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _fsync_folder(folder: Path) -> None:
    # Windows cannot open a folder for fsync; the rename is durable enough there.
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
