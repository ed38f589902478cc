"""A multipart/related body (STOW-RS), parsed as it arrives into one spooled file per part.

python-multipart's parser is fed the request stream chunk by chunk; each part's bytes go to a temporary
file that spills to disk past a small size, so a body near the request cap is never in memory whole.
The request cap itself is `BodySizeLimit`'s, enforced on the same stream.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from shared.core.errors import XrayqError

# Parts stay in memory only while they are this small: a body of many modest instances (each read
# and stored in turn by study intake) is not held in memory part by part.
SPOOL_IN_MEMORY_BYTES = 64 * 1024


@dataclass
class RelatedPart:
    content_type: str
    file: IO[bytes]

    def read(self) -> bytes:
        self.file.seek(0)
        return self.file.read()


@dataclass
class _PartsCollector:
    parts: list[RelatedPart] = field(default_factory=list)
    _field: bytes = b""
    _value: bytes = b""
    _headers: dict[str, str] = field(default_factory=dict)
    ended: bool = False

    def part_begin(self) -> None:
        self._headers = {}
        # Closed by `close_parts` once the request is answered.
        self.parts.append(RelatedPart("", tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY_BYTES)))  # noqa: SIM115

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1].file.write(data[start:end])

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def headers_finished(self) -> None:
        self.parts[-1].content_type = self._headers.get("content-type", "")

    def end(self) -> None:
        self.ended = True

    def close(self) -> None:
        for part in self.parts:
            part.file.close()


async def read_related_parts(stream: AsyncIterator[bytes], boundary: str) -> list[RelatedPart]:
    """The body's parts, each in its own spooled file; the caller closes them (`close_parts`)."""
    collector = _PartsCollector()
    callbacks = {
        "on_part_begin": collector.part_begin,
        "on_part_data": collector.part_data,
        "on_header_field": collector.header_field,
        "on_header_value": collector.header_value,
        "on_header_end": collector.header_end,
        "on_headers_finished": collector.headers_finished,
        "on_end": collector.end,
    }
    parser = MultipartParser(boundary.encode("latin-1"), callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        collector.close()
        raise XrayqError("multipart_unreadable", f"The multipart body could not be read: {exc}") from None
    except BaseException:
        collector.close()
        raise
    if not collector.ended or not collector.parts:
        collector.close()
        raise XrayqError("multipart_unreadable", "The body is not a complete multipart message for its boundary.")
    return collector.parts


def close_parts(parts: list[RelatedPart]) -> None:
    for part in parts:
        part.file.close()
