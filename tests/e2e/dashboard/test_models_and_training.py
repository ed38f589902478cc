"""Training, Models and Operations in a real browser: a dataset uploaded and a short run watched moving
while another is cancelled; a version promoted, then the next result answered by it; what a `submit`
key is not shown; the operator's numbers."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import Stack
from tests.e2e.dashboard.conftest import chest_zip

pytestmark = pytest.mark.e2e
# Long enough (several seconds on two cores) that the page, polling each second, sees it move.
SHORT_RUN = {"epochs": "8", "image_size": "224", "max_per_class": "16", "architecture": "mobilenet_v3_small"}


def start_run(page, dataset_label: str, model: str, **fields: str) -> None:
    page.select_option("#run-dataset", label=dataset_label)
    page.fill("#run-model", model)
    page.fill("#run-architecture", fields["architecture"])
    page.fill("#run-epochs", fields["epochs"])
    page.fill("#run-image-size", fields["image_size"])
    page.fill("#run-max-per-class", fields["max_per_class"])
    page.fill("#run-batch-size", "8")
    page.click("#run-form button[type=submit]")


def test_a_training_run_moves_and_another_is_cancelled(dashboard, keys, data_dir) -> None:
    board = dashboard(keys.admin)  # the starter model is shared: an admin registers into it
    page = board.page
    board.open("/training")
    page.set_input_files(
        "#dataset-file",
        files=[
            {"name": "chest.zip", "mimeType": "application/zip", "buffer": chest_zip(data_dir, 20, with_folders=True)}
        ],
    )
    page.fill("#dataset-name", "chest-ui")
    page.click("#dataset-form button[type=submit]")
    dataset_row = page.locator("#datasets tbody tr", has_text="chest-ui")
    expect(dataset_row).to_have_count(1)
    expect(dataset_row.locator(".counts")).to_contain_text("NORMAL 20")
    expect(dataset_row.locator(".counts")).to_contain_text("PNEUMONIA 20")

    expect(page.locator("#runs .run").first).to_be_visible()  # the run that trained the starter model
    before = page.locator("#runs .run").count()
    start_run(page, "chest-ui v1 (40 files)", "chest-xray", **SHORT_RUN)
    expect(page.locator("#runs .run")).to_have_count(before + 1)
    start_run(page, "chest-ui v1 (40 files)", "chest-xray", **SHORT_RUN)
    expect(page.locator("#runs .run")).to_have_count(before + 2)

    # Newest first: the second waits behind the first (one trainer runs one run at a time). Cancel it.
    second, first = page.locator("#runs .run").nth(0), page.locator("#runs .run").nth(1)
    second_id, first_id = second.get_attribute("data-run-id"), first.get_attribute("data-run-id")
    second.get_by_role("button", name="Cancel").click()
    page.click("#confirm-ok")
    expect(page.locator(f".run[data-run-id='{second_id}']")).to_have_attribute("data-status", "cancelled")

    # The other's progress moves, and its curves are drawn from its history.
    # Moving: the page shows more than one state of the run before it ends (a phase or a percentage;
    # a short run can pass an epoch between two of the page's polls, so percentages alone may not).
    seen: set[tuple[str, str]] = set()
    run = page.locator(f".run[data-run-id='{first_id}']")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and run.get_attribute("data-status") not in ("succeeded", "failed"):
        seen.add((run.locator(".phase").inner_text(), run.locator(".progress").get_attribute("aria-valuenow") or ""))
        if len(seen) == 3:
            board.screenshot("training")
        time.sleep(0.3)
    assert run.get_attribute("data-status") == "succeeded", run.inner_text()
    assert len(seen) >= 2, f"the run's progress never moved on the page: {seen}"
    expect(run.locator(".loss-chart path.series")).to_have_count(2)  # train_loss and val_loss
    expect(run).to_contain_text("Registered chest-xray v")
    board.screenshot("training-finished")


def versions_of(stack: Stack, name: str) -> list[dict]:
    models = stack.http.get("/v1/models").json()
    return next(model for model in models if model["name"] == name)["versions"]


def an_inactive_version(stack: Stack, data_dir) -> int:
    """A version of chest-xray that is not active, trained through the API if there is none yet."""
    inactive = [v["version"] for v in versions_of(stack, "chest-xray") if not v["is_active"]]
    if inactive:
        return inactive[0]
    archive = chest_zip(data_dir, 16, with_folders=True)
    dataset = stack.http.post(
        "/v1/datasets", files={"file": ("d.zip", archive, "application/zip")}, data={"name": "promo"}
    )
    assert dataset.status_code == 201, dataset.text
    body = {"dataset": dataset.json()["id"], "model_name": "chest-xray", "epochs": 1, "image_size": 64}
    run = stack.http.post("/v1/training-runs", json={**body, "architecture": "mobilenet_v3_small", "batch_size": 8})
    assert run.status_code == 202, run.text
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        view = stack.http.get(f"/v1/training-runs/{run.json()['id']}").json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            assert view["status"] == "succeeded", view
            return view["model"]["version"]
        time.sleep(0.5)
    raise AssertionError("the training run did not finish")


def test_a_promoted_version_answers_the_next_result(dashboard, keys, dashboard_stack, data_dir, chest_images) -> None:
    version = an_inactive_version(dashboard_stack, data_dir)
    board = dashboard(keys.admin)
    page = board.page
    board.open("/models")
    model = page.locator("section.model[data-model='chest-xray']")
    expect(model.locator("table.metrics thead th").nth(1)).to_be_visible()
    # The headline figures in words first; every number of the metrics behind "All figures".
    expect(model.locator("table.metrics tbody th[title='evaluation.roc_auc']")).to_have_text("ROC-AUC")
    expect(model.locator("table.metrics-all")).to_be_hidden()
    model.locator("details.all-metrics summary").first.click()
    expect(model.locator("table.metrics-all th", has_text="evaluation.per_class.NORMAL.recall").first).to_be_visible()
    expect(model.locator(".plot-column figure img").first).to_be_visible()
    board.screenshot("models")

    model.locator(f"button.promote[data-version='{version}']").click()
    expect(page.locator("#confirm-text")).to_contain_text(f"v{version}")
    page.click("#confirm-ok")
    expect(page.locator("#notice")).to_have_text(f"chest-xray v{version} is active.")
    expect(model.locator(".activations tbody tr").first).to_contain_text(f"v{version}")

    board.open("/classify")
    page.set_input_files("#file-input", str(chest_images["NORMAL"][3]))
    card = page.locator(".result").first
    expect(card).to_have_class(re.compile(r"status-succeeded"), timeout=60_000)
    expect(card.locator(".model-ref")).to_have_text(f"answered by chest-xray v{version}")


def test_weights_download_is_recorded_on_the_models_page(dashboard, keys) -> None:
    board = dashboard(keys.north)
    page = board.page
    board.open("/models")
    model = page.locator("section.model[data-model='chest-xray']")
    with page.expect_download() as download:
        model.get_by_role("link", name="weights").first.click()
    assert download.value.suggested_filename.startswith("chest-xray-v")
    assert download.value.suggested_filename.endswith(".safetensors")
    board.open("/models")
    row = page.locator("section.model[data-model='chest-xray'] .downloads tbody tr").first
    expect(row).to_contain_text("weights")
    expect(row).to_contain_text("north")


def test_a_submit_key_cannot_reach_training(dashboard, keys) -> None:
    board = dashboard(keys.north_submit)
    page = board.page
    expect(page.locator("header nav")).not_to_contain_text("Training")
    expect(page.locator("header nav")).not_to_contain_text("Operations")
    board.open("/training")
    expect(page.locator("#no-training")).to_be_visible()
    assert page.locator("#run-form, #dataset-form").count() == 0
    board.open("/models")
    expect(page.locator("section.model").first).to_be_visible()
    assert page.locator("button.promote, button.rollback").count() == 0
    # And the API refuses what the page does not offer, even with the session's own CSRF token.
    status = page.evaluate(
        """async () => (await fetch('/v1/training-runs', {method: 'POST', credentials: 'same-origin',
            headers: {'Content-Type': 'application/json',
                      'X-Xrayq-CSRF': document.querySelector('meta[name=xrayq-csrf]').content},
            body: JSON.stringify({dataset: 'chest-ui'})})).status"""
    )
    assert status == 403
    board.screenshot("training-submit-key")


def test_the_session_cookie_is_out_of_scripts_reach(dashboard, keys, dashboard_stack) -> None:
    board = dashboard(None)
    page = board.page
    board.open("/")
    page.fill("#api-key", "xq_not_a_key")
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#sign-in-error")).to_be_visible()
    board.screenshot("sign-in")
    board.sign_in(keys.north)
    (cookie,) = [c for c in board.context.cookies() if c["name"] == "xrayq_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert "xrayq_session" not in page.evaluate("document.cookie")
    assert keys.north not in page.content()
    # A page elsewhere cannot use the cookie for a change: without the CSRF header the API refuses it.
    status = page.evaluate("async () => (await fetch('/v1/jobs/x', {method: 'DELETE'})).status")
    assert status == 403
    headers = httpx.get(f"{dashboard_stack.url}/classify").headers
    assert "script-src 'self'" in headers["content-security-policy"]


def test_operations_shows_the_metrics(dashboard, keys) -> None:
    board = dashboard(keys.admin)
    page = board.page
    board.open("/operations")
    expect(page.locator("#workers-detail")).to_contain_text("predict")
    expect(page.locator("#active-versions tbody tr", has_text="chest-xray")).to_have_count(1)
    expect(page.locator("#latency tbody tr").first).to_be_visible()
    expect(page.locator("#throughput-chart path.series")).to_have_count(1, timeout=15_000)
    board.screenshot("operations")
