"""What an operator watches (the dashboard's Operations page): the `/metrics` numbers, summarised."""

from __future__ import annotations

from fastapi import APIRouter

from services.gateway.access import GuardedRoute
from services.gateway.deps import AdminDep, MetricsDep
from services.gateway.operations import operations_snapshot
from services.gateway.problems import PROBLEMS
from shared.schemas import OperationsView

router = APIRouter(prefix="/v1/operations", tags=["dashboard"], route_class=GuardedRoute)


@router.get("", response_model=OperationsView, responses=PROBLEMS)
def read_operations(_: AdminDep, registry: MetricsDep) -> OperationsView:
    """Jobs by status, the error rates, request latency percentiles per route, queue depths, workers
    answering, active versions (admin: the counts span every organisation)."""
    return OperationsView(**operations_snapshot(registry))
