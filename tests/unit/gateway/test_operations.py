"""The Operations page's percentiles are Prometheus's: checked against a histogram fed known values."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.gateway.operations import histogram_quantile, operations_snapshot


def test_quantiles_interpolate_within_the_bucket_the_rank_falls_in() -> None:
    cumulative = [(0.1, 5.0), (0.5, 10.0), (math.inf, 10.0)]
    assert histogram_quantile(0.5, cumulative) == 0.1
    assert math.isclose(histogram_quantile(0.9, cumulative), 0.42)
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.99, [(1.0, 1.0), (math.inf, 4.0)]) == 1.0  # past the last bound: that bound


def test_a_snapshot_reads_the_registry_it_is_given() -> None:
    registry = CollectorRegistry()
    latency = Histogram(
        "xrayq_http_request_duration_seconds", "", ["method", "route"], buckets=(0.01, 0.1, 1), registry=registry
    )
    requests = Counter("xrayq_http_requests", "", ["method", "route", "status"], registry=registry)
    for seconds in (0.005,) * 8 + (0.05, 0.5):
        latency.labels("GET", "/v1/jobs/{job_id}").observe(seconds)
    requests.labels("GET", "/v1/jobs/{job_id}", "200").inc(9)
    requests.labels("GET", "/v1/jobs/{job_id}", "503").inc(1)

    snapshot = operations_snapshot(registry)
    (row,) = snapshot["latency"]
    assert row["route"] == "/v1/jobs/{job_id}" and row["count"] == 10
    assert row["p50"] <= 0.01 < row["p90"] <= 0.1 < row["p99"] <= 1
    assert snapshot["http_error_rate"] == 0.1
    assert snapshot["job_error_rate"] is None and snapshot["workers"] == {}
