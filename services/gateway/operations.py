"""The Operations page's numbers, read from the registry `/metrics` serves: one bookkeeping, not two.

Counts come as Prometheus would scrape them (the state collector's gauges are read from the database
and the broker at that moment; the request counters and latency histograms are summed over every
process of this gateway).
Rates are left to the reader, as Prometheus leaves them to `rate()`: the page takes two snapshots.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample

QUANTILES = (0.5, 0.9, 0.99)
FINISHED = ("succeeded", "failed", "cancelled")


def operations_snapshot(registry: CollectorRegistry, *, top_routes: int = 10) -> dict[str, Any]:
    samples: dict[str, list[Sample]] = defaultdict(list)
    for family in registry.collect():
        for sample in family.samples:
            samples[sample.name].append(sample)

    jobs: dict[str, float] = defaultdict(float)
    for sample in samples["xrayq_jobs"]:
        jobs[sample.labels["status"]] += sample.value
    succeeded, failed = jobs.get("succeeded", 0.0), jobs.get("failed", 0.0)
    requests = samples["xrayq_http_requests_total"]
    answered = sum(sample.value for sample in requests)
    server_errors = sum(sample.value for sample in requests if sample.labels["status"].startswith("5"))
    return {
        "jobs_by_status": dict(jobs),
        "jobs_finished": sum(jobs.get(status, 0.0) for status in FINISHED),
        "job_error_rate": failed / (succeeded + failed) if succeeded + failed else None,
        "jobs_submitted": _by_label(samples["xrayq_jobs_submitted_total"], "kind"),
        "http_requests": answered,
        "http_error_rate": server_errors / answered if answered else None,
        "latency": _latencies(samples["xrayq_http_request_duration_seconds_bucket"])[:top_routes],
        "queue_depths": _by_label(samples["xrayq_queue_depth"], "queue"),
        "workers": _by_label(samples["xrayq_workers"], "queue"),
        "active_versions": [
            {"model": s.labels["model"], "version": int(s.labels["version"]), "architecture": s.labels["architecture"]}
            for s in samples["xrayq_model_active_info"]
        ],
    }


def _by_label(samples: Iterable[Sample], label: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for sample in samples:
        totals[sample.labels[label]] += sample.value
    return dict(totals)


def _latencies(buckets: Iterable[Sample]) -> list[dict[str, Any]]:
    """Per route, the seconds under which 50, 90 and 99% of its requests were answered, busiest first."""
    by_route: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for sample in buckets:
        by_route[(sample.labels["method"], sample.labels["route"])].append((float(sample.labels["le"]), sample.value))
    rows = []
    for (method, route), cumulative in by_route.items():
        cumulative.sort()
        count = cumulative[-1][1]
        if count:
            quantiles = {f"p{round(q * 100)}": histogram_quantile(q, cumulative) for q in QUANTILES}
            rows.append({"method": method, "route": route, "count": count, **quantiles})
    return sorted(rows, key=lambda row: -row["count"])


def histogram_quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """Prometheus's `histogram_quantile`: linear within the bucket the rank falls in; the largest finite
    bound when it falls in the +Inf bucket. `cumulative`: (upper bound, count up to it), ascending."""
    total = cumulative[-1][1]
    if not total:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound
