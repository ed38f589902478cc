"""Where each organisation's Structured Reports go by C-STORE (role `admin`): create, list, delete.

Only admins see addresses; an organisation's batches show its destinations by name.
"""

from __future__ import annotations

from fastapi import APIRouter

from services.gateway.access import GuardedRoute
from services.gateway.deps import AdminDep, SessionDep
from services.gateway.problems import PROBLEMS
from shared.jobs.sr_destinations import create_destination, delete_destination, destination_view, list_destinations
from shared.schemas import SrDestinationCreate, SrDestinationView

router = APIRouter(prefix="/v1/sr-destinations", tags=["sr destinations"], route_class=GuardedRoute)


@router.post("", status_code=201, response_model=SrDestinationView, responses=PROBLEMS)
def create(body: SrDestinationCreate, session: SessionDep, _: AdminDep) -> SrDestinationView:
    return destination_view(create_destination(session, body))


@router.get("", response_model=list[SrDestinationView], responses=PROBLEMS)
def list_all(session: SessionDep, _: AdminDep) -> list[SrDestinationView]:
    return [destination_view(row) for row in list_destinations(session)]


@router.delete("/{destination_id}", response_model=SrDestinationView, responses=PROBLEMS)
def delete(destination_id: str, session: SessionDep, _: AdminDep) -> SrDestinationView:
    return destination_view(delete_destination(session, destination_id))
