"""Every router checks the caller before its routes read a body (`GuardedRoute`): a router added without it
would answer 401 to everyone, so this catches the omission before a test of that router does."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import services.gateway.routes as routes_package
from services.gateway.access import GuardedRoute

ROUTE_MODULES = sorted(info.name for info in pkgutil.iter_modules(routes_package.__path__))
# Modules elsewhere that hold a router: the dashboard's pages.
OTHER_ROUTERS = ("services.gateway.ui.pages",)


def test_every_route_module_is_found() -> None:
    assert {"jobs", "batches", "studies", "models", "health"} <= set(ROUTE_MODULES)


@pytest.mark.parametrize(
    "module_name", [f"services.gateway.routes.{name}" for name in ROUTE_MODULES] + list(OTHER_ROUTERS)
)
def test_each_router_guards_its_routes(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.router.route_class is GuardedRoute
    assert all(isinstance(route, GuardedRoute) for route in module.router.routes)
