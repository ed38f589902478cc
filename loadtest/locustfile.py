"""Realistic users of xrayq for locust (`make locust`, or headless:
`locust -f loadtest/locustfile.py --headless -u 40 -r 10 -t 60s --host http://127.0.0.1:8000`).

- a PACS integration sends batches of 20-50 images as a ZIP and long-polls them to the end;
- single-image clients submit one image and long-poll its job;
- dashboard pollers read models, recent jobs and readiness.
A non-2xx answer, or a job or batch that ends in failure, counts as a failure.
"""

from __future__ import annotations

import random
import time

from locust import HttpUser, between, task

from loadtest.harness.clients import TERMINAL_JOB_STATUSES, auth_headers
from loadtest.harness.images import chest_image_paths, read_images, zip_bytes
from shared.core.settings import get_settings

# Services mode needs a key: XRAYQ_API_KEY (role `submit`), else the bootstrap admin key.
AUTH = auth_headers()
IMAGES = read_images(chest_image_paths(get_settings().data_dir)[::20])


class PacsIntegration(HttpUser):
    weight = 1
    wait_time = between(1, 3)

    def on_start(self) -> None:
        self.client.headers.update(AUTH)

    @task
    def send_study(self) -> None:
        chosen = random.sample(IMAGES, random.randint(20, 50))
        study = zip_bytes((f"{index:03d}-{name}", data) for index, (name, data) in enumerate(chosen))
        with self.client.post("/v1/batches", files={"files": ("study.zip", study)}, catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"submit answered {response.status_code}")
                return
            batch_id = response.json()["id"]
        deadline = time.monotonic() + 120
        with self.client.rename_request("/v1/batches/[id]?wait"):
            while time.monotonic() < deadline:
                with self.client.get(
                    f"/v1/batches/{batch_id}", params={"limit": 1, "wait": 10}, catch_response=True
                ) as response:
                    body = response.json()
                    if body["status"] in ("succeeded", "partially_failed", "failed", "cancelled"):
                        if body["status"] != "succeeded":
                            response.failure(f"batch ended {body['status']}: {body['counts']}")
                        return
        self.environment.events.request.fire(
            request_type="BATCH",
            name="timeout",
            response_time=120000,
            response_length=0,
            exception=TimeoutError(batch_id),
        )


class SingleImageClient(HttpUser):
    weight = 3
    wait_time = between(0.2, 1)

    def on_start(self) -> None:
        self.client.headers.update(AUTH)

    @task
    def classify_one(self) -> None:
        name, data = random.choice(IMAGES)
        with self.client.post("/v1/jobs", files={"file": (name, data)}, catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"submit answered {response.status_code}")
                return
            job_id = response.json()["id"]
        with self.client.rename_request("/v1/jobs/[id]?wait"):
            for _ in range(10):
                with self.client.get(f"/v1/jobs/{job_id}", params={"wait": 10}, catch_response=True) as response:
                    status = response.json()["status"]
                    if status in TERMINAL_JOB_STATUSES:
                        if status != "succeeded":
                            response.failure(f"job ended {status}: {response.json()['error']}")
                        return


class DashboardPoller(HttpUser):
    weight = 1
    wait_time = between(2, 5)

    def on_start(self) -> None:
        self.client.headers.update(AUTH)

    @task(3)
    def recent_jobs(self) -> None:
        self.client.get("/v1/jobs", params={"limit": 20})

    @task
    def models(self) -> None:
        self.client.get("/v1/models")

    @task
    def readiness(self) -> None:
        self.client.get("/readyz")
