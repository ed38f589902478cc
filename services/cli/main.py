"""The `xrayq` command line: run the stack or one of its services, migrate, train."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields, replace
from pathlib import Path

from shared.core.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xrayq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run gateway, worker and trainer as supervised child processes")
    up.add_argument("--no-starter", action="store_true", help="do not train a starter model when none is active")
    commands.add_parser("gateway", help="run the HTTP gateway (uvicorn)")
    worker = commands.add_parser("worker", help="run an inference worker (Celery, queue 'predict')")
    worker.add_argument("--concurrency", type=int, default=None)
    commands.add_parser("trainer", help="run the trainer (Celery, queue 'train')")
    commands.add_parser("dicom", help="run the DICOM receiver (C-STORE SCP on XRAYQ_DICOM_PORT)")
    commands.add_parser("migrate", help="create or upgrade the database schema")
    commands.add_parser("ensure-model", help="train and activate the starter model if none is active")

    train = commands.add_parser(
        "train",
        help="train a model on a folder of class subfolders or a .npz (here, or through the API with --server)",
        description="Without --server: train in this process; options left out take the starter recipe's values. "
        "With --server: DATA (a local folder/ZIP/.npz, uploaded first, or a dataset id/name) is trained by the "
        "server's trainer as a training run, followed with a progress bar; options left out take the API's "
        "recommended recipe.",
    )
    train.add_argument("data", type=Path, help="folder, ZIP or .npz; with --server also a dataset id or name")
    train.add_argument("--server", default=None, help="train through this gateway's API (e.g. http://127.0.0.1:8000)")
    train.add_argument("--api-key", default=None, help="API key for --server (default: XRAYQ_API_KEY)")
    train.add_argument("--dataset-name", default=None, help="--server: name of the uploaded dataset")
    train.add_argument("--base-model", default=None, help="--server: fine-tune from name@version")
    train.add_argument("--promotion", choices=["manual", "if_better", "always"], default=None, help="--server only")
    train.add_argument("--no-class-weighting", action="store_true")
    train.add_argument("--no-wait", action="store_true", help="--server: print the run and return at once")
    train.add_argument("--name", default=None, help="model name (default: XRAYQ_DEFAULT_MODEL)")
    train.add_argument("--architecture", "--arch", default=None)
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--image-size", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--learning-rate", "--lr", type=float, default=None)
    train.add_argument("--color", choices=["auto", "grayscale", "rgb"], default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--val-fraction", type=float, default=None)
    train.add_argument("--max-per-class", type=int, default=None, help="use at most N images per class")
    train.add_argument("--no-augment", action="store_true")
    train.add_argument("--activate", choices=["if_none_active", "always", "never"], default="if_none_active")
    train.add_argument(
        "--body-part",
        action="append",
        default=[],
        help="intended DICOM BodyPartExamined (repeatable); others are flagged, e.g. CHEST",
    )
    train.add_argument("--modality", action="append", default=[], help="intended DICOM Modality (repeatable)")

    keys = commands.add_parser("keys", help="manage API keys (services mode requires them)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print it (shown once)")
    create.add_argument("name")
    create.add_argument("--organisation", "--org", required=True)
    create.add_argument("--roles", default="submit", help="comma-separated: submit, train, admin")
    key_commands.add_parser("list", help="list keys (never the keys themselves)")
    revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")

    from services.cli.api_client import add_commands

    api_handlers = add_commands(commands)

    args = parser.parse_args(argv)
    handler = {
        **api_handlers,
        "up": _up,
        "gateway": _gateway,
        "worker": _worker,
        "trainer": _trainer,
        "dicom": _dicom,
        "migrate": _migrate,
        "ensure-model": _ensure_model,
        "train": _train,
    }[args.command]
    from services.cli.api_client import ApiError

    try:
        return handler(args) or 0
    except ApiError as error:
        print(error, file=sys.stderr)
        return 1


def _up(args: argparse.Namespace) -> int:
    from services.cli.supervisor import run_stack

    return run_stack(get_settings(), train_starter=not args.no_starter)


def _gateway(_: argparse.Namespace) -> int:
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
    return 0


def _celery_worker(app_module: str, queue: str, concurrency: int) -> int:
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
    return 0


def _worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    if settings.worker_metrics_port:
        _serve_worker_metrics(settings.worker_metrics_port)
    from services.worker.app import pool_size

    return _celery_worker("services.worker.app", "predict", pool_size(args.concurrency or settings.worker_concurrency))


def _serve_worker_metrics(port: int) -> None:
    """Pool processes write samples to a folder of their own; this process serves their sum."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="xrayq-worker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # before anything imports prometheus_client
    import atexit

    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)
    try:
        start_http_server(port, addr="0.0.0.0", registry=registry)
    except OSError as exc:  # e.g. a second worker on one host: it still works, without its own endpoint
        print(f"worker metrics not served on port {port}: {exc}", file=sys.stderr)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def _trainer(_: argparse.Namespace) -> int:
    return _celery_worker("services.trainer.app", "train", 1)  # one run at a time per trainer


