"""Prometheus (Debian's real binary) against a real services-mode stack: it scrapes the gateway, the
worker, the trainer and the DICOM receiver, evaluates xrayq's alert rules, sees one fire when the only
worker stops answering, and answers every query of the Grafana dashboard.

The rules are infra/prometheus/alerts.yml as shipped, with every `for:` shortened to one second and
evaluated each second, so the test waits seconds, not minutes. There is no Grafana binary here: the
dashboard's queries are what Grafana would send, run against this Prometheus."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pynetdicom import AE

from tests.conftest import free_port, services_env_of_its_own
from tests.e2e.conftest import SCU_AE_TITLE, Stack
from tests.monitoring import alert_rules, binary, dashboard_queries

pytestmark = pytest.mark.e2e
VERIFICATION = "1.2.840.10008.1.1"


class Prometheus:
    """A `prometheus` process scraping `targets` ({job: host:port}) every second, with `rules`."""

    def __init__(self, folder: Path, targets: dict[str, str], rules: dict[str, Any]) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        (folder / "alerts.yml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            # The gateway's scrape reads the database and pings the workers: a little more time.
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                | ({"scrape_interval": "2s", "scrape_timeout": "2s"} if job == "xrayq-gateway" else {})
                for job, target in targets.items()
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = folder / "prometheus.log"
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.http.get("/api/v1/query", params={"query": expr}).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def firing(self) -> set[str]:
        alerts = self.http.get("/api/v1/alerts").json()["data"]["alerts"]
        return {alert["labels"]["alertname"] for alert in alerts if alert["state"] == "firing"}

    def wait_for(
        self, what: str, check: Callable[[], bool], timeout: float = 30, missing: Callable[[], object] = list
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Not listening yet, or still starting (503 in plain text).
            with contextlib.suppress(httpx.TransportError, ValueError):
                if check():
                    return
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.2)  # polling interval, not a wait for an event
        raise AssertionError(f"not within {timeout}s: {what} {missing()}\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.http.close()
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def quick_rules() -> dict[str, Any]:
    """The shipped rules, each holding for one second instead of minutes."""
    rules = [{**rule, "for": "1s"} if "for" in rule else rule for rule in alert_rules()]
    return {"groups": [{"name": "xrayq", "rules": rules}]}


@pytest.fixture(scope="module")
def monitored_stack(services_env, tmp_path_factory, data_dir) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("monitoring-home")
    with services_env_of_its_own(services_env, home, "monitoring", data_dir) as env:
        stack = Stack(env, tmp_path_factory.mktemp("logs") / "monitoring.log")
        try:
            stack.start(timeout=300)  # generous: on a loaded machine four processes start on two cores
            yield stack
        finally:
            stack.stop()


@pytest.fixture
def prometheus(monitored_stack: Stack, tmp_path: Path) -> Iterator[Prometheus]:
    ports = {"xrayq-gateway": monitored_stack.port} | {
        f"xrayq-{role}": port for role, port in monitored_stack.metrics_ports.items()
    }
    server = Prometheus(tmp_path, {job: f"127.0.0.1:{port}" for job, port in ports.items()}, quick_rules())
    yield server
    server.stop()


def echo(stack: Stack, calling_ae_title: str) -> bool:
    """One C-ECHO association; whether it was accepted."""
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(VERIFICATION)
    association = ae.associate("127.0.0.1", stack.dicom_port, ae_title="XRAYQ")
    if not association.is_established:
        return False
    association.send_c_echo()
    association.release()
    return True


def test_prometheus_scrapes_the_stack_fires_an_alert_and_answers_the_dashboard(
    monitored_stack: Stack, prometheus: Prometheus, chest_images
) -> None:
    stack = monitored_stack
    jobs = ["xrayq-gateway", "xrayq-worker", "xrayq-trainer", "xrayq-dicom"]
    prometheus.wait_for(
        "every target up", lambda: {r["metric"]["job"] for r in prometheus.query("up == 1")} >= set(jobs)
    )

    # Traffic that every part of the dashboard can show: a job, a refused request, two DICOM callers.
    job_id = stack.http.post("/v1/jobs", files={"file": ("a.jpeg", chest_images["NORMAL"][0].read_bytes())}).json()[
        "id"
    ]
    refusal = stack.http.get("/v1/jobs/no-such-job")
    assert (refusal.status_code, refusal.json()["code"]) == (404, "job_not_found")
    assert echo(stack, SCU_AE_TITLE) and not echo(stack, "NOT-ALLOWED")
    deadline = time.monotonic() + 60
    while stack.http.get(f"/v1/jobs/{job_id}", params={"wait": 5}).json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the job did not succeed"
    scraped = (
        'xrayq_jobs_finished_total{status="succeeded"}',
        'xrayq_http_errors_total{code="job_not_found", status="404"}',
        'xrayq_dicom_associations_total{outcome="accepted"}',
        'xrayq_dicom_associations_total{outcome="rejected"}',
    )
    prometheus.wait_for(
        "the job, the refusal and the associations scraped",
        lambda: all(prometheus.query(expr) for expr in scraped),
        timeout=60,
        missing=lambda: [expr for expr in scraped if not prometheus.query(expr)],
    )

    # Every panel's query runs; those over state the stack has show it.
    answers = {expr: prometheus.query(expr) for _, expr in dashboard_queries()}
    for expr in (
        "max by (queue) (xrayq_queue_depth)",
        "max by (model, version, architecture) (xrayq_model_active_info)",
        "max by (status) (xrayq_training_runs)",
        "max(xrayq_deliveries_pending)",
        "xrayq_training_run_progress_ratio",  # the idle trainer's pool process, summed by its main process
        'sum by (job) (up{job=~"xrayq-.*"})',
    ):
        assert answers[expr], expr
    versions = answers["max by (model, version, architecture) (xrayq_model_active_info)"]
    assert versions[0]["metric"]["model"] == "chest-xray"

    # The only worker stops answering (frozen, so its supervisor does not restart it): the alert fires.
    prometheus.wait_for("no worker alert while it runs", lambda: "XrayqWorkerMissing" not in prometheus.firing())
    worker = stack.child_pid("worker")
    os.kill(worker, signal.SIGSTOP)
    try:
        prometheus.wait_for("XrayqWorkerMissing firing", lambda: "XrayqWorkerMissing" in prometheus.firing())
        assert prometheus.query('ALERTS{alertname="XrayqWorkerMissing", alertstate="firing", severity="critical"}')
    finally:
        os.kill(worker, signal.SIGCONT)
    prometheus.wait_for("the worker back", lambda: bool(prometheus.query('up{job="xrayq-worker"} == 1')))
    assert not {"XrayqGatewayDown", "XrayqTrainerMissing", "XrayqDicomReceiverDown", "XrayqNoActiveModel"} & (
        prometheus.firing()
    )
