"""`xrayq train DATA`: train here (the starter recipe), or through a gateway's API with --server."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from services.cli.api_client import ApiKeyOption, ServerOption, call, connect, dataset_name, follow_run, upload_dataset
from services.cli.api_commands import run_summary
from services.cli.output import JsonOutput, emit, fail, print_json

LOCAL = "Without --server"
REMOTE = "With --server (through the API)"
Promotion = Literal["manual", "if_better", "always"]
Activation = Literal["if_none_active", "always", "never"]
Color = Literal["auto", "grayscale", "rgb"]
ClassBalance = Literal["sampler", "loss_weights", "none"]
Normalization = Literal["fixed", "clahe_standardize"]


def train(
    data: Annotated[str, typer.Argument(help="folder, ZIP or .npz; with --server also a dataset id or name")],
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    name: Annotated[
        str | None, typer.Option(help="model name (default: XRAYQ_DEFAULT_MODEL; remote: the dataset's)")
    ] = None,
    architecture: Annotated[str | None, typer.Option("--architecture", "--arch")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    image_size: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate", "--lr")] = None,
    color: Annotated[Color | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    val_fraction: Annotated[float | None, typer.Option()] = None,
    max_per_class: Annotated[int | None, typer.Option(help="use at most N images per class")] = None,
    no_augment: Annotated[bool, typer.Option("--no-augment")] = False,
    class_balance: Annotated[ClassBalance | None, typer.Option(help="default sampler")] = None,
    normalization: Annotated[Normalization | None, typer.Option(help="default clahe_standardize")] = None,
    body_part: Annotated[
        list[str] | None, typer.Option(help="intended DICOM BodyPartExamined (repeatable); others are flagged")
    ] = None,
    modality: Annotated[list[str] | None, typer.Option(help="intended DICOM Modality (repeatable)")] = None,
    activate: Annotated[Activation | None, typer.Option(rich_help_panel=LOCAL, help="default if_none_active")] = None,
    dataset_name_: Annotated[
        str | None, typer.Option("--dataset-name", rich_help_panel=REMOTE, help="name of the uploaded dataset")
    ] = None,
    base_model: Annotated[str | None, typer.Option(rich_help_panel=REMOTE, help="fine-tune from name@version")] = None,
    promotion: Annotated[Promotion | None, typer.Option(rich_help_panel=REMOTE)] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", rich_help_panel=REMOTE, help="print the queued run and return")
    ] = False,
    as_json: JsonOutput = False,
) -> None:
    """Train a model on a folder of class subfolders or a .npz.

    Without --server: train in this process and register the version; options left out take the starter
    recipe's values. With --server: DATA (a local folder/ZIP/.npz, uploaded first, or a dataset id or
    name) is trained by the server's trainer as a training run, followed with a progress bar; options
    left out take the API's recommended recipe.
    """
    recipe: dict[str, Any] = {
        "architecture": architecture,
        "epochs": epochs,
        "image_size": image_size,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "color": color,
        "seed": seed,
        "val_fraction": val_fraction,
        "max_per_class": max_per_class,
        "class_balance": class_balance,
        "normalization": normalization,
    }
    recipe = {key: value for key, value in recipe.items() if value is not None}
    if no_augment:
        recipe["augment"] = False
    intended_use = {key: value for key, value in (("body_parts", body_part), ("modalities", modality)) if value}
    if server is None:
        remote_only = {"--dataset-name": dataset_name_, "--base-model": base_model, "--promotion": promotion}
        given = [option for option, value in remote_only.items() if value] + (["--no-wait"] if no_wait else [])
        if given:
            raise fail(f"{', '.join(given)} need --server.")
        summary = train_here(Path(data), name, recipe, activate or "if_none_active", intended_use)
        if as_json:
            print_json(summary)
        else:
            figures = summary.get("validation") or {}
            typer.echo(
                f"{summary['name']}@{summary['version']} registered{' and active' if summary.get('active') else ''}: "
                f"validation accuracy {figures.get('accuracy')}, ROC-AUC {figures.get('roc_auc')}"
            )
        return
    if activate is not None:
        raise fail("--activate applies without --server; through the API, use --promotion.")
    request: dict[str, Any] = {**recipe, "base_model": base_model, "promotion": promotion, "model_name": name}
    request = {key: value for key, value in request.items() if value is not None}
    if intended_use:
        request["intended_use"] = intended_use
    train_remotely(data, request, server, api_key, dataset_name_, no_wait, as_json)


def train_here(
    data: Path, name: str | None, recipe: dict[str, Any], activate: str, intended_use: dict[str, list[str]]
) -> dict[str, Any]:
    from services.cli.progress import TrainingProgress
    from services.trainer.pipeline import STARTER_CONFIG, train_and_register
    from services.trainer.training import TrainConfig
    from shared.core.logs import configure_logging
    from shared.core.settings import get_settings
    from shared.db.bootstrap import prepare_backends

    settings = get_settings()
    configure_logging(settings)
    prepare_backends(settings)
    known = {field.name for field in fields(TrainConfig)}
    config = replace(STARTER_CONFIG, **{k: v for k, v in recipe.items() if k in known}, device=settings.device)
    return train_and_register(
        settings,
        data,
        name=name or settings.default_model,
        config=config,
        activate=activate,
        progress=TrainingProgress(),
        intended_use=intended_use,
    )


def train_remotely(
    data: str,
    request: dict[str, Any],
    server: str | None,
    api_key: str | None,
    upload_name: str | None,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Upload DATA if it is a local path, start a run, follow it. Progress on stderr; the run on stdout."""
    with connect(server, api_key) as client:
        dataset = data
        if Path(data).exists():
            uploaded = upload_dataset(client, Path(data), name=upload_name or dataset_name(Path(data)))
            dataset = uploaded["id"]
            typer.echo(
                f"dataset {uploaded['name']}@{uploaded['version']} ({uploaded['id']}): {uploaded['counts']}", err=True
            )
        run = call(client, "POST", "/v1/training-runs", json={"dataset": dataset, **request})
        typer.echo(f"training run {run['id']} queued", err=True)
        if not no_wait:
            run = follow_run(client, run["id"])
    emit(run, as_json, run_summary)
    if not no_wait and run["status"] != "succeeded":
        raise typer.Exit(1)
