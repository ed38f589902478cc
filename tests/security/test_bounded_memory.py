"""Finding 9 of the security review: one request cannot take the gateway's memory or its threads.

Over real HTTP against the gateway app (uvicorn on a loopback port, in this process so tracemalloc sees
its allocations), on real Postgres, Redis and the S3 server.
"""

from __future__ import annotations

import asyncio
import io
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

from tests.conftest import ADMIN_HEADERS
from tests.security.test_odd_input import gateway  # noqa: F401  (the fixture: the app served on loopback)

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


def test_a_zip_batch_near_the_request_cap_is_never_in_memory_whole(gateway) -> None:  # noqa: F811
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


def test_a_stow_rs_body_near_the_request_cap_is_never_in_memory_whole(gateway) -> None:  # noqa: F811
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
def test_a_malicious_npz_is_refused_before_anything_is_allocated(gateway, name, data) -> None:  # noqa: F811
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


def test_a_deflate_bomb_dicom_is_refused(gateway) -> None:  # noqa: F811
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
