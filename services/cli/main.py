"""The `xrayq` command line: run the stack or one of its services, migrate, train, manage keys, and
talk to a gateway's API. Each command is the function that runs it (Typer), so none can be parsed
and then forgotten."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer

from services.cli.api_commands import datasets, models, runs
from services.cli.backups import backup, restore
from services.cli.flower import flower
from services.cli.healthcheck import healthcheck
from services.cli.keys import keys
from services.cli.train import train
from shared.core.metrics_server import serve_process_metrics
from shared.core.settings import get_settings

# The line `docker compose logs migrate` shows the first key on (the README's quick start greps it).
BOOTSTRAP_KEY_BANNER = "bootstrap admin key (shown this once)"

app = typer.Typer(
    name="xrayq",
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # a plain traceback, as in every other log line
)
app.command("train")(train)
app.command("healthcheck")(healthcheck)
app.command("backup")(backup)
app.command("restore")(restore)
app.command("flower")(flower)
app.add_typer(keys, name="keys")
app.add_typer(datasets, name="datasets")
app.add_typer(runs, name="runs")
app.add_typer(models, name="models")


@app.command()
def up(
    no_starter: Annotated[
        bool, typer.Option("--no-starter", help="do not train a starter model when none is active")
    ] = False,
) -> None:
    """Run gateway, worker, trainer and the DICOM receiver as supervised child processes."""
    from services.cli.supervisor import run_stack

    raise typer.Exit(run_stack(get_settings(), train_starter=not no_starter))


@app.command()
def gateway() -> None:
    """Run the HTTP gateway (uvicorn; XRAYQ_GATEWAY_PROCESSES processes on one socket)."""
    settings = get_settings()
    options: dict[str, Any] = {
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
    if settings.gateway_processes > 1:
        from services.cli.gateway_processes import run_gateway_processes

        run_gateway_processes(settings, **options)
        return
    import uvicorn

    uvicorn.run("services.gateway.app:create_app", factory=True, host=settings.host, port=settings.port, **options)


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option(help="inference processes (default: XRAYQ_WORKER_CONCURRENCY)")
    ] = None,
) -> None:
    """Run an inference worker (Celery, queue 'predict')."""
    settings = get_settings()
    serve_process_metrics(settings.worker_metrics_port, "worker")
    from services.worker.app import pool_size

    run_celery_worker(
        "services.worker.app", "predict", pool_size(concurrency or settings.worker_concurrency), role="worker"
    )


@app.command()
def trainer() -> None:
    """Run the trainer (Celery, queue 'train')."""
    serve_process_metrics(get_settings().trainer_metrics_port, "trainer")
    run_celery_worker("services.trainer.app", "train", 1, role="trainer")  # one run at a time per trainer


@app.command()
def dicom() -> None:
    """Run the DICOM receiver (C-STORE SCP on XRAYQ_DICOM_PORT)."""
    settings = get_settings()
    serve_process_metrics(settings.dicom_metrics_port, "dicom")
    from services.dicom.receiver import run_scp

    raise typer.Exit(run_scp(settings))


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema and the storage bucket; on a new installation with API
    keys on and no XRAYQ_ADMIN_KEY, create an admin key and print it (this once)."""
    from shared.auth import create_bootstrap_admin_key
    from shared.db.bootstrap import prepare_backends
    from shared.db.session import database_for

    settings = get_settings()
    prepare_backends(settings)
    typer.echo("database is at the latest schema")
    with database_for(settings).session() as session:
        token = create_bootstrap_admin_key(session, settings)
    if token:
        typer.echo(f"{BOOTSTRAP_KEY_BANNER}: {token}")
        typer.echo("Store it now: only its hash is kept. Create the other keys with it, then revoke it.")


@app.command("ensure-model")
def ensure_model() -> None:
    """Train and activate the starter model if none is active (exit status 1 if it cannot)."""
    from services.cli.supervisor import ensure_starter_model

    if not ensure_starter_model(get_settings()):
        raise typer.Exit(1)


def run_celery_worker(app_module: str, queue: str, concurrency: int, role: str) -> None:
    from shared.core.liveness import install_heartbeat

    module = __import__(app_module, fromlist=["app"])
    settings = get_settings()
    install_heartbeat(module.app, settings, role)
    module.app.worker_main(
        [
            "worker",
            "--queues",
            queue,
            "--concurrency",
            str(concurrency),
            "--pool",
            "prefork",
            "--hostname",
            f"{queue}-{os.getpid()}@%h",
            "--loglevel",
            settings.log_level.upper(),
            "--without-mingle",
            "--without-gossip",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """The `xrayq` console script and `python -m services.cli`; returns the exit status."""
    from pydantic import ValidationError

    try:
        app(args=argv, prog_name="xrayq")
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except ValidationError as refusal:  # a setting no process may start with: say which, and what to set
        for error in refusal.errors():
            setting = "XRAYQ_" + "_".join(str(part) for part in error["loc"]).upper()
            message = error["msg"].removeprefix("Value error, ")
            typer.echo(f"xrayq: {message if message.startswith(setting) else f'{setting}: {message}'}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
