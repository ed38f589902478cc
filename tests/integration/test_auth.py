"""API keys with roles and organisations, on the real gateway over real Postgres: no endpoint answers
data to a missing, wrong, revoked or under-privileged key, and a client sees only its organisation's."""

from __future__ import annotations

import uuid

import pytest


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keys(client) -> dict[str, str]:
    """Keys made through the API by the bootstrap admin key: two hospitals and a data scientist."""
    made = {}
    for name, organisation, roles in (
        ("pacs-a", "hospital-a", ["submit"]),
        ("pacs-b", "hospital-b", ["submit"]),
        ("scientist", "hospital-a", ["train"]),
    ):
        response = client.post("/v1/api-keys", json={"name": name, "organisation": organisation, "roles": roles})
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["key"].startswith(body["key_prefix"])
        made[name] = body["key"]
        made[f"{name}-id"] = body["id"]
    return made


def submit(client, headers, image) -> str:
    response = client.post("/v1/jobs", files={"file": (image.name, image.read_bytes())}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_requests_without_a_valid_key_get_401(client, chest_images) -> None:
    image = chest_images["NORMAL"][15]
    job_id = submit(client, {}, image)  # the client fixture sends the admin key by default
    for headers in ({"Authorization": ""}, bearer("xq_wrong"), {"Authorization": "Basic dXNlcjpwYXNz"}):
        for method, path in (
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", "/v1/jobs"),
            ("GET", "/v1/models"),
            ("GET", "/v1/api-keys"),
            ("POST", "/v1/api-keys"),
        ):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["code"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
        refused = client.post("/v1/jobs", files={"file": (image.name, image.read_bytes())}, headers=headers)
        assert refused.status_code == 401


def test_health_readiness_and_metrics_stay_open(client) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 200


def test_roles_are_enforced(client, keys, chest_images) -> None:
    image = chest_images["NORMAL"][16]
    scientist = bearer(keys["scientist"])
    response = client.post("/v1/jobs", files={"file": (image.name, image.read_bytes())}, headers=scientist)
    assert response.status_code == 403 and response.json()["code"] == "forbidden"
    assert client.get("/v1/api-keys", headers=bearer(keys["pacs-a"])).status_code == 403
    assert client.get("/v1/models", headers=scientist).status_code == 200


def test_an_organisation_sees_only_its_own_jobs_and_batches(client, keys, chest_images) -> None:
    a, b = bearer(keys["pacs-a"]), bearer(keys["pacs-b"])
    job_a = submit(client, a, chest_images["NORMAL"][17])
    batch = client.post(
        "/v1/batches", files=[("files", (p.name, p.read_bytes())) for p in chest_images["NORMAL"][18:20]], headers=a
    ).json()["id"]
    assert client.get(f"/v1/jobs/{job_a}", headers=a).status_code == 200
    assert client.get(f"/v1/jobs/{job_a}", headers=b).json()["code"] == "job_not_found"  # 404: not even existence
    assert client.get(f"/v1/batches/{batch}", headers=b).status_code == 404
    assert client.delete(f"/v1/jobs/{job_a}", headers=b).status_code == 404
    assert job_a not in {job["id"] for job in client.get("/v1/jobs", headers=b).json()}
    assert job_a in {job["id"] for job in client.get("/v1/jobs", headers=a).json()}
    assert client.get(f"/v1/jobs/{job_a}").status_code == 200  # admin sees every organisation


def test_idempotency_keys_are_per_organisation(client, keys, chest_images) -> None:
    key = f"shared-{uuid.uuid4()}"
    image = chest_images["NORMAL"][21]
    files = {"file": (image.name, image.read_bytes())}
    first = client.post("/v1/jobs", files=files, headers={**bearer(keys["pacs-a"]), "Idempotency-Key": key})
    other = client.post("/v1/jobs", files=files, headers={**bearer(keys["pacs-b"]), "Idempotency-Key": key})
    assert first.status_code == other.status_code == 202
    assert first.json()["id"] != other.json()["id"]


def test_a_revoked_key_stops_working(client, chest_images) -> None:
    made = client.post("/v1/api-keys", json={"name": "temp", "organisation": "hospital-c", "roles": ["submit"]}).json()
    assert client.get("/v1/jobs", headers=bearer(made["key"])).status_code == 200
    revoked = client.delete(f"/v1/api-keys/{made['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert client.get("/v1/jobs", headers=bearer(made["key"])).status_code == 401
    listed = {k["id"]: k for k in client.get("/v1/api-keys").json()}
    assert listed[made["id"]]["revoked_at"] and "key" not in listed[made["id"]]


def test_bad_key_requests_are_422(client) -> None:
    assert client.post("/v1/api-keys", json={"name": "x", "organisation": "y", "roles": ["root"]}).status_code == 422
    assert client.post("/v1/api-keys", json={"name": "", "organisation": "y", "roles": ["submit"]}).status_code == 422
    assert client.delete("/v1/api-keys/nope").status_code == 404
