"""A REST batch's signed callback, received by a real HTTP server that fails the first attempt."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.jobs.callbacks import DELIVERY_HEADER, SIGNATURE_HEADER, verify_signature
from tests.conftest import free_port

pytestmark = pytest.mark.e2e
SECRET = "callback-secret-for-the-e2e-test"


class Receiver:
    def __init__(self, failures: int) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                self.send_response(503 if len(receiver.calls) <= receiver.failures else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/xrayq"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_batch_result_reaches_the_callback_signed_after_a_failed_attempt(stack, chest_images) -> None:
    receiver = Receiver(failures=1)
    try:
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in chest_images["NORMAL"][:3]]
        response = stack.http.post(
            "/v1/batches", files=files, data={"callback_url": receiver.url, "callback_secret": SECRET}
        )
        assert response.status_code == 202, response.text
        accepted = response.json()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(receiver.calls) < 2:
            time.sleep(0.2)
        assert len(receiver.calls) == 2, receiver.calls
        (first_headers, _), (headers, body) = receiver.calls
        assert headers[DELIVERY_HEADER] == first_headers[DELIVERY_HEADER] == accepted["id"]  # one delivery, retried
        assert verify_signature(SECRET, headers[SIGNATURE_HEADER], body)
        assert not verify_signature(SECRET, headers[SIGNATURE_HEADER], body.replace(b"succeeded", b"failed"))
        assert not verify_signature("another-secret-of-enough-length", headers[SIGNATURE_HEADER], body)
        payload = json.loads(body)
        assert payload["event"] == "batch.completed"
        assert payload["batch"]["status"] == "succeeded"
        assert [job["id"] for job in payload["batch"]["jobs"]] == accepted["job_ids"]
        # The receiver saw the request before its answer reached the gateway, which records it after.
        batch = stack.http.get(f"/v1/batches/{accepted['id']}").json()
        while time.monotonic() < deadline and batch["deliveries"]["callback"]["status"] == "pending":
            time.sleep(0.2)
            batch = stack.http.get(f"/v1/batches/{accepted['id']}").json()
        assert batch["deliveries"]["callback"]["status"] == "delivered"
        assert batch["deliveries"]["callback"]["attempts"] == 2
    finally:
        receiver.close()


def test_a_callback_without_a_secret_is_refused(stack, chest_images) -> None:
    image = chest_images["NORMAL"][0]
    response = stack.http.post(
        "/v1/batches",
        files=[("files", (image.name, image.read_bytes(), "image/jpeg"))],
        data={"callback_url": "http://127.0.0.1:9/x"},
    )
    assert response.status_code == 422 and response.json()["code"] == "invalid_callback"
