"""Sending results out (SR by C-STORE, signed callbacks) so that no destination holds up another.

Each gateway keeps one `DeliveryDispatcher`: a small thread pool fed by every finishing pass. A due
batch is started only while its organisation and each of its destinations (host:port) have a free
share of the pool, so a receiver that trickles, never answers or answers forever holds at most
`delivery_per_destination` threads, each for at most `delivery_deadline_s`; other destinations keep
their threads. A destination that failed `delivery_breaker_failures` times in a row is skipped for
`delivery_breaker_cooldown_s` (its held deliveries record why, without spending an attempt), then
tried with one delivery.

Across gateways the database decides: a batch is claimed by moving `delivery_due_at` to the end of a
lease that outlasts every attempt's deadline, with a conditional UPDATE only one gateway wins; the
result is written back only while that lease is still ours. A gateway that dies mid-delivery leaves
the lease to run out, and the delivery is tried again after it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from prometheus_client import Counter as MetricCounter
from sqlalchemy import select, update

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.core.storage import ObjectNotFound, ObjectStore
from shared.db.models import Batch, as_utc, utcnow
from shared.db.session import Database
from shared.imaging.dimse import send_c_store
from shared.jobs.callbacks import organisation_secret, post_callback
from shared.jobs.sr_destinations import is_sr_delivery, sr_delivery_address
from shared.jobs.views import batch_view

log = logging.getLogger(__name__)
LEASE_MARGIN_S = 10.0  # reading the batch and writing its states back, beyond the attempts' deadlines
BUSY_RETRY_S = 1.0  # a batch whose destination or organisation has no free share waits this long

# Each attempt by its outcome: `delivered`, `pending` (failed, to be tried again) or `failed` (given up).
# Unregistered: the process that delivers serves it (the gateway registers it in its /metrics).
DELIVERY_ATTEMPTS = MetricCounter(
    "xrayq_delivery_attempts",
    "Delivery attempts (SR, callback) by kind and outcome",
    ["kind", "outcome"],
    registry=None,
)


@dataclass
class Breaker:
    """Consecutive failures of one destination; open (skipped) until `open_until`, then one trial."""

    failures: int = 0
    open_until: datetime | None = None
    trial_running: bool = False


@dataclass(frozen=True)
class Plan:
    """What one claimed batch's task does: which due deliveries it sends and which it holds back."""

    batch_id: str
    lease: datetime
    organisation: str
    send: dict[str, str]  # delivery name -> destination key
    hold: dict[str, datetime]  # delivery name -> until when its destination is skipped


def destination_key(name: str, state: dict[str, Any]) -> str:
    """The destination a delivery goes to (what shares and breakers count by): a callback's
    scheme://host:port, an SR destination's id (its address is looked up only when sending)."""
    try:
        if is_sr_delivery(name):
            return f"dicom://{state.get('destination_id', state['target'])}"
        url = httpx.URL(state["target"])
        return f"{url.scheme}://{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
    except (XrayqError, httpx.InvalidURL, KeyError, TypeError):
        return f"{name}://invalid"


