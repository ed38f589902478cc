"""Group commit for single-image submissions.

Each accepted image needs its input stored, a row committed and a message published. Done per
request, concurrent submissions contend for the database (SQLite has one writer; Postgres pays a
commit each) and each becomes a message of its own. Here request handlers hand their validated
upload to one admission thread per gateway process, which takes everything waiting, stores the
inputs concurrently, inserts all rows in one transaction and publishes their ids together (in
chunks of `predict_chunk_size`), then answers every waiting request. Under load a group holds many
submissions; at idle it holds one and costs a thread hand-off. Nothing waits for a timer.

The order of a request's own steps is unchanged: input stored, row committed, message published,
then 202. A publish that fails leaves the rows `queued` for the reconciler, as everywhere else.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectStore
from shared.db.models import Job
from shared.db.session import Database
from shared.jobs.lifecycle import Upload, check_model_available, new_jobs, publish_jobs, put_all

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    upload: Upload
    model_ref: str
    client_ref: str | None
    organisation: str | None
    done: Future[Job] = field(default_factory=Future)


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

    async def submit(self, upload: Upload, *, model_ref: str, client_ref: str | None, organisation: str | None) -> Job:
        """The committed and published job for this upload; raises what its group's admission raised."""
        pending = _Pending(upload, model_ref, client_ref, organisation)
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
            try:
                self._admit(group)
            except BaseException as exc:  # every waiting request answers with it (e.g. 503), none hangs
                log.warning("could not admit %d submissions: %s", len(group), exc)
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_exception(exc)

    def _admit(self, group: list[_Pending]) -> None:
        with self.database.session() as session:
            models: dict[str, tuple[str, int | None] | XrayqError] = {}
            for ref in {pending.model_ref for pending in group}:
                try:
                    models[ref] = check_model_available(session, ref)
                except XrayqError as error:
                    models[ref] = error
            admitted: list[tuple[_Pending, Job]] = []
            to_store: list[tuple[str, bytes, str]] = []
            for pending in group:
                model = models[pending.model_ref]
                if isinstance(model, XrayqError):
                    pending.done.set_exception(model)
                    continue
                jobs, stored = new_jobs(
                    [pending.upload],
                    model_name=model[0],
                    model_version=model[1],
                    batch_id=None,
                    client_ref=pending.client_ref,
                    organisation=pending.organisation,
                )
                admitted.append((pending, jobs[0]))
                to_store += stored
            if not admitted:
                return
            # Inputs first: a committed row always finds its bytes.
            put_all(self.store, to_store)
            session.add_all([job for _, job in admitted])
        publish_jobs(self.celery, [job.id for _, job in admitted], self.settings.predict_chunk_size)
        for pending, job in admitted:
            pending.done.set_result(job)
