"""Retraining as a service, through the API and the CLI, with real gateway, worker and trainer processes.

Upload data, start a run, watch it move, read its report and plots, promote the new version, see new
predictions answered by it while old results keep theirs, roll back; and a second label set (malaria
cells) as a model of another name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

from tests.e2e.conftest import api_cli as cli
from tests.e2e.test_stack import wait_for_job

TINY_RUN = {"architecture": "mobilenet_v3_small", "image_size": 64, "batch_size": 16}


def predict(stack, image: Path, model: str | None = None) -> dict:
    data = {"model": model} if model else {}
    response = stack.http.post("/v1/jobs", files={"file": (image.name, image.read_bytes())}, data=data)
    assert response.status_code == 202, response.text
    return wait_for_job(stack, response.json()["id"])


def test_the_locally_trained_first_version_has_its_run_report_and_plots(stack) -> None:
    # Version 1 was trained without a server, as the starter model is (embedded: `xrayq train DATA`,
    # services: train_and_register); it is documented like a version of an API run.
    card = stack.http.get("/v1/models/chest-xray/versions/1").json()
    run = stack.http.get(f"/v1/training-runs/{card['training_run_id']}").json()
    assert run["status"] == "succeeded" and run["model"] == {"name": "chest-xray", "version": 1}
    assert run["promotion"] == "if_none_active" and run["promotion_decision"]["promote"] is True
    assert stack.http.get(f"/v1/datasets/{card['dataset_id']}").json()["files"] == 96  # --max-per-class 48
    assert card["evaluation"]["summary"]["split"] == "val" and card["evaluation"]["summary"]["n"] > 0
    assert set(card["plots"]) == {"confusion_matrix", "roc_curve", "learning_curves", "reliability", "robustness"}
    for url in card["plots"].values():
        plot = stack.http.get(url)
        assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
    assert card["calibration"]["calibrated"] is True and card["calibration"]["fitted_on"] == "validation"
    assert card["uncertainty"]["flags"] is True


def test_upload_train_watch_promote_and_roll_back(stack, chest_images, tmp_path) -> None:
    # A folder of split/class folders, uploaded with the CLI.
    folder = tmp_path / "chest-upload"
    for label, paths in chest_images.items():
        for split, chosen in (("train", paths[:30]), ("test", paths[30:36])):
            (folder / split / label).mkdir(parents=True, exist_ok=True)
            for path in chosen:
                shutil.copy(path, folder / split / label / path.name)
    dataset = json.loads(cli(stack, "datasets", "upload", str(folder), "--name", "chest-e2e", "--json").stdout)
    assert dataset["counts"] == {"train": {"NORMAL": 30, "PNEUMONIA": 30}, "test": {"NORMAL": 6, "PNEUMONIA": 6}}

    before = predict(stack, chest_images["PNEUMONIA"][0])
    old_version = before["result"]["model"]["version"]

    response = stack.http.post(
        "/v1/training-runs",
        json={"dataset": dataset["id"], "model_name": "chest-xray", "epochs": 4, "promotion": "manual", **TINY_RUN},
    )
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]
    seen: list[tuple[str, float | None]] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        run = stack.http.get(f"/v1/training-runs/{run_id}").json()
        seen.append((run["status"], run["progress"].get("percent")))
        if run["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert run["status"] == "succeeded", run
    moving = sorted({p for status, p in seen if status == "running" and p is not None and 0 < p < 100})
    assert moving, f"progress never seen between 0 and 100: {seen[:50]}"
    assert [h["epoch"] for h in run["history"]] == [1, 2, 3, 4]
    new_version = run["model"]["version"]
    assert new_version > old_version and run["evaluation"]["split"] == "test"

    card = stack.http.get(f"/v1/models/chest-xray/versions/{new_version}").json()
    assert card["is_active"] is False and card["evaluation"]["summary"]["n"] == 12
    assert card["card"]["calibration"]["temperature"] > 0 and "reliability" in card["plots"]
    assert card["metrics"]["evaluation"]["calibration"]["before"]["ece"] is not None
    for url in card["plots"].values():
        plot = stack.http.get(url)
        assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")

    # Promote with the CLI; the workers answer with it from the next job on, without a restart.
    assert "is now active" in cli(stack, "models", "promote", f"chest-xray@{new_version}").stdout
    after = predict(stack, chest_images["PNEUMONIA"][1])
    assert after["result"]["model"] == {"name": "chest-xray", "version": new_version}
    assert after["result"]["calibrated"] is True
    assert after["result"]["confidence"] == max(after["result"]["probabilities"].values())
    assert 0 <= after["result"]["uncertainty"] <= 1 and isinstance(after["result"]["uncertain"], bool)
    # The earlier result keeps the version that produced it.
    assert stack.http.get(f"/v1/jobs/{before['id']}").json()["result"]["model"]["version"] == old_version

    back = cli(stack, "models", "rollback", "chest-xray").stdout
    assert back.strip() == f"chest-xray@{old_version} is now active"
    rolled_back = predict(stack, chest_images["NORMAL"][1])
    assert rolled_back["result"]["model"] == {"name": "chest-xray", "version": old_version}
    listing = cli(stack, "models", "list").stdout.splitlines()
    assert listing[0].split()[:4] == ["MODEL", "OWNER", "VERSION", "ACTIVE"]
    active = [line.split()[:4] for line in listing[1:] if line.startswith("chest-xray ")]
    assert [version for _, _, version, marker in active if marker == "*"] == [str(old_version)]


def test_another_label_set_becomes_another_model(stack, data_dir) -> None:
    malaria = data_dir / "malaria-cells"
    name = f"malaria-cells-{stack.mode}"
    result = cli(
        stack, "train", str(malaria / "train"), "--name", name, "--dataset-name", name, "--promotion", "if_better",
        "--epochs", "2", "--image-size", "64", "--architecture", "mobilenet_v3_small", "--batch-size", "4", "--json",
    )  # fmt: skip
    run = json.loads(result.stdout)
    assert run["status"] == "succeeded" and run["promotion_decision"]["promote"] is True  # first version
    models = {m["name"]: m for m in stack.http.get("/v1/models").json()}
    assert models[name]["classes"] == ["Parasitized", "Uninfected"] and models[name]["active_version"] == 1

    image = sorted((malaria / "test" / "Parasitized").glob("*.png"))[0]
    answered = predict(stack, image, model=name)
    assert answered["status"] == "succeeded", answered
    assert answered["result"]["model"] == {"name": name, "version": 1}
    assert set(answered["result"]["probabilities"]) == {"Parasitized", "Uninfected"}
    # The chest model is untouched and still answers chest jobs.
    assert models["chest-xray"]["classes"] == ["NORMAL", "PNEUMONIA"]


def test_a_run_whose_trainer_is_killed_resumes_on_the_restarted_trainer(stack, data_dir) -> None:
    malaria = stack.http.get("/v1/datasets").json()
    dataset = next(d for d in malaria if d["name"].startswith("malaria-cells"))
    epochs = 30  # a fraction of a second each: enough left to kill the trainer mid-run
    run = stack.http.post(
        "/v1/training-runs", json={"dataset": dataset["id"], **TINY_RUN, "epochs": epochs, "batch_size": 4}
    ).json()
    deadline = time.monotonic() + 120
    while not stack.http.get(f"/v1/training-runs/{run['id']}").json()["checkpoint_epoch"]:
        assert time.monotonic() < deadline, "the run never checkpointed an epoch"
        time.sleep(0.05)
    trainer = stack.child_pid("trainer")
    os.kill(trainer, signal.SIGKILL)

    # The supervisor starts a new trainer; the reconciler queues the run again after
    # XRAYQ_RUN_STALE_AFTER_S; the new trainer continues after the checkpoint's epoch.
    deadline = time.monotonic() + 240
    while (view := stack.http.get(f"/v1/training-runs/{run['id']}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, f"not finished four minutes after its trainer died: {view}"
        time.sleep(0.5)
    # At least once: a loaded machine may stall the new trainer past the stale window too (it resumes again).
    assert view["status"] == "succeeded" and view["resumes"] >= 1, view
    assert [h["epoch"] for h in view["history"]] == list(range(1, epochs + 1))
    assert stack.child_pid("trainer") != trainer  # the supervisor started a new one
