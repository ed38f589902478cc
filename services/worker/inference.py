"""Running prediction jobs: claim them, fetch and decode inputs, one forward pass per model, write results.

Delivery is at-least-once (late acks), so every step is safe to repeat: a job already finished is
skipped, and a result is written only to a job that is not yet terminal.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch
from sqlalchemy import select, update

from shared.artifacts import LoadedModel, load_model
from shared.db.models import TERMINAL_STATUSES, Job, JobStatus, as_utc, utcnow
from shared.db.session import Database
from shared.errors import XrayqError
from shared.imaging import ImageLimits, decode_image
from shared.preprocess import preprocess
from shared.registry import resolve_version
from shared.settings import Settings
from shared.storage import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

_NOT_TERMINAL = Job.status.not_in([s.value for s in TERMINAL_STATUSES])


class ModelCache:
    """A few loaded model versions, least recently used evicted first; keyed by version id."""

    def __init__(self, store: ObjectStore, device: torch.device, size: int = 3) -> None:
        self.store = store
        self.device = device
        self.size = size
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    def get(self, row: Any) -> LoadedModel:
        model = self._models.get(row.id)
        if model is None:
            started = time.monotonic()
            model = load_model(row, self.store, self.device)
            log.info(
                "loaded model %s@%s on %s in %.2fs", row.name, row.version, self.device, time.monotonic() - started
            )
            self._models[row.id] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        self._models.move_to_end(row.id)
        return model


@dataclass
class Claimed:
    id: str
    input_key: str | None
    model_name: str
    model_version_requested: int | None
    created_at: datetime
    timings: dict[str, float] = field(default_factory=dict)
    tensor: torch.Tensor | None = None


class Predictor:
    """Everything one worker process needs to run prediction tasks."""

    def __init__(self, settings: Settings, db: Database, store: ObjectStore, cache: ModelCache) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.cache = cache
        self.limits = ImageLimits(max_pixels=settings.max_image_pixels, min_side=settings.min_image_side)
        self.fetch_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fetch")

    def run(self, job_ids: list[str]) -> dict[str, int]:
        claimed = self._claim(job_ids)
        if not claimed:
            return {"claimed": 0}
        self._load_inputs(claimed)
        ready = [job for job in claimed if job.tensor is not None]
        groups: dict[tuple[str, int | None], list[Claimed]] = defaultdict(list)
        for job in ready:
            groups[(job.model_name, job.model_version_requested)].append(job)
        for (name, version), jobs in groups.items():
            self._infer(name, version, jobs)
        return {"claimed": len(claimed)}

    def _claim(self, job_ids: list[str]) -> list[Claimed]:
        """Mark the not-yet-finished jobs running and count the attempt; fail those out of attempts."""
        now = utcnow()
        with self.db.session() as session:
            jobs = session.scalars(select(Job).where(Job.id.in_(job_ids), _NOT_TERMINAL)).all()
            claimed = []
            for job in jobs:
                job.attempts += 1
                if job.attempts > self.settings.max_attempts:
                    # A message that keeps killing its worker must not loop forever.
                    job.status = JobStatus.failed
                    job.error_code = "too_many_attempts"
                    job.error_detail = f"Gave up after {self.settings.max_attempts} attempts."
                    job.finished_at = now
                    continue
                job.status = JobStatus.running
                job.started_at = job.started_at or now
                created = as_utc(job.created_at)
                claimed.append(
                    Claimed(
                        job.id,
                        job.input_key,
                        job.model_name,
                        job.model_version_requested,
                        created,
                        {"queue_ms": round((now - created).total_seconds() * 1000, 2)},
                    )
                )
        return claimed

    def _load_inputs(self, jobs: list[Claimed]) -> None:
        """Fetch concurrently (storage is I/O bound), decode and preprocess; a bad input fails alone."""

        def fetch(job: Claimed) -> bytes | XrayqError:
            try:
                if job.input_key is None:
                    raise ObjectNotFound("no input key")
                return self.store.get(job.input_key)
            except ObjectNotFound:
                return XrayqError("input_missing", "The job's input is no longer in storage.")

        fetch_start = time.monotonic()
        payloads = list(self.fetch_pool.map(fetch, jobs))
        fetch_ms = (time.monotonic() - fetch_start) * 1000
        for job, payload in zip(jobs, payloads, strict=True):
            job.timings["fetch_ms"] = round(fetch_ms, 2)
            if isinstance(payload, XrayqError):
                self._fail(job.id, payload)
                continue
            started = time.monotonic()
            try:
                job.tensor = self._prepare(job, payload)
            except XrayqError as error:
                self._fail(job.id, error)
                continue
            job.timings["preprocess_ms"] = round((time.monotonic() - started) * 1000, 2)

    def _prepare(self, job: Claimed, payload: bytes) -> torch.Tensor:
        array = decode_image(payload, self.limits)
        model = self._model_for(job.model_name, job.model_version_requested)
        return preprocess(array, model.spec)

    def _model_for(self, name: str, version: int | None) -> LoadedModel:
        # Resolved per task, not cached: a newly promoted version is picked up by the next task.
        with self.db.session() as session:
            row = resolve_version(session, name, version)
            session.expunge(row)
        return self.cache.get(row)

    def _infer(self, name: str, version: int | None, jobs: list[Claimed]) -> None:
        try:
            model = self._model_for(name, version)
            started = time.monotonic()
            with torch.inference_mode():
                batch = torch.stack([job.tensor for job in jobs if job.tensor is not None]).to(model.device)
                probabilities = torch.softmax(model.module(batch).float(), dim=1).cpu().tolist()
            inference_ms = (time.monotonic() - started) * 1000
        except XrayqError as error:
            for job in jobs:
                self._fail(job.id, error)
            return
        except Exception as exc:  # a broken forward pass fails these jobs, never the process
            log.exception("inference failed for %d jobs of %s", len(jobs), name)
            for job in jobs:
                self._fail(job.id, XrayqError("inference_failed", f"The model failed: {type(exc).__name__}"))
            return
        finished = utcnow()
        with self.db.session() as session:
            for job, probs in zip(jobs, probabilities, strict=True):
                best = max(range(len(probs)), key=probs.__getitem__)
                timings = {
                    **job.timings,
                    "inference_ms": round(inference_ms, 2),
                    "batch_size": len(jobs),
                    "total_ms": round((finished - job.created_at).total_seconds() * 1000, 2),
                }
                session.execute(
                    update(Job)
                    .where(Job.id == job.id, _NOT_TERMINAL)
                    .values(
                        status=JobStatus.succeeded,
                        label=model.classes[best],
                        probabilities={c: round(p, 6) for c, p in zip(model.classes, probs, strict=True)},
                        model_version_id=model.id,
                        timings=timings,
                        finished_at=finished,
                    )
                )

    def _fail(self, job_id: str, error: XrayqError) -> None:
        with self.db.session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, _NOT_TERMINAL)
                .values(status=JobStatus.failed, error_code=error.code, error_detail=error.detail, finished_at=utcnow())
            )
