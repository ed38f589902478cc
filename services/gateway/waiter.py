"""Long-polling without a database query per waiting client.

One loop per gateway process asks the database, every few milliseconds, which of the jobs that
clients are waiting on have finished, loads those (one query for all of them) and hands each waiting
client its job's final view. Its cost does not grow with the number of waiters (one small query per
tick, plus one for the jobs that finished in it), and it works the same in embedded and services mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from shared.db.models import TERMINAL_STATUSES, Job
from shared.db.session import Database
from shared.jobs import job_view
from shared.schemas import JobView

log = logging.getLogger(__name__)


class CompletionWaiter:
    def __init__(self, database: Database, interval_s: float = 0.005) -> None:
        self.database = database
        self.interval_s = interval_s
        self._waiting: dict[str, set[asyncio.Future[JobView]]] = defaultdict(set)
        self._loop_task: asyncio.Task[None] | None = None

    async def wait(self, job_id: str, timeout_s: float) -> JobView | None:
        """The job's view once it is terminal, or None if `timeout_s` passed first.

        The caller has already checked that the job exists and that its client may see it.
        """
        finished: asyncio.Future[JobView] = asyncio.get_running_loop().create_future()
        self._waiting[job_id].add(finished)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._watch())
        try:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(finished, timeout_s)
            return None
        finally:
            futures = self._waiting.get(job_id)
            if futures is not None:
                futures.discard(finished)
                if not futures:
                    del self._waiting[job_id]

    async def _watch(self) -> None:
        while self._waiting:
            try:
                views = await run_in_threadpool(self._finished, list(self._waiting))
            except Exception:  # keep serving the waiters; they fall back to their own timeouts
                log.warning("could not check finished jobs", exc_info=True)
                views = {}
            for job_id, view in views.items():
                for finished in self._waiting.get(job_id, ()):
                    if not finished.done():
                        finished.set_result(view)
            await asyncio.sleep(self.interval_s)

    def _finished(self, job_ids: list[str]) -> dict[str, JobView]:
        terminal = [status.value for status in TERMINAL_STATUSES]
        views: dict[str, JobView] = {}
        with self.database.session() as session:
            for start in range(0, len(job_ids), 500):
                chunk = job_ids[start : start + 500]
                done = session.scalars(select(Job.id).where(Job.id.in_(chunk), Job.status.in_(terminal))).all()
                if done:  # full rows only for the few that finished since the last tick
                    query = select(Job).options(selectinload(Job.model_version)).where(Job.id.in_(done))
                    views.update((job.id, job_view(job)) for job in session.scalars(query))
        return views
