"""The one ZIP reader: opening an archive, which entries are never unpacked, and reading an entry.

Batches and dataset uploads both read their ZIPs here, so a path escape, a bomb, an oversize entry or
a broken archive gets the same code whichever way it came.
"""

from __future__ import annotations

import posixpath
import zipfile
from io import BytesIO
from typing import IO

from shared.core.errors import XrayqError
from shared.intake import refusals

# Entries that archivers add beside the real files; not images, not worth a failed job each.
_ARCHIVE_CLUTTER = ("__MACOSX/", ".DS_Store", "Thumbs.db", "desktop.ini")
# What zipfile raises for a broken archive or entry (a bad CRC, a method it lacks, a cut-off stream).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, RuntimeError, EOFError)


def open_zip(source: bytes | IO[bytes]) -> zipfile.ZipFile:
    """The archive in `source` (bytes, or a seekable binary stream such as a spooled upload)."""
    try:
        return zipfile.ZipFile(BytesIO(source) if isinstance(source, bytes) else source)
    except (*_ZIP_ERRORS, ValueError) as exc:
        raise refusals.archive_unreadable(f"The ZIP archive could not be read: {exc}") from None


def is_unsafe_path(name: str) -> bool:
    """Absolute paths, drive letters and `..` anywhere: an entry that would land outside its folder."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        return True
    parts = posixpath.normpath(normalised).split("/")
    return ".." in parts or ".." in normalised.split("/")


def is_clutter(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return name.startswith("__MACOSX/") or base in _ARCHIVE_CLUTTER or base.startswith("._")


def checked_entries(
    archive: zipfile.ZipFile, *, max_files: int, max_expanded_bytes: int, empty_code: str = "archive_empty"
) -> list[zipfile.ZipInfo]:
    """The archive's files, refusing path escapes, too many entries and bombs before expanding any.

    The sizes checked are the declared ones; `read_entry` stops at them (zipfile does), so a lying
    header cannot expand past the limit either.
    """
    entries = [info for info in archive.infolist() if not info.is_dir()]
    for info in entries:
        if is_unsafe_path(info.filename):
            raise refusals.archive_unsafe_path(info.filename)
    entries = [info for info in entries if not is_clutter(info.filename)]
    if not entries:
        raise XrayqError(empty_code, "The archive holds no files.")
    if len(entries) > max_files:
        raise refusals.too_many_files(len(entries), max_files)
    declared = sum(info.file_size for info in entries)
    if declared > max_expanded_bytes:
        raise refusals.archive_too_large(declared, max_expanded_bytes)
    return entries


def read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """One entry's bytes, refused (`file_too_large`) past `limit` as a submitted file would be."""
    if info.file_size > limit:
        raise refusals.file_too_large(info.filename, limit)
    try:
        # zipfile stops at the declared size: a lying header cannot expand past the check above.
        with archive.open(info) as member:
            return member.read(limit + 1)
    except _ZIP_ERRORS as exc:
        raise refusals.archive_unreadable(f"{info.filename!r}: {exc}") from None
