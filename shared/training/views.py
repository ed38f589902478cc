"""Training rows as the API shows them."""

from __future__ import annotations

from shared.db.models import Dataset, as_utc
from shared.schemas import DatasetView


def dataset_view(row: Dataset) -> DatasetView:
    return DatasetView(
        id=row.id,
        name=row.name,
        version=row.version,
        parent_id=row.parent_id,
        classes=list(row.classes),
        counts=row.counts,
        files=row.files,
        size_bytes=row.size_bytes,
        manifest_sha256=row.manifest_sha256,
        details=row.details,
        created_at=as_utc(row.created_at),
    )
