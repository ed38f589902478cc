"""Prometheus' configuration and alert rules and the Grafana dashboard, checked offline by promtool:
the rules pass their unit tests (infra/prometheus/alerts_test.yml), every dashboard query parses, and
compose wires them as the README says. (There is no Grafana binary here: its files are checked as
data, and their queries run against a real Prometheus in tests/e2e/test_monitoring.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from shared.core.settings import Settings
from tests.monitoring import GRAFANA_DIR, PROMETHEUS_DIR, alert_rules, binary, dashboard, dashboard_queries
from tests.unit.cli.test_compose import COMPOSE

# The ports each scrape job reaches, as Settings defines them.
SCRAPED_PORTS = {
    "xrayq-gateway": Settings().port,
    "xrayq-worker": Settings().worker_metrics_port,
    "xrayq-trainer": Settings().trainer_metrics_port,
    "xrayq-dicom": Settings().dicom_metrics_port,
}


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_and_its_rules_are_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rules found" in result.stdout


def test_every_xrayq_process_is_scraped_on_its_compose_name_and_port() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, port in SCRAPED_PORTS.items():
        (discovery,) = jobs[name]["dns_sd_configs"]
        assert discovery["port"] == port, name
        assert all(service in services for service in discovery["names"]), discovery["names"]
    assert config["rule_files"] == ["alerts.yml"]


def test_every_alert_says_what_it_means_and_how_bad_it_is() -> None:
    rules = alert_rules()
    assert 10 <= len(rules) <= 20
    for rule in rules:
        assert rule["alert"].startswith("Xrayq"), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 40, rule["alert"]
    tested = (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    assert [rule["alert"] for rule in rules if f"alertname: {rule['alert']}\n" not in tested] == []


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses PromQL only inside rule files: each query becomes a recording rule."""
    queries = dashboard_queries()
    records = [{"record": f"panel_query_{n}", "expr": expr} for n, (_, expr) in enumerate(queries)]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", "queries.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(queries)} rules found" in result.stdout


def test_the_dashboard_shows_what_an_operator_watches() -> None:
    board = dashboard()
    panels = [panel for panel in board["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])
    text = " ".join(expr for _, expr in dashboard_queries())
    for metric in (
        "xrayq_jobs_finished_total",  # throughput
        "xrayq_job_end_to_end_seconds_bucket",  # latency percentiles
        "xrayq_queue_depth",
        "xrayq_batch_size_bucket",
        "xrayq_http_errors_total",  # errors by code
        "xrayq_job_failures_total",
        "xrayq_model_active_info",  # active versions
        "xrayq_training_run_progress_ratio",  # training progress
        "xrayq_deliveries_pending",
        "xrayq_delivery_attempts_total",
        "xrayq_dicom_associations_total",
    ):
        assert metric in text, metric
    datasource = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090"
    for panel in panels:
        assert panel["targets"] and panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert all(target["datasource"]["uid"] == source["uid"] for target in panel["targets"]), panel["title"]
    # Panels tile the grid without overlapping.
    cells = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & area, panel["title"]
        cells |= area


def test_compose_mounts_the_monitoring_files_and_grafana_has_no_default_password() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["monitoring"]
    for service in (prometheus, grafana):
        assert ":latest" not in service["image"] and ":" in service["image"]  # pinned
    mounted = {volume.split(":")[0] for volume in prometheus["volumes"] + grafana["volumes"]}
    for path in ("./infra/prometheus/prometheus.yml", "./infra/prometheus/alerts.yml",
                 "./infra/grafana/provisioning", "./infra/grafana/dashboards"):  # fmt: skip
        assert path in mounted and (COMPOSE.parent / path).exists(), path
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    # The container's start command, as compose hands it to /bin/sh ($$ is a literal $).
    script = grafana["command"][0].replace("$$", "$")
    refused = subprocess.run(["/bin/sh", "-c", script], env={}, capture_output=True, text=True, timeout=10)
    assert refused.returncode == 1 and "set GRAFANA_ADMIN_PASSWORD" in refused.stderr
    started = subprocess.run(
        ["/bin/sh", "-c", script], env={"GF_SECURITY_ADMIN_PASSWORD": "s3cret"}, capture_output=True, text=True
    )
    assert "run.sh" in started.stderr  # it went on to Grafana's own start script (absent here)
