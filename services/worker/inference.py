"""Running prediction jobs: claim them, fetch and decode inputs, one forward pass per model, write results.

Delivery is at-least-once (late acks), so every step is safe to repeat: a job already finished is
skipped, and a result is written only to a job that is not yet terminal.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import torch
from sqlalchemy import Table, bindparam, func, or_, select, update

from services.worker import metrics
from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectNotFound, ObjectStore
from shared.db.models import Job, JobStatus, as_utc, utcnow
from shared.db.session import Database
from shared.imaging.decode import ImageLimits, open_image
from shared.imaging.dicom import suitability_warnings
from shared.imaging.preprocess import normalize, to_model_pixels
from shared.models.artifacts import LoadedModel, load_model
from shared.models.registry import resolve_version

log = logging.getLogger(__name__)

# "Not yet finished", spelled as equalities rather than NOT IN: executemany refuses expanding lists.
_NOT_TERMINAL = or_(*(Job.status == status for status in JobStatus if not status.terminal))
_CLAIMED_COLUMNS = (
    Job.id,
    Job.input_key,
    Job.model_name,
    Job.model_version_requested,
    Job.created_at,
    Job.dicom,
    Job.attempts,
)


class ModelCache:
    """A few loaded model versions, least recently used evicted first; keyed by version id."""

    def __init__(
        self, store: ObjectStore, device: torch.device, size: int = 3, warm_batch_sizes: Sequence[int] = (1,)
    ) -> None:
        self.store = store
        self.device = device
        self.size = size
        self.warm_batch_sizes = tuple(warm_batch_sizes)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    def get(self, row: Any) -> LoadedModel:
        model = self._models.get(row.id)
        if model is None:
            started = time.monotonic()
            model = load_model(row, self.store, self.device)
            warm_up(model, self.warm_batch_sizes)
            log.info(
                "loaded model %s@%s on %s in %.2fs", row.name, row.version, self.device, time.monotonic() - started
            )
            self._models[row.id] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        self._models.move_to_end(row.id)
        return model


def warm_up(model: LoadedModel, batch_sizes: Sequence[int]) -> None:
    """One forward pass per batch size as the model is loaded: the first passes pay for lazy set-up
    (on CUDA kernel loading, cuDNN handles and plans: 0.5 s for the first chunk on an H100; on a CPU
    oneDNN's primitives), which would otherwise land in the first jobs' inference_ms."""
    with torch.inference_mode():
        for size in batch_sizes:
            x = torch.zeros(size, 3, model.spec.size, model.spec.size, device=model.device)
            torch.softmax(model.module(x).float(), dim=1).cpu()


@dataclass
class Claimed:
    id: str
    input_key: str | None
    model_name: str
    model_version_requested: int | None
    created_at: datetime
    timings: dict[str, float] = field(default_factory=dict)
    dicom: dict[str, str] | None = None
    pixels: torch.Tensor | None = None  # uint8, the model's size and colour


class Predictor:
    """Everything one worker process needs to run prediction tasks."""

    def __init__(self, settings: Settings, db: Database, store: ObjectStore, cache: ModelCache) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.cache = cache
        self.limits = ImageLimits(max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="prepare")

    def run(self, job_ids: list[str]) -> dict[str, int]:
        started = time.monotonic()
        try:
            return self._run(job_ids)
        finally:
            metrics.BUSY.inc(time.monotonic() - started)

    def _run(self, job_ids: list[str]) -> dict[str, int]:
        claimed, versions = self._claim(job_ids)
        for job in claimed:
            metrics.QUEUE_WAIT.observe(job.timings["queue_ms"] / 1000)
        groups: dict[tuple[str, int | None], list[Claimed]] = defaultdict(list)
        for job in claimed:
            groups[(job.model_name, job.model_version_requested)].append(job)
        for key, jobs in groups.items():
            version = versions[key]
            if isinstance(version, XrayqError):
                self._write(failures=[(job, version) for job in jobs])
                continue
            self._run_group(self.cache.get(version), jobs)
        return {"claimed": len(claimed)}

    def _claim(self, job_ids: list[str]) -> tuple[list[Claimed], dict[tuple[str, int | None], Any]]:
        """Mark the message's unfinished jobs running and count the attempt; fail those out of attempts.
        Also returns, per (model, requested version) of the claimed jobs, the version row that answers
        them (or the XrayqError saying why none can).

        A message shorter than a chunk also takes single jobs that are still waiting (dynamic batching):
        under load one forward pass then serves many single-image clients, and their own messages,
        arriving later, find them finished and do nothing.

        Each claim is one UPDATE ... RETURNING, so the write lock is taken by the statement that reads:
        two worker processes never claim the same waiting job (Postgres: SKIP LOCKED; SQLite: one
        writer at a time, with no read-then-write window in between).
        """
        now = utcnow()
        table = cast(Table, Job.__table__)
        claim = (
            update(table)
            .values(
                attempts=table.c.attempts + 1,
                status=JobStatus.running,
                started_at=func.coalesce(table.c.started_at, now),
            )
            .returning(*_CLAIMED_COLUMNS)
        )
        with self.db.session() as session:
            connection = session.connection()
            rows = list(connection.execute(claim.where(table.c.id.in_(job_ids), _NOT_TERMINAL)))
            room = self.settings.predict_chunk_size - len(rows)
            if self.settings.coalesce_singles and room > 0:
                waiting = (
                    select(table.c.id)
                    .where(table.c.status == JobStatus.queued, table.c.batch_id.is_(None), table.c.id.not_in(job_ids))
                    .order_by(table.c.created_at)
                    .limit(room)
                )
                if connection.dialect.name == "postgresql":
                    waiting = waiting.with_for_update(skip_locked=True)
                rows += connection.execute(claim.where(table.c.id.in_(waiting.scalar_subquery())))
            # A message that keeps killing its worker must not loop forever.
            exhausted = [row.id for row in rows if row.attempts > self.settings.max_attempts]
            if exhausted:
                connection.execute(
                    update(table)
                    .where(table.c.id.in_(exhausted))
                    .values(
                        status=JobStatus.failed,
                        error_code="too_many_attempts",
                        error_detail=f"Gave up after {self.settings.max_attempts} attempts.",
                        finished_at=now,
                    )
                )
            # Resolved per message, in the claim's transaction, never cached: a newly activated
            # version serves from the next message on.
            versions: dict[tuple[str, int | None], Any] = {}
            for row in rows:
                key = (row.model_name, row.model_version_requested)
                if key not in versions:
                    try:
                        versions[key] = resolve_version(session, *key)
                        session.expunge(versions[key])
                    except XrayqError as error:
                        versions[key] = error
        claimed = []
        for row in rows:
            if row.attempts > self.settings.max_attempts:
                continue
            created = as_utc(row.created_at)
            claimed.append(
                Claimed(
                    row.id,
                    row.input_key,
                    row.model_name,
                    row.model_version_requested,
                    created,
                    {"queue_ms": _ms_since(created, now)},
                    row.dicom,
                )
            )
        return claimed, versions

    def _run_group(self, model: LoadedModel, jobs: list[Claimed]) -> None:
        """Fetch, decode and preprocess concurrently (I/O, and decoders that release the GIL), then one
        forward pass; a bad input fails alone."""
        prepared = list(self.pool.map(lambda job: self._prepare(job, model), jobs))
        failures = [(job, error) for job, error in zip(jobs, prepared, strict=True) if error is not None]
        ready = [job for job, error in zip(jobs, prepared, strict=True) if error is None]
        if not ready:
            self._write(failures=failures)
            return
        try:
            started = time.monotonic()
            with torch.inference_mode():
                pixels = torch.stack([job.pixels for job in ready if job.pixels is not None])
                batch = normalize(pixels, model.spec).to(model.device)  # once per chunk, not per image
                probabilities = torch.softmax(model.module(batch).float(), dim=1).cpu().tolist()
            inference_ms = (time.monotonic() - started) * 1000
        except Exception as exc:  # a broken forward pass fails these jobs, never the process
            log.exception("inference failed for %d jobs of %s@%s", len(ready), model.name, model.version)
            error = XrayqError("inference_failed", f"The model failed: {type(exc).__name__}")
            self._write(failures=[*failures, *((job, error) for job in ready)])
            return
        for job in ready:
            job.timings["inference_ms"] = round(inference_ms, 2)
            job.timings["batch_size"] = len(ready)
        metrics.INFERENCE.labels(model.name).observe(inference_ms / 1000)
        metrics.BATCH_SIZE.labels(model.name).observe(len(ready))
        self._write(successes=list(zip(ready, probabilities, strict=True)), model=model, failures=failures)

    def _prepare(self, job: Claimed, model: LoadedModel) -> XrayqError | None:
        started = time.monotonic()
        try:
            if job.input_key is None:
                raise ObjectNotFound("no input key")
            payload = self.store.get(job.input_key)
        except ObjectNotFound:
            return XrayqError("input_missing", "The job's input is no longer in storage.")
        fetched = time.monotonic()
        try:
            job.pixels = to_model_pixels(open_image(payload, self.limits), model.spec)
        except XrayqError as error:
            return error
        job.timings["fetch_ms"] = round((fetched - started) * 1000, 2)
        job.timings["preprocess_ms"] = round((time.monotonic() - fetched) * 1000, 2)
        metrics.PREPROCESS.observe(time.monotonic() - started)
        return None

    def _write(
        self,
        *,
        successes: Sequence[tuple[Claimed, list[float]]] = (),
        model: LoadedModel | None = None,
        failures: Sequence[tuple[Claimed, XrayqError]] = (),
    ) -> None:
        """All outcomes of a chunk in one transaction, each written only to a job not yet finished."""
        finished = utcnow()
        rows = []
        for job, probs in successes:
            assert model is not None
            best = max(range(len(probs)), key=probs.__getitem__)
            rows.append(
                {
                    "job_id": job.id,
                    "new_status": JobStatus.succeeded,
                    "new_label": model.classes[best],
                    "new_probabilities": {c: round(p, 6) for c, p in zip(model.classes, probs, strict=True)},
                    "new_model_version_id": model.id,
                    "new_warnings": suitability_warnings(job.dicom, model.intended_use) or None,
                    "new_error_code": None,
                    "new_error_detail": None,
                    "new_timings": {**job.timings, "total_ms": _ms_since(job.created_at, finished)},
                }
            )
        for job, error in failures:
            rows.append(
                {
                    "job_id": job.id,
                    "new_status": JobStatus.failed,
                    "new_label": None,
                    "new_probabilities": None,
                    "new_model_version_id": None,
                    "new_warnings": None,
                    "new_error_code": error.code,
                    "new_error_detail": error.detail,
                    "new_timings": {**job.timings, "total_ms": _ms_since(job.created_at, finished)},
                }
            )
        if not rows:
            return
        name = model.name if model is not None else "unknown"
        for job, _ in successes:
            metrics.JOBS_FINISHED.labels(name, "succeeded").inc()
            metrics.END_TO_END.labels(name).observe(_ms_since(job.created_at, finished) / 1000)
        for job, _ in failures:
            metrics.JOBS_FINISHED.labels(job.model_name, "failed").inc()
        table = cast(Table, Job.__table__)
        statement = (
            update(table)
            .where(
                table.c.id == bindparam("job_id"),
                _NOT_TERMINAL,
            )
            .values(
                status=bindparam("new_status"),
                label=bindparam("new_label"),
                probabilities=bindparam("new_probabilities"),
                model_version_id=bindparam("new_model_version_id"),
                error_code=bindparam("new_error_code"),
                error_detail=bindparam("new_error_detail"),
                timings=bindparam("new_timings"),
                warnings=bindparam("new_warnings"),
                finished_at=finished,
            )
        )
        with self.db.session() as session:
            session.connection().execute(statement, rows)  # one executemany round trip


def _ms_since(start: datetime, end: datetime) -> float:
    return round((end - start).total_seconds() * 1000, 2)
