"""`xrayq datasets|runs|models ...`: the API's datasets, training runs and model registry, over HTTP.

Every command prints a table or a summary for people, or the API's JSON with --json.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import typer

from services.cli.api_client import ApiError, ApiKeyOption, ServerOption, call, connect, dataset_name, follow_run
from services.cli.api_client import upload_dataset as upload_dataset_file
from services.cli.output import JsonOutput, emit, fail, figure, print_fields, print_table

datasets = typer.Typer(help="Upload and list labelled datasets (through the API)", no_args_is_help=True)
runs = typer.Typer(help="List, show, watch or cancel training runs (through the API)", no_args_is_help=True)
models = typer.Typer(
    help="List, show, import, promote or roll back model versions (through the API)", no_args_is_help=True
)


def request(server: str | None, api_key: str | None, method: str, path: str, **options: Any) -> Any:
    with connect(server, api_key) as client:
        return call(client, method, path, **options)


# --- datasets ---------------------------------------------------------------------------------------


@datasets.command("upload")
def upload_dataset(
    path: Annotated[Path, typer.Argument(help="a folder of (split/)class folders, a ZIP or a .npz")],
    name: Annotated[str | None, typer.Option(help="dataset name (default: the folder's or file's name)")] = None,
    extends: Annotated[str | None, typer.Option(help="dataset id, name or name@version to add these files to")] = None,
    classes: Annotated[
        str | None, typer.Option(help=".npz only: comma-separated class names for labels 0, 1, ...")
    ] = None,
    skip_unreadable: Annotated[
        bool, typer.Option("--skip-unreadable", help="leave unreadable files out instead of failing")
    ] = False,
    as_json: JsonOutput = False,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Upload a folder of (split/)class folders, a ZIP or a .npz as a new dataset version."""
    with connect(server, api_key) as client:
        body = upload_dataset_file(
            client,
            path,
            name=name or (None if extends else dataset_name(path)),
            extends=extends,
            classes=classes,
            skip_unreadable=skip_unreadable,
        )
    emit(body, as_json, dataset_summary)


@datasets.command("list")
def list_datasets(as_json: JsonOutput = False, server: ServerOption = None, api_key: ApiKeyOption = None) -> None:
    """List datasets."""
    emit(request(server, api_key, "GET", "/v1/datasets"), as_json, dataset_table)


