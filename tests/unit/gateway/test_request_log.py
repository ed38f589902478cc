"""Request ids (X-Request-ID) and the gateway's access log, on a real app in the open embedded mode."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from shared.core.logs import JsonFormatter
from shared.core.settings import Settings
from shared.db.migrate import upgrade_database


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("request-log-home"), auth="off", log_format="json")
    upgrade_database(settings)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        yield client


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [json.loads(JsonFormatter("gateway").format(r)) for r in caplog.records if r.name == "xrayq.access"]


def test_a_client_request_id_comes_back_and_is_logged_with_the_route_template(gateway, caplog) -> None:
    caplog.set_level(logging.INFO, logger="xrayq.access")
    response = gateway.get("/v1/jobs/0b8c1f2e-no-such-job?wait=0&token=secret", headers={"X-Request-ID": "pacs-42"})
    assert response.status_code == 404 and response.headers["X-Request-ID"] == "pacs-42"
    [line] = access_lines(caplog)
    assert line["request_id"] == "pacs-42" and line["service"] == "gateway"
    assert (line["method"], line["route"], line["status"]) == ("GET", "/v1/jobs/{job_id}", 404)
    assert line["duration_ms"] >= 0
    assert "secret" not in json.dumps(line) and "no-such-job" not in json.dumps(line)


def test_without_one_each_request_gets_a_new_id(gateway, caplog) -> None:
    caplog.set_level(logging.INFO, logger="xrayq.access")
    first, second = gateway.get("/healthz"), gateway.get("/healthz")
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]
    assert [line["request_id"] for line in access_lines(caplog)] == [
        first.headers["X-Request-ID"],
        second.headers["X-Request-ID"],
    ]


def test_a_request_refused_before_routing_is_logged_too(gateway, caplog) -> None:
    caplog.set_level(logging.INFO, logger="xrayq.access")
    response = gateway.get("/v1/jobs/%00")  # refused by PrintableUrls, inside the request log
    assert response.status_code == 422 and response.headers["X-Request-ID"]
    [line] = access_lines(caplog)
    assert (line["route"], line["status"]) == ("unmatched", 422)
