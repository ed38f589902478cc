"""Storing a stream of objects in parallel with a bounded number of bytes in flight (shared/core/parallel_puts.py),
into the real local object store."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from shared.core.parallel_puts import ParallelPuts
from shared.core.storage import LocalObjectStore


class WatchedStore(LocalObjectStore):
    """The local store, noting how many bytes its puts hold at once and which threads run them."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._lock = threading.Lock()
        self.holding = self.most_held = 0
        self.threads: set[str] = set()

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        with self._lock:
            self.holding += len(data)
            self.most_held = max(self.most_held, self.holding)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(0.002)  # a network round trip's worth of overlap
            super().put(key, data, content_type)
        finally:
            with self._lock:
                self.holding -= len(data)


def test_every_object_is_stored_with_at_most_the_bound_in_flight(tmp_path: Path) -> None:
    store = WatchedStore(tmp_path)
    with ParallelPuts(store, 1000) as puts:
        for index in range(40):
            puts.put(f"objects/{index}", bytes([index]) * 300)
        puts.wait()
    assert all(store.get(f"objects/{index}") == bytes([index]) * 300 for index in range(40))
    assert store.most_held <= 1000


def test_an_object_larger_than_the_bound_still_goes_alone(tmp_path: Path) -> None:
    store = WatchedStore(tmp_path)
    with ParallelPuts(store, 100) as puts:
        for index in range(3):
            puts.put(f"big/{index}", b"x" * 500)
        puts.wait()
    assert store.most_held == 500 and all(store.exists(f"big/{index}") for index in range(3))


def test_a_lone_put_runs_in_the_callers_thread(tmp_path: Path) -> None:
    store = WatchedStore(tmp_path)
    with ParallelPuts(store, None) as puts:
        puts.put("only", b"data")
        assert not store.exists("only")  # held back until wait: there may be nothing to overlap with
        puts.wait()
    assert store.get("only") == b"data" and store.threads == {threading.current_thread().name}


def test_a_failed_put_is_raised_and_stops_the_stream(tmp_path: Path) -> None:
    store = WatchedStore(tmp_path / "objects")
    with pytest.raises(ValueError, match="escapes the store"), ParallelPuts(store, 10) as puts:
        puts.put("../outside", b"0123456789")  # the local store refuses keys outside its folder
        for index in range(20):
            puts.put(f"after/{index}", b"0123456789")
        puts.wait()
    assert not (tmp_path / "outside").exists()
    assert not store.exists("after/19")  # the stream stopped at the failure, long before its end
