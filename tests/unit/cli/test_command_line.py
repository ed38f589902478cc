"""The `xrayq` command line without a stack: what it accepts, what it refuses before doing anything, and
how it prints tables and training progress."""

from __future__ import annotations

import io

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from services.cli.main import app, main
from services.cli.output import print_table
from services.cli.progress import TrainingProgress

runner = CliRunner()

# Every command and sub-command the README documents.
DOCUMENTED = {
    "up",
    "gateway",
    "worker",
    "trainer",
    "dicom",
    "flower",
    "migrate",
    "ensure-model",
    "healthcheck",
    "train",
    "backup",
    "restore",
    "keys create",
    "keys list",
    "keys revoke",
    "datasets upload",
    "datasets list",
    "datasets show",
    "runs list",
    "runs show",
    "runs watch",
    "runs cancel",
    "models list",
    "models show",
    "models import",
    "models promote",
    "models rollback",
    "models evaluation-set",
}


def leaf_commands(command, prefix: str = "") -> set[str]:
    children = getattr(command, "commands", None)
    if not children:
        return {prefix.strip()}
    return set().union(*(leaf_commands(child, f"{prefix} {name}") for name, child in children.items()))


def test_every_documented_command_exists_and_nothing_else() -> None:
    assert leaf_commands(get_command(app)) == DOCUMENTED


@pytest.mark.parametrize("command", sorted(DOCUMENTED))
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0 and "Usage: xrayq " + command in " ".join(result.output.split())


@pytest.mark.parametrize(
    "command",
    ["datasets list", "datasets show x", "runs list", "runs show x", "models list", "models show x", "keys list"],
)
def test_listings_and_shows_take_json(command: str) -> None:
    assert "--json" in runner.invoke(app, [*command.split(), "--help"]).output


def test_api_commands_take_server_and_key_from_options_or_environment() -> None:
    help_text = runner.invoke(app, ["models", "list", "--help"]).output
    assert "--server" in help_text and "XRAYQ_SERVER" in help_text
    assert "--api-key" in help_text and "XRAYQ_API_KEY" in help_text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["train", "data", "--promotion", "always"], "--promotion need --server."),
        (["train", "data", "--dataset-name", "x", "--no-wait"], "--dataset-name, --no-wait need --server."),
        (["train", "data", "--server", "http://127.0.0.1:9", "--activate", "always"], "--activate applies without"),
        (["models", "promote", "chest-xray", "--server", "http://127.0.0.1:9"], "invalid_parameter: Give the version"),
    ],
)
def test_options_that_cannot_apply_are_refused_before_anything_runs(arguments: list[str], message: str) -> None:
    result = runner.invoke(app, arguments)
    assert result.exit_code == 1 and result.stderr.startswith(message)


def test_a_bad_choice_or_a_missing_sub_command_is_a_usage_error() -> None:
    assert runner.invoke(app, ["train", "data", "--promotion", "sometimes"]).exit_code == 2
    assert runner.invoke(app, ["train", "data", "--class-balance", "oversample"]).exit_code == 2
    assert runner.invoke(app, ["train", "data", "--normalization", "histeq"]).exit_code == 2
    assert runner.invoke(app, ["keys"]).exit_code == 2
    assert runner.invoke(app, ["keys", "create", "pacs"]).exit_code == 2  # --organisation is required


def test_main_returns_the_exit_status() -> None:
    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2


def test_tables_align_columns_and_never_truncate(capsys) -> None:
    long_id = "0123456789abcdef" * 4
    print_table(("id", "state"), [(long_id, "active"), ("short", None)])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{'ID':{len(long_id)}}  STATE", f"{long_id}  active", f"{'short':{len(long_id)}}  -"]


def test_training_progress_prints_data_and_epoch_lines_without_a_bar_in_a_pipe() -> None:
    output = io.StringIO()
    progress = TrainingProgress(output)
    progress({"event": "data", "train": 90, "val": 10, "counts": {"A": 50, "B": 50}, "load_seconds": 0.5})
    for step in (1, 2, 3):
        progress({"event": "step", "epoch": 1, "epochs": 2, "step": step, "steps": 3, "loss": 0.7})
    epoch = {"epoch": 1, "epochs": 2, "train_loss": 0.7, "val_loss": 0.6, "val_accuracy": 0.8, "seconds": 3.2}
    progress({"event": "epoch", **epoch, "val_roc_auc": 0.91234})
    progress({"event": "something new"})  # events it does not know are ignored
    assert output.getvalue().splitlines() == [
        "data: 90 train / 10 validation images, classes {'A': 50, 'B': 50} (loaded in 0.5 s)",
        "epoch 1/2: train loss 0.7000, val loss 0.6000, val accuracy 0.8000, val ROC-AUC 0.9123 (3 s)",
    ]


def test_runs_show_tells_where_a_resumed_run_continued_from(capsys) -> None:
    from services.cli.api_commands import run_summary

    run = {
        "id": "r1", "status": "running", "model_name": "chest-xray", "dataset_id": "d1", "promotion": "manual",
        "progress": {"phase": "training", "percent": 60.0}, "history": [{"epoch": 1}, {"epoch": 2}],
        "checkpoint_epoch": 2, "resumes": 1, "handbacks": 2,
    }  # fmt: skip
    run_summary(run)
    printed = capsys.readouterr().out
    assert "epoch 2" in printed and "1 after a lost trainer, 2 handed back" in printed
