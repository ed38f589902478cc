"""What the gateway says about itself to whoever reaches it: `XRAYQ_METRICS_ACCESS` and `XRAYQ_API_DOCS`,
on the real app over real Postgres (the admin key is the one the bootstrap made)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from tests.conftest import ADMIN_HEADERS

DOCUMENTATION = ("/docs", "/redoc", "/openapi.json")


def gateway(settings, **update) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=update)))


def test_by_default_metrics_and_documentation_are_served_to_anyone(services_settings, services_model) -> None:
    with gateway(services_settings) as client:
        assert client.get("/metrics").status_code == 200
        for path in DOCUMENTATION:
            assert client.get(path).status_code == 200, path


def test_metrics_for_admin_keys_only(services_settings, services_model) -> None:
    with gateway(services_settings, metrics_access="key") as client:
        assert client.get("/metrics").status_code == 401
        submitter = client.post(
            "/v1/api-keys",
            json={"name": "not-admin", "organisation": "hospital-a", "roles": ["submit"]},
            headers=ADMIN_HEADERS,
        ).json()["key"]
        assert client.get("/metrics", headers={"Authorization": f"Bearer {submitter}"}).status_code == 403
        scraped = client.get("/metrics", headers=ADMIN_HEADERS)
        assert scraped.status_code == 200 and "xrayq_" in scraped.text
        assert client.get("/healthz").status_code == 200  # health stays open


@pytest.mark.parametrize("setting", [{"metrics_access": "off"}, {"api_docs": "off"}])
def test_off_means_not_served(services_settings, services_model, setting) -> None:
    with gateway(services_settings, **setting) as client:
        hidden = ("/metrics",) if "metrics_access" in setting else DOCUMENTATION
        for path in hidden:
            assert client.get(path, headers=ADMIN_HEADERS).status_code == 404, path
        shown = DOCUMENTATION if "metrics_access" in setting else ("/metrics",)
        for path in shown:
            assert client.get(path).status_code == 200, path
