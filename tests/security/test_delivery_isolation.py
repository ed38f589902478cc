"""Finding 3: one organisation's slow, endless or unreachable receivers -- or a stalled PACS -- do not
hold up another organisation's results, and two gateways never send one delivery twice.

Real Postgres and S3 (the session's services), real HTTP receivers and a real DICOM association on
127.0.0.1, the real dispatcher that every gateway's finishing pass feeds."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from shared.core.errors import XrayqError
from shared.core.storage import make_object_store
from shared.db.models import Batch, utcnow
from shared.db.session import Database
from shared.imaging.dimse import RemoteAE, send_c_store
from shared.jobs.callbacks import DELIVERY_HEADER, SIGNATURE_HEADER, organisation_secret, verify_signature
from shared.jobs.deliveries import deliver_due
from shared.jobs.dispatch import DeliveryDispatcher, destination_key
from tests.conftest import free_port, settings_from_env
from tests.security.callback_receivers import Blackhole, Receiver

pytestmark = pytest.mark.integration
DEADLINE_S = 3.0


@pytest.fixture
def settings(services_env, services_settings):
    return settings_from_env(
        services_env,
        callback_allow_networks="127.0.0.0/8",
        callback_secret="server-secret-of-the-isolation-test",
        delivery_deadline_s=DEADLINE_S,
        callback_timeout_s=2.0,
        delivery_workers=6,
        delivery_per_destination=2,
        delivery_per_organisation=4,
        delivery_retry_after_s=600,  # a failed attempt is not retried within a test
        delivery_breaker_failures=2,
    )


@pytest.fixture
def batches(settings):
    """Completed batches with a pending callback, as `complete_batch` leaves them; none stays due after."""
    database, made = Database(settings.database_url), []

    def make(organisation: str, url: str, due_seconds_ago: float = 0) -> str:
        with database.session() as session:
            batch = Batch(
                model_name="chest-xray",
                total=0,
                organisation=organisation,
                callback_url=url,
                completed_at=utcnow(),
                deliveries={"callback": {"status": "pending", "attempts": 0, "target": url}},
                delivery_due_at=utcnow() - timedelta(seconds=due_seconds_ago),
            )
            session.add(batch)
            session.flush()
            made.append(batch.id)
            return batch.id

    yield make
    with database.session() as session:
        session.execute(update(Batch).where(Batch.id.in_(made)).values(delivery_due_at=None))
    database.engine.dispose()


def gateway(settings) -> DeliveryDispatcher:
    """One gateway's dispatcher, with a database connection pool of its own."""
    return DeliveryDispatcher(settings, Database(settings.database_url), make_object_store(settings))


def callback_state(dispatcher: DeliveryDispatcher, batch_id: str) -> dict:
    with dispatcher.database.session() as session:
        return dict(session.get(Batch, batch_id).deliveries["callback"])


