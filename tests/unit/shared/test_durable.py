"""The embedded mode's writes are synced before they count as accepted, and what a crash leaves
half-written is removed when the stack starts (`xrayq up`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from services.cli.supervisor import prepare_stack
from shared.core import durable
from shared.core.queue import PREDICT_QUEUE, PREDICT_TASK, make_celery
from shared.core.settings import Settings
from shared.core.storage import make_object_store
from shared.db.session import database_for

LONG_AGO = time.time() - 3600


@pytest.fixture
def synced(monkeypatch) -> list[int]:
    """Every fsync made (its file descriptor), recorded, then done for real."""
    calls: list[int] = []
    real = os.fsync

    def recorded(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    return calls


def aged(path: Path, data: bytes = b"half") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (LONG_AGO, LONG_AGO))
    return path


def test_an_object_is_synced_with_its_folders(tmp_path, synced) -> None:
    store = make_object_store(Settings(home=tmp_path))
    store.put("inputs/2026/12/06/a.png", b"image bytes")
    # The file, then its new folders' entries (inputs, 2026, 12, 06) in their parents, then the rename.
    assert len(synced) == 1 + 4 + 1
    synced.clear()
    store.put("inputs/2026/12/06/b.png", b"image bytes")
    assert len(synced) == 2  # the folders exist: the file and the rename
    assert store.get("inputs/2026/12/06/b.png") == b"image bytes"


def test_a_spooled_message_is_synced(tmp_path, synced) -> None:
    settings = Settings(home=tmp_path)
    make_celery(settings).send_task(PREDICT_TASK, args=[["job"]], queue=PREDICT_QUEUE)
    assert len(synced) == 2  # the message file and the spool folder's entry
    names = os.listdir(settings.broker_spool_dir / "queue")
    assert len(names) == 1 and names[0].endswith(".msg")


def test_sqlite_commits_are_synced(tmp_path) -> None:
    with database_for(Settings(home=tmp_path)).engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_xrayq_up_removes_what_a_crash_left_half_written(tmp_path) -> None:
    settings = Settings(home=tmp_path)
    objects, spool = Path(settings.storage_dir), settings.broker_spool_dir / "queue"
    left = [
        aged(objects / "inputs" / "2026" / ".tmp-abc123"),
        aged(objects / ".tmp-def456"),
        aged(spool / f"000123_x.{PREDICT_QUEUE}.msg.part"),
    ]
    kept = [
        aged(objects / "inputs" / "2026" / "a.png"),  # an object
        aged(spool / f"000124_y.{PREDICT_QUEUE}.msg"),  # a message waiting for a worker
    ]
    being_written = objects / ".tmp-now"  # another running process's upload, still being written
    being_written.write_bytes(b"streaming")

    prepare_stack(settings)

    assert [path for path in left if path.exists()] == []
    assert all(path.exists() for path in kept) and being_written.exists()


def test_nothing_to_clean_in_a_new_home(tmp_path) -> None:
    assert durable.remove_crash_leftovers(Settings(home=tmp_path)) == []
