"""Traffic against a stack: the credentials clients send, `total` requests over concurrent client
threads, and latency summaries (percentiles) of what they measured."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shared.core.settings import get_settings

TERMINAL_JOB_STATUSES = {"succeeded", "failed", "cancelled"}


def auth_headers() -> dict[str, str]:
    """XRAYQ_API_KEY (a key with the `submit` role), else the bootstrap admin key, when auth is on."""
    key = os.environ.get("XRAYQ_API_KEY") or get_settings().admin_key
    return {"Authorization": f"Bearer {key}"} if key else {}


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q`th percentile, rounded to 2 decimals."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 2)


def run_clients(concurrency: int, total: int, one_request: Callable[[int], bool]) -> tuple[list[float], float, int]:
    """`total` requests spread over `concurrency` threads; returns latencies (ms), wall seconds, failures.

    `one_request(index)` makes request number `index` and says whether it succeeded."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    counter = iter(range(total))

    def client_loop() -> None:
        nonlocal failures
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            started = time.perf_counter()
            ok = one_request(index)
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)
                failures += 0 if ok else 1

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client_loop)
    return latencies, time.perf_counter() - started, failures


def summarise(latencies: list[float], seconds: float, failures: int) -> dict[str, Any]:
    """What `run_clients` measured: throughput and the p50/p90/p99 latencies."""
    return {
        "requests": len(latencies),
        "failures": failures,
        "ips": round(len(latencies) / seconds, 1),
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
    }
