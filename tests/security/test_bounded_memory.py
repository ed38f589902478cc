"""Finding 9 of the security review: one request cannot take the gateway's memory or its threads.

Over real HTTP against the gateway app (uvicorn on a loopback port, in this process so tracemalloc sees
its allocations), on real Postgres, Redis and the S3 server. Tests whose requests store many objects use
an S3 server in a process of its own: what it keeps is not the gateway's memory.
"""

from __future__ import annotations

import asyncio
import io
import sys
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid

from loadtest.harness.processes import start_process, stop_process, wait_for_port
from shared.core.parallel_puts import STREAM_IN_FLIGHT_BYTES
from shared.core.storage import S3ObjectStore
from tests.conftest import ADMIN_HEADERS, free_port, png_bytes
from tests.dicom_samples import part10, secondary_capture
from tests.security.test_odd_input import served
from tests.unit.intake.test_uploads import make_zip

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


def peak_allocated_while(send) -> tuple[httpx.Response, int]:
    """The response, and the most memory Python allocated (beyond what was held before) while it came."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        response = send()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return response, peak - before


def streamed(body: bytes) -> Iterator[bytes]:
    """The body in 1 MiB pieces, as a client sends a file: the test's own copy is not what is measured."""
    view = memoryview(body)
    for start in range(0, len(body), MIB):
        yield bytes(view[start : start + MIB])


def test_a_zip_batch_near_the_request_cap_is_never_in_memory_whole(gateway) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for index in range(3):  # each over the per-file limit: refused from its declared size
            archive.writestr(f"big-{index}.png", b"\0" * (40 * MIB))
    archive_bytes = buffer.getvalue()
    boundary = "zip-batch"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="study.zip"\r\n'
    head += "Content-Type: application/zip\r\n\r\n"
    body = head.encode() + archive_bytes + f"\r\n--{boundary}--\r\n".encode()
    del archive_bytes, buffer
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    response, peak = peak_allocated_while(lambda: gateway.post("/v1/batches", content=streamed(body), headers=headers))
    assert response.status_code == 202, response.text
    assert {job["status"] for job in response.json()["jobs"]} == {"failed"}
    assert peak < len(body) / 4, f"{peak / MIB:.0f} MiB allocated for a {len(body) / MIB:.0f} MiB ZIP"


# No housekeeping in this process's gateways: its passes over the shared database and bucket (reconciler,
# purges, the orphan sweeper's listing) allocate in threads of their own, which tracemalloc would count
# as the request's.
QUIET = {"reconcile_interval_s": 0}


@pytest.fixture(scope="module")
def gateway(services_settings, services_model) -> Iterator[httpx.Client]:
    """The gateway app served by uvicorn on 127.0.0.1, and an HTTP client for it."""
    with served(services_settings.model_copy(update=QUIET)) as client:
        yield client


@pytest.fixture(scope="module")
def storing_gateway(services_settings, services_model, tmp_path_factory) -> Iterator[httpx.Client]:
    """The gateway app served in this process, storing into moto's S3 server running in another."""
    port = free_port()
    log = tmp_path_factory.mktemp("s3-of-its-own") / "moto.log"
    process = start_process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], {}, log)
    try:
        assert wait_for_port(port, 30), log.read_text()[-2000:]
        own = {"s3_endpoint_url": f"http://127.0.0.1:{port}", **QUIET}
        settings = services_settings.model_copy(update=own)
        S3ObjectStore(settings).ensure_bucket()
        with served(settings) as client:
            yield client
    finally:
        stop_process(process)


def distinct_pngs(count: int, side: int = 448) -> Iterator[bytes]:
    """`count` different greyscale noise PNGs of side x side (~200 KB each at 448: noise does not compress)."""
    for index in range(count):
        yield png_bytes(np.random.default_rng(index).integers(0, 256, size=(side, side), dtype=np.uint8))


def zip_of(members: dict[str, bytes]) -> bytes:
    return make_zip(list(members.items()), compression=zipfile.ZIP_STORED)


def multipart_file(field: str, filename: str, data: bytes, boundary: str, **fields: str) -> bytes:
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    head += f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'.encode()
    head += b"Content-Type: application/zip\r\n\r\n"
    return head + data + f"\r\n--{boundary}--\r\n".encode()


MEMBERS = 200


def test_a_batch_zip_of_many_images_is_stored_one_image_at_a_time(storing_gateway) -> None:
    members = {f"scan-{index:03}.png": png for index, png in enumerate(distinct_pngs(MEMBERS))}
    total = sum(len(data) for data in members.values())
    body = multipart_file("files", "many.zip", zip_of(members), "many-images")
    del members
    headers = {"Content-Type": "multipart/form-data; boundary=many-images"}
    response, peak = peak_allocated_while(
        lambda: storing_gateway.post("/v1/batches", content=streamed(body), headers=headers)
    )
    assert response.status_code == 202, response.text
    jobs = response.json()["jobs"]
    assert len(jobs) == MEMBERS and {job["status"] for job in jobs} == {"queued"}
    assert peak < total / 4, f"{peak / MIB:.1f} MiB allocated to store {MEMBERS} images of {total / MIB:.0f} MiB"


