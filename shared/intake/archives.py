"""Which archive entries are never unpacked: paths that escape, and clutter archivers add."""

from __future__ import annotations

import posixpath
import zipfile

from shared.core.errors import XrayqError

# Entries that archivers add beside the real files; not images, not worth a failed job each.
_ARCHIVE_CLUTTER = ("__MACOSX/", ".DS_Store", "Thumbs.db", "desktop.ini")


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

    The sizes checked are the declared ones; readers must stop at them (zipfile does), so a lying
    header cannot expand past the limit either.
    """
    entries = [info for info in archive.infolist() if not info.is_dir()]
    for info in entries:
        if is_unsafe_path(info.filename):
            raise XrayqError("archive_unsafe_path", f"Entry {info.filename!r} escapes the archive.")
    entries = [info for info in entries if not is_clutter(info.filename)]
    if not entries:
        raise XrayqError(empty_code, "The archive holds no files.")
    if len(entries) > max_files:
        raise XrayqError("too_many_files", f"The archive has {len(entries)} files; the limit is {max_files}.")
    declared = sum(info.file_size for info in entries)
    if declared > max_expanded_bytes:
        raise XrayqError(
            "archive_too_large", f"The archive expands to {declared} bytes; the limit is {max_expanded_bytes}."
        )
    return entries
