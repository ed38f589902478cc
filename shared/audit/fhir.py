"""The audit trail as FHIR R4 `AuditEvent` resources in a `Bundle` (IHE BALP style), for a hospital's
audit repository: the DICOM audit event type, the xrayq action code as subtype, the key as agent, the
gateway as source observer and the record acted on as entity."""

from __future__ import annotations

from typing import Any

from shared.db.models import AuditEvent, as_utc

DCM = "http://dicom.nema.org/resources/ontology/DCM"
XRAYQ_ACTIONS = "urn:xrayq:audit-action"
# Per action code: (DICOM event type code, its display, FHIR action C/R/U/D/E). Unlisted: a REST call.
EVENT_TYPES: dict[str, tuple[str, str, str]] = {
    "auth.failed": ("110114", "User Authentication", "E"),
    "key.created": ("110113", "Security Alert", "C"),
    "key.revoked": ("110113", "Security Alert", "D"),
}
REST = ("rest", "RESTful Operation", "E")
REST_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-type"


def fhir_bundle(events: list[AuditEvent], observer: str = "xrayq-gateway") -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "total": len(events),
        "entry": [{"fullUrl": f"urn:uuid:{event.id}", "resource": audit_event(event, observer)} for event in events],
    }


def audit_event(event: AuditEvent, observer: str) -> dict[str, Any]:
    code, display, action = EVENT_TYPES.get(event.action, REST)
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "who": {"identifier": {"system": "urn:xrayq:api-key", "value": event.actor_key_id or "bootstrap-or-unknown"}},
        "requestor": True,
    }
    if event.organisation:
        agent["who"]["display"] = event.organisation
    if event.source_address:
        agent["network"] = {"address": event.source_address, "type": "2"}  # 2: an IP address
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": event.id,
        "type": {"system": DCM if code != "rest" else REST_SYSTEM, "code": code, "display": display},
        "subtype": [{"system": XRAYQ_ACTIONS, "code": event.action}],
        "action": action,
        "recorded": as_utc(event.occurred_at).isoformat(),
        "outcome": "0" if event.outcome == "success" else "4",  # 0 success, 4 minor failure
        "agent": [agent],
        "source": {"observer": {"display": observer}},
        "extension": [{"url": "urn:xrayq:audit-chain", "valueString": f"{event.sequence}:{event.hash}"}],
    }
    if event.entity_id:
        resource["entity"] = [
            {"what": {"identifier": {"system": f"urn:xrayq:{event.entity_type}", "value": event.entity_id}}}
        ]
    return resource
