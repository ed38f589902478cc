"""Running prediction jobs: claim them, fetch and decode inputs, one forward pass per model, write results.

Delivery is at-least-once (late acks), so every step is safe to repeat: a job already finished is
skipped, and a result is written only to a job that is not yet terminal. Every change of a job's state
is made by `shared.jobs.lifecycle`; this module holds the model work between claim and result.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from PIL import Image
from sqlalchemy.exc import SQLAlchemyError

from services.worker import metrics
from services.worker.explaining import Explainer, ToExplain
from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectNotFound, ObjectStore
from shared.db.models import utcnow
from shared.db.session import Database
from shared.imaging.decode import open_image
from shared.imaging.dicom import suitability_warnings
from shared.imaging.preprocess import normalize, to_model_pixels
from shared.imaging.quality import check, measure
from shared.intake.images import image_limits
from shared.jobs.lifecycle import ClaimedJob, Prediction, claim_jobs, ms_since, record_outcomes
from shared.jobs.result_cache import cached_prediction, find_cached
from shared.models.answers import answers
from shared.models.artifacts import LoadedModel, load_model
from shared.models.calibration import card_threshold, uncertain_warning

log = logging.getLogger(__name__)
T = TypeVar("T")


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
            outputs = model.head.forward(x)
            served = answers(model.head, model.card, outputs.logits, outputs.features)  # the head's samples too
            served.probabilities.cpu()


class Predictor:
    """Everything one worker process needs to run prediction tasks."""

    def __init__(self, settings: Settings, db: Database, store: ObjectStore, cache: ModelCache) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.cache = cache
        self.limits = image_limits(settings)  # the limits intake checked the input against
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="prepare")
        self.explainer = Explainer(db, store, cache, self.limits)

    def run(self, job_ids: list[str], *, redelivered: bool = False) -> dict[str, int]:
        """One message's jobs; `redelivered`: the broker gives back a message whose worker died holding it."""
        started = time.monotonic()
        try:
            return self._run(job_ids, redelivered)
        finally:
            metrics.BUSY.inc(time.monotonic() - started)

    def _run(self, job_ids: list[str], redelivered: bool) -> dict[str, int]:
        with self.db.session() as session:
            claim = claim_jobs(session, job_ids, self.settings, redelivered=redelivered)
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
            try:
                model = self.cache.get(version)
            except XrayqError as error:  # e.g. weights that fail their checksum: no retry will help
                self._write(failures=[(job, error) for job in jobs])
                continue
            self._run_group(model, jobs)
        return {"claimed": len(claim.jobs)}

    def _run_group(self, model: LoadedModel, jobs: list[ClaimedJob]) -> None:
        """Answer what the result cache holds; fetch, decode and preprocess the rest concurrently (I/O,
        and decoders that release the GIL), then one forward pass; every step is per image, so a bad
        input fails its own job alone."""
        predictions = self._cached(model, jobs)
        answered = {prediction.job.id for prediction in predictions}
        jobs = [job for job in jobs if job.id not in answered]
        prepared = list(self.pool.map(lambda job: self._prepare(job, model), jobs))
        failures = [(job, out) for job, out in zip(jobs, prepared, strict=True) if isinstance(out, XrayqError)]
        ready = [(job, out) for job, out in zip(jobs, prepared, strict=True) if not isinstance(out, XrayqError)]
        if ready:
            started = time.monotonic()
            outputs, batch_size = self._forward([image.pixels for _, image in ready], model)
            inference_ms = (time.monotonic() - started) * 1000
            for (job, image), output in zip(ready, outputs, strict=True):
                job.timings["inference_ms"] = round(inference_ms, 2)
                job.timings["batch_size"] = batch_size
                outcome = (
                    output if isinstance(output, XrayqError) else _guarded_prediction(job, model, output, image.checks)
                )
                if isinstance(outcome, XrayqError):
                    failures.append((job, outcome))
                else:
                    predictions.append(outcome)
            metrics.INFERENCE.labels(model.name).observe(inference_ms / 1000)
            metrics.BATCH_SIZE.labels(model.name).observe(batch_size)
        self._write(predictions=predictions, failures=failures)
        asked = [prediction for prediction in predictions if prediction.job.explain]
        if asked:  # only then: no hook, no gradient, nothing more for the answers nobody asked to explain
            self._explain(model, asked, {job.id: image.pixels for job, image in ready})

    def _cached(self, model: LoadedModel, jobs: list[ClaimedJob]) -> list[Prediction]:
        """The answers this version already gave the same bytes of the same organisation. A job that
        asked for an explanation is computed: its heatmap needs the pixels. A failed lookup only means
        computing: the cache never fails a job."""
        candidates = [job for job in jobs if not job.explain and job.input_sha256]
        if not self.settings.result_cache or not candidates:
            return []
        try:
            with self.db.session() as session:
                found = find_cached(session, model.id, candidates)
        except SQLAlchemyError:
            log.warning("result cache lookup failed; computing %d answers", len(candidates), exc_info=True)
            return []
        metrics.RESULT_CACHE.labels(model.name, "hit").inc(len(found))
        metrics.RESULT_CACHE.labels(model.name, "miss").inc(len(candidates) - len(found))
        return [cached_prediction(job, model.id, found[job.id]) for job in candidates if job.id in found]

    def _explain(self, model: LoadedModel, asked: list[Prediction], pixels: dict[str, torch.Tensor]) -> None:
        """Explain the answers whose jobs asked for it, on the tensors they came from: after the answers
        are written, so an explanation never delays or fails one."""
        items = [ToExplain(p.job.id, p.job.created_at, pixels[p.job.id], p.label) for p in asked]
        try:
            self.explainer.explain(model, items)
        except Exception:  # e.g. the database refused the record: the explanations stay pending
            log.exception("could not explain %d answers of %s@%s", len(items), model.name, model.version)

    def _forward(self, images: list[torch.Tensor], model: LoadedModel) -> tuple[list[ModelOutput | XrayqError], int]:
        """Each image's class probabilities (or why there are none), and the tensor batch size used.

        One pass for the whole chunk; if that pass fails (an input that breaks an operator, memory
        running out for the batch), one pass per image, so only the culprit fails.
        """
        try:
            return _probabilities(model, images), len(images)
        except Exception as exc:
            if len(images) == 1:
                log.exception("inference failed for one job of %s@%s", model.name, model.version)
                return [_inference_failed(exc)], 1
            log.warning(
                "inference failed for a batch of %d of %s@%s; retrying image by image",
                len(images),
                model.name,
                model.version,
                exc_info=True,
            )
        outputs: list[ModelOutput | XrayqError] = []
        for image in images:
            try:
                outputs.extend(_probabilities(model, [image]))
            except Exception as exc:  # a broken forward pass fails this job, never the process
                log.exception("inference failed for one job of %s@%s", model.name, model.version)
                outputs.append(_inference_failed(exc))
        return outputs, 1

    def _prepare(self, job: ClaimedJob, model: LoadedModel) -> PreparedImage | XrayqError:
        """The job's input as the model's pixels (uint8, its size and colour) with its quality checks,
        or why it cannot be.

        Every step is guarded: whatever one image raises becomes its job's failure with a stable code,
        never an exception that would fail the other jobs of the message.
        """
        started = time.monotonic()
        try:
            payload = _guarded("input_unavailable", "The job's input could not be read", self._fetch, job)
            fetched = time.monotonic()
            image = _guarded("image_unreadable", "The image could not be decoded", open_image, payload, self.limits)
            pixels = _guarded(
                "preprocess_failed", "The image could not be preprocessed", to_model_pixels, image, model.spec
            )
        except XrayqError as error:
            return error
        checks = input_checks(image, model)
        job.timings["fetch_ms"] = round((fetched - started) * 1000, 2)
        job.timings["preprocess_ms"] = round((time.monotonic() - fetched) * 1000, 2)
        metrics.PREPROCESS.observe(time.monotonic() - started)
        return PreparedImage(pixels, checks)

    def _fetch(self, job: ClaimedJob) -> bytes:
        try:
            if job.input_key is None:
                raise ObjectNotFound("no input key")
            payload = self.store.get(job.input_key)
        except ObjectNotFound:
            raise XrayqError("input_missing", "The job's input is no longer in storage.") from None
        verify_input(job, payload)
        return payload

    def _write(
        self,
        *,
        predictions: Sequence[Prediction] = (),
        failures: Sequence[tuple[ClaimedJob, XrayqError]] = (),
    ) -> None:
        """All outcomes of a chunk in one transaction (see `record_outcomes`, which writes job by job
        when the batched write fails)."""
        if not predictions and not failures:
            return
        with self.db.session() as session:
            unwritable = record_outcomes(session, predictions=predictions, failures=failures)
        finished = utcnow()
        for prediction in predictions:
            model_name = prediction.job.model_name
            ok = prediction.job.id not in unwritable
            metrics.JOBS_FINISHED.labels(model_name, "succeeded" if ok else "failed").inc()
            if ok:
                metrics.END_TO_END.labels(model_name).observe(ms_since(prediction.job.created_at, finished) / 1000)
                for warning in prediction.warnings or ():
                    metrics.RESULT_FLAGS.labels(model_name, warning["code"]).inc()
        for job, error in failures:
            metrics.JOBS_FINISHED.labels(job.model_name, "failed").inc()
            metrics.JOB_FAILURES.labels(job.model_name, error.code).inc()
        _log_outcomes(predictions, failures, unwritable)


