"""Submitted files as they arrive: read within their limit, named, counted; a batch's files or ZIP.

No web framework here: a submitted file is anything with a name, a binary stream and perhaps a known
size (Starlette's `UploadFile` is one); the gateway only adapts its async reads.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from typing import BinaryIO, Protocol

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.imaging.decode import sniff_media_type
from shared.intake import refusals
from shared.intake.archives import checked_entries, open_zip, read_entry
from shared.intake.images import check_file
from shared.intake.upload import Upload


class SubmittedFile(Protocol):
    @property
    def filename(self) -> str | None: ...

    @property
    def file(self) -> BinaryIO: ...

    @property
    def size(self) -> int | None: ...  # None when the sender did not say


def read_bounded(stream: BinaryIO, limit: int, filename: str) -> bytes:
    """The stream's bytes, refused as `file_too_large` past `limit` (at most limit + 1 are read)."""
    return within_limit(stream.read(limit + 1), limit, filename)


def within_limit(data: bytes, limit: int, filename: str) -> bytes:
    if len(data) > limit:
        raise refusals.file_too_large(filename, limit)
    return data


def check_file_count(count: int, settings: Settings) -> None:
    if not count:
        raise refusals.missing_file()
    if count > settings.max_batch_files:
        raise refusals.too_many_files(count, settings.max_batch_files)


MAX_NAME_LENGTH = 255  # a job's file name column holds 512


def clean_filename(name: str | None, fallback: str) -> str:
    """Keep the client's name for the job (it is how they match results), minus its folders."""
    return printable_name((name or "").replace("\\", "/").rsplit("/", 1)[-1], fallback)


def printable_name(name: str, fallback: str) -> str:
    """A name as a client gave it, minus control characters, at most `MAX_NAME_LENGTH` characters."""
    return "".join(ch for ch in name if ch.isprintable())[:MAX_NAME_LENGTH] or fallback


def batch_uploads(files: Sequence[SubmittedFile], settings: Settings) -> Iterator[Upload]:
    """A batch's files in request order, or a lone ZIP expanded in archive order; bad files are kept as
    refusals (each becomes a failed job in its place).

    What refuses the whole request (no file, too many, an unsafe or oversized ZIP) is raised now; each
    file is read and checked only when the iterator reaches it, so a caller that stores each before
    taking the next holds one file at a time.
    """
    check_file_count(len(files), settings)
    if len(files) == 1:
        # A lone file may be a ZIP as large as a whole request; images have the per-file limit.
        (file,) = files
        if not (file.size is not None and file.size > settings.max_request_bytes) and _is_zip(file.file):
            # Read from the spooled upload where it lies: the archive is never copied into memory.
            return expand_zip(file.file, settings)
    return _checked_files(files, settings)


def _checked_files(files: Sequence[SubmittedFile], settings: Settings) -> Iterator[Upload]:
    limit = settings.max_file_bytes
    for index, file in enumerate(files):
        filename = clean_filename(file.filename, f"file-{index}")
        if file.size is not None and file.size > limit:
            yield _too_large(filename, settings)
        else:
            yield check_file(filename, file.file.read(limit + 1), settings)


def _is_zip(stream: BinaryIO) -> bool:
    head = stream.read(8)
    stream.seek(0)
    return sniff_media_type(head + b"\0" * 124) == "application/zip"


def expand_zip(data: bytes | BinaryIO, settings: Settings) -> Iterator[Upload]:
    """The images of a ZIP, in archive order, refusing path escapes, bombs and too many entries.

    The whole archive is refused (now, before any entry is read) if any entry is unsafe, so nothing
    of it is half-submitted; an entry that is not a usable image fails its own job, with the code it
    would get sent alone. Entries are read one at a time, as the iterator is taken.
    """
    archive = open_zip(data)
    entries = checked_entries(
        archive, max_files=settings.max_batch_files, max_expanded_bytes=settings.max_zip_expanded_bytes
    )
    return _entries(archive, entries, settings)


def _entries(archive: zipfile.ZipFile, entries: list[zipfile.ZipInfo], settings: Settings) -> Iterator[Upload]:
    for index, info in enumerate(entries):
        name = printable_name(info.filename, f"entry-{index}")  # entries keep their folders
        try:
            content = read_entry(archive, info, settings.max_file_bytes)
        except XrayqError as error:
            yield Upload(name, b"", None, error)
            continue
        yield check_file(name, content, settings)


def _too_large(filename: str, settings: Settings) -> Upload:
    return Upload(filename, b"", None, refusals.file_too_large(filename, settings.max_file_bytes))