def poll(condition, timeout_s: float, pass_of=None, settings=None) -> float:
    """Run finishing passes (if given) until `condition()`; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        if pass_of is not None:
            deliver_due(settings, pass_of.database, pass_of.store, dispatcher=pass_of)
        time.sleep(0.05)
    return time.monotonic() - started


def test_slow_endless_and_unreachable_receivers_hold_up_no_other_organisation(settings, batches) -> None:
    trickle, endless, hole, healthy = Receiver("trickle"), Receiver("endless"), Blackhole(), Receiver("ok")
    dispatcher = gateway(settings)
    try:
        # The attacker's batches are older, so a serial pass would try every one of them first.
        slow = [batches("slow-org", trickle.url, 60) for _ in range(3)]
        unreachable = [batches("slow-org", hole.url, 60) for _ in range(3)]
        endless_id = batches("slow-org", endless.url, 60)
        good = batches("good-org", healthy.url)

        took = poll(lambda: healthy.calls, DEADLINE_S, pass_of=dispatcher, settings=settings)
        assert took < DEADLINE_S / 2, f"the healthy receiver waited {took:.1f}s behind slow ones"

        headers, body = healthy.calls[0]
        payload = json.loads(body)
        assert headers[DELIVERY_HEADER] == good and payload["organisation"] == "good-org"
        own = organisation_secret(settings, "good-org")
        assert own and verify_signature(own, headers[SIGNATURE_HEADER], body)
        for foreign in (settings.callback_secret, organisation_secret(settings, "slow-org")):
            assert not verify_signature(foreign, headers[SIGNATURE_HEADER], body)  # no tenant can forge it

        # The endless body is read only a few KiB deep: its 200 counts, quickly -- once it is sent. It
        # queues behind its own organisation's four slow attempts (the organisation's share), which end
        # at the deadline, so it is due within two deadlines of the start, not one.
        endless_delivered = lambda: callback_state(dispatcher, endless_id)["status"] == "delivered"  # noqa: E731
        poll(endless_delivered, 2 * DEADLINE_S, dispatcher, settings)

        # The trickling answer is cut at the deadline, not kept alive by each byte.
        first_slow = time.monotonic()
        poll(lambda: callback_state(dispatcher, slow[0])["attempts"] == 1, DEADLINE_S + 3, dispatcher, settings)
        assert time.monotonic() - first_slow < DEADLINE_S + 1.5
        # Its share, not the pool: counted where the connections are made (the receiver only notices a
        # cut connection at its next trickled byte, so its own count lags by up to a second).
        assert dispatcher.most_in_flight[destination_key("callback", {"target": trickle.url})] == (
            settings.delivery_per_destination
        )
        assert trickle.most_active <= settings.delivery_per_destination + 1
        assert dispatcher.wait_idle(3 * DEADLINE_S)

        # Each slow batch's attempt ended (at the deadline, or cut by the receiver), or -- once its
        # destination failed twice in a row -- the circuit breaker held it back without spending an attempt.
        def settled(batch_id: str) -> bool:
            return bool(callback_state(dispatcher, batch_id).get("last_error"))

        poll(lambda: all(settled(b) for b in [*slow, *unreachable]), 3 * DEADLINE_S, dispatcher, settings)
        for group in (slow, unreachable):
            states = [callback_state(dispatcher, batch_id) for batch_id in group]
            timed_out = [s for s in states if s["attempts"] == 1 and "not delivered" in s["last_error"]]
            held = [s for s in states if s["attempts"] == 0 and "paused" in s["last_error"]]
            assert len(timed_out) >= 2 and len(timed_out) + len(held) == len(group), states
            for state in states:
                assert state["status"] == "pending"
                assert "127.0.0.1" not in state["last_error"] and str(hole.port) not in state["last_error"]
    finally:
        dispatcher.close()
        for receiver in (trickle, endless, hole, healthy):
            receiver.close()


def test_a_failing_destination_is_skipped_for_its_cool_down_and_recorded(settings, batches) -> None:
    closed = f"http://127.0.0.1:{free_port()}/hooks/xrayq"  # nothing listens: refused at once
    healthy = Receiver("ok")
    dispatcher = gateway(settings)
    try:
        failing = [batches("down-org", closed, 60) for _ in range(2)]
        poll(lambda: all(callback_state(dispatcher, b)["attempts"] == 1 for b in failing), 5, dispatcher, settings)
        held = batches("down-org", closed)
        other = batches("down-org", healthy.url)
        poll(lambda: "paused" in (callback_state(dispatcher, held).get("last_error") or ""), 5, dispatcher, settings)
        state = callback_state(dispatcher, held)
        assert state["attempts"] == 0 and state["status"] == "pending"  # skipped, not spent
        cool_down_ends = state["next_at"]
        assert cool_down_ends > (utcnow() + timedelta(seconds=settings.delivery_breaker_cooldown_s - 5)).isoformat()
        # The same organisation's other destination is served meanwhile.
        poll(lambda: callback_state(dispatcher, other)["status"] == "delivered", 5, dispatcher, settings)
        assert len(healthy.calls) == 1
    finally:
        dispatcher.close()
        healthy.close()


def test_the_lease_keeps_a_second_gateway_from_sending_the_same_delivery(settings, batches) -> None:
    receiver = Receiver(1.5)  # answers within the deadline, slowly enough for the other gateway to try
    first, second = gateway(settings), gateway(settings)
    try:
        batch_id = batches("lease-org", receiver.url)
        assert deliver_due(settings, first.database, first.store, dispatcher=first) >= 1
        with first.database.session() as session:
            lease_ends = session.get(Batch, batch_id).delivery_due_at
        assert lease_ends - utcnow() > timedelta(seconds=DEADLINE_S)  # longer than any attempt may take
        while not first.wait_idle(0.05):
            deliver_due(settings, second.database, second.store, dispatcher=second)  # its pass finds it leased
        poll(lambda: callback_state(first, batch_id)["status"] == "delivered", 5)
        assert second.wait_idle(5)
        assert len(receiver.calls) == 1
        state = callback_state(first, batch_id)
        assert state["attempts"] == 1
        with first.database.session() as session:
            assert session.get(Batch, batch_id).delivery_due_at is None  # nothing left to send
    finally:
        first.close()
        second.close()
        receiver.close()


def test_a_stalled_pacs_holds_a_c_store_no_longer_than_the_deadline(data_dir) -> None:
    from pynetdicom import AE, evt

    released = threading.Event()

    def stall(event) -> int:
        released.wait(60)  # a PACS that accepted the association and does not answer the C-STORE
        return 0x0000

    ae = AE(ae_title="STALLED")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.1")  # CR Image Storage
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, stall)])
    try:
        started = time.monotonic()
        with pytest.raises(XrayqError) as caught:
            send_c_store(
                (data_dir / "dicom" / "RG3_UNCR.dcm").read_bytes(),
                RemoteAE("STALLED", "127.0.0.1", port),
                "XRAYQ",
                timeout_s=60,
                deadline_s=2,
            )
        assert caught.value.code == "delivery_failed"
        assert time.monotonic() - started < 2 + 1.5
    finally:
        released.set()
        server.shutdown()
