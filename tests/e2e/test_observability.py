"""Logs, traces and Flower on real processes: `xrayq gateway`, `xrayq worker` and `xrayq flower` in the
services mode (Postgres, Redis, S3 on loopback), with JSON logs, task events, and traces sent to an
OTLP/HTTP receiver that this test runs.

One DICOM study with a patient's name and id goes in with the client's X-Request-ID; the gateway's
and the worker's JSON lines name the same request id and job id, neither names the patient; the
worker's span continues the trace of the gateway's request; Flower shows the task.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.harness.processes import start_process, stop_process, wait_ready
from tests.conftest import ADMIN_HEADERS, CHEST_TRAIN, free_port, services_env_of_its_own
from tests.dicom_samples import part10, secondary_capture
from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e

PATIENT_NAME, PATIENT_ID = "Lovelace^Ada^Augusta", "PID-83125-OBS"
FLOWER_AUTH = ("ops", "flower-test-password")
PYTHON_CLI = [sys.executable, "-m", "services.cli"]


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str


class OtlpReceiver:
    """An OTLP/HTTP trace receiver (what a collector's `otlp` receiver does): keeps every span it is sent."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[Span] = []
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    attributes = {a.key: a.value.string_value for a in resource.resource.attributes}
                    for scope in resource.scope_spans:
                        spans.extend(
                            Span(
                                attributes.get("service.name", ""),
                                span.name,
                                span.trace_id.hex(),
                                span.span_id.hex(),
                                span.parent_span_id.hex(),
                            )
                            for span in scope.spans
                        )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@dataclass
class ObservedStack:
    url: str
    flower_url: str
    logs: dict[str, Path]
    traces: OtlpReceiver

    def lines(self, service: str) -> list[dict[str, Any]]:
        text = self.logs[service].read_text(errors="replace")
        # Celery prints its start-up banner on stdout; every log record is one JSON object per line.
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def observed(services_env, tmp_path_factory, data_dir) -> Iterator[ObservedStack]:
    home = tmp_path_factory.mktemp("observability-home")
    traces = OtlpReceiver()
    with services_env_of_its_own(services_env, home, "observability", data_dir) as env:
        port, flower_port = free_port(), free_port()
        env = {
            **env,
            "XRAYQ_PORT": str(port),
            "XRAYQ_LOG_FORMAT": "json",
            "XRAYQ_TASK_EVENTS": "on",
            "XRAYQ_OTEL_ENDPOINT": traces.url,
            "OTEL_BSP_SCHEDULE_DELAY": "200",  # the SDK's batch exporter sends every 0.2 s, not 5 s
            "XRAYQ_WORKER_METRICS_PORT": "0",
            "XRAYQ_FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH),
            "XRAYQ_RECONCILE_INTERVAL_S": "0",
            "PYTHONUNBUFFERED": "1",
        }
        logs = {role: home / f"{role}.log" for role in ("gateway", "worker", "flower")}
        commands = {
            "gateway": ["gateway"],
            "worker": ["worker", "--concurrency", "1"],
            "flower": ["flower", "--port", str(flower_port), "--address", "127.0.0.1"],
        }
        processes = {role: start_process([*PYTHON_CLI, *args], env, logs[role]) for role, args in commands.items()}
        try:
            url = f"http://127.0.0.1:{port}"
            assert wait_ready(url, 90, process=processes["gateway"]), logs["gateway"].read_text()[-3000:]
            stack = ObservedStack(url, f"http://127.0.0.1:{flower_port}", logs, traces)
            yield stack
        finally:
            for process in processes.values():
                stop_process(process)
            traces.close()


def poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError, httpx.HTTPError):
            found = check()
            if found:
                return found
        time.sleep(0.2)
    raise AssertionError(f"not {what} within {timeout}s")


@pytest.fixture(scope="module")
def one_study(observed: ObservedStack, data_dir: Path) -> dict[str, str]:
    """One DICOM instance of a named patient, sent with the client's request id, classified."""
    jpeg = sorted((data_dir / CHEST_TRAIN / "PNEUMONIA").glob("*.jpeg"))[0]
    ds = secondary_capture(jpeg)
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    request_id = f"pacs-{uuid.uuid4().hex[:12]}"
    with httpx.Client(base_url=observed.url, headers=ADMIN_HEADERS, timeout=60) as admin:
        key = {"name": "pacs", "organisation": "st-mary", "roles": ["submit"]}
        created = admin.post("/v1/api-keys", json=key).json()
    with httpx.Client(
        base_url=observed.url, headers={"Authorization": f"Bearer {created['key']}"}, timeout=60
    ) as client:
        response = client.post(
            "/v1/jobs",
            files={"file": ("study.dcm", part10(ds), "application/dicom")},
            headers={"X-Request-ID": request_id},
        )
        assert response.status_code == 202, response.text
        assert response.headers["X-Request-ID"] == request_id
        job_id = response.json()["id"]

        def finished() -> dict | None:
            job = client.get(f"/v1/jobs/{job_id}", params={"wait": 10}).json()
            return job if job["status"] in ("succeeded", "failed") else None

        job = poll(finished, 90, "classified")
    assert job["status"] == "succeeded", job
    return {"request_id": request_id, "job_id": job_id, "key_id": created["id"]}


