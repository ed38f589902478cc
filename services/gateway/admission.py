"""Group commit for single-image submissions.

Each accepted image needs its input stored, a row committed and a message published. Done per
request, concurrent submissions contend for the database (SQLite has one writer; Postgres pays a
commit each) and each becomes a message of its own. Here request handlers hand their validated
upload to one admission thread per gateway process, which takes everything waiting and makes it
one call of `shared.jobs.creation.create_jobs` (inputs stored concurrently, all rows inserted in one
transaction, their ids published together in chunks of `predict_chunk_size`), then answers every
waiting request. Under load a group holds many
submissions; at idle it holds one and costs a thread hand-off. Nothing waits for a timer.

The order of a request's own steps is unchanged: input stored, row committed, message published,
then 202. A publish that fails leaves the rows `queued` for the reconciler, as everywhere else.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.core import log_context
from shared.core.settings import Settings
from shared.core.storage import ObjectStore
from shared.db.models import Job
from shared.db.session import Database
from shared.intake.upload import Upload
from shared.jobs.creation import JobRequest, create_jobs

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    upload: Upload
    model_ref: str
    client_ref: str | None
    organisation: str | None
    explain: bool = False
    done: Future[Job] = field(default_factory=Future)
    # The request's context (log fields, trace): the admission thread publishes in it.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


class AdmissionQueue:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        store: ObjectStore,
        celery: Celery,
        *,
        max_group: int = 256,
    ) -> None:
        self.settings = settings
        self.database = database
        self.store = store
        self.celery = celery
        self.max_group = max_group
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    async def submit(
        self,
        upload: Upload,
        *,
        model_ref: str,
        client_ref: str | None,
        organisation: str | None,
        explain: bool = False,
    ) -> Job:
        """The committed and published job for this upload; raises what its group's admission raised."""
        pending = _Pending(upload, model_ref, client_ref, organisation, explain)
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="admission", daemon=True)
                self._thread.start()
            self._pending.append(pending)
            self._wake.notify()
        return await asyncio.wrap_future(pending.done)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending:
                    self._wake.wait()
                group = self._pending[: self.max_group]
                del self._pending[: self.max_group]
            # A request whose client went away is dropped here (no job is made for it); the others can
            # no longer be cancelled, so setting their outcome below cannot fail.
            group = [pending for pending in group if pending.done.set_running_or_notify_cancel()]
            if not group:
                continue
            # The group's messages carry every request id of the group (comma-separated) and the first
            # request's context otherwise (its trace, when tracing is on): one message serves them all.
            ids = dict.fromkeys(log_context.field_in(pending.context, "request_id") for pending in group)
            request_ids = ",".join(request_id for request_id in ids if request_id) or None
            try:
                group[0].context.run(self._admit_as, request_ids, group)
            except BaseException as exc:  # every waiting request answers with it (e.g. 503), none hangs
                log.warning("could not admit %d submissions: %s", len(group), exc)
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_exception(exc)

    def _admit_as(self, request_ids: str | None, group: list[_Pending]) -> None:
        with log_context.bound(request_id=request_ids):
            self._admit(group)

    def _admit(self, group: list[_Pending]) -> None:
        requests = [
            JobRequest(
                [pending.upload], pending.model_ref, pending.client_ref, pending.organisation, explain=pending.explain
            )
            for pending in group
        ]
        with self.database.session() as session:
            created = create_jobs(
                session,
                self.store,
                self.celery,
                requests,
                chunk_size=self.settings.predict_chunk_size,
                # Each upload is in memory already, held by its waiting request: store them all at once.
                in_flight_bytes=None,
            )
        for pending, outcome in zip(group, created, strict=True):
            if outcome.error is not None:
                pending.done.set_exception(outcome.error)
            else:
                pending.done.set_result(outcome.jobs[0])
