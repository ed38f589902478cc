"""`xrayq flower`: Celery's monitor (the optional extra `flower`) on this deployment's broker.

Flower shows what the workers' task events say (XRAYQ_TASK_EVENTS): tasks received, started,
succeeded, failed, their job ids and timings, and each worker's heartbeat. It can also revoke tasks
and stop workers, so off a loopback address it listens only behind basic authentication.
"""

from __future__ import annotations

from typing import Annotated

import typer

from shared.core.settings import get_settings

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def flower(
    port: Annotated[int, typer.Option(help="where Flower listens (default: XRAYQ_FLOWER_PORT)")] = 0,
    address: Annotated[str, typer.Option(help="the address it listens on (default: XRAYQ_HOST)")] = "",
) -> None:
    """Run Flower, the Celery monitor, on the broker (needs `pip install 'xrayq[flower]'`)."""
    settings = get_settings()
    address = address or settings.host
    if address not in _LOOPBACK and not settings.flower_basic_auth:
        typer.echo(
            f"Flower would listen on {address} without a password: set XRAYQ_FLOWER_BASIC_AUTH=user:password, "
            "or listen on 127.0.0.1 (--address 127.0.0.1).",
            err=True,
        )
        raise typer.Exit(2)
    try:
        import flower as _flower  # noqa: F401  (only to say what is missing)
    except ImportError:
        typer.echo("Flower is not installed: pip install 'xrayq[flower]'", err=True)
        raise typer.Exit(2) from None
    if not settings.sends_task_events:
        typer.echo("XRAYQ_TASK_EVENTS is off: Flower will see the workers, but no task.", err=True)
    from shared.core.queue import make_celery

    argv = ["flower", f"--port={port or settings.flower_port}", f"--address={address}"]
    if settings.flower_basic_auth:
        argv.append(f"--basic_auth={settings.flower_basic_auth}")
    make_celery(settings, "xrayq-flower").start(argv)
