"""Finding 6: a client's `callback_url` cannot make the server connect to loopback, link-local (cloud
metadata), private or compose-internal addresses, learns nothing about them from the answer, and signs
with a secret only its own organisation holds.

The real gateway app against the session's Postgres, Redis and S3; every refusal is checked to happen
before any connection (an audit hook records -- and would block -- every connect outside loopback)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from services.gateway.app import create_app
from shared.core.errors import XrayqError
from shared.db.models import Batch
from shared.db.session import Database
from shared.jobs import egress
from shared.jobs.callbacks import REFUSED, check_callback, organisation_secret, post_callback
from tests.conftest import ADMIN_HEADERS, settings_from_env
from tests.security.callback_receivers import GUARD, Receiver

pytestmark = pytest.mark.integration
SERVER_SECRET = "server-secret-of-the-ssrf-test-0123"


@pytest.fixture(scope="module")
def receiver():
    running = Receiver("ok")
    yield running
    running.close()


@pytest.fixture(scope="module")
def settings(services_env, services_settings):
    """As deployed: https to public addresses only, no network allowed by the admin."""
    return settings_from_env(
        services_env, callback_secret=SERVER_SECRET, callback_allowed_hosts={"org-a": ["hooks.org-a.example"]}
    )


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings), headers=ADMIN_HEADERS) as test_client:
        yield test_client


def key_of(client: TestClient, organisation: str) -> dict[str, str]:
    made = client.post(
        "/v1/api-keys", json={"name": f"{organisation}-key", "organisation": organisation, "roles": ["submit"]}
    )
    assert made.status_code == 201, made.text
    return {"Authorization": f"Bearer {made.json()['key']}"}


def submit(client: TestClient, chest_images, callback_url: str, headers: dict[str, str] | None = None):
    image = chest_images["NORMAL"][0]
    return client.post(
        "/v1/batches",
        files=[("files", (image.name, image.read_bytes(), "image/jpeg"))],
        data={"callback_url": callback_url},
        headers=headers,
    )


def batches_calling(settings, url: str) -> int:
    database = Database(settings.database_url)
    try:
        with database.session() as session:
            return session.scalar(select(func.count()).select_from(Batch).where(Batch.callback_url == url)) or 0
    finally:
        database.engine.dispose()


INTERNAL = [
    ("http://127.0.0.1:{port}/hooks/xrayq", "127.0.0.1"),  # loopback, over http, with no network allowed
    ("https://127.0.0.1:{port}/hooks/xrayq", "127.0.0.1"),
    ("http://localhost:{port}/hooks/xrayq", "127.0.0.1"),  # a name that resolves to loopback
    ("http://0x7f000001:{port}/hooks/xrayq", "127.0.0.1"),  # loopback written as one hex number
    ("https://[::1]:{port}/hooks/xrayq", "::1"),  # IPv6 loopback
    ("https://[::ffff:127.0.0.1]:{port}/hooks/xrayq", "::ffff:127.0.0.1"),  # IPv4-mapped IPv6 loopback
    ("https://169.254.169.254/latest/meta-data/iam/", "169.254.169.254"),  # cloud metadata
    ("https://[::ffff:a9fe:a9fe]/latest/meta-data/", "::ffff:169.254.169.254"),  # the same, IPv4-mapped
    ("https://10.0.0.1/hooks/xrayq", "10.0.0.1"),  # private range
    ("https://redis:6379/", "redis"),  # a compose-internal name
    ("http://8.8.8.8/hooks/xrayq", "8.8.8.8"),  # a public address, but http where https is required
]


@pytest.mark.parametrize(("template", "host"), INTERNAL)
def test_internal_destinations_are_refused_before_any_connection(
    client, settings, receiver, chest_images, template, host
) -> None:
    url = template.format(port=receiver.port)
    with GUARD.watching():
        response = submit(client, chest_images, url)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "callback_destination_refused"
    assert problem["detail"] == REFUSED  # one sentence for every reason: nothing about our network
    assert str(receiver.port) not in response.text and host not in problem["detail"]
    # Postgres, Redis and the S3 server live on 127.0.0.1 too (a fresh pool connection is fine): there,
    # only the receiver's port tells a callback attempt.
    assert host == "127.0.0.1" or not GUARD.reached(host)
    assert not any(isinstance(address, tuple) and address[1] == receiver.port for address in GUARD.attempts)
    assert receiver.connections == 0 and batches_calling(settings, url) == 0  # nothing stored to send later


def test_https_to_a_public_address_passes_the_check_without_connecting(settings) -> None:
    with GUARD.watching():
        assert check_callback("https://8.8.8.8/hooks/xrayq", None, settings, "org-b") == (
            "https://8.8.8.8/hooks/xrayq",
            None,  # signed with org-b's derived secret when sent
        )
    assert GUARD.attempts == []


def test_an_allowed_network_admits_local_receivers_only_for_organisations_that_may_use_the_host(
    services_env, receiver, chest_images
) -> None:
    local = settings_from_env(
        services_env,
        callback_secret=SERVER_SECRET,
        callback_allow_networks="127.0.0.0/8",
        callback_allowed_hosts={"org-a": ["hooks.org-a.example"]},
    )
    url = receiver.url
    assert check_callback(url, None, local, "org-b") == (url, None)  # the admin allowed the network
    with pytest.raises(XrayqError) as caught:
        check_callback(url, None, local, "org-a")  # org-a may call only its own hosts
    assert caught.value.code == "callback_destination_refused"
    with pytest.raises(XrayqError):
        check_callback(f"https://[::1]:{receiver.port}/", None, local, "org-b")  # outside the allowed network
    with TestClient(create_app(local), headers=ADMIN_HEADERS) as app_client:
        response = submit(app_client, chest_images, url, headers=key_of(app_client, "org-a"))
    assert response.status_code == 422 and response.json()["code"] == "callback_destination_refused"
    assert receiver.connections == 0


def test_a_dns_answer_that_changes_after_the_check_cannot_reach_a_refused_address(services_env, monkeypatch) -> None:
    """A resolver stub stands in for an attacker's DNS server (no test can change real DNS answers on
    this machine without affecting others): its name first resolves to an allowed address, then to a
    refused one. The connection goes only where the check of the same attempt allowed."""
    allowed = Receiver("ok", host="127.0.0.2")
    refused = Receiver("ok", host="127.0.0.1", port=allowed.port)  # where an unpinned connect would land
    settings = settings_from_env(services_env, callback_allow_networks="127.0.0.2/32", delivery_deadline_s=5)
    answers: list[list[str]] = []
    monkeypatch.setattr(egress, "resolve_addresses", lambda host, port, timeout_s: answers.pop(0))
    try:
        url = f"http://rebind.attacker.example:{allowed.port}/hooks/xrayq"
        answers[:] = [["127.0.0.2"], ["127.0.0.1"]]
        assert check_callback(url, "s" * 20, settings, "org-b")[0] == url  # at registration: allowed
        with pytest.raises(XrayqError) as caught:  # at delivery the name now points at loopback
            post_callback(url, "s" * 20, "batch.completed", "b1", {"x": 1}, settings, "org-b")
        assert caught.value.detail == "callback not sent: the destination is not allowed"
        assert refused.connections == allowed.connections == 0

        # An answer mixing an allowed and a refused address reaches only the allowed one, with the
        # name it was registered under as Host.
        answers[:] = [["127.0.0.1", "127.0.0.2"]]
        assert post_callback(url, "s" * 20, "batch.completed", "b2", {"x": 2}, settings, "org-b") == 204
        assert refused.connections == 0 and len(allowed.calls) == 1
        assert allowed.calls[0][0]["Host"] == f"rebind.attacker.example:{allowed.port}"
    finally:
        allowed.close()
        refused.close()


def test_each_organisation_gets_its_own_signing_secret(client, settings) -> None:
    a, b = organisation_secret(settings, "org-a"), organisation_secret(settings, "org-b")
    assert a and b and len({a, b, SERVER_SECRET}) == 3
    answer = client.get("/v1/callbacks/secret", headers=key_of(client, "org-a"))
    assert answer.status_code == 200 and answer.json() == {"organisation": "org-a", "secret": a}
    nosy = client.get("/v1/callbacks/secret", params={"organisation": "org-a"}, headers=key_of(client, "org-b"))
    assert nosy.status_code == 403
    assert client.get("/v1/callbacks/secret", params={"organisation": "org-b"}).json()["secret"] == b  # admin