def test_one_grep_follows_the_image_from_request_to_result(observed, one_study) -> None:
    request_id, job_id = one_study["request_id"], one_study["job_id"]

    def gateway_lines() -> list[dict]:
        return [line for line in observed.lines("gateway") if line.get("request_id") == request_id]

    lines = poll(gateway_lines, 10, "logged by the gateway")
    assert all(line["service"] == "gateway" for line in lines)
    [access] = [line for line in lines if line["logger"] == "xrayq.access"]
    assert (access["method"], access["route"], access["status"]) == ("POST", "/v1/jobs", 202)
    assert (access["key_id"], access["organisation"]) == (one_study["key_id"], "st-mary")
    assert access["duration_ms"] > 0
    assert any(job_id in line.get("job_ids", []) for line in lines)  # published under the request's id

    def worker_lines() -> list[dict]:
        return [line for line in observed.lines("worker") if line.get("job_id") == job_id]

    [finished] = poll(worker_lines, 10, "logged by the worker")
    assert finished["service"] == "worker" and finished["status"] == "succeeded"
    assert finished["request_id"] == request_id  # carried in the message's headers
    assert finished["organisation"] == "st-mary"
    assert finished["task"] == "xrayq.predict"


def test_no_log_line_names_the_patient(observed, one_study) -> None:
    for role in ("gateway", "worker"):
        text = observed.logs[role].read_text(errors="replace")
        assert one_study["job_id"] in text  # the log is the one that saw the image
        for identifier in (PATIENT_ID, "Lovelace", "Ada", "Augusta"):
            assert identifier not in text, f"{identifier} in the {role} log"


def test_the_worker_continues_the_trace_of_the_gateways_request(observed, one_study) -> None:
    def chain() -> tuple[Span, Span] | None:
        spans = list(observed.traces.spans)
        by_id = {span.span_id: span for span in spans}
        for run in (s for s in spans if s.service == "xrayq-worker" and s.name == "run/xrayq.predict"):
            # Up the worker's parents to the gateway's request span (POST /v1/jobs).
            ancestor = by_id.get(run.parent_id)
            while ancestor is not None and ancestor.parent_id in by_id:
                ancestor = by_id[ancestor.parent_id]
            if ancestor and ancestor.service == "xrayq-gateway" and ancestor.name == "POST /v1/jobs":
                return ancestor, run
        return None

    request, run = poll(chain, 20, "one trace from the gateway to the worker")
    assert request.trace_id == run.trace_id
    spans = observed.traces.spans
    services = {s.service for s in spans if s.trace_id == run.trace_id}
    assert services == {"xrayq-gateway", "xrayq-worker"}
    names = {s.name for s in spans if s.trace_id == run.trace_id}
    assert "apply_async/xrayq.predict" in names  # the publish, between the request and the run
    assert any(s.service == "xrayq-worker" and s.trace_id == run.trace_id and s.name != run.name for s in spans), (
        "the worker's database and object-store calls are spans of the same trace"
    )


def test_flower_shows_the_task_from_the_workers_events(observed, one_study) -> None:
    def predicted() -> list[dict]:
        tasks = httpx.get(f"{observed.flower_url}/api/tasks", auth=FLOWER_AUTH, timeout=5).json()
        return [task for task in tasks.values() if task["name"] == "xrayq.predict" and task["state"] == "SUCCESS"]

    tasks = poll(predicted, 20, "seen by Flower")
    assert any(one_study["job_id"] in (task.get("args") or "") for task in tasks)
    assert httpx.get(f"{observed.flower_url}/api/tasks", timeout=5).status_code == 401  # not without the password


def test_flower_refuses_to_listen_off_loopback_without_a_password() -> None:
    result = subprocess.run(
        [*PYTHON_CLI, "flower", "--address", "0.0.0.0"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "XRAYQ_FLOWER_BASIC_AUTH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "XRAYQ_FLOWER_BASIC_AUTH=user:password" in result.stderr
