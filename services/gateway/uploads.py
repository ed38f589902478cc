"""The gateway's side of intake: reading Starlette's `UploadFile` off the event loop (`shared.intake`
holds every check and takes plain binary streams)."""

from __future__ import annotations

from fastapi import UploadFile

from shared.intake.uploads import within_limit


async def read_upload(file: UploadFile, limit: int, filename: str) -> bytes:
    """`shared.intake.uploads.read_bounded` for an async route (a spooled upload on disk is read in a thread)."""
    return within_limit(await file.read(limit + 1), limit, filename)
