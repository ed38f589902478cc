"""Fixtures every test layer shares: the real data folder and small real images made from it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.settings import Settings

CHEST_TRAIN = Path("chest-xray-224") / "train"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Settings().data_dir.resolve()
    if not (path / CHEST_TRAIN).is_dir():
        pytest.fail(f"Test data missing: {path / CHEST_TRAIN} (set XRAYQ_DATA_DIR to ../shared/data).")
    return path


@pytest.fixture(scope="session")
def chest_images(data_dir: Path) -> dict[str, list[Path]]:
    """A few real chest X-rays per class, in a fixed order."""
    root = data_dir / CHEST_TRAIN
    return {label: sorted((root / label).glob("*.jpeg"))[:40] for label in ("NORMAL", "PNEUMONIA")}


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
