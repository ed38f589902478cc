"""`xrayq healthcheck gateway|dicom|worker|trainer`: is this machine's service of that role healthy?

The container healthcheck of each compose service (and usable by any supervisor): exit status 0 and a
sentence on stdout when healthy, 1 and the reason on stderr when not. It asks the service the way a
client would: the gateway's `/readyz` (database, broker, storage, an active model), a DICOM C-ECHO to
the receiver, and for the Celery processes the heartbeat their event loop writes (shared.core.liveness).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated

import typer

from shared.core.settings import Settings, get_settings

WILDCARD_HOSTS = ("", "0.0.0.0", "::")
TIMEOUT_S = 5.0


class Role(StrEnum):
    gateway = "gateway"
    dicom = "dicom"
    worker = "worker"
    trainer = "trainer"


def healthcheck(
    role: Annotated[Role, typer.Argument(help="which service of this machine to check")],
) -> None:
    """Exit 0 when this machine's service of ROLE is healthy, 1 (with the reason) when it is not."""
    healthy, sentence = CHECKS[role](get_settings())
    typer.echo(f"{role.value}: {sentence}", err=not healthy)
    raise typer.Exit(0 if healthy else 1)


def local_host(bind_host: str) -> str:
    """Where a service bound to `bind_host` answers this machine: loopback for a wildcard bind."""
    return "127.0.0.1" if bind_host in WILDCARD_HOSTS else bind_host


def gateway_ready(settings: Settings) -> tuple[bool, str]:
    import httpx

    url = f"http://{local_host(settings.host)}:{settings.port}/readyz"
    try:
        answer = httpx.get(url, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        return False, f"{url} does not answer ({type(exc).__name__})"
    if answer.status_code == 200:
        return True, "ready"
    try:
        checks = answer.json()["checks"]
        failing = "; ".join(f"{name}: {c.get('error', 'failed')}" for name, c in checks.items() if not c["ok"])
    except (ValueError, KeyError, TypeError):
        failing = answer.text[:200]
    return False, f"not ready ({answer.status_code}): {failing}"


def dicom_echoes(settings: Settings) -> tuple[bool, str]:
    from pynetdicom import AE

    from services.dicom.peers import HEALTH_CHECK_AE_TITLE

    if not settings.dicom_port:
        return False, "no receiver is configured (XRAYQ_DICOM_PORT=0)"
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its refusal logs would hide the sentence
    host = local_host(settings.dicom_bind_host)
    ae = AE(ae_title=HEALTH_CHECK_AE_TITLE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    # From the loopback address itself, which the receiver admits for this title (and only to echo).
    bind = ("127.0.0.1", 0) if host == "127.0.0.1" else None
    assoc = ae.associate(host, settings.dicom_port, ae_title=settings.dicom_ae_title, bind_address=bind)
    where = f"{settings.dicom_ae_title}@{host}:{settings.dicom_port}"
    if not assoc.is_established:
        return False, f"no association with {where}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status and int(status.Status) == 0x0000:
        return True, f"C-ECHO answered by {where}"
    return False, f"C-ECHO to {where} failed"


def heartbeat_of(role: str) -> Callable[[Settings], tuple[bool, str]]:
    def check(settings: Settings) -> tuple[bool, str]:
        from shared.core.liveness import is_fresh

        return is_fresh(settings, role)

    return check


CHECKS: dict[Role, Callable[[Settings], tuple[bool, str]]] = {
    Role.gateway: gateway_ready,
    Role.dicom: dicom_echoes,
    Role.worker: heartbeat_of("worker"),
    Role.trainer: heartbeat_of("trainer"),
}
