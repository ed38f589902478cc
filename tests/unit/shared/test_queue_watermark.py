"""How far the `predict` queue has drained, read from the embedded mode's real spool folder."""

from __future__ import annotations

from shared.core.queue import make_celery, oldest_waiting_publish_time
from shared.core.settings import Settings
from shared.jobs.lifecycle import publish_jobs


def test_the_oldest_waiting_message_tells_when_the_queue_last_drained(tmp_path) -> None:
    settings = Settings(home=tmp_path, broker_url="filesystem://")
    celery = make_celery(settings)
    assert oldest_waiting_publish_time(settings, now=123.0) == 123.0  # empty: everything has left it
    assert publish_jobs(celery, ["first"], 32) and publish_jobs(celery, ["second"], 32)
    spool = sorted((settings.broker_spool_dir / "queue").iterdir())
    assert len(spool) == 2
    first = oldest_waiting_publish_time(settings, now=123.0)
    assert first is not None and first > 123.0
    spool[0].unlink()  # a worker took the first message
    second = oldest_waiting_publish_time(settings, now=123.0)
    assert second is not None and second >= first
    # A message without its publish time (sent by an older gateway): nothing can be presumed lost.
    celery.send_task("xrayq.predict", args=[["third"]], queue="predict")
    spool[1].unlink()
    assert oldest_waiting_publish_time(settings, now=123.0) is None