def _log_outcomes(
    predictions: Sequence[Prediction], failures: Sequence[tuple[ClaimedJob, XrayqError]], unwritable: set[str]
) -> None:
    """One line per finished job: its ids and outcome, never its answer (a finding about a patient)."""
    outcomes: list[tuple[ClaimedJob, str, str | None]] = [
        (p.job, "failed" if p.job.id in unwritable else "succeeded", None) for p in predictions
    ]
    outcomes += [(job, "failed", error.code) for job, error in failures]
    for job, status, code in outcomes:
        log.info(
            "job %s %s",
            job.id,
            status,
            extra={
                "job_id": job.id,
                "batch_id": job.batch_id,
                "organisation": job.organisation,
                "model": job.model_name,
                "status": status,
                "code": code,
                "duration_ms": job.timings.get("inference_ms"),
            },
        )


def verify_input(job: ClaimedJob, payload: bytes) -> None:
    """The bytes fetched must be the bytes accepted: a changed or damaged object (storage corruption, a
    write by someone else) would otherwise be classified as if it were the patient's image. Rows from
    before intake recorded the sha256 carry none and are not checked."""
    if job.input_sha256 is None:
        return
    found = hashlib.sha256(payload).hexdigest()
    if found != job.input_sha256:
        # The digests and the key only: never the bytes.
        log.warning(
            "input of job %s does not match its sha256 (key %s, %d bytes, expected %s, found %s)",
            job.id,
            job.input_key,
            len(payload),
            job.input_sha256,
            found,
        )
        raise XrayqError("input_corrupted", "The job's input in storage differs from the one accepted.")


