"""Finding 7: one bad file fails only itself, never its message-mates (other organisations' included).

Against the real gateway, Postgres, Redis, the S3 server and the real worker `Predictor`: a DICOM whose
window cannot be applied (WindowWidth 0, made from a real sample) and a codestream bomb (a tiny JPEG
inside DICOM whose frame header declares 14000 x 14000 under a 64 x 64 DICOM header) are refused at
intake without a large allocation; the same bytes forced into storage behind intake, as if an older
intake had accepted them, fail their own jobs with their codes while the other jobs of the same
forward pass succeed.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tracemalloc
from dataclasses import replace

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit
from sqlalchemy import update

from services.worker.inference import ModelCache, Predictor
from shared.core.errors import XrayqError
from shared.core.queue import make_celery
from shared.core.storage import make_object_store
from shared.db.models import Job, JobStatus
from shared.db.session import database_for
from shared.intake.upload import Upload
from shared.jobs.creation import JobRequest, create_jobs
from shared.jobs.lifecycle import Prediction, claim_jobs, record_outcomes
from shared.jobs.views import get_job
from shared.models.heads import Head
from tests.integration.conftest import client  # noqa: F401  (the real gateway app, as a fixture)
from tests.integration.test_gateway_api import problem

pytestmark = pytest.mark.integration

# What a decoder may allocate for these small files; the bomb made it allocate 186 MiB.
ALLOCATION_BUDGET = 48 * 2**20


@pytest.fixture(scope="module")
def sample(data_dir) -> bytes:
    """A real computed radiograph (CR, chest, 1955 x 1841, 15 bits) from ../shared/data/dicom."""
    return (data_dir / "dicom" / "RG1_UNCR.dcm").read_bytes()


def part10(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def zero_window(sample: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(sample))
    ds.WindowCenter, ds.WindowWidth = 15000, 0
    return part10(ds)


def small_jpeg() -> bytes:
    noise = np.random.default_rng(7).integers(0, 255, (64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    return buffer.getvalue()


def with_frame_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) declaring another size; the scan data stays 64 x 64."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def codestream_bomb(sample: bytes) -> bytes:
    """The sample's header, 64 x 64 x 8 bits, with one JPEG baseline frame that declares 14000 x 14000."""
    ds = pydicom.dcmread(io.BytesIO(sample))
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([with_frame_size(small_jpeg(), 14000, 14000)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return part10(ds)


def peak_allocation(action) -> tuple[object, int]:
    """What `action` returns (or raises) and the peak of memory traced while it ran (numpy included)."""
    tracemalloc.start()
    try:
        try:
            result: object = action()
        except Exception as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def make_predictor(settings, cache_type=ModelCache) -> Predictor:
    store = make_object_store(settings)
    return Predictor(settings, database_for(settings), store, cache_type(store, torch.device("cpu")))


def single_jobs(settings, uploads: list[Upload], organisation: str) -> list[str]:
    """Single (non-batch) jobs of one organisation, made as the gateway makes them (stored, committed, published)."""
    requests = [JobRequest([upload], "chest-xray", organisation=organisation) for upload in uploads]
    with database_for(settings).session() as session:
        created = create_jobs(session, make_object_store(settings), make_celery(settings), requests, chunk_size=32)
    return [job.id for group in created for job in group.jobs]


def behind_intake(settings, job_id: str, data: bytes) -> None:
    """Replace a stored input with bytes intake never saw: a file accepted by an older intake (so its
    recorded sha256 is theirs; a mismatch would fail the job as `input_corrupted` before decoding)."""
    with database_for(settings).session() as session:
        job = session.get(Job, job_id)
        key = job.input_key
        job.input_sha256 = hashlib.sha256(data).hexdigest()
    make_object_store(settings).put(key, data)


def only_these_singles_waiting(settings) -> None:
    """Singles left queued by other tests share the database and would be coalesced first (oldest first)."""
    with database_for(settings).session() as session:
        session.execute(
            update(Job).where(Job.status == JobStatus.queued, Job.batch_id.is_(None)).values(status=JobStatus.cancelled)
        )


def outcome(settings, job_id: str) -> Job:
    with database_for(settings).session() as session:
        return get_job(session, job_id)


def test_a_dicom_whose_window_cannot_be_applied_is_refused_at_intake(client, sample) -> None:  # noqa: F811
    accepted = client.post("/v1/jobs", files={"file": ("window.dcm", sample, "application/dicom")})
    assert accepted.status_code == 202, accepted.text  # the real sample itself is fine
    refused = client.post("/v1/jobs", files={"file": ("window.dcm", zero_window(sample), "application/dicom")})
    assert "Window Width" in problem(refused, 422, "dicom_invalid_lut")["detail"]


def test_codestream_bombs_are_refused_at_intake_without_a_large_allocation(client, sample) -> None:  # noqa: F811
    bomb = codestream_bomb(sample)
    assert len(bomb) < 8192
    refused, peak = peak_allocation(
        lambda: client.post("/v1/jobs", files={"file": ("bomb.dcm", bomb, "application/dicom")})
    )
    problem(refused, 413, "image_too_large")
    assert peak < ALLOCATION_BUDGET, f"intake allocated {peak / 2**20:.0f} MiB"
    # Plain JPEGs: the frame header a decoder uses is the only one (a second, larger one is refused).
    jpeg = small_jpeg()
    at = jpeg.index(b"\xff\xc0")
    (length,) = struct.unpack_from(">H", jpeg, at + 2)
    two_frames = jpeg[:at] + with_frame_size(jpeg, 14000, 14000)[at : at + 2 + length] + jpeg[at:]
    problem(client.post("/v1/jobs", files={"file": ("two.jpeg", two_frames)}), 422, "image_unreadable")
    problem(
        client.post("/v1/jobs", files={"file": ("big.jpeg", with_frame_size(jpeg, 9000, 9000))}), 413, "image_too_large"
    )


def test_bad_files_behind_intake_fail_alone_in_a_message_shared_with_another_organisation(
    services_settings, services_model, sample, chest_images
) -> None:
    settings = services_settings.model_copy(update={"coalesce_singles": True, "predict_chunk_size": 32})
    only_these_singles_waiting(settings)
    # Organisation A's two files pass intake as the real sample, then are swapped for the bad bytes.
    window, bomb = single_jobs(
        settings, [Upload(f"{name}.dcm", sample, "application/dicom") for name in ("window", "bomb")], "org-a"
    )
    behind_intake(settings, window, zero_window(sample))
    behind_intake(settings, bomb, codestream_bomb(sample))
    # Organisation B's good single jobs wait for the next forward pass.
    good = single_jobs(
        settings, [Upload(p.name, p.read_bytes(), "image/jpeg") for p in chest_images["NORMAL"][36:39]], "org-b"
    )
    # The bad job's own message takes B's waiting singles into the same forward pass.
    claimed, peak = peak_allocation(lambda: make_predictor(settings).run([window]))
    assert claimed == {"claimed": 5}
    assert peak < ALLOCATION_BUDGET + 64 * 2**20, f"the worker allocated {peak / 2**20:.0f} MiB"
    assert (outcome(settings, window).status, outcome(settings, window).error_code) == (
        JobStatus.failed,
        "dicom_invalid_lut",
    )
    assert (outcome(settings, bomb).status, outcome(settings, bomb).error_code) == (JobStatus.failed, "image_too_large")
    for job_id in good:
        job = outcome(settings, job_id)
        assert job.status == JobStatus.succeeded and job.attempts == 1, (job.error_code, job.error_detail)
        assert job.organisation == "org-b" and job.timings["batch_size"] == 3
    assert outcome(settings, window).attempts == 1  # failed at once with its code, not `too_many_attempts` later


class TripwireModule(torch.nn.Module):
    """The served network, with an operator that fails whenever a batch holds an all-black image (as a
    kernel can fail on one input's values): the whole tensor batch's pass raises."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        flat = batch.flatten(1)
        if bool((flat.max(dim=1).values == flat.min(dim=1).values).any()):
            raise RuntimeError("operator failed on a constant image")
        return self.inner(batch)


class TripwireCache(ModelCache):
    def get(self, row):  # type: ignore[no-untyped-def]
        model = super().get(row)
        module = TripwireModule(model.module)
        return replace(model, module=module, head=Head(module, model.head.samples))  # the worker runs the head


def test_a_forward_pass_that_fails_for_the_batch_is_retried_image_by_image(
    services_settings, services_model, chest_images
) -> None:
    settings = services_settings.model_copy(update={"coalesce_singles": False})
    black = np.zeros((64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(black).save(buffer, "PNG")
    uploads = [Upload(p.name, p.read_bytes(), "image/jpeg") for p in chest_images["PNEUMONIA"][36:39]]
    uploads.insert(1, Upload("black.png", buffer.getvalue(), "image/png"))
    ids = single_jobs(settings, uploads, "org-a")
    assert make_predictor(settings, TripwireCache).run(ids) == {"claimed": 4}
    culprit = outcome(settings, ids[1])
    assert (culprit.status, culprit.error_code) == (JobStatus.failed, "inference_failed")
    for job_id in ids[:1] + ids[2:]:
        job = outcome(settings, job_id)
        assert job.status == JobStatus.succeeded and job.timings["batch_size"] == 1


def test_a_result_the_database_refuses_fails_its_own_job_and_the_others_are_written(
    services_settings, services_model, chest_images
) -> None:
    settings = services_settings.model_copy(update={"coalesce_singles": False})
    ids = single_jobs(
        settings, [Upload(p.name, p.read_bytes(), "image/jpeg") for p in chest_images["NORMAL"][33:36]], "org-b"
    )
    with database_for(settings).session() as session:
        claim = claim_jobs(session, ids, settings)
    version = claim.versions[("chest-xray", None)]
    assert not isinstance(version, XrayqError)
    # The middle result names a label longer than the column holds: Postgres refuses that row, and with
    # it the whole batched statement.
    predictions = [
        Prediction(job, "x" * 300 if job.id == ids[1] else "NORMAL", {"NORMAL": 1.0}, version.id) for job in claim.jobs
    ]
    with database_for(settings).session() as session:
        assert record_outcomes(session, predictions=predictions) == {ids[1]}
    assert [outcome(settings, job_id).status for job_id in ids] == [
        JobStatus.succeeded,
        JobStatus.failed,
        JobStatus.succeeded,
    ]
    assert outcome(settings, ids[1]).error_code == "result_unwritable"
