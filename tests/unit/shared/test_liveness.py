"""Heartbeat files of the Celery processes: fresh, stale (a hung process), missing (never started or
stopped), and written by a real Celery worker's own timer."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from celery import Celery

from shared.core.liveness import MISSED_BEATS, beat, heartbeat_file, install_heartbeat, is_fresh
from shared.core.settings import Settings


def test_a_recent_beat_is_fresh_an_old_one_hung_and_none_not_started(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, liveness_interval_s=2)
    healthy, sentence = is_fresh(settings, "worker")
    assert not healthy and "has not started" in sentence
    path = heartbeat_file(settings, "worker")
    beat(path)
    assert is_fresh(settings, "worker")[0]
    long_ago = time.time() - MISSED_BEATS * 2 - 1
    os.utime(path, (long_ago, long_ago))
    healthy, sentence = is_fresh(settings, "worker")
    assert not healthy and "hung" in sentence
    assert not is_fresh(settings, "trainer")[0]  # each role has its own file


def test_a_running_celery_worker_beats_and_a_stopped_one_does_not(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, liveness_interval_s=0.2)
    app = Celery("liveness-test", broker="memory://", set_as_current=False)
    install_heartbeat(app, settings, "worker")
    worker = app.WorkController(pool_cls="solo", concurrency=1, without_mingle=True, without_gossip=True)
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    path = heartbeat_file(settings, "worker")
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    first = path.stat().st_mtime
    while path.stat().st_mtime == first and time.monotonic() < deadline:  # beats again, on its timer
        time.sleep(0.05)
    assert path.stat().st_mtime > first and is_fresh(settings, "worker")[0]
    worker.stop(in_sighandler=False)
    thread.join(30)
    assert not path.exists() and not is_fresh(settings, "worker")[0]