def _guarded(code: str, what: str, step: Callable[..., T], *args: Any) -> T:
    """One per-image step: its own XrayqError passes through; anything else it raises (a decoder's
    ValueError, a LUT that cannot be applied, MemoryError) becomes `code`, for this job alone."""
    try:
        return step(*args)
    except XrayqError:
        raise
    except Exception as exc:
        log.warning("%s: %s", what, type(exc).__name__, exc_info=True)
        raise XrayqError(code, f"{what}: {type(exc).__name__}: {exc}"[:500]) from None


@dataclass
class ModelOutput:
    """One image's forward pass: its class probabilities and the features its head saw."""

    probabilities: list[float]  # calibrated when `calibrated`
    features: torch.Tensor  # 1-D, on the CPU
    calibrated: bool = False
    uncertainty: float | None = None  # see shared.models.answers


def _probabilities(model: LoadedModel, images: list[torch.Tensor]) -> list[ModelOutput | XrayqError]:
    with torch.inference_mode():
        batch = normalize(torch.stack(images), model.spec).to(model.device)  # once per chunk, not per image
        outputs = model.head.forward(batch)
        served = answers(model.head, model.card, outputs.logits, outputs.features)
        rows = served.probabilities.cpu().tolist()
        uncertainties = served.uncertainty.cpu().tolist() if served.uncertainty is not None else [None] * len(rows)
        features = outputs.features.cpu()
    return [
        ModelOutput(row, features[i], served.calibrated, uncertainty)
        if all(math.isfinite(p) for p in row) and (uncertainty is None or math.isfinite(uncertainty))
        else XrayqError("inference_failed", "The model gave no finite answer.")
        for i, (row, uncertainty) in enumerate(zip(rows, uncertainties, strict=True))
    ]


