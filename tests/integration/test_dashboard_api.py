"""What the dashboard relies on, over the real gateway on Postgres: sessions that stand in for a key
(and end with it), CSRF on cookie-made changes, model files out and who took them, filtered lists,
the operations summary of /metrics, and the pages' headers."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from shared.db.models import BrowserSession
from shared.db.session import database_for


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keys(client) -> dict[str, str]:
    made = {}
    for name, organisation, roles in (
        ("ward", "dash-north", ["submit"]),
        ("lab", "dash-north", ["submit", "train"]),
        ("other", "dash-south", ["submit"]),
    ):
        response = client.post("/v1/api-keys", json={"name": name, "organisation": organisation, "roles": roles})
        assert response.status_code == 201, response.text
        made[name], made[f"{name}-id"] = response.json()["key"], response.json()["id"]
    return made


def browser_of(client, base_url: str = "http://testserver") -> TestClient:
    """A client of the same app with a cookie jar of its own and no key: what a browser tab is. It runs
    on the module client's event loop (its portal), where the app's async Redis connections live."""
    tab = TestClient(client.app, base_url=base_url)
    tab.portal = client.portal
    return tab


def signed_in(client, key: str) -> tuple[TestClient, str]:
    tab = browser_of(client)
    response = tab.post("/v1/session", headers=bearer(key))
    assert response.status_code == 200, response.text
    return tab, response.json()["csrf_token"]


def submit(client, headers, image, **data) -> dict:
    response = client.post("/v1/jobs", files={"file": (image.name, image.read_bytes())}, data=data, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


def test_a_session_cookie_acts_for_its_key_and_never_holds_it(client, keys, services_settings, chest_images) -> None:
    tab = browser_of(client)
    response = tab.post("/v1/session", headers=bearer(keys["ward"]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["organisation"] == "dash-north" and body["roles"] == ["submit"] and not body["open_mode"]
    cookie = response.headers["set-cookie"]
    assert re.search(r"(?i)httponly", cookie) and re.search(r"(?i)samesite=strict", cookie)
    assert "secure" not in cookie.lower()  # plain http here; over TLS see the next test
    token = tab.cookies["xrayq_session"]
    assert token != keys["ward"] and keys["ward"] not in response.text

    assert tab.get("/v1/session").json()["organisation"] == "dash-north"
    assert tab.get("/v1/jobs").status_code == 200
    assert tab.get("/v1/training-runs").status_code == 403  # what the key may not, the session may not

    # A change made with the cookie needs the session's CSRF token.
    image = chest_images["NORMAL"][20]
    files = {"file": (image.name, image.read_bytes())}
    refused = tab.post("/v1/jobs", files=files)
    assert refused.status_code == 403 and refused.json()["code"] == "csrf_token_invalid"
    wrong = tab.post("/v1/jobs", files=files, headers={"X-Xrayq-CSRF": "0" * 64})
    assert wrong.status_code == 403
    accepted = tab.post("/v1/jobs", files=files, headers={"X-Xrayq-CSRF": body["csrf_token"]})
    assert accepted.status_code == 202, accepted.text

    # A session never opens another; signing out ends it.
    again = tab.post("/v1/session", headers={"X-Xrayq-CSRF": body["csrf_token"]})
    assert again.status_code == 401
    assert tab.delete("/v1/session", headers={"X-Xrayq-CSRF": body["csrf_token"]}).status_code == 204
    stale = browser_of(client)
    stale.cookies.set("xrayq_session", token)
    assert stale.get("/v1/jobs").status_code == 401

    with database_for(services_settings).session() as session:  # only the token's hash was ever stored
        stored = session.get(BrowserSession, hashlib.sha256(token.encode()).hexdigest())
        assert stored is None


def test_the_cookie_is_secure_over_tls(client, keys) -> None:
    tab = browser_of(client, base_url="https://testserver")
    response = tab.post("/v1/session", headers=bearer(keys["ward"]))
    assert response.status_code == 200
    assert "secure" in response.headers["set-cookie"].lower()


def test_a_session_ends_when_it_expires_or_its_key_is_revoked(client, keys, services_settings) -> None:
    key = client.post("/v1/api-keys", json={"name": "temp", "organisation": "dash-north", "roles": ["submit"]}).json()
    expiring, _ = signed_in(client, key["key"])
    revoked, _ = signed_in(client, key["key"])
    token = expiring.cookies["xrayq_session"]
    with database_for(services_settings).session() as session:
        session.execute(
            update(BrowserSession)
            .where(BrowserSession.token_sha256 == hashlib.sha256(token.encode()).hexdigest())
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    response = expiring.get("/v1/jobs")
    assert response.status_code == 401 and response.json()["code"] == "session_expired"
    assert expiring.get("/classify").text.count('id="sign-in-form"') == 1  # the page asks for the key again

    assert revoked.get("/v1/jobs").status_code == 200
    assert client.delete(f"/v1/api-keys/{key['id']}").status_code == 200
    response = revoked.get("/v1/jobs")
    assert response.status_code == 401 and response.json()["code"] == "session_expired"


def test_pages_need_a_session_and_forbid_inline_scripts(client, keys) -> None:
    tab = browser_of(client)
    page = tab.get("/classify")
    assert page.status_code == 200 and 'id="sign-in-form"' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy and "frame-ancestors 'none'" in policy
    assert "<script>" not in page.text  # every script is a file under /static
    tab, _ = signed_in(client, keys["ward"])
    assert tab.get("/", follow_redirects=False).headers["location"] == "/classify"
    training = tab.get("/training").text
    assert 'id="no-training"' in training and 'id="run-form"' not in training
    assert 'href="/training"' not in training  # not in the navigation either
    assert tab.get("/static/common.js").headers["content-type"].startswith("text/javascript")
    assert tab.get("/static/..%2Fpages.py").status_code == 404


def test_weights_and_card_come_out_and_each_download_is_recorded(client, keys, services_model) -> None:
    name, version = services_model["name"], services_model["version"]
    tab, _ = signed_in(client, keys["lab"])
    weights = tab.get(f"/v1/models/{name}/versions/{version}/weights")
    assert weights.status_code == 200
    digest = hashlib.sha256(weights.content).hexdigest()
    assert weights.headers["x-xrayq-sha256"] == digest
    assert client.get(f"/v1/models/{name}/versions/{version}").json()["weights_sha256"] == digest
    assert weights.headers["content-disposition"] == f'attachment; filename="{name}-v{version}.safetensors"'
    from safetensors.torch import load

    assert load(weights.content)  # a real safetensors file

    card = tab.get(f"/v1/models/{name}/versions/{version}/card")
    assert card.status_code == 200 and card.json()["architecture"]
    assert "dataset_id" not in card.text  # a shared model's provenance is the admins'
    assert client.get(f"/v1/models/{name}/versions/{version}/card").json().keys() >= card.json().keys()
    assert client.get(f"/v1/models/{name}/versions/999/weights").json()["code"] == "model_not_found"
    assert client.get("/v1/models/no-such-model/downloads").status_code == 404

    south = client.get(f"/v1/models/{name}/versions/{version}/card", headers=bearer(keys["other"]))
    assert south.status_code == 200
    everyone = client.get(f"/v1/models/{name}/downloads").json()  # admin: every download
    assert {("weights", "dash-north"), ("card", "dash-north"), ("card", "dash-south")} <= {
        (row["file"], row["organisation"]) for row in everyone
    }
    own = tab.get(f"/v1/models/{name}/downloads").json()  # north: its own only
    assert own and {row["organisation"] for row in own} == {"dash-north"}
    assert {row["api_key_id"] for row in own} == {keys["lab-id"]}


def test_lists_filter_and_never_cross_organisations(client, keys, chest_images) -> None:
    started = datetime.now(UTC) - timedelta(seconds=1)
    north = submit(client, bearer(keys["ward"]), chest_images["NORMAL"][21], client_ref="dash-ref-north")
    south = submit(client, bearer(keys["other"]), chest_images["NORMAL"][22], client_ref="dash-ref-south")
    image = chest_images["PNEUMONIA"][21]
    batch = client.post(
        "/v1/batches",
        files=[("files", (image.name, image.read_bytes())), ("files", ("b.png", image.read_bytes()))],
        data={"client_ref": "dash-batch-north"},
        headers=bearer(keys["ward"]),
    ).json()

    def job_ids(headers, **params) -> set[str]:
        response = client.get("/v1/jobs", params=params, headers=headers)
        assert response.status_code == 200, response.text
        return {job["id"] for job in response.json()}

    assert north["id"] in job_ids(bearer(keys["ward"]), client_ref="dash-ref-north")
    assert job_ids(bearer(keys["ward"]), client_ref="dash-ref-south") == set()
    assert job_ids(bearer(keys["other"]), client_ref="dash-ref-south") == {south["id"]}
    assert north["id"] in job_ids(bearer(keys["ward"]), created_after=started.isoformat(), model="chest-xray")
    assert job_ids(bearer(keys["ward"]), model="another-model") == set()
    assert job_ids(bearer(keys["ward"]), created_before=started.isoformat(), client_ref="dash-ref-north") == set()

    batches = client.get("/v1/batches", params={"client_ref": "dash-batch-north"}, headers=bearer(keys["ward"])).json()
    assert [(b["id"], b["total"]) for b in batches] == [(batch["id"], 2)]
    assert (
        client.get("/v1/batches", params={"client_ref": "dash-batch-north"}, headers=bearer(keys["other"])).json() == []
    )
    state = client.get("/v1/batches", params={"client_ref": "dash-batch-north", "state": "active"}).json()
    finished = client.get("/v1/batches", params={"client_ref": "dash-batch-north", "state": "finished"}).json()
    assert len(state) + len(finished) == 1  # no worker here: active until one runs its jobs
    assert client.get("/v1/batches", params={"state": "sideways"}).status_code == 422


def test_operations_summarise_what_metrics_serves(client, keys) -> None:
    assert client.get("/v1/operations", headers=bearer(keys["ward"])).status_code == 403
    operations = client.get("/v1/operations").json()
    metrics = client.get("/metrics").text
    for status, count in operations["jobs_by_status"].items():
        served = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("xrayq_jobs{") and f'status="{status}"' in line
        )
        assert served == count
    assert operations["active_versions"][0]["model"] == "chest-xray"
    assert "predict" in operations["queue_depths"]
    assert any(row["route"] == "/v1/jobs" and row["p50"] is not None for row in operations["latency"])
