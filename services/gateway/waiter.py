"""Long-polling without a database query per waiting client.

One loop per gateway process asks the database, every few milliseconds, which of the jobs (and
batches) that clients are waiting on have finished, loads those jobs (one query for all of them) and
hands each waiting client its job's final view; a batch's client is woken to read its batch. Its cost
does not grow with the number of waiters (one small query per tick and kind, plus one for the jobs
that finished in it), and it works the same in embedded and services mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import exists, or_, select
from sqlalchemy.orm import selectinload

from shared.db.models import TERMINAL_STATUSES, Batch, Job
from shared.db.session import Database
from shared.jobs.views import job_view
from shared.schemas import JobView

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_TERMINAL = [status.value for status in TERMINAL_STATUSES]
# Ticks are finer while only a few clients wait (an idle gateway answers sooner) and coarser under
# load, where one tick serves many waiters and the ticks' own cost would compete with the requests.
FAST_TICK_S = 0.002
FEW_WAITERS = 4


class CompletionWaiter:
    """Long-polls are capped per process (`max_waiters`) and read the database on threads of their own
    (`read_threads`), so however many clients wait, the request handlers keep their thread pool."""

    def __init__(
        self, database: Database, interval_s: float = 0.005, *, max_waiters: int = 256, read_threads: int = 8
    ) -> None:
        self.database = database
        self.interval_s = interval_s
        self.max_waiters = max_waiters
        self.read_threads = read_threads
        self._waiting = 0
        self._limiter: anyio.CapacityLimiter | None = None  # made on first use, inside the event loop
        self._jobs: dict[str, set[asyncio.Future[JobView]]] = defaultdict(set)
        self._batches: dict[str, set[asyncio.Future[bool]]] = defaultdict(set)
        self._loop_task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def long_poll(self, timeout_s: float) -> Iterator[float]:
        """The seconds this long-poll may wait: `timeout_s`, or 0 when `max_waiters` already wait (the
        client then gets the current state at once, and polls again)."""
        if timeout_s <= 0 or self._waiting >= self.max_waiters:
            yield 0.0
            return
        self._waiting += 1
        try:
            yield timeout_s
        finally:
            self._waiting -= 1

    async def read(self, function: Callable[..., _T], *args: object) -> _T:
        """`function(*args)` on the long-polls' own threads, never the pool request handlers share."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.read_threads)
        return await anyio.to_thread.run_sync(function, *args, limiter=self._limiter)

    async def wait(self, job_id: str, timeout_s: float) -> JobView | None:
        """The job's view once it is terminal, or None if `timeout_s` passed first.

        The caller has already checked that the job exists and that its client may see it.
        """
        return await self._wait(self._jobs, job_id, timeout_s)

    async def wait_batch(self, batch_id: str, timeout_s: float) -> bool:
        """True once every job of the batch has finished (and a study batch's study is complete)."""
        finished = await self._wait(self._batches, batch_id, timeout_s)
        return finished is not None

    async def _wait(self, waiting: dict[str, set[asyncio.Future[_T]]], key: str, timeout_s: float) -> _T | None:
        finished: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        waiting[key].add(finished)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._watch())
        try:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(finished, timeout_s)
            return None
        finally:
            futures = waiting.get(key)
            if futures is not None:
                futures.discard(finished)
                if not futures:
                    del waiting[key]

    async def _watch(self) -> None:
        while self._jobs or self._batches:
            try:
                views, batches = await self.read(self._finished, list(self._jobs), list(self._batches))
            except Exception:  # keep serving the waiters; they fall back to their own timeouts
                log.warning("could not check finished jobs", exc_info=True)
                views, batches = {}, []
            for job_id, view in views.items():
                _settle(self._jobs.get(job_id, ()), view)
            for batch_id in batches:
                _settle(self._batches.get(batch_id, ()), True)
            few = len(self._jobs) + len(self._batches) <= FEW_WAITERS
            await asyncio.sleep(min(FAST_TICK_S, self.interval_s) if few else self.interval_s)

    def _finished(self, job_ids: list[str], batch_ids: list[str]) -> tuple[dict[str, JobView], list[str]]:
        views: dict[str, JobView] = {}
        batches: list[str] = []
        with self.database.session() as session:
            for chunk in _chunks(job_ids):
                done = session.scalars(select(Job.id).where(Job.id.in_(chunk), Job.status.in_(_TERMINAL))).all()
                if done:  # full rows only for the few that finished since the last tick
                    query = select(Job).options(selectinload(Job.model_version)).where(Job.id.in_(done))
                    views.update((job.id, job_view(job)) for job in session.scalars(query))
            for chunk in _chunks(batch_ids):
                unfinished = exists().where(Job.batch_id == Batch.id, Job.status.not_in(_TERMINAL))
                complete = or_(Batch.study_instance_uid.is_(None), Batch.stable_at.is_not(None))
                batches += session.scalars(select(Batch.id).where(Batch.id.in_(chunk), complete, ~unfinished)).all()
        return views, batches


def _settle(futures: set[asyncio.Future[_T]] | tuple[()], result: _T) -> None:
    for future in futures:
        if not future.done():
            future.set_result(result)


def _chunks(ids: list[str], size: int = 500) -> list[list[str]]:
    return [ids[start : start + size] for start in range(0, len(ids), size)]
