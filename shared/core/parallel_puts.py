"""Storing many objects as they come: in parallel (an S3 put is a network round trip), with a bounded
number of bytes in flight, so a stream of inputs is stored without holding the stream in memory.

Job creation stores a batch's inputs through it as they are checked, dataset uploads their files; both
share one pool of threads per process.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from types import TracebackType

from shared.core.storage import ObjectStore

MIB = 1024 * 1024
# Enough to keep several puts of typical radiographs (0.1-2 MB) going at once; a larger object goes
# alone. What a caller holds while its puts run is at most this plus the object it is handing over.
STREAM_IN_FLIGHT_BYTES = 4 * MIB


class ParallelPuts:
    """Puts on the shared pool, at most `max_in_flight_bytes` of them running or queued (always at least
    one); `put` waits for room, so the bytes handed over are released as their puts finish. `None`: no
    bound, for a caller that holds all the bytes anyway.

    `wait` returns once every put has finished and raises the first that failed; a failure also stops
    the next `put`. Leaving the `with` block on an error cancels the puts not yet started (those already
    running finish: their objects are unreferenced). A lone put runs in the caller's thread: the first
    is held back until a second comes or `wait` is called, which saves a thread hand-off when there is
    nothing to overlap.
    """

    def __init__(self, store: ObjectStore, max_in_flight_bytes: int | None) -> None:
        self.store = store
        self.max_in_flight_bytes = max_in_flight_bytes
        self._running: deque[tuple[Future[None], int]] = deque()
        self._running_bytes = 0
        self._held: tuple[str, bytes, str] | None = None

    def __enter__(self) -> ParallelPuts:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if error is not None:
            self._held = None
            for future, _ in self._running:
                future.cancel()
            self._running.clear()

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if self._held is None and not self._running:
            self._held = (key, data, content_type)
            return
        if self._held is not None:
            held, self._held = self._held, None
            self._submit(*held)
        self._submit(key, data, content_type)

    def wait(self) -> None:
        """Every object handed over is stored (or the first failure is raised)."""
        if self._held is not None:
            held, self._held = self._held, None
            self.store.put(*held)
        while self._running:
            self._finish_oldest()

    def _submit(self, key: str, data: bytes, content_type: str) -> None:
        self._finish_done()
        limit = self.max_in_flight_bytes
        while limit is not None and self._running and self._running_bytes + len(data) > limit:
            self._finish_oldest()
        self._running.append((_put_pool().submit(self.store.put, key, data, content_type), len(data)))
        self._running_bytes += len(data)

    def _finish_done(self) -> None:
        while self._running and self._running[0][0].done():
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        future, size = self._running.popleft()
        self._running_bytes -= size
        future.result()


@lru_cache(maxsize=1)
def _put_pool() -> ThreadPoolExecutor:
    # One pool per process, made once: starting threads per request cost more than local puts.
    return ThreadPoolExecutor(max_workers=16, thread_name_prefix="put")
