"""Classify and Batches & jobs, in a real browser: one dropped image with its Grad-CAM heatmap, a 50-image
ZIP followed to the end, a file name with HTML in it shown as text, and another organisation's jobs never
shown."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import expect

from tests.e2e.dashboard.conftest import chest_zip

pytestmark = pytest.mark.e2e
A_CLASS = re.compile(r"^(NORMAL|PNEUMONIA)$")


def drop_files(page, files: list[tuple[str, str, bytes]]) -> None:
    """Drop files on the drop zone as a person's drag and drop does: a `drop` event carrying a DataTransfer."""
    transfer = page.evaluate_handle(
        """(files) => {
            const transfer = new DataTransfer();
            for (const [name, type, bytes] of files) {
                transfer.items.add(new File([new Uint8Array(bytes)], name, { type }));
            }
            return transfer;
        }""",
        [[name, media_type, list(data)] for name, media_type, data in files],
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})


def test_a_dropped_image_gets_its_result(dashboard, keys, chest_images) -> None:
    board = dashboard(keys.north)
    page = board.page
    board.open("/classify")
    image = chest_images["PNEUMONIA"][0]
    drop_files(page, [(image.name, "image/jpeg", image.read_bytes())])

    card = page.locator(".result").first
    expect(card).to_have_class(re.compile(r"status-succeeded"), timeout=60_000)
    expect(card.locator(".filename")).to_have_text(image.name)
    expect(card.locator(".label strong")).to_have_text(A_CLASS)
    expect(card.locator(".probability")).to_have_count(2)
    expect(card.locator(".model-ref")).to_have_text(re.compile(r"answered by chest-xray v\d+"))
    assert card.locator(".preview img").count() == 1  # the input itself, beside the result
    heatmap = card.locator(".explanation img")  # and its Grad-CAM overlay beside it ("Explain" is on)
    expect(heatmap).to_be_visible(timeout=60_000)
    expect(heatmap).to_have_attribute("src", re.compile(r"^/v1/jobs/[0-9a-f-]+/explanation\?format=png$"))
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=heatmap.element_handle())
    expect(card.locator(".explanation-note")).to_contain_text("Grad-CAM heatmap for")
    board.screenshot("classify")


def test_a_file_name_with_html_is_shown_as_text(dashboard, keys, chest_images) -> None:
    board = dashboard(keys.north)
    page = board.page
    board.open("/classify")
    # No quotes: a browser sends those in a multipart file name as %22.
    name = "<img src=x onerror=document.body.dataset.pwned=1>scan.jpeg"
    image = chest_images["NORMAL"][1].read_bytes()
    page.set_input_files("#file-input", files=[{"name": name, "mimeType": "image/jpeg", "buffer": image}])

    card = page.locator(".result").first
    expect(card.locator(".filename")).to_have_text(name)
    expect(card).to_have_class(re.compile(r"status-succeeded"), timeout=60_000)
    assert page.locator("img[src='x']").count() == 0
    assert page.evaluate("document.body.dataset.pwned") is None
    board.open("/batches")  # listed by name there too, as text
    expect(page.locator("#jobs td.filename", has_text=name).first).to_be_visible()
    assert page.locator("img[src='x']").count() == 0
    assert page.evaluate("document.body.dataset.pwned") is None


def test_a_50_image_zip_is_followed_to_completion(dashboard, keys, data_dir) -> None:
    board = dashboard(keys.north)
    page = board.page
    board.open("/classify")
    page.fill("#client-ref", "ward-7 <b>batch</b>")
    archive = chest_zip(data_dir, 25, with_folders=False)
    page.set_input_files("#file-input", files=[{"name": "fifty.zip", "mimeType": "application/zip", "buffer": archive}])

    expect(page.locator(".result")).to_have_count(50)
    expect(page.locator(".result.status-succeeded")).to_have_count(50, timeout=120_000)
    board.screenshot("classify-batch")

    board.open("/batches")
    row = page.locator("#batches tbody tr", has_text="ward-7 <b>batch</b>").first
    expect(row.locator(".badge")).to_have_text("succeeded")
    expect(row.locator(".progress-label")).to_have_text("50 / 50")
    row.get_by_role("button", name="Jobs").click()
    expect(page.locator("#jobs tbody tr")).to_have_count(50)
    board.screenshot("batches")


def test_another_organisations_jobs_never_appear(dashboard, keys, dashboard_stack, chest_images) -> None:
    secret = "south-only-reference"
    response = httpx.post(
        f"{dashboard_stack.url}/v1/jobs",
        headers={"Authorization": f"Bearer {keys.south}"},
        files={"file": ("south.jpeg", chest_images["NORMAL"][2].read_bytes(), "image/jpeg")},
        data={"client_ref": secret},
    )
    assert response.status_code == 202, response.text

    north = dashboard(keys.north_submit)
    north.open("/batches")
    expect(north.page.locator("#jobs tbody tr").first).to_be_visible()  # north's own jobs are listed
    assert north.page.locator("#jobs", has_text=secret).count() == 0
    north.page.fill("#filters [name=client_ref]", secret)
    north.page.click("#filters button[type=submit]")
    expect(north.page.locator("#jobs-empty")).to_be_visible()

    south = dashboard(keys.south)
    south.open("/batches")
    expect(south.page.locator("#jobs td", has_text=secret)).to_have_count(1)
