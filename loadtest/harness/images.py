"""Real chest X-rays from the data folder as request bodies, and ZIP archives of them (batches)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from pathlib import Path

CHEST_TRAIN = Path("chest-xray-224") / "train"


def chest_image_paths(data_dir: Path) -> list[Path]:
    """Every training JPEG of the chest collection (both classes), in a fixed order."""
    root = Path(data_dir) / CHEST_TRAIN
    paths = sorted(root.glob("*/*.jpeg"))
    if not paths:
        raise SystemExit(f"no images under {root}; set XRAYQ_DATA_DIR")
    return paths


def read_images(paths: Iterable[Path]) -> list[tuple[str, bytes]]:
    return [(path.name, path.read_bytes()) for path in paths]


def load_images(data_dir: Path, count: int) -> list[tuple[str, bytes]]:
    """`count` images spread evenly over the sorted collection, so both classes are represented."""
    paths = chest_image_paths(data_dir)
    return read_images(paths[:: max(1, len(paths) // count)][:count])


def zip_bytes(entries: Iterable[tuple[str, bytes]]) -> bytes:
    """A ZIP archive (a batch body) holding each (name, data) entry."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()
