from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from tests.conftest import ADMIN_HEADERS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(services_settings, services_model):
    """The real gateway app, in-process, against real Postgres, Redis and the S3 server."""
    with TestClient(create_app(services_settings), headers=ADMIN_HEADERS) as test_client:
        yield test_client


@pytest.fixture
def redis_client(redis_prefix):
    import redis

    from tests.conftest import REDIS_URL

    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def submit(settings, uploads, *, as_batch: bool = False, model_ref: str = "chest-xray") -> list:
    """Jobs made as the gateway makes them (stored, committed, published to the settings' queue): their rows."""
    from shared.core.queue import make_celery
    from shared.core.storage import make_object_store
    from shared.db.session import database_for
    from shared.jobs.submissions import submit_images

    with database_for(settings).session() as session:
        submitted = submit_images(
            session,
            make_object_store(settings),
            make_celery(settings),
            settings,
            uploads,
            model_ref=model_ref,
            as_batch=as_batch,
        )
        return submitted.jobs


def add_to_study(settings, upload, organisation: str | None, source: str = "dimse") -> tuple[str, list[str]]:
    """A checked instance through study intake, as the DICOM receiver adds it: its batch id and new job ids."""
    from shared.core.queue import make_celery
    from shared.core.storage import make_object_store
    from shared.db.session import database_for
    from shared.jobs.studies import add_instances

    with database_for(settings).session() as session:
        intake = add_instances(
            session,
            make_object_store(settings),
            make_celery(settings),
            settings,
            [upload],
            organisation=organisation,
            source=source,
            model_ref="chest-xray",
        )
        batch = intake.batches[0]
        return batch.id, [job.id for job in intake.jobs[batch.id]]
