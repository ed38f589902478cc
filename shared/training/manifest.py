"""What a dataset version lists: its files, with label, split and content hash."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class ManifestEntry:
    path: str
    split: str
    label: str
    sha256: str
    bytes: int
    media_type: str
    # DICOM only: what PS3.15 de-identification did to it before it was stored.
    deidentification: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return blob_key(self.sha256)


@dataclass
class NewDataset:
    entries: list[ManifestEntry]
    details: dict[str, Any]
    # Yields (sha256, bytes) of each distinct file, for storing once the whole upload is accepted.
    files: Callable[[], Iterator[tuple[str, bytes]]]


def blob_key(sha256: str) -> str:
    return f"datasets/blobs/{sha256}"
