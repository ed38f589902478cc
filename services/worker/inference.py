"""Running prediction jobs: claim them, fetch and decode inputs, one forward pass per model, write results.

Delivery is at-least-once (late acks), so every step is safe to repeat: a job already finished is
skipped, and a result is written only to a job that is not yet terminal. Every change of a job's state
is made by `shared.jobs.lifecycle`; this module holds the model work between claim and result.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from services.worker import metrics
from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectNotFound, ObjectStore
from shared.db.models import utcnow
from shared.db.session import Database
from shared.imaging.decode import open_image
from shared.imaging.dicom import suitability_warnings
from shared.imaging.preprocess import normalize, to_model_pixels
from shared.intake.images import image_limits
from shared.jobs.lifecycle import ClaimedJob, Prediction, claim_jobs, ms_since, record_outcomes
from shared.models.artifacts import LoadedModel, load_model

log = logging.getLogger(__name__)


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


class Predictor:
    """Everything one worker process needs to run prediction tasks."""

    def __init__(self, settings: Settings, db: Database, store: ObjectStore, cache: ModelCache) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.cache = cache
        self.limits = image_limits(settings)  # the limits intake checked the input against
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="prepare")

    def run(self, job_ids: list[str]) -> dict[str, int]:
        started = time.monotonic()
        try:
            return self._run(job_ids)
        finally:
            metrics.BUSY.inc(time.monotonic() - started)

    def _run(self, job_ids: list[str]) -> dict[str, int]:
        with self.db.session() as session:
            claim = claim_jobs(session, job_ids, self.settings)
        for job in claim.jobs:
            metrics.QUEUE_WAIT.observe(job.timings["queue_ms"] / 1000)
        groups: dict[tuple[str, int | None], list[ClaimedJob]] = defaultdict(list)
        for job in claim.jobs:
            groups[(job.model_name, job.model_version_requested)].append(job)
        for key, jobs in groups.items():
            version = claim.versions[key]
            if isinstance(version, XrayqError):
                self._write(failures=[(job, version) for job in jobs])
                continue
            self._run_group(self.cache.get(version), jobs)
        return {"claimed": len(claim.jobs)}

    def _run_group(self, model: LoadedModel, jobs: list[ClaimedJob]) -> None:
        """Fetch, decode and preprocess concurrently (I/O, and decoders that release the GIL), then one
        forward pass; a bad input fails alone."""
        prepared = list(self.pool.map(lambda job: self._prepare(job, model), jobs))
        failures = [(job, out) for job, out in zip(jobs, prepared, strict=True) if isinstance(out, XrayqError)]
        ready = [(job, out) for job, out in zip(jobs, prepared, strict=True) if not isinstance(out, XrayqError)]
        if not ready:
            self._write(failures=failures)
            return
        try:
            started = time.monotonic()
            with torch.inference_mode():
                pixels = torch.stack([image for _, image in ready])
                batch = normalize(pixels, model.spec).to(model.device)  # once per chunk, not per image
                probabilities = torch.softmax(model.module(batch).float(), dim=1).cpu().tolist()
            inference_ms = (time.monotonic() - started) * 1000
        except Exception as exc:  # a broken forward pass fails these jobs, never the process
            log.exception("inference failed for %d jobs of %s@%s", len(ready), model.name, model.version)
            error = XrayqError("inference_failed", f"The model failed: {type(exc).__name__}")
            self._write(failures=[*failures, *((job, error) for job, _ in ready)])
            return
        predictions = []
        for (job, _), probs in zip(ready, probabilities, strict=True):
            job.timings["inference_ms"] = round(inference_ms, 2)
            job.timings["batch_size"] = len(ready)
            predictions.append(prediction_for(job, model, probs))
        metrics.INFERENCE.labels(model.name).observe(inference_ms / 1000)
        metrics.BATCH_SIZE.labels(model.name).observe(len(ready))
        self._write(predictions=predictions, failures=failures)

    def _prepare(self, job: ClaimedJob, model: LoadedModel) -> torch.Tensor | XrayqError:
        """The job's input as the model's pixels (uint8, its size and colour), or why it cannot be."""
        started = time.monotonic()
        try:
            if job.input_key is None:
                raise ObjectNotFound("no input key")
            payload = self.store.get(job.input_key)
        except ObjectNotFound:
            return XrayqError("input_missing", "The job's input is no longer in storage.")
        fetched = time.monotonic()
        try:
            pixels = to_model_pixels(open_image(payload, self.limits), model.spec)
        except XrayqError as error:
            return error
        job.timings["fetch_ms"] = round((fetched - started) * 1000, 2)
        job.timings["preprocess_ms"] = round((time.monotonic() - fetched) * 1000, 2)
        metrics.PREPROCESS.observe(time.monotonic() - started)
        return pixels

    def _write(
        self,
        *,
        predictions: Sequence[Prediction] = (),
        failures: Sequence[tuple[ClaimedJob, XrayqError]] = (),
    ) -> None:
        """All outcomes of a chunk in one transaction (see `record_outcomes`)."""
        if not predictions and not failures:
            return
        finished = utcnow()
        for prediction in predictions:
            model_name = prediction.job.model_name
            metrics.JOBS_FINISHED.labels(model_name, "succeeded").inc()
            metrics.END_TO_END.labels(model_name).observe(ms_since(prediction.job.created_at, finished) / 1000)
        for job, _ in failures:
            metrics.JOBS_FINISHED.labels(job.model_name, "failed").inc()
        with self.db.session() as session:
            record_outcomes(session, predictions=predictions, failures=failures)


def prediction_for(job: ClaimedJob, model: LoadedModel, probabilities: list[float]) -> Prediction:
    """The answer for one job: the most probable class, every class's probability, and why the model
    may not suit this input (from the DICOM tags and the model's intended use)."""
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return Prediction(
        job,
        label=model.classes[best],
        probabilities={c: round(p, 6) for c, p in zip(model.classes, probabilities, strict=True)},
        model_version_id=model.id,
        warnings=suitability_warnings(job.dicom, model.intended_use) or None,
    )
