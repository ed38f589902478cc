"""The `xrayq` commands that talk to a running gateway over HTTP: datasets, training runs, models.

`--server` (or XRAYQ_SERVER; default: this machine's gateway) and `--api-key` (or XRAYQ_API_KEY) say
where and as whom. Errors from the API are printed as their problem+json code and detail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

TERMINAL = {"succeeded", "failed", "cancelled"}


class ApiError(Exception):
    pass


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=None, help="gateway URL (default: XRAYQ_SERVER or this machine's)")
    parser.add_argument("--api-key", default=None, help="API key (default: XRAYQ_API_KEY)")


def client_for(args: argparse.Namespace) -> httpx.Client:
    from shared.core.settings import get_settings

    server = args.server or os.environ.get("XRAYQ_SERVER") or get_settings().public_url
    key = args.api_key or os.environ.get("XRAYQ_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=httpx.Timeout(60, read=1800))


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise ApiError(f"cannot reach the gateway at {client.base_url}: {exc}") from None
    if response.status_code >= 400:
        try:
            body = response.json()
            message = f"{body.get('code')}: {body.get('detail')}"
            if body.get("files"):
                message += "\n  " + "\n  ".join(str(f) for f in body["files"][:20])
        except ValueError:
            message = response.text[:500]
        raise ApiError(f"{method} {path} -> {response.status_code} {message}")
    return response.json()


# --- datasets ---------------------------------------------------------------------------------------


def upload_dataset(
    client: httpx.Client,
    path: Path,
    *,
    name: str | None,
    extends: str | None = None,
    classes: str | None = None,
    skip_unreadable: bool = False,
) -> dict[str, Any]:
    """A folder is zipped on the fly (stored, not recompressed: images are compressed already)."""
    path = Path(path)
    form = {k: v for k, v in {"name": name, "extends": extends, "classes": classes}.items() if v}
    form["skip_unreadable"] = "true" if skip_unreadable else "false"
    with tempfile.TemporaryDirectory() as tmp:
        archive = path
        if path.is_dir():
            archive = Path(tmp) / f"{path.name}.zip"
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as out:
                for file in tqdm(files, desc=f"packing {path.name}", unit="file", disable=not sys.stderr.isatty()):
                    out.write(file, file.relative_to(path).as_posix())
        elif not path.is_file():
            raise ApiError(f"{path} is neither a folder nor a file.")
        with archive.open("rb") as handle:
            return call(  # type: ignore[no-any-return]
                client, "POST", "/v1/datasets", files={"file": (archive.name, handle, "application/zip")}, data=form
            )


def _datasets(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        if args.datasets_command == "upload":
            name = args.name or (None if args.extends else _dataset_name(args.path))
            body = upload_dataset(
                client,
                args.path,
                name=name,
                extends=args.extends,
                classes=args.classes,
                skip_unreadable=args.skip_unreadable,
            )
        elif args.datasets_command == "list":
            body = call(client, "GET", "/v1/datasets")
        else:
            body = call(client, "GET", f"/v1/datasets/{args.ref}")
    print(json.dumps(body, indent=2))
    return 0


def _dataset_name(path: Path) -> str:
    stem = Path(path).resolve().name.rsplit(".", 1)[0] if Path(path).is_file() else Path(path).resolve().name
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in stem.lower()).strip("-._")
    return cleaned[:64] or "dataset"


# --- training runs ----------------------------------------------------------------------------------

RUN_OPTIONS = (
    "architecture",
    "epochs",
    "image_size",
    "batch_size",
    "learning_rate",
    "color",
    "seed",
    "val_fraction",
    "max_per_class",
    "base_model",
    "promotion",
)


def train_remote(args: argparse.Namespace) -> int:
    """`xrayq train DATA --server URL`: upload DATA if it is a local path, start a run, follow it.

    Progress goes to stderr; the finished run's JSON to stdout.
    """
    with client_for(args) as client:
        dataset = str(args.data)
        if Path(args.data).exists():
            uploaded = upload_dataset(client, Path(args.data), name=args.dataset_name or _dataset_name(args.data))
            dataset = uploaded["id"]
            print(
                f"dataset {uploaded['name']}@{uploaded['version']} ({uploaded['id']}): {uploaded['counts']}",
                file=sys.stderr,
            )
        request: dict[str, Any] = {"dataset": dataset}
        request.update({k: getattr(args, k) for k in RUN_OPTIONS if getattr(args, k, None) is not None})
        if args.name:
            request["model_name"] = args.name
        if args.no_augment:
            request["augment"] = False
        if args.no_class_weighting:
            request["class_weighting"] = False
        intended = {k: v for k, v in (("body_parts", args.body_part), ("modalities", args.modality)) if v}
        if intended:
            request["intended_use"] = intended
        run = call(client, "POST", "/v1/training-runs", json=request)
        print(f"training run {run['id']} queued", file=sys.stderr)
        if args.no_wait:
            print(json.dumps(run, indent=2))
            return 0
        run = follow_run(client, run["id"])
    print(json.dumps(run, indent=2))
    return 0 if run["status"] == "succeeded" else 1


def follow_run(client: httpx.Client, run_id: str, poll_s: float = 2.0) -> dict[str, Any]:
    """A progress bar over the run's percent, with epoch and ETA, until it ends."""
    bar = tqdm(total=100.0, unit="%", bar_format="{l_bar}{bar}| {n:.1f}% [{elapsed}{postfix}]")
    reported_epochs = 0
    try:
        while True:
            run = call(client, "GET", f"/v1/training-runs/{run_id}")
            progress = run["progress"]
            for epoch in run["history"][reported_epochs:]:
                tqdm.write(
                    f"epoch {epoch['epoch']}: train loss {epoch['train_loss']:.4f}, val loss {epoch['val_loss']:.4f}, "
                    f"val accuracy {epoch['val_accuracy']:.4f}, val ROC-AUC {epoch.get('val_roc_auc')}",
                    file=sys.stderr,
                )
            reported_epochs = len(run["history"])
            bar.set_description(f"{run['status']}: {progress.get('phase') or ''}")
            if progress.get("eta_seconds") is not None:
                bar.set_postfix_str(
                    f"epoch {progress.get('epoch')}/{progress.get('epochs')}, ETA {progress['eta_seconds']:.0f} s"
                )
            bar.n = float(progress.get("percent") or 0.0) if progress.get("phase") != "loading" else 0.0
            bar.refresh()
            if run["status"] in TERMINAL:
                return run  # type: ignore[no-any-return]
            time.sleep(poll_s)
    finally:
        bar.close()


