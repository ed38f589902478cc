"""The embedded broker's consumers sleep while the spool is empty and wake when a message arrives."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from shared.core import spool_transport
from shared.core.queue import PREDICT_QUEUE, PREDICT_TASK, make_celery
from shared.core.settings import Settings


@pytest.fixture
def listings(monkeypatch) -> list[float]:
    """The moments consumers listed the spool for a queue (kombu's `_get`), recorded as they happen."""
    seen: list[float] = []
    original = spool_transport.Channel._get

    def counted(self, queue):
        seen.append(time.monotonic())
        return original(self, queue)

    monkeypatch.setattr(spool_transport.Channel, "_get", counted)
    return seen


def wait_for_one_message_sent_after(app, delay_s: float) -> float:
    """Seconds an idle consumer took to return the message another producer sends after `delay_s`."""
    sender = threading.Timer(delay_s, lambda: app.send_task(PREDICT_TASK, args=[["late-job"]], queue=PREDICT_QUEUE))
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(PREDICT_QUEUE)
        started = time.monotonic()
        sender.start()
        message = queue.get(timeout=10)
        took = time.monotonic() - started
        queue.close()
    sender.join()
    assert message.payload[0][0] == ["late-job"]
    return took


def test_an_idle_consumer_lists_the_spool_only_when_a_message_arrives(tmp_path, listings, monkeypatch) -> None:
    monkeypatch.setattr(spool_transport, "SAFETY_RELIST_S", 30.0)  # only the arrival can wake it
    took = wait_for_one_message_sent_after(make_celery(Settings(home=tmp_path)), 0.6)
    assert 0.6 <= took < 10
    # Listed once before sleeping and once when woken -- not every 2 ms (about 300 times while it waited).
    assert len(listings) <= 3


def test_without_inotify_an_idle_consumer_backs_off_and_still_sees_the_message(tmp_path, listings, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "inotify_simple", None)  # as on macOS: the import fails
    took = wait_for_one_message_sent_after(make_celery(Settings(home=tmp_path)), 1.0)
    assert 1.0 <= took < 1.0 + spool_transport.BACKOFF_MAX_S + 0.3
    assert 6 <= len(listings) <= 25  # 2, 4, 8 ... 100 ms apart: fast at first, then ten times a second


def test_a_busy_consumer_takes_messages_back_to_back(tmp_path, listings) -> None:
    app = make_celery(Settings(home=tmp_path))
    for index in range(20):
        app.send_task(PREDICT_TASK, args=[[f"job-{index}"]], queue=PREDICT_QUEUE)
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(PREDICT_QUEUE)
        started = time.monotonic()
        bodies = [queue.get(timeout=5).payload[0][0][0] for _ in range(20)]
        took = time.monotonic() - started
        queue.close()
    assert bodies == [f"job-{index}" for index in range(20)]
    assert took < 1.0  # no wait between messages already there