@datasets.command("show")
def show_dataset(
    ref: Annotated[str, typer.Argument(help="dataset id, name or name@version")],
    as_json: JsonOutput = False,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Show a dataset by id, name or name@version."""
    emit(request(server, api_key, "GET", f"/v1/datasets/{ref}"), as_json, dataset_summary)


def dataset_table(body: list[dict[str, Any]]) -> None:
    print_table(
        ("id", "name", "version", "classes", "files", "created"),
        [(d["id"], d["name"], d["version"], ",".join(d["classes"]), d["files"], d["created_at"][:19]) for d in body],
    )


def dataset_summary(dataset: dict[str, Any]) -> None:
    print_fields(
        [
            ("dataset", f"{dataset['name']}@{dataset['version']}"),
            ("id", dataset["id"]),
            ("classes", ", ".join(dataset["classes"])),
            ("counts", dataset["counts"]),
            ("files", dataset["files"]),
            ("extends", dataset.get("parent_id")),
            ("created", dataset["created_at"][:19]),
        ]
    )


# --- training runs ----------------------------------------------------------------------------------

RunId = Annotated[str, typer.Argument(help="training run id")]


@runs.command("list")
def list_runs(as_json: JsonOutput = False, server: ServerOption = None, api_key: ApiKeyOption = None) -> None:
    """List training runs."""
    emit(request(server, api_key, "GET", "/v1/training-runs"), as_json, run_table)


@runs.command("show")
def show_run(
    run_id: RunId, as_json: JsonOutput = False, server: ServerOption = None, api_key: ApiKeyOption = None
) -> None:
    """Show a training run: status, progress, evaluation, promotion decision."""
    emit(request(server, api_key, "GET", f"/v1/training-runs/{run_id}"), as_json, run_summary)


@runs.command("watch")
def watch_run(
    run_id: RunId, as_json: JsonOutput = False, server: ServerOption = None, api_key: ApiKeyOption = None
) -> None:
    """Follow a training run with a progress bar until it ends; exit status 1 unless it succeeded."""
    with connect(server, api_key) as client:
        body = follow_run(client, run_id)
    emit(body, as_json, run_summary)
    if body["status"] != "succeeded":
        raise typer.Exit(1)


@runs.command("cancel")
def cancel_run(
    run_id: RunId, as_json: JsonOutput = False, server: ServerOption = None, api_key: ApiKeyOption = None
) -> None:
    """Cancel a training run (a running one stops within seconds and registers nothing)."""
    emit(request(server, api_key, "POST", f"/v1/training-runs/{run_id}/cancel"), as_json, run_summary)


def run_table(body: list[dict[str, Any]]) -> None:
    print_table(
        ("id", "status", "model", "phase", "percent", "created"),
        [
            (run["id"], run["status"], run_model(run), run["progress"].get("phase"), run["progress"].get("percent"))
            + (run["created_at"][:19],)
            for run in body
        ],
    )


def run_summary(run: dict[str, Any]) -> None:
    progress = run["progress"]
    summary = run.get("evaluation") or {}  # a run's `evaluation` is its version's evaluation summary
    print_fields(
        [
            ("run", run["id"]),
            ("status", run["status"] + (" (cancel requested)" if run.get("cancel_requested") else "")),
            ("model", run_model(run)),
            ("dataset", run["dataset_id"]),
            ("progress", f"{progress.get('phase') or '-'} {progress.get('percent') or 0:.1f}%"),
            ("epochs done", len(run["history"])),
            ("checkpoint", f"epoch {run['checkpoint_epoch']}" if run.get("checkpoint_epoch") else "-"),
            ("resumes", f"{run.get('resumes', 0)} after a lost trainer, {run.get('handbacks', 0)} handed back"),
            ("accuracy", figure(summary.get("accuracy"))),
            ("ROC-AUC", figure(summary.get("roc_auc"))),
            ("sensitivity", figure(summary.get("sensitivity"))),
            ("specificity", figure(summary.get("specificity"))),
            ("promotion", run.get("promotion_decision") or run["promotion"]),
            ("error", run.get("error")),
        ]
    )


def run_model(run: dict[str, Any]) -> str:
    """The version a run produced, else the model name it trains."""
    model = run.get("model")
    return f"{model['name']}@{model['version']}" if model else str(run["model_name"])


# --- models -----------------------------------------------------------------------------------------


@models.command("list")
def list_models(as_json: JsonOutput = False, server: ServerOption = None, api_key: ApiKeyOption = None) -> None:
    """List models and their versions; `*` marks the active one."""
    emit(request(server, api_key, "GET", "/v1/models"), as_json, model_table)


@models.command("show")
def show_model(
    ref: Annotated[str, typer.Argument(help="a model's name, or one version as name@version")],
    as_json: JsonOutput = False,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Show a model (its versions), or one version's card, evaluation and plots."""
    name, _, version = ref.partition("@")
    with connect(server, api_key) as client:
        if version:
            body = call(client, "GET", f"/v1/models/{name}/versions/{parse_version(version)}")
        else:
            body = next((m for m in call(client, "GET", "/v1/models") if m["name"] == name), None)
            if body is None:
                raise ApiError(f"model_not_found: No model named {name!r}.")
    emit(body, as_json, version_summary if version else lambda model: model_table([model]))


@models.command("promote")
def promote_model(
    ref: Annotated[str, typer.Argument(help="name@version to make active")],
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Make name@version the active version (promoting an older one is a rollback)."""
    name, _, version = ref.partition("@")
    with connect(server, api_key) as client:
        body = call(client, "POST", f"/v1/models/{name}/versions/{parse_version(version)}/promote")
    typer.echo(f"{body['name']}@{body['version']} is now active")


@models.command("rollback")
def rollback_model(
    name: Annotated[str, typer.Argument(help="model name")], server: ServerOption = None, api_key: ApiKeyOption = None
) -> None:
    """Undo the last promotion of a model."""
    body = request(server, api_key, "POST", f"/v1/models/{name}/rollback")
    typer.echo(f"{body['name']}@{body['version']} is now active")


@models.command("evaluation-set")
def set_evaluation_set(
    name: Annotated[str, typer.Argument(help="model name")],
    dataset: Annotated[str, typer.Argument(help="dataset id, name or name@version (one of yours)")],
    split: Annotated[str | None, typer.Option(help="test or val (default: test, else val)")] = None,
    as_json: JsonOutput = False,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Judge the model's `if_better` runs on a split of this dataset from now on (owner or admin)."""
    body = request(
        server, api_key, "PUT", f"/v1/models/{name}/evaluation-set", json={"dataset": dataset, "split": split}
    )
    emit(
        body,
        as_json,
        lambda view: typer.echo(
            f"{name}: if_better runs are judged on {view['n']} {view['split']} images of dataset {view['dataset_id']}"
        ),
    )


@models.command("import")
def import_model(
    name: Annotated[str, typer.Argument(help="model name: a new one, or one of yours")],
    path: Annotated[Path, typer.Argument(help="the state dict as a .safetensors file")],
    architecture: Annotated[str, typer.Option(help="the torchvision model it is for, e.g. resnet18")],
    classes: Annotated[str, typer.Option(help="its outputs' class names in order, comma-separated")],
    sha256: Annotated[
        str | None, typer.Option(help="the SHA-256 you expect (default: the file's own, checking the transfer)")
    ] = None,
    image_size: Annotated[int | None, typer.Option(help="input size in px (default: the recipe's)")] = None,
    color: Annotated[str | None, typer.Option(help="grayscale (default) or rgb")] = None,
    as_json: JsonOutput = False,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Register weights made elsewhere as a new, inactive version (promote it, or fine-tune from it)."""
    if not path.is_file():
        raise fail(f"{path} is not a file.")
    form = {"architecture": architecture, "classes": classes, "sha256": sha256 or file_sha256(path)}
    form |= {key: str(value) for key, value in {"image_size": image_size, "color": color}.items() if value}
    with connect(server, api_key) as client, path.open("rb") as handle:
        files = {"file": (path.name, handle, "application/octet-stream")}
        body = call(client, "POST", f"/v1/models/{name}/import", files=files, data=form)
    emit(body, as_json, version_summary)


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_table(body: list[dict[str, Any]]) -> None:
    print_table(
        ("model", "owner", "version", "active", "architecture", "classes", "accuracy", "roc-auc", "created"),
        [
            (model["name"], model.get("owner") or "shared", v["version"], "*" if v["is_active"] else "")
            + (v["architecture"], ",".join(v["classes"]))
            + version_figures(v)
            + (v["created_at"][:19],)
            for model in body
            for v in model["versions"]
        ],
    )


def version_summary(version: dict[str, Any]) -> None:
    accuracy, roc_auc = version_figures(version)
    print_fields(
        [
            ("model", f"{version['name']}@{version['version']}"),
            ("active", "yes" if version["is_active"] else "no"),
            ("architecture", version["architecture"]),
            ("classes", ", ".join(version["classes"])),
            ("accuracy", accuracy),
            ("ROC-AUC", roc_auc),
            ("dataset", version.get("dataset_id")),
            ("training run", version.get("training_run_id")),
            ("imported from", (version.get("card", {}).get("import") or {}).get("original_filename")),
            *((f"plot {plot}", url) for plot, url in version.get("plots", {}).items()),
        ]
    )


def parse_version(version: str) -> int:
    if not version.isdigit():
        raise ApiError("invalid_parameter: Give the version as name@version, e.g. chest-xray@3.")
    return int(version)


def version_figures(version: dict[str, Any]) -> tuple[str, str]:
    """Accuracy and ROC-AUC: from the evaluation report, else the validation metrics."""
    figures = (version.get("evaluation") or {}).get("summary") or version["metrics"].get("validation", {})
    return figure(figures.get("accuracy")), figure(figures.get("roc_auc"))