def _runs(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        if args.runs_command == "list":
            body = call(client, "GET", "/v1/training-runs")
        elif args.runs_command == "show":
            body = call(client, "GET", f"/v1/training-runs/{args.run_id}")
        elif args.runs_command == "watch":
            body = follow_run(client, args.run_id)
        else:
            body = call(client, "POST", f"/v1/training-runs/{args.run_id}/cancel")
    print(json.dumps(body, indent=2))
    return 0


# --- models -----------------------------------------------------------------------------------------


def _models(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        if args.models_command == "list":
            for model in call(client, "GET", "/v1/models"):
                print(f"{model['name']}: active version {model['active_version']}, classes {model['classes']}")
                for v in model["versions"]:
                    figures = (v.get("evaluation") or {}).get("summary") or v["metrics"].get("validation", {})
                    marker = "*" if v["is_active"] else " "
                    print(
                        f"  {marker} v{v['version']:<3} {v['architecture']:20} accuracy {_fmt(figures.get('accuracy'))}"
                        f"  ROC-AUC {_fmt(figures.get('roc_auc'))}  created {v['created_at'][:19]}"
                    )
            return 0
        if args.models_command == "rollback":
            body = call(client, "POST", f"/v1/models/{args.name}/rollback")
        else:
            name, _, version = args.ref.partition("@")
            if args.models_command == "show" and not version:
                body = next((m for m in call(client, "GET", "/v1/models") if m["name"] == name), None)
                if body is None:
                    raise ApiError(f"No model named {name!r}.")
            elif not version.isdigit():
                raise ApiError("Give the version as name@version, e.g. chest-xray@3.")
            elif args.models_command == "show":
                body = call(client, "GET", f"/v1/models/{name}/versions/{version}")
            else:
                body = call(client, "POST", f"/v1/models/{name}/versions/{version}/promote")
    if args.models_command in ("promote", "rollback"):
        print(f"{body['name']}@{body['version']} is now active")
    else:
        print(json.dumps(body, indent=2))
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def add_commands(commands: argparse._SubParsersAction) -> dict[str, Any]:  # type: ignore[type-arg]
    """Register `datasets`, `runs` and `models`; returns their handlers by command name."""
    datasets = commands.add_parser("datasets", help="upload and list labelled datasets (through the API)")
    dataset_commands = datasets.add_subparsers(dest="datasets_command", required=True)
    upload = dataset_commands.add_parser("upload", help="upload a folder of (split/)class folders, a ZIP or a .npz")
    upload.add_argument("path", type=Path)
    upload.add_argument("--name", default=None, help="dataset name (default: the folder's or file's name)")
    upload.add_argument("--extends", default=None, help="dataset id, name or name@version to add these files to")
    upload.add_argument("--classes", default=None, help=".npz only: comma-separated class names for labels 0, 1, ...")
    upload.add_argument("--skip-unreadable", action="store_true", help="leave unreadable files out instead of failing")
    dataset_commands.add_parser("list", help="list datasets")
    show = dataset_commands.add_parser("show", help="show a dataset by id, name or name@version")
    show.add_argument("ref")

    runs = commands.add_parser("runs", help="list, show, watch or cancel training runs (through the API)")
    run_commands = runs.add_subparsers(dest="runs_command", required=True)
    run_commands.add_parser("list")
    for command in ("show", "watch", "cancel"):
        run_commands.add_parser(command).add_argument("run_id")

    models = commands.add_parser("models", help="list, show, promote or roll back model versions (through the API)")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    model_commands.add_parser("list")
    model_commands.add_parser("show", help="a model, or one version (name@version)").add_argument("ref")
    model_commands.add_parser("promote", help="make name@version active").add_argument("ref")
    model_commands.add_parser("rollback", help="undo the last promotion of a model").add_argument("name")
    for parser in (
        *dataset_commands.choices.values(),
        *run_commands.choices.values(),
        *model_commands.choices.values(),
    ):
        add_connection_options(parser)
    return {"datasets": _datasets, "runs": _runs, "models": _models}
