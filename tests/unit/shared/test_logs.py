"""JSON log lines, their context (request, job, organisation), and the request id a message carries."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest
from kombu import Connection

from shared.core import log_context
from shared.core.logs import JsonFormatter, TextFormatter
from shared.core.message_context import ORGANISATION_HEADER, REQUEST_ID_HEADER
from shared.core.queue import PREDICT_QUEUE, PREDICT_TASK, make_celery
from shared.core.settings import Settings


def record(msg: str = "job %s done", *args: object, **extra: object) -> logging.LogRecord:
    """A record made as `log.info` makes it: with the context of the moment."""
    entry = logging.getLogRecordFactory()("xrayq.test", logging.INFO, __file__, 1, msg, args or ("j1",), None)
    entry.__dict__.update(extra)
    return entry


def test_a_json_line_holds_the_message_the_service_and_the_context() -> None:
    with log_context.bound(request_id="r-1", organisation="radiology-1"):
        made = record(job_id="j1", status="succeeded")
    line = json.loads(JsonFormatter("worker").format(made))  # formatted later, as a queued handler may
    assert line["msg"] == "job j1 done" and line["level"] == "INFO" and line["logger"] == "xrayq.test"
    assert line["service"] == "worker"
    assert (line["request_id"], line["organisation"], line["job_id"], line["status"]) == (
        "r-1",
        "radiology-1",
        "j1",
        "succeeded",
    )


def test_fields_outside_the_list_never_reach_a_line() -> None:
    # A careless `extra` (an image, a patient's name) is dropped, not written.
    line = json.loads(JsonFormatter().format(record(pixels=b"\x89PNG", PatientName="DOE^JANE", code=None)))
    assert "pixels" not in line and "PatientName" not in line and "code" not in line
    with pytest.raises(ValueError, match="not a log context field"):
        log_context.bind(patient_name="DOE^JANE")  # type: ignore[arg-type]


def test_a_traceback_stays_in_its_field() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        failed = record(exc_info=sys.exc_info())
    line = json.loads(JsonFormatter().format(failed))
    assert "RuntimeError: boom" in line["exc"] and "\n" not in JsonFormatter().format(failed)


def test_the_text_format_names_the_context_after_the_message() -> None:
    with log_context.bound(request_id="r-2"):
        assert TextFormatter().format(record()).endswith("job j1 done [request_id=r-2]")
    assert TextFormatter().format(record()).endswith("job j1 done")


def test_contexts_do_not_leak_between_concurrent_requests() -> None:
    async def handle(request_id: str) -> str | None:
        with log_context.bound(request_id=request_id):
            await asyncio.sleep(0)  # the other request runs here
            # A handler's work on a thread (`anyio.to_thread`, `asyncio.to_thread`) sees its own context.
            return await asyncio.to_thread(lambda: log_context.current().get("request_id"))

    async def both() -> list[str | None]:
        return list(await asyncio.gather(handle("a"), handle("b")))

    assert asyncio.run(both()) == ["a", "b"]
    assert log_context.current() == {}
    seen: list[dict[str, str]] = []
    with log_context.bound(request_id="main"):
        thread = threading.Thread(target=lambda: seen.append(log_context.current()))  # a plain thread starts empty
        thread.start()
        thread.join()
    assert seen == [{}]


@pytest.mark.parametrize(
    ("header", "kept"),
    [("3f2a-99:b_c.d", True), ("", False), (None, False), ("a" * 129, False), ('x"\n{"level": "ERROR"}', False)],
)
def test_a_client_request_id_is_kept_only_when_plain(header: str | None, kept: bool) -> None:
    request_id = log_context.request_id_from(header)
    assert (request_id == header) is kept
    assert 1 <= len(request_id) <= 128


def test_a_published_message_carries_the_request_id_and_organisation(tmp_path) -> None:
    settings = Settings(home=tmp_path, broker_url="memory://")
    app = make_celery(settings, "test-publisher")
    with Connection("memory://") as connection:
        with log_context.bound(request_id="r-3", organisation="radiology-1"):
            app.send_task(PREDICT_TASK, args=[["j1"]], queue=PREDICT_QUEUE, connection=connection)
        app.send_task(PREDICT_TASK, args=[["j2"]], queue=PREDICT_QUEUE, connection=connection)  # no context
        queue = connection.SimpleQueue(PREDICT_QUEUE)
        first, second = queue.get(timeout=1), queue.get(timeout=1)
        queue.close()
    assert first.headers[REQUEST_ID_HEADER] == "r-3" and first.headers[ORGANISATION_HEADER] == "radiology-1"
    assert REQUEST_ID_HEADER not in second.headers
