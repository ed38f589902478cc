"""What intake hands on: one submitted file, checked."""

from __future__ import annotations

from dataclasses import dataclass

from shared.core.errors import XrayqError


@dataclass
class Upload:
    """One submitted file: its bytes and name, its sniffed type, or why it was refused."""

    filename: str
    data: bytes
    media_type: str | None = None
    error: XrayqError | None = None
    dicom: dict[str, str] | None = None  # identifying tags of a DICOM input
