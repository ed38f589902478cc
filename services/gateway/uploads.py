"""Turning uploaded files (and ZIP archives of them) into validated `Upload`s, within hard limits."""

from __future__ import annotations

import io
import zipfile
from typing import BinaryIO

from fastapi import UploadFile

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.imaging import dicom
from shared.imaging.decode import ImageLimits, check_image, sniff_media_type
from shared.intake.archives import checked_entries
from shared.jobs.creation import Upload


def too_large(filename: str, limit: int) -> XrayqError:
    return XrayqError("file_too_large", f"{filename!r} is larger than {limit} bytes.")


def read_bounded(stream: BinaryIO, limit: int, filename: str) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise too_large(filename, limit)
    return data


async def read_upload(file: UploadFile, limit: int, filename: str) -> bytes:
    """`read_bounded` for an async route (the spooled upload is read off the event loop if on disk)."""
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise too_large(filename, limit)
    return data


def check_file_count(count: int, settings: Settings) -> None:
    if not count:
        raise XrayqError("missing_file", "Send at least one file in the `files` field.")
    if count > settings.max_batch_files:
        raise XrayqError("too_many_files", f"{count} files; the limit is {settings.max_batch_files}.")


def clean_filename(name: str | None, fallback: str) -> str:
    """Keep the client's name for the job (it is how they match results), minus control characters."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1] if name else ""
    name = "".join(ch for ch in name if ch.isprintable())[:255]
    return name or fallback


def validate_image(filename: str, data: bytes, settings: Settings) -> Upload:
    """Refuse here, with its code, whatever is plainly not a usable image (see `check_image`)."""
    limits = ImageLimits(max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)
    media_type = sniff_media_type(data)
    if media_type == "application/zip":
        return Upload(
            filename,
            data,
            media_type,
            XrayqError("nested_archive", "Archives inside a batch are not unpacked; send images."),
        )
    try:
        check_image(data, limits)
        tags = dicom.identifying_tags(dicom.read_header(data)) if media_type == "application/dicom" else None
    except XrayqError as error:
        return Upload(filename, data, media_type, error)
    return Upload(filename, data, media_type, dicom=tags)


def expand_zip(data: bytes, settings: Settings) -> list[Upload]:
    """The images of a ZIP, in archive order, refusing path escapes, bombs and too many entries.

    The whole archive is refused if any entry is unsafe, so nothing of it is half-submitted.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise XrayqError("archive_unreadable", f"The ZIP archive could not be read: {exc}") from None
    entries = checked_entries(
        archive, max_files=settings.max_batch_files, max_expanded_bytes=settings.max_zip_expanded_bytes
    )
    uploads = []
    for info in entries:
        name = info.filename
        if info.file_size > settings.max_file_bytes:
            uploads.append(
                Upload(
                    name,
                    b"",
                    None,
                    too_large(name, settings.max_file_bytes),
                )
            )
            continue
        try:
            # zipfile stops at the declared size, so a lying header cannot expand past the check above.
            with archive.open(info) as member:
                content = member.read(settings.max_file_bytes + 1)
        except (zipfile.BadZipFile, NotImplementedError, OSError, RuntimeError, EOFError) as exc:
            uploads.append(Upload(name, b"", None, XrayqError("archive_unreadable", f"{name!r}: {exc}")))
            continue
        uploads.append(validate_image(name, content, settings))
    return uploads
