"""The Celery app, its routing and its delivery policy -- in one place, for all three services.

Messages carry ids only; bytes live in object storage and state in the database. Celery's result
backend is off: the database is the source of truth for every job.
"""

from __future__ import annotations

import json

from celery import Celery
from kombu import Exchange, Queue

from shared.core import message_context  # noqa: F401  (connects the signals that carry request ids)
from shared.core.settings import Settings

PREDICT_QUEUE = "predict"
TRAIN_QUEUE = "train"
PREDICT_TASK = "xrayq.predict"
# One job's explanation asked for after its answer (a worker's work too: the gateway never runs a model).
EXPLAIN_TASK = "xrayq.explain"
TRAIN_RUN_TASK = "xrayq.train_run"

# Each message on `predict` (predictions and explanations) says when it was published (epoch seconds), so
# the reconciler can tell how far the queue has drained: see `oldest_waiting_publish_time`.
PUBLISHED_AT_HEADER = "xrayq_published_at"

# A training run can take an hour. With late acks, Redis redelivers an unacked message after the
# visibility timeout, so it must exceed the longest run or a run would be delivered twice.
REDIS_VISIBILITY_TIMEOUT_S = 6 * 3600


def broker_transport_options(settings: Settings) -> dict[str, object]:
    if settings.uses_filesystem_broker:
        spool = settings.broker_spool_dir
        for sub in ("queue", "processed", "control"):
            (spool / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(spool / "queue"),
            "data_folder_out": str(spool / "queue"),
            "processed_folder": str(spool / "processed"),
            "control_folder": str(spool / "control"),
            "store_processed": False,
            # The default 1 s would add up to a second to every job; a listing of an empty folder
            # every 2 ms costs about 1 % of a core.
            "polling_interval": 0.002,
        }
    options: dict[str, object] = {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    if settings.broker_key_prefix:
        options["global_keyprefix"] = settings.broker_key_prefix
    return options


def make_celery(settings: Settings, name: str = "xrayq") -> Celery:
    app = Celery(name, broker=settings.broker_url, set_as_current=False)
    if settings.uses_filesystem_broker:
        app.conf.broker_transport = "shared.core.spool_transport:Transport"
    app.conf.update(
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        # Each queue on its own direct exchange: a prediction can never land on the trainer's queue.
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in (PREDICT_QUEUE, TRAIN_QUEUE)],
        task_default_queue=PREDICT_QUEUE,
        task_default_exchange=PREDICT_QUEUE,
        task_default_routing_key=PREDICT_QUEUE,
        task_routes={
            PREDICT_TASK: {"queue": PREDICT_QUEUE},
            EXPLAIN_TASK: {"queue": PREDICT_QUEUE},
            TRAIN_RUN_TASK: {"queue": TRAIN_QUEUE},
        },
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # At-least-once: ack after the task ran, and give a task back when its worker process dies,
        # so a killed worker's jobs run again elsewhere. Writes are idempotent (see worker/inference).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message at a time per process: a prefetched message would wait behind a long batch
        # while another worker sits idle.
        worker_prefetch_multiplier=1,
        # Shutdown (SIGTERM): the warm phase lets the running message finish, then a soft phase of
        # 10 s more (a prediction chunk takes seconds) before a cold stop; whatever is still unacked
        # then goes back to the queue (kombu restores it), and the reconciler covers the rest.
        worker_soft_shutdown_timeout=10.0,
        worker_enable_soft_shutdown_on_idle=True,
        worker_hijack_root_logger=False,
        # Task events (received, started, succeeded, ...) for Flower: see Settings.task_events.
        worker_send_task_events=settings.sends_task_events,
        enable_utc=True,
    )
    return app


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting per queue, read straight from the broker (for operators' metrics)."""
    queues = (PREDICT_QUEUE, TRAIN_QUEUE)
    if settings.uses_filesystem_broker:
        spool = settings.broker_spool_dir / "queue"
        names = [path.name for path in spool.iterdir()] if spool.is_dir() else []
        return {queue: sum(name.endswith(f".{queue}.msg") for name in names) for queue in queues}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(settings.broker_url, socket_timeout=2)
        try:
            return {queue: int(client.llen(f"{settings.broker_key_prefix}{queue}")) for queue in queues}
        finally:
            client.close()
    return {}


def oldest_waiting_publish_time(settings: Settings, now: float) -> float | None:
    """When the oldest message still waiting on `predict` was published (epoch seconds): every message
    published before it has left the queue (one FIFO list). `now` when the queue is empty; None when
    that cannot be told (a message without the header, a broker whose list cannot be read), so that
    nothing is presumed lost. Raises when the broker is unreachable.
    """
    if settings.uses_filesystem_broker:
        spool = settings.broker_spool_dir / "queue"
        # Consumers take files in name order (see spool_transport): the first name is the oldest.
        names = sorted(path.name for path in spool.iterdir() if path.name.endswith(f".{PREDICT_QUEUE}.msg"))
        for name in names:
            try:
                return _published_at((spool / name).read_bytes())
            except FileNotFoundError:  # consumed while we looked: the next one is the oldest
                continue
        return now
    if settings.broker_url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(settings.broker_url, socket_timeout=2)
        try:
            # kombu pushes on the left and pops on the right: the right end is the oldest.
            oldest = client.lindex(f"{settings.broker_key_prefix}{PREDICT_QUEUE}", -1)
        finally:
            client.close()
        return now if oldest is None else _published_at(oldest)
    return None


def _published_at(raw: bytes | str) -> float | None:
    try:
        value = json.loads(raw)["headers"][PUBLISHED_AT_HEADER]
    except (ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) else None