def test_a_dataset_zip_of_many_images_is_stored_one_image_at_a_time(storing_gateway) -> None:
    pngs = distinct_pngs(MEMBERS)
    members = {f"{label}/{index:03}.png": next(pngs) for index in range(MEMBERS // 2) for label in ("a", "b")}
    total = sum(len(data) for data in members.values())
    body = multipart_file("file", "many.zip", zip_of(members), "many-members", name="many-members")
    del members
    headers = {"Content-Type": "multipart/form-data; boundary=many-members"}
    response, peak = peak_allocated_while(
        lambda: storing_gateway.post("/v1/datasets", content=streamed(body), headers=headers)
    )
    assert response.status_code == 201, response.text
    assert response.json()["files"] == MEMBERS
    assert peak < total / 4, f"{peak / MIB:.1f} MiB allocated to store {MEMBERS} images of {total / MIB:.0f} MiB"


def test_a_stow_rs_body_of_many_instances_is_stored_one_instance_at_a_time(storing_gateway, tmp_path) -> None:
    study = generate_uid()
    boundary = "many-instances"
    body = b""
    for index, png in enumerate(distinct_pngs(MEMBERS // 2)):
        (tmp_path / f"{index}.png").write_bytes(png)
        instance = part10(secondary_capture(tmp_path / f"{index}.png", study_uid=study))
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + instance + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    response, peak = peak_allocated_while(
        lambda: storing_gateway.post("/dicomweb/studies", content=streamed(body), headers=headers)
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["00081199"]["Value"]) == MEMBERS // 2  # ReferencedSOPSequence: every one stored
    # What may be held: the uploads in flight (at most STREAM_IN_FLIGHT_BYTES) and the instance being
    # checked -- never the body (19 MiB), however many instances it holds.
    bound = STREAM_IN_FLIGHT_BYTES + 3 * MIB
    assert bound < len(body) / 2
    assert peak < bound, f"{peak / MIB:.1f} MiB allocated to store {len(body) / MIB:.0f} MiB of instances"


def test_a_stow_rs_body_near_the_request_cap_is_never_in_memory_whole(gateway) -> None:
    boundary = "bounded-memory"
    part = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + b"\1" * (4 * MIB) + b"\r\n"
    body = part * 25 + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}

    response, peak = peak_allocated_while(
        lambda: gateway.post("/dicomweb/studies", content=streamed(body), headers=headers)
    )
    assert response.status_code == 409, response.text  # every part refused, none stored
    assert peak < len(body) / 4, f"{peak / MIB:.0f} MiB allocated for a {len(body) / MIB:.0f} MiB body"


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def huge_shape_npz() -> bytes:
    """A `train_images` member whose .npy header declares 10**6 images of 4096x4096 but holds 28x28."""
    good = npz_bytes(train_images=np.zeros((1, 28, 28), np.uint8), train_labels=np.zeros(1, np.int64))
    start = good.index(b"'shape': (1, 28, 28)")
    end = good.index(b"\n", start)  # the header's padding ends in a newline: keep its length
    forged = b"'shape': (1000000, 4096, 4096)}"
    return good[:start] + forged.ljust(end - start) + good[end:]


@pytest.mark.parametrize(
    ("name", "data"),
    [
        (
            "huge-label",
            npz_bytes(train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.array([0, 2**31], np.int64)),
        ),
        ("huge-shape", huge_shape_npz()),
    ],
)
def test_a_malicious_npz_is_refused_before_anything_is_allocated(gateway, name, data) -> None:
    files = {"file": (f"{name}.npz", data, "application/zip")}
    started = time.monotonic()
    response, peak = peak_allocated_while(lambda: gateway.post("/v1/datasets", files=files, data={"name": name}))
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["code"] in {"dataset_invalid_layout", "archive_unreadable"}
    assert peak < 16 * MIB and time.monotonic() - started < 10


def deflate_bomb(inflated: int = 1 << 30) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
    meta.ImplementationClassUID = "1.2.3.4.5"
    head = io.BytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = b"\0" * MIB
    body = b"".join(deflater.compress(zeros) for _ in range(inflated // MIB)) + deflater.flush()
    return head.getvalue() + body


def test_a_deflate_bomb_dicom_is_refused(gateway) -> None:
    bomb = deflate_bomb()
    assert len(bomb) < 2 * MIB
    response, peak = peak_allocated_while(
        lambda: gateway.post("/v1/jobs", files={"file": ("bomb.dcm", bomb, "application/dicom")})
    )
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "file_too_large"
    assert peak < 64 * MIB


def test_many_long_polls_do_not_block_a_submission(gateway, chest_images) -> None:  # noqa: F811
    image = chest_images["NORMAL"][0].read_bytes()
    queued = gateway.post("/v1/jobs", files={"file": ("x.png", image, "image/png")})
    assert queued.status_code == 202, queued.text  # no worker runs here: the job stays queued
    job_url = queued.json()["location"]

    async def attack() -> float:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(
            base_url=str(gateway.base_url), headers=ADMIN_HEADERS, timeout=60, limits=limits
        ) as client:
            polls = [asyncio.create_task(client.get(job_url, params={"wait": 20})) for _ in range(200)]
            await asyncio.sleep(0)  # let them connect first
            started = time.monotonic()
            submitted = await client.post("/v1/jobs", files={"file": ("y.png", image, "image/png")})
            took = time.monotonic() - started
            assert submitted.status_code == 202, submitted.text
            for poll in polls:
                poll.cancel()
            await asyncio.gather(*polls, return_exceptions=True)
            return took

    assert asyncio.run(attack()) < 3
