"""The audit trail on the real gateway over real Postgres: events recorded where they happen, readable by
admins only, hash-chained so that an edited row is found, and kept valid under concurrent writers."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta

from sqlalchemy import text

from shared.audit import Actor, record, verify_chain
from shared.audit.recorder import event_hash
from shared.db.session import database_for


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def events(client, **filters) -> list[dict]:
    response = client.get("/v1/audit-events", params=filters)
    assert response.status_code == 200, response.text
    return response.json()["events"]


def make_key(client, organisation: str, roles: list[str]) -> dict:
    response = client.post("/v1/api-keys", json={"name": "audit-test", "organisation": organisation, "roles": roles})
    assert response.status_code == 201, response.text
    return response.json()


def test_key_creation_and_revocation_are_recorded_with_who_and_which_key(client) -> None:
    organisation = f"hospital-{uuid.uuid4().hex[:8]}"
    key = make_key(client, organisation, ["submit"])
    assert client.delete(f"/v1/api-keys/{key['id']}").status_code == 200

    created, revoked = events(client, entity_id=key["id"])
    assert created["action"] == "key.created" and revoked["action"] == "key.revoked"
    assert created["outcome"] == "success" and created["entity_type"] == "api_key"
    assert created["detail"] == {"organisation": organisation, "roles": ["submit"]}
    assert created["organisation"] == "admin"  # the bootstrap admin key acted (it has no key id)
    assert created["actor_key_id"] is None and created["source_address"] == "testclient"
    assert key["key"] not in str(created)  # the secret itself is never recorded
    assert revoked["sequence"] > created["sequence"]


def test_failed_authentication_is_recorded_with_its_address_never_the_key(client) -> None:
    guess = f"xq_{uuid.uuid4().hex}"
    assert client.get("/v1/jobs", headers=bearer(guess)).status_code == 401
    failure = events(client, action="auth.failed")[-1]
    assert failure["outcome"] == "failure" and failure["source_address"] == "testclient"
    assert failure["detail"] == {"code": "unauthorized", "credential": "api_key"}
    assert guess not in str(failure)


def test_only_admins_read_the_audit_trail(client) -> None:
    submitter = make_key(client, "hospital-a", ["submit"])["key"]
    trainer = make_key(client, "hospital-a", ["train"])["key"]
    for key in (submitter, trainer):
        for path in ("/v1/audit-events", "/v1/audit-events/verify"):
            response = client.get(path, headers=bearer(key))
            assert response.status_code == 403 and response.json()["code"] == "forbidden"
    admin = make_key(client, "hospital-b", ["admin"])
    listed = client.get("/v1/audit-events", params={"action": "key.created"}, headers=bearer(admin["key"]))
    assert listed.status_code == 200 and listed.json()["events"]


def test_the_cursor_pages_through_the_filtered_trail(client) -> None:
    organisation = f"hospital-{uuid.uuid4().hex[:8]}"
    ids = [make_key(client, organisation, ["submit"])["id"] for _ in range(3)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"action": "key.created", "limit": 2, **({"cursor": cursor} if cursor is not None else {})}
        page = client.get("/v1/audit-events", params=params).json()
        seen += [event["entity_id"] for event in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen[-3:] == ids and len(seen) == len(set(seen))


def test_the_chain_verifies_and_a_tampered_record_is_found_at_its_sequence(client, services_settings) -> None:
    key = make_key(client, "hospital-a", ["submit"])
    assert client.get("/v1/audit-events/verify").json()["ok"] is True
    (event,) = events(client, entity_id=key["id"])
    database = database_for(services_settings)
    change = text("UPDATE audit_events SET detail = CAST(:detail AS JSON) WHERE sequence = :sequence")
    try:
        with database.session() as session:
            session.execute(
                change, {"detail": '{"organisation": "hospital-a", "roles": ["admin"]}', "sequence": event["sequence"]}
            )
        check = client.get("/v1/audit-events/verify").json()
        assert check == {"ok": False, "events": check["events"], "first_broken_sequence": event["sequence"]}
    finally:  # put it back: the other tests share this database's chain
        with database.session() as session:
            session.execute(
                change, {"detail": '{"organisation": "hospital-a", "roles": ["submit"]}', "sequence": event["sequence"]}
            )
    assert client.get("/v1/audit-events/verify").json()["ok"] is True


def test_concurrent_writers_keep_the_chain_valid(client, services_settings) -> None:
    database = database_for(services_settings)
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            start.wait(timeout=10)
            for index in range(20):
                with database.session() as session:
                    record(session, "test.concurrent", Actor(organisation=name), detail={"index": index})
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(name,)) for name in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    with database.session() as session:
        check = verify_chain(session)
    assert check.ok, check
    assert len(events(client, action="test.concurrent", limit=1000)) >= 40


def test_the_fhir_export_is_a_bundle_of_audit_events(client) -> None:
    key = make_key(client, "hospital-a", ["submit"])
    assert client.get("/v1/jobs", headers=bearer("xq_not-a-key")).status_code == 401
    bundle = client.get("/v1/audit-events/fhir", params={"since": "2000-01-01T00:00:00Z"}).json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    resources = [entry["resource"] for entry in bundle["entry"]]
    assert bundle["total"] == len(resources) > 0
    for resource in resources:  # AuditEvent's required elements (FHIR R4): type, recorded, agent, source
        assert resource["resourceType"] == "AuditEvent"
        assert resource["type"]["code"] and resource["type"]["system"].startswith("http")
        assert datetime.fromisoformat(resource["recorded"]).tzinfo is not None
        assert resource["agent"] and all(isinstance(agent["requestor"], bool) for agent in resource["agent"])
        assert resource["source"]["observer"]
        assert resource["outcome"] in {"0", "4", "8", "12"} and resource["action"] in set("CRUDE")
    created = next(
        r for r in resources if r.get("entity", [{}])[0].get("what", {}).get("identifier", {}).get("value") == key["id"]
    )
    assert created["type"]["code"] == "110113" and created["subtype"][0]["code"] == "key.created"
    failed = [r for r in resources if r["subtype"][0]["code"] == "auth.failed"]
    assert failed and failed[-1]["outcome"] == "4" and failed[-1]["type"]["code"] == "110114"
    assert failed[-1]["agent"][0]["network"]["address"] == "testclient"
    assert (
        client.get("/v1/audit-events/fhir", headers=bearer(make_key(client, "h", ["submit"])["key"])).status_code == 403
    )


def test_retention_purges_a_prefix_and_the_rest_still_verifies(tmp_path) -> None:
    from shared.audit import purge_old_audit_events
    from shared.core.settings import Settings
    from shared.db.migrate import upgrade_database
    from shared.db.models import AuditEvent, utcnow
    from shared.db.session import Database

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'audit.db'}", audit_retention_days=1)
    upgrade_database(settings)
    database = Database(settings.database_url)
    try:
        for index in range(5):
            with database.session() as session:
                event = record(session, "key.created", Actor(organisation="a"), detail={"index": index})
                if index < 3:  # recorded two days ago (the hash covers the time, so it is recorded so)
                    event.occurred_at = utcnow() - timedelta(days=2)
                    event.hash = event_hash(event)
        assert purge_old_audit_events(settings, database) == 3
        with database.session() as session:
            assert [row.sequence for row in session.query(AuditEvent).order_by(AuditEvent.sequence)] == [4, 5]
            assert verify_chain(session).ok
        assert purge_old_audit_events(settings, database) == 0
    finally:
        database.engine.dispose()
