"""Prometheus metrics of the inference worker, safe across Celery's pool processes.

`xrayq worker` points PROMETHEUS_MULTIPROC_DIR at a fresh folder before anything imports
prometheus_client, so every pool process writes its samples there, and the main process serves their
sum on XRAYQ_WORKER_METRICS_PORT.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

JOBS_FINISHED = Counter("xrayq_jobs_finished", "Jobs finished by the worker", ["model", "status"])
# The failed ones by their error code (`image_unreadable`, `input_missing`, ...: a fixed set of ours).
JOB_FAILURES = Counter("xrayq_job_failures", "Jobs the worker failed, by error code", ["model", "code"])
QUEUE_WAIT = Histogram("xrayq_job_queue_wait_seconds", "Submission to start of work", buckets=LATENCY_BUCKETS)
PREPROCESS = Histogram(
    "xrayq_job_preprocess_seconds", "Fetch, decode and preprocess of one image", buckets=LATENCY_BUCKETS
)
INFERENCE = Histogram("xrayq_batch_inference_seconds", "One forward pass", ["model"], buckets=LATENCY_BUCKETS)
END_TO_END = Histogram(
    "xrayq_job_end_to_end_seconds", "Submission to result written", ["model"], buckets=LATENCY_BUCKETS
)
BATCH_SIZE = Histogram(
    "xrayq_batch_size", "Images per forward pass", ["model"], buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
)
# Every entry of a written result's `warnings` list, by its code (input quality, out of distribution,
# uncertain, suitability): the codes are a fixed set of ours, never free text, so the labels stay few.
RESULT_FLAGS = Counter(
    "xrayq_result_flags",
    "Flags (warnings) on results written by the worker, by code",
    ["model", "code"],
)
# Grad-CAM explanations, only for jobs that asked for one: by outcome ("succeeded", or the failure's code).
EXPLANATIONS = Counter("xrayq_explanations", "Explanations written by the worker, by outcome", ["model", "status"])
EXPLANATION_SECONDS = Histogram(
    "xrayq_explanation_seconds",
    "Grad-CAM of one group of answers (forward and backward)",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BUSY = Counter("xrayq_worker_busy_seconds", "Time spent running prediction messages")
# Result-cache lookups of jobs that could be answered from an earlier job's result: "hit" or "miss".
# The hit rate is hit / (hit + miss).
RESULT_CACHE = Counter("xrayq_result_cache_lookups", "Result-cache lookups by the worker", ["model", "outcome"])
