"""The result cache: the same input bytes, sent again by the same organisation and answered by the same
model version, get the result that version already gave them, without a fetch, decode or forward pass.

PACS resend instances (a re-routed study, a retried push, a second order on the same image); a
version's answer to given bytes never changes, so nothing ever invalidates an entry: the key is the
input's sha256 (computed at intake), the answering version and the organisation. The organisation is
part of the key, never a hint: another tenant's result is never found, even for the same bytes.
The store is the jobs table itself (indexed by sha256 and version), so an entry lives exactly as long
as the job that computed it, and retention removes both together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from shared.db.models import Job, JobStatus
from shared.jobs.lifecycle import ClaimedJob, Prediction


@dataclass(frozen=True)
class CachedAnswer:
    job_id: str
    label: str
    probabilities: dict[str, float]
    warnings: list[dict[str, str]] | None
    confidence: float | None
    calibrated: bool | None
    uncertainty: float | None
    uncertain: bool | None


def _key(organisation: str | None, sha256: str) -> tuple[str | None, str]:
    return organisation, sha256


def find_cached(session: Session, version_id: str, jobs: Sequence[ClaimedJob]) -> dict[str, CachedAnswer]:
    """job id -> the earlier answer of `version_id` to the same bytes of the same organisation, for each
    of `jobs` that has one (one query for the whole chunk). Only computed answers are candidates, so a
    chain of repeats always points at the job that ran the model."""
    wanted = {_key(job.organisation, job.input_sha256) for job in jobs if job.input_sha256}
    if not wanted:
        return {}
    same_owner = or_(
        *(
            and_(
                Job.input_sha256 == sha256,
                Job.organisation.is_(None) if organisation is None else Job.organisation == organisation,
            )
            for organisation, sha256 in wanted
        )
    )
    rows = session.execute(
        select(Job)
        .where(
            Job.model_version_id == version_id,
            Job.status == JobStatus.succeeded,
            Job.cached_from.is_(None),
            Job.label.is_not(None),
            same_owner,
        )
        .order_by(Job.finished_at)
    ).scalars()
    found: dict[tuple[str | None, str], CachedAnswer] = {}
    for row in rows:
        assert row.input_sha256 is not None and row.label is not None
        found.setdefault(
            _key(row.organisation, row.input_sha256),
            CachedAnswer(
                row.id,
                row.label,
                dict(row.probabilities or {}),
                row.warnings,
                row.confidence,
                row.calibrated,
                row.uncertainty,
                row.uncertain,
            ),  # fmt: skip
        )
    return {
        job.id: found[key]
        for job in jobs
        if job.input_sha256 and (key := _key(job.organisation, job.input_sha256)) in found
    }


def cached_prediction(job: ClaimedJob, version_id: str, answer: CachedAnswer) -> Prediction:
    return Prediction(
        job=job,
        label=answer.label,
        probabilities=answer.probabilities,
        model_version_id=version_id,
        warnings=answer.warnings,
        confidence=answer.confidence,
        calibrated=answer.calibrated,
        uncertainty=answer.uncertainty,
        uncertain=answer.uncertain,
        cached_from=answer.job_id,
    )
