"""Where a study's Structured Report goes: only to the destinations of the organisation that sent it.

A destination belongs to one organisation (table `sr_destinations`, managed by admins through
`/v1/sr-destinations`; XRAYQ_DICOM_SR_DESTINATION is one more, named `configured`, for the
organisation XRAYQ_DICOM_SR_ORGANISATION). A batch's organisation is that of its authenticated source
-- the API key that submitted it, or the allow-list entry of the DICOM sender -- so a sender of one
organisation can never make a report go to another's PACS, whatever the instances say.

A delivery records the destination's name and id, never its address: batch views show the name, and
the address is looked up again when the report is sent, so a destination removed meanwhile receives
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.core.errors import XrayqError
from shared.core.settings import Settings
from shared.db.models import Batch, SrDestination, as_utc
from shared.db.session import Database
from shared.imaging.dimse import RemoteAE, parse_remote_ae
from shared.schemas import SrDestinationCreate, SrDestinationView

SR_DELIVERY = "sr_store"
CONFIGURED = "configured"  # the destination of XRAYQ_DICOM_SR_DESTINATION


@dataclass(frozen=True)
class Destination:
    id: str
    name: str
    address: RemoteAE | None  # None: XRAYQ_DICOM_SR_DESTINATION cannot be read; its deliveries fail visibly


def is_sr_delivery(name: str) -> bool:
    return name == SR_DELIVERY or name.startswith(f"{SR_DELIVERY}:")


def destinations_of(session: Session, settings: Settings, organisation: str | None) -> list[Destination]:
    """The SR destinations of one organisation; none for studies without one (the open mode's HTTP)."""
    if organisation is None:
        return []
    found = []
    if settings.dicom_sr_destination and organisation == settings.dicom_sr_destination_organisation:
        try:
            configured: RemoteAE | None = parse_remote_ae(settings.dicom_sr_destination)
        except XrayqError:
            configured = None
        found.append(Destination(CONFIGURED, CONFIGURED, configured))
    rows = session.scalars(
        select(SrDestination).where(SrDestination.organisation == organisation).order_by(SrDestination.name)
    )
    found.extend(Destination(row.id, row.name, RemoteAE(row.ae_title, row.host, row.port)) for row in rows)
    return found


def choose_sr_deliveries(session: Session, settings: Settings, batch: Batch) -> dict[str, dict[str, Any]]:
    """The deliveries of a batch's report: one per destination of the batch's own organisation."""
    return {
        f"{SR_DELIVERY}:{destination.name}": {
            "status": "pending",
            "attempts": 0,
            "target": destination.name,
            "destination_id": destination.id,
        }
        for destination in destinations_of(session, settings, batch.organisation)
    }


def sr_delivery_address(database: Database, settings: Settings, batch_id: str, state: dict[str, Any]) -> RemoteAE:
    """Where to send a report now: the destination still configured for the batch's organisation."""
    with database.session() as session:
        organisation = session.scalars(select(Batch.organisation).where(Batch.id == batch_id)).first()
        wanted = state.get("destination_id", CONFIGURED)  # deliveries made before 0007 went to the configured one
        for destination in destinations_of(session, settings, organisation):
            if destination.id == wanted and destination.address is not None:
                return destination.address
            if destination.id == wanted:
                raise XrayqError("delivery_failed", "XRAYQ_DICOM_SR_DESTINATION is not AE_TITLE@host:port.")
    raise XrayqError("delivery_failed", "The SR destination was removed or no longer serves this organisation.")


def destination_view(row: SrDestination) -> SrDestinationView:
    view = SrDestinationView.model_validate(row, from_attributes=True)
    return view.model_copy(update={"created_at": as_utc(row.created_at)})  # SQLite's are naive


def create_destination(session: Session, body: SrDestinationCreate) -> SrDestination:
    if body.name == CONFIGURED:
        raise XrayqError("sr_destination_exists", f"The name {CONFIGURED!r} is XRAYQ_DICOM_SR_DESTINATION's.")
    row = SrDestination(**body.model_dump())
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        raise XrayqError(
            "sr_destination_exists", f"{body.organisation} already has an SR destination named {body.name!r}."
        ) from None
    return row


def list_destinations(session: Session) -> list[SrDestination]:
    return list(session.scalars(select(SrDestination).order_by(SrDestination.organisation, SrDestination.name)))


def delete_destination(session: Session, destination_id: str) -> SrDestination:
    row = session.get(SrDestination, destination_id)
    if row is None:
        raise XrayqError("sr_destination_not_found", f"No SR destination with id {destination_id!r}.")
    session.delete(row)
    return row
