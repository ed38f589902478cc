from __future__ import annotations

import pytest

from shared.core.storage import LocalObjectStore, ObjectNotFound, S3ObjectStore, make_object_store


@pytest.fixture(params=["s3", "local"])
def store(request, services_settings, tmp_path):
    if request.param == "s3":
        s3 = make_object_store(services_settings)
        assert isinstance(s3, S3ObjectStore)
        return s3
    return LocalObjectStore(tmp_path / "objects")


def test_put_get_exists_delete_round_trip(store) -> None:
    store.ping()
    key = "inputs/test/round-trip"
    assert not store.exists(key)
    store.put(key, b"\x89PNG bytes", "image/png")
    assert store.exists(key)
    assert store.get(key) == b"\x89PNG bytes"
    store.put(key, b"replaced")
    assert store.get(key) == b"replaced"
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(ObjectNotFound):
        store.get(key)


def test_local_store_refuses_keys_that_escape_its_folder(tmp_path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    with pytest.raises(ValueError):
        store.put("../outside", b"x")
