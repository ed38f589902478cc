"""The dashboard in the open embedded mode: pages without signing in, still only for the gateway's own
host names, with their scripts as files the Content-Security-Policy admits (no model needed)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.ui.pages import PAGES, STATIC
from shared.core.settings import Settings
from shared.db.migrate import upgrade_database


@pytest.fixture(scope="module")
def open_gateway(tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("open-home"), auth="off")
    upgrade_database(settings)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        yield client


def test_every_page_opens_without_signing_in(open_gateway) -> None:
    assert open_gateway.get("/", follow_redirects=False).headers["location"] == "/classify"
    for page in PAGES:
        response = open_gateway.get(page.path)
        assert response.status_code == 200, page.path
        assert 'id="sign-in-form"' not in response.text and "open mode" in response.text
        for script in re.findall(r'<script src="/static/([^"]+)"', response.text):
            assert script in STATIC  # every script it loads ships with the gateway
        assert "<script>" not in response.text
        assert all(f'href="{other.path}"' in response.text for other in PAGES)  # every page in the navigation
    session = open_gateway.get("/v1/session").json()
    assert session["open_mode"] and session["csrf_token"] is None


def test_a_foreign_host_name_gets_no_page(open_gateway) -> None:
    response = open_gateway.get("/classify", headers={"Host": "attacker.example"})
    assert response.status_code == 421 and response.json()["code"] == "host_not_allowed"
