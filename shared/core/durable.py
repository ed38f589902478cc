"""Files that survive a power loss once written, and what a crash leaves half-written, removed.

The embedded mode answers 202 once the input is in the local object store, the message in the spool
and the row in SQLite. A rename is atomic but, until the folder itself is synced, not durable: after a
power loss the file may be missing, or present and empty. So each write syncs the file's data before
its rename and the folder's entry after it.

A crash between writing and renaming leaves the temporary file (`.tmp-*` in the store, `*.part` in the
spool): nobody reads it and nothing would delete it. `remove_crash_leftovers` does, at `xrayq up`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from shared.core.settings import Settings

log = logging.getLogger(__name__)
STORE_PARTIAL_PREFIX = ".tmp-"  # shared.core.storage's temporary files
SPOOL_PARTIAL_SUFFIX = ".part"  # shared.core.spool_transport's message files being written
# A temporary file is a leftover only when nobody has written to it for this long: another process
# of a stack already running (a gateway streaming a large upload) still writes to its own.
LEFTOVER_AGE_S = 60.0


def sync_file(handle: BinaryIO) -> None:
    """The file's bytes on the disk, not only in the page cache."""
    handle.flush()
    os.fsync(handle.fileno())


def sync_directory(folder: str | os.PathLike[str]) -> None:
    """The folder's entries (a rename, a new file) on the disk. A no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened, and NTFS journals renames itself
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders(folder: Path, root: Path) -> None:
    """`folder` and the folders above it up to `root`, each new one's entry synced in its parent."""
    created = []
    current = folder
    while current != root and not current.is_dir():
        created.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    for new in reversed(created):
        sync_directory(new.parent)


def remove_crash_leftovers(settings: Settings, older_than_s: float = LEFTOVER_AGE_S) -> list[Path]:
    """Half-written files of the local object store and the spool that no process writes any more."""
    folders: list[tuple[Path, bool]] = []  # (folder, whole tree)
    if not settings.uses_s3 and settings.storage_dir is not None:
        folders.append((Path(settings.storage_dir), True))
    if settings.uses_filesystem_broker:
        folders.append((settings.broker_spool_dir / "queue", False))
    cutoff = time.time() - older_than_s
    removed = []
    for folder, whole_tree in folders:
        for path in _partial_files(folder, whole_tree):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # renamed into place or removed meanwhile
                continue
    if removed:
        log.warning("removed %d half-written files left by a crash", len(removed))
    return removed


def _partial_files(folder: Path, whole_tree: bool) -> Iterable[Path]:
    if not folder.is_dir():
        return
    walked = os.walk(folder) if whole_tree else [(str(folder), [], os.listdir(folder))]
    for parent, _dirs, names in walked:
        for name in names:
            if name.startswith(STORE_PARTIAL_PREFIX) or name.endswith(SPOOL_PARTIAL_SUFFIX):
                yield Path(parent, name)
