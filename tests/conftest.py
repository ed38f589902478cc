"""Fixtures every test layer shares: the real data folder and small real images made from it."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The data layout and free ports, as the load tests find them (one definition each).
from loadtest.harness.images import CHEST_TRAIN
from loadtest.harness.processes import free_port
from shared.core.settings import Settings

# Tests reuse the shared set's images across tests that count forward passes, corrupt stored inputs or
# kill workers mid-chunk; with the result cache on, a later test's job would be answered from an earlier
# test's. So it is off for the suite -- this process and every process it starts inherit this -- and the
# tests of the cache (tests/integration/test_result_cache.py) turn it on.
os.environ.setdefault("XRAYQ_RESULT_CACHE", "false")

# The warnings about a model's intended use (DICOM tags against the card); a result may carry others
# (`uncertain`, ...) that depend on the model's weights, not on the input's tags.
SUITABILITY_CODES = ("body_part_mismatch", "modality_mismatch")


def suitability_codes(job: dict) -> list[str]:
    """The codes of a job view's intended-use warnings, in order."""
    return [w["code"] for w in job["warnings"] if w["code"] in SUITABILITY_CODES]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Settings().data_dir.resolve()
    if not (path / CHEST_TRAIN).is_dir():
        pytest.fail(f"Test data missing: {path / CHEST_TRAIN} (set XRAYQ_DATA_DIR to ../shared/data).")
    return path


@pytest.fixture(scope="session")
def chest_images(data_dir: Path) -> dict[str, list[Path]]:
    """A few real chest X-rays per class, in a fixed order."""
    root = data_dir / CHEST_TRAIN
    return {label: sorted((root / label).glob("*.jpeg"))[:40] for label in ("NORMAL", "PNEUMONIA")}


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --- Real services: each test session gets its own Postgres database, Redis key prefix and S3 server.
# In CI an unreachable service fails the run (pytest.fail), it is never skipped.

ADMIN_KEY = "xq_test_admin_key_for_this_session_only"  # services-mode tests authenticate as admin
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
POSTGRES_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A new, empty Postgres database for this test session, dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        pytest.fail(f"Postgres is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    name = f"xrayq_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        from shared.db.session import get_database

        get_database.cache_clear()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url():
    with scratch_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_prefix():
    import uuid

    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}")
    prefix = f"xrayq-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    for key in client.scan_iter(match=f"{prefix}*", count=500):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3-compatible HTTP server on a loopback port (MinIO plays this part in compose)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def services_env(tmp_path_factory, postgres_url, redis_prefix, s3_endpoint, data_dir) -> dict[str, str]:
    """XRAYQ_* variables for the services mode against the real local services."""
    return {
        "XRAYQ_HOME": str(tmp_path_factory.mktemp("services-home")),
        "XRAYQ_DATA_DIR": str(data_dir),
        "XRAYQ_DATABASE_URL": postgres_url,
        "XRAYQ_BROKER_URL": REDIS_URL,
        "XRAYQ_BROKER_KEY_PREFIX": redis_prefix,
        "XRAYQ_S3_ENDPOINT_URL": s3_endpoint,
        "XRAYQ_S3_BUCKET": "xrayq-test",
        "XRAYQ_S3_ACCESS_KEY": "testing",
        "XRAYQ_S3_SECRET_KEY": "testing",
        "XRAYQ_ADMIN_KEY": ADMIN_KEY,  # services mode requires API keys
    }


def settings_from_env(env: dict[str, str], **overrides: object) -> Settings:
    fields = {key.removeprefix("XRAYQ_").lower(): value for key, value in env.items()}
    return Settings(**{**fields, **overrides})


@pytest.fixture(scope="session")
def services_settings(services_env) -> Settings:
    from shared.core.storage import S3ObjectStore
    from shared.db.migrate import upgrade_database

    settings = settings_from_env(services_env)
    upgrade_database(settings)
    S3ObjectStore(settings).ensure_bucket()
    return settings


# A small model trained for real (one quick epoch on a few real images): enough to check plumbing.
TINY_TRAIN_ARGS = [
    "--max-per-class",
    "48",
    "--epochs",
    "1",
    "--image-size",
    "64",
    "--body-part",
    "CHEST",
    "--modality",
    "CR",
    "--modality",
    "DX",
]
CHEST_USE = {"body_parts": ["CHEST"], "modalities": ["CR", "DX"]}


def train_tiny_model(settings: Settings, data_dir: Path, name: str = "chest-xray") -> dict:
    from services.trainer.pipeline import train_and_register
    from services.trainer.training import TrainConfig

    config = TrainConfig(architecture="mobilenet_v3_small", image_size=64, epochs=1, max_per_class=48)
    return train_and_register(settings, data_dir / CHEST_TRAIN, name=name, config=config, intended_use=CHEST_USE)


@pytest.fixture(scope="session")
def services_model(services_settings, data_dir) -> dict:
    return train_tiny_model(services_settings, data_dir)


@contextlib.contextmanager
def services_env_on_a_new_database(services_env: dict[str, str], home: Path, name: str) -> Iterator[dict]:
    """The services mode on a new, empty database, with a Redis key prefix and bucket name of its own
    (named `name`): what a first `xrayq migrate` meets."""
    with scratch_database() as database_url:
        yield {
            **services_env,
            "XRAYQ_HOME": str(home),
            "XRAYQ_DATABASE_URL": database_url,
            "XRAYQ_BROKER_KEY_PREFIX": services_env["XRAYQ_BROKER_KEY_PREFIX"] + f"{name}:",
            "XRAYQ_S3_BUCKET": f"xrayq-{name}",
        }


@contextlib.contextmanager
def services_env_of_its_own(services_env: dict[str, str], home: Path, name: str, data_dir: Path) -> Iterator[dict]:
    """The services mode with a database, Redis key prefix and bucket of its own (named `name`), and a
    tiny model: for real processes whose workers, trainers or fuzzers must not touch other tests' data."""
    from shared.core.storage import S3ObjectStore
    from shared.db.migrate import upgrade_database

    with services_env_on_a_new_database(services_env, home, name) as env:
        settings = settings_from_env(env)
        upgrade_database(settings)
        S3ObjectStore(settings).ensure_bucket()
        train_tiny_model(settings, data_dir)
        yield env


@pytest.fixture(scope="session")
def photograph() -> Image.Image:
    """A real colour photograph (Grace Hopper, shipped with matplotlib): not a radiograph."""
    import matplotlib

    return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
