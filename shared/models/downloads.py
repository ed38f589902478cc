"""Who took which version's files out of the registry: each download of weights or a card is a row.

The owner of a model and admins see every download of it; any other organisation that may use the
model sees its own downloads only (who else took a model is the owner's business).
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import ModelDownload, ModelVersion, as_utc
from shared.schemas import ModelDownloadView

DownloadedFile = Literal["weights", "card"]


def record_download(
    session: Session, row: ModelVersion, file: DownloadedFile, *, api_key_id: str | None, organisation: str | None
) -> None:
    session.add(
        ModelDownload(
            name=row.name,
            version=row.version,
            model_version_id=row.id,
            file=file,
            api_key_id=api_key_id,
            organisation=organisation,
        )
    )


def download_history(
    session: Session, name: str, *, everyone: bool, organisation: str | None, limit: int = 100
) -> list[ModelDownloadView]:
    """Newest first. `everyone`: the reader manages the model; else only `organisation`'s own downloads."""
    query = select(ModelDownload).where(ModelDownload.name == name)
    if not everyone:
        query = query.where(ModelDownload.organisation == organisation)
    rows = session.scalars(query.order_by(ModelDownload.id.desc()).limit(limit))
    return [
        ModelDownloadView(
            name=row.name,
            version=row.version,
            file=row.file,  # type: ignore[arg-type]
            api_key_id=row.api_key_id,
            organisation=row.organisation,
            created_at=as_utc(row.created_at),
        )
        for row in rows
    ]
