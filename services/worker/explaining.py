"""Explaining answers in the worker: Grad-CAM heatmaps, stored with their job (`shared.jobs.explanations`).

Two ways in. A job whose explanation was pending when it was claimed is explained by the `Predictor`
right after its answer is written, on the very tensor the answer came from. A job asked for one after
its answer gets an `explain` message (`explain_job`): its input is fetched and prepared again, as the
prediction did, and the version that answered it (not whichever is active now) is run.

Either way the answer comes first and stands: a failure to explain is recorded on the explanation, never
on the job.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch

from services.worker import metrics
from shared.core.errors import XrayqError
from shared.core.storage import ObjectNotFound, ObjectStore
from shared.db.models import JobStatus
from shared.db.session import Database
from shared.imaging.decode import ImageLimits, open_image
from shared.imaging.preprocess import to_model_pixels
from shared.jobs.explanations import (
    PendingExplanation,
    explained,
    object_keys,
    pending_explanation,
    record_explanation,
)
from shared.models.artifacts import LoadedModel
from shared.models.explanations import Heatmap, grad_cams, method_of, overlay_png

if TYPE_CHECKING:
    from services.worker.inference import ModelCache

log = logging.getLogger(__name__)


@dataclass
class ToExplain:
    """One answered job to explain: its model pixels (uint8, as the answer saw them) and its answer."""

    job_id: str
    created_at: datetime
    pixels: torch.Tensor
    label: str


class Outcome(StrEnum):
    explained = "explained"  # made, or its failure recorded
    unanswered = "unanswered"  # the job is still queued or running: ask again later
    nothing = "nothing"  # not pending (made already, or never asked), or the job will never be answered


class Explainer:
    def __init__(self, db: Database, store: ObjectStore, cache: ModelCache, limits: ImageLimits) -> None:
        self.db = db
        self.store = store
        self.cache = cache
        self.limits = limits

    def explain(self, model: LoadedModel, items: list[ToExplain]) -> None:
        """Grad-CAM of each answer in one pass (of a few images at a time), stored, then recorded."""
        started = time.monotonic()
        outcomes: list[dict[str, Any] | XrayqError]
        try:
            classes = [model.classes.index(item.label) for item in items]
            heatmaps = grad_cams(model, [item.pixels for item in items], classes)
        except XrayqError as error:  # the version's card names no usable layer: the same for every image
            outcomes = [error] * len(items)
        except Exception as exc:
            log.exception("Grad-CAM failed for %d answers of %s@%s", len(items), model.name, model.version)
            outcomes = [XrayqError("explanation_failed", f"Grad-CAM failed: {type(exc).__name__}")] * len(items)
        else:
            outcomes = [self._stored(model, item, heatmap) for item, heatmap in zip(items, heatmaps, strict=True)]
        metrics.EXPLANATION_SECONDS.labels(model.name).observe(time.monotonic() - started)
        with self.db.session() as session:
            for item, outcome in zip(items, outcomes, strict=True):
                if isinstance(outcome, XrayqError):
                    written = record_explanation(session, item.job_id, error=outcome)
                else:
                    written = record_explanation(session, item.job_id, made=outcome)
                if written:
                    status = outcome.code if isinstance(outcome, XrayqError) else "succeeded"
                    metrics.EXPLANATIONS.labels(model.name, status).inc()

    def _stored(self, model: LoadedModel, item: ToExplain, heatmap: Heatmap) -> dict[str, Any] | XrayqError:
        """The overlay PNG and the raw map put in storage (before the row names them); their record."""
        keys = object_keys(item.job_id, item.created_at)
        method = method_of(heatmap.target)
        text = {"xrayq:model": f"{model.name}@{model.version}", "xrayq:label": item.label, **method}
        try:
            self.store.put(keys[0], overlay_png(item.pixels, heatmap, text), "image/png")
            self.store.put(keys[1], json.dumps(heatmap.document()).encode(), "application/json")
        except Exception as exc:
            log.warning("could not store the explanation of job %s", item.job_id, exc_info=True)
            return XrayqError("explanation_failed", f"The explanation could not be stored: {type(exc).__name__}")
        return explained(
            model_version_id=model.id,
            model=(model.name, model.version),
            label=item.label,
            method=method,
            keys=keys,
            overlay_size=(int(item.pixels.shape[-1]), int(item.pixels.shape[-2])),
        )

    def explain_job(self, job_id: str) -> Outcome:
        """One job's explanation asked for after its answer (an `explain` message)."""
        with self.db.session() as session:
            pending = pending_explanation(session, job_id)
        if pending is None:
            return Outcome.nothing
        if isinstance(pending, JobStatus):
            return Outcome.unanswered
        try:
            model = self.cache.get(pending.version)
            pixels = self._model_pixels(pending, model)
        except Exception as exc:  # the version's weights, the input: recorded, never the job's failure
            error = exc if isinstance(exc, XrayqError) else XrayqError("explanation_failed", type(exc).__name__)
            if error.code != "explanation_failed":  # e.g. model_corrupt: still an explanation that failed
                error = XrayqError("explanation_failed", f"{error.code}: {error.detail}")
            log.warning("could not explain job %s: %s", job_id, error.detail)
            with self.db.session() as session:
                record_explanation(session, job_id, error=error)
            return Outcome.explained
        self.explain(model, [ToExplain(pending.job_id, pending.created_at, pixels, pending.label)])
        return Outcome.explained

    def _model_pixels(self, pending: PendingExplanation, model: LoadedModel) -> torch.Tensor:
        """The job's input as the answer saw it: fetched, decoded and prepared by the same functions."""
        try:
            if pending.input_key is None:
                raise ObjectNotFound("no input key")
            payload = self.store.get(pending.input_key)
        except ObjectNotFound:
            raise XrayqError(
                "explanation_failed", "The job's input is no longer in storage (see XRAYQ_INPUT_RETENTION_DAYS)."
            ) from None
        try:
            return to_model_pixels(open_image(payload, self.limits), model.spec)
        except Exception as exc:
            log.warning("could not prepare the input of job %s to explain it", pending.job_id, exc_info=True)
            raise XrayqError("explanation_failed", f"The input could not be prepared: {type(exc).__name__}") from None