class DeliveryDispatcher:
    def __init__(self, settings: Settings, database: Database, store: ObjectStore) -> None:
        self.settings, self.database, self.store = settings, database, store
        self._pool = ThreadPoolExecutor(settings.delivery_workers, thread_name_prefix="xrayq-delivery")
        self._lock = threading.Lock()
        self._destinations: Counter[str] = Counter()
        self._organisations: Counter[str] = Counter()
        # The most deliveries ever in flight at once to each destination: what its share bounds.
        self.most_in_flight: Counter[str] = Counter()
        self._running: dict[str, Future[int]] = {}
        self._breakers: dict[str, Breaker] = {}

    def dispatch_due(self, limit: int = 50) -> int:
        """Start every due batch that has a free share; returns how many were started."""
        now = utcnow()
        with self.database.session() as session:
            due = session.execute(
                select(Batch.id, Batch.delivery_due_at, Batch.organisation, Batch.deliveries)
                .where(Batch.delivery_due_at <= now)
                .order_by(Batch.delivery_due_at)
                .limit(limit)
            ).all()
        started = 0
        for batch_id, due_at, organisation, deliveries in due:
            if len(self._running) >= self.settings.delivery_workers:
                break
            if batch_id in self._running or due_at is None:
                continue
            plan = self._plan(batch_id, organisation or "", deliveries or {}, now)
            if plan is None:  # no free share now: behind the others, so they are not starved by it
                self._move_due(batch_id, due_at, now + timedelta(seconds=BUSY_RETRY_S))
                continue
            if not self._move_due(batch_id, due_at, plan.lease):
                self._release(plan)  # another gateway claimed it first
                continue
            self._running[batch_id] = future = self._pool.submit(self._run, plan)
            future.add_done_callback(functools.partial(self._finished, plan))
            started += 1
        return started

    def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing this dispatcher started is still running (for tests and shutdown)."""
        futures = list(self._running.values())
        for future in futures:
            try:
                future.result(timeout=timeout_s)
            except TimeoutError:
                return False
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _plan(self, batch_id: str, organisation: str, deliveries: dict[str, Any], now: datetime) -> Plan | None:
        due = {name: state for name, state in deliveries.items() if state.get("status") == "pending" and _is_due(state)}
        keys = {name: destination_key(name, state) for name, state in due.items()}
        with self._lock:
            hold = {name: until for name, key in keys.items() if (until := self._held_until(key, now)) is not None}
            send = {name: key for name, key in keys.items() if name not in hold}
            busy = self._organisations[organisation] >= self.settings.delivery_per_organisation or any(
                self._destinations[key] >= self.settings.delivery_per_destination for key in send.values()
            )
            if send and busy:
                return None
            for key in send.values():
                self._destinations[key] += 1
                self.most_in_flight[key] = max(self.most_in_flight[key], self._destinations[key])
                breaker = self._breakers.get(key)
                if breaker is not None and breaker.open_until is not None:
                    breaker.trial_running = True  # the cool-down is over: this one delivery tries it
            self._organisations[organisation] += 1
        lease_s = self.settings.delivery_deadline_s * max(len(send), 1) + LEASE_MARGIN_S
        return Plan(batch_id, now + timedelta(seconds=lease_s), organisation, send, hold)

    def _held_until(self, key: str, now: datetime) -> datetime | None:
        breaker = self._breakers.get(key)
        if breaker is None or breaker.open_until is None:
            return None
        if now < breaker.open_until:
            return breaker.open_until
        return now + timedelta(seconds=BUSY_RETRY_S) if breaker.trial_running else None

    def _finished(self, plan: Plan, _future: Future[int]) -> None:
        self._release(plan)

    def _release(self, plan: Plan) -> None:
        with self._lock:
            for key in plan.send.values():
                self._destinations[key] -= 1
            self._organisations[plan.organisation] -= 1
            self._running.pop(plan.batch_id, None)

    def _outcome(self, key: str, delivered: bool) -> None:
        with self._lock:
            if delivered:
                self._breakers.pop(key, None)
                return
            breaker = self._breakers.setdefault(key, Breaker())
            breaker.failures += 1
            breaker.trial_running = False
            if breaker.failures >= self.settings.delivery_breaker_failures:
                breaker.open_until = utcnow() + timedelta(seconds=self.settings.delivery_breaker_cooldown_s)
                log.warning(
                    "destination %s skipped for %gs after %d consecutive failures",
                    key,
                    self.settings.delivery_breaker_cooldown_s,
                    breaker.failures,
                )

    def _move_due(self, batch_id: str, due_at: datetime, until: datetime) -> bool:
        """Move one batch's due time if nobody moved it since we read it (a claim when `until` is a lease)."""
        with self.database.session() as session:
            moved = session.execute(
                update(Batch).where(Batch.id == batch_id, Batch.delivery_due_at == due_at).values(delivery_due_at=until)
            )
            return bool(moved.rowcount)  # type: ignore[attr-defined]

    def _run(self, plan: Plan) -> int:
        try:
            return self._deliver(plan)
        except Exception:  # a bug here must not kill the pool's thread silently; the lease runs out
            log.exception("delivering batch %s failed unexpectedly", plan.batch_id)
            return 0

    def _deliver(self, plan: Plan) -> int:
        settings = self.settings
        with self.database.session() as session:
            batch = session.get(Batch, plan.batch_id)
            if batch is None:
                return 0
            states = {name: dict(state) for name, state in (batch.deliveries or {}).items()}
            payload = None
            if "callback" in plan.send:
                payload = {
                    "event": "batch.completed",
                    "organisation": batch.organisation,
                    "batch": batch_view(session, plan.batch_id, limit=500).model_dump(mode="json"),
                }
            report_key, callback_url = batch.report_key, batch.callback_url
            secret = batch.callback_secret or organisation_secret(settings, batch.organisation)
        delivered = 0
        for name, until in plan.hold.items():
            _record_held(states[name], until, settings)
        for name, key in plan.send.items():
            state = states[name]
            try:
                if is_sr_delivery(name):
                    assert report_key is not None
                    send_c_store(
                        self.store.get(report_key),
                        sr_delivery_address(self.database, settings, plan.batch_id, state),
                        settings.dicom_ae_title,
                        settings.dicom_network_timeout_s,
                        settings.delivery_deadline_s,
                    )
                else:
                    if not (callback_url and secret and payload is not None):
                        raise XrayqError("delivery_failed", "callback not sent: no secret to sign it with")
                    post_callback(
                        callback_url, secret, "batch.completed", plan.batch_id, payload, settings, plan.organisation
                    )
            except (XrayqError, ObjectNotFound, OSError) as exc:
                self._outcome(key, delivered=False)
                _record_failure(state, exc, settings)
                DELIVERY_ATTEMPTS.labels(_kind(name), state["status"]).inc()  # pending (to retry) or failed
                log.warning(
                    "delivery %s of batch %s failed (attempt %d): %s", name, plan.batch_id, state["attempts"], exc
                )
                continue
            self._outcome(key, delivered=True)
            DELIVERY_ATTEMPTS.labels(_kind(name), "delivered").inc()
            state.update(status="delivered", attempts=state["attempts"] + 1, delivered_at=utcnow().isoformat())
            state.pop("next_at", None)
            delivered += 1
        self._write_back(plan, states)
        return delivered

    def _write_back(self, plan: Plan, states: dict[str, dict[str, Any]]) -> None:
        pending = [state["next_at"] for state in states.values() if state["status"] == "pending" and "next_at" in state]
        next_due = min(datetime.fromisoformat(at) for at in pending) if pending else None
        if next_due is None and any(state["status"] == "pending" for state in states.values()):
            next_due = utcnow()
        with self.database.session() as session:
            written = session.execute(
                update(Batch)
                .where(Batch.id == plan.batch_id, Batch.delivery_due_at == plan.lease)
                .values(deliveries=states, delivery_due_at=next_due)
            )
            if not written.rowcount:  # type: ignore[attr-defined]
                log.error("lease on the deliveries of batch %s ran out before they were recorded", plan.batch_id)


def _kind(name: str) -> str:
    return "sr" if is_sr_delivery(name) else "callback"


def _is_due(state: dict[str, Any]) -> bool:
    return "next_at" not in state or as_utc(datetime.fromisoformat(state["next_at"])) <= utcnow()


def _record_failure(state: dict[str, Any], exc: Exception, settings: Settings) -> None:
    state["attempts"] += 1
    # The client reads this: an XrayqError's sentence names nothing of our network; anything else
    # (a storage or socket error) is reduced to its kind.
    state["last_error"] = exc.detail if isinstance(exc, XrayqError) else f"{type(exc).__name__}"
    if state["attempts"] >= settings.delivery_attempts:
        state["status"] = "failed"
        state.pop("next_at", None)
        return
    pause = settings.delivery_retry_after_s * 2 ** (state["attempts"] - 1)
    state["next_at"] = (utcnow() + timedelta(seconds=pause)).isoformat()


def _record_held(state: dict[str, Any], until: datetime, settings: Settings) -> None:
    state["last_error"] = (
        f"destination paused after {settings.delivery_breaker_failures} consecutive failures; "
        f"tried again after {until.isoformat(timespec='seconds')} (not counted as an attempt)"
    )
    state["next_at"] = until.isoformat()
