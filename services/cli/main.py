"""The `xrayq` command line: run the stack or one of its services, migrate, train, manage keys, and
talk to a gateway's API. Each command is the function that runs it (Typer), so none can be parsed
and then forgotten."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from services.cli.api_commands import datasets, models, runs
from services.cli.keys import keys
from services.cli.train import train
from shared.core.metrics_server import serve_process_metrics
from shared.core.settings import get_settings

app = typer.Typer(
    name="xrayq",
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # a plain traceback, as in every other log line
)
app.command("train")(train)
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
    """Run the HTTP gateway (uvicorn)."""
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "services.gateway.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )


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

    run_celery_worker("services.worker.app", "predict", pool_size(concurrency or settings.worker_concurrency))


@app.command()
def trainer() -> None:
    """Run the trainer (Celery, queue 'train')."""
    serve_process_metrics(get_settings().trainer_metrics_port, "trainer")
    run_celery_worker("services.trainer.app", "train", 1)  # one run at a time per trainer


@app.command()
def dicom() -> None:
    """Run the DICOM receiver (C-STORE SCP on XRAYQ_DICOM_PORT)."""
    settings = get_settings()
    serve_process_metrics(settings.dicom_metrics_port, "dicom")
    from services.dicom.receiver import run_scp

    raise typer.Exit(run_scp(settings))


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema (and the storage bucket)."""
    from shared.db.bootstrap import prepare_backends

    prepare_backends(get_settings())
    typer.echo("database is at the latest schema")


@app.command("ensure-model")
def ensure_model() -> None:
    """Train and activate the starter model if none is active (exit status 1 if it cannot)."""
    from services.cli.supervisor import ensure_starter_model

    if not ensure_starter_model(get_settings()):
        raise typer.Exit(1)


def run_celery_worker(app_module: str, queue: str, concurrency: int) -> None:
    module = __import__(app_module, fromlist=["app"])
    settings = get_settings()
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
    try:
        app(args=argv, prog_name="xrayq")
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
