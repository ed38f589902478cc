"""Long-polling without a database query per waiting client.

One loop per gateway process asks the database, every few milliseconds, which of the jobs that
clients are waiting on have finished, and wakes those clients. Its cost does not grow with the number
of waiters (one small query per tick), and it works the same in embedded and services mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from shared.db.models import TERMINAL_STATUSES, Job
from shared.db.session import Database

log = logging.getLogger(__name__)


class CompletionWaiter:
    def __init__(self, database: Database, interval_s: float = 0.01) -> None:
        self.database = database
        self.interval_s = interval_s
        self._waiting: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._loop_task: asyncio.Task[None] | None = None

    async def wait(self, job_id: str, timeout_s: float) -> None:
        """Return when the job is terminal or `timeout_s` has passed, whichever is first."""
        event = asyncio.Event()
        self._waiting[job_id].add(event)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._watch())
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)
        finally:
            events = self._waiting.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiting[job_id]

    async def _watch(self) -> None:
        while self._waiting:
            try:
                finished = await run_in_threadpool(self._finished, list(self._waiting))
            except Exception:  # keep serving the waiters; they fall back to their own timeouts
                log.warning("could not check finished jobs", exc_info=True)
                finished = []
            for job_id in finished:
                for event in self._waiting.get(job_id, ()):
                    event.set()
            await asyncio.sleep(self.interval_s)

    def _finished(self, job_ids: list[str]) -> list[str]:
        terminal = [status.value for status in TERMINAL_STATUSES]
        found: list[str] = []
        with self.database.session() as session:
            for start in range(0, len(job_ids), 500):
                chunk = job_ids[start : start + 500]
                found += session.scalars(select(Job.id).where(Job.id.in_(chunk), Job.status.in_(terminal))).all()
        return found