def _dicom(_: argparse.Namespace) -> int:
    from services.dicom.receiver import run_scp

    return run_scp(get_settings())


def _migrate(_: argparse.Namespace) -> int:
    from shared.core.bootstrap import prepare_backends

    prepare_backends(get_settings())
    print("database is at the latest schema")
    return 0


def _ensure_model(_: argparse.Namespace) -> int:
    from services.cli.supervisor import ensure_starter_model

    return 0 if ensure_starter_model(get_settings()) else 1


def _train(args: argparse.Namespace) -> int:
    if args.server:
        from services.cli.api_client import train_remote

        return train_remote(args)
    from services.trainer.pipeline import STARTER_CONFIG, train_and_register
    from services.trainer.training import TrainConfig
    from shared.core.bootstrap import prepare_backends
    from shared.core.logs import configure_logging

    settings = get_settings()
    configure_logging(settings)
    prepare_backends(settings)
    known = {f.name for f in fields(TrainConfig)}
    options = {k: v for k, v in vars(args).items() if k in known and v is not None}
    config = replace(STARTER_CONFIG, **options, augment=not args.no_augment, device=settings.device)
    summary = train_and_register(
        settings,
        args.data,
        name=args.name or settings.default_model,
        config=config,
        activate=args.activate,
        progress=print_progress,
        intended_use={k: v for k, v in (("body_parts", args.body_part), ("modalities", args.modality)) if v},
    )
    print(json.dumps(summary, indent=2))
    return 0


def _keys(args: argparse.Namespace) -> int:
    from shared.auth import create_key, list_keys, revoke_key
    from shared.core.bootstrap import prepare_backends
    from shared.db.session import database_for

    settings = get_settings()
    prepare_backends(settings)
    with database_for(settings).session() as session:
        if args.keys_command == "create":
            row, token = create_key(session, args.name, args.organisation, args.roles.split(","))
            print(f"created key {row.id} ({row.name}, {row.organisation}, roles {','.join(row.roles)}):")
            print(token)
            print("Store it now: only its hash is kept.", file=sys.stderr)
        elif args.keys_command == "list":
            for row in list_keys(session):
                state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
                print(
                    f"{row.id}  {row.key_prefix}…  {row.organisation:20}  {','.join(row.roles):18}  {row.name}  {state}"
                )
        else:
            row = revoke_key(session, args.key_id)
            print(f"revoked {row.id} ({row.name})")
    return 0


def print_progress(event: dict) -> None:
    if event["event"] == "data":
        print(
            f"data: {event['train']} train / {event['val']} validation images, classes {event['counts']}"
            f" (loaded in {event['load_seconds']} s)",
            flush=True,
        )
    elif event["event"] == "epoch":
        auc = event["val_roc_auc"]
        print(
            f"epoch {event['epoch']}/{event['epochs']}: train loss {event['train_loss']:.4f}, "
            f"val loss {event['val_loss']:.4f}, val accuracy {event['val_accuracy']:.4f}, "
            f"val ROC-AUC {auc if auc is None else round(auc, 4)} ({event['seconds']:.0f} s)",
            flush=True,
        )
    elif event["event"] == "step" and sys.stdout.isatty():
        print(
            f"\r  epoch {event['epoch']}: step {event['step']}/{event['steps']} loss {event['loss']:.4f}",
            end="" if event["step"] < event["steps"] else "\n",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
