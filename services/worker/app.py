"""The inference worker: a Celery app consuming queue `predict` (`xrayq worker`).

Each message is a list of job ids (a chunk of a batch, or one single job); the process keeps its
models loaded between messages.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
from celery import Task
from celery.signals import setup_logging, worker_process_init

from services.worker.explaining import Outcome
from services.worker.inference import ModelCache, Predictor
from shared.core.logs import configure_logging
from shared.core.queue import EXPLAIN_TASK, PREDICT_TASK, PUBLISHED_AT_HEADER, make_celery
from shared.core.settings import Settings, get_settings
from shared.core.storage import make_object_store
from shared.core.tracing import configure_tracing
from shared.db.session import database_for
from shared.models.nets import pick_device

settings = get_settings()
app = make_celery(settings, "xrayq-worker")
log = logging.getLogger(__name__)
_predictor: Predictor | None = None
_processes = 1  # set by `pool_size` before the pool forks


def pool_size(requested: int) -> int:
    """Inference processes for this worker: `requested`, or chosen for the device (see Settings)."""
    global _processes
    cpus = os.cpu_count() or 1
    # On a GPU the model is rarely the limit: decoding is, and it holds each process's GIL, so a
    # process per 4 cores (at most 4, each with its own CUDA context of ~0.8 GB) keeps the GPU fed.
    _processes = requested or (min(4, max(1, cpus // 4)) if _gpu_present(settings) else min(2, cpus))
    return _processes


def _gpu_present(settings: Settings) -> bool:
    if settings.device != "auto":
        return settings.device == "cuda"
    # NVML's count does not initialise CUDA in this process, which must not happen before the fork.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.is_available()


def get_predictor() -> Predictor:
    """Built lazily in the pool process: CUDA and thread pools must not be created before the fork."""
    global _predictor
    if _predictor is None:
        store = make_object_store(settings)
        device = pick_device(settings.device)
        _predictor = Predictor(
            settings,
            database_for(settings),
            store,
            ModelCache(store, device, settings.model_cache_size, warm_batch_sizes=(1, settings.predict_chunk_size)),
        )
    return _predictor


@setup_logging.connect
def _configure_main_process_logging(**_: object) -> None:
    # Connected, this replaces Celery's own set-up: the main process's lines ("ready", a lost
    # process) are in the same format as the pool's.
    configure_logging(settings, "worker")


@worker_process_init.connect
def _init_process(**_: object) -> None:
    configure_logging(settings, "worker")
    configure_tracing(settings, "worker")
    # Threads beyond the cores only make the processes wait on each other.
    torch.set_num_threads(settings.torch_threads or max(1, (os.cpu_count() or 1) // _processes))


@app.task(name=PREDICT_TASK, bind=True)
def predict(self: Task, job_ids: list[str]) -> dict[str, int]:
    # A message given back because its worker process died may take its jobs although they are
    # `running`; any other copy leaves running jobs to the worker that holds them (see claim_jobs).
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    return get_predictor().run(job_ids, redelivered=redelivered)


# An explanation asked for while its job is still running waits for the answer: asked again every few
# seconds, for as long as a job can run (its attempts, each until it is presumed lost).
EXPLAIN_RETRY_S = 2.0
EXPLAIN_RETRIES = math.ceil(settings.stale_running_after_s * settings.max_attempts / EXPLAIN_RETRY_S)


@app.task(name=EXPLAIN_TASK, bind=True)
def explain(self: Task, job_id: str) -> str:
    outcome = get_predictor().explainer.explain_job(job_id)
    if outcome == Outcome.unanswered:
        raise self.retry(
            countdown=EXPLAIN_RETRY_S, max_retries=EXPLAIN_RETRIES, headers={PUBLISHED_AT_HEADER: time.time()}
        )
    return outcome.value