def _inference_failed(exc: Exception) -> XrayqError:
    return XrayqError("inference_failed", f"The model failed: {type(exc).__name__}")


def _guarded_prediction(
    job: ClaimedJob, model: LoadedModel, output: ModelOutput, checks: InputChecks
) -> Prediction | XrayqError:
    try:
        return prediction_for(job, model, output, checks)
    except Exception as exc:
        log.exception("could not build the result of job %s", job.id)
        return XrayqError("inference_failed", f"The result could not be built: {type(exc).__name__}")


def prediction_for(
    job: ClaimedJob, model: LoadedModel, output: ModelOutput, checks: InputChecks | None = None
) -> Prediction:
    """The answer for one job: the most probable class, every class's probability, how sure it is, and
    why the model may not suit this input or answer: the DICOM tags against the model's intended use,
    the input's quality (`checks`), whether the model has seen images like it (`distribution_warnings`),
    and an uncertainty above the version's threshold."""
    checks = checks or InputChecks()
    probabilities = output.probabilities
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    warnings = [
        *suitability_warnings(job.dicom, model.intended_use),
        *checks.flags,
        *distribution_warnings(model, output, checks.chroma),
    ]
    threshold = card_threshold(model.card)
    uncertain = None
    if output.uncertainty is not None and threshold is not None:
        uncertain = output.uncertainty > threshold
        if uncertain:
            warnings.append(uncertain_warning(output.uncertainty, threshold))
    return Prediction(
        job,
        label=model.classes[best],
        probabilities={c: round(p, 6) for c, p in zip(model.classes, probabilities, strict=True)},
        model_version_id=model.id,
        warnings=warnings or None,
        confidence=round(probabilities[best], 6),
        calibrated=output.calibrated,
        uncertainty=round(output.uncertainty, 6) if output.uncertainty is not None else None,
        uncertain=uncertain,
    )


@dataclass
class InputChecks:
    """What the input-quality checks found in one decoded image (`shared.imaging.quality`)."""

    flags: list[dict[str, str]] = field(default_factory=list)
    chroma: float | None = None  # its colourfulness, for the out-of-distribution check; None: not measured


@dataclass
class PreparedImage:
    pixels: torch.Tensor
    checks: InputChecks


def input_checks(image: Image.Image, model: LoadedModel) -> InputChecks:
    """The quality flags of a decoded image for `model`; a check that fails is logged and skipped,
    never the job's failure."""
    try:
        measured = measure(image, model.ood.template if model.ood is not None else None)
    except Exception:
        log.warning("the input-quality checks failed for an image of %s@%s", model.name, model.version, exc_info=True)
        return InputChecks()
    return InputChecks([flag.as_dict() for flag in check(measured, model.spec.size)], measured.chroma_p90)


def distribution_warnings(model: LoadedModel, output: ModelOutput, chroma: float | None) -> list[dict[str, str]]:
    """`out_of_distribution` when the image's features (or colour) are unlike the training set's;
    nothing for a version without a reference (its card's `checks` say why)."""
    if model.ood is None:
        return []
    distance = float(model.ood.distances(output.features.unsqueeze(0))[0])
    flag = model.ood.judge(distance, chroma)
    return [flag.as_dict()] if flag is not None else []
