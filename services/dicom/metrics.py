"""Prometheus metrics of the DICOM receiver, served on XRAYQ_DICOM_METRICS_PORT (`xrayq dicom`).

Associations by outcome: `accepted`; `rejected` (A-ASSOCIATE-RJ: unknown calling or called AE title,
no acceptable context); `refused` (the connection closed before any association: an address no
allow-list entry names, or past the per-peer or total limits). Instances by outcome: `stored`, or the
error code the refusal's ErrorComment carries (a fixed set of ours, so the labels stay few).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

ASSOCIATIONS = Counter("xrayq_dicom_associations", "DICOM associations requested, by outcome", ["outcome"])
INSTANCES = Counter("xrayq_dicom_instances", "C-STORE instances received, by outcome", ["outcome"])


def association_accepted(_event: Any) -> None:
    ASSOCIATIONS.labels("accepted").inc()


def association_rejected(_event: Any) -> None:
    ASSOCIATIONS.labels("rejected").inc()
